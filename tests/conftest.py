"""Shared fixtures and helpers of the nsfast test suite.

Every test starts real sandboxes; nothing is mocked. The suite runs as root (the CI VM),
so rootless behaviour is exercised by re-running small scripts as `nobody` (test_rootless).
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import psutil
import pytest

import nsfast


def _mount_relative_cgroup_root() -> str | None:
    """NSFAST_CGROUP_ROOT for this session, or None to test nsfast's default.

    By default sandbox cgroups go below the caller's own cgroup, in each hierarchy. On the
    development host this process's memory cgroup (/process_api/<id>) belongs to the machine,
    and tests must never create cgroups in it: where any of our cgroups is not a hierarchy's
    root, the session uses the mount-relative form (the same cgroup `/nsfast` in every
    hierarchy; inherited by the nsfast subprocesses tests start). test_cgroups tests the
    default itself in an outer cgroup it makes; the pure v2 VM runs in the root cgroup and
    uses the default throughout."""
    with open("/proc/self/cgroup") as f:
        paths = [line.split(":", 2) for line in f.read().splitlines()]
    managed = {"", "memory", "pids", "cpu", "cpuacct", "cpuset", "freezer"}
    if all(p.strip() == "/" for _, ctrls, p in paths if managed & set(ctrls.split(","))):
        return None
    mounts = {}  # fstype -> first mount point
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mounts.setdefault(right.split(" ", 1)[0], left.split(" ")[4])
    mount = mounts.get("cgroup2") or mounts.get("cgroup")
    return None if mount is None else mount + "/nsfast"


if "NSFAST_CGROUP_ROOT" not in os.environ and (_root := _mount_relative_cgroup_root()) is not None:
    os.environ["NSFAST_CGROUP_ROOT"] = _root

# For nsfast subprocesses that run as root with an environment of their own: keep the session's
# cgroup root (else they would make cgroups below this process's own, see above).
CGROUP_ENV = {k: os.environ[k] for k in ("NSFAST_CGROUP_ROOT",) if k in os.environ}

# The directory that holds the `nsfast` package (python/ in the source tree); other
# interpreters (the system python of the rootless tests) import nsfast from here.
PYTHON_SRC = str(Path(nsfast.__file__).resolve().parent.parent)

BUSYBOX = shutil.which("busybox") or "/bin/busybox"

# Python inside the sandbox: the host root is visible (read-only), so the system python
# runs there. Snippets print JSON so the tests compare values, not text.
PY_ERRNO = (
    "import errno, json, sys\n"
    "def attempt(f):\n"
    "    try:\n"
    "        f()\n"
    "        return 'ok'\n"
    "    except OSError as e:\n"
    "        return errno.errorcode[e.errno]\n"
)

# These tests are written for the root CI VM (uid=, capabilities= and the other root-only
# paths); rootless behaviour is covered by test_rootless, which drops to nobody itself.
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="runs as root (rootless is covered by test_rootless via setpriv)"
)
# Every module of this suite: root, and no child process (a sandbox or a helper) left behind.
suite = [needs_root, pytest.mark.usefixtures("no_child_left")]


def sh(cmd: str, **kw: Any) -> nsfast.Result:
    """Run `sh -c cmd` in a sandbox; output captured as text unless told otherwise."""
    if not any(k in kw for k in ("stdout", "stderr", "capture_output")):
        kw["capture_output"] = True
    kw.setdefault("text", True)
    kw.setdefault("timeout", 30)
    return nsfast.run(["sh", "-c", cmd], **kw)


def py(code: str, **kw: Any) -> Any:
    """Run python3 `code` in a sandbox (with PY_ERRNO's `attempt` helper available) and
    return the JSON it prints on its last line. Fails the test on a non-zero exit."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 30)
    r = nsfast.run(["python3", "-c", PY_ERRNO + code], **kw)
    assert r.returncode == 0, f"python inside the sandbox failed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll `pred` until it is true or `timeout` s have passed; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def running_with_cmdline(needle: str) -> List[psutil.Process]:
    """Live (non-zombie) host processes whose command line contains `needle`."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"]
        if cmd and needle in " ".join(cmd) and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


#: nsfast's own service threads: each ends once idle (the reaper after 2 s, the spare maker
#: once its last spare expired, the netns pool's when set to 0) and starts on demand, so
#: their number is not a leak count; every other thread is.
SERVICE_THREADS = ("nsfast-reaper", "nsfast-spare", "nsfast-netns")


def thread_names(pid: int | str = "self") -> List[str]:
    """The names (comm) of the OS threads of process `pid` (this one by default)."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            continue  # (just ended)
    return names


def os_threads() -> int:
    """This process's OS threads, nsfast's service threads left out."""
    return sum(name not in SERVICE_THREADS for name in thread_names())


def fd_targets(pid: int | str = "self") -> List[str]:
    """What the open fds of process `pid` (this one by default) are: their /proc fd links."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue  # (closed meanwhile, or the directory's own fd)
    return out


#: Python printing, from inside a sandbox, its network namespace's cookie (SO_NETNS_COOKIE:
#: 64 bits, never reused, unlike an nsfs inode number, which a later namespace may get once
#: one is freed), whether `lo` is up, and the interface names, as JSON.
NETNS_COOKIE_CODE = (
    "import fcntl, json, socket, struct\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "cookie = struct.unpack('Q', s.getsockopt(socket.SOL_SOCKET, 71, 8))[0]\n"
    "flags = struct.unpack('16sH', fcntl.ioctl(s, 0x8913, struct.pack('16sH', b'lo', 0)))[1]\n"
    "print(json.dumps([cookie, bool(flags & 1), [n for _, n in socket.if_nameindex()]]))\n"
)


def netns_cookie() -> int:
    """This process's network namespace's cookie (SO_NETNS_COOKIE)."""
    import socket
    import sys

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), sys.byteorder)


def fd_numbers() -> List[int]:
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def sandbox_cgroups() -> List[str]:
    """The cgroup directories (v1 and v2) of this process's sandboxes that exist right now.
    nsfast names them sb-PID-N; other processes' sandboxes (e.g. a concurrent bench) are not ours."""
    mine = f"sb-{os.getpid()}-*"
    return sorted(glob.glob(f"/sys/fs/cgroup/*/nsfast/{mine}/") + glob.glob(f"/sys/fs/cgroup/nsfast/{mine}/"))


def mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


@pytest.fixture(scope="session")
def init_binary_loaded() -> None:
    """nsfast keeps one sealed memfd of nsfast-init open for the life of the process, made
    on first use of init=True, and (as root) a user namespace per id range that idmaps
    Binds and overlay layers, made on the first in that range: one of each of the process's
    two rotations of SANDBOX_RANGES_PER_PROCESS (64) ranges, which its sandboxes take in
    turn (those with an overlay of nsfast's, the others). Make them up front so fd-count
    checks see a steady state."""
    r = nsfast.run(["true"], init=True, mounts=[nsfast.Bind("/etc", "/mnt")])
    assert r.returncode == 0
    # A writable Bind: whether its file system can be idmapped is probed through the shared
    # range's user namespace.
    with tempfile.TemporaryDirectory() as d:
        assert nsfast.run(["true"], mounts=[nsfast.Bind(d, "/mnt", readonly=False)]).returncode == 0
    for _ in range(64):
        assert nsfast.run(["true"], mounts=[nsfast.Bind("/etc", "/mnt")]).returncode == 0
        try:
            nsfast.run(["true"], mounts=[nsfast.Overlay("/etc", "/mnt")])
        except nsfast.SpawnError:
            pass  # (an overlay of a file system that cannot idmap, the VM's 9p root: made first)


@pytest.fixture
def no_child_left() -> Iterator[None]:
    """After every test: no child process of ours (a sandbox, or a helper) is left."""
    before = {p.pid for p in psutil.Process().children()}
    yield
    left = [p for p in psutil.Process().children() if p.pid not in before]
    for p in left:  # clean up so one failure does not cascade, then fail
        try:
            p.kill()
            os.waitpid(p.pid, 0)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
    assert not left, f"test left child processes behind: {left}"


@pytest.fixture
def nothing_left_behind(init_binary_loaded: None) -> Iterator[None]:
    """The test must leave the parent's fd table and children as it found them."""
    me = psutil.Process()
    nsfast.settle()  # what nsfast keeps for a moment (nsfast.settle's doc) is not the test's
    fds, children, cgroups, mounts = fd_numbers(), {p.pid for p in me.children()}, sandbox_cgroups(), mountinfo()
    yield
    nsfast.settle()
    assert fd_numbers() == fds, "fd table changed"
    assert {p.pid for p in me.children()} == children, "child processes changed"
    assert sandbox_cgroups() == cgroups, "sandbox cgroups left behind"
    assert mountinfo() == mounts, "host mount table changed"


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A host directory with one file, `hello` = "from the host\\n"."""
    d = tmp_path / "shared"
    d.mkdir()
    (d / "hello").write_text("from the host\n")
    return d


_APPLETS = ("sh", "ls", "cat", "echo", "touch", "id", "hostname", "mkdir", "env", "sleep", "pwd", "true")


@pytest.fixture
def busybox_rootfs(tmp_path: Path) -> Path:
    """A tiny root file system: a static busybox plus applet symlinks in /bin, a marker
    file /ROOTFS-MARKER, an /etc/hostname. No /proc, /dev or /tmp: nsfast's overlay provides them."""
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"a static busybox is needed at {BUSYBOX} (Debian: busybox-static)")
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in _APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    (root / "ROOTFS-MARKER").write_text("tiny\n")
    (root / "etc" / "hostname").write_text("rootfs-box\n")
    return root


