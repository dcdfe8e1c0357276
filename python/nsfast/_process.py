"""Running sandboxes, shaped like `subprocess`: `run`, `spawn`, `Process`, `Result`."""

from __future__ import annotations

import codecs
import dataclasses
import fcntl
import io
import os
import selectors
import signal
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from subprocess import DEVNULL, PIPE, STDOUT, CalledProcessError
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import _cgroup, _core
from . import _trees as _trees_mod
from ._errors import OutputLimitError, OverlayError, SpawnError, SpecError
from ._spec import Overlay, Spec, SpecFields, StrPath, with_fields

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["run", "spawn", "Process", "Result", "Usage", "TimeoutExpired", "PIPE", "DEVNULL", "STDOUT"]

Args = Union[StrPath, bytes, Sequence[Union[StrPath, bytes]]]

#: What `run`, `arun`, `Container.exec`, `enter` and a zygote's tasks keep of each captured
#: stream (stdout, stderr) by default: a sandbox that writes more is killed (OutputLimitError).
#: Its memory limit does not bound what the caller holds of its output; this does.
DEFAULT_CAPTURE_MAX_BYTES = 64 << 20
File = Union[None, int, IO[Any]]


@dataclass(frozen=True)
class Usage:
    """What a sandbox run cost. Fields the kernel did not report are None."""

    wall_s: float
    cpu_user_s: Optional[float] = None
    cpu_system_s: Optional[float] = None
    memory_peak_bytes: Optional[int] = None
    pids_peak: Optional[int] = None
    oom_killed: bool = False
    timed_out: bool = False
    #: Why the run ended: "exit", "signal", "timeout", "cpu_time" (Limits.cpu_time),
    #: "memory" (killed by the OOM killer), as BenchExec's terminationreason, or "output"
    #: (a captured stream passed `capture_max_bytes`: killed, OutputLimitError).
    termination: str = "exit"


class TimeoutExpired(subprocess.TimeoutExpired):
    """`subprocess.TimeoutExpired` (catch either) with `.usage`: what the killed run cost, from
    `run`/`Container.exec` (termination "timeout"); None from `wait`/`communicate`, after which
    the sandbox still runs."""

    def __init__(
        self,
        cmd: Any,
        timeout: Optional[float],
        output: Any = None,
        stderr: Any = None,
        usage: Optional[Usage] = None,
    ) -> None:
        super().__init__(cmd, timeout if timeout is not None else 0.0, output, stderr)
        self.timeout = timeout  # type: ignore[assignment]  # None: no timeout was given
        self.usage = usage


class Result(subprocess.CompletedProcess):  # type: ignore[type-arg]
    """`subprocess.CompletedProcess` plus `.usage` (an `nsfast.Usage`) and `.files` (what
    `run(outputs=...)` read back: sandbox path -> bytes)."""

    def __init__(
        self,
        args: Any,
        returncode: int,
        stdout: Any = None,
        stderr: Any = None,
        usage: Optional[Usage] = None,
        files: Optional[Dict[str, bytes]] = None,
    ) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.usage = usage
        self.files: Dict[str, bytes] = {} if files is None else files
        #: What the sandbox changed below its `nsfast.Overlay` mounts: path -> "added",
        #: "modified" or "deleted".
        self.changes: Dict[str, str] = {}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", usage={self.usage!r})"


def _argv(args: Args) -> Tuple[List[bytes], List[Any]]:
    if isinstance(args, (str, bytes, os.PathLike)):
        args = [args]
    out = []
    for a in args:
        if isinstance(a, bytes):
            out.append(a)
        elif isinstance(a, (str, os.PathLike)):
            out.append(os.fsencode(a))
        else:
            raise TypeError(f"args must hold str, bytes or os.PathLike, not {type(a).__name__}")
        if b"\0" in out[-1]:
            raise ValueError(f"args: embedded NUL byte in {a!r}")
    if not out:
        raise ValueError("args must not be empty")
    return out, list(args)


def check_input(data: Any, text: bool) -> None:
    """run()'s check of `input=` before anything starts (see input_bytes)."""
    if data is not None and not (text and isinstance(data, str)):
        input_bytes(data, copy=False)


def input_bytes(data: Any, copy: bool = True) -> bytes:
    """`input=` as bytes: a bytes-like object (as subprocess, whose write needs one); not an
    int, which bytes() would make that many NUL bytes of."""
    if isinstance(data, str):
        raise TypeError("input must be bytes-like (str only with text=True)")
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"input must be a bytes-like object, not {type(data).__name__}") from None
    return view.tobytes() if copy else b""


