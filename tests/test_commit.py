"""`nsfast.Overlay(src, dst, commit=True)` attacked: what the sandbox leaves in its upper
layer is applied to the host's `src` after an exit 0, by the trusted caller. Each test is
an attack that once led the commit out of `src`, into another file system, through the
caller's memory, or lost the user's files; each checks `src`, a sentinel outside it, and the
error the caller gets."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Dict

import pytest

import nsfast
from conftest import suite

pytestmark = suite

PYTHON = "/usr/bin/python3"  # the venv's interpreter is under /root, hidden in a sandbox


def sh(script: str, **kw):
    return nsfast.run(["/bin/sh", "-c", script], capture_output=True, text=True, **kw)


def files(root: Path) -> Dict[str, str]:
    """Every entry below `root`: a file's text, a symlink's "-> target", a directory "/"."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = "-> " + os.readlink(p) if p.is_symlink() else "/" if p.is_dir() else p.read_text()
    return out


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory outside every src, private to the caller: what a hostile commit aims at."""
    d = tmp_path / "sentinel"
    d.mkdir(mode=0o700)
    (d / "victim").write_text("host file\n")
    return d


def test_a_src_swapped_for_a_symlink_is_never_followed(tmp_path, sentinel):
    """The sandbox also has a writable Bind of src's parent: it renames src away and puts a
    symlink to the sentinel in its place, then exits 0. The commit once reopened src by its
    path after the run, and wrote and deleted in the sentinel. It now works below the src
    the caller named when the run started (held open since), wherever that went."""
    parent = tmp_path / "parent"
    src = parent / "src"
    src.mkdir(parents=True)
    (src / "victim").write_text("src file\n")
    r = sh(f"rm /work/victim && echo planted > /work/planted && mv /tmp/p/src /tmp/p/src.old && ln -s {sentinel} /tmp/p/src",
           mounts=[nsfast.Bind(parent, "/tmp/p", readonly=False), nsfast.Overlay(src, "/work", commit=True)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.changes == {"/work/planted": "added", "/work/victim": "deleted"}
    assert files(sentinel) == {"victim": "host file\n"}
    assert files(parent / "src.old") == {"planted": "planted\n"}  # applied where src went


def test_a_commit_never_enters_a_mount_below_src(tmp_path):
    """src holds a mount point (a bind of a directory outside it, as a data disk mounted in a
    project). The sandbox sees the empty directory under it and writes there, deletes it, or
    changes its mode; the commit once wrote, chmodded and deleted in the mounted file system.
    Now each is an OverlayError before anything is applied (src unchanged, the mounted
    directory untouched). In a mount namespace of the test's own."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "data").mkdir(parents=True)
    (src / "keep").write_text("keep\n")
    outside.mkdir()
    (outside / "precious").write_text("precious\n")
    attacks = {"write": "echo x > /work/data/planted", "delete": "rm -rf /work/data",
               "chmod": "chmod 777 /work/data"}  # fmt: skip
    script = textwrap.dedent(f"""
        import json, subprocess, nsfast
        subprocess.run(["mount", "--bind", {str(outside)!r}, {str(src / "data")!r}], check=True)
        out = {{}}
        for name, attack in {attacks!r}.items():
            try:
                nsfast.run(["sh", "-c", "echo more >> /work/keep; " + attack],
                           mounts=[nsfast.Overlay({str(src)!r}, "/work", commit=True)])
                out[name] = None
            except nsfast.OverlayError as e:
                out[name] = [e.path, e.applied, e.result.returncode, sorted(e.result.changes)]
        print(json.dumps(out))
    """)
    p = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", script],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["write"] == ["/work/data/planted", [], 0, ["/work/data/planted", "/work/keep"]]
    assert res["delete"][:3] == ["/work/data", [], 0] and res["chmod"][:3] == ["/work/data", [], 0]
    assert files(src) == {"data": "/", "keep": "keep\n"}  # nothing applied, the mount gone with the namespace
    assert files(outside) == {"precious": "precious\n"} and os.stat(outside).st_mode & 0o777 == 0o755


