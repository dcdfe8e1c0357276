//! What a sandbox should be (`Spec`), and the plan the child executes (`Plan`): every
//! C string, pointer array, map line and mount step is built here, in the parent, before
//! clone. The child only reads the plan.

use std::ffi::{c_char, CString};
use std::os::fd::RawFd;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mount::{self, FsPlan};
use crate::seccomp::{self, Filter};
use crate::sys;

/// An extra mount inside the sandbox. With the `python` feature, read directly from an
/// `nsfast.Bind` / `nsfast.Tmpfs` (their attributes; paths as os.fsencode gives them).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "python", derive(pyo3::FromPyObject))]
pub enum Mount {
    /// Bind `src` (a host path) onto `dst` (a path inside the sandbox).
    Bind {
        #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::fs_bytes))]
        src: Vec<u8>,
        #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::fs_bytes))]
        dst: Vec<u8>,
        readonly: bool,
    },
    /// A fresh tmpfs on `dst`, `size` bytes at most (the kernel default when None).
    Tmpfs {
        #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::fs_bytes))]
        dst: Vec<u8>,
        size: Option<u64>,
    },
    /// A copy-on-write view of the host directory `src` on `dst` (an `nsfast.Overlay`): its
    /// changes in the sandbox's overlay tmpfs; `commit` is the Python layer's business.
    Overlay {
        #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::fs_bytes))]
        src: Vec<u8>,
        #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::fs_bytes))]
        dst: Vec<u8>,
        commit: bool,
    },
}

/// Everything a sandbox needs, as plain Rust data (the Python layer validates first; this
/// module checks again what would otherwise become a confusing errno).
///
/// With the `python` feature this is read directly from a frozen `nsfast.Spec` (the one
/// seam between the languages): each field is its attribute of the same name unless said
/// otherwise; paths are bytes as `os.fsencode` gives them.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "python", derive(pyo3::FromPyObject))]
pub struct Spec {
    /// Not part of a Python Spec: the command is passed next to it.
    #[cfg_attr(feature = "python", pyo3(default))]
    pub args: Vec<Vec<u8>>,
    /// `KEY=VALUE` entries, from `Spec._env_items`.
    #[cfg_attr(feature = "python", pyo3(attribute("_env_items"), from_py_with = crate::py::env_entries))]
    pub env: Vec<Vec<u8>>,
    #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::fs_bytes))]
    pub cwd: Vec<u8>,
    /// CLONE_NEW* flags (from the namespace names).
    #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::namespace_flags))]
    pub namespaces: u64,
    #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::opt_utf8))]
    pub hostname: Option<Vec<u8>>,
    /// None: the host root, bind-mounted.
    #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::opt_fs_bytes))]
    pub rootfs: Option<Vec<u8>>,
    pub readonly_root: bool,
    pub mounts: Vec<Mount>,
    /// The uid/gid the command runs as inside the sandbox.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Bit n set: capability n stays in the bounding set; all others are dropped
    /// (`Spec._cap_mask`, from the capability names).
    #[cfg_attr(feature = "python", pyo3(attribute("_cap_mask")))]
    pub keep_caps: u64,
    /// nsfast-init as the first process (`Spec._init`: `init` resolved).
    #[cfg_attr(feature = "python", pyo3(attribute("_init")))]
    pub init: bool,
    pub new_session: bool,
    pub die_with_parent: bool,
    /// Paths replaced by an empty read-only tmpfs (directories) or /dev/null (files).
    #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::fs_bytes_list))]
    pub masked_paths: Vec<Vec<u8>>,
    /// Paths bound read-only onto themselves.
    #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::fs_bytes_list))]
    pub readonly_paths: Vec<Vec<u8>>,
    /// Host directories hidden behind an empty tmpfs (host root only).
    #[cfg_attr(feature = "python", pyo3(from_py_with = crate::py::fs_bytes_list))]
    pub hidden: Vec<Vec<u8>>,
    /// Sizes of /tmp and /dev/shm in bytes (None: the kernel's default, half of RAM).
    pub tmp_size: Option<u64>,
    pub shm_size: Option<u64>,
    /// The syscall filter; None: no filter.
    pub seccomp: Option<SeccompSpec>,
    /// RLIMIT_NPROC of the sandbox's user (the pids limit): counted per user namespace, it
    /// bounds the sandbox's processes even without a cgroup (rootless without delegation).
    #[cfg_attr(feature = "python", pyo3(attribute("_nproc")))]
    pub nproc: Option<u64>,
    /// (resource, soft, hard) set before exec (`Spec._rlimit_items`, from `Spec.rlimits`).
    #[cfg_attr(feature = "python", pyo3(attribute("_rlimit_items")))]
    pub rlimits: Vec<(u32, u64, u64)>,
    /// Delegate the sandbox's cgroup (v2) to its root and mount a fresh cgroup2 at
    /// /sys/fs/cgroup inside, read-write (needs the cgroup and mnt namespaces).
    pub delegate_cgroup: bool,
    /// A writable copy-on-write root: overlayfs over the root tree and its submounts.
    #[cfg_attr(feature = "python", pyo3(default))]
    pub overlay: bool,
    /// The overlay's tmpfs size in bytes (None: the kernel's default, half of RAM).
    #[cfg_attr(feature = "python", pyo3(default))]
    pub overlay_size: Option<u64>,
    /// A host directory that holds the overlay's changes instead (kept).
    #[cfg_attr(feature = "python", pyo3(default, from_py_with = crate::py::opt_fs_bytes))]
    pub overlay_upper: Option<Vec<u8>>,
}

