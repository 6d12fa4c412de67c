"""netstack.tcp: header parsing, option offsets, builders and sequence arithmetic.

Segments are built by scapy; the options kracauer rewrites (timestamps, SACK)
are located by offset, so each offset is checked against the bytes it names.
"""

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack.ip import PacketError
from netstack.tcp import (
    ACK, FIN, PSH, RST, SYN, TcpHeader, add_u32, build_segment, seq_le, seq_lt, set_checksum,
    shift_sack_blocks, syn_options, timestamp_option,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
CLIENT = "198.51.100.2"
SERVICE = "192.0.2.10"
HOST = "2001:db8::10"
CLIENT6 = "64:ff9b:1::c633:6402"


def segment(**fields) -> bytes:
    return bytes(TCP(**fields))


def u32_at(data: bytes, at: int) -> int:
    return struct.unpack_from("!I", data, at)[0]


# -- fixed fields ---------------------------------------------------------------------

def test_fixed_fields_match_what_scapy_built():
    data = segment(sport=40000, dport=443, seq=0xFFFFFFF0, ack=123456, flags="PA", window=502) + b"payload"
    tcp = TcpHeader(data)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (40000, 443, 0xFFFFFFF0, 123456)
    assert tcp.flags == PSH | ACK
    assert tcp.window == 502
    assert tcp.header_len == 20
    assert tcp.checksum == struct.unpack_from("!H", data, 16)[0]
    assert (tcp.mss, tcp.wscale, tcp.sack_permitted, tcp.ts_at, tcp.sack_at) == (None, None, False, -1, -1)
    assert tcp.timestamps(data) is None


@pytest.mark.parametrize("flags,bits", [
    ("S", SYN), ("SA", SYN | ACK), ("F", FIN), ("R", RST), ("RA", RST | ACK), ("FPA", FIN | PSH | ACK),
])
def test_flags_are_the_rfc9293_bits(flags, bits):
    assert TcpHeader(segment(flags=flags)).flags == bits


def test_header_reads_from_a_memoryview():
    data = segment(options=[("MSS", 1460)])
    assert TcpHeader(memoryview(data)).mss == 1460


# -- options ---------------------------------------------------------------------------

def test_linux_syn_options_are_all_found():
    data = segment(flags="S", options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (111, 0)), ("NOP", None),
                                       ("WScale", 7)])
    tcp = TcpHeader(data)
    assert tcp.header_len == 40
    assert tcp.mss == 1460
    assert tcp.sack_permitted
    assert tcp.wscale == 7
    assert tcp.timestamps(data) == (111, 0)


def test_window_scale_above_14_is_treated_as_14():
    # RFC 7323 §2.3.
    assert TcpHeader(segment(options=[("WScale", 15)])).wscale == 14
    assert TcpHeader(segment(options=[("WScale", 14)])).wscale == 14
    assert TcpHeader(segment(options=[("WScale", 0)])).wscale == 0


def test_timestamps_fast_path_nop_nop_ts():
    data = segment(flags="A", options=[("NOP", None), ("NOP", None), ("Timestamp", (0xDEADBEEF, 0x01020304))])
    tcp = TcpHeader(data)
    assert tcp.header_len == 32
    assert tcp.ts_at == 24
    assert tcp.timestamps(data) == (0xDEADBEEF, 0x01020304)
    assert tcp.sack_at == -1


