"""Exceptions of the Python SDK (the same classes and constants as the published SDK 0.2.17)."""

from __future__ import annotations


class MatchlockError(Exception):
    """Any SDK failure: client-side validation, a dead server process, a malformed answer."""


class RPCError(MatchlockError):
    """The server answered a request with a JSON-RPC error object."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    VM_FAILED = -32000
    EXEC_FAILED = -32001
    FILE_FAILED = -32002

    def __init__(self, code: int, message: str):
        self.code = code
        self.message = message
        super().__init__(f"[{code}] {message}")

    def is_vm_error(self) -> bool:
        return self.code == self.VM_FAILED

    def is_exec_error(self) -> bool:
        return self.code == self.EXEC_FAILED

    def is_file_error(self) -> bool:
        return self.code == self.FILE_FAILED
