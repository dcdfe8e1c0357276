"""A sandbox's /sys: a sysfs of its own network namespace, and its own cgroup hierarchies
on /sys/fs/cgroup, read-only, rooted at its cgroup (as crun gives a container).

Before, it saw the host's /sys: the host's network devices, and the host's whole cgroup
tree (other sandboxes' cgroups and their usage), in which a program that reads its own
limits (a JVM, Go's GOMAXPROCS, a Python pool sizing itself) found the host's root."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Dict

import pytest

import nsfast
from conftest import suite

pytestmark = suite

V2_TOP = Path("/sys/fs/cgroup/cgroup.controllers").exists()

#: Python in the sandbox: what it can see of /sys, as JSON.
LOOK = r"""
import json, os
def walk(top):
    out = []
    for d, subdirs, _ in os.walk(top):
        out += [os.path.join(d, s) for s in subdirs]
    return out
mounts = [l.split(" - ")[0].split()[3:5] + [l.split(" - ")[1].split()[0]] for l in open("/proc/self/mountinfo")]
res = {
    "net": sorted(os.listdir("/sys/class/net")),
    "cgroup": sorted(os.listdir("/sys/fs/cgroup")),
    # Directories below each hierarchy's root (on a v1 host the roots are /sys/fs/cgroup/*).
    "subdirs": [d for top in (["/sys/fs/cgroup"] if os.path.exists("/sys/fs/cgroup/cgroup.procs") else
                              [os.path.join("/sys/fs/cgroup", n) for n in os.listdir("/sys/fs/cgroup")])
                for d in walk(top)],
    "proc_cgroup": open("/proc/self/cgroup").read().split(),
    "cgroup_mounts": [m for m in mounts if m[1].startswith("/sys/fs/cgroup") and m[2].startswith("cgroup")],
    "firmware": os.listdir("/sys/firmware") if os.path.isdir("/sys/firmware") else None,
}
def limit(*paths):
    for p in paths:
        try:
            return open(p).read().strip()
        except OSError:
            pass
