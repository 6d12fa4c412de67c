"""Translation of frames that carry a virtio_net_hdr (TUN opened with IFF_VNET_HDR).

Super-packets arrive with a partial checksum (only the pseudo-header sum in the
checksum field) and a gso_type/gso_size saying how the kernel will cut them.
Each test translates a frame through a real tracker, then does what the kernel
does next: segments it at gso_size the way tcp_gso_segment does (sequence
numbers advanced, FIN/PSH only on the last segment, the pseudo-header length
replaced in the partial sum) and completes the checksum. scapy then checks
every resulting segment's checksum from scratch.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack.checksum import finish, ones_sum
from netstack.tracker import HEADROOM, Listener, Target, Tracker, TrackerConfig
from netstack.vnet import (
    F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, PLAIN, VNET_HEADER,
    VNET_HEADER_LEN, VnetError, gso_type_for,
)

CLIENT = "198.51.100.2"
SERVICE = "192.0.2.10"
HOST = "2001:db8::10"
PREFIX = ipaddress.IPv6Address("64:ff9b:1::").packed[:12]
EMBEDDED = str(ipaddress.IPv6Address(PREFIX + ipaddress.IPv4Address(CLIENT).packed))
MTU = 1500
CLIENT_MSS = 1460
HOST_ISN = 0x9000_0000
CLIENT_ISN = 1000


def vnet(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
         csum_offset: int = 0) -> bytes:
    return VNET_HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def plain(packet) -> bytes:
    return PLAIN + bytes(packet)


def split_frame(frame: bytes) -> tuple[tuple[int, ...], bytes]:
    return VNET_HEADER.unpack_from(frame), frame[VNET_HEADER_LEN:]


def pseudo_sum(packet: bytes, tcp_len: int) -> int:
    """The uncomplemented pseudo-header sum Linux leaves in a CHECKSUM_PARTIAL packet's TCP checksum."""
    if packet[0] >> 4 == 4:
        addresses = packet[12:20]
    else:
        addresses = packet[8:40]
    return (ones_sum(addresses) + 6 + tcp_len) % 0xFFFF


def make_partial(packet: bytes) -> bytes:
    """Turn a packet with a full checksum into one as the kernel hands it over with NEEDS_CSUM."""
    ip_len = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    tcp_len = len(packet) - ip_len
    out = bytearray(packet)
    out[ip_len + 16:ip_len + 18] = pseudo_sum(packet, tcp_len).to_bytes(2, "big")
    return bytes(out)


def segment(frame: bytes) -> list[bytes]:
    """Cut a translated frame the way the kernel's GSO does, and complete each checksum."""
    (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset), packet = split_frame(frame)
    version = packet[0] >> 4
    ip_len = 20 if version == 4 else 40
    assert csum_start == (ip_len if flags & F_NEEDS_CSUM else 0)
    tcp = packet[ip_len:]
    tcp_hl = (tcp[12] >> 4) * 4
    assert hdr_len == ip_len + tcp_hl
    payload = tcp[tcp_hl:]
    step = gso_size if gso_type != GSO_NONE else max(len(payload), 1)
    chunks = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
    seq = int.from_bytes(tcp[4:8], "big")
    field = int.from_bytes(tcp[16:18], "big")
    out = []
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        header = bytearray(tcp[:tcp_hl])
        header[4:8] = ((seq + index * step) & 0xFFFFFFFF).to_bytes(4, "big")
        if not last:
            header[13] &= ~0x09 & 0xFF  # FIN and PSH only on the last segment
        seg_len = tcp_hl + len(chunk)
        if flags & F_NEEDS_CSUM:
            # tcp_gso_segment: replace the super-packet's length in the pseudo sum by the segment's.
            partial = (field - len(tcp) + seg_len) % 0xFFFF
            header[16:18] = partial.to_bytes(2, "big")
            header[16:18] = finish(ones_sum(bytes(header) + chunk)).to_bytes(2, "big")
        ip = bytearray(packet[:ip_len])
        if version == 4:
            ip[2:4] = (ip_len + seg_len).to_bytes(2, "big")
            ip[4:6] = ((int.from_bytes(ip[4:6], "big") + index) & 0xFFFF).to_bytes(2, "big")
            ip[10:12] = b"\0\0"
            ip[10:12] = finish(ones_sum(bytes(ip))).to_bytes(2, "big")
        else:
            ip[4:6] = seg_len.to_bytes(2, "big")
        out.append(bytes(ip) + bytes(header) + chunk)
    return out


def assert_checksums_valid(packet: bytes) -> None:
    parsed = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    wire = parsed[TCP].chksum
    del parsed[TCP].chksum
    if packet[0] >> 4 == 4:
        wire_ip = parsed[IP].chksum
        del parsed[IP].chksum
    rebuilt = parsed.__class__(bytes(parsed))
    assert rebuilt[TCP].chksum == wire
    if packet[0] >> 4 == 4:
        assert rebuilt[IP].chksum == wire_ip


