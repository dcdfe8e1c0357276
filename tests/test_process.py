"""Process semantics a BenchExec or subprocess user relies on: why a run ended
(`Usage.termination`), CPU-time limits (hard and soft) over the whole sandbox, rlimits, and
fields that cannot take effect raising instead of being dropped."""

from __future__ import annotations

import os
import resource
import signal
import subprocess

import pytest

import nsfast
from conftest import sandbox_cgroups, suite, wait_until

pytestmark = suite

BUSY = "import time\nwhile True: pass"


def test_termination_says_why_a_run_ended():
    assert nsfast.run(["true"]).usage.termination == "exit"
    assert nsfast.run(["false"]).usage.termination == "exit"
    r = nsfast.run(["sh", "-c", "kill -KILL $$"], init=True)
    assert (r.returncode, r.usage.termination) == (-9, "signal")
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        nsfast.run(["sleep", "30"], timeout=0.2)
    usage = exc.value.usage  # type: ignore[attr-defined]
    assert (usage.termination, usage.timed_out) == ("timeout", True)


def test_an_oom_kill_is_termination_memory():
    r = nsfast.run(
        ["python3", "-c", "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])"],
        limits=nsfast.Limits(memory="48M", memory_swap="48M"),
    )
    assert r.returncode == -9, r
    assert r.usage.oom_killed and r.usage.termination == "memory", r.usage


def test_cpu_time_limit_kills_the_whole_sandbox_once_it_used_that_much_cpu():
    r = nsfast.run(["python3", "-c", BUSY], limits=nsfast.Limits(cpu_time=0.4), timeout=30)
    assert r.returncode == -9 and r.usage.termination == "cpu_time", r.usage
    used = r.usage.cpu_user_s + r.usage.cpu_system_s
    assert 0.4 <= used < 0.9, r.usage


def test_cpu_time_counts_all_processes_together():
    # Two busy processes: together they reach 0.6 s of CPU in about half the wall time
    # one would need; each alone stays below the limit until the kill.
    r = nsfast.run(
        ["sh", "-c", f"python3 -c '{BUSY}' & python3 -c '{BUSY}' & wait"],
        limits=nsfast.Limits(cpu_time=0.6),
        timeout=30,
    )
    assert r.usage.termination == "cpu_time", r.usage
    used = r.usage.cpu_user_s + r.usage.cpu_system_s
    assert 0.6 <= used < 1.2, r.usage


def test_soft_cpu_time_limit_sends_sigterm_first_then_the_hard_limit_kills():
    trap = "trap 'echo soft; exit 7' TERM; while :; do :; done"
    r = nsfast.run(
        ["sh", "-c", trap], limits=nsfast.Limits(cpu_time_soft=0.3, cpu_time=5), capture_output=True, timeout=30
    )
    assert (r.returncode, r.stdout, r.usage.termination) == (7, b"soft\n", "cpu_time"), r
    # A program that ignores SIGTERM is killed at the hard limit.
    stubborn = "trap '' TERM; while :; do :; done"
    r = nsfast.run(["sh", "-c", stubborn], limits=nsfast.Limits(cpu_time_soft=0.2, cpu_time=0.5), timeout=30)
    assert r.returncode == -9 and r.usage.termination == "cpu_time", r.usage
    assert r.usage.cpu_user_s + r.usage.cpu_system_s >= 0.5


def test_cpu_time_limit_does_not_touch_a_program_that_sleeps():
    r = nsfast.run(["sleep", "0.5"], limits=nsfast.Limits(cpu_time=0.1), timeout=30)
    assert (r.returncode, r.usage.termination) == (0, "exit"), r.usage


def test_file_size_rlimit_stops_writes_at_the_limit():
    r = nsfast.run(
        ["sh", "-c", "head -c 100000 /dev/zero > /tmp/f; echo $?; wc -c < /tmp/f"],
        rlimits={"fsize": 4096},
        capture_output=True,
        text=True,
    )
    status, size = r.stdout.split()
    assert (int(status), int(size)) == (128 + 25, 4096), r  # SIGXFSZ killed the writer


