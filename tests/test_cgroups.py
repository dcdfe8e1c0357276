"""cgroup limits, usage and cleanup, against the real kernel.

Runs on the host (cgroup v1 here: a hybrid machine) and, unchanged, inside the pure
cgroup v2 VM (tests/test_cgroup_v2_vm.py boots it and runs this module there)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

import nsfast
from nsfast import _cgroup, _core

IN_VM = os.environ.get("NSFAST_IN_VM") == "1"
# Under TCG emulation everything is ~20x slower: fewer repetitions, same assertions.
SCALE = 0.2 if IN_VM else 1.0
# The system interpreter: this venv's lives under /root, which the sandbox hides (and a
# root caller's sandbox could not read: its root is an unprivileged host id).
PY = "/usr/bin/python3"


def expected_version() -> int:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ")
            if fields[0].split()[4] == "/sys/fs/cgroup" and fields[1].startswith("cgroup2 "):
                return 2
    return 1


def our_cgroups() -> list[str]:
    """Directories of sandboxes started by this process that still exist."""
    info = _cgroup.backend_info()
    assert info is not None
    prefix = f"sb-{os.getpid()}-"
    return [os.path.join(r, d) for r in info[1] if os.path.isdir(r) for d in os.listdir(r) if d.startswith(prefix)]


@pytest.fixture(autouse=True)
def no_leftover_cgroups():
    yield
    assert our_cgroups() == []


def test_backend_matches_the_host_hierarchy():
    info = _cgroup.backend_info()
    assert info is not None, "running as root, sandboxes must get cgroups"
    version, roots, controllers, cpu_usage = info
    assert cpu_usage
    assert version == expected_version()
    if os.environ.get("NSFAST_EXPECT_CGROUP"):
        assert version == int(os.environ["NSFAST_EXPECT_CGROUP"])
    assert {"memory", "pids", "cpu"} <= set(controllers)
    assert roots and all(r.startswith("/sys/fs/cgroup/") and r.endswith("/nsfast") for r in roots)


def test_sandbox_lives_in_its_own_cgroup_which_is_removed_after():
    p = nsfast.spawn(["sleep", "10"])
    try:
        with open(f"/proc/{p.pid}/cgroup") as f:
            lines = f.read().splitlines()
        mine = [l for l in lines if f"/sb-{os.getpid()}-" in l]
        assert mine, lines
        assert len({os.path.basename(d) for d in our_cgroups()}) == 1
    finally:
        p.kill()
        p.wait()
    assert our_cgroups() == []


def test_cgroup_namespace_is_rooted_at_the_sandbox_cgroup():
    r = nsfast.run(["cat", "/proc/self/cgroup"], capture_output=True, text=True, check=True)
    for line in r.stdout.splitlines():
        assert line.endswith(":/"), r.stdout


def test_memory_limit_oom_kills_and_reports_it():
    hog = "b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
    r = nsfast.run(
        [PY, "-c", hog],
        limits=nsfast.Limits(memory="64M", memory_swap="64M"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == -9, r
    assert "survived" not in r.stdout
    assert r.usage.oom_killed is True
    assert r.usage.memory_peak_bytes is not None and r.usage.memory_peak_bytes <= 64 << 20


def test_a_child_killed_by_the_memory_limit_is_the_runs_termination():
    """(Found by an audit.) A shell whose child the kernel OOM-killed exits 0: its usage said
    oom_killed=True, termination="exit". As BenchExec's terminationreason: "memory"."""
    hog = f"{PY} -c 'b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1'; exit 0"
    r = nsfast.run(["sh", "-c", hog], limits=nsfast.Limits(memory="64M", memory_swap="64M"), timeout=120)
    assert r.returncode == 0
    assert r.usage.oom_killed is True and r.usage.termination == "memory", r.usage


