//! Zygotes: sandboxes forked, copy-on-write, from a warmed-up process.
//!
//! The zygote is a long-lived process inside an nsfast sandbox (its own user, pid, mount,
//! ipc, uts and net namespaces, nsfast-init its pid 1), holding only the capabilities it
//! needs to make namespaces, in that user namespace. It reads requests from a unix
//! SOCK_SEQPACKET socket, one per task: a header and the task's fds (SCM_RIGHTS), never the
//! task's code or data: those are in a memfd only the task reads, so nothing of one task
//! stays in the zygote's memory for a later one to find.
//!
//! Per task the zygote makes a new pid namespace whose pid 1 is nsfast-init (`--watch`,
//! started by vfork and exec: no copy of the zygote's memory), then forks the task T with
//! fork(3), so the process's atfork handlers run as for `os.fork`, with the interpreter's own
//! hooks around it: T is pid 2 there, and the zygote's child, which reaps it and writes its
//! wait status to the caller's status pipe. T moves itself into the task's cgroup through
//! files the caller opened (the kernel checks the opener's rights), unshares mount, ipc,
//! uts, net and cgroup namespaces, mounts a fresh /proc (with the masks), /dev/shm and /tmp,
//! drops every capability, sets no_new_privs, the rlimits and its stdio, installs the
//! seccomp filter and only then closes its end of the report pipe (the caller's "started"):
//! the task's code never runs with more. nsfast-init (no capabilities, not dumpable) reaps
//! the orphans that come to it and exits once T has ended, which ends the namespace.
//!
//! With a network namespace per task, a thread of the zygote's makes them ahead
//! (`crate::netpool`, two ready): T enters one instead of unsharing its own.
//!
//! The caller gets a pidfd of T; the `Sandbox` it makes waits for it and takes T's status
//! from the status pipe.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

use crate::mount::{self, FsStep};
use crate::spec::Plan;
use crate::sync::{ChildChannel, Step};
use crate::sys;

/// Request and reply header tag.
const MAGIC: u32 = 0x6e737a71; // "nszq"
/// stdin, stdout, stderr, result, payload, report, status, go.
const FIXED_FDS: usize = 8;
/// Files C writes "0" to (v1 controllers' tasks, the v2 cgroup.procs).
pub const MAX_ATTACH: usize = 16;
/// Where the task finds its result pipe and payload memfd.
pub const RESULT_FD: RawFd = 3;
pub const PAYLOAD_FD: RawFd = 4;
/// The task's end of the report pipe until it is ready (then closed).
const REPORT_FD: RawFd = 5;
/// The task's end of its go pipe: it runs its payload only once it read "g" there, which
/// the caller writes once the zygote's answer (the task's pidfd) reached it. A zygote that
/// dies between forking a task and answering leaves the caller without an answer: the
/// caller closes the pipe, the task reads EOF and exits without running anything, and the
/// caller may start it again on a new zygote (never twice: an at-most-once start).
pub const GO_FD: RawFd = 6;

/// Network namespaces a zygote keeps ready for its tasks (`crate::netpool`).
const TASK_NETNS_POOL: usize = 2;

/// The fds of one task request, in wire order.
pub struct TaskFds<'a> {
    pub stdio: [BorrowedFd<'a>; 3],
    pub result: BorrowedFd<'a>,
    pub payload: BorrowedFd<'a>,
    pub report: BorrowedFd<'a>,
    pub status: BorrowedFd<'a>,
    pub go: BorrowedFd<'a>,
    pub attach: Vec<BorrowedFd<'a>>,
}

fn header(n: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&MAGIC.to_ne_bytes());
    h[4..].copy_from_slice(&n.to_ne_bytes());
    h
}

