"""Exit status means the same in every mode: death by signal N is returncode -N.

With a pid namespace the sandbox's first process is nsfast-init by default (pid 1 cannot die
by a signal from inside its namespace: the kernel's SIGNAL_UNKILLABLE), which reports the
command's own wait status to the parent through a pipe only it holds. Each test runs real
sandboxes; the modes are the default, init=True, no pid namespace (with and without init),
Container.exec, and init=False, whose pid-1 limits are asserted as documented.
"""

from __future__ import annotations

import json
import signal
from typing import Any, Callable, Dict, List

import pytest

import nsfast
from conftest import PY_ERRNO, suite

pytestmark = suite

NO_PIDNS = tuple(n for n in nsfast.DEFAULT_NAMESPACES if n != "pid")

ABORT = ["python3", "-c", "import os; os.abort()"]
KILL_SELF_TERM = ["sh", "-c", "kill -TERM $$; sleep 5"]
KILL_SELF_KILL = ["sh", "-c", "kill -KILL $$; sleep 5"]


def _exec(argv: List[str], **kw: Any) -> nsfast.Result:
    limits = kw.pop("limits", nsfast.DEFAULT_LIMITS)
    with nsfast.Container(limits=limits) as c:
        return c.exec(argv, timeout=30, **kw)


def _run(spec_fields: Dict[str, Any]) -> Callable[..., nsfast.Result]:
    def run(argv: List[str], **kw: Any) -> nsfast.Result:
        kw.setdefault("timeout", 30)
        return nsfast.run(argv, **spec_fields, **kw)

    return run


# Every mode in which the command is not pid 1: all signals behave as outside a sandbox.
MODES = {
    "default": _run({}),
    "init=True": _run({"init": True}),
    "no pid namespace": _run({"namespaces": NO_PIDNS}),
    "no pid namespace, init=True": _run({"namespaces": NO_PIDNS, "init": True}),
    "Container.exec": _exec,
}
# ... and the one in which it is.
ALL_MODES = {**MODES, "init=False": _run({"init": False})}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("argv", "sig"),
    [(ABORT, signal.SIGABRT), (KILL_SELF_TERM, signal.SIGTERM), (KILL_SELF_KILL, signal.SIGKILL)],
    ids=["abort", "kill -TERM $$", "kill -KILL $$"],
)
def test_death_by_signal_is_minus_n(mode, argv, sig):
    assert MODES[mode](argv).returncode == -sig


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("code", [0, 1, 255])
def test_exit_codes_are_unchanged(mode, code):
    assert ALL_MODES[mode](["sh", "-c", f"exit {code}"]).returncode == code


