"""Build an erofs lower disk with exact ownership without root, under fakeroot.

An ordinary user cannot chown files to other users, make device nodes or set
`security.capability`, so `layers.materialise` cannot give the staging tree an
image's real owners. Under `fakeroot` those calls succeed and are recorded, and
`mkfs.erofs`, run under the same fakeroot, reads the recorded owners, modes,
devices and xattrs back: the image is exactly what root would build.

fakeroot works by preloading into new processes, so the squashed tree is
written once as a single plain tar (exact members, layers already applied) and
a fresh `python -m matchlock.image.unprivileged` under fakeroot squashes that
one layer again, materialises it and runs mkfs.erofs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from ..api.errors import ImageError, SetupError
from . import layers

XATTR_PREFIX = "SCHILY.xattr."
FAKEROOT_FIX = "fix: apt-get install fakeroot (ordinary users build image disks under it)"


def _info(name: str, node: layers._Node) -> tarfile.TarInfo:
    """A fresh member for `node`: only its own fields and xattrs, none of the source's path headers."""
    member = node.member
    info = tarfile.TarInfo(name)
    if member is None:  # an implied directory: what `materialise` gives it
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
        return info
    info.type, info.mode, info.uid, info.gid = member.type, member.mode, member.uid, member.gid
    info.mtime, info.linkname = member.mtime, member.linkname
    info.devmajor, info.devminor = member.devmajor, member.devminor
    info.size = member.size if member.isreg() else 0
    info.pax_headers = {k: v for k, v in member.pax_headers.items() if k.startswith(XATTR_PREFIX)}
    return info


def write_tree(tree: layers.SquashedTree, out: tarfile.TarFile) -> None:
    """Every node of the squashed tree, parents first, as one layer that squashes to the same tree."""
    pending: list[tuple[str, layers._Node]] = [(".", tree.root)]
    while pending:
        name, node = pending.pop()
        info = _info(name, node)
        if node.member is not None and node.member.isreg():
            src = tree.layers[node.layer].extractfile(node.member)
            try:
                out.addfile(info, src)
            except (OSError, tarfile.TarError, EOFError) as exc:
                raise ImageError(f"{name}: truncated layer data: {exc}") from None
        else:
            out.addfile(info)
        if node.children:
            pending.extend((f"{name}/{child}", node.children[child]) for child in sorted(node.children, reverse=True))


def build(tree: layers.SquashedTree, staging: Path, out: Path, workdir: Path) -> None:
    """Materialise `tree` and build `out` from it under fakeroot (the caller removes `staging`)."""
    fakeroot = shutil.which("fakeroot")
    if fakeroot is None:
        raise SetupError(f"fakeroot not found; {FAKEROOT_FIX}")
    squashed = workdir / "squashed.tar"
    try:
        with tarfile.open(squashed, "w", format=tarfile.PAX_FORMAT) as tar:
            write_tree(tree, tar)
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
        argv = [fakeroot, "--", sys.executable, "-m", __name__, str(squashed), str(staging), str(out)]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    finally:
        squashed.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ImageError(f"building the image disk under fakeroot failed: {lines[-1] if lines else proc.returncode}")


def main(argv: list[str]) -> int:
    """Under fakeroot: squash the single-layer tar, materialise it into staging, build the blob."""
    squashed, staging, out = (Path(arg) for arg in argv)
    try:
        with tarfile.open(squashed) as tar:
            tree = layers.squash([tar])
            layers.materialise(tree, staging)
        layers.build_erofs(staging, out)
    except (ImageError, SetupError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
