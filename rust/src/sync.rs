//! The parent <-> child channel of one spawn.
//!
//! Two CLOEXEC pipes. `go`: the parent writes one byte once the id maps of a new user
//! namespace are written (only then may the child act as its mapped uid). `report`: the
//! child writes one fixed-size [`ChildError`] if a step fails and exits; if it execs, the
//! kernel closes its end and the parent reads EOF: success, with no extra system call.

use std::os::fd::{AsFd, OwnedFd, RawFd};

use rustix::io::Errno;

/// Steps of the child, in the order they run. `Fs` carries the index of the mount step.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    WaitMappings = 1,
    Fs,
    Hostname,
    Loopback,
    SetGroups,
    SetGid,
    SetUid,
    DropCaps,
    NoNewPrivs,
    DeathSignal,
    Setsid,
    Stdio,
    CloseFds,
    Chdir,
    Exec,
    ExecInit,
    CgroupNs,
    JoinNamespaces,
    Chroot,
    CloneJoined,
    JoinCgroupNs,
    AttachCgroup,
    BecomeRoot,
    Seccomp,
    Rlimit,
    CloseFdsEarly,
    TimeNs,
    Trees,
}

impl Step {
    pub fn from_raw(v: u32) -> Option<Step> {
        use Step::*;
        [
            WaitMappings,
            Fs,
            Hostname,
            Loopback,
            SetGroups,
            SetGid,
            SetUid,
            DropCaps,
            NoNewPrivs,
            DeathSignal,
            Setsid,
            Stdio,
            CloseFds,
            Chdir,
            Exec,
            ExecInit,
            CgroupNs,
            JoinNamespaces,
            Chroot,
            CloneJoined,
            JoinCgroupNs,
            AttachCgroup,
            BecomeRoot,
            Seccomp,
            Rlimit,
            CloseFdsEarly,
            TimeNs,
            Trees,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }

    /// The name SpawnError.step carries.
    pub fn name(self) -> &'static str {
        match self {
            Step::WaitMappings => "wait for id maps",
            Step::Fs => "mount",
            Step::Hostname => "sethostname",
            Step::Loopback => "bring up lo",
            Step::SetGroups => "setgroups",
            Step::SetGid => "setgid",
            Step::SetUid => "setuid",
            Step::DropCaps => "drop capabilities",
            Step::NoNewPrivs => "no_new_privs",
            Step::DeathSignal => "parent death signal",
            Step::Setsid => "setsid",
            Step::Stdio => "stdio",
            Step::CloseFds => "close fds",
            Step::Chdir => "chdir",
            Step::Exec => "exec",
            Step::ExecInit => "exec init",
            Step::CgroupNs => "unshare cgroup namespace",
            Step::JoinNamespaces => "setns",
            Step::Chroot => "chroot",
            Step::CloneJoined => "clone3 into the target",
            Step::JoinCgroupNs => "setns cgroup",
            Step::AttachCgroup => "attach cgroup",
            Step::BecomeRoot => "become root of the user namespace",
            Step::Seccomp => "install seccomp filter",
            Step::Rlimit => "setrlimit",
            Step::CloseFdsEarly => "close inherited fds",
            Step::TimeNs => "unshare time namespace",
            Step::Trees => "send the writable trees",
        }
    }
}

/// The child's failure report, 12 bytes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildError {
    pub step: u32,
    pub index: u32,
    pub errno: i32,
}

pub const RECORD_LEN: usize = 12;

impl ChildError {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..4].copy_from_slice(&self.step.to_ne_bytes());
        b[4..8].copy_from_slice(&self.index.to_ne_bytes());
        b[8..12].copy_from_slice(&self.errno.to_ne_bytes());
        b
    }

    pub fn decode(b: &[u8; RECORD_LEN]) -> ChildError {
        let word = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        ChildError {
            step: u32::from_ne_bytes(word(0)),
            index: u32::from_ne_bytes(word(4)),
            errno: i32::from_ne_bytes(word(8)),
        }
    }
}

/// nsfast-init's report of its command's raw wait status (see [`StatusReport`]): 8 bytes,
/// a tag then the status, native endian. The pipe's write end is held by nsfast-init only.
pub const STATUS_LEN: usize = 8;
/// "nsfs" in the first word of a status report (init/main.rs writes the same; a unit test
/// checks).
pub const STATUS_TAG: u32 = 0x6e73_6673;

/// What nsfast-init tells the parent when its command ended. pid 1 of a pid namespace cannot
/// die by a signal sent from inside it (the kernel's SIGNAL_UNKILLABLE), so its own exit code
/// cannot say "killed by signal N"; this report carries the command's own wait status.
///
/// It is data from inside the sandbox, parsed strictly: anything but exactly one well-formed
/// record holding a status `wait4` could have returned for an exited or killed process is
/// ignored. The worst a forged report can do is change that sandbox's own returncode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusReport {
    pub status: i32,
}

