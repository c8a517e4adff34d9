"""`matchlock build` with RUN --mount and COPY --from=<image>, on the built-in busybox image.

Two builds. The first RUN step mounts a cache, the build context (read-only, and
read-write with its writes dropped), a tmpfs and an earlier stage's files at once; the second build (FROM the first image) mounts the
same cache under another target and finds what the first left in it, and copies
from the first image by its tag. None of the mounted files may be in either image.
A third build mounts a secret given by `--secret id=token,env=VAR`: its step reads
it, writes only its digest into the image, and the value is on no host disk after.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import uuid

import pytest

from matchlock.api.paths import cache_dir, state_dir
from matchlock.build.mounts import cache_name
from matchlock.image.store import ImageStore

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
    "for d in /var/cache/demo /elsewhere /scratch /tools /rw; do [ -e $d ] && echo $d: $(ls -A $d); done; [ -e /var/cache ] || echo no-var-cache"
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
        "no-var-cache",  # the directory made on the way to the cache's mount point is left out too
    ], result  # and no mount point holds anything (nor exists: the layers leave the targets out)


SECRET = """\
FROM matchlock/busybox:builtin
WORKDIR /work
RUN --mount=type=secret,id=token,required --mount=type=secret,id=token,target=/etc/app/token,mode=0444 \\
    --mount=type=secret,id=absent \\
    sha256sum < /run/secrets/token > /digest && cmp /run/secrets/token /etc/app/token && \\
    stat -c '%a %u %s' /run/secrets/token /etc/app/token && \\
    if echo x > /run/secrets/token; then echo writable; else echo read-only; fi 2>/dev/null && \\
    if [ -e /run/secrets/absent ]; then echo absent-is-there; else echo absent-is-absent; fi
"""


def test_a_secret_mount_is_read_by_the_step_and_left_nowhere_on_disk(cli, tmp_path):
    value = f"value-{uuid.uuid4().hex}"
    tag = f"test/secret-{uuid.uuid4().hex[:8]}:1"
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(SECRET)
    try:
        args = ["build", "-t", tag, "--secret", "id=token,env=BUILD_TOKEN", str(context)]
        built = cli(*args, "--no-cache", timeout=600, env={"BUILD_TOKEN": value})  # runs, cached or not
        assert built.returncode == 0, built
        size = len(value)
        assert f"\n400 0 {size}\n444 0 {size}\nread-only\nabsent-is-absent\n" in built.stderr, built.stderr
        assert value not in built.stderr + built.stdout
        again = cli(*args, timeout=600, env={"BUILD_TOKEN": "another value"})  # as BuildKit: a new value is no new key
        assert again.returncode == 0 and again.stderr.splitlines()[-1].endswith("... CACHED"), again
        assert again.stdout.splitlines()[1] == built.stdout.splitlines()[1]  # the same digest

        probe = "cat /digest; ls -A /work"
        result = cli("run", "--no-network", "--image", tag, "-u", "0", "--", "sh", "-c", probe)
        assert result.returncode == 0, result
        assert result.stdout == f"{hashlib.sha256(value.encode()).hexdigest()}  -\n", result

        store = ImageStore()
        info = store.resolve(tag)
        layers = []
        for record in store.layer_records(info):
            with tarfile.open(store.layer_path(record.digest)) as layer:
                layers.append(layer.getnames())
        assert layers[-1] == ["digest"], layers[-1]  # the RUN's layer: no mount point, nor /etc/app made for one
        assert not [n for names in layers for n in names if "token" in n or n.startswith("run/")]

        searched = [str(state_dir()), str(cache_dir() / "build"), str(info.lower_path)]
        found = subprocess.run(["grep", "-r", "-l", "-F", "-e", value, *searched], capture_output=True, text=True)
        assert found.returncode == 1 and found.stdout == "", found  # 1: searched everything, found nothing
    finally:
        cli("image", "rm", tag)
