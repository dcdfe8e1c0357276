//! The Python binding layer (`nsfast._core`): the only module that knows pyo3.
//!
//! Arguments are extracted into plain Rust values first, then the blocking work runs with
//! the GIL released (`detached`). Errors are mapped in one place (`to_pyerr`) onto the
//! exception classes of `nsfast._errors`.

use std::os::fd::{IntoRawFd, OwnedFd};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::cgroup::{self, Backend, Cgroup, Limits};
use crate::error::Error;
use crate::spec::{Caller, Plan, Spec};

/// Run `f` with the GIL released: every blocking call of this module goes through here.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    py.detach(f)
}

/// The one mapping point from core errors to Python exceptions.
fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    let errors = match py.import("nsfast._errors") {
        Ok(m) => m,
        Err(e) => return e,
    };
    let built = match &err {
        Error::Invalid { field, msg } => errors.getattr("SpecError").and_then(|cls| cls.call1((*field, msg.as_str()))),
        Error::Limit { limit, msg } => {
            errors.getattr("LimitError").and_then(|cls| cls.call1((vec![(limit.as_str(), msg.as_str())],)))
        }
        Error::Spawn { step, filename, errno } => errors.getattr("SpawnError").and_then(|cls| {
            let code = errno.raw_os_error();
            let strerror = std::io::Error::from_raw_os_error(code).to_string();
            let strerror = strerror.split(" (os error").next().unwrap_or(&strerror).to_owned();
            cls.call1((code, strerror, filename.clone(), step.as_str()))
        }),
    };
    match built {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

fn bytes(v: PyBackedBytes) -> Vec<u8> {
    v.as_ref().to_vec()
}

/// The backend for `root`, made once per root and process.
fn backend_for(root: &str) -> Result<Arc<dyn Backend>, String> {
    static HIERARCHY: OnceLock<Option<cgroup::Hierarchy>> = OnceLock::new();
    static BACKENDS: OnceLock<Mutex<HashMap<String, Arc<dyn Backend>>>> = OnceLock::new();
    let map = BACKENDS.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = map.get(root) {
        return Ok(b.clone());
    }
    let hierarchy = HIERARCHY.get_or_init(cgroup::detect).as_ref().ok_or("no cgroup filesystem is mounted")?;
    let b: Arc<dyn Backend> = Arc::from(cgroup::backend(hierarchy, root).map_err(|e| e.to_string())?);
    map.insert(root.to_owned(), b.clone());
    Ok(b)
}

/// Prepare the cgroup backend for `root`: (version, roots, controllers, cpu usage
/// readable). Raises OSError saying why when sandboxes cannot get cgroups there.
#[pyfunction]
fn cgroup_backend(py: Python<'_>, root: String) -> PyResult<(u8, Vec<String>, Vec<String>, bool)> {
    let b = detached(py, move || backend_for(&root)).map_err(PyOSError::new_err)?;
    let roots = b.roots().iter().map(|p| p.display().to_string()).collect();
    Ok((b.version(), roots, b.controllers(), b.cpu_usage()))
}

/// Kill every process in, then remove, the cgroup directories `paths` of a sandbox this
/// process did not start, proven by the caller to be that sandbox's (`nsfast stop`).
#[pyfunction]
fn kill_cgroups(py: Python<'_>, paths: Vec<String>) -> PyResult<()> {
    let dirs: Vec<std::path::PathBuf> = paths.into_iter().map(Into::into).collect();
    detached(py, || cgroup::kill_and_remove(&dirs)).map_err(|e| PyOSError::new_err(e.to_string()))
}

/// Whether a root caller's sandboxes get the id range at SANDBOX_ID_BASE: its user
/// namespace has those ids (not so for root nested in a sandbox, whose sandboxes then map
/// their root to the caller, as a rootless caller's do).
#[pyfunction]
fn sandbox_id_range() -> bool {
    crate::spec::Caller::current().range
}

/// Return once nothing of nsfast's own mounts is left in this process: the overlays made
/// ahead for the next start (`crate::spare`) discarded, and those of sandboxes that ended,
/// whose teardown runs off the caller's path (`crate::reaper`), gone.
#[pyfunction]
fn settle(py: Python<'_>) {
    detached(py, || {
        crate::spare::clear();
        crate::reaper::flush();
    })
}

/// Keep `n` network namespaces made ahead for this process's sandboxes (`crate::netpool`;
/// 0: none). SpecError (field "netns_pool") when this caller cannot make them.
#[pyfunction]
fn set_netns_pool(py: Python<'_>, n: usize) -> PyResult<()> {
    use rustix::io::Errno;
    let max = crate::netpool::MAX_SIZE;
    detached(py, || crate::netpool::set_size(n)).map_err(|e| {
        let msg = match e {
            Errno::INVAL => format!("must be at most {max}, got {n}"),
            Errno::PERM => "needs CAP_SYS_ADMIN to make network namespaces (a root caller): \
                            a rootless caller's sandboxes make theirs in their own user namespace"
                .to_owned(),
            Errno::NOTSUP => "cannot be changed in a forked child of a process that has a pool".to_owned(),
            e => format!("cannot make a network namespace: {e}"),
        };
        to_pyerr(py, Error::invalid("netns_pool", msg))
    })
}

/// The size `set_netns_pool` set (0: no pool).
#[pyfunction]
fn netns_pool() -> usize {
    crate::netpool::size()
}

/// This process's mounts: (mount point, file system type), in mountinfo's order; read
/// again only when the kernel says the table changed (`spec::mount_table`).
#[pyfunction]
fn mounts() -> Vec<(std::ffi::OsString, String)> {
    use std::os::unix::ffi::OsStrExt;
    let table = crate::spec::mount_table().unwrap_or_default();
    table.iter().map(|(p, t)| (std::ffi::OsStr::from_bytes(p).into(), t.clone())).collect()
}

/// The own cgroup v2 path of this process (for rootless delegation), if any.
#[pyfunction]
fn own_cgroup() -> Option<String> {
    cgroup::own_v2_path()
}

// ---------------------------------------------------------------------------------------
// Reading a frozen nsfast.Spec (the `from_py_with` helpers of spec.rs' derives)

/// A path as `os.fsencode` gives it: str (surrogateescape) or bytes.
pub(crate) fn fs_bytes(ob: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    if let Ok(b) = ob.cast::<pyo3::types::PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    Ok(ob.extract::<std::ffi::OsString>()?.into_vec())
}

pub(crate) fn opt_fs_bytes(ob: &Bound<'_, PyAny>) -> PyResult<Option<Vec<u8>>> {
    if ob.is_none() {
        Ok(None)
    } else {
        fs_bytes(ob).map(Some)
    }
}

pub(crate) fn fs_bytes_list(ob: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u8>>> {
    ob.try_iter()?.map(|item| fs_bytes(&item?)).collect()
}

pub(crate) fn opt_utf8(ob: &Bound<'_, PyAny>) -> PyResult<Option<Vec<u8>>> {
    Ok(ob.extract::<Option<String>>()?.map(String::into_bytes))
}

/// `Spec._env_items` ((key, value) pairs) as `KEY=VALUE` entries.
pub(crate) fn env_entries(ob: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for item in ob.try_iter()? {
        let item = item?;
        let (k, v) = (item.get_item(0)?, item.get_item(1)?);
        let mut kv = fs_bytes(&k)?;
        kv.push(b'=');
        kv.extend(fs_bytes(&v)?);
        out.push(kv);
    }
    Ok(out)
}

pub(crate) fn namespace_flags(ob: &Bound<'_, PyAny>) -> PyResult<u64> {
    let names: Vec<String> = ob.extract()?;
    crate::ns::flags(names.iter().map(String::as_str))
        .map_err(|n| PyValueError::new_err(format!("namespaces: unknown namespace {n:?}")))
}

/// The CPU-time limits of a Spec's `limits` (an nsfast.Limits).
#[derive(FromPyObject, Default, Clone, Copy)]
struct CpuTimeLimits {
    cpu_time: Option<f64>,
    cpu_time_soft: Option<f64>,
}

// ---------------------------------------------------------------------------------------
// The sandbox object

/// Why a run ended (BenchExec's `terminationreason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Termination {
    Exit,
    Signal,
    Timeout,
    CpuTime,
    Memory,
}

impl Termination {
    fn name(self) -> &'static str {
        match self {
            Termination::Exit => "exit",
            Termination::Signal => "signal",
            Termination::Timeout => "timeout",
            Termination::CpuTime => "cpu_time",
            Termination::Memory => "memory",
        }
    }

    fn parse(s: &str) -> PyResult<Termination> {
        match s {
            "timeout" => Ok(Termination::Timeout),
            "cpu_time" => Ok(Termination::CpuTime),
            "memory" => Ok(Termination::Memory),
            _ => Err(PyValueError::new_err(format!("reason must be 'timeout', 'cpu_time' or 'memory', not {s:?}"))),
        }
    }
}

