"""`matchlock build --secret id=...` and `RUN --mount=type=secret`: parsing, checks, serving, the cache key."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from matchlock.api.errors import UsageError
from matchlock.api.vfs import MemoryFile, MountConfig, VFSConfig
from matchlock.build import mounts
from matchlock.build import secrets as build_secrets
from matchlock.build.builder import Builder, BuildOptions, StageState
from matchlock.build.context import BuildContext
from matchlock.build.tree import Tree
from matchlock.sandbox.vfs import SandboxVFS

VALUE = b"s3cr3t-value-\x00\xff-end"
WHERE = "ctx/Dockerfile:2"


def test_file_secrets_are_told_from_network_secrets_by_their_first_key():
    for spec in ("id=tok", "id=tok,src=/f", "src=/f,id=tok", "env=X,id=t", "type=env,id=t", "source=/f,id=t"):
        assert build_secrets.is_file_secret(spec), spec
    for spec in ("TOKEN=abc@api.example.com", "TOKEN@api.example.com", "ID=x@h", "idx=1@h"):
        assert not build_secrets.is_file_secret(spec), spec


def test_a_secret_comes_from_a_file_a_variable_or_by_default_from_its_id(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_bytes(VALUE)
    environ = {"MY_VAR": "from-env", "tok": "from-default-env"}
    assert build_secrets.parse(f"id=a,src={path}", environ).data == VALUE
    assert build_secrets.parse(f"ID=a,Source={path}", environ).data == VALUE  # keys are case-insensitive
    assert build_secrets.parse("id=a,env=MY_VAR", environ).data == b"from-env"
    assert build_secrets.parse("id=a,type=env,src=MY_VAR", environ).data == b"from-env"
    assert build_secrets.parse("id=tok", environ).data == b"from-default-env"  # $id when it is set...
    monkeypatch.chdir(tmp_path)
    secret = build_secrets.parse("id=token", environ)  # ...else the file named by the id
    assert (secret.data, secret.origin) == (VALUE, "file token")
    assert VALUE.decode(errors="replace") not in repr(secret) and "s3cr3t" not in repr(secret)
    many = build_secrets.parse_all([f"id=a,src={path}", "id=b,env=MY_VAR"], environ)
    assert {k: v.data for k, v in many.items()} == {"a": VALUE, "b": b"from-env"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("src=/etc/hostname", "id is required (id=NAME"),
        ("id=", "key 'id' needs a value"),
        ("id=a,bogus=1", "unknown key 'bogus'; accepted: id, src (or source), env, type"),
        ("id=a,id=b", "key 'id' is given twice"),
        ("id=a b", "may hold only letters, digits"),
        ("id=a,type=ssh", "type='ssh' is not file or env"),
        ("id=a,src=/x,env=Y", "give src= (a file) or env= (a variable), not both"),
        ("id=a,env=NOT_SET_ANYWHERE", "$NOT_SET_ANYWHERE is not set; fix: export it, or give src=PATH"),
        ("id=a,src=/nonexistent/file", "cannot read /nonexistent/file: No such file or directory; fix: give src="),
        ("id=a,src=/", "/ is not a regular file"),
        ('id=a,"src=/x', "not a valid comma-separated list"),
    ],
)
def test_bad_secret_flags_are_refused_naming_the_value_and_the_fix(spec, message):
    with pytest.raises(UsageError) as caught:
        build_secrets.parse(spec, {})
    assert str(caught.value).startswith(f"--secret {spec}: "), caught.value
    assert message in str(caught.value)


def test_duplicate_ids_and_oversized_values_are_refused(tmp_path):
    with pytest.raises(UsageError, match="id 'a' is given twice; fix: give each secret its own id"):
        build_secrets.parse_all(["id=a,env=X", "id=a,env=X"], {"X": "1"})
    big = tmp_path / "big"
    big.write_bytes(b"x" * (500 * 1024 + 1))
    with pytest.raises(UsageError, match=r"holds 512001 bytes, over the 512000 \(500 KiB\)"):
        build_secrets.parse(f"id=a,src={big}", {})
    big.write_bytes(b"x" * (500 * 1024))
    assert len(build_secrets.parse(f"id=a,src={big}", {}).data) == 500 * 1024
    os.mkfifo(tmp_path / "fifo")  # refused without blocking on a writer
    with pytest.raises(UsageError, match="is not a regular file"):
        build_secrets.parse(f"id=a,src={tmp_path / 'fifo'}", {})


def test_the_cli_exits_2_on_a_bad_secret_before_reading_the_dockerfile(tmp_path, state_dir):
    args = [sys.executable, "-m", "matchlock", "build", "-t", "test/s:1", "--secret", "id=a,env=UNSET_X_Y"]
    done = subprocess.run([*args, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "Error: --secret id=a,env=UNSET_X_Y: $UNSET_X_Y is not set; fix: export it" in done.stderr
    network = subprocess.run([*args[:-1], "TOKEN@api.example.com", str(tmp_path)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "TOKEN": "x"})  # fmt: skip
    assert network.returncode == 2 and "build context" not in network.stderr, network  # still a network secret
    assert "Dockerfile" in network.stderr, network


def test_secret_mount_specs_with_their_defaults():
    spec = mounts.parse("type=secret,id=tok", "/work", WHERE)
    assert (spec.target, spec.id, spec.mode, spec.uid, spec.gid, spec.required, spec.readonly) == (
        "/run/secrets/tok", "tok", 0o400, 0, 0, False, True,
    )  # fmt: skip
    spec = mounts.parse("type=secret,dst=.npmrc,required,mode=0440,uid=1000,gid=100", "/home/u", WHERE)
    assert (spec.target, spec.id, spec.mode, spec.uid, spec.gid, spec.required) == (
        "/home/u/.npmrc", ".npmrc", 0o440, 1000, 100, True,
    )  # fmt: skip  # the id defaults to the target's basename, as BuildKit has it
    assert not mounts.parse("type=secret,id=a,required=false", "/", WHERE).required


def _plan(root: Path, text: str, secrets: dict) -> list[mounts.Planned]:
    (root / "Dockerfile").write_text(f"FROM scratch\n{text}\n")
    builder = Builder(BuildOptions(context=root, tag="test/s:1", secrets=secrets), lambda s: None, lambda d: None)
    inst = builder.file.stages[0].instructions[0]
    return builder._plan_mounts(StageState([], {}, Tree(), "k"), inst, WHERE)


def test_the_cache_key_holds_the_id_and_whether_given_never_the_value(tmp_path, cache_dir, state_dir):
    root = tmp_path / "ctx"
    root.mkdir()
    run = "RUN --mount=type=secret,id=tok sh -c 'cat /run/secrets/tok'"

    def key(secrets: dict) -> str:
        planned = _plan(root, run, secrets)
        return json.dumps([[p.spec.key(), p.guest, p.digest] for p in planned], default=str)

    given = key({"tok": build_secrets.BuildSecret("tok", VALUE)})
    other = key({"tok": build_secrets.BuildSecret("tok", b"another value")})
    absent = key({})
    assert given == other  # a new value does not re-run the step (BuildKit's behaviour)
    assert given != absent and '"given"' in given and '"absent"' in absent
    assert "s3cr3t" not in given and VALUE.hex() not in given
    assert absent and not any(p.secret for p in _plan(root, run, {}))


def test_a_required_secret_not_given_fails_before_any_vm(tmp_path, cache_dir, state_dir):
    root = tmp_path / "ctx"
    root.mkdir()
    with pytest.raises(UsageError, match="id=tok is required but the build was not given it; fix: matchlock build"):
        _plan(root, "RUN --mount=type=secret,id=tok,required=true true", {})


def test_a_secret_is_served_as_one_read_only_file_from_memory(tmp_path):
    spec = mounts.parse("type=secret,id=tok,mode=0440,uid=5,gid=6", "/", WHERE)
    planned = mounts.Planned(spec, spec.target, digest="given", secret=build_secrets.BuildSecret("tok", VALUE))
    scratch = tmp_path / "scratch"
    with ExitStack() as stack:
        config = asyncio.run(
            mounts.serve(planned, BuildContext(tmp_path), tmp_path / "mounts", scratch, stack, lambda s: None)
        )
    assert (config.type, config.host_path, config.readonly) == ("memory", "", True)
    assert config.file is not None and config.file.data == VALUE
    assert config.to_json() == {"type": "memory", "readonly": True}  # never serialized
    assert "s3cr3t" not in repr(config) and not scratch.exists() and not (tmp_path / "mounts").exists()
    config.validate(spec.target)
    VFSConfig(mounts={spec.target: config}).validate()

    vfs = SandboxVFS(VFSConfig(mounts={spec.target: config}), tmp_path / "sandbox", lambda e: None)
    try:
        provider = vfs.router.mounts[0].provider
        attr = provider.getattr(())
        assert (stat.S_IFMT(attr.mode), stat.S_IMODE(attr.mode), attr.uid, attr.gid, attr.size) == (
            stat.S_IFREG, 0o440, 5, 6, len(VALUE),
        )  # fmt: skip
        assert provider.open((), os.O_RDONLY).read(0, 4096) == VALUE
        assert vfs.router.mounts[0].readonly
    finally:
        vfs.router.close()
    assert not (tmp_path / "sandbox").exists()
    with pytest.raises(UsageError, match="only a memory mount can be one in-memory file"):
        MountConfig(type="host_fs", host_path=str(tmp_path), file=MemoryFile(b"x")).validate("/x")


def test_a_sandbox_holding_a_secret_file_is_never_snapshotted() -> None:
    """Its saved memory or VFS state would put the secret's bytes on disk. (A stand-in sandbox: only the
    refusal before anything is saved is under test; the store is never reached.)"""
    from types import SimpleNamespace

    from matchlock.sandbox import snapshots

    mounts = {"/run/secrets/tok": MountConfig("memory", file=MemoryFile(b"value"))}
    sandbox = SimpleNamespace(
        id="vm-0123abcd", machine=SimpleNamespace(running=True), closed=False,
        config=SimpleNamespace(vfs=VFSConfig(mounts=mounts)),
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"holds in-memory secret files \(/run/secrets/tok\)"):
        asyncio.run(snapshots.create(sandbox, None, "s", "full"))
