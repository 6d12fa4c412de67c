"""IPv4 addresses embedded in IPv6 addresses, RFC 6052 section 2.2, /96 only.

kracauer gives each IPv4 client an IPv6 source address made of the configured
/96 prefix and the client's four address bytes::

    prefix 64:ff9b:1::/96 + client 203.0.113.7  ->  64:ff9b:1::cb00:7107

With a /96 prefix the IPv4 address sits in bits 96..127, so there is no "u"
octet (bits 64..71) to skip and the suffix is empty (RFC 6052 section 2.2,
last row of Figure 1). The reverse is simply the low 32 bits.

``embed``/``extract`` work on raw bytes for the packet path (no objects, one
concatenation or slice); ``embed_address``/``extract_address`` take and return
``ipaddress`` objects for configuration, logs and the CLI.
"""

from __future__ import annotations

import ipaddress

__all__ = ["PREFIX_LENGTH", "embed", "extract", "embed_address", "extract_address"]

#: The only prefix length kracauer supports (RFC 6052 section 2.2).
PREFIX_LENGTH = 96


def embed(prefix: bytes, ipv4: bytes) -> bytes:
    """Return the 16-byte IPv6 address ``prefix[0:12] + ipv4[0:4]``.

    ``prefix`` is the 12 bytes of the /96 prefix, ``ipv4`` the 4 bytes of the
    IPv4 address (bytes, bytearray or memoryview). Raises ValueError on other
    lengths.
    """
    if len(prefix) != 12:
        raise ValueError(f"a /96 prefix is 12 bytes, got {len(prefix)}")
    if len(ipv4) != 4:
        raise ValueError(f"an IPv4 address is 4 bytes, got {len(ipv4)}")
    return bytes(prefix) + bytes(ipv4)


def extract(ipv6: bytes) -> bytes:
    """Return the IPv4 address embedded in the low 32 bits of a 16-byte IPv6 address."""
    if len(ipv6) != 16:
        raise ValueError(f"an IPv6 address is 16 bytes, got {len(ipv6)}")
    return bytes(ipv6[12:16])


def embed_address(prefix: ipaddress.IPv6Network, v4: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """Return the address of ``v4`` inside the /96 network ``prefix``."""
    if not isinstance(prefix, ipaddress.IPv6Network):
        raise TypeError(f"prefix must be an IPv6Network, got {type(prefix).__name__}")
    if not isinstance(v4, ipaddress.IPv4Address):
        raise TypeError(f"v4 must be an IPv4Address, got {type(v4).__name__}")
    if prefix.prefixlen != PREFIX_LENGTH:
        raise ValueError(f"the prefix must be a /96, got /{prefix.prefixlen}")
    return ipaddress.IPv6Address(int(prefix.network_address) | int(v4))


def extract_address(v6: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    """Return the IPv4 address in the low 32 bits of ``v6`` (whatever its prefix)."""
    if not isinstance(v6, ipaddress.IPv6Address):
        raise TypeError(f"v6 must be an IPv6Address, got {type(v6).__name__}")
    return ipaddress.IPv4Address(int(v6) & 0xFFFFFFFF)
