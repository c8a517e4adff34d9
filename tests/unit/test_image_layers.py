"""Reading image tarballs, squashing layers and building erofs lower disks.

The tarball builders here are also used by test_image_store.py.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from matchlock.api.errors import ImageError
from matchlock.image import layers
from matchlock.image.archive import host_arch, load_archive, normalise

MTIME = 1_600_000_000


# ---------------------------------------------------------------------------
# tarball builders


def ent(name, kind="file", data=b"", mode=None, uid=0, gid=0, link="", mtime=MTIME, xattrs=None, dev=(0, 0)):
    info = tarfile.TarInfo(name)
    info.type = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "sym": tarfile.SYMTYPE,
        "link": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "blk": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o777 if kind == "sym" else 0o644)
    info.uid, info.gid, info.linkname, info.mtime = uid, gid, link, mtime
    info.devmajor, info.devminor = dev
    info.size = len(data) if kind == "file" else 0
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, (data if kind == "file" else None)


def make_layer(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _config(layer_tars: list[bytes], **extra) -> bytes:
    config = {
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "A=b=c"], "Cmd": ["/bin/sh"], "WorkingDir": "/w", "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + _sha(t) for t in layer_tars]},
    }
    config.update(extra)
    return json.dumps(config).encode()


def docker_save(layer_tars: list[bytes], tag="test/img:1", gzip_layers=False, config: bytes | None = None) -> bytes:
    config = config or _config(layer_tars)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        names = []
        for i, data in enumerate(layer_tars):
            name = f"{i:064x}/layer.tar"
            _add(tar, name, gzip.compress(data, mtime=0) if gzip_layers else data)
            names.append(name)
        config_name = _sha(config) + ".json"
        _add(tar, config_name, config)
        _add(tar, "manifest.json", json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": names}]).encode())
    return buf.getvalue()


def oci_layout(layer_tars: list[bytes], compress="gzip", platforms=None, corrupt_layer: int | None = None) -> bytes:
    """OCI layout tarball; `platforms` builds an index with one manifest per os/arch."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict:
        blobs[_sha(data)] = data
        return {"mediaType": media_type, "digest": "sha256:" + _sha(data), "size": len(data)}

    def manifest_for(arch: str) -> dict:
        layer_descs = []
        for data in layer_tars:
            if compress == "gzip":
                layer_descs.append(blob(gzip.compress(data, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"))
            elif compress == "zstd":
                packed = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
                layer_descs.append(blob(packed, "application/vnd.oci.image.layer.v1.tar+zstd"))
            else:
                layer_descs.append(blob(data, "application/vnd.oci.image.layer.v1.tar"))
        config = blob(_config(layer_tars, architecture=arch), "application/vnd.oci.image.config.v1+json")
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layer_descs,
        }
        return blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json") | {
            "platform": {"os": "linux", "architecture": arch}
        }

    manifests = [manifest_for(arch) for arch in (platforms or [host_arch()])]
    if corrupt_layer is not None:
        # Flip a byte of a layer blob but keep its digest name.
        digest = json.loads(blobs[manifests[0]["digest"][7:]])["layers"][corrupt_layer]["digest"][7:]
        data = bytearray(blobs[digest])
        data[len(data) // 2] ^= 0xFF
        blobs[digest] = bytes(data)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": manifests}).encode())
        for hexdigest, data in blobs.items():
            _add(tar, f"blobs/sha256/{hexdigest}", data)
    return buf.getvalue()


# The standard three-layer image used by most tests.
def sample_layers() -> list[bytes]:
    base = make_layer(
        [
            ent("./", "dir"),
            ent("bin", "dir"),
            ent("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755),
            ent("bin/sgid", data=b"x", mode=0o2711, gid=42),
            ent("etc", "dir"),
            ent("etc/conf", data=b"conf-v1"),
            ent("etc/gone", data=b"deleted later"),
            ent("home", "dir"),
            ent("home/user", "dir", uid=1000, gid=1000, mode=0o700),
            ent("home/user/file", data=b"mine", uid=1000, gid=1000, mode=0o600),
            ent("tmp", "dir", mode=0o1777),
            ent("usr", "dir"),
            ent("usr/lib", "dir"),
            ent("usr/lib/a.so", data=b"AAAA"),
            ent("usr/lib/sub", "dir"),
            ent("usr/lib/sub/deep", data=b"deep"),
            ent("opt", "dir"),
            ent("opt/old1", data=b"1"),
            ent("opt/keep", "dir"),
            ent("opt/keep/old2", data=b"2"),
            ent("var", "dir"),
            ent("var/thing", "dir"),
            ent("var/thing/child", data=b"c"),
            ent("dev", "dir"),
            ent("dev/null", "chr", mode=0o666, dev=(1, 3)),
            ent("dev/fifo", "fifo", mode=0o600),
        ]
    )
    middle = make_layer(
        [
            ent("bin/link-to-tool", "link", link="bin/tool"),
            ent("bin/sh", "sym", link="/bin/tool"),
            ent("bin/rel", "sym", link="../usr/lib/a.so", uid=1000, gid=1000),
            ent("etc/conf", data=b"conf-v2", uid=1000, gid=1000),
            ent("etc/.wh.gone", data=b""),
            ent("usr/lib/.wh.sub", data=b""),
            ent("opt/.wh..wh..opq", data=b""),
            ent("opt/new", data=b"new in opaque layer"),
            ent("var/thing", data=b"now a file"),
            ent("capfile", data=b"cap", xattrs={"user.note": "hello"}),
        ]
    )
    top = make_layer(
        [
            ent("top", data=b"top", mtime=MTIME + 100),
            ent("./usr/lib/sub2/", "dir"),
            ent("usr/lib/sub2/x", data=b"implicit parents"),
        ]
    )
    return [base, middle, top]


def squash_bytes(layer_tars: list[bytes]):
    return layers.squash([tarfile.open(fileobj=io.BytesIO(t)) for t in layer_tars])


@contextlib.contextmanager
def mounted(blob: Path, where: Path):
    where.mkdir(exist_ok=True)
    proc = subprocess.run(
        ["mount", "-o", "loop,ro", "-t", "erofs", str(blob), str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(
            f"cannot loop-mount the erofs image: {proc.stderr.strip()}; run the tests as root on a "
            f"kernel with erofs (modprobe erofs) and loop devices (modprobe loop)"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def assert_sample_tree(root: Path) -> None:
    def st(rel):
        return os.lstat(root / rel)

    tool = st("bin/tool")
    assert stat.S_IMODE(tool.st_mode) == 0o4755 and (tool.st_uid, tool.st_gid) == (0, 0)
    assert stat.S_IMODE(st("bin/sgid").st_mode) == 0o2711 and st("bin/sgid").st_gid == 42
    assert stat.S_IMODE(st("tmp").st_mode) == 0o1777
    assert st("bin/link-to-tool").st_ino == tool.st_ino and tool.st_nlink == 2
    assert os.readlink(root / "bin/sh") == "/bin/tool"
    assert os.readlink(root / "bin/rel") == "../usr/lib/a.so"
    assert (st("bin/rel").st_uid, st("bin/rel").st_gid) == (1000, 1000)
    assert (st("home/user").st_uid, st("home/user").st_gid) == (1000, 1000)
    assert stat.S_IMODE(st("home/user").st_mode) == 0o700
    assert (st("home/user/file").st_uid, st("home/user/file").st_gid) == (1000, 1000)
    assert (root / "etc/conf").read_bytes() == b"conf-v2" and st("etc/conf").st_uid == 1000
    assert not os.path.lexists(root / "etc/gone")  # whiteout of a file
    assert not os.path.lexists(root / "usr/lib/sub")  # whiteout of a directory
    assert (root / "usr/lib/a.so").read_bytes() == b"AAAA"
    assert sorted(os.listdir(root / "opt")) == ["new"]  # opaque: lower entries gone, same layer kept
    assert stat.S_ISREG(st("var/thing").st_mode) and (root / "var/thing").read_bytes() == b"now a file"
    assert stat.S_ISCHR(st("dev/null").st_mode) and os.major(st("dev/null").st_rdev) == 1
    assert os.minor(st("dev/null").st_rdev) == 3 and stat.S_IMODE(st("dev/null").st_mode) == 0o666
    assert stat.S_ISFIFO(st("dev/fifo").st_mode)
    assert st("top").st_mtime == MTIME + 100 and st("etc").st_mtime == MTIME
    assert st("usr/lib/sub2").st_mtime == MTIME  # dir mtime survives its contents being written
    # Implicit parent directories are created as root-owned 0755 directories.
    assert (root / "usr/lib/sub2/x").read_bytes() == b"implicit parents"
    assert stat.S_IMODE(st(".").st_mode) == 0o755


# ---------------------------------------------------------------------------
# tests


def test_normalise_rejects_escapes():
    assert normalise("./a//b/./c/", "t") == ("a", "b", "c")
    assert normalise("/abs/x", "t") == ("abs", "x")
    assert normalise("a/../b", "t") == ("b",)
    assert normalise("./", "t") == ()
    for bad in ("../evil", "a/../../evil", "/../x", ".."):
        with pytest.raises(ImageError, match="escapes"):
            normalise(bad, "t")


def test_squash_and_materialise(tmp_path):
    tree = squash_bytes(sample_layers())
    staging = tmp_path / "staging"
    staging.mkdir()
    layers.materialise(tree, staging)
    assert_sample_tree(staging)
    assert os.getxattr(staging / "capfile", "user.note") == b"hello"


def test_erofs_blob_has_exact_metadata(tmp_path):
    tars = sample_layers()
    diff_ids = ["sha256:" + _sha(t) for t in tars]
    tree_layers = [tarfile.open(fileobj=io.BytesIO(t)) for t in tars]
    blob = layers.build_lower(tree_layers, diff_ids, tmp_path / "blobs", tmp_path)
    assert blob.name == f"sha256_{layers.squash_digest(diff_ids)}.erofs"
    assert blob.stat().st_size > 0
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [blob.name]  # no .tmp left
    assert not list(tmp_path.glob("staging-*"))
    with mounted(blob, tmp_path / "mnt") as root:
        assert_sample_tree(root)
        assert os.getxattr(root / "capfile", "user.note") == b"hello"
    # An existing non-empty blob is reused, not rebuilt.
    before = blob.stat().st_mtime_ns
    assert layers.build_lower(tree_layers, diff_ids, tmp_path / "blobs", tmp_path) == blob
    assert blob.stat().st_mtime_ns == before


def test_squash_digest_is_the_documented_formula():
    ids = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]
    expected = hashlib.sha256(b"matchlock-squash-v1\n" + b"".join(i.encode() + b"\n" for i in ids)).hexdigest()
    assert layers.squash_digest(ids) == expected


@pytest.mark.parametrize(
    "entries, message",
    [
        ([ent("../evil", data=b"x")], "escapes"),
        ([ent("a/../../evil", data=b"x")], "escapes"),
        ([ent("lnk", "sym", link="/etc"), ent("lnk/passwd", data=b"pwned")], "parent lnk is a symlink"),
        ([ent("f", data=b"x"), ent("f/child", data=b"x")], "parent f is a file"),
        ([ent("hl", "link", link="../x")], "escapes"),
        ([ent("hl", "link", link="/../../etc/passwd")], "escapes"),
        ([ent("hl", "link", link="missing")], "not a regular file"),
        ([ent("d", "dir"), ent("hl", "link", link="d")], "not a regular file"),
        ([ent("s", "sym", link="/etc/passwd"), ent("hl", "link", link="s")], "not a regular file"),
        ([ent(".wh..", data=b"")], "invalid whiteout"),
    ],
)
def test_escapes_are_rejected(entries, message):
    with pytest.raises(ImageError, match=message):
        squash_bytes([make_layer(entries)])


def test_symlink_parent_in_a_later_layer_is_rejected():
    lower = make_layer([ent("etc", "dir"), ent("lnk", "sym", link="/etc")])
    upper = make_layer([ent("lnk/shadow", data=b"x")])
    with pytest.raises(ImageError, match="parent lnk is a symlink"):
        squash_bytes([lower, upper])


def test_hardlink_to_whited_out_file_is_rejected():
    lower = make_layer([ent("f", data=b"x"), ent("g", "link", link="f")])
    upper = make_layer([ent(".wh.f", data=b"")])
    with pytest.raises(ImageError, match="hardlink g -> f"):
        squash_bytes([lower, upper])


def test_file_replaced_by_directory_and_symlink_replaced_by_directory():
    lower = make_layer([ent("a", data=b"file"), ent("s", "sym", link="/tmp")])
    upper = make_layer([ent("a", "dir"), ent("a/b", data=b"b"), ent("s", "dir", mode=0o750), ent("s/c", data=b"c")])
    tree = squash_bytes([lower, upper])
    assert set(tree.root.children["a"].children) == {"b"}
    assert tree.root.children["s"].member.mode == 0o750


def test_materialise_refuses_non_empty_staging(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(ImageError, match="not empty"):
        layers.materialise(squash_bytes([make_layer([ent("f", data=b"")])]), tmp_path)


@pytest.mark.parametrize("compress", ["gzip", "zstd", None])
def test_oci_layout_is_read_and_verified(tmp_path, compress):
    tars = sample_layers()
    path = tmp_path / "oci.tar"
    path.write_bytes(oci_layout(tars, compress=compress))
    with load_archive(path, tmp_path) as image:
        assert image.format == "oci-layout" and image.digest.startswith("sha256:")
        assert image.diff_ids == ["sha256:" + _sha(t) for t in tars]
        assert image.config["config"]["WorkingDir"] == "/w"
        staging = tmp_path / "staging"
        staging.mkdir()
        layers.materialise(layers.squash(image.layers), staging)
        assert_sample_tree(staging)


@pytest.mark.parametrize("gzip_layers", [False, True])
def test_docker_save_is_read_and_verified(tmp_path, gzip_layers):
    tars = sample_layers()
    path = tmp_path / "docker.tar"
    config = _config(tars)
    path.write_bytes(docker_save(tars, gzip_layers=gzip_layers, config=config))
    with load_archive(path, tmp_path) as image:
        assert image.format == "docker-save" and image.digest == "sha256:" + _sha(config)
        assert len(image.layers) == 3


def test_oci_index_picks_host_platform(tmp_path):
    other = "arm64" if host_arch() != "arm64" else "amd64"
    path = tmp_path / "multi.tar"
    path.write_bytes(oci_layout(sample_layers()[:1], platforms=[other, host_arch()]))
    with load_archive(path, tmp_path) as image:
        assert image.config["architecture"] == host_arch()
    path.write_bytes(oci_layout(sample_layers()[:1], platforms=[other, "s390x"]))
    with pytest.raises(ImageError, match=f"no linux/{host_arch()} manifest"):
        load_archive(path, tmp_path)


def test_corrupted_oci_blob_is_rejected(tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(oci_layout(sample_layers(), corrupt_layer=1))
    with pytest.raises(ImageError, match=r"blob blobs/sha256/[0-9a-f]{64}: sha256 .* does not match"):
        load_archive(path, tmp_path)


def test_docker_diff_id_and_config_mismatch_rejected(tmp_path):
    tars = sample_layers()
    wrong = _config([tars[0], tars[0], tars[2]])
    path = tmp_path / "bad.tar"
    path.write_bytes(docker_save(tars, config=wrong))
    with pytest.raises(ImageError, match="does not match diff_id"):
        load_archive(path, tmp_path)
    # A config whose content does not hash to its file name.
    good = docker_save(tars)
    with tarfile.open(fileobj=io.BytesIO(good)) as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".json") and member.name != "manifest.json":
                data = data.replace(b'"/w"', b'"/x"')
            _add(dst, member.name, data)
    with pytest.raises(ImageError, match="config blob .* does not match its name"):
        load_archive(path, tmp_path)


def test_not_an_image(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(make_layer([ent("hello", data=b"x")]))
    with pytest.raises(ImageError, match="neither manifest.json"):
        load_archive(path, tmp_path)
    path.write_bytes(b"definitely not a tar" * 100)
    with pytest.raises(ImageError, match="not a tar archive"):
        load_archive(path, tmp_path)


def test_docker_save_with_symlinked_duplicate_layer(tmp_path):
    # Old `docker save` writes a repeated layer once and symlinks the second copy.
    layer = make_layer([ent("same", data=b"s")])
    config = _config([layer, layer])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, f"{0:064x}/layer.tar", layer)
        link = tarfile.TarInfo(f"{1:064x}/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, f"../{0:064x}/layer.tar"
        tar.addfile(link)
        _add(tar, _sha(config) + ".json", config)
        manifest = [
            {
                "Config": _sha(config) + ".json",
                "RepoTags": None,
                "Layers": [f"{0:064x}/layer.tar", f"./{1:064x}/layer.tar"],
            }
        ]
        _add(tar, "manifest.json", json.dumps(manifest).encode())
    path = tmp_path / "dup.tar"
    path.write_bytes(buf.getvalue())
    with load_archive(path, tmp_path) as image:
        assert len(image.layers) == 2 and image.diff_ids[0] == image.diff_ids[1]
        assert set(layers.squash(image.layers).root.children) == {"same"}
