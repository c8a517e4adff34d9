#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) to run matchlock from this checkout:
# host packages, the virtualenv at .venv, then `matchlock setup`, which builds
# and caches the guest kernel, the guest runtime disk and the built-in image
# under ~/.cache/matchlock (later runs reuse them).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  python3 python3-venv
  qemu-system-x86 util-linux e2fsprogs erofs-utils busybox-static nftables iproute2
  linux-source-6.1 bc bison flex libelf-dev libssl-dev make gcc libc6-dev binutils cpio kmod xz-utils zstd
  # registry tests and benchmarks: a real registry on loopback, a pusher, htpasswd, curl as the baseline
  docker-registry skopeo apache2-utils curl ca-certificates
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  # apt-get download (guest runtime, built-in image) needs package lists.
  [ -n "$(ls -A /var/lib/apt/lists/ 2>/dev/null | grep -v lock)" ] || apt-get update -q
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/matchlock setup
