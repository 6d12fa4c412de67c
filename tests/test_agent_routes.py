"""Agents' names as routes (kracauer.routing ``dynamic``, kracauer.daemon.build_resolver) and
Tracker.reset_host: what happens to connections through an agent that went away."""

from __future__ import annotations

import ipaddress

from kracauer.config import Route, parse_config
from kracauer.daemon import build_resolver, tracker_listeners
from kracauer.routing import Router
from netstack.peek import Decision
from netstack.tracker import Target
from tests.test_tracker import CHROME, Box, Walk

V6 = ipaddress.IPv6Address
AGENT1, AGENT2 = V6("fd00:6b72::2"), V6("fd00:6b72::3")


def dyn(name: str, *hosts: V6) -> Route:
    return Route(name=name, host=hosts[0], hosts=hosts)


def configured(name: str, host: str = "2001:db8::10") -> Route:
    return Route(name=name, host=V6(host), hosts=(V6(host),))


def test_a_configured_route_of_the_same_name_wins_over_an_agent():
    router = Router([configured("app.example.com"), configured("*.dev.example.com")], None,
                    [dyn("app.example.com", AGENT1), dyn("*.dev.example.com", AGENT1)])
    assert router.lookup("app.example.com", 443).host == V6("2001:db8::10")
    assert router.lookup("x.dev.example.com", 443).host == V6("2001:db8::10")


def test_an_agents_exact_name_beats_a_configured_wildcard_and_the_fallback():
    from kracauer.config import Fallback

    router = Router([configured("*.example.com")], Fallback(V6("2001:db8::99"), None, (V6("2001:db8::99"),)),
                    [dyn("app.example.com", AGENT1), dyn("*.dev.example.org", AGENT2)])
    assert router.lookup("app.example.com", 443).host == AGENT1
    assert router.lookup("other.example.com", 443).host == V6("2001:db8::10")
    assert router.lookup("a.dev.example.org", 443).host == AGENT2
    assert router.lookup("dev.example.org", 443).route == "fallback"


def test_a_longer_configured_wildcard_beats_a_shorter_agent_wildcard():
    router = Router([configured("*.b.example.com")], None, [dyn("*.example.com", AGENT1)])
    assert router.lookup("a.b.example.com", 443).host == V6("2001:db8::10")
    assert router.lookup("a.c.example.com", 443).host == AGENT1


def test_the_resolver_carries_every_agent_of_a_name_and_the_listeners_port():
    config = parse_config("""
[translate]
prefix = "64:ff9b:1::/96"
[[listen]]
address = "192.0.2.10"
port = 8443
protocol = "tls"
[[route]]
name = "www.example.com"
host = "2001:db8::10"
""")
    tls = tracker_listeners(config)[0]
    resolve = build_resolver(config, agents={"shared.example.org": (AGENT1, AGENT2)})
    target = resolve(tls, Decision("shared.example.org"))
    assert target.hosts == (AGENT1.packed, AGENT2.packed) and target.port == 8443
    assert target.route == "shared.example.org"
    assert resolve(tls, Decision("www.example.com")).host == V6("2001:db8::10").packed
    # Without the agents, the name is unknown again.
    assert build_resolver(config, agents={})(tls, Decision("shared.example.org")) is None


# -- Tracker.reset_host ------------------------------------------------------------------

AGENT_A, AGENT_B = "fd00:6b72::2", "fd00:6b72::3"


def agent_box(*hosts: str) -> Box:
    box = Box()
    packed = tuple(V6(h).packed for h in hosts)
    box.tracker.resolve = lambda listener, decision: Target(packed[0], 443, "app.example.org", packed)
    return box


def test_an_established_connection_through_a_gone_host_ends_with_an_rst_the_client_accepts():
    box = agent_box(AGENT_A)
    walk = Walk(box)
    walk.establish()
    host = walk.host
    out = [parse_out for parse_out in box.tracker.reset_host(V6(host).packed, box.now)]
    assert len(out) == 1
    from tests.test_tracker import parse

    rst = parse(out[0])
    assert rst.v4 and rst.flags == "RA"
    # Exactly the client's RCV.NXT (RFC 5961 §3.2): what the host sent, in the client's sequence space.
    assert rst.tcp.seq == (walk.k + 1) & 0xFFFFFFFF
    assert rst.tcp.ack == (walk.c + 1 + len(CHROME)) & 0xFFFFFFFF
    assert box.connections == 0
    assert box.tracker.records[-1].outcome == "host_gone"
    assert box.tracker.events["host_gone_reset"] == 1


def test_a_connection_still_connecting_to_a_gone_host_moves_to_the_next_one():
    box = agent_box(AGENT_A, AGENT_B)
    walk = Walk(box)
    walk.handshake()
    syn = walk.expect_host_syn(walk.send_hello(CHROME))
    first = syn.ip.dst
    from tests.test_tracker import parse

    out = [parse(raw) for raw in box.tracker.reset_host(V6(first).packed, box.now)]
    assert len(out) == 1 and not out[0].v4 and out[0].flags == "S" and out[0].ip.dst != first
    assert box.connections == 1


def test_a_connection_still_connecting_to_its_only_host_is_reset():
    box = agent_box(AGENT_A)
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    from tests.test_tracker import parse

    out = [parse(raw) for raw in box.tracker.reset_host(V6(AGENT_A).packed, box.now)]
    assert len(out) == 1 and out[0].v4 and "R" in out[0].flags
    assert box.connections == 0


def test_connections_to_other_hosts_are_left_alone():
    box = agent_box(AGENT_A)
    walk = Walk(box)
    walk.establish()
    assert box.tracker.reset_host(V6(AGENT_B).packed, box.now) == []
    assert box.connections == 1
