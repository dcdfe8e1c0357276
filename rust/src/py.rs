//! The Python binding layer (`nsfast._core`): the only module that knows pyo3.
//!
//! Arguments are extracted into plain Rust values first, then the blocking work runs with
//! the GIL released (`detached`). Errors are mapped in one place (`to_pyerr`) onto the
//! exception classes of `nsfast._errors`.

use std::os::fd::IntoRawFd;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::cgroup::{self, Backend, Cgroup, Limits};
use crate::error::Error;
use crate::spec::{Caller, Mount, Plan, Spec};

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

/// A mount as the Python layer passes it: (kind, src, dst, readonly, size).
type MountTuple = (String, Option<PyBackedBytes>, PyBackedBytes, bool, Option<u64>);

fn mount_from(t: MountTuple) -> PyResult<Mount> {
    let (kind, src, dst, readonly, size) = t;
    match (kind.as_str(), src) {
        ("bind", Some(src)) => Ok(Mount::Bind { src: bytes(src), dst: bytes(dst), readonly }),
        ("tmpfs", None) => Ok(Mount::Tmpfs { dst: bytes(dst), size }),
        (k, _) => Err(PyValueError::new_err(format!("mounts: bad mount tuple of kind {k:?}"))),
    }
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

/// Prepare the cgroup backend for `root`: (version, roots, controllers). Raises OSError
/// saying why when sandboxes cannot get cgroups there.
#[pyfunction]
fn cgroup_backend(py: Python<'_>, root: String) -> PyResult<(u8, Vec<String>, Vec<String>)> {
    let b = detached(py, move || backend_for(&root)).map_err(PyOSError::new_err)?;
    let roots = b.roots().iter().map(|p| p.display().to_string()).collect();
    Ok((b.version(), roots, b.controllers()))
}

/// The own cgroup v2 path of this process (for rootless delegation), if any.
#[pyfunction]
fn own_cgroup() -> Option<String> {
    cgroup::own_v2_path()
}

/// (cpu_user_ns, cpu_system_ns, memory_peak, pids_peak, oom_kills).
type UsageTuple = (Option<u64>, Option<u64>, Option<u64>, Option<u64>, u64);

/// One sandbox's cgroup, owned by its `nsfast.Process`. Removed on `remove()` or when
/// garbage-collected.
#[pyclass(module = "nsfast._core", name = "Cgroup")]
struct PyCgroup {
    inner: Mutex<Option<Box<dyn Cgroup>>>,
    version: u8,
}

impl PyCgroup {
    fn with<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut Box<dyn Cgroup>) -> T + Send) -> Option<T> {
        detached(py, || {
            let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_mut().map(f)
        })
    }
}

#[pymethods]
impl PyCgroup {
    #[getter]
    fn version(&self) -> u8 {
        self.version
    }

    /// Kill every process in the cgroup.
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        match self.with(py, |cg| cg.kill().map_err(|e| e.to_string())) {
            Some(Err(e)) => Err(PyOSError::new_err(e)),
            _ => Ok(()),
        }
    }

    /// (cpu_user_ns, cpu_system_ns, memory_peak, pids_peak, oom_kills); None once removed.
    fn usage(&self, py: Python<'_>) -> Option<UsageTuple> {
        self.with(py, |cg| {
            let u = cg.usage();
            (u.cpu_user_ns, u.cpu_system_ns, u.memory_peak, u.pids_peak, u.oom_kills)
        })
    }

    /// Remove the cgroup directories (waits briefly for dying processes).
    fn remove(&self, py: Python<'_>) -> PyResult<()> {
        let res = detached(py, || {
            let taken = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
            taken.map(|mut cg| cg.remove().map_err(|e| e.to_string()))
        });
        match res {
            Some(Err(e)) => Err(PyOSError::new_err(e)),
            _ => Ok(()),
        }
    }

    /// Forget the cgroup without removing it (it outlives this process); returns its paths.
    fn release(&self, py: Python<'_>) -> Vec<String> {
        detached(py, || {
            let taken = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
            taken.map(|cg| cg.paths().iter().map(|p| p.display().to_string()).collect()).unwrap_or_default()
        })
    }

    fn paths(&self, py: Python<'_>) -> Vec<String> {
        self.with(py, |cg| cg.paths().iter().map(|p| p.display().to_string()).collect()).unwrap_or_default()
    }
}

impl Drop for PyCgroup {
    fn drop(&mut self) {
        if let Some(mut cg) = self.inner.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = cg.kill();
            let _ = cg.remove();
        }
    }
}

