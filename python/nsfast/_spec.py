"""What a sandbox is: `Spec`, `Bind`, `Tmpfs`. Validated on construction, before any
system call; a bad value raises `SpecError` (a `ValueError`) or `TypeError` naming the field."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import resource
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, TypedDict, Union

from . import _core
from ._errors import SpecError
from ._image import Image, in_image_cache

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._cgroup import Limits

__all__ = [
    "Spec",
    "Bind",
    "Tmpfs",
    "Mount",
    "Seccomp",
    "DEFAULT_NAMESPACES",
    "NAMESPACES",
    "CAPABILITIES",
    "DEFAULT_MASKED_PATHS",
    "DEFAULT_READONLY_PATHS",
    "DEFAULT_HIDDEN",
    "DEFAULT_SECCOMP",
    "DEFAULT_TMP_SIZE",
    "DEFAULT_OVERLAY_SIZE",
    "DEFAULT_SHM_SIZE",
    "SANDBOX_ID_BASE",
    "SANDBOX_ID_COUNT",
    "RLIMITS",
    "SpecFields",
]

StrPath = Union[str, "os.PathLike[str]"]

NAMESPACES: Tuple[str, ...] = tuple(_core.NAMESPACES)
DEFAULT_NAMESPACES: Tuple[str, ...] = tuple(_core.DEFAULT_NAMESPACES)
#: runc's masked paths: replaced by an empty read-only tmpfs (directories) or /dev/null.
DEFAULT_MASKED_PATHS: Tuple[str, ...] = tuple(_core.DEFAULT_MASKED_PATHS)
#: runc's read-only paths (kernel knobs under /proc).
DEFAULT_READONLY_PATHS: Tuple[str, ...] = tuple(_core.DEFAULT_READONLY_PATHS)
#: Host directories hidden behind an empty tmpfs when the sandbox's root is the host's.
DEFAULT_HIDDEN: Tuple[str, ...] = tuple(_core.DEFAULT_HIDDEN)
DEFAULT_TMP_SIZE: int = _core.DEFAULT_TMP_SIZE
DEFAULT_SHM_SIZE: int = _core.DEFAULT_SHM_SIZE
#: Size of the tmpfs that holds an overlay root's changes (Spec.overlay_size).
DEFAULT_OVERLAY_SIZE: int = 256 << 20
#: A root caller's sandbox runs as SANDBOX_ID_COUNT host ids of a range of its own (inside:
#: 0..), in 0x70010000..0x7FFEFFFF, or, with overlay_upper, the shared SANDBOX_ID_BASE..
#: (`Process._sandbox.id_base` says which; so does the sandbox's /proc/PID/uid_map).
SANDBOX_ID_BASE: int = _core.SANDBOX_ID_BASE
SANDBOX_ID_COUNT: int = _core.SANDBOX_ID_COUNT
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# capability(7) names by number.
CAPABILITIES: Tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)


def _path(field_name: str, value: Any, *, absolute: bool = True) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{field_name} must be a str or os.PathLike, not {type(value).__name__}")
    p = os.fspath(value)
    if not isinstance(p, str):
        raise TypeError(f"{field_name} must be a str path, not {type(p).__name__}")
    if "\0" in p:
        raise SpecError(field_name, f"contains a NUL byte: {p!r}")
    if not p:
        # (As subprocess's cwd='' and docker's -v ':/x': an empty path names no file; made
        # absolute, it was the caller's working directory.)
        raise SpecError(field_name, "must not be empty")
    if absolute and not p.startswith("/"):
        raise SpecError(field_name, f"must be an absolute path: {p!r}")
    return p


def _target(field_name: str, value: Any) -> str:
    p = _path(field_name, value)
    parts = [c for c in p.split("/") if c not in ("", ".")]
    if ".." in parts:
        raise SpecError(field_name, f"must not contain '..': {p!r}")
    if not parts:
        raise SpecError(field_name, "must not be '/' (use rootfs= to replace the root)")
    return "/" + "/".join(parts)


def _id(field_name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field_name} must be an int or None, not {type(value).__name__}")
    if not 0 <= value < 2**32 - 1:
        raise SpecError(field_name, f"must be in 0..4294967294, got {value}")
    return value


def _bool(field_name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{field_name} must be a bool, not {type(value).__name__}")
    return value


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(field_name: str, value: Any) -> Optional[int]:
    """Bytes from an int or a string like "256M", "1.5G" (binary units)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{field_name} must be an int, a size string or None, not bool")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", value.upper())
        if not m:
            raise SpecError(field_name, f"is not a size: {value!r} (use e.g. 1048576, '256M', '1.5G')")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    else:
        raise TypeError(f"{field_name} must be an int, a size string or None, not {type(value).__name__}")
    if n <= 0:
        raise SpecError(field_name, f"must be positive, got {value!r}")
    return n