@pytest.mark.parametrize("options", [
    pytest.param([("Timestamp", (7, 8)), ("NOP", None), ("NOP", None)], id="ts-first"),
    pytest.param([("NOP", None), ("Timestamp", (7, 8)), ("NOP", None)], id="ts-at-21"),
    pytest.param([("MSS", 1000), ("Timestamp", (7, 8)), ("NOP", None), ("NOP", None)], id="after-mss"),
    pytest.param([("NOP", None), ("NOP", None), ("Timestamp", (7, 8)), ("SAck", (1, 2))], id="ts-then-sack"),
    pytest.param([("SAckOK", b""), ("Timestamp", (7, 8)), ("NOP", None), ("WScale", 2)], id="syn-layout"),
])
def test_timestamps_slow_path_finds_the_option_anywhere(options):
    data = segment(options=options)
    tcp = TcpHeader(data)
    assert tcp.timestamps(data) == (7, 8)
    # The offset names the TSval bytes themselves.
    assert data[tcp.ts_at - 2:tcp.ts_at] == b"\x08\x0a"
    assert u32_at(data, tcp.ts_at) == 7 and u32_at(data, tcp.ts_at + 4) == 8


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_sack_blocks_are_located(blocks):
    edges = tuple(range(0xFFFFFF00, 0xFFFFFF00 + 2 * blocks * 100, 100))
    edges = tuple(e & 0xFFFFFFFF for e in edges)
    options = [("SAck", edges)]
    if blocks <= 3:
        options = [("NOP", None), ("NOP", None), ("Timestamp", (5, 6))] + options
    data = segment(flags="A", options=options)
    tcp = TcpHeader(data)
    assert tcp.sack_blocks == blocks
    assert data[tcp.sack_at - 2] == 5  # the kind byte precedes the edges
    assert tuple(u32_at(data, tcp.sack_at + 4 * i) for i in range(2 * blocks)) == edges
    if blocks <= 3:
        assert tcp.timestamps(data) == (5, 6)


def test_unknown_options_are_skipped_by_their_length():
    # Kind 30 (MPTCP) and 34 (TFO cookie) are not ours; what follows is still found.
    data = segment(options=[(30, b"\x00\x81\x02\x03\x04\x05"), (34, b"\xaa" * 8), ("NOP", None), ("NOP", None),
                            ("Timestamp", (9, 10))])
    tcp = TcpHeader(data)
    assert tcp.timestamps(data) == (9, 10)


@pytest.mark.parametrize("option", [
    pytest.param(("AltChkSum", (0, 0)), id="alt-checksum-14"),
    pytest.param(("AltChkSumOpt", b""), id="alt-checksum-data-15"),
    pytest.param(("MD5", b"\x5a" * 16), id="md5-19"),
    pytest.param(("Mood", b":)"), id="mood-25"),
    pytest.param(("UTO", 0xFFFF), id="user-timeout-28"),
    pytest.param(("TFO", (0x01020304, 0x05060708)), id="fast-open-34"),
    pytest.param((30, b"\x00\x81"), id="mptcp-30"),
    pytest.param((253, b"\xab\xcd"), id="experimental-253"),
])
def test_every_other_option_kind_is_skipped_and_the_rest_still_found(option):
    options = [option, ("MSS", 1400), ("NOP", None), ("NOP", None), ("Timestamp", (0xA, 0xB))]
    with_sack = option[0] != "MD5"  # 18 bytes of MD5 leave no room for a SACK block
    data = segment(flags="A", options=options + ([("SAck", (1, 2))] if with_sack else []))
    assert len(data) <= 60
    tcp = TcpHeader(data)
    assert tcp.mss == 1400
    assert tcp.timestamps(data) == (0xA, 0xB)
    if with_sack:
        assert tcp.sack_blocks == 1 and u32_at(data, tcp.sack_at) == 1


def test_end_of_option_list_stops_parsing():
    data = segment(options=[("MSS", 1200), ("EOL", None), ("NOP", None), ("NOP", None), ("NOP", None),
                            ("NOP", None), ("NOP", None), ("NOP", None), ("NOP", None)])
    raw = bytearray(data)
    # Put a would-be timestamp option behind the EOL.
    raw[25:35] = b"\x08\x0a" + struct.pack("!II", 1, 2)
    tcp = TcpHeader(raw)
    assert tcp.mss == 1200
    assert tcp.ts_at == -1