def test_a_sparse_file_is_committed_sparse_and_never_read_whole(tmp_path):
    """A 4 GiB sparse file costs the sandbox no tmpfs block; the commit once read it whole
    into the caller's memory and wrote it out dense. Now it is copied extent by extent:
    the caller's peak memory stays flat and the file in src takes no more disk than it did
    in the sandbox."""
    src = tmp_path / "src"
    src.mkdir()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = sh("truncate -s 4G /work/big && printf data >> /work/big && printf head | dd of=/work/big conv=notrunc 2>/dev/null",
           mounts=[nsfast.Overlay(src, "/work", commit=True)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    st = os.stat(src / "big")
    assert st.st_size == (4 << 30) + 4 and st.st_blocks * 512 <= 1 << 20
    with open(src / "big", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(4 << 30)
        assert f.read() == b"data"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 << 10  # KiB: under 64 MiB more


def test_a_directory_replaced_by_a_symlink_loses_nothing(tmp_path):
    """`rm -rf build && ln -s out build`: the commit once removed build, then tried to
    unlink it again, and failed half-way with the rest of the changes lost."""
    src = tmp_path / "src"
    (src / "build").mkdir(parents=True)
    (src / "build" / "old.o").write_text("o\n")
    (src / "a_first").write_text("a\n")
    r = sh("cd /work && rm a_first && rm -rf build && mkdir out && echo bin > out/bin && ln -s out build"
           " && echo z > z_last", mounts=[nsfast.Overlay(src, "/work", commit=True)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert files(src) == {"build": "-> out", "out": "/", "out/bin": "bin\n", "z_last": "z\n"}


def test_names_and_modes_a_commit_once_failed_on(tmp_path):
    """A 250-byte name (the temporary name was the name plus 16 bytes: ENAMETOOLONG), the
    temporary name a killed commit left (or the sandbox made: FileExistsError), a read-only
    directory with files in it (its mode applied before its files: EACCES rootless)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / ".x.nsfast-commit").write_text("left by a killed commit\n")
    (src / "x").write_text("x\n")
    long = "n" * 250
    r = sh(f"cd /work && echo l > {long} && echo new > x && mkdir -p ro/pkg && echo code > ro/pkg/a.go"
           " && chmod 555 ro/pkg ro && mkdir .x.nsfast-commit2 && echo s > ../work/.x.nsfast-commit",
           mounts=[nsfast.Overlay(src, "/work", commit=True)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert files(src) == {long: "l\n", "x": "new\n", "ro": "/", "ro/pkg": "/", "ro/pkg/a.go": "code\n",
                          ".x.nsfast-commit2": "/", ".x.nsfast-commit": "s\n"}  # fmt: skip
    assert os.stat(src / "ro").st_mode & 0o777 == 0o555 and os.stat(src / "ro" / "pkg").st_mode & 0o777 == 0o555


def test_deep_trees_are_committed_or_refused_with_a_typed_error(tmp_path):
    """Deeper than Python's recursion limit: committed (the walk has no recursion). Paths
    past PATH_MAX: an OverlayError naming the Overlay, src unchanged (once a RecursionError
    or a bare OSError, the Result lost)."""
    src = tmp_path / "src"
    src.mkdir()
    deep = "i=0; while [ $i -lt 1100 ]; do mkdir d && cd d || exit 9; i=$((i+1)); done; echo leaf > leaf"
    r = sh(f"cd /work && {deep}", mounts=[nsfast.Overlay(src, "/work", commit=True)])
    assert r.returncode == 0, r.stderr
    assert len(r.changes) == 1101
    assert (src / Path(*["d"] * 1100) / "leaf").read_text() == "leaf\n"
    subprocess.run(["rm", "-rf", str(src / "d")], check=True)
    long = "b" * 200
    too_long = f"cd /work && i=0; while [ $i -lt 40 ]; do mkdir {long} && cd {long} || exit 9; i=$((i+1)); done"
    with pytest.raises(nsfast.OverlayError, match="cannot be listed") as e:
        sh(too_long, mounts=[nsfast.Overlay(src, "/work", commit=True)])
    assert e.value.path == "/work" and e.value.applied == [] and e.value.result.args[0] == "/bin/sh"
    assert os.listdir(src) == []


def test_an_opaque_mark_the_sandbox_sets_is_not_a_deletion(tmp_path):
    """Through a root caller's overlay (marks in trusted.*) the sandbox may set
    `user.overlay.opaque` on a directory: the changes once read it as overlayfs's own and
    reported (and committed) every file of the directory as deleted."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_text("a\n")
    code = "import os; os.setxattr('/work/d', 'user.overlay.opaque', b'y'); print(sorted(os.listdir('/work/d')))"
    r = nsfast.run([PYTHON, "-c", code], capture_output=True, text=True,
                   mounts=[nsfast.Overlay(src, "/work", commit=True)])  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "['a']\n"), r.stderr
    assert "/work/d/a" not in r.changes
    assert files(src) == {"d": "/", "d/a": "a\n"}


def test_mount_points_nsfast_made_in_an_overlay_are_not_changes(tmp_path):
    """A Tmpfs and a Bind mounted inside an Overlay: nsfast makes their mount points in it,
    the sandbox did not; they were listed as added and committed into src."""
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    mounts = [nsfast.Overlay(src, "/tmp/work", commit=True), nsfast.Tmpfs("/tmp/work/cache"),
              nsfast.Bind(other, "/tmp/work/ro/deep")]  # fmt: skip
    r = sh("echo c > /tmp/work/cache/c", mounts=mounts)
    assert (r.returncode, r.changes) == (0, {}), r.stderr
    assert os.listdir(src) == []
    r = sh("echo mine > /tmp/work/ro/mine", mounts=mounts)  # a directory of nsfast's the sandbox used
    assert r.changes == {"/tmp/work/ro": "added", "/tmp/work/ro/mine": "added"}
    assert files(src) == {"ro": "/", "ro/mine": "mine\n"}


def test_a_commit_needs_a_pid_namespace(tmp_path):
    """Without one, a process of the sandbox may outlive it (setsid, a double fork) and keep
    changing the upper layer while the commit reads it."""
    src = tmp_path / "src"
    src.mkdir()
    no_pid = tuple(n for n in nsfast.DEFAULT_NAMESPACES if n != "pid")
    with pytest.raises(nsfast.SpecError, match="pid namespace"):
        sh("true", namespaces=no_pid, mounts=[nsfast.Overlay(src, "/work", commit=True)])
    assert sh("true", namespaces=no_pid, mounts=[nsfast.Overlay(src, "/work")]).returncode == 0


def test_outputs_that_are_no_regular_files_are_skipped(tmp_path):
    """A unix socket named as an output (once an OSError ENXIO out of run(), the Result
    lost); a FIFO and a directory were already skipped."""
    code = ("import socket, os; s = socket.socket(socket.AF_UNIX); s.bind('/tmp/sock'); os.mkfifo('/tmp/fifo');"
            " open('/tmp/file', 'w').write('f')")  # fmt: skip
    r = nsfast.run([PYTHON, "-c", code], outputs=["/tmp/sock", "/tmp/fifo", "/tmp/file"], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.files == {"/tmp/file": b"f"}


def test_write_file_onto_a_fifo_fails_instead_of_blocking():
    """The container puts a FIFO where the caller writes a file: write_file once blocked the
    caller until something read the FIFO (forever here)."""
    with nsfast.Container() as c:
        c.exec(["mkfifo", "/tmp/in.txt"])
        box = {}

        def write() -> None:
            try:
                c.write_file("/tmp/in.txt", b"data")
                box["r"] = "written"
            except OSError as e:
                box["r"] = e.errno

        t = threading.Thread(target=write, daemon=True)
        t.start()
        t.join(10)
        assert box.get("r") == 22, box  # EINVAL: not a regular file, nothing truncated
        c.write_file("/tmp/file", b"one")  # a regular file still works
        assert c.read_file("/tmp/file") == b"one"


class HostEdit:
    """The host's side of a race with a sandbox: once the sandbox said "ready" (it made its
    change: `SYNC` in its script), `edit()` runs on the host, then the sandbox goes on. Both
    ends are FIFOs in a directory bound at /tmp/sync, so the host's change is surely made
    during the run, after the sandbox's own."""

    SYNC = "echo ready > /tmp/sync/ready && read x < /tmp/sync/go"

    def __init__(self, tmp: Path, edit) -> None:
        self.dir = tmp
        self.dir.mkdir()
        os.mkfifo(self.dir / "ready")
        os.mkfifo(self.dir / "go")
        self.edit = edit
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    @property
    def bind(self) -> nsfast.Bind:
        return nsfast.Bind(self.dir, "/tmp/sync", readonly=False)

    def _run(self) -> None:
        try:
            if (self.dir / "ready").read_text() != "ready\n":
                return  # the run ended without reaching it (see join)
            self.edit()
            (self.dir / "go").write_text("go\n")
        except BaseException as e:  # noqa: BLE001 - reported by join()
            self.error = e

    def join(self) -> None:
        """After the run: unblock a thread still waiting for a sandbox that did not get
        there, and raise what went wrong in it."""
        if self.thread.is_alive():
            try:
                os.close(os.open(self.dir / "ready", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def test_a_commit_never_overwrites_what_the_host_changed_during_the_run(tmp_path):
    """The user edits `src` while the sandbox runs (an editor saves, a build writes): the
    sandbox changes the same file, makes the name the host made meanwhile, deletes a
    directory in which the host edited a file. Each commit once applied the sandbox's
    version over the host's, which was lost. Now it is refused before anything is
    applied (an OverlayError naming the path), the host's version kept; changes made only
    by one side still commit."""
    cases = {
        # the sandbox writes notes.txt; the host edits it
        "edit": ("echo sandbox > /work/notes.txt", lambda src: (src / "notes.txt").write_text("host edit\n")),
        # both make new.txt
        "create": ("echo sandbox > /work/new.txt", lambda src: (src / "new.txt").write_text("host made\n")),
        # the sandbox removes dir/; the host edits dir/sub/keep.txt
        "rmtree": ("rm -r /work/dir", lambda src: (src / "dir" / "sub" / "keep.txt").write_text("host edit\n")),
        # the sandbox deletes notes.txt; the host chmods it
        "delete": ("rm /work/notes.txt", lambda src: (src / "notes.txt").chmod(0o600)),
        # the sandbox replaces the directory dir by a file; the host adds a file in dir/sub
        "replace": ("rm -r /work/dir && echo f > /work/dir", lambda src: (src / "dir" / "sub" / "n").write_text("n\n")),
    }
    for name, (script, host) in cases.items():
        src = tmp_path / name
        (src / "dir" / "sub").mkdir(parents=True)
        (src / "dir" / "sub" / "keep.txt").write_text("before\n")
        (src / "notes.txt").write_text("before\n")
        race = HostEdit(tmp_path / f"{name}.sync", lambda src=src, host=host: host(src))  # type: ignore[misc]
        try:
            with pytest.raises(nsfast.OverlayError) as info:
                sh(f"{script} && {HostEdit.SYNC}", mounts=[nsfast.Overlay(src, "/work", commit=True), race.bind])
        finally:
            race.join()
        e = info.value
        assert "changed in src during the run" in e.reason and e.applied == [], (name, e)
        assert e.result.returncode == 0
        want = {"dir": "/", "dir/sub": "/", "dir/sub/keep.txt": "before\n", "notes.txt": "before\n"}
        if name == "edit":
            want["notes.txt"] = "host edit\n"
        elif name == "create":
            want["new.txt"] = "host made\n"
        elif name == "rmtree":
            want["dir/sub/keep.txt"] = "host edit\n"
        elif name == "replace":
            want["dir/sub/n"] = "n\n"
        assert files(src) == want, name
        if name == "delete":
            assert (src / "notes.txt").stat().st_mode & 0o777 == 0o600
    # A host change elsewhere in src, or in a directory whose mode the sandbox changes, does
    # not stop a commit of what only the sandbox changed.
    src = tmp_path / "apart"
    (src / "d").mkdir(parents=True)
    (src / "mine.txt").write_text("before\n")

    def elsewhere() -> None:
        (src / "host.txt").write_text("host\n")
        (src / "d" / "host.txt").write_text("host\n")

    race = HostEdit(tmp_path / "apart.sync", elsewhere)
    try:
        r = sh(f"echo sandbox > /work/mine.txt && chmod 700 /work/d && {HostEdit.SYNC}",
               mounts=[nsfast.Overlay(src, "/work", commit=True), race.bind])  # fmt: skip
    finally:
        race.join()
    assert r.returncode == 0, r.stderr
    assert files(src) == {"mine.txt": "sandbox\n", "host.txt": "host\n", "d": "/", "d/host.txt": "host\n"}
    assert (src / "d").stat().st_mode & 0o777 == 0o700


def test_the_start_of_a_run_tells_changes_before_it_from_changes_after_it(tmp_path):
    """`since_now()` against the kernel's own stamps, on the test's file system and on a
    tmpfs: a file changed just before it has a ctime below it, one changed just after it
    (not stat'ed since its last change: the coarse stamp, which lags the fine clock by up to
    a tick) at least it. A reading of the fine clock instead misses most changes after."""
    from nsfast import _trees

    dirs = [tmp_path]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        shm = Path("/dev/shm") / f"nsfast-test-{os.getpid()}"
        shm.mkdir()
        dirs.append(shm)
    try:
        for d in dirs:
            before, after = d / "before", d / "after"
            before.write_text("")
            after.write_text("")
            for i in range(100):
                before.chmod(0o600 | (i & 1) << 5)
                since = _trees.since_now()
                after.chmod(0o600 | (i & 1) << 5)
                assert before.stat().st_ctime_ns < since <= after.stat().st_ctime_ns, (d, i)
    finally:
        for d in dirs[1:]:
            for f in d.iterdir():
                f.unlink()
            d.rmdir()


def _cost(paths) -> int:
    """What `Result.changes` entries cost against `changes_max_bytes`."""
    return sum(nsfast._trees.ENTRY_COST + len(p.encode()) for p in paths)


def test_changes_are_bounded_and_nothing_over_the_bound_is_committed(tmp_path):
    """(Found by an audit.) `Result.changes` was bounded only by the sandbox's inodes: 200k
    empty files with long names under an Overlay took the caller to 172 MiB and 5.4 s, and a
    million under the default 1G limit would take it past a GiB. The listing is now charged
    as it is read (each entry of the upper layer its path and 256 bytes) against
    `changes_max_bytes`; over it an OverlayError naming the path, and nothing committed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_text("mine\n")
    made = "cd /work && rm keep && mkdir d && i=0; while [ $i -lt 3 ]; do echo $i > d/f$i; i=$((i+1)); done"
    expect = {"/work/d": "added", "/work/keep": "deleted", **{f"/work/d/f{i}": "added" for i in range(3)}}
    exact = _cost(expect)
    r = sh(made, mounts=[nsfast.Overlay(src, "/work")], changes_max_bytes=exact)
    assert r.returncode == 0 and r.changes == expect
    with pytest.raises(nsfast.OverlayError, match=f"changes_max_bytes={exact - 1}") as e:
        sh(made, mounts=[nsfast.Overlay(src, "/work", commit=True)], changes_max_bytes=exact - 1)
    assert e.value.path.startswith("/work/") and e.value.applied == []
    assert e.value.result.returncode == 0 and e.value.result.changes == {}
    assert files(src) == {"keep": "mine\n"}


def test_one_huge_directory_is_refused_before_it_is_held(tmp_path):
    """A directory whose listing alone is over the bound is refused by the listing itself
    (nothing of it held), and named."""
    src = tmp_path / "src"
    src.mkdir()
    flood = "mkdir /work/d && cd /work/d && i=0; while [ $i -lt 400 ]; do : > f$i; i=$((i+1)); done"
    with pytest.raises(nsfast.OverlayError, match="changes_max_bytes=65536") as e:
        sh(flood, mounts=[nsfast.Overlay(src, "/work", commit=True)], changes_max_bytes=64 << 10)
    assert e.value.path == "/work/d" and os.listdir(src) == []
    r = sh(flood, mounts=[nsfast.Overlay(src, "/work")])  # the default bound: 64 MiB
    assert len(r.changes) == 401


def test_deep_paths_are_charged_whole(tmp_path):
    """Each entry costs its whole sandbox path, not its name: 15 nested directories of
    200-byte names hold 3 KiB paths, 24 KiB in all, where their names are 3 KiB."""
    src = tmp_path / "src"
    src.mkdir()
    name = "n" * 200
    deep = f"cd /work && i=0; while [ $i -lt 15 ]; do mkdir {name} && cd {name} || exit 9; i=$((i+1)); done"
    paths = ["/work" + f"/{name}" * k for k in range(1, 16)]
    r = sh(deep, mounts=[nsfast.Overlay(src, "/work")], changes_max_bytes=_cost(paths))
    assert sorted(r.changes) == paths
    names_only = 15 * (nsfast._trees.ENTRY_COST + 200)
    with pytest.raises(nsfast.OverlayError, match="changes_max_bytes"):
        sh(deep, mounts=[nsfast.Overlay(src, "/work")], changes_max_bytes=names_only * 2)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "64M", None])
def test_changes_max_bytes_must_be_a_non_negative_int(bad):
    with pytest.raises(nsfast.SpecError, match="changes_max_bytes") as e:
        nsfast.run(["true"], changes_max_bytes=bad)
    assert e.value.field == "changes_max_bytes"
