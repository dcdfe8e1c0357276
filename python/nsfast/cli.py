"""The `nsfast` command line. It only builds a `Spec` (flag names from bwrap, unshare and
docker run) and calls the library.

    nsfast run [-d --name NAME] [--hostname H] [--rootfs DIR | --image PATH[:TAG]] [--overlay] [--bind SRC DEST]
               [--ro-bind SRC DEST] [--tmpfs DEST] [--unshare-all | --unshare-NS...]
               [--share-NS...] [--memory SIZE] [--pids N] [--cpus N] [--cpu-time S]
               [--no-limits] [--timeout S] [--json | --json-file PATH] -- CMD...
    nsfast exec NAME|PID -- CMD...      run CMD inside a container (or any process)
    nsfast ps                           list detached containers
    nsfast logs NAME                    print what a detached container wrote
    nsfast stop NAME                    stop a detached container and clean up
    nsfast ns PID|NAME [PID|NAME...]    namespace inodes per type, differences marked
    nsfast demo

Exit status (docker run's and timeout(1)'s conventions): run and exec exit with the
command's status, 128+N if a signal N killed it, 124 if --timeout killed it, 125 if nsfast
itself failed (a value it rejects, a sandbox it could not set up), 126 if the command could
not be executed, 127 if it was not found; 2 for a command line that does not parse. ps,
stop and ns exit 0, or 1 when a named container or process is not there or is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import subprocess
import sys
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple, Union

from ._cgroup import DEFAULT_LIMITS, Limits
from ._errors import NsfastError, SpawnError, SpecError
from ._spec import DEFAULT_NAMESPACES, NAMESPACES, Bind, Spec, Tmpfs

__all__ = ["main", "build_parser", "spec_from_args", "limits_from_args"]

#: Exit statuses of nsfast's own outcomes (timeout(1) and docker run's numbers).
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 128 + 2  # SIGINT, as a shell reports Ctrl-C
EXIT_NSFAST = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


def _size(n: Any) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


RUN_EPILOG = f"""\
namespaces:
  A sandbox gets new namespaces of the default types ({" ".join(DEFAULT_NAMESPACES)}).
  --unshare-NS adds type NS to them (it never drops the others: --unshare-user alone keeps
  every default); --share-NS keeps the host's NS instead; --unshare-all adds every type but
  time. --share wins over --unshare for the same type.

limits:
  A sandbox is limited to {_size(DEFAULT_LIMITS.memory)} of memory and {DEFAULT_LIMITS.pids} processes unless told otherwise.
  --memory, --pids, --cpus and --cpu-time replace that one limit and keep the others
  (--memory 256M keeps the {DEFAULT_LIMITS.pids}-process limit); --no-limits drops the defaults, so
  only the limit flags given with it apply. --timeout is wall time for the whole sandbox.

