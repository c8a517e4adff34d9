"""Agent requests carried over the multiplexer (stdlib only, shared by both sides).

A stream is opened with a request (`op` plus fields), one record per op here;
the guest's replies and their grammar are in `replies`. Both sides parse what
they receive with these records, which reject anything malformed with a
ValueError naming the bad field.
"""

from __future__ import annotations

import math

from ._records import Record
from .boot import DEBUG_TIMING_FLAG, EXTRA_DISK_SERIAL_PREFIX, MAX_EXTRA_DISKS

# Host -> guest: stream requests
OP_EXEC = "exec"
OP_WRITE_FILE = "write_file"
OP_READ_FILE = "read_file"
OP_LIST_FILES = "list_files"
OP_SHUTDOWN = "shutdown"
OP_PING = "ping"  # liveness: the agent answers at once
OP_PORT_FORWARD = "port_forward"
OP_CHECKPOINT = "checkpoint"  # park for a snapshot (wire/checkpoint.py)
OPS = (OP_EXEC, OP_WRITE_FILE, OP_READ_FILE, OP_LIST_FILES, OP_SHUTDOWN, OP_PING, OP_PORT_FORWARD, OP_CHECKPOINT)

# Host -> guest: control messages on an exec stream
CTL_SIGNAL = "signal"
CTL_RESIZE = "resize"
CTL_CANCEL = "cancel"

READ_FILE_LIMIT = 16 * 1024 * 1024
MAX_PATH = 4096
MAX_COMMAND = 256 * 1024
MAX_ENV_ENTRIES = 4096
CANCEL_GRACE_SECONDS = 5.0


def _str(msg: dict, key: str, *, default: str | None = None, max_len: int = MAX_PATH) -> str:
    value = msg.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string")
    if len(value) > max_len:
        raise ValueError(f"{key!r} is longer than {max_len} characters")
    if "\x00" in value:
        raise ValueError(f"{key!r} contains a NUL byte")
    return value


def _int(msg: dict, key: str, *, default: int | None = None, lo: int = 0, hi: int = 1 << 62) -> int:
    value = msg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key!r} must be an integer")
    if not lo <= value <= hi:
        raise ValueError(f"{key!r} = {value} is outside {lo}..{hi}")
    return value


def _path(msg: dict, key: str = "path") -> str:
    path = _str(msg, key)
    if not path.startswith("/"):
        raise ValueError(f"{key!r} must be an absolute path, got {path!r}")
    return path


class TerminalSize(Record):
    __slots__ = ("rows", "cols")
    rows: int
    cols: int

    @classmethod
    def parse(cls, msg: dict) -> TerminalSize:
        return cls(_int(msg, "rows", lo=1, hi=65535), _int(msg, "cols", lo=1, hi=65535))

    def to_wire(self) -> dict:
        return {"rows": self.rows, "cols": self.cols}


class ExecRequest(Record):
    """command: str; env: dict; cwd: str; user: str; stdin: bool; tty: TerminalSize | None"""

    __slots__ = ("command", "env", "cwd", "user", "stdin", "tty")
    command: str
    env: dict[str, str]
    cwd: str
    user: str
    stdin: bool
    tty: TerminalSize | None
    _defaults = {"env": dict, "cwd": "/", "user": "", "stdin": False, "tty": None}

    @classmethod
    def parse(cls, msg: dict) -> ExecRequest:
        env = msg.get("env", {})
        if not isinstance(env, dict) or len(env) > MAX_ENV_ENTRIES:
            raise ValueError("'env' must be an object with at most 4096 entries")
        for key, value in env.items():
            if not isinstance(value, str) or not key or "=" in key or "\x00" in key + value:
                raise ValueError(f"invalid environment entry {key!r}")
        tty = msg.get("tty")
        if tty is not None and not isinstance(tty, dict):
            raise ValueError("'tty' must be an object or null")
        stdin = msg.get("stdin", False)
        if not isinstance(stdin, bool):
            raise ValueError("'stdin' must be a boolean")
        return cls(
            command=_str(msg, "command", max_len=MAX_COMMAND),
            env=dict(env),
            cwd=_path(msg, "cwd") if "cwd" in msg else "/",
            user=_str(msg, "user", default="", max_len=256),
            stdin=stdin,
            tty=TerminalSize.parse(tty) if tty is not None else None,
        )

    def to_wire(self) -> dict:
        return {
            "op": OP_EXEC,
            "command": self.command,
            "env": self.env,
            "cwd": self.cwd,
            "user": self.user,
            "stdin": self.stdin,
            "tty": self.tty.to_wire() if self.tty else None,
        }


