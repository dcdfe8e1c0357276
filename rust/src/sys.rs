//! Every `unsafe` block of the crate lives here: the few system calls that rustix does not
//! wrap (clone3 with a private stack, close_range, mount_setattr, signal dispositions, the
//! loopback ioctl) and the memory the child runs on.
//!
//! Functions marked "child-safe" may be called between clone3 and execve: they make one raw
//! system call, allocate nothing and take no lock. The child shares the parent's memory
//! (`CLONE_VM`), so it must not touch anything else.
//!
//! A safe function here is sound for every input; where an input can break memory or I/O
//! safety (an fd number that something else owns and will use, a raw address), the function
//! is `unsafe` and says what its caller promises. Kernel structs come from linux-raw-sys
//! (`crate::abi`'s, shared with the no-dependency nsfast-init, are checked against it).

pub use crate::abi::CloneArgs;
use crate::abi::{CapData, CapHeader};
use std::ffi::{c_int, c_void, CStr};
use std::io;
use std::os::fd::RawFd;
use std::ptr;

use rustix::io::Errno;

/// The entry point of a child: runs on the private stack and never returns.
pub type ChildFn = extern "C" fn(arg: *mut c_void) -> c_int;

/// clone3 with a private stack: the child starts executing `entry(arg)` on that stack,
/// the parent gets the child's pid (or the errno).
///
/// # Safety
/// `args.stack`/`args.stack_size` must describe a mapping that stays alive until the child
/// has exec'd or exited; `entry` must never return and must only read `arg`, which must stay
/// valid for as long.
#[cfg(target_arch = "x86_64")]
pub unsafe fn clone3(args: &mut CloneArgs, entry: ChildFn, arg: *mut c_void) -> Result<i32, Errno> {
    let ret: isize;
    // SAFETY: the kernel starts the child with rsp = stack + stack_size (16-byte aligned, we
    // page-align the mapping). The child never returns into this frame: it calls `entry`
    // (which execs or exits) and traps if that ever came back. r12/r13 are preserved
    // across `syscall`, so the child still has them.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    if ret < 0 {
        Err(Errno::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as i32)
    }
}

/// See the x86_64 version.
///
/// # Safety
/// As for the x86_64 version.
#[cfg(target_arch = "aarch64")]
pub unsafe fn clone3(args: &mut CloneArgs, entry: ChildFn, arg: *mut c_void) -> Result<i32, Errno> {
    let ret: isize;
    // SAFETY: as for x86_64; the kernel sets sp to the top of the private stack, x20/x21
    // are callee-saved and survive `svc`.
    unsafe {
        std::arch::asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x0, x20",
            "blr x21",
            "brk #1",
            "2:",
            inlateout("x0") args as *mut CloneArgs as isize => ret,
            in("x1") std::mem::size_of::<CloneArgs>(),
            in("x8") libc::SYS_clone3,
            in("x20") arg,
            in("x21") entry,
            options(nostack)
        );
    }
    if ret < 0 {
        Err(Errno::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as i32)
    }
}

/// clone3 with `args`, or with `legacy` (clone3 is ENOSYS) clone(2) from the same
/// arguments: their flags (which must fit its 32 bits, without an exit signal in the low 8),
/// SIGCHLD, the top of their stack, and their pidfd pointer (CLONE_PIDFD). The one place
/// that chooses between the two.
///
/// # Safety
/// As for [`clone3`]; `args.stack`/`stack_size` describe the child's stack and `args.pidfd`,
/// when set, points to a live `c_int`.
pub unsafe fn clone_any(args: &mut CloneArgs, legacy: bool, entry: ChildFn, arg: *mut c_void) -> Result<i32, Errno> {
    if !legacy {
        // SAFETY: as the caller promises.
        return unsafe { clone3(args, entry, arg) };
    }
    debug_assert!(args.flags >> 32 == 0 && args.flags & 0xff == 0, "clone(2) flags");
    let stack_top = (args.stack + args.stack_size) as *mut c_void;
    let mut unused: c_int = -1;
    // SAFETY: the caller promises a live c_int behind a non-zero `args.pidfd`.
    let pidfd = if args.pidfd != 0 { unsafe { &mut *(args.pidfd as *mut c_int) } } else { &mut unused };
    // SAFETY: as the caller promises.
    unsafe { clone_legacy(args.flags, stack_top, pidfd, entry, arg) }
}