def test_known_options_with_the_wrong_length_are_ignored():
    # MSS with length 5 and a timestamp with length 6: not what RFC 9293/7323 define.
    raw = segment() + b""
    options = bytes((2, 5, 5, 0xB4, 0)) + bytes((8, 6, 0, 0, 0, 1)) + bytes((1,))
    data = bytearray(raw)
    data[12] = ((20 + len(options)) // 4) << 4
    data[20:20] = options
    tcp = TcpHeader(data)
    assert tcp.mss is None
    assert tcp.ts_at == -1


# -- malformed headers --------------------------------------------------------------------

def with_options(options: bytes, data_offset: int | None = None) -> bytes:
    header = bytearray(segment(sport=1, dport=2))
    header += options
    header[12] = (data_offset if data_offset is not None else len(header) // 4) << 4
    return bytes(header)


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(segment()[:19], id="shorter-than-header"),
    pytest.param(with_options(b"", data_offset=4), id="data-offset-4"),
    pytest.param(with_options(b"", data_offset=0), id="data-offset-0"),
    pytest.param(with_options(b"", data_offset=6), id="data-offset-past-segment"),
    pytest.param(with_options(b"\x02\x00\x00\x00"), id="option-length-0"),
    pytest.param(with_options(b"\x02\x01\x00\x00"), id="option-length-1"),
    pytest.param(with_options(b"\x08\x0a\x00\x00"), id="option-overruns-header"),
    pytest.param(with_options(b"\x01\x01\x02\x08\x00\x00\x00\x00"), id="option-overruns-by-one"),
    pytest.param(with_options(b"\x01\x01\x01\x02"), id="kind-without-length-byte"),
    pytest.param(with_options(b"\x1e\x00\x01\x01"), id="unknown-option-length-0"),
])
def test_malformed_tcp_raises_packet_error(data):
    with pytest.raises(PacketError):
        TcpHeader(data)


def test_data_offset_is_honoured_not_assumed():
    # A header that claims 24 bytes: the 4 bytes after byte 20 are options, not payload.
    data = with_options(bytes((2, 4, 0x05, 0xB4))) + b"payload"
    tcp = TcpHeader(data)
    assert tcp.header_len == 24
    assert tcp.mss == 1460
    assert data[tcp.header_len:] == b"payload"


@given(st.binary(min_size=20, max_size=80))
def test_arbitrary_bytes_parse_or_raise_packet_error(data):
    try:
        tcp = TcpHeader(data)
    except PacketError:
        return
    assert 20 <= tcp.header_len <= len(data)
    if tcp.ts_at >= 0:
        assert tcp.ts_at + 8 <= tcp.header_len
    if tcp.sack_at >= 0:
        assert tcp.sack_at + 8 * tcp.sack_blocks <= tcp.header_len


# -- sequence arithmetic ------------------------------------------------------------------

@pytest.mark.parametrize("a,b,lt", [
    (1, 2, True),
    (2, 1, False),
    (5, 5, False),
    (0xFFFFFFFF, 0, True),  # wraps
    (0, 0xFFFFFFFF, False),
    (0xFFFFFF00, 0x10, True),
    (0, 0x7FFFFFFF, True),
    (0x7FFFFFFF, 0, False),
])
def test_seq_lt_is_modular(a, b, lt):
    assert seq_lt(a, b) is lt


def test_seq_le_includes_equality():
    assert seq_le(7, 7)
    assert seq_le(0xFFFFFFFF, 3)
    assert not seq_le(3, 0xFFFFFFFF)


@given(st.integers(0, 0xFFFFFFFF), st.integers(1, 0x7FFFFFFF))
def test_seq_lt_holds_for_any_forward_distance_under_half_the_space(a, distance):
    b = (a + distance) & 0xFFFFFFFF
    assert seq_lt(a, b)
    assert not seq_lt(b, a)


def test_add_u32_wraps_modulo_2_32():
    header = bytearray(struct.pack("!II", 0xFFFFFFF0, 5))
    add_u32(header, 0, 0x20)
    add_u32(header, 4, -6)
    assert struct.unpack("!II", header) == (0x10, 0xFFFFFFFF)


def test_shift_sack_blocks_moves_every_edge_and_nothing_else():
    edges = (100, 200, 0xFFFFFFF0, 0x10, 5000, 6000)
    tcp_bytes = segment(options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2)), ("SAck", edges)])
    tcp = TcpHeader(tcp_bytes)
    # The TCP header sits after a 20-byte IPv4 header in the buffer being rewritten.
    data = bytearray(bytes(IP(src=CLIENT, dst=SERVICE)) + tcp_bytes)
    before = bytes(data)
    shift_sack_blocks(data, 20, tcp, 0x100)
    at = 20 + tcp.sack_at
    assert tuple(u32_at(data, at + 4 * i) for i in range(6)) == tuple((e + 0x100) & 0xFFFFFFFF for e in edges)
    assert data[:at] == before[:at]
    assert tcp.timestamps(data[20:]) == (1, 2)


