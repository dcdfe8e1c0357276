//! nsfast's default seccomp filter, modelled on Docker's default profile
//! (moby/profiles `seccomp/default.json`), compiled in the parent by libseccomp and installed
//! by the child as its last step before execve.
//!
//! The filter is one classic-BPF program. nsfast decides a `Verdict` per system call; libseccomp
//! (linked statically, see `.cargo/config.toml`) compiles them with its binary-tree layout
//! (`SCMP_FLTATR_CTL_OPTIMIZE` = 2): after the architecture checks, a binary search over the
//! syscall number leads to each call's own rules, so no call walks the whole list.
//! - **Allow**: the calls of [`default_allowed`], some only with the argument conditions below.
//! - **ENOSYS**: `clone3` and `openat2`, so glibc and other callers fall back to
//!   `clone`/`openat`, whose flags and mode the filter can check; those of `clone3`/`openat2`
//!   live in a struct that BPF cannot read. Also Linux AIO (`io_setup`...), whose contexts
//!   are a host-wide count no cgroup bounds (see [`ENOSYS`]).
//! - **EPERM**: anything else (libseccomp's default action), `nr == -1` included (a tracer
//!   skipping a call; ptrace runs before seccomp).
//! - **Kill**: a foreign architecture (i386 `int 0x80` on x86_64, aarch32 on aarch64) and, on
//!   x86_64, x32 calls (x86_64 audit arch, `nr | 0x40000000`): libseccomp's bad-arch action,
//!   which it also applies to x32 calls when the filter holds no x32 architecture.
//!
//! Argument conditions. Values the kernel reads as `int`/`unsigned int`/`umode_t` are
//! compared on their low 32 bits only (a `cmd | 1 << 32` must not slip past a 64-bit compare),
//! so every condition is a libseccomp masked compare `(arg & mask) == value` with a 32-bit
//! mask (`Masked`); libseccomp has no masked "not equal", so "neither TIOCSTI nor TIOCLINUX"
//! becomes alternatives (`low32_neither`):
//! - `clone`, `unshare`: no `CLONE_NEW*` flag (masked compare on the flags, argument 0 on
//!   x86_64 and aarch64; s390 would be argument 1). A kept CAP_SYS_ADMIN permits every
//!   namespace but a new user namespace: nested user namespaces need no capability at all
//!   and are the main kernel attack surface this closes. `clone3` stays ENOSYS even then.
//! - `ioctl`: not TIOCSTI (type into the terminal) nor TIOCLINUX.
//! - `socket`: not AF_ALG nor AF_VSOCK (as Docker).
//! - `personality`: only the values Docker allows (PER_LINUX 0, PER_LINUX32 0x8, UNAME26
//!   0x20000, PER_LINUX32|UNAME26, and 0xffffffff: query).
//! - `chmod`, `fchmod`, `fchmodat`, `fchmodat2`, `open`, `openat`, `creat`, `mknod`, `mknodat`:
//!   no S_ISUID/S_ISGID in the mode argument, so the sandbox cannot leave setuid/setgid files
//!   behind (an open without O_CREAT passes mode 0).
//!
//! Differences from Docker's list: `adjtimex`/`clock_adjtime` need CAP_SYS_TIME,
//! `name_to_handle_at` needs CAP_DAC_READ_SEARCH, `openat2` is ENOSYS, `ptrace` and
//! `process_vm_readv`/`writev` are allowed (Docker allows them on kernels >= 4.8).
//!
//! A kept capability allows the calls it grants ([`CAP_SYSCALLS`], as in Docker);
//! [`Policy::allow`] adds calls without any argument condition and [`Policy::deny`] removes
//! them again (deny wins).
//!
//! Cost (x86_64, 6.18; `cargo test --release seccomp::tests::measure -- --ignored`): the
//! default program has 653 instructions, of which any call runs 15-20 (ioctl: ~90, its 35
//! compares). Installing it takes ~90 us: the kernel JITs it and runs it once per syscall
//! number for its action cache (seccompiler's linear chain of 1593 took ~690 us). A call
//! allowed by number alone is answered from that cache (+8 ns for getppid); argument-checked
//! and denied calls run the program: +25 ns for ioctl and personality, +45 ns for openat, no
//! measurable cost for a denied call. Building takes ~1.9 ms (libseccomp): callers cache the
//! `Filter`.

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::sync::{Mutex, OnceLock};

use libseccomp::error::SeccompError;
use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext};
use rustix::io::Errno;
use rustix::thread::CapabilitySet;

use crate::error::{Error, Result};

/// What a sandbox may call besides the default list.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy<'a> {
    /// Syscall names to allow in addition to the default allow list (without any argument
    /// condition: allowing `ioctl` also allows TIOCSTI).
    pub allow: &'a [String],
    /// Syscall names to deny (EPERM) even if the default list or `allow` allows them.
    pub deny: &'a [String],
    /// Bit n set = capability n is kept by the sandbox; see [`CAP_SYSCALLS`].
    pub keep_caps: u64,
    /// socket(2) only for AF_UNIX: no IP, packet or netlink socket at all.
    pub unix_only: bool,
}

/// Prepared BPF programs, in the order they must be installed (nsfast's own filter is one
/// program). Built in the parent, read-only after (the child only reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    programs: Vec<Vec<SockFilter>>,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Filter>();
};

/// `struct sock_filter` of `<linux/filter.h>`: one classic-BPF instruction.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// The kernel's limit on a program's length (`BPF_MAXINSNS`).
const MAX_INSNS: usize = 4096;

impl Filter {
    /// Compile the filter for `policy`. Fails on a name not in [`known_syscalls`].
    pub fn build(policy: &Policy) -> Result<Filter> {
        let program = compile(&verdicts(policy)?, ScmpAction::Errno(libc::EPERM))?;
        Ok(Filter { programs: vec![program] })
    }

    /// Child-safe (no allocation, no locks, no panics; raw system calls only): install every
    /// program with seccomp(SECCOMP_SET_MODE_FILTER, 0, &sock_fprog). The caller has set
    /// no_new_privs first.
    pub fn install(&self) -> Result<(), Errno> {
        for program in &self.programs {
            // Fits: `export` refuses programs longer than MAX_INSNS (4096).
            let prog = SockFprog { len: program.len() as u16, filter: program.as_ptr() };
            set_mode_filter(&prog)?;
        }
        Ok(())
    }

    /// The programs serialised for another process (a static helper binary that loads them
    /// itself): u32 little-endian program count, then per program a u32 LE instruction count
    /// followed by the instructions as `struct sock_filter { u16 code; u8 jt; u8 jf; u32 k }`
    /// in native layout (8 bytes each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let insns: usize = self.programs.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(4 + 4 * self.programs.len() + 8 * insns);
        out.extend_from_slice(&(self.programs.len() as u32).to_le_bytes());
        for program in &self.programs {
            out.extend_from_slice(&(program.len() as u32).to_le_bytes());
            for insn in program {
                out.extend_from_slice(&insn.code.to_ne_bytes());
                out.push(insn.jt);
                out.push(insn.jf);
                out.extend_from_slice(&insn.k.to_ne_bytes());
            }
        }
        out
    }
}

/// The names nsfast knows for this architecture, sorted (for error messages and the Python
/// side's validation).
pub fn known_syscalls() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| table().iter().map(|&(name, _)| name).collect())
}

/// The names allowed by default, sorted; the argument-checked ones (`clone`, `ioctl`, ...)
/// are included although only some of their arguments are allowed.
pub fn default_allowed() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut names: Vec<&'static str> = DEFAULT_COMMON.iter().chain(DEFAULT_ARCH).copied().collect();
        names.extend(CONDITIONAL.iter().copied());
        names.sort_unstable();
        names
    })
}

/// `struct sock_fprog` of `<linux/filter.h>`.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

/// Child-safe: seccomp(SECCOMP_SET_MODE_FILTER, 0, prog).
fn set_mode_filter(prog: &SockFprog) -> Result<(), Errno> {
    // SAFETY: `prog` is a live sock_fprog whose `filter` points to `len` instructions.
    unsafe { crate::sys::seccomp_set_mode_filter(prog as *const SockFprog as *const std::ffi::c_void) }
}

/// What the filter answers for one system call; a call without a verdict fails with EPERM.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Allow,
    /// Allowed when any of these compares holds, EPERM otherwise.
    AllowIf(Vec<Masked>),
    /// Fails with this errno.
    Errno(i32),
}

/// `(args[arg] & mask) == value` on the argument's low 32 bits: the one comparison the
/// rules need (libseccomp's SCMP_CMP_MASKED_EQ with a 32-bit mask, which it compiles to a
/// compare of the low word only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Masked {
    arg: u32,
    mask: u32,
    value: u32,
}

impl Masked {
    fn compare(self) -> ScmpArgCompare {
        ScmpArgCompare::new(self.arg, ScmpCompareOp::MaskedEqual(self.mask.into()), self.value.into())
    }
}

