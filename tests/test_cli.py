"""The `nsfast run` command line (`python -m nsfast`), driven as a user would."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import termios
import tty

import psutil
import pytest

import nsfast
from conftest import PY_ERRNO, PYTHON_SRC, suite

pytestmark = suite


def nsfast_cli(*args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsfast", *args], input=input, capture_output=True, text=True, timeout=timeout, cwd="/"
    )


def test_hostname_flag():
    r = nsfast_cli("run", "--hostname", "cli-box", "--", "hostname")
    assert (r.returncode, r.stdout, r.stderr) == (0, "cli-box\n", "")


def test_command_is_pid_2_under_init_in_a_read_only_root_by_default():
    r = nsfast_cli("run", "--", "sh", "-c", "echo $$; touch /x")
    assert r.returncode == 1
    assert r.stdout == "2\n"  # nsfast-init is pid 1 by default (with a pid namespace)
    assert "Read-only file system" in r.stderr


def test_ro_bind_flag(tmp_path):
    (tmp_path / "f").write_text("host data\n")
    r = nsfast_cli("run", "--ro-bind", str(tmp_path), "/mnt", "--", "sh", "-c", "cat /mnt/f; touch /mnt/g")
    assert r.returncode == 1
    assert r.stdout == "host data\n"
    assert "Read-only file system" in r.stderr
    assert not (tmp_path / "g").exists()


def test_bind_flag_is_writable(tmp_path):
    r = nsfast_cli("run", "--bind", str(tmp_path), "/mnt", "--", "sh", "-c", "echo from-cli > /mnt/g")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g").read_text() == "from-cli\n"


def test_tmpfs_flag_and_mount_order(tmp_path):
    (tmp_path / "f").write_text("bound\n")
    r = nsfast_cli(
        "run",
        "--tmpfs",
        "/srv",
        "--ro-bind",
        str(tmp_path),
        "/srv/sub",
        "--",
        "sh",
        "-c",
        "ls /srv; cat /srv/sub/f; echo x > /srv/new && cat /srv/new",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "sub\nbound\nx\n"


@pytest.mark.parametrize(
    "flags", [[], ["--unshare-net"], ["--unshare-all"]], ids=["default", "unshare-net", "unshare-all"]
)
def test_network_is_unshared(flags):
    r = nsfast_cli("run", *flags, "--", "sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["lo"]


def test_share_net_flag_keeps_the_host_network():
    r = nsfast_cli("run", "--share-net", "--", "sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted(psutil.net_if_addrs())


NS_SCRIPT = "for n in user mnt pid uts ipc net cgroup time; do readlink /proc/self/ns/$n; done"
NS_TYPES = ("user", "mnt", "pid", "uts", "ipc", "net", "cgroup", "time")


def _new_namespaces(*flags: str) -> set:
    r = nsfast_cli("run", *flags, "--", "sh", "-c", NS_SCRIPT)
    assert r.returncode == 0, r.stderr
    host = {n: os.readlink(f"/proc/self/ns/{n}") for n in NS_TYPES}
    inside = dict(zip(NS_TYPES, r.stdout.split()))
    return {n for n in host if inside[n] != host[n]}


def test_share_flags_remove_exactly_those_namespaces_and_unshare_adds():
    """--unshare-NS adds to the defaults (it never silently drops the rest); --share-NS removes."""
    assert _new_namespaces() == set(nsfast.DEFAULT_NAMESPACES)
    assert _new_namespaces("--unshare-uts") == set(nsfast.DEFAULT_NAMESPACES)
    assert _new_namespaces("--share-pid", "--share-ipc") == set(nsfast.DEFAULT_NAMESPACES) - {"pid", "ipc"}
    assert _new_namespaces("--unshare-time") == set(nsfast.DEFAULT_NAMESPACES) | {"time"}


@pytest.mark.parametrize("code", [0, 7, 255])
def test_exit_status_passes_through(code):
    assert nsfast_cli("run", "--", "sh", "-c", f"exit {code}").returncode == code


def test_death_by_signal_exits_128_plus_n():
    # No pid namespace, so the shell can signal itself.
    r = nsfast_cli("run", "--share-pid", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15


def test_stdio_is_inherited():
    r = nsfast_cli("run", "--", "sh", "-c", "cat; echo err >&2", input="piped in\n")
    assert (r.stdout, r.stderr) == ("piped in\n", "err\n")


def test_setenv_chdir_uid_and_init_flags():
    r = nsfast_cli(
        "run",
        "--setenv",
        "GREETING",
        "hi there",
        "--chdir",
        "/usr",
        "--uid",
        "123",
        "--init",
        "--",
        "sh",
        "-c",
        'echo "$GREETING"; pwd; id -u; echo $$',
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["hi there", "/usr", "123", "2"]


def test_missing_command_exits_127_with_a_message():
    r = nsfast_cli("run", "--", "nsfast-no-such-command")
    assert r.returncode == 127
    assert "nsfast-no-such-command" in r.stderr
    assert "No such file or directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_spec_exits_125_naming_the_field():
    r = nsfast_cli("run", "--tmpfs", "/nsfast-no-such-dir", "--", "true")
    assert r.returncode == 125
    assert r.stderr.startswith("nsfast: mounts: ")
    assert "Traceback" not in r.stderr


def test_bad_flag_exits_non_zero_with_usage():
    r = nsfast_cli("run", "--no-such-flag", "--", "true")
    assert r.returncode == 2
    assert "usage:" in r.stderr
    assert "--no-such-flag" in r.stderr
    assert r.stdout == ""


def test_missing_command_after_flags_exits_2_with_usage():
    r = nsfast_cli("run", "--hostname", "x")
    assert r.returncode == 2
    assert "usage:" in r.stderr and "missing command" in r.stderr


def test_run_help_lists_the_borrowed_flags():
    r = nsfast_cli("run", "--help")
    assert r.returncode == 0
    for flag in ("--bind", "--ro-bind", "--tmpfs", "--hostname", "--unshare-net", "--share-net", "--chdir", "--setenv"):
        assert flag in r.stdout


# -- the caller's terminal --------------------------------------------------------------------

SETSID = shutil.which("setsid")


def run_on_a_terminal(*argv: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run argv as the leader of a new session whose controlling terminal is a fresh pty on its
    stdin (a user's shell, in small), stdout/stderr captured. Returns the result and how many
    bytes are then waiting to be read from the terminal (what a shell would read next)."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)  # count every byte typed, not just whole lines
        r = subprocess.run(
            [SETSID, "--wait", "--ctty", *argv], stdin=slave, capture_output=True, text=True, timeout=60, cwd="/"
        )
        pending = struct.unpack("i", fcntl.ioctl(slave, termios.FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(slave)
        os.close(master)
    return r, pending


TERMINAL_PROBE = (
    PY_ERRNO
    + """\
