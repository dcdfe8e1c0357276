//! `docker exec`: start a process inside a running sandbox, with nothing of the caller in reach.
//!
//! setns() into a pid namespace only affects children, so (like runc exec) an exec takes a
//! helper process that joins the namespaces and then forks the final process. The helper is
//! not the caller's clone: it is nsfast-init's exec mode (`init/exec.rs`), exec'd from the
//! sealed memfd by a short-lived child that kept only the fds it needs, so no process that
//! can reach the container shares the caller's memory, fd table or environment. The sandbox's
//! namespaces and root are the ones it had at start, held as fds ([`Target`]).
//!
//! Sequence:
//!   caller:       clone3(CLONE_VM | CLONE_VFORK) on a private stack (no page-table copy)
//!   intermediate: reset signals, close every fd but the helper's, execveat(nsfast-init --exec)
//!   helper:       not dumpable, PDEATHSIG; setns into the held namespaces (but cgroup);
//!                 clone3(CLONE_PARENT | CLONE_INTO_CGROUP) -> report {STEP_EXEC_PID, pid}; exit
//!   final:        close fds -> v1 tasks -> setns cgroup -> chroot to the held root -> cwd
//!                 resolved inside it -> bounding set, ids, caps -> setsid -> no_new_privs ->
//!                 RLIMIT_CORE 0 -> stdio -> seccomp -> exec
//!   caller:       reads the report pipe to EOF (the helper and the final process both hold it
//!                 until they exit or exec): the pid record, and an error record or nothing.

use std::ffi::{c_int, c_void, CString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};

use crate::error::{Error, Result};
use crate::seccomp::Filter;
use crate::spawn::{self, Child, Io};
use crate::spec::{CStrArray, Plan};
use crate::sync::{self, ChildChannel, ChildError, Step};
use crate::sys::{self, CloneArgs, Stack};

/// The helper's report of the final process's pid (`index`); not a failure.
pub const STEP_EXEC_PID: u32 = 1000;

/// The intermediate runs a few small frames before it execs.
const STACK_SIZE: usize = 64 * 1024;

/// Where the exec'd process starts.
pub enum Cwd {
    /// A path resolved inside the target's root (openat2 RESOLVE_IN_ROOT, no magic links).
    Path(CString),
    /// A directory fd (the target's own working directory, for `enter` without a cwd).
    Fd(OwnedFd),
}

/// What an exec joins: namespaces and root, as fds opened when the target was known good.
pub struct Target {
    /// (CLONE_NEW* flag, namespace fd) for each type to join.
    pub ns: Vec<(u64, OwnedFd)>,
    /// The target's root directory (O_PATH).
    pub root: OwnedFd,
    pub cwd: Cwd,
}

impl Target {
    /// The namespaces (types `ns_flags`), root and (without `cwd`) working directory of
    /// process `pid`, opened now (`nsenter -t PID`). A pidfd taken first proves the files
    /// were those of `pid` and not of a process that reused its number.
    pub fn of_process(pid: i32, ns_flags: u64, cwd: Option<CString>) -> Result<Target> {
        let gone = |e: Errno| Error::spawn("open target", Some(format!("/proc/{pid}")), e);
        let p = Pid::from_raw(pid).ok_or_else(|| Error::invalid("pid", "must be positive"))?;
        let pidfd = rustix::process::pidfd_open(p, PidfdFlags::empty()).map_err(gone)?;
        let open = |what: &str, flags: OFlags| {
            rustix::fs::open(format!("/proc/{pid}/{what}"), flags | OFlags::CLOEXEC, Mode::empty()).map_err(gone)
        };
        let dir = OFlags::PATH | OFlags::DIRECTORY;
        let mut ns = Vec::new();
        for (name, flag) in crate::ns::NAMESPACES {
            if ns_flags & flag != 0 {
                ns.push((flag, open(&format!("ns/{name}"), OFlags::RDONLY)?));
            }
        }
        let root = open("root", dir)?;
        let cwd = match cwd {
            Some(c) => Cwd::Path(c),
            None => Cwd::Fd(open("cwd", dir)?),
        };
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        if poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })).map_err(gone)? > 0 {
            return Err(gone(Errno::SRCH)); // it exited: the files may be another process's
        }
        Ok(Target { ns, root, cwd })
    }
}

