"""UDP datagrams: the header, building one, and the IPv4⇄IPv6 translation in place (RFC 768, RFC 7915).

The flows that decide where a datagram goes are in ``netstack.udptracker``;
this module only reads and rewrites bytes, as ``netstack.flow`` does for
TCP. A translated datagram keeps its payload where it is: the UDP header's
ports and checksum are rewritten and a new IP header is written in front of
it (IPv6, 20 bytes longer, into the headroom before the IPv4 header; IPv4
over the last 20 bytes of the IPv6 one).

Checksums:

- RFC 768: the checksum covers a pseudo-header (addresses, protocol, UDP
  length), the header and the data; a computed 0 is sent as 0xFFFF, and 0
  in an IPv4 datagram means "no checksum".
- RFC 8200 §8.1: an IPv6 UDP datagram must carry one, and a receiver drops
  one with 0. So a client's IPv4 datagram without a checksum gets one computed
  over the whole datagram (RFC 7915 §4.5 lets a stateful translator do that),
  and a host's IPv6 datagram with 0 is dropped by the caller.
- Otherwise the checksum is updated incrementally (RFC 1624) for the changed
  addresses and ports, so a datagram corrupted on the way stays detectably so;
  a partial checksum (CHECKSUM_PARTIAL, the vnet header's NEEDS_CSUM) holds
  only the pseudo-header sum and is moved by the address change alone.
"""

from __future__ import annotations

import struct

from netstack.checksum import finish, ones_sum, update, update_partial
from netstack.ip import IPV4_HEADER_LEN, IPV6_HEADER, IPV6_HEADER_LEN, PacketError, build_ipv4_header, write_ipv4_header

__all__ = [
    "PROTO_UDP", "UDP_HEADER", "UDP_HEADER_LEN", "UDP_CSUM_OFFSET", "UdpHeader", "udp_checksum", "build_datagram",
    "to_host", "to_client",
]

PROTO_UDP = 17
UDP_HEADER = struct.Struct("!HHHH")
UDP_HEADER_LEN = 8
UDP_CSUM_OFFSET = 6
_U16 = struct.Struct("!H")


class UdpHeader:
    """The four fields of a UDP header (RFC 768), checked against the IP payload it sits in."""

    __slots__ = ("sport", "dport", "length", "checksum")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) < UDP_HEADER_LEN:
            raise PacketError("UDP datagram shorter than its header")
        self.sport, self.dport, self.length, self.checksum = UDP_HEADER.unpack_from(data)
        # RFC 768: the length counts the header and the data. IPv4 may pad past it
        # (the IP length is what counts for the packet); it can never be more.
        if self.length < UDP_HEADER_LEN or self.length > len(data):
            raise PacketError("UDP length and IP payload length are inconsistent")


def _nonzero(value: int) -> int:
    # RFC 768: "If the computed checksum is zero, it is transmitted as all ones."
    return value or 0xFFFF


def udp_checksum(src: bytes, dst: bytes, datagram: bytes | bytearray | memoryview) -> int:
    """The UDP checksum of a datagram (its checksum field counted as it is: pass it zeroed)."""
    # RFC 768 and RFC 8200 §8.1: the pseudo-header has the addresses, the
    # length and the protocol; zero padding words add nothing.
    return _nonzero(finish(ones_sum(src + dst) + len(datagram) + PROTO_UDP + ones_sum(datagram)))


def build_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, ttl: int = 64) -> bytearray:
    """A whole IPv4 UDP packet (header, checksum) from `src` to `dst`, as kracauer sends to clients."""
    datagram = bytearray(UDP_HEADER.pack(sport, dport, UDP_HEADER_LEN + len(payload), 0))
    datagram += payload
    _U16.pack_into(datagram, UDP_CSUM_OFFSET, udp_checksum(src, dst, datagram))
    packet = build_ipv4_header(src, dst, PROTO_UDP, len(datagram), ttl)
    packet += datagram
    return packet


def to_host(buf: bytearray, start: int, header_len: int, ttl: int, tos: int, udp: UdpHeader,
            src6: bytes, host: bytes, sport: int, dport: int, partial: bool) -> int:
    """Client → host in place: the IPv4 datagram at ``buf[start:]`` becomes an IPv6 one; where it starts.

    ``header_len`` is the IPv4 header's (its options are dropped, RFC 7915
    §4.1); at least 20 bytes before ``start`` must be free. The caller checked
    the TTL (> 1).
    """
    u = start + header_len
    length = udp.length
    old_ports = buf[u:u + 4]
    old_addrs = buf[start + 12:start + 20]
    _U16.pack_into(buf, u, sport)
    _U16.pack_into(buf, u + 2, dport)
    if partial:
        # Virtio §5.1.6.2: only the pseudo-header sum is in the field; the ports are summed later.
        _U16.pack_into(buf, u + 6, update_partial(udp.checksum, ones_sum(old_addrs), ones_sum(src6 + host)))
    elif udp.checksum == 0:
        # RFC 7915 §4.5 and RFC 8200 §8.1: IPv6 needs the checksum IPv4 left out.
        _U16.pack_into(buf, u + 6, udp_checksum(src6, host, memoryview(buf)[u:u + length]))
    else:
        # RFC 1624 §3: the pseudo-header's addresses and the two ports changed.
        _U16.pack_into(buf, u + 6, _nonzero(update(udp.checksum, ones_sum(old_addrs + old_ports),
                                                   ones_sum(src6 + host + buf[u:u + 4]))))
    out = u - IPV6_HEADER_LEN
    # RFC 7915 §4.1: traffic class from TOS (ECN bits included), flow label 0,
    # hop limit from TTL less one (kracauer routes), next header UDP.
    IPV6_HEADER.pack_into(buf, out, 0x60000000 | (tos << 20), length, PROTO_UDP, ttl - 1, src6, host)
    return out


def to_client(buf: bytearray, start: int, hop_limit: int, traffic_class: int, udp: UdpHeader,
              service: bytes, client: bytes, sport: int, dport: int, partial: bool, ident: int) -> int:
    """Host → client in place: the IPv6 datagram at ``buf[start:]`` becomes an IPv4 one; where it starts.

    The caller dropped a zero checksum (RFC 8200 §8.1) and checked the hop limit.
    """
    u = start + IPV6_HEADER_LEN
    length = udp.length
    old_ports = buf[u:u + 4]
    old_addrs = buf[start + 8:start + 40]
    _U16.pack_into(buf, u, sport)
    _U16.pack_into(buf, u + 2, dport)
    if partial:
        _U16.pack_into(buf, u + 6, update_partial(udp.checksum, ones_sum(old_addrs), ones_sum(service + client)))
    else:
        _U16.pack_into(buf, u + 6, _nonzero(update(udp.checksum, ones_sum(old_addrs + old_ports),
                                                   ones_sum(service + client + buf[u:u + 4]))))
    out = u - IPV4_HEADER_LEN
    # RFC 7915 §5.1: TOS from traffic class, TTL from hop limit less one, DF above 1260 bytes.
    write_ipv4_header(buf, out, service, client, PROTO_UDP, length, hop_limit - 1, traffic_class, ident & 0xFFFF)
    return out
