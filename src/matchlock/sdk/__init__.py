"""The Python SDK: the public API of the published matchlock SDK 0.2.17, plus `AsyncClient`.

`from matchlock import Client, Sandbox, ...` resolves here lazily (see `matchlock.__init__`).
"""

# ruff: noqa: F401 - the imports below are the re-exports; `__all__` is derived from `matchlock._SDK_NAMES`,
# and tests/unit/test_sdk_api.py checks that the two agree name for name.
from .. import _SDK_NAMES
from .aio import AsyncClient
from .builder import Sandbox
from .client import Client
from .errors import MatchlockError, RPCError
from .types import (
    NETWORK_HOOK_ACTION_ALLOW,
    NETWORK_HOOK_ACTION_BLOCK,
    NETWORK_HOOK_ACTION_MUTATE,
    NETWORK_HOOK_PHASE_AFTER,
    NETWORK_HOOK_PHASE_BEFORE,
    VFS_HOOK_ACTION_ALLOW,
    VFS_HOOK_ACTION_BLOCK,
    VFS_HOOK_OP_CHMOD,
    VFS_HOOK_OP_CLOSE,
    VFS_HOOK_OP_CREATE,
    VFS_HOOK_OP_MKDIR,
    VFS_HOOK_OP_OPEN,
    VFS_HOOK_OP_READ,
    VFS_HOOK_OP_READDIR,
    VFS_HOOK_OP_READLINK,
    VFS_HOOK_OP_REMOVE,
    VFS_HOOK_OP_REMOVE_ALL,
    VFS_HOOK_OP_RENAME,
    VFS_HOOK_OP_STAT,
    VFS_HOOK_OP_SYMLINK,
    VFS_HOOK_OP_SYNC,
    VFS_HOOK_OP_TRUNCATE,
    VFS_HOOK_OP_WRITE,
    VFS_HOOK_PHASE_AFTER,
    VFS_HOOK_PHASE_BEFORE,
    AllowListUpdate,
    Config,
    CreateOptions,
    ExecInteractiveResult,
    ExecPipeResult,
    ExecResult,
    ExecStreamResult,
    FileInfo,
    HostIPMapping,
    ImageConfig,
    MountConfig,
    NetworkBodyTransform,
    NetworkHookAction,
    NetworkHookPhase,
    NetworkHookRequest,
    NetworkHookRequestMutation,
    NetworkHookResponseMutation,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    PortForward,
    PortForwardBinding,
    Secret,
    VFSActionRequest,
    VFSHookAction,
    VFSHookEvent,
    VFSHookOp,
    VFSHookPhase,
    VFSHookRule,
    VFSInterceptionConfig,
    VFSMutateRequest,
    VolumeInfo,
)

# The one list of public names lives in `matchlock/__init__.py`, which must resolve them without importing
# this package; the root package is loaded before this one anyway, so reading it here costs nothing.
__all__ = sorted(_SDK_NAMES)
