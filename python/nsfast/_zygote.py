"""Zygotes: Python sandboxes at fork speed.

A `Zygote` is one long-lived interpreter in a hardened nsfast sandbox that has imported
`preload`. Each task is a copy-on-write fork of it into fresh pid, mount (own /proc, empty
/tmp and /dev/shm), ipc, uts and net namespaces and a cgroup of its own, with every
capability dropped, no_new_privs and the seccomp filter installed before its code runs:
the containment of `nsfast.run`, at the cost of a fork. How it works: rust/src/zygote.rs.

The zygote never sees a task's code or data: they reach the task in a memfd, and its output
goes to the caller's pipes. Results of `call` come back as JSON, never unpickled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import marshal
import os
import selectors
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import _cgroup, _core
from ._cgroup import Limits
from ._errors import NsfastError, SpecError
from ._process import DEFAULT_CAPTURE_MAX_BYTES, DEVNULL, PIPE, Process, Result, check_capture_max_bytes, run, run_stdio
from ._spec import Bind, Overlay, Spec, SpecFields, Tmpfs, default_env, with_fields

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Zygote", "ZygoteError", "TaskError", "DEFAULT_PRELOAD"]

#: Imported by every zygote: nothing beyond the interpreter's built-in modules (each module
#: the zygote holds is memory its tasks copy as they touch it: preload what tasks use).
DEFAULT_PRELOAD: Tuple[str, ...] = ()
#: What a zygote keeps in its user namespace to make its tasks' namespaces and mounts.
_ZYGOTE_CAPS = ("CAP_SYS_ADMIN", "CAP_SETPCAP", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID")
#: Where the caller's Python directories that the sandbox would hide under /tmp are bound
#: (tasks mount a fresh /tmp; /run is a tmpfs of the zygote's own).
_REMAP = "/run/nsfast-zygote"
_START_TIMEOUT = 60.0
_UNSET: Any = object()


def result_cost(data: bytes) -> int:
    """What a call() result costs the caller once parsed, as max_result_bytes counts it: its
    bytes, 16 per element and 64 per array or object (brackets and commas in strings count
    too: never less). `[{},{},...]` is 3 bytes of JSON per dict of ~70 in memory: by bytes
    alone a 63 MiB result took the caller to 1.6 GiB."""
    return len(data) + 16 * data.count(b",") + 64 * (data.count(b"[") + data.count(b"{"))


def _not_json(name: str) -> Any:
    """json's parse_constant: NaN, Infinity and -Infinity are not JSON (RFC 8259)."""
    raise ValueError(f"{name} is not JSON")


class ZygoteError(NsfastError):
    """The zygote could not start (`.stderr` has its output), or died and could not be
    restarted."""

    def __init__(self, message: str, stderr: bytes = b"") -> None:
        super().__init__(message)
        self.stderr = stderr


