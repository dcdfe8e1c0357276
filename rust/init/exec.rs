//! The exec helper: nsfast-init's second mode, the process between `Container.exec`'s caller
//! and the container (like runc's `runc init` for `runc exec`).
//!
//! The caller starts it with execveat() of the sealed memfd from a child that kept only the
//! fds below, so from here on no memory, fd or environment of the caller exists in any
//! process the container can reach. It is not dumpable (nothing can ptrace it or read its
//! /proc files; its fork child inherits that until its own execve), joins the namespaces it
//! was given, and clones the final process with CLONE_PARENT (the caller's child) and
//! CLONE_INTO_CGROUP (the exec's own cgroup), writes its pid to the report pipe and exits.
//!
//! Command line (every fd is open and inherited; lists repeat the key):
//!   nsfast-init --exec report=FD ppid=PID pdeath=0|1 ns=FLAG:FD... cgroupns=FD cgroup=FD
//!       tasks=FD... root=FD cwd=PATH|cwdfd=FD stdio=A,B,C pass=FD... uid=N gid=N keep=MASK
//!       caplast=N session=0|1 seccomp=FD cand=PATH... -- ARGV...
//! envp is the command's environment. Failures are written to `report` as nsfast's 12-byte
//! {step, index, errno} record (steps numbered as sync::Step; a unit test there checks).

use std::ffi::{c_char, c_int, c_long, c_void, CString};

// sync::Step numbers of the library (exec.rs's unit test checks that they agree).
const STEP_SET_GROUPS: u32 = 5;
const STEP_SET_GID: u32 = 6;
const STEP_SET_UID: u32 = 7;
const STEP_DROP_CAPS: u32 = 8;
const STEP_NO_NEW_PRIVS: u32 = 9;
const STEP_DEATH_SIGNAL: u32 = 10;
const STEP_SETSID: u32 = 11;
const STEP_STDIO: u32 = 12;
const STEP_CLOSE_FDS: u32 = 13;
const STEP_CHDIR: u32 = 14;
const STEP_EXEC: u32 = 15;
const STEP_JOIN_NAMESPACES: u32 = 18;
const STEP_CHROOT: u32 = 19;
const STEP_CLONE_JOINED: u32 = 20;
const STEP_JOIN_CGROUP_NS: u32 = 21;
const STEP_ATTACH_CGROUP: u32 = 22;
const STEP_SECCOMP: u32 = 24;
const STEP_RLIMIT: u32 = 25;
const STEP_CLOSE_FDS_EARLY: u32 = 26;
/// Not a failure: `index` is the final process's pid (exec::STEP_EXEC_PID in the library).
const STEP_EXEC_PID: u32 = 1000;

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const WRITE: i64 = 1;
    pub const CLOSE: i64 = 3;
    pub const PREAD64: i64 = 17;
    pub const RT_SIGPROCMASK: i64 = 14;
    pub const CLONE: i64 = 56;
    pub const EXECVE: i64 = 59;
    pub const FCNTL: i64 = 72;
    pub const FCHDIR: i64 = 81;
    pub const GETPPID: i64 = 110;
    pub const SETSID: i64 = 112;
    pub const SETGROUPS: i64 = 116;
    pub const SETRESUID: i64 = 117;
    pub const SETRESGID: i64 = 119;
    pub const CAPGET: i64 = 125;
    pub const CAPSET: i64 = 126;
    pub const PRCTL: i64 = 157;
    pub const CHROOT: i64 = 161;
    pub const EXIT_GROUP: i64 = 231;
    pub const PPOLL: i64 = 271;
    pub const DUP3: i64 = 292;
    pub const PRLIMIT64: i64 = 302;
    pub const SETNS: i64 = 308;
    pub const SECCOMP: i64 = 317;
    pub const CLONE3: i64 = 435;
    pub const CLOSE_RANGE: i64 = 436;
    pub const OPENAT2: i64 = 437;
    pub const O_DIRECTORY: u64 = 0o200000;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const WRITE: i64 = 64;
    pub const CLOSE: i64 = 57;
    pub const PREAD64: i64 = 67;
    pub const RT_SIGPROCMASK: i64 = 135;
    pub const CLONE: i64 = 220;
    pub const EXECVE: i64 = 221;
    pub const FCNTL: i64 = 25;
    pub const FCHDIR: i64 = 50;
    pub const GETPPID: i64 = 173;
    pub const SETSID: i64 = 157;
    pub const SETGROUPS: i64 = 159;
    pub const SETRESUID: i64 = 147;
    pub const SETRESGID: i64 = 149;
    pub const CAPGET: i64 = 90;
    pub const CAPSET: i64 = 91;
    pub const PRCTL: i64 = 167;
    pub const CHROOT: i64 = 51;
    pub const EXIT_GROUP: i64 = 94;
    pub const PPOLL: i64 = 73;
    pub const DUP3: i64 = 24;
    pub const PRLIMIT64: i64 = 261;
    pub const SETNS: i64 = 268;
    pub const SECCOMP: i64 = 277;
    pub const CLONE3: i64 = 435;
    pub const CLOSE_RANGE: i64 = 436;
    pub const OPENAT2: i64 = 437;
    pub const O_DIRECTORY: u64 = 0o40000;
}