/// How a sandbox ended and what it cost, recorded once, when it is reaped.
#[pyclass(module = "nsfast._core", name = "Exit", frozen, get_all)]
#[derive(Clone, Debug)]
struct Exit {
    /// As subprocess gives it: the exit code, or -N for death by signal N.
    returncode: i32,
    /// The raw wait status (of the command: nsfast-init reports its child's).
    status: i32,
    wall_s: f64,
    cpu_user_s: Option<f64>,
    cpu_system_s: Option<f64>,
    memory_peak_bytes: Option<u64>,
    pids_peak: Option<u64>,
    oom_killed: bool,
    /// "exit", "signal", "timeout", "cpu_time" or "memory".
    termination: &'static str,
    /// Why the sandbox's cgroup could not be removed, if it could not (the run's result
    /// stands; the cgroup is retried when the sandbox object goes).
    cleanup_error: Option<String>,
}

struct Inner {
    cgroup: Option<Box<dyn Cgroup>>,
    /// nsfast-init's status report (read once, when it is reaped).
    report: Option<std::os::fd::OwnedFd>,
    exit: Option<Exit>,
    /// Set by kill(reason) or the CPU-time watcher before the kill.
    reason: Option<Termination>,
    detached: bool,
    /// nsfast's own mounts for the sandbox (`Child::held`), closed off-thread once reaped.
    held: Vec<std::os::fd::OwnedFd>,
}

