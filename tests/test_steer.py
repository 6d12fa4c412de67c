"""Queue steering: netstack.steer, and the BPF program it mirrors (kracauer/bpf/steer.bpf.c).

Both directions of a connection, and ICMP errors about it, must name the
same client (and so the same worker); the program, run with
BPF_PROG_TEST_RUN on the same packets, must answer what netstack.steer
computes. The program test needs root (CI is root) and skips otherwise.
"""

from __future__ import annotations

import ipaddress
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from netstack.flow import flow_key
from netstack.steer import flow_key_owner, packet_key, packet_queue, queue_of, steer_hash

CLIENT = "198.51.100.7"
SERVICE = "192.0.2.10"
HOST = "2001:db8::10"
PREFIX = "64:ff9b:1::"


def embedded(client: str) -> str:
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address(PREFIX)) | int(ipaddress.IPv4Address(client))))


def client_packet(client: str = CLIENT, sport: int = 40000) -> bytes:
    return bytes(IP(src=client, dst=SERVICE) / TCP(sport=sport, dport=443, flags="S"))


def host_packet(client: str = CLIENT, dport: int = 40000) -> bytes:
    return bytes(IPv6(src=HOST, dst=embedded(client)) / TCP(sport=443, dport=dport, flags="SA"))


def test_both_directions_of_a_connection_name_the_client():
    client = ipaddress.IPv4Address(CLIENT).packed
    assert packet_key(client_packet()) == (client, 40000)
    assert packet_key(host_packet()) == (client, 40000)
    assert packet_key(bytes(IP(src=CLIENT, dst=SERVICE) / UDP(sport=5353, dport=443))) == (client, 5353)


def test_icmp_errors_steer_by_the_connection_they_quote():
    client = ipaddress.IPv4Address(CLIENT).packed
    # A router on the client's side: kracauer's packet to the client (service -> client) is quoted.
    sent_to_client = IP(src=SERVICE, dst=CLIENT) / TCP(sport=443, dport=40000, flags="A")
    icmp4 = IP(src="203.0.113.1", dst=SERVICE) / ICMP(type=3, code=4) / bytes(sent_to_client)[:28]
    assert packet_key(bytes(icmp4)) == (client, 40000)
    # A router on the hosts' side: kracauer's packet to the host (prefix::client -> host) is quoted.
    sent_to_host = IPv6(src=embedded(CLIENT), dst=HOST) / TCP(sport=40000, dport=443, flags="A")
    icmp6 = IPv6(src="2001:db8::1", dst=embedded(CLIENT)) / ICMPv6PacketTooBig(mtu=1280) / bytes(sent_to_host)
    assert packet_key(bytes(icmp6)) == (client, 40000)
    unreach = IPv6(src="2001:db8::1", dst=embedded(CLIENT)) / ICMPv6DestUnreach() / bytes(sent_to_host)
    assert packet_key(bytes(unreach)) == (client, 40000)


def test_both_directions_of_a_quic_flow_and_icmp_about_it_name_the_client():
    """quic listeners (netstack.udptracker): UDP steers like TCP, both ways, and so do errors quoting it."""
    client = ipaddress.IPv4Address(CLIENT).packed
    up = IP(src=CLIENT, dst=SERVICE) / UDP(sport=51000, dport=443) / Raw(b"\xc0" + bytes(1250))
    down = IPv6(src=HOST, dst=embedded(CLIENT)) / UDP(sport=443, dport=51000) / Raw(b"\x40" + bytes(100))
    assert packet_key(bytes(up)) == packet_key(bytes(down)) == (client, 51000)
    sent_to_client = IP(src=SERVICE, dst=CLIENT) / UDP(sport=443, dport=51000) / Raw(b"\x40" * 40)
    icmp4 = IP(src="203.0.113.1", dst=SERVICE) / ICMP(type=3, code=4) / bytes(sent_to_client)[:28]
    sent_to_host = IPv6(src=embedded(CLIENT), dst=HOST) / UDP(sport=51000, dport=443) / Raw(b"\x40" * 40)
    icmp6 = IPv6(src="2001:db8::1", dst=embedded(CLIENT)) / ICMPv6PacketTooBig(mtu=1280) / bytes(sent_to_host)
    assert packet_key(bytes(icmp4)) == packet_key(bytes(icmp6)) == (client, 51000)


def test_what_cannot_be_keyed_goes_to_queue_0():
    assert packet_key(bytes(IP(src=CLIENT, dst=SERVICE) / ICMP(type=8))) is None  # echo request
    assert packet_key(b"") is None
    assert packet_key(bytes(IP(src=CLIENT, dst=SERVICE, proto=47) / Raw(b"gre!"))) is None
    assert packet_queue(bytes(IP(src=CLIENT, dst=SERVICE) / ICMP(type=8)), 4) == 0


