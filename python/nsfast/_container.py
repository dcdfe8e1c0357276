"""Long-lived containers and `docker exec`: a process joins another's namespaces with
setns(), its root, working directory and cgroup."""

from __future__ import annotations

import errno as _errno
import os
import sys
import time
import uuid
import weakref
from subprocess import TimeoutExpired
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._cgroup import Limits
from ._errors import ContainerError, SpawnError
from ._ns import namespaces as _namespaces
from ._process import DEFAULT_CAPTURE_MAX_BYTES, Args, File, Process, Result, _explain_hidden, _JoinTarget, run
from ._spec import DEFAULT_SECCOMP, Seccomp, Spec, SpecFields, with_fields
from ._trees import DEFAULT_OUTPUTS_MAX_BYTES, Trees, writable_trees

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Container", "enter"]


def _join_types(pid: int, wanted: Optional[Sequence[str]]) -> tuple:  # type: ignore[type-arg]
    """Namespace types to setns() into: those where `pid` differs from us (joining one's own
    user namespace is an error), limited to `wanted`."""
    ours, theirs = _namespaces("self"), _namespaces(pid)
    if wanted is not None:
        unknown = sorted(set(wanted) - set(theirs))
        if unknown:
            raise ValueError(f"namespaces: unknown type(s) {', '.join(unknown)}")
    return tuple(t for t in theirs if theirs[t] != ours.get(t) and (wanted is None or t in wanted))


