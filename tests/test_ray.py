"""nsfast.ray on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a
head and two worker nodes, one CPU each): results from several nodes, limits enforced on the
workers, a worker node killed in the middle of a map."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Iterator

import psutil
import pytest

import nsfast
from conftest import needs_root

ray = pytest.importorskip("ray", reason="nsfast.ray needs Ray (pip install nsfast[ray])")
from ray.cluster_utils import Cluster  # noqa: E402

import nsfast.ray as nray  # noqa: E402

# Not the suite's no_child_left: the cluster's raylets and workers are this process's children.
pytestmark = [needs_root, pytest.mark.timeout(300)]

# This module's functions go to the workers by value (tests/ is not on their sys.path).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    # Dead nodes noticed in ~2 s rather than Ray's default ~30 s.
    fast = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 500}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()


def test_run_and_map_use_the_nodes(cluster: Any) -> None:
    r = ray.get(nray.run(["sh", "-c", "echo $((6 * 7)); cat /proc/1/comm"], capture_output=True, text=True))
    assert isinstance(r, nsfast.Result) and (r.returncode, r.stdout) == (0, "42\nnsfast-init\n")
    results = nray.map([["sh", "-c", f"sleep 0.3; echo {i}"] for i in range(9)], capture_output=True, text=True)
    assert [x.stdout for x in results] == [f"{i}\n" for i in range(9)]


def raylet_pids(c: Any, workers: list) -> dict:
    from ray._private import ray_constants

    return {
        n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: n.node_id for n in [c.head_node, *workers]
    }


def test_the_sandboxes_of_a_map_run_on_several_nodes(cluster: Any) -> None:
    """Seen from the host while a map runs: the map's sandboxes (their nsfast-init) are below
    the raylets of more than one node."""
    c, workers = cluster
    raylets = raylet_pids(c, workers)
    done: list = []
    t = threading.Thread(target=lambda: done.append(nray.map([["sleep", "1"]] * 6, capture_output=True)))
    t.start()
    seen: set = set()  # the nodes whose raylet an nsfast-init descends from (workers are its children)
    while t.is_alive():
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == "nsfast-init":
                    seen.add(next((raylets[q.pid] for q in p.parents() if q.pid in raylets), None))
            except psutil.NoSuchProcess:
                pass  # it ended meanwhile
        time.sleep(0.05)
    t.join()
    assert [r.returncode for r in done[0]] == [0] * 6
    assert len(seen - {None}) >= 2, seen  # None: a sandbox not of this cluster


def test_limits_are_enforced_on_the_workers(cluster: Any) -> None:
    ref = nray.run(
        ["python3", "-c", "bytearray(300 << 20)"], limits=nsfast.Limits(memory="64M", pids=32), capture_output=True
    )
    r = ray.get(ref)
    assert r.returncode == -9 and r.usage is not None and r.usage.oom_killed, r
    with pytest.raises(nsfast.SpecError, match="memory"):
        ray.get(nray.run(["true"], limits=nsfast.Limits(memory="lots")))  # type: ignore[arg-type]


def test_python_pool_streams_in_order_over_several_nodes(cluster: Any) -> None:
    with nray.PythonPool(num_actors=3, preload=("json",)) as pool:
        assert len(set(pool.nodes())) >= 2
        codes = [f"import json; print(json.dumps({i}))" for i in range(12)]
        out = [r.stdout for r in pool.map_python(codes, text=True)]
        assert out == [f"{i}\n" for i in range(12)]


def test_a_dead_worker_node_loses_no_task(cluster: Any) -> None:
    c, workers = cluster
    victim = workers[0]
    box: dict = {}

    def mapping() -> None:
        box["r"] = nray.map([["sh", "-c", f"sleep 1; echo {i}"] for i in range(8)], capture_output=True, text=True)

    th = threading.Thread(target=mapping)
    th.start()
    time.sleep(1.5)  # tasks are running on every node now
    c.remove_node(victim, allow_graceful=False)
    th.join(240)
    assert not th.is_alive()
    assert [r.stdout for r in box["r"]] == [f"{i}\n" for i in range(8)]
    workers[0] = c.add_node(num_cpus=1)  # for what follows
    c.wait_for_nodes()


def test_a_dead_worker_node_loses_no_pool_task(cluster: Any) -> None:
    """The node of one of the pool's actors dies mid-map: the actor restarts on a node with
    room, its tasks are retried, every result comes back in order."""
    c, workers = cluster
    with nray.PythonPool(num_actors=2) as pool:
        where = pool.nodes()
        victims = [w for w in workers if w.node_id in where]
        assert victims, (where, [w.node_id for w in workers])
        box: dict = {}

        def mapping() -> None:
            codes = [f"import time; time.sleep(0.5); print({i})" for i in range(8)]
            box["r"] = [r.stdout for r in pool.map_python(codes, text=True)]

        th = threading.Thread(target=mapping)
        th.start()
        time.sleep(1.0)
        c.remove_node(victims[0], allow_graceful=False)
        th.join(240)
        assert not th.is_alive()
        assert box["r"] == [f"{i}\n" for i in range(8)]
    workers[workers.index(victims[0])] = c.add_node(num_cpus=1)
    c.wait_for_nodes()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_actors must be at least 1"):
        nray.PythonPool(num_actors=0)
