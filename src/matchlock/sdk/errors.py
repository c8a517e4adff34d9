"""Exceptions of the Python SDK (the same classes and constants as the published SDK 0.2.17)."""

from __future__ import annotations

from ..jsonrpc import messages as codes


class MatchlockError(Exception):
    """Any SDK failure: client-side validation, a dead server process, a malformed answer."""


class RPCError(MatchlockError):
    """The server answered a request with a JSON-RPC error object."""

    # The published class attributes, from the one table of codes in jsonrpc.
    PARSE_ERROR = codes.PARSE_ERROR
    INVALID_REQUEST = codes.INVALID_REQUEST
    METHOD_NOT_FOUND = codes.METHOD_NOT_FOUND
    INVALID_PARAMS = codes.INVALID_PARAMS
    INTERNAL_ERROR = codes.INTERNAL_ERROR
    VM_FAILED = codes.VM_FAILED
    EXEC_FAILED = codes.EXEC_FAILED
    FILE_FAILED = codes.FILE_FAILED

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