/// clone(2) through libc, for kernels without clone3 (ENOSYS). `CLONE_PIDFD` stores the
/// pidfd through the parent_tid pointer there.
///
/// # Safety
/// As for [`clone3`].
unsafe fn clone_legacy(
    flags: u64,
    stack_top: *mut c_void,
    pidfd: &mut c_int,
    entry: ChildFn,
    arg: *mut c_void,
) -> Result<i32, Errno> {
    // SAFETY: glibc's clone() switches to `stack_top` in the child and calls `entry`.
    let ret = unsafe { libc::clone(entry, stack_top, (flags as c_int) | libc::SIGCHLD, arg, pidfd as *mut c_int) };
    if ret < 0 {
        Err(Errno::from_raw_os_error(io::Error::last_os_error().raw_os_error().unwrap_or(0)))
    } else {
        Ok(ret)
    }
}

/// The child's private stack: an anonymous mapping with a guard page at the bottom.
pub struct Stack {
    base: *mut c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value.
unsafe impl Send for Stack {}

const PAGE: usize = 4096;

impl Stack {
    pub fn new(len: usize) -> io::Result<Stack> {
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the first page belongs to the mapping we just made.
        if unsafe { libc::mprotect(base, PAGE, libc::PROT_NONE) } != 0 {
            let err = io::Error::last_os_error();
            // SAFETY: unmapping what we mapped.
            unsafe { libc::munmap(base, len) };
            return Err(err);
        }
        Ok(Stack { base, len })
    }

    pub fn bottom(&self) -> u64 {
        self.base as u64
    }

    pub fn size(&self) -> u64 {
        self.len as u64
    }

    pub fn top(&self) -> *mut c_void {
        // SAFETY: one past the end of the mapping, which is where a stack starts.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; the spawner only drops it after the child has left
        // this address space (exec or exit closed its end of the error pipe).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The calling thread as another effective uid for a moment: a user namespace it creates
/// meanwhile is owned by that uid, not by root. The kernel charges its per-user counts
/// (inotify instances, POSIX message-queue bytes, pending signals, ...) at every level of
/// user namespaces up to the owner's: a root caller's sandbox owned by root could use up
/// host root's (128 inotify instances by default), and root daemons then fail. Only the
/// effective uid changes: the real and saved uids stay root's, and the filesystem uid is set
/// back to root's, so what the thread (and the child it clones) may open is as before.
/// Dropped on the same thread: root again, its capability sets and parent-death signal as
/// they were (a change of ids changes both). (It also clears the process's dumpable attribute: see
/// [`KeepDumpable`], which the spawner holds across the whole start.)
pub struct ThreadOwner {
    /// Its capability sets: leaving and regaining euid 0 would set the effective set to the
    /// permitted one, raising what the caller had lowered.
    caps: [CapData; 2],
    _pdeathsig: KeepDeathSignal,
}

/// The calling thread's parent-death signal, re-armed on drop: any change of the thread's
/// ids (effective or filesystem) clears it. Held last by a guard that changes ids, so it
/// drops once they are back.
struct KeepDeathSignal(Option<rustix::process::Signal>);

impl KeepDeathSignal {
    fn new() -> KeepDeathSignal {
        KeepDeathSignal(rustix::process::parent_process_death_signal().ok().flatten())
    }
}

impl Drop for KeepDeathSignal {
    fn drop(&mut self) {
        if self.0.is_some() {
            let _ = rustix::process::set_parent_process_death_signal(self.0);
        }
    }
}

impl ThreadOwner {
    /// None where this thread could not become root again (neither its real nor its saved
    /// uid is 0): nothing is changed then.
    pub fn enter(uid: u32) -> Option<ThreadOwner> {
        let (mut r, mut e, mut s) = (0, 0, 0);
        // SAFETY: getresuid writes three uid_t.
        if unsafe { libc::getresuid(&mut r, &mut e, &mut s) } != 0 || e != 0 || (r != 0 && s != 0) {
            return None;
        }
        let caps = capget_all().ok()?;
        let owner = ThreadOwner { caps, _pdeathsig: KeepDeathSignal::new() };
        let uid = rustix::process::Uid::from_raw(uid);
        rustix::thread::set_thread_res_uid(None, Some(uid), None).ok()?;
        // SAFETY: setfsuid(2) of this thread; it cannot fail for the real uid (0 or, with the
        // saved uid 0, allowed as the effective one was).
        unsafe { libc::syscall(libc::SYS_setfsuid, 0) };
        Some(owner)
    }
}

impl Drop for ThreadOwner {
    fn drop(&mut self) {
        if rustix::thread::set_thread_res_uid(None, Some(rustix::process::Uid::ROOT), None).is_err() {
            // Never go on as another uid: whatever the caller did next would run as it.
            eprintln!("nsfast: cannot become root again after a clone; aborting");
            std::process::abort();
        }
        let _ = capset_all(&self.caps);
    }
}

/// This process's dumpable attribute, put back on drop as it was when made. A child cloned
/// with CLONE_VM shares our memory until it execs, and a change of its ids meanwhile
/// (becoming its user namespace's root) clears the attribute of that memory: ours. Without
/// this, a process that started one sandbox was left with no core dumps, its /proc files
/// root's. Held by the spawner until the child has exec'd or died.
pub struct KeepDumpable(bool);

impl Default for KeepDumpable {
    fn default() -> KeepDumpable {
        KeepDumpable::new()
    }
}

impl KeepDumpable {
    pub fn new() -> KeepDumpable {
        use rustix::process::{dumpable_behavior, DumpableBehavior};
        KeepDumpable(matches!(dumpable_behavior(), Ok(DumpableBehavior::Dumpable)))
    }
}

impl Drop for KeepDumpable {
    fn drop(&mut self) {
        use rustix::process::{dumpable_behavior, set_dumpable_behavior, DumpableBehavior};
        if self.0 && !matches!(dumpable_behavior(), Ok(DumpableBehavior::Dumpable)) {
            let _ = set_dumpable_behavior(DumpableBehavior::Dumpable);
        }
    }
}

/// Block every signal of the calling thread; returns the previous mask.
pub fn block_all_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; pthread_sigmask only reads `all` and writes `old`.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    }
}

pub fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: restores a mask returned by block_all_signals.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, ptr::null_mut()) };
}

