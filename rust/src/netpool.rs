//! Network namespaces made ahead (opt-in: `nsfast.configure(netns_pool=N)`).
//!
//! A network namespace is the dearest namespace a sandbox gets: `copy_net_ns` registers
//! every per-namespace subsystem (sysctl tables, loopback, netfilter, ...) under the
//! kernel's global `pernet_ops_rwsem` and `rtnl` locks, ~0.4 ms of a ~2.7 ms start on this
//! VM. With a pool, a thread of nsfast's makes them ahead (each with `lo` up, as a sandbox's
//! own gets it) and a start takes one: the spawning thread enters it with setns() for the
//! clone only (the child inherits it), then goes back to its own. Each is used by one
//! sandbox, once; nothing else ever entered it (the thread leaves it right after making
//! it), so the sandbox gets a namespace as fresh as one made at clone.
//!
//! What differs: a namespace made here is owned by the caller's user namespace, not by the
//! sandbox's. That is invisible to a sandbox that keeps no capability (the default): every
//! right over a network namespace (CAP_NET_ADMIN, CAP_NET_RAW, CAP_NET_BIND_SERVICE, mounting
//! a sysfs for it) is checked against its owner, and such a sandbox has none in either. A
//! plan that keeps capabilities in a user namespace of its own therefore never takes one
//! (it makes its own at clone), nor does a start that finds the pool empty. Making a
//! namespace needs CAP_SYS_ADMIN: a rootless caller cannot have a pool.
//!
//! A zygote keeps a pool of two for its tasks (`crate::zygote`, always): there the
//! namespaces are owned by the zygote's user namespace, which is the tasks' own, so not even
//! a task that keeps capabilities can tell.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Condvar, Mutex, OnceLock};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::spec::Plan;
use crate::sys;

/// The largest pool `set_size` takes.
pub const MAX_SIZE: usize = 64;

struct State {
    /// How many to keep ready (0: none, and no thread).
    want: usize,
    ready: VecDeque<OwnedFd>,
    /// The thread is making one (its fds are open): `set_size` waits for it to finish.
    making: bool,
    /// The thread runs (it ends once `want` is 0, so a process that turned its pool off is
    /// left with no thread of it).
    thread: bool,
}

struct Pool {
    /// The process the pool is of (a fork's child has no thread, and no pool).
    pid: u32,
    state: Mutex<State>,
    /// Signalled when `ready` shrank or `want` changed (for the thread), or when the thread
    /// finished making one or ended (for `set_size`).
    changed: Condvar,
}

static POOL: OnceLock<Pool> = OnceLock::new();

fn pool() -> Option<&'static Pool> {
    POOL.get().filter(|p| p.pid == std::process::id())
}

/// Keep `n` network namespaces ready (0: none; those ready are closed and the thread ends).
/// A call with `n > 0` returns once one is ready (and the thread runs), or with why none can
/// be made (EPERM: no CAP_SYS_ADMIN). In a forked child of a process that had a pool:
/// ENOTSUP (the thread was not copied).
pub fn set_size(n: usize) -> Result<(), Errno> {
    if n > MAX_SIZE {
        return Err(Errno::INVAL);
    }
    let p = POOL.get_or_init(|| Pool {
        pid: std::process::id(),
        state: Mutex::new(State { want: 0, ready: VecDeque::new(), making: false, thread: false }),
        changed: Condvar::new(),
    });
    if p.pid != std::process::id() {
        return Err(Errno::NOTSUP);
    }
    // Refused if this caller cannot make one; the one made to check is the first ready (a
    // start right after this call finds one).
    let first = if n > 0 { Some(make()?) } else { None };
    let (old, spawn) = {
        let mut st = p.state.lock().unwrap_or_else(|e| e.into_inner());
        st.want = n;
        st.ready.extend(first);
        p.changed.notify_all();
        // Returns with no fd of the pool's open beyond the `n` kept (leak checks count),
        // and with no thread when `n` is 0.
        while st.making || (n == 0 && st.thread) {
            st = p.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let keep = st.ready.len().min(n);
        let old = st.ready.split_off(keep);
        let spawn = n > 0 && !st.thread;
        st.thread |= spawn;
        (old, spawn)
    };
    drop(old);
    if spawn {
        let started = std::thread::Builder::new().name("nsfast-netns".into()).stack_size(128 * 1024).spawn(fill);
        if let Err(e) = started {
            let old = {
                let mut st = p.state.lock().unwrap_or_else(|e| e.into_inner());
                st.thread = false;
                st.want = 0;
                std::mem::take(&mut st.ready)
            };
            drop(old);
            return Err(Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EAGAIN)));
        }
    }
    Ok(())
}

