"""Copy-on-write roots (Spec.overlay) and rootfs directories nsfast never writes into. Every
test checks the lower tree afterwards: unchanged, whatever the sandbox did."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import nsfast
from conftest import PYTHON_SRC, suite

pytestmark = suite


def tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry below `root`: (mode, uid, content or link target) by relative path."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                data = os.readlink(p).encode()
            elif os.path.isfile(p):
                data = Path(p).read_bytes()
            else:
                data = b""
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, data)
    return out


def sh(script: str, **kw):
    return nsfast.run(["/bin/sh", "-c", script], capture_output=True, text=True, **kw)


def test_overlay_rootfs_is_writable_and_the_lower_is_never_modified(busybox_rootfs):
    before = tree(busybox_rootfs)
    r = sh(
        "id -u; echo changed > /ROOTFS-MARKER; rm /etc/hostname; mkdir -p /new/deep; echo x > /new/deep/f;"
        " ln -s /ROOTFS-MARKER /link; mv /bin/cat /bin/cat2; cat /ROOTFS-MARKER; ls /etc | wc -l",
        rootfs=busybox_rootfs,
        overlay=True,
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "0\nchanged\n0\n", "")
    assert tree(busybox_rootfs) == before
    # Nothing of one run is seen by the next.
    r = sh("cat /ROOTFS-MARKER /etc/hostname; ls /new", rootfs=busybox_rootfs, overlay=True)
    assert r.stdout == "tiny\nrootfs-box\n" and "No such file" in r.stderr


def test_rootfs_mount_points_are_never_created_in_the_users_directory(busybox_rootfs):
    before = tree(busybox_rootfs)
    r = sh("ls -d /proc/1 /dev/null /tmp && touch /tmp/ok && touch /x", rootfs=busybox_rootfs)
    assert sorted(r.stdout.split()) == ["/dev/null", "/proc/1", "/tmp"] and "Read-only file system" in r.stderr
    assert tree(busybox_rootfs) == before


def test_a_read_only_rootfs_works(busybox_rootfs):
    """An immutable directory (as on a read-only medium): mkdir in it fails, so nsfast must
    not need to (the old `bind root: [Errno 30]`)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is needed to make the rootfs immutable")
    subprocess.run(["chattr", "+i", str(busybox_rootfs)], check=True)
    try:
        with pytest.raises(OSError):
            (busybox_rootfs / "probe").mkdir()
        assert sh("echo ro-ok", rootfs=busybox_rootfs).stdout == "ro-ok\n"
        r = sh("echo w > /w && cat /w", rootfs=busybox_rootfs, overlay=True)
        assert (r.returncode, r.stdout) == (0, "w\n"), r.stderr
    finally:
        subprocess.run(["chattr", "-i", str(busybox_rootfs)], check=True)
    assert sorted(os.listdir(busybox_rootfs)) == ["ROOTFS-MARKER", "bin", "etc"]


def test_overlay_size_caps_the_changes(busybox_rootfs):
    r = sh("dd if=/dev/zero of=/big bs=64k count=64 2>&1; echo rc=$?", rootfs=busybox_rootfs, overlay=True,
           overlay_size="1M")  # fmt: skip
    assert "No space left on device" in r.stdout and "rc=1" in r.stdout, r.stdout


def test_overlay_changes_are_charged_to_the_memory_limit(busybox_rootfs):
    """The upper tmpfs is written by the sandbox: its pages count against its memory cgroup,
    however large overlay_size is."""
    r = sh(
        "dd if=/dev/zero of=/big bs=1M count=128 2>/dev/null; echo rc=$?",
        rootfs=busybox_rootfs,
        overlay=True,
        overlay_size=None,
        limits=nsfast.Limits(memory="32M", pids=64),
    )
    assert r.stdout != "rc=0\n", (r.returncode, r.stdout, r.stderr)
    assert r.usage is not None and r.usage.oom_killed, r.usage
    assert r.usage.memory_peak_bytes is not None and r.usage.memory_peak_bytes <= 32 << 20


def test_overlay_upper_keeps_the_changes(busybox_rootfs, tmp_path):
    up = tmp_path / "upper-dir"
    up.mkdir()
    before = tree(busybox_rootfs)
    r = sh("echo kept > /etc/k; rm /etc/hostname", rootfs=busybox_rootfs, overlay=True, overlay_upper=up)
    assert r.returncode == 0, r.stderr
    assert (up / "upper" / "etc" / "k").read_text() == "kept\n"
    # overlayfs's whiteout for the deletion: a 0/0 character device in the upper layer.
    wh = os.lstat(up / "upper" / "etc" / "hostname")
    assert (os.major(wh.st_rdev), os.minor(wh.st_rdev)) == (0, 0)
    assert tree(busybox_rootfs) == before
    # The next run continues from there.
    r = sh("cat /etc/k; ls /etc", rootfs=busybox_rootfs, overlay=True, overlay_upper=up)
    assert r.stdout == "kept\nk\n", r.stderr


