"""The default seccomp filter for workloads, as classic BPF.

It denies, with EPERM, the calls that let one process read or rewrite
another's memory or replace the kernel: ptrace, process_vm_readv,
process_vm_writev, kexec_load and kexec_file_load. Any architecture other
than x86_64 (for example the i386 entry points, if the kernel has them) and
any x32 system call number is refused outright, so the list cannot be
bypassed through another ABI.
"""

from __future__ import annotations

import errno
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

BLOCKED_SYSCALLS_X86_64 = {
    "ptrace": 101,
    "kexec_load": 246,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kexec_file_load": 320,
}

# BPF opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

_OFFSET_NR = 0
_OFFSET_ARCH = 4


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter() -> bytes:
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    blocked = sorted(BLOCKED_SYSCALLS_X86_64.values())
    program = [
        _insn(_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        _insn(_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _OFFSET_NR),
        _insn(_JGE_K, len(blocked) + 1, 0, X32_SYSCALL_BIT),
    ]
    # One JEQ per blocked call; a match jumps to the shared deny return.
    for index, number in enumerate(blocked):
        program.append(_insn(_JEQ_K, len(blocked) - index, 0, number))
    program.append(_insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    program.append(_insn(_RET_K, 0, 0, deny))
    return b"".join(program)
