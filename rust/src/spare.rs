//! Overlays made ahead: a root caller's start takes the overlays a thread made for it while
//! the previous start with the same layers ran, and that thread makes the next ones.
//!
//! Making a root caller's overlays (`spawn::prepare_layers`: a tmpfs for the upper layers,
//! a clone of each lower, an overlay superblock each, whose `ovl_fill_super` probes the
//! work directory with a tmpfile, a whiteout rename and xattrs) is ~0.15-0.25 ms of the
//! parent's serial work before clone on this VM, for two overlays. The thread is asked
//! once the start has exec'd, so its work overlaps the sandbox's run and the caller's wait,
//! not the sandbox's setup.
//!
//! Each start still gets overlays nothing ever used: a spare is taken once, by one start,
//! and is discarded unused after [`MAX_AGE`] (it pins its lower file systems until then).
//! A fresh overlay caches nothing of its lowers but their roots, so a spare sees the lowers
//! as they are when the start runs, not when it was made; the roots themselves are checked
//! at take: the same directory (device, inode) on the same mount (mount id), else the spare
//! is discarded and the start makes its own. Lookups are not made ahead: the dentries they
//! would leave in the overlay would go stale when the host renames or deletes a file before
//! the start (a binary replaced by `rename`, run in its old version).
//!
//! Only plans whose every prepared tree is a non-recursive overlay lower over a tmpfs
//! upper qualify (a bind's recursive clone made ahead could miss a mount made since; an
//! `overlay_upper` directory is the user's, not to be touched before the start asks).
//!
//! The thread ends once it has held no spare for [`MAX_AGE`], and the next start that asks
//! starts another: a process that stopped starting sandboxes has no thread of this module.

use std::ffi::CStr;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, StatxFlags, CWD};

use crate::mount::{PrepareTree, Upper};
use crate::spec::Plan;

/// How long a spare waits for its start before it is discarded (it pins its lowers).
pub const MAX_AGE: Duration = Duration::from_secs(2);
/// Spares kept at most (one per distinct set of layers).
const MAX_SPARES: usize = 4;

/// What a spare is for: the prepared trees and the upper of a plan, and the id range it
/// idmaps them through (the sandbox's, see `spec::next_overlay_base`).
#[derive(Clone, PartialEq, Eq)]
pub struct Layers {
    pub prepare: Vec<PrepareTree>,
    pub upper: Upper,
    pub id_base: u32,
}

struct Spare {
    layers: Layers,
    made: Instant,
    /// (dev, ino, mount id) of each lower, taken before it was opened.
    ids: Vec<Identity>,
    trees: Vec<OwnedFd>,
    upper: OwnedFd,
}

type Identity = (u64, u64, u64);

