"""The `nsfast` command line. It only builds a `Spec` (flag names from bwrap and unshare)
and calls the library.

    nsfast run [-d --name NAME] [--hostname H] [--rootfs DIR] [--bind SRC DEST]
               [--ro-bind SRC DEST] [--tmpfs DEST] [--unshare-all | --unshare-NS...]
               [--share-net] -- CMD...
    nsfast exec NAME|PID -- CMD...      run CMD inside a container (or any process)
    nsfast ps                           list detached containers
    nsfast stop NAME                    stop a detached container and clean up
    nsfast ns PID|NAME [PID|NAME...]    namespace inodes per type, differences marked
    nsfast demo
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional, Sequence, Union

from ._errors import NsfastError, SpawnError
from ._spec import DEFAULT_NAMESPACES, NAMESPACES, Bind, Spec, Tmpfs

__all__ = ["main", "build_parser", "spec_from_args"]


class _MountAction(argparse.Action):
    """Collect --bind/--ro-bind/--tmpfs in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        items = list(getattr(namespace, "mounts", None) or [])
        items.append((option_string, values))
        namespace.mounts = items


def _add_spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hostname", help="hostname inside (needs the uts namespace)")
    p.add_argument("--rootfs", metavar="DIR", help="use DIR as / (default: the host root, read-only)")
    p.add_argument("--writable-root", action="store_true", help="do not make the root read-only")
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
    p.add_argument("--unshare-all", action="store_true", help="new namespaces of every type but time")
    for ns in NAMESPACES:
        p.add_argument(f"--unshare-{ns}", action="append_const", const=ns, dest="unshare", help=f"new {ns} namespace")
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="nsfast", description="Fast, safe Linux sandboxes.")
    parser.add_argument("--version", action="version", version=f"nsfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a command in a new sandbox", usage="nsfast run [options] -- CMD [ARGS...]")
    _add_spec_flags(run)
    run.add_argument("-d", "--detach", action="store_true", help="start a detached container and print its name")
    run.add_argument("--name", help="name of the detached container (default: generated)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    ex = sub.add_parser(
        "exec",
        help="run a command inside a container or process",
        usage="nsfast exec [options] NAME|PID -- CMD [ARGS...]",
    )
    ex.add_argument("target", metavar="NAME|PID")
    ex.add_argument("--chdir", metavar="DIR", help="working directory (default: the container's)")
    ex.add_argument("--setenv", nargs=2, metavar=("VAR", "VALUE"), action="append", default=[])
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("ps", help="list detached containers")
    st = sub.add_parser("stop", help="stop a detached container (SIGTERM, then kill) and clean up")
    st.add_argument("names", nargs="+", metavar="NAME")
    st.add_argument("-t", "--time", type=float, default=10.0, help="seconds to wait after SIGTERM (default 10)")
    ns = sub.add_parser("ns", help="namespace inodes of processes, differences marked")
    ns.add_argument("targets", nargs="+", metavar="PID|NAME")
    sub.add_parser("demo", help="show what a sandbox isolates and how fast it starts")
    for p in sub.choices.values():
        p.set_defaults(subparser=p)  # errors print the subcommand's usage
    return parser


def spec_from_args(args: argparse.Namespace) -> Spec:
    """The Spec the flags describe."""
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
        rootfs=args.rootfs,
        readonly_root=not args.writable_root,
        mounts=tuple(mounts),
        hostname=args.hostname,
        env=env,
        cwd=args.chdir,
        uid=args.uid,
        gid=args.gid,
        capabilities=tuple(args.cap_add),
        init=True if args.init else None,  # None: nsfast-init exactly with a pid namespace
        # Its own session, so no controlling terminal: with ours, TIOCSTI could type
        # commands into the caller's shell (CVE-2017-5226). stdio still works.
        new_session=True,
    )


