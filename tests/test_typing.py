"""The typed surface: keyword spec fields are checked by mypy (a typo is an error, not a
silently ignored option), and SpecFields stays equal to Spec's fields."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import nsfast

ROOT = Path(__file__).resolve().parent.parent


def test_spec_fields_typeddict_lists_exactly_the_spec_fields():
    fields = {f.name for f in dataclasses.fields(nsfast.Spec) if f.init}
    assert set(nsfast.SpecFields.__annotations__) == fields


def _mypy(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "user_code.py"
    f.write_text(code)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir=/dev/null", str(f)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"MYPYPATH": str(ROOT / "python"), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.timeout(180)
def test_mypy_rejects_a_misspelt_or_mistyped_spec_field(tmp_path):
    ok = _mypy(
        tmp_path,
        "import pathlib, nsfast\n"
        "r = nsfast.run(['true'], hostname='box', limits=nsfast.Limits(memory='64M'), tmp_size='1M')\n"
        "s = nsfast.Spec(rootfs=pathlib.Path('/'), mounts=[nsfast.Bind(pathlib.Path('/etc'), '/mnt')])\n"
        "t: int | None = s.tmp_size\n"
        "root: str | None = s.rootfs\n"
        "u: nsfast.Usage | None = r.usage\n"
        "try:\n    nsfast.run(['sleep', '1'], timeout=0.1)\n"
        "except nsfast.TimeoutExpired as e:\n    v: nsfast.Usage | None = e.usage\n",
    )
    assert ok.returncode == 0, ok.stdout
    bad = _mypy(
        tmp_path,
        "import nsfast\nnsfast.run(['true'], hostnme='box')\nnsfast.spawn(['true'], uid='root')\n"
        "nsfast.Container(rlimits=3)\nnsfast.Spec().replace(init='yes')\nnsfast.Spec(hostnme='x')\n",
    )
    assert bad.returncode == 1, bad.stdout
    for line, what in ((2, "hostnme"), (3, '"uid"'), (4, '"rlimits"'), (5, '"init"'), (6, "hostnme")):
        assert f"user_code.py:{line}: error" in bad.stdout and what in bad.stdout, bad.stdout
