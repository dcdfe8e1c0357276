//! The exec helper: nsfast-init's second mode, the process between `Container.exec`'s caller
//! and the container (like runc's `runc init` for `runc exec`).
//!
//! The caller starts it with execveat() of the sealed memfd from a child that kept only the
//! fds below, so from here on no memory, fd or environment of the caller exists in any
//! process the container can reach. It is not dumpable (nothing can ptrace it or read its
//! /proc files; the final process shares or inherits that until its own execve), joins the
//! namespaces it was given, and clones the final process with CLONE_PARENT (the caller's
//! child) and CLONE_INTO_CGROUP (the exec's own cgroup), writes its pid to the report pipe
//! and exits.
//!
//! Command line (every fd is open and inherited; lists repeat the key):
//!   nsfast-init --exec report=FD ppid=PID pdeath=0|1 ns=FLAG:FD... cgroupns=FD cgroup=FD
//!       tasks=FD... root=FD cwd=PATH|cwdfd=FD stdio=A,B,C pass=FD... uid=N gid=N keep=MASK
//!       caplast=N session=0|1 seccomp=FD cand=PATH... -- ARGV...
//! envp is the command's environment. Failures are written to `report` as nsfast's 12-byte
//! {step, index, errno} record (steps numbered as sync::Step; a unit test there checks).

use core::cell::UnsafeCell;

use crate::rt::{self, nr, sys, sys1, Args, CapData, CapHeader, CAP_VERSION_3};

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

const PR_SET_DUMPABLE: usize = 4;
const PR_CAPBSET_DROP: usize = 24;
const PR_SET_NO_NEW_PRIVS: usize = 38;
const PR_CAP_AMBIENT: usize = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: usize = 4;
const SIGPIPE: usize = 13;
const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_PARENT: u64 = 0x8000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const CLONE_NEWUSER: u64 = 0x1000_0000;
const CLONE_NEWTIME: u64 = 0x80;
const CLONE_NEWCGROUP: usize = 0x0200_0000;
const CAP_SYS_ADMIN: u32 = 21;
const CLOSE_RANGE_CLOEXEC: usize = 4;
const F_DUPFD_CLOEXEC: usize = 1030;
const O_PATH: u64 = 0o10000000;
const O_CLOEXEC: u64 = 0o2000000;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;
const AT_FDCWD: isize = -100;
const RLIMIT_CORE: usize = 4;
const RLIMIT_NPROC: usize = 6;
const SECCOMP_SET_MODE_FILTER: usize = 1;
const POLLOUT: i16 = 4;
const POLLERR: i16 = 8;

/// fds 0..MAX_FD can be kept (a pass_fd above is refused with EBADF).
const MAX_FD: usize = 4096;

/// A set of fd numbers below MAX_FD.
struct FdSet([u64; MAX_FD / 64]);

impl FdSet {
    fn add(&mut self, fd: i32) -> bool {
        let Ok(fd) = usize::try_from(fd) else { return true }; // -1: none
        if fd >= MAX_FD {
            return false;
        }
        self.0[fd / 64] |= 1 << (fd % 64);
        true
    }

    fn has(&self, fd: usize) -> bool {
        self.0[fd / 64] & (1 << (fd % 64)) != 0
    }

    /// Close every fd not in the set.
    fn close_others(&self) -> Result<(), i32> {
        let mut fd = 0;
        while fd < MAX_FD {
            if self.has(fd) {
                fd += 1;
                continue;
            }
            let start = fd;
            while fd < MAX_FD && !self.has(fd) {
                fd += 1;
            }
            let last = if fd == MAX_FD { u32::MAX as usize } else { fd - 1 };
            // SAFETY: integer arguments; this program holds no Rust owner of any fd (close_range only closes our own).
            unsafe { sys(nr::CLOSE_RANGE, [start, last, 0, 0, 0, 0]) }?;
        }
        Ok(())
    }
}