@pytest.fixture
def host_dir():
    """A directory the test makes on the host root outside the hidden ones (/tmp is the
    sandbox's own), removed after."""
    base = "/srv" if os.path.isdir("/srv") else "/opt"
    d = Path(tempfile.mkdtemp(prefix="nsfast-overlay-", dir=base))
    yield d
    shutil.rmtree(d)


def test_overlay_on_the_host_root_covers_submounts_and_grants_no_host_ownership(host_dir):
    """In a mount namespace of the test's own (the host's table is untouched): a tmpfs
    submount with a world-writable directory, and the root file system's own such
    directory. The sandbox writes to both; neither changes. The host's root-owned files stay
    nobody's inside: /etc is not writable, /etc/shadow not readable."""
    tmp_path = host_dir
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "host-file").write_text("host\n")
    (shared / "host-file").chmod(0o666)
    sub = tmp_path / "sub"
    sub.mkdir()
    os.chmod(tmp_path, 0o755)
    script = textwrap.dedent(f"""
        import json, os, subprocess, sys
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", {str(sub)!r}], check=True)
        open({str(sub)!r} + "/on-submount", "w").write("sub\\n")
        os.chmod({str(sub)!r} + "/on-submount", 0o666)
        import nsfast
        r = nsfast.run(["sh", "-c",
            "echo w >> {shared}/host-file; echo new > {shared}/new; rm {shared}/host-file;"
            "echo s >> {sub}/on-submount; echo n > {sub}/new; cat {sub}/on-submount;"
            "grep -c ' {sub} .* - overlay ' /proc/self/mountinfo;"
            "touch /etc/nsfast-overlay-probe 2>&1; head -c1 /etc/shadow 2>&1"],
            overlay=True, capture_output=True, text=True)
        print(json.dumps([r.returncode, r.stdout, r.stderr, sorted(os.listdir({str(sub)!r})),
                          open({str(sub)!r} + "/on-submount").read()]))
    """)
    p = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", script],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    import json

    rc, out, err, sub_after, sub_file = json.loads(p.stdout)
    lines = out.splitlines()
    assert lines[:2] == ["sub", "s"] and lines[2] == "1", (out, err)
    assert "Permission denied" in lines[3] and "Permission denied" in lines[4], out
    assert (sub_after, sub_file) == (["on-submount"], "sub\n")
    assert sorted(os.listdir(shared)) == ["host-file"] and (shared / "host-file").read_text() == "host\n"
    assert not os.path.exists("/etc/nsfast-overlay-probe")
    assert not os.listdir(sub)  # the test's mount namespace is gone: its tmpfs with it


def test_overlay_on_the_host_root_starts_where_submounts_are_out_of_the_sandboxs_reach():
    """Docker's /var/lib/docker (root, 0710) holds its containers' mounts: nothing below it
    is the sandbox's to reach, and an overlay root used to fail on it (EACCES attaching the
    cover of such a mount). Here the same in a mount namespace of the test's own, below a
    directory the test makes on the host root: a tmpfs under a 0710 directory, and one the
    sandbox may reach. Root and rootless: the sandbox starts, writes to the reachable one
    (copy-on-write) and still cannot reach the other; nothing on the host changes."""
    top = Path(tempfile.mkdtemp(prefix="nsfast-cover-", dir="/mnt"))
    try:
        os.chmod(top, 0o755)
        (top / "locked" / "merged").mkdir(parents=True)
        os.chmod(top / "locked", 0o710)
        (top / "open").mkdir()
        probe = (f"ls {top}/locked/merged 2>&1; cat {top}/open/file; echo w 2>/dev/null >> {top}/open/file && echo wrote;"
                 f" grep -c ' {top}/open .* - overlay ' /proc/self/mountinfo")  # fmt: skip
        script = textwrap.dedent(f"""
            import json, os, subprocess, sys, warnings
            warnings.simplefilter("ignore")
            top = {str(top)!r}
            for d, mode in (("/locked/merged", "0755"), ("/open", "0777")):
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=" + mode, "nsfast-cover", top + d], check=True)
            for d in ("/locked/merged", "/open"):
                with open(top + d + "/file", "w") as f:
                    f.write("host\\n")
                os.chmod(top + d + "/file", 0o666)
            runner = {PYTHON_SRC!r}
            rootless = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "-i",
                        "PYTHONPATH=" + runner, "PATH=/usr/bin:/bin", "/usr/bin/python3", "-c"]
            probe = {probe!r}
            code = ("import json, warnings, nsfast; warnings.simplefilter('ignore');"
                    f"r = nsfast.run(['sh', '-c', {{probe!r}}], overlay=True, capture_output=True, text=True);"
                    "print(json.dumps([r.returncode, r.stdout, r.stderr]))")
            res = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout)]
            res.append(json.loads(subprocess.run(rootless + [code], capture_output=True, text=True,
                                                 check=True).stdout))
            res.append([open(top + d + "/file").read() for d in ("/locked/merged", "/open")])
            print(json.dumps(res))
        """)
        p = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", script],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stderr
        import json

        root, rootless, host = json.loads(p.stdout)
        assert root[0] == 0, root
        lines = root[1].splitlines()
        assert "Permission denied" in lines[0] and lines[1:] == ["host", "wrote", "1"], root
        assert rootless[0] == 0, rootless
        # Rootless, the overlay is a skeleton of the directories the caller may list: the
        # locked one is there, empty (nothing of the host's below it). A file of an id its
        # user namespace does not map cannot be copied up (EOVERFLOW): no write there.
        assert "No such file" in rootless[1] and rootless[1].splitlines()[1:] == ["host", "1"], rootless
        assert host == ["host\n", "host\n"]
        assert sorted(os.listdir(top / "open")) == []  # the test's namespace, and its tmpfs, are gone
    finally:
        shutil.rmtree(top)


