"""netstack.udptracker and netstack.udp: QUIC flows of a quic listener, datagram by datagram.

Client and host datagrams are built by scapy; every datagram the tracker
returns is parsed by scapy with its checksums recomputed (``parse``). The
QUIC payloads are real: captured first flights (tests/data/quic) and, for
whole connections, aioquic's client and server talking through the tracker
in memory (``Link``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import pathlib

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPerror6, UDPerror as UDPerror6
from scapy.packet import Raw

from netstack import quic
from netstack.peek import Decision
from netstack.tracker import Listener, Pending, Target, Tracker, TrackerConfig
from netstack.udp import UdpHeader, build_datagram, udp_checksum
from netstack.vnet import F_NEEDS_CSUM, PLAIN, VNET_HEADER, VNET_HEADER_LEN

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
PREFIX = V6("64:ff9b:1::").packed[:12]
CLIENT = "198.51.100.2"
CLIENT6 = "64:ff9b:1::c633:6402"
CLIENT_B = "203.0.113.9"
CLIENT_B6 = "64:ff9b:1::cb00:7109"
SERVICE = "192.0.2.10"
HOST_WWW = "2001:db8::10"
HOST_ORG = "2001:db8::20"
ROUTER4 = "192.0.2.254"

DATA = pathlib.Path(__file__).resolve().parent / "data" / "quic"
CAPTURES = {p.stem: json.loads(p.read_text()) for p in sorted(DATA.glob("*.json")) if p.stem != "rfc_vectors"}
DATAGRAMS = {name: [bytes.fromhex(d) for d in entry["datagrams"]] for name, entry in CAPTURES.items()}
CHROMIUM = DATAGRAMS["chromium"]  # www.example.com? see its "sni"
AIOQUIC = DATAGRAMS["aioquic"]

LISTENERS = [Listener(V4(SERVICE).packed, 443, "tls"), Listener(V4(SERVICE).packed, 443, "quic")]


def resolve(listener: Listener, decision: Decision):
    if decision.name == CAPTURES["chromium"]["sni"] or decision.name == "www.example.com":
        return Target(V6(HOST_WWW).packed, 443, "www")
    if decision.name is not None and decision.name.endswith(".example.org"):
        return Target(V6(HOST_ORG).packed, 8443, "org")
    if decision.name == "slow.example.net":
        return Pending("slow.example.net")
    return None


class Counter32:
    def __init__(self) -> None:
        self.n = 0x1234

    def __call__(self) -> int:
        self.n += 1
        return self.n


def make_tracker(**config) -> Tracker:
    return Tracker(TrackerConfig(prefix=PREFIX, **config), LISTENERS, resolve, Counter32())


def from_client(payload: bytes, sport: int = 50000, client: str = CLIENT, ttl: int = 64, tos: int = 0,
                checksum: int | None = None) -> bytes:
    udp = UDP(sport=sport, dport=443)
    if checksum is not None:
        udp.chksum = checksum
    return bytes(IP(src=client, dst=SERVICE, ttl=ttl, tos=tos, flags="DF") / udp / Raw(payload))


def from_host(payload: bytes, dport: int = 50000, dst: str = CLIENT6, host: str = HOST_WWW, sport: int = 443,
              hlim: int = 64, tc: int = 0, checksum: int | None = None) -> bytes:
    udp = UDP(sport=sport, dport=dport)
    if checksum is not None:
        udp.chksum = checksum
    return bytes(IPv6(src=host, dst=dst, hlim=hlim, tc=tc) / udp / Raw(payload))


def parse(packet: bytes):
    """scapy's view of a packet kracauer sent, after checking every checksum it carries."""
    if packet[0] >> 4 == 4:
        pkt = IP(packet)
        fresh = pkt.copy()
        del fresh.chksum
        if UDP in fresh:
            del fresh[UDP].chksum
        if ICMP in fresh:
            del fresh[ICMP].chksum
        rebuilt = IP(bytes(fresh))
        assert rebuilt.chksum == pkt.chksum
        if UDP in pkt and not pkt.haslayer(IPerror):
            assert rebuilt[UDP].chksum == pkt[UDP].chksum
        if ICMP in pkt:
            assert rebuilt[ICMP].chksum == pkt[ICMP].chksum
        return pkt
    pkt = IPv6(packet)
    fresh = pkt.copy()
    if UDP in fresh and not pkt.haslayer(IPerror6):
        assert pkt[UDP].chksum != 0  # RFC 8200 §8.1
        del fresh[UDP].chksum
    rebuilt = IPv6(bytes(fresh))
    if UDP in pkt and not pkt.haslayer(IPerror6):
        assert rebuilt[UDP].chksum == pkt[UDP].chksum
    return pkt


