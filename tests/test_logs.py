"""The log of a detached container (`nsfast run -d`, `nsfast logs`).

The container once wrote its stdout and stderr to the log file itself, without bound: the
file lives in /run/nsfast (a tmpfs: host memory, outside every limit of the sandbox's), and
`yes` filled it at hundreds of MB/s. The container now writes to a pipe; a relay of the
caller's copies it into `log` and keeps at most `--log-max-size` there (the part before in
`log.1`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from conftest import suite, wait_until

pytestmark = suite


def nsfast_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsfast", *args], capture_output=True, timeout=timeout, cwd="/")


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("NSFAST_STATE_DIR", str(tmp_path / "state"))
    yield tmp_path / "state"
    for d in (tmp_path / "state").glob("*"):
        nsfast_cli("stop", "-t", "0", d.name)


def relays(state: Path) -> list[psutil.Process]:
    """The log relays running for containers under `state` (by the state directory they
    hold open)."""
    out = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] != "nsfast-log":
            continue
        try:
            if any(str(state) in os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.pid}/fd")):
                out.append(p)
        except OSError:
            pass
    return out


def test_a_container_that_writes_without_end_keeps_at_most_twice_the_bound(root: Path) -> None:
    r = nsfast_cli("run", "-d", "--name", "yes", "--log-max-size", "256K", "--", "sh", "-c", "echo first; exec yes")
    assert r.returncode == 0, r.stderr
    d = root / "yes"
    # Rotated a few times over: 256 KiB of `yes` is ~5 ms of its output.
    assert wait_until(lambda: (d / "log.1").exists(), timeout=10)
    time.sleep(0.3)
    for _ in range(20):
        sizes = [f.stat().st_size for f in d.glob("log*") if f.exists()]
        assert sum(sizes) <= 2 * (256 << 10), sizes
        time.sleep(0.01)
    out = nsfast_cli("logs", "yes")
    assert out.returncode == 0 and out.stdout.startswith(b"y\n") and b"first" not in out.stdout
    assert len(out.stdout) <= 2 * (256 << 10)
    assert nsfast_cli("stop", "-t", "0", "yes").returncode == 0
    assert not d.exists()
    assert wait_until(lambda: not relays(root), timeout=5)


def test_output_of_both_streams_is_kept_in_order_and_the_relay_ends_with_the_container(root: Path) -> None:
    """Inside, stdout and stderr are the pipe, not the log file: nothing the container does
    writes past the relay."""
    script = "echo out; echo err >&2; ls -l /proc/self/fd/1 /proc/self/fd/2 | grep -o 'pipe:' | head -1; echo done"
    r = nsfast_cli("run", "-d", "--name", "short", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    # The container exits by itself: its relay writes the rest and exits too.
    assert wait_until(lambda: b"done" in nsfast_cli("logs", "short").stdout, timeout=10)
    assert wait_until(lambda: not relays(root), timeout=10)
    assert nsfast_cli("logs", "short").stdout == b"out\nerr\npipe:\ndone\n"
    assert nsfast_cli("stop", "short").returncode == 0


def test_a_container_may_reopen_its_log_as_dev_stdout(root: Path) -> None:
    """(Found by an audit.) The log pipe was the caller's: `echo > /dev/stdout` in a detached
    container failed with EACCES, where PIPEs of nsfast.run are the sandbox user's."""
    r = nsfast_cli("run", "-d", "--name", "reopen", "--", "sh", "-c", "echo via-dev-stdout > /dev/stdout; echo done")
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: b"done" in nsfast_cli("logs", "reopen").stdout, timeout=10)
    assert nsfast_cli("logs", "reopen").stdout == b"via-dev-stdout\ndone\n"
    assert nsfast_cli("stop", "reopen").returncode == 0


def test_a_bound_of_none_keeps_everything(root: Path) -> None:
    r = nsfast_cli("run", "-d", "--name", "all", "--log-max-size", "none", "--", "sh", "-c", "head -c 300000 /dev/zero")
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: not relays(root) and (root / "all" / "log").stat().st_size == 300000, timeout=10)
    assert not (root / "all" / "log.1").exists()
    assert nsfast_cli("stop", "all").returncode == 0


def test_bad_log_flags_are_errors_naming_the_flag(root: Path) -> None:
    r = nsfast_cli("run", "--log-max-size", "1M", "--", "true")
    assert r.returncode == 2 and b"--log-max-size needs -d" in r.stderr
    r = nsfast_cli("run", "-d", "--log-max-size", "lots", "--", "true")
    assert r.returncode == 125 and r.stderr.startswith(b"nsfast: --log-max-size: ") and r.stderr.count(b"\n") == 1
    assert not root.exists() or not any(root.iterdir()), "nothing is left of a container that did not start"
    r = nsfast_cli("logs", "nosuch")
    assert r.returncode == 1 and r.stderr == b"nsfast: no container named 'nosuch'\n"


def test_logs_into_a_closed_pipe_is_quiet(root: Path) -> None:
    assert (
        nsfast_cli("run", "-d", "--name", "big", "--", "sh", "-c", "head -c 2000000 /dev/zero | tr '\\0' x").returncode
        == 0
    )
    assert wait_until(lambda: not relays(root), timeout=10)
    r = subprocess.run(
        f"{sys.executable} -m nsfast logs big | head -c 10", shell=True, capture_output=True, timeout=60, cwd="/"
    )
    assert r.stdout == b"x" * 10 and r.stderr == b"", r.stderr
    assert nsfast_cli("stop", "big").returncode == 0
