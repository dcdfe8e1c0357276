//! Starting a sandbox: one clone3 and a setup sequence that reads top-down.
//!
//! The child is created with `CLONE_VM` on a private stack: no page table of the (possibly
//! huge) Python parent is copied, so spawn cost does not grow with the parent's heap. The
//! price is discipline: from clone3 to execve the child only reads the prepared [`Plan`],
//! makes raw system calls, and never allocates, locks, unwinds or touches Python. The
//! parent blocks (GIL released by the caller) until the child's report pipe reaches EOF —
//! which happens exactly when the child has exec'd or died, i.e. has left this address
//! space — and only then frees the stack.
//!
//! Sequence (numbers are the sync points):
//!   parent: clone3(CLONE_VM | CLONE_PIDFD | CLONE_NEW*)
//!   child:  reset signal dispositions, PDEATHSIG
//!   1 parent writes setgroups/uid_map/gid_map, then `go`; child waits for `go`
//!   child:  mounts (private, root tree, /proc, /dev, /tmp, user mounts, pivot_root)
//!           -> sethostname -> lo up -> chdir -> bounding set -> set ids -> caps -> setsid
//!           -> no_new_privs -> stdio -> close fds -> unblock signals -> exec
//!   2 parent reads the report pipe: EOF = exec'd; a record = the step that failed.

use std::ffi::{c_int, c_void, CString};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions};

use rustix::fs::{Mode, OFlags};

use crate::cgroup::Cgroup;
use crate::error::{Error, Result};
use crate::mount;
use crate::spec::{CStrArray, IdMaps, Plan};
use crate::sync::{self, ChildChannel, Step};
use crate::sys::{self, CloneArgs, Stack};

/// The child's stack. It only runs the setup sequence (a few small frames); the mapping is
/// lazily backed, so only the pages touched cost anything.
const STACK_SIZE: usize = 256 * 1024;

/// A started sandbox: its pid in our pid namespace and a pidfd for it.
#[derive(Debug)]
pub struct Child {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// With nsfast-init as the first process: the read end of its status report, which says
    /// how the command ended. Reap `pid`, then pass its status and this fd to
    /// [`command_status`]; close it after.
    pub status: Option<OwnedFd>,
    /// O_PATH fds of the roots of `Io::trees`, in that order: what the sandbox wrote stays
    /// readable through them after it ended (see `mount::tree_read`).
    pub trees: Vec<OwnedFd>,
    /// Mounts nsfast made for this sandbox (a root caller's overlays, their upper tmpfs),
    /// held until it ended so that their teardown happens on `crate::reaper`'s thread, not
    /// in the exit of its pid 1 that the caller waits for. Hand them to
    /// `reaper::drop_later` once the sandbox was reaped.
    pub held: Vec<OwnedFd>,
}

/// The command's wait status, given the reaped first process's `init_status` and (with
/// nsfast-init) the read end of its status report (`Child::status`).
///
/// nsfast-init reports the command's raw wait status right before it exits, as pid 1 of a
/// pid namespace cannot die by a signal from inside. Without a well-formed report (init was
/// killed — `kill()`, a timeout, the OOM killer — or never ran a command), the status is
/// init's own. Never blocks.
pub fn command_status(init_status: c_int, report: Option<std::os::fd::BorrowedFd<'_>>) -> c_int {
    match report.and_then(sync::read_status_report) {
        Some(rep) => rep.status,
        None => init_status,
    }
}

/// What the child needs besides the plan, all plain numbers.
pub struct Io<'a> {
    /// fds to install as 0, 1, 2; -1 keeps the parent's.
    pub stdio: [RawFd; 3],
    /// fds that stay open (at the same number) in the sandbox.
    pub pass_fds: &'a [RawFd],
    /// The sandbox's cgroup: born into it (CLONE_INTO_CGROUP), and/or moved into its v1
    /// cgroups by the child itself before exec.
    pub cgroup: Option<&'a dyn Cgroup>,
    /// Writable trees whose roots the child hands back (paths in the new root, e.g. "tmp";
    /// "//DST" for the upper directory of the overlay on DST, "//" for an overlay root); at
    /// most [`MAX_TREES`].
    pub trees: &'a [CString],
}

/// The most trees one spawn hands back.
pub const MAX_TREES: usize = 32;

struct ChildCtx<'a> {
    plan: &'a Plan,
    io: &'a Io<'a>,
    chan: ChildChannel,
    /// (nsfast-init's memfd, its argv, the write end of its status report).
    init: Option<(RawFd, &'a CStrArray, RawFd)>,
    /// unshare(CLONE_NEWCGROUP) after sync point 1 instead of at clone.
    late_cgroup_ns: bool,
    /// unshare(CLONE_NEWTIME) after sync point 1 (clone(2) cannot carry it); the command
    /// enters the new time namespace at execve.
    late_time_ns: bool,
    /// v1 `tasks` files the child writes "0" to (moves itself in).
    tasks: &'a [RawFd],
    /// The fds of the plan's prepared trees (`mount::PrepareTree`), by number.
    prepared: &'a [RawFd],
    /// Every fd the child needs (sorted): all others are closed before it does anything.
    keep_fds: &'a [RawFd],
    /// A pidfd of the spawning thread (die_with_parent): proves it alive once the death
    /// signal is armed for good (credential changes disarm it).
    parent_pidfd: RawFd,
    /// Our end of the socket the trees' fds go back through (-1: none asked).
    trees_sock: RawFd,
    /// The child was born in a network namespace of `crate::netpool` (its `lo` is up).
    pooled_net: bool,
    /// `mount::FsState::own_cgroups`.
    own_cgroups: u64,
}

/// Open the files a v1 child moves itself in with (see `Cgroup::self_attach_files`).
pub(crate) fn self_attach_files(cgroup: Option<&dyn Cgroup>) -> Result<Vec<OwnedFd>> {
    match cgroup {
        Some(cg) => {
            cg.self_attach_files().map_err(|e| Error::spawn("attach cgroup", Some(e.to_string()), cgroup_errno(&e)))
        }
        None => Ok(Vec::new()),
    }
}