extern "C" {
    fn syscall(n: c_long, ...) -> c_long;
    fn signal(sig: c_int, handler: usize) -> usize;
}

const PR_SET_PDEATHSIG: i64 = 1;
const PR_SET_DUMPABLE: i64 = 4;
const PR_CAPBSET_DROP: i64 = 24;
const PR_SET_NO_NEW_PRIVS: i64 = 38;
const PR_CAP_AMBIENT: i64 = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: i64 = 4;
const SIGKILL: i64 = 9;
const SIGPIPE: c_int = 13;
const CLONE_PARENT: u64 = 0x8000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const CLONE_NEWUSER: u64 = 0x1000_0000;
const CLONE_NEWCGROUP: i64 = 0x0200_0000;
const CAP_SYS_ADMIN: u32 = 21;
const F_SETFD: i64 = 2;
const CLOSE_RANGE_CLOEXEC: i64 = 4;
const O_PATH: u64 = 0o10000000;
const O_CLOEXEC: u64 = 0o2000000;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;
const AT_FDCWD: i64 = -100;
const RLIMIT_CORE: i64 = 4;
const SECCOMP_SET_MODE_FILTER: i64 = 1;
const POLLOUT: i16 = 4;
const POLLERR: i16 = 8;
const EPERM: c_int = 1;
const ENOENT: c_int = 2;
const EINVAL: c_int = 22;
const EACCES: c_int = 13;
const ENOTDIR: c_int = 20;
const ENOSYS: c_int = 38;