@dataclass(frozen=True)
class Bind:
    """Bind the host path `src` onto `dst` inside the sandbox (read-only by default)."""

    src: str  # stored: absolute; given: a str or os.PathLike
    dst: str
    readonly: bool = True

    if TYPE_CHECKING:

        def __init__(self, src: StrPath, dst: StrPath, readonly: bool = True) -> None: ...

    def __post_init__(self) -> None:
        src = os.path.abspath(_path("Bind.src", self.src, absolute=False))
        if not os.path.exists(src):
            raise SpecError("Bind.src", f"does not exist: {src!r}")
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "dst", _target("Bind.dst", self.dst))
        _bool("Bind.readonly", self.readonly)


@dataclass(frozen=True)
class Tmpfs:
    """A fresh, empty tmpfs on `dst` (`size` in bytes or "64M"; None = kernel default)."""

    dst: str
    size: Optional[int] = None  # stored: bytes; given: bytes or "64M"

    if TYPE_CHECKING:

        def __init__(self, dst: StrPath, size: Union[int, str, None] = None) -> None: ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "dst", _target("Tmpfs.dst", self.dst))
        object.__setattr__(self, "size", parse_size("Tmpfs.size", self.size))


@dataclass(frozen=True)
class Overlay:
    """A copy-on-write view of the host directory `src` on `dst`: the sandbox reads and
    writes it as its own, `src` never changes while it runs (its changes are in the
    sandbox's overlay tmpfs, `Spec.overlay_size`). `Result.changes` says what changed
    (sandbox path -> "added", "modified" or "deleted"). `commit=True` applies the changes to
    `src` when the run exits 0 (sandlock's commit-on-success): files, directories and
    symlinks, with their permission bits (never setuid/setgid), deletions included; other
    file types (FIFOs, sockets) are listed but not applied. Only from `nsfast.run`."""

    src: str  # stored: absolute; given: a str or os.PathLike
    dst: str
    commit: bool = False

    if TYPE_CHECKING:

        def __init__(self, src: StrPath, dst: StrPath, commit: bool = False) -> None: ...

    def __post_init__(self) -> None:
        src = os.path.abspath(_path("Overlay.src", self.src, absolute=False))
        if not os.path.isdir(src):
            raise SpecError("Overlay.src", f"is not an existing directory: {src!r}")
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "dst", _target("Overlay.dst", self.dst))
        _bool("Overlay.commit", self.commit)


Mount = Union[Bind, Tmpfs, Overlay]

_SYSCALLS: Optional[Tuple[frozenset[str], Tuple[str, ...]]] = None


def _syscalls() -> Tuple[frozenset[str], Tuple[str, ...]]:
    global _SYSCALLS
    if _SYSCALLS is None:
        known, allowed = _core.seccomp_syscalls()
        _SYSCALLS = (frozenset(known), tuple(allowed))
    return _SYSCALLS


def _names(field_name: str, value: Any) -> Tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{field_name} must be an iterable of names, not {type(value).__name__}")
    out = []
    for v in value:
        if not isinstance(v, str):
            raise TypeError(f"{field_name} must hold str names, not {type(v).__name__}")
        out.append(v)
    return tuple(out)


# What the child still calls after the filter is installed.
_NEEDED = frozenset({"execve", "execveat", "write", "exit", "exit_group"})


@dataclass(frozen=True)
class Seccomp:
    """The sandbox's system call filter: nsfast's default allow list (modelled on Docker's
    default profile), plus `allow`, minus `deny` (system call names). Calls outside the list
    fail with EPERM; clone3 and openat2 with ENOSYS (so libc falls back); other
    architectures' calls (i386, x32) kill the process. `Spec(seccomp=None)` turns it off."""

    allow: Tuple[str, ...] = ()
    deny: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        known = _syscalls()[0]
        for name in ("allow", "deny"):
            names = _names(f"Seccomp.{name}", getattr(self, name))
            unknown = [n for n in names if n not in known]
            if unknown:
                raise SpecError(f"Seccomp.{name}", f"unknown system call(s) {', '.join(map(repr, unknown))}")
            object.__setattr__(self, name, names)
        needed = sorted(set(self.deny) & _NEEDED)
        if needed:
            raise SpecError(
                "Seccomp.deny", f"nsfast needs {', '.join(needed)} to start the command (and report a failure)"
            )

    @staticmethod
    def default_allowed() -> Tuple[str, ...]:
        """The system calls the default filter allows (on this architecture)."""
        return _syscalls()[1]


