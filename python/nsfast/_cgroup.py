"""cgroup settings: `Limits`, `configure()`, and where sandboxes' cgroups live."""

from __future__ import annotations

import functools
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional, Tuple, Union

from . import _core
from ._errors import LimitError, SpecError
from ._spec import parse_size

__all__ = ["Limits", "configure", "CgroupWarning", "DEFAULT_LIMITS"]

CPU_PERIOD_US = 100_000


class CgroupWarning(UserWarning):
    """Sandboxes run without (some) cgroup limits or measurements; the message says why."""


#: The controllers nsfast makes sandbox cgroups with (rust/src/cgroup.rs RAW_CONTROLLERS).
CONTROLLERS = ("cpu", "cpuset", "memory", "pids")
# A raw controller file: <controller>.<name>, lowercase words joined by dots (no "/", no "..",
# no cgroup.* core file: the write stays a limit of the sandbox's own cgroup directory).
_RAW_KEY = re.compile(r"(cpu|cpuset|memory|pids)(\.[a-z][a-z0-9_]*)+")
# Raw keys that are the cgroup file of a typed field: giving both is ambiguous.
_TYPED = {"memory.max": "memory", "memory.swap.max": "memory_swap", "pids.max": "pids", "cpu.max": "cpu",
          "cpuset.cpus": "cpuset"}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Resource limits of a sandbox, applied through its own cgroup.

    memory / memory_swap: bytes (int) or a size string ("256M", "1.5G"); memory_swap is
    memory + swap together, as docker's --memory-swap. pids: max number of processes (also the
    sandbox's RLIMIT_NPROC, which bounds it where no pids controller is available: such a
    pids limit is not an error). cpu: cores of CPU time (0.5 = half a core, via quota/period).
    cpuset: CPUs to run on ("0", "0-1", "0,2").

    cgroup: raw controller values, cgroup v2 names: {"cpu.weight": 50, "memory.high": "64M"},
    each `<controller>.<file>` of cpu, cpuset, memory or pids (never a `cgroup.*` file), kept
    as a sorted tuple of (name, value) pairs. On cgroup v1 they are translated (`V1_RAW`):
    cpu.weight -> cpu.shares (weight * 1024 / 100), cpu.max -> cpu.cfs_quota_us +
    cpu.cfs_period_us, memory.max -> memory.limit_in_bytes, pids.max, cpuset.cpus and
    cpuset.mems as they are; every other name (memory.high, memory.low, memory.swap.max, ...)
    has no v1 equivalent and is a LimitError there. A value the kernel refuses fails the spawn
    with a SpawnError (step "create cgroup") naming the file and the value.
    require: controllers that must be available to the sandbox's cgroup ("memory", "pids",
    "cpu", "cpuset"), whatever else is asked: LimitError otherwise, even with strict=False.
    cpu_time / cpu_time_soft: seconds of CPU (user + system) the sandbox may use; soft <=
    hard. They need the sandbox's CPU usage to be readable (cgroup v2 cpu.stat; on v1 the
    cpuacct controller or a hybrid host's unified hierarchy): LimitError otherwise.

    A limit asked for that cannot take effect raises nsfast.LimitError before anything is
    spawned, unless the Spec says strict=False (then a CgroupWarning and the limit is left out).
    `nsfast.DEFAULT_LIMITS`, which nobody asked for explicitly, is always best effort."""

    # Stored types (bytes, seconds, normalised pairs); the __init__ below gives the accepted ones.
    memory: Optional[int] = None
    memory_swap: Optional[int] = None
    pids: Optional[int] = None
    cpu: Optional[float] = None
    cpuset: Optional[str] = None
    cgroup: Tuple[Tuple[str, str], ...] = ()
    require: Tuple[str, ...] = ()
    cpu_time: Optional[float] = None
    cpu_time_soft: Optional[float] = None

    if TYPE_CHECKING:

        def __init__(
            self,
            memory: Union[int, str, None] = None,
            memory_swap: Union[int, str, None] = None,
            pids: Optional[int] = None,
            cpu: Optional[float] = None,
            cpuset: Optional[str] = None,
            cgroup: Union[Mapping[str, Union[str, int]], Iterable[Tuple[str, Union[str, int]]]] = (),
            require: Iterable[str] = (),
            cpu_time: Optional[float] = None,
            cpu_time_soft: Optional[float] = None,
        ) -> None: ...

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # frozen dataclass
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
        set_("cgroup", self._raw_pairs())
        if isinstance(self.require, str) or not isinstance(self.require, (tuple, list, set, frozenset)):
            raise TypeError(f"Limits.require must be a tuple of controller names, not {type(self.require).__name__}")
        for c in self.require:
            if c not in CONTROLLERS:
                raise SpecError("Limits.require", f"has an unknown controller {c!r} (known: {', '.join(CONTROLLERS)})")
        set_("require", tuple(sorted(set(self.require))))
        for name in ("cpu_time", "cpu_time_soft"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"Limits.{name} must be seconds of CPU or None, not {type(v).__name__}")
            if not math.isfinite(v) or v <= 0:
                raise SpecError(f"Limits.{name}", f"must be a number of seconds > 0, got {v!r}")
            set_(name, float(v))
        if self.cpu_time is not None and self.cpu_time_soft is not None and self.cpu_time_soft > self.cpu_time:
            raise SpecError(
                "Limits.cpu_time_soft", f"must be <= cpu_time ({self.cpu_time} s), got {self.cpu_time_soft} s"
            )

    def _raw_pairs(self) -> Tuple[Tuple[str, str], ...]:
        raw = self.cgroup
        if raw is None:
            return ()
        items = list(raw.items()) if isinstance(raw, Mapping) else list(raw)
        out: Dict[str, str] = {}
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"Limits.cgroup must be a mapping of file name to value, got the item {item!r}")
            key, value = item
            field = f"Limits.cgroup[{key!r}]"
            if not isinstance(key, str) or not _RAW_KEY.fullmatch(key):
                raise SpecError(
                    field,
                    "must name a file of a controller nsfast manages, as <controller>.<name> with a controller "
                    f"of {', '.join(CONTROLLERS)} (cgroup v2 names; no '/', '..' or cgroup.* files)",
                )
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise SpecError(field, f"must be a str or an int, got {type(value).__name__}")
            text = str(value)
            if not text or "\0" in text or "\n" in text:
                raise SpecError(field, f"must be a non-empty single-line value, got {text!r}")
            typed = _TYPED.get(key)
            if typed is not None and getattr(self, typed) is not None:
                raise SpecError(field, f"sets the same cgroup file as Limits.{typed}; give one of them")
            if key in out:
                raise SpecError(field, "is given twice")
            out[key] = text
        return tuple(sorted(out.items()))

    def _asks(self) -> list[Tuple[str, str]]:
        """(limit name, what it needs) for each limit set: a controller, or "cpu usage"."""
        asks = [(f, c) for f, c in (("memory", "memory"), ("memory_swap", "memory"), ("pids", "pids"),
                                    ("cpu", "cpu"), ("cpuset", "cpuset")) if getattr(self, f) is not None]  # fmt: skip
        asks += [(f"cgroup[{k!r}]", k.split(".", 1)[0]) for k, _ in self.cgroup]
        asks += [(f, "cpu usage") for f in ("cpu_time", "cpu_time_soft") if getattr(self, f) is not None]
        return asks

    def controllers(self) -> set[str]:
        """The cgroup controllers these limits need (`require` included)."""
        return {c for _, c in self._asks() if c in CONTROLLERS} | set(self.require)


def _v1_raw(key: str, value: str) -> Optional[list[Tuple[str, str]]]:
    """The cgroup v1 files and values for the v2 raw limit `key`, or None (no equivalent)."""
    if key in ("pids.max", "cpuset.cpus", "cpuset.mems"):
        return [(key, value)]
    if key == "memory.max":
        return [("memory.limit_in_bytes", "-1" if value == "max" else value)]
    if key == "cpu.weight":
        if not value.isdigit() or not 1 <= int(value) <= 10000:
            raise SpecError(f"Limits.cgroup[{key!r}]", f"must be a weight 1..10000, got {value!r}")
        # As systemd does: the v2 default weight 100 is v1's default 1024 shares.
        return [("cpu.shares", str(max(2, int(value) * 1024 // 100)))]
    if key == "cpu.max":
        quota, _, period = value.partition(" ")
        period = period or str(CPU_PERIOD_US)
        return [("cpu.cfs_period_us", period), ("cpu.cfs_quota_us", "-1" if quota == "max" else quota)]
    return None


#: cgroup v2 raw limit -> its cgroup v1 file(s); anything else has no v1 equivalent.
V1_RAW = {
    "cpu.weight": "cpu.shares (= weight * 1024 / 100)",
    "cpu.max": "cpu.cfs_quota_us + cpu.cfs_period_us ('max' = -1)",
    "memory.max": "memory.limit_in_bytes ('max' = -1)",
    "pids.max": "pids.max",
    "cpuset.cpus": "cpuset.cpus",
    "cpuset.mems": "cpuset.mems",
}


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
_backends: Dict[str, Any] = {}  # root -> (version, roots, controllers, cpu_usage) or an error string
_notes: Dict[str, str] = {}  # root -> why controllers could not be prepared there
_warned: set[str] = set()

DEFAULT_ROOT = "nsfast"


_UNSET: Any = object()


def configure(
    *, cgroup_root: Optional[str] = _UNSET, image_cache: Optional[str] = _UNSET, netns_pool: Optional[int] = _UNSET
) -> None:
    """Set where sandboxes' cgroups are created, where `nsfast.Image` unpacks images and how
    many network namespaces are made ahead; each only when given, None goes back to the
    default.

    netns_pool: keep this many network namespaces (each with `lo` up) made ahead by a thread
    of nsfast's (default 0: none), so that a start takes one instead of making its own at
    clone (~0.4 ms of a start here). Each is used by one sandbox, once, and nothing else ever
    entered it. A namespace made ahead is owned by the caller's user namespace rather than
    the sandbox's, which no sandbox that keeps no capability can tell (every right over it is
    checked against its owner, and such a sandbox has none in either): a sandbox that keeps
    capabilities in a user namespace of its own, or a start that finds the pool empty, makes
    its own as before. Needs CAP_SYS_ADMIN (a root caller): otherwise, or above 64, a
    SpecError (field "netns_pool"); 0 closes those ready.

    image_cache: the image cache directory (also NSFAST_IMAGE_CACHE; default
    $XDG_CACHE_HOME/nsfast/images or ~/.cache/nsfast/images), made 0700.

    cgroup_root (the environment variable NSFAST_CGROUP_ROOT does the same; configure()
    wins; None goes back to that, or the default):

    - A relative path ("nsfast", the default): below the caller's own cgroup, so that whatever
      measures or limits the caller (BenchExec, a systemd slice, an outer nsfast sandbox) also
      covers its sandboxes. On cgroup v1 (and hybrid hosts) per hierarchy, as BenchExec does:
      `<mount>/<the caller's path in that hierarchy>/nsfast/sb-PID-N`. On cgroup v2:
      `<own cgroup>/nsfast/sb-PID-N`; there the "no internal processes" rule forbids
      enabling controllers for the children of a (non-root) cgroup that has processes, so
      nsfast first moves the calling process (all its threads) into a new leaf child
      `<own cgroup>/nsfast-caller`, once, at the first sandbox: /proc/self/cgroup then says
      `.../nsfast-caller`; whatever contained the caller still contains it and its
      sandboxes. It does not move when other processes share its cgroup (it could not enable
      controllers anyway): then sandboxes are measured but limits needing a controller are a
      LimitError (a warning for the defaults). A rootless caller gets this on a pure cgroup v2
      host when its cgroup was delegated to it (`systemd-run --user -p Delegate=yes --scope`).
    - An absolute path: a directory path inside a mounted cgroup file system (cgroup2, or a
      cgroup v1 hierarchy), e.g. "/sys/fs/cgroup/nsfast" (v2), that names the cgroup
      sandboxes go below. On v1 and hybrid hosts the same cgroup path is used in every
      hierarchy: "/sys/fs/cgroup/unified/nsfast" means `<each mount>/nsfast`, i.e. relative
      to each hierarchy's mount whatever the caller's own cgroups are (this is what the
      previous releases did with a relative path).

    SpecError (field "cgroup_root") for anything else: not a str, empty, "." or ".."
    components, an absolute path outside the cgroup file systems or one that exists and is
    not a directory."""
    global _configured_root
    if netns_pool is not _UNSET:
        if netns_pool is None:
            netns_pool = 0
        if isinstance(netns_pool, bool) or not isinstance(netns_pool, int):
            raise TypeError(f"netns_pool must be an int, not {type(netns_pool).__name__}")
        if netns_pool < 0:
            raise SpecError("netns_pool", f"must be >= 0, got {netns_pool}")
        _core.set_netns_pool(netns_pool)
    if image_cache is not _UNSET:
        from ._image import set_cache_dir

        if image_cache is not None and not isinstance(image_cache, (str, os.PathLike)):
            raise TypeError(f"image_cache must be a path or None, not {type(image_cache).__name__}")
        set_cache_dir(image_cache)
    if cgroup_root is _UNSET:
        return
    if cgroup_root is not None:
        _check_root("cgroup_root", cgroup_root)
    with _lock:
        _configured_root = cgroup_root
        _backends.clear()


def _check_root(field: str, root: object) -> str:
    if not isinstance(root, str) or not root.strip("/"):
        raise SpecError(field, f"must be a non-empty path, got {root!r}")
    if any(part in (".", "..") for part in root.split("/")):
        raise SpecError(field, f"must not have '.' or '..' components, got {root!r}")
    if root.startswith("/"):
        if _cgroup_mount_of(root) is None:
            raise SpecError(field, f"{root!r} is not inside a mounted cgroup file system (see /proc/self/mountinfo)")
        if os.path.exists(root) and not os.path.isdir(root):
            raise SpecError(field, f"{root!r} exists and is not a directory")
    return root


def _cgroup_mount_of(path: str) -> Optional[str]:
    """The mount point of the cgroup (v1 or v2) file system `path` is inside, if any."""
    best = None
    for mount, fstype in _core.mounts():
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) > len(best[0])):
            best = (mount, fstype)
    return best[0] if best is not None and best[1] in ("cgroup", "cgroup2") else None


_moved_from: Dict[int, str] = {}  # pid -> the cgroup v2 path it left for its nsfast-caller leaf
_prepared: Dict[Tuple[int, int, str], Optional[str]] = {}  # (pid, euid, relative root) -> what to pass to Rust


def _root() -> Optional[str]:
    """The root to pass to `_core` (relative: below our own cgroup; absolute: a directory in
    a cgroup mount), or None when this caller has no cgroup to put sandboxes in."""
    root = _configured_root
    if root is None:
        env = os.environ.get("NSFAST_CGROUP_ROOT")
        root = DEFAULT_ROOT if env is None else _check_root("NSFAST_CGROUP_ROOT", env)
    if root.startswith("/"):
        return root
    # Once per process, identity and root: preparing a v2 root moves this process into a
    # leaf cgroup, after which "our cgroup" is that leaf; a process that was root and dropped
    # its privileges is a rootless caller from then on, with a root of its own (or none).
    key = (os.getpid(), os.geteuid(), root)
    if key not in _prepared:
        _prepared[key] = _below_own(root)
    return _prepared[key]


def _below_own(rel: str) -> Optional[str]:
    """Where sandboxes go for the relative root `rel`: on cgroup v1/hybrid hosts `rel` itself
    (Rust puts it below our cgroup in each hierarchy; not for a rootless caller, to whom v1
    hierarchies are never delegated); on a pure v2 host the absolute directory below our own
    cgroup, after moving this process into a leaf `nsfast-caller` where the "no internal
    processes" rule requires it (as podman does). None: no cgroup we may use."""
    base = "/sys/fs/cgroup"
    if not os.path.exists(f"{base}/cgroup.controllers"):
        return rel if os.geteuid() == 0 else None
    # After this process moved itself into <own>/nsfast-caller, "our cgroup" for every root
    # is still the one it was in.
    own = _moved_from[os.getpid()] if os.getpid() in _moved_from else _core.own_cgroup()
    if own is None:
        return None
    mine = os.path.join(base, own) if own else base
    target = os.path.join(mine, rel)
    # The root of our cgroup namespace ("/") is the host's root cgroup only where it has no
    # cgroup.type (the root cgroup has none): else it is a cgroup delegated to us (an nsfast
    # sandbox's with delegate_cgroup, a container's), whose processes are all its owner's.
    delegated_ns_root = not own and os.path.exists(os.path.join(base, "cgroup.type"))
    if not own and not delegated_ns_root:
        # The root cgroup: processes and enabled controllers may coexist. A rootless caller
        # there (a container's user whose cgroup namespace is rooted at the host's root, a
        # VM's) may create nothing in it, as a rule: none, rather than a mkdir that fails.
        where = target if os.path.isdir(target) else mine
        if os.geteuid() != 0 and not os.access(where, os.W_OK | os.X_OK):
            return None
        return target
    if os.geteuid() != 0 and not all(
        os.access(os.path.join(mine, f), os.W_OK) for f in ("", "cgroup.procs", "cgroup.subtree_control")
    ):
        return None
    try:
        with open(os.path.join(mine, "cgroup.controllers")) as f:
            available = [c for c in f.read().split() if c in CONTROLLERS]
        with open(os.path.join(mine, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
        with open(os.path.join(mine, "cgroup.procs")) as f:
            busy = f.read().split()
        missing = [c for c in available if c not in enabled]
        if not missing:
            return target
        if busy and delegated_ns_root:
            # Everything in it is ours (the sandbox's init, its shells): all of it moves into
            # the leaf, as docker-in-docker's entrypoint does (moby hack/dind), or no
            # controller could be enabled below it.
            _move_all(mine, os.path.join(mine, "nsfast-caller"))
            _moved_from[os.getpid()] = own
            busy = []
        if busy and busy != [str(os.getpid())]:
            _notes[target] = (
                f"other processes share the caller's cgroup {mine} (cgroup v2 then refuses to enable "
                "controllers for its children, and nsfast moves only itself)"
            )
            return target
        if busy:
            leaf = os.path.join(mine, "nsfast-caller")
            os.makedirs(leaf, exist_ok=True)
            with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            _moved_from[os.getpid()] = own
        for c in missing:
            with open(os.path.join(mine, "cgroup.subtree_control"), "w") as f:
                f.write("+" + c)
    except OSError as e:
        _notes[target] = f"preparing the caller's cgroup {mine} for sandboxes failed: {e}"
    return target


def _move_all(src: str, leaf: str) -> None:
    """Move every process of cgroup `src` into its child `leaf` (made if missing), until
    none is left (a process forking meanwhile may land in `src`: moved on the next round)."""
    os.makedirs(leaf, exist_ok=True)
    for _ in range(100):
        with open(os.path.join(src, "cgroup.procs")) as f:
            pids = f.read().split()
        if not pids:
            return
        for pid in pids:
            try:
                with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except ProcessLookupError:  # exited meanwhile
                pass
    raise OSError(f"processes keep appearing in {src}")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, CgroupWarning, stacklevel=4)


@dataclass(frozen=True)
class CgroupRequest:
    """The cgroup `_core.spawn` makes for one sandbox (Rust reads it attribute by attribute):
    where, and the limits that apply here (those that cannot were refused or dropped)."""

    root: str
    kill_tree: bool  # the v1 freezer too (no pid namespace whose init's death ends the rest)
    memory: Optional[int] = None
    memory_swap: Optional[int] = None
    pids: Optional[int] = None
    cpu: Optional[Tuple[int, int]] = None  # (quota, period) in microseconds
    cpuset: Optional[str] = None
    raw: Tuple[Tuple[str, str], ...] = ()  # (file, value), in this backend's version's names
    cpu_time: Optional[float] = None  # enforced by watching the cgroup's CPU usage
    cpu_time_soft: Optional[float] = None


def _nsdelegate() -> bool:
    """Whether the cgroup2 mounted at /sys/fs/cgroup has nsdelegate (a cgroup namespace is
    then a delegation boundary: its root's limit files cannot be written from inside)."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = right.split()
                if left.split(" ")[4] == "/sys/fs/cgroup" and parts[:1] == ["cgroup2"] and len(parts) > 2:
                    return "nsdelegate" in parts[2].split(",")
    except OSError:
        pass
    return False


def _check_delegation(info: Any, why: str) -> None:
    """LimitError unless the sandbox's cgroup can be delegated (Spec.delegate_cgroup):
    whatever `strict` says, delegation is never silently left out."""
    if isinstance(info, str) or info is None:
        raise LimitError([("delegate_cgroup", why)])
    if info[0] != 2:
        raise LimitError(
            [
                (
                    "delegate_cgroup",
                    "needs cgroup v2 for the sandbox's cgroup (a pure cgroup v2 host); this host is a hybrid or "
                    "cgroup v1 one, whose v1 controller cgroups cannot be delegated safely",
                )
            ]
        )
    if not (os.geteuid() == 0 and _core.sandbox_id_range()) and not _nsdelegate():
        raise LimitError(
            [
                (
                    "delegate_cgroup",
                    "the sandbox's root is this caller, which owns the sandbox's limit files: only a cgroup2 "
                    "mounted with nsdelegate keeps the sandbox from raising them, and /sys/fs/cgroup has none",
                )
            ]
        )


def request(
    limits: Optional[Limits], kill_tree: bool, strict: bool = True, delegate: bool = False
) -> Optional[CgroupRequest]:
    """The cgroup argument of `_core.spawn`, or None when sandboxes cannot have a cgroup here.

    A limit the user asked for (any `Limits` but `DEFAULT_LIMITS`) that cannot take effect
    raises LimitError naming it and why, unless strict=False: then it is left out with a
    CgroupWarning, as the default limits always are (once per reason). `Limits.require` is
    checked either way. A bad NSFAST_CGROUP_ROOT is a SpecError. `delegate`
    (Spec.delegate_cgroup) that cannot be done is a LimitError whatever `strict` says."""
    with _lock:
        root = _root()
        info: Any = None
        if root is None:
            why = (
                "no cgroup this caller may create cgroups in (not root, and no delegated cgroup v2 "
                "subtree: e.g. systemd-run --user -p Delegate=yes --scope)"
            )
        else:
            info = _backends.get(root)
            if info is None:
                try:
                    info = _core.cgroup_backend(root)
                except OSError as e:
                    info = str(e)
                _backends[root] = info
            why = f"cannot create cgroups under {root!r} ({info})" if isinstance(info, str) else ""
    if delegate:
        _check_delegation(info, why)
    asked = limits is not None and limits is not DEFAULT_LIMITS
    if isinstance(info, str) or info is None:
        problems = [(n, why) for n, need in (limits._asks() if limits else []) if need != "pids"]
        problems += [(f"require[{c!r}]", why) for c in (limits.require if limits else ())]
        _refuse(problems, asked, strict, limits)
        _warn_once(
            root or "noroot",
            f"nsfast: {why}: sandboxes run without cgroup limits (memory, cpu) and usage measurement; "
            "their processes are still bounded by RLIMIT_NPROC (Limits.pids)",
        )
        return None
    version, roots, available, cpu_usage = info
    where = f"for sandboxes under {', '.join(roots)}"
    note = _notes.get(root or "")
    problems = []
    drop: set[str] = set()
    for name, need in limits._asks() if limits else []:
        if need == "cpu usage":
            if not cpu_usage:
                problems.append(
                    (name, "the sandbox's CPU usage cannot be read (needs the cpuacct controller on cgroup v1)")
                )
                drop.add(name)
        elif need not in available and need != "pids":  # pids without a controller: RLIMIT_NPROC
            problems.append((name, f"the {need} controller is not available {where}" + (f": {note}" if note else "")))
            drop.add(name)
        elif need not in available:
            drop.add(name)
    raw: list[Tuple[str, str]] = []
    for key, value in limits.cgroup if limits else ():
        name = f"cgroup[{key!r}]"
        if name in drop:
            continue
        if version == 1:
            v1 = _v1_raw(key, value)
            if v1 is None:
                problems.append((name, f"has no cgroup v1 equivalent on this host (translated: {', '.join(V1_RAW)})"))
                continue
            raw += v1
        else:
            raw.append((key, value))
    for c in limits.require if limits else ():
        if c not in available:
            problems.append(
                (f"require[{c!r}]", f"the {c} controller is not available {where}" + (f": {note}" if note else ""))
            )
    _refuse(problems, asked, strict, limits)
    if problems:
        _warn_once(
            f"{root}:{sorted(problems)}",
            "nsfast: these limits are not applied: " + "; ".join(f"{n}: {w}" for n, w in problems),
        )
    assert root is not None
    if limits is None:
        return CgroupRequest(root, kill_tree)
    cpu = None if limits.cpu is None else (int(round(limits.cpu * CPU_PERIOD_US)), CPU_PERIOD_US)
    return CgroupRequest(
        root,
        kill_tree,
        memory=None if "memory" in drop else limits.memory,
        memory_swap=None if "memory_swap" in drop else limits.memory_swap,
        pids=None if "pids" in drop else limits.pids,
        cpu=None if "cpu" in drop else cpu,
        cpuset=None if "cpuset" in drop else limits.cpuset,
        raw=tuple(raw),
        cpu_time=None if "cpu_time" in drop else limits.cpu_time,
        cpu_time_soft=None if "cpu_time_soft" in drop else limits.cpu_time_soft,
    )


def _refuse(problems: list[Tuple[str, str]], asked: bool, strict: bool, limits: Optional[Limits]) -> None:
    """Raise LimitError for `problems` the caller may not be left with: those of limits asked
    for in strict mode, and missing `require`d controllers always."""
    required = [p for p in problems if p[0].startswith("require[")]
    if required or (problems and asked and strict):
        raise LimitError([(f"Limits.{n}", w) for n, w in problems])


def backend_info() -> Optional[Tuple[int, list, list, bool]]:  # type: ignore[type-arg]
    """(version, roots, controllers, cpu usage readable) of the cgroup backend in use, or None."""
    req = request(None, False)
    if req is None:
        return None
    info = _backends.get(req.root)
    return None if isinstance(info, str) else info
