"""Type stubs of the native module (rust/src/py.rs). Private: use the `nsfast` package."""

from typing import Optional, Sequence, Tuple

from typing_extensions import final

__all__ = [
    "Cgroup",
    "DEFAULT_NAMESPACES",
    "INIT_BINARY_SIZE",
    "NAMESPACES",
    "cap_last_cap",
    "cgroup_backend",
    "namespaces",
    "own_cgroup",
    "spawn",
    "spawn_join",
    "wait",
]

NAMESPACES: list[str]
DEFAULT_NAMESPACES: list[str]
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
) -> Tuple[int, int, Optional[Cgroup]]: ...
def spawn_join(
    args: Sequence[bytes],
    *,
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
def wait(pid: int, pidfd: int, timeout: Optional[float] = None) -> Optional[Tuple[int, float, float, int]]: ...
def namespaces(pid: str) -> dict[str, int]: ...
def cap_last_cap() -> int: ...
def cgroup_backend(root: str) -> Tuple[int, list[str], list[str]]: ...
def own_cgroup() -> Optional[str]: ...