class _Held:
    """What a container's execs join, opened right after its main process started: every
    namespace that differs from ours and its root directory, as fds. So an exec joins the
    namespaces the container had at start, not ones a process inside made later (a pid 1
    that unshared a user namespace), and not whatever a reused pid would point to."""

    def __init__(self, pid: int, sandbox: Any, seccomp: Any, nproc: Optional[int] = None) -> None:
        self.pid = pid
        self.nproc = nproc  # its RLIMIT_NPROC (the pids limit): execs get the same
        self.sandbox = sandbox  # the container's _core.Sandbox (execs get a child of its cgroup)
        self.seccomp = seccomp  # its nsfast.Seccomp (or None): execs get the same
        self.closed = False
        ours = _namespaces("self")
        self.ns_fds: List[Tuple[str, int]] = []
        self.inodes: Dict[str, int] = {}
        try:
            for t in ours:
                fd = os.open(f"/proc/{pid}/ns/{t}", os.O_RDONLY | os.O_CLOEXEC)
                self.inodes[t] = os.fstat(fd).st_ino
                if self.inodes[t] == ours[t]:
                    os.close(fd)
                else:
                    self.ns_fds.append((t, fd))
            self.root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    @property
    def types(self) -> Tuple[str, ...]:
        return tuple(t for t, _ in self.ns_fds)

    def close(self) -> None:
        # `closed` first: _core.spawn_join duplicates the fds, GIL held, only while it is False.
        self.closed = True
        self.sandbox = None  # and its pidfd, once the main Process let it go
        fds, self.ns_fds = [fd for _, fd in self.ns_fds] + [getattr(self, "root_fd", -1)], []
        self.root_fd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class Container:
    """A long-lived sandbox whose main process is `command` (or, with command=None, nsfast's
    idle init that reaps what runs inside), and into which commands are exec'd.
    Leaving a `with` block stops it (SIGTERM, `stop_timeout` seconds, then kill); an
    exception kills it at once.

        with nsfast.Container(hostname="box") as c:
            c.exec(["ps", "aux"], capture_output=True, text=True).stdout
    """

    def __init__(
        self,
        command: Optional[Args] = None,
        *,
        spec: Optional[Spec] = None,
        name: Optional[str] = None,
        stop_timeout: float = 10,
        **spec_fields: Unpack[SpecFields],
    ) -> None:
        self.spec = with_fields(spec, spec_fields)
        self.stop_timeout = stop_timeout
        if command is None:
            self.spec = self.spec.replace(init=True)
        self.command = command
        self.name = name if name is not None else "c-" + uuid.uuid4().hex[:12]
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a non-empty str without '/', got {self.name!r}")
        self._proc: Optional[Process] = None
        self._held: Optional[_Held] = None
        self._execs: weakref.WeakSet[Process] = weakref.WeakSet()  # spawn()ed, for _wait_main
        self._stdio: Dict[str, File] = {}

    def __repr__(self) -> str:
        state = "not started" if self._proc is None else ("running" if self.running else "stopped")
        return f"<nsfast.Container {self.name} pid={self.pid} {state}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(
        self,
        *,
        stdin: File = None,
        stdout: File = None,
        stderr: File = None,
        _before_go: Optional[Callable[[Process], None]] = None,
        _give: Sequence[int] = (),
    ) -> Container:
        """Start the main process (pid 1 of the container). Once only. (`_before_go`, the
        CLI's: called with the Process once its namespaces are held, before the command may
        run; should the caller die before it returns, the command never runs. `_give`: fds
        of the caller's, its stdio, made the container user's as PIPEs are: the CLI's log
        pipe, which /dev/stdout then reopens.)"""
        if self._proc is not None:
            raise ContainerError(f"container {self.name} was already started")
        if self.command is None:
            # nsfast-init is pid 1 and makes no namespaces: what it has now is the start.
            self._proc = Process(
                [],
                spec=self.spec,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                _trees=writable_trees(self.spec),
                _give=_give,
            )
            self._hold(None, before_go=_before_go)
            return self
        # The command may make namespaces of its own (or exit) as soon as it runs: it starts
        # behind nsfast-init's gate, opened once they are held. Then init execs it in place
        # (init=False: the command is pid 1) or starts it as its child (with init).
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        try:
            env = dict(self.spec._env_items)
            env["NSFAST_INIT_GATE"] = f"{gate_r},{result_w}" + (",fork" if self.spec._init else "")
            self._proc = Process(
                self.command,
                spec=self.spec.replace(init=True, env=env),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=(gate_r, result_w),
                _trees=writable_trees(self.spec),
                _give=_give,
            )
        except BaseException:
            os.close(gate_w)
            os.close(result_r)
            raise
        finally:
            os.close(gate_r)
            os.close(result_w)
        self._hold(gate_w, result_r, before_go=_before_go)
        return self

    def _hold(
        self, gate: Optional[int], result: int = -1, before_go: Optional[Callable[[Process], None]] = None
    ) -> None:
        """Hold the namespaces and root of the main process; open its gate (if any) and wait
        until the command was exec'd. Kills the main process on failure."""
        assert self._proc is not None
        try:
            self._held = _Held(self._proc.pid, self._proc._sandbox, self.spec.seccomp, self.spec._nproc)
            if before_go is not None:
                before_go(self._proc)
            if gate is not None:
                os.write(gate, b"1")
                os.close(gate)
                gate = None
                rec = b""
                while len(rec) < 12:
                    chunk = os.read(result, 12 - len(rec))
                    if not chunk:
                        break  # EOF: exec'd (the pipe is close-on-exec)
                    rec += chunk
                if rec:  # a {step, index, errno} record: the command could not be exec'd
                    code = int.from_bytes(rec[8:12], sys.byteorder, signed=True) if len(rec) == 12 else 5
                    argv0 = os.fspath(self._proc.args[0])
                    err = SpawnError(code, os.strerror(code), os.fsdecode(argv0), "exec")
                    _explain_hidden(err, [os.fsencode(argv0)], self.spec)
                    raise err
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            if self._held is not None:
                self._held.close()
            # (Found by an audit: a start that failed kept its trees' fds, 6 a Container.)
            if self._proc._trees is not None:
                self._proc._trees.close()
            raise
        finally:
            if gate is not None:
                os.close(gate)
            if result >= 0:
                os.close(result)

    @property
    def process(self) -> Optional[Process]:
        """The main process, once started."""
        return self._proc

    @property
    def pid(self) -> Optional[int]:
        """The host pid of the container's main process (None before start)."""
        return None if self._proc is None else self._proc.pid

    @property
    def pidfd(self) -> Optional[int]:
        """A pidfd of the main process, valid while this object lives (None before start)."""
        return None if self._proc is None else self._proc.pidfd

    @property
    def running(self) -> bool:
        """Whether the main process was started and has not ended."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        """The main process's returncode once it ended, else None."""
        return None if self._proc is None else self._proc.poll()

    def namespaces(self) -> Dict[str, int]:
        """The namespaces of the main process now (type -> inode)."""
        return _namespaces(self._running_pid())

    def exec_namespaces(self) -> Dict[str, int]:
        """The namespaces exec joins: the container's at start (type -> inode)."""
        self._running_pid()
        assert self._held is not None
        return dict(self._held.inodes)

    def _release(self) -> None:
        """Close the held fds once the main process is gone."""
        if self._held is not None and self._proc is not None and self._proc.returncode is not None:
            self._held.close()
            if self._proc._trees is not None:
                self._proc._trees.close()

    def __del__(self) -> None:
        held = getattr(self, "_held", None)
        if held is not None:
            held.close()

    def read_file(self, path: str, *, max_bytes: int = DEFAULT_OUTPUTS_MAX_BYTES) -> bytes:
        """The bytes of regular file `path` (a path inside the container) in one of its
        writable trees (/tmp, /dev/shm, hidden directories, Tmpfs and writable Bind mounts,
        an overlay root's changes), read safely while it runs (stop() releases them):
        resolved by the kernel inside that tree, so no symlink or
        `..` the container planted leads to another file. FileNotFoundError if there is no
        regular file there; more than `max_bytes` is OSError(EFBIG); a path in no writable
        tree is a SpecError."""
        data = self._writable().read(path, max_bytes)
        if data is None:
            raise FileNotFoundError(_errno.ENOENT, "no regular file in the container's writable trees", path)
        return data

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write `data` to `path` in one of the container's writable trees (created with
        `mode`, else truncated), resolved inside that tree as read_file is; a symlink as the
        last component is refused (OSError ELOOP). The file is the caller's (for a root
        caller: the container root's, the first host id of its range), root's inside."""
        self._writable().write(path, data, mode)

    def _writable(self) -> Trees:
        if self._proc is None:
            raise ContainerError(f"container {self.name} was never started")
        if self._proc._trees is None:
            raise ContainerError(f"container {self.name} has no writable trees (no mount namespace)")
        if not self._proc._trees.fds:
            raise ContainerError(f"container {self.name} was stopped: its files went with it")
        return self._proc._trees

    def stop(self, timeout: float = 10) -> Optional[int]:
        """SIGTERM the main process, wait up to `timeout` s, then kill the whole container.
        Returns the main process's returncode; a no-op once stopped."""
        if self._proc is None:
            raise ContainerError(f"container {self.name} was never started")
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._wait_main(timeout)
            except TimeoutExpired:
                self._proc.kill()
                self._wait_main(None)
        self._release()
        return self._proc.returncode

    def kill(self) -> Optional[int]:
        """Kill every process of the container now."""
        if self._proc is None:
            raise ContainerError(f"container {self.name} was never started")
        if self._proc.poll() is None:
            self._proc.kill()
            self._wait_main(None)
        self._release()
        return self._proc.returncode

    def _wait_main(self, timeout: Optional[float]) -> int:
        """Wait for the main process, reaping exec'd processes meanwhile: they are our
        children, and a pid namespace's init only finishes exiting once every process of
        the namespace has been reaped."""
        assert self._proc is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for p in list(self._execs):
                p.poll()
            left = 0.01 if deadline is None else min(0.01, max(0.0, deadline - time.monotonic()))
            try:
                return self._proc.wait(left)
            except TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def __enter__(self) -> Container:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self.kill()
        else:
            self.stop(self.stop_timeout)

    # -- exec --------------------------------------------------------------------------------

    def _running_pid(self) -> int:
        if self._proc is None:
            raise ContainerError(f"container {self.name} is not started")
        if self._proc.poll() is not None:
            raise ContainerError(f"container {self.name} is not running (exited with {self._proc.returncode})")
        return self._proc.pid

    def _target(self, cwd: Optional[str]) -> _JoinTarget:
        self._running_pid()
        assert self._held is not None
        return _JoinTarget(
            pid=self._held.pid,
            namespaces=self._held.types,
            cgroup=self._held.sandbox is not None and self._held.sandbox.cgroup_version is not None,
            cwd=os.fspath(self.spec.cwd) if cwd is None else cwd,
            held=self._held,
        )

    def _exec_spec(self, env: Optional[Dict[str, str]]) -> Spec:
        return self.spec if env is None else self.spec.replace(env=env)

    def exec(
        self,
        args: Args,
        *,
        input: Any = None,
        capture_output: bool = False,
        stdin: File = None,
        stdout: File = None,
        stderr: File = None,
        timeout: Optional[float] = None,
        check: bool = False,
        text: bool = False,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        pass_fds: Sequence[int] = (),
        capture_max_bytes: Optional[int] = DEFAULT_CAPTURE_MAX_BYTES,
    ) -> Result:
        """Run `args` inside the container (the namespaces and root it had at start, its cwd,
        a cgroup of its own below the container's, its environment unless `env`), wait,
        return a Result — like `docker exec`. `timeout` (or an exception while waiting)
        kills everything the exec started; after a normal exit, what it left running keeps
        running in the container. `capture_max_bytes` as in `nsfast.run`."""
        return run(
            args,
            spec=self._exec_spec(env),
            input=input,
            capture_output=capture_output,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            timeout=timeout,
            check=check,
            text=text,
            pass_fds=pass_fds,
            capture_max_bytes=capture_max_bytes,
            _join=self._target(cwd),
        )

    def spawn(
        self,
        args: Args,
        *,
        stdin: File = None,
        stdout: File = None,
        stderr: File = None,
        text: bool = False,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        pass_fds: Sequence[int] = (),
    ) -> Process:
        """Start `args` inside the container (as exec does) and return its Process at once;
        its kill() ends everything the exec started."""
        target = self._target(cwd)
        proc = Process(
            args,
            spec=self._exec_spec(env),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=text,
            pass_fds=pass_fds,
            _join=target,
        )
        # Its Sandbox owns the exec's cgroup: kill() ends everything the exec started; once
        # reaped it measures and removes it without killing, so what the exec left running
        # keeps running (docker exec).
        self._execs.add(proc)
        return proc


