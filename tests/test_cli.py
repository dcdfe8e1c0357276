"""The `nsfast run` command line (`python -m nsfast`), driven as a user would."""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import tty
from pathlib import Path
from typing import List

import psutil
import pytest

import nsfast
from conftest import CGROUP_ENV, PY_ERRNO, PYTHON_SRC, running_with_cmdline, suite, wait_until
from nsfast import cli

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
        env={"PYTHONPATH": PYTHON_SRC, "PATH": "/usr/bin:/bin", **CGROUP_ENV},
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"nsfast: cannot read the namespaces of {os.getpid()}: "), r.stderr


# -- limits, --timeout, --json ------------------------------------------------------------------


def json_report(r: subprocess.CompletedProcess) -> dict:
    """The --json object: the last line of stderr (the command's own stderr comes before)."""
    assert r.stderr.endswith("\n"), r.stderr
    return json.loads(r.stderr.splitlines()[-1])


USAGE_FIELDS = {f.name for f in dataclasses.fields(nsfast.Usage)}
ALLOC_200M = "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); print('survived')"


def test_memory_flag_oom_kills_a_program_over_the_limit():
    r = nsfast_cli("run", "--memory", "64M", "--json", "--", "python3", "-c", ALLOC_200M)
    assert r.returncode == 128 + signal.SIGKILL, r.stderr
    assert r.stdout == ""
    report = json_report(r)
    assert report["returncode"] == -signal.SIGKILL and report["exit_status"] == 137
    assert report["usage"]["oom_killed"] is True
    assert report["usage"]["memory_peak_bytes"] <= 64 << 20
    # The control: the same program under the default limit (1G) survives.
    r = nsfast_cli("run", "--", "python3", "-c", ALLOC_200M)
    assert (r.returncode, r.stdout) == (0, "survived\n"), r.stderr


FORK_BOMB = """\
import errno, os, signal
made = 0
for _ in range(200):  # bounded even if the limit were not applied
    try:
        pid = os.fork()
    except OSError as e:
        print(made, errno.errorcode[e.errno])
        break
    if pid == 0:
        signal.pause()  # killed with the pid namespace when pid 1 exits
    made += 1
else:
    print(made, "no limit")
"""


def test_pids_flag_stops_a_fork_bomb():
    r = nsfast_cli("run", "--pids", "10", "--json", "--", "python3", "-c", FORK_BOMB)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "8\tEAGAIN\n".replace("\t", " ")  # 10 processes: nsfast-init, python, 8 children
    assert json_report(r)["usage"]["pids_peak"] == 10


def _limits(*flags: str) -> nsfast.Limits | None:
    return cli.limits_from_args(cli.build_parser().parse_args(["run", *flags, "--", "true"]))


def test_limit_flags_replace_one_field_of_the_defaults():
    """--memory keeps the default pids limit (and the other way round); --no-limits drops the
    defaults, keeping only the limit flags given with it."""
    d = nsfast.DEFAULT_LIMITS
    assert _limits() is d
    assert _limits("--memory", "256M") == dataclasses.replace(d, memory=256 << 20)
    assert _limits("--pids", "7", "--cpus", "0.5") == dataclasses.replace(d, pids=7, cpu=0.5)
    assert _limits("--no-limits") is None
    assert _limits("--no-limits", "--pids", "7") == nsfast.Limits(pids=7)