use linux_raw_sys::general::{kernel_sigaction, kernel_sigset_t, mount_attr};

/// Child-safe: set every catchable signal to its default disposition, so no handler of
/// the parent (whose code and memory the child still shares) can run in the child.
pub fn child_reset_signal_dispositions() {
    // SIG_DFL, no flags, empty mask.
    let act = kernel_sigaction { sa_handler_kernel: None, sa_flags: 0, sa_restorer: None, sa_mask: empty_sigset() };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // Raw: libc's wrapper would write a failure to errno, i.e. the parent thread's TLS.
        // SAFETY: rt_sigaction reads one kernel_sigaction (live on our stack), writes nothing
        // (oldact NULL); 8 is the size of the kernel's sigset_t here.
        let _ = unsafe {
            raw6(libc::SYS_rt_sigaction, [sig as usize, &act as *const kernel_sigaction as usize, 0, 8, 0, 0])
        };
    }
}

fn empty_sigset() -> kernel_sigset_t {
    kernel_sigset_t { sig: [0; 1] }
}

/// Child-safe: unblock every signal (the mask survives execve).
pub fn child_unblock_all_signals() {
    let empty = empty_sigset();
    // SAFETY: rt_sigprocmask reads one kernel sigset_t (8 bytes, live on our stack) and
    // writes nothing (oldset NULL).
    let _ = unsafe {
        raw6(
            libc::SYS_rt_sigprocmask,
            [libc::SIG_SETMASK as usize, &empty as *const kernel_sigset_t as usize, 0, 8, 0, 0],
        )
    };
}