def test_hostile_symlinks_in_the_rootfs_cannot_write_to_the_host(busybox_rootfs, tmp_path):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    os.symlink(str(sentinel), busybox_rootfs / "escape")  # absolute: resolved inside the root
    os.symlink("../../../../../../../../" + str(sentinel), busybox_rootfs / "etc" / "up")
    r = sh("mkdir -p /escape/a /etc/up/b; echo x > /escape/f; echo y > /etc/up/g; ls /escape /etc/up",
           rootfs=busybox_rootfs, overlay=True)  # fmt: skip
    assert "No such file or directory" in r.stderr  # the host path does not exist inside
    assert os.listdir(sentinel) == []
    # Device nodes and setuid files cannot be made (nodev, seccomp), so none lands in a kept upper.
    up = tmp_path / "up"
    up.mkdir()
    r = sh("mknod /n c 1 3; echo rc=$?; touch /s; chmod u+s /s; echo rc=$?", rootfs=busybox_rootfs, overlay=True,
           overlay_upper=up)  # fmt: skip
    assert r.stdout == "rc=1\nrc=1\n", (r.stdout, r.stderr)
    assert not (up / "upper" / "n").exists() and not os.lstat(up / "upper" / "s").st_mode & 0o6000


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"overlay": True, "namespaces": ("user", "pid")}, "overlay", "needs the 'mnt' namespace"),
        ({"overlay": True, "readonly_root": True}, "readonly_root", "contradicts overlay=True"),
        ({"overlay_size": "1M"}, "overlay_size", "needs overlay=True"),
        ({"overlay_upper": "/"}, "overlay_upper", "needs overlay=True"),
        ({"overlay": True, "overlay_upper": "/nonexistent-nsfast"}, "overlay_upper", "is not an existing directory"),
        ({"overlay": True, "overlay_upper": "/", "overlay_size": "1M"}, "overlay_size", "overlay_upper replaces"),
    ],
)
def test_overlay_fields_are_checked(fields, field, message):
    with pytest.raises(nsfast.SpecError, match=message) as e:
        nsfast.Spec(**fields)
    assert e.value.field == field


def test_overlay_type_errors():
    with pytest.raises(TypeError, match="overlay must be a bool"):
        nsfast.Spec(overlay=1)  # type: ignore[arg-type]


def test_zygote_refuses_an_overlay():
    with pytest.raises(nsfast.SpecError, match="overlay: zygote tasks share the zygote's root"):
        nsfast.Zygote(overlay=True)


@pytest.fixture
def cow_src(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "opq").mkdir()
    for rel, data in (("keep", "keep\n"), ("del", "del\n"), ("mod", "mod\n"), ("sub/s", "s\n"), ("opq/o1", "o1\n")):
        (src / rel).write_text(data)
    return src


COW_SCRIPT = (
    "cd /work && echo new > new && echo more >> mod && rm del && rm -rf opq && mkdir opq && echo o2 > opq/o2 &&"
    " mkdir -p nd/x && echo y > nd/x/y && ln -s ../keep link && chmod 700 sub && mkfifo fifo"
)
COW_CHANGES = {
    "/work/del": "deleted",
    "/work/fifo": "added",
    "/work/link": "added",
    "/work/mod": "modified",
    "/work/nd": "added",
    "/work/nd/x": "added",
    "/work/nd/x/y": "added",
    "/work/new": "added",
    "/work/opq/o1": "deleted",
    "/work/opq/o2": "added",
    "/work/sub": "modified",
}


