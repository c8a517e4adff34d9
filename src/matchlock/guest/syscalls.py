"""Thin ctypes wrappers for the Linux calls the guest needs and Python 3.11 lacks.

Loaded once at boot, before pivot_root, so nothing here touches the image's
filesystem later.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

SYS_PIVOT_ROOT = 155
SYS_CAPSET = 126
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
RB_AUTOBOOT = 0x01234567
CLOCK_REALTIME = 0


def _check(result: int, what: str) -> int:
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def _b(value: str | None) -> bytes | None:
    return value.encode() if value is not None else None


_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.syscall.restype = ctypes.c_long
_libc.reboot.argtypes = (ctypes.c_int,)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
        f"mount {source or fstype} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


# ctypes types are made once, at import: under emulation making one costs milliseconds.
class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (bit masks of capability numbers); libc has no wrapper."""
    masks = (effective, permitted, inheritable)
    data = (_CapData * 2)(_CapData(*(m & 0xFFFFFFFF for m in masks)), _CapData(*(m >> 32 & 0xFFFFFFFF for m in masks)))
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.syscall(SYS_CAPSET, ctypes.byref(header), data), "capset")


class SeccompFilter:
    """A classic-BPF program (sock_filter structs), put in prctl's form once and installed in each workload."""

    def __init__(self, program: bytes) -> None:
        self._buffer = ctypes.create_string_buffer(program, len(program))  # kept alive with the struct
        self._prog = _SockFprog(len(program) // 8, ctypes.cast(self._buffer, ctypes.c_void_p))

    def install(self) -> None:
        _check(
            _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self._prog), 0, 0),
            "prctl(PR_SET_SECCOMP)",
        )


def set_realtime_clock(time_ns: int) -> None:
    ts = _Timespec(time_ns // 1_000_000_000, time_ns % 1_000_000_000)
    _check(_libc.clock_settime(CLOCK_REALTIME, ctypes.byref(ts)), "clock_settime")


RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def reseed_random(seed: bytes) -> None:
    """Mix host entropy into the kernel pool and force a new CRNG key (for restored clones)."""
    import fcntl
    import struct

    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def reboot() -> None:
    """Reset the machine; with QEMU's -no-reboot this ends the QEMU process."""
    os.sync()
    _check(_libc.reboot(RB_AUTOBOOT), "reboot")
