"""Several hosts per route: rendezvous choice, failover without the client noticing, passive health.

Also a listener with its own translation prefix. The walks reuse the tracker
test helpers (tests/test_tracker.py): a fake clock, scapy packets, checksums
verified on every output.
"""

from __future__ import annotations

import ipaddress

import pytest

from netstack.tracker import Listener, Target, Tracker, TrackerConfig
from tests.test_tracker import CHROME, CLIENT, SERVICE, Box, Walk, host_packet

V6 = ipaddress.IPv6Address
HOSTS = ("2001:db8::a1", "2001:db8::a2", "2001:db8::a3")


def route_to_all(listener: Listener, decision) -> Target:
    packed = tuple(V6(h).packed for h in HOSTS)
    return Target(packed[0], 443, "pool", packed)


def pool_box(**config) -> Box:
    box = Box(**config)
    box.tracker.resolve = route_to_all
    return box


def hello_to_host(walk: Walk) -> str:
    """Handshake and hello; the host the first SYN goes to."""
    walk.handshake()
    syn = walk.expect_host_syn(walk.send_hello(CHROME))
    return syn.ip.dst


def test_same_client_always_lands_on_the_same_host_and_clients_spread():
    chosen = {hello_to_host(Walk(pool_box(), sport=port)) for port in (40001, 40002, 40003)}
    assert len(chosen) == 1  # one client address, one host, whatever its port
    tracker = pool_box().tracker
    target = route_to_all(None, None)
    firsts = {tracker._host_order(ipaddress.IPv4Address(f"198.51.100.{i}").packed, target, 0.0)[0]
              for i in range(1, 60)}
    assert firsts == set(target.hosts)  # and different clients use every host


def test_host_refusal_fails_over_to_the_next_host_without_telling_the_client():
    box = pool_box()
    walk = Walk(box)
    first = hello_to_host(walk)
    out = box.send(host_packet("RA", 0, walk.c + 1, src=first, sport=443, dport=walk.host_sport))
    assert len(out) == 1 and not out[0].v4 and out[0].flags == "S", "the next host gets a SYN, the client nothing"
    second = out[0].ip.dst
    assert second != first and second in HOSTS
    assert out[0].tcp.seq == walk.c & 0xFFFFFFFF  # the client's own ISN again
    assert out[0].ip.src == "64:ff9b:1::c633:6402"
    walk.expect_host_syn(out)
    replay = walk.host_synack()
    assert b"".join(r.payload for r in replay) == CHROME
    assert box.tracker.events["host_failover"] == 1
    # The first host's tuple no longer maps to the connection.
    stray = box.send(host_packet("SA", 5, walk.c + 1, src=first, sport=443, dport=walk.host_sport))
    assert stray == [] and box.tracker.drops["no_connection"] >= 1


def test_silent_host_is_given_up_after_its_try_and_the_next_is_tried():
    box = pool_box()  # host_try_timeout 3 s by default
    walk = Walk(box)
    first = hello_to_host(walk)
    retry = box.wait(1.0)
    assert [o.ip.dst for o in retry] == [first], "first a retransmitted SYN to the same host"
    moved = box.wait(2.0)
    assert len(moved) == 1 and moved[0].flags == "S" and moved[0].ip.dst != first
    assert all(o.v4 is False for o in retry + moved)


def syn_times(box: Box, until: float) -> list[tuple[float, str]]:
    """Run the fake clock tick by tick (10 ms) up to `until`; when each SYN left, and to which host."""
    sent = []
    end = box.now + until
    while box.now < end - 1e-9:
        sent += [(round(box.now, 2), o.ip.dst) for o in box.wait(0.01) if not o.v4 and o.flags == "S"]
    return sent


@pytest.mark.parametrize("try_timeout", [0.5, 1.5, 5.0])
def test_host_try_timeout_sets_when_the_next_host_is_tried(try_timeout):
    box = pool_box(host_try_timeout=try_timeout, connect_timeout=20.0)
    walk = Walk(box)
    start = box.now
    first = hello_to_host(walk)
    sent = syn_times(box, try_timeout + 0.5)
    moves = [(at, host) for at, host in sent if host != first]
    assert moves, sent
    # The first other host gets its SYN exactly when the first host's try is over,
    # and the first host's own retransmissions (1 s, 2 s...) all come before that.
    assert moves[0][0] == pytest.approx(start + try_timeout, abs=0.011)
    assert all(at < start + try_timeout for at, host in sent if host == first)


