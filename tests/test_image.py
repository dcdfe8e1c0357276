"""nsfast.Image: OCI layouts, OCI archives and docker save tarballs, built offline here (umoci
and a static busybox, plus layers made with tarfile), unpacked into a per-session cache.

Malicious layers are checked against a sentinel directory outside the cache: whatever the
layer tries, the sentinel stays as it was and no temporary directory is left in the cache."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

import nsfast
from conftest import BUSYBOX, PYTHON_SRC, suite
from nsfast._image import Image, ImageConfig, ImageError, cache_dir, set_cache_dir

pytestmark = [
    *suite,
    pytest.mark.skipif(
        not hasattr(tarfile, "data_filter"),
        reason="nsfast.Image needs tarfile extraction filters (Python 3.9.17+, 3.10.12+, 3.11.4+)",
    ),
]

REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
APPLETS = ("sh", "ls", "cat", "echo", "env", "id", "pwd")

Member = Tuple[tarfile.TarInfo, bytes]


# --- building images ----------------------------------------------------------------------


def umoci(*args: object) -> None:
    subprocess.run(["umoci", *map(str, args)], check=True, capture_output=True)


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def put_blob(layout: Path, data: bytes) -> Tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    return digest, len(data)


def read_index(layout: Path) -> Dict[str, Any]:
    return json.loads((layout / "index.json").read_text())


def descriptor(layout: Path, tag: str) -> Dict[str, Any]:
    return next(d for d in read_index(layout)["manifests"] if d.get("annotations", {}).get(REF_NAME) == tag)


def manifest_of(layout: Path, tag: str) -> Dict[str, Any]:
    return json.loads(blob_path(layout, descriptor(layout, tag)["digest"]).read_bytes())


def config_of(layout: Path, tag: str) -> Dict[str, Any]:
    return json.loads(blob_path(layout, manifest_of(layout, tag)["config"]["digest"]).read_bytes())


def retag(
    layout: Path,
    tag: str,
    new_tag: str,
    *,
    manifest: Optional[Callable[[Dict[str, Any]], None]] = None,
    config: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> str:
    """Tag `new_tag` as image `tag` with its config and manifest changed by the callbacks,
    written as a valid layout (blobs by digest, index.json); the new manifest's digest."""
    m = manifest_of(layout, tag)
    if config is not None:
        c = config_of(layout, tag)
        config(c)
        m["config"]["digest"], m["config"]["size"] = put_blob(layout, json.dumps(c).encode())
    if manifest is not None:
        manifest(m)
    digest, size = put_blob(layout, json.dumps(m).encode())
    index = read_index(layout)
    index["manifests"] = [d for d in index["manifests"] if d.get("annotations", {}).get(REF_NAME) != new_tag]
    index["manifests"].append(
        {"mediaType": MANIFEST_TYPE, "digest": digest, "size": size, "annotations": {REF_NAME: new_tag}}
    )
    (layout / "index.json").write_text(json.dumps(index))
    return digest


