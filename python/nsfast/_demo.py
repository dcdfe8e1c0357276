"""`nsfast demo` (what `make run` shows): isolation, then start latency next to subprocess."""

from __future__ import annotations

import socket
import statistics
import subprocess
import time

from ._process import run
from ._spec import DEFAULT_NAMESPACES

SCRIPT = r"""
echo "hostname:      $(hostname)"
echo "my pid:        $$"
echo "processes:     $(ls /proc | grep -c '^[0-9]')"
echo "interfaces:    $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
echo "ip link:       $(ip -o link 2>/dev/null | cut -d' ' -f2,3 | tr '\n' ' ')"
echo "uid:           $(id -u) inside, host uid $(awk '{print $2}' /proc/self/uid_map)"
echo "seccomp:       $(grep '^Seccomp:' /proc/self/status | cut -f2) (2 = filter)"
echo "/etc/shadow:   $(cat /etc/shadow >/dev/null 2>&1 && echo readable '(!)' || echo unreadable)"
echo "/run, /home:   $(find /run /home -mindepth 1 2>/dev/null | wc -l) entries (hidden)"
if touch /nsfast-demo 2>/dev/null; then echo "write to /:    allowed (!)"; else echo "write to /:    refused (read-only root)"; fi
if touch /tmp/x; then echo "write to /tmp: ok (private tmpfs: $(ls /tmp))"; fi
"""


def _median_ms(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def demo(n: int = 200) -> int:
    print(f"== host: hostname {socket.gethostname()}, many processes, all interfaces ==")
    print("== inside nsfast.run(['sh', '-c', ...], hostname='box') ==")
    r = run(["sh", "-c", SCRIPT], hostname="box", capture_output=True, text=True)
    print(r.stdout + r.stderr, end="")
    print(f"\n== start latency of /bin/true, median of {n} runs ==")
    for _ in range(20):  # warm up caches
        run(["/bin/true"])
    ns = _median_ms(lambda: run(["/bin/true"]), n)
    sp = _median_ms(lambda: subprocess.run(["/bin/true"]), n)
    print(f"nsfast.run (new {', '.join(DEFAULT_NAMESPACES)} ns; hardened):  {ns:7.3f} ms")
    print(f"subprocess.run (no isolation):                                     {sp:7.3f} ms")
    print(f"ratio: {ns / sp:.2f}x  (benches/start_latency.py compares with bwrap, crun, unshare)")
    return 0 if r.returncode == 0 else 1
