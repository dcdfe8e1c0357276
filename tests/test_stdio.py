"""stdio, timeouts, exit statuses and the subprocess-shaped results of run/spawn."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

import pytest

import nsfast
from conftest import running_with_cmdline, sh, suite, wait_until

pytestmark = suite

MB = 1 << 20


def test_capture_output_keeps_stdout_and_stderr_apart():
    r = nsfast.run(["sh", "-c", "echo out; echo err >&2"], capture_output=True)
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")


def test_input_is_fed_to_stdin():
    r = nsfast.run(["cat"], input=b"some\x00bytes\n", capture_output=True)
    assert r.stdout == b"some\x00bytes\n"


def test_text_mode_encodes_input_and_decodes_output():
    r = nsfast.run(["sh", "-c", "cat; echo err >&2"], input="héllo\n", text=True, capture_output=True)
    assert r.stdout == "héllo\n"
    assert r.stderr == "err\n"


def test_stderr_to_stdout_merges_in_order():
    r = nsfast.run(["sh", "-c", "echo one; echo two >&2; echo three"], stdout=nsfast.PIPE, stderr=nsfast.STDOUT)
    assert r.stdout == b"one\ntwo\nthree\n"
    assert r.stderr is None


def test_devnull_discards_output_and_gives_empty_input():
    r = nsfast.run(
        ["sh", "-c", "cat; echo gone; echo also-gone >&2"],
        stdin=nsfast.DEVNULL,
        stdout=nsfast.DEVNULL,
        stderr=nsfast.DEVNULL,
        timeout=10,
    )
    assert r.returncode == 0
    assert (r.stdout, r.stderr) == (None, None)
    r = nsfast.run(["cat"], stdin=nsfast.DEVNULL, capture_output=True, timeout=10)
    assert r.stdout == b""


def test_file_objects_receive_output(tmp_path):
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as fo, open(err, "w") as fe:
        r = nsfast.run(["sh", "-c", "echo to-file; echo to-err >&2"], stdout=fo, stderr=fe)
    assert r.returncode == 0
    assert out.read_bytes() == b"to-file\n"
    assert err.read_text() == "to-err\n"


def test_file_object_feeds_stdin(tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"from a file\n")
    with open(src, "rb") as f:
        r = nsfast.run(["cat"], stdin=f, capture_output=True)
    assert r.stdout == b"from a file\n"


def test_20_mb_on_stdout_and_stderr_at_once_does_not_deadlock():
    n = 20_000_000
    r = nsfast.run(
        ["sh", "-c", f"head -c {n} /dev/zero & head -c {n} /dev/zero | tr '\\0' x >&2; wait"],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0
    assert len(r.stdout) == n and r.stdout.count(b"\0") == n
    assert len(r.stderr) == n and r.stderr.count(b"x") == n


def test_20_mb_through_stdin_stdout_and_stderr_at_once_does_not_deadlock():
    data = bytes(range(256)) * (20 * MB // 256)
    r = nsfast.run(["sh", "-c", "tee /dev/stderr"], input=data, capture_output=True, timeout=60)
    assert r.returncode == 0
    assert r.stdout == data
    assert r.stderr == data


def test_communicate_resumes_after_timeout_without_losing_output():
    p = nsfast.spawn(["sh", "-c", "echo first; sleep 0.5; echo second"], stdout=nsfast.PIPE)
    with p:
        with pytest.raises(subprocess.TimeoutExpired) as exc:
            p.communicate(timeout=0.2)
        assert exc.value.stdout == b"first\n"
        assert p.returncode is None
        out, err = p.communicate(timeout=10)
    assert out == b"first\nsecond\n"
    assert err is None
    assert p.returncode == 0


def test_text_mode_timeout_inside_a_multibyte_character_raises_timeout_expired():
    # The output so far ends with the first byte of "é" when the timeout strikes.
    cmd = ["sh", "-c", r"printf 'a\303'; sleep 0.6; printf '\251'"]
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        nsfast.run(cmd, text=True, capture_output=True, timeout=0.3)
    assert exc.value.stdout == "a"
    with nsfast.spawn(cmd, text=True, stdout=nsfast.PIPE) as p:
        with pytest.raises(subprocess.TimeoutExpired):
            p.communicate(timeout=0.3)
        assert p.communicate(timeout=10) == ("aé", None)


def test_communicate_with_input_and_text():
    with nsfast.spawn(
        ["sh", "-c", "tr a-z A-Z; echo done >&2"], stdin=nsfast.PIPE, stdout=nsfast.PIPE, stderr=nsfast.PIPE, text=True
    ) as p:
        out, err = p.communicate("shout\n", timeout=10)
    assert (out, err, p.returncode) == ("SHOUT\n", "done\n", 0)


def test_stdout_can_be_read_line_by_line_while_running():
    with nsfast.spawn(
        ["sh", "-c", "echo ready; read x; echo got $x"], stdin=nsfast.PIPE, stdout=nsfast.PIPE, text=True
    ) as p:
        assert p.stdout.readline() == "ready\n"
        p.stdin.write("ping\n")
        assert p.stdout.readline() == "got ping\n"
    assert p.returncode == 0


@pytest.mark.parametrize("namespaces", [nsfast.DEFAULT_NAMESPACES, ("mnt",), ()], ids=["pid-ns", "mnt-only", "none"])
def test_timeout_kills_the_whole_sandbox_and_raises(namespaces):
    tag = f"{100 + uuid.uuid4().int % 10**6 / 10**7:.7f}"  # a unique sleep argument to find survivors by
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        nsfast.run(
            ["sh", "-c", f"sleep {tag} & echo started; sleep {tag}"],
            namespaces=namespaces,
            timeout=0.5,
            capture_output=True,
        )
    assert exc.value.timeout == 0.5
    assert exc.value.stdout == b"started\n", "the background sleep never started"
    assert time.monotonic() - t0 < 5
    assert wait_until(lambda: not running_with_cmdline(f"sleep {tag}"), timeout=1.0), (
        f"survivors: {running_with_cmdline(f'sleep {tag}')}"
    )


def test_check_raises_called_process_error_with_the_output():
    with pytest.raises(subprocess.CalledProcessError) as exc:
        nsfast.run(["sh", "-c", "echo partial; exit 3"], check=True, capture_output=True, text=True)
    assert exc.value.returncode == 3
    assert exc.value.stdout == "partial\n"
    assert exc.value.cmd == ["sh", "-c", "echo partial; exit 3"]


def test_check_passes_on_success():
    assert nsfast.run(["true"], check=True).returncode == 0


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_status_passes_through(code):
    assert nsfast.run(["sh", "-c", f"exit {code}"]).returncode == code


def test_killed_sandbox_has_negative_returncode():
    with nsfast.spawn(["sleep", "100"]) as p:
        assert p.poll() is None
        p.kill()
        assert p.wait(timeout=5) == -signal.SIGKILL
    assert p.returncode == -9


def test_signal_from_inside_gives_negative_returncode_without_pid_namespace():
    # Without a pid namespace the command is not a pid 1, so it can signal itself.
    r = sh("kill -TERM $$", namespaces=("mnt", "uts"))
    assert r.returncode == -signal.SIGTERM


def test_pid_1_ignores_unhandled_sigterm_but_not_sigkill():
    with nsfast.spawn(["sleep", "100"], init=False) as p:
        p.terminate()
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=0.3)
        p.kill()
    assert p.returncode == -signal.SIGKILL


def test_wait_timeout_raises_and_the_process_keeps_running():
    with nsfast.spawn(["sleep", "100"]) as p:
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=0.05)
        assert p.poll() is None
        p.kill()


def test_result_is_a_completed_process_with_usage():
    r = nsfast.run(["sh", "-c", "echo hi"], capture_output=True)
    assert isinstance(r, subprocess.CompletedProcess)
    assert isinstance(r, nsfast.Result)
    assert r.args == ["sh", "-c", "echo hi"]
    assert isinstance(r.usage, nsfast.Usage)
    assert r.usage.wall_s > 0
    assert r.usage.timed_out is False
    assert r.usage.oom_killed is False
    r.check_returncode()
    assert "usage=" in repr(r)


def test_usage_wall_time_covers_the_run():
    r = nsfast.run(["sleep", "0.2"])
    assert 0.2 <= r.usage.wall_s < 5


def test_input_to_a_command_that_does_not_read_it_is_not_an_error():
    r = nsfast.run(["true"], input=b"x" * (4 * MB), capture_output=True, timeout=30)
    assert r.returncode == 0


def test_process_usage_is_set_after_wait():
    with nsfast.spawn(["true"]) as p:
        assert p.usage is None  # nothing is known until the sandbox is reaped
        p.wait(timeout=10)
    assert p.usage is not None and p.usage.wall_s > 0 and p.usage.timed_out is False


def test_run_rejects_conflicting_stdio_arguments():
    with pytest.raises(ValueError, match="stdin and input"):
        nsfast.run(["true"], input=b"x", stdin=nsfast.DEVNULL)
    with pytest.raises(ValueError, match="capture_output"):
        nsfast.run(["true"], capture_output=True, stdout=nsfast.DEVNULL)
    with pytest.raises(ValueError, match="STDOUT"):
        nsfast.run(["true"], stdout=nsfast.STDOUT)
