//! The little nsfast-init needs instead of libc: the process entry point, raw system calls,
//! the memory functions the compiler may call, and a panic handler.
//!
//! No libc on purpose: a static glibc binary touches ~26 pages before main, and a page fault
//! costs ~18 us on the VMs we measured; without it the binary starts in ~3 faults (this is
//! on the path of every `Container.exec` and `init=True` spawn).

#[path = "../src/abi.rs"]
mod abi;
pub use abi::{CapData, CapHeader, CloneArgs, CAP_VERSION_3};
use core::arch::{asm, global_asm};

/// The command line and environment the kernel put on the initial stack.
#[derive(Clone, Copy)]
pub struct Args {
    pub argc: usize,
    /// NULL-terminated.
    pub argv: *const *const u8,
    /// NULL-terminated.
    pub envp: *const *const u8,
}

impl Args {
    /// argv[i] as bytes (without its NUL), or None past the end.
    pub fn get(&self, i: usize) -> Option<&'static [u8]> {
        if i >= self.argc {
            return None;
        }
        // SAFETY: i < argc: argv[i] is a NUL-terminated string the kernel copied for us,
        // alive (never written) for the life of the process.
        Some(unsafe { cstr(*self.argv.add(i)) })
    }

    /// The NULL-terminated tail argv[i..] (execve's argv).
    pub fn tail(&self, i: usize) -> *const *const u8 {
        // SAFETY: i <= argc: at most the terminating NULL slot.
        unsafe { self.argv.add(i.min(self.argc)) }
    }

    /// A pointer to argv[i] + `skip` bytes: a NUL-terminated string inside it (NULL if there
    /// is no argv[i] or it is shorter than `skip`).
    pub fn ptr(&self, i: usize, skip: usize) -> *const u8 {
        match self.get(i) {
            // Still inside argv[i] (at most its NUL): a NUL-terminated string.
            Some(s) if skip <= s.len() => s.as_ptr().wrapping_add(skip),
            _ => core::ptr::null(),
        }
    }
}

/// The bytes of a NUL-terminated string.
///
/// # Safety
/// `p` must point to a NUL-terminated string that lives (unchanged) for the process.
pub unsafe fn cstr(p: *const u8) -> &'static [u8] {
    let mut n = 0;
    // SAFETY: as the caller promises, every byte up to the NUL is readable.
    while unsafe { *p.add(n) } != 0 {
        n += 1;
    }
    // SAFETY: the n bytes before the NUL.
    unsafe { core::slice::from_raw_parts(p, n) }
}

#[cfg(target_arch = "x86_64")]
global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {entry}",
    "ud2",
    entry = sym start,
);

#[cfg(target_arch = "aarch64")]
global_asm!(
    ".globl _start",
    "_start:",
    "mov x29, xzr",
    "mov x30, xzr",
    "mov x0, sp",
    "bl {entry}",
    "brk #1",
    entry = sym start,
);

/// Called by `_start` with the initial stack: argc, argv..., NULL, envp..., NULL.
unsafe extern "C" fn start(sp: *const usize) -> ! {
    // SAFETY: the kernel's initial stack layout.
    let args = unsafe {
        let argc = *sp;
        let argv = sp.add(1) as *const *const u8;
        Args { argc, argv, envp: argv.add(argc + 1) }
    };
    crate::main(args)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(127)
}

/// Named by the unwind tables of the precompiled `core`; never called (panic=abort).
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

// The compiler lowers copies and fills to these; `#![no_builtins]` keeps the loops loops.

/// # Safety
/// As C's memcpy.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: as C's memcpy: both ranges are valid for n bytes.
        unsafe { *dst.add(i) = *src.add(i) };
    }
    dst
}

/// # Safety
/// As C's memmove.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) < (src as usize) {
        for i in 0..n {
            // SAFETY: as C's memmove; forward is safe when dst is below src.
            unsafe { *dst.add(i) = *src.add(i) };
        }
    } else {
        for i in (0..n).rev() {
            // SAFETY: as above, backwards.
            unsafe { *dst.add(i) = *src.add(i) };
        }
    }
    dst
}

/// # Safety
/// As C's memset.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: as C's memset.
        unsafe { *dst.add(i) = c as u8 };
    }
    dst
}

/// # Safety
/// As C's memcmp.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: as C's memcmp.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// As C's bcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract.
    unsafe { memcmp(a, b, n) }
}

