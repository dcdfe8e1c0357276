"""Mount propagation: nothing a sandbox mounts reaches the host, nothing the host mounts
later reaches a sandbox.

This machine's `/` is private, but on most hosts (systemd) every mount is shared, and a
clone of a shared mount joins its peer group: a sandbox's mount on it would then appear on
the host, and outlive the sandbox. Each test runs its sandboxes in a mount namespace of its
own whose mounts are all shared (`unshare -m --propagation shared`), as on such a host, and
compares that namespace's mount table before, during and after; the machine's table is
never touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from conftest import BUSYBOX, PYTHON_SRC, suite

pytestmark = suite

NOBODY = 65534

#: Runs first in every script: the namespace's table, and each mount's optional fields
#: (`shared:N`, `master:N`: what it propagates to or receives from).
PRELUDE = """\
import json, os, subprocess, sys
import warnings
warnings.simplefilter("ignore")
import nsfast
def table():
    with open("/proc/self/mountinfo") as f:
        return f.read()
def propagating(text):
    rows = []
    for line in text.splitlines():
        f = line.split()
        if not f:
            continue
        tags = f[6:f.index("-")]
        if tags:
            rows.append([f[4]] + tags)
    return rows
def out(value):
    print(json.dumps(value), flush=True)
before = table()
assert propagating(before), "the test's namespace should have shared mounts"
"""


def in_shared_namespace(body: str, *, user: int | None = None) -> List[Any]:
    """PRELUDE + body in a new mount namespace whose mounts are all shared (as root, or as
    `user` through setpriv); the JSON value of each line it prints via out()."""
    cmd = ["unshare", "-m", "--propagation", "shared"]
    python = [sys.executable]
    env = dict(os.environ)
    if user is not None:
        cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        python = ["/usr/bin/python3"]  # the venv is under /root, 0700
        env = {"PYTHONPATH": PYTHON_SRC, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    p = subprocess.run(cmd + python + ["-c", PRELUDE + textwrap.dedent(body)],
                       capture_output=True, text=True, timeout=120, env=env, cwd="/")  # fmt: skip
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


@pytest.fixture
def tree() -> Iterator[Path]:
    """A host directory everyone may reach (rootless runs use it too; pytest's tmp_path is
    under a 0700 directory): `src` with an empty subdirectory `x`, writable by all;
    `rootfs`, a static busybox root."""
    top = Path(tempfile.mkdtemp(prefix="nsfast-propagation-"))
    os.chmod(top, 0o755)
    (top / "src" / "x").mkdir(parents=True)
    for d in (top / "src", top / "src" / "x"):
        os.chmod(d, 0o777)
    if os.path.exists(BUSYBOX):
        (top / "rootfs" / "bin").mkdir(parents=True)
        (top / "rootfs" / "srv").mkdir()
        shutil.copy2(BUSYBOX, top / "rootfs" / "bin" / "busybox")
        for applet in ("sh", "cat", "mount", "grep"):
            os.symlink("busybox", top / "rootfs" / "bin" / applet)
    yield top
    shutil.rmtree(top)


VARIANTS = """
src = sys.argv[1] if len(sys.argv) > 1 else {src!r}
variants = {{
    "host root": {{}},
    "host root, overlay": {{"overlay": True}},
    "writable Bind": {{"mounts": [nsfast.Bind(src, "/srv", readonly=False)]}},
    "read-only Bind": {{"mounts": [nsfast.Bind(src, "/srv")]}},
    "Overlay": {{"mounts": [nsfast.Overlay(src, "/srv")]}},
    "Tmpfs": {{"mounts": [nsfast.Tmpfs("/srv")]}},
}}
if os.path.exists({rootfs!r}):
    variants["rootfs"] = {{"rootfs": {rootfs!r}, "mounts": [nsfast.Bind(src, "/srv", readonly=False)]}}
    variants["rootfs, overlay"] = {{"rootfs": {rootfs!r}, "overlay": True}}