def test_rlimits_are_set_soft_and_hard():
    r = nsfast.run(
        ["sh", "-c", "ulimit -Sn; ulimit -Hn; ulimit -Sc"],
        rlimits={"NOFILE": (64, 128), "core": resource.RLIM_INFINITY},
        capture_output=True,
        text=True,
    )
    assert r.stdout.split() == ["64", "128", "unlimited"], r
    # nsfast's own default: no core dumps.
    assert nsfast.run(["sh", "-c", "ulimit -c"], capture_output=True, text=True).stdout.strip() == "0"


@pytest.mark.parametrize(
    ("rlimits", "match"),
    [
        ({"fsze": 1}, "unknown resource 'fsze'"),
        ({"nofile": (100, 10)}, "soft limit 100 is above the hard limit 10"),
        ({"nofile": 10**9}, "hard limit 1000000000 is above"),
        ({"nofile": -5}, "out of range"),
    ],
)
def test_bad_rlimits_raise_naming_them(rlimits, match):
    with pytest.raises(nsfast.SpecError, match=match):
        nsfast.Spec(rlimits=rlimits)


def test_bad_rlimit_types_raise_typeerror():
    with pytest.raises(TypeError, match="rlimits"):
        nsfast.Spec(rlimits=[("nofile", 1)])
    with pytest.raises(TypeError, match="nofile"):
        nsfast.Spec(rlimits={"nofile": "many"})


def test_without_a_mount_namespace_the_root_is_writable_and_saying_otherwise_is_an_error(tmp_path):
    # Before: Spec(namespaces=("pid",)) kept readonly_root=True and the sandbox wrote to /.
    assert nsfast.Spec(namespaces=("pid",)).readonly_root is False
    assert nsfast.Spec().readonly_root is True
    with pytest.raises(nsfast.SpecError, match="readonly_root: needs the 'mnt' namespace"):
        nsfast.Spec(namespaces=("pid",), readonly_root=True)
    for field, value in [("hidden", ("/srv",)), ("masked_paths", ("/proc/kcore",)), ("tmp_size", "1M")]:
        with pytest.raises(nsfast.SpecError, match=f"{field}: needs the 'mnt' namespace"):
            nsfast.Spec(namespaces=("pid",), **{field: value})


def test_wait_after_detach_is_a_clear_error():
    p = nsfast.spawn(["sleep", "30"])
    paths = p.detach()
    try:
        with pytest.raises(ValueError, match="detached"):
            p.wait()
    finally:
        os.kill(p.pid, signal.SIGKILL)
        os.waitpid(p.pid, 0)
        for d in sorted(paths, key=len, reverse=True):
            wait_until(lambda d=d: _rmdir(d), timeout=5)


def _rmdir(d: str) -> bool:
    try:
        os.rmdir(d)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def test_capabilities_kept_for_a_non_root_uid_take_effect():
    # Before: uid=1000 with CAP_NET_BIND_SERVICE gave the command no capability, no error.
    r = nsfast.run(
        ["grep", "-E", "^(Uid|CapEff|CapAmb)", "/proc/self/status"],
        uid=1000,
        gid=1000,
        capabilities=("CAP_NET_BIND_SERVICE",),
        capture_output=True,
        text=True,
        check=True,
    )
    fields = {line.split(":")[0]: line.split()[1:] for line in r.stdout.splitlines()}
    assert fields["Uid"][0] == "1000"
    bit = 1 << nsfast.CAPABILITIES.index("CAP_NET_BIND_SERVICE")
    assert int(fields["CapEff"][0], 16) == bit and int(fields["CapAmb"][0], 16) == bit, r.stdout
    # And it works: a non-root uid binds a port below 1024 in the sandbox's own netns.
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 80)); print('bound')"
    r = nsfast.run(
        ["python3", "-c", code], uid=1000, capabilities=("CAP_NET_BIND_SERVICE",), capture_output=True, text=True
    )
    assert (r.returncode, r.stdout) == (0, "bound\n"), r.stderr
    # Without the capability the same bind is refused.
    r = nsfast.run(["python3", "-c", code], uid=1000, capture_output=True, text=True)
    assert r.returncode == 1 and "PermissionError" in r.stderr