def test_process_under_the_memory_limit_runs_and_peak_is_measured():
    use = "b = bytearray(20 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ok')"
    r = nsfast.run([PY, "-c", use], limits=nsfast.Limits(memory="64M"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r
    assert r.usage.oom_killed is False
    assert r.usage.memory_peak_bytes >= 20 << 20


def test_fork_bomb_is_contained_by_the_pids_limit():
    bomb = "b() { b | b & }; b 2>/dev/null; sleep 1; echo alive"
    r = nsfast.run(["sh", "-c", bomb], limits=nsfast.Limits(pids=16), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "alive" in r.stdout, r
    if r.usage.pids_peak is not None:
        assert 1 < r.usage.pids_peak <= 16
    # The host is unaffected: it still starts processes.
    assert subprocess.run(["true"]).returncode == 0


def busy(seconds: float) -> list[str]:
    return [PY, "-c", f"import time\nt = time.monotonic()\nwhile time.monotonic() - t < {seconds}: pass"]


def test_cpu_limit_throttles_a_busy_loop():
    r = nsfast.run(busy(1.5), limits=nsfast.Limits(cpu=0.2), timeout=120)
    assert r.returncode == 0
    cpu = r.usage.cpu_user_s + r.usage.cpu_system_s
    # 0.35 s of CPU per 1.5 s of wall time (0.2 cores + slack for CFS period granularity). The
    # run's wall time includes the interpreter's start, which is slow under load (and takes
    # seconds under the VM's TCG), so the bound scales with it.
    assert cpu <= 0.35 / 1.5 * max(1.5, r.usage.wall_s), r.usage


@pytest.mark.skipif(IN_VM, reason="emulated CPUs (TCG) make wall and CPU time diverge; checked on the host")
def test_unlimited_busy_loop_is_measured_as_the_cpu_it_used():
    # The program reports its own CPU time; the cgroup's count must agree (the wall time
    # only bounds it: on a loaded machine a busy loop gets less than a whole core).
    code = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.0: pass\nprint(time.process_time())"
    r = nsfast.run([PY, "-c", code], timeout=60, capture_output=True, text=True, check=True)
    own = float(r.stdout)
    cpu = r.usage.cpu_user_s + r.usage.cpu_system_s
    assert own > 0.05 and abs(cpu - own) <= 0.05 + 0.05 * own, (own, r.usage)
    assert cpu <= r.usage.wall_s + 0.02, r.usage


def test_cpuset_pins_the_sandbox():
    r = nsfast.run(
        ["cat", "/proc/self/status"], limits=nsfast.Limits(cpuset="0"), capture_output=True, text=True, check=True
    )
    allowed = [l for l in r.stdout.splitlines() if l.startswith("Cpus_allowed_list:")]
    assert allowed and allowed[0].split()[-1] == "0", allowed


def sleeper_pids(marker: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and marker in p.info["cmdline"]]


@pytest.mark.parametrize("namespaces", [nsfast.DEFAULT_NAMESPACES, ("mnt", "uts")], ids=["pidns", "no-pidns"])
def test_kill_ends_every_process_of_the_sandbox(namespaces):
    marker = "1234.5" if "pid" in namespaces else "2345.5"
    p = nsfast.spawn(
        ["sh", "-c", f"sleep {marker} & sleep {marker} & setsid sleep {marker} & wait"], namespaces=namespaces
    )
    deadline = time.monotonic() + 10
    while len(sleeper_pids(marker)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sleeper_pids(marker)) == 3
    p.kill()
    assert p.wait(5) == -9
    deadline = time.monotonic() + 1
    while sleeper_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sleeper_pids(marker) == []


def test_timeout_kills_the_tree_without_a_pid_namespace():
    with pytest.raises(subprocess.TimeoutExpired):
        nsfast.run(["sh", "-c", "setsid sleep 3456.5 & sleep 3456.5"], namespaces=("mnt",), timeout=0.3)
    time.sleep(0.05)
    assert sleeper_pids("3456.5") == []


def test_cgroup_false_turns_cgroups_off():
    r = nsfast.run(["true"], cgroup=False)
    assert r.returncode == 0
    assert r.usage.memory_peak_bytes is None and r.usage.pids_peak is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(memory="lots"), "Limits.memory"),
        (dict(memory=-1), "Limits.memory"),
        (dict(memory=1000), "Limits.memory"),
        (dict(memory="64M", memory_swap="32M"), "Limits.memory_swap"),
        (dict(pids=0), "Limits.pids"),
        (dict(cpu=0), "Limits.cpu"),
        (dict(cpu=float("nan")), "Limits.cpu"),
        (dict(cpuset="99"), "Limits.cpuset"),
        (dict(cpuset="a-b"), "Limits.cpuset"),
    ],
)
def test_invalid_limits_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        nsfast.Limits(**kwargs)


def test_limits_need_cgroups():
    with pytest.raises(ValueError, match="limits"):
        nsfast.run(["true"], limits=nsfast.Limits(pids=4), cgroup=False)


def test_sizes_accept_units():
    assert nsfast.Limits(memory="1.5G").memory == 3 << 29
    assert nsfast.Limits(memory="256M").memory == 256 << 20
    assert nsfast.Limits(memory=64 << 20).memory == 64 << 20


def test_mixed_runs_leave_no_cgroup_behind():
    n = int(300 * SCALE)
    oom = "b = bytearray(100 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"
    outcomes = {"ok": 0, "timeout": 0, "oom": 0, "spawn": 0}
    for i in range(n):
        kind = ("ok", "timeout", "oom", "spawn")[i % 4]
        if kind == "ok":
            assert nsfast.run(["true"], limits=nsfast.Limits(pids=8)).returncode == 0
        elif kind == "timeout":
            with pytest.raises(subprocess.TimeoutExpired):
                nsfast.run(["sleep", "10"], timeout=0.01)
        elif kind == "oom":
            r = nsfast.run([PY, "-c", oom], limits=nsfast.Limits(memory="32M", memory_swap="32M"))
            assert r.usage.oom_killed
        else:
            with pytest.raises(nsfast.SpawnError):
                nsfast.run(["/nonexistent/command"], limits=nsfast.Limits(memory="64M"))
        outcomes[kind] += 1
    assert our_cgroups() == []
    assert all(outcomes.values())


def test_exception_in_the_caller_cleans_up():
    with pytest.raises(RuntimeError):
        with nsfast.spawn(["sleep", "10"]) as p:
            assert len({os.path.basename(d) for d in our_cgroups()}) == 1
            raise RuntimeError("caller failed")
    assert p.returncode == -9
    assert our_cgroups() == []


