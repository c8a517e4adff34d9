"""Reading image tarballs, squashing layers and building erofs lower disks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile

import pytest

from matchlock.api.errors import ImageError
from matchlock.image import layers
from matchlock.image.archive import decompress_to, host_arch, load_archive, normalise
from support.images import docker_save, sha256
from support.sample_image import assert_sample_tree, mounted, sample_config, sample_layers, sample_oci_layout
from support.tarballs import add, entry, layer


def squash_bytes(layer_tars: list[bytes]):
    return layers.squash([tarfile.open(fileobj=io.BytesIO(t)) for t in layer_tars])


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
    diff_ids = [sha256(t) for t in tars]
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
        ([entry("../evil", data=b"x")], "escapes"),
        ([entry("a/../../evil", data=b"x")], "escapes"),
        ([entry("lnk", "sym", link="/etc"), entry("lnk/passwd", data=b"pwned")], "parent lnk is a symlink"),
        ([entry("f", data=b"x"), entry("f/child", data=b"x")], "parent f is a file"),
        ([entry("hl", "link", link="../x")], "escapes"),
        ([entry("hl", "link", link="/../../etc/passwd")], "escapes"),
        ([entry("hl", "link", link="missing")], "not a regular file"),
        ([entry("d", "dir"), entry("hl", "link", link="d")], "not a regular file"),
        ([entry("s", "sym", link="/etc/passwd"), entry("hl", "link", link="s")], "not a regular file"),
        ([entry(".wh..")], "invalid whiteout"),
    ],
)
def test_escapes_are_rejected(entries, message):
    with pytest.raises(ImageError, match=message):
        squash_bytes([layer(entries)])


def test_symlink_parent_in_a_later_layer_is_rejected():
    lower = layer([entry("etc", "dir"), entry("lnk", "sym", link="/etc")])
    upper = layer([entry("lnk/shadow", data=b"x")])
    with pytest.raises(ImageError, match="parent lnk is a symlink"):
        squash_bytes([lower, upper])


def test_hardlink_to_whited_out_file_is_rejected():
    lower = layer([entry("f", data=b"x"), entry("g", "link", link="f")])
    upper = layer([entry(".wh.f")])
    with pytest.raises(ImageError, match="hardlink g -> f"):
        squash_bytes([lower, upper])


def test_file_replaced_by_directory_and_symlink_replaced_by_directory():
    lower = layer([entry("a", data=b"file"), entry("s", "sym", link="/tmp")])
    upper = layer([entry("a", "dir"), entry("a/b", data=b"b"), entry("s", "dir", mode=0o750), entry("s/c", data=b"c")])
    tree = squash_bytes([lower, upper])
    assert set(tree.root.children["a"].children) == {"b"}
    assert tree.root.children["s"].member.mode == 0o750


def test_materialise_refuses_non_empty_staging(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(ImageError, match="not empty"):
        layers.materialise(squash_bytes([layer([entry("f", data=b"")])]), tmp_path)


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_oci_layout_is_read_and_verified(tmp_path, compress):
    tars = sample_layers()
    path = tmp_path / "oci.tar"
    path.write_bytes(sample_oci_layout(tars, compress=compress))
    with load_archive(path, tmp_path) as image:
        assert image.format == "oci-layout" and image.digest.startswith("sha256:")
        assert image.diff_ids == [sha256(t) for t in tars]
        assert image.config["config"]["WorkingDir"] == "/w"
        staging = tmp_path / "staging"
        staging.mkdir()
        layers.materialise(layers.squash(image.layers), staging)
        assert_sample_tree(staging)


@pytest.mark.parametrize("gzip_layers", [False, True])
def test_docker_save_is_read_and_verified(tmp_path, gzip_layers):
    tars = sample_layers()
    path = tmp_path / "docker.tar"
    config = sample_config(tars)
    path.write_bytes(docker_save(tars, config, gzip_layers=gzip_layers))
    with load_archive(path, tmp_path) as image:
        assert image.format == "docker-save" and image.digest == sha256(config)
        assert len(image.layers) == 3


def test_oci_index_picks_host_platform(tmp_path):
    other = "arm64" if host_arch() != "arm64" else "amd64"
    path = tmp_path / "multi.tar"
    path.write_bytes(sample_oci_layout(sample_layers()[:1], platforms=[other, host_arch()]))
    with load_archive(path, tmp_path) as image:
        assert image.config["architecture"] == host_arch()
    path.write_bytes(sample_oci_layout(sample_layers()[:1], platforms=[other, "s390x"]))
    with pytest.raises(ImageError, match=f"no linux/{host_arch()} manifest"):
        load_archive(path, tmp_path)


def test_corrupted_oci_blob_is_rejected(tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(sample_oci_layout(sample_layers(), corrupt_layer=1))
    with pytest.raises(ImageError, match=r"blob blobs/sha256/[0-9a-f]{64}: sha256 .* does not match"):
        load_archive(path, tmp_path)


def test_docker_diff_id_and_config_mismatch_rejected(tmp_path):
    tars = sample_layers()
    wrong = sample_config([tars[0], tars[0], tars[2]])
    path = tmp_path / "bad.tar"
    path.write_bytes(docker_save(tars, wrong))
    with pytest.raises(ImageError, match="does not match diff_id"):
        load_archive(path, tmp_path)
    # A config whose content does not hash to its file name.
    good = docker_save(tars, sample_config(tars))
    with tarfile.open(fileobj=io.BytesIO(good)) as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".json") and member.name != "manifest.json":
                data = data.replace(b'"/w"', b'"/x"')
            add(dst, [entry(member.name, data=data)])
    with pytest.raises(ImageError, match="config blob .* does not match its name"):
        load_archive(path, tmp_path)


def test_not_an_image(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(layer([entry("hello", data=b"x")]))
    with pytest.raises(ImageError, match="neither manifest.json"):
        load_archive(path, tmp_path)
    path.write_bytes(b"definitely not a tar" * 100)
    with pytest.raises(ImageError, match="not a tar archive"):
        load_archive(path, tmp_path)


def test_docker_save_with_symlinked_duplicate_layer(tmp_path):
    # Old `docker save` writes a repeated layer once and symlinks the second copy.
    same = layer([entry("same", data=b"s")])
    config = sample_config([same, same])
    config_name = sha256(config).removeprefix("sha256:") + ".json"
    manifest = [{"Config": config_name, "RepoTags": None, "Layers": [f"{0:064x}/layer.tar", f"./{1:064x}/layer.tar"]}]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(
            tar,
            [
                entry(f"{0:064x}/layer.tar", data=same),
                entry(f"{1:064x}/layer.tar", "sym", link=f"../{0:064x}/layer.tar"),
                entry(config_name, data=config),
                entry("manifest.json", data=json.dumps(manifest).encode()),
            ],
        )
    path = tmp_path / "dup.tar"
    path.write_bytes(buf.getvalue())
    with load_archive(path, tmp_path) as image:
        assert len(image.layers) == 2 and image.diff_ids[0] == image.diff_ids[1]
        assert set(layers.squash(image.layers).root.children) == {"same"}


def test_zstd_reads_every_frame_and_rejects_corrupt_data(tmp_path):
    # Chunked zstd layers are several concatenated frames; stopping after the first would lose data.
    parts = (b"first frame ", b"second frame")
    frames = b"".join(
        subprocess.run(["zstd", "-q", "-c"], input=p, capture_output=True, check=True).stdout for p in parts
    )
    src = tmp_path / "blob.zst"
    src.write_bytes(frames)
    digest, compressed = decompress_to(lambda: open(src, "rb"), "layer", tmp_path / "plain")
    assert compressed and (tmp_path / "plain").read_bytes() == b"first frame second frame"
    assert digest == hashlib.sha256(b"first frame second frame").hexdigest()

    src.write_bytes(frames[:4] + b"\xff" * 32)
    with pytest.raises(ImageError, match="layer: corrupt zstd data"):
        decompress_to(lambda: open(src, "rb"), "layer", tmp_path / "plain")
