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
//! Only fds nsfast made for itself come here (the user's own mounts are never pinned past
//! the run). In a forked child of the process that started the thread, which the fork did
//! not copy, or where the thread cannot start or the socket is full, fds are closed on the
//! spot, as before.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Condvar, Mutex, OnceLock};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// fds per message (the kernel's SCM_MAX_FD is 253).
const BATCH: usize = 64;

struct Reaper {
    /// The process the thread runs in (a fork's child has no such thread).
    pid: u32,
    /// Our end of the socket (the thread's end is in its table only).
    tx: OwnedFd,
    /// Messages sent / handled; `flush` waits for handled to reach what it sent.
    sent: Mutex<u64>,
    handled: Mutex<u64>,
    progress: Condvar,
}

fn reaper() -> Option<&'static Reaper> {
    static REAPER: OnceLock<Option<Reaper>> = OnceLock::new();
    let r = REAPER.get_or_init(|| start().ok());
    r.as_ref().filter(|r| r.pid == std::process::id())
}

fn start() -> std::io::Result<Reaper> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let (tx, rx) = socketpair(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), Errno>>();
    let rx_raw = std::os::fd::AsRawFd::as_raw_fd(&rx);
    std::thread::Builder::new().name("nsfast-reaper".into()).stack_size(128 * 1024).spawn(move || {
        // SAFETY: this thread uses no fd but `rx_raw` (and those it receives) from here on,
        // and owns nothing else: `rx` stays in the shared table, closed there by `start`.
        let private = unsafe { crate::sys::private_fd_table(rx_raw) };
        let ok = private.is_ok();
        let _ = ready_tx.send(private);
        if ok {
            // SAFETY: our private table's copy of the receiving end, open for good.
            serve(unsafe { crate::sys::borrow_fd(rx_raw) });
        }
    })?;
    let private = ready_rx.recv().map_err(|_| std::io::Error::other("the reaper thread died"))?;
    drop(rx); // the thread's table has the only receiving end now
    private?;
    Ok(Reaper { pid: std::process::id(), tx, sent: Mutex::new(0), handled: Mutex::new(0), progress: Condvar::new() })
}

/// The thread: receive, close, count, until the socket fails (it never does: we never
/// close `tx`).
fn serve(rx: BorrowedFd<'_>) {
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    loop {
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        match rustix::net::recvmsg(rx, &mut [std::io::IoSliceMut::new(&mut byte)], &mut anc, RecvFlags::CMSG_CLOEXEC) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(_) => return,
        }
        for msg in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                fds.for_each(drop);
            }
        }
        let Some(r) = reaper() else { return };
        *r.handled.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        r.progress.notify_all();
    }
}

/// Send one message (fds, or none for a flush); Ok(its number) once queued.
fn send(r: &Reaper, fds: &[OwnedFd], flags: SendFlags) -> Result<u64, Errno> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(Errno::NOBUFS);
    }
    let mut sent = r.sent.lock().unwrap_or_else(|p| p.into_inner());
    rustix::net::sendmsg(&r.tx, &[std::io::IoSlice::new(b"R")], &mut anc, flags | SendFlags::NOSIGNAL)?;
    *sent += 1;
    Ok(*sent)
}

/// Close `fds` soon, on the reaper thread (see the module's doc).
pub fn drop_later(mut fds: Vec<OwnedFd>) {
    let Some(r) = reaper() else { return }; // `fds` close here
    while !fds.is_empty() {
        let rest = fds.split_off(fds.len().min(BATCH));
        // Queued or not, our copies close now: queued, the socket holds the files.
        let _ = send(r, &fds, SendFlags::DONTWAIT);
        fds = rest;
    }
}

/// Return once every fd handed over before this call is closed (tests; a caller that must
/// know nsfast's overlays are gone, e.g. before unmounting what one of them covered).
pub fn flush() {
    let Some(r) = reaper() else { return };
    let Ok(mine) = send(r, &[], SendFlags::empty()) else { return };
    let handled = r.handled.lock().unwrap_or_else(|p| p.into_inner());
    // Bounded: a thread that died (it cannot, short of a bug) must not hang the caller.
    let wait = r.progress.wait_timeout_while(handled, std::time::Duration::from_secs(10), |h| *h < mine);
    drop(wait);
}