class WriteFileRequest(Record):
    __slots__ = ("path", "mode")
    path: str
    mode: int
    _defaults = {"mode": 0o644}

    @classmethod
    def parse(cls, msg: dict) -> WriteFileRequest:
        return cls(_path(msg), _int(msg, "mode", default=0o644, hi=0o7777))

    def to_wire(self) -> dict:
        return {"op": OP_WRITE_FILE, "path": self.path, "mode": self.mode}


class PathRequest(Record):
    """read_file and list_files take only a path."""

    __slots__ = ("op", "path")
    op: str
    path: str

    @classmethod
    def parse(cls, msg: dict) -> PathRequest:
        return cls(msg["op"], _path(msg))

    def to_wire(self) -> dict:
        return {"op": self.op, "path": self.path}


class PingRequest(Record):
    """Liveness: the agent answers at once."""

    __slots__ = ()

    @classmethod
    def parse(cls, msg: dict) -> PingRequest:
        return cls()

    def to_wire(self) -> dict:
        return {"op": OP_PING}


class ShutdownRequest(Record):
    """Kill every workload, sync the disks and power off."""

    __slots__ = ()

    @classmethod
    def parse(cls, msg: dict) -> ShutdownRequest:
        return cls()

    def to_wire(self) -> dict:
        return {"op": OP_SHUTDOWN}


class CheckpointRequest(Record):
    """Answer, then wait on the raw port for a wake record (wire/checkpoint.py)."""

    __slots__ = ()

    @classmethod
    def parse(cls, msg: dict) -> CheckpointRequest:
        return cls()

    def to_wire(self) -> dict:
        return {"op": OP_CHECKPOINT}


class PortForwardRequest(Record):
    """Connect to `port` on the guest's loopback and relay bytes (stdin channel in, stdout out)."""

    __slots__ = ("port",)
    port: int

    @classmethod
    def parse(cls, msg: dict) -> PortForwardRequest:
        return cls(_int(msg, "port", lo=1, hi=65535))

    def to_wire(self) -> dict:
        return {"op": OP_PORT_FORWARD, "port": self.port}


class FileInfo(Record):
    """name: str; size: int; mode: int (POSIX st_mode); is_dir: bool"""

    __slots__ = ("name", "size", "mode", "is_dir")
    name: str
    size: int
    mode: int
    is_dir: bool

    @classmethod
    def parse(cls, msg: dict) -> FileInfo:
        name = _str(msg, "name", max_len=255)
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid file name {name!r}")
        is_dir = msg.get("is_dir")
        if not isinstance(is_dir, bool):
            raise ValueError("'is_dir' must be a boolean")
        return cls(name, _int(msg, "size"), _int(msg, "mode", hi=0xFFFFFFFF), is_dir)

    def to_wire(self) -> dict:
        return {"name": self.name, "size": self.size, "mode": self.mode, "is_dir": self.is_dir}


Request = (
    ExecRequest
    | WriteFileRequest
    | PathRequest
    | PingRequest
    | ShutdownRequest
    | PortForwardRequest
    | CheckpointRequest
)

_REQUESTS: dict[str, type[Request]] = {
    OP_EXEC: ExecRequest,
    OP_WRITE_FILE: WriteFileRequest,
    OP_READ_FILE: PathRequest,
    OP_LIST_FILES: PathRequest,
    OP_SHUTDOWN: ShutdownRequest,
    OP_PING: PingRequest,
    OP_PORT_FORWARD: PortForwardRequest,
    OP_CHECKPOINT: CheckpointRequest,
}


