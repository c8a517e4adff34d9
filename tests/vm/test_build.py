"""`matchlock build` end to end on the built-in busybox image: RUN steps in VMs, then run, rebuild, export.

One multi-stage Dockerfile covers COPY --from with --chown, RUN rm whiteouts
(a file and a directory), .dockerignore, ENV/WORKDIR/USER/CMD applied by
`run`, and a fully cached rebuild with the same digest (`--no-cache` runs every step and fills the cache); a second build fails
in RUN and must leave neither an image nor a sandbox.
"""

from __future__ import annotations

import re
import subprocess
import uuid

import pytest

from support.cli import MATCHLOCK

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

DOCKERFILE = """\
FROM matchlock/busybox:builtin AS compile
RUN mkdir -p /out && echo artefact-$((6*7)) > /out/artefact && echo compiled in a sandbox
FROM matchlock/busybox:builtin
COPY --from=compile --chown=1000:1000 /out/artefact /opt/artefact
COPY ctx/ /ctx/
RUN rm /bin/vi && rm -rf /usr/share/doc && mkdir -p /var/cache/x && echo state > /var/cache/x/f
ENV GREETING=hello
WORKDIR /opt
USER 65534
CMD ["sh", "-c", "echo $GREETING from $(pwd) as $(id -u); cat artefact"]
"""


@pytest.fixture
def tag(cli):
    name = f"test/built-{uuid.uuid4().hex[:8]}:1"
    yield name
    cli("image", "rm", name)  # the image store is the user's: leave nothing of ours behind


@pytest.fixture
def context(tmp_path):
    root = tmp_path / "context"
    (root / "ctx").mkdir(parents=True)
    (root / "ctx" / "kept.txt").write_text("kept\n")
    (root / "ctx" / "token.secret").write_text("do not ship\n")
    (root / ".dockerignore").write_text("ctx/*.secret\n")
    (root / "Dockerfile").write_text(DOCKERFILE)
    return root


def _digest(stdout: str) -> str:
    match = re.search(r"^Digest: (sha256:[0-9a-f]{64})$", stdout, re.M)
    assert match, stdout
    return match.group(1)


def test_build_then_run_rebuild_and_export(cli, tag, context, tmp_path):
    built = cli("build", "--no-cache", "-t", tag, str(context), timeout=600)  # every step runs, and is cached
    assert built.returncode == 0, built
    assert "\ncompiled in a sandbox\n" in built.stderr  # the step's output, streamed
    assert re.search(r"^\[2/10\] RUN mkdir .*\n(.*\n)*\[2/10\] DONE \d+\.\d+s$", built.stderr, re.M), built.stderr

    result = cli("run", "--no-network", "--image", tag)
    assert result.returncode == 0, result
    assert result.stdout == "hello from /opt as 65534\nartefact-42\n"
    probe = "ls /bin/vi /usr/share/doc 2>&1; stat -c %u:%g /opt/artefact; ls /ctx; cat /var/cache/x/f"
    result = cli("run", "--no-network", "--image", tag, "-u", "0", "--", "sh", "-c", probe)
    assert result.stdout.splitlines() == [
        "ls: /bin/vi: No such file or directory",
        "ls: /usr/share/doc: No such file or directory",
        "1000:1000",
        "kept.txt",
        "state",
    ], result

    rebuilt = cli("build", "-t", tag, str(context), timeout=600)
    assert rebuilt.returncode == 0, rebuilt
    steps = [line for line in rebuilt.stderr.splitlines() if re.match(r"\[\d+/10\] (RUN|COPY)", line)]
    assert len(steps) == 4 and all(line.endswith(" CACHED") for line in steps), rebuilt.stderr
    assert _digest(rebuilt.stdout) == _digest(built.stdout)

    archive = tmp_path / "image.tar"
    with open(archive, "wb") as out:
        exported = subprocess.run([MATCHLOCK, "image", "export", tag], stdout=out, stderr=subprocess.PIPE)
    assert exported.returncode == 0, exported.stderr
    layers = int(re.search(r"^Layers: (\d+)$", built.stdout, re.M).group(1))  # type: ignore[union-attr]
    for transport in ("docker-archive", "oci-archive"):
        inspect = subprocess.run(["skopeo", "inspect", f"{transport}:{archive}"], capture_output=True, text=True)
        assert inspect.returncode == 0, inspect.stderr
        assert inspect.stdout.count('"sha256:') >= layers + 1  # the digest and every layer


def test_failing_run_shows_output_and_code_and_leaves_nothing(cli, tag, tmp_path):
    (tmp_path / "Dockerfile").write_text(
        "FROM matchlock/busybox:builtin\nRUN touch /made-by-step\nRUN echo about to fail >&2 && exit 3\n"
    )
    failed = cli("build", "-t", tag, str(tmp_path), timeout=600)
    assert failed.returncode == 1, failed
    assert "about to fail" in failed.stderr
    assert f"{tmp_path}/Dockerfile:3: RUN failed: the command returned a non-zero code: 3" in failed.stderr
    assert tag not in cli("image", "ls").stdout
    assert cli("list", "-q").stdout == ""  # no sandbox left behind
