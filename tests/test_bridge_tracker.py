"""The tracker's side of the TLS bridge: a bridge route's connections are spliced to kracauer's own
relay (Target.relay), and a connect listener's CONNECT head then goes to the relay unchanged;
daemon.build_resolver picks the relay address of the listener's protocol.

Built as test_tracker_connect's walks are (scapy packets, checksums checked). With a relay the
head is not the tracker's (../shared/design/bridge.md, "The bridge"): the host (the relay) gets
the client's own ISN ``c`` and the head replayed from ``c+1``; host→client numbers move by
``h - k`` as for any spliced connection, and the 200 is the relay's, from ``h+1``.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from kracauer.bridge import relay_addresses
from kracauer.config import parse_config
from kracauer.daemon import build_resolver, build_tracker
from netstack.connect import CONNECTION_ESTABLISHED, FORBIDDEN_NAME, ConnectPolicy
from netstack.peek import Decision
from netstack.state import restore, snapshot
from netstack.tracker import Listener, Target, Tracker, TrackerConfig
from tests.test_tracker import CHROME, CLIENT6, LISTENERS, M32, PREFIX, Box, Walk
from tests.test_tracker_connect import CURL, PROXY, PROXY_PORT, answers

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
RELAYS = relay_addresses(ipaddress.IPv6Network("64:ff9b:1::/96"))
RELAY_CONNECT = str(RELAYS["connect"])   # 64:ff9b:1::ffff:fffd
RELAY_TLS = str(RELAYS["tls"])           # 64:ff9b:1::ffff:ffff


def resolve(listener: Listener, decision: Decision) -> Target | None:
    """www.example.com is bridged (to the relay of the listener's protocol); nothing else has a route."""
    if decision.name != "www.example.com":
        return None
    relay = RELAYS["connect" if listener.protocol == "connect" else "tls"]
    port = decision.port if decision.port is not None else listener.port
    return Target(relay.packed, port, "bridged", relay=True)


class RelayBox(Box):
    def __init__(self) -> None:
        self.now = 1000.0
        rng = random.Random(1)
        policy = ConnectPolicy.of([ipaddress.IPv4Network("198.51.100.0/24")], [443])
        self.tracker = Tracker(TrackerConfig(prefix=PREFIX, connect_policies={(PROXY.address, PROXY.port): policy}),
                               [*LISTENERS, PROXY], resolve, lambda: rng.getrandbits(32))


def connect_walk(box: RelayBox, head: bytes = CURL + CHROME) -> tuple[Walk, object]:
    """Handshake, then the CONNECT head (and the ClientHello after it): the relay's SYN."""
    walk = Walk(box, dport=PROXY_PORT)
    walk.handshake()
    syn = walk.expect_host_syn(walk.from_client("PA", walk.c + 1, walk.k + 1, head))
    walk.head = head
    return walk, syn


def test_the_relay_gets_a_syn_with_the_clients_own_isn():
    walk, syn = connect_walk(RelayBox())
    # The head stays in the stream: the SYN carries c, not c + L as towards a host.
    assert (syn.ip.src, syn.ip.dst, syn.tcp.dport) == (CLIENT6, RELAY_CONNECT, 443)
    assert syn.tcp.seq == walk.c & M32


def test_the_connect_head_is_passed_to_the_relay_and_the_tracker_sends_no_200():
    box = RelayBox()
    walk, _ = connect_walk(box)
    to_client, to_host = answers(walk.host_synack())
    # The relay answers the CONNECT itself, once its peer did: nothing to the client yet.
    assert to_client == []
    replayed = b"".join(o.payload for o in to_host)
    assert replayed == CURL + CHROME
    assert to_host[0].tcp.seq == (walk.c + 1) & M32
    # The relay's 200 reaches the client from k+1 (host→client moves by h - k, no answer of our own).
    out = walk.from_host("PA", walk.h + 1, walk.c + 1 + len(walk.head), CONNECTION_ESTABLISHED, host_tick=3)
    [answer] = out
    assert answer.v4 and answer.payload == CONNECTION_ESTABLISHED
    assert (answer.tcp.seq, answer.tcp.ack) == ((walk.k + 1) & M32, (walk.c + 1 + len(walk.head)) & M32)
    # The record counts the head as the relay's bytes: it was passed through, not consumed.
    walk.from_client("FA", walk.c + 1 + len(walk.head), walk.k + 1 + len(CONNECTION_ESTABLISHED))
    walk.from_host("FA", walk.h + 1 + len(CONNECTION_ESTABLISHED), walk.c + 2 + len(walk.head), host_tick=4)
    walk.from_client("A", walk.c + 2 + len(walk.head), walk.k + 2 + len(CONNECTION_ESTABLISHED))
    [record] = box.tracker.records
    assert (record.protocol, record.name, record.route, record.host) == (
        "connect", "www.example.com:443", "bridged", RELAY_CONNECT)
    assert record.outcome == "closed"
    assert record.bytes_to_client == len(CONNECTION_ESTABLISHED)


def test_a_name_without_a_route_is_still_refused_by_the_tracker():
    box = RelayBox()
    walk = Walk(box, dport=PROXY_PORT)
    walk.handshake()
    head = b"CONNECT nowhere.example.com:443 HTTP/1.1\r\n\r\n"
    [out] = walk.from_client("PA", walk.c + 1, walk.k + 1, head)
    assert out.v4 and out.payload == FORBIDDEN_NAME


def test_a_tls_connection_to_the_relay_is_replayed_like_one_to_a_host():
    box = RelayBox()
    walk = Walk(box)
    walk.handshake()
    syn = walk.expect_host_syn(walk.send_hello(CHROME))
    assert (syn.ip.dst, syn.tcp.dport, syn.tcp.seq) == (RELAY_TLS, 443, walk.c & M32)
    replay = walk.host_synack()
    assert b"".join(o.payload for o in replay if not o.v4) == CHROME


def test_a_relay_tunnel_saved_while_connecting_is_not_answered_by_the_tracker_after_a_restart():
    # The relay answers the CONNECT: a restart must not turn its connection into one the
    # tracker answers itself (the client would get two 200s, the relay the head it never acknowledged).
    box = RelayBox()
    walk, _ = connect_walk(box)
    saved = snapshot(box.tracker, box.now)
    again = RelayBox()
    restore(again.tracker, saved, again.now)
    walk.box = again
    to_client, to_host = answers(walk.host_synack())
    assert to_client == []
    assert b"".join(o.payload for o in to_host) == CURL + CHROME


# ---------------------------------------------------------------- from the configuration

CONFIG = """\
[tun]
offload = false  # the test box sends frames without vnet headers

[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"

[[listen]]
address = "192.0.2.10"
port = 80
protocol = "http"

[[listen]]
address = "192.0.2.10"
port = 3128
protocol = "connect"
allow = ["198.51.100.0/24"]

[[listen]]
address = "192.0.2.11"
port = 443
protocol = "tls"
prefix = "64:ff9b:2::/96"

[[bridge]]
name = "provider"
address = "203.0.113.20:4443"
server_name = "bridge.example.com"
ca = "/etc/kracauer/peer-ca.pem"
cert = "/etc/kracauer/ingress.pem"
key = "/etc/kracauer/ingress.key"

[[route]]
name = "*.service.example.com"
bridge = "provider"

[[route]]
name = "www.example.com"
host = "2001:db8::10"
"""


def listener(config, address: str, port: int):
    return next(lst for lst in config.listeners if lst.address == V4(address) and lst.port == port)


@pytest.mark.parametrize("address,port,protocol,decision", [
    ("192.0.2.10", 443, "tls", Decision(name="a.service.example.com", hello_size=517)),
    ("192.0.2.10", 80, "http", Decision(name="a.service.example.com", hello_size=80)),
    ("192.0.2.10", 3128, "connect", Decision(name="a.service.example.com", hello_size=60, port=443)),
    # A listener with a prefix of its own still uses the relay of the translate prefix: the one on the TUN.
    ("192.0.2.11", 443, "tls", Decision(name="a.service.example.com", hello_size=517)),
])
def test_build_resolver_gives_the_relay_of_the_listeners_protocol(address, port, protocol, decision):
    config = parse_config(CONFIG)
    lst = listener(config, address, port)
    resolve = build_resolver(config)
    target = resolve(Listener(lst.address.packed, lst.port, lst.protocol), decision)
    assert target.relay is True and target.route == "*.service.example.com"
    assert target.hosts == (RELAYS[protocol].packed,) and target.host == RELAYS[protocol].packed
    assert target.port == (443 if protocol == "connect" else port)  # a CONNECT's port, or the listener's


def test_build_resolver_gives_a_host_route_no_relay():
    config = parse_config(CONFIG)
    lst = listener(config, "192.0.2.10", 443)
    target = build_resolver(config)(Listener(lst.address.packed, 443, "tls"), Decision(name="www.example.com",
                                                                                        hello_size=517))
    assert target.relay is False and target.host == V6("2001:db8::10").packed


def test_the_relay_addresses_differ_per_protocol_and_no_client_can_have_them():
    # prefix + 255.255.255.x: limited broadcast and its neighbours (RFC 919 §7, RFC 1122 §3.2.1.3:
    # never a source), so no prefix::client is ever a relay.
    assert len(set(RELAYS.values())) == 3
    for address in RELAYS.values():
        assert int(address) & 0xFFFFFFFF >= 0xFFFFFFFD and address in ipaddress.IPv6Network("64:ff9b:1::/96")


def test_a_connect_through_a_tracker_built_from_the_config_goes_to_the_relay_unanswered():
    rng = random.Random(1)
    config = parse_config(CONFIG)
    box = Box.__new__(Box)
    box.now = 1000.0
    box.tracker = build_tracker(config, lambda: rng.getrandbits(32))
    walk = Walk(box, dport=PROXY_PORT)
    walk.handshake()
    head = b"CONNECT a.service.example.com:443 HTTP/1.1\r\nHost: a.service.example.com:443\r\n\r\n"
    syn = walk.expect_host_syn(walk.from_client("PA", walk.c + 1, walk.k + 1, head))
    assert (syn.ip.dst, syn.tcp.dport, syn.tcp.seq) == (RELAY_CONNECT, 443, walk.c & M32)
    to_client, to_host = answers(walk.host_synack())
    assert to_client == [] and b"".join(o.payload for o in to_host) == head
