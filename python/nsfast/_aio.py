"""asyncio: sandboxes driven by the event loop. A sandbox's pidfd and its pipes are loop
readers (and stdin a writer): no thread per sandbox (starts run on one spawner thread per CPU). Cancelling a task kills its sandbox and
reaps it before the CancelledError propagates."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from subprocess import CalledProcessError
from typing import IO, TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

from ._errors import SpecError
from ._process import (
    DEFAULT_CAPTURE_MAX_BYTES,
    Args,
    File,
    Process,
    Result,
    TimeoutExpired,
    Usage,
    check_capture_max_bytes,
    check_input,
    decode_output,
    input_bytes,
    run_stdio,
)
from ._spec import Overlay, Spec, SpecFields, with_fields

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["arun", "aspawn", "AsyncProcess"]


async def _ready(fd: int, write: bool = False) -> None:
    """Until `fd` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _read_all(f: IO[Any], limit: Optional[int], cut: Callable[[], None]) -> Tuple[bytes, bool]:
    """What `f` brings to EOF, and False; or its first `limit` bytes and True once it
    brought more (`cut()` was called then and `f` is closed: nothing more is read)."""
    fd = f.fileno()
    os.set_blocking(fd, False)
    buf = bytearray()  # (not a list of reads: a byte per write() would cost ~40 each)
    room = limit
    try:
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                await _ready(fd)
                continue
            if not data:
                return bytes(buf), False
            if room is not None:
                if len(data) > room:
                    buf += data[:room]
                    cut()
                    return bytes(buf), True
                room -= len(data)
            buf += data
    finally:
        f.close()


async def _write_all(f: IO[Any], data: bytes) -> None:
    fd = f.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view[: 1 << 16]) :]
            except BlockingIOError:
                await _ready(fd, write=True)
            except BrokenPipeError:
                return  # the command stopped reading: as Popen.communicate
    finally:
        try:
            f.close()
        except BrokenPipeError:
            pass


class AsyncProcess:
    """A running sandbox driven by the event loop (`await nsfast.aspawn(...)`): `wait()` and
    `communicate()` are coroutines; `pid`, `returncode`, `usage`, `send_signal`, `terminate`
    and `kill` are as on `nsfast.Process` (which `.process` is)."""

    def __init__(self, process: Process) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        """The host pid of the sandbox's first process."""
        return self.process.pid

    @property
    def returncode(self) -> Optional[int]:
        """None until it ended, then as subprocess's (negative: killed by that signal)."""
        return self.process.returncode

    @property
    def usage(self) -> Optional[Usage]:
        """What the run cost (an nsfast.Usage), once it ended."""
        return self.process.usage

    @property
    def args(self) -> Any:
        """The command, as given."""
        return self.process.args

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the sandbox's command (as Process.send_signal)."""
        self.process.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM to the sandbox's command."""
        self.process.terminate()

    def kill(self) -> None:
        """Kill the whole sandbox (as Process.kill)."""
        self.process.kill()

    def __repr__(self) -> str:
        return f"<nsfast.AsyncProcess pid={self.pid} returncode={self.returncode}>"

    async def wait(self) -> int:
        """Until the sandbox's first process exits (its pidfd is a loop reader); then reap it,
        measure and clean up (as Process.wait). Cancelled, it kills and reaps the sandbox."""
        p = self.process
        try:
            while p.returncode is None:
                sb = p._sandbox
                if sb is None:
                    break
                await _ready(sb.fileno())
                p.poll()
        except BaseException:
            self._end()
            raise
        assert p.returncode is not None
        return p.returncode

    async def communicate(self, input: Any = None, *, capture_max_bytes: Optional[int] = None) -> Tuple[Any, Any]:
        """Send `input`, read stdout/stderr to EOF, wait; like Popen.communicate. Cancelled
        (or `asyncio.wait_for`'s timeout), it kills and reaps the sandbox. A stream that
        passes `capture_max_bytes` kills it and raises OutputLimitError (as
        `Process.communicate`)."""
        p = self.process
        check_capture_max_bytes(capture_max_bytes)
        if input is not None and p.stdin is None:
            raise ValueError("input given but stdin is not PIPE")
        cut: List[str] = []

        async def write(f: Optional[IO[Any]]) -> None:
            if f is not None:
                data = input if input is not None else b""
                if p.text and isinstance(data, str):
                    data = data.encode(getattr(f, "encoding", "utf-8"))
                await _write_all(f, input_bytes(data))

        async def read(f: Optional[IO[Any]], name: str) -> Any:
            if f is None:
                return None

            def kill() -> None:
                if not cut:
                    p.kill()
                cut.append(name)

            data, over = await _read_all(f, capture_max_bytes, kill)
            # A stream cut at the limit may end inside a character: that tail is left out.
            return decode_output(data, f, p.text, final=not over)

        try:
            _, out, err = await asyncio.gather(write(p.stdin), read(p.stdout, "stdout"), read(p.stderr, "stderr"))
            await self.wait()
        except BaseException:
            self._end()
            raise
        if cut:
            raise p._output_limit(cut[0], capture_max_bytes, out, err)
        return out, err

    def _end(self) -> None:
        """Kill the sandbox and reap it (its cgroup goes too) without the loop: a killed
        sandbox ends at once."""
        p = self.process
        if p.returncode is None:
            p.kill()
            p.wait()
        for f in (p.stdin, p.stdout, p.stderr):  # a reader that never ran did not close its pipe
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