/// Everything the command line says.
struct Plan {
    args: Args,
    report: i32,
    ppid: usize,
    pdeath: bool,
    ns: [(u64, i32); 8],
    n_ns: usize,
    cgroupns: Option<i32>,
    cgroup: Option<i32>,
    tasks: [i32; 8],
    n_tasks: usize,
    root: i32,
    cwd: Option<*const u8>,
    cwdfd: Option<i32>,
    stdio: [i32; 3],
    uid: Option<u32>,
    gid: Option<u32>,
    keep: u64,
    caplast: u32,
    session: bool,
    seccomp: Option<i32>,
    /// RLIMIT_NPROC (the container's pids limit, counted in its user namespace).
    nproc: Option<u64>,
    /// The spec's rlimits (resource, soft, hard), set after nsfast's own.
    rlimits: [(usize, u64, u64); 16],
    n_rlimits: usize,
    /// argv indexes of the plan (2..end) and of the command (argv_start..).
    end: usize,
    argv_start: usize,
}

fn split_eq(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = b.iter().position(|&c| c == b'=')?;
    Some((&b[..eq], &b[eq + 1..]))
}

fn fd_of(v: &[u8]) -> Option<i32> {
    rt::num(v).and_then(|n| i32::try_from(n).ok())
}

/// The values of `key=` arguments, in order.
fn values<'a>(p: &'a Plan, key: &'a [u8]) -> impl Iterator<Item = (usize, &'static [u8])> + 'a {
    (2..p.end).filter_map(move |i| match p.args.get(i).and_then(split_eq) {
        Some((k, v)) if k == key => Some((i, v)),
        _ => None,
    })
}

fn parse(args: Args) -> Option<Plan> {
    let mut p = Plan {
        args,
        report: -1,
        ppid: 0,
        pdeath: false,
        ns: [(0, -1); 8],
        n_ns: 0,
        cgroupns: None,
        cgroup: None,
        tasks: [-1; 8],
        n_tasks: 0,
        root: -1,
        cwd: None,
        cwdfd: None,
        stdio: [-1; 3],
        uid: None,
        gid: None,
        keep: 0,
        caplast: 0,
        session: false,
        seccomp: None,
        nproc: None,
        rlimits: [(0, 0, 0); 16],
        n_rlimits: 0,
        end: 0,
        argv_start: 0,
    };
    let mut i = 2;
    while i < args.argc {
        let a = args.get(i)?;
        if a == b"--" {
            break;
        }
        let (key, v) = split_eq(a)?;
        match key {
            b"report" => p.report = fd_of(v)?,
            b"ppid" => p.ppid = usize::try_from(rt::num(v)?).ok()?,
            b"pdeath" => p.pdeath = v == b"1",
            b"ns" => {
                let colon = v.iter().position(|&b| b == b':')?;
                *p.ns.get_mut(p.n_ns)? = (rt::num(&v[..colon])? as u64, fd_of(&v[colon + 1..])?);
                p.n_ns += 1;
            }
            b"cgroupns" => p.cgroupns = Some(fd_of(v)?),
            b"cgroup" => p.cgroup = Some(fd_of(v)?),
            b"tasks" => {
                *p.tasks.get_mut(p.n_tasks)? = fd_of(v)?;
                p.n_tasks += 1;
            }
            b"root" => p.root = fd_of(v)?,
            b"cwd" => p.cwd = Some(args.ptr(i, 4)),
            b"cwdfd" => p.cwdfd = Some(fd_of(v)?),
            b"stdio" => {
                let mut parts = v.split(|&b| b == b',');
                for slot in p.stdio.iter_mut() {
                    *slot = fd_of(parts.next()?)?;
                }
            }
            b"uid" => p.uid = Some(u32::try_from(rt::num(v)?).ok()?),
            b"gid" => p.gid = Some(u32::try_from(rt::num(v)?).ok()?),
            b"keep" => p.keep = rt::num(v)? as u64,
            b"caplast" => p.caplast = u32::try_from(rt::num(v)?).ok()?.min(63),
            b"session" => p.session = v == b"1",
            b"seccomp" => p.seccomp = Some(fd_of(v)?),
            b"nproc" => p.nproc = Some(rt::num(v)? as u64),
            b"rlimit" => {
                // RESOURCE:SOFT:HARD, -1 for unlimited (RLIM_INFINITY).
                let mut parts = v.split(|&b| b == b':');
                let res = usize::try_from(rt::num(parts.next()?)?).ok()?;
                let soft = rt::num(parts.next()?)? as u64;
                let hard = rt::num(parts.next()?)? as u64;
                *p.rlimits.get_mut(p.n_rlimits)? = (res, soft, hard);
                p.n_rlimits += 1;
            }
            b"pass" => {
                fd_of(v)?;
            }
            b"cand" => {}
            _ => return None,
        }
        i += 1;
    }
    p.end = i;
    p.argv_start = i + 1;
    (p.report >= 0 && p.root >= 0 && p.argv_start < args.argc).then_some(p)
}

