"""Whether a host is this machine's loopback: where a secret may go in the clear."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """`host` (a name or an IP address, without brackets or port) is localhost or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
