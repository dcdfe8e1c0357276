"""The zygote's side of `nsfast.Zygote` (see _zygote.py): loaded by path inside the
zygote's sandbox, with only the standard library and nsfast._core; never imported by the
caller. Everything here runs in the zygote or in a task."""

from __future__ import annotations

import atexit
import gc
import marshal
import os
import sys
import types

# Only built-in modules: every module the zygote imports is memory each task may copy, and
# threading's at-fork hook would run in every task (a task that uses json, traceback or
# threading imports it, as `python -c` would). The payload and the config are marshal data
# from the caller (who is trusted), never from a task.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict


def serve(cfg: Dict[str, Any], core: Any) -> None:
    """Import `preload`, say "ready" on stdout, then fork tasks until the caller closes the
    socket."""
    for m in cfg["preload"]:
        __import__(m)
    spec = _spec(cfg["spec"])
    fd = int(cfg["fd"])
    sys.stdout.flush()
    os.write(1, b"R")
    null = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    os.close(null)
    # A task sets its environment afresh; emptied here once, not in every task (clearing
    # os.environ runs Python code whose first run writes ~40 pages a task would copy).
    os.environ.clear()
    # What the zygote holds is never collected by a task (no copy-on-write of every page the
    # collector would touch), as prefork servers do.
    gc.collect()
    gc.freeze()
    scratch = [(os.fsencode(p), size, mode) for p, size, mode in cfg["scratch"]]
    sealed = [os.fsencode(p) for p in cfg["sealed"]]
    cgroups = cfg["cgroups"]
    if core.zygote_serve(fd, spec, scoped=bool(cfg["scoped"]), scratch=scratch, sealed=sealed, cgroups=cgroups):
        _task()
    os._exit(0)


def _spec(fields: Dict[str, Any]) -> Any:
    """The task's Spec as _core reads it (attribute by attribute), from the caller's JSON."""
    ns = types.SimpleNamespace(**fields)
    ns._rlimit_items = [tuple(r) for r in fields["_rlimit_items"]]
    ns._env_items = [tuple(kv) for kv in fields["_env_items"]]
    if fields["seccomp"] is not None:
        ns.seccomp = types.SimpleNamespace(**fields["seccomp"])
    return ns


def _task() -> None:
    """In a task: run its payload (fd 4), results to fd 3; never returns."""
    import builtins

    # The caller's go (fd 6, rust/src/zygote.rs GO_FD), written once the zygote's answer for
    # this task reached it. EOF: it never did (the zygote died in between) and the caller may
    # start the task again on a new zygote, so this copy runs nothing.
    try:
        go = os.read(6, 1)
    except OSError:
        go = b""
    if go != b"g":
        os._exit(0)
    os.close(6)
    code = 1
    try:
        size = os.fstat(4).st_size
        req = marshal.loads(os.pread(4, size, 0))
        os.close(4)
        os.environ.update(req["env"])
        if req["mode"] == "code":
            sys.argv = list(req["argv"])
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = builtins
            sys.modules["__main__"] = main
            try:
                exec(compile(req["code"], "<string>", "exec"), main.__dict__)
                code = 0
            except SystemExit as e:
                code = _exit_code(e)
            except BaseException as e:
                # As `python -c` shows it: from the code's own frames on.
                tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
                sys.excepthook(type(e), e.with_traceback(tb), tb)
                code = 1
                if isinstance(e, KeyboardInterrupt):
                    # As the interpreter does: end by the signal (returncode -2).
                    code = _finalize(code)
                    _flush()
                    import signal

                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    os.kill(os.getpid(), signal.SIGINT)
        else:
            code = _call(req)
        code = _finalize(code)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
    finally:
        _flush()
        os._exit(code)


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass


def _exit_code(e: SystemExit) -> int:
    c = e.code
    if c is None:
        return 0
    if isinstance(c, int):
        return c & 0xFF
    try:
        print(c, file=sys.stderr)
    except BaseException:
        pass
    return 1


def _finalize(code: int) -> int:
    """What the interpreter does at exit: join non-daemon threads, run atexit."""
    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:
            pass
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    return code


def _call(req: Dict[str, Any]) -> int:
    import importlib
    import json

    mod, _, name = req["target"].partition(":")
    try:
        obj: Any = importlib.import_module(mod)
        for part in name.split("."):
            obj = getattr(obj, part)
        value = obj(*req["args"], **req["kwargs"])
        out = json.dumps({"ok": value}).encode()
        code = 0
    except SystemExit as e:
        c = _exit_code(e)
        out = json.dumps({"error": {"type": "SystemExit", "message": str(e.code), "traceback": ""}}).encode()
        code = c or 1
    except BaseException as e:
        import traceback

        tb = traceback.format_exc()
        out = json.dumps({"error": {"type": type(e).__name__, "message": str(e), "traceback": tb}}).encode()
        code = 1
    view = memoryview(out)
    while view:
        view = view[os.write(3, view) :]
    return code
