"""What the VFS VM tests share."""

from __future__ import annotations

from matchlock.sandbox.sandbox import ExecSpec


def sh(box, loop_thread, command: str, **kwargs) -> str:
    """`command`'s stdout; it must exit 0."""
    result = loop_thread.run(box.exec(ExecSpec(command, **kwargs)))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout.decode()