--json / --json-file:
  After the run, one JSON object on stderr (one line) or in PATH: args, returncode (as
  nsfast.Result: negative = killed by that signal; null if it timed out or did not start),
  exit_status (nsfast's), timed_out, usage (nsfast.Usage's fields, null where not measured)
  and error (nsfast's error line, or null). The command's stdout and stderr are not in it.

exit status:
  the command's; 128+N if signal N killed it; {EXIT_TIMEOUT} if --timeout killed it (as timeout(1));
  {EXIT_NSFAST} if nsfast failed or refused a value; {EXIT_CANNOT_EXECUTE} if the command cannot be executed; {EXIT_NOT_FOUND} if it
  was not found (as docker run); 2 if the command line does not parse.
"""


class _MountAction(argparse.Action):
    """Collect --bind/--ro-bind/--tmpfs in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        items = list(getattr(namespace, "mounts", None) or [])
        items.append((option_string, values))
        namespace.mounts = items


def _add_spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hostname", help="hostname inside (needs the uts namespace)")
    p.add_argument("--rootfs", metavar="DIR", help="use DIR as / (default: the host root, read-only)")
    p.add_argument(
        "--image",
        metavar="PATH[:TAG]",
        help="run in an OCI image (a layout directory or a docker save tarball; TAG or @sha256:... picks one): its "
        "Env, WorkingDir, User and, without a command, Entrypoint/Cmd apply",
    )
    p.add_argument("--writable-root", action="store_true", help="do not make the root read-only")
    p.add_argument(
        "--overlay",
        action="store_true",
        help="a writable copy-on-write root (overlayfs; changes in a tmpfs, gone at exit; the root is never modified)",
    )
    p.add_argument("--overlay-size", metavar="SIZE", help="size of the overlay's tmpfs (default 256M)")
    p.add_argument("--overlay-upper", metavar="DIR", help="keep the overlay's changes in DIR/upper (DIR/work: scratch)")
    p.add_argument(
        "--bind",
        nargs=2,
        metavar=("SRC", "DEST"),
        action=_MountAction,
        dest="mounts",
        help="bind SRC onto DEST, writable",
    )
    p.add_argument(
        "--ro-bind",
        nargs=2,
        metavar=("SRC", "DEST"),
        action=_MountAction,
        dest="mounts",
        help="bind SRC onto DEST, read-only",
    )
    p.add_argument("--tmpfs", metavar="DEST", action=_MountAction, dest="mounts", help="a fresh tmpfs on DEST")
    p.add_argument("--unshare-all", action="store_true", help="add new namespaces of every type but time")
    for ns in NAMESPACES:
        p.add_argument(
            f"--unshare-{ns}",
            action="append_const",
            const=ns,
            dest="unshare",
            help=f"new {ns} namespace "
            + ("(a default already)" if ns in DEFAULT_NAMESPACES else "(added to the defaults)"),
        )
    for ns in NAMESPACES:
        extra = " (a root caller's sandbox then runs as host root: trusted code only)" if ns == "user" else ""
        p.add_argument(
            f"--share-{ns}",
            action="append_const",
            const=ns,
            dest="share",
            help=f"keep the host's {ns} namespace{extra}",
        )
    p.add_argument("--chdir", metavar="DIR", default="/", help="working directory inside (default /)")
    p.add_argument(
        "--setenv", nargs=2, metavar=("VAR", "VALUE"), action="append", default=[], help="set an environment variable"
    )
    p.add_argument("--uid", type=int, help="uid inside")
    p.add_argument("--gid", type=int, help="gid inside")
    p.add_argument("--cap-add", metavar="CAP", action="append", default=[], help="keep capability CAP")
    p.add_argument("--init", action="store_true", help="run a tiny init as pid 1 (forwards signals, reaps)")


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits (each replaces that field of the defaults, keeping the others)")
    g.add_argument(
        "--memory",
        metavar="SIZE",
        help=f"memory limit: bytes or 256M, 1.5G (default {_size(DEFAULT_LIMITS.memory)})",
    )
    g.add_argument("--pids", metavar="N", type=int, help=f"at most N processes (default {DEFAULT_LIMITS.pids})")
    g.add_argument("--cpus", metavar="N", type=float, help="N cores of CPU time, e.g. 0.5 (default: no limit)")
    g.add_argument(
        "--cpu-time", metavar="SECONDS", type=float, help="CPU time the sandbox may use in all (default: no limit)"
    )
    g.add_argument("--no-limits", action="store_true", help="no default limits: only the limit flags given apply")


def _add_wait_flags(p: argparse.ArgumentParser, what: str, killed: str) -> None:
    """--timeout and --json/--json-file, of the subcommands nsfast waits for."""
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        help=f"kill {killed} after SECONDS of wall time and exit {EXIT_TIMEOUT}, as timeout(1) (0: none)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help=f"after {what}, print the result and usage as JSON on stderr")
    out.add_argument("--json-file", metavar="PATH", help="write the result and usage as JSON to PATH")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    # No abbreviations (as bwrap): `--share-n` or `--mem` must not silently mean a flag.
    parser = argparse.ArgumentParser(prog="nsfast", description="Fast, safe Linux sandboxes.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"nsfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a command in a new sandbox",
        usage="nsfast run [options] -- CMD [ARGS...]",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_spec_flags(run)
    _add_limit_flags(run)
    run.add_argument("-d", "--detach", action="store_true", help="start a detached container and print its name")
    run.add_argument("--name", help="name of the detached container (default: generated)")
    run.add_argument(
        "--log-max-size",
        metavar="SIZE",
        default=None,
        help=f"with -d: the most of its output kept in its log (then log.1 has the part before; default "
        f"{_size(DEFAULT_LOG_MAX)}, 'none' for no bound)",
    )
    _add_wait_flags(run, "the run", "the whole sandbox")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    ex = sub.add_parser(
        "exec",
        help="run a command inside a container or process",
        usage="nsfast exec [options] NAME|PID -- CMD [ARGS...]",
        allow_abbrev=False,
    )
    ex.add_argument("target", metavar="NAME|PID")
    ex.add_argument("--chdir", metavar="DIR", help="working directory (default: the container's)")
    ex.add_argument("--setenv", nargs=2, metavar=("VAR", "VALUE"), action="append", default=[])
    _add_wait_flags(ex, "the exec", "everything the exec started")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("ps", help="list detached containers", allow_abbrev=False)
    lg = sub.add_parser("logs", help="print what a detached container wrote (its log)", allow_abbrev=False)
    lg.add_argument("name", metavar="NAME")
    st = sub.add_parser("stop", help="stop a detached container (SIGTERM, then kill) and clean up", allow_abbrev=False)
    st.add_argument("names", nargs="+", metavar="NAME")
    st.add_argument("-t", "--time", type=float, default=10.0, help="seconds to wait after SIGTERM (default 10)")
    ns = sub.add_parser("ns", help="namespace inodes of processes, differences marked", allow_abbrev=False)
    ns.add_argument("targets", nargs="+", metavar="PID|NAME")
    sub.add_parser("demo", help="show what a sandbox isolates and how fast it starts")
    for p in sub.choices.values():
        p.set_defaults(subparser=p)  # errors print the subcommand's usage
    return parser


class _UserError(Exception):
    """A value on a command line that parses but cannot work: one line, exit 125."""


_LIMIT_FLAGS = {"memory": "--memory", "pids": "--pids", "cpu": "--cpus", "cpu_time": "--cpu-time"}


def limits_from_args(args: argparse.Namespace) -> Optional[Limits]:
    """The Limits the flags describe: nsfast.DEFAULT_LIMITS with the fields given replaced
    (None with --no-limits and no limit flag)."""
    given: Dict[str, Any] = {}
    for field, value in (
        ("memory", args.memory),
        ("pids", args.pids),
        ("cpu", args.cpus),
        ("cpu_time", args.cpu_time),
    ):
        if value is not None:
            given[field] = value
    if "cpu_time" in given and float(given["cpu_time"]).is_integer():
        given["cpu_time"] = int(given["cpu_time"])  # whole seconds stay an int
    base = None if args.no_limits else DEFAULT_LIMITS
    if not given:
        return base
    try:
        return Limits(**given) if base is None else dataclasses.replace(base, **given)
    except SpecError as e:
        # "Limits.memory: is not a size: ..." -> "--memory: is not a size: ..."
        name = e.field.split(".", 1)[-1]
        message = str(e)[len(e.field) + 2 :]
        raise _UserError(f"{_LIMIT_FLAGS.get(name, e.field)}: {message}") from None


def spec_from_args(args: argparse.Namespace) -> Spec:
    """The Spec the flags describe."""
    if getattr(args, "image", None) and args.rootfs:
        raise _UserError("--image and --rootfs: one root only (the image is its own)")
    # The defaults (user included, for every caller) plus what --unshare-* adds; --share-*
    # takes one away. An explicit flag never silently drops the rest of the isolation.
    wanted = set(DEFAULT_NAMESPACES) | set(args.unshare or ())
    if args.unshare_all:
        wanted |= {n for n in NAMESPACES if n != "time"}
    wanted -= set(args.share or ())
    namespaces = [n for n in NAMESPACES if n in wanted]
    mounts: List[Union[Bind, Tmpfs]] = []
    for opt, val in args.mounts or []:
        if opt == "--bind":
            mounts.append(Bind(val[0], val[1], readonly=False))
        elif opt == "--ro-bind":
            mounts.append(Bind(val[0], val[1], readonly=True))
        else:
            mounts.append(Tmpfs(val))
    env = None
    if args.setenv:
        from ._spec import default_env

        env = default_env()
        env.update(dict(args.setenv))
    return Spec(
        namespaces=tuple(namespaces),
        rootfs=_image(args.image) if args.image else args.rootfs,
        # --overlay: writable through the overlay (readonly_root decided by Spec).
        readonly_root=None if args.overlay and not args.writable_root else not args.writable_root,
        overlay=args.overlay,
        overlay_upper=args.overlay_upper,
        **({"overlay_size": args.overlay_size} if args.overlay_size is not None else {}),
        mounts=tuple(mounts),
        hostname=args.hostname,
        env=env,
        cwd=args.chdir,
        uid=args.uid,
        gid=args.gid,
        capabilities=tuple(args.cap_add),
        init=True if args.init else None,  # None: nsfast-init exactly with a pid namespace
        limits=limits_from_args(args) if hasattr(args, "memory") else DEFAULT_LIMITS,
        # Its own session, so no controlling terminal: with ours, TIOCSTI could type
        # commands into the caller's shell (CVE-2017-5226). stdio still works.
        new_session=True,
    )


def _image(arg: str) -> Any:
    """--image PATH[:TAG] or PATH@sha256:...: the loaded nsfast.Image."""
    from ._image import Image

    path, ref = arg, None
    if not os.path.exists(arg):
        if "@sha256:" in arg:
            path, _, digest = arg.rpartition("@")
            ref = digest
        elif ":" in arg:
            path, _, ref = arg.rpartition(":")
    return Image(path, ref)


def _cmd(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[str]:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd and not getattr(args, "image", None):  # an image's Entrypoint/Cmd instead
        args.subparser.error(f"missing command: nsfast {args.command} [options] -- CMD [ARGS...]")
    return cmd


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _error(e: BaseException) -> Optional[Tuple[int, str]]:
    """(exit status, error line) of an exception that is the user's or the system's doing, not
    nsfast's bug; None for anything else (a traceback then says where the bug is)."""
    if isinstance(e, _UserError):
        return EXIT_NSFAST, str(e)
    if isinstance(e, SpawnError):
        if e.step == "exec":
            not_found = e.errno in (errno.ENOENT, errno.ENOTDIR)
            return (EXIT_NOT_FOUND if not_found else EXIT_CANNOT_EXECUTE), str(e)
        return EXIT_NSFAST, str(e)
    if isinstance(e, (NsfastError, ValueError, TypeError, LookupError)):
        return EXIT_NSFAST, str(e)
    if isinstance(e, OSError):
        why = (e.strerror or str(e)).split(" (os error")[0]  # the Rust core's suffix
        return EXIT_NSFAST, f"{why}: {e.filename}" if e.filename is not None else why
    return None


def _open_report(args: argparse.Namespace) -> Optional[IO[str]]:
    """Where --json / --json-file go, opened before the run so a bad PATH fails first."""
    if args.json_file is not None:
        try:
            return open(args.json_file, "w")
        except OSError as e:
            raise _UserError(f"--json-file: cannot write {args.json_file}: {e.strerror}") from None
    return sys.stderr if args.json else None


def _report(
    out: Optional[IO[str]],
    cmd: List[str],
    status: int,
    returncode: Optional[int] = None,
    usage: Any = None,
    timed_out: bool = False,
    error: Optional[str] = None,
) -> None:
    if out is None:
        return
    obj = {
        "args": cmd,
        "returncode": returncode,
        "exit_status": status,
        "timed_out": timed_out,
        "usage": dataclasses.asdict(usage) if usage is not None else None,
        "error": error,
    }
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _timeout(args: argparse.Namespace) -> Optional[float]:
    t = args.timeout
    if t is None or t == 0:  # 0: no timeout, as timeout(1)
        return None
    if not math.isfinite(t) or t < 0:
        raise _UserError(f"--timeout: must be a number of seconds >= 0, got {t!r}")
    return float(t)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._process import run

    cmd = _cmd(args, parser)
    if args.detach:
        for flag, value in (("--timeout", args.timeout), ("--json", args.json), ("--json-file", args.json_file)):
            if value:
                args.subparser.error(f"{flag} cannot be used with -d (it is about a run nsfast waits for)")
        return _run_detached(args, cmd, spec_from_args(args))
    if args.name:
        args.subparser.error("--name needs -d")
    if args.log_max_size is not None:
        args.subparser.error("--log-max-size needs -d")
    report = _open_report(args)
    try:
        try:
            timeout = _timeout(args)
            result = run(cmd, spec=spec_from_args(args), timeout=timeout)
        except subprocess.TimeoutExpired as e:
            print(f"nsfast: timed out after {timeout:g} s: the sandbox was killed", file=sys.stderr)
            _report(report, cmd, EXIT_TIMEOUT, usage=getattr(e, "usage", None), timed_out=True)
            return EXIT_TIMEOUT
        except KeyboardInterrupt:
            # The sandbox is killed, reaped and cleaned up by now; the report says so.
            _report(report, cmd, EXIT_INTERRUPTED, error="interrupted (Ctrl-C): the sandbox was killed")
            return EXIT_INTERRUPTED
        except Exception as e:
            known = _error(e)
            if known is None:
                raise
            status, line = known
            print(f"nsfast: {line}", file=sys.stderr)
            _report(report, cmd, status, error=line)
            return status
        status = _exit_code(result.returncode)
        _report(report, cmd, status, result.returncode, result.usage)
        return status
    finally:
        if report is not None and report is not sys.stderr:
            report.close()


def _run_detached(args: argparse.Namespace, cmd: List[str], spec: Spec) -> int:
    import time
    import uuid

    from . import _state
    from ._container import Container
    from ._process import Process

    name = args.name if args.name is not None else "c-" + uuid.uuid4().hex[:12]
    limit = _log_max(args.log_max_size)
    try:
        log = _state.create(name)  # reserves the name: its directory is made here, or exists
    except FileExistsError:
        print(f"nsfast: a container named {name!r} exists already (nsfast stop {name} removes it)", file=sys.stderr)
        return 125
    try:
        out = _start_log_relay(name, log, limit)
    except BaseException:
        log.close()
        _state.remove(name)
        raise
    log.close()
    st = proc = None
    spec = spec.replace(die_with_parent=False)

    def save(p: Process) -> None:
        """The state, saved before the command may run (its gate still closed): a CLI killed
        at any point after this leaves a container `nsfast ps`/`stop` know (one killed before
        leaves none: nsfast-init exits when the gate's other end closes unopened). What
        proves, later, that a pid and cgroups are this container's, read while the pidfd
        still pins the process. Not the time namespace: its /proc link changes at exec."""
        nonlocal st
        started = _state.start_time(p.pid)
        ns_inodes = {t: _state.ns_inode(p.pid, t) for t in spec.namespaces if t != "time"}
        paths = list(p._sandbox.cgroup_paths())
        st = _state.State(
            name=name,
            pid=p.pid,
            start_time=started or -1,
            command=list(cmd),
            created=time.time(),
            env=dict(spec._env_items),
            cwd=os.fspath(spec.cwd),
            cgroup_paths=paths,
            namespaces=list(spec.namespaces),
            cgroup_inodes=[_state.dir_inode(p) or 0 for p in paths],
            ns_inodes={t: i for t, i in ns_inodes.items() if i is not None},
            uid=spec.uid,
            gid=spec.gid,
            capabilities=list(spec.capabilities),
            seccomp="off" if spec.seccomp is None else "default",
            seccomp_allow=[] if spec.seccomp is None else list(spec.seccomp.allow),
            seccomp_deny=[] if spec.seccomp is None else list(spec.seccomp.deny),
            nproc=spec._nproc,
        )
        st.save()

    try:
        with out:
            c = Container(cmd, spec=spec, name=name)
            proc = c.start(
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, _before_go=save, _give=(out.fileno(),)
            ).process
        assert proc is not None and st is not None
        proc.detach()  # (its cgroups are those saved)
    except BaseException:
        if st is not None:
            try:
                _kill_state(st, 0.0)
            except _Refused:
                pass
        elif proc is not None and proc.pidfd is not None:  # not detached yet
            proc.kill()
            proc.wait()
        _state.remove(name)
        raise
    print(name)
    return 0


#: What `nsfast run -d` keeps of a container's output by default: this much in `log`, the
#: part before in `log.1`.
DEFAULT_LOG_MAX = 16 << 20


def _log_max(value: Optional[str]) -> int:
    """--log-max-size in bytes (0: no bound)."""
    if value is None:
        return DEFAULT_LOG_MAX
    if value.strip().lower() == "none":
        return 0
    from ._spec import parse_size

    try:
        n = parse_size("--log-max-size", value)
    except SpecError as e:
        raise _UserError(f"--log-max-size: {e.message}") from None
    assert n is not None
    return n


def _start_log_relay(name: str, log: IO[bytes], limit: int) -> IO[bytes]:
    """Start the container's log relay (`_logrelay.py`, a process of the caller's, in a
    session of its own, outliving this CLI) on a new pipe, and return the pipe's write end:
    the container's stdout and stderr. The container never holds the log file itself."""
    from . import _state

    here = os.path.dirname(os.path.abspath(__file__))
    r, w = os.pipe2(os.O_CLOEXEC)
    fds = [r]
    try:
        with _state._container_dir(name) as d:
            if d is None:
                raise _UserError(f"the state of container {name!r} vanished as it was made")
            # Held by the relay while it runs (its copy of this open directory): `nsfast stop`
            # waits for it to have written the last of the log before removing the directory.
            import fcntl

            fcntl.flock(d, fcntl.LOCK_SH)
            # Numbers above the three the relay's stdio take, to dup2 onto (which clears
            # close-on-exec in the relay only).
            fds = [_dup_high(fd) for fd in (r, d, log.fileno())] + [r]
            argv = [sys.executable, "-I", "-S", os.path.join(here, "_logrelay.py"), "10", "11", "12", str(limit)]
            actions: List[Tuple[Any, ...]] = [(os.POSIX_SPAWN_OPEN, i, os.devnull, os.O_RDWR, 0) for i in (0, 1, 2)]
            actions += [(os.POSIX_SPAWN_DUP2, fd, 10 + i) for i, fd in enumerate(fds[:3])]
            os.posix_spawn(sys.executable, argv, {}, file_actions=actions, setsid=True)
    except BaseException:
        os.close(w)
        raise
    finally:
        for fd in dict.fromkeys(fds):
            os.close(fd)
    return os.fdopen(w, "wb")


def _dup_high(fd: int) -> int:
    """A close-on-exec copy of `fd` numbered 13 or more (out of the way of 10..12)."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 13)


def _logs(args: argparse.Namespace) -> int:
    from . import _state

    try:
        parts = _state.read_logs(args.name)
    except LookupError as e:
        print(f"nsfast: {e}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    try:
        for part in parts:
            sys.stdout.buffer.write(part)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # A reader that stopped (`| head`): as cat, quietly; nothing more to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _resolve(target: str) -> tuple[int, Optional[object]]:
    """(pid, state or None) of a container name or a pid."""
    from . import _state

    st = _state.load(target)
    if st is not None:
        return st.pid, st
    if target.isdigit() and 0 < int(target) < 1 << 31:
        return int(target), None
    raise LookupError(f"no container named {target!r} (and not a pid)")


def _exec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:

    cmd = _cmd(args, parser)
    try:
        pid, st = _resolve(args.target)
    except LookupError as e:
        print(f"nsfast: {e}", file=sys.stderr)
        return 125
    # A pidfd first: if the pid is still this process after the check, enter joins it and
    # not a process that reused the pid in between (enter fails if it exited).
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone, or not a valid pid (the state check says which)
        pidfd = -1
    try:
        return _exec_pinned(args, cmd, pid, st, pidfd)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _exec_pinned(args: argparse.Namespace, cmd: List[str], pid: int, st: Any, pidfd: int) -> int:
    from ._container import enter
    from ._spec import default_env

    status, reason, _ = st.check() if st is not None else ("running", "", [])
    if status == "invalid":
        print(f"nsfast: container {args.target} has an invalid state, not entering it: {reason}", file=sys.stderr)
        return 1
    if status != "running":
        why = "has exited" if status == "exited" else f"is stale: its process {pid} is gone"
        print(f"nsfast: container {args.target} {why} (nsfast stop {args.target} cleans up)", file=sys.stderr)
        return 125
    if pidfd < 0:
        print(f"nsfast: no process {pid}", file=sys.stderr)
        return 125
    env = dict(st.env) if st is not None else default_env()
    env.update(dict(args.setenv))
    cwd = args.chdir if args.chdir else (st.cwd if st is not None else None)
    report = _open_report(args)
    try:
        timeout = _timeout(args)
        # As its main process: ids, capabilities, seccomp filter, process limit (a process
        # with more would be the container's to take over: it may ptrace what runs as it).
        kw: Dict[str, Any] = {}
        if st is not None:
            from ._spec import Seccomp

            seccomp = (
                None if st.seccomp == "off" else Seccomp(allow=tuple(st.seccomp_allow), deny=tuple(st.seccomp_deny))
            )
            kw = dict(uid=st.uid, gid=st.gid, capabilities=tuple(st.capabilities), seccomp=seccomp, _nproc=st.nproc)
        result = enter(pid, cmd, env=env, cwd=cwd, cgroup=st is not None, pidfd=pidfd, timeout=timeout, **kw)
        status = _exit_code(result.returncode)
        _report(report, cmd, status, result.returncode, result.usage)
        return status
    except subprocess.TimeoutExpired as e:
        print(f"nsfast: timed out after {timeout:g} s: what the exec started was killed", file=sys.stderr)
        _report(report, cmd, EXIT_TIMEOUT, usage=getattr(e, "usage", None), timed_out=True)
        return EXIT_TIMEOUT
    except ProcessLookupError:
        print(f"nsfast: no process {pid}", file=sys.stderr)
        return 125
    except OSError as e:
        if isinstance(e, SpawnError):
            raise
        why = (e.strerror or str(e)).split(" (os error")[0]
        print(
            f"nsfast: cannot enter process {pid}: {why}" + (f" ({e.filename})" if e.filename else ""), file=sys.stderr
        )
        return 125
    finally:
        if report is not None and report is not sys.stderr:
            report.close()


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{int(seconds // n)}{unit}"
    return f"{int(seconds)}s"


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _ps() -> int:
    from . import _state

    rows = [["NAME", "PID", "AGE", "STATUS", "COMMAND"]]
    problems = []
    for st in _state.load_all():
        verdict = st.check()
        if verdict.status == "invalid":
            problems.append(f"nsfast: {st.name}: invalid state: {verdict.reason}")
            rows.append([st.name, "-", "-", "invalid", "-"])
        else:
            rows.append([st.name, str(st.pid), _age(st.age()), verdict.status, " ".join(st.command)])
    print(_table(rows))
    for p in problems:
        print(p, file=sys.stderr)
    return 0


def _kill_cgroups(paths: List[str]) -> None:
    """Kill every process in, then remove, cgroups proven to be a container's (State.check):
    the core's cleanup policy (cgroup.rs), as for a sandbox this process started."""
    from . import _core

    try:
        _core.kill_cgroups(paths)
    except OSError as e:
        print(f"nsfast: could not remove the cgroups {', '.join(paths)}: {e}", file=sys.stderr)


def _wait_gone(pidfd: int, timeout: float) -> bool:
    import select

    return bool(select.select([pidfd], [], [], timeout)[0])


class _Refused(Exception):
    """A state that does not prove what it names: nothing is done to it."""


def _kill_state(st: object, grace: float) -> str:
    """Stop the container of state `st`; returns what happened. _Refused if it is invalid."""
    import signal

    pid = st.pid  # type: ignore[attr-defined]
    pidfd = None
    if pid > 0:
        try:
            pidfd = os.pidfd_open(pid)  # pinned first, so the process checked is the one signalled
        except OSError:
            pass
    try:
        status, reason, cgroups = st.check()  # type: ignore[attr-defined]
        if status == "invalid":
            raise _Refused(reason)
        outcome = {
            "exited": "had exited; cleaned up",
            "stale": "stale state removed (its process was gone)",
            "running": "killed",
        }[status]  # without a pidfd, by its cgroups
        if status == "running" and pidfd is not None:
            outcome = "stopped"
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not _wait_gone(pidfd, grace):
                outcome = "killed"
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                _wait_gone(pidfd, 5)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    _kill_cgroups(cgroups)
    st.remove()  # type: ignore[attr-defined]
    return outcome


def _stop(args: argparse.Namespace) -> int:
    from . import _state

    if not math.isfinite(args.time) or args.time < 0 or args.time > 1e9:
        # (Checked before any container is signalled: not half a stop.)
        print(f"nsfast: stop -t: must be a number of seconds >= 0, got {args.time!r}", file=sys.stderr)
        return 2
    rc = 0
    for name in args.names:
        st = _state.load(name)
        if st is None:
            if _state.remove(name):
                print(f"{name}: removed a state directory without state (its start did not finish)")
            else:
                print(f"nsfast: no container named {name!r}", file=sys.stderr)
                rc = 1
            continue
        try:
            print(f"{name}: {_kill_state(st, args.time)}")
        except _Refused as e:
            print(
                f"nsfast: container {name} has an invalid state, not stopping it: {e} "
                f"(inspect and remove {st.dir} by hand)",
                file=sys.stderr,
            )
            rc = 1
    return rc


def _ns(args: argparse.Namespace) -> int:
    from ._ns import namespaces

    cols = []
    for t in args.targets:
        try:
            pid, st = _resolve(t)
            verdict = st.check() if st is not None else None  # type: ignore[attr-defined]
            if verdict is not None and verdict.status == "invalid":
                print(f"nsfast: container {t} has an invalid state: {verdict.reason}", file=sys.stderr)
                return 1
            cols.append((t if str(pid) == t else f"{t} ({pid})", namespaces(pid)))
        except (LookupError, FileNotFoundError, ValueError):  # ValueError: pid 0
            print(f"nsfast: no such process or container: {t}", file=sys.stderr)
            return 1
        except PermissionError as e:
            why = (e.strerror or "permission denied").split(" (os error")[0]
            print(f"nsfast: cannot read the namespaces of {t}: {why} ({e.filename})", file=sys.stderr)
            return 1
    types = sorted({k for _, m in cols for k in m})
    rows = [["TYPE"] + [c for c, _ in cols] + ([""] if len(cols) > 1 else [])]
    for t in types:
        vals = [str(m.get(t, "-")) for _, m in cols]
        mark = ["differs" if len(set(vals)) > 1 else "same"] if len(cols) > 1 else []
        rows.append([t] + vals + mark)
    print(_table(rows))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # The subcommand's usage, not the top-level one, for `nsfast run --bogus`.
        sub = getattr(args, "subparser", parser)
        for a in extra:
            kind, _, ns = a.lstrip("-").partition("-")
            if a.startswith("--") and kind in ("unshare", "share") and ns not in NAMESPACES:
                sub.error(f"unknown namespace type {ns!r} in {a} (the types are: {' '.join(NAMESPACES)})")
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "run":
            return _run(args, parser)
        if args.command == "exec":
            return _exec(args, parser)
        if args.command == "logs":
            return _logs(args)
        if args.command == "ps":
            return _ps()
        if args.command == "stop":
            return _stop(args)
        if args.command == "ns":
            return _ns(args)
        if args.command == "demo":
            from ._demo import demo

            return demo()
    except KeyboardInterrupt:
        return 130  # the sandbox has been killed on the way out (run() does so on any exception)
    except Exception as e:
        known = _error(e)
        if known is None:
            raise
        print(f"nsfast: {known[1]}", file=sys.stderr)
        return known[0]
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