def parse_request(msg: dict) -> Request:
    """Parse an OPEN request in the guest into its record; raises ValueError on bad input."""
    op = msg.get("op")
    record = _REQUESTS.get(op) if isinstance(op, str) else None
    if record is None:
        raise ValueError(f"unknown op {op!r}")
    return record.parse(msg)


def parse_files(msg: dict) -> list[FileInfo]:
    files = msg.get("files")
    if not isinstance(files, list):
        raise ValueError("'files' must be a list")
    return [FileInfo.parse(f) if isinstance(f, dict) else _bad_entry() for f in files]


def _bad_entry():
    raise ValueError("file entries must be objects")


def parse_cpus(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"cpus must be a finite number > 0, got {value!r}")
    return float(value)


class GuestNetwork(Record):
    """How the guest's interface is configured (the kernel has no `ip=`)."""

    __slots__ = ("interface", "address", "prefix", "gateway", "mtu")
    interface: str
    address: str
    prefix: int
    gateway: str
    mtu: int

    @classmethod
    def parse(cls, msg: dict) -> GuestNetwork:
        interface = _str(msg, "interface", max_len=15)
        if not interface.isalnum():
            raise ValueError(f"invalid interface name {interface!r}")
        address, gateway = _str(msg, "address", max_len=15), _str(msg, "gateway", max_len=15)
        for value in (address, gateway):
            parts = value.split(".")
            if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
                raise ValueError(f"invalid IPv4 address {value!r}")
        return cls(interface, address, _int(msg, "prefix", lo=1, hi=30), gateway, _int(msg, "mtu", lo=576, hi=65535))

    def to_wire(self) -> dict:
        return {"interface": self.interface, "address": self.address, "prefix": self.prefix,
                "gateway": self.gateway, "mtu": self.mtu}  # fmt: skip


class GuestDisk(Record):
    """An extra disk: the virtio serial it has, where the guest mounts it, and who owns a fresh one."""

    __slots__ = ("serial", "mount", "readonly", "owner_uid", "owner_gid")
    serial: str
    mount: str
    readonly: bool
    owner_uid: int  # -1: leave the filesystem root's owner as it is
    owner_gid: int
    _defaults = {"readonly": False, "owner_uid": -1, "owner_gid": -1}

    @classmethod
    def parse(cls, msg: dict) -> GuestDisk:
        serial = _str(msg, "serial", max_len=20)  # virtio-blk serials are at most 20 bytes
        index = serial.removeprefix(EXTRA_DISK_SERIAL_PREFIX)
        if index == serial or not index.isdigit() or int(index) >= MAX_EXTRA_DISKS:
            raise ValueError(f"invalid disk serial {serial!r}")
        mount = _path(msg, "mount")
        parts = mount.split("/")[1:]
        if not all(p and p not in (".", "..") for p in parts) or parts[0] in ("proc", "sys", "dev"):
            raise ValueError(f"invalid disk mount point {mount!r}")
        if mount.startswith("/run/matchlock/") or mount == "/run/matchlock":
            raise ValueError(f"invalid disk mount point {mount!r}")
        readonly = msg.get("readonly", False)
        if not isinstance(readonly, bool):
            raise ValueError("'readonly' must be a boolean")
        uid = _int(msg, "owner_uid", default=-1, lo=-1, hi=2**32 - 2)
        gid = _int(msg, "owner_gid", default=-1, lo=-1, hi=2**32 - 2)
        return cls(serial, mount, readonly, uid, gid)

    def to_wire(self) -> dict:
        return {"serial": self.serial, "mount": self.mount, "readonly": self.readonly,
                "owner_uid": self.owner_uid, "owner_gid": self.owner_gid}  # fmt: skip


