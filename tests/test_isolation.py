"""What a sandbox isolates: namespaces, hostname, pids, network, file system, environment,
ids, capabilities, fds, no_new_privs, and its lifetime being tied to its parent."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import nsfast
from conftest import DEV_PROBE, PY_ERRNO, check_dev_nodes, mount_table, py, sh, suite

pytestmark = suite

NAMESPACE_SETS = [
    pytest.param(nsfast.DEFAULT_NAMESPACES, id="default"),
    pytest.param((), id="none"),
    *[pytest.param((n,), id=n) for n in nsfast.NAMESPACES],
    pytest.param(nsfast.NAMESPACES, id="all"),
]


def _status_fields(text: str) -> dict:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


# -- namespaces -------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", NAMESPACE_SETS)
def test_requested_namespaces_are_new_and_the_others_shared_as_seen_from_the_host(requested):
    host = nsfast.namespaces()
    assert set(host) == set(nsfast.NAMESPACES), "this kernel lacks a namespace type"
    with nsfast.spawn(["sleep", "100"], namespaces=requested) as p:
        try:
            inside = nsfast.namespaces(p.pid)
            shared = nsfast.compare_namespaces("self", p.pid)
        finally:
            p.kill()
    for name in nsfast.NAMESPACES:
        if name in requested:
            assert inside[name] != host[name], f"{name} was requested but is the host's"
        else:
            assert inside[name] == host[name], f"{name} was not requested but is new"
    assert shared == {n: n not in requested for n in nsfast.NAMESPACES}


@pytest.mark.parametrize("requested", NAMESPACE_SETS)
def test_requested_namespaces_are_new_and_the_others_shared_as_seen_from_inside(requested):
    host = nsfast.namespaces()
    script = "for n in " + " ".join(nsfast.NAMESPACES) + '; do echo "$n $(readlink /proc/self/ns/$n)"; done'
    r = sh(script, namespaces=requested)
    assert r.returncode == 0, r.stderr
    inside = {}
    for line in r.stdout.splitlines():
        name, link = line.split(" ", 1)
        m = re.fullmatch(rf"{name}:\[(\d+)\]", link)
        assert m, f"unexpected link {link!r} for {name}"
        inside[name] = int(m.group(1))
    assert {n for n in nsfast.NAMESPACES if inside[n] != host[n]} == set(requested)


def test_each_sandbox_gets_its_own_namespaces():
    with nsfast.spawn(["sleep", "100"]) as a, nsfast.spawn(["sleep", "100"]) as b:
        shared = nsfast.compare_namespaces(a.pid, b.pid)
        a.kill()
        b.kill()
    assert shared == {n: n not in nsfast.DEFAULT_NAMESPACES for n in nsfast.NAMESPACES}


# -- uts, pid, net ----------------------------------------------------------------------------


def test_hostname_inside_is_the_one_asked_for():
    r = sh("hostname; cat /proc/sys/kernel/hostname", hostname="sandbox-1")
    assert r.stdout == "sandbox-1\nsandbox-1\n"
    assert socket.gethostname() != "sandbox-1"


def test_hostname_of_64_bytes_is_the_limit_and_works():
    name = "h" * 64
    assert sh("hostname", hostname=name).stdout == name + "\n"


def test_command_is_pid_2_under_init_or_pid_1_without():
    assert sh("echo $$").stdout == "2\n"
    assert sh("echo $$", init=False).stdout == "1\n"


def test_proc_lists_only_the_sandbox_processes():
    pids = py("import os; print(json.dumps(sorted(int(p) for p in os.listdir('/proc') if p.isdigit())))")
    assert pids == [1, 2]  # nsfast-init and the command


def test_proc_shows_child_processes_of_the_sandbox_too():
    # The sleeps die with pid 1 when sh exits.
    r = sh("sleep 10 & sleep 10 & ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '")
    # sh (1), two sleeps, ls, grep, sort, tr: a handful of small pids, none of the host's.
    pids = [int(p) for p in r.stdout.split()]
    assert pids[0] == 1 and len(pids) <= 8 and max(pids) < 20, pids


def test_network_has_only_loopback_and_it_is_up():
    r = sh("tail -n +3 /proc/net/dev | cut -d: -f1; echo ---; ip -o link")
    assert r.returncode == 0, r.stderr
    dev, links = r.stdout.split("---\n")
    assert [line.strip() for line in dev.splitlines()] == ["lo"]
    (link,) = links.splitlines()
    flags = re.search(r"^1: lo: <([A-Z_,]+)>", link)
    assert flags, link
    assert "UP" in flags.group(1).split(","), link


def test_without_a_net_namespace_the_host_interfaces_are_visible():
    ns = tuple(n for n in nsfast.DEFAULT_NAMESPACES if n != "net")
    host = sorted(psutil.net_if_addrs())
    r = sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort", namespaces=ns)
    assert r.stdout.split() == host


# -- file system ------------------------------------------------------------------------------


def test_writing_under_root_fails_with_erofs():
    res = py(
        "print(json.dumps([attempt(lambda: open('/nsfast-test-file', 'w')),"
        " attempt(lambda: open('/etc/hostname', 'a')),"
        " attempt(lambda: __import__('os').mkdir('/usr/nsfast-test-dir'))]))"
    )
    # The sandbox's root is an unprivileged host id: for a file that id may not write anyway
    # (the host's /etc/hostname) the permission check comes first.
    assert res[0] == res[2] == "EROFS" and res[1] in ("EROFS", "EACCES"), res
    assert not os.path.exists("/nsfast-test-file")


def test_read_only_root_message_is_the_usual_one():
    r = sh("touch /nsfast-test-file")
    assert r.returncode != 0
    assert "Read-only file system" in r.stderr


@pytest.mark.parametrize("where", ["host root", "rootfs", "exec"])
def test_dev_nodes_are_the_hosts_character_devices(where, py_rootfs):
    """/dev/null and friends are binds of the host's devices however the root was made: the
    host root is the mount namespace's own copy (the binds' sources are held before the
    sandbox's /dev tmpfs covers the host's), a rootfs a clone of it pivoted to. Not files
    of that tmpfs, where writes would pile up and /dev/full would take them."""
    args = ["python3", "-c", PY_ERRNO + DEV_PROBE]
    if where == "exec":
        with nsfast.Container(stop_timeout=1) as c:
            r = c.exec(args, capture_output=True, text=True, timeout=30)
    else:
        kw = {"rootfs": py_rootfs, "mounts": [nsfast.Bind("/usr", "/usr")]} if where == "rootfs" else {}
        r = nsfast.run(args, capture_output=True, text=True, timeout=30, **kw)
    assert r.returncode == 0, r.stderr
    check_dev_nodes(json.loads(r.stdout))


def test_the_host_root_shows_every_host_mount_read_only_and_nothing_else_of_the_hosts():
    """The default root in place: each mount the host has is there, read-only, at its place
    (covered where nsfast hides or replaces a directory), and what else is mounted is
    nsfast's own: /proc (and its masks), /dev, /tmp, /dev/shm, the hidden directories, a
    fresh /sys (and its masks) with the sandbox's own cgroup hierarchies (test_sysfs.py)."""
    host = mount_table(Path("/proc/self/mountinfo").read_text())
    r = sh("cat /proc/self/mountinfo")
    assert r.returncode == 0, r.stderr
    inside = mount_table(r.stdout)
    rest = list(inside)
    for m, _, t in host:
        assert (m, "ro", t) in rest, f"the host's {t} on {m} is not there read-only"
        rest.remove((m, "ro", t))
    own = {m for m, _, _ in rest}
    allowed = ("/proc", "/dev", "/tmp", "/sys", *nsfast.DEFAULT_HIDDEN)
    assert own and all(m.startswith(allowed) for m in own), own


