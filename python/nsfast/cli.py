"""The `nsfast` command line. It only builds a `Spec` (flag names from bwrap and unshare)
and calls the library.

    nsfast run [--hostname H] [--rootfs DIR] [--bind SRC DEST] [--ro-bind SRC DEST]
               [--tmpfs DEST] [--unshare-all | --unshare-NS...] [--share-net] -- CMD...
    nsfast demo
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from ._errors import NsfastError, SpawnError
from ._spec import NAMESPACES, Bind, Spec, Tmpfs

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
    p.add_argument("--bind", nargs=2, metavar=("SRC", "DEST"), action=_MountAction, dest="mounts",
                   help="bind SRC onto DEST, writable")
    p.add_argument("--ro-bind", nargs=2, metavar=("SRC", "DEST"), action=_MountAction, dest="mounts",
                   help="bind SRC onto DEST, read-only")
    p.add_argument("--tmpfs", metavar="DEST", action=_MountAction, dest="mounts", help="a fresh tmpfs on DEST")
    p.add_argument("--unshare-all", action="store_true", help="new namespaces of every type but time")
    for ns in NAMESPACES:
        p.add_argument(f"--unshare-{ns}", action="append_const", const=ns, dest="unshare",
                       help=f"new {ns} namespace")
    p.add_argument("--share-net", action="store_true", help="keep the host's network namespace")
    p.add_argument("--chdir", metavar="DIR", default="/", help="working directory inside (default /)")
    p.add_argument("--setenv", nargs=2, metavar=("VAR", "VALUE"), action="append", default=[],
                   help="set an environment variable")
    p.add_argument("--uid", type=int, help="uid inside")
    p.add_argument("--gid", type=int, help="gid inside")
    p.add_argument("--cap-add", metavar="CAP", action="append", default=[], help="keep capability CAP")
    p.add_argument("--init", action="store_true", help="run a tiny init as pid 1 (forwards signals, reaps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsfast", description="Fast, safe Linux sandboxes.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a command in a new sandbox",
                         usage="nsfast run [options] -- CMD [ARGS...]")
    _add_spec_flags(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    sub.add_parser("demo", help="show what a sandbox isolates and how fast it starts")
    return parser


def spec_from_args(args: argparse.Namespace) -> Spec:
    """The Spec the flags describe."""
    if args.unshare_all or not args.unshare:
        namespaces = [n for n in NAMESPACES if n != "time" and (n != "user" or os.geteuid() != 0)]
        if not args.unshare_all:
            namespaces = [n for n in namespaces if n in ("pid", "uts", "ipc", "net", "mnt", "cgroup")]
    else:
        namespaces = list(args.unshare)
    if args.share_net:
        namespaces = [n for n in namespaces if n != "net"]
    mounts = []
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
    return Spec(namespaces=tuple(namespaces), rootfs=args.rootfs, readonly_root=not args.writable_root,
                mounts=tuple(mounts), hostname=args.hostname, env=env, cwd=args.chdir, uid=args.uid,
                gid=args.gid, capabilities=tuple(args.cap_add), init=args.init, new_session=False)


def _cmd(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[str]:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        parser.error("missing command: nsfast run [options] -- CMD [ARGS...]")
    return cmd


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._process import run

    cmd = _cmd(args, parser)
    spec = spec_from_args(args)
    result = run(cmd, spec=spec)
    rc = result.returncode
    return 128 - rc if rc < 0 else rc


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args, parser)
        if args.command == "demo":
            from ._demo import demo

            return demo()
    except SpawnError as e:
        print(f"nsfast: {e}", file=sys.stderr)
        return 127 if e.step == "exec" else 125
    except (NsfastError, ValueError, TypeError) as e:
        print(f"nsfast: {e}", file=sys.stderr)
        return 125
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