/// The configured size (0: no pool).
pub fn size() -> usize {
    pool().map_or(0, |p| p.state.lock().unwrap_or_else(|e| e.into_inner()).want)
}

/// Whether `plan`'s sandbox may run in a namespace of the pool: it has a network namespace,
/// and no user namespace of its own or no capability in it (see the module's doc).
pub fn eligible(plan: &Plan) -> bool {
    let net = plan.clone_flags & libc::CLONE_NEWNET as u64 != 0;
    let own_user = plan.clone_flags & libc::CLONE_NEWUSER as u64 != 0;
    net && (!own_user || plan.keep_caps == 0) && !plan.fs.own_net
}

/// A ready namespace for `plan`'s sandbox, if it may have one and one is ready (never
/// waits: an empty pool means the start makes its own at clone).
pub fn take(plan: &Plan) -> Option<OwnedFd> {
    if !eligible(plan) {
        return None;
    }
    let p = pool()?;
    p.state.lock().unwrap_or_else(|e| e.into_inner()).ready.pop_front()
}

/// Let the thread make up for what was taken: called once the start that took one has
/// exec'd, so that the thread's work overlaps the sandbox's run and the caller's wait, not
/// the sandbox's setup, which it would slow on a machine with few CPUs (as `spare::ask`).
pub fn refill() {
    if let Some(p) = pool() {
        p.changed.notify_all();
    }
}

/// The thread: keep `want` namespaces ready.
fn fill() {
    let Some(p) = pool() else { return };
    // No signal is the process's business here (a handler of the caller's would run on
    // this thread, and the signal be lost to the thread that waits for it).
    let _ = sys::block_all_signals();
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        {
            let mut st = p.state.lock().unwrap_or_else(|e| e.into_inner());
            // (Woken by `refill` or `set_size`; a spurious wake-up only refills early.)
            while st.ready.len() >= st.want {
                if st.want == 0 {
                    st.thread = false;
                    p.changed.notify_all();
                    return;
                }
                st = p.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.making = true;
        }
        let made = make();
        let failed = made.is_err();
        let mut st = p.state.lock().unwrap_or_else(|e| e.into_inner());
        match made {
            Ok(fd) if st.ready.len() < st.want => st.ready.push_back(fd),
            other => drop(other), // not wanted any more: closed before `making` clears
        }
        st.making = false;
        p.changed.notify_all();
        if failed {
            // One was made before: a transient failure (ENOMEM), or the caller gave up
            // CAP_SYS_ADMIN since. Try again later, less and less often (or at once when
            // `set_size` changes something).
            drop(p.changed.wait_timeout(st, backoff));
            backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
        } else {
            backoff = std::time::Duration::from_millis(50);
        }
    }
}

/// Make one, in the calling thread: unshare the thread's network namespace, bring `lo` up,
/// keep an fd of it, and go back to the namespace the thread was in.
fn make() -> Result<OwnedFd, Errno> {
    let home = thread_netns()?;
    sys::unshare(libc::CLONE_NEWNET as u64)?;
    let made = sys::loopback_up().and_then(|()| thread_netns());
    go_home(&home);
    made
}

/// An fd of the calling thread's network namespace.
fn thread_netns() -> Result<OwnedFd, Errno> {
    rustix::fs::open(c"/proc/thread-self/ns/net", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
}

/// setns() the calling thread back into `home`. A thread left in another network namespace
/// would make its later sockets there (a sandbox's, for a spawning thread): if that fails,
/// which it cannot short of a kernel bug (we hold `home` and had the rights to leave it),
/// nothing else is safe, and the process aborts.
fn go_home(home: &OwnedFd) {
    if let Err(e) = sys::setns(home.as_raw_fd(), libc::CLONE_NEWNET as u64) {
        eprintln!("nsfast: cannot return to the thread's network namespace ({e}); aborting");
        std::process::abort();
    }
}

/// The spawning thread inside a pooled namespace, for the clone; back in its own on drop.
pub struct Entered {
    home: OwnedFd,
}

/// Enter `ns` (from [`take`]) in the calling thread until the guard drops.
pub fn enter(ns: &OwnedFd) -> Result<Entered, Errno> {
    let home = thread_netns()?;
    sys::setns(ns.as_raw_fd(), libc::CLONE_NEWNET as u64)?;
    Ok(Entered { home })
}

impl Drop for Entered {
    fn drop(&mut self) {
        go_home(&self.home);
    }
}
