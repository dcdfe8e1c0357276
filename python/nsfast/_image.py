"""OCI images as sandbox roots: `Image` loads an OCI image layout directory, an OCI archive
(a tar of one) or a `docker save` tarball, and unpacks its layers into a flattened root
directory in a content-addressed cache, made once per distinct layer chain.

Threat model: the image is untrusted data (downloaded, or built by someone else); the
caller, the cache and the host are trusted. Loading an image must never write outside the
cache, follow a symlink the image planted, or make anything the image did not describe
by digest:

- Every blob is verified as it is read: the manifest, the config and each layer against the
  sha256 digest (and size) of its descriptor, each uncompressed layer against the config's
  rootfs.diff_ids. Digests must be `sha256:<64 hex>` before one is used as a file name, and
  a layer is verified whole (decompressed into a private file) before a byte of it is
  unpacked. In a docker save tarball, which has no descriptors, the config is verified
  against its file name (docker names it by its digest), the layers against the diff_ids.
- Layers are unpacked with tarfile, member by member, through `_Filter`, a tarfile
  extraction filter built on `tarfile.data_filter`: absolute or `..` member paths, device
  nodes, fifos and hard links to outside the root are refused, and so is any member whose
  directory resolves (through the image's symlinks) outside the root. Symlink members may
  point anywhere (`/usr/bin/awk -> /etc/alternatives/awk`): their targets are resolved
  inside the sandbox's root at run time, never while unpacking, because an existing entry
  is removed before a member takes its place (a directory merges with a directory), so
  nothing is written through a symlink or a hard link. Setuid and setgid bits are dropped;
  as root the tar's numeric owners are kept (the sandbox idmaps the root: ids 0..65535 on
  disk are the sandbox's ids), otherwise tarfile does not chown.
- Loading is bounded in memory, disk and time, whatever the image says: the layers take at
  most `max_size` bytes uncompressed (each use of a layer listed twice charged again), at
  most MAX_ENTRIES entries and MAX_LAYERS layers; tar headers are parsed with bounds
  (`_TarInfo`: a member's pax records and GNU long names at most MAX_HEADER bytes, checked
  on the size a header claims before tarfile reads it) and never accumulated; a compressed
  archive is decompressed once (at most `max_size` bytes, into an unnamed file in the
  cache), not once per blob read from it; member paths resolve through the image's
  symlinks by `_resolve`, which follows at most 40 of them (as the kernel does) and never
  looks outside the root.
- OCI layer semantics: layers apply in order onto one tree; a layer's whiteouts
  (`.wh.NAME`, the opaque marker `.wh..wh..opq`) remove lower layers' entries before its
  other members are unpacked.
- The cache (`cache_dir()`, mode 0700, owned by the caller and writable only by them: it
  is trusted, a root found there is used unverified) holds `rootfs/<chain id>/`, the
  OCI ChainID of the diff_ids. A root is unpacked into a temporary directory under
  `tmp/` and renamed into place, so a root in `rootfs/` is always complete; when two
  processes unpack the same chain at once, the later rename fails and its copy is
  discarded. Temporary directories are removed on every error; one a crash left behind
  (its unpacker holds an flock on its `.lock` while it works) is removed by the next load
  that finds it unlocked.

Not supported: zstd layers (the standard library of Python 3.11 cannot decompress zstd),
extended attributes (file capabilities are dropped), and images that are not Linux ones.
"""

from __future__ import annotations

import bz2
import copy
import errno
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import platform as _platform
import posixpath
import re
import stat
import tarfile
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import IO, Any, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple, Union

from . import _core
from ._errors import ImageError
from ._paths import untrusted

__all__ = ["Image", "ImageConfig", "ImageError", "cache_dir", "set_cache_dir"]

