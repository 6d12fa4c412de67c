"""One direction of an established connection: the flow record and its rewrite.

Once the hello is replayed and acknowledged, translating a connection's plain
ACK and data segments needs nothing but a few numbers per direction: the new
addresses and ports, what to add to the sequence and acknowledgment numbers
(DESIGN.md step 4's delta), to TSval and TSecr (the timestamp offset), and how
to rescale the window. A ``Flow`` holds them. The same record is

- what the tracker's Python path rewrites packets with (``to_host``,
  ``to_client`` below), and
- packed into the kernel's flow map (``FLOW_KEY``/``FLOW_VALUE`` mirror
  ``kracauer/bpf/flow.h`` byte for byte), where the BPF program in
  ``kracauer/bpf/xlat.bpf.c`` does the same rewrite on whichever core the
  packet arrives. Tests run both on the same packets and compare the bytes.

The tracker keeps the state machine (handshake, RFC 5961 checks, FIN, RST);
this module only rewrites. ``FlowTable`` is how the tracker reaches the
kernel's map without doing I/O itself: the daemon passes one in, as it passes
the clock and the random source.
"""

from __future__ import annotations

import struct
from typing import Protocol

from netstack.checksum import ones_sum, update, update_partial
from netstack.ip import IPV4_HEADER_LEN, IPV6_HEADER, IPV6_HEADER_LEN, PROTO_TCP, IPv4Header, IPv6Header, write_ipv4_header
from netstack.tcp import ACK, MOD32, U16, U32, TcpHeader, shift_sack_blocks

# struct flow_key (flow.h): the family, the transport (L4_*) and the 4-tuple as
# the packet carries it; IPv4 addresses take the first 4 of 16 bytes. Ports
# stay in network order.
FLOW_KEY = struct.Struct("=BB2x16s16s2s2s")
# flow_key.l4: TCP is 0 (the byte was padding before UDP flows went in the map).
L4_TCP = 0
L4_UDP = 17
# struct flow_value (flow.h), field by field with their offsets.
FLOW_VALUE = struct.Struct(
    "="
    "16s"  # 0 src
    "16s"  # 16 dst
    "2s"   # 32 sport (network order)
    "2s"   # 34 dport
    "I"    # 36 seq_add
    "I"    # 40 ack_add
    "I"    # 44 tsval_add
    "I"    # 48 tsecr_add
    "b"    # 52 wscale_shift
    "B"    # 53 family
    "H"    # 54 mss
    "I"    # 56 flags
    "I"    # 60 seq_base
    "Q"    # 64 start_ns
    "I"    # 72 ack_max
    "I"    # 76 seq_next
    "H"    # 80 window
    "H"    # 82 window_max
    "4x"   # 84 pad
    "Q"    # 88 packets
    "Q"    # 96 bytes
    "Q"    # 104 last_seen
)
FLOW_VALUE_FIELDS = (
    "src", "dst", "sport", "dport", "seq_add", "ack_add", "tsval_add", "tsecr_add", "wscale_shift", "family",
    "mss", "flags", "seq_base", "start_ns", "ack_max", "seq_next", "window", "window_max", "packets", "bytes",
    "last_seen",
)

# flow_value.flags
F_WSCALE_MASK = 0x0F  # the sender's own window scale; 15 for none
F_TIMESTAMPS = 0x10
F_SACK = 0x20
NO_WSCALE = 15

LAST_SEEN = struct.Struct("=Q")
LAST_SEEN_OFFSET = 104

# struct xlat_config and the stats indexes (enum xlat_stat), in flow.h's order.
XLAT_CONFIG = struct.Struct("=IIII")
XLAT_ENABLED = 0x01
STATS = (
    "to_host_packets", "to_host_bytes", "to_client_packets", "to_client_bytes",
    "pass_disabled", "pass_not_tcp", "pass_ip_options", "pass_fragment", "pass_length", "pass_ttl",
    "pass_flags", "pass_tcp_options", "pass_no_flow", "pass_gso", "pass_error", "drop_error",
    "pass_udp_checksum",
)

# SYN cookies answered by the program (flow.h's cookie_config, listener_key,
# listener_value and syn_stats; netstack/syncookie.py makes the same cookies).
COOKIE_CONFIG = struct.Struct("=QQQHHBBH")  # k0, k1, clock_ns, mss, window, wscale, flags, pad
COOKIE_ENABLED = 0x01
LISTENER_KEY = struct.Struct("=4s2s2x")  # service address, port (network order)
LISTENER_VALUE = struct.Struct("=II")  # python_syn_rate, pad
SYN_STATS = struct.Struct("=QQQQ")  # cookies, passed, second, used
LISTENERS_MAX = 1024


def listener_key(address: bytes, port: int) -> bytes:
    """The listeners map key (struct listener_key) of a service address and port."""
    return LISTENER_KEY.pack(address, U16.pack(port))


