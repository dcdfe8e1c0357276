"""Containers, exec via setns, enter(), and the detached-container CLI: the seed's
`docker exec` walkthrough as tests."""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

import nsfast
from conftest import CGROUP_ENV, PYTHON_SRC, os_threads, running_with_cmdline, sandbox_cgroups, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def busybox_root():
    # Not below pytest's 0700 temp dirs: a sandbox's root is an unprivileged id, which must
    # be able to reach the rootfs where its tree cannot be idmapped (tmpfs before Linux 6.3).
    root = tempfile.mkdtemp(prefix="nsfast-bbroot-")
    os.chmod(root, 0o755)
    try:
        subprocess.run([os.path.join(HERE, "make-busybox-rootfs.sh"), root], check=True, stdout=subprocess.DEVNULL)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def inode_table(pid):
    return nsfast.namespaces(pid)


def test_exec_joins_every_namespace_of_the_container(busybox_root):
    with nsfast.Container(
        ["tail", "-f", "/dev/null"], rootfs=busybox_root, hostname="box", env={"PATH": "/bin"}, stop_timeout=0.1
    ) as c:
        p = c.spawn(["sleep", "30"])
        try:
            same = nsfast.compare_namespaces(c.pid, p.pid)
            host = nsfast.namespaces("self")
            container = c.namespaces()
            # Every type the container has of its own is shared by the exec'd process.
            for t in nsfast.DEFAULT_NAMESPACES:
                assert container[t] != host[t]
                assert same[t], t
            assert all(same.values()), same
        finally:
            p.kill()
            p.wait()


def test_exec_sees_the_container_view(busybox_root):
    with nsfast.Container(
        ["tail", "-f", "/dev/null"],
        rootfs=busybox_root,
        hostname="box",
        cwd="/tmp",
        env={"PATH": "/bin", "MARK": "container"},
        stop_timeout=0.1,
    ) as c:
        r = c.exec(
            ["sh", "-c", "hostname; pwd; echo $MARK; ls /; ps -o pid,args"], capture_output=True, text=True, check=True
        )
        lines = r.stdout.splitlines()
        assert lines[0] == "box"
        assert lines[1] == "/tmp"
        assert lines[2] == "container"
        assert sorted(lines[3:10]) == sorted(os.listdir(busybox_root))
        ps = lines[10:]
        assert ps[1].split(None, 1)[0] == "1" and "nsfast-init" in ps[1], ps
        assert ps[2].split(None, 1) == ["2", "tail -f /dev/null"], ps
        assert len(ps) <= 5, ps  # header, init, tail, sh, ps: nothing of the host
        # env= and cwd= override the container's.
        r = c.exec(
            ["sh", "-c", "pwd; echo $MARK"],
            env={"PATH": "/bin", "MARK": "mine"},
            cwd="/",
            capture_output=True,
            text=True,
        )
        assert r.stdout == "/\nmine\n"


def test_exec_joins_the_container_cgroup():
    """The container's v1 cgroups (its limits), and a cgroup of its own below the container's
    unified (v2) one."""
    with nsfast.Container(limits=nsfast.Limits(pids=32)) as c:
        p = c.spawn(["sleep", "30"])
        try:
            with open(f"/proc/{c.pid}/cgroup") as a, open(f"/proc/{p.pid}/cgroup") as b:
                main, execd = a.read().splitlines(), b.read().splitlines()
            assert [l for l in main if not l.startswith("0::")] == [l for l in execd if not l.startswith("0::")]
            (main_v2,), (exec_v2,) = [l for l in main if l.startswith("0::")], [l for l in execd if l.startswith("0::")]
            assert f"/sb-{os.getpid()}-" in main_v2
            assert exec_v2.startswith(main_v2 + "/exec-"), (main_v2, exec_v2)
        finally:
            p.kill()
            p.wait()