def test_host_try_timeout_never_outlasts_connect_timeout():
    box = pool_box(host_try_timeout=3.0, connect_timeout=4.0)
    walk = Walk(box)
    start = box.now
    hello_to_host(walk)
    sent = syn_times(box, 5.0)
    hosts = [host for _, host in sent]
    assert len(set(hosts)) == 2, sent  # the second host had until 4 s, no time for a third
    assert box.connections == 0 and [r.outcome for r in box.tracker.records] == ["host_unreachable"]
    record = box.tracker.records[0]
    assert record.start + record.duration == pytest.approx(start + 4.0, abs=0.011)  # the client reset at 4 s
    assert max(at for at, _ in sent) < start + 4.0


def test_every_host_refusing_resets_the_client():
    box = pool_box()
    walk = Walk(box)
    host = hello_to_host(walk)
    tried = [host]
    out = []
    for _ in HOSTS:
        out = box.send(host_packet("RA", 0, walk.c + 1, src=tried[-1], sport=443, dport=walk.host_sport))
        if out and not out[0].v4:
            walk.host_sport = out[0].tcp.sport
            tried.append(out[0].ip.dst)
    assert sorted(tried) == sorted(HOSTS)
    assert len(out) == 1 and out[0].v4 and out[0].has("R")
    assert [r.outcome for r in box.tracker.records] == ["host_refused"]


def test_a_failing_host_is_skipped_until_fail_timeout():
    box = pool_box(max_fails=1, fail_timeout=30.0)
    walk = Walk(box, sport=41000)
    first = hello_to_host(walk)
    box.send(host_packet("RA", 0, walk.c + 1, src=first, sport=443, dport=walk.host_sport))
    assert box.tracker.events["host_marked_down"] == 1
    # A new connection from the same client now starts elsewhere...
    assert hello_to_host(Walk(box, sport=41001)) != first
    # ...until fail_timeout has passed.
    box.now += 31.0
    assert hello_to_host(Walk(box, sport=41002)) == first


def test_success_clears_a_hosts_failures():
    box = pool_box(max_fails=2)
    walk = Walk(box, sport=42000)
    first = hello_to_host(walk)
    box.send(host_packet("RA", 0, walk.c + 1, src=first, sport=443, dport=walk.host_sport))
    assert box.tracker.health[(V6(first).packed, 443)][0] == 1
    other = Walk(box, sport=42001)
    assert hello_to_host(other) == first  # one failure is below max_fails
    other.host_synack()
    assert (V6(first).packed, 443) not in box.tracker.health


def test_listener_with_its_own_prefix_uses_it_both_ways():
    prefix2 = V6("64:ff9b:2::").packed[:12]
    listener = Listener(ipaddress.IPv4Address(SERVICE).packed, 443, "tls", prefix2)
    box = Box()
    box.tracker = Tracker(TrackerConfig(prefix=V6("64:ff9b:1::").packed[:12]), [listener],
                          lambda lst, d: Target(V6("2001:db8::10").packed, 443, "www"), lambda: 7)
    walk = Walk(box)
    hello_to_host(walk)
    expected = str(V6(prefix2 + ipaddress.IPv4Address(CLIENT).packed))
    assert walk.host_sport and box.tracker.hosts
    syn_src = next(iter(box.tracker.hosts.values())).src6
    assert str(V6(syn_src)) == expected
    replay = box.send(host_packet("SA", 100, walk.c + 1, src="2001:db8::10", dst=expected, sport=443,
                                  dport=walk.host_sport, options=walk.host_options()))
    assert replay and all(str(r.ip.src) == expected for r in replay)
    # The same client embedded in the global prefix belongs to nothing.
    stray = box.send(host_packet("A", 101, walk.c + 1, src="2001:db8::10", dst="64:ff9b:1::c633:6402", sport=443,
                                 dport=walk.host_sport))
    assert stray == [] and box.tracker.drops["no_connection"] == 1
