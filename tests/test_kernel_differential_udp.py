"""The BPF program's UDP path against netstack.udp: the same datagram and flow entry, the same bytes out.

quic listeners' flows enter the flow map with ``l4 = L4_UDP``
(netstack/udptracker.py); the program (kracauer/bpf/xlat.bpf.c, "UDP") then
translates their datagrams as ``netstack.udp.to_host`` / ``to_client`` do.
Both run here on the same scapy-built datagrams: everything after the
Ethernet header must match byte for byte, the checksum must be right (not only
equal), and what the program cannot take must come out unchanged with the
reason counted. Needs root and a kernel that loads the program; skips with the
reason otherwise (CI runs as root).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from netstack.flow import L4_TCP, L4_UDP, Flow, flow_key
from netstack.ip import IPv4Header, IPv6Header
from netstack.udp import UdpHeader, to_client, to_host
from tests.test_kernel_differential import CLIENT, HOST, SERVICE, SRC6, TC_ACT_OK, TC_ACT_REDIRECT, _load, eth, run

CLIENT_TEXT, SERVICE_TEXT = "198.51.100.7", "192.0.2.10"
HOST_TEXT, SRC6_TEXT = "2001:db8:1::10", "64:ff9b:1::c633:6407"


@pytest.fixture(scope="module")
def kernel():
    kp = _load()
    yield kp
    kp.close(keep=True)


def up_flow(**kw) -> Flow:
    """The client side's entry: the datagram goes to the host from prefix::client."""
    defaults = dict(src=SRC6, dst=HOST, sport=50000, dport=8443, mss=0)
    defaults.update(kw)
    return Flow(**defaults)


def down_flow(**kw) -> Flow:
    """The host side's entry: the datagram goes to the client from the service address."""
    defaults = dict(src=SERVICE, dst=CLIENT, sport=443, dport=50000, mss=0)
    defaults.update(kw)
    return Flow(**defaults)


def up_key(cport: int = 50000, sport: int = 443, l4: int = L4_UDP) -> bytes:
    return flow_key(CLIENT, SERVICE, struct.pack("!HH", cport, sport), l4)


def down_key(hport: int = 8443, sport: int = 50000, l4: int = L4_UDP) -> bytes:
    return flow_key(HOST, SRC6, struct.pack("!HH", hport, sport), l4)


def install(kernel, key: bytes, flow: Flow) -> None:
    assert kernel.flows.install(key, flow)


def client_datagram(payload: bytes = b"q" * 1200, sport: int = 50000, dport: int = 443, ttl: int = 63,
                    tos: int = 0, **ip) -> bytes:
    return bytes(IP(src=CLIENT_TEXT, dst=SERVICE_TEXT, ttl=ttl, tos=tos, **ip) / UDP(sport=sport, dport=dport) /
                 payload)


def host_datagram(payload: bytes = b"h" * 1200, sport: int = 8443, dport: int = 50000, hlim: int = 63,
                  tc: int = 0) -> bytes:
    return bytes(IPv6(src=HOST_TEXT, dst=SRC6_TEXT, hlim=hlim, tc=tc) / UDP(sport=sport, dport=dport) / payload)


def python_to_host(packet: bytes, flow: Flow) -> bytes:
    """netstack.udp.to_host on a copy, as UdpTracker._to_host calls it."""
    buf = bytearray(64) + bytearray(packet)
    ip = IPv4Header(memoryview(buf)[64:])
    udp = UdpHeader(memoryview(buf)[64 + ip.header_len:64 + ip.total_len])
    start = to_host(buf, 64, ip.header_len, ip.ttl, ip.tos, udp, flow.src, flow.dst, flow.sport, flow.dport,
                    partial=False)
    return bytes(buf[start:64 + ip.header_len + udp.length])


def python_to_client(packet: bytes, flow: Flow) -> bytes:
    """netstack.udp.to_client on a copy; the Identification is the flow's count so far, as in the program."""
    buf = bytearray(64) + bytearray(packet)
    ip = IPv6Header(memoryview(buf)[64:])
    udp = UdpHeader(memoryview(buf)[64 + 40:64 + 40 + ip.payload_len])
    start = to_client(buf, 64, ip.hop_limit, ip.traffic_class, udp, flow.src, flow.dst, flow.sport, flow.dport,
                      partial=False, ident=flow.packets)
    return bytes(buf[start:64 + 40 + udp.length])


def checksum_is_right(packet) -> bool:
    sent = packet[UDP].chksum
    del packet[UDP].chksum
    return type(packet)(bytes(packet))[UDP].chksum == sent


# ---------------------------------------------------------------- client to host

def test_a_client_datagram_is_translated_as_python_does(kernel):
    install(kernel, up_key(), up_flow())
    packet = client_datagram(tos=0xB9)  # DSCP 46 with ECN CE kept as traffic class
    result = run(kernel, eth(packet))
    assert result.retval == TC_ACT_REDIRECT
    assert result.data_out[14:] == python_to_host(packet, up_flow())
    out = IPv6(result.data_out[14:])
    assert (out.src, out.dst, out.nh, out.hlim, out.tc, out.fl) == (SRC6_TEXT, HOST_TEXT, 17, 62, 0xB9, 0)
    assert (out[UDP].sport, out[UDP].dport, out[UDP].len) == (50000, 8443, 1208)
    assert bytes(out[UDP].payload) == b"q" * 1200
    assert checksum_is_right(out)