/// Whether the cgroup namespace is made by the child after it is in its cgroup(s), rather
/// than at clone: so it is rooted there when the child is moved in after clone.
fn late_cgroup_ns(clone_flags: u64, moved_after_clone: bool) -> bool {
    moved_after_clone && clone_flags & libc::CLONE_NEWCGROUP as u64 != 0
}

/// Set once clone3 failed with ENOSYS (an older kernel, or a seccomp filter such as nsfast's
/// own): it stays so for the life of the process, so later spawns go straight to `clone`.
static NO_CLONE3: AtomicBool = AtomicBool::new(false);

/// Whether clone3 is known to be missing here (see [`note_no_clone3`]).
pub(crate) fn clone3_missing() -> bool {
    NO_CLONE3.load(Ordering::Relaxed)
}

pub(crate) fn note_no_clone3() {
    NO_CLONE3.store(true, Ordering::Relaxed);
}

/// How the child is started: clone3, or clone(2) where clone3 is ENOSYS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clone {
    Clone3,
    /// clone(2) takes 32 bits of flags, the low 8 of them the exit signal: CLONE_NEWTIME
    /// (0x80) is unshared by the child instead (the command enters it at execve), and
    /// CLONE_INTO_CGROUP (bit 33) is replaced by the parent writing the child's pid to the
    /// cgroup's `cgroup.procs` while the child waits at sync point 1.
    Legacy,
}

/// Start the sandbox described by `plan`. Returns once the command has been exec'd.
pub fn spawn(plan: &Plan, io: &Io) -> Result<Child> {
    if !clone3_missing() {
        match spawn_with(plan, io, Clone::Clone3)? {
            Some(child) => return Ok(child),
            None => note_no_clone3(),
        }
    }
    Ok(spawn_with(plan, io, Clone::Legacy)?.expect("clone(2) is not retried"))
}

/// Which of `dirs` (hierarchies in /sys/fs/cgroup, `mount::FsPlan::cgroup_dirs`) the
/// sandbox's cgroup has a directory in: bit i for `dirs[i]`.
fn own_cgroups(dirs: &[Vec<u8>], cgroup: Option<&dyn Cgroup>) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Some(cg) = cgroup.filter(|_| !dirs.is_empty()) else { return 0 };
    let paths = cg.paths();
    let mut mask = 0;
    for (i, d) in dirs.iter().enumerate() {
        // ("" is /sys/fs/cgroup itself, a pure cgroup2 host's.)
        let prefix =
            if d.is_empty() { b"/sys/fs/cgroup/".to_vec() } else { [&b"/sys/fs/cgroup/"[..], d, b"/"].concat() };
        if paths.iter().any(|p| p.as_os_str().as_bytes().starts_with(&prefix)) {
            mask |= 1 << i;
        }
    }
    mask
}