"""


def _variants(tree: Path) -> str:
    return VARIANTS.format(src=str(tree / "src"), rootfs=str(tree / "rootfs"))


@pytest.mark.parametrize("user", [None, NOBODY], ids=["root", "rootless"])
def test_no_mount_of_a_sandbox_propagates(tree: Path, user: int | None) -> None:
    """Every mount a sandbox sees is private (no `shared:`/`master:`), whatever its root and
    mounts, in a zygote's task too, for a root and a rootless caller; the caller's table
    does not change."""
    [res] = in_shared_namespace(
        _variants(tree)
        + textwrap.dedent("""
        res = {}
        for name, kw in variants.items():
            r = nsfast.run(["cat", "/proc/self/mountinfo"], capture_output=True, text=True, **kw)
            res[name] = [r.returncode, propagating(r.stdout), r.stderr[-300:], table() == before]
        with nsfast.Zygote(mounts=[nsfast.Bind(src, "/srv", readonly=False)]) as z:
            r = z.run_python("print(open('/proc/self/mountinfo').read())", text=True)
            res["Zygote task"] = [r.returncode, propagating(r.stdout), r.stderr[-300:], table() == before]
        out(res)
        """),
        user=user,
    )
    for name, (rc, tags, err, same) in res.items():
        assert (rc, tags, same) == (0, [], True), (name, err)
    assert len(res) >= 7


def test_a_sandbox_that_may_mount_cannot_mount_on_the_host(tree: Path) -> None:
    """The attack: a sandbox given CAP_SYS_ADMIN (in its user namespace) and a writable Bind
    mounts a tmpfs on a directory of the Bind. On a shared host root the clone that backs the
    Bind was a peer of the host's `/`: the tmpfs appeared in the host's table, over the
    host's directory, and stayed after the sandbox ended. Also with seccomp off, in a
    Container's exec, and with the Bind on a rootfs."""
    src = tree / "src"
    [res] = in_shared_namespace(
        f"""
        src = {str(src)!r}
        attack = "mount -t tmpfs -o size=1m nsfast-evil /srv/x && echo mounted && grep -c nsfast-evil /proc/self/mountinfo"
        bind = [nsfast.Bind(src, "/srv", readonly=False)]
        res = {{}}
        for name, kw in {{"default": {{}}, "seccomp off": {{"seccomp": None}},
                         "rootfs": {{"rootfs": {str(tree / "rootfs")!r}}}}}.items():
            if name == "rootfs" and not os.path.exists(kw["rootfs"]):
                continue
            r = nsfast.run(["sh", "-c", attack], capabilities=("sys_admin",), mounts=bind, capture_output=True,
                           text=True, **kw)
            res[name] = [r.stdout, "nsfast-evil" in table()]
        with nsfast.Container(capabilities=("sys_admin",), mounts=bind) as c:
            r = c.exec(["sh", "-c", attack], capture_output=True, text=True)
            res["Container.exec"] = [r.stdout, "nsfast-evil" in table()]
        res["after"] = "nsfast-evil" in table()
        out(res)
        """
    )
    assert res.pop("after") is False
    for name, (stdout, on_host) in res.items():
        assert stdout == "mounted\n1\n", name  # it may mount, in its own namespace
        assert on_host is False, f"{name}: the sandbox's mount appeared on the host"
    assert os.listdir(src / "x") == []


def test_a_host_mount_made_while_a_sandbox_runs_stays_out_of_it(tree: Path) -> None:
    """The other way: the caller mounts a tmpfs on the Bind's source, and on a directory
    of the host root, while a Container runs; neither appears inside (a sandbox's view is
    fixed when it starts, as runc's default `rprivate`)."""
    src = tree / "src"
    later = tree / "later"
    later.mkdir()
    [res] = in_shared_namespace(
        f"""
        src, later = {str(src)!r}, {str(later)!r}
        with nsfast.Container(mounts=[nsfast.Bind(src, "/srv", readonly=False)]) as c:
            during = table() == before
            for d in (src + "/x", later):
                subprocess.run(["mount", "-t", "tmpfs", "nsfast-later", d], check=True)
            r = c.exec(["cat", "/proc/self/mountinfo"], capture_output=True, text=True)
            for d in (src + "/x", later):
                subprocess.run(["umount", d], check=True)
        out([during, "nsfast-later" in r.stdout, propagating(r.stdout), table() == before])
        """
    )
    assert res == [True, False, [], True]