/// Child-safe raw syscall returning the errno instead of touching the (shared) errno slot.
///
/// # Safety
/// The arguments must be valid for system call `nr`: every pointer points to live memory of
/// the layout the kernel reads or writes there, for the whole call; every fd it closes,
/// replaces or hands on is one the caller may dispose of (nothing else owns and will use
/// it); and `nr` does not change memory the program relies on (munmap, a CLONE_VM clone
/// without a stack of its own, ...).
unsafe fn raw6(nr: libc::c_long, a: [usize; 6]) -> Result<usize, Errno> {
    let ret: isize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a plain system call; the caller passes arguments valid for `nr` (see above).
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack)
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a plain system call; the caller passes arguments valid for `nr`.
    unsafe {
        std::arch::asm!(
            "svc 0",
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
            in("x8") nr,
            options(nostack)
        );
    }
    if (-4095..0).contains(&ret) {
        Err(Errno::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

pub const CLOSE_RANGE_CLOEXEC: u32 = libc::CLOSE_RANGE_CLOEXEC;

/// Child-safe: close(2), errors ignored.
///
/// # Safety
/// Nothing else owns `fd` and uses it afterwards (an `OwnedFd` of this fd table would close
/// or use another file that gets the number).
pub unsafe fn close(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: the caller may dispose of `fd`; no pointer argument.
        let _ = unsafe { raw6(libc::SYS_close, [fd as usize, 0, 0, 0, 0, 0]) };
    }
}

/// Child-safe: close_range(2).
///
/// # Safety
/// As for [`close`], for every fd in `first..=last` (unless `flags` is
/// [`CLOSE_RANGE_CLOEXEC`], which only marks them).
pub unsafe fn close_range(first: u32, last: u32, flags: u32) -> Result<(), Errno> {
    // SAFETY: as the caller promises; no pointer argument.
    unsafe { raw6(libc::SYS_close_range, [first as usize, last as usize, flags as usize, 0, 0, 0]) }.map(drop)
}

pub const MOUNT_ATTR_RDONLY: u64 = linux_raw_sys::general::MOUNT_ATTR_RDONLY as u64;
pub const MOUNT_ATTR_NOSUID: u64 = linux_raw_sys::general::MOUNT_ATTR_NOSUID as u64;
pub const MOUNT_ATTR_NODEV: u64 = linux_raw_sys::general::MOUNT_ATTR_NODEV as u64;
pub const MOUNT_ATTR_NOEXEC: u64 = linux_raw_sys::general::MOUNT_ATTR_NOEXEC as u64;
pub const MOUNT_ATTR_IDMAP: u64 = linux_raw_sys::general::MOUNT_ATTR_IDMAP as u64;

/// Child-safe: mount_setattr(2) on `dirfd`+`path`, optionally on the whole subtree.
pub fn mount_setattr(dirfd: RawFd, path: &CStr, set: u64, recursive: bool) -> Result<(), Errno> {
    mount_setattr_raw(dirfd, path, set, recursive, 0, 0)
}

/// mount_setattr(2) on a detached clone `fd` of a host tree: `set`, idmapped through
/// `userns` when given (MOUNT_ATTR_IDMAP: the caller privileged over its filesystem), and
/// private. A clone joins its source's peer group: on a host whose `/` is shared (systemd
/// makes it so), a sandbox that may mount would otherwise have its mounts on the clone
/// appear on the host, and outlive the sandbox.
pub fn mount_setattr_detached(fd: RawFd, set: u64, recursive: bool, userns: Option<RawFd>) -> Result<(), Errno> {
    let private = libc::MS_PRIVATE;
    match userns {
        Some(ns) => mount_setattr_raw(fd, c"", set | MOUNT_ATTR_IDMAP, recursive, private, ns as u64),
        None => mount_setattr_raw(fd, c"", set, recursive, private, 0),
    }
}

fn mount_setattr_raw(
    dirfd: RawFd,
    path: &CStr,
    set: u64,
    recursive: bool,
    propagation: u64,
    userns_fd: u64,
) -> Result<(), Errno> {
    let attr = mount_attr { attr_set: set, attr_clr: 0, propagation, userns_fd };
    let mut flags = libc::AT_EMPTY_PATH as usize;
    if recursive {
        flags |= libc::AT_RECURSIVE as usize;
    }
    // SAFETY: mount_setattr reads the NUL-terminated `path` and one mount_attr of the size
    // given, both live for the call; it closes no fd.
    unsafe {
        raw6(
            libc::SYS_mount_setattr,
            [
                dirfd as usize,
                path.as_ptr() as usize,
                flags,
                &attr as *const mount_attr as usize,
                std::mem::size_of::<mount_attr>(),
                0,
            ],
        )
    }
    .map(drop)
}

/// Child-safe: close every fd except those in `keep` (sorted ascending, no duplicates).
///
/// # Safety
/// As for [`close`], for every fd not in `keep` (the child's copy of the parent's table:
/// nothing in the child owns those).
pub unsafe fn close_all_except(keep: &[RawFd]) -> Result<(), Errno> {
    let mut next: u32 = 0;
    for &fd in keep {
        let fd = fd as u32;
        if fd > next {
            // SAFETY: not in `keep`, as the caller promises for those.
            unsafe { close_range(next, fd - 1, 0) }?;
        }
        next = fd + 1;
    }
    // SAFETY: as above.
    unsafe { close_range(next, u32::MAX, 0) }
}

/// Give the calling thread an fd table of its own (unshare(CLONE_FILES)) holding only
/// `keep`: the rest of its copy is closed. Other threads keep the shared table.
///
/// # Safety
/// The calling thread never again uses an fd of the shared table other than `keep` (its
/// numbers now name other files or none), and nothing it owns holds one.
pub unsafe fn private_fd_table(keep: RawFd) -> Result<(), Errno> {
    // SAFETY: an integer argument; the caller promises what the new table changes.
    unsafe { raw6(libc::SYS_unshare, [libc::CLONE_FILES as usize, 0, 0, 0, 0, 0]) }?;
    // SAFETY: copies in the thread's own table: the shared table keeps its references.
    unsafe { close_all_except(&[keep]) }
}

/// The mount namespace of the process `pidfd` refers to, as a new nsfs fd
/// (PIDFD_GET_MNT_NAMESPACE, Linux 6.11; `/proc/PID/ns/mnt` before).
pub fn pidfd_mnt_namespace(pidfd: std::os::fd::BorrowedFd<'_>, pid: i32) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // _IO(PIDFS_IOCTL_MAGIC, 3)
    const PIDFD_GET_MNT_NAMESPACE: usize = 0xFF03;
    // SAFETY: an ioctl with no pointer argument; on success it returns a new fd, ours.
    match unsafe { raw6(libc::SYS_ioctl, [pidfd.as_raw_fd() as usize, PIDFD_GET_MNT_NAMESPACE, 0, 0, 0, 0]) } {
        // SAFETY: a fresh fd that nothing else owns.
        Ok(fd) => Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(Errno::NOTTY | Errno::INVAL) => {
            let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC;
            rustix::fs::open(format!("/proc/{pid}/ns/mnt"), flags, rustix::fs::Mode::empty())
        }
        Err(e) => Err(e),
    }
}

/// Child-safe: setrlimit(resource, {value, value}) (prlimit64 on ourselves).
pub fn rlimit_set(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), Errno> {
    rlimit_set_pair(resource, value, value)
}

/// Child-safe: setrlimit(resource, {soft, hard}) (prlimit64 on ourselves).
pub fn rlimit_set_pair(resource: u32, soft: u64, hard: u64) -> Result<(), Errno> {
    let lim: [u64; 2] = [soft, hard];
    // SAFETY: prlimit64 reads one struct rlimit64 (two u64, live on our stack), writes
    // nothing (old NULL).
    unsafe { raw6(libc::SYS_prlimit64, [0, resource as usize, &lim as *const [u64; 2] as usize, 0, 0, 0]) }.map(drop)
}

/// Child-safe: seccomp(SECCOMP_SET_MODE_FILTER, 0, prog) (the kernel copies the program).
///
/// # Safety
/// `prog` points to a live `struct sock_fprog` whose `filter` points to `len` live
/// `struct sock_filter`s.
pub unsafe fn seccomp_set_mode_filter(prog: *const c_void) -> Result<(), Errno> {
    // SAFETY: as the caller promises; the call only reads them.
    unsafe { raw6(libc::SYS_seccomp, [libc::SECCOMP_SET_MODE_FILTER as usize, 0, prog as usize, 0, 0, 0]) }.map(drop)
}

/// Child-safe: setgroups(0, NULL).
pub fn clear_supplementary_groups() -> Result<(), Errno> {
    // SAFETY: no pointer is read (size 0, NULL list).
    unsafe { raw6(libc::SYS_setgroups, [0, 0, 0, 0, 0, 0]) }.map(drop)
}

/// Child-safe prctl(2) with integer arguments only, one safe function per option used.
fn prctl_int(option: libc::c_int, a2: usize, a3: usize) -> Result<usize, Errno> {
    // SAFETY: only called with options whose arguments are integers, not addresses.
    unsafe { raw6(libc::SYS_prctl, [option as usize, a2, a3, 0, 0, 0]) }
}

/// Child-safe: PR_SET_PDEATHSIG to SIGKILL (a change of ids clears it: re-arm after).
pub fn set_death_signal_kill() -> Result<(), Errno> {
    prctl_int(libc::PR_SET_PDEATHSIG, libc::SIGKILL as usize, 0).map(drop)
}

/// Child-safe: PR_CAPBSET_DROP `cap` from the bounding set.
pub fn capbset_drop(cap: u32) -> Result<(), Errno> {
    prctl_int(libc::PR_CAPBSET_DROP, cap as usize, 0).map(drop)
}

/// Child-safe: clear the ambient capability set.
pub fn clear_ambient_capabilities() -> Result<(), Errno> {
    prctl_int(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as usize, 0).map(drop)
}

/// Child-safe: PR_SET_KEEPCAPS (the permitted set survives a switch to a non-root uid).
pub fn set_keep_caps() -> Result<(), Errno> {
    prctl_int(libc::PR_SET_KEEPCAPS, 1, 0).map(drop)
}

/// Child-safe: raise `cap` into the ambient set (it must be permitted and inheritable).
pub fn raise_ambient_capability(cap: u32) -> Result<(), Errno> {
    prctl_int(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as usize, cap as usize).map(drop)
}

/// Child-safe: PR_SET_NO_NEW_PRIVS.
pub fn set_no_new_privs() -> Result<(), Errno> {
    prctl_int(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map(drop)
}

/// Child-safe: bring `lo` of the current network namespace up.
pub fn loopback_up() -> Result<(), Errno> {
    // SAFETY: integer arguments; the new fd is ours (closed below).
    let sock = unsafe {
        raw6(libc::SYS_socket, [libc::AF_INET as usize, (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as usize, 0, 0, 0, 0])
    }?;
    // struct ifreq: 16 bytes of name, then a union whose first member here is ifr_flags.
    let mut ifr = [0u8; 40];
    ifr[..2].copy_from_slice(b"lo");
    let up = (libc::IFF_UP | libc::IFF_RUNNING) as u16;
    ifr[16..18].copy_from_slice(&up.to_ne_bytes());
    // SAFETY: SIOCSIFFLAGS reads a struct ifreq (40 bytes, live on our stack).
    let ret = unsafe { raw6(libc::SYS_ioctl, [sock, libc::SIOCSIFFLAGS as usize, ifr.as_mut_ptr() as usize, 0, 0, 0]) };
    // SAFETY: `sock` is the socket made above, used by nothing else.
    let _ = unsafe { raw6(libc::SYS_close, [sock, 0, 0, 0, 0, 0]) };
    ret.map(drop)
}

/// wait4(2) with resource usage, non-blocking. `Ok(None)` while the child still runs.
pub fn wait4_nohang(pid: i32) -> io::Result<Option<(c_int, libc::rusage)>> {
    let mut status: c_int = 0;
    // SAFETY: rusage is plain data written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid out-pointers for the duration of the call.
        let ret = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG | libc::__WALL, &mut usage) };
        if ret == pid {
            return Ok(Some((status, usage)));
        }
        if ret == 0 {
            return Ok(None);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// waitid(P_PIDFD) with resource usage, non-blocking: reaps exactly the process `pidfd`
/// refers to (never one that reused its pid). `Ok(None)` while it still runs. Returns the
/// status in wait(2)'s encoding.
pub fn waitid_pidfd_nohang(pidfd: std::os::fd::BorrowedFd<'_>) -> io::Result<Option<(c_int, libc::rusage)>> {
    use std::os::fd::AsRawFd;
    const P_PIDFD: usize = 3;
    // SAFETY: siginfo_t and rusage are plain data written by the kernel.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let flags = (libc::WEXITED | libc::WNOHANG | libc::__WALL) as usize;
        let args = [
            P_PIDFD,
            pidfd.as_raw_fd() as usize,
            &mut info as *mut libc::siginfo_t as usize,
            flags,
            &mut usage as *mut libc::rusage as usize,
            0,
        ];
        // SAFETY: waitid writes one siginfo_t and one rusage, both live on our stack.
        match unsafe { raw6(libc::SYS_waitid, args) } {
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // SAFETY: the kernel filled a SIGCHLD siginfo (or left it zeroed: nothing exited yet).
    let (pid, code, value) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    let status = match code {
        libc::CLD_EXITED => (value & 0xff) << 8,
        libc::CLD_DUMPED => (value & 0x7f) | 0x80,
        _ => value & 0x7f, // CLD_KILLED
    };
    Ok(Some((status, usage)))
}

/// Child-safe: exit immediately (no atexit handlers, no stdio flush).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: no pointer; the process ends (nothing of it relies on anything after).
    let _ = unsafe { raw6(libc::SYS_exit_group, [code as usize, 0, 0, 0, 0, 0]) };
    // exit_group does not return; satisfy the type system without unwinding.
    loop {
        std::hint::spin_loop();
    }
}

/// Child-safe: execve; only returns on failure.
///
/// # Safety
/// `argv` and `envp` must be NULL-terminated arrays of valid C strings.
pub unsafe fn execve(path: &CStr, argv: *const *const u8, envp: *const *const u8) -> Errno {
    // SAFETY: `path` is a C string; the caller promises argv/envp.
    match unsafe { raw6(libc::SYS_execve, [path.as_ptr() as usize, argv as usize, envp as usize, 0, 0, 0]) } {
        Ok(_) => Errno::INVAL,
        Err(e) => e,
    }
}

/// Child-safe: execveat(fd, "", argv, envp, AT_EMPTY_PATH); only returns on failure.
///
/// # Safety
/// As for [`execve`].
pub unsafe fn execve_fd(fd: RawFd, argv: *const *const u8, envp: *const *const u8) -> Errno {
    // SAFETY: "" is a C string; the caller promises argv/envp.
    match unsafe {
        raw6(
            libc::SYS_execveat,
            [fd as usize, c"".as_ptr() as usize, argv as usize, envp as usize, libc::AT_EMPTY_PATH as usize, 0],
        )
    } {
        Ok(_) => Errno::INVAL,
        Err(e) => e,
    }
}

/// A memfd holding `data`, sealed against any change (CLOEXEC; `exec`: also MFD_EXEC where
/// the kernel has it, for execveat).
pub fn sealed_memfd(name: &CStr, data: &[u8], exec: bool) -> Result<std::os::fd::OwnedFd, Errno> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    let fd = match exec {
        true => {
            rustix::fs::memfd_create(name, flags | MemfdFlags::EXEC).or_else(|_| rustix::fs::memfd_create(name, flags))
        }
        false => rustix::fs::memfd_create(name, flags),
    }?;
    let mut rest = data;
    while !rest.is_empty() {
        let n = rustix::io::write(&fd, rest)?;
        rest = &rest[n..];
    }
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE)?;
    Ok(fd)
}

/// Borrow a raw fd.
///
/// # Safety
/// `fd` is open, and stays open (nothing closes it) for as long as the result is used.
pub unsafe fn borrow_fd<'a>(fd: RawFd) -> std::os::fd::BorrowedFd<'a> {
    // SAFETY: as the caller promises.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// Child-safe: dup2(2) (dup3 with no flags: the result is not close-on-exec).
///
/// # Safety
/// As for [`close`], for `new` (dup2 closes what was there).
pub unsafe fn dup2(old: RawFd, new: RawFd) -> Result<(), Errno> {
    // SAFETY: the caller may dispose of `new`; no pointer argument.
    unsafe { raw6(libc::SYS_dup3, [old as usize, new as usize, 0, 0, 0, 0]) }.map(drop)
}

/// Child-safe: F_DUPFD_CLOEXEC at or above `min`; the new fd is the caller's.
pub fn dup_above(fd: RawFd, min: RawFd) -> Result<RawFd, Errno> {
    // SAFETY: integer arguments; the call makes a new fd and closes none.
    unsafe { raw6(libc::SYS_fcntl, [fd as usize, libc::F_DUPFD_CLOEXEC as usize, min as usize, 0, 0, 0]) }
        .map(|r| r as RawFd)
}

/// Child-safe: set or clear FD_CLOEXEC.
pub fn set_cloexec(fd: RawFd, on: bool) -> Result<(), Errno> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: integer arguments; the flag changes no fd's file (an fd that would close at an
    // exec it was needed for is an error of the exec, not memory or I/O unsafety).
    unsafe { raw6(libc::SYS_fcntl, [fd as usize, libc::F_SETFD as usize, flags as usize, 0, 0, 0]) }.map(drop)
}

/// Child-safe: set effective, permitted and inheritable capabilities to `keep` (a mask of
/// capability numbers); fails with EPERM if `keep` holds one the process lacks.
pub fn capset(keep: u64) -> Result<(), Errno> {
    let hdr = CapHeader { version: crate::abi::CAP_VERSION_3, pid: 0 };
    let lo = keep as u32;
    let hi = (keep >> 32) as u32;
    let data = [
        CapData { effective: lo, permitted: lo, inheritable: lo },
        CapData { effective: hi, permitted: hi, inheritable: hi },
    ];
    // SAFETY: capset reads a header and two data structs (live on our stack, crate::abi's
    // layouts, checked against linux-raw-sys in a test).
    unsafe { raw6(libc::SYS_capset, [&hdr as *const CapHeader as usize, data.as_ptr() as usize, 0, 0, 0, 0]) }.map(drop)
}

/// The calling thread's capability sets, as capget(2) gives them.
fn capget_all() -> Result<[CapData; 2], Errno> {
    let hdr = CapHeader { version: crate::abi::CAP_VERSION_3, pid: 0 };
    let mut data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capget reads the header and writes two data structs (live on our stack).
    unsafe { raw6(libc::SYS_capget, [&hdr as *const CapHeader as usize, data.as_mut_ptr() as usize, 0, 0, 0, 0]) }?;
    Ok(data)
}

/// Set the calling thread's capability sets to `data` (from [`capget_all`]).
fn capset_all(data: &[CapData; 2]) -> Result<(), Errno> {
    let hdr = CapHeader { version: crate::abi::CAP_VERSION_3, pid: 0 };
    // SAFETY: capset reads a header and two data structs (live for the call).
    unsafe { raw6(libc::SYS_capset, [&hdr as *const CapHeader as usize, data.as_ptr() as usize, 0, 0, 0, 0]) }.map(drop)
}

/// Child-safe: the capability masks (effective) of the calling process.
pub fn capget_permitted() -> Result<u64, Errno> {
    let hdr = CapHeader { version: crate::abi::CAP_VERSION_3, pid: 0 };
    let mut data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capget reads the header and writes two data structs (live on our stack).
    unsafe { raw6(libc::SYS_capget, [&hdr as *const CapHeader as usize, data.as_mut_ptr() as usize, 0, 0, 0, 0]) }?;
    Ok(u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32))
}