/// Caller side: send one task request on `sock` and read the reply: C's pidfd, or the
/// errno the zygote failed with. The caller serialises requests on one socket.
/// Outer error: the link failed (the zygote is gone, or answered nonsense); inner: the
/// zygote's answer, the task's pidfd or why it could not start it (a fork that failed with
/// EAGAIN because a task holds every process it may have: that task's doing, not a reason
/// to take the zygote, and every task running on it, down).
pub fn request(sock: BorrowedFd<'_>, fds: &TaskFds<'_>) -> std::io::Result<Result<OwnedFd, Errno>> {
    if fds.attach.len() > MAX_ATTACH {
        return Err(Errno::TOOBIG.into());
    }
    let mut all: Vec<BorrowedFd<'_>> = fds.stdio.to_vec();
    all.extend([fds.result, fds.payload, fds.report, fds.status, fds.go]);
    all.extend(fds.attach.iter().copied());
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FIXED_FDS + MAX_ATTACH))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    anc.push(SendAncillaryMessage::ScmRights(&all));
    let h = header(fds.attach.len() as u32);
    rustix::net::sendmsg(sock, &[std::io::IoSlice::new(&h)], &mut anc, SendFlags::NOSIGNAL)?;

    let mut reply = [0u8; 8];
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let got =
        rustix::net::recvmsg(sock, &mut [std::io::IoSliceMut::new(&mut reply)], &mut anc, RecvFlags::CMSG_CLOEXEC)?;
    let mut pidfd = None;
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            for fd in fds {
                pidfd.get_or_insert(fd);
            }
        }
    }
    if got.bytes == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the zygote is gone"));
    }
    if got.bytes != 8 || reply[..4] != MAGIC.to_ne_bytes() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed zygote reply"));
    }
    let errno = i32::from_ne_bytes(reply[4..].try_into().expect("4 bytes"));
    Ok(match pidfd {
        Some(fd) if errno == 0 => Ok(fd),
        _ => Err(Errno::from_raw_os_error(if errno == 0 { libc::EPROTO } else { errno })),
    })
}

/// The SpawnError step of a request the zygote never answered (it is gone, or the link was
/// closed by a restart).
pub const LINK_STEP: &str = "zygote link";

/// Caller side: start one task through the zygote behind `sock` (None: closed), with its
/// `payload` in a sealed memfd, the caller's `stdio` and `result` fds, in `cg`. Returns once
/// the task is ready to run its code (or its setup failed).
pub fn start_task(
    sock: &std::sync::Mutex<Option<OwnedFd>>,
    payload: &[u8],
    stdio: [RawFd; 3],
    result: RawFd,
    cg: Option<&dyn crate::cgroup::Cgroup>,
) -> crate::Result<crate::Child> {
    use crate::Error;
    let err = |step: &str, e: Errno| Error::spawn(format!("zygote task: {step}"), None, e);
    if stdio.iter().chain([&result]).any(|&fd| fd < 0) {
        return Err(Error::invalid("stdio", "a zygote task needs all of stdin, stdout, stderr and result"));
    }
    // The files the task writes "0" to, opened here (the kernel checks the opener's rights):
    // v1 controllers' tasks files, the v2 cgroup.procs.
    let mut attach = crate::spawn::self_attach_files(cg)?;
    if let Some(dir) = cg.and_then(|c| c.clone_fd()) {
        // SAFETY: the cgroup owns its directory fd for longer than this call.
        let dir = unsafe { sys::borrow_fd(dir) };
        let flags = rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC;
        attach.push(
            rustix::fs::openat(dir, c"cgroup.procs", flags, rustix::fs::Mode::empty())
                .map_err(|e| err("attach cgroup", e))?,
        );
    }
    let memfd = sys::sealed_memfd(c"nsfast-task", payload, false).map_err(|e| err("payload memfd", e))?;
    let (parent, _chan, report_w, _) = crate::sync::channel(false).map_err(|e| err("pipe", e))?;
    let (status_r, status_w) = crate::sync::status_pipe().map_err(|e| err("pipe", e))?;
    let (go_r, go_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| err("pipe", e))?;
    // SAFETY: the caller keeps these open across the call.
    let b = |fd: RawFd| unsafe { sys::borrow_fd(fd) };
    let fds = TaskFds {
        stdio: stdio.map(b),
        result: b(result),
        payload: memfd.as_fd(),
        report: report_w.as_fd(),
        status: status_w.as_fd(),
        go: go_r.as_fd(),
        attach: attach.iter().map(|f| f.as_fd()).collect(),
    };
    let answer = {
        let guard = sock.lock().unwrap_or_else(|p| p.into_inner());
        let sock = guard.as_ref().ok_or_else(|| Error::spawn(LINK_STEP, Some("closed".into()), Errno::BADF))?;
        request(sock.as_fd(), &fds).map_err(|e| {
            let errno = Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EPIPE));
            Error::spawn(LINK_STEP, Some(e.to_string()), errno)
        })?
    };
    let pidfd = answer.map_err(|e| err("fork", e))?;
    // Answered: the task may run. (Unanswered, `go_w` closed above, on return: it exits.)
    let _ = rustix::io::write(&go_w, b"g"); // EPIPE: the task is gone already
    drop(fds);
    drop((report_w, status_w, memfd, attach, go_r, go_w));
    // Its pid here (the task's, which the pidfd is of): -1 if it ended already (a task can
    // be over before this line; the pidfd, not the pid, is what is used).
    let pid = pidfd_pid(pidfd.as_raw_fd()).unwrap_or(-1);
    let kill = || {
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
    };
    match parent.wait_exec() {
        Ok(None) => Ok(crate::Child { pid, pidfd, status: Some(status_r), trees: Vec::new(), held: Vec::new() }),
        Ok(Some(rec)) => {
            kill();
            let step = Step::from_raw(rec.step).map_or("setup", |s| s.name());
            Err(err(step, Errno::from_raw_os_error(rec.errno)))
        }
        Err(e) => {
            kill();
            Err(err("read report", e))
        }
    }
}