def cgroup_mounts() -> dict[str, str]:
    """Mount point -> "cgroup2" or the v1 controllers nsfast uses there."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ")
            fstype, _, opts = right.split(" ")[:3]
            ctrls = set(opts.strip().split(",")) & {"memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"}
            if fstype == "cgroup2" or (fstype == "cgroup" and ctrls):
                found[left.split(" ")[4]] = "cgroup2" if fstype == "cgroup2" else ",".join(sorted(ctrls))
    return found


def mount_relative(name: str) -> str:
    """The absolute cgroup_root form naming the cgroup /NAME in every hierarchy."""
    mounts = cgroup_mounts()
    return next((m for m, kind in mounts.items() if kind == "cgroup2"), next(iter(mounts))) + "/" + name


def rmdir_tree(top: str) -> None:
    """Remove the cgroup directory `top` and every cgroup below it (deepest first)."""
    if not os.path.isdir(top):
        return
    dirs = [d for d, _, _ in os.walk(top)]
    for d in sorted(dirs, key=len, reverse=True):
        deadline = time.monotonic() + 5
        while os.path.isdir(d):
            try:
                os.rmdir(d)
            except OSError:  # EBUSY while the last exited processes go
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


@contextlib.contextmanager
def configured(root):
    nsfast.configure(cgroup_root=root)
    try:
        yield
    finally:
        nsfast.configure(cgroup_root=None)


def sandbox_dirs(p: nsfast.Process) -> list[str]:
    return list(p._sandbox.cgroup_paths())


def test_cgroup_root_absolute_names_a_cgroup_in_every_hierarchy():
    root = mount_relative("nsfast-test-root")
    try:
        with configured(root):
            info = _cgroup.backend_info()
            assert info is not None and all(r.endswith("/nsfast-test-root") for r in info[1]), info
            assert {os.path.dirname(r) for r in info[1]} <= set(cgroup_mounts()), info
            with nsfast.spawn(["sleep", "5"]) as p:
                with open(f"/proc/{p.pid}/cgroup") as f:
                    lines = f.read().splitlines()
                p.kill()
            # Every hierarchy the sandbox has a cgroup of its own in: /nsfast-test-root/sb-...
            mine = [line for line in lines if "/sb-" in line]
            assert mine and all(line.split(":", 2)[2].startswith("/nsfast-test-root/sb-") for line in mine), lines
    finally:
        for m in cgroup_mounts():
            rmdir_tree(os.path.join(m, "nsfast-test-root"))


@pytest.mark.parametrize(
    "root, why",
    [
        ("/", "non-empty"),
        ("", "non-empty"),
        ("/tmp/nsfast-cgroup", "not inside a mounted cgroup file system"),
        ("/sys/fs/cgroup/../cgroup", "'..'"),
        ("a/../../escape", "'..'"),
        ("./a", "'.'"),
        (42, "non-empty path"),
    ],
)
def test_bad_cgroup_roots_are_spec_errors_naming_the_value(root, why):
    with pytest.raises(nsfast.SpecError, match="cgroup_root") as err:
        nsfast.configure(cgroup_root=root)
    assert why in str(err.value) and repr(root) in str(err.value)
    assert err.value.field == "cgroup_root"


def test_a_bad_cgroup_root_in_the_environment_fails_the_run(monkeypatch):
    monkeypatch.setenv("NSFAST_CGROUP_ROOT", "/proc/nsfast")
    with pytest.raises(nsfast.SpecError, match="NSFAST_CGROUP_ROOT.*not inside a mounted cgroup"):
        nsfast.run(["true"])
    monkeypatch.setenv("NSFAST_CGROUP_ROOT", "/proc/nsfast")  # also when the sandbox needs no limit
    with pytest.raises(nsfast.SpecError):
        nsfast.run(["true"], limits=None)


def test_a_cgroup_mount_made_or_removed_between_runs_is_seen(tmp_path):
    """Where a cgroup root may go is decided from the mount table, which nsfast reads again
    only when the kernel says it changed (POLLPRI): a cgroup file system mounted (or
    unmounted) between two runs counts at once. The test bind-mounts an existing cgroup mount
    on a directory of its own and unmounts it. (Never a new cgroup2 mount: that would reset
    the host hierarchy's root options, nsdelegate and the memory_* ones, to its own.)"""
    cgroup_mounts = [m for m, fs in _core.mounts() if fs in ("cgroup", "cgroup2")]
    if not cgroup_mounts:
        pytest.skip("no cgroup file system is mounted")
    d = tmp_path / "cg"
    d.mkdir()
    root = str(d / "nsfast-test")
    with pytest.raises(nsfast.SpecError, match="not inside a mounted cgroup"):
        nsfast.configure(cgroup_root=root)
    subprocess.run(["mount", "--bind", cgroup_mounts[0], str(d)], check=True)
    try:
        assert _cgroup._cgroup_mount_of(root) == str(d)
    finally:
        subprocess.run(["umount", str(d)], check=True)
    assert _cgroup._cgroup_mount_of(root) is None
    with pytest.raises(nsfast.SpecError, match="not inside a mounted cgroup"):
        nsfast.configure(cgroup_root=root)


NESTED_CHILD = r"""
import json, os, resource, sys
for d in sys.argv[1:]:  # a fresh process, moved into the outer cgroup by itself
    with open(os.path.join(d, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
import nsfast

assert "NSFAST_CGROUP_ROOT" not in os.environ
def cgroup_of(p):
    with open(f"/proc/{p.pid}/cgroup") as f:
        return f.read()
busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
r = nsfast.run(["/usr/bin/python3", "-c", busy])
with nsfast.spawn(["sleep", "30"]) as p:
    default = cgroup_of(p)
    p.kill()
hog = "b = bytearray(400 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
h = nsfast.run(["/usr/bin/python3", "-c", hog], capture_output=True, text=True)  # DEFAULT_LIMITS: 1G
nsfast.configure(cgroup_root="inner/deeper")
with nsfast.spawn(["sleep", "30"], limits=nsfast.Limits(memory="64M", pids=8)) as p:
    relative = cgroup_of(p)
    p.kill()
me = resource.getrusage(resource.RUSAGE_SELF)
with open("/proc/self/cgroup") as f:
    own = f.read()
print(json.dumps({"cpu": r.usage.cpu_user_s + r.usage.cpu_system_s, "self_cpu": me.ru_utime + me.ru_stime,
                  "default": default, "relative": relative, "hog_rc": h.returncode, "hog_out": h.stdout,
                  "own": own}))
"""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def test_default_root_nests_sandboxes_below_the_callers_cgroup():
    """An outer cgroup (as BenchExec or a systemd slice makes) measures and limits the
    sandboxes of a process in it: CPU time and a memory limit cover them."""
    name = f"nsfast-outer-{os.getpid()}"
    outer = {m: os.path.join(m, name) for m in cgroup_mounts()}
    try:
        for m, d in outer.items():
            os.mkdir(d)
            kind = cgroup_mounts()[m]
            if "cpuset" in kind:
                for f in ("cpuset.cpus", "cpuset.mems"):
                    with open(os.path.join(m, f)) as src:
                        _write(os.path.join(d, f), src.read().strip())
            if "memory" in kind:
                _write(os.path.join(d, "memory.limit_in_bytes"), str(160 << 20))
                if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):
                    _write(os.path.join(d, "memory.memsw.limit_in_bytes"), str(160 << 20))
            if kind == "cgroup2" and os.path.exists(os.path.join(d, "memory.max")):
                _write(os.path.join(d, "memory.max"), str(160 << 20))
                if os.path.exists(os.path.join(d, "memory.swap.max")):
                    _write(os.path.join(d, "memory.swap.max"), "0")
        env = {k: v for k, v in os.environ.items() if k != "NSFAST_CGROUP_ROOT"}
        r = subprocess.run(
            [sys.executable, "-c", NESTED_CHILD, *outer.values()],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout.splitlines()[-1])
        # Every sandbox cgroup is below the outer one, in every hierarchy it has one in.
        for key, below in (("default", f"/{name}/nsfast/sb-"), ("relative", f"/{name}/inner/deeper/sb-")):
            mine = [line for line in res[key].splitlines() if "/sb-" in line]
            assert mine and all(line.split(":", 2)[2].startswith(below) for line in mine), (key, res[key])
        # The outer cgroup's CPU usage includes the sandbox's 0.3 s (beyond the child's own).
        assert res["cpu"] >= 0.3, res
        for m, d in outer.items():
            kind = cgroup_mounts()[m]
            if kind == "cgroup2":
                with open(os.path.join(d, "cpu.stat")) as f:
                    outer_cpu = _cgroup_keyed(f.read(), "usage_usec") / 1e6
            elif "cpuacct" in kind:
                with open(os.path.join(d, "cpuacct.usage")) as f:
                    outer_cpu = int(f.read()) / 1e9
            else:
                continue
            assert outer_cpu - res["self_cpu"] >= 0.3, (m, outer_cpu, res)
        # The outer memory limit (160M) covers the sandbox (its own default limit is 1G).
        assert res["hog_rc"] == -9 and "survived" not in res["hog_out"], res
        if expected_version() == 2:  # the caller moved into a leaf: its cgroup had to have no processes
            assert f"0::/{name}/nsfast-caller\n" in res["own"], res["own"]
    finally:
        for d in outer.values():
            rmdir_tree(d)


