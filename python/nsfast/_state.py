"""State of detached containers (`nsfast run -d`), kept like runc's: one directory per
container under the state root, /run/nsfast/ (root) or $XDG_RUNTIME_DIR/nsfast/ (others;
/tmp/nsfast-UID/nsfast/ without it). $NSFAST_STATE_DIR, an absolute path, overrides the state
root for everyone (the tests point it at a temporary directory).

Nothing here is followed or trusted on sight, because `nsfast stop` kills what a state names:

- The state root, /tmp/nsfast-UID and every container directory are created 0700 and, when
  opened, must be real directories (not symlinks), owned by the current euid and writable by
  no one else; otherwise StateError names the path and what is wrong with it. A container
  directory or state.json that fails this is reported as an invalid state.
- Files are opened relative to their directory's fd with O_NOFOLLOW; state.json is written to
  a fresh O_CREAT|O_EXCL temp file (0600) and renamed over, inside the container directory.
- A state proves its pid and cgroups or is not acted on (`State.check`): the pid must exist
  with the recorded start time and be in every recorded cgroup (per /proc/PID/cgroup; for a
  zombie in cgroup v1, which moves it to the root, the recorded inode) and namespace. A cgroup
  path must be absolute, normalised, under /sys/fs/cgroup, inside a cgroup file system, reached
  through no symlink, and named like a sandbox's (sb-PID-N). Once the pid is gone ("stale"),
  only cgroups whose inode is the recorded one are still the container's.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import IO, Dict, Iterator, List, NamedTuple, Optional, Tuple

from ._errors import NsfastError
from ._paths import untrusted

__all__ = [
    "State",
    "StateError",
    "Verdict",
    "state_root",
    "create",
    "remove",
    "load",
    "load_all",
    "start_time",
    "valid_name",
]

ENV_VAR = "NSFAST_STATE_DIR"
CGROUP_ROOT = "/sys/fs/cgroup"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SANDBOX_CGROUP = re.compile(r"sb-[0-9]+-[0-9]+")
_NS_TYPE = re.compile(r"[a-z_]{1,16}")
_MAX_STATE_BYTES = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StateError(NsfastError):
    """The state directory, a container's directory or its files cannot be trusted."""


def state_root() -> str:
    override = os.environ.get(ENV_VAR)
    if override:
        if not os.path.isabs(override):
            raise StateError(f"${ENV_VAR} must be an absolute path, got {override!r}")
        return os.path.normpath(override)
    if os.geteuid() == 0:
        return "/run/nsfast"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or _tmp_parent()
    return os.path.join(runtime, "nsfast")


def _tmp_parent() -> str:
    return f"/tmp/nsfast-{os.geteuid()}"


def valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


# -- directories and files that are ours ---------------------------------------------------------


