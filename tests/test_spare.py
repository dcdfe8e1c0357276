"""Overlays made ahead (rust/src/spare.rs): a root caller's start with overlay=True takes
overlays made while the previous one ran. What a user checks: every start still gets
overlays nothing else used; what it sees is the host (or rootfs) as it is when it starts,
not when the spare was made (a replaced directory, a file replaced by rename, a new mount);
spares go away when unused. Back-to-back runs are what make spares, so each test runs its
sandboxes in a tight loop."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List

import pytest

import nsfast
from conftest import fd_targets, suite

# (init_binary_loaded: the id-mapping user namespace of each id range exists, so that what
# the fd checks see of this process is the spares'.)
pytestmark = [*suite, pytest.mark.usefixtures("init_binary_loaded"), pytest.mark.skipif(os.geteuid() != 0, reason="spares are a root caller's (rootless overlays are the child's)")]  # fmt: skip


def sh(script: str, **kw):
    r = nsfast.run(["/bin/sh", "-c", script], capture_output=True, text=True, **kw)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def host_dir():
    """A directory on the host root that a host-root overlay shows (/srv or /opt: the
    sandbox's /tmp, /run, /var/tmp, /home and /root are its own)."""
    base = "/srv" if os.path.isdir("/srv") else "/opt"
    d = Path(tempfile.mkdtemp(prefix="nsfast-spare-", dir=base))
    os.chmod(d, 0o755)
    yield d
    subprocess.run(["umount", "-q", str(d / "sub")], check=False)
    shutil.rmtree(d)


def test_every_start_gets_overlays_nothing_else_used(busybox_rootfs):
    for kw, path in (({"rootfs": busybox_rootfs, "overlay": True}, "/mark"), ({"overlay": True}, "/var/tmp/mark")):
        for i in range(30):
            assert sh(f"test ! -e {path} && echo {i} > {path} && cat {path}", **kw) == (0, f"{i}\n", ""), (kw, i)
    assert not os.path.exists(busybox_rootfs / "mark")


def test_a_replaced_rootfs_directory_is_seen(busybox_rootfs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(busybox_rootfs, other, symlinks=True)
    (other / "ROOTFS-MARKER").write_text("other\n")
    for i in range(6):
        expect = "other\n" if i % 2 else "tiny\n"
        assert sh("cat /ROOTFS-MARKER", rootfs=busybox_rootfs, overlay=True) == (0, expect, "")
        # Swap the directories: the path now names the other one.
        busybox_rootfs.rename(tmp_path / "swap")
        other.rename(busybox_rootfs)
        (tmp_path / "swap").rename(other)


def test_a_mount_over_the_rootfs_is_seen(busybox_rootfs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(busybox_rootfs, other, symlinks=True)
    (other / "ROOTFS-MARKER").write_text("bound over\n")
    assert sh("cat /ROOTFS-MARKER", rootfs=busybox_rootfs, overlay=True) == (0, "tiny\n", "")
    subprocess.run(["mount", "--bind", str(other), str(busybox_rootfs)], check=True)
    try:
        assert sh("cat /ROOTFS-MARKER", rootfs=busybox_rootfs, overlay=True) == (0, "bound over\n", "")
    finally:
        subprocess.run(["umount", str(busybox_rootfs)], check=True)
    assert sh("cat /ROOTFS-MARKER", rootfs=busybox_rootfs, overlay=True) == (0, "tiny\n", "")


def test_a_file_replaced_by_rename_runs_in_its_new_version(busybox_rootfs, host_dir):
    """What editors, compilers and package managers do: write a new file, rename it over
    the old one. Each start runs the version there when it starts."""
    for kw, script, inside in (
        ({"rootfs": busybox_rootfs, "overlay": True}, busybox_rootfs / "run.sh", "/run.sh"),
        ({"overlay": True}, host_dir / "run.sh", str(host_dir / "run.sh")),
    ):
        for i in range(12):
            new = script.with_name("run.sh.new")
            new.write_text(f"echo version {i}\n")
            new.rename(script)
            assert sh(f". {inside}", **kw) == (0, f"version {i}\n", ""), (kw, i)
        script.unlink()
        assert sh(f"test -e {inside} || echo gone", **kw) == (0, "gone\n", "")


def test_a_new_host_mount_is_covered_by_the_next_start(host_dir):
    """The host root's submounts get overlays of their own; nsfast reads the mount table
    again only when the kernel says it changed: a mount made between two starts is seen."""
    sub = host_dir / "sub"
    sub.mkdir()
    (sub / "file").write_text("underneath\n")
    path = sub / "file"
    assert sh(f"cat {path}", overlay=True) == (0, "underneath\n", "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "nsfast-spare-test", str(sub)], check=True)
    (sub / "file").write_text("on the new mount\n")
    assert sh(f"cat {path}; echo w > {sub}/w 2>/dev/null; cat {sub}/w", overlay=True)[1] == "on the new mount\nw\n"
    assert not (sub / "w").exists()  # the new mount got an overlay too: written in the sandbox's copy
    subprocess.run(["umount", str(sub)], check=True)
    assert sh(f"cat {path}", overlay=True) == (0, "underneath\n", "")


def held() -> List[str]:
    """What this process has open, as fd link targets, sorted; a socket as "socket": the
    reaper thread's (crate::reaper) ends when idle and its successor's may get another
    number, which is not what these tests are about."""
    return sorted("socket" if t.startswith("socket:") else t for t in fd_targets())


def test_unused_spares_are_discarded(busybox_rootfs):
    nsfast.run(["/bin/true"], rootfs=busybox_rootfs, overlay=True)
    nsfast.settle()
    before = held()
    nsfast.run(["/bin/true"], rootfs=busybox_rootfs, overlay=True)
    deadline = time.monotonic() + 10
    grew = False
    while time.monotonic() < deadline:  # a spare is made (its fds are ours), then expires (2 s)
        now = held()
        grew = grew or len(now) > len(before)
        if grew and now == before:
            break
        time.sleep(0.05)
    assert grew, "no spare was made"
    assert held() == before


def test_concurrent_starts_never_share_a_spare(busybox_rootfs):
    """Threads starting the same overlays at once: each start takes a spare or makes its
    own, never one another start took (each writes a marker no other run may see)."""
    from concurrent.futures import ThreadPoolExecutor

    nsfast.settle()
    before = held()

    def one(i: int) -> tuple[int, str, str]:
        return sh(f"test ! -e /mark && echo {i} > /mark && cat /mark", rootfs=busybox_rootfs, overlay=True)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(120)))
    assert results == [(0, f"{i}\n", "") for i in range(120)]
    nsfast.settle()
    assert held() == before