def test_memory_flag_keeps_the_default_pids_limit_in_the_sandbox():
    # The default pids limit is also the sandbox's RLIMIT_NPROC, visible inside.
    script = "grep 'Max processes' /proc/self/limits"
    r = nsfast_cli("run", "--memory", "256M", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[2:4] == [str(nsfast.DEFAULT_LIMITS.pids)] * 2
    r = nsfast_cli("run", "--no-limits", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[2] != str(nsfast.DEFAULT_LIMITS.pids)


def test_timeout_kills_the_sandbox_and_exits_124():
    start = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, "-m", "nsfast", "run", "--timeout", "0.5", "--json", "--", "sleep", "10.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    out, err = p.communicate(timeout=30)
    elapsed = time.monotonic() - start
    assert p.returncode == 124, err
    assert elapsed < 2.5  # ~0.5 s plus the interpreter's start
    assert out == ""
    assert err.splitlines()[0] == "nsfast: timed out after 0.5 s: the sandbox was killed"
    report = json.loads(err.splitlines()[-1])
    assert (report["timed_out"], report["exit_status"], report["returncode"]) == (True, 124, None)
    assert report["usage"]["timed_out"] is True and 0.5 <= report["usage"]["wall_s"] < 2
    assert running_with_cmdline("10.5") == []  # the sleep went with the sandbox
    assert glob.glob(f"/sys/fs/cgroup/**/sb-{p.pid}-*", recursive=True) == []  # its cgroups too


def test_timeout_that_does_not_fire_keeps_the_commands_status():
    r = nsfast_cli("run", "--timeout", "30", "--", "sh", "-c", "exit 3")
    assert (r.returncode, r.stderr) == (3, "")
    r = nsfast_cli("run", "--timeout", "0", "--", "true")  # 0: no timeout, as timeout(1)
    assert (r.returncode, r.stderr) == (0, "")


def test_json_reports_result_and_usage_and_leaves_the_commands_output_alone():
    r = nsfast_cli("run", "--json", "--", "sh", "-c", "echo out; echo err >&2; exit 5")
    assert r.returncode == 5
    assert r.stdout == "out\n"
    assert r.stderr.splitlines()[0] == "err"
    report = json_report(r)
    assert set(report) == {"args", "returncode", "exit_status", "timed_out", "usage", "error"}
    assert report["args"] == ["sh", "-c", "echo out; echo err >&2; exit 5"]
    assert (report["returncode"], report["exit_status"], report["timed_out"], report["error"]) == (5, 5, False, None)
    assert set(report["usage"]) == USAGE_FIELDS
    assert report["usage"]["wall_s"] > 0 and report["usage"]["cpu_user_s"] is not None


def test_json_file_gets_the_report_and_stderr_stays_the_commands(tmp_path):
    path = tmp_path / "report.json"
    r = nsfast_cli("run", "--json-file", str(path), "--share-pid", "--", "sh", "-c", "echo err >&2; kill -KILL $$")
    assert (r.returncode, r.stdout, r.stderr) == (137, "", "err\n")
    report = json.loads(path.read_text())
    assert (report["returncode"], report["exit_status"]) == (-signal.SIGKILL, 137)
    assert set(report["usage"]) == USAGE_FIELDS


def test_json_reports_nsfast_errors_too():
    r = nsfast_cli("run", "--json", "--", "nsfast-no-such-command")
    assert r.returncode == 127
    line, obj = r.stderr.splitlines()
    report = json.loads(obj)
    assert (report["returncode"], report["exit_status"], report["usage"]) == (None, 127, None)
    assert line == f"nsfast: {report['error']}"


def test_cpu_time_flag_stops_a_busy_loop():
    r = nsfast_cli("run", "--cpu-time", "1", "--json", "--", "python3", "-c", "while True: pass", timeout=30)
    assert r.returncode not in (0, 124, 125), r.stderr
    usage = json_report(r)["usage"]
    assert usage["termination"] == "cpu_time" and 1 <= usage["cpu_user_s"] + usage["cpu_system_s"] < 3, usage


# -- errors: one line, a documented status --------------------------------------------------


@pytest.mark.parametrize(
    "argv, status, line",
    [
        (["run", "--memory", "lots", "--", "true"], 125, "nsfast: --memory: is not a size: 'lots'"),
        (["run", "--memory", "100K", "--", "true"], 125, "nsfast: --memory: must be at least 1M"),
        (["run", "--pids", "-1", "--", "true"], 125, "nsfast: --pids: must be >= 1, got -1"),
        (["run", "--cpus", "0", "--", "true"], 125, "nsfast: --cpus: must be a number of cores"),
        (["run", "--timeout", "-1", "--", "true"], 125, "nsfast: --timeout: must be a number of seconds >= 0"),
        (["run", "--uid", "-1", "--", "true"], 125, "nsfast: uid: must be in 0..4294967294"),
        (["run", "--cap-add", "CAP_NOPE", "--", "true"], 125, "nsfast: capabilities: has an unknown capability"),
        (["run", "--setenv", "A=B", "x", "--", "true"], 125, "nsfast: env: has an invalid entry 'A=B'"),
        (["run", "--chdir", "relative", "--", "true"], 125, "nsfast: cwd: must be an absolute path"),
        (["run", "--chdir", "/nsfast-nonexistent", "--", "true"], 125, "nsfast: chdir: [Errno 2] No such file"),
        (["run", "--rootfs", "/nsfast-nonexistent", "--", "true"], 125, "nsfast: rootfs: is not an existing directory"),
        (["run", "--bind", "/nsfast-nonexistent", "/mnt", "--", "true"], 125, "nsfast: Bind.src: does not exist"),
        (["run", "--json-file", "/nsfast-nonexistent/r.json", "--", "true"], 125, "nsfast: --json-file: cannot write"),
        (["run", "--", "nsfast-no-such-command"], 127, "nsfast: exec: [Errno 2] No such file or directory"),
        (["run", "--", "/etc/passwd"], 126, "nsfast: exec: [Errno 13] Permission denied: '/etc/passwd'"),
        (["run", "--", "/etc"], 126, "nsfast: exec: [Errno 13] Permission denied: '/etc'"),
        (["exec", "nsfast-no-such-container", "--", "true"], 125, "nsfast: no container named"),
        (["exec", "999999999", "--", "true"], 125, "nsfast: no process 999999999"),
        (["stop", "nsfast-no-such-container"], 1, "nsfast: no container named"),
        (["ns", "nsfast-no-such-container"], 1, "nsfast: no such process or container"),
        (["ns", "0"], 1, "nsfast: no such process or container: 0"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_user_errors_are_one_line_with_a_documented_status(argv, status, line):
    r = nsfast_cli(*argv)
    assert (r.returncode, r.stdout) == (status, ""), r.stderr
    assert r.stderr.startswith(line) and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize(
    "argv, line",
    [
        (["run", "--pids", "many", "--", "true"], "argument --pids: invalid int value: 'many'"),
        (["run", "--unshare-bogus", "--", "true"], "unknown namespace type 'bogus' in --unshare-bogus"),
        (["run", "--share-netw", "--", "true"], "unknown namespace type 'netw' in --share-netw"),
        (["run", "--share-n", "--", "true"], "unknown namespace type 'n'"),  # no abbreviations
        (["run", "--mem", "1G", "--", "true"], "unrecognized arguments: --mem"),
        (["run", "-d", "--timeout", "1", "--", "true"], "--timeout cannot be used with -d"),
        (["run", "--json", "--json-file", "x", "--", "true"], "not allowed with argument --json"),
        (["exec", "x"], "missing command"),
        (["stop"], "the following arguments are required: NAME"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_command_lines_that_do_not_parse_exit_2_with_usage(argv, line):
    r = nsfast_cli(*argv)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    usage, error = r.stderr.splitlines()[0], r.stderr.splitlines()[-1]
    assert usage.startswith(f"usage: nsfast {argv[0]}") and line in error, r.stderr
    assert "Traceback" not in r.stderr


def test_exec_errors_in_a_running_container_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NSFAST_STATE_DIR", str(tmp_path / "state"))
    assert nsfast_cli("run", "-d", "--name", "errs", "--", "sleep", "1000").returncode == 0
    try:
        for argv, status, line in [
            (["--chdir", "/nsfast-nonexistent", "errs", "--", "true"], 125, "nsfast: chdir: [Errno 2]"),
            (["errs", "--", "nsfast-no-such-command"], 127, "nsfast: exec: [Errno 2] No such file or directory"),
            (["errs", "--", "/etc"], 126, "nsfast: exec: [Errno 13] Permission denied"),
            (["--setenv", "A=B", "x", "errs", "--", "true"], 125, "nsfast: env: has an invalid entry"),
        ]:
            r = nsfast_cli("exec", *argv)
            assert (r.returncode, r.stdout) == (status, ""), (argv, r.stderr)
            assert r.stderr.startswith(line) and r.stderr.count("\n") == 1, (argv, r.stderr)
    finally:
        assert nsfast_cli("stop", "-t", "0", "errs").returncode == 0


def test_a_state_directory_that_cannot_be_made_is_one_line(monkeypatch):
    monkeypatch.setenv("NSFAST_STATE_DIR", "/proc/nsfast-no-such-dir")  # mkdir there: ENOENT
    r = nsfast_cli("run", "-d", "--", "true")
    assert r.returncode == 125 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("nsfast: ") and r.stderr.count("\n") == 1, r.stderr


def test_run_help_documents_limits_timeout_json_and_exit_statuses():
    r = nsfast_cli("run", "--help")
    assert r.returncode == 0
    for text in ("--memory", "--pids", "--cpus", "--cpu-time", "--no-limits", "--timeout", "--json", "--json-file"):
        assert text in r.stdout
    assert "exit 124, as timeout(1)" in " ".join(r.stdout.split())
    for status in ("124", "125", "126", "127", "128+N"):
        assert status in r.stdout
    assert "--unshare-user alone keeps" in " ".join(r.stdout.split())


# -- namespaces: --unshare-NS adds, --share-NS removes -----------------------------------------


def _ns_of(*flags: str) -> dict:
    """namespace type -> inode, of a sandbox started with `flags` (nsfast.namespaces inside)."""
    code = "import json, nsfast; print(json.dumps(nsfast.namespaces()))"
    r = nsfast_cli(
        "run", *flags, "--ro-bind", PYTHON_SRC, "/mnt", "--setenv", "PYTHONPATH", "/mnt", "--", "python3", "-c", code
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_unshare_user_alone_keeps_every_default_namespace():
    host = nsfast.namespaces()
    inside = _ns_of("--unshare-user")
    assert {t for t in host if inside[t] != host[t]} == set(nsfast.DEFAULT_NAMESPACES)
    assert {"net", "pid", "mnt"} <= set(nsfast.DEFAULT_NAMESPACES)


def test_share_net_gives_the_hosts_network_namespace_and_only_that():
    host = nsfast.namespaces()
    inside = _ns_of("--share-net")
    assert inside["net"] == host["net"]
    assert {t for t in host if inside[t] != host[t]} == set(nsfast.DEFAULT_NAMESPACES) - {"net"}


def test_unshare_and_share_combine():
    host = nsfast.namespaces()
    inside = _ns_of("--unshare-all", "--share-net", "--share-ipc", "--unshare-user")
    assert {t for t in host if inside[t] != host[t]} == {"user", "mnt", "pid", "uts", "cgroup"}
    inside = _ns_of("--unshare-time", "--share-uts")
    assert {t for t in host if inside[t] != host[t]} == (set(nsfast.DEFAULT_NAMESPACES) | {"time"}) - {"uts"}
    # --share wins over --unshare of the same type, whatever the order.
    inside = _ns_of("--share-net", "--unshare-net")
    assert inside["net"] == host["net"]


def test_exec_timeout_and_json():
    name = f"cli-exec-{os.getpid()}"
    r = nsfast_cli("run", "-d", "--name", name, "--", "sleep", "300")
    assert r.returncode == 0, r.stderr
    try:
        t = time.monotonic()
        r = nsfast_cli("exec", "--timeout", "0.3", "--json", name, "--", "sleep", "30")
        assert r.returncode == 124 and time.monotonic() - t < 10, r.stderr
        report = json.loads(r.stderr.strip().splitlines()[-1])
        assert report["timed_out"] is True and report["exit_status"] == 124
        r = nsfast_cli("exec", "--json", name, "--", "sh", "-c", "exit 3")
        report = json.loads(r.stderr.strip().splitlines()[-1])
        assert (r.returncode, report["returncode"], report["usage"]["termination"]) == (3, 3, "exit")
    finally:
        nsfast_cli("stop", "-t", "0", name)


def test_ctrl_c_in_run_still_writes_the_json_report(tmp_path):
    out = tmp_path / "report.json"
    p = subprocess.Popen(
        [sys.executable, "-m", "nsfast", "run", "--json-file", str(out), "--", "sleep", "31.27"],
        env={"PYTHONPATH": PYTHON_SRC, "PATH": "/usr/bin:/bin", **CGROUP_ENV},
        stderr=subprocess.DEVNULL,
    )
    try:
        # The sandboxed sleep itself (the CLI's own cmdline has the words too).
        sleeping = lambda: any(q.info["cmdline"] == ["sleep", "31.27"] for q in psutil.process_iter(["cmdline"]))  # noqa: E731
        assert wait_until(sleeping, timeout=10)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 130
    finally:
        p.kill()
        p.wait()
    report = json.loads(out.read_text())
    assert report["exit_status"] == 130 and "interrupted" in report["error"]
    assert not sleeping()


def test_overlay_flags(busybox_rootfs, tmp_path):
    before = sorted(os.listdir(busybox_rootfs))
    r = nsfast_cli("run", "--rootfs", str(busybox_rootfs), "--overlay", "--", "/bin/sh", "-c", "echo hi > /x; cat /x")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "")
    assert sorted(os.listdir(busybox_rootfs)) == before
    up = tmp_path / "up"
    up.mkdir()
    args = ("run", "--rootfs", str(busybox_rootfs), "--overlay", "--overlay-upper", str(up), "--")
    r = nsfast_cli(*args, "/bin/sh", "-c", "echo kept > /k")
    assert r.returncode == 0, r.stderr
    assert (up / "upper" / "k").read_text() == "kept\n"
    r = nsfast_cli("run", "--rootfs", str(busybox_rootfs), "--overlay", "--overlay-size", "64k", "--",
                   "/bin/sh", "-c", "dd if=/dev/zero of=/big bs=64k count=4")  # fmt: skip
    assert r.returncode != 0 and "No space left" in r.stderr
    r = nsfast_cli("run", "--overlay-size", "1M", "--", "true")
    assert (r.returncode, r.stderr) == (125, "nsfast: overlay_size: needs overlay=True or an Overlay mount\n")


def test_exec_runs_as_the_containers_main_process_does(tmp_path, monkeypatch):
    """`nsfast exec` once started its process as the container's root, without the seccomp
    filter or the container's process limit: its main process (same user namespace) could
    ptrace it once it exec'd and drive an unfiltered process. It now gets the main process's
    ids, capabilities, filter and RLIMIT_NPROC, as recorded at `run -d`."""
    monkeypatch.setenv("NSFAST_STATE_DIR", str(tmp_path / "state"))
    probe = "id -u; grep -E '^(Seccomp|CapEff):' /proc/self/status; grep 'Max processes' /proc/self/limits"
    assert (
        nsfast_cli("run", "-d", "--name", "asmain", "--uid", "1000", "--pids", "40", "--", "sleep", "1000").returncode
        == 0
    )
    try:
        r = nsfast_cli("exec", "asmain", "--", "sh", "-c", probe)
        assert r.returncode == 0, r.stderr
        uid, caps, seccomp, nproc = r.stdout.splitlines()
        assert (uid, seccomp.split(), caps.split()) == ("1000", ["Seccomp:", "2"], ["CapEff:", "0000000000000000"])
        assert nproc.split()[2:4] == ["40", "40"]
    finally:
        assert nsfast_cli("stop", "-t", "0", "asmain").returncode == 0


def test_out_of_range_pids_and_stop_times_are_one_line_errors(tmp_path, monkeypatch):
    """Each once ended in an OverflowError traceback; a bad `stop -t` after SIGTERM was sent."""
    monkeypatch.setenv("NSFAST_STATE_DIR", str(tmp_path / "state"))
    r = nsfast_cli("exec", "99999999999999999999", "--", "true")
    assert (r.returncode, r.stderr.count("\n")) == (125, 1) and "Traceback" not in r.stderr, r.stderr
    assert nsfast_cli("run", "-d", "--name", "badstop", "--", "sleep", "1000").returncode == 0
    try:
        for t in ("inf", "nan", "-1", "1e300"):
            r = nsfast_cli("stop", "-t", t, "badstop")
            assert (r.returncode, r.stderr.count("\n")) == (2, 1) and "Traceback" not in r.stderr, (t, r.stderr)
        assert "badstop" in nsfast_cli("ps").stdout  # never signalled
    finally:
        assert nsfast_cli("stop", "-t", "0", "badstop").returncode == 0


def test_exec_timeout_kills_what_the_exec_left_in_its_session(tmp_path, monkeypatch):
    """`nsfast exec --timeout` killed only its command: a shell's background jobs went on
    running in the container, although the help says everything the exec started is killed."""
    monkeypatch.setenv("NSFAST_STATE_DIR", str(tmp_path / "state"))
    assert nsfast_cli("run", "-d", "--name", "jobs", "--", "sleep", "1000").returncode == 0
    try:
        r = nsfast_cli("exec", "--timeout", "0.5", "jobs", "--", "sh", "-c", "sleep 1001 & sleep 1002 & wait")
        assert r.returncode == 124, r.stderr
        assert wait_until(lambda: not running_with_cmdline("sleep 1001") and not running_with_cmdline("sleep 1002"), 5)
    finally:
        assert nsfast_cli("stop", "-t", "0", "jobs").returncode == 0


def test_a_cli_killed_while_it_starts_a_container_leaves_none_unknown(tmp_path, monkeypatch):
    """The state was saved only after the command ran: a `run -d` killed in between (a
    closed terminal, the OOM killer) left a running container that no command knew. The
    state is saved before the command's gate opens now: killed before, the container never
    runs; once the command runs, `stop` finds it. Each round kills the CLI the moment the
    command exists (nsfast-init, the CLI's child, has a child)."""
    monkeypatch.setenv("NSFAST_STATE_DIR", str(tmp_path / "state"))
    token = f"{os.getpid()}{time.monotonic_ns() % 100000}"

    def children(pid: int) -> List[int]:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            return [int(x) for t in tasks for x in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except OSError:
            return []

    for i in range(10):
        cli = subprocess.Popen([sys.executable, "-m", "nsfast", "run", "-d", "--name", f"k{i}", "--", "sleep", token],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and cli.poll() is None:
            if any(children(init) for init in children(cli.pid)):
                break
        cli.kill()
        cli.wait()
        nsfast_cli("stop", "-t", "0", f"k{i}")
        assert wait_until(lambda: not running_with_cmdline(f"sleep {token}"), 5), f"round {i}: a container nobody knows"