@pytest.fixture
def py_rootfs(busybox_rootfs: Path) -> Path:
    """The busybox rootfs, made able to run the system python through a Bind of /usr."""
    (busybox_rootfs / "usr").mkdir()
    for name in ("lib", "lib64"):
        os.symlink(f"usr/{name}", busybox_rootfs / name)
    return busybox_rootfs


DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
#: Python (with PY_ERRNO) printing what the sandbox's /dev nodes are: kind and device number
#: of each, and what using them gives (a write to /dev/null vanishes, /dev/full refuses one
#: with ENOSPC, /dev/zero reads zeros).
DEV_PROBE = (
    "import os, stat\n"
    f"nodes = {DEV_NODES!r}\n"
    "out = {n: [stat.S_ISCHR(os.stat('/dev/' + n).st_mode), os.stat('/dev/' + n).st_rdev] for n in nodes}\n"
    "fd = os.open('/dev/null', os.O_WRONLY); os.write(fd, b'x' * 100000); os.close(fd)\n"
    "out['null_size'] = os.stat('/dev/null').st_size\n"
    "out['full_write'] = attempt(lambda: os.write(os.open('/dev/full', os.O_WRONLY), b'x'))\n"
    "out['zero_read'] = open('/dev/zero', 'rb').read(4).hex()\n"
    "print(json.dumps(out))"
)


