"""The guest client image of the network tests: `mlk-net` and what it needs.

An image with Debian's Python 3.11 + OpenSSL and the pure-Python h2, websockets
and dnspython libraries, for what the built-in busybox image cannot do:
verified TLS through the sandbox CA, HTTP/2, WebSocket, UDP, exact DNS
rcodes. It is assembled from the same cached Debian packages as the guest
runtime and imported with the real `matchlock image import`
(`ensure_client_image`; the `client_image` fixture of netfixtures.py).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

from support.cli import MATCHLOCK
from support.images import docker_save, image_config
from support.tarballs import MTIME, Entry, entry, layer

CLIENT_DEBS = [
    "busybox-static", "libc6", "zlib1g", "libexpat1", "libffi8", "libssl3",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
]  # fmt: skip
CLIENT_PY_PACKAGES = ("h2", "hpack", "hyperframe", "h11", "websockets", "dns")
PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian", "usr/lib/x86_64-linux-gnu/gconv",
         "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/ensurepip",
         "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/tkinter")  # fmt: skip
CLIENT_PATH = "/usr/local/bin/mlk-net"


def _tree_entries(root: Path) -> Iterator[Entry]:
    """The files under `root` (less PRUNE and bytecode) as root-owned entries."""
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as probe:  # gettarinfo (and its hard-link memory) needs one
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if any(rel == p or rel.startswith(p + "/") for p in PRUNE) or "__pycache__" in rel:
                continue
            info = probe.gettarinfo(str(path), rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = MTIME
            yield Entry(info, path.read_bytes() if info.isreg() else None)


def client_image_key() -> str:
    versions = subprocess.run(["dpkg-query", "-W", *CLIENT_DEBS], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256(versions.encode())
    h.update(CLIENT_SCRIPT.encode())
    h.update(inspect.getsource(build_client_image).encode())
    for name in CLIENT_PY_PACKAGES:
        module = __import__(name)
        h.update(f"{name}={getattr(module, '__version__', '')}".encode())
    return h.hexdigest()[:12]


def build_client_image(work: Path, tag: str) -> Path:
    """A `docker save` tarball: Debian's python3.11 + OpenSSL + busybox, the client libs and mlk-net.

    The files come from the host's installed Debian packages (scripts/setup.sh
    installs python3 and busybox-static), because the test session has no
    network to download anything.
    """
    root = work / "rootfs"
    for package in CLIENT_DEBS:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
        for name in listing.splitlines():
            source = Path(name)
            if not name.startswith("/") or source.is_dir() or not source.exists():
                continue
            target = root / name.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() and not target.is_symlink():
                shutil.copy2(source, target, follow_symlinks=False)
    # Debian 12 is merged-/usr: the packages ship /lib64 and /lib paths that are symlinks in a real system.
    for top in ("lib", "lib64", "bin", "sbin"):
        src = root / top
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, root / "usr" / top, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(src)
    site = root / "usr/lib/python3/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    for name in CLIENT_PY_PACKAGES:
        source = Path(__import__(name).__file__).parent
        shutil.copytree(source, site / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    applets = ("sh", "wget", "nc", "nslookup", "cat", "env", "grep", "ls", "timeout", "echo", "sleep", "tr",
               "hostname", "head", "id", "ps", "wc", "sed", "find", "xargs", "sort", "seq")  # fmt: skip
    directories = ("etc", "etc/ssl", "etc/ssl/certs", "tmp", "root", "proc", "sys", "dev", "run", "usr/local/bin")
    layer_bytes = layer(
        [
            *(entry(top, "sym", link=f"usr/{top}") for top in ("lib", "lib64", "bin", "sbin")),
            *_tree_entries(root),
            *(entry(d, "dir", mode=0o1777 if d == "tmp" else 0o755) for d in directories),
            *(entry(f"usr/bin/{applet}", "sym", link="busybox") for applet in applets),
            entry("usr/bin/python3", "sym", link="python3.11"),
            entry(CLIENT_PATH.lstrip("/"), data=CLIENT_SCRIPT, mode=0o755),
            entry(
                "etc/passwd", data="root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
            ),
            entry("etc/group", data="root:x:0:\nnogroup:x:65534:\n"),
            # An (empty) system bundle: the sandbox CA is appended to it and SSL_CERT_FILE points here.
            entry("etc/ssl/certs/ca-certificates.crt"),
        ]
    )
    config = image_config([layer_bytes], config={"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["sh"]})
    archive = work / "netclient.tar"
    archive.write_bytes(docker_save([layer_bytes], config, tag=tag))
    return archive


def ensure_client_image(work: Path) -> str:
    """Import the client image once per content (the tag carries a hash of what is inside)."""
    from matchlock.image.store import ImageStore

    tag = f"test/netclient:{client_image_key()}"
    if ImageStore().get(tag) is not None:
        return tag
    archive = build_client_image(work, tag)
    with open(archive, "rb") as stdin:
        result = subprocess.run([MATCHLOCK, "image", "import", tag], stdin=stdin, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"importing {tag} failed: {result.stderr}")
    return tag


# The client that runs in the guest (Debian python3.11). Prints one JSON object; exit 0 unless it crashed.
CLIENT_SCRIPT = r'''#!/usr/bin/python3.11
"""mlk-net: network probes from inside a matchlock guest. Every command prints one JSON object."""
import json, socket, ssl, sys, time, urllib.parse

def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")

def context(insecure=False, alpn=None):
    ctx = ssl.create_default_context()  # honours SSL_CERT_FILE
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx

def options(argv):
    opts = {"H": [], "connect": None, "method": "GET", "insecure": False, "no_sni": False, "timeout": 10.0, "data": None}
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-H": opts["H"].append(argv[i + 1]); i += 2
        elif a == "--connect": opts["connect"] = argv[i + 1]; i += 2
        elif a == "-X": opts["method"] = argv[i + 1]; i += 2
        elif a == "-d": opts["data"] = argv[i + 1].encode(); i += 2
        elif a == "--timeout": opts["timeout"] = float(argv[i + 1]); i += 2
        elif a == "-k": opts["insecure"] = True; i += 1
        elif a == "--no-sni": opts["no_sni"] = True; opts["insecure"] = True; i += 1
        else: rest.append(a); i += 1
    return opts, rest

def open_socket(url, opts, alpn=None):
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme in ("https", "wss") else 80)
    sock = socket.create_connection((opts["connect"] or u.hostname, port), timeout=opts["timeout"])
    if u.scheme in ("https", "wss"):
        ctx = context(opts["insecure"], alpn)
        sock = ctx.wrap_socket(sock, server_hostname=None if opts["no_sni"] else u.hostname)
    return u, sock

def headers_of(opts, u):
    hs = [tuple(x.strip() for x in h.split(":", 1)) for h in opts["H"]]
    if not any(k.lower() == "host" for k, _ in hs):
        hs.insert(0, ("Host", u.netloc))
    return hs

def http1(url, opts, stream=False):
    import http.client
    u, sock = open_socket(url, opts, ["http/1.1"])
    conn = http.client.HTTPConnection(u.hostname, timeout=opts["timeout"])
    conn.sock = sock
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    conn.putrequest(opts["method"], target, skip_host=True, skip_accept_encoding=True)
    for k, v in headers_of(opts, u):
        conn.putheader(k, v)
    if opts["data"] is not None:
        conn.putheader("Content-Length", str(len(opts["data"])))
    conn.endheaders(opts["data"])
    r = conn.getresponse()
    result = {"status": r.status, "headers": [[k, v] for k, v in r.getheaders()],
              "alpn": sock.selected_alpn_protocol() if isinstance(sock, ssl.SSLSocket) else None}
    if stream:
        start, lines, times = time.monotonic(), [], []
        while True:
            line = r.readline()
            if not line:
                break
            lines.append(line.decode(errors="replace"))
            times.append(round(time.monotonic() - start, 3))
        result.update(lines=lines, times=times)
    else:
        result["body"] = r.read().decode(errors="replace")
    return result

def h2get(url, opts):
    import h2.connection, h2.config, h2.events
    u, sock = open_socket(url, opts, ["h2", "http/1.1"])
    alpn = sock.selected_alpn_protocol()
    if alpn != "h2":
        return {"alpn": alpn, "error": "server did not negotiate h2"}
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    hs = [(":method", opts["method"]), (":scheme", "https"), (":authority", u.netloc), (":path", target)]
    hs += [(k.lower(), v) for k, v in headers_of(opts, u) if k.lower() != "host"]
    conn.send_headers(1, hs, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, headers, body, done = None, [], b"", False
    while not done:
        data = sock.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                headers = [[k, v] for k, v in ev.headers]
                status = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True
        sock.sendall(conn.data_to_send())
    return {"alpn": alpn, "status": status, "headers": headers, "body": body.decode(errors="replace")}

def ws(url, messages, opts):
    from websockets.sync.client import connect
    kwargs = {"open_timeout": opts["timeout"]}
    if url.startswith("wss:"):
        kwargs["ssl"] = context(opts["insecure"])
    replies = []
    with connect(url, **kwargs) as c:
        for m in messages:
            c.send(m)
            replies.append(c.recv(timeout=opts["timeout"]))
    return {"replies": replies}

def latency(url, count, opts):
    """Median and all samples of `count` GETs on one kept-alive connection (after 10 warm-ups)."""
    import http.client
    u, sock = open_socket(url, opts, ["http/1.1"])
    conn = http.client.HTTPConnection(u.hostname, timeout=opts["timeout"])
    conn.sock = sock
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    samples = []
    for i in range(10 + count):
        t = time.perf_counter()
        conn.request("GET", target, headers={"Host": u.netloc})
        conn.getresponse().read()
        if i >= 10:
            samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return {"median_ms": samples[len(samples) // 2], "samples": len(samples)}

def main():
    if sys.argv[1] == "multi":  # several commands, one interpreter start (Python starts slowly under TCG)
        import shlex
        for line in sys.argv[2:]:
            words = shlex.split(line)
            run(words[0], words[1:])
            sys.stdout.flush()
    else:
        run(sys.argv[1], sys.argv[2:])

def run(cmd, argv):
    opts, rest = options(argv)
    try:
        if cmd == "get":
            out(http1(rest[0], opts))
        elif cmd == "stream":
            out(http1(rest[0], opts, stream=True))
        elif cmd == "h2":
            out(h2get(rest[0], opts))
        elif cmd == "ws":
            out(ws(rest[0], rest[1:], opts))
        elif cmd == "latency":
            out(latency(rest[0], int(rest[1]), opts))
        elif cmd == "tcp":
            s = socket.create_connection((rest[0], int(rest[1])), timeout=opts["timeout"])
            s.sendall(rest[2].encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            out({"received": data.decode(errors="replace")})
        elif cmd == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sent = s.sendto(rest[2].encode(), (rest[0], int(rest[1])))
            s.settimeout(2)
            try:
                reply = s.recv(65536).decode(errors="replace")
            except OSError as exc:
                reply = None
            out({"sent": sent, "reply": reply})
        elif cmd == "dns":
            import dns.message, dns.query, dns.rcode, dns.rdatatype
            server = rest[1] if len(rest) > 1 else next(
                l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))
            q = dns.message.make_query(rest[0], rest[2] if len(rest) > 2 else "A")
            try:
                r = dns.query.udp(q, server, timeout=5)
            except Exception as exc:
                out({"error": f"{type(exc).__name__}: {exc}"})
                return
            answers = [rd.to_text() for rrset in r.answer for rd in rrset]
            out({"rcode": dns.rcode.to_text(r.rcode()), "answers": answers})
        else:
            out({"error": f"unknown command {cmd}"})
    except Exception as exc:
        out({"error": f"{type(exc).__name__}: {exc}"})

main()
'''
