"""SPIKE (benchmark only): a vhost-user-fs back end in Python that serves a host directory to the guest's
virtio-fs driver through our own VFS router, with no guest daemon.

QEMU (`-device vhost-user-fs-device,chardev=...`) connects to `--socket`; we speak the vhost-user slave
protocol (protocol features: MQ only; no REPLY_ACK, no CONFIGURE_MEM_SLOTS), map guest RAM from the
SET_MEM_TABLE fds, and take FUSE requests straight off the split virtqueues. Each request goes through
the guest's own sans-IO translator (`guest.fuse.MountTranslator`) and the host's `VfsServer` (over a
socketpair, in this process, on one event loop), so the only change measured is the transport: no guest
FUSE daemon, no virtio-serial hop. Replies are written into the chain's device-writable descriptors.

Everything read from guest memory is hostile: descriptor indices, chain lengths and every (address,
length) are checked against the ring size and the mapped regions before use; a bad chain ends the
back end (the guest's mount then hangs, as with a dead virtiofsd) rather than touching memory outside.

Not done (it is a spike): indirect descriptors, EVENT_IDX, packed rings, the notification queue (the
host's cache-invalidation notices are dropped), migration/state save (QEMU 7.2 blocks it anyway), and a
translator per FUSE connection: each exec's mount namespace mounts the tag anew (a new INIT), and the one
translator, its cache and the host's node table carry over between them.

Usage: python benchmarks/vhost_user_fs_proto.py --socket PATH --source DIR
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import signal
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from matchlock.guest import fuse  # noqa: E402
from matchlock.vfs.hostfs import HostFSProvider  # noqa: E402
from matchlock.vfs.intercept import Interceptor  # noqa: E402
from matchlock.vfs.router import Mount, Router  # noqa: E402
from matchlock.vfs.server import VfsServer  # noqa: E402
from matchlock.wire import vfs  # noqa: E402
from matchlock.wire.frames import RemoteProtocolError  # noqa: E402

HEADER = struct.Struct("<III")  # request, flags, size
VERSION, REPLY = 0x1, 0x4
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
VIRTIO_F_VERSION_1 = 1 << 32
F_PROTOCOL_FEATURES = 1 << 30
FEATURES = VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES
# QEMU 7.2 learns the back end's memory-slot limit only with protocol features (else it takes 0 and refuses
# the device); MQ makes it ask GET_QUEUE_NUM. With protocol features a ring runs only once enabled.
PROTOCOL_MQ = 1 << 0
PROTOCOL_FEATURES = PROTOCOL_MQ
MAX_REGIONS = 8
MAX_QUEUES = 2  # hiprio + one request queue (QEMU 7.2's num-request-queues default)
MAX_RING = 1024
REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (QEMU virtual addresses)
DESC = struct.Struct("<QIHH")
DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4
U16, USED_ELEM = struct.Struct("<H"), struct.Struct("<II")
AVAIL_NO_INTERRUPT = 1


class Hostile(Exception):
    """The guest (or QEMU) handed us something out of bounds: stop serving."""


class Memory:
    """Guest RAM regions from SET_MEM_TABLE, mapped shared; every access is bounds-checked."""

    def __init__(self) -> None:
        self.regions: list[tuple[int, int, int, mmap.mmap, memoryview]] = []  # gpa, size, uva, map, view

    def set(self, payload: bytes, fds: list[int]) -> None:
        (count,) = struct.unpack_from("<I", payload)
        if not 0 < count <= MAX_REGIONS or len(fds) != count or len(payload) < 8 + count * REGION.size:
            raise Hostile(f"SET_MEM_TABLE with {count} regions and {len(fds)} fds")
        # The old maps stay (views of them may be held by rings and replies in flight); a spike leaks them.
        self.regions = []
        for i in range(count):
            gpa, size, uva, offset = REGION.unpack_from(payload, 8 + i * REGION.size)
            mapped = mmap.mmap(fds[i], size + offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fds[i])
            self.regions.append((gpa, size, uva, mapped, memoryview(mapped)[offset : offset + size]))

    def guest(self, addr: int, length: int) -> memoryview:
        for gpa, size, _, _, view in self.regions:
            if gpa <= addr and addr + length <= gpa + size:
                return view[addr - gpa : addr - gpa + length]
        raise Hostile(f"guest buffer {addr:#x}+{length} is outside guest RAM")

    def qemu(self, addr: int, length: int) -> memoryview:
        for _, size, uva, _, view in self.regions:
            if uva <= addr and addr + length <= uva + size:
                return view[addr - uva : addr - uva + length]
        raise Hostile(f"ring address {addr:#x}+{length} is outside guest RAM")


class Ring:
    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addrs: tuple[int, int, int] | None = None
        self.desc = self.avail = self.used = memoryview(b"")
        self.last_avail = 0
        self.used_idx = 0
        self.kick = self.call = -1
        self.started = False
        self.enabled = False

    def map(self, memory: Memory) -> None:
        assert self.addrs is not None
        desc, used, avail = self.addrs
        self.desc = memory.qemu(desc, DESC.size * self.num)
        self.avail = memory.qemu(avail, 4 + 2 * self.num + 2)
        self.used = memory.qemu(used, 4 + USED_ELEM.size * self.num + 2)
        self.used_idx = U16.unpack_from(self.used, 2)[0]

    def chain(self, memory: Memory, head: int) -> tuple[bytes, list[memoryview]]:
        """The request bytes (device-readable part) and the reply buffers (device-writable part)."""
        readable: list[bytes] = []
        writable: list[memoryview] = []
        index, seen = head, 0
        while True:
            if index >= self.num:
                raise Hostile(f"descriptor {index} of a {self.num}-entry ring")
            seen += 1
            if seen > self.num:
                raise Hostile(f"descriptor chain from {head} loops")
            addr, length, flags, nxt = DESC.unpack_from(self.desc, index * DESC.size)
            if flags & DESC_INDIRECT:
                raise Hostile("indirect descriptor (not negotiated)")
            view = memory.guest(addr, length)
            if flags & DESC_WRITE:
                writable.append(view)
            elif writable:
                raise Hostile("a readable descriptor after a writable one")
            else:
                readable.append(bytes(view))
            if not flags & DESC_NEXT:
                return b"".join(readable), writable
            index = nxt

    def put(self, head: int, written: int) -> None:
        USED_ELEM.pack_into(self.used, 4 + (self.used_idx % self.num) * USED_ELEM.size, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        U16.pack_into(self.used, 2, self.used_idx)


def scatter(buffers: list[memoryview], data: bytes) -> int:
    if len(data) > sum(len(b) for b in buffers):
        raise Hostile(f"a {len(data)}-byte reply for {sum(len(b) for b in buffers)} bytes of buffers")
    pos = 0
    for buf in buffers:
        if pos >= len(data):
            break
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
    return pos


class Backend:
    """One vhost-user connection, one virtio-fs device, one VFS mount."""

    def __init__(self, conn: socket.socket, client: socket.socket) -> None:
        self.conn = conn
        self.client = client  # our end of the socketpair to the VfsServer
        self.memory = Memory()
        self.rings = [Ring(i) for i in range(MAX_QUEUES)]
        self.loop = asyncio.get_running_loop()
        self.translator: fuse.MountTranslator | None = None
        self.pending: dict[int, tuple[Ring, int, list[memoryview], fuse.Pending]] = {}
        self.next_id = 1
        self.decoder = vfs.ReplyDecoder()
        self.to_signal: set[Ring] = set()
        self.out = bytearray()
        self.writing = False
        self.done = self.loop.create_future()
        self.requests = 0

    # ---- the VFS side (the host server over a socketpair) ---------------------------------------

    async def call(self, args: vfs.Args) -> vfs.Result:
        """One request before serving starts (HELLO): the server runs on this same loop, so await it."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.client, vfs.encode_request(self.next_id, 0, 0, 0, args))
        while True:
            for reply in self.decoder.feed(await loop.sock_recv(self.client, 1 << 20)):
                if reply.id == self.next_id:
                    self.next_id += 1
                    if reply.status:
                        raise OSError(-reply.status, f"{type(args).__name__}")
                    return vfs.decode_result(args._op, reply.payload)

    def send(self, frame: bytes) -> None:
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out += frame

    def flush(self) -> None:
        """Send what is queued; a full socketpair (a 1 MiB WRITE) waits for the server on this same loop."""
        while self.out:
            try:
                sent = self.client.send(self.out)
            except BlockingIOError:
                if not self.writing:
                    self.writing = True
                    self.loop.add_writer(self.client.fileno(), self.flush)
                return
            del self.out[:sent]
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.client.fileno())

    def on_replies(self) -> None:
        try:
            data = self.client.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            self.stop("the VFS server closed")
            return
        assert self.translator is not None
        for reply in self.decoder.feed(data):
            if reply.id == vfs.NOTICE_ID:
                continue  # cache invalidations: virtio-fs has no notification queue in Linux 6.1
            ring, head, writable, pending = self.pending.pop(reply.id)
            buffers, forget = self.translator.complete(pending, reply.status, reply.payload)
            ring.put(head, scatter(writable, b"".join(buffers)))
            self.to_signal.add(ring)
            if forget is not None:
                self.send(vfs.encode_request(0, 0, 0, 0, forget))
        self.signal()

    # ---- the virtqueues ---------------------------------------------------------------------------

    def on_kick(self, ring: Ring) -> None:
        try:
            os.read(ring.kick, 8)
        except BlockingIOError:
            pass
        if not (ring.started and ring.enabled) or self.translator is None:
            return
        try:
            while True:
                avail_idx = U16.unpack_from(ring.avail, 2)[0]
                if ring.last_avail == avail_idx:
                    break
                head = U16.unpack_from(ring.avail, 4 + 2 * (ring.last_avail % ring.num))[0]
                ring.last_avail = (ring.last_avail + 1) & 0xFFFF
                self.request(ring, head)
        except (Hostile, struct.error, ValueError, RemoteProtocolError) as exc:
            self.stop(f"bad request on queue {ring.index}: {exc}")
            return
        self.signal()

    def request(self, ring: Ring, head: int) -> None:
        assert self.translator is not None
        data, writable = ring.chain(self.memory, head)
        self.requests += 1
        action = self.translator.handle(data)
        for notice in action.notices:
            self.send(vfs.encode_request(0, 0, 0, 0, notice))
        if action.pending is not None:
            request_id = self.next_id
            self.next_id = self.next_id % vfs.MAX_ID + 1
            self.pending[request_id] = (ring, head, writable, action.pending)
            if action.wire is not None:
                op, payload = action.wire
                fixed, extra = payload if isinstance(payload, tuple) else (payload, b"")
                header = vfs.REQUEST_HEADER.pack(
                    len(fixed) + len(extra), request_id, op, action.uid, action.gid, action.pid
                )
                self.send(b"".join((header, fixed, extra)))
            else:
                assert action.args is not None
                self.send(vfs.encode_request(request_id, action.uid, action.gid, action.pid, action.args))
            return
        # Answered here (INIT, cache hits, errors), or no reply at all (FORGETs on hiprio).
        ring.put(head, scatter(writable, action.reply) if action.reply is not None else 0)
        self.to_signal.add(ring)

    def signal(self) -> None:
        for ring in self.to_signal:
            if ring.call >= 0 and not U16.unpack_from(ring.avail, 0)[0] & AVAIL_NO_INTERRUPT:
                os.write(ring.call, (1).to_bytes(8, "little"))
        self.to_signal.clear()

    # ---- vhost-user control messages -----------------------------------------------------------

    def reply(self, request: int, payload: bytes) -> None:
        self.conn.sendall(HEADER.pack(request, VERSION | REPLY, len(payload)) + payload)

    def on_control(self) -> None:
        try:
            head, fds, _, _ = socket.recv_fds(self.conn, HEADER.size, 8)
            if not head:
                self.stop("QEMU closed the vhost-user socket")
                return
            request, _flags, size = HEADER.unpack(head)
            if size > 4096:
                raise Hostile(f"vhost-user message {request} of {size} bytes")
            payload = self.conn.recv(size, socket.MSG_WAITALL) if size else b""
            self.control(request, payload, list(fds))
        except (Hostile, struct.error, OSError) as exc:
            self.stop(f"vhost-user: {exc}")

    def ring_of(self, payload: bytes) -> Ring:
        index = struct.unpack_from("<I", payload)[0] & 0xFF
        if index >= len(self.rings):
            raise Hostile(f"ring {index} of {len(self.rings)}")
        return self.rings[index]

    def control(self, request: int, payload: bytes, fds: list[int]) -> None:  # noqa: C901, PLR0912
        if request == GET_FEATURES:
            self.reply(request, struct.pack("<Q", FEATURES))
        elif request == SET_FEATURES:
            (features,) = struct.unpack_from("<Q", payload)
            if features & ~FEATURES:
                raise Hostile(f"features {features:#x} beyond the offered {FEATURES:#x}")
        elif request == GET_PROTOCOL_FEATURES:
            self.reply(request, struct.pack("<Q", PROTOCOL_FEATURES))
        elif request == SET_PROTOCOL_FEATURES:
            (features,) = struct.unpack_from("<Q", payload)
            if features & ~PROTOCOL_FEATURES:
                raise Hostile(f"protocol features {features:#x} beyond the offered {PROTOCOL_FEATURES:#x}")
        elif request == GET_QUEUE_NUM:
            self.reply(request, struct.pack("<Q", MAX_QUEUES))
        elif request in (SET_OWNER, RESET_OWNER):
            pass
        elif request == SET_MEM_TABLE:
            self.memory.set(payload, fds)
            for ring in self.rings:
                if ring.addrs is not None:
                    ring.map(self.memory)
        elif request == SET_VRING_NUM:
            index, num = VRING_STATE.unpack_from(payload)
            if not 0 < num <= MAX_RING or num & (num - 1):
                raise Hostile(f"ring size {num}")
            self.ring_of(payload).num = num
        elif request == SET_VRING_ADDR:
            ring = self.ring_of(payload)
            _, _, desc, used, avail, _ = VRING_ADDR.unpack_from(payload)
            ring.addrs = (desc, used, avail)
            ring.map(self.memory)
        elif request == SET_VRING_BASE:
            self.ring_of(payload).last_avail = VRING_STATE.unpack_from(payload)[1] & 0xFFFF
        elif request == GET_VRING_BASE:
            ring = self.ring_of(payload)
            ring.started = False
            if ring.kick >= 0:
                self.loop.remove_reader(ring.kick)
            self.reply(request, VRING_STATE.pack(ring.index, ring.last_avail))
        elif request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            ring = self.ring_of(payload)
            fd = fds[0] if fds and not struct.unpack_from("<Q", payload)[0] & 0x100 else -1
            if request == SET_VRING_KICK:
                if ring.kick >= 0:
                    self.loop.remove_reader(ring.kick)
                    os.close(ring.kick)
                ring.kick, ring.started = fd, fd >= 0
                if fd >= 0:
                    os.set_blocking(fd, False)
                    self.loop.add_reader(fd, self.on_kick, ring)
                    self.loop.call_soon(self.on_kick, ring)  # buffers made available before the kick fd
            elif request == SET_VRING_CALL:
                if ring.call >= 0:
                    os.close(ring.call)
                ring.call = fd
            elif fd >= 0:
                os.close(fd)
        elif request == SET_VRING_ENABLE:
            ring = self.ring_of(payload)
            ring.enabled = bool(VRING_STATE.unpack_from(payload)[1])
            if ring.enabled and ring.kick >= 0:
                self.loop.call_soon(self.on_kick, ring)
        else:
            for fd in fds:
                os.close(fd)
            print(f"vhost-user-fs-proto: ignored request {request}", file=sys.stderr, flush=True)

    def stop(self, why: str) -> None:
        print(f"vhost-user-fs-proto: stopped: {why} ({self.requests} requests)", file=sys.stderr, flush=True)
        if not self.done.done():
            self.done.set_result(None)


