"""Whether a resolved path is one only we (or root) could have put there."""

from __future__ import annotations

import os
import stat
from typing import Optional


def untrusted(path: str, itself: bool = False) -> Optional[str]:
    """Why `path` (a real path: no symlink in it) could be another user's doing, or None:
    every directory above it (and, `itself`, it) must be root's or ours and writable by its
    owner alone, or sticky (as /tmp) with what we go on into root's or ours. Checked once a
    path is resolved: a user who could swap a component could do it between a check of the
    path and its use (a symlink flipped between stat() and realpath() handed root an image
    cache in another user's directory)."""
    me = os.geteuid()
    cur = "/"
    for name in [p for p in path.split("/") if p]:
        st = os.lstat(cur)
        nxt = os.path.join(cur, name)
        if st.st_uid not in (0, me):
            return f"{cur} is owned by uid {st.st_uid}, another user"
        if st.st_mode & 0o022:
            try:
                child = os.lstat(nxt)
            except FileNotFoundError:
                return f"{cur} is writable by other users, who could make {nxt}"
            if not st.st_mode & stat.S_ISVTX or child.st_uid not in (0, me):
                return f"{cur} is writable by other users, who could replace {nxt}"
        cur = nxt
    if itself:
        st = os.lstat(path)
        if st.st_uid not in (0, me):
            return f"{path} is owned by uid {st.st_uid}, another user"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{path} is writable by other users"
    return None
