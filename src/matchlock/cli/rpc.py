"""`matchlock rpc`: the JSON-RPC server the SDKs start (one JSON object per line on stdin/stdout)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import click


@click.command()
def rpc() -> None:
    """Serve JSON-RPC 2.0 on stdin/stdout for one sandbox (the SDKs run this; logs go to stderr)."""
    from ..rpc.server import serve

    in_fd, out_fd = os.dup(0), os.dup(1)
    # From here only the protocol writer reaches the real stdout: a stray print or a child process
    # (QEMU, mke2fs) writing to fd 1 lands on stderr, and no child can read the client's requests.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    level = os.environ.get("MATCHLOCK_RPC_LOG", "WARNING").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        level = "WARNING"
    logging.basicConfig(stream=sys.stderr, level=level, format="matchlock rpc: %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(in_fd, out_fd))