/// Changes to nsfast's default syscall allow list (an `nsfast.Seccomp`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "python", derive(pyo3::FromPyObject))]
pub struct SeccompSpec {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// socket(2) only for AF_UNIX (a zygote's tasks with network="none"); not a field of
    /// nsfast.Seccomp.
    #[cfg_attr(feature = "python", pyo3(default))]
    pub unix_only: bool,
}

/// runc's masked paths (readable information about the host, or its keys).
pub const DEFAULT_MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// runc's read-only paths (kernel knobs).
pub const DEFAULT_READONLY_PATHS: [&str; 5] =
    ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// Host directories hidden in host-root mode: other programs' sockets and temporary files,
/// and users' homes.
pub const DEFAULT_HIDDEN: [&str; 5] = ["/run", "/tmp", "/var/tmp", "/home", "/root"];

pub const DEFAULT_TMP_SIZE: u64 = 256 << 20;
pub const DEFAULT_SHM_SIZE: u64 = 64 << 20;

/// Host ids a root caller's sandboxes run as: inside ids 0..SANDBOX_ID_COUNT map to a range
/// of SANDBOX_ID_COUNT host ids in 0x70000000..0x7FFFFFFF (systemd's UIDS-GIDS.md leaves it
/// unused). SANDBOX_ID_BASE.. is the range every sandbox whose files nsfast keeps on disk
/// with the same ids across runs shares (`overlay_upper`, see [`shares_ids`]); every other
/// sandbox has a range of its own ([`next_sandbox_base`], [`next_overlay_base`]).
pub const SANDBOX_ID_BASE: u32 = 0x7000_0000;
pub const SANDBOX_ID_COUNT: u32 = 65536;
/// The first of the ranges sandboxes get for themselves, and how many there are. The kernel
/// keeps some counts per host uid, whatever the user namespace: fds in flight in unix
/// sockets (`unix_inflight`, against the sender's RLIMIT_NOFILE), epoll watches, pipe
/// buffer pages. Sandboxes that share a uid share them: one holding 20,000 fds in flight
/// made every other one's SCM_RIGHTS, and nsfast's own hand-over of a sandbox's trees and
/// of a zygote task's pidfd, fail with ETOOMANYREFS (found by an audit).
pub const SANDBOX_RANGES_BASE: u32 = SANDBOX_ID_BASE + SANDBOX_ID_COUNT;
pub const SANDBOX_RANGES: u32 = (SANDBOX_OWNER_BASE - SANDBOX_RANGES_BASE) / SANDBOX_ID_COUNT;
/// The ranges a process hands out in turn: its sandboxes running at once have ranges of
/// their own up to this many, and the id-mapping user namespace of each (for idmapped
/// Binds and rootfs trees, see `spawn::idmap_userns`) is made once.
pub const SANDBOX_RANGES_PER_PROCESS: u32 = 64;

/// The owners of a root caller's sandboxes' user namespaces: the last SANDBOX_ID_COUNT
/// host ids below 0x80000000, none of them mapped in any sandbox. The kernel charges
/// per-user-namespace counts (inotify instances, ...) to the owner at the level above the
/// namespace: each sandbox of its own owner has a share of its own.
pub const SANDBOX_OWNER_BASE: u32 = 0x8000_0000 - SANDBOX_OWNER_COUNT;
pub const SANDBOX_OWNER_COUNT: u32 = SANDBOX_ID_COUNT;

/// This process's random start in a space of `count` (a fixed one where getrandom cannot
/// answer: only sharing gets likelier).
fn seed(cell: &'static std::sync::OnceLock<u32>, count: u32) -> u32 {
    *cell.get_or_init(|| {
        let mut b = [0u8; 4];
        let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
        u32::from_ne_bytes(b) % count
    })
}

/// The owner for the next sandbox of this process: consecutive ids from a random start, so
/// a process's sandboxes running at once never share one (until it started 65,536 more)
/// and two processes' rarely do (sharing only shares those counts).
pub fn next_sandbox_owner() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    SANDBOX_OWNER_BASE + seed(&SEED, SANDBOX_OWNER_COUNT).wrapping_add(n) % SANDBOX_OWNER_COUNT
}

/// The process's two sets of SANDBOX_RANGES_PER_PROCESS ranges (consecutive from a random
/// start among the SANDBOX_RANGES), handed out in turn: one for sandboxes whose overlays
/// nsfast makes, one for every other. The overlay set is taken in turn per set of layers
/// (`layers`, see [`layers_key`]): a start's spare (`crate::spare`) is made for the range
/// the next start with the same layers takes ([`peek_overlay_base`]), whatever starts with
/// other layers come between.
fn range_base(slot: u32) -> u32 {
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    SANDBOX_RANGES_BASE
        + (seed(&SEED, SANDBOX_RANGES) + slot % (2 * SANDBOX_RANGES_PER_PROCESS)) % SANDBOX_RANGES * SANDBOX_ID_COUNT
}

/// The first host id of the range for the next sandbox of this process that has one of its
/// own and no overlay of nsfast's: the process's plain ranges in turn.
pub fn next_sandbox_base() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    range_base(NEXT.fetch_add(1, Ordering::Relaxed) % SANDBOX_RANGES_PER_PROCESS)
}

/// Each set of layers' next turn in the overlay ranges (at most 64 sets remembered).
static OVERLAY_TURNS: std::sync::Mutex<Vec<(u64, u32)>> = std::sync::Mutex::new(Vec::new());

fn overlay_slot(layers: u64, turn: u32) -> u32 {
    SANDBOX_RANGES_PER_PROCESS + (layers as u32).wrapping_add(turn) % SANDBOX_RANGES_PER_PROCESS
}