/// What a Sandbox and its CPU-time watcher share.
struct Core {
    pid: i32,
    pidfd: std::os::fd::OwnedFd,
    /// No pid namespace: the first process's exit does not end the others; kill them.
    kill_leftovers: bool,
    /// No pid namespace and a session of its own: kill() also kills its process group.
    kill_group: bool,
    /// The status report comes from another process (a zygote), which writes it only once
    /// it has reaped the command: wait for it (bounded) rather than read what is there.
    await_report: bool,
    started: std::time::Instant,
    inner: Mutex<Inner>,
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl Core {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait up to `slice` for the first process to exit; if it did, reap it, end what it
    /// left behind, read the usage, remove the cgroup, and record all that.
    fn wait_slice(&self, slice: Duration) -> std::io::Result<Option<Exit>> {
        if let Some(e) = &self.lock().exit {
            return Ok(Some(e.clone()));
        }
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let ts = Timespec { tv_sec: slice.as_secs() as i64, tv_nsec: slice.subsec_nanos() as i64 };
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        self.reap()
    }

    /// Reap the first process if it has exited (non-blocking) and record the outcome.
    fn reap(&self) -> std::io::Result<Option<Exit>> {
        let mut inner = self.lock();
        if let Some(e) = &inner.exit {
            return Ok(Some(e.clone()));
        }
        use std::os::fd::AsFd;
        let (status, ru) = match crate::sys::waitid_pidfd_nohang(self.pidfd.as_fd()) {
            Ok(Some(done)) => done,
            Ok(None) => return Ok(None),
            // Reaped by someone else (SIGCHLD ignored, a foreign waitpid(-1)): it is dead, its
            // status lost, as Popen takes it (0); nsfast-init's report, if any, still tells.
            // SAFETY: rusage is plain data; all-zero is a valid value.
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => (0, unsafe { std::mem::zeroed() }),
            Err(e) => return Err(e),
        };
        // The command's own status, if nsfast-init reported one before it exited.
        let status = match (&inner.report, self.await_report) {
            (Some(r), true) => {
                use rustix::event::{poll, PollFd, PollFlags, Timespec};
                let mut fds = [PollFd::new(r, PollFlags::IN)];
                let _ = poll(&mut fds, Some(&Timespec { tv_sec: 5, tv_nsec: 0 }));
                // No report (the zygote died first): the command was killed with it.
                crate::sync::read_status_report(r.as_fd()).map_or(libc::SIGKILL, |rep| rep.status)
            }
            (r, _) => crate::spawn::command_status(status, r.as_ref().map(|f| f.as_fd())),
        };
        inner.report = None;
        let wall_s = self.started.elapsed().as_secs_f64();
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let (mut cpu_user_s, mut cpu_system_s) = (Some(tv(ru.ru_utime)), Some(tv(ru.ru_stime)));
        let (mut memory_peak_bytes, mut pids_peak, mut oom_killed) = (None, None, false);
        let mut cleanup_error = None;
        if let Some(mut cg) = inner.cgroup.take() {
            if self.kill_leftovers {
                let _ = cg.kill();
            }
            let u = cg.usage();
            cpu_user_s = u.cpu_user_ns.map(secs).or(cpu_user_s);
            cpu_system_s = u.cpu_system_ns.map(secs).or(cpu_system_s);
            memory_peak_bytes = u.memory_peak.or(memory_peak_bytes);
            pids_peak = u.pids_peak;
            oom_killed = u.oom_kills > 0;
            if let Err(e) = cg.remove() {
                cleanup_error = Some(e.to_string());
                inner.cgroup = Some(cg); // retried on drop
            }
        }
        let signal = if libc::WIFSIGNALED(status) { Some(libc::WTERMSIG(status)) } else { None };
        let returncode = match signal {
            Some(sig) => -sig,
            None => libc::WEXITSTATUS(status),
        };
        // A process the kernel OOM-killed is the run's memory limit, whatever became of the
        // command (a shell whose child was killed exits 0): BenchExec's terminationreason
        // says "memory" then too.
        let termination = match (inner.reason, signal) {
            (Some(r), _) => r,
            (None, _) if oom_killed => Termination::Memory,
            (None, Some(_)) => Termination::Signal,
            (None, None) => Termination::Exit,
        };
        let exit = Exit {
            returncode,
            status,
            wall_s,
            cpu_user_s,
            cpu_system_s,
            memory_peak_bytes,
            pids_peak,
            oom_killed,
            termination: termination.name(),
            cleanup_error,
        };
        inner.exit = Some(exit.clone());
        crate::reaper::drop_later(std::mem::take(&mut inner.held));
        Ok(Some(exit))
    }

    /// Kill the whole sandbox (its cgroup, its first process, and without a pid namespace
    /// its process group), unless it was reaped already; `reason` is recorded first.
    fn kill(&self, reason: Option<Termination>) -> Result<(), cgroup::CgroupError> {
        let mut inner = self.lock();
        if inner.exit.is_some() {
            return Ok(());
        }
        if inner.reason.is_none() {
            inner.reason = reason;
        }
        let res = inner.cgroup.as_ref().map_or(Ok(()), |cg| cg.kill());
        // Not reaped (we hold the lock reap takes), so neither pid nor process group id
        // can have been reused.
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
        if self.kill_group {
            if let Some(pgid) = rustix::process::Pid::from_raw(self.pid) {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
        }
        res
    }

    fn send_signal(&self, sig: i32) -> PyResult<()> {
        let inner = self.lock();
        if inner.exit.is_some() {
            return Ok(());
        }
        // SAFETY: not a safety matter: a raw signal number the kernel validates.
        let signal = unsafe { rustix::process::Signal::from_raw_unchecked(sig) };
        match rustix::process::pidfd_send_signal(&self.pidfd, signal) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(PyOSError::new_err((e.raw_os_error(), e.to_string()))),
        }
    }

    /// The CPU-time watcher: kill the sandbox once its processes together used `hard`
    /// seconds of CPU (SIGTERM to its first process at `soft`). Polls the cgroup's CPU
    /// usage, sleeping for the least time the rest of the budget can take on every CPU.
    fn watch_cpu(&self, limits: CpuTimeLimits) {
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut soft_sent = false;
        loop {
            let used = {
                let inner = self.lock();
                match (&inner.exit, inner.detached, &inner.cgroup) {
                    (None, false, Some(cg)) => {
                        let u = cg.usage();
                        secs(u.cpu_user_ns.unwrap_or(0)) + secs(u.cpu_system_ns.unwrap_or(0))
                    }
                    _ => return,
                }
            };
            if let (Some(s), false) = (limits.cpu_time_soft, soft_sent) {
                if used >= s {
                    soft_sent = true;
                    let mut inner = self.lock();
                    if inner.exit.is_none() {
                        inner.reason.get_or_insert(Termination::CpuTime);
                        let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::TERM);
                    }
                }
            }
            if let Some(h) = limits.cpu_time {
                if used >= h {
                    let _ = self.kill(Some(Termination::CpuTime));
                    return;
                }
            }
            let next = if soft_sent { limits.cpu_time } else { limits.cpu_time_soft.or(limits.cpu_time) };
            let Some(next) = next else { return };
            let sleep = Duration::from_secs_f64(((next - used) / ncpu).clamp(0.005, 0.5));
            use rustix::event::{poll, PollFd, PollFlags, Timespec};
            let ts = Timespec { tv_sec: sleep.as_secs() as i64, tv_nsec: sleep.subsec_nanos() as i64 };
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            if let Ok(n) = poll(&mut fds, Some(&ts)) {
                if n > 0 {
                    return; // exited: the reaper measures
                }
            }
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        if inner.detached {
            return;
        }
        if inner.exit.is_none() {
            // Nobody waited: end it, and reap it (bounded) so that no zombie stays.
            if let Some(cg) = &inner.cgroup {
                let _ = cg.kill();
            }
            let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while std::time::Instant::now() < deadline {
                match crate::sys::waitid_pidfd_nohang(std::os::fd::AsFd::as_fd(&self.pidfd)) {
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                    _ => break,
                }
            }
        }
        if let Some(mut cg) = inner.cgroup.take() {
            let _ = cg.kill();
            let _ = cg.remove();
        }
    }
}

/// A running sandbox: owns its first process's pidfd, its cgroup and, once reaped, its
/// recorded `Exit`. `wait` reaps, ends leftovers, measures and removes the cgroup in one
/// GIL-free call. Dropped unwaited, it kills and reaps its sandbox.
#[pyclass(module = "nsfast._core", name = "Sandbox", frozen)]
struct Sandbox {
    core: Arc<Core>,
    cgroup_version: Option<u8>,
    /// The host id its root is (a root caller's range; None: the caller's own ids).
    id_base: Option<u32>,
    /// The roots of the writable trees asked for at spawn (`spawn(trees=)`), until taken.
    trees: Mutex<Vec<OwnedFd>>,
}

impl Sandbox {
    fn new(
        child: crate::Child,
        cg: Option<Box<dyn Cgroup>>,
        started: std::time::Instant,
        pid_namespace: bool,
        new_session: bool,
        cpu: CpuTimeLimits,
        await_report: bool,
    ) -> PyResult<Sandbox> {
        Sandbox::with_group(child, cg, started, pid_namespace, !pid_namespace && new_session, cpu, await_report)
    }

    /// As `new`; `kill_group`: kill() also kills the first process's process group (a
    /// session of its own, set up before exec).
    fn with_group(
        child: crate::Child,
        cg: Option<Box<dyn Cgroup>>,
        started: std::time::Instant,
        pid_namespace: bool,
        kill_group: bool,
        cpu: CpuTimeLimits,
        await_report: bool,
    ) -> PyResult<Sandbox> {
        let cgroup_version = cg.as_ref().map(|c| c.version());
        let trees = Mutex::new(child.trees);
        let watch = cg.is_some() && (cpu.cpu_time.is_some() || cpu.cpu_time_soft.is_some());
        let core = Arc::new(Core {
            pid: child.pid,
            pidfd: child.pidfd,
            kill_leftovers: !pid_namespace,
            kill_group,
            await_report,
            started,
            inner: Mutex::new(Inner {
                cgroup: cg,
                report: child.status,
                exit: None,
                reason: None,
                detached: false,
                held: child.held,
            }),
        });
        if watch {
            let c = core.clone();
            let started = std::thread::Builder::new().name("nsfast-cpu-time".into()).spawn(move || c.watch_cpu(cpu));
            if let Err(e) = started {
                // No watcher, no CPU-time limit: end the sandbox (Core's drop reaps it) rather
                // than let it run unbounded.
                let _ = core.kill(None);
                return Err(PyOSError::new_err(format!("cannot start the CPU-time watcher thread: {e}")));
            }
        }
        Ok(Sandbox { core, cgroup_version, id_base: None, trees })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Gone unwaited and not detached: end the sandbox now, even while a CPU-time watcher
        // still holds the Core (which reaps and cleans up when the last holder lets go).
        let detached = self.core.lock().detached;
        if !detached {
            let _ = self.core.kill(None);
        }
    }
}

#[pymethods]
impl Sandbox {
    /// The host pid of the sandbox's first process.
    #[getter]
    fn pid(&self) -> i32 {
        self.core.pid
    }

    /// The pidfd of the first process (readable once it exited); valid while this object lives.
    fn fileno(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.core.pidfd.as_raw_fd()
    }