def decided_flow(tracker: Tracker, datagrams=None, sport: int = 50000, client: str = CLIENT):
    out = []
    for d in datagrams or AIOQUIC:
        out = tracker.receive(from_client(d, sport, client), 1.0)
    return out


# ================================================================ the codec


def test_udp_checksum_matches_scapys_for_ipv4_and_ipv6():
    payload = bytes(range(77))
    v4 = IP(bytes(IP(src=CLIENT, dst=SERVICE) / UDP(sport=1, dport=2) / Raw(payload)))
    v6 = IPv6(bytes(IPv6(src=CLIENT6, dst=HOST_WWW) / UDP(sport=1, dport=2) / Raw(payload)))
    for pkt, src, dst in ((v4, V4(CLIENT).packed, V4(SERVICE).packed), (v6, V6(CLIENT6).packed, V6(HOST_WWW).packed)):
        datagram = bytearray(bytes(pkt[UDP]))
        datagram[6:8] = b"\0\0"
        assert udp_checksum(src, dst, datagram) == pkt[UDP].chksum


def test_a_udp_length_past_the_ip_payload_is_malformed():
    with pytest.raises(ValueError):
        UdpHeader(bytes.fromhex("0001000200ff0000") + b"x" * 10)
    with pytest.raises(ValueError):
        UdpHeader(b"\0" * 7)


def test_build_datagram_is_a_valid_ipv4_udp_packet():
    pkt = parse(bytes(build_datagram(V4(SERVICE).packed, V4(CLIENT).packed, 443, 5000, b"hello")))
    assert (pkt.src, pkt.dst, pkt[UDP].sport, pkt[UDP].dport, bytes(pkt[UDP].payload)) == (
        SERVICE, CLIENT, 443, 5000, b"hello")


# ============================================================ peeking and binding


def test_chromiums_two_datagram_hello_is_held_then_both_go_to_the_host_in_order():
    tracker = make_tracker()
    first = tracker.receive(from_client(CHROMIUM[0], tos=0x02), 1.0)
    assert first == [] and tracker.absorbed["quic_hello_held"] == 1
    assert len(tracker.udp.peeking) == 1
    out = tracker.receive(from_client(CHROMIUM[1], ttl=9, tos=0x01), 1.1)
    assert len(out) == 2
    pkts = [parse(p) for p in out]
    assert [bytes(p[UDP].payload) for p in pkts] == CHROMIUM
    for pkt in pkts:
        assert (pkt.src, pkt.dst, pkt[UDP].sport, pkt[UDP].dport) == (CLIENT6, HOST_WWW, 50000, 443)
    # RFC 7915 §4.1: traffic class from TOS, ECN bits included; hop limit = TTL - 1.
    assert (pkts[0].tc, pkts[0].hlim) == (0x02, 63)
    assert (pkts[1].tc, pkts[1].hlim) == (0x01, 8)
    assert not tracker.udp.peeking and len(tracker.udp.hosts) == 1


def test_0rtt_datagrams_of_the_connection_are_held_with_the_hello_and_sent_after_it():
    tracker = make_tracker()
    tracker.receive(from_client(CHROMIUM[0]), 1.0)
    header = quic.parse_long_header(CHROMIUM[0])
    zero_rtt = bytes([0xD0]) + (1).to_bytes(4, "big") + bytes([len(header.dcid)]) + header.dcid + \
        bytes([len(header.scid)]) + header.scid + b"\x44\xd0" + bytes(1200)
    other = bytes([0xD0]) + (1).to_bytes(4, "big") + bytes([8]) + b"otherdci" + bytes([0]) + bytes(1200)
    assert tracker.receive(from_client(zero_rtt), 1.05) == []
    assert tracker.receive(from_client(other), 1.06) == []
    assert (tracker.absorbed["quic_0rtt_held"], tracker.drops["quic_not_initial"]) == (1, 1)
    out = tracker.receive(from_client(CHROMIUM[1]), 1.1)
    assert [bytes(parse(p)[UDP].payload) for p in out] == [CHROMIUM[0], zero_rtt, CHROMIUM[1]]


def test_a_bound_flow_is_translated_in_place_both_ways_with_valid_checksums():
    tracker = make_tracker()
    decided_flow(tracker)
    payload = bytes([0x40]) + bytes(range(200))  # a short header
    # ECN CE (0b11) in TOS travels to the traffic class (RFC 7915 §4.1).
    (up,) = tracker.receive(from_client(payload, tos=0xB3, ttl=30), 2.0)
    pkt = parse(up)
    assert (pkt.src, pkt.dst, pkt.tc, pkt.hlim, pkt.nh) == (CLIENT6, HOST_WWW, 0xB3, 29, 17)
    assert bytes(pkt[UDP].payload) == payload
    (down,) = tracker.receive(from_host(payload[::-1], tc=0x2A, hlim=50), 2.1)
    pkt = parse(down)
    assert (pkt.src, pkt.dst, pkt[UDP].sport, pkt[UDP].dport) == (SERVICE, CLIENT, 443, 50000)
    assert (pkt.tos, pkt.ttl) == (0x2A, 49)
    assert bytes(pkt[UDP].payload) == payload[::-1]


