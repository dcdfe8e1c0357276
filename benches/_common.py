"""Helpers shared by exec_latency.py and cgroup_cost.py (the machinery they share with
start_latency.py -- Tool, Batch, timed_calls, measure, the crun worker's pipe protocol, the
environment record and the rich header -- is imported from start_latency.py itself, which
stays self-contained; start_latency.py imports this module late, for its bootstrap intervals)."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

BENCHES = Path(__file__).resolve().parent
if str(BENCHES) not in sys.path:  # `import start_latency` also when run from elsewhere
    sys.path.insert(0, str(BENCHES))

from start_latency import median, quantile  # noqa: E402

BOOTSTRAP_SEED = 20240601


def bootstrap(
    stat: Callable[[List[int]], float], n: int, resamples: int = 2000, seed: int = BOOTSTRAP_SEED
) -> Tuple[float, float]:
    """95% percentile interval of `stat(indices)` over `resamples` draws of n indices with
    replacement (a fixed seed, so reruns on the same data agree)."""
    rng = random.Random(seed)
    values = sorted(stat([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return quantile(values, 0.025), quantile(values, 0.975)


def ratio_interval(num: Sequence[float], den: Sequence[float], resamples: int = 2000) -> Tuple[float, float]:
    """95% bootstrap interval of median(num) / median(den), the two resampled independently."""
    rng = random.Random(BOOTSTRAP_SEED)
    out = []
    for _ in range(resamples):
        a = median([num[rng.randrange(len(num))] for _ in num])
        b = median([den[rng.randrange(len(den))] for _ in den])
        out.append(a / b)
    out.sort()
    return quantile(out, 0.025), quantile(out, 0.975)


def flat(groups: Sequence[Sequence[float]], idx: Sequence[int]) -> List[float]:
    """The samples of the groups (rounds) `idx`, in that order; a bootstrap draw of rounds."""
    return [x for i in idx for x in groups[i]]


def rounds_interval(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    op: Callable[[float, float], float],
    resamples: int = 2000,
) -> Tuple[float, float]:
    """95% bootstrap interval of op(median(a), median(b)) for two tools measured in the same
    interleaved rounds (a[i], b[i]: their samples of round i): the same rounds are drawn for
    both, with replacement, so the pairing in time is kept. Rounds where either has no
    sample are left out."""
    pairs = [(x, y) for x, y in zip(a, b) if x and y]
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    return bootstrap(lambda idx: op(median(flat(xs, idx)), median(flat(ys, idx))), len(pairs), resamples)


def fmt_ms(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_signed_ms(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:+.{digits}f}"


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


__all__ = [
    "bootstrap",
    "ratio_interval",
    "rounds_interval",
    "flat",
    "fmt_ms",
    "fmt_signed_ms",
    "verdict",
    "median",
    "quantile",
]
