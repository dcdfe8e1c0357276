"""`nsfast.configure(netns_pool=N)`: network namespaces made ahead, each used by one sandbox.

What a user checks: a sandbox started from the pool has a network namespace no other
process was ever in (not the host's, not another sandbox's, even one that is still running
and listening), with `lo` up; the caller's threads are back in their own namespace after
every start; a sandbox that keeps capabilities makes its own (and can administer it); the
pool is refused where it cannot work and leaves no fd once set to 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, List

import pytest

import nsfast
from conftest import NETNS_COOKIE_CODE, PYTHON_SRC, fd_targets, netns_cookie, suite, thread_names

pytestmark = [*suite, pytest.mark.usefixtures("warm", "nothing_left_behind")]

PY = "/usr/bin/python3"
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1)


@pytest.fixture(scope="module")
def warm() -> None:
    """What nsfast keeps open for good after a first Container.exec (its helper's seccomp
    program) is opened before the fd checks start."""
    with nsfast.Container() as c:
        assert c.exec(["true"]).returncode == 0


@pytest.fixture
def pool() -> Iterator[None]:
    nsfast.configure(netns_pool=2)
    try:
        yield
    finally:
        nsfast.configure(netns_pool=0)


def _inode(path: str) -> int:
    return os.stat(path).st_ino


def _net_owner(pid: int) -> int:
    """The inode of the user namespace that owns `pid`'s network namespace."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        user = fcntl.ioctl(fd, NS_GET_USERNS)
    finally:
        os.close(fd)
    try:
        return os.fstat(user).st_ino
    finally:
        os.close(user)


def _nsfs_fds() -> List[str]:
    return [t for t in fd_targets() if t.startswith("net:[")]