def enter(
    pid: int,
    args: Args,
    *,
    namespaces: Optional[Sequence[str]] = None,
    input: Any = None,
    capture_output: bool = False,
    stdin: File = None,
    stdout: File = None,
    stderr: File = None,
    timeout: Optional[float] = None,
    check: bool = False,
    text: bool = False,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
    cgroup: bool = False,
    pass_fds: Sequence[int] = (),
    pidfd: Optional[int] = None,
    seccomp: Optional[Seccomp] = DEFAULT_SECCOMP,
    uid: Optional[int] = None,
    gid: Optional[int] = None,
    capabilities: Sequence[str] = (),
    capture_max_bytes: Optional[int] = DEFAULT_CAPTURE_MAX_BYTES,
    _nproc: Optional[int] = None,
) -> Result:
    """Run `args` inside the namespaces of any process `pid` (all that differ from ours, or
    `namespaces`), with its root and working directory (or `cwd`), like `nsenter -t PID -a`.
    cgroup=True also puts it into `pid`'s cgroup(s). `pidfd`: a pidfd of `pid` opened before
    you checked that `pid` is the process you mean; the enter fails (ProcessLookupError)
    rather than join a process that reused the pid since. The command has no capability
    (but `capabilities`), runs as `uid`/`gid` inside (default: root of the user namespace it
    joins) and under nsfast's default seccomp filter unless `seccomp=None`: in the
    namespaces of a sandbox, its processes (same user namespace, same uid) can ptrace the
    command once it exec'd, and would drive an unfiltered one. `capture_max_bytes` as in
    `nsfast.run`."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"pid must be a positive int, got {pid!r}")
    try:
        types = _join_types(pid, namespaces)
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    target = _JoinTarget(pid=pid, namespaces=types, cgroup=cgroup, cwd=cwd, pin=pidfd)
    # (`_nproc`: the command's RLIMIT_NPROC, the CLI's for a container that has one; no
    # other limit applies to a process that joins.)
    limits = None if _nproc is None else Limits(pids=_nproc)
    fields: Dict[str, Any] = {
        "seccomp": seccomp,
        "uid": uid,
        "gid": gid,
        "capabilities": tuple(capabilities),
        "limits": limits,
    }
    if env is not None:
        fields["env"] = env
    spec = with_fields(None, fields)
    return run(
        args,
        spec=spec,
        input=input,
        capture_output=capture_output,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        timeout=timeout,
        check=check,
        text=text,
        pass_fds=pass_fds,
        capture_max_bytes=capture_max_bytes,
        _join=target,
    )
