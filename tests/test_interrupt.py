"""Ctrl-C while nsfast waits: KeyboardInterrupt at once, as with subprocess.run, the sandbox
killed and reaped, nothing reported lost (issue 8's first defect)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from conftest import CGROUP_ENV, PYTHON_SRC, running_with_cmdline, suite, wait_until

pytestmark = suite

TAG = "10.4242"  # a sleep only this test runs


def test_ctrl_c_interrupts_run_at_once_and_leaves_nothing():
    script = textwrap.dedent(f"""
        import nsfast, time
        p = nsfast.spawn(["true"]); p.wait()  # warm: the first spawn builds the seccomp filter
        print("go", flush=True)
        t = time.monotonic()
        try:
            nsfast.run(["sleep", "{TAG}"])
        except KeyboardInterrupt:
            print(f"{{time.monotonic() - t:.3f}}", flush=True)
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
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    waited = time.monotonic() - sent
    assert p.returncode == -signal.SIGINT, err  # the KeyboardInterrupt ended the interpreter
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert "Exception ignored" not in err and "ChildProcessError" not in err, err
    assert waited < 5, f"Ctrl-C took {waited:.1f} s to interrupt a 10 s run"
    assert out.strip(), "run() did not raise KeyboardInterrupt"
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
