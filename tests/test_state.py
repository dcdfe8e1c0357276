"""The state of detached containers (nsfast._state) and what `nsfast ps/stop/exec` do with it.
Each test performs the attack it names: a planted symlink or foreign directory, a state.json
naming another process or cgroup. The state root is a temporary directory ($NSFAST_STATE_DIR);
the attacks aim at files and processes the test made, and those must come through unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import psutil
import pytest

from conftest import PYTHON_SRC, Subreaper, suite, wait_until
from nsfast import NsfastError, _state

pytestmark = suite

NOBODY = 65534
STATE_DIR_VAR = "NSFAST_STATE_DIR"  # overrides the state root
NS_TYPES = ("mnt", "pid", "uts", "ipc", "net", "cgroup")


def nsfast_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsfast", *args], capture_output=True, text=True, timeout=timeout, cwd="/"
    )


def proc_start_time(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2 :].split()[19])


def proc_start_time_or_none(pid: int) -> Optional[int]:
    try:
        return proc_start_time(pid)
    except FileNotFoundError:
        return None


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def snapshot(d: Path) -> Dict[str, Any]:
    """Every entry under `d` with its mode, owner and content: to prove it unchanged."""
    out: Dict[str, Any] = {}
    for p in sorted(d.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(d))] = (st.st_mode, st.st_uid, p.read_bytes() if p.is_file() else None)
    return out


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The state root the CLI (and _state in this process) use: tmp_path/state, not made yet."""
    monkeypatch.setenv(STATE_DIR_VAR, str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def helper() -> Iterator[psutil.Process]:
    """A process of the test's own, which no state may make nsfast signal."""
    p = subprocess.Popen(["sleep", "1000"])
    try:
        yield psutil.Process(p.pid)
    finally:
        p.kill()
        p.wait()


def assert_alive(p: psutil.Process) -> None:
    assert p.is_running() and p.status() != psutil.STATUS_ZOMBIE


def helper_state(name: str, p: psutil.Process) -> Dict[str, Any]:
    """A state.json that, if believed, names `p`: its pid, start time and namespaces."""
    return {
        "name": name,
        "pid": p.pid,
        "start_time": proc_start_time(p.pid),
        "command": ["sleep", "1000"],
        "created": time.time(),
        "env": {},
        "cwd": "/",
        "cgroup_paths": [],
        "namespaces": list(NS_TYPES),
        "cgroup_inodes": [],
        "ns_inodes": {t: os.stat(f"/proc/{p.pid}/ns/{t}").st_ino for t in NS_TYPES},
    }


class Box(NamedTuple):
    name: str
    state_file: Path
    state: Dict[str, Any]  # as written by `nsfast run -d`

    @property
    def pid(self) -> int:
        return int(self.state["pid"])

    @property
    def cgroups(self) -> List[str]:
        return list(self.state["cgroup_paths"])

    def forge(self, **changes: Any) -> None:
        self.state_file.write_text(json.dumps({**self.state, **changes}))

    def assert_untouched(self) -> None:
        """Its process is alive (the same one) and its cgroups are still there."""
        assert proc_start_time(self.pid) == self.state["start_time"]
        assert psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        assert all(os.path.isdir(p) for p in self.cgroups)
        assert self.state_file.exists()


@pytest.fixture
def box(root: Path, subreaper: Subreaper) -> Iterator[Box]:
    """A detached container running `sleep 1000`. Afterwards its real state is put back, it is
    stopped and (re-parented to us by the subreaper) reaped."""
    r = nsfast_cli("run", "-d", "--name", "box", "--", "sleep", "1000")
    assert r.returncode == 0, r.stderr
    state_file = root / "box" / "state.json"
    original = state_file.read_text()
    b = Box("box", state_file, json.loads(original))
    try:
        yield b
    finally:
        if state_file.parent.is_dir() and not state_file.parent.is_symlink():
            state_file.write_text(original)
            nsfast_cli("stop", "-t", "0", "box")
        try:
            if subreaper.wait_exit(b.pid, 10) is None:
                subreaper.kill_and_reap(b.pid)
        except ChildProcessError:  # reaped by the test already (or, unexpectedly, not ours)
            if proc_start_time_or_none(b.pid) == b.state["start_time"]:
                os.kill(b.pid, signal.SIGKILL)
        for p in b.cgroups:  # only if stop could not: the cgroup this test's container made
            if os.path.isdir(p):
                os.rmdir(p)


# -- directories and files -------------------------------------------------------------------------


def test_state_directories_and_files_are_private_whatever_the_umask(root: Path, subreaper: Subreaper):
    r = subprocess.run(
        ["sh", "-c", 'umask 000; exec "$0" -m nsfast run -d --name m -- true', sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    try:
        assert (mode(root), mode(root / "m")) == (0o700, 0o700)
        assert sorted(os.listdir(root / "m")) == ["log", "state.json"]  # no temp file left
        assert (mode(root / "m" / "state.json"), mode(root / "m" / "log")) == (0o600, 0o600)
    finally:
        pid = json.loads((root / "m" / "state.json").read_text())["pid"]
        assert nsfast_cli("stop", "m").returncode == 0
        subreaper.wait_exit(pid, 10)


@pytest.mark.parametrize(
    "command",
    [["run", "-d", "--name", "x", "--", "true"], ["ps"], ["stop", "x"], ["exec", "x", "--", "true"]],
    ids=lambda c: c[0],
)
def test_a_symlink_at_the_state_root_is_refused_not_followed(tmp_path: Path, monkeypatch, command):
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (target / "canary").write_text("keep me\n")
    (target / "x").mkdir(mode=0o700)
    (target / "x" / "state.json").write_text("{}")
    before = snapshot(target)
    link = tmp_path / "state"
    link.symlink_to(target)
    monkeypatch.setenv(STATE_DIR_VAR, str(link))
    r = nsfast_cli(*command)
    assert r.returncode == 125, r
    assert r.stderr == f"nsfast: state directory {link} is a symbolic link (refusing to follow it)\n"
    assert snapshot(target) == before
    assert link.is_symlink()


@pytest.mark.parametrize("attack", ["other-owner", "world-writable", "sticky-but-theirs"])
def test_a_state_root_below_a_directory_another_user_controls_is_refused(tmp_path: Path, monkeypatch, attack):
    """(Found by an audit.) Only the state root itself was checked: below a directory another
    user owns (or may write to), that user could swap the way to it for a symlink to any
    directory root owns (/etc/cron.d passes the root's own check), and root's nsfast would
    make its container directories there. Every directory on the way must be root's or
    ours and writable by its owner alone, or sticky with what follows root's or ours."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    if attack == "other-owner":
        os.chown(theirs, NOBODY, NOBODY)
        why = f"{theirs} is owned by uid {NOBODY}, another user"
        state = theirs / "state"
    elif attack == "world-writable":
        os.chmod(theirs, 0o777)
        (theirs / "mine").mkdir()
        why = f"{theirs} is writable by other users, who could replace {theirs}/mine"
        state = theirs / "mine" / "state"
    else:
        os.chmod(theirs, 0o1777)
        (theirs / "sub").mkdir()
        os.chown(theirs / "sub", NOBODY, NOBODY)
        why = f"{theirs} is writable by other users, who could replace {theirs}/sub"
        state = theirs / "sub" / "state"
    monkeypatch.setenv(STATE_DIR_VAR, str(state))
    r = nsfast_cli("run", "-d", "--name", "x", "--", "true")
    assert r.returncode == 125, r
    assert r.stderr == f"nsfast: state directory {state}: {why}\n"
    assert not state.exists()
    # Root's, sticky and world-writable (as /tmp), with our own directory next: fine.
    os.chown(theirs, 0, 0)
    os.chmod(theirs, 0o1777)
    ours = theirs / "ours"
    ours.mkdir(mode=0o700)
    monkeypatch.setenv(STATE_DIR_VAR, str(ours / "state"))
    assert nsfast_cli("ps").returncode == 0


@pytest.mark.parametrize("attack", ["other-owner", "group-writable"])
def test_a_state_root_another_user_could_write_to_is_refused(root: Path, attack):
    root.mkdir(mode=0o700)
    if attack == "other-owner":
        os.chown(root, NOBODY, NOBODY)
        why = f"is owned by uid {NOBODY}, not by this user (uid 0)"
    else:
        os.chmod(root, 0o770)
        why = "is writable by group or others (mode 0770)"
    for command in (["ps"], ["run", "-d", "--name", "x", "--", "true"]):
        r = nsfast_cli(*command)
        assert (r.returncode, r.stderr) == (125, f"nsfast: state directory {root} {why}\n")
    assert os.listdir(root) == []
    with pytest.raises(NsfastError, match="state directory"):
        _state.load_all()


def plant(root: Path, tmp_path: Path, how: str, state: Dict[str, Any]) -> Path:
    """Plant container "box" whose state.json, if believed, is `state`. Returns the directory
    whose contents must stay unchanged."""
    root.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (target / "state.json").write_text(json.dumps(state))
    if how == "dir-symlink":
        (root / "box").symlink_to(target)
    elif how == "file-symlink":
        (root / "box").mkdir(mode=0o700)
        (root / "box" / "state.json").symlink_to(target / "state.json")
    elif how == "dir-of-other-user":
        (root / "box").mkdir(mode=0o700)
        (root / "box" / "state.json").write_text(json.dumps(state))
        os.chown(root / "box", NOBODY, NOBODY)
    elif how == "file-of-other-user":
        (root / "box").mkdir(mode=0o700)
        (root / "box" / "state.json").write_text(json.dumps(state))
        os.chown(root / "box" / "state.json", NOBODY, NOBODY)
    else:  # a fifo: open() would block on it
        (root / "box").mkdir(mode=0o700)
        os.mkfifo(root / "box" / "state.json", 0o600)
    return target


PLANTED = {
    "dir-symlink": "state directory {root}/box is a symbolic link (refusing to follow it)",
    "file-symlink": "{root}/box/state.json is a symbolic link (refusing to follow it)",
    "dir-of-other-user": "state directory {root}/box is owned by uid 65534, not by this user (uid 0)",
    "file-of-other-user": "state file {root}/box/state.json is owned by uid 65534, not by this user (uid 0)",
    "fifo": "{root}/box/state.json is not a regular file",
}


@pytest.mark.parametrize("how", PLANTED)
def test_a_planted_container_is_reported_invalid_and_never_acted_on(root: Path, tmp_path: Path, helper, how):
    # Followed, the planted state would be a valid one naming the helper: stop would kill it.
    target = plant(root, tmp_path, how, helper_state("box", helper))
    before, planted = snapshot(target), snapshot(root)
    reason = PLANTED[how].format(root=root)
    st = _state.load("box")
    assert st is not None and st.check() == ("invalid", reason, [])
    r = nsfast_cli("ps")
    assert r.returncode == 0
    assert r.stdout.splitlines()[1].split() == ["box", "-", "-", "invalid", "-"]
    assert r.stderr == f"nsfast: box: invalid state: {reason}\n"
    r = nsfast_cli("stop", "-t", "0", "box")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"nsfast: container box has an invalid state, not stopping it: {reason}")
    r = nsfast_cli("exec", "box", "--", "true")
    assert (r.returncode, r.stderr) == (1, f"nsfast: container box has an invalid state, not entering it: {reason}\n")
    r = nsfast_cli("run", "-d", "--name", "box", "--", "true")
    assert r.returncode == 125 and "exists already" in r.stderr
    assert_alive(helper)
    assert snapshot(target) == before
    assert snapshot(root) == planted


def test_save_replaces_a_planted_state_json_symlink_instead_of_writing_through_it(root: Path, tmp_path: Path):
    target = tmp_path / "target"
    target.write_text("keep me\n")
    (root / "box").mkdir(parents=True, mode=0o700)
    (root / "box" / "state.json").symlink_to(target)
    st = _state.State(name="box", pid=1, start_time=1, command=["x"], created=0.0, env={}, cwd="/")
    st.save()
    assert target.read_text() == "keep me\n"
    assert stat.S_ISREG(os.lstat(root / "box" / "state.json").st_mode)
    assert mode(root / "box" / "state.json") == 0o600
    assert _state.load("box") == st


def test_remove_refuses_a_symlinked_container_directory(root: Path, tmp_path: Path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "state.json").write_text("{}")
    root.mkdir(mode=0o700)
    (root / "box").symlink_to(target)
    with pytest.raises(_state.StateError, match="symbolic link"):
        _state.remove("box")
    assert os.listdir(target) == ["state.json"]


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "", "x" * 129, "new\nline"])
def test_run_detached_refuses_a_name_that_is_not_a_plain_one(root: Path, name):
    r = nsfast_cli("run", "-d", "--name", name, "--", "true")
    assert r.returncode == 125 and "invalid container name" in r.stderr
    assert not root.exists() or os.listdir(root) == []


# -- what a state proves -----------------------------------------------------------------------


def test_a_valid_state_is_running_exec_works_and_stop_cleans_up(box: Box, root: Path):
    assert _state.load("box").check() == ("running", "", box.cgroups)
    r = nsfast_cli("exec", "box", "--", "sh", "-c", "echo $$")
    assert (r.returncode, r.stdout) == (0, "3\n")  # after nsfast-init (1) and sleep (2)
    r = nsfast_cli("stop", "-t", "0", "box")
    assert (r.returncode, r.stdout) == (0, "box: killed\n")
    assert not (root / "box").exists()
    assert all(not os.path.exists(p) for p in box.cgroups)


def test_an_exited_container_is_reported_exited_and_stop_cleans_up(root: Path, subreaper: Subreaper):
    """Its main process a zombie (re-parented to us, not reaped): no namespaces to compare, and
    cgroup v1 has moved it to the root cgroups; the recorded inodes prove its cgroups."""
    r = nsfast_cli("run", "-d", "--name", "done", "--", "true")
    assert r.returncode == 0, r.stderr
    state = json.loads((root / "done" / "state.json").read_text())
    try:
        assert wait_until(lambda: psutil.Process(state["pid"]).status() == psutil.STATUS_ZOMBIE, 10)
        assert _state.load("done").check() == ("exited", "", state["cgroup_paths"])
        r = nsfast_cli("stop", "done")
        assert (r.returncode, r.stdout) == (0, "done: had exited; cleaned up\n")
        assert all(not os.path.exists(p) for p in state["cgroup_paths"])
        assert not (root / "done").exists()
    finally:
        subreaper.wait_exit(state["pid"], 10)


FORGERIES = {
    # name: (changes to the real state, given the helper and the real cgroups; the reason reported)
    "helper-pid": (
        lambda h, cgs: {"pid": h.pid, "start_time": proc_start_time(h.pid)},
        "process {helper} is not in its cgroup {cgroup}",
    ),
    "helper-pid-nothing-recorded": (
        lambda h, cgs: {
            "pid": h.pid,
            "start_time": proc_start_time(h.pid),
            "cgroup_paths": [],
            "cgroup_inodes": [],
            "ns_inodes": {},
        },
        "nothing proves process {helper} is this container's (no cgroup and no namespace recorded)",
    ),
    "helper-pid-its-namespaces": (
        lambda h, cgs: {
            **helper_state("box", h),
            "cgroup_paths": cgs,
            "cgroup_inodes": [os.stat(p).st_ino for p in cgs],
        },
        "process {helper} is not in its cgroup {cgroup}",
    ),
    "memory-cgroup": (
        lambda h, cgs: {"cgroup_paths": ["/sys/fs/cgroup/memory"] + cgs[1:]},
        "cgroup path '/sys/fs/cgroup/memory' is not a sandbox cgroup (named sb-PID-N)",
    ),
    "dotdot-cgroup": (
        lambda h, cgs: {"cgroup_paths": [f"{cgs[0]}/../{os.path.basename(cgs[0])}"] + cgs[1:]},
        "cgroup path '{cgroup}/../{base}' is not normalised",
    ),
    "relative-cgroup": (
        lambda h, cgs: {"cgroup_paths": [cgs[0].lstrip("/")] + cgs[1:]},
        "cgroup path '{rel}' is not an absolute path",
    ),
    "cgroup-not-under-sys-fs-cgroup": (
        lambda h, cgs: {"cgroup_paths": ["/tmp/sb-1-0"] + cgs[1:]},
        "cgroup path '/tmp/sb-1-0' is not under /sys/fs/cgroup",
    ),
    "sandbox-cgroup-it-is-not-in": (
        lambda h, cgs: {"cgroup_paths": [os.path.dirname(cgs[0]) + "/sb-1-0"] + cgs[1:]},
        "process {pid} is not in its cgroup {parent}/sb-1-0",
    ),
    "another-containers-name": (
        lambda h, cgs: {"name": "other"},
        "corrupt state (state.json names container 'other', not 'box')",
    ),
    "pid-as-a-string": (lambda h, cgs: {"pid": str(h.pid)}, "corrupt state (state.json: pid has the wrong type)"),
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_state_naming_what_it_does_not_prove_is_invalid_and_stop_touches_nothing(box: Box, helper, forgery):
    if not box.cgroups:
        pytest.skip("the container got no cgroup here")
    changes, reason = FORGERIES[forgery]
    cg = box.cgroups[0]
    box.forge(**changes(helper, box.cgroups))
    reason = reason.format(
        helper=helper.pid,
        pid=box.pid,
        cgroup=cg,
        base=os.path.basename(cg),
        rel=cg.lstrip("/"),
        parent=os.path.dirname(cg),
    )
    # Checked in this process first: a `stop` that believed some of these would kill every
    # process of a cgroup that is not the test's.
    assert _state.load("box").check() == ("invalid", reason, [])
    r = nsfast_cli("ps")
    assert r.returncode == 0 and r.stderr == f"nsfast: box: invalid state: {reason}\n"
    assert "invalid" in r.stdout.splitlines()[1].split()
    r = nsfast_cli("stop", "-t", "0", "box")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"invalid state, not stopping it: {reason}" in r.stderr
    r = nsfast_cli("exec", "box", "--", "true")
    assert r.returncode == 1 and "invalid state, not entering it" in r.stderr
    assert_alive(helper)
    box.assert_untouched()


def test_a_stale_state_does_not_clean_up_a_cgroup_that_is_no_longer_its(box: Box, root: Path):
    """A sandbox cgroup name (sb-PID-N) comes back when a pid is reused: once its process is
    gone, a state owns a cgroup only if it has the inode recorded at creation."""
    if not box.cgroups:
        pytest.skip("the container got no cgroup here")
    gone = subprocess.Popen(["true"])
    gone.wait()
    box.forge(pid=gone.pid, cgroup_inodes=[ino + 1 for ino in box.state["cgroup_inodes"]])
    assert _state.load("box").check() == ("stale", f"its process {gone.pid} is gone", [])
    r = nsfast_cli("stop", "box")
    assert (r.returncode, r.stdout) == (0, "box: stale state removed (its process was gone)\n")
    assert not (root / "box").exists()
    assert proc_start_time(box.pid) == box.state["start_time"]
    assert all(os.path.isdir(p) for p in box.cgroups)
    # Put the real state back so that the fixture stops it.
    (root / "box").mkdir(mode=0o700)
    box.forge()


def test_a_stale_state_cleans_up_its_own_cgroup(box: Box, root: Path, subreaper: Subreaper):
    if not box.cgroups:
        pytest.skip("the container got no cgroup here")
    # Its main process ends (and is reaped) while its cgroup remains: only the inode proves it.
    os.kill(box.pid, 9)
    assert subreaper.wait_exit(box.pid, 10) == -9
    assert _state.load("box").check() == ("stale", f"its process {box.pid} is gone", box.cgroups)
    r = nsfast_cli("stop", "box")
    assert (r.returncode, r.stdout) == (0, "box: stale state removed (its process was gone)\n")
    assert all(not os.path.exists(p) for p in box.cgroups)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop to nobody")
def test_rootless_state_root_in_xdg_runtime_dir_must_be_the_users():
    """Non-root: $XDG_RUNTIME_DIR/nsfast, refused when another user (here root) made it."""
    runtime = tempfile.mkdtemp(prefix="nsfast-state-")  # pytest's tmp_path is in a 0700 root dir
    try:
        os.chown(runtime, NOBODY, NOBODY)
        os.mkdir(os.path.join(runtime, "nsfast"), 0o755)
        env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": runtime, "PYTHONPATH": PYTHON_SRC}
        r = subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "/usr/bin/python3",
                "-m",
                "nsfast",
                "ps",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert (r.returncode, r.stderr) == (
            125,
            f"nsfast: state directory {runtime}/nsfast is owned by uid 0, not by this user (uid {NOBODY})\n",
        )
        assert os.listdir(os.path.join(runtime, "nsfast")) == []
    finally:
        shutil.rmtree(runtime)