DROP_CHILD = r"""
import ctypes, errno, json, os, sys, warnings
for d in sys.argv[1:]:  # a fresh process, moved into the outer cgroup by itself
    with open(os.path.join(d, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
import nsfast

warned = []
warnings.showwarning = lambda message, category, *rest: warned.append((category.__name__, str(message)))
warnings.simplefilter("always")

def run():
    r = nsfast.run(["id", "-u"], capture_output=True, text=True, timeout=60)
    return [r.returncode, r.stdout.strip(), r.stderr, r.usage.memory_peak_bytes is not None]

out = {"root": run(), "root_warned": list(warned)}
os.chdir("/")
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
# Not dumpable now (ids changed without an exec): its children's id maps are root's to write.
try:
    run()
    out["undumpable"] = None
except nsfast.SpawnError as e:
    out["undumpable"] = [e.errno == errno.EACCES, e.step, e.filename]
assert ctypes.CDLL(None).prctl(4, 1, 0, 0, 0) == 0  # PR_SET_DUMPABLE: this test's process holds no secret
out["nobody"] = run()
out["nobody_warned"] = [m for c, m in warned if c == "CgroupWarning"]
# A root this caller may not create cgroups in, asked for by name: an error saying so.
nsfast.configure(cgroup_root=sys.argv[1])
try:
    run()
    out["named"] = None
except nsfast.SpawnError as e:
    out["named"] = [e.errno == errno.EACCES, e.step, e.filename]
print(json.dumps(out))
"""


def test_a_caller_that_drops_root_starts_sandboxes_as_a_rootless_one():
    """A service that starts as root, runs a sandbox, then drops to an unprivileged user:
    from then on it is a rootless caller (root inside a user namespace of its own; without
    a delegated cgroup, no cgroup and a CgroupWarning), not root with root's cgroups, which
    it may no longer create. Dropped without an exec it is not dumpable, and the kernel lets
    it write no child's id maps: a SpawnError saying so before anything starts, until it
    is dumpable again. A cgroup root it may not write, asked for by name, is a SpawnError
    with EACCES naming the directory."""
    name = f"nsfast-drop-{os.getpid()}"
    outer = {m: os.path.join(m, name) for m in cgroup_mounts()}
    try:
        for m, d in outer.items():
            os.mkdir(d)
            if "cpuset" in cgroup_mounts()[m]:
                for f in ("cpuset.cpus", "cpuset.mems"):
                    with open(os.path.join(m, f)) as src:
                        _write(os.path.join(d, f), src.read().strip())
        env = {k: v for k, v in os.environ.items() if k != "NSFAST_CGROUP_ROOT"}
        r = subprocess.run(
            [sys.executable, "-c", DROP_CHILD, *outer.values()], env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout.splitlines()[-1])
        assert res["root"] == [0, "0", "", True] and res["root_warned"] == [], res
        ok, step, why = res["undumpable"]
        assert ok and step == "write uid_map" and "not dumpable" in why, res["undumpable"]
        assert res["nobody"][:3] == [0, "0", ""], res["nobody"]
        if expected_version() == 1:  # v1 hierarchies are never delegated to a rootless caller
            assert res["nobody"][3] is False, res["nobody"]  # no cgroup, so no memory peak
            warned = res["nobody_warned"]
            assert len(warned) == 1 and "without cgroup limits" in warned[0], warned
        ok, step, filename = res["named"]
        assert ok and step.startswith("create cgroup"), res["named"]
        # (An absolute root names the same cgroup in every hierarchy: the first refused names it.)
        assert any(filename.startswith(d + "/sb-") for d in outer.values()), res["named"]
    finally:
        for d in outer.values():
            rmdir_tree(d)