/// The verdict of each system call that does not fail with EPERM, by number.
fn verdicts(policy: &Policy) -> Result<BTreeMap<i64, Verdict>> {
    let allow = numbers(policy.allow)?;
    let deny = numbers(policy.deny)?;
    let mut verdicts = BTreeMap::new();
    for name in DEFAULT_COMMON.iter().chain(DEFAULT_ARCH) {
        verdicts.insert(number(name)?, Verdict::Allow);
    }
    for (name, alternatives) in conditional_rules(policy.keep_caps, policy.unix_only) {
        verdicts.insert(number(name)?, Verdict::AllowIf(alternatives));
    }
    for (cap, names) in CAP_SYSCALLS {
        if policy.keep_caps & cap.bits() != 0 {
            for name in *names {
                verdicts.insert(number(name)?, Verdict::Allow);
            }
        }
    }
    for &nr in &allow {
        verdicts.insert(nr, Verdict::Allow);
    }
    for name in ENOSYS {
        let nr = number(name)?;
        if !allow.contains(&nr) {
            verdicts.insert(nr, Verdict::Errno(libc::ENOSYS));
        }
    }
    for nr in &deny {
        verdicts.remove(nr);
    }
    Ok(verdicts)
}

/// One program for `verdicts`, `default` for every other call, killing foreign and x32 calls.
fn compile(verdicts: &BTreeMap<i64, Verdict>, default: ScmpAction) -> Result<Vec<SockFilter>> {
    // libseccomp keeps process-wide state (the kernel's API level, probed on first use)
    // without a lock of its own.
    static LIBSECCOMP: Mutex<()> = Mutex::new(());
    let _guard = LIBSECCOMP.lock().unwrap_or_else(|p| p.into_inner());
    // Holds the native architecture only: i386, x32 (on x86_64) and aarch32 (on aarch64)
    // calls meet the bad-arch action.
    let mut ctx = ScmpFilterContext::new(default).map_err(libseccomp)?;
    ctx.set_act_badarch(ScmpAction::KillProcess).and_then(|ctx| ctx.set_ctl_optimize(2)).map_err(libseccomp)?;
    for (&nr, verdict) in verdicts {
        let nr = i32::try_from(nr).map_err(|_| Error::invalid("seccomp", format!("nr {nr}")))?;
        match verdict {
            Verdict::Allow => ctx.add_rule_exact(ScmpAction::Allow, nr),
            Verdict::Errno(e) => ctx.add_rule_exact(ScmpAction::Errno(*e), nr),
            Verdict::AllowIf(alternatives) => alternatives
                .iter()
                .try_fold(&mut ctx, |ctx, m| ctx.add_rule_conditional_exact(ScmpAction::Allow, nr, &[m.compare()])),
        }
        .map_err(libseccomp)?;
    }
    export(&ctx)
}

