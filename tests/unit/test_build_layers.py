"""Build layers: the context's escapes, deterministic layer tars, RUN diffs against a tree (matchlock build)."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import pytest

from matchlock.api.errors import ImageError, UsageError
from matchlock.build import diff
from matchlock.build.context import MAX_ENV, BuildContext
from matchlock.build.tree import LayerWriter, Tree, tar_member_opener


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = fields.pop("mtime", 1000)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def base_tree(tmp_path: Path) -> Tree:
    tree = Tree()
    tree.apply(write_tar(tmp_path / "base.tar", [
        _member("bin", tarfile.DIRTYPE), _member("bin/sh", data=b"shell"), _member("bin/vi", data=b"vi"),
        _member("etc", tarfile.DIRTYPE), _member("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\napp:x:10:20::/:/bin/sh\n"),
        _member("etc/hosts", data=b"127.0.0.1 localhost\n"),
        _member("cache", tarfile.DIRTYPE), _member("cache/a", data=b"a"), _member("cache/b", data=b"b"),
        _member("lib", tarfile.SYMTYPE, linkname="usr/lib"), _member("usr", tarfile.DIRTYPE),
        _member("usr/lib", tarfile.DIRTYPE),
    ]))  # fmt: skip
    return tree


def layer_names(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name.rstrip("/"): m for m in tar.getmembers()}


def test_layer_writer_is_deterministic_and_sorted(tmp_path):
    def build(order):
        writer = LayerWriter()
        for name in order:
            info, data = _member(name, data=name.encode(), uname="someone", mtime=1234)
            writer.add(tuple(name.split("/")), info, lambda data=data: io.BytesIO(data))
        return writer.write(tmp_path / "out")

    first, second = build(["b", "a/x", "a"]), build(["a", "b", "a/x"])
    assert first[0] == second[0]
    with tarfile.open(first[1]) as tar:
        assert tar.getnames() == ["a", "a/x", "b"]
        assert {m.uname for m in tar.getmembers()} == {""}


def test_source_date_epoch_clamps_mtimes(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "10")
    writer = LayerWriter()
    info, _ = _member("f", mtime=99999)
    writer.add(("f",), info, lambda: io.BytesIO(b""))
    _, path = writer.write(tmp_path)
    assert layer_names(path)["f"].mtime == 10


def guest_tar(tmp_path: Path, members) -> Path:
    return write_tar(tmp_path / "guest.tar", members)


def unchanged_guest(extra=(), skip=()) -> list:
    members = [
        _member("bin", tarfile.DIRTYPE, mtime=5), _member("bin/sh", data=b"shell"), _member("bin/vi", data=b"vi"),
        _member("etc", tarfile.DIRTYPE), _member("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\napp:x:10:20::/:/bin/sh\n"),
        _member("etc/hosts", data=b"127.0.0.1 changed by the agent\n", mtime=5000),
        _member("cache", tarfile.DIRTYPE), _member("cache/a", data=b"a"), _member("cache/b", data=b"b"),
        _member("lib", tarfile.SYMTYPE, linkname="usr/lib"), _member("usr", tarfile.DIRTYPE),
        _member("usr/lib", tarfile.DIRTYPE),
    ]  # fmt: skip
    return [m for m in members if m[0].name not in skip] + list(extra)


def run_diff(tmp_path, members) -> dict[str, tarfile.TarInfo]:
    tree = base_tree(tmp_path)
    tar, guest = diff.read_guest_tar(guest_tar(tmp_path, members))
    assert tar is not None
    _, path = diff.diff_layer(tree, tar, guest).write(tmp_path / "layers")
    tar.close()
    return layer_names(path)


def test_an_unchanged_root_gives_an_empty_layer(tmp_path):
    assert run_diff(tmp_path, unchanged_guest()) == {}  # the agent's /etc/hosts is not the step's


def test_changes_whiteouts_and_opaque_directories(tmp_path):
    members = unchanged_guest(
        skip={"bin/vi", "cache/a", "cache/b"},
        extra=[_member("bin/new", data=b"new", uid=10), _member("tmp", tarfile.DIRTYPE), _member("tmp/x", data=b"x")],
    )
    names = run_diff(tmp_path, members)
    assert set(names) == {"bin", "bin/new", "bin/.wh.vi", "cache/.wh..wh..opq"}
    assert names["bin/new"].uid == 10


def test_a_changed_mode_or_content_is_captured(tmp_path):
    members = unchanged_guest(skip={"bin/sh", "cache/a"})
    members += [_member("bin/sh", data=b"shell", mode=0o4755), _member("cache/a", data=b"A", mtime=2000)]
    assert set(run_diff(tmp_path, members)) == {"bin", "bin/sh", "cache", "cache/a"}


def test_a_hardlink_to_an_unchanged_file_is_stored_as_a_file(tmp_path):
    members = unchanged_guest(extra=[_member("bin/sh2", tarfile.LNKTYPE, linkname="bin/sh")])
    names = run_diff(tmp_path, members)
    assert names["bin/sh2"].isreg() and names["bin/sh2"].size == 5


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("../escape", data=b"x"), "invalid path"),
        (_member("/abs", data=b"x"), "invalid path"),
        (_member("a/../../b", data=b"x"), "invalid path"),
        (_member("link", tarfile.LNKTYPE, linkname="missing"), "not an earlier file"),
    ],
)
def test_hostile_guest_tars_are_refused(tmp_path, member, message):
    with pytest.raises(ImageError, match=message):
        diff.read_guest_tar(guest_tar(tmp_path, [member]))


def test_duplicate_guest_entries_are_refused(tmp_path):
    with pytest.raises(ImageError, match="twice"):
        diff.read_guest_tar(guest_tar(tmp_path, [_member("a", data=b"1"), _member("a", data=b"2")]))


def test_a_tar_member_opener_reads_the_data_or_names_the_entry_and_the_fix(tmp_path):
    path = write_tar(tmp_path / "a.tar", [_member("f", data=b"data"), _member("d", tarfile.DIRTYPE)])
    with tarfile.open(path) as tar:
        regular, directory = tar.getmembers()
        with tar_member_opener(tar, regular, "ADD a.tar")() as data:
            assert data.read() == b"data"
        message = "ADD a.tar: tar entry 'd' (type b'5') has no file data; fix: make it a regular file or remove it"
        with pytest.raises(ImageError, match=re.escape(message)):
            tar_member_opener(tar, directory, "ADD a.tar")()


def test_tree_resolves_symlinks_inside_its_root(tmp_path):
    tree = base_tree(tmp_path)
    assert tree.resolve("/lib/x") == ("usr", "lib", "x")
    assert tree.resolve("/../../etc/passwd") == ("etc", "passwd")
    assert tree.lookup_id("passwd", "app") == 10 and tree.lookup_id("passwd", "nobody") is None


@pytest.fixture
def context(tmp_path) -> Path:
    root = tmp_path / "ctx"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.log").write_text("b")
    (root / "sub" / "c.txt").write_text("c")
    (root / ".dockerignore").write_text("sub/*.log\n")
    (tmp_path / "outside").write_text("secret")
    os.symlink("../outside", root / "escape")
    os.symlink("sub", root / "inner")
    return root


def test_context_sources_and_ignore(context):
    ctx = BuildContext(context)
    assert [s.relative for s in ctx.resolve("a.txt")] == ["a.txt"]
    assert [s.relative for s in ctx.resolve("inner/c.txt")] == ["sub/c.txt"]  # a symlink inside is followed
    assert [s.relative for s in ctx.walk(ctx.resolve("sub")[0])] == ["sub", "sub/c.txt"]
    assert [s.relative for s in ctx.resolve("*.txt")] == ["a.txt"]
    with pytest.raises(UsageError, match="excluded by .dockerignore"):
        ctx.resolve("sub/b.log")
    with pytest.raises(UsageError, match="'missing.txt' not found in the build context"):
        ctx.resolve("missing.txt")


@pytest.mark.parametrize("source", ["../outside", "sub/../../outside", "escape"])
def test_context_escapes_are_refused(context, source):
    with pytest.raises(UsageError, match="outside the build context|leaves the build context"):
        BuildContext(context).resolve(source)


def test_context_digest_follows_content_not_mtime(context):
    ctx = BuildContext(context)
    before = ctx.digest(ctx.resolve("sub"))
    os.utime(context / "sub" / "c.txt", (1, 1))
    assert BuildContext(context).digest(ctx.resolve("sub")) == before
    (context / "sub" / "c.txt").write_text("changed")
    assert BuildContext(context).digest(ctx.resolve("sub")) != before


def test_context_over_the_limit_is_refused(context, monkeypatch):
    monkeypatch.setenv(MAX_ENV, "1")
    (context / "big").write_bytes(b"x" * (2 << 20))
    with pytest.raises(UsageError, match=f"more than 1 MB.*{MAX_ENV}"):
        BuildContext(context)
