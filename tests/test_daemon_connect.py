"""A connect listener from the configuration file to the tracker: allow, ports and the routes' ports (issue #10)."""

from __future__ import annotations

import ipaddress
import random

from kracauer.config import parse_config
from kracauer.daemon import build_resolver, build_tracker, restart_needed, tracker_config
from netstack.connect import CONNECTION_ESTABLISHED, FORBIDDEN_CLIENT, FORBIDDEN_PORT, ConnectPolicy
from tests.test_tracker import HOST_ORG, HOST_WWW, Box, M32
from tests.test_tracker_connect import PROXY_PORT, ProxyWalk

CONFIG = """\
[tun]
offload = false  # the test box sends frames without vnet headers

[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 3128
protocol = "connect"
allow = ["198.51.100.0/24"]
ports = [443, 8443]

[[route]]
name = "www.example.com"
host = "2001:db8::10"

[[route]]
name = "*.example.org"
host = "2001:db8::20"
port = 9443
"""


class ConfigBox(Box):
    def __init__(self, text: str) -> None:
        self.now = 1000.0
        rng = random.Random(1)
        self.tracker = build_tracker(parse_config(text), lambda: rng.getrandbits(32))


def syn_towards(box: ConfigBox, head: bytes):
    walk = ProxyWalk(box, head=head)
    walk.handshake()
    return walk, walk.from_client("PA", walk.c + 1, walk.k + 1, head)


def test_the_configured_policy_reaches_the_tracker():
    config = parse_config(CONFIG)
    policies = tracker_config(config).connect_policies
    assert policies == {(ipaddress.IPv4Address("192.0.2.10").packed, PROXY_PORT):
                        ConnectPolicy.of([ipaddress.IPv4Network("198.51.100.0/24")], [443, 8443])}


def test_the_host_port_is_the_connects_unless_the_route_gives_one():
    box = ConfigBox(CONFIG)
    walk, out = syn_towards(box, b"CONNECT www.example.com:8443 HTTP/1.1\r\n\r\n")
    syn = walk.expect_host_syn(out)
    assert (syn.ip.dst, syn.tcp.dport) == (HOST_WWW, 8443)
    walk, out = syn_towards(ConfigBox(CONFIG), b"CONNECT api.example.org:443 HTTP/1.1\r\n\r\n")
    syn = walk.expect_host_syn(out)
    assert (syn.ip.dst, syn.tcp.dport) == (HOST_ORG, 9443)


def test_a_tunnel_through_a_tracker_built_from_the_config():
    box = ConfigBox(CONFIG)
    walk, out = syn_towards(box, b"CONNECT www.example.com:443 HTTP/1.1\r\n\r\n")
    walk.expect_host_syn(out)
    [answer] = [o for o in walk.host_synack() if o.v4]
    assert answer.payload == CONNECTION_ESTABLISHED and answer.tcp.seq == (walk.k + 1) & M32


def test_ports_outside_the_list_are_refused():
    box = ConfigBox(CONFIG)
    _, out = syn_towards(box, b"CONNECT www.example.com:22 HTTP/1.1\r\n\r\n")
    assert [o.payload for o in out] == [FORBIDDEN_PORT]


def test_a_reload_with_another_allow_list_needs_no_restart_and_applies_to_new_connections():
    old, new = parse_config(CONFIG), parse_config(CONFIG.replace("198.51.100.0/24", "203.0.113.0/24"))
    assert restart_needed(old, new) == []
    box = ConfigBox(CONFIG)
    box.tracker.reconfigure(tracker_config(new), build_resolver(new))
    _, out = syn_towards(box, b"CONNECT www.example.com:443 HTTP/1.1\r\n\r\n")
    assert [o.payload for o in out] == [FORBIDDEN_CLIENT]