impl StatusReport {
    pub fn encode(&self) -> [u8; STATUS_LEN] {
        let mut b = [0u8; STATUS_LEN];
        b[0..4].copy_from_slice(&STATUS_TAG.to_ne_bytes());
        b[4..8].copy_from_slice(&self.status.to_ne_bytes());
        b
    }

    /// The report in `b` (all that was read), if it is one.
    pub fn decode(b: &[u8]) -> Option<StatusReport> {
        let b: &[u8; STATUS_LEN] = b.try_into().ok()?;
        let tag = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let status = i32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
        (tag == STATUS_TAG && is_final_status(status)).then_some(StatusReport { status })
    }
}

/// Whether `status` is one `wait4` returns for a process that ended: exited (code in bits
/// 8..15, nothing else) or killed by signal 1..=64 (bits 0..6, the core flag 0x80).
pub fn is_final_status(status: i32) -> bool {
    let sig = status & 0x7f;
    if sig == 0 {
        status & !0xff00 == 0
    } else {
        (1..=64).contains(&sig) && status & !0xff == 0
    }
}

/// The pipe of nsfast-init's [`StatusReport`]: (read end, non-blocking; write end). Both
/// CLOEXEC and at 3 or above. The read end never blocks: a process that forked the parent
/// (another thread's fork without exec) may hold a copy of the write end for ever.
pub fn status_pipe() -> rustix::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe()?;
    rustix::fs::fcntl_setfl(&r, rustix::fs::OFlags::NONBLOCK)?;
    Ok((r, w))
}

/// Read the status report of `report` (the read end of [`status_pipe`]) without blocking,
/// once nsfast-init has been reaped: the report, if one complete, well-formed record is all
/// the pipe holds.
pub fn read_status_report(report: std::os::fd::BorrowedFd<'_>) -> Option<StatusReport> {
    // One byte more than a record: a longer write is not a report.
    let mut buf = [0u8; STATUS_LEN + 1];
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(report, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::INTR) => continue,
            Err(_) => break, // EAGAIN: nothing (more) was written
        }
    }
    StatusReport::decode(&buf[..got])
}

/// The parent's ends.
pub struct ParentChannel {
    pub report: OwnedFd,
    pub go: Option<OwnedFd>,
}

/// The child's ends, as raw numbers (the child never drops Rust values).
#[derive(Clone, Copy)]
pub struct ChildChannel {
    pub report: RawFd,
    pub go: RawFd,
    /// The parent's end of `go`, which the child closes so a dead parent reads as EOF.
    pub go_parent: RawFd,
}

/// Pipe ends at 3 or above, so installing stdio on 0..2 in the child cannot clobber them.
fn pipe() -> rustix::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let lift = |fd: OwnedFd| -> rustix::io::Result<OwnedFd> {
        use std::os::fd::AsRawFd;
        if fd.as_raw_fd() < 3 {
            rustix::io::fcntl_dupfd_cloexec(&fd, 3)
        } else {
            Ok(fd)
        }
    };
    Ok((lift(r)?, lift(w)?))
}

/// Make the channel; `with_go` when the parent has id maps to write.
pub fn channel(with_go: bool) -> rustix::io::Result<(ParentChannel, ChildChannel, OwnedFd, Option<OwnedFd>)> {
    use std::os::fd::AsRawFd;
    let (report_r, report_w) = pipe()?;
    let (go_parent, go_child) = if with_go {
        let (r, w) = pipe()?;
        (Some(w), Some(r))
    } else {
        (None, None)
    };
    let child = ChildChannel {
        report: report_w.as_raw_fd(),
        go: go_child.as_ref().map_or(-1, |f| f.as_raw_fd()),
        go_parent: go_parent.as_ref().map_or(-1, |f| f.as_raw_fd()),
    };
    // The child's ends are returned separately: the parent closes them right after clone.
    Ok((ParentChannel { report: report_r, go: go_parent }, child, report_w, go_child))
}