DEFAULT_SECCOMP = Seccomp()


def _default_limits() -> Limits:
    from ._cgroup import DEFAULT_LIMITS

    return DEFAULT_LIMITS


def _paths(field_name: str, value: Any) -> Tuple[str, ...]:
    return tuple(_target(field_name, p) for p in _names(field_name, value))


#: Spec.rlimits names: the `resource` module's RLIMIT_* constants, lower case without the prefix.
RLIMITS: Tuple[str, ...] = tuple(
    sorted(n[len("RLIMIT_") :].lower() for n in dir(resource) if n.startswith("RLIMIT_") and n != "RLIMIT_OFILE")
)
_RLIM_INFINITY = 2**64 - 1


def _rlimit_value(name: str, v: Any) -> int:
    if v is None or v == resource.RLIM_INFINITY or v == _RLIM_INFINITY:  # (stored form: re-validated)
        return _RLIM_INFINITY
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(
            f"rlimits[{name!r}] must be an int, None (unlimited) or a (soft, hard) pair, not {type(v).__name__}"
        )
    if not 0 <= v < 2**63:  # (as the exec helper takes them; RLIM_INFINITY is None)
        raise SpecError("rlimits", f"{name}: {v} is out of range")
    return v


def _rlimits(value: Any, user_ns: bool) -> dict[str, Tuple[int, int]]:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"rlimits must be a mapping of names ({', '.join(RLIMITS)}) to limits, not {type(value).__name__}"
        )
    out = {}
    for name, v in value.items():
        if not isinstance(name, str) or name.lower() not in RLIMITS:
            raise SpecError("rlimits", f"has an unknown resource {name!r} (known: {', '.join(RLIMITS)})")
        name = name.lower()
        soft, hard = v if isinstance(v, tuple) and len(v) == 2 else (v, v)
        soft, hard = _rlimit_value(name, soft), _rlimit_value(name, hard)
        if soft > hard:
            raise SpecError("rlimits", f"{name}: the soft limit {soft} is above the hard limit {hard}")
        cur = resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper()))[1]
        cur = _RLIM_INFINITY if cur == resource.RLIM_INFINITY else cur
        if hard > cur and (user_ns or os.geteuid() != 0):
            raise SpecError(
                "rlimits",
                f"{name}: the hard limit {hard} is above this process's ({cur}); raising it needs "
                "CAP_SYS_RESOURCE outside any user namespace (a root caller without 'user' in namespaces)",
            )
        out[name] = (soft, hard)
    return out


def default_env() -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/"}
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    return env


