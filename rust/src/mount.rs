//! The filesystem of a sandbox: a plan of mount steps built in the parent (pure, tested
//! without root) and their execution in the child (child-safe: no allocation).
//!
//! Shape of the result, whatever the root: the root tree (host `/` or `rootfs`, recursive,
//! nosuid+nodev, read-only by default) cloned with open_tree(2) and stacked on top of `/`, a
//! fresh `/proc` with runc's masked and read-only paths, a minimal `/dev` (device nodes bound
//! from the host, a private size-capped `/dev/shm`), a size-capped tmpfs on `/tmp`, empty
//! tmpfs over the host directories that hold other users' data (`hidden`), the user's
//! mounts (nosuid+nodev), then `pivot_root(".", ".")` and a lazy unmount of the old root.
//! Propagation is made private first, so the host's mount table never changes.
//!
//! The host root without an overlay is read in place instead ([`FsSpec::root_in_place`]):
//! the new mount namespace's copy of the caller's root tree gets the root's attributes and
//! the same mounts, and there is no pivot, so no old root whose detach waits for an RCU
//! grace period. Host paths the binds take are cloned first ([`FsOp::HoldTree`]), while no
//! mount of the sandbox covers them yet, as the original tree under a stacked clone shows
//! them.
//!
//! Every path inside the new root is resolved inside it (`openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` from the new root): a symlink in a rootfs, or one a program
//! planted in a directory shared with it, cannot make nsfast create or mount anything
//! outside the sandbox.
//!
//! Trees the child cannot open itself are prepared by the parent ([`PrepareTree`]): for a
//! root caller the sandbox's root is an unprivileged id in its user namespace, which may not
//! traverse the caller's private directories, and idmapped mounts need the caller's
//! privilege; the parent opens and configures those trees and the child only attaches them.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags,
    UnmountFlags,
};

use crate::error::{Error, Result};
use crate::spec::Mount;
use crate::sys::{self, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};

/// Where a tree to attach comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum Tree {
    /// open_tree(2) of this path by the child (absolute: the host's; relative: in the new root).
    Path(CString),
    /// The parent's [`PrepareTree`] number n (its fd is handed to the child).
    Prepared(usize),
    /// The child's clone n of a host path, made by [`FsOp::HoldTree`] before the first mount
    /// could cover it (a root in place has no uncovered original tree to clone from later).
    Held(usize),
}

/// At most this many host paths are held for a root in place; a plan with more binds of
/// host paths stacks a clone and pivots instead.
pub const MAX_HELD: usize = 16;

/// One step of the plan. Paths inside the new root are relative (the child's cwd is the new
/// root from `EnterRoot` on) and resolved inside it; host paths are absolute.
#[derive(Debug, PartialEq, Eq)]
pub enum FsOp {
    /// Make every mount private (recursive), so nothing propagates to the host.
    MakePrivate,
    /// Clone the tree (unless prepared), set `attrs` (recursive), attach it on top of `/`
    /// and chdir into it.
    EnterRoot {
        tree: Tree,
        attrs: u64,
    },
    /// mount(2) of a fresh filesystem on `dst` (resolved inside the new root).
    Mount {
        fstype: CString,
        dst: CString,
        flags: MountFlags,
        data: CString,
    },
    /// Attach `tree` (recursive when asked) on `dst` with `attrs` (set by the child unless
    /// prepared).
    Bind {
        tree: Tree,
        dst: CString,
        recursive: bool,
        attrs: u64,
    },
    /// mkdir `name` in directory `parent` (both inside the new root).
    Mkdir {
        parent: CString,
        name: CString,
        mode: u32,
    },
    /// Create an empty file `name` in `parent` (never following a symlink at `name`).
    Touch {
        parent: CString,
        name: CString,
    },
    Symlink {
        target: CString,
        parent: CString,
        name: CString,
    },
    /// mount_setattr(2) `attrs` on one mount (not its submounts).
    SetAttr {
        path: CString,
        attrs: u64,
    },
    /// pivot_root(".", "."), detach the old root, chdir("/").
    PivotRoot,
    /// The host root in place: the mount namespace's own copy of the caller's root tree (no
    /// clone of it stacked on `/`, so no pivot_root and no old root to detach) gets `attrs`
    /// recursively, and the child enters it. See [`FsSpec::root_in_place`].
    RootInPlace {
        attrs: u64,
    },
    /// open_tree(OPEN_TREE_CLONE) of host path `path` (recursive when asked) into the child's
    /// [`FsState`] slot `slot`, for a later [`Tree::Held`] bind.
    HoldTree {
        path: CString,
        recursive: bool,
        slot: usize,
    },
    /// A fresh tmpfs (nosuid, nodev) attached on top of `/` and entered: the skeleton root of
    /// a rootless caller's overlay of the host root (see `split_steps`).
    EnterTmpfsRoot {
        size: Option<CString>,
    },
    /// Make (or open) the overlays' upper filesystem, kept in the child's [`FsState`].
    OverlayUpper(Upper),
    /// The cover of a submount of the root (an overlay of its own, or a read-only bind),
    /// skipped where the child may not reach it: `EACCES` resolving its mount point or
    /// source, from a directory on the way that the sandbox's ids may not search although
    /// the child holds every capability of its user namespace then (its owner or group is
    /// not mapped). What it would cover is out of the sandbox's reach for good: it can never
    /// own that directory nor override its mode. Docker's `/var/lib/docker` (0710) over
    /// its containers' mounts is one; without the skip, no overlay root could start there.
    Cover(Box<FsOp>),
    /// A fresh sysfs, read-only, on `sys`: it shows the network devices of the child's network
    /// namespace (the host's /sys lists the host's). Skipped in a namespace of
    /// `crate::netpool`'s ([`FsState::pooled_net`]): that one is owned by the caller's user
    /// namespace, and only a sandbox whose user namespace owns its network namespace may
    /// mount a sysfs for it.
    FreshSys,
    /// Hierarchy `bit` of the plan's `cgroup_dirs` mounted afresh (`fstype`, `data`,
    /// read-only) on a directory `dst` made for it, if the sandbox has a cgroup of its own in
    /// it ([`FsState::own_cgroups`]); else nothing (neither the directory): mounted in a
    /// hierarchy it has no cgroup in, its cgroup namespace's root there is the caller's cgroup,
    /// whose whole subtree (the host's tree, for a caller at its root) it would show.
    CgroupDir {
        bit: u8,
        parent: CString,
        name: CString,
        dst: CString,
        fstype: CString,
        data: CString,
    },
    /// A symlink to hierarchy `bit`'s directory (`cpu` -> `cpu,cpuacct`), where that is mounted.
    CgroupLink {
        bit: u8,
        target: CString,
        parent: CString,
        name: CString,
    },
    /// An overlay of host directory `lower` (the overlay does not look into its submounts: each is a layer of its own)
    /// with `upper`/`work` directories of the upper filesystem (created if missing, with
    /// `mkdirs` in `upper` first), mounted with `attrs`: on top of `/` and entered when
    /// `dst` is empty, else on `dst` (inside the new root).
    Overlay {
        lower: CString,
        dst: CString,
        upper: CString,
        work: CString,
        mkdirs: Vec<CString>,
        userxattr: bool,
        attrs: u64,
    },
}

/// Where overlays keep their changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upper {
    /// A fresh tmpfs of the child's (its pages charged to the sandbox's memory cgroup).
    Tmpfs { size: Option<CString> },
    /// A directory of the caller's (`overlay_upper`, a host path), kept after the run.
    Dir(CString),
}

/// What the child's steps hand on to later ones (on its stack: nothing allocated).
#[derive(Default)]
pub struct FsState {
    /// The child was born in a network namespace of `crate::netpool`'s.
    pub pooled_net: bool,
    /// Bit i: the sandbox has a cgroup of its own in hierarchy i of the plan's `cgroup_dirs`.
    pub own_cgroups: u64,
    upper: Option<OwnedFd>,
    held: [Option<OwnedFd>; MAX_HELD],
}

/// A tree the parent prepares before clone: open_tree(OPEN_TREE_CLONE) of `src`, `attrs`
/// set (recursively when `recursive`), idmapped through the sandbox's id mapping when
/// `idmap`. Nothing is created in it: the tree is the user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareTree {
    pub src: CString,
    pub recursive: bool,
    pub attrs: u64,
    pub idmap: bool,
    /// The step name for errors ("bind SRC -> DST", "bind root").
    pub step: String,
    /// The tree is an overlay's lower layer: the parent makes the overlay (over the plan's
    /// `upper`) and the child attaches that.
    pub overlay: Option<OverlayLayer>,
}

/// An overlay the parent makes (a root caller's: its layers are idmapped, which only the
/// caller may do, and the kernel lets only the owner of a tree's mount namespace use it as a
/// layer, so the child could not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayLayer {
    /// Directories of the upper filesystem, made if missing (`upper` owned by `owner`).
    pub upper: CString,
    pub work: CString,
    /// Mount points made in `upper` (a rootfs's missing /proc, /dev, /tmp).
    pub mkdirs: Vec<CString>,
    /// The merged root's owner (host ids): a rootfs's (idmapped) is the sandbox's root; the
    /// host root's stays host root's (none of its files is the sandbox's).
    pub owner: Option<(u32, u32)>,
    /// Of the overlay's mount.
    pub attrs: u64,
}

/// The overlays of `prepare` whose merged root is owned by the root of the range at `from`
/// (the plan's `root_ids`), owned by the root of the range at `to` instead.
pub fn rebase_owners(prepare: &mut [PrepareTree], from: u32, to: u32) {
    for o in prepare.iter_mut().filter_map(|p| p.overlay.as_mut()) {
        if o.owner == Some((from, from)) {
            o.owner = Some((to, to));
        }
    }
}

/// A step with what the error message calls it: `step` (e.g. "mount /proc") and `path`.
#[derive(Debug)]
pub struct FsStep {
    pub op: FsOp,
    pub step: String,
    pub path: String,
}

/// The cgroup hierarchies the host has under /sys/fs/cgroup that nsfast's cgroups are made
/// in (cgroup2; v1 memory, pids, cpu, cpuacct, cpuset, freezer), as a sandbox mounts them
/// again in its cgroup namespace (see `cgroup::view`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupView {
    /// cgroup2 is /sys/fs/cgroup itself (a pure cgroup v2 host).
    pub v2_top: bool,
    /// (directory name, file system type, mount data) of the hierarchies in directories of
    /// /sys/fs/cgroup: ("memory", "cgroup", "memory"), ("unified", "cgroup2", "").
    pub dirs: Vec<(Vec<u8>, &'static str, Vec<u8>)>,
    /// (name, target) of the symlinks to them there ("cpu" -> "cpu,cpuacct").
    pub links: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The filesystem plan: the child's steps and the trees the parent prepares for them.
#[derive(Debug, Default)]
pub struct FsPlan {
    /// The plan's steps need the sandbox's own network namespace (a rootfs's fresh sysfs):
    /// it takes none of `crate::netpool`'s.
    pub own_net: bool,
    /// The hierarchies [`FsOp::CgroupDir`] may mount, by bit: their directories' names in
    /// /sys/fs/cgroup (the same as on the host).
    pub cgroup_dirs: Vec<Vec<u8>>,
    pub steps: Vec<FsStep>,
    pub prepare: Vec<PrepareTree>,
    /// The upper filesystem of the overlays in `prepare` (made by the parent first).
    pub upper: Option<Upper>,
    /// Each overlay's upper directory in the upper filesystem, by its mount point ("" for
    /// an overlay root): where its changes are read back (`Io::trees` "//DST").
    pub uppers: Vec<(CString, CString)>,
}

/// What the filesystem should be.
pub struct FsSpec<'a> {
    /// None: the host root.
    pub rootfs: Option<&'a [u8]>,
    pub readonly: bool,
    pub mounts: &'a [Mount],
    /// Replaced by an empty read-only tmpfs (directories) or /dev/null (files).
    pub masked: &'a [Vec<u8>],
    /// Bound read-only onto themselves.
    pub readonly_paths: &'a [Vec<u8>],
    /// Host directories replaced by an empty tmpfs (host root only).
    pub hidden: &'a [Vec<u8>],
    pub tmp_size: Option<u64>,
    pub shm_size: Option<u64>,
    /// The parent prepares the rootfs and bind trees (root caller), idmapping binds.
    pub prepare_trees: bool,
    /// The sandbox's root as host ids (what a root caller's overlays are owned by).
    pub root_ids: (u32, u32),
    /// Mount a fresh procfs (false: bind the host's, for a user namespace without a pid
    /// namespace of its own, which may not mount a procfs of the host's pid namespace).
    pub fresh_proc: bool,
    /// A fresh cgroup2 (the sandbox's own cgroup namespace) on /sys/fs/cgroup, read-write
    /// (`delegate_cgroup`).
    pub cgroup2: bool,
    /// The sandbox has a network namespace of its own: a fresh sysfs on its /sys.
    pub fresh_sys: bool,
    /// The sandbox has a cgroup namespace of its own: its cgroup hierarchies (the host's
    /// under /sys/fs/cgroup, mounted afresh, so rooted at its own cgroup) on /sys/fs/cgroup,
    /// read-only, instead of the host's tree. Not with `cgroup2` (delegation mounts its own).
    pub cgroup_view: Option<&'a CgroupView>,
    /// A writable copy-on-write root (`Spec(overlay=True)`).
    pub overlay: Option<OverlaySpec<'a>>,
    /// The overlay tmpfs's size for `Mount::Overlay`s without an overlay root.
    pub overlay_size: Option<u64>,
    /// In a user namespace: overlayfs keeps its metadata in user.* xattrs.
    pub userxattr: bool,
    /// The host root, read where it is: the caller's `/` is the root of a mount, so the new
    /// mount namespace's copy of it is exactly the tree a recursive clone of `/` would give.
    /// The sandbox then mounts over that copy instead of over a clone stacked on it, and
    /// needs no pivot_root: what the pivot leaves behind, the old root, must be detached,
    /// and every detach waits for an RCU grace period (`namespace_unlock`), 0.07-0.8 ms of
    /// every start here as the machine is fast or slow, queued on by concurrent starts.
    /// What lies below the caller's root (the initramfs root a booted system keeps under
    /// `/`) stays below it either way.
    /// Not for a sandbox that keeps a capability (see `Plan::build`).
    pub root_in_place: bool,
}