res["memory"] = limit("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
res["pids"] = limit("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max")
try:
    os.mkdir("/sys/fs/cgroup/x")
    res["mkdir"] = "made"
except OSError as e:
    res["mkdir"] = e.errno
print(json.dumps(res))
"""


def look(**kw: Any) -> Dict[str, Any]:
    r = nsfast.run(["python3", "-c", LOOK], capture_output=True, **kw)
    assert r.returncode == 0, r.stderr
    out: Dict[str, Any] = json.loads(r.stdout)
    return out


def with_mount_points(rootfs: Path) -> None:
    """/sys, and /proc, /dev, /tmp too: with them the rootfs needs no overlay of nsfast's for
    its mount points (which the test VM, whose own root is an overlay, cannot stack)."""
    for d in ("sys", "proc", "dev", "tmp"):
        (rootfs / d).mkdir(exist_ok=True)


def host_interfaces() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def test_sys_shows_the_sandbox_network_namespace_not_the_hosts() -> None:
    if host_interfaces() == ["lo"]:
        pytest.skip("this host has no network device but lo: nothing to tell apart")
    got = look()
    assert got["net"] == ["lo"]


def test_sys_fs_cgroup_holds_the_sandbox_limits_where_proc_self_cgroup_says() -> None:
    got = look(limits=nsfast.Limits(memory="96M", pids=77))
    assert got["memory"] == str(96 << 20)
    assert got["pids"] == "77"
    # Every hierarchy line of /proc/self/cgroup is "/" (the namespace's root), and so is the
    # root of each cgroup mount there (the last on its mount point: the one a path reaches;
    # the host's, with roots like "/../..", stay listed below the fresh /sys, locked there).
    assert all(line.endswith(":/") for line in got["proc_cgroup"]), got["proc_cgroup"]
    seen = {point: root for root, point, _ in got["cgroup_mounts"]}
    assert seen and all(root == "/" for root in seen.values()), got["cgroup_mounts"]


def test_no_other_cgroup_is_in_view() -> None:
    """Another sandbox runs meanwhile: none of its cgroups, no nsfast directory, nothing of
    the host's tree is under /sys/fs/cgroup."""
    with nsfast.Container(["sleep", "60"], limits=nsfast.Limits(memory="64M", pids=20)):
        got = look()
    assert got["subdirs"] == [], got["subdirs"]
    if V2_TOP:
        assert "memory.max" in got["cgroup"] or "cgroup.procs" in got["cgroup"]
    else:
        assert {"memory", "pids"} <= set(got["cgroup"]), got["cgroup"]


def test_it_is_read_only() -> None:
    got = look()
    assert got["mkdir"] in (30, 13), got["mkdir"]  # EROFS (or EACCES)
    r = nsfast.run(
        [
            "sh",
            "-c",
            "for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do "
            "[ -e $f ] && { echo 1 > $f && echo wrote; }; done; true",
        ],
        capture_output=True,
        capabilities=("sys_admin",),
        seccomp=None,
    )
    assert b"wrote" not in r.stdout


def test_runc_masks_hold_on_the_fresh_sysfs() -> None:
    got = look()
    assert got["firmware"] in (None, [])


def test_without_a_network_namespace_sys_is_the_hosts_but_cgroups_are_still_its_own() -> None:
    names = tuple(n for n in nsfast.DEFAULT_NAMESPACES if n != "net")
    got = look(namespaces=names, limits=nsfast.Limits(memory="80M"))
    assert got["net"] == host_interfaces()
    assert got["memory"] == str(80 << 20) and got["subdirs"] == []


def test_without_a_cgroup_namespace_sys_is_the_hosts_as_before() -> None:
    """Its cgroup hierarchies mounted afresh would be the host's whole tree: the host's /sys
    is kept (its interfaces too)."""
    names = tuple(n for n in nsfast.DEFAULT_NAMESPACES if n != "cgroup")
    got = look(namespaces=names)
    assert got["subdirs"], "the host's tree has directories"
    assert got["net"] == host_interfaces()


def test_a_rootfs_gets_its_own_sys(busybox_rootfs: Path) -> None:
    """A rootfs with a /sys directory (a mount point: nsfast makes none there)."""
    with_mount_points(busybox_rootfs)
    r = nsfast.run(
        ["sh", "-c", "ls /sys/class/net; cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes"],
        rootfs=busybox_rootfs,
        limits=nsfast.Limits(memory="72M"),
        capture_output=True,
    )
    lines = r.stdout.decode().split()
    assert lines[0] == "lo" and str(72 << 20) in lines, (r.stdout, r.stderr)
    assert not any((busybox_rootfs / "sys").iterdir()), "nothing is made in the user's rootfs"


def test_a_pooled_network_namespace_still_starts(busybox_rootfs: Path) -> None:
    """A namespace of the pool is the caller's user namespace's: the sandbox may not mount
    a sysfs for it. The host root keeps the host's /sys then; a rootfs, which has nothing
    to fall back on, makes its own namespace instead of taking one."""
    with_mount_points(busybox_rootfs)
    nsfast.configure(netns_pool=2)
    try:
        for _ in range(3):
            got = look(limits=nsfast.Limits(memory="90M"))
            assert got["memory"] == str(90 << 20) and got["subdirs"] == []
            r = nsfast.run(["ls", "/sys/class/net"], rootfs=busybox_rootfs, capture_output=True)
            assert r.stdout.split() == [b"lo"], r.stderr
    finally:
        nsfast.configure(netns_pool=0)


def zygote_look(z: nsfast.Zygote, **kw: Any) -> Dict[str, Any]:
    r = z.run_python(LOOK, **kw)
    assert r.returncode == 0, r.stderr
    out: Dict[str, Any] = json.loads(r.stdout)
    return out


def test_a_zygote_task_sees_its_own_cgroups_not_the_zygotes_nor_a_siblings() -> None:
    """Each task is moved into cgroups of its own (memory, pids, ...): its /sys/fs/cgroup
    is those, mounted in its cgroup namespace, even for a hierarchy the zygote has no cgroup
    in (the zygote here has a memory limit only, the task a pids one too). Another task
    running meanwhile, and the zygote's own cgroup, are out of view."""
    with nsfast.Zygote(limits=nsfast.Limits(memory="200M")) as z:
        done = threading.Event()
        sibling = threading.Thread(
            target=lambda: (
                z.run_python(
                    "import time\nfor _ in range(100):\n time.sleep(0.05)\n", limits=nsfast.Limits(memory="50M", pids=9)
                )
                and done.set()
            )
        )
        sibling.start()
        try:
            got = zygote_look(z, limits=nsfast.Limits(memory="96M", pids=77))
        finally:
            sibling.join()
        assert got["memory"] == str(96 << 20)
        assert got["pids"] == "77"
        assert got["subdirs"] == [], got["subdirs"]
        assert all(line.endswith(":/") for line in got["proc_cgroup"]), got["proc_cgroup"]
        assert got["mkdir"] in (30, 13), got["mkdir"]
        # A task with no limit: its own cgroup without one (v2, where usage needs a
        # cgroup), or none in view (v1): not the zygote's.
        bare = zygote_look(z, limits=None)
        assert bare["memory"] in (None, "max") and bare["subdirs"] == [], bare
        assert done.is_set()
