"""Type stubs of the native module (rust/src/py.rs). Private: use the `nsfast` package."""

from typing import Optional, Sequence, Tuple

NAMESPACES: list[str]
DEFAULT_NAMESPACES: list[str]
INIT_BINARY_SIZE: int

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
) -> Tuple[int, int]: ...
def wait(pid: int, pidfd: int, timeout: Optional[float] = None) -> Optional[Tuple[int, float, float, int]]: ...
def namespaces(pid: str) -> dict[str, int]: ...
def cap_last_cap() -> int: ...