def test_a_client_datagram_without_checksum_gets_one_for_ipv6():
    tracker = make_tracker()
    decided_flow(tracker)
    (up,) = tracker.receive(from_client(b"\x40" + b"z" * 99, checksum=0), 2.0)
    assert parse(up)[UDP].chksum != 0


def test_a_corrupted_datagram_stays_detectably_corrupted():
    """RFC 1624 updates keep a wrong checksum wrong: the receiving stack drops what the path corrupted."""
    from netstack.checksum import ones_sum
    tracker = make_tracker()
    decided_flow(tracker)
    good = bytearray(from_client(b"\x40" + b"k" * 60))
    bad = bytearray(good)
    bad[40] ^= 0x01  # a payload bit flipped after the client computed the checksum
    for packet, valid in ((good, True), (bad, False)):
        (out,) = tracker.receive(bytes(packet), 2.0)
        pkt = IPv6(out)
        datagram = bytes(pkt[UDP])
        total = ones_sum(V6(pkt.src).packed + V6(pkt.dst).packed) + len(datagram) + 17 + ones_sum(datagram)
        assert (total % 0xFFFF == 0) is valid


def test_a_host_datagram_with_a_zero_checksum_is_dropped():
    tracker = make_tracker()
    decided_flow(tracker)
    assert tracker.receive(from_host(b"\x40abc", checksum=0), 2.0) == []
    assert tracker.drops["udp_zero_checksum"] == 1


def test_hop_limit_one_is_not_forwarded():
    tracker = make_tracker()
    decided_flow(tracker)
    assert tracker.receive(from_client(b"\x40" * 50, ttl=1), 2.0) == []
    assert tracker.receive(from_host(b"\x40" * 50, hlim=1), 2.0) == []
    assert tracker.drops["ttl_exceeded"] == 2


def test_vnet_partial_checksums_keep_the_pseudo_header_sum():
    tracker = make_tracker(vnet=True)
    for d in AIOQUIC:
        tracker.receive(PLAIN + from_client(d), 1.0)
    # A CHECKSUM_PARTIAL datagram: the field holds the pseudo-header sum only.
    payload = b"\x40" + b"p" * 120
    packet = bytearray(from_client(payload))
    ihl = 20
    from netstack.checksum import ones_sum
    pseudo = (ones_sum(packet[12:20]) + len(packet) - ihl + 17) % 0xFFFF
    packet[ihl + 6:ihl + 8] = pseudo.to_bytes(2, "big")
    vnet = VNET_HEADER.pack(F_NEEDS_CSUM, 0, 28, 0, ihl, 6)
    (out,) = tracker.receive(vnet + bytes(packet), 2.0)
    flags, _, _, _, csum_start, csum_offset = VNET_HEADER.unpack_from(out)
    assert (flags, csum_start, csum_offset) == (F_NEEDS_CSUM, 40, 6)
    v6 = bytearray(out[VNET_HEADER_LEN:])
    expected = (ones_sum(v6[8:40]) + len(v6) - 40 + 17) % 0xFFFF
    assert int.from_bytes(v6[46:48], "big") == expected
    # Finishing it as the kernel would (sum from csum_start, field included) gives scapy's checksum.
    from netstack.checksum import finish
    v6[46:48] = finish(ones_sum(v6[40:])).to_bytes(2, "big")
    parse(bytes(v6))


# ============================================================ what is never forwarded


@pytest.mark.parametrize("payload, reason", [
    (b"GET / HTTP/1.1\r\n" * 80, "quic_no_flow"),  # no long header: a short one of no known connection
    (b"\x80" * 1300, "quic_unsupported_version"),
    (b"\xc0\x00\x00\x00\x01" + b"\x08" + b"a" * 8 + b"\x00" + b"\x00" * 100, "quic_too_small"),
    (b"", "not_quic"),
])
def test_datagrams_that_are_no_readable_initial_make_no_flow(payload, reason):
    tracker = make_tracker()
    assert tracker.receive(from_client(payload), 1.0) == []
    assert tracker.drops[reason] == 1 and not tracker.udp.flows


def test_a_forged_initial_is_dropped_and_the_flow_reads_on():
    tracker = make_tracker()
    tracker.receive(from_client(CHROMIUM[0]), 1.0)
    forged = bytearray(CHROMIUM[1])
    forged[-20] ^= 0xFF
    assert tracker.receive(from_client(bytes(forged)), 1.1) == []
    assert tracker.drops["quic_undecryptable"] == 1
    assert len(tracker.receive(from_client(CHROMIUM[1]), 1.2)) == 2


