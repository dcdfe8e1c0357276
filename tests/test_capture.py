"""What the caller keeps of a sandbox's captured stdout and stderr: `capture_max_bytes`.

A sandbox's memory limit bounds what it holds, not what the caller holds of what it
writes: without a cap, `cat /dev/zero` under a 64 MiB limit made the caller take 1.7 GiB
in 2 s. A stream that passes the cap kills the sandbox and raises OutputLimitError."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

import nsfast
from conftest import sandbox_cgroups, suite
from nsfast._process import DEFAULT_CAPTURE_MAX_BYTES

pytestmark = suite

FLOOD = ["sh", "-c", "cat /dev/zero"]


def test_a_flood_is_cut_at_the_default_and_the_caller_stays_small() -> None:
    """The attack, in a fresh interpreter so its peak memory is the run's: a sandbox under
    a 64 MiB memory limit writes zeros to its stdout as fast as it can."""
    code = textwrap.dedent(
        """
        import json, resource, nsfast
        try:
            nsfast.run(["sh", "-c", "cat /dev/zero"], capture_output=True, timeout=20,
                       limits=nsfast.Limits(memory="64M"))
            print(json.dumps({"raised": None}))
        except nsfast.OutputLimitError as e:
            r = e.result
            print(json.dumps({"raised": type(e).__name__, "path": e.path, "len": len(r.stdout),
                              "zeros": r.stdout.count(0), "rc": r.returncode,
                              "termination": r.usage.termination,
                              "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        except nsfast.TimeoutExpired as e:
            print(json.dumps({"raised": "TimeoutExpired", "len": len(e.output or b""),
                              "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=True).stdout
    got = json.loads(out)
    assert got["raised"] == "OutputLimitError", got
    assert got["path"] == "stdout"
    assert got["len"] == got["zeros"] == DEFAULT_CAPTURE_MAX_BYTES
    assert got["rc"] == -9 and got["termination"] == "output"
    # The cap (64 MiB), the join (64 MiB more), the interpreter: far from gigabytes.
    assert got["maxrss"] < 3 * DEFAULT_CAPTURE_MAX_BYTES + (100 << 20), got


@pytest.mark.parametrize("api", ["run", "arun"])
def test_output_a_byte_per_write_costs_the_caller_what_it_counts(api: str) -> None:
    """(Found by an audit.) Each read was kept as a bytes object of its own: written a byte
    per write(), 8 MB of output took the caller from 27 to 369 MiB (~43 bytes per byte; 2.7
    GiB at the default cap). In a fresh interpreter, so its peak is the run's."""
    code = textwrap.dedent(
        f"""
        import asyncio, json, resource, nsfast
        args = ["dd", "if=/dev/zero", "bs=1", "count=3000000", "status=none"]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if {api!r} == "run":
            r = nsfast.run(args, capture_output=True, timeout=100)
        else:
            r = asyncio.run(nsfast.arun(args, capture_output=True, timeout=100))
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print(json.dumps([r.returncode, len(r.stdout), grew]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=200, check=True).stdout
    rc, n, grew = json.loads(out)
    assert (rc, n) == (0, 3_000_000)
    # The buffer, its copy as bytes, the interpreter's own: not 40 bytes per byte (120 MB).
    assert grew < 40 << 20, f"the caller grew by {grew >> 20} MiB for 3 MB of output"


def test_the_limit_is_exact() -> None:
    r = nsfast.run(["head", "-c", "1000", "/dev/zero"], capture_output=True, capture_max_bytes=1000)
    assert (len(r.stdout), r.returncode, r.usage.termination) == (1000, 0, "exit")
    with pytest.raises(nsfast.OutputLimitError) as e:
        nsfast.run(["head", "-c", "1001", "/dev/zero"], capture_output=True, capture_max_bytes=1000)
    assert e.value.result.stdout == b"\0" * 1000 and e.value.limit == 1000
    r = nsfast.run(["true"], capture_output=True, capture_max_bytes=0)
    assert (r.stdout, r.stderr) == (b"", b"")
    with pytest.raises(nsfast.OutputLimitError):
        nsfast.run(["echo"], capture_output=True, capture_max_bytes=0)


def test_each_stream_has_the_limit_and_the_other_keeps_what_came_first() -> None:
    with pytest.raises(nsfast.OutputLimitError) as e:
        nsfast.run(["sh", "-c", "echo before; cat /dev/zero >&2"], capture_output=True, capture_max_bytes=4096)
    err = e.value
    assert err.path == "stderr" and isinstance(err, nsfast.OutputError)
    assert err.result.stdout == b"before\n" and err.result.stderr == b"\0" * 4096
    assert "stderr passed capture_max_bytes=4096" in str(err)


def test_the_kill_is_immediate_not_the_timeout() -> None:
    """The program goes on running after it wrote too much: it is killed then, not left
    to run into its timeout."""
    with pytest.raises(nsfast.OutputLimitError) as e:
        nsfast.run(
            ["sh", "-c", "head -c 100 /dev/zero; exec sleep 60"], capture_output=True, capture_max_bytes=10, timeout=60
        )
    r = e.value.result
    assert r.returncode == -9 and r.usage.termination == "output" and r.usage.wall_s < 30


def test_text_cut_inside_a_character_leaves_that_character_out() -> None:
    with pytest.raises(nsfast.OutputLimitError) as e:
        nsfast.run(["printf", "ééé"], capture_output=True, text=True, capture_max_bytes=3)
    assert e.value.result.stdout == "é"


def test_check_does_not_hide_the_cut() -> None:
    with pytest.raises(nsfast.OutputLimitError):
        nsfast.run(FLOOD, capture_output=True, capture_max_bytes=10, check=True)


def test_none_lifts_the_limit() -> None:
    size = DEFAULT_CAPTURE_MAX_BYTES + 4096
    r = nsfast.run(["head", "-c", str(size), "/dev/zero"], capture_output=True, capture_max_bytes=None)
    assert len(r.stdout) == size and r.returncode == 0


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1M"])
def test_a_bad_limit_is_refused_before_anything_runs(bad: object, tmp_path: Path) -> None:
    mark = tmp_path / "ran"
    with pytest.raises(nsfast.SpecError, match="capture_max_bytes"):
        nsfast.run(
            ["touch", "/mnt/ran"],
            capture_output=True,
            capture_max_bytes=bad,  # type: ignore[arg-type]
            mounts=[nsfast.Bind(tmp_path, "/mnt", readonly=False)],
        )
    assert not mark.exists()
    with pytest.raises(nsfast.SpecError, match="capture_max_bytes"):
        asyncio.run(nsfast.arun(["true"], capture_output=True, capture_max_bytes=bad))  # type: ignore[arg-type]


def test_communicate_of_a_spawned_sandbox() -> None:
    p = nsfast.spawn(FLOOD, stdout=nsfast.PIPE)
    with p, pytest.raises(nsfast.OutputLimitError) as e:
        p.communicate(capture_max_bytes=100)
    assert p.returncode == -9 and e.value.result.stdout == b"\0" * 100
    assert p.usage is not None and p.usage.termination == "output"


def test_a_cut_run_leaves_nothing_behind(nothing_left_behind: None) -> None:
    for _ in range(30):
        with pytest.raises(nsfast.OutputLimitError) as e:
            nsfast.run(FLOOD, capture_output=True, capture_max_bytes=1 << 16, outputs=["/tmp/*"])
        assert e.value.result.files == {}


def test_writers_that_ignore_sigpipe_all_die_with_the_sandbox() -> None:
    """A program that ignores SIGPIPE and forks writers of both streams: all of them die
    with the sandbox; the call returns."""
    script = "trap '' PIPE; for i in 1 2 3 4; do (cat /dev/zero; cat /dev/zero >&2) & done; wait"
    before = sandbox_cgroups()
    with pytest.raises(nsfast.OutputLimitError) as e:
        nsfast.run(["sh", "-c", script], capture_output=True, capture_max_bytes=1 << 20, timeout=60)
    assert e.value.result.usage.termination == "output"
    assert sandbox_cgroups() == before


def test_arun() -> None:
    async def main() -> nsfast.OutputLimitError:
        with pytest.raises(nsfast.OutputLimitError) as e:
            await nsfast.arun(["sh", "-c", "echo x >&2; cat /dev/zero"], capture_output=True, capture_max_bytes=5000)
        p = await nsfast.aspawn(FLOOD, stdout=nsfast.PIPE)
        with pytest.raises(nsfast.OutputLimitError):
            await p.communicate(capture_max_bytes=7)
        assert p.returncode == -9
        return e.value

    err = asyncio.run(main())
    assert err.path == "stdout" and err.result.stdout == b"\0" * 5000 and err.result.stderr == b"x\n"
    assert err.result.usage.termination == "output"


def test_container_exec_and_enter() -> None:
    with nsfast.Container(["sleep", "60"]) as c:
        with pytest.raises(nsfast.OutputLimitError) as e:
            c.exec(FLOOD, capture_output=True, capture_max_bytes=1 << 16)
        assert len(e.value.result.stdout) == 1 << 16
        assert c.exec(["echo", "still"], capture_output=True).stdout == b"still\n"
        with pytest.raises(nsfast.OutputLimitError):
            nsfast.enter(c.pid, FLOOD, capture_output=True, capture_max_bytes=1 << 16)
        assert c.returncode is None


@pytest.fixture(scope="module")
def z(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nsfast.Zygote]:
    d = tmp_path_factory.mktemp("capture-tasks")
    (d / "capture_tasks.py").write_text(
        "import os\n"
        "def shout(n):\n"
        "    for _ in range(n >> 16):\n"
        "        os.write(1, bytes(1 << 16))\n"
        "    return n\n"
        "def moan():\n"
        "    while True:\n"
        "        os.write(2, bytes(1 << 16))\n"
    )
    with nsfast.Zygote(path=[str(d)]) as zz:
        yield zz


def test_zygote_task_output_is_capped_and_the_zygote_lives_on(z: nsfast.Zygote) -> None:
    pid = z.pid
    flood = "import os\nwhile True: os.write(1, bytes(1 << 16))"
    with pytest.raises(nsfast.OutputLimitError) as e:
        z.run_python(flood)
    assert len(e.value.result.stdout) == DEFAULT_CAPTURE_MAX_BYTES
    assert e.value.result.usage.termination == "output"
    with pytest.raises(nsfast.OutputLimitError):
        z.run_python(flood, capture_max_bytes=10)
    with pytest.raises(nsfast.OutputLimitError):
        asyncio.run(z.arun_python(flood, capture_max_bytes=10))
    with pytest.raises(nsfast.OutputLimitError):
        z.map_python([flood, "pass"], capture_max_bytes=10)
    assert z.run_python("print('ok')").stdout == b"ok\n" and z.pid == pid


def test_zygote_call_keeps_no_stdout_and_caps_stderr(z: nsfast.Zygote) -> None:
    # Its stdout was never part of what call returns: now it is not held either.
    n = 2 * DEFAULT_CAPTURE_MAX_BYTES
    assert z.call("capture_tasks:shout", n) == n
    with pytest.raises(nsfast.OutputLimitError) as e:
        z.call("capture_tasks:moan")
    assert e.value.path == "stderr" and len(e.value.result.stderr) == DEFAULT_CAPTURE_MAX_BYTES
