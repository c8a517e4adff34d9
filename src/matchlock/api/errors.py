"""Errors shared by every layer. Messages name the bad value and the fix."""

from __future__ import annotations


class MatchlockError(Exception):
    """Base class; the CLI prints the message and exits with `exit_code`."""

    exit_code = 1


class UsageError(MatchlockError):
    """A flag, parameter or argument is invalid (CLI exit code 2)."""

    exit_code = 2


class NotFoundError(MatchlockError):
    pass


class SetupError(MatchlockError):
    """A host prerequisite (QEMU, kernel, tool) is missing or broken."""


class ImageError(MatchlockError):
    pass


class KernelError(SetupError):
    pass


class VMError(MatchlockError):
    """The virtual machine failed to start or died."""


class GuestProtocolError(VMError):
    """The guest broke the wire protocol; the sandbox is no longer trusted."""


class ExecError(MatchlockError):
    pass


class FileOperationError(MatchlockError):
    pass