/// As [`next_sandbox_base`], for a sandbox whose overlays nsfast makes, of `layers`.
pub fn next_overlay_base(layers: u64) -> u32 {
    let mut turns = OVERLAY_TURNS.lock().unwrap_or_else(|p| p.into_inner());
    let turn = match turns.iter_mut().find(|(k, _)| *k == layers) {
        Some((_, t)) => {
            *t = t.wrapping_add(1);
            *t
        }
        None => {
            if turns.len() >= 64 {
                turns.remove(0);
            }
            turns.push((layers, 0));
            0
        }
    };
    range_base(overlay_slot(layers, turn))
}

/// The range [`next_overlay_base`] gives the next start of `layers` (unless another start
/// of them takes it first): what spares are made for.
pub fn peek_overlay_base(layers: u64) -> u32 {
    let turns = OVERLAY_TURNS.lock().unwrap_or_else(|p| p.into_inner());
    let next = turns.iter().find(|(k, _)| *k == layers).map_or(0, |(_, t)| t.wrapping_add(1));
    range_base(overlay_slot(layers, next))
}

/// What identifies a plan's set of layers for [`next_overlay_base`]: a hash of its prepared
/// trees and upper, as planned (their owners the shared range's, before they are rebased).
pub fn layers_key(fs: &FsPlan) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{:?}{:?}", fs.prepare, fs.upper).hash(&mut h);
    h.finish()
}

/// Whether a sandbox of `fs` runs in the shared range SANDBOX_ID_BASE..: one that writes to
/// host files with its host ids, which the next run must find its own: its overlay upper is
/// the caller's directory (`overlay_upper`), or a writable tree of the caller's (a `Bind`,
/// a rootfs) is on a file system that cannot be idmapped (`spawn::can_idmap`).
pub fn shares_ids(fs: &FsPlan) -> bool {
    matches!(fs.upper, Some(mount::Upper::Dir(_)))
        || fs.prepare.iter().any(|p| {
            p.idmap && p.overlay.is_none() && p.attrs & sys::MOUNT_ATTR_RDONLY == 0 && !crate::spawn::can_idmap(&p.src)
        })
}

fn bytes_of(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|p| p.as_bytes().to_vec()).collect()
}

impl Spec {
    /// A spec with nsfast's defaults around `args`.
    pub fn new(args: Vec<Vec<u8>>) -> Spec {
        Spec {
            args,
            env: vec![
                b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_vec(),
                b"HOME=/".to_vec(),
            ],
            cwd: b"/".to_vec(),
            namespaces: crate::ns::flags(DEFAULT_NAMESPACES).expect("known names"),
            hostname: None,
            rootfs: None,
            readonly_root: true,
            mounts: Vec::new(),
            uid: None,
            gid: None,
            keep_caps: 0,
            init: false,
            new_session: true,
            die_with_parent: true,
            masked_paths: bytes_of(&DEFAULT_MASKED_PATHS),
            readonly_paths: bytes_of(&DEFAULT_READONLY_PATHS),
            hidden: bytes_of(&DEFAULT_HIDDEN),
            tmp_size: Some(DEFAULT_TMP_SIZE),
            shm_size: Some(DEFAULT_SHM_SIZE),
            seccomp: Some(SeccompSpec::default()),
            nproc: None,
            rlimits: Vec::new(),
            delegate_cgroup: false,
            overlay: false,
            overlay_size: None,
            overlay_upper: None,
        }
    }
}

pub const DEFAULT_NAMESPACES: [&str; 7] = ["user", "mnt", "pid", "uts", "ipc", "net", "cgroup"];

/// Who the caller is; decides the id maps.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub euid: u32,
    pub egid: u32,
    /// Root whose user namespace maps the sandbox range SANDBOX_ID_BASE.. (the initial one):
    /// its sandboxes get that range. A root caller nested in a sandbox has no such ids and
    /// maps like a rootless caller (its sandbox's root is itself).
    pub range: bool,
}

impl Caller {
    pub fn current() -> Caller {
        let euid = rustix::process::geteuid().as_raw();
        Caller { euid, egid: rustix::process::getegid().as_raw(), range: euid == 0 && sandbox_range_mapped() }
    }

    /// A caller with ids `euid`/`egid` (root: with the sandbox range).
    pub fn with_ids(euid: u32, egid: u32) -> Caller {
        Caller { euid, egid, range: euid == 0 }
    }
}

/// Whether `map` (this process's uid_map or gid_map text) has the ids
/// SANDBOX_ID_BASE..0x80000000 in its own namespace (the first column): every range a
/// sandbox may get and the owners of their user namespaces.
pub fn maps_sandbox_range(map: &str) -> bool {
    let (lo, hi) = (SANDBOX_ID_BASE as u64, 0x8000_0000u64);
    map.lines().any(|l| {
        let n: Vec<u64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        n.len() == 3 && n[0] <= lo && hi <= n[0] + n[2]
    })
}

/// Whether this process's user namespace maps the sandbox range (read once: a process
/// does not change its user namespace under nsfast).
pub fn sandbox_range_mapped() -> bool {
    static MAPPED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MAPPED.get_or_init(|| {
        ["/proc/self/uid_map", "/proc/self/gid_map"]
            .iter()
            .all(|f| std::fs::read_to_string(f).is_ok_and(|t| maps_sandbox_range(&t)))
    })
}

/// The lines the parent writes for a new user namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMaps {
    pub uid_map: String,
    pub gid_map: String,
    /// Write "deny" to setgroups first (required for an unprivileged gid_map write).
    pub deny_setgroups: bool,
    /// The root caller's range: the child starts as host uid 0, which it does not map, and
    /// sets its ids itself.
    pub range: bool,
}

