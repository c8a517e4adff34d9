"""What the FUSE translator tells the daemon to do with one request, and what its reply will need (stdlib only).

Two of these are built for every request, so they are plain slotted classes that assign their
fields directly: a `wire._records.Record` (immutable, each field set through object.__setattr__)
took four times as long to build, and under emulation each microsecond here is tens of them.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing`'s: the guest pays for every import under emulation
if TYPE_CHECKING:
    from ..wire import vfs


class Pending:
    """What the reply to a forwarded request needs: the FUSE request, and its limits."""

    __slots__ = ("unique", "op", "size", "plus", "key", "source", "node", "gen", "changes", "fh")

    def __init__(
        self,
        unique: int,
        op: int,
        size: int = 0,
        plus: int = 0,
        key: tuple[int, bytes] | None = None,  # the (parent, name) a LOOKUP or an op making a name is about
        source: int = 0,  # a LINK's existing inode (the kernel's node id), whose cached attributes go stale
        node: int = 0,  # the host node the request is about
        gen: int = 0,  # the cache generation it was sent at (or its change began at)
        changes: tuple[int, ...] = (),  # the nodes it changes (see MetaCache.begin)
        fh: int = 0,  # an OPENDIR_READ's: the guest's own handle (fuse_dirs) the host's is opened for
    ) -> None:
        self.unique = unique
        self.op = op
        self.size = size
        self.plus = plus
        self.key = key
        self.source = source
        self.node = node
        self.gen = gen
        self.changes = changes
        self.fh = fh


class Action:
    """What to do with one FUSE request: write `reply` to /dev/fuse, send `args` to the host, send `notices`.

    Notices (FORGET, and RELEASE/RELEASEDIR answered here at once) go with request id 0 and get no reply.
    """

    __slots__ = ("reply", "args", "pending", "uid", "gid", "pid", "notices", "wire")

    def __init__(
        self,
        reply: bytes | None,
        args: vfs.Args | None = None,
        pending: Pending | None = None,
        uid: int = 0,
        gid: int = 0,
        pid: int = 0,
        notices: tuple[vfs.Forget | vfs.Release | vfs.Releasedir, ...] = (),
        # Instead of `args`: the wire op and its encoded payload (a WRITE's: its fixed fields and a
        # view of the data, joined once into the frame). Without `pending`: a request answered here
        # (`reply`), sent first with id 0 and no reply (FEATURE_SETATTR_NOTICE).
        wire: tuple[int, bytes | tuple[bytes, memoryview]] | None = None,
    ) -> None:
        self.reply = reply
        self.args = args
        self.pending = pending
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.notices = notices
        self.wire = wire