/// What the intermediate needs, prepared by the caller (it shares our memory until exec).
struct MidCtx<'a> {
    /// Every fd the helper gets, sorted: all others are closed.
    keep: &'a [RawFd],
    /// The kept fds that must survive the helper's execve (their CLOEXEC cleared).
    inherit: &'a [RawFd],
    init_fd: RawFd,
    argv: &'a CStrArray,
    envp: *const *const u8,
    chan: ChildChannel,
}

/// Start `plan`'s command inside `target`: the container's namespaces, root and cwd, and
/// (`io.cgroup`, an exec cgroup or an existing process's cgroups) its cgroups. Returns once
/// the command has been exec'd; the process is our child.
pub fn spawn_join(plan: &Plan, io: &Io, target: &Target) -> Result<Child> {
    // (Dropped when this returns: the vforked child has exec'd or died by then.)
    let _dumpable = sys::KeepDumpable::new();
    if !spawn::clone3_missing() {
        match spawn_join_with(plan, io, target, false)? {
            Some(child) => return Ok(child),
            None => spawn::note_no_clone3(),
        }
    }
    Ok(spawn_join_with(plan, io, target, true)?.expect("clone(2) is not retried"))
}

/// One attempt; `Ok(None)`: clone3 is ENOSYS (nothing was started). `legacy`: clone3 is
/// missing, so the helper clones the final process with clone(2), which has no
/// CLONE_INTO_CGROUP: the final process moves itself into the exec's cgroup instead, writing
/// "0" to its `cgroup.procs` (opened here) as it does to v1 `tasks` files.
fn spawn_join_with(plan: &Plan, io: &Io, target: &Target, legacy: bool) -> Result<Option<Child>> {
    let cgroup_fd = io.cgroup.and_then(|c| c.clone_fd());
    let mut tasks = match io.cgroup {
        Some(cg) => {
            cg.self_attach_files().map_err(|e| Error::spawn("attach cgroup", Some(e.to_string()), Errno::NOTSUP))?
        }
        None => Vec::new(),
    };
    if let Some(fd) = cgroup_fd.filter(|_| legacy) {
        // SAFETY: io.cgroup owns the directory fd and outlives this call.
        let dir = unsafe { sys::borrow_fd(fd) };
        let procs = rustix::fs::openat(dir, c"cgroup.procs", OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::spawn("attach cgroup", Some("cgroup.procs".into()), e))?;
        tasks.push(procs);
    }
    let cgroup_fd = cgroup_fd.filter(|_| !legacy);
    let seccomp = plan
        .seccomp
        .as_ref()
        .map(seccomp_fd)
        .transpose()
        .map_err(|e| Error::spawn("install seccomp filter", None, e))?;
    let init_fd = spawn::init_binary().map_err(|e| Error::spawn("load nsfast-init", None, e))?;
    let (parent, chan, report_w, _) = sync::channel(false).map_err(|e| Error::spawn("pipe", None, e))?;
    let report = report_w.as_raw_fd();

    // The namespaces the helper joins (by index in its error reports); the cgroup
    // namespace is joined by the final process, once inside its cgroup.
    let joined: Vec<(u64, RawFd)> = target
        .ns
        .iter()
        .map(|(f, fd)| (*f, fd.as_raw_fd()))
        .filter(|(f, _)| *f != libc::CLONE_NEWCGROUP as u64)
        .collect();
    let cgroupns = target.ns.iter().find(|(f, _)| *f == libc::CLONE_NEWCGROUP as u64).map(|(_, fd)| fd.as_raw_fd());
    let joins_user = joined.iter().any(|(f, _)| *f == libc::CLONE_NEWUSER as u64);
    // In a joined user namespace our own ids (host root for a root caller) are not mapped:
    // become the sandbox's ids (default 0) there.
    let uid = plan.set_ids.and_then(|s| s.uid).or(joins_user.then_some(0));
    let gid = plan.set_ids.and_then(|s| s.gid).or(joins_user.then_some(0));
    let (cwd_arg, cwd_fd) = match &target.cwd {
        Cwd::Path(p) => (Some(p), None),
        Cwd::Fd(fd) => (None, Some(fd.as_raw_fd())),
    };

    let mut argv = Vec::<Vec<u8>>::new();
    let mut arg = |a: String| argv.push(a.into_bytes());
    arg("nsfast-init".into());
    arg("--exec".into());
    arg(format!("report={report}"));
    arg(format!("ppid={}", std::process::id()));
    arg(format!("pdeath={}", plan.die_with_parent as u8));
    for (f, fd) in &joined {
        arg(format!("ns={f}:{fd}"));
    }
    if let Some(fd) = cgroupns {
        arg(format!("cgroupns={fd}"));
    }
    if let Some(fd) = cgroup_fd {
        arg(format!("cgroup={fd}"));
    }
    for t in &tasks {
        arg(format!("tasks={}", t.as_raw_fd()));
    }
    arg(format!("root={}", target.root.as_raw_fd()));
    if let Some(fd) = cwd_fd {
        arg(format!("cwdfd={fd}"));
    }
    arg(format!("stdio={},{},{}", io.stdio[0], io.stdio[1], io.stdio[2]));
    for fd in io.pass_fds {
        arg(format!("pass={fd}"));
    }
    if let Some(u) = uid {
        arg(format!("uid={u}"));
    }
    if let Some(g) = gid {
        arg(format!("gid={g}"));
    }
    arg(format!("keep={}", plan.keep_caps));
    arg(format!("caplast={}", plan.cap_last));
    arg(format!("session={}", plan.new_session as u8));
    if let Some(n) = plan.nproc {
        arg(format!("nproc={n}"));
    }
    for &(resource, soft, hard) in &plan.rlimits {
        let v = |x: u64| if x == u64::MAX { -1 } else { x as i64 };
        arg(format!("rlimit={resource}:{}:{}", v(soft), v(hard)));
    }
    if let Some(fd) = &seccomp {
        arg(format!("seccomp={fd}"));
    }
    if let Some(p) = cwd_arg {
        argv.push([b"cwd=", p.as_bytes()].concat());
    }
    for c in &plan.exec.candidates {
        argv.push([b"cand=", c.as_bytes()].concat());
    }
    argv.push(b"--".to_vec());
    argv.extend(plan.exec.argv_strings.iter().map(|a| a.as_bytes().to_vec()));
    let argv =
        CStrArray::new(argv.into_iter().map(|a| CString::new(a).expect("no NUL: built from C strings and numbers")));

    let mut inherit: Vec<RawFd> = vec![report, target.root.as_raw_fd()];
    inherit.extend(target.ns.iter().map(|(_, fd)| fd.as_raw_fd()));
    inherit.extend(cwd_fd.iter().chain(cgroup_fd.iter()).chain(seccomp.iter()));
    inherit.extend(tasks.iter().map(|t| t.as_raw_fd()));
    inherit.extend(io.stdio.iter().copied().filter(|&fd| fd >= 0));
    inherit.extend(io.pass_fds);
    inherit.sort_unstable();
    inherit.dedup();
    // 0..2 stay as they are (the command inherits those not replaced); the memfd closes at exec.
    let mut keep: Vec<RawFd> = inherit.iter().copied().chain([0, 1, 2, init_fd]).collect();
    keep.sort_unstable();
    keep.dedup();
    let ctx = MidCtx { keep: &keep, inherit: &inherit, init_fd, argv: &argv, envp: plan.exec.envp.as_ptr(), chan };

    let stack = Stack::new(STACK_SIZE).map_err(|e| Error::spawn("mmap stack", None, spawn::errno_of(&e)))?;
    let flags = libc::CLONE_VM as u64 | libc::CLONE_VFORK as u64;
    let mut args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.bottom(),
        stack_size: stack.size(),
        ..CloneArgs::default()
    };
    let arg = &ctx as *const MidCtx as *mut c_void;
    // This thread's children now: the final process is a new one (CLONE_PARENT makes it
    // ours), found there while the helper, stuck in vfork until it execs, cannot say its pid.
    let before = thread_children();
    // Blocked across clone so no handler of ours runs in the intermediate before it resets them.
    let old_mask = sys::block_all_signals();
    // SAFETY: CLONE_VFORK: we resume only once the intermediate has exec'd or exited, i.e.
    // left our memory; `stack` and `ctx` live until then.
    let res = unsafe { sys::clone_any(&mut args, legacy, intermediate_main, arg) };
    sys::restore_signals(&old_mask);
    if res == Err(Errno::NOSYS) && !legacy {
        return Ok(None); // nothing started: retried with clone(2), the final process moving itself
    }
    drop(stack);
    drop(report_w);
    drop(tasks);
    let helper = res.map_err(|e| Error::spawn("clone3", None, e))?;

    // Until EOF: the helper's pid record, then the final process's failure or nothing.
    // The final process is the container's uid from setresuid to execve, which any of its
    // processes may SIGSTOP: one stopped there is killed and the join fails, rather than
    // this wait (and the caller, and its timeout, which starts at exec) hanging forever.
    let mut pid = None;
    let mut found = None;
    let mut failure = None;
    let deadline = std::time::Instant::now() + JOIN_SETUP_LIMIT;
    let read_err = loop {
        let known = pid;
        let mut stalled = || {
            let stopped = match known {
                Some(p) => is_stopped(p).then_some(p),
                // (The helper writes the pid only once the final process has exec'd.)
                None => new_children(before.as_deref(), helper).into_iter().find(|&c| is_stopped(c)),
            };
            stopped.map(|p| {
                found = Some(p);
                Errno::CANCELED
            })
        };
        match parent.wait_exec_watched(deadline, JOIN_TICK, &mut stalled) {
            Ok(Some(rec)) if rec.step == STEP_EXEC_PID && rec.errno == 0 => pid = Some(rec.index as i32),
            Ok(Some(rec)) => {
                failure.get_or_insert(rec);
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    if let Some(e) = read_err {
        // Killed before the helper is reaped: the helper waits (vfork) on it. (Not known at
        // a deadline before the helper said: then every new child of this thread's.)
        let doomed = match pid.or(found) {
            Some(p) => vec![p],
            None => new_children(before.as_deref(), helper),
        };
        for p in doomed {
            kill_and_reap(p);
        }
        reap(helper);
        let why = match e {
            Errno::CANCELED => Some(
                "the process joining the sandbox was stopped (SIGSTOP from inside?) before it could exec: killed"
                    .to_string(),
            ),
            Errno::TIMEDOUT => Some(format!(
                "the process joining the sandbox did not exec within {} s: killed",
                JOIN_SETUP_LIMIT.as_secs()
            )),
            _ => None,
        };
        return Err(Error::spawn("join", why, e));
    }
    let helper_status = reap(helper);
    match (pid, failure) {
        (Some(p), None) => {
            // The final process is our child (CLONE_PARENT): its pid cannot be reused before
            // we reap it, so pidfd_open is race-free here.
            match rustix::process::pidfd_open(Pid::from_raw(p).expect("positive"), PidfdFlags::empty()) {
                Ok(pidfd) => Ok(Some(Child { pid: p, pidfd, status: None, trees: Vec::new(), held: Vec::new() })),
                Err(e) => {
                    kill_and_reap(p);
                    Err(Error::spawn("pidfd_open", None, e))
                }
            }
        }
        (p, Some(rec)) => {
            if let Some(p) = p {
                reap(p);
            }
            Err(exec_error(plan, &joined, rec))
        }
        (None, None) => Err(Error::spawn(
            "exec helper",
            Some(format!("nsfast-init --exec ended with wait status {helper_status}")),
            Errno::CHILD,
        )),
    }
}

/// How long a join may take to exec its command (its setup: namespaces, ids, seccomp, the
/// command's lookup) before it is killed: far more than it ever takes, but a bound on what
/// a sandbox can make it take (freezing it in a cgroup it owns, stopping and continuing it).
const JOIN_SETUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How often a join that has not exec'd yet is looked at (stopped?).
const JOIN_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// The pids of this thread's children (None where the kernel does not list them).
fn thread_children() -> Option<Vec<i32>> {
    let text = std::fs::read_to_string("/proc/thread-self/children").ok()?;
    Some(text.split_ascii_whitespace().filter_map(|p| p.parse().ok()).collect())
}

/// This thread's children that are not in `before` nor `helper`: the final process of a
/// join (empty where the kernel does not list children).
fn new_children(before: Option<&[i32]>, helper: i32) -> Vec<i32> {
    let (Some(old), Some(now)) = (before, thread_children()) else { return Vec::new() };
    now.into_iter().filter(|c| *c != helper && !old.contains(c)).collect()
}

/// Whether process `pid` (our child, so not reused) is stopped: state T or t in its stat.
fn is_stopped(pid: i32) -> bool {
    let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else { return false };
    let Some(close) = stat.iter().rposition(|&b| b == b')') else { return false };
    matches!(stat.get(close + 2), Some(b'T' | b't'))
}

fn reap(pid: i32) -> i32 {
    match rustix::process::waitpid(Pid::from_raw(pid), WaitOptions::empty()) {
        Ok(Some((_, status))) => status.as_raw(),
        _ => -1,
    }
}

fn kill_and_reap(pid: i32) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, Signal::KILL);
    }
    reap(pid);
}

