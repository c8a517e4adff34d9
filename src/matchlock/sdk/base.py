"""What `Client` and `AsyncClient` share beyond the calls: the state of one sandbox's connection and what
the server's lines do to it, without I/O.

Each client subclasses `ClientBase` and adds only its transport (a child process with a reader thread, or
with an asyncio task), its way of waiting (`PendingCall`) and its hook runners; the requests themselves
are `calls.Call`s, the same for both.
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from typing import Any, TypeVar

from ..jsonrpc import Broadcast, Failed, Resolved, Routed
from . import calls
from .calls import Call
from .errors import MatchlockError, RPCError
from .hooks import CreatePlan, LocalVFSHooks, parse_file_event, plan_create
from .session import Event, Malformed, Session
from .streams import Notify, as_bytes, deliver
from .types import Config, CreateOptions, FileInfo, VFSHookEvent

C = TypeVar("C")


def default_config() -> Config:
    return Config(binary_path=os.environ.get("MATCHLOCK_BIN", "matchlock"))


def server_argv(config: Config) -> list[str]:
    argv = [config.binary_path, "rpc"]
    return ["sudo", *argv] if config.use_sudo else argv


class PendingCall(ABC):
    """A request awaiting its answer; each client settles it its own way (an event, a future)."""

    __slots__ = ("on_notification",)

    def __init__(self, on_notification: Notify | None) -> None:
        self.on_notification = on_notification

    @abstractmethod
    def resolve(self, result: Any) -> None: ...

    @abstractmethod
    def fail(self, error: BaseException) -> None: ...

    @abstractmethod
    def output_failed(self, error: Exception) -> None:
        """A user's output writer raised: the call is to raise it."""


class ClientBase(ABC):
    """One sandbox's connection state; `Client` and `AsyncClient` add the I/O."""

    def __init__(self, config: Config | None) -> None:
        self._config = config if config is not None else default_config()
        self._session: Session[PendingCall] = Session()
        self._closed = False
        self._stdout_closed = False  # set before pending calls are failed, so none can slip in after
        self._vm_id: str | None = None
        self._last_vm_id: str | None = None
        self._create_opts: CreateOptions | None = None  # for fork(); secrets stay in memory only
        self._vfs = LocalVFSHooks()

    @property
    def vm_id(self) -> str | None:
        return self._vm_id

    @abstractmethod
    def _stop_hook_server(self) -> None: ...

    @abstractmethod
    def _on_file_event(self, event: VFSHookEvent) -> None: ...

    # --- the server's lines ------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        """Bytes from the server's stdout (one reader at a time)."""
        for event in self._session.feed(data):
            self._dispatch(event)

    def _dispatch(self, event: Event[PendingCall]) -> None:
        if isinstance(event, Resolved):
            event.context.resolve(event.result)
        elif isinstance(event, Failed):
            event.context.fail(RPCError(event.code, event.message))
        elif isinstance(event, Malformed):
            event.context.fail(MatchlockError(event.reason))
        elif isinstance(event, Routed):
            error = deliver(event.context.on_notification, event.method, event.params)
            if error is not None:
                event.context.output_failed(error)
        elif isinstance(event, Broadcast) and event.method == "event":
            file_event = parse_file_event(event.params)
            if file_event is not None:
                self._on_file_event(file_event)

    def _server_gone(self) -> None:
        """The server's stdout ended: every pending call fails, and no new one starts."""
        self._stdout_closed = True
        lost = MatchlockError("Matchlock process closed unexpectedly")
        for _, call in self._session.eof():
            call.fail(lost)
        self._stop_hook_server()

    # --- sandbox state ---------------------------------------------------------------------------

    def _begin_close(self) -> bool:
        """Mark the client closed and drop its hooks; False when it was closed already (close is idempotent)."""
        if self._closed:
            return False
        self._closed = True
        self._last_vm_id = self._vm_id
        self._vfs.set([])
        self._stop_hook_server()
        return True

    def _removable_id(self) -> str | None:
        return self._vm_id or self._last_vm_id

    def _begin_create(self, opts: CreateOptions | None) -> CreatePlan:
        """Validate and compile before anything is sent; the previous sandbox's hooks stop."""
        plan = plan_create(opts)
        self._stop_hook_server()
        self._vfs.set([])
        return plan

    def _created(self, plan: CreatePlan, vm_id: str) -> Call[Any] | None:
        """Record the new sandbox; returns the port forwards its options ask for, to request next."""
        self._vm_id = vm_id
        self._create_opts = copy.copy(plan.opts)
        self._vfs.set(plan.vfs.local)
        return calls.port_forward(plan.opts.port_forward_addresses, plan.opts.port_forwards)

    def _adopt_vfs_hooks(self, parent: ClientBase) -> None:
        """A fork's clone runs its parent's SDK-side VFS hooks (action, mutate and after hooks): its
        server brought back the parent's wire rules and events, and a fork of it carries them on."""
        self._vfs.set(parent._vfs.current())
        if self._create_opts is not None and parent._create_opts is not None:
            self._create_opts.vfs_interception = parent._create_opts.vfs_interception

    # --- file calls, through the local VFS hooks ---------------------------------------------------

    def _write_file_call(self, path: str, content: bytes | str, mode: int) -> Call[None]:
        data = as_bytes(content)
        self._vfs.check_action("write", path, len(data), mode)
        return calls.write_file(path, self._vfs.mutate_write(path, data, mode), mode)

    def _read_file_call(self, path: str) -> Call[bytes]:
        self._vfs.check_action("read", path, 0, 0)
        return calls.read_file(path)

    def _list_files_call(self, path: str) -> Call[list[FileInfo]]:
        self._vfs.check_action("readdir", path, 0, 0)
        return calls.list_files(path)


def split_forks(outcomes: list[C | Exception]) -> tuple[list[C], Exception | None]:
    """(the clones made, the first failure) of a fork's clone attempts."""
    failures = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    return [outcome for outcome in outcomes if not isinstance(outcome, Exception)], (failures[0] if failures else None)
