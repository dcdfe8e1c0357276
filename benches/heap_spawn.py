#!/usr/bin/env python3
"""Does a big Python heap slow down spawning? nsfast.run against subprocess, posix_spawn, fork.

Reproduce (from the repository root, as root, after `make build`; needs ~3.5 GiB free):

    .venv/bin/python benches/heap_spawn.py                  # 100 samples per method and heap
    .venv/bin/python benches/heap_spawn.py --quick          # 30
    .venv/bin/python benches/heap_spawn.py --bytearray-gib 2 --objects-gib 1 --json out.json

Two worker processes (this script, --worker) time the same four ways of starting `/bin/true`
and waiting for it:

    small heap   a fresh interpreter with nsfast imported (~20 MB resident)
    big heap     the same, after allocating and touching a --bytearray-gib bytearray (one
                 mapping, a byte written in every page) and --objects-gib of small `bytes`
                 objects in a list (pymalloc arenas spread over the address space): many
                 resident pages and large page tables (VmRSS and VmPTE are printed)

The parent sends both workers requests for --batch samples of one method at a time, rotating
methods and workers every round, so drift in the machine's load hits both heaps alike; a
worker times each call with time.perf_counter_ns (GC off) and sends the raw samples back.

Methods:
    nsfast.run        nsfast.run(["/bin/true"]): clone3(CLONE_VM | CLONE_NEW*), default isolation
    subprocess.run    subprocess.run(["/bin/true"]) (CPython's _posixsubprocess.fork_exec)
    os.posix_spawn    os.posix_spawn + os.waitpid (glibc's posix_spawn)
    os.fork+execv     os.fork(), os.execv in the child, os.waitpid

The "syscall" column is observed, not assumed: with strace installed, a fresh interpreter
spawns once by each method under `strace -f -e trace=clone,clone3,fork,vfork`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

import nsfast

# The parent imports start_latency's helpers inside the functions that use them: a worker
# imports nothing more than nsfast, so the small heap stays that of a bare interpreter.
sys.path.insert(0, str(Path(__file__).resolve().parent))

TRUE = ["/bin/true"]
GiB = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")
HEAPS = ("small", "big")
REPLY_TIMEOUT_S = 600.0


def _wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def spawn_nsfast() -> int:
    return nsfast.run(TRUE).returncode


def spawn_subprocess() -> int:
    return subprocess.run(TRUE).returncode


def spawn_posix_spawn() -> int:
    return _wait(os.posix_spawn(TRUE[0], TRUE, os.environ))


def spawn_fork() -> int:
    pid = os.fork()
    if pid == 0:  # child: nothing but exec
        try:
            os.execv(TRUE[0], TRUE)
        finally:
            os._exit(127)
    return _wait(pid)


METHODS: Dict[str, Callable[[], int]] = {
    "nsfast.run": spawn_nsfast,
    "subprocess.run": spawn_subprocess,
    "os.posix_spawn": spawn_posix_spawn,
    "os.fork+execv": spawn_fork,
}


# -- the worker (one per heap) ------------------------------------------------------------------


def memory() -> Dict[str, int]:
    """VmRSS and VmPTE (page tables) of this process, in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmPTE"):
            out[key] = int(value.split()[0])
    return out