def test_udp_to_no_listener_and_short_headers_of_no_flow_are_dropped():
    tracker = make_tracker()
    stray = bytes(IP(src=CLIENT, dst=SERVICE) / UDP(sport=5, dport=8443) / Raw(AIOQUIC[0]))
    assert tracker.receive(stray, 1.0) == []
    assert tracker.receive(from_client(b"\x40" + b"q" * 40), 1.0) == []
    assert tracker.receive(from_host(b"\x40abc"), 1.0) == []
    assert (tracker.drops["no_listener"], tracker.drops["quic_no_flow"], tracker.drops["no_connection"]) == (1, 1, 1)


def test_a_tcp_syn_to_the_quic_port_goes_to_the_tls_listener_not_the_quic_one():
    from scapy.layers.inet import TCP
    tracker = make_tracker()
    out = tracker.receive(bytes(IP(src=CLIENT, dst=SERVICE) / TCP(sport=4000, dport=443, flags="S", seq=1)), 1.0)
    assert len(out) == 1 and IP(out[0])[TCP].flags == "SA"
    only_quic = Tracker(TrackerConfig(prefix=PREFIX), [LISTENERS[1]], resolve, Counter32())
    assert only_quic.receive(bytes(IP(src=CLIENT, dst=SERVICE) / TCP(sport=4000, dport=443, flags="S")), 1.0) == []


# ============================================================ refusal


def test_an_unknown_name_gets_the_connection_close_from_the_service_address_and_the_flow_goes():
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import ConnectionTerminated
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["h3"],
                                                            server_name="nowhere.example.net"))
    client.connect((SERVICE, 443), now=0.0)
    tracker = make_tracker()
    out = []
    for datagram, _ in client.datagrams_to_send(now=0.0):
        out += tracker.receive(from_client(datagram), 0.0)
    (refusal,) = out
    pkt = parse(refusal)
    assert (pkt.src, pkt.dst, pkt[UDP].sport, pkt[UDP].dport) == (SERVICE, CLIENT, 443, 50000)
    client.receive_datagram(bytes(pkt[UDP].payload), (SERVICE, 443), now=0.05)
    client.handle_timer(now=client.get_timer())
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    assert any(isinstance(e, ConnectionTerminated) and e.error_code == 0x170 for e in events)
    assert not tracker.udp.flows
    (record,) = tracker.records
    assert (record.protocol, record.name, record.outcome, record.packets_to_client) == (
        "quic", "nowhere.example.net", "refused_unknown_name", 1)


# ============================================================ timers and caps


def test_a_bound_flow_idles_out_after_udp_idle_timeout_of_silence_only():
    tracker = make_tracker(udp_idle_timeout=60.0)
    decided_flow(tracker)
    tracker.receive(from_client(b"\x40" * 30), 50.0)
    tracker.on_timer(61.5)
    assert len(tracker.udp.flows) == 1  # seen at 50: due at 110
    assert tracker.next_timer() == pytest.approx(110.0)
    tracker.receive(from_host(b"\x40" * 30), 100.0)  # the host's datagrams count too
    tracker.on_timer(110.0)
    assert len(tracker.udp.flows) == 1
    tracker.on_timer(160.0)
    assert not tracker.udp.flows and not tracker.udp.hosts
    (record,) = tracker.records
    assert record.outcome == "idle_timeout" and record.packets_to_host == 2 and record.packets_to_client == 1
    assert record.bytes_to_host == len(AIOQUIC[0]) + 30 and record.bytes_to_client == 30
    # A quic listener's name says UDP: a TCP listener may have the same address and port.
    assert record.listener.endswith(":443/udp")
    assert (record.name, record.alpn, record.route, record.host, record.host_port) == (
        CAPTURES["aioquic"]["sni"], tuple(CAPTURES["aioquic"]["alpn"]), "www", HOST_WWW, 443)
    assert record.hello_segments == 1 and record.hello_size > 200


def test_a_peeking_flow_times_out_after_hello_timeout():
    tracker = make_tracker(hello_timeout=5.0)
    tracker.receive(from_client(CHROMIUM[0]), 1.0)
    assert tracker.next_timer() == 6.0
    tracker.on_timer(6.0)
    assert not tracker.udp.flows and tracker.records[0].outcome == "hello_timeout"


def test_past_udp_max_peeking_the_oldest_peeking_flow_goes():
    tracker = make_tracker(udp_max_peeking=1)
    tracker.receive(from_client(CHROMIUM[0], sport=1000), 1.0)
    tracker.receive(from_client(CHROMIUM[0], sport=1001), 1.1)
    assert list(f.client_port for f in tracker.udp.flows.values()) == [1001]
    assert tracker.events["peeking_evicted"] == 1 and tracker.records[0].outcome == "evicted_while_peeking"