enum Job {
    /// Make a spare of these layers (unless one is there).
    Make(Layers),
    /// Answered once the jobs before it are done.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The process the spares are of. A forked child, which has no thread (and whose copies of
/// the locks below may have been held at the fork), sees another pid and takes no lock.
static OWNER: crate::sys::ProcessOwner = crate::sys::ProcessOwner::new();
/// The running thread's queue (None: no thread runs; the next job starts one). The thread
/// ends once it has held no spare for [`MAX_AGE`] (a process that stopped starting
/// sandboxes is left with no thread of nsfast's), clearing this under its lock.
static QUEUE: Mutex<Option<SyncSender<Job>>> = Mutex::new(None);
static SPARES: Mutex<Vec<Spare>> = Mutex::new(Vec::new());

fn spares() -> std::sync::MutexGuard<'static, Vec<Spare>> {
    SPARES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queue `job` for the thread (started if none runs), without blocking: Err(job) when the
/// queue is full, in a forked child, or if no thread can start.
fn submit(job: Job) -> Result<(), Job> {
    if !OWNER.claim() {
        return Err(job);
    }
    let mut queue = QUEUE.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = job;
    for _ in 0..2 {
        if queue.is_none() {
            let (tx, rx) = sync_channel::<Job>(MAX_SPARES);
            let started =
                std::thread::Builder::new().name("nsfast-spare".into()).stack_size(256 * 1024).spawn(move || work(rx));
            if started.is_err() {
                return Err(job);
            }
            *queue = Some(tx);
        }
        match queue.as_ref().map(|tx| tx.try_send(job)) {
            Some(Ok(())) => return Ok(()),
            Some(Err(TrySendError::Full(j))) => return Err(j),
            Some(Err(TrySendError::Disconnected(j))) => {
                *queue = None; // (a thread that died: start another)
                job = j;
            }
            None => unreachable!("set above"),
        }
    }
    Err(job)
}

/// The thread.
fn work(rx: std::sync::mpsc::Receiver<Job>) {
    let _ = crate::sys::block_all_signals();
    let handle = |job: Job| match job {
        Job::Make(layers) => make(layers),
        Job::Flush(done) => drop(done.send(())),
    };
    loop {
        match rx.recv_timeout(MAX_AGE) {
            Ok(job) => handle(job),
            Err(RecvTimeoutError::Timeout) => {
                expire();
                if spares().is_empty() {
                    let mut queue = QUEUE.lock().unwrap_or_else(|p| p.into_inner());
                    match rx.try_recv() {
                        Ok(job) => {
                            drop(queue);
                            handle(job);
                        }
                        Err(_) => {
                            *queue = None; // nothing queued, nothing held: end
                            return;
                        }
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
        expire();
    }
}

/// The layers a plan's overlays can be made ahead for, if it qualifies (see the module).
fn layers_of(plan: &Plan) -> Option<Layers> {
    let (prepare, upper) = (&plan.fs.prepare, plan.fs.upper.as_ref()?);
    if prepare.is_empty()
        || !matches!(upper, Upper::Tmpfs { .. })
        || prepare.iter().any(|p| p.overlay.is_none() || p.recursive)
    {
        return None;
    }
    let id_base = plan.id_base.unwrap_or(crate::spec::SANDBOX_ID_BASE);
    Some(Layers { prepare: prepare.clone(), upper: upper.clone(), id_base })
}

/// A spare for this plan's overlays, if one is there, young enough and its lowers
/// unchanged: (the prepared trees' fds, the upper's).
pub fn take(plan: &Plan) -> Option<(Vec<OwnedFd>, OwnedFd)> {
    let layers = layers_of(plan)?;
    if !OWNER.claim() {
        return None;
    }
    let s = {
        let mut spares = spares();
        spares.iter().position(|s| s.layers == layers).map(|i| spares.swap_remove(i))
    }?;
    let current: Option<Vec<Identity>> = layers.prepare.iter().map(|p| identity(&p.src)).collect();
    if s.made.elapsed() > MAX_AGE || current.as_ref() != Some(&s.ids) {
        discard(s);
        return None;
    }
    Some((s.trees, s.upper))
}

/// Ask for a spare for this plan's overlays (made unless one is there). Called once the
/// start that took or made them has exec'd: the thread's work then overlaps the sandbox's
/// run and the caller's wait, not the sandbox's setup, which it would slow on a machine
/// with few CPUs.
pub fn ask(plan: &Plan) {
    if let Some(mut layers) = layers_of(plan) {
        // For the next start: in the range it takes (each start has one of its own).
        if let (Some(base), Some(key)) = (plan.id_base, plan.layers) {
            if base == crate::spec::SANDBOX_ID_BASE {
                let _ = submit(Job::Make(layers)); // (the shared range: the next start's too)
                return;
            }
            let next = crate::spec::peek_overlay_base(key);
            crate::mount::rebase_owners(&mut layers.prepare, layers.id_base, next);
            layers.id_base = next;
        }
        let _ = submit(Job::Make(layers)); // full: enough asked for already
    }
}

/// Discard every spare, once the thread made those asked for: afterwards this process
/// holds none (tests; `reaper::flush` then closes them).
pub fn clear() {
    if !OWNER.is_mine() {
        return; // none was ever made in this process
    }
    // Bounded: a thread that died (it cannot, short of a bug) must not hang the caller.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (done, wait) = std::sync::mpsc::channel();
    let mut job = Job::Flush(done);
    loop {
        let running = QUEUE.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if !running {
            break; // no thread: nothing is being made
        }
        match submit(job) {
            Ok(()) => {
                let _ = wait.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
                break;
            }
            Err(j) if std::time::Instant::now() < deadline => {
                job = j;
                std::thread::sleep(Duration::from_millis(1)); // full: it is busy making
            }
            Err(_) => break,
        }
    }
    let all = std::mem::take(&mut *spares());
    all.into_iter().for_each(discard);
}

fn discard(s: Spare) {
    let mut fds = s.trees;
    fds.push(s.upper);
    crate::reaper::drop_later(fds);
}

fn identity(path: &CStr) -> Option<Identity> {
    let st = rustix::fs::statx(CWD, path, AtFlags::empty(), StatxFlags::BASIC_STATS | StatxFlags::MNT_ID).ok()?;
    let dev = (u64::from(st.stx_dev_major) << 32) | u64::from(st.stx_dev_minor);
    Some((dev, st.stx_ino, st.stx_mnt_id))
}

/// The thread: make a spare of `layers` unless one is there.
fn make(layers: Layers) {
    if spares().iter().any(|s| s.layers == layers) {
        return;
    }
    let Some(ids) = layers.prepare.iter().map(|p| identity(&p.src)).collect::<Option<Vec<_>>>() else {
        return;
    };
    let Ok((trees, Some(upper))) = crate::spawn::prepare_layers(&layers.prepare, Some(&layers.upper), layers.id_base)
    else {
        return; // the start makes its own, and reports what failed
    };
    let spare = Spare { layers, made: Instant::now(), ids, trees, upper };
    let mut spares = spares();
    spares.push(spare);
    if spares.len() > MAX_SPARES {
        let oldest = spares.remove(0);
        drop(spares);
        discard(oldest);
    }
}

fn expire() {
    let old: Vec<Spare> = {
        let mut spares = spares();
        let (old, keep) = std::mem::take(&mut *spares).into_iter().partition(|s| s.made.elapsed() > MAX_AGE);
        *spares = keep;
        old
    };
    old.into_iter().for_each(discard);
}
