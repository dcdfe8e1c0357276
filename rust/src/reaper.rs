//! Closing, off the caller's path, the fds whose last close waits for the kernel.
//!
//! Closing the last reference to a detached mount (an overlay's lower tree, the tmpfs its
//! upper layer lives in) unmounts it, and every unmount ends in `namespace_unlock()`'s
//! `synchronize_rcu_expedited()`; tearing down an overlay superblock (`ovl_free_fs`) waits
//! for another. Each is an expedited RCU grace period, ~0.1-0.2 ms on a 2-vCPU VM (it takes
//! an IPI to every CPU), and nothing of ours needs it to be over. A spawn with overlays
//! used to wait for up to five (three in the parent, one per overlay in the exit of the
//! sandbox's pid 1, which the caller waits for); now the parent keeps those fds until the
//! sandbox was reaped and hands them to one thread that closes them.
//!
//! That thread has an fd table of its own, and the fds travel to it as SCM_RIGHTS on a unix
//! socket whose receiving end only that table holds: an fd merely queued in the shared table
//! would be copied into the next sandbox's child at clone (whose table is a copy), and its
//! close there, before exec, would then be the last one and pay the grace periods.
//!
//! The thread ends after [`IDLE`] with nothing to close, and the next hand-over starts
//! another: a process that stopped starting sandboxes has no thread of this module.
//!
//! Only fds nsfast made for itself come here (the user's own mounts are never pinned past
//! the run). In a forked child of the process that started the thread, which the fork did
//! not copy, or where the thread cannot start or the socket is full, fds are closed on the
//! spot, as before.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// fds per message (the kernel's SCM_MAX_FD is 253).
const BATCH: usize = 64;
/// The thread ends after this long with nothing to close: a process that stopped starting
/// sandboxes is left with no thread of nsfast's (what a later fork() expects); the next
/// `drop_later` starts another.
pub const IDLE: Duration = Duration::from_secs(2);

struct Reaper {
    /// Our end of the socket (the thread's end is in its table only). Only ever dropped in
    /// a thread of the shared table: closed in the thread's own table, it would stay open.
    tx: OwnedFd,
    counts: Arc<Counts>,
}

/// What the thread shares with the senders (no fd: the thread may drop the last of it).
struct Counts {
    /// Messages sent, and whether the thread ended (nothing may be sent to it then). Held
    /// across each send, so that the thread's "nothing in flight" check sees every send.
    sent: Mutex<(u64, bool)>,
    /// Messages handled; `flush` waits for it to reach what it sent.
    handled: Mutex<u64>,
    progress: Condvar,
}

/// The process the slot is of. A forked child, which has no thread (and whose copy of the
/// slot's lock may have been held at the fork), sees another pid and never takes the lock.
static OWNER: crate::sys::ProcessOwner = crate::sys::ProcessOwner::new();
static SLOT: Mutex<Option<Arc<Reaper>>> = Mutex::new(None);

/// The running reaper, started if none runs; None in a forked child or if none can start.
fn reaper() -> Option<Arc<Reaper>> {
    if !OWNER.claim() {
        return None;
    }
    let mut slot = SLOT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = slot.as_ref() {
        if !r.counts.sent.lock().unwrap_or_else(|p| p.into_inner()).1 {
            return Some(r.clone());
        }
    }
    // (An ended one's sending end closes here, in the shared table.)
    let r = start().ok()?;
    *slot = Some(r.clone());
    Some(r)
}

