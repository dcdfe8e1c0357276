"""cgroup v2 on a real pure-v2 kernel: this host is hybrid (v1 controllers), so
tests/vm/run-vm.sh boots a small qemu VM (TCG) whose only cgroup hierarchy is cgroup2
with every controller enabled, and runs tests/test_cgroups.py there against the
installed nsfast. Never skipped where qemu is installed; a VM failure fails the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_VM = os.path.join(REPO, "tests", "vm", "run-vm.sh")


@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86_64 is not installed (.ci/run installs qemu-system-x86)",
)
def test_cgroup_module_passes_on_pure_cgroup_v2():
    env = dict(os.environ, NSFAST_IN_VM="1", NSFAST_EXPECT_CGROUP="2")
    # The cgroup module, zygote tasks' cgroups, plus exec into a container's v2 cgroup (CLONE_INTO_CGROUP under
    # the container's cgroup namespace, which nsdelegate makes strict).
    cmd = [
        RUN_VM,
        "--timeout",
        "1500",
        "--",
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "tests/test_cgroups.py",
        "tests/test_container.py::test_exec_joins_the_container_cgroup",
        "tests/test_container.py::test_exec_joins_every_namespace_of_the_container",
        # Zygote tasks move themselves into their cgroup (v2 cgroup.procs, opened by the
        # caller): limits, usage and cleanup on pure v2.
        "tests/test_zygote.py::TestLimits",
        "tests/test_zygote.py::TestIsolation::test_each_task_has_a_cgroup_of_its_own",
        # Each task's pids cgroup bounds it alone (no RLIMIT_NPROC shared by every task).
        "tests/test_zygote.py::test_a_task_that_holds_every_process_it_may_have_harms_no_other_task",
        # A sandbox's own /sys/fs/cgroup: the cgroup2 itself, rooted at its cgroup.
        "tests/test_sysfs.py",
        "tests/test_rootless.py::test_rootless_sys_is_its_own",
        # Not cgroups: the VM's kernel (Debian's 6.1) stamps inodes coarsely only, where a
        # commit's start is told from the coarse clock's next value (6.13+: the kernel's floor).
        "tests/test_commit.py::test_the_start_of_a_run_tells_changes_before_it_from_changes_after_it",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, out[-6000:]
