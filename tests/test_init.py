"""nsfast-init (the default with a pid namespace, or init=True): pid 1, forwards signals,
reaps orphans, reports the command's status (tests/test_signals.py: -N for signal N)."""

from __future__ import annotations

import errno
import json
import signal
import subprocess

import pytest

import nsfast
from conftest import sh, suite

pytestmark = suite

# A pid-1-style workload: start a child that starts a grandchild and exits at once, so the
# grandchild is orphaned; once it has exited too, list the zombies of the pid namespace.
ORPHAN_THEN_LIST_ZOMBIES = r"""
import json, os, time
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(0.1)
        os._exit(0)
    os._exit(0)
os.wait()
time.sleep(0.5)
zombies = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            zombies.append(int(pid))
print(json.dumps({"me": os.getpid(), "zombies": zombies}))
"""


def test_pid_1_is_nsfast_init_and_the_command_is_pid_2():
    r = sh(
        "echo $$; tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/1/comm; readlink /proc/1/exe || echo no", init=True
    )
    assert r.returncode == 0, r.stderr
    pid, cmdline, comm, exe = r.stdout.splitlines()
    assert pid == "2"
    assert cmdline.split()[0] == "nsfast-init"
    assert cmdline.rstrip().endswith("-- sh -c " + r.args[2])
    assert comm == "nsfast-init"
    # init is not dumpable: the command cannot follow its /proc links (exe, fds, root).
    assert exe == "no"


def test_init_is_the_default_with_a_pid_namespace():
    r = sh("echo $$; cat /proc/1/comm")
    assert r.stdout.split() == ["2", "nsfast-init"]


def test_with_init_false_the_command_is_pid_1():
    r = sh("echo $$; tr '\\0' ' ' < /proc/1/cmdline", init=False)
    assert r.stdout.splitlines()[0] == "1"
    assert "nsfast-init" not in r.stdout


def test_init_works_in_a_rootfs_without_any_shared_library(busybox_rootfs):
    r = nsfast.run(["sh", "-c", "echo $$"], rootfs=busybox_rootfs, init=True, capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "2\n"), r.stderr


def test_init_reaps_orphans():
    r = nsfast.run(["python3", "-c", ORPHAN_THEN_LIST_ZOMBIES], init=True, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["me"] == 2
    assert out["zombies"] == []


def test_without_init_orphans_stay_zombies_under_a_pid_1_that_does_not_reap():
    # The counterpart of the test above: shows what init=True is for.
    r = nsfast.run(["python3", "-c", ORPHAN_THEN_LIST_ZOMBIES], init=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["me"] == 1
    assert len(out["zombies"]) == 1


def test_terminate_is_forwarded_to_the_command():
    with nsfast.spawn(["sleep", "100"], init=True) as p:
        p.terminate()
        assert p.wait(timeout=5) == -signal.SIGTERM


def test_signals_are_forwarded_to_a_command_that_handles_them():
    script = "trap 'echo got-usr1; exit 5' USR1; echo ready; while :; do sleep 0.05; done"
    with nsfast.spawn(["sh", "-c", script], init=True, stdout=nsfast.PIPE, text=True) as p:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=5)
    assert out == "got-usr1\n"
    assert p.returncode == 5


def test_kill_ends_init_and_the_sandbox():
    with nsfast.spawn(["sh", "-c", "sleep 100 & sleep 100"], init=True) as p:
        p.kill()
        assert p.wait(timeout=5) == -signal.SIGKILL


def test_command_under_init_starts_with_default_signal_dispositions():
    # nsfast-init itself blocks every signal (sigwaitinfo) and, being a Rust program, started
    # with SIGPIPE ignored: none of that may reach the command.
    r = sh("grep -E '^Sig(Blk|Ign):' /proc/self/status; yes | head -n1", init=True)
    assert r.returncode == 0
    assert r.stdout.split() == ["SigBlk:", "0000000000000000", "SigIgn:", "0000000000000000", "y"]
    assert r.stderr == "", "yes should die of SIGPIPE, not see EPIPE"


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_status_passes_through_init(code):
    assert nsfast.run(["sh", "-c", f"exit {code}"], init=True).returncode == code


def test_command_killed_by_a_signal_gives_minus_n():
    # Under init the command is pid 2, so it can signal itself; init exits like a shell does
    # (128+N) but reports the command's own status, so Python sees -N.
    assert sh("kill -KILL $$", init=True).returncode == -signal.SIGKILL


def test_output_and_input_pass_through_init():
    r = nsfast.run(["sh", "-c", "cat; echo err >&2"], init=True, input=b"data", capture_output=True)
    assert (r.stdout, r.stderr) == (b"data", b"err\n")


def test_timeout_with_init_kills_everything():
    with pytest.raises(subprocess.TimeoutExpired):
        nsfast.run(["sh", "-c", "sleep 100 & sleep 100"], init=True, timeout=0.3)


def test_missing_command_under_init_raises_spawn_error_enoent():
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["nsfast-no-such-command"], init=True, capture_output=True)
    e = exc.value
    assert (e.errno, e.step, e.filename) == (errno.ENOENT, "exec", "nsfast-no-such-command")
    assert isinstance(e, OSError) and isinstance(e, nsfast.NsfastError)


def test_non_executable_under_init_raises_eacces(tmp_path):
    (tmp_path / "script").write_text("#!/bin/sh\n")
    (tmp_path / "script").chmod(0o644)
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["/mnt/script"], init=True, mounts=[nsfast.Bind(tmp_path, "/mnt")])
    assert (exc.value.errno, exc.value.step) == (errno.EACCES, "exec")
