"""Ctrl-C while nsfast waits: KeyboardInterrupt at once, as with subprocess.run, the sandbox
killed and reaped, nothing reported lost (issue 8's first defect)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import CGROUP_ENV, PYTHON_SRC, running_with_cmdline, suite, wait_until

pytestmark = suite

TAG = "10.4242"  # a sleep only this test runs


# How the caller waits when Ctrl-C arrives; each is a statement that blocks on the sandbox.
WAITS = {
    "run": f'nsfast.run(["sleep", "{TAG}"])',
    "wait": f'nsfast.spawn(["sleep", "{TAG}"]).wait()',
    "communicate": f'nsfast.run(["sh", "-c", "echo out; exec sleep {TAG}"], capture_output=True)',
    "exec": f'c.exec(["sleep", "{TAG}"])',
    "cpu_time": f'nsfast.run(["sleep", "{TAG}"], limits=nsfast.Limits(cpu_time=100))',
}


@pytest.mark.parametrize("how", list(WAITS))
def test_ctrl_c_interrupts_at_once_and_leaves_nothing(how):
    script = textwrap.dedent(f"""
        import glob, os, time, nsfast
        nsfast.run(["true"])  # warm: the first spawn builds the seccomp filter
        c = nsfast.Container().start() if {how!r} == "exec" else None
        print("go", flush=True)
        try:
            {WAITS[how]}
        except KeyboardInterrupt:
            caught = time.monotonic()
            # By now the sandbox is killed and reaped and its cgroup removed.
            left = glob.glob("/sys/fs/cgroup/**/sb-%d-*" % os.getpid(), recursive=True)
            if c is not None:  # the container's own cgroup stays; its exec's must be gone
                left = [e for d in left for e in glob.glob(d + "/exec-*")]
            print(f"{{caught:.6f}} {{len(left)}}", flush=True)
            if c is not None:
                c.kill()
            raise
    """)
    p = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": PYTHON_SRC, "PATH": "/usr/bin:/bin", **CGROUP_ENV},
    )
    assert p.stdout is not None and p.stdout.readline() == "go\n"
    # Readiness: the sandbox's sleep runs (so the caller is inside its wait).
    assert wait_until(lambda: bool(running_with_cmdline(f"sleep {TAG}")), timeout=10)
    time.sleep(0.06)  # past the first 50 ms wait slice
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGINT, err  # the KeyboardInterrupt ended the interpreter
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert "Exception ignored" not in err and "ChildProcessError" not in err, err
    assert out.strip(), "the wait did not raise KeyboardInterrupt"
    caught, left = out.split()
    # KeyboardInterrupt within 0.1 s (the wait runs in 50 ms slices), plus the kill, reap and
    # cgroup removal before it propagates; a loaded 2-core machine gets some slack.
    assert float(caught) - sent < 0.5, f"Ctrl-C took {float(caught) - sent:.3f} s to interrupt"
    assert left == "0", "the sandbox's cgroup outlived Ctrl-C"
    assert wait_until(lambda: not running_with_cmdline(f"sleep {TAG}"), timeout=5), "the sandbox outlived Ctrl-C"


def test_a_wait_with_a_timeout_is_not_held_up_by_another_thread_waiting():
    """Popen semantics: wait(timeout=0.3) while another thread waits without one on the same
    sandbox raises TimeoutExpired after ~0.3 s, not when the other wait ends."""
    import threading

    import nsfast

    p = nsfast.spawn(["sleep", "100"])
    try:
        other = threading.Thread(target=p.wait)
        other.start()
        assert wait_until(lambda: p._wait_lock.locked(), timeout=5)
        t = time.monotonic()
        try:
            p.wait(timeout=0.3)
            raise AssertionError("wait(timeout=0.3) returned while the sandbox runs")
        except subprocess.TimeoutExpired:
            pass
        assert time.monotonic() - t < 5, "the timeout waited for the other thread's wait"
        assert p.poll() is None
    finally:
        p.kill()
        other.join(10)
    assert not other.is_alive() and p.returncode == -signal.SIGKILL
