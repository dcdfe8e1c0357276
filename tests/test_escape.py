"""The escape suite: the attacks of issue 7, each performed by a hostile program against the
default sandbox, for `run` on the host root, a user rootfs and `Container.exec`, as a root
caller and (the `nobody_` tests) as a rootless one. Every test asserts what a user would check
(errno names, returncodes) and says in its docstring which attack it is. SECURITY.md is the
threat model these tests hold the default to.

Rules: an attack never really changes the host. Kernel settings are written back with the
value just read; sentinels, device nodes and sockets live in directories the test made; every
wait is a handshake (a line the payload prints), not a sleep."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from subprocess import TimeoutExpired

import psutil
import pytest

import nsfast
from conftest import CGROUP_ENV, PY_ERRNO, PYTHON_SRC, py, running_with_cmdline, suite, wait_until
from test_rootless import NOBODY, SETPRIV, SYSTEM_PYTHON, _userns_disabled_reason, as_nobody, nobody_dir  # noqa: F401 (nobody_dir is a fixture)

pytestmark = suite

RUN, ROOTFS, EXEC = "run", "rootfs", "exec"
HOST_AND_EXEC = [RUN, EXEC]
EVERYWHERE = [RUN, ROOTFS, EXEC]
SANDBOX_ID_BASE = 0x70000000  # the documented value of nsfast.SANDBOX_ID_BASE

SYSCTLS = ["kernel/core_pattern", "vm/swappiness", "kernel/randomize_va_space", "fs/protected_symlinks"]
MASKED = [
    "/proc/keys",
    "/proc/timer_list",
    "/proc/kcore",
    "/proc/sched_debug",
    "/proc/acpi",
    "/proc/scsi",
    "/sys/firmware",
]
# What reading a masked path may give: nothing (an empty file or directory), a refusal, or
# absence (this kernel has no /proc/sched_debug or /proc/scsi).
MASKED_OK = {"empty", "EACCES", "EPERM", "ENOENT"}


# -- where the hostile program runs ----------------------------------------------------------


@pytest.fixture
def inside(request):
    """inside(code, **spec_fields) -> Result: python3 `code` (with PY_ERRNO) in the sandbox the
    test's `where` parameter names: `run` on the host root, `rootfs` (a busybox rootfs with the
    host's /usr bound in), or `exec` into a default Container."""
    where = request.node.callspec.params["where"]
    rootfs = request.getfixturevalue("py_rootfs") if where == ROOTFS else None

    def run_py(code: str, *, mounts=(), timeout: float = 60, **spec) -> nsfast.Result:
        if rootfs is not None:
            spec["rootfs"] = str(rootfs)
            mounts = (nsfast.Bind("/usr", "/usr"), *mounts)
        if mounts:
            spec["mounts"] = tuple(mounts)
        args = ["python3", "-c", PY_ERRNO + code]
        if where == EXEC:
            with nsfast.Container(stop_timeout=1, **spec) as c:
                return c.exec(args, capture_output=True, text=True, timeout=timeout)
        return nsfast.run(args, capture_output=True, text=True, timeout=timeout, **spec)

    return run_py


def value(r: nsfast.Result):
    """The JSON the payload printed on its last line; the payload must have exited 0."""
    assert r.returncode == 0, f"payload failed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def rootless():
    """Skip unless tests can run scripts as nobody (as test_rootless does)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK) or SETPRIV is None:
        pytest.skip(f"rootless tests need {SYSTEM_PYTHON} and setpriv")
    reason = _userns_disabled_reason()
    if reason:
        pytest.skip(reason)


def nobody_inside(code: str, spec_src: str = "", where: str = RUN):
    """Like `inside`, called by a rootless caller (nobody): [returncode, json-or-None, stderr].
    `spec_src` is Python source of extra keyword arguments (", mounts=[...]")."""
    args = repr(["python3", "-c", PY_ERRNO + code])
    if where == EXEC:
        call = (
            f"with nsfast.Container(stop_timeout=1{spec_src}) as c:\n"
            f"    r = c.exec({args}, capture_output=True, text=True, timeout=60)\n"
        )
    else:
        call = f"r = nsfast.run({args}, capture_output=True, text=True, timeout=60{spec_src})\n"
    [r] = as_nobody(call + "out([r.returncode, r.stdout, r.stderr])\n", timeout=120)
    rc, stdout, stderr = r
    lines = stdout.strip().splitlines()
    return [rc, json.loads(lines[-1]) if rc == 0 and lines else None, stderr]


@pytest.fixture
def plain_dir():
    """A test-made host directory (0755) outside every path the sandbox hides (not /tmp, /run,
    /var/tmp, /home, /root), so only the sandbox's own defences stand in the way."""
    d = tempfile.mkdtemp(prefix="nsfast-escape-", dir="/opt")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d)


# -- payloads ---------------------------------------------------------------------------------

WRITE_BACK = """
def write_back(path):
    def f():
        with open(path) as src:
            v = src.read()
        with open(path, "w") as dst:
            dst.write(v)
    return attempt(f)
"""

# Each call in a forked child (an unshare that works must not change the payload itself); the
# child exits with the errno (0 = it worked), or dies of a signal.
SYSCALLS = """
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r
def in_child(f):
    pid = os.fork()
    if pid == 0:
        try:
            f()
            os._exit(0)
        except OSError as e:
            os._exit(e.errno)
        except BaseException:
            os._exit(255)
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    code = os.WEXITSTATUS(status)
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))
KEY_SPEC_PROCESS_KEYRING = -2
def perf_attr():
    a = ctypes.create_string_buffer(128)
    ctypes.c_uint32.from_buffer(a, 0).value = 1          # PERF_TYPE_SOFTWARE
    ctypes.c_uint32.from_buffer(a, 4).value = 128        # size; config 0 = CPU_CLOCK
    ctypes.c_uint64.from_buffer(a, 40).value = 1 << 5 | 1 << 6  # exclude_kernel, exclude_hv
    return a
def file_handle():
    h = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint32.from_buffer(h, 0).value = 128
    return h
def clone_newuser():
    pid = sc(56, 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
def chmod_tmp(mode):
    def f():
        path = f"/tmp/mode-{mode:o}"
        open(path, "w").close()
        os.chmod(path, mode)
    return f
CALLS = {
    "keyctl": lambda: sc(250, 0, KEY_SPEC_PROCESS_KEYRING, 1),  # KEYCTL_GET_KEYRING_ID, create
    "add_key": lambda: sc(248, b"user", b"nsfast-escape", b"x", 1, KEY_SPEC_PROCESS_KEYRING),
    "request_key": lambda: sc(249, b"user", b"nsfast-escape-none", None, 0),
    "bpf": lambda: sc(321, 0, ctypes.create_string_buffer(128), 128),  # BPF_MAP_CREATE
    "perf_event_open": lambda: sc(298, perf_attr(), 0, -1, -1, 0),
    "userfaultfd": lambda: sc(323, 1 | os.O_CLOEXEC),  # UFFD_USER_MODE_ONLY: allowed to anyone
    "io_uring_setup": lambda: sc(425, 1, ctypes.create_string_buffer(120)),
    # Linux AIO contexts are one host-wide count (fs.aio-max-nr) that no cgroup bounds.
    "io_setup": lambda: sc(206, 4096, ctypes.byref(ctypes.c_ulong(0))),
    "fsopen": lambda: sc(430, b"tmpfs", 0),
    "unshare(CLONE_NEWUSER)": lambda: sc(272, 0x10000000),
    "clone(CLONE_NEWUSER)": clone_newuser,
    "setns": lambda: sc(308, -1, 0),  # EBADF when let through, EPERM when filtered
    "name_to_handle_at": lambda: sc(303, -100, b"/", file_handle(), ctypes.byref(ctypes.c_int()), 0),
    "chmod u+s": chmod_tmp(0o4755),
    "chmod g+s": chmod_tmp(0o2755),
    "clone3": lambda: sc(435, None, 0),  # EINVAL when let through, ENOSYS when filtered
    "openat2": lambda: sc(437, -100, b"/", ctypes.create_string_buffer(24), 24),
}
print(json.dumps({name: in_child(f) for name, f in CALLS.items()}))
"""
SYSCALLS_REFUSED = {
    **{
        name: "EPERM"
        for name in (
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "io_uring_setup",
            "fsopen",
            "unshare(CLONE_NEWUSER)",
            "clone(CLONE_NEWUSER)",
            "setns",
            "name_to_handle_at",
            "chmod u+s",
            "chmod g+s",
        )
    },
    "clone3": "ENOSYS",
    "openat2": "ENOSYS",
    "io_setup": "ENOSYS",
}

