"""Type stubs of the native module (rust/src/py.rs). Private: use the `nsfast` package."""

from typing import Any, List, Optional, Sequence, Tuple

from typing_extensions import final

__all__ = [
    "Exit",
    "Sandbox",
    "DEFAULT_HIDDEN",
    "DEFAULT_MASKED_PATHS",
    "DEFAULT_NAMESPACES",
    "DEFAULT_READONLY_PATHS",
    "DEFAULT_SHM_SIZE",
    "DEFAULT_TMP_SIZE",
    "ENTRY_COST",
    "INIT_BINARY_SIZE",
    "HIDDEN_SIZE",
    "SANDBOX_ID_BASE",
    "SANDBOX_ID_COUNT",
    "SANDBOX_OWNER_BASE",
    "SANDBOX_RANGES",
    "SANDBOX_RANGES_BASE",
    "NAMESPACES",
    "cap_last_cap",
    "cgroup_backend",
    "namespaces",
    "own_cgroup",
    "settle",
    "set_netns_pool",
    "netns_pool",
    "mounts",
    "sandbox_id_range",
    "kill_cgroups",
    "seccomp_syscalls",
    "spawn",
    "spawn_join",
    "landlock_abi",
    "tree_list",
    "tree_open",
    "dir_beneath",
    "tree_read",
    "tree_readlink",
    "tree_write",
    "zygote_serve",
    "cgroup_hierarchies",
    "ZygoteLink",
]

NAMESPACES: list[str]
DEFAULT_NAMESPACES: list[str]
DEFAULT_MASKED_PATHS: list[str]
DEFAULT_READONLY_PATHS: list[str]
DEFAULT_HIDDEN: list[str]
DEFAULT_TMP_SIZE: int
ENTRY_COST: int
DEFAULT_SHM_SIZE: int
HIDDEN_SIZE: int
SANDBOX_ID_BASE: int
SANDBOX_ID_COUNT: int
SANDBOX_OWNER_BASE: int
SANDBOX_RANGES: int
SANDBOX_RANGES_BASE: int
INIT_BINARY_SIZE: int

@final
class Exit:
    """How a sandbox ended and what it cost, recorded once, when it was reaped."""

    @property
    def returncode(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def wall_s(self) -> float: ...
    @property
    def cpu_user_s(self) -> Optional[float]: ...
    @property
    def cpu_system_s(self) -> Optional[float]: ...
    @property
    def memory_peak_bytes(self) -> Optional[int]: ...
    @property
    def pids_peak(self) -> Optional[int]: ...
    @property
    def oom_killed(self) -> bool: ...
    @property
    def termination(self) -> str: ...
    @property
    def cleanup_error(self) -> Optional[str]: ...

@final
class Sandbox:
    """A running sandbox: its first process's pidfd, its cgroup, its recorded Exit."""

    @property
    def pid(self) -> int: ...
    @property
    def cgroup_version(self) -> Optional[int]: ...
    @property
    def id_base(self) -> Optional[int]: ...
    @property
    def exit(self) -> Optional[Exit]: ...
    def fileno(self) -> int: ...
    def wait(self, timeout: Optional[float] = None) -> Optional[Exit]: ...
    def poll(self) -> Optional[Exit]: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self, reason: Optional[str] = None) -> None: ...
    def detach(self) -> list[str]: ...
    def cgroup_paths(self) -> list[str]: ...
    def take_trees(self) -> list[int]: ...

def spawn(
    spec: Any,  # a frozen nsfast.Spec, read attribute by attribute
    args: Sequence[bytes],
    *,
    stdio: Tuple[int, int, int],
    pass_fds: Sequence[int],
    cgroup: Any = None,  # an nsfast._cgroup.CgroupRequest, read attribute by attribute
    trees: Sequence[bytes] = ...,
    chown: Sequence[int] = ...,
) -> Sandbox: ...
def tree_read(fd: int, path: bytes, max: int) -> Optional[bytes]: ...
def tree_list(
    fd: int, path: bytes, userxattr: bool = False, max_bytes: Optional[int] = None
) -> list[Tuple[bytes, str, int]]: ...
def tree_open(fd: int, path: bytes) -> Optional[int]: ...
def dir_beneath(fd: int, path: bytes) -> int: ...
def tree_readlink(fd: int, path: bytes) -> Optional[bytes]: ...
def tree_write(
    fd: int, path: bytes, data: bytes, mode: int = 0o644, owner: Optional[Tuple[int, int]] = None
) -> None: ...
def spawn_join(
    spec: Any,
    args: Sequence[bytes],
    *,
    target: int,
    join: Sequence[str],
    cwd: Optional[bytes],
    stdio: Tuple[int, int, int],
    pass_fds: Sequence[int],
    join_cgroup: bool,
    held: Any = None,  # a container's _Held: its namespace/root fds, Sandbox, seccomp, nproc
    pin: Optional[int] = None,  # a pidfd of target: fail if it exited since
) -> Sandbox: ...
def namespaces(pid: str) -> dict[str, int]: ...
def cap_last_cap() -> int: ...
def landlock_abi() -> int: ...
def seccomp_syscalls() -> Tuple[list[str], list[str]]: ...
def cgroup_backend(root: str) -> Tuple[int, list[str], list[str], bool]: ...
def own_cgroup() -> Optional[str]: ...
def settle() -> None: ...
def set_netns_pool(n: int) -> None: ...
def netns_pool() -> int: ...
def mounts() -> list[Tuple[str, str]]: ...
def sandbox_id_range() -> bool: ...
def kill_cgroups(paths: Sequence[str]) -> None: ...
def zygote_serve(
    ctrl_fd: int,
    spec: Any,
    *,
    scoped: bool = False,
    scratch: Sequence[Tuple[bytes, Optional[int], str]] = ...,
    sealed: Sequence[bytes] = ...,
    cgroups: Optional[_Hierarchies] = None,
) -> bool: ...

_Hierarchies = Tuple[bool, List[Tuple[bytes, str, bytes]], List[Tuple[bytes, bytes]], List[int]]

def cgroup_hierarchies() -> Optional[_Hierarchies]: ...

@final
class ZygoteLink:
    """The caller's end of a zygote's control socket."""

    def __new__(cls, fd: int) -> ZygoteLink: ...
    def close(self) -> None: ...
    def task(
        self,
        payload: bytes,
        *,
        stdio: Tuple[int, int, int],
        result: int,
        cgroup: Any = None,
        new_session: bool = True,
    ) -> Sandbox: ...