def test_udp_peek_max_datagrams_and_bytes_refuse_a_hello_that_needs_more():
    tracker = make_tracker(udp_peek_max_datagrams=1)
    assert tracker.receive(from_client(CHROMIUM[0]), 1.0) == []
    assert tracker.drops["quic_bad_hello"] == 1 and not tracker.udp.flows
    assert len(tracker.receive(from_client(AIOQUIC[0], sport=7), 1.0)) == 1  # a one-datagram hello fits
    tracker = make_tracker(udp_peek_max_bytes=len(CHROMIUM[0]) + len(CHROMIUM[1]) - 1)
    assert tracker.receive(from_client(CHROMIUM[0]), 1.0) == []
    assert tracker.receive(from_client(CHROMIUM[1]), 1.1) == []
    assert tracker.drops["quic_bad_hello"] == 1 and tracker.records[0].outcome == "not_quic"
    assert not tracker.udp.flows


def test_a_pending_name_waits_with_its_datagrams_then_goes_on_resume():
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name="slow.example.net"))
    client.connect((SERVICE, 443), now=0.0)
    tracker = make_tracker()
    datagrams = [d for d, _ in client.datagrams_to_send(now=0.0)]
    for d in datagrams:
        assert tracker.receive(from_client(d), 0.0) == []
    global resolve
    old = resolve
    tracker.resolve = lambda lst, dec: Target(V6(HOST_ORG).packed, 443, "slow")
    out = tracker.resume("slow.example.net", 0.5)
    assert [bytes(parse(p)[UDP].payload) for p in out] == datagrams
    assert parse(out[0]).dst == HOST_ORG
    resolve = old


# ============================================================ ICMP


def test_a_packet_too_big_about_a_datagram_to_the_host_reaches_the_client_as_frag_needed():
    tracker = make_tracker()
    (sent,) = [p for p in decided_flow(tracker)]
    quote = bytes(sent)[:200]
    error = bytes(IPv6(src="2001:db8::1", dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1400) / Raw(quote))
    (out,) = tracker.receive(error, 2.0)
    pkt = parse(out)
    assert (pkt.src, pkt.dst, pkt[ICMP].type, pkt[ICMP].code, pkt[ICMP].nexthopmtu) == (SERVICE, CLIENT, 3, 4, 1380)
    inner = pkt[IPerror]
    assert (inner.src, inner.dst, inner[UDPerror].sport, inner[UDPerror].dport) == (CLIENT, SERVICE, 50000, 443)


def test_a_frag_needed_about_a_datagram_to_the_client_reaches_the_host_as_packet_too_big():
    tracker = make_tracker()
    decided_flow(tracker)
    (down,) = tracker.receive(from_host(b"\x40" + b"d" * 1300), 2.0)
    quote = bytes(down)[:28]
    error = bytes(IP(src=ROUTER4, dst=SERVICE) / ICMP(type=3, code=4, nexthopmtu=1300) / Raw(quote))
    (out,) = tracker.receive(error, 2.1)
    pkt = parse(out)
    assert (pkt.dst, pkt[ICMPv6PacketTooBig].mtu) == (HOST_WWW, 1320)
    assert pkt.src == str(V6(PREFIX + V4(ROUTER4).packed))
    inner = pkt[IPerror6]
    assert (inner.src, inner.dst, inner[UDPerror6].sport, inner[UDPerror6].dport) == (HOST_WWW, CLIENT6, 443, 50000)


def test_icmp_about_no_flow_is_dropped():
    tracker = make_tracker()
    quote = from_host(b"\x40" * 20)[:48]
    error = bytes(IPv6(src="2001:db8::1", dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1400) / Raw(quote))
    assert tracker.receive(error, 1.0) == [] and tracker.drops["icmp_no_connection"] == 1


# ============================================================ whole connections with aioquic


def _certificate():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("www.example.com")]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


