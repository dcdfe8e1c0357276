//! nsfast-init: the tiny pid 1 of `init=True` sandboxes.
//!
//! Built by build.rs as a static, dependency-free binary and run from a sealed memfd, so it
//! works in any rootfs and shares nothing with the Python parent. It starts the command,
//! forwards every signal it receives to it, reaps every orphan, and exits with the
//! command's status (128+N if the command was killed by signal N, as shells and tini do).
//!
//! Command line: nsfast-init REPORT_FD N CANDIDATE_1..CANDIDATE_N -- ARGV...
//! With no ARGV it idles as a container's main process: it reaps whatever is started in
//! the sandbox (by exec) and exits 0 on SIGTERM, SIGINT or SIGHUP.
//! If no candidate can be exec'd, the failure is written to REPORT_FD in nsfast's 12-byte
//! child report format, as the sandbox setup would have.
//!
//! `nsfast-init --exec ...` is the other mode: `Container.exec`'s helper (see exec.rs).

use std::ffi::{c_char, c_int, c_void, CString};
use std::os::unix::ffi::OsStringExt;

mod exec;

/// sync::Step::Exec in the library (a unit test there checks the two agree).
const STEP_EXEC: u32 = 15;

#[repr(C)]
struct SigSet([u64; 16]);

extern "C" {
    static environ: *const *const c_char;
    fn sigfillset(set: *mut SigSet) -> c_int;
    fn sigemptyset(set: *mut SigSet) -> c_int;
    fn sigprocmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
    fn sigwaitinfo(set: *const SigSet, info: *mut c_void) -> c_int;
    fn fork() -> c_int;
    fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn signal(sig: c_int, handler: usize) -> usize;
    fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    fn close(fd: c_int) -> c_int;
    fn fcntl(fd: c_int, cmd: c_int, arg: c_int) -> c_int;
    fn prctl(option: c_int, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> c_int;
    fn __errno_location() -> *mut c_int;
    fn _exit(code: c_int) -> !;
}

const SIG_SETMASK: c_int = 2;
const SIGCHLD: c_int = 17;
const SIGPIPE: c_int = 13;
const SIG_DFL: usize = 0;
const WNOHANG: c_int = 1;
const F_SETFD: c_int = 2;
const FD_CLOEXEC: c_int = 1;
const PR_SET_CHILD_SUBREAPER: c_int = 36;
const PR_SET_NAME: c_int = 15;
const SIGHUP: c_int = 1;
const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;
const ENOENT: c_int = 2;
const ENOTDIR: c_int = 20;
const EACCES: c_int = 13;

fn errno() -> c_int {
    // SAFETY: glibc's per-thread errno slot.
    unsafe { *__errno_location() }
}

/// Our environment (the command's: both modes exec it).
fn env_ptr() -> *const *const c_char {
    // SAFETY: glibc's environ, not modified by this program.
    unsafe { environ }
}

fn main() {
    let args: Vec<CString> = std::env::args_os().map(|a| CString::new(a.into_vec()).unwrap_or_default()).collect();
    if args.get(1).map(|a| a.as_bytes()) == Some(b"--exec") {
        exec::main(args);
    }
    let num = |i: usize| args.get(i).and_then(|a| a.to_str().ok()?.parse::<usize>().ok());
    let (Some(report_fd), Some(n)) = (num(1), num(2)) else {
        eprintln!("nsfast-init: usage: nsfast-init REPORT_FD N CANDIDATE... -- ARGV...");
        std::process::exit(127);
    };
    let report_fd = report_fd as c_int;
    let candidates = &args[3..(3 + n).min(args.len())];
    let argv_start = 3 + n + 1;
    if args.get(3 + n).map(|a| a.as_bytes()) != Some(b"--") {
        eprintln!("nsfast-init: missing -- ARGV");
        std::process::exit(127);
    }
    let mut argv: Vec<*const c_char> = args[argv_start..].iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());

    let mut all = SigSet([0; 16]);
    let mut none = SigSet([0; 16]);
    // SAFETY: plain libc calls on valid local data.
    unsafe {
        sigfillset(&mut all);
        sigemptyset(&mut none);
        sigprocmask(SIG_SETMASK, &all, std::ptr::null_mut());
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        fcntl(report_fd, F_SETFD, FD_CLOEXEC);
    }

    // SAFETY: plain prctl; the name shows in ps instead of "memfd:nsfast-init".
    unsafe { prctl(PR_SET_NAME, c"nsfast-init".as_ptr() as u64, 0, 0, 0) };
    if argv_start >= args.len() {
        // SAFETY: our copy of the report pipe: nothing to exec, so setup is complete.
        unsafe { close(report_fd) };
        idle(&all);
    }

    // SAFETY: fork in a single-threaded process.
    let pid = unsafe { fork() };
    if pid == 0 {
        // SAFETY: restore the mask and SIGPIPE, then exec with prepared arrays.
        unsafe {
            // Rust's runtime ignored SIGPIPE at our start; an ignored signal stays ignored
            // across exec, so give the command the default back (as the sandbox setup did).
            signal(SIGPIPE, SIG_DFL);
            sigprocmask(SIG_SETMASK, &none, std::ptr::null_mut());
            let mut err = ENOENT;
            let mut saw_eacces = false;
            for cand in candidates {
                execve(cand.as_ptr(), argv.as_ptr(), env_ptr());
                err = errno();
                match err {
                    ENOENT | ENOTDIR => {}
                    EACCES => saw_eacces = true,
                    _ => break,
                }
            }
            if saw_eacces && (err == ENOENT || err == ENOTDIR) {
                err = EACCES;
            }
            let mut rec = [0u8; 12];
            rec[0..4].copy_from_slice(&STEP_EXEC.to_ne_bytes());
            rec[8..12].copy_from_slice(&err.to_ne_bytes());
            write(report_fd, rec.as_ptr().cast(), rec.len());
            _exit(127);
        }
    }
    // SAFETY: our copy of the report pipe; the parent reads EOF once the command exec'd.
    unsafe { close(report_fd) };
    if pid < 0 {
        std::process::exit(127);
    }

    let mut info = [0u8; 128];
    loop {
        // SAFETY: waits for any signal (all are blocked).
        let sig = unsafe { sigwaitinfo(&all, info.as_mut_ptr().cast()) };
        if sig < 0 {
            continue;
        }
        if sig != SIGCHLD {
            // SAFETY: forwarding a signal to our child.
            unsafe { kill(pid, sig) };
            continue;
        }
        loop {
            let mut status: c_int = 0;
            // SAFETY: reap any child without blocking.
            let r = unsafe { waitpid(-1, &mut status, WNOHANG) };
            if r <= 0 {
                break;
            }
            if r == pid {
                let code = if status & 0x7f == 0 { (status >> 8) & 0xff } else { 128 + (status & 0x7f) };
                // SAFETY: exiting; the kernel ends the rest of the pid namespace.
                unsafe { _exit(code) };
            }
        }
    }
}

/// A container's idle main process: reap, and exit on a termination signal.
fn idle(all: &SigSet) -> ! {
    let mut info = [0u8; 128];
    loop {
        // SAFETY: waits for any signal (all are blocked).
        let sig = unsafe { sigwaitinfo(all, info.as_mut_ptr().cast()) };
        match sig {
            SIGCHLD => {
                let mut status: c_int = 0;
                // SAFETY: reap without blocking until none is left.
                while unsafe { waitpid(-1, &mut status, WNOHANG) } > 0 {}
            }
            SIGTERM | SIGINT | SIGHUP => {
                // SAFETY: exiting.
                unsafe { _exit(0) }
            }
            _ => {}
        }
    }
}
