#!/usr/bin/env python3
"""Start latency of a sandboxed `/bin/true`: nsfast's hardened default against the same plan
with each hardening step off, the Rust loop doing the same plans, and other tools, in one run.

Reproduce (from the repository root, as root, after `make build`; `make bench` runs the first):

    .venv/bin/python benches/start_latency.py                   # 200 samples per tool
    .venv/bin/python benches/start_latency.py --quick           # 50 samples per tool
    .venv/bin/python benches/start_latency.py --runs 500 --json out.json --markdown
    tests/vm/run-vm.sh --timeout 900 -- .venv/bin/python benches/start_latency.py --markdown
                                                                # in the pure cgroup v2 VM (~6 min)

One sample is the wall time of starting `/bin/true` in a sandbox and waiting for it to exit,
with stdio inherited:

    nsfast.run              nsfast.run(["/bin/true"]): the default, hardened Spec()
    nsfast.run: no STEP     nsfast.run(["/bin/true"], spec=S), S = Spec() with one hardening
                            step off (S is built once, so Spec validation is not timed):
        no userns           namespaces=DEFAULT_NAMESPACES without "user" (root caller only)
        no seccomp          seccomp=None
        no masks            masked_paths=(), readonly_paths=(), hidden=()
        no limits           limits=None (the per-sandbox cgroup stays, for usage)
        all 4 off           all four of the above
        cgroup=False        no per-sandbox cgroup at all (so no limits either)
        overlay=True        a writable copy-on-write root over the host root (Spec.overlay)
        busybox image       rootfs=nsfast.Image(...) of a busybox OCI image umoci makes in the
                            run (uid=0 inside), read-only, and with overlay=True
    spawn_loop [FLAGS]      target/release/examples/spawn_loop N [--no-userns|--no-seccomp|
                            --no-masks|--no-limits|--no-cgroup]: the same plans built and
                            spawned from Rust, no Python (default: Spec::new + nsfast's default
                            limits, memory 1 GiB and pids 512); built with cargo if missing
    unshare                 subprocess.run(["unshare", "-pfimun", "--mount-proc", "/bin/true"])
                            (without --mount-proc if that fails; the table shows which ran)
    bwrap                   subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/",
                                            "--proc", "/proc", "--dev", "/dev", "/bin/true"])
    crun                    subprocess.run(["crun", "run", "--bundle", B, ID]) -- see below
    subprocess.run          subprocess.run(["/bin/true"]): no sandbox, the floor

Method:
  * Every tool is warmed up, then the tools take turns in rounds of --batch samples each, the
    order rotating every round, so machine noise (other builds, net-namespace teardown in
    kernel workers) hits all of them alike. The garbage collector is off inside a batch (as in
    `timeit`).
  * Python-driven tools are timed with time.perf_counter_ns() around the one call.
  * spawn_loop times itself (plan + cgroup + spawn + wait + cgroup removal per sample, as
    nsfast.run does): each of its batches is one `spawn_loop K --warmup 2 --samples` process,
    which spawns twice untimed and prints its K samples.
  * crun 1.8 refuses this kind of host's hybrid cgroup layout, so it runs inside one
    long-lived worker, `unshare -m` with /sys/fs/cgroup/unified unmounted (private to that
    mount namespace), which this script feeds batch requests over a pipe; the worker times
    each subprocess.run(["crun", "run", ...]) exactly as above and sends the raw samples back.
    The OCI bundle is `crun spec` with args ["/bin/true"], terminal false, default namespaces,
    and a rootfs of the host's /usr bound read-only (plus its /bin, /lib... symlinks), so
    crun runs the very same /bin/true as the others.
  * Quantiles are nearest-rank, sorted[round((n - 1) * q)], as in spawn_loop.rs; p99 is shown
    from n >= 100 on.
  * The cost of a step is median(nsfast.run) - median(the variant with it off), and likewise
    for spawn_loop; its 95% interval is a bootstrap that resamples rounds (--bootstrap times),
    so the pairing in time is kept. The targets' ratios get the same interval; the verdict is
    by the point estimate, marked when the interval crosses the goal.
  * Measured, not claimed: a probe run of each tool lists /proc/self/ns (compared with this
    process's: "new namespaces") and shows the hardening in force ("hardening"): userns = a new
    user namespace whose root is not host uid 0; seccomp = /proc/self/status Seccomp 2;
    masks = /proc/keys masked and /proc/sys read-only; hidden = an empty tmpfs on /root;
    limits = the sandbox's cgroup has nsfast.DEFAULT_LIMITS' memory and pids limits, read on
    the host while a probe sleeps (nsfast rows only). spawn_loop reports what it planned.
    "ok" means every sample's command exited 0 and, for nsfast and spawn_loop rows, the
    hardening is exactly that of the variant.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
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
# Prints "TYPE ns:[INODE]" per namespace of the process it runs in, then the hardening in
# force: its uid_map's first line, its uid and seccomp mode, and whether /proc/keys is masked,
# /proc/sys read-only and /root a mount (see hardening_of).
NS_PROBE = [
    "/bin/sh",
    "-c",
    'for n in /proc/self/ns/*; do echo "${n##*/} $(readlink "$n")"; done; '
    'read -r a b c < /proc/self/uid_map; echo "uid_map $a $b $c"; '
    'while read -r k v rest; do case $k in Uid:|Seccomp:) echo "$k $v";; esac; done < /proc/self/status; '
    "while read -r id parent dev root mnt opts rest; do case $mnt in /proc/keys|/proc/sys|/root) "
    'echo "mount:$mnt $opts";; esac; done < /proc/self/mountinfo',
]
# The hardening steps, each with the Spec fields and the spawn_loop flag that turn it off.
STEPS = ("userns", "seccomp", "masks", "limits")
STEP_FLAGS = {"userns": "--no-userns", "seccomp": "--no-seccomp", "masks": "--no-masks", "limits": "--no-limits"}
STEP_NAMES = {
    "userns": "user namespace",
    "seccomp": "seccomp filter",
    "masks": "masks + hidden dirs",
    "limits": "default limits",
}
# What each step shows in the "hardening" column when in force (see hardening_of).
STEP_SHOWS = {"userns": ("userns",), "seccomp": ("seccomp",), "masks": ("masks", "hidden"), "limits": ("limits",)}
SHOWN = ("userns", "seccomp", "masks", "hidden", "limits")
TARGET_VS_RUST = 1.25  # nsfast.run's median at most this times spawn_loop's (same plan)
TARGET_VS_BWRAP = 2.0  # bwrap --unshare-all's median at least this times nsfast.run's
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


# -- hardening ----------------------------------------------------------------------------------


def host_mounts(path: str) -> bool:
    """Whether this process's mount namespace has a mount on `path`."""
    return any(line.split()[4] == path for line in Path("/proc/self/mountinfo").read_text().splitlines())


