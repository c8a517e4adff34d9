"""The sandbox proxy against a direct connection, in the same run, on the same stand-in server.

What is compared, and why it is fair:
- One client program (this file, `client` mode: Python's http.client over
  ssl, one process) talks HTTPS to the same stand-in server (192.0.2.10,
  name api.test, from tests/vm/netservers.py) in both cases. Only the path
  differs:
  - direct: the client runs in the benchmark's own network namespace and
    reaches the server over the veth pair to the stand-in internet;
  - proxied: the client runs in a "guest" namespace whose only link is a
    veth named tap0 into a sandbox namespace built by matchlock's own
    `SandboxNamespace` code, with matchlock's nftables ruleset. Its TCP
    connections are redirected exactly as a guest's are, terminated by the
    real `NetworkProxy` (TLS interception with the per-sandbox CA, the
    allow-list policy, network events written to a log as a sandbox does),
    which dials the server from the benchmark's namespace.
- The guest VM is left out on purpose: under TCG a guest's own CPU and the
  virtio-net path cost more than the proxy, vary from run to run, and are
  the same with or without a proxy. A client process behind a veth called
  tap0 sees the proxy as a guest does, without that noise. `--guest` adds
  the end-to-end number from inside a real VM, for reference.
- The proxy runs in this process (as in a sandbox owner); clients are
  separate processes, so they never share its interpreter lock.

Measured:
- HTTPS request latency on one kept-alive connection (median of N small
  GETs after warm-up). Target: the proxy adds at most 2 ms per request.
- Bulk download throughput (one large HTTPS GET, best of R). Target: at least
  0.5 x direct.
- Connection setup rate: new TLS connections, one request each, from T
  client threads, over a bounded number of connections.

Everything runs in private network and mount namespaces made for this run
(the stand-in internet uses documentation addresses only); nothing leaves
the machine. Needs root. Usage:
    .venv/bin/python benchmarks/bench_network.py [--requests N] [--mb MB] [--connections N] [--guest]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "vm"))
sys.path.insert(0, str(REPO / "tests"))  # support/, which netclient.py uses
from benchstate import isolate  # noqa: E402

SERVER = "192.0.2.10"
NAME = "api.test"
CLIENT_TIMEOUT = 300


# --- client mode (a separate process; direct or inside the guest namespace) ------------------------------


def _connect(ca: str) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["http/1.1"])
    sock = socket.create_connection((SERVER, 443), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = http.client.HTTPSConnection(NAME, 443, timeout=30)
    conn.sock = context.wrap_socket(sock, server_hostname=NAME)
    return conn


def _get(conn: http.client.HTTPConnection, target: str, close: bool = False) -> bytes:
    conn.request("GET", target, headers={"Host": NAME, **({"Connection": "close"} if close else {})})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {target}: {response.status} {body[:200]!r}")
    return body


def client_latency(ca: str, count: int) -> dict:
    conn = _connect(ca)
    samples = []
    for i in range(20 + count):
        started = time.perf_counter()
        _get(conn, "/echo")
        if i >= 20:
            samples.append((time.perf_counter() - started) * 1000)
    conn.close()
    return {"median_ms": statistics.median(samples), "p90_ms": sorted(samples)[int(len(samples) * 0.9)]}


def client_throughput(ca: str, megabytes: int, repeats: int) -> dict:
    size = megabytes * 1024 * 1024
    rates = []
    conn = _connect(ca)
    for _ in range(repeats):
        conn.request("GET", f"/bytes?n={size}", headers={"Host": NAME})
        response = conn.getresponse()
        started, got = time.perf_counter(), 0
        buffer = bytearray(1 << 20)
        while True:
            n = response.readinto(buffer)
            if not n:
                break
            got += n
        elapsed = time.perf_counter() - started
        if got != size:
            raise RuntimeError(f"short download: {got} of {size} bytes")
        rates.append(size / elapsed / 1e6)
    conn.close()
    return {"best_mb_s": max(rates), "median_mb_s": statistics.median(rates)}


def client_connections(ca: str, total: int, threads: int) -> dict:
    done, errors = [0], []
    lock = threading.Lock()
    deadline = time.monotonic() + 120

    def worker(n: int) -> None:
        for _ in range(n):
            if time.monotonic() > deadline:
                return
            try:
                conn = _connect(ca)
                _get(conn, "/echo", close=True)
                conn.close()
                with lock:
                    done[0] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(total // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    return {"per_second": done[0] / elapsed, "connections": done[0], "errors": errors[:3], "error_count": len(errors)}


def client_main(argv: list[str]) -> None:
    mode, ca, *rest = argv
    if mode == "latency":
        result = client_latency(ca, int(rest[0]))
    elif mode == "throughput":
        result = client_throughput(ca, int(rest[0]), int(rest[1]))
    else:
        result = client_connections(ca, int(rest[0]), int(rest[1]))
    print(json.dumps(result))


# --- the proxied path without a VM ------------------------------------------------------------------------


def build_proxy(inet, workdir: Path, loop: asyncio.AbstractEventLoop):
    """matchlock's sandbox namespace and proxy, with a client namespace behind a veth named tap0."""
    from matchlock.api.network import NetworkConfig
    from matchlock.net import namespace as ns
    from matchlock.net.proxy import NetworkProxy
    from matchlock.net.tls import UpstreamTLS
    from matchlock.policy.engine import NetworkPolicy

    guest = f"mlk-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", guest], check=True)
    peer = "eth0"

    class BenchNamespace(ns.SandboxNamespace):
        def _configure(self) -> None:  # the same namespace, but the "TAP" is a veth to a client namespace
            commands = (
                "link set lo up\n"
                f"link add {ns.TAP} type veth peer name {peer} netns {guest}\n"
                f"addr add {ns.GATEWAY}/{ns.PREFIX_LENGTH} dev {ns.TAP}\n"
                f"link set {ns.TAP} mtu {self.mtu} up\n"
            )
            ns._run(["ip", "-batch", "-"], commands, "iproute2")
            ns._run(["nft", "-f", "-"], ns.ruleset(), "nftables")

    namespace = BenchNamespace(1500)
    namespace.create()
    for args in (["link", "set", "lo", "up"], ["addr", "add", f"{ns.GUEST_ADDRESS}/{ns.PREFIX_LENGTH}", "dev", peer],
                 ["link", "set", peer, "up"], ["route", "add", "default", "via", ns.GATEWAY]):  # fmt: skip
        subprocess.run(["ip", "-n", guest, *args], check=True)
    log = workdir / "vm.log"

    def emit(event) -> None:  # what Sandbox._emit_event does for every request
        with open(log, "a") as f:
            f.write(event.log_line() + "\n")

    policy = NetworkPolicy(NetworkConfig(allowed_hosts=(NAME,), dns_servers=(inet_dns(),)), emit)
    proxy = NetworkProxy(namespace, policy, [inet_dns()], upstream_tls=UpstreamTLS(str(inet.ca)))
    asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(30)
    ca = workdir / "sandbox-ca.pem"
    ca.write_text(proxy.ca.pem)

    def close() -> None:
        asyncio.run_coroutine_threadsafe(proxy.aclose(), loop).result(30)
        asyncio.run_coroutine_threadsafe(namespace.aclose(), loop).result(30)
        subprocess.run(["ip", "netns", "del", guest], capture_output=True)

    return guest, ca, close