/// The failure record as an error naming the step (and the namespace, for setns).
fn exec_error(plan: &Plan, joined: &[(u64, RawFd)], rec: ChildError) -> Error {
    let errno = Errno::from_raw_os_error(rec.errno);
    match Step::from_raw(rec.step) {
        Some(Step::JoinNamespaces) => {
            let name = joined
                .get(rec.index as usize)
                .and_then(|(f, _)| crate::ns::NAMESPACES.iter().find(|(_, nf)| nf == f))
                .map(|(n, _)| format!("{n} namespace"));
            Error::spawn("setns", name, errno)
        }
        _ => spawn::child_error(plan, rec),
    }
}

extern "C" fn intermediate_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the caller's MidCtx, alive and unchanged until we exec or exit.
    let ctx = unsafe { &*(arg as *const MidCtx) };
    intermediate(ctx)
}

/// Child-safe (shares the caller's memory): keep only the helper's fds, exec the helper.
fn intermediate(ctx: &MidCtx) -> ! {
    let ch = &ctx.chan;
    sys::child_reset_signal_dispositions();
    // Our copy of the caller's fd table: the helper gets nothing else.
    // SAFETY: our copy of the caller's table: nothing in this process owns the others.
    unsafe { sys::close_all_except(ctx.keep) }.unwrap_or_else(|e| ch.fail(Step::CloseFdsEarly, 0, e));
    for &fd in ctx.inherit {
        sys::set_cloexec(fd, false).unwrap_or_else(|e| ch.fail(Step::CloseFds, 0, e));
    }
    // SAFETY: prepared NULL-terminated arrays; envp is the command's environment.
    let e = unsafe { sys::execve_fd(ctx.init_fd, ctx.argv.as_ptr(), ctx.envp) };
    ch.fail(Step::ExecInit, 0, e)
}