impl IdMaps {
    /// The maps of a sandbox of `caller`: a root caller's sandbox gets the unprivileged
    /// range at SANDBOX_ID_BASE (its root is never host root); others map one inside id
    /// (`uid`, default 0) to themselves, the only id they own.
    pub fn for_caller(caller: Caller, uid: Option<u32>, gid: Option<u32>) -> IdMaps {
        if caller.range {
            IdMaps::sandbox_range(SANDBOX_ID_BASE)
        } else {
            IdMaps::single(caller, uid, gid)
        }
    }

    /// Inside ids 0..SANDBOX_ID_COUNT -> `base`.. (written by a root caller).
    pub fn sandbox_range(base: u32) -> IdMaps {
        let line = format!("0 {base} {SANDBOX_ID_COUNT}\n");
        IdMaps { uid_map: line.clone(), gid_map: line, deny_setgroups: false, range: true }
    }

    /// One-line maps: `inside` (default 0) -> the caller's id.
    pub fn single(caller: Caller, uid: Option<u32>, gid: Option<u32>) -> IdMaps {
        IdMaps {
            uid_map: format!("{} {} 1\n", uid.unwrap_or(0), caller.euid),
            gid_map: format!("{} {} 1\n", gid.unwrap_or(0), caller.egid),
            // Unprivileged in the parent namespace (rootless, or root nested in a sandbox,
            // without capabilities there): the kernel requires setgroups "deny" first.
            deny_setgroups: !caller.range,
            range: false,
        }
    }
}

/// A NULL-terminated array of C strings that owns its strings.
pub struct CStrArray {
    _strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

// SAFETY: the pointers point into `_strings`, owned and never mutated.
unsafe impl Send for CStrArray {}
// SAFETY: read-only after construction.
unsafe impl Sync for CStrArray {}

impl CStrArray {
    pub fn new(items: impl IntoIterator<Item = CString>) -> CStrArray {
        let strings: Vec<CString> = items.into_iter().collect();
        let mut ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStrArray { _strings: strings, ptrs }
    }

    pub fn as_ptr(&self) -> *const *const u8 {
        self.ptrs.as_ptr().cast()
    }
}

/// Set-ids applied by the child when there is no user namespace (root callers only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetIds {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// What the child runs at the end.
pub struct Exec {
    pub argv_strings: Vec<CString>,
    /// execve candidates in PATH order (one when argv[0] has a '/').
    pub candidates: Vec<CString>,
    pub argv: CStrArray,
    pub envp: CStrArray,
    /// Run the command under nsfast-init (pid 1 that forwards signals and reaps).
    pub init: bool,
}

impl Exec {
    /// nsfast-init's command line: `nsfast-init REPORT_FD N CANDIDATE... -- ARGV...`.
    /// nsfast-init's command line; `status_fd` -1: no status report (see init/main.rs).
    pub fn init_argv(&self, report_fd: RawFd, status_fd: RawFd) -> CStrArray {
        let mut v = vec![
            CString::from(c"nsfast-init"),
            CString::new(report_fd.to_string()).expect("digits"),
            CString::new(status_fd.to_string()).expect("digits"),
            CString::new(self.candidates.len().to_string()).expect("digits"),
        ];
        v.extend(self.candidates.iter().cloned());
        v.push(CString::from(c"--"));
        v.extend(self.argv_strings.iter().cloned());
        CStrArray::new(v)
    }
}

/// The full, prepared plan of one sandbox.
pub struct Plan {
    pub clone_flags: u64,
    pub maps: Option<IdMaps>,
    /// The host id inside id 0 maps to (a root caller's range; None: the caller's own ids).
    pub id_base: Option<u32>,
    /// With overlays nsfast makes: their layers' [`layers_key`].
    pub layers: Option<u64>,
    pub fs: FsPlan,
    /// Right after the id maps are written, become the new user namespace's root
    /// (setresgid/setgroups/setresuid 0): a root caller's child is still host uid 0 there,
    /// which its range does not map.
    pub become_root: bool,
    /// Installed last before exec (after no_new_privs).
    pub seccomp: Option<Arc<Filter>>,
    /// RLIMIT_NPROC set in a new user namespace (where it counts that namespace's processes).
    pub nproc: Option<u64>,
    /// The spec's rlimits, (resource, soft, hard), set before exec.
    pub rlimits: Vec<(u32, u64, u64)>,
    pub hostname: Option<Vec<u8>>,
    pub loopback: bool,
    pub set_ids: Option<SetIds>,
    pub keep_caps: u64,
    pub cap_last: u32,
    pub new_session: bool,
    pub die_with_parent: bool,
    pub cwd: CString,
    pub exec: Exec,
    /// argv[0] as given, for error messages.
    pub argv0: String,
    /// `delegate_cgroup`: the host ids of the sandbox's root, to own its cgroup.
    pub delegate: Option<(u32, u32)>,
}

fn cstring(field: &'static str, bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| Error::invalid(field, "contains a NUL byte"))
}

/// The env value of `key` in a `K=V` list.
fn env_get<'a>(env: &'a [Vec<u8>], key: &[u8]) -> Option<&'a [u8]> {
    env.iter().rev().find_map(|kv| kv.strip_prefix(key).and_then(|rest| rest.strip_prefix(b"=")))
}

/// execvpe's search: every PATH entry joined with argv[0], or argv[0] alone if it has a '/'.
pub fn exec_candidates(argv0: &[u8], path: Option<&[u8]>) -> Vec<Vec<u8>> {
    if argv0.contains(&b'/') {
        return vec![argv0.to_vec()];
    }
    let path = path.unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
    path.split(|&b| b == b':')
        .map(|dir| {
            let dir = if dir.is_empty() { &b"."[..] } else { dir };
            let mut c = dir.to_vec();
            if !c.ends_with(b"/") {
                c.push(b'/');
            }
            c.extend_from_slice(argv0);
            c
        })
        .collect()
}

fn os(p: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(p)
}