/// The pid (in our pid namespace) a pidfd is of: its fdinfo's "Pid:" line (-1: exited).
fn pidfd_pid(fd: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("Pid:")).and_then(|v| v.trim().parse().ok())
}

/// The interpreter's fork hooks (PyOS_BeforeFork and friends), kept out of this module.
pub struct ForkHooks {
    pub before: fn(),
    pub parent: fn(),
    pub child: fn(),
}

/// What a task's filesystem gets on top of the zygote's (see [`mount::task_steps`]); and
/// what the zygote makes read-only in its own (`sealed`: its tmpfs mounts that hold binds).
#[derive(Clone, Copy)]
pub struct TaskFs<'a> {
    pub masked: &'a [Vec<u8>],
    pub readonly_paths: &'a [Vec<u8>],
    pub tmp_size: Option<u64>,
    pub shm_size: Option<u64>,
    pub scratch: &'a [mount::Scratch],
    pub sealed: &'a [Vec<u8>],
    /// The caller's cgroup hierarchies (`crate::spec::cgroup_view`) with the device of each
    /// directory's: what a task mounts again on /sys/fs/cgroup, in its own cgroup namespace.
    /// The zygote's own /sys/fs/cgroup shows only the hierarchies it has a cgroup in, and a
    /// task's (memory, pids, ...) are made for it alone.
    pub cgroups: Option<&'a (mount::CgroupView, Vec<u64>)>,
}

/// Zygote side: what every task gets, prepared once.
pub struct Server {
    /// The task's plan (namespaces, seccomp, capabilities, ids, rlimits, hostname).
    plan: Plan,
    steps: Vec<FsStep>,
    /// What C unshares (everything but the pid namespace, made before the fork).
    unshare: u64,
    /// The zygote's own pid namespace, to go back to after each fork.
    pidns: OwnedFd,
    /// nsfast-init's sealed memfd.
    init: RawFd,
    /// Running tasks: pid -> the caller's status pipe.
    running: std::cell::RefCell<std::collections::HashMap<i32, OwnedFd>>,
    /// SIGCHLD (blocked in the zygote), readable when a task ended.
    sigchld: OwnedFd,
    /// The device of each hierarchy the task's steps may mount on /sys/fs/cgroup
    /// (`mount::FsPlan::cgroup_dirs`'s order): the task mounts those its cgroup files (the
    /// caller's, which it attaches itself through) are on.
    cgroup_devs: Vec<u64>,
    /// Tasks share the zygote's network namespace: each is a Landlock domain of its own
    /// whose abstract unix sockets and signals do not reach out of it (their IP sockets are
    /// the seccomp filter's: AF_UNIX only).
    scoped: bool,
    /// A task's RLIMIT_NOFILE (soft, hard) where its Spec sets none: see `fd_limits`.
    task_nofile: Option<(u64, u64)>,
}

/// The zygote's RLIMIT_NOFILE raised to its hard limit, and its tasks' (the soft limit they
/// would have had, under half that). The kernel refuses SCM_RIGHTS once the sender's host
/// uid has more fds in flight in unix sockets than the sender's soft RLIMIT_NOFILE, and
/// tasks are the zygote's uid: a task that fills its own limit with fds in flight (and one
/// last message of 253) stays below the zygote's, whose answers (a task's pidfd) still go
/// out. None: the limits could not be read or raised, or are too small to split.
fn fd_limits() -> Option<(u64, u64)> {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let (soft, hard) = (lim.current?, lim.maximum?);
    if hard < 1024 {
        return None;
    }
    sys::rlimit_set_pair(libc::RLIMIT_NOFILE, hard, hard).ok()?;
    let task_hard = hard / 2 - 256;
    Some((soft.min(task_hard), task_hard))
}