def _cmd(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[str]:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        args.subparser.error(f"missing command: nsfast {args.command} [options] -- CMD [ARGS...]")
    return cmd


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._process import run

    cmd = _cmd(args, parser)
    spec = spec_from_args(args)
    if args.detach:
        return _run_detached(args, cmd, spec)
    if args.name:
        args.subparser.error("--name needs -d")
    return _exit_code(run(cmd, spec=spec).returncode)


def _run_detached(args: argparse.Namespace, cmd: List[str], spec: Spec) -> int:
    import time
    import uuid

    from . import _state
    from ._container import Container

    name = args.name if args.name is not None else "c-" + uuid.uuid4().hex[:12]
    try:
        log = _state.create(name)  # reserves the name: its directory is made here, or exists
    except FileExistsError:
        print(f"nsfast: a container named {name!r} exists already (nsfast stop {name} removes it)", file=sys.stderr)
        return 125
    st = proc = None
    try:
        spec = spec.replace(die_with_parent=False)
        with log:
            proc = Container(cmd, spec=spec, name=name).start(stdin=subprocess.DEVNULL, stdout=log, stderr=log).process
        assert proc is not None
        # What proves, later, that a pid and cgroups are this container's, read while the
        # pidfd still pins the process. Not the time namespace: its /proc link changes at exec.
        started = _state.start_time(proc.pid)
        ns_inodes = {t: _state.ns_inode(proc.pid, t) for t in spec.namespaces if t != "time"}
        paths = proc.detach()
        st = _state.State(
            name=name,
            pid=proc.pid,
            start_time=started or -1,
            command=list(cmd),
            created=time.time(),
            env=dict(spec._env_items),
            cwd=os.fspath(spec.cwd),
            cgroup_paths=paths,
            namespaces=list(spec.namespaces),
            cgroup_inodes=[_state.dir_inode(p) or 0 for p in paths],
            ns_inodes={t: i for t, i in ns_inodes.items() if i is not None},
        )
        st.save()
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


def _resolve(target: str) -> tuple[int, Optional[object]]:
    """(pid, state or None) of a container name or a pid."""
    from . import _state

    st = _state.load(target)
    if st is not None:
        return st.pid, st
    if target.isdigit():
        return int(target), None
    raise LookupError(f"no container named {target!r} (and not a pid)")


def _exec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._container import enter
    from ._spec import default_env

    cmd = _cmd(args, parser)
    try:
        pid, st = _resolve(args.target)
    except LookupError as e:
        print(f"nsfast: {e}", file=sys.stderr)
        return 125
    status, reason, _ = st.check() if st is not None else ("running", "", [])  # type: ignore[attr-defined]
    if status == "invalid":
        print(f"nsfast: container {args.target} has an invalid state, not entering it: {reason}", file=sys.stderr)
        return 1
    if status != "running":
        why = "has exited" if status == "exited" else f"is stale: its process {pid} is gone"
        print(f"nsfast: container {args.target} {why} (nsfast stop {args.target} cleans up)", file=sys.stderr)
        return 125
    env = dict(st.env) if st is not None else default_env()  # type: ignore[attr-defined]
    env.update(dict(args.setenv))
    cwd = args.chdir if args.chdir else (st.cwd if st is not None else None)  # type: ignore[attr-defined]
    try:
        result = enter(pid, cmd, env=env, cwd=cwd, cgroup=st is not None)
    except ProcessLookupError:
        print(f"nsfast: no process {pid}", file=sys.stderr)
        return 125
    return _exit_code(result.returncode)


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


def _write_cgroup_file(path: str, value: str) -> None:
    """Write an existing cgroup file: never created, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _kill_cgroups(paths: List[str]) -> None:
    """Kill every process in, then remove, cgroups proven to be a container's (State.check)."""
    import signal
    import time

    for p in paths:
        for f, value in (("cgroup.kill", "1"), ("freezer.state", "FROZEN")):
            try:
                _write_cgroup_file(os.path.join(p, f), value)
            except OSError:
                pass
        try:
            fd = os.open(os.path.join(p, "cgroup.procs"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd) as fh:
                for line in fh:
                    try:
                        os.kill(int(line), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
            _write_cgroup_file(os.path.join(p, "freezer.state"), "THAWED")
        except OSError:
            pass
    deadline = time.monotonic() + 5
    for p in paths:
        while os.path.isdir(p):
            try:
                os.rmdir(p)
            except OSError:
                if time.monotonic() > deadline:
                    print(f"nsfast: could not remove cgroup {p}", file=sys.stderr)
                    break
                time.sleep(0.01)


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
        except (LookupError, FileNotFoundError):
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
        getattr(args, "subparser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "run":
            return _run(args, parser)
        if args.command == "exec":
            return _exec(args, parser)
        if args.command == "ps":
            return _ps()
        if args.command == "stop":
            return _stop(args)
        if args.command == "ns":
            return _ns(args)
        if args.command == "demo":
            from ._demo import demo

            return demo()
    except SpawnError as e:
        print(f"nsfast: {e}", file=sys.stderr)
        return 127 if e.step == "exec" else 125
    except (NsfastError, ValueError, TypeError) as e:
        print(f"nsfast: {e}", file=sys.stderr)
        return 125
    except KeyboardInterrupt:
        return 130  # the sandbox has been killed on the way out (run() does so on any exception)
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
