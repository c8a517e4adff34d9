"""matchlock: run untrusted code in disposable micro-VMs with host-controlled egress.

The Python SDK is importable from here (`from matchlock import Client, Sandbox, AsyncClient, ...`), with
the API of the published matchlock SDK 0.2.17. Its names load lazily, on first use, so the CLI never
pays for importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The SDK's public names: `matchlock.sdk.__all__` is derived from this set. Listed here so that looking up
# anything else, such as a subpackage, does not import the SDK.
_SDK_NAMES = frozenset(
    {
        "AllowListUpdate",
        "AsyncClient",
        "Client",
        "Config",
        "CreateOptions",
        "ExecInteractiveResult",
        "ExecPipeResult",
        "ExecResult",
        "ExecStreamResult",
        "FileInfo",
        "HostIPMapping",
        "ImageConfig",
        "MatchlockError",
        "MountConfig",
        "NETWORK_HOOK_ACTION_ALLOW",
        "NETWORK_HOOK_ACTION_BLOCK",
        "NETWORK_HOOK_ACTION_MUTATE",
        "NETWORK_HOOK_PHASE_AFTER",
        "NETWORK_HOOK_PHASE_BEFORE",
        "NetworkBodyTransform",
        "NetworkHookAction",
        "NetworkHookPhase",
        "NetworkHookRequest",
        "NetworkHookRequestMutation",
        "NetworkHookResponseMutation",
        "NetworkHookResult",
        "NetworkHookRule",
        "NetworkInterceptionConfig",
        "PortForward",
        "PortForwardBinding",
        "RPCError",
        "Sandbox",
        "Secret",
        "VFSActionRequest",
        "VFSHookAction",
        "VFSHookEvent",
        "VFSHookOp",
        "VFSHookPhase",
        "VFSHookRule",
        "VFSInterceptionConfig",
        "VFSMutateRequest",
        "VFS_HOOK_ACTION_ALLOW",
        "VFS_HOOK_ACTION_BLOCK",
        "VFS_HOOK_OP_CHMOD",
        "VFS_HOOK_OP_CLOSE",
        "VFS_HOOK_OP_CREATE",
        "VFS_HOOK_OP_MKDIR",
        "VFS_HOOK_OP_OPEN",
        "VFS_HOOK_OP_READ",
        "VFS_HOOK_OP_READDIR",
        "VFS_HOOK_OP_READLINK",
        "VFS_HOOK_OP_REMOVE",
        "VFS_HOOK_OP_REMOVE_ALL",
        "VFS_HOOK_OP_RENAME",
        "VFS_HOOK_OP_STAT",
        "VFS_HOOK_OP_SYMLINK",
        "VFS_HOOK_OP_SYNC",
        "VFS_HOOK_OP_TRUNCATE",
        "VFS_HOOK_OP_WRITE",
        "VFS_HOOK_PHASE_AFTER",
        "VFS_HOOK_PHASE_BEFORE",
        "VolumeInfo",
    }
)

__all__ = sorted(_SDK_NAMES)  # `from matchlock import *` gives the SDK, as the published package does

if TYPE_CHECKING:
    from .sdk import *  # noqa: F403


def __getattr__(name: str) -> Any:
    if name not in _SDK_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import sdk

    value = getattr(sdk, name)
    globals()[name] = value  # later lookups no longer come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SDK_NAMES})