/// `Spec(overlay=True, overlay_size=, overlay_upper=)`.
pub struct OverlaySpec<'a> {
    /// Size of the tmpfs that holds the changes.
    pub size: Option<u64>,
    /// A host directory that holds them instead (`upper/` and `work/` in it), kept.
    pub upper: Option<&'a [u8]>,
}

/// File systems an overlay can use as a lower layer; other submounts (proc, sysfs, cgroup,
/// devpts, ...) are bound read-only, with what is mounted below them.
const OVERLAYABLE: [&str; 20] = [
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "ramfs", "overlay", "squashfs", "erofs", "zfs", "vfat",
    "exfat", "ntfs3", "nfs", "nfs4", "9p", "virtiofs", "iso9660",
];

/// Size of the tmpfs that holds only the mount points a rootfs lacks.
const MOUNTPOINTS_SIZE: u64 = 64 << 10;

/// Size of each tmpfs that hides a host directory.
pub const HIDDEN_SIZE: u64 = 16 << 20;

const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const DEV_LINKS: [(&str, &str); 4] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

const NOSUID_NODEV: u64 = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;

fn c(s: impl Into<Vec<u8>>) -> CString {
    CString::new(s).expect("plan paths are checked for NUL bytes")
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `a/b/c` -> (`a/b`, `c`); `c` -> (`.`, `c`).
fn split(rel: &[u8]) -> (CString, CString) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (c(&rel[..i]), c(&rel[i + 1..])),
        None => (c("."), c(rel)),
    }
}

fn mkdir(rel: &[u8], mode: u32) -> FsOp {
    let (parent, name) = split(rel);
    FsOp::Mkdir { parent, name, mode }
}

fn touch(rel: &[u8]) -> FsOp {
    let (parent, name) = split(rel);
    FsOp::Touch { parent, name }
}

fn tmpfs(dst: &[u8], flags: MountFlags, mode: &str, size: Option<u64>) -> FsOp {
    let data = match size {
        Some(s) => format!("mode={mode},size={s}"),
        None => format!("mode={mode}"),
    };
    FsOp::Mount { fstype: c("tmpfs"), dst: c(dst), flags, data: c(data) }
}

/// The steps of a sandbox's own /sys/fs/cgroup: a tmpfs over what is there (the host's
/// cgroup2 there would be the same superblock on the same mount point, which the kernel
/// refuses), the hierarchies mounted afresh on it, all read-only. Mounted in the sandbox's
/// cgroup namespace, each is rooted at the sandbox's cgroup (or, in a hierarchy it has
/// none in, at the caller's): the host's tree and other sandboxes' cgroups are not in it,
/// and a program reading its own limits finds them where `/proc/self/cgroup` says.
pub fn cgroup_view_steps(view: &CgroupView, push: &mut dyn FnMut(FsOp, String, String)) -> Vec<Vec<u8>> {
    let top = b"sys/fs/cgroup";
    push(
        tmpfs(top, MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC, "0755", Some(64 << 10)),
        "mount /sys/fs/cgroup".into(),
        "/sys/fs/cgroup".into(),
    );
    let attrs = MOUNT_ATTR_RDONLY | NOSUID_NODEV | MOUNT_ATTR_NOEXEC;
    if view.v2_top {
        // Sealed first: the cgroup2 goes on top of it (or, without a cgroup of the sandbox's
        // own, nothing: an empty directory).
        push(
            FsOp::SetAttr { path: c(&top[..]), attrs },
            "remount /sys/fs/cgroup read-only".into(),
            "/sys/fs/cgroup".into(),
        );
        // (Bit 0, the name "": the hierarchy is /sys/fs/cgroup itself.)
        let op = FsOp::CgroupDir {
            bit: 0,
            parent: c("sys/fs"),
            name: c(""),
            dst: c(&top[..]),
            fstype: c("cgroup2"),
            data: c(""),
        };
        push(op, "mount /sys/fs/cgroup".into(), "/sys/fs/cgroup".into());
        return vec![Vec::new()];
    }
    let dirs: Vec<Vec<u8>> = view.dirs.iter().take(64).map(|d| d.0.clone()).collect();
    for (bit, (name, fstype, data)) in view.dirs.iter().take(64).enumerate() {
        let rel = [&top[..], b"/", name].concat();
        let shown = format!("/{}", show(&rel));
        let (parent, dir) = split(&rel);
        let op = FsOp::CgroupDir {
            bit: bit as u8,
            parent,
            name: dir,
            dst: c(rel),
            fstype: c(*fstype),
            data: c(data.clone()),
        };
        push(op, format!("mount {shown}"), shown);
    }
    for (name, target) in &view.links {
        let Some(bit) = dirs.iter().position(|d| d == target) else { continue };
        let shown = format!("/sys/fs/cgroup/{}", show(name));
        let op =
            FsOp::CgroupLink { bit: bit as u8, target: c(target.clone()), parent: c(&top[..]), name: c(name.clone()) };
        push(op, format!("symlink {shown}"), shown);
    }
    push(
        FsOp::SetAttr { path: c(&top[..]), attrs },
        "remount /sys/fs/cgroup read-only".into(),
        "/sys/fs/cgroup".into(),
    );
    dirs
}

/// `/a//b/./c/` -> `a/b/c`; None for relative paths or paths with `..` or NUL.
pub fn normalize_target(path: &[u8]) -> Option<Vec<u8>> {
    if !path.starts_with(b"/") || path.contains(&0) {
        return None;
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return None,
            p => parts.push(p),
        }
    }
    Some(parts.join(&b'/'))
}

/// A path of `field` (masked, read-only, hidden) as the plan uses it and as messages show it:
/// (`a/b`, `/a/b`); not `/`, nothing relative or with `..`.
fn sandbox_path(field: &'static str, path: &[u8]) -> Result<(Vec<u8>, String)> {
    let rel = normalize_target(path).filter(|r| !r.is_empty()).ok_or_else(|| {
        Error::invalid(field, format!("must be absolute paths without '..', other than '/': {}", show(path)))
    })?;
    let shown = format!("/{}", show(&rel));
    Ok((rel, shown))
}

/// `(root, path inside it)` -> None if it does not exist, else whether it is a directory.
pub type InRootProbe<'a> = &'a dyn Fn(&[u8], &[u8]) -> Option<bool>;

/// A host directory -> the mounts below it: (path relative to it, file system type).
pub type SubmountsProbe<'a> = &'a dyn Fn(&[u8]) -> Vec<(Vec<u8>, String)>;

/// An entry of a host directory, as [`Probes::list_dir`] sees it (not following symlinks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEntry {
    pub name: Vec<u8>,
    /// b'd', b'f', b'l' or b'o'.
    pub kind: u8,
    pub mode: u32,
    /// A symlink's target.
    pub target: Vec<u8>,
}

/// A host directory -> its entries.
pub type ListDirProbe<'a> = &'a dyn Fn(&[u8]) -> Vec<HostEntry>;

/// What the planner may ask about the filesystem.
pub struct Probes<'a> {
    /// A host path: None if it does not exist, else whether it is a directory.
    pub host: &'a dyn Fn(&[u8]) -> Option<bool>,
    /// A path inside `rootfs`, resolved as the sandbox sees it (symlinks stay inside the
    /// root, RESOLVE_IN_ROOT).
    pub in_root: InRootProbe<'a>,
    /// A path inside `rootfs`: is it itself a symlink?
    pub is_link: &'a dyn Fn(&[u8], &[u8]) -> bool,
    /// The mounts strictly below a host directory: (path relative to it, file system type),
    /// parents before children.
    pub submounts: SubmountsProbe<'a>,
    /// The entries of a host directory.
    pub list_dir: ListDirProbe<'a>,
}