def test_queues_spread_clients_and_ports():
    rng = random.Random(7)
    counts = [0, 0, 0, 0]
    for _ in range(4000):
        client = rng.getrandbits(32).to_bytes(4, "big")
        counts[queue_of(client, rng.randrange(1024, 65536), 4)] += 1
    assert min(counts) > 800, counts  # 1000 each on average
    # One client, many ports (a NAT): spread too.
    one = ipaddress.IPv4Address(CLIENT).packed
    assert len({queue_of(one, port, 2) for port in range(40000, 40010)}) == 2
    assert queue_of(one, 40000, 1) == 0


def test_both_flow_map_entries_of_a_connection_have_one_owner():
    client = ipaddress.IPv4Address(CLIENT).packed
    service = ipaddress.IPv4Address(SERVICE).packed
    up = flow_key(client, service, (40001).to_bytes(2, "big") + (443).to_bytes(2, "big"))
    down = flow_key(ipaddress.IPv6Address(HOST).packed, ipaddress.IPv6Address(embedded(CLIENT)).packed,
                    (443).to_bytes(2, "big") + (40001).to_bytes(2, "big"))
    for queues in (2, 3, 8):
        assert flow_key_owner(up, queues) == flow_key_owner(down, queues) == queue_of(client, 40001, queues)


# -- the BPF program -------------------------------------------------------------------

@pytest.fixture(scope="module")
def steering():
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    from kracauer.steering import Steering, SteeringError

    try:
        s = Steering.load()
    except SteeringError as exc:
        pytest.skip(f"the steering program does not load here: {exc}")
    yield s
    s.close()


def run_program(steering, packet: bytes) -> int:
    from kracauer.bpf.libbpf import prog_test_run

    # A socket filter's test run takes an Ethernet frame and hands the program the packet after it.
    ether = Ether(type=0x86DD if packet and packet[0] >> 4 == 6 else 0x0800)
    return prog_test_run(steering.prog_fd, bytes(ether) + packet).retval


def expected(packet: bytes) -> int:
    key = packet_key(packet)
    return 0 if key is None else steer_hash(*key)


def test_program_answers_what_netstack_steer_computes_for_each_kind(steering):
    sent_to_client = IP(src=SERVICE, dst=CLIENT) / TCP(sport=443, dport=40000, flags="A")
    sent_to_host = IPv6(src=embedded(CLIENT), dst=HOST) / TCP(sport=40000, dport=443, flags="A")
    packets = [
        client_packet(), host_packet(),
        bytes(IP(src=CLIENT, dst=SERVICE) / UDP(sport=5353, dport=443)),
        bytes(IP(src="203.0.113.1", dst=SERVICE) / ICMP(type=3, code=4) / bytes(sent_to_client)[:28]),
        bytes(IP(src="203.0.113.1", dst=SERVICE) / ICMP(type=11) / bytes(sent_to_client)[:28]),
        bytes(IPv6(src="2001:db8::1", dst=embedded(CLIENT)) / ICMPv6PacketTooBig(mtu=1280) / bytes(sent_to_host)),
        bytes(IP(src=CLIENT, dst=SERVICE) / ICMP(type=8)),
        bytes(IP(src=CLIENT, dst=SERVICE, options=b"\x01\x01\x01\x00") / TCP(sport=1234, dport=443)),
        # quic listeners' UDP, both ways, and an error about a datagram sent to a host.
        bytes(IPv6(src=HOST, dst=embedded(CLIENT)) / UDP(sport=443, dport=5353) / Raw(b"\x40" * 30)),
        bytes(IPv6(src="2001:db8::1", dst=embedded(CLIENT)) / ICMPv6PacketTooBig(mtu=1280)
              / bytes(IPv6(src=embedded(CLIENT), dst=HOST) / UDP(sport=5353, dport=443) / Raw(b"\x40" * 30))),
    ]
    for packet in packets:
        assert run_program(steering, packet) == expected(packet), IP(packet) if packet[0] >> 4 == 4 else packet
    # It answers the client, both ways.
    assert run_program(steering, client_packet()) == run_program(steering, host_packet()) != 0


@given(client=st.integers(0, 2**32 - 1), port=st.integers(0, 65535), v6=st.booleans(), cut=st.integers(0, 60))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_program_matches_netstack_steer_on_any_client_and_truncation(steering, client, port, v6, cut):
    address = str(ipaddress.IPv4Address(client))
    packet = host_packet(address, port) if v6 else client_packet(address, port)
    # A packet routed into the TUN has its whole IP header (and BPF_PROG_TEST_RUN wants one);
    # what follows may be cut anywhere.
    packet = packet[:max(len(packet) - cut, 40 if v6 else 20)]
    assert run_program(steering, packet) == expected(packet)
