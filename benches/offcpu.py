"""Where concurrent starts wait: off-CPU time of `nsfast.run` by kernel wait site.

Throughput of `nsfast.run` from 2 threads does not double on 2 CPUs, and the CPUs are not
busy all the time either (`benches/throughput.py`'s "busy CPUs" column): starts wait. This
records every context switch of the machine (`perf record -a -g -e sched:sched_switch`) while
a worker process runs `--starts` starts of `/bin/true` from `--threads` threads, pairs each
switch-out of a thread with its next switch-in, and sums the time off CPU per (process,
state, where in the kernel it went to sleep). State D is uninterruptible: a lock, an RCU
grace period, a vfork; S a wait the process asked for (a pipe, poll, a signal); R it was
preempted, runnable, waiting for a CPU. Rows are per start (the sum over the run divided by
the starts). The worker's own threads are `python` until they exec (the spawning threads and
each sandbox's child before it execs), `nsfast-init` (each sandbox's pid 1, including the
command between its vfork and its exec) and `true`.

Needs root and perf (Debian: linux-perf). Run: `.venv/bin/python benches/offcpu.py
[--threads 2] [--starts 400] [--variant default|no-net|no-cgroup|overlay] [--top 20] [--json PATH]`
after `make build`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from rich.console import Console
from rich.table import Table

WORKER = r"""
import os, sys, threading, time
import nsfast
variant, threads, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = {
    "default": nsfast.Spec(),
    "no-net": nsfast.Spec(namespaces=tuple(n for n in nsfast.DEFAULT_NAMESPACES if n != "net")),
    "no-cgroup": nsfast.Spec(cgroup=False),
    "overlay": nsfast.Spec(overlay=True),
}[variant]
for _ in range(20):
    nsfast.run(["/bin/true"], spec=spec)
def loop():
    for _ in range(per):
        nsfast.run(["/bin/true"], spec=spec)
ts = [threading.Thread(target=loop) for _ in range(threads)]
start = time.perf_counter()
for t in ts:
    t.start()
for t in ts:
    t.join()
print(threads * per / (time.perf_counter() - start), os.getpid(), flush=True)
"""

#: Frames that say how a thread sleeps, not why: skipped to find the caller that waits.
HOW = {
    "__schedule", "schedule", "schedule_preempt_disabled", "schedule_timeout", "io_schedule",
    "preempt_schedule", "preempt_schedule_common", "preempt_schedule_irq", "__cond_resched",
    "rwsem_down_write_slowpath", "rwsem_down_read_slowpath", "__mutex_lock", "mutex_lock",
    "__mutex_lock_slowpath", "mutex_lock_killable", "down_write", "down_read", "down_write_killable",
    "percpu_down_write", "percpu_rwsem_wait", "__percpu_down_read", "wait_for_completion",
    "wait_for_completion_state", "__wait_for_common", "schedule_hrtimeout_range",
    "schedule_hrtimeout_range_clock", "do_nanosleep", "synchronize_rcu_expedited", "synchronize_rcu",
    "__synchronize_srcu", "wait_rcu_gp", "__wait_rcu_gp", "flush_work", "__flush_work", "msleep",
    "irqentry_exit", "asm_sysvec_apic_timer_interrupt", "asm_sysvec_reschedule_ipi",
    "exit_to_user_mode_loop", "do_syscall_64", "entry_SYSCALL_64_after_hwframe", "__mutex_lock.constprop.0",
}  # fmt: skip
SWITCH = re.compile(
    r"^\S.*?\s+\d+\s+\[\d+\]\s+([\d.]+): sched:sched_switch: prev_comm=(.*?) prev_pid=(\d+) "
    r"prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)"
)
ROLES = ("python", "nsfast-init", "true", "nsfast-reaper", "nsfast-spare", "nsfast-netns")


def parse(script: str) -> List[Tuple[float, int, str, str, int, List[str]]]:
    """`perf script` text -> (time, prev pid, prev comm, prev state, next pid, prev's stack)."""
    events: List[Tuple[float, int, str, str, int, List[str]]] = []
    for line in script.splitlines():
        m = SWITCH.match(line)
        if m:
            t, pcomm, ppid, state, _ncomm, npid = m.groups()
            events.append((float(t), int(ppid), pcomm, state, int(npid), []))
        elif line.strip() and events:
            parts = line.split()
            if len(parts) > 1:
                events[-1][5].append(parts[1].split("+")[0])
    return events


def off_cpu(
    events: List[Tuple[float, int, str, str, int, List[str]]], skip: int
) -> Dict[Tuple[str, str, str], List[float]]:
    """(role, state, wait site) -> [seconds off CPU, times]: from each switch-out of a
    thread to its next switch-in. Roles other than ROLES, kernel threads and thread `skip`
    (the worker's main thread, which only waits for the others) are dropped."""
    out: Dict[Tuple[str, str, str], List[float]] = collections.defaultdict(lambda: [0.0, 0])
    away: Dict[int, Tuple[float, Tuple[str, str, str]]] = {}
    for t, ppid, pcomm, state, npid, stack in events:
        if npid in away:
            t0, key = away.pop(npid)
            out[key][0] += t - t0
            out[key][1] += 1
        if ppid in (0, skip) or pcomm not in ROLES:
            continue
        site = " < ".join([f for f in stack if f not in HOW][:3]) or "?"
        away[ppid] = (t, (pcomm, state.rstrip("+"), site))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--starts", type=int, default=400, help="starts in all (default 400)")
    p.add_argument("--variant", choices=("default", "no-net", "no-cgroup", "overlay"), default="default")
    p.add_argument("--top", type=int, default=20, help="rows shown (default 20)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    perf = shutil.which("perf")
    if os.geteuid() != 0 or perf is None:
        print("offcpu.py: needs root and perf (apt-get install linux-perf)", file=sys.stderr)
        return 2
    per = max(1, args.starts // args.threads)
    starts = per * args.threads
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        cmd = [perf, "record", "-q", "-a", "-g", "-e", "sched:sched_switch", "-o", data, "--"]
        cmd += [sys.executable, "-c", WORKER, args.variant, str(args.threads), str(per)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"offcpu.py: perf record failed: {run.stderr.strip()}", file=sys.stderr)
            return 1
        rate, main_tid = float(run.stdout.split()[-2]), int(run.stdout.split()[-1])
        script = subprocess.run([perf, "script", "-i", data], capture_output=True, text=True, check=True).stdout
    rows = sorted(off_cpu(parse(script), main_tid).items(), key=lambda kv: -kv[1][0])
    console = Console(width=200)
    table = Table(
        title=f"Off-CPU time per start, {starts} starts of /bin/true from {args.threads} threads "
        f"({args.variant}; {rate:,.0f} starts/s under perf)"
    )
    for col in ("process", "state", "where it waited (kernel)", "us per start", "waits per start"):
        table.add_column(col, justify="right" if col.endswith("start") else "left")
    report: Dict[str, object] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "threads": args.threads,
        "starts": starts,
        "variant": args.variant,
        "starts_per_s_under_perf": rate,
    }
    out: List[Dict[str, Any]] = [
        {"process": role, "state": state, "site": site, "us_per_start": secs * 1e6 / starts, "waits": n}
        for (role, state, site), (secs, n) in rows
    ]
    report["rows"] = out
    for row in out[: args.top]:
        table.add_row(
            row["process"], row["state"], row["site"], f"{row['us_per_start']:,.0f}", f"{row['waits'] / starts:.2f}"
        )
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
