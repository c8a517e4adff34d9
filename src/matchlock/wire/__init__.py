"""Sans-IO codecs shared by host and guest (stdlib only: this package runs in the guest)."""