    /// The O_PATH fds of the writable trees asked for at spawn, in that order; the caller
    /// owns them from here (a second call returns []).
    fn take_trees(&self) -> Vec<i32> {
        let mut trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *trees).into_iter().map(|fd| fd.into_raw_fd()).collect()
    }

    /// 1 or 2 for the version of the sandbox's cgroup; None without one.
    #[getter]
    fn cgroup_version(&self) -> Option<u8> {
        self.cgroup_version
    }

    /// The host id the sandbox's root is (inside ids 0.. map to it and on; a root caller's
    /// sandbox), None where its ids are the caller's own.
    #[getter]
    fn id_base(&self) -> Option<u32> {
        self.id_base
    }

    /// The recorded Exit, None while not reaped.
    #[getter]
    fn exit(&self) -> Option<Exit> {
        self.core.lock().exit.clone()
    }

    /// Wait up to `timeout` seconds (forever if None) for the first process to exit, then
    /// reap, clean up and return the Exit; None on timeout. Runs GIL-free in 50 ms slices
    /// between which Python's signal handlers run (Ctrl-C raises at once; nothing reaped
    /// is lost: the Exit is recorded before this returns).
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Exit>> {
        let timeout = match timeout {
            Some(t) if !t.is_finite() || t < 0.0 => {
                return Err(PyValueError::new_err("timeout must be a finite number >= 0"))
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        const SLICE: Duration = Duration::from_millis(50);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let core = &self.core;
        loop {
            let slice = deadline.map_or(SLICE, |d| d.saturating_duration_since(std::time::Instant::now()).min(SLICE));
            match detached(py, || core.wait_slice(slice)) {
                Ok(Some(exit)) => return Ok(Some(exit)),
                Ok(None) if deadline.is_some_and(|d| std::time::Instant::now() >= d) => return Ok(None),
                Ok(None) => py.check_signals()?,
                Err(e) => return Err(PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string()))),
            }
        }
    }

    /// Reap if exited (never blocks); the Exit or None.
    fn poll(&self, py: Python<'_>) -> PyResult<Option<Exit>> {
        detached(py, || self.core.reap())
            .map_err(|e| PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string())))
    }

    /// Send `sig` to the first process (nothing once it was reaped).
    fn send_signal(&self, sig: i32) -> PyResult<()> {
        self.core.send_signal(sig)
    }

    /// Kill the whole sandbox; `reason` ("timeout", "cpu_time", "memory") becomes the
    /// Exit's termination.
    #[pyo3(signature = (reason=None))]
    fn kill(&self, py: Python<'_>, reason: Option<&str>) -> PyResult<()> {
        let reason = reason.map(Termination::parse).transpose()?;
        detached(py, || self.core.kill(reason)).map_err(|e| PyOSError::new_err(e.to_string()))
    }

    /// Let the sandbox outlive this object: its cgroup stays (its paths are returned) and
    /// nothing is killed when this object goes.
    fn detach(&self) -> Vec<String> {
        let mut inner = self.core.lock();
        inner.detached = true;
        inner.cgroup.take().map(|cg| cg.paths().iter().map(|p| p.display().to_string()).collect()).unwrap_or_default()
    }

    /// The sandbox's cgroup directories (empty without a cgroup or once removed).
    fn cgroup_paths(&self) -> Vec<String> {
        let inner = self.core.lock();
        inner.cgroup.as_ref().map(|cg| cg.paths().iter().map(|p| p.display().to_string()).collect()).unwrap_or_default()
    }
}

/// Where and with which CPU-time limits a sandbox's cgroup is made: the rest of an
/// `nsfast._cgroup.CgroupRequest` (its limits are a `cgroup::Limits`).
#[derive(FromPyObject)]
struct CgroupRequest {
    root: String,
    kill_tree: bool,
    cpu_time: Option<f64>,
    cpu_time_soft: Option<f64>,
}

/// The sandbox's cgroup as `cgroup` (None: no cgroup) asks; a value the kernel refuses is a
/// LimitError naming the file.
fn create_cgroup(cgroup: Option<(CgroupRequest, Limits)>) -> Result<Option<Box<dyn Cgroup>>, Error> {
    let Some((CgroupRequest { root, kill_tree, .. }, limits)) = cgroup else { return Ok(None) };
    let cg_err = |msg: String| Error::Spawn {
        step: "create cgroup".into(),
        filename: Some(msg),
        errno: rustix::io::Errno::NOTSUP,
    };
    let backend = backend_for(&root).map_err(cg_err)?;
    backend.create(&cgroup::unique_name(), &limits, kill_tree).map(Some).map_err(|e| match e {
        // A value the kernel refused: the limit is what was wrong, not the setup.
        cgroup::CgroupError::Write { path, value, source } if source.raw_os_error() != Some(libc::ENOENT) => {
            let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let msg = format!("the kernel refused {value:?} for {} ({source})", path.display());
            Error::Limit { limit: format!("cgroup file {file}"), msg }
        }
        // mkdir and friends: their own errno and the path (EACCES: a root this caller may
        // not create cgroups in), not a generic "not supported".
        cgroup::CgroupError::Io { op, path, source } => Error::spawn(
            format!("create cgroup ({op})"),
            Some(path.display().to_string()),
            crate::spawn::errno_of(&source),
        ),
        e => cg_err(e.to_string()),
    })
}

/// The `cgroup=` argument (an nsfast._cgroup.CgroupRequest or None): the request and limits,
/// and the CPU-time limits its watcher enforces.
fn cgroup_arg(cgroup: Option<&Bound<'_, PyAny>>) -> PyResult<(Option<(CgroupRequest, Limits)>, CpuTimeLimits)> {
    let cgroup: Option<(CgroupRequest, Limits)> = match cgroup {
        Some(c) if !c.is_none() => Some((c.extract()?, c.extract()?)),
        _ => None,
    };
    let cpu = cgroup.as_ref().map_or(CpuTimeLimits::default(), |(r, _)| CpuTimeLimits {
        cpu_time: r.cpu_time,
        cpu_time_soft: r.cpu_time_soft,
    });
    Ok((cgroup, cpu))
}

/// `start` a sandbox in `cg`; the cgroup goes with it, or is removed if the start failed.
fn started_in<T>(
    mut cg: Option<Box<dyn Cgroup>>,
    start: impl FnOnce(Option<&dyn Cgroup>) -> Result<T, Error>,
) -> Result<(T, Option<Box<dyn Cgroup>>), Error> {
    match start(cg.as_deref()) {
        Ok(child) => Ok((child, cg)),
        Err(e) => {
            if let Some(c) = cg.as_mut() {
                let _ = c.remove();
            }
            Err(e)
        }
    }
}

