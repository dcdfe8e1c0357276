"""Zygotes (nsfast._zygote.Zygote): a warmed interpreter in a hardened sandbox, each task a
copy-on-write fork of it into namespaces, a cgroup, no capabilities and seccomp of its own.

Every test starts real tasks; nothing is mocked. Most tests share one zygote (module scope:
tasks are independent of each other, which is what several of them check); tests that kill,
crash or close a zygote start their own.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import psutil
import pytest

import nsfast
from conftest import (
    NETNS_COOKIE_CODE,
    fd_numbers,
    fd_targets,
    netns_cookie,
    running_with_cmdline,
    sandbox_cgroups,
    suite,
    thread_names,
    wait_until,
)
from nsfast._zygote import TaskError, Zygote, ZygoteError

pytestmark = [*suite, pytest.mark.usefixtures("init_binary_loaded")]  # (each id range's user namespace made)

SLEEP = shutil.which("sleep") or "/bin/sleep"
NAMESPACES = ("pid", "mnt", "ipc", "uts", "net", "cgroup")
WRITABLE = ("/tmp", "/dev/shm", "/run", "/var/tmp", "/home", "/root")

# A module the tasks of the shared zygote can import (`call` targets), in a pytest temp dir.
TASKS_MODULE = "nsfast_zt_tasks"
TASKS_SOURCE = '''
import os
import pickle


def deep_result():
    """A result nested deeper than the caller's JSON parser goes, written as the task would."""
    os.write(3, b'{"ok": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    os._exit(0)


def inflating_result(n):
    """n empty objects: 3 bytes of JSON each, ~70 bytes each once parsed."""
    body = b'{"ok": [' + b"{}," * n + b"{}]}"
    view = memoryview(body)
    while view:
        view = view[os.write(3, view) :]
    os._exit(0)


def constant_result(word):
    os.write(3, b'{"ok": [1, ' + word.encode() + b"]}")
    os._exit(0)


def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def fail(message):
    raise ValueError(message)


def allocate(n):
    b = bytearray(n)
    for i in range(0, n, 4096):
        b[i] = 1
    return len(b)


def whoami():
    return {"pid": os.getpid(), "ppid": os.getppid(), "env": dict(os.environ)}


class Exploit:
    """Unpickling this runs `cmd` in a shell."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def write_pickle_as_result(cmd):
    """Skip the JSON envelope: put a pickle where the caller reads the result."""
    os.write(3, pickle.dumps(Exploit(cmd)))
    os._exit(0)


def return_pickle_as_text(cmd):
    return pickle.dumps(Exploit(cmd)).decode("latin-1")
'''


class Exploit:
    """The same payload as the tasks module's (its pickle names only os.system)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> Any:
        return (os.system, (self.cmd,))


# -- helpers --------------------------------------------------------------------------------


def zygote_threads(pid: Optional[int]) -> List[str]:
    """The names of the threads of the zygote's sandbox (its pid 1, `pid`, and the
    interpreter below it), seen from the host."""
    assert pid is not None
    return [name for p in [pid, *descendants(pid)] for name in thread_names(p)]


def descendants(pid: int) -> List[int]:
    """Every descendant of host process `pid` (from /proc/PID/task/*/children), depth first."""
    out: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for k in kids:
            out.append(k)
            out.extend(descendants(k))
    return out


def gone(pid: int) -> bool:
    """`pid` has ended (reaped, or a zombie waiting for its parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def cgroup_text(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


def marker() -> str:
    """A unique extra argument for `sleep` (it sums its arguments): `sleep 100 MARK`."""
    return f"0.{random.randrange(10**11, 10**12)}"


def background_sleeper(mark: str) -> str:
    """Task code that leaves `sleep 100 MARK` running (stdio on /dev/null, so only its
    death, not a pipe, tells), and makes sure it runs before going on."""
    return textwrap.dedent(
        f"""
        import os, subprocess, time
        p = subprocess.Popen([{SLEEP!r}, "100", {mark!r}], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while b"{mark}" not in open(f"/proc/{{p.pid}}/cmdline", "rb").read():
            time.sleep(0.005)
        """
    )


def run_json(z: Zygote, code: str, **kw: Any) -> Any:
    """Run `code` in a task; the JSON it prints on its last line (the task must succeed)."""
    kw.setdefault("timeout", 30)
    r = z.run_python(code, text=True, **kw)
    assert r.returncode == 0, f"task failed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def host_zygote_ns(z: Zygote) -> Dict[str, set]:
    """The namespaces of the zygote's own processes, as seen from the host."""
    out: Dict[str, set] = {ns: set() for ns in NAMESPACES}
    for pid in [z.pid, *descendants(z.pid)]:
        for ns in NAMESPACES:
            try:
                out[ns].add(os.readlink(f"/proc/{pid}/ns/{ns}"))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return out


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("zygote-tasks")
    (d / f"{TASKS_MODULE}.py").write_text(TASKS_SOURCE)
    return d


_IDLE: Dict[int, List[int]] = {}  # zygote pid -> its process tree before any task


@pytest.fixture(scope="module")
def z(tasks_dir: Path) -> Iterator[Zygote]:
    """The shared zygote; the tasks module is on its path (path=: a directory below /tmp,
    which every task replaces, so the zygote binds it elsewhere)."""
    zygote = Zygote(preload=("json",), path=[str(tasks_dir)])
    _IDLE[zygote.pid] = descendants(zygote.pid)
    try:
        yield zygote
    finally:
        zygote.close()


@pytest.fixture
def own() -> Iterator[Zygote]:
    """A zygote of this test's own (it gets killed, crashed or closed)."""
    zygote = Zygote()
    try:
        yield zygote
    finally:
        zygote.close()


def idle_tree(z: Zygote) -> List[int]:
    return _IDLE[z.pid]


# -- 1. basics ------------------------------------------------------------------------------


class TestRunPython:
    def test_stdout_stderr_and_returncode(self, z: Zygote) -> None:
        """Output is captured separately; a clean end is returncode 0, termination "exit"."""
        r = z.run_python("import sys; print('out'); print('err', file=sys.stderr)", timeout=30)
        assert isinstance(r, nsfast.Result)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"out\n", b"err\n")
        assert r.usage is not None and r.usage.termination == "exit"

    @pytest.mark.parametrize(
        "code, returncode",
        [("import sys; sys.exit(3)", 3), ("import sys; sys.exit(0)", 0), ("import sys; sys.exit()", 0)],
    )
    def test_sys_exit_sets_the_returncode(self, z: Zygote, code: str, returncode: int) -> None:
        """sys.exit(n) -> n, as with `python -c`."""
        r = z.run_python(code, timeout=30)
        assert (r.returncode, r.stderr) == (returncode, b"")

    def test_sys_exit_with_a_message(self, z: Zygote) -> None:
        """sys.exit("msg") -> 1 with the message on stderr."""
        r = z.run_python("import sys; print('before'); sys.exit('goodbye, world')", timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == (1, b"before\n", b"goodbye, world\n")

    def test_uncaught_exception_prints_a_traceback(self, z: Zygote) -> None:
        """An uncaught exception -> returncode 1, its traceback on stderr."""
        r = z.run_python("def f():\n    raise ValueError('boom')\nf()\n", text=True, timeout=30)
        assert r.returncode == 1
        assert r.stderr.startswith("Traceback (most recent call last):\n")
        assert 'File "<string>", line 2, in f' in r.stderr
        assert r.stderr.endswith("ValueError: boom\n")

    @pytest.mark.parametrize(
        "code, returncode",
        [
            ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM),
            ("import os; os.abort()", -signal.SIGABRT),
            ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
        ],
        ids=["SIGTERM", "abort", "SIGKILL"],
    )
    def test_death_by_signal_is_a_negative_returncode(self, z: Zygote, code: str, returncode: int) -> None:
        """Killed by signal N -> returncode -N, termination "signal"."""
        r = z.run_python(code, timeout=30)
        assert r.returncode == returncode
        assert r.usage is not None and r.usage.termination == "signal"

    def test_input_goes_to_stdin(self, z: Zygote) -> None:
        r = z.run_python("import sys; sys.stdout.write(sys.stdin.read().upper())", input=b"hello\n", timeout=30)
        assert (r.returncode, r.stdout) == (0, b"HELLO\n")

    def test_without_input_stdin_is_empty(self, z: Zygote) -> None:
        """No input: stdin reads EOF at once (never the caller's terminal)."""
        r = z.run_python("import sys; print(repr(sys.stdin.read()))", timeout=30)
        assert (r.returncode, r.stdout) == (0, b"''\n")

    def test_large_input_and_output(self, z: Zygote) -> None:
        """8 MiB in and back out, far more than a pipe buffer, without a deadlock."""
        data = os.urandom(1 << 20) * 8
        code = "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d); sys.stderr.write(str(len(d)))"
        r = z.run_python(code, input=data, timeout=60)
        assert r.returncode == 0
        assert r.stdout == data
        assert r.stderr == str(len(data)).encode()

    def test_text_mode(self, z: Zygote) -> None:
        """text=True: input is a str, stdout and stderr are str."""
        r = z.run_python("import sys; print(input()[::-1]); print('é', file=sys.stderr)", input="olleh\n", text=True)
        assert (r.returncode, r.stdout, r.stderr) == (0, "hello\n", "é\n")

    def test_check_raises_on_failure(self, z: Zygote) -> None:
        with pytest.raises(subprocess.CalledProcessError) as info:
            z.run_python("import sys; sys.exit(7)", check=True, timeout=30)
        assert info.value.returncode == 7
        assert z.run_python("pass", check=True).returncode == 0

    def test_env_is_the_whole_environment(self, z: Zygote, monkeypatch: pytest.MonkeyPatch) -> None:
        """env= is everything the task sees: nothing of the caller's or another task's."""
        monkeypatch.setenv("NSFAST_ZT_HOST_SECRET", "leaked")
        assert run_json(z, "import os, json; print(json.dumps(dict(os.environ)))", env={"A": "1", "B": "two"}) == {
            "A": "1",
            "B": "two",
        }
        assert "A" not in run_json(z, "import os, json; print(json.dumps(dict(os.environ)))", env={"C": "3"})

    def test_default_environment_is_the_specs(self) -> None:
        """Without env=, a task gets its spec's environment: Zygote(env=...) or, by default, the
        one nsfast.Spec documents (PATH, HOME=/, TERM if set), as nsfast.run gives."""
        code = "import os, json; print(json.dumps(dict(os.environ)))"
        with Zygote(env={"ONLY": "this"}) as zz:
            assert run_json(zz, code) == {"ONLY": "this"}
            assert run_json(zz, code, env={"OTHER": "1"}) == {"OTHER": "1"}
        r = nsfast.run(["env", "-0"], capture_output=True, text=True, timeout=30)
        expected = dict(kv.split("=", 1) for kv in r.stdout.split("\0") if kv)
        assert "PATH" in expected and expected["HOME"] == "/"
        with Zygote() as zz:
            assert run_json(zz, code) == expected

    def test_argv(self, z: Zygote) -> None:
        """argv= is sys.argv[1:], after "-c" as with `python -c code args...`."""
        got = run_json(z, "import sys, json; print(json.dumps(sys.argv))", argv=["a", "b c", 3])
        assert got == ["-c", "a", "b c", "3"]

    def test_code_runs_as_main_and_exits_like_the_interpreter(self, z: Zygote) -> None:
        """The code is __main__; at the end non-daemon threads are joined and atexit runs."""
        code = textwrap.dedent(
            """
            import atexit, sys, threading, time
            print(__name__)
            atexit.register(lambda: print("atexit"))
            def late():
                time.sleep(0.2)
                print("thread")
            threading.Thread(target=late).start()
            """
        )
        r = z.run_python(code, text=True, timeout=30)
        assert (r.returncode, r.stdout) == (0, "__main__\nthread\natexit\n")


class TestConstruction:
    def test_preload_is_imported_before_any_task(self) -> None:
        with Zygote(preload=("decimal", "xml.dom.minidom")) as zz:
            assert {"decimal", "xml.dom.minidom"} <= set(zz.preload)
            got = run_json(
                zz, "import sys, json; print(json.dumps([m in sys.modules for m in ('decimal', 'xml.dom.minidom')]))"
            )
        assert got == [True, True]

    def test_bad_preload_is_rejected(self) -> None:
        with pytest.raises(TypeError):
            Zygote(preload="json")  # type: ignore[arg-type]
        with pytest.raises(nsfast.SpecError):
            Zygote(preload=("not a module",))

    def test_a_preload_that_fails_to_import_is_a_zygote_error(self) -> None:
        with pytest.raises(ZygoteError) as info:
            Zygote(preload=("nsfast_zt_no_such_module",))
        assert b"nsfast_zt_no_such_module" in info.value.stderr

    def test_path_directories_are_importable_and_read_only(self, z: Zygote, tasks_dir: Path) -> None:
        """A path= directory (here below /tmp) is on the tasks' sys.path, read-only."""
        code = textwrap.dedent(
            f"""
            import errno, json, os, {TASKS_MODULE} as m
            d = os.path.dirname(m.__file__)
            try:
                open(os.path.join(d, "written"), "w")
                w = "ok"
            except OSError as e:
                w = errno.errorcode[e.errno]
            print(json.dumps({{"on_path": d in __import__("sys").path, "write": w}}))
            """
        )
        assert run_json(z, code) == {"on_path": True, "write": "EROFS"}
        assert not (tasks_dir / "written").exists()

    def test_bad_path_is_rejected(self, tmp_path: Path) -> None:
        with pytest.raises(TypeError):
            Zygote(path=str(tmp_path))  # type: ignore[arg-type]
        with pytest.raises(nsfast.SpecError):
            Zygote(path=[str(tmp_path / "missing")])

    def test_tasks_need_pid_and_mnt_namespaces(self) -> None:
        with pytest.raises(nsfast.SpecError):
            Zygote(namespaces=("user", "mnt", "ipc", "uts", "net"))
        with pytest.raises(nsfast.SpecError):
            Zygote(namespaces=("user", "pid", "ipc", "uts", "net"))


# -- 2. isolation of each task ----------------------------------------------------------------

NS_CODE = textwrap.dedent(
    f"""
    import json, os, time
    start = time.time()
    ns = {{n: os.readlink("/proc/self/ns/" + n) for n in {NAMESPACES!r}}}
    time.sleep(1.0)
    print(json.dumps({{"ns": ns, "start": start, "end": time.time()}}))
    """
)


class TestIsolation:
    def test_each_task_is_pid_2_of_its_own_pid_namespace(self, z: Zygote) -> None:
        """A task sees only its own pid namespace: itself as pid 2 (and its own pid 1),
        never the zygote or the caller; its parent is outside (getppid() == 0)."""
        code = textwrap.dedent(
            """
            import json, os
            pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            others = {p: open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
                      for p in pids if p != os.getpid()}
            print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "pids": pids, "others": others}))
            """
        )
        for _ in range(3):
            got = run_json(z, code)
            assert got["pid"] == 2
            assert got["ppid"] == 0
            assert set(got["pids"]) <= {1, 2} and 2 in got["pids"]
            # pid 1, if any, is the task's own supervisor: not a copy of the zygote's interpreter.
            assert all("_serve" not in cmd for cmd in got["others"].values()), got["others"]

    def test_processes_of_a_task_are_in_its_pid_namespace(self, z: Zygote) -> None:
        code = textwrap.dedent(
            f"""
            import json, os, subprocess
            p = subprocess.Popen([{SLEEP!r}, "5"])
            pids = sorted(int(x) for x in os.listdir("/proc") if x.isdigit())
            p.kill(); p.wait()
            print(json.dumps({{"child": p.pid, "pids": pids}}))
            """
        )
        got = run_json(z, code)
        assert got["child"] == 3
        assert set(got["pids"]) - {1} == {2, 3}

    def test_each_task_has_namespaces_of_its_own(self, z: Zygote) -> None:
        """Three tasks at once: six namespaces each, distinct between the tasks and from the
        caller's and the zygote's."""
        results = z.map_python([NS_CODE] * 3, concurrency=3, text=True, timeout=30)
        assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
        runs = [json.loads(r.stdout) for r in results]
        assert max(r["start"] for r in runs) < min(r["end"] for r in runs), "the tasks did not overlap"
        zygote = host_zygote_ns(z)
        for ns in NAMESPACES:
            seen = [r["ns"][ns] for r in runs]
            assert len(set(seen)) == 3, (ns, seen)
            assert os.readlink(f"/proc/self/ns/{ns}") not in seen, ns
            assert not set(seen) & zygote[ns], (ns, seen, zygote[ns])

    def test_network_namespaces_are_made_ahead_and_each_used_once(self, z: Zygote) -> None:
        """A thread of the zygote's makes the tasks' network namespaces ahead; twelve tasks
        in a row get twelve (by SO_NETNS_COOKIE, never reused, unlike nsfs inode numbers),
        each with `lo` up and nothing else, none the caller's."""
        assert "nsfast-netns" in zygote_threads(z.pid)
        seen = [run_json(z, NETNS_COOKIE_CODE) for _ in range(12)]
        assert all(up and names == ["lo"] for _, up, names in seen), seen
        cookies = [c for c, _, _ in seen]
        mine = netns_cookie()
        assert len(set(cookies)) == 12 and mine not in cookies, cookies

    def test_each_task_has_a_cgroup_of_its_own(self, z: Zygote) -> None:
        """Seen from the host, two tasks at once are in two new cgroups (not the zygote's, in
        each hierarchy the zygote's sandbox has one), removed when the tasks end."""
        before = sandbox_cgroups()
        mine = f"sb-{os.getpid()}-"

        def placement(text: str) -> Dict[str, str]:
            """hierarchy -> sandbox cgroup name, for the hierarchies with one."""
            out = {}
            for line in text.splitlines():
                hid, ctrls, path = line.split(":", 2)
                leaf = path.rstrip("/").rsplit("/", 1)[-1]
                if leaf.startswith(mine):
                    out[f"{hid}:{ctrls}"] = leaf
            return out

        zygote = placement(cgroup_text(z.pid) or "")
        assert zygote and len(set(zygote.values())) == 1, zygote
        tasks: Dict[str, Dict[str, str]] = {}

        def two_tasks_placed() -> bool:
            tasks.clear()
            for pid in descendants(z.pid):
                where = placement(cgroup_text(pid) or "")
                if where and where != zygote:
                    tasks[str(pid)] = where
            # Settled: each task process in one cgroup, in every hierarchy the zygote's is in
            # (and pids: a task's pids limit is its cgroup's; the zygote's own has none).
            return len({tuple(sorted(w.items())) for w in tasks.values()}) == 2 and all(
                w.keys() >= zygote.keys() and len(set(w.values())) == 1 for w in tasks.values()
            )

        box: Dict[str, Any] = {}
        th = threading.Thread(
            target=lambda: box.update(r=z.map_python(["import time; time.sleep(1.5)"] * 2, concurrency=2, timeout=30))
        )
        th.start()
        try:
            assert wait_until(two_tasks_placed, timeout=10), tasks
            during = sandbox_cgroups()
        finally:
            th.join(30)
        assert [r.returncode for r in box["r"]] == [0, 0]
        leaves = {next(iter(w.values())) for w in tasks.values()}
        assert len(leaves) == 2 and not leaves & set(zygote.values())
        for leaf in leaves:  # they are sandbox cgroups of this process, new ones
            dirs = [d for d in during if d.rstrip("/").endswith("/" + leaf)]
            assert len(dirs) == len(tasks[next(p for p, w in tasks.items() if leaf in w.values())]), (leaf, during)
            assert not set(dirs) & set(before)
        assert wait_until(lambda: sandbox_cgroups() == before, timeout=5), "task cgroups left behind"

    def test_tmp_and_dev_shm_are_fresh_and_empty(self, z: Zygote) -> None:
        """What task A writes to /tmp or /dev/shm, task B never sees (nor the host's /tmp)."""
        name = f"nsfast-zt-{uuid.uuid4().hex}"
        r = z.run_python(
            f"open('/tmp/{name}', 'w').write('a'); open('/dev/shm/{name}', 'w').write('a'); print('written')",
            text=True,
            timeout=30,
        )
        assert (r.returncode, r.stdout) == (0, "written\n"), r.stderr
        got = run_json(z, "import os, json; print(json.dumps([os.listdir('/tmp'), os.listdir('/dev/shm')]))")
        assert got == [[], []]
        assert not os.path.exists(f"/tmp/{name}") and not os.path.exists(f"/dev/shm/{name}")

    @pytest.mark.parametrize(
        "directory",
        [
            "/tmp",
            "/dev/shm",
            "/run",
            "/var/tmp",
            "/home",
            "/root",
        ],
    )
    def test_nothing_a_task_writes_is_there_for_the_next(self, own: Zygote, directory: str) -> None:
        """Wherever a task can write, the next task does not find it (the hidden directories
        the zygote mounts a tmpfs on included)."""
        name = f"{directory}/nsfast-zt-{uuid.uuid4().hex}"
        wrote = run_json(
            own,
            f"import json\ntry:\n    open({name!r}, 'w').write('from A')\n    print('true')\n"
            "except OSError:\n    print('false')",
        )
        if directory in ("/tmp", "/dev/shm"):
            assert wrote is True, f"a task cannot write to {directory}"
        # Elsewhere a task writes to a tmpfs of its own, or (a hidden directory holding the
        # zygote's binds, such as an interpreter under /root) cannot write at all.
        assert run_json(own, f"import json, os; print(json.dumps(os.path.exists({name!r})))") is False

    def test_interpreter_state_does_not_carry_over(self, z: Zygote) -> None:
        """Globals, module attributes, sys.modules, builtins, cwd and open files of task A are
        not in task B: each starts from the zygote's state (its preloaded modules)."""
        a = textwrap.dedent(
            """
            import builtins, json, os, sys, types
            G = 1
            json.X = 1
            builtins.LEAK = 1
            sys.modules["nsfast_zt_fake"] = types.ModuleType("nsfast_zt_fake")
            sys.path.append("/nsfast-zt")
            os.chdir("/proc")
            fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
            print(json.dumps(sorted(os.listdir("/proc/self/fd"))))
            """
        )
        probe = textwrap.dedent(
            """
            import sys
            preloaded = "json" in sys.modules  # before this task imports it
            import builtins, json, os
            print(json.dumps({
                "json_preloaded": preloaded,
                "G": "G" in globals(),
                "json.X": hasattr(json, "X"),
                "LEAK": hasattr(builtins, "LEAK"),
                "fake": "nsfast_zt_fake" in sys.modules,
                "path": "/nsfast-zt" in sys.path,
                "cwd": os.getcwd(),
                "fds": sorted(os.listdir("/proc/self/fd")),
            }))
            """
        )
        clean = run_json(z, probe)
        run_json(z, a)
        after = run_json(z, probe)
        assert after == clean
        assert after["json_preloaded"] is True
        assert (after["G"], after["json.X"], after["LEAK"], after["fake"], after["path"]) == (False,) * 5
        assert after["cwd"] == "/"

    def test_background_processes_die_with_the_task(self, z: Zygote) -> None:
        """A process a task leaves running (subprocess.Popen, or os.fork) ends with it."""
        m1, m2 = marker(), marker()
        code = background_sleeper(m1) + textwrap.dedent(
            f"""
            pid = os.fork()
            if pid == 0:
                null = os.open("/dev/null", os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.execv({SLEEP!r}, ["sleep", "100", {m2!r}])
            while b"{m2}" not in open(f"/proc/{{pid}}/cmdline", "rb").read():
                time.sleep(0.005)
            print("left", p.pid, pid)
            """
        )
        t0 = time.monotonic()
        r = z.run_python(code, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith("left "), r.stderr
        assert time.monotonic() - t0 < 10
        assert wait_until(lambda: not running_with_cmdline(f"100 {m1}") and not running_with_cmdline(f"100 {m2}"), 5)
        assert wait_until(lambda: descendants(z.pid) == idle_tree(z), 5)

    def test_a_task_holds_no_file_of_the_zygote(self, z: Zygote) -> None:
        """A task's only open files are its stdio and fd 3 (the result; /dev/null for
        run_python): nothing of the zygote (its control socket, its interpreter's files)."""
        code = textwrap.dedent(
            """
            import json, os, stat
            out = {}
            for fd in range(4096):
                try:
                    st = os.fstat(fd)
                except OSError:
                    continue
                out[fd] = [stat.S_ISSOCK(st.st_mode), os.readlink(f"/proc/self/fd/{fd}")]
            print(json.dumps(out))
            """
        )
        got = run_json(z, code)
        assert sorted(got) == ["0", "1", "2", "3"], got
        assert not any(sock for sock, _ in got.values()), got
        assert got["0"][1] == got["3"][1] == "/dev/null"

    def test_preloaded_random_is_reseeded_in_each_task(self) -> None:
        """Tasks are copies of one process, but not of its random state."""
        with Zygote(preload=("random",)) as zz:
            draws = [zz.call("random:getrandbits", 64, timeout=30) for _ in range(3)]
            draws += [run_json(zz, "import random; print(random.getrandbits(64))") for _ in range(3)]
        assert len(set(draws)) == 6, draws

    def test_no_capabilities_no_new_privs_and_seccomp(self, z: Zygote) -> None:
        status = z.run_python("print(open('/proc/self/status').read())", text=True, timeout=30).stdout
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(fields[cap], 16) == 0, (cap, fields[cap])
        assert fields["NoNewPrivs"].strip() == "1"
        assert fields["Seccomp"].strip() == "2"

    def test_cannot_mount_unshare_or_setns(self, z: Zygote) -> None:
        """Every way to new namespaces or mounts is refused (EPERM)."""
        code = textwrap.dedent(
            """
            import ctypes, errno, json, os
            libc = ctypes.CDLL(None, use_errno=True)
            def e(r):
                return "ok" if r == 0 else errno.errorcode[ctypes.get_errno()]
            out = {"mount": e(libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)),
                   "remount": e(libc.mount(b"none", b"/", None, 0x20 | 0x1000, None))}
            for name, flag in [("mnt", 0x20000), ("user", 0x10000000), ("net", 0x40000000),
                               ("pid", 0x20000000), ("uts", 0x4000000), ("ipc", 0x8000000)]:
                out["unshare " + name] = e(libc.unshare(flag))
            fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
            out["setns"] = e(libc.setns(fd, 0))
            try:
                os.chroot("/tmp")
                out["chroot"] = "ok"
            except OSError as x:
                out["chroot"] = errno.errorcode[x.errno]
            print(json.dumps(out))
            """
        )
        got = run_json(z, code)
        assert got == {k: "EPERM" for k in got}, got
        assert len(got) == 10

    def test_root_file_system_is_read_only(self, z: Zygote) -> None:
        got = run_json(
            z,
            "import errno, json\ntry:\n    open('/etc/nsfast-zt', 'w')\n    print('\"written\"')\n"
            "except OSError as e:\n    print(json.dumps(errno.errorcode[e.errno]))",
        )
        assert got == "EROFS"
        assert not os.path.exists("/etc/nsfast-zt")

    def test_cannot_signal_the_zygote_or_the_caller(self, z: Zygote) -> None:
        """The host pids of the caller and the zygote do not exist in a task."""
        targets = sorted({os.getpid(), z.pid, *descendants(z.pid)} - {1, 2})
        code = textwrap.dedent(
            f"""
            import errno, json, os
            out = {{}}
            for pid in {targets!r}:
                try:
                    os.kill(pid, 0)
                    out[pid] = "ok"
                except OSError as e:
                    out[pid] = errno.errorcode[e.errno]
            print(json.dumps(out))
            """
        )
        got = run_json(z, code)
        assert set(got.values()) == {"ESRCH"}, got


# -- 3. concurrent tasks cannot reach each other --------------------------------------------

CONNECT = textwrap.dedent(
    """
    import errno, json, socket, time
    def attempt(family, addr):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(addr)
            return "connected"
        except OSError as e:
            return errno.errorcode.get(e.errno, repr(e))
        finally:
            s.close()
    """
)


UNIX_FILE_LISTENER = textwrap.dedent(
    f"""
    import json, socket, time
    socks = {{}}
    for d in {WRITABLE!r}:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(d + "/nsfast-zt.sock")
        except OSError:
            s.close()
            continue
        s.listen()
        s.setblocking(False)
        socks[d] = s
    start = time.time()
    time.sleep(1.2)
    reached = []
    for d, s in socks.items():
        try:
            s.accept()[0].close()
            reached.append(d)
        except BlockingIOError:
            pass
    print(json.dumps({{"bound": sorted(socks), "reached": reached, "start": start, "end": time.time()}}))
    """
)
UNIX_FILE_CONNECTOR = textwrap.dedent(
    f"""
    import json, socket, time
    time.sleep(0.4)
    at, connected = time.time(), []
    for d in {WRITABLE!r}:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(d + "/nsfast-zt.sock")
            connected.append(d)
        except OSError:
            pass
        finally:
            s.close()
    print(json.dumps({{"at": at, "connected": connected}}))
    """
)


def check_no_unix_file_channel(zz: Zygote) -> None:
    """Task A listens on a unix socket file in every directory it can write to; task B, at
    the same time, connects to none of them."""
    ra, rb = zz.map_python([UNIX_FILE_LISTENER, UNIX_FILE_CONNECTOR], concurrency=2, text=True, timeout=30)
    assert (ra.returncode, rb.returncode) == (0, 0), (ra.stderr, rb.stderr)
    a, b = json.loads(ra.stdout), json.loads(rb.stdout)
    assert "/tmp" in a["bound"]
    assert a["start"] < b["at"] < a["end"], "B did not try while A listened"
    assert (b["connected"], a["reached"]) == ([], []), f"B reached A through {b['connected']}"


class TestConcurrentTasks:
    def test_two_tasks_at_once_cannot_connect_to_each_other(self, z: Zygote) -> None:
        """Task A listens on an abstract unix socket and on 127.0.0.1 (and can reach both
        itself); task B, running at the same time, reaches neither."""
        name, port = f"\0nsfast-zt-{uuid.uuid4().hex}", 47011
        listener = CONNECT + textwrap.dedent(
            f"""
            u = socket.socket(socket.AF_UNIX); u.bind({name!r}); u.listen()
            t = socket.socket(); t.bind(("127.0.0.1", {port})); t.listen()
            own = [attempt(socket.AF_UNIX, {name!r}), attempt(socket.AF_INET, ("127.0.0.1", {port}))]
            u.accept()[0].close(); t.accept()[0].close()
            start = time.time()
            time.sleep(1.5)
            def pending(s):
                s.setblocking(False)
                try:
                    s.accept()[0].close()
                    return True
                except BlockingIOError:
                    return False
            print(json.dumps({{"own": own, "start": start, "end": time.time(),
                              "pending": [pending(u), pending(t)]}}))
            """
        )
        connector = CONNECT + textwrap.dedent(
            f"""
            time.sleep(0.5)
            at = time.time()
            print(json.dumps({{"at": at, "unix": attempt(socket.AF_UNIX, {name!r}),
                              "tcp": attempt(socket.AF_INET, ("127.0.0.1", {port}))}}))
            """
        )
        ra, rb = z.map_python([listener, connector], concurrency=2, text=True, timeout=30)
        assert (ra.returncode, rb.returncode) == (0, 0), (ra.stderr, rb.stderr)
        a, b = json.loads(ra.stdout), json.loads(rb.stdout)
        assert a["own"] == ["connected", "connected"]
        assert a["start"] < b["at"] < a["end"], "B did not try while A listened"
        assert (b["unix"], b["tcp"]) == ("ECONNREFUSED", "ECONNREFUSED")
        assert a["pending"] == [False, False]

    def test_a_task_with_every_fd_it_may_have_in_flight_leaves_the_zygote_its_answers(self, own: Zygote) -> None:
        """Tasks are the zygote's host uid, and the kernel refuses SCM_RIGHTS once that uid
        has more fds in flight in unix sockets than the sender's RLIMIT_NOFILE: a task that
        filled its limit made the zygote's answer for the next task (its pidfd) fail, and
        the zygote died with every task on it. The zygote's soft limit is its hard one now,
        a task's hard limit under half that: the next task starts while it holds them."""
        hog = textwrap.dedent(
            """
            import os, resource, socket, time
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            fd = os.open("/dev/null", os.O_RDONLY)
            pairs, n, err = [], 0, 0
            while n < 10_000_000:
                a, b = socket.socketpair()
                try:
                    socket.send_fds(a, [b"x"], [fd] * 250)
                except OSError as e:
                    err = e.errno
                    break
                pairs.append((a, b))
                n += 250
            time.sleep(4)  # holding them while the next task starts
            print(n, err, hard, flush=True)
            """
        )
        out: Dict[str, Any] = {}
        th = threading.Thread(target=lambda: out.update(r=own.run_python(hog, text=True, timeout=60)))
        th.start()
        try:
            time.sleep(2)  # (filling takes milliseconds)
            r = own.run_python("print('next')", text=True, timeout=30)
        finally:
            th.join()
        n, err, hard = map(int, out["r"].stdout.split())
        assert err == errno.ETOOMANYREFS and n >= 1000, (n, err, out["r"].stderr)
        assert r.stdout == "next\n", r

    def test_two_tasks_at_once_share_no_files(self, own: Zygote) -> None:
        """Task A writes a file in every directory it can write to; task B, at the same time,
        finds none of them."""
        tag = f"nsfast-zt-{uuid.uuid4().hex}"
        writer = textwrap.dedent(
            f"""
            import json, time
            wrote = []
            for d in {WRITABLE!r}:
                try:
                    open(d + "/{tag}", "w").write("from A")
                    wrote.append(d)
                except OSError:
                    pass
            start = time.time()
            time.sleep(1.0)
            print(json.dumps({{"wrote": wrote, "start": start, "end": time.time()}}))
            """
        )
        reader = textwrap.dedent(
            f"""
            import json, os, time
            time.sleep(0.4)
            at = time.time()
            print(json.dumps({{"at": at, "found": [d for d in {WRITABLE!r} if os.path.exists(d + "/{tag}")]}}))
            """
        )
        ra, rb = own.map_python([writer, reader], concurrency=2, text=True, timeout=30)
        assert (ra.returncode, rb.returncode) == (0, 0), (ra.stderr, rb.stderr)
        a, b = json.loads(ra.stdout), json.loads(rb.stdout)
        assert {"/tmp", "/dev/shm"} <= set(a["wrote"])
        assert a["start"] < b["at"] < a["end"], "B did not look while A ran"
        assert b["found"] == [], f"B found A's files in {b['found']}"

    def test_two_tasks_at_once_cannot_connect_through_a_socket_file(self, own: Zygote) -> None:
        check_no_unix_file_channel(own)

    def test_a_task_cannot_reach_servers_on_the_host(self, z: Zygote) -> None:
        """A TCP server on the host (loopback and every other address of the host) and an
        abstract unix socket of the host are out of reach."""
        name = f"\0nsfast-zt-host-{uuid.uuid4().hex}"
        with socket.socket() as srv, socket.socket(socket.AF_UNIX) as usrv:
            srv.bind(("0.0.0.0", 0))
            srv.listen()
            srv.setblocking(False)
            usrv.bind(name)
            usrv.listen()
            usrv.setblocking(False)
            port = srv.getsockname()[1]
            addrs = ["127.0.0.1"] + sorted(
                {a.address for ifs in psutil.net_if_addrs().values() for a in ifs if a.family == socket.AF_INET}
                - {"127.0.0.1"}
            )
            # The host can reach its own server (the check below means something).
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            assert wait_until(lambda: _accept_one(srv), 2)
            code = CONNECT + textwrap.dedent(
                f"""
                out = {{a: attempt(socket.AF_INET, (a, {port})) for a in {addrs!r}}}
                out["unix"] = attempt(socket.AF_UNIX, {name!r})
                print(json.dumps(out))
                """
            )
            got = run_json(z, code)
            assert "connected" not in got.values(), got
            assert got["127.0.0.1"] == "ECONNREFUSED" and got["unix"] == "ECONNREFUSED"
            assert not _accept_one(srv) and not _accept_one(usrv)


def _accept_one(s: socket.socket) -> bool:
    try:
        s.accept()[0].close()
        return True
    except BlockingIOError:
        return False


@pytest.fixture(scope="module")
def znone() -> Iterator[Zygote]:
    """A zygote with network="none" (needs Landlock ABI 6: Linux 6.12)."""
    abi = nsfast._core.landlock_abi()
    if abi < 6:
        pytest.skip(f"network='none' needs Landlock ABI 6, this kernel has {abi}")
    zygote = Zygote(network="none")
    try:
        yield zygote
    finally:
        zygote.close()


class TestNetworkNone:
    def test_only_unix_sockets(self, znone: Zygote) -> None:
        """No socket family but AF_UNIX: no IP, no netlink, no packet socket."""
        code = textwrap.dedent(
            """
            import errno, json, socket
            out = {}
            for name in ("AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_UNIX"):
                try:
                    socket.socket(getattr(socket, name), socket.SOCK_DGRAM).close()
                    out[name] = "ok"
                except OSError as e:
                    out[name] = errno.errorcode[e.errno]
            a, b = socket.socketpair()
            a.sendall(b"x")
            out["socketpair"] = b.recv(1).decode()
            print(json.dumps(out))
            """
        )
        got = run_json(znone, code)
        assert got == {
            "AF_INET": "EPERM",
            "AF_INET6": "EPERM",
            "AF_NETLINK": "EPERM",
            "AF_PACKET": "EPERM",
            "AF_UNIX": "ok",
            "socketpair": "x",
        }

    def test_no_network_namespace_is_made_ahead(self, znone: Zygote) -> None:
        assert "nsfast-netns" not in zygote_threads(znone.pid)

    def test_tasks_share_the_zygotes_network_namespace_only(self, znone: Zygote) -> None:
        """The network namespace is the zygote's (never the caller's); the others stay each
        task's own."""
        results = znone.map_python([NS_CODE] * 2, concurrency=2, text=True, timeout=30)
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        a, b = (json.loads(r.stdout) for r in results)
        assert a["start"] < b["end"] and b["start"] < a["end"], "the tasks did not overlap"
        assert a["ns"]["net"] == b["ns"]["net"] != os.readlink("/proc/self/ns/net")
        assert a["ns"]["net"] in host_zygote_ns(znone)["net"]
        for ns in ("pid", "mnt", "ipc", "uts", "cgroup"):
            assert a["ns"][ns] != b["ns"][ns], ns
        assert run_json(znone, "import json, os; print(json.dumps(os.getpid()))") == 2

    def test_two_tasks_at_once_cannot_reach_each_others_abstract_sockets(self, znone: Zygote) -> None:
        name = f"\0nsfast-zt-{uuid.uuid4().hex}"
        listener = CONNECT + textwrap.dedent(
            f"""
            u = socket.socket(socket.AF_UNIX); u.bind({name!r}); u.listen()
            own = attempt(socket.AF_UNIX, {name!r})
            u.accept()[0].close()
            u.setblocking(False)
            start = time.time()
            time.sleep(1.2)
            try:
                u.accept()[0].close()
                reached = True
            except BlockingIOError:
                reached = False
            print(json.dumps({{"own": own, "reached": reached, "start": start, "end": time.time()}}))
            """
        )
        connector = CONNECT + textwrap.dedent(
            f"""
            time.sleep(0.4)
            at = time.time()
            print(json.dumps({{"at": at, "unix": attempt(socket.AF_UNIX, {name!r})}}))
            """
        )
        ra, rb = znone.map_python([listener, connector], concurrency=2, text=True, timeout=30)
        assert (ra.returncode, rb.returncode) == (0, 0), (ra.stderr, rb.stderr)
        a, b = json.loads(ra.stdout), json.loads(rb.stdout)
        assert a["own"] == "connected"
        assert a["start"] < b["at"] < a["end"], "B did not try while A listened"
        assert b["unix"] != "connected" and a["reached"] is False, (a, b)

    def test_two_tasks_at_once_cannot_connect_through_a_socket_file(self, znone: Zygote) -> None:
        check_no_unix_file_channel(znone)

    def test_specs_it_cannot_enforce_are_refused(self) -> None:
        with pytest.raises(nsfast.SpecError):
            Zygote(network="none", seccomp=None)
        with pytest.raises(nsfast.SpecError):
            Zygote(network="host")


# -- 4. limits and timeouts per task ---------------------------------------------------------

ALLOCATE_256M = "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096):\n    b[i] = 1\nprint('alive')\n"


class TestLimits:
    def test_timeout_kills_a_busy_task(self, z: Zygote) -> None:
        t0 = time.monotonic()
        with pytest.raises(nsfast.TimeoutExpired) as info:
            z.run_python("while True: pass", timeout=0.5)
        assert time.monotonic() - t0 < 5
        assert info.value.timeout == 0.5
        assert info.value.usage is not None and info.value.usage.termination == "timeout"
        assert z.run_python("print('next')", timeout=30).stdout == b"next\n"

    def test_memory_limit_kills_the_task(self, z: Zygote) -> None:
        r = z.run_python(ALLOCATE_256M, limits=nsfast.Limits(memory="64M"), timeout=60)
        assert r.returncode == -signal.SIGKILL
        assert r.stdout == b""
        assert r.usage is not None and r.usage.termination == "memory"
        # The limit was this task's only: the next one (default limits) allocates as much.
        assert z.run_python(ALLOCATE_256M, timeout=60).stdout == b"alive\n"

    def test_spec_limits_are_every_tasks_default(self) -> None:
        with Zygote(limits=nsfast.Limits(memory="64M")) as zz:
            r = zz.run_python(ALLOCATE_256M, timeout=60)
            assert (r.returncode, r.usage.termination if r.usage else None) == (-signal.SIGKILL, "memory")
            # limits= replaces the spec's for one task.
            assert zz.run_python(ALLOCATE_256M, limits=nsfast.Limits(memory="1G"), timeout=60).stdout == b"alive\n"

    def test_pids_limit_stops_a_fork_bomb(self, z: Zygote) -> None:
        """Every process forks for a second; the cgroup's pids limit holds them all."""
        code = textwrap.dedent(
            """
            import errno, os, time
            failed, end = 0, time.time() + 1.0
            while time.time() < end:
                try:
                    os.fork()
                except OSError as e:
                    assert e.errno == errno.EAGAIN, e
                    failed += 1
            if os.getpid() == 2:
                print("failed", failed > 0, flush=True)
            """
        )
        r = z.run_python(code, limits=nsfast.Limits(pids=16), text=True, timeout=60)
        assert (r.returncode, r.stdout) == (0, "failed True\n"), r.stderr[-2000:]
        assert r.usage is not None and r.usage.pids_peak is not None and r.usage.pids_peak <= 16
        assert wait_until(lambda: descendants(z.pid) == idle_tree(z), 5)
        assert z.run_python("print('next')", timeout=30).stdout == b"next\n"

    def test_cpu_time_limit_kills_the_task(self, z: Zygote) -> None:
        r = z.run_python("while True: pass", limits=nsfast.Limits(cpu_time=0.5), timeout=30)
        assert r.returncode == -signal.SIGKILL
        assert r.usage is not None and r.usage.termination == "cpu_time"
        assert z.run_python("print('next')", timeout=30).stdout == b"next\n"


# -- 5. crashes -------------------------------------------------------------------------------


def _wait_dead(pid: int) -> None:
    assert wait_until(lambda: gone(pid), 5), f"{pid} still runs"


class TestCrashes:
    @pytest.mark.parametrize(
        "code, returncode",
        [
            ("import os; os.abort()", -signal.SIGABRT),
            ("import ctypes; ctypes.string_at(0)", -signal.SIGSEGV),
            ("import os; os._exit(99)", 99),
        ],
        ids=["abort", "segfault", "_exit"],
    )
    def test_a_crashing_task_leaves_the_zygote_usable(self, z: Zygote, code: str, returncode: int) -> None:
        pid, restarts = z.pid, z.restarts
        r = z.run_python(code, timeout=60)
        assert r.returncode == returncode, r.stderr[-2000:]
        assert z.run_python("print('next')", timeout=30).stdout == b"next\n"
        assert (z.pid, z.restarts) == (pid, restarts), "the zygote was restarted"

    def test_a_killed_zygote_is_restarted_by_the_next_task(self, own: Zygote) -> None:
        """SIGKILL to the zygote's sandbox (its whole pid tree ends): the next task starts a
        new zygote; so does killing just the interpreter inside it."""
        first = own.pid
        os.kill(first, signal.SIGKILL)
        _wait_dead(first)
        r = own.run_python("print('after')", timeout=30)
        assert (r.returncode, r.stdout) == (0, b"after\n")
        assert own.restarts == 1
        assert own.pid not in (first, -1) and not gone(own.pid)
        assert not psutil.pid_exists(first) or gone(first)

        second = own.pid
        interpreter = psutil.Process(second).children()
        assert interpreter, "the zygote's sandbox has no process"
        for p in interpreter:
            p.kill()
        _wait_dead(second)
        assert own.run_python("print('again')", timeout=30).stdout == b"again\n"
        assert own.restarts == 2 and own.pid != second

    def test_a_task_right_after_the_zygote_died_restarts_it(self, own: Zygote) -> None:
        """No waiting between the kill of the zygote and the next task: the task runs on a
        restarted zygote, or (the kill is asynchronous: the dying zygote may still fork it)
        is killed with the old one and says so (-9), never an error or a false success, and
        never twice: a zygote that forked the task but died before answering leaves the
        caller without an answer, and that copy of the task must not run (its "ok" would
        come out next to the restarted one's: the go pipe, rust/src/zygote.rs GO_FD)."""
        failures: List[Any] = []
        killed = 0
        n = 60
        for i in range(n):
            os.kill(own.pid, signal.SIGKILL)
            try:
                r = own.run_python("print('ok')", timeout=30)
                if r.returncode == -signal.SIGKILL:
                    killed += 1  # (its output may be there: killed on its way out)
                elif r.stdout != b"ok\n" or r.returncode != 0:
                    failures.append((i, r))
            except Exception as e:  # noqa: BLE001 - collected, reported below
                failures.append((i, repr(e)))
        assert not failures, f"{len(failures)}/{n} tasks failed: {failures[:3]}"
        assert killed < n
        # Each task that ran did so on a new zygote (the old one took its tasks with it).
        assert own.restarts == n - killed, (own.restarts, killed)
        assert own.run_python("print('ok')", timeout=30).stdout == b"ok\n"

    def test_concurrent_tasks_after_the_zygote_died_all_run(self, own: Zygote) -> None:
        """The zygote died (and is seen dead): 8 threads start tasks at once; all of them run,
        after exactly one restart. Twenty rounds."""
        failures: List[Any] = []
        with ThreadPoolExecutor(8) as pool:
            for rnd in range(20):
                dead = own.pid
                os.kill(dead, signal.SIGKILL)
                _wait_dead(dead)
                for f in [pool.submit(own.run_python, "print('ok')", timeout=30) for _ in range(8)]:
                    try:
                        r = f.result()
                        if r.stdout != b"ok\n":
                            failures.append((rnd, r))
                    except Exception as e:  # noqa: BLE001 - collected, reported below
                        failures.append((rnd, repr(e)))
                assert own.restarts == rnd + 1, f"round {rnd}: {own.restarts} restarts"
        assert not failures, f"{len(failures)} of 160 tasks failed: {failures[:3]}"

    def test_a_task_running_when_the_zygote_dies_is_not_reported_as_a_success(self, own: Zygote) -> None:
        """A task killed with its zygote ends as killed (-9) or with an error, never as
        returncode 0; the next task restarts the zygote."""
        mark = marker()
        box: Dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = own.run_python(background_sleeper(mark) + "time.sleep(100)", timeout=60)
            except Exception as e:  # noqa: BLE001 - checked below
                box["error"] = e

        th = threading.Thread(target=work)
        th.start()
        try:
            assert wait_until(lambda: bool(running_with_cmdline(f"100 {mark}")), 10)
            os.kill(own.pid, signal.SIGKILL)
        finally:
            th.join(30)
        assert not th.is_alive()
        assert wait_until(lambda: not running_with_cmdline(f"100 {mark}"), 5)
        if "error" in box:
            assert isinstance(box["error"], nsfast.NsfastError), box["error"]
        else:
            assert box["result"].returncode == -signal.SIGKILL, box["result"]
        assert own.run_python("print('next')", timeout=30).stdout == b"next\n"
        assert own.restarts == 1


# -- 6. call() --------------------------------------------------------------------------------


class TestCall:
    def test_returns_json_data(self, z: Zygote) -> None:
        got = z.call(f"{TASKS_MODULE}:echo", 1, "two", [3, 4.5], (None,), k={"x": True}, timeout=30)
        assert got == {"args": [1, "two", [3, 4.5], [None]], "kwargs": {"k": {"x": True}}}
        assert z.call("json:loads", '{"a": [1, 2]}', timeout=30) == {"a": [1, 2]}
        assert z.call("os.path:join", "a", "b", timeout=30) == "a/b"

    def test_runs_in_a_task_with_its_env(self, z: Zygote) -> None:
        got = z.call(f"{TASKS_MODULE}:whoami", env={"X": "y"}, timeout=30)
        assert got == {"pid": 2, "ppid": 0, "env": {"X": "y"}}

    def test_exception_raises_task_error(self, z: Zygote) -> None:
        with pytest.raises(TaskError) as info:
            z.call(f"{TASKS_MODULE}:fail", "bad input", timeout=30)
        e = info.value
        assert (e.type, e.message, e.returncode) == ("ValueError", "bad input", 1)
        assert e.traceback.startswith("Traceback (most recent call last):")
        assert "in fail" in e.traceback and e.traceback.rstrip().endswith("ValueError: bad input")

    def test_missing_targets_raise_task_error(self, z: Zygote) -> None:
        with pytest.raises(TaskError) as info:
            z.call("nsfast_zt_no_such_module:f", timeout=30)
        assert info.value.type == "ModuleNotFoundError"
        with pytest.raises(TaskError) as info:
            z.call("json:no_such_function", timeout=30)
        assert info.value.type == "AttributeError"
        with pytest.raises(ValueError):
            z.call("json.loads")  # no ":"

    def test_a_result_that_is_not_json_raises_task_error(self, z: Zygote) -> None:
        for target, args in (("builtins:object", ()), ("builtins:bytes", (4,)), ("builtins:set", ([1],))):
            with pytest.raises(TaskError) as info:
                z.call(target, *args, timeout=30)
            assert info.value.type == "TypeError", target
            assert "JSON serializable" in info.value.message

    def test_arguments_must_be_json(self, z: Zygote) -> None:
        with pytest.raises(TypeError):
            z.call("json:dumps", object())

    def test_sys_exit_and_crashes_raise_task_error(self, z: Zygote) -> None:
        with pytest.raises(TaskError) as info:
            z.call("sys:exit", 4, timeout=30)
        assert (info.value.type, info.value.returncode) == ("SystemExit", 4)
        with pytest.raises(TaskError) as info:
            z.call("os:abort", timeout=30)
        assert (info.value.type, info.value.returncode) == (None, -signal.SIGABRT)

    def test_timeout_and_limits(self, z: Zygote) -> None:
        t0 = time.monotonic()
        with pytest.raises(nsfast.TimeoutExpired):
            z.call("time:sleep", 30, timeout=0.5)
        assert time.monotonic() - t0 < 5
        with pytest.raises(TaskError) as info:
            z.call(f"{TASKS_MODULE}:allocate", 256 << 20, limits=nsfast.Limits(memory="64M"), timeout=60)
        assert info.value.returncode == -signal.SIGKILL
        assert z.call(f"{TASKS_MODULE}:allocate", 1 << 20, timeout=30) == 1 << 20

    def test_max_result_bytes(self, z: Zygote) -> None:
        with pytest.raises(TaskError, match="max_result_bytes"):
            z.call("builtins:str", "x" * 1000, max_result_bytes=100, timeout=30)
        assert z.call("builtins:str", "x" * 1000, max_result_bytes=2000, timeout=30) == "x" * 1000
        big = z.call("builtins:str", "y" * (8 << 20), timeout=60)
        assert big == "y" * (8 << 20)

    def test_results_are_never_unpickled(self, z: Zygote, tmp_path: Path) -> None:
        """A pickle that runs a shell command when loaded, as the raw result or as the
        returned text, is never loaded by the caller."""
        # The payload works: unpickled in a sandbox, it creates its file.
        control = pickle.dumps(Exploit("touch /mnt/control"))
        r = nsfast.run(
            ["python3", "-c", f"import pickle; pickle.loads(bytes.fromhex({control.hex()!r}))"],
            mounts=[nsfast.Bind(tmp_path, "/mnt", readonly=False)],
            capture_output=True,
            timeout=30,
        )
        assert r.returncode == 0 and (tmp_path / "control").exists(), r.stderr

        sentinel = tmp_path / "pwned"
        cmd = f"touch {sentinel}"
        with pytest.raises(TaskError) as info:
            z.call(f"{TASKS_MODULE}:write_pickle_as_result", cmd, timeout=30)
        assert info.value.returncode == 0 and info.value.type is None
        text = z.call(f"{TASKS_MODULE}:return_pickle_as_text", cmd, timeout=30)
        assert text == pickle.dumps(Exploit(cmd)).decode("latin-1")
        time.sleep(0.1)
        assert not sentinel.exists(), "the caller ran the task's pickle"


# -- 7. asyncio -------------------------------------------------------------------------------


class TestAsyncio:
    def test_several_tasks_run_concurrently(self, z: Zygote) -> None:
        async def main() -> List[nsfast.Result]:
            return await asyncio.gather(
                *(z.arun_python(f"import time; time.sleep(0.5); print({i})", text=True, timeout=30) for i in range(4))
            )

        t0 = time.monotonic()
        results = asyncio.run(main())
        elapsed = time.monotonic() - t0
        assert [(r.returncode, r.stdout) for r in results] == [(0, f"{i}\n") for i in range(4)]
        assert elapsed < 1.8, f"4 x 0.5 s took {elapsed:.2f} s: not concurrent"

    def test_arun_python_is_like_run_python(self, z: Zygote) -> None:
        async def main() -> nsfast.Result:
            return await z.arun_python(
                "import sys; print(sys.stdin.read(), sys.argv[1:]); sys.exit('bye')",
                input="in",
                argv=["x"],
                text=True,
                timeout=30,
            )

        r = asyncio.run(main())
        assert (r.returncode, r.stdout, r.stderr) == (1, "in ['x']\n", "bye\n")

    def test_timeout(self, z: Zygote) -> None:
        with pytest.raises(nsfast.TimeoutExpired):
            asyncio.run(z.arun_python("while True: pass", timeout=0.5))

    def test_cancelling_a_task_kills_it(self, z: Zygote) -> None:
        """wait_for() running out on a sleeping task kills it, and what it started; the other
        task finishes normally."""
        before = sandbox_cgroups()
        mark = marker()
        seen: List[bool] = []

        async def watch() -> None:
            for _ in range(40):
                if running_with_cmdline(f"100 {mark}"):
                    seen.append(True)
                    return
                await asyncio.sleep(0.01)

        async def main() -> nsfast.Result:
            other = asyncio.ensure_future(
                z.arun_python("import time; time.sleep(0.8); print('done')", text=True, timeout=30)
            )
            watcher = asyncio.ensure_future(watch())
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(z.arun_python(background_sleeper(mark) + "time.sleep(100)"), 0.3)
            await watcher
            return await other

        r = asyncio.run(main())
        assert (r.returncode, r.stdout) == (0, "done\n")
        assert seen, "the cancelled task never started its sleeper"
        assert wait_until(lambda: not running_with_cmdline(f"100 {mark}"), 5)
        assert wait_until(lambda: descendants(z.pid) == idle_tree(z), 5), descendants(z.pid)
        assert wait_until(lambda: sandbox_cgroups() == before, 5), "cgroup left behind"


# -- 8. no leaks ------------------------------------------------------------------------------


class TestLeaks:
    @pytest.mark.timeout(300)
    def test_2000_tasks_leave_no_fds_processes_or_cgroups(self, z: Zygote) -> None:
        """2,000 tasks, 4 at a time: the caller's fd table and children, the zygote's process
        tree and fd tables, and the sandbox cgroups are as before."""
        z.map_python(["pass"] * 20, concurrency=4, timeout=30)  # warm up (thread pool, imports)
        assert wait_until(lambda: descendants(z.pid) == idle_tree(z), 5)

        def zygote_fds() -> Dict[int, List[str]]:
            """pid -> its fds by kind (the pool's ready network namespaces change numbers as
            tasks take them and its thread makes new ones)."""
            return {p: sorted(t.split(":[", 1)[0] for t in fd_targets(p)) for p in [z.pid, *idle_tree(z)]}

        fds, children, cgroups, zfds = fd_numbers(), psutil.Process().children(), sandbox_cgroups(), zygote_fds()
        threads = threading.active_count()
        t0 = time.monotonic()
        results = z.map_python(["pass"] * 2000, concurrency=4, timeout=60)
        elapsed = time.monotonic() - t0
        bad = [(i, r.returncode, r.stderr) for i, r in enumerate(results) if r.returncode != 0 or r.stdout]
        assert not bad, bad[:3]
        assert len(results) == 2000
        assert wait_until(lambda: descendants(z.pid) == idle_tree(z), 5), "task processes left behind"
        assert fd_numbers() == fds, "the caller's fd table changed"
        assert psutil.Process().children() == children
        assert sandbox_cgroups() == cgroups, "task cgroups left behind"
        assert wait_until(lambda: zygote_fds() == zfds, 5), ("the zygote's fd tables changed", zygote_fds(), zfds)
        assert wait_until(lambda: threading.active_count() == threads, 2)
        print(f"2000 tasks in {elapsed:.1f} s")


# -- 9. close() -------------------------------------------------------------------------------


class TestClose:
    def test_close_ends_running_tasks_and_the_zygote(self) -> None:
        """close() kills the tasks still running and the zygote's whole tree; afterwards
        every way to start a task raises ZygoteError; close() again is a no-op."""
        before = sandbox_cgroups()
        zz = Zygote()
        mark = marker()
        box: Dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = zz.run_python(background_sleeper(mark) + "time.sleep(100)", timeout=60)
            except Exception as e:  # noqa: BLE001 - checked below
                box["error"] = e

        th = threading.Thread(target=work)
        th.start()
        try:
            assert wait_until(lambda: bool(running_with_cmdline(f"100 {mark}")), 10)
            pid, tree = zz.pid, descendants(zz.pid)
            t0 = time.monotonic()
            zz.close()
        finally:
            th.join(30)
        assert not th.is_alive() and time.monotonic() - t0 < 5
        assert wait_until(lambda: not running_with_cmdline(f"100 {mark}"), 5)
        assert not psutil.pid_exists(pid), "the zygote's process is still there"
        assert wait_until(lambda: all(gone(p) for p in tree), 5)
        assert wait_until(lambda: sandbox_cgroups() == before, 5), "cgroups left behind"

        with pytest.raises(ZygoteError):
            zz.run_python("pass")
        with pytest.raises(ZygoteError):
            zz.call("os:getpid")
        with pytest.raises(ZygoteError):
            zz.map_python(["pass"])
        with pytest.raises(ZygoteError):
            asyncio.run(zz.arun_python("pass"))
        zz.close()

    def test_a_task_killed_by_close_is_not_reported_as_a_success(self) -> None:
        """The run_python of a task that close() killed ends as killed (-9) or with an
        error, never as a clean returncode 0."""
        zz = Zygote()
        mark = marker()
        box: Dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = zz.run_python(background_sleeper(mark) + "time.sleep(100)", timeout=60)
            except Exception as e:  # noqa: BLE001 - checked below
                box["error"] = e

        th = threading.Thread(target=work)
        th.start()
        try:
            assert wait_until(lambda: bool(running_with_cmdline(f"100 {mark}")), 10)
        finally:
            zz.close()
            th.join(30)
        assert not th.is_alive()
        if "error" in box:
            assert isinstance(box["error"], nsfast.NsfastError), box["error"]
        else:
            assert box["result"].returncode == -signal.SIGKILL, box["result"]

    def test_a_forgotten_zygote_ends_when_collected(self) -> None:
        """A Zygote dropped without close() ends its process tree when collected."""
        zz = Zygote()
        pid = zz.pid
        tree = descendants(pid)
        del zz
        gc.collect()
        assert not psutil.pid_exists(pid)
        assert wait_until(lambda: all(gone(p) for p in tree), 5)

    def test_context_manager_closes(self) -> None:
        with Zygote() as zz:
            assert zz.run_python("print(1)", timeout=30).stdout == b"1\n"
            pid = zz.pid
        assert not psutil.pid_exists(pid)
        with pytest.raises(ZygoteError):
            zz.run_python("pass")


def test_a_zygote_on_a_rootfs_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A rootfs cannot hold this interpreter and nsfast's module at their paths: SpecError
    naming rootfs, before anything starts (not a zygote failing to import)."""
    with pytest.raises(nsfast.SpecError, match="rootfs"):
        Zygote(rootfs=str(tmp_path))


def test_bad_network_modes_are_refused() -> None:
    with pytest.raises(nsfast.SpecError, match="network"):
        Zygote(network="host")
    with pytest.raises(nsfast.SpecError, match="seccomp"):
        Zygote(network="none", seccomp=None)


def test_the_zygote_holds_no_module_a_task_did_not_ask_for(own: Zygote) -> None:
    """A task starts from a lean interpreter: nothing of nsfast's package, no json, typing,
    threading or re unless preloaded (each module is memory every task copies as it touches
    it, and threading's at-fork hook would run in each); the task can import them itself."""
    got = run_json(
        own,
        "import sys\nmods = sorted(sys.modules)\nimport json\nprint(json.dumps(mods))",
    )
    for name in ("nsfast", "json", "typing", "threading", "re", "traceback", "asyncio"):
        assert name not in got, f"{name} is loaded in every task"


def test_a_task_cannot_reach_through_its_pid_1(own: Zygote) -> None:
    """pid 1 of a task is nsfast-init, in the zygote's mount and network namespaces: not
    dumpable and without capabilities, so its /proc/1/root, ns, mem, environ, cwd and fd
    links are closed to the task, ptrace is refused, and a SIGKILL from inside is dropped."""
    code = textwrap.dedent(
        """
        import ctypes, json, os, signal
        out = {}
        for p in ("/proc/1/root/etc/hostname", "/proc/1/ns/mnt", "/proc/1/ns/net", "/proc/1/mem",
                  "/proc/1/environ", "/proc/1/cwd/.", "/proc/1/fd/0"):
            try:
                open(p, "rb").close()
                out[p] = "opened"
            except OSError as e:
                out[p] = e.errno
        st = open("/proc/1/status").read()
        out["caps"] = [l.split()[1] for l in st.splitlines() if l.startswith(("CapEff", "CapPrm", "CapBnd"))]
        libc = ctypes.CDLL(None, use_errno=True)
        out["ptrace"] = [libc.ptrace(16, 1, 0, 0), ctypes.get_errno()]  # PTRACE_ATTACH
        os.kill(1, signal.SIGKILL)
        out["alive"] = os.path.exists("/proc/1/status")
        print(json.dumps(out))
        """
    )
    got = run_json(own, code)
    for p in ("/proc/1/root/etc/hostname", "/proc/1/ns/mnt", "/proc/1/ns/net", "/proc/1/mem", "/proc/1/environ",
              "/proc/1/cwd/.", "/proc/1/fd/0"):  # fmt: skip
        assert got[p] == errno.EACCES, (p, got[p])
    assert got["caps"][:2] == ["0000000000000000"] * 2, got["caps"]
    assert got["ptrace"] == [-1, errno.EPERM]
    assert got["alive"] is True


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"init": False}, "init"),
        ({"namespaces": nsfast.DEFAULT_NAMESPACES + ("time",)}, "namespaces"),
    ],
)
def test_what_tasks_cannot_have_is_refused_not_dropped(fields: Dict[str, Any], field: str) -> None:
    with pytest.raises(nsfast.SpecError) as e:
        Zygote(**fields)
    assert e.value.field == field