def build_heap(bytearray_gib: float, objects_gib: float) -> Tuple[bytearray, List[bytes]]:
    """A touched bytearray of `bytearray_gib` and about `objects_gib` of 40-byte `bytes`."""
    big = bytearray(int(bytearray_gib * GiB))  # calloc'd: zero pages until written
    big[::PAGE] = b"\x01" * len(range(0, len(big), PAGE))  # write one byte in every page
    # A bytes(40) takes 73 bytes, 80 in its pymalloc size class, plus 8 for the list slot.
    per_object = -(-sys.getsizeof(bytes(40)) // 16) * 16 + 8
    small = [bytes(40) for _ in range(int(objects_gib * GiB / per_object))]
    return big, small


def worker(bytearray_gib: float, objects_gib: float) -> None:
    """--worker: build the heap, say hello, then for each request "METHOD N" on stdin time N
    calls and reply with one JSON line. The spawned commands get /dev/null as stdin and our
    stderr as stdout, never the protocol pipes."""
    requests: TextIO = os.fdopen(os.dup(0), "r")
    replies: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    heap = build_heap(bytearray_gib, objects_gib) if bytearray_gib or objects_gib else None
    gc.freeze()  # keep the big list out of collections
    replies.write(json.dumps({"memory_kib": memory(), "objects": len(heap[1]) if heap else 0}) + "\n")
    for line in requests:
        name, n = line.split()
        call = METHODS[name]
        samples, failures = [], 0
        gc.disable()
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            rc = call()
            samples.append(time.perf_counter_ns() - t0)
            failures += rc != 0
        gc.enable()
        replies.write(json.dumps({"samples_ns": samples, "failures": failures}) + "\n")


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, heap: str, bytearray_gib: float, objects_gib: float) -> None:
        self.heap = heap
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(bytearray_gib), str(objects_gib)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.hello: Dict[str, Any] = {}

    def receive(self) -> Dict[str, Any]:
        from start_latency import receive_json

        return receive_json(self.proc, f"{self.heap}-heap worker", REPLY_TIMEOUT_S)

    def request(self, method: str, n: int) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{method} {n}\n")
        return self.receive()

    def close(self) -> None:
        from start_latency import close_worker

        close_worker(self.proc)


# -- which system call each method uses ---------------------------------------------------------

CLONE_LINE = re.compile(r"^\d+\s+(clone3|clone|vfork|fork)\((?:.*?flags=([A-Z0-9_|]+))?")