/// One raw system call; the errno on failure.
fn sys(n: i64, a: [i64; 6]) -> Result<i64, c_int> {
    // SAFETY: glibc's syscall(); callers pass arguments valid for `n` (pointers to live data).
    let r = unsafe { syscall(n, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if r < 0 {
        Err(super::errno())
    } else {
        Ok(r)
    }
}

fn sys1(n: i64, a: i64) -> Result<i64, c_int> {
    sys(n, [a, 0, 0, 0, 0, 0])
}

fn exit(code: i64) -> ! {
    let _ = sys1(nr::EXIT_GROUP, code);
    loop {
        std::hint::spin_loop();
    }
}

/// Everything the command line says, parsed.
#[derive(Default)]
struct Args {
    report: i32,
    ppid: i64,
    pdeath: bool,
    ns: Vec<(u64, i32)>,
    cgroupns: Option<i32>,
    cgroup: Option<i32>,
    tasks: Vec<i32>,
    root: i32,
    cwd: Option<CString>,
    cwdfd: Option<i32>,
    stdio: [i32; 3],
    pass: Vec<i32>,
    uid: Option<u32>,
    gid: Option<u32>,
    keep: u64,
    caplast: u32,
    session: bool,
    seccomp: Option<i32>,
    candidates: Vec<CString>,
    argv: Vec<CString>,
}

fn parse(args: &[CString]) -> Option<Args> {
    let mut a = Args { report: -1, root: -1, stdio: [-1; 3], ..Args::default() };
    let mut it = args.iter().skip(2);
    let num = |v: &[u8]| std::str::from_utf8(v).ok()?.parse::<i64>().ok();
    for arg in it.by_ref() {
        let bytes = arg.as_bytes();
        if bytes == b"--" {
            break;
        }
        let eq = bytes.iter().position(|&b| b == b'=')?;
        let (key, v) = (&bytes[..eq], &bytes[eq + 1..]);
        let fd = || num(v).and_then(|n| i32::try_from(n).ok());
        match key {
            b"report" => a.report = fd()?,
            b"ppid" => a.ppid = num(v)?,
            b"pdeath" => a.pdeath = v == b"1",
            b"ns" => {
                let colon = v.iter().position(|&b| b == b':')?;
                let flag = num(&v[..colon])? as u64;
                a.ns.push((flag, i32::try_from(num(&v[colon + 1..])?).ok()?));
            }
            b"cgroupns" => a.cgroupns = Some(fd()?),
            b"cgroup" => a.cgroup = Some(fd()?),
            b"tasks" => a.tasks.push(fd()?),
            b"root" => a.root = fd()?,
            b"cwd" => a.cwd = Some(CString::new(v).ok()?),
            b"cwdfd" => a.cwdfd = Some(fd()?),
            b"stdio" => {
                let mut parts = v.split(|&b| b == b',');
                for slot in a.stdio.iter_mut() {
                    *slot = i32::try_from(num(parts.next()?)?).ok()?;
                }
            }
            b"pass" => a.pass.push(fd()?),
            b"uid" => a.uid = Some(u32::try_from(num(v)?).ok()?),
            b"gid" => a.gid = Some(u32::try_from(num(v)?).ok()?),
            b"keep" => a.keep = num(v)? as u64,
            b"caplast" => a.caplast = u32::try_from(num(v)?).ok()?.min(63),
            b"session" => a.session = v == b"1",
            b"seccomp" => a.seccomp = Some(fd()?),
            b"cand" => a.candidates.push(CString::new(v).ok()?),
            _ => return None,
        }
    }
    a.argv = it.cloned().collect();
    (a.report >= 0 && a.root >= 0 && !a.argv.is_empty()).then_some(a)
}

/// Write the 12-byte record {step, index, errno} to the report pipe.
fn record(report: i32, step: u32, index: u32, errno: c_int) {
    let mut rec = [0u8; 12];
    rec[0..4].copy_from_slice(&step.to_ne_bytes());
    rec[4..8].copy_from_slice(&index.to_ne_bytes());
    rec[8..12].copy_from_slice(&errno.to_ne_bytes());
    let _ = sys(nr::WRITE, [report as i64, rec.as_ptr() as i64, rec.len() as i64, 0, 0, 0]);
}

/// The exec helper's main; `args` is the whole command line.
pub fn main(args: Vec<CString>) -> ! {
    // First: nothing in the container may ptrace us or read our /proc files (and so no
    // fd we hold) — neither now nor in the fork child before its execve.
    if sys(nr::PRCTL, [PR_SET_DUMPABLE, 0, 0, 0, 0, 0]).is_err() {
        exit(127);
    }
    let Some(a) = parse(&args) else {
        eprintln!("nsfast-init: bad --exec command line");
        exit(127)
    };
    let fail = |step: u32, index: u32, e: c_int| -> ! {
        record(a.report, step, index, e);
        exit(127)
    };
    let filters = match a.seccomp {
        Some(fd) => {
            let programs = read_filters(fd).unwrap_or_else(|e| fail(STEP_SECCOMP, 0, e));
            let _ = sys1(nr::CLOSE, fd as i64);
            programs
        }
        None => Vec::new(),
    };
    join_namespaces(&a.ns).unwrap_or_else(|(i, e)| fail(STEP_JOIN_NAMESPACES, i, e));
    if a.pdeath {
        // After setns: new credentials (a user namespace's) disarm the death signal.
        sys(nr::PRCTL, [PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_DEATH_SIGNAL, 0, e));
        // The caller may have died before the prctl: then we were re-parented.
        if sys1(nr::GETPPID, 0).ok() != Some(a.ppid) {
            exit(127);
        }
    }

    // The final process's fds: only what it still needs (closed right after use).
    let mut keep: Vec<i32> = vec![a.report, a.root];
    keep.extend(a.stdio.iter().enumerate().map(|(i, &fd)| if fd < 0 { i as i32 } else { fd }));
    keep.extend(a.pass.iter().chain(&a.tasks).chain(a.cgroupns.iter()).chain(a.cwdfd.iter()));
    keep.sort_unstable();
    keep.dedup();
    let envp: *const *const c_char = super::env_ptr();
    let mut argv: Vec<*const c_char> = a.argv.iter().map(|s| s.as_ptr()).collect();
    argv.push(std::ptr::null());

    match clone_final(a.cgroup) {
        Ok(0) => final_process(&a, &keep, &filters, &argv, envp),
        Ok(pid) => {
            record(a.report, STEP_EXEC_PID, pid as u32, 0);
            exit(0)
        }
        Err(e) => fail(STEP_CLONE_JOINED, 0, e),
    }
}

/// setns() into each namespace, closing its fd. With CAP_SYS_ADMIN (a root caller) the
/// others first, with our own rights, then the user namespace (as setns(pidfd) would
/// check them); without it, the user namespace first: it grants the rights for the rest.
fn join_namespaces(ns: &[(u64, i32)]) -> Result<(), (u32, c_int)> {
    let user_first = !has_cap(CAP_SYS_ADMIN);
    let order = |want_user: bool| ns.iter().enumerate().filter(move |(_, (f, _))| (*f == CLONE_NEWUSER) == want_user);
    let (first, then) = (order(user_first), order(!user_first));
    for (i, &(flag, fd)) in first.chain(then) {
        sys(nr::SETNS, [fd as i64, flag as i64, 0, 0, 0, 0]).map_err(|e| (i as u32, e))?;
        let _ = sys1(nr::CLOSE, fd as i64);
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

fn capget() -> Result<[CapData; 2], c_int> {
    let hdr = CapHeader { version: CAP_V3, pid: 0 };
    let mut data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
    sys(nr::CAPGET, [&hdr as *const CapHeader as i64, data.as_mut_ptr() as i64, 0, 0, 0, 0])?;
    Ok(data)
}

fn has_cap(cap: u32) -> bool {
    capget().is_ok_and(|d| d[(cap / 32) as usize].effective & (1 << (cap % 32)) != 0)
}

/// clone3 without CLONE_VM (a fork: our memory holds nothing of the caller) into the
/// caller as parent and into the exec's cgroup. 0 in the child.
fn clone_final(cgroup: Option<i32>) -> Result<i64, c_int> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let mut flags = CLONE_PARENT;
    if cgroup.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    // With CLONE_PARENT the exit signal is ours (SIGCHLD), and clone3 wants none given.
    let args = CloneArgs { flags, cgroup: cgroup.map_or(0, |fd| fd as u64), ..CloneArgs::default() };
    match sys(nr::CLONE3, [&args as *const CloneArgs as i64, std::mem::size_of::<CloneArgs>() as i64, 0, 0, 0, 0]) {
        Err(ENOSYS) if cgroup.is_none() => sys(nr::CLONE, [CLONE_PARENT as i64, 0, 0, 0, 0, 0]),
        r => r,
    }
}

/// The seccomp programs the library serialized (seccomp::Filter::to_bytes): u32 count,
/// then per program u32 length + length 8-byte `struct sock_filter`s, little endian.
fn read_filters(fd: i32) -> Result<Vec<Vec<u64>>, c_int> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = sys(nr::PREAD64, [fd as i64, chunk.as_mut_ptr() as i64, chunk.len() as i64, buf.len() as i64, 0, 0])?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n as usize]);
    }
    let word = |at: usize| -> Result<u32, c_int> {
        buf.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or(EINVAL)
    };
    let count = word(0)? as usize;
    let mut at = 4;
    let mut programs = Vec::with_capacity(count);
    for _ in 0..count {
        let len = word(at)? as usize;
        at += 4;
        let bytes = buf.get(at..at + len * 8).ok_or(EINVAL)?;
        at += len * 8;
        // u64 storage: sock_filter's alignment (4) is met, and the layout is the bytes'.
        programs.push(bytes.chunks_exact(8).map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect());
    }
    Ok(programs)
}

