"""Run by test_fork_preload.py in a fresh interpreter: what a forked `matchlock fork` owner still imports.

`python fork_owner_imports.py SNAPSHOT [--drop MODULE]` (with $FAKE_FILES, a directory of stand-in
kernel and disk files) runs the real `fork` command (its relay call,
snapshot removal and the forks replaced) up to `launcher.start`, then, in this same process as a forked
owner would, the real `run --from-snapshot SNAPSHOT -d` with the arguments `fork` built, up to the
start of QEMU (image, kernel and runtime lookups replaced; the network namespace and proxy are real).
It prints JSON: the arguments, whether QEMU's start was reached, and the modules the owner imported
after `preload`. `--drop` leaves one module out of the preload list (the test proves it is noticed).
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path


class Reached(Exception):
    """QEMU would start here: the owner has imported all it needs to boot."""


class _Patcher:
    """A meta path finder that patches a module right after its first import, so the patch imports nothing."""

    def __init__(self, patches: dict[str, types.FunctionType]) -> None:
        self.patches = patches

    def find_spec(self, name, path, target=None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        assert spec is not None and spec.loader is not None, name
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec

    def install(self) -> None:
        for name, patch in self.patches.items():
            if name in sys.modules:
                patch(sys.modules[name])
        sys.meta_path.insert(0, self)


def main() -> None:
    snapshot, drop = sys.argv[1], sys.argv[3] if sys.argv[2:3] == ["--drop"] else ""
    files = Path(os.environ["FAKE_FILES"])
    seen: dict[str, object] = {}

    def fork_command(module) -> None:
        real_has_network = module._has_network
        module._has_network = lambda name: real_has_network(snapshot)
        module._remove_snapshot = lambda name: None

    def launcher(module) -> None:
        if drop:
            module.OWNER_MODULES = tuple(m for m in module.OWNER_MODULES if m != drop)
            module.preload.__defaults__ = (module.OWNER_MODULES,)

        def start(args, count, caller_fds=()):
            seen["args"], seen["preloaded"] = args, set(sys.modules)
            raise Reached

        module.start = start

    def relay_client(module) -> None:
        module.control = lambda vm_id, action, name="", mode="": {"name": name}

    def image_pull(module) -> None:
        module.resolve_or_pull = lambda image, **kwargs: types.SimpleNamespace(config=_image_config())

    def image_store(module) -> None:
        class ImageStore:
            def resolve(self, image):
                return types.SimpleNamespace(config=_image_config(), lower_path=files / "lower.img")

        module.ImageStore = ImageStore

    def kernel(module) -> None:
        module.resolve = lambda kernel_path=None: types.SimpleNamespace(
            path=files / "kernel", initrd=None, cmdline=["console=hvc0"], acpi=False
        )

    def runtime(module) -> None:
        module.ensure_runtime_disk = lambda: files / "runtime.img"

    def machine(module) -> None:
        async def start(self):
            import asyncio

            from matchlock.sandbox.sandbox import PROXY_START_TASK

            # The proxy starts beside QEMU (its imports too): what it loads counts as loaded by QEMU's start.
            await asyncio.gather(*[t for t in asyncio.all_tasks() if t.get_name() == PROXY_START_TASK])
            seen["owner"] = set(sys.modules)
            raise Reached

        module.Machine.start = start

    _Patcher({
        "matchlock.cli.snapshot": fork_command,
        "matchlock.cli.launcher": launcher,
        "matchlock.sandbox.relay_client": relay_client,
        "matchlock.image.pull": image_pull,
        "matchlock.image.store": image_store,
        "matchlock.kernel": kernel,
        "matchlock.image.runtime": runtime,
        "matchlock.vm.machine": machine,
    }).install()  # fmt: skip
    from matchlock.cli import main as cli

    secret = ["--secret", "API_KEY=v-123@api.example.com"]
    _main(cli, ["fork", "vm-00000001", "-n", "1", *secret])
    if "args" not in seen:
        sys.exit("fork never reached launcher.start")
    args = list(seen["args"])  # type: ignore[call-overload]
    args[2] = snapshot  # `fork` named the snapshot it would have made
    ready_r, ready_w = os.pipe()
    os.environ["MATCHLOCK_READY_FD"] = str(ready_w)
    _main(cli, args)
    preloaded = seen["preloaded"]
    owner = seen.get("owner", set())
    print(json.dumps({
        "args": seen["args"],
        "reached": "owner" in seen,
        "missing": sorted(owner - preloaded),  # type: ignore[operator]
    }))  # fmt: skip


def _image_config():
    from matchlock.api.image import ImageConfig  # loaded by then: `run` imports it

    return ImageConfig()


def _main(cli, argv: list[str]) -> None:
    sys.argv = ["matchlock", *argv]
    try:
        cli.main()
    except SystemExit:
        pass  # each run ends at a stand-in that raises: its message went to stderr


if __name__ == "__main__":
    main()
