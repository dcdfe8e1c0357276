//! nsfast-init: the tiny pid 1 of `init=True` sandboxes.
//!
//! Built by build.rs as a static binary without libc (see rt.rs) and run from a sealed memfd,
//! so it works in any rootfs and shares nothing with the Python parent. It starts the
//! command, forwards every signal it receives to it, reaps every orphan, and exits with the
//! command's status (128+N if the command was killed by signal N, as shells and tini do).
//!
//! pid 1 of a pid namespace cannot die by a signal from inside (SIGNAL_UNKILLABLE), so that
//! exit code cannot say "killed by N": before exiting, init writes the command's raw wait
//! status to STATUS_FD (an 8-byte `{STATUS_TAG, status}` record, sync::StatusReport in the
//! library), and the parent uses it. Only init holds that fd (close-on-exec, so the command
//! never has it), and init is not dumpable: the command cannot ptrace it, nor open its
//! /proc/1/fd or /proc/1/mem (that needs CAP_SYS_PTRACE, which the sandbox does not keep).
//!
//! Command line: nsfast-init REPORT_FD STATUS_FD N CANDIDATE_1..CANDIDATE_N -- ARGV...
//! (STATUS_FD -1: no status report).
//! With no ARGV it idles as a container's main process: it reaps whatever is started in
//! the sandbox (by exec) and exits 0 on SIGTERM, SIGINT or SIGHUP.
//! If no candidate can be exec'd, the failure is written to REPORT_FD in nsfast's 12-byte
//! child report format, as the sandbox setup would have.
//!
//! With NSFAST_INIT_GATE=GATE_FD,RESULT_FD[,fork] in its environment it is first a gate: it
//! closes REPORT_FD (the sandbox is set up) and waits until GATE_FD reads a byte; an exec
//! failure then goes to RESULT_FD instead. Without `fork` it execs the command itself, in
//! place, as pid 1 (Container with init=False); with it, it goes on as above, the command its
//! child. A Container uses that to hold its namespaces and root before its command runs (and
//! could make others, or exit).
//!
//! `nsfast-init --watch FD`: a zygote task's pid 1 (see zygote.rs in the library). The task
//! is its sibling, pid 2, the zygote's child (the zygote reaps it and reports its status):
//! once FD reads a byte (the task exists) it waits for pid 2 to end, reaping the orphans
//! that come to it meanwhile, then exits, which ends the rest of the pid namespace.
//!
//! `nsfast-init --exec ...` is the other mode: `Container.exec`'s helper (see exec.rs).
#![no_std]
#![no_main]
#![no_builtins]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

mod exec;
mod rt;

use rt::{nr, sys, Args};

/// sync::Step::Exec in the library (a unit test there checks the two agree).
const STEP_EXEC: u32 = 15;
/// sync::STATUS_TAG in the library (a unit test there checks the two agree).
const STATUS_TAG: u32 = 0x6e736673;

const SIGCHLD: i32 = 17;
const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
const WNOHANG: usize = 1;
const FD_CLOEXEC: usize = 1;
const PR_SET_NAME: usize = 15;
const PR_SET_DUMPABLE: usize = 4;
const PR_SET_CHILD_SUBREAPER: usize = 36;
const ALL_SIGNALS: u64 = !0;

