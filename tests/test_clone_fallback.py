"""Where clone3 is ENOSYS, nsfast falls back to clone(2) without losing anything.

clone(2) takes 32 bits of flags, the low 8 of them the exit signal: CLONE_INTO_CGROUP (bit 33)
and CLONE_NEWTIME (0x80) cannot go through it. The fallback puts the child into its cgroup
by writing its pid to `cgroup.procs` (Container.exec: the final process writes "0" itself)
and unshares the time namespace in the child. For real: nsfast's own default seccomp filter
makes clone3 ENOSYS, so an outer nsfast sandbox (host root, no namespaces, every capability
kept, the calls an inner nsfast needs allowed) runs a Python that uses nsfast.
"""

from __future__ import annotations

import json
import sys

import nsfast
from conftest import suite
from nsfast import _core
from nsfast._spec import CAPABILITIES

pytestmark = suite

NS = ("user", "mnt", "pid", "uts", "ipc", "net", "cgroup", "time")

INNER = r"""
import ctypes, errno, json, os, nsfast
libc = ctypes.CDLL(None, use_errno=True)
out = {"clone3": errno.errorcode.get(ctypes.get_errno()) if libc.syscall(435, 0, 0) < 0 else "ok"}
ns = __NS__
probe = "cat /proc/self/cgroup; for n in %s; do readlink /proc/self/ns/$n; done" % " ".join(ns)
out["self"] = {n: os.readlink(f"/proc/self/ns/{n}") for n in ns}
out["own cgroup"] = open("/proc/self/cgroup").read()

def run(namespaces, cmd):
    p = nsfast.spawn(["sh", "-c", cmd], namespaces=namespaces, stdout=nsfast.PIPE, text=True)
    paths = list(p._sandbox.cgroup_paths())
    text = p.stdout.read()
    p.stdout.close()
    return {"rc": p.wait(), "out": text, "paths": paths}

out["run"] = run(ns, probe)
out["run, no cgroup ns"] = run(tuple(n for n in ns if n != "cgroup"), probe)
out["kill -TERM $$"] = nsfast.run(["sh", "-c", "kill -TERM $$"], namespaces=ns).returncode
with nsfast.Container(namespaces=ns) as c:
    r = c.exec(["sh", "-c", probe], capture_output=True, text=True)
    out["exec"] = {"rc": r.returncode, "out": r.stdout, "err": r.stderr}
    out["container"] = {n: os.readlink(f"/proc/{c.pid}/ns/{n}") for n in ns}
print(json.dumps(out))
""".replace("__NS__", repr(NS))

# What an inner nsfast needs beyond nsfast's default allow list (clone3 stays ENOSYS).
NEEDED = (
    "clone",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "mount_setattr",
    "fsopen",
    "fsconfig",
    "fsmount",
    "sethostname",
    "openat2",
)


def _inner() -> dict:
    r = nsfast.run(
        [sys.executable, "-c", INNER],
        namespaces=(),  # the host's: its cgroups, its pids (the inner nsfast sweeps by pid)
        capabilities=CAPABILITIES[: _core.cap_last_cap() + 1],
        seccomp=nsfast.Seccomp(allow=NEEDED),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def _parse(out: str) -> tuple:
    lines = out.splitlines()
    unified = next(line[3:] for line in lines if line.startswith("0::"))
    ns = dict(line.rstrip("]").split(":[") for line in lines if ":[" in line)
    return unified, ns


def test_without_clone3_run_and_exec_keep_their_cgroup_and_every_namespace():
    out = _inner()
    assert out["clone3"] == "ENOSYS"  # the fallback is what ran
    outer = {n: v.split(":[")[1].rstrip("]") for n, v in out["self"].items()}
    outer_unified = next(line[3:] for line in out["own cgroup"].splitlines() if line.startswith("0::"))

    # run: every namespace asked for (time too), and its own cgroup.
    for key in ("run", "run, no cgroup ns"):
        r = out[key]
        assert r["rc"] == 0, r
        unified, ns = _parse(r["out"])
        asked = NS if key == "run" else tuple(n for n in NS if n != "cgroup")
        assert sorted(ns) == sorted(NS)
        for n in NS:
            assert (ns[n] != outer[n]) == (n in asked), (key, n)
        if key == "run":
            assert unified == "/"  # a cgroup namespace rooted at its own cgroup
        else:
            # The real path: the sandbox's own cgroup, not the caller's.
            assert unified != outer_unified
            assert any(p.endswith(unified) for p in r["paths"]), (unified, r["paths"])
            assert unified.rsplit("/", 1)[1].startswith("sb-")
    assert out["kill -TERM $$"] == -15  # nsfast-init's status report works there too

    # Container.exec: the container's namespaces, and the exec's own cgroup below the
    # container's (its cgroup namespace shows the container's cgroup as /).
    e = out["exec"]
    assert e["rc"] == 0, e["err"]
    unified, ns = _parse(e["out"])
    assert unified.startswith("/exec-"), unified
    container = {n: v.split(":[")[1].rstrip("]") for n, v in out["container"].items()}
    assert ns == container
    assert all(ns[n] != outer[n] for n in NS)


NESTED = r"""
import json, nsfast
busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
r = nsfast.run(["python3", "-c", busy], limits=nsfast.Limits(memory="256M", pids=64))
print(json.dumps({"rc": r.returncode, "cpu": r.usage.cpu_user_s + r.usage.cpu_system_s}))
"""


def test_an_outer_nsfast_run_measures_and_bounds_the_sandboxes_nested_in_it():
    """Before: inner sandboxes' cgroups were at <mount>/nsfast/..., outside the outer run's, so
    the outer run reported 0.06 s CPU for an inner 0.22 s. Now the inner nsfast nests its
    sandbox below the cgroup it runs in (the outer sandbox's), which counts it."""
    r = nsfast.run(
        [sys.executable, "-c", NESTED],
        namespaces=(),
        capabilities=CAPABILITIES[: _core.cap_last_cap() + 1],
        seccomp=nsfast.Seccomp(allow=NEEDED),
        limits=nsfast.Limits(memory="512M", pids=200),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    inner = json.loads(r.stdout.splitlines()[-1])
    assert inner["rc"] == 0 and inner["cpu"] >= 0.3, inner
    outer_cpu = r.usage.cpu_user_s + r.usage.cpu_system_s
    assert outer_cpu >= inner["cpu"], (outer_cpu, inner)
