"""A BenchExec `RunExecutor` look-alike on top of nsfast, so that BenchExec's own
`benchexec.test_runexecutor` tests can run against nsfast (see tests/test_benchexec.py).

`NsfastRunExecutor.execute_run` has RunExecutor's signature (benchexec 3.35) and returns its
result dict (`walltime`, `cputime`, `memory`, `exitcode` as a `util.ProcessExitCode`,
`starttime`, `terminationreason` only when a limit or `stop()` ended the run, `"failed"` when
the command could not be started). The output file gets BenchExec's header. The mapping:

    hardtimelimit -> Limits(cpu_time=)          softtimelimit -> Limits(cpu_time_soft=)
    walltimelimit -> wait(timeout) + kill()      memlimit -> Limits(memory=, memory_swap=)
    cores -> Limits(cpuset=)                     files_size_limit -> rlimits={"fsize": ...}
    environments -> env (BenchExec's rules)      workingDir -> cwd

Like BenchExec, the tool is never pid 1 (`init=True`: nsfast's init is, as BenchExec's own init
is in its container), and every run gets a fresh `BenchExec_run_*` directory with `home/` and
`tmp/`: HOME/TMPDIR point there (no-container flavour), or it is the sandbox's `/tmp`, from which
result files are retrieved (container flavour). Nothing here changes the host outside that
directory; nsfast's cgroups are its own.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence

from benchexec import containerexecutor, runexecutor, util

import nsfast

#: RunExecutor's default wall-time limit: the CPU-time limit plus this (runexecutor.py).
WALLTIME_OVERHEAD = runexecutor._WALLTIME_LIMIT_DEFAULT_OVERHEAD

#: Where BenchExec's container puts HOME (container.CONTAINER_HOME).
CONTAINER_HOME = "/home/benchexec"


def _raw_status(returncode: int) -> int:
    """nsfast's returncode (negative = signal) as the raw wait status BenchExec keeps."""
    return -returncode if returncode < 0 else returncode << 8


