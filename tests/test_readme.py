"""The README's Python examples run as written: the doctest block (timings and sizes, which
vary, compared up to their digits) and the Container walkthrough (on the busybox rootfs the
walkthrough makes with tests/make-busybox-rootfs.sh)."""

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
