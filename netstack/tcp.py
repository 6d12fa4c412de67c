"""TCP headers: parsing, option handling and building (RFC 9293 §3.1, RFC 7323, RFC 2018).

A segment is parsed into a `TcpHeader` (fixed fields plus the offsets of the
options that translation rewrites), and rewritten in a small mutable copy of
its header: the payload is never touched, so the checksum is updated
incrementally over the header alone (RFC 1624).
"""

from __future__ import annotations

import struct

from netstack.checksum import finish, ones_sum
from netstack.ip import PROTO_TCP, PacketError

TCP_HEADER = struct.Struct("!HHIIBBHHH")
TCP_HEADER_LEN = 20
U32 = struct.Struct("!I")
U16 = struct.Struct("!H")

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

# RFC 9293 §3.1 option kinds, RFC 7323 §2.2/§3.2, RFC 2018 §2/§3.
OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

# RFC 9293 §3.7.1: without an MSS option the peer may only be sent 536 bytes.
DEFAULT_MSS = 536
# RFC 7323 §2.3: shift counts above 14 are treated as 14.
MAX_WSCALE = 14

MOD32 = 0xFFFFFFFF


def seq_lt(a: int, b: int) -> bool:
    """a < b in 32-bit sequence space (RFC 9293 §3.4, RFC 1982)."""
    return 0 < ((b - a) & MOD32) < 0x80000000


def seq_le(a: int, b: int) -> bool:
    return a == b or seq_lt(a, b)


class TcpHeader:
    """Fixed fields of a TCP header and where its interesting options sit.

    Option offsets are relative to the start of the TCP header; -1 means absent.
    """

    __slots__ = (
        "sport", "dport", "seq", "ack", "header_len", "flags", "window", "checksum",
        "mss", "wscale", "sack_permitted", "ts_at", "sack_at", "sack_blocks",
    )

    def __init__(self, segment: bytes | bytearray | memoryview) -> None:
        if len(segment) < TCP_HEADER_LEN:
            raise PacketError("TCP segment shorter than its header")
        (self.sport, self.dport, self.seq, self.ack, offset, self.flags, self.window, self.checksum,
         _urg) = TCP_HEADER.unpack_from(segment)
        # RFC 9293 §3.1: Data Offset counts 32-bit words and is at least 5.
        self.header_len = (offset >> 4) * 4
        if self.header_len < TCP_HEADER_LEN or self.header_len > len(segment):
            raise PacketError("TCP data offset is out of range")
        self.mss = None
        self.wscale = None
        self.sack_permitted = False
        self.ts_at = -1
        self.sack_at = -1
        self.sack_blocks = 0
        if self.header_len > TCP_HEADER_LEN:
            self._parse_options(segment)

    def _parse_options(self, segment: bytes | bytearray | memoryview) -> None:
        end = self.header_len
        # Fast path: Linux's data segments carry exactly NOP NOP TS (RFC 7323 App. A).
        if end == 32 and segment[20] == OPT_NOP and segment[21] == OPT_NOP and segment[22] == OPT_TIMESTAMP \
                and segment[23] == 10:
            self.ts_at = 24
            return
        at = TCP_HEADER_LEN
        while at < end:
            kind = segment[at]
            if kind == OPT_END:
                return
            if kind == OPT_NOP:
                at += 1
                continue
            if at + 1 >= end:
                raise PacketError("TCP option runs past the header")
            length = segment[at + 1]
            if length < 2 or at + length > end:
                raise PacketError("TCP option has a bad length")
            if kind == OPT_MSS and length == 4:
                self.mss = U16.unpack_from(segment, at + 2)[0]
            elif kind == OPT_WSCALE and length == 3:
                self.wscale = min(segment[at + 2], MAX_WSCALE)
            elif kind == OPT_SACK_PERMITTED and length == 2:
                self.sack_permitted = True
            elif kind == OPT_TIMESTAMP and length == 10:
                self.ts_at = at + 2
            elif kind == OPT_SACK and (length - 2) % 8 == 0:
                self.sack_at = at + 2
                self.sack_blocks = (length - 2) // 8
            at += length

    def timestamps(self, segment: bytes | bytearray | memoryview) -> tuple[int, int] | None:
        """(TSval, TSecr) of RFC 7323 §3.2, or None when the option is absent."""
        if self.ts_at < 0:
            return None
        return U32.unpack_from(segment, self.ts_at)[0], U32.unpack_from(segment, self.ts_at + 4)[0]


def add_u32(header: bytearray, at: int, delta: int) -> None:
    """Add `delta` modulo 2**32 to the big-endian word at `at` (sequence arithmetic)."""
    U32.pack_into(header, at, (U32.unpack_from(header, at)[0] + delta) & MOD32)


def shift_sack_blocks(buf: bytearray, start: int, tcp: TcpHeader, delta: int) -> None:
    """Move every SACK block edge by `delta` (RFC 2018 §3: edges are sequence numbers).

    `start` is where the TCP header begins in `buf`.
    """
    at = start + tcp.sack_at
    for _ in range(tcp.sack_blocks * 2):
        add_u32(buf, at, delta)
        at += 4


def syn_options(mss: int, wscale: int | None, sack_permitted: bool, timestamps: tuple[int, int] | None) -> bytes:
    """Options for a SYN or SYN-ACK, laid out as Linux does (RFC 9293 §3.1 padding to 32 bits)."""
    out = bytearray(struct.pack("!BBH", OPT_MSS, 4, mss))
    if timestamps is not None:
        if sack_permitted:
            out += bytes((OPT_SACK_PERMITTED, 2))
        else:
            out += bytes((OPT_NOP, OPT_NOP))
        out += struct.pack("!BBII", OPT_TIMESTAMP, 10, *timestamps)
    elif sack_permitted:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))
    if wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    return bytes(out)


def timestamp_option(tsval: int, tsecr: int) -> bytes:
    """NOP NOP TS, the 12-byte layout of RFC 7323 Appendix A."""
    return struct.pack("!BBBBII", OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, tsval & MOD32, tsecr & MOD32)


def build_segment(
    sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
    options: bytes = b"", payload: bytes | bytearray | memoryview = b"",
) -> bytearray:
    """A TCP segment with a zero checksum; `options` must be padded to 32 bits."""
    if len(options) % 4:
        raise ValueError("TCP options must be padded to a multiple of 4 bytes")
    header_len = TCP_HEADER_LEN + len(options)
    segment = bytearray(TCP_HEADER.pack(sport, dport, seq & MOD32, ack & MOD32, (header_len // 4) << 4, flags,
                                        window, 0, 0))
    segment += options
    segment += payload
    return segment


def set_checksum(segment: bytearray, src: bytes, dst: bytes) -> bytearray:
    """Fill in the checksum over the pseudo-header (RFC 9293 §3.1; RFC 8200 §8.1 for IPv6).

    Both pseudo-headers add up to the same words but the addresses: the
    protocol and the TCP length appear once each, whatever their layout.
    """
    segment[16:18] = b"\0\0"
    total = ones_sum(src + dst) + PROTO_TCP + len(segment) + ones_sum(segment)
    segment[16:18] = finish(total).to_bytes(2, "big")
    return segment