def _open_dir(path: str, shown: str, *, dir_fd: Optional[int] = None, create: bool = False) -> Optional[int]:
    """An fd of directory `path` (relative to `dir_fd`), made 0700 first if `create`; None if
    it does not exist. StateError if it is a symlink, not a directory, not owned by our euid,
    or writable by group or others. `shown` is the full path, for messages."""
    if create:
        try:
            os.mkdir(path, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            is_link = stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
        except OSError:
            is_link = False
        what = "is a symbolic link (refusing to follow it)" if is_link else "is not a directory"
        raise StateError(f"state directory {shown} {what}") from None
    try:
        _check_owned(os.fstat(fd), shown, "state directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_owned(st: os.stat_result, shown: str, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise StateError(f"{what} {shown} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise StateError(f"{what} {shown} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")


def _trusted_root(root: str) -> str:
    """`root` with its parent resolved, or a StateError if another user could have put any directory on the
    way to it there, or could swap one (see _paths.untrusted; found by an audit: only the
    last component was checked, so $NSFAST_STATE_DIR below another user's directory was
    theirs to point at any directory root owns). What does not exist yet is made by us."""
    # (Its own last component is never followed: _open_dir refuses a symlink there.)
    real = os.path.join(os.path.realpath(os.path.dirname(root)), os.path.basename(root))
    parent = existing = os.path.dirname(real)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    why = untrusted(existing, itself=True)
    if why is None and existing != parent and os.lstat(existing).st_mode & 0o022:
        # (makedirs would go on into what another user may have made first)
        why = f"{existing} is writable by other users, who could make {parent} first"
    if why is not None:
        raise StateError(f"state directory {root}: {why}")
    return real


@contextmanager
def _root(create: bool = False) -> Iterator[Optional[int]]:
    """The state root's fd (None if it does not exist and not `create`)."""
    root = state_root()
    if root != os.path.join(_tmp_parent(), "nsfast") or os.environ.get(ENV_VAR):
        root = _trusted_root(root)
    parent_fd = None
    if root == os.path.join(_tmp_parent(), "nsfast") and not os.environ.get(ENV_VAR):
        # /tmp is everyone's: /tmp/nsfast-UID could have been planted by another user.
        parent_fd = _open_dir(_tmp_parent(), _tmp_parent(), create=create)
        if parent_fd is None:
            yield None
            return
    try:
        if create and parent_fd is None:
            os.makedirs(os.path.dirname(root), exist_ok=True)
        fd = _open_dir(os.path.basename(root) if parent_fd is not None else root, root, dir_fd=parent_fd, create=create)
    finally:
        if parent_fd is not None:
            os.close(parent_fd)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def _container_dir(name: str, create: bool = False) -> Iterator[Optional[int]]:
    """The fd of container `name`'s directory (None if it or the root does not exist)."""
    with _root(create) as root_fd:
        fd = (
            None
            if root_fd is None
            else _open_dir(name, os.path.join(state_root(), name), dir_fd=root_fd, create=create)
        )
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)


def create(name: str) -> IO[bytes]:
    """Reserve container `name`: make its directory (0700; FileExistsError if the name is
    taken) and return its log file, new, 0600, opened for appending."""
    if not valid_name(name):
        raise StateError(
            f"invalid container name {name!r}: letters, digits, '_', '.' and '-', "
            "starting with a letter or digit, at most 128"
        )
    with _root(create=True) as root_fd:
        assert root_fd is not None
        os.mkdir(name, 0o700, dir_fd=root_fd)
        fd = _open_dir(name, os.path.join(state_root(), name), dir_fd=root_fd)
        assert fd is not None
        try:
            log = os.open(
                "log",
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=fd,
            )
        finally:
            os.close(fd)
    return os.fdopen(log, "ab")


def read_logs(name: str) -> List[bytes]:
    """What container `name` wrote: its `log.1` (the part before the last rotation, if any)
    and its `log`, as they are now. LookupError if there is no such container."""
    if not valid_name(name):
        raise LookupError(f"no container named {name!r}")
    out = []
    with _container_dir(name) as d:
        if d is None:
            raise LookupError(f"no container named {name!r}")
        for part in ("log.1", "log"):
            try:
                fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=d)
            except FileNotFoundError:
                continue
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StateError(f"{os.path.join(state_root(), name, part)} is not a regular file")
                _check_owned(st, os.path.join(state_root(), name, part), "log")
                out.append(f.read())
    return out


