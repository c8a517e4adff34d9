"""The workload seccomp filter: decoded as BPF, then installed for real in a forked child."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import struct

import pytest

from matchlock.guest import seccomp, syscalls


@pytest.fixture(autouse=True, scope="module")
def linux_x86_64() -> None:
    """Guests are x86_64 Linux, so the filter is installed for real only there; fail (not skip) elsewhere."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.fail(
            f"these tests install the guest's x86_64 seccomp filter; run them on Linux x86_64, "
            f"not {platform.system()} {platform.machine()}"
        )


SYS_GETPID = 39
SYS_PTRACE = 101
SYS_PROCESS_VM_READV = 310
SYS_PROCESS_VM_WRITEV = 311
PTRACE_TRACEME = 0

BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_RET_K = 0x06


def decode(program: bytes) -> list[tuple[int, int, int, int]]:
    assert len(program) % 8 == 0
    return [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]


def run_filter(nr: int, arch: int = seccomp.AUDIT_ARCH_X86_64) -> int:
    """Interpret the classic-BPF program for one seccomp_data; return the action."""
    insns = decode(seccomp.build_filter())
    acc = 0
    pc = 0
    data = struct.pack("=iI", nr, arch)  # seccomp_data: nr (int), arch (u32), ...
    for _ in range(len(insns) + 1):
        code, jt, jf, k = insns[pc]
        if code == BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == BPF_JGE_K:
            pc += 1 + (jt if acc >= k else jf)
        elif code == BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        assert 0 <= pc < len(insns), "jump out of the program"
    raise AssertionError("program did not terminate")


DENY = seccomp.SECCOMP_RET_ERRNO | errno.EPERM


# --- decoding ---------------------------------------------------------------


def test_program_structure_and_jump_offsets():
    insns = decode(seccomp.build_filter())
    blocked = sorted(seccomp.BLOCKED_SYSCALLS_X86_64.values())
    assert len(insns) == 5 + len(blocked) + 2
    assert insns[0] == (BPF_LD_W_ABS, 0, 0, 4)  # arch
    assert insns[1] == (BPF_JEQ_K, 1, 0, seccomp.AUDIT_ARCH_X86_64)  # match skips the kill
    assert insns[2] == (BPF_RET_K, 0, 0, seccomp.SECCOMP_RET_KILL_PROCESS)
    assert insns[3] == (BPF_LD_W_ABS, 0, 0, 0)  # nr
    deny_index = len(insns) - 1
    allow_index = len(insns) - 2
    assert insns[allow_index] == (BPF_RET_K, 0, 0, seccomp.SECCOMP_RET_ALLOW)
    assert insns[deny_index] == (BPF_RET_K, 0, 0, DENY)
    code, jt, jf, k = insns[4]
    assert (code, k, jf) == (BPF_JGE_K, seccomp.X32_SYSCALL_BIT, 0)
    assert 4 + 1 + jt == deny_index
    for offset, number in enumerate(blocked):
        index = 5 + offset
        code, jt, jf, k = insns[index]
        assert (code, k, jf) == (BPF_JEQ_K, number, 0)
        assert index + 1 + jt == deny_index, f"JEQ for syscall {number} does not land on the deny return"


def test_blocked_numbers_are_the_x86_64_ones():
    assert seccomp.BLOCKED_SYSCALLS_X86_64 == {
        "ptrace": 101,
        "kexec_load": 246,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "kexec_file_load": 320,
    }


@pytest.mark.parametrize("nr", sorted(seccomp.BLOCKED_SYSCALLS_X86_64.values()))
def test_interpreted_blocked_calls_are_denied(nr):
    assert run_filter(nr) == DENY


@pytest.mark.parametrize("nr", [0, 1, 39, 59, 100, 102, 245, 247, 309, 312, 319, 321, 450])
def test_interpreted_other_calls_allowed(nr):
    assert run_filter(nr) == seccomp.SECCOMP_RET_ALLOW