/// Build the filesystem plan.
pub fn plan(fs: &FsSpec, probes: &Probes) -> Result<FsPlan> {
    let probe = probes.host;
    let mut steps: Vec<FsStep> = Vec::new();
    let mut prepare: Vec<PrepareTree> = Vec::new();

    let root: Vec<u8> = match fs.rootfs {
        None => b"/".to_vec(),
        Some(r) => {
            if !r.starts_with(b"/") || r.contains(&0) {
                return Err(Error::invalid("rootfs", format!("must be an absolute path: {}", show(r))));
            }
            match probe(r) {
                Some(true) => r.to_vec(),
                Some(false) => return Err(Error::invalid("rootfs", format!("is not a directory: {}", show(r)))),
                None => return Err(Error::invalid("rootfs", format!("does not exist: {}", show(r)))),
            }
        }
    };
    let host_path = |rel: &[u8]| -> Vec<u8> {
        let mut p = root.clone();
        if !p.ends_with(b"/") {
            p.push(b'/');
        }
        p.extend_from_slice(rel);
        p
    };
    // A user's rootfs: paths are probed inside it, as the sandbox will see them.
    let in_root = fs.rootfs.is_some();
    let exists = |rel: &[u8]| if in_root { (probes.in_root)(&root, rel) } else { probe(&host_path(rel)) };
    if in_root {
        for d in ["proc", "dev", "tmp"] {
            if (probes.is_link)(&root, d.as_bytes()) {
                return Err(Error::invalid(
                    "rootfs",
                    format!("has a symlink at /{d}; nsfast mounts a fresh {d} there and needs a directory or nothing"),
                ));
            }
        }
    }

    steps.push(FsStep { op: FsOp::MakePrivate, step: "make / private".into(), path: "/".into() });
    let root_attrs = NOSUID_NODEV | if fs.readonly { MOUNT_ATTR_RDONLY } else { 0 };
    // Mount points a rootfs lacks come from an overlay of nsfast's own, never from the
    // user's directory (which may be read-only, or shared with other sandboxes).
    let missing: Vec<&str> = if in_root {
        ["proc", "dev", "tmp"].into_iter().filter(|d| exists(d.as_bytes()).is_none()).collect()
    } else {
        vec![]
    };
    if !missing.is_empty() && fs.overlay.is_none() && !fs.readonly {
        return Err(Error::invalid(
            "rootfs",
            format!(
                "has no {} (mount points nsfast needs) and readonly_root=False writes into it: nsfast does not \
                 create them in your directory; create them, or use overlay=True (or the read-only default)",
                missing.iter().map(|d| format!("/{d}")).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let (mut upper, mut uppers) = (None, Vec::new());
    let in_place = fs.root_in_place && !in_root && fs.overlay.is_none() && missing.is_empty();
    // Whether the upper filesystem exists (made by the child: a step; by the parent: `upper`).
    let mut have_upper = false;
    if fs.overlay.is_some() || !missing.is_empty() {
        let (mut layers, up) = overlay_steps(fs, probes, &root, &missing, &mut prepare)?;
        steps.append(&mut layers);
        upper = up;
        have_upper = true;
        // (A rootless caller's overlay of the host root has no one upper directory.)
        if in_root || fs.prepare_trees {
            let kept = fs.overlay.as_ref().is_some_and(|o| o.upper.is_some());
            uppers.push((c(""), c(if kept { "upper" } else { "u0" })));
        }
    } else {
        let enter = if in_root && fs.prepare_trees {
            // Idmapped like the binds: an image's ids 0..65535 on disk are the sandbox's ids.
            prepare.push(PrepareTree {
                src: c(root.clone()),
                recursive: true,
                attrs: root_attrs,
                idmap: true,
                step: "bind root".into(),
                overlay: None,
            });
            FsOp::EnterRoot { tree: Tree::Prepared(prepare.len() - 1), attrs: 0 }
        } else if in_place {
            FsOp::RootInPlace { attrs: root_attrs }
        } else {
            FsOp::EnterRoot { tree: Tree::Path(c(root.clone())), attrs: root_attrs }
        };
        steps.push(FsStep { op: enter, step: "bind root".into(), path: show(&root) });
    }
    let mut push = |op: FsOp, step: String, path: String| steps.push(FsStep { op, step, path });
    if fs.fresh_proc {
        push(
            FsOp::Mount {
                fstype: c("proc"),
                dst: c("proc"),
                flags: MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                data: c(""),
            },
            "mount /proc".into(),
            "/proc".into(),
        );
    } else {
        let attrs = NOSUID_NODEV | MOUNT_ATTR_NOEXEC;
        push(
            FsOp::Bind { tree: Tree::Path(c("/proc")), dst: c("proc"), recursive: true, attrs },
            "bind /proc".into(),
            "/proc".into(),
        );
    }
    push(
        tmpfs(b"dev", MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC, "0755", Some(64 << 10)),
        "mount /dev".into(),
        "/dev".into(),
    );
    for node in DEV_NODES {
        let dst = format!("dev/{node}");
        push(touch(dst.as_bytes()), format!("create /{dst}"), format!("/{dst}"));
        push(
            FsOp::Bind {
                tree: Tree::Path(c(format!("/dev/{node}"))),
                dst: c(dst.clone()),
                recursive: false,
                attrs: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
            },
            format!("bind /{dst}"),
            format!("/{dst}"),
        );
    }
    for (name, target) in DEV_LINKS {
        push(
            FsOp::Symlink { target: c(target), parent: c("dev"), name: c(name) },
            format!("symlink /dev/{name}"),
            format!("/dev/{name}"),
        );
    }

    // /sys: the host's (in the host root) or nothing (a rootfs) until here.
    let mut own_net = false;
    let sys_dir = exists(b"sys") == Some(true);
    if fs.fresh_sys && sys_dir {
        push(FsOp::FreshSys, "mount /sys".into(), "/sys".into());
        // A rootfs has no /sys of the host's to fall back on in a pooled namespace.
        own_net = in_root;
    }
    let mut cgroup_dirs = Vec::new();
    if let Some(view) = fs.cgroup_view.filter(|_| !fs.cgroup2 && (own_net || (!in_root && sys_dir))) {
        cgroup_dirs = cgroup_view_steps(view, &mut push);
    }

    // runc's masks: what they name must not be readable, whatever the sandbox's ids.
    let kind = |rel: &[u8]| {
        if rel == b"proc" || rel.starts_with(b"proc/") {
            probe(&[b"/", rel].concat())
        } else {
            exists(rel)
        }
    };
    let sealed = MOUNT_ATTR_RDONLY | NOSUID_NODEV | MOUNT_ATTR_NOEXEC;
    for st in mask_steps(fs.masked, fs.readonly_paths, &kind)? {
        push(st.op, st.step, st.path);
    }
    push(mkdir(b"dev/shm", 0o755), "mkdir /dev/shm".into(), "/dev/shm".into());
    push(
        tmpfs(b"dev/shm", MountFlags::NOSUID | MountFlags::NODEV, "1777", fs.shm_size),
        "mount /dev/shm".into(),
        "/dev/shm".into(),
    );
    push(FsOp::SetAttr { path: c("dev"), attrs: sealed }, "remount /dev read-only".into(), "/dev".into());
    push(
        tmpfs(b"tmp", MountFlags::NOSUID | MountFlags::NODEV, "1777", fs.tmp_size),
        "mount /tmp".into(),
        "/tmp".into(),
    );

    if fs.cgroup2 {
        // Mounted after the child is in its cgroup namespace: its root is the sandbox's cgroup.
        if exists(b"sys/fs/cgroup") != Some(true) {
            return Err(Error::invalid("delegate_cgroup", "needs a directory /sys/fs/cgroup in the sandbox's root"));
        }
        // On a tmpfs first: the kernel refuses the same superblock on the same mount point
        // (EBUSY), which the host's cgroup2 at /sys/fs/cgroup would be (there is one cgroup2).
        push(
            tmpfs(b"sys/fs/cgroup", MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC, "0755", Some(4096)),
            "mount /sys/fs/cgroup".into(),
            "/sys/fs/cgroup".into(),
        );
        push(
            FsOp::Mount {
                fstype: c("cgroup2"),
                dst: c("sys/fs/cgroup"),
                flags: MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                data: c(""),
            },
            "mount /sys/fs/cgroup".into(),
            "/sys/fs/cgroup".into(),
        );
    }

    // Directories that are fresh tmpfs: targets below them are created on the fly.
    let mut fresh: Vec<Vec<u8>> = vec![b"tmp".to_vec(), b"dev/shm".to_vec()];
    let below =
        |fresh: &[Vec<u8>], p: &[u8]| fresh.iter().find(|f| p.starts_with(f) && p.get(f.len()) == Some(&b'/')).cloned();
    if !in_root {
        for h in fs.hidden {
            let (rel, shown) = sandbox_path("hidden", h)?;
            if fresh.contains(&rel) || below(&fresh, &rel).is_some() || probe(&host_path(&rel)) != Some(true) {
                continue;
            }
            let mode = if rel == b"var/tmp" { "1777" } else { "0755" };
            push(
                tmpfs(&rel, MountFlags::NOSUID | MountFlags::NODEV, mode, Some(HIDDEN_SIZE)),
                format!("hide {shown}"),
                shown,
            );
            fresh.push(rel);
        }
    }

    for m in fs.mounts {
        let (dst_raw, src_is_dir) = match m {
            Mount::Bind { src, dst, .. } => {
                if !src.starts_with(b"/") || src.contains(&0) {
                    return Err(Error::invalid(
                        "mounts",
                        format!("bind source must be an absolute path: {}", show(src)),
                    ));
                }
                match probe(src) {
                    Some(is_dir) => (dst, is_dir),
                    None => return Err(Error::invalid("mounts", format!("bind source does not exist: {}", show(src)))),
                }
            }
            Mount::Tmpfs { dst, .. } => (dst, true),
            Mount::Overlay { src, dst, .. } => {
                if !src.starts_with(b"/") || src.contains(&0) {
                    return Err(Error::invalid(
                        "mounts",
                        format!("overlay source must be an absolute path: {}", show(src)),
                    ));
                }
                if probe(src) != Some(true) {
                    return Err(Error::invalid("mounts", format!("overlay source is not a directory: {}", show(src))));
                }
                (dst, true)
            }
        };
        let dst = normalize_target(dst_raw).ok_or_else(|| {
            Error::invalid("mounts", format!("mount target must be an absolute path without '..': {}", show(dst_raw)))
        })?;
        if dst.is_empty() {
            return Err(Error::invalid("mounts", "mount target must not be '/' (use rootfs=)"));
        }
        let shown = format!("/{}", show(&dst));
        match below(&fresh, &dst) {
            Some(base) => {
                // mkdir -p below the tmpfs, then the target itself (each resolved in the root).
                let rest = &dst[base.len() + 1..];
                let comps: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
                let mut cur = base.clone();
                for (i, comp) in comps.iter().enumerate() {
                    cur.push(b'/');
                    cur.extend_from_slice(comp);
                    let last = i + 1 == comps.len();
                    let op = if last && !src_is_dir { touch(&cur) } else { mkdir(&cur, 0o755) };
                    push(op, format!("create mount target {shown}"), shown.clone());
                }
            }
            None => match exists(&dst) {
                None if !in_root => {
                    return Err(Error::invalid(
                        "mounts",
                        format!("mount target {shown} does not exist on the host root, which is read-only; mount a Tmpfs on a parent first or pick an existing path"),
                    ))
                }
                None => {
                    return Err(Error::invalid("mounts", format!("mount target {shown} does not exist in rootfs {}", show(&root))))
                }
                Some(is_dir) if is_dir != src_is_dir => {
                    let (want, got) = if src_is_dir { ("a directory", "a file") } else { ("a file", "a directory") };
                    return Err(Error::invalid("mounts", format!("mount target {shown} is {got} but the source is {want}")));
                }
                Some(_) => {}
            },
        }
        match m {
            Mount::Bind { src, readonly, .. } => {
                let attrs = NOSUID_NODEV | if *readonly { MOUNT_ATTR_RDONLY } else { 0 };
                let step = format!("bind {} -> {shown}", show(src));
                let (tree, attrs) = if fs.prepare_trees {
                    prepare.push(PrepareTree {
                        src: c(src.clone()),
                        recursive: true,
                        attrs,
                        idmap: true,
                        step: step.clone(),
                        overlay: None,
                    });
                    (Tree::Prepared(prepare.len() - 1), 0)
                } else {
                    (Tree::Path(c(src.clone())), attrs)
                };
                push(FsOp::Bind { tree, dst: c(dst.clone()), recursive: true, attrs }, step, show(src));
            }
            Mount::Tmpfs { size, .. } => {
                push(
                    tmpfs(&dst, MountFlags::NOSUID | MountFlags::NODEV, "0755", *size),
                    format!("mount tmpfs {shown}"),
                    shown.clone(),
                );
                fresh.push(dst.clone());
            }
            Mount::Overlay { src, .. } => {
                let step = format!("overlay {} -> {shown}", show(src));
                let n = uppers.len();
                let (upper_dir, work) = (c(format!("m{n}")), c(format!("mw{n}")));
                if !have_upper {
                    let tmpfs = Upper::Tmpfs { size: fs.overlay_size.map(|s| c(s.to_string())) };
                    if fs.prepare_trees {
                        upper = Some(tmpfs);
                    } else {
                        push(FsOp::OverlayUpper(tmpfs), "overlay upper".into(), "tmpfs".into());
                    }
                    have_upper = true;
                }
                let attrs = NOSUID_NODEV;
                let op = if fs.prepare_trees {
                    // As a Bind: idmapped, so the caller's files are the same ids inside.
                    let layer = OverlayLayer {
                        upper: upper_dir.clone(),
                        work,
                        mkdirs: vec![],
                        owner: Some(fs.root_ids),
                        attrs,
                    };
                    prepare.push(PrepareTree {
                        src: c(src.clone()),
                        recursive: false,
                        attrs: MOUNT_ATTR_RDONLY | NOSUID_NODEV,
                        idmap: true,
                        step: step.clone(),
                        overlay: Some(layer),
                    });
                    FsOp::Bind {
                        tree: Tree::Prepared(prepare.len() - 1),
                        dst: c(dst.clone()),
                        recursive: false,
                        attrs: 0,
                    }
                } else {
                    let lower = c(src.clone());
                    FsOp::Overlay {
                        lower,
                        dst: c(dst.clone()),
                        upper: upper_dir.clone(),
                        work,
                        mkdirs: vec![],
                        userxattr: fs.userxattr,
                        attrs,
                    }
                };
                uppers.push((c(dst.clone()), upper_dir));
                push(op, step, show(src));
            }
        }
    }
    if !in_place || !hold_host_trees(&mut steps) {
        steps.push(FsStep { op: FsOp::PivotRoot, step: "pivot_root".into(), path: show(&root) });
    }
    Ok(FsPlan { own_net, cgroup_dirs, steps, prepare, upper, uppers })
}

/// For a root in place: every bind of a host path takes a clone the child makes first (after
/// `MakePrivate`, before `RootInPlace` sets the root's attributes and before any mount
/// covers the path), as the original tree under a stacked clone would still show it. False
/// when there are more than [`MAX_HELD`], or an overlay whose lower (a host directory the
/// child opens when it mounts it) a mount made before could cover: the root in place is
/// then a clone stacked on `/` again, for the caller to pivot to.
fn hold_host_trees(steps: &mut Vec<FsStep>) -> bool {
    let Some(at) = steps.iter().position(|s| matches!(s.op, FsOp::RootInPlace { .. })) else { return false };
    let binds: Vec<usize> = (0..steps.len())
        .filter(|&i| matches!(&steps[i].op, FsOp::Bind { tree: Tree::Path(p), .. } if p.as_bytes().starts_with(b"/")))
        .collect();
    if binds.len() > MAX_HELD || steps.iter().any(|s| matches!(s.op, FsOp::Overlay { .. })) {
        let FsOp::RootInPlace { attrs } = steps[at].op else { unreachable!() };
        steps[at].op = FsOp::EnterRoot { tree: Tree::Path(c("/")), attrs };
        return false;
    }
    let mut holds = Vec::with_capacity(binds.len());
    for (slot, &i) in binds.iter().enumerate() {
        let FsStep { op: FsOp::Bind { tree, recursive, .. }, step, path: shown } = &mut steps[i] else {
            unreachable!()
        };
        let Tree::Path(path) = std::mem::replace(tree, Tree::Held(slot)) else { unreachable!() };
        let op = FsOp::HoldTree { path, recursive: *recursive, slot };
        holds.push(FsStep { op, step: step.clone(), path: shown.clone() });
    }
    steps.splice(at..at, holds);
    true
}

/// The overlay root (BenchExec's approach to the host root): `/` (the root tree) and each
/// submount a user can see below it, as an overlay of its own where the file system can be
/// one and the root is writable, else bound read-only (with what is mounted below it), all
/// over one upper filesystem. `missing`: mount points the root lacks, made in the upper
/// layer (then the root stays read-only: only they are nsfast's). A root caller's overlays
/// are made by the parent (see [`OverlayLayer`]): the steps and `upper` it returns are for
/// [`FsPlan`]; a rootless caller's by the child (an [`FsOp::OverlayUpper`] step first).
fn overlay_steps(
    fs: &FsSpec,
    probes: &Probes,
    root: &[u8],
    missing: &[&str],
    prepare: &mut Vec<PrepareTree>,
) -> Result<(Vec<FsStep>, Option<Upper>)> {
    let in_root = fs.rootfs.is_some();
    let writable = fs.overlay.is_some();
    let kept = fs.overlay.as_ref().and_then(|o| o.upper);
    let by_parent = fs.prepare_trees;
    let split = !in_root && !by_parent;
    if split && kept.is_some() {
        return Err(Error::invalid(
            "overlay_upper",
            "on the host root needs a root caller (a rootless caller's overlay of the host root is one overlay per \
             directory, not one upper directory)",
        ));
    }
    let upper = match kept {
        Some(dir) => {
            if !dir.starts_with(b"/") || dir.contains(&0) {
                return Err(Error::invalid("overlay_upper", format!("must be an absolute path: {}", show(dir))));
            }
            if (probes.host)(dir) != Some(true) {
                return Err(Error::invalid("overlay_upper", format!("is not an existing directory: {}", show(dir))));
            }
            Upper::Dir(c(dir))
        }
        None => {
            let size = if writable { fs.overlay.as_ref().and_then(|o| o.size) } else { Some(MOUNTPOINTS_SIZE) };
            Upper::Tmpfs { size: size.map(|s| c(s.to_string())) }
        }
    };
    let mut steps = Vec::new();
    let plan_upper = if by_parent {
        Some(upper)
    } else {
        let shown = kept.map(show).unwrap_or_else(|| "tmpfs".into());
        steps.push(FsStep { op: FsOp::OverlayUpper(upper), step: "overlay upper".into(), path: shown });
        None
    };
    let dirs =
        |n: usize| if kept.is_some() { (c("upper"), c("work")) } else { (c(format!("u{n}")), c(format!("w{n}"))) };
    let attrs = NOSUID_NODEV | if writable { 0 } else { MOUNT_ATTR_RDONLY };
    if split {
        let size = fs.overlay.as_ref().and_then(|o| o.size).map(|s| c(s.to_string()));
        steps.push(FsStep { op: FsOp::EnterTmpfsRoot { size }, step: "mount the root tmpfs".into(), path: "/".into() });
        let mut covered: Vec<Vec<u8>> = vec![b"proc".to_vec(), b"dev".to_vec(), b"tmp".to_vec()];
        for h in fs.hidden {
            covered.push(sandbox_path("hidden", h)?.0);
        }
        let subs = (probes.submounts)(b"/");
        let mut n = 0;
        split_steps(probes, b"", &subs, &covered, &mut steps, &mut n, &dirs, fs.userxattr, attrs);
        return Ok((steps, None));
    }
    // One overlay: `lower` at `dst` ("" for the root).
    let overlay = |n: usize, src: &[u8], dst: &[u8], mkdirs: Vec<CString>, prepare: &mut Vec<PrepareTree>| {
        let shown = if dst.is_empty() { "/".to_string() } else { format!("/{}", show(dst)) };
        let step = format!("overlay {shown}");
        let (upper, work) = dirs(n);
        let op = if by_parent {
            // A rootfs is idmapped as in a Bind; the host root is not: its files are nobody's
            // inside (root's secrets stay unreadable, writes go where any user may write).
            let idmap = in_root;
            let owner = in_root.then_some(fs.root_ids);
            let layer = OverlayLayer { upper, work, mkdirs, owner, attrs };
            let lower_attrs = MOUNT_ATTR_RDONLY | NOSUID_NODEV;
            prepare.push(PrepareTree {
                src: c(src),
                recursive: false,
                attrs: lower_attrs,
                idmap,
                step: step.clone(),
                overlay: Some(layer),
            });
            let tree = Tree::Prepared(prepare.len() - 1);
            if dst.is_empty() {
                FsOp::EnterRoot { tree, attrs: 0 }
            } else {
                FsOp::Bind { tree, dst: c(dst), recursive: false, attrs: 0 }
            }
        } else {
            FsOp::Overlay { lower: c(src), dst: c(dst), upper, work, mkdirs, userxattr: fs.userxattr, attrs }
        };
        FsStep { op, step, path: show(src) }
    };
    steps.push(overlay(0, root, b"", missing.iter().map(|d| c(*d)).collect(), prepare));

    let under = |p: &[u8], base: &[u8]| p == base || (p.starts_with(base) && p.get(base.len()) == Some(&b'/'));
    // Replaced anyway (and what a fresh /proc or /dev holds is not the host's).
    let mut covered: Vec<Vec<u8>> = vec![b"proc".to_vec(), b"dev".to_vec(), b"tmp".to_vec()];
    if !in_root {
        for h in fs.hidden {
            covered.push(sandbox_path("hidden", h)?.0);
        }
    }
    let mut n = 0;
    for (rel, fstype) in (probes.submounts)(root) {
        if rel.is_empty() || rel.contains(&0) || covered.iter().any(|b| under(&rel, b)) {
            continue;
        }
        let mut src = root.to_vec();
        if !src.ends_with(b"/") {
            src.push(b'/');
        }
        src.extend_from_slice(&rel);
        if writable && kept.is_none() && OVERLAYABLE.contains(&fstype.as_str()) {
            n += 1;
            let st = overlay(n, &src, &rel, vec![], prepare);
            steps.push(FsStep { op: FsOp::Cover(Box::new(st.op)), ..st });
        } else {
            let shown = format!("/{}", show(&rel));
            let sealed = MOUNT_ATTR_RDONLY | NOSUID_NODEV;
            let (tree, a) = if by_parent && in_root {
                let step = format!("bind {shown}");
                prepare.push(PrepareTree {
                    src: c(src.clone()),
                    recursive: true,
                    attrs: sealed,
                    idmap: true,
                    step,
                    overlay: None,
                });
                (Tree::Prepared(prepare.len() - 1), 0)
            } else {
                (Tree::Path(c(src.clone())), sealed)
            };
            let op = FsOp::Cover(Box::new(FsOp::Bind { tree, dst: c(rel.clone()), recursive: true, attrs: a }));
            steps.push(FsStep { op, step: format!("bind {shown}"), path: show(&src) });
            covered.push(rel);
        }
    }
    Ok((steps, plan_upper))
}

/// A rootless caller's overlay of the host root, directory by directory: in its user
/// namespace the kernel refuses an overlay (or a clone) of a tree whose submounts it locked
/// (clone_private_mount: /proc, /sys, ... below `/`), so the root is a tmpfs skeleton (new
/// top-level entries land there) holding, for each entry of `rel` on the host: a symlink as
/// it is, a directory with no mount below it as an overlay of its own, one with mounts below
/// it split the same way, a mount an overlay cannot sit on bound read-only, a file bound
/// read-only. `covered` directories only get their mount point (nsfast mounts on them).
#[allow(clippy::too_many_arguments)]
fn split_steps(
    probes: &Probes,
    rel: &[u8],
    subs: &[(Vec<u8>, String)],
    covered: &[Vec<u8>],
    steps: &mut Vec<FsStep>,
    n: &mut usize,
    dirs: &dyn Fn(usize) -> (CString, CString),
    userxattr: bool,
    attrs: u64,
) {
    let under = |p: &[u8], base: &[u8]| p.starts_with(base) && p.get(base.len()) == Some(&b'/');
    let host = |r: &[u8]| [b"/", r].concat();
    let sealed = MOUNT_ATTR_RDONLY | NOSUID_NODEV;
    for e in (probes.list_dir)(&host(rel)) {
        let r = if rel.is_empty() { e.name.clone() } else { [rel, b"/", &e.name].concat() };
        let shown = format!("/{}", show(&r));
        let (parent, name) = split(&r);
        let mut push = |op: FsOp, step: String| steps.push(FsStep { op, step, path: shown.clone() });
        match e.kind {
            b'l' => push(FsOp::Symlink { target: c(e.target.clone()), parent, name }, format!("symlink {shown}")),
            b'f' => {
                push(FsOp::Touch { parent, name }, format!("create {shown}"));
                let tree = Tree::Path(c(host(&r)));
                push(FsOp::Bind { tree, dst: c(r.clone()), recursive: false, attrs: sealed }, format!("bind {shown}"));
            }
            b'd' => {
                push(FsOp::Mkdir { parent, name, mode: e.mode & 0o7777 }, format!("mkdir {shown}"));
                if covered.iter().any(|b| *b == r || under(&r, b)) {
                    continue;
                }
                let at = subs.iter().find(|(p, _)| *p == r);
                if at.is_some_and(|(_, t)| !OVERLAYABLE.contains(&t.as_str())) {
                    let tree = Tree::Path(c(host(&r)));
                    push(
                        FsOp::Bind { tree, dst: c(r.clone()), recursive: true, attrs: sealed },
                        format!("bind {shown}"),
                    );
                } else if subs.iter().any(|(p, _)| under(p, &r)) {
                    split_steps(probes, &r, subs, covered, steps, n, dirs, userxattr, attrs);
                } else {
                    let (upper, work) = dirs(*n);
                    *n += 1;
                    let lower = c(host(&r));
                    let op = FsOp::Overlay { lower, dst: c(r.clone()), upper, work, mkdirs: vec![], userxattr, attrs };
                    push(op, format!("overlay {shown}"));
                }
            }
            _ => {}
        }
    }
}

/// runc's masks on a fresh /proc (and any other masked path): what they name must not be
/// readable, whatever the sandbox's ids. `kind`: is the (relative) path a directory, a
/// file, or missing (skipped).
fn mask_steps(
    masked: &[Vec<u8>],
    readonly_paths: &[Vec<u8>],
    kind: &dyn Fn(&[u8]) -> Option<bool>,
) -> Result<Vec<FsStep>> {
    let sealed = MOUNT_ATTR_RDONLY | NOSUID_NODEV | MOUNT_ATTR_NOEXEC;
    let mut steps = Vec::new();
    for p in masked {
        let (rel, shown) = sandbox_path("masked_paths", p)?;
        let op = match kind(&rel) {
            None => continue,
            Some(true) => tmpfs(
                &rel,
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                "0555",
                Some(4096),
            ),
            // /dev/null, as runc: reads are empty (so it keeps nodev off, like the other nodes).
            Some(false) => FsOp::Bind {
                tree: Tree::Path(c("dev/null")),
                dst: c(rel.clone()),
                recursive: false,
                attrs: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
            },
        };
        steps.push(FsStep { op, step: format!("mask {shown}"), path: shown });
    }
    for p in readonly_paths {
        let (rel, shown) = sandbox_path("readonly_paths", p)?;
        if kind(&rel).is_some() {
            steps.push(FsStep {
                op: FsOp::Bind { tree: Tree::Path(c(rel.clone())), dst: c(rel), recursive: true, attrs: sealed },
                step: format!("remount {shown} read-only"),
                path: shown,
            });
        }
    }
    Ok(steps)
}

/// What a zygote task mounts in its own mount namespace, a copy of the zygote's (whose root
/// is already the sandbox's, private, with /dev in place), with the task's cwd at that root:
/// a fresh /proc of its pid namespace with the masks, an empty /dev/shm and /tmp.
pub fn task_steps(
    masked: &[Vec<u8>],
    readonly_paths: &[Vec<u8>],
    tmp_size: Option<u64>,
    shm_size: Option<u64>,
    scratch: &[Scratch],
    probe: &dyn Fn(&[u8]) -> Option<bool>,
) -> Result<Vec<FsStep>> {
    let mut steps = vec![FsStep {
        op: FsOp::Mount {
            fstype: c("proc"),
            dst: c("proc"),
            flags: MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            data: c(""),
        },
        step: "mount /proc".into(),
        path: "/proc".into(),
    }];
    steps.extend(mask_steps(masked, readonly_paths, &|rel: &[u8]| probe(&[b"/", rel].concat()))?);
    if probe(b"/dev/shm") == Some(true) {
        steps.push(FsStep {
            op: tmpfs(b"dev/shm", MountFlags::NOSUID | MountFlags::NODEV, "1777", shm_size),
            step: "mount /dev/shm".into(),
            path: "/dev/shm".into(),
        });
    }
    steps.push(FsStep {
        op: tmpfs(b"tmp", MountFlags::NOSUID | MountFlags::NODEV, "1777", tmp_size),
        step: "mount /tmp".into(),
        path: "/tmp".into(),
    });
    for sc in scratch {
        let (rel, shown) = sandbox_path("mounts", &sc.path)?;
        if probe(&sc.path) != Some(true) {
            continue;
        }
        steps.push(FsStep {
            op: tmpfs(&rel, MountFlags::NOSUID | MountFlags::NODEV, &sc.mode, sc.size),
            step: format!("mount tmpfs {shown}"),
            path: shown,
        });
    }
    Ok(steps)
}

/// A directory each zygote task gets an empty tmpfs of its own on (a hidden directory, a
/// spec's Tmpfs), as its sandbox would have had.
#[derive(Debug, Clone)]
pub struct Scratch {
    pub path: Vec<u8>,
    pub size: Option<u64>,
    pub mode: String,
}

/// Child-safe: an O_PATH fd of `path` (relative to the cwd, the new root) resolved with the
/// new root as "/" (symlinks cannot lead out of it, magic links are refused).
fn at_root(path: &CStr) -> std::result::Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        CWD,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Child-safe: "/proc/self/fd/N" in `buf`, to mount onto what an O_PATH fd names.
fn fd_path(buf: &mut [u8; 32], fd: i32) -> &CStr {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = fd.max(0) as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"")
}

/// open_tree(2) flags for a clone (of the tree below too when `recursive`).
fn clone_flags(recursive: bool) -> OpenTreeFlags {
    let how = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        how | OpenTreeFlags::AT_RECURSIVE
    } else {
        how
    }
}

/// Child-safe: a clone of `tree` (a host path, a path in the new root, or a prepared fd).
fn open_tree<'a>(
    tree: &Tree,
    recursive: bool,
    prepared: &'a [RawFd],
    held: &mut [Option<OwnedFd>],
    owned: &'a mut Option<OwnedFd>,
) -> std::result::Result<BorrowedFd<'a>, Errno> {
    let how = clone_flags(recursive);
    match tree {
        // SAFETY: the prepared trees' fds stay open (the parent holds them) until the child execs.
        Tree::Prepared(i) => prepared.get(*i).map(|&fd| unsafe { sys::borrow_fd(fd) }).ok_or(Errno::BADF),
        // Each held clone serves one bind: taken out of its slot.
        Tree::Held(i) => {
            let fd = held.get_mut(*i).and_then(Option::take).ok_or(Errno::BADF)?;
            let fd: &'a OwnedFd = Option::insert(owned, fd);
            Ok(fd.as_fd())
        }
        Tree::Path(p) if p.to_bytes().starts_with(b"/") => {
            let fd: &'a OwnedFd = Option::insert(owned, rustix::mount::open_tree(CWD, p.as_c_str(), how)?);
            Ok(fd.as_fd())
        }
        Tree::Path(p) => {
            let at = at_root(p)?;
            let fd: &'a OwnedFd =
                Option::insert(owned, rustix::mount::open_tree(&at, c"", how | OpenTreeFlags::AT_EMPTY_PATH)?);
            Ok(fd.as_fd())
        }
    }
}