/// Start a sandbox as the frozen nsfast.Spec `spec` says, running `args`; returns its Sandbox.
/// `chown`: fds (the caller's pipes for its stdio) to give to the sandbox's user (its
/// `uid`/`gid` inside) where it is a root caller's, whose host ids are the sandbox's own
/// range: so that it may reopen them (/dev/stdout).
#[pyfunction]
#[pyo3(signature = (spec, args, *, stdio, pass_fds, cgroup=None, trees=vec![], chown=vec![]))]
#[allow(clippy::too_many_arguments)]
fn spawn(
    py: Python<'_>,
    spec: &Bound<'_, PyAny>,
    args: Vec<PyBackedBytes>,
    stdio: (i32, i32, i32),
    pass_fds: Vec<i32>,
    cgroup: Option<&Bound<'_, PyAny>>,
    trees: Vec<PyBackedBytes>,
    chown: Vec<i32>,
) -> PyResult<Sandbox> {
    let trees = trees
        .iter()
        .map(|t| std::ffi::CString::new(t.to_vec()).map_err(|_| PyValueError::new_err("trees: NUL in a path")))
        .collect::<PyResult<Vec<_>>>()?;
    let mut core_spec: Spec = spec.extract()?;
    core_spec.args = args.into_iter().map(bytes).collect();
    let (cgroup, cpu) = cgroup_arg(cgroup)?;
    // CPU-time limits the cgroup cannot enforce (no cgroup, no readable CPU usage; the
    // Python layer refused them unless strict=False): each process's RLIMIT_CPU instead.
    let limits = spec.getattr("limits")?;
    let asked: CpuTimeLimits = if limits.is_none() { CpuTimeLimits::default() } else { limits.extract()? };
    let unwatched = cpu.cpu_time.is_none() && cpu.cpu_time_soft.is_none();
    if unwatched && (asked.cpu_time.is_some() || asked.cpu_time_soft.is_some()) {
        let hard = asked.cpu_time.map_or(u64::MAX, |h| h.ceil() as u64);
        let soft = asked.cpu_time_soft.map_or(hard, |s| s.ceil() as u64).min(hard);
        if !core_spec.rlimits.iter().any(|r| r.0 == libc::RLIMIT_CPU) {
            core_spec.rlimits.push((libc::RLIMIT_CPU, soft, hard));
        }
    }
    let pid_namespace = core_spec.namespaces & (libc::CLONE_NEWPID as u64) != 0;
    let new_session = core_spec.new_session;
    let io_stdio = [stdio.0, stdio.1, stdio.2];
    let started = std::time::Instant::now();
    let result = detached(py, move || -> Result<_, Error> {
        let plan = Plan::build(&core_spec, Caller::current())?;
        if let Some(base) = plan.id_base {
            let ids = (base + core_spec.uid.unwrap_or(0), base + core_spec.gid.unwrap_or(0));
            for &fd in &chown {
                // SAFETY: the caller's fd, open for this call.
                let fd = unsafe { crate::sys::borrow_fd(fd) };
                let (uid, gid) = (rustix::fs::Uid::from_raw(ids.0), rustix::fs::Gid::from_raw(ids.1));
                rustix::fs::fchown(fd, Some(uid), Some(gid))
                    .map_err(|e| Error::spawn("chown the stdio pipes", None, e))?;
            }
        }
        let id_base = plan.id_base;
        let mut cg = create_cgroup(cgroup)?;
        // Before the child exists: it is born owning its cgroup (never its limit files).
        if let Some((uid, gid)) = plan.delegate {
            let res = match cg.as_ref() {
                Some(c) => c.delegate(uid, gid),
                None => Err(cgroup::CgroupError::Unavailable("delegate_cgroup needs cgroup=True".into())),
            };
            if let Err(e) = res {
                if let Some(c) = cg.as_mut() {
                    let _ = c.remove();
                }
                return Err(Error::Limit { limit: "delegate_cgroup".into(), msg: e.to_string() });
            }
        }
        started_in(cg, |cg| {
            crate::spawn::spawn(&plan, &crate::Io { stdio: io_stdio, pass_fds: &pass_fds, cgroup: cg, trees: &trees })
        })
        .map(|(child, cg)| (child, cg, id_base))
    });
    match result {
        Ok((child, cg, id_base)) => {
            let mut sandbox = Sandbox::new(child, cg, started, pid_namespace, new_session, cpu, false)?;
            sandbox.id_base = id_base;
            Ok(sandbox)
        }
        Err(e) => Err(to_pyerr(py, e)),
    }
}