def hardening_of(probe_output: str, host: Dict[str, str], limits: bool = False) -> List[str]:
    """The steps of SHOWN that NS_PROBE's output shows in force (and "limits" if `limits`)."""
    lines = [line.split(" ", 1) for line in probe_output.splitlines() if " " in line]
    seen = {k: v for k, v in lines if not k.startswith("mount:")}
    mounts: Dict[str, List[str]] = {}
    for k, v in lines:
        if k.startswith("mount:"):
            mounts.setdefault(k[len("mount:") :], []).append(v)
    shown = []
    try:
        inside, outside, count = (int(x) for x in seen.get("uid_map", "").split())
        uid = int(seen.get("Uid:", "-1"))
        host_uid = outside + uid - inside if inside <= uid < inside + count else -1
    except ValueError:
        host_uid = -1
    if "user" in seen and seen["user"] != host.get("user") and host_uid not in (0, -1):
        shown.append("userns")
    if seen.get("Seccomp:") == "2":
        shown.append("seccomp")
    if "/proc/keys" in mounts and any("ro" in o.split(",") for o in mounts.get("/proc/sys", [])):
        shown.append("masks")
    if "/root" in mounts and not host_mounts("/root"):
        shown.append("hidden")
    if limits:
        shown.append("limits")
    return shown


def _cgroup_mounts() -> Dict[str, str]:
    """cgroup v1 controller (and "" for cgroup2) -> its mount point, in this mount namespace."""
    out: Dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, options = (right.split() + ["", "", ""])[:3]
        if fstype == "cgroup2":
            out.setdefault("", left.split()[4])
        elif fstype == "cgroup":
            for o in options.split(","):
                out.setdefault(o, left.split()[4])
    return out


def cgroup_limits(pid: int) -> Dict[str, Optional[int]]:
    """The memory and pids limits of the cgroups of `pid`, read here on the host (None: none)."""
    mounts = _cgroup_mounts()
    found: Dict[str, Optional[int]] = {"memory": None, "pids": None}
    files = {"memory": ("memory.limit_in_bytes", "memory.max"), "pids": ("pids.max",)}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            base = mounts.get(c)
            if base is None or path == "/":
                continue
            for kind, names in files.items():
                if c not in ("", kind):
                    continue
                for name in names:
                    try:
                        text = Path(base + path, name).read_text().strip()
                    except OSError:
                        continue
                    if text.isdigit() and int(text) < 1 << 62:  # v1 says 2^63 - page for none
                        found[kind] = int(text)
    return found


def default_limits() -> Dict[str, Optional[int]]:
    import nsfast

    return {"memory": nsfast.DEFAULT_LIMITS.memory, "pids": nsfast.DEFAULT_LIMITS.pids}  # type: ignore[dict-item]


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
    hardening: Optional[List[str]] = None  # of SHOWN, as measured (None: not probed)
    expected: Optional[List[str]] = None  # what it should be (None: no expectation)

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