def _cgroup_keyed(text: str, key: str) -> int:
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith(key + " "))


def read_limit(p: nsfast.Process, file: str) -> str:
    [path] = [os.path.join(d, file) for d in sandbox_dirs(p) if os.path.exists(os.path.join(d, file))]
    with open(path) as f:
        return f.read().strip()


def test_raw_controller_values_are_written_translated_on_v1():
    limits = nsfast.Limits(cgroup={"cpu.weight": 50, "pids.max": "7", "cpu.max": "20000 100000"})
    assert limits.cgroup == (("cpu.max", "20000 100000"), ("cpu.weight", "50"), ("pids.max", "7"))
    with nsfast.spawn(["sleep", "10"], limits=limits) as p:
        try:
            assert read_limit(p, "pids.max") == "7"
            if expected_version() == 2:
                assert read_limit(p, "cpu.weight") == "50"
                assert read_limit(p, "cpu.max") == "20000 100000"
            else:
                assert read_limit(p, "cpu.shares") == "512"  # 50 * 1024 / 100
                assert read_limit(p, "cpu.cfs_quota_us") == "20000"
                assert read_limit(p, "cpu.cfs_period_us") == "100000"
        finally:
            p.kill()


def test_raw_memory_high_throttles_on_v2_and_is_refused_on_v1():
    limits = nsfast.Limits(cgroup={"memory.high": "64M"})
    if expected_version() == 2:
        with nsfast.spawn(["sleep", "10"], limits=limits) as p:
            assert read_limit(p, "memory.high") == str(64 << 20)
            p.kill()
        return
    with pytest.raises(nsfast.LimitError, match=r"cgroup\['memory.high'\].*no cgroup v1 equivalent") as err:
        nsfast.run(["true"], limits=limits)
    assert err.value.limits == ["Limits.cgroup['memory.high']"]
    with pytest.warns(nsfast.CgroupWarning, match="memory.high"):
        assert nsfast.run(["true"], limits=limits, strict=False).returncode == 0


def test_a_raw_value_the_kernel_refuses_is_a_limit_error_naming_file_and_value():
    with pytest.raises(nsfast.LimitError, match=r"pids\.max.*lots") as err:
        nsfast.run(["true"], limits=nsfast.Limits(cgroup={"pids.max": "lots"}))
    assert err.value.limits == ["cgroup file pids.max"]


@pytest.mark.parametrize(
    "raw",
    [
        {"cgroup.procs": "1"},
        {"cgroup.subtree_control": "+memory"},
        {"../memory.max": "1"},
        {"memory.max/../../cgroup.procs": "1"},
        {"memory": "1"},
        {"io.max": "8:0 rbps=1"},
        {"Memory.max": "1"},
        {"memory.high": "1\n2"},
        {"memory.high": ""},
        {"memory.high": True},
        {"memory.high": 1.5},
    ],
)
def test_raw_keys_and_values_are_validated(raw):
    with pytest.raises(nsfast.SpecError, match=r"Limits\.cgroup\["):
        nsfast.Limits(cgroup=raw)


def test_a_raw_value_and_its_typed_field_conflict():
    with pytest.raises(nsfast.SpecError, match="Limits.memory"):
        nsfast.Limits(memory="64M", cgroup={"memory.max": "32M"})


def test_required_controllers_are_checked():
    r = nsfast.run(["true"], limits=nsfast.Limits(require=("memory", "pids", "cpu", "cpuset")))
    assert r.returncode == 0
    with pytest.raises(nsfast.SpecError, match="Limits.require"):
        nsfast.Limits(require=("io",))
    with pytest.raises(TypeError):
        nsfast.Limits(require="memory")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(cpu_time=0), "Limits.cpu_time"),
        (dict(cpu_time=-1.0), "Limits.cpu_time"),
        (dict(cpu_time=float("inf")), "Limits.cpu_time"),
        (dict(cpu_time_soft=float("nan")), "Limits.cpu_time_soft"),
        (dict(cpu_time=1, cpu_time_soft=2), "Limits.cpu_time_soft"),
    ],
)
def test_cpu_time_limits_are_validated(kwargs, field):
    with pytest.raises(nsfast.SpecError, match=field):
        nsfast.Limits(**kwargs)


def test_cpu_time_needs_and_here_has_a_readable_cpu_usage():
    limits = nsfast.Limits(cpu_time=2, cpu_time_soft=1.5)
    assert (limits.cpu_time, limits.cpu_time_soft) == (2.0, 1.5)
    r = nsfast.run(["true"], limits=limits)  # enforcement is not ours; being accepted is
    assert r.returncode == 0 and r.usage.cpu_user_s is not None


@pytest.mark.skipif(expected_version() != 2, reason="a cgroup without the memory controller: cgroup v2 (the VM)")
def test_a_missing_controller_is_a_limit_error_unless_not_strict():
    base = f"/sys/fs/cgroup/nsfast-nomem-{os.getpid()}"
    os.mkdir(base)
    try:
        _write(os.path.join(base, "cgroup.subtree_control"), "+pids")  # no memory below it
        with configured(base + "/sandboxes"):
            with pytest.raises(nsfast.LimitError, match="Limits.memory: the memory controller is not available"):
                nsfast.run(["true"], limits=nsfast.Limits(memory="64M"))
            with pytest.raises(nsfast.LimitError, match=r"require\['memory'\]"):
                nsfast.run(["true"], limits=nsfast.Limits(require=("memory",)), strict=False)
            with pytest.warns(nsfast.CgroupWarning, match="Limits|memory"):
                r = nsfast.run(["true"], limits=nsfast.Limits(memory="64M", pids=8), strict=False)
            assert r.returncode == 0 and r.usage.pids_peak is not None
            assert nsfast.run(["true"], limits=nsfast.Limits(pids=8, require=("pids",))).returncode == 0
    finally:
        rmdir_tree(base)