/// One attempt; `Ok(None)`: clone3 is ENOSYS (nothing was started).
fn spawn_with(plan: &Plan, io: &Io, how: Clone) -> Result<Option<Child>> {
    // (Dropped when this returns: the child has exec'd or died by then.)
    let _dumpable = sys::KeepDumpable::new();
    let legacy = how == Clone::Legacy;
    let cgroup_fd = io.cgroup.and_then(|c| c.clone_fd());
    // Without CLONE_INTO_CGROUP: the parent moves the child in through this file.
    let procs = match cgroup_fd.filter(|_| legacy) {
        Some(fd) => {
            // SAFETY: io.cgroup owns the directory fd and outlives this call.
            let dir = unsafe { sys::borrow_fd(fd) };
            Some(
                rustix::fs::openat(dir, c"cgroup.procs", OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| Error::spawn("attach cgroup", Some("cgroup.procs".into()), e))?,
            )
        }
        None => None,
    };
    let cgroup_fd = cgroup_fd.filter(|_| !legacy);
    let attach = io.cgroup.filter(|c| c.needs_attach());
    let tasks = self_attach_files(io.cgroup)?;
    let tasks_fds: Vec<RawFd> = tasks.iter().map(|f| f.as_raw_fd()).collect();
    if io.trees.len() > MAX_TREES {
        return Err(Error::invalid("outputs", format!("at most {MAX_TREES} writable trees")));
    }
    let (prepared, upper) = prepare_trees(plan)?;
    // The child sends the upper filesystem it makes (a rootless caller's overlays) back with
    // the trees: were its own fd the last, closing it at exec would unmount it there and
    // wait for a grace period in the sandbox's start (see `crate::reaper`).
    let child_upper = plan.fs.steps.iter().any(|s| matches!(s.op, mount::FsOp::OverlayUpper(_)));
    let trees_pair = if io.trees.is_empty() && !child_upper {
        None
    } else {
        use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
        Some(
            socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
                .map_err(|e| Error::spawn("socketpair", None, e))?,
        )
    };
    let trees_sock = trees_pair.as_ref().map_or(-1, |(_, w)| w.as_raw_fd());
    let prepared_fds: Vec<RawFd> = prepared.iter().map(|f| f.as_raw_fd()).collect();
    // Only a change of ids disarms the death signal after `go` proved the parent alive.
    let ids_change = plan.become_root || plan.set_ids.is_some();
    let parent_pidfd = if plan.die_with_parent && ids_change {
        Some(spawning_thread_pidfd().map_err(|e| Error::spawn("pidfd_open", None, e))?)
    } else {
        None
    };
    let parent_pidfd_raw = parent_pidfd.as_ref().map_or(-1, |f| f.as_raw_fd());
    let (mut parent, chan, report_w, go_r) = sync::channel(plan.maps.is_some() || attach.is_some() || procs.is_some())
        .map_err(|e| Error::spawn("pipe", None, e))?;
    let init_argv;
    let mut status_pipe = None;
    let init = if plan.exec.init {
        let fd = init_binary().map_err(|e| Error::spawn("load nsfast-init", None, e))?;
        let (r, w) = sync::status_pipe().map_err(|e| Error::spawn("pipe", None, e))?;
        init_argv = plan.exec.init_argv(chan.report, w.as_raw_fd());
        let w_raw = w.as_raw_fd();
        status_pipe = Some((r, w));
        Some((fd, &init_argv, w_raw))
    } else {
        None
    };
    // stdio -1 keeps the parent's 0, 1, 2.
    let inherited: Vec<RawFd> =
        io.stdio.iter().enumerate().filter(|(_, &fd)| fd < 0).map(|(i, _)| i as RawFd).collect();
    let keep_fds = keep_list(&[
        &[chan.report, chan.go],
        &io.stdio,
        &inherited,
        io.pass_fds,
        &tasks_fds,
        &prepared_fds,
        &[init.map_or(-1, |(fd, _, _)| fd), init.map_or(-1, |(_, _, status)| status), parent_pidfd_raw, trees_sock],
    ]);
    let stack = Stack::new(STACK_SIZE).map_err(|e| Error::spawn("mmap stack", None, errno_of(&e)))?;
    // A network namespace made ahead (`crate::netpool`): the child inherits it from this
    // thread, which is in it from here to the clone only (back in its own when `in_pooled`
    // drops). If the thread cannot enter it (the caller gave up CAP_SYS_ADMIN since the pool
    // made it), the child makes its own at clone, as without a pool.
    let pooled_net = crate::netpool::take(plan);
    let in_pooled = pooled_net.as_ref().and_then(|ns| crate::netpool::enter(ns).ok());
    let ctx = ChildCtx {
        plan,
        io,
        chan,
        init,
        late_cgroup_ns: late_cgroup_ns(plan.clone_flags, attach.is_some() || !tasks_fds.is_empty() || procs.is_some()),
        late_time_ns: legacy && plan.clone_flags & CLONE_NEWTIME != 0,
        tasks: &tasks_fds,
        prepared: &prepared_fds,
        keep_fds: &keep_fds,
        parent_pidfd: parent_pidfd_raw,
        trees_sock,
        pooled_net: in_pooled.is_some(),
        own_cgroups: own_cgroups(&plan.fs.cgroup_dirs, io.cgroup),
    };

    let mut pidfd: c_int = -1;
    let mut flags = libc::CLONE_VM as u64 | libc::CLONE_PIDFD as u64 | plan.clone_flags;
    // Attached after clone (v1): make the cgroup namespace only once inside the sandbox's
    // cgroup, so that cgroup is its root, as with CLONE_INTO_CGROUP.
    if ctx.late_cgroup_ns {
        flags &= !(libc::CLONE_NEWCGROUP as u64);
    }
    if cgroup_fd.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    if ctx.late_time_ns {
        flags &= !CLONE_NEWTIME;
    }
    if in_pooled.is_some() {
        flags &= !(libc::CLONE_NEWNET as u64);
    }
    let mut args = CloneArgs {
        flags,
        cgroup: cgroup_fd.map_or(0, |fd| fd as u64),
        pidfd: &mut pidfd as *mut c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.bottom(),
        stack_size: stack.size(),
        ..CloneArgs::default()
    };
    let arg = &ctx as *const ChildCtx as *mut c_void;
    // Blocked across clone so no handler of ours runs in the child before it resets them.
    let old_mask = sys::block_all_signals();
    // A root caller's sandbox's user namespace is owned by a host id of its own, not by
    // root (see `sys::ThreadOwner`): what it takes of per-user kernel counts is neither
    // root's nor another sandbox's.
    let owner =
        plan.maps.as_ref().filter(|m| m.range).and_then(|_| sys::ThreadOwner::enter(crate::spec::next_sandbox_owner()));
    // SAFETY: `stack` and `ctx` outlive the child's use of them: we only return (dropping
    // them) after `wait_exec` saw the report pipe close, i.e. after the child exec'd or died.
    let res = unsafe { sys::clone_any(&mut args, legacy, child_main, arg) };
    drop(owner);
    sys::restore_signals(&old_mask);
    drop(in_pooled);
    if res == Err(Errno::NOSYS) && !legacy {
        return Ok(None); // no child: everything above is dropped, and clone(2) tries again
    }
    drop(report_w);
    drop(go_r);
    let (overlays, prepared): (Vec<_>, Vec<_>) =
        plan.fs.prepare.iter().zip(prepared).partition(|(p, _)| p.overlay.is_some());
    drop(prepared);
    let held: Vec<OwnedFd> = overlays.into_iter().map(|(_, fd)| fd).collect();
    drop(parent_pidfd);
    let trees_r = trees_pair.map(|(r, _w)| r);
    // Only init holds the write end of its status report.
    let status = status_pipe.map(|(r, _w)| r);
    let pid = res.map_err(|e| Error::spawn("clone3", Some(namespaces_hint(plan.clone_flags)), e))?;
    // SAFETY: CLONE_PIDFD stored a fresh fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let child = Child { pid, pidfd, status, trees: Vec::new(), held: Vec::new() };

    // Where the child makes overlays itself (a rootless caller's), hold its mount namespace:
    // the overlays' teardown then happens when we let go of it, on the reaper's thread, not
    // in the exit of its pid 1 (see `crate::reaper`). At worst (an old kernel without
    // either way to get it) the teardown stays where it was.
    let mnt_ns = if plan.fs.steps.iter().any(|s| matches!(s.op, mount::FsOp::Overlay { .. })) {
        sys::pidfd_mnt_namespace(child.pidfd.as_fd(), pid).ok()
    } else {
        None
    };
    let mut child = finish(plan, child, &mut parent, plan.maps.as_ref(), attach, procs, stack)?;
    crate::spare::ask(plan);
    crate::netpool::refill();
    if let Some(r) = trees_r {
        match receive_trees(&r, plan, io.trees, upper.as_ref(), child_upper) {
            Ok((trees, child_upper)) => {
                child.trees = trees;
                child.held.extend(child_upper);
            }
            Err(e) => {
                let _ = rustix::process::pidfd_send_signal(&child.pidfd, rustix::process::Signal::KILL);
                let _ = rustix::process::waitpid(pid_of(&child), WaitOptions::empty());
                return Err(Error::spawn("receive the writable trees", None, e));
            }
        }
    }
    child.held.extend(held);
    child.held.extend(upper);
    child.held.extend(mnt_ns);
    Ok(Some(child))
}