/// Child-safe: mount(2) a fresh `fstype` on `dst` (in the new root).
fn mount_at(fstype: &CStr, dst: &CStr, flags: MountFlags, data: &CStr) -> std::result::Result<(), Errno> {
    let target = at_root(dst)?;
    let mut buf = [0u8; 32];
    let at = fd_path(&mut buf, target.as_raw_fd());
    rustix::mount::mount(fstype, at, fstype, flags, Some(data))
}

/// Child-safe: run one step. `prepared`: the fds of the parent's [`PrepareTree`]s; `state`:
/// what earlier steps left for later ones.
pub fn run(op: &FsOp, prepared: &[RawFd], state: &mut FsState) -> std::result::Result<(), Errno> {
    match op {
        FsOp::MakePrivate => {
            rustix::mount::mount_change(c"/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)
        }
        FsOp::EnterRoot { tree, attrs } => {
            let mut owned = None;
            let tree = open_tree(tree, true, prepared, &mut state.held, &mut owned)?;
            if *attrs != 0 {
                sys::mount_setattr(tree.as_raw_fd(), c"", *attrs, true)?;
            }
            rustix::mount::move_mount(tree, c"", CWD, c"/", MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)?;
            rustix::process::fchdir(tree)
        }
        FsOp::Mount { fstype, dst, flags, data } => mount_at(fstype, dst, *flags, data),
        FsOp::Bind { tree, dst, recursive, attrs } => {
            let mut owned = None;
            let tree = open_tree(tree, *recursive, prepared, &mut state.held, &mut owned)?;
            if *attrs != 0 {
                sys::mount_setattr(tree.as_raw_fd(), c"", *attrs, *recursive)?;
            }
            let target = at_root(dst)?;
            let both = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH;
            rustix::mount::move_mount(tree, c"", &target, c"", both)
        }
        FsOp::Mkdir { parent, name, mode } => {
            let dir = at_root(parent)?;
            match rustix::fs::mkdirat(&dir, name.as_c_str(), Mode::from_raw_mode(*mode)) {
                Ok(()) | Err(Errno::EXIST) => Ok(()),
                Err(e) => Err(e),
            }
        }
        FsOp::Touch { parent, name } => {
            let dir = at_root(parent)?;
            let flags = OFlags::CREATE | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            rustix::fs::openat(&dir, name.as_c_str(), flags, Mode::from_raw_mode(0o644)).map(drop)
        }
        FsOp::Symlink { target, parent, name } => {
            let dir = at_root(parent)?;
            rustix::fs::symlinkat(target.as_c_str(), &dir, name.as_c_str())
        }
        FsOp::SetAttr { path, attrs } => {
            let target = at_root(path)?;
            sys::mount_setattr(target.as_raw_fd(), c"", *attrs, false)
        }
        FsOp::HoldTree { path, recursive, slot } => {
            let tree = rustix::mount::open_tree(CWD, path.as_c_str(), clone_flags(*recursive))?;
            *state.held.get_mut(*slot).ok_or(Errno::INVAL)? = Some(tree);
            Ok(())
        }
        FsOp::RootInPlace { attrs } => {
            let root = rustix::fs::open(c"/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
            if *attrs != 0 {
                sys::mount_setattr(root.as_raw_fd(), c"", *attrs, true)?;
            }
            rustix::process::fchdir(&root)
        }
        FsOp::PivotRoot => {
            rustix::process::pivot_root(c".", c".")?;
            rustix::mount::unmount(c".", UnmountFlags::DETACH)?;
            rustix::process::chdir(c"/")
        }
        FsOp::OverlayUpper(upper) => {
            state.upper = Some(make_upper(upper)?);
            Ok(())
        }
        FsOp::CgroupDir { bit, .. } | FsOp::CgroupLink { bit, .. } if state.own_cgroups & (1 << bit) == 0 => Ok(()),
        FsOp::CgroupDir { parent, name, dst, fstype, data, .. } => {
            if !name.is_empty() {
                let dir = at_root(parent)?;
                match rustix::fs::mkdirat(&dir, name.as_c_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
            }
            let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
            mount_at(fstype, dst, flags, data)
        }
        FsOp::CgroupLink { target, parent, name, .. } => {
            let dir = at_root(parent)?;
            rustix::fs::symlinkat(target.as_c_str(), &dir, name.as_c_str())
        }
        FsOp::FreshSys if state.pooled_net => Ok(()),
        FsOp::FreshSys => {
            let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
            mount_at(c"sysfs", c"sys", flags, c"")
        }
        FsOp::Cover(op) => match run(op, prepared, state) {
            Err(Errno::ACCESS) => Ok(()),
            other => other,
        },
        FsOp::EnterTmpfsRoot { size } => {
            let m = fresh_tmpfs(size.as_deref())?;
            rustix::mount::move_mount(&m, c"", CWD, c"/", MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)?;
            rustix::process::fchdir(&m)
        }
        FsOp::Overlay { lower, dst, upper: upper_name, work, mkdirs, userxattr, attrs } => {
            let up = state.upper.as_ref().ok_or(Errno::BADF)?;
            let (upper, work) = (upper_dir(up, upper_name)?, upper_dir(up, work)?);
            for d in mkdirs {
                upper_dir(&upper, d)?;
            }
            // The directory itself, not a clone of its tree: the overlay clones what it needs.
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let lower = rustix::fs::openat(CWD, lower.as_c_str(), flags, Mode::empty())?;
            // The merged top directory shows its upper's mode: the lower's (it stays the
            // sandbox's own, the one owner this child can give it).
            let mode = Mode::from_raw_mode(rustix::fs::fstat(&lower)?.st_mode & 0o7777);
            rustix::fs::chmodat(up, upper_name.as_c_str(), mode, rustix::fs::AtFlags::empty())?;
            let m = overlay_mount(lower.as_fd(), upper.as_fd(), work.as_fd(), *userxattr, *attrs)?;
            if dst.is_empty() {
                rustix::mount::move_mount(&m, c"", CWD, c"/", MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)?;
                rustix::process::fchdir(&m)
            } else {
                let target = at_root(dst)?;
                let both = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH;
                rustix::mount::move_mount(&m, c"", &target, c"", both)
            }
        }
    }
}

/// Child-safe: directory `name` of `dir`, made if missing, never through a symlink.
fn upper_dir(dir: impl AsFd, name: &CStr) -> std::result::Result<OwnedFd, Errno> {
    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(&dir, name, flags, Mode::empty())
}

/// Child-safe: a detached overlayfs mount of these layers (as fds) with mount `attrs`.
fn overlay_mount(
    lower: BorrowedFd<'_>,
    upper: BorrowedFd<'_>,
    work: BorrowedFd<'_>,
    userxattr: bool,
    attrs: u64,
) -> std::result::Result<OwnedFd, Errno> {
    let ovl = rustix::mount::fsopen(c"overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for (key, fd) in [(c"lowerdir+", lower), (c"upperdir", upper), (c"workdir", work)] {
        match rustix::mount::fsconfig_set_fd(&ovl, key, fd) {
            // Before Linux 6.13 layers are paths only: the fd's, through /proc.
            Err(Errno::INVAL) => {
                let mut buf = [0u8; 32];
                rustix::mount::fsconfig_set_string(&ovl, key, fd_path(&mut buf, fd.as_raw_fd()))?
            }
            other => other?,
        }
    }
    if userxattr {
        rustix::mount::fsconfig_set_flag(&ovl, c"userxattr")?;
    }
    // Changes as plain files, whiteouts and opaque directories only (what Result.changes and
    // a commit read back): no redirects, no metadata-only copy-ups.
    rustix::mount::fsconfig_set_string(&ovl, c"redirect_dir", c"nofollow")?;
    rustix::mount::fsconfig_set_string(&ovl, c"metacopy", c"off")?;
    rustix::mount::fsconfig_create(&ovl)?;
    rustix::mount::fsmount(&ovl, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::from_bits_retain(attrs as u32))
}

/// Child-safe: a detached fresh tmpfs (nosuid, nodev) of `size` bytes.
fn fresh_tmpfs(size: Option<&CStr>) -> std::result::Result<OwnedFd, Errno> {
    let fs = rustix::mount::fsopen(c"tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    rustix::mount::fsconfig_set_string(&fs, c"mode", c"0755")?;
    if let Some(size) = size {
        rustix::mount::fsconfig_set_string(&fs, c"size", size)?;
    }
    rustix::mount::fsconfig_create(&fs)?;
    let attrs = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
    rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
}

/// The upper filesystem of overlays: a fresh tmpfs, or a clone of a host directory's tree.
fn make_upper(upper: &Upper) -> std::result::Result<OwnedFd, Errno> {
    match upper {
        Upper::Tmpfs { size } => fresh_tmpfs(size.as_deref()),
        Upper::Dir(dir) => rustix::mount::open_tree(
            CWD,
            dir.as_c_str(),
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        ),
    }
}

/// Child-safe: an O_PATH fd of the tree mounted at `path` (resolved in the new root).
pub fn tree_root(path: &CStr) -> std::result::Result<OwnedFd, Errno> {
    at_root(path)
}

/// Child-safe: the upper filesystem this child made for its overlays, if it did.
pub fn own_upper(state: &FsState) -> Option<BorrowedFd<'_>> {
    state.upper.as_ref().map(|u| u.as_fd())
}

/// Child-safe: an overlay's upper directory `name`, where this child made the overlay.
pub fn upper_root(state: &FsState, name: &CStr) -> Option<std::result::Result<OwnedFd, Errno>> {
    let up = state.upper.as_ref()?;
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Some(rustix::fs::openat(up, name, flags, Mode::empty()))
}

/// Child-safe: chdir to `path` resolved inside the root (after pivot_root: the sandbox's):
/// a symlink cannot lead out of it, and a magic link (`/proc/self/fd/N`, `/proc/PID/cwd`)
/// is refused with ELOOP.
pub fn chdir_in_root(path: &CStr) -> std::result::Result<(), Errno> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let dir =
        rustix::fs::openat2(CWD, path, flags, Mode::empty(), ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS)?;
    rustix::process::fchdir(&dir)
}

/// Parent side: open and configure a [`PrepareTree`]. `idmap_userns`: the user namespace
/// whose id mapping an idmapped tree uses.
pub fn prepare(
    p: &PrepareTree,
    idmap_userns: Option<BorrowedFd>,
    upper: Option<BorrowedFd>,
) -> std::result::Result<OwnedFd, Errno> {
    let mut how = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if p.recursive {
        how |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(CWD, p.src.as_c_str(), how)?;
    let userns = if p.idmap { idmap_userns.map(|fd| fd.as_raw_fd()) } else { None };
    sys::mount_setattr_detached(tree.as_raw_fd(), p.attrs, p.recursive, userns)?;
    let Some(o) = &p.overlay else { return Ok(tree) };
    let up = upper.ok_or(Errno::BADF)?;
    let (upper, work) = (upper_dir(up, &o.upper)?, upper_dir(up, &o.work)?);
    // The merged root shows its upper directory's mode and owner: the lower root's (a
    // world-writable, sticky /tmp-like submount stays so), owned by `owner` if given.
    let st = rustix::fs::fstat(&tree)?;
    let (uid, gid) = o.owner.unwrap_or((st.st_uid, st.st_gid));
    let ids = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
    rustix::fs::chownat(up, o.upper.as_c_str(), Some(ids.0), Some(ids.1), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
    rustix::fs::chmodat(
        up,
        o.upper.as_c_str(),
        Mode::from_raw_mode(st.st_mode & 0o7777),
        rustix::fs::AtFlags::empty(),
    )?;
    for d in &o.mkdirs {
        upper_dir(&upper, d)?;
    }
    let m = overlay_mount(tree.as_fd(), upper.as_fd(), work.as_fd(), false, o.attrs);
    // The overlay holds a private clone of its lower: ours only waits for an RCU grace
    // period when closed (see `crate::reaper`).
    crate::reaper::drop_later(vec![tree]);
    m
}

/// Parent side: the upper filesystem of the plan's prepared overlays.
pub fn prepare_upper(upper: &Upper) -> std::result::Result<OwnedFd, Errno> {
    make_upper(upper)
}

/// How a path in a sandbox's writable tree is resolved by the parent: inside the tree (its
/// root is "/", `..` stops there, absolute symlinks are relative to it), no magic link, no
/// other mount: whatever the sandbox planted, or swaps while we read, leads nowhere else.
const TREE_RESOLVE: ResolveFlags =
    ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS).union(ResolveFlags::NO_XDEV);

/// Parent side: regular file `path` in the tree `root`, open for reading (None: missing or
/// not a regular file). The type is checked on an O_PATH fd before anything opens the file
/// itself (a FIFO, socket or device the sandbox made is never opened: none can block or
/// fail the caller); the reopen through that fd reaches the same inode, whatever the
/// sandbox renames meanwhile.
pub fn tree_open(root: BorrowedFd<'_>, path: &[u8]) -> std::io::Result<Option<OwnedFd>> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat2(root, path, flags, Mode::empty(), TREE_RESOLVE) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != rustix::fs::FileType::RegularFile {
        return Ok(None);
    }
    let mut buf = [0u8; 32];
    let again = fd_path(&mut buf, fd.as_raw_fd());
    let flags = OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    Ok(Some(rustix::fs::open(again, flags, Mode::empty())?))
}

/// Parent side: the contents of regular file `path` in the tree `root` (None: missing or
/// not a regular file); more than `max` bytes is EFBIG (checked on its size first, then
/// while reading: nothing past `max` + 1 bytes is ever held).
pub fn tree_read(root: BorrowedFd<'_>, path: &[u8], max: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let Some(fd) = tree_open(root, path)? else { return Ok(None) };
    let size = rustix::fs::fstat(&fd)?.st_size as u64;
    if size > max {
        return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
    }
    let mut data = Vec::new();
    data.try_reserve_exact(size as usize).map_err(|_| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    std::fs::File::from(fd).take(max.saturating_add(1)).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
    }
    Ok(Some(data))
}

/// Parent side: directory `path` below the caller's directory `dir`, opened by the kernel
/// without following any symlink, leaving `dir` or crossing a mount (`RESOLVE_BENEATH`,
/// `RESOLVE_NO_SYMLINKS`, `RESOLVE_NO_XDEV`: ELOOP, EXDEV): what a commit walks in the
/// host's `src`, which the sandbox's changes shape.
pub fn dir_beneath(dir: BorrowedFd<'_>, path: &[u8]) -> std::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let how = ResolveFlags::BENEATH
        .union(ResolveFlags::NO_SYMLINKS)
        .union(ResolveFlags::NO_XDEV)
        .union(ResolveFlags::NO_MAGICLINKS);
    Ok(rustix::fs::openat2(dir, path, flags, Mode::empty(), how)?)
}

/// Parent side: the entries of directory `path` in the tree `root` (empty if it is missing
/// or not a directory): (name, kind, permission bits). Kinds: b'd' directory, b'D' an
/// overlayfs opaque directory (it hides the lower one's entries), b'f' regular file, b'l'
/// symlink, b'w' an overlayfs whiteout (a 0/0 character device: deleted), b'o' other.
/// `userxattr`: the overlay keeps its marks in `user.overlay.*` (one made in a user
/// namespace), else in `trusted.overlay.*`; the other namespace is the sandbox's own data.
/// `max_bytes`: the most the listing may cost the caller, each entry its name plus
/// [`ENTRY_COST`]; a directory whose listing costs more is `EFBIG`, found before more than
/// that is held (a sandbox may leave a million entries in one directory).
pub fn tree_list(
    root: BorrowedFd<'_>,
    path: &[u8],
    userxattr: bool,
    max_bytes: Option<u64>,
) -> std::io::Result<Vec<(Vec<u8>, u8, u32)>> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat2(root, path, flags, Mode::empty(), TREE_RESOLVE) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    let mut left = max_bytes.unwrap_or(u64::MAX);
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let cost = ENTRY_COST + name.len() as u64;
        left = left.checked_sub(cost).ok_or(Errno::FBIG)?;
        use rustix::fs::FileType;
        let Ok(st) = rustix::fs::statat(&fd, entry.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW) else {
            continue; // gone meanwhile
        };
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory if opaque(&fd, entry.file_name(), userxattr) => b'D',
            FileType::Directory => b'd',
            FileType::RegularFile => b'f',
            FileType::Symlink => b'l',
            FileType::CharacterDevice if st.st_rdev == 0 => b'w',
            _ => b'o',
        };
        out.push((name.to_vec(), kind, st.st_mode & 0o7777));
    }
    Ok(out)
}

