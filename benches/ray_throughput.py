"""Tasks/s of nsfast.ray on one Ray node vs a 3-node local cluster (ray.cluster_utils.Cluster,
one CPU per node, all on this machine), and the per-task overhead Ray adds over a local
nsfast.run of the same command. One run; medians over the tasks.

    .venv/bin/python benches/ray_throughput.py [--tasks N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, List


def rate(n: int, submit: Callable[[], List[Any]]) -> float:
    t0 = time.perf_counter()
    results = submit()
    dt = time.perf_counter() - t0
    assert len(results) == n and all(r.returncode == 0 for r in results)
    return n / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=200)
    n = p.parse_args().tasks
    import ray
    from ray.cluster_utils import Cluster

    import nsfast
    import nsfast.ray as nray

    cmd = ["/bin/true"]
    local = []
    for _ in range(50):
        t0 = time.perf_counter()
        nsfast.run(cmd)
        local.append(time.perf_counter() - t0)
    local_ms = statistics.median(local) * 1e3
    rows = []
    for nodes in (1, 3):
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(nodes - 1):
            c.add_node(num_cpus=1)
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes()
        nray.map([cmd] * 10)  # warm the workers
        one = []
        for _ in range(30):
            t0 = time.perf_counter()
            ray.get(nray.run(cmd))
            one.append(time.perf_counter() - t0)
        tps = rate(n, lambda: nray.map([cmd] * n))
        rows.append((nodes, tps, statistics.median(one) * 1e3))
        ray.shutdown()
        c.shutdown()
    print(f"nsfast.run(['/bin/true']) locally: {local_ms:.2f} ms median (1 / {1e3 / local_ms:.0f} per s)")
    print("| Ray nodes | nsfast.ray.map tasks/s | one ray.get(nsfast.ray.run) ms | Ray's overhead ms |")
    print("|---:|---:|---:|---:|")
    for nodes, tps, one_ms in rows:
        print(f"| {nodes} | {tps:.0f} | {one_ms:.2f} | {one_ms - local_ms:+.2f} |")


if __name__ == "__main__":
    main()
