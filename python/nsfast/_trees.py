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
from typing import Dict, List, Optional, Sequence, Tuple

from . import _core
from ._errors import OutputError, SpecError
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
        `*`, `?`, `[...]`; names starting with "." only for patterns that do), by sandbox
        path; more than `max_bytes` in all is an OutputError naming the file."""
        files: Dict[str, bytes] = {}
        left = max_bytes
        for pat in patterns:
            fd, rel = self._at("outputs", pat)
            base = (pat[: len(pat) - len(rel)] if rel else pat).rstrip("/")
            for name in self._match(fd, [c for c in rel.split("/") if c]):
                path = base + "/" + name if name else base
                if path in files:
                    continue
                try:
                    data = _core.tree_read(fd, os.fsencode(name or "."), left)
                except OSError as e:
                    if e.errno == errno.EFBIG:
                        raise OutputError(path, max_bytes, result) from None
                    raise
                if data is not None:
                    files[path] = data
                    left -= len(data)
        return files

    def _match(self, fd: int, comps: List[str], prefix: str = "") -> List[str]:
        if not comps:
            return [prefix]
        first, rest = comps[0], comps[1:]
        if not any(ch in first for ch in "*?["):
            return self._match(fd, rest, f"{prefix}/{first}" if prefix else first)
        out = []
        entries = _core.tree_list(fd, os.fsencode(prefix or "."))
        for raw, kind, _mode in sorted(entries):
            name = os.fsdecode(raw)
            if name.startswith(".") and not first.startswith("."):
                continue
            if not fnmatch.fnmatchcase(name, first):
                continue
            if kind not in ("d", "D", "f", "l") or (rest and kind == "f"):
                continue
            out += self._match(fd, rest, f"{prefix}/{name}" if prefix else name)
        return out


def _walk_nofollow(base: int, parts: Sequence[str]) -> int:
    """An fd of directory `parts` below `base`, each component opened without following a
    symlink (so nothing a commit applied earlier can redirect a later one)."""
    fd = os.dup(base)
    try:
        for p in parts:
            nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _lower(base: int, rel: str) -> Optional[Tuple[str, int]]:
    """("d", "f", "l" or "o", permission bits) of `rel` in the lower directory (`base`),
    None if missing."""
    import stat

    parts = rel.split("/")
    try:
        d = _walk_nofollow(base, parts[:-1])
    except OSError:
        return None
    try:
        st = os.lstat(parts[-1], dir_fd=d)
    except OSError:
        return None
    finally:
        os.close(d)
    m = st.st_mode
    kind = "d" if stat.S_ISDIR(m) else "f" if stat.S_ISREG(m) else "l" if stat.S_ISLNK(m) else "o"
    return kind, stat.S_IMODE(m)


def changes(trees: Trees, ov: Overlay) -> Dict[str, Tuple[str, str, int]]:
    """What the sandbox changed below the Overlay `ov`: sandbox path -> (change, kind in the
    upper layer, mode); change is "added", "modified" or "deleted"."""
    fd = trees.fds[trees.paths.index(ov.dst)]
    base = os.open(ov.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    out: Dict[str, Tuple[str, str, int]] = {}
    try:

        def walk(rel: str, entries: List[Tuple[bytes, str, int]]) -> None:
            for raw, kind, mode in sorted(entries):
                name = os.fsdecode(raw)
                r = f"{rel}/{name}" if rel else name
                path = ov.dst.rstrip("/") + "/" + r
                low = _lower(base, r)
                lower = None if low is None else low[0]
                if kind == "w":
                    if lower is not None:
                        out[path] = ("deleted", kind, mode)
                    continue
                if kind in ("d", "D"):
                    if lower != "d" or (low is not None and low[1] != mode):
                        out[path] = ("added" if lower is None else "modified", kind, mode)
                    sub = _core.tree_list(fd, os.fsencode(r))
                    if lower == "d" and kind == "D":
                        # Opaque: the lower directory's entries it does not hold are gone.
                        ld = _walk_nofollow(base, r.split("/"))
                        try:
                            for gone in sorted(set(os.listdir(ld)) - {os.fsdecode(e[0]) for e in sub}):
                                out[f"{path}/{gone}"] = ("deleted", "w", 0)
                        finally:
                            os.close(ld)
                    walk(r, sub)
                    continue
                out[path] = ("added" if lower is None else "modified", kind, mode)

        walk("", _core.tree_list(fd, b"."))
    finally:
        os.close(base)
    return out


def commit(trees: Trees, ov: Overlay, found: Dict[str, Tuple[str, str, int]]) -> None:
    """Apply `found` (from changes()) to `ov.src`: deletions, directories, files (written to
    a temporary name, then renamed over), symlinks; permission bits without setuid/setgid;
    FIFOs and other special files are not applied. Every directory of `src` is opened
    without following a symlink, so a symlink the sandbox made (committed earlier in the
    same pass) cannot lead a write out of `src`."""
    import shutil

    base = os.open(ov.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    prefix = ov.dst.rstrip("/") + "/"
    try:
        for path in sorted(found):
            change, kind, mode = found[path]
            rel = path[len(prefix) :]
            parts = rel.split("/")
            d = _walk_nofollow(base, parts[:-1])
            name = parts[-1]
            try:
                low = _lower(d, name)
                old = None if low is None else low[0]
                if change == "deleted" or (old is not None and (old == "d") != (kind in ("d", "D"))):
                    if old == "d":
                        shutil.rmtree(name, dir_fd=d)
                    elif old is not None:
                        os.unlink(name, dir_fd=d)
                    if change == "deleted":
                        continue
                perm = mode & 0o1777
                if kind in ("d", "D"):
                    if old != "d":
                        os.mkdir(name, perm, dir_fd=d)
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
                    try:
                        os.fchmod(fd, perm)
                    finally:
                        os.close(fd)
                elif kind == "f":
                    data = trees.read(path, 1 << 62)
                    if data is None:
                        continue  # gone (the sandbox ended; cannot happen) or not a file
                    tmp = f".{name}.nsfast-commit"
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, perm,
                                 dir_fd=d)  # fmt: skip
                    try:
                        _write_all(fd, data)
                        os.fchmod(fd, perm & 0o777)
                    finally:
                        os.close(fd)
                    os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
                elif kind == "l":
                    target = _core.tree_readlink(trees.fds[trees.paths.index(ov.dst)], os.fsencode(rel))
                    if target is None:
                        continue
                    if old is not None:
                        os.unlink(name, dir_fd=d)
                    os.symlink(target, name, dir_fd=d)
            finally:
                os.close(d)
    finally:
        os.close(base)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
