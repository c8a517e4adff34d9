"""The local image store and the `matchlock image` commands."""

from __future__ import annotations

import gzip
import io
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from matchlock.api.errors import ImageError, NotFoundError, UsageError
from matchlock.api.image import DEFAULT_IMAGE, ImageConfig
from matchlock.cli.image import image as image_cli
from matchlock.image.layers import squash_digest
from matchlock.image.store import ImageStore, validate_tag
from support.images import docker_save, sha256
from support.sample_image import assert_sample_tree, mounted, sample_config, sample_layers, sample_oci_layout
from support.tarballs import entry, layer


def saved(layers: list[bytes]) -> bytes:
    """The layers as a `docker save` archive with the sample config."""
    return docker_save(layers, sample_config(layers))


def blobs(cache: Path) -> list[str]:
    d = cache / "images" / "blobs"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_import_docker_save(cache_dir, tmp_path):
    tars = sample_layers()
    info = ImageStore().import_tarball(io.BytesIO(saved(tars)), "test/img:1")
    assert info.tag == "test/img:1" and info.source == "import" and info.layers == 3
    assert info.lower_fstype == "erofs" and info.lower_path.parent == cache_dir / "images" / "blobs"
    assert info.size == info.lower_path.stat().st_size > 0
    assert info.config == ImageConfig(
        user="1000", working_dir="/w", cmd=("/bin/sh",), env={"PATH": "/usr/bin:/bin", "A": "b=c"}
    )
    assert info.created_at.endswith("Z") and "T" in info.created_at
    assert ImageStore().get("test/img:1") == info == ImageStore().resolve("test/img:1")
    with mounted(info.lower_path, tmp_path / "mnt") as root:
        assert_sample_tree(root)


def test_import_compressed_oci_layout(cache_dir):
    data = gzip.compress(sample_oci_layout(sample_layers(), compress="zstd"))
    info = ImageStore().import_tarball(io.BytesIO(data), "oci:latest")
    assert info.layers == 3 and info.digest.startswith("sha256:")


def test_schema(cache_dir):
    ImageStore().images()
    conn = sqlite3.connect(cache_dir / "images" / "metadata.db")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("SELECT module, version FROM schema_migrations").fetchall() == [("image", 1), ("image", 2)]
    columns = [row[1] for row in conn.execute("PRAGMA table_info(images)")]
    assert columns == [
        "scope",
        "tag",
        "digest",
        "size",
        "created_at",
        "source",
        "rootfs_path",
        "oci_json",
        "updated_at",
    ]
    columns = [row[1] for row in conn.execute("PRAGMA table_info(image_layers)")]
    assert columns == ["scope", "tag", "ordinal", "digest", "media_type", "size", "diff_id"]


def test_store_from_before_image_layers_migrates_forward(cache_dir):
    """A metadata.db written by the previous release (only migration 1) keeps its images."""
    info = ImageStore().import_tarball(io.BytesIO(saved(sample_layers())), "old:1")
    conn = sqlite3.connect(cache_dir / "images" / "metadata.db")
    conn.execute("DROP TABLE image_layers")
    conn.execute("DELETE FROM schema_migrations WHERE version = 2")
    conn.commit()
    conn.close()
    assert ImageStore().get("old:1") == info
    conn = sqlite3.connect(cache_dir / "images" / "metadata.db")
    assert conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [(1,), (2,)]
    assert conn.execute("SELECT count(*) FROM image_layers").fetchone() == (0,)


def test_duplicate_import_reuses_blob(cache_dir):
    tars = sample_layers()
    a = ImageStore().import_tarball(io.BytesIO(saved(tars)), "a:1")
    mtime = a.lower_path.stat().st_mtime_ns
    b = ImageStore().import_tarball(io.BytesIO(sample_oci_layout(tars)), "b:1")  # same diff_ids, other format
    again = ImageStore().import_tarball(io.BytesIO(saved(tars)), "a:1")
    assert a.lower_path == b.lower_path == again.lower_path
    assert a.lower_path.stat().st_mtime_ns == mtime
    assert blobs(cache_dir) == [a.lower_path.name]
    assert a.lower_path.name == f"sha256_{squash_digest([sha256(t) for t in tars])}.erofs"


def test_reimport_with_new_content_drops_old_blob(cache_dir):
    first = ImageStore().import_tarball(io.BytesIO(saved(sample_layers())), "x:1")
    second = ImageStore().import_tarball(io.BytesIO(saved([layer([entry("only", data=b"1")])])), "x:1")
    assert first.lower_path != second.lower_path
    assert blobs(cache_dir) == [second.lower_path.name]


def test_corrupted_blob_caches_nothing(cache_dir):
    with pytest.raises(ImageError, match="blob blobs/sha256/"):
        ImageStore().import_tarball(io.BytesIO(sample_oci_layout(sample_layers(), corrupt_layer=0)), "bad:1")
    assert blobs(cache_dir) == []
    assert ImageStore().get("bad:1") is None
    assert list((cache_dir / "images" / "tmp").iterdir()) == []


def test_escaping_image_caches_nothing(cache_dir):
    evil = layer([entry("lnk", "sym", link="/"), entry("lnk/etc/passwd", data=b"x")])
    with pytest.raises(ImageError, match="path escape"):
        ImageStore().import_tarball(io.BytesIO(saved([evil])), "evil:1")
    assert blobs(cache_dir) == [] and ImageStore().images() == []