def _remove_tree(dir_fd: int, name: str) -> None:
    """rm -r `name` in `dir_fd`, following no symlink (one in the tree is removed, not entered)."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for entry in os.listdir(fd):
            try:
                os.unlink(entry, dir_fd=fd)
            except IsADirectoryError:
                _remove_tree(fd, entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def remove(name: str) -> bool:
    """Remove container `name`'s directory if it is there (StateError if it is not ours);
    whether it was."""
    if not valid_name(name):
        return False
    with _root() as root_fd:
        if root_fd is None:
            return False
        fd = _open_dir(name, os.path.join(state_root(), name), dir_fd=root_fd)  # refuses a planted one
        if fd is None:
            return False
        try:
            _wait_for_log_relay(fd, LOG_RELAY_WAIT)
        finally:
            os.close(fd)
        try:
            _remove_tree(root_fd, name)
        except FileNotFoundError:
            return False
    return True


#: How long `remove` waits for a container's log relay to write what is left in its pipe
#: and exit (it does once the container's processes are gone) before removing anyway.
LOG_RELAY_WAIT = 5.0


def _wait_for_log_relay(dir_fd: int, timeout: float) -> bool:
    """Wait until no log relay holds the directory (its shared flock on it, taken by the CLI
    for it before it started); whether none does."""
    import fcntl
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


# -- processes and cgroups -----------------------------------------------------------------------


def _stat(pid: int) -> Optional[List[bytes]]:
    """Fields of /proc/PID/stat after comm (state is [0]), or None if there is no process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: fields resume after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def start_time(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if there is no such process."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def ns_inode(pid: int, ns_type: str) -> Optional[int]:
    """The inode of `pid`'s namespace of `ns_type`, or None if it cannot be read."""
    try:
        return os.stat(f"/proc/{pid}/ns/{ns_type}").st_ino
    except OSError:
        return None


def dir_inode(path: str) -> Optional[int]:
    """The inode of directory `path` (not followed if a symlink), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISDIR(st.st_mode) else None


class _Mount(NamedTuple):
    root: str
    point: str
    fstype: str
    options: frozenset  # type: ignore[type-arg]


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _mounts() -> List[_Mount]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            out.append(
                _Mount(_unescape(parts[3]), _unescape(parts[4]), parts[sep + 1], frozenset(parts[sep + 3].split(",")))
            )
    return out


def _mount_of(path: str, mounts: List[_Mount]) -> Optional[_Mount]:
    """The mount `path` lies strictly below (the last, i.e. visible, of the deepest)."""
    best: Optional[_Mount] = None
    for m in mounts:
        if path.startswith(m.point.rstrip("/") + "/") and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def _cgroup_path_problem(path: object, mounts: List[_Mount]) -> Optional[str]:
    """Why `path` cannot be a sandbox's cgroup directory, or None."""
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        return "is not an absolute path"
    if os.path.normpath(path) != path:  # '..', '.', '//' or a trailing '/'
        return "is not normalised"
    if not path.startswith(CGROUP_ROOT + "/"):
        return f"is not under {CGROUP_ROOT}"
    if not _SANDBOX_CGROUP.fullmatch(os.path.basename(path)):
        return "is not a sandbox cgroup (named sb-PID-N)"
    if os.path.realpath(path) != path:
        return "goes through a symbolic link"
    m = _mount_of(path, mounts)
    if m is None or m.fstype not in ("cgroup", "cgroup2"):
        return "is not in a cgroup file system"
    return None


def _cgroup_dir(pid: int, mount: _Mount) -> Optional[str]:
    """The directory, in `mount`, of the cgroup `pid` is in (from /proc/PID/cgroup)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if mount.fstype == "cgroup2":
            if ctrls:
                continue
        elif not ctrls or not set(ctrls.split(",")) <= mount.options:
            continue
        root = mount.root.rstrip("/")
        if root and not (path == root or path.startswith(root + "/")):
            return None  # outside what this mount shows
        rel = path[len(root) :].strip("/")
        return os.path.join(mount.point, rel) if rel else mount.point
    return None


# -- the state -----------------------------------------------------------------------------------


class Verdict(NamedTuple):
    """What a state proves. status: "running"; "exited" (its process ended, not yet reaped);
    "stale" (the pid is gone or is another process now); "invalid" (it names a pid or a cgroup
    it does not prove, or its files are not to be trusted: never act on it). `reason` says why
    for the last two; `cgroups` are the recorded cgroups proven to be the container's."""

    status: str
    reason: str
    cgroups: List[str]


@dataclass
class State:
    name: str
    pid: int
    start_time: int
    command: List[str]
    created: float
    env: Dict[str, str]
    cwd: str
    cgroup_paths: List[str] = field(default_factory=list)
    namespaces: List[str] = field(default_factory=list)
    cgroup_inodes: List[int] = field(default_factory=list)  # of cgroup_paths, when created
    ns_inodes: Dict[str, int] = field(default_factory=dict)  # type -> inode, when created
    # What `nsfast exec` gives the processes it starts in the container, as its main process
    # has them: its ids inside, capabilities, seccomp filter ("off", or the default's with
    # allow/deny), RLIMIT_NPROC (None: not recorded, or none).
    uid: Optional[int] = None
    gid: Optional[int] = None
    capabilities: List[str] = field(default_factory=list)
    seccomp: str = "default"
    seccomp_allow: List[str] = field(default_factory=list)
    seccomp_deny: List[str] = field(default_factory=list)
    nproc: Optional[int] = None
    problem: Optional[str] = None  # why this state is invalid as read (never saved)

    @property
    def dir(self) -> str:
        return os.path.join(state_root(), self.name)

    def check(self) -> Verdict:
        if self.problem:
            return Verdict("invalid", self.problem, [])
        mounts = _mounts()
        for p in self.cgroup_paths:
            why = _cgroup_path_problem(p, mounts)
            if why:
                return Verdict("invalid", f"cgroup path {p!r} {why}", [])
        if self.cgroup_inodes and len(self.cgroup_inodes) != len(self.cgroup_paths):
            return Verdict("invalid", "cgroup_inodes do not match cgroup_paths", [])
        fields_ = _stat(self.pid)
        if fields_ is None or int(fields_[19]) != self.start_time:
            # The pid proves nothing now; a cgroup with the recorded inode is still the one made
            # for this container (a same-named one made since is not).
            ours = [p for p, ino in zip(self.cgroup_paths, self.cgroup_inodes) if dir_inode(p) == ino]
            return Verdict("stale", f"its process {self.pid} is gone", ours)
        if not self.cgroup_paths and not self.ns_inodes:
            return Verdict(
                "invalid",
                f"nothing proves process {self.pid} is this container's (no cgroup and no namespace recorded)",
                [],
            )
        zombie = fields_[0] in (b"Z", b"X")
        inodes: List[Optional[int]] = list(self.cgroup_inodes) or [None] * len(self.cgroup_paths)
        for p, ino in zip(self.cgroup_paths, inodes):
            m = _mount_of(p, mounts)
            assert m is not None
            if _cgroup_dir(self.pid, m) != p:
                # cgroup v1 moves an exiting task to the root cgroups: for a zombie there, the
                # inode recorded at creation is the proof left.
                if not (zombie and m.fstype == "cgroup" and ino is not None and dir_inode(p) == ino):
                    return Verdict("invalid", f"process {self.pid} is not in its cgroup {p}", [])
            if dir_inode(p) is None:
                return Verdict("invalid", f"cgroup path {p!r} is not a directory", [])
        if not zombie:  # a zombie has no namespaces left to compare
            for t, ino in sorted(self.ns_inodes.items()):
                if ns_inode(self.pid, t) != ino:
                    return Verdict("invalid", f"process {self.pid} is not in its {t} namespace", [])
        if start_time(self.pid) != self.start_time:  # it went (and the pid was reused) as we read
            return Verdict("stale", f"its process {self.pid} is gone", [])
        return Verdict("exited" if zombie else "running", "", list(self.cgroup_paths))

    def status(self) -> str:
        return self.check().status

    def save(self) -> None:
        """Write state.json: a new 0600 temp file, renamed over it inside the container directory."""
        if not valid_name(self.name):
            raise StateError(f"invalid container name {self.name!r}")
        record = {k: v for k, v in asdict(self).items() if v is not None}  # (None: the key is absent)
        data = json.dumps(record, indent=1).encode()
        with _container_dir(self.name, create=True) as fd:
            assert fd is not None
            tmp = f".state.json.{os.urandom(8).hex()}.tmp"
            tmp_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
            try:
                with os.fdopen(tmp_fd, "wb") as f:
                    f.write(data)
                os.rename(tmp, "state.json", src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=fd)
                except OSError:
                    pass
                raise

    def remove(self) -> None:
        remove(self.name)

    def age(self) -> float:
        return time.time() - self.created


_LIST, _DICT = "list", "dict"
_SCHEMA: Dict[str, Tuple[object, ...]] = {
    "name": (str,),
    "pid": (int,),
    "start_time": (int,),
    "command": (_LIST, str),
    "created": ((int, float),),
    "env": (_DICT, str),
    "cwd": (str,),
    "cgroup_paths": (_LIST, str),
    "namespaces": (_LIST, str),
    "cgroup_inodes": (_LIST, int),
    "ns_inodes": (_DICT, int),
    "uid": (int,),
    "gid": (int,),
    "capabilities": (_LIST, str),
    "seccomp": (str,),
    "seccomp_allow": (_LIST, str),
    "seccomp_deny": (_LIST, str),
    "nproc": (int,),
}
_REQUIRED = ("name", "pid", "start_time", "command", "created", "env", "cwd")


def _is(value: object, kind: object) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)  # type: ignore[arg-type]


