"""cgroup settings: `Limits`, `configure()`, and where sandboxes' cgroups live."""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from . import _core
from ._errors import SpecError
from ._spec import parse_size

__all__ = ["Limits", "configure", "CgroupWarning", "DEFAULT_LIMITS"]

CPU_PERIOD_US = 100_000


class CgroupWarning(UserWarning):
    """Sandboxes run without (some) cgroup limits or measurements; the message says why."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of a sandbox, applied through its own cgroup.

    memory / memory_swap: bytes (int) or a size string ("256M", "1.5G"); memory_swap is
    memory + swap together, as docker's --memory-swap. pids: max number of processes.
    cpu: cores of CPU time (0.5 = half a core, via quota/period). cpuset: CPUs to run on
    ("0", "0-1", "0,2")."""

    memory: Union[int, str, None] = None
    memory_swap: Union[int, str, None] = None
    pids: Optional[int] = None
    cpu: Optional[float] = None
    cpuset: Optional[str] = None
    cpu_time: Optional[float] = None
    cpu_time_soft: Optional[float] = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("memory", parse_size("Limits.memory", self.memory))
        set_("memory_swap", parse_size("Limits.memory_swap", self.memory_swap))
        if self.memory is not None and self.memory < 1 << 20:
            raise SpecError("Limits.memory", f"must be at least 1M, got {self.memory} bytes")
        if self.memory_swap is not None and self.memory is not None and self.memory_swap < self.memory:
            raise SpecError("Limits.memory_swap", "is memory + swap and must be >= memory")
        if self.pids is not None:
            if isinstance(self.pids, bool) or not isinstance(self.pids, int):
                raise TypeError(f"Limits.pids must be an int or None, not {type(self.pids).__name__}")
            if self.pids < 1:
                raise SpecError("Limits.pids", f"must be >= 1, got {self.pids}")
        if self.cpu is not None:
            if isinstance(self.cpu, bool) or not isinstance(self.cpu, (int, float)):
                raise TypeError(f"Limits.cpu must be a number of cores or None, not {type(self.cpu).__name__}")
            if not math.isfinite(self.cpu) or self.cpu <= 0 or self.cpu * CPU_PERIOD_US < 1000:
                raise SpecError("Limits.cpu", f"must be a number of cores >= 0.01, got {self.cpu!r}")
            set_("cpu", float(self.cpu))
        if self.cpuset is not None:
            if not isinstance(self.cpuset, str):
                raise TypeError(f"Limits.cpuset must be a str like '0-1' or None, not {type(self.cpuset).__name__}")
            cpus = _parse_cpuset(self.cpuset)
            online = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
            if not cpus or not cpus <= online:
                raise SpecError("Limits.cpuset", f"must name online CPUs ({_fmt(online)}), got {self.cpuset!r}")

    def _core(self) -> Tuple[Optional[int], Optional[int], Optional[int], Optional[Tuple[int, int]], Optional[str]]:
        cpu = None if self.cpu is None else (int(round(self.cpu * CPU_PERIOD_US)), CPU_PERIOD_US)
        return (self.memory, self.memory_swap, self.pids, cpu, self.cpuset)  # type: ignore[return-value]

    def controllers(self) -> set[str]:
        """The cgroup controllers these limits need."""
        need = set()
        if self.memory is not None or self.memory_swap is not None:
            need.add("memory")
        if self.pids is not None:
            need.add("pids")
        if self.cpu is not None:
            need.add("cpu")
        if self.cpuset is not None:
            need.add("cpuset")
        return need


#: What bounds a sandbox unless its Spec says otherwise (limits=None: nothing).
DEFAULT_LIMITS = Limits(memory="1G", pids=512)


