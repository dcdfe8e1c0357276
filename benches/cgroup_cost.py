#!/usr/bin/env python3
"""What a sandbox's own cgroup costs per spawn: nsfast.run with and without it, and (in a
pure cgroup v2 VM) CLONE_INTO_CGROUP against attaching through cgroup.procs.

Reproduce (from the repository root, as root, after `make build`; the Rust baseline
target/release/examples/spawn_loop is built with cargo if missing):

    .venv/bin/python benches/cgroup_cost.py                     # this host (v1 here), 200 rounds
    .venv/bin/python benches/cgroup_cost.py --quick             # 60 rounds
    .venv/bin/python benches/cgroup_cost.py --runs 500 --json out.json --markdown

    .venv/bin/python benches/cgroup_cost.py --vm                # the v2 attach comparison in a VM
    .venv/bin/python benches/cgroup_cost.py --vm --quick --json vm.json

`--vm` runs, and streams the output of, exactly

    tests/vm/run-vm.sh --timeout 1800 -- /ABS/.venv/bin/python /ABS/benches/cgroup_cost.py \
        --in-vm --json-stdout --vm-runs=200 --vm-batch=5 --rust-vm-runs=200 --warmup=5 --segments=5 --bootstrap=2000

(/ABS = the repository, the interpreter is the one running this script; the --vm-*,
--rust-vm-runs, --segments, --bootstrap, --markdown and --quick values are passed on), and
writes --json on the host (files written inside the VM are discarded). The in-VM part can
also be run by hand, printing its table only:

    tests/vm/run-vm.sh -- .venv/bin/python benches/cgroup_cost.py --in-vm [--quick] [--markdown]

--in-vm refuses to run anywhere but on a pure cgroup v2 hierarchy.

Host part (this machine's cgroup backend, whatever it is; v1 on a hybrid host). Variants,
one sample = the wall time of the call, stdio inherited:

    cgroup=False   nsfast.run(["/bin/true"], cgroup=False)                  -- the reference
    cgroup         nsfast.run(["/bin/true"]): the default per-sandbox cgroup, measurement
                   only (mkdir, attach, read usage, rmdir: per hierarchy on v1)
    cgroup+limits  nsfast.run(["/bin/true"], limits=Limits(memory="256M", pids=64, cpu=1.0))
    spawn_loop --no-cgroup / spawn_loop
                   target/release/examples/spawn_loop N default [--no-cgroup]: the same spawn
                   from Rust without Python; it prints only its median and p90, so each
                   mode runs as --rust-chunks processes of N = --rust-runs / --rust-chunks
    ..., N ms apart  the three Python variants again, --isolated-runs rounds of one sample
                   each, every sample after an untimed --gap-ms (default 50) pause: isolated
                   spawns, like a sandbox started now and then, not back to back

Method:
  * The quantity is a difference of ~0.1 ms between spawns of ~1-4 ms on a shared, noisy
    machine, so the variants alternate at the finest grain: every round takes --block
    (default 1) samples of each Python variant, the order rotating every round; the GC is off
    (collected every 10 rounds, outside the timings). The spawn_loop chunks run in pairs
    (cgroup / no cgroup, the order alternating) spread evenly over the rounds.
  * The cost of the cgroup is median(variant) - median(cgroup=False). Its spread: a 95%
    bootstrap interval (rounds resampled with replacement, 2000 times, so the pairing in time
    is kept), and the same difference in each of --segments consecutive parts of the run
    (the min..max shows drift). For spawn_loop: median of the chunk medians per mode, the
    interval from resampling the chunk pairs.
  * Target: the default cgroup costs < 0.3 ms per spawn at the median. The verdict is by
    the point estimate, marked "interval crosses" when the 95% interval contains 0.3.
  * Why the isolated rows: putting a process into a cgroup by a cgroup.procs write (the only
    way on v1; NSFAST_CGROUP_V2_ATTACH=procs on v2) write-locks the kernel's percpu
    cgroup_threadgroup_rwsem, and such a write lock first waits for an RCU grace period
    unless another one happened within about a grace period before (rcu_sync; Linux commit
    6a010a49b63a, "cgroup: Make !percpu threadgroup_rwsem operations optional"). Back to
    back, spawns mostly find it still "entered"; isolated ones pay the grace period each.
    The kernel's cgroup_favordynmods=true boot option (v1 and v2) or the v2 mount option
    favordynmods trade this for slower fork/exit; clone3(CLONE_INTO_CGROUP) avoids it.
  * The limits are checked once (a sandbox with them is started and its cgroup files are
    read back) and nsfast's CgroupWarnings are shown.

VM part (--vm / --in-vm): inside tests/vm's qemu TCG VM (pure cgroup v2, Debian 12's 6.1
kernel, not this host's), nsfast.run(["/bin/true"]) with the default cgroup, attached
  clone_into   by clone3(CLONE_INTO_CGROUP) (the default), or
  procs        by writing the child's pid to cgroup.procs (NSFAST_CGROUP_V2_ATTACH=procs).
The variable is read once per backend, so each mode is its own long-lived interpreter (this
script, --attach-worker), started with the variable set or removed in its environment, that
the --in-vm part feeds requests over a pipe: turns of --vm-batch samples, the two workers
alternating ABBA, --vm-runs samples per mode in all. Inside a turn a worker alternates
nsfast.run(["/bin/true"]) with nsfast.run(["/bin/true"], cgroup=False); the latter is a
control (the same in both modes, so its ratio should be ~1). After every turn spawn_loop
N default runs once per mode (N = --rust-vm-runs / turns; the variable set likewise).
TCG is ~10-50x slower than the host and its speed drifts with the host's load, so only
ratios are reported: procs / clone_into of the median spawn latency, with a 95% bootstrap
interval (turns resampled, pairing kept) and the ratio in each of --segments consecutive
parts; the same with each mode's median first divided by its own cgroup=False median
(which divides out a difference between the two workers or drift that hits one more); and
each mode's cgroup overhead as a fraction of its cgroup=False median. With
strace available, one spawn_loop run per mode is traced to show that the modes do what they
claim (clone3 with CLONE_INTO_CGROUP; an O_WRONLY open of the sandbox's cgroup.procs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bootstrap, flat, fmt_ms, fmt_signed_ms, verdict  # noqa: E402
from start_latency import (  # noqa: E402
    ROOT,
    SPAWN_LOOP,
    WORKER_TIMEOUT_S,
    Batch,
    Skip,
    SpawnLoop,
    close_worker,
    environment,
    median,
    quantile,
    rich_header,
    split,
    stale_note,
)

TRUE = ["/bin/true"]
TARGET_MS = 0.3
LIMITS = dict(memory="256M", pids=64, cpu=1.0)
JSON_MARK = "NSFAST_BENCH_JSON "
RUN_VM = ROOT / "tests" / "vm" / "run-vm.sh"
ATTACH_VAR = "NSFAST_CGROUP_V2_ATTACH"
MODES = ("clone_into", "procs")


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    name: str
    command: str
    call: Callable[[], int]
    samples: List[float] = field(default_factory=list)  # seconds, in the order taken
    failures: int = 0


def python_variants(which: Sequence[str]) -> List[Variant]:
    import nsfast

    run, limits = nsfast.run, nsfast.Limits(**LIMITS)  # type: ignore[arg-type]
    shown = ", ".join(f"{k}={v!r}" for k, v in LIMITS.items())
    all_ = [
        Variant(
            "nocg",
            "nsfast.run(cgroup=False)",
            'nsfast.run(["/bin/true"], cgroup=False)',
            lambda: run(TRUE, cgroup=False).returncode,
        ),
        Variant(
            "cg",
            "nsfast.run (cgroup)",
            'nsfast.run(["/bin/true"])  # default per-sandbox cgroup',
            lambda: run(TRUE).returncode,
        ),
        Variant(
            "limits",
            "nsfast.run(limits=...)",
            f'nsfast.run(["/bin/true"], limits=Limits({shown}))',
            lambda: run(TRUE, limits=limits).returncode,
        ),
    ]
    return [v for v in all_ if v.key in which]


def take(v: Variant, n: int) -> None:
    for _ in range(n):
        t0 = time.perf_counter_ns()
        try:
            rc = v.call()
        except OSError:
            rc = -1
        v.samples.append((time.perf_counter_ns() - t0) / 1e9)
        v.failures += rc != 0


def in_rounds(what: str, rounds: int, one_round: Callable[[int], None]) -> None:
    """one_round(r) for r in range(rounds), under a progress bar `what`, with the GC off
    (collected every 10 rounds, outside the timings)."""
    from rich.progress import Progress

    gc.collect()
    gc.disable()
    try:
        with Progress(auto_refresh=False, transient=True) as progress:
            task = progress.add_task(what, total=rounds)
            for r in range(rounds):
                one_round(r)
                if r % 10 == 9:
                    gc.collect()
                progress.update(task, advance=1)
                progress.refresh()
    finally:
        gc.enable()


def measure_isolated(variants: List[Variant], rounds: int, gap_s: float) -> None:
    """Rounds of one sample per variant, rotating, each after an untimed sleep of gap_s."""

    def one_round(r: int) -> None:
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            time.sleep(gap_s)
            take(v, 1)

    in_rounds(f"isolated samples ({gap_s * 1e3:g} ms apart)", rounds, one_round)


class RustMode(SpawnLoop):
    """spawn_loop N default [--no-cgroup]; start() builds the binary if needed."""

    def __init__(self, binary: Path, cgroup: bool) -> None:
        super().__init__(binary)
        self.cgroup = cgroup
        self.key = "rust-cg" if cgroup else "rust-nocg"
        self.name = "spawn_loop (cgroup)" if cgroup else "spawn_loop --no-cgroup"

    def argv(self, n: int) -> List[str]:
        return [str(self.binary), str(n), "default"] + ([] if self.cgroup else ["--no-cgroup"])

    def start(self, host_ns: Dict[str, str]) -> None:
        super().start(host_ns)
        rel = self.binary.relative_to(ROOT) if self.binary.is_relative_to(ROOT) else self.binary
        self.command = f"{rel} N default{'' if self.cgroup else ' --no-cgroup'}"


def measure_host(
    variants: List[Variant], rust: List[RustMode], rounds: int, block: int, warmup: int, rust_sizes: List[int]
) -> Dict[str, List[Batch]]:
    """Rounds of `block` samples per variant, rotating; spawn_loop chunk pairs spread over them."""
    for v in variants:
        take(v, warmup)
        v.samples.clear()
        v.failures = 0
    for mode in rust:
        mode.batch(min(20, rust_sizes[0]))
    rust_batches: Dict[str, List[Batch]] = {r.key: [] for r in rust}
    pairs = len(rust_sizes) if rust else 0
    at: Dict[int, List[int]] = {}
    for i in range(pairs):
        at.setdefault(min(rounds - 1, (2 * i + 1) * rounds // (2 * pairs)), []).append(i)

    def one_round(r: int) -> None:
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            take(v, block)
        for i in at.get(r, []):
            for m in rust if i % 2 == 0 else rust[::-1]:
                rust_batches[m.key].append(m.batch(rust_sizes[i]))

    in_rounds("measuring", rounds, one_round)
    return rust_batches


# -- statistics ---------------------------------------------------------------------------------


@dataclass
class Diff:
    """variant - reference, in ms."""

    what: str
    delta_ms: Optional[float]
    low_ms: Optional[float] = None
    high_ms: Optional[float] = None
    segments_ms: List[float] = field(default_factory=list)
    target: bool = False  # whether the < TARGET_MS goal applies
    ok: Optional[bool] = None  # by the point estimate
    conclusive: Optional[bool] = None  # the whole 95% interval on the same side of TARGET_MS
    basis: str = ""

    def judge(self) -> None:
        self.target = True
        if self.delta_ms is None:
            return
        self.ok = self.delta_ms < TARGET_MS
        if self.low_ms is not None and self.high_ms is not None:
            self.conclusive = self.high_ms < TARGET_MS if self.ok else self.low_ms >= TARGET_MS

    def verdict(self) -> str:
        if not self.target:
            return ""
        v = verdict(self.ok)
        return v if self.conclusive or self.ok is None else f"{v} (interval crosses {TARGET_MS})"


def _median_diff(a: List[List[float]], b: List[List[float]]) -> Callable[[List[int]], float]:
    """median(b) - median(a) over the rounds (sample groups) given by index."""
    return lambda ix: median(flat(b, ix)) - median(flat(a, ix))


def diff_of_rounds(a: List[List[float]], b: List[List[float]], what: str, segments: int, resamples: int) -> Diff:
    """median(b) - median(a) of per-round sample groups (seconds in, ms out)."""
    n = min(len(a), len(b))
    stat = _median_diff(a[:n], b[:n])
    d = stat(list(range(n))) * 1e3
    lo, hi = bootstrap(stat, n, resamples)
    segs = [stat(list(range(*start_end))) * 1e3 for start_end in _segments(n, segments)]
    return Diff(what, d, lo * 1e3, hi * 1e3, segs)


def _segments(n: int, parts: int) -> List[Tuple[int, int]]:
    out, start = [], 0
    for size in split(n, parts):
        out.append((start, start + size))
        start += size
    return out


def chunk_diff(cg: List[Batch], nocg: List[Batch], what: str, resamples: int) -> Diff:
    n = min(len(cg), len(nocg))
    a = [[b.median_s] for b in nocg[:n] if b.median_s is not None]
    c = [[b.median_s] for b in cg[:n] if b.median_s is not None]
    n = min(len(a), len(c))
    if n == 0:
        return Diff(what, None)
    stat = _median_diff(a, c)
    d = stat(list(range(n))) * 1e3
    lo, hi = bootstrap(stat, n, resamples)
    return Diff(what, d, lo * 1e3, hi * 1e3, [(c[i][0] - a[i][0]) * 1e3 for i in range(n)], basis=f"{n} chunk pairs")


# -- host checks --------------------------------------------------------------------------------

V1_FILES = {
    "memory.limit_in_bytes": "memory",
    "pids.max": "pids",
    "cpu.cfs_quota_us": "cpu quota",
    "cpu.cfs_period_us": "cpu period",
}
V2_FILES = {"memory.max": "memory", "pids.max": "pids", "cpu.max": "cpu"}


def check_cgroups() -> Tuple[Dict[str, Any], List[str]]:
    """The backend in use, and the limits as read back from a live sandbox's cgroup."""
    import nsfast
    from nsfast import _cgroup

    notes: List[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = _cgroup.backend_info()
        r = nsfast.run(TRUE)
        p = nsfast.spawn(["/bin/sleep", "30"], limits=nsfast.Limits(**LIMITS))  # type: ignore[arg-type]
        try:
            paths = p._cgroup.paths() if p._cgroup is not None else []
            seen = {}
            for d in paths:
                for f, label in {**V1_FILES, **V2_FILES}.items():
                    fp = Path(d) / f
                    if fp.exists():
                        seen[label] = fp.read_text().strip()
        finally:
            p.kill()
            p.wait()
    backend = {
        "version": info[0] if info else None,
        "roots": info[1] if info else [],
        "controllers": info[2] if info else [],
        "limits_read_back": seen,
        "limit_cgroup_dirs": len(paths),
        "default_run_usage": repr(r.usage),
    }
    for w in caught:
        notes.append(f"CgroupWarning: {w.message}")
    if info is None:
        notes.append("no cgroup backend: the cgroup variants run without a cgroup")
    else:
        notes.append(f"cgroup v{info[0]}: sandboxes' cgroups under {', '.join(info[1])}")
        notes.append(
            f"limits read back from a live sandbox's {len(paths)} cgroup dir(s): "
            + ", ".join(f"{k}={v}" for k, v in seen.items())
        )
    return backend, notes


# -- VM part ------------------------------------------------------------------------------------


def attach_worker(warmup: int) -> None:
    """--attach-worker (in the VM): say hello, then for each line "N" on stdin take N samples
    of nsfast.run with its cgroup and N without (alternating) and reply with one JSON line.
    The attach mode is whatever NSFAST_CGROUP_V2_ATTACH said when this process started."""
    import nsfast
    from nsfast import _cgroup

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing but replies on the pipe
    info = _cgroup.backend_info()
    for _ in range(warmup):
        nsfast.run(TRUE)
        nsfast.run(TRUE, cgroup=False)
    replies.write(json.dumps({"env": os.environ.get(ATTACH_VAR), "version": info[0] if info else None}) + "\n")
    i = 0
    for line in sys.stdin:
        cg: List[float] = []
        nocg: List[float] = []
        failures = 0
        gc.collect()
        gc.disable()
        for _ in range(int(line)):
            pair: Tuple[Tuple[List[float], Dict[str, Any]], ...] = ((cg, {}), (nocg, {"cgroup": False}))
            for out, kw in pair if i % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter_ns()
                rc = nsfast.run(TRUE, **kw).returncode
                out.append((time.perf_counter_ns() - t0) / 1e9)
                failures += rc != 0
            i += 1
        gc.enable()
        replies.write(json.dumps({"cg": cg, "nocg": nocg, "failures": failures}) + "\n")


def _mode_env(mode: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop(ATTACH_VAR, None)
    if mode == "procs":
        env[ATTACH_VAR] = "procs"
    return env


def strace_check(binary: Path) -> Dict[str, str]:
    """One traced spawn_loop run per mode: the clone3 flags and any open of cgroup.procs."""
    out: Dict[str, str] = {}
    if not Path("/usr/bin/strace").exists() or not binary.exists():
        return {m: "not checked (no strace or spawn_loop)" for m in MODES}
    for mode in MODES:
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as f:
            subprocess.run(
                ["strace", "-f", "-o", f.name, "-e", "trace=clone3,openat", str(binary), "1", "default"],
                env=_mode_env(mode),
                capture_output=True,
                text=True,
                timeout=300,
            )
            text = f.read()
        into = "CLONE_INTO_CGROUP" in text
        procs = bool(re.search(r'openat\([^)]*nsfast/[^"]*/cgroup\.procs", O_WRONLY', text))
        out[mode] = (
            f"clone3 with CLONE_INTO_CGROUP: {'yes' if into else 'no'}; opens its cgroup's cgroup.procs: "
            f"{'yes' if procs else 'no'}"
        )
        if (mode == "clone_into") != into or (mode == "procs") != procs:
            out[mode] += "  <-- NOT AS EXPECTED"
    return out


@dataclass
class VmResult:
    mode_medians_ms: Dict[str, float]  # TCG ms: not comparable with the host
    mode_nocg_medians_ms: Dict[str, float]
    ratio: float  # median(procs) / median(clone_into), nsfast.run with its cgroup
    ratio_low: float  # 95% bootstrap interval, rounds resampled
    ratio_high: float
    segment_ratios: List[float]
    nocg_ratio: float  # the same for cgroup=False: should be ~1 (both workers alike)
    normalized_ratio: float  # ratio of (cg / cgroup=False) per mode: drift between the workers divided out
    normalized_low: float
    normalized_high: float
    normalized_segment_ratios: List[float]
    overhead_fraction: Dict[str, float]  # (cg - nocg) / nocg per mode
    rust_medians_ms: Dict[str, float]
    rust_ratio: Optional[float]
    rust_ratio_low: Optional[float]
    rust_ratio_high: Optional[float]
    rust_segment_ratios: List[float]
    n_per_mode: Dict[str, int]
    rust_chunks_per_mode: int
    failures: int
    strace: Dict[str, str]


class AttachWorker:
    """One long-lived --attach-worker in one attach mode."""

    def __init__(self, mode: str, warmup: int) -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--attach-worker", f"--warmup={warmup}"],
            env=_mode_env(mode),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def receive(self) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"attach worker ({self.mode}) died, exit status {self.proc.wait()}")
        out: Dict[str, Any] = json.loads(line)
        return out

    def batch(self, n: int) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{n}\n")
        return self.receive()

    def close(self) -> None:
        close_worker(self.proc, 60)


def _ratio_stats(
    num: List[List[float]],
    den: List[List[float]],
    segments: int,
    resamples: int,
    num_ref: Optional[List[List[float]]] = None,
    den_ref: Optional[List[List[float]]] = None,
) -> Tuple[float, float, float, List[float]]:
    """median(num) / median(den) of per-round groups (each first divided by the median of
    its *_ref, if given), its bootstrap interval (rounds resampled), and the ratio in each of
    `segments` consecutive parts."""
    n = min(len(num), len(den))

    def stat(ix: List[int]) -> float:
        a, b = median(flat(num, ix)), median(flat(den, ix))
        if num_ref is not None and den_ref is not None:
            a, b = a / median(flat(num_ref, ix)), b / median(flat(den_ref, ix))
        return a / b

    lo, hi = bootstrap(stat, n, resamples)
    return stat(list(range(n))), lo, hi, [stat(list(range(*se))) for se in _segments(n, segments)]


def in_vm(args: argparse.Namespace) -> int:
    from nsfast import _cgroup, _core

    info = _cgroup.backend_info()
    if info is None or info[0] != 2:
        print(
            f"--in-vm needs a pure cgroup v2 hierarchy; here the backend is {info!r}. "
            f"Run it as: tests/vm/run-vm.sh -- .venv/bin/python benches/cgroup_cost.py --in-vm",
            file=sys.stderr,
        )
        return 2
    if ATTACH_VAR.encode() not in Path(_core.__file__).read_bytes():
        print(f"{_core.__file__} predates {ATTACH_VAR} (run `make build`)", file=sys.stderr)
        return 2
    binary = args.spawn_loop
    have_rust = binary.exists() and "rust" not in args.skip
    env = environment([sys.executable, *sys.argv])
    started = time.monotonic()
    rounds = -(-args.vm_runs // args.vm_batch)
    rust_sizes = split(args.rust_vm_runs, rounds) if have_rust else []
    py: Dict[str, Dict[str, List[List[float]]]] = {m: {"cg": [], "nocg": []} for m in MODES}
    rust: Dict[str, List[List[float]]] = {m: [] for m in MODES}
    failures = 0
    workers = {m: AttachWorker(m, args.warmup) for m in MODES}
    try:
        for m, w in workers.items():
            hello = w.receive()
            if (hello["env"] == "procs") != (m == "procs") or hello["version"] != 2:
                print(f"worker for {m} saw {ATTACH_VAR}={hello['env']!r}, cgroup v{hello['version']}", file=sys.stderr)
                return 1
        for r in range(rounds):
            k = min(args.vm_batch, args.vm_runs - r * args.vm_batch)
            order = MODES if r % 2 == 0 else MODES[::-1]  # ABBA
            for m in order:
                b = workers[m].batch(k)
                py[m]["cg"].append(b["cg"])
                py[m]["nocg"].append(b["nocg"])
                failures += b["failures"]
            if have_rust and r < len(rust_sizes):
                for m in order[::-1]:
                    sr = subprocess.run(
                        [str(binary), str(rust_sizes[r]), "default"],
                        env=_mode_env(m),
                        capture_output=True,
                        text=True,
                        timeout=WORKER_TIMEOUT_S,
                    )
                    if sr.returncode != 0:
                        print(f"spawn_loop ({m}) exited {sr.returncode}: {sr.stderr.strip()[-2000:]}", file=sys.stderr)
                        return 1
                    rust[m].append([json.loads(sr.stdout)["median_us"] / 1e3])
            if (r + 1) % max(1, rounds // 10) == 0 or r + 1 == rounds:
                print(f"  [{time.monotonic() - started:6.0f} s] round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        return 1
    finally:
        for w in workers.values():
            w.close()
    checks = strace_check(binary) if have_rust else {m: "not checked" for m in MODES}

    def every(groups: List[List[float]]) -> List[float]:
        return [x for g in groups for x in g]

    med = {m: median(every(py[m]["cg"])) * 1e3 for m in MODES}
    med_nocg = {m: median(every(py[m]["nocg"])) * 1e3 for m in MODES}
    ratio, lo, hi, segs = _ratio_stats(py["procs"]["cg"], py["clone_into"]["cg"], args.segments, args.bootstrap)
    nocg_ratio = median(every(py["procs"]["nocg"])) / median(every(py["clone_into"]["nocg"]))
    nr = _ratio_stats(
        py["procs"]["cg"],
        py["clone_into"]["cg"],
        args.segments,
        args.bootstrap,
        py["procs"]["nocg"],
        py["clone_into"]["nocg"],
    )
    rr: Tuple[Optional[float], Optional[float], Optional[float], List[float]] = (None, None, None, [])
    if have_rust and rust["procs"]:
        rr = _ratio_stats(rust["procs"], rust["clone_into"], args.segments, args.bootstrap)
    res = VmResult(
        mode_medians_ms=med,
        mode_nocg_medians_ms=med_nocg,
        ratio=ratio,
        ratio_low=lo,
        ratio_high=hi,
        segment_ratios=segs,
        nocg_ratio=nocg_ratio,
        normalized_ratio=nr[0],
        normalized_low=nr[1],
        normalized_high=nr[2],
        normalized_segment_ratios=nr[3],
        overhead_fraction={m: (med[m] - med_nocg[m]) / med_nocg[m] for m in MODES},
        rust_medians_ms={m: median(every(rust[m])) for m in MODES if rust[m]},
        rust_ratio=rr[0],
        rust_ratio_low=rr[1],
        rust_ratio_high=rr[2],
        rust_segment_ratios=rr[3],
        n_per_mode={m: len(every(py[m]["cg"])) for m in MODES},
        rust_chunks_per_mode=len(rust["procs"]),
        failures=failures,
        strace=checks,
    )
    env["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    env["elapsed_s"] = round(time.monotonic() - started, 1)
    print_vm(res, env, args)
    if args.markdown:
        print()
        print(markdown_vm(res, env))
    payload = {
        "environment": env,
        "settings": {
            k: getattr(args, k) for k in ("vm_runs", "vm_batch", "rust_vm_runs", "warmup", "segments", "bootstrap")
        },
        "vm": asdict(res),
        "samples_ms": {m: {k: [[round(x * 1e3, 3) for x in g] for g in v] for k, v in py[m].items()} for m in MODES},
        "spawn_loop_chunk_medians_ms": {m: every(rust[m]) for m in MODES},
    }
    if args.json_stdout:
        print(JSON_MARK + json.dumps(payload))
    elif args.json:
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if failures == 0 else 1


def _range(xs: Sequence[float]) -> str:
    return f"{min(xs):.2f}..{max(xs):.2f}" if xs else "-"


def print_vm(res: VmResult, env: Dict[str, Any], args: argparse.Namespace) -> None:
    from rich.table import Table

    console = rich_header(
        "cgroup v2 attach: CLONE_INTO_CGROUP vs cgroup.procs (in the VM)",
        env,
        None,
        ("kernel", "cpu", "python", "nsfast"),
    )
    console.print(
        f"  {'run':8} {res.n_per_mode['clone_into']} samples per mode in turns of {args.vm_batch}, "
        f"{res.rust_chunks_per_mode} spawn_loop chunks per mode; {env['elapsed_s']} s; load "
        f"{' '.join(env['loadavg_start'])} at start, {' '.join(env['loadavg_end'])} at end",
        highlight=False,
    )
    table = Table(show_edge=False)
    for col, just in (
        ("median spawn latency", "left"),
        ("procs / clone_into", "right"),
        ("95% bootstrap", "right"),
        (f"per segment ({args.segments})", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_row(
        'nsfast.run(["/bin/true"])',
        f"{res.ratio:.3f}x",
        f"[{res.ratio_low:.3f}, {res.ratio_high:.3f}]",
        _range(res.segment_ratios),
    )
    table.add_row(
        "[dim]control: nsfast.run(cgroup=False), same workers[/dim]", f"[dim]{res.nocg_ratio:.3f}x[/dim]", "", ""
    )
    table.add_row(
        "nsfast.run, each mode / its cgroup=False",
        f"{res.normalized_ratio:.3f}x",
        f"[{res.normalized_low:.3f}, {res.normalized_high:.3f}]",
        _range(res.normalized_segment_ratios),
    )
    if res.rust_ratio is not None and res.rust_ratio_low is not None and res.rust_ratio_high is not None:
        table.add_row(
            "spawn_loop N default (median of chunk medians)",
            f"{res.rust_ratio:.3f}x",
            f"[{res.rust_ratio_low:.3f}, {res.rust_ratio_high:.3f}]",
            _range(res.rust_segment_ratios),
        )
    console.print(table)
    console.print(
        "  cgroup overhead, as a fraction of the same worker's cgroup=False median: "
        + ", ".join(f"{m} {res.overhead_fraction[m]:+.1%}" for m in MODES),
        highlight=False,
    )
    for m in MODES:
        console.print(f"  strace {m}: {res.strace[m]}", highlight=False, markup=False)
    ok = "[green]yes[/green]" if res.failures == 0 else f"[red]NO ({res.failures} failed)[/red]"
    console.print(f"  all samples exited 0: {ok}")


def markdown_vm(res: VmResult, env: Dict[str, Any]) -> str:
    lines = [
        "| in the v2 VM, median spawn latency | procs / clone_into | 95% bootstrap | per segment |",
        "|---|---:|---:|---:|",
        f'| `nsfast.run(["/bin/true"])` (n = {res.n_per_mode["clone_into"]} per mode) | {res.ratio:.3f}x | '
        f"[{res.ratio_low:.3f}, {res.ratio_high:.3f}] | {_range(res.segment_ratios)} |",
        f"| control: `nsfast.run(cgroup=False)`, same workers | {res.nocg_ratio:.3f}x | | |",
        f"| `nsfast.run`, each mode divided by its `cgroup=False` | {res.normalized_ratio:.3f}x | "
        f"[{res.normalized_low:.3f}, {res.normalized_high:.3f}] | {_range(res.normalized_segment_ratios)} |",
    ]
    if res.rust_ratio is not None and res.rust_ratio_low is not None and res.rust_ratio_high is not None:
        lines.append(
            f"| `spawn_loop N default` ({res.rust_chunks_per_mode} chunks per mode) | {res.rust_ratio:.3f}x | "
            f"[{res.rust_ratio_low:.3f}, {res.rust_ratio_high:.3f}] | {_range(res.rust_segment_ratios)} |"
        )
    lines.append("")
    lines.append(
        "cgroup overhead vs cgroup=False: "
        + ", ".join(f"{m} {res.overhead_fraction[m]:+.1%}" for m in MODES)
        + f"; {env['date']}, VM kernel {env['kernel'].split()[1]} (TCG)"
    )
    return "\n".join(lines)


def run_vm(args: argparse.Namespace, passthrough: List[str]) -> int:
    """--vm: boot the VM with the --in-vm part, stream its output, keep its JSON."""
    if not RUN_VM.exists():
        print(f"{RUN_VM} is missing", file=sys.stderr)
        return 2
    cmd = [
        str(RUN_VM),
        "--timeout",
        str(args.vm_timeout),
        "--",
        sys.executable,
        str(Path(__file__).resolve()),
        "--in-vm",
        "--json-stdout",
        *passthrough,
    ]
    print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    payload = None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(JSON_MARK):
            payload = json.loads(line[len(JSON_MARK) :])
        else:
            sys.stdout.write(line)
            sys.stdout.flush()
    rc = proc.wait()
    if rc == 125:
        print(
            "run-vm.sh exit 125: the VM itself failed (see above); tests/vm may still be under construction, "
            "retry later",
            file=sys.stderr,
        )
    if args.json and payload is not None:
        payload["host_command"] = shlex.join(cmd)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return rc


# -- host reporting -----------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    name: str
    command: str
    n: int
    failures: int
    median_ms: Optional[float]
    p90_ms: Optional[float]
    chunks: int = 0
    samples_ms: List[float] = field(default_factory=list)
    chunk_medians_ms: List[float] = field(default_factory=list)


def print_host(
    rows: List[Row],
    diffs: List[Diff],
    env: Dict[str, Any],
    notes: List[str],
    skipped: List[str],
    args: argparse.Namespace,
) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = rich_header(
        "Cost of the per-sandbox cgroup per spawn of /bin/true",
        env,
        f"{args.runs} rounds x {args.block} sample(s) per variant, warm-up {args.warmup}; "
        f"spawn_loop {args.rust_runs} per mode in {args.rust_chunks} chunks; then {args.isolated_runs} "
        f"rounds of isolated samples, {args.gap_ms:g} ms apart",
    )
    t = Table(show_edge=False)
    for col, just in (("variant", "left"), ("n", "right"), ("median ms", "right"), ("p90 ms", "right"), ("ok", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        ok = "[green]yes[/green]" if r.failures == 0 and r.n else f"[red]NO ({r.failures}/{r.n})[/red]"
        t.add_row(
            r.name + (f" [dim]({r.chunks} chunks)[/dim]" if r.chunks else ""),
            str(r.n),
            fmt_ms(r.median_ms),
            fmt_ms(r.p90_ms),
            ok,
        )
    console.print(t)
    d = Table(show_edge=False, title="difference per spawn (ms)", title_justify="left")
    for col, just in (
        ("what", "left"),
        ("Δ median", "right"),
        ("95% bootstrap", "right"),
        ("per segment / chunk pair", "right"),
        (f"< {TARGET_MS} ms", "left"),
    ):
        d.add_column(col, justify=just)  # type: ignore[arg-type]
    for x in diffs:
        v = x.verdict()
        color = ("green" if x.ok else "red") if x.conclusive else "yellow"
        d.add_row(
            x.what,
            fmt_signed_ms(x.delta_ms),
            f"[{fmt_signed_ms(x.low_ms)}, {fmt_signed_ms(x.high_ms)}]" if x.low_ms is not None else "",
            f"{min(x.segments_ms):+.3f}..{max(x.segments_ms):+.3f}" if x.segments_ms else "",
            f"[{color}]{v}[/{color}]" if v else "",
        )
    console.print(d)
    console.print("[bold]Commands[/bold] (one sample each):")
    for r in rows:
        console.print(f"  {r.name}: {r.command}", highlight=False, markup=False)
    for n in notes:
        console.print(f"  [dim]{escape(n)}[/dim]", highlight=False)
    for s in skipped:
        console.print(f"  [yellow]skipped:[/yellow] {escape(s)}", highlight=False)


def markdown_host(rows: List[Row], diffs: List[Diff], env: Dict[str, Any]) -> str:
    lines = ["| variant | median ms | p90 ms | ok |", "|---|---:|---:|---|"]
    for r in rows:
        ok = "yes" if r.failures == 0 and r.n else f"NO ({r.failures}/{r.n})"
        lines.append(
            f"| `{r.name}`{f' ({r.chunks} chunks)' if r.chunks else ''} | {fmt_ms(r.median_ms)} | "
            f"{fmt_ms(r.p90_ms)} | {ok} |"
        )
    lines += [
        "",
        "| difference per spawn | Δ median ms | 95% bootstrap | per segment / chunk pair | target |",
        "|---|---:|---:|---:|---|",
    ]
    for x in diffs:
        ci = f"[{fmt_signed_ms(x.low_ms)}, {fmt_signed_ms(x.high_ms)}]" if x.low_ms is not None else ""
        seg = f"{min(x.segments_ms):+.3f}..{max(x.segments_ms):+.3f}" if x.segments_ms else ""
        tgt = f"< {TARGET_MS} ms: **{x.verdict()}**" if x.target else ""
        lines.append(f"| {x.what} | {fmt_signed_ms(x.delta_ms)} | {ci} | {seg} | {tgt} |")
    lines.append("")
    lines.append(
        f"{env['date']}, {env['kernel'].split()[1]}, {env['cpu']}, {env['python']}; load "
        f"{' '.join(env['loadavg_start'])}; `{env['command']}`"
    )
    return "\n".join(lines)


def host(args: argparse.Namespace) -> int:
    import nsfast

    env = environment([sys.executable, *sys.argv])
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    backend, notes = check_cgroups()
    env["cgroup_backend"] = backend
    stale = stale_note(Path(nsfast._core.__file__), "make build")
    if stale:
        notes.append(stale)
    variants = python_variants([k for k in ("nocg", "cg", "limits") if k not in skip])
    if not any(v.key == "nocg" for v in variants):
        print("the cgroup=False reference (nocg) cannot be skipped", file=sys.stderr)
        return 2
    skipped: List[str] = []
    rust: List[RustMode] = []
    if "rust" not in skip:
        try:
            rust = [RustMode(args.spawn_loop, cgroup=False), RustMode(args.spawn_loop, cgroup=True)]
            for r in rust:
                r.start({})
        except Skip as e:
            skipped.append(f"spawn_loop: {e}")
            rust = []
    rust_sizes = split(args.rust_runs, args.rust_chunks)
    rust_batches = measure_host(variants, rust, args.runs, args.block, args.warmup, rust_sizes)
    isolated: List[Variant] = []
    if args.isolated_runs:
        isolated = python_variants([v.key for v in variants])
        for v in isolated:
            v.key, v.name = "iso-" + v.key, v.name + f", {args.gap_ms:g} ms apart"
        measure_isolated(isolated, args.isolated_runs, args.gap_ms / 1e3)
    env["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]

    rows: List[Row] = []
    for v in variants + isolated:
        s = sorted(v.samples)
        rows.append(
            Row(
                v.key,
                v.name,
                v.command,
                len(v.samples),
                v.failures,
                quantile(s, 0.5) * 1e3,
                quantile(s, 0.9) * 1e3,
                samples_ms=[round(x * 1e3, 4) for x in v.samples],
            )
        )
    for r in rust:
        bs = rust_batches[r.key]
        meds = [b.median_s for b in bs if b.median_s is not None]
        p90s = [b.p90_s for b in bs if b.p90_s is not None]
        rows.append(
            Row(
                r.key,
                r.name,
                r.command,
                sum(b.n for b in bs),
                sum(b.failures for b in bs),
                median(meds) * 1e3 if meds else None,
                median(p90s) * 1e3 if p90s else None,
                chunks=len(meds),
                chunk_medians_ms=[m * 1e3 for m in meds],
            )
        )
        if r.cgroup and r.reported_cgroup is False:
            notes.append("spawn_loop reported cgroup: false (not root?): its two modes are the same")

    by = {v.key: [list(v.samples[i : i + args.block]) for i in range(0, len(v.samples), args.block)] for v in variants}
    diffs: List[Diff] = []
    for key, ref, what, tgt in (
        ("cg", "nocg", "cgroup - cgroup=False", True),
        ("limits", "nocg", "cgroup+limits - cgroup=False", True),
        ("limits", "cg", "cgroup+limits - cgroup (the limits alone)", False),
    ):
        if key in by and ref in by:
            x = diff_of_rounds(by[ref], by[key], what, args.segments, args.bootstrap)
            x.basis = f"{len(by[key])} rounds, {args.segments} segments"
            if tgt:
                x.judge()
            diffs.append(x)
    if rust:
        x = chunk_diff(
            rust_batches["rust-cg"], rust_batches["rust-nocg"], "spawn_loop - spawn_loop --no-cgroup", args.bootstrap
        )
        x.judge()
        diffs.append(x)
    iso = {v.key: [[x] for x in v.samples] for v in isolated}
    for key, what in (
        ("iso-cg", "isolated: cgroup - cgroup=False"),
        ("iso-limits", "isolated: cgroup+limits - cgroup=False"),
    ):
        if key in iso and "iso-nocg" in iso:
            x = diff_of_rounds(iso["iso-nocg"], iso[key], what, args.segments, args.bootstrap)
            x.basis = f"{len(iso[key])} rounds, {args.gap_ms:g} ms apart"
            x.judge()
            diffs.append(x)

    print_host(rows, diffs, env, notes, skipped, args)
    if args.markdown:
        print()
        print(markdown_host(rows, diffs, env))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "settings": {
                        k: getattr(args, k)
                        for k in (
                            "runs",
                            "block",
                            "warmup",
                            "segments",
                            "bootstrap",
                            "rust_runs",
                            "rust_chunks",
                            "isolated_runs",
                            "gap_ms",
                            "skip",
                        )
                    },
                    "notes": notes,
                    "skipped": skipped,
                    "differences": [asdict(d) for d in diffs],
                    "results": [asdict(r) for r in rows],
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(r.failures == 0 for r in rows) else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=200, help="rounds, i.e. samples per variant / --block (default 200)")
    p.add_argument("--quick", action="store_true", help="60 rounds, fewer spawn_loop and VM samples")
    p.add_argument(
        "--block", type=int, default=1, help="samples per variant per round (default 1: alternate every sample)"
    )
    p.add_argument("--warmup", type=int, default=10, help="unrecorded runs per variant first (default 10)")
    p.add_argument(
        "--segments", type=int, default=5, help="consecutive parts the difference is also computed in (default 5)"
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--rust-runs", type=int, default=500, help="spawn_loop samples per mode (default 500)")
    p.add_argument("--rust-chunks", type=int, default=10, help="spawn_loop processes per mode (default 10)")
    p.add_argument(
        "--isolated-runs",
        type=int,
        default=60,
        help="rounds of isolated samples, --gap-ms apart, after the main ones (default 60; 0: none)",
    )
    p.add_argument("--gap-ms", type=float, default=50.0, help="untimed pause before each isolated sample (default 50)")
    p.add_argument("--skip", default="", help="comma list: cg,limits,rust")
    p.add_argument("--spawn-loop", type=Path, default=SPAWN_LOOP, help="the spawn_loop binary (built if missing)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    vm = p.add_argument_group("VM part")
    vm.add_argument("--vm", action="store_true", help="run the cgroup v2 attach comparison in tests/vm's VM")
    vm.add_argument("--in-vm", action="store_true", help="the part --vm runs inside the VM")
    vm.add_argument("--vm-runs", type=int, default=200, help="nsfast.run samples per mode (default 200)")
    vm.add_argument("--vm-batch", type=int, default=5, help="samples per mode per turn (default 5)")
    vm.add_argument(
        "--rust-vm-runs", type=int, default=200, help="spawn_loop samples per mode, one chunk per turn (default 200)"
    )
    vm.add_argument("--vm-timeout", type=int, default=1800, help="run-vm.sh --timeout (default 1800 s)")
    p.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--attach-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 60
        args.warmup = min(args.warmup, 5)
        args.rust_runs, args.rust_chunks = 200, 6
        args.isolated_runs = min(args.isolated_runs, 20)
        args.vm_runs, args.rust_vm_runs = 60, 60
    if args.isolated_runs < 0 or args.gap_ms < 0:
        p.error("--isolated-runs and --gap-ms must not be negative")
    if (
        min(
            args.runs,
            args.block,
            args.warmup,
            args.segments,
            args.bootstrap,
            args.rust_runs,
            args.rust_chunks,
            args.vm_runs,
            args.vm_batch,
            args.rust_vm_runs,
        )
        < 1
    ):
        p.error("counts must be positive")
    if args.attach_worker:
        attach_worker(args.warmup)
        return 0
    if args.in_vm:
        return in_vm(args)
    if args.vm:
        passthrough = [
            f"--vm-runs={args.vm_runs}",
            f"--vm-batch={args.vm_batch}",
            f"--rust-vm-runs={args.rust_vm_runs}",
            f"--warmup={min(args.warmup, 5)}",
            f"--segments={args.segments}",
            f"--bootstrap={args.bootstrap}",
        ]
        if args.markdown:
            passthrough.append("--markdown")
        if "rust" in args.skip:
            passthrough.append("--skip=rust")
        return run_vm(args, passthrough)
    return host(args)


if __name__ == "__main__":
    sys.exit(main())