/// The trees' fds the child sent before it exec'd (queued in `sock`), in `trees`' order; an
/// overlay's upper directory ("//DST") from the parent's own upper when the parent made it.
/// With `child_upper`, the upper filesystem the child made comes last (returned second).
fn receive_trees(
    sock: &OwnedFd,
    plan: &Plan,
    trees: &[CString],
    parent_upper: Option<&OwnedFd>,
    child_upper: bool,
) -> std::result::Result<(Vec<OwnedFd>, Option<OwnedFd>), Errno> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_TREES + 1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let got = rustix::net::recvmsg(
        sock,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )?;
    let mut sent: Vec<OwnedFd> = Vec::new();
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = msg {
            sent.extend(r);
        }
    }
    if got.bytes != 1 || got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(Errno::PROTO);
    }
    let own_upper = if child_upper { Some(sent.pop().ok_or(Errno::PROTO)?) } else { None };
    let mut sent = sent.into_iter();
    let mut out = Vec::with_capacity(trees.len());
    for t in trees {
        let fd = match (overlay_upper_name(plan, t), parent_upper) {
            (Some(name), Some(up)) => {
                let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                rustix::fs::openat(up, name, flags, Mode::empty())?
            }
            _ => sent.next().ok_or(Errno::PROTO)?,
        };
        out.push(fd);
    }
    if sent.next().is_some() {
        return Err(Errno::PROTO);
    }
    Ok((out, own_upper))
}

/// Sync point 1 (id maps written, v1 cgroup attached, then `go`), then sync point 2 (the
/// report pipe: EOF = exec'd). `stack` is freed only once the child left our memory.
fn finish(
    plan: &Plan,
    child: Child,
    parent: &mut sync::ParentChannel,
    maps: Option<&IdMaps>,
    attach: Option<&dyn Cgroup>,
    procs: Option<OwnedFd>,
    stack: Stack,
) -> Result<Child> {
    if parent.go.is_some() {
        let mut ready = maps.map_or(Ok(()), |maps| write_maps(child.pid, maps));
        if let (Ok(()), Some(cg)) = (&ready, attach) {
            ready =
                cg.attach(child.pid).map_err(|e| Error::spawn("attach cgroup", Some(e.to_string()), cgroup_errno(&e)));
        }
        if let (Ok(()), Some(procs)) = (&ready, &procs) {
            // The cgroup CLONE_INTO_CGROUP would have put it in (clone(2) has no such flag).
            ready = rustix::io::write(procs, child.pid.to_string().as_bytes())
                .map(drop)
                .map_err(|e| Error::spawn("attach cgroup", Some("cgroup.procs".into()), e));
        }
        let ready = ready.and_then(|()| parent.mappings_written().map_err(|e| Error::spawn("signal child", None, e)));
        if let Err(e) = ready {
            abort_child(&child, parent);
            return Err(e);
        }
    }
    let report = parent.wait_exec();
    drop(stack);
    match report {
        Ok(None) => Ok(child),
        Ok(Some(rec)) => {
            let _ = rustix::process::waitpid(pid_of(&child), WaitOptions::empty());
            Err(child_error(plan, rec))
        }
        Err(e) => {
            abort_child(&child, parent);
            Err(Error::spawn("read child report", None, e))
        }
    }
}

fn pid_of(c: &Child) -> Option<Pid> {
    Pid::from_raw(c.pid)
}

/// A pidfd of the calling thread (PIDFD_THREAD, Linux 6.9), else of the process.
fn spawning_thread_pidfd() -> std::result::Result<OwnedFd, Errno> {
    use rustix::process::{pidfd_open, PidfdFlags};
    const PIDFD_THREAD: u32 = libc::O_EXCL as u32;
    let tid = rustix::thread::gettid();
    pidfd_open(tid, PidfdFlags::from_bits_retain(PIDFD_THREAD))
        .or_else(|_| pidfd_open(rustix::process::getpid(), PidfdFlags::empty()))
}

/// Child-safe: O_PATH fds of the roots of `io.trees` (resolved in the new root; "//DST" is
/// an overlay's upper directory where the child made it), then the upper filesystem the
/// child made if it did, sent to the parent in one message.
fn send_trees(ctx: &ChildCtx, fs: &mount::FsState) -> std::result::Result<(), Errno> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut opened: [Option<OwnedFd>; MAX_TREES] = [const { None }; MAX_TREES];
    let mut n = 0;
    for t in ctx.io.trees {
        let fd = match overlay_upper_name(ctx.plan, t) {
            Some(name) => match mount::upper_root(fs, name) {
                Some(fd) => fd?,
                None => continue, // the parent's (it made the overlay)
            },
            None => mount::tree_root(t)?,
        };
        opened[n] = Some(fd);
        n += 1;
    }
    let mut raw: [BorrowedFd<'_>; MAX_TREES + 1] = [ctx_fd(ctx); MAX_TREES + 1];
    for (slot, fd) in raw.iter_mut().zip(opened.iter().flatten()) {
        *slot = fd.as_fd();
    }
    // Last, the upper filesystem this child made (see `spawn_with`).
    if let Some(up) = mount::own_upper(fs) {
        raw[n] = up;
        n += 1;
    }
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_TREES + 1))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if n > 0 && !anc.push(SendAncillaryMessage::ScmRights(&raw[..n])) {
        return Err(Errno::NOBUFS);
    }
    // SAFETY: a kept fd (keep_fds), open until exec.
    let sock = unsafe { sys::borrow_fd(ctx.trees_sock) };
    rustix::net::sendmsg(sock, &[std::io::IoSlice::new(b"T")], &mut anc, SendFlags::NOSIGNAL).map(drop)
}

/// Child-safe: for a tree "//DST" (the changes of the overlay on DST, "//" for the root),
/// that overlay's upper directory name.
fn overlay_upper_name<'a>(plan: &'a Plan, tree: &std::ffi::CStr) -> Option<&'a std::ffi::CStr> {
    let dst = tree.to_bytes().strip_prefix(b"//")?;
    plan.fs.uppers.iter().find(|(d, _)| d.to_bytes() == dst).map(|(_, name)| name.as_c_str())
}