fn probe(p: &[u8]) -> Option<bool> {
    use std::os::unix::ffi::OsStrExt;
    std::fs::metadata(std::ffi::OsStr::from_bytes(p)).ok().map(|m| m.is_dir())
}

impl Server {
    /// `plan`: built from the task's Spec (its namespaces without "user"); masks and sizes as
    /// the task's filesystem needs them.
    pub fn new(plan: Plan, fs: &TaskFs<'_>, scoped: bool) -> crate::Result<Server> {
        let TaskFs { masked, readonly_paths, tmp_size, shm_size, scratch, sealed, .. } = *fs;
        let mnt = plan.clone_flags & libc::CLONE_NEWNS as u64 != 0;
        let mut steps =
            if mnt { mount::task_steps(masked, readonly_paths, tmp_size, shm_size, scratch, &probe)? } else { vec![] };
        // Its own cgroups on /sys/fs/cgroup, as a sandbox's (else it would see the zygote's).
        let mut cgroup_devs = Vec::new();
        let cgns = plan.clone_flags & libc::CLONE_NEWCGROUP as u64 != 0;
        if let Some((view, devs)) = fs.cgroups.filter(|_| mnt && cgns) {
            let dirs = mount::cgroup_view_steps(view, &mut |op, step, path| steps.push(FsStep { op, step, path }));
            cgroup_devs = devs.iter().copied().take(dirs.len()).collect();
        }
        let keep =
            (libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET | libc::CLONE_NEWCGROUP)
                as u64;
        let unshare = plan.clone_flags & keep;
        let spawn_err = |what: &str, e: Errno| crate::Error::spawn(what, None, e);
        let pidns = rustix::fs::open(
            c"/proc/self/ns/pid",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| spawn_err("open /proc/self/ns/pid", e))?;
        let init = crate::spawn::init_binary().map_err(|e| spawn_err("load nsfast-init", e))?;
        // Mounts made by a task never propagate back (the zygote's tree is private).
        if mnt {
            rustix::mount::mount_change(
                c"/",
                rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
            )
            .map_err(|e| spawn_err("make / private", e))?;
        }
        // The zygote's writable mounts that hold its own binds (a hidden /root with the
        // interpreter in it): read-only, since every task shares them.
        for dir in sealed {
            let path =
                std::ffi::CString::new(dir.clone()).map_err(|_| crate::Error::invalid("mounts", "NUL in a path"))?;
            let fd = rustix::fs::open(
                path.as_c_str(),
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| crate::Error::spawn("seal", Some(String::from_utf8_lossy(dir).into_owned()), e))?;
            sys::mount_setattr(fd.as_raw_fd(), c"", sys::MOUNT_ATTR_RDONLY, false)
                .map_err(|e| crate::Error::spawn("seal", Some(String::from_utf8_lossy(dir).into_owned()), e))?;
        }
        if scoped {
            let abi = landlock_abi();
            if abi < 6 {
                return Err(crate::Error::invalid(
                    "network",
                    format!("'none' needs Landlock ABI 6 (scoped abstract unix sockets), this kernel has {abi}"),
                ));
            }
        }
        let sigchld = sigchld_fd().map_err(|e| spawn_err("signalfd", e))?;
        // Tasks' network namespaces made ahead by a thread of the zygote's (`crate::netpool`),
        // each taken by one task, once: it sets the task up in one rather than making it
        // while the caller waits. Owned by the zygote's user namespace, as a task's own would
        // be (tasks share it), so no task can tell. The zygote is no longer single-threaded
        // (see `fork_task`). If no thread can make them, tasks make their own.
        if plan.clone_flags & libc::CLONE_NEWNET as u64 != 0 {
            let _ = crate::netpool::set_size(TASK_NETNS_POOL);
        }
        // Not dumpable: nothing of a task's (were it to see us) may ptrace us or open our
        // /proc files; each task is made dumpable again, as any process is.
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
            .map_err(|e| spawn_err("prctl(PR_SET_DUMPABLE)", e))?;
        let task_nofile = if plan.rlimits.iter().any(|r| r.0 == libc::RLIMIT_NOFILE) { None } else { fd_limits() };
        Ok(Server {
            plan,
            steps,
            unshare,
            pidns,
            init,
            running: Default::default(),
            sigchld,
            scoped,
            cgroup_devs,
            task_nofile,
        })
    }