def _from_json(name: str, data: object) -> State:
    """The State of a parsed state.json; ValueError says what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError("state.json is not an object")
    unknown = sorted(set(data) - set(_SCHEMA))
    missing = [k for k in _REQUIRED if k not in data]
    if unknown or missing:
        raise ValueError(f"state.json has unknown keys {unknown} or lacks {missing}")
    for key, value in data.items():
        kind = _SCHEMA[key]
        if kind[0] == _LIST:
            ok = isinstance(value, list) and all(_is(v, kind[1]) for v in value)
        elif kind[0] == _DICT:
            ok = isinstance(value, dict) and all(isinstance(k, str) and _is(v, kind[1]) for k, v in value.items())
        else:
            ok = _is(value, kind[0])
        if not ok:
            raise ValueError(f"state.json: {key} has the wrong type")
    if data["name"] != name:
        raise ValueError(f"state.json names container {data['name']!r}, not {name!r}")
    if data["pid"] <= 0:
        raise ValueError(f"state.json: pid {data['pid']} is not a process id")
    if not all(_NS_TYPE.fullmatch(t) for t in data.get("ns_inodes", {})):
        raise ValueError("state.json: ns_inodes has a key that is not a namespace type")
    if data.get("seccomp", "default") not in ("default", "off"):
        raise ValueError("state.json: seccomp is neither 'default' nor 'off'")
    known = {f.name for f in fields(State)}
    return State(**{k: v for k, v in data.items() if k in known})


def _invalid(name: str, problem: str) -> State:
    return State(name=name, pid=0, start_time=-1, command=["?"], created=0.0, env={}, cwd="/", problem=problem)


def load(name: str) -> Optional[State]:
    """Container `name`'s state; None if there is none. A state that cannot be trusted (a
    planted or symlinked directory or file, or a corrupt state.json) comes back with `.problem`
    set, so that it is reported "invalid" rather than acted on. StateError if the state root
    itself cannot be trusted."""
    if not valid_name(name):
        return None
    with _root() as root_fd:
        if root_fd is None:
            return None
        shown = os.path.join(state_root(), name)
        try:
            dir_fd = _open_dir(name, shown, dir_fd=root_fd)
        except StateError as e:
            return _invalid(name, str(e))
        if dir_fd is None:
            return None
        try:
            try:
                fd = os.open("state.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                return None  # a start under way (or one that did not finish)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return _invalid(name, f"{shown}/state.json is a symbolic link (refusing to follow it)")
                return _invalid(name, f"{shown}/state.json: {e.strerror}")
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    return _invalid(name, f"{shown}/state.json is not a regular file")
                try:
                    _check_owned(st, f"{shown}/state.json", "state file")
                except StateError as e:
                    return _invalid(name, str(e))
                raw = f.read(_MAX_STATE_BYTES + 1)
        finally:
            os.close(dir_fd)
    try:
        if len(raw) > _MAX_STATE_BYTES:
            raise ValueError("state.json is too large")
        return _from_json(name, json.loads(raw))
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError too
        return _invalid(name, f"corrupt state ({e})")


def load_all() -> List[State]:
    """Every container's state, by name. StateError if the state root cannot be trusted."""
    with _root() as root_fd:
        if root_fd is None:
            return []
        names = sorted(os.listdir(root_fd))
    return [s for s in (load(n) for n in names if valid_name(n)) if s is not None]
