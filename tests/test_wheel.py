"""The wheel and sdist `make wheel` builds, installed as a user would: the wheel into a fresh
venv with no Rust toolchain on PATH, the sdist built from source. Slow (two release builds),
so one module-scoped build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import BUSYBOX, CGROUP_ENV, suite

# Two release builds from scratch on a fresh machine: minutes, not the suite's 120 s.
pytestmark = [*suite, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent

SMOKE = textwrap.dedent("""
    import json, sys
    import nsfast
    r = nsfast.run(["sh", "-c", "echo hi; cat /proc/1/comm; id -u"], capture_output=True, text=True)
    # A root with one static busybox and no libc: nsfast-init (pid 1) runs there only if static.
    bare = nsfast.run(["/bin/busybox", "cat", "/proc/1/comm"], rootfs=sys.argv[1], capture_output=True, text=True)
    with nsfast.Container() as c:
        e = c.exec(["cat", "/proc/1/comm"], capture_output=True, text=True)
    print(json.dumps({"file": nsfast.__file__, "version": nsfast.__version__, "rc": r.returncode,
                      "out": r.stdout, "exec": e.stdout, "bare": [bare.returncode, bare.stdout, bare.stderr]}))
""")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(["make", "-C", str(ROOT), "wheel", f"DIST={out}"], capture_output=True, text=True,
                       timeout=1800)  # fmt: skip
    assert r.returncode == 0, f"make wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (out / "auditwheel.txt").write_text(r.stdout)
    return out


def venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    return where / "bin" / "python"


def smoke(python: Path, cwd: Path, path: str) -> dict:
    # A user's bare environment, but the session's cgroup root (CGROUP_ENV): without it nsfast,
    # run as root, makes its cgroups below this process's own, which here is the machine's.
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", **CGROUP_ENV}
    bare = cwd / "bare-root"
    (bare / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, bare / "bin" / "busybox")
    r = subprocess.run([str(python), "-c", SMOKE, str(bare)], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_wheel_is_manylinux_2_17(dist: Path) -> None:
    [wheel] = dist.glob("*.whl")
    assert wheel.name.endswith("-cp39-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"), wheel.name
    assert (
        'consistent with the following platform tag:\n"manylinux_2_17_x86_64"' in (dist / "auditwheel.txt").read_text()
    )


def test_the_wheel_and_sdist_hold_the_licenses(dist: Path) -> None:
    [wheel], [sdist] = dist.glob("*.whl"), dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = {n.rsplit("/", 1)[-1]: n for n in z.namelist() if ".dist-info/" in n}
        assert {"LICENSE-MIT", "LICENSE-APACHE"} <= names.keys(), sorted(names)
        assert z.read(names["LICENSE-MIT"]) == (ROOT / "LICENSE-MIT").read_bytes()
        meta = z.read(names["METADATA"]).decode()
    assert "License-File: LICENSE-MIT" in meta and "Requires-Dist: ray" in meta and "# nsfast" in meta
    assert not [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    with tarfile.open(sdist) as t:
        base = {n.split("/", 1)[-1] for n in t.getnames()}
    assert {"LICENSE-MIT", "LICENSE-APACHE", "README.md", "Cargo.toml", "rust/init/main.rs"} <= base


def test_the_wheel_installs_and_runs_without_rust(dist: Path, tmp_path: Path) -> None:
    [wheel] = dist.glob("*.whl")
    py = venv(tmp_path / "venv")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)], check=True,
                   timeout=300)  # fmt: skip
    path = f"{tmp_path / 'venv' / 'bin'}:/usr/bin:/bin"
    assert shutil.which("cargo", path=path) is None and shutil.which("rustc", path=path) is None
    got = smoke(py, tmp_path, path)
    assert got["file"].startswith(str(tmp_path / "venv")), got  # the installed package, not the tree
    assert (got["rc"], got["out"], got["exec"]) == (0, "hi\nnsfast-init\n0\n", "nsfast-init\n")
    assert got["bare"] == [0, "nsfast-init\n", ""], got
    cli = subprocess.run([str(tmp_path / "venv" / "bin" / "nsfast"), "--version"], capture_output=True, text=True)
    assert cli.stdout == f"nsfast {got['version']}\n"


def test_the_sdist_builds_and_runs(dist: Path, tmp_path: Path) -> None:
    [sdist] = dist.glob("*.tar.gz")
    py = venv(tmp_path / "venv")
    env = {**os.environ, "PATH": f"{tmp_path / 'venv' / 'bin'}:{os.environ['PATH']}"}
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(sdist)], capture_output=True, text=True, env=env,
                       timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = smoke(py, tmp_path, f"{tmp_path / 'venv' / 'bin'}:/usr/bin:/bin")
    assert got["file"].startswith(str(tmp_path / "venv")) and got["rc"] == 0 and got["out"].startswith("hi\n"), got
