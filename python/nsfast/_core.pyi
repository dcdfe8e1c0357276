"""Type stubs of the native module (rust/src/py.rs). Private: use the `nsfast` package."""

from typing import Optional, Sequence, Tuple

from typing_extensions import final

__all__ = [
    "Cgroup",
    "DEFAULT_HIDDEN",
    "DEFAULT_MASKED_PATHS",
    "DEFAULT_NAMESPACES",
    "DEFAULT_READONLY_PATHS",
    "DEFAULT_SHM_SIZE",
    "DEFAULT_TMP_SIZE",
    "INIT_BINARY_SIZE",
    "SANDBOX_ID_BASE",
    "SANDBOX_ID_COUNT",
    "NAMESPACES",
    "cap_last_cap",
    "cgroup_backend",
    "namespaces",
    "own_cgroup",
    "seccomp_syscalls",
    "spawn",
    "spawn_join",
    "wait",
]

NAMESPACES: list[str]
DEFAULT_NAMESPACES: list[str]
DEFAULT_MASKED_PATHS: list[str]
DEFAULT_READONLY_PATHS: list[str]
DEFAULT_HIDDEN: list[str]
DEFAULT_TMP_SIZE: int
DEFAULT_SHM_SIZE: int
SANDBOX_ID_BASE: int
SANDBOX_ID_COUNT: int
INIT_BINARY_SIZE: int

_Limits = Tuple[Optional[int], Optional[int], Optional[int], Optional[Tuple[int, int]], Optional[str]]

@final
class Cgroup:
    """One sandbox's cgroup; removed by remove() or when garbage-collected."""

    @property
    def version(self) -> int: ...
    def kill(self) -> None: ...
    def usage(self) -> Optional[Tuple[Optional[int], Optional[int], Optional[int], Optional[int], int]]: ...
    def remove(self) -> None: ...
    def release(self) -> list[str]: ...
    def paths(self) -> list[str]: ...

def spawn(
    args: Sequence[bytes],
    *,
    env: Sequence[bytes],
    cwd: bytes,
    namespaces: Sequence[str],
    hostname: Optional[bytes],
    rootfs: Optional[bytes],
    readonly_root: bool,
    mounts: Sequence[Tuple[str, Optional[bytes], bytes, bool, Optional[int]]],
    uid: Optional[int],
    gid: Optional[int],
    keep_caps: int,
    init: bool,
    new_session: bool,
    die_with_parent: bool,
    stdio: Tuple[int, int, int],
    pass_fds: Sequence[int],
    cgroup: Optional[Tuple[str, _Limits, bool]] = None,
    masked_paths: Sequence[bytes] = ...,
    readonly_paths: Sequence[bytes] = ...,
    hidden: Sequence[bytes] = ...,
    tmp_size: Optional[int] = None,
    shm_size: Optional[int] = None,
    seccomp: Optional[Tuple[Sequence[str], Sequence[str]]] = None,
    nproc: Optional[int] = None,
) -> Tuple[int, int, Optional[Cgroup], Optional[int]]: ...
def spawn_join(
    args: Sequence[bytes],
    *,
    # A pid, or an int subclass with `held` (a container's namespace/root fds, cgroup and
    # seccomp since its start); then the exec's own cgroup is set on `target.exec_cgroup`.
    target: int,
    join: Sequence[str],
    env: Sequence[bytes],
    cwd: Optional[bytes],
    uid: Optional[int],
    gid: Optional[int],
    keep_caps: int,
    die_with_parent: bool,
    stdio: Tuple[int, int, int],
    pass_fds: Sequence[int],
    join_cgroup: bool,
) -> Tuple[int, int]: ...
def wait(
    pid: int, pidfd: int, timeout: Optional[float] = None, status_fd: Optional[int] = None
) -> Optional[Tuple[int, float, float, int]]: ...
def namespaces(pid: str) -> dict[str, int]: ...
def cap_last_cap() -> int: ...
def seccomp_syscalls() -> Tuple[list[str], list[str]]: ...
def cgroup_backend(root: str) -> Tuple[int, list[str], list[str]]: ...
def own_cgroup() -> Optional[str]: ...