def test_remove_twice_fails(cache_dir):
    info = ImageStore().import_tarball(io.BytesIO(saved(sample_layers())), "r:1")
    ImageStore().remove("r:1")
    assert not info.lower_path.exists()
    with pytest.raises(NotFoundError, match="image not found: r:1"):
        ImageStore().remove("r:1")


def test_remove_keeps_blob_shared_with_another_tag(cache_dir):
    data = saved(sample_layers())
    a = ImageStore().import_tarball(io.BytesIO(data), "a:1")
    ImageStore().import_tarball(io.BytesIO(data), "b:1")
    ImageStore().remove("a:1")
    assert a.lower_path.exists()


def test_gc_removes_orphans(cache_dir):
    info = ImageStore().import_tarball(io.BytesIO(saved(sample_layers())), "g:1")
    orphan = info.lower_path.with_name("sha256_" + "0" * 64 + ".erofs")
    orphan.write_bytes(b"orphan")
    stale_tmp = info.lower_path.with_name("sha256_" + "1" * 64 + ".erofs.tmp")
    stale_tmp.write_bytes(b"half")
    dead_work = cache_dir / "images" / "tmp" / "import-999999999-abc"
    dead_work.mkdir(parents=True)
    assert ImageStore().gc() == 2
    assert blobs(cache_dir) == [info.lower_path.name]
    assert not dead_work.exists()
    assert ImageStore().gc() == 0


def test_resolve_unknown_tag_explains_import(cache_dir):
    with pytest.raises(NotFoundError) as exc:
        ImageStore().resolve("alpine:3")
    assert str(exc.value) == (
        'image "alpine:3" not found locally; pull it with: matchlock pull alpine:3, '
        "or import it with: docker save alpine:3 | matchlock image import alpine:3"
    )


@pytest.mark.parametrize("bad", ["", "a b", "tab\there", "x" * 256, "new\nline"])
def test_invalid_tags(cache_dir, bad):
    with pytest.raises(UsageError, match="invalid image tag"):
        validate_tag(bad)
    with pytest.raises(UsageError):
        ImageStore().import_tarball(io.BytesIO(b""), bad)
    validate_tag("x" * 255)


def test_concurrent_imports_share_one_blob(cache_dir, tmp_path):
    tarball = tmp_path / "img.tar"
    tarball.write_bytes(saved(sample_layers()))
    script = textwrap.dedent(f"""
        import sys
        from matchlock.image.store import ImageStore
        info = ImageStore().import_tarball(open({str(tarball)!r}, "rb"), sys.argv[1])
        print(info.lower_path)
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, tag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for tag in ("same:1", "same:1", "other:1")
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert blobs(cache_dir) == [os.path.basename(paths.pop())]
    assert sorted(i.tag for i in ImageStore().images()) == ["other:1", "same:1"]


# ---------------------------------------------------------------------------
# CLI


def test_cli_import_ls_rm_gc(cache_dir):
    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1
    except TypeError:
        runner = CliRunner()  # click >= 8.2 always keeps stderr apart
    result = runner.invoke(image_cli, ["import", "cli/img:1"], input=saved(sample_layers()))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "Importing cli/img:1 from stdin...\n"
    lines = result.stdout.splitlines()
    assert lines[:2] == ["Imported: cli/img:1", "Layers: 3"]
    size = ImageStore().get("cli/img:1").size
    assert lines[2] == f"Size: {size / 1048576:.1f} MB"

    for command in ("ls", "list"):
        result = runner.invoke(image_cli, [command])
        assert result.exit_code == 0
        header, row = result.stdout.splitlines()
        assert header.split() == ["TAG", "SOURCE", "SIZE", "CREATED"]
        fields = row.split()
        assert fields[:4] == ["cli/img:1", "import", f"{size / 1048576:.1f}", "MB"]
        assert len(fields[4]) == 10 and len(fields[5]) == 8  # YYYY-MM-DD HH:MM:SS
        assert header.index("SOURCE") == row.index("import")

    (cache_dir / "images" / "blobs" / ("sha256_" + "f" * 64 + ".erofs")).write_bytes(b"x")
    result = runner.invoke(image_cli, ["gc"])
    assert result.stdout == "Removed 1 unreferenced blobs\n"

    result = runner.invoke(image_cli, ["rm", "cli/img:1"])
    assert result.exit_code == 0 and result.stdout == "Removed cli/img:1\n"
    result = runner.invoke(image_cli, ["remove", "cli/img:1"])
    assert isinstance(result.exception, NotFoundError) and result.exception.exit_code != 0


def test_cli_through_main_reports_errors(cache_dir):
    run = [sys.executable, "-c", "from matchlock.cli.main import main; main()", "image"]
    proc = subprocess.run(run + ["rm", "nope:1"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == "Error: image not found: nope:1\n"
    proc = subprocess.run(run + ["import", "bad tag"], capture_output=True, text=True, input="")
    assert proc.returncode == 2 and "invalid image tag 'bad tag'" in proc.stderr
    proc = subprocess.run(run + ["import", "x:1"], capture_output=True, input=b"garbage" * 100)
    assert proc.returncode == 1 and b"Error: not a tar archive" in proc.stderr


def test_default_image_constant():
    assert DEFAULT_IMAGE == "matchlock/busybox:builtin"
