//! Per-sandbox cgroups: limits, usage, whole-tree kill, cleanup.
//!
//! Two backends behind one trait: cgroup v2 (the unified hierarchy; the child is born in
//! its cgroup via `clone3(CLONE_INTO_CGROUP)`) and cgroup v1 (legacy or hybrid hosts: one
//! directory per controller hierarchy; the parent attaches the child before letting it
//! exec). Every file write goes through [`write_file`], whose error names path and value.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};

/// Resource limits of one sandbox. `None` leaves the kernel default (no limit). With the
/// `python` feature, read from the attributes of an `nsfast._cgroup.CgroupRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "python", derive(pyo3::FromPyObject))]
pub struct Limits {
    /// Bytes of memory (v2 memory.max, v1 memory.limit_in_bytes).
    pub memory: Option<u64>,
    /// Bytes of memory + swap, as docker's --memory-swap (v1 memsw; v2 swap.max = this - memory).
    pub memory_swap: Option<u64>,
    pub pids: Option<u64>,
    /// CPU bandwidth: (quota, period) in microseconds.
    pub cpu: Option<(u64, u64)>,
    /// cpuset.cpus list, e.g. "0" or "0-1".
    pub cpuset: Option<String>,
    /// Raw controller files and values, written after the limits above: (file, value), the
    /// file named as in this backend's version (`cpu.weight` on v2, `cpu.shares` on v1; the
    /// Python layer translates). Each must pass [`raw_file_ok`].
    pub raw: Vec<(String, String)>,
}

/// The controllers nsfast makes cgroups for and whose files `Limits::raw` may name.
pub const RAW_CONTROLLERS: [&str; 4] = ["cpu", "cpuset", "memory", "pids"];

/// Whether `file` may be written as a raw limit: `<controller>.<name>` with a controller of
/// [`RAW_CONTROLLERS`] and a name of lowercase letters, digits, `_` and inner dots. So no
/// `/`, no `..`, no `cgroup.*` core file (`cgroup.procs`, `cgroup.subtree_control`): the
/// write stays a limit of the sandbox's own cgroup directory.
pub fn raw_file_ok(file: &str) -> bool {
    let Some((controller, name)) = file.split_once('.') else { return false };
    RAW_CONTROLLERS.contains(&controller)
        && !name.is_empty()
        && name.split('.').all(|part| {
            part.starts_with(|c: char| c.is_ascii_lowercase())
                && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
}

/// Write each raw limit of `limits` whose controller has a directory in `dir_of`.
fn write_raw(limits: &Limits, dir_of: impl Fn(&str) -> Option<PathBuf>) -> Result<()> {
    for (file, value) in &limits.raw {
        if !raw_file_ok(file) || value.contains(['\0', '\n']) {
            return Err(CgroupError::Unavailable(format!("refusing the raw cgroup limit {file:?} = {value:?}")));
        }
        let controller = file.split('.').next().unwrap_or_default();
        let dir = dir_of(controller)
            .ok_or_else(|| CgroupError::Unavailable(format!("no {controller} cgroup for the raw limit {file:?}")))?;
        write_file(&dir.join(file), value)?;
    }
    Ok(())
}

/// What a sandbox's cgroup measured. `None` where the kernel does not report it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_user_ns: Option<u64>,
    pub cpu_system_ns: Option<u64>,
    pub memory_peak: Option<u64>,
    pub pids_peak: Option<u64>,
    pub oom_kills: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("write {value:?} to {path}: {source}")]
    Write { path: PathBuf, value: String, source: io::Error },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("{0}")]
    Unavailable(String),
}

type Result<T> = std::result::Result<T, CgroupError>;