class GuestConfig(Record):
    """Sandbox settings the host sends in its HELLO; the guest applies them at boot."""

    __slots__ = (
        "hostname", "time_ns", "privileged", "cpus", "dns_servers", "extra_hosts", "network", "ca_certificate",
        "disks", "vfs", "debug_timing",
    )  # fmt: skip
    hostname: str
    time_ns: int
    privileged: bool
    cpus: float
    dns_servers: tuple[str, ...]
    extra_hosts: tuple[tuple[str, str], ...]
    network: GuestNetwork | None
    ca_certificate: str
    disks: tuple[GuestDisk, ...]
    vfs: bool  # the host serves mounts on the VFS port: the guest starts its FUSE daemon before it is ready
    debug_timing: bool  # MATCHLOCK_DEBUG_TIMING: `ready` and the first exit status carry the guest's stamps
    _defaults = {"privileged": False, "cpus": 1.0, "dns_servers": (), "extra_hosts": (), "network": None,
                 "ca_certificate": "", "disks": (), "vfs": False, "debug_timing": False}  # fmt: skip

    @classmethod
    def parse(cls, msg: dict) -> GuestConfig:
        hostname = _str(msg, "hostname", max_len=64)
        if not hostname or any(c.isspace() for c in hostname):
            raise ValueError(f"invalid hostname {hostname!r}")
        privileged, vfs = msg.get("privileged", False), msg.get("vfs", False)
        debug_timing = msg.get(DEBUG_TIMING_FLAG, False)
        for name, flag in (("privileged", privileged), ("vfs", vfs), (DEBUG_TIMING_FLAG, debug_timing)):
            if not isinstance(flag, bool):
                raise ValueError(f"'{name}' must be a boolean")
        dns = msg.get("dns_servers", [])
        hosts = msg.get("extra_hosts", [])
        if not isinstance(dns, list) or not all(isinstance(d, str) and d and len(d) < 64 for d in dns):
            raise ValueError("'dns_servers' must be a list of addresses")
        if not isinstance(hosts, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(p, str) and p and len(p) < 256 for p in h)
            for h in hosts
        ):
            raise ValueError("'extra_hosts' must be a list of [host, ip] pairs")
        network = msg.get("network")
        if network is not None and not isinstance(network, dict):
            raise ValueError("'network' must be an object or null")
        ca = _str(msg, "ca_certificate", default="", max_len=64 * 1024)
        if ca and not ca.startswith("-----BEGIN CERTIFICATE-----"):
            raise ValueError("'ca_certificate' must be a PEM certificate")
        disks = msg.get("disks", [])
        if not isinstance(disks, list) or len(disks) > MAX_EXTRA_DISKS or not all(isinstance(d, dict) for d in disks):
            raise ValueError(f"'disks' must be a list of at most {MAX_EXTRA_DISKS} objects")
        parsed = tuple(GuestDisk.parse(d) for d in disks)
        if len({d.serial for d in parsed}) != len(parsed) or len({d.mount for d in parsed}) != len(parsed):
            raise ValueError("'disks' repeats a serial or a mount point")
        return cls(
            hostname=hostname,
            time_ns=_int(msg, "time_ns"),
            privileged=privileged,
            cpus=parse_cpus(msg.get("cpus", 1.0)),
            dns_servers=tuple(dns),
            extra_hosts=tuple((h[0], h[1]) for h in hosts),
            network=GuestNetwork.parse(network) if network is not None else None,
            ca_certificate=ca,
            disks=parsed,
            vfs=vfs,
            debug_timing=debug_timing,
        )

    def to_wire(self) -> dict:
        return {
            "hostname": self.hostname,
            "time_ns": self.time_ns,
            "privileged": self.privileged,
            "cpus": self.cpus,
            "dns_servers": list(self.dns_servers),
            "extra_hosts": [list(h) for h in self.extra_hosts],
            "network": self.network.to_wire() if self.network is not None else None,
            "ca_certificate": self.ca_certificate,
            "disks": [d.to_wire() for d in self.disks],
            "vfs": self.vfs,
            **({DEBUG_TIMING_FLAG: True} if self.debug_timing else {}),  # hosts that do not trace never send it
        }
