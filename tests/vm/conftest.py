"""Fixtures of the network tests (the stand-in internet and its tools live in netfixtures.py)."""

from netfixtures import client_image, inet, net_cli, net_detached, net_loop  # noqa: F401
