"""What `run` starts before its heavy imports, for the sandbox it is about to create.

Kept apart from sandbox/network.py, which loads the policy engine, QEMU's machine and asyncio: this
module loads only net/namespace.py, so the namespace helper can start while those are imported.
"""

from __future__ import annotations

from ..net.namespace import discard_early, start_early

__all__ = ["discard_early", "start_early"]