/// A placeholder for unused slots of `send_trees`' array (never sent).
fn ctx_fd<'a>(ctx: &ChildCtx) -> BorrowedFd<'a> {
    // SAFETY: a kept fd (keep_fds), open until exec; only a placeholder, never used.
    unsafe { sys::borrow_fd(ctx.trees_sock) }
}

/// Child-safe: (re-)arm the death signal; a change of ids clears it.
fn arm_death_signal(ctx: &ChildCtx) {
    if ctx.plan.die_with_parent {
        sys::set_death_signal_kill().unwrap_or_else(|e| ctx.chan.fail(Step::DeathSignal, 0, e));
    }
}

/// The sorted, deduplicated non-negative fds of `lists`.
fn keep_list(lists: &[&[RawFd]]) -> Vec<RawFd> {
    let mut v: Vec<RawFd> = lists.iter().flat_map(|l| l.iter().copied()).filter(|&fd| fd >= 0).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Open the trees the plan's parent side prepares (a root caller's rootfs and binds), and
/// the upper filesystem of the overlays it makes.
fn prepare_trees(plan: &Plan) -> Result<(Vec<OwnedFd>, Option<OwnedFd>)> {
    if let Some((trees, upper)) = crate::spare::take(plan) {
        return Ok((trees, Some(upper)));
    }
    prepare_layers(&plan.fs.prepare, plan.fs.upper.as_ref(), plan.id_base.unwrap_or(crate::spec::SANDBOX_ID_BASE))
}

/// [`prepare_trees`] of these trees and upper, made now; idmapped trees map through the
/// range at `id_base`.
pub(crate) fn prepare_layers(
    prepare: &[mount::PrepareTree],
    upper: Option<&mount::Upper>,
    id_base: u32,
) -> Result<(Vec<OwnedFd>, Option<OwnedFd>)> {
    if prepare.is_empty() {
        return Ok((Vec::new(), None));
    }
    let userns = if prepare.iter().any(|p| p.idmap) {
        Some(idmap_userns(id_base).map_err(|e| Error::spawn("create the id-mapping user namespace", None, e))?)
    } else {
        None
    };
    let upper_fd = match upper {
        Some(u) => Some(mount::prepare_upper(u).map_err(|e| Error::spawn("overlay upper", None, e))?),
        None => None,
    };
    let upper = upper_fd.as_ref().map(|u| u.as_fd());
    let trees = prepare
        .iter()
        .map(|p| {
            // Where the filesystem cannot idmap (tmpfs before Linux 6.3, NFS, FUSE, 9p), the
            // tree is attached as it is: its files keep their host owners (nobody inside,
            // unless in the sandbox's range). Less access, never more.
            let res = match mount::prepare(p, userns, upper) {
                Err(Errno::INVAL | Errno::OPNOTSUPP) if p.idmap && p.overlay.is_none() => {
                    mount::prepare(p, None, upper)
                }
                other => other,
            };
            res.map_err(|e| Error::spawn(p.step.clone(), Some(p.src.to_string_lossy().into_owned()), e))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((trees, upper_fd))
}

/// A user namespace with a root caller's sandbox mapping (0 -> `base`, 65536 ids), made
/// once per process and range (the shared one and the process's own, see
/// `spec::next_sandbox_base`): idmapped Binds map through it, so inside a Bind the ids on
/// disk are the sandbox's ids.
fn idmap_userns(base: u32) -> std::result::Result<std::os::fd::BorrowedFd<'static>, Errno> {
    static FDS: std::sync::Mutex<Vec<(u32, &'static OwnedFd)>> = std::sync::Mutex::new(Vec::new());
    let mut fds = FDS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&(_, fd)) = fds.iter().find(|(b, _)| *b == base) {
        return Ok(fd.as_fd());
    }
    // At most 1 + 2 * SANDBOX_RANGES_PER_PROCESS of them (the shared range, both rotations),
    // each kept for the process's life.
    let fd: &'static OwnedFd = Box::leak(Box::new(make_idmap_userns(base)?));
    fds.push((base, fd));
    Ok(fd.as_fd())
}

/// Whether the file system of `src` can be idmapped (the kernel refuses NFS, FUSE, 9p,
/// ramfs, tmpfs before Linux 6.3...), probed once per device on a detached clone of it.
/// Where it cannot, `prepare_layers` attaches the tree as it is and what the sandbox
/// writes there is stored with its host ids: the range must then be the one every run
/// shares, or the next run would find its files nobody's (found by an audit).
pub(crate) fn can_idmap(src: &std::ffi::CStr) -> bool {
    static SEEN: std::sync::Mutex<Vec<(u64, bool)>> = std::sync::Mutex::new(Vec::new());
    let Ok(st) = rustix::fs::stat(src) else { return true }; // (the start reports it)
    if let Some(&(_, ok)) = SEEN.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(d, _)| *d == st.st_dev) {
        return ok;
    }
    let flags = rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC;
    let Ok(tree) = rustix::mount::open_tree(rustix::fs::CWD, src, flags) else { return true };
    let ok = match idmap_userns(crate::spec::SANDBOX_ID_BASE) {
        Ok(ns) => !matches!(
            sys::mount_setattr_detached(tree.as_raw_fd(), 0, false, Some(ns.as_raw_fd())),
            Err(Errno::INVAL | Errno::OPNOTSUPP)
        ),
        Err(_) => true,
    };
    crate::reaper::drop_later(vec![tree]);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.len() < 256 {
        seen.push((st.st_dev, ok));
    }
    ok
}