def _check_open(what: str, fd: int) -> None:
    """OSError EBADF unless `fd` (an fd number of the caller's) is open."""
    if fd < 0:
        return  # PIPE, DEVNULL, STDOUT; or refused below, with its own message
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as e:
        raise OSError(e.errno, f"{what}: fd {fd} is not open ({e.strerror})") from None


def id_base_of(target: _JoinTarget) -> Optional[int]:
    """Which range the sandbox `target` is in: its own Sandbox's (a Container's, held since
    it started), else what the first line of its pid's uid_map says, if that is the start of
    a range with 65536 ids (a pid 1 that unshared a user namespace of its own shows another
    map: not a range, None)."""
    held = getattr(target.held, "sandbox", None)
    if held is not None:
        return int(held.id_base) if held.id_base is not None else None
    try:
        with open(f"/proc/{target.pid}/uid_map") as f:
            first = f.readline().split()
    except OSError:
        return None
    if len(first) != 3 or first[0] != "0" or first[2] != str(_core.SANDBOX_ID_COUNT):
        return None
    base = int(first[1])
    own = base >= _core.SANDBOX_RANGES_BASE and (base - _core.SANDBOX_RANGES_BASE) % _core.SANDBOX_ID_COUNT == 0
    return base if own and base < _core.SANDBOX_OWNER_BASE or base == _core.SANDBOX_ID_BASE else None


def _pipe_owner(spec: Spec, userns: bool, base: Optional[int]) -> Optional[Tuple[int, int]]:
    """The host ids a root caller's sandbox user has (its user namespace maps inside ids
    0.. to `base`..., its range); None when the caller's own ids are the sandbox's (rootless,
    or root nested in a sandbox, whose user namespace has no such ids) or the range is not
    known."""
    if os.geteuid() != 0 or not _core.sandbox_id_range() or not userns or base is None:
        return None
    return (base + (spec.uid or 0), base + (spec.gid or 0))


def _explain_hidden(err: SpawnError, argv: List[bytes], spec: Spec) -> None:
    """A command that is not found because it lies under a directory the default sandbox
    hides (a venv under /home, say): say so, and how to expose it."""
    import errno as _errno
    import shutil

    if err.step != "exec" or err.errno not in (_errno.ENOENT, _errno.EACCES, _errno.ENOTDIR) or spec.rootfs is not None:
        return
    if not argv or not spec.hidden:
        return
    cmd = os.fsdecode(argv[0])
    path = cmd if "/" in cmd else shutil.which(cmd, path=dict(spec._env_items).get("PATH"))
    if path is None:
        return
    for p in (os.path.abspath(path), os.path.realpath(path)):
        for h in spec.hidden:
            if p == h or p.startswith(h + "/"):  # Spec normalised `hidden` (no trailing '/')
                err.hint = (
                    f"{p} is under {h}, which the sandbox hides (Spec.hidden); expose it with "
                    f"mounts=[nsfast.Bind({os.path.dirname(p)!r}, {os.path.dirname(p)!r})] or a "
                    f"hidden= list without {h}"
                )
                return


class _Handles:
    """Child-side fds for stdio and the parent-side pipe ends (Popen._get_handles)."""

    def __init__(self, stdin: File, stdout: File, stderr: File, owner: Optional[Tuple[int, int]] = None) -> None:
        # owner: the host ids of the sandbox's user, to whom the pipes nsfast makes belong,
        # so it can reopen them (/dev/stdout, /proc/self/fd/1) like its own.
        self.owner = owner
        self.child = [-1, -1, -1]
        self.to_close: List[int] = []
        self.pipes: List[int] = []  # the child's ends of PIPEs
        self.parent: List[Optional[int]] = [None, None, None]
        try:
            for i, spec in enumerate((stdin, stdout, stderr)):
                self.child[i] = self._one(i, spec)
        except BaseException:
            self.close_child()
            for fd in self.parent:
                if fd is not None:
                    os.close(fd)
            raise

    def _one(self, i: int, spec: File) -> int:
        if spec is None:
            return -1
        if spec == PIPE:
            r, w = os.pipe2(os.O_CLOEXEC)
            child, parent = (r, w) if i == 0 else (w, r)
            self.parent[i] = parent
            self.to_close.append(child)
            self.pipes.append(child)
            if self.owner is not None:
                os.fchown(child, *self.owner)
            return child
        if spec == DEVNULL:
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self.to_close.append(fd)
            return fd
        if spec == STDOUT:
            if i != 2:
                raise ValueError("STDOUT is only valid for stderr")
            return self.child[1] if self.child[1] != -1 else 1
        if isinstance(spec, int):
            if spec < 0:
                raise ValueError(f"invalid file descriptor {spec}")
            return spec
        try:
            return spec.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise TypeError(
                f"stdio must be None, PIPE, DEVNULL, STDOUT, an fd or a file with fileno(), not {type(spec).__name__}"
            ) from None

    def close_child(self) -> None:
        for fd in self.to_close:
            os.close(fd)
        self.to_close = []