@pytest.mark.parametrize("nr", [SYS_GETPID | seccomp.X32_SYSCALL_BIT, SYS_PTRACE | seccomp.X32_SYSCALL_BIT, -1])
def test_interpreted_x32_and_out_of_range_numbers_denied(nr):
    assert run_filter(nr) == DENY


@pytest.mark.parametrize("arch", [0x40000003, 0xC00000B7, 0])  # i386, aarch64, garbage
def test_interpreted_foreign_arch_killed(arch):
    assert run_filter(SYS_GETPID, arch) == seccomp.SECCOMP_RET_KILL_PROCESS


# --- installed for real -----------------------------------------------------


def _child_probe(install: bool) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = {}
    if install:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        syscalls.SeccompFilter(seccomp.build_filter()).install()

    def call(name, *args):
        ctypes.set_errno(0)
        ret = libc.syscall(*args)
        result[name] = [ret, ctypes.get_errno() if ret == -1 else 0]

    call("getpid", SYS_GETPID)
    result["getpid_matches"] = result["getpid"][0] == os.getpid()
    # A zero-length read of our own memory is harmless and succeeds unfiltered.
    call("process_vm_readv", SYS_PROCESS_VM_READV, os.getpid(), None, 0, None, 0, 0)
    call("process_vm_writev", SYS_PROCESS_VM_WRITEV, os.getpid(), None, 0, None, 0, 0)
    call("x32_getpid", SYS_GETPID | seccomp.X32_SYSCALL_BIT)
    call("ptrace", SYS_PTRACE, PTRACE_TRACEME, 0, 0, 0)
    with open("/proc/self/status") as f:
        result["status"] = [line.strip() for line in f if line.startswith(("Seccomp:", "NoNewPrivs:"))]
    return result


def run_in_child(install: bool) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(read_fd)
            payload = json.dumps(_child_probe(install)).encode()
        except BaseException as exc:  # noqa: BLE001
            payload = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
            code = 1
        try:
            os.write(write_fd, payload)
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child died with status {status:#x}"
    result = json.loads(b"".join(chunks))
    assert "error" not in result, result.get("error")
    assert os.WEXITSTATUS(status) == 0
    return result


def test_without_filter_the_probes_succeed():
    """Control: proves the probes are capable of succeeding on this host."""
    result = run_in_child(install=False)
    assert result["getpid_matches"] is True
    assert result["process_vm_readv"] == [0, 0]
    assert result["x32_getpid"][1] != errno.EPERM
    assert result["ptrace"] == [0, 0], (
        "PTRACE_TRACEME is denied on this host even without the filter, so the filter test cannot tell "
        "the filter's denial apart: allow ptrace (kernel.yama.ptrace_scope < 3, no container seccomp profile)"
    )


def test_installed_filter_denies_ptrace_and_process_vm_with_eperm():
    result = run_in_child(install=True)
    assert "Seccomp:\t2" in result["status"]
    assert "NoNewPrivs:\t1" in result["status"]
    assert result["ptrace"] == [-1, errno.EPERM]
    assert result["process_vm_readv"] == [-1, errno.EPERM]
    assert result["process_vm_writev"] == [-1, errno.EPERM]
    assert result["x32_getpid"] == [-1, errno.EPERM]
    # Harmless calls still work (the child got this far and could write to the pipe too).
    assert result["getpid_matches"] is True
    assert result["getpid"][0] > 0


def test_filter_is_inherited_and_permanent_after_fork():
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_fd)
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            syscalls.SeccompFilter(seccomp.build_filter()).install()
            grandchild = os.fork()
            if grandchild == 0:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.syscall.restype = ctypes.c_long
                ret = libc.syscall(SYS_PTRACE, PTRACE_TRACEME, 0, 0, 0)
                os.write(write_fd, f"{ret} {ctypes.get_errno()}".encode())
                os._exit(0)
            os.waitpid(grandchild, 0)
        finally:
            os._exit(0)
    os.close(write_fd)
    data = os.read(read_fd, 100).decode()
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert data == f"-1 {errno.EPERM}"