fn main(args: Args) -> ! {
    if args.get(1) == Some(b"--exec") {
        exec::main(args);
    }
    // First: nothing in the sandbox may ptrace us or reach our fds through /proc/1 (the
    // command inherits this until its execve, which makes it dumpable again).
    // SAFETY: integer arguments.
    if unsafe { sys(nr::PRCTL, [PR_SET_DUMPABLE, 0, 0, 0, 0, 0]) }.is_err() {
        rt::exit(127);
    }
    if args.get(1) == Some(b"--watch") {
        match args.get(2).and_then(rt::num).and_then(|n| i32::try_from(n).ok()) {
            Some(fd) => watch(fd),
            None => {
                rt::say(b"nsfast-init: usage: nsfast-init --watch FD\n");
                rt::exit(127)
            }
        }
    }
    let num = |i: usize| args.get(i).and_then(rt::num).and_then(|n| usize::try_from(n).ok());
    let status = args.get(2).and_then(rt::num).and_then(|n| i32::try_from(n).ok());
    let (Some(report), Some(status), Some(n)) = (num(1), status, num(3)) else {
        rt::say(b"nsfast-init: usage: nsfast-init REPORT_FD STATUS_FD N CANDIDATE... -- ARGV...\n");
        rt::exit(127)
    };
    let report = report as i32;
    if n > args.argc || args.get(4 + n) != Some(b"--") {
        rt::say(b"nsfast-init: missing -- ARGV\n");
        rt::exit(127);
    }
    let candidates = 4..4 + n;
    let argv_start = 4 + n + 1;
    let mut report = report;
    if let Some(gate) = take_env(&args, b"NSFAST_INIT_GATE=") {
        let (result, fork) = pass_gate(report, gate);
        if !fork {
            // The command is exec'd in place: it is pid 1 itself, no status report.
            if status >= 0 {
                rt::close(status);
            }
            // SAFETY: integer arguments (F_SETFD, F_DUPFD_CLOEXEC).
            let _ = unsafe { sys(nr::FCNTL, [result as usize, rt::F_SETFD, FD_CLOEXEC, 0, 0, 0]) };
            // SAFETY: the kernel's argv and envp arrays (NULL-terminated, alive for the process);
            // candidates are argv strings (Args::ptr: NULL when out of range).
            let err =
                unsafe { rt::exec_candidates(candidates.map(|i| args.ptr(i, 0)), args.tail(argv_start), args.envp) };
            rt::record(result, STEP_EXEC, 0, err);
            rt::exit(127)
        }
        // The command's exec failure goes to `result`, which reads EOF once it exec'd.
        report = result;
    }

    // SAFETY: integer arguments (F_SETFD, F_DUPFD_CLOEXEC).
    let _ = unsafe { sys(nr::FCNTL, [report as usize, rt::F_SETFD, FD_CLOEXEC, 0, 0, 0]) };
    prepare(status);
    if argv_start >= args.argc {
        // Our copy of the report pipe: nothing to exec, so setup is complete.
        rt::close(report);
        if status >= 0 {
            rt::close(status);
        }
        idle();
    }

    // vfork: the command's process shares our memory until its execve (no page table to
    // copy, no copy-on-write faults), on a stack of its own; we wait meanwhile.
    let start = Start { args, candidates, argv_start, report };
    let top = (exec::STACK.0.get() as usize + core::mem::size_of::<exec::Stack>()) as *mut u8;
    // SAFETY: the child only reads `start` and runs on STACK, both untouched by us while
    // CLONE_VFORK stops us; it execs or exits.
    let pid = match unsafe { rt::vfork_on(top, start_command, &start as *const Start as usize) } {
        Ok(pid) => pid as i32,
        Err(_) => rt::exit(127),
    };
    // Our copy of the report pipe; the parent reads EOF once the command exec'd.
    rt::close(report);
    supervise(pid, status)
}

