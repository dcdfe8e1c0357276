"""Files back out of a sandbox: run(outputs=...) -> Result.files, Container.read_file and
write_file. The sandboxed program is hostile: it plants symlinks (absolute, `..`, magic
links) and swaps files for them while nsfast reads; nsfast must never return a host file."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

import nsfast
from conftest import suite

pytestmark = suite

SECRET = b"HOST-SECRET-nsfast\n"


@pytest.fixture
def host_secret():
    """A host file the sandbox can see (outside the hidden directories) and must never get
    out through nsfast: its path."""
    base = "/srv" if os.path.isdir("/srv") else "/opt"
    d = Path(tempfile.mkdtemp(prefix="nsfast-outputs-", dir=base))
    os.chmod(d, 0o755)
    (d / "secret").write_bytes(SECRET)
    (d / "secret").chmod(0o644)
    yield d / "secret"
    shutil.rmtree(d)


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_outputs_are_read_back_with_globs():
    nsfast.run(["true"], mounts=[nsfast.Tmpfs("/work")], outputs=["/work/x"])  # lazily opened fds, once
    before = fds()
    r = nsfast.run(
        ["sh", "-c", "mkdir -p /tmp/out/sub; echo 1 > /tmp/out/a.json; echo 2 > /tmp/out/b.json; echo 3 > /tmp/out/c.txt;"
         "echo h > /tmp/out/.hidden.json; echo s > /tmp/out/sub/d.json; echo m > /dev/shm/m; echo w > /work/r"],
        mounts=[nsfast.Tmpfs("/work")],
        outputs=["/tmp/out/*.json", "/tmp/*/sub/*.json", "/dev/shm/m", "/work/r", "/tmp/absent"],
    )  # fmt: skip
    assert r.returncode == 0
    assert r.files == {
        "/tmp/out/a.json": b"1\n",
        "/tmp/out/b.json": b"2\n",
        "/tmp/out/sub/d.json": b"s\n",
        "/dev/shm/m": b"m\n",
        "/work/r": b"w\n",
    }
    assert fds() == before
    # Without outputs: an empty dict.
    assert nsfast.run(["true"]).files == {}


def test_outputs_from_a_writable_bind_and_an_overlay_root(busybox_rootfs, tmp_path):
    d = tmp_path / "bound"
    d.mkdir()
    (busybox_rootfs / "mnt").mkdir()
    r = nsfast.run(
        ["/bin/sh", "-c", "echo b > /mnt/b; echo new > /etc/new; echo changed > /ROOTFS-MARKER"],
        rootfs=busybox_rootfs,
        overlay=True,
        mounts=[nsfast.Bind(str(d), "/mnt", readonly=False)],
        outputs=["/mnt/b", "/etc/*", "/ROOTFS-MARKER", "/bin/busybox"],
    )
    # The overlay's files are its changes: /etc/hostname and /bin/busybox, untouched, are the
    # rootfs's, not outputs.
    assert r.files == {"/mnt/b": b"b\n", "/etc/new": b"new\n", "/ROOTFS-MARKER": b"changed\n"}


def test_hostile_symlinks_never_lead_the_read_to_a_host_file(host_secret):
    s = str(host_secret)
    script = (
        f"mkdir -p /tmp/out; ln -s {s} /tmp/out/abs.json; ln -s ../../../../../../..{s} /tmp/out/dotdot.json;"
        f"ln -s /proc/self/root{s} /tmp/out/magic.json; ln -s /proc/1/root/etc/passwd /tmp/out/init.json;"
        f"ln -s {os.path.dirname(s)} /tmp/dir; cat {s} > /tmp/out/copy"
    )
    r = nsfast.run(["sh", "-c", script], outputs=["/tmp/out/*", "/tmp/dir/secret"])
    # Its own copy is its output; none of the links is followed out of its /tmp.
    assert r.files == {"/tmp/out/copy": SECRET}


def test_a_racing_program_cannot_swap_in_a_host_file(host_secret):
    """While the container swaps /tmp/x between a symlink to its own file and one to a host
    file (and /tmp/d between its directory and the host's), read_file never returns the
    host's. (Symlinks resolve inside their tree: relative ones as the sandbox sees them.)"""
    s = str(host_secret)
    racer = (
        f"mkdir /tmp/d0; echo mine > /tmp/d0/secret; echo mine > /tmp/f; "
        f"while :; do ln -sfn {s} /tmp/x; ln -sfn f /tmp/x; ln -sfn {os.path.dirname(s)} /tmp/d; "
        "ln -sfn d0 /tmp/d; done"
    )
    with nsfast.Container(["sh", "-c", racer]) as c:
        seen = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            for path in ("/tmp/x", "/tmp/d/secret"):
                try:
                    seen.add(c.read_file(path))
                except FileNotFoundError:
                    seen.add(None)
        assert SECRET not in seen
        assert b"mine\n" in seen


def test_outputs_over_the_byte_cap_name_the_file():
    with pytest.raises(nsfast.OutputError, match=r"/tmp/b.*outputs_max_bytes=1500") as e:
        nsfast.run(["sh", "-c", "head -c 1000 /dev/zero > /tmp/a; head -c 1000 /dev/zero > /tmp/b"],
                   outputs=["/tmp/a", "/tmp/b"], outputs_max_bytes=1500)  # fmt: skip
    assert e.value.path == "/tmp/b" and e.value.limit == 1500
    assert e.value.result.returncode == 0 and e.value.result.files == {}


def test_many_empty_files_and_symlink_farms_are_bounded_by_the_cap():
    """(Found by an audit.) Empty files cost nothing against `outputs_max_bytes`, and a
    wildcard descended through symlinks: 1,500 empty files and 1,500 links to their
    directory made `/tmp/*/*` 2.25 million paths, 383 MiB of the caller's memory. A wildcard
    now descends into real directories only, and each file counts its path and a fixed cost
    besides its size."""
    script = "mkdir /tmp/d && cd /tmp/d && i=0; while [ $i -lt 300 ]; do : > f$i; ln -s d /tmp/s$i; i=$((i+1)); done"
    r = nsfast.run(["sh", "-c", script], outputs=["/tmp/*/*"])
    assert r.returncode == 0
    assert sorted(r.files) == sorted(f"/tmp/d/f{i}" for i in range(300))
    # A symlink named explicitly is still followed (inside the tree); one at the end is not
    # a file (as before).
    r = nsfast.run(
        ["sh", "-c", script + " && echo x > /tmp/d/x && ln -s d/x /tmp/lx"], outputs=["/tmp/s7/x", "/tmp/l*"]
    )
    assert r.files == {"/tmp/s7/x": b"x\n"}
    # 300 empty files are not free: under a cap of 64 KiB (256 bytes each and their path), an
    # error, found by listing their directory.
    with pytest.raises(nsfast.OutputError, match=r"outputs_max_bytes=65536") as e:
        nsfast.run(["sh", "-c", script], outputs=["/tmp/d/*"], outputs_max_bytes=64 << 10)
    assert e.value.path == "/tmp/d" and e.value.result.returncode == 0
    # Listed within the cap (77,890 bytes), their reads pass it (79,990: their paths are longer).
    with pytest.raises(nsfast.OutputError, match=r"outputs_max_bytes=79000") as e:
        nsfast.run(["sh", "-c", script], outputs=["/tmp/d/*"], outputs_max_bytes=79_000)
    assert e.value.path.startswith("/tmp/d/f") and e.value.result.returncode == 0


def test_a_directory_that_matches_is_taken_whole_without_following_links():
    """(Found by an audit.) outputs=["/tmp/d"] or ["/tmp/**"] gave {}; BenchExec's result
    files take a matching directory's tree. Real directories only, as everywhere: a symlink
    in the tree (to /etc, to its own parent) is not followed, a FIFO not opened."""
    script = (
        "mkdir -p /tmp/d/e/f /tmp/d/.h && echo 1 > /tmp/d/a && echo 2 > /tmp/d/e/b && echo 3 > /tmp/d/e/f/c && "
        "echo 4 > /tmp/d/.h/x && ln -s /etc /tmp/d/etc && ln -s .. /tmp/d/e/up && ln -s a /tmp/d/la && "
        "mkfifo /tmp/d/fifo && echo 5 > /tmp/top"
    )
    want = {"/tmp/d/a": b"1\n", "/tmp/d/e/b": b"2\n", "/tmp/d/e/f/c": b"3\n", "/tmp/d/.h/x": b"4\n"}
    for patterns in (["/tmp/d"], ["/tmp/d/"], ["/tmp/*"], ["/tmp/**"]):
        r = nsfast.run(["sh", "-c", script], outputs=patterns, timeout=30)
        extra = {"/tmp/top": b"5\n"} if "*" in patterns[0] else {}
        assert r.files == {**want, **extra}, patterns
    # Charged as it is walked: 60 nested directories of 200-byte names pass a 16 KiB cap.
    deep = "cd /tmp && i=0; while [ $i -lt 60 ]; do mkdir " + "n" * 200 + " && cd " + "n" * 200 + "; i=$((i+1)); done"
    with pytest.raises(nsfast.OutputError, match="outputs_max_bytes=16384") as e:
        nsfast.run(["sh", "-c", deep], outputs=["/tmp"], outputs_max_bytes=16 << 10)
    assert e.value.result.returncode == 0


def test_a_wildcard_over_a_flooded_directory_is_bounded_and_lazy():
    """A wildcard lists its directory: 2,000 entries the pattern does not match were held
    whole (and every match listed before the first was read). The listing now counts what
    is left of `outputs_max_bytes` (each entry its name and 256 bytes, not kept), and the
    matches are read as they are found."""
    flood = (
        "mkdir /tmp/d && cd /tmp/d && echo r > r.json && i=0; while [ $i -lt 2000 ]; do : > f$i.log; i=$((i+1)); done"
    )
    r = nsfast.run(["sh", "-c", flood], outputs=["/tmp/d/*.json"])
    assert r.files == {"/tmp/d/r.json": b"r\n"}
    with pytest.raises(nsfast.OutputError, match=r"/tmp/d: listing it takes over outputs_max_bytes=65536") as e:
        nsfast.run(["sh", "-c", flood], outputs=["/tmp/d/*.json"], outputs_max_bytes=64 << 10)
    assert e.value.path == "/tmp/d" and e.value.result.returncode == 0


@pytest.mark.parametrize(
    "outputs, message",
    [
        (["/etc/passwd"], "'/etc/passwd' is not in a writable tree of the sandbox"),
        (["tmp/x"], "must be absolute paths"),
        (["/tmp/../etc/passwd"], "must not contain '..'"),
    ],
)
def test_outputs_outside_the_writable_trees_are_refused(outputs, message):
    with pytest.raises(nsfast.SpecError, match=message) as e:
        nsfast.run(["true"], outputs=outputs)
    assert e.value.field == "outputs"


def test_outputs_bad_types():
    with pytest.raises(TypeError, match="outputs must hold str paths"):
        nsfast.run(["true"], outputs=[b"/tmp/x"])  # type: ignore[list-item]
    with pytest.raises(nsfast.SpecError, match="outputs_max_bytes"):
        nsfast.run(["true"], outputs=["/tmp/x"], outputs_max_bytes=-1)


def test_container_read_and_write_files(tmp_path):
    with nsfast.Container(mounts=[nsfast.Tmpfs("/work")]) as c:
        c.write_file("/work/in.txt", b"from the caller")
        r = c.exec(["sh", "-c", "cat /work/in.txt; stat -c '%u %a' /work/in.txt; echo out > /tmp/o; ln -s /tmp/o /tmp/l"],
                   capture_output=True, text=True)  # fmt: skip
        assert r.stdout == "from the caller0 644\n", r.stderr
        assert c.read_file("/tmp/o") == b"out\n"
        with pytest.raises(OSError) as e:
            c.write_file("/tmp/l", b"x")  # a symlink as the last component
        assert e.value.errno == 40
        with pytest.raises(nsfast.SpecError, match="not in a writable tree"):
            c.read_file("/etc/hostname")
        with pytest.raises(FileNotFoundError):
            c.read_file("/tmp/missing")
    with pytest.raises(nsfast.ContainerError, match="was stopped: its files went with it"):
        c.read_file("/tmp/o")
