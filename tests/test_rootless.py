"""Rootless sandboxes. The suite runs as root, so each test runs a small script as `nobody`
(uid/gid 65534, no supplementary groups) through setpriv, with the system python importing
nsfast from the source tree (the native module is abi3; the venv lives under /root, 0700)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap

import psutil
import pytest

import nsfast
from conftest import (
    DEV_PROBE,
    PY_ERRNO,
    PYTHON_SRC,
    check_dev_nodes,
    mount_table,
    running_with_cmdline,
    suite,
    wait_until,
)

pytestmark = suite

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
SETPRIV = shutil.which("setpriv")

# Every script: strict warnings as in pytest.ini, except the expected one: rootless without a
# delegated cgroup, sandboxes run without cgroup limits.
PRELUDE = """\
import json, os, sys, warnings
warnings.simplefilter("error")
import nsfast
warnings.filterwarnings("ignore", category=nsfast.CgroupWarning)
assert (os.getuid(), os.geteuid(), os.getgid(), os.getgroups()) == (65534, 65534, 65534, []), "not nobody"
def out(value):
    print(json.dumps(value), flush=True)
"""


def _userns_disabled_reason():
    for path, off in (("/proc/sys/user/max_user_namespaces", "0"), ("/proc/sys/kernel/unprivileged_userns_clone", "0")):
        try:
            with open(path) as f:
                if f.read().strip() == off:
                    return f"unprivileged user namespaces are disabled ({path} = {off})"
        except FileNotFoundError:
            pass
    return None


@pytest.fixture(scope="module", autouse=True)
def _rootless_prerequisites():
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"rootless tests need {SYSTEM_PYTHON} (a python nobody can run)")
    if SETPRIV is None:
        pytest.skip("rootless tests need setpriv (util-linux) to drop to nobody")
    reason = _userns_disabled_reason()
    if reason:
        pytest.skip(reason)


def _command():
    env = ["env", "-i", f"PYTHONPATH={PYTHON_SRC}", "PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
    drop = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return env + drop + [SYSTEM_PYTHON, "-c"]


def as_nobody(body: str, timeout: float = 60):
    """Run PRELUDE + body as nobody; the JSON value of each line it prints via out()."""
    p = subprocess.run(
        _command() + [PRELUDE + textwrap.dedent(body)], capture_output=True, text=True, timeout=timeout, cwd="/"
    )
    assert p.returncode == 0, f"script as nobody failed ({p.returncode}):\n{p.stderr}"
    return [json.loads(line) for line in p.stdout.splitlines()]


@pytest.fixture
def nobody_dir():
    """A host directory owned by nobody (pytest's tmp_path is under a 0700 root dir)."""
    d = tempfile.mkdtemp(prefix="nsfast-rootless-")
    os.chmod(d, 0o755)
    with open(os.path.join(d, "hello"), "w") as f:
        f.write("from the host\n")
    for p in (d, os.path.join(d, "hello")):
        os.chown(p, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d)


def test_rootless_caller_is_root_inside():
    [r] = as_nobody("""
        r = nsfast.run(["sh", "-c", "id -u; id -g; echo $$"], capture_output=True, text=True)
        out([r.returncode, r.stdout, r.stderr])
    """)
    assert r == [0, "0\n0\n2\n", ""]  # pid 1 is nsfast-init


def test_rootless_sandbox_runs_as_the_caller_on_the_host_in_a_new_user_namespace():
    proc = subprocess.Popen(
        _command()
        + [
            PRELUDE
            + textwrap.dedent("""
        p = nsfast.spawn(["sleep", "100"])
        out(p.pid)
        sys.stdin.readline()
        p.kill()
        out(p.wait())
    """)
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        pid = json.loads(proc.stdout.readline())
        sandbox = psutil.Process(pid)
        uids, gids = sandbox.uids(), sandbox.gids()
        ns = nsfast.namespaces(pid)
        host = nsfast.namespaces()
    finally:
        out, err = proc.communicate("done\n", timeout=30)
    assert proc.returncode == 0, err
    assert tuple(uids) == (NOBODY,) * 3
    assert tuple(gids) == (NOBODY,) * 3
    assert ns["user"] != host["user"], "rootless sandboxes need (and get) a user namespace"
    assert {n for n in nsfast.NAMESPACES if ns[n] != host[n]} == set(nsfast.DEFAULT_NAMESPACES) | {"user"}
    assert json.loads(out) == -9


def test_rootless_uid_is_mapped_to_the_caller():
    [r] = as_nobody("""
        r = nsfast.run(["sh", "-c", "id -u; id -g; cat /proc/self/uid_map"], uid=1000, gid=1000,
                       capture_output=True, text=True)
        out([r.returncode, r.stdout.split()])
    """)
    assert r == [0, ["1000", "1000", "1000", "65534", "1"]]


def test_rootless_hostname_pid_and_network_are_isolated():
    [r] = as_nobody("""
        r = nsfast.run(["sh", "-c", "hostname; echo $$; tail -n +3 /proc/net/dev | cut -d: -f1"],
                       hostname="rootless-box", capture_output=True, text=True)
        out([r.returncode, r.stdout.split(), r.stderr])
    """)
    assert r == [0, ["rootless-box", "2", "lo"], ""]


def test_rootless_writes_to_root_fail_with_erofs():
    [r] = as_nobody("""
        r = nsfast.run(["python3", "-c",
                        "import errno\\ntry:\\n open('/x', 'w')\\nexcept OSError as e:\\n print(errno.errorcode[e.errno])"],
                       capture_output=True, text=True)
        out([r.returncode, r.stdout.strip(), r.stderr])
    """)
    assert r == [0, "EROFS", ""]


def test_rootless_binds_work(nobody_dir):
    [ro, rw] = as_nobody(f"""
        d = {nobody_dir!r}
        ro = nsfast.run(["sh", "-c", "cat /mnt/hello; touch /mnt/new"], mounts=[nsfast.Bind(d, "/mnt")],
                        capture_output=True, text=True)
        out([ro.returncode, ro.stdout, "Read-only file system" in ro.stderr])
        rw = nsfast.run(["sh", "-c", "echo written > /mnt/new"], mounts=[nsfast.Bind(d, "/mnt", readonly=False)],
                        capture_output=True, text=True)
        out([rw.returncode, rw.stderr])
    """)
    assert ro == [1, "from the host\n", True]
    assert rw == [0, ""]
    new = os.path.join(nobody_dir, "new")
    with open(new) as f:
        assert f.read() == "written\n"
    assert (os.stat(new).st_uid, os.stat(new).st_gid) == (NOBODY, NOBODY)


def test_rootless_tmpfs_and_tmp_work():
    [r] = as_nobody("""
        r = nsfast.run(["sh", "-c", "ls -A /tmp; echo a > /tmp/a && echo b > /srv/b && cat /tmp/a /srv/b"],
                       mounts=[nsfast.Tmpfs("/srv", size="1M")], capture_output=True, text=True)
        out([r.returncode, r.stdout, r.stderr])
    """)
    assert r == [0, "a\nb\n", ""]


def test_rootless_capabilities_are_dropped():
    [r] = as_nobody("""
        r = nsfast.run(["grep", "-E", "^(CapEff|CapBnd|NoNewPrivs)", "/proc/self/status"], capture_output=True, text=True)
        out([r.returncode, r.stdout.split()])
    """)
    assert r == [0, ["CapEff:", "0000000000000000", "CapBnd:", "0000000000000000", "NoNewPrivs:", "1"]]


def test_rootless_missing_command_raises_spawn_error():
    [r] = as_nobody("""
        try:
            nsfast.run(["nsfast-no-such-command"])
            out("no error")
        except nsfast.SpawnError as e:
            out([e.errno, e.step, e.filename])
    """)
    assert r == [2, "exec", "nsfast-no-such-command"]


def test_rootless_timeout_kills_the_whole_sandbox():
    tag = "100.4242"
    [r] = as_nobody(f"""
        import subprocess, time
        t = time.monotonic()
        try:
            nsfast.run(["sh", "-c", "sleep {tag} & sleep {tag}"], timeout=0.3)
            out("no timeout")
        except subprocess.TimeoutExpired:
            out(time.monotonic() - t)
    """)
    assert isinstance(r, float) and r < 5
    assert wait_until(lambda: not running_with_cmdline(f"sleep {tag}"), timeout=1.0)


def test_rootless_zygote_tasks_are_isolated_and_unprivileged():
    """A rootless caller's zygote: each task is pid 2 of its own pid namespace, root of the
    zygote's user namespace without a capability, with a /tmp of its own; call() works; both
    network modes start."""
    [first, second, called, none] = as_nobody("""
        z = nsfast.Zygote()
        code = (
            "import os, json; before = os.listdir('/tmp'); open('/tmp/x', 'w').close()\\n"
            "st = open('/proc/self/status').read()\\n"
            "print(json.dumps([os.getpid(), os.getuid(), st.split('CapEff:')[1].split()[0],"
            " os.readlink('/proc/self/ns/pid'), before]))"
        )
        for _ in range(2):
            r = z.run_python(code, text=True)
            out(json.loads(r.stdout) if r.returncode == 0 else r.stderr)
        out(z.call("os:getcwd"))
        z.close()
        z = nsfast.Zygote(network="none")
        out(z.run_python("import socket\\ntry:\\n socket.socket()\\nexcept OSError as e:\\n print(e.errno)").stdout.decode())
        z.close()
    """)
    assert first[:3] == [2, 0, "0000000000000000"] and first[4] == [], first
    # The first task's /tmp/x is not in the second's /tmp.
    assert second[:3] == [2, 0, "0000000000000000"] and second[4] == [], second
    assert first[3] != second[3], "two tasks shared a pid namespace"
    assert called == "/"
    assert none.strip() == "1"  # EPERM: no IP socket with network="none"


def test_rootless_overlay_rootfs_is_writable_and_the_lower_unchanged(nobody_dir):
    root = os.path.join(nobody_dir, "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy2("/bin/busybox", os.path.join(root, "bin", "busybox"))
    os.symlink("busybox", os.path.join(root, "bin", "sh"))
    with open(os.path.join(root, "marker"), "w") as f:
        f.write("lower\n")
    for dirpath, dirnames, filenames in os.walk(nobody_dir):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            os.lchown(name, NOBODY, NOBODY)
    [ro, ov, host] = as_nobody(f"""
        root = {root!r}
        ro = nsfast.run(["/bin/sh", "-c", "ls -d /proc/1 /tmp; echo x > /marker"], rootfs=root,
                        capture_output=True, text=True)
        out([ro.returncode, sorted(ro.stdout.split()), "Read-only file system" in ro.stderr])
        ov = nsfast.run(["/bin/sh", "-c", "echo upper >> /marker; /bin/busybox cat /marker; /bin/busybox rm /bin/sh"],
                        rootfs=root, overlay=True, capture_output=True, text=True)
        out([ov.returncode, ov.stdout, ov.stderr])
        host = nsfast.run(["sh", "-c", "echo top > /top; cat /top; (echo e >> /etc/hostname) 2>&1; echo p > /etc/nsfast-probe; id -u"],
                          overlay=True, capture_output=True, text=True)
        out([host.returncode, host.stdout.splitlines()])
    """)
    assert ro == [1, ["/proc/1", "/tmp"], True]
    assert ov == [0, "lower\nupper\n", ""]
    assert sorted(os.listdir(root)) == ["bin", "marker"] and os.path.islink(os.path.join(root, "bin", "sh"))
    with open(os.path.join(root, "marker")) as f:
        assert f.read() == "lower\n"
    # The host root, one overlay per directory: new top-level entries land in the sandbox's
    # tmpfs root; the host's root-owned files stay nobody's inside (each overlay's own top
    # directory is the sandbox's: a new /etc/nsfast-probe lands in its copy).
    assert host[0] == 0 and host[1][0] == "top" and "Permission denied" in host[1][1] and host[1][2] == "0"
    assert not os.path.exists("/top") and not os.path.exists("/etc/nsfast-probe")


def test_rootless_outputs_are_read_back(nobody_dir):
    root = os.path.join(nobody_dir, "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy2("/bin/busybox", os.path.join(root, "bin", "busybox"))
    os.symlink("busybox", os.path.join(root, "bin", "sh"))
    for dirpath, dirnames, filenames in os.walk(nobody_dir):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            os.lchown(name, NOBODY, NOBODY)
    [files] = as_nobody(f"""
        r = nsfast.run(["/bin/sh", "-c", "echo t > /tmp/t; echo o > /o; /bin/busybox ln -s /etc/passwd /tmp/l"],
                       rootfs={root!r}, overlay=True, outputs=["/tmp/*", "/o", "/bin/*"])
        out({{k: v.decode() for k, v in r.files.items()}})
    """)
    assert files == {"/tmp/t": "t\n", "/o": "o\n"}


def test_rootless_overlay_mount_commits_on_success(nobody_dir):
    [changes] = as_nobody(f"""
        ov = nsfast.Overlay({nobody_dir!r}, "/mnt", commit=True)
        r = nsfast.run(["sh", "-c", "echo new > /mnt/new; rm /mnt/hello"], mounts=[ov])
        out([r.returncode, r.changes])
    """)
    assert changes == [0, {"/mnt/hello": "deleted", "/mnt/new": "added"}]
    assert os.listdir(nobody_dir) == ["new"]
    assert os.stat(os.path.join(nobody_dir, "new")).st_uid == NOBODY


def test_rootless_overlays_are_all_closed_once_settled():
    """A rootless sandbox makes its overlays itself; the parent holds its mount namespace and
    its upper tmpfs until it was reaped, then the reaper closes them (rust/src/reaper.rs).
    Settled, nothing of them is left: in the process's fd table or the reaper's own."""
    [res] = as_nobody("""
        import os
        def fds(d):
            out = []
            for n in os.listdir(d):
                try:
                    out.append(os.readlink(f"{d}/{n}"))
                except FileNotFoundError:  # the listing's own directory fd
                    pass
            return sorted(out)
        def runs():
            r = nsfast.run(["sh", "-c", "echo x > /top; cat /top"], overlay=True, capture_output=True)
            assert (r.returncode, r.stdout) == (0, b"x\\n"), r
            p = nsfast.spawn(["sleep", "60"], overlay=True)
            p.kill()
            assert p.wait() == -9
        runs()
        nsfast.settle()
        [reaper] = [t for t in os.listdir("/proc/self/task")
                    if open(f"/proc/self/task/{t}/comm").read().strip() == "nsfast-reaper"]
        before = (fds("/proc/self/fd"), fds(f"/proc/self/task/{reaper}/fd"))
        for _ in range(10):
            runs()
        nsfast.settle()
        after = (fds("/proc/self/fd"), fds(f"/proc/self/task/{reaper}/fd"))
        out([before == after, len(before[1]), os.path.exists("/top")])
    """)
    assert res == [True, 1, False]


def test_rootless_overlay_top_directories_keep_the_host_modes():
    """Each host directory is an overlay of its own whose top directory is the sandbox's
    (the one owner a rootless child can give it); its mode is still the host's. /srv (or
    /opt) gets an unusual mode for the test, written back after."""
    probe = "/srv" if os.path.isdir("/srv") else "/opt"
    names = [n for n in ("etc", "usr", "var", probe[1:]) if os.path.isdir(f"/{n}") and not os.path.islink(f"/{n}")]
    saved = os.stat(probe).st_mode & 0o7777
    os.chmod(probe, 0o751)
    try:
        host = {n: oct(os.stat(f"/{n}").st_mode & 0o7777) for n in names}
        [inside] = as_nobody(f"""
            names = {names!r}
            r = nsfast.run(["stat", "-c", "%n %a"] + ["/" + n for n in names], overlay=True, capture_output=True, text=True)
            out(dict(l.split() for l in r.stdout.splitlines()))
        """)
    finally:
        os.chmod(probe, saved)
    assert {k.lstrip("/"): oct(int(v, 8)) for k, v in inside.items()} == host
    assert host[probe[1:]] == oct(0o751)


def test_rootless_overlay_cannot_copy_up_below_an_unmapped_owner():
    """The documented limit: overlayfs in the caller's user namespace cannot copy up a
    directory whose owner the namespace does not map (host root's), so a write below one
    fails with EOVERFLOW even where the mode allows it; the host is unchanged."""
    base = "/srv" if os.path.isdir("/srv") else "/opt"
    d = tempfile.mkdtemp(prefix="nsfast-rootless-", dir=base)
    try:
        os.chmod(d, 0o755)
        os.mkdir(os.path.join(d, "open"))
        os.chmod(os.path.join(d, "open"), 0o1777)
        [r] = as_nobody(f"""
            r = nsfast.run(["sh", "-c", "echo x > {d}/open/f"], overlay=True, capture_output=True, text=True)
            out([r.returncode, r.stderr])
        """)
        assert r[0] != 0 and "Value too large" in r[1]
        assert os.listdir(os.path.join(d, "open")) == []
    finally:
        shutil.rmtree(d)


def test_rootless_roots_in_place_and_pivoted_show_the_same_mounts_and_devices(nobody_dir):
    """A rootless caller's default root is the mount namespace's own copy of the host root;
    with more binds of host paths than that holds (20 here), or a `nsfast.Overlay`, the root
    is a clone stacked on / and pivoted to. Every way: /dev's nodes are the host's devices, a
    bind of a directory under a hidden one (nobody_dir is under /tmp) shows the host's files,
    and the mount table is the same bar the user's own mounts under /mnt."""
    many = ", ".join(f"nsfast.Bind({nobody_dir!r}, '/mnt/b{i}')" for i in range(20))
    variants = {
        "in place": f"[nsfast.Tmpfs('/mnt'), nsfast.Bind({nobody_dir!r}, '/mnt/b0')]",
        "20 binds": f"[nsfast.Tmpfs('/mnt'), {many}]",
        "overlay": f"[nsfast.Tmpfs('/mnt'), nsfast.Bind({nobody_dir!r}, '/mnt/b0'), nsfast.Overlay({nobody_dir!r}, '/mnt/o')]",
    }
    probe = PY_ERRNO + DEV_PROBE.replace(
        "print(json.dumps(out))",
        "out['hello'] = open('/mnt/b0/hello').read()\n"
        "out['mountinfo'] = open('/proc/self/mountinfo').read()\n"
        "print(json.dumps(out))",
    )
    script = "".join(
        f"r = nsfast.run(['python3', '-c', {probe!r}], mounts={mounts}, capture_output=True, text=True, timeout=60)\n"
        f"out([{name!r}, r.returncode, r.stdout, r.stderr])\n"
        for name, mounts in variants.items()
    )
    tables = {}
    for name, rc, stdout, stderr in as_nobody(script, timeout=120):
        assert rc == 0, f"{name}: {stderr}"
        res = json.loads(stdout)
        check_dev_nodes(res)
        assert res["hello"] == "from the host\n", name
        tables[name] = [row for row in mount_table(res["mountinfo"]) if not row[0].startswith("/mnt")]
    assert tables["in place"] == tables["20 binds"] == tables["overlay"]


def test_rootless_cli_exec_into_a_detached_container(nobody_dir):
    """`nsfast exec NAME` always failed for a rootless caller without a delegated cgroup
    (clone3 EACCES): it asked CLONE_INTO_CGROUP for the container's cgroup, the caller's own,
    whose cgroup.procs is root's."""
    state = os.path.join(nobody_dir, "state")
    [res] = as_nobody(f"""
        import subprocess
        env = dict(os.environ, NSFAST_STATE_DIR={state!r})
        cli = [sys.executable, "-m", "nsfast"]
        def sh(*argv):
            return subprocess.run(cli + list(argv), capture_output=True, text=True, env=env, timeout=60)
        a = sh("run", "-d", "--name", "rl", "--", "sleep", "100")
        b = sh("exec", "rl", "--", "sh", "-c", "echo hi; grep ^Seccomp: /proc/self/status")
        c = sh("stop", "-t", "0", "rl")
        out([a.returncode, a.stderr[-300:], b.returncode, b.stdout, b.stderr[-300:], c.returncode])
    """)
    assert res[0] == 0, res[1]
    assert (res[2], res[3].split()) == (0, ["hi", "Seccomp:", "2"]), res[4]
    assert res[5] == 0


def test_rootless_sys_is_its_own():
    """A fresh sysfs of its own network namespace (lo only), and no cgroup tree but its own:
    without a delegated cgroup it has none of its own, so /sys/fs/cgroup is empty (mounted
    afresh, its cgroup namespace's root would be the caller's cgroup and all below it).
    A zygote's task the same."""
    [r, t] = as_nobody("""
        r = nsfast.run(["sh", "-c", "ls /sys/class/net; echo --; ls /sys/fs/cgroup; echo --; "
                        "mkdir /sys/fs/cgroup/x 2>&1 || echo refused"], capture_output=True, text=True)
        out([r.returncode, r.stdout.split("--\\n"), r.stderr])
        with nsfast.Zygote() as z:
            t = z.run_python("import os; print(os.listdir('/sys/fs/cgroup'))", text=True)
        out([t.returncode, t.stdout, t.stderr])
    """)
    assert t == [0, "[]\n", ""], t
    assert r[0] == 0, r
    net, cgroup, mkdir = r[1]
    assert net.split() == ["lo"]
    assert cgroup.split() == []
    assert "refused" in mkdir