def layer_tar(members: Sequence[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def add_layer(layout: Path, tag: str, new_tag: str, members: Sequence[Member]) -> str:
    """Tag `new_tag` as `tag` plus one gzip layer of `members`; the layer's digest."""
    raw = layer_tar(members)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    digest, size = put_blob(layout, gzip.compress(raw, mtime=0))

    def config(c: Dict[str, Any]) -> None:
        c["rootfs"]["diff_ids"].append(diff_id)
        c.setdefault("history", []).append({"created_by": "nsfast test layer"})

    retag(
        layout,
        tag,
        new_tag,
        config=config,
        manifest=lambda m: m["layers"].append({"mediaType": GZIP_LAYER, "digest": digest, "size": size}),
    )
    return digest


def reg(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid = len(data), mode, uid, gid
    return info, data


def dir_(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, b""


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE, mode: int = 0o777, uid: int = 0) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.uid = kind, target, mode, uid
    return info, b""


def node(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, b""


@pytest.fixture(scope="session", autouse=True)
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's image cache (never the user's)."""
    path = tmp_path_factory.mktemp("image-cache") / "cache"
    set_cache_dir(path)
    yield path
    set_cache_dir(None)


@pytest.fixture(scope="session")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout made by umoci: `base` (busybox, files, a config), `v2` (base, a umoci
    layer that deletes and adds files, and a layer with an opaque directory)."""
    if not shutil.which("umoci") or not os.path.exists(BUSYBOX):
        pytest.skip("umoci and a static busybox are needed")
    top = tmp_path_factory.mktemp("oci")
    lay, bundle = top / "layout", top / "bundle"
    umoci("init", "--layout", lay)
    umoci("new", "--image", f"{lay}:base")
    umoci("unpack", "--image", f"{lay}:base", bundle)
    root = bundle / "rootfs"
    for d in ("bin", "etc", "data/old", "work", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    os.symlink("/etc/alternatives/awk", root / "usr/bin/awk")  # absolute, as in real images
    (root / "etc/marker").write_text("from the image\n")
    (root / "etc/removed").write_text("deleted in v2\n")
    (root / "data/old/f").write_text("lower\n")
    (root / "data/keep").write_text("lower\n")
    umoci("repack", "--image", f"{lay}:base", bundle)
    umoci(
        "config",
        "--image",
        f"{lay}:base",
        "--config.env=FOO=bar",
        "--config.workingdir=/work",
        "--config.entrypoint=/bin/sh",
        "--config.cmd=-c",
        "--config.cmd=echo hi",
        "--config.user=1000:1000",
    )
    shutil.rmtree(bundle)
    umoci("unpack", "--image", f"{lay}:base", bundle)
    (root / "etc/removed").unlink()  # umoci writes a whiteout, etc/.wh.removed
    (root / "etc/added").write_text("added in v2\n")
    umoci("repack", "--image", f"{lay}:v2", bundle)
    # umoci writes no opaque markers: a layer of our own replaces data/'s contents.
    add_layer(
        lay, "v2", "v2", [dir_("data"), reg("data/.wh..wh..opq"), reg("data/new", b"upper\n", uid=1000, gid=1000)]
    )
    return lay


@pytest.fixture
def layout_copy(layout: Path, tmp_path: Path) -> Path:
    """A copy of the layout for tests that add or break images."""
    return Path(shutil.copytree(layout, tmp_path / "layout"))


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A host directory outside the cache that malicious layers aim at."""
    d = tmp_path / "sentinel"
    d.mkdir(mode=0o755)
    (d / "host-file").write_text("host\n")
    return d


def snapshot(d: Path) -> List[Tuple[str, int, int, bytes]]:
    """Names, modes, link counts and contents of everything under `d`, and `d`'s mode."""
    out = [(".", os.lstat(d).st_mode, 0, b"")]
    for p in sorted(d.rglob("*")):
        st = os.lstat(p)
        out.append((str(p.relative_to(d)), st.st_mode, st.st_nlink, p.read_bytes() if p.is_file() else b""))
    return out


def tree(root: str) -> Dict[str, Tuple[Any, ...]]:
    """What a root contains, but mtimes: type, mode, owner, content or link target."""
    out: Dict[str, Tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what: Any = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            else:
                what = None
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, what)
    return out


def chain_id(diff_ids: Sequence[str]) -> str:
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


def roots(cache: Path) -> List[str]:
    """The roots in the cache (none before its first use)."""
    return sorted(os.listdir(cache / "rootfs")) if (cache / "rootfs").exists() else []


def assert_clean(cache: Path, rootfs_before: List[str]) -> None:
    """No temporary directory left, no root added."""
    assert os.listdir(cache / "tmp") == []
    assert roots(cache) == rootfs_before


# --- loading ------------------------------------------------------------------------------


def test_oci_layout(layout: Path, image_cache: Path) -> None:
    img = Image(layout, "base")
    config = config_of(layout, "base")
    assert img.path == str(layout) and img.ref == "base"
    assert img.digest == descriptor(layout, "base")["digest"]
    assert img.diff_ids == tuple(config["rootfs"]["diff_ids"])
    assert img.config == ImageConfig(
        env=("FOO=bar",), entrypoint=("/bin/sh",), cmd=("-c", "echo hi"), working_dir="/work", user="1000:1000"
    )
    assert img.rootfs == str(image_cache / "rootfs" / chain_id(img.diff_ids).split(":")[1])
    assert repr(img) == f"Image({str(layout)!r}, ref='base', digest={img.digest!r})"
    root = Path(img.rootfs)
    assert (root / "etc/marker").read_text() == "from the image\n"
    assert (root / "bin/busybox").stat().st_mode & 0o111
    assert os.readlink(root / "bin/sh") == "busybox"
    assert os.readlink(root / "usr/bin/awk") == "/etc/alternatives/awk"
    assert {n: stat.S_IMODE(os.lstat(root / n).st_mode) for n in ("", "proc", "dev", "tmp")} == {
        "": 0o755,
        "proc": 0o755,
        "dev": 0o755,
        "tmp": 0o1777,
    }
    assert stat.S_IMODE(os.stat(image_cache).st_mode) == 0o700


def test_second_load_reuses_the_root(layout: Path) -> None:
    first = Image(layout, "base")
    probe = Path(first.rootfs) / "reuse-probe"  # an unpack would not make it
    probe.touch()
    try:
        before = os.stat(first.rootfs)
        again = Image(layout, "base")
        assert again.rootfs == first.rootfs and probe.exists()
        assert (os.stat(again.rootfs).st_ino, os.stat(again.rootfs).st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    finally:
        probe.unlink()


def test_whiteouts_and_opaque_directories(layout: Path) -> None:
    root = Path(Image(layout, "v2").rootfs)
    assert not (root / "etc/removed").exists()
    assert (root / "etc/added").read_text() == "added in v2\n"
    assert (root / "etc/marker").exists()
    assert sorted(os.listdir(root / "data")) == ["new"]  # the lower data/old, data/keep are gone
    st = os.stat(root / "data/new")
    assert (root / "data/new").read_text() == "upper\n" and (st.st_uid, st.st_gid) == (1000, 1000)
    assert (Path(Image(layout, "base").rootfs) / "etc/removed").exists()  # its own chain


def write_docker_save(layout: Path, out: Path) -> Dict[str, bytes]:
    """A docker save tarball of `base` and `v2`: configs named <digest>.json, older layers
    as uncompressed <n>/layer.tar, the last of v2 as a gzip blobs/sha256/<hex> (docker 25+)."""
    entries, configs = [], {}
    with tarfile.open(out, "w") as t:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

        for tag in ("base", "v2"):
            m = manifest_of(layout, tag)
            config = blob_path(layout, m["config"]["digest"]).read_bytes()
            config_name = m["config"]["digest"].split(":")[1] + ".json"
            configs[tag] = config
            add(config_name, config)
            names = []
            for i, layer in enumerate(m["layers"]):
                data = blob_path(layout, layer["digest"]).read_bytes()
                if tag == "v2" and i == len(m["layers"]) - 1:
                    names.append("blobs/sha256/" + layer["digest"].split(":")[1])
                else:
                    names.append(f"{tag}{i}/layer.tar")
                    data = gzip.decompress(data)
                add(names[-1], data)
            entries.append({"Config": config_name, "RepoTags": [f"nsfast-test:{tag}"], "Layers": names})
        add("manifest.json", json.dumps(entries).encode())
    return configs


def test_docker_save_tarball(layout: Path, tmp_path: Path) -> None:
    tar = tmp_path / "saved.tar"
    configs = write_docker_save(layout, tar)
    cache = tmp_path / "cache"  # its own: the same chain must be unpacked from the tarball
    img = Image(tar, "nsfast-test:v2", cache=cache)
    oci = Image(layout, "v2")
    assert img.rootfs.startswith(str(cache)) and tree(img.rootfs) == tree(oci.rootfs)
    assert img.digest == "sha256:" + hashlib.sha256(configs["v2"]).hexdigest()
    assert (img.config, img.diff_ids) == (oci.config, oci.diff_ids)
    with pytest.raises(ImageError, match="pass ref= one of: nsfast-test:base, nsfast-test:v2"):
        Image(tar, cache=cache)
    with pytest.raises(ImageError, match="no image 'nsfast-test:v3'"):
        Image(tar, "nsfast-test:v3", cache=cache)


def test_docker_save_layer_verified_against_diff_id(layout: Path, tmp_path: Path) -> None:
    tar = tmp_path / "saved.tar"
    write_docker_save(layout, tar)
    with tarfile.open(tar) as t:
        members = {m.name: t.extractfile(m).read() for m in t if m.isreg()}  # type: ignore[union-attr]
    members["base0/layer.tar"] = layer_tar([reg("etc/marker", b"swapped\n")])
    with tarfile.open(tar, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    cache = tmp_path / "cache"
    with pytest.raises(
        ImageError, match=r"layer base0/layer.tar: uncompressed content is sha256:\w+, the config's diff_id"
    ):
        Image(tar, "nsfast-test:base", cache=cache)
    assert_clean(cache, [])


def test_oci_archive(layout: Path, tmp_path: Path) -> None:
    tar = tmp_path / "oci.tar"
    with tarfile.open(tar, "w") as t:
        t.add(layout, arcname=".")
    img = Image(tar, "v2")
    assert img.digest == descriptor(layout, "v2")["digest"] and img.rootfs == Image(layout, "v2").rootfs


def test_ref_selection(layout: Path) -> None:
    with pytest.raises(ImageError, match=f"^{layout}: holds 2 images, pass ref= one of: base, v2$"):
        Image(layout)
    with pytest.raises(ImageError, match="no image 'v3'; available: base, v2"):
        Image(layout, "v3")
    digest = descriptor(layout, "v2")["digest"]
    assert Image(layout, digest).digest == digest
    with pytest.raises(ImageError, match="no image 'sha256:0000"):
        Image(layout, "sha256:" + "0" * 64)
    with pytest.raises(ImageError, match="ref: not a sha256 digest"):
        Image(layout, "sha256:../../../etc/passwd")


def test_multi_platform_index(layout_copy: Path) -> None:
    base, v2 = descriptor(layout_copy, "base"), descriptor(layout_copy, "v2")
    strip = lambda d: {k: d[k] for k in ("mediaType", "digest", "size")}
    nested = {
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [
            {**strip(base), "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {**strip(v2), "platform": {"os": "linux", "architecture": "amd64"}},
            {**strip(base), "platform": {"os": "unknown", "architecture": "unknown"}},  # buildx attestations
        ],
    }
    digest, size = put_blob(layout_copy, json.dumps(nested).encode())
    entry = {"mediaType": INDEX_TYPE, "digest": digest, "size": size, "annotations": {REF_NAME: "multi"}}
    (layout_copy / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    assert Image(layout_copy, platform="linux/arm64").digest == base["digest"]  # the only entry: no ref needed
    assert Image(layout_copy, "multi", platform="linux/arm64/v8").digest == base["digest"]
    assert Image(layout_copy, "multi", platform="linux/amd64").digest == v2["digest"]
    host = {"x86_64": v2, "aarch64": base}.get(platform.machine())
    if host is not None:
        assert Image(layout_copy, "multi").digest == host["digest"]
    with pytest.raises(
        ImageError,
        match=f"index {digest}: no image for linux/s390x; it has: linux/arm64/v8, linux/amd64, unknown/unknown",
    ):
        Image(layout_copy, platform="linux/s390x")
    with pytest.raises(ImageError, match="no image for linux/arm64/v7"):
        Image(layout_copy, platform="linux/arm64/v7")
    with pytest.raises(ImageError, match="platform must be 'os/architecture"):
        Image(layout_copy, platform="arm64")


def test_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not an OCI image layout directory nor a readable tar archive"):
        Image(tmp_path / "missing")
    (tmp_path / "file").write_text("not a tar")
    with pytest.raises(ImageError, match="not an OCI image layout directory nor a readable tar archive"):
        Image(tmp_path / "file")
    with pytest.raises(ImageError, match=f"{tmp_path}: oci-layout is missing"):
        Image(tmp_path)


# --- verification -------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_layer_blob(layout_copy: Path, tmp_path: Path) -> None:
    layer = manifest_of(layout_copy, "base")["layers"][0]["digest"]
    flip_byte(blob_path(layout_copy, layer), blob_path(layout_copy, layer).stat().st_size // 2)
    cache = tmp_path / "cache"  # its own: the session cache may hold this chain already
    with pytest.raises(ImageError, match=f"^{layout_copy}: layer {layer}: content does not match its digest"):
        Image(layout_copy, "base", cache=cache)
    assert_clean(cache, [])


def test_damaged_manifest_blob(layout_copy: Path) -> None:
    manifest = descriptor(layout_copy, "v2")["digest"]
    flip_byte(blob_path(layout_copy, manifest), 10)
    with pytest.raises(ImageError, match=f"manifest {manifest}: content does not match its digest"):
        Image(layout_copy, "v2")


def test_wrong_sizes_and_diff_ids(layout_copy: Path, image_cache: Path) -> None:
    before = roots(image_cache)

    def bigger(m: Dict[str, Any]) -> None:
        m["config"]["size"] += 1

    retag(layout_copy, "base", "big-config", manifest=bigger)
    with pytest.raises(ImageError, match=r"config sha256:\w+: \d+ bytes, its descriptor says \d+"):
        Image(layout_copy, "big-config")

    def smaller(m: Dict[str, Any]) -> None:
        m["layers"][0]["size"] -= 1

    retag(layout_copy, "base", "small-layer", manifest=smaller)
    layer = manifest_of(layout_copy, "base")["layers"][0]["digest"]
    with pytest.raises(ImageError, match=f"layer {layer}: larger than the"):
        Image(layout_copy, "small-layer", cache=layout_copy.parent / "cache")

    def wrong_diff_id(c: Dict[str, Any]) -> None:
        c["rootfs"]["diff_ids"][0] = "sha256:" + "1" * 64

    retag(layout_copy, "base", "bad-diff", config=wrong_diff_id)
    with pytest.raises(
        ImageError, match=f"layer {layer}: uncompressed content is sha256:\\w+, the config's diff_id says sha256:1111"
    ):
        Image(layout_copy, "bad-diff")
    assert_clean(image_cache, before)


@pytest.mark.parametrize(
    "digest",
    ["sha256:../../../../etc/passwd", "sha256:" + "A" * 64, "sha512:" + "0" * 128, "sha256:" + "0" * 63, None, 7],
)
def test_bad_digest_strings(layout_copy: Path, digest: Any) -> None:
    def layer(m: Dict[str, Any]) -> None:
        m["layers"][0]["digest"] = digest

    retag(layout_copy, "base", "bad", manifest=layer)
    with pytest.raises(
        ImageError, match=r"layer: digest: not a sha256 digest \('sha256:' and 64 lowercase hex digits\)"
    ):
        Image(layout_copy, "bad")
    index = read_index(layout_copy)
    index["manifests"][0]["digest"] = digest
    (layout_copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="index.json manifest: digest: not a sha256 digest"):
        Image(layout_copy, "base")


def test_layer_media_types(layout_copy: Path) -> None:
    def media(kind: str) -> Callable[[Dict[str, Any]], None]:
        return lambda m: m["layers"][0].update(mediaType=kind)

    retag(layout_copy, "base", "zstd", manifest=media("application/vnd.oci.image.layer.v1.tar+zstd"))
    with pytest.raises(ImageError, match=r"layer sha256:\w+: zstd layers are not supported"):
        Image(layout_copy, "zstd")
    retag(layout_copy, "base", "odd", manifest=media("application/x-odd"))
    with pytest.raises(ImageError, match="unsupported media type 'application/x-odd'"):
        Image(layout_copy, "odd")
    # Docker's media type says gzip; uncompressed data is told by its magic bytes.
    add_layer(layout_copy, "base", "plain", [reg("etc/plain", b"plain\n")])
    m = manifest_of(layout_copy, "plain")
    raw = gzip.decompress(blob_path(layout_copy, m["layers"][-1]["digest"]).read_bytes())
    digest, size = put_blob(layout_copy, raw)
    m["layers"][-1] = {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": digest, "size": size}
    retag(layout_copy, "plain", "plain", manifest=lambda x: x.update(layers=m["layers"]))
    assert (Path(Image(layout_copy, "plain").rootfs) / "etc/plain").read_text() == "plain\n"


# --- malicious layers ---------------------------------------------------------------------

UP = "../" * 64  # from the root being unpacked, far enough up to reach /


def s(sentinel: Path) -> str:
    return str(sentinel).lstrip("/")


# Each: (layers on top of base, as a function of the sentinel; text the error must contain)
EVIL: Dict[str, Tuple[Callable[[Path], List[List[Member]]], str]] = {
    "dotdot": (lambda d: [[reg(UP + s(d) + "/pwned", b"x")]], "'..' in a member path"),
    "dotdot-inside": (lambda d: [[reg("etc/../../pwned", b"x")]], "'..' in a member path"),
    "absolute-path": (lambda d: [[reg(f"{d}/pwned", b"x")]], "absolute member path"),
    "through-root-symlink": (lambda d: [[link("a", "/")], [reg(f"a/{s(d)}/pwned", b"x")]], "resolves outside the root"),
    "through-host-symlink": (lambda d: [[link("s", str(d))], [reg("s/pwned", b"x")]], "resolves outside the root"),
    "through-symlink-same-layer": (lambda d: [[link("s", str(d)), reg("s/pwned", b"x")]], "resolves outside the root"),
    "through-relative-symlink": (
        lambda d: [[link("r", UP + s(d))], [reg("r/pwned", b"x")]],
        "resolves outside the root",
    ),
    "mkdir-through-symlink": (lambda d: [[link("s", str(d))], [dir_("s/newdir")]], "resolves outside the root"),
    "hardlink-up": (lambda d: [[link("h", UP + s(d) + "/host-file", tarfile.LNKTYPE)]], "outside the destination"),
    "hardlink-absolute": (lambda d: [[link("h", f"{d}/host-file", tarfile.LNKTYPE)]], "link to an absolute path"),
    "hardlink-through-symlink": (
        lambda d: [[link("s", str(d)), link("h", "s/host-file", tarfile.LNKTYPE)]],
        "outside the destination",
    ),
    "hardlink-to-nothing": (lambda d: [[link("h", "no/such/file", tarfile.LNKTYPE)]], "not a file of the tree"),
    "char-device": (lambda d: [[node("dev/evil", tarfile.CHRTYPE)]], "device nodes and fifos are not allowed"),
    "block-device": (lambda d: [[node("evil", tarfile.BLKTYPE)]], "device nodes and fifos are not allowed"),
    "fifo": (lambda d: [[node("evil", tarfile.FIFOTYPE)]], "device nodes and fifos are not allowed"),
    "whiteout-through-symlink": (
        lambda d: [[link("s", str(d))], [reg("s/.wh.host-file")]],
        "resolves outside the root",
    ),
    "whiteout-up": (lambda d: [[reg(UP + s(d) + "/.wh.host-file")]], "'..' in a member path"),
    "whiteout-of-dotdot": (lambda d: [[reg("etc/.wh...")]], "a whiteout of '..'"),
    # Deeper than any image goes: its cleanup once recursed past Python's stack, replaced the
    # error with a RecursionError, left the unpack directory locked, and then every later new
    # image in the cache failed on the sweep of it.
    "deeper-than-256": (lambda d: [[reg("a/" * 300 + "f", b"x")]], "deeper than 256 levels"),
    "deep-through-symlinks": (
        lambda d: [[reg("a/" * 200 + "f"), link("s", "a/" * 200), reg("s/" + "b/" * 100 + "f")]],
        "resolves deeper than 256 levels",
    ),
    "symlink-chain": (
        lambda d: [[link(f"s{i}", f"s{i + 1}") for i in range(1200)] + [reg("s0/x")]],
        "does not resolve",
    ),
    # Each symlink names the next 20 times: realpath walked 20^50 names per member (the
    # audit's 400 of 600 took 0.7 s a whiteout); the kernel, as nsfast now, stops at 40.
    "symlink-fan-whiteout": (
        lambda d: [
            [link(f"L{i}", "." if i == 50 else f"L{i + 1}/" * 20) for i in range(50, -1, -1)],
            [reg("L0/.wh.x")],
        ],
        "its directory does not resolve (more than 40 symbolic links)",
    ),
    "symlink-fan-member": (
        lambda d: [[link(f"L{i}", "." if i == 50 else f"L{i + 1}/" * 20) for i in range(50, -1, -1)], [reg("L0/f")]],
        "its directory does not resolve (more than 40 symbolic links)",
    ),
    "symlink-fan-hardlink": (
        lambda d: [
            [reg("f", b"x")] + [link(f"L{i}", "." if i == 50 else f"L{i + 1}/" * 20) for i in range(50, -1, -1)],
            [link("h", "L0/f", tarfile.LNKTYPE)],
        ],
        "does not resolve (more than 40 symbolic links)",
    ),
    # Few symlinks, each a long detour: bounded by the names looked up.
    "symlink-detours": (
        lambda d: [
            [dir_("d")] + [link(f"D{i}", "d/.." + "/d/.." * 600 + f"/D{i + 1}") for i in range(8)],
            [reg("D0/x")],
        ],
        "does not resolve (it takes more than 1024 lookups)",
    ),
    # A missing directory and '..' in a symlink's target: what follows it is looked up again.
    "whiteout-through-missing-dotdot": (
        lambda d: [[link("evil", str(d)), link("s", "missing/../evil")], [reg("s/.wh.host-file")]],
        "resolves outside the root",
    ),
    "symlink-target-too-long": (lambda d: [[link("s", "a/" * 2048)]], "a symlink to a target of more than 4095 bytes"),
}


@pytest.mark.parametrize("case", sorted(EVIL))
def test_malicious_layer_refused(case: str, layout_copy: Path, sentinel: Path, image_cache: Path) -> None:
    build, needle = EVIL[case]
    before, host = roots(image_cache), snapshot(sentinel)
    tag = "base"
    for i, members in enumerate(build(sentinel)):
        digest = add_layer(layout_copy, tag, f"evil{i}", members)
        tag = f"evil{i}"
    with pytest.raises(ImageError) as e:
        Image(layout_copy, tag)
    msg = str(e.value)
    # The image, the layer and the member are named.
    assert msg.startswith(f"{layout_copy}: layer {digest}: ") and needle in msg, msg
    assert repr(members[-1][0].name) in msg, msg
    assert snapshot(sentinel) == host
    assert_clean(image_cache, before)


def test_replacing_never_follows_symlinks(layout_copy: Path, sentinel: Path) -> None:
    """A later entry replaces an earlier one of another type, never writing through it."""
    host = snapshot(sentinel)
    lower = [
        link("s", str(sentinel)),  # a symlink to a host directory: allowed, not followed
        link("f", f"{sentinel}/host-file"),
        link("a", "/"),
        link("o", str(sentinel)),
        dir_("d"),
        reg("d/child"),
        dir_("d2"),
        reg("d2/child"),
        reg("x", b"file"),
    ]
    upper = [
        dir_("s", 0o700),
        reg("s/inside", b"in"),
        reg("f", b"new"),
        reg("o/.wh..wh..opq"),  # the opaque marker of a directory that replaces a symlink
        dir_("o"),
        reg("o/z"),
        reg("d", b"now a file"),
        link("d2", "/etc"),
        dir_("x"),
        reg("x/y"),
    ]
    add_layer(layout_copy, "base", "lower", lower)
    add_layer(layout_copy, "lower", "upper", upper)
    low = Path(Image(layout_copy, "lower").rootfs)
    assert os.readlink(low / "s") == str(sentinel) and os.readlink(low / "a") == "/"
    root = Path(Image(layout_copy, "upper").rootfs)
    assert snapshot(sentinel) == host
    assert not (root / "s").is_symlink() and stat.S_IMODE(os.lstat(root / "s").st_mode) == 0o700
    assert os.listdir(root / "s") == ["inside"] and os.listdir(root / "o") == ["z"]
    assert not (root / "f").is_symlink() and (root / "f").read_bytes() == b"new"
    assert os.readlink(root / "a") == "/" and os.readlink(root / "d2") == "/etc"
    assert (root / "d").read_bytes() == b"now a file"
    assert os.listdir(root / "x") == ["y"]


def test_modes_and_owners(layout_copy: Path) -> None:
    add_layer(
        layout_copy,
        "base",
        "modes",
        [
            reg("bin/suid", b"#!/bin/sh\n", mode=0o4755),
            reg("bin/sgid", mode=0o2711),
            link("bin/suid-link", "bin/suid", tarfile.LNKTYPE, mode=0o4755),
            dir_("sticky", 0o1777),
            dir_("setgid-dir", 0o2775),
            reg("group-writable", mode=0o664),
            reg("private", mode=0o600),
            reg("owned", uid=1000, gid=2000),
            link("owned-link", "owned", uid=1000),
        ],
    )
    root = Path(Image(layout_copy, "modes").rootfs)
    mode = lambda n: stat.S_IMODE(os.lstat(root / n).st_mode)
    assert {n: mode(n) for n in ("bin/suid", "bin/sgid", "sticky", "setgid-dir", "group-writable", "private")} == {
        "bin/suid": 0o755,
        "bin/sgid": 0o711,
        "sticky": 0o1777,
        "setgid-dir": 0o775,
        "group-writable": 0o664,
        "private": 0o600,
    }
    assert os.stat(root / "bin/suid-link").st_ino == os.stat(root / "bin/suid").st_ino
    st = os.stat(root / "owned")
    assert (st.st_uid, st.st_gid) == (1000, 2000) and os.lstat(root / "owned-link").st_uid == 1000


NOBODY = 65534


@contextlib.contextmanager
def effective_nobody() -> Iterator[None]:
    """This process as effective uid/gid nobody (tarfile and _image look at geteuid())."""
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory nobody owns (pytest's tmp_path is under a 0700 root directory)."""
    d = Path(tempfile.mkdtemp(prefix="nsfast-image-test-"))
    os.chown(d, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d)


def test_unprivileged_unpack(layout_copy: Path, nobody_dir: Path) -> None:
    """Not root: no chown (files are the caller's), and directories stay writable to the
    caller, so a later layer can change a read-only directory."""
    add_layer(layout_copy, "base", "ro1", [dir_("ro", 0o555), reg("ro/f", mode=0o444)])
    add_layer(layout_copy, "ro1", "ro2", [reg("ro/.wh.f"), reg("ro/g", b"g", uid=1000)])
    layout = Path(shutil.copytree(layout_copy, nobody_dir / "layout"))
    for p in [layout, *layout.rglob("*")]:
        os.chown(p, NOBODY, NOBODY)
    cache = nobody_dir / "cache"
    with effective_nobody():
        root = Path(Image(layout, "ro2", cache=cache).rootfs)
    assert os.listdir(root / "ro") == ["g"]
    assert stat.S_IMODE(os.stat(root / "ro").st_mode) == 0o755
    assert {os.lstat(p).st_uid for p in (root, root / "ro/g", root / "bin/busybox", root / "bin/sh")} == {NOBODY}
    assert os.listdir(cache / "tmp") == []


# --- the cache ----------------------------------------------------------------------------


def test_concurrent_loads_share_one_root(layout: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    barrier, roots, errors = threading.Barrier(3), [], []

    def load() -> None:
        barrier.wait()
        try:
            roots.append(Image(layout, "v2", cache=cache).rootfs)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(roots)) == 1
    assert_clean(cache, [os.path.basename(roots[0])])


def test_crash_leftovers_are_never_used(layout: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    Image(layout, "base", cache=cache)
    shutil.rmtree(cache / "rootfs")
    (cache / "rootfs").mkdir()
    left = cache / "tmp" / "unpack-crashed" / "root"
    left.mkdir(parents=True)
    (left / "half-written").touch()
    root = Image(layout, "base", cache=cache).rootfs
    assert not os.path.exists(os.path.join(root, "half-written")) and (left / "half-written").exists()


def test_a_killed_loads_leftovers_are_swept_a_live_ones_kept(layout_copy: Path, tmp_path: Path) -> None:
    """A load stopped mid-unpack keeps its directory (its flock is held); once it is SIGKILLed,
    the next load that unpacks removes what it left."""
    add_layer(layout_copy, "base", "big", [reg("zeros", bytes(256 << 20))])
    cache = tmp_path / "cache"
    code = f"from nsfast import Image; Image({str(layout_copy)!r}, 'big', cache={str(cache)!r})"
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": PYTHON_SRC})
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob("tmp/unpack-*/.lock")):
            assert p.poll() is None and time.monotonic() < deadline, "the load ended before it was seen unpacking"
            time.sleep(0.001)
        p.send_signal(signal.SIGSTOP)
        [work] = cache.glob("tmp/unpack-*")
        Image(layout_copy, "base", cache=cache)  # unpacks, so sweeps
        assert work.exists(), "a live unpack's directory was removed"
        p.kill()
        p.wait()
        Image(layout_copy, "v2", cache=cache)
        assert not work.exists() and list((cache / "tmp").iterdir()) == []
        root = Image(layout_copy, "big", cache=cache).rootfs  # the lock stays out of the root
        assert os.path.getsize(os.path.join(root, "zeros")) == 256 << 20 and not os.path.exists(f"{root}/.lock")
    finally:
        p.kill()
        p.wait()


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, image_cache: Path, tmp_path: Path) -> None:
    assert cache_dir() == str(image_cache)
    try:
        set_cache_dir(None)
        monkeypatch.setenv("HOME", "/home/someone")
        monkeypatch.delenv("NSFAST_IMAGE_CACHE", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
        assert cache_dir() == "/home/someone/.cache/nsfast/images"
        monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
        assert cache_dir() == "/xdg/nsfast/images"
        monkeypatch.setenv("NSFAST_IMAGE_CACHE", "/env/cache")
        assert cache_dir() == "/env/cache"
        set_cache_dir(tmp_path / "explicit")
        assert cache_dir() == str(tmp_path / "explicit")
    finally:
        set_cache_dir(image_cache)


def test_cache_others_can_write_is_refused(layout: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ImageError, match=f"image cache {shared}: must be owned by uid 0 and writable by it alone"):
        Image(layout, "base", cache=shared)
    assert os.listdir(shared) == []


def test_sandbox_runs_an_image(layout: Path) -> None:
    pytest.importorskip("nsfast._core")
    import nsfast

    r = nsfast.run(
        ["/bin/sh", "-c", "echo hi; cat /etc/marker"], rootfs=Image(layout, "v2").rootfs, capture_output=True
    )
    assert (r.returncode, r.stdout) == (0, b"hi\nfrom the image\n"), r.stderr


# --- rootfs=Image: the config as defaults ----------------------------------------------------


def test_image_config_applies_as_defaults(layout: Path) -> None:
    import nsfast
    from nsfast._spec import DEFAULT_PATH

    img = Image(layout, "v2")
    # No command: Entrypoint + Cmd ("/bin/sh -c 'echo hi'"), as docker run does.
    r = nsfast.run([], rootfs=img, capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "")
    r = nsfast.run(["/bin/sh", "-c", "id -u; id -g; pwd; echo $FOO; echo $PATH"], rootfs=img, capture_output=True,
                   text=True)  # fmt: skip
    assert r.stdout.splitlines() == ["1000", "1000", "/work", "bar", DEFAULT_PATH], r.stderr
    # What the caller gives wins.
    r = nsfast.run(["/bin/sh", "-c", "id -u; pwd; echo ${FOO-unset}"], rootfs=img, uid=0, gid=0, cwd="/etc",
                   env={"PATH": "/bin"}, capture_output=True, text=True)  # fmt: skip
    assert r.stdout.splitlines() == ["0", "/etc", "unset"], r.stderr
    spec = nsfast.Spec(rootfs=img)
    assert spec.image is img and spec.rootfs == img.rootfs
    assert spec.replace(hostname="box").image is img and spec.replace(hostname="box").uid == 1000


def test_an_image_is_never_written(layout: Path) -> None:
    import nsfast

    img = Image(layout, "v2")
    before = tree(img.rootfs)
    with pytest.raises(nsfast.SpecError, match="readonly_root: False would let the sandbox write into the image cache"):
        nsfast.Spec(rootfs=img, readonly_root=False)
    r = nsfast.run(["/bin/sh", "-c", "echo w > /etc/marker && rm /etc/added && cat /etc/marker; touch /x 2>&1"],
                   rootfs=img, overlay=True, uid=0, gid=0, capture_output=True, text=True)  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "w\n"), r.stderr
    r = nsfast.run(["/bin/sh", "-c", "touch /etc/x"], rootfs=img, capture_output=True, text=True)
    assert "Read-only file system" in r.stderr
    assert tree(img.rootfs) == before


def test_image_user_names_are_read_inside_the_image(layout_copy: Path, sentinel: Path) -> None:
    """User "app" comes from the image's /etc/passwd; one that is a symlink to a host file
    (which names "evil") is resolved inside the image, so the host's file is never read."""
    import nsfast

    host_passwd = sentinel / "passwd"
    host_passwd.write_text("evil:x:4242:4242::/:/bin/sh\n")
    add_layer(layout_copy, "base", "named", [reg("etc/passwd", b"app:x:1234:99::/work:/bin/sh\n"),
                                             reg("etc/group", b"staff:x:77:\n")])  # fmt: skip
    retag(layout_copy, "named", "named", config=lambda c: c["config"].update(User="app"))
    retag(layout_copy, "named", "grouped", config=lambda c: c["config"].update(User="app:staff"))
    add_layer(layout_copy, "base", "evil", [link("etc/passwd", str(host_passwd))])
    retag(layout_copy, "evil", "evil", config=lambda c: c["config"].update(User="evil"))
    assert nsfast.Spec(rootfs=Image(layout_copy, "named"))._cap_mask == 0
    spec = nsfast.Spec(rootfs=Image(layout_copy, "named"))
    assert (spec.uid, spec.gid) == (1234, 99)
    spec = nsfast.Spec(rootfs=Image(layout_copy, "grouped"))
    assert (spec.uid, spec.gid) == (1234, 77)
    with pytest.raises(nsfast.SpecError, match="User 'evil': no user 'evil' in the image's /etc/passwd"):
        nsfast.Spec(rootfs=Image(layout_copy, "evil"))


def test_cli_image_flag(layout: Path, image_cache: Path) -> None:
    import sys

    env = {**os.environ, "NSFAST_IMAGE_CACHE": str(image_cache)}
    run = [sys.executable, "-m", "nsfast", "run"]
    r = subprocess.run([*run, "--image", f"{layout}:v2"], capture_output=True, text=True, env=env, cwd="/")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "")
    # (Its User, uid 1000, may not write to /: as in docker; root inside may.)
    r = subprocess.run([*run, "--image", f"{layout}:v2", "--overlay", "--uid", "0", "--gid", "0", "--", "/bin/sh", "-c",
                        "echo o > /o; cat /o"],
                       capture_output=True, text=True, env=env, cwd="/")  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "o\n"), r.stderr
    r = subprocess.run([*run, "--image", f"{layout}:nope"], capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 125 and "nope" in r.stderr
    r = subprocess.run([*run, "--image", f"{layout}:v2", "--rootfs", "/", "--", "true"], capture_output=True,
                       text=True, env=env, cwd="/")  # fmt: skip
    assert (r.returncode, r.stderr) == (125, "nsfast: --image and --rootfs: one root only (the image is its own)\n")


def test_configure_image_cache(tmp_path: Path, image_cache: Path) -> None:
    import nsfast
    from nsfast import _cgroup

    cgroup_root = _cgroup._configured_root  # the session's (conftest's), put back after
    try:
        nsfast.configure(image_cache=str(tmp_path / "other"))
        assert cache_dir() == str(tmp_path / "other")
        assert _cgroup._configured_root == cgroup_root  # one setting leaves the other alone
        nsfast.configure(cgroup_root=cgroup_root)
        assert cache_dir() == str(tmp_path / "other")
    finally:
        set_cache_dir(image_cache)
        nsfast.configure(cgroup_root=cgroup_root)


def test_a_decompression_bomb_is_stopped_at_max_size(layout_copy: Path, image_cache: Path) -> None:
    """A layer of 64 MiB of zeros is a 64 KiB gzip blob: the unpack stops at max_size, and
    nothing of it stays in the cache."""
    add_layer(layout_copy, "base", "bomb", [reg("zeros", bytes(64 << 20))])
    before = roots(image_cache)
    with pytest.raises(ImageError, match="take more than max_size uncompressed"):
        Image(layout_copy, "bomb", max_size=16 << 20)
    assert_clean(image_cache, before)
    assert Image(layout_copy, "bomb", max_size=128 << 20).rootfs


def test_a_layer_of_empty_directories_is_charged_for_its_disk(layout_copy: Path, image_cache: Path) -> None:
    """An empty directory is 512 tar bytes and a 4 KiB block (and an inode) unpacked: a layer
    of them took 8 times max_size on disk. Each entry is charged a block now."""
    before = roots(image_cache)
    add_layer(layout_copy, "base", "dirs", [dir_(f"d{i}") for i in range(4096)])
    layers = manifest_of(layout_copy, "dirs")["layers"]
    tar_bytes = sum(len(gzip.decompress(blob_path(layout_copy, layer["digest"]).read_bytes())) for layer in layers)
    with pytest.raises(ImageError, match="more than max_size unpacked"):
        Image(layout_copy, "dirs", max_size=tar_bytes + (1 << 20))  # room for the tar, not the blocks
    assert_clean(image_cache, before)
    entries = 4096 + 4096  # the dirs, and room for the base layer's
    assert Image(layout_copy, "dirs", max_size=tar_bytes + entries * 4096).rootfs


def test_a_layout_file_is_looked_up_inside_the_layout(layout_copy: Path, tmp_path: Path) -> None:
    """index.json a symlink to a host file: once read wherever it led, and one that blocks on
    read (a tracing pipe, /proc/kmsg: regular files to stat) hung Image() for good. Symlinks
    resolve inside the layout now, and only a regular file is opened."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "fifo")
    (outside / "index.json").write_text((layout_copy / "index.json").read_text())
    for target in (outside / "fifo", outside / "index.json"):
        (layout_copy / "index.json").unlink()
        os.symlink(target, layout_copy / "index.json")
        with pytest.raises(ImageError, match=r"index.json is missing"):
            Image(layout_copy, "base")


def test_hostile_json_and_config_values_are_typed_errors(layout_copy: Path, tmp_path: Path) -> None:
    """Each once escaped as a raw RecursionError, ValueError or TypeError."""
    deep = layout_copy / "deep"
    shutil.copytree(layout_copy, deep)
    (deep / "index.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ImageError, match="nested deeper"):
        Image(deep)
    retag(layout_copy, "base", "odd-user", config=lambda c: c["config"].update(User="\u00b2"))
    with pytest.raises(nsfast.SpecError, match="no user '\u00b2'"):
        nsfast.Spec(rootfs=Image(layout_copy, "odd-user"))
    write_docker_save(layout_copy, tmp_path / "save.tar")
    with tarfile.open(tmp_path / "save.tar") as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
    manifest[0]["RepoTags"] = 5
    odd = tmp_path / "odd.tar"
    with tarfile.open(tmp_path / "save.tar") as src, tarfile.open(odd, "w") as dst:
        for m in src:
            data = json.dumps(manifest).encode() if m.name == "manifest.json" else src.extractfile(m).read()  # type: ignore[union-attr]
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(ImageError, match="no image 'nsfast-test:base'"):
        Image(odd, "nsfast-test:base")


def test_a_cache_whose_subdirectories_others_own_is_refused(tmp_path: Path, layout: Path) -> None:
    """What is found in rootfs/ is used unverified: only the top directory's owner and mode
    were checked, so another user who owned rootfs/ could plant the root of a public image."""
    cache = tmp_path / "cache"
    (cache / "rootfs").mkdir(parents=True, mode=0o700)
    os.chmod(cache, 0o700)
    os.chown(cache / "rootfs", 65534, 65534)
    with pytest.raises(ImageError, match="rootfs/ must be a directory owned by uid"):
        Image(layout, "base", cache=cache)


def test_an_image_root_named_by_its_path_is_not_writable(layout: Path) -> None:
    """rootfs=img.rootfs (a str) with readonly_root=False skipped the guard rootfs=img has:
    the sandbox wrote into the cached root every later sandbox of the image runs on."""
    img = Image(layout, "base")
    with pytest.raises(nsfast.SpecError, match="write into the image cache"):
        nsfast.Spec(rootfs=img.rootfs, readonly_root=False)
    assert nsfast.Spec(rootfs=img.rootfs, overlay=True).overlay


def test_no_mount_writes_into_the_image_cache(layout: Path, tmp_path: Path) -> None:
    """(Found by an audit.) Only a writable root was refused: a writable Bind of a cached
    root (or of a directory in it, with the image as the root), an Overlay committing into
    it, or an overlay_upper in it let one sandbox rewrite what every later sandbox of the
    image runs on. Read-only binds and Overlays without commit stay allowed."""
    img = Image(layout, "base", cache=tmp_path / "c")
    etc = os.path.join(img.rootfs, "etc")
    for spec in (
        dict(mounts=[nsfast.Bind(img.rootfs, "/mnt", readonly=False)]),
        dict(mounts=[nsfast.Overlay(img.rootfs, "/mnt", commit=True)]),
        dict(image=img, mounts=[nsfast.Bind(etc, "/etc", readonly=False)]),
    ):
        with pytest.raises(nsfast.SpecError, match="in the image cache") as e:
            nsfast.Spec(**spec)  # type: ignore[arg-type]
        assert e.value.field == "mounts"
    with pytest.raises(nsfast.SpecError, match="in the image cache") as e:
        nsfast.Spec(overlay=True, overlay_upper=etc)
    assert e.value.field == "overlay_upper"
    nsfast.Spec(mounts=[nsfast.Bind(img.rootfs, "/mnt"), nsfast.Overlay(etc, "/work")])


# --- resource bounds (each a hostile image small to build, costly to load before) ----------


def raw_header(name: str, size: int, kind: bytes) -> bytes:
    """A tar header block of `kind` claiming `size` bytes of data."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


def add_raw_layer(layout: Path, tag: str, new_tag: str, raw: bytes) -> str:
    """As add_layer, with the layer's tar bytes given (gzip'd into its blob)."""
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    digest, size = put_blob(layout, gzip.compress(raw, compresslevel=1, mtime=0))
    retag(
        layout,
        tag,
        new_tag,
        config=lambda c: c["rootfs"]["diff_ids"].append(diff_id),
        manifest=lambda m: m["layers"].append({"mediaType": GZIP_LAYER, "digest": digest, "size": size}),
    )
    return digest


def docker_save(path: Path, layers: Sequence[bytes], names: Sequence[str], extra: Sequence[Member] = ()) -> None:
    """A gzip'd docker save tarball of one image whose layers are `names` (paths in the
    tarball, repeats allowed) holding `layers` in the same order, after `extra` members."""
    diff_ids = ["sha256:" + hashlib.sha256(raw).hexdigest() for raw in layers]
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    hexdigest = hashlib.sha256(config).hexdigest()
    manifest = json.dumps([{"Config": f"{hexdigest}.json", "Layers": list(names)}]).encode()
    with gzip.open(path, "wb", compresslevel=1) as g, tarfile.open(fileobj=g, mode="w") as t:
        for info, data in [reg("manifest.json", manifest), reg(f"{hexdigest}.json", config), *extra]:
            t.addfile(info, io.BytesIO(data))
        for name, raw in dict(zip(names, layers)).items():
            t.addfile(reg(name, raw)[0], io.BytesIO(raw))


EXTENDED = {"longname": tarfile.GNUTYPE_LONGNAME, "longlink": tarfile.GNUTYPE_LONGLINK, "pax": tarfile.XHDTYPE}
EXTENDED["pax-global"] = tarfile.XGLTYPE


@pytest.mark.parametrize("kind", sorted(EXTENDED))
def test_a_huge_extended_header_is_refused_before_it_is_read(kind: str, layout_copy: Path, image_cache: Path) -> None:
    """A header that claims 64 MiB of long name (or pax records) was read and decoded whole
    by tarfile as it went past it: 0.5 MB of gzip cost 3.1 GB of memory. Refused on its
    claim now, in a layer (here with nothing behind the claim: no data is read) and in the
    archive itself."""
    before = roots(image_cache)
    raw = raw_header("././@LongLink", 64 << 20, EXTENDED[kind]) + reg("x")[0].tobuf() + bytes(1024)
    digest = add_raw_layer(layout_copy, "base", "huge", raw)
    with pytest.raises(
        ImageError, match=f"^{layout_copy}: layer {digest}: not a valid tar archive .*claims 67108864 bytes"
    ):
        Image(layout_copy, "huge")
    assert_clean(image_cache, before)


def test_an_archive_with_a_huge_long_name_costs_no_memory(tmp_path: Path, image_cache: Path) -> None:
    """The audit's bomb at 64 MiB, the archive gzip'd: measured in a process of its own."""
    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as g:
        g.write(raw_header("././@LongLink", 64 << 20, tarfile.GNUTYPE_LONGNAME))
        for _ in range(64):
            g.write(b"a" * (1 << 20))
        g.write(reg("x")[0].tobuf() + bytes(1024))
    script = (
        "import resource, sys, nsfast\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    nsfast.Image({str(path)!r}, cache={str(image_cache)!r})\n"
        "except nsfast.ImageError as e:\n"
        "    print(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) >> 10)\n"
    )
    env = {**os.environ, "PYTHONPATH": PYTHON_SRC}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    message, grown_mib = out.rsplit("\n", 2)[:2]
    assert message.startswith(f"{path}: not an OCI image layout directory nor a readable tar archive"), out
    assert "a GNU long name ('././@LongLink') at byte 0: claims 67108864 bytes" in message, out
    assert int(grown_mib) < 32, out  # tarfile alone held 64 MiB, and its decoded copy
    assert os.listdir(image_cache / "tmp") == []


def test_chained_and_global_extended_headers_are_bounded(layout_copy: Path) -> None:
    """Each header under the bound, but many of them before one member (tarfile recursed
    through them, holding each), or global pax keys copied into every later member."""
    chain = b"".join(raw_header("././@LongLink", 1024, tarfile.GNUTYPE_LONGNAME) + b"a" * 1024 for _ in range(9))
    digest = add_raw_layer(layout_copy, "base", "chain", chain + reg("x")[0].tobuf() + bytes(1024))
    with pytest.raises(ImageError, match=f"layer {digest}: .*more than 8 extended headers for one member"):
        Image(layout_copy, "chain")
    keys = {f"k{i}": "v" for i in range(65)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers=keys) as t:
        t.addfile(reg("x")[0], io.BytesIO(b""))
    digest = add_raw_layer(layout_copy, "base", "global", buf.getvalue())
    with pytest.raises(ImageError, match=f"layer {digest}: .*more than 64 global pax keys"):
        Image(layout_copy, "global")


def test_tarfile_keeps_no_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tarfile kept every header it read (2M members: 1.5 GB), the archive's as a layer's;
    nsfast keeps the names and offsets of an archive's files only, within a bound."""
    from nsfast import _image

    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as t:
        for i in range(3000):
            t.addfile(reg(f"{i:099d}")[0], io.BytesIO(b""))
    with _image._TarFile.open(path, "r:") as tf:
        assert sum(1 for _ in _image._members(tf)) == 3000
        assert tf.members == []  # type: ignore[attr-defined]
    monkeypatch.setattr(_image, "_MAX_INDEX", 3000 * 128)
    with pytest.raises(ImageError, match=f"^{path}: .*the names of the archive's files take more than"):
        Image(path)


def test_a_repeated_layer_is_read_once_and_charged_each_time(
    tmp_path: Path, image_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gzip'd archive read its members in place: each layer read decompressed it again
    from its start (the audit: one tiny layer named N times behind 512 MiB of zeros, 1.15 s
    a layer). It is decompressed once now, a repeated layer verified and decompressed once,
    but charged to max_size at each use; and at most 256 layers."""
    from nsfast import _image

    layer = layer_tar([reg("hello", b"hi")])
    path = tmp_path / "repeat.tar.gz"
    docker_save(path, [layer] * 100, ["l/layer.tar"] * 100, extra=[reg("pad", bytes(4 << 20))])
    calls: List[str] = []
    decompress = _image._decompress
    monkeypatch.setattr(
        _image, "_decompress", lambda store, lay, *a: calls.append(lay.name) or decompress(store, lay, *a)
    )
    img = Image(path)
    assert calls == ["l/layer.tar"]
    assert Path(img.rootfs, "hello").read_bytes() == b"hi"
    assert os.listdir(image_cache / "tmp") == []
    # Charged each time: 100 uses of a 10 KiB tar do not fit in 512 KiB.
    small = tmp_path / "small.tar.gz"
    docker_save(small, [layer] * 100, ["l/layer.tar"] * 100)
    with pytest.raises(ImageError, match=f"^{small}: layer l/layer.tar: the image's layers take more than max_size"):
        Image(small, cache=tmp_path / "cache2", max_size=512 << 10)
    assert Image(small, cache=tmp_path / "cache2", max_size=2 << 20).rootfs
    # The archive itself, decompressed, is bounded by max_size too.
    with pytest.raises(ImageError, match=rf"^{path}: more than max_size \(1048576 bytes\) once decompressed \(gzip\)"):
        Image(path, cache=tmp_path / "cache3", max_size=1 << 20)
    docker_save(path, [layer] * 257, ["l/layer.tar"] * 257)
    with pytest.raises(ImageError, match=f"^{path}: sha256:[0-9a-f]+ has 257 layers, more than the 256 allowed"):
        Image(path)


def test_a_root_in_any_cache_used_is_not_writable(layout: Path, tmp_path: Path) -> None:
    """The guard knew the default cache only: the root of an Image(cache=X), passed as a
    string, was a writable root (readonly_root=False) every later sandbox of it shared."""
    img = Image(layout, "base", cache=tmp_path / "other-cache")
    for root in (img.rootfs, os.path.dirname(img.rootfs), os.path.join(img.rootfs, "etc")):
        with pytest.raises(nsfast.SpecError, match="write into the image cache"):
            nsfast.Spec(rootfs=root, readonly_root=False)
    assert nsfast.Spec(rootfs=img.rootfs, overlay=True).overlay


def test_a_cache_another_user_could_swap_is_refused(layout: Path, tmp_path: Path) -> None:
    """(Found by an audit.) The cache's owner was checked by stat() and the path resolved
    again after: another user flipping a symlink between the two made root unpack into, and
    run, a directory of that user's. The cache is resolved first now, and refused unless no
    other user can replace any directory on the way to it."""
    if os.geteuid() != 0:
        pytest.skip("making directories of another user's needs root")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by everyone, not sticky
    with pytest.raises(ImageError, match="writable by other users"):
        Image(layout, "base", cache=shared / "cache")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    (tmp_path / "link").symlink_to(theirs)
    with pytest.raises(ImageError, match="owned by uid 65534, another user"):
        Image(layout, "base", cache=tmp_path / "link" / "cache")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp: a cache of ours in it cannot be renamed by others
    assert Image(layout, "base", cache=sticky / "cache").rootfs.startswith(str(sticky / "cache"))
