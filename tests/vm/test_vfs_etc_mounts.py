"""Host files mounted over the files the agent writes (/etc/hosts, /etc/resolv.conf, the CA's directory).

They are the user's: the sandbox starts, the guest sees them, and the host's copies stay byte for byte.
Before, a read-only one failed the start (EROFS) and a writable one was overwritten from the guest, the
sandbox CA appended to the host's bundle. One VM.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


def _digests(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_mounts_over_the_agents_own_files_are_left_as_the_host_has_them(cli, tmp_path: Path) -> None:
    hosts, resolv, certs = tmp_path / "hosts", tmp_path / "resolv.conf", tmp_path / "certs"
    hosts.write_text("10.0.0.1\tmyhost\n")
    resolv.write_text("nameserver 192.0.2.53\n")
    certs.mkdir()
    (certs / "ca-certificates.crt").write_text("HOST-ROOTS\n")
    before = _digests(hosts, resolv, certs)
    script = ('cat /etc/hosts /etc/resolv.conf; echo "ssl=$SSL_CERT_FILE node=$NODE_EXTRA_CA_CERTS"; '
              'head -1 "$SSL_CERT_FILE"; ls /etc/ssl/certs')  # fmt: skip
    result = cli(
        "run", "--allow-host", "api.example.com", "--dns-servers", "198.51.100.53",
        "-v", f"{hosts}:/etc/hosts:ro", "-v", f"{resolv}:/etc/resolv.conf:host_fs",
        "-v", f"{certs}:/etc/ssl/certs:host_fs", "--", "sh", "-c", script,
    )  # fmt: skip
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        "10.0.0.1\tmyhost",
        "nameserver 192.0.2.53",
        "ssl=/etc/matchlock-ca.crt node=/etc/matchlock-ca.crt",  # the CA alone, outside the mount
        "-----BEGIN CERTIFICATE-----",
        "ca-certificates.crt",
    ], result
    assert _digests(hosts, resolv, certs) == before