def off_options(steps: Sequence[str]) -> Dict[str, Any]:
    """The Spec fields that turn `steps` (of STEPS) off."""
    import nsfast

    fields: Dict[str, Dict[str, Any]] = {
        "userns": {"namespaces": tuple(n for n in nsfast.DEFAULT_NAMESPACES if n != "user")},
        "seccomp": {"seccomp": None},
        "masks": {"masked_paths": (), "readonly_paths": (), "hidden": ()},
        "limits": {"limits": None},
    }
    return {k: v for step in steps for k, v in fields[step].items()}


def expected_shown(off: Sequence[str], cgroup: bool = True) -> List[str]:
    """The "hardening" column of a sandbox with nsfast's defaults but `off` off."""
    on = {x for step in STEPS if step not in off for x in STEP_SHOWS[step]}
    if not cgroup:
        on.discard("limits")
    return [x for x in SHOWN if x in on]


class NsfastRun(Tool):
    """nsfast.run(["/bin/true"]) with the default Spec(), or with spec=Spec(**options) for the
    hardening steps `off` off (and **extra); the Spec is built once."""

    def __init__(self, key: str, name: str, off: Sequence[str] = (), **extra: Any) -> None:
        self.key, self.name, self.off, self.extra = key, name, tuple(off), extra
        self.spec: Any = None

    def start(self, host_ns: Dict[str, str]) -> None:
        import nsfast

        if "userns" in self.off and os.geteuid() != 0:
            raise Skip("only a root caller can leave out the user namespace")
        options = {**off_options(self.off), **self.extra}
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
        self.command = (
            f'nsfast.run(["/bin/true"], spec=nsfast.Spec({shown}))'
            if options
            else 'nsfast.run(["/bin/true"])  # default Spec()'
        )
        try:
            self.spec = nsfast.Spec(**options) if options else None
            probe = nsfast.run(NS_PROBE, spec=self.spec, capture_output=True, text=True, timeout=30)
            sleeper = nsfast.spawn(["/bin/sleep", "30"], spec=self.spec)
            try:
                limits = cgroup_limits(sleeper.pid)
            finally:
                sleeper.kill()
                sleeper.wait()
        except (OSError, TypeError, ValueError) as e:
            raise Skip(f"nsfast.run failed: {e}") from None
        if probe.returncode != 0:
            raise Skip(f"probe exited {probe.returncode}: {probe.stderr.strip()}")
        self.namespaces = new_namespaces(probe.stdout, host_ns)
        self.hardening = hardening_of(probe.stdout, host_ns, limits == default_limits())
        self.expected = expected_shown(self.off, self.extra.get("cgroup", True))
        notes = [stale_note(Path(nsfast._core.__file__), "make build")]
        if limits not in (default_limits(), {"memory": None, "pids": None}):
            notes.append(f"cgroup limits read back: {limits}")
        self.note = "; ".join(n for n in notes if n)

    def batch(self, n: int) -> Batch:
        import nsfast

        run, spec = nsfast.run, self.spec
        return timed_calls(lambda: run(TRUE, spec=spec).returncode, n)


_IMAGE: Dict[str, Any] = {}


def bench_image() -> Tuple[Any, float]:
    """A busybox OCI image (every applet linked in /bin) made offline with umoci, once per
    run, and loaded into a fresh cache of its own: (the nsfast.Image, its cold unpack time
    in seconds). The temporary files go at exit."""
    if "image" in _IMAGE:
        return _IMAGE["image"]
    import atexit

    import nsfast

    if shutil.which("umoci") is None or not os.path.exists("/bin/busybox"):
        raise Skip("the image rows need umoci and a static /bin/busybox (Debian: umoci, busybox-static)")
    top = Path(tempfile.mkdtemp(prefix="nsfast-bench-image-"))
    atexit.register(shutil.rmtree, top, True)
    lay, bundle = top / "layout", top / "bundle"

    def umoci(*args: object) -> None:
        subprocess.run(["umoci", *map(str, args)], check=True, capture_output=True)

    umoci("init", "--layout", lay)
    umoci("new", "--image", f"{lay}:bench")
    umoci("unpack", "--image", f"{lay}:bench", bundle)
    bin_dir = bundle / "rootfs" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", bin_dir / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", bin_dir / applet)
    umoci("repack", "--image", f"{lay}:bench", bundle)
    t0 = time.perf_counter()
    try:
        image = nsfast.Image(lay, "bench", cache=top / "cache")
    except nsfast.ImageError as e:
        raise Skip(f"the busybox image does not load: {e}") from None
    _IMAGE["image"] = (image, time.perf_counter() - t0)
    return _IMAGE["image"]