impl ChildChannel {
    /// Child-safe: block until the parent has written the id maps.
    pub fn wait_mappings_written(&self) -> Result<(), Errno> {
        // SAFETY: the child's copy of the parent's end: nothing in the child owns it.
        unsafe { crate::sys::close(self.go_parent) };
        let mut b = [0u8; 1];
        loop {
            // SAFETY: the child's end, open until it execs or exits.
            let fd = unsafe { crate::sys::borrow_fd(self.go) };
            match rustix::io::read(fd, &mut b) {
                Ok(1) => return Ok(()),
                Ok(_) => return Err(Errno::PIPE),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Child-safe: report a failed step and exit.
    pub fn fail(&self, step: Step, index: u32, errno: Errno) -> ! {
        let rec = ChildError { step: step as u32, index, errno: errno.raw_os_error() }.encode();
        // SAFETY: the child's end of the report pipe, open until it exits.
        let _ = rustix::io::write(unsafe { crate::sys::borrow_fd(self.report) }, &rec);
        crate::sys::exit_now(127)
    }
}

impl ParentChannel {
    /// Tell the child the id maps are in place.
    pub fn mappings_written(&mut self) -> rustix::io::Result<()> {
        if let Some(go) = self.go.take() {
            rustix::io::write(go.as_fd(), b"1")?;
        }
        Ok(())
    }

    /// As [`Self::wait_exec`], for a child the sandbox may reach before it execs (a process
    /// joining a running container is its uid from `setresuid` on, so any process of it can
    /// SIGSTOP it, and a stopped process never execs): every `tick` without a record,
    /// `stalled()` may end the wait with an error, and so does `deadline` (TIMEDOUT).
    pub fn wait_exec_watched(
        &self,
        deadline: std::time::Instant,
        tick: std::time::Duration,
        stalled: &mut dyn FnMut() -> Option<Errno>,
    ) -> rustix::io::Result<Option<ChildError>> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        loop {
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(Errno::TIMEDOUT);
            }
            let wait = tick.min(deadline - now);
            let ts = Timespec { tv_sec: wait.as_secs() as i64, tv_nsec: wait.subsec_nanos() as i64 };
            let mut fds = [PollFd::new(&self.report, PollFlags::IN)];
            match poll(&mut fds, Some(&ts)) {
                Ok(0) => {
                    if let Some(e) = stalled() {
                        return Err(e);
                    }
                }
                // Readable or hung up: a whole record (written at once) or EOF is there.
                Ok(_) => return self.wait_exec(),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Wait for the child to exec (Ok(None)) or report a failure.
    pub fn wait_exec(&self) -> rustix::io::Result<Option<ChildError>> {
        let mut buf = [0u8; RECORD_LEN];
        let mut got = 0;
        while got < RECORD_LEN {
            match rustix::io::read(self.report.as_fd(), &mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        }
        match got {
            0 => Ok(None),
            RECORD_LEN => Ok(Some(ChildError::decode(&buf))),
            // A torn record: the child died mid-write; report what we know.
            _ => Ok(Some(ChildError { step: 0, index: 0, errno: Errno::IO.raw_os_error() })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let e = ChildError { step: Step::Exec as u32, index: 7, errno: 2 };
        assert_eq!(ChildError::decode(&e.encode()), e);
        assert_eq!(Step::from_raw(Step::Chdir as u32), Some(Step::Chdir));
        assert_eq!(Step::from_raw(0), None);
        // nsfast-init writes this step number itself.
        let init_src = include_str!("../init/main.rs");
        assert!(init_src.contains(&format!("const STEP_EXEC: u32 = {};", Step::Exec as u32)));
        assert!(init_src.contains(&format!("const STATUS_TAG: u32 = {STATUS_TAG:#x};")));
    }

    #[test]
    fn status_reports_are_parsed_strictly() {
        for status in [0, 1 << 8, 255 << 8, 6, 9, 15, 6 | 0x80, 64] {
            let rep = StatusReport { status };
            assert_eq!(StatusReport::decode(&rep.encode()), Some(rep), "{status:#x}");
        }
        let good = StatusReport { status: 9 }.encode();
        assert_eq!(StatusReport::decode(&good[..7]), None, "short");
        assert_eq!(StatusReport::decode(&[good.as_slice(), &[0]].concat()), None, "long");
        assert_eq!(StatusReport::decode(&[]), None, "empty");
        let mut bad_tag = good;
        bad_tag[0] ^= 1;
        assert_eq!(StatusReport::decode(&bad_tag), None, "tag");
        // Not statuses of an ended process: stopped (0x7f), continued (0xffff), signal 65+,
        // bits above the exit code, negative values.
        for status in [0x137f, 0xffff, 65, 0x7e, 1 << 16, -1, i32::MIN, 0x0109] {
            let raw = [STATUS_TAG.to_ne_bytes(), status.to_ne_bytes()].concat();
            assert_eq!(StatusReport::decode(&raw), None, "{status:#x}");
        }
    }

    #[test]
    fn status_reports_are_read_without_blocking() {
        use std::os::fd::AsFd;
        let (r, w) = status_pipe().unwrap();
        // Nothing written, the write end still open elsewhere: no report, no hang.
        assert_eq!(read_status_report(r.as_fd()), None);
        rustix::io::write(&w, &StatusReport { status: 15 }.encode()).unwrap();
        assert_eq!(read_status_report(r.as_fd()), Some(StatusReport { status: 15 }));
        // Two records (a forger's second write): neither is taken.
        let two = [StatusReport { status: 0 }.encode(), StatusReport { status: 0 }.encode()].concat();
        rustix::io::write(&w, &two).unwrap();
        assert_eq!(read_status_report(r.as_fd()), None);
        // Garbage of any length never panics.
        for n in 0..64usize {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            rustix::io::write(&w, &junk).unwrap();
            for _ in 0..=n / (STATUS_LEN + 1) + 1 {
                let _ = read_status_report(r.as_fd());
            }
        }
    }
}
