"""What the VFS VM tests share."""

from __future__ import annotations

from matchlock.sandbox.sandbox import ExecSpec

# A host change reaches the guest as a notice, a moment after it is made: the guest polls for it,
# 50 tries 0.1 s apart inside one exec (it is normally seen on the first).
SEEN = "for i in $(seq 50); do {test} && exit 0; sleep 0.1; done; echo never: {test}; exit 1"


def sh(box, loop_thread, command: str, **kwargs) -> str:
    """`command`'s stdout; it must exit 0."""
    result = loop_thread.run(box.exec(ExecSpec(command, **kwargs)))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout.decode()