StrPath = Union[str, "os.PathLike[str]"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_JSON = 16 << 20  # index.json, manifests and configs are small; refuse a huge one
_CHUNK = 1 << 20
#: The most bytes an image's layers may take uncompressed, all together (`Image(max_size=)`):
#: a small gzip blob can inflate a thousandfold, and an untrusted image must not fill the
#: cache's disk.
DEFAULT_MAX_SIZE = 16 << 30
#: What one entry costs the budget beyond its tar bytes: a block and an inode on disk (a
#: layer of empty directories takes 512 tar bytes each, 4 KiB each unpacked).
_ENTRY_COST = 4096
#: The most entries an image (or an archive holding one) may have, all layers together: each
#: is a header held while its layer is read, an inode, and path lookups.
MAX_ENTRIES = 2_000_000
#: The deepest an entry may sit, as named and as resolved through the tree's symlinks (the
#: deepest real images stay far below: each level is a lookup per entry below it).
MAX_DEPTH = 256
#: The most layers an image may have (Docker stops at 127; each costs a pass over its tar).
MAX_LAYERS = 256
#: The most bytes the extended headers of one tar member (pax records, GNU long names and
#: link names, sparse maps) may take together, and the most a tar's global pax headers may
#: take in all: tarfile reads each whole into memory before it looks at it (a header that
#: claims 64 MiB cost 64 MiB, and a few hundred of them chained before one member, more).
MAX_HEADER = 1 << 20
_MAX_HEADERS = 8  # extended headers before one member (real tars have at most 3: x, L, K)
_MAX_GLOBAL_KEYS = 64  # global pax keys (each is copied into every later member's header)
#: The kernel's bound on the symlinks one path resolution follows (MAXSYMLINKS), and on the
#: names our own resolution looks up (4 times MAX_DEPTH), per member.
_MAX_SYMLINKS = 40
_MAX_LOOKUPS = 4 * MAX_DEPTH
_PATH_MAX = 4096  # a symlink's target is shorter (symlink(2) fails with ENAMETOOLONG)
#: What an archive's index of its files may take in memory: names and offsets (each entry
#: counted `_INDEX_COST` bytes beyond its name).
_MAX_INDEX = 64 << 20
_INDEX_COST = 128
_REF_NAME = "org.opencontainers.image.ref.name"

_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_CONFIG_TYPES = {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
# Compression is told by the data's magic bytes, whatever the media type says; the diff_id
# check makes sure the result is the layer the config describes.
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
_ZSTD_TYPES = {
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
}
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# platform.machine() -> OCI architecture.
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "386", "i386": "386"}
# The sandbox mounts onto these; made if the image lacks them.
_MOUNT_POINTS = (("proc", 0o755), ("dev", 0o755), ("tmp", 0o1777))

_cache_override: Optional[str] = None
#: The rootfs/ directory of every cache an Image of this process used (see `in_image_cache`).
_cache_roots: Set[str] = set()


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config (its `config` object) that say how to run it."""

    env: Tuple[str, ...]  # "K=V"
    entrypoint: Tuple[str, ...]
    cmd: Tuple[str, ...]
    working_dir: str  # "" if unset
    user: str  # "" if unset, e.g. "1000:1000", "nobody"


def cache_dir() -> str:
    """The image cache in use: the one given to `set_cache_dir`, else $NSFAST_IMAGE_CACHE,
    else $XDG_CACHE_HOME/nsfast/images, else ~/.cache/nsfast/images."""
    if _cache_override is not None:
        return _cache_override
    env = os.environ.get("NSFAST_IMAGE_CACHE")
    if env:
        return os.path.abspath(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nsfast", "images")


def in_image_cache(path: str) -> bool:
    """Whether directory `path` is (below) the roots of an image cache: the default one's,
    or one an `Image(cache=)` of this process used. Such a root is shared by every sandbox
    of its image (and `Image.rootfs` is a string anyone may pass as a `rootfs`)."""
    real = os.path.realpath(path)
    caches = {os.path.realpath(os.path.join(cache_dir(), "rootfs")), *_cache_roots}
    return any(real == c or real.startswith(c + "/") for c in caches)


def set_cache_dir(path: Optional[StrPath]) -> None:
    """Use `path` as the image cache from now on; None: back to the default (see cache_dir)."""
    global _cache_override
    _cache_override = None if path is None else os.path.abspath(os.fspath(path))


class _Layer(NamedTuple):
    name: str  # where the blob is, in its _Store
    label: str  # what messages call it: its digest, or its path in a docker save tarball
    digest: Optional[str]
    size: Optional[int]


class Image:
    """An OCI image, loaded and unpacked: `rootfs` is its flattened root directory in the
    cache (see the module docstring), `config` says how to run it.

    `path`: an OCI image layout directory, a tar of one, or a `docker save` tarball.
    `ref`: a tag (an index.json `org.opencontainers.image.ref.name`; a RepoTags entry such
    as "busybox:latest" in a docker save tarball) or a manifest digest "sha256:..."; needed
    when there are several images. `platform` ("linux/arm64", "linux/arm/v7"): the one to
    take from a multi-platform index (default: the host's). `cache`: instead of cache_dir().
    `max_size`: the most bytes its layers may take uncompressed, together (an ImageError
    beyond, with nothing left in the cache), and a compressed archive decompressed. At most
    MAX_LAYERS layers.
    """

    path: str
    ref: Optional[str]
    digest: str  # the manifest's digest (a docker save tarball has none: its config's, docker's image id)
    config: ImageConfig
    diff_ids: Tuple[str, ...]
    rootfs: str

    def __init__(
        self,
        path: StrPath,
        ref: Optional[str] = None,
        *,
        platform: Optional[str] = None,
        cache: Optional[StrPath] = None,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.ref = ref
        if not hasattr(tarfile, "data_filter"):
            raise ImageError("loading images needs tarfile extraction filters (Python 3.9.17+, 3.10.12+, 3.11.4+)")
        cache_root = _open_cache(cache_dir() if cache is None else os.path.abspath(os.fspath(cache)))
        _cache_roots.add(os.path.join(cache_root, "rootfs"))
        store = _Store(self.path, os.path.join(cache_root, "tmp"), max_size)
        try:
            if store.is_docker:
                self.digest, config, layers = _docker_image(store, ref)
            else:
                self.digest, config, layers = _oci_image(store, ref, platform)
            if len(layers) > MAX_LAYERS:
                raise ImageError(
                    f"{self.path}: {self.digest} has {len(layers)} layers, more than the {MAX_LAYERS} allowed"
                )
            self.config, self.diff_ids = _parse_config(f"{self.path}: config of {self.digest}", config)
            if len(self.diff_ids) != len(layers):
                raise ImageError(
                    f"{self.path}: {self.digest} has {len(layers)} layers, its config {len(self.diff_ids)} diff_ids"
                )
            if not layers:
                raise ImageError(f"{self.path}: {self.digest} has no layers")
            self.rootfs = _unpack(store, layers, self.diff_ids, cache_root, max_size)
        finally:
            store.close()

    def __repr__(self) -> str:
        return f"Image({self.path!r}, ref={self.ref!r}, digest={self.digest!r})"


# --- reading blobs ------------------------------------------------------------------------


def _digest(value: Any, what: str) -> str:
    """`value` if it is a sha256 digest, the only kind used as a file name under blobs/."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise ImageError(f"{what}: not a sha256 digest ('sha256:' and 64 lowercase hex digits): {value!r}")
    return value


class _Reader:
    """A blob, read once from start to end: counts and hashes the bytes as they pass (at
    most `size` of them, when known); `verify()` reads the rest and checks digest and size."""

    def __init__(self, f: IO[bytes], what: str, digest: Optional[str], size: Optional[int]) -> None:
        self._f, self._what, self._digest, self._size = f, what, digest, size
        self._hash = hashlib.sha256()
        self._n = 0
        self._head = b""

    def peek(self, n: int) -> bytes:
        """The next `n` bytes, still returned by the next read."""
        self._head = self.read(n)
        return self._head

    def read(self, n: int = -1) -> bytes:
        if self._head:  # what peek() read first
            cut = len(self._head) if n < 0 else n
            data, self._head = self._head[:cut], self._head[cut:]
            return data
        data = self._f.read(n)
        self._n += len(data)
        if self._size is not None and self._n > self._size:
            raise ImageError(f"{self._what}: larger than the {self._size} bytes its descriptor says")
        self._hash.update(data)
        return data

    def seek(self, offset: int) -> int:  # for gzip.GzipFile's type; it only seeks to rewind
        raise io.UnsupportedOperation("a blob is read once, start to end")

    def verify(self) -> str:
        """The blob's digest, once all of it is read and found as described."""
        while self.read(_CHUNK):
            pass
        got = "sha256:" + self._hash.hexdigest()
        if self._size is not None and self._n != self._size:
            raise ImageError(f"{self._what}: {self._n} bytes, its descriptor says {self._size}")
        if self._digest is not None and got != self._digest:
            raise ImageError(f"{self._what}: content does not match its digest (it is {got})")
        return got


_EXTENDED = {
    tarfile.GNUTYPE_LONGNAME: "a GNU long name",
    tarfile.GNUTYPE_LONGLINK: "a GNU long link name",
    tarfile.XHDTYPE: "a pax header",
    tarfile.XGLTYPE: "a pax global header",
    tarfile.SOLARIS_XHDTYPE: "a Solaris extended header",
}


class _Limited:
    """A tar's file object while tarfile reads a sparse map from it: at most `left` bytes."""

    def __init__(self, f: Any, left: int, what: str) -> None:
        self._f, self._left, self._what = f, left, what

    def read(self, n: int) -> bytes:
        self._left -= n
        if self._left < 0:
            raise tarfile.ReadError(f"{self._what}: a sparse map of more than {MAX_HEADER} bytes")
        data: bytes = self._f.read(n)
        return data

    def tell(self) -> int:
        pos: int = self._f.tell()
        return pos


class _TarInfo(tarfile.TarInfo):
    """tarfile's header parser, bounded: the extended headers before a member take at most
    MAX_HEADER bytes (checked on the size each claims, before tarfile reads it), and so do
    sparse maps; a tar's global pax headers take at most MAX_HEADER bytes and
    _MAX_GLOBAL_KEYS keys in all. Past a bound: a tarfile.ReadError naming the header,
    which tarfile passes on (a HeaderError would end the archive there, silently)."""

    def _proc_member(self, tf: Any) -> tarfile.TarInfo:
        kind = _EXTENDED.get(self.type)
        if kind is None:  # the member these headers were for: the next member's start afresh
            tf._nsfast_chain = (0, 0)
        else:
            n, size = getattr(tf, "_nsfast_chain", (0, 0))
            n, size = n + 1, size + self.size
            where = f"{kind} ({self.name!r}) at byte {self.offset}"
            if self.size > MAX_HEADER or size > MAX_HEADER:
                raise tarfile.ReadError(
                    f"{where}: claims {self.size} bytes; a member's extended headers may take {MAX_HEADER}"
                )
            if n > _MAX_HEADERS:
                raise tarfile.ReadError(f"{where}: more than {_MAX_HEADERS} extended headers for one member")
            if self.type == tarfile.XGLTYPE:
                total = getattr(tf, "_nsfast_global", 0) + self.size
                if total > MAX_HEADER:
                    raise tarfile.ReadError(
                        f"{where}: the archive's global pax headers take more than {MAX_HEADER} bytes"
                    )
                tf._nsfast_global = total
            tf._nsfast_chain = (n, size)
        member: tarfile.TarInfo = super()._proc_member(tf)  # type: ignore[misc]
        if self.type == tarfile.XGLTYPE and len(tf.pax_headers) > _MAX_GLOBAL_KEYS:
            raise tarfile.ReadError(
                f"a pax global header at byte {self.offset}: more than {_MAX_GLOBAL_KEYS} global pax keys"
            )
        return member

    def _proc_sparse(self, tf: Any) -> tarfile.TarInfo:
        real = tf.fileobj
        tf.fileobj = _Limited(real, MAX_HEADER, f"{self.name!r} at byte {self.offset}")
        try:
            member: tarfile.TarInfo = super()._proc_sparse(tf)  # type: ignore[misc]
        finally:
            tf.fileobj = real
        return member

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: Dict[str, str], tf: Any) -> None:
        real = tf.fileobj
        tf.fileobj = _Limited(real, MAX_HEADER, f"{next.name!r} at byte {self.offset}")
        try:
            super()._proc_gnusparse_10(next, pax_headers, tf)  # type: ignore[misc]
        finally:
            tf.fileobj = real


class _TarFile(tarfile.TarFile):
    """A tar read with `_TarInfo` headers, which never looks up a member by name: tarfile
    does when a link cannot be made (a symlink whose target is too long), and reads all of
    the archive's headers into memory to do it."""

    tarinfo = _TarInfo

    def _find_link_target(self, tarinfo: tarfile.TarInfo) -> tarfile.TarInfo:
        raise tarfile.ExtractError(f"cannot make the link to {tarinfo.linkname[:256]!r}")


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of `tf` in order, none kept: tarfile's cache of the headers it read (all
    of an archive's, otherwise) is emptied as each is read."""
    while True:
        m = tf.next()
        tf.members = []  # type: ignore[attr-defined]
        if m is None:
            return
        yield m


class _Store:
    """The files of an image: an OCI layout directory, or the members of a tar archive
    (read in place, never extracted). `is_docker`: a tar with docker save's manifest.json.

    A compressed archive (gzip, bzip2, xz) is decompressed once, at most `max_size` bytes of
    it, into an unnamed temporary file in `tmp` (the cache's), and read there: reading its
    members in place meant decompressing it again from its start for each one read (a layer
    named 256 times behind 512 MiB of zeros took five minutes)."""

    def __init__(self, path: str, tmp: str, max_size: int) -> None:
        self.path = path
        self._tar: Optional[tarfile.TarFile] = None
        self._file: Optional[IO[bytes]] = None
        self._members: Dict[str, Tuple[int, int]] = {}  # name -> (data offset, size)
        if os.path.isdir(path):
            self.is_docker = False
            return
        try:
            self._file = _uncompressed(path, tmp, max_size)
            self._tar = _TarFile(fileobj=self._file, mode="r")
            index = 0
            for n, m in enumerate(_members(self._tar)):
                if n >= MAX_ENTRIES:
                    raise ImageError(f"{path}: more than {MAX_ENTRIES} entries in the archive")
                if not m.isreg():
                    continue
                if m.sparse is not None:
                    raise ImageError(f"{path}: {m.name!r}: a sparse file (not something an image archive holds)")
                name = posixpath.normpath(m.name).lstrip("/")
                index += len(name) + _INDEX_COST
                if index > _MAX_INDEX:
                    raise ImageError(f"{path}: the names of the archive's files take more than {_MAX_INDEX >> 20} MiB")
                self._members[name] = (m.offset_data, m.size)
        except (OSError, EOFError, tarfile.TarError, ValueError, OverflowError, zlib.error, lzma.LZMAError) as e:
            self.close()
            raise ImageError(f"{path}: not an OCI image layout directory nor a readable tar archive ({e})") from None
        except BaseException:
            self.close()
            raise
        self.is_docker = "manifest.json" in self._members

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._file is not None:
            self._file.close()

    def open(self, name: str, what: str) -> IO[bytes]:
        if self._tar is None:
            # Looked up inside the layout directory, its symlinks too (a symlink to a host
            # file, /proc/kmsg or a tracing pipe, leads nowhere), and only a regular file,
            # its type checked before it is opened (no fifo or device that would block).
            d = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = _core.tree_open(d, os.fsencode(name))
            except OSError as e:
                raise ImageError(f"{self.path}: {what} ({name}): {e.strerror or e}") from None
            finally:
                os.close(d)
            if fd is not None:
                os.set_blocking(fd, True)
                return open(fd, "rb")
        elif name in self._members:
            info = tarfile.TarInfo(name)
            info.offset_data, info.size = self._members[name]
            f = self._tar.extractfile(info)
            if f is not None:
                return f
        raise ImageError(f"{self.path}: {what} is missing ({name})")

    def json(self, name: str, what: str, digest: Optional[str] = None, size: Optional[int] = None) -> Tuple[Any, str]:
        """The parsed JSON of a (small) file, verified, and its digest."""
        if size is not None and size > _MAX_JSON:
            raise ImageError(f"{self.path}: {what}: {size} bytes, more than a JSON document of an image should be")
        with self.open(name, what) as f:
            r = _Reader(f, f"{self.path}: {what}", digest, size)
            data = r.read(_MAX_JSON + 1)
            if len(data) > _MAX_JSON:
                raise ImageError(f"{self.path}: {what}: larger than {_MAX_JSON} bytes")
            got = r.verify()
        try:
            return json.loads(data), got
        except ValueError as e:
            raise ImageError(f"{self.path}: {what}: not valid JSON ({e})") from None
        except RecursionError:
            raise ImageError(f"{self.path}: {what}: JSON nested deeper than Python parses") from None


_COMPRESSED = ((_GZIP_MAGIC, "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


def _uncompressed(path: str, tmp: str, max_size: int) -> IO[bytes]:
    """Archive `path`, open for reading: itself, or (compressed) an unnamed temporary file
    in directory `tmp` holding it decompressed, at most `max_size` bytes of it."""
    f = open(path, "rb")
    keep = False
    try:
        magic = f.read(6)
        f.seek(0)
        if magic.startswith(_ZSTD_MAGIC):
            raise ImageError(f"{path}: zstd-compressed archives are not supported")
        kind = next((k for m, k in _COMPRESSED if magic.startswith(m)), None)
        if kind is None:
            keep = True
            return f
        src: Union[gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile]
        if kind == "gzip":
            src = gzip.GzipFile(fileobj=f, mode="rb")
        elif kind == "bzip2":
            src = bz2.BZ2File(f)
        else:
            src = lzma.LZMAFile(f)
        out = tempfile.TemporaryFile(dir=tmp)
        try:
            left = max_size
            while chunk := src.read(_CHUNK):
                left -= len(chunk)
                if left < 0:
                    raise ImageError(f"{path}: more than max_size ({max_size} bytes) once decompressed ({kind})")
                out.write(chunk)
            out.seek(0)
        except BaseException:
            out.close()
            raise
        return out
    finally:
        if not keep:
            f.close()


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest[len("sha256:") :]


def _object(value: Any, what: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> List[Any]:
    if not isinstance(value, list):
        raise ImageError(f"{what}: expected a JSON array, got {type(value).__name__}")
    return value


class _Descriptor(NamedTuple):
    media_type: str
    digest: str
    size: int
    raw: Dict[str, Any]


def _descriptor(value: Any, what: str) -> _Descriptor:
    d = _object(value, what)
    media_type, size = d.get("mediaType"), d.get("size")
    if not isinstance(media_type, str):
        raise ImageError(f"{what}: no mediaType")
    digest = _digest(d.get("digest"), f"{what}: digest")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ImageError(f"{what} {digest}: size is not a byte count: {size!r}")
    return _Descriptor(media_type, digest, size, d)


# --- finding the image: manifest, config, layers -------------------------------------------


def _oci_image(store: _Store, ref: Optional[str], platform: Optional[str]) -> Tuple[str, Dict[str, Any], List[_Layer]]:
    image = store.path
    layout, _ = store.json("oci-layout", "oci-layout")
    if _object(layout, f"{image}: oci-layout").get("imageLayoutVersion") != "1.0.0":
        raise ImageError(f"{image}: oci-layout: not imageLayoutVersion 1.0.0")
    index, _ = store.json("index.json", "index.json")
    entries = [
        _descriptor(d, f"{image}: index.json manifest")
        for d in _list(_object(index, f"{image}: index.json").get("manifests"), f"{image}: index.json manifests")
    ]
    desc = _select(image, entries, ref)
    for _ in range(8):  # an index may name an index; not without end
        if desc.media_type in _MANIFEST_TYPES:
            break
        if desc.media_type not in _INDEX_TYPES:
            raise ImageError(f"{image}: {desc.digest} is a {desc.media_type}, not an image manifest or index")
        nested, _ = store.json(_blob(desc.digest), f"index {desc.digest}", desc.digest, desc.size)
        where = f"{image}: index {desc.digest}"
        desc = _pick_platform(
            where,
            [_descriptor(d, f"{where}: manifest") for d in _list(_object(nested, where).get("manifests"), where)],
            platform,
        )
    else:
        raise ImageError(f"{image}: indexes nested too deep")
    what = f"manifest {desc.digest}"
    manifest = _object(store.json(_blob(desc.digest), what, desc.digest, desc.size)[0], f"{image}: {what}")
    config_desc = _descriptor(manifest.get("config"), f"{image}: {what}: config")
    if config_desc.media_type not in _CONFIG_TYPES:
        raise ImageError(f"{image}: {what}: not a container image (config is a {config_desc.media_type})")
    config, _ = store.json(
        _blob(config_desc.digest), f"config {config_desc.digest}", config_desc.digest, config_desc.size
    )
    layers = []
    for d in _list(manifest.get("layers"), f"{image}: {what}: layers"):
        ld = _descriptor(d, f"{image}: {what}: layer")
        if ld.media_type in _ZSTD_TYPES:
            raise ImageError(f"{image}: layer {ld.digest}: zstd layers are not supported")
        if ld.media_type not in _LAYER_TYPES:
            raise ImageError(f"{image}: layer {ld.digest}: unsupported media type {ld.media_type!r}")
        layers.append(_Layer(_blob(ld.digest), ld.digest, ld.digest, ld.size))
    return desc.digest, _object(config, f"{image}: config {config_desc.digest}"), layers


def _select(image: str, entries: List[_Descriptor], ref: Optional[str]) -> _Descriptor:
    """The index.json entry `ref` names (a ref.name annotation or a digest)."""

    def name(d: _Descriptor) -> Optional[str]:
        annotations = d.raw.get("annotations")
        value = annotations.get(_REF_NAME) if isinstance(annotations, dict) else None
        return value if isinstance(value, str) else None

    available = ", ".join(name(d) or d.digest for d in entries) or "none"
    if ref is None:
        if len(entries) == 1:
            return entries[0]
        raise ImageError(f"{image}: holds {len(entries)} images, pass ref= one of: {available}")
    if ref.startswith("sha256:"):
        _digest(ref, f"{image}: ref")
        matches = [d for d in entries if d.digest == ref]
    else:
        matches = [d for d in entries if name(d) == ref]
    if not matches:
        raise ImageError(f"{image}: no image {ref!r}; available: {available}")
    if len({d.digest for d in matches}) > 1:
        raise ImageError(f"{image}: ref {ref!r} names several images: {', '.join(d.digest for d in matches)}")
    return matches[0]


def _pick_platform(where: str, entries: List[_Descriptor], platform: Optional[str]) -> _Descriptor:
    """The entry of a multi-platform index for `platform` (default: the host's)."""
    if platform is None:
        machine = _platform.machine()
        platform = f"linux/{_ARCH.get(machine, machine)}"
    want = platform.split("/")
    if len(want) not in (2, 3) or not all(want):
        raise ImageError(f"{where}: platform must be 'os/architecture[/variant]', e.g. 'linux/arm64': {platform!r}")
    seen = []
    for d in entries:
        p = d.raw.get("platform")
        if not isinstance(p, dict):
            continue
        have = [str(p.get("os")), str(p.get("architecture"))] + ([str(p["variant"])] if p.get("variant") else [])
        seen.append("/".join(have))
        if have[:2] == want[:2] and (len(want) == 2 or have[2:] == want[2:]):
            return d
    raise ImageError(f"{where}: no image for {platform}; it has: {', '.join(seen) or 'none'}")


def _docker_image(store: _Store, ref: Optional[str]) -> Tuple[str, Dict[str, Any], List[_Layer]]:
    image = store.path
    manifest, _ = store.json("manifest.json", "manifest.json")
    entries = [_object(e, f"{image}: manifest.json entry") for e in _list(manifest, f"{image}: manifest.json")]

    def tags(e: Dict[str, Any]) -> List[str]:
        repo_tags = e.get("RepoTags")
        return [t for t in repo_tags if isinstance(t, str)] if isinstance(repo_tags, list) else []

    available = ", ".join(", ".join(tags(e)) or "(untagged)" for e in entries) or "none"
    if ref is None:
        if len(entries) != 1:
            raise ImageError(f"{image}: holds {len(entries)} images, pass ref= one of: {available}")
        entry = entries[0]
    else:
        matches = [e for e in entries if ref in tags(e)]
        if not matches:
            raise ImageError(f"{image}: no image {ref!r}; available: {available}")
        entry = matches[0]
    config_name = entry.get("Config")
    if not isinstance(config_name, str):
        raise ImageError(f"{image}: manifest.json: no Config")
    # docker names the config by its digest: "<hex>.json", or "blobs/sha256/<hex>" since docker 25.
    named = re.search(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$", config_name)
    config, digest = store.json(config_name, f"config {config_name}", "sha256:" + named[1] if named else None)
    layers = []
    for name in _list(entry.get("Layers"), f"{image}: manifest.json Layers"):
        if not isinstance(name, str):
            raise ImageError(f"{image}: manifest.json: a layer that is not a path: {name!r}")
        # Only blobs/sha256/<hex> names are digests ("<id>/layer.tar" ids are not).
        blob = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", name)
        layers.append(_Layer(name, name, "sha256:" + blob[1] if blob else None, None))
    return digest, _object(config, f"{image}: config {config_name}"), layers


def _parse_config(what: str, config: Dict[str, Any]) -> Tuple[ImageConfig, Tuple[str, ...]]:
    if config.get("os", "linux") != "linux":
        raise ImageError(f"{what}: an image for {config.get('os')!r}, not linux")
    c = _object(config.get("config") or {}, f"{what}: config")

    def strings(key: str) -> Tuple[str, ...]:
        value = c.get(key) or []
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ImageError(f"{what}: {key} is not a list of strings: {value!r}")
        return tuple(value)

    def string(key: str) -> str:
        value = c.get(key) or ""
        if not isinstance(value, str):
            raise ImageError(f"{what}: {key} is not a string: {value!r}")
        return value

    rootfs = _object(config.get("rootfs"), f"{what}: rootfs")
    if rootfs.get("type") != "layers":
        raise ImageError(f"{what}: rootfs.type is not 'layers': {rootfs.get('type')!r}")
    diff_ids = tuple(_digest(d, f"{what}: diff_id") for d in _list(rootfs.get("diff_ids"), f"{what}: diff_ids"))
    return ImageConfig(
        strings("Env"), strings("Entrypoint"), strings("Cmd"), string("WorkingDir"), string("User")
    ), diff_ids


# --- the cache and unpacking ---------------------------------------------------------------


def _trusted_path(path: str, what: str) -> None:
    """ImageError unless `path` (resolved) is one no other user could have put there or can
    replace any part of (see _paths.untrusted)."""
    why = untrusted(path)
    if why is not None:
        raise ImageError(f"{what} {path}: {why}")


def _open_cache(path: str) -> str:
    """The cache directory (made 0700), resolved; refused if others could write to it, or to
    anything on the way to it (see _trusted_path)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        path = os.path.realpath(path)
        _trusted_path(path, "image cache")
        st = os.lstat(path)
    except OSError as e:
        raise ImageError(f"image cache {path}: {e}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ImageError(f"image cache {path}: must be owned by uid {os.geteuid()} and writable by it alone")
    for sub in ("rootfs", "tmp"):
        d = os.path.join(path, sub)
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            st = os.lstat(d)
        except OSError as e:
            raise ImageError(f"image cache {path}: {e}") from None
        # What is found in rootfs/ is used unverified, and tmp/ holds unpacks in progress:
        # neither may be (or lead to) another user's.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ImageError(
                f"image cache {path}: {sub}/ must be a directory owned by uid {os.geteuid()} and writable by it alone"
            )
    return path


def _chain_id(diff_ids: Tuple[str, ...]) -> str:
    """OCI's ChainID: the diff_id of the first layer, then sha256("<chain> <diff_id>")."""
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


def _sweep(tmp: str) -> None:
    """Remove the unpack directories of loads that died (SIGKILL, a power cut) in `tmp`: each
    live unpacker holds an flock on its directory's `.lock`, so one that can be locked here
    has no owner left. A directory with no `.lock` yet is being set up and is left alone."""
    for name in os.listdir(tmp):
        work = os.path.join(tmp, name)
        try:
            fd = os.open(os.path.join(work, ".lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its unpacker is alive
        try:
            _rmtree(work)
        except Exception:
            pass  # the next sweep tries again
        finally:
            os.close(fd)


def _lock_work(work: str) -> int:
    """Hold `work`'s `.lock` for the rest of the unpack (see `_sweep`): locked before it gets
    its name, so no sweeper can find it unlocked while its owner lives."""
    fd = os.open(os.path.join(work, ".lock-new"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(os.path.join(work, ".lock-new"), os.path.join(work, ".lock"))
    return fd


def _unpack(store: _Store, layers: List[_Layer], diff_ids: Tuple[str, ...], cache: str, max_size: int) -> str:
    """The cached root of this layer chain, unpacked first if it is not there yet."""
    final = os.path.join(cache, "rootfs", _chain_id(diff_ids)[len("sha256:") :])
    if os.path.isdir(final):
        return final
    _sweep(os.path.join(cache, "tmp"))
    work = tempfile.mkdtemp(prefix="unpack-", dir=os.path.join(cache, "tmp"))
    lock = _lock_work(work)
    try:
        root = os.path.join(work, "root")
        os.mkdir(root)
        budget = [max_size, MAX_ENTRIES]
        # A layer an image lists more than once is read, verified and decompressed once,
        # and kept until its last use; each use is charged again (its bytes unpacked again).
        uses = Counter((layer, diff_id) for layer, diff_id in zip(layers, diff_ids))
        kept: Dict[Tuple[_Layer, str], str] = {}
        for i, (layer, diff_id) in enumerate(zip(layers, diff_ids)):
            where = f"{store.path}: layer {layer.label}"
            tar = kept.get((layer, diff_id))
            if tar is None:
                tar = os.path.join(work, f"layer{i}.tar")
                _decompress(store, layer, diff_id, tar, budget)
            else:
                budget[0] -= os.path.getsize(tar)
                if budget[0] < 0:
                    raise ImageError(f"{where}: the image's layers take more than max_size uncompressed")
            _apply(where, tar, root, budget)
            uses[layer, diff_id] -= 1
            if uses[layer, diff_id]:
                kept[layer, diff_id] = tar
            else:
                kept.pop((layer, diff_id), None)
                os.unlink(tar)
        _add_mount_points(root)
        try:
            os.rename(root, final)
        except OSError as e:
            # Another process renamed its copy into place first: use that, discard ours.
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(final):
                raise
    except OSError as e:
        raise ImageError(f"{store.path}: unpacking into {cache}: {e}") from e
    finally:
        try:
            _rmtree(work)
        except Exception:
            pass  # left for the next load's sweep (its lock is released below)
        finally:
            os.close(lock)
    return final


def _rmtree(path: str) -> None:
    """Remove directory `path` and everything in it, never through a symlink, without
    recursion (a tree may be deeper than Python's stack)."""
    from ._trees import rmtree_at

    parent, name = os.path.split(path.rstrip("/"))
    d = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        rmtree_at(d, name)
    finally:
        os.close(d)


def _decompress(store: _Store, layer: _Layer, diff_id: str, out: str, budget: List[int]) -> None:
    """Write the layer, uncompressed, to `out`, verifying its blob digest and its diff_id;
    `budget[0]`: the bytes the image's layers may still take (ImageError beyond)."""
    what = f"{store.path}: layer {layer.label}"
    unpacked = hashlib.sha256()
    with store.open(layer.name, f"layer {layer.label}") as f, open(out, "wb") as dst:
        blob = _Reader(f, what, layer.digest, layer.size)
        magic = blob.peek(4)
        if magic.startswith(_ZSTD_MAGIC):
            raise ImageError(f"{what}: zstd layers are not supported")
        src: Union[_Reader, gzip.GzipFile] = (
            gzip.GzipFile(fileobj=blob, mode="rb") if magic.startswith(_GZIP_MAGIC) else blob
        )
        try:
            while chunk := src.read(_CHUNK):
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    raise ImageError(f"{what}: the image's layers take more than max_size uncompressed")
                unpacked.update(chunk)
                dst.write(chunk)
        except (OSError, EOFError, zlib.error) as e:
            blob.verify()  # a damaged blob is reported as such
            raise ImageError(f"{what}: corrupt gzip data ({e})") from None
        blob.verify()
    got = "sha256:" + unpacked.hexdigest()
    if got != diff_id:
        raise ImageError(f"{what}: uncompressed content is {got}, the config's diff_id says {diff_id}")


def _member_path(where: str, name: str) -> str:
    """A member's path relative to the root ("" for the root itself), refused if absolute
    or with a '..' component."""
    if "\0" in name:
        raise ImageError(f"{where}: {name!r}: NUL in a member path")
    if name.startswith("/"):
        raise ImageError(f"{where}: {name!r}: absolute member path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{where}: {name!r}: '..' in a member path")
    if len(parts) > MAX_DEPTH:
        raise ImageError(f"{where}: {name!r}: deeper than {MAX_DEPTH} levels")
    return "/".join(parts)


class _Unresolvable(Exception):
    """Why a path of the tree does not resolve inside it; `outside`: it leads out."""

    def __init__(self, reason: str, outside: bool = False) -> None:
        super().__init__(reason)
        self.outside = outside


def _resolve(root: str, rel: str) -> str:
    """Path `rel` of the tree at `root` (a real path) resolved through the tree's symlinks,
    as realpath does, but never outside the root and in bounded time: `..` above the root
    or an absolute symlink leads outside (_Unresolvable), and a path may follow at most
    _MAX_SYMLINKS symlinks (the kernel's bound) and look up _MAX_LOOKUPS names (realpath
    walked any chain: 400 symlinks of 600 components each cost 0.7 s per member). What does
    not exist (yet) is taken as it is named. Nothing outside the root is ever looked up."""
    done: List[str] = []  # the resolved components so far: real directories, or missing
    todo = [p for p in reversed(rel.split("/")) if p not in ("", ".")]
    links = lookups = 0
    missing: Optional[int] = None  # done[missing] does not exist: nothing below it does
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                raise _Unresolvable("resolves outside the root (through '..')", outside=True)
            done.pop()
            if missing is not None and len(done) <= missing:
                missing = None  # back above it: what follows is looked up again
            continue
        if len(done) >= MAX_DEPTH:
            raise _Unresolvable(f"resolves deeper than {MAX_DEPTH} levels")
        lookups += 1
        if lookups > _MAX_LOOKUPS:
            raise _Unresolvable(f"does not resolve (it takes more than {_MAX_LOOKUPS} lookups)")
        path = root + "/" + "/".join(done + [part])
        if missing is None:
            try:
                st = os.lstat(path)
            except OSError:  # missing, or below a file: named as it is (made later, or an error)
                missing = len(done)
            else:
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise _Unresolvable(f"does not resolve (more than {_MAX_SYMLINKS} symbolic links)")
                    target = os.readlink(path)
                    if target.startswith("/"):
                        raise _Unresolvable(
                            f"resolves outside the root (through {'/'.join(done + [part])!r} -> {target!r})",
                            outside=True,
                        )
                    todo.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                    continue
        done.append(part)
    return root + "".join("/" + p for p in done)


def _resolve_inside(where: str, name: str, root: str, rel_dir: str) -> str:
    """The real path of directory `rel_dir` of the tree (see `_resolve`), refused if it is
    outside the root. The tree only changes by our own hand, so the answer stays true."""
    try:
        return _resolve(root, rel_dir)
    except _Unresolvable as e:
        raise ImageError(f"{where}: {name!r}: its directory {e}") from None


def _remove(path: str) -> None:
    """Remove an entry of the tree, a directory with its contents; a symlink is removed, not followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        _rmtree(path)  # does not follow symlinks either
    else:
        os.unlink(path)


def _apply(where: str, tar: str, root: str, budget: List[int]) -> None:
    """Apply one (verified) layer tar onto the tree at `root`: whiteouts, then the rest, in
    two passes over the file (no header kept past its member); `budget`: [bytes, entries]
    the image may still take (each entry charged a block beyond its tar bytes)."""
    root = os.path.realpath(root)
    try:
        with _TarFile.open(tar, "r:") as tf:  # pass 1: whiteouts, and the budget
            for m in _members(tf):
                budget[0] -= _ENTRY_COST
                budget[1] -= 1
                if budget[0] < 0:
                    raise ImageError(f"{where}: the image's layers take more than max_size unpacked")
                if budget[1] < 0:
                    raise ImageError(f"{where}: the image has more than {MAX_ENTRIES} entries")
                rel = _member_path(where, m.name)
                if posixpath.basename(rel).startswith(".wh."):
                    _whiteout(where, m.name, root, rel)
        with _TarFile.open(tar, "r:") as tf:  # pass 2: the rest
            tf.errorlevel = 2  # every extraction problem raises
            flt = _Filter(where, root)
            for m in _members(tf):
                if posixpath.basename(_member_path(where, m.name)).startswith(".wh."):
                    continue
                try:
                    tf.extract(m, root, numeric_owner=True, filter=flt)
                except (OSError, tarfile.TarError, ValueError, OverflowError) as e:
                    raise ImageError(f"{where}: {m.name!r}: {e}") from None
    except (tarfile.TarError, ValueError, OverflowError) as e:
        raise ImageError(f"{where}: not a valid tar archive ({e})") from None
    except RecursionError:
        raise ImageError(f"{where}: a path that does not resolve (symlinks nested too deep)") from None


def _whiteout(where: str, name: str, root: str, rel: str) -> None:
    """Apply whiteout member `rel` (`.wh.NAME` or the opaque marker) to the lower layers' tree."""
    rel_dir, base = posixpath.split(rel)
    if base == ".wh..wh..opq":
        # The directory's own entry is looked up without following it: if the tree has a
        # symlink there, this layer's directory replaces it and there is nothing to clear.
        parent = _resolve_inside(where, name, root, posixpath.dirname(rel_dir))
        d = os.path.join(parent, posixpath.basename(rel_dir)) if rel_dir else root
        if os.path.isdir(d) and not os.path.islink(d):
            for entry in os.listdir(d):
                _remove(os.path.join(d, entry))
    elif not base.startswith(".wh..wh."):  # other .wh..wh. names are aufs metadata: ignored
        target = base[len(".wh.") :]
        if target in ("", ".", ".."):
            raise ImageError(f"{where}: {name!r}: a whiteout of {target!r}")
        _remove(os.path.join(_resolve_inside(where, name, root, rel_dir), target))


class _Filter:
    """The tarfile extraction filter of a layer: refuses what could escape the root (see the
    module docstring), clears the way for the member, and drops setuid/setgid bits."""

    def __init__(self, where: str, root: str) -> None:
        self._where, self._root = where, root

    def __call__(self, member: tarfile.TarInfo, dest: str) -> Optional[tarfile.TarInfo]:
        where, root = self._where, self._root
        rel = _member_path(where, member.name)
        if not rel:
            return None  # the root itself: its mode and owner are nsfast's
        what = f"{where}: {member.name!r}"
        if member.ischr() or member.isblk() or member.isfifo():
            raise ImageError(f"{what}: device nodes and fifos are not allowed")
        # The member replaces what is there: unlinked, or removed with its contents, never
        # followed; only a directory over a directory merges. After this, data_filter's
        # check that the member's path resolves inside the root is about its directory.
        # The member goes where its directory resolves (no symlink left on the way there:
        # neither tarfile's realpath nor the kernel walks the image's symlinks again).
        path = os.path.join(_resolve_inside(where, member.name, root, posixpath.dirname(rel)), posixpath.basename(rel))
        if not (member.isdir() and os.path.isdir(path) and not os.path.islink(path)):
            _remove(path)
        new = copy.copy(member)
        new.name = path[len(root) + 1 :]
        if new.issym() and len(os.fsencode(new.linkname)) >= _PATH_MAX:
            raise ImageError(f"{what}: a symlink to a target of more than {_PATH_MAX - 1} bytes")
        if new.islnk():
            new.linkname = self._link_target(what, new.linkname)
        # Not stored: extraction keeps the numeric owner (as root) and the mode set below.
        probe = copy.copy(new)
        if probe.issym():  # a symlink's target may be anything; its own path is checked
            probe.type, probe.linkname = tarfile.REGTYPE, ""
        try:
            tarfile.data_filter(probe, dest)
        except tarfile.FilterError as e:
            raise ImageError(f"{where}: {e}") from None
        # No setuid, setgid; sticky only on directories. Unprivileged, directories stay
        # writable to their owner (us), so later layers and cleanup can change them.
        new.mode = member.mode & (0o1777 if member.isdir() else 0o777)
        if member.isdir() and os.geteuid() != 0:
            new.mode |= 0o700
        return new

    def _link_target(self, what: str, linkname: str) -> str:
        """A hard link's target, relative to the root and resolved (see `_resolve`): refused
        unless it is a regular file of the tree."""
        if linkname.startswith("/"):
            raise ImageError(f"{what}: a hard link to an absolute path ({linkname!r})")
        rel_dir, base = posixpath.split(linkname)
        try:
            if base in ("", ".", ".."):
                raise _Unresolvable("is not a file")
            target = os.path.join(_resolve(self._root, rel_dir), base)
        except _Unresolvable as e:
            if e.outside:
                raise ImageError(
                    f"{what}: hard link to {linkname!r}, which is outside the destination: it {e}"
                ) from None
            raise ImageError(f"{what}: hard link to {linkname!r}, which {e}") from None
        if not (os.path.lexists(target) and stat.S_ISREG(os.lstat(target).st_mode)):
            raise ImageError(f"{what}: hard link to {linkname!r}, which is not a file of the tree")
        return target[len(self._root) + 1 :]


def _add_mount_points(root: str) -> None:
    """The root 0755, and the directories the sandbox mounts onto (an image's non-directory
    in their place is replaced)."""
    os.chmod(root, 0o755)
    for name, mode in _MOUNT_POINTS:
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            continue
        _remove(path)
        os.mkdir(path)
        os.chmod(path, mode)