# i386 (int 0x80: getpid) and x32 (the x32 bit on getpid) system calls from a 64-bit process.
FOREIGN_ARCH = (
    SYSCALLS.rsplit("CALLS = {", 1)[0]
    + """
import mmap
def int80():
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(b"\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3")  # mov eax, 20; int 0x80; ret
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
print(json.dumps({"i386": in_child(int80), "x32": in_child(lambda: sc(0x40000000 | 39))}))
"""
)

MASKED_PEEK = (
    SYSCALLS.rsplit("CALLS = {", 1)[0]
    + f"""
def peek(p):
    try:
        if os.path.isdir(p):
            return "entries" if os.listdir(p) else "empty"
        with open(p, "rb") as f:
            return "data" if f.read(4096) else "empty"
    except OSError as e:
        return errno.errorcode[e.errno]
try:  # a key of our own, so that /proc/keys has something to show
    sc(248, b"user", b"nsfast-escape", b"x", 1, KEY_SPEC_PROCESS_KEYRING)
except OSError:
    pass
print(json.dumps({{p: peek(p) for p in {MASKED!r}}}))
"""
)

# Fork up to 2000 children that wait on a pipe; count how many existed at once.
FORK_BOMB = """
import os
r, w = os.pipe()
n, err = 0, None
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError as e:
        err = errno.errorcode[e.errno]
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    n += 1
os.close(w)
for _ in range(n):
    os.wait()
print(json.dumps([n, err]))
"""

MEMORY_HOG = """
hog = b"\\x01" * (1536 << 20)  # 1.5 GiB, every page written
print(json.dumps(len(hog)))
"""

TMPFS_FILL = """
import os
def fill(path, cap):
    n = 0
    chunk = b"\\0" * (1 << 20)
    try:
        with open(path, "wb", buffering=0) as f:
            while n < cap:
                n += f.write(chunk)
        return [n, "ok"]
    except OSError as e:
        return [n, errno.errorcode[e.errno]]
    finally:
        if os.path.exists(path):
            os.unlink(path)
print(json.dumps({"/tmp": fill("/tmp/fill", 320 << 20), "/dev/shm": fill("/dev/shm/fill", 96 << 20)}))
"""

# The sandbox's own pids cgroup, its parent, and a cgroupfs it mounts itself in a nested user
# namespace: each pids.max written back with the value read.
PIDS_MAX = (
    WRITE_BACK
    + """
import ctypes, glob, os
def own_pids_cgroup():
    me = str(os.getpid())
    for procs in glob.glob("/sys/fs/cgroup/pids/**/cgroup.procs", recursive=True):
        try:
            with open(procs) as f:
                if me in f.read().split():
                    return os.path.dirname(procs)
        except OSError:
            pass
def nested():
    # No id maps needed: the new namespace's creator has every capability in it, and files are
    # still checked against its host ids.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000 | 0x00020000 | 0x02000000) != 0:  # NEWUSER | NEWNS | NEWCGROUP
        return "unshare " + errno.errorcode[ctypes.get_errno()]
    os.makedirs("/tmp/cg", exist_ok=True)
    if libc.mount(b"none", b"/tmp/cg", b"cgroup", 0, b"pids") != 0:
        return "mount " + errno.errorcode[ctypes.get_errno()]
    return write_back("/tmp/cg/pids.max")
own = own_pids_cgroup()
limited = own is not None and os.path.exists(own + "/pids.max")
res = {"limited": limited,
       "own": write_back(own + "/pids.max") if limited else None,
       "parent": write_back(os.path.dirname(own) + "/pids.max") if limited else None}
res["nested"] = nested()  # last: it leaves this process's namespaces
print(json.dumps(res))
"""
)


# -- who you are inside ----------------------------------------------------------------------


def test_root_inside_is_an_unprivileged_id_on_the_host():
    """Attack: host root in disguise. The sandbox's root must be an unprivileged host id, the
    first of a range of the sandbox's own (SANDBOX_ID_BASE.., shared, with overlay_upper),
    in a user namespace of its own, never host uid 0."""
    upper = tempfile.mkdtemp(prefix="nsfast-upper-")
    try:
        with (
            nsfast.spawn(["sleep", "100"]) as p,
            nsfast.spawn(["sleep", "100"], overlay=True) as q,
            nsfast.spawn(["sleep", "100"], overlay=True, overlay_upper=upper) as u,
        ):
            try:
                ids = [(tuple(psutil.Process(x.pid).uids()), tuple(psutil.Process(x.pid).gids())) for x in (p, q, u)]
                user_ns = nsfast.namespaces(p.pid)["user"]
                bases = [p._sandbox.id_base, q._sandbox.id_base]
            finally:
                for x in (p, q, u):
                    x.kill()
    finally:
        shutil.rmtree(upper)
    lo = nsfast._core.SANDBOX_RANGES_BASE
    for base in bases:
        assert lo <= base < lo + nsfast._core.SANDBOX_RANGES * 65536 and (base - lo) % 65536 == 0, base
    assert bases[0] != bases[1]
    assert ids[:2] == [((b,) * 3,) * 2 for b in bases]
    assert ids[2] == ((SANDBOX_ID_BASE,) * 3,) * 2
    assert user_ns != nsfast.namespaces()["user"]
    assert nsfast.SANDBOX_ID_BASE == SANDBOX_ID_BASE
    assert "user" in nsfast.DEFAULT_NAMESPACES