/// The filter's programs in a sealed memfd for the helper, made once per filter.
fn seccomp_fd(filter: &Arc<Filter>) -> std::result::Result<RawFd, Errno> {
    type Fds = Mutex<Vec<(Arc<Filter>, OwnedFd)>>;
    static FDS: OnceLock<Fds> = OnceLock::new();
    let mut fds = FDS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, fd)) = fds.iter().find(|(f, _)| Arc::ptr_eq(f, filter)) {
        return Ok(fd.as_raw_fd());
    }
    let fd = crate::sys::sealed_memfd(c"nsfast-seccomp", &filter.to_bytes(), false)?;
    let raw = fd.as_fd().as_raw_fd();
    fds.push((filter.clone(), fd));
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_numbers_its_steps_as_the_library() {
        let src = include_str!("../init/exec.rs");
        for (name, step) in [
            ("SET_GROUPS", Step::SetGroups as u32),
            ("SET_GID", Step::SetGid as u32),
            ("SET_UID", Step::SetUid as u32),
            ("DROP_CAPS", Step::DropCaps as u32),
            ("NO_NEW_PRIVS", Step::NoNewPrivs as u32),
            ("DEATH_SIGNAL", Step::DeathSignal as u32),
            ("SETSID", Step::Setsid as u32),
            ("STDIO", Step::Stdio as u32),
            ("CLOSE_FDS", Step::CloseFds as u32),
            ("CHDIR", Step::Chdir as u32),
            ("EXEC", Step::Exec as u32),
            ("JOIN_NAMESPACES", Step::JoinNamespaces as u32),
            ("CHROOT", Step::Chroot as u32),
            ("CLONE_JOINED", Step::CloneJoined as u32),
            ("JOIN_CGROUP_NS", Step::JoinCgroupNs as u32),
            ("ATTACH_CGROUP", Step::AttachCgroup as u32),
            ("SECCOMP", Step::Seccomp as u32),
            ("RLIMIT", Step::Rlimit as u32),
            ("CLOSE_FDS_EARLY", Step::CloseFdsEarly as u32),
            ("EXEC_PID", STEP_EXEC_PID),
        ] {
            assert!(src.contains(&format!("const STEP_{name}: u32 = {step};")), "STEP_{name} must be {step}");
        }
        assert_eq!(Step::from_raw(STEP_EXEC_PID), None);
    }
}
