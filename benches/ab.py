"""A/B start latency of two nsfast builds, interleaved in one run.

This machine's speed drifts by up to 2x between runs, more than most changes are worth, so
two builds are only comparable measured together: one worker process per build (each
imports its own `nsfast` package), taking turns in random order, `--batch` starts per
variant per turn. Reported: the median of each variant and what `overlay=True` adds.

    .venv/bin/python benches/ab.py --a /tmp/oldpkg --b '' --image /tmp/busybox-oci
    .venv/bin/python benches/ab.py --a /tmp/oldpkg --b '' --zygote   # a zygote task instead

`--a`/`--b`: a directory that holds an `nsfast` package (an unpacked wheel), or '' for the
one this interpreter imports. `--image`: an OCI layout for the image rows (optional).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import nsfast
specs = {"read-only host root": nsfast.Spec(), "host root, overlay=True": nsfast.Spec(overlay=True)}
if sys.argv[1]:
    image = nsfast.Image(sys.argv[1])
    specs["image"] = nsfast.Spec(rootfs=image)
    specs["image, overlay=True"] = nsfast.Spec(rootfs=image, overlay=True)
calls = {name: (lambda spec=spec: nsfast.run(["/bin/true"], spec=spec)) for name, spec in specs.items()}
if sys.argv[2] == "zygote":
    z = nsfast.Zygote()
    calls = {'Zygote.run_python("pass")': lambda: z.run_python("pass")}
    for _ in range(20):
        z.run_python("pass")
for line in sys.stdin:
    out = {}
    for name, call in calls.items():
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out[name] = times
    print(json.dumps(out), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="directory holding build A's nsfast package ('' = installed)")
    ap.add_argument("--b", required=True, help="directory holding build B's nsfast package ('' = installed)")
    ap.add_argument("--image", default="", help="an OCI image layout for the image rows")
    ap.add_argument("--zygote", action="store_true", help="time Zygote.run_python('pass') instead of the starts")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--batch", type=int, default=5)
    args = ap.parse_args()
    workers = {}
    for name, path in (("A", args.a), ("B", args.b)):
        env = dict(os.environ)
        if path:
            env["PYTHONPATH"] = path
        workers[name] = subprocess.Popen(
            [sys.executable, "-c", WORKER, args.image, "zygote" if args.zygote else ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
    samples: dict[str, dict[str, list[float]]] = {w: {} for w in workers}
    for _ in range(args.rounds):
        order = list(workers)
        random.shuffle(order)
        for w in order:
            proc = workers[w]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{args.batch}\n")
            proc.stdin.flush()
            for variant, times in json.loads(proc.stdout.readline()).items():
                samples[w].setdefault(variant, []).extend(times)
    for proc in workers.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    n = args.rounds * args.batch
    print(f"n = {n} per variant per build; A = {args.a or 'installed'}, B = {args.b or 'installed'}")
    print("| build | variant | median ms | what overlay=True adds, ms |")
    print("|---|---|---:|---:|")
    for w, by in samples.items():
        med = {v: statistics.median(t) * 1e3 for v, t in by.items()}
        for v, m in med.items():
            base = {"host root, overlay=True": "read-only host root", "image, overlay=True": "image"}.get(v)
            added = f"+{m - med[base]:.2f}" if base else ""
            print(f"| {w} | {v} | {m:.2f} | {added} |")


if __name__ == "__main__":
    main()