def test_timeout_reports_usage_on_the_exception():
    with pytest.raises(subprocess.TimeoutExpired) as err:
        nsfast.run(["sleep", "10"], timeout=0.2)
    usage = err.value.usage
    assert usage.timed_out is True and usage.wall_s >= 0.2


ROOTLESS_SCRIPT = r"""
import json, sys, warnings, nsfast
hog = "b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    r = nsfast.run(["sh", "-c", "cat /proc/self/cgroup; id -u"], limits=nsfast.Limits(pids=8), capture_output=True,
                   text=True)
    try:
        oom = nsfast.run(["/usr/bin/python3", "-c", hog], limits=nsfast.Limits(memory="64M", memory_swap="64M"))
        oom_rc, oom_killed, refused = oom.returncode, oom.usage.oom_killed, None
    except nsfast.LimitError as e:
        oom_rc, oom_killed, refused = None, None, [str(e), e.limits, isinstance(e, nsfast.NsfastError)]
    lax = nsfast.run(["/usr/bin/python3", "-c", hog], limits=nsfast.Limits(memory="64M", memory_swap="64M"),
                     strict=False)
    default = nsfast.run(["true"])
    def refusal(**kw):
        try:
            nsfast.run(["true"], **kw)
        except nsfast.LimitError as e:
            return e.limits
    required = refusal(limits=nsfast.Limits(require=("pids",)), strict=False)
    cpu_time = refusal(limits=nsfast.Limits(cpu_time=1))
    p = nsfast.spawn(["sleep", "5"], limits=nsfast.Limits(pids=8))
    with open(f"/proc/{p.pid}/cgroup") as f:
        host_view = f.read()
    p.kill()
    p.wait()
print(json.dumps({"rc": r.returncode, "out": r.stdout, "pids_peak": r.usage.pids_peak, "oom": oom_killed,
                  "oom_rc": oom_rc, "refused": refused, "lax_rc": lax.returncode, "lax_oom": lax.usage.oom_killed,
                  "default_rc": default.returncode, "host_view": host_view, "required": required,
                  "cpu_time": cpu_time,
                  "warnings": [f"{x.category.__name__}: {x.message}" for x in w]}))
"""