/// Namespace type -> inode of process `pid` ("self" or a number).
#[pyfunction]
fn namespaces<'py>(py: Python<'py>, pid: &str) -> PyResult<Bound<'py, PyDict>> {
    let map = crate::ns::inodes(pid).map_err(|e| {
        let code = e.raw_os_error().unwrap_or(0);
        let msg = std::io::Error::from_raw_os_error(code).to_string();
        // OSError(errno, ...) picks the subclass: FileNotFoundError for a gone pid.
        PyOSError::new_err((code, msg, format!("/proc/{pid}/ns")))
    })?;
    let d = PyDict::new(py);
    for (k, v) in map {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// Start a process inside a running sandbox or process; returns its Sandbox.
///
/// `spec` gives the process's env, uid/gid, capabilities and die_with_parent. `target` is a
/// pid: the namespaces of types `join`, root and (`cwd` None) working directory of that
/// process are opened now (`nsenter -t PID`); `join_cgroup` also joins its cgroups. Or
/// `held` is what a container held since its start (`ns_fds` [(type, fd)], `root_fd`,
/// `closed`, `sandbox` (its Sandbox), `seccomp`, `nproc`); then the process runs in a new
/// cgroup below the container's (with `join_cgroup`), which its Sandbox owns.
#[pyfunction]
#[pyo3(signature = (spec, args, *, target, join, cwd, stdio, pass_fds, join_cgroup, held=None, pin=None))]
#[allow(clippy::too_many_arguments)]
fn spawn_join(
    py: Python<'_>,
    spec: &Bound<'_, PyAny>,
    args: Vec<PyBackedBytes>,
    target: i32,
    join: Vec<String>,
    cwd: Option<PyBackedBytes>,
    stdio: (i32, i32, i32),
    pass_fds: Vec<i32>,
    join_cgroup: bool,
    held: Option<&Bound<'_, PyAny>>,
    pin: Option<i32>,
) -> PyResult<Sandbox> {
    use crate::exec::{Cwd, Target};
    use std::sync::atomic::{AtomicU64, Ordering};
    static EXECS: AtomicU64 = AtomicU64::new(0);
    let ns_flags = crate::ns::flags(join.iter().map(String::as_str))
        .map_err(|n| to_pyerr(py, Error::invalid("namespaces", format!("has an unknown namespace {n:?}"))))?;
    let pid = target;
    let from: Spec = spec.extract()?;
    let mut spec = Spec::new(args.into_iter().map(bytes).collect());
    spec.env = from.env;
    let use_cwd_fd = cwd.is_none();
    spec.cwd = cwd.map(bytes).unwrap_or_else(|| b"/".to_vec());
    spec.namespaces = 0;
    spec.uid = from.uid;
    spec.gid = from.gid;
    spec.keep_caps = from.keep_caps;
    spec.new_session = true;
    spec.die_with_parent = from.die_with_parent;
    spec.rlimits = from.rlimits;
    // The caller's filter (enter(seccomp=), the default's unless turned off); a container's
    // own below. A process that joins a hostile sandbox's namespaces without it is one the
    // sandbox can ptrace once it exec'd (same user namespace, same uid): an unfiltered
    // process for it to drive.
    spec.seccomp = from.seccomp;
    let pid_namespace = ns_flags & (libc::CLONE_NEWPID as u64) != 0;
    // A container's held fds are duplicated here, with the GIL held: a concurrent stop()
    // (which sets `closed` before closing them) cannot close them under this exec.
    let held = held.filter(|h| !h.is_none());
    // The container's RLIMIT_NPROC (counted in its user namespace), which its execs share;
    // else the spec's (enter's `_nproc`: the CLI's exec gives a container's).
    let mut nproc: Option<u64> = from.nproc;
    let mut held_fds = None;
    let mut container: Option<PyRef<'_, Sandbox>> = None;
    if let Some(h) = &held {
        let gone =
            |e: rustix::io::Errno| to_pyerr(py, Error::spawn("join namespaces", Some(format!("container {pid}")), e));
        if h.getattr("closed")?.extract::<bool>()? {
            return Err(gone(rustix::io::Errno::SRCH));
        }
        // SAFETY: the container's held fds stay open while `closed` is false (checked above,
        // with the GIL held, which stop() needs to close them).
        let dup = |fd: i32| rustix::io::fcntl_dupfd_cloexec(unsafe { crate::sys::borrow_fd(fd) }, 3).map_err(gone);
        let mut ns = Vec::new();
        for (name, fd) in h.getattr("ns_fds")?.extract::<Vec<(String, i32)>>()? {
            let flag =
                crate::ns::flag(&name).ok_or_else(|| PyValueError::new_err(format!("unknown namespace {name:?}")))?;
            ns.push((flag, dup(fd)?));
        }
        held_fds = Some((ns, dup(h.getattr("root_fd")?.extract::<i32>()?)?));
        spec.seccomp = h.getattr("seccomp")?.extract()?;
        nproc = h.getattr("nproc")?.extract()?;
        container = h.getattr("sandbox")?.extract()?;
    }
    let container_core: Option<Arc<Core>> = container.as_ref().map(|c| c.core.clone());
    let io_stdio = [stdio.0, stdio.1, stdio.2];
    let started = std::time::Instant::now();
    let result = detached(py, move || -> Result<_, Error> {
        let mut plan = Plan::build(&spec, Caller::current())?;
        plan.nproc = nproc;
        let cg_err =
            |e: cgroup::CgroupError| Error::spawn("join cgroup", Some(e.to_string()), rustix::io::Errno::NOTSUP);
        let (target, cg): (Target, Option<Box<dyn Cgroup>>) = match held_fds {
            Some((ns, root)) => {
                let cg = match container_core.filter(|_| join_cgroup) {
                    Some(c) => {
                        // Not a name the sandbox could guess and make first (a delegated
                        // cgroup is its own to mkdir in): every exec would fail.
                        let mut salt = [0u8; 8];
                        let _ = rustix::rand::getrandom(&mut salt, rustix::rand::GetRandomFlags::empty());
                        let n = EXECS.fetch_add(1, Ordering::Relaxed);
                        let name = format!("exec-{n}-{:016x}", u64::from_ne_bytes(salt));
                        let inner = c.lock();
                        inner.cgroup.as_ref().map(|c| c.exec_child(&name)).transpose().map_err(cg_err)?
                    }
                    None => None,
                };
                (Target { ns, root, cwd: Cwd::Path(plan.cwd.clone()) }, cg)
            }
            None => {
                let t = Target::of_process(pid, ns_flags, (!use_cwd_fd).then(|| plan.cwd.clone()))?;
                let cg: Option<Box<dyn Cgroup>> = if join_cgroup {
                    let h = cgroup::detect().ok_or_else(|| {
                        Error::spawn("join cgroup", Some("no cgroup filesystem".into()), rustix::io::Errno::NOTSUP)
                    })?;
                    Some(Box::new(cgroup::Existing::of_process(pid, &h).map_err(cg_err)?))
                } else {
                    None
                };
                // `pin`, a pidfd of the process opened before the caller checked who it is:
                // still running now, so what was opened by its pid above was its, not that of
                // a process that reused the pid since.
                if let Some(pin) = pin {
                    use rustix::event::{poll, PollFd, PollFlags, Timespec};
                    // SAFETY: the caller keeps `pin` open across this call (enter's contract).
                    let mut fds = [PollFd::from_borrowed_fd(unsafe { crate::sys::borrow_fd(pin) }, PollFlags::IN)];
                    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
                    if poll(&mut fds, Some(&zero)).map_err(|e| Error::spawn("join namespaces", None, e))? != 0 {
                        let gone = format!("process {pid} exited");
                        return Err(Error::spawn("join namespaces", Some(gone), rustix::io::Errno::SRCH));
                    }
                }
                (t, cg)
            }
        };
        started_in(cg, |cg| {
            crate::exec::spawn_join(
                &plan,
                &crate::Io { stdio: io_stdio, pass_fds: &pass_fds, cgroup: cg, trees: &[] },
                &target,
            )
        })
    });
    match result {
        // An exec's process is not its pid namespace's init: what it leaves behind keeps
        // running in the container (docker exec), unless killed.
        // Killed (a timeout, kill()), its session goes with it: what it started and left in
        // its process group (a shell's jobs), which would otherwise outlive it in the
        // container. (Container.exec's own cgroup takes the rest.)
        Ok((child, cg)) => {
            Sandbox::with_group(child, cg, started, pid_namespace, true, CpuTimeLimits::default(), false)
        }
        Err(e) => Err(to_pyerr(py, e)),
    }
}

// ---------------------------------------------------------------------------------------
// Zygotes (zygote.rs): the server inside the zygote, the link to it in the caller

fn fork_before() {
    // SAFETY: called with the GIL held, right before fork(3), as os.fork does.
    unsafe { pyo3::ffi::PyOS_BeforeFork() }
}
fn fork_parent() {
    // SAFETY: the zygote after fork(3), GIL held, as os.fork does.
    unsafe { pyo3::ffi::PyOS_AfterFork_Parent() }
}
fn fork_child() {
    // SAFETY: the task right after fork(3), GIL held (our one thread), as os.fork does.
    unsafe { pyo3::ffi::PyOS_AfterFork_Child() }
}

/// Inside a zygote: serve task requests on `ctrl_fd` with the GIL held (the zygote is one
/// thread, and nothing of it may run while it forks). Returns False once the caller closed
/// the socket; True in a task, with its result pipe on fd 3 and its payload memfd on fd 4,
/// ready to run the task's code (capabilities dropped, seccomp installed).
#[pyfunction]
#[pyo3(signature = (ctrl_fd, spec, *, scoped=false, scratch=vec![], sealed=vec![], cgroups=None))]
fn zygote_serve(
    py: Python<'_>,
    ctrl_fd: i32,
    spec: &Bound<'_, PyAny>,
    scoped: bool,
    scratch: Vec<(PyBackedBytes, Option<u64>, String)>,
    sealed: Vec<PyBackedBytes>,
    cgroups: Option<Hierarchies>,
) -> PyResult<bool> {
    let _ = py;
    let mut task: Spec = spec.extract()?;
    // The zygote's own mounts, root and user namespace are the task's already.
    task.args = vec![b"python".to_vec()];
    task.namespaces &= !(libc::CLONE_NEWUSER as u64);
    task.rootfs = None;
    task.mounts = Vec::new();
    task.init = false;
    task.delegate_cgroup = false;
    let plan = Plan::build(&task, Caller::current()).map_err(|e| to_pyerr(py, e))?;
    let scratch: Vec<crate::mount::Scratch> =
        scratch.into_iter().map(|(p, size, mode)| crate::mount::Scratch { path: bytes(p), size, mode }).collect();
    let sealed: Vec<Vec<u8>> = sealed.into_iter().map(bytes).collect();
    let cgroups = match cgroups {
        None => None,
        Some((v2_top, dirs, links, devs)) => {
            let mut view = crate::mount::CgroupView { v2_top, ..Default::default() };
            for (name, fstype, data) in dirs {
                let fstype = match fstype.as_str() {
                    "cgroup" => "cgroup",
                    "cgroup2" => "cgroup2",
                    _ => return Err(PyValueError::new_err(format!("cgroups: no such file system type {fstype:?}"))),
                };
                view.dirs.push((bytes(name), fstype, bytes(data)));
            }
            view.links = links.into_iter().map(|(n, t)| (bytes(n), bytes(t))).collect();
            Some((view, devs))
        }
    };
    let fs = crate::zygote::TaskFs {
        masked: &task.masked_paths,
        readonly_paths: &task.readonly_paths,
        tmp_size: task.tmp_size,
        shm_size: task.shm_size,
        scratch: &scratch,
        sealed: &sealed,
        cgroups: cgroups.as_ref(),
    };
    let server = crate::zygote::Server::new(plan, &fs, scoped).map_err(|e| to_pyerr(py, e))?;
    let hooks = crate::zygote::ForkHooks { before: fork_before, parent: fork_parent, child: fork_child };
    // SAFETY: the caller keeps `ctrl_fd` open for the zygote's life.
    let ctrl = unsafe { crate::sys::borrow_fd(ctrl_fd) };
    match server.serve(ctrl, &hooks) {
        Ok(Some(())) => {
            // The task: the server's fds are closed already (only 0..5 are the task's).
            std::mem::forget(server);
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(e) => Err(PyOSError::new_err(format!("zygote: {e}"))),
    }
}

/// The caller's end of a zygote's control socket: one request at a time.
#[pyclass(module = "nsfast._core", name = "ZygoteLink", frozen)]
struct ZygoteLink {
    sock: Mutex<Option<std::os::fd::OwnedFd>>,
}

#[pymethods]
impl ZygoteLink {
    /// Take ownership of the socket `fd`.
    #[new]
    fn new(fd: i32) -> PyResult<ZygoteLink> {
        use std::os::fd::FromRawFd;
        if fd < 0 {
            return Err(PyValueError::new_err("fd must be an open socket"));
        }
        // SAFETY: the caller hands the fd over (Python detaches it first).
        Ok(ZygoteLink { sock: Mutex::new(Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })) })
    }

    /// Close the socket (the zygote then exits).
    fn close(&self) {
        self.sock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Start one task: its `payload` (given to it in a sealed memfd), `stdio` and `result`
    /// (its fd 3) are the caller's fds, passed to the task; in a new cgroup as `cgroup` asks.
    #[pyo3(signature = (payload, *, stdio, result, cgroup=None, new_session=true))]
    fn task(
        &self,
        py: Python<'_>,
        payload: PyBackedBytes,
        stdio: (i32, i32, i32),
        result: i32,
        cgroup: Option<&Bound<'_, PyAny>>,
        new_session: bool,
    ) -> PyResult<Sandbox> {
        let (cgroup, cpu) = cgroup_arg(cgroup)?;
        let started = std::time::Instant::now();
        let res = detached(py, || -> Result<_, Error> {
            started_in(create_cgroup(cgroup)?, |cg| {
                crate::zygote::start_task(&self.sock, &payload, [stdio.0, stdio.1, stdio.2], result, cg)
            })
        });
        match res {
            Ok((child, cg)) => Sandbox::new(child, cg, started, true, new_session, cpu, true),
            // The zygote is gone (or its socket broke): BrokenPipeError, so the caller
            // restarts it, unlike a task's own setup failure (SpawnError).
            Err(Error::Spawn { step, filename, .. }) if step == crate::zygote::LINK_STEP => {
                Err(pyo3::exceptions::PyBrokenPipeError::new_err(format!(
                    "the zygote is gone: {}",
                    filename.unwrap_or_default()
                )))
            }
            Err(e) => Err(to_pyerr(py, e)),
        }
    }
}

/// An OSError(errno, strerror) (so Python picks the subclass and `.errno` is set).
fn os_error(e: std::io::Error) -> PyErr {
    let code = e.raw_os_error().unwrap_or(libc::EIO);
    PyOSError::new_err((code, std::io::Error::from_raw_os_error(code).to_string()))
}

/// Regular file `path` of the tree whose root is `fd`, resolved inside it (mount::tree_read):
/// its bytes, None if missing or not a regular file; more than `max` bytes is OSError(EFBIG).
#[pyfunction]
fn tree_read<'py>(py: Python<'py>, fd: i32, path: &[u8], max: u64) -> PyResult<Option<Bound<'py, PyBytes>>> {
    // SAFETY: the caller's fd, open for this call.
    let root = unsafe { crate::sys::borrow_fd(fd) };
    let data = detached(py, || crate::mount::tree_read(root, path, max)).map_err(os_error)?;
    Ok(data.map(|d| PyBytes::new(py, &d)))
}

