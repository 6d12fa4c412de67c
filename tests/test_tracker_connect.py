"""netstack.tracker: a connect listener (explicit proxy), walked packet by packet.

As in test_tracker, every packet is built and parsed by scapy (checksums
checked) and the expected numbers come from the protocol
(../shared/design/bridge.md, "CONNECT in the packet splice"): the client's
ISN ``c``, its head of ``L`` bytes, kracauer's ISN ``k`` (learned from the
SYN-ACK) and its 200 of ``R`` bytes, the host's ISN ``h`` chosen here. The
host's SYN must carry ``c + L``; host→client sequence numbers move by
``h - (k + R)``; client→host ones not at all.
"""

from __future__ import annotations

import ipaddress
import pathlib
import random

import pytest

from netstack.connect import (
    BAD_GATEWAY, BAD_REQUEST, CONNECTION_ESTABLISHED, FORBIDDEN_CLIENT, FORBIDDEN_NAME, FORBIDDEN_PORT, NOT_IMPLEMENTED,
    ConnectPolicy,
)
from netstack.peek import Decision
from netstack.state import restore, snapshot
from netstack.tracker import ANSWER_TRIES, OFFLOAD_DELAY, Connection, Listener, Target, Tracker, TrackerConfig
from tests.test_tracker import (
    CHROME, CLIENT, CLIENT6, HOST_ORG, HOST_WWW, LISTENERS, M32, PREFIX, SERVICE, Box, Out, Walk, host_packet, parse,
)
from tests.test_tracker_kernel import KernelSim

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
PROXY_PORT = 3128
PROXY = Listener(V4(SERVICE).packed, PROXY_PORT, "connect")
CURL = (pathlib.Path(__file__).resolve().parent / "data" / "curl_connect.bin").read_bytes()
L = len(CURL)
R = len(CONNECTION_ESTABLISHED)


def resolve(listener: Listener, decision: Decision) -> Target | None:
    """www.example.com at the CONNECT's port; *.example.org with a port of its own (8443)."""
    name = decision.name
    if name == "www.example.com":
        return Target(V6(HOST_WWW).packed, decision.port, "www")
    if name is not None and name.endswith(".example.org"):
        return Target(V6(HOST_ORG).packed, 8443, "org")
    return None


class ConnectBox(Box):
    """A tracker with the test listeners and a connect listener on SERVICE:3128."""

    def __init__(self, allow: tuple[str, ...] = ("198.51.100.0/24",), ports: tuple[int, ...] = (443, 8443),
                 kernel: bool = False, **config) -> None:
        self.now = 1000.0
        rng = random.Random(1)
        policy = ConnectPolicy.of([ipaddress.IPv4Network(n) for n in allow], ports)
        self.tracker = Tracker(
            TrackerConfig(prefix=PREFIX, connect_policies={(PROXY.address, PROXY.port): policy}, **config),
            [*LISTENERS, PROXY], resolve, lambda: rng.getrandbits(32))
        self.kernel = KernelSim() if kernel else None
        self.tracker.flows = self.kernel
        self.carried = 0

    def send(self, packet) -> list[Out]:
        if self.kernel is not None:
            self.kernel.now_ns = int(self.now * 1e9)
            out = self.kernel.carry(bytes(packet))
            if out is not None:
                self.carried += 1
                return [parse(out)]
        return super().send(packet)


class ProxyWalk(Walk):
    """One tunnel through the proxy: the head, the host's SYN-ACK, the 200."""

    def __init__(self, box: ConnectBox, head: bytes = CURL, **kw) -> None:
        super().__init__(box, dport=PROXY_PORT, **kw)
        self.head = head

    @property
    def tunnel_c(self) -> int:
        """The host's view of the client's ISN: the head's last byte."""
        return (self.c + len(self.head)) & M32

    @property
    def delta(self) -> int:
        return (self.h - (self.k + R)) & M32

    def host_synack(self) -> list[Out]:
        self.splice_at = self.box.now
        return self.box.send(host_packet("SA", self.h, self.tunnel_c + 1, src=self.host, sport=self.host_port,
                                         dport=self.host_sport, window=65535, options=self.host_options()))

    def open(self, early: bytes = b"") -> list[Out]:
        """Handshake, head (and `early` bytes in the same segment), host SYN; the SYN-ACK's answer."""
        self.handshake()
        self.box.now += 0.01
        syn = self.expect_host_syn(self.from_client("PA", self.c + 1, self.k + 1, self.head + early))
        assert syn.tcp.seq == self.tunnel_c
        self.box.now += 0.01
        return self.host_synack()