/// The calling thread's filesystem ids set to (`uid`, `gid`) until the guard drops (then
/// back to the previous ones): the kernel creates a file only with an fsuid the
/// filesystem's user namespace maps (EOVERFLOW otherwise). Per thread: setfsuid(2) is not
/// a process-wide change (no other thread of ours is affected).
pub struct FsIds {
    uid: u32,
    gid: u32,
    /// A change of fs ids clears the thread's parent-death signal and the process's
    /// dumpable attribute (these fields, last: dropped after the ids are back).
    _pdeathsig: KeepDeathSignal,
    _dumpable: KeepDumpable,
}

impl FsIds {
    pub fn set(uid: u32, gid: u32) -> FsIds {
        let dumpable = KeepDumpable::new();
        let pdeathsig = KeepDeathSignal::new();
        // SAFETY: integer arguments; setfs[ug]id returns the previous id, never fails hard.
        let gid0 = unsafe { libc::syscall(libc::SYS_setfsgid, gid as usize) } as u32;
        // SAFETY: as above.
        let uid0 = unsafe { libc::syscall(libc::SYS_setfsuid, uid as usize) } as u32;
        FsIds { uid: uid0, gid: gid0, _pdeathsig: pdeathsig, _dumpable: dumpable }
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        // SAFETY: integer arguments.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, self.uid as usize);
            libc::syscall(libc::SYS_setfsgid, self.gid as usize);
        }
    }
}

