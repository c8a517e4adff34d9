"""A full sandbox on Debian's cloud kernel: the fallback when the tuned kernel is absent."""

from __future__ import annotations

import pytest

from matchlock.kernel import fallback

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


@pytest.fixture(scope="module")
def fallback_kernel():
    return fallback.cached_fallback() or fallback.build_fallback(log=lambda _: None)


def test_run_on_the_fallback_kernel(cli, fallback_kernel):
    env = {"MATCHLOCK_KERNEL": str(fallback_kernel.vmlinuz), "MATCHLOCK_KERNEL_INITRD": str(fallback_kernel.initrd)}
    result = cli("run", "-u", "nobody", "--", "sh", "-c", "uname -r; id -u; echo err >&2; exit 4", env=env)
    assert result.returncode == 4, result
    assert result.stdout.splitlines() == [fallback_kernel.release, "65534"]
    assert result.stderr == "err\n"
