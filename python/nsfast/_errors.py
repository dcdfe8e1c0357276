"""nsfast's exceptions. The Rust core raises these through one mapping point (src/py.rs)."""

from __future__ import annotations

import errno as _errno
from typing import Optional, Sequence

__all__ = [
    "NsfastError",
    "SpecError",
    "SpawnError",
    "ContainerError",
    "LimitError",
    "OutputError",
    "OutputLimitError",
    "OverlayError",
    "ImageError",
]

# Usual causes of the usual errnos, added to SpawnError messages.
_HINTS = {
    _errno.EPERM: "not permitted: a namespace type may be disabled for unprivileged users "
    "(sysctl user.max_*_namespaces, kernel.unprivileged_userns_clone, AppArmor), or a "
    "capability is missing",
    _errno.ENOSPC: "a namespace limit was reached (see /proc/sys/user/max_*_namespaces)",
    _errno.EINVAL: "the kernel rejected the request: a namespace type it lacks, or pivot_root on the initramfs root",
}


class NsfastError(Exception):
    """Base class of every nsfast error."""


class SpecError(NsfastError, ValueError):
    """A sandbox specification value that cannot work; `.field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.field, self.message))


class SpawnError(NsfastError, OSError):
    """Starting a sandbox failed at `.step` (e.g. "exec", "pivot_root", "mount /proc",
    "write uid_map"), with the errno of the failing system call."""

    step: str
    hint: Optional[str]

    def __new__(
        cls, errno: int, strerror: str, filename: Optional[str] = None, step: str = "", hint: Optional[str] = None
    ) -> SpawnError:
        # OSError.__new__ would pick a subclass from errno; keep SpawnError.
        self = OSError.__new__(cls, errno, strerror, filename)
        return self

    def __init__(
        self, errno: int, strerror: str, filename: Optional[str] = None, step: str = "", hint: Optional[str] = None
    ) -> None:
        OSError.__init__(self, errno, strerror, filename)
        self.step = step
        self.hint = hint

    def __str__(self) -> str:
        msg = f"[Errno {self.errno}] {self.strerror}"
        if self.filename is not None:
            msg += f": {self.filename!r}"
        msg = f"{self.step}: {msg}" if self.step else msg
        if self.hint:
            return f"{msg} ({self.hint})"
        hint = _HINTS.get(self.errno or 0)
        if hint and self.step not in ("exec", "setrlimit"):
            msg += f" ({hint})"
        elif self.step == "chdir" and self.errno == _errno.ELOOP:
            msg += " (the working directory is resolved inside the sandbox; a magic link such as /proc/self/fd/N is refused)"
        return msg

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.errno, self.strerror, self.filename, self.step, self.hint))


class ContainerError(NsfastError):
    """An operation on a container that is not in the right state."""


class LimitError(NsfastError):
    """A limit that was asked for cannot take effect here (no cgroup the caller may use, a
    missing controller, a raw value without a cgroup v1 equivalent, CPU usage that cannot be
    read), raised before anything is spawned. `.limits` names each limit, `.reasons` says why
    (one per limit). `Spec(strict=False)` makes such limits best effort (a CgroupWarning)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        by_reason: dict[str, list[str]] = {}
        for name, why in problems:
            by_reason.setdefault(why, []).append(name)
        super().__init__("; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items()))
        self.limits = [name for name, _ in problems]
        self.reasons = [why for _, why in problems]

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (list(zip(self.limits, self.reasons)),))


class OutputError(NsfastError):
    """`run(outputs=...)` found more than `outputs_max_bytes` of matching files (`.path` is
    the file that went over `.limit`), or a matching file it cannot read (`.reason` says
    why, e.g. the sandbox left it mode 000); `.result` is the run's Result (its `.files`
    hold what was read before)."""

    def __init__(self, path: str, limit: int, result: object = None, reason: Optional[str] = None) -> None:
        if reason is None:
            super().__init__(f"outputs: {path} takes the files read back over outputs_max_bytes={limit}")
        else:
            super().__init__(f"outputs: {path}: {reason}")
        self.path = path
        self.limit = limit
        self.result = result
        self.reason = reason

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.path, self.limit, self.result, self.reason))


class OutputLimitError(OutputError):
    """A captured stream (`.path` is "stdout" or "stderr") of `run`, `Container.exec`,
    `communicate` or a zygote task passed `capture_max_bytes` (`.limit`): the sandbox was
    killed there. `.result` is its Result: that stream holds the first `.limit` bytes, the
    other what came before the kill, `usage.termination` is "output"."""

    def __init__(self, stream: str, limit: int, result: object = None) -> None:
        NsfastError.__init__(self, f"{stream} passed capture_max_bytes={limit}: the sandbox was killed")
        self.path = stream
        self.limit = limit
        self.result = result
        self.reason = None

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.path, self.limit, self.result))


class OverlayError(NsfastError):
    """The changes under an `nsfast.Overlay` could not be listed, or (`commit=True`) not
    applied to its `src`: `.path` is the sandbox path concerned, `.reason` why; `.applied`
    the sandbox paths already applied to `src` (empty: `src` is unchanged, which is the
    case for everything found before applying: a change below a mount point of `src`, a
    file the caller cannot read, a path too long); `.result` is the run's Result."""

    def __init__(self, path: str, reason: str, result: object = None, applied: Sequence[str] = ()) -> None:
        done = f"; {len(applied)} change(s) were applied before" if applied else "; src is unchanged"
        super().__init__(f"Overlay: {path}: {reason}{done}")
        self.path = path
        self.reason = reason
        self.result = result
        self.applied = list(applied)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.path, self.reason, self.result, self.applied))


class ImageError(NsfastError):
    """An image that cannot be used: unreadable or malformed, a blob that fails
    verification, or a layer member that is refused. The message names the image, the
    blob or layer digest and the member."""