fn make_idmap_userns(base: u32) -> std::result::Result<OwnedFd, Errno> {
    {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let stack = Stack::new(64 * 1024).map_err(|e| errno_of(&e))?;
        let mut args = CloneArgs {
            flags: libc::CLONE_VM as u64 | libc::CLONE_NEWUSER as u64,
            exit_signal: libc::SIGCHLD as u64,
            stack: stack.bottom(),
            stack_size: stack.size(),
            ..CloneArgs::default()
        };
        let old_mask = sys::block_all_signals();
        let fds = [r.as_raw_fd(), w.as_raw_fd()];
        let arg = fds.as_ptr() as *mut c_void;
        // SAFETY: the child only reads `fds` (alive until we reaped it), closes its copy of the
        // write end, reads the pipe and exits; it runs on `stack`, which outlives it.
        let mut res = unsafe { sys::clone_any(&mut args, false, hold_userns_main, arg) };
        if res == Err(Errno::NOSYS) {
            note_no_clone3();
            // SAFETY: as above (the flags fit clone(2)'s 32 bits).
            res = unsafe { sys::clone_any(&mut args, true, hold_userns_main, arg) };
        }
        sys::restore_signals(&old_mask);
        let pid = res?;
        let done = write_maps(pid, &IdMaps::sandbox_range(base))
            .map_err(|e| match e {
                Error::Spawn { errno, .. } => errno,
                Error::Invalid { .. } | Error::Limit { .. } => Errno::INVAL,
            })
            .and_then(|()| {
                rustix::fs::open(format!("/proc/{pid}/ns/user"), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            });
        drop(w);
        let _ = rustix::process::waitpid(Pid::from_raw(pid), WaitOptions::empty());
        drop(stack);
        done
    }
}

extern "C" fn hold_userns_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points to the parent's [read, write] pipe fds, alive until we are reaped.
    let [r, w] = unsafe { *(arg as *const [RawFd; 2]) };
    // Child-safe: wait until the parent closes the pipe (it has opened our user namespace).
    // SAFETY: our copy of the parent's write end: nothing in this child owns it.
    unsafe { sys::close(w) };
    let mut b = [0u8; 1];
    // SAFETY: our copy of the read end, open until we exit.
    let _ = rustix::io::read(unsafe { sys::borrow_fd(r) }, &mut b);
    sys::exit_now(0)
}

/// Kill a child that has not exec'd yet, wait until it left our address space, reap it.
fn abort_child(child: &Child, parent: &sync::ParentChannel) {
    let _ = rustix::process::pidfd_send_signal(child.pidfd.as_fd(), Signal::KILL);
    let _ = parent.wait_exec();
    let _ = rustix::process::waitpid(pid_of(child), WaitOptions::empty());
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const CLONE_NEWTIME: u64 = libc::CLONE_NEWTIME as u64;

fn cgroup_errno(e: &crate::cgroup::CgroupError) -> Errno {
    match e {
        crate::cgroup::CgroupError::Write { source, .. } | crate::cgroup::CgroupError::Io { source, .. } => {
            errno_of(source)
        }
        crate::cgroup::CgroupError::Unavailable(_) => Errno::NOTSUP,
    }
}

pub(crate) fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO))
}

fn namespaces_hint(flags: u64) -> String {
    let names: Vec<&str> = crate::ns::NAMESPACES.iter().filter(|(_, f)| flags & f != 0).map(|(n, _)| *n).collect();
    format!("namespaces {}", names.join(","))
}

fn write_proc(pid: i32, file: &str, data: &str) -> Result<()> {
    let path = format!("/proc/{pid}/{file}");
    let res = std::fs::OpenOptions::new().write(true).open(&path).and_then(|mut f| f.write_all(data.as_bytes()));
    res.map_err(|e| Error::spawn(format!("write {file}"), Some(path), errno_of(&e)))
}

fn write_maps(pid: i32, maps: &IdMaps) -> Result<()> {
    let written = (|| {
        if maps.deny_setgroups {
            write_proc(pid, "setgroups", "deny")?;
        }
        write_proc(pid, "uid_map", &maps.uid_map)?;
        write_proc(pid, "gid_map", &maps.gid_map)
    })();
    match written {
        Err(Error::Spawn { errno: Errno::ACCESS, .. }) if !dumpable() => Err(not_dumpable()),
        other => other,
    }
}

/// Whether this process is dumpable. One that is not (it changed its ids without an exec)
/// has children that are not either until they exec: their /proc files are root's, and
/// only CAP_DAC_OVERRIDE writes their id maps.
fn dumpable() -> bool {
    use rustix::process::{dumpable_behavior, DumpableBehavior};
    matches!(dumpable_behavior(), Ok(DumpableBehavior::Dumpable))
}

fn not_dumpable() -> Error {
    Error::spawn(
        "write uid_map",
        Some(
            "this process is not dumpable (it changed its ids without an exec), so the kernel lets only root \
             write the id maps of the user namespaces it makes: start sandboxes before dropping privileges, \
             drop them with an exec (setpriv, su, runuser), or make it dumpable again \
             (prctl PR_SET_DUMPABLE) if nothing in its memory needs the protection"
                .into(),
        ),
        Errno::ACCESS,
    )
}

/// Turn the child's record into an error naming the step and the path involved.
pub(crate) fn child_error(plan: &Plan, rec: sync::ChildError) -> Error {
    let errno = Errno::from_raw_os_error(rec.errno);
    match Step::from_raw(rec.step) {
        Some(Step::Fs) => match plan.fs.steps.get(rec.index as usize) {
            Some(st) => Error::spawn(st.step.clone(), Some(st.path.clone()), errno),
            None => Error::spawn("mount", None, errno),
        },
        Some(Step::Exec) => Error::spawn("exec", Some(plan.argv0.clone()), errno),
        Some(Step::Chdir) => Error::spawn("chdir", Some(plan.cwd.to_string_lossy().into_owned()), errno),
        Some(Step::Rlimit) if rec.index > 0 => {
            let what = plan.rlimits.get(rec.index as usize - 1).map(|r| format!("rlimit {} ({}, {})", r.0, r.1, r.2));
            Error::spawn("setrlimit", what, errno)
        }
        Some(step) => Error::spawn(step.name(), None, errno),
        None => Error::spawn("child setup", None, errno),
    }
}

/// The nsfast-init binary in a sealed memfd, made once per process.
pub(crate) fn init_binary() -> std::result::Result<RawFd, Errno> {
    static FD: OnceLock<std::result::Result<OwnedFd, Errno>> = OnceLock::new();
    FD.get_or_init(|| sys::sealed_memfd(c"nsfast-init", INIT_BINARY, true))
        .as_ref()
        .map(|fd| fd.as_raw_fd())
        .map_err(|e| *e)
}

/// The static init built from `init/main.rs` by build.rs.
pub static INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nsfast-init"));

extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's ChildCtx, alive and unchanged until we exec or exit.
    let ctx = unsafe { &*(arg as *const ChildCtx) };
    child(ctx)
}

/// The child's whole life before exec. Never returns; never allocates.
fn child(ctx: &ChildCtx) -> ! {
    let plan = ctx.plan;
    let ch = &ctx.chan;
    let fail = |step: Step, e: Errno| -> ! { ch.fail(step, 0, e) };

    sys::child_reset_signal_dispositions();
    // Our copy of the caller's fd table: nothing the sandbox does not need stays open
    // (no path is resolved, no mount made before this).
    // SAFETY: the child's copy of the parent's table: nothing in the child owns the others.
    unsafe { sys::close_all_except(ctx.keep_fds) }.unwrap_or_else(|e| fail(Step::CloseFdsEarly, e));
    arm_death_signal(ctx);
    if ch.go >= 0 {
        // Also proves the parent outlived the prctl above: a dead parent's `go` reads EOF.
        ch.wait_mappings_written().unwrap_or_else(|e| fail(Step::WaitMappings, e));
    }
    if plan.become_root {
        // Still host uid 0, which the root caller's range does not map: become the user
        // namespace's root before touching any file.
        sys::setresgid(0).unwrap_or_else(|e| fail(Step::BecomeRoot, e));
        sys::clear_supplementary_groups().unwrap_or_else(|e| fail(Step::BecomeRoot, e));
        sys::setresuid(0).unwrap_or_else(|e| fail(Step::BecomeRoot, e));
        arm_death_signal(ctx);
    }
    for (i, &fd) in ctx.tasks.iter().enumerate() {
        // SAFETY: a kept fd (keep_fds), open until exec.
        if let Err(e) = rustix::io::write(unsafe { sys::borrow_fd(fd) }, b"0") {
            ch.fail(Step::AttachCgroup, i as u32, e);
        }
    }
    if ctx.late_cgroup_ns {
        sys::unshare(libc::CLONE_NEWCGROUP as u64).unwrap_or_else(|e| fail(Step::CgroupNs, e));
    }
    if ctx.late_time_ns {
        sys::unshare(CLONE_NEWTIME).unwrap_or_else(|e| fail(Step::TimeNs, e));
    }
    let mut fs_state = mount::FsState::default();
    fs_state.pooled_net = ctx.pooled_net;
    fs_state.own_cgroups = ctx.own_cgroups;
    for (i, st) in plan.fs.steps.iter().enumerate() {
        if let Err(e) = mount::run(&st.op, ctx.prepared, &mut fs_state) {
            ch.fail(Step::Fs, i as u32, e);
        }
    }
    if ctx.trees_sock >= 0 {
        send_trees(ctx, &fs_state).unwrap_or_else(|e| fail(Step::Trees, e));
    }
    if let Some(name) = &plan.hostname {
        rustix::system::sethostname(name).unwrap_or_else(|e| fail(Step::Hostname, e));
    }
    if plan.loopback && !ctx.pooled_net {
        sys::loopback_up().unwrap_or_else(|e| fail(Step::Loopback, e));
    }
    if plan.fs.steps.is_empty() {
        rustix::process::chdir(plan.cwd.as_c_str()).unwrap_or_else(|e| fail(Step::Chdir, e));
    } else {
        // Inside the new root: its symlinks stay in it, magic links are refused.
        mount::chdir_in_root(plan.cwd.as_c_str()).unwrap_or_else(|e| fail(Step::Chdir, e));
    }
    let ambient = drop_bounding_and_set_ids(plan, ch, &|| arm_death_signal(ctx));
    if ctx.parent_pidfd >= 0 {
        // Armed for good now: if the spawning thread died at any point before, exit.
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        // SAFETY: a kept fd (keep_fds), open until exec.
        let mut fds = [PollFd::from_borrowed_fd(unsafe { sys::borrow_fd(ctx.parent_pidfd) }, PollFlags::IN)];
        if poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })).is_ok_and(|n| n > 0) {
            sys::exit_now(127);
        }
    }
    set_capabilities(plan, ambient, ch);
    if plan.new_session {
        rustix::process::setsid().unwrap_or_else(|e| fail(Step::Setsid, e));
    }
    sys::set_no_new_privs().unwrap_or_else(|e| fail(Step::NoNewPrivs, e));
    // A crash must not hand a core to the host's core_pattern (a pipe helper runs as host root,
    // outside every limit): 1, not 0, the one value the kernel refuses a pipe helper for
    // (fs/coredump.c; a limit of 0 still starts it), and below any ELF core file.
    // (Unless the spec sets a core limit of its own: a hard limit could not be raised again.)
    if !plan.rlimits.iter().any(|r| r.0 == libc::RLIMIT_CORE) {
        sys::rlimit_set(libc::RLIMIT_CORE, 1).unwrap_or_else(|e| fail(Step::Rlimit, e));
    }
    if let Some(n) = plan.nproc {
        sys::rlimit_set(libc::RLIMIT_NPROC, n).unwrap_or_else(|e| fail(Step::Rlimit, e));
    }
    // The spec's own rlimits, after nsfast's (Spec(rlimits={"core": ...}) wins); index+1
    // names the one that failed (0: nsfast's).
    for (i, &(resource, soft, hard)) in plan.rlimits.iter().enumerate() {
        sys::rlimit_set_pair(resource, soft, hard).unwrap_or_else(|e| ch.fail(Step::Rlimit, i as u32 + 1, e));
    }

    // stdio: first lift sources sitting on 0..2 out of the way, then install.
    let mut src = ctx.io.stdio;
    for (i, fd) in src.iter_mut().enumerate() {
        if *fd >= 0 && *fd < 3 && *fd != i as RawFd {
            *fd = sys::dup_above(*fd, 3).unwrap_or_else(|e| fail(Step::Stdio, e));
        }
    }
    for (i, &fd) in src.iter().enumerate() {
        let target = i as RawFd;
        let res = if fd < 0 {
            Ok(())
        } else if fd == target {
            sys::set_cloexec(fd, false)
        } else {
            // SAFETY: `target` is 0, 1 or 2 of the child's own table (what the command gets).
            unsafe { sys::dup2(fd, target) }
        };
        res.unwrap_or_else(|e| fail(Step::Stdio, e));
    }
    // Everything from 3 up closes at exec, except the fds passed on purpose.
    // SAFETY: CLOSE_RANGE_CLOEXEC closes nothing now; at exec the child is gone.
    unsafe { sys::close_range(3, u32::MAX, sys::CLOSE_RANGE_CLOEXEC) }.unwrap_or_else(|e| fail(Step::CloseFds, e));
    for &fd in ctx.io.pass_fds {
        sys::set_cloexec(fd, false).unwrap_or_else(|e| fail(Step::CloseFds, e));
    }
    sys::child_unblock_all_signals();

    let envp = plan.exec.envp.as_ptr();
    if let Some((_, _, status)) = ctx.init {
        // init inherits the report pipe and closes it once its child has exec'd, and the
        // write end of its status report, which it keeps from the command (close-on-exec).
        sys::set_cloexec(ch.report, false).unwrap_or_else(|e| fail(Step::ExecInit, e));
        sys::set_cloexec(status, false).unwrap_or_else(|e| fail(Step::ExecInit, e));
    }
    // Last: from here on only what the filter allows (execve, write, exit_group are).
    if let Some(filter) = &plan.seccomp {
        filter.install().unwrap_or_else(|e| fail(Step::Seccomp, e));
    }
    if let Some((init_fd, init_argv, _)) = ctx.init {
        // SAFETY: prepared NULL-terminated arrays.
        let e = unsafe { sys::execve_fd(init_fd, init_argv.as_ptr(), envp) };
        fail(Step::ExecInit, e);
    }
    // execvpe's rule: skip ENOENT/ENOTDIR, remember EACCES, stop at anything else.
    let argv = plan.exec.argv.as_ptr();
    let mut err = Errno::NOENT;
    let mut saw_eacces = false;
    for cand in &plan.exec.candidates {
        // SAFETY: prepared NULL-terminated arrays.
        let e = unsafe { sys::execve(cand.as_c_str(), argv, envp) };
        match e {
            Errno::NOENT | Errno::NOTDIR => {}
            Errno::ACCESS => saw_eacces = true,
            other => {
                err = other;
                break;
            }
        }
        err = e;
    }
    if saw_eacces && (err == Errno::NOENT || err == Errno::NOTDIR) {
        err = Errno::ACCESS;
    }
    fail(Step::Exec, err)
}

