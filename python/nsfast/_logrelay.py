"""The log of a detached container (`nsfast run -d`): a small host process of the caller's,
outside the sandbox, that copies what the container writes to its stdout and stderr (a
pipe) into `log` in the container's state directory, and keeps at most `max` bytes there:
past it, `log` becomes `log.1` (the one before is dropped) and a new `log` starts, as
docker's json-file driver does with max-size and max-file=2 (so at most twice `max` on
disk). Without it the container wrote
to the file itself, without bound: `yes` filled `/run` (a tmpfs of host memory) in seconds.

Run by path with `-I -S` (nothing but the standard library is imported):

    python -I -S _logrelay.py PIPE_FD DIR_FD LOG_FD MAX_BYTES

It exits when every writer of the pipe has closed it: the container and all its processes
are gone. MAX_BYTES 0: no bound.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys

CHUNK = 1 << 16
# Not O_APPEND: splice(2) refuses it. The relay is the file's one writer.
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _rotate(d: int, log: int) -> int:
    """`log` -> `log.1` in `d`, and a new `log`; where that cannot be done (the state was
    removed meanwhile, a name in the way) the same file, emptied."""
    try:
        os.rename("log", "log.1", src_dir_fd=d, dst_dir_fd=d)
        new = os.open("log", _NEW, 0o600, dir_fd=d)
    except OSError:
        os.ftruncate(log, 0)
        os.lseek(log, 0, os.SEEK_SET)
        return log
    os.close(log)
    return new


def _copy(pipe: int, log: int, n: int) -> int:
    """Move at most `n` bytes from the pipe to the log (spliced: the bytes never pass through
    this process); how many were read from the pipe (0: every writer closed it). What the
    log cannot take (a full disk) is dropped: the pipe is still drained, the container not
    blocked."""
    splice = getattr(os, "splice", None)
    while True:
        try:
            if splice is not None:
                try:
                    return int(splice(pipe, log, n))
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS):
                        raise
                    splice = None  # a log file system that cannot: copy
                    continue
            data = os.read(pipe, n)
            break
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                return len(os.read(pipe, n)) or 1  # dropped (1: not EOF; the next read says)
            raise
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(log, view) :]
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                break
            raise
    return len(data)


def relay(pipe: int, d: int, log: int, limit: int) -> None:
    fcntl.fcntl(log, fcntl.F_SETFL, fcntl.fcntl(log, fcntl.F_GETFL) & ~os.O_APPEND)
    size = os.lseek(log, 0, os.SEEK_END)
    while True:
        if limit and size >= limit:
            log = _rotate(d, log)
            size = 0
        n = _copy(pipe, log, min(CHUNK, limit - size) if limit else CHUNK)
        if n == 0:
            return
        size += n


def main(argv: list[str]) -> int:
    try:  # its name in ps and /proc (the interpreter's, else)
        with open("/proc/self/comm", "w") as f:
            f.write("nsfast-log")
    except OSError:
        pass
    # Its own session already (started so): a terminal's signals are not for it.
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, signal.SIG_IGN)
    pipe, d, log, limit = (int(a) for a in argv[1:5])
    relay(pipe, d, log, limit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