def inet_dns() -> str:
    from netfixtures import DNS_SERVER

    return DNS_SERVER


def run_client(prefix: list[str], *args: str) -> dict:
    argv = [*prefix, sys.executable, str(Path(__file__).resolve()), "client", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"client {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def guest_latency(inet, requests: int) -> float | None:
    """Median latency from inside a real VM (the test client image), through the same kind of proxy."""
    from netclient import ensure_client_image
    from netfixtures import HOSTS

    from matchlock.api.config import SandboxConfig
    from matchlock.api.network import HostMapping, NetworkConfig
    from matchlock.sandbox.sandbox import ExecSpec, Sandbox

    with tempfile.TemporaryDirectory(prefix="netclient-") as work:  # the image is imported: the build can go
        tag = ensure_client_image(Path(work))

    async def measure() -> float:
        config = SandboxConfig(image=tag, network=NetworkConfig(
            allowed_hosts=(NAME,), dns_servers=(inet_dns(),),
            add_hosts=tuple(HostMapping(n, ip) for n, ip in HOSTS.items())))  # fmt: skip
        box = await Sandbox.create(config)
        try:
            result = await box.exec(ExecSpec(f"mlk-net latency https://{NAME}/echo {requests}"))
            return json.loads(result.stdout.decode().strip().splitlines()[-1])["median_ms"]
        finally:
            await box.aclose()

    return asyncio.run(measure())


# --- orchestration ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="latency samples per path")
    parser.add_argument("--mb", type=int, default=200, help="size of the bulk download")
    parser.add_argument("--repeats", type=int, default=3, help="bulk downloads per path (best is reported)")
    parser.add_argument("--connections", type=int, default=400, help="new connections per path")
    parser.add_argument("--threads", type=int, default=4, help="client threads for the connection rate")
    parser.add_argument("--guest", action="store_true", help="also measure latency from inside a real VM")
    args = parser.parse_args()
    requests = max(20, min(args.requests, 5000))
    megabytes = max(10, min(args.mb, 2000))
    repeats = max(1, min(args.repeats, 10))
    connections = max(20, min(args.connections, 5000))
    threads = max(1, min(args.threads, 16))
    isolate("bench_network.py", private_mounts=True)

    from netfixtures import StandInInternet

    scratch = tempfile.TemporaryDirectory(prefix="matchlock-bench-net-")  # removed at the end, whatever happens
    workdir = Path(scratch.name)
    os.environ.setdefault("MATCHLOCK_STATE_DIR", str(workdir / "state"))
    inet = StandInInternet(workdir / "inet").start()
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    close_proxy = None
    try:
        # This process is in its own mount namespace: the proxy's lookups go to the stand-in DNS server.
        subprocess.run(["mount", "--bind", str(inet.resolv_conf), "/etc/resolv.conf"], check=True)
        os.environ["MATCHLOCK_UPSTREAM_CA_FILE"] = str(inet.ca)
        loop_thread.start()
        guest, sandbox_ca, close_proxy = build_proxy(inet, workdir, loop)
        direct, proxied = [], ["ip", "netns", "exec", guest]
        results = {}
        for label, prefix, ca in (("direct", direct, str(inet.ca)), ("proxied", proxied, str(sandbox_ca))):
            results[label] = {
                "latency": run_client(prefix, "latency", ca, str(requests)),
                "throughput": run_client(prefix, "throughput", ca, str(megabytes), str(repeats)),
                "connections": run_client(prefix, "connections", ca, str(connections), str(threads)),
            }
        in_guest = guest_latency(inet, min(requests, 200)) if args.guest else None
    finally:
        if close_proxy is not None:
            close_proxy()
        loop.call_soon_threadsafe(loop.stop)
        inet.stop()
        scratch.cleanup()

    d, p = results["direct"], results["proxied"]
    added = p["latency"]["median_ms"] - d["latency"]["median_ms"]
    ratio = p["throughput"]["best_mb_s"] / d["throughput"]["best_mb_s"]
    print("network proxy vs direct (same client, same stand-in HTTPS server, same run)")
    print(f"  HTTPS latency, kept-alive, median of {requests}: direct {d['latency']['median_ms']:6.2f} ms"
          f"  proxied {p['latency']['median_ms']:6.2f} ms  (p90 {d['latency']['p90_ms']:.2f} / "
          f"{p['latency']['p90_ms']:.2f})")  # fmt: skip
    print(f"    added by the proxy: {added:.2f} ms per request; target <= 2 ms -> {'met' if added <= 2 else 'missed'}")
    print(f"  bulk download, {megabytes} MB, best of {repeats}: direct {d['throughput']['best_mb_s']:7.1f} MB/s"
          f"  proxied {p['throughput']['best_mb_s']:7.1f} MB/s")  # fmt: skip
    print(f"    ratio {ratio:.2f} x direct; target >= 0.5 -> {'met' if ratio >= 0.5 else 'missed'}")
    print(f"  new TLS connection + 1 request, {threads} client threads: direct {d['connections']['per_second']:6.1f}/s"
          f"  proxied {p['connections']['per_second']:6.1f}/s"
          f"  (errors {d['connections']['error_count']} / {p['connections']['error_count']})")  # fmt: skip
    for label in ("direct", "proxied"):
        if results[label]["connections"]["errors"]:
            print(f"    {label} errors: {results[label]['connections']['errors']}")
    if in_guest is not None:
        print(
            f"  for reference, from inside a real VM ({'TCG' if 'tcg' in _accel() else 'KVM'}): "
            f"median {in_guest:.2f} ms per kept-alive HTTPS request"
        )


def _accel() -> str:
    from matchlock.vm.accel import choose_accelerator

    return str(choose_accelerator()).lower()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2:])
    else:
        main()
