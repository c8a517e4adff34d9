"""Pull throughput against curl, and pulled layers -> runtime disk, in one run.

A docker-registry is started on localhost with a ~100 MB image (4 gzip
layers, half incompressible data, half text-like files), then:
- baseline: `curl` fetches the same layer blobs (one process, keep-alive, to files);
- measured: the download stage of `matchlock pull` (manifest, config, the
  layer blobs concurrently with digest verification and fsync) into an empty store;
  target: >= 0.8x curl's throughput;
- measured: pulled layers -> ready runtime disk (decompress, verify diff_ids,
  squash, mkfs.erofs): a pull into a store that already holds the layer blobs,
  in MB/s of uncompressed image;
- context: a cold end-to-end `matchlock pull` through the CLI.
Everything stays on loopback and stops by itself.

Usage: .venv/bin/python benchmarks/bench_pull.py [--runs N] [--mb SIZE]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from matchlock.image.archive import host_arch
from matchlock.image.progress import PullProgress
from matchlock.image.pull import MAX_PARALLEL_LAYERS, Platform, _Puller, pull
from matchlock.image.reference import parse
from matchlock.image.registry import RegistryClient
from matchlock.image.store import ImageStore, LayerRecord
from registry_support import Registry, push_image
from support.images import make_image
from support.tarballs import tar_layer

MB = 1024 * 1024
MATCHLOCK = str(Path(sys.executable).parent / "matchlock")


def build_layers(total_mb: int) -> list[bytes]:
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz ") for _ in range(8)) for _ in range(4096)]
    layers = []
    per_layer = total_mb * MB // 4
    for index in range(4):
        files: dict[str, bytes] = {}
        size = 0
        while size < per_layer:
            name = f"layer{index}/f{len(files):05d}"
            if len(files) % 2:
                data = os.urandom(256 * 1024)  # binaries and compressed assets
            else:
                data = b"\n".join(rng.choice(words) for _ in range(28_000))  # text, configs, sources
            files[name] = data
            size += len(data)
        layers.append(tar_layer(files, dirs=(f"layer{index}",)))
    return layers


def curl_fetch(registry: Registry, repo: str, digests: list[str], out: Path) -> float:
    argv = ["curl", "-sSf", "--noproxy", "*"]
    for i, digest in enumerate(digests):
        argv += ["-o", str(out / f"blob{i}"), f"{registry.url}/v2/{repo}/blobs/{digest}"]
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


def matchlock_download(ref: str, records: list[LayerRecord], root: Path) -> float:
    """The download stage of a pull, through the same code path `pull` uses."""
    store = ImageStore(root)
    started = time.perf_counter()
    with RegistryClient(parse(ref)) as client, store.pulling() as work:
        puller = _Puller(parse(ref), store, client, PullProgress(), work)
        manifest, _, _ = puller.manifest(Platform.host())
        puller.config(manifest, Platform.host(), False)
        with ThreadPoolExecutor(max_workers=MAX_PARALLEL_LAYERS) as pool:
            list(pool.map(puller.fetch, records))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    runs = max(1, min(args.runs, 10))
    with tempfile.TemporaryDirectory(prefix="bench-pull-", dir="/var/tmp") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MATCHLOCK_CACHE_DIR"] = str(tmp / "cache")
        registry = Registry(tmp / "registry", host="localhost").start()
        try:
            print(f"building a {args.mb} MB image...", file=sys.stderr)
            layers = build_layers(args.mb)
            image = make_image(layers, arch=host_arch(), kind="gzip")
            push_image(registry, "bench/app", "v1", image)
            ref = f"{registry.address}/bench/app:v1"
            sizes = {d: len(image.blobs[d]) for d in image.layer_digests}
            compressed = sum(sizes.values())
            uncompressed = sum(len(layer) for layer in layers)
            records = [
                LayerRecord(d, "application/vnd.oci.image.layer.v1.tar+gzip", sizes[d], "") for d in image.layer_digests
            ]
            print(
                f"image: {uncompressed / MB:.1f} MB uncompressed, {compressed / MB:.1f} MB in {len(layers)} gzip layers"
            )

            curl_times, ours = [], []
            for run in range(runs):
                out = tmp / f"curl-{run}"
                out.mkdir()
                curl_times.append(curl_fetch(registry, "bench/app", image.layer_digests, out))
                shutil.rmtree(out)
                ours.append(matchlock_download(ref, records, tmp / f"store-{run}"))
                if run:
                    shutil.rmtree(tmp / f"store-{run}")
            curl_rate = compressed / MB / statistics.median(curl_times)
            our_rate = compressed / MB / statistics.median(ours)
            print(f"curl download:      {curl_rate:8.1f} MB/s (median of {runs})")
            print(f"matchlock download: {our_rate:8.1f} MB/s (median of {runs}; verify + fsync included)")
            print(f"ratio: {our_rate / curl_rate:.2f}x curl (target >= 0.80)")

            disk_times = []
            for run in range(runs):
                root = tmp / f"disk-{run}"
                shutil.copytree(tmp / "store-0" / "layers", root / "layers", copy_function=os.link)
                started = time.perf_counter()
                info, cached = pull(ref, store=ImageStore(root))
                disk_times.append(time.perf_counter() - started)
                assert not cached and info.lower_path.is_file()
                shutil.rmtree(root)
            disk = statistics.median(disk_times)
            print(f"layers -> runtime disk: {disk:.2f} s for {uncompressed / MB:.0f} MB = {uncompressed / MB / disk:.1f} MB/s "
                  f"(median of {runs}; gunzip + diff_id check + squash + mkfs.erofs)")  # fmt: skip

            started = time.perf_counter()
            result = subprocess.run([MATCHLOCK, "pull", ref], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
            print(f"cold `matchlock pull` end to end: {time.perf_counter() - started:.2f} s")
        finally:
            registry.stop()


if __name__ == "__main__":
    main()