fn host_probe(p: &[u8]) -> Option<bool> {
    std::fs::metadata(os(p)).ok().map(|m| m.is_dir())
}

/// `rel` inside `root`, resolved with `root` as "/" (as the sandbox will see it).
fn in_root_probe(root: &[u8], rel: &[u8]) -> Option<bool> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(os(root), OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let fd = rustix::fs::openat2(&dir, os(rel), OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), how).ok()?;
    rustix::fs::fstat(&fd)
        .ok()
        .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory)
}

/// (mount point, file system type) of each mount, in mountinfo's order.
pub type MountTable = Arc<Vec<(Vec<u8>, String)>>;

/// This process's mount table (/proc/self/mountinfo) as (mount point, file system type),
/// in its order; read and parsed again only when it changed.
///
/// The kernel makes that file pollable: POLLPRI once the namespace's mount table changed
/// since the file was opened or last polled. So the table is kept with the open file and
/// re-read after such an event, or when the process is another (a fork) or its mount
/// namespace another (setns). Reading it costs ~80 us per overlay start on this VM (the
/// kernel formats every mount); a start only asks whether anything changed. The Python
/// layer's cgroup-root check uses it too (`_core.mounts`).
pub fn mount_table() -> Option<MountTable> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::sync::Mutex;
    struct Cached {
        pid: u32,
        ns: (u64, u64),
        file: OwnedFd,
        table: MountTable,
    }
    static CACHE: Mutex<Option<Cached>> = Mutex::new(None);
    let st = rustix::fs::stat("/proc/self/ns/mnt").ok()?;
    let (pid, ns) = (std::process::id(), (st.st_dev, st.st_ino));
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = cache.as_ref().filter(|c| c.pid == pid && c.ns == ns) {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&c.file, PollFlags::PRI)];
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        if poll(&mut fds, Some(&zero)) == Ok(0) {
            return Some(c.table.clone());
        }
    }
    // Opened first, read second: a change in between shows in the text and as an event.
    let file = rustix::fs::open("/proc/self/mountinfo", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let mut text = Vec::new();
    std::fs::File::from(file.try_clone().ok()?).read_to_end(&mut text).ok()?;
    let mut mounts = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == b"-") else { continue };
        let (Some(point), Some(fstype)) = (fields.get(4), fields.get(dash + 1)) else { continue };
        mounts.push((unescape_mountinfo(point), String::from_utf8_lossy(fstype).into_owned()));
    }
    let table = Arc::new(mounts);
    *cache = Some(Cached { pid, ns, file, table: table.clone() });
    Some(table)
}

/// The mounts strictly below `root` in this process's mount table (/proc/self/mountinfo):
/// (path relative to `root`, file system type), parents first; of mounts stacked on one
/// path, the top one's type.
fn submounts_probe(root: &[u8]) -> Vec<(Vec<u8>, String)> {
    let Some(table) = mount_table() else { return Vec::new() };
    let base = mount::normalize_target(root).unwrap_or_default();
    let mut found: Vec<(Vec<u8>, String)> = Vec::new();
    for (point, fstype) in table.iter() {
        let Some(point) = mount::normalize_target(point) else { continue };
        let rel = if base.is_empty() {
            point
        } else if point.starts_with(&base) && point.get(base.len()) == Some(&b'/') {
            point[base.len() + 1..].to_vec()
        } else {
            continue;
        };
        if rel.is_empty() {
            continue;
        }
        match found.iter_mut().find(|(p, _)| *p == rel) {
            Some(e) => e.1 = fstype.clone(),
            None => found.push((rel, fstype.clone())),
        }
    }
    found.sort_by_key(|(p, _)| p.iter().filter(|&&b| b == b'/').count());
    found
}

/// The entries of host directory `dir` (symlinks not followed), sorted by name.
fn list_dir_probe(dir: &[u8]) -> Vec<mount::HostEntry> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let Ok(rd) = std::fs::read_dir(os(dir)) else { return Vec::new() };
    let mut out: Vec<mount::HostEntry> = rd
        .flatten()
        .filter_map(|e| {
            let md = std::fs::symlink_metadata(e.path()).ok()?;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                b'd'
            } else if ft.is_file() {
                b'f'
            } else if ft.is_symlink() {
                b'l'
            } else {
                b'o'
            };
            let target =
                if kind == b'l' { std::fs::read_link(e.path()).ok()?.as_os_str().as_bytes().to_vec() } else { vec![] };
            Some(mount::HostEntry {
                name: e.file_name().as_bytes().to_vec(),
                kind,
                mode: md.permissions().mode(),
                target,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// mountinfo's octal escapes (`\040` for a space, ...) undone.
fn unescape_mountinfo(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 4 <= s.len() && s[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

fn is_link_probe(root: &[u8], rel: &[u8]) -> bool {
    std::fs::symlink_metadata(std::path::Path::new(os(root)).join(os(rel))).is_ok_and(|m| m.file_type().is_symlink())
}

/// The highest capability number this kernel knows (read once: it is fixed at boot, and
/// Plan::build is on the spawn path).
pub fn cap_last_cap() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
    })
}

/// The filter for `s`, built once per distinct request and process (building costs more
/// than a spawn's whole setup).
fn seccomp_filter(s: &SeccompSpec, keep_caps: u64) -> Result<Arc<Filter>> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Cache = Mutex<HashMap<(SeccompSpec, u64), Arc<Filter>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (s.clone(), keep_caps);
    if let Some(f) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(f.clone());
    }
    let f = Arc::new(Filter::build(&seccomp::Policy {
        allow: &s.allow,
        deny: &s.deny,
        keep_caps,
        unix_only: s.unix_only,
    })?);
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, f.clone());
    Ok(f)
}