/// A cgroup request as the Python layer passes it: (root, (memory, memory_swap, pids,
/// cpu (quota, period), cpuset), kill_tree).
type CgroupRequest = (String, (Option<u64>, Option<u64>, Option<u64>, Option<(u64, u64)>, Option<String>), bool);

/// Start a sandbox; returns (pid, pidfd, cgroup, status_fd). The caller owns the pidfd and
/// status_fd (nsfast-init's status report, None without init: pass it to `wait`).
#[pyfunction]
#[pyo3(signature = (args, *, env, cwd, namespaces, hostname, rootfs, readonly_root, mounts, uid, gid, keep_caps, init, new_session, die_with_parent, stdio, pass_fds, cgroup=None, masked_paths=Vec::new(), readonly_paths=Vec::new(), hidden=Vec::new(), tmp_size=None, shm_size=None, seccomp=None, nproc=None))]
#[allow(clippy::too_many_arguments)]
fn spawn(
    py: Python<'_>,
    args: Vec<PyBackedBytes>,
    env: Vec<PyBackedBytes>,
    cwd: PyBackedBytes,
    namespaces: Vec<String>,
    hostname: Option<PyBackedBytes>,
    rootfs: Option<PyBackedBytes>,
    readonly_root: bool,
    mounts: Vec<MountTuple>,
    uid: Option<u32>,
    gid: Option<u32>,
    keep_caps: u64,
    init: bool,
    new_session: bool,
    die_with_parent: bool,
    stdio: (i32, i32, i32),
    pass_fds: Vec<i32>,
    cgroup: Option<CgroupRequest>,
    masked_paths: Vec<PyBackedBytes>,
    readonly_paths: Vec<PyBackedBytes>,
    hidden: Vec<PyBackedBytes>,
    tmp_size: Option<u64>,
    shm_size: Option<u64>,
    seccomp: Option<(Vec<String>, Vec<String>)>,
    nproc: Option<u64>,
) -> PyResult<(i32, i32, Option<PyCgroup>, Option<i32>)> {
    let namespaces = crate::ns::flags(namespaces.iter().map(String::as_str))
        .map_err(|n| to_pyerr(py, Error::invalid("namespaces", format!("has an unknown namespace {n:?}"))))?;
    let spec = Spec {
        args: args.into_iter().map(bytes).collect(),
        env: env.into_iter().map(bytes).collect(),
        cwd: bytes(cwd),
        namespaces,
        hostname: hostname.map(bytes),
        rootfs: rootfs.map(bytes),
        readonly_root,
        mounts: mounts.into_iter().map(mount_from).collect::<PyResult<_>>()?,
        uid,
        gid,
        keep_caps,
        init,
        new_session,
        die_with_parent,
        masked_paths: masked_paths.into_iter().map(bytes).collect(),
        readonly_paths: readonly_paths.into_iter().map(bytes).collect(),
        hidden: hidden.into_iter().map(bytes).collect(),
        tmp_size,
        shm_size,
        seccomp: seccomp.map(|(allow, deny)| crate::spec::SeccompSpec { allow, deny }),
        nproc,
    };
    let io_stdio = [stdio.0, stdio.1, stdio.2];
    let result = detached(py, move || -> Result<_, Error> {
        let plan = Plan::build(&spec, Caller::current())?;
        let mut cg = match cgroup {
            None => None,
            Some((root, (memory, memory_swap, pids, cpu, cpuset), kill_tree)) => {
                let limits = Limits { memory, memory_swap, pids, cpu, cpuset };
                let cg_err = |msg: String| Error::Spawn {
                    step: "create cgroup".into(),
                    filename: Some(msg),
                    errno: rustix::io::Errno::NOTSUP,
                };
                let backend = backend_for(&root).map_err(cg_err)?;
                Some(backend.create(&cgroup::unique_name(), &limits, kill_tree).map_err(|e| cg_err(e.to_string()))?)
            }
        };
        let io = crate::Io { stdio: io_stdio, pass_fds: &pass_fds, cgroup: cg.as_deref() };
        match crate::spawn::spawn(&plan, &io) {
            Ok(child) => Ok((child, cg)),
            Err(e) => {
                if let Some(c) = cg.as_mut() {
                    let _ = c.remove();
                }
                Err(e)
            }
        }
    });
    match result {
        Ok((child, cg)) => {
            let pycg = cg.map(|c| PyCgroup { version: c.version(), inner: Mutex::new(Some(c)) });
            Ok((child.pid, child.pidfd.into_raw_fd(), pycg, child.status.map(IntoRawFd::into_raw_fd)))
        }
        Err(e) => Err(to_pyerr(py, e)),
    }
}