class Link:
    """An aioquic client and server with the tracker between them; the clock is the test's."""

    def __init__(self, tracker: Tracker, server_name: str = "www.example.com") -> None:
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection
        self.tracker = tracker
        self.now = 0.0
        cert, key = _certificate()
        server_config = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
        server_config.certificate, server_config.private_key = cert, key
        self.server_config = server_config
        self.client = QuicConnection(configuration=QuicConfiguration(
            is_client=True, alpn_protocols=["h3"], server_name=server_name, verify_mode=0))
        self.server = None
        self.client_addr, self.client_port = CLIENT, 50000
        self.server_peers: list[tuple[str, int]] = []
        self.client.connect((SERVICE, 443), now=self.now)

    def pump(self, rounds: int = 20) -> None:
        from aioquic.quic.connection import QuicConnection
        for _ in range(rounds):
            moved = False
            for datagram, _ in self.client.datagrams_to_send(now=self.now):
                moved = True
                for packet in self.tracker.receive(from_client(datagram, self.client_port, self.client_addr),
                                                   self.now):
                    pkt = parse(packet)
                    if self.server is None:
                        header = quic.parse_long_header(bytes(pkt[UDP].payload))
                        self.server = QuicConnection(configuration=self.server_config,
                                                     original_destination_connection_id=header.dcid)
                    peer = (pkt.src, pkt[UDP].sport)
                    self.server_peers.append(peer)
                    self.server.receive_datagram(bytes(pkt[UDP].payload), peer, now=self.now)
            if self.server is not None:
                for datagram, addr in self.server.datagrams_to_send(now=self.now):
                    moved = True
                    packet = from_host(datagram, dport=addr[1], dst=addr[0])
                    for out in self.tracker.receive(packet, self.now):
                        pkt = parse(out)
                        self.client.receive_datagram(bytes(pkt[UDP].payload), (pkt.src, pkt[UDP].sport),
                                                     now=self.now)
            self.now += 0.01
            if not moved:
                break

    def events(self, conn) -> list:
        events = []
        while (event := conn.next_event()) is not None:
            events.append(event)
        return events


def test_an_aioquic_handshake_and_stream_data_go_through_to_the_host_by_name():
    from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
    link = Link(make_tracker())
    link.pump()
    assert any(isinstance(e, HandshakeCompleted) for e in link.events(link.client))
    link.client.send_stream_data(0, b"GET /", end_stream=True)
    link.pump()
    received = [e for e in link.events(link.server) if isinstance(e, StreamDataReceived)]
    assert b"".join(e.data for e in received) == b"GET /"
    assert set(link.server_peers) == {(CLIENT6, 50000)}
    assert link.tracker.udp.cids  # the server's SCID, learnt from its long-header packets


@pytest.mark.parametrize("new_addr, new_addr6", [(CLIENT, CLIENT6), (CLIENT_B, CLIENT_B6)], ids=["port", "address"])
def test_a_nat_rebinding_reaches_the_same_host_with_the_new_embedded_address(new_addr, new_addr6):
    from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
    link = Link(make_tracker())
    link.pump()
    assert any(isinstance(e, HandshakeCompleted) for e in link.events(link.client))
    link.pump(5)
    link.events(link.server)
    link.client_addr, link.client_port = new_addr, 61000
    link.client.send_stream_data(0, b"after the rebinding", end_stream=True)
    link.pump()
    received = [e for e in link.events(link.server) if isinstance(e, StreamDataReceived)]
    assert b"".join(e.data for e in received) == b"after the rebinding"
    assert (new_addr6, 61000) in link.server_peers
    assert link.tracker.events["quic_rebinding"] == 1
    assert len(link.tracker.udp.flows) == 2  # the old path idles out


def test_a_rebinding_learnt_by_another_worker_reaches_the_same_host():
    one, two = make_tracker(), make_tracker()
    one.udp.cid_changes = []
    decided_flow(one)
    host_cid = bytes(range(1, 9))
    handshake = bytes([0xE0]) + (1).to_bytes(4, "big") + bytes([4]) + b"dcid" + bytes([8]) + host_cid + bytes(30)
    one.receive(from_host(handshake), 1.5)
    ((cid, flow),) = one.udp.cid_changes
    assert cid == host_cid
    two.udp.learn_remote(json.loads(json.dumps(one.udp.export_cid(cid, flow))))
    (out,) = two.receive(from_client(b"\x41" + host_cid + b"1rtt" * 10, sport=62000), 2.0)
    pkt = parse(out)
    assert (pkt.src, pkt.dst, pkt[UDP].sport, pkt[UDP].dport) == (CLIENT6, HOST_WWW, 62000, 443)
    assert two.events["quic_rebinding"] == 1


# ============================================================ properties


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(payloads=st.lists(st.binary(max_size=1400) | st.sampled_from(CHROMIUM[:1] + [b"\x40" * 30, b"\xc0" * 1300]),
                         max_size=6),
       host_payloads=st.lists(st.binary(max_size=200), max_size=3))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_nothing_is_forwarded_for_datagrams_that_carry_no_whole_hello(payloads, host_payloads):
    """Whatever a client sends short of a whole ClientHello, and whatever a host sends to a client of
    no bound flow, nothing leaves kracauer (never an open relay)."""
    tracker = make_tracker()
    for i, payload in enumerate(payloads):
        assert tracker.receive(from_client(payload, sport=1000 + i % 2), 1.0 + i) == []
    for payload in host_payloads:
        assert tracker.receive(from_host(payload, dport=1000), 9.0) == []
    tracker.on_timer(100.0)
    assert not tracker.udp.flows and not tracker.udp.hosts and not tracker.udp.peeking


@given(sizes=st.lists(st.integers(0, 1400), min_size=1, max_size=8), tos=st.integers(0, 255),
       ttl=st.integers(2, 255), zero=st.booleans())
