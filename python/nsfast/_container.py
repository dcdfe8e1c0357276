"""Long-lived containers and `docker exec`: a process joins another's namespaces with
setns(), its root, working directory and cgroup."""

from __future__ import annotations

import signal
import uuid
from subprocess import TimeoutExpired
from typing import Any, Dict, List, Optional, Sequence

from ._errors import ContainerError
from ._ns import namespaces as _namespaces
from ._process import Args, File, Process, Result, _JoinTarget, run, spawn
from ._spec import Spec, with_fields

__all__ = ["Container", "enter"]


def _join_types(pid: int, wanted: Optional[Sequence[str]]) -> tuple:  # type: ignore[type-arg]
    """Namespace types to setns() into: those where `pid` differs from us (joining one's own
    user namespace is an error), limited to `wanted`. A time namespace cannot be joined by a
    process that shares memory with its parent: refused with ContainerError, not skipped."""
    ours, theirs = _namespaces("self"), _namespaces(pid)
    if wanted is not None:
        unknown = sorted(set(wanted) - set(theirs))
        if unknown:
            raise ValueError(f"namespaces: unknown type(s) {', '.join(unknown)}")
    types = [t for t in theirs if theirs[t] != ours.get(t) and (wanted is None or t in wanted)]
    if "time" in types:
        raise ContainerError(
            f"process {pid} has its own time namespace, which nsfast cannot join: setns() into a time "
            "namespace needs a process that shares no memory, and exec shares the caller's to avoid "
            "copying its page tables; pass namespaces= without 'time' to enter the others")
    return tuple(types)


class Container:
    """A long-lived sandbox whose main process is `command` (or, with command=None, nsfast's
    idle init that reaps what runs inside), and into which commands are exec'd.
    Leaving a `with` block stops it (SIGTERM, `stop_timeout` seconds, then kill); an
    exception kills it at once.

        with nsfast.Container(hostname="box") as c:
            c.exec(["ps", "aux"], capture_output=True, text=True).stdout
    """

    def __init__(self, command: Optional[Args] = None, *, spec: Optional[Spec] = None, name: Optional[str] = None,
                 stop_timeout: float = 10, **spec_fields: Any) -> None:
        self.spec = with_fields(spec, spec_fields)
        self.stop_timeout = stop_timeout
        if command is None:
            self.spec = self.spec.replace(init=True)
        self.command = command
        self.name = name if name is not None else "c-" + uuid.uuid4().hex[:12]
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a non-empty str without '/', got {self.name!r}")
        self._proc: Optional[Process] = None
        self._stdio: Dict[str, File] = {}

    def __repr__(self) -> str:
        state = "not started" if self._proc is None else ("running" if self.running else "stopped")
        return f"<nsfast.Container {self.name} pid={self.pid} {state}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, *, stdin: File = None, stdout: File = None, stderr: File = None) -> "Container":
        """Start the main process (pid 1 of the container). Once only."""
        if self._proc is not None:
            raise ContainerError(f"container {self.name} was already started")
        self._proc = Process(self.command or [], spec=self.spec, stdin=stdin, stdout=stdout, stderr=stderr)
        return self

    @property
    def process(self) -> Optional[Process]:
        """The main process, once started."""
        return self._proc

    @property
    def pid(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pid

    @property
    def pidfd(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pidfd

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self._proc is None else self._proc.poll()

    def namespaces(self) -> Dict[str, int]:
        return _namespaces(self._running_pid())

    def stop(self, timeout: float = 10) -> Optional[int]:
        """SIGTERM the main process, wait up to `timeout` s, then kill the whole container.
        Returns the main process's returncode; a no-op once stopped."""
        if self._proc is None:
            raise ContainerError(f"container {self.name} was never started")
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def kill(self) -> Optional[int]:
        """Kill every process of the container now."""
        if self._proc is None:
            raise ContainerError(f"container {self.name} was never started")
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        return self._proc.returncode

    def __enter__(self) -> "Container":
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
        pid = self._running_pid()
        return _JoinTarget(pid=pid, namespaces=_join_types(pid, None),
                           cgroup=self.spec.cgroup and self._proc is not None and self._proc._cgroup is not None,
                           cwd=self.spec.cwd if cwd is None else cwd)

    def _exec_spec(self, env: Optional[Dict[str, str]]) -> Spec:
        return self.spec if env is None else self.spec.replace(env=env)

    def exec(self, args: Args, *, input: Any = None, capture_output: bool = False, stdin: File = None,
             stdout: File = None, stderr: File = None, timeout: Optional[float] = None, check: bool = False,
             text: bool = False, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
             pass_fds: Sequence[int] = ()) -> Result:
        """Run `args` inside the container (all its namespaces, root, cwd and cgroup, its
        environment unless `env`), wait, return a Result — like `docker exec`."""
        target = self._target(cwd)
        return run(args, spec=self._exec_spec(env), input=input, capture_output=capture_output, stdin=stdin,
                   stdout=stdout, stderr=stderr, timeout=timeout, check=check, text=text, pass_fds=pass_fds,
                   _join=target)

    def spawn(self, args: Args, *, stdin: File = None, stdout: File = None, stderr: File = None, text: bool = False,
              env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None, pass_fds: Sequence[int] = ()) -> Process:
        """Start `args` inside the container and return its Process at once."""
        target = self._target(cwd)
        return Process(args, spec=self._exec_spec(env), stdin=stdin, stdout=stdout, stderr=stderr, text=text,
                       pass_fds=pass_fds, _join=target)


def enter(pid: int, args: Args, *, namespaces: Optional[Sequence[str]] = None, input: Any = None,
          capture_output: bool = False, stdin: File = None, stdout: File = None, stderr: File = None,
          timeout: Optional[float] = None, check: bool = False, text: bool = False,
          env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None, cgroup: bool = False,
          pass_fds: Sequence[int] = ()) -> Result:
    """Run `args` inside the namespaces of any process `pid` (all that differ from ours, or
    `namespaces`), with its root and working directory (or `cwd`), like `nsenter -t PID -a`.
    cgroup=True also puts it into `pid`'s cgroup(s)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"pid must be a positive int, got {pid!r}")
    try:
        types = _join_types(pid, namespaces)
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    target = _JoinTarget(pid=pid, namespaces=types, cgroup=cgroup, cwd=cwd)
    spec = with_fields(None, {} if env is None else {"env": env})
    return run(args, spec=spec, input=input, capture_output=capture_output, stdin=stdin, stdout=stdout,
               stderr=stderr, timeout=timeout, check=check, text=text, pass_fds=pass_fds, _join=target)