/// A zygote task's pid 1: wait for the byte on `fd`, then until pid 2 ends; reap orphans.
fn watch(fd: i32) -> ! {
    const POLLIN: u16 = 1;
    const SIGCHLD_MASK: u64 = 1 << (SIGCHLD - 1);
    const SFD_CLOEXEC: usize = 0o2000000;
    prepare(-1);
    let mut b = [0u8; 1];
    // SAFETY: into a live buffer of ours, of the length given.
    if unsafe { sys(nr::READ, [fd as usize, b.as_mut_ptr() as usize, 1, 0, 0, 0]) } != Ok(1) {
        rt::exit(127); // the zygote did not fork the task
    }
    rt::close(fd);
    // SAFETY: integer arguments.
    let Ok(task) = (unsafe { sys(nr::PIDFD_OPEN, [2, 0, 0, 0, 0, 0]) }) else {
        rt::exit(0) // ended already
    };
    // SAFETY: a live 8-byte sigset on our stack.
    let Ok(sfd) =
        (unsafe { sys(nr::SIGNALFD4, [usize::MAX, &SIGCHLD_MASK as *const u64 as usize, 8, SFD_CLOEXEC, 0, 0]) })
    else {
        rt::exit(127)
    };
    // struct pollfd {int fd; short events; short revents;} x2
    let mut fds = [0u8; 16];
    fds[0..4].copy_from_slice(&(task as i32).to_ne_bytes());
    fds[4..6].copy_from_slice(&POLLIN.to_ne_bytes());
    fds[8..12].copy_from_slice(&(sfd as i32).to_ne_bytes());
    fds[12..14].copy_from_slice(&POLLIN.to_ne_bytes());
    let mut info = [0u8; 128];
    loop {
        // SAFETY: two live pollfds; no timeout, no mask.
        let _ = unsafe { sys(nr::PPOLL, [fds.as_mut_ptr() as usize, 2, 0, 0, 8, 0]) };
        if u16::from_ne_bytes([fds[6], fds[7]]) != 0 {
            rt::exit(0); // the task ended: so does its pid namespace
        }
        if u16::from_ne_bytes([fds[14], fds[15]]) != 0 {
            // SAFETY: into a live 128-byte buffer (one signalfd_siginfo).
            let _ = unsafe { sys(nr::READ, [sfd, info.as_mut_ptr() as usize, 128, 0, 0, 0]) };
            while reap_one().is_some() {}
        }
        fds[6] = 0;
        fds[7] = 0;
        fds[14] = 0;
        fds[15] = 0;
    }
}

/// Block every signal (we take them with sigtimedwait), become a subreaper, keep the status
/// report from the command (close-on-exec), and take our name.
fn prepare(status: i32) {
    rt::set_sigmask(ALL_SIGNALS);
    // SAFETY: integer arguments.
    let _ = unsafe { sys(nr::PRCTL, [PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, 0]) };
    // SAFETY: integer arguments (F_SETFD, F_DUPFD_CLOEXEC).
    if status >= 0 && unsafe { sys(nr::FCNTL, [status as usize, rt::F_SETFD, FD_CLOEXEC, 0, 0, 0]) }.is_err() {
        rt::exit(127);
    }
    // The name shows in ps instead of "memfd:nsfast-init".
    // SAFETY: integer arguments.
    let _ = unsafe { sys(nr::PRCTL, [PR_SET_NAME, c"nsfast-init".as_ptr() as usize, 0, 0, 0, 0]) };
}

/// Forward every signal to `pid`, reap every child, and exit with `pid`'s status once it
/// ends (reported on `report_status` first, unless -1).
fn supervise(pid: i32, report_status: i32) -> ! {
    let mut info = [0u8; 128];
    // A child that ended before we ran (its SIGCHLD pending or not): reap first.
    reap_all(pid, report_status);
    loop {
        let Ok(sig) = wait_signal(&mut info) else { continue };
        if sig != SIGCHLD {
            // Forward to our child.
            // SAFETY: integer arguments.
            let _ = unsafe { sys(nr::KILL, [pid as usize, sig as usize, 0, 0, 0, 0]) };
            continue;
        }
        reap_all(pid, report_status);
    }
}

/// Reap every exited child; exit if `pid` was one of them.
fn reap_all(pid: i32, report_status: i32) {
    while let Some((r, status)) = reap_one() {
        if r == pid {
            if report_status >= 0 {
                let mut rec = [0u8; 8];
                rec[0..4].copy_from_slice(&STATUS_TAG.to_ne_bytes());
                rec[4..8].copy_from_slice(&status.to_ne_bytes());
                let _ = rt::write(report_status, &rec);
            }
            let code = if status & 0x7f == 0 { (status >> 8) & 0xff } else { 128 + (status & 0x7f) };
            // Exiting: the kernel ends the rest of the pid namespace.
            rt::exit(code);
        }
    }
}

/// What the command's process needs (it reads it from our memory, CLONE_VM).
struct Start {
    args: Args,
    candidates: core::ops::Range<usize>,
    argv_start: usize,
    report: i32,
}