def test_each_sandbox_gets_a_fresh_namespace_with_lo_up(pool: None) -> None:
    cookies = []
    for _ in range(12):
        r = nsfast.run([PY, "-c", NETNS_COOKIE_CODE], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        cookie, lo_up, names = json.loads(r.stdout)
        assert lo_up and names == ["lo"], r.stdout
        cookies.append(cookie)
    assert len(set(cookies)) == 12, "a network namespace was used twice"
    assert netns_cookie() not in cookies


def test_started_from_the_pool_the_namespace_is_owned_by_the_callers_user_namespace(pool: None) -> None:
    """How a user tells a pooled namespace from one made at clone (and that the pool is used)."""
    with nsfast.spawn(["sleep", "10"]) as p:
        try:
            assert _net_owner(p.pid) == _inode("/proc/self/ns/user")
            assert _inode(f"/proc/{p.pid}/ns/net") != _inode("/proc/self/ns/net")
        finally:
            p.kill()
            p.wait()
    nsfast.configure(netns_pool=0)
    with nsfast.spawn(["sleep", "10"]) as p:
        try:
            assert _net_owner(p.pid) == _inode(f"/proc/{p.pid}/ns/user")
        finally:
            p.kill()
            p.wait()


def test_a_sandbox_that_keeps_capabilities_makes_its_own_and_can_administer_it(pool: None) -> None:
    with nsfast.spawn(["sleep", "10"], capabilities=["CAP_NET_ADMIN"]) as p:
        try:
            assert _net_owner(p.pid) == _inode(f"/proc/{p.pid}/ns/user")
        finally:
            p.kill()
            p.wait()
    r = nsfast.run(
        ["sh", "-c", "ip link set lo down && ip -o link show lo"],
        capabilities=["CAP_NET_ADMIN"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "state DOWN" in r.stdout
    # Without capabilities (from the pool) nothing can be administered, as without a pool.
    r = nsfast.run(["ip", "link", "set", "lo", "down"], capture_output=True, text=True)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr


def test_a_sandbox_cannot_reach_one_still_running_nor_the_host(pool: None, tmp_path) -> None:
    """Loopback TCP and abstract unix sockets are per network namespace: a listener in one
    sandbox (or on the host) is unreachable from the next one started from the pool."""
    host = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    host.bind(("127.0.0.1", 0))
    host.listen()
    host_port = host.getsockname()[1]
    listener = (
        "import socket, sys\n"
        "t = socket.socket(); t.bind(('127.0.0.1', 0)); t.listen()\n"
        "u = socket.socket(socket.AF_UNIX); u.bind('\\0nsfast-netpool-test'); u.listen()\n"
        "print(t.getsockname()[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    with nsfast.spawn([PY, "-c", listener], stdin=nsfast.PIPE, stdout=nsfast.PIPE) as a:
        try:
            assert a.stdout is not None and a.stdin is not None
            port = int(a.stdout.readline())
            probe = (
                "import errno, json, socket\n"
                "def tcp(port):\n"
                "    s = socket.socket()\n"
                "    try:\n"
                "        s.connect(('127.0.0.1', port)); return 'connected'\n"
                "    except OSError as e:\n"
                "        return errno.errorcode[e.errno]\n"
                "def unix():\n"
                "    s = socket.socket(socket.AF_UNIX)\n"
                "    try:\n"
                "        s.connect('\\0nsfast-netpool-test'); return 'connected'\n"
                "    except OSError as e:\n"
                "        return errno.errorcode[e.errno]\n"
                f"print(json.dumps([tcp({port}), tcp({host_port}), unix()]))\n"
            )
            r = nsfast.run([PY, "-c", probe], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout) == ["ECONNREFUSED", "ECONNREFUSED", "ECONNREFUSED"]
        finally:
            a.stdin.close()
            a.wait()
    host.close()


def test_the_callers_threads_stay_in_their_own_namespace(pool: None) -> None:
    """The spawning thread enters a pooled namespace for the clone only: after starts from
    several threads at once, every thread's sockets are the host's again (a server the test
    started on the host's loopback is reachable from each)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    host = _inode("/proc/self/ns/net")
    errors: List[str] = []

    def work() -> None:
        try:
            for _ in range(15):
                assert nsfast.run(["true"]).returncode == 0
                assert _inode("/proc/thread-self/ns/net") == host
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    pass
        except BaseException as e:  # reported below, in the test's thread
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.close()
    assert errors == []


def test_container_exec_joins_a_pooled_namespace(pool: None) -> None:
    with nsfast.Container() as c:
        assert c.pid is not None
        assert _net_owner(c.pid) == _inode("/proc/self/ns/user")  # from the pool
        r = c.exec(["readlink", "/proc/self/ns/net"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"net:[{c.namespaces()['net']}]" == os.readlink(f"/proc/{c.pid}/ns/net")


def test_setting_zero_closes_them_and_many_starts_leave_nothing() -> None:
    before = _nsfs_fds()
    nsfast.configure(netns_pool=3)
    try:
        assert nsfast._core.netns_pool() == 3
        deadline = time.monotonic() + 10
        while len(_nsfs_fds()) < len(before) + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(_nsfs_fds()) == len(before) + 3
        for _ in range(100):
            nsfast.run(["true"])
    finally:
        nsfast.configure(netns_pool=0)
    assert nsfast._core.netns_pool() == 0
    assert _nsfs_fds() == before
    # ... and its thread ended: a process that turned its pool off has no thread of it.
    assert not _has_pool_thread(False)
    nsfast.configure(netns_pool=1)  # and it starts again
    try:
        assert _has_pool_thread(True)
        assert nsfast.run(["true"]).returncode == 0
    finally:
        nsfast.configure(netns_pool=0)
    assert not _has_pool_thread(False)


def _has_pool_thread(expect: bool) -> bool:
    """Whether this process has nsfast's pool thread, once it is as `expect`ed or after 1 s
    (a thread takes a moment to get its name, and to be gone once it ended)."""
    for _ in range(100):
        if ("nsfast-netns" in thread_names()) == expect:
            return expect
        time.sleep(0.01)
    return not expect


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, nsfast.SpecError), (65, nsfast.SpecError), (True, TypeError), ("2", TypeError), (1.5, TypeError)],
)
def test_bad_sizes_are_refused(value: object, error: type) -> None:
    with pytest.raises(error, match="netns_pool"):
        nsfast.configure(netns_pool=value)  # type: ignore[arg-type]
    assert nsfast._core.netns_pool() == 0


def test_a_rootless_caller_is_refused_with_the_reason() -> None:
    script = (
        f"import sys; sys.path.insert(0, {PYTHON_SRC!r})\n"
        "import nsfast\n"
        "try:\n"
        "    nsfast.configure(netns_pool=2)\n"
        "except nsfast.SpecError as e:\n"
        "    print(e.field, str(e))\n"
        "print(nsfast.run(['true']).returncode)\n"
    )
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
    r = subprocess.run([*setpriv, PY, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    if "user namespaces are disabled" in r.stderr:
        pytest.skip("unprivileged user namespaces are disabled here")
    assert r.returncode == 0, r.stderr
    field, *rest = r.stdout.splitlines()[0].split(" ", 1)
    assert field == "netns_pool" and "CAP_SYS_ADMIN" in rest[0], r.stdout
    assert r.stdout.splitlines()[1] == "0"


def test_in_a_forked_child_starts_make_their_own(pool: None) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pool thread was copied
        os.close(r)
        try:
            out = [nsfast.run(["true"]).returncode]
            try:
                nsfast.configure(netns_pool=1)
                out.append("accepted")
            except nsfast.SpecError as e:
                out.append(e.field)
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = json.loads(f.read())
    os.waitpid(pid, 0)
    assert got == [0, "netns_pool"]
    assert sys.modules["nsfast"]._core.netns_pool() == 2