/// Memory the final process's setup uses: written by one process at a time.
pub(crate) struct Shared<T>(pub(crate) UnsafeCell<T>);
// SAFETY: this program is single-threaded; the final process runs while we wait (vfork).
unsafe impl<T> Sync for Shared<T> {}

/// The seccomp programs (Filter::to_bytes), read here. Zero pages until touched.
static FILTERS: Shared<[u32; 64 * 1024]> = Shared(UnsafeCell::new([0; 64 * 1024]));
static FILTERS_LEN: Shared<usize> = Shared(UnsafeCell::new(0));

/// The final process's stack when it shares our memory (CLONE_VM); also the command's, in
/// nsfast-init's main mode (the two modes never run in one process).
#[repr(C, align(16))]
pub(crate) struct Stack([u8; 64 * 1024]);
pub(crate) static STACK: Shared<Stack> = Shared(UnsafeCell::new(Stack([0; 64 * 1024])));

/// The exec helper's main.
pub fn main(args: Args) -> ! {
    // First: nothing in the container may ptrace us or read our /proc files (and so no fd
    // we hold) — neither now nor in the final process before its execve.
    // SAFETY: integer arguments.
    if unsafe { sys(nr::PRCTL, [PR_SET_DUMPABLE, 0, 0, 0, 0, 0]) }.is_err() {
        rt::exit(127);
    }
    let Some(p) = parse(args) else {
        rt::say(b"nsfast-init: bad --exec command line\n");
        rt::exit(127)
    };
    let fail = |step: u32, index: u32, e: i32| -> ! {
        rt::record(p.report, step, index, e);
        rt::exit(127)
    };
    if let Some(fd) = p.seccomp {
        read_filters(fd).unwrap_or_else(|e| fail(STEP_SECCOMP, 0, e));
        rt::close(fd);
    }
    join_namespaces(&p.ns[..p.n_ns]).unwrap_or_else(|(i, e)| fail(STEP_JOIN_NAMESPACES, i, e));
    if p.pdeath {
        // After setns: new credentials (a user namespace's) disarm the death signal.
        // SAFETY: integer arguments.
        unsafe { sys(nr::PRCTL, [rt::PR_SET_PDEATHSIG, rt::SIGKILL, 0, 0, 0, 0]) }
            .unwrap_or_else(|e| fail(STEP_DEATH_SIGNAL, 0, e));
        // The caller may have died before the prctl: then we were re-parented.
        // SAFETY: no arguments.
        if unsafe { sys1(nr::GETPPID, 0) }.ok() != Some(p.ppid) {
            rt::exit(127);
        }
    }
    // The final process shares our memory (no page table to copy, no copy-on-write faults;
    // it holds nothing of the caller), unless it must be in a joined time namespace.
    let in_time_ns = p.ns[..p.n_ns].iter().any(|(f, _)| *f == CLONE_NEWTIME);
    let mut clone = rt::CloneArgs { flags: CLONE_PARENT, ..Default::default() };
    if !in_time_ns {
        clone.flags |= CLONE_VM | CLONE_VFORK;
        clone.stack = STACK.0.get() as u64;
        clone.stack_size = core::mem::size_of::<Stack>() as u64;
    }
    if let Some(fd) = p.cgroup {
        clone.flags |= CLONE_INTO_CGROUP;
        clone.cgroup = fd as u64;
    }
    // With CLONE_PARENT the exit signal is ours (SIGCHLD); clone3 wants none given.
    // SAFETY: the final process only reads `p` and uses STACK/FILTERS while we are stopped
    // in vfork (or in its own copy of our memory).
    let mut res = unsafe { rt::clone3(&clone, final_entry, &p as *const Plan as usize) };
    if res == Err(rt::ENOSYS) && p.cgroup.is_none() {
        // No clone3 here (the caller then gave no `cgroup=`: the final process moves itself
        // through a `tasks=` fd instead). clone(2) as a fork: no stack of our own to give.
        res = rt::fork_parent();
        if res == Ok(0) {
            final_process(&p);
        }
    }
    match res {
        Ok(pid) => {
            rt::record(p.report, STEP_EXEC_PID, pid as u32, 0);
            rt::exit(0)
        }
        Err(e) => fail(STEP_CLONE_JOINED, 0, e),
    }
}