def test_the_program_counts_the_datagrams_and_bytes_of_each_direction(kernel):
    install(kernel, up_key(50001), up_flow(sport=50001, packets=3, bytes=10))
    install(kernel, down_key(sport=50001), down_flow(dport=50001, packets=7))
    assert run(kernel, eth(client_datagram(b"a" * 1300, sport=50001))).retval == TC_ACT_REDIRECT
    assert run(kernel, eth(host_datagram(b"b" * 900, dport=50001))).retval == TC_ACT_REDIRECT
    assert run(kernel, eth(host_datagram(b"c" * 100, dport=50001))).retval == TC_ACT_REDIRECT
    up, down = kernel.flows.take(up_key(50001)), kernel.flows.take(down_key(sport=50001))
    assert (up.packets, up.bytes, down.packets, down.bytes) == (4, 1310, 9, 1000)
    assert up.last_seen > 0 and down.last_seen > 0
    # Nothing of TCP's tracking moves for a datagram.
    assert (up.ack_max, up.seq_next, up.window, up.window_max) == (0, 0, 0, 0)


def _options_packet() -> bytes:
    return bytes(IP(src=CLIENT_TEXT, dst=SERVICE_TEXT, options=[b"\x01\x01\x01\x00"]) /
                 UDP(sport=50000, dport=443) / (b"o" * 1200))


def _padded_packet() -> bytes:
    """A UDP length shorter than the IP payload (trailing bytes the datagram does not own)."""
    packet = bytearray(client_datagram(b"p" * 1200))
    struct.pack_into("!H", packet, 24, 8 + 1100)
    packet[26:28] = b"\x12\x34"
    return bytes(packet)


def _no_checksum_packet() -> bytes:
    packet = bytearray(client_datagram())
    packet[26:28] = b"\0\0"  # RFC 768: IPv4's "no checksum"; IPv6 needs one computed over it all
    return bytes(packet)


@pytest.mark.parametrize("why, packet, reason", [
    ("no checksum", _no_checksum_packet(), "pass_udp_checksum"),
    ("ttl", client_datagram(ttl=1), "pass_ttl"),
    ("ip options", _options_packet(), "pass_ip_options"),
    ("fragment", client_datagram(flags="MF"), "pass_fragment"),
    ("udp length", _padded_packet(), "pass_length"),
    ("no flow", client_datagram(sport=50999), "pass_no_flow"),
])
def test_what_the_program_cannot_take_from_a_client_goes_on_unchanged(kernel, why, packet, reason):
    install(kernel, up_key(), up_flow())
    frame = eth(packet)
    before = kernel.stats()[reason]
    result = run(kernel, frame)
    assert result.retval == TC_ACT_OK, why
    assert result.data_out == frame, why
    assert kernel.stats()[reason] == before + 1, why


def test_a_udp_gso_train_goes_to_python(kernel):
    install(kernel, up_key(), up_flow())
    packet = client_datagram(b"g" * 3000)
    before = kernel.stats()["pass_gso"]
    assert run(kernel, eth(packet), gso_size=1200).retval == TC_ACT_OK
    assert kernel.stats()["pass_gso"] == before + 1


def test_tcp_and_udp_entries_of_the_same_ports_are_apart(kernel):
    """The key's transport byte: a TCP entry never rewrites a datagram, nor a UDP entry a segment."""
    kernel.flows.take(up_key(50002))
    kernel.flows.take(up_key(50003, l4=L4_TCP))
    install(kernel, up_key(50002, l4=L4_TCP), up_flow(sport=50002, mss=1440))
    install(kernel, up_key(50003), up_flow(sport=50003))
    assert run(kernel, eth(client_datagram(sport=50002))).retval == TC_ACT_OK
    segment = bytes(IP(src=CLIENT_TEXT, dst=SERVICE_TEXT, ttl=63) / TCP(sport=50003, dport=443, flags="A"))
    assert run(kernel, eth(segment)).retval == TC_ACT_OK
    assert run(kernel, eth(client_datagram(sport=50003))).retval == TC_ACT_REDIRECT


def test_an_entry_naming_another_client_is_not_used(kernel):
    """A freed element reused for another connection (see the flows map's comment): the client must match."""
    install(kernel, up_key(50004), up_flow(src=SRC6[:12] + bytes([198, 51, 100, 8]), sport=50004))
    assert run(kernel, eth(client_datagram(sport=50004))).retval == TC_ACT_OK
    install(kernel, down_key(sport=50004), down_flow(dst=bytes([198, 51, 100, 8]), dport=50004))
    assert run(kernel, eth(host_datagram(dport=50004))).retval == TC_ACT_OK


# ---------------------------------------------------------------- host to client