def _image_user(img: Image, user: str) -> Tuple[int, int]:
    """An image config's User ("name", "uid", "uid:gid", "name:group") as (uid, gid): names
    from the image's /etc/passwd and /etc/group, read inside its root (a symlink there
    cannot make nsfast read a host file)."""
    name, _, group = user.partition(":")

    def table(path: bytes) -> List[List[str]]:
        fd = os.open(img.rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            data = _core.tree_read(fd, path, 4 << 20) or b""
        except OSError as e:
            raise SpecError(
                "image", f"its config's User {user!r}: the image's /{path.decode()}: {e.strerror}"
            ) from None
        finally:
            os.close(fd)
        return [line.split(":") for line in data.decode(errors="replace").splitlines() if line.count(":") >= 3]

    def number(v: str) -> bool:  # ASCII digits only (str.isdigit() takes "²" and "١")
        return re.fullmatch("[0-9]+", v) is not None

    def lookup(value: str, path: bytes, what: str) -> Tuple[int, List[str]]:
        if number(value):
            return int(value), []
        for row in table(path):
            if row[0] == value and number(row[2]):
                return int(row[2]), row
        raise SpecError("image", f"its config's User {user!r}: no {what} {value!r} in the image's /{path.decode()}")

    uid, row = lookup(name, b"etc/passwd", "user")
    if group:
        gid = lookup(group, b"etc/group", "group")[0]
    elif row and number(row[3]):
        gid = int(row[3])
    else:
        gid = next((int(r[3]) for r in table(b"etc/passwd") if r[2] == str(uid) and number(r[3])), uid)
    return uid, gid


@dataclass(frozen=True)
class Spec:
    """Everything about a sandbox except the command.

    namespaces: names as in /proc/self/ns; "user" is added when not running as root.
    rootfs: None = the host root (read-only), else a directory used as "/". nsfast never
        writes into it: mount points it lacks (/proc, /dev, /tmp) come from a small overlay
        of nsfast's own, so a read-only or shared rootfs works as it is.
    readonly_root: None (default) = read-only wherever there is a mount namespace (writable
        with overlay=True); True without "mnt" is an error (the root would be the host's,
        writable).
    overlay: a writable copy-on-write root: a kernel overlayfs whose lower layer is the root
        (host root or rootfs, never modified) and whose upper layer is a tmpfs of
        `overlay_size` bytes (default 256 MiB; None: half of RAM), written by the sandbox,
        so charged to its memory limit, and gone when it ends. On the host root, every
        submount a user can see (a separate /usr, /home, ...) gets an overlay of its own, as
        in BenchExec; file systems an overlay cannot sit on (proc, sysfs, cgroup, ...) are
        bound read-only; one below a directory the sandbox may never search (Docker's
        /var/lib/docker, 0710, over its containers' mounts) is left as it is, out of
        reach. Works for root and rootless callers. A root caller's overlays are
        made by nsfast itself; a rootless caller's in the sandbox's user namespace, where the
        kernel refuses an overlay of a tree with (locked) submounts: on the host root that is
        one overlay per host directory over a tmpfs root (new top-level entries land there;
        each overlay's top directory is the sandbox's own; no overlay_upper).
    overlay_upper: a host directory that holds the changes instead, kept after the run:
        `<dir>/upper` (what was written, with overlayfs whiteouts for deletions) and
        `<dir>/work` (overlayfs's scratch); the same directory continues a previous run's
        state. It must not be inside the lower tree's file system (overlayfs refuses
        overlapping layers): on the host root, pick a directory on another file system
        (e.g. a tmpfs). Only the root file system is writable then: submounts are bound
        read-only (writes there fail with EROFS).
    mounts: extra `Bind`/`Tmpfs` mounts, applied in order.
    namespaces: "user" is always created for rootless callers; a root caller that leaves it
        out opts out of the user namespace (the sandbox's root is then host root: trusted
        code only). With it, a root caller's inside ids 0..65535 are host ids of a range of
        the sandbox's own (never host root; see SANDBOX_ID_BASE); a rootless caller's inside
        0 is the caller.
    env: the whole environment (default: PATH, HOME=/, TERM if set), never the host's.
    uid/gid: the ids the command runs as inside.
    capabilities: capability names kept; every other is dropped (default: none kept).
    init: run nsfast-init, a tiny init, as the sandbox's first process: it forwards signals to
        the command, reaps orphans and reports how the command ended. None (the default):
        exactly when there is a pid namespace, so the command gets ordinary signal semantics
        (`kill -TERM $$` ends it, returncode -15). True: also without a pid namespace (then it
        is a subreaper, not pid 1). False: never; with a pid namespace the command is its
        pid 1, and the kernel drops every signal it has no handler for, sent from inside or by
        the parent (SIGKILL from the parent excepted): `kill -TERM $$` and `kill -KILL $$` do
        nothing, `abort()` ends with SIGSEGV (-11), orphans stay zombies unless it reaps.
        Whatever the mode, death by signal N is returncode -N.
    limits: an `nsfast.Limits` (memory, pids, cpu, cpuset), applied through the sandbox's
        own cgroup; default `nsfast.DEFAULT_LIMITS`, None for none. cgroup=False turns
        cgroups off entirely (no limits, no cgroup usage).
    new_session: setsid() the command (no controlling terminal).
    die_with_parent: SIGKILL the sandbox when the thread that spawned it exits.
    seccomp: the system call filter (`nsfast.Seccomp`; None: no filter).
    masked_paths / readonly_paths: runc's lists (DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS).
    hidden: host directories replaced by an empty tmpfs when the root is the host's.
    tmp_size / shm_size: sizes of /tmp and /dev/shm (bytes or "256M"; None: half of RAM).
        Without "mnt", these and masked_paths/readonly_paths/hidden cannot apply: left at
        their defaults they are dropped, set to something else they are an error.
    rlimits: {name: limit} set before exec, names as the `resource` module's without RLIMIT_
        ("fsize", "nofile", "core", "cpu", "as", ...); a limit is an int (soft = hard), None
        (unlimited) or a (soft, hard) pair. A hard limit above the caller's cannot be set from
        a user namespace (SpecError).
    strict: a limit the user asked for that cannot take effect here raises LimitError before
        anything starts; strict=False applies what it can, with a CgroupWarning for the rest.
    delegate_cgroup: systemd's Delegate=yes for the sandbox (default False): before the
        sandbox runs anything, its cgroup directory and its cgroup.procs,
        cgroup.subtree_control and cgroup.threads are chowned to the sandbox's root (the
        first host id of its range for a root caller, the caller for a rootless one), as the kernel's
        cgroup v2 delegation model says; its limit files (memory.max, pids.max, ...) stay the
        caller's. Inside, /sys/fs/cgroup is a fresh cgroup2 mount rooted at that cgroup (its
        cgroup namespace), read-write, nosuid,nodev,noexec, instead of the host's read-only
        view: cgroup users inside (an nsfast, which also needs seccomp=None for its own
        namespaces and mounts, masked_paths=()/readonly_paths=() for its fresh /proc and
        capabilities=("setfcap",) to map its sandbox's root)
        create cgroups below it, within the sandbox's limits, removed with the sandbox. Needs
        cgroup v2 for the sandbox's cgroup (a pure v2 host; a hybrid or v1 host is a
        LimitError, whatever `strict`), the 'cgroup' and 'mnt' namespaces and cgroup=True
        (SpecError), and, where the sandbox's root owns its limit files (a rootless caller),
        the host's cgroup2 mounted with nsdelegate (which refuses those writes from inside).
    """

    # The annotations are the types stored (after validation and normalisation); what each
    # field accepts is SpecFields' (the __init__ a type checker sees).
    namespaces: Tuple[str, ...] = DEFAULT_NAMESPACES
    rootfs: Optional[str] = None
    readonly_root: bool = None  # type: ignore[assignment]  # None: decided from namespaces
    mounts: Tuple[Mount, ...] = ()
    hostname: Optional[str] = None
    env: Optional[Dict[str, str]] = None
    cwd: str = "/"
    uid: Optional[int] = None
    gid: Optional[int] = None
    capabilities: Tuple[str, ...] = ()
    init: Optional[bool] = None
    new_session: bool = True
    die_with_parent: bool = True
    limits: Optional[Limits] = field(default_factory=_default_limits)
    cgroup: bool = True
    strict: bool = True  # limits asked for that cannot take effect: LimitError (False: a warning)
    delegate_cgroup: bool = False
    seccomp: Optional[Seccomp] = DEFAULT_SECCOMP
    masked_paths: Tuple[str, ...] = DEFAULT_MASKED_PATHS
    readonly_paths: Tuple[str, ...] = DEFAULT_READONLY_PATHS
    hidden: Tuple[str, ...] = DEFAULT_HIDDEN
    tmp_size: Optional[int] = DEFAULT_TMP_SIZE
    shm_size: Optional[int] = DEFAULT_SHM_SIZE
    image: Optional[Image] = None
    overlay: bool = False
    overlay_size: Optional[int] = DEFAULT_OVERLAY_SIZE
    overlay_upper: Optional[str] = None
    rlimits: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # name -> (soft, hard)
    _env_items: Tuple[Tuple[str, str], ...] = field(default=(), init=False, repr=False, compare=False)
    _cap_mask: int = field(default=0, init=False, repr=False, compare=False)
    _rlimit_items: Tuple[Tuple[int, int, int], ...] = field(default=(), init=False, repr=False, compare=False)

    if TYPE_CHECKING:

        def __init__(self, **fields: Unpack[SpecFields]) -> None: ...

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # frozen dataclass
        names = _names("namespaces", self.namespaces)
        for n in names:
            if n not in NAMESPACES:
                raise SpecError("namespaces", f"has an unknown namespace {n!r} (known: {', '.join(NAMESPACES)})")
        set_("namespaces", tuple(n for n in NAMESPACES if n in names))

        img = self.image
        if isinstance(self.rootfs, Image):
            if img is not None and img is not self.rootfs:
                raise SpecError("image", "and rootfs= name two different images")
            img = self.rootfs
            set_("rootfs", None)
        if img is not None:
            if not isinstance(img, Image):
                raise TypeError(f"image must be an nsfast.Image, not {type(img).__name__}")
            if self.rootfs is not None and os.path.abspath(os.fspath(self.rootfs)) != img.rootfs:
                raise SpecError("image", f"runs on its own root; rootfs={self.rootfs!r} names another")
            set_("image", img)
            set_("rootfs", img.rootfs)
        if self.rootfs is not None:
            root = os.path.abspath(_path("rootfs", self.rootfs, absolute=False))
            if not os.path.isdir(root):
                raise SpecError("rootfs", f"is not an existing directory: {root!r}")
            set_("rootfs", root)
        mnt = "mnt" in self.namespaces
        _bool("overlay", self.overlay)
        if self.overlay:
            if not mnt:
                raise SpecError("overlay", "needs the 'mnt' namespace")
            if self.readonly_root:
                raise SpecError("readonly_root", "True contradicts overlay=True (the overlay is a writable root)")
            set_("readonly_root", False)
        set_("overlay_size", parse_size("overlay_size", self.overlay_size))
        if self.overlay_upper is not None:
            if not self.overlay:
                raise SpecError("overlay_upper", "needs overlay=True")
            upper = os.path.abspath(_path("overlay_upper", self.overlay_upper, absolute=False))
            if not os.path.isdir(upper):
                raise SpecError("overlay_upper", f"is not an existing directory: {upper!r}")
            if in_image_cache(upper):
                raise SpecError(
                    "overlay_upper", f"{upper!r} is in the image cache, which every sandbox of an image shares"
                )
            set_("overlay_upper", upper)
        if self.readonly_root is None:
            set_("readonly_root", mnt)  # read-only wherever a mount namespace can make it so
        _bool("readonly_root", self.readonly_root)
        if self.readonly_root and not mnt:
            raise SpecError("readonly_root", "needs the 'mnt' namespace (without it the sandbox's / is the host's)")
        cached = img is not None or (self.rootfs is not None and in_image_cache(self.rootfs))
        if cached and not self.readonly_root and not self.overlay:
            raise SpecError(
                "readonly_root",
                "False would let the sandbox write into the image cache, which every sandbox of the image shares: "
                "use overlay=True for a writable root",
            )

        mounts = self.mounts
        if isinstance(mounts, (Bind, Tmpfs, Overlay)):
            mounts = (mounts,)
        if not isinstance(mounts, Iterable):
            raise TypeError(f"mounts must be a sequence of Bind/Tmpfs/Overlay, not {type(mounts).__name__}")
        mounts = tuple(mounts)
        for m in mounts:
            if not isinstance(m, (Bind, Tmpfs, Overlay)):
                raise TypeError(f"mounts must hold Bind, Tmpfs or Overlay values, not {type(m).__name__}")
        set_("mounts", mounts)
        for m in mounts:
            # An image's cached root is every sandbox of the image's: writable here, one
            # sandbox would rewrite what the later ones run on (as readonly_root=False would).
            if isinstance(m, Tmpfs) or not (m.commit if isinstance(m, Overlay) else not m.readonly):
                continue
            if in_image_cache(os.fspath(m.src)):
                what = "a writable Bind" if isinstance(m, Bind) else "Overlay(commit=True)"
                raise SpecError(
                    "mounts",
                    f"{what} of {os.fspath(m.src)!r}, in the image cache, would let the sandbox change what every "
                    "sandbox of that image runs on: bind it read-only, or use an Overlay without commit",
                )
        cow_mounts = any(isinstance(m, Overlay) for m in mounts)
        if self.overlay_size != DEFAULT_OVERLAY_SIZE:
            if not (self.overlay or cow_mounts):
                raise SpecError("overlay_size", "needs overlay=True or an Overlay mount")
            if self.overlay_upper is not None and not cow_mounts:
                raise SpecError("overlay_size", "sizes the tmpfs, which overlay_upper replaces")
        if (mounts or self.rootfs is not None) and "mnt" not in self.namespaces:
            raise SpecError("namespaces", "must include 'mnt' when rootfs or mounts are given")

        if self.hostname is not None:
            if not isinstance(self.hostname, str):
                raise TypeError(f"hostname must be a str or None, not {type(self.hostname).__name__}")
            raw = self.hostname.encode()
            if not raw or len(raw) > 64 or "\0" in self.hostname:
                raise SpecError("hostname", f"must be 1 to 64 bytes without NUL, got {len(raw)} bytes")
            if "uts" not in self.namespaces:
                raise SpecError("hostname", "needs the 'uts' namespace")

        if img is not None:
            self._image_defaults(img, set_)
        env = default_env() if self.env is None else self.env
        if not isinstance(env, Mapping):
            raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
        items = []
        for k, v in env.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"env must map str to str, got {k!r}: {type(v).__name__}")
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise SpecError(
                    "env", f"has an invalid entry {k!r} (empty, '=' or NUL in the name, or NUL in the value)"
                )
            items.append((k, v))
        set_("_env_items", tuple(items))
        if self.env is not None:
            set_("env", dict(items))

        set_("cwd", _path("cwd", self.cwd))
        set_("uid", _id("uid", self.uid))
        set_("gid", _id("gid", self.gid))

        norm = []
        for c in _names("capabilities", self.capabilities):
            name = c.upper() if c.upper().startswith("CAP_") else "CAP_" + c.upper()
            if name not in CAPABILITIES[: _core.cap_last_cap() + 1]:
                raise SpecError("capabilities", f"has an unknown capability {c!r}")
            norm.append(name)
        set_("capabilities", tuple(sorted(set(norm), key=CAPABILITIES.index)))
        set_("_cap_mask", sum(1 << CAPABILITIES.index(c) for c in self.capabilities))
        if self.init is not None:
            _bool("init", self.init)
        for name in ("new_session", "die_with_parent", "cgroup", "strict", "delegate_cgroup"):
            _bool(name, getattr(self, name))
        if self.delegate_cgroup:
            if not self.cgroup:
                raise SpecError("delegate_cgroup", "needs cgroup=True (there is no cgroup to delegate)")
            missing = [n for n in ("cgroup", "mnt") if n not in self.namespaces]
            if missing:
                raise SpecError(
                    "delegate_cgroup",
                    f"needs the 'cgroup' and 'mnt' namespaces (missing: {', '.join(missing)}): the sandbox mounts "
                    "its own cgroup2, rooted at its cgroup",
                )
        from ._cgroup import DEFAULT_LIMITS, Limits

        if self.limits is not None and not isinstance(self.limits, Limits):
            raise TypeError(f"limits must be an nsfast.Limits or None, not {type(self.limits).__name__}")
        if self.limits is DEFAULT_LIMITS and not self.cgroup:
            set_("limits", None)  # cgroup=False: no cgroup, so no default limits either
        if (
            self.limits is not None
            and self.limits.cpu_time_soft is not None
            and self.init is False
            and "pid" in self.namespaces
        ):
            raise SpecError(
                "limits",
                "cpu_time_soft sends SIGTERM to the first process, which with init=False is the command as pid 1 "
                "of its pid namespace: the kernel would drop it (leave init at its default)",
            )
        if self.limits is not None and not self.cgroup:
            raise SpecError("limits", "need cgroup=True")
        if self.seccomp is not None and not isinstance(self.seccomp, Seccomp):
            raise TypeError(f"seccomp must be an nsfast.Seccomp or None, not {type(self.seccomp).__name__}")
        for name in ("masked_paths", "readonly_paths", "hidden"):
            set_(name, _paths(name, getattr(self, name)))
        set_("tmp_size", parse_size("tmp_size", self.tmp_size))
        set_("shm_size", parse_size("shm_size", self.shm_size))
        if not mnt:
            # What only a mount namespace can do: at its default, it does not apply (stored as
            # such); asked for explicitly, it is an error rather than silently dropped.
            for name, none in (("masked_paths", ()), ("readonly_paths", ()), ("hidden", ()), ("tmp_size", None),
                               ("shm_size", None)):  # fmt: skip
                value, default = getattr(self, name), _MNT_DEFAULTS[name]
                if value not in (default, none):
                    raise SpecError(name, "needs the 'mnt' namespace")
                set_(name, none)
        rl = _rlimits(self.rlimits, "user" in self.namespaces)
        set_("rlimits", rl)
        set_(
            "_rlimit_items",
            tuple((getattr(resource, "RLIMIT_" + n.upper()), soft, hard) for n, (soft, hard) in sorted(rl.items())),
        )

    def _image_defaults(self, img: Image, set_: Callable[[str, Any], None]) -> None:
        """The image config's Env (over default_env()), WorkingDir and User, where the fields
        are not given."""
        cfg = img.config
        if self.env is None:
            env = default_env()
            for kv in cfg.env:
                k, sep, v = kv.partition("=")
                if sep and k:
                    env[k] = v
            set_("env", env)
        if self.cwd == "/" and cfg.working_dir:
            set_("cwd", cfg.working_dir if cfg.working_dir.startswith("/") else "/" + cfg.working_dir)
        if cfg.user and self.uid is None and self.gid is None:
            uid, gid = _image_user(img, cfg.user)
            set_("uid", uid)
            set_("gid", gid)

    @property
    def _init(self) -> bool:
        """Whether nsfast-init is the first process: `init` resolved (the Rust Spec reads it)."""
        return self.init if self.init is not None else "pid" in self.namespaces

    @property
    def _nproc(self) -> Optional[int]:
        """RLIMIT_NPROC for the sandbox's user: the pids limit (see the Rust Spec)."""
        return None if self.limits is None else self.limits.pids

    def replace(self, **changes: Unpack[SpecFields]) -> Spec:
        """A copy with `changes` applied (and validated); unknown names raise TypeError."""
        return with_fields(self, changes)


