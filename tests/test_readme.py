"""Every code block of the README runs as written: each Python block (doctests compared, the
Container walkthrough run on the busybox root make-busybox-rootfs.sh makes, the image examples
on the image make-busybox-image.sh makes) and each console block,
command by command in one bash, its output compared with the README's (numbers, which are
the run's own, compared as N). The two set-up commands (make run, make test) are what CI
runs itself."""

from __future__ import annotations

import doctest
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

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


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The README's paths, made for the test as the README makes them: the busybox root of
    make-busybox-rootfs.sh and the OCI image of make-busybox-image.sh (its cache, and the
    examples' temporary directories, the test's)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    if not shutil.which("umoci"):
        pytest.skip("umoci is needed for the README's image (.ci/apt-deps installs it)")
    root, image = tmp_path / "busybox-root", tmp_path / "busybox-oci"
    for script, where in (("make-busybox-rootfs.sh", root), ("make-busybox-image.sh", image)):
        subprocess.run([str(ROOT / "tests" / script), str(where)], check=True, capture_output=True)
    nsfast.configure(image_cache=tmp_path / "image-cache")
    try:
        yield {"/tmp/busybox-root": str(root), "/tmp/busybox-oci": str(image)}
    finally:
        nsfast.configure(image_cache=None)


def replaced(text: str, places: dict[str, str]) -> str:
    for readme, here in places.items():
        text = text.replace(readme, here)
    return text


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block(index: int, places: dict[str, str]) -> None:
    """Each ```python block: a doctest (its output compared) or a script (its asserts)."""
    block = replaced(python_blocks()[index], places)
    if block.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(block, {"nsfast": nsfast}, "README.md", "README.md", 0)
        runner = doctest.DocTestRunner(checker=_Numbers(), optionflags=doctest.ELLIPSIS)
        runner.run(test)
        assert runner.failures == 0 and runner.tries == len(test.examples) >= 3
    else:
        exec(compile(block, "README.md", "exec"), {"nsfast": nsfast})


def test_readme_has_a_block_per_step() -> None:
    """The user's path has an example at each step (and each is run above)."""
    text = (ROOT / "README.md").read_text()
    for section in ("First sandbox", "Limits and usage", "Containers and exec", "Zygotes and asyncio",
                    "Images and copy-on-write", "Ray", "CLI"):  # fmt: skip
        body = re.search(rf"^## {re.escape(section)}.*?\n(.*?)(?=^## )", text, re.M | re.S)
        assert body and re.search(r"^```(python|console)$", body.group(1), re.M), section


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


def test_readme_console_blocks(tmp_path: Path, places: dict[str, str]) -> None:
    """Each console block runs in one bash, as a reader would type it (the nsfast command is
    the venv's; the busybox root, the image, its cache and the state directory are the test's)."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "NSFAST_STATE_DIR": str(tmp_path / "state"),
        "NSFAST_IMAGE_CACHE": str(tmp_path / "image-cache"),
    }
    blocks = console_blocks()
    assert len(blocks) >= 2
    for pairs in blocks:
        script = ["exec 2>&1"]  # what the terminal shows: both, in order
        for i, (cmd, _) in enumerate(pairs):
            script += [f"echo @@{i}@@", replaced(cmd, places)]
        try:
            r = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, cwd=ROOT, env=env,
                               timeout=120)  # fmt: skip
        finally:
            subprocess.run(["nsfast", "stop", "-t", "0", "demo"], capture_output=True, env=env, timeout=60)
        out = replaced(r.stdout, {here: readme for readme, here in places.items()})
        got = re.split(r"^@@[0-9]+@@\n", out, flags=re.M)[1:]
        assert len(got) == len(pairs), (out, r.stderr)
        for (cmd, want), text in zip(pairs, got):
            assert normalized(text.splitlines()) == normalized(want), (cmd, text, r.stderr)


def test_readme_setup_commands() -> None:
    """The README opens with exactly the two set-up commands; each is a make target whose
    recipe does the set-up and then the demo or the tests (CI runs `make test` itself; this
    checks the README still names what the Makefile does, by a dry run)."""
    block = re.search(r"^```sh\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    assert block
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make run", "make test"]
    for command, does in (("make run", "-m nsfast demo"), ("make test", "-m pytest")):
        r = subprocess.run([*command.split(), "-n", "-C", str(ROOT)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "apt-deps" in r.stdout and "maturin develop" in r.stdout and does in r.stdout, r.stdout


def test_readme_cli_synopsis_is_the_parser() -> None:
    """The CLI synopsis names exactly the options each subcommand's parser has (`NS` standing
    for every namespace type; one name of an option with several), so neither drifts."""
    from nsfast import cli

    text = (ROOT / "README.md").read_text()
    synopsis = re.search(r"^## CLI\n\n```\n(.*?)^```", text, re.M | re.S)
    assert synopsis
    parser = cli.build_parser()
    [subs] = [a.choices for a in parser._actions if isinstance(a.choices, dict)]
    plain = re.sub(r"\(also: .*?\)", "", " ".join(synopsis.group(1).split()))
    lines = re.split(r"\s+(?=nsfast )", plain.strip())
    assert {line.split()[1] for line in lines} == {*subs, "--version"}, lines
    assert "--version" in parser._option_string_actions
    for line in lines:
        name, rest = line.split()[1], " ".join(line.split()[2:])
        if name == "--version":
            continue
        named = set(re.findall(r"(?<![\w-])--?[a-zA-Z][a-zA-Z-]*", rest))
        named = {f for f in named if not f.endswith("-NS")} | {
            f[:-2] + ns for f in named if f.endswith("-NS") for ns in nsfast.NAMESPACES
        }
        actions = [a for a in subs[name]._actions if a.option_strings and "--help" not in a.option_strings]
        assert named <= {f for a in actions for f in a.option_strings}, (name, named)
        assert [a.option_strings for a in actions if not named & set(a.option_strings)] == [], name
