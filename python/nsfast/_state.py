"""State of detached containers (`nsfast run -d`), kept like runc's: one directory per
container under /run/nsfast/ (root) or $XDG_RUNTIME_DIR/nsfast/ (others).

A state is never trusted blindly: the pid it names must still exist and have the same
start time (from /proc/PID/stat), else the container is reported as stale."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

__all__ = ["State", "state_root", "load", "load_all", "start_time"]


def state_root() -> str:
    if os.geteuid() == 0:
        return "/run/nsfast"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/nsfast-{os.geteuid()}"
    return os.path.join(runtime, "nsfast")


def _stat(pid: int) -> Optional[List[bytes]]:
    """Fields of /proc/PID/stat after comm (state is [0]), or None if there is no process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: fields resume after the last ')'.
    return data[data.rindex(b")") + 2:].split()


def start_time(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if there is no such process."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


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

    @property
    def dir(self) -> str:
        return os.path.join(state_root(), self.name)

    def status(self) -> str:
        """"running"; "exited" when its process has ended but is not yet reaped (a zombie);
        "stale" when the pid is gone or is another process now."""
        fields = _stat(self.pid) if self.pid > 0 else None
        if fields is None or int(fields[19]) != self.start_time:
            return "stale"
        return "exited" if fields[0] in (b"Z", b"X") else "running"

    def save(self) -> None:
        os.makedirs(state_root(), mode=0o700, exist_ok=True)
        os.makedirs(self.dir, mode=0o700)
        tmp = os.path.join(self.dir, "state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, os.path.join(self.dir, "state.json"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def age(self) -> float:
        return time.time() - self.created


def load(name: str) -> Optional[State]:
    if not name or "/" in name or name.startswith("."):
        return None
    try:
        with open(os.path.join(state_root(), name, "state.json")) as f:
            return State(**json.load(f))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, TypeError):
        # A corrupt state: report it as stale rather than failing every command.
        return State(name=name, pid=0, start_time=-1, command=["?"], created=0.0, env={}, cwd="/")


def load_all() -> List[State]:
    try:
        names = sorted(os.listdir(state_root()))
    except FileNotFoundError:
        return []
    return [s for s in (load(n) for n in names) if s is not None]