class NsfastRunExecutor:
    """RunExecutor's `execute_run`/`stop` with nsfast. `container=False` mimics BenchExec's
    `use_namespaces=False` (host paths, HOME/TMPDIR below the run's temp dir), `container=True`
    its container (`/tmp` writable and private, `/home` hidden, result files). `dir_modes`:
    BenchExec's four (read-only, hidden, full access, overlay: `Spec(overlay=True)` for `/`,
    `nsfast.Overlay` below it). `init=False`:
    the tool is the sandbox's pid 1 (nsfast's default) instead of nsfast's init's child."""

    def __init__(
        self,
        *,
        container: bool,
        dir_modes: Optional[Mapping[str, Any]] = None,
        cleanup_temp_dir: bool = True,
        container_tmpfs: bool = True,
        init: bool = True,
        **unsupported: Any,
    ) -> None:
        if unsupported:
            # e.g. additional_cgroup_subsystems, container_tmpfs, container_system_config
            raise NotImplementedError(f"NsfastRunExecutor has no equivalent of {sorted(unsupported)}")
        self.container = container
        self.dir_modes = dict(dir_modes or {})
        self.cleanup_temp_dir = cleanup_temp_dir
        self.init = init
        del container_tmpfs  # where BenchExec's container keeps written files; here: the run's dir
        self._lock = threading.Lock()
        self._proc: Optional[nsfast.Process] = None
        self._termination_reason: Optional[str] = None

    # --- RunExecutor's interface ---

    def execute_run(
        self,
        args: Sequence[str],
        output_filename: str,
        stdin: Any = None,
        hardtimelimit: Optional[float] = None,
        softtimelimit: Optional[float] = None,
        walltimelimit: Optional[float] = None,
        cores: Optional[List[int]] = None,
        memlimit: Optional[int] = None,
        memory_nodes: Optional[List[int]] = None,
        environments: Mapping[str, Mapping[str, str]] = {},  # noqa: B006 (RunExecutor's signature)
        workingDir: Optional[str] = None,  # noqa: N803
        maxLogfileSize: Optional[int] = None,  # noqa: N803
        cgroupValues: Mapping[Any, Any] = {},  # noqa: B006, N803
        files_count_limit: Optional[int] = None,
        files_size_limit: Optional[int] = None,
        error_filename: Optional[str] = None,
        write_header: bool = True,
        output_dir: Optional[str] = None,
        result_files_patterns: Optional[Sequence[str]] = (),
        **kwargs: Any,
    ) -> Dict[str, Any]:
        # RunExecutor.execute_run's argument checks (it sys.exit()s too).
        if kwargs:
            raise NotImplementedError(f"NsfastRunExecutor.execute_run has no {sorted(kwargs)}")
        if stdin == subprocess.PIPE:
            sys.exit("Illegal value subprocess.PIPE for stdin")
        for name, v in (("time", hardtimelimit), ("soft time", softtimelimit), ("wall time", walltimelimit)):
            if v is not None and v <= 0:
                sys.exit(f"Invalid {name} limit {v}.")
        if hardtimelimit and softtimelimit and softtimelimit > hardtimelimit:
            sys.exit("Soft time limit cannot be larger than the hard time limit.")
        if walltimelimit is None and (hardtimelimit or softtimelimit):
            walltimelimit = (hardtimelimit or softtimelimit) + WALLTIME_OVERHEAD  # type: ignore[operator]
        if cores is not None and not cores:
            sys.exit("Cannot execute run without any CPU core.")
        if memlimit is not None and memlimit <= 0:
            sys.exit(f"Invalid memory limit {memlimit}.")
        if memory_nodes is not None:
            raise NotImplementedError("nsfast.Limits has no memory nodes (cpuset.mems)")
        if cgroupValues:
            raise NotImplementedError("nsfast sets no arbitrary cgroup values")
        if files_count_limit is not None:
            raise NotImplementedError("nsfast has no limit on the number of files written")
        if result_files_patterns:
            if not output_dir:
                raise ValueError("Output directory needed for retaining result files.")
            for pattern in result_files_patterns:
                if not pattern:
                    raise ValueError(f"Invalid empty result-files pattern in {result_files_patterns}")
                if os.path.normpath(pattern).startswith(".."):
                    raise ValueError(f"Invalid relative result-files pattern '{pattern}'.")

        temp_dir = tempfile.mkdtemp(prefix="BenchExec_run_")
        os.mkdir(os.path.join(temp_dir, "home"))
        os.mkdir(os.path.join(temp_dir, "tmp"))
        try:
            return self._execute(
                list(args),
                output_filename,
                error_filename,
                subprocess.DEVNULL if stdin is None else stdin,
                write_header,
                temp_dir,
                nsfast.Limits(
                    memory=memlimit,
                    memory_swap=memlimit,
                    cpuset=None if cores is None else ",".join(map(str, cores)),
                    cpu_time=hardtimelimit,
                    cpu_time_soft=softtimelimit,
                ),
                walltimelimit,
                softtimelimit,
                files_size_limit,
                environments,
                workingDir,
                maxLogfileSize,
                output_dir,
                result_files_patterns or (),
            )
        finally:
            if self.cleanup_temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)

    def stop(self) -> None:
        """Kill the current run (terminationreason "killed"), as RunExecutor.stop."""
        with self._lock:
            self._termination_reason = self._termination_reason or "killed"
            if self._proc is not None:
                self._proc.kill()

    # --- the run ---

    def _spec_fields(self, temp_dir: str, environments: Mapping[str, Mapping[str, str]], cwd: Optional[str]) -> Any:
        env = {} if environments.get("keepEnv") is not None else dict(os.environ)
        env.update({k: os.environ[k] for k in environments.get("keepEnv", {}) if k in os.environ})
        env.update(environments.get("newEnv", {}))
        env.update({k: os.environ.get(k, "") + v for k, v in environments.get("additionalEnv", {}).items()})
        modes = self.dir_modes
        dx = containerexecutor
        hidden = [d for d, m in modes.items() if m == dx.DIR_HIDDEN]
        known = (dx.DIR_HIDDEN, dx.DIR_FULL_ACCESS, dx.DIR_READ_ONLY, dx.DIR_OVERLAY)
        if any(m not in known for m in modes.values()):
            raise NotImplementedError(f"nsfast has no equivalent of these dir_modes: {modes}")
        # Below "/", parents first (as BenchExec mounts them): full access a writable Bind,
        # read-only a read-only one, overlay an nsfast.Overlay (the kernel's overlayfs; BenchExec
        # falls back to fuse-overlayfs where it cannot have one), hidden a tmpfs.
        mounts: List[Any] = []
        for d, m in sorted(modes.items()):
            if d == "/" or m == dx.DIR_HIDDEN:
                continue
            if m == dx.DIR_OVERLAY:
                mounts.append(nsfast.Overlay(d, d))
            else:
                mounts.append(nsfast.Bind(d, d, readonly=m == dx.DIR_READ_ONLY))
        if self.container:
            # The sandbox's /tmp is the run's tmp/ (so that result files can be retrieved), and
            # HOME an empty directory in the hidden /home, as BenchExec's container.
            mounts.insert(0, nsfast.Bind(os.path.join(temp_dir, "tmp"), "/tmp", readonly=False))
            mounts.append(nsfast.Tmpfs(CONTAINER_HOME))
            env["HOME"] = CONTAINER_HOME
            hidden = [d for d in hidden if d != "/tmp"] + ([] if "/home" in hidden else ["/home"])
            cwd = cwd or "/"
        else:
            mounts.insert(0, nsfast.Bind(temp_dir, temp_dir, readonly=False))
            for k in ("TMPDIR", "TMP", "TEMPDIR", "TEMP"):
                env[k] = os.path.join(temp_dir, "tmp")
            env["HOME"] = os.path.join(temp_dir, "home")
            hidden = [] if not modes else hidden
            cwd = cwd or os.getcwd()
            # BenchExec without namespaces runs the tool in the caller's cwd with full access;
            # nsfast's /tmp is always a fresh tmpfs (a checkout under /tmp would be missing).
            if cwd != "/" and not any(cwd == d or cwd.startswith(d + "/") for d in hidden):
                mounts.append(nsfast.Bind(cwd, cwd, readonly=False))
        return {
            "env": env,
            "cwd": cwd,
            "mounts": tuple(mounts),
            "hidden": tuple(hidden),
            # "/" overlay (BenchExec's default) is a copy-on-write root; full access the host's.
            "readonly_root": modes.get("/", dx.DIR_READ_ONLY) == dx.DIR_READ_ONLY,
            "overlay": modes.get("/") == dx.DIR_OVERLAY,
            "init": self.init,  # True: the tool is not pid 1, as under BenchExec
        }

    def _execute(
        self,
        args: List[str],
        output_filename: str,
        error_filename: Optional[str],
        stdin: Any,
        write_header: bool,
        temp_dir: str,
        limits: nsfast.Limits,
        walltimelimit: Optional[float],
        softtimelimit: Optional[float],
        files_size_limit: Optional[int],
        environments: Mapping[str, Mapping[str, str]],
        cwd: Optional[str],
        max_output_size: Optional[int],
        output_dir: Optional[str],
        result_files_patterns: Sequence[str],
    ) -> Dict[str, Any]:
        header = shlex.join(args) + "\n\n\n" + "-" * 80 + "\n\n\n" if write_header else ""
        fields = self._spec_fields(temp_dir, environments, cwd)
        rlimits = {} if files_size_limit is None else {"fsize": files_size_limit}
        self._termination_reason = None
        result: Dict[str, Any] = {}
        with open(output_filename, "w") as out:
            out.write(header)
            out.flush()
            err = out if error_filename is None else open(error_filename, "w")
            try:
                if err is not out:
                    err.write(header)
                    err.flush()
                result["starttime"] = util.read_local_time()
                try:
                    proc = nsfast.spawn(
                        args, stdin=stdin, stdout=out, stderr=err, limits=limits, rlimits=rlimits, **fields
                    )
                except (nsfast.SpawnError, FileNotFoundError, PermissionError):
                    return {"terminationreason": "failed"}
                with proc:
                    with self._lock:
                        self._proc = proc
                        stopped = self._termination_reason is not None
                    if stopped:
                        proc.kill()
                    try:
                        proc.wait(walltimelimit)
                    except nsfast.TimeoutExpired:
                        with self._lock:
                            self._termination_reason = self._termination_reason or "walltime"
                        proc.kill()
                        proc.wait()
                    finally:
                        with self._lock:
                            self._proc = None
            finally:
                if err is not out:
                    err.close()

        usage = proc.usage
        assert usage is not None and proc.returncode is not None
        result["walltime"] = usage.wall_s
        if usage.cpu_user_s is not None or usage.cpu_system_s is not None:
            result["cputime"] = (usage.cpu_user_s or 0.0) + (usage.cpu_system_s or 0.0)
        if usage.memory_peak_bytes is not None:
            result["memory"] = usage.memory_peak_bytes
        exitcode = util.ProcessExitCode.from_raw(_raw_status(proc.returncode))
        result["exitcode"] = exitcode

        reason = self._termination_reason
        if reason is None:
            if usage.termination == "cpu_time":
                # Soft <= hard and BenchExec keeps the first reason: past the soft limit, "cputime-soft".
                soft = softtimelimit is not None and result.get("cputime", 0.0) >= softtimelimit
                reason = "cputime-soft" if soft else "cputime"
            elif usage.termination == "memory":
                reason = "memory"
            elif usage.termination == "timeout":
                reason = "walltime"
            elif files_size_limit is not None and exitcode.signal == 25:  # SIGXFSZ
                reason = "files-size"
        if reason is not None:
            result["terminationreason"] = reason

        if exitcode.value not in (0, 1):
            # BenchExec appends a JVM crash report named in the output; temp_dir + "/tmp/x" is
            # the host path of the container's /tmp/x, and host paths are the tool's otherwise.
            runexecutor._get_debug_output_after_crash(output_filename, temp_dir if self.container else "")
        if error_filename is not None:
            runexecutor._reduce_file_size_if_necessary(error_filename, max_output_size)
        runexecutor._reduce_file_size_if_necessary(output_filename, max_output_size)
        if result_files_patterns:
            assert output_dir is not None and self.container
            # BenchExec's own transfer (it uses no state of its ContainerExecutor): the host path
            # of the tool's cwd is temp_dir + cwd for a cwd below /tmp.
            containerexecutor.ContainerExecutor._transfer_output_files(
                None,  # type: ignore[arg-type]
                temp_dir,
                fields["cwd"],
                output_dir,
                result_files_patterns,
            )
        return result
