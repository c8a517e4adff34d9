"""The boot-time contract between the host and guest init, in one place.

Both sides import these names; neither defines its own copy. Changing a
value here changes the contract for both at once, and the guest runtime disk
(which carries `matchlock.wire`) is rebuilt because its key covers this code.
"""

from __future__ import annotations

# The virtio-serial port that carries the agent multiplexer. The guest finds
# it by this name in /sys/class/virtio-ports/*/name.
AGENT_PORT_NAME = "matchlock.agent"

# Disk serials (virtio-blk `serial=`), looked up by the guest in
# /sys/block/*/serial: the read-only guest runtime (the kernel's root), the
# image's read-only lower layer and the sandbox's writable upper layer.
RUNTIME_DISK_SERIAL = "runtime"
LOWER_DISK_SERIAL = "lower"
UPPER_DISK_SERIAL = "upper"
# Extra disks (volumes, raw images) are `disk0`, `disk1`, ... in the order given; the guest mounts
# each where the host's HELLO says. The count is capped on both sides (see api/disks.py for why 8).
EXTRA_DISK_SERIAL_PREFIX = "disk"
MAX_EXTRA_DISKS = 8

# Boot templates: the kernel argument that makes init stop after the runtime
# is up, the byte it writes on the agent port when it is ready to be
# snapshotted, and how many random bytes the host sends to wake a restored
# guest (they reseed its RNG).
TEMPLATE_FLAG = "matchlock.template=1"
# With it, init also assembles the image's root before the snapshot: a template per image, whose
# clones start from a copy of the template's upper disk (vm/snapshot.py).
TEMPLATE_ROOTED_FLAG = "matchlock.rooted=1"
TEMPLATE_READY = b"T"
WAKE_SIZE = 64

# Where guest init installs the sandbox CA; the host points the usual
# environment variables at it.
CA_PATH = "/etc/ssl/certs/matchlock-ca.crt"
# Where it goes instead when a VFS mount covers CA_PATH (guest/etcfiles.py): the first one outside them.
CA_FALLBACK_PATHS = ("/etc/matchlock-ca.crt", "/matchlock-ca.crt")

# PATH for init and for every command, before image and user environment.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The virtio-serial port of the VFS channel (wire/vfs.py), present only when the sandbox has mounts.
# The guest's FUSE daemon finds it by name, as the agent finds its port.
VFS_PORT_NAME = "matchlock.vfs"

# The network every sandbox with one gets (net/namespace.py builds the host side from the same values,
# and the MTU is the default unless the policy sets another). A boot template configures it before its
# snapshot, so a restored guest configures its interface only when the host asks for something else.
GUEST_INTERFACE = "eth0"
GUEST_ADDRESS = "10.200.0.2"
GUEST_PREFIX_LENGTH = 24
GUEST_GATEWAY = "10.200.0.1"
GUEST_MTU = 1500

# A key of the host's HELLO (under MATCHLOCK_DEBUG_TIMING): the guest then sends its own timeline, a list
# of [label, uptime ms] under `stamps`, in `ready` and in the first exit status (guest/timing.py).
DEBUG_TIMING_FLAG = "debug_timing"