class Walk:
    """One tcp-listener connection, spliced, through a tracker in vnet mode."""

    def __init__(self, host_wscale: int = 7) -> None:
        rnd = random.Random(7)
        listener = Listener(ipaddress.IPv4Address(SERVICE).packed, 80, "tcp")
        target = Target(ipaddress.IPv6Address(HOST).packed, 8080, "listener")
        config = TrackerConfig(prefix=PREFIX, mtu=MTU, vnet=True)
        self.tracker = Tracker(config, [listener], lambda lst, decision: target, lambda: rnd.getrandbits(32))
        options = [("MSS", CLIENT_MSS), ("SAckOK", b""), ("Timestamp", (100, 0)), ("NOP", None), ("WScale", 7)]
        synack = self.client(TCP(flags="S", seq=CLIENT_ISN, options=options))
        (_, parsed), = [split_frame(f) for f in synack]
        self.our_isn = IP(parsed)[TCP].seq
        host_syn = self.client(TCP(flags="A", seq=CLIENT_ISN + 1, ack=self.our_isn + 1,
                                   options=[("NOP", None), ("NOP", None), ("Timestamp", (101, 1))]))
        syn6 = IPv6(split_frame(host_syn[0])[1])
        self.sport = syn6[TCP].sport
        options = [("MSS", 1440), ("SAckOK", b""), ("Timestamp", (50_000, 101)), ("NOP", None),
                   ("WScale", host_wscale)]
        replay = self.host(TCP(flags="SA", seq=HOST_ISN, ack=CLIENT_ISN + 1, options=options))
        assert replay and IPv6(split_frame(replay[0])[1])[TCP].flags == "A"
        self.delta = (HOST_ISN - self.our_isn) & 0xFFFFFFFF

    def client(self, tcp: TCP, payload: bytes = b"", header: bytes | None = None, partial: bool = False,
               tos: int = 0) -> list[bytes]:
        tcp.sport, tcp.dport = 40000, 80
        packet = bytes(IP(src=CLIENT, dst=SERVICE, tos=tos, ttl=64) / tcp / payload)
        if partial:
            packet = make_partial(packet)
        return self.tracker.receive((header if header is not None else PLAIN) + packet, 1.0)

    def host(self, tcp: TCP, payload: bytes = b"", header: bytes | None = None, partial: bool = False,
             tc: int = 0) -> list[bytes]:
        tcp.sport, tcp.dport = 8080, self.sport
        packet = bytes(IPv6(src=HOST, dst=EMBEDDED, tc=tc, hlim=64) / tcp / payload)
        if partial:
            packet = make_partial(packet)
        return self.tracker.receive((header if header is not None else PLAIN) + packet, 1.0)


TS_OPTIONS = [("NOP", None), ("NOP", None), ("Timestamp", (200, 50_001))]


def test_generated_packets_carry_a_plain_vnet_header():
    rnd = random.Random(3)
    listener = Listener(ipaddress.IPv4Address(SERVICE).packed, 80, "tcp")
    tracker = Tracker(TrackerConfig(prefix=PREFIX, vnet=True), [listener],
                      lambda lst, d: None, lambda: rnd.getrandbits(32))
    out = tracker.receive(plain(IP(src=CLIENT, dst=SERVICE) / TCP(sport=1, dport=80, flags="S", seq=5)), 0.0)
    assert len(out) == 1 and out[0][:VNET_HEADER_LEN] == PLAIN
    assert IP(out[0][VNET_HEADER_LEN:])[TCP].flags == "SA"
    assert_checksums_valid(out[0][VNET_HEADER_LEN:])


