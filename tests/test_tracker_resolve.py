"""netstack.tracker: routes whose hosts are looked up (route by DNS), walked packet by packet.

The resolver here is a stand-in for kracauer.daemon.build_resolver over
kracauer.resolver: names it has no answer for give ``Pending(name)`` (and are
counted as lookups asked for); the test then plays the answer's arrival with
``Tracker.resume(name, now)``, as the daemon does when the services thread
posts it. While a name is pending the hello must stay unacknowledged (the
client keeps it for retransmission), and the hello timeout still applies.
"""

from __future__ import annotations

import ipaddress

import pytest

from netstack import http, tls
from netstack.connect import FORBIDDEN_NAME
from netstack.peek import Decision
from netstack.tracker import PEEKING, Listener, Pending, Refused, Target
from tests.test_tracker import CHROME, HOST_ORG, HOST_WWW, M32, Box, Walk, parse
from tests.test_tracker_connect import ConnectBox, ProxyWalk

V6 = ipaddress.IPv6Address
HELLO_TIMEOUT = 10.0


class Lookups:
    """A resolver whose answers the test gives: Target, Refused, or nothing yet (Pending)."""

    def __init__(self) -> None:
        self.answers: dict[str, Target | Refused] = {}
        self.asked: list[str] = []

    def __call__(self, listener: Listener, decision: Decision) -> Target | Pending | Refused | None:
        name = decision.name
        if name is None:
            return None
        if name in self.answers:
            answer = self.answers[name]
            if isinstance(answer, Target) and decision.port is not None:
                return Target(answer.host, decision.port, answer.route, answer.hosts)
            return answer
        self.asked.append(name)
        return Pending(name)


def resolving_box(**config) -> tuple[Box, Lookups]:
    box = Box(**config)
    lookups = Lookups()
    box.tracker.resolve = lookups
    return box, lookups


def resume(box: Box, name: str) -> list:
    return [parse(raw) for raw in box.tracker.resume(name, box.now)]


def www_target() -> Target:
    return Target(V6(HOST_WWW).packed, 443, "*.example.com", (V6(HOST_WWW).packed, V6(HOST_ORG).packed))


def test_a_pending_name_keeps_the_hello_unacknowledged_until_the_answer_then_binds():
    box, lookups = resolving_box()
    walk = Walk(box)
    walk.handshake()
    assert walk.send_hello(CHROME) == []  # nothing to the client, nothing to a host
    assert lookups.asked == ["www.example.com"]
    [conn] = box.tracker.clients.values()
    assert conn.state == PEEKING
    assert list(box.tracker.waiting) == ["www.example.com"]
    box.now += 0.03
    lookups.answers["www.example.com"] = www_target()
    syn = walk.expect_host_syn(resume(box, "www.example.com"))
    assert syn.ip.dst in (HOST_WWW, HOST_ORG)
    assert syn.tcp.seq == walk.c & M32  # the client's own ISN (DESIGN.md step 3)
    assert box.tracker.waiting == {} and box.tracker.peeking == {}
    replay = walk.host_synack()
    assert b"".join(out.payload for out in replay) == CHROME


def test_a_retransmitted_hello_while_pending_is_absorbed_not_acknowledged():
    box, lookups = resolving_box()
    walk = Walk(box)
    walk.handshake()
    walk.send_hello(CHROME)
    box.now += 1.0
    # The client's retransmission timer fires: it resends its first unacknowledged segment.
    assert walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:700]) == []
    assert walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:700]) == []
    assert lookups.asked == ["www.example.com"]
    assert box.tracker.absorbed["hello_buffered_resolving"] >= 2


def test_many_connections_for_one_name_wait_on_one_key_and_all_go_on_when_it_is_answered():
    box, lookups = resolving_box()
    walks = [Walk(box, sport=40000 + i) for i in range(5)]
    for walk in walks:
        walk.handshake()
        assert walk.send_hello(CHROME) == []
    assert list(box.tracker.waiting) == ["www.example.com"]
    assert len(box.tracker.waiting["www.example.com"]) == 5
    lookups.answers["www.example.com"] = www_target()
    out = resume(box, "www.example.com")
    assert sorted(o.tcp.sport for o in out if o.flags == "S") == [40000 + i for i in range(5)]
    assert all(not o.v4 for o in out)
    # A second resume for the same name finds nobody waiting.
    assert box.tracker.resume("www.example.com", box.now) == []