import fcntl, os, termios
print(json.dumps({"sid": os.getsid(0), "pid": os.getpid(),
                  "open /dev/tty": attempt(lambda: os.close(os.open("/dev/tty", os.O_RDWR))),
                  "TIOCSTI": attempt(lambda: fcntl.ioctl(0, termios.TIOCSTI, b"x"))}))
"""
)


@pytest.mark.skipif(SETSID is None, reason="needs setsid (util-linux)")
def test_the_probe_sees_the_terminal_when_not_sandboxed():
    """The control for the two tests below: the probe, run straight on the pty, has it as
    its controlling terminal and can type into it."""
    r, pending = run_on_a_terminal("/usr/bin/python3", "-c", TERMINAL_PROBE)
    assert r.returncode == 0, r.stderr
    probe = json.loads(r.stdout)
    assert probe["sid"] == probe["pid"]
    assert (probe["open /dev/tty"], probe["TIOCSTI"]) == ("ok", "ok")
    assert pending == 1


@pytest.mark.skipif(SETSID is None, reason="needs setsid (util-linux)")
@pytest.mark.parametrize("flags", [[], ["--init"], ["--share-pid"]], ids=["default", "init", "no-pid-ns"])
def test_sandbox_runs_in_its_own_session_without_the_callers_terminal(flags):
    r, pending = run_on_a_terminal(
        sys.executable,
        "-m",
        "nsfast",
        "run",
        *flags,
        "--",
        "python3",
        "-c",
        TERMINAL_PROBE + "print('on stdout'); print('on stderr', file=sys.stderr)",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    probe = json.loads(lines[0])
    # A session of the sandbox's own: nsfast's init (pid 1, the default with a pid namespace)
    # leads it, or the command does. In the caller's session, getsid() would be 0 (a leader
    # outside the pid namespace) or its sid.
    assert probe["sid"] == (probe["pid"] if flags == ["--share-pid"] else 1)
    assert probe["open /dev/tty"] == "ENXIO"  # no controlling terminal at all
    assert lines[1:] == ["on stdout"] and r.stderr == "on stderr\n"


@pytest.mark.skipif(SETSID is None, reason="needs setsid (util-linux)")
def test_sandbox_cannot_type_into_the_callers_terminal_cve_2017_5226():
    """TIOCSTI pushes bytes into a terminal's input, for the caller's shell to run on exit;
    without CAP_SYS_ADMIN it works only on one's controlling terminal, which a sandbox has not."""
    r, pending = run_on_a_terminal(sys.executable, "-m", "nsfast", "run", "--", "python3", "-c", TERMINAL_PROBE)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["TIOCSTI"] == "EPERM"
    assert pending == 0


def test_stdin_still_reaches_a_sandbox_in_its_own_session():
    r = nsfast_cli(
        "run",
        "--",
        "python3",
        "-c",
        "import os, sys; print(os.getsid(0), sys.stdin.read())",
        input="typed",
    )
    assert (r.returncode, r.stdout) == (0, "1 typed\n")  # init (pid 1) leads the session


def test_version_unknown_flags_and_unreadable_namespaces_give_clear_errors():
    """`--version` answers; an unknown `run` flag prints run's usage, not the top-level one;
    a process whose namespaces cannot be read is an error line, not a traceback."""
    r = nsfast_cli("--version")
    assert (r.returncode, r.stdout) == (0, f"nsfast {nsfast.__version__}\n")
    r = nsfast_cli("run", "--bogus", "--", "true")
    assert r.returncode == 2 and "usage: nsfast run" in r.stderr and "unrecognized arguments: --bogus" in r.stderr
    assert nsfast_cli("run", "--", "sh", "-c", "echo --bogus").stdout == "--bogus\n"  # after --: the command's
    # A sandbox (as nobody, from a rootless caller) cannot read root's /proc/PID/ns.
    # (The system python: this venv's may live under a 0700 /root.)
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-m",
            "nsfast",
            "ns",
            str(os.getpid()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": PYTHON_SRC, "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"nsfast: cannot read the namespaces of {os.getpid()}: "), r.stderr
