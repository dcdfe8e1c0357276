"""Throughput of sandboxes: tasks per second and per-task latency (p50/p99) for `nsfast.run`
from 1, 2 and 4 threads (and from 1 and 2 with `configure(netns_pool=4)`), `nsfast.arun` at concurrency 1, 4, 16 and 64, `nsfast.Zygote`'s
Python tasks (`run_python("pass")` and a small real snippet, from 1, 2 and 4 threads, and
`arun_python` at 16), Python started afresh (`nsfast.run` and `subprocess.run` of
`python3 -c`), bwrap, the kernel's share
(`nsfast.run` without a network namespace, without a cgroup), and peers in the same run:
`subprocess.run` (no sandbox) and sandlock (Landlock + seccomp, no namespaces, no cgroups:
`Sandbox().run` and its copy-on-write `fork`).

Each row runs `--tasks` tasks of `/bin/true` or Python's `pass` (sandlock's fork: clones
whose work is nothing)
after a warm-up; rows are interleaved in `--rounds` rounds so that machine drift hits all
alike, and the table shows the median over rounds. Run: `.venv/bin/python benches/throughput.py
[--json PATH]` after `make build`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

from rich.console import Console
from rich.table import Table

TRUE = ["/bin/true"]
PY_PASS = ["/usr/bin/python3", "-c", "pass"]
#: "A small real snippet": parse, compute, print.
SNIPPET = "import json,sys; d=json.loads('[1,2,3]'); print(sum(x*x for x in d)); sys.stdout.flush()"
_ZYGOTES: Dict[str, Any] = {}
_ZYGOTE_LOCK = threading.Lock()
#: The zygote rows' variants: the default, and the kernel's share taken out step by step.
_ZYGOTE_KINDS: Dict[str, Dict[str, Any]] = {
    "": {},
    "network='none'": {"network": "none"},
    "network='none', cgroup=False": {"network": "none", "cgroup": False},
    # The snippet's imports, preloaded as a user of it would.
    "preload=('json',)": {"preload": ("json",)},
}


#: Busy CPU time of the whole machine (every process and kernel thread) during the last
#: row's timed part, in seconds: what a task costs in all, not only in the caller.
_LAST_CPU: List[float] = [0.0]


def _busy_s() -> float:
    """Seconds the machine's CPUs were busy since boot (/proc/stat: user, nice, system, irq,
    softirq; not idle, iowait or steal, the time the hypervisor ran something else)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def _begin() -> Tuple[float, float]:
    return time.perf_counter(), _busy_s()


def _end(t: Tuple[float, float]) -> float:
    """The wall time since `_begin`; the machine's busy CPU time meanwhile goes to _LAST_CPU."""
    wall = time.perf_counter() - t[0]
    _LAST_CPU[0] = _busy_s() - t[1]
    return wall


def zygote(kind: str = "") -> Any:
    """One zygote per variant for every row (started in the warm-up, outside the timed part)."""
    with _ZYGOTE_LOCK:
        if kind not in _ZYGOTES:
            import nsfast

            _ZYGOTES[kind] = nsfast.Zygote(**_ZYGOTE_KINDS[kind])
        return _ZYGOTES[kind]


