"""RUN --mount specs (parsing, every key checked), serving them on the host, leaving them out of the layer,
and COPY --from=<image> (a locally built image read as an implicit stage; no VM)."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import tarfile
from contextlib import ExitStack
from pathlib import Path

import pytest
from test_build_layers import _member, write_tar
from test_build_scratch import build, files_of

from matchlock.api.errors import UsageError
from matchlock.build import diff, mounts
from matchlock.build import dockerfile as df
from matchlock.build.builder import Builder, BuildOptions, StageState
from matchlock.build.context import BuildContext
from matchlock.build.tree import Tree
from matchlock.image.store import ImageStore
from matchlock.vfs.types import Limits

WHERE = "ctx/Dockerfile:3"


def spec(text: str, workdir: str = "/work") -> mounts.MountSpec:
    return mounts.parse(text, workdir, WHERE)


def test_cache_bind_and_tmpfs_specs_with_their_defaults():
    cache = spec("type=cache,target=/root/.cache")
    assert (cache.type, cache.target, cache.id, cache.sharing, cache.mode, cache.uid, cache.gid, cache.readonly) == (
        "cache", "/root/.cache", "/root/.cache", "shared", 0o755, 0, 0, False,
    )  # fmt: skip
    cache = spec("TYPE=cache,dst=pip,id=pip-cache,sharing=locked,mode=0700,uid=1000,gid=100,ro")
    assert (cache.target, cache.id, cache.sharing, cache.mode, cache.uid, cache.gid, cache.readonly) == (
        "/work/pip", "pip-cache", "locked", 0o700, 1000, 100, True,
    )  # fmt: skip  # a relative target is under WORKDIR, keys are case-insensitive, dst/ro are aliases
    bind = spec("target=/src")  # BuildKit's default type is bind: the context root, read-only
    assert (bind.type, bind.source, bind.source_from, bind.readonly) == ("bind", "", "", True)
    bind = spec('type=bind,src=/sub/../app/,from=builder,"target=/mnt/x",rw')
    assert (bind.source, bind.source_from, bind.target, bind.readonly) == ("app", "builder", "/mnt/x", False)
    assert spec("type=bind,target=/x,rw=false").readonly
    assert spec("type=tmpfs,target=/scratch,size=64m").size == 64 << 20
    assert spec("type=tmpfs,target=/scratch,size=4096").size == 4096
    assert spec("type=tmpfs,target=/scratch").size == 0
    assert mounts.MAX_TMPFS == Limits.memory_bytes  # the bound a memory mount really has


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type=secret", "a secret mount needs id=NAME (or target=PATH"),
        ("type=secret,id=t,size=1", "key 'size' is not accepted for type=secret; accepted: type, id, target, requ"),
        ("type=secret,id=t,required=maybe", "required='maybe' is not a boolean"),
        ("type=secret,id=t,mode=8", "mode='8' is not an octal mode"),
        ("type=ssh", "type=ssh is not supported"),
        ("type=volume,target=/x", "unknown type='volume'; accepted types: bind, cache, tmpfs, secret"),
        ("type=cache,target=/x,bogus=1", "key 'bogus' is not accepted for type=cache; accepted: type, target, id"),
        ("type=cache,target=/x,from=base", "key 'from' is not accepted for type=cache (seeding a cache"),
        ("type=tmpfs,target=/x,rw", "key 'rw' is not accepted for type=tmpfs"),
        ("type=bind,target=/x,sharing=locked", "key 'sharing' is not accepted for type=bind"),
        ("type=cache", "target is required"),
        ("type=cache,target=", "target is required"),
        ("type=cache,target=/", "mount target '/': it cannot replace the guest's root"),
        ("type=cache,target=/proc/x", "/proc is the guest's own"),
        ("type=cache,target=/a b", "letters, digits"),
        ("type=bind,target=/x,source=../up", "source='../up' leads out of the build context"),
        ("type=bind,target=/x,source=a/../../up,from=base", "leads out of the root of base"),
        ("type=bind,target=/x,rw,readonly", "rw and readonly contradict"),
        ("type=bind,target=/x,rw=maybe", "rw='maybe' is not a boolean"),
        ("type=cache,target=/x,sharing=exclusive", "sharing='exclusive' is not one of shared, private, locked"),
        ("type=cache,target=/x,mode=0999", "mode='0999' is not an octal mode"),
        ("type=cache,target=/x,uid=-1", "uid='-1' is not a whole number"),
        ("type=cache,target=/x,id", "key 'id' needs a value"),
        ("type=cache,target=/x,target=/y", "key 'target' is given twice"),
        ("type=tmpfs,target=/x,size=lots", "size='lots' is not a size"),
        ("type=tmpfs,target=/x,size=2g", "at most 512m"),
        ('type=cache,"target=/x', "not a valid comma-separated list"),
    ],
)
def test_bad_specs_are_refused_naming_file_line_and_the_fix(text, message):
    with pytest.raises(UsageError) as caught:
        spec(text)
    assert str(caught.value).startswith(f"{WHERE}: RUN --mount={text}: "), caught.value
    assert message in str(caught.value)


def test_two_mounts_on_one_target_are_refused():
    with pytest.raises(UsageError, match=f"{WHERE}: RUN has two --mount with target /work/x"):
        mounts.parse_all(["type=cache,target=x", "type=tmpfs,target=/work/x"], "/work", WHERE)


def test_repeated_mount_flags_are_kept_in_order_and_keyed():
    text = "FROM scratch\nRUN --mount=type=cache,target=/a --mount=type=bind,target=/b echo hi\nRUN echo hi\n"
    run, plain = df.parse(text).stages[0].instructions
    assert run.mounts == ("type=cache,target=/a", "type=bind,target=/b") and run.flags == {}
    assert run.text == "echo hi" == plain.text
    assert df.canonical(run) != df.canonical(plain)
    other = df.parse(text.replace("target=/a", "target=/c")).stages[0].instructions[0]
    assert df.canonical(other) != df.canonical(run)
    assert mounts.from_value("type=bind,target=/b,from=builder") == "builder"
    assert mounts.from_value("type=cache,target=/a") == ""
    with pytest.raises(UsageError, match="Dockerfile:2: unsupported flag '--mount' for COPY"):
        df.parse("FROM scratch\nCOPY --mount=type=cache,target=/a a b\n")


def test_capture_leaves_mount_targets_out_but_keeps_the_ways_to_them():
    assert diff.capture_script(()) == diff.CAPTURE_SCRIPT
    assert diff.capture_script((("tmp", "x"),)) == diff.CAPTURE_SCRIPT  # /tmp is never captured anyway
    script = diff.capture_script((("var", "cache", "apk"), ("cache",)))
    assert "tar -c --no-recursion -f - var var/cache || exit;" in script
    assert "cache|var|var/cache|var/cache/apk) continue" in script


def test_a_steps_layer_holds_nothing_at_or_below_a_mount_target(tmp_path):
    tree = Tree()
    tree.apply(write_tar(tmp_path / "base.tar", [
        _member("var", tarfile.DIRTYPE), _member("var/cache", tarfile.DIRTYPE),
        _member("var/cache/apk", tarfile.DIRTYPE), _member("var/cache/apk/index", data=b"old"),
        _member("var/cache/other", data=b"o"),
    ]))  # fmt: skip
    # The step removed var/cache/other; the guest sent the cache's files anyway (a guest may): left out.
    guest_tar = write_tar(tmp_path / "guest.tar", [
        _member("var", tarfile.DIRTYPE), _member("var/cache", tarfile.DIRTYPE),
        _member("var/cache/apk", tarfile.DIRTYPE, mode=0o777), _member("var/cache/apk/new", data=b"cached"),
        _member("work", tarfile.DIRTYPE), _member("work/out", data=b"built"),
    ])  # fmt: skip
    hidden = (("var", "cache", "apk"), ("ctx",))
    tar, entries = diff.read_guest_tar(guest_tar, hidden)
    assert ("var", "cache", "apk") not in entries and ("var", "cache", "apk", "new") not in entries
    diff_id, layer = diff.diff_layer(tree, tar, entries, hidden).write(tmp_path / "layers")
    tar.close()
    with tarfile.open(layer) as out:
        names = out.getnames()
    # The apk directory is the only other child of var/cache, yet var/cache is not made opaque: the image's
    # var/cache/apk/index stays, the removed file is a whiteout.
    assert names == ["var/cache/.wh.other", "work", "work/out"]


def test_directories_made_only_on_the_way_to_a_mount_point_are_left_out(tmp_path):
    tree = Tree()
    tree.apply(write_tar(tmp_path / "base.tar", [_member("etc", tarfile.DIRTYPE), _member("srv", tarfile.DIRTYPE)]))
    guest_tar = write_tar(tmp_path / "guest.tar", [
        _member("etc", tarfile.DIRTYPE), _member("etc/app", tarfile.DIRTYPE),  # stubs of etc/app/conf/token
        _member("etc/app/conf", tarfile.DIRTYPE),
        _member("srv", tarfile.DIRTYPE), _member("srv/used", tarfile.DIRTYPE),  # the step also wrote in it
        _member("srv/used/out", data=b"x"), _member("opt", tarfile.DIRTYPE),  # a stub of opt/c
    ])  # fmt: skip
    hidden = (("etc", "app", "conf", "token"), ("srv", "used", "m"), ("opt", "c"))
    tar, entries = diff.read_guest_tar(guest_tar, hidden)
    _, layer = diff.diff_layer(tree, tar, entries, hidden).write(tmp_path / "layers")
    tar.close()
    with tarfile.open(layer) as out:
        assert out.getnames() == ["srv", "srv/used", "srv/used/out"]


def test_two_archives_end_to_end_read_as_one_capture(tmp_path):
    first = write_tar(tmp_path / "a.tar", [_member("var", tarfile.DIRTYPE)])
    second = write_tar(tmp_path / "b.tar", [_member("var/lib", tarfile.DIRTYPE), _member("var/lib/f", data=b"x")])
    spool = tmp_path / "spool.tar"
    spool.write_bytes(first.read_bytes() + second.read_bytes())
    tar, entries = diff.read_guest_tar(spool, (("var", "cache"),))
    assert sorted(entries) == [("var",), ("var", "lib"), ("var", "lib", "f")]
    tar.close()


def serve(planned, context, tmp_path, stack, name="m"):
    return asyncio.run(mounts.serve(planned, context, tmp_path / "caches", tmp_path / name, stack, lambda s: None))


def test_cache_directories_persist_and_lock_as_their_sharing_says(tmp_path):
    context = BuildContext(_context(tmp_path))
    shared = mounts.Planned(spec("type=cache,target=/c,id=one,mode=0750,uid=12,gid=34"), "/c")
    with ExitStack() as stack:
        config = serve(shared, context, tmp_path, stack)
        directory = Path(config.host_path)
        assert (config.type, config.readonly, directory.parent) == ("host_fs", False, tmp_path / "caches")
        st = directory.stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 12, 34)
        (directory / "kept").write_text("from the first build")
        probe = os.open(directory, os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # a locked user would wait for this shared one
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        private = mounts.Planned(spec("type=cache,target=/c,id=one,sharing=private"), "/c")
        assert serve(private, context, tmp_path, stack).host_path == f"{directory}-1"  # the held one is skipped
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # all released with the step
    os.close(probe)
    with ExitStack() as stack:
        again = serve(mounts.Planned(spec("type=cache,target=/other,id=one,sharing=locked,ro"), "/c"), context,
                      tmp_path, stack)  # fmt: skip
        assert again.host_path == str(directory) and again.readonly
        assert (directory / "kept").read_text() == "from the first build"
        default = serve(mounts.Planned(spec("type=cache,target=/root/.cache"), "/root/.cache"), context, tmp_path,
                        stack)  # fmt: skip
        assert Path(default.host_path).name == mounts.cache_name("/root/.cache")  # id defaults to the target


def _context(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "app" / "logs").mkdir(parents=True)
    (root / "app" / "main.py").write_text("print('hi')\n")
    (root / "app" / "logs" / "debug.log").write_text("noise\n")
    (root / "top.txt").write_text("top\n")
    return root


def test_bind_mounts_of_the_context_show_only_what_dockerignore_lets_through(tmp_path):
    root = _context(tmp_path)
    plain = BuildContext(root)
    app = plain.locate("app", "RUN --mount source")
    with ExitStack() as stack:
        config = serve(mounts.Planned(spec("type=bind,target=/src,source=app"), "/src", context=app), plain,
                       tmp_path, stack)  # fmt: skip
        assert (config.type, config.host_path, config.readonly) == ("host_fs", str(root / "app"), True)
        rw = serve(mounts.Planned(spec("type=bind,target=/src,source=app,rw"), "/src", context=app), plain,
                   tmp_path, stack)  # fmt: skip
        assert (rw.type, rw.host_path) == ("overlay", str(root / "app"))  # writes stay in the guest
        one = plain.locate("top.txt", "RUN --mount source")
        copy = serve(mounts.Planned(spec("type=bind,target=/t,source=top.txt,rw"), "/t", context=one), plain,
                     tmp_path, stack, "copy")  # fmt: skip
        assert (copy.type, copy.readonly, Path(copy.host_path).read_text()) == ("host_fs", False, "top\n")
        assert copy.host_path != str(root / "top.txt")

    (root / ".dockerignore").write_text("**/*.log\n")
    filtered = BuildContext(root)
    app = filtered.locate("app", "RUN --mount source")
    with ExitStack() as stack:
        config = serve(mounts.Planned(spec("type=bind,target=/src,source=app"), "/src", context=app), filtered,
                       tmp_path, stack, "farm")  # fmt: skip
    farm = Path(config.host_path)
    assert farm == tmp_path / "farm" and config.readonly
    assert sorted(str(p.relative_to(farm)) for p in farm.rglob("*")) == ["logs", "main.py"]
    assert (farm / "main.py").stat().st_ino == (root / "app" / "main.py").stat().st_ino  # a hard link
    with pytest.raises(UsageError, match=r"RUN --mount source 'app/logs/debug.log' not found .*\.dockerignore"):
        filtered.locate("app/logs/debug.log", "RUN --mount source")
    with pytest.raises(UsageError, match="RUN --mount source 'nope' not found in the build context"):
        filtered.locate("nope", "RUN --mount source")


def test_bind_mounts_from_a_tree_are_a_private_copy_that_never_writes_through_a_symlink(tmp_path):
    tree = Tree()
    tree.apply(write_tar(tmp_path / "stage.tar", [
        _member("out", tarfile.DIRTYPE, mode=0o750, uid=7, gid=8), _member("out/bin", data=b"binary", mode=0o755),
        _member("out/link", tarfile.SYMTYPE, linkname="/etc"), _member("out/link/evil", data=b"x"),
        _member("out/hard", tarfile.LNKTYPE, linkname="out/bin"),
    ]))  # fmt: skip
    context = BuildContext(_context(tmp_path))
    with ExitStack() as stack:
        config = serve(mounts.Planned(spec("type=bind,target=/o,from=s"), "/o", tree=tree, tree_parts=("out",)),
                       context, tmp_path, stack)  # fmt: skip
    copy = Path(config.host_path)
    assert (config.type, config.readonly) == ("host_fs", True)
    assert (copy.stat().st_mode & 0o7777, copy.stat().st_uid, copy.stat().st_gid) == (0o750, 7, 8)
    assert (copy / "bin").read_bytes() == (copy / "hard").read_bytes() == b"binary"
    assert os.readlink(copy / "link") == "/etc" and not Path("/etc/evil").exists()
    tree.close()


def test_copy_from_an_image_reads_it_as_an_implicit_stage_keyed_by_its_digest(tmp_path, cache_dir, state_dir):
    base = tmp_path / "base"
    base.mkdir()
    (base / "tool").write_text("tool v1\n")
    (base / "Dockerfile").write_text("FROM scratch\nCOPY --chmod=0755 tool /opt/tool\n")
    build(base, "test/tool:1")
    app = tmp_path / "app"
    app.mkdir()
    (app / "Dockerfile").write_text(
        "FROM scratch\nARG SRC=test/tool:1\nCOPY --from=${SRC} --chown=5:6 /opt/tool /bin/\n"
        "COPY --from=test/tool:1 /opt /copied\n"
    )
    info, lines = build(app, "test/app:1")
    (tmp_path / "x").mkdir()
    _, files = files_of(ImageStore(), info, tmp_path / "x")
    assert (files["bin/tool"].uid, files["bin/tool"].gid, files["bin/tool"].mode) == (5, 6, 0o755)
    assert "copied/tool" in files
    assert not any("CACHED" in line for line in lines)
    again, lines = build(app, "test/app:1")
    assert again.digest == info.digest and sum(line.endswith("CACHED") for line in lines) == 2

    (base / "tool").write_text("tool v2\n")  # a new image under the same tag: its digest misses the cache
    build(base, "test/tool:1")
    changed, lines = build(app, "test/app:1")
    assert not any(line.endswith("CACHED") for line in lines) and changed.digest != info.digest
    with tarfile.open(fileobj=io.BytesIO(_layer_bytes(changed))) as layer:
        assert layer.extractfile("bin/tool").read() == b"tool v2\n"


def _layer_bytes(info) -> bytes:
    store = ImageStore()
    records = store.layer_records(info)
    return store.layer_path(records[0].digest).read_bytes()


def test_mount_errors_are_found_before_any_vm_boots(tmp_path, cache_dir, state_dir, monkeypatch):
    monkeypatch.setenv("MATCHLOCK_PULL_RETRIES", "1")
    root = _context(tmp_path)
    for line, message in [
        ("RUN --mount=type=secret,id=x,required true", "Dockerfile:4: RUN --mount=type=secret,id=x is required but"),
        ("RUN --mount=type=bind,source=nope,target=/x true", "Dockerfile:4: RUN --mount source 'nope' not found"),
        (  # neither a stage nor an image: the store misses, and a loopback registry that refuses
            "RUN --mount=type=bind,from=127.0.0.1:9/no:1,target=/x true",
            "RUN --mount from=127.0.0.1:9/no:1: '127.0.0.1:9/no:1' is neither an earlier stage",
        ),
        ("RUN --mount=type=cache,target=/a --mount=type=cache,target=/b/../a true", "two --mount with target /a"),
        ("RUN --mount=type=cache,target=/top.txt true", "/top.txt is a file in the image but the mount is a dir"),
        ("RUN --mount=type=bind,source=top.txt,target=/app true", "/app is a directory in the image but the mount"),
    ]:
        (root / "Dockerfile").write_text(f"FROM scratch\nCOPY top.txt /\nCOPY app /app\n{line}\n")
        with pytest.raises(UsageError, match=message):
            build(root, "test/bad:1")


def test_a_bind_mounts_sources_content_keys_the_step_a_caches_content_does_not(tmp_path, cache_dir, state_dir):
    root = _context(tmp_path)
    text = "FROM scratch\nRUN --mount=type=bind,source=app,target=/src --mount=type=cache,target=/c make\n"
    (root / "Dockerfile").write_text(text)

    def plan():
        builder = Builder(BuildOptions(context=root, tag="test/k:1"), lambda s: None, lambda d: None)
        inst = builder.file.stages[0].instructions[0]
        return [
            (p.spec.key(), p.guest, p.digest)
            for p in builder._plan_mounts(StageState([], {}, Tree(), "k"), inst, WHERE)
        ]

    first = plan()
    assert [guest for _, guest, _ in first] == ["/src", "/c"]
    (root / "app" / "main.py").write_text("print('changed')\n")
    changed = plan()
    assert changed[0][2] != first[0][2] and changed[1] == first[1]
