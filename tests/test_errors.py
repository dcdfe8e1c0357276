"""Bad input and failed starts: the right exception, a message naming the field or step,
and nothing left behind (no child process, no fd, no cgroup, no mount)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import nsfast
from conftest import sandbox_cgroups, suite

pytestmark = [*suite, pytest.mark.usefixtures("nothing_left_behind")]


def _cases():
    """(id, kwargs factory taking a scratch dir, exception type, field named in the message)."""
    S, T = nsfast.SpecError, TypeError
    return [
        ("unknown-namespace", lambda d: dict(namespaces=["pid", "bogus"]), S, "namespaces"),
        ("namespaces-as-a-string", lambda d: dict(namespaces="pid"), T, "namespaces"),
        ("hostname-65-bytes", lambda d: dict(hostname="h" * 65), S, "hostname"),
        ("hostname-65-bytes-utf8", lambda d: dict(hostname="é" * 33), S, "hostname"),
        ("hostname-empty", lambda d: dict(hostname=""), S, "hostname"),
        ("hostname-without-uts", lambda d: dict(hostname="box", namespaces=["mnt", "pid"]), S, "hostname"),
        ("hostname-not-a-str", lambda d: dict(hostname=b"box"), T, "hostname"),
        ("tmpfs-relative-target", lambda d: dict(mounts=[nsfast.Tmpfs("srv")]), S, "Tmpfs.dst"),
        ("bind-relative-target", lambda d: dict(mounts=[nsfast.Bind(d, "mnt")]), S, "Bind.dst"),
        ("tmpfs-dotdot-target", lambda d: dict(mounts=[nsfast.Tmpfs("/srv/../etc")]), S, "Tmpfs.dst"),
        ("bind-dotdot-target", lambda d: dict(mounts=[nsfast.Bind(d, "/mnt/../etc")]), S, "Bind.dst"),
        ("mount-on-root", lambda d: dict(mounts=[nsfast.Tmpfs("/")]), S, "Tmpfs.dst"),
        ("tmpfs-bad-size", lambda d: dict(mounts=[nsfast.Tmpfs("/srv", size="lots")]), S, "Tmpfs.size"),
        ("tmpfs-zero-size", lambda d: dict(mounts=[nsfast.Tmpfs("/srv", size=0)]), S, "Tmpfs.size"),
        ("missing-rootfs", lambda d: dict(rootfs=d / "nope"), S, "rootfs"),
        ("rootfs-is-a-file", lambda d: dict(rootfs=d / "file"), S, "rootfs"),
        ("bind-source-missing", lambda d: dict(mounts=[nsfast.Bind(d / "nope", "/mnt")]), S, "Bind.src"),
        ("target-missing-on-ro-root", lambda d: dict(mounts=[nsfast.Tmpfs("/nsfast-no-such-dir")]), S, "mounts"),
        ("file-onto-a-directory", lambda d: dict(mounts=[nsfast.Bind(d / "file", "/mnt")]), S, "mounts"),
        ("target-missing-in-rootfs", lambda d: dict(rootfs=d, mounts=[nsfast.Tmpfs("/srv")]), S, "mounts"),
        ("env-key-with-equals", lambda d: dict(env={"A=B": "1"}), S, "env"),
        ("env-key-empty", lambda d: dict(env={"": "1"}), S, "env"),
        ("env-value-with-nul", lambda d: dict(env={"A": "1\0"}), S, "env"),
        ("env-value-not-a-str", lambda d: dict(env={"A": 1}), T, "env"),
        ("env-not-a-mapping", lambda d: dict(env=["A=1"]), T, "env"),
        ("uid-a-str", lambda d: dict(uid="0"), T, "uid"),
        ("uid-a-bool", lambda d: dict(uid=True), T, "uid"),
        ("uid-negative", lambda d: dict(uid=-1), S, "uid"),
        ("gid-a-float", lambda d: dict(gid=1.0), T, "gid"),
        ("unknown-capability", lambda d: dict(capabilities=["CAP_BOGUS"]), S, "capabilities"),
        ("capabilities-as-a-string", lambda d: dict(capabilities="CAP_NET_ADMIN"), T, "capabilities"),
        ("unknown-option", lambda d: dict(hostnme="box"), T, "hostnme"),
        ("rootfs-without-mnt", lambda d: dict(rootfs=d, namespaces=["pid", "uts"]), S, "namespaces"),
        ("mounts-without-mnt", lambda d: dict(mounts=[nsfast.Tmpfs("/srv")], namespaces=["pid"]), S, "namespaces"),
        ("relative-cwd", lambda d: dict(cwd="tmp"), S, "cwd"),
        ("init-not-a-bool", lambda d: dict(init=1), T, "init"),
    ]


@pytest.fixture
def scratch(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path


@pytest.mark.parametrize("make_kwargs, exc_type, field", [c[1:] for c in _cases()], ids=[c[0] for c in _cases()])
def test_invalid_spec_raises_naming_the_field(scratch, make_kwargs, exc_type, field):
    with pytest.raises(exc_type) as exc:
        nsfast.run(["true"], **make_kwargs(scratch))
    assert field in str(exc.value)
    if exc_type is nsfast.SpecError:
        assert exc.value.field == field
        assert str(exc.value).startswith(f"{field}: ")
        assert isinstance(exc.value, ValueError) and isinstance(exc.value, nsfast.NsfastError)


def test_spec_is_validated_on_construction():
    with pytest.raises(nsfast.SpecError, match="^hostname: "):
        nsfast.Spec(hostname="x" * 65)
    with pytest.raises(TypeError, match="unknown sandbox option"):
        nsfast.Spec().replace(bogus=1)
    spec = nsfast.Spec(capabilities=["net_admin", "CAP_NET_ADMIN"])
    assert spec.capabilities == ("CAP_NET_ADMIN",)


@pytest.mark.parametrize(
    "args, exc_type",
    [([], ValueError), (["ec\0ho"], ValueError), ([1], TypeError)],
    ids=["empty", "nul-byte", "not-a-string"],
)
def test_invalid_args_are_rejected(args, exc_type):
    with pytest.raises(exc_type, match="args"):
        nsfast.run(args)


def _assert_spawn_error(e, *, err, step, filename):
    assert isinstance(e, nsfast.SpawnError)
    assert isinstance(e, OSError) and isinstance(e, nsfast.NsfastError)
    assert (e.errno, e.step, e.filename) == (err, step, filename)
    assert e.strerror == os.strerror(err)
    assert str(e).startswith(f"{step}: [Errno {err}] ")
    assert repr(filename) in str(e)


def test_missing_command_raises_spawn_error_enoent():
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["nsfast-no-such-command", "arg"], capture_output=True)
    _assert_spawn_error(exc.value, err=errno.ENOENT, step="exec", filename="nsfast-no-such-command")


def test_missing_command_with_a_path_raises_spawn_error_enoent():
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.spawn(["/usr/bin/nsfast-no-such-command"], stdin=nsfast.PIPE, stdout=nsfast.PIPE)
    _assert_spawn_error(exc.value, err=errno.ENOENT, step="exec", filename="/usr/bin/nsfast-no-such-command")


def test_command_is_searched_on_the_sandbox_path_not_the_hosts():
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["true"], env={"PATH": "/nsfast-no-such-dir:/also-missing"})
    _assert_spawn_error(exc.value, err=errno.ENOENT, step="exec", filename="true")
    assert nsfast.run(["true"], env={"PATH": "/nsfast-no-such-dir:/usr/bin"}).returncode == 0


def test_non_executable_file_raises_eacces(scratch):
    script = scratch / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["/mnt/script"], mounts=[nsfast.Bind(scratch, "/mnt")])
    _assert_spawn_error(exc.value, err=errno.EACCES, step="exec", filename="/mnt/script")
    # The same file, executable, runs: the mode was the only problem.
    script.chmod(0o755)
    r = nsfast.run(["/mnt/script"], mounts=[nsfast.Bind(scratch, "/mnt")], capture_output=True)
    assert r.stdout == b"hi\n"


def test_directory_as_command_raises_eacces():
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["/usr"])
    assert (exc.value.errno, exc.value.step) == (errno.EACCES, "exec")


def test_file_without_interpreter_line_raises_enoexec(scratch):
    blob = scratch / "blob"
    blob.write_bytes(b"\x01\x02 not a program\n")
    blob.chmod(stat.S_IRWXU)
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["/mnt/blob"], mounts=[nsfast.Bind(scratch, "/mnt")])
    assert (exc.value.errno, exc.value.step) == (errno.ENOEXEC, "exec")


def test_missing_cwd_raises_spawn_error_at_chdir():
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["true"], cwd="/nsfast-no-such-dir", capture_output=True)
    _assert_spawn_error(exc.value, err=errno.ENOENT, step="chdir", filename="/nsfast-no-such-dir")


def test_cwd_that_is_a_file_raises_enotdir():
    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["true"], cwd="/etc/hostname")
    _assert_spawn_error(exc.value, err=errno.ENOTDIR, step="chdir", filename="/etc/hostname")


def test_spawn_error_survives_pickling():
    import pickle

    with pytest.raises(nsfast.SpawnError) as exc:
        nsfast.run(["nsfast-no-such-command"])
    again = pickle.loads(pickle.dumps(exc.value))
    assert (again.errno, again.step, again.filename) == (errno.ENOENT, "exec", "nsfast-no-such-command")


def test_many_failed_starts_leave_nothing_behind():
    before = sandbox_cgroups()
    for _ in range(50):
        with pytest.raises(nsfast.SpawnError):
            nsfast.run(["nsfast-no-such-command"], capture_output=True, input=b"x")
        with pytest.raises(nsfast.SpawnError):
            nsfast.run(["true"], cwd="/nsfast-no-such-dir", init=True)
    assert sandbox_cgroups() == before
    # ...and the next start still works.
    assert nsfast.run(["echo", "ok"], capture_output=True).stdout == b"ok\n"


@pytest.mark.parametrize("where", ["stdin", "stdout", "pass_fds"])
def test_a_closed_fd_number_is_refused_not_filled_by_nsfast(where):
    """(Found by an audit.) An fd number that was closed got the next fd nsfast opened for
    itself: the sandbox's cgroup directory as its stdin (through which it listed the host's
    /sys/fs/cgroup), a cgroup `tasks` file, a pidfd. subprocess refuses such stdio (EBADF)."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    kw = {"pass_fds": [r]} if where == "pass_fds" else {where: r}
    with pytest.raises(OSError, match=f"{'pass_fds' if where == 'pass_fds' else 'stdio'}: fd {r} is not open") as e:
        nsfast.run(["sh", "-c", f"readlink /proc/self/fd/{r} /proc/self/fd/0"], **kw)
    assert e.value.errno == errno.EBADF
    assert sandbox_cgroups() == []


