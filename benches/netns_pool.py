"""Start latency with and without `nsfast.configure(netns_pool=N)`.

A network namespace is the dearest part of a start; with a pool a thread of nsfast's makes
them ahead and each start takes one. Rows (interleaved in rounds so that machine drift hits
all alike; median and p90 of every start): the default sandbox without a pool, with a pool,
and without a network namespace at all (the floor the pool can reach), for `/bin/true`
(nothing to overlap: the pool's thread competes with the next start for the CPUs) and for
`/bin/sleep 0.003` (a command that runs a little, as real ones do: the thread refills
meanwhile). Root only (a pool needs CAP_SYS_ADMIN). Run: `.venv/bin/python
benches/netns_pool.py [--rounds 60] [--json PATH]` after `make build`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional

from rich.console import Console
from rich.table import Table

COMMANDS = {"/bin/true": ["/bin/true"], "/bin/sleep 0.003": ["/bin/sleep", "0.003"]}
POOL = 2


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=60, help="interleaved rounds (default 60)")
    p.add_argument("--batch", type=int, default=10, help="starts per row per round (default 10)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("netns_pool.py: a pool needs CAP_SYS_ADMIN (run as root)", file=sys.stderr)
        return 2
    import nsfast

    full = nsfast.Spec()
    no_net = nsfast.Spec(namespaces=tuple(n for n in full.namespaces if n != "net"))
    variants = {"no pool": (full, 0), f"netns_pool={POOL}": (full, POOL), "no network namespace": (no_net, 0)}
    times: Dict[str, List[float]] = {f"{c}, {v}": [] for c in COMMANDS for v in variants}
    for _ in range(args.rounds):
        for cname, argv_ in COMMANDS.items():
            for vname, (spec, size) in variants.items():
                nsfast.configure(netns_pool=size)
                nsfast.run(argv_, spec=spec)  # warm (and, with a pool, let it refill)
                time.sleep(0.005)
                for _ in range(args.batch):
                    t = time.perf_counter()
                    nsfast.run(argv_, spec=spec)
                    times[f"{cname}, {vname}"].append(time.perf_counter() - t)
    nsfast.configure(netns_pool=0)
    table = Table(title=f"nsfast.run start to exit, {args.rounds} rounds x {args.batch} per row")
    for col in ("command, variant", "median ms", "p90 ms", "vs no pool"):
        table.add_column(col, justify="left" if col.startswith("command") else "right")
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kernel": platform.release(), "rows": []}
    for cname in COMMANDS:
        base = statistics.median(times[f"{cname}, no pool"])
        for vname in variants:
            v = sorted(times[f"{cname}, {vname}"])
            med, p90 = statistics.median(v), v[int(len(v) * 0.9)]
            table.add_row(f"{cname}, {vname}", f"{med * 1e3:.3f}", f"{p90 * 1e3:.3f}", f"{(med - base) * 1e3:+.3f} ms")
            report["rows"].append({"command": cname, "variant": vname, "median_ms": med * 1e3, "p90_ms": p90 * 1e3})
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