/// Regular file `path` of the tree whose root is `fd`, open for reading (a new fd the
/// caller owns), None if missing or not a regular file (mount::tree_open).
#[pyfunction]
fn tree_open(py: Python<'_>, fd: i32, path: &[u8]) -> PyResult<Option<i32>> {
    // SAFETY: the caller's fd, open for this call.
    let root = unsafe { crate::sys::borrow_fd(fd) };
    let file = detached(py, || crate::mount::tree_open(root, path)).map_err(os_error)?;
    Ok(file.map(IntoRawFd::into_raw_fd))
}

/// Directory `path` below directory `fd`, no symlink followed, no mount crossed (a new fd
/// the caller owns; mount::dir_beneath).
#[pyfunction]
fn dir_beneath(py: Python<'_>, fd: i32, path: &[u8]) -> PyResult<i32> {
    // SAFETY: the caller's fd, open for this call.
    let dir = unsafe { crate::sys::borrow_fd(fd) };
    let d = detached(py, || crate::mount::dir_beneath(dir, path)).map_err(os_error)?;
    Ok(d.into_raw_fd())
}

/// Directory `path` of the tree whose root is `fd`: [(name, kind, mode)], kind "d", "D"
/// (opaque), "f", "l", "w" (whiteout) or "o"; a listing over `max_bytes` (each entry its
/// name plus ENTRY_COST) is an OSError EFBIG (mount::tree_list).
#[pyfunction]
#[pyo3(signature = (fd, path, userxattr=false, max_bytes=None))]
fn tree_list(
    py: Python<'_>,
    fd: i32,
    path: &[u8],
    userxattr: bool,
    max_bytes: Option<u64>,
) -> PyResult<Vec<(Vec<u8>, String, u32)>> {
    // SAFETY: the caller's fd, open for this call.
    let root = unsafe { crate::sys::borrow_fd(fd) };
    let entries = detached(py, || crate::mount::tree_list(root, path, userxattr, max_bytes)).map_err(os_error)?;
    Ok(entries.into_iter().map(|(n, k, m)| (n, (k as char).to_string(), m)).collect())
}