@pytest.mark.parametrize("field", ["rootfs", "overlay_upper", "cwd"])
def test_an_empty_path_is_refused(field):
    """(Found by an audit.) An empty path was made absolute, so the caller's working
    directory: `rootfs=""` ran the sandbox in it. subprocess refuses cwd="" too."""
    kw = {"overlay": True} if field == "overlay_upper" else {}
    with pytest.raises(nsfast.SpecError, match=f"{field}: must not be empty"):
        nsfast.Spec(**{field: ""}, **kw)
    with pytest.raises(nsfast.SpecError, match="Bind.src: must not be empty"):
        nsfast.Bind("", "/mnt")


@pytest.mark.parametrize("bad", [5, True, "text", [1, 2]])
def test_input_must_be_bytes_like(bad):
    """(Found by an audit.) `input=5` sent five NUL bytes (bytes(5)); subprocess raises
    TypeError for anything its pipe's write does not take."""
    with pytest.raises(TypeError, match="input must be"):
        nsfast.run(["cat"], input=bad, capture_output=True)
    assert nsfast.run(["cat"], input=bytearray(b"ab"), capture_output=True).stdout == b"ab"
    assert nsfast.run(["cat"], input=memoryview(b"cd"), capture_output=True).stdout == b"cd"
    assert sandbox_cgroups() == []