/// Child-safe: drop the bounding set to what `plan` keeps, then set its ids (`rearm` runs
/// after a change of ids, which clears the death signal). Returns whether the kept
/// capabilities go to the ambient set (a non-root uid keeping some).
pub(crate) fn drop_bounding_and_set_ids(plan: &Plan, ch: &sync::ChildChannel, rearm: &dyn Fn()) -> bool {
    let fail = |step: Step, e: Errno| -> ! { ch.fail(step, 0, e) };
    // The bounding set needs CAP_SETPCAP, which a switch to a non-root uid takes away.
    for cap in 0..=plan.cap_last {
        if plan.keep_caps & (1u64 << cap) == 0 {
            sys::capbset_drop(cap).unwrap_or_else(|e| fail(Step::DropCaps, e));
        }
    }
    // Capabilities kept for a non-root uid survive the uid switch (KEEPCAPS) and the exec
    // (the ambient set), as crun does with the OCI spec's ambient set: without that,
    // `uid=1000, capabilities=(...)` would silently give the command none.
    let ambient = plan.keep_caps != 0 && plan.set_ids.is_some_and(|ids| ids.uid.is_some_and(|u| u != 0));
    if ambient {
        sys::set_keep_caps().unwrap_or_else(|e| fail(Step::DropCaps, e));
    }
    if let Some(ids) = plan.set_ids {
        sys::clear_supplementary_groups().unwrap_or_else(|e| fail(Step::SetGroups, e));
        if let Some(gid) = ids.gid {
            sys::setresgid(gid).unwrap_or_else(|e| fail(Step::SetGid, e));
        }
        if let Some(uid) = ids.uid {
            sys::setresuid(uid).unwrap_or_else(|e| fail(Step::SetUid, e));
        }
        rearm();
    }
    ambient
}

/// Child-safe: permitted, effective and inheritable capabilities to what `plan` keeps (of
/// what is left), no ambient ones unless `ambient` (then the kept ones).
pub(crate) fn set_capabilities(plan: &Plan, ambient: bool, ch: &sync::ChildChannel) {
    let fail = |step: Step, e: Errno| -> ! { ch.fail(step, 0, e) };
    sys::clear_ambient_capabilities().unwrap_or_else(|e| fail(Step::DropCaps, e));
    let have = sys::capget_permitted().unwrap_or_else(|e| fail(Step::DropCaps, e));
    sys::capset(have & plan.keep_caps).unwrap_or_else(|e| fail(Step::DropCaps, e));
    if ambient {
        for cap in 0..=plan.cap_last {
            if have & plan.keep_caps & (1u64 << cap) != 0 {
                sys::raise_ambient_capability(cap).unwrap_or_else(|e| fail(Step::DropCaps, e));
            }
        }
    }
}

/// Wait up to `timeout` (forever if None) for the child to exit; reap it with its resource
/// usage. `Ok(None)` on timeout. Returns the raw wait status.
pub fn wait(
    pid: i32,
    pidfd: RawFd,
    timeout: Option<std::time::Duration>,
) -> std::io::Result<Option<(c_int, libc::rusage)>> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        if let Some(done) = sys::wait4_nohang(pid)? {
            return Ok(Some(done));
        }
        let left = match deadline {
            Some(d) => {
                let now = std::time::Instant::now();
                if now >= d {
                    return Ok(None);
                }
                Some(d - now)
            }
            None => None,
        };
        let ts = left.map(|d| Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 });
        // SAFETY: poll only reads the readiness of `pidfd` (the caller's, open for this call):
        // a wrong number gives a wrong answer (then wait4 tells), never closes or uses a file.
        let mut fds = [PollFd::from_borrowed_fd(unsafe { sys::borrow_fd(pidfd) }, PollFlags::IN)];
        match poll(&mut fds, ts.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