def fork_floor(threads: int, tasks: int) -> List[float]:
    """The floor under any fork-based task: os.fork() of a bare `python3 -I -S` with the
    zygote's imports (json, traceback), the child exiting at once, reaped by its parent; no
    namespace, no cgroup, no pipe. Run in that interpreter, `threads` forking processes."""
    code = (
        "import os,sys,time,json,traceback\n"
        "n=int(sys.argv[1]);lat=[]\n"
        "for _ in range(n):\n"
        " t=time.perf_counter();p=os.fork()\n"
        " if p==0: os._exit(0)\n"
        " os.waitpid(p,0);lat.append(time.perf_counter()-t)\n"
        "print(json.dumps(lat))"
    )
    per = max(1, tasks // threads)
    start = _begin()
    procs = [
        subprocess.Popen([PY_PASS[0], "-I", "-S", "-c", code, str(per)], stdout=subprocess.PIPE) for _ in range(threads)
    ]
    lat: List[float] = []
    for p in procs:
        out, _ = p.communicate()
        lat += json.loads(out)
    return lat + [_end(start)]


def zygote_async(concurrency: int, tasks: int) -> List[float]:
    z = zygote()

    async def main() -> List[float]:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> float:
            async with sem:
                t = time.perf_counter()
                await z.arun_python("pass")
                return time.perf_counter() - t

        await asyncio.gather(*(one() for _ in range(min(tasks, 10))))
        start = _begin()
        lat = list(await asyncio.gather(*(one() for _ in range(tasks))))
        return lat + [_end(start)]

    return asyncio.run(main())


class Skip(Exception):
    """The row cannot run here (the message says why)."""


def threaded(call: Callable[[], Any], threads: int, tasks: int) -> List[float]:
    """Per-task latencies (s) of `tasks` calls spread over `threads` threads; also returns the
    wall time as the last element."""

    def timed(_: int) -> float:
        t = time.perf_counter()
        call()
        return time.perf_counter() - t

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(timed, range(min(tasks, 10))))  # warm-up (threads, caches)
        start = _begin()
        lat = list(ex.map(timed, range(tasks)))
        return lat + [_end(start)]


def concurrent_async(concurrency: int, tasks: int, **kw: Any) -> List[float]:
    import nsfast

    async def main() -> List[float]:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> float:
            async with sem:
                t = time.perf_counter()
                await nsfast.arun(TRUE, **kw)
                return time.perf_counter() - t

        await asyncio.gather(*(one() for _ in range(min(tasks, 10))))
        start = _begin()
        lat = await asyncio.gather(*(one() for _ in range(tasks)))
        return list(lat) + [_end(start)]

    return asyncio.run(main())


def sandlock_fork(tasks: int) -> List[float]:
    """sandlock's COW fork: `tasks` clones of a warmed interpreter; latency per clone is the
    batch's wall time over the clones (it reports no per-clone times)."""
    try:
        import sandlock
    except ImportError as e:
        raise Skip(f"sandlock is not installed ({e}): pip install sandlock") from None
    try:
        sb = sandlock.Sandbox(fs_readable=["/"], init_fn=lambda: None, work_fn=lambda i: None)
        sb.fork(2)
        start = _begin()
        sb.fork(tasks)
        wall = _end(start)
    except Exception as e:  # sandlock's own errors: Landlock or seccomp unavailable, ...
        raise Skip(f"sandlock fork failed: {type(e).__name__}: {e}") from None
    return [wall / tasks] * tasks + [wall]


def sandlock_run(threads: int, tasks: int) -> List[float]:
    try:
        import sandlock
    except ImportError as e:
        raise Skip(f"sandlock is not installed ({e}): pip install sandlock") from None
    sb = sandlock.Sandbox(fs_readable=["/"])
    try:
        r = sb.run(TRUE)
        ok = getattr(r, "exit_code", getattr(r, "returncode", 0))
    except Exception as e:
        raise Skip(f"sandlock run failed: {type(e).__name__}: {e}") from None
    if ok not in (0, None):
        raise Skip(f"sandlock run exited {ok}")
    # One Sandbox per task: a Sandbox runs one command at a time.
    return threaded(lambda: sandlock.Sandbox(fs_readable=["/"]).run(TRUE), threads, tasks)


def bwrap_rows(argv: List[str], tasks: int) -> List[float]:
    import shutil

    if shutil.which("bwrap") is None:
        raise Skip("bwrap is not installed (apt-get install bubblewrap)")
    if subprocess.run(argv).returncode != 0:
        raise Skip("bwrap failed here")
    return threaded(lambda: subprocess.run(argv), 2, tasks)


#: The issue's targets: (what, numerator row, denominator row or None, at least).
TARGETS = [
    ("zygote >= 2,500 tasks/s", "Zygote.run_python('pass'), 2 thread(s)", None, 2500.0),
    ("zygote >= 1.25x sandlock fork", "Zygote.run_python('pass'), 2 thread(s)", "sandlock Sandbox.fork (COW clones)", 1.25),
    ("zygote >= 8x subprocess python3", "Zygote.run_python('pass'), 2 thread(s)",
     "subprocess.run(python3 -c pass), 2 threads", 8.0),
    ("run 2 threads >= 1.7x 1 thread", "nsfast.run, 2 thread(s)", "nsfast.run, 1 thread(s)", 1.7),
    ("arun 64 >= run 2 threads", "nsfast.arun, concurrency 64", "nsfast.run, 2 thread(s)", 1.0),
]  # fmt: skip