fn start() -> std::io::Result<Arc<Reaper>> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let (tx, rx) = socketpair(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
    let counts = Arc::new(Counts { sent: Mutex::new((0, false)), handled: Mutex::new(0), progress: Condvar::new() });
    let r = Arc::new(Reaper { tx, counts: counts.clone() });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), Errno>>();
    let rx_raw = std::os::fd::AsRawFd::as_raw_fd(&rx);
    std::thread::Builder::new().name("nsfast-reaper".into()).stack_size(128 * 1024).spawn(move || {
        // SAFETY: this thread uses no fd but `rx_raw` (and those it receives) from here on,
        // and owns nothing else: `rx` stays in the shared table, closed there by `start`.
        let private = unsafe { crate::sys::private_fd_table(rx_raw) };
        let ok = private.is_ok();
        let _ = ready_tx.send(private);
        if ok {
            // SAFETY: our private table's copy of the receiving end, open until we end.
            serve(&counts, unsafe { crate::sys::borrow_fd(rx_raw) });
        }
        // However it ended (idle; or a socket error, which it cannot get short of a bug):
        // nothing more is sent to it.
        counts.sent.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        counts.progress.notify_all();
        // Ending: our table (the receiving end, so anything still queued) goes with us.
    })?;
    let private = ready_rx.recv().map_err(|_| std::io::Error::other("the reaper thread died"))?;
    drop(rx); // the thread's table has the only receiving end now
    private?;
    Ok(r)
}

/// The thread: receive, close, count; end once idle for [`IDLE`] with nothing in flight.
fn serve(r: &Counts, rx: BorrowedFd<'_>) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let _ = crate::sys::block_all_signals();
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    let idle = Timespec { tv_sec: IDLE.as_secs() as i64, tv_nsec: 0 };
    loop {
        let mut pfd = [PollFd::new(&rx, PollFlags::IN)];
        match poll(&mut pfd, Some(&idle)) {
            Ok(0) => {
                {
                    let mut sent = r.sent.lock().unwrap_or_else(|p| p.into_inner());
                    if sent.0 != *r.handled.lock().unwrap_or_else(|p| p.into_inner()) {
                        continue;
                    }
                    sent.1 = true; // nothing is sent after this: `reaper()` starts another
                }
                // (Our sending end stays in the slot until the next `reaper()` replaces it.)
                r.progress.notify_all();
                return;
            }
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => return,
        }
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let flags = RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT;
        match rustix::net::recvmsg(rx, &mut [std::io::IoSliceMut::new(&mut byte)], &mut anc, flags) {
            Ok(_) => {}
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(_) => return,
        }
        for msg in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                fds.for_each(drop);
            }
        }
        *r.handled.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        r.progress.notify_all();
    }
}

/// Send one message (fds, or none for a flush) without blocking; Ok(its number) once
/// queued. Err(Errno::PIPE): that thread ended (ask `reaper()` for the next one).
fn send(r: &Reaper, fds: &[OwnedFd]) -> Result<u64, Errno> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(Errno::NOBUFS);
    }
    let mut sent = r.counts.sent.lock().unwrap_or_else(|p| p.into_inner());
    if sent.1 {
        return Err(Errno::PIPE);
    }
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    rustix::net::sendmsg(&r.tx, &[std::io::IoSlice::new(b"R")], &mut anc, flags)?;
    sent.0 += 1;
    Ok(sent.0)
}

/// Close `fds` soon, on the reaper thread (see the module's doc).
pub fn drop_later(mut fds: Vec<OwnedFd>) {
    while !fds.is_empty() {
        let rest = fds.split_off(fds.len().min(BATCH));
        // Queued or not, our copies close now: queued, the socket holds the files. A thread
        // that just ended is replaced once; a full socket (or none) closes them here.
        for _ in 0..2 {
            let Some(r) = reaper() else { break };
            if send(&r, &fds) != Err(Errno::PIPE) {
                break;
            }
        }
        fds = rest;
    }
}

/// Return once every fd handed over before this call is closed (tests; a caller that must
/// know nsfast's overlays are gone, e.g. before unmounting what one of them covered).
pub fn flush() {
    if !OWNER.is_mine() {
        return; // nothing was ever handed over in this process
    }
    let Some(r) = SLOT.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
    // Bounded: a thread that died (it cannot, short of a bug) must not hang the caller.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mine = loop {
        match send(&r, &[]) {
            Ok(n) => break n,
            Err(Errno::AGAIN) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1)); // full: it is busy closing
            }
            Err(_) => return, // ended (it ends only with nothing in flight), or gone
        }
    };
    let handled = r.counts.handled.lock().unwrap_or_else(|p| p.into_inner());
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    drop(r.counts.progress.wait_timeout_while(handled, left, |h| *h < mine));
}