def answers(out: list[Out]) -> tuple[list[Out], list[Out]]:
    """(to the client, to the host)."""
    return [o for o in out if o.v4], [o for o in out if not o.v4]


def the_connection(box: ConnectBox):
    [value] = box.tracker.clients.values()
    return value


# ================================================================ the tunnel

def test_the_host_gets_a_syn_with_isn_after_the_head_and_the_head_is_not_acknowledged():
    box = ConnectBox()
    walk = ProxyWalk(box)
    walk.handshake()
    out = walk.from_client("PA", walk.c + 1, walk.k + 1, CURL)
    syn = walk.expect_host_syn(out)  # nothing to the client: the head stays unacknowledged
    assert (syn.ip.src, syn.ip.dst, syn.tcp.dport, syn.tcp.sport) == (CLIENT6, HOST_WWW, 443, 40000)
    assert syn.tcp.seq == (walk.c + L) & M32
    assert syn.payload == b""


def test_a_host_that_accepts_gets_the_200_sent_and_the_bytes_after_the_head_only():
    box = ConnectBox()
    walk = ProxyWalk(box)
    to_client, to_host = answers(walk.open())
    # kracauer's own answer, from k+1, acknowledging the head.
    [answer] = to_client
    assert answer.payload == CONNECTION_ESTABLISHED
    assert (answer.tcp.seq, answer.tcp.ack) == ((walk.k + 1) & M32, (walk.c + 1 + L) & M32)
    assert answer.has("PA") and not answer.has("F")
    # The host's handshake completes with nothing replayed (curl waits for the 200).
    [ack] = to_host
    assert ack.payload == b"" and (ack.tcp.seq, ack.tcp.ack) == ((walk.c + 1 + L) & M32, (walk.h + 1) & M32)
    # The client acknowledges the 200 and sends its ClientHello: it reaches the host unchanged.
    out = walk.from_client("PA", walk.c + 1 + L, walk.k + 1 + R, CHROME)
    assert len(out) == 1 and not out[0].v4
    assert out[0].payload == CHROME
    assert out[0].tcp.seq == (walk.c + 1 + L) & M32
    assert out[0].tcp.ack == (walk.h + 1) & M32
    # The host's first bytes reach the client right after the 200.
    out = walk.from_host("PA", walk.h + 1, walk.c + 1 + L + len(CHROME), b"server hello", host_tick=5)
    assert len(out) == 1 and out[0].v4
    assert out[0].tcp.seq == (walk.k + 1 + R) & M32
    assert out[0].tcp.ack == (walk.c + 1 + L + len(CHROME)) & M32
    assert out[0].payload == b"server hello"
    # Both ways close; the record counts the tunnel's bytes, names the authority.
    walk.from_client("FA", walk.c + 1 + L + len(CHROME), walk.k + 1 + R + 12)
    walk.from_host("FA", walk.h + 13, walk.c + 2 + L + len(CHROME), host_tick=6)
    walk.from_client("A", walk.c + 2 + L + len(CHROME), walk.k + 2 + R + 12)
    [record] = box.tracker.records
    assert (record.protocol, record.name, record.route, record.host, record.host_port) == (
        "connect", "www.example.com:443", "www", HOST_WWW, 443)
    assert record.outcome == "closed"
    assert (record.bytes_to_host, record.bytes_to_client) == (len(CHROME), 12)
    assert record.hello_size == L