#[cfg(target_arch = "x86_64")]
pub mod nr {
    pub const READ: usize = 0;
    pub const WRITE: usize = 1;
    pub const CLOSE: usize = 3;
    pub const RT_SIGACTION: usize = 13;
    pub const RT_SIGPROCMASK: usize = 14;
    pub const PREAD64: usize = 17;
    pub const CLONE: usize = 56;
    pub const EXECVE: usize = 59;
    pub const EXIT_GROUP: usize = 231;
    pub const WAIT4: usize = 61;
    pub const KILL: usize = 62;
    pub const FCNTL: usize = 72;
    pub const FCHDIR: usize = 81;
    pub const GETPPID: usize = 110;
    pub const SETSID: usize = 112;
    pub const SETGROUPS: usize = 116;
    pub const SETRESUID: usize = 117;
    pub const SETRESGID: usize = 119;
    pub const CAPGET: usize = 125;
    pub const CAPSET: usize = 126;
    pub const RT_SIGTIMEDWAIT: usize = 128;
    pub const PRCTL: usize = 157;
    pub const CHROOT: usize = 161;
    pub const PPOLL: usize = 271;
    pub const DUP3: usize = 292;
    pub const PRLIMIT64: usize = 302;
    pub const SETNS: usize = 308;
    pub const SECCOMP: usize = 317;
    pub const CLONE3: usize = 435;
    pub const CLOSE_RANGE: usize = 436;
    pub const OPENAT2: usize = 437;
    pub const PIDFD_OPEN: usize = 434;
    pub const SIGNALFD4: usize = 289;
    pub const O_DIRECTORY: u64 = 0o200000;
}

#[cfg(target_arch = "aarch64")]
pub mod nr {
    pub const READ: usize = 63;
    pub const WRITE: usize = 64;
    pub const CLOSE: usize = 57;
    pub const RT_SIGACTION: usize = 134;
    pub const RT_SIGPROCMASK: usize = 135;
    pub const PREAD64: usize = 67;
    pub const CLONE: usize = 220;
    pub const EXECVE: usize = 221;
    pub const EXIT_GROUP: usize = 94;
    pub const WAIT4: usize = 260;
    pub const KILL: usize = 129;
    pub const FCNTL: usize = 25;
    pub const FCHDIR: usize = 50;
    pub const GETPPID: usize = 173;
    pub const SETSID: usize = 157;
    pub const SETGROUPS: usize = 159;
    pub const SETRESUID: usize = 147;
    pub const SETRESGID: usize = 149;
    pub const CAPGET: usize = 90;
    pub const CAPSET: usize = 91;
    pub const RT_SIGTIMEDWAIT: usize = 137;
    pub const PRCTL: usize = 167;
    pub const CHROOT: usize = 51;
    pub const PPOLL: usize = 73;
    pub const DUP3: usize = 24;
    pub const PRLIMIT64: usize = 261;
    pub const SETNS: usize = 268;
    pub const SECCOMP: usize = 277;
    pub const CLONE3: usize = 435;
    pub const CLOSE_RANGE: usize = 436;
    pub const OPENAT2: usize = 437;
    pub const PIDFD_OPEN: usize = 434;
    pub const SIGNALFD4: usize = 74;
    pub const O_DIRECTORY: u64 = 0o40000;
}

/// One system call; the errno on failure.
///
/// # Safety
/// The arguments must be valid for system call `n`: every pointer points to live memory of
/// the layout the kernel reads or writes there, for the whole call, and `n` does not change
/// memory this program relies on (munmap, a CLONE_VM clone without a stack of its own...).
/// (Fds are integers here: this program has no Rust owner of any fd.)
pub unsafe fn sys(n: usize, a: [usize; 6]) -> Result<usize, i32> {
    let ret: isize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a plain system call; see above for the arguments.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack)
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above.
    unsafe {
        asm!(
            "svc 0",
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
            in("x8") n,
            options(nostack)
        );
    }
    result(ret)
}

/// A raw system call's return value: -4095..-1 is an errno.
fn result(ret: isize) -> Result<usize, i32> {
    if (-4095..0).contains(&ret) {
        Err(-ret as i32)
    } else {
        Ok(ret as usize)
    }
}

/// [`sys`] with one argument.
///
/// # Safety
/// As for [`sys`].
pub unsafe fn sys1(n: usize, a: usize) -> Result<usize, i32> {
    // SAFETY: as the caller promises.
    unsafe { sys(n, [a, 0, 0, 0, 0, 0]) }
}

pub fn exit(code: i32) -> ! {
    // SAFETY: integer argument.
    let _ = unsafe { sys1(nr::EXIT_GROUP, code as usize) };
    loop {
        core::hint::spin_loop();
    }
}

pub fn close(fd: i32) {
    // SAFETY: integer argument; we own our whole fd table.
    let _ = unsafe { sys1(nr::CLOSE, fd as usize) };
}

pub fn write(fd: i32, b: &[u8]) -> Result<usize, i32> {
    // SAFETY: from a live slice, of its length.
    unsafe { sys(nr::WRITE, [fd as usize, b.as_ptr() as usize, b.len(), 0, 0, 0]) }
}

/// A message on stderr (best effort).
pub fn say(msg: &[u8]) {
    let _ = write(2, msg);
}

/// Write nsfast's 12-byte report record {step, index, errno}.
pub fn record(report: i32, step: u32, index: u32, errno: i32) {
    let mut rec = [0u8; 12];
    rec[0..4].copy_from_slice(&step.to_ne_bytes());
    rec[4..8].copy_from_slice(&index.to_ne_bytes());
    rec[8..12].copy_from_slice(&errno.to_ne_bytes());
    let _ = write(report, &rec);
}

/// A decimal number (an optional leading '-').
pub fn num(b: &[u8]) -> Option<i64> {
    let (neg, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (d - b'0') as i64;
    }
    Some(if neg { -v } else { v })
}

