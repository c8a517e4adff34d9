"""`matchlock build` with RUN --mount and COPY --from=<image>, on the built-in busybox image.

Two builds. The first RUN step mounts a cache, the build context (read-only, and
read-write with its writes dropped), a tmpfs and an earlier stage's files at once; the second build (FROM the first image) mounts the
same cache under another target and finds what the first left in it, and copies
from the first image by its tag. None of the mounted files may be in either image.
"""

from __future__ import annotations

import shutil
import uuid

import pytest

from matchlock.api.paths import cache_dir
from matchlock.build.mounts import cache_name

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

FIRST = """\
FROM matchlock/busybox:builtin AS tools
RUN mkdir -p /opt && echo tool-from-stage > /opt/tool
FROM matchlock/busybox:builtin
WORKDIR /work
RUN --mount=type=cache,target=/var/cache/demo,id={cache} --mount=type=bind,target=ctx \\
    --mount=type=tmpfs,target=/scratch --mount=type=bind,from=tools,source=/opt,target=/tools \\
    --mount=type=bind,source=.,target=/rw,rw \\
    cat ctx/input.txt /tools/tool > seen && echo scratch > /scratch/f && \\
    (cat /var/cache/demo/count 2>/dev/null || echo 0) > before && \\
    echo $(( $(cat before) + 1 )) > /var/cache/demo/count && \\
    if touch ctx/written 2>/dev/null; then echo context-writable; else echo context-read-only; fi && \\
    echo private > /rw/written && cat /rw/written
"""

SECOND = """\
FROM {first}
RUN --mount=type=cache,target=/elsewhere,id={cache},sharing=locked cat /elsewhere/count > /work/after
COPY --from={first} --chown=7:7 /work/seen /copied
"""

PROBE = (
    "cat /work/before /work/after /copied; stat -c %u /copied; ls -A /work; "
    "for d in /var/cache/demo /elsewhere /scratch /tools /rw; do [ -e $d ] && echo $d: $(ls -A $d); done; ls -A /var/cache"
)


@pytest.fixture
def names(cli):
    suffix = uuid.uuid4().hex[:8]
    made = {"first": f"test/mounts-{suffix}:1", "second": f"test/mounts-{suffix}:2", "cache": f"test-{suffix}"}
    yield made
    for tag in (made["first"], made["second"]):
        cli("image", "rm", tag)
    shutil.rmtree(cache_dir() / "build" / "mounts" / cache_name(made["cache"]), ignore_errors=True)


def test_cache_bind_and_tmpfs_mounts_stay_out_of_the_image_and_copy_from_an_image(cli, names, tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    (context / "input.txt").write_text("from-the-context\n")
    (context / "Dockerfile").write_text(FIRST.format(**names))
    (context / "second.Dockerfile").write_text(SECOND.format(**names))

    first = cli("build", "-t", names["first"], str(context), timeout=600)
    assert first.returncode == 0, first
    assert "\ncontext-read-only\nprivate\n" in first.stderr  # read-only, and an rw bind's writes succeed...
    assert sorted(p.name for p in context.iterdir()) == ["Dockerfile", "input.txt", "second.Dockerfile"]  # ...privately
    cache = cache_dir() / "build" / "mounts" / cache_name(names["cache"])
    assert (cache / "count").read_text() == "1\n"  # on the host, kept after the build

    again = cli("build", "-t", names["first"], str(context), timeout=600)  # the mount specs key the step
    runs = [line for line in again.stderr.splitlines() if "] RUN " in line]
    assert len(runs) == 2 and all(line.endswith(" CACHED") for line in runs), again.stderr

    second = cli("build", "-t", names["second"], "-f", str(context / "second.Dockerfile"), str(context), timeout=600)
    assert second.returncode == 0, second

    result = cli("run", "--no-network", "--image", names["second"], "-u", "0", "--", "sh", "-c", PROBE)
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        "0",  # the first build found the cache empty
        "1",  # the second found what the first left
        "from-the-context",
        "tool-from-stage",
        "7",
        "after",  # /work holds neither the context's files nor the ctx mount point
        "before",
        "seen",
    ], result  # and no mount point holds anything (nor exists: the layers leave the targets out)
