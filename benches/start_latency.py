#!/usr/bin/env python3
"""Start latency of a sandboxed `/bin/true`: nsfast against other tools, in the same run.

Reproduce (from the repository root, as root, after `make build`; `make bench` runs the first):

    .venv/bin/python benches/start_latency.py                   # 200 samples per tool
    .venv/bin/python benches/start_latency.py --quick           # 50 samples per tool
    .venv/bin/python benches/start_latency.py --runs 500 --json out.json --markdown

One sample is the wall time of starting `/bin/true` in a sandbox and waiting for it to exit,
with stdio inherited:

    nsfast.run        nsfast.run(["/bin/true"]) with the default isolation
    nsfast.run(cgroup=False)   the same without the per-sandbox cgroup
    spawn_loop        target/release/examples/spawn_loop: the same spawn from Rust, no Python,
                      with the same per-sandbox cgroup; built with cargo if missing
    unshare           subprocess.run(["unshare", "-pfimun", "--mount-proc", "/bin/true"])
                      (without --mount-proc if that fails; the table shows which ran)
    bwrap             subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/",
                                      "--proc", "/proc", "--dev", "/dev", "/bin/true"])
    crun              subprocess.run(["crun", "run", "--bundle", B, ID]) -- see below
    subprocess.run    subprocess.run(["/bin/true"]): no sandbox, the floor

Method:
  * Every tool is warmed up, then the tools take turns in rounds of --batch samples each, the
    order rotating every round, so machine noise (other builds, net-namespace teardown in
    kernel workers) hits all of them alike. The garbage collector is off inside a batch (as in
    `timeit`).
  * Python-driven tools are timed with time.perf_counter_ns() around the one call.
  * spawn_loop times itself (plan + spawn + wait per sample) and prints only its median and
    p90, so it runs as --chunks separate processes spread over the rounds; its row shows the
    median of the chunk medians and of the chunk p90s.
  * crun 1.8 refuses this kind of host's hybrid cgroup layout, so it runs inside one
    long-lived worker, `unshare -m` with /sys/fs/cgroup/unified unmounted (private to that
    mount namespace), which this script feeds batch requests over a pipe; the worker times
    each subprocess.run(["crun", "run", ...]) exactly as above and sends the raw samples back.
    The OCI bundle is `crun spec` with args ["/bin/true"], terminal false, default namespaces,
    and a rootfs of the host's /usr bound read-only (plus its /bin, /lib... symlinks), so
    crun runs the very same /bin/true as the others.
  * Quantiles are nearest-rank, sorted[round((n - 1) * q)], as in spawn_loop.rs.
  * "ok" means every sample's command exited 0. The namespace column is measured: a probe
    run of each tool lists /proc/self/ns and is compared with this process's namespaces.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple, Type

if TYPE_CHECKING:
    from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
SPAWN_LOOP = ROOT / "target" / "release" / "examples" / "spawn_loop"
TRUE = ["/bin/true"]
# Prints "TYPE ns:[INODE]" per namespace of the process it runs in.
NS_PROBE = ["/bin/sh", "-c", 'for n in /proc/self/ns/*; do echo "${n##*/} $(readlink "$n")"; done']
NS_ORDER = ("user", "mnt", "pid", "uts", "ipc", "net", "cgroup", "time")
UNSHARE_TRIES = (["unshare", "-pfimun", "--mount-proc"], ["unshare", "-pfimun"])
BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
# Run in the crun worker's `unshare -m`: drop the cgroup2 half of a hybrid layout, then exec.
CRUN_SHELL = 'if mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi; exec "$@"'
WORKER_TIMEOUT_S = 300.0


class Skip(Exception):
    """A tool cannot be measured here; the message says why."""


# -- statistics ---------------------------------------------------------------------------------


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (the definition spawn_loop.rs uses)."""
    return sorted_values[round((len(sorted_values) - 1) * q)]


def median(values: Sequence[float]) -> float:
    return quantile(sorted(values), 0.5)


# -- namespaces ---------------------------------------------------------------------------------


