"""Containers, exec via setns, enter(), and the detached-container CLI: the seed's
`docker exec` walkthrough as tests."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

import nsfast

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def busybox_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bbroot"))
    subprocess.run([os.path.join(HERE, "make-busybox-rootfs.sh"), root], check=True, stdout=subprocess.DEVNULL)
    return root


def inode_table(pid):
    return nsfast.namespaces(pid)


def test_exec_joins_every_namespace_of_the_container(busybox_root):
    with nsfast.Container(["tail", "-f", "/dev/null"], rootfs=busybox_root, hostname="box",
                          env={"PATH": "/bin"}, stop_timeout=0.1) as c:
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
    with nsfast.Container(["tail", "-f", "/dev/null"], rootfs=busybox_root, hostname="box", cwd="/tmp",
                          env={"PATH": "/bin", "MARK": "container"}, stop_timeout=0.1) as c:
        r = c.exec(["sh", "-c", "hostname; pwd; echo $MARK; ls /; ps -o pid,args"], capture_output=True, text=True,
                   check=True)
        lines = r.stdout.splitlines()
        assert lines[0] == "box"
        assert lines[1] == "/tmp"
        assert lines[2] == "container"
        assert sorted(lines[3:10]) == sorted(os.listdir(busybox_root))
        ps = lines[10:]
        assert ps[1].split(None, 1) == ["1", "tail -f /dev/null"], ps
        assert len(ps) <= 4, ps  # header, tail, sh, ps: nothing of the host
        # env= and cwd= override the container's.
        r = c.exec(["sh", "-c", "pwd; echo $MARK"], env={"PATH": "/bin", "MARK": "mine"}, cwd="/", capture_output=True,
                   text=True)
        assert r.stdout == "/\nmine\n"


def test_exec_joins_the_container_cgroup():
    with nsfast.Container(limits=nsfast.Limits(pids=32)) as c:
        p = c.spawn(["sleep", "30"])
        try:
            with open(f"/proc/{c.pid}/cgroup") as a, open(f"/proc/{p.pid}/cgroup") as b:
                main, execd = a.read(), b.read()
            assert main == execd
            assert f"/sb-{os.getpid()}-" in main
        finally:
            p.kill()
            p.wait()


def test_idle_init_is_pid_1_and_reaps():
    with nsfast.Container() as c:
        r = c.exec(["sh", "-c", "sh -c 'sleep 0.1 &'; sleep 0.4; cat /proc/1/cmdline | tr '\\0' ' '; "
                                "cat /proc/[0-9]*/stat | cut -d' ' -f3"], capture_output=True, text=True, check=True)
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
    stubborn = nsfast.Container(["tail", "-f", "/dev/null"]).start()  # pid 1 without a handler ignores SIGTERM
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
            results = list(pool.map(lambda i: c.exec(["sh", "-c", f"echo {i} $(hostname)"], capture_output=True,
                                                     text=True), range(50)))
    assert [r.returncode for r in results] == [0] * 50
    assert [r.stdout for r in results] == [f"{i} conc\n" for i in range(50)]


def test_500_execs_leak_nothing():
    me = psutil.Process()
    with nsfast.Container() as c:
        for _ in range(20):
            c.exec(["true"])
        fds, threads, children = me.num_fds(), me.num_threads(), len(me.children())
        for _ in range(500):
            assert c.exec(["true"]).returncode == 0
        assert (me.num_fds(), me.num_threads(), len(me.children())) == (fds, threads, children)


def test_enter_a_process_started_by_unshare():
    outer = subprocess.Popen(["unshare", "--fork", "--pid", "--mount-proc", "--uts", "--ipc", "--net",
                              "sh", "-c", "hostname from-unshare; exec sleep 60"])
    try:
        deadline = time.monotonic() + 5
        target = None
        while target is None and time.monotonic() < deadline:
            kids = psutil.Process(outer.pid).children()
            if kids and kids[0].name() == "sleep":
                target = kids[0].pid
            time.sleep(0.01)
        assert target is not None
        r = nsfast.enter(target, ["sh", "-c", "hostname; ls /proc | grep -c '^[0-9]'; readlink /proc/self/ns/net"],
                         capture_output=True, text=True, check=True)
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
    return subprocess.run([sys.executable, "-m", "nsfast", *args], capture_output=True, text=True, check=check,
                          timeout=60, **kw)


def test_cli_detached_container_walkthrough(busybox_root):
    name = f"t{os.getpid()}"
    r = cli("run", "-d", "--name", name, "--rootfs", busybox_root, "--hostname", "bb", "--setenv", "PATH", "/bin",
            "--", "tail", "-f", "/dev/null", check=True)
    assert r.stdout.strip() == name
    try:
        with open(f"/run/nsfast/{name}/state.json") as f:
            state = json.load(f)
        pid = state["pid"]
        assert psutil.Process(pid).cmdline() == ["tail", "-f", "/dev/null"]
        ps = cli("ps", check=True).stdout.splitlines()
        row = [l for l in ps if l.startswith(name + " ")]
        assert row and str(pid) in row[0] and "running" in row[0]
        r = cli("exec", name, "--", "sh", "-c", "hostname; ps -o pid,args", check=True)
        lines = r.stdout.splitlines()
        assert lines[0] == "bb"
        assert lines[2].split(None, 1) == ["1", "tail -f /dev/null"]
        assert cli("exec", name, "--", "sh", "-c", "exit 3").returncode == 3
        # `nsfast ns` of the main process and an exec'd one: every namespace equal.
        execd = subprocess.Popen([sys.executable, "-m", "nsfast", "exec", name, "--", "sleep", "30"])
        try:
            deadline = time.monotonic() + 30
            sleeper = None
            while sleeper is None and time.monotonic() < deadline:
                sleeper = next((p.pid for p in psutil.process_iter(["cmdline"])
                                if p.info["cmdline"] == ["sleep", "30"] and p.pid != execd.pid), None)
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
        json.dump({"name": name, "pid": dead.pid, "start_time": 1, "command": ["sleep", "1"], "created": time.time(),
                   "env": {}, "cwd": "/", "cgroup_paths": [], "namespaces": []}, f)
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


@pytest.mark.skipif(not (os.path.exists("/usr/bin/python3") and shutil.which("setpriv")),
                    reason="needs /usr/bin/python3 and setpriv to run as an unprivileged user")
def test_rootless_container_exec_joins_the_user_namespace_first():
    pkg = os.path.dirname(os.path.dirname(nsfast.__file__))
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                        ROOTLESS_SCRIPT], env={"PYTHONPATH": pkg, "PATH": os.environ["PATH"]}, capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["out"] == "0\nrl\n"
    assert res["user_ns"] and all(res["same"].values()), res
    assert res["host_uid"] == 65534


def test_exec_refuses_a_time_namespace_instead_of_skipping_it():
    with nsfast.Container(namespaces=nsfast.DEFAULT_NAMESPACES + ("time",), stop_timeout=1) as c:
        with pytest.raises(nsfast.ContainerError, match="time namespace"):
            c.exec(["true"])
        r = nsfast.enter(c.pid, ["hostname"], namespaces=["uts", "mnt"], capture_output=True, text=True)
        assert r.returncode == 0


def test_mount_targets_in_a_rootfs_resolve_inside_it(busybox_root, tmp_path):
    # An absolute symlink in the rootfs must lead to the rootfs's /etc, not the host's.
    root = tmp_path / "root"
    shutil.copytree(busybox_root, root, symlinks=True)
    os.symlink("/etc", root / "data")
    (tmp_path / "payload").mkdir()
    (tmp_path / "payload" / "marker").write_text("bound\n")
    r = nsfast.run(["sh", "-c", "cat /etc/marker; ls /data/"], rootfs=str(root), env={"PATH": "/bin"},
                   mounts=[nsfast.Bind(str(tmp_path / "payload"), "/data")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "bound\nmarker\n", r
    os.rmdir(root / "tmp")
    os.symlink("/var", root / "tmp")
    with pytest.raises(ValueError, match="symlink at /tmp"):
        nsfast.run(["true"], rootfs=str(root))
