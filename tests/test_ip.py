"""netstack.ip: IPv4/IPv6 header views and builders, against packets scapy builds and parses."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import IPv6

from netstack.ip import (
    IPV4_DF, IPV4_MF, PROTO_TCP, IPv4Header, IPv6Header, PacketError, build_ipv4_header, build_ipv6_header,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
CLIENT = "198.51.100.2"
SERVICE = "192.0.2.10"
HOST = "2001:db8::10"
CLIENT6 = "64:ff9b:1::c633:6402"


def scapy_ipv4_checksum_ok(packet: bytes) -> bool:
    parsed = IP(packet)
    fresh = parsed.copy()
    del fresh.chksum
    return IP(bytes(fresh)).chksum == parsed.chksum


# -- IPv4Header -----------------------------------------------------------------

def test_ipv4_header_fields_match_what_scapy_built():
    packet = bytes(IP(src=CLIENT, dst=SERVICE, tos=0xB8, ttl=57, id=0xBEEF, flags="DF") / TCP() / b"abc")
    ip = IPv4Header(packet)
    assert ip.header_len == 20
    assert ip.tos == 0xB8
    assert ip.total_len == len(packet) == 20 + 20 + 3
    assert ip.ident == 0xBEEF
    assert ip.flags_offset == IPV4_DF
    assert ip.ttl == 57
    assert ip.proto == PROTO_TCP
    assert ip.src == V4(CLIENT).packed
    assert ip.dst == V4(SERVICE).packed
    assert not ip.is_fragment


@pytest.mark.parametrize("options,header_len", [
    ([IPOption_NOP()] * 4, 24),
    ([IPOption_RR(routers=["10.0.0.1", "10.0.0.2"])], 32),
    ([IPOption_RR(routers=["10.0.0.%d" % i for i in range(1, 10)])], 60),
])
def test_ipv4_header_length_honours_ihl_with_options(options, header_len):
    packet = bytes(IP(src=CLIENT, dst=SERVICE, options=options) / TCP(sport=1234, dport=443))
    ip = IPv4Header(packet)
    assert ip.header_len == header_len == (packet[0] & 0x0F) * 4
    # The TCP header starts where IHL says, not at byte 20.
    assert packet[ip.header_len:ip.header_len + 4] == bytes.fromhex("04d201bb")


def test_ipv4_header_accepts_trailing_padding_after_total_length():
    # Ethernet pads short frames; total length, not the buffer, ends the packet.
    packet = bytes(IP(src=CLIENT, dst=SERVICE) / TCP()) + b"\0" * 6
    ip = IPv4Header(packet)
    assert ip.total_len == 40


def test_ipv4_header_reads_from_a_memoryview_and_a_bytearray():
    packet = bytes(IP(src=CLIENT, dst=SERVICE) / TCP())
    assert IPv4Header(memoryview(packet)).src == IPv4Header(bytearray(packet)).src == V4(CLIENT).packed


@pytest.mark.parametrize("flags,frag,fragment", [
    ("", 0, False),
    ("DF", 0, False),
    ("MF", 0, True),
    ("", 185, True),
    ("MF", 185, True),
    ("DF+MF", 0, True),
])
def test_ipv4_fragments_are_recognised_by_mf_or_offset(flags, frag, fragment):
    packet = bytes(IP(src=CLIENT, dst=SERVICE, flags=flags, frag=frag) / TCP())
    ip = IPv4Header(packet)
    assert ip.is_fragment is fragment
    assert bool(ip.flags_offset & IPV4_MF) == ("MF" in flags)
    assert ip.flags_offset & 0x1FFF == frag


def ipv4_bytes(**fields) -> bytearray:
    return bytearray(bytes(IP(src=CLIENT, dst=SERVICE, **fields) / TCP()))


@pytest.mark.parametrize("packet", [
    pytest.param(b"", id="empty"),
    pytest.param(bytes(ipv4_bytes())[:19], id="shorter-than-header"),
    pytest.param(bytes(IPv6(src=HOST, dst=CLIENT6) / TCP()), id="version-6"),
    pytest.param(bytes(ipv4_bytes(ihl=4)), id="ihl-4"),
    pytest.param(bytes(ipv4_bytes(ihl=0)), id="ihl-0"),
    pytest.param(bytes(ipv4_bytes(ihl=15)), id="ihl-past-total-length"),
    pytest.param(bytes(ipv4_bytes(len=60)), id="total-length-past-buffer"),
    pytest.param(bytes(ipv4_bytes(len=19)), id="total-length-below-header"),
])
def test_malformed_ipv4_raises_packet_error(packet):
    with pytest.raises(PacketError):
        IPv4Header(packet)


def test_ipv4_version_nibble_is_checked():
    packet = ipv4_bytes()
    packet[0] = 0x55
    with pytest.raises(PacketError):
        IPv4Header(packet)


# -- IPv6Header -----------------------------------------------------------------

def test_ipv6_header_fields_match_what_scapy_built():
    packet = bytes(IPv6(src=HOST, dst=CLIENT6, tc=0xB9, fl=0xABCDE, hlim=33) / TCP() / b"hello")
    ip = IPv6Header(packet)
    assert ip.traffic_class == 0xB9
    assert ip.flow_label == 0xABCDE
    assert ip.payload_len == 25
    assert ip.next_header == PROTO_TCP
    assert ip.hop_limit == 33
    assert ip.src == V6(HOST).packed
    assert ip.dst == V6(CLIENT6).packed


def test_ipv6_header_reports_the_next_header_it_finds():
    assert IPv6Header(bytes(IPv6(src=HOST, dst=CLIENT6) / UDP())).next_header == 17


def test_ipv6_header_accepts_trailing_bytes_after_the_payload():
    packet = bytes(IPv6(src=HOST, dst=CLIENT6) / TCP()) + b"\0" * 4
    assert IPv6Header(packet).payload_len == 20


@pytest.mark.parametrize("packet", [
    pytest.param(b"", id="empty"),
    pytest.param(bytes(IPv6(src=HOST, dst=CLIENT6) / TCP())[:39], id="shorter-than-header"),
    pytest.param(bytes(IP(src=CLIENT, dst=SERVICE) / TCP() / (b"\0" * 40)), id="version-4"),
    pytest.param(bytes(IPv6(src=HOST, dst=CLIENT6, plen=21) / TCP()), id="payload-length-past-buffer"),
])
def test_malformed_ipv6_raises_packet_error(packet):
    with pytest.raises(PacketError):
        IPv6Header(packet)


def test_packet_error_is_a_value_error():
    assert issubclass(PacketError, ValueError)


# -- build_ipv4_header --------------------------------------------------------------

def test_built_ipv4_header_parses_in_scapy_with_a_correct_checksum():
    tcp = bytes(TCP(sport=443, dport=40000, flags="A"))
    header = build_ipv4_header(V4(SERVICE).packed, V4(CLIENT).packed, PROTO_TCP, len(tcp), ttl=63, tos=0x28,
                               ident=777)
    assert len(header) == 20
    packet = bytes(header) + tcp
    parsed = IP(packet)
    assert parsed.version == 4 and parsed.ihl == 5
    assert parsed.src == SERVICE and parsed.dst == CLIENT
    assert parsed.len == len(packet)
    assert parsed.ttl == 63 and parsed.tos == 0x28 and parsed.id == 777
    assert parsed.proto == 6 and parsed.frag == 0
    assert scapy_ipv4_checksum_ok(packet)
    assert TCP in parsed


@given(st.integers(0, 2000), st.integers(0, 255), st.integers(1, 255), st.integers(0, 0xFFFF))
def test_built_ipv4_header_checksum_is_always_right(payload_len, tos, ttl, ident):
    header = build_ipv4_header(V4(SERVICE).packed, V4(CLIENT).packed, PROTO_TCP, payload_len, ttl, tos, ident)
    assert scapy_ipv4_checksum_ok(bytes(header) + bytes(payload_len))
    assert IPv4Header(bytes(header) + bytes(payload_len)).total_len == 20 + payload_len


# RFC 7915 §5.1: DF is set exactly when the translated IPv4 packet is larger
# than 1260 bytes; the MF flag and the offset are always zero.
@pytest.mark.parametrize("total,df", [(40, False), (1259, False), (1260, False), (1261, True), (1500, True)])
def test_built_ipv4_header_sets_df_only_above_1260_bytes(total, df):
    header = build_ipv4_header(V4(SERVICE).packed, V4(CLIENT).packed, PROTO_TCP, total - 20)
    parsed = IP(bytes(header) + bytes(total - 20))
    assert ("DF" in parsed.flags) is df
    assert "MF" not in parsed.flags
    assert parsed.frag == 0
    assert not IPv4Header(bytes(header) + bytes(total - 20)).is_fragment


# -- build_ipv6_header --------------------------------------------------------------

def test_built_ipv6_header_parses_in_scapy():
    tcp = bytes(TCP(sport=40000, dport=443, flags="S"))
    header = build_ipv6_header(V6(CLIENT6).packed, V6(HOST).packed, PROTO_TCP, len(tcp), hop_limit=63,
                               traffic_class=0xB8)
    assert len(header) == 40
    parsed = IPv6(bytes(header) + tcp)
    assert parsed.version == 6
    assert parsed.src == CLIENT6 and parsed.dst == HOST
    assert parsed.plen == len(tcp)
    assert parsed.nh == 6 and parsed.hlim == 63
    assert parsed.tc == 0xB8
    # RFC 7915 §4.1: the flow label of a translated packet is 0.
    assert parsed.fl == 0
    assert parsed[TCP].sport == 40000


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_built_ipv6_header_round_trips_through_the_parser(traffic_class, hop_limit, payload_len):
    header = build_ipv6_header(V6(CLIENT6).packed, V6(HOST).packed, PROTO_TCP, payload_len, hop_limit, traffic_class)
    ip = IPv6Header(bytes(header) + bytes(payload_len))
    assert (ip.traffic_class, ip.hop_limit, ip.payload_len, ip.flow_label) == (traffic_class, hop_limit, payload_len,
                                                                             0)


# -- write_ipv4_header (in-place translation) ------------------------------------------

@given(st.integers(0, 60), st.integers(0, 2000), st.integers(1, 255), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_written_ipv4_header_equals_the_built_one_and_leaves_its_neighbours(at, payload_len, ttl, tos, ident):
    from netstack.ip import write_ipv4_header

    buf = bytearray(b"\xaa" * (at + 20 + 8))
    write_ipv4_header(buf, at, V4(SERVICE).packed, V4(CLIENT).packed, PROTO_TCP, payload_len, ttl, tos, ident)
    built = build_ipv4_header(V4(SERVICE).packed, V4(CLIENT).packed, PROTO_TCP, payload_len, ttl, tos, ident)
    assert buf[at:at + 20] == built
    assert buf[:at] == b"\xaa" * at and buf[at + 20:] == b"\xaa" * 8
