"""Host-only builds (FROM scratch: COPY, ADD, config; no VM), the cache, and `image export`."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import pytest

from matchlock.api.errors import UsageError
from matchlock.build.builder import Builder, BuildOptions
from matchlock.image import archive
from matchlock.image.export import export, tar_directory
from matchlock.image.store import ImageStore

DOCKERFILE = """\
ARG FLAVOUR=plain
FROM scratch AS files
ARG FLAVOUR
COPY --chmod=0600 app/ /src/
COPY <<EOF /notes/${FLAVOUR}.txt
flavour ${FLAVOUR}
EOF

FROM scratch
ENV HOME=/home/app PATH=/bin
WORKDIR app
WORKDIR data
COPY --from=files --chown=1000:1000 /src /app/
ADD bundle.tar /unpacked/
LABEL org.example.name="demo app" version=${FLAVOUR:-none}
EXPOSE 8080 53/udp
VOLUME /data
USER 1000:1000
STOPSIGNAL SIGINT
HEALTHCHECK --interval=5s --retries=2 CMD ["true"]
ENTRYPOINT ["/bin/app"]
CMD ["--serve"]
"""


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "ctx"
    (root / "app").mkdir(parents=True)
    (root / "app" / "main.txt").write_text("main\n")
    (root / "app" / "debug.log").write_text("noise\n")
    (root / ".dockerignore").write_text("**/*.log\n")
    with tarfile.open(root / "bundle.tar", "w") as tar:
        info = tarfile.TarInfo("inside/readme")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    (root / "Dockerfile").write_text(DOCKERFILE)
    return root


def build(context: Path, tag: str, **options):
    lines: list[str] = []
    builder = Builder(BuildOptions(context=context, tag=tag, **options), lines.append, lambda data: None)
    return asyncio.run(builder.build()), lines


def files_of(store: ImageStore, info, work: Path) -> tuple[dict, dict[str, tarfile.TarInfo]]:
    """Export, then read the archive back with the importer's own loader."""
    out = io.BytesIO()
    export(store, info, out, work)
    (work / "image.tar").write_bytes(out.getvalue())
    (work / "load").mkdir()
    seen: dict[str, tarfile.TarInfo] = {}
    with archive.load_archive(work / "image.tar", work / "load") as image:
        config = image.config
        for layer in image.layers:
            for member in layer.getmembers():
                seen[member.name.rstrip("/")] = member
    return config, seen