/// The program libseccomp generates for `ctx`, read back through a memfd (libseccomp 2.5
/// exports to a file descriptor only).
fn export(ctx: &ScmpFilterContext) -> Result<Vec<SockFilter>> {
    let os = |e: Errno| Error::spawn("export seccomp filter", None, e);
    let io = |e: std::io::Error| os(Errno::from_io_error(&e).unwrap_or(Errno::IO));
    let fd = rustix::fs::memfd_create(c"nsfast-seccomp-bpf", rustix::fs::MemfdFlags::CLOEXEC).map_err(os)?;
    ctx.export_bpf(&fd).map_err(libseccomp)?;
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    file.rewind().and_then(|()| file.read_to_end(&mut bytes)).map_err(io)?;
    let size = std::mem::size_of::<SockFilter>();
    if bytes.is_empty() || bytes.len() % size != 0 || bytes.len() / size > MAX_INSNS {
        return Err(Error::invalid("seccomp", format!("libseccomp exported {} bytes of BPF", bytes.len())));
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|c| SockFilter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

fn libseccomp(e: SeccompError) -> Error {
    Error::invalid("seccomp", format!("libseccomp: {e}"))
}

/// Fail with ENOSYS, which callers take as "not here" and fall back from:
/// - `clone3`, `openat2`: their flags or mode are in a struct BPF cannot read (callers fall
///   back to `clone`/`openat`, whose arguments the filter checks);
/// - Linux AIO (`io_setup` and the calls on its contexts; not POSIX aio, which glibc does
///   with threads): its contexts are counted host-wide against `fs.aio-max-nr` (65536), by
///   no cgroup or namespace, so 16 `io_setup(4096)` for 8 MiB stopped libaio on the host
///   and in every other sandbox (found by an audit). libaio users fall back to threads or
///   plain I/O on ENOSYS; `Seccomp(allow=...)` gives them back.
const ENOSYS: &[&str] =
    &["clone3", "openat2", "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents"];

/// The names of [`conditional_rules`].
const CONDITIONAL: &[&str] = &[
    "clone",
    "unshare",
    "ioctl",
    "socket",
    "personality",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "openat",
    "mknodat",
    #[cfg(target_arch = "x86_64")]
    "chmod",
    #[cfg(target_arch = "x86_64")]
    "open",
    #[cfg(target_arch = "x86_64")]
    "creat",
    #[cfg(target_arch = "x86_64")]
    "mknod",
];

/// Index of the mode argument of the calls that create or chmod a file.
const MODE_ARG: &[(&str, u32)] = &[
    ("fchmod", 1),
    ("fchmodat", 2),
    ("fchmodat2", 2),
    ("openat", 3),
    ("mknodat", 2),
    #[cfg(target_arch = "x86_64")]
    ("chmod", 1),
    #[cfg(target_arch = "x86_64")]
    ("open", 2),
    #[cfg(target_arch = "x86_64")]
    ("creat", 1),
    #[cfg(target_arch = "x86_64")]
    ("mknod", 1),
];

/// The namespace flags `clone` may not carry. CLONE_NEWTIME (0x80) is absent: in clone(2)
/// that bit belongs to the exit signal, and the kernel never reads it as a flag there.
const CLONE_NS_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// The allow-list entries of the calls allowed for some arguments only: each is allowed
/// when any of its compares holds.
fn conditional_rules(keep_caps: u64, unix_only: bool) -> Vec<(&'static str, Vec<Masked>)> {
    let none_of = |arg, mask| vec![Masked { arg, mask, value: 0 }];
    let sys_admin = keep_caps & CapabilitySet::SYS_ADMIN.bits() != 0;
    let newuser = libc::CLONE_NEWUSER as u32;
    let (clone_mask, unshare_mask) =
        if sys_admin { (newuser, newuser) } else { (CLONE_NS_FLAGS, CLONE_NS_FLAGS | libc::CLONE_NEWTIME as u32) };
    // PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32 | UNAME26, and 0xffffffff (query).
    let personalities = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];
    let mut out = vec![
        ("clone", none_of(0, clone_mask)),
        ("unshare", none_of(0, unshare_mask)),
        ("ioctl", low32_neither(1, libc::TIOCSTI as u32, libc::TIOCLINUX as u32)),
        if unix_only {
            ("socket", vec![Masked { arg: 0, mask: u32::MAX, value: libc::AF_UNIX as u32 }])
        } else {
            ("socket", low32_neither(0, libc::AF_ALG as u32, libc::AF_VSOCK as u32))
        },
        ("personality", personalities.iter().map(|&value| Masked { arg: 0, mask: u32::MAX, value }).collect()),
    ];
    if unix_only {
        // socketpair(2) makes sockets of families that support it (AF_TIPC does) too.
        out.push(("socketpair", vec![Masked { arg: 0, mask: u32::MAX, value: libc::AF_UNIX as u32 }]));
    }
    let setid = libc::S_ISUID | libc::S_ISGID;
    for &(name, arg) in MODE_ARG {
        out.push((name, none_of(arg, setid)));
    }
    out
}

/// "The low 32 bits of argument `arg` are neither `a` nor `b`" as masked compares, any of
/// which may hold (libseccomp's only "not equal" compares all 64 bits). A value `x` is
/// neither exactly when
/// - it differs from `a` at a bit where `a` and `b` agree (then it differs from both): one
///   single-bit compare per such bit; or
/// - it agrees with both there and, among the bits where they differ, has `a`'s value at some
///   bit `i` (so it is not `b`) and `b`'s at another bit `j` (so it is not `a`): one two-bit
///   compare per ordered pair `(i, j)`.
///
/// For TIOCSTI/TIOCLINUX and AF_ALG/AF_VSOCK (3 differing bits) that is 29 + 6 compares.
fn low32_neither(arg: u32, a: u32, b: u32) -> Vec<Masked> {
    assert_ne!(a, b);
    let bits = |set: u32| (0..32).map(|i| 1u32 << i).filter(move |bit| set & bit != 0);
    let differ = a ^ b;
    let mut out: Vec<Masked> = bits(!differ).map(|bit| Masked { arg, mask: bit, value: !a & bit }).collect();
    for i in bits(differ) {
        for j in bits(differ).filter(|&j| j != i) {
            out.push(Masked { arg, mask: i | j, value: (a & i) | (b & j) });
        }
    }
    out
}

/// The calls a kept capability allows, beyond the default list (the kernel still checks the
/// capability itself). Docker's mapping, except that CAP_SYS_ADMIN does not imply `bpf`,
/// `perf_event_open` (CAP_BPF, CAP_PERFMON since 5.8) or `clone3`.
pub const CAP_SYSCALLS: &[(CapabilitySet, &[&str])] = &[
    (CapabilitySet::DAC_READ_SEARCH, &["name_to_handle_at", "open_by_handle_at"]),
    (CapabilitySet::SYS_MODULE, &["init_module", "finit_module", "delete_module"]),
    #[cfg(target_arch = "x86_64")]
    (CapabilitySet::SYS_RAWIO, &["iopl", "ioperm"]),
    (CapabilitySet::SYS_CHROOT, &["chroot"]),
    (CapabilitySet::SYS_PTRACE, &["kcmp", "pidfd_getfd", "process_madvise"]),
    (CapabilitySet::SYS_PACCT, &["acct"]),
    (
        CapabilitySet::SYS_ADMIN,
        &[
            "mount",
            "umount2",
            "pivot_root",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "open_tree_attr",
            "mount_setattr",
            "setns",
            "sethostname",
            "setdomainname",
            "quotactl",
            "quotactl_fd",
            "fanotify_init",
            "lookup_dcookie",
            "lsm_get_self_attr",
            "lsm_set_self_attr",
            "lsm_list_modules",
        ],
    ),
    (CapabilitySet::SYS_BOOT, &["reboot"]),
    (CapabilitySet::SYS_NICE, &["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"]),
    (CapabilitySet::SYS_TIME, &["settimeofday", "clock_settime", "clock_adjtime", "adjtimex"]),
    (CapabilitySet::SYS_TTY_CONFIG, &["vhangup"]),
    (CapabilitySet::SYSLOG, &["syslog"]),
    (CapabilitySet::PERFMON, &["perf_event_open"]),
    (CapabilitySet::BPF, &["bpf"]),
];

/// Docker's unconditional allow list, on both architectures (minus the differences listed
/// in the module documentation).
#[rustfmt::skip]
const DEFAULT_COMMON: &[&str] = &[
    "accept", "accept4", "bind", "brk", "cachestat", "capget", "capset", "chdir", "clock_getres",
    "clock_gettime", "clock_nanosleep", "close", "close_range", "connect", "copy_file_range", "dup",
    "dup3", "epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2", "eventfd2", "execve",
    "execveat", "exit", "exit_group", "faccessat", "faccessat2", "fadvise64", "fallocate",
    "fanotify_mark", "fchdir", "fchown", "fchownat", "fcntl", "fdatasync", "fgetxattr",
    "flistxattr", "flock", "fremovexattr", "fsetxattr", "fstat", "fstatfs", "fsync", "ftruncate",
    "futex", "futex_requeue", "futex_wait", "futex_waitv", "futex_wake", "get_robust_list",
    "getcpu", "getcwd", "getdents64", "getegid", "geteuid", "getgid", "getgroups", "getitimer",
    "getpeername", "getpgid", "getpid", "getppid", "getpriority", "getrandom", "getresgid",
    "getresuid", "getrlimit", "getrusage", "getsid", "getsockname", "getsockopt", "gettid",
    "gettimeofday", "getuid", "getxattr", "getxattrat", "inotify_add_watch", "inotify_init1",
    "inotify_rm_watch", "ioprio_get", "ioprio_set", "kill", "landlock_add_rule", "landlock_create_ruleset",
    "landlock_restrict_self", "lgetxattr", "linkat", "listen", "listmount", "listxattr",
    "listxattrat", "llistxattr", "lremovexattr", "lseek", "lsetxattr", "madvise",
    "map_shadow_stack", "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdirat", "mlock",
    "mlock2", "mlockall", "mmap", "mprotect", "mq_getsetattr", "mq_notify", "mq_open",
    "mq_timedreceive", "mq_timedsend", "mq_unlink", "mremap", "mseal", "msgctl", "msgget", "msgrcv",
    "msgsnd", "msync", "munlock", "munlockall", "munmap", "nanosleep", "newfstatat", "pidfd_open",
    "pidfd_send_signal", "pipe2", "pkey_alloc", "pkey_free", "pkey_mprotect", "ppoll", "prctl",
    "pread64", "preadv", "preadv2", "prlimit64", "process_mrelease", "process_vm_readv",
    "process_vm_writev", "pselect6", "ptrace", "pwrite64", "pwritev", "pwritev2", "read",
    "readahead", "readlinkat", "readv", "recvfrom", "recvmmsg", "recvmsg", "remap_file_pages",
    "removexattr", "removexattrat", "renameat", "renameat2", "restart_syscall", "rseq",
    "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn",
    "rt_sigsuspend", "rt_sigtimedwait", "rt_tgsigqueueinfo", "sched_get_priority_max",
    "sched_get_priority_min", "sched_getaffinity", "sched_getattr", "sched_getparam",
    "sched_getscheduler", "sched_rr_get_interval", "sched_setaffinity", "sched_setattr",
    "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp", "semctl", "semget", "semop",
    "semtimedop", "sendfile", "sendmmsg", "sendmsg", "sendto", "set_robust_list", "set_tid_address",
    "setfsgid", "setfsuid", "setgid", "setgroups", "setitimer", "setpgid", "setpriority",
    "setregid", "setresgid", "setresuid", "setreuid", "setrlimit", "setsid", "setsockopt", "setuid",
    "setxattr", "setxattrat", "shmat", "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack",
    "signalfd4", "socketpair", "splice", "statfs", "statmount", "statx", "symlinkat", "sync",
    "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "timer_create", "timer_delete",
    "timer_getoverrun", "timer_gettime", "timer_settime", "timerfd_create", "timerfd_gettime",
    "timerfd_settime", "times", "tkill", "truncate", "umask", "uname", "unlinkat", "utimensat",
    "vmsplice", "wait4", "waitid", "write", "writev",
];

/// The same for the calls only x86_64 has (the legacy path-based ones, arch_prctl, ...).
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
const DEFAULT_ARCH: &[&str] = &[
    "access", "alarm", "arch_prctl", "chown", "dup2", "epoll_create", "epoll_ctl_old", "epoll_wait",
    "epoll_wait_old", "eventfd", "fork", "futimesat", "get_thread_area", "getdents", "getpgrp",
    "inotify_init", "lchown", "link", "lstat", "mkdir", "modify_ldt", "pause", "pipe", "poll",
    "readlink", "rename", "rmdir", "select", "set_thread_area", "signalfd", "stat", "symlink",
    "time", "unlink", "uretprobe", "utime", "utimes", "vfork",
];
#[cfg(target_arch = "aarch64")]
const DEFAULT_ARCH: &[&str] = &[];

/// The number of `name` on this architecture.
fn number(name: &str) -> Result<i64> {
    let table = table();
    match table.binary_search_by(|&(n, _)| n.cmp(name)) {
        Ok(i) => Ok(table[i].1),
        Err(_) => Err(Error::invalid(
            "seccomp",
            format!("unknown system call {name:?} (not in nsfast's table for {})", std::env::consts::ARCH),
        )),
    }
}

fn numbers(names: &[String]) -> Result<Vec<i64>> {
    names.iter().map(|n| number(n)).collect()
}

/// Every `(name, number)` nsfast knows here, sorted by name.
fn table() -> &'static [(&'static str, i64)] {
    static TABLE: OnceLock<Vec<(&'static str, i64)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t: Vec<_> = TABLE_COMMON.iter().chain(TABLE_ARCH).chain(TABLE_NEWER).copied().collect();
        t.sort_unstable();
        t
    })
}