@settings(max_examples=100, deadline=None)
def test_every_bound_datagram_keeps_its_payload_and_gets_a_valid_checksum(sizes, tos, ttl, zero):
    tracker = make_tracker()
    decided_flow(tracker)
    for n, size in enumerate(sizes):
        payload = bytes((n + i) & 0xFF for i in range(size))
        (up,) = tracker.receive(from_client(payload, tos=tos, ttl=ttl, checksum=0 if zero else None), 2.0)
        pkt = parse(up)
        assert (bytes(pkt[UDP].payload), pkt.tc, pkt.hlim, pkt[UDP].len) == (payload, tos, ttl - 1, size + 8)
        (down,) = tracker.receive(from_host(payload, tc=tos, hlim=ttl), 2.0)
        pkt = parse(down)
        assert (bytes(pkt[UDP].payload), pkt.tos, pkt.ttl) == (payload, tos, ttl - 1)


HOST_CID = bytes(range(1, 9))
HOST_HANDSHAKE = bytes([0xE0]) + (1).to_bytes(4, "big") + bytes([4]) + b"dcid" + bytes([8]) + HOST_CID + bytes(30)


@st.composite
def hostile(draw):
    """A datagram or ICMP error around a bound flow whose host CID is known."""
    kind = draw(st.sampled_from(["client", "rebound", "host", "icmp4", "icmp6", "raw"]))
    payload = draw(st.binary(max_size=300))
    sport = draw(st.sampled_from([50000, 50001, 61000]))
    if kind == "client":
        # (A wrong checksum stays wrong: test_a_corrupted_datagram_stays_detectably_corrupted.)
        return from_client(payload, sport=sport, ttl=draw(st.integers(0, 255)),
                           checksum=draw(st.sampled_from([None, 0])))
    if kind == "rebound":
        return from_client(b"\x40" + HOST_CID[:draw(st.integers(0, 8))] + payload, sport=sport,
                           client=draw(st.sampled_from([CLIENT, CLIENT_B])))
    if kind == "host":
        return from_host(payload, dport=sport, hlim=draw(st.integers(0, 255)),
                         checksum=draw(st.sampled_from([None, 0])))
    if kind == "icmp4":
        quote = bytes(IP(src=SERVICE, dst=CLIENT) / UDP(sport=443, dport=sport) / Raw(payload))
        return bytes(IP(src=ROUTER4, dst=SERVICE) / ICMP(type=draw(st.sampled_from([3, 11, 12])),
                                                        code=draw(st.integers(0, 15)), nexthopmtu=1300)
                     / Raw(quote[:draw(st.integers(0, len(quote)))]))
    if kind == "icmp6":
        quote = bytes(IPv6(src=CLIENT6, dst=HOST_WWW) / UDP(sport=sport, dport=443) / Raw(payload))
        return bytes(IPv6(src="2001:db8::1", dst=CLIENT6) / ICMPv6PacketTooBig(mtu=draw(st.integers(0, 2**32 - 1)))
                     / Raw(quote[:draw(st.integers(0, len(quote)))]))
    return draw(st.binary(min_size=1, max_size=80))