def ns_inodes(pid: Any) -> Dict[str, str]:
    """The namespaces of /proc/PID (an int or "self"), as "TYPE:[INODE]" by type."""
    return {n: os.readlink(f"/proc/{pid}/ns/{n}") for n in NS_ORDER if os.path.exists(f"/proc/{pid}/ns/{n}")}


def own_namespaces() -> Dict[str, str]:
    return ns_inodes("self")


def new_namespaces(probe_output: str, host: Dict[str, str]) -> str:
    """Comma list of the namespaces NS_PROBE's output shows as different from `host`."""
    seen = dict(line.split(" ", 1) for line in probe_output.splitlines() if " " in line)
    new = [n for n in NS_ORDER if n in seen and n in host and seen[n] != host[n]]
    return ",".join(new) if new else "none"


# -- tools --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """What one batch of one tool returned: raw samples, or only a summary (spawn_loop)."""

    n: int
    failures: int
    samples_s: List[float] = field(default_factory=list)
    median_s: Optional[float] = None
    p90_s: Optional[float] = None


def stale_note(built: Path, rebuild: str) -> str:
    """A warning if `built` is older than the Rust sources it is built from, else ""."""
    sources = list((ROOT / "rust").rglob("*.rs"))
    if sources and max(p.stat().st_mtime for p in sources) > built.stat().st_mtime:
        return f"{built.name} is older than rust/ sources (rebuild: {rebuild})"
    return ""


class Tool(ABC):
    """One way of starting /bin/true in a sandbox."""

    key: str  # for --skip
    name: str  # table row
    command: str = ""  # what one sample runs, for the listing under the table
    namespaces: str = "?"
    note: str = ""

    def start(self, host_ns: Dict[str, str]) -> None:
        """Check that the tool works here and probe its namespaces; raise Skip if it cannot run."""

    @abstractmethod
    def batch(self, n: int) -> Batch:
        """Take n samples."""

    def close(self) -> None:
        """Release what start() set up."""


def timed_calls(call: Callable[[], int], n: int, gap_s: float = 0.0) -> Batch:
    """n samples of `call` (which returns an exit status), timed one by one, GC off; with
    gap_s > 0, an untimed sleep of gap_s before every sample (so each one is an isolated
    call, not one of a back-to-back series)."""
    samples: List[float] = []
    failures = 0
    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            if gap_s > 0:
                time.sleep(gap_s)
            t0 = time.perf_counter_ns()
            try:
                rc = call()
            except OSError:
                rc = -1
            samples.append((time.perf_counter_ns() - t0) / 1e9)
            failures += rc != 0
    finally:
        gc.enable()
    return Batch(n=n, failures=failures, samples_s=samples)


class NsfastRun(Tool):
    """nsfast.run(["/bin/true"], **options); no options = the default Spec()."""

    def __init__(self, key: str, options: Dict[str, Any]) -> None:
        self.key, self.options = key, options
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
        self.name = f"nsfast.run({shown})" if shown else "nsfast.run"
        self.command = f'nsfast.run(["/bin/true"]{", " + shown if shown else ""})' + ("" if shown else "  # default Spec()")

    def start(self, host_ns: Dict[str, str]) -> None:
        import nsfast

        try:
            probe = nsfast.run(NS_PROBE, capture_output=True, text=True, timeout=30, **self.options)
        except (OSError, TypeError, ValueError) as e:
            raise Skip(f"nsfast.run failed: {e}") from None
        if probe.returncode != 0:
            raise Skip(f"probe exited {probe.returncode}: {probe.stderr.strip()}")
        self.namespaces = new_namespaces(probe.stdout, host_ns)
        self.note = stale_note(Path(nsfast._core.__file__), "make build")

    def batch(self, n: int) -> Batch:
        import nsfast

        run, options = nsfast.run, self.options
        return timed_calls(lambda: run(TRUE, **options).returncode, n)


