//! The filesystem of a sandbox: a plan of mount steps built in the parent (pure, tested
//! without root) and their execution in the child (child-safe: no allocation).
//!
//! Shape of the result, whatever the root: the root tree (host `/` or `rootfs`, recursive,
//! read-only by default) cloned with open_tree(2) and stacked on top of `/`, a fresh `/proc`,
//! a minimal `/dev` (device nodes bound from the host, a private `/dev/shm`), an empty tmpfs
//! on `/tmp`, the user's mounts, then `pivot_root(".", ".")` and a lazy unmount of the old
//! root. Propagation is made private first, so the host's mount table never changes.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags};

use crate::error::{Error, Result};
use crate::spec::Mount;
use crate::sys;

/// One step of the plan. Paths inside the new root are relative (the child's cwd is the new
/// root from `EnterRoot` on); host paths are absolute (the process root is still the host's).
#[derive(Debug, PartialEq, Eq)]
pub enum FsOp {
    /// Make every mount private (recursive), so nothing propagates to the host.
    MakePrivate,
    /// Clone the tree at `src`, create `ensure_dirs` in it if missing, make it read-only
    /// (recursive) if asked, attach it on top of `/` and chdir into it.
    EnterRoot { src: CString, readonly: bool, ensure_dirs: Vec<CString> },
    /// mount(2) of a filesystem. `in_root`: resolve `dst` inside the new root
    /// (RESOLVE_IN_ROOT), for targets in a user's rootfs, whose symlinks we do not trust.
    Mount { fstype: CString, dst: CString, flags: MountFlags, data: CString, in_root: bool },
    /// Bind `src` onto `dst` (recursive when asked), read-only when asked.
    Bind { src: CString, dst: CString, recursive: bool, readonly: bool, in_root: bool },
    Mkdir { path: CString, mode: u32 },
    Touch { path: CString },
    Symlink { target: CString, link: CString },
    /// Make one mount read-only (not its submounts).
    ReadOnly { path: CString },
    /// pivot_root(".", "."), detach the old root, chdir("/").
    PivotRoot,
}

/// A step with what the error message calls it: `step` (e.g. "mount /proc") and `path`.
#[derive(Debug)]
pub struct FsStep {
    pub op: FsOp,
    pub step: String,
    pub path: String,
}