def test_idle_init_is_pid_1_and_reaps():
    with nsfast.Container() as c:
        r = c.exec(
            [
                "sh",
                "-c",
                "sh -c 'sleep 0.1 &'; sleep 0.4; cat /proc/1/cmdline | tr '\\0' ' '; "
                "cat /proc/[0-9]*/stat | cut -d' ' -f3",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        first, *states = r.stdout.splitlines()
        assert first.startswith("nsfast-init")
        assert "Z" not in states, r.stdout
    assert c.returncode == 0  # the idle init exits 0 on SIGTERM


def test_exec_of_a_missing_command_is_a_spawn_error():
    with nsfast.Container() as c:
        with pytest.raises(nsfast.SpawnError) as err:
            c.exec(["no-such-command-xyz"])
        assert err.value.errno == 2 and err.value.step == "exec" and err.value.filename == "no-such-command-xyz"
        assert c.exec(["true"]).returncode == 0


def test_a_start_that_fails_keeps_no_fds():
    """(Found by an audit.) A Container whose command could not be exec'd kept the fds of
    its writable trees (6: /tmp, /dev/shm and the hidden directories) as long as the object
    lived."""
    from conftest import fd_numbers

    nsfast.settle()
    before = fd_numbers()
    for _ in range(3):
        c = nsfast.Container(["no-such-command-xyz"])
        with pytest.raises(nsfast.SpawnError):
            c.start()
    nsfast.settle()
    assert fd_numbers() == before
    assert sandbox_cgroups() == []


def test_lifecycle_errors():
    c = nsfast.Container(["sleep", "0.2"])
    with pytest.raises(nsfast.ContainerError, match="not started"):
        c.exec(["true"])
    c.start()
    with pytest.raises(nsfast.ContainerError, match="already started"):
        c.start()
    deadline = time.monotonic() + 5
    while c.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not c.running and c.returncode == 0
    with pytest.raises(nsfast.ContainerError, match="not running"):
        c.exec(["true"])
    c.stop()  # a no-op once stopped


def test_stop_terminates_then_kills():
    c = nsfast.Container(["sh", "-c", "trap 'exit 7' TERM; while :; do sleep 0.05; done"]).start()
    time.sleep(0.2)
    assert c.stop(timeout=5) == 7
    # pid 1 without a handler ignores SIGTERM (init=False: no nsfast-init to forward it)
    stubborn = nsfast.Container(["tail", "-f", "/dev/null"], init=False).start()
    t = time.monotonic()
    assert stubborn.stop(timeout=0.3) == -9
    assert time.monotonic() - t < 3
    with pytest.raises(nsfast.ContainerError):
        stubborn.exec(["true"])


def test_exception_in_with_block_kills_and_cleans_up():
    with pytest.raises(KeyError):
        with nsfast.Container() as c:
            pid = c.pid
            raise KeyError("boom")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert c.returncode == -9


def test_50_concurrent_execs():
    with nsfast.Container(hostname="conc") as c:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(
                pool.map(
                    lambda i: c.exec(["sh", "-c", f"echo {i} $(hostname)"], capture_output=True, text=True), range(50)
                )
            )
    assert [r.returncode for r in results] == [0] * 50
    assert [r.stdout for r in results] == [f"{i} conc\n" for i in range(50)]


def test_500_execs_leak_nothing():
    me = psutil.Process()
    with nsfast.Container() as c:
        for _ in range(20):
            c.exec(["true"])
        # (What earlier tests left for nsfast to close, spares and ended sandboxes' mounts,
        # would otherwise close during the loop: not this test's.)
        nsfast.settle()
        fds, threads, children = me.num_fds(), os_threads(), len(me.children())
        for _ in range(500):
            assert c.exec(["true"]).returncode == 0
        nsfast.settle()
        assert (me.num_fds(), os_threads(), len(me.children())) == (fds, threads, children)


def test_enter_a_process_started_by_unshare():
    outer = subprocess.Popen(
        [
            "unshare",
            "--fork",
            "--pid",
            "--mount-proc",
            "--uts",
            "--ipc",
            "--net",
            "sh",
            "-c",
            "hostname from-unshare; exec sleep 60",
        ]
    )
    try:
        deadline = time.monotonic() + 5
        target = None
        while target is None and time.monotonic() < deadline:
            kids = psutil.Process(outer.pid).children()
            if kids and kids[0].name() == "sleep":
                target = kids[0].pid
            time.sleep(0.01)
        assert target is not None
        r = nsfast.enter(
            target,
            ["sh", "-c", "hostname; ls /proc | grep -c '^[0-9]'; readlink /proc/self/ns/net"],
            capture_output=True,
            text=True,
            check=True,
        )
        name, nprocs, net = r.stdout.split()
        assert name == "from-unshare"
        assert int(nprocs) <= 4  # sleep, sh, ls, grep: only that namespace's processes
        assert net == f"net:[{nsfast.namespaces(target)['net']}]"
        only_uts = nsfast.enter(target, ["hostname"], namespaces=["uts"], capture_output=True, text=True)
        assert only_uts.stdout == "from-unshare\n"
    finally:
        if target is not None:
            psutil.Process(target).kill()  # unshare --fork then exits, reaping it
        else:
            outer.kill()
        outer.wait(10)
    with pytest.raises(ProcessLookupError):
        nsfast.enter(target, ["true"])


# -- the CLI --------------------------------------------------------------------------------


def cli(*args, check=False, **kw):
    return subprocess.run(
        [sys.executable, "-m", "nsfast", *args], capture_output=True, text=True, check=check, timeout=60, **kw
    )


def test_cli_detached_container_walkthrough(busybox_root):
    name = f"t{os.getpid()}"
    r = cli(
        "run",
        "-d",
        "--name",
        name,
        "--rootfs",
        busybox_root,
        "--hostname",
        "bb",
        "--setenv",
        "PATH",
        "/bin",
        "--",
        "tail",
        "-f",
        "/dev/null",
        check=True,
    )
    assert r.stdout.strip() == name
    try:
        with open(f"/run/nsfast/{name}/state.json") as f:
            state = json.load(f)
        pid = state["pid"]
        assert psutil.Process(pid).cmdline()[-4:] == ["--", "tail", "-f", "/dev/null"]  # nsfast-init
        ps = cli("ps", check=True).stdout.splitlines()
        row = [l for l in ps if l.startswith(name + " ")]
        assert row and str(pid) in row[0] and "running" in row[0]
        r = cli("exec", name, "--", "sh", "-c", "hostname; ps -o pid,args", check=True)
        lines = r.stdout.splitlines()
        assert lines[0] == "bb"
        assert lines[3].split(None, 1) == ["2", "tail -f /dev/null"]
        assert cli("exec", name, "--", "sh", "-c", "exit 3").returncode == 3
        # `nsfast ns` of the main process and an exec'd one: every namespace equal.
        execd = subprocess.Popen([sys.executable, "-m", "nsfast", "exec", name, "--", "sleep", "30"])
        try:
            deadline = time.monotonic() + 30
            sleeper = None
            while sleeper is None and time.monotonic() < deadline:
                sleeper = next(
                    (
                        p.pid
                        for p in psutil.process_iter(["cmdline"])
                        if p.info["cmdline"] == ["sleep", "30"] and p.pid != execd.pid
                    ),
                    None,
                )
                time.sleep(0.01)
            assert sleeper is not None
            table = cli("ns", str(pid), str(sleeper), check=True).stdout.splitlines()
            assert table[0].split()[0] == "TYPE"
            body = {l.split()[0]: l.split() for l in table[1:]}
            assert all(row[-1] == "same" for row in body.values()), table
            vs_host = cli("ns", str(pid), str(os.getpid()), check=True).stdout
            assert "differs" in vs_host
        finally:
            execd.kill()
            execd.wait()
    finally:
        r = cli("stop", "-t", "0.5", name)
    assert r.returncode == 0 and name in r.stdout
    assert not os.path.exists(f"/run/nsfast/{name}")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert all(not os.path.exists(p) for p in state["cgroup_paths"])


def test_cli_reports_stale_state():
    name = f"stale{os.getpid()}"
    d = f"/run/nsfast/{name}"
    os.makedirs(d)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(f"{d}/state.json", "w") as f:
        json.dump(
            {
                "name": name,
                "pid": dead.pid,
                "start_time": 1,
                "command": ["sleep", "1"],
                "created": time.time(),
                "env": {},
                "cwd": "/",
                "cgroup_paths": [],
                "namespaces": [],
            },
            f,
        )
    try:
        row = [l for l in cli("ps", check=True).stdout.splitlines() if l.startswith(name + " ")]
        assert row and "stale" in row[0]
        r = cli("exec", name, "--", "true")
        assert r.returncode == 125 and "stale" in r.stderr
        r = cli("stop", name)
        assert r.returncode == 0 and "stale" in r.stdout
        assert not os.path.exists(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_cli_errors():
    assert cli("exec", "no-such-container", "--", "true").returncode == 125
    assert cli("stop", "no-such-container").returncode == 1
    r = cli("run", "--name", "x", "--", "true")
    assert r.returncode == 2 and "--name needs -d" in r.stderr


ROOTLESS_SCRIPT = r"""
import json, os, nsfast
with nsfast.Container(hostname="rl") as c:
    r = c.exec(["sh", "-c", "id -u; hostname"], capture_output=True, text=True, check=True)
    p = c.spawn(["sleep", "30"])
    same = nsfast.compare_namespaces(c.pid, p.pid)
    host_uid = os.stat(f"/proc/{p.pid}").st_uid
    p.kill(); p.wait()
    print(json.dumps({"out": r.stdout, "same": same, "host_uid": host_uid, "user_ns": c.namespaces()["user"] != nsfast.namespaces()["user"]}))
"""


@pytest.mark.skipif(
    not (os.path.exists("/usr/bin/python3") and shutil.which("setpriv")),
    reason="needs /usr/bin/python3 and setpriv to run as an unprivileged user",
)
def test_rootless_container_exec_joins_the_user_namespace_first():
    pkg = os.path.dirname(os.path.dirname(nsfast.__file__))
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", ROOTLESS_SCRIPT],
        env={"PYTHONPATH": pkg, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["out"] == "0\nrl\n"
    assert res["user_ns"] and all(res["same"].values()), res
    assert res["host_uid"] == 65534


def test_exec_joins_a_time_namespace():
    # The exec helper is a process of its own (it shares no memory with the caller), so it can
    # setns() into a time namespace, which then holds for the process it forks.
    with nsfast.Container(namespaces=nsfast.DEFAULT_NAMESPACES + ("time",), stop_timeout=1) as c:
        theirs, ours = c.namespaces()["time"], nsfast.namespaces()["time"]
        assert theirs != ours
        r = c.exec(["readlink", "/proc/self/ns/time"], capture_output=True, text=True, check=True)
        assert r.stdout == f"time:[{theirs}]\n"
        r = nsfast.enter(c.pid, ["hostname"], namespaces=["uts", "mnt"], capture_output=True, text=True)
        assert r.returncode == 0


def test_mount_targets_in_a_rootfs_resolve_inside_it(busybox_root, tmp_path):
    # An absolute symlink in the rootfs must lead to the rootfs's /etc, not the host's.
    root = tmp_path / "root"
    shutil.copytree(busybox_root, root, symlinks=True)
    os.symlink("/etc", root / "data")
    (tmp_path / "payload").mkdir()
    (tmp_path / "payload" / "marker").write_text("bound\n")
    r = nsfast.run(
        ["sh", "-c", "cat /etc/marker; ls /data/"],
        rootfs=str(root),
        env={"PATH": "/bin"},
        mounts=[nsfast.Bind(str(tmp_path / "payload"), "/data")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout == "bound\nmarker\n", r
    os.rmdir(root / "tmp")
    os.symlink("/var", root / "tmp")
    with pytest.raises(ValueError, match="symlink at /tmp"):
        nsfast.run(["true"], rootfs=str(root))


# -- exec never exposes the caller -----------------------------------------------------------

# Runs in the container as root inside while the caller execs in a loop. Every process it sees
# (but itself and the container's init) is probed: its environ for the marker that only the
# caller's environment holds, its exe for a file that is not the container's, and, where its
# exe cannot be read (a process not dumpable, or not ours), /proc/PID/mem and PTRACE_SEIZE.
# What works on a process of the caller (marker in environ, exe outside) is a finding.
ATTACKER = r"""
import ctypes, json, os, sys, time
marker, seconds = sys.argv[1].encode(), float(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH, WALL = 0x4206, 0x4207, 17, 0x40000000
me = os.getpid()
def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
def exe(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
def callers(pid, e):
    env = read(f"/proc/{pid}/environ")
    outside = e is not None and (e.endswith(" (deleted)") or not os.path.exists(e))
    return (env is not None and marker in env) or outside
findings, probed, pids = [], 0, set()
print("ready", flush=True)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (me, 1):
            continue
        pid = int(name)
        pids.add(pid)
        e = exe(pid)
        if callers(pid, e):
            findings.append(["environ/exe", pid, e])
        if e is not None:
            continue  # readable: a process of the container itself
        probed += 1
        try:
            os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
            if callers(pid, exe(pid)):
                findings.append(["mem", pid, exe(pid)])
        except OSError:
            pass
        if libc.ptrace(PTRACE_SEIZE, pid, None, None) == 0:
            if callers(pid, exe(pid)):
                findings.append(["ptrace", pid, exe(pid)])
            libc.ptrace(PTRACE_INTERRUPT, pid, None, None)
            try:
                os.waitpid(pid, WALL)
            except ChildProcessError:
                pass
            libc.ptrace(PTRACE_DETACH, pid, None, None)
print(json.dumps({"findings": findings[:10], "n": len(findings), "probed": probed, "pids": len(pids)}), flush=True)
"""

# The caller (its own interpreter, so the marker is in the environment it started with, which
# /proc/PID/environ shows): a container, the attacker in it, two threads exec'ing meanwhile.
ATTACK_CALLER = r"""
import json, os, sys, threading, nsfast
attacker, seconds, fields = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with nsfast.Container(stop_timeout=1, **fields) as c:
    a = c.spawn(["python3", "-c", attacker, os.environ["NSFAST_TEST_MARKER"], seconds], stdout=nsfast.PIPE)
    assert a.stdout.readline() == b"ready\n"
    done, execs, errors = threading.Event(), [0], []
    def loop():
        try:
            while not done.is_set():
                c.exec(["true"], check=True)
                execs[0] += 1
        except BaseException as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    report = a.stdout.read()
    done.set()
    for t in threads:
        t.join()
    a.wait()
    print(json.dumps(dict(json.loads(report), execs=execs[0], errors=errors)))
"""

CALLERS = {
    "root": ([], {}),
    "root-without-userns": ([], {"namespaces": ["mnt", "pid", "uts", "ipc", "net", "cgroup"]}),
    "rootless": (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], {}),
}


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_exec_never_exposes_the_caller(caller):
    """Attack: a root process in the container reads the environ/exe of, opens /proc/PID/mem of
    and PTRACE_SEIZEs every process it sees while the caller execs (before: the exec helper
    was a CLONE_VM child of the caller, i.e. the caller's memory, fds and environment)."""
    prefix, fields = CALLERS[caller]
    if prefix and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to run as an unprivileged user")
    marker = f"nsfast-marker-{os.urandom(8).hex()}"
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": PYTHON_SRC,
        "NSFAST_TEST_MARKER": marker,
        **(CGROUP_ENV if not prefix else {}),
    }
    p = subprocess.run(
        [*prefix, "/usr/bin/python3", "-c", ATTACK_CALLER, ATTACKER, "3", json.dumps(fields)],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        cwd="/",
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.splitlines()[-1])
    assert res["errors"] == [] and res["execs"] >= 20, res
    assert res["n"] == 0, res
    assert res["probed"] > 0, res  # it saw exec'd processes before their exec (not dumpable)


def test_exec_joins_the_user_namespace_the_container_had_at_start():
    """Attack: pid 1 makes a user namespace of its own; exec'd processes must be joined into
    the container's (held since start), not pid 1's new one."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    # init=False: the command is pid 1 (nsfast-init never makes namespaces).
    c = nsfast.Container(["sh", "-c", "exec unshare -U sleep 1000"], seccomp=None, stop_timeout=0.2, init=False)
    with c:
        at_start = c.exec_namespaces()["user"]
        assert wait_until(lambda: c.namespaces()["user"] != at_start, 10)
        r = c.exec(["readlink", "/proc/self/ns/user"], capture_output=True, text=True, check=True)
        assert r.stdout == f"user:[{at_start}]\n"
        assert r.stdout != f"user:[{c.namespaces()['user']}]\n"


def exec_cgroups():
    mine = f"sb-{os.getpid()}-*"
    return sorted(
        glob.glob(f"/sys/fs/cgroup/unified/nsfast/{mine}/exec-*/") + glob.glob(f"/sys/fs/cgroup/nsfast/{mine}/exec-*/")
    )


def sleeping(seconds):
    """Live `sleep SECONDS` processes (the shells that started them not counted)."""
    return [p for p in running_with_cmdline(f"sleep {seconds}") if p.info["cmdline"] == ["sleep", str(seconds)]]


def test_exec_timeout_kills_the_whole_tree_and_a_normal_exit_does_not():
    with nsfast.Container(stop_timeout=1) as c:
        with pytest.raises(subprocess.TimeoutExpired):
            c.exec(["sh", "-c", "sleep 1001 & sleep 1001 & wait"], timeout=1)
        assert sleeping(1001) == []
        # kill() of an exec's Process ends its tree too.
        p = c.spawn(["sh", "-c", "sleep 1003 & sleep 1003 & wait"])
        assert wait_until(lambda: len(sleeping(1003)) == 2, 10)
        p.kill()
        p.wait()
        assert wait_until(lambda: sleeping(1003) == [], 5)
        # A normal exit leaves what the exec started running (docker exec) ...
        c.exec(["sh", "-c", "sleep 1002 >/dev/null 2>&1 &"], check=True)
        assert wait_until(lambda: len(sleeping(1002)) == 1, 5)  # (its fork may not have exec'd yet)
        (left,) = sleeping(1002)
        assert len(exec_cgroups()) == 1  # its cgroup, still populated
        # ... and an emptied exec cgroup goes with the next exec.
        c.exec(["sh", "-c", "kill $(pidof sleep)"], check=True)
        assert wait_until(lambda: not psutil.pid_exists(left.pid), 5)  # killed and reaped by the init
        c.exec(["true"], check=True)
        assert exec_cgroups() == []
        c.exec(["sh", "-c", "sleep 1004 >/dev/null 2>&1 &"], check=True)
        assert len(exec_cgroups()) == 1
    # Stopping the container ends the rest and removes every cgroup, the exec's first.
    assert sleeping(1004) == []
    assert exec_cgroups() == [] and sandbox_cgroups() == []


@pytest.mark.parametrize(
    "cwd",
    [f"/proc/self/fd/{n}" for n in range(10)] + ["/proc/self/cwd", "/proc/self/root", "/proc/1/root", "/proc/1/cwd"],
)
def test_exec_refuses_a_magic_link_cwd(cwd, tmp_path):
    """Attack (CVE-2024-21626): a cwd through one of the exec's own fds (or another process's
    root/cwd link) would land in a host directory; it must be refused, not resolved."""
    with nsfast.Container(stop_timeout=0.2) as c:
        for start in (c.exec, lambda *a, **k: nsfast.enter(c.pid, *a, **k)):
            with pytest.raises(nsfast.SpawnError) as err:
                start(["sh", "-c", f"touch {tmp_path}/ran; pwd"], cwd=cwd, capture_output=True, text=True)
            assert err.value.step == "chdir" and err.value.errno in (40, 2, 20), (
                err.value
            )  # ELOOP (ENOENT/ENOTDIR: no such fd)
        # A symlink a container process planted to a magic link is refused the same way.
        c.exec(["sh", "-c", f"ln -s {cwd} /tmp/planted"], check=True)
        with pytest.raises(nsfast.SpawnError) as err:
            c.exec(["sh", "-c", f"touch {tmp_path}/ran; pwd"], cwd="/tmp/planted")
        assert err.value.step == "chdir"
    assert not os.path.exists(tmp_path / "ran")


def test_container_fds_are_released_at_stop():
    before = sorted(os.listdir("/proc/self/fd"))
    c = nsfast.Container(stop_timeout=0.2).start()
    assert len(os.listdir("/proc/self/fd")) > len(before)  # the namespaces and root it holds
    c.exec(["true"], check=True)
    c.stop()
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_an_exec_gets_the_containers_rlimit_nproc():
    """An exec'd process shares the container's process bound (RLIMIT_NPROC = the pids limit,
    counted in its user namespace), so a fork bomb through exec is contained even without a
    cgroup, as one in the main process is."""
    probe = ["python3", "-c", "import resource; print(*resource.getrlimit(resource.RLIMIT_NPROC))"]
    with nsfast.Container(stop_timeout=0.1, limits=nsfast.Limits(pids=77)) as c:
        r = c.exec(probe, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "77 77\n"), r.stderr


def test_enter_runs_its_command_under_the_default_filter():
    """enter() once ran its command without any seccomp filter: joined into a sandbox's
    namespaces, the sandbox's own processes (same user namespace, same uid) could ptrace it
    once it exec'd and drive an unfiltered process. The default filter applies now, unless
    seccomp=None asks for an nsenter-like command."""
    with nsfast.Container() as c:
        on = nsfast.enter(c.pid, ["grep", "^Seccomp:", "/proc/self/status"], capture_output=True, text=True)
        off = nsfast.enter(c.pid, ["grep", "^Seccomp:", "/proc/self/status"], capture_output=True, text=True,
                           seccomp=None)  # fmt: skip
        unshare = nsfast.enter(c.pid, ["unshare", "-U", "true"], capture_output=True, text=True)
    assert (on.stdout.split(), off.stdout.split()) == (["Seccomp:", "2"], ["Seccomp:", "0"])
    assert unshare.returncode != 0 and "Operation not permitted" in unshare.stderr


#: A hostile container's program: SIGSTOP every process that is not (yet) its own: one
#: joining it is non-dumpable until it execs (its /proc entry is not owned by the
#: container's root), and the container's uid, so signalable, from its setresuid on.
_STOPPER = r"""
import os, signal
me = os.getpid()
print("ready", flush=True)
while True:
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (1, me):
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid == 0:
                continue
        except OSError:
            continue
        for _ in range(100000):
            try:
                os.kill(int(name), signal.SIGSTOP)
                break
            except PermissionError:
                continue
            except ProcessLookupError:
                break
"""


def test_a_container_that_stops_the_process_joining_it_cannot_hang_the_caller():
    """(Found by an audit.) The process an exec (or `enter`) starts is the container's uid from its setresuid to its execve:
    a program of the container can SIGSTOP it there, and the caller waited for its exec
    forever (exec's timeout starts at exec, and the wait retried EINTR, so not even Ctrl-C
    ended it). The caller now sees it stopped, kills it and raises a SpawnError saying so;
    the container still serves execs that are not stopped, and nothing is left behind."""
    with nsfast.Container() as c:
        stopper = c.spawn(["/usr/bin/python3", "-c", _STOPPER], stdout=subprocess.PIPE)
        assert stopper.stdout.readline() == b"ready\n"
        errors = []
        for i in range(20):
            try:
                if i % 2:
                    nsfast.enter(c.pid, ["/bin/true"], timeout=2)
                else:
                    c.exec(["/bin/true"], timeout=2)
            except nsfast.SpawnError as e:
                errors.append(e)
                if len(errors) == 3:
                    break
            except nsfast.TimeoutExpired:
                pass  # stopped once it had exec'd: the container's own process, which the timeout ends
        if not errors:
            pytest.skip("the stopper never caught a joining process in 20 joins on this machine")
        for e in errors:
            assert "stopped" in str(e) and "before it could exec" in str(e), e
        stopper.kill()
        stopper.wait()
        stopper.stdout.close()
        assert c.exec(["/bin/true"]).returncode == 0


#: A hostile main process: it opens the stdout and stderr of every process that appears in
#: the container (the same uid as an exec'd one, which is dumpable once it exec'd).
_GRABBER = r"""
import os, time
held, seen = [], set(os.listdir("/proc"))
print("ready", flush=True)
while True:
    for p in set(os.listdir("/proc")) - seen:
        try:
            held += [os.open(f"/proc/{p}/fd/1", os.O_WRONLY), os.open(f"/proc/{p}/fd/2", os.O_WRONLY)]
        except OSError:
            continue
        seen.add(p)
    time.sleep(0.0005)
"""


def test_a_container_holding_an_execs_pipes_cannot_keep_the_caller_reading():
    """(Found by an audit.) exec's communicate read its pipes to EOF, and the container's
    main process, holding their write ends (opened through /proc/PID/fd), kept them open:
    the caller waited until its timeout, or for ever, and lost the result. Once the exec'd
    process exited, what its pipes hold is taken and nothing more waited for (as docker
    exec does)."""
    with nsfast.Container(["/usr/bin/python3", "-c", _GRABBER]).start(stdout=subprocess.PIPE) as c:
        assert c.process.stdout.readline() == b"ready\n"
        for _ in range(3):
            r = c.exec(["sh", "-c", "sleep 0.2; echo out; echo err >&2"], capture_output=True, timeout=30)
            assert (r.returncode, r.stdout, r.stderr) == (0, b"out\n", b"err\n")
        c.process.stdout.close()
