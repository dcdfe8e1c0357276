"""The reaper (rust/src/reaper.rs): nsfast's own mounts of a sandbox that ended (a root
caller's overlays and their upper tmpfs, a rootless sandbox's mount namespace with its
overlays) are closed on a thread of their own, so their RCU grace periods are off the
caller's path. What a user checks: once settled, nothing of them is left in this process;
the thread holds no copy of the caller's fds; a forked child still runs overlays."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nsfast
from conftest import CGROUP_ENV, PYTHON_SRC, fd_targets, suite, thread_names

pytestmark = [*suite, pytest.mark.usefixtures("init_binary_loaded")]  # (each id range's user namespace made)


def reaper_fds() -> list[str]:
    """What the reaper thread's own fd table holds (it has one: unshare(CLONE_FILES))."""
    for tid in os.listdir("/proc/self/task"):
        if Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "nsfast-reaper":
            d = f"/proc/self/task/{tid}/fd"
            return sorted(os.readlink(f"{d}/{fd}") for fd in os.listdir(d))
    raise AssertionError("no nsfast-reaper thread")


def main_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def overlay_runs(rootfs: Path, src: Path) -> None:
    for new, kw in (
        ("/var/tmp/nsfast-reaper-test", {"overlay": True}),  # host root: where others may write
        ("/new", {"rootfs": rootfs, "overlay": True}),
        ("/work/new", {"mounts": [nsfast.Overlay(src, "/work")]}),
    ):
        r = nsfast.run(["/bin/sh", "-c", f"echo x > {new}; cat {new}"], capture_output=True, **kw)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"x\n", b""), kw
    assert not os.path.exists("/var/tmp/nsfast-reaper-test")


def test_overlay_mounts_are_all_closed_once_settled(busybox_rootfs, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    overlay_runs(busybox_rootfs, src)  # starts the thread
    nsfast.settle()
    before, held = main_fds(), reaper_fds()
    assert len(held) == 1 and held[0].startswith("socket:"), held  # its end of the socket only
    for _ in range(30):
        overlay_runs(busybox_rootfs, src)
    nsfast.settle()
    assert main_fds() == before
    assert reaper_fds() == held
    assert os.listdir(src) == []  # and the lower never saw a write


def test_the_reaper_holds_no_copy_of_the_callers_fds(busybox_rootfs):
    """Its fd table starts as a copy of the process's: were that copy kept, a pipe's write
    end closed by the caller would stay open in it (no EOF for the reader), a file lock held."""
    script = textwrap.dedent(
        f"""
        import os, select, sys
        sys.path.insert(0, {str(PYTHON_SRC)!r})
        import nsfast
        r, w = os.pipe()
        res = nsfast.run(["/bin/true"], rootfs={str(busybox_rootfs)!r}, overlay=True)  # starts the reaper
        assert res.returncode == 0
        os.close(w)
        ready, _, _ = select.select([r], [], [], 10)
        print("eof" if ready and os.read(r, 1) == b"" else "open")
        """
    )
    env = {"PATH": os.environ["PATH"], **CGROUP_ENV}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "eof\n", "")


def test_a_forked_child_runs_overlays_without_the_thread(busybox_rootfs):
    nsfast.run(["/bin/true"], rootfs=busybox_rootfs, overlay=True)  # the thread exists here
    pid = os.fork()
    if pid == 0:  # the child: no reaper thread (fork copies one thread); fds close inline
        code = 1
        try:
            r = nsfast.run(["/bin/sh", "-c", "echo hi > /f; cat /f"], rootfs=busybox_rootfs, overlay=True,
                           capture_output=True)  # fmt: skip
            nsfast.settle()  # returns at once: there is nothing of its own to wait for
            code = 0 if (r.returncode, r.stdout) == (0, b"hi\n") else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("mode", ["host root", "rootfs"])
def test_a_sandbox_killed_mid_run_leaves_no_overlay_behind(busybox_rootfs, mode):
    kw = {"overlay": True} if mode == "host root" else {"rootfs": busybox_rootfs, "overlay": True}
    nsfast.run(["/bin/true"], **kw)
    nsfast.settle()
    before = main_fds()
    p = nsfast.spawn(["/bin/sleep", "60"], **kw)
    p.kill()
    assert p.wait() == -9
    del p
    nsfast.settle()
    assert main_fds() == before


def test_a_failed_start_with_overlays_leaves_nothing(busybox_rootfs):
    nsfast.run(["/bin/true"], rootfs=busybox_rootfs, overlay=True)
    nsfast.settle()
    before = main_fds()
    for _ in range(5):
        with pytest.raises(nsfast.SpawnError):
            nsfast.run(["/no/such/program"], rootfs=busybox_rootfs, overlay=True)
    nsfast.settle()
    assert main_fds() == before


def nsfast_threads() -> set[str]:
    return set(thread_names()) & {"nsfast-reaper", "nsfast-spare"}


def test_the_threads_end_when_idle_and_come_back(busybox_rootfs, tmp_path):
    """A process that stopped starting sandboxes is left with no thread of nsfast's (what a
    later fork() expects; Python 3.12+ warns about forking a threaded process); the next
    overlay start brings them back, and its mounts are still closed off its path."""
    import time

    src = tmp_path / "src"
    src.mkdir()
    overlay_runs(busybox_rootfs, src)
    assert nsfast_threads() == {"nsfast-reaper", "nsfast-spare"}
    nsfast.settle()
    before = fd_kinds()
    deadline = time.monotonic() + 15  # the reaper idles 2 s; the spare thread's last spare expires after 2 s
    while nsfast_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nsfast_threads() == set()
    assert fd_kinds() == before  # nothing of a sandbox's was left to the threads
    overlay_runs(busybox_rootfs, src)
    assert "nsfast-reaper" in nsfast_threads()
    nsfast.settle()
    assert fd_kinds() == before
    assert os.listdir(src) == []


def fd_kinds() -> list[str]:
    """This process's open fds by kind ("socket", "pipe", a path, ...), inode numbers left out."""
    return sorted(t.split(":[", 1)[0] for t in fd_targets())