def test_shift_sack_blocks_by_a_negative_delta_wraps():
    tcp_bytes = segment(options=[("SAck", (5, 10))])
    tcp = TcpHeader(tcp_bytes)
    data = bytearray(tcp_bytes)
    shift_sack_blocks(data, 0, tcp, -8)
    assert (u32_at(data, tcp.sack_at), u32_at(data, tcp.sack_at + 4)) == (0xFFFFFFFD, 2)


# -- builders -------------------------------------------------------------------------------

@pytest.mark.parametrize("mss,wscale,sack,stamps", [
    (1440, 7, True, (1000, 2000)),
    (1440, 7, False, (1000, 2000)),
    (1440, None, True, (1000, 0)),
    (1440, 0, True, None),
    (536, None, False, None),
    (1220, 14, False, None),
    (1440, None, True, None),
])
def test_syn_options_are_padded_and_read_back(mss, wscale, sack, stamps):
    options = syn_options(mss, wscale, sack, stamps)
    assert len(options) % 4 == 0 and len(options) <= 40
    data = bytes(build_segment(40000, 443, 1, 0, SYN, 65535, options))
    tcp = TcpHeader(data)
    assert tcp.mss == mss
    assert tcp.wscale == wscale
    assert tcp.sack_permitted is sack
    assert tcp.timestamps(data) == stamps
    parsed = dict((name, value) for name, value in TCP(data).options if name not in ("NOP", "EOL"))
    assert parsed["MSS"] == mss
    assert ("WScale" in parsed) is (wscale is not None)
    assert ("SAckOK" in parsed) is sack
    assert parsed.get("Timestamp") == stamps


def test_timestamp_option_is_the_rfc7323_appendix_a_layout():
    option = timestamp_option(0x1_0000_0005, -1)
    assert option == bytes((1, 1, 8, 10)) + struct.pack("!II", 5, 0xFFFFFFFF)


def test_build_segment_fields_and_payload():
    data = build_segment(443, 40000, 0x1_0000_0001, -1, ACK | PSH, 1234, timestamp_option(3, 4), b"hello")
    parsed = TCP(bytes(data))
    assert (parsed.sport, parsed.dport, parsed.seq, parsed.ack) == (443, 40000, 1, 0xFFFFFFFF)
    assert parsed.flags == "PA"
    assert parsed.window == 1234
    assert parsed.dataofs == 8
    assert bytes(parsed.payload) == b"hello"
    assert parsed.chksum == 0


def test_build_segment_rejects_unpadded_options():
    with pytest.raises(ValueError):
        build_segment(1, 2, 0, 0, SYN, 0, b"\x02\x04\x05")


@given(st.binary(max_size=301), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF))
def test_set_checksum_over_ipv4_matches_scapy(payload, seq, window):
    data = build_segment(443, 40000, seq, 1, ACK | PSH, window, timestamp_option(seq, 7), payload)
    set_checksum(data, V4(SERVICE).packed, V4(CLIENT).packed)
    packet = IP(src=SERVICE, dst=CLIENT) / TCP(bytes(data))
    built = IP(bytes(packet))
    fresh = built.copy()
    del fresh[TCP].chksum
    recomputed = IP(bytes(fresh))[TCP].chksum
    assert built[TCP].chksum % 0xFFFF == recomputed % 0xFFFF


@given(st.binary(max_size=301), st.integers(0, 0xFFFFFFFF))
def test_set_checksum_over_ipv6_matches_scapy(payload, seq):
    data = build_segment(40000, 443, seq, 0, SYN, 65535, syn_options(1440, 7, True, (seq, 0)), payload)
    set_checksum(data, V6(CLIENT6).packed, V6(HOST).packed)
    built = IPv6(bytes(IPv6(src=CLIENT6, dst=HOST) / TCP(bytes(data))))
    fresh = built.copy()
    del fresh[TCP].chksum
    recomputed = IPv6(bytes(fresh))[TCP].chksum
    assert built[TCP].chksum % 0xFFFF == recomputed % 0xFFFF


def test_set_checksum_ignores_what_the_field_held_before():
    data = build_segment(1, 2, 3, 4, ACK, 5, b"", b"xyz")
    first = bytes(set_checksum(data, V4(SERVICE).packed, V4(CLIENT).packed))
    data[16:18] = b"\x12\x34"
    assert bytes(set_checksum(data, V4(SERVICE).packed, V4(CLIENT).packed)) == first