def test_bytes_sent_right_after_the_head_are_replayed_to_the_host_once_it_accepts():
    box = ConnectBox()
    walk = ProxyWalk(box)
    to_client, to_host = answers(walk.open(early=CHROME))
    assert [o.payload for o in to_client] == [CONNECTION_ESTABLISHED]
    # The 200 acknowledges the head only; the ClientHello is the host's to acknowledge.
    assert to_client[0].tcp.ack == (walk.c + 1 + L) & M32
    assert b"".join(o.payload for o in to_host) == CHROME
    assert to_host[0].tcp.seq == (walk.c + 1 + L) & M32
    # The host's ACK of it passes to the client as it is (no client→host shift).
    out = walk.from_host("A", walk.h + 1, walk.c + 1 + L + len(CHROME), host_tick=5)
    assert out[0].tcp.ack == (walk.c + 1 + L + len(CHROME)) & M32
    assert out[0].tcp.seq == (walk.k + 1 + R) & M32


def test_a_head_split_across_segments_out_of_order_is_read_once_whole():
    box = ConnectBox()
    walk = ProxyWalk(box)
    walk.handshake()
    assert walk.from_client("PA", walk.c + 1 + 40, walk.k + 1, CURL[40:]) == []
    assert walk.from_client("PA", walk.c + 1 + 7, walk.k + 1, CURL[7:40]) == []
    syn = walk.expect_host_syn(walk.from_client("PA", walk.c + 1, walk.k + 1, CURL[:7]))
    assert syn.tcp.seq == (walk.c + L) & M32


def test_the_route_may_give_the_host_port():
    box = ConnectBox()
    walk = ProxyWalk(box, head=b"CONNECT api.example.org:443 HTTP/1.1\r\nHost: api.example.org:443\r\n\r\n")
    walk.handshake()
    syn = walk.expect_host_syn(walk.from_client("PA", walk.c + 1, walk.k + 1, walk.head))
    assert (syn.ip.dst, syn.tcp.dport) == (HOST_ORG, 8443)


def test_the_host_port_is_the_connects_when_the_route_gives_none():
    box = ConnectBox()
    walk = ProxyWalk(box, head=b"CONNECT www.example.com:8443 HTTP/1.1\r\n\r\n")
    walk.handshake()
    syn = walk.expect_host_syn(walk.from_client("PA", walk.c + 1, walk.k + 1, walk.head))
    assert (syn.ip.dst, syn.tcp.dport) == (HOST_WWW, 8443)


def test_an_unacknowledged_200_is_sent_again_with_backoff_then_both_sides_are_reset():
    box = ConnectBox()
    walk = ProxyWalk(box)
    walk.open()
    times, sent = [], []
    for _ in range(ANSWER_TRIES - 1):
        out = box.next_timer()
        times.append(box.now)
        sent += out
    assert [o.payload for o in sent] == [CONNECTION_ESTABLISHED] * (ANSWER_TRIES - 1)
    assert all(o.tcp.seq == (walk.k + 1) & M32 for o in sent)
    gaps = [round(b - a, 3) for a, b in zip([walk.splice_at, *times], times)]
    assert gaps == [1.0, 2.0, 4.0, 8.0][:ANSWER_TRIES - 1]
    assert box.tracker.events["connect_answer_retransmitted"] == ANSWER_TRIES - 1
    out = box.next_timer()
    to_client, to_host = answers(out)
    assert len(to_client) == 1 and to_client[0].has("R") and to_client[0].tcp.seq == (walk.k + 1) & M32
    assert len(to_host) == 1 and to_host[0].has("R") and to_host[0].tcp.seq == (walk.c + 1 + L) & M32
    assert box.connections == 0 and box.tracker.records[-1].outcome == "answer_unacknowledged"


def test_an_acknowledged_200_is_not_sent_again():
    box = ConnectBox()
    walk = ProxyWalk(box)
    walk.open()
    walk.from_client("A", walk.c + 1 + L, walk.k + 1 + R)
    assert box.wait(60) == []
    assert box.tracker.events["connect_answer_retransmitted"] == 0


# ================================================================ the kernel path