/// The one place cgroup files are written: a single write(2), errors name path and value.
pub fn write_file(path: &Path, value: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Never created, never through a symlink (cgroupfs has none: one would be planted).
    fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write { path: path.to_owned(), value: value.to_owned(), source })
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { op, path: path.to_owned(), source }
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` lines (cpu.stat, memory.events, memory.oom_control) -> the value of `key`.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A sandbox's cgroup, whichever the version.
pub trait Cgroup: Send {
    /// The directory fd for CLONE_INTO_CGROUP (v2), or None: then `attach` is needed.
    fn clone_fd(&self) -> Option<RawFd>;
    /// Whether the parent must `attach` the child after clone (v2 without CLONE_INTO_CGROUP).
    fn needs_attach(&self) -> bool {
        false
    }
    /// Move `pid` in (only when `needs_attach`; the child is otherwise born inside or moves
    /// itself).
    fn attach(&self, _pid: i32) -> Result<()> {
        Ok(())
    }
    /// v1: the `tasks` files the child writes "0" to, moving itself in before exec. A
    /// single thread moving itself is the one migration that does not take
    /// cgroup_threadgroup_rwsem for writing, whose grace-period wait costs ~10 ms when
    /// cgroups were idle (any pid written to cgroup.procs or tasks takes it).
    fn self_attach_files(&self) -> Result<Vec<OwnedFd>> {
        Ok(Vec::new())
    }
    /// A cgroup of its own for one exec into this sandbox (see [`ExecCgroup`]).
    fn exec_child(&self, _name: &str) -> Result<Box<dyn Cgroup>> {
        Err(CgroupError::Unavailable("this cgroup cannot hold the cgroups of execs".into()))
    }
    /// Delegate this cgroup to the sandbox's root, whose host ids are `uid`/`gid` (the
    /// kernel's cgroup-v2 delegation model: the directory and its `cgroup.procs`,
    /// `cgroup.subtree_control` and `cgroup.threads`; its limit files stay the caller's).
    /// Only a cgroup v2 cgroup can be delegated.
    fn delegate(&self, _uid: u32, _gid: u32) -> Result<()> {
        Err(CgroupError::Unavailable(
            "delegate_cgroup needs the sandbox's cgroup on cgroup v2 (a pure cgroup v2 host); this one is a cgroup v1 \
             cgroup (a hybrid or legacy host: its v1 controllers cannot be delegated safely)"
                .into(),
        ))
    }
    /// Kill every process in the cgroup.
    fn kill(&self) -> Result<()>;
    fn usage(&self) -> Usage;
    /// Remove the directories, waiting (bounded) for the last processes to go.
    fn remove(&mut self) -> Result<()>;
    fn paths(&self) -> Vec<PathBuf>;
    fn version(&self) -> u8;
}

/// Where and how sandboxes' cgroups are made.
pub trait Backend: Send + Sync {
    /// Make the cgroup `name` with `limits`; `kill_tree` asks for what `kill` needs beyond
    /// SIGKILL of a pid-namespace init (the v1 freezer).
    fn create(&self, name: &str, limits: &Limits, kill_tree: bool) -> Result<Box<dyn Cgroup>>;
    fn version(&self) -> u8;
    /// The directories under which sandboxes' cgroups are created.
    fn roots(&self) -> Vec<PathBuf>;
    /// Controllers whose limits this backend can apply.
    fn controllers(&self) -> Vec<String>;
    /// Whether a sandbox's CPU usage can be read (v2 `cpu.stat`, always there; v1 `cpuacct`,
    /// or a hybrid host's unified hierarchy).
    fn cpu_usage(&self) -> bool;
}

/// What the host has mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// Pure cgroup2 at `mount` (no v1 controller hierarchies).
    V2 { mount: PathBuf },
    /// v1 controller name -> mount point; `unified`: the cgroup2 mount of a hybrid host
    /// (no controllers there, but it tracks processes, counts CPU time and kills).
    V1 { controllers: BTreeMap<String, PathBuf>, unified: Option<PathBuf> },
}

/// Parse /proc/self/mountinfo text into the host's cgroup hierarchy.
pub fn parse_mountinfo(text: &str) -> Option<Hierarchy> {
    let mut v2 = None;
    let mut v1 = BTreeMap::new();
    for line in text.lines() {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        let mut r = right.split(' ');
        let fstype = r.next()?;
        let super_opts = r.nth(1).unwrap_or("");
        match fstype {
            "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(mount_point)),
            "cgroup" => {
                for opt in super_opts.split(',') {
                    if ["memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"].contains(&opt) {
                        v1.entry(opt.to_owned()).or_insert_with(|| PathBuf::from(mount_point));
                    }
                }
            }
            _ => {}
        }
    }
    if !v1.is_empty() {
        Some(Hierarchy::V1 { controllers: v1, unified: v2 })
    } else {
        v2.map(|mount| Hierarchy::V2 { mount })
    }
}

/// The hierarchies mounted in directories of (or at) /sys/fs/cgroup that nsfast makes
/// cgroups in, from /proc/self/mountinfo text, with the symlinks to them there
/// (`links`: name -> target, from a listing of /sys/fs/cgroup), as a sandbox mounts them
/// again in its cgroup namespace. A v1 hierarchy is mounted with its controllers (and
/// `name=`) alone: never `release_agent=` (which the kernel refuses outside the initial
/// namespaces anyway) nor the other flags, which the kernel ignores for a hierarchy that
/// exists. None: nothing of the kind there.
pub fn view(mountinfo: &str, links: &[(Vec<u8>, Vec<u8>)]) -> Option<crate::mount::CgroupView> {
    const TOP: &str = "/sys/fs/cgroup";
    const MANAGED: [&str; 6] = ["memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"];
    let mut v = crate::mount::CgroupView::default();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(point) = left.split(' ').nth(4) else { continue };
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let super_opts = r.nth(1).unwrap_or("");
        if fstype == "cgroup2" && point == TOP {
            return Some(crate::mount::CgroupView { v2_top: true, ..Default::default() });
        }
        // A directory of /sys/fs/cgroup (mountinfo escapes odd bytes as \ooo: not ours).
        let Some(name) = point.strip_prefix("/sys/fs/cgroup/").filter(|n| !n.is_empty() && !n.contains(['/', '\\']))
        else {
            continue;
        };
        let entry = match fstype {
            "cgroup2" => (name.as_bytes().to_vec(), "cgroup2", Vec::new()),
            "cgroup" => {
                let opts: Vec<&str> =
                    super_opts.split(',').filter(|o| MANAGED.contains(o) || o.starts_with("name=")).collect();
                if !opts.iter().any(|o| MANAGED.contains(o)) {
                    continue;
                }
                // Every controller of the hierarchy, or the kernel finds no match (EBUSY).
                let all: Vec<&str> = super_opts
                    .split(',')
                    .filter(|o| {
                        !matches!(
                            *o,
                            "rw" | "ro"
                                | "noprefix"
                                | "xattr"
                                | "clone_children"
                                | "cpuset_v2_mode"
                                | "favordynmods"
                                | "nofavordynmods"
                                | "none"
                        ) && !o.starts_with("release_agent=")
                    })
                    .collect();
                (name.as_bytes().to_vec(), "cgroup", all.join(",").into_bytes())
            }
            _ => continue,
        };
        // The last mount on a point is the one seen there.
        v.dirs.retain(|d| d.0 != entry.0);
        v.dirs.push(entry);
    }
    if v.dirs.is_empty() {
        return None;
    }
    v.links = links.iter().filter(|(n, t)| v.dirs.iter().any(|d| &d.0 == t && &d.0 != n)).cloned().collect();
    v.dirs.sort();
    Some(v)
}

pub fn detect() -> Option<Hierarchy> {
    parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// The cgroup v2 path of this process ("0::/a/b" -> "a/b").
pub fn own_v2_path() -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::/")).map(|p| p.trim().to_owned())
}

/// A unique name for a sandbox's cgroup.
pub fn unique_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("sb-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Remove sandbox cgroups under `root` left by processes that died without cleaning up
/// (SIGKILL): named `sb-PID-N` with PID gone, and empty (rmdir refuses non-empty ones, so
/// a cgroup still in use, like a detached container's, is kept).
pub fn sweep_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("sb-")).and_then(|n| n.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            // Empty cgroups below it first, deepest first: exec cgroups, and whatever a nested
            // nsfast made in a delegated sandbox (rmdir refuses populated ones).
            rmdir_empty_tree(&e.path());
        }
    }
}

/// rmdir `dir` and every directory below it, deepest first; what is not empty stays.
fn rmdir_empty_tree(dir: &Path) {
    for sub in fs::read_dir(dir).into_iter().flatten().flatten() {
        if sub.file_type().is_ok_and(|t| t.is_dir()) {
            rmdir_empty_tree(&sub.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// This process's cgroup path in each hierarchy, from `/proc/self/cgroup` text: v1
/// controller name -> path relative to its mount, and the unified (v2) path.
pub fn own_paths(cgroup_file: &str) -> (BTreeMap<String, PathBuf>, Option<PathBuf>) {
    let mut v1 = BTreeMap::new();
    let mut unified = None;
    for line in cgroup_file.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let rel = PathBuf::from(path.trim().trim_start_matches('/'));
        if ctrls.is_empty() {
            unified = Some(rel);
        } else {
            for c in ctrls.split(',') {
                v1.insert(c.to_owned(), rel.clone());
            }
        }
    }
    (v1, unified)
}

/// Where sandboxes' cgroups go, as `configure(cgroup_root=...)` says (see `_cgroup.py`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Root {
    /// Below this process's own cgroup, in each hierarchy: `<mount>/<own path>/<rel>`.
    OwnRelative(PathBuf),
    /// The cgroup with this path (relative to the mounts), in every hierarchy: `<mount>/<path>`.
    Path(PathBuf),
}

impl Root {
    /// A relative `root` is below our own cgroup; an absolute one must be a directory path
    /// inside one of `hierarchy`'s mounts, and names that cgroup (in every hierarchy on v1).
    /// Components `..` and `.` are refused.
    pub fn parse(hierarchy: &Hierarchy, root: &str) -> Result<Root> {
        let path = Path::new(root);
        let bad = |why: &str| CgroupError::Unavailable(format!("cgroup_root {root:?} {why}"));
        if root.is_empty()
            || path.components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::CurDir))
            || root.split('/').any(|c| c == "." || c == "..")
        {
            return Err(bad("must be a path without '.' or '..' components"));
        }
        if !path.is_absolute() {
            return Ok(Root::OwnRelative(path.to_owned()));
        }
        let mounts: Vec<&PathBuf> = match hierarchy {
            Hierarchy::V2 { mount } => vec![mount],
            Hierarchy::V1 { controllers, unified } => controllers.values().chain(unified.iter()).collect(),
        };
        // The deepest mount containing it (a cgroup2 mount may sit inside the v1 tmpfs).
        let mount = mounts
            .into_iter()
            .filter(|m| path.starts_with(m))
            .max_by_key(|m| m.components().count())
            .ok_or_else(|| bad("is not inside a mounted cgroup file system"))?;
        let rel = path.strip_prefix(mount).unwrap_or(Path::new(""));
        Ok(Root::Path(rel.to_owned()))
    }

    /// The directory of this root in the hierarchy mounted at `mount`, where this process
    /// is in cgroup `own` (relative to that mount).
    fn dir(&self, mount: &Path, own: Option<&Path>) -> PathBuf {
        match self {
            Root::OwnRelative(rel) => mount.join(own.unwrap_or(Path::new(""))).join(rel),
            Root::Path(p) => mount.join(p),
        }
    }
}

/// The backend for `hierarchy`, with sandboxes under `root` (see [`Root::parse`]). Stale
/// cgroups there are swept first.
pub fn backend(hierarchy: &Hierarchy, root: &str) -> Result<Box<dyn Backend>> {
    backend_at(hierarchy, &Root::parse(hierarchy, root)?)
}

/// [`backend`] for a parsed root.
pub fn backend_at(hierarchy: &Hierarchy, root: &Root) -> Result<Box<dyn Backend>> {
    let own = fs::read_to_string("/proc/self/cgroup").map_err(io_err("read", Path::new("/proc/self/cgroup")))?;
    let b = backend_unswept(hierarchy, root, &own)?;
    for r in b.roots() {
        sweep_stale(&r);
    }
    Ok(b)
}

/// The directories of `root` for `hierarchy`, for a process whose `/proc/self/cgroup` is
/// `own`: v1 controller -> directory (empty on v2), and the v2 / unified directory.
pub fn root_dirs(hierarchy: &Hierarchy, root: &Root, own: &str) -> (BTreeMap<String, PathBuf>, Option<PathBuf>) {
    let (own_v1, own_v2) = own_paths(own);
    match hierarchy {
        Hierarchy::V2 { mount } => (BTreeMap::new(), Some(root.dir(mount, own_v2.as_deref()))),
        Hierarchy::V1 { controllers, unified } => (
            controllers.iter().map(|(c, m)| (c.clone(), root.dir(m, own_v1.get(c).map(PathBuf::as_path)))).collect(),
            unified.as_ref().map(|u| root.dir(u, own_v2.as_deref())),
        ),
    }
}

fn backend_unswept(hierarchy: &Hierarchy, root: &Root, own: &str) -> Result<Box<dyn Backend>> {
    let (roots, unified) = root_dirs(hierarchy, root, own);
    match hierarchy {
        Hierarchy::V2 { .. } => Ok(Box::new(V2Backend::new(unified.unwrap_or_default())?)),
        Hierarchy::V1 { .. } => {
            // On a hybrid host the unified hierarchy tracks every sandbox: born there with
            // CLONE_INTO_CGROUP, it needs no migration, whose cgroup_threadgroup_rwsem write
            // waits for an RCU grace period (~10 ms) when cgroups were quiet. v1 controllers
            // (and that migration) are then only used for the limits asked for.
            let tracker = unified.and_then(|u| V2Backend::new(u).ok());
            Ok(Box::new(V1Backend { roots, tracker }))
        }
    }
}

/// Make `dir` and its missing ancestors one by one, calling `made` on each new directory
/// (top-down), e.g. to enable controllers or fill a v1 cpuset before its child is made.
fn mkdir_chain(dir: &Path, made: &dyn Fn(&Path) -> Result<()>) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        mkdir_chain(parent, made)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => made(dir),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::Io { op: "mkdir", path: dir.to_owned(), source: e }),
    }
}

// ---------------------------------------------------------------------------------------
// cgroup v2

pub struct V2Backend {
    root: PathBuf,
    controllers: Vec<String>,
    /// Attach by writing cgroup.procs after clone instead of CLONE_INTO_CGROUP (set by
    /// NSFAST_CGROUP_V2_ATTACH=procs; for benchmarks and kernels older than 5.7).
    attach_by_procs: bool,
}

impl V2Backend {
    /// Make `root` (if needed) and enable the controllers we use in its subtree_control
    /// (and in that of each directory made on the way, so they reach `root`). A controller
    /// that cannot be enabled (not delegated to us, or EBUSY: processes in a non-root
    /// cgroup) is left out of `controllers`: sandboxes are still measured, and the Python
    /// layer refuses (or warns about) the limits that needed it.
    pub fn new(root: PathBuf) -> Result<V2Backend> {
        mkdir_chain(&root, &|d| {
            if d != root {
                let _ = enable_controllers(d);
            }
            Ok(())
        })?;
        let controllers = enable_controllers(&root)?;
        let attach_by_procs = std::env::var("NSFAST_CGROUP_V2_ATTACH").is_ok_and(|v| v == "procs");
        Ok(V2Backend { root, controllers, attach_by_procs })
    }
}

/// Enable nsfast's controllers available in `dir` for its children; returns those enabled.
fn enable_controllers(dir: &Path) -> Result<Vec<String>> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).map_err(io_err("read", dir))?;
    let enabled = || fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let ours = |text: &str| -> Vec<String> {
        RAW_CONTROLLERS.iter().filter(|c| text.split_whitespace().any(|a| a == **c)).map(|c| c.to_string()).collect()
    };
    let now = enabled();
    let missing: Vec<String> = ours(&available)
        .iter()
        .filter(|c| !now.split_whitespace().any(|e| e == c.as_str()))
        .map(|c| format!("+{c}"))
        .collect();
    if !missing.is_empty() {
        // One at a time: a controller that cannot be enabled does not keep the others out.
        for m in &missing {
            let _ = write_file(&dir.join("cgroup.subtree_control"), m);
        }
    }
    Ok(ours(&enabled()))
}

impl Backend for V2Backend {
    fn create(&self, name: &str, limits: &Limits, _kill_tree: bool) -> Result<Box<dyn Cgroup>> {
        Ok(Box::new(self.create_v2(name, limits)?))
    }

    fn version(&self) -> u8 {
        2
    }

    fn roots(&self) -> Vec<PathBuf> {
        vec![self.root.clone()]
    }

    fn controllers(&self) -> Vec<String> {
        self.controllers.clone()
    }

    fn cpu_usage(&self) -> bool {
        true
    }
}

impl V2Backend {
    fn create_v2(&self, name: &str, limits: &Limits) -> Result<V2Cgroup> {
        let dir = self.root.join(name);
        fs::create_dir(&dir).map_err(io_err("mkdir", &dir))?;
        let mut cg = V2Cgroup { dir, fd: None, attach_by_procs: self.attach_by_procs, leftovers: Default::default() };
        let need = |c: &str| -> Result<()> {
            if self.controllers.iter().any(|x| x == c) {
                Ok(())
            } else {
                Err(CgroupError::Unavailable(format!("the {c} controller is not enabled for {}", self.root.display())))
            }
        };
        let res = (|| {
            if let Some(m) = limits.memory {
                need("memory")?;
                write_file(&cg.dir.join("memory.max"), &m.to_string())?;
            }
            if let Some(ms) = limits.memory_swap {
                need("memory")?;
                let swap = ms.saturating_sub(limits.memory.unwrap_or(0));
                write_file(&cg.dir.join("memory.swap.max"), &swap.to_string())?;
            }
            if let Some(p) = limits.pids {
                need("pids")?;
                write_file(&cg.dir.join("pids.max"), &p.to_string())?;
            }
            if let Some((quota, period)) = limits.cpu {
                need("cpu")?;
                write_file(&cg.dir.join("cpu.max"), &format!("{quota} {period}"))?;
            }
            if let Some(cpus) = &limits.cpuset {
                need("cpuset")?;
                write_file(&cg.dir.join("cpuset.cpus"), cpus)?;
            }
            for (file, _) in &limits.raw {
                need(file.split('.').next().unwrap_or_default())?;
            }
            let dir = cg.dir.clone();
            write_raw(limits, |_| Some(dir.clone()))?;
            let fd = rustix::fs::open(&cg.dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| CgroupError::Io { op: "open", path: cg.dir.clone(), source: e.into() })?;
            cg.fd = Some(fd);
            Ok(())
        })();
        match res {
            Ok(()) => Ok(cg),
            Err(e) => {
                let _ = cg.remove();
                Err(e)
            }
        }
    }
}

pub struct V2Cgroup {
    dir: PathBuf,
    fd: Option<OwnedFd>,
    attach_by_procs: bool,
    /// Exec cgroups below this one that were still populated when their exec ended.
    leftovers: Leftovers,
}

type Leftovers = Arc<Mutex<Vec<PathBuf>>>;

impl V2Cgroup {
    /// A child cgroup `name` for an exec (no controllers enabled here, so a child next to
    /// this cgroup's own processes is allowed); empty leftovers of earlier execs go first.
    fn exec_dir(&self, name: &str) -> Result<V2Cgroup> {
        let mut left = self.leftovers.lock().unwrap_or_else(|p| p.into_inner());
        left.retain(|d| fs::remove_dir(d).is_err_and(|e| e.kind() != io::ErrorKind::NotFound));
        drop(left);
        let dir = self.dir.join(name);
        fs::create_dir(&dir).map_err(io_err("mkdir", &dir))?;
        match rustix::fs::open(&dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => Ok(V2Cgroup { dir, fd: Some(fd), attach_by_procs: false, leftovers: Default::default() }),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(CgroupError::Io { op: "open", path: dir, source: e.into() })
            }
        }
    }
}

/// Kill every process in the cgroup directories `dirs` and remove them with the cgroups
/// below them: the cleanup of a sandbox this process did not start (`nsfast stop` of a
/// detached container), whose directories the caller has proven to be that sandbox's. The
/// same policy as a sandbox's own cgroup: cgroup.kill (v2, or a hybrid host's unified
/// tracker), else the v1 freezer around SIGKILL to each member; then a bounded rmdir.
pub fn kill_and_remove(dirs: &[PathBuf]) -> Result<()> {
    let kill = || {
        for d in dirs {
            if write_file(&d.join("cgroup.kill"), "1").is_ok() {
                continue;
            }
            let freezer = d.join("freezer.state");
            let frozen = freezer.exists() && write_file(&freezer, "FROZEN").is_ok();
            kill_pids_below(d);
            if frozen {
                let _ = write_file(&freezer, "THAWED");
            }
        }
    };
    kill();
    let mut first_err = None;
    for d in dirs {
        let res = remove_children(d, &kill).and_then(|()| rmdir_patiently(d, Duration::from_secs(5), &kill));
        if let Err(e) = res {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Remove the cgroups below `dir` (an exec's, left by processes it started), deepest
/// first, killing what still runs in `dir`'s tree.
fn remove_children(dir: &Path, kill: &dyn Fn()) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let sub = e.path();
            remove_children(&sub, kill)?;
            rmdir_patiently(&sub, Duration::from_secs(5), kill)?;
        }
    }
    Ok(())
}

/// Open `tasks` of each v1 directory for writing (the child writes "0": see
/// `Cgroup::self_attach_files`).
fn open_tasks(dirs: &[PathBuf]) -> Result<Vec<OwnedFd>> {
    dirs.iter()
        .map(|d| {
            let f = d.join("tasks");
            rustix::fs::open(&f, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| CgroupError::Io {
                op: "open",
                path: f.clone(),
                source: e.into(),
            })
        })
        .collect()
}

/// SIGKILL every process in `dir` and the cgroups below it (v1 has no cgroup.kill).
fn kill_pids_below(dir: &Path) {
    for pid in pids_in(&dir.join("cgroup.procs")) {
        sigkill(pid);
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_pids_below(&e.path());
            }
        }
    }
}

fn pids_in(procs: &Path) -> Vec<i32> {
    fs::read_to_string(procs).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn sigkill(pid: i32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

/// rmdir `dir`, retrying while it still has (dying) processes, for up to `patience`.
fn rmdir_patiently(dir: &Path, patience: Duration, kill: &dyn Fn()) -> Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < patience => {
                kill();
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            Err(e) => return Err(CgroupError::Io { op: "rmdir", path: dir.to_owned(), source: e }),
        }
    }
}

impl Cgroup for V2Cgroup {
    fn clone_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().filter(|_| !self.attach_by_procs).map(|f| f.as_raw_fd())
    }

    fn needs_attach(&self) -> bool {
        self.attach_by_procs
    }

    fn delegate(&self, uid: u32, gid: u32) -> Result<()> {
        use rustix::fs::AtFlags;
        let fd = self.fd.as_ref().ok_or_else(|| CgroupError::Unavailable("the cgroup is not open".into()))?;
        let (owner, group) =
            (Some(rustix::fs::Uid::from_raw_unchecked(uid)), Some(rustix::fs::Gid::from_raw_unchecked(gid)));
        // Through the directory fd: the same cgroup the child is born in, never a symlink.
        for (file, flags) in [
            ("", AtFlags::EMPTY_PATH),
            ("cgroup.procs", AtFlags::SYMLINK_NOFOLLOW),
            ("cgroup.subtree_control", AtFlags::SYMLINK_NOFOLLOW),
            ("cgroup.threads", AtFlags::SYMLINK_NOFOLLOW),
        ] {
            rustix::fs::chownat(fd, file, owner, group, flags).map_err(|e| CgroupError::Io {
                op: "chown",
                path: self.dir.join(file),
                source: e.into(),
            })?;
        }
        Ok(())
    }

    fn attach(&self, pid: i32) -> Result<()> {
        if self.attach_by_procs {
            write_file(&self.dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn kill(&self) -> Result<()> {
        match write_file(&self.dir.join("cgroup.kill"), "1") {
            Ok(()) => Ok(()),
            Err(CgroupError::Write { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                // Before Linux 5.14: freeze, kill each, thaw.
                write_file(&self.dir.join("cgroup.freeze"), "1")?;
                for pid in pids_in(&self.dir.join("cgroup.procs")) {
                    sigkill(pid);
                }
                write_file(&self.dir.join("cgroup.freeze"), "0")
            }
            Err(e) => Err(e),
        }
    }

    fn usage(&self) -> Usage {
        let stat = fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let events = fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default();
        Usage {
            cpu_user_ns: keyed(&stat, "user_usec").map(|u| u * 1000),
            cpu_system_ns: keyed(&stat, "system_usec").map(|u| u * 1000),
            memory_peak: read_u64(&self.dir.join("memory.peak")),
            pids_peak: read_u64(&self.dir.join("pids.peak")),
            oom_kills: keyed(&events, "oom_kill").unwrap_or(0),
        }
    }

    fn exec_child(&self, name: &str) -> Result<Box<dyn Cgroup>> {
        Ok(Box::new(ExecCgroup {
            own: Some(self.exec_dir(name)?),
            v1: Vec::new(),
            leftovers: self.leftovers.clone(),
            killed: Default::default(),
        }))
    }

    fn remove(&mut self) -> Result<()> {
        self.fd = None;
        let dir = self.dir.clone();
        match fs::remove_dir(&dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) => {}
        }
        // Busy: processes still dying, or exec cgroups below (they go first).
        let kill = || {
            let _ = write_file(&dir.join("cgroup.kill"), "1");
        };
        kill();
        remove_children(&dir, &kill)?;
        rmdir_patiently(&dir, Duration::from_secs(5), &kill)
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }

    fn version(&self) -> u8 {
        2
    }
}

// ---------------------------------------------------------------------------------------
// cgroup v1

pub struct V1Backend {
    /// controller -> directory under which sandboxes' cgroups are made.
    roots: BTreeMap<String, PathBuf>,
    /// The hybrid host's unified hierarchy (see `backend`).
    tracker: Option<V2Backend>,
}

impl V1Backend {
    fn root(&self, controller: &str) -> Result<&PathBuf> {
        self.roots.get(controller).ok_or_else(|| {
            CgroupError::Unavailable(format!("no cgroup v1 hierarchy with the {controller} controller is mounted"))
        })
    }
}

/// Copy cpuset.cpus/mems from the parent when empty (a v1 cpuset cgroup starts empty and
/// refuses tasks until both are set).
fn cpuset_inherit(dir: &Path) -> Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = fs::read_to_string(dir.join(file)).unwrap_or_default();
        if own.trim().is_empty() {
            let parent = dir.parent().unwrap_or(dir);
            let value = fs::read_to_string(parent.join(file)).map_err(io_err("read", parent))?;
            write_file(&dir.join(file), value.trim())?;
        }
    }
    Ok(())
}

impl Backend for V1Backend {
    fn create(&self, name: &str, limits: &Limits, kill_tree: bool) -> Result<Box<dyn Cgroup>> {
        // Without a tracker, usage needs memory, pids, cpuacct and a tree kill the freezer;
        // with one, only the controllers of the limits asked for.
        let mut wanted = if self.tracker.is_some() { vec![] } else { vec!["memory", "pids", "cpuacct"] };
        for c in ["memory", "pids"] {
            if needs(limits, c) && !wanted.contains(&c) {
                wanted.push(c);
            }
        }
        if limits.cpu.is_some() {
            wanted.push("cpu");
        }
        if limits.cpuset.is_some() {
            wanted.push("cpuset");
        }
        for (file, _) in &limits.raw {
            let c = RAW_CONTROLLERS.iter().find(|c| file.split('.').next() == Some(**c));
            if let Some(c) = c.filter(|c| !wanted.contains(c)) {
                wanted.push(c);
            }
        }
        if kill_tree && self.tracker.is_none() {
            wanted.push("freezer");
        }
        let tracker = match &self.tracker {
            Some(t) => Some(t.create_v2(name, &Limits::default())?),
            None => None,
        };
        let mut cg = V1Cgroup { dirs: BTreeMap::new(), tracker };
        let res = (|| {
            for c in &wanted {
                let root = match self.root(c) {
                    Ok(r) => r,
                    // Measuring is best effort: a missing usage controller is not an error.
                    Err(_) if ["memory", "pids", "cpuacct"].contains(c) && !needs(limits, c) => continue,
                    Err(e) => return Err(e),
                };
                // Controllers co-mounted (cpu,cpuacct) share one directory.
                if let Some(existing) = cg.dirs.values().find(|d| d.starts_with(root)).cloned() {
                    cg.dirs.insert(c.to_string(), existing);
                    continue;
                }
                // A new v1 cpuset cgroup is empty and its children could not be filled.
                let is_cpuset = *c == "cpuset";
                mkdir_chain(root, &|d| if is_cpuset { cpuset_inherit(d) } else { Ok(()) })?;
                let dir = root.join(name);
                fs::create_dir(&dir).map_err(io_err("mkdir", &dir))?;
                cg.dirs.insert(c.to_string(), dir);
            }
            let dir = |c: &str| cg.dirs.get(c).cloned();
            if let (Some(m), Some(d)) = (limits.memory, dir("memory")) {
                write_file(&d.join("memory.limit_in_bytes"), &m.to_string())?;
                // v1 charges socket buffers to a cgroup only once its TCP limit was set
                // (v2 always does): without it a sandbox queued hundreds of MiB in loopback
                // TCP and UDP buffers outside its limit. Set before any socket of its exists;
                // a counter of its own, so the worst case is twice the limit. (A kernel
                // without the file, CONFIG_MEMCG_V1 trimmed, has nothing to set.)
                match write_file(&d.join("memory.kmem.tcp.limit_in_bytes"), &m.to_string()) {
                    Err(CgroupError::Write { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                    other => other?,
                }
            }
            if let (Some(ms), Some(d)) = (limits.memory_swap, dir("memory")) {
                write_file(&d.join("memory.memsw.limit_in_bytes"), &ms.to_string())?;
            }
            if let (Some(p), Some(d)) = (limits.pids, dir("pids")) {
                write_file(&d.join("pids.max"), &p.to_string())?;
            }
            if let (Some((quota, period)), Some(d)) = (limits.cpu, dir("cpu")) {
                write_file(&d.join("cpu.cfs_period_us"), &period.to_string())?;
                write_file(&d.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
            if let (Some(cpus), Some(d)) = (&limits.cpuset, dir("cpuset")) {
                write_file(&d.join("cpuset.cpus"), cpus)?;
                cpuset_inherit(&d)?;
            }
            if cg.dirs.contains_key("cpuset") {
                cpuset_inherit(&cg.dirs["cpuset"])?;
            }
            write_raw(limits, dir)?;
            Ok(())
        })();
        match res {
            Ok(()) => Ok(Box::new(cg)),
            Err(e) => {
                let _ = cg.remove();
                Err(e)
            }
        }
    }

    fn version(&self) -> u8 {
        1
    }

    fn roots(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.roots.values().cloned().collect();
        v.extend(self.tracker.iter().flat_map(|t| t.roots()));
        v.sort();
        v.dedup();
        v
    }

    fn controllers(&self) -> Vec<String> {
        self.roots.keys().cloned().collect()
    }

    fn cpu_usage(&self) -> bool {
        self.tracker.is_some() || self.roots.contains_key("cpuacct")
    }
}

/// v1's cpuacct.usage is exact (scheduler runtime), but its user/sys split is sampled at
/// timer ticks and can exceed the total by a tick per throttling period. Report the exact
/// total, split in the sampled proportion (as v2's cpu.stat does).
pub fn split_cpu(total: Option<u64>, user: Option<u64>, sys: Option<u64>) -> (Option<u64>, Option<u64>) {
    match (total, user, sys) {
        (Some(t), Some(u), Some(s)) if u + s > 0 => {
            let u_share = (t as u128 * u as u128 / (u + s) as u128) as u64;
            (Some(u_share), Some(t - u_share))
        }
        (Some(t), _, _) => (Some(t), Some(0)),
        _ => (user, sys),
    }
}

fn needs(limits: &Limits, controller: &str) -> bool {
    match controller {
        "memory" => limits.memory.is_some() || limits.memory_swap.is_some(),
        "pids" => limits.pids.is_some(),
        _ => false,
    }
}

pub struct V1Cgroup {
    /// controller -> this sandbox's directory.
    dirs: BTreeMap<String, PathBuf>,
    /// Its cgroup in the hybrid host's unified hierarchy.
    tracker: Option<V2Cgroup>,
}

impl V1Cgroup {
    fn unique_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.dirs.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }

    fn kill_listed(&self) {
        for d in self.unique_dirs() {
            for pid in pids_in(&d.join("cgroup.procs")) {
                sigkill(pid);
            }
        }
    }
}

impl Cgroup for V1Cgroup {
    fn clone_fd(&self) -> Option<RawFd> {
        self.tracker.as_ref().and_then(|t| t.clone_fd())
    }

    fn self_attach_files(&self) -> Result<Vec<OwnedFd>> {
        open_tasks(&self.unique_dirs())
    }

    fn exec_child(&self, name: &str) -> Result<Box<dyn Cgroup>> {
        let own = self.tracker.as_ref().map(|t| t.exec_dir(name)).transpose()?;
        let leftovers = self.tracker.as_ref().map(|t| t.leftovers.clone()).unwrap_or_default();
        Ok(Box::new(ExecCgroup { own, v1: self.unique_dirs(), leftovers, killed: Default::default() }))
    }

    fn kill(&self) -> Result<()> {
        if let Some(t) = &self.tracker {
            return t.kill();
        }
        let Some(fz) = self.dirs.get("freezer") else {
            self.kill_listed();
            return Ok(());
        };
        // Freeze so nothing forks while we kill, kill every member, thaw so they die.
        write_file(&fz.join("freezer.state"), "FROZEN")?;
        let start = Instant::now();
        while fs::read_to_string(fz.join("freezer.state")).map(|s| s.trim() == "FREEZING").unwrap_or(false)
            && start.elapsed() < Duration::from_secs(1)
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.kill_listed();
        write_file(&fz.join("freezer.state"), "THAWED")
    }

    fn usage(&self) -> Usage {
        let get = |c: &str, f: &str| self.dirs.get(c).and_then(|d| read_u64(&d.join(f)));
        let oom = self.dirs.get("memory").and_then(|d| fs::read_to_string(d.join("memory.oom_control")).ok());
        let (user, system) = match &self.tracker {
            Some(t) => {
                let u = t.usage();
                (u.cpu_user_ns, u.cpu_system_ns)
            }
            None => split_cpu(
                get("cpuacct", "cpuacct.usage"),
                get("cpuacct", "cpuacct.usage_user"),
                get("cpuacct", "cpuacct.usage_sys"),
            ),
        };
        Usage {
            cpu_user_ns: user,
            cpu_system_ns: system,
            memory_peak: get("memory", "memory.max_usage_in_bytes"),
            pids_peak: get("pids", "pids.peak"),
            oom_kills: oom.and_then(|t| keyed(&t, "oom_kill")).unwrap_or(0),
        }
    }

    fn remove(&mut self) -> Result<()> {
        let mut first_err = None;
        if let Some(mut t) = self.tracker.take() {
            if let Err(e) = t.remove() {
                first_err = Some(e);
            }
        }
        for d in self.unique_dirs() {
            // Cgroups below it too: a nested nsfast's (or any delegated user's) inside it.
            let kill = || kill_pids_below(&d);
            if let Err(e) = remove_children(&d, &kill).and_then(|()| rmdir_patiently(&d, Duration::from_secs(5), &kill))
            {
                first_err.get_or_insert(e);
            }
        }
        self.dirs.clear();
        first_err.map_or(Ok(()), Err)
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut v = self.unique_dirs();
        v.extend(self.tracker.iter().flat_map(|t| t.paths()));
        v
    }

    fn version(&self) -> u8 {
        1
    }
}

// ---------------------------------------------------------------------------------------
// The cgroup of one exec into a sandbox

/// One exec's cgroup: a child of the sandbox's (unified) cgroup that the exec'd process is
/// born in, so `kill` (a timeout, `Process.kill()`) ends its whole tree and nothing else;
/// v1 limits are the sandbox's, joined by writing its `tasks` files. `remove` after a normal
/// exit does not kill: processes the exec left behind keep running in the sandbox (docker
/// exec), and the sandbox's own removal takes their cgroup (or the next exec an empty one).
/// After `kill`, `remove` waits (bounded) for the tree to be gone.
pub struct ExecCgroup {
    own: Option<V2Cgroup>,
    v1: Vec<PathBuf>,
    leftovers: Leftovers,
    killed: std::sync::atomic::AtomicBool,
}

impl Cgroup for ExecCgroup {
    fn clone_fd(&self) -> Option<RawFd> {
        self.own.as_ref().and_then(|c| c.clone_fd())
    }

    fn self_attach_files(&self) -> Result<Vec<OwnedFd>> {
        open_tasks(&self.v1)
    }

    fn kill(&self) -> Result<()> {
        self.killed.store(true, Ordering::Relaxed);
        self.own.as_ref().map_or(Ok(()), |c| c.kill())
    }

    fn usage(&self) -> Usage {
        self.own.as_ref().map(|c| c.usage()).unwrap_or_default()
    }

    fn remove(&mut self) -> Result<()> {
        let Some(mut own) = self.own.take() else { return Ok(()) };
        if *self.killed.get_mut() {
            return own.remove();
        }
        match fs::remove_dir(&own.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                self.leftovers.lock().unwrap_or_else(|p| p.into_inner()).push(own.dir.clone());
                Ok(())
            }
            Err(e) => Err(CgroupError::Io { op: "rmdir", path: own.dir.clone(), source: e }),
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.own.iter().map(|c| c.dir.clone()).collect()
    }

    fn version(&self) -> u8 {
        if self.own.is_some() {
            2
        } else {
            1
        }
    }
}

// ---------------------------------------------------------------------------------------
// Joining the cgroup of an existing process (enter)

/// The cgroup directories of an existing process, to start another process next to it.
/// Owned by someone else: `kill`, `usage` and `remove` do nothing.
pub struct Existing {
    version: u8,
    /// Directories to write the pid into (v1 hierarchies where the target is elsewhere than we are).
    dirs: Vec<PathBuf>,
    /// The target's unified (v2) cgroup, for CLONE_INTO_CGROUP.
    fd: Option<OwnedFd>,
    unified: Option<PathBuf>,
}

/// Directories of `/proc/PID/cgroup` text under `hierarchy`: the v1 controllers nsfast
/// manages, and the unified (v2) path, separately.
pub fn dirs_of(cgroup_file: &str, hierarchy: &Hierarchy) -> (Vec<PathBuf>, Option<PathBuf>) {
    let mut dirs = Vec::new();
    let mut unified_dir = None;
    for line in cgroup_file.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let rel = path.trim().trim_start_matches('/');
        match hierarchy {
            Hierarchy::V2 { mount } if ctrls.is_empty() => unified_dir = Some(mount.join(rel)),
            Hierarchy::V1 { unified: Some(mount), .. } if ctrls.is_empty() => unified_dir = Some(mount.join(rel)),
            Hierarchy::V1 { controllers, .. } => {
                for c in ctrls.split(',') {
                    if let Some(m) = controllers.get(c) {
                        dirs.push(m.join(rel));
                    }
                }
            }
            _ => {}
        }
    }
    dirs.sort();
    dirs.dedup();
    (dirs, unified_dir)
}

impl Existing {
    pub fn of_process(pid: i32, hierarchy: &Hierarchy) -> Result<Existing> {
        let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = fs::read_to_string(&file).map_err(io_err("read", &file))?;
        let (dirs, unified) = dirs_of(&text, hierarchy);
        // Moving into a cgroup we are already in changes nothing but still pays the
        // migration lock: skip those hierarchies.
        let (ours, our_unified) = dirs_of(&fs::read_to_string("/proc/self/cgroup").unwrap_or_default(), hierarchy);
        let dirs = dirs.into_iter().filter(|d| !ours.contains(d)).collect();
        let version = if matches!(hierarchy, Hierarchy::V2 { .. }) { 2 } else { 1 };
        // Ours too: no CLONE_INTO_CGROUP (the child is born here anyway), which would ask for
        // write access to our own cgroup.procs, which a rootless caller lacks.
        let fd = match unified.as_ref().filter(|d| Some(*d) != our_unified.as_ref()) {
            Some(d) => Some(
                rustix::fs::open(d, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| CgroupError::Io { op: "open", path: d.clone(), source: e.into() })?,
            ),
            None => None,
        };
        Ok(Existing { version, dirs, fd, unified })
    }
}

impl Cgroup for Existing {
    fn clone_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    fn self_attach_files(&self) -> Result<Vec<OwnedFd>> {
        open_tasks(&self.dirs)
    }

    fn kill(&self) -> Result<()> {
        Ok(())
    }

    fn usage(&self) -> Usage {
        Usage::default()
    }

    fn remove(&mut self) -> Result<()> {
        Ok(())
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().chain(self.unified.iter()).cloned().collect()
    }

    fn version(&self) -> u8 {
        self.version
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn stale_sandbox_trees_are_swept_deepest_first_and_busy_ones_stay() {
        // (Not the directory of the test above: tests run in parallel in one process.)
        let root = std::env::temp_dir().join(format!("nsfast-sweep-tree-{}", std::process::id()));
        let gone = root.join("sb-999999999-0");
        fs::create_dir_all(gone.join("nsfast/sb-1-0/nsfast-caller")).unwrap();
        fs::create_dir_all(gone.join("exec-3")).unwrap();
        let busy = root.join("sb-999999998-0");
        fs::create_dir_all(busy.join("deep/er")).unwrap();
        fs::write(busy.join("deep/er/file"), b"x").unwrap(); // stands for a populated cgroup
        let mine = root.join(format!("sb-{}-0", std::process::id()));
        fs::create_dir_all(mine.join("a")).unwrap();
        sweep_stale(&root);
        assert!(!gone.exists(), "a dead sandbox's empty tree is removed");
        assert!(busy.join("deep/er").exists(), "what is not empty stays");
        assert!(mine.join("a").exists(), "a living process's sandbox is not touched");
        fs::remove_dir_all(&root).unwrap();
    }

    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / / rw,relatime - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids";

    #[test]
    fn hybrid_hosts_use_v1_controllers() {
        let Some(Hierarchy::V1 { controllers, unified }) = parse_mountinfo(HYBRID) else { panic!("not v1") };
        assert_eq!(unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(controllers["memory"], PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(controllers["cpu"], controllers["cpuacct"]);
        assert!(!controllers.contains_key("freezer"));
    }

    #[test]
    fn a_sandbox_mounts_the_managed_hierarchies_again_with_their_controllers_alone() {
        let text = format!(
            "{HYBRID}\n35 30 0:31 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
             36 30 0:32 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer,release_agent=/x,clone_children\n\
             37 30 0:33 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio\n\
             38 1 0:34 / /mnt/memory rw - cgroup cgroup rw,memory"
        );
        let links = [
            (b"cpu".to_vec(), b"cpu,cpuacct".to_vec()),
            (b"cpuacct".to_vec(), b"cpu,cpuacct".to_vec()),
            (b"net_cls".to_vec(), b"net_cls,net_prio".to_vec()),
        ];
        let v = view(&text, &links).expect("a view");
        assert!(!v.v2_top);
        let dirs: Vec<(&str, &str, &str)> = v
            .dirs
            .iter()
            .map(|(n, t, d)| (std::str::from_utf8(n).unwrap(), *t, std::str::from_utf8(d).unwrap()))
            .collect();
        // No systemd (no controller of nsfast's), net_cls (neither), nor a mount elsewhere;
        // release_agent= and the flags are dropped, every controller of a hierarchy kept.
        assert_eq!(
            dirs,
            [
                ("cpu,cpuacct", "cgroup", "cpu,cpuacct"),
                ("freezer", "cgroup", "freezer"),
                ("memory", "cgroup", "memory"),
                ("pids", "cgroup", "pids"),
                ("unified", "cgroup2", ""),
            ]
        );
        assert_eq!(v.links, links[..2]);
        let v2 = "25 1 0:23 / / rw - ext4 /dev/vda rw\n40 25 0:40 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(view(v2, &[]), Some(crate::mount::CgroupView { v2_top: true, ..Default::default() }));
        assert_eq!(view("25 1 0:23 / / rw - ext4 /dev/vda rw", &[]), None);
    }

    #[test]
    fn pure_v2_is_detected() {
        let text = "25 1 0:23 / / rw - ext4 /dev/vda rw\n40 25 0:40 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(parse_mountinfo(text), Some(Hierarchy::V2 { mount: "/sys/fs/cgroup".into() }));
    }

    #[test]
    fn keyed_files_parse() {
        assert_eq!(keyed("usage_usec 10\nuser_usec 7\nsystem_usec 3\n", "user_usec"), Some(7));
        assert_eq!(keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"), Some(2));
        assert_eq!(keyed("low 0\n", "oom_kill"), None);
    }

    #[test]
    fn writes_name_path_and_value() {
        let dir = std::env::temp_dir().join(format!("nsfast-cg-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("memory.max");
        fs::write(&f, "").unwrap();
        write_file(&f, "123").unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "123");
        let err = write_file(&dir.join("missing/pids.max"), "16").unwrap_err().to_string();
        assert!(err.contains("\"16\"") && err.contains("missing/pids.max"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn v1_cpu_split_keeps_the_exact_total() {
        assert_eq!(split_cpu(Some(328), Some(366), Some(4)), (Some(324), Some(4)));
        assert_eq!(split_cpu(Some(10), Some(0), Some(0)), (Some(10), Some(0)));
        assert_eq!(split_cpu(None, Some(3), Some(1)), (Some(3), Some(1)));
    }

    #[test]
    fn process_cgroups_map_to_directories() {
        let Some(h @ Hierarchy::V1 { .. }) = parse_mountinfo(HYBRID) else { panic!() };
        let text = "9:name=systemd:/\n8:pids:/nsfast/sb-1\n4:memory:/nsfast/sb-1\n2:cpu,cpuacct:/nsfast/sb-1\n0::/\n";
        let (dirs, unified) = dirs_of(text, &h);
        assert_eq!(
            dirs,
            [
                "/sys/fs/cgroup/cpu,cpuacct/nsfast/sb-1",
                "/sys/fs/cgroup/memory/nsfast/sb-1",
                "/sys/fs/cgroup/pids/nsfast/sb-1"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let v2 = Hierarchy::V2 { mount: "/sys/fs/cgroup".into() };
        assert_eq!(dirs_of("0::/nsfast/sb-2\n", &v2), (vec![], Some(PathBuf::from("/sys/fs/cgroup/nsfast/sb-2"))));
    }

    #[test]
    fn sweep_removes_only_empty_dirs_of_dead_creators() {
        let root = std::env::temp_dir().join(format!("nsfast-sweep-{}", std::process::id()));
        let dead = root.join("sb-4000000-1"); // above pid_max: never alive
        let alive = root.join(format!("sb-{}-1", std::process::id()));
        let busy = root.join("sb-4000000-2");
        for d in [&dead, &alive, &busy] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(busy.join("in-use"), "").unwrap();
        sweep_stale(&root);
        assert!(!dead.exists());
        assert!(alive.exists() && busy.exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn exec_cgroups_go_before_their_parent() {
        let root = std::env::temp_dir().join(format!("nsfast-exec-cg-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let mut parent =
            V2Cgroup { dir: root.clone(), fd: None, attach_by_procs: false, leftovers: Default::default() };
        let mut done = parent.exec_child("exec-0").unwrap();
        assert!(root.join("exec-0").is_dir() && done.clone_fd().is_some());
        done.remove().unwrap();
        assert!(!root.join("exec-0").exists());
        let left = parent.exec_child("exec-1").unwrap(); // still there when the sandbox goes
        parent.remove().unwrap();
        assert!(!root.exists());
        drop(left);
    }

    #[test]
    fn roots_are_below_our_own_cgroup_or_a_named_one() {
        let Some(h @ Hierarchy::V1 { .. }) = parse_mountinfo(HYBRID) else { panic!() };
        let own = "9:name=systemd:/\n8:pids:/\n4:memory:/outer/x\n2:cpu,cpuacct:/outer\n0::/u\n";
        let rel = Root::parse(&h, "nsfast").unwrap();
        assert_eq!(rel, Root::OwnRelative("nsfast".into()));
        let (v1, unified) = root_dirs(&h, &rel, own);
        assert_eq!(v1["memory"], PathBuf::from("/sys/fs/cgroup/memory/outer/x/nsfast"));
        assert_eq!(v1["pids"], PathBuf::from("/sys/fs/cgroup/pids/nsfast"));
        assert_eq!(v1["cpuacct"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/outer/nsfast"));
        assert_eq!(unified, Some(PathBuf::from("/sys/fs/cgroup/unified/u/nsfast")));
        // Absolute: the cgroup that directory is, in every hierarchy (mount-relative).
        let abs = Root::parse(&h, "/sys/fs/cgroup/unified/nsfast").unwrap();
        assert_eq!(abs, Root::Path("nsfast".into()));
        let (v1, unified) = root_dirs(&h, &abs, own);
        assert_eq!(v1["memory"], PathBuf::from("/sys/fs/cgroup/memory/nsfast"));
        assert_eq!(unified, Some(PathBuf::from("/sys/fs/cgroup/unified/nsfast")));
        for bad in ["/tmp/x", "/sys/fs/cgroup/x", "a/../b", "../up", "./a", "", "/sys/fs/cgroup/memory/a/.."] {
            assert!(Root::parse(&h, bad).is_err(), "{bad:?} accepted");
        }
        let v2 = Hierarchy::V2 { mount: "/sys/fs/cgroup".into() };
        let (_, dir) = root_dirs(&v2, &Root::parse(&v2, "sb/x").unwrap(), "0::/user.slice/a.scope\n");
        assert_eq!(dir, Some(PathBuf::from("/sys/fs/cgroup/user.slice/a.scope/sb/x")));
        let (_, dir) = root_dirs(&v2, &Root::parse(&v2, "/sys/fs/cgroup/sys/x").unwrap(), "0::/a\n");
        assert_eq!(dir, Some(PathBuf::from("/sys/fs/cgroup/sys/x")));
    }

    #[test]
    fn raw_limits_stay_limits_of_the_own_directory() {
        for ok in ["cpu.weight", "memory.high", "pids.max", "cpuset.cpus", "memory.swap.max", "cpu.shares"] {
            assert!(raw_file_ok(ok), "{ok}");
        }
        for bad in [
            "cgroup.procs",
            "cgroup.subtree_control",
            "memory",
            "memory.",
            "../memory.max",
            "memory.max/x",
            "io.max",
            "memory..max",
            "Memory.max",
            "memory.max\n",
            "cpu./x",
        ] {
            assert!(!raw_file_ok(bad), "{bad:?} accepted");
        }
        let dir = std::env::temp_dir().join(format!("nsfast-raw-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cpu.weight"), "").unwrap();
        let limits = |file: &str, value: &str| Limits { raw: vec![(file.into(), value.into())], ..Limits::default() };
        write_raw(&limits("cpu.weight", "50"), |_| Some(dir.clone())).unwrap();
        assert_eq!(fs::read_to_string(dir.join("cpu.weight")).unwrap(), "50");
        assert!(write_raw(&limits("cgroup.procs", "1"), |_| Some(dir.clone())).is_err());
        assert!(write_raw(&limits("cpu.weight", "1\n2"), |_| Some(dir.clone())).is_err());
        let err = write_raw(&limits("memory.high", "64M"), |_| Some(dir.join("gone"))).unwrap_err().to_string();
        assert!(err.contains("\"64M\"") && err.contains("gone/memory.high"), "{err}");
        assert!(!dir.join("cgroup.procs").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mkdir_chain_visits_each_new_directory_top_down() {
        let base = std::env::temp_dir().join(format!("nsfast-chain-{}", std::process::id()));
        fs::create_dir_all(&base).unwrap();
        let seen = Mutex::new(Vec::new());
        mkdir_chain(&base.join("a/b/c"), &|d| {
            seen.lock().unwrap().push(d.strip_prefix(&base).unwrap().to_owned());
            Ok(())
        })
        .unwrap();
        assert_eq!(*seen.lock().unwrap(), ["a", "a/b", "a/b/c"].map(PathBuf::from));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name(), unique_name());
    }
}