    /// Serve requests on `ctrl` until it reads EOF (`Ok(None)`: the caller closed it). In a
    /// task, returns `Some(())` with the task's fds in place (see RESULT_FD, PAYLOAD_FD).
    pub fn serve(&self, ctrl: BorrowedFd<'_>, hooks: &ForkHooks) -> std::io::Result<Option<()>> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        loop {
            let mut pfd = [PollFd::new(&ctrl, PollFlags::IN), PollFd::new(&self.sigchld, PollFlags::IN)];
            match poll(&mut pfd, Some(&Timespec { tv_sec: 1, tv_nsec: 0 })) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let (req, ended) = (!pfd[0].revents().is_empty(), !pfd[1].revents().is_empty());
            if ended {
                let mut buf = [0u8; 128 * 16];
                let _ = rustix::io::read(&self.sigchld, &mut buf);
            }
            // Every wakeup: a SIGCHLD can be merged with another, or come while we fork.
            self.reap();
            if !req {
                continue;
            }
            let mut h = [0u8; 8];
            let mut space =
                vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FIXED_FDS + MAX_ATTACH))];
            let mut anc = RecvAncillaryBuffer::new(&mut space);
            let got = match rustix::net::recvmsg(
                ctrl,
                &mut [std::io::IoSliceMut::new(&mut h)],
                &mut anc,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(g) => g,
                Err(Errno::INTR | Errno::AGAIN) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut fds: Vec<OwnedFd> = Vec::new();
            for msg in anc.drain() {
                if let RecvAncillaryMessage::ScmRights(r) = msg {
                    fds.extend(r);
                }
            }
            if got.bytes == 0 && fds.is_empty() {
                return Ok(None);
            }
            let nattach = u32::from_ne_bytes(h[4..].try_into().expect("4 bytes")) as usize;
            let ok = got.bytes == 8
                && h[..4] == MAGIC.to_ne_bytes()
                && nattach <= MAX_ATTACH
                && fds.len() == FIXED_FDS + nattach
                && !got.flags.contains(rustix::net::ReturnFlags::CTRUNC);
            let reply = |errno: i32, pidfd: Option<BorrowedFd<'_>>| {
                let mut r = [0u8; 8];
                r[..4].copy_from_slice(&MAGIC.to_ne_bytes());
                r[4..].copy_from_slice(&errno.to_ne_bytes());
                let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut anc = SendAncillaryBuffer::new(&mut space);
                let one;
                if let Some(fd) = pidfd {
                    one = [fd];
                    anc.push(SendAncillaryMessage::ScmRights(&one));
                }
                rustix::net::sendmsg(ctrl, &[std::io::IoSlice::new(&r)], &mut anc, SendFlags::NOSIGNAL)
            };
            if !ok {
                reply(libc::EPROTO, None)?;
                continue;
            }
            match self.fork_task(&fds, hooks) {
                Ok(Forked::Task) => {
                    // In the task: those numbers were closed or replaced (0..5) already.
                    std::mem::forget(fds);
                    return Ok(Some(()));
                }
                Ok(Forked::Parent(pidfd)) => {
                    reply(0, Some(pidfd.as_fd()))?;
                    crate::netpool::refill();
                }
                Err(e) => drop(reply(e.raw_os_error(), None)?),
            }
            drop(fds);
        }
    }

    /// One task: its pid namespace and pid 1, then the fork; `Forked::Task` in the task.
    fn fork_task(&self, fds: &[OwnedFd], hooks: &ForkHooks) -> Result<Forked, Errno> {
        let status = fds[6].try_clone().map_err(|e| Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let pid_ns = self.plan.clone_flags & libc::CLONE_NEWPID as u64 != 0;
        let mut watch = None;
        if pid_ns {
            sys::unshare(libc::CLONE_NEWPID as u64)?;
            // Its pid 1 first (no fork of our memory: vfork, exec), so the task is pid 2.
            let res = self.start_init();
            if res.is_err() {
                let _ = sys::setns(self.pidns.as_raw_fd(), libc::CLONE_NEWPID as u64);
            }
            watch = Some(res?);
        }
        // A network namespace made ahead, entered by the task (it is this one's only).
        let pooled = crate::netpool::take(&self.plan);
        (hooks.before)();
        // SAFETY: fork(3) in the zygote's interpreter thread (the interpreter's hooks run
        // around it, as in os.fork); the child runs `task_child`, then returns to the
        // interpreter. The zygote's other thread, the netns pool's, never holds the GIL or
        // runs Python; the only lock it takes (the pool's) the task never touches, and
        // glibc's fork keeps malloc consistent.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            (hooks.child)();
            drop(watch);
            self.task_child(fds, pooled.as_ref());
            // Their numbers were closed by `task_child` and may be the task's own now (its
            // stdio, result, payload...): dropping them here would close those.
            std::mem::forget(pooled);
            std::mem::forget(status);
            return Ok(Forked::Task);
        }
        let fork_errno = Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        (hooks.parent)();
        if pid_ns {
            // Back to our own: the next task must not land in this one's namespace.
            sys::setns(self.pidns.as_raw_fd(), libc::CLONE_NEWPID as u64)
                .expect("setns back to the zygote's pid namespace");
        }
        if pid < 0 {
            return Err(fork_errno); // (its nsfast-init reads EOF and exits)
        }
        drop(pooled);
        if let Some(w) = watch {
            let _ = rustix::io::write(&w, b"1");
        }
        // Not reaped before this (only `reap` does, in this thread): the pid is still T's.
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid).expect("positive"),
            rustix::process::PidfdFlags::empty(),
        );
        if pidfd.is_err() {
            // SAFETY: integer arguments; T is our child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.running.borrow_mut().insert(pid, status);
        pidfd.map(Forked::Parent)
    }

    /// vfork and exec nsfast-init --watch as the new pid namespace's pid 1, with no
    /// capability; returns the write end of its pipe (one byte: the task exists).
    fn start_init(&self) -> Result<OwnedFd, Errno> {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let fd = std::ffi::CString::new(r.as_raw_fd().to_string()).expect("digits");
        let argv: [*const u8; 4] =
            [c"nsfast-init".as_ptr().cast(), c"--watch".as_ptr().cast(), fd.as_ptr().cast(), std::ptr::null()];
        let envp: [*const u8; 1] = [std::ptr::null()];
        let ctx = InitCtx { init: self.init, watch: r.as_raw_fd(), argv: argv.as_ptr(), envp: envp.as_ptr() };
        let stack = sys::Stack::new(64 << 10)
            .map_err(|e| Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::ENOMEM)))?;
        let mut args = sys::CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64,
            exit_signal: libc::SIGCHLD as u64,
            stack: stack.bottom(),
            stack_size: stack.size(),
            ..sys::CloneArgs::default()
        };
        let old = sys::block_all_signals();
        // SAFETY: `stack` and `ctx` (and what it points to) outlive the child's use of them:
        // CLONE_VFORK returns only once it exec'd or exited.
        let res = unsafe { sys::clone3(&mut args, init_main, &ctx as *const InitCtx as *mut std::ffi::c_void) };
        sys::restore_signals(&old);
        res.map(|_| w)
    }

    /// Reap every ended child (tasks, their nsfast-inits) and report the tasks' statuses.
    fn reap(&self) {
        loop {
            let mut status = 0;
            // SAFETY: a live status int.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if r <= 0 {
                return;
            }
            if let Some(fd) = self.running.borrow_mut().remove(&r) {
                let _ = rustix::io::write(&fd, &crate::sync::StatusReport { status }.encode());
            }
        }
    }

    /// In the task (pid 2 of its pid namespace): its cgroup, namespaces, mounts; then
    /// `task_setup`. Returns only ready to run the task's code.
    fn task_child(&self, fds: &[OwnedFd], pooled: Option<&OwnedFd>) {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let (stdio, result, payload, report, go) = (&raw[0..3], raw[3], raw[4], raw[5], raw[7]);
        let attach = &raw[FIXED_FDS..];
        let ch = ChildChannel { report, go: -1, go_parent: -1 };
        let fail = |step: Step, e: Errno| -> ! { ch.fail(step, 0, e) };
        // Its fds only: not the control socket, the zygote's signalfd, status pipes of
        // other tasks or its own (only the zygote writes that), the interpreter's files.
        let mut keep: Vec<RawFd> = raw.iter().copied().filter(|&fd| fd != raw[6]).collect();
        keep.sort_unstable();
        keep.dedup();
        // Into the namespace made ahead (its `lo` is up) before any other fd is closed; if
        // that fails, the task makes its own below, as without a pool.
        let mut unshare = self.unshare;
        if let Some(ns) = pooled {
            if sys::setns(ns.as_raw_fd(), libc::CLONE_NEWNET as u64).is_ok() {
                unshare &= !(libc::CLONE_NEWNET as u64);
            }
        }
        // SAFETY: our copy of the zygote's table: nothing in the task owns the others.
        unsafe { sys::close_all_except(&keep) }.unwrap_or_else(|e| fail(Step::CloseFdsEarly, e));
        for (i, &fd) in attach.iter().enumerate() {
            // SAFETY: a kept fd, open until we exit or it is closed below.
            if let Err(e) = rustix::io::write(unsafe { sys::borrow_fd(fd) }, b"0") {
                ch.fail(Step::AttachCgroup, i as u32, e);
            }
        }
        if unshare != 0 {
            sys::unshare(unshare).unwrap_or_else(|e| fail(Step::CgroupNs, e));
        }
        rustix::process::chdir(c"/").unwrap_or_else(|e| fail(Step::Chdir, e));
        let mut fs_state = mount::FsState::default();
        for &fd in attach {
            // SAFETY: a kept fd (a cgroup file the task attached itself through).
            if let Ok(st) = rustix::fs::fstat(unsafe { sys::borrow_fd(fd) }) {
                for (i, &dev) in self.cgroup_devs.iter().enumerate() {
                    if dev == st.st_dev {
                        fs_state.own_cgroups |= 1 << i;
                    }
                }
            }
        }
        for (i, st) in self.steps.iter().enumerate() {
            if let Err(e) = mount::run(&st.op, &[], &mut fs_state) {
                ch.fail(Step::Fs, i as u32, e);
            }
        }
        let plan = &self.plan;
        if let Some(name) = &plan.hostname {
            rustix::system::sethostname(name).unwrap_or_else(|e| fail(Step::Hostname, e));
        }
        if plan.loopback && unshare & libc::CLONE_NEWNET as u64 != 0 {
            sys::loopback_up().unwrap_or_else(|e| fail(Step::Loopback, e));
        }
        self.task_setup(stdio, [result, payload, report, go], &ch);
    }

    /// In the task: ids, capabilities, rlimits, stdio, seccomp; then report "ready".
    fn task_setup(&self, stdio: &[RawFd], [result, payload, report, go]: [RawFd; 4], ch: &ChildChannel) {
        let plan = &self.plan;
        let fail = |step: Step, e: Errno| -> ! { ch.fail(step, 0, e) };
        let ambient = crate::spawn::drop_bounding_and_set_ids(plan, ch, &|| {});
        crate::spawn::set_capabilities(plan, ambient, ch);
        if plan.new_session {
            rustix::process::setsid().unwrap_or_else(|e| fail(Step::Setsid, e));
        }
        sys::set_no_new_privs().unwrap_or_else(|e| fail(Step::NoNewPrivs, e));
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::Dumpable)
            .unwrap_or_else(|e| fail(Step::NoNewPrivs, e));
        if self.scoped {
            landlock_scope().unwrap_or_else(|e| fail(Step::Seccomp, e));
        }
        // No core to the host's core_pattern: 1, the value the kernel starts no pipe helper for.
        if !plan.rlimits.iter().any(|r| r.0 == libc::RLIMIT_CORE) {
            sys::rlimit_set(libc::RLIMIT_CORE, 1).unwrap_or_else(|e| fail(Step::Rlimit, e));
        }
        if let Some((soft, hard)) = self.task_nofile {
            sys::rlimit_set_pair(libc::RLIMIT_NOFILE, soft, hard).unwrap_or_else(|e| fail(Step::Rlimit, e));
        }
        for (i, &(resource, soft, hard)) in plan.rlimits.iter().enumerate() {
            sys::rlimit_set_pair(resource, soft, hard).unwrap_or_else(|e| ch.fail(Step::Rlimit, i as u32 + 1, e));
        }
        // 0..2 stdio, 3 result, 4 payload, 5 report, 6 go: lift every source above 6 first.
        let mut src = [stdio[0], stdio[1], stdio[2], result, payload, report, go];
        for fd in src.iter_mut() {
            *fd = sys::dup_above(*fd, 16).unwrap_or_else(|e| fail(Step::Stdio, e));
        }
        for (target, &fd) in src.iter().enumerate() {
            // SAFETY: 0..5 of the task's own table, which it owns from here.
            unsafe { sys::dup2(fd, target as RawFd) }.unwrap_or_else(|e| fail(Step::Stdio, e));
        }
        let ch = ChildChannel { report: REPORT_FD, go: -1, go_parent: -1 };
        // SAFETY: the task's copy of C's table; from 7 up nothing is the task's.
        unsafe { sys::close_range(GO_FD as u32 + 1, u32::MAX, 0) }.unwrap_or_else(|e| ch.fail(Step::CloseFds, 0, e));
        for fd in [RESULT_FD, PAYLOAD_FD, REPORT_FD, GO_FD] {
            sys::set_cloexec(fd, true).unwrap_or_else(|e| ch.fail(Step::CloseFds, 0, e));
        }
        mount::chdir_in_root(plan.cwd.as_c_str()).unwrap_or_else(|e| ch.fail(Step::Chdir, 0, e));
        sys::child_unblock_all_signals();
        if let Some(filter) = &plan.seccomp {
            filter.install().unwrap_or_else(|e| ch.fail(Step::Seccomp, 0, e));
        }
        // Ready: the caller reads EOF once C has exec'd nsfast-init too.
        // SAFETY: ours, not used after.
        drop(unsafe { OwnedFd::from_raw_fd(REPORT_FD) });
    }
}