def test_in_the_kernel_the_tunnel_is_translated_with_the_same_offsets():
    box = ConnectBox(kernel=True)
    walk = ProxyWalk(box)
    walk.open(early=CHROME)
    box.now += 0.01
    walk.from_host("A", walk.h + 1, walk.c + 1 + L + len(CHROME), host_tick=5)
    # Not while the 200 is unacknowledged: it is kracauer's to retransmit.
    box.wait(OFFLOAD_DELAY * 1.5)
    assert box.tracker.in_kernel == 0 and isinstance(the_connection(box), Connection)
    walk.from_client("A", walk.c + 1 + L + len(CHROME), walk.k + 1 + R)
    box.wait(OFFLOAD_DELAY * 2)
    assert box.tracker.in_kernel == 1 and the_connection(box).__class__ is tuple
    before = box.carried
    down = walk.from_host("PA", walk.h + 1, walk.c + 1 + L + len(CHROME), b"x" * 1000, host_tick=30)
    assert down[0].v4 and down[0].tcp.seq == (walk.k + 1 + R) & M32 and down[0].payload == b"x" * 1000
    up = walk.from_client("PA", walk.c + 1 + L + len(CHROME), walk.k + 1 + R + 1000, b"y" * 100)
    assert not up[0].v4 and up[0].tcp.seq == (walk.c + 1 + L + len(CHROME)) & M32
    assert up[0].tcp.ack == (walk.h + 1001) & M32
    assert box.carried == before + 2
    # A FIN brings it back from the map: the record still counts the tunnel's bytes and names the authority.
    walk.from_client("FA", walk.c + 1 + L + len(CHROME) + 100, walk.k + 1 + R + 1000)
    walk.from_host("FA", walk.h + 1001, walk.c + 2 + L + len(CHROME) + 100, host_tick=40)
    walk.from_client("A", walk.c + 2 + L + len(CHROME) + 100, walk.k + 2 + R + 1000)
    [record] = box.tracker.records
    assert record.outcome == "closed" and record.name == "www.example.com:443"
    assert (record.bytes_to_host, record.bytes_to_client) == (len(CHROME) + 100, 1000)


def test_a_tunnel_saved_while_connecting_is_answered_after_a_restart():
    box = ConnectBox()
    walk = ProxyWalk(box)
    walk.handshake()
    walk.expect_host_syn(walk.from_client("PA", walk.c + 1, walk.k + 1, CURL + CHROME))
    saved = snapshot(box.tracker, box.now)
    again = ConnectBox()
    restore(again.tracker, saved, again.now)
    walk.box = again
    to_client, to_host = answers(walk.host_synack())
    assert [o.payload for o in to_client] == [CONNECTION_ESTABLISHED]
    assert to_client[0].tcp.seq == (walk.k + 1) & M32
    assert b"".join(o.payload for o in to_host) == CHROME


# ================================================================ refusals

def refused(box: ConnectBox, head: bytes, expected: bytes, outcome: str, **kw) -> ProxyWalk:
    """The head is answered with `expected` and a FIN, acknowledging all of it; nothing reaches a host."""
    walk = ProxyWalk(box, head=head, **kw)
    walk.handshake()
    out = walk.from_client("PA", walk.c + 1, walk.k + 1, head)
    assert len(out) == 1 and out[0].v4
    assert out[0].payload == expected
    assert out[0].has("FPA")
    assert (out[0].tcp.seq, out[0].tcp.ack) == ((walk.k + 1) & M32, (walk.c + 1 + len(head)) & M32)
    assert box.tracker.hosts == {}
    # The client acknowledges and closes, as curl does.
    out = walk.from_client("FA", walk.c + 1 + len(head), walk.k + 2 + len(expected))
    assert len(out) == 1 and out[0].flags == "A"
    assert box.connections == 0
    assert box.tracker.records[-1].outcome == outcome
    assert box.tracker.records[-1].protocol == "connect"
    return walk


def test_a_client_outside_allow_gets_403():
    box = ConnectBox(allow=("203.0.113.0/24", "198.51.100.3/32"))
    refused(box, CURL, FORBIDDEN_CLIENT, "refused_client")


def test_a_client_outside_allow_gets_403_even_for_a_malformed_head():
    box = ConnectBox(allow=("203.0.113.0/24",))
    refused(box, b"CONNECT nonsense HTTP/1.1\r\n\r\n", FORBIDDEN_CLIENT, "refused_client")