def test_client_super_packet_becomes_tcpv6_with_moved_offsets_and_adjusted_partial_checksum():
    walk = Walk()
    payload = bytes(range(256)) * 200  # 51 200 bytes: 36 segments of 1448
    gso_size = CLIENT_MSS - 12
    header = vnet(F_NEEDS_CSUM, GSO_TCPV4, 20 + 32, gso_size, 20, 16)
    out = walk.client(TCP(flags="PA", seq=CLIENT_ISN + 1, ack=walk.our_isn + 1, options=TS_OPTIONS), payload,
                      header, partial=True)
    assert len(out) == 1
    (flags, gso_type, hdr_len, out_gso, csum_start, csum_offset), packet = split_frame(out[0])
    assert (flags, gso_type, hdr_len, csum_start, csum_offset) == (F_NEEDS_CSUM, GSO_TCPV6, 40 + 32, 40, 16)
    assert out_gso == min(gso_size, MTU - 40 - 32)
    # The partial field is exactly the IPv6 pseudo-header sum for the whole TCP length.
    tcp_len = len(packet) - 40
    assert int.from_bytes(packet[56:58], "big") % 0xFFFF == pseudo_sum(packet, tcp_len)
    segments = segment(out[0])
    assert len(segments) == -(-len(payload) // out_gso)
    received = b""
    for seg in segments:
        assert_checksums_valid(seg)
        parsed = IPv6(seg)
        assert parsed.src == EMBEDDED and parsed.dst == HOST and len(seg) <= MTU
        assert parsed[TCP].ack == (walk.our_isn + 1 + walk.delta) & 0xFFFFFFFF
        received += bytes(parsed[TCP].payload)
    assert received == payload
    assert IPv6(segments[-1])[TCP].flags == "PA" and IPv6(segments[0])[TCP].flags == "A"


def test_host_super_packet_becomes_tcpv4_cut_to_the_clients_mss():
    walk = Walk(host_wscale=9)
    payload = b"\xa5" * 60_000
    gso_size = 1428
    header = vnet(F_NEEDS_CSUM, GSO_TCPV6 | GSO_ECN, 40 + 32, gso_size, 40, 16)
    out = walk.host(TCP(flags="FA", seq=HOST_ISN + 1, ack=CLIENT_ISN + 1, window=100, options=TS_OPTIONS),
                    payload, header, partial=True, tc=0x02)
    (flags, gso_type, hdr_len, out_gso, csum_start, csum_offset), packet = split_frame(out[0])
    assert (flags, gso_type, hdr_len, csum_start, csum_offset) == (F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 52, 20, 16)
    assert out_gso == min(gso_size, CLIENT_MSS - 12)
    segments = segment(out[0])
    data = b""
    for index, seg in enumerate(segments):
        assert_checksums_valid(seg)
        parsed = IP(seg)
        assert (parsed.src, parsed.dst, parsed.tos, parsed.ttl) == (SERVICE, CLIENT, 0x02, 63)
        assert parsed[TCP].seq == (HOST_ISN + 1 - walk.delta + index * out_gso) & 0xFFFFFFFF
        # Host scale 9, kracauer told the client 7: the window grows by 2**2.
        assert parsed[TCP].window == 400
        data += bytes(parsed[TCP].payload)
    assert data == payload
    assert IP(segments[-1])[TCP].flags == "FA" and IP(segments[0])[TCP].flags == "A"


@pytest.mark.parametrize("flags", [0, F_DATA_VALID])
def test_single_packets_with_full_checksums_stay_full(flags):
    walk = Walk()
    out = walk.host(TCP(flags="PA", seq=HOST_ISN + 1, ack=CLIENT_ISN + 1, options=TS_OPTIONS), b"hello",
                    vnet(flags))
    (out_flags, gso_type, _, gso_size, csum_start, _), packet = split_frame(out[0])
    assert (out_flags, gso_type, gso_size, csum_start) == (0, GSO_NONE, 0, 0)
    assert_checksums_valid(packet)
    out = walk.client(TCP(flags="A", seq=CLIENT_ISN + 1, ack=walk.our_isn + 6, options=TS_OPTIONS), b"",
                      vnet(flags))
    (out_flags, gso_type, _, _, _, _), packet = split_frame(out[0])
    assert (out_flags, gso_type) == (0, GSO_NONE)
    assert_checksums_valid(packet)


def test_partial_single_packet_is_completed_correctly():
    walk = Walk()
    out = walk.client(TCP(flags="PA", seq=CLIENT_ISN + 1, ack=walk.our_isn + 1, options=TS_OPTIONS), b"x" * 700,
                      vnet(F_NEEDS_CSUM, GSO_NONE, 52, 0, 20, 16), partial=True)
    segments = segment(out[0])
    assert len(segments) == 1
    assert_checksums_valid(segments[0])


def test_frames_that_are_not_tcp_gso_or_too_short_are_dropped_and_counted():
    walk = Walk()
    tcp = TCP(flags="A", seq=CLIENT_ISN + 1, ack=walk.our_isn + 1)
    assert walk.client(tcp, b"x" * 100, vnet(F_NEEDS_CSUM, GSO_UDP_L4, 40, 50, 20, 6), partial=True) == []
    assert walk.tracker.drops["gso_not_tcp"] == 1
    assert walk.tracker.receive(b"\x00" * 5, 1.0) == []
    assert walk.tracker.drops["short_vnet_header"] == 1


def test_gso_type_mapping_keeps_ecn_and_refuses_udp():
    assert gso_type_for(6, GSO_TCPV4) == GSO_TCPV6
    assert gso_type_for(4, GSO_TCPV6 | GSO_ECN) == GSO_TCPV4 | GSO_ECN
    assert gso_type_for(4, GSO_NONE) == GSO_NONE
    with pytest.raises(VnetError):
        gso_type_for(4, GSO_UDP_L4)