extern "C" fn start_command(arg: usize) -> ! {
    // SAFETY: our parent's Start, alive and unchanged while it waits (CLONE_VFORK).
    let s = unsafe { &*(arg as *const Start) };
    // Our parent had every disposition reset; give the command the mask back.
    rt::set_sigmask(0);
    // SAFETY: the kernel's argv and envp arrays (NULL-terminated, alive for the process);
    // candidates are argv strings (Args::ptr: NULL when out of range).
    let err = unsafe {
        rt::exec_candidates(s.candidates.clone().map(|i| s.args.ptr(i, 0)), s.args.tail(s.argv_start), s.args.envp)
    };
    rt::record(s.report, STEP_EXEC, 0, err);
    rt::exit(127)
}

/// Remove `KEY=` (given with its '=') from our environment, in place; its value.
fn take_env(args: &Args, key: &[u8]) -> Option<&'static [u8]> {
    let envp = args.envp as *mut *const u8;
    let mut i = 0;
    // SAFETY: envp is the kernel's NULL-terminated array on our stack; we only move its
    // pointers down over the removed one.
    unsafe {
        while !(*envp.add(i)).is_null() {
            let kv = rt::cstr(*envp.add(i));
            if let Some(v) = kv.strip_prefix(key) {
                let mut j = i;
                while !(*envp.add(j)).is_null() {
                    *envp.add(j) = *envp.add(j + 1);
                    j += 1;
                }
                return Some(v);
            }
            i += 1;
        }
    }
    None
}

/// The gate: setup is complete (close the report pipe), wait for the byte. Returns the
/// fd for the command's exec failure and whether to fork it (else exec in place).
fn pass_gate(report: i32, gate: &[u8]) -> (i32, bool) {
    let mut parts = gate.split(|&b| b == b',');
    let mut fd = || parts.next().and_then(rt::num).and_then(|n| i32::try_from(n).ok());
    let (Some(gate_fd), Some(result)) = (fd(), fd()) else {
        rt::say(b"nsfast-init: bad NSFAST_INIT_GATE\n");
        rt::exit(127)
    };
    let fork = match parts.next() {
        None => false,
        Some(b"fork") => true,
        Some(_) => {
            rt::say(b"nsfast-init: bad NSFAST_INIT_GATE\n");
            rt::exit(127)
        }
    };
    rt::close(report);
    let mut b = [0u8; 1];
    // SAFETY: into a live buffer of ours, of the length given.
    if unsafe { sys(nr::READ, [gate_fd as usize, b.as_mut_ptr() as usize, 1, 0, 0, 0]) } != Ok(1) {
        rt::exit(127); // the caller gave up (or died)
    }
    rt::close(gate_fd);
    (result, fork)
}

/// Wait for any signal (all are blocked).
fn wait_signal(info: &mut [u8; 128]) -> Result<i32, i32> {
    let all = ALL_SIGNALS;
    // SAFETY: a live sigset and a 128-byte siginfo buffer on our stack.
    unsafe { sys(nr::RT_SIGTIMEDWAIT, [&all as *const u64 as usize, info.as_mut_ptr() as usize, 0, 8, 0, 0]) }
        .map(|s| s as i32)
}

/// Reap one exited child without blocking: (pid, wait status).
fn reap_one() -> Option<(i32, i32)> {
    let mut status: i32 = 0;
    // SAFETY: a live status int on our stack; rusage NULL.
    match unsafe { sys(nr::WAIT4, [-1isize as usize, &mut status as *mut i32 as usize, WNOHANG, 0, 0, 0]) } {
        Ok(0) | Err(_) => None,
        Ok(pid) => Some((pid as i32, status)),
    }
}

/// A container's idle main process: reap, and exit on a termination signal.
fn idle() -> ! {
    let mut info = [0u8; 128];
    loop {
        match wait_signal(&mut info) {
            Ok(SIGCHLD) => while reap_one().is_some() {},
            Ok(SIGTERM | SIGINT | SIGHUP) => rt::exit(0),
            _ => {}
        }
    }
}