class Process:
    """A running sandbox (like `subprocess.Popen`). Use `nsfast.spawn()` to make one.

    `.pid` is the host pid of the sandbox's first process and `.pidfd` a pidfd for it
    (closed, and set to None, once the process is reaped). `.returncode` is None while it
    runs, negative -N if it was killed by signal N. `kill()` ends the whole sandbox.
    """

    def __init__(
        self,
        args: Args,
        *,
        spec: Optional[Spec] = None,
        stdin: File = None,
        stdout: File = None,
        stderr: File = None,
        text: bool = False,
        pass_fds: Sequence[int] = (),
        _join: Optional[_JoinTarget] = None,
        _start: Optional[Callable[[Tuple[int, int, int]], Any]] = None,
        _id_base: Optional[int] = None,
        _trees: Sequence[str] = (),
        _commits: bool = False,
        _give: Sequence[int] = (),
        **spec_fields: Unpack[SpecFields],
    ) -> None:
        # _start(stdio) -> a Sandbox: what starts it instead of _core.spawn (a zygote task,
        # which makes its own cgroup), in the range at _id_base (the zygote's). _trees:
        # sandbox paths of writable trees to hold open (self._trees), for reading files back
        # (_trees.py).
        self.spec = with_fields(spec, spec_fields)
        self._trees: Optional[_trees_mod.Trees] = None
        if not _commits and any(isinstance(m, Overlay) and m.commit for m in self.spec.mounts):
            raise SpecError("mounts", "Overlay(commit=True) needs nsfast.run (it commits when the run exits 0)")
        if _join is not None and not args:
            raise ValueError("args must not be empty")
        if not args and _join is None and self.spec.image is not None:
            # As docker run: the image's Entrypoint and Cmd when no command is given.
            args = [*self.spec.image.config.entrypoint, *self.spec.image.config.cmd]
            if not args:
                raise ValueError("args must not be empty (the image's config has no Entrypoint or Cmd)")
        argv, self.args = _argv(args) if args or not self.spec.init else ([], [])
        self.returncode: Optional[int] = None
        self.usage: Optional[Usage] = None
        self.pid = -1
        self.text = bool(text)
        self._detached = False
        self._wait_lock = threading.Lock()
        self._comm: Optional[_Communication] = None
        # A process that joined a running sandbox (exec/enter): its output ends when it does.
        self._joined = _join is not None
        self._sandbox: Any = None
        fds = sorted({int(fd) for fd in pass_fds})
        # Every fd number given must be open now, before nsfast opens any of its own: a closed
        # one would be filled by the next fd nsfast opens (found by an audit: the sandbox got
        # its own cgroup directory, and through it the host's /sys/fs/cgroup), as stdio or as
        # a passed fd. subprocess raises EBADF for such stdio as well.
        for f in (stdin, stdout, stderr):
            if isinstance(f, int) and not isinstance(f, bool):
                _check_open("stdio", f)
        for fd in fds:
            _check_open("pass_fds", fd)
        for fd in fds:
            if fd < 0:
                raise ValueError(f"pass_fds: invalid file descriptor {fd}")
        cgroup = None
        if self.spec.cgroup and _join is None and _start is None:
            cgroup = _cgroup.request(
                self.spec.limits,
                kill_tree="pid" not in self.spec.namespaces,
                strict=self.spec.strict,
                delegate=self.spec.delegate_cgroup,
            )
        # The pipes are the sandbox user's (so that it may reopen them, /dev/stdout): a new
        # sandbox's range is chosen as it starts, and _core.spawn gives them (chown=).
        if _join is not None:
            owner = _pipe_owner(self.spec, "user" in _join.namespaces, id_base_of(_join))
        elif _start is not None:
            owner = _pipe_owner(self.spec, "user" in self.spec.namespaces, _id_base)
        else:
            owner = None
        handles = _Handles(stdin, stdout, stderr, owner)
        try:
            stdio = (handles.child[0], handles.child[1], handles.child[2])
            if _start is not None:
                self._sandbox = _start(stdio)
            elif _join is None:
                trees = _trees_mod.core_paths(self.spec, _trees)
                self._sandbox = _core.spawn(
                    self.spec, argv, stdio=stdio, pass_fds=fds, cgroup=cgroup, trees=trees,
                    chown=[*handles.pipes, *_give],
                )  # fmt: skip
                if _trees:
                    base = self._sandbox.id_base
                    root = None if base is None or os.geteuid() != 0 else (base, base)
                    self._trees = _trees_mod.Trees(_trees, self._sandbox.take_trees(), root)
            else:
                self._sandbox = _core.spawn_join(
                    self.spec,
                    argv,
                    target=_join.pid,
                    join=list(_join.namespaces),
                    cwd=None if _join.cwd is None else os.fsencode(_join.cwd),
                    stdio=stdio,
                    pass_fds=fds,
                    join_cgroup=_join.cgroup,
                    held=_join.held,
                    pin=_join.pin,
                )
        except BaseException as e:
            for pfd in handles.parent:
                if pfd is not None:
                    os.close(pfd)
            if isinstance(e, SpawnError) and _join is None and _start is None:
                _explain_hidden(e, argv, self.spec)
            raise
        finally:
            handles.close_child()
        self.pid = self._sandbox.pid
        self.stdin: Optional[IO[Any]] = self._file(handles.parent[0], "wb")
        self.stdout: Optional[IO[Any]] = self._file(handles.parent[1], "rb")
        self.stderr: Optional[IO[Any]] = self._file(handles.parent[2], "rb")

    @property
    def pidfd(self) -> Optional[int]:
        """A pidfd for the first process while it is not reaped (None after, or detached)."""
        sb = self._sandbox
        if sb is None or self.returncode is not None or self._detached:
            return None
        return int(sb.fileno())

    def _file(self, fd: Optional[int], mode: str) -> Optional[IO[Any]]:
        if fd is None:
            return None
        f: IO[Any] = open(fd, mode, buffering=0 if mode == "wb" else -1)
        if self.text:
            f = io.TextIOWrapper(f, write_through=True, line_buffering=mode == "wb")
        return f

    def __repr__(self) -> str:
        return f"<nsfast.Process pid={self.pid} returncode={self.returncode} args={self.args!r}>"

    # -- waiting ---------------------------------------------------------------------------

    def _reaped(self, exit: Any) -> None:
        if exit.cleanup_error is not None:
            # The run itself is over and reaped: report, do not lose its result.
            warnings.warn(
                f"nsfast: cleaning up the cgroup of sandbox {self.pid} failed: {exit.cleanup_error}",
                _cgroup.CgroupWarning,
                stacklevel=4,
            )
        self.usage = Usage(
            wall_s=exit.wall_s,
            cpu_user_s=exit.cpu_user_s,
            cpu_system_s=exit.cpu_system_s,
            memory_peak_bytes=exit.memory_peak_bytes,
            pids_peak=exit.pids_peak,
            oom_killed=exit.oom_killed,
            timed_out=exit.termination == "timeout",
            termination=exit.termination,
        )
        self.returncode = exit.returncode
        # Let the Sandbox go now (its pidfd closes), not when a reference cycle is collected.
        self._sandbox = None

    def poll(self) -> Optional[int]:
        """The returncode if the sandbox has exited (reaping it), else None."""
        return self._wait(0.0, block=False)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the sandbox's first process to exit; TimeoutExpired after `timeout` s."""
        if self._detached and self.returncode is None:
            raise ValueError("wait() on a detached sandbox: it is no longer this Process's")
        rc = self._wait(timeout, block=True)
        if rc is None:
            raise TimeoutExpired(self.args, timeout)
        return rc

    def _wait(self, timeout: Optional[float], *, block: bool) -> Optional[int]:
        if self.returncode is not None:
            return self.returncode
        # Another thread may be waiting already: wait for it no longer than our own timeout
        # (as Popen does), then for the process with what is left.
        start = time.monotonic()
        if not block:
            acquired = self._wait_lock.acquire(blocking=False)
        elif timeout is None:
            acquired = self._wait_lock.acquire()
        else:
            acquired = self._wait_lock.acquire(timeout=max(0.0, timeout))
        if not acquired:
            return self.returncode
        try:
            sb = self._sandbox
            if self.returncode is None and not self._detached and sb is not None:
                left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
                try:
                    exit = sb.poll() if not block else sb.wait(left)
                except BaseException:
                    # Ctrl-C (or another signal handler's exception) while waiting: unlike
                    # Popen, leave nothing running behind the exception. A second Ctrl-C
                    # interrupts this reap too; the Sandbox then reaps when it goes.
                    sb.kill()
                    exit = sb.wait()
                    self._reaped(exit)
                    raise
                if exit is not None:
                    self._reaped(exit)
        finally:
            self._wait_lock.release()
        return self.returncode

    # -- signals ---------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the sandbox's first process (no-op once it has been reaped).

        With a pid namespace the first process is nsfast-init (the default), which forwards
        the signal to the command. With `init=False` the command is pid 1 of its pid
        namespace, and the kernel drops signals it has no handler for (SIGTERM, SIGINT, ...)
        — like `docker run` without `--init`. SIGKILL always works."""
        sb = self._sandbox
        if sb is not None and not self._detached:
            sb.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM to the sandbox's command (send_signal)."""
        self.send_signal(signal.SIGTERM)

    def kill(self, _reason: Optional[str] = None) -> None:
        """Kill the whole sandbox: every process in its cgroup (cgroup.kill on v2, freezer +
        SIGKILL on v1), and SIGKILL to its pid 1, which ends every process of a pid
        namespace; without either, its process group (a session leader's) is killed too."""
        sb = self._sandbox
        if sb is not None and not self._detached:
            sb.kill(_reason)

    # -- I/O -------------------------------------------------------------------------------

    def communicate(
        self, input: Any = None, timeout: Optional[float] = None, *, capture_max_bytes: Optional[int] = None
    ) -> Tuple[Any, Any]:
        """Send `input`, read stdout/stderr to EOF, wait; like Popen.communicate. After a
        TimeoutExpired, calling it again resumes without losing output. `capture_max_bytes`:
        a stream that passes it is cut there, the sandbox killed and reaped, and
        OutputLimitError raised (its `.result` holds the output); it is the first call's."""
        if self._comm is None:
            check_capture_max_bytes(capture_max_bytes)
            if input is not None and self.stdin is None:
                raise ValueError("input given but stdin is not PIPE")
            self._comm = _Communication(self, input, capture_max_bytes)
        elif input is not None:
            raise ValueError("communicate() resumed after a timeout: pass input=None")
        deadline = None if timeout is None else time.monotonic() + timeout
        out, err = self._comm.run(deadline, timeout)
        if self._comm.cut is not None:
            self.wait()  # killed: its first process ends at once
            raise self._output_limit(self._comm.cut, self._comm.limit, out, err)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._wait(left, block=True) is None:
            raise TimeoutExpired(self.args, timeout, out, err)
        return out, err

    def _output_limit(self, stream: str, limit: Any, out: Any, err: Any) -> OutputLimitError:
        """The OutputLimitError of a reaped sandbox whose `stream` was cut: its usage says
        "output" unless a limit of its own (timeout, cpu_time, memory) ended it first."""
        if self.usage is not None and self.usage.termination in ("exit", "signal"):
            self.usage = dataclasses.replace(self.usage, termination="output")
        assert self.returncode is not None
        return OutputLimitError(stream, limit, Result(self.args, self.returncode, out, err, self.usage))

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._comm is not None:
            self._comm.sel.close()
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if exc[0] is not None and self.returncode is None:
            self.kill()
        self.wait()

    def detach(self) -> List[str]:
        """Let the sandbox outlive this object and this process (used by `nsfast run -d`):
        no kill on garbage collection, its cgroup is left in place (its paths are returned)."""
        self._detached = True
        return list(self._sandbox.detach()) if self._sandbox is not None else []

    def __del__(self) -> None:
        sb = getattr(self, "_sandbox", None)
        if sb is None or self.returncode is not None or getattr(self, "_detached", False):
            return
        try:
            if self.poll() is not None:
                return  # it had exited: reaped (and its cgroup removed) without a fuss
        except OSError:
            return  # nothing left to end (and __del__ must not raise)
        # Unlike Popen, kill rather than leak a running sandbox (and its cgroup); say so.
        warnings.warn(
            f"nsfast sandbox {self.pid} is still running; killing it", ResourceWarning, stacklevel=2, source=self
        )
        self.kill()
        try:
            self.wait(1.0)
        except TimeoutExpired:
            pass