/// setns() into each namespace, closing its fd. With CAP_SYS_ADMIN (a root caller) the
/// others first, with our own rights, then the user namespace (as setns(pidfd) would check
/// them); without it, the user namespace first: it grants the rights for the rest.
fn join_namespaces(ns: &[(u64, i32)]) -> Result<(), (u32, i32)> {
    let user_first = !has_cap(CAP_SYS_ADMIN);
    for pass in [user_first, !user_first] {
        for (i, &(flag, fd)) in ns.iter().enumerate() {
            if (flag == CLONE_NEWUSER) == pass {
                // SAFETY: integer arguments.
                unsafe { sys(nr::SETNS, [fd as usize, flag as usize, 0, 0, 0, 0]) }.map_err(|e| (i as u32, e))?;
                rt::close(fd);
            }
        }
    }
    Ok(())
}

fn capget() -> Result<[CapData; 2], i32> {
    let hdr = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: a live header and two data structs on our stack (abi layouts, checked by the library's tests).
    unsafe { sys(nr::CAPGET, [&hdr as *const CapHeader as usize, data.as_mut_ptr() as usize, 0, 0, 0, 0]) }?;
    Ok(data)
}

fn has_cap(cap: u32) -> bool {
    capget().is_ok_and(|d| d[(cap / 32) as usize].effective & (1 << (cap % 32)) != 0)
}

/// Read the serialized programs (u32 count, then per program a u32 length and that many
/// 8-byte `struct sock_filter`s, little endian) into FILTERS.
fn read_filters(fd: i32) -> Result<(), i32> {
    let buf = FILTERS.0.get() as *mut u8;
    let cap = core::mem::size_of::<[u32; 64 * 1024]>();
    let mut len = 0;
    loop {
        // SAFETY: reads cap - len bytes into FILTERS at len (within its bounds), which only
        // this process (and later the final one) uses.
        let n = unsafe { sys(nr::PREAD64, [fd as usize, buf.add(len) as usize, cap - len, len, 0, 0]) }?;
        if n == 0 {
            break;
        }
        len += n;
        if len == cap {
            return Err(rt::EINVAL); // larger than any filter seccomp accepts
        }
    }
    // SAFETY: as above.
    unsafe { *FILTERS_LEN.0.get() = len };
    Ok(())
}

/// Install the programs read by `read_filters`, in order.
fn install_filters() -> Result<(), i32> {
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const u8,
    }
    // SAFETY: FILTERS_LEN bytes of FILTERS were written by read_filters; nothing writes now.
    let bytes = unsafe { core::slice::from_raw_parts(FILTERS.0.get() as *const u8, *FILTERS_LEN.0.get()) };
    if bytes.is_empty() {
        return Ok(());
    }
    let word =
        |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or(rt::EINVAL);
    let count = word(0)?;
    let mut at = 4;
    for _ in 0..count {
        let len = word(at)? as usize;
        at += 4;
        let insns = bytes.get(at..at + len * 8).ok_or(rt::EINVAL)?;
        at += len * 8;
        // 4-byte aligned (every offset is a multiple of 4): sock_filter's alignment.
        let prog = SockFprog { len: u16::try_from(len).map_err(|_| rt::EINVAL)?, filter: insns.as_ptr() };
        // SAFETY: a live sock_fprog whose filter points to len instructions inside FILTERS.
        unsafe { sys(nr::SECCOMP, [SECCOMP_SET_MODE_FILTER, 0, &prog as *const SockFprog as usize, 0, 0, 0]) }?;
    }
    Ok(())
}