def test_tmp_is_empty_and_writable():
    r = sh("ls -A /tmp; echo data > /tmp/f && cat /tmp/f")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "data\n"


def test_tmp_is_private_to_each_sandbox():
    marker = f"nsfast-marker-{os.getpid()}"
    assert sh(f"touch /tmp/{marker}").returncode == 0
    assert not os.path.exists(f"/tmp/{marker}")
    assert sh(f"ls /tmp/{marker}").returncode != 0


def test_readonly_bind_shows_host_files_and_refuses_writes(host_dir):
    res = py(
        "print(json.dumps([open('/mnt/hello').read(),"
        " attempt(lambda: open('/mnt/new', 'w')),"
        " attempt(lambda: open('/mnt/hello', 'a'))]))",
        mounts=[nsfast.Bind(host_dir, "/mnt", readonly=True)],
    )
    assert res == ["from the host\n", "EROFS", "EROFS"]
    assert sorted(os.listdir(host_dir)) == ["hello"]


def test_bind_is_read_only_by_default(host_dir):
    r = sh("touch /mnt/new", mounts=[nsfast.Bind(host_dir, "/mnt")])
    assert "Read-only file system" in r.stderr


def test_writable_bind_writes_reach_the_host(host_dir):
    r = sh("echo from-inside > /mnt/new && cat /mnt/hello", mounts=[nsfast.Bind(host_dir, "/mnt", readonly=False)])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from the host\n"
    assert (host_dir / "new").read_text() == "from-inside\n"