class Flow:
    """How one direction of a connection is rewritten, and what was seen of it.

    Integers are plain Python ints in the ranges of the C fields; ``sport``
    and ``dport`` are ints here and network-order bytes in the map.
    """

    __slots__ = FLOW_VALUE_FIELDS

    def __init__(self, *, src: bytes, dst: bytes, sport: int, dport: int, seq_add: int = 0, ack_add: int = 0,
                 tsval_add: int = 0, tsecr_add: int = 0, wscale_shift: int = 0, mss: int = 1460, flags: int = 0,
                 seq_base: int = 0, start_ns: int = 0, ack_max: int = 0, seq_next: int = 0, window: int = 0,
                 window_max: int = 0, packets: int = 0, bytes: int = 0, last_seen: int = 0) -> None:
        self.src = src
        self.dst = dst
        self.family = 4 if len(dst) == 4 else 6
        self.sport = sport
        self.dport = dport
        self.seq_add = seq_add & MOD32
        self.ack_add = ack_add & MOD32
        self.tsval_add = tsval_add & MOD32
        self.tsecr_add = tsecr_add & MOD32
        self.wscale_shift = wscale_shift
        self.mss = mss
        self.flags = flags
        self.seq_base = seq_base & MOD32
        self.start_ns = start_ns
        self.ack_max = ack_max & MOD32
        self.seq_next = seq_next & MOD32
        self.window = window
        self.window_max = window_max
        self.packets = packets
        self.bytes = bytes
        self.last_seen = last_seen

    def pack(self) -> bytes:
        """The map value (struct flow_value)."""
        return FLOW_VALUE.pack(
            self.src.ljust(16, b"\0"), self.dst.ljust(16, b"\0"), U16.pack(self.sport), U16.pack(self.dport),
            self.seq_add, self.ack_add, self.tsval_add, self.tsecr_add, self.wscale_shift, self.family, self.mss,
            self.flags, self.seq_base, self.start_ns, self.ack_max, self.seq_next, self.window, self.window_max,
            self.packets, self.bytes, self.last_seen,
        )

    @classmethod
    def unpack(cls, value: bytes) -> "Flow":
        fields = dict(zip(FLOW_VALUE_FIELDS, FLOW_VALUE.unpack(value)))
        family = fields.pop("family")
        size = 4 if family == 4 else 16
        fields["src"] = fields["src"][:size]
        fields["dst"] = fields["dst"][:size]
        fields["sport"] = U16.unpack(fields["sport"])[0]
        fields["dport"] = U16.unpack(fields["dport"])[0]
        return cls(**fields)

    def __repr__(self) -> str:
        return "Flow(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in FLOW_VALUE_FIELDS) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flow) and all(getattr(self, n) == getattr(other, n) for n in FLOW_VALUE_FIELDS)


def flow_key(src: bytes, dst: bytes, ports: bytes, l4: int = L4_TCP) -> bytes:
    """The map key (struct flow_key) for a packet from `src` to `dst` with these 4 bytes of ports
    (TCP's, or UDP's with ``l4=L4_UDP``)."""
    return FLOW_KEY.pack(4 if len(src) == 4 else 6, l4, src, dst, ports[:2], ports[2:4])


def split_key(key: bytes) -> tuple[bytes, bytes, int, int]:
    """(src, dst, sport, dport) of a map key."""
    family, _, src, dst, sport, dport = FLOW_KEY.unpack(key)
    size = 4 if family == 4 else 16
    return src[:size], dst[:size], U16.unpack(sport)[0], U16.unpack(dport)[0]


def key_l4(key: bytes) -> int:
    """The transport of a map key: L4_TCP or L4_UDP."""
    return key[1]


class FlowTable(Protocol):
    """The kernel's flow map as the tracker sees it (the daemon's BPF map, or a dict in tests)."""

    def install(self, key: bytes, flow: Flow) -> bool:
        """Add or replace a direction's entry; False if the kernel refused it."""

    def take(self, key: bytes) -> Flow | None:
        """Remove a direction's entry and return it as it was last (None: not there)."""

    def peek(self, key: bytes) -> Flow | None:
        """A direction's entry as it is now, left in place."""

    def last_seen(self, key: bytes) -> int | None:
        """Only the entry's last_seen (ns), the cheap read the idle sweep needs; None: not there."""


def rescale(window: int, shift: int) -> int:
    """A window in one scale expressed in another (RFC 7323 §2.3); rounded up so it never closes by rounding."""
    if shift > 0:
        return min(window << shift, 0xFFFF)
    if shift < 0:
        return min((window + (1 << -shift) - 1) >> -shift, 0xFFFF)
    return window


