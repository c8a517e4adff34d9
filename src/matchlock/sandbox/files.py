"""File operations through the guest agent: write, read (16 MiB cap) and list."""

from __future__ import annotations

from ..api.errors import FileOperationError, GuestProtocolError
from ..vm.channel import GuestChannel, GuestStream
from ..wire import agent as msgs
from ..wire.mux import STDIN, STDOUT, ChannelEnded, DataReceived, MessageReceived, StreamClosed, StreamReset


async def _final_reply(stream: GuestStream, on_data=None) -> dict:
    """Pump a file stream until the guest closes it; return its last reply."""
    reply: dict | None = None
    try:
        while True:
            event = await stream.next_event()
            if isinstance(event, DataReceived):
                if on_data is None or event.channel != STDOUT:
                    raise GuestProtocolError("the guest sent unexpected data on a file stream")
                on_data(event.data)
                stream.consumed(len(event.data))
            elif isinstance(event, MessageReceived):
                if reply is not None:
                    raise GuestProtocolError("the guest sent two replies on a file stream")
                reply = event.message
            elif isinstance(event, StreamReset):
                raise FileOperationError(f"the guest aborted the file operation: {event.reason}")
            elif isinstance(event, StreamClosed):
                break
            elif isinstance(event, ChannelEnded):
                continue
    finally:
        stream.close()
    if reply is None:
        raise GuestProtocolError("the guest closed a file stream without a reply")
    if reply.get("type") == msgs.REPLY_ERROR:
        raise FileOperationError(str(reply.get("message", "file operation failed"))[:4096])
    if reply.get("type") != msgs.REPLY_RESULT:
        raise GuestProtocolError(f"unexpected file reply {str(reply.get('type'))[:40]!r}")
    return reply


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
    await _final_reply(stream)


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

    await _final_reply(stream, on_data)
    return bytes(content)


async def list_files(channel: GuestChannel, path: str) -> list[msgs.FileInfo]:
    request = msgs.PathRequest(msgs.OP_LIST_FILES, path)
    msgs.PathRequest.parse(request.to_wire())
    stream = channel.open(request.to_wire())
    stream.finish_sending()
    reply = await _final_reply(stream)
    try:
        return msgs.parse_files(reply)
    except ValueError as exc:
        raise GuestProtocolError(f"malformed file list from the guest: {exc}") from None


async def ping(channel: GuestChannel) -> None:
    """One round trip through the agent (liveness and latency checks)."""
    stream = channel.open({"op": msgs.OP_PING})
    stream.finish_sending()
    await _final_reply(stream)