const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const DEV_LINKS: [(&str, &str); 4] =
    [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")];

fn c(s: impl Into<Vec<u8>>) -> CString {
    CString::new(s).expect("plan paths are checked for NUL bytes")
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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

/// `(root, path inside it)` -> None if it does not exist, else whether it is a directory.
pub type InRootProbe<'a> = &'a dyn Fn(&[u8], &[u8]) -> Option<bool>;

/// What the planner may ask about the filesystem.
pub struct Probes<'a> {
    /// A host path: None if it does not exist, else whether it is a directory.
    pub host: &'a dyn Fn(&[u8]) -> Option<bool>,
    /// A path inside `rootfs`, resolved as the sandbox sees it (symlinks stay inside the
    /// root, RESOLVE_IN_ROOT).
    pub in_root: InRootProbe<'a>,
    /// A path inside `rootfs`: is it itself a symlink?
    pub is_link: &'a dyn Fn(&[u8], &[u8]) -> bool,
}

/// Build the filesystem plan. `rootfs` None means the host root.
pub fn plan(rootfs: Option<&[u8]>, readonly: bool, mounts: &[Mount], probes: &Probes) -> Result<Vec<FsStep>> {
    let probe = probes.host;
    let mut steps = Vec::new();
    let mut push = |op: FsOp, step: String, path: String| steps.push(FsStep { op, step, path });

    let root: Vec<u8> = match rootfs {
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
    // Inside-path -> host path, to check that mount targets exist.
    let host_path = |rel: &[u8]| -> Vec<u8> {
        let mut p = root.clone();
        if !p.ends_with(b"/") {
            p.push(b'/');
        }
        p.extend_from_slice(rel);
        p
    };

    // A user's rootfs: targets resolve inside it, as the sandbox will see them.
    let in_root = rootfs.is_some();
    let exists = |rel: &[u8]| if in_root { (probes.in_root)(&root, rel) } else { probe(&host_path(rel)) };
    if in_root {
        for d in ["proc", "dev", "tmp"] {
            if (probes.is_link)(&root, d.as_bytes()) {
                return Err(Error::invalid("rootfs", format!("has a symlink at /{d}; nsfast mounts a fresh {d} there and needs a directory or nothing")));
            }
        }
    }

    push(FsOp::MakePrivate, "make / private".into(), "/".into());
    let ensure_dirs =
        if in_root { ["proc", "dev", "tmp"].iter().filter(|d| exists(d.as_bytes()).is_none()).map(|d| c(*d)).collect() } else { vec![] };
    push(
        FsOp::EnterRoot { src: c(root.clone()), readonly, ensure_dirs },
        "bind root".into(),
        show(&root),
    );
    push(
        FsOp::Mount {
            fstype: c("proc"),
            dst: c("proc"),
            flags: MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            data: c(""),
            in_root: false,
        },
        "mount /proc".into(),
        "/proc".into(),
    );
    push(
        FsOp::Mount { fstype: c("tmpfs"), dst: c("dev"), flags: MountFlags::NOSUID | MountFlags::NOEXEC, data: c("mode=0755,size=64k"), in_root: false },
        "mount /dev".into(),
        "/dev".into(),
    );
    for node in DEV_NODES {
        let dst = format!("dev/{node}");
        push(FsOp::Touch { path: c(dst.clone()) }, format!("create /{dst}"), format!("/{dst}"));
        push(
            FsOp::Bind { src: c(format!("/dev/{node}")), dst: c(dst.clone()), recursive: false, readonly: false, in_root: false },
            format!("bind /{dst}"),
            format!("/{dst}"),
        );
    }
    for (name, target) in DEV_LINKS {
        push(FsOp::Symlink { target: c(target), link: c(format!("dev/{name}")) }, format!("symlink /dev/{name}"), format!("/dev/{name}"));
    }
    push(FsOp::Mkdir { path: c("dev/shm"), mode: 0o755 }, "mkdir /dev/shm".into(), "/dev/shm".into());
    push(
        FsOp::Mount { fstype: c("tmpfs"), dst: c("dev/shm"), flags: MountFlags::NOSUID | MountFlags::NODEV, data: c("mode=1777"), in_root: false },
        "mount /dev/shm".into(),
        "/dev/shm".into(),
    );
    push(FsOp::ReadOnly { path: c("dev") }, "remount /dev read-only".into(), "/dev".into());
    push(
        FsOp::Mount { fstype: c("tmpfs"), dst: c("tmp"), flags: MountFlags::NOSUID | MountFlags::NODEV, data: c("mode=1777"), in_root: false },
        "mount /tmp".into(),
        "/tmp".into(),
    );

    // Directories that are fresh tmpfs: targets below them are created on the fly.
    let mut fresh: Vec<Vec<u8>> = vec![b"tmp".to_vec(), b"dev/shm".to_vec()];
    for m in mounts {
        let (dst_raw, src_is_dir) = match m {
            Mount::Bind { src, dst, .. } => {
                if !src.starts_with(b"/") || src.contains(&0) {
                    return Err(Error::invalid("mounts", format!("bind source must be an absolute path: {}", show(src))));
                }
                match probe(src) {
                    Some(is_dir) => (dst, is_dir),
                    None => return Err(Error::invalid("mounts", format!("bind source does not exist: {}", show(src)))),
                }
            }
            Mount::Tmpfs { dst, .. } => (dst, true),
        };
        let dst = normalize_target(dst_raw).ok_or_else(|| {
            Error::invalid("mounts", format!("mount target must be an absolute path without '..': {}", show(dst_raw)))
        })?;
        if dst.is_empty() {
            return Err(Error::invalid("mounts", "mount target must not be '/' (use rootfs=)"));
        }
        let shown = format!("/{}", show(&dst));
        let under_fresh = fresh.iter().find(|f| dst.starts_with(f) && dst.get(f.len()) == Some(&b'/')).cloned();
        match under_fresh {
            Some(base) => {
                // mkdir -p below the tmpfs, then the target itself.
                let rest = &dst[base.len() + 1..];
                let comps: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
                let mut cur = base.clone();
                for (i, comp) in comps.iter().enumerate() {
                    cur.push(b'/');
                    cur.extend_from_slice(comp);
                    let last = i + 1 == comps.len();
                    let op = if last && !src_is_dir { FsOp::Touch { path: c(cur.clone()) } } else { FsOp::Mkdir { path: c(cur.clone()), mode: 0o755 } };
                    push(op, format!("create mount target {shown}"), shown.clone());
                }
            }
            None => match exists(&dst) {
                None if rootfs.is_none() => {
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
            Mount::Bind { src, readonly, .. } => push(
                FsOp::Bind { src: c(src.clone()), dst: c(dst.clone()), recursive: true, readonly: *readonly, in_root },
                format!("bind {} -> {shown}", show(src)),
                show(src),
            ),
            Mount::Tmpfs { size, .. } => {
                let data = match size {
                    Some(s) => format!("mode=0755,size={s}"),
                    None => "mode=0755".to_owned(),
                };
                push(
                    FsOp::Mount {
                        fstype: c("tmpfs"),
                        dst: c(dst.clone()),
                        flags: MountFlags::NOSUID | MountFlags::NODEV,
                        data: c(data),
                        in_root,
                    },
                    format!("mount tmpfs {shown}"),
                    shown.clone(),
                );
                fresh.push(dst.clone());
            }
        }
    }
    push(FsOp::PivotRoot, "pivot_root".into(), show(&root));
    Ok(steps)
}

/// Child-safe: an O_PATH fd of `path` (relative to the cwd, the new root) resolved with the
/// new root as "/" (symlinks cannot lead out of it).
fn resolve_in_root(path: &CStr) -> std::result::Result<OwnedFd, Errno> {
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

/// Child-safe: run one step.
pub fn run(op: &FsOp) -> std::result::Result<(), Errno> {
    match op {
        FsOp::MakePrivate => rustix::mount::mount_change(c"/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC),
        FsOp::EnterRoot { src, readonly, ensure_dirs } => {
            let tree = rustix::mount::open_tree(
                CWD,
                src.as_c_str(),
                OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_RECURSIVE,
            )?;
            for dir in ensure_dirs {
                match rustix::fs::mkdirat(&tree, dir.as_c_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
            }
            if *readonly {
                use std::os::fd::AsRawFd;
                sys::mount_setattr(tree.as_raw_fd(), c"", sys::MOUNT_ATTR_RDONLY, true)?;
            }
            rustix::mount::move_mount(&tree, c"", CWD, c"/", MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)?;
            rustix::process::fchdir(&tree)
        }
        FsOp::Mount { fstype, dst, flags, data, in_root: true } => {
            let target = resolve_in_root(dst)?;
            let mut buf = [0u8; 32];
            let at = fd_path(&mut buf, target.as_raw_fd());
            rustix::mount::mount(fstype.as_c_str(), at, fstype.as_c_str(), *flags, Some(data.as_c_str()))
        }
        FsOp::Mount { fstype, dst, flags, data, in_root: false } => {
            rustix::mount::mount(fstype.as_c_str(), dst.as_c_str(), fstype.as_c_str(), *flags, Some(data.as_c_str()))
        }
        FsOp::Bind { src, dst, recursive, readonly, in_root: true } => {
            let target = resolve_in_root(dst)?;
            let mut how = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
            if *recursive {
                how |= OpenTreeFlags::AT_RECURSIVE;
            }
            let tree = rustix::mount::open_tree(CWD, src.as_c_str(), how)?;
            if *readonly {
                sys::mount_setattr(tree.as_raw_fd(), c"", sys::MOUNT_ATTR_RDONLY, *recursive)?;
            }
            let both = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH;
            rustix::mount::move_mount(&tree, c"", &target, c"", both)
        }
        FsOp::Bind { src, dst, recursive, readonly, in_root: false } => {
            if *recursive {
                rustix::mount::mount_bind_recursive(src.as_c_str(), dst.as_c_str())?;
            } else {
                rustix::mount::mount_bind(src.as_c_str(), dst.as_c_str())?;
            }
            if *readonly {
                sys::mount_setattr(libc::AT_FDCWD, dst, sys::MOUNT_ATTR_RDONLY, *recursive)?;
            }
            Ok(())
        }
        FsOp::Mkdir { path, mode } => match rustix::fs::mkdir(path.as_c_str(), Mode::from_raw_mode(*mode)) {
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(e),
        },
        FsOp::Touch { path } => {
            rustix::fs::open(path.as_c_str(), OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC, Mode::from_raw_mode(0o644)).map(drop)
        }
        FsOp::Symlink { target, link } => rustix::fs::symlink(target.as_c_str(), link.as_c_str()),
        FsOp::ReadOnly { path } => sys::mount_setattr(libc::AT_FDCWD, path, sys::MOUNT_ATTR_RDONLY, false),
        FsOp::PivotRoot => {
            rustix::process::pivot_root(c".", c".")?;
            rustix::mount::unmount(c".", UnmountFlags::DETACH)?;
            rustix::process::chdir(c"/")
        }
    }
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
            b"/" | b"/srv" | b"/home/u/data" | b"/rootfs" | b"/rootfs/proc" | b"/rootfs/work" | b"/opt" => Some(true),
            b"/etc/hosts" | b"/rootfs/etc/hosts" => Some(false),
            _ => None,
        }
    }

    fn in_root(root: &[u8], rel: &[u8]) -> Option<bool> {
        let mut p = root.to_vec();
        p.push(b'/');
        p.extend_from_slice(rel);
        host(&p)
    }

    fn steps(rootfs: Option<&[u8]>, mounts: &[Mount]) -> Result<Vec<FsStep>> {
        plan(rootfs, true, mounts, &Probes { host: &host, in_root: &in_root, is_link: &|_, _| false })
    }

    #[test]
    fn default_plan_reads_top_down() {
        let s = steps(None, &[]).unwrap();
        assert_eq!(s[0].op, FsOp::MakePrivate);
        assert_eq!(s[1].op, FsOp::EnterRoot { src: c("/"), readonly: true, ensure_dirs: vec![] });
        assert_eq!(s[2].step, "mount /proc");
        assert_eq!(s.last().unwrap().op, FsOp::PivotRoot);
        let binds: Vec<&str> = s
            .iter()
            .filter_map(|st| match &st.op {
                FsOp::Bind { dst, .. } => Some(cstr(dst)),
                _ => None,
            })
            .collect();
        assert_eq!(binds, ["dev/null", "dev/zero", "dev/full", "dev/random", "dev/urandom", "dev/tty"]);
        assert!(s.iter().any(|st| st.op == FsOp::ReadOnly { path: c("dev") }));
    }

    #[test]
    fn rootfs_gets_missing_mountpoints_created() {
        let s = steps(Some(b"/rootfs"), &[]).unwrap();
        assert_eq!(s[1].op, FsOp::EnterRoot { src: c("/rootfs"), readonly: true, ensure_dirs: vec![c("dev"), c("tmp")] });
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
        assert_eq!(*tail[0], FsOp::Bind { src: c("/etc/hosts"), dst: c("opt/x/hosts"), recursive: true, readonly: false, in_root: false });
        assert_eq!(*tail[1], FsOp::Touch { path: c("opt/x/hosts") });
        assert_eq!(*tail[2], FsOp::Mkdir { path: c("opt/x"), mode: 0o755 });
        assert!(matches!(tail[3], FsOp::Mount { dst, data, .. } if cstr(dst) == "opt" && cstr(data) == "mode=0755,size=1048576"));
        assert_eq!(*tail[4], FsOp::Bind { src: c("/home/u/data"), dst: c("srv"), recursive: true, readonly: true, in_root: false });
    }

    #[test]
    fn bad_mounts_name_what_is_wrong() {
        let cases: [(Option<&[u8]>, Mount, &str); 6] = [
            (None, Mount::Bind { src: b"/nope".to_vec(), dst: b"/srv".to_vec(), readonly: true }, "bind source does not exist: /nope"),
            (None, Mount::Bind { src: b"rel".to_vec(), dst: b"/srv".to_vec(), readonly: true }, "absolute"),
            (None, Mount::Tmpfs { dst: b"srv".to_vec(), size: None }, "absolute path"),
            (None, Mount::Tmpfs { dst: b"/srv/../etc".to_vec(), size: None }, "'..'"),
            (None, Mount::Tmpfs { dst: b"/missing".to_vec(), size: None }, "/missing does not exist"),
            (None, Mount::Bind { src: b"/etc/hosts".to_vec(), dst: b"/srv".to_vec(), readonly: true }, "is a directory but the source is a file"),
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
    fn rootfs_targets_resolve_inside_the_root() {
        let m = [Mount::Tmpfs { dst: b"/work".to_vec(), size: None }];
        let s = steps(Some(b"/rootfs"), &m).unwrap();
        assert!(s.iter().any(|st| matches!(&st.op, FsOp::Mount { dst, in_root: true, .. } if cstr(dst) == "work")));
        let links = |_: &[u8], rel: &[u8]| rel == b"dev";
        let err = plan(Some(b"/rootfs"), true, &[], &Probes { host: &host, in_root: &in_root, is_link: &links }).err().unwrap();
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
}
