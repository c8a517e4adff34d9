"""`matchlock port-forward <id> [LOCAL:]REMOTE...`: forward local ports into a running sandbox.

Every accepted connection opens its own relay connection (message type 9)
to the process that owns the sandbox, which tunnels it to the guest's
127.0.0.1:REMOTE. Runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
from collections.abc import Callable
from pathlib import Path

import click

from ..api.errors import MatchlockError
from ..api.paths import find_vm_dir
from ..sandbox import relay_client
from ..sandbox import relay_protocol as rp
from ..sandbox.portforward import ForwardSpec
from .common import parse_forwards

READ_SIZE = 64 * 1024


async def _tunnel(socket_path: Path, remote_port: int, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:  # fmt: skip
    """One local connection, through a relay connection of its own; never raises (it runs in the group)."""
    try:
        relay = await relay_client.AsyncRelayConnection.open(socket_path)
    except MatchlockError as exc:
        click.echo(f"port-forward: {exc}", err=True)
        writer.close()
        return
    try:
        await relay.send(rp.PortForwardAction(remote_port).encode())
        async with asyncio.TaskGroup() as group:
            uploading = group.create_task(_upload(reader, relay))
            await _download(relay, writer)
            uploading.cancel()
    except* (ConnectionError, MatchlockError):
        pass  # either side went away, or the relay broke the protocol: this connection ends
    except* Exception as failed:  # noqa: BLE001 - one bad connection must not stop the others
        click.echo(f"port-forward: {failed.exceptions[0]!r}", err=True)
    finally:
        await relay.aclose()
        writer.close()


async def _upload(reader: asyncio.StreamReader, relay: relay_client.AsyncRelayConnection) -> None:
    while data := await reader.read(READ_SIZE):
        await relay.send(rp.Stdin(data).encode())
    await relay.send(rp.Stdin(b"").encode())


async def _download(relay: relay_client.AsyncRelayConnection, writer: asyncio.StreamWriter) -> None:
    while replies := await relay.receive():
        for reply in replies:
            if isinstance(reply, rp.Output) and reply.channel == rp.STDOUT and reply.data:
                writer.write(reply.data)
                await writer.drain()
            elif isinstance(reply, rp.Output) and reply.channel == rp.STDOUT:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write_eof()  # the guest's side half-closed
            elif isinstance(reply, rp.Exited):
                return
            else:  # the relay refused or aborted the tunnel
                message = reply.data.decode(errors="replace") if isinstance(reply, rp.Output) else reply.error
                click.echo(f"port-forward: {message[:500] or reply!r}", err=True)
                return


async def _listen(handle: Callable, address: str, port: int) -> asyncio.AbstractServer:
    try:
        return await asyncio.start_server(handle, address, port, reuse_address=True, start_serving=False)
    except OSError as exc:
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise MatchlockError(f"cannot listen on {address}:{port}: {reason}") from None


async def _serve(socket_path: Path, specs: list[ForwardSpec], addresses: list[str]) -> None:
    stop = asyncio.Event()
    tunnels = asyncio.TaskGroup()  # every tunnel is a task of this group
    open_tunnels: set[asyncio.Task] = set()

    def accept(remote_port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        # A plain callback: asyncio would run a coroutine as a task of its own.
        def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if stop.is_set():
                writer.close()
                return
            task = tunnels.create_task(_tunnel(socket_path, remote_port, reader, writer))
            open_tunnels.add(task)
            task.add_done_callback(open_tunnels.discard)

        return handle

    servers: list[asyncio.AbstractServer] = []
    try:
        for spec in specs:
            for address in addresses:
                servers.append(await _listen(accept(spec.remote_port), address, spec.local_port))
                click.echo(f"Forwarding {address}:{spec.local_port} -> sandbox:{spec.remote_port}", err=True)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with tunnels:
            for server in servers:
                await server.start_serving()  # only now: connections need the group
            await stop.wait()
            for server in servers:
                server.close()
            for task in list(open_tunnels):
                task.cancel()
    finally:
        for server in servers:
            server.close()


@click.command("port-forward")
@click.option("--address", multiple=True, help="Local address to listen on (default 127.0.0.1); repeatable.")
@click.argument("vm_id")
@click.argument("specs", nargs=-1, required=True)
def port_forward(address: tuple[str, ...], vm_id: str, specs: tuple[str, ...]) -> None:
    """Forward local ports to a running sandbox: [ADDRESS:][LOCAL:]REMOTE..."""
    parsed, addresses = parse_forwards(specs, address)
    relay_client.connect(vm_id).close()  # fail now, with the reason, if the sandbox cannot be reached
    paths = find_vm_dir(vm_id)
    assert paths is not None  # connect() found it
    asyncio.run(_serve(paths.exec_socket, parsed, addresses))
