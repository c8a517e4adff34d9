"""The namespace `run` begins before its heavy imports, for the sandbox it is about to create.

`run` spawns its sandbox's namespace helper as soon as its flags are parsed, so the helper works
beside the imports that come before the boot instead of after them. This module loads only
net/namespace.py (sandbox/network.py loads the policy engine, QEMU's machine and asyncio), and the
CLI may not import net/ itself (tests/unit/test_layers.py).
"""

from __future__ import annotations

from ..net.namespace import SandboxNamespace

# One slot: a process runs one `run`, and only its sandbox's SandboxNetwork takes from it.
_early: SandboxNamespace | None = None


def start_early(mtu: int) -> None:
    """Spawn the helper of the namespace the next sandbox of this process takes; one at a time."""
    global _early
    discard_early()
    namespace = SandboxNamespace(mtu)
    namespace.spawn_helper()
    _early = namespace


def take_early(mtu: int) -> SandboxNamespace:
    """The namespace `start_early` began, if its MTU is this one (else it is discarded); or a new one."""
    global _early
    if _early is not None and _early.mtu == mtu:
        namespace, _early = _early, None
        return namespace
    discard_early()
    return SandboxNamespace(mtu)


def discard_early() -> None:
    """Release a namespace `start_early` began that no sandbox took (the command failed first)."""
    global _early
    namespace, _early = _early, None
    if namespace is not None:
        namespace.close()
