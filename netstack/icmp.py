"""ICMP and ICMPv6: the messages kracauer answers or translates (RFC 792, RFC 4443, RFC 7915).

Path MTU discovery across the IPv4/IPv6 boundary needs the errors about a
connection's packets to reach the other side, translated like the packets
themselves: type and code mapped (RFC 7915 §4.2, §5.2), the MTU adjusted by
the 20 bytes of header difference, and the packet quoted inside translated too
(§4.5, §5.5) so that the receiving stack can match it to its socket.
"""

from __future__ import annotations

import struct

from netstack.checksum import finish, ones_sum
from netstack.ip import PROTO_ICMPV6, PacketError

ICMP_HEADER = struct.Struct("!BBH4s")
ICMP_HEADER_LEN = 8

# RFC 792
ICMP4_ECHO_REPLY = 0
ICMP4_UNREACHABLE = 3
ICMP4_ECHO_REQUEST = 8
ICMP4_TIME_EXCEEDED = 11
ICMP4_PARAMETER_PROBLEM = 12
ICMP4_FRAG_NEEDED = 4  # code of ICMP4_UNREACHABLE (RFC 1191)

# RFC 4443
ICMP6_UNREACHABLE = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
ICMP6_PARAMETER_PROBLEM = 4
ICMP6_ECHO_REQUEST = 128

IPV6_MIN_MTU = 1280
# RFC 4443 §2.4 (c): an ICMPv6 error must fit the minimum MTU.
ICMP6_ERROR_MAX = IPV6_MIN_MTU
# RFC 1812 §4.3.2.3: an ICMPv4 error quotes at most 576 bytes in all.
ICMP4_ERROR_MAX = 576

ICMP4_ERRORS = (ICMP4_UNREACHABLE, ICMP4_TIME_EXCEEDED, ICMP4_PARAMETER_PROBLEM)
ICMP6_ERRORS = (ICMP6_UNREACHABLE, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED, ICMP6_PARAMETER_PROBLEM)

# RFC 1191 §7: the plateau table, for routers that report no next-hop MTU.
PLATEAUS = (65535, 32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, 68)


class IcmpHeader:
    __slots__ = ("type", "code", "checksum", "rest")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) < ICMP_HEADER_LEN:
            raise PacketError("ICMP message shorter than its header")
        self.type, self.code, self.checksum, self.rest = ICMP_HEADER.unpack_from(data)


def icmp4_to_icmp6(type_: int, code: int, rest: bytes, quoted_len: int) -> tuple[int, int, bytes] | None:
    """RFC 7915 §4.2: the ICMPv6 type, code and rest-of-header for an ICMPv4 error; None to drop it.

    `quoted_len` is the total length the quoted IPv4 packet had (for MTU 0).
    """
    if type_ == ICMP4_TIME_EXCEEDED:
        return ICMP6_TIME_EXCEEDED, code, bytes(4)
    if type_ != ICMP4_UNREACHABLE:
        return None  # parameter problems need pointer mapping; kracauer drops them
    if code in (0, 1, 5, 6, 7, 8, 11, 12):
        return ICMP6_UNREACHABLE, 0, bytes(4)
    if code == 3:
        return ICMP6_UNREACHABLE, 4, bytes(4)
    if code in (9, 10, 13, 15):
        return ICMP6_UNREACHABLE, 1, bytes(4)
    if code == ICMP4_FRAG_NEEDED:
        mtu = struct.unpack("!H", rest[2:4])[0]
        if mtu == 0:
            # RFC 1191 §5: an old router; guess the next plateau below the packet.
            mtu = next((p for p in PLATEAUS if p < quoted_len), 68)
        # §4.2: adjusted for the 20 bytes IPv6 adds, and never below IPv6's minimum.
        return ICMP6_PACKET_TOO_BIG, 0, struct.pack("!I", max(mtu + 20, IPV6_MIN_MTU))
    return None


def icmp6_to_icmp4(type_: int, code: int, rest: bytes) -> tuple[int, int, bytes] | None:
    """RFC 7915 §5.2: the ICMPv4 type, code and rest-of-header for an ICMPv6 error; None to drop it."""
    if type_ == ICMP6_PACKET_TOO_BIG:
        mtu = struct.unpack("!I", rest)[0]
        # §5.2: the IPv4 packet is 20 bytes shorter; the field holds 16 bits.
        return ICMP4_UNREACHABLE, ICMP4_FRAG_NEEDED, struct.pack("!HH", 0, max(min(mtu - 20, 0xFFFF), 68))
    if type_ == ICMP6_TIME_EXCEEDED:
        return ICMP4_TIME_EXCEEDED, code, bytes(4)
    if type_ == ICMP6_UNREACHABLE:
        mapped = {0: 1, 1: 10, 2: 1, 3: 1, 4: 3}.get(code)
        return (ICMP4_UNREACHABLE, mapped, bytes(4)) if mapped is not None else None
    if type_ == ICMP6_PARAMETER_PROBLEM and code == 1:
        return ICMP4_UNREACHABLE, 2, bytes(4)  # unrecognized next header: protocol unreachable
    return None


def build_icmp4(type_: int, code: int, rest: bytes, body: bytes | bytearray | memoryview) -> bytearray:
    """An ICMPv4 message with its checksum (RFC 792: over the message alone)."""
    message = bytearray(ICMP_HEADER.pack(type_, code, 0, rest))
    message += body
    message[2:4] = finish(ones_sum(message)).to_bytes(2, "big")
    return message


def build_icmp6(src: bytes, dst: bytes, type_: int, code: int, rest: bytes,
                body: bytes | bytearray | memoryview) -> bytearray:
    """An ICMPv6 message with its checksum over the pseudo-header (RFC 4443 §2.3)."""
    message = bytearray(ICMP_HEADER.pack(type_, code, 0, rest))
    message += body
    total = ones_sum(src + dst) + len(message) + PROTO_ICMPV6 + ones_sum(message)
    message[2:4] = finish(total).to_bytes(2, "big")
    return message