class SpecFields(TypedDict, total=False):
    """The Spec fields as keyword arguments of run/spawn/Container/Spec.replace, with the
    input types each accepts (so a type checker rejects `hostnme=`). A test keeps it equal
    to Spec's fields."""

    namespaces: Iterable[str]
    rootfs: Union[StrPath, Image, None]
    readonly_root: Optional[bool]
    mounts: Union[Mount, Iterable[Mount]]
    hostname: Optional[str]
    env: Optional[Mapping[str, str]]
    cwd: StrPath
    uid: Optional[int]
    gid: Optional[int]
    capabilities: Iterable[str]
    init: Optional[bool]
    new_session: bool
    die_with_parent: bool
    limits: Optional[Limits]
    cgroup: bool
    seccomp: Optional[Seccomp]
    masked_paths: Iterable[str]
    readonly_paths: Iterable[str]
    hidden: Iterable[str]
    tmp_size: Union[int, str, None]
    shm_size: Union[int, str, None]
    image: Optional[Image]
    overlay: bool
    overlay_size: Union[int, str, None]
    overlay_upper: Optional[StrPath]
    rlimits: Mapping[str, Union[int, None, Tuple[Optional[int], Optional[int]]]]
    strict: bool
    delegate_cgroup: bool


_FIELDS = frozenset(f.name for f in dataclasses.fields(Spec) if f.init)
_MNT_DEFAULTS = {
    "masked_paths": DEFAULT_MASKED_PATHS,
    "readonly_paths": DEFAULT_READONLY_PATHS,
    "hidden": DEFAULT_HIDDEN,
    "tmp_size": DEFAULT_TMP_SIZE,
    "shm_size": DEFAULT_SHM_SIZE,
}
#: Fields whose validation reads nothing but their value (no file, no cwd, no image): a
#: Spec of only these, with plain values, is the same Spec every time it is asked for.
_PURE_FIELDS = frozenset(
    {"overlay", "overlay_size", "hostname", "init", "new_session", "die_with_parent", "cgroup", "strict",
     "uid", "gid", "tmp_size", "shm_size", "readonly_root", "delegate_cgroup"}
)  # fmt: skip
_PLAIN = (bool, int, float, str, type(None))
_made: Dict[Tuple[Any, ...], Spec] = {}