def rewrite_tcp(buf: bytearray, t: int, tcp: TcpHeader, flow: Flow) -> None:
    """DESIGN.md step 4, the TCP header at ``buf[t:]`` in place (checksum not touched).

    Ports; SEG.SEQ moved by seq_add; SEG.ACK and the SACK edges (RFC 2018 §3:
    sequence numbers of the other side's space) by ack_add; TSval and TSecr by
    their offsets (RFC 7323 §5.3, PAWS needs one clock per side); the window
    rescaled from the sender's scale to the one the receiver was told.
    """
    U16.pack_into(buf, t, flow.sport)
    U16.pack_into(buf, t + 2, flow.dport)
    if flow.seq_add:
        U32.pack_into(buf, t + 4, (tcp.seq + flow.seq_add) & MOD32)
    if tcp.flags & ACK and flow.ack_add:
        U32.pack_into(buf, t + 8, (tcp.ack + flow.ack_add) & MOD32)
    if flow.wscale_shift:
        U16.pack_into(buf, t + 14, rescale(tcp.window, flow.wscale_shift))
    if tcp.ts_at >= 0:
        at = t + tcp.ts_at
        if flow.tsval_add:
            U32.pack_into(buf, at, (U32.unpack_from(buf, at)[0] + flow.tsval_add) & MOD32)
        if flow.tsecr_add:
            U32.pack_into(buf, at + 4, (U32.unpack_from(buf, at + 4)[0] + flow.tsecr_add) & MOD32)
    if tcp.sack_at >= 0 and flow.ack_add:
        shift_sack_blocks(buf, t, tcp, flow.ack_add)


def track(flow: Flow, tcp: TcpHeader, payload: int, now_ns: int) -> None:
    """What the program's track() records of a segment before it rewrites it: the highest ACK and
    sequence end (the sender's space), the window and when. The counts go up after the rewrite."""
    if tcp.flags & ACK and 0 < ((tcp.ack - flow.ack_max) & MOD32) < 0x80000000:
        flow.ack_max = tcp.ack
    end = (tcp.seq + payload) & MOD32
    if 0 < ((end - flow.seq_next) & MOD32) < 0x80000000:
        flow.seq_next = end
    flow.window = tcp.window
    if tcp.window > flow.window_max:
        flow.window_max = tcp.window
    flow.last_seen = now_ns


def to_host(buf: bytearray, start: int, ip: IPv4Header, tcp: TcpHeader, tcp_len: int, flow: Flow,
            partial: bool) -> int:
    """Client → host in place: the TCP rewrite, then an IPv6 header written over the IPv4 one.

    ``buf[start:]`` holds the IPv4 packet, with at least 20 bytes free before
    it; returns where the IPv6 packet now starts. ``partial``: the checksum
    field holds only the pseudo-header sum (CHECKSUM_PARTIAL).
    """
    t = start + ip.header_len
    hl = tcp.header_len
    new_src, new_dst = flow.src, flow.dst
    if not partial:
        old = ones_sum(ip.src + ip.dst + buf[t:t + hl])
    rewrite_tcp(buf, t, tcp, flow)
    if partial:
        # Virtio §5.1.6.2: only the pseudo-header is in the field; the TCP bytes
        # after csum_start are summed when the segments are sent.
        U16.pack_into(buf, t + 16, update_partial(tcp.checksum, ones_sum(ip.src + ip.dst), ones_sum(new_src + new_dst)))
    else:
        # RFC 1624 §3: the pseudo-header addresses and the header words changed.
        U16.pack_into(buf, t + 16, update(tcp.checksum, old, ones_sum(new_src + new_dst + buf[t:t + hl])))
    out = t - IPV6_HEADER_LEN
    # RFC 7915 §4.1: traffic class from TOS, flow label 0, hop limit from TTL
    # (decremented: kracauer routes), next header from protocol.
    IPV6_HEADER.pack_into(buf, out, 0x60000000 | (ip.tos << 20), tcp_len, PROTO_TCP, ip.ttl - 1, new_src, new_dst)
    return out


def to_client(buf: bytearray, start: int, ip: IPv6Header, tcp: TcpHeader, tcp_len: int, flow: Flow,
              partial: bool, ident: int) -> int:
    """Host → client in place: the TCP rewrite, then an IPv4 header written over the end of the IPv6 one.

    Returns where the IPv4 packet now starts. ``ident`` is the IPv4
    Identification: RFC 6864 §4 asks only that it not repeat within a flow
    soon, so both paths use the flow's packet count.
    """
    t = start + IPV6_HEADER_LEN
    hl = tcp.header_len
    new_src, new_dst = flow.src, flow.dst
    if not partial:
        old = ones_sum(ip.src + ip.dst + buf[t:t + hl])
    rewrite_tcp(buf, t, tcp, flow)
    if partial:
        U16.pack_into(buf, t + 16, update_partial(tcp.checksum, ones_sum(ip.src + ip.dst), ones_sum(new_src + new_dst)))
    else:
        U16.pack_into(buf, t + 16, update(tcp.checksum, old, ones_sum(new_src + new_dst + buf[t:t + hl])))
    out = t - IPV4_HEADER_LEN
    # RFC 7915 §5.1: TOS from traffic class, TTL from hop limit (decremented), DF above 1260 bytes.
    write_ipv4_header(buf, out, new_src, new_dst, PROTO_TCP, tcp_len, ip.hop_limit - 1, ip.traffic_class,
                      ident & 0xFFFF)
    return out