enum Forked {
    Parent(OwnedFd),
    Task,
}

struct InitCtx {
    init: RawFd,
    watch: RawFd,
    argv: *const *const u8,
    envp: *const *const u8,
}

extern "C" fn init_main(arg: *mut std::ffi::c_void) -> std::ffi::c_int {
    // SAFETY: the zygote's InitCtx, alive and unchanged until we exec or exit (CLONE_VFORK).
    let ctx = unsafe { &*(arg as *const InitCtx) };
    // (Every signal is blocked until the exec, which resets the handlers: none of the
    // zygote's can run here.)
    // No capability survives the exec (as root, it would get the bounding set).
    const SECBIT_NOROOT: usize = 1 << 0;
    const SECBIT_NOROOT_LOCKED: usize = 1 << 1;
    // SAFETY: integer arguments.
    if unsafe { libc::syscall(libc::SYS_prctl, libc::PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0) }
        != 0
    {
        sys::exit_now(127);
    }
    let _ = sys::capset(0);
    let mut keep = [ctx.watch, ctx.init];
    keep.sort_unstable();
    // SAFETY: our (CLONE_VM, not CLONE_FILES) copy of the zygote's fd table.
    if unsafe { sys::close_all_except(&keep) }.is_err() || sys::set_cloexec(ctx.watch, false).is_err() {
        sys::exit_now(127);
    }
    // SAFETY: NULL-terminated arrays of C strings in the zygote's frame (alive: CLONE_VFORK).
    let _ = unsafe { sys::execve_fd(ctx.init, ctx.argv, ctx.envp) };
    sys::exit_now(127)
}

