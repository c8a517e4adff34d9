"""`matchlock port-forward <id> [LOCAL:]REMOTE...`: forward local ports into a running sandbox.

Every accepted connection opens its own relay connection (message type 9)
to the process that owns the sandbox, which tunnels it to the guest's
127.0.0.1:REMOTE. Runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import signal

import click

from ..api.errors import MatchlockError
from ..api.paths import vms_dir
from ..sandbox import relay_protocol as rp
from ..sandbox.portforward import ForwardSpec, parse_addresses
from .exec import connect_relay


async def _tunnel(socket_path: str, remote_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    relay_reader, relay_writer = await asyncio.open_unix_connection(socket_path)
    relay_writer.write(rp.encode(rp.PORT_FORWARD, json.dumps({"remote_port": remote_port}).encode()))

    async def upload() -> None:
        while data := await reader.read(65536):
            relay_writer.write(rp.encode(rp.STDIN, data))
            await relay_writer.drain()
        relay_writer.write(rp.encode(rp.STDIN, b""))

    uploading = asyncio.ensure_future(upload())
    decoder = rp.Decoder(rp.SERVER_TYPES)
    try:
        while data := await relay_reader.read(65536):
            for kind, payload in decoder.feed(data):
                if kind == rp.STDOUT and payload:
                    writer.write(payload)
                    await writer.drain()
                elif kind == rp.STDOUT:
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
                elif kind in (rp.EXIT, rp.EXEC_RESULT, rp.STDERR):
                    if kind != rp.EXIT:
                        click.echo(f"port-forward: {payload.decode(errors='replace')[:500]}", err=True)
                    return
    except (ConnectionError, rp.RelayProtocolError):
        pass
    finally:
        uploading.cancel()
        relay_writer.close()
        writer.close()


async def _serve(vm_id: str, specs: list[ForwardSpec], addresses: list[str]) -> None:
    socket_path = str(vms_dir() / vm_id / "exec.sock")
    servers = []
    for spec in specs:
        for address in addresses:

            def handle(reader, writer, remote=spec.remote_port):
                return _tunnel(socket_path, remote, reader, writer)

            try:
                servers.append(await asyncio.start_server(handle, address, spec.local_port, reuse_address=True))
            except OSError as exc:
                reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise MatchlockError(f"cannot listen on {address}:{spec.local_port}: {reason}") from None
            click.echo(f"Forwarding {address}:{spec.local_port} -> sandbox:{spec.remote_port}", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()


@click.command("port-forward")
@click.option("--address", multiple=True, help="Local address to listen on (default 127.0.0.1); repeatable.")
@click.argument("vm_id")
@click.argument("specs", nargs=-1, required=True)
def port_forward(address: tuple[str, ...], vm_id: str, specs: tuple[str, ...]) -> None:
    """Forward local ports to a running sandbox: [LOCAL:]REMOTE..."""
    parsed = [ForwardSpec.parse(spec) for spec in specs]
    addresses = parse_addresses(address)
    seen = set()
    for spec in parsed:
        for addr in addresses:
            if (addr, spec.local_port) in seen:
                raise MatchlockError(f"duplicate listen address {addr}:{spec.local_port}")
            seen.add((addr, spec.local_port))
    connect_relay(vm_id).close()  # fail now, with the reason, if the sandbox cannot be reached
    asyncio.run(_serve(vm_id, parsed, addresses))