def pooled(call: Callable[[], List[float]]) -> List[float]:
    """`call` with 4 network namespaces made ahead (`nsfast.configure(netns_pool=4)`), the
    pool closed again after the row."""
    import nsfast

    nsfast.configure(netns_pool=4)
    try:
        return call()
    finally:
        nsfast.configure(netns_pool=0)


def rows() -> List[Dict[str, Any]]:
    import nsfast

    no_net = nsfast.Spec(namespaces=tuple(n for n in nsfast.DEFAULT_NAMESPACES if n != "net"))
    no_cg = nsfast.Spec(cgroup=False)
    out: List[Dict[str, Any]] = []
    for t in (1, 2, 4):
        out.append({"name": f"subprocess.run, {t} thread(s)", "run": lambda n, t=t: threaded(
            lambda: subprocess.run(TRUE), t, n)})  # fmt: skip
    for t in (1, 2, 4):
        out.append({"name": f"nsfast.run, {t} thread(s)", "run": lambda n, t=t: threaded(
            lambda: nsfast.run(TRUE), t, n)})  # fmt: skip
    for t in (1, 2):
        out.append({"name": f"nsfast.run, configure(netns_pool=4), {t} thread(s)", "run": lambda n, t=t: pooled(
            lambda: threaded(lambda: nsfast.run(TRUE), t, n))})  # fmt: skip
    out.append({"name": "nsfast.run, no net namespace, 2 threads", "run": lambda n: threaded(
        lambda: nsfast.run(TRUE, spec=no_net), 2, n)})  # fmt: skip
    out.append({"name": "nsfast.run, cgroup=False, 2 threads", "run": lambda n: threaded(
        lambda: nsfast.run(TRUE, spec=no_cg), 2, n)})  # fmt: skip
    for c in (1, 4, 16, 64):
        out.append({"name": f"nsfast.arun, concurrency {c}", "run": lambda n, c=c: concurrent_async(c, n)})
    for t in (1, 2, 4):
        out.append({"name": f"Zygote.run_python('pass'), {t} thread(s)", "run": lambda n, t=t: threaded(
            lambda: zygote().run_python("pass"), t, n)})  # fmt: skip
    for kind in list(_ZYGOTE_KINDS)[1:3]:
        out.append({"name": f"Zygote({kind}).run_python('pass'), 2 threads", "run": lambda n, k=kind: threaded(
            lambda: zygote(k).run_python("pass"), 2, n)})  # fmt: skip
    out.append(
        {"name": "fork floor: os.fork+_exit of a bare interpreter, 2 processes", "run": lambda n: fork_floor(2, n)}
    )
    out.append({"name": "Zygote(preload=('json',)).run_python(snippet), 2 threads", "run": lambda n: threaded(
        lambda: zygote("preload=('json',)").run_python(SNIPPET), 2, n)})  # fmt: skip
    out.append({"name": "Zygote.arun_python('pass'), concurrency 16", "run": lambda n: zygote_async(16, n)})
    out.append({"name": "nsfast.run(python3 -c pass), 2 threads", "run": lambda n: threaded(
        lambda: nsfast.run(PY_PASS), 2, n)})  # fmt: skip
    out.append({"name": "subprocess.run(python3 -c pass), 2 threads", "run": lambda n: threaded(
        lambda: subprocess.run(PY_PASS), 2, n)})  # fmt: skip
    bwrap = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all", "--"] + TRUE
    out.append({"name": "bwrap --unshare-all /bin/true, 2 threads", "run": lambda n: bwrap_rows(bwrap, n)})
    for t in (1, 2):
        out.append({"name": f"sandlock Sandbox.run, {t} thread(s)", "run": lambda n, t=t: sandlock_run(t, n)})
    out.append({"name": "sandlock Sandbox.fork (COW clones)", "run": sandlock_fork})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=200, help="tasks per row per round (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    console = Console(width=200)
    table_rows = rows()
    results: Dict[str, Dict[str, Any]] = {
        r["name"]: {"rates": [], "lat": [], "skip": None, "cpu_s": 0.0, "wall_s": 0.0, "n": 0} for r in table_rows
    }
    for rnd in range(args.rounds):
        for r in table_rows:
            res = results[r["name"]]
            if res["skip"]:
                continue
            try:
                samples = r["run"](args.tasks)
            except Skip as e:
                res["skip"] = str(e)
                continue
            wall = samples.pop()
            res["rates"].append(len(samples) / wall)
            res["lat"].extend(samples)
            res["cpu_s"] += _LAST_CPU[0]
            res["wall_s"] += wall
            res["n"] += len(samples)
        console.print(f"round {rnd + 1}/{args.rounds} done", style="dim")

    table = Table(title=f"Sandboxes per second, /bin/true, {args.tasks} tasks x {args.rounds} rounds per row")
    cpus = os.cpu_count() or 1
    for col in (
        "row",
        "tasks/s (median of rounds)",
        "p50 ms",
        "p99 ms",
        "CPU ms/task",
        "busy CPUs",
        "CPU-bound ceiling/s",
        "note",
    ):
        table.add_column(col, justify="left" if col in ("row", "note") else "right")
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "tasks": args.tasks,
        "rounds": args.rounds,
        "rows": [],
    }
    for name, res in results.items():
        if res["skip"]:
            table.add_row(name, "-", "-", "-", "-", "-", "-", f"skipped: {res['skip']}")
            report["rows"].append({"name": name, "skipped": res["skip"]})
            continue
        lat = sorted(res["lat"])
        p50 = lat[len(lat) // 2] * 1e3
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
        rate = statistics.median(res["rates"])
        # The machine's busy CPU per task, every process and kernel thread included (the
        # kernel's deferred work too: network namespace cleanup, RCU callbacks); on `cpus`
        # CPUs no schedule of that work does better than cpus / that.
        cpu_ms = res["cpu_s"] * 1e3 / res["n"]
        busy = res["cpu_s"] / res["wall_s"]
        ceiling = cpus * 1e3 / cpu_ms if cpu_ms > 0 else float("inf")
        table.add_row(
            name, f"{rate:,.0f}", f"{p50:.2f}", f"{p99:.2f}", f"{cpu_ms:.2f}", f"{busy:.2f}", f"{ceiling:,.0f}", ""
        )
        report["rows"].append({
            "name": name, "tasks_per_s": rate, "rates": res["rates"], "p50_ms": p50, "p99_ms": p99,
            "cpu_ms_per_task": cpu_ms, "busy_cpus": busy, "cpu_bound_ceiling_per_s": ceiling,
        })  # fmt: skip
    console.print(table)
    rate_of = {r["name"]: r.get("tasks_per_s") for r in report["rows"]}
    ceiling_of = {r["name"]: r.get("cpu_bound_ceiling_per_s") for r in report["rows"]}
    targets = Table(title="Targets (issue 9), this run")
    # "at most": the numerator row's CPU-bound ceiling (over the denominator's rate): what
    # the same per-task CPU could give with every CPU busy all the time.
    for col in ("target", "value", "at most, at this CPU per task", "verdict"):
        targets.add_column(col)
    report["targets"] = []
    for what, num, den, least in TARGETS:
        a, b = rate_of.get(num), (rate_of.get(den) if den else 1.0)
        if not a or not b:
            targets.add_row(what, "-", "-", "n/a (a row was skipped)")
            continue
        value = a / b
        bound = ceiling_of[num] / b
        verdict = "PASS" if value >= least else "FAIL"
        unit = "" if den is None else "x"
        targets.add_row(what, f"{value:,.2f}{unit}", f"{bound:,.2f}{unit}", verdict)
        report["targets"].append({"target": what, "value": value, "at_most": bound, "verdict": verdict})
    console.print(targets)
    for z in _ZYGOTES.values():
        z.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