def test_the_hello_timeout_still_applies_while_the_name_is_pending():
    box, lookups = resolving_box(hello_timeout=HELLO_TIMEOUT)
    walk = Walk(box)
    walk.handshake()
    walk.send_hello(CHROME)
    out = box.wait(HELLO_TIMEOUT + 0.1)
    assert len(out) == 1 and out[0].v4 and out[0].has("R")
    assert box.connections == 0
    assert box.tracker.waiting == {} and box.tracker._waiting_on == {}
    assert [r.outcome for r in box.tracker.records] == ["hello_timeout"]
    # The late answer finds the connection gone.
    lookups.answers["www.example.com"] = www_target()
    assert box.tracker.resume("www.example.com", box.now) == []


def test_a_client_reset_while_pending_leaves_nothing_waiting():
    box, lookups = resolving_box()
    walk = Walk(box)
    walk.handshake()
    walk.send_hello(CHROME)
    assert walk.from_client("R", walk.c + 1 + len(CHROME)) == []
    assert box.connections == 0 and box.tracker.waiting == {}
    assert box.tracker.resume("www.example.com", box.now) == []


@pytest.mark.parametrize("outcome", ["refused_unresolved", "refused_outside_networks", "refused_resolver_timeout",
                                     "refused_resolver_error"])
def test_an_unresolved_name_gets_the_unknown_name_alert_with_its_own_outcome(outcome):
    box, lookups = resolving_box()
    walk = Walk(box)
    walk.handshake()
    walk.send_hello(CHROME)
    lookups.answers["www.example.com"] = Refused(outcome)
    out = resume(box, "www.example.com")
    assert len(out) == 1 and out[0].v4 and out[0].has("F")
    assert out[0].payload == tls.UNRECOGNIZED_NAME_ALERT
    assert out[0].tcp.ack == (walk.c + 1 + len(CHROME)) & M32
    box.wait(30)
    assert [r.outcome for r in box.tracker.records] == [outcome]


def test_a_cached_refusal_refuses_at_once():
    box, lookups = resolving_box()
    lookups.answers["www.example.com"] = Refused("refused_outside_networks")
    walk = Walk(box)
    walk.handshake()
    out = walk.send_hello(CHROME)
    assert len(out) == 1 and out[0].payload == tls.UNRECOGNIZED_NAME_ALERT
    assert lookups.asked == [] and box.tracker.waiting == {}


def test_an_http_request_for_an_unresolved_name_gets_421():
    box, lookups = resolving_box()
    walk = Walk(box, dport=80)
    walk.handshake()
    head = b"GET / HTTP/1.1\r\nHost: a.example.org\r\n\r\n"
    assert walk.from_client("PA", walk.c + 1, walk.k + 1, head) == []
    lookups.answers["a.example.org"] = Refused("refused_unresolved")
    out = resume(box, "a.example.org")
    assert len(out) == 1 and out[0].payload == http.MISDIRECTED_REQUEST


def test_a_connect_for_a_pending_name_binds_with_the_head_consumed_or_gets_403():
    box = ConnectBox()
    lookups = Lookups()
    box.tracker.resolve = lookups
    walk = ProxyWalk(box)
    walk.handshake()
    assert walk.from_client("PA", walk.c + 1, walk.k + 1, walk.head) == []
    assert lookups.asked == ["www.example.com"]
    lookups.answers["www.example.com"] = Target(V6(HOST_WWW).packed, 443, "www")
    syn = walk.expect_host_syn(resume(box, "www.example.com"))
    assert syn.tcp.seq == walk.tunnel_c  # the head is consumed only once the host is known

    other = ProxyWalk(box, sport=41000, head=b"CONNECT b.example.org:443 HTTP/1.1\r\n\r\n")
    other.handshake()
    assert other.from_client("PA", other.c + 1, other.k + 1, other.head) == []
    lookups.answers["b.example.org"] = Refused("refused_outside_networks")
    out = resume(box, "b.example.org")
    assert len(out) == 1 and out[0].payload == FORBIDDEN_NAME


def test_a_connection_restored_while_it_waited_asks_again_when_the_client_retransmits():
    box, lookups = resolving_box()
    walk = Walk(box)
    walk.handshake()
    walk.send_hello(CHROME)
    # As after a restart from the state file: the connection is back, but nobody waits for the old lookup.
    box.tracker.waiting.clear()
    box.tracker._waiting_on.clear()
    lookups.answers["www.example.com"] = www_target()
    out = walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:700])
    walk.expect_host_syn(out)
