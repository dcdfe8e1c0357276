"""Stress: many runs, sequential and concurrent, leave the parent as they found it. These run
under the suite's per-test timeout: hanging here means a deadlock."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

import nsfast
from conftest import mountinfo, os_threads, sandbox_cgroups, suite, wait_until

pytestmark = [*suite, pytest.mark.usefixtures("init_binary_loaded")]


def _snapshot():
    nsfast.settle()  # overlays made ahead, closes not yet done: nsfast's, not leaks
    me = psutil.Process()
    return {
        "fds": me.num_fds(),
        "threads": os_threads(),
        "python threads": threading.active_count(),
        "children": sorted(p.pid for p in me.children(recursive=True)),
        "mountinfo": mountinfo(),
        "cgroups": sandbox_cgroups(),
    }


def _assert_same(before, after):
    # A joined thread's OS thread may take a moment to exit (Python's join returns first).
    if after != before:
        wait_until(lambda: _snapshot() == before, timeout=2.0)
        after = _snapshot()
    for key in before:
        assert after[key] == before[key], f"{key} changed: {before[key]!r} -> {after[key]!r}"


def test_1000_sequential_runs_leave_fds_threads_children_and_mounts_unchanged(tmp_path):
    (tmp_path / "f").write_text("bound\n")
    for _ in range(5):  # warm up: lazily made state (cgroup backend, init memfd) exists now
        nsfast.run(["true"])
    before = _snapshot()
    failures = []
    for i in range(1000):
        kind = i % 4
        if kind == 0:
            r = nsfast.run(["true"])
            ok = r.returncode == 0
        elif kind == 1:
            r = nsfast.run(["sh", "-c", f"echo {i}; echo e >&2"], capture_output=True)
            ok = (r.returncode, r.stdout, r.stderr) == (0, f"{i}\n".encode(), b"e\n")
        elif kind == 2:
            r = nsfast.run(
                ["cat", "/mnt/f"], mounts=[nsfast.Bind(tmp_path, "/mnt"), nsfast.Tmpfs("/srv")], capture_output=True
            )
            ok = (r.returncode, r.stdout) == (0, b"bound\n")
        else:
            r = nsfast.run(["cat"], input=b"in", capture_output=True, init=True)
            ok = (r.returncode, r.stdout) == (0, b"in")
        if not ok:
            failures.append((i, r))
    assert not failures, failures[:3]
    _assert_same(before, _snapshot())


def test_250_kills_and_250_failed_starts_leave_nothing_behind():
    for _ in range(5):
        nsfast.run(["true"])
    before = _snapshot()
    for _ in range(250):
        p = nsfast.spawn(["sleep", "100"], stdout=nsfast.PIPE)
        p.kill()
        assert p.wait(timeout=10) == -9
        p.stdout.close()
    for _ in range(250):
        with pytest.raises(nsfast.SpawnError):
            nsfast.run(["nsfast-no-such-command"], capture_output=True)
    _assert_same(before, _snapshot())


def test_4_threads_x_200_concurrent_runs_all_succeed_with_their_own_output():
    def worker(t):
        bad = []
        for i in range(200):
            token = f"{t}-{i}"
            r = nsfast.run(
                ["sh", "-c", 'echo "$1"; echo "err $1" >&2', "sh", token],
                capture_output=True,
                text=True,
                hostname=f"h{token}",
                timeout=60,
            )
            if (r.returncode, r.stdout, r.stderr) != (0, f"{token}\n", f"err {token}\n"):
                bad.append((token, r))
        return bad

    nsfast.run(["true"])
    before = _snapshot()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    assert [bad for bad in results if bad] == []
    _assert_same(before, _snapshot())


def test_concurrent_runs_with_failures_and_timeouts_mixed_in():
    import subprocess

    def worker(t):
        outcomes = []
        for i in range(40):
            kind = (t + i) % 4
            try:
                if kind == 0:
                    r = nsfast.run(["echo", str(i)], capture_output=True, timeout=30)
                    outcomes.append(r.stdout == f"{i}\n".encode())
                elif kind == 1:
                    nsfast.run(["nsfast-no-such-command"], capture_output=True)
                    outcomes.append(False)
                elif kind == 2:
                    nsfast.run(["sleep", "100"], timeout=0.05)
                    outcomes.append(False)
                else:
                    r = nsfast.run(["sh", "-c", "exit 7"], init=True)
                    outcomes.append(r.returncode == 7)
            except nsfast.SpawnError as e:
                outcomes.append(kind == 1 and e.step == "exec")
            except subprocess.TimeoutExpired:
                outcomes.append(kind == 2)
        return outcomes

    nsfast.run(["true"])
    before = _snapshot()
    with ThreadPoolExecutor(4) as pool:
        results = [ok for outcomes in pool.map(worker, range(4)) for ok in outcomes]
    assert results == [True] * 160
    _assert_same(before, _snapshot())