class TaskError(NsfastError):
    """A `Zygote.call` task raised (`.type`, `.message` and `.traceback` are its exception's,
    as text) or ended without a result (`.returncode`, `.stderr`)."""

    def __init__(
        self,
        message: str,
        *,
        type: Optional[str] = None,
        traceback: str = "",
        returncode: Optional[int] = None,
        stderr: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.traceback = traceback
        self.returncode = returncode
        self.stderr = stderr


def _under(path: str, dirs: Iterable[str]) -> Optional[str]:
    for d in dirs:
        if path == d or path.startswith(d.rstrip("/") + "/"):
            return d
    return None


class _Visible:
    """Host paths the zygote needs (the interpreter, sys.path, nsfast's own files) and where
    it finds them in a sandbox on the host root: under a hidden directory, bound read-only
    at the same path; under /tmp (which every task replaces), bound below /run instead."""

    def __init__(self, spec: Spec) -> None:
        self.hidden = tuple(spec.hidden)
        self.same: List[str] = []
        self.moved: Dict[str, str] = {}

    def __call__(self, path: str) -> str:
        rp = os.path.realpath(path)
        if _under(rp, ("/tmp",)):
            if rp not in self.moved:
                self.moved[rp] = f"{_REMAP}/{len(self.moved)}"
            return self.moved[rp]
        if _under(rp, self.hidden) and not _under(rp, self.same):
            self.same[:] = [d for d in self.same if not _under(d, (rp,))] + [rp]
        return rp

    def binds(self) -> List[Bind]:
        return [Bind(d, d) for d in self.same] + [Bind(src, dst) for src, dst in self.moved.items()]


def _scratch(t: Spec, binds: Sequence[Bind]) -> Tuple[List[Tuple[str, Optional[int], str]], List[str]]:
    """The zygote's writable tmpfs mounts (the hidden directories, the spec's Tmpfs), which
    every task would otherwise share: (those each task gets a fresh tmpfs on, those made
    read-only in the zygote because a mount of its own lies below them)."""
    cands: List[Tuple[str, Optional[int], str]] = []
    for h in t.hidden:  # (a zygote is always on the host root)
        if not _under(h, ("/tmp", "/dev/shm")) and os.path.isdir(h):
            cands.append((h, _core.HIDDEN_SIZE, "1777" if h == "/var/tmp" else "0755"))
    for m in t.mounts:
        if isinstance(m, Tmpfs):
            cands.append((m.dst, m.size, "0755"))
    below = [m.dst for m in list(t.mounts) + list(binds)]
    scratch, sealed = [], []
    for path, size, mode in cands:
        if path in below and not any(isinstance(m, Tmpfs) and m.dst == path for m in t.mounts):
            continue  # the user's own mount replaces it
        if any(d != path and _under(d, (path,)) for d in below):
            sealed.append(path)
        else:
            scratch.append((path, size, mode))
    return scratch, sealed


def _spec_fields(t: Spec) -> Dict[str, Any]:
    """What _core reads of the task's Spec, as JSON for the zygote (which does not import
    nsfast): its mounts and root are the zygote's own already."""
    return {
        "_env_items": [list(kv) for kv in t._env_items],
        "cwd": t.cwd,
        "namespaces": list(t.namespaces),
        "hostname": t.hostname,
        "rootfs": None,
        "readonly_root": t.readonly_root,
        "mounts": [],
        "uid": t.uid,
        "gid": t.gid,
        "_cap_mask": t._cap_mask,
        "_init": False,
        "new_session": t.new_session,
        "die_with_parent": t.die_with_parent,
        "masked_paths": list(t.masked_paths),
        "readonly_paths": list(t.readonly_paths),
        "hidden": list(t.hidden),
        "tmp_size": t.tmp_size,
        "shm_size": t.shm_size,
        "seccomp": None if t.seccomp is None else {"allow": list(t.seccomp.allow), "deny": list(t.seccomp.deny)},
        "_nproc": t._nproc,
        "_rlimit_items": [list(r) for r in t._rlimit_items],
        "delegate_cgroup": False,
    }


class Zygote:
    """A warmed-up Python interpreter in a sandbox; each task a copy-on-write fork of it.

    `preload`: modules imported once by the zygote (their memory is shared by every task).
    `spec` / keyword spec fields: the tasks' sandbox (namespaces, mounts, env, limits,
    seccomp, ...), the secure defaults of `nsfast.Spec`; it needs the "pid" and "mnt"
    namespaces. `network`: "private" (default) gives every task a network namespace of its
    own (loopback only); "none" saves that cost (a network namespace is the dearest part of a
    task, made and torn down by the kernel under global locks): tasks then share the zygote's
    empty one but can create no socket other than AF_UNIX (seccomp), and each is a Landlock
    domain of its own, so no task reaches another's abstract unix sockets or signals it
    (needs Landlock ABI 6, Linux 6.12). `path`: directories put on the zygote's `sys.path`
    and bound read-only where the sandbox hides them (e.g. a project under /home); the
    zygote's sys.path is the caller's, less the entries the sandbox would hide that are not
    part of the Python installation or venv. `limits` (default: the spec's) is each task's cgroup; the zygote itself runs
    under the spec's limits too.

    Tasks: `run_python(code)` (a `Result`, as `python -c code` would give), `call("mod:fn",
    *args)` (its JSON result), `map_python(codes)`, `await arun_python(code)`. Tasks run in
    parallel (each call blocks only its own thread). If the zygote dies, the next task
    restarts it; `close()` (or leaving a `with` block) ends it and every task still running.

    Residual risk, compared with `nsfast.run`: every task is a copy of the same process, so
    tasks share its memory layout (ASLR offsets, heap addresses) and whatever the zygote
    holds in memory (what `preload` loaded: never task data, which the zygote never reads),
    and they share its user namespace (the same ids, no capability) and its root (read-only).
    """

    def __init__(
        self,
        preload: Sequence[str] = (),
        *,
        spec: Optional[Spec] = None,
        network: str = "private",
        path: Sequence[str] = (),
        **spec_fields: Unpack[SpecFields],
    ) -> None:
        if isinstance(path, str):
            raise TypeError("path must be a sequence of directories, not a str")
        extra_path = [os.path.abspath(os.fspath(p)) for p in path]
        for p in extra_path:
            if not os.path.isdir(p):
                raise SpecError("path", f"is not a directory: {p!r}")
        if network not in ("private", "none"):
            raise SpecError("network", f"must be 'private' or 'none', not {network!r}")
        if isinstance(preload, str):
            raise TypeError("preload must be a sequence of module names, not a str")
        self.preload = tuple(DEFAULT_PRELOAD) + tuple(m for m in preload if m not in DEFAULT_PRELOAD)
        for m in self.preload:
            if not isinstance(m, str) or not all(part.isidentifier() for part in m.split(".")):
                raise SpecError("preload", f"is not a module name: {m!r}")
        task = with_fields(spec, spec_fields)
        for ns in ("pid", "mnt"):
            if ns not in task.namespaces:
                raise SpecError("namespaces", f"a zygote's tasks need the {ns!r} namespace")
        # What a zygote's tasks cannot have, refused rather than dropped.
        if task.init is False:
            raise SpecError(
                "init", "zygote tasks always run under nsfast-init as their pid 1 (init=False cannot apply)"
            )
        if task.delegate_cgroup:
            raise SpecError("delegate_cgroup", "is not available to zygote tasks")
        if "time" in task.namespaces:
            raise SpecError("namespaces", "a zygote's tasks cannot have a time namespace of their own")
        if task.rootfs is not None:
            # The zygote is this interpreter, with nsfast's module, at their host paths.
            raise SpecError("rootfs", "a Zygote runs on the host root (its interpreter is the caller's); use mounts=")
        if any(isinstance(m, Overlay) for m in task.mounts):
            raise SpecError("mounts", "Overlay mounts would be one view shared by every task of the zygote")
        if task.overlay:
            # One overlay for the zygote would be one writable root shared by every task.
            raise SpecError(
                "overlay", "zygote tasks share the zygote's root (read-only); use mounts= for writable trees"
            )
        if network == "none":
            if task.seccomp is None:
                raise SpecError(
                    "network", "'none' is enforced by the seccomp filter (AF_UNIX sockets only): seccomp=None"
                )
            if "net" not in task.namespaces:
                raise SpecError("network", "'none' shares the zygote's own network namespace: keep 'net' in namespaces")
            abi = _core.landlock_abi()
            if abi < 6:
                raise SpecError(
                    "network",
                    f"'none' needs Landlock ABI 6 (Linux 6.12: abstract unix sockets scoped per task); this kernel has {abi}",
                )
        self.network = network
        self.spec = task
        exe = os.path.realpath(sys.executable)
        here = os.path.dirname(os.path.abspath(__file__))
        vis = _Visible(task)
        # The interpreter finds its standard library from its own path: same path.
        for d in (sys.base_prefix, os.path.dirname(exe)):
            if _under(os.path.realpath(d), ("/tmp",)):
                raise SpecError("Zygote", f"the interpreter's directory {d} is under /tmp, which tasks replace")
            vis(d)
        # sys.path as the sandbox sees it: entries a task could see anyway, the Python
        # installation and venv, nsfast's own directory and `path`; not the others
        # (a script's directory in a hidden /home, say): binding them would show them.
        install = [os.path.realpath(d) for d in (sys.prefix, sys.base_prefix, sys.exec_prefix)]
        own = os.path.dirname(here)
        path = []
        for p in sys.path:
            rp = os.path.realpath(p) if p else ""
            if not rp or not os.path.isdir(rp):
                continue
            if _under(rp, install) or rp == own or not _under(rp, tuple(task.hidden) + ("/tmp",)):
                path.append(vis(rp))
        path += [vis(p) for p in extra_path]
        core, main = vis(_core.__file__), vis(os.path.join(here, "_zygote_main.py"))
        if vis.moved:
            # Files, not directories: bind the package directory instead.
            core = os.path.join(vis(here), os.path.basename(_core.__file__))
            main = os.path.join(vis(here), "_zygote_main.py")
            vis.moved = {k: v for k, v in vis.moved.items() if os.path.isdir(k)}
        binds = vis.binds()
        scratch, sealed = _scratch(task, binds)
        caps = tuple(dict.fromkeys(tuple(task.capabilities) + _ZYGOTE_CAPS))
        fields = _spec_fields(task)
        zlimits = task.limits
        req = _cgroup.request(task.limits, kill_tree=False, strict=task.strict) if task.cgroup else None
        if req is not None and req.pids is not None and task.limits is not None:
            # Each task's own pids cgroup bounds it. RLIMIT_NPROC would not: the kernel counts
            # it per user namespace and uid, and every task, and the zygote, is uid 0 of the
            # zygote's: one task holding its limit's worth of processes would leave the others,
            # and the zygote's next fork, none. (Without a pids cgroup it is all there is.)
            fields["_nproc"] = None
            zlimits = dataclasses.replace(task.limits, pids=None)
        self._zspec = dataclasses.replace(
            task,
            limits=zlimits,
            capabilities=caps,
            seccomp=None,
            masked_paths=(),
            readonly_paths=(),
            mounts=tuple(task.mounts) + tuple(binds),
            uid=None,
            gid=None,
            rlimits={},
            init=None,
            delegate_cgroup=False,
        )
        self._argv = [exe, "-I", "-S", "-c", _BOOT]
        if network == "none":
            # No network namespace per task: the zygote's (loopback only, nothing on it),
            # with no IP socket and abstract unix sockets scoped to the task (Landlock).
            fields["namespaces"] = [n for n in fields["namespaces"] if n != "net"]
            fields["seccomp"]["unix_only"] = True
        self._cfg = {
            "path": path,
            "preload": list(self.preload),
            "spec": fields,
            "core": core,
            "main": main,
            "scoped": network == "none",
            "scratch": scratch,
            "sealed": sealed,
            # Each task's own cgroups on its /sys/fs/cgroup: the caller's hierarchies (the
            # zygote's /sys/fs/cgroup has only those it has a cgroup of its own in).
            "cgroups": _core.cgroup_hierarchies() if task.cgroup and "cgroup" in task.namespaces else None,
        }
        self._lock = threading.Lock()
        self._proc: Optional[Process] = None
        self._link: Any = None
        self._closed = False
        self.restarts = 0
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- the zygote process ----------------------------------------------------------------

    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            cfg = dict(self._cfg, fd=child.fileno())
            # Started by one of nsfast's long-lived spawner threads: the zygote's
            # die_with_parent follows that thread, not whichever thread (a worker pool's)
            # made or restarted the Zygote.
            from ._aio import _spawner

            proc = (
                _spawner()
                .submit(
                    Process,
                    self._argv + [marshal.dumps(cfg).hex()],
                    spec=self._zspec,
                    stdin=DEVNULL,
                    stdout=PIPE,
                    stderr=PIPE,
                    pass_fds=[child.fileno()],
                )
                .result()
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        try:
            _wait_ready(proc)
        except BaseException:
            parent.close()
            raise
        self._proc = proc
        self._link = _core.ZygoteLink(parent.detach())

    def _restart(self, failed: Any) -> None:
        """Start a new zygote in place of the one behind the link `failed` (unless another
        thread has replaced it already)."""
        with self._lock:
            if self._closed:
                raise ZygoteError("the zygote is closed")
            if self._link is not failed and self._link is not None:
                return
            self._stop()
            self.restarts += 1
            self._start()

    def _stop(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def close(self) -> None:
        """End the zygote and every task it started that is still running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            pass

    @property
    def pid(self) -> int:
        """The host pid of the zygote's sandbox (its nsfast-init)."""
        return self._proc.pid if self._proc is not None else -1

    # -- tasks ------------------------------------------------------------------------------

    def _starter(self, payload: Dict[str, Any], limits: Any, result_fd: Optional[int]) -> Any:
        """A `_start` for run(): it starts the task through the link (restarting a zygote that
        died). `result_fd`: the task's fd 3 (None: a /dev/null of its own, opened for this
        task only: an open file shared by every task would carry state from one to the next,
        its flags, owner signal or a lock on it)."""
        if limits is _UNSET:
            limits = self.spec.limits
        cgroup = None
        if self.spec.cgroup:
            cgroup = _cgroup.request(limits, kill_tree=False, strict=self.spec.strict)
        # marshal: what the zygote can read without importing anything (from us, not a task).
        data = marshal.dumps(payload)

        def start(stdio: Tuple[int, int, int]) -> Any:
            for attempt in range(3):
                if self._closed:
                    raise ZygoteError("the zygote is closed")
                link = self._link
                result = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC) if result_fd is None else result_fd
                try:
                    if link is None:
                        raise BrokenPipeError("no zygote")
                    return link.task(data, stdio=stdio, result=result, cgroup=cgroup, new_session=self.spec.new_session)
                except BrokenPipeError:
                    # The zygote died: restart it (unless another thread did already) and
                    # try again; a task's own setup failure is a SpawnError and propagates.
                    if attempt == 2:
                        raise ZygoteError("the zygote died and could not be restarted") from None
                    self._restart(link)
                finally:
                    if result_fd is None:
                        os.close(result)  # the task has its own copy (or none: it did not start)
            raise AssertionError("unreachable")

        return start

    def _payload(self, mode: str, env: Optional[Mapping[str, str]], **fields: Any) -> Dict[str, Any]:
        if env is None:
            env = self.spec.env if self.spec.env is not None else default_env()
        elif not isinstance(env, Mapping):
            raise TypeError(f"env must be a mapping, not {type(env).__name__}")
        return dict(fields, mode=mode, env={str(k): str(v) for k, v in env.items()})

    def run_python(
        self,
        code: str,
        *,
        input: Any = None,
        timeout: Optional[float] = None,
        limits: Optional[Limits] = _UNSET,
        env: Optional[Mapping[str, str]] = None,
        argv: Sequence[str] = (),
        text: bool = False,
        check: bool = False,
        capture_max_bytes: Optional[int] = DEFAULT_CAPTURE_MAX_BYTES,
    ) -> Result:
        """Run `code` as `__main__` of a fresh module in a new task; a `Result` as `python
        -c code` would give (stdout/stderr captured; returncode 1 with the traceback on
        stderr for an uncaught exception, `sys.exit(n)` -> n, death by signal N -> -N) with
        its `usage`. `timeout` raises `nsfast.TimeoutExpired`; `limits` replaces the spec's
        for this task; `env` is its whole environment; `argv` is sys.argv[1:]; a stream over
        `capture_max_bytes` kills the task and raises `OutputLimitError` (as `nsfast.run`)."""
        return run(
            ["python", "-c", code],
            spec=self.spec,
            input=input,
            stdin=None if input is not None else DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=check,
            text=text,
            capture_max_bytes=capture_max_bytes,
            _start=self._code_starter(code, env, argv, limits),
            _id_base=self._id_base(),
        )

    def _id_base(self) -> Optional[int]:
        """The host id the zygote's (and so its tasks') root is: its range."""
        proc = self._proc
        return None if proc is None or proc._sandbox is None else proc._sandbox.id_base

    def _code_starter(self, code: str, env: Optional[Mapping[str, str]], argv: Sequence[str], limits: Any) -> Any:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        if isinstance(argv, (str, bytes)):  # (one string is not its characters)
            raise TypeError(f"argv must be a sequence of arguments (sys.argv[1:]), not {type(argv).__name__}")
        payload = self._payload("code", env, code=code, argv=["-c", *map(str, argv)])
        return self._starter(payload, limits, None)

    def call(
        self,
        target: str,
        /,
        *args: Any,
        timeout: Optional[float] = None,
        limits: Optional[Limits] = _UNSET,
        env: Optional[Mapping[str, str]] = None,
        max_result_bytes: int = 64 << 20,
        **kwargs: Any,
    ) -> Any:
        """Call the importable function `target` ("package.module:function") with `args`
        and `kwargs` (JSON-serialisable) in a new task; its JSON-serialisable return value.
        An exception in the task raises `TaskError` (its type, message and traceback as
        text, and the task's stderr, the first DEFAULT_CAPTURE_MAX_BYTES: more kills the
        task, OutputLimitError). What it prints to stdout is not kept. The result is data
        from the task: parsed as JSON, never unpickled."""
        if not isinstance(target, str) or ":" not in target:
            raise ValueError(f"target must be 'module:function', got {target!r}")
        # JSON in, JSON out: not serialisable is a TypeError here, not in the task, and the
        # task gets what json would give it (lists for tuples).
        args_kwargs = json.loads(json.dumps([list(args), kwargs]))
        payload = self._payload("call", env, target=target, args=args_kwargs[0], kwargs=args_kwargs[1])
        fd = os.memfd_create("nsfast-result", os.MFD_CLOEXEC)
        try:
            r = run(
                ["python", "-c", f"<call {target}>"],
                spec=self.spec,
                stdin=DEVNULL,
                stdout=DEVNULL,
                stderr=PIPE,
                timeout=timeout,
                _start=self._starter(payload, limits, fd),
                _id_base=self._id_base(),
            )
            size = os.fstat(fd).st_size
            if size > max_result_bytes:
                raise TaskError(f"the result of {target} is {size} bytes, over max_result_bytes={max_result_bytes}")
            data = os.pread(fd, size, 0) if size else b""
        finally:
            os.close(fd)
        cost = result_cost(data)
        if cost > max_result_bytes:
            raise TaskError(
                f"the result of {target} would take ~{cost} bytes parsed ({size} of JSON), over "
                f"max_result_bytes={max_result_bytes}"
            )
        try:
            envelope = json.loads(data, parse_constant=_not_json) if data else None
        except (ValueError, RecursionError) as bad:  # not JSON, or nested deeper than the parser goes
            why = "nested too deep" if isinstance(bad, RecursionError) else str(bad)
            raise TaskError(
                f"the result of {target} is not JSON ({why})", returncode=r.returncode, stderr=r.stderr
            ) from None
        if not isinstance(envelope, dict) or not ({"ok"} == set(envelope) or {"error"} == set(envelope)):
            raise TaskError(
                f"{target} ended with returncode {r.returncode} and no result",
                returncode=r.returncode,
                stderr=r.stderr,
            )
        if "error" in envelope:
            e = envelope["error"] if isinstance(envelope["error"], dict) else {}
            raise TaskError(
                str(e.get("message", "")),
                type=str(e.get("type", "")),
                traceback=str(e.get("traceback", "")),
                returncode=r.returncode,
                stderr=r.stderr,
            )
        return envelope["ok"]

    def map_python(self, codes: Iterable[str], *, concurrency: Optional[int] = None, **run_kwargs: Any) -> List[Result]:
        """`run_python` of each code, `concurrency` at a time (default: the CPU count);
        the Results in order."""
        codes = list(codes)
        n = (os.cpu_count() or 2) if concurrency is None else concurrency
        if n < 1:
            raise ValueError(f"concurrency must be >= 1, got {n}")
        with concurrent.futures.ThreadPoolExecutor(min(n, max(1, len(codes)))) as pool:
            return list(pool.map(lambda c: self.run_python(c, **run_kwargs), codes))

    async def arun_python(
        self,
        code: str,
        *,
        input: Any = None,
        timeout: Optional[float] = None,
        limits: Optional[Limits] = _UNSET,
        env: Optional[Mapping[str, str]] = None,
        argv: Sequence[str] = (),
        text: bool = False,
        check: bool = False,
        capture_max_bytes: Optional[int] = DEFAULT_CAPTURE_MAX_BYTES,
    ) -> Result:
        """`run_python` for asyncio: the task's pidfd and pipes are loop readers; cancelling
        kills the task and reaps it."""
        from ._aio import _aspawn_with, _finish_run

        check_capture_max_bytes(capture_max_bytes)
        stdin, stdout, stderr = run_stdio(input, True, None, None, None, timeout)
        start = self._code_starter(code, env, argv, limits)
        proc = await _aspawn_with(
            lambda: Process(
                ["python", "-c", code],
                spec=self.spec,
                stdin=DEVNULL if stdin is None else stdin,
                stdout=stdout,
                stderr=stderr,
                text=text,
                _start=start,
                _id_base=self._id_base(),
            )
        )
        return await _finish_run(proc, input, timeout, check, capture_max_bytes)


def _wait_ready(proc: Process) -> None:
    """Until the zygote wrote its ready byte (then its stdout and stderr go to /dev/null);
    ZygoteError with its stderr if it ended or did not get there in time."""
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    err = b""
    deadline = time.monotonic() + _START_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                proc.wait()
                raise ZygoteError(f"the zygote did not start within {_START_TIMEOUT:.0f} s", err)
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if key.data == "err":
                    err += data
                    if not data:
                        sel.unregister(key.fd)
                    continue
                if data.startswith(b"R"):
                    return
                proc.kill()
                proc.wait()
                text = err.decode(errors="replace").strip()
                raise ZygoteError(f"the zygote failed to start (returncode {proc.returncode}): {text}", err)
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
        proc.stdout = proc.stderr = None


# ---------------------------------------------------------------------------------------
# Inside the zygote: _zygote_main.py, loaded by path (not as part of the nsfast package, so
# the zygote imports only the standard library modules it needs and nsfast._core: the less
# memory it has, the cheaper each fork and each task's exit).

_BOOT = (
    "import sys,marshal,_frozen_importlib as b,_frozen_importlib_external as x\n"
    "c=marshal.loads(bytes.fromhex(sys.argv[1]));sys.path[:]=c['path']\n"
    "def load(n,p,L):\n"
    " s=b.spec_from_loader(n,L(n,p));m=b.module_from_spec(s);sys.modules[n]=m;s.loader.exec_module(m);return m\n"
    "core=load('nsfast._core',c['core'],x.ExtensionFileLoader)\n"
    "load('_nsfast_zygote',c['main'],x.SourceFileLoader).serve(c,core)"
)