# A task that forks until the kernel refuses (EAGAIN) and holds what it got.
_HOLD_ALL = r"""
import os, sys, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, e.errno, flush=True)
time.sleep(4)  # holding them while the other task runs
"""


def test_a_task_that_holds_every_process_it_may_have_harms_no_other_task() -> None:
    """Every task and the zygote are uid 0 of one user namespace, where the kernel keeps
    one RLIMIT_NPROC count: a task that took its pids limit's worth of processes left the
    others no fork, and the zygote's next fork failed with EAGAIN, which the caller took for
    a dead zygote: it restarted it, killing every task running then. Each task is bounded
    by its own pids cgroup now, and an EAGAIN reply fails only the task it was for."""
    box: Dict[str, Any] = {}
    with Zygote(limits=nsfast.Limits(pids=48)) as zz:
        pid, restarts = zz.pid, zz.restarts

        def hostile() -> None:
            box["hostile"] = zz.run_python(_HOLD_ALL, timeout=60, text=True)

        t = threading.Thread(target=hostile)
        t.start()
        time.sleep(2)  # it holds its 48 by now
        other = zz.run_python(
            "import os\npid = os.fork()\nif pid == 0: os._exit(0)\nos.waitpid(pid, 0)\nprint('forked')",
            timeout=30,
            text=True,
        )
        t.join()
        assert (zz.pid, zz.restarts) == (pid, restarts)
    n, err = box["hostile"].stdout.split()
    assert 40 <= int(n) < 48 and int(err) == errno.EAGAIN, box["hostile"]
    assert box["hostile"].returncode == 0
    assert (other.returncode, other.stdout) == (0, "forked\n"), other


