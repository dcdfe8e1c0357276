"""Results and errors cross process boundaries (Ray, multiprocessing, a job queue): each
pickles and comes back equal, with its attributes."""

from __future__ import annotations

import pickle

import pytest

import nsfast
from conftest import suite
from nsfast._zygote import TaskError, ZygoteError

pytestmark = suite


@pytest.mark.parametrize(
    "error",
    [
        nsfast.SpecError("memory", "is not a size: 'lots'"),
        nsfast.SpawnError(2, "No such file or directory", "/nope", step="exec", hint="look"),
        nsfast.ContainerError("container c was never started"),
        nsfast.LimitError([("memory", "no memory controller"), ("pids", "no pids controller")]),
        nsfast.OutputError("/tmp/out/big", 1024, None),
        nsfast.OutputLimitError("stdout", 1024, None),
        nsfast.ImageError("/img: layer sha256:00: '../x': outside the root"),
        ZygoteError("the zygote did not start", b"Traceback ..."),
        TaskError("boom", type="ValueError", traceback="Traceback ...", returncode=1, stderr=b"e"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_round_trip(error: Exception) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)
    if isinstance(error, OSError):
        assert (back.errno, back.strerror, back.filename) == (error.errno, error.strerror, error.filename)


def test_results_round_trip() -> None:
    r = nsfast.run(["sh", "-c", "echo out; echo w > /tmp/w"], capture_output=True, outputs=["/tmp/w"])
    back = pickle.loads(pickle.dumps(r))
    assert type(back) is nsfast.Result
    assert (back.args, back.returncode, back.stdout, back.stderr) == (r.args, 0, b"out\n", b"")
    assert back.usage == r.usage and back.files == {"/tmp/w": b"w\n"} and back.changes == {}
    with pytest.raises(nsfast.TimeoutExpired) as e:
        nsfast.run(["sleep", "5"], timeout=0.1)
    back_e = pickle.loads(pickle.dumps(e.value))
    assert (back_e.timeout, back_e.usage) == (0.1, e.value.usage) and back_e.usage.termination == "timeout"
