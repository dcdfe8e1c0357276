"""asyncio: arun/aspawn driven by the event loop (pidfd and pipes as loop readers, no thread
per sandbox); timeouts and cancellation kill and reap the sandbox."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading

import psutil
import pytest

import nsfast
from conftest import sandbox_cgroups, suite, wait_until

pytestmark = suite


def test_arun_returns_a_result_like_run():
    async def main() -> nsfast.Result:
        return await nsfast.arun(
            ["sh", "-c", "cat; echo err >&2; exit 3"], input="in\n", capture_output=True, text=True, hostname="box"
        )

    r = asyncio.run(main())
    assert (r.returncode, r.stdout, r.stderr) == (3, "in\n", "err\n")
    assert r.usage is not None and r.usage.termination == "exit"


def test_arun_refuses_overlay_mounts_it_would_not_report(tmp_path):
    """(Found by an audit.) arun's Result.changes stayed {} where run's listed the changes;
    listing (and committing) them is run's."""
    with pytest.raises(nsfast.SpecError, match="Overlay mounts need nsfast.run"):
        asyncio.run(nsfast.arun(["true"], mounts=[nsfast.Overlay(tmp_path, "/mnt")]))
    assert sandbox_cgroups() == []


def test_arun_moves_large_output_both_ways():
    data = bytes(range(256)) * 8192  # 2 MiB through stdin and back, more than any pipe buffer
    r = asyncio.run(nsfast.arun(["cat"], input=data, capture_output=True))
    assert r.stdout == data and r.stderr == b""


def test_fifty_sandboxes_wait_together_on_one_thread():
    """The issue's case (50 sandboxes sleeping, there 0.2 s; 1 s here for a margin on a slow
    machine): all run at once, and no thread per sandbox: at most the spawner threads."""
    threads_seen: list[int] = []

    async def sample() -> None:
        for _ in range(5):
            threads_seen.append(threading.active_count())
            await asyncio.sleep(0.05)

    async def one() -> tuple[float, float, int]:
        # The sandbox itself says when it ran (the host's clock: no time namespace).
        r = await nsfast.arun(["sh", "-c", "date +%s.%N; sleep 1; date +%s.%N"], capture_output=True, text=True)
        start, end = map(float, r.stdout.split())
        return start, end, r.returncode

    async def main() -> list[tuple[float, float, int]]:
        await nsfast.arun(["true"])  # the spawner threads exist now
        before = threading.active_count()
        results = await asyncio.gather(sample(), *(one() for _ in range(50)))
        assert max(threads_seen) <= before + (os.cpu_count() or 2), threads_seen
        return results[1:]

    runs = asyncio.run(main())
    assert all(rc == 0 for _, _, rc in runs)
    # All 50 were running at one moment: the last one started before the first one ended.
    assert max(start for start, _, _ in runs) < min(end for _, end, _ in runs), "they did not overlap"


def test_arun_timeout_kills_the_sandbox_and_says_so():
    async def main() -> None:
        await nsfast.arun(["sh", "-c", "echo partial; exec sleep 30"], capture_output=True, text=True, timeout=0.3)

    with pytest.raises(nsfast.TimeoutExpired) as exc:
        asyncio.run(main())
    assert isinstance(exc.value, subprocess.TimeoutExpired) and exc.value.timeout == 0.3
    assert exc.value.output == "partial\n"
    assert exc.value.usage is not None and exc.value.usage.termination == "timeout"


def test_cancelling_a_task_kills_and_reaps_its_sandbox():
    marker = "31.4159"
    before = sandbox_cgroups()

    async def main() -> None:
        task = asyncio.ensure_future(nsfast.arun(["sleep", marker], capture_output=True))
        await asyncio.sleep(0)
        for _ in range(200):
            if any(p.info["cmdline"] == ["sleep", marker] for p in psutil.process_iter(["cmdline"])):
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert wait_until(
        lambda: not any(p.info["cmdline"] == ["sleep", marker] for p in psutil.process_iter(["cmdline"])), timeout=5
    )
    assert sandbox_cgroups() == before


def test_aspawn_wait_and_signals():
    async def main() -> tuple[int, int]:
        p = await nsfast.aspawn(["sleep", "30"])
        p.terminate()  # nsfast-init forwards SIGTERM to the command
        rc = await p.wait()
        q = await nsfast.aspawn(["sh", "-c", "exit 7"])
        return rc, await q.wait()

    assert asyncio.run(main()) == (-15, 7)


def test_arun_check_raises_calledprocesserror():
    with pytest.raises(subprocess.CalledProcessError) as exc:
        asyncio.run(nsfast.arun(["false"], check=True))
    assert exc.value.returncode == 1


def test_cancelling_while_the_sandbox_starts_ends_it_once_started():
    marker = "27.1828"
    before = sandbox_cgroups()
    children = {c.pid for c in psutil.Process().children()}

    async def main() -> None:
        task = asyncio.ensure_future(nsfast.aspawn(["sleep", marker]))
        await asyncio.sleep(0)  # the start is on a spawner thread now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())  # the loop is gone: the spawner thread ends what it started
    assert wait_until(
        lambda: not any(p.info["cmdline"] == ["sleep", marker] for p in psutil.process_iter(["cmdline"])), timeout=5
    )
    assert wait_until(lambda: sandbox_cgroups() == before, timeout=5)
    # Reaped too (the spawner thread may still be inside its wait when the cmdline goes).
    assert wait_until(lambda: {c.pid for c in psutil.Process().children()} <= children, timeout=5)