def check_dev_nodes(res: Dict[str, Any]) -> None:
    """What DEV_PROBE printed: the host's character devices, working as devices."""
    assert {n: res[n] for n in DEV_NODES} == {n: [True, os.stat(f"/dev/{n}").st_rdev] for n in DEV_NODES}
    assert (res["null_size"], res["full_write"], res["zero_read"]) == (0, "ENOSPC", "00000000")


def mount_table(mountinfo: str) -> List[Tuple[str, str, str]]:
    """/proc/PID/mountinfo text as sorted (mount point, ro/rw, file system type) rows."""
    rows = []
    for line in mountinfo.splitlines():
        f = line.split()
        sep = f.index("-")
        rows.append((f[4], f[5].split(",")[0], f[sep + 1]))
    return sorted(rows)


class Subreaper:
    """While active, orphaned descendants are re-parented to this process (not to the host's
    pid 1, which on the CI VM never reaps), so a test can observe how they died."""

    PR_SET_CHILD_SUBREAPER = 36

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _set(self, on: int) -> None:
        if self._libc.prctl(self.PR_SET_CHILD_SUBREAPER, on, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        """The exit code (negative: signal) of orphan `pid` if it ends within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def reap_log_relays(self, timeout: float = 10.0) -> None:
        """Wait for the log relays of detached containers (`nsfast run -d`, adopted here when
        the CLI exited) to end, as each does once its container is gone, and reap them."""
        deadline = time.monotonic() + timeout
        for p in psutil.Process().children():
            try:
                if p.name() != "nsfast-log":
                    continue
            except psutil.NoSuchProcess:
                continue
            while True:
                done, _ = os.waitpid(p.pid, os.WNOHANG)
                if done or time.monotonic() >= deadline:
                    break
                time.sleep(0.005)

    def kill_and_reap(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def subreaper() -> Iterator[Subreaper]:
    r = Subreaper()
    r._set(1)
    try:
        yield r
    finally:
        r._set(0)
        r.reap_log_relays()


@pytest.fixture(scope="module", autouse=True)
def machine_cgroups_untouched() -> Iterator[None]:
    """This machine's own cgroups (process_api and below, in every hierarchy) are not ours:
    no test module may create a cgroup there (see CGROUP_ENV). Checked per module, so the
    failure names the module that did it."""
    pattern = "/sys/fs/cgroup/*/process_api/**/nsfast*"
    before = set(glob.glob(pattern, recursive=True))
    options = cgroup_superblock_options()
    yield
    made = sorted(set(glob.glob(pattern, recursive=True)) - before)
    assert not made, f"the test run created cgroups in the machine's own cgroups: {made}"
    assert cgroup_superblock_options() == options, "a test changed the host's cgroup hierarchies' options"


def cgroup_superblock_options() -> dict[str, str]:
    """Each cgroup file system's superblock options (the last mountinfo field), by mount
    point: a new cgroup2 mount would reset the host hierarchy's (nsdelegate, memory_*)."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if fields and fields[0] in ("cgroup", "cgroup2"):
                out[left.split()[4]] = fields[-1]
    return out