def observed_syscall(method: str) -> str:
    """The process-creating system call(s) one spawn by `method` makes, seen by strace."""
    if shutil.which("strace") is None:
        return "? (no strace)"
    with tempfile.NamedTemporaryFile("r", prefix="heap-spawn-strace-") as log:
        cmd = [
            "strace",
            "-f",
            "-qq",
            "-o",
            log.name,
            "-e",
            "trace=clone,clone3,fork,vfork",
            sys.executable,
            str(Path(__file__).resolve()),
            "--trace-one",
            method,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return f"? (strace exited {r.returncode})"
        calls = []
        for line in log.read().splitlines():
            m = CLONE_LINE.match(line)
            if m:
                call = f"{m.group(1)}({(m.group(2) or '').replace('CLONE_', '')})"
                if call not in calls:
                    calls.append(call)
    return " + ".join(calls) or "?"


# -- measuring and reporting --------------------------------------------------------------------


@dataclass
class Stats:
    n: int
    failures: int
    median_ms: float
    p90_ms: float


@dataclass
class Report:
    environment: Dict[str, str]
    settings: Dict[str, float]
    memory_kib: Dict[str, Dict[str, int]] = field(default_factory=dict)  # heap -> VmRSS, VmPTE
    syscalls: Dict[str, str] = field(default_factory=dict)
    stats: Dict[str, Dict[str, Stats]] = field(default_factory=dict)  # heap -> method -> stats


def measure(workers: List[Worker], runs: int, batch: int, warmup: int) -> Dict[str, Dict[str, Stats]]:
    """`runs` samples of every method in every worker, in rotating rounds of `batch`."""
    from start_latency import quantile

    names = list(METHODS)
    samples: Dict[Tuple[str, str], List[float]] = {(w.heap, m): [] for w in workers for m in names}
    failures = dict.fromkeys(samples, 0)
    if warmup:
        for w in workers:
            for m in names:
                w.request(m, warmup)
    done, r = 0, 0
    while done < runs:
        k = min(batch, runs - done)
        for m in names[r % len(names) :] + names[: r % len(names)]:
            for w in workers if r % 2 == 0 else workers[::-1]:
                reply = w.request(m, k)
                samples[w.heap, m] += [s / 1e6 for s in reply["samples_ns"]]
                failures[w.heap, m] += reply["failures"]
        done, r = done + k, r + 1
    out: Dict[str, Dict[str, Stats]] = {w.heap: {} for w in workers}
    for (heap, m), s in samples.items():
        s.sort()
        out[heap][m] = Stats(len(s), failures[heap, m], quantile(s, 0.5), quantile(s, 0.9))
    return out


def print_report(rep: Report) -> None:
    from rich.table import Table

    from start_latency import rich_header

    console = rich_header(
        "Spawn latency of /bin/true with a small and a big Python heap",
        rep.environment,
        None,
        ("kernel", "cpu", "python", "thp", "command"),
    )
    for heap in HEAPS:
        m = rep.memory_kib[heap]
        console.print(
            f"  {heap} heap: VmRSS {m['VmRSS'] / 1024:.0f} MiB, VmPTE (page tables) {m['VmPTE'] / 1024:.1f} MiB",
            highlight=False,
        )
    table = Table(show_edge=False)
    table.add_column("method")
    table.add_column("syscall (strace; CLONE_ left out)", overflow="fold")
    for heap in HEAPS:
        table.add_column(f"{heap} heap\nmedian ms", justify="right")
        table.add_column(f"{heap} heap\np90 ms", justify="right")
    table.add_column("big / small\n(medians)", justify="right")
    table.add_column("ok")
    for name in METHODS:
        small, big = rep.stats["small"][name], rep.stats["big"][name]
        ok = small.failures == 0 and big.failures == 0
        table.add_row(
            name,
            rep.syscalls.get(name, "?"),
            f"{small.median_ms:.2f}",
            f"{small.p90_ms:.2f}",
            f"{big.median_ms:.2f}",
            f"{big.p90_ms:.2f}",
            f"{big.median_ms / small.median_ms:.2f}x",
            "[green]yes[/green]" if ok else "[red]NO[/red]",
        )
    console.print(table)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=100, help="samples per method and heap (default 100)")
    p.add_argument("--quick", action="store_true", help="30 samples per method and heap")
    p.add_argument("--batch", type=int, default=5, help="samples per request (default 5)")
    p.add_argument("--warmup", type=int, default=5, help="unrecorded runs per method and heap (default 5)")
    p.add_argument("--bytearray-gib", type=float, default=2.0, help="size of the touched bytearray (default 2)")
    p.add_argument("--objects-gib", type=float, default=1.0, help="approximate size of the small objects (default 1)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--worker", nargs=2, type=float, metavar=("BYTEARRAY_GIB", "OBJECTS_GIB"), help=argparse.SUPPRESS)
    p.add_argument("--trace-one", choices=list(METHODS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if args.trace_one:
        return METHODS[args.trace_one]()
    if args.quick:
        args.runs = 30
    if args.runs < 1 or args.batch < 1 or args.warmup < 0:
        p.error("--runs and --batch must be positive, --warmup not negative")

    from start_latency import machine

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    rep = Report(
        environment={
            **machine(),
            "thp": "transparent_hugepage " + (thp.read_text().strip() if thp.exists() else "?"),
            "command": shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])]),
        },
        settings={
            k: v for k, v in vars(args).items() if k in ("runs", "batch", "warmup", "bytearray_gib", "objects_gib")
        },
    )
    rep.syscalls = {name: observed_syscall(name) for name in METHODS}

    print(
        f"starting workers (big heap: {args.bytearray_gib:g} GiB bytearray + ~{args.objects_gib:g} GiB of small "
        "objects) ...",
        file=sys.stderr,
    )
    workers = [Worker("small", 0, 0), Worker("big", args.bytearray_gib, args.objects_gib)]
    try:
        for w in workers:
            w.hello = w.receive()
            rep.memory_kib[w.heap] = w.hello["memory_kib"]
        rep.stats = measure(workers, args.runs, args.batch, args.warmup)
    finally:
        for w in workers:
            w.close()

    print_report(rep)
    if args.json:
        args.json.write_text(json.dumps(asdict(rep), indent=2) + "\n")
    return 0 if all(s.failures == 0 for heap in rep.stats.values() for s in heap.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