def test_scratch_build_config_layers_cache_and_export(project, cache_dir, state_dir, tmp_path):
    info, lines = build(project, "demo/app:1", build_args={"FLAVOUR": "spicy"})
    store = ImageStore()
    config, files = files_of(store, info, tmp_path)
    c = config["config"]
    assert c["Env"] == ["HOME=/home/app", "PATH=/bin"]
    assert c["WorkingDir"] == "/app/data" and c["User"] == "1000:1000"
    assert c["Entrypoint"] == ["/bin/app"] and c["Cmd"] == ["--serve"]
    # A global ARG is in a stage's scope only where the stage declares it again (stage 1 does, stage 2 not).
    assert c["Labels"] == {"org.example.name": "demo app", "version": "none"}
    assert c["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}} and c["Volumes"] == {"/data": {}}
    assert c["StopSignal"] == "SIGINT"
    assert c["Healthcheck"] == {"Test": ["CMD", "true"], "Interval": 5_000_000_000, "Retries": 2}
    assert config["created"] == "1970-01-01T00:00:00Z"
    assert (files["app/main.txt"].uid, files["app/main.txt"].mode) == (1000, 0o600)
    assert "app/debug.log" not in files  # .dockerignore
    assert files["unpacked/inside/readme"].size == 3
    assert "app/data" in files  # WORKDIR made it
    assert any("COPY --chmod=0600 app/ /src/" in line for line in lines)

    again, lines = build(project, "demo/app:1", build_args={"FLAVOUR": "spicy"})
    assert again.digest == info.digest
    copies = [line for line in lines if " COPY " in line or " ADD " in line]
    assert copies and all(line.endswith("CACHED") for line in copies)

    # A changed file misses its own step and every later one of its stage (the key chains), nothing earlier.
    (project / "bundle.tar").write_bytes((project / "bundle.tar").read_bytes()[:-1024])  # same entries, new bytes
    changed, lines = build(project, "demo/app:1", build_args={"FLAVOUR": "spicy"})
    assert changed.digest == info.digest  # the re-run ADD made the same layer from the same entries
    assert [line.split("] ", 1)[1] for line in lines if line.endswith("CACHED")] == [
        "COPY --chmod=0600 app/ /src/ CACHED", "COPY <<EOF /notes/${FLAVOUR}.txt CACHED",
        "COPY --from=files --chown=1000:1000 /src /app/ CACHED",
    ]  # fmt: skip


def test_no_cache_rebuild_reruns_every_step_and_is_still_identical(project, cache_dir, state_dir):
    first, _ = build(project, "demo/app:2")
    second, lines = build(project, "demo/app:2", no_cache=True)
    assert not any("CACHED" in line for line in lines)
    assert first.digest == second.digest  # host-made layers are deterministic


def test_target_builds_only_what_it_needs(project, cache_dir, state_dir, tmp_path):
    info, lines = build(project, "demo/files:1", target="files")
    assert lines[0] == "[1/4] FROM scratch AS files"
    assert len([line for line in lines if "FROM" in line]) == 1
    _, files = files_of(ImageStore(), info, tmp_path)
    assert {"src/main.txt", "notes/plain.txt"} <= set(files)


@pytest.mark.parametrize(
    ("dockerfile", "message"),
    [
        ("FROM scratch\nCOPY missing /x\n", "'missing' not found in the build context"),
        ("FROM scratch\nCOPY ../x /x\n", "outside the build context"),
        # neither a stage nor an image: the local store misses, and a loopback registry that refuses
        (
            "FROM scratch\nCOPY --from=127.0.0.1:9/nope:1 /a /b\n",
            "COPY --from=127.0.0.1:9/nope:1: '127.0.0.1:9/nope:1' is neither an earlier stage",
        ),
        (
            "FROM scratch AS a\nCOPY --from=b /a /b\nFROM scratch AS b\nCOPY --from=a /b /c\n",
            "COPY --from=b: stage 'b' is not an earlier stage",
        ),
        ("FROM scratch\nADD https://example.com/x /x\n", "ADD from a URL is not supported"),
        ("FROM scratch\nCOPY --chown=nobody app /app\n", "unknown user 'nobody'"),
        ("FROM scratch\nCOPY --chmod=9 app /app\n", "invalid --chmod"),
    ],
)
def test_bad_steps_are_refused_and_leave_no_image(project, cache_dir, state_dir, monkeypatch, dockerfile, message):
    monkeypatch.setenv("MATCHLOCK_PULL_RETRIES", "1")  # a refused connection is not worth retrying here
    (project / "Dockerfile").write_text(dockerfile)
    with pytest.raises(UsageError, match=message):
        build(project, "demo/bad:1")
    assert ImageStore().get("demo/bad:1") is None
    assert not list((cache_dir / "build").glob("build-*"))  # the scratch directory went too


def test_missing_dockerfile_and_bad_platform(project, cache_dir, state_dir):
    with pytest.raises(UsageError, match="Dockerfile not found"):
        build(project, "demo/x:1", dockerfile=project / "nope")
    with pytest.raises(UsageError, match="cross-platform builds are not supported"):
        build(project, "demo/x:1", platform="linux/s390x")


def test_tar_directory_is_deterministic(tmp_path):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    (root / "d" / "g").hardlink_to(root / "d" / "f")
    (root / "l").symlink_to("d/f")
    first = tar_directory(root, tmp_path / "a.tar")
    assert first == tar_directory(root, tmp_path / "b.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["d/g"].islnk() and members["d/g"].linkname == "d/f"
    assert members["l"].issym()
    assert json.dumps(sorted(members)) == json.dumps(["d", "d/f", "d/g", "l"])


def test_copies_land_through_the_stages_symlinks(project, cache_dir, state_dir, tmp_path):
    with tarfile.open(project / "bundle.tar.gz", "w:gz") as tar:
        for name in ("lib/z", "lib/a"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    (project / "links").mkdir()
    (project / "links" / "lib").symlink_to("usr/lib")  # merged-/usr style, as many base images have
    (project / "app" / "lib").mkdir()
    (project / "app" / "lib" / "mod").write_text("m")
    (project / "Dockerfile").write_text(
        "FROM scratch\nCOPY links/ /\nCOPY app/main.txt /usr/lib/keep\nCOPY app/ /\nADD bundle.tar.gz /\n"
    )
    info, _ = build(project, "demo/links:1")  # the store's squash refuses entries under a symlink parent
    _, files = files_of(ImageStore(), info, tmp_path)
    assert files["lib"].issym()
    assert {"usr/lib/keep", "usr/lib/mod", "usr/lib/z", "usr/lib/a"} <= set(files)
    assert not any(name.startswith("lib/") for name in files)


def test_from_platform_must_be_the_hosts(project, cache_dir, state_dir):
    (project / "Dockerfile").write_text("FROM --platform=linux/riscv64 scratch\n")
    with pytest.raises(UsageError, match="Dockerfile:1: FROM --platform=linux/riscv64 is not this host's"):
        build(project, "demo/x:1")