async def serve(socket_path: Path, source: Path) -> None:
    mounts = [Mount("/share", HostFSProvider(str(source)))]
    router = Router(mounts, Interceptor(None), VfsServer.executor())
    host_end, client = socket.socketpair()
    server = VfsServer(host_end, router)
    await server.start()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(1)
    listener.setblocking(False)
    conn, _ = await asyncio.get_running_loop().sock_accept(listener)
    conn.setblocking(True)
    backend = Backend(conn, client)
    client.setblocking(False)
    hello = await backend.call(vfs.Hello(vfs.VERSION, vfs.MAX_IO, vfs.FEATURES_ALL))
    assert isinstance(hello, vfs.HelloReply)
    info = hello.mounts[0]
    backend.translator = fuse.MountTranslator(
        info.root, max_io=hello.max_io, negative_valid_ns=info.negative_valid_ns, features=hello.features
    )
    loop = asyncio.get_running_loop()
    loop.add_reader(client.fileno(), backend.on_replies)
    loop.add_reader(conn.fileno(), backend.on_control)
    # The runner's per-step request counts: SIGUSR1 prints how many requests came off the rings so far.
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"@requests {backend.requests}", flush=True))
    await backend.done
    loop.remove_reader(conn.fileno())
    loop.remove_reader(client.fileno())
    await server.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.socket, args.source))


if __name__ == "__main__":
    main()