def run_as_nobody(prefix: str = ""):
    if not (os.path.exists("/usr/bin/python3") and shutil.which("setpriv")):
        pytest.skip("needs /usr/bin/python3 and setpriv to run as an unprivileged user")
    pkg = os.path.dirname(os.path.dirname(nsfast.__file__))
    cmd = f'{prefix}exec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c "$0"'
    r = subprocess.run(
        ["sh", "-c", cmd, ROOTLESS_SCRIPT],
        env={"PYTHONPATH": pkg, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.skipif(expected_version() == 2, reason="this host has cgroup v2; the VM-only test covers delegation")
def test_rootless_without_a_delegated_cgroup_refuses_asked_limits_and_warns_for_the_defaults():
    res = run_as_nobody()
    # pids alone: bounded by RLIMIT_NPROC without a cgroup, so it runs (unmeasured).
    assert res["rc"] == 0 and res["out"].endswith("0\n")
    assert res["pids_peak"] is None
    # A memory limit that cannot take effect is refused before anything runs, not dropped.
    message, names, is_nsfast_error = res["refused"]
    assert names == ["Limits.memory", "Limits.memory_swap"] and is_nsfast_error, res
    assert "no cgroup this caller may create cgroups in" in message, res
    # strict=False and the defaults are best effort, with a CgroupWarning.
    # require= is checked even with strict=False; cpu_time needs a readable CPU usage.
    assert res["required"] == ["Limits.require['pids']"] and res["cpu_time"] == ["Limits.cpu_time"], res
    assert res["lax_rc"] == 0 and not res["lax_oom"] and res["default_rc"] == 0, res  # the 200M hog ran
    assert any(w.startswith("CgroupWarning:") and "without cgroup limits" in w for w in res["warnings"]), res


@pytest.mark.skipif(expected_version() != 2, reason="cgroup v2 delegation needs a pure v2 host (runs in the VM)")
def test_rootless_in_a_delegated_v2_subtree_gets_limits():
    deleg = "/sys/fs/cgroup/nsfast-deleg-test"
    os.mkdir(deleg)
    try:
        for f in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
            os.chown(os.path.join(deleg, f), 65534, 65534)
        # As systemd-run --user -p Delegate=yes would: the caller starts inside its delegated cgroup.
        res = run_as_nobody(prefix=f"echo $$ > {deleg}/cgroup.procs && ")
        assert res["warnings"] == [], res
        assert res["host_view"].startswith("0::/nsfast-deleg-test/nsfast/sb-"), res  # under the delegated cgroup
        assert res["out"].startswith("0::/\n"), res  # its cgroup namespace is rooted there
        assert res["pids_peak"] is not None and res["pids_peak"] <= 8
        assert res["oom"] is True and res["oom_rc"] == -9 and res["refused"] is None
        assert res["lax_rc"] == -9 and res["lax_oom"] is True, res
        assert res["required"] is None and res["cpu_time"] is None, res
    finally:
        for sub in ("nsfast", "nsfast-caller", ""):
            d = os.path.join(deleg, sub)
            deadline = time.monotonic() + 5
            while os.path.isdir(d):
                try:
                    os.rmdir(d)
                except OSError:  # EBUSY while the exited caller's last references go
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)


# ---------------------------------------------------------------------------------------
# Spec(delegate_cgroup=True): a sandbox that owns its cgroup, and an nsfast nested in it


@pytest.mark.parametrize(
    "kwargs, why",
    [
        (dict(cgroup=False, limits=None), "needs cgroup=True"),
        (dict(namespaces=("user", "mnt", "pid")), "missing: cgroup"),
        (dict(namespaces=("user", "pid", "cgroup")), "missing: mnt"),
    ],
)
def test_delegate_cgroup_without_its_namespaces_or_a_cgroup_is_a_spec_error(kwargs, why):
    with pytest.raises(nsfast.SpecError, match="delegate_cgroup") as err:
        nsfast.Spec(delegate_cgroup=True, **kwargs)
    assert err.value.field == "delegate_cgroup" and why in str(err.value)


@pytest.mark.skipif(expected_version() == 2, reason="a hybrid/v1 host refuses delegation; the VM is pure cgroup v2")
@pytest.mark.parametrize("strict", [True, False])
def test_delegate_cgroup_on_a_hybrid_host_is_a_limit_error_before_anything_runs(strict, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(nsfast.LimitError, match="delegate_cgroup: needs cgroup v2") as err:
        nsfast.run(
            ["touch", str(marker)],
            delegate_cgroup=True,
            strict=strict,
            mounts=[nsfast.Bind(str(tmp_path), str(tmp_path), readonly=False)],
        )
    assert err.value.limits == ["delegate_cgroup"]
    assert "hybrid" in str(err.value)
    assert not marker.exists()


def test_a_sandbox_without_delegation_cannot_write_its_cgroupfs():
    script = "echo max > /sys/fs/cgroup/cgroup.subtree_control || echo refused"
    r = nsfast.run(["sh", "-c", script], capture_output=True, text=True)
    assert r.stdout.strip().endswith("refused"), r


# Runs inside a delegated sandbox (as its root): an nsfast there, then the attacks.
DELEGATED_INNER = r"""
import json, os, subprocess, sys, time
import nsfast

def attempt(path, value):
    try:
        with open(path, "w") as f:
            f.write(value)
        return "written"
    except OSError as e:
        return type(e).__name__

def stat(name):
    st = os.stat(os.path.join("/sys/fs/cgroup", name))
    return [st.st_uid, st.st_gid]

out = {"owners": {f: stat(f) for f in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads",
                                         "memory.max", "pids.max")}}
out["mount"] = [l for l in open("/proc/self/mountinfo") if l.split()[4] == "/sys/fs/cgroup"][-1]
out["host_mount"] = [l for l in open("/proc/self/mountinfo") if l.split()[4] == "/mnt/host-cgroup"][-1]
# The sandbox's own limits cannot be raised from inside.
out["raise_memory"] = attempt("/sys/fs/cgroup/memory.max", "max")
out["raise_pids"] = attempt("/sys/fs/cgroup/pids.max", "max")
# An nsfast inside: its sandboxes go below the delegated cgroup, with limits that apply.
bomb = nsfast.run(["sh", "-c", "b() { b | b & }; b 2>/dev/null; sleep 1; echo alive"],
                  limits=nsfast.Limits(pids=16), capture_output=True, text=True, timeout=300)
hog = "b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
oom = nsfast.run(["/usr/bin/python3", "-c", hog], limits=nsfast.Limits(memory="64M", memory_swap="64M", pids=16),
                 capture_output=True, text=True, timeout=300)
busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
cpu = nsfast.run(["/usr/bin/python3", "-c", busy], limits=nsfast.Limits(memory="64M", pids=16), timeout=300)
with nsfast.spawn(["sleep", "30"], limits=nsfast.Limits(memory="64M", pids=16)) as p:
    with open(f"/proc/{p.pid}/cgroup") as f:
        inner_cgroup = f.read()
    inner_dir = p._sandbox.cgroup_paths()[0]
    with open(os.path.join(inner_dir, "memory.max")) as f:
        inner_memory_max = f.read().strip()
    p.kill()
out.update(bomb=[bomb.returncode, bomb.stdout, bomb.usage.pids_peak], oom=[oom.returncode, oom.usage.termination,
           oom.stdout], inner_cpu=cpu.usage.cpu_user_s + cpu.usage.cpu_system_s, inner_cgroup=inner_cgroup,
           inner_dir=inner_dir, inner_memory_max=inner_memory_max, own=open("/proc/self/cgroup").read())
# The host's cgroupfs, bound in by the test: a cgroup outside the delegated subtree takes no pid.
host = "/mnt/host-cgroup"
out["escape_root"] = attempt(f"{host}/cgroup.procs", str(os.getpid()))
out["escape_victim"] = attempt(f"{host}/{sys.argv[1]}/cgroup.procs", str(os.getpid()))
# A deep tree with a process left in it: removed with the sandbox.
deep = "/sys/fs/cgroup/deep/a/b/c/d"
os.makedirs(deep)
left = subprocess.Popen(["sleep", "1000"], start_new_session=True)
with open(os.path.join(deep, "cgroup.procs"), "w") as f:
    f.write(str(left.pid))
out["deep_procs"] = open(os.path.join(deep, "cgroup.procs")).read().split()
print(json.dumps(out))
"""

# The outer caller (root, or rootless through setpriv): one delegated sandbox running the above.
DELEGATED_OUTER = r"""
import json, os, sys
import nsfast
pkg = os.path.dirname(os.path.dirname(nsfast.__file__))
p = nsfast.spawn(["/usr/bin/python3", "-c", sys.argv[1], sys.argv[2]], delegate_cgroup=True, seccomp=None,
                 masked_paths=(), readonly_paths=(), capabilities=("setfcap",),
                 mounts=[nsfast.Tmpfs("/mnt"), nsfast.Bind("/sys/fs/cgroup", "/mnt/host-cgroup", readonly=False),
                         nsfast.Bind(pkg, "/mnt/nsfast-pkg")],  # (a checkout under /tmp or /home is hidden)
                 env={"PYTHONPATH": "/mnt/nsfast-pkg", "PATH": "/usr/bin:/bin"}, stdout=nsfast.PIPE,
                 stderr=nsfast.PIPE, text=True)
dirs = p._sandbox.cgroup_paths()
id_base = p._sandbox.id_base
owners = {f: list(os.stat(os.path.join(dirs[0], f))[4:6]) for f in ("", "cgroup.procs", "memory.max")}
out, err = p.communicate(timeout=900)
u = p.usage
print(json.dumps({"rc": p.returncode, "err": err[-3000:], "inner": json.loads(out.splitlines()[-1]) if out else None,
                  "cpu": u.cpu_user_s + u.cpu_system_s, "dirs": dirs, "owners_outside": owners,
                  "id_base": id_base, "left": [d for d in dirs if os.path.exists(d)]}))
"""

needs_v2 = pytest.mark.skipif(expected_version() != 2, reason="cgroup v2 delegation needs a pure v2 host (the VM)")


def run_delegated(rootless: bool) -> dict:
    victim = f"/sys/fs/cgroup/nsfast-victim-{os.getpid()}"
    deleg = "/sys/fs/cgroup/nsfast-deleg-outer"
    os.mkdir(victim)
    try:
        if not rootless:
            r = subprocess.run(
                [sys.executable, "-c", DELEGATED_OUTER, DELEGATED_INNER, os.path.basename(victim)],
                capture_output=True,
                text=True,
                timeout=1200,
            )
        else:
            if not shutil.which("setpriv"):
                pytest.skip("needs setpriv to run as an unprivileged user")
            os.mkdir(deleg)
            for f in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
                os.chown(os.path.join(deleg, f), 65534, 65534)
            pkg = os.path.dirname(os.path.dirname(nsfast.__file__))
            cmd = f'echo $$ > {deleg}/cgroup.procs && exec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c "$0" "$1" "$2"'
            r = subprocess.run(
                ["sh", "-c", cmd, DELEGATED_OUTER, DELEGATED_INNER, os.path.basename(victim)],
                env={"PYTHONPATH": pkg, "PATH": os.environ["PATH"]},
                capture_output=True,
                text=True,
                timeout=1200,
                cwd="/",
            )
        assert r.returncode == 0, r.stderr[-4000:]
        res = json.loads(r.stdout.splitlines()[-1])
        assert res["inner"] is not None, res["err"]
        with open(os.path.join(victim, "cgroup.procs")) as f:
            assert f.read() == "", "a pid got into the victim cgroup"
        return res
    finally:
        rmdir_tree(victim)
        rmdir_tree(deleg)


def check_delegated(res: dict, root_ids: list[int]) -> None:
    inner = res["inner"]
    # The outer sandbox's cgroup as seen from outside: delegated to the sandbox's root, its
    # limit files still the caller's.
    assert res["owners_outside"][""] == root_ids and res["owners_outside"]["cgroup.procs"] == root_ids, res
    assert res["owners_outside"]["memory.max"] == [os.geteuid(), os.getegid()] or root_ids == [65534, 65534], res
    # Inside: its own cgroup2 at /sys/fs/cgroup, rw, nosuid,nodev,noexec, rooted at its cgroup.
    fields = inner["mount"].split()
    assert fields[fields.index("-") + 1] == "cgroup2", inner["mount"]
    assert set(fields[5].split(",")) >= {"rw", "nosuid", "nodev", "noexec"}, inner["mount"]
    assert inner["owners"][""] == [0, 0] and inner["owners"]["cgroup.procs"] == [0, 0], inner
    # The attacks fail: raising its own limits, putting a pid into a cgroup outside.
    assert inner["raise_memory"] != "written" and inner["raise_pids"] != "written", inner
    assert inner["escape_root"] != "written" and inner["escape_victim"] != "written", inner
    # The nested nsfast: below the delegated cgroup (its namespace root), limits applied.
    assert inner["own"] == "0::/nsfast-caller\n", inner
    assert inner["inner_cgroup"].startswith("0::/nsfast/sb-"), inner
    assert inner["inner_memory_max"] == str(64 << 20), inner
    rc, out, peak = inner["bomb"]
    assert rc == 0 and "alive" in out and peak is not None and peak <= 16, inner["bomb"]
    rc, termination, out = inner["oom"]
    assert rc == -9 and termination == "memory" and "survived" not in out, inner["oom"]
    # The outer run's CPU includes the inner sandbox's 0.3 s (and its own Python).
    assert inner["inner_cpu"] >= 0.3 and res["cpu"] >= inner["inner_cpu"], res
    # The deep tree with a process left in it went with the sandbox.
    assert inner["deep_procs"], inner
    assert res["left"] == [], res
    assert res["rc"] == 0, res["err"]


@needs_v2
def test_delegated_sandbox_runs_a_nested_nsfast_with_limits_and_holds_against_attacks_root():
    res = run_delegated(rootless=False)
    # Its root: the first host id of a range of its own where its writable Bind (the host's
    # cgroupfs) is idmapped; where the kernel cannot idmap cgroup2 (the mount shows no
    # "idmapped"), the tree is attached as it is and the sandbox runs in the shared range.
    if "idmapped" in res["inner"]["host_mount"].split()[5].split(","):
        assert res["id_base"] >= nsfast._core.SANDBOX_RANGES_BASE, res
    else:
        assert res["id_base"] == nsfast._core.SANDBOX_ID_BASE, res
    check_delegated(res, [res["id_base"], res["id_base"]])


@needs_v2
def test_delegated_sandbox_runs_a_nested_nsfast_with_limits_and_holds_against_attacks_rootless():
    res = run_delegated(rootless=True)
    check_delegated(res, [65534, 65534])
