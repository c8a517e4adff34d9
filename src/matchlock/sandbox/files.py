"""File operations through the guest agent: write, read (16 MiB cap) and list."""

from __future__ import annotations

from collections.abc import Callable

from ..api.errors import FileOperationError, GuestProtocolError
from ..vm.channel import GuestChannel, GuestStream
from ..wire import agent as msgs
from ..wire.mux import STDIN, DataReceived, StreamReset
from ..wire.replies import FileReplies, OpError, Result


async def _final_reply(stream: GuestStream, op: str, on_data: Callable[[bytes], None] | None = None) -> Result:
    """Pump a file stream until the guest closes it; return its result."""
    replies = FileReplies(op)  # the grammar of the op's stream, checked on every event
    try:
        while not replies.done:
            outcome = await stream.next_reply(replies)
            if isinstance(outcome, DataReceived):
                assert on_data is not None  # only read_file's grammar allows data
                on_data(outcome.data)
                stream.consumed(len(outcome.data))
            elif isinstance(outcome, StreamReset):
                raise FileOperationError(f"the guest aborted the file operation: {outcome.reason}")
    finally:
        stream.close()
    if isinstance(replies.final, OpError):
        raise FileOperationError(replies.final.message)
    assert isinstance(replies.final, Result)
    return replies.final


async def write_file(channel: GuestChannel, path: str, content: bytes, mode: int = 0o644) -> None:
    request = msgs.WriteFileRequest(path, mode)
    msgs.WriteFileRequest.parse(request.to_wire())  # same validation as the guest applies
    stream = channel.open(request.to_wire())
    try:
        await stream.send(STDIN, content)
        stream.end(STDIN)
        stream.finish_sending()
    except Exception:
        if not stream.closed_by_guest:
            raise
    await _final_reply(stream, msgs.OP_WRITE_FILE)


async def read_file(channel: GuestChannel, path: str) -> bytes:
    request = msgs.PathRequest(msgs.OP_READ_FILE, path)
    msgs.PathRequest.parse(request.to_wire())
    stream = channel.open(request.to_wire())
    stream.finish_sending()
    content = bytearray()

    def on_data(data: bytes) -> None:
        content.extend(data)
        # Never trust the guest's size: stop at the cap whatever it claims.
        if len(content) > msgs.READ_FILE_LIMIT:
            stream.reset("read_file limit exceeded")
            raise GuestProtocolError(f"the guest sent more than {msgs.READ_FILE_LIMIT} bytes for read_file")

    await _final_reply(stream, msgs.OP_READ_FILE, on_data)
    return bytes(content)


async def list_files(channel: GuestChannel, path: str) -> list[msgs.FileInfo]:
    request = msgs.PathRequest(msgs.OP_LIST_FILES, path)
    msgs.PathRequest.parse(request.to_wire())
    stream = channel.open(request.to_wire())
    stream.finish_sending()
    result = await _final_reply(stream, msgs.OP_LIST_FILES)
    assert result.files is not None  # FileReplies requires the listing
    return list(result.files)


async def ping(channel: GuestChannel) -> None:
    """One round trip through the agent (liveness and latency checks)."""
    stream = channel.open(msgs.PingRequest().to_wire())
    stream.finish_sending()
    await _final_reply(stream, msgs.OP_PING)
