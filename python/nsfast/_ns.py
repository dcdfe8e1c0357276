"""Namespace inspection: the `/proc/PID/ns` comparison of `docker exec`, as functions."""

from __future__ import annotations

from typing import Dict, Union

from . import _core

__all__ = ["namespaces", "compare_namespaces"]

Pid = Union[int, str]


def _pid(pid: Pid) -> str:
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        raise TypeError(f"pid must be an int or 'self', not {type(pid).__name__}")
    if isinstance(pid, str) and pid != "self" and not pid.isdigit():
        raise ValueError(f"pid must be a number or 'self', got {pid!r}")
    if isinstance(pid, int) and pid <= 0:
        raise ValueError(f"pid must be positive, got {pid}")
    return str(pid)


def namespaces(pid: Pid = "self") -> Dict[str, int]:
    """Namespace type -> inode for process `pid`, read from /proc/PID/ns.
    Raises FileNotFoundError for a process that does not exist."""
    return dict(_core.namespaces(_pid(pid)))


def compare_namespaces(pid_a: Pid, pid_b: Pid) -> Dict[str, bool]:
    """Namespace type -> whether `pid_a` and `pid_b` share it."""
    a, b = namespaces(pid_a), namespaces(pid_b)
    return {t: a[t] == b[t] for t in a if t in b}