class SubprocessTool(Tool):
    """subprocess.run(prefix + ["/bin/true"]); the first prefix that works is used."""

    def __init__(self, key: str, name: str, prefixes: Sequence[List[str]]) -> None:
        self.key, self.name = key, name
        self.prefixes = prefixes
        self.argv: List[str] = []

    def start(self, host_ns: Dict[str, str]) -> None:
        tool = self.prefixes[0][0] if self.prefixes[0] else None
        if tool and shutil.which(tool) is None:
            raise Skip(f"{tool} is not installed")
        errors = []
        for prefix in self.prefixes:
            try:
                check = subprocess.run(prefix + TRUE, capture_output=True, text=True, timeout=30)
                probe = subprocess.run(prefix + NS_PROBE, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as e:
                errors.append(f"{shlex.join(prefix + TRUE)}: {e}")
                continue
            if check.returncode == 0 and probe.returncode == 0:
                self.argv = prefix + TRUE
                self.namespaces = new_namespaces(probe.stdout, host_ns)
                break
            bad = check if check.returncode else probe
            errors.append(f"{shlex.join(bad.args)} exited {bad.returncode}: {bad.stderr.strip()}")
        else:
            raise Skip("; ".join(errors))
        if errors:
            self.note = "fallback, because " + "; ".join(errors)
        self.command = f"subprocess.run({self.argv!r})"
        if len(self.prefixes) > 1:  # name the variant that ran
            self.name = shlex.join(prefix)

    def batch(self, n: int) -> Batch:
        argv = self.argv
        return timed_calls(lambda: subprocess.run(argv).returncode, n)


class SpawnLoop(Tool):
    """The Rust baseline: each batch is one `spawn_loop N` process reporting median/p90."""

    key, name = "rust", "spawn_loop (Rust)"

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def start(self, host_ns: Dict[str, str]) -> None:
        import nsfast

        if not self.binary.exists():
            build = ["cargo", "build", "--release", "--example", "spawn_loop"]
            env = dict(os.environ, PATH=f"{Path.home() / '.cargo' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
            print(f"building {self.binary.name}: {shlex.join(build)}", file=sys.stderr)
            try:
                r = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True)
            except OSError as e:
                raise Skip(f"cannot build spawn_loop: {e}") from None
            if r.returncode != 0 or not self.binary.exists():
                raise Skip(f"cargo build failed: {r.stderr.strip()[-500:]}")
        notes = ["namespaces not probed: those of Spec::new(), like nsfast.run's",
                 stale_note(self.binary, "cargo build --release --example spawn_loop")]
        self.note = "; ".join(n for n in notes if n)
        self.command = f"{self.binary.relative_to(ROOT) if self.binary.is_relative_to(ROOT) else self.binary} N"
        self.namespaces = ",".join(n for n in NS_ORDER if n in nsfast.DEFAULT_NAMESPACES)
        first = self.batch(3)
        if first.failures:
            raise Skip(self._error or "spawn_loop failed")

    _error = ""
    reported_cgroup: Optional[bool] = None  # whether the last batch said it used a cgroup

    def argv(self, n: int) -> List[str]:
        return [str(self.binary), str(n)]

    def batch(self, n: int) -> Batch:
        r = subprocess.run(self.argv(n), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        if r.returncode != 0:
            self._error = f"spawn_loop exited {r.returncode}: {r.stderr.strip()[-500:]}"
            return Batch(n=n, failures=n)
        out = json.loads(r.stdout)
        self.reported_cgroup = bool(out.get("cgroup"))
        return Batch(n=int(out["n"]), failures=0, median_s=out["median_us"] / 1e6, p90_s=out["p90_us"] / 1e6)


# -- long-lived workers fed over a pipe (one request line in, one JSON line out) ----------------


def worker_pipes(devnull_flags: int = os.O_RDONLY) -> Tuple[TextIO, Callable[[Dict[str, Any]], None], int]:
    """In a worker: its requests (the stdin pipe), a function that sends one JSON reply line
    (on the stdout pipe), and a /dev/null fd opened with devnull_flags. fd 0 becomes that
    /dev/null and fd 1 our stderr, so what the worker runs never touches the protocol pipes."""
    requests: TextIO = os.fdopen(os.dup(0), "r")
    replies: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, devnull_flags)
    os.dup2(devnull, 0)
    os.dup2(2, 1)

    def reply(obj: Dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")

    return requests, reply, devnull


def receive_json(proc: subprocess.Popen[str], what: str, timeout_s: float = WORKER_TIMEOUT_S,
                 error: Type[Exception] = RuntimeError) -> Dict[str, Any]:
    """The next JSON line from a worker's stdout; error("WHAT timed out|died (exit status N)")
    if none comes within timeout_s."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise error(f"{what} {'timed out' if not ready else 'died'} (exit status {proc.poll()})")
    reply: Dict[str, Any] = json.loads(line)
    return reply


def close_worker(proc: subprocess.Popen[str], timeout_s: float = 30) -> None:
    """Close a worker's stdin (its EOF), wait for it to exit (killed after timeout_s), close its stdout."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- crun ---------------------------------------------------------------------------------------


def _oci_bundle(spec: Dict[str, Any], rootfs: Path, args: List[str], directory: Path) -> Path:
    """A bundle dir whose config.json is `spec` running `args` on `rootfs`."""
    config = json.loads(json.dumps(spec))
    config["process"]["args"] = args
    config["process"]["terminal"] = False
    config["root"] = {"path": str(rootfs), "readonly": True}
    for top in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / top
        if host.is_dir() and not host.is_symlink():
            config["mounts"].append({"destination": f"/{top}", "type": "bind", "source": str(host),
                                     "options": ["rbind", "ro", "nosuid", "nodev"]})
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


class Crun(Tool):
    """`crun run` timed inside one long-lived `unshare -m` worker (this script, --crun-worker)."""

    key, name = "crun", "crun run"

    def __init__(self) -> None:
        self._tmp: Optional[tempfile.TemporaryDirectory[str]] = None
        self._worker: Optional[subprocess.Popen[str]] = None

    def start(self, host_ns: Dict[str, str]) -> None:
        spec, rootfs, tmp = self._prepare("nsfast-bench-crun-")
        bundle = _oci_bundle(spec, rootfs, TRUE, tmp / "true")
        probe = _oci_bundle(spec, rootfs, NS_PROBE, tmp / "probe")
        self.command = (f"subprocess.run(['crun', 'run', '--bundle', {str(bundle)!r}, ID]) in "
                        f"`unshare -m` without /sys/fs/cgroup/unified")
        hello = self._start_worker(Path(__file__), ["--crun-worker", str(bundle), str(probe)])
        self.namespaces = new_namespaces(hello["ns_probe"], host_ns)
        self.note = "cgroupfs v1 manager; its cgroup create/remove is part of each sample"

    def _prepare(self, prefix: str) -> Tuple[Dict[str, Any], Path, Path]:
        """Skip unless crun is installed; else a temporary directory (removed by close()) with
        `crun spec`'s config and an empty rootfs with the host's /bin, /lib... symlinks, for
        _oci_bundle: (spec, rootfs, directory)."""
        if shutil.which("crun") is None:
            raise Skip("crun is not installed")
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        tmp = Path(self._tmp.name)
        r = subprocess.run(["crun", "spec", "--bundle", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise Skip(f"crun spec failed: {r.stderr.strip()}")
        spec = json.loads((tmp / "config.json").read_text())
        rootfs = tmp / "rootfs"
        (rootfs / "usr").mkdir(parents=True)
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            if (Path("/") / top).is_symlink():  # merged /usr: bin -> usr/bin, ...
                (rootfs / top).symlink_to(os.readlink(Path("/") / top))
        return spec, rootfs, tmp

    def _start_worker(self, script: Path, worker_args: List[str]) -> Dict[str, Any]:
        """Start `script worker_args...` as the worker in `unshare -m` without
        /sys/fs/cgroup/unified; its hello, or Skip with the error it reports."""
        worker = ["unshare", "-m", "sh", "-c", CRUN_SHELL, "sh", sys.executable, str(script.resolve()), *worker_args]
        self._worker = subprocess.Popen(worker, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        hello = self._receive()
        if "error" in hello:
            raise Skip(hello["error"])
        return hello

    def _receive(self) -> Dict[str, Any]:
        assert self._worker is not None
        return receive_json(self._worker, "crun worker", error=Skip)

    def _request(self, n: int, line: str) -> Batch:
        """Send the worker one request line (for n samples); its samples."""
        assert self._worker is not None and self._worker.stdin is not None
        self._worker.stdin.write(line)
        reply = self._receive()
        return Batch(n=n, failures=reply["failures"], samples_s=[s / 1e9 for s in reply["samples_ns"]])

    def batch(self, n: int) -> Batch:
        return self._request(n, f"{n}\n")

    def close(self) -> None:
        if self._worker is not None:
            close_worker(self._worker)
        if self._tmp is not None:
            self._tmp.cleanup()


def crun_worker(bundle: str, probe_bundle: str) -> None:
    """--crun-worker: probe, then for each line "N" on stdin time N `crun run`s and reply
    with one JSON line. crun and its containers get /dev/null as stdin and our stderr as
    stdout, never the protocol pipes."""
    requests, reply, _ = worker_pipes()
    prefix = f"nsfast-bench-{os.getpid()}-"
    count = 0

    def next_id() -> str:
        nonlocal count
        count += 1
        return f"{prefix}{count}"

    try:
        probe = subprocess.run(["crun", "run", "--bundle", probe_bundle, next_id()], capture_output=True,
                               text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        reply({"error": f"crun run failed: {e}"})
        return
    if probe.returncode != 0:
        reply({"error": f"crun run exited {probe.returncode}: {probe.stderr.strip()}"})
        return
    reply({"ready": True, "ns_probe": probe.stdout})
    for line in requests:
        argvs = [["crun", "run", "--bundle", bundle, next_id()] for _ in range(int(line))]
        it = iter(argvs)
        result = timed_calls(lambda: subprocess.run(next(it)).returncode, len(argvs))
        if result.failures:  # a failed run may leave its state behind
            for argv in argvs:
                subprocess.run(["crun", "delete", "-f", argv[-1]], stderr=subprocess.DEVNULL)
        reply({"samples_ns": [round(s * 1e9) for s in result.samples_s], "failures": result.failures})


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Row:
    """Everything measured for one tool."""

    key: str
    tool: str
    command: str
    namespaces: str
    n: int = 0
    failures: int = 0
    median_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    vs_nsfast: Optional[float] = None  # median / nsfast.run's median
    chunks: int = 0
    note: str = ""
    skipped: str = ""
    samples_ms: List[float] = field(default_factory=list)  # in the order taken
    chunk_medians_ms: List[float] = field(default_factory=list)  # spawn_loop only
    chunk_p90s_ms: List[float] = field(default_factory=list)


class Collector:
    """Accumulates one tool's batches."""

    def __init__(self, tool: Tool) -> None:
        self.tool = tool
        self.samples: List[float] = []
        self.chunk_medians: List[float] = []
        self.chunk_p90s: List[float] = []
        self.n = 0
        self.failures = 0

    def add(self, b: Batch) -> None:
        self.n += b.n
        self.failures += b.failures
        self.samples += b.samples_s
        if b.median_s is not None and b.p90_s is not None:
            self.chunk_medians.append(b.median_s)
            self.chunk_p90s.append(b.p90_s)

    def row(self) -> Row:
        t = self.tool
        row = Row(t.key, t.name, t.command, t.namespaces, self.n, self.failures, note=t.note,
                  samples_ms=[round(x * 1e3, 4) for x in self.samples],
                  chunk_medians_ms=[x * 1e3 for x in self.chunk_medians], chunk_p90s_ms=[x * 1e3 for x in self.chunk_p90s])
        if self.samples:
            s = sorted(self.samples)
            row.median_ms, row.p90_ms = quantile(s, 0.5) * 1e3, quantile(s, 0.9) * 1e3
        elif self.chunk_medians:
            row.median_ms, row.p90_ms = median(self.chunk_medians) * 1e3, median(self.chunk_p90s) * 1e3
            row.chunks = len(self.chunk_medians)
        return row


def split(total: int, parts: int) -> List[int]:
    """`total` as `parts` near-equal positive sizes."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


def measure(tools: List[Tool], runs: int, batch: int, chunks: int, warmup: int) -> List[Collector]:
    from rich.progress import Progress

    for t in tools:
        t.batch(warmup)
    collectors = [Collector(t) for t in tools]
    rounds = math.ceil(runs / batch)
    chunk_sizes = split(runs, chunks)
    # Round in which chunk i of the summarized tools runs: spread evenly over the rounds.
    chunk_at = {min(rounds - 1, (2 * i + 1) * rounds // (2 * len(chunk_sizes))): size
                for i, size in enumerate(chunk_sizes)}
    if len(chunk_at) < len(chunk_sizes):  # fewer rounds than chunks: one chunk per round
        chunk_at = dict(enumerate(split(runs, rounds)))
    # No auto-refresh: a refresh thread would compete with the timed calls for the GIL.
    with Progress(auto_refresh=False, transient=True) as progress:
        task = progress.add_task("measuring", total=rounds)
        for r in range(rounds):
            k = min(batch, runs - r * batch)
            order = collectors[r % len(collectors):] + collectors[:r % len(collectors)]
            for c in order:
                if isinstance(c.tool, SpawnLoop):
                    if r in chunk_at:
                        c.add(c.tool.batch(chunk_at[r]))
                else:
                    c.add(c.tool.batch(k))
            progress.update(task, advance=1)
            progress.refresh()
    return collectors


# -- reporting ----------------------------------------------------------------------------------


def _first_line(argv: List[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def machine() -> Dict[str, str]:
    """date (now), kernel, cpu and python: the head of every script's environment record."""
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "kernel": f"{platform.system()} {os.uname().release} {os.uname().version}",
        "cpu": f"{cpu} x {os.cpu_count()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def environment(argv: List[str]) -> Dict[str, Any]:
    import nsfast

    return {
        **machine(),
        "nsfast": f"{nsfast.__version__} ({Path(nsfast.__file__).parent}), git {_first_line(['git', '-C', str(ROOT), 'describe', '--always', '--dirty'])}",
        "tools": {t: _first_line([t, "--version"]) for t in ("unshare", "bwrap", "crun")},
        "command": shlex.join(argv),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def ratio_text(r: Optional[float]) -> str:
    if r is None:
        return ""
    if abs(r - 1) < 0.005:
        return "1.00x"
    return f"{r:.2f}x slower" if r > 1 else f"{1 / r:.2f}x faster"


def ok_text(row: Row) -> str:
    return "yes" if row.failures == 0 and row.n else f"NO ({row.failures}/{row.n} failed)"


def finish_rows(collectors: List[Collector], skipped: List[Row]) -> List[Row]:
    rows = [c.row() for c in collectors]
    ref = next((r.median_ms for r in rows if r.key == "nsfast"), None)
    for r in rows:
        if ref and r.median_ms is not None:
            r.vs_nsfast = r.median_ms / ref
    return rows + skipped


def rich_header(title: str, env: Mapping[str, Any], settings: Optional[str],
                keys: Sequence[str] = ("kernel", "cpu", "python", "nsfast", "command")) -> Console:
    """A rich Console (140 columns unless on a terminal) that has printed the title with the
    date, the environment's `keys`, and unless settings is None a line with the load at start
    and end, then `settings`."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(f"[bold]{title}[/bold] — {env['date']}")
    for k in keys:
        console.print(f"  {k:8} {env[k]}", highlight=False, markup=False)
    if settings is not None:
        console.print(f"  {'load':8} {' '.join(env['loadavg_start'])} at start, {' '.join(env['loadavg_end'])} at end"
                      f"; {settings}", highlight=False)
    return console


def print_rich(rows: List[Row], env: Dict[str, Any], args: argparse.Namespace) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = rich_header("Start latency of /bin/true in a sandbox", env,
                          f"{args.runs} samples per tool, batches of {args.batch}, warm-up {args.warmup}")
    table = Table(show_edge=False)
    table.add_column("tool")
    table.add_column("new namespaces")
    table.add_column("n", justify="right")
    table.add_column("median ms", justify="right")
    table.add_column("p90 ms", justify="right")
    table.add_column("vs nsfast.run", justify="right")
    table.add_column("ok")
    for r in rows:
        if r.skipped:
            table.add_row(r.tool, "", "", "", "", "", "[yellow]skipped[/yellow]")
            continue
        table.add_row(r.tool + (f" [dim]({r.chunks} chunks)[/dim]" if r.chunks else ""), r.namespaces, str(r.n),
                      f"{r.median_ms:.2f}" if r.median_ms is not None else "-",
                      f"{r.p90_ms:.2f}" if r.p90_ms is not None else "-",
                      ratio_text(r.vs_nsfast) if r.key != "nsfast" else "(reference)",
                      "[green]yes[/green]" if ok_text(r) == "yes" else f"[red]{ok_text(r)}[/red]")
    console.print(table)
    console.print("[bold]Commands[/bold] (one sample each):")
    for r in rows:
        if r.command:
            console.print(f"  {r.tool}: {r.command}", highlight=False, markup=False)
    for r in rows:
        if r.skipped:
            console.print(f"  [yellow]{escape(r.tool)} skipped:[/yellow] {escape(r.skipped)}", highlight=False)
        if r.note:
            console.print(f"  [dim]{escape(r.tool)}: {escape(r.note)}[/dim]", highlight=False)


def markdown(rows: List[Row], env: Dict[str, Any]) -> str:
    lines = ["| tool | new namespaces | median ms | p90 ms | vs nsfast.run | ok |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.tool} | | | | | skipped: {r.skipped.splitlines()[0][:80]} |")
            continue
        vs = "(reference)" if r.key == "nsfast" else ratio_text(r.vs_nsfast)
        med = "-" if r.median_ms is None else f"{r.median_ms:.2f}"
        p90 = "-" if r.p90_ms is None else f"{r.p90_ms:.2f}"
        lines.append(f"| `{r.tool}` | {r.namespaces} | {med} | {p90} | {vs} | {ok_text(r)} |")
    lines.append("")
    lines.append(f"{env['date']}, {env['kernel'].split()[1]}, {env['cpu']}, {env['python']}; "
                 f"n = {max((r.n for r in rows), default=0)} per tool; `{env['command']}`")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200, help="samples per tool (default 200)")
    p.add_argument("--quick", action="store_true", help="50 samples per tool (overrides --runs)")
    p.add_argument("--batch", type=int, default=10, help="samples per tool per round (default 10)")
    p.add_argument("--chunks", type=int, default=5, help="spawn_loop processes the samples are split into (default 5)")
    p.add_argument("--warmup", type=int, default=10, help="unrecorded runs per tool first (default 10)")
    p.add_argument("--skip", default="", help="comma list of tools to leave out: nsfast,nsfast-nocg,rust,unshare,bwrap,crun,subprocess")
    p.add_argument("--spawn-loop", type=Path, default=SPAWN_LOOP, help="the spawn_loop binary (built if missing)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    p.add_argument("--crun-worker", nargs=2, metavar=("BUNDLE", "PROBE_BUNDLE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.crun_worker:
        crun_worker(*args.crun_worker)
        return 0
    if args.quick:
        args.runs = 50
        args.warmup = min(args.warmup, 5)
    if args.runs < 1 or args.batch < 1 or args.chunks < 1 or args.warmup < 1:
        p.error("--runs, --batch, --chunks and --warmup must be positive")
    env = environment([sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv])

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    candidates: List[Tool] = [
        NsfastRun("nsfast", {}),
        # Isolates what the per-sandbox cgroup costs.
        NsfastRun("nsfast-nocg", {"cgroup": False}),
        SpawnLoop(args.spawn_loop),
        SubprocessTool("unshare", "unshare", UNSHARE_TRIES),
        SubprocessTool("bwrap", "bwrap --unshare-all", [BWRAP]),
        Crun(),
        SubprocessTool("subprocess", "subprocess.run (no sandbox)", [[]]),
    ]
    host_ns = own_namespaces()
    tools: List[Tool] = []
    skipped: List[Row] = []
    try:
        for t in candidates:
            if t.key in skip:
                continue
            try:
                t.start(host_ns)
                tools.append(t)
            except Skip as e:
                t.close()
                skipped.append(Row(t.key, t.name, "", "", skipped=str(e)))
        collectors = measure(tools, args.runs, args.batch, args.chunks, args.warmup)
    finally:
        for t in tools:
            t.close()
    env["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    rows = finish_rows(collectors, skipped)
    print_rich(rows, env, args)
    if args.markdown:
        print()
        print(markdown(rows, env))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "settings": {k: v for k, v in vars(args).items()
                                        if k in ("runs", "batch", "chunks", "warmup", "skip")},
                                         "results": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0 if all(r.failures == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