/// Child-safe: setresuid/setresgid for the calling thread (the child is single-threaded).
pub fn setresuid(id: u32) -> Result<(), Errno> {
    // SAFETY: integer arguments (raw: glibc's wrapper would signal every thread of ours).
    unsafe { raw6(libc::SYS_setresuid, [id as usize, id as usize, id as usize, 0, 0, 0]) }.map(drop)
}

pub fn setresgid(id: u32) -> Result<(), Errno> {
    // SAFETY: as above.
    unsafe { raw6(libc::SYS_setresgid, [id as usize, id as usize, id as usize, 0, 0, 0]) }.map(drop)
}

/// Child-safe: setns(2) (with a pidfd, several namespace types at once).
pub fn setns(fd: RawFd, nstype: u64) -> Result<(), Errno> {
    // SAFETY: integer arguments; setns closes no fd and maps no memory.
    unsafe { raw6(libc::SYS_setns, [fd as usize, nstype as usize, 0, 0, 0, 0]) }.map(drop)
}

/// Child-safe: unshare(2). Not CLONE_VM/CLONE_FILES-style flags that would change what the
/// caller shares: those need [`raw6`]'s care, and nsfast passes only CLONE_NEW* flags.
pub fn unshare(flags: u64) -> Result<(), Errno> {
    const NS_ONLY: u64 = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWTIME) as u64;
    if flags & !NS_ONLY != 0 {
        return Err(Errno::INVAL);
    }
    // SAFETY: namespace flags only (checked): no memory or fd table is unshared or changed.
    unsafe { raw6(libc::SYS_unshare, [flags as usize, 0, 0, 0, 0, 0]) }.map(drop)
}