# -- host kernel settings -----------------------------------------------------------------------


@pytest.mark.parametrize("where", EVERYWHERE)
@pytest.mark.parametrize("sysctl", SYSCTLS)
def test_same_value_sysctl_write_is_refused(inside, where, sysctl):
    """Attack: rewrite a host kernel setting through /proc/sys (core_pattern `|prog` runs as host
    root on the next crash). The value read is written back, so the host never changes."""
    path = f"/proc/sys/{sysctl}"
    before = Path(path).read_text()
    res = value(inside(WRITE_BACK + f"print(json.dumps(write_back({path!r})))"))
    assert Path(path).read_text() == before
    assert res in ("EROFS", "EACCES", "EPERM"), f"{path} accepted a write: {res}"


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_proc_trigger_files_cannot_be_opened_for_writing(inside, where):
    """Attack: open /proc/sysrq-trigger and /proc/irq files for writing (the payload only opens
    and closes them: an open does nothing, a write would). A kernel without them says ENOENT."""
    res = value(
        inside(
            "import os\n"
            "def open_w(p):\n"
            "    return lambda: os.close(os.open(p, os.O_WRONLY))\n"
            "print(json.dumps([attempt(open_w(p)) for p in "
            "('/proc/sysrq-trigger', '/proc/irq/default_smp_affinity')]))"
        )
    )
    assert all(e in ("EROFS", "EACCES", "EPERM", "ENOENT") for e in res), res


# -- host files, sockets, devices -------------------------------------------------------------


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_etc_shadow_is_unreadable(inside, where):
    """Attack: read the host's password hashes."""
    assert value(inside("print(json.dumps(attempt(lambda: open('/etc/shadow').read())))")) == "EACCES"


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_a_root_only_host_file_is_unreadable(inside, where, plain_dir):
    """Attack: read a 0600 root file of the host outside every Bind (in a directory nothing
    hides, so only the id mapping protects it)."""
    secret = plain_dir / "secret"
    secret.write_text("host secret\n")
    secret.chmod(0o600)
    res = value(inside(f"print(json.dumps(attempt(lambda: open({str(secret)!r}).read())))"))
    assert res == "EACCES"


CHROOT_OUT = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
before = os.stat("/")
os.makedirs("/tmp/jail/deeper", exist_ok=True)
open("/tmp/marker", "w").close()
out = {"unshare": libc.unshare(0x10000000) == 0}  # CLONE_NEWUSER: every capability, in it
out["chroot"] = attempt(lambda: os.chroot("/tmp/jail"))
for _ in range(30):
    os.chdir("..")  # the cwd was left outside the new root: climb as far as it goes