def _pure_spec(changes: Mapping[str, Any]) -> Optional[Spec]:
    """Spec(**changes), made once per distinct `changes` (and TERM, which it copies; {} is
    the default Spec) when every field is pure and every value plain (validation is not free;
    bool is an int, so True and 1 differ by type in the key); else None."""
    if not changes.keys() <= _PURE_FIELDS or not all(isinstance(v, _PLAIN) for v in changes.values()):
        return None
    key = (os.environ.get("TERM"), *sorted((k, type(v), v) for k, v in changes.items()))
    spec = _made.get(key)
    if spec is None:
        spec = Spec(**changes)
        if len(_made) >= 64:
            _made.clear()
        _made[key] = spec
    return spec


def with_fields(spec: Optional[Spec], changes: Mapping[str, Any]) -> Spec:
    """`spec` (or the default Spec) with keyword `changes`; unknown names raise TypeError."""
    unknown = sorted(set(changes) - _FIELDS)
    if unknown:
        raise TypeError(f"unknown sandbox option(s): {', '.join(unknown)} (Spec fields: {', '.join(sorted(_FIELDS))})")
    if spec is None:
        return _pure_spec(changes) or Spec(**changes)
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be an nsfast.Spec, not {type(spec).__name__}")
    return dataclasses.replace(spec, **changes) if changes else spec
