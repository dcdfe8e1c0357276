#!/usr/bin/env python3
"""`docker exec` latency: /bin/true inside an already running container, nsfast against
nsenter and crun exec, in the same run.

Reproduce (from the repository root, as root, after `make build`):

    .venv/bin/python benches/exec_latency.py                    # 200 samples per tool
    .venv/bin/python benches/exec_latency.py --quick            # 50 samples per tool
    .venv/bin/python benches/exec_latency.py --runs 500 --json out.json --markdown
    .venv/bin/python benches/exec_latency.py --gap-ms 50        # isolated execs, 50 ms apart
    .venv/bin/python benches/exec_latency.py --breakdown        # + rows for the pieces

One container, c = nsfast.Container() with the default isolation and command=None (nsfast's
idle init is its pid 1), is started once; every tool but crun runs `/bin/true` inside *it*
(or, for the floor, without a sandbox) and waits for it, stdio inherited. One sample:

    Container.exec           c.exec(["/bin/true"]): setns into all of c's namespaces, its
                             root, cwd and cgroup(s)                          -- the reference
    nsfast.enter             nsfast.enter(c.pid, ["/bin/true"]): the same namespaces, root
                             and cwd, but no cgroup (its default cgroup=False)
    nsfast.enter(cgroup=True)  the same plus c's cgroup(s): what Container.exec does, without
                             the Container object's bookkeeping
    nsenter -a               subprocess.run(["nsenter", "-t", str(c.pid), "-a", "/bin/true"])
                             (util-linux: enters every namespace, root and cwd, not the cgroup)
    crun exec                subprocess.run(["crun", "exec", ID, "/bin/true"]) -- see below
    subprocess.run           subprocess.run(["/bin/true"]): no sandbox, the floor

With --breakdown, three more rows show where the time goes:

    _core.spawn_join (no ns, no cgroup)   nsfast's exec machinery (the two clones, the
                             container's root and cwd) without any setns or cgroup join
    os.posix_spawn           os.waitpid(os.posix_spawn("/bin/true", ...)): a bare vfork+exec
    nsenter (no namespaces)  subprocess.run(["nsenter", "/bin/true"]): what nsenter's own
                             exec costs before it joins anything

Method (as in start_latency.py, whose machinery this script imports):
  * Every tool is warmed up, then the tools take turns in rounds of --batch (default 5)
    samples each, the order rotating every round; the garbage collector is off inside a
    batch; each sample is time.perf_counter_ns() around the one call. Quantiles are
    nearest-rank.
  * crun 1.8 refuses this host's hybrid cgroup layout, so (like start_latency.py's `crun run`)
    crun runs inside one long-lived worker, `unshare -m` with /sys/fs/cgroup/unified unmounted
    (private to that mount namespace), which this script feeds batch requests over a pipe.
    The worker starts one container with `crun run -d` -- the OCI bundle of `crun spec`
    (default namespaces, cgroupfs v1 manager), terminal false, a rootfs of the host's /usr
    bound read-only, process /bin/cat reading a pipe the worker holds (idle like `sleep
    infinity`, but it exits if the worker dies) -- then times `crun exec ID /bin/true`
    exactly as above and removes the container at the end (crun kill + delete).
  * "ns joined" and "cgroup" are measured, not assumed: a probe run of each tool lists
    /proc/self/ns, compared with the target's /proc/PID/ns (of the namespaces in which the
    target differs from this process, how many the probe was in), and compares its
    /proc/self/cgroup with that of pid 1 as seen inside (the container's main process;
    "-" where the probe is not in the target's pid namespace).
  * By default the samples run back to back. --gap-ms N sleeps N ms, untimed, before every
    sample of every tool (crun's too): isolated execs, like a `docker exec` now and then. On
    cgroup v1 the two differ a lot for the tools that join the container's cgroup(s)
    (Container.exec, nsfast.enter(cgroup=True), crun exec): a cgroup.procs write write-locks
    the kernel's cgroup_threadgroup_rwsem, which waits for an RCU grace period unless such a
    write happened within about a grace period before (see cgroup_cost.py). Back to back,
    mostly only the first sample of each batch pays it; that shows in p90.
  * "ok" means every sample's command exited 0. The ratio column is median / Container.exec's
    median. The two targets printed under the table are Container.exec <= 1.5x nsenter -a and
    crun exec >= 10x Container.exec, each with a 95% bootstrap interval of the ratio (the two
    tools' samples resampled independently, 2000 times).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fmt_ms, ratio_interval, verdict  # noqa: E402
from start_latency import (  # noqa: E402
    NS_ORDER,
    Batch,
    Collector,
    Crun,
    Skip,
    Tool,
    _first_line,
    _oci_bundle,
    environment,
    measure,
    ns_inodes,
    own_namespaces,
    quantile,
    rich_header,
    stale_note,
    timed_calls,
    worker_pipes,
)

TRUE = ["/bin/true"]
# Namespaces (one "TYPE ns:[INODE]" line each), then whether each of our cgroups is pid 1's or
# below it (Container.exec runs in a per-exec child of the container's cgroup: "/exec-N").
JOIN_PROBE = [
    "/bin/sh",
    "-c",
    'for n in /proc/self/ns/*; do echo "${n##*/} $(readlink "$n")"; done; '
    'if awk \'NR == FNR { a[FNR] = $0; next } { p = a[FNR]; sub("/$", "", p); '
    'if ($0 != a[FNR] && (index($0, "/..") || index($0, p "/") != 1)) bad = 1 } END { exit bad }\' '
    '/proc/1/cgroup /proc/self/cgroup; then echo "cgroup= same"; else echo "cgroup= different"; fi',
]
NSENTER_TRIES = (["-a"], ["-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w"])
TARGETS = {"nsenter": 1.5, "crun": 10.0}  # Container.exec <= 1.5x nsenter; crun exec >= 10x Container.exec
GAP_S = 0.0  # --gap-ms, before every sample of every tool (the crun worker gets it per request)


@dataclass
class Joined:
    """What a probe run showed: namespaces of the target it ran in, and its cgroup."""

    ns: str = "?"  # "6/6"
    ns_detail: str = ""  # which
    cgroup: str = "?"  # yes / no / -


def joined(probe_output: str, target: Dict[str, str], host: Dict[str, str]) -> Joined:
    seen = dict(line.split(" ", 1) for line in probe_output.splitlines() if " " in line)
    differ = [n for n in NS_ORDER if n in target and target[n] != host.get(n)]
    inside = [n for n in differ if seen.get(n) == target[n]]
    missed = [n for n in differ if n not in inside]
    detail = ",".join(inside) if inside else "none"
    if missed:
        detail += f" (not {','.join(missed)})"
    cg = "-" if "pid" not in inside else ("yes" if seen.get("cgroup=") == "same" else "no")
    return Joined(f"{len(inside)}/{len(differ)}", detail, cg)


# -- tools --------------------------------------------------------------------------------------


class CallTool(Tool):
    """A Python call per sample that returns an exit status; probed with JOIN_PROBE."""

    def __init__(
        self,
        key: str,
        name: str,
        command: str,
        call: Callable[[List[str]], int],
        probe: Callable[[], str],
        target_pid: Callable[[], int],
    ) -> None:
        self.key, self.name, self.command = key, name, command
        self._call, self._probe, self._target_pid = call, probe, target_pid
        self.joined = Joined()

    def start(self, host_ns: Dict[str, str]) -> None:
        try:
            rc = self._call(TRUE)
            out = self._probe()
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            raise Skip(f"{type(e).__name__}: {e}") from None
        if rc != 0:
            raise Skip(f"/bin/true exited {rc}")
        self.joined = joined(out, ns_inodes(self._target_pid()), host_ns)
        self.namespaces = self.joined.ns_detail

    def batch(self, n: int) -> Batch:
        call = self._call
        return timed_calls(lambda: call(TRUE), n, GAP_S)


def nsfast_tools(c: Any) -> List[CallTool]:
    import nsfast

    pid = c.pid

    def probe_exec() -> str:
        return str(c.exec(JOIN_PROBE, capture_output=True, text=True, timeout=30, check=True).stdout)

    def probe_enter(cgroup: bool) -> Callable[[], str]:
        return lambda: str(
            nsfast.enter(pid, JOIN_PROBE, cgroup=cgroup, capture_output=True, text=True, timeout=30, check=True).stdout
        )

    target = lambda: pid  # noqa: E731
    return [
        CallTool(
            "exec",
            "Container.exec",
            'c.exec(["/bin/true"])  # c = nsfast.Container(), started',
            lambda a: c.exec(a).returncode,
            probe_exec,
            target,
        ),
        CallTool(
            "enter",
            "nsfast.enter",
            'nsfast.enter(c.pid, ["/bin/true"])',
            lambda a: nsfast.enter(pid, a).returncode,
            probe_enter(False),
            target,
        ),
        CallTool(
            "enter-cg",
            "nsfast.enter(cgroup=True)",
            'nsfast.enter(c.pid, ["/bin/true"], cgroup=True)',
            lambda a: nsfast.enter(pid, a, cgroup=True).returncode,
            probe_enter(True),
            target,
        ),
    ]


def breakdown_tools(c: Any) -> List[Tool]:
    """--breakdown: where Container.exec's time goes, and nsenter's."""
    from nsfast import _core

    pid = c.pid

    def raw_join(argv: List[str]) -> int:
        p, fd = _core.spawn_join(
            [a.encode() for a in argv],
            target=pid,
            join=[],
            env=[b"PATH=/usr/bin:/bin"],
            cwd=None,
            uid=None,
            gid=None,
            keep_caps=0,
            die_with_parent=False,
            stdio=(-1, -1, -1),
            pass_fds=[],
            join_cgroup=False,
        )
        try:
            res = _core.wait(p, fd, None)
        finally:
            os.close(fd)
        return os.waitstatus_to_exitcode(res[0]) if res else -1

    def posix_spawn(argv: List[str]) -> int:
        return os.waitstatus_to_exitcode(os.waitpid(os.posix_spawn(argv[0], argv, {}), 0)[1])

    def run_out(argv: List[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout

    target = lambda: pid  # noqa: E731
    return [
        CallTool(
            "b-spawn-join",
            "_core.spawn_join (no ns, no cgroup)",
            "_core.spawn_join + _core.wait, join=[], join_cgroup=False: nsfast's two-clone exec path "
            "with no setns, the container's root and cwd only (private API)",
            raw_join,
            lambda: "",
            target,
        ),
        CallTool(
            "b-posix-spawn",
            "os.posix_spawn (no sandbox)",
            "os.waitpid(os.posix_spawn('/bin/true', ...))",
            posix_spawn,
            lambda: run_out(JOIN_PROBE),
            target,
        ),
        CallTool(
            "b-nsenter-none",
            "nsenter (no namespaces)",
            "subprocess.run(['nsenter', '/bin/true']): nsenter's own exec, no setns",
            lambda a: subprocess.run(["nsenter", *a]).returncode,
            lambda: run_out(["nsenter", *JOIN_PROBE]),
            target,
        ),
    ]


class Nsenter(CallTool):
    """nsenter -t PID -a, or the explicit flags if this nsenter has no -a."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.argv: List[str] = []
        super().__init__(
            "nsenter",
            "nsenter -a",
            "",
            lambda a: subprocess.run(self.argv + a).returncode,
            lambda: (
                subprocess.run(self.argv + JOIN_PROBE, capture_output=True, text=True, timeout=30, check=True).stdout
            ),
            lambda: pid,
        )

    def start(self, host_ns: Dict[str, str]) -> None:
        if shutil.which("nsenter") is None:
            raise Skip("nsenter is not installed")
        errors = []
        for flags in NSENTER_TRIES:
            self.argv = ["nsenter", "-t", str(self.pid), *flags]
            r = subprocess.run(self.argv + TRUE, capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                break
            errors.append(f"{shlex.join(self.argv + TRUE)} exited {r.returncode}: {r.stderr.strip()}")
        else:
            raise Skip("; ".join(errors))
        if errors:
            self.note = "fallback, because " + "; ".join(errors)
            self.name = "nsenter " + " ".join(self.argv[3:])
        shown = ", ".join(repr(a) for a in self.argv[3:] + TRUE)
        self.command = f"subprocess.run(['nsenter', '-t', str(c.pid), {shown}])"
        super().start(host_ns)


class Floor(CallTool):
    def __init__(self, pid: int) -> None:
        super().__init__(
            "subprocess",
            "subprocess.run (no sandbox)",
            "subprocess.run(['/bin/true'])",
            lambda a: subprocess.run(a).returncode,
            lambda: subprocess.run(JOIN_PROBE, capture_output=True, text=True, timeout=30).stdout,
            lambda: pid,
        )


class CrunExec(Crun):
    """`crun exec ID /bin/true` into a `crun run -d` container, timed inside one long-lived
    `unshare -m` worker (this script, --crun-exec-worker). The bundle's setup, the worker's
    start, batches and shutdown reuse start_latency.Crun's (and its pipe protocol)."""

    key, name = "crun", "crun exec"

    def __init__(self) -> None:
        super().__init__()
        self.joined = Joined()

    def start(self, host_ns: Dict[str, str]) -> None:
        spec, rootfs, tmp = self._prepare("nsfast-bench-crunexec-")
        bundle = _oci_bundle(spec, rootfs, ["/bin/cat"], tmp / "idle")
        self.command = (
            "subprocess.run(['crun', 'exec', ID, '/bin/true']) in `unshare -m` without "
            "/sys/fs/cgroup/unified; ID = `crun run -d` of an idle /bin/cat"
        )
        hello = self._start_worker(Path(__file__), ["--crun-exec-worker", str(bundle)])
        self.joined = joined(hello["probe"], hello["target_ns"], host_ns)
        self.namespaces = self.joined.ns_detail
        self.note = f"crun's container pid {hello['pid']}; cgroupfs v1 manager, crun exec joins its cgroups"

    def batch(self, n: int) -> Batch:
        return self._request(n, f"{n} {GAP_S}\n")


def crun_exec_worker(bundle: str) -> None:
    """--crun-exec-worker: start the container, probe, then for each line "N" on stdin time N
    `crun exec`s and reply with one JSON line; on EOF kill and delete the container. crun
    and the container get /dev/null or a file as stdio, never the protocol pipes."""
    requests, reply, devnull = worker_pipes(os.O_RDWR)
    cid = f"nsfast-bench-exec-{os.getpid()}"
    keep_r, keep_w = os.pipe2(os.O_CLOEXEC)  # the container's stdin: EOF when we are gone

    with tempfile.TemporaryFile() as err:
        try:
            r = subprocess.run(
                ["crun", "run", "-d", "--bundle", bundle, cid],
                stdin=keep_r,
                stdout=devnull,
                stderr=err,
                timeout=60,
                pass_fds=(),
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            reply({"error": f"crun run -d failed: {e}"})
            return
        os.close(keep_r)
        err.seek(0)
        if r.returncode != 0:
            reply({"error": f"crun run -d exited {r.returncode}: {err.read().decode(errors='replace').strip()}"})
            return
    try:
        state = json.loads(subprocess.run(["crun", "state", cid], capture_output=True, text=True, check=True).stdout)
        pid = int(state["pid"])
        target_ns = ns_inodes(pid)
        probe = subprocess.run(["crun", "exec", cid, *JOIN_PROBE], capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            reply({"error": f"crun exec exited {probe.returncode}: {probe.stderr.strip()}"})
            return
        reply({"ready": True, "probe": probe.stdout, "target_ns": target_ns, "pid": pid})
        argv = ["crun", "exec", cid, *TRUE]
        for line in requests:
            n, gap = line.split()
            result = timed_calls(lambda: subprocess.run(argv).returncode, int(n), float(gap))
            reply({"samples_ns": [round(s * 1e9) for s in result.samples_s], "failures": result.failures})
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        reply({"error": f"crun container {cid}: {type(e).__name__}: {e}"})
    finally:
        os.close(keep_w)
        subprocess.run(["crun", "kill", cid, "KILL"], stderr=subprocess.DEVNULL)
        for _ in range(100):  # until stopped, then delete (-f would kill again)
            st = subprocess.run(["crun", "state", cid], capture_output=True, text=True)
            if st.returncode != 0 or '"stopped"' in st.stdout:
                break
            time.sleep(0.01)
        subprocess.run(["crun", "delete", "-f", cid], stderr=subprocess.DEVNULL)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    tool: str
    command: str
    ns_joined: str = ""  # "6/6"
    ns_detail: str = ""
    cgroup: str = ""
    n: int = 0
    failures: int = 0
    median_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    vs_exec: Optional[float] = None  # median / Container.exec's median
    note: str = ""
    skipped: str = ""
    samples_ms: List[float] = field(default_factory=list)


def rows_of(collectors: List[Collector], skipped: List[Row]) -> List[Row]:
    rows = []
    for col in collectors:
        t = col.tool
        j: Joined = getattr(t, "joined", Joined())
        s = sorted(col.samples)
        rows.append(
            Row(
                t.key,
                t.name,
                t.command,
                j.ns,
                j.ns_detail,
                j.cgroup,
                col.n,
                col.failures,
                quantile(s, 0.5) * 1e3 if s else None,
                quantile(s, 0.9) * 1e3 if s else None,
                note=t.note,
                samples_ms=[round(x * 1e3, 4) for x in col.samples],
            )
        )
    ref = next((r.median_ms for r in rows if r.key == "exec"), None)
    for r in rows:
        if ref and r.median_ms is not None:
            r.vs_exec = r.median_ms / ref
    return rows + skipped


@dataclass
class Target:
    what: str
    ratio: Optional[float]
    low: Optional[float]
    high: Optional[float]
    goal: str
    ok: Optional[bool]


def targets(rows: List[Row]) -> List[Target]:
    by = {r.key: r for r in rows if r.samples_ms}
    out = []
    ex = by.get("exec")
    ns = by.get("nsenter")
    if ex and ns and ex.median_ms and ns.median_ms:
        lo, hi = ratio_interval(ex.samples_ms, ns.samples_ms)
        r = ex.median_ms / ns.median_ms
        out.append(
            Target("Container.exec / nsenter -a", r, lo, hi, f"<= {TARGETS['nsenter']}", r <= TARGETS["nsenter"])
        )
    else:
        out.append(Target("Container.exec / nsenter -a", None, None, None, f"<= {TARGETS['nsenter']}", None))
    cr = by.get("crun")
    if ex and cr and ex.median_ms and cr.median_ms:
        lo, hi = ratio_interval(cr.samples_ms, ex.samples_ms)
        r = cr.median_ms / ex.median_ms
        out.append(Target("crun exec / Container.exec", r, lo, hi, f">= {TARGETS['crun']}", r >= TARGETS["crun"]))
    else:
        out.append(Target("crun exec / Container.exec", None, None, None, f">= {TARGETS['crun']}", None))
    return out


def vs_text(r: Row) -> str:
    if r.key == "exec":
        return "(reference)"
    if r.vs_exec is None:
        return ""
    return f"{r.vs_exec:.2f}x"


def ok_text(r: Row) -> str:
    return "yes" if r.failures == 0 and r.n else f"NO ({r.failures}/{r.n} failed)"


def print_rich(rows: List[Row], tg: List[Target], env: Dict[str, Any], args: argparse.Namespace) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = rich_header(
        "exec latency: /bin/true inside a running container",
        env,
        f"{args.runs} samples per tool, batches of {args.batch}, warm-up {args.warmup}; "
        + (
            f"{args.gap_ms:g} ms pause before every sample (isolated execs)"
            if args.gap_ms
            else "back-to-back (no --gap-ms)"
        ),
    )
    table = Table(show_edge=False)
    for col, just in (
        ("tool", "left"),
        ("ns joined", "right"),
        ("cgroup", "left"),
        ("n", "right"),
        ("median ms", "right"),
        ("p90 ms", "right"),
        ("vs Container.exec", "right"),
        ("ok", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        if r.skipped:
            table.add_row(r.tool, "", "", "", "", "", "", "[yellow]skipped[/yellow]")
            continue
        table.add_row(
            r.tool,
            r.ns_joined,
            r.cgroup,
            str(r.n),
            fmt_ms(r.median_ms),
            fmt_ms(r.p90_ms),
            vs_text(r),
            "[green]yes[/green]" if ok_text(r) == "yes" else f"[red]{ok_text(r)}[/red]",
        )
    console.print(table)
    console.print("[bold]Targets[/bold] (ratio of medians, 95% bootstrap interval):")
    for t in tg:
        if t.ratio is None:
            console.print(f"  {t.what}: not measured (target {t.goal})", highlight=False)
            continue
        color = "green" if t.ok else "red"
        console.print(
            f"  {t.what} = {t.ratio:.2f}x [{t.low:.2f}, {t.high:.2f}], target {t.goal}: "
            f"[{color}]{verdict(t.ok)}[/{color}]",
            highlight=False,
        )
    console.print("[bold]Commands[/bold] (one sample each) and namespaces joined:")
    for r in rows:
        if r.command:
            console.print(f"  {r.tool}: {r.command}", highlight=False, markup=False)
            console.print(f"      joined: {r.ns_detail}; cgroup: {r.cgroup}", highlight=False, markup=False)
    for r in rows:
        if r.skipped:
            console.print(f"  [yellow]{escape(r.tool)} skipped:[/yellow] {escape(r.skipped)}", highlight=False)
        if r.note:
            console.print(f"  [dim]{escape(r.tool)}: {escape(r.note)}[/dim]", highlight=False)


def markdown(rows: List[Row], tg: List[Target], env: Dict[str, Any]) -> str:
    lines = [
        "| tool | ns joined | cgroup | median ms | p90 ms | vs Container.exec | ok |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.tool} | | | | | | skipped: {r.skipped.splitlines()[0][:80]} |")
            continue
        lines.append(
            f"| `{r.tool}` | {r.ns_joined} | {r.cgroup} | {fmt_ms(r.median_ms)} | {fmt_ms(r.p90_ms)} | "
            f"{vs_text(r)} | {ok_text(r)} |"
        )
    lines.append("")
    for t in tg:
        if t.ratio is not None:
            lines.append(
                f"- {t.what} = {t.ratio:.2f}x [{t.low:.2f}, {t.high:.2f}] (target {t.goal}): **{verdict(t.ok)}**"
            )
        else:
            lines.append(f"- {t.what}: not measured (target {t.goal})")
    lines.append("")
    lines.append(
        f"{env['date']}, {env['kernel'].split()[1]}, {env['cpu']}, {env['python']}; "
        f"n = {max((r.n for r in rows), default=0)} per tool; "
        f"{'gap ' + format(env['gap_ms'], 'g') + ' ms' if env.get('gap_ms') else 'back-to-back'}; "
        f"load {' '.join(env['loadavg_start'])}; `{env['command']}`"
    )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=200, help="samples per tool (default 200)")
    p.add_argument("--quick", action="store_true", help="50 samples per tool (overrides --runs)")
    p.add_argument("--batch", type=int, default=5, help="samples per tool per round (default 5)")
    p.add_argument("--warmup", type=int, default=10, help="unrecorded runs per tool first (default 10)")
    p.add_argument(
        "--skip", default="", help="comma list of tools to leave out: exec,enter,enter-cg,nsenter,crun,subprocess"
    )
    p.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="untimed sleep before every sample (default 0: back-to-back; 50: isolated execs)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the pieces: nsfast's exec path without setns, os.posix_spawn, nsenter without setns",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    p.add_argument("--crun-exec-worker", metavar="BUNDLE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.crun_exec_worker:
        crun_exec_worker(args.crun_exec_worker)
        return 0
    if args.quick:
        args.runs = 50
        args.warmup = min(args.warmup, 5)
    if args.runs < 1 or args.batch < 1 or args.warmup < 1 or args.gap_ms < 0:
        p.error("--runs, --batch and --warmup must be positive, --gap-ms not negative")
    global GAP_S
    GAP_S = args.gap_ms / 1e3

    import nsfast

    env = environment([sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv])
    env["tools"]["nsenter"] = _first_line(["nsenter", "--version"])
    env["gap_ms"] = args.gap_ms
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    host_ns = own_namespaces()
    container = nsfast.Container(stop_timeout=5)
    tools: List[Tool] = []
    skipped: List[Row] = []
    collectors: List[Collector] = []
    try:
        container.start()
        assert container.pid is not None
        env["container"] = {
            "pid": container.pid,
            "namespaces": sorted(n for n, v in ns_inodes(container.pid).items() if v != host_ns.get(n)),
            "cgroup": bool(container.process and container.process._cgroup),
        }
        candidates: List[Tool] = [*nsfast_tools(container), Nsenter(container.pid), CrunExec(), Floor(container.pid)]
        if args.breakdown:
            candidates += breakdown_tools(container)
        for t in candidates:
            if t.key in skip:
                continue
            try:
                t.start(host_ns)
                tools.append(t)
            except Skip as e:
                t.close()
                skipped.append(Row(t.key, t.name, "", skipped=str(e)))
        for t in tools:
            if t.key == "exec":
                t.note = stale_note(Path(nsfast._core.__file__), "make build")
        collectors = measure(tools, args.runs, args.batch, 1, args.warmup)
    finally:
        for t in tools:
            t.close()
        container.stop(5)
    env["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    rows = rows_of(collectors, skipped)
    tg = targets(rows)
    print_rich(rows, tg, env, args)
    if args.markdown:
        print()
        print(markdown(rows, tg, env))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "settings": {
                        k: v
                        for k, v in vars(args).items()
                        if k in ("runs", "batch", "warmup", "skip", "breakdown", "gap_ms")
                    },
                    "targets": [asdict(t) for t in tg],
                    "results": [asdict(r) for r in rows],
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(r.failures == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