/// This process's cgroup hierarchies under /sys/fs/cgroup as a sandbox mounts them again
/// (`cgroup::view`), read once: they are the host's, set up at boot.
pub fn cgroup_view() -> Option<&'static mount::CgroupView> {
    static VIEW: std::sync::OnceLock<Option<mount::CgroupView>> = std::sync::OnceLock::new();
    VIEW.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let links: Vec<(Vec<u8>, Vec<u8>)> = list_dir_probe(b"/sys/fs/cgroup")
            .into_iter()
            .filter(|e| e.kind == b'l' && !e.target.contains(&b'/'))
            .map(|e| (e.name, e.target))
            .collect();
        crate::cgroup::view(&text, &links)
    })
    .as_ref()
}

/// Whether this process's `/` is the root of a mount (not a directory it was chrooted into),
/// as `mount::FsSpec::root_in_place` needs; false where statx cannot tell.
fn root_is_a_mount_root() -> bool {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    statx(CWD, c"/", AtFlags::empty(), StatxFlags::empty()).is_ok_and(|st| {
        let attr = StatxAttributes::MOUNT_ROOT.bits();
        st.stx_attributes_mask.bits() & attr != 0 && st.stx_attributes.bits() & attr != 0
    })
}

impl Plan {
    /// Build the plan for `spec` run by `caller`.
    pub fn build(spec: &Spec, caller: Caller) -> Result<Plan> {
        // No command: only with init=True, which then idles (a container's main process).
        let idle: &[u8] = b"";
        let argv0 = match spec.args.first() {
            Some(a) => a,
            None if spec.init => idle,
            None => return Err(Error::invalid("args", "must not be empty")),
        };
        if argv0.is_empty() && !spec.args.is_empty() {
            return Err(Error::invalid("args", "argv[0] must not be empty"));
        }
        let mut clone_flags = spec.namespaces;
        let user_ns = clone_flags & libc::CLONE_NEWUSER as u64 != 0;
        if !user_ns && caller.euid != 0 && clone_flags != 0 {
            // Rootless: only a new user namespace grants the rights the rest needs.
            clone_flags |= libc::CLONE_NEWUSER as u64;
        }
        let user_ns = clone_flags & libc::CLONE_NEWUSER as u64 != 0;
        let mnt_ns = clone_flags & libc::CLONE_NEWNS as u64 != 0;
        if !mnt_ns && (spec.rootfs.is_some() || !spec.mounts.is_empty()) {
            return Err(Error::invalid("namespaces", "rootfs and mounts need the 'mnt' namespace"));
        }
        if spec.hostname.is_some() && clone_flags & libc::CLONE_NEWUTS as u64 == 0 {
            return Err(Error::invalid("hostname", "needs the 'uts' namespace"));
        }
        if let Some(h) = &spec.hostname {
            if h.len() > 64 {
                return Err(Error::invalid("hostname", "is longer than 64 bytes"));
            }
        }
        let maps = user_ns.then(|| IdMaps::for_caller(caller, spec.uid, spec.gid));
        let range = maps.as_ref().is_some_and(|m| m.range);
        if spec.delegate_cgroup && (clone_flags & libc::CLONE_NEWCGROUP as u64 == 0 || !mnt_ns) {
            return Err(Error::invalid(
                "delegate_cgroup",
                "needs the 'cgroup' and 'mnt' namespaces (the sandbox mounts its own cgroup2 rooted at its cgroup)",
            ));
        }
        for (field, id) in [("uid", spec.uid), ("gid", spec.gid)] {
            if let Some(id) = id.filter(|&id| range && id >= SANDBOX_ID_COUNT) {
                return Err(Error::invalid(
                    field,
                    format!("{id} is outside the sandbox's id range 0..{}", SANDBOX_ID_COUNT - 1),
                ));
            }
        }
        // Without a user namespace (root caller, trusted) or with the root caller's range,
        // the child sets the ids itself; a single-id map already makes them the mapped one.
        let set_ids = ((!user_ns || range) && (spec.uid.is_some() || spec.gid.is_some()))
            .then_some(SetIds { uid: spec.uid, gid: spec.gid });

        let fs = if mnt_ns {
            let probes = mount::Probes {
                host: &host_probe,
                in_root: &in_root_probe,
                is_link: &is_link_probe,
                submounts: &submounts_probe,
                list_dir: &list_dir_probe,
            };
            let fs = mount::FsSpec {
                rootfs: spec.rootfs.as_deref(),
                readonly: spec.readonly_root,
                mounts: &spec.mounts,
                masked: &spec.masked_paths,
                readonly_paths: &spec.readonly_paths,
                hidden: &spec.hidden,
                tmp_size: spec.tmp_size,
                shm_size: spec.shm_size,
                // The sandbox's root cannot open the caller's private trees, nor idmap.
                prepare_trees: range,
                root_ids: if range { (SANDBOX_ID_BASE, SANDBOX_ID_BASE) } else { (caller.euid, caller.egid) },
                fresh_proc: !user_ns || clone_flags & libc::CLONE_NEWPID as u64 != 0,
                cgroup2: spec.delegate_cgroup,
                // (Without a cgroup namespace, the sandbox's own hierarchies would be the
                // host's whole tree: it keeps the host's /sys then, as it was.)
                fresh_sys: clone_flags & (libc::CLONE_NEWNET | libc::CLONE_NEWCGROUP) as u64
                    == (libc::CLONE_NEWNET | libc::CLONE_NEWCGROUP) as u64,
                cgroup_view: if clone_flags & libc::CLONE_NEWCGROUP as u64 != 0 { cgroup_view() } else { None },
                overlay: spec
                    .overlay
                    .then_some(mount::OverlaySpec { size: spec.overlay_size, upper: spec.overlay_upper.as_deref() }),
                overlay_size: spec.overlay_size,
                userxattr: user_ns,
                // A sandbox that keeps a capability (CAP_SYS_CHROOT, CAP_SYS_ADMIN over its mount
                // namespace) could climb or unmount out of a caller's chroot that sits on a
                // mount root, which only a pivot to a clone leaves nothing above: it pivots.
                root_in_place: spec.rootfs.is_none() && spec.keep_caps == 0 && root_is_a_mount_root(),
            };
            mount::plan(&fs, &probes)?
        } else {
            FsPlan::default()
        };
        // The root caller's range: the shared one, or one of its own (see SANDBOX_RANGES_BASE).
        let mut maps = maps;
        let mut fs = fs;
        let layers = fs.prepare.iter().any(|p| p.overlay.is_some()).then(|| layers_key(&fs));
        let id_base = range.then(|| match layers {
            _ if shares_ids(&fs) => SANDBOX_ID_BASE,
            Some(key) => next_overlay_base(key),
            None => next_sandbox_base(),
        });
        if let (Some(base), Some(m)) = (id_base, maps.as_mut()) {
            *m = IdMaps::sandbox_range(base);
            // The merged roots planned as the shared range's root's are this range's.
            mount::rebase_owners(&mut fs.prepare, SANDBOX_ID_BASE, base);
        }
        // Its root: inside id 0, the range's first id or the caller itself.
        let delegate = spec.delegate_cgroup.then(|| id_base.map_or((caller.euid, caller.egid), |b| (b, b)));
        let seccomp = match &spec.seccomp {
            Some(s) => Some(seccomp_filter(s, spec.keep_caps)?),
            None => None,
        };

        let argv = spec.args.iter().map(|a| cstring("args", a)).collect::<Result<Vec<_>>>()?;
        let envp = spec.env.iter().map(|e| cstring("env", e)).collect::<Result<Vec<_>>>()?;
        let candidates =
            if spec.args.is_empty() { Vec::new() } else { exec_candidates(argv0, env_get(&spec.env, b"PATH")) }
                .into_iter()
                .map(|c| cstring("args", &c))
                .collect::<Result<Vec<_>>>()?;
        Ok(Plan {
            clone_flags,
            maps,
            id_base,
            layers,
            fs,
            become_root: range,
            seccomp,
            nproc: spec.nproc.filter(|_| user_ns),
            rlimits: spec.rlimits.clone(),
            hostname: spec.hostname.clone(),
            loopback: clone_flags & libc::CLONE_NEWNET as u64 != 0,
            set_ids,
            keep_caps: spec.keep_caps,
            cap_last: cap_last_cap(),
            new_session: spec.new_session,
            die_with_parent: spec.die_with_parent,
            cwd: cstring("cwd", &spec.cwd)?,
            exec: Exec {
                candidates,
                argv: CStrArray::new(argv.clone()),
                argv_strings: argv,
                envp: CStrArray::new(envp),
                init: spec.init,
            },
            argv0: String::from_utf8_lossy(argv0).into_owned(),
            delegate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_maps_map_the_caller_to_root_or_the_requested_ids() {
        let m = IdMaps::single(Caller::with_ids(1000, 100), None, None);
        assert_eq!(m.uid_map, "0 1000 1\n");
        assert_eq!(m.gid_map, "0 100 1\n");
        assert!(m.deny_setgroups);
        let m = IdMaps::single(Caller::with_ids(0, 0), Some(65534), Some(7));
        assert_eq!(m.uid_map, "65534 0 1\n");
        assert_eq!(m.gid_map, "7 0 1\n");
        assert!(!m.deny_setgroups);
    }

    #[test]
    fn a_root_caller_without_the_sandbox_range_maps_itself() {
        assert!(maps_sandbox_range("         0          0 4294967295\n"));
        assert!(!maps_sandbox_range(&format!("0 {SANDBOX_ID_BASE} 65536\n"))); // in a root caller's sandbox
        assert!(!maps_sandbox_range("0 1000 1\n"));
        // Only the shared range mapped: the sandboxes' own ranges and their owners are not.
        assert!(!maps_sandbox_range(&format!("{SANDBOX_ID_BASE} {SANDBOX_ID_BASE} 65536\n")));
        assert!(maps_sandbox_range(&format!("{SANDBOX_ID_BASE} {SANDBOX_ID_BASE} {}\n", 0x1000_0000u32)));
        let nested = Caller { euid: 0, egid: 0, range: false };
        let plan = Plan::build(&Spec::new(vec![b"true".to_vec()]), nested).unwrap();
        let maps = plan.maps.unwrap();
        assert_eq!(maps.uid_map, "0 0 1\n");
        assert!(!maps.range && maps.deny_setgroups && !plan.become_root);
    }

    #[test]
    fn the_host_root_is_read_in_place_only_for_a_sandbox_that_keeps_no_capability() {
        use crate::mount::FsOp;
        let in_place = |spec: &Spec| {
            let plan = Plan::build(spec, Caller::with_ids(0, 0)).unwrap();
            let steps = &plan.fs.steps;
            let pivots = steps.iter().any(|s| s.op == FsOp::PivotRoot);
            let here = steps.iter().any(|s| matches!(s.op, FsOp::RootInPlace { .. }));
            assert_ne!(pivots, here, "{steps:?}");
            here
        };
        let mut spec = Spec::new(vec![b"true".to_vec()]);
        // (Where this test runs chrooted, / is no mount root and nothing is read in place.)
        assert_eq!(in_place(&spec), root_is_a_mount_root());
        spec.keep_caps = 1 << 18; // CAP_SYS_CHROOT
        assert!(!in_place(&spec));
        spec.keep_caps = 0;
        spec.rootfs = Some(b"/".to_vec());
        assert!(!in_place(&spec));
    }

    #[test]
    fn delegation_needs_cgroup_and_mnt_namespaces_and_goes_to_the_sandbox_root() {
        let mut spec = Spec::new(vec![b"true".to_vec()]);
        spec.delegate_cgroup = true;
        let plan = Plan::build(&spec, Caller::with_ids(0, 0)).unwrap();
        let base = plan.id_base.unwrap();
        assert_eq!(plan.delegate, Some((base, base)));
        let plan = Plan::build(&spec, Caller::with_ids(1000, 100)).unwrap();
        assert_eq!(plan.delegate, Some((1000, 100)));
        assert!(plan.fs.steps.iter().any(|s| s.step == "mount /sys/fs/cgroup"));
        for ns in [["user", "mnt"], ["user", "cgroup"]] {
            spec.namespaces = crate::ns::flags(ns).unwrap();
            let err = Plan::build(&spec, Caller::with_ids(0, 0)).err().unwrap();
            assert!(matches!(err, Error::Invalid { field: "delegate_cgroup", .. }), "{err}");
        }
    }

    #[test]
    fn each_rotation_hands_out_its_own_ranges_in_turn() {
        let plain: Vec<u32> = (0..SANDBOX_RANGES_PER_PROCESS).map(|_| next_sandbox_base()).collect();
        let mut overlay = Vec::new();
        for _ in 0..SANDBOX_RANGES_PER_PROCESS {
            // Starts of two sets of layers in turn: each set's next range is the one peeked.
            let (a, b) = (peek_overlay_base(7), peek_overlay_base(8));
            overlay.push(next_overlay_base(7));
            assert_eq!(*overlay.last().unwrap(), a, "what spares are made for is what the next start takes");
            assert_eq!(next_overlay_base(8), b);
        }
        assert!(plain.iter().chain(&overlay).all(|b| (SANDBOX_RANGES_BASE..SANDBOX_OWNER_BASE).contains(b)));
        assert!(plain.iter().chain(&overlay).all(|b| (b - SANDBOX_RANGES_BASE) % SANDBOX_ID_COUNT == 0));
        // (Other tests take plain ranges meanwhile: only the overlay turn is this test's alone.)
        let mut distinct = overlay.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), overlay.len(), "none twice in one turn");
        assert!(plain.iter().all(|b| !overlay.contains(b)), "no range in both rotations");
    }

    #[test]
    fn exec_candidates_follow_path_order() {
        assert_eq!(exec_candidates(b"/bin/true", Some(b"/x")), vec![b"/bin/true".to_vec()]);
        assert_eq!(
            exec_candidates(b"sh", Some(b"/usr/bin:/bin/:")),
            vec![b"/usr/bin/sh".to_vec(), b"/bin/sh".to_vec(), b"./sh".to_vec()]
        );
    }

    #[test]
    fn every_caller_gets_a_user_namespace_and_root_never_maps_to_host_root() {
        let spec = Spec::new(vec![b"true".to_vec()]);
        let plan = Plan::build(&spec, Caller::with_ids(1000, 1000)).unwrap();
        assert_ne!(plan.clone_flags & libc::CLONE_NEWUSER as u64, 0);
        assert_eq!(plan.maps.unwrap().uid_map, "0 1000 1\n");
        assert!(!plan.become_root);
        let plan = Plan::build(&spec, Caller::with_ids(0, 0)).unwrap();
        assert_ne!(plan.clone_flags & libc::CLONE_NEWUSER as u64, 0);
        let maps = plan.maps.unwrap();
        // A range of its own (no overlay of nsfast's), one of the process's in turn.
        let base = plan.id_base.unwrap();
        assert!((SANDBOX_RANGES_BASE..SANDBOX_OWNER_BASE).contains(&base) && (base - SANDBOX_RANGES_BASE) % 65536 == 0);
        assert_eq!(maps.uid_map, format!("0 {base} 65536\n"));
        assert!(maps.range && plan.become_root && plan.seccomp.is_some());
        let next = Plan::build(&spec, Caller::with_ids(0, 0)).unwrap().id_base.unwrap();
        assert_ne!(next, base);
        // A root caller that leaves "user" out opts out (trusted code).
        let mut spec = spec;
        spec.namespaces &= !(libc::CLONE_NEWUSER as u64);
        spec.seccomp = None;
        let plan = Plan::build(&spec, Caller::with_ids(0, 0)).unwrap();
        assert!(plan.maps.is_none() && !plan.become_root && plan.seccomp.is_none());
        spec.namespaces |= libc::CLONE_NEWUSER as u64;
        spec.uid = Some(70000);
        let err = Plan::build(&spec, Caller::with_ids(0, 0)).err().unwrap();
        assert!(matches!(err, Error::Invalid { field: "uid", .. }), "{err}");
    }

    #[test]
    fn bad_specs_name_the_field() {
        let mut spec = Spec::new(vec![]);
        let err = Plan::build(&spec, Caller::current()).err().unwrap();
        assert!(matches!(err, Error::Invalid { field: "args", .. }), "{err}");
        spec.args = vec![b"true".to_vec()];
        spec.hostname = Some(vec![b'h'; 65]);
        let err = Plan::build(&spec, Caller::current()).err().unwrap();
        assert!(matches!(err, Error::Invalid { field: "hostname", .. }), "{err}");
        spec.hostname = None;
        spec.namespaces = crate::ns::flags(["pid"]).unwrap();
        spec.rootfs = Some(b"/".to_vec());
        let err = Plan::build(&spec, Caller::current()).err().unwrap();
        assert!(matches!(err, Error::Invalid { field: "namespaces", .. }), "{err}");
    }
}