/// A signalfd for SIGCHLD, which it blocks in the calling (the zygote's one) thread.
fn sigchld_fd() -> Result<OwnedFd, Errno> {
    // SAFETY: sigset_t is plain data; the calls only read and write these.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The kernel's Landlock ABI version (0: none).
pub fn landlock_abi() -> i64 {
    use linux_raw_sys::landlock::LANDLOCK_CREATE_RULESET_VERSION;
    // SAFETY: NULL attr, size 0: the version query reads nothing.
    let v =
        unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, 0usize, 0usize, LANDLOCK_CREATE_RULESET_VERSION) };
    v.max(0)
}

/// Child-safe: put the caller in a Landlock domain of its own that scopes abstract unix
/// sockets and signals (no access right is handled: files and ports are untouched).
fn landlock_scope() -> Result<(), Errno> {
    use linux_raw_sys::landlock::{landlock_ruleset_attr, LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET, LANDLOCK_SCOPE_SIGNAL};
    let attr = landlock_ruleset_attr {
        handled_access_fs: 0,
        handled_access_net: 0,
        scoped: (LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL) as u64,
    };
    let errno = || Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
    // SAFETY: a live ruleset attr of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const landlock_ruleset_attr,
            std::mem::size_of::<landlock_ruleset_attr>(),
            0usize,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the ruleset fd just made; integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0usize) };
    let e = errno();
    // SAFETY: ours.
    unsafe { sys::close(fd as RawFd) };
    if r != 0 {
        return Err(e);
    }
    Ok(())
}