def test_default_is_init_with_a_pid_namespace_only():
    r = nsfast.run(["sh", "-c", "echo $$; cat /proc/1/comm"], capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == ["2", "nsfast-init"]
    r = nsfast.run(["sh", "-c", "echo $$"], namespaces=NO_PIDNS, capture_output=True, text=True, timeout=30)
    assert int(r.stdout) > 2  # a host pid: the command itself is the first process


def test_pid_1_without_init_keeps_the_kernels_pid_1_semantics():
    # Documented (Spec.init): as pid 1 the command gets no signal it has no handler for,
    # from inside; abort() then ends in a SIGSEGV the kernel forces (-11).
    run = ALL_MODES["init=False"]
    assert run(["sh", "-c", "kill -TERM $$; kill -KILL $$; exit 3"]).returncode == 3
    assert run(ABORT).returncode == -signal.SIGSEGV
    # SIGKILL from the parent always works.
    with nsfast.spawn(["sleep", "100"], init=False) as p:
        p.kill()
        assert p.wait(timeout=10) == -signal.SIGKILL


HOG = "b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"


@pytest.mark.parametrize("mode", ALL_MODES)
def test_oom_kill_is_minus_9(mode):
    limits = nsfast.Limits(memory="48M", memory_swap="48M")
    r = ALL_MODES[mode](["python3", "-c", HOG], limits=limits, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r
    assert "survived" not in r.stdout


@pytest.mark.parametrize("mode", ["default", "init=True", "no pid namespace", "Container.spawn"])
def test_send_signal_sigterm_ends_sleep_with_minus_15(mode):
    if mode == "Container.spawn":
        with nsfast.Container() as c, c.spawn(["sleep", "100"]) as p:
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=10) == -signal.SIGTERM
        return
    fields = {"default": {}, "init=True": {"init": True}, "no pid namespace": {"namespaces": NO_PIDNS}}[mode]
    with nsfast.spawn(["sleep", "100"], **fields) as p:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == -signal.SIGTERM


def test_kill_of_the_whole_sandbox_is_minus_9_with_init():
    with nsfast.spawn(["sh", "-c", "sleep 100 & sleep 100"]) as p:
        p.kill()
        assert p.wait(timeout=10) == -signal.SIGKILL


def test_stdin_and_stdout_work_under_the_default_init():
    r = nsfast.run(["sh", "-c", "cat; echo err >&2; exit 4"], input=b"data", capture_output=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (4, b"data", b"err\n")


def test_handled_signal_reaches_the_command_by_default():
    script = "trap 'echo got-usr1; exit 5' USR1; echo ready; while :; do sleep 0.05; done"
    with nsfast.spawn(["sh", "-c", script], stdout=nsfast.PIPE, text=True) as p:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=10)
    assert (out, p.returncode) == ("got-usr1\n", 5)


# nsfast-init's status report is data from inside the sandbox: its strict parsing (one
# well-formed 8-byte record or nothing; stopped/continued/impossible statuses, garbage of
# any length, a second record) is unit-tested in rust/src/sync.rs
# (status_reports_are_parsed_strictly, status_reports_are_read_without_blocking); the
# Sandbox owns the report fd, so here only the attack on it from inside is tested.


ATTACK_INIT = r"""
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def call(ret):
    return "ok" if ret >= 0 else errno.errorcode[ctypes.get_errno()]
# The numbers are listed (as its fd count would be), but none can be opened or read.
fds = os.listdir("/proc/1/fd")
out["/proc/1/fd/N"] = sorted({attempt(lambda: open(f"/proc/1/fd/{fd}", "wb").close()) for fd in fds})
out["readlink /proc/1/fd/N"] = sorted({attempt(lambda: os.readlink(f"/proc/1/fd/{fd}")) for fd in fds})
out["/proc/1/mem"] = attempt(lambda: open("/proc/1/mem", "rb").close())
out["/proc/1/environ"] = attempt(lambda: open("/proc/1/environ", "rb").read())
out["ptrace attach"] = call(libc.ptrace(16, 1, 0, 0))
out["ptrace seize"] = call(libc.ptrace(0x4206, 1, 0, 0))
buf = ctypes.create_string_buffer(8)
class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
local = IoVec(ctypes.addressof(buf), 8)
remote = IoVec(0x400000, 8)
out["process_vm_readv"] = call(libc.process_vm_readv(1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
pidfd = os.pidfd_open(1)
got = set()
for fd in range(64):
    got.add(call(libc.syscall(438, pidfd, fd, 0)))  # pidfd_getfd
os.close(pidfd)
out["pidfd_getfd"] = sorted(got)
# No fd beyond stdio is open here: nothing to write a report with.
open_fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
out["open fds"] = open_fds
# SIGKILL and SIGSTOP from inside do not reach pid 1 (any other signal is forwarded to us).
for sig in (signal.SIGKILL, signal.SIGSTOP):
    os.kill(1, sig)
out["init alive"] = os.path.exists("/proc/1") and open("/proc/1/comm").read().strip()
print(json.dumps(out), flush=True)
os._exit(7)
"""


def test_the_command_cannot_reach_init_or_its_report_fd():
    r = nsfast.run(["python3", "-c", PY_ERRNO + ATTACK_INIT], capture_output=True, text=True, timeout=30)
    assert r.returncode == 7, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out == {
        "/proc/1/fd/N": ["EACCES"],
        "readlink /proc/1/fd/N": ["EACCES"],
        "/proc/1/mem": "EACCES",
        "/proc/1/environ": "EACCES",
        "ptrace attach": "EPERM",
        "ptrace seize": "EPERM",
        "process_vm_readv": "EPERM",
        "pidfd_getfd": ["EPERM"],
        "open fds": [],
        "init alive": "nsfast-init",
    }


def test_a_root_callers_sandbox_without_user_namespace_cannot_reach_init_either():
    # Host root without capabilities: the files of /proc/1 are root's, but init is not
    # dumpable, and that needs CAP_SYS_PTRACE.
    ns = tuple(n for n in nsfast.DEFAULT_NAMESPACES if n != "user")
    r = nsfast.run(["python3", "-c", PY_ERRNO + ATTACK_INIT], namespaces=ns, capture_output=True, text=True, timeout=30)
    assert r.returncode == 7, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["open fds"] == [] and out["init alive"] == "nsfast-init"
    assert out["/proc/1/fd/N"] == out["readlink /proc/1/fd/N"] == ["EACCES"]
    for key in ("/proc/1/mem", "/proc/1/environ"):
        assert out[key] == "EACCES", key
    for key in ("ptrace attach", "ptrace seize", "process_vm_readv"):
        assert out[key] == "EPERM", key
    assert out["pidfd_getfd"] == ["EPERM"]