/// `"SYS_read"` / `"__NR_read"` -> `"read"`, at compile time.
const fn strip_prefix(c: &'static str) -> &'static str {
    let bytes = c.as_bytes();
    let skip = if bytes[0] == b'S' { "SYS_".len() } else { "__NR_".len() };
    match std::str::from_utf8(bytes.split_at(skip).1) {
        Ok(name) => name,
        Err(_) => panic!("constant names are ASCII"),
    }
}

/// `(name, number)` pairs from `libc::SYS_*` constants.
macro_rules! libc_numbers {
    ($($c:ident)*) => { &[$((strip_prefix(stringify!($c)), libc::$c as i64)),*] };
}

/// The same from linux-raw-sys, for the calls libc does not name (yet) for this target.
macro_rules! raw_numbers {
    ($($c:ident)*) => { &[$((strip_prefix(stringify!($c)), linux_raw_sys::general::$c as i64)),*] };
}

/// The calls libc names on both x86_64 and aarch64.
const TABLE_COMMON: &[(&str, i64)] = libc_numbers![
    SYS_accept SYS_accept4 SYS_acct SYS_add_key SYS_adjtimex SYS_bind SYS_bpf SYS_brk SYS_capget
    SYS_capset SYS_chdir SYS_chroot SYS_clock_adjtime SYS_clock_getres SYS_clock_gettime
    SYS_clock_nanosleep SYS_clock_settime SYS_clone SYS_clone3 SYS_close SYS_close_range SYS_connect
    SYS_copy_file_range SYS_delete_module SYS_dup SYS_dup3 SYS_epoll_create1 SYS_epoll_ctl
    SYS_epoll_pwait SYS_epoll_pwait2 SYS_eventfd2 SYS_execve SYS_execveat SYS_exit SYS_exit_group
    SYS_faccessat SYS_faccessat2 SYS_fadvise64 SYS_fallocate SYS_fanotify_init SYS_fanotify_mark
    SYS_fchdir SYS_fchmod SYS_fchmodat SYS_fchown SYS_fchownat SYS_fcntl SYS_fdatasync SYS_fgetxattr
    SYS_finit_module SYS_flistxattr SYS_flock SYS_fremovexattr SYS_fsconfig SYS_fsetxattr
    SYS_fsmount SYS_fsopen SYS_fspick SYS_fstat SYS_fstatfs SYS_fsync SYS_ftruncate SYS_futex
    SYS_futex_waitv SYS_get_mempolicy SYS_get_robust_list SYS_getcpu SYS_getcwd SYS_getdents64
    SYS_getegid SYS_geteuid SYS_getgid SYS_getgroups SYS_getitimer SYS_getpeername SYS_getpgid
    SYS_getpid SYS_getppid SYS_getpriority SYS_getrandom SYS_getresgid SYS_getresuid SYS_getrusage
    SYS_getsid SYS_getsockname SYS_getsockopt SYS_gettid SYS_gettimeofday SYS_getuid SYS_getxattr
    SYS_init_module SYS_inotify_add_watch SYS_inotify_init1 SYS_inotify_rm_watch SYS_io_cancel
    SYS_io_destroy SYS_io_getevents SYS_io_setup SYS_io_submit SYS_io_uring_enter
    SYS_io_uring_register SYS_io_uring_setup SYS_ioctl SYS_ioprio_get SYS_ioprio_set SYS_kcmp
    SYS_kexec_file_load SYS_kexec_load SYS_keyctl SYS_kill SYS_landlock_add_rule
    SYS_landlock_create_ruleset SYS_landlock_restrict_self SYS_lgetxattr SYS_linkat SYS_listen
    SYS_listxattr SYS_llistxattr SYS_lookup_dcookie SYS_lremovexattr SYS_lseek SYS_lsetxattr
    SYS_madvise SYS_mbind SYS_membarrier SYS_memfd_create SYS_memfd_secret SYS_migrate_pages
    SYS_mincore SYS_mkdirat SYS_mknodat SYS_mlock SYS_mlock2 SYS_mlockall SYS_mmap SYS_mount
    SYS_mount_setattr SYS_move_mount SYS_move_pages SYS_mprotect SYS_mq_getsetattr SYS_mq_notify
    SYS_mq_open SYS_mq_timedreceive SYS_mq_timedsend SYS_mq_unlink SYS_mremap SYS_mseal SYS_msgctl
    SYS_msgget SYS_msgrcv SYS_msgsnd SYS_msync SYS_munlock SYS_munlockall SYS_munmap
    SYS_name_to_handle_at SYS_nanosleep SYS_newfstatat SYS_nfsservctl SYS_open_by_handle_at
    SYS_open_tree SYS_openat SYS_openat2 SYS_perf_event_open SYS_personality SYS_pidfd_getfd
    SYS_pidfd_open SYS_pidfd_send_signal SYS_pipe2 SYS_pivot_root SYS_pkey_alloc SYS_pkey_free
    SYS_pkey_mprotect SYS_ppoll SYS_prctl SYS_pread64 SYS_preadv SYS_preadv2 SYS_prlimit64
    SYS_process_madvise SYS_process_mrelease SYS_process_vm_readv SYS_process_vm_writev SYS_pselect6
    SYS_ptrace SYS_pwrite64 SYS_pwritev SYS_pwritev2 SYS_quotactl SYS_quotactl_fd SYS_read
    SYS_readahead SYS_readlinkat SYS_readv SYS_reboot SYS_recvfrom SYS_recvmmsg SYS_recvmsg
    SYS_remap_file_pages SYS_removexattr SYS_renameat2 SYS_request_key SYS_restart_syscall SYS_rseq
    SYS_rt_sigaction SYS_rt_sigpending SYS_rt_sigprocmask SYS_rt_sigqueueinfo SYS_rt_sigreturn
    SYS_rt_sigsuspend SYS_rt_sigtimedwait SYS_rt_tgsigqueueinfo SYS_sched_get_priority_max
    SYS_sched_get_priority_min SYS_sched_getaffinity SYS_sched_getattr SYS_sched_getparam
    SYS_sched_getscheduler SYS_sched_rr_get_interval SYS_sched_setaffinity SYS_sched_setattr
    SYS_sched_setparam SYS_sched_setscheduler SYS_sched_yield SYS_seccomp SYS_semctl SYS_semget
    SYS_semop SYS_semtimedop SYS_sendfile SYS_sendmmsg SYS_sendmsg SYS_sendto SYS_set_mempolicy
    SYS_set_mempolicy_home_node SYS_set_robust_list SYS_set_tid_address SYS_setdomainname
    SYS_setfsgid SYS_setfsuid SYS_setgid SYS_setgroups SYS_sethostname SYS_setitimer SYS_setns
    SYS_setpgid SYS_setpriority SYS_setregid SYS_setresgid SYS_setresuid SYS_setreuid SYS_setsid
    SYS_setsockopt SYS_settimeofday SYS_setuid SYS_setxattr SYS_shmat SYS_shmctl SYS_shmdt
    SYS_shmget SYS_shutdown SYS_sigaltstack SYS_signalfd4 SYS_socket SYS_socketpair SYS_splice
    SYS_statfs SYS_statx SYS_swapoff SYS_swapon SYS_symlinkat SYS_sync SYS_syncfs SYS_sysinfo
    SYS_syslog SYS_tee SYS_tgkill SYS_timer_create SYS_timer_delete SYS_timer_getoverrun
    SYS_timer_gettime SYS_timer_settime SYS_timerfd_create SYS_timerfd_gettime SYS_timerfd_settime
    SYS_times SYS_tkill SYS_truncate SYS_umask SYS_umount2 SYS_uname SYS_unlinkat SYS_unshare
    SYS_userfaultfd SYS_utimensat SYS_vhangup SYS_vmsplice SYS_wait4 SYS_waitid SYS_write SYS_writev
];

#[cfg(target_arch = "x86_64")]
const TABLE_ARCH: &[(&str, i64)] = libc_numbers![
    SYS__sysctl SYS_access SYS_afs_syscall SYS_alarm SYS_arch_prctl SYS_chmod SYS_chown SYS_creat
    SYS_dup2 SYS_epoll_create SYS_epoll_ctl_old SYS_epoll_wait SYS_epoll_wait_old SYS_eventfd
    SYS_fchmodat2 SYS_fork SYS_futimesat SYS_get_thread_area SYS_getdents SYS_getpgrp SYS_getpmsg
    SYS_getrlimit SYS_inotify_init SYS_ioperm SYS_iopl SYS_lchown SYS_link SYS_lstat SYS_mkdir
    SYS_mknod SYS_modify_ldt SYS_open SYS_pause SYS_pipe SYS_poll SYS_putpmsg SYS_readlink
    SYS_rename SYS_renameat SYS_rmdir SYS_security SYS_select SYS_set_thread_area SYS_setrlimit
    SYS_signalfd SYS_stat SYS_symlink SYS_sync_file_range SYS_sysfs SYS_time SYS_tuxcall SYS_unlink
    SYS_uselib SYS_ustat SYS_utime SYS_utimes SYS_vfork SYS_vserver
];
#[cfg(target_arch = "aarch64")]
const TABLE_ARCH: &[(&str, i64)] = &[];

#[cfg(target_arch = "x86_64")]
const TABLE_NEWER: &[(&str, i64)] = raw_numbers![
    __NR_cachestat __NR_file_getattr __NR_file_setattr __NR_futex_requeue __NR_futex_wait
    __NR_futex_wake __NR_getxattrat __NR_io_pgetevents __NR_listmount __NR_listxattrat
    __NR_lsm_get_self_attr __NR_lsm_list_modules __NR_lsm_set_self_attr __NR_map_shadow_stack
    __NR_open_tree_attr __NR_removexattrat __NR_setxattrat __NR_statmount __NR_uretprobe
];
#[cfg(target_arch = "aarch64")]
const TABLE_NEWER: &[(&str, i64)] = raw_numbers![
    __NR_cachestat __NR_fchmodat2 __NR_file_getattr __NR_file_setattr __NR_futex_requeue
    __NR_futex_wait __NR_futex_wake __NR_getrlimit __NR_getxattrat __NR_io_pgetevents __NR_listmount
    __NR_listxattrat __NR_lsm_get_self_attr __NR_lsm_list_modules __NR_lsm_set_self_attr
    __NR_map_shadow_stack __NR_open_tree_attr __NR_removexattrat __NR_renameat __NR_setrlimit
    __NR_setxattrat __NR_statmount __NR_sync_file_range
];

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::time::Instant;

    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn build(allow: &[&str], deny: &[&str], keep_caps: u64) -> Filter {
        let (allow, deny) = (names(allow), names(deny));
        Filter::build(&Policy { allow: &allow, deny: &deny, keep_caps, unix_only: false }).expect("filter builds")
    }

    /// What a forked child reported: its wait status and the i64 values it wrote.
    struct Outcome {
        status: i32,
        values: Vec<i64>,
    }

    impl Outcome {
        fn killed_by(&self) -> Option<i32> {
            libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status))
        }
    }

    /// Fork; the child sets no_new_privs, installs `filter` (if any), runs `body` with a
    /// writer for i64 results and exits 0. The body runs after fork in a multi-threaded
    /// process: it must not allocate (plain system calls only).
    fn in_child(filter: Option<&Filter>, body: impl FnOnce(&dyn Fn(i64))) -> Outcome {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child only makes system calls (see above) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let w = fds[1];
            let report = |v: i64| {
                // SAFETY: writes 8 bytes from a live local.
                unsafe { libc::write(w, &v as *const i64 as *const libc::c_void, 8) };
            };
            let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: plain system calls in the child; SIGSYS kills must not dump core.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(120);
                }
            }
            if let Some(f) = filter {
                if f.install().is_err() {
                    // SAFETY: leaving the child.
                    unsafe { libc::_exit(121) };
                }
            }
            body(&report);
            // SAFETY: leaving the child.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: our end of the pipe; the child's end is closed right after.
        let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        // SAFETY: closing the write end we own.
        unsafe { libc::close(fds[1]) };
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes).expect("read child report");
        let mut status = 0;
        // SAFETY: reaping our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let values = bytes.chunks_exact(8).map(|c| i64::from_ne_bytes(c.try_into().unwrap())).collect();
        Outcome { status, values }
    }

    #[derive(Clone, Copy, Debug)]
    enum Want {
        /// Passed the filter and succeeded (>= 0).
        Ok,
        /// Failed with this errno.
        Err(i32),
        /// Passed the filter: anything but this errno.
        Not(i32),
    }

    struct Probe {
        what: &'static str,
        nr: libc::c_long,
        args: [usize; 6],
        want: Want,
    }

    fn probe(what: &'static str, nr: libc::c_long, args: &[usize], want: Want) -> Probe {
        let mut a = [0; 6];
        a[..args.len()].copy_from_slice(args);
        Probe { what, nr, args: a, want }
    }

    /// Run each probe as a system call in a child under `filter` and check the results.
    fn check(filter: &Filter, probes: &[Probe]) {
        let out = in_child(Some(filter), |report| {
            for p in probes {
                let a = p.args;
                // SAFETY: probes pass NULL, small integers or pointers into live parent data.
                let r = unsafe { libc::syscall(p.nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
                let v = result(r);
                if forks(p.nr) && v == 0 {
                    // SAFETY: the new process leaves at once.
                    unsafe { libc::_exit(0) };
                }
                if forks(p.nr) && v > 0 {
                    // SAFETY: reaping our own child.
                    unsafe { libc::waitpid(v as i32, std::ptr::null_mut(), 0) };
                }
                report(v);
            }
        });
        assert_eq!(out.status, 0, "child exit status {:#x}", out.status);
        assert_eq!(out.values.len(), probes.len());
        let errors: Vec<String> = probes
            .iter()
            .zip(&out.values)
            .filter(|(p, &v)| match p.want {
                Want::Ok => v < 0,
                Want::Err(e) => v != -i64::from(e),
                Want::Not(e) => v == -i64::from(e),
            })
            .map(|(p, &v)| format!("{}: wanted {:?}, got {}", p.what, p.want, show(v)))
            .collect();
        assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    /// A libc::syscall return value as the kernel's: -errno on failure. (The child is a
    /// forked process: errno is its own.)
    fn result(r: libc::c_long) -> i64 {
        match r {
            -1 => -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
            r => r,
        }
    }

    /// Calls that, when allowed, return twice (not vfork: its child would reuse our stack).
    fn forks(nr: libc::c_long) -> bool {
        #[cfg(target_arch = "x86_64")]
        if nr == libc::SYS_fork {
            return true;
        }
        nr == libc::SYS_clone
    }

    fn show(v: i64) -> String {
        if v < 0 {
            Errno::from_raw_os_error(-v as i32).to_string()
        } else {
            format!("{v}")
        }
    }

    const EPERM: Want = Want::Err(libc::EPERM);
    const NEWUSER: usize = libc::CLONE_NEWUSER as usize;
    const SIGCHLD: usize = libc::SIGCHLD as usize;

    #[test]
    fn default_filter_denies_the_dangerous_and_allows_the_rest() {
        let (cwd, fionbio, tiocsti) = (libc::AT_FDCWD as usize, libc::FIONBIO as usize, libc::TIOCSTI as usize);
        let (newns, newnet, newtime) =
            (libc::CLONE_NEWNS as usize, libc::CLONE_NEWNET as usize, libc::CLONE_NEWTIME as usize);
        let stream = libc::SOCK_STREAM as usize;
        #[rustfmt::skip]
        let mut probes = vec![
            probe("getpid", libc::SYS_getpid, &[], Want::Ok),
            probe("keyctl", libc::SYS_keyctl, &[0, usize::MAX, 0], EPERM),
            probe("add_key", libc::SYS_add_key, &[0, 0, 0, 0, 0], EPERM),
            probe("request_key", libc::SYS_request_key, &[0, 0, 0, 0], EPERM),
            probe("bpf", libc::SYS_bpf, &[5, 0, 0], EPERM),
            probe("io_uring_setup", libc::SYS_io_uring_setup, &[1, 0], EPERM),
            probe("perf_event_open", libc::SYS_perf_event_open, &[0, 0, usize::MAX, usize::MAX, 0], EPERM),
            probe("userfaultfd", libc::SYS_userfaultfd, &[0], EPERM),
            probe("clone3", libc::SYS_clone3, &[0, 0], Want::Err(libc::ENOSYS)),
            probe("openat2", libc::SYS_openat2, &[cwd, 0, 0, 0], Want::Err(libc::ENOSYS)),
            probe("io_setup", libc::SYS_io_setup, &[1, 0], Want::Err(libc::ENOSYS)),
            probe("io_submit", libc::SYS_io_submit, &[0, 0, 0], Want::Err(libc::ENOSYS)),
            probe("ioctl(0, TIOCSTI|1<<32)", libc::SYS_ioctl, &[0, tiocsti | 1 << 32, 0], EPERM),
            probe("ioctl(0, TIOCSTI)", libc::SYS_ioctl, &[0, tiocsti, 0], EPERM),
            probe("ioctl(0, TIOCLINUX)", libc::SYS_ioctl, &[0, libc::TIOCLINUX as usize, 0], EPERM),
            probe("ioctl(-1, FIONBIO)", libc::SYS_ioctl, &[usize::MAX, fionbio, 0], Want::Err(libc::EBADF)),
            probe("setns", libc::SYS_setns, &[usize::MAX, 0], EPERM),
            probe("mount", libc::SYS_mount, &[0, 0, 0, 0, 0], EPERM),
            probe("umount2", libc::SYS_umount2, &[0, 0], EPERM),
            probe("pivot_root", libc::SYS_pivot_root, &[0, 0], EPERM),
            probe("fsopen", libc::SYS_fsopen, &[0, 0], EPERM),
            probe("open_tree", libc::SYS_open_tree, &[usize::MAX, 0, 0], EPERM),
            probe("name_to_handle_at", libc::SYS_name_to_handle_at, &[usize::MAX, 0, 0, 0, 0], EPERM),
            probe("init_module", libc::SYS_init_module, &[0, 0, 0], EPERM),
            probe("kexec_file_load", libc::SYS_kexec_file_load, &[usize::MAX, usize::MAX, 0, 0, 0], EPERM),
            probe("reboot(bad magic)", libc::SYS_reboot, &[0, 0, 0, 0], EPERM),
            probe("swapon(NULL)", libc::SYS_swapon, &[0, 0], EPERM),
            probe("syslog(SIZE_BUFFER)", libc::SYS_syslog, &[10, 0, 0], EPERM),
            probe("adjtimex", libc::SYS_adjtimex, &[0], EPERM),
            probe("clock_settime", libc::SYS_clock_settime, &[0, 0], EPERM),
            probe("quotactl", libc::SYS_quotactl, &[0, 0, 0, 0], EPERM),
            probe("personality(READ_IMPLIES_EXEC)", libc::SYS_personality, &[0x40_0000], EPERM),
            probe("personality(query)", libc::SYS_personality, &[0xffff_ffff], Want::Ok),
            probe("socket(AF_VSOCK)", libc::SYS_socket, &[libc::AF_VSOCK as usize, stream, 0], EPERM),
            probe("socket(AF_ALG)", libc::SYS_socket, &[libc::AF_ALG as usize, libc::SOCK_SEQPACKET as usize, 0], EPERM),
            probe("socket(AF_UNIX)", libc::SYS_socket, &[libc::AF_UNIX as usize, stream, 0], Want::Ok),
            // Allowed: PTRACE_CONT on a process we do not trace is ESRCH.
            probe("ptrace(CONT, 1)", libc::SYS_ptrace, &[libc::PTRACE_CONT as usize, 1, 0, 0], Want::Err(libc::ESRCH)),
            probe("process_vm_readv(self)", libc::SYS_process_vm_readv, &[0, 0, 0, 0, 0, 0], Want::Not(libc::EPERM)),
            probe("seccomp(GET_ACTION_AVAIL)", libc::SYS_seccomp, &[2, 0, 0], Want::Not(libc::EPERM)),
        ];
        #[cfg(target_arch = "x86_64")]
        #[rustfmt::skip]
        probes.extend([
            probe("iopl(0)", libc::SYS_iopl, &[0], EPERM),
            probe("ioperm", libc::SYS_ioperm, &[0, 0, 0], EPERM),
            probe("fork", libc::SYS_fork, &[], Want::Ok),
        ]);
        // Last: were the filter broken, these would move the child into new namespaces (where
        // the capability checks above fail with EPERM for another reason).
        #[rustfmt::skip]
        probes.extend([
            probe("clone(SIGCHLD)", libc::SYS_clone, &[SIGCHLD, 0, 0, 0, 0], Want::Ok),
            probe("unshare(FILES)", libc::SYS_unshare, &[libc::CLONE_FILES as usize], Want::Ok),
            probe("unshare(NEWUSER)", libc::SYS_unshare, &[NEWUSER], EPERM),
            probe("unshare(NEWUSER|1<<32)", libc::SYS_unshare, &[NEWUSER | 1 << 32], EPERM),
            probe("unshare(NEWNS)", libc::SYS_unshare, &[newns], EPERM),
            probe("unshare(NEWTIME)", libc::SYS_unshare, &[newtime], EPERM),
            probe("clone(NEWUSER)", libc::SYS_clone, &[NEWUSER | SIGCHLD, 0, 0, 0, 0], EPERM),
            probe("clone(NEWNET)", libc::SYS_clone, &[newnet | SIGCHLD, 0, 0, 0, 0], EPERM),
        ]);
        check(&build(&[], &[], 0), &probes);
    }

    /// A scratch directory, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("nsfast-seccomp-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir(&p).unwrap();
            TempDir(p)
        }

        fn c(&self, name: &str) -> CString {
            CString::new(self.0.join(name).into_os_string().into_encoded_bytes()).unwrap()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn no_setuid_or_setgid_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("setid");
        let file = std::fs::File::create(dir.0.join("f")).unwrap();
        let fd = file.as_raw_fd() as usize;
        let (f, new, new_ok, node, node_ok) =
            (dir.c("f"), dir.c("new"), dir.c("new_ok"), dir.c("node"), dir.c("node_ok"));
        let cwd = libc::AT_FDCWD as usize;
        let creat = (libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC) as usize;
        let reg = libc::S_IFREG as usize;
        let mut probes = vec![
            probe("fchmod 04755", libc::SYS_fchmod, &[fd, 0o4755], EPERM),
            probe("fchmod 02755", libc::SYS_fchmod, &[fd, 0o2755], EPERM),
            probe("fchmod 04755|1<<32", libc::SYS_fchmod, &[fd, 0o4755 | 1 << 32], EPERM),
            probe("fchmod 0755", libc::SYS_fchmod, &[fd, 0o755], Want::Ok),
            probe("fchmodat 04755", libc::SYS_fchmodat, &[cwd, f.as_ptr() as usize, 0o4755], EPERM),
            probe("fchmodat2 06755", libc::SYS_fchmodat2, &[cwd, f.as_ptr() as usize, 0o6755, 0], EPERM),
            probe("openat O_CREAT 04755", libc::SYS_openat, &[cwd, new.as_ptr() as usize, creat, 0o4755], EPERM),
            probe("openat O_CREAT 0644", libc::SYS_openat, &[cwd, new_ok.as_ptr() as usize, creat, 0o644], Want::Ok),
            probe(
                "openat O_RDONLY",
                libc::SYS_openat,
                &[cwd, f.as_ptr() as usize, libc::O_CLOEXEC as usize, 0],
                Want::Ok,
            ),
            probe("mknodat S_IFREG|02644", libc::SYS_mknodat, &[cwd, node.as_ptr() as usize, reg | 0o2644, 0], EPERM),
            probe(
                "mknodat S_IFREG|0644",
                libc::SYS_mknodat,
                &[cwd, node_ok.as_ptr() as usize, reg | 0o644, 0],
                Want::Ok,
            ),
        ];
        #[cfg(target_arch = "x86_64")]
        probes.extend([
            probe("chmod 04755", libc::SYS_chmod, &[f.as_ptr() as usize, 0o4755], EPERM),
            probe("open O_CREAT 04755", libc::SYS_open, &[new.as_ptr() as usize, creat, 0o4755], EPERM),
            probe("creat 02755", libc::SYS_creat, &[new.as_ptr() as usize, 0o2755], EPERM),
            probe("mknod S_IFREG|04755", libc::SYS_mknod, &[node.as_ptr() as usize, reg | 0o4755, 0], EPERM),
            probe("chmod 0700", libc::SYS_chmod, &[f.as_ptr() as usize, 0o700], Want::Ok),
        ]);
        check(&build(&[], &[], 0), &probes);
        let mode = std::fs::metadata(dir.0.join("f")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode & 0o6000, 0, "mode {mode:o}");
        assert!(!dir.0.join("new").exists() && !dir.0.join("node").exists());
        assert!(dir.0.join("new_ok").exists() && dir.0.join("node_ok").exists());
    }

    #[test]
    fn policy_allow_and_deny() {
        let timex = [0u8; 256];
        let t = timex.as_ptr() as usize;
        check(
            &build(&["adjtimex", "clone3"], &["getppid"], 0),
            &[
                probe("adjtimex (allowed)", libc::SYS_adjtimex, &[t], Want::Ok),
                probe("getppid (denied)", libc::SYS_getppid, &[], EPERM),
                probe("getpid", libc::SYS_getpid, &[], Want::Ok),
                probe("clone3 (allowed: no ENOSYS)", libc::SYS_clone3, &[0, 0], Want::Err(libc::EINVAL)),
                probe("openat2 (still ENOSYS)", libc::SYS_openat2, &[0, 0, 0, 0], Want::Err(libc::ENOSYS)),
            ],
        );
        // deny wins over allow and over the ENOSYS override
        check(
            &build(&["getppid"], &["getppid", "clone3"], 0),
            &[
                probe("getppid (allowed and denied)", libc::SYS_getppid, &[], EPERM),
                probe("clone3 (denied)", libc::SYS_clone3, &[0, 0], EPERM),
            ],
        );
        // allowing a conditional call lifts its conditions
        check(
            &build(&["ioctl"], &[], 0),
            &[probe(
                "ioctl(-1, TIOCSTI)",
                libc::SYS_ioctl,
                &[usize::MAX, libc::TIOCSTI as usize, 0],
                Want::Err(libc::EBADF),
            )],
        );
    }

    #[test]
    fn unknown_names_are_invalid() {
        for (allow, deny) in [(names(&["foo"]), vec![]), (vec![], names(&["getpid", "foo"]))] {
            match Filter::build(&Policy { allow: &allow, deny: &deny, keep_caps: 0, unix_only: false }) {
                Err(Error::Invalid { field: "seccomp", msg }) => assert_eq!(
                    msg,
                    format!("unknown system call \"foo\" (not in nsfast's table for {})", std::env::consts::ARCH)
                ),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn kept_sys_admin_allows_namespaces_but_not_user_namespaces() {
        let admin = CapabilitySet::SYS_ADMIN.bits();
        check(
            &build(&[], &[], admin),
            &[
                probe("unshare(NEWUSER)", libc::SYS_unshare, &[NEWUSER], EPERM),
                probe("unshare(NEWUSER|NEWNS)", libc::SYS_unshare, &[NEWUSER | libc::CLONE_NEWNS as usize], EPERM),
                probe("clone(NEWUSER)", libc::SYS_clone, &[NEWUSER | SIGCHLD, 0, 0, 0, 0], EPERM),
                probe("unshare(NEWUTS)", libc::SYS_unshare, &[libc::CLONE_NEWUTS as usize], Want::Ok),
                probe("setns(-1)", libc::SYS_setns, &[usize::MAX, 0], Want::Err(libc::EBADF)),
                probe("mount(NULL)", libc::SYS_mount, &[0, 0, 0, 0, 0], Want::Not(libc::EPERM)),
                probe("clone3", libc::SYS_clone3, &[0, 0], Want::Err(libc::ENOSYS)),
                probe("bpf (CAP_BPF, not kept)", libc::SYS_bpf, &[5, 0, 0], EPERM),
            ],
        );
        check(
            &build(&[], &[], 0),
            &[probe("unshare(NEWUTS) without CAP_SYS_ADMIN", libc::SYS_unshare, &[libc::CLONE_NEWUTS as usize], EPERM)],
        );
    }

    /// The kernel's order for equal-precedence results, for callers that stack programs (a
    /// `Filter` may hold several): the most recently installed filter runs first and its
    /// result wins the tie.
    #[test]
    fn of_two_errno_results_the_last_installed_filter_wins() {
        let errno = |e: i32| {
            let verdicts = [(libc::SYS_getppid, Verdict::Errno(e))].into_iter().collect();
            compile(&verdicts, ScmpAction::Allow).unwrap()
        };
        let getppid = |f: &Filter| {
            in_child(Some(f), |report| {
                // SAFETY: a plain system call in the child.
                let r = unsafe { libc::syscall(libc::SYS_getppid) };
                report(result(r));
            })
            .values
        };
        let (eperm, enosys) = (errno(libc::EPERM), errno(libc::ENOSYS));
        assert_eq!(getppid(&Filter { programs: vec![eperm.clone(), enosys.clone()] }), [-i64::from(libc::ENOSYS)]);
        assert_eq!(getppid(&Filter { programs: vec![enosys, eperm] }), [-i64::from(libc::EPERM)]);
    }

    #[cfg(target_arch = "x86_64")]
    fn x32_getpid() -> i64 {
        let ret: i64;
        // SAFETY: a system call without pointer arguments.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") (39 | 0x4000_0000) as i64 => ret,
                lateout("rcx") _, lateout("r11") _,
                options(nostack)
            );
        }
        ret
    }

    #[cfg(target_arch = "x86_64")]
    fn i386_getpid() -> i64 {
        let ret: i32;
        // SAFETY: i386 getpid (20) through the compat entry; it takes no arguments. The kernel
        // clears r8-r11 on the way back.
        unsafe {
            std::arch::asm!(
                "int 0x80",
                inlateout("eax") 20i32 => ret,
                lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
                options(nostack)
            );
        }
        i64::from(ret)
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_system_calls_kill() {
        let without = in_child(None, |report| report(x32_getpid()));
        assert_eq!(without.killed_by(), None, "x32 getpid without a filter: {}", show(without.values[0]));
        let with = in_child(Some(&build(&[], &[], 0)), |report| report(x32_getpid()));
        assert_eq!(with.killed_by(), Some(libc::SIGSYS), "values {:?}", with.values);
        assert!(with.values.is_empty());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn i386_system_calls_kill() {
        let without = in_child(None, |report| report(i386_getpid()));
        if without.killed_by().is_some() || without.values.first().is_none_or(|&v| v < 0) {
            eprintln!("skipped: no ia32 emulation (status {:#x})", without.status);
            return;
        }
        let with = in_child(Some(&build(&[], &[], 0)), |report| report(i386_getpid()));
        assert_eq!(with.killed_by(), Some(libc::SIGSYS), "values {:?}", with.values);
    }

    #[test]
    fn to_bytes_layout() {
        let f = build(&[], &[], 0);
        let b = f.to_bytes();
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(0) as usize, f.programs.len());
        let mut at = 4;
        for program in &f.programs {
            assert_eq!(u32_at(at) as usize, program.len());
            at += 4;
            for insn in program {
                assert_eq!(u16::from_ne_bytes([b[at], b[at + 1]]), insn.code);
                assert_eq!((b[at + 2], b[at + 3]), (insn.jt, insn.jf));
                assert_eq!(u32::from_ne_bytes(b[at + 4..at + 8].try_into().unwrap()), insn.k);
                at += 8;
            }
        }
        assert_eq!(at, b.len());
        assert_eq!(std::mem::size_of::<SockFilter>(), 8);
    }

    #[test]
    fn tables_are_consistent() {
        let known = known_syscalls();
        assert!(known.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
        let mut nrs: Vec<i64> = table().iter().map(|&(_, nr)| nr).collect();
        nrs.sort_unstable();
        assert!(nrs.windows(2).all(|w| w[0] < w[1]), "no number twice");
        assert_eq!(number("getpid").unwrap(), libc::SYS_getpid);
        assert_eq!(number("cachestat").unwrap(), 451);

        let allowed = default_allowed();
        assert!(allowed.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
        for name in allowed.iter().chain(ENOSYS).chain(CAP_SYSCALLS.iter().flat_map(|(_, n)| n.iter())) {
            assert!(number(name).is_ok(), "{name} not in the table");
        }
        #[rustfmt::skip]
        let never = [
            "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
            "io_uring_setup", "io_uring_enter", "io_uring_register", "init_module", "finit_module",
            "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
            "syslog", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "mount",
            "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
            "open_tree", "mount_setattr", "setns", "name_to_handle_at", "open_by_handle_at",
            "lookup_dcookie", "quotactl", "nfsservctl", "clone3", "openat2",
            #[cfg(target_arch = "x86_64")] "iopl",
            #[cfg(target_arch = "x86_64")] "ioperm",
        ];
        for name in never {
            assert!(number(name).is_ok(), "{name} cannot be re-allowed by name");
            assert!(!allowed.contains(&name), "{name} allowed by default");
        }
        assert!(allowed.contains(&"ptrace"));
    }

    /// The audit architecture of native calls (`AUDIT_ARCH_*` of `<linux/audit.h>`).
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    /// AUDIT_ARCH_I386 and AUDIT_ARCH_ARM: foreign.
    const FOREIGN_ARCHES: [u32; 2] = [0x4000_0003, 0x4000_0028];

    const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const RET_KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;

    fn ret_errno(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | e as u32
    }

    /// Run `program` on a call as the kernel does (`struct seccomp_data`, little-endian:
    /// argument i's low word at offset 16 + 8 i): its return value and the number of
    /// instructions executed. Knows the instructions libseccomp emits; panics on any other.
    fn run(program: &[SockFilter], arch: u32, nr: i32, args: &[u64; 6]) -> (u32, usize) {
        let word = |k: u32| match k {
            0 => nr as u32,
            4 => arch,
            16..=63 if k % 4 == 0 => (args[(k as usize - 16) / 8] >> (8 * (k % 8))) as u32,
            _ => panic!("load of seccomp_data offset {k}"),
        };
        let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
        loop {
            let i = program[pc];
            let branch = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            steps += 1;
            pc += 1;
            match i.code {
                0x20 => a = word(i.k),              // BPF_LD | BPF_W | BPF_ABS
                0x54 => a &= i.k,                   // BPF_ALU | BPF_AND | BPF_K
                0x05 => pc += i.k as usize,         // BPF_JMP | BPF_JA
                0x15 => pc += branch(a == i.k),     // BPF_JMP | BPF_JEQ | BPF_K
                0x25 => pc += branch(a > i.k),      // BPF_JMP | BPF_JGT | BPF_K
                0x35 => pc += branch(a >= i.k),     // BPF_JMP | BPF_JGE | BPF_K
                0x45 => pc += branch(a & i.k != 0), // BPF_JMP | BPF_JSET | BPF_K
                0x06 => return (i.k, steps),        // BPF_RET | BPF_K
                code => panic!("instruction {code:#06x} at {}", pc - 1),
            }
        }
    }

    /// What `verdicts` promise for a native call.
    fn promised(verdicts: &BTreeMap<i64, Verdict>, nr: i32, args: &[u64; 6]) -> u32 {
        #[cfg(target_arch = "x86_64")]
        if nr as u32 >= 0x4000_0000 && nr != -1 {
            return RET_KILL; // x32
        }
        match verdicts.get(&i64::from(nr)) {
            None => ret_errno(libc::EPERM),
            Some(Verdict::Allow) => RET_ALLOW,
            Some(Verdict::Errno(e)) => ret_errno(*e),
            Some(Verdict::AllowIf(alternatives)) => {
                let holds = |m: &Masked| args[m.arg as usize] as u32 & m.mask == m.value;
                if alternatives.iter().any(holds) {
                    RET_ALLOW
                } else {
                    ret_errno(libc::EPERM)
                }
            }
        }
    }

    /// Argument vectors around every compare of `verdicts`: each value, each value with a
    /// mask bit flipped, with garbage in the upper half; and zeros, all ones.
    fn interesting_args(verdicts: &BTreeMap<i64, Verdict>) -> Vec<[u64; 6]> {
        let mut out = vec![[0; 6], [u64::MAX; 6]];
        let compares = verdicts.values().flat_map(|v| match v {
            Verdict::AllowIf(alternatives) => alternatives.as_slice(),
            _ => &[],
        });
        for m in compares {
            let low = m.mask.trailing_zeros();
            for value in [m.value, m.value ^ 1 << low, m.value ^ m.mask, !m.value] {
                for upper in [0, 1 << 32, u64::MAX << 32] {
                    let mut args = [0; 6];
                    args[m.arg as usize] = upper | u64::from(value);
                    out.push(args);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// libseccomp's program answers every call as the verdicts say: all numbers up to past
    /// the table's end, -1, x32 and foreign calls, with arguments at each compare's edges.
    #[test]
    fn program_follows_the_verdicts() {
        let max = table().iter().map(|&(_, nr)| nr).max().unwrap() as i32;
        for (allow, deny, caps) in [
            (&[][..], &[][..], 0),
            (&[], &[], CapabilitySet::SYS_ADMIN.bits() | CapabilitySet::BPF.bits()),
            (&["ioctl", "clone3", "keyctl"], &["getppid", "openat2"], 0),
        ] {
            let (allow, deny) = (names(allow), names(deny));
            let policy = Policy { allow: &allow, deny: &deny, keep_caps: caps, unix_only: false };
            let verdicts = verdicts(&policy).unwrap();
            let program = &Filter::build(&policy).unwrap().programs[0];
            let argsets = interesting_args(&verdicts);
            let mut nrs: Vec<i32> = (-1..=max + 16).collect();
            #[cfg(target_arch = "x86_64")]
            nrs.extend([0, 1, 39, 59, 512, 547, 0x3fff_ffff].map(|nr| nr | 0x4000_0000));
            for nr in nrs {
                for args in &argsets {
                    let want = promised(&verdicts, nr, args);
                    let (got, _) = run(program, AUDIT_ARCH, nr, args);
                    assert_eq!(got, want, "nr {nr} args {args:x?} ({allow:?} {deny:?} {caps:#x})");
                    for arch in FOREIGN_ARCHES {
                        assert_eq!(run(program, arch, nr, args).0, RET_KILL, "arch {arch:#x}");
                    }
                }
            }
        }
    }

    /// `unix_only` (a zygote's network="none"): socket(2) and socketpair(2) for AF_UNIX
    /// only (socketpair makes AF_TIPC sockets too, which Landlock does not scope).
    #[test]
    fn unix_only_allows_unix_sockets_alone() {
        let policy = Policy { allow: &[], deny: &[], keep_caps: 0, unix_only: true };
        let program = &Filter::build(&policy).unwrap().programs[0];
        for name in ["socket", "socketpair"] {
            let nr = number(name).unwrap() as i32;
            for (family, want) in [
                (libc::AF_UNIX, RET_ALLOW),
                (libc::AF_INET, ret_errno(libc::EPERM)),
                (libc::AF_TIPC, ret_errno(libc::EPERM)),
            ] {
                let args = [family as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
                assert_eq!(run(program, AUDIT_ARCH, nr, &args).0, want, "{name}({family})");
            }
        }
    }

    /// The verdicts say what the module documentation says about arguments.
    #[test]
    fn conditions_are_exact() {
        let setid = u64::from(libc::S_ISUID | libc::S_ISGID);
        for (name, arg, allowed) in [
            ("ioctl", 1, &(|x| ![libc::TIOCSTI as u32, libc::TIOCLINUX as u32].contains(&x)) as &dyn Fn(u32) -> bool),
            ("socket", 0, &|x| ![libc::AF_ALG as u32, libc::AF_VSOCK as u32].contains(&x)),
            ("personality", 0, &|x| [0, 8, 0x2_0000, 0x2_0008, u32::MAX].contains(&x)),
            ("clone", 0, &|x| u64::from(x) & CLONE_NS_FLAGS as u64 == 0),
            ("unshare", 0, &|x| u64::from(x) & (CLONE_NS_FLAGS | libc::CLONE_NEWTIME as u32) as u64 == 0),
            ("openat", 3, &|x| u64::from(x) & setid == 0),
            ("fchmod", 1, &|x| u64::from(x) & setid == 0),
        ] {
            let Some(Verdict::AllowIf(alternatives)) =
                verdicts(&Policy::default()).unwrap().remove(&number(name).unwrap())
            else {
                panic!("{name} is not conditional");
            };
            assert!(alternatives.iter().all(|m| m.arg == arg), "{name}");
            let holds = |x: u32| alternatives.iter().any(|m| x & m.mask == m.value);
            // Every value within two bit flips of the interesting ones, and a pseudo-random sweep.
            let mut values: Vec<u32> =
                vec![0, u32::MAX, 0o4755, 0o2755, 0o6755, 0o644, 0x5412, 0x541c, 0x5421, 38, 40, 1, 2, 10];
            for seed in values.clone() {
                for i in 0..32 {
                    values.push(seed ^ 1 << i);
                    for j in i + 1..32 {
                        values.push(seed ^ 1 << i ^ 1 << j);
                    }
                }
            }
            let mut x = 0x9e37_79b9u32;
            for _ in 0..200_000 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                values.push(x);
            }
            for v in values {
                assert_eq!(holds(v), allowed(v), "{name}({v:#x})");
            }
        }
    }

    /// The program is a binary search over the number: no call runs more than a few dozen
    /// instructions of it (seccompiler's linear chain ran up to ~1600 for a denied call).
    #[test]
    fn the_program_is_a_binary_tree() {
        let f = build(&[], &[], 0);
        let program = &f.programs[0];
        let max = table().iter().map(|&(_, nr)| nr).max().unwrap() as i32;
        let steps = |nr: i32, args: &[u64; 6]| run(program, AUDIT_ARCH, nr, args).1;
        let by_number = (-1..=max + 16)
            .filter(|&nr| {
                !matches!(verdicts(&Policy::default()).unwrap().get(&i64::from(nr)), Some(Verdict::AllowIf(_)))
            })
            .map(|nr| steps(nr, &[0; 6]))
            .max()
            .unwrap();
        let ioctl = steps(libc::SYS_ioctl as i32, &[0, libc::TIOCSTI, 0, 0, 0, 0]);
        let openat = steps(libc::SYS_openat as i32, &[0; 6]);
        assert!(program.len() > 300, "{} instructions", program.len());
        assert!(by_number <= 24, "a call decided by number runs {by_number} instructions");
        assert!(openat <= 32, "openat runs {openat} instructions");
        // ioctl's 35 alternative compares, all failing for TIOCSTI.
        assert!(ioctl <= 32 + 3 * 35, "ioctl(TIOCSTI) runs {ioctl} instructions");
    }

    /// Numbers for the report, not assertions: `cargo test -p nsfast seccomp -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn measure() {
        let t = Instant::now();
        let rounds = 200;
        for _ in 0..rounds {
            build(&[], &[], 0);
        }
        let f = build(&[], &[], 0);
        let lens: Vec<usize> = f.programs.iter().map(Vec::len).collect();
        eprintln!(
            "build: {:.1} us; instructions per program: {lens:?}",
            t.elapsed().as_secs_f64() * 1e6 / rounds as f64
        );
        let installs: Vec<f64> = (0..20)
            .map(|_| {
                in_child(None, |report| {
                    let t = Instant::now();
                    let ok = f.install().is_ok();
                    report(if ok { t.elapsed().as_nanos() as i64 } else { -1 });
                })
                .values[0] as f64
                    / 1e3
            })
            .collect();
        let mut sorted = installs.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        eprintln!("install (in a fresh child): median {:.1} us", sorted[sorted.len() / 2]);
        const N: usize = 1_000_000;
        let time = |filter: Option<&Filter>, nr: libc::c_long, a: [usize; 4]| {
            in_child(filter, |report| {
                let t = Instant::now();
                for _ in 0..N {
                    // SAFETY: the calls timed here take integers or a live C string.
                    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3]) };
                }
                report(t.elapsed().as_nanos() as i64);
            })
            .values[0] as f64
                / N as f64
        };
        let missing = c"/nonexistent-nsfast-seccomp".as_ptr() as usize;
        let cwd = libc::AT_FDCWD as usize;
        #[rustfmt::skip]
        let cases: [(&str, libc::c_long, [usize; 4]); 5] = [
            ("getppid (allowed by number: cached)", libc::SYS_getppid, [0; 4]),
            ("ioctl(-1, FIONBIO) (argument rule, nr 16)", libc::SYS_ioctl, [usize::MAX, libc::FIONBIO as usize, 0, 0]),
            ("personality(query) (5 rules, nr 135)", libc::SYS_personality, [0xffff_ffff, 0, 0, 0]),
            ("openat(missing) (mode rule, nr 257)", libc::SYS_openat, [cwd, missing, libc::O_RDONLY as usize, 0]),
            ("keyctl (denied)", libc::SYS_keyctl, [usize::MAX, 0, 0, 0]),
        ];
        for (what, nr, a) in cases {
            let (off, on) = (time(None, nr, a), time(Some(&f), nr, a));
            let args = [a[0], a[1], a[2], a[3], 0, 0].map(|x| x as u64);
            let (_, steps) = run(&f.programs[0], AUDIT_ARCH, nr as i32, &args);
            eprintln!("{what}: {off:.0} ns without, {on:.0} ns with (+{:.0} ns; {steps} instructions)", on - off);
        }
    }
}