fn set_cloexec(fd: i32, on: bool) -> Result<(), i32> {
    // SAFETY: integer arguments (F_SETFD, F_DUPFD_CLOEXEC).
    unsafe { sys(nr::FCNTL, [fd as usize, rt::F_SETFD, on as usize, 0, 0, 0]) }.map(drop)
}

/// Whether the caller (the only reader of the report pipe) is gone.
fn reader_gone(report: i32) -> bool {
    #[repr(C)]
    struct PollFd {
        fd: i32,
        events: i16,
        revents: i16,
    }
    let mut pfd = PollFd { fd: report, events: POLLOUT, revents: 0 };
    let zero = [0u64; 2];
    // SAFETY: a live pollfd and a zero timespec on our stack.
    unsafe { sys(nr::PPOLL, [&mut pfd as *mut PollFd as usize, 1, zero.as_ptr() as usize, 0, 8, 0]) }.is_ok()
        && pfd.revents & POLLERR != 0
}

extern "C" fn final_entry(arg: usize) -> ! {
    // SAFETY: the helper's Plan, unchanged while we run (it waits in vfork, or this is a copy).
    let p = unsafe { &*(arg as *const Plan) };
    final_process(p)
}

/// The final process: in the container's namespaces (but its cgroup namespace) and in the
/// exec's cgroup. Sets itself up and execs.
fn final_process(p: &Plan) -> ! {
    let fail = |step: u32, e: i32| -> ! {
        rt::record(p.report, step, 0, e);
        rt::exit(127)
    };
    let arm_death_signal = || {
        if p.pdeath {
            // SAFETY: integer arguments.
            unsafe { sys(nr::PRCTL, [rt::PR_SET_PDEATHSIG, rt::SIGKILL, 0, 0, 0, 0]) }
                .unwrap_or_else(|e| fail(STEP_DEATH_SIGNAL, e));
            // Our parent is the caller, outside our pid namespace (getppid() says 0): it is
            // alive while it holds the report pipe's read end.
            if reader_gone(p.report) {
                rt::exit(127);
            }
        }
    };
    arm_death_signal();
    // Only what is still needed stays open (each closed right after use).
    let mut keep = FdSet([0; MAX_FD / 64]);
    let mut ok = keep.add(p.report) && keep.add(p.root) && p.cwdfd.is_none_or(|fd| keep.add(fd));
    ok &= p.cgroupns.is_none_or(|fd| keep.add(fd));
    for (i, &fd) in p.stdio.iter().enumerate() {
        ok &= keep.add(if fd < 0 { i as i32 } else { fd });
    }
    for &fd in &p.tasks[..p.n_tasks] {
        ok &= keep.add(fd);
    }
    for (_, v) in values(p, b"pass") {
        ok &= fd_of(v).is_some_and(|fd| keep.add(fd));
    }
    if !ok {
        fail(STEP_CLOSE_FDS_EARLY, 9 /* EBADF */);
    }
    keep.close_others().unwrap_or_else(|e| fail(STEP_CLOSE_FDS_EARLY, e));
    for (i, &fd) in p.tasks[..p.n_tasks].iter().enumerate() {
        if let Err(e) = rt::write(fd, b"0") {
            rt::record(p.report, STEP_ATTACH_CGROUP, i as u32, e);
            rt::exit(127);
        }
        rt::close(fd);
    }
    // Only now, inside the exec's cgroup: with nsdelegate, CLONE_INTO_CGROUP refuses to move
    // a task across the boundary of its cgroup namespace.
    if let Some(fd) = p.cgroupns {
        // SAFETY: integer arguments.
        unsafe { sys(nr::SETNS, [fd as usize, CLONE_NEWCGROUP, 0, 0, 0, 0]) }
            .unwrap_or_else(|e| fail(STEP_JOIN_CGROUP_NS, e));
        rt::close(fd);
    }
    // The container's root as it was at start, then the cwd resolved inside it: its
    // symlinks stay in the root, magic links (/proc/self/fd/N, /proc/PID/cwd) are refused.
    // SAFETY: integer arguments.
    unsafe { sys1(nr::FCHDIR, p.root as usize) }.unwrap_or_else(|e| fail(STEP_CHROOT, e));
    // SAFETY: a static C string.
    unsafe { sys1(nr::CHROOT, c".".as_ptr() as usize) }.unwrap_or_else(|e| fail(STEP_CHROOT, e));
    rt::close(p.root);
    match (p.cwd, p.cwdfd) {
        (_, Some(fd)) => {
            // SAFETY: integer arguments.
            unsafe { sys1(nr::FCHDIR, fd as usize) }.unwrap_or_else(|e| fail(STEP_CHDIR, e));
            rt::close(fd);
        }
        (Some(path), None) => {
            let how: [u64; 3] = [O_PATH | nr::O_DIRECTORY | O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS];
            // SAFETY: `path` is a C string of our argv; `how` a live 24-byte open_how on our stack.
            let fd = unsafe { sys(nr::OPENAT2, [AT_FDCWD as usize, path as usize, how.as_ptr() as usize, 24, 0, 0]) }
                .unwrap_or_else(|e| fail(STEP_CHDIR, e));
            // SAFETY: integer arguments.
            unsafe { sys1(nr::FCHDIR, fd) }.unwrap_or_else(|e| fail(STEP_CHDIR, e));
            rt::close(fd as i32);
        }
        (None, None) => {}
    }
    // The bounding set needs CAP_SETPCAP, which a switch to a non-root uid takes away.
    for cap in 0..=p.caplast {
        if p.keep & (1u64 << cap) == 0 {
            // SAFETY: integer arguments.
            unsafe { sys(nr::PRCTL, [PR_CAPBSET_DROP, cap as usize, 0, 0, 0, 0]) }
                .unwrap_or_else(|e| fail(STEP_DROP_CAPS, e));
        }
    }
    if let Some(gid) = p.gid {
        // SAFETY: integer arguments.
        unsafe { sys(nr::SETRESGID, [gid as usize, gid as usize, gid as usize, 0, 0, 0]) }
            .unwrap_or_else(|e| fail(STEP_SET_GID, e));
    }
    // SAFETY: size 0, NULL list: nothing is read.
    match unsafe { sys(nr::SETGROUPS, [0; 6]) } {
        Ok(_) | Err(rt::EPERM) => {} // EPERM: setgroups is denied in this user namespace
        Err(e) => fail(STEP_SET_GROUPS, e),
    }
    if let Some(uid) = p.uid {
        // SAFETY: integer arguments.
        unsafe { sys(nr::SETRESUID, [uid as usize, uid as usize, uid as usize, 0, 0, 0]) }
            .unwrap_or_else(|e| fail(STEP_SET_UID, e));
    }
    // A uid/gid change disarmed the death signal: again, and is the caller still there?
    arm_death_signal();
    // SAFETY: integer arguments.
    unsafe { sys(nr::PRCTL, [PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0, 0]) }
        .unwrap_or_else(|e| fail(STEP_DROP_CAPS, e));
    let have = capget().unwrap_or_else(|e| fail(STEP_DROP_CAPS, e));
    let (lo, hi) = (p.keep as u32, (p.keep >> 32) as u32);
    let only = |d: CapData, m: u32| CapData {
        effective: d.permitted & m,
        permitted: d.permitted & m,
        inheritable: d.permitted & m,
    };
    let data = [only(have[0], lo), only(have[1], hi)];
    let hdr = CapHeader { version: CAP_VERSION_3, pid: 0 };
    // SAFETY: a live header and two data structs on our stack (abi layouts, checked by the library's tests).
    unsafe { sys(nr::CAPSET, [&hdr as *const CapHeader as usize, data.as_ptr() as usize, 0, 0, 0, 0]) }
        .unwrap_or_else(|e| fail(STEP_DROP_CAPS, e));
    if p.session {
        // SAFETY: no arguments.
        unsafe { sys1(nr::SETSID, 0) }.unwrap_or_else(|e| fail(STEP_SETSID, e));
    }
    // SAFETY: integer arguments.
    unsafe { sys(nr::PRCTL, [PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0]) }.unwrap_or_else(|e| fail(STEP_NO_NEW_PRIVS, e));
    let setrlimit = |resource: usize, soft: u64, hard: u64| {
        let lim: [u64; 2] = [soft, hard];
        // SAFETY: a live rlimit64 (two u64) on our stack; old NULL.
        unsafe { sys(nr::PRLIMIT64, [0, resource, lim.as_ptr() as usize, 0, 0, 0]) }
            .unwrap_or_else(|e| fail(STEP_RLIMIT, e));
    };
    let rlimits = &p.rlimits[..p.n_rlimits];
    // No core to the host's core_pattern: 1, the value the kernel starts no pipe helper for.
    if !rlimits.iter().any(|r| r.0 == RLIMIT_CORE) {
        setrlimit(RLIMIT_CORE, 1, 1);
    }
    if let Some(n) = p.nproc {
        setrlimit(RLIMIT_NPROC, n, n);
    }
    for &(resource, soft, hard) in rlimits {
        setrlimit(resource, soft, hard);
    }

    // stdio: first lift sources sitting on 0..2 out of the way, then install.
    let mut src = p.stdio;
    for (i, fd) in src.iter_mut().enumerate() {
        if *fd >= 0 && *fd < 3 && *fd != i as i32 {
            // SAFETY: integer arguments (F_SETFD, F_DUPFD_CLOEXEC).
            *fd = unsafe { sys(nr::FCNTL, [*fd as usize, F_DUPFD_CLOEXEC, 3, 0, 0, 0]) }
                .unwrap_or_else(|e| fail(STEP_STDIO, e)) as i32;
        }
    }
    for (i, &fd) in src.iter().enumerate() {
        let res = if fd < 0 {
            Ok(())
        } else if fd == i as i32 {
            set_cloexec(fd, false)
        } else {
            // SAFETY: integer arguments; we own our whole fd table.
            unsafe { sys(nr::DUP3, [fd as usize, i, 0, 0, 0, 0]) }.map(drop)
        };
        res.unwrap_or_else(|e| fail(STEP_STDIO, e));
    }
    // Everything from 3 up closes at exec (the report pipe too), but the fds passed on purpose.
    // SAFETY: integer arguments; this program holds no Rust owner of any fd (close_range only closes our own).
    unsafe { sys(nr::CLOSE_RANGE, [3, u32::MAX as usize, CLOSE_RANGE_CLOEXEC, 0, 0, 0]) }
        .unwrap_or_else(|e| fail(STEP_CLOSE_FDS, e));
    for (_, v) in values(p, b"pass") {
        set_cloexec(fd_of(v).unwrap_or(-1), false).unwrap_or_else(|e| fail(STEP_CLOSE_FDS, e));
    }
    rt::set_sigmask(0);
    // SIGPIPE as everything else: the default (the caller's child reset them all).
    let dfl = [0usize; 4];
    // SAFETY: a live kernel sigaction of zeros (SIG_DFL) on our stack; old NULL.
    let _ = unsafe { sys(nr::RT_SIGACTION, [SIGPIPE, dfl.as_ptr() as usize, 0, 8, 0, 0]) };
    // Last: from here on only what the filter allows (execve, write, exit_group are).
    install_filters().unwrap_or_else(|e| fail(STEP_SECCOMP, e));
    let candidates = values(p, b"cand").map(|(i, _)| p.args.ptr(i, 5));
    // SAFETY: the kernel's argv and envp arrays (NULL-terminated, alive for the process);
    // candidates are argv strings (Args::ptr: NULL when out of range).
    let err = unsafe { rt::exec_candidates(candidates, p.args.tail(p.argv_start), p.args.envp) };
    fail(STEP_EXEC, err)
}