def test_overlay_mount_lists_changes_and_leaves_src_alone(cow_src):
    before = tree(cow_src)
    r = sh(COW_SCRIPT + "; exit 3", mounts=[nsfast.Overlay(cow_src, "/work", commit=True)])
    assert r.returncode == 3, r.stderr
    assert r.changes == COW_CHANGES
    assert tree(cow_src) == before  # failed: nothing committed
    r = sh(COW_SCRIPT, mounts=[nsfast.Overlay(cow_src, "/work")])
    assert (r.returncode, r.changes) == (0, COW_CHANGES)
    assert tree(cow_src) == before  # commit=False


def test_overlay_mount_commits_on_success(cow_src):
    r = sh(COW_SCRIPT, mounts=[nsfast.Overlay(cow_src, "/work", commit=True)])
    assert (r.returncode, r.changes) == (0, COW_CHANGES), r.stderr
    after = tree(cow_src)
    files = {p: d for p, (_, _, d) in after.items() if os.path.isfile(cow_src / p) and not os.path.islink(cow_src / p)}
    assert files == {"keep": b"keep\n", "mod": b"mod\nmore\n", "new": b"new\n", "opq/o2": b"o2\n", "nd/x/y": b"y\n",
                     "sub/s": b"s\n"}  # fmt: skip
    assert os.readlink(cow_src / "link") == "../keep"
    assert not (cow_src / "fifo").exists()  # special files are listed, not applied
    assert os.stat(cow_src / "sub").st_mode & 0o7777 == 0o700
    assert not any(name.endswith(".nsfast-commit") for name in after)


def test_overlay_commit_never_writes_outside_src(cow_src, host_dir):
    """The user's src holds a symlink to a directory outside it; the sandbox swaps it for a
    directory with files, plants its own symlinks, tries setuid: the commit writes only
    inside src, never through a symlink, and no setuid bit lands."""
    sentinel = host_dir / "sentinel"
    sentinel.mkdir()
    os.symlink(str(sentinel), cow_src / "out")
    os.symlink(str(sentinel), cow_src / "out2")
    script = (
        "cd /work && rm out && mkdir out && echo x > out/x && ln -s /srv out3 && echo s > suid &&"
        " (chmod 4755 suid 2>/dev/null; true) && echo y > out2/y 2>/dev/null; true"
    )
    r = sh(script, mounts=[nsfast.Overlay(cow_src, "/work", commit=True)])
    assert r.returncode == 0, r.stderr
    assert os.listdir(sentinel) == []
    assert (cow_src / "out").is_dir() and not (cow_src / "out").is_symlink()
    assert (cow_src / "out" / "x").read_text() == "x\n"
    assert os.readlink(cow_src / "out3") == "/srv" and os.readlink(cow_src / "out2") == str(sentinel)
    assert not os.stat(cow_src / "suid").st_mode & 0o6000


def test_overlay_mount_outputs_are_its_changes(cow_src):
    r = sh("echo w > /work/w; cat /work/keep", mounts=[nsfast.Overlay(cow_src, "/work")],
           outputs=["/work/*"])  # fmt: skip
    assert r.stdout == "keep\n" and r.files == {"/work/w": b"w\n"}


def test_overlay_mount_fields_are_checked(tmp_path):
    with pytest.raises(nsfast.SpecError, match="Overlay.src: is not an existing directory"):
        nsfast.Overlay(tmp_path / "missing", "/work")
    with pytest.raises(TypeError, match="Overlay.commit must be a bool"):
        nsfast.Overlay(tmp_path, "/work", commit="yes")  # type: ignore[arg-type]
    # A commit happens when a run ends: only nsfast.run can, so nothing else takes one.
    for start in (lambda m: nsfast.spawn(["true"], mounts=m), lambda m: nsfast.Container(mounts=m).start()):
        with pytest.raises(nsfast.SpecError, match=r"mounts: Overlay\(commit=True\) needs nsfast.run"):
            start([nsfast.Overlay(tmp_path, "/work", commit=True)])
    with pytest.raises(nsfast.SpecError, match="Overlay mounts would be one view shared by every task"):
        nsfast.Zygote(mounts=[nsfast.Overlay(tmp_path, "/work")])
    # Without a commit, a copy-on-write view for any sandbox.
    with nsfast.Container(mounts=[nsfast.Overlay(tmp_path, "/work")]) as c:
        assert c.exec(["sh", "-c", "echo x > /work/x && cat /work/x"], capture_output=True).stdout == b"x\n"
    assert not (tmp_path / "x").exists()
