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

use std::ffi::CStr;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, StatxFlags, CWD};

use crate::mount::{PrepareTree, Upper};
use crate::spec::Plan;

/// How long a spare waits for its start before it is discarded (it pins its lowers).
pub const MAX_AGE: Duration = Duration::from_secs(2);
/// Spares kept at most (one per distinct set of layers).
const MAX_SPARES: usize = 4;

/// What a spare is for: the prepared trees and the upper of a plan.
#[derive(Clone, PartialEq, Eq)]
pub struct Layers {
    pub prepare: Vec<PrepareTree>,
    pub upper: Upper,
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

struct Maker {
    pid: u32,
    tx: SyncSender<Job>,
    spares: Mutex<Vec<Spare>>,
}

fn maker() -> Option<&'static Maker> {
    static MAKER: OnceLock<Option<Maker>> = OnceLock::new();
    let m = MAKER.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(MAX_SPARES);
        let work = move || loop {
            match rx.recv_timeout(MAX_AGE) {
                Ok(Job::Make(layers)) => make(layers),
                Ok(Job::Flush(done)) => drop(done.send(())),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            expire();
        };
        let started = std::thread::Builder::new().name("nsfast-spare".into()).stack_size(256 * 1024).spawn(work);
        started.ok().map(|_| Maker { pid: std::process::id(), tx, spares: Mutex::new(Vec::new()) })
    });
    m.as_ref().filter(|m| m.pid == std::process::id())
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
    Some(Layers { prepare: prepare.clone(), upper: upper.clone() })
}

/// A spare for this plan's overlays, if one is there, young enough and its lowers
/// unchanged: (the prepared trees' fds, the upper's).
pub fn take(plan: &Plan) -> Option<(Vec<OwnedFd>, OwnedFd)> {
    let layers = layers_of(plan)?;
    let m = maker()?;
    let s = {
        let mut spares = m.spares.lock().unwrap_or_else(|p| p.into_inner());
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
    let (Some(layers), Some(m)) = (layers_of(plan), maker()) else { return };
    let _ = m.tx.try_send(Job::Make(layers));
}

/// Discard every spare, once the thread made those asked for: afterwards this process
/// holds none (tests; `reaper::flush` then closes them).
pub fn clear() {
    let Some(m) = maker() else { return };
    let (done, wait) = std::sync::mpsc::channel();
    if m.tx.send(Job::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(Duration::from_secs(10));
    }
    let all = std::mem::take(&mut *m.spares.lock().unwrap_or_else(|p| p.into_inner()));
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
    let Some(m) = maker() else { return };
    if m.spares.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|s| s.layers == layers) {
        return;
    }
    let Some(ids) = layers.prepare.iter().map(|p| identity(&p.src)).collect::<Option<Vec<_>>>() else {
        return;
    };
    let Ok((trees, Some(upper))) = crate::spawn::prepare_layers(&layers.prepare, Some(&layers.upper)) else {
        return; // the start makes its own, and reports what failed
    };
    let spare = Spare { layers, made: Instant::now(), ids, trees, upper };
    let mut spares = m.spares.lock().unwrap_or_else(|p| p.into_inner());
    spares.push(spare);
    if spares.len() > MAX_SPARES {
        let oldest = spares.remove(0);
        drop(spares);
        discard(oldest);
    }
}

fn expire() {
    let Some(m) = maker() else { return };
    let old: Vec<Spare> = {
        let mut spares = m.spares.lock().unwrap_or_else(|p| p.into_inner());
        let (old, keep) = std::mem::take(&mut *spares).into_iter().partition(|s| s.made.elapsed() > MAX_AGE);
        *spares = keep;
        old
    };
    old.into_iter().for_each(discard);
}
