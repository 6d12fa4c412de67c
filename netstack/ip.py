"""IPv4 and IPv6 headers: the fields kracauer reads, and builders for the ones it writes.

Parsing honours IHL (RFC 791 §3.1) and the payload length; nothing assumes a
fixed IPv4 header length. Addresses stay as raw bytes (4 or 16): they are dict
keys and are copied into headers, never formatted on the hot path.
"""

from __future__ import annotations

import struct

from netstack.checksum import checksum

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_ICMPV6 = 58

IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV6_HEADER = struct.Struct("!IHBB16s16s")
IPV4_CHECKSUM = struct.Struct("!H")
IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40

# RFC 791 §3.1: flags and fragment offset share one 16-bit field.
IPV4_DF = 0x4000
IPV4_MF = 0x2000
IPV4_OFFSET_MASK = 0x1FFF

# RFC 7915 §5.1: an IPv4 packet translated from IPv6 carries DF only when it
# is larger than 1260 bytes (1280, the IPv6 minimum MTU, less the 20 bytes of
# header the translation saves); smaller ones may be fragmented on the way.
DF_THRESHOLD = 1260


class PacketError(ValueError):
    """A header is malformed (too short, wrong version, inconsistent lengths)."""


class IPv4Header:
    """The IPv4 header fields kracauer needs (RFC 791 §3.1)."""

    __slots__ = ("header_len", "tos", "total_len", "ident", "flags_offset", "ttl", "proto", "src", "dst")

    def __init__(self, packet: bytes | bytearray | memoryview) -> None:
        if len(packet) < IPV4_HEADER_LEN:
            raise PacketError("IPv4 packet shorter than its header")
        (ver_ihl, self.tos, self.total_len, self.ident, self.flags_offset, self.ttl, self.proto, _csum,
         self.src, self.dst) = IPV4_HEADER.unpack_from(packet)
        if ver_ihl >> 4 != 4:
            raise PacketError("not an IPv4 packet")
        self.header_len = (ver_ihl & 0x0F) * 4
        if self.header_len < IPV4_HEADER_LEN or self.total_len < self.header_len or self.total_len > len(packet):
            raise PacketError("IPv4 header and total length are inconsistent")

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_offset & (IPV4_MF | IPV4_OFFSET_MASK))


class IPv6Header:
    """The IPv6 header fields kracauer needs (RFC 8200 §3)."""

    __slots__ = ("traffic_class", "flow_label", "payload_len", "next_header", "hop_limit", "src", "dst")

    def __init__(self, packet: bytes | bytearray | memoryview) -> None:
        if len(packet) < IPV6_HEADER_LEN:
            raise PacketError("IPv6 packet shorter than its header")
        first, self.payload_len, self.next_header, self.hop_limit, self.src, self.dst = IPV6_HEADER.unpack_from(packet)
        if first >> 28 != 6:
            raise PacketError("not an IPv6 packet")
        self.traffic_class = (first >> 20) & 0xFF
        self.flow_label = first & 0xFFFFF
        if IPV6_HEADER_LEN + self.payload_len > len(packet):
            raise PacketError("IPv6 payload length exceeds the packet")


def build_ipv4_header(
    src: bytes, dst: bytes, proto: int, payload_len: int, ttl: int = 64, tos: int = 0, ident: int = 0
) -> bytearray:
    """A 20-byte IPv4 header with its checksum; DF as RFC 7915 §5.1 sets it."""
    total = IPV4_HEADER_LEN + payload_len
    flags = IPV4_DF if total > DF_THRESHOLD else 0
    header = bytearray(IPV4_HEADER.pack(0x45, tos, total, ident, flags, ttl, proto, 0, src, dst))
    header[10:12] = checksum(header).to_bytes(2, "big")
    return header


def write_ipv4_header(
    buf: bytearray, at: int, src: bytes, dst: bytes, proto: int, payload_len: int, ttl: int, tos: int, ident: int
) -> None:
    """Write a 20-byte IPv4 header with its checksum into `buf` at `at` (in-place translation)."""
    total = IPV4_HEADER_LEN + payload_len
    flags = IPV4_DF if total > DF_THRESHOLD else 0
    IPV4_HEADER.pack_into(buf, at, 0x45, tos, total, ident, flags, ttl, proto, 0, src, dst)
    IPV4_CHECKSUM.pack_into(buf, at + 10, checksum(memoryview(buf)[at:at + IPV4_HEADER_LEN]))


def build_ipv6_header(
    src: bytes, dst: bytes, next_header: int, payload_len: int, hop_limit: int = 64, traffic_class: int = 0
) -> bytes:
    """A 40-byte IPv6 header (RFC 8200 §3); the flow label is left 0 (RFC 7915 §4.1)."""
    return IPV6_HEADER.pack(0x60000000 | (traffic_class << 20), payload_len, next_header, hop_limit, src, dst)
