"""matchlock: run untrusted code in disposable micro-VMs with host-controlled egress."""

__version__ = "0.1.0"
