"""nsfast: fast, safe Linux sandboxes from Python.

A sandbox is a process started by one clone3() with new namespaces (what it can see),
a read-only root, a fresh /proc, a minimal /dev and an empty /tmp; the API is shaped
like `subprocess`:

    >>> import nsfast
    >>> nsfast.run(["sh", "-c", "hostname; id -u"], hostname="box",
    ...            capture_output=True, text=True).stdout
    'box\\n0\\n'
"""

from __future__ import annotations

from ._aio import AsyncProcess, arun, aspawn
from ._cgroup import DEFAULT_LIMITS, CgroupWarning, Limits, configure
from ._container import Container, enter
from ._errors import (
    ContainerError,
    ImageError,
    LimitError,
    NsfastError,
    OutputError,
    OutputLimitError,
    OverlayError,
    SpawnError,
    SpecError,
)
from ._image import Image, ImageConfig
from ._ns import compare_namespaces, namespaces
from ._process import DEVNULL, PIPE, STDOUT, Process, Result, TimeoutExpired, Usage, run, settle, spawn
from ._spec import (
    CAPABILITIES,
    DEFAULT_HIDDEN,
    DEFAULT_MASKED_PATHS,
    DEFAULT_NAMESPACES,
    DEFAULT_OVERLAY_SIZE,
    DEFAULT_READONLY_PATHS,
    DEFAULT_SECCOMP,
    DEFAULT_SHM_SIZE,
    DEFAULT_TMP_SIZE,
    NAMESPACES,
    RLIMITS,
    SANDBOX_ID_BASE,
    SANDBOX_ID_COUNT,
    Bind,
    Mount,
    Overlay,
    Seccomp,
    Spec,
    SpecFields,
    Tmpfs,
)
from ._zygote import DEFAULT_PRELOAD, TaskError, Zygote, ZygoteError

__all__ = [
    "run",
    "spawn",
    "settle",
    "arun",
    "aspawn",
    "AsyncProcess",
    "Process",
    "Result",
    "Usage",
    "TimeoutExpired",
    "Spec",
    "SpecFields",
    "RLIMITS",
    "Limits",
    "DEFAULT_LIMITS",
    "Seccomp",
    "DEFAULT_SECCOMP",
    "DEFAULT_MASKED_PATHS",
    "DEFAULT_READONLY_PATHS",
    "DEFAULT_HIDDEN",
    "DEFAULT_OVERLAY_SIZE",
    "DEFAULT_TMP_SIZE",
    "DEFAULT_SHM_SIZE",
    "SANDBOX_ID_BASE",
    "SANDBOX_ID_COUNT",
    "configure",
    "CgroupWarning",
    "Bind",
    "Overlay",
    "Tmpfs",
    "Mount",
    "PIPE",
    "DEVNULL",
    "STDOUT",
    "Container",
    "enter",
    "namespaces",
    "compare_namespaces",
    "NAMESPACES",
    "DEFAULT_NAMESPACES",
    "CAPABILITIES",
    "NsfastError",
    "Image",
    "ImageConfig",
    "ImageError",
    "OutputError",
    "OutputLimitError",
    "OverlayError",
    "SpecError",
    "SpawnError",
    "ContainerError",
    "LimitError",
    "Zygote",
    "ZygoteError",
    "TaskError",
    "DEFAULT_PRELOAD",
]

try:
    from importlib.metadata import version as _version

    __version__ = _version("nsfast")
except Exception:  # pragma: no cover - running from a source tree without metadata
    __version__ = "0.0.0"
