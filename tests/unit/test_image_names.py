"""Image names: one validator for every tag, the reserved built-in name, and what a miss says.

Only loopback registries are named; the "unreachable" one is a loopback port nobody listens on.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import pytest

from matchlock.api.errors import UsageError
from matchlock.api.image import DEFAULT_IMAGE
from matchlock.cli.setup import _builtin_image
from matchlock.image.progress import LineProgress
from matchlock.image.reference import close_matches, validate_new_tag
from matchlock.image.store import ImageStore
from support.cli import run_matchlock
from support.images import docker_save
from support.ports import free_port
from support.sample_image import sample_config, sample_layers

BAD_TAGS = [":latest", "x/y:", "../../etc/passwd", "UPPER/Case"]
FAST_RETRIES = {"MATCHLOCK_PULL_RETRIES": "3", "MATCHLOCK_PULL_BACKOFF": "0.01"}


def saved() -> bytes:
    tars = sample_layers()
    return docker_save(tars, sample_config(tars))


@pytest.mark.parametrize("tag", BAD_TAGS)
def test_import_and_pull_refuse_the_same_tags_with_one_message(cache_dir, tag):
    imported = run_matchlock("image", "import", tag, input=saved())
    pulled = run_matchlock("pull", tag)
    tagged = run_matchlock("pull", "-t", tag, "localhost:1/never/pulled:1")
    errors = []
    for result, what in ((imported, "image tag"), (pulled, "image reference"), (tagged, "image tag")):
        stderr = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
        assert result.returncode == 2, result
        assert stderr.startswith(f"Error: invalid {what} {tag!r}: "), result
        assert stderr.count("\n") == 1 and "Traceback" not in stderr
        errors.append(stderr.split(f"{tag!r}: ", 1)[1])
    assert len(set(errors)) == 1  # one validator: the same rule, the same fix, for every command
    assert ImageStore().images() == []


def test_good_local_tags_still_import(cache_dir):
    for tag in ("test/img:1", "oci", "localhost:5000/team/app:v1.2_rc", "x" * 255):
        assert ImageStore().import_tarball(io.BytesIO(saved()), tag).tag == tag


@pytest.mark.parametrize("spelling", [DEFAULT_IMAGE, "docker.io/matchlock/busybox:builtin"])
def test_builtin_name_is_reserved(cache_dir, spelling):
    imported = run_matchlock("image", "import", spelling, input=saved())
    assert imported.returncode == 2 and "is reserved for the built-in image" in imported.stderr.decode()
    assert imported.stderr.decode().count("\n") == 1
    tagged = run_matchlock("pull", "-t", spelling, "localhost:1/never/pulled:1")
    assert tagged.returncode == 2 and "is reserved for the built-in image" in tagged.stderr, tagged
    assert "Pulling" not in tagged.stdout  # refused before any request
    pulled = run_matchlock("pull", spelling)
    assert pulled.returncode == 2 and "is the built-in image" in pulled.stderr, pulled
    store = ImageStore()
    info = store.import_tarball(io.BytesIO(saved()), "mine:1")
    with pytest.raises(UsageError, match="reserved"):
        store.tag(spelling, info)
    with pytest.raises(UsageError, match="reserved"):
        store.import_tarball(io.BytesIO(saved()), spelling)
    assert [i.tag for i in store.images()] == ["mine:1"]


def _replace_builtin_row(cache: Path) -> None:
    """What an older matchlock let `image import matchlock/busybox:builtin` do."""
    ImageStore().import_tarball(io.BytesIO(saved()), "impostor:1")
    conn = sqlite3.connect(cache / "images" / "metadata.db")
    with conn:
        conn.execute("DELETE FROM images WHERE tag = ?", (DEFAULT_IMAGE,))
        conn.execute("UPDATE images SET tag = ? WHERE tag = 'impostor:1'", (DEFAULT_IMAGE,))
    conn.close()


def test_setup_repairs_a_replaced_builtin(busybox_cache):
    store = ImageStore()
    built = store.resolve(DEFAULT_IMAGE)
    _replace_builtin_row(busybox_cache)
    assert store.get(DEFAULT_IMAGE).source == "import"
    note = _builtin_image()
    assert note.startswith("rebuilt because it was replaced by a import image") and str(built.lower_path) in note
    repaired = store.get(DEFAULT_IMAGE)
    assert repaired.source == "builtin" and repaired.digest == built.digest
    assert _builtin_image() == str(built.lower_path)  # intact now: nothing to repair


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_setup_and_run_repair_a_damaged_builtin_disk(busybox_cache, damage):
    store = ImageStore()
    built = store.resolve(DEFAULT_IMAGE)
    disk = built.lower_path
    if damage == "delete":
        disk.unlink()
    elif damage == "truncate":
        disk.write_bytes(disk.read_bytes()[: built.size // 2])
    else:
        disk.write_bytes(b"\0" * built.size)
    info, problem = store.ensure_builtin()
    expected = {"delete": "cannot be read", "truncate": "bytes, not the", "garbage": "is not an erofs image"}[damage]
    assert expected in problem and str(disk) in problem
    assert info.source == "builtin" and info.lower_path.stat().st_size == built.size
    assert store.ensure_builtin() == (info, "")
    # `run` resolves through the store too: it repairs a replaced entry instead of booting the impostor.
    _replace_builtin_row(busybox_cache)
    assert store.resolve(DEFAULT_IMAGE).source == "builtin"


def test_close_matches_prefer_the_same_repository():
    known = ["x/y:1", "x/z:2", "alpine:3.20", "docker.io/x/y:7", "other/thing:1"]
    assert close_matches("x/y:2", known)[:2] == ["x/y:1", "docker.io/x/y:7"]
    assert close_matches("alpine:3.02", known) == ["alpine:3.20"]
    assert close_matches("nothing/like:it", known) == []


def test_local_typo_says_no_local_image_matched(cache_dir):
    port = free_port()  # nothing listens there: the pull fails fast, on loopback only
    ImageStore().import_tarball(io.BytesIO(saved()), f"localhost:{port}/team/app:1")
    result = run_matchlock("run", "--image", f"localhost:{port}/team/app:2", "--", "true", env=FAST_RETRIES)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    missed = f"no local image matched localhost:{port}/team/app:2 (close local images: localhost:{port}/team/app:1)"
    assert lines[0] == f"{missed}; pulling localhost:{port}/team/app:2"
    retries = [line for line in lines if line.startswith("retrying in ")]
    # 3 attempts = 2 waits, for HTTPS and then plain HTTP (allowed on loopback).
    assert len(retries) == 4 and all(f": localhost:{port}: ConnectError" in line for line in retries), lines
    assert lines[-1].startswith(
        f"Error: {missed}; pulling localhost:{port}/team/app:2 failed: "
        f"network failure talking to registry localhost:{port}: ConnectError"
    )
    assert len(lines) == 6 and "Traceback" not in result.stderr


def test_a_miss_that_is_no_reference_says_so(cache_dir):
    ImageStore().import_tarball(io.BytesIO(saved()), "team/app:1")
    result = run_matchlock("run", "--image", "team/App:1", "--", "true")
    assert result.returncode == 2, result
    assert result.stderr == (
        "Error: no local image matched team/App:1 (close local images: team/app:1); invalid image reference "
        "'team/App:1': repository names are lowercase letters and digits separated by single . _ - or /, "
        "e.g. team/app:1.0\n"
    )


def test_unreachable_registry_reports_every_retry(cache_dir):
    port = free_port()
    result = run_matchlock("pull", f"127.0.0.1:{port}/x/y:1", env=FAST_RETRIES)
    assert result.returncode == 1
    retries = [line for line in result.stderr.splitlines() if line.startswith("retrying in ")]
    assert len(retries) == 4 and all(f"127.0.0.1:{port}: ConnectError" in line for line in retries), result


def test_line_progress_prints_a_line_per_layer():
    out = io.StringIO()
    progress = LineProgress(out)
    progress.layer("sha256:" + "a" * 64, 3 * 1024 * 1024)(100)
    progress.done("sha256:" + "a" * 64)
    progress.layer("sha256:" + "b" * 64, 2048)
    progress.done("sha256:" + "b" * 64, "exists")
    progress.retry(0.5, "localhost:1: ConnectError: refused")
    assert out.getvalue().splitlines() == [
        "aaaaaaaaaaaa: downloaded (3.0 MB)",
        "bbbbbbbbbbbb: already present (2.0 kB)",
        "retrying in 0.5s: localhost:1: ConnectError: refused",
    ]


def test_validate_new_tag_refuses_digests():
    with pytest.raises(UsageError, match="a digest names content, not a tag"):
        validate_new_tag("team/app@sha256:" + "0" * 64)
