"""Files back out of a sandbox: `run(outputs=...)`, `Container.read_file`/`write_file`.

The child hands the parent an O_PATH fd of the root of each of its writable trees (its
`/tmp`, `/dev/shm`, the hidden directories' tmpfs, the user's `Tmpfs` and writable `Bind`s,
an overlay root's upper layer) before it execs anything. Through those fds the parent reads
what the sandbox wrote, after it ended (the trees live as long as the fds) or while it runs.
Every path is resolved by the kernel inside its tree (`openat2` with `RESOLVE_IN_ROOT`,
`RESOLVE_NO_MAGICLINKS`, `RESOLVE_NO_XDEV`): a symlink, `..` or magic link a hostile program
planted, or swaps in while nsfast reads, cannot lead the read (or write) to any other file
of the host. Only regular files are read; files the sandbox did not write (the host root
or a rootfs below an overlay) are not its outputs and are not read."""

from __future__ import annotations

import errno
import fnmatch
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from . import _core
from ._errors import OutputError, OverlayError, SpecError
from ._spec import Bind, Overlay, Spec, Tmpfs

#: Default cap on the bytes `run(outputs=...)` reads back, all files together.
DEFAULT_OUTPUTS_MAX_BYTES = 64 << 20


def _norm(field: str, path: str) -> str:
    if not isinstance(path, str):
        raise TypeError(f"{field} must hold str paths, not {type(path).__name__}")
    if not path.startswith("/") or "\0" in path:
        raise SpecError(field, f"must be absolute paths inside the sandbox: {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SpecError(field, f"must not contain '..': {path!r}")
    return "/" + "/".join(parts)


def writable_trees(spec: Spec) -> List[str]:
    """The sandbox paths of `spec`'s writable trees, as the child opens them."""
    if "mnt" not in spec.namespaces:
        return []
    trees = ["/tmp", "/dev/shm"]
    if spec.rootfs is None:
        trees += [h for h in spec.hidden if os.path.isdir(h)]
    for m in spec.mounts:
        if isinstance(m, (Tmpfs, Overlay)) or (isinstance(m, Bind) and not m.readonly):
            trees.append(_norm("mounts", m.dst))
    # A rootless caller's overlay of the host root is one overlay per directory (mount.rs
    # split_steps): no one tree holds its changes.
    split = spec.overlay and spec.rootfs is None and not (os.geteuid() == 0 and _core.sandbox_id_range())
    if (spec.overlay and not split) or (not spec.overlay and not spec.readonly_root):
        trees.append("/")
    return list(dict.fromkeys(trees))


def core_paths(spec: Spec, trees: Sequence[str]) -> List[bytes]:
    """What the child opens for each tree: its path in the new root; for an overlay (the
    root's, or an Overlay mount's), its upper directory: b"//" + its mount point."""
    cow = {m.dst for m in spec.mounts if isinstance(m, Overlay)}
    if spec.overlay:
        cow.add("/")
    out = []
    for t in trees:
        if t in cow:
            out.append(b"/" + os.fsencode(t) if t != "/" else b"//")
        else:
            out.append(b"." if t == "/" else os.fsencode(t[1:]))
    return out


#: What each file read back by `outputs=` counts against `outputs_max_bytes` besides its
#: size and its path, and each entry of `Result.changes` against `changes_max_bytes`
#: besides its path: about what the caller's dict entry for it costs.
ENTRY_COST: int = _core.ENTRY_COST
#: The most `Result.changes` may take (`run(changes_max_bytes=)`).
DEFAULT_CHANGES_MAX_BYTES = 64 << 20


def _locate(trees: Sequence[str], path: str) -> Optional[Tuple[int, str]]:
    """(index of the tree holding `path`, the path inside it): the deepest tree wins, as
    the deepest mount does."""
    best: Optional[Tuple[int, str]] = None
    for i, t in enumerate(trees):
        base = t.rstrip("/")
        if path == t or path.startswith(base + "/"):
            rel = path[len(base) :].lstrip("/")
            if best is None or len(t) > len(trees[best[0]]):
                best = (i, rel)
    return best


def check_outputs(spec: Spec, outputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the normalised patterns, the trees they need), or a SpecError naming a pattern that
    is in no writable tree."""
    if isinstance(outputs, str):
        outputs = (outputs,)
    trees = writable_trees(spec)
    pats = []
    for p in outputs:
        n = _norm("outputs", p)
        if _locate(trees, n) is None:
            where = ", ".join(trees) if trees else "none: the sandbox has no mount namespace"
            raise SpecError(
                "outputs",
                f"{p!r} is not in a writable tree of the sandbox (those: {where}); elsewhere the files are the "
                "host's or read-only, not what the run wrote",
            )
        pats.append(n)
    return pats, trees


class Trees:
    """The open roots of a sandbox's writable trees (fds owned here, closed by close())."""

    def __init__(self, paths: Sequence[str], fds: Sequence[int], owner: Optional[Tuple[int, int]] = None) -> None:
        self.paths = list(paths)
        self.fds: List[int] = list(fds)
        self.owner = owner  # host ids files written here get (the sandbox's root)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def _at(self, field: str, path: str) -> Tuple[int, str]:
        if not self.fds:
            raise ValueError("the sandbox's writable trees are closed")
        n = _norm(field, path)
        hit = _locate(self.paths, n)
        if hit is None:
            raise SpecError(
                field, f"{path!r} is not in a writable tree of the sandbox (those: {', '.join(self.paths)})"
            )
        return self.fds[hit[0]], hit[1]

    def read(self, path: str, max_bytes: int) -> Optional[bytes]:
        fd, rel = self._at("path", path)
        return _core.tree_read(fd, os.fsencode(rel or "."), max_bytes)

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        fd, rel = self._at("path", path)
        _core.tree_write(fd, os.fsencode(rel or "."), bytes(data), mode, self.owner)

    def collect(self, patterns: Sequence[str], max_bytes: int, result: object) -> Dict[str, bytes]:
        """Every regular file matching `patterns` (glob per path component, as glob.glob:
        `*`, `?`, `[...]`; names starting with "." only for patterns that do; a wildcard
        does not descend through a symlink), and every regular file below a directory that
        matches (as BenchExec's result files: "/tmp/out" or "/tmp/*" take their trees; real
        directories only, a symlink only if named), by sandbox path; more than `max_bytes`
        in all is an OutputError naming the file. Each file counts its size plus its path's
        length plus ENTRY_COST: what the caller holds for it (a million empty files is not
        free); each other entry of a directory taken whole, its name and ENTRY_COST."""
        files: Dict[str, bytes] = {}
        left = [max_bytes]  # (shared with _match, which lists within what is left)
        for pat in patterns:
            fd, rel = self._at("outputs", pat)
            base = (pat[: len(pat) - len(rel)] if rel else pat).rstrip("/")
            for name, kind in self._match(fd, [c for c in rel.split("/") if c], left, base, max_bytes, result):
                todo = [(name, kind)]
                while todo:  # a matched directory: its tree, depth first, in order
                    name, kind = todo.pop()
                    path = base + "/" + name if name else base
                    if kind in ("d", "D") or (
                        kind is None and self._read(fd, name, path, files, left, max_bytes, result)
                    ):
                        below = self._list(fd, name, left, base, max_bytes, result)
                        for raw, k, _mode in sorted(below, reverse=True):
                            sub = f"{name}/{os.fsdecode(raw)}" if name else os.fsdecode(raw)
                            if k == "f":
                                todo.append((sub, None))
                            elif k in ("d", "D"):
                                _charge(left, sub, base, max_bytes, result)
                                todo.append((sub, k))
                            else:
                                _charge(left, sub, base, max_bytes, result)  # (no file: not read)
                    elif kind is not None:
                        self._read(fd, name, path, files, left, max_bytes, result)
        return files

    def _read(
        self, fd: int, name: str, path: str, files: Dict[str, bytes], left: List[int], max_bytes: int, result: object
    ) -> bool:
        """Read regular file `name` into `files` (charged); True if it is none (missing, or
        perhaps a directory: what the caller lists)."""
        if path in files:
            return False
        entry = ENTRY_COST + len(path.encode("utf-8", "surrogateescape"))
        try:
            data = _core.tree_read(fd, os.fsencode(name or "."), max(left[0] - entry, 0))
        except OSError as e:
            if e.errno == errno.EFBIG:
                raise OutputError(path, max_bytes, result) from None
            raise OutputError(path, max_bytes, result, f"cannot be read: {e.strerror or e}") from None
        if data is None:
            return True
        if entry > left[0]:
            raise OutputError(path, max_bytes, result)
        files[path] = data
        left[0] -= len(data) + entry
        return False

    def _list(
        self, fd: int, prefix: str, left: List[int], base: str, max_bytes: int, result: object
    ) -> List[Tuple[bytes, str, int]]:
        """Directory `prefix`'s entries, within what is `left` (each its name and ENTRY_COST),
        else the OutputError names it."""
        try:
            return _core.tree_list(fd, os.fsencode(prefix or "."), max_bytes=max(left[0], 0))
        except OSError as e:
            if e.errno != errno.EFBIG:
                raise
            where = base + "/" + prefix if prefix else base
            raise OutputError(
                where, max_bytes, result, f"listing it takes over outputs_max_bytes={max_bytes}"
            ) from None

    def _match(
        self,
        fd: int,
        comps: List[str],
        left: List[int],
        base: str,
        max_bytes: int,
        result: object,
        prefix: str = "",
    ) -> Iterator[Tuple[str, Optional[str]]]:
        """(name, kind) of each entry below `prefix` matching `comps`, in order, as they are
        read (so that the budget applies as soon as it is spent); kind None for one named
        without a wildcard (not listed: what it is shows when it is read). A directory a
        wildcard lists may cost at most what is `left` of it (see _list)."""
        if not comps:
            yield prefix, None
            return
        first, rest = comps[0], comps[1:]
        if not any(ch in first for ch in "*?["):
            yield from self._match(fd, rest, left, base, max_bytes, result, f"{prefix}/{first}" if prefix else first)
            return
        entries = self._list(fd, prefix, left, base, max_bytes, result)
        for raw, kind, _mode in sorted(entries):
            name = os.fsdecode(raw)
            if name.startswith(".") and not first.startswith("."):
                continue
            if not fnmatch.fnmatchcase(name, first):
                continue
            # Below a wildcard, real directories only: through symlinks, a few thousand
            # links to one directory made /tmp/*/* millions of paths of the same files.
            if kind not in ("d", "D", "f", "l") or (rest and kind not in ("d", "D")):
                continue
            sub = f"{prefix}/{name}" if prefix else name
            if rest:
                yield from self._match(fd, rest, left, base, max_bytes, result, sub)
            else:
                yield sub, kind


def _charge(left: List[int], name: str, base: str, max_bytes: int, result: object) -> None:
    """An entry of a directory `collect` takes whole that is no file it reads: its name and
    ENTRY_COST of what is left, else an OutputError naming it."""
    left[0] -= ENTRY_COST + len(name.encode("utf-8", "surrogateescape"))
    if left[0] < 0:
        raise OutputError(base + "/" + name if name else base, max_bytes, result)


def userxattr(spec: Spec) -> bool:
    """Whether `spec`'s Overlay mounts keep their marks in user.overlay.* (made by the child
    in its user namespace) rather than trusted.* (a root caller's, made by nsfast itself)."""
    return "user" in spec.namespaces and not (os.geteuid() == 0 and _core.sandbox_id_range())


def open_sources(overlays: Sequence[Overlay]) -> Dict[str, int]:
    """An fd of each Overlay's `src`, by its `dst`, opened before the sandbox starts (the
    path as the caller gave it: its symlinks are the caller's). changes() and commit() work
    below these fds only: by the time the run ended the sandbox may have replaced `src`
    itself (through a writable Bind of its parent, or a commit applied before), and what
    it planted there is never reached."""
    fds: Dict[str, int] = {}
    try:
        for ov in overlays:
            fds[ov.dst] = os.open(ov.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _beneath(base: int, rel: str) -> int:
    """Directory `rel` below `base` (an fd of `src`): no symlink followed, no mount
    crossed (ELOOP, EXDEV), never outside `base`."""
    return _core.dir_beneath(base, os.fsencode(rel or "."))


#: What `_lower` says of a directory that is a mount point in `src`: the sandbox saw the
#: directory below it (an overlay does not show its lower's submounts), not what is mounted.
MOUNT = "m"


def _lower(base: int, rel: str) -> Optional[Tuple[str, int]]:
    """(kind, permission bits) of `rel` in `src` (`base`): "d", "f", "l", "o", or MOUNT
    for a mount point (or an entry below one); None if missing."""
    parent, _, name = rel.rpartition("/")
    try:
        d = _beneath(base, parent)
    except OSError as e:
        return (MOUNT, 0) if e.errno == errno.EXDEV else None
    try:
        return _entry(d, name)
    finally:
        os.close(d)


def _entry(d: int, name: str) -> Optional[Tuple[str, int]]:
    """`_lower` of entry `name` of directory `d` (an fd below `src`)."""
    import stat

    try:
        m = os.lstat(name, dir_fd=d).st_mode
        if stat.S_ISDIR(m):
            try:
                os.close(_core.dir_beneath(d, os.fsencode(name)))
            except OSError as e:
                if e.errno == errno.EXDEV:
                    return MOUNT, stat.S_IMODE(m)
        kind = "d" if stat.S_ISDIR(m) else "f" if stat.S_ISREG(m) else "l" if stat.S_ISLNK(m) else "o"
        return kind, stat.S_IMODE(m)
    except OSError:
        return None


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


class ChangesTooLarge(Exception):
    """A Budget was spent at sandbox path `.path`."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class Budget:
    """What is `left` of the bytes changes() may hold (`run(changes_max_bytes=)`), shared
    by a run's Overlays."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def charge(self, path: str) -> None:
        """One entry at sandbox path `path`: its path and ENTRY_COST; ChangesTooLarge once spent."""
        self.left -= ENTRY_COST + len(path.encode("utf-8", "surrogateescape"))
        if self.left < 0:
            raise ChangesTooLarge(path)


def changes(
    trees: Trees,
    ov: Overlay,
    base: int,
    *,
    userxattr: bool = False,
    mount_points: Sequence[str] = (),
    budget: Optional[Budget] = None,
) -> Dict[str, Tuple[str, str, int]]:
    """What the sandbox changed below the Overlay `ov` (`base`: the fd of its `src` from
    open_sources): sandbox path -> (change, kind in the upper layer, mode); change is
    "added", "modified" or "deleted". `mount_points`: the sandbox paths of the spec's
    other mounts: nsfast made those directories in the overlay to mount on, the sandbox
    did not. An OSError (a path too long to resolve) is the caller's to report.

    `budget`: what the walk may hold, charged for every entry of the upper layer (and every
    deletion an opaque directory implies) as it is listed: a sandbox can leave a million
    files there, or paths of 4 KiB each, which would be the caller's memory and time.
    Spent: ChangesTooLarge, naming the path."""
    fd = trees.fds[trees.paths.index(ov.dst)]
    top = ov.dst.rstrip("/")
    out: Dict[str, Tuple[str, str, int]] = {}
    ours = [m for m in mount_points if _under(m, top) and m != ov.dst]
    made: List[str] = []  # directories nsfast made on the way to a mount point

    def listing(rel: str) -> List[Tuple[bytes, str, int]]:
        try:  # (each entry's name is part of the path it is charged for: at most what is left)
            entries = _core.tree_list(
                fd, os.fsencode(rel or "."), userxattr, None if budget is None else max(budget.left, 0)
            )
        except OSError as e:
            if e.errno == errno.EFBIG:
                raise ChangesTooLarge(top + "/" + rel if rel else ov.dst) from None
            raise
        if budget is not None:
            for raw, _kind, _mode in entries:
                budget.charge(f"{top}/{rel}/{os.fsdecode(raw)}" if rel else f"{top}/{os.fsdecode(raw)}")
        return entries

    todo: List[Tuple[str, List[Tuple[bytes, str, int]]]] = [("", listing(""))]
    while todo:  # depth first, without recursion (a tree may be deeper than Python's stack)
        rel, entries = todo.pop()
        for raw, kind, mode in sorted(entries):
            name = os.fsdecode(raw)
            r = f"{rel}/{name}" if rel else name
            path = top + "/" + r
            if any(m == path for m in ours):
                continue  # a mount point of nsfast's (what is mounted there is not the overlay's)
            low = _lower(base, r)
            lower = None if low is None else low[0]
            if kind == "w":
                if lower is not None:
                    out[path] = ("deleted", kind, mode)
                continue
            if kind in ("d", "D"):
                if lower not in ("d", MOUNT) or (low is not None and low[1] != mode):
                    out[path] = ("added" if lower is None else "modified", kind, mode)
                    if lower is None and any(_under(m, path) for m in ours):
                        made.append(path)
                sub = listing(r)
                if lower == "d" and kind == "D":
                    # Opaque: the lower directory's entries it does not hold are gone.
                    ld = _beneath(base, r)
                    try:
                        for gone in sorted(set(os.listdir(ld)) - {os.fsdecode(e[0]) for e in sub}):
                            if budget is not None:
                                budget.charge(f"{path}/{gone}")
                            out[f"{path}/{gone}"] = ("deleted", "w", 0)
                    finally:
                        os.close(ld)
                todo.append((r, sub))
                continue
            out[path] = ("added" if lower is None else "modified", kind, mode)
    for path in made:  # only there for a mount point, and nothing else of the sandbox's in it
        if not any(p != path and _under(p, path) for p in out):
            del out[path]
    return dict(sorted(out.items()))


def since_now() -> int:
    """When a run with `Overlay(commit=True)` starts, for its commit's conflict check: a
    change made in `src` before this call has a ctime below the value returned, one made
    after it a ctime at least that.

    A plain clock reading cannot say so: inodes are stamped from the coarse clock, which
    lags the fine one by up to a tick (4 ms at HZ=250), so a change made just after a
    reading of the fine clock is stamped below it. Since Linux 6.13 (multigrain
    timestamps) the kernel stamps coarsely no lower than the last fine stamp it handed out,
    to any inode: this takes one, for a memfd of its own whose ctime was just read, and
    returns it (~10 us). An older kernel stamps coarsely only: then this waits for the
    coarse clock's next value (at most one tick) and returns that."""
    fd = os.memfd_create("nsfast-since", os.MFD_CLOEXEC)
    try:
        os.fstat(fd)  # its ctime was read: its next change is stamped finely
        os.fchmod(fd, 0o600)
        stamp = os.fstat(fd).st_ctime_ns
    finally:
        os.close(fd)
    if stamp > time.clock_gettime_ns(_CLOCK_REALTIME_COARSE):
        return stamp  # a fine stamp: the kernel's floor for every later one
    deadline = time.monotonic() + 1.0
    while True:
        now = time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)
        if now > stamp or time.monotonic() > deadline:
            return max(now, stamp + 1)
        time.sleep(0.0002)


#: linux/time.h (the time module does not name it).
_CLOCK_REALTIME_COARSE = 5


def _changed_since(base: int, rel: str, since: int, whole: bool) -> Optional[str]:
    """The first path (`rel` or, `whole`, below it) of `src` whose inode changed at or after
    `since` (ctime: no user can set it), or None. Never through a symlink nor into a mount."""
    parent, _, name = rel.rpartition("/")
    try:
        d = _beneath(base, parent)
    except OSError:
        return None
    try:
        if os.lstat(name, dir_fd=d).st_ctime_ns >= since:
            return rel
        if not whole:
            return None
        todo = [rel]
        while todo:
            r = todo.pop()
            try:
                fd = _beneath(base, r)
            except OSError:
                continue  # a mount point (refused elsewhere) or not a directory
            try:
                with os.scandir(fd) as entries:
                    for e in entries:
                        if e.stat(follow_symlinks=False).st_ctime_ns >= since:
                            return f"{r}/{e.name}"
                        if e.is_dir(follow_symlinks=False):
                            todo.append(f"{r}/{e.name}")
            finally:
                os.close(fd)
        return None
    except FileNotFoundError:
        return None
    finally:
        os.close(d)


def _check(
    trees: Trees, ov: Overlay, found: Dict[str, Tuple[str, str, int]], base: int, since: Optional[int] = None
) -> None:
    """Everything a commit can know would fail, before anything is applied (OverlayError,
    src unchanged): a change at or below a mount point of `src` (the sandbox saw the
    directory under it, not what is mounted: applying would write into another file
    system), a parent that is neither in `src` nor made by the commit, a file the caller
    may not read, and (`since`: when the run started) a conflict: an entry of `src` the
    commit would replace or delete that changed on the host during the run (a file edited,
    made or chmodded, anything below a directory the commit deletes): applying would lose
    what the host wrote."""
    prefix = ov.dst.rstrip("/") + "/"
    dirs = {p for p, (c, k, _m) in found.items() if c != "deleted" and k in ("d", "D")}
    for path, (change, kind, _mode) in found.items():
        rel = path[len(prefix) :]
        low = _lower(base, rel)
        if low is not None and low[0] == MOUNT:
            raise OverlayError(path, "at or below a mount point of src (another file system): not applied")
        # A directory kept a directory only takes the sandbox's mode: the host's entries in
        # it stay (its ctime moves with every entry the host adds).
        kept_dir = low is not None and low[0] == "d" and change != "deleted" and kind in ("d", "D")
        if since is not None and low is not None and not kept_dir:
            hit = _changed_since(base, rel, since, whole=low[0] == "d")
            if hit is not None:
                raise OverlayError(
                    prefix + hit, "changed in src during the run (on the host): not applied, the host's change is kept"
                )
        parent = path.rpartition("/")[0]
        if parent + "/" != prefix and parent not in dirs:
            p = _lower(base, parent[len(prefix) :])
            if p is None or p[0] != "d":
                raise OverlayError(path, "its directory is no longer a directory in src (changed on the host?)")
        if change != "deleted" and kind == "f":
            fd = _core.tree_open(trees.fds[trees.paths.index(ov.dst)], os.fsencode(rel))
            if fd is not None:
                os.close(fd)


def commit(
    trees: Trees, ov: Overlay, found: Dict[str, Tuple[str, str, int]], base: int, since: Optional[int] = None
) -> None:
    """Apply `found` (from changes()) to `src` (`base`, from open_sources): deletions,
    directories, files (copied to a fresh temporary name, holes kept, then renamed over),
    symlinks; permission bits without setuid/setgid, a directory's once what is in it was
    applied; FIFOs and other special files are not applied. Every directory of `src` is
    opened by the kernel without following a symlink or crossing a mount, so neither a
    symlink the sandbox made (applied earlier in the same pass) nor a mount below `src`
    can lead a write out of it. What _check() finds is refused before anything is
    applied; a later failure is an OverlayError naming what was applied. `since`: when the
    run started (`since_now`), for _check's conflicts."""
    try:
        _check(trees, ov, found, base, since)
    except OSError as e:
        raise OverlayError(getattr(e, "filename", None) or ov.dst, f"cannot be read: {e.strerror}") from None
    prefix = ov.dst.rstrip("/") + "/"
    upper = trees.fds[trees.paths.index(ov.dst)]
    applied: List[str] = []
    modes: List[Tuple[str, int]] = []
    for path in sorted(found):
        change, kind, mode = found[path]
        rel = path[len(prefix) :]
        parent, _, name = rel.rpartition("/")
        try:
            d = _beneath(base, parent)
            try:
                _apply(d, name, rel, change, kind, mode, upper, modes)
            finally:
                os.close(d)
        except OSError as e:
            raise OverlayError(path, f"cannot be applied: {e.strerror or e}", applied=applied) from None
        applied.append(path)
    for rel, perm in sorted(modes, key=lambda m: -m[0].count("/")):  # deepest first
        try:
            fd = _beneath(base, rel)
            try:
                os.fchmod(fd, perm)
            finally:
                os.close(fd)
        except OSError as e:
            raise OverlayError(prefix + rel, f"mode not applied: {e.strerror or e}", applied=applied) from None


def _apply(
    d: int, name: str, rel: str, change: str, kind: str, mode: int, upper: int, modes: List[Tuple[str, int]]
) -> None:
    low = _entry(d, name)
    old = None if low is None else low[0]
    if change == "deleted" or (old is not None and (old == "d") != (kind in ("d", "D"))):
        if old == "d":
            rmtree_at(d, name)
        elif old is not None:
            os.unlink(name, dir_fd=d)
        old = None
        if change == "deleted":
            return
    perm = mode & 0o1777
    if kind in ("d", "D"):
        if old != "d":
            os.mkdir(name, 0o700, dir_fd=d)  # its mode once what is in it was applied
        modes.append((rel, perm))
    elif kind == "f":
        src = _core.tree_open(upper, os.fsencode(rel))
        if src is None:
            return  # not a regular file (the sandbox ended: cannot happen)
        try:
            tmp, fd = _temporary(d, perm & 0o777)
            try:
                _copy(src, fd)
                os.fchmod(fd, perm & 0o777)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        finally:
            os.close(src)
    elif kind == "l":
        target = _core.tree_readlink(upper, os.fsencode(rel))
        if target is None:
            return
        if old is not None:
            os.unlink(name, dir_fd=d)
        os.symlink(target, name, dir_fd=d)


def _temporary(d: int, perm: int) -> Tuple[str, int]:
    """A new file of a fresh short name in `d` (a leftover of a commit that was killed, or
    a name the sandbox chose, is never reused)."""
    while True:
        tmp = f".nsfast-{os.urandom(6).hex()}"
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, perm,
                                dir_fd=d)  # fmt: skip
        except FileExistsError:
            continue


def _copy(src: int, dst: int) -> None:
    """`src`'s bytes to `dst`, its holes kept as holes: a sparse file the sandbox made costs
    the host no more disk, nor the caller memory, than it did the sandbox."""
    size = os.fstat(src).st_size
    off = 0
    while off < size:
        try:
            start = os.lseek(src, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # only a hole is left
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        os.lseek(dst, start, os.SEEK_SET)
        while start < end:
            n = os.sendfile(dst, src, start, min(end - start, 1 << 24))
            if n == 0:
                break  # the file shrank meanwhile (it cannot: the sandbox ended)
            start += n
        off = end
    os.ftruncate(dst, size)


def rmtree_at(parent: int, name: str) -> None:
    """Delete directory `name` of `parent` and everything in it, never through a symlink
    nor into a mount (EXDEV), without recursion."""
    stack = [(os.dup(parent), name, _core.dir_beneath(parent, os.fsencode(name)))]
    try:
        while stack:
            p, n, fd = stack[-1]
            sub = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                stack.append((os.dup(fd), sub, _core.dir_beneath(fd, os.fsencode(sub))))
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(n, dir_fd=p)
            finally:
                os.close(p)
    finally:
        for p, _n, fd in stack:
            os.close(fd)
            os.close(p)