def test_a_connect_listener_without_a_policy_serves_nobody():
    box = ConnectBox()
    box.tracker.config = TrackerConfig(prefix=PREFIX)
    refused(box, CURL, FORBIDDEN_CLIENT, "refused_client")


def test_a_port_outside_ports_gets_403():
    box = ConnectBox()
    refused(box, b"CONNECT www.example.com:22 HTTP/1.1\r\n\r\n", FORBIDDEN_PORT, "refused_port")
    assert box.tracker.records[-1].name == "www.example.com:22"


def test_a_name_without_a_route_gets_403():
    box = ConnectBox()
    refused(box, b"CONNECT shop.example.net:443 HTTP/1.1\r\nHost: shop.example.net:443\r\n\r\n", FORBIDDEN_NAME,
            "refused_unknown_name")


def test_a_malformed_head_gets_400():
    box = ConnectBox()
    refused(box, b"CONNECT www.example.com HTTP/1.1\r\n\r\n", BAD_REQUEST, "refused_bad_request")


def test_an_oversized_head_gets_400():
    box = ConnectBox(hello_max_bytes=1024)
    walk = ProxyWalk(box)
    walk.handshake()
    head = b"CONNECT www.example.com:443 HTTP/1.1\r\nX-Big: " + b"x" * 1100
    out = walk.from_client("PA", walk.c + 1, walk.k + 1, head[:900])
    assert out == []
    out = walk.from_client("PA", walk.c + 901, walk.k + 1, head[900:])
    assert len(out) == 1 and out[0].payload == BAD_REQUEST and out[0].has("F")
    assert box.tracker.records == [] and box.tracker.hosts == {}


def test_another_method_gets_501():
    box = ConnectBox()
    refused(box, b"GET http://www.example.com/ HTTP/1.1\r\nHost: www.example.com\r\n\r\n", NOT_IMPLEMENTED,
            "refused_method")


def test_tls_sent_to_the_proxy_port_is_reset():
    box = ConnectBox()
    walk = ProxyWalk(box)
    walk.handshake()
    out = walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:700])
    assert len(out) == 1 and out[0].has("R")
    assert box.tracker.records[-1].outcome == "not_connect"


def test_a_host_that_refuses_gets_the_client_a_502():
    box = ConnectBox()
    walk = ProxyWalk(box)
    walk.handshake()
    walk.expect_host_syn(walk.from_client("PA", walk.c + 1, walk.k + 1, CURL + b"early"))
    out = box.send(host_packet("RA", 0, walk.tunnel_c + 1, src=walk.host, sport=walk.host_port,
                               dport=walk.host_sport))
    assert len(out) == 1 and out[0].v4
    assert out[0].payload == BAD_GATEWAY and out[0].has("FPA")
    # Every byte the client sent is consumed: the head and what followed it.
    assert out[0].tcp.ack == (walk.c + 1 + L + 5) & M32 and out[0].tcp.seq == (walk.k + 1) & M32
    # Unacknowledged, it is sent again.
    again = box.next_timer()
    assert [o.payload for o in again] == [BAD_GATEWAY]
    walk.from_client("FA", walk.c + 1 + L + 5, walk.k + 2 + len(BAD_GATEWAY))
    assert box.connections == 0
    record = box.tracker.records[-1]
    assert (record.outcome, record.name, record.host) == ("host_refused", "www.example.com:443", HOST_WWW)


def test_a_host_that_never_answers_gets_the_client_a_502():
    box = ConnectBox(connect_timeout=3.0)
    walk = ProxyWalk(box)
    walk.handshake()
    walk.expect_host_syn(walk.from_client("PA", walk.c + 1, walk.k + 1, CURL))
    # The SYN is sent again (1 s, then 2 s later) until connect_timeout; then the client hears a 502.
    start = box.now
    steps = []
    for _ in range(3):
        to_client, to_host = answers(box.next_timer())
        steps.append((round(box.now - start, 3), [o.flags for o in to_host], [o.payload for o in to_client]))
    assert steps == [(1.0, ["S"], []), (3.0, [], [BAD_GATEWAY]), (4.0, [], [BAD_GATEWAY])]
    box.wait(60)
    assert box.connections == 0 and box.tracker.records[-1].outcome == "host_unreachable"