/// What one entry of a listing read back by the caller costs besides its name: about what
/// its (name, kind, mode) tuple and its place in a list or dict take in the caller.
pub const ENTRY_COST: u64 = 256;

/// Whether directory `name` of `dir` is marked opaque by overlayfs (trusted.* for an
/// overlay of the initial user namespace, user.* with userxattr). Only the overlay's own
/// namespace counts: through a trusted.* overlay the sandbox may set `user.overlay.opaque`
/// on any directory, which the overlay stores as it is (while a userxattr overlay escapes
/// what the sandbox sets in user.overlay.*).
fn opaque(dir: &OwnedFd, name: &CStr, userxattr: bool) -> bool {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let Ok(d) = rustix::fs::openat(dir, name, flags, Mode::empty()) else { return false };
    let mut v = [0u8; 2];
    let key = if userxattr { c"user.overlay.opaque" } else { c"trusted.overlay.opaque" };
    matches!(rustix::fs::fgetxattr(&d, key, &mut v), Ok(1) if v[0] == b'y')
}

/// Parent side: the target of symlink `path` in the tree `root` (None: not a symlink).
pub fn tree_readlink(root: BorrowedFd<'_>, path: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat2(root, path, flags, Mode::empty(), TREE_RESOLVE) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match rustix::fs::readlinkat(&fd, c"", Vec::new()) {
        Ok(t) => Ok(Some(t.into_bytes())),
        Err(Errno::NOENT | Errno::INVAL) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Parent side: write `data` to `path` in the tree `root` (created with `mode`, or
/// truncated; a symlink as its last component is refused, ELOOP), as `owner` (host ids: the
/// sandbox's root for a root caller, whose trees' file systems map no other ids).
pub fn tree_write(
    root: BorrowedFd<'_>,
    path: &[u8],
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    use std::io::Write;
    let _ids = owner.map(|(uid, gid)| sys::FsIds::set(uid, gid));
    // Non-blocking and not truncated at open: a FIFO the sandbox put there (or swaps in)
    // fails the open (ENXIO, no reader) or the type check, never blocks the caller; nothing
    // but a regular file is truncated.
    let flags =
        OFlags::WRONLY | OFlags::CREATE | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat2(root, path, flags, Mode::from_raw_mode(mode), TREE_RESOLVE) {
        Err(Errno::NXIO) => return Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        other => other?,
    };
    if rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    rustix::fs::ftruncate(&fd, 0)?;
    rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
    std::fs::File::from(fd).write_all(data)
}

/// Paths in a plan as the tests see them.
#[cfg(test)]
fn cstr(s: &CStr) -> &str {
    s.to_str().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(path: &[u8]) -> Option<bool> {
        match path {
            b"/" | b"/srv" | b"/home/u/data" | b"/rootfs" | b"/rootfs/proc" | b"/rootfs/work" | b"/opt" | b"/run"
            | b"/home" | b"/proc/sys" | b"/proc/acpi" | b"/full" | b"/full/proc" | b"/full/dev" | b"/full/tmp"
            | b"/sys" | b"/sys/firmware" | b"/sys/fs/cgroup" | b"/full/sys" => Some(true),
            b"/etc/hosts" | b"/rootfs/etc/hosts" | b"/proc/kcore" => Some(false),
            _ => None,
        }
    }

    fn in_root(root: &[u8], rel: &[u8]) -> Option<bool> {
        let mut p = root.to_vec();
        p.push(b'/');
        p.extend_from_slice(rel);
        host(&p)
    }

    fn spec<'a>(rootfs: Option<&'a [u8]>, mounts: &'a [Mount]) -> FsSpec<'a> {
        FsSpec {
            rootfs,
            readonly: true,
            mounts,
            masked: &[],
            readonly_paths: &[],
            hidden: &[],
            tmp_size: Some(1 << 20),
            shm_size: None,
            prepare_trees: false,
            root_ids: (7, 7),
            fresh_proc: true,
            cgroup2: false,
            fresh_sys: false,
            cgroup_view: None,
            overlay: None,
            overlay_size: None,
            userxattr: true,
            root_in_place: false,
        }
    }

    fn submounts(root: &[u8]) -> Vec<(Vec<u8>, String)> {
        let all = [
            ("proc", "proc"),
            ("sys", "sysfs"),
            ("dev", "devtmpfs"),
            ("dev/shm", "tmpfs"),
            ("srv", "ext4"),
            ("sys/fs/cgroup", "cgroup2"),
            ("srv/data", "xfs"),
            ("home", "ext4"),
            ("tmp", "tmpfs"),
        ];
        if root != b"/" {
            return vec![];
        }
        all.iter().map(|(p, t)| (p.as_bytes().to_vec(), t.to_string())).collect()
    }

    fn list_dir(dir: &[u8]) -> Vec<HostEntry> {
        let e = |name: &str, kind: u8, target: &str| HostEntry {
            name: name.as_bytes().to_vec(),
            kind,
            mode: 0o755,
            target: target.as_bytes().to_vec(),
        };
        match dir {
            b"/" => vec![e("bin", b'l', "usr/bin"), e("etc", b'd', ""), e("home", b'd', ""), e("srv", b'd', "")],
            b"/srv" => vec![e("data", b'd', "")],
            _ => vec![],
        }
    }

    fn probes() -> Probes<'static> {
        Probes { host: &host, in_root: &in_root, is_link: &|_, _| false, submounts: &submounts, list_dir: &list_dir }
    }

    fn steps(rootfs: Option<&[u8]>, mounts: &[Mount]) -> Result<Vec<FsStep>> {
        plan(&spec(rootfs, mounts), &probes()).map(|p| p.steps)
    }

    #[test]
    fn a_fresh_sys_and_the_sandboxes_own_cgroups_come_before_the_masks() {
        let view = CgroupView {
            v2_top: false,
            dirs: vec![(b"memory".to_vec(), "cgroup", b"memory".to_vec()), (b"unified".to_vec(), "cgroup2", vec![])],
            links: vec![(b"mem".to_vec(), b"memory".to_vec())],
        };
        let masked = [b"/sys/firmware".to_vec()];
        let mut fs = spec(None, &[]);
        fs.fresh_sys = true;
        fs.cgroup_view = Some(&view);
        fs.masked = &masked;
        let p = plan(&fs, &probes()).unwrap();
        assert!(!p.own_net, "the host root falls back on the host's /sys in a pooled namespace");
        assert_eq!(p.cgroup_dirs, [b"memory".to_vec(), b"unified".to_vec()]);
        let names: Vec<&str> = p.steps.iter().map(|s| s.step.as_str()).collect();
        let at = |n: &str| names.iter().position(|s| *s == n).unwrap_or_else(|| panic!("no {n}: {names:?}"));
        let order = [
            "mount /sys",
            "mount /sys/fs/cgroup",
            "mount /sys/fs/cgroup/memory",
            "mount /sys/fs/cgroup/unified",
            "symlink /sys/fs/cgroup/mem",
            "remount /sys/fs/cgroup read-only",
            "mask /sys/firmware",
        ];
        assert!(order.windows(2).all(|w| at(w[0]) < at(w[1])), "{names:?}");
        assert_eq!(p.steps[at("mount /sys")].op, FsOp::FreshSys);
        let bits: Vec<(u8, &str, &str)> = p
            .steps
            .iter()
            .filter_map(|st| match &st.op {
                FsOp::CgroupDir { bit, fstype, data, .. } => Some((*bit, cstr(fstype), cstr(data))),
                FsOp::CgroupLink { bit, target, .. } => Some((*bit, "link", cstr(target))),
                _ => None,
            })
            .collect();
        assert_eq!(bits, [(0, "cgroup", "memory"), (1, "cgroup2", ""), (0, "link", "memory")]);

        // A rootfs with /sys: its fresh sysfs is what the view needs (no pooled namespace).
        let mut fs = spec(Some(b"/full"), &[]);
        fs.fresh_sys = true;
        fs.cgroup_view = Some(&view);
        let p = plan(&fs, &probes()).unwrap();
        assert!(p.own_net && p.steps.iter().any(|st| st.op == FsOp::FreshSys) && p.cgroup_dirs.len() == 2);
        // ... without one, neither; nor without a network namespace (nothing to fall back on).
        for (root, fresh) in [(&b"/rootfs"[..], true), (&b"/full"[..], false)] {
            let mut fs = spec(Some(root), &[]);
            fs.fresh_sys = fresh;
            fs.cgroup_view = Some(&view);
            let p = plan(&fs, &probes()).unwrap();
            assert!(!p.own_net && p.cgroup_dirs.is_empty());
            assert!(!p.steps.iter().any(|st| st.path.starts_with("/sys")), "{:?}", p.steps);
        }
        // delegate_cgroup mounts its own cgroup2, read-write, and no view.
        let mut fs = spec(None, &[]);
        fs.cgroup_view = Some(&view);
        fs.cgroup2 = true;
        assert!(plan(&fs, &probes()).unwrap().cgroup_dirs.is_empty());

        // Pure cgroup2: the tmpfs sealed, then the hierarchy itself on it (bit 0, name "").
        let v2 = CgroupView { v2_top: true, ..Default::default() };
        let mut fs = spec(None, &[]);
        fs.cgroup_view = Some(&v2);
        let p = plan(&fs, &probes()).unwrap();
        assert_eq!(p.cgroup_dirs, [Vec::<u8>::new()]);
        let tail: Vec<&FsStep> = p.steps.iter().filter(|st| st.path == "/sys/fs/cgroup").collect();
        assert!(matches!(&tail[0].op, FsOp::Mount { fstype, .. } if cstr(fstype) == "tmpfs"));
        assert!(matches!(&tail[1].op, FsOp::SetAttr { attrs, .. } if attrs & MOUNT_ATTR_RDONLY != 0));
        assert!(matches!(&tail[2].op, FsOp::CgroupDir { bit: 0, name, .. } if name.is_empty()));
    }

    #[test]
    fn a_host_root_in_place_holds_its_host_sources_first_and_never_pivots() {
        let m = [Mount::Bind { src: b"/home/u/data".to_vec(), dst: b"/srv".to_vec(), readonly: true }];
        let mut fs = spec(None, &m);
        fs.root_in_place = true;
        let s = plan(&fs, &probes()).unwrap().steps;
        assert_eq!(s[0].op, FsOp::MakePrivate);
        let attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        let at = s.iter().position(|st| st.op == FsOp::RootInPlace { attrs }).expect("a root in place");
        // Every host path a bind takes is held before the root's attributes change and
        // before any mount could cover it; each held clone serves exactly its own bind.
        let holds: Vec<(String, usize)> = s[1..at]
            .iter()
            .map(|st| match &st.op {
                FsOp::HoldTree { path, slot, .. } => (cstr(path).to_string(), *slot),
                other => panic!("not a hold before the root: {other:?}"),
            })
            .collect();
        assert_eq!(holds.len(), DEV_NODES.len() + 1);
        for (path, slot) in &holds {
            let users: Vec<_> =
                s.iter().filter(|st| matches!(&st.op, FsOp::Bind { tree: Tree::Held(k), .. } if k == slot)).collect();
            assert_eq!(users.len(), 1, "{path}");
            assert_eq!(users[0].step, s[1 + holds.iter().position(|(p, _)| p == path).unwrap()].step, "{path}");
        }
        assert!(holds.iter().any(|(p, _)| p == "/dev/null") && holds.iter().any(|(p, _)| p == "/home/u/data"));
        assert!(!s
            .iter()
            .any(|st| matches!(&st.op, FsOp::Bind { tree: Tree::Path(p), .. } if p.as_bytes().starts_with(b"/"))));
        assert!(!s.iter().any(|st| matches!(st.op, FsOp::PivotRoot | FsOp::EnterRoot { .. })));
    }

    #[test]
    fn a_root_in_place_falls_back_to_a_pivot_where_it_cannot_hold_what_it_needs() {
        let pivots = |fs: &FsSpec| {
            let s = plan(fs, &probes()).unwrap().steps;
            let none_held = !s.iter().any(|st| matches!(st.op, FsOp::HoldTree { .. } | FsOp::RootInPlace { .. }));
            none_held && s.last().unwrap().op == FsOp::PivotRoot
        };
        let bind = |i: usize| Mount::Bind {
            src: b"/home/u/data".to_vec(),
            dst: format!("/run/b{i}").into_bytes(),
            readonly: true,
        };
        let run = [Mount::Tmpfs { dst: b"/run".to_vec(), size: None }];
        let many: Vec<Mount> = run.iter().cloned().chain((0..MAX_HELD).map(bind)).collect();
        let few: Vec<Mount> = run.iter().cloned().chain((0..MAX_HELD - DEV_NODES.len()).map(bind)).collect();
        let overlay = [Mount::Overlay { src: b"/srv".to_vec(), dst: b"/opt".to_vec(), commit: false }];
        for (mounts, rootfs, want) in [
            (&few[..], None, false),
            (&many[..], None, true),
            (&overlay[..], None, true),
            (&[][..], Some(&b"/rootfs"[..]), true),
        ] {
            let mut fs = spec(rootfs, mounts);
            fs.root_in_place = true;
            assert_eq!(pivots(&fs), want, "{} mounts, rootfs {rootfs:?}", mounts.len());
        }
        let mut fs = spec(None, &[]);
        fs.root_in_place = true;
        fs.overlay = Some(OverlaySpec { size: None, upper: None });
        assert!(!plan(&fs, &probes()).unwrap().steps.iter().any(|st| matches!(st.op, FsOp::RootInPlace { .. })));
    }

    #[test]
    fn default_plan_reads_top_down() {
        let s = steps(None, &[]).unwrap();
        assert_eq!(s[0].op, FsOp::MakePrivate);
        let attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        assert_eq!(s[1].op, FsOp::EnterRoot { tree: Tree::Path(c("/")), attrs });
        assert_eq!(s[2].step, "mount /proc");
        assert_eq!(s.last().unwrap().op, FsOp::PivotRoot);
        let binds: Vec<&str> = s
            .iter()
            .filter_map(|st| match &st.op {
                FsOp::Bind { dst, attrs, .. } => {
                    assert_ne!(attrs & MOUNT_ATTR_NOSUID, 0, "{st:?}");
                    Some(cstr(dst))
                }
                _ => None,
            })
            .collect();
        assert_eq!(binds, ["dev/null", "dev/zero", "dev/full", "dev/random", "dev/urandom", "dev/tty"]);
        assert!(s.iter().any(|st| matches!(&st.op, FsOp::SetAttr { path, attrs } if cstr(path) == "dev" && attrs & MOUNT_ATTR_RDONLY != 0)));
        assert!(s.iter().any(|st| matches!(&st.op, FsOp::Mount { dst, data, .. } if cstr(dst) == "tmp" && cstr(data) == "mode=1777,size=1048576")));
        // Every fresh filesystem is nosuid and nodev.
        for st in &s {
            if let FsOp::Mount { flags, .. } = &st.op {
                assert!(flags.contains(MountFlags::NOSUID | MountFlags::NODEV), "{st:?}");
            }
        }
    }

    #[test]
    fn masks_hidden_dirs_and_readonly_paths() {
        let masked = [b"/proc/kcore".to_vec(), b"/proc/acpi".to_vec(), b"/proc/missing".to_vec()];
        let ro = [b"/proc/sys".to_vec()];
        let hidden = [b"/run".to_vec(), b"/home".to_vec(), b"/tmp".to_vec(), b"/nonexistent".to_vec()];
        let mut fs = spec(None, &[]);
        fs.masked = &masked;
        fs.readonly_paths = &ro;
        fs.hidden = &hidden;
        let s = plan(&fs, &probes()).unwrap().steps;
        let names: Vec<&str> = s.iter().map(|st| st.step.as_str()).collect();
        for want in ["mask /proc/kcore", "mask /proc/acpi", "remount /proc/sys read-only", "hide /run", "hide /home"] {
            assert!(names.contains(&want), "{want} missing in {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("missing") || n.contains("nonexistent") || *n == "hide /tmp"),
            "{names:?}"
        );
        let kcore = s.iter().find(|st| st.step == "mask /proc/kcore").unwrap();
        assert!(matches!(&kcore.op, FsOp::Bind { tree: Tree::Path(p), .. } if cstr(p) == "dev/null"));
        // In a rootfs nothing of the host is hidden (there is none of it).
        let mut fs = spec(Some(b"/rootfs"), &[]);
        fs.hidden = &hidden;
        let s = plan(&fs, &probes()).unwrap().steps;
        assert!(!s.iter().any(|st| st.step.starts_with("hide")));
    }

    #[test]
    fn rootfs_mountpoints_come_from_an_overlay_not_the_users_directory() {
        // /rootfs has proc but no dev or tmp: they are made in a small tmpfs upper layer and
        // the merged root stays read-only; nothing is created in /rootfs.
        let s = steps(Some(b"/rootfs"), &[]).unwrap();
        assert_eq!(s[1].op, FsOp::OverlayUpper(Upper::Tmpfs { size: Some(c(MOUNTPOINTS_SIZE.to_string())) }));
        let attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        assert_eq!(
            s[2].op,
            FsOp::Overlay {
                lower: c("/rootfs"),
                dst: c(""),
                upper: c("u0"),
                work: c("w0"),
                mkdirs: vec![c("dev"), c("tmp")],
                userxattr: true,
                attrs,
            }
        );
        // A rootfs that has them is bound as it is.
        let s = steps(Some(b"/full"), &[]).unwrap();
        assert!(matches!(&s[1].op, FsOp::EnterRoot { tree: Tree::Path(p), .. } if cstr(p) == "/full"), "{:?}", s[1]);
        // Writable without an overlay: refused rather than written into.
        let mut fs = spec(Some(b"/rootfs"), &[]);
        fs.readonly = false;
        let e = plan(&fs, &probes()).unwrap_err().to_string();
        assert!(e.contains("has no /dev, /tmp") && e.contains("overlay=True"), "{e}");
    }

    #[test]
    fn overlay_covers_every_submount_of_the_host_root() {
        let mut fs = spec(None, &[]);
        fs.overlay = Some(OverlaySpec { size: Some(1 << 20), upper: None });
        fs.readonly = false;
        fs.prepare_trees = true;
        let hidden = [b"/home".to_vec()];
        fs.hidden = &hidden;
        let p = plan(&fs, &probes()).unwrap();
        assert_eq!(p.upper, Some(Upper::Tmpfs { size: Some(c("1048576")) }));
        let prep: Vec<(&str, bool, bool)> =
            p.prepare.iter().map(|t| (cstr(&t.src), t.overlay.is_some(), t.recursive)).collect();
        // /srv (ext4) and /srv/data (xfs) get overlays of their own; /sys (sysfs) is bound
        // read-only with its cgroup below it; /proc, /dev, /tmp and the hidden /home are not
        // the host's anyway.
        assert_eq!(prep, [("/", true, false), ("/srv", true, false), ("/srv/data", true, false)]);
        let binds: Vec<(&str, u64)> = p
            .steps
            .iter()
            .filter_map(|st| match &st.op {
                FsOp::Cover(op) => match &**op {
                    FsOp::Bind { tree: Tree::Path(src), attrs, recursive: true, .. } => Some((cstr(src), *attrs)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(binds, [("/sys", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)]);
        // Each submount's cover (its overlay, or the bind) is skipped where the sandbox
        // cannot reach it; the root's overlay is not.
        let covers: Vec<&str> =
            p.steps.iter().filter(|st| matches!(st.op, FsOp::Cover(_))).map(|st| st.step.as_str()).collect();
        assert_eq!(covers, ["bind /sys", "overlay /srv", "overlay /srv/data"]);
        assert_eq!(p.steps[1].op, FsOp::EnterRoot { tree: Tree::Prepared(0), attrs: 0 });
        let layers: Vec<&OverlayLayer> = p.prepare.iter().filter_map(|t| t.overlay.as_ref()).collect();
        assert_eq!(layers.iter().map(|l| cstr(&l.upper)).collect::<Vec<_>>(), ["u0", "u1", "u2"]);
        // The host root's files stay nobody's inside: not idmapped, root dir not chowned.
        assert!(p.prepare.iter().all(|t| !t.idmap) && layers.iter().all(|l| l.owner.is_none()));
        assert!(layers.iter().all(|l| l.attrs == MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV));
        // Rootless: a tmpfs root with one overlay per host directory (the kernel refuses an
        // overlay of a tree with locked submounts), covered ones only made as mount points.
        fs.prepare_trees = false;
        let p = plan(&fs, &probes()).unwrap();
        assert!(p.prepare.is_empty() && p.upper.is_none() && p.uppers.is_empty());
        assert!(matches!(p.steps[1].op, FsOp::OverlayUpper(_)));
        assert!(matches!(p.steps[2].op, FsOp::EnterTmpfsRoot { .. }));
        let ops: Vec<String> = p.steps[3..].iter().take(7).map(|s| s.step.clone()).collect();
        assert_eq!(
            ops,
            [
                "symlink /bin",
                "mkdir /etc",
                "overlay /etc",
                "mkdir /home",
                "mkdir /srv",
                "mkdir /srv/data",
                "overlay /srv/data"
            ]
        );
    }

    #[test]
    fn overlay_upper_dir_keeps_the_changes_of_the_root_only() {
        let mut fs = spec(Some(b"/full"), &[]);
        fs.overlay = Some(OverlaySpec { size: None, upper: Some(b"/opt") });
        fs.readonly = false;
        let s = plan(&fs, &probes()).unwrap().steps;
        assert_eq!(s[1].op, FsOp::OverlayUpper(Upper::Dir(c("/opt"))));
        assert!(matches!(&s[2].op, FsOp::Overlay { upper, work, attrs, .. }
            if cstr(upper) == "upper" && cstr(work) == "work" && attrs & MOUNT_ATTR_RDONLY == 0));
        fs.overlay = Some(OverlaySpec { size: None, upper: Some(b"/nonexistent") });
        let e = plan(&fs, &probes()).unwrap_err().to_string();
        assert!(e.contains("overlay_upper: is not an existing directory"), "{e}");
    }

    #[test]
    fn prepared_trees_move_the_opening_to_the_parent() {
        let m = [Mount::Bind { src: b"/home/u/data".to_vec(), dst: b"/work".to_vec(), readonly: false }];
        let mut fs = spec(Some(b"/rootfs"), &m);
        fs.prepare_trees = true;
        let p = plan(&fs, &probes()).unwrap();
        assert_eq!(p.prepare.len(), 2);
        assert!(p.prepare[0].idmap && p.prepare[1].idmap);
        assert_eq!(p.prepare[1].attrs, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV);
        // Its missing mount points: in the parent's overlay (upper "u0"), the root read-only.
        let o = p.prepare[0].overlay.as_ref().unwrap();
        assert_eq!((cstr(&o.upper), o.mkdirs.clone()), ("u0", vec![c("dev"), c("tmp")]));
        assert_eq!(o.owner, Some((7, 7)));
        assert_eq!(p.steps[1].op, FsOp::EnterRoot { tree: Tree::Prepared(0), attrs: 0 });
        assert!(p
            .steps
            .iter()
            .any(|st| st.op == FsOp::Bind { tree: Tree::Prepared(1), dst: c("work"), recursive: true, attrs: 0 }));
    }

    #[test]
    fn user_mounts_are_checked_and_placed() {
        let m = [
            Mount::Bind { src: b"/home/u/data".to_vec(), dst: b"/srv/".to_vec(), readonly: true },
            Mount::Tmpfs { dst: b"/opt".to_vec(), size: Some(1 << 20) },
            Mount::Bind { src: b"/etc/hosts".to_vec(), dst: b"/opt/x/hosts".to_vec(), readonly: false },
        ];
        let s = steps(None, &m).unwrap();
        let tail: Vec<&FsOp> = s.iter().rev().skip(1).take(5).map(|st| &st.op).collect();
        let rw = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        assert_eq!(
            *tail[0],
            FsOp::Bind { tree: Tree::Path(c("/etc/hosts")), dst: c("opt/x/hosts"), recursive: true, attrs: rw }
        );
        assert_eq!(*tail[1], FsOp::Touch { parent: c("opt/x"), name: c("hosts") });
        assert_eq!(*tail[2], FsOp::Mkdir { parent: c("opt"), name: c("x"), mode: 0o755 });
        assert!(
            matches!(tail[3], FsOp::Mount { dst, data, .. } if cstr(dst) == "opt" && cstr(data) == "mode=0755,size=1048576")
        );
        assert_eq!(
            *tail[4],
            FsOp::Bind {
                tree: Tree::Path(c("/home/u/data")),
                dst: c("srv"),
                recursive: true,
                attrs: rw | MOUNT_ATTR_RDONLY
            }
        );
    }

    #[test]
    fn bad_mounts_name_what_is_wrong() {
        let cases: [(Option<&[u8]>, Mount, &str); 6] = [
            (
                None,
                Mount::Bind { src: b"/nope".to_vec(), dst: b"/srv".to_vec(), readonly: true },
                "bind source does not exist: /nope",
            ),
            (None, Mount::Bind { src: b"rel".to_vec(), dst: b"/srv".to_vec(), readonly: true }, "absolute"),
            (None, Mount::Tmpfs { dst: b"srv".to_vec(), size: None }, "absolute path"),
            (None, Mount::Tmpfs { dst: b"/srv/../etc".to_vec(), size: None }, "'..'"),
            (None, Mount::Tmpfs { dst: b"/missing".to_vec(), size: None }, "/missing does not exist"),
            (
                None,
                Mount::Bind { src: b"/etc/hosts".to_vec(), dst: b"/srv".to_vec(), readonly: true },
                "is a directory but the source is a file",
            ),
        ];
        for (root, m, want) in cases {
            let err = steps(root, &[m]).err().unwrap().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
            assert!(err.starts_with("mounts"), "{err}");
        }
        assert!(steps(Some(b"/nope"), &[]).err().unwrap().to_string().contains("rootfs: does not exist: /nope"));
        assert!(steps(Some(b"/etc/hosts"), &[]).err().unwrap().to_string().contains("not a directory"));
    }

    #[test]
    fn rootfs_symlinks_at_mountpoints_are_refused() {
        let links = |_: &[u8], rel: &[u8]| rel == b"dev";
        let err = plan(
            &spec(Some(b"/rootfs"), &[]),
            &Probes { host: &host, in_root: &in_root, is_link: &links, submounts: &submounts, list_dir: &list_dir },
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("symlink at /dev"), "{err}");
    }

    #[test]
    fn fd_paths_are_proc_self_fd() {
        let mut buf = [0u8; 32];
        assert_eq!(fd_path(&mut buf, 1234), c"/proc/self/fd/1234");
        assert_eq!(fd_path(&mut buf, 0), c"/proc/self/fd/0");
    }

    #[test]
    fn normalize_target_rejects_escapes() {
        assert_eq!(normalize_target(b"/a//b/./c/"), Some(b"a/b/c".to_vec()));
        assert_eq!(normalize_target(b"a"), None);
        assert_eq!(normalize_target(b"/a/../b"), None);
        assert_eq!(normalize_target(b"/"), Some(vec![]));
    }

    #[test]
    fn split_names_parent_and_leaf() {
        assert_eq!(split(b"a/b/c"), (c("a/b"), c("c")));
        assert_eq!(split(b"c"), (c("."), c("c")));
    }
}