def test_container_execs_get_the_containers_rlimits():
    with nsfast.Container(rlimits={"nofile": (77, 99), "fsize": None}) as c:
        r = c.exec(["sh", "-c", "ulimit -Sn; ulimit -Hn; ulimit -f"], capture_output=True, text=True)
        with open(f"/proc/{c.pid}/limits") as f:
            main = f.read()
    assert r.stdout.split() == ["77", "99", "unlimited"], r
    assert "Max open files            77                   99" in main


def test_a_sandbox_object_dropped_unwaited_is_killed_and_reaped_even_with_a_cpu_watcher():
    import gc

    import psutil

    from nsfast import _cgroup, _core

    spec = nsfast.Spec(limits=nsfast.Limits(cpu_time=100))
    req = _cgroup.request(spec.limits, kill_tree=False)
    sb = _core.spawn(spec, [b"sleep", b"30"], stdio=(-1, -1, -1), pass_fds=[], cgroup=req)
    pid = sb.pid
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    del sb
    gc.collect()

    def gone() -> bool:
        try:
            return psutil.Process(pid).ppid() != os.getpid()
        except psutil.NoSuchProcess:
            return True

    assert wait_until(gone, timeout=5), "the dropped sandbox still runs (or is an unreaped zombie)"


def test_a_sandbox_reaped_behind_nsfasts_back_is_still_waited_for_and_cleaned_up():
    """A foreign reaper (SIGCHLD ignored, a waitpid(-1) elsewhere) takes the exit status: as
    Popen, wait() then returns instead of raising ChildProcessError; nsfast-init's report still
    has the command's status, and the cgroup is removed all the same."""
    before = sandbox_cgroups()
    p = nsfast.spawn(["sh", "-c", "exit 3"])
    os.waitpid(p.pid, 0)
    assert p.wait(timeout=10) == 3 and p.usage is not None
    q = nsfast.spawn(["sh", "-c", "exit 3"], init=False)
    os.waitpid(q.pid, 0)
    assert q.wait(timeout=10) == 0  # lost with the reaped status, as Popen takes it
    assert sandbox_cgroups() == before


def test_a_spec_of_plain_keyword_fields_is_made_once_and_stays_right(monkeypatch):
    """run(..., overlay=True) and the like build their Spec once per distinct fields (its
    validation is not free), as the default Spec is; what reads the environment (TERM) or the
    file system (rootfs, cwd-relative paths) is never taken from a cached one."""
    from nsfast._spec import with_fields

    a = with_fields(None, {"overlay": True, "hostname": "box"})
    assert with_fields(None, {"hostname": "box", "overlay": True}) is a
    assert with_fields(None, {"overlay": True, "hostname": "other"}).hostname == "other"
    monkeypatch.setenv("TERM", "nsfast-test-term")
    b = with_fields(None, {"overlay": True, "hostname": "box"})
    assert b is not a and b.env is None and ("TERM", "nsfast-test-term") in b._env_items
    with pytest.raises(nsfast.SpecError, match="readonly_root"):
        with_fields(None, {"overlay": True, "readonly_root": True})
    with pytest.raises(nsfast.SpecError, match="readonly_root"):  # a refusal is never cached
        with_fields(None, {"overlay": True, "readonly_root": True})
    # Not plain or not pure: a new Spec each time.
    assert with_fields(None, {"mounts": []}) is not with_fields(None, {"mounts": []})
    assert with_fields(None, {"cwd": "/tmp"}) is not with_fields(None, {"cwd": "/tmp"})
