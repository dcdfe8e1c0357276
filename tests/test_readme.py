"""Every code block of the README runs as written: the doctest block, the Container
walkthrough (on the busybox rootfs make-busybox-rootfs.sh makes) and each console block,
command by command in one bash, its output compared with the README's (numbers, which are
the run's own, compared as N). The two set-up commands (make run, make test) are what CI
runs itself."""

from __future__ import annotations

import doctest
import re
import subprocess
from pathlib import Path

import nsfast
from conftest import suite

pytestmark = suite

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


class _Numbers(doctest.OutputChecker):
    """Numbers in Usage(...) are the run's own: compare the rest."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        if want.startswith("Usage("):
            num = r"[0-9.]+"
            return re.sub(num, "N", want) == re.sub(num, "N", got)
        return super().check_output(want, got, optionflags)


def test_readme_doctest_block():
    [block] = [b for b in python_blocks() if b.lstrip().startswith(">>>")]
    test = doctest.DocTestParser().get_doctest(block, {"nsfast": nsfast}, "README.md", "README.md", 0)
    runner = doctest.DocTestRunner(checker=_Numbers(), optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.failures == 0 and runner.tries == len(test.examples) >= 5


def test_readme_container_block(tmp_path):
    [block] = [b for b in python_blocks() if "nsfast.Container(" in b]
    root = tmp_path / "busybox-root"
    subprocess.run([str(ROOT / "tests" / "make-busybox-rootfs.sh"), str(root)], check=True, capture_output=True)
    code = block.replace("/tmp/busybox-root", str(root))
    scope = {"nsfast": nsfast}
    exec(compile(code, "README.md", "exec"), scope)


def console_blocks() -> list[list[tuple[str, list[str]]]]:
    """Each ```console block as [(command, expected output lines)]."""
    blocks = []
    for text in re.findall(r"^```console\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S):
        pairs: list[tuple[str, list[str]]] = []
        for line in text.splitlines():
            if line.startswith("$ "):
                pairs.append((line[2:], []))
            else:
                pairs[-1][1].append(line)
        blocks.append(pairs)
    return blocks


def normalized(lines: list[str]) -> list[str]:
    """Numbers (pids, inodes, times, sizes) are the run's own: compared as N; spacing too."""
    return [" ".join(re.sub(r"[0-9]+(\.[0-9]+)?", "N", line).split()) for line in lines if line.strip()]


def test_readme_console_blocks(tmp_path):
    """Each console block runs in one bash, as a reader would type it (the nsfast command is
    the venv's; the busybox root and the state directory are the test's own)."""
    import os
    import sys

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "NSFAST_STATE_DIR": str(tmp_path / "state"),
    }
    blocks = console_blocks()
    assert len(blocks) >= 2
    for pairs in blocks:
        script = ["exec 2>&1"]  # what the terminal shows: both, in order
        for i, (cmd, _) in enumerate(pairs):
            script += [f"echo @@{i}@@", cmd.replace("/tmp/busybox-root", str(tmp_path / "busybox-root"))]
        try:
            r = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, cwd=ROOT, env=env,
                               timeout=120)  # fmt: skip
        finally:
            subprocess.run(["nsfast", "stop", "-t", "0", "demo"], capture_output=True, env=env, timeout=60)
        out = r.stdout.replace(str(tmp_path / "busybox-root"), "/tmp/busybox-root")
        got = re.split(r"^@@[0-9]+@@\n", out, flags=re.M)[1:]
        assert len(got) == len(pairs), (out, r.stderr)
        for (cmd, want), text in zip(pairs, got):
            assert normalized(text.splitlines()) == normalized(want), (cmd, text, r.stderr)