@given(packets=st.lists(hostile(), max_size=12), vnet=st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_datagrams_around_a_bound_flow_get_only_well_formed_answers_and_leave_nothing(packets, vnet):
    tracker = make_tracker(vnet=vnet)
    frame = (lambda p: PLAIN + p) if vnet else (lambda p: p)
    for d in AIOQUIC:
        tracker.receive(frame(from_client(d)), 1.0)
    tracker.receive(frame(from_host(HOST_HANDSHAKE)), 1.1)
    for n, packet in enumerate(packets):
        for out in tracker.receive(frame(packet), 2.0 + n):
            pkt = parse(out[VNET_HEADER_LEN:] if vnet else out)
            if pkt.version == 6:
                assert pkt.dst == HOST_WWW and pkt.src in (CLIENT6, CLIENT_B6, str(V6(PREFIX + V4(ROUTER4).packed)))
            else:
                assert pkt.src == SERVICE and pkt.dst in (CLIENT, CLIENT_B)
        flows = {id(f) for f in tracker.udp.flows.values()}
        assert all(id(f) in flows for f in tracker.udp.hosts.values())
        assert all(id(f) in flows for f in tracker.udp.cids.values())
    tracker.on_timer(1e7)
    assert not tracker.udp.flows and not tracker.udp.hosts and not tracker.udp.cids and not tracker.udp.peeking


def test_a_reload_routes_new_flows_anew_and_bound_flows_keep_their_host():
    tracker = make_tracker()
    decided_flow(tracker, sport=1000)
    tracker.reconfigure(TrackerConfig(prefix=PREFIX, udp_idle_timeout=5.0),
                        lambda lst, dec: Target(V6(HOST_ORG).packed, 443, "moved"))
    (old,) = tracker.receive(from_client(b"\x40" * 20, sport=1000), 2.0)
    (new,) = decided_flow(tracker, sport=1001)
    assert (parse(old).dst, parse(new).dst) == (HOST_WWW, HOST_ORG)
    tracker.on_timer(7.5)  # the new idle timeout: the new flow's now, the old one's at its old deadline
    assert [f.client_port for f in tracker.udp.flows.values()] == [1000]
    tracker.on_timer(61.0)
    assert not tracker.udp.flows


def test_a_handshake_packet_from_a_new_port_is_a_rebinding_too():
    tracker = make_tracker()
    decided_flow(tracker)
    tracker.receive(from_host(HOST_HANDSHAKE), 1.1)
    handshake = bytes([0xE0]) + (1).to_bytes(4, "big") + bytes([8]) + HOST_CID + bytes([0]) + bytes(60)
    (out,) = tracker.receive(from_client(handshake, sport=50002), 1.2)
    assert (parse(out)[UDP].sport, parse(out).dst, tracker.events["quic_rebinding"]) == (50002, HOST_WWW, 1)
    stranger = bytes([0xE0]) + (1).to_bytes(4, "big") + bytes([8]) + b"unknown!" + bytes([0]) + bytes(60)
    assert tracker.receive(from_client(stranger, sport=50003), 1.3) == []
    assert tracker.drops["quic_not_initial"] == 1


def test_bound_flows_survive_a_restart_through_the_state_file_with_their_connection_ids():
    from netstack.state import decode, encode, restore, snapshot
    tracker = make_tracker()
    decided_flow(tracker, sport=1000)
    tracker.receive(from_host(HOST_HANDSHAKE, dport=1000), 1.1)
    tracker.receive(from_client(CHROMIUM[0], sport=1001), 1.2)  # still peeking: not saved
    state = decode(encode(snapshot(tracker, 10.0)))
    assert len(state["udp_flows"]) == 1
    again = make_tracker()
    assert restore(again, state, 500.0) == 1
    (up,) = again.receive(from_client(b"\x40" * 40, sport=1000), 501.0)
    assert (parse(up).src, parse(up).dst, parse(up)[UDP].sport) == (CLIENT6, HOST_WWW, 1000)
    (down,) = again.receive(from_host(b"\x40" * 40, dport=1000), 501.0)
    assert (parse(down).dst, parse(down)[UDP].dport) == (CLIENT, 1000)
    # The host's connection ID came along: a rebinding after the restart is followed.
    (moved,) = again.receive(from_client(b"\x41" + HOST_CID + b"x" * 30, sport=1002), 502.0)
    assert parse(moved)[UDP].sport == 1002 and again.events["quic_rebinding"] == 1
    # Ages carry over: the flow idles out udp_idle_timeout after its last datagram, as before.
    again.on_timer(600.0)
    assert not again.udp.flows
    record = next(r for r in again.records if r.client_port == 1000)
    assert record.packets_to_host == 2 and record.packets_to_client == 2 and record.name == CAPTURES["aioquic"]["sni"]
    # A worker keeps the flows that steer to it; a tracker without the listener skips them.
    other = make_tracker()
    assert restore(other, state, 500.0, keep=lambda addr, port: port != 1000) == 0
    tcp_only = Tracker(TrackerConfig(prefix=PREFIX), LISTENERS[:1], resolve, Counter32())
    assert restore(tcp_only, state, 500.0) == 0 and tcp_only.events["state_skipped"] == 1


def test_a_damaged_saved_quic_flow_is_an_error_that_leaves_the_tables_as_they_were():
    from netstack.state import StateError, restore, snapshot
    tracker = make_tracker()
    decided_flow(tracker)
    state = snapshot(tracker, 10.0)
    state["udp_flows"][0][1] = 0  # port 0
    again = make_tracker()
    with pytest.raises(StateError):
        restore(again, state, 50.0)
    assert not again.udp.flows and not again.udp.hosts


def test_flows_to_a_host_that_is_gone_end_with_host_gone():
    tracker = make_tracker()
    decided_flow(tracker, sport=1000)
    tracker.receive(from_host(HOST_HANDSHAKE, dport=1000), 1.1)
    assert tracker.reset_host(V6(HOST_ORG).packed, 2.0) == [] and len(tracker.udp.flows) == 1
    assert tracker.reset_host(V6(HOST_WWW).packed, 2.0) == []
    assert not tracker.udp.flows and not tracker.udp.hosts and not tracker.udp.cids
    assert tracker.records[-1].outcome == "host_gone" and tracker.events["host_gone_reset"] == 1
    assert tracker.receive(from_client(b"\x41" + HOST_CID + b"z" * 30, sport=1000), 3.0) == []
    assert tracker.drops["quic_no_flow"] == 1
