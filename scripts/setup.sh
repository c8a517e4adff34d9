#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) to run matchlock from this checkout:
# host packages, the virtualenv at .venv, then `matchlock setup`, which caches
# the guest runtime disk, the built-in image and a guest kernel under
# ~/.cache/matchlock (later runs reuse them).
#
#   ./scripts/setup.sh          what running sandboxes needs (about a minute): the first
#                               sandbox boots Debian's cloud kernel while the tuned kernel
#                               builds in the background (it installs its own build packages)
#   ./scripts/setup.sh --test   also the test tools and the test extras, and builds the tuned
#                               kernel before it returns, so the suite always runs on it
set -euo pipefail
cd "$(dirname "$0")/.."

test_mode=0
case "${1:-}" in
  "") ;;
  --test) test_mode=1 ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

packages=(
  python3 python3-venv
  qemu-system-x86 util-linux e2fsprogs erofs-utils busybox-static nftables iproute2
  binutils kmod xz-utils zstd # readelf (guest runtime), depmod (fallback kernel), module formats
  fakeroot # image disks with exact owners when an ordinary user builds them
)
if ((test_mode)); then
  packages+=(
    # the tuned kernel's build (kernel/build.py BUILD_PACKAGES and BUILD_TOOLS), in the same apt run
    linux-source-6.1 bc bison flex libelf-dev libssl-dev make gcc libc6-dev
    # registry tests and benchmarks: a real registry on loopback, a pusher, htpasswd, curl as the baseline
    docker-registry skopeo apache2-utils curl ca-certificates
    cpio # the fallback initramfs is checked against GNU cpio (tests/unit/test_kernel_initramfs.py)
  )
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -q
  # the lock timeout: a background kernel build (see below) may be installing its packages
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 \
    "${missing[@]}"
else
  # apt-get download (guest runtime, built-in image, fallback kernel) needs package lists.
  [ -n "$(ls -A /var/lib/apt/lists/ 2>/dev/null | grep -v lock)" ] || apt-get update -q
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ((test_mode)); then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  .venv/bin/matchlock setup --tuned now
else
  .venv/bin/pip install -q --disable-pip-version-check -e .
  .venv/bin/matchlock setup
fi