async def aspawn(
    args: Args,
    *,
    spec: Optional[Spec] = None,
    stdin: File = None,
    stdout: File = None,
    stderr: File = None,
    text: bool = False,
    pass_fds: Sequence[int] = (),
    **spec_fields: Unpack[SpecFields],
) -> AsyncProcess:
    """Start `args` in a new sandbox (as `nsfast.spawn`) and return its AsyncProcess. The
    start itself (clone3 and the setup, GIL-free) runs on a small pool of spawner threads, one
    per CPU, so starts overlap; waiting and I/O stay in the loop. Cancelled while starting,
    the sandbox is ended as soon as it exists."""
    start = functools.partial(
        Process, args, spec=spec, stdin=stdin, stdout=stdout, stderr=stderr, text=text, pass_fds=pass_fds, **spec_fields
    )
    return await _aspawn_with(start)


async def _aspawn_with(start: Callable[[], Process]) -> AsyncProcess:
    cf = _spawner().submit(start)
    try:
        return AsyncProcess(await asyncio.shield(asyncio.wrap_future(cf)))
    except asyncio.CancelledError:
        # Runs in the spawner thread once the start is done (at once if it is): not on the
        # loop, which may be gone by then.
        cf.add_done_callback(_end_started)
        raise


def _end_started(cf: concurrent.futures.Future[Process]) -> None:
    if not cf.cancelled() and cf.exception() is None:
        AsyncProcess(cf.result())._end()


_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    """The spawner threads. They live as long as the interpreter: a sandbox's
    die_with_parent follows the thread that started it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="nsfast-spawn")
        return _pool


async def arun(
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
    capture_max_bytes: Optional[int] = DEFAULT_CAPTURE_MAX_BYTES,
    **spec_fields: Unpack[SpecFields],
) -> Result:
    """`nsfast.run` for asyncio: the same arguments and Result, driven by the event loop.
    `timeout` kills the whole sandbox and raises `nsfast.TimeoutExpired` (with `.usage`);
    cancelling the task kills and reaps the sandbox; `capture_max_bytes` as in `run`."""
    check_capture_max_bytes(capture_max_bytes)
    full = with_fields(spec, spec_fields)
    if any(isinstance(m, Overlay) for m in full.mounts):
        # (Found by an audit: arun's Result.changes stayed {}.) Listing and committing the
        # changes is run()'s work after the sandbox ended.
        raise SpecError(
            "mounts", "Overlay mounts need nsfast.run, which lists their changes (Result.changes) and commits them"
        )
    check_input(input, text)
    stdin, stdout, stderr = run_stdio(input, capture_output, stdin, stdout, stderr, timeout)
    proc = await aspawn(args, spec=full, stdin=stdin, stdout=stdout, stderr=stderr, text=text, pass_fds=pass_fds)
    return await _finish_run(proc, input, timeout, check, capture_max_bytes)


async def _finish_run(
    proc: AsyncProcess, input: Any, timeout: Optional[float], check: bool, capture_max_bytes: Optional[int]
) -> Result:
    """arun's body once the sandbox started (a zygote task's too): communicate, the timeout,
    cancellation, the Result."""
    p = proc.process
    task = asyncio.ensure_future(proc.communicate(input, capture_max_bytes=capture_max_bytes))
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:  # this task was cancelled
        # The inner task kills and reaps the sandbox and unregisters its pipes first; then
        # whatever it never got to (it may not have started) is ended here.
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        proc._end()
        raise
    if not done:
        # Kill the whole sandbox: its pipes reach EOF, so communicate() ends with the
        # output so far and the reaped Exit (termination "timeout").
        p.kill("timeout")
        try:
            out, err = await asyncio.wait_for(task, 10)
        except asyncio.TimeoutError:  # a pipe still held open elsewhere: give up on the output
            out = err = None
        raise TimeoutExpired(p.args, timeout, out, err, usage=p.usage)
    out, err = task.result()
    assert p.returncode is not None
    if check and p.returncode:
        raise CalledProcessError(p.returncode, p.args, out, err)
    return Result(p.args, p.returncode, out, err, p.usage)