@dataclass(frozen=True)
class _JoinTarget:
    """What `Process` joins instead of creating namespaces (exec / enter)."""

    pid: int
    namespaces: Tuple[str, ...]
    cgroup: bool
    cwd: Optional[str]
    held: Any = None  # a container's _Held: what it held since its start
    pin: Optional[int] = None  # a pidfd of `pid` opened before the caller checked who it is


def decode_output(data: bytes, f: Any, text: bool, final: bool = True) -> Any:
    """What communicate() returns for `data` read from the pipe file `f`: the bytes, or with
    `text` the str in `f`'s encoding with universal newlines (as Popen). Output so far
    (final=False, at a timeout) may end inside a multi-byte character: that tail is left out
    instead of failing; a resumed communicate() decodes it."""
    if not text:
        return data
    decoder = codecs.getincrementaldecoder(getattr(f, "encoding", "utf-8"))(getattr(f, "errors", "strict"))
    decoded: str = decoder.decode(data, final=final)
    return decoded.replace("\r\n", "\n").replace("\r", "\n")


def check_capture_max_bytes(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise SpecError("capture_max_bytes", f"must be a non-negative int or None, not {value!r}")


def run_stdio(
    input: Any, capture_output: bool, stdin: File, stdout: File, stderr: File, timeout: Optional[float]
) -> Tuple[File, File, File]:
    """run()'s checks of its stdio arguments and timeout (as subprocess.run), and the stdio
    they make: PIPE for `input` and for `capture_output`."""
    if input is not None:
        if stdin is not None:
            raise ValueError("stdin and input arguments may not both be used")
        stdin = PIPE
    if capture_output:
        if stdout is not None or stderr is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output")
        stdout = stderr = PIPE
    if timeout is not None and (timeout != timeout or timeout < 0):
        raise ValueError(f"timeout must be a number >= 0, got {timeout!r}")
    return stdin, stdout, stderr


class _Communication:
    """State of one communicate(): survives a TimeoutExpired (as in subprocess)."""

    def __init__(self, proc: Process, input: Any, limit: Optional[int] = None) -> None:
        self.proc = proc
        self.sel = selectors.DefaultSelector()
        # One growing buffer per stream, not a list of reads: a sandbox writing a byte per
        # write() made each byte a bytes object of ~40 (2.7 GiB for the 64 MiB cap).
        self.chunks: dict[str, bytearray] = {}
        self.room: dict[str, int] = {}  # bytes each stream may still bring (with a limit)
        self.limit = limit
        #: The first stream that passed `limit`: the sandbox was killed then.
        self.cut: Optional[str] = None
        self.input = b""
        self.offset = 0
        if proc.stdin is not None:
            data = input
            if data is None:
                data = b""
            if proc.text and isinstance(data, str):
                data = data.encode(getattr(proc.stdin, "encoding", "utf-8"))
            self.input = input_bytes(data)
            if self.input:
                os.set_blocking(proc.stdin.fileno(), False)
                self.sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
            else:
                proc.stdin.close()
        for name in ("stdout", "stderr"):
            f = getattr(proc, name)
            if f is not None:
                self.chunks[name] = bytearray()
                if limit is not None:
                    self.room[name] = limit
                self.sel.register(f.fileno(), selectors.EVENT_READ, name)
        # A process joined into a running sandbox: once it exited, what it wrote is in the
        # pipes, and nothing is waited for beyond (as docker exec). Its pipes are reachable by
        # the sandbox's own processes (the same uid: /proc/PID/fd/1), one of which could hold
        # them open: reading to EOF hung the caller until its timeout, or for ever.
        pidfd = proc.pidfd if proc._joined and self.chunks else None
        if pidfd is not None:
            self.sel.register(pidfd, selectors.EVENT_READ, "exit")

    def _decode(self, name: str, final: bool = True) -> Any:
        if name not in self.chunks:
            return None
        # A stream cut at the limit may end inside a character: that tail is left out.
        final = final and self.room.get(name, 0) >= 0
        return decode_output(bytes(self.chunks[name]), getattr(self.proc, name), self.proc.text, final)

    def _take(self, name: str, data: bytes) -> bool:
        """Keep `data` of stream `name` up to the limit; False once it passed it (the
        sandbox is killed then: what it writes after is not read)."""
        room = self.room.get(name)
        if room is None or len(data) <= room:
            self.chunks[name] += data
            if room is not None:
                self.room[name] = room - len(data)
            return True
        self.chunks[name] += data[:room]
        self.room[name] = -1
        if self.cut is None:
            self.cut = name
            self.proc.kill()
        return False

    def _drain_and_close(self) -> None:
        """The joined process exited: take what its pipes hold (a writer that is still there
        is not waited for), close them and stop."""
        proc = self.proc
        for key in list(self.sel.get_map().values()):
            name = key.data
            self.sel.unregister(key.fd)
            if name in ("stdout", "stderr"):
                os.set_blocking(key.fd, False)
                while True:
                    try:
                        data = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        break
                    if not data or not self._take(name, data):
                        break
                getattr(proc, name).close()
            elif name == "stdin":
                assert proc.stdin is not None
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass

    def run(self, deadline: Optional[float], timeout: Optional[float]) -> Tuple[Any, Any]:
        proc = self.proc
        while self.sel.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutExpired(proc.args, timeout, self._decode("stdout", False), self._decode("stderr", False))
            for key, _ in self.sel.select(left):
                name = key.data
                if name == "exit":
                    self._drain_and_close()
                    break
                if name == "stdin":
                    try:
                        self.offset += os.write(key.fd, self.input[self.offset : self.offset + 65536])
                    except BrokenPipeError:
                        self.offset = len(self.input)
                    if self.offset >= len(self.input):
                        self.sel.unregister(key.fd)
                        assert proc.stdin is not None
                        try:
                            proc.stdin.close()
                        except BrokenPipeError:
                            pass
                else:
                    data = os.read(key.fd, 1 << 16)
                    if not data or not self._take(name, data):
                        # EOF, or cut: closing it (EPIPE for a writer that goes on) means
                        # nothing that outlived the kill keeps this call waiting.
                        self.sel.unregister(key.fd)
                        getattr(proc, name).close()
        self.sel.close()
        return self._decode("stdout"), self._decode("stderr")


def spawn(
    args: Args,
    *,
    spec: Optional[Spec] = None,
    stdin: File = None,
    stdout: File = None,
    stderr: File = None,
    text: bool = False,
    pass_fds: Sequence[int] = (),
    **spec_fields: Unpack[SpecFields],
) -> Process:
    """Start `args` in a new sandbox and return its `Process` at once.

    Keyword `spec_fields` (namespaces=, rootfs=, mounts=, hostname=, env=, cwd=, uid=,
    gid=, init=, ...) override the fields of `spec`. Raises `SpawnError` if the sandbox
    could not be set up or the command could not be executed."""
    return Process(
        args, spec=spec, stdin=stdin, stdout=stdout, stderr=stderr, text=text, pass_fds=pass_fds, **spec_fields
    )


def run(
    args: Args,
    *,
    spec: Optional[Spec] = None,
    input: Any = None,
    capture_output: bool = False,
    stdin: File = None,
    stdout: File = None,
    stderr: File = None,
    timeout: Optional[float] = None,
    check: bool = False,
    text: bool = False,
    pass_fds: Sequence[int] = (),
    outputs: Optional[Sequence[str]] = None,
    outputs_max_bytes: int = _trees_mod.DEFAULT_OUTPUTS_MAX_BYTES,
    capture_max_bytes: Optional[int] = DEFAULT_CAPTURE_MAX_BYTES,
    changes_max_bytes: int = _trees_mod.DEFAULT_CHANGES_MAX_BYTES,
    _join: Optional[_JoinTarget] = None,
    _start: Optional[Callable[[Tuple[int, int, int]], Any]] = None,
    _id_base: Optional[int] = None,
    **spec_fields: Unpack[SpecFields],
) -> Result:
    """Run `args` in a new sandbox, wait for it, return a `Result` (like subprocess.run).

    `timeout` kills the whole sandbox and raises `nsfast.TimeoutExpired` (a
    `subprocess.TimeoutExpired`), whose `.usage`
    is the run's `Usage` (with `timed_out=True`); `check=True` raises
    `subprocess.CalledProcessError` on a non-zero exit.

    `outputs`: paths inside the sandbox ("/tmp/out/*.json", "/work/result.txt"; glob per
    path component) of files to read back after it ended, into `Result.files` (sandbox path
    -> bytes). They must lie in a writable tree of the sandbox (its /tmp, /dev/shm, hidden
    directories, Tmpfs and writable Bind mounts, an overlay root), else SpecError; each is
    read safely (see _trees.py), and more than `outputs_max_bytes` in all is an OutputError
    naming the file (its `.result` is the run's Result).

    `capture_max_bytes`: the most kept of each captured stream (stdout or stderr PIPE,
    `capture_output`); one that passes it kills the sandbox and raises OutputLimitError,
    whose `.result` holds the output up to there (None: no limit, as subprocess).

    `changes_max_bytes`: the most the listing of the Overlay mounts' changes may take
    (`Result.changes`; each entry of their upper layers counts its path and 256 bytes);
    over it an OverlayError naming the path, with the run's `.result`, and nothing is
    committed."""
    check_capture_max_bytes(capture_max_bytes)
    if isinstance(changes_max_bytes, bool) or not isinstance(changes_max_bytes, int) or changes_max_bytes < 0:
        raise SpecError("changes_max_bytes", f"must be a non-negative int, not {changes_max_bytes!r}")
    spec = with_fields(spec, spec_fields)
    patterns: List[str] = []
    trees: List[str] = []
    if outputs is not None:
        if _join is not None or _start is not None:
            raise TypeError("outputs are only for a sandbox of its own (not exec or a zygote task)")
        if isinstance(outputs_max_bytes, bool) or not isinstance(outputs_max_bytes, int) or outputs_max_bytes < 0:
            raise SpecError("outputs_max_bytes", f"must be a non-negative int, not {outputs_max_bytes!r}")
        patterns, trees = _trees_mod.check_outputs(spec, outputs)
    # (An exec joins its container's mounts; a zygote task has the zygote's.)
    own = _join is None and _start is None
    cow = [m for m in spec.mounts if isinstance(m, Overlay)] if own else []
    trees += [m.dst for m in cow if m.dst not in trees]
    if any(m.commit for m in cow) and "pid" not in spec.namespaces:
        raise SpecError(
            "mounts",
            "Overlay(commit=True) needs the pid namespace: without it a process of the sandbox may outlive it and "
            "change the changes while they are applied",
        )
    check_input(input, text)
    stdin, stdout, stderr = run_stdio(input, capture_output, stdin, stdout, stderr, timeout)
    # Before the sandbox starts: a change the host makes in an Overlay's src from here on
    # is one its commit must not overwrite.
    since = _trees_mod.since_now() if any(m.commit for m in cow) else None
    sources = _trees_mod.open_sources(cow)
    try:
        with Process(
            args,
            spec=spec,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=text,
            pass_fds=pass_fds,
            _join=_join,
            _start=_start,
            _id_base=_id_base,
            _trees=trees,
            _commits=True,
        ) as proc:
            try:
                if proc.stdin is None and proc.stdout is None and proc.stderr is None:
                    proc.wait(timeout)
                    out = err = None
                else:
                    out, err = proc.communicate(input, timeout, capture_max_bytes=capture_max_bytes)
            except BaseException as exc:
                if isinstance(exc, TimeoutExpired):
                    proc.kill("timeout")
                    proc.wait()
                    exc.timeout = timeout  # type: ignore[assignment]
                    # What the killed run cost (termination "timeout"), next to the partial output.
                    exc.usage = proc.usage
                else:
                    proc.kill()
                # A run that did not end well reads nothing back (nor commits): its trees go now.
                if proc._trees is not None:
                    proc._trees.close()
                raise
        assert proc.returncode is not None
        result = Result(proc.args, proc.returncode, out, err, proc.usage)
        if proc._trees is not None:
            try:
                xattr = _trees_mod.userxattr(spec)
                ours = [m.dst for m in spec.mounts]
                budget = _trees_mod.Budget(changes_max_bytes)
                for m in cow:
                    try:
                        found = _trees_mod.changes(
                            proc._trees, m, sources[m.dst], userxattr=xattr, mount_points=ours, budget=budget
                        )
                    except _trees_mod.ChangesTooLarge as e:
                        why = (
                            f"the changes take over changes_max_bytes={changes_max_bytes} (each its path and 256 bytes)"
                        )
                        raise OverlayError(e.path, why, result) from None
                    except OSError as e:
                        raise OverlayError(m.dst, f"its changes cannot be listed: {e}", result) from None
                    result.changes.update((p, c[0]) for p, c in found.items())
                    if m.commit and proc.returncode == 0:
                        try:
                            _trees_mod.commit(proc._trees, m, found, sources[m.dst], since)
                        except OverlayError as e:
                            e.result = result
                            raise
                result.files = proc._trees.collect(patterns, outputs_max_bytes, result)
            finally:
                proc._trees.close()
        if check and proc.returncode:
            raise CalledProcessError(proc.returncode, proc.args, out, err)
        return result
    finally:
        for fd in sources.values():
            os.close(fd)


def settle() -> None:
    """Return once this process holds nothing of nsfast's own for sandboxes that ended.

    A root caller's `overlay=True` start takes overlays made ahead while the previous one
    with the same layers ran (kept at most 2 s unused), and the mounts of a sandbox that
    ended are closed on a thread of nsfast's, off the caller's path: for a moment after
    `run()` returns, this process still has a few fds of those mounts open. `settle()`
    discards the spares and waits for those closes; a leak check of your own calls it
    before it counts fds.
    """
    _core.settle()