def test_a_host_datagram_is_translated_as_python_does(kernel):
    flow = down_flow(packets=0x1_2345)
    install(kernel, down_key(), flow)
    packet = host_datagram(b"h" * 1400, tc=0x2A)
    result = run(kernel, eth(packet))
    assert result.retval == TC_ACT_REDIRECT
    assert result.data_out[14:] == python_to_client(packet, flow)
    out = IP(result.data_out[14:])
    assert (out.src, out.dst, out.proto, out.ttl, out.tos, out.id) == (SERVICE_TEXT, CLIENT_TEXT, 17, 62, 0x2A, 0x2345)
    assert out.flags == "DF"  # RFC 7915 §5.1: above 1260 bytes
    assert (out[UDP].sport, out[UDP].dport) == (443, 50000)
    assert checksum_is_right(out)


def test_a_small_host_datagram_leaves_without_df(kernel):
    flow = down_flow()
    install(kernel, down_key(), flow)
    packet = host_datagram(b"s" * 100)
    result = run(kernel, eth(packet))
    assert result.retval == TC_ACT_REDIRECT
    assert result.data_out[14:] == python_to_client(packet, flow)
    assert IP(result.data_out[14:]).flags == 0


def _zero_checksum_host_packet() -> bytes:
    packet = bytearray(host_datagram())
    packet[46:48] = b"\0\0"  # RFC 8200 §8.1: invalid in IPv6; Python drops it
    return bytes(packet)


@pytest.mark.parametrize("why, packet, reason", [
    ("zero checksum", _zero_checksum_host_packet(), "pass_udp_checksum"),
    ("hop limit", host_datagram(hlim=1), "pass_ttl"),
    ("no flow", host_datagram(dport=50999), "pass_no_flow"),
])
def test_what_the_program_cannot_take_from_a_host_goes_on_unchanged(kernel, why, packet, reason):
    install(kernel, down_key(), down_flow())
    frame = eth(packet)
    before = kernel.stats()[reason]
    result = run(kernel, frame)
    assert result.retval == TC_ACT_OK, why
    assert result.data_out == frame, why
    assert kernel.stats()[reason] == before + 1, why


# ---------------------------------------------------------------- checksums of 0

def test_a_checksum_that_comes_out_0_is_sent_as_ffff_both_ways(kernel):
    """RFC 768: a computed 0 is sent as all ones. The datagram's first word is chosen so that the
    translated datagram sums to 0 (its checksum with that word 0 is the word that cancels it)."""
    install(kernel, up_key(), up_flow())
    probe = IPv6(python_to_host(client_datagram(b"\0\0" + b"z" * 1198), up_flow()))
    word = probe[UDP].chksum
    packet = client_datagram(struct.pack("!H", word) + b"z" * 1198)
    assert IP(packet)[UDP].chksum != 0
    result = run(kernel, eth(packet))
    assert result.retval == TC_ACT_REDIRECT
    assert IPv6(result.data_out[14:])[UDP].chksum == 0xFFFF
    assert result.data_out[14:] == python_to_host(packet, up_flow())

    flow = down_flow()
    install(kernel, down_key(), flow)
    probe = IP(python_to_client(host_datagram(b"\0\0" + b"y" * 1198), flow))
    packet = host_datagram(struct.pack("!H", probe[UDP].chksum) + b"y" * 1198)
    result = run(kernel, eth(packet))
    assert result.retval == TC_ACT_REDIRECT
    assert IP(result.data_out[14:])[UDP].chksum == 0xFFFF
    assert result.data_out[14:] == python_to_client(packet, flow)


# ---------------------------------------------------------------- properties

ports = st.integers(1, 0xFFFF)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cport=ports, hport=ports, sport=ports, tos=st.integers(0, 255), ttl=st.integers(2, 255),
       payload=st.binary(min_size=0, max_size=1400))
def test_client_to_host_matches_python(kernel, cport, hport, sport, tos, ttl, payload):
    flow = up_flow(sport=sport, dport=hport)
    install(kernel, up_key(cport), flow)
    packet = client_datagram(payload, sport=cport, ttl=ttl, tos=tos)
    result = run(kernel, eth(packet))
    kernel.flows.take(up_key(cport))  # the test map holds 64 entries
    assert result.retval == TC_ACT_REDIRECT
    assert result.data_out[14:] == python_to_host(packet, flow)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hport=ports, sport=ports, cport=ports, tc=st.integers(0, 255), hlim=st.integers(2, 255),
       payload=st.binary(min_size=0, max_size=1400), packets=st.integers(0, 1 << 20))
def test_host_to_client_matches_python(kernel, hport, sport, cport, tc, hlim, payload, packets):
    flow = down_flow(dport=cport, packets=packets)
    install(kernel, down_key(hport, sport), flow)
    packet = host_datagram(payload, sport=hport, dport=sport, hlim=hlim, tc=tc)
    result = run(kernel, eth(packet))
    kernel.flows.take(down_key(hport, sport))
    assert result.retval == TC_ACT_REDIRECT
    assert result.data_out[14:] == python_to_client(packet, flow)