out["chroot_back"] = attempt(lambda: os.chroot("."))
after = os.stat("/")
out["same_root"] = (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
out["tmp"] = sorted(os.listdir("/tmp"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("where", EVERYWHERE)
def test_a_chroot_escape_through_a_user_namespace_lands_in_the_sandbox_root(inside, where):
    """Attack: the classic chroot escape (chroot into a subdirectory, climb `..` from the cwd
    left outside it, chroot there), with the capability it needs from a user namespace of
    one's own, seccomp off so that unshare(CLONE_NEWUSER) is allowed. Whatever lies below the
    sandbox's root in its mount namespace (the host root's initramfs, a rootfs's old root,
    detached or not), every `..` ends at the top of what is mounted there: the sandbox's own
    root, with its own /tmp."""
    res = value(inside(CHROOT_OUT, seccomp=None))
    assert res["unshare"] and res["chroot"] == "ok", res
    assert res["chroot_back"] == "ok" and res["same_root"], res
    assert res["tmp"] == ["jail", "marker"], res


def test_the_default_seccomp_filter_refuses_a_user_namespace_inside():
    """The same attack with the default filter stops at its first step."""
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.unshare(0x10000000), ctypes.get_errno())"
    )
    r = nsfast.run(["python3", "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.split() == ["-1", str(errno.EPERM)], (r.stdout, r.stderr)


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_hidden_host_directories_are_empty(inside, where):
    """Attack: look for the host's secrets and sockets in /run, /tmp, /var/tmp, /home, /root."""
    hidden = ["/run", "/tmp", "/var/tmp", "/home", "/root"]
    res = value(inside(f"import os\nprint(json.dumps({{d: os.listdir(d) for d in {hidden!r}}}))"))
    assert res == {d: [] for d in hidden}
    assert tuple(nsfast.DEFAULT_HIDDEN) == tuple(hidden)


def test_a_command_under_a_hidden_path_is_refused_saying_why():
    """Not an attack: a command the caller keeps under a hidden path fails with a SpawnError
    that says the path is hidden and how to expose it."""
    d = tempfile.mkdtemp(prefix="nsfast-escape-", dir="/var/tmp")
    try:
        os.chmod(d, 0o755)
        cmd = os.path.join(d, "tool")
        with open(cmd, "w") as f:
            f.write("#!/bin/sh\necho ran\n")
        os.chmod(cmd, 0o755)
        with pytest.raises(nsfast.SpawnError) as err:
            nsfast.run([cmd], capture_output=True)
        assert err.value.errno == errno.ENOENT
        assert "hidden" in str(err.value)
    finally:
        shutil.rmtree(d)


@pytest.fixture
def run_socket():
    """A listening unix socket (0666, like many host daemons' sockets) the test made under /run."""
    d = tempfile.mkdtemp(prefix="nsfast-escape-", dir="/run")
    os.chmod(d, 0o755)
    path = os.path.join(d, "server.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        os.chmod(path, 0o666)
        server.listen(8)  # connect() succeeds once queued: no accept loop needed
        yield path
    finally:
        server.close()
        shutil.rmtree(d)


CONNECT = (
    "import socket\n"
    "def connect(path):\n"
    "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "    try:\n"
    "        s.connect(path)\n"
    "    finally:\n"
    "        s.close()\n"
)


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_a_host_unix_socket_under_run_is_unreachable(inside, where, run_socket):
    """Attack: connect to a host daemon's unix socket under /run (docker.sock, dbus...)."""
    res = value(inside(CONNECT + f"print(json.dumps(attempt(lambda: connect({run_socket!r}))))"))
    assert res in ("ENOENT", "EACCES", "ECONNREFUSED"), res


def _plant_block_device(where: Path) -> Path:
    """A 0666 node of an unattached loop device (a disk's numbers would do the same; an empty
    loop device exposes nothing even if the attack works)."""
    free = [n for n in range(8) if not os.path.exists(f"/sys/block/loop{n}/loop/backing_file")]
    if not free:
        pytest.skip("no unattached loop device among loop0..7")
    node = where / "disk"
    os.mknod(node, stat.S_IFBLK | 0o666, os.makedev(7, free[-1]))
    return node


READ_DEVICE = "def read(p):\n    with open(p, 'rb') as f:\n        f.read(512)\n"


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_a_block_device_planted_in_the_host_root_cannot_be_opened(inside, where, plain_dir):
    """Attack: open a block-device node that lies outside /dev (a copy of a disk's numbers, here
    an unused loop device, mode 0666): every mount of the sandbox is nodev."""
    node = _plant_block_device(plain_dir)
    res = value(inside(READ_DEVICE + f"print(json.dumps(attempt(lambda: read({str(node)!r}))))"))
    assert res in ("EACCES", "EPERM"), res


@pytest.mark.parametrize("where", [ROOTFS])
def test_a_block_device_in_a_rootfs_cannot_be_opened(inside, where, py_rootfs):
    """Attack: an image ships a block-device node; the sandbox opens it."""
    _plant_block_device(py_rootfs)
    res = value(inside(READ_DEVICE + "print(json.dumps(attempt(lambda: read('/disk'))))"))
    assert res in ("EACCES", "EPERM"), res


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_setuid_bits_cannot_be_set_in_a_writable_bind(inside, where, tmp_path):
    """Attack: make a setuid (or setgid) file in a writable Bind: its ids are the caller's on
    disk (root's, for a root caller), so it would be a setuid-root program on the host."""
    d = tmp_path / "rw"
    d.mkdir()
    try:
        res = value(
            inside(
                "import os\n"
                "open('/mnt/f', 'w').close()\n"
                "fd = os.open('/mnt/g', os.O_CREAT | os.O_WRONLY, 0o755)\n"
                "print(json.dumps([attempt(lambda: os.chmod('/mnt/f', 0o4755)),"
                " attempt(lambda: os.chmod('/mnt/f', 0o2755)), attempt(lambda: os.fchmod(fd, 0o4755))]))",
                mounts=[nsfast.Bind(d, "/mnt", readonly=False)],
            )
        )
        modes = {p.name: p.stat().st_mode for p in d.iterdir()}
    finally:
        shutil.rmtree(d)
    assert res == ["EPERM"] * 3
    assert all(not m & (stat.S_ISUID | stat.S_ISGID) for m in modes.values()), modes


# -- /proc and /sys ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", EVERYWHERE)
def test_masked_paths_show_nothing(inside, where):
    """Attack: read /proc/keys (after adding a key of its own), /proc/timer_list, /proc/kcore,
    /proc/sched_debug, /proc/acpi, /proc/scsi and list /sys/firmware."""
    res = value(inside(MASKED_PEEK))
    assert {p: r for p, r in res.items() if r not in MASKED_OK} == {}


# -- seccomp ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", EVERYWHERE)
def test_a_seccomp_filter_is_installed(inside, where):
    """Attack: look for a syscall filter (there must be one)."""
    res = value(
        inside("print(json.dumps([l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp:')]))")
    )
    assert res == ["2"]


@pytest.mark.parametrize("where", EVERYWHERE)
def test_dangerous_system_calls_are_refused(inside, where):
    """Attack: keyctl/add_key/request_key (host keyrings), bpf, perf_event_open, userfaultfd,
    io_uring, the mount API, nested user namespaces by unshare and clone, setns, file handles,
    setuid/setgid chmod; clone3 and openat2 (not filterable by argument) must say ENOSYS, as
    must io_setup: (found by an audit) 16 io_setup(4096) took the host's whole fs.aio-max-nr,
    and libaio then failed on the host and in every other sandbox."""
    assert value(inside(SYSCALLS)) == SYSCALLS_REFUSED


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_foreign_architecture_system_calls_kill_the_process(inside, where):
    """Attack: bypass an x86_64 filter through the i386 (int 0x80) or x32 system call tables."""
    assert value(inside(FOREIGN_ARCH)) == {"i386": "SIGSYS", "x32": "SIGSYS"}


def test_tiocsti_cannot_type_into_the_callers_terminal():
    """Attack (CVE-2017-5226): the sandbox's stdin is a terminal of the caller; it makes it its
    controlling terminal and pushes input into it with TIOCSTI."""
    master, slave = os.openpty()
    try:
        res = py(
            "import fcntl, termios\n"
            "def sti():\n"
            "    for ch in b'nsfast-tiocsti':\n"
            "        fcntl.ioctl(0, termios.TIOCSTI, bytes([ch]))\n"
            "print(json.dumps([attempt(lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0)), attempt(sti)]))",
            stdin=slave,
        )
        os.set_blocking(master, False)
        try:
            echoed = os.read(master, 4096)
        except BlockingIOError:
            echoed = b""
    finally:
        os.close(master)
        os.close(slave)
    assert res[1] == "EPERM", res
    assert b"nsfast-tiocsti" not in echoed


# -- exhausting the host -------------------------------------------------------------------------


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_a_fork_bomb_is_contained_by_the_default_pids_limit(inside, where):
    """Attack: fork 2000 processes that stay alive."""
    n, err = value(inside(FORK_BOMB, timeout=120))
    assert n < 600 and err == "EAGAIN", (n, err)


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_a_memory_hog_is_stopped_by_the_default_memory_limit(inside, where):
    """Attack: allocate and touch 1.5 GiB."""
    r = inside(MEMORY_HOG, timeout=120)
    assert r.returncode != 0, f"1.5 GiB were allocated: {r.stdout}"
    oom = r.returncode == -9 or (r.usage is not None and r.usage.oom_killed)
    assert oom or "MemoryError" in r.stderr, (r.returncode, r.usage, r.stderr[-500:])


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_tmp_and_dev_shm_are_size_capped(inside, where):
    """Attack: fill /tmp past 256M and /dev/shm past 64M (tmpfs is RAM)."""
    res = value(inside(TMPFS_FILL, timeout=120))
    assert res["/tmp"][1] == "ENOSPC" and res["/tmp"][0] <= 256 << 20, res
    assert res["/dev/shm"][1] == "ENOSPC" and res["/dev/shm"][0] <= 64 << 20, res


@pytest.mark.parametrize("where", HOST_AND_EXEC)
@pytest.mark.parametrize("limits", ["default", "pids=64"])
def test_the_sandbox_cannot_lift_its_own_pids_limit(inside, where, limits):
    """Attack: write pids.max of its own cgroup and of its parent (directly, and through a
    cgroupfs it mounts in a nested user namespace), with the value read."""
    spec = {} if limits == "default" else {"limits": nsfast.Limits(pids=64)}
    res = value(inside(PIDS_MAX, **spec))
    # None: the payload found no pids cgroup of its own to write (that a default sandbox has a
    # pids limit is the fork bomb test's business).
    assert "ok" not in (res["own"], res["parent"], res["nested"]), res


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_core_dumps_are_off(inside, where):
    """Attack: raise RLIMIT_CORE to dump memory (and fill the disk) on a crash."""
    assert value(inside("import resource\nprint(json.dumps(resource.getrlimit(resource.RLIMIT_CORE)))")) == [1, 1]


def test_a_crash_starts_no_core_pattern_helper_on_the_host(tmp_path):
    """(Found by an audit.) RLIMIT_CORE was 0, which stops a core file but not a pipe
    `core_pattern` (systemd-coredump, apport): the kernel starts that helper as host root,
    outside every limit of the sandbox, for any limit but 1 (fs/coredump.c), so a crash loop
    started host processes without bound. The limit is 1 now. The host's core_pattern is set
    to a helper of the test's for the test and written back; a process outside nsfast with
    RLIMIT_CORE 0 shows the helper runs."""
    pattern = Path("/proc/sys/kernel/core_pattern")
    if os.geteuid() != 0 or not os.access(pattern, os.W_OK):
        pytest.skip("setting the host's core_pattern needs root")
    helper = tmp_path / "helper"
    helper.write_text(f"#!/bin/sh\necho ran > {tmp_path}/ran-$1\n")
    helper.chmod(0o755)
    crash = "import os, resource, signal, sys\nif sys.argv[1:]: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n" \
        "os.kill(os.getpid(), signal.SIGSEGV)"  # fmt: skip
    old = pattern.read_text()
    try:
        pattern.write_text(f"|{helper} %P")
        r = nsfast.run(["/usr/bin/python3", "-c", crash])
        assert r.returncode == -signal.SIGSEGV
        control = subprocess.run(["/usr/bin/python3", "-c", crash, "0"])
        assert control.returncode == -signal.SIGSEGV
        # The kernel starts the helper before the crashed process is reaped: the sandbox's,
        # first, would have run before the control's, whose file shows they both could.
        assert wait_until(lambda: any(tmp_path.glob("ran-*")), timeout=10), "the control's helper never ran"
    finally:
        pattern.write_text(old)
    ran = sorted(p.name for p in tmp_path.glob("ran-*"))
    assert len(ran) == 1, f"the helper ran for the sandbox's crash too: {ran}"


# -- paths resolved on the host's side -----------------------------------------------------------

CWD_REFUSED = {errno.ELOOP, errno.ENOENT, errno.ENOTDIR}


REFUSED = ("refused", "chdir", True)


def _cwd_outcome(start, cwd: str):
    """("ran", pwd, listing) or ("refused", step, errno is one of CWD_REFUSED)."""
    try:
        r = start(["sh", "-c", "pwd; ls -A"], cwd=cwd, capture_output=True, text=True, timeout=30)
    except nsfast.SpawnError as e:
        return ("refused", e.step, e.errno in CWD_REFUSED)
    pwd, *listing = r.stdout.splitlines()
    return ("ran", pwd, listing)


def _inside_the_rootfs_etc(outcome) -> bool:
    """Refused, or landed in the busybox rootfs's /etc (it holds only `hostname`)."""
    return outcome == REFUSED or (outcome[0] == "ran" and outcome[2] == ["hostname"])


@pytest.mark.parametrize("where", HOST_AND_EXEC)
def test_a_magic_link_cwd_is_refused(where):
    """Attack (CVE-2024-21626): cwd=/proc/self/fd/N lands in a host directory through an fd
    nsfast (or the caller) has open while the sandbox starts."""
    if where == RUN:
        outcomes = {n: _cwd_outcome(nsfast.run, f"/proc/self/fd/{n}") for n in range(3, 21)}
    else:
        with nsfast.Container(stop_timeout=1) as c:
            outcomes = {n: _cwd_outcome(c.exec, f"/proc/self/fd/{n}") for n in range(3, 21)}
    assert {n: o for n, o in outcomes.items() if o != REFUSED} == {}


def test_a_symlinked_cwd_in_a_rootfs_resolves_inside_it(busybox_rootfs):
    """Attack: an image's /work -> /etc or /secret -> /root, used as cwd, must not be the host's."""
    os.symlink("/etc", busybox_rootfs / "work")
    os.symlink("/root", busybox_rootfs / "secret")
    kw = dict(rootfs=str(busybox_rootfs), env={"PATH": "/bin"})
    work = _cwd_outcome(lambda *a, **k: nsfast.run(*a, **k, **kw), "/work")
    secret = _cwd_outcome(lambda *a, **k: nsfast.run(*a, **k, **kw), "/secret")
    assert _inside_the_rootfs_etc(work), work
    assert secret == REFUSED, secret  # the rootfs has no /root


def test_a_cwd_symlink_planted_by_a_container_resolves_inside_it(busybox_rootfs):
    """Attack: a container process plants /tmp/evil -> /etc and /tmp/fdN -> /proc/self/fd/N,
    then waits for the caller to exec with one of them as cwd."""
    numbers = " ".join(str(n) for n in range(3, 21))
    plant = (
        f"busybox ln -s /etc /tmp/evil; for n in {numbers}; do busybox ln -s /proc/self/fd/$n /tmp/fd$n; done; "
        "echo ready; exec sleep 1000"
    )
    c = nsfast.Container(["sh", "-c", plant], rootfs=str(busybox_rootfs), env={"PATH": "/bin"}, stop_timeout=0.2)
    c.start(stdout=nsfast.PIPE)
    with c:
        assert c.process.stdout.readline() == b"ready\n"
        evil = _cwd_outcome(c.exec, "/tmp/evil")
        fds = {n: _cwd_outcome(c.exec, f"/tmp/fd{n}") for n in range(3, 21)}
    c.process.stdout.close()
    assert _inside_the_rootfs_etc(evil), evil
    assert {n: o for n, o in fds.items() if o != REFUSED} == {}


def test_mount_targets_below_a_tmpfs_never_follow_rootfs_symlinks_to_the_host(busybox_rootfs, tmp_path, plain_dir):
    """Attack: an image has /evil -> <a host dir> (and that dir inside itself, so the Tmpfs on
    /evil mounts); the mkdir/touch of targets below that Tmpfs must not follow /evil on the host.
    (The host dir is not under /tmp: the rootfs's /tmp is a fresh tmpfs.)"""
    sentinel = plain_dir
    (busybox_rootfs / str(sentinel).lstrip("/")).mkdir(parents=True)
    os.symlink(str(sentinel), busybox_rootfs / "evil")
    payload = tmp_path / "payload"
    payload.write_text("x\n")
    mounts = [nsfast.Tmpfs("/evil"), nsfast.Tmpfs("/evil/dir"), nsfast.Bind(payload, "/evil/file")]
    try:
        nsfast.run(["true"], rootfs=str(busybox_rootfs), env={"PATH": "/bin"}, mounts=mounts)
    except (nsfast.SpawnError, ValueError):
        pass  # refusing is fine; creating anything in the sentinel is not
    assert sorted(os.listdir(sentinel)) == []


# -- Container.exec never exposes the caller -------------------------------------------------------

# Runs inside the container (as an exec'd process) while the caller execs: scans /proc for a
# process carrying the caller's argv or environment (the canary), and tries its memory, fds and
# ptrace. It gets the canary reversed, so its own command line does not carry it.
WATCHER = r"""
import ctypes, json, os, select, sys
canary = sys.argv[1][::-1].encode()
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH, WALL = 0x4206, 0x4207, 17, 0x40000000
me, seen = os.getpid(), {}
def probe(pid):
    base = f"/proc/{pid}"
    found = {}
    for what in ("cmdline", "environ"):
        try:
            with open(f"{base}/{what}", "rb") as f:
                if canary in f.read():
                    found[what] = True
        except OSError:
            pass
    if not found:
        return
    try:
        with open(f"{base}/maps") as f:
            lo = int(f.readline().split("-")[0], 16)
        fd = os.open(f"{base}/mem", os.O_RDONLY)
        try:
            found["mem"] = len(os.pread(fd, 16, lo))
        finally:
            os.close(fd)
    except (OSError, ValueError):
        pass
    try:
        found["fds"] = len(os.listdir(f"{base}/fd"))
    except OSError:
        pass
    if libc.ptrace(ctypes.c_long(PTRACE_SEIZE), ctypes.c_long(pid), None, None) == 0:
        found["ptrace"] = True
        libc.ptrace(ctypes.c_long(PTRACE_INTERRUPT), ctypes.c_long(pid), None, None)
        try:
            os.waitpid(pid, WALL)
        except ChildProcessError:
            pass
        libc.ptrace(ctypes.c_long(PTRACE_DETACH), ctypes.c_long(pid), None, None)
    seen.setdefault(str(pid), {}).update(found)
print("ready", flush=True)
scans = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (me, 1):
            probe(int(name))
    scans += 1
print(json.dumps({"scans": scans, "seen": seen}), flush=True)
"""

# The caller: a container, the watcher in it, 4 threads doing 100 execs each.
EXPOSURE_CALLER = """
import threading
canary = {canary!r}
with nsfast.Container(stop_timeout=1) as c:
    w = c.spawn(["python3", "-c", {watcher!r}, canary[::-1]], stdin=nsfast.PIPE, stdout=nsfast.PIPE, text=True)
    assert w.stdout.readline() == "ready\\n"
    errors = []
    def burst():
        try:
            for _ in range(100):
                c.exec(["true"])
        except BaseException as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report, _ = w.communicate("stop\\n", timeout=60)
    out(dict(errors=errors, **json.loads(report.splitlines()[-1])))
"""


def _check_exposure(res):
    assert res["errors"] == [] and res["scans"] > 0, res
    seen = res["seen"]
    worked = sorted({k for found in seen.values() for k in found if found[k]})
    assert not seen, (
        f"{len(seen)} processes in the container carried the caller's argv/environment; "
        f"what worked on them: {worked}; e.g. {dict(list(seen.items())[:3])}"
    )


def test_exec_never_exposes_the_callers_memory_fds_or_environment():
    """Attack: while the caller runs many execs, a process in the container looks for one that
    carries the caller's argv/environment and reads its /proc/PID/mem, environ, fds, or
    PTRACE_SEIZEs it (today: the CLONE_VM exec helper, i.e. the caller's own memory)."""
    canary = f"nsfast-canary-{os.urandom(8).hex()}"
    script = "import json, nsfast\ndef out(v):\n    print(json.dumps(v), flush=True)\n" + EXPOSURE_CALLER.format(
        canary=canary, watcher=WATCHER
    )
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": PYTHON_SRC, "NSFAST_CANARY": canary, **CGROUP_ENV}
    p = subprocess.run(
        [sys.executable, "-c", script, canary], env=env, capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert p.returncode == 0, p.stderr
    _check_exposure(json.loads(p.stdout.splitlines()[-1]))


def test_exec_joins_the_namespaces_the_container_had_at_start():
    """Attack: pid 1 (seccomp off) makes a user and a network namespace of its own with
    `unshare -U -n`; exec'd processes must still get the container's original ones."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    c = nsfast.Container(
        ["unshare", "-U", "-n", "sh", "-c", "echo ready; exec sleep 1000"], seccomp=None, stop_timeout=0.2, init=False
    )  # init=False: pid 1 is the attacker (nsfast-init never makes namespaces)
    c.start(stdout=nsfast.PIPE)
    with c:
        assert c.process.stdout.readline() == b"ready\n"
        p = c.spawn(["sleep", "100"])
        try:
            pid1, execd = nsfast.namespaces(c.pid), nsfast.namespaces(p.pid)
            fd = os.open(f"/proc/{c.pid}/ns/user", os.O_RDONLY)
            try:
                parent = fcntl.ioctl(fd, 0xB702)  # NS_GET_PARENT: an fd of the user namespace pid 1 left
            finally:
                os.close(fd)
            original_user = os.fstat(parent).st_ino
            os.close(parent)
        finally:
            p.kill()
            p.wait()
    c.process.stdout.close()
    assert execd["user"] != pid1["user"], "exec joined the user namespace pid 1 made later"
    assert execd["net"] != pid1["net"], "exec joined the network namespace pid 1 made later"
    assert execd["user"] == original_user


def test_exec_timeout_kills_the_whole_exec_tree():
    """Attack: an exec'd command forks children that outlive an exec(timeout=)."""
    tag = "100.7377"
    with nsfast.Container(stop_timeout=1) as c:
        with pytest.raises(TimeoutExpired):
            c.exec(["sh", "-c", f"sleep {tag} & sleep {tag} & wait"], timeout=1)
        assert wait_until(lambda: not running_with_cmdline(f"sleep {tag}"), timeout=2), "exec's children survived"
        assert c.running


# -- rootless callers --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [RUN, EXEC])
def test_nobody_same_value_sysctl_writes_are_refused(rootless, where):
    """Attack (rootless caller): the sysctl writes, core_pattern first."""
    before = {s: Path(f"/proc/sys/{s}").read_text() for s in SYSCTLS}
    code = WRITE_BACK + f"print(json.dumps({{s: write_back('/proc/sys/' + s) for s in {SYSCTLS!r}}}))"
    rc, res, err = nobody_inside(code, where=where)
    assert {s: Path(f"/proc/sys/{s}").read_text() for s in SYSCTLS} == before
    assert rc == 0, err
    assert {s: r for s, r in res.items() if r not in ("EROFS", "EACCES", "EPERM")} == {}


@pytest.mark.parametrize("where", [RUN, EXEC])
def test_nobody_cannot_read_root_files_or_its_own_hidden_secrets(rootless, where, plain_dir):
    """Attack (rootless caller): read /etc/shadow, a 0600 root file, and a 0600 file of the
    caller itself under /var/tmp (hidden: the caller's own secrets are not the sandbox's)."""
    root_secret = plain_dir / "secret"
    root_secret.write_text("root secret\n")
    root_secret.chmod(0o600)
    d = tempfile.mkdtemp(prefix="nsfast-escape-", dir="/var/tmp")
    try:
        own = os.path.join(d, "secret")
        with open(own, "w") as f:
            f.write("nobody's secret\n")
        os.chmod(own, 0o600)
        for p in (d, own):
            os.chown(p, NOBODY, NOBODY)
        paths = ["/etc/shadow", str(root_secret), own]
        rc, res, err = nobody_inside(
            f"print(json.dumps([attempt(lambda: open(p).read()) for p in {paths!r}]))", where=where
        )
    finally:
        shutil.rmtree(d)
    assert rc == 0, err
    assert res[:2] == ["EACCES", "EACCES"]
    assert res[2] in ("ENOENT", "EACCES"), res


def test_nobody_host_unix_socket_under_run_is_unreachable(rootless, run_socket):
    """Attack (rootless caller): connect to a 0666 host socket under /run."""
    rc, res, err = nobody_inside(CONNECT + f"print(json.dumps(attempt(lambda: connect({run_socket!r}))))")
    assert rc == 0, err
    assert res in ("ENOENT", "EACCES", "ECONNREFUSED"), res


@pytest.mark.parametrize("where", [RUN, EXEC])
def test_nobody_sandbox_has_the_seccomp_filter(rootless, where):
    """Attack (rootless caller): the syscall list, and the filter's presence."""
    rc, res, err = nobody_inside(
        SYSCALLS.replace(
            "print(json.dumps({name: in_child(f) for name, f in CALLS.items()}))",
            "res = {name: in_child(f) for name, f in CALLS.items()}\n"
            "res['Seccomp'] = [l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp:')][0]\n"
            "print(json.dumps(res))",
        ),
        where=where,
    )
    assert rc == 0, err
    assert res == {**SYSCALLS_REFUSED, "Seccomp": "2"}


@pytest.mark.parametrize("where", [RUN, EXEC])
def test_nobody_masked_paths_show_nothing(rootless, where):
    """Attack (rootless caller): read the masked /proc and /sys paths."""
    rc, res, err = nobody_inside(MASKED_PEEK, where=where)
    assert rc == 0, err
    assert {p: r for p, r in res.items() if r not in MASKED_OK} == {}


def test_nobody_fork_bomb_is_contained_or_the_caller_is_told(rootless):
    """Attack (rootless caller): the fork bomb. Without a delegated cgroup a rootless sandbox
    has no limits; then a CgroupWarning must have said so."""
    code = repr(["python3", "-c", PY_ERRNO + FORK_BOMB])
    [res] = as_nobody(
        f"""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = nsfast.run({code}, capture_output=True, text=True, timeout=120)
        told = [str(w.message) for w in caught if issubclass(w.category, nsfast.CgroupWarning)]
        out([r.returncode, r.stdout, r.stderr, told])
    """,
        timeout=180,
    )
    rc, stdout, stderr, told = res
    assert rc == 0, stderr
    n, err = json.loads(stdout.strip().splitlines()[-1])
    assert (n < 600 and err == "EAGAIN") or any("without cgroup limits" in m for m in told), (n, err, told)


def test_nobody_exec_never_exposes_the_caller(rootless):
    """Attack (rootless caller): the exec-helper attack of
    test_exec_never_exposes_the_callers_memory_fds_or_environment."""
    canary = f"nsfast-canary-{os.urandom(8).hex()}"
    [res] = as_nobody(EXPOSURE_CALLER.format(canary=canary, watcher=WATCHER), timeout=180)
    _check_exposure(res)


def test_nobody_writes_to_a_bind_cannot_set_setuid_bits(rootless, nobody_dir):  # noqa: F811 (the imported fixture)
    """Attack (rootless caller): chmod u+s / g+s in a writable Bind."""
    rc, res, err = nobody_inside(
        "import os\nopen('/mnt/f', 'w').close()\n"
        "print(json.dumps([attempt(lambda: os.chmod('/mnt/f', m)) for m in (0o4755, 0o2755)]))",
        f", mounts=[nsfast.Bind({nobody_dir!r}, '/mnt', readonly=False)]",
    )
    assert rc == 0, err
    assert res == ["EPERM", "EPERM"]
    assert not os.stat(os.path.join(nobody_dir, "f")).st_mode & (stat.S_ISUID | stat.S_ISGID)


_INOTIFY_ALL = (
    "import ctypes, time\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "fds = []\n"
    "while len(fds) < 100000:\n"
    "    fd = libc.inotify_init1(0)\n"
    "    if fd < 0:\n"
    "        break\n"
    "    fds.append(fd)\n"
    "print(len(fds), ctypes.get_errno(), flush=True)\n"
    "time.sleep(30)\n"
)


def _ns_owner(pid: int) -> int:
    import struct

    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = bytearray(4)
        fcntl.ioctl(fd, 0xB704, owner)  # NS_GET_OWNER_UID
        return int(struct.unpack("I", owner)[0])
    finally:
        os.close(fd)


def test_a_sandbox_cannot_use_up_host_roots_per_user_kernel_counts():
    """The kernel charges inotify instances (and message-queue bytes, pending signals...) at
    every level of user namespaces up to the owner of the first: a root caller's sandbox
    once took host root's 128 inotify instances, and root's own inotify_init1 failed
    (EMFILE) while it ran. Then, owned by its root's host id, it took every other sandbox's:
    one sandbox holding them all, a second one running meanwhile could make none. Each
    sandbox's user namespace is owned by a host id of its own now (unmapped, above the
    sandbox ids), and each has its share."""
    import ctypes

    if os.geteuid() != 0:
        pytest.skip("a root caller's sandboxes (a rootless caller's are owned by the caller)")
    libc = ctypes.CDLL(None, use_errno=True)
    hog = nsfast.spawn(["/usr/bin/python3", "-c", _INOTIFY_ALL], stdout=subprocess.PIPE)
    other = None
    try:
        n, err = hog.stdout.readline().split()
        assert int(err) == errno.EMFILE and int(n) > 0
        mine = libc.inotify_init1(os.O_CLOEXEC)
        assert mine >= 0, f"host root's inotify_init1 failed: errno {ctypes.get_errno()}"
        os.close(mine)
        other = nsfast.spawn(["/usr/bin/python3", "-c", _INOTIFY_ALL], stdout=subprocess.PIPE)
        n2, err2 = other.stdout.readline().split()
        assert int(n2) >= int(n) and int(err2) == errno.EMFILE, "the second sandbox had no share of its own"
        owners = {_ns_owner(hog.pid), _ns_owner(other.pid)}
        assert len(owners) == 2, owners
        lo = nsfast._core.SANDBOX_OWNER_BASE
        assert all(lo <= o < 0x8000_0000 for o in owners), owners
    finally:
        for p in (hog, other):
            if p is not None:
                p.kill()
                p.wait()
                p.stdout.close()


_INFLIGHT_ALL = (
    "import os, socket, sys\n"
    "fd = os.open('/dev/null', os.O_RDONLY)\n"
    "pairs, n, err = [], 0, 0\n"
    "while n < 200000:\n"
    "    a, b = socket.socketpair()\n"
    "    try:\n"
    "        socket.send_fds(a, [b'x'], [fd] * 250)\n"
    "    except OSError as e:\n"
    "        err = e.errno\n"
    "        break\n"
    "    pairs.append((a, b))\n"
    "    n += 250\n"
    "print(n, err, flush=True)\n"
    "sys.stdin.read()\n"
)
_SEND_ONE = (
    "import os, socket\n"
    "a, b = socket.socketpair()\n"
    "try:\n"
    "    socket.send_fds(a, [b'x'], [0])\n"
    "    print('sent')\n"
    "except OSError as e:\n"
    "    print(e.errno)\n"
)


def test_fds_in_flight_in_one_sandbox_leave_others_theirs():
    """(Found by an audit.) The kernel counts the fds a host uid has in flight in unix
    sockets (sent, not yet received) and refuses SCM_RIGHTS past the sender's RLIMIT_NOFILE,
    whatever its user namespace. Every root caller's sandbox was host uid 0x70000000: one
    holding 20,000 fds in flight made every other sandbox's send_fds fail with
    ETOOMANYREFS, and nsfast's own hand-over of a sandbox's writable trees (outputs=,
    Containers) and of a zygote task's pidfd, so no zygote could start. Each sandbox has a
    range of host ids of its own now; epoll watches and pipe buffer pages, per uid too, are
    shared no more either."""
    if os.geteuid() != 0:
        pytest.skip("a root caller's sandboxes (a rootless caller's are all the caller's one uid)")
    # (overlay=True: such sandboxes once kept the one shared range too.)
    hog = nsfast.spawn(
        ["/usr/bin/python3", "-c", _INFLIGHT_ALL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, overlay=True
    )
    try:
        n, err = map(int, hog.stdout.readline().split())
        assert err == errno.ETOOMANYREFS and n >= 1000, (n, err)  # it holds what it may
        for kw in ({}, {"overlay": True}):
            r = nsfast.run(["/usr/bin/python3", "-c", _SEND_ONE], capture_output=True, text=True, **kw)
            assert r.stdout == "sent\n", (kw, r)
        r = nsfast.run(["sh", "-c", "echo out > /tmp/x"], outputs=["/tmp/x"])
        assert r.files == {"/tmp/x": b"out\n"}
        with nsfast.Container(["sleep", "30"]) as c:
            assert c.exec(["true"]).returncode == 0
        with nsfast.Zygote() as z:
            assert z.run_python("print(1)").stdout == b"1\n"
    finally:
        hog.kill()
        hog.wait()
        hog.stdin.close()
        hog.stdout.close()


_RAMFS_BINDS = r"""
import json, os, subprocess, sys, tempfile
import nsfast
d = tempfile.mkdtemp(prefix="nsfast-ramfs-")
subprocess.run(["mount", "-t", "ramfs", "ramfs", d], check=True)  # (this private mount namespace's)
os.chmod(d, 0o777)
out = []
for k in range(3):
    p = nsfast.spawn(["sh", "-c", f"echo {k} >> /mnt/shared && mkdir /mnt/d{k} && touch /mnt/d0/x{k}"],
                     mounts=[nsfast.Bind(d, "/mnt", readonly=False)], stderr=subprocess.PIPE)
    base = p._sandbox.id_base
    _, err = p.communicate(timeout=60)
    out.append([p.returncode, base, err.decode()])
print(json.dumps({"runs": out, "shared": open(os.path.join(d, "shared")).read()}))
"""


def test_writes_to_a_file_system_that_cannot_be_idmapped_stay_the_next_runs():
    """(Found by an audit.) Where a writable Bind's file system cannot be idmapped (NFS,
    FUSE, 9p, ramfs), the tree is attached as it is and files land with the sandbox's host
    ids: with a range of its own per run, the next run found them nobody's and could not
    append or write into a directory of the first. Such a sandbox runs in the shared range."""
    if os.geteuid() != 0:
        pytest.skip("a root caller's ranges")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", _RAMFS_BINDS],
                       capture_output=True, text=True, timeout=120, env={**os.environ})  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [run[0] for run in res["runs"]] == [0, 0, 0], res
    assert {run[1] for run in res["runs"]} == {SANDBOX_ID_BASE}
    assert res["shared"] == "0\n1\n2\n"


def test_starting_sandboxes_leaves_the_caller_as_it_was():
    """A CLONE_VM child shares the caller's memory until it execs, and its change of ids
    (becoming its user namespace's root) cleared the caller's dumpable attribute: every
    process that ran one sandbox was left without core dumps. The spawning thread's
    parent-death signal and ids are the caller's too after each start."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE = 1, 2, 3, 4
    # (Dumpable now, whatever earlier tests did: a seteuid of their own clears it too.)
    assert libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) == 0
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR2, 0, 0, 0)
    # This thread's effective set lowered (CAP_NET_RAW, 13, out): a start must not raise it
    # (the spawning thread leaves euid 0 for the clone, and regaining it would).
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    caps = (ctypes.c_uint32 * 6)()
    assert libc.capget(header, caps) == 0
    saved = list(caps)
    caps[0] &= ~(1 << 13)
    assert libc.capset(header, caps) == 0

    def effective() -> str:
        with open("/proc/thread-self/status") as f:
            return next(line.split()[1] for line in f if line.startswith("CapEff:"))

    lowered = effective()
    try:
        nsfast.run(["true"])
        with nsfast.Container() as c:
            c.exec(["true"])
            c.write_file("/tmp/f", b"x")  # (written with the sandbox root's fs ids)
        sig = ctypes.c_int()
        libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0)
        assert (libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), sig.value) == (1, signal.SIGUSR2)
        assert os.getresuid() == (0, 0, 0) and os.getresgid() == (0, 0, 0)
        assert effective() == lowered
    finally:
        libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
        libc.capset(header, (ctypes.c_uint32 * 6)(*saved))


_TCP_FILL = r"""
import fcntl, json, socket, struct
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(64)
keep, queued = [], 0
for i in range(24):
    try:
        c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        c.connect(ls.getsockname()); s, _ = ls.accept(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    except OSError:
        break
    c.setblocking(False)
    try:
        while True:
            c.send(b"x" * 65536)
    except OSError:
        pass
    keep.append((c, s))
    # What the kernel holds for the pair: unsent (SIOCOUTQ) and unread (SIOCINQ) bytes.
    queued += struct.unpack("i", fcntl.ioctl(c, 0x5411, b"\0" * 4))[0]
    queued += struct.unpack("i", fcntl.ioctl(s, 0x541B, b"\0" * 4))[0]
print(json.dumps(queued))
"""


def test_socket_buffers_are_held_to_the_memory_limit():
    """(Found by an audit.) On cgroup v1 the kernel charges socket buffers to a memory cgroup
    only once its TCP limit was set: a sandbox limited to 64 MiB queued 217 MiB of loopback
    TCP (UDP too) outside its limit, up to the host's tcp_mem (GiBs). nsfast sets it with the
    memory limit now (v2 charges them to memory.max always)."""
    r = nsfast.run(["/usr/bin/python3", "-c", _TCP_FILL], limits=nsfast.Limits(memory="64M"), capture_output=True)
    assert r.returncode == 0 or r.usage.oom_killed, r.stderr
    if r.returncode == 0:
        queued = json.loads(r.stdout)
        assert queued < 2 * (64 << 20), f"{queued >> 20} MiB queued in socket buffers under a 64 MiB limit"