/// The signal mask (64 signals, as the kernel's sigset_t on these architectures).
pub fn set_sigmask(mask: u64) {
    // SAFETY: a live sigset on our stack; old NULL.
    let _ = unsafe {
        sys(nr::RT_SIGPROCMASK, [2 /* SIG_SETMASK */, &mask as *const u64 as usize, 0, 8, 0, 0])
    };
}

pub const F_SETFD: usize = 2;
pub const PR_SET_PDEATHSIG: usize = 1;
pub const SIGKILL: usize = 9;

pub const ENOENT: i32 = 2;
pub const EACCES: i32 = 13;
pub const ENOTDIR: i32 = 20;
pub const EINVAL: i32 = 22;
pub const EPERM: i32 = 1;
pub const ENOSYS: i32 = 38;

/// execvpe's rule over `candidates`: skip ENOENT/ENOTDIR, remember EACCES, stop at anything
/// else. Returns the errno to report (only returns if nothing could be exec'd).
///
/// # Safety
/// Each candidate is NULL or a NUL-terminated string; `argv` and `envp` are NULL-terminated
/// arrays of such strings; all stay alive for the call.
pub unsafe fn exec_candidates(
    candidates: impl Iterator<Item = *const u8>,
    argv: *const *const u8,
    envp: *const *const u8,
) -> i32 {
    let mut err = ENOENT;
    let mut saw_eacces = false;
    for cand in candidates {
        // SAFETY: the caller's promise (see # Safety).
        let e =
            unsafe { sys(nr::EXECVE, [cand as usize, argv as usize, envp as usize, 0, 0, 0]) }.err().unwrap_or(EINVAL);
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
    err
}

/// clone3 whose child calls `entry(arg)` (never returning), on `args.stack` if given (the
/// child may share our memory: CLONE_VM) or on its copy of our stack (a fork). Returns the
/// child's pid in the parent.
///
/// # Safety
/// With a stack, it and `arg` must stay valid while the child uses them (CLONE_VFORK makes
/// us wait until the child exec'd or exited).
pub unsafe fn clone3(args: &CloneArgs, entry: extern "C" fn(usize) -> !, arg: usize) -> Result<usize, i32> {
    let ret: isize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the child starts with rsp = the stack's top (or our rsp in a fork) and only
    // calls `entry`, which never returns (ud2 if it did); r12/r13 survive `syscall`.
    unsafe {
        asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "and rsp, -16",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") nr::CLONE3 as isize => ret,
            in("rdi") args as *const CloneArgs,
            in("rsi") core::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above; x20/x21 are callee-saved and survive `svc`.
    unsafe {
        asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x0, x20",
            "blr x21",
            "brk #1",
            "2:",
            inlateout("x0") args as *const CloneArgs as isize => ret,
            in("x1") core::mem::size_of::<CloneArgs>(),
            in("x8") nr::CLONE3,
            in("x20") arg,
            in("x21") entry,
        );
    }
    result(ret)
}

/// vfork on a stack of its own: clone(2) (clone3 may be ENOSYS under seccomp) with
/// CLONE_VM | CLONE_VFORK | SIGCHLD, whose child calls `entry(arg)` on `stack_top` (never
/// returning) while we wait until it exec'd or exited. The child's pid.
///
/// # Safety
/// The stack below `stack_top` (16-byte aligned) and what `arg` points to must stay valid and
/// untouched by anything else while the child uses them; `entry` execs or exits.
pub unsafe fn vfork_on(stack_top: *mut u8, entry: extern "C" fn(usize) -> !, arg: usize) -> Result<usize, i32> {
    const FLAGS: usize = 0x100 /* CLONE_VM */ | 0x4000 /* CLONE_VFORK */ | 17 /* SIGCHLD */;
    let ret: isize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the child starts with rsp = stack_top and only calls `entry`, which never
    // returns (ud2 if it did); r12/r13 survive `syscall`.
    unsafe {
        asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "and rsp, -16",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") nr::CLONE as isize => ret,
            in("rdi") FLAGS,
            in("rsi") stack_top,
            in("rdx") 0usize,
            in("r10") 0usize,
            in("r8") 0usize,
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above; the kernel sets sp to stack_top, x20/x21 survive `svc`.
    unsafe {
        asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x0, x20",
            "blr x21",
            "brk #1",
            "2:",
            inlateout("x0") FLAGS as isize => ret,
            in("x1") stack_top,
            in("x2") 0usize,
            in("x3") 0usize,
            in("x4") 0usize,
            in("x8") nr::CLONE,
            in("x20") arg,
            in("x21") entry,
        );
    }
    result(ret)
}

/// clone(CLONE_PARENT) with no new stack: a fork whose child is our parent's (its exit
/// signal is our own's), 0 in the child, which continues on its copy of our memory.
pub fn fork_parent() -> Result<usize, i32> {
    const CLONE_PARENT: usize = 0x8000;
    // SAFETY: no stack and no CLONE_VM: a fork, nothing shared.
    unsafe { sys(nr::CLONE, [CLONE_PARENT, 0, 0, 0, 0, 0]) }
}