def _parse_cpuset(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    return set()
                cpus.update(range(lo, hi + 1))
            else:
                cpus.add(int(part))
        except ValueError:
            return set()
    return cpus


def _fmt(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


_lock = threading.Lock()
_configured_root: Optional[str] = None
_backends: Dict[str, Any] = {}  # root -> (version, roots, controllers) or an error string
_warned: set[str] = set()


def configure(*, cgroup_root: Optional[str] = None) -> None:
    """Set where sandboxes' cgroups are created: a path relative to each cgroup hierarchy's
    mount ("nsfast", the default as root), or an absolute path inside a cgroup2 mount.
    The environment variable NSFAST_CGROUP_ROOT does the same; configure() wins."""
    global _configured_root
    if cgroup_root is not None and (not isinstance(cgroup_root, str) or not cgroup_root.strip("/")):
        raise SpecError("cgroup_root", f"must be a non-empty path, got {cgroup_root!r}")
    with _lock:
        _configured_root = cgroup_root
        _backends.clear()


_default: Optional[Tuple[int, Optional[str]]] = None  # (pid, root): decided once per process


def _default_root() -> Optional[str]:
    global _default
    if _default is None or _default[0] != os.getpid():
        # Once: preparing a delegated root moves this process into a leaf cgroup, after
        # which "our cgroup" is that leaf.
        _default = (os.getpid(), "nsfast" if os.geteuid() == 0 else _delegated_root())
    return _default[1]


def _delegated_root() -> Optional[str]:
    """Where a non-root caller can make sandbox cgroups: inside its own cgroup v2, when that
    was delegated to it (writable, e.g. `systemd-run --user -p Delegate=yes --scope`).

    cgroup v2's "no internal processes" rule forbids enabling controllers for the children
    of a cgroup that has processes, and ours has at least this one: so, like podman, this
    process first moves itself into a leaf child (`nsfast-caller`), then enables the
    controllers, and sandboxes go under `nsfast/`. None when there is no such subtree."""
    own = _core.own_cgroup()
    base = "/sys/fs/cgroup"
    if own is None or not os.path.exists(f"{base}/cgroup.controllers"):
        return None  # not a pure cgroup v2 host: v1 hierarchies are not delegated
    mine = os.path.join(base, own) if own else base
    if not own or not all(
        os.access(os.path.join(mine, f), os.W_OK) for f in ("", "cgroup.procs", "cgroup.subtree_control")
    ):
        return None
    try:
        with open(os.path.join(mine, "cgroup.procs")) as f:
            busy = f.read().split()
        if busy:
            leaf = os.path.join(mine, "nsfast-caller")
            os.makedirs(leaf, exist_ok=True)
            with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        with open(os.path.join(mine, "cgroup.controllers")) as f:
            available = f.read().split()
        if available:
            with open(os.path.join(mine, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join("+" + c for c in available))
    except OSError as e:
        # E.g. other processes share our cgroup (EBUSY): limits will warn; measuring works.
        _warn_once(
            f"deleg:{mine}",
            f"nsfast: could not prepare the delegated cgroup {mine} for sandboxes ({e}); limits may not apply",
        )
    return os.path.join(mine, "nsfast")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, CgroupWarning, stacklevel=4)


def request(limits: Optional[Limits], kill_tree: bool) -> Optional[tuple]:  # type: ignore[type-arg]
    """The cgroup argument of `_core.spawn`, or None (with a warning) when sandboxes cannot
    have a cgroup here. Limits whose controller is unavailable are dropped with a warning."""
    with _lock:
        root = _configured_root or os.environ.get("NSFAST_CGROUP_ROOT") or _default_root()
        if root is None:
            _warn_once(
                "noroot",
                "nsfast: no writable cgroup to put sandboxes in (not root, no delegated cgroup v2 "
                "subtree): sandboxes run without cgroup limits (memory, cpu) and usage measurement; "
                "their processes are still bounded by RLIMIT_NPROC (Limits.pids)",
            )
            return None
        info = _backends.get(root)
        if info is None:
            try:
                info = _core.cgroup_backend(root)
            except OSError as e:
                info = str(e)
            _backends[root] = info
    if isinstance(info, str):
        _warn_once(
            root,
            f"nsfast: cannot create cgroups under {root!r} ({info}): sandboxes run without cgroup "
            "limits and usage measurement",
        )
        return None
    core_limits = (limits or Limits())._core()
    if limits is not None:
        missing = limits.controllers() - set(info[2])
        if missing:
            _warn_once(
                f"{root}:{sorted(missing)}",
                f"nsfast: the cgroup controller(s) {', '.join(sorted(missing))} "
                f"are not available under {root!r}: those limits are not applied",
            )
            drop = {"memory": (0, 1), "pids": (2,), "cpu": (3,), "cpuset": (4,)}
            cl = list(core_limits)
            for c in missing:
                for i in drop[c]:
                    cl[i] = None
            core_limits = tuple(cl)  # type: ignore[assignment]
    return (root, core_limits, kill_tree)


def backend_info() -> Optional[Tuple[int, list, list]]:  # type: ignore[type-arg]
    """(version, roots, controllers) of the cgroup backend in use, or None."""
    req = request(None, False)
    if req is None:
        return None
    info = _backends.get(req[0])
    return None if isinstance(info, str) else info
