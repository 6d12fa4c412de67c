"""Hostile input and floods, unit level (issue #4): RFC 5961 ACK and SYN checks, SYN cookies,
caps on peeking and on the table, ICMP echo and error translation (RFC 7915)."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror
from scapy.layers.inet6 import IPv6, ICMPv6PacketTooBig, ICMPv6DestUnreach, IPerror6

from tests.test_tracker import (
    CHROME, CLIENT, CLIENT6, SERVICE, Box, Walk, client_packet, host_packet, syn_options,
)


# ----------------------------------------------------------------- RFC 5961 §5 and §4

def test_client_ack_for_data_the_host_never_sent_is_dropped():
    box = Box()
    walk = Walk(box)
    walk.establish()
    ack_too_far = walk.k + 1 + 5000  # the host has sent nothing yet
    assert walk.from_client("A", walk.c + 1 + len(CHROME), ack_too_far) == []
    assert box.tracker.drops["ack_out_of_window"] == 1
    # Once the host sends 5000 bytes, the same ACK is fine.
    walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), bytes(5000))
    assert len(walk.from_client("A", walk.c + 1 + len(CHROME), ack_too_far)) == 1


def test_host_ack_for_data_the_client_never_sent_is_dropped():
    box = Box()
    walk = Walk(box)
    walk.establish()
    assert walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME) + 1) == []
    assert box.tracker.drops["ack_out_of_window"] == 1


def test_ack_far_behind_the_window_is_dropped():
    box = Box()
    walk = Walk(box)
    walk.establish()
    stale = walk.c + 1 + len(CHROME) - (1 << 30)
    assert walk.from_host("A", walk.h + 1, stale) == []
    assert box.tracker.drops["ack_out_of_window"] == 1


def test_syn_in_an_established_connection_does_not_tear_it_down():
    box = Box()
    walk = Walk(box)
    walk.establish()
    out = box.send(client_packet("S", walk.c + 12345, options=syn_options(tsval=1)))
    assert out == [] and box.tracker.drops["syn_in_connection"] == 1
    assert len(walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), b"still here")) == 1


# ----------------------------------------------------------------- SYN cookies

def test_past_the_backlog_syns_get_cookies_and_no_state_until_the_ack():
    box = Box(syn_backlog=0)
    walk = Walk(box)
    out = walk.syn()
    assert len(out) == 1 and out[0].flags == "SA"
    assert box.connections == 0, "a cookie SYN-ACK keeps nothing"
    assert box.tracker.events["syn_cookie_sent"] == 1
    synack = out[0]
    walk.k = synack.tcp.seq
    walk.synack_ts = synack.ts[0]
    walk.synack_at = box.now
    # The handshake ACK brings the connection back, options and all.
    assert walk.from_client("A", walk.c + 1, walk.k + 1) == []
    assert box.connections == 1
    conn = next(iter(box.tracker.clients.values()))
    assert conn.client_wscale == 7 and conn.client_sack and conn.client_ts
    assert conn.client_mss == 1460
    syn = walk.expect_host_syn(walk.send_hello(CHROME))
    assert syn.options["WScale"] == 7 and "SAckOK" in syn.options and syn.options["MSS"] <= 1440
    replay = walk.host_synack()
    assert b"".join(r.payload for r in replay) == CHROME


def test_forged_or_stale_cookie_acks_create_nothing():
    box = Box(syn_backlog=0)
    walk = Walk(box)
    synack = walk.syn()[0]
    forged = client_packet("A", walk.c + 1, synack.tcp.seq + 2, ts=(5, synack.ts[0]))
    assert box.send(forged) == [] and box.connections == 0
    box.now += 200  # cookies are good for two 64-second ticks
    late = client_packet("A", walk.c + 1, synack.tcp.seq + 1, ts=(6, synack.ts[0]))
    assert box.send(late) == [] and box.connections == 0
    assert box.tracker.drops["no_connection"] == 2


def test_client_without_timestamps_gets_a_cookie_without_window_scaling():
    box = Box(syn_backlog=0)
    out = box.send(client_packet("S", 500, window=64240, options=syn_options(tsval=None)))
    synack = out[0]
    assert "WScale" not in synack.options and "SAckOK" not in synack.options
    assert box.send(client_packet("A", 501, synack.tcp.seq + 1, window=64240)) == []
    conn = next(iter(box.tracker.clients.values()))
    assert conn.client_wscale is None and not conn.client_sack



def kernel_cookie(box: Box, isn: int, sport: int = 40000, wscale: int | None = 7, sack: bool = True):
    """(cookie, TSval) of the SYN-ACK the BPF program would send for a SYN: the same
    secret, the same function (tests/test_kernel_syncookies.py runs the program itself)."""
    from netstack.syncookie import encode_options

    cookie, ts_base = box.tracker.cookies.make(box.now, ipaddress.IPv4Address(CLIENT).packed,
                                               ipaddress.IPv4Address(SERVICE).packed, sport, 443, isn, 1460)
    return cookie, encode_options((ts_base + int(box.now * 1000)) & 0xFFFFFFFF, wscale, sack)


def test_a_cookie_ack_from_the_kernel_may_carry_the_hello():
    box = Box()
    cookie, tsval = kernel_cookie(box, isn=7000, wscale=9, sack=False)
    box.now += 0.01
    out = box.send(client_packet("PA", 7001, cookie + 1, CHROME[:500], window=502, ts=(50, tsval)))
    assert out == [] and box.connections == 1
    conn = next(iter(box.tracker.clients.values()))
    assert (conn.client_wscale, conn.client_sack, conn.client_mss) == (9, False, 1460)
    assert conn.hello.contiguous == 500
    assert box.tracker.events["syn_cookie_accepted"] == 1


def test_a_cookie_ack_on_a_port_whose_old_connection_is_closing_replaces_it():
    box = Box()
    walk = Walk(box)
    walk.establish()
    hello_end = walk.c + 1 + len(CHROME)
    walk.from_client("FA", hello_end, walk.k + 1)
    walk.from_host("FA", walk.h + 1, hello_end + 1)
    walk.from_client("A", hello_end + 1, walk.k + 2)
    old = next(iter(box.tracker.clients.values()))
    assert old.closing and box.connections == 1
    box.now += 1
    # An ACK of the old connection is still the old one's (a retransmission).
    new_isn = (walk.c + 900_000_000) & 0xFFFFFFFF
    cookie, tsval = kernel_cookie(box, isn=new_isn)
    assert len(walk.from_client("A", hello_end + 1, walk.k + 2)) == 1
    # A genuine cookie ACK from elsewhere in sequence space: a new connection on the same port.
    forged = client_packet("A", new_isn + 1, cookie + 2, ts=(99, tsval))
    assert len(box.send(forged)) <= 1 and box.tracker.clients[old.client_key] is old
    assert box.send(client_packet("A", new_isn + 1, cookie + 1, ts=(100, tsval))) == []
    new = box.tracker.clients[old.client_key]
    assert new is not old and new.cookie and new.client_isn == new_isn
    assert box.tracker.events["port_reused_by_cookie"] == 1
    assert [r.outcome for r in box.tracker.records] == ["closed"]



# ----------------------------------------------------------------- caps

def test_oldest_connection_still_peeking_is_reset_past_max_peeking():
    box = Box(max_peeking=3)
    walks = [Walk(box, sport=50000 + i) for i in range(4)]
    for walk in walks[:3]:
        walk.handshake()
        box.now += 1
    out = walks[3].syn()
    assert len(out) == 2
    reset = [o for o in out if o.has("R")]
    assert len(reset) == 1 and reset[0].tcp.dport == 50000, "the oldest is reset"
    assert box.connections == 3 and box.tracker.events["peeking_evicted"] == 1
    assert [r.outcome for r in box.tracker.records] == ["evicted_while_peeking"]


def test_full_table_refuses_new_connections_and_keeps_the_old():
    box = Box(max_connections=2)
    first, second = Walk(box, sport=51000), Walk(box, sport=51001)
    first.establish()
    second.handshake()
    out = Walk(box, sport=51002).syn()
    assert len(out) == 1 and out[0].has("R") and out[0].tcp.ack == (Walk.c + 1) & 0xFFFFFFFF
    assert box.connections == 2 and box.tracker.events["refused_table_full"] == 1
    assert len(first.from_host("PA", first.h + 1, first.c + 1 + len(CHROME), b"x")) == 1



def test_full_table_resets_a_client_whose_syn_the_kernel_answered():
    box = Box(max_connections=1)
    Walk(box, sport=51000).handshake()
    cookie, tsval = kernel_cookie(box, isn=9000, sport=51005)
    out = box.send(client_packet("PA", 9001, cookie + 1, b"hello", sport=51005, ts=(1, tsval)))
    assert len(out) == 1 and out[0].has("R")
    assert out[0].tcp.seq == (cookie + 1) & 0xFFFFFFFF and out[0].tcp.ack == 9001 + 5
    assert box.connections == 1 and box.tracker.events["refused_table_full"] == 1


def test_half_open_count_follows_handshakes():
    box = Box()
    walk = Walk(box)
    walk.syn()
    assert box.tracker.half_open == 1
    synack_ack = walk.box.tracker.clients[next(iter(box.tracker.clients))]
    walk.k = synack_ack.our_isn
    walk.from_client("A", walk.c + 1, walk.k + 1)
    assert box.tracker.half_open == 0
    box.wait(11)
    assert box.tracker.half_open == 0 and not box.tracker.peeking


# ----------------------------------------------------------------- ICMP

def test_ping_to_a_listen_address_is_answered_and_others_are_not():
    box = Box()
    request = IP(src=CLIENT, dst=SERVICE) / ICMP(type=8, id=7, seq=3) / b"ping!"
    out = box.tracker.receive(bytes(request), box.now)
    assert len(out) == 1
    reply = IP(out[0])
    assert (reply.src, reply.dst, reply[ICMP].type, reply[ICMP].id, reply[ICMP].seq) == (SERVICE, CLIENT, 0, 7, 3)
    assert bytes(reply[ICMP].payload) == b"ping!"
    check = IP(bytes(reply))
    del check[ICMP].chksum
    assert IP(bytes(check))[ICMP].chksum == reply[ICMP].chksum
    other = IP(src=CLIENT, dst="192.0.2.99") / ICMP(type=8)
    assert box.tracker.receive(bytes(other), box.now) == []


def test_fragmentation_needed_towards_a_client_becomes_packet_too_big_for_its_host():
    box = Box()
    walk = Walk(box)
    walk.establish()
    sent = walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), bytes(1400))[0]
    router = "198.51.100.1"
    error = IP(src=router, dst=SERVICE) / ICMP(type=3, code=4, nexthopmtu=1300) / bytes(sent.raw)[:548]
    out = box.tracker.receive(bytes(error), box.now)
    assert len(out) == 1
    ptb = IPv6(out[0])
    assert ptb.dst == walk.host and ptb.src == str(ipaddress.IPv6Address(
        ipaddress.IPv6Address(CLIENT6).packed[:12] + ipaddress.IPv4Address(router).packed))
    assert ptb[ICMPv6PacketTooBig].mtu == 1320
    quoted = ptb[IPerror6]
    assert (quoted.src, quoted.dst) == (walk.host, CLIENT6)
    assert quoted[TCPerror].sport == walk.host_port and quoted[TCPerror].dport == walk.host_sport
    assert quoted[TCPerror].seq == (walk.h + 1) & 0xFFFFFFFF, "the quoted sequence number is the host's own"
    check = IPv6(bytes(ptb))
    del check[ICMPv6PacketTooBig].cksum
    assert IPv6(bytes(check))[ICMPv6PacketTooBig].cksum == ptb[ICMPv6PacketTooBig].cksum


def test_packet_too_big_towards_a_host_becomes_fragmentation_needed_for_the_client():
    box = Box()
    walk = Walk(box)
    walk.establish()
    sent = walk.from_client("PA", walk.c + 1 + len(CHROME), walk.k + 1, bytes(1400))[0]
    error = IPv6(src="2001:db8::1", dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) / bytes(sent.raw)[:1000]
    out = box.tracker.receive(bytes(error), box.now)
    assert len(out) == 1
    frag = IP(out[0])
    assert (frag.src, frag.dst, frag[ICMP].type, frag[ICMP].code, frag[ICMP].nexthopmtu) == \
        (SERVICE, CLIENT, 3, 4, 1260)
    quoted = frag[IPerror]
    assert (quoted.src, quoted.dst) == (CLIENT, SERVICE)
    assert quoted[TCPerror].sport == walk.sport and quoted[TCPerror].dport == 443
    assert len(out[0]) <= 576


def test_icmp_for_no_connection_is_dropped():
    box = Box()
    stray = IPv6(src="2001:db8::1", dst=CLIENT6) / ICMPv6DestUnreach(code=4) / (
        IPv6(src=CLIENT6, dst="2001:db8::10") / TCP(sport=1234, dport=443))
    assert box.tracker.receive(bytes(stray), box.now) == []
    assert box.tracker.drops["icmp_no_connection"] == 1


# ----------------------------------------------------------------- hello losses (found in the lab)

def test_repeated_first_segment_is_acknowledged_so_the_stuck_client_sends_the_rest():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    first = CHROME[:1000]
    assert walk.from_client("PA", walk.c + 1, walk.k + 1, first) == []
    # The second segment is lost; the client's timer resends the first one only.
    out = walk.from_client("PA", walk.c + 1, walk.k + 1, first)
    assert len(out) == 1
    ack = out[0]
    assert ack.v4 and ack.flags == "A" and ack.payload == b""
    assert ack.tcp.ack == (walk.c + 1 + 1000) & 0xFFFFFFFF, "the held bytes are acknowledged"
    assert "SAck" not in ack.options and "Timestamp" in ack.options
    assert box.tracker.events["hello_acked_after_retransmission"] == 1
    # The rest arrives and the hello is routed and replayed whole as usual.
    walk.expect_host_syn(walk.from_client("PA", walk.c + 1 + 1000, walk.k + 1, CHROME[1000:]))
    assert b"".join(r.payload for r in walk.host_synack()) == CHROME


def test_pieces_beyond_a_hole_are_sacked_when_the_client_repeats_a_segment():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:500])
    walk.from_client("PA", walk.c + 1 + 1000, walk.k + 1, CHROME[1000:1500])
    ack = walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:500])[0]
    assert ack.tcp.ack == (walk.c + 1 + 500) & 0xFFFFFFFF
    assert ack.options["SAck"] == ((walk.c + 1 + 1000) & 0xFFFFFFFF, (walk.c + 1 + 1500) & 0xFFFFFFFF)


def test_a_late_packet_never_moves_the_clients_timestamp_back():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    newest = walk.tsval()
    walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:1000], tsecr=None)
    late = (newest - 50) & 0xFFFFFFFF
    box.send(client_packet("A", walk.c + 1, walk.k + 1, ts=(late, walk.synack_ts)))
    walk.expect_host_syn(walk.from_client("PA", walk.c + 1 + 1000, walk.k + 1, CHROME[1000:]))
    replay = walk.host_synack()
    assert replay[0].ts[0] != late and replay[0].ts[0] == walk.client_ts


def test_until_the_host_acknowledges_the_replay_client_packets_echo_its_syn_ack_timestamp():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    walk.host_synack()
    # The replay was lost; the client retransmits a hello segment, echoing kracauer's old clock.
    out = walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:700])
    assert len(out) == 1 and out[0].ts[1] == walk.host_ts
    # Once the host has the hello, echoes are translated by the offset again.
    walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME), host_tick=40)
    out = walk.from_client("A", walk.c + 1 + len(CHROME), walk.k + 1, tsecr=walk.synack_ts + 5)
    assert out[0].ts[1] != walk.host_ts