fn install_filter(program: &[u64]) -> Result<(), c_int> {
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const c_void,
    }
    let len = u16::try_from(program.len()).map_err(|_| EINVAL)?;
    let prog = SockFprog { len, filter: program.as_ptr().cast() };
    sys(nr::SECCOMP, [SECCOMP_SET_MODE_FILTER, 0, &prog as *const SockFprog as i64, 0, 0, 0]).map(drop)
}

/// Close every fd but the sorted `keep`.
fn close_all_except(keep: &[i32]) -> Result<(), c_int> {
    let mut next: i64 = 0;
    for &fd in keep {
        let fd = fd as i64;
        if fd > next {
            sys(nr::CLOSE_RANGE, [next, fd - 1, 0, 0, 0, 0])?;
        }
        next = fd + 1;
    }
    sys(nr::CLOSE_RANGE, [next, u32::MAX as i64, 0, 0, 0, 0]).map(drop)
}

fn set_cloexec(fd: i32, on: bool) -> Result<(), c_int> {
    sys(nr::FCNTL, [fd as i64, F_SETFD, on as i64, 0, 0, 0]).map(drop)
}

/// Whether the caller (the only reader of the report pipe) is gone.
fn reader_gone(report: i32) -> bool {
    #[repr(C)]
    struct PollFd {
        fd: i32,
        events: i16,
        revents: i16,
    }
    let mut p = PollFd { fd: report, events: POLLOUT, revents: 0 };
    let zero = [0i64; 2];
    sys(nr::PPOLL, [&mut p as *mut PollFd as i64, 1, zero.as_ptr() as i64, 0, 8, 0]).is_ok() && p.revents & POLLERR != 0
}

