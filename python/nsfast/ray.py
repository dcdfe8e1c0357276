"""nsfast on a Ray cluster (`pip install nsfast[ray]`): the same sandboxes, run on whichever
node has room.

    import ray, nsfast.ray
    ray.init()
    ref = nsfast.ray.run(["python3", "-c", "print(6 * 7)"], capture_output=True)
    ray.get(ref).stdout                                   # b'42\\n'
    results = nsfast.ray.map([["echo", str(i)] for i in range(100)], capture_output=True)
    with nsfast.ray.PythonPool(num_actors=4, preload=("json",)) as pool:
        for r in pool.map_python(["print(1)", "print(2)"]):
            ...

Each task runs `nsfast.run(args, **run_kwargs)` on its node (a Ray task of `num_cpus` CPUs),
so limits, timeouts and usage are the node's own; the `Result` comes back pickled (results
and nsfast's errors round-trip). Ray retries a task whose node died (`max_retries`, 3 by
default); one that still fails raises its error from `ray.get`, never drops out of a map.
Code and results are data to nsfast: the sandbox's output is bytes in the Result, and a
`Zygote.call` result is JSON, never unpickled code from the sandbox.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import ray

from ._process import Result

__all__ = ["run", "map", "PythonPool"]


def _run(args: Any, run_kwargs: Dict[str, Any]) -> Result:
    import nsfast

    return nsfast.run(args, **run_kwargs)


_task = ray.remote(_run)


def run(args: Any, *, num_cpus: float = 1, max_retries: int = 3, **run_kwargs: Any) -> Any:
    """An ObjectRef of the `nsfast.Result` of `nsfast.run(args, **run_kwargs)` on some node."""
    return _task.options(num_cpus=num_cpus, max_retries=max_retries).remote(args, run_kwargs)


def map(
    list_of_args: Iterable[Any],
    *,
    concurrency: Optional[int] = None,
    num_cpus: float = 1,
    max_retries: int = 3,
    **run_kwargs: Any,
) -> List[Result]:
    """The Results of `nsfast.run(args, **run_kwargs)` for each args, in order, with at most
    `concurrency` tasks in flight (default: the cluster's CPUs / num_cpus): a long list does
    not flood the scheduler. A task that fails for good raises here."""
    if concurrency is None:
        cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
        concurrency = max(1, int(cpus // num_cpus))
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    pending = list(enumerate(list_of_args))[::-1]
    results: List[Optional[Result]] = [None] * len(pending)
    flight: Dict[Any, int] = {}
    while pending or flight:
        while pending and len(flight) < concurrency:
            i, args = pending.pop()
            flight[run(args, num_cpus=num_cpus, max_retries=max_retries, **run_kwargs)] = i
        done, _ = ray.wait(list(flight), num_returns=1)
        for ref in done:
            results[flight.pop(ref)] = ray.get(ref)
    return [r for r in results if r is not None]


class _ZygoteActor:
    """One nsfast.Zygote, kept warm in a Ray actor."""

    def __init__(self, preload: Sequence[str], zygote_kwargs: Dict[str, Any]) -> None:
        import nsfast

        self.zygote = nsfast.Zygote(tuple(preload), **zygote_kwargs)

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def run_python(self, code: str, kwargs: Dict[str, Any]) -> Result:
        return self.zygote.run_python(code, **kwargs)

    def close(self) -> None:
        self.zygote.close()


_actor = ray.remote(_ZygoteActor)

#: How many actors one PythonPool task is tried on before its error is raised.
_ATTEMPTS = 8


class PythonPool:
    """`num_actors` Ray actors, each with an `nsfast.Zygote(preload, **zygote_kwargs)`, spread
    over the cluster's nodes. An actor whose node dies is restarted elsewhere and its tasks
    retried (Ray's max_restarts / max_task_retries); a task that still fails raises from
    map_python, never drops out."""

    def __init__(
        self, num_actors: int = 2, preload: Sequence[str] = (), *, num_cpus: float = 1, **zygote_kwargs: Any
    ) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, not {num_actors}")
        opts = {"num_cpus": num_cpus, "max_restarts": -1, "max_task_retries": 3, "scheduling_strategy": "SPREAD"}
        # (Any: Ray's typing of actor handles does not follow through .options()).
        self.actors: List[Any] = [
            _actor.options(**opts).remote(tuple(preload), zygote_kwargs) for _ in range(num_actors)
        ]

    def nodes(self) -> List[str]:
        """The node id of each actor."""
        return list(ray.get([a.node.remote() for a in self.actors]))

    def map_python(self, codes: Iterable[str], *, concurrency: Optional[int] = None, **kwargs: Any) -> Iterator[Result]:
        """The Result of `Zygote.run_python(code, **kwargs)` for each code, streamed in order;
        at most `concurrency` in flight (default: two per actor), spread over the actors. A
        task whose actor died (its node, say) goes to the next actor, up to `_ATTEMPTS` times
        in all (Ray's own retries can run out while the actor is still restarting elsewhere);
        then its error is raised, never dropped."""
        limit = concurrency or 2 * len(self.actors)
        if limit < 1:
            raise ValueError(f"concurrency must be at least 1, not {limit}")
        flight: List[List[Any]] = []  # [code, actor number, ref, attempts]

        def submit(code: str, n: int, attempts: int) -> List[Any]:
            actor = self.actors[n % len(self.actors)]
            return [code, n, actor.run_python.remote(code, kwargs), attempts]

        def result(task: List[Any]) -> Result:
            while True:
                try:
                    return ray.get(task[2])  # type: ignore[no-any-return]
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    if task[3] >= _ATTEMPTS:
                        raise
                    time.sleep(0.2 * task[3])  # room for Ray to restart the actor
                    task[:] = submit(task[0], task[1] + 1, task[3] + 1)

        for i, code in enumerate(codes):
            flight.append(submit(code, i, 1))
            if len(flight) >= limit:
                yield result(flight.pop(0))
        for task in flight:
            yield result(task)

    def close(self) -> None:
        """End every actor's zygote and the actors."""
        for a in self.actors:
            try:
                ray.get(a.close.remote())
            except Exception:  # an actor already gone has nothing left to close
                pass
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> PythonPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
