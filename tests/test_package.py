"""The package as pip sees it: its metadata, version and licenses (issue: ship it)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import nsfast

ROOT = Path(__file__).resolve().parent.parent


def cargo_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^version = "([^"]+)"', text, re.M)
    assert m, "no workspace version in Cargo.toml"
    return m.group(1)


def test_one_version_everywhere():
    assert nsfast.__version__ == importlib.metadata.version("nsfast") == cargo_version()
    r = subprocess.run([sys.executable, "-m", "nsfast", "--version"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, f"nsfast {cargo_version()}\n")


def test_runtime_needs_only_the_standard_library():
    """Every requirement is an extra's (test, bench): the package imports nothing else."""
    reqs = importlib.metadata.requires("nsfast") or []
    assert reqs and all("extra ==" in r for r in reqs), reqs
    for path in (ROOT / "python" / "nsfast").glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+psutil\b", path.read_text(), re.M), path


def test_licenses_are_shipped():
    meta = importlib.metadata.metadata("nsfast")
    assert meta["License"] == "MIT OR Apache-2.0"
    assert sorted(meta.get_all("License-File") or []) == ["LICENSE-APACHE", "LICENSE-MIT"]
    assert (ROOT / "LICENSE-MIT").read_text().startswith("MIT License")
    assert "Apache License" in (ROOT / "LICENSE-APACHE").read_text()[:200]


def test_every_public_name_has_a_docstring():
    """What `nsfast.__all__` exports, and the public methods and properties of its classes."""
    import inspect

    missing = []
    for name in nsfast.__all__:
        obj = getattr(nsfast, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants, and Mount (a typing alias)
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_") or not (inspect.isfunction(value) or isinstance(value, property)):
                    continue
                if not (value.__doc__ or "").strip():
                    missing.append(f"{name}.{attr}")
    assert missing == []