/// Wait for `pid` (via its pidfd) up to `timeout` seconds (forever if None) and reap it.
/// Returns None on timeout, else (wait status, user s, system s, max rss bytes): the
/// command's status, from nsfast-init's report on `status_fd` (see `spawn`) if it made one.
#[pyfunction]
#[pyo3(signature = (pid, pidfd, timeout=None, status_fd=None))]
fn wait(
    py: Python<'_>,
    pid: i32,
    pidfd: i32,
    timeout: Option<f64>,
    status_fd: Option<i32>,
) -> PyResult<Option<(i32, f64, f64, u64)>> {
    let timeout = match timeout {
        Some(t) if !(t.is_finite()) || t < 0.0 => {
            return Err(PyValueError::new_err("timeout must be a finite number >= 0"))
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    // GIL-free slices, Python's signal handlers run between them: Ctrl-C interrupts a wait
    // at once (KeyboardInterrupt), before anything is reaped, so no exit status is lost.
    const SLICE: Duration = Duration::from_millis(50);
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    loop {
        let slice = deadline.map_or(SLICE, |d| d.saturating_duration_since(std::time::Instant::now()).min(SLICE));
        match detached(py, move || crate::spawn::wait(pid, pidfd, Some(slice))) {
            Ok(Some((status, ru))) => {
                // SAFETY: the caller keeps status_fd (from `spawn`) open across this call.
                let report = status_fd.map(|fd| unsafe { crate::sys::borrow_fd(fd) });
                let status = crate::spawn::command_status(status, report);
                return Ok(Some((status, tv(ru.ru_utime), tv(ru.ru_stime), ru.ru_maxrss as u64 * 1024)));
            }
            Ok(None) if deadline.is_some_and(|d| std::time::Instant::now() >= d) => return Ok(None),
            Ok(None) => py.check_signals()?,
            Err(e) => return Err(PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string()))),
        }
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

/// Start a process inside a running sandbox or process; returns (pid, pidfd).
///
/// `target` is a pid: the namespaces of types `join`, root and (`cwd` None) working directory
/// of that process are opened now (`nsenter -t PID`); `join_cgroup` also joins its cgroups.
/// Or it is a container's pid with a `held` attribute: what the container held since its
/// start (`ns_fds` [(type, fd)], `root_fd`, `closed`, `cgroup`, `seccomp`); then the
/// process runs in a new cgroup below the container's, left on `target.exec_cgroup`.
#[pyfunction]
#[pyo3(signature = (args, *, target, join, env, cwd, uid, gid, keep_caps, die_with_parent, stdio, pass_fds, join_cgroup))]
#[allow(clippy::too_many_arguments)]
fn spawn_join(
    py: Python<'_>,
    args: Vec<PyBackedBytes>,
    target: &Bound<'_, PyAny>,
    join: Vec<String>,
    env: Vec<PyBackedBytes>,
    cwd: Option<PyBackedBytes>,
    uid: Option<u32>,
    gid: Option<u32>,
    keep_caps: u64,
    die_with_parent: bool,
    stdio: (i32, i32, i32),
    pass_fds: Vec<i32>,
    join_cgroup: bool,
) -> PyResult<(i32, i32)> {
    use crate::exec::{Cwd, Target};
    use std::sync::atomic::{AtomicU64, Ordering};
    static EXECS: AtomicU64 = AtomicU64::new(0);
    let ns_flags = crate::ns::flags(join.iter().map(String::as_str))
        .map_err(|n| to_pyerr(py, Error::invalid("namespaces", format!("has an unknown namespace {n:?}"))))?;
    let pid: i32 = target.extract()?;
    let mut spec = Spec::new(args.into_iter().map(bytes).collect());
    spec.env = env.into_iter().map(bytes).collect();
    let use_cwd_fd = cwd.is_none();
    spec.cwd = cwd.map(bytes).unwrap_or_else(|| b"/".to_vec());
    spec.namespaces = 0;
    spec.uid = uid;
    spec.gid = gid;
    spec.keep_caps = keep_caps;
    spec.new_session = true;
    spec.die_with_parent = die_with_parent;
    // A container's held fds are duplicated here, with the GIL held: a concurrent stop()
    // (which sets `closed` before closing them) cannot close them under this exec.
    let held = target.getattr("held").ok().filter(|h| !h.is_none());
    // The container's RLIMIT_NPROC (counted in its user namespace), which its execs share.
    let mut nproc: Option<u64> = None;
    let mut held_fds = None;
    let mut container_cgroup: Option<PyRef<'_, PyCgroup>> = None;
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
        let seccomp: Option<(Vec<String>, Vec<String>)> = h.getattr("seccomp")?.extract()?;
        spec.seccomp = seccomp.map(|(allow, deny)| crate::spec::SeccompSpec { allow, deny });
        nproc = h.getattr("nproc").ok().map(|v| v.extract::<Option<u64>>()).transpose()?.flatten();
        container_cgroup = h.getattr("cgroup")?.extract()?;
    }
    let container_cgroup: Option<&PyCgroup> = container_cgroup.as_deref();
    let io_stdio = [stdio.0, stdio.1, stdio.2];
    let result = detached(py, move || -> Result<_, Error> {
        let mut plan = Plan::build(&spec, Caller::current())?;
        plan.nproc = nproc;
        let cg_err =
            |e: cgroup::CgroupError| Error::spawn("join cgroup", Some(e.to_string()), rustix::io::Errno::NOTSUP);
        let (target, mut cg): (Target, Option<Box<dyn Cgroup>>) = match held_fds {
            Some((ns, root)) => {
                let cg = match container_cgroup.filter(|_| join_cgroup) {
                    Some(c) => {
                        let name = format!("exec-{}", EXECS.fetch_add(1, Ordering::Relaxed));
                        let guard = c.inner.lock().unwrap_or_else(|p| p.into_inner());
                        guard.as_ref().map(|c| c.exec_child(&name)).transpose().map_err(cg_err)?
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
                (t, cg)
            }
        };
        let io = crate::Io { stdio: io_stdio, pass_fds: &pass_fds, cgroup: cg.as_deref() };
        match crate::exec::spawn_join(&plan, &io, &target) {
            Ok(child) => Ok((child, cg)),
            Err(e) => {
                if let Some(c) = cg.as_mut() {
                    let _ = c.remove();
                }
                Err(e)
            }
        }
    });
    match result {
        Ok((child, cg)) => {
            if let (Some(cg), true) = (cg, held.is_some()) {
                let pycg = PyCgroup { version: cg.version(), inner: Mutex::new(Some(cg)) };
                target.setattr("exec_cgroup", Py::new(py, pycg)?)?;
            }
            Ok((child.pid, child.pidfd.into_raw_fd()))
        }
        Err(e) => Err(to_pyerr(py, e)),
    }
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
    m.add_function(wrap_pyfunction!(wait, m)?)?;
    m.add_function(wrap_pyfunction!(namespaces, m)?)?;
    m.add_function(wrap_pyfunction!(cap_last_cap, m)?)?;
    m.add_function(wrap_pyfunction!(seccomp_syscalls, m)?)?;
    m.add_function(wrap_pyfunction!(cgroup_backend, m)?)?;
    m.add_function(wrap_pyfunction!(own_cgroup, m)?)?;
    m.add_function(wrap_pyfunction!(spawn_join, m)?)?;
    m.add_class::<PyCgroup>()?;
    m.add("NAMESPACES", crate::ns::NAMESPACES.iter().map(|(n, _)| *n).collect::<Vec<_>>())?;
    m.add("DEFAULT_NAMESPACES", crate::spec::DEFAULT_NAMESPACES.to_vec())?;
    m.add("DEFAULT_MASKED_PATHS", crate::spec::DEFAULT_MASKED_PATHS.to_vec())?;
    m.add("DEFAULT_READONLY_PATHS", crate::spec::DEFAULT_READONLY_PATHS.to_vec())?;
    m.add("DEFAULT_HIDDEN", crate::spec::DEFAULT_HIDDEN.to_vec())?;
    m.add("DEFAULT_TMP_SIZE", crate::spec::DEFAULT_TMP_SIZE)?;
    m.add("DEFAULT_SHM_SIZE", crate::spec::DEFAULT_SHM_SIZE)?;
    m.add("SANDBOX_ID_BASE", crate::spec::SANDBOX_ID_BASE)?;
    m.add("SANDBOX_ID_COUNT", crate::spec::SANDBOX_ID_COUNT)?;
    m.add("INIT_BINARY_SIZE", crate::spawn::INIT_BINARY.len())?;
    Ok(())
}