def test_single_file_can_be_bound(host_dir):
    r = sh("cat /etc/hostname", mounts=[nsfast.Bind(host_dir / "hello", "/etc/hostname")])
    assert r.stdout == "from the host\n"


def test_tmpfs_mount_is_empty_and_writable():
    r = sh(
        "ls -A /srv; echo x > /srv/f && cat /srv/f; grep ' /srv ' /proc/self/mountinfo", mounts=[nsfast.Tmpfs("/srv")]
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "x"
    assert " - tmpfs " in lines[1]


def test_tmpfs_size_is_enforced():
    res = py(
        "def fill():\n"
        "    with open('/srv/big', 'wb') as f:\n"
        "        for _ in range(3):\n"
        "            f.write(b'\\0' * (1 << 20))\n"
        "            f.flush()\n"
        "small = attempt(lambda: open('/srv/small', 'wb').write(b'x' * 500_000))\n"
        "print(json.dumps([small, attempt(fill)]))",
        mounts=[nsfast.Tmpfs("/srv", size="1M")],
    )
    assert res == ["ok", "ENOSPC"]


def test_mount_targets_are_created_under_a_tmpfs(host_dir):
    r = sh(
        "cat /srv/a/b/hello; cat /srv/one/file",
        mounts=[
            nsfast.Tmpfs("/srv"),
            nsfast.Bind(host_dir, "/srv/a/b"),
            nsfast.Bind(host_dir / "hello", "/srv/one/file"),
        ],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from the host\n" * 2


def test_sandbox_mounts_do_not_appear_on_the_host(host_dir):
    before = Path("/proc/self/mountinfo").read_text()
    r = sh("grep -c . /proc/self/mountinfo", mounts=[nsfast.Tmpfs("/srv"), nsfast.Bind(host_dir, "/mnt")])
    assert r.returncode == 0
    assert Path("/proc/self/mountinfo").read_text() == before


def test_rootfs_directory_becomes_root(busybox_rootfs):
    r = nsfast.run(["/bin/sh", "-c", "ls /; cat /ROOTFS-MARKER"], rootfs=busybox_rootfs, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    *listing, marker = r.stdout.split()
    assert sorted(listing) == ["ROOTFS-MARKER", "bin", "dev", "etc", "proc", "tmp"]
    assert marker == "tiny"


def test_rootfs_is_read_only_by_default(busybox_rootfs):
    r = nsfast.run(["sh", "-c", "touch /new"], rootfs=busybox_rootfs, capture_output=True, text=True)
    assert r.returncode != 0
    assert "Read-only file system" in r.stderr
    assert not (busybox_rootfs / "new").exists()


def test_rootfs_is_writable_with_readonly_root_false(busybox_rootfs):
    # Writes land in the user's directory, so nsfast makes no mount points there: without
    # them it is a SpecError naming them, and nothing was created.
    with pytest.raises(nsfast.SpecError, match=r"rootfs: has no /proc, /dev, /tmp .*overlay=True"):
        nsfast.run(["true"], rootfs=busybox_rootfs, readonly_root=False)
    assert sorted(os.listdir(busybox_rootfs)) == ["ROOTFS-MARKER", "bin", "etc"]
    for d in ("proc", "dev", "tmp"):
        (busybox_rootfs / d).mkdir()
    r = nsfast.run(
        ["sh", "-c", "echo hi > /new && mkdir /d"],
        rootfs=busybox_rootfs,
        readonly_root=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (busybox_rootfs / "new").read_text() == "hi\n"
    assert (busybox_rootfs / "d").is_dir()


def test_rootfs_gets_proc_and_tmp(busybox_rootfs):
    r = nsfast.run(
        ["sh", "-c", "echo $$; ls /proc/1/ns | wc -l; touch /tmp/x && ls /tmp"],
        rootfs=busybox_rootfs,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    pid1, n_ns, tmp = r.stdout.split()
    assert (pid1, tmp) == ("2", "x")  # pid 1 is nsfast-init
    assert int(n_ns) >= len(nsfast.NAMESPACES)


# -- environment, cwd, ids --------------------------------------------------------------------


def test_default_environment_is_clean(monkeypatch):
    monkeypatch.setenv("NSFAST_TEST_SECRET", "leaked")
    monkeypatch.delenv("TERM", raising=False)
    r = nsfast.run(["/usr/bin/env"], capture_output=True, text=True)
    env = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert "NSFAST_TEST_SECRET" not in env
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/"}


def test_env_is_the_whole_environment():
    r = nsfast.run(["/usr/bin/env"], env={"A": "1", "B": "two words"}, capture_output=True, text=True)
    assert r.stdout == "A=1\nB=two words\n"


def test_cwd_is_honored():
    assert sh("pwd", cwd="/usr/share").stdout == "/usr/share\n"
    assert sh("pwd").stdout == "/\n"


def test_uid_and_gid_are_set_without_a_user_namespace():
    r = sh("id -u; id -g; id -G; grep -E '^(Uid|Gid|Groups):' /proc/self/status", uid=1234, gid=4321)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == ["1234", "4321", "4321"]
    status = _status_fields("\n".join(lines[3:]))
    assert status["Uid"].split() == ["1234"] * 4
    assert status["Gid"].split() == ["4321"] * 4
    assert status["Groups"].strip() == ""


def test_default_ids_are_the_callers():
    assert sh("id -u; id -g").stdout == f"{os.getuid()}\n{os.getgid()}\n"


# -- capabilities, no_new_privs ---------------------------------------------------------------


def test_capabilities_are_all_dropped_by_default():
    status = _status_fields(sh("cat /proc/self/status").stdout)
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == 0, f"{field} = {status[field]}"


def test_root_without_capabilities_cannot_administer_the_network():
    r = sh("ip link set lo down")
    assert r.returncode != 0
    assert "Operation not permitted" in r.stderr


def test_kept_capability_is_in_the_bounding_set_and_works():
    net_admin = 1 << nsfast.CAPABILITIES.index("CAP_NET_ADMIN")
    r = sh("cat /proc/self/status; ip link set lo down && ip -o link show lo", capabilities=["CAP_NET_ADMIN"])
    assert r.returncode == 0, r.stderr
    status = _status_fields(r.stdout)
    assert int(status["CapBnd"], 16) == net_admin
    assert int(status["CapEff"], 16) == net_admin
    assert "state DOWN" in r.stdout.splitlines()[-1]


def test_command_starts_with_no_signal_blocked_or_ignored():
    # Python (the parent) ignores SIGPIPE; the sandbox must not inherit that.
    r = sh("grep -E '^Sig(Blk|Ign):' /proc/self/status; yes | head -n1")
    assert r.stdout.split() == ["SigBlk:", "0000000000000000", "SigIgn:", "0000000000000000", "y"]
    assert r.stderr == ""


def test_no_new_privs_is_set():
    assert _status_fields(sh("cat /proc/self/status").stdout)["NoNewPrivs"] == "1"


# -- fds --------------------------------------------------------------------------------------


def test_pass_fds_keeps_exactly_those_fds_open():
    r_fd, w_fd = os.pipe()  # non-inheritable, like every fd Python opens
    stray_r, stray_w = os.pipe()
    os.set_inheritable(stray_w, True)  # inheritable but not passed: must still be closed
    try:
        r = nsfast.run(
            [
                "sh",
                "-c",
                "ls /proc/self/fd; python3 -c 'import os, sys; os.write(int(sys.argv[1]), b\"through-the-fd\\n\")' "
                f"{w_fd}",
            ],
            pass_fds=[w_fd],
            stdin=nsfast.DEVNULL,
            capture_output=True,
            text=True,
        )
        os.close(w_fd)
        passed = os.read(r_fd, 100)
    finally:
        for fd in (r_fd, stray_r, stray_w):
            os.close(fd)
    assert r.returncode == 0, r.stderr
    fds = {int(x) for x in r.stdout.split()}
    extra = fds - {0, 1, 2, w_fd}
    assert {0, 1, 2, w_fd} <= fds
    assert len(extra) == 1, f"fds besides stdio, the passed one and ls's own: {extra}"
    assert stray_w not in fds
    assert passed == b"through-the-fd\n"


def test_no_fds_beyond_stdio_by_default():
    inheritable_r, inheritable_w = os.pipe()
    os.set_inheritable(inheritable_r, True)
    os.set_inheritable(inheritable_w, True)
    try:
        fds = py(
            "import os; print(json.dumps(sorted(int(x) for x in os.listdir('/proc/self/fd'))))", stdin=nsfast.DEVNULL
        )
    finally:
        os.close(inheritable_r)
        os.close(inheritable_w)
    assert fds[:3] == [0, 1, 2] and len(fds) == 4, fds  # the 4th is listdir's own


# -- lifetime ---------------------------------------------------------------------------------

_SPAWN_AND_HANG = """
import sys, time, nsfast
p = nsfast.spawn(["sleep", "100"], die_with_parent={dwp})
print(p.pid, flush=True)
time.sleep(100)
"""


def _orphan_sandbox(die_with_parent: bool) -> int:
    """A python process that spawned a sandbox is SIGKILLed; returns the sandbox's pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SPAWN_AND_HANG.format(dwp=die_with_parent)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        pid = int(line)
        assert psutil.Process(pid).cmdline()[-3:] == ["--", "sleep", "100"]  # nsfast-init
        assert psutil.Process(pid).ppid() == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    return pid


def test_sandbox_dies_when_its_parent_is_killed(subreaper):
    pid = _orphan_sandbox(die_with_parent=True)
    t0 = time.monotonic()
    code = subreaper.wait_exit(pid, timeout=1.0)
    if code is None:
        subreaper.kill_and_reap(pid)
    assert code == -signal.SIGKILL, "the sandbox outlived its parent by more than 1 s"
    assert time.monotonic() - t0 < 1.0
    assert not psutil.pid_exists(pid)


def test_sandbox_outlives_its_parent_with_die_with_parent_false(subreaper):
    pid = _orphan_sandbox(die_with_parent=False)
    try:
        assert subreaper.wait_exit(pid, timeout=0.3) is None
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    finally:
        subreaper.kill_and_reap(pid)