/// The target of symlink `path` of the tree whose root is `fd`; None if it is not one.
#[pyfunction]
fn tree_readlink<'py>(py: Python<'py>, fd: i32, path: &[u8]) -> PyResult<Option<Bound<'py, PyBytes>>> {
    // SAFETY: the caller's fd, open for this call.
    let root = unsafe { crate::sys::borrow_fd(fd) };
    let t = detached(py, || crate::mount::tree_readlink(root, path)).map_err(os_error)?;
    Ok(t.map(|t| PyBytes::new(py, &t)))
}

/// Write `data` to `path` of the tree whose root is `fd` (created with `mode`, or truncated).
#[pyfunction]
#[pyo3(signature = (fd, path, data, mode=0o644, owner=None))]
fn tree_write(py: Python<'_>, fd: i32, path: &[u8], data: &[u8], mode: u32, owner: Option<(u32, u32)>) -> PyResult<()> {
    // SAFETY: the caller's fd, open for this call.
    let root = unsafe { crate::sys::borrow_fd(fd) };
    detached(py, || crate::mount::tree_write(root, path, data, mode, owner)).map_err(os_error)
}

/// A `mount::CgroupView` as `cgroup_hierarchies` gives and `zygote_serve` takes back:
/// (cgroup2 is /sys/fs/cgroup itself, its [(directory, file system type, mount data)],
/// [(symlink, target)], and the st_dev of each hierarchy `mount::cgroup_view_steps` may
/// mount, by its bit).
type Hierarchies = (bool, Vec<(PyBackedBytes, String, PyBackedBytes)>, Vec<(PyBackedBytes, PyBackedBytes)>, Vec<u64>);

/// This process's cgroup hierarchies under /sys/fs/cgroup, as a sandbox mounts them again
/// in its cgroup namespace, with each one's device (to know a cgroup file's hierarchy by):
/// what a zygote's tasks mount. None where there is none.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn cgroup_hierarchies(
    py: Python<'_>,
) -> Option<(
    bool,
    Vec<(Bound<'_, PyBytes>, &'static str, Bound<'_, PyBytes>)>,
    Vec<(Bound<'_, PyBytes>, Bound<'_, PyBytes>)>,
    Vec<u64>,
)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let view = crate::spec::cgroup_view()?;
    // (v2 at the top: the one hierarchy is /sys/fs/cgroup itself, name "".)
    let names: Vec<&[u8]> = if view.v2_top { vec![b""] } else { view.dirs.iter().take(64).map(|d| &d.0[..]).collect() };
    let devs = names
        .iter()
        .map(|name| {
            let path = [&b"/sys/fs/cgroup/"[..], name].concat();
            std::fs::metadata(std::ffi::OsStr::from_bytes(&path)).map_or(u64::MAX, |m| m.dev())
        })
        .collect();
    let b = |v: &[u8]| PyBytes::new(py, v);
    let dirs = view.dirs.iter().map(|(n, t, d)| (b(n), *t, b(d))).collect();
    let links = view.links.iter().map(|(n, t)| (b(n), b(t))).collect();
    Some((view.v2_top, dirs, links, devs))
}

/// The kernel's Landlock ABI version (0: no Landlock).
#[pyfunction]
fn landlock_abi() -> i64 {
    crate::zygote::landlock_abi()
}

#[pyfunction]
fn cap_last_cap() -> u32 {
    crate::spec::cap_last_cap()
}

/// The system call names nsfast's seccomp filter knows on this architecture, and the ones
/// it allows by default.
#[pyfunction]
fn seccomp_syscalls() -> (Vec<&'static str>, Vec<&'static str>) {
    (crate::seccomp::known_syscalls().to_vec(), crate::seccomp::default_allowed().to_vec())
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(spawn, m)?)?;
    m.add_function(wrap_pyfunction!(namespaces, m)?)?;
    m.add_function(wrap_pyfunction!(cap_last_cap, m)?)?;
    m.add_function(wrap_pyfunction!(seccomp_syscalls, m)?)?;
    m.add_function(wrap_pyfunction!(cgroup_backend, m)?)?;
    m.add_function(wrap_pyfunction!(own_cgroup, m)?)?;
    m.add_function(wrap_pyfunction!(settle, m)?)?;
    m.add_function(wrap_pyfunction!(set_netns_pool, m)?)?;
    m.add_function(wrap_pyfunction!(netns_pool, m)?)?;
    m.add_function(wrap_pyfunction!(mounts, m)?)?;
    m.add_function(wrap_pyfunction!(sandbox_id_range, m)?)?;
    m.add_function(wrap_pyfunction!(kill_cgroups, m)?)?;
    m.add_function(wrap_pyfunction!(spawn_join, m)?)?;
    m.add_function(wrap_pyfunction!(zygote_serve, m)?)?;
    m.add_function(wrap_pyfunction!(landlock_abi, m)?)?;
    m.add_function(wrap_pyfunction!(cgroup_hierarchies, m)?)?;
    m.add_function(wrap_pyfunction!(tree_read, m)?)?;
    m.add_function(wrap_pyfunction!(tree_list, m)?)?;
    m.add_function(wrap_pyfunction!(tree_open, m)?)?;
    m.add_function(wrap_pyfunction!(dir_beneath, m)?)?;
    m.add_function(wrap_pyfunction!(tree_write, m)?)?;
    m.add_function(wrap_pyfunction!(tree_readlink, m)?)?;
    m.add_class::<ZygoteLink>()?;
    m.add_class::<Sandbox>()?;
    m.add_class::<Exit>()?;
    m.add("NAMESPACES", crate::ns::NAMESPACES.iter().map(|(n, _)| *n).collect::<Vec<_>>())?;
    m.add("DEFAULT_NAMESPACES", crate::spec::DEFAULT_NAMESPACES.to_vec())?;
    m.add("DEFAULT_MASKED_PATHS", crate::spec::DEFAULT_MASKED_PATHS.to_vec())?;
    m.add("DEFAULT_READONLY_PATHS", crate::spec::DEFAULT_READONLY_PATHS.to_vec())?;
    m.add("DEFAULT_HIDDEN", crate::spec::DEFAULT_HIDDEN.to_vec())?;
    m.add("DEFAULT_TMP_SIZE", crate::spec::DEFAULT_TMP_SIZE)?;
    m.add("ENTRY_COST", crate::mount::ENTRY_COST)?;
    m.add("DEFAULT_SHM_SIZE", crate::spec::DEFAULT_SHM_SIZE)?;
    m.add("SANDBOX_ID_BASE", crate::spec::SANDBOX_ID_BASE)?;
    m.add("SANDBOX_ID_COUNT", crate::spec::SANDBOX_ID_COUNT)?;
    m.add("SANDBOX_OWNER_BASE", crate::spec::SANDBOX_OWNER_BASE)?;
    m.add("SANDBOX_RANGES", crate::spec::SANDBOX_RANGES)?;
    m.add("SANDBOX_RANGES_BASE", crate::spec::SANDBOX_RANGES_BASE)?;
    m.add("INIT_BINARY_SIZE", crate::spawn::INIT_BINARY.len())?;
    m.add("HIDDEN_SIZE", crate::mount::HIDDEN_SIZE)?;
    Ok(())
}
