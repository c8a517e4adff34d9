"""RUN: one sandbox booted from the stage's layers so far; what the step changed becomes a layer.

After the command succeeds, the same sandbox tars its root filesystem to
stdout (the image's own `sh` and `tar`; see diff.CAPTURE_SCRIPT), bounded in
size; the host compares it with the stage's tree (diff.py). RUN --mount targets
are VFS mounts of the sandbox, left out of the capture and of the layer. The sandbox is
recorded in the state store like any other, and closed and removed on every
path out: success, a failing step, or Ctrl-C.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..api.config import Resources, SandboxConfig
from ..api.errors import MatchlockError
from ..api.image import ImageConfig
from ..api.network import NetworkConfig
from ..api.vfs import MountConfig, VFSConfig
from ..image.store import ImageInfo
from ..sandbox.sandbox import ExecSpec, Sandbox
from ..state.store import StateStore
from . import diff
from .tree import Tree, split

_STDERR_KEEP = 4096  # of the capture's stderr, for the error message


class StepFailed(MatchlockError):
    exit_code = 1


@dataclass(frozen=True)
class RunRequest:
    command: str  # what the guest's `/bin/sh -c` runs
    env: dict[str, str]
    workdir: str
    user: str
    network: NetworkConfig
    resources: Resources
    label: str  # shown as the sandbox's image, e.g. "build myapp:1 step 3"
    mounts: dict[str, MountConfig] = field(default_factory=dict)  # RUN --mount: guest path -> VFS mount


def _lower_info(lower: Path, label: str) -> ImageInfo:
    return ImageInfo(
        tag=label, digest="", lower_path=lower, lower_fstype="erofs", size=lower.stat().st_size,
        config=ImageConfig(), source="build", created_at="", layers=0,
    )  # fmt: skip


async def run_step(
    request: RunRequest, lower: Path, tree: Tree, spool: Path, layers_dir: Path, output: Callable[[bytes], None]
) -> tuple[str, Path]:
    """Run the step and write its layer into `layers_dir`: (diff_id, tar). StepFailed when the command fails."""
    config = SandboxConfig(
        image=request.label, resources=request.resources, network=request.network,
        vfs=VFSConfig(mounts=dict(request.mounts)),
    )  # fmt: skip
    hidden = tuple(split(guest) for guest in request.mounts)  # a mount is never part of the layer
    store = StateStore()
    try:
        sandbox = await Sandbox.create(config, store=store, image=_lower_info(lower, request.label))
        try:
            spec = ExecSpec(request.command, env=request.env, working_dir=request.workdir, user=request.user)
            result = await sandbox.start_exec(spec, on_stdout=output, on_stderr=output).wait()
            if result.exit_code != 0:
                reason = f": {result.error}" if result.error else ""
                raise StepFailed(f"the command returned a non-zero code: {result.exit_code}{reason}")
            await _capture(sandbox, tree, spool, request.resources, hidden)
        finally:
            await sandbox.aclose(remove=True)
    finally:
        store.close()
    tar, guest = diff.read_guest_tar(spool, hidden)
    try:
        return diff.diff_layer(tree, tar, guest, hidden).write(layers_dir)
    finally:
        if tar is not None:
            tar.close()


async def _capture(
    sandbox: Sandbox, tree: Tree, spool: Path, resources: Resources, hidden: tuple[tuple[str, ...], ...]
) -> None:
    """The guest's root as a tar into `spool`, at most what its disks can hold."""
    limit = sum(e.member.size for e in tree.entries.values()) + (resources.disk_size_mb << 20) * 2 + (256 << 20)
    errors = bytearray()
    written = 0
    with open(spool, "wb") as out:

        def keep(data: bytes) -> None:
            nonlocal written
            written += len(data)
            if written > limit:  # raising ends the stream; the sandbox is closed right after
                raise StepFailed(f"the step's filesystem is over {limit >> 20} MB; the build refuses it")
            out.write(data)

        def keep_err(data: bytes) -> None:
            errors.extend(data[: max(0, _STDERR_KEEP - len(errors))])

        spec = ExecSpec(diff.capture_script(hidden), user="0", working_dir="/")
        result = await sandbox.start_exec(spec, on_stdout=keep, on_stderr=keep_err).wait()
    if result.exit_code != 0:
        said = errors.decode(errors="replace").strip()
        raise StepFailed(
            f"cannot read the step's files back (exit code {result.exit_code}{': ' + said if said else ''}); "
            "RUN needs /bin/sh and tar in the image" + (" (with --no-recursion, for RUN --mount)" if hidden else "")
        )