class ImageRun(NsfastRun):
    """nsfast.run(["/bin/true"]) in the busybox image (`bench_image`), as root inside."""

    def start(self, host_ns: Dict[str, str]) -> None:
        image, unpack_s = bench_image()
        self.extra = {**self.extra, "rootfs": image, "uid": 0, "gid": 0}
        super().start(host_ns)
        # An image is not the host root: there is no host directory to hide.
        self.expected = [x for x in self.expected or [] if x != "hidden"]
        unpacked = f"the busybox image was unpacked in {unpack_s * 1e3:.0f} ms (cold cache, once)"
        self.note = "; ".join(n for n in (self.note, unpacked) if n)


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
                self.hardening = hardening_of(probe.stdout, host_ns)
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
    """The Rust baseline, `spawn_loop N FLAGS` with the hardening steps `off` off (and `extra`
    flags). With raw, each batch is one `spawn_loop K --warmup 2 --samples FLAGS` process
    returning its K samples; else one `spawn_loop N` process reporting only its median and
    p90 (measure() then runs it as chunks spread over the rounds)."""

    key, name = "rust", "spawn_loop (Rust)"
    off: Tuple[str, ...] = ()
    extra: Tuple[str, ...] = ()
    raw = False
    WARMUP = 2

    def __init__(
        self,
        binary: Path,
        key: str = "",
        name: str = "",
        off: Sequence[str] = (),
        extra: Sequence[str] = (),
        raw: bool = False,
    ) -> None:
        self.binary = binary
        if key:
            self.key = key
        if name:
            self.name = name
        self.off, self.extra, self.raw = tuple(off), tuple(extra), raw

    @property
    def flags(self) -> List[str]:
        return [STEP_FLAGS[s] for s in self.off] + list(self.extra)

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
        notes = [
            "namespaces and hardening as planned (reported by spawn_loop), not probed",
            stale_note(self.binary, "cargo build --release --example spawn_loop"),
        ]
        self.note = "; ".join(n for n in notes if n)
        rel = self.binary.relative_to(ROOT) if self.binary.is_relative_to(ROOT) else self.binary
        raw = ["--warmup", str(self.WARMUP), "--samples"] if self.raw else []
        self.command = shlex.join([str(rel), "K" if self.raw else "N", *raw, *self.flags])
        if self.raw:
            self.command += "  # one process per batch of K samples"
        self.namespaces = ",".join(n for n in NS_ORDER if n in nsfast.DEFAULT_NAMESPACES)
        first = self.batch(3)
        if first.failures:
            raise Skip(self._error or "spawn_loop failed")
        out = self.reported
        if "namespaces" in out:  # a spawn_loop that says what it planned
            planned = out["namespaces"].split(",")
            self.namespaces = ",".join(n for n in NS_ORDER if n in planned) or "none"
            limits = out.get("limits") or {}
            self.hardening = [
                x
                for x, on in (
                    ("userns", "user" in planned),
                    ("seccomp", out.get("seccomp")),
                    ("masks", out.get("masks")),
                    ("hidden", out.get("masks")),
                    ("limits", limits == default_limits()),
                )
                if on
            ]
            self.expected = expected_shown(self.off, "--no-cgroup" not in self.extra)

    _error = ""
    reported_cgroup: Optional[bool] = None  # whether the last batch said it used a cgroup
    reported: Dict[str, Any] = {}  # the last batch's JSON

    def argv(self, n: int) -> List[str]:
        raw = ["--warmup", str(self.WARMUP), "--samples"] if self.raw else []
        return [str(self.binary), str(n), *raw, *self.flags]

    def batch(self, n: int) -> Batch:
        r = subprocess.run(self.argv(n), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        if r.returncode != 0:
            self._error = f"spawn_loop exited {r.returncode}: {r.stderr.strip()[-500:]}"
            return Batch(n=n, failures=n)
        out = json.loads(r.stdout)
        self.reported = out
        self.reported_cgroup = bool(out.get("cgroup"))
        if "samples_us" in out:
            return Batch(n=int(out["n"]), failures=0, samples_s=[x / 1e6 for x in out["samples_us"]])
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


def receive_json(
    proc: subprocess.Popen[str], what: str, timeout_s: float = WORKER_TIMEOUT_S, error: Type[Exception] = RuntimeError
) -> Dict[str, Any]:
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
            config["mounts"].append(
                {
                    "destination": f"/{top}",
                    "type": "bind",
                    "source": str(host),
                    "options": ["rbind", "ro", "nosuid", "nodev"],
                }
            )
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
        self.command = (
            f"subprocess.run(['crun', 'run', '--bundle', {str(bundle)!r}, ID]) in "
            f"`unshare -m` without /sys/fs/cgroup/unified"
        )
        hello = self._start_worker(Path(__file__), ["--crun-worker", str(bundle), str(probe)])
        self.namespaces = new_namespaces(hello["ns_probe"], host_ns)
        self.hardening = hardening_of(hello["ns_probe"], host_ns)
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        self.note = f"cgroupfs {'v2' if v2 else 'v1'} manager; its cgroup create/remove is part of each sample"

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
        probe = subprocess.run(
            ["crun", "run", "--bundle", probe_bundle, next_id()], capture_output=True, text=True, timeout=60
        )
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
        result = timed_calls(lambda it=it: subprocess.run(next(it)).returncode, len(argvs))
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
    p99_ms: Optional[float] = None  # from n >= P99_MIN_N on
    vs_nsfast: Optional[float] = None  # median / nsfast.run's median
    chunks: int = 0
    hardening: Optional[List[str]] = None  # measured (see hardening_of); None: not probed
    expected: Optional[List[str]] = None  # what the variant should show; None: no expectation
    note: str = ""
    skipped: str = ""
    samples_ms: List[float] = field(default_factory=list)  # in the order taken
    chunk_medians_ms: List[float] = field(default_factory=list)  # spawn_loop only
    chunk_p90s_ms: List[float] = field(default_factory=list)
    batch_sizes: List[int] = field(default_factory=list)  # samples_ms per round, in order

    def rounds(self) -> List[List[float]]:
        """samples_ms split into its rounds."""
        out, i = [], 0
        for k in self.batch_sizes:
            out.append(self.samples_ms[i : i + k])
            i += k
        return out


P99_MIN_N = 100


class Collector:
    """Accumulates one tool's batches."""

    def __init__(self, tool: Tool) -> None:
        self.tool = tool
        self.samples: List[float] = []
        self.chunk_medians: List[float] = []
        self.chunk_p90s: List[float] = []
        self.batch_sizes: List[int] = []  # of the batches that returned samples, in order
        self.n = 0
        self.failures = 0

    def add(self, b: Batch) -> None:
        self.n += b.n
        self.failures += b.failures
        self.samples += b.samples_s
        if b.median_s is None:  # a batch of samples (none if it failed): one round
            self.batch_sizes.append(len(b.samples_s))
        if b.median_s is not None and b.p90_s is not None:
            self.chunk_medians.append(b.median_s)
            self.chunk_p90s.append(b.p90_s)

    def row(self) -> Row:
        t = self.tool
        row = Row(
            t.key,
            t.name,
            t.command,
            t.namespaces,
            self.n,
            self.failures,
            note=t.note,
            samples_ms=[round(x * 1e3, 4) for x in self.samples],
            chunk_medians_ms=[x * 1e3 for x in self.chunk_medians],
            chunk_p90s_ms=[x * 1e3 for x in self.chunk_p90s],
            hardening=t.hardening,
            expected=t.expected,
            batch_sizes=list(self.batch_sizes),
        )
        if self.samples:
            s = sorted(self.samples)
            row.median_ms, row.p90_ms = quantile(s, 0.5) * 1e3, quantile(s, 0.9) * 1e3
            if len(s) >= P99_MIN_N:
                row.p99_ms = quantile(s, 0.99) * 1e3
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
    chunk_at = {
        min(rounds - 1, (2 * i + 1) * rounds // (2 * len(chunk_sizes))): size for i, size in enumerate(chunk_sizes)
    }
    if len(chunk_at) < len(chunk_sizes):  # fewer rounds than chunks: one chunk per round
        chunk_at = dict(enumerate(split(runs, rounds)))
    # No auto-refresh: a refresh thread would compete with the timed calls for the GIL.
    with Progress(auto_refresh=False, transient=True) as progress:
        task = progress.add_task("measuring", total=rounds)
        for r in range(rounds):
            k = min(batch, runs - r * batch)
            order = collectors[r % len(collectors) :] + collectors[: r % len(collectors)]
            for c in order:
                if isinstance(c.tool, SpawnLoop) and not c.tool.raw:
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
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
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
    if not row.n or row.failures:
        return f"NO ({row.failures}/{row.n} failed)"
    if row.expected is not None and row.hardening != row.expected:
        return f"NO (hardening: {shown_text(row.hardening)}, expected {shown_text(row.expected)})"
    return "yes"


def shown_text(h: Optional[List[str]]) -> str:
    return "?" if h is None else (" ".join(h) or "none")


def finish_rows(collectors: List[Collector], skipped: List[Row]) -> List[Row]:
    rows = [c.row() for c in collectors]
    ref = next((r.median_ms for r in rows if r.key == "nsfast"), None)
    for r in rows:
        if ref and r.median_ms is not None:
            r.vs_nsfast = r.median_ms / ref
    return rows + skipped


@dataclass
class Cost:
    """What one hardening step (or several) costs per spawn: median(default) - median(off)."""

    what: str
    off: str  # the row keys' suffix: "nouserns", ..., "off", "nocg"
    nsfast_ms: Optional[float] = None
    nsfast_ci: Optional[Tuple[float, float]] = None
    rust_ms: Optional[float] = None
    rust_ci: Optional[Tuple[float, float]] = None


@dataclass
class Target:
    what: str
    ratio: Optional[float]
    ci: Optional[Tuple[float, float]]
    goal: str  # e.g. "<= 1.25x"
    ok: Optional[bool]
    crosses: bool = False  # the 95% interval contains the goal


def _bench_common() -> Any:
    """benches/_common (imported late: it imports this module, maybe running as __main__)."""
    sys.modules.setdefault("start_latency", sys.modules[__name__])
    import _common

    return _common


def _by_key(rows: List[Row]) -> Dict[str, Row]:
    return {r.key: r for r in rows if not r.skipped and r.median_ms is not None}


def _delta(
    ref: Optional[Row], off: Optional[Row], resamples: int
) -> Tuple[Optional[float], Optional[Tuple[float, float]]]:
    if ref is None or off is None or ref.median_ms is None or off.median_ms is None:
        return None, None
    ci = None
    if ref.batch_sizes and off.batch_sizes and resamples > 0:
        ci = _bench_common().rounds_interval(ref.rounds(), off.rounds(), lambda a, b: a - b, resamples)
    return ref.median_ms - off.median_ms, ci


def costs(rows: List[Row], resamples: int) -> List[Cost]:
    by = _by_key(rows)
    out = []
    for what, off in [
        *((STEP_NAMES[s], "no" + s) for s in STEPS),
        ("all four", "off"),
        ("the cgroup with its limits (cgroup=False)", "nocg"),
        ("overlay=True on the host root (negative: what it adds; target <= 0.3 ms)", "overlay"),
    ]:
        c = Cost(what, off)
        c.nsfast_ms, c.nsfast_ci = _delta(by.get("nsfast"), by.get(f"nsfast-{off}"), resamples)
        c.rust_ms, c.rust_ci = _delta(by.get("rust"), by.get(f"rust-{off}"), resamples)
        out.append(c)
    c = Cost("overlay=True on the busybox image (negative: what it adds)", "")
    c.nsfast_ms, c.nsfast_ci = _delta(by.get("nsfast-image"), by.get("nsfast-image-overlay"), resamples)
    out.append(c)
    steps = out[: len(STEPS)]
    summed = Cost("sum of the four, one at a time", "")
    if all(c.nsfast_ms is not None for c in steps):
        summed.nsfast_ms = sum(c.nsfast_ms for c in steps)  # type: ignore[misc]
    if all(c.rust_ms is not None for c in steps):
        summed.rust_ms = sum(c.rust_ms for c in steps)  # type: ignore[misc]
    out.insert(len(STEPS) + 1, summed)
    return out


def _ratio_target(
    what: str, num: Optional[Row], den: Optional[Row], goal: float, at_most: bool, resamples: int
) -> Target:
    sign = "<=" if at_most else ">="
    if num is None or den is None or num.median_ms is None or den.median_ms is None:
        return Target(what, None, None, f"{sign} {goal:g}x", None)
    ratio = num.median_ms / den.median_ms
    ci = None
    if num.batch_sizes and den.batch_sizes and resamples > 0:
        ci = _bench_common().rounds_interval(num.rounds(), den.rounds(), lambda a, b: a / b, resamples)
    ok = ratio <= goal if at_most else ratio >= goal
    return Target(what, ratio, ci, f"{sign} {goal:g}x", ok, ci is not None and ci[0] <= goal <= ci[1])


def targets(rows: List[Row], resamples: int) -> List[Target]:
    by = _by_key(rows)
    return [
        _ratio_target(
            "nsfast.run / spawn_loop (the same hardened plan)",
            by.get("nsfast"),
            by.get("rust"),
            TARGET_VS_RUST,
            True,
            resamples,
        ),
        _ratio_target(
            "bwrap --unshare-all / nsfast.run", by.get("bwrap"), by.get("nsfast"), TARGET_VS_BWRAP, False, resamples
        ),
    ]


def _ms(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(ci: Optional[Tuple[float, float]], fmt: str = "{:+.3f}") -> str:
    return "" if ci is None else "[" + fmt.format(ci[0]) + ", " + fmt.format(ci[1]) + "]"


def cost_cells(c: Cost) -> List[str]:
    return [
        f"{c.nsfast_ms:+.3f}" if c.nsfast_ms is not None else "-",
        _ci(c.nsfast_ci),
        f"{c.rust_ms:+.3f}" if c.rust_ms is not None else "-",
        _ci(c.rust_ci),
    ]


def target_text(t: Target) -> str:
    if t.ok is None:
        return "n/a"
    return ("PASS" if t.ok else "FAIL") + (f" (interval crosses {t.goal.split()[-1]})" if t.crosses else "")


def rich_header(
    title: str,
    env: Mapping[str, Any],
    settings: Optional[str],
    keys: Sequence[str] = ("kernel", "cpu", "python", "nsfast", "command"),
    width: int = 140,
) -> Console:
    """A rich Console (`width` columns unless on a terminal) that has printed the title with the
    date, the environment's `keys`, and unless settings is None a line with the load at start
    and end, then `settings`."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else width)
    console.print(f"[bold]{title}[/bold] — {env['date']}")
    for k in keys:
        console.print(f"  {k:8} {env[k]}", highlight=False, markup=False)
    if settings is not None:
        console.print(
            f"  {'load':8} {' '.join(env['loadavg_start'])} at start, {' '.join(env['loadavg_end'])} at end"
            f"; {settings}",
            highlight=False,
        )
    return console


def print_rich(
    rows: List[Row], cost_rows: List[Cost], goals: List[Target], env: Dict[str, Any], args: argparse.Namespace
) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = rich_header(
        "Start latency of /bin/true in a sandbox",
        env,
        f"{args.runs} samples per tool, batches of {args.batch}, warm-up {args.warmup}",
        width=180,
    )
    table = Table(show_edge=False)
    for name, justify in [
        ("tool", "left"),
        ("new namespaces", "left"),
        ("hardening", "left"),
        ("n", "right"),
        ("median ms", "right"),
        ("p90 ms", "right"),
        ("p99 ms", "right"),
        ("vs nsfast.run", "right"),
        ("ok", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        if r.skipped:
            table.add_row(escape(r.tool), "", "", "", "", "", "", "", "[yellow]skipped[/yellow]")
            continue
        ok = ok_text(r)
        table.add_row(
            escape(r.tool) + (f" [dim]({r.chunks} chunks)[/dim]" if r.chunks else ""),
            r.namespaces,
            shown_text(r.hardening),
            str(r.n),
            _ms(r.median_ms),
            _ms(r.p90_ms),
            _ms(r.p99_ms),
            ratio_text(r.vs_nsfast) if r.key != "nsfast" else "(reference)",
            "[green]yes[/green]" if ok == "yes" else f"[red]{escape(ok)}[/red]",
        )
    console.print(table)
    ct = Table(show_edge=False, title="What each step costs per spawn: median(default) - median(step off), ms")
    for name, justify in [
        ("step", "left"),
        ("nsfast.run", "right"),
        ("95% bootstrap", "right"),
        ("spawn_loop", "right"),
        ("95% bootstrap", "right"),
    ]:
        ct.add_column(name, justify=justify)  # type: ignore[arg-type]
    for c in cost_rows:
        ct.add_row(escape(c.what), *cost_cells(c))
    console.print(ct)
    console.print("[bold]Targets[/bold] (verdict by the point estimate; 95% bootstrap over rounds):")
    for t in goals:
        console.print(
            f"  {escape(t.what)}: {_ms(t.ratio)}x {_ci(t.ci, '{:.2f}')} (goal {t.goal}): [bold]{target_text(t)}[/bold]",
            highlight=False,
        )
    console.print("[bold]Commands[/bold] (one sample each):")
    for r in rows:
        if r.command:
            console.print(f"  {r.tool}: {r.command}", highlight=False, markup=False)
    notes: Dict[str, List[str]] = {}  # note -> the tools it is about
    for r in rows:
        if r.skipped:
            console.print(f"  [yellow]{escape(r.tool)} skipped:[/yellow] {escape(r.skipped)}", highlight=False)
        if r.note:
            notes.setdefault(r.note, []).append(r.tool)
    for note, tools in notes.items():
        console.print(f"  [dim]{escape(', '.join(tools))}: {escape(note)}[/dim]", highlight=False)


def markdown(rows: List[Row], env: Dict[str, Any], cost_rows: Sequence[Cost] = (), goals: Sequence[Target] = ()) -> str:
    lines = [
        "| tool | new namespaces | hardening | median ms | p90 ms | p99 ms | vs nsfast.run | ok |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.tool} | | | | | | | skipped: {r.skipped.splitlines()[0][:80]} |")
            continue
        vs = "(reference)" if r.key == "nsfast" else ratio_text(r.vs_nsfast)
        chunks = f" ({r.chunks} chunks)" if r.chunks else ""
        lines.append(
            f"| `{r.tool}`{chunks} | {r.namespaces} | {shown_text(r.hardening)} | {_ms(r.median_ms)} | "
            f"{_ms(r.p90_ms)} | {_ms(r.p99_ms)} | {vs} | {ok_text(r)} |"
        )
    lines.append("")
    lines.append(
        f"{env['date']}, {env['kernel'].split()[1]}, {env['cpu']}, {env['python']}; "
        f"n = {max((r.n for r in rows), default=0)} per tool; `{env['command']}`"
    )
    if cost_rows:
        lines += [
            "",
            "| step (cost per spawn) | nsfast.run Δ median ms | 95% bootstrap | spawn_loop Δ median ms | "
            "95% bootstrap |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += ["| " + " | ".join([c.what, *cost_cells(c)]) + " |" for c in cost_rows]
    if goals:
        lines += ["", "| target | ratio | 95% bootstrap | goal | verdict |", "|---|---:|---:|---|---|"]
        lines += [
            f"| {t.what} | {_ms(t.ratio)}x | {_ci(t.ci, '{:.2f}')} | {t.goal} | **{target_text(t)}** |" for t in goals
        ]
    return "\n".join(lines)


def candidates(spawn_loop: Path) -> List[Tool]:
    """Every tool, in the order of the table."""
    return [
        NsfastRun("nsfast", "nsfast.run"),
        *(NsfastRun(f"nsfast-no{s}", f"nsfast.run: no {s}", off=[s]) for s in STEPS),
        NsfastRun("nsfast-off", "nsfast.run: all 4 off", off=STEPS),
        NsfastRun("nsfast-nocg", "nsfast.run: cgroup=False", cgroup=False),
        NsfastRun("nsfast-noinit", "nsfast.run: init=False", init=False),
        NsfastRun("nsfast-overlay", "nsfast.run: overlay=True", overlay=True),
        ImageRun("nsfast-image", "nsfast.run: busybox image"),
        ImageRun("nsfast-image-overlay", "nsfast.run: busybox image, overlay=True", overlay=True),
        SpawnLoop(spawn_loop, raw=True),
        *(SpawnLoop(spawn_loop, f"rust-no{s}", f"spawn_loop {STEP_FLAGS[s]}", off=[s], raw=True) for s in STEPS),
        SpawnLoop(spawn_loop, "rust-off", "spawn_loop, all 4 off", off=STEPS, raw=True),
        SpawnLoop(spawn_loop, "rust-nocg", "spawn_loop --no-cgroup", extra=["--no-cgroup"], raw=True),
        SpawnLoop(spawn_loop, "rust-noinit", "spawn_loop --no-init", extra=["--no-init"], raw=True),
        SubprocessTool("unshare", "unshare", UNSHARE_TRIES),
        SubprocessTool("bwrap", "bwrap --unshare-all", [BWRAP]),
        Crun(),
        SubprocessTool("subprocess", "subprocess.run (no sandbox)", [[]]),
    ]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=200, help="samples per tool (default 200)")
    p.add_argument("--quick", action="store_true", help="50 samples per tool (overrides --runs)")
    p.add_argument("--batch", type=int, default=5, help="samples per tool per round (default 5)")
    p.add_argument("--chunks", type=int, default=5, help=argparse.SUPPRESS)  # for summary-only spawn_loops
    p.add_argument("--warmup", type=int, default=10, help="unrecorded runs per tool first (default 10)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples, 0 for none (default 2000)")
    p.add_argument(
        "--skip",
        default="",
        help="comma list of tools (glob patterns) to leave out: nsfast, "
        "nsfast-no{userns,seccomp,masks,limits}, nsfast-off, nsfast-nocg, nsfast-overlay, nsfast-image, nsfast-image-overlay, rust, rust-no..., rust-off, "
        "rust-nocg, unshare, bwrap, crun, subprocess; e.g. 'rust-*,crun'",
    )
    p.add_argument("--spawn-loop", type=Path, default=SPAWN_LOOP, help="the spawn_loop binary (built if missing)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    p.add_argument("--crun-worker", nargs=2, metavar=("BUNDLE", "PROBE_BUNDLE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.crun_worker:
        crun_worker(*args.crun_worker)
        return 0
    if args.quick:
        args.runs = 50
        args.warmup = min(args.warmup, 5)
    if args.runs < 1 or args.batch < 1 or args.chunks < 1 or args.warmup < 1 or args.bootstrap < 0:
        p.error("--runs, --batch, --chunks and --warmup must be positive, --bootstrap >= 0")
    env = environment([sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv])

    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    host_ns = own_namespaces()
    tools: List[Tool] = []
    skipped: List[Row] = []
    try:
        for t in candidates(args.spawn_loop):
            if any(fnmatch.fnmatchcase(t.key, pattern) for pattern in skip):
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
    cost_rows, goals = costs(rows, args.bootstrap), targets(rows, args.bootstrap)
    print_rich(rows, cost_rows, goals, env, args)
    if args.markdown:
        print()
        print(markdown(rows, env, cost_rows, goals))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "settings": {
                        k: v
                        for k, v in vars(args).items()
                        if k in ("runs", "batch", "chunks", "warmup", "bootstrap", "skip")
                    },
                    "results": [asdict(r) for r in rows],
                    "costs": [asdict(c) for c in cost_rows],
                    "targets": [asdict(t) for t in goals],
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(ok_text(r) == "yes" for r in rows if not r.skipped) else 1


if __name__ == "__main__":
    sys.exit(main())
