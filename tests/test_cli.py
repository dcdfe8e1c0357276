"""The `nsfast run` command line (`python -m nsfast`), driven as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from conftest import suite

pytestmark = suite


def nsfast_cli(*args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsfast", *args], input=input, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def test_hostname_flag():
    r = nsfast_cli("run", "--hostname", "cli-box", "--", "hostname")
    assert (r.returncode, r.stdout, r.stderr) == (0, "cli-box\n", "")


def test_command_is_pid_1_in_a_read_only_root_by_default():
    r = nsfast_cli("run", "--", "sh", "-c", "echo $$; touch /x")
    assert r.returncode == 1
    assert r.stdout == "1\n"
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
    r = nsfast_cli("run", "--tmpfs", "/srv", "--ro-bind", str(tmp_path), "/srv/sub", "--", "sh", "-c",
                   "ls /srv; cat /srv/sub/f; echo x > /srv/new && cat /srv/new")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "sub\nbound\nx\n"


@pytest.mark.parametrize("flags", [[], ["--unshare-net"], ["--unshare-all"]], ids=["default", "unshare-net", "unshare-all"])
def test_network_is_unshared(flags):
    r = nsfast_cli("run", *flags, "--", "sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["lo"]


def test_share_net_flag_keeps_the_host_network():
    r = nsfast_cli("run", "--share-net", "--", "sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted(psutil.net_if_addrs())


def test_unshare_flags_pick_exactly_those_namespaces():
    r = nsfast_cli("run", "--unshare-uts", "--unshare-ipc", "--", "sh", "-c",
                   "for n in mnt pid uts ipc net; do readlink /proc/self/ns/$n; done")
    assert r.returncode == 0, r.stderr
    host = {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "pid", "uts", "ipc", "net")}
    inside = dict(zip(("mnt", "pid", "uts", "ipc", "net"), r.stdout.split()))
    assert {n for n in host if inside[n] != host[n]} == {"uts", "ipc"}


@pytest.mark.parametrize("code", [0, 7, 255])
def test_exit_status_passes_through(code):
    assert nsfast_cli("run", "--", "sh", "-c", f"exit {code}").returncode == code


def test_death_by_signal_exits_128_plus_n():
    # No pid namespace, so the shell can signal itself.
    r = nsfast_cli("run", "--unshare-uts", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15


def test_stdio_is_inherited():
    r = nsfast_cli("run", "--", "sh", "-c", "cat; echo err >&2", input="piped in\n")
    assert (r.stdout, r.stderr) == ("piped in\n", "err\n")


def test_setenv_chdir_uid_and_init_flags():
    r = nsfast_cli("run", "--setenv", "GREETING", "hi there", "--chdir", "/usr", "--uid", "123", "--init", "--",
                   "sh", "-c", 'echo "$GREETING"; pwd; id -u; echo $$')
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