/// The final process: in the container's namespaces (but its cgroup namespace), in the
/// exec's cgroup, our child's copy of the helper's memory. Sets itself up and execs.
fn final_process(a: &Args, keep: &[i32], filters: &[Vec<u64>], argv: &[*const c_char], envp: *const *const c_char) -> ! {
    let fail = |step: u32, e: c_int| -> ! {
        record(a.report, step, 0, e);
        exit(127)
    };
    let arm_death_signal = || {
        if a.pdeath {
            sys(nr::PRCTL, [PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_DEATH_SIGNAL, e));
            // Our parent is the caller, outside our pid namespace (getppid() says 0): it is
            // alive while it holds the report pipe's read end.
            if reader_gone(a.report) {
                exit(127);
            }
        }
    };
    arm_death_signal();
    close_all_except(keep).unwrap_or_else(|e| fail(STEP_CLOSE_FDS_EARLY, e));
    for (i, &fd) in a.tasks.iter().enumerate() {
        if let Err(e) = sys(nr::WRITE, [fd as i64, b"0".as_ptr() as i64, 1, 0, 0, 0]) {
            record(a.report, STEP_ATTACH_CGROUP, i as u32, e);
            exit(127);
        }
        let _ = sys1(nr::CLOSE, fd as i64);
    }
    // Only now, inside the exec's cgroup: with nsdelegate, CLONE_INTO_CGROUP refuses to move
    // a task across the boundary of its cgroup namespace.
    if let Some(fd) = a.cgroupns {
        sys(nr::SETNS, [fd as i64, CLONE_NEWCGROUP, 0, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_JOIN_CGROUP_NS, e));
        let _ = sys1(nr::CLOSE, fd as i64);
    }
    // The container's root as it was at start, then the cwd resolved inside it: its
    // symlinks stay in the root, magic links (/proc/self/fd/N, /proc/PID/cwd) are refused.
    sys1(nr::FCHDIR, a.root as i64).unwrap_or_else(|e| fail(STEP_CHROOT, e));
    sys1(nr::CHROOT, c".".as_ptr() as i64).unwrap_or_else(|e| fail(STEP_CHROOT, e));
    let _ = sys1(nr::CLOSE, a.root as i64);
    match (&a.cwd, a.cwdfd) {
        (_, Some(fd)) => {
            sys1(nr::FCHDIR, fd as i64).unwrap_or_else(|e| fail(STEP_CHDIR, e));
            let _ = sys1(nr::CLOSE, fd as i64);
        }
        (Some(path), None) => {
            let how: [u64; 3] = [O_PATH | nr::O_DIRECTORY | O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS];
            let fd = sys(nr::OPENAT2, [AT_FDCWD, path.as_ptr() as i64, how.as_ptr() as i64, 24, 0, 0])
                .unwrap_or_else(|e| fail(STEP_CHDIR, e));
            sys1(nr::FCHDIR, fd).unwrap_or_else(|e| fail(STEP_CHDIR, e));
            let _ = sys1(nr::CLOSE, fd);
        }
        (None, None) => {}
    }
    // The bounding set needs CAP_SETPCAP, which a switch to a non-root uid takes away.
    for cap in 0..=a.caplast {
        if a.keep & (1u64 << cap) == 0 {
            sys(nr::PRCTL, [PR_CAPBSET_DROP, cap as i64, 0, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_DROP_CAPS, e));
        }
    }
    if let Some(gid) = a.gid {
        sys(nr::SETRESGID, [gid as i64, gid as i64, gid as i64, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_SET_GID, e));
    }
    match sys(nr::SETGROUPS, [0; 6]) {
        Ok(_) | Err(EPERM) => {} // EPERM: setgroups is denied in this user namespace
        Err(e) => fail(STEP_SET_GROUPS, e),
    }
    if let Some(uid) = a.uid {
        sys(nr::SETRESUID, [uid as i64, uid as i64, uid as i64, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_SET_UID, e));
    }
    // A uid/gid change disarmed the death signal: again, and the caller still there?
    arm_death_signal();
    sys(nr::PRCTL, [PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_DROP_CAPS, e));
    let have = capget().unwrap_or_else(|e| fail(STEP_DROP_CAPS, e));
    let (lo, hi) = (a.keep as u32, (a.keep >> 32) as u32);
    let set = |d: CapData, m: u32| CapData { effective: d.permitted & m, permitted: d.permitted & m, inheritable: d.permitted & m };
    let data = [set(have[0], lo), set(have[1], hi)];
    let hdr = CapHeader { version: CAP_V3, pid: 0 };
    sys(nr::CAPSET, [&hdr as *const CapHeader as i64, data.as_ptr() as i64, 0, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_DROP_CAPS, e));
    if a.session {
        sys1(nr::SETSID, 0).unwrap_or_else(|e| fail(STEP_SETSID, e));
    }
    sys(nr::PRCTL, [PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_NO_NEW_PRIVS, e));
    let zero: [u64; 2] = [0, 0];
    sys(nr::PRLIMIT64, [0, RLIMIT_CORE, zero.as_ptr() as i64, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_RLIMIT, e));

    // stdio: first lift sources sitting on 0..2 out of the way, then install.
    let mut src = a.stdio;
    for (i, fd) in src.iter_mut().enumerate() {
        if *fd >= 0 && *fd < 3 && *fd != i as i32 {
            const F_DUPFD_CLOEXEC: i64 = 1030;
            *fd = sys(nr::FCNTL, [*fd as i64, F_DUPFD_CLOEXEC, 3, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_STDIO, e)) as i32;
        }
    }
    for (i, &fd) in src.iter().enumerate() {
        let res = if fd < 0 {
            Ok(())
        } else if fd == i as i32 {
            set_cloexec(fd, false)
        } else {
            sys(nr::DUP3, [fd as i64, i as i64, 0, 0, 0, 0]).map(drop)
        };
        res.unwrap_or_else(|e| fail(STEP_STDIO, e));
    }
    // Everything from 3 up closes at exec (the report pipe too), but the fds passed on purpose.
    sys(nr::CLOSE_RANGE, [3, u32::MAX as i64, CLOSE_RANGE_CLOEXEC, 0, 0, 0]).unwrap_or_else(|e| fail(STEP_CLOSE_FDS, e));
    for &fd in &a.pass {
        set_cloexec(fd, false).unwrap_or_else(|e| fail(STEP_CLOSE_FDS, e));
    }
    let empty: u64 = 0;
    let _ = sys(nr::RT_SIGPROCMASK, [2 /* SIG_SETMASK */, &empty as *const u64 as i64, 0, 8, 0, 0]);
    // Rust's runtime ignored SIGPIPE at our start, and an ignored signal stays ignored
    // across exec: give the command the default back.
    // SAFETY: plain libc call.
    unsafe { signal(SIGPIPE, 0) };
    // Last: from here on only what the filter allows (execve, write, exit_group are).
    for prog in filters {
        install_filter(prog).unwrap_or_else(|e| fail(STEP_SECCOMP, e));
    }
    // execvpe's rule: skip ENOENT/ENOTDIR, remember EACCES, stop at anything else.
    let mut err = ENOENT;
    let mut saw_eacces = false;
    for cand in &a.candidates {
        let e = sys(nr::EXECVE, [cand.as_ptr() as i64, argv.as_ptr() as i64, envp as i64, 0, 0, 0]).err().unwrap_or(EINVAL);
        err = e;
        match e {
            ENOENT | ENOTDIR => {}
            EACCES => saw_eacces = true,
            _ => break,
        }
    }
    if saw_eacces && (err == ENOENT || err == ENOTDIR) {
        err = EACCES;
    }
    fail(STEP_EXEC, err)
}
