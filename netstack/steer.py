"""Which worker a packet belongs to: the TUN queue steering, computed in Python.

With ``[tun] workers = N`` the TUN has N queues, one per worker process, and
a steering program (kracauer/bpf/steer.bpf.c, attached with
TUNSETSTEERINGEBPF) picks the queue of every packet the kernel hands the TUN.
Both directions of a connection must reach the worker that holds it, so the
program keys on the client, whichever way the packet goes:

- an IPv4 packet from a client: its source address and source port;
- an IPv6 packet from a host: the low 32 bits of its destination
  (prefix::client, RFC 6052 §2.2) and its destination port (the source port
  kracauer used towards the host);
- an ICMP error (RFC 792, RFC 4443 §2.4): the connection of the packet it
  quotes, which kracauer sent: the quoted destination (IPv4, to the client)
  or the quoted source (IPv6, from prefix::client) with its port.

Anything else (echo requests, other protocols) goes to queue 0.

This module is the one definition of that choice: the program computes
`steer_hash` the same way (a test runs both on the same packets), the worker
checks with `queue_of` that a source port it picks for a collision steers back
to itself, and adoption after a restart keeps only the flows that steer to the
adopting worker.

The kernel keeps 16 bits of the program's answer (tun.c's
tun_ebpf_select_queue returns a u16) and takes it modulo the number of queues.
"""

from __future__ import annotations

from netstack.flow import split_key

__all__ = ["steer_hash", "queue_of", "packet_key", "packet_queue", "flow_key_owner"]

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
# ICMP types that quote a packet: destination unreachable, time exceeded,
# parameter problem (RFC 792); ICMPv6 1-4 (RFC 4443 §3).
ICMP_ERRORS = frozenset({3, 11, 12})
ICMPV6_ERRORS = frozenset({1, 2, 3, 4})


def steer_hash(client: bytes, port: int) -> int:
    """The 16-bit steering value of a client's IPv4 address and port (murmur3's finalizer)."""
    h = (int.from_bytes(client, "big") ^ (port * 0x9E3779B1)) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h & 0xFFFF


def queue_of(client: bytes, port: int, queues: int) -> int:
    """The queue (worker index) the TUN hands this client's packets to."""
    return steer_hash(client, port) % queues if queues > 1 else 0


def _read(packet: bytes | memoryview, offset: int, size: int) -> int | None:
    """A big-endian field, or None past the end (the program's bpf_skb_load_bytes fails there too)."""
    if offset + size > len(packet):
        return None
    return int.from_bytes(packet[offset:offset + size], "big")


def _key(packet: bytes | memoryview, addr_at: int, port_at: int) -> tuple[bytes, int] | None:
    port = _read(packet, port_at, 2)
    if _read(packet, addr_at, 4) is None or port is None:
        return None
    return bytes(packet[addr_at:addr_at + 4]), port


def packet_key(packet: bytes | memoryview) -> tuple[bytes, int] | None:
    """(client IPv4 address, port) a packet steers by, or None for queue 0.

    Reads exactly what kracauer/bpf/steer.bpf.c reads, at the same offsets.
    """
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        proto = _read(packet, 9, 1)
        if proto in (PROTO_TCP, PROTO_UDP):
            return _key(packet, 12, ihl)
        if proto != PROTO_ICMP or _read(packet, ihl, 1) not in ICMP_ERRORS:
            return None
        first = _read(packet, ihl + 8, 1)
        if first is None:
            return None
        return _key(packet, ihl + 8 + 16, ihl + 8 + (first & 0x0F) * 4 + 2)
    if version == 6:
        proto = _read(packet, 6, 1)
        if proto in (PROTO_TCP, PROTO_UDP):
            return _key(packet, 36, 42)
        if proto != PROTO_ICMPV6 or _read(packet, 40, 1) not in ICMPV6_ERRORS:
            return None
        return _key(packet, 48 + 20, 48 + 40)
    return None


def packet_queue(packet: bytes | memoryview, queues: int) -> int:
    """The queue the steering program picks for `packet`."""
    key = packet_key(packet)
    return 0 if key is None else queue_of(key[0], key[1], queues)


def flow_key_owner(key: bytes, queues: int) -> int:
    """The worker that owns a kernel flow-map key (netstack.flow.flow_key: 40 bytes).

    The client direction's key holds IPv4 addresses in the last 4 bytes of
    each 16-byte address slot; the host direction's holds prefix::client as
    its destination. Both name the same client and port, so both entries of
    one connection have the same owner.
    """
    src, dst, sport, dport = split_key(key)
    if len(src) == 4:
        return queue_of(src, sport, queues)
    return queue_of(dst[12:], dport, queues)