/// Which process a piece of process-wide state (a service thread's, with its locks) is of:
/// the first to `claim` it. A forked child sees another pid and must not touch that state,
/// whose thread the fork did not copy and whose locks may have been held at the fork.
#[derive(Default)]
pub struct ProcessOwner(std::sync::atomic::AtomicU32);

impl ProcessOwner {
    pub const fn new() -> ProcessOwner {
        ProcessOwner(std::sync::atomic::AtomicU32::new(0))
    }

    /// Whether the state is this process's, making it so if no process claimed it yet.
    pub fn claim(&self) -> bool {
        use std::sync::atomic::Ordering;
        let me = std::process::id();
        match self.0.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(owner) => owner == me,
        }
    }

    /// Whether this process claimed it (false also when nobody did yet).
    pub fn is_mine(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire) == std::process::id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};
    use linux_raw_sys::general as k;

    #[test]
    fn abi_structs_match_linux_raw_sys() {
        // crate::abi is shared with nsfast-init, which has no dependencies.
        assert_eq!(size_of::<CapHeader>(), size_of::<k::__user_cap_header_struct>());
        assert_eq!(offset_of!(CapHeader, pid), offset_of!(k::__user_cap_header_struct, pid));
        assert_eq!(size_of::<CapData>(), size_of::<k::__user_cap_data_struct>());
        assert_eq!(offset_of!(CapData, permitted), offset_of!(k::__user_cap_data_struct, permitted));
        assert_eq!(offset_of!(CapData, inheritable), offset_of!(k::__user_cap_data_struct, inheritable));
        assert_eq!(crate::abi::CAP_VERSION_3, k::_LINUX_CAPABILITY_VERSION_3);
        assert_eq!(size_of::<CloneArgs>(), size_of::<k::clone_args>());
        assert_eq!(offset_of!(CloneArgs, cgroup), offset_of!(k::clone_args, cgroup));
        assert_eq!(offset_of!(CloneArgs, stack), offset_of!(k::clone_args, stack));
        assert_eq!(offset_of!(CloneArgs, pidfd), offset_of!(k::clone_args, pidfd));
        assert_eq!(offset_of!(CloneArgs, exit_signal), offset_of!(k::clone_args, exit_signal));
        assert_eq!(size_of::<kernel_sigset_t>(), 8);
    }

    #[test]
    fn unshare_refuses_flags_that_are_not_namespaces() {
        assert_eq!(unshare(libc::CLONE_FILES as u64), Err(Errno::INVAL));
        assert_eq!(unshare(libc::CLONE_VM as u64 | libc::CLONE_NEWUTS as u64), Err(Errno::INVAL));
    }
}