def test_fd_3_of_one_task_is_not_the_next_ones(own: Zygote) -> None:
    """run_python gave every task the same open /dev/null as fd 3: its flags, owner signal
    and locks carried from one task to the next (and a lock on it reached the host's
    /dev/null users until the zygote closed)."""
    import fcntl

    first = own.run_python(
        "import fcntl, os\nfcntl.fcntl(3, fcntl.F_SETFL, os.O_APPEND | os.O_NONBLOCK)\nfcntl.fcntl(3, 10, 42)\n"
        "fcntl.flock(3, fcntl.LOCK_EX)",
        timeout=30,
    )
    assert first.returncode == 0, first.stderr
    second = own.run_python(
        "import fcntl, os\nfl = fcntl.fcntl(3, fcntl.F_GETFL)\nprint(bool(fl & os.O_APPEND), fcntl.fcntl(3, 11))\n"
        "fcntl.flock(3, fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint('free')",
        timeout=30,
        text=True,
    )
    assert (second.returncode, second.stdout) == (0, "False 0\nfree\n"), second.stderr
    with open(os.devnull, "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the host's /dev/null is nobody's lock


def test_a_result_nested_too_deep_is_a_task_error(z: Zygote) -> None:
    """json.loads of it raised RecursionError out of call(), not the TaskError that every
    other result that is not one says."""
    with pytest.raises(TaskError, match="is not JSON .nested too deep"):
        z.call(f"{TASKS_MODULE}:deep_result", timeout=30)


def test_a_result_is_bounded_by_what_it_costs_parsed_not_by_its_bytes(z: Zygote) -> None:
    """(Found by an audit.) max_result_bytes bounded the result's bytes: `[{},{},...]` of
    63 MiB took the caller to 1.6 GiB parsed. It bounds what the parsed value costs now
    (bytes, 16 per element, 64 per array or object), checked before parsing."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TaskError, match="would take ~.* bytes parsed .* over max_result_bytes=67108864"):
        z.call(f"{TASKS_MODULE}:inflating_result", 5_000_000, timeout=60)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) << 10
    assert grew < 200 << 20, f"the caller grew by {grew >> 20} MiB"
    # What fits is returned: 100,000 objects (~6.7 MiB counted).
    assert z.call(f"{TASKS_MODULE}:inflating_result", 100_000, timeout=60) == [{}] * 100_001


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_a_result_with_a_constant_json_does_not_have_is_refused(z: Zygote, word: str) -> None:
    with pytest.raises(TaskError, match=f"is not JSON .{word} is not JSON"):
        z.call(f"{TASKS_MODULE}:constant_result", word, timeout=30)
