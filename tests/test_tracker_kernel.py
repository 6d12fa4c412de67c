"""The tracker's side of the kernel data path, with a flow table that acts as the BPF program would.

``KernelSim`` keeps the map entries and, for a packet "routed into the TUN",
does what kracauer/bpf/xlat.bpf.c does: a plain segment of a flow in the
map is rewritten with netstack.flow (the differential tests show the program
writes the same bytes) and its tracking fields are updated; anything else
goes to the tracker. So these tests walk connections whose middle the
tracker never sees, as in the daemon.
"""

from __future__ import annotations

import struct

import pytest

from netstack.flow import Flow, flow_key, to_client, to_host, track
from netstack.ip import IPv4Header, IPv6Header
from netstack.state import adopt, restore, snapshot
from netstack.tcp import FIN, RST, SYN, TcpHeader
from netstack.tracker import ESTABLISHED, KERNEL_NEVER, OFFLOAD_DELAY, OFFLOAD_PACKETS, Connection, Tracker, TrackerConfig
from tests.test_tracker import CHROME, LISTENERS, PREFIX, Box, Walk, parse, resolve

M32 = 0xFFFFFFFF


class KernelSim:
    """A FlowTable, and the program's fast path over it."""

    def __init__(self, refuse: bool = False) -> None:
        self.entries: dict[bytes, bytes] = {}
        self.refuse = refuse
        self.refuse_carry = False  # pass everything on, as for packets queued before the install
        self.now_ns = 0

    # FlowTable
    def install(self, key: bytes, flow: Flow) -> bool:
        if self.refuse:
            return False
        self.entries[key] = flow.pack()
        return True

    def take(self, key: bytes) -> Flow | None:
        value = self.entries.pop(key, None)
        return None if value is None else Flow.unpack(value)

    def items(self) -> list[tuple[bytes, Flow]]:
        return [(key, Flow.unpack(value)) for key, value in self.entries.items()]

    def peek(self, key: bytes) -> Flow | None:
        value = self.entries.get(key)
        return None if value is None else Flow.unpack(value)

    def last_seen(self, key: bytes) -> int | None:
        flow = self.peek(key)
        return None if flow is None else flow.last_seen

    # the program
    def carry(self, raw: bytes) -> bytes | None:
        """The translated packet if the program takes it, None if it goes on to the tracker."""
        if self.refuse_carry:
            return None
        buf = bytearray(64) + bytearray(raw)
        view = memoryview(buf)[64:]
        if raw[0] >> 4 == 4:
            ip = IPv4Header(view)
            tcp_at, tcp_len = ip.header_len, ip.total_len - ip.header_len
            key = flow_key(ip.src, ip.dst, raw[tcp_at:tcp_at + 4])
        else:
            ip = IPv6Header(view)
            tcp_at, tcp_len = 40, ip.payload_len
            key = flow_key(ip.src, ip.dst, raw[40:44])
        tcp = TcpHeader(view[tcp_at:tcp_at + tcp_len])
        value = self.entries.get(key)
        ttl = ip.ttl if raw[0] >> 4 == 4 else ip.hop_limit
        if value is None or tcp.flags & (SYN | FIN | RST) or ttl <= 1:
            return None
        flow = Flow.unpack(value)
        payload = tcp_len - tcp.header_len
        track(flow, tcp, payload, self.now_ns)
        if raw[0] >> 4 == 4:
            start = to_host(buf, 64, ip, tcp, tcp_len, flow, partial=False)
        else:
            start = to_client(buf, 64, ip, tcp, tcp_len, flow, partial=False, ident=flow.packets)
        flow.packets += 1
        flow.bytes += payload
        self.entries[key] = flow.pack()
        return bytes(buf[start:64 + tcp_at + tcp_len])


class KernelBox(Box):
    def __init__(self, refuse: bool = False, **config) -> None:
        super().__init__(**config)
        self.kernel = KernelSim(refuse)
        self.tracker.flows = self.kernel
        self.carried = 0

    def send(self, packet):
        raw = bytes(packet)
        self.kernel.now_ns = int(self.now * 1e9)
        out = self.kernel.carry(raw)
        if out is not None:
            self.carried += 1
            return [parse(out)]
        return super().send(packet)


def established(box: KernelBox) -> Walk:
    """A connection spliced and old enough for the kernel (OFFLOAD_DELAY after the splice)."""
    walk = Walk(box)
    walk.establish(CHROME)
    box.wait(OFFLOAD_DELAY)
    return walk


def the_connection(box: KernelBox):
    [value] = box.tracker.clients.values()
    return value


def test_a_connection_enters_the_kernel_once_the_host_has_the_hello_and_is_parked():
    box = KernelBox()
    walk = established(box)
    parked = the_connection(box)
    # No Connection object is kept: only what the map lacks, and no host-table entry or timer.
    assert parked.__class__ is tuple and parked[0].name == "www.example.com" and parked[1].route == "www"
    assert box.tracker.in_kernel == 1 and box.tracker.hosts == {}
    assert box.tracker.next_timer() is not None  # the parked sweep
    assert len(box.kernel.entries) == 2
    assert box.tracker.events["kernel_offloaded"] == 1
    # From now on the tracker sees nothing of a plain segment, both ways, yet each arrives translated.
    before = box.carried
    down = walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), b"x" * 1000, host_tick=30)
    assert down[0].v4 and down[0].tcp.seq == (walk.k + 1) & M32 and down[0].payload == b"x" * 1000
    up = walk.from_client("A", walk.c + 1 + len(CHROME), walk.k + 1001)
    assert not up[0].v4 and up[0].tcp.ack == (walk.h + 1001) & M32
    assert box.carried == before + 2


def test_a_short_exchange_stays_in_python_and_a_longer_one_enters_the_kernel_early():
    box = KernelBox()
    walk = Walk(box)
    walk.establish(CHROME)
    # A request and its answer, within a second: the map is not worth two updates and a rebuild.
    walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), b"a" * 100, host_tick=30)
    walk.from_client("A", walk.c + 1 + len(CHROME), walk.k + 101)
    assert isinstance(the_connection(box), Connection) and box.kernel.entries == {}
    # A transfer goes in as soon as it has OFFLOAD_PACKETS packets, without waiting for the delay.
    conn = the_connection(box)
    sent = 100
    while conn.packets_to_host + conn.packets_to_client < OFFLOAD_PACKETS:
        walk.from_host("PA", walk.h + 1 + sent, walk.c + 1 + len(CHROME), b"b" * 100, host_tick=31)
        sent += 100
    walk.from_host("PA", walk.h + 1 + sent, walk.c + 1 + len(CHROME), b"b" * 100, host_tick=31)
    assert the_connection(box).__class__ is tuple and len(box.kernel.entries) == 2


def test_nothing_enters_the_kernel_while_a_replayed_byte_is_unacknowledged():
    box = KernelBox()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    walk.host_synack()
    # The host acknowledges only part of the replay: the copy is still needed.
    walk.from_host("A", walk.h + 1, walk.c + 1 + 100, host_tick=10)
    box.wait(OFFLOAD_DELAY * 2)
    assert box.kernel.entries == {} and box.tracker.in_kernel == 0
    assert isinstance(the_connection(box), Connection)


def test_a_fin_after_kernel_traffic_is_checked_against_what_the_kernel_saw():
    box = KernelBox()
    walk = established(box)
    data = b"y" * 5000
    walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), data, host_tick=30)
    walk.from_client("A", walk.c + 1 + len(CHROME), walk.k + 1 + len(data))
    # The client's FIN acknowledges bytes only the kernel saw: the connection is
    # rebuilt from the map, so RFC 5961 §5.2 finds them sent.
    out = walk.from_client("FA", walk.c + 1 + len(CHROME), walk.k + 1 + len(data))
    assert len(out) == 1 and out[0].has("F") and out[0].tcp.ack == (walk.h + 1 + len(data)) & M32
    conn = the_connection(box)
    assert isinstance(conn, Connection) and conn.state == ESTABLISHED
    assert box.kernel.entries == {} and box.tracker.in_kernel == 0
    assert conn.host_nxt == (walk.k + 1 + len(data)) & M32
    assert conn.packets_to_client >= 2
    # The host's FIN and the last ACKs close it; the record has every byte, both ways, and the name.
    walk.from_host("FA", walk.h + 1 + len(data), walk.c + 2 + len(CHROME), host_tick=40)
    walk.from_client("A", walk.c + 2 + len(CHROME), walk.k + 2 + len(data))
    [record] = box.tracker.records
    assert record.outcome == "closed" and record.name == "www.example.com" and record.route == "www"
    assert (record.bytes_to_host, record.bytes_to_client) == (len(CHROME), len(data))
    assert record.hello_segments == 3


def test_a_host_rst_finds_a_parked_connection_through_the_map():
    box = KernelBox()
    walk = established(box)
    out = walk.from_host("R", walk.h + 1, 0)
    assert len(out) == 1 and out[0].v4 and out[0].has("R")
    assert box.tracker.clients == {} and box.kernel.entries == {}
    assert box.tracker.records[-1].outcome == "reset_by_host"


def test_a_plain_segment_the_program_passes_on_is_rewritten_here_and_the_connection_stays_parked():
    box = KernelBox()
    walk = established(box)
    before = dict(box.kernel.entries)
    # As if queued to the TUN before the flow went in: the tracker rewrites it with the map's entry.
    box.kernel.refuse_carry = True
    out = walk.from_client("PA", walk.c + 1 + len(CHROME), walk.k + 1, b"late")
    up = walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME) + 4, b"answer", host_tick=33)
    box.kernel.refuse_carry = False
    assert len(out) == 1 and not out[0].v4 and out[0].payload == b"late"
    assert out[0].tcp.ack == (walk.h + 1) & M32 and out[0].tcp.dport == walk.host_port
    assert len(up) == 1 and up[0].v4 and up[0].tcp.seq == (walk.k + 1) & M32
    assert the_connection(box).__class__ is tuple and box.tracker.events["kernel_segment_here"] == 2
    # What it saw is in the map, as if the program had translated it.
    up_key = next(k for k in box.kernel.entries if k[0] == 4)
    assert box.kernel.peek(up_key).seq_next == (walk.c + 1 + len(CHROME) + 4) & M32
    assert box.kernel.peek(up_key).packets == Flow.unpack(before[up_key]).packets + 1
    # A TTL of 1 is dropped (kracauer routes), without touching the connection.
    box.kernel.refuse_carry = True
    assert walk.from_client("A", walk.c + 5 + len(CHROME), walk.k + 7, ttl=1) == []
    box.kernel.refuse_carry = False
    assert box.tracker.drops["ttl_exceeded"] == 1 and the_connection(box).__class__ is tuple


def test_idle_timeout_counts_the_kernel_traffic_as_activity():
    box = KernelBox(idle_timeout=60.0)
    walk = established(box)
    for _ in range(3):
        box.wait(50)
        walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), b"z", host_tick=30)
    assert box.connections == 1
    box.wait(61)
    box.wait(10)
    assert box.connections == 0
    assert box.tracker.records[-1].outcome == "idle_timeout"
    assert box.tracker.records[-1].name == "www.example.com"
    assert box.kernel.entries == {}


def test_a_flow_the_kernel_refuses_stays_in_python_for_good():
    box = KernelBox(refuse=True)
    walk = established(box)
    conn = the_connection(box)
    assert conn.kernel == KERNEL_NEVER and box.tracker.events["kernel_install_failed"] == 1
    out = walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), b"x" * 10, host_tick=30)
    assert out[0].v4 and box.carried == 0
    assert box.tracker.events["kernel_install_failed"] == 1  # not retried per packet


def test_a_parked_connection_whose_entries_vanished_is_gone_and_counted():
    box = KernelBox()
    walk = established(box)
    box.kernel.entries.clear()  # removed from outside
    out = walk.from_client("PA", walk.c + 1 + len(CHROME), walk.k + 1, b"q")
    assert out == [] and box.tracker.events["kernel_flow_lost"] == 1
    assert box.tracker.clients == {} and box.tracker.in_kernel == 0


def test_a_new_connection_does_not_take_the_host_side_tuple_of_a_parked_one():
    box = KernelBox()
    first = established(box)
    # The same client port towards the second service address, which routes to the same host and port.
    second = Walk(box, service="192.0.2.11")
    second.handshake()
    syn = second.expect_host_syn(second.send_hello(CHROME))
    assert syn.tcp.sport != first.host_sport or syn.ip.src != first.host


def test_a_saved_parked_connection_is_restored_parked_or_taken_back():
    box = KernelBox()
    established(box)
    state = snapshot(box.tracker, box.now)
    fresh = KernelBox()
    fresh.kernel.entries = dict(box.kernel.entries)
    assert restore(fresh.tracker, state, fresh.now) == 1
    assert the_connection(fresh) == the_connection(box) and fresh.tracker.in_kernel == 1
    # Restored without a kernel path: the tracker rebuilds it from the map the old process left.
    python_only = Tracker(TrackerConfig(prefix=PREFIX), LISTENERS, resolve, lambda: 4)
    restore(python_only, state, box.now)
    left = KernelSim()
    left.entries = dict(box.kernel.entries)
    assert python_only.unpark_all(box.now, left) == 1
    conn = next(iter(python_only.clients.values()))
    assert isinstance(conn, Connection) and python_only.in_kernel == 0 and left.entries == {}
    assert conn.decision.name == "www.example.com"
    # ... and without that map, it cannot be.
    again = Tracker(TrackerConfig(prefix=PREFIX), LISTENERS, resolve, lambda: 4)
    restore(again, state, box.now)
    assert again.unpark_all(box.now, None) == 0 and again.clients == {}


@pytest.mark.parametrize("client_wscale, host_wscale, host_ts", [(7, 9, 0xFFFFFF00), (None, 9, 0x10), (7, None, None)])
def test_flows_left_by_a_crashed_process_are_adopted_with_the_same_rewrite(client_wscale, host_wscale, host_ts):
    box = KernelBox()
    walk = Walk(box, client_wscale=client_wscale, host_wscale=host_wscale, host_ts=host_ts)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    walk.host_synack()
    # Keep the original: unpark after the splice to see every field the splice set.
    walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME), host_tick=20)
    box.wait(OFFLOAD_DELAY)
    data = b"d" * 3000
    walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), data, host_tick=30)
    [(key, parked)] = box.tracker.parked()
    original = box.tracker._unpark(key, parked, box.now)
    box.tracker._offload(original, box.now)
    # The process dies; the map lives on. A new tracker takes the connection from it.
    fresh = KernelBox()
    fresh.kernel.entries = dict(box.kernel.entries)
    adopted, stale = adopt(fresh.tracker, ((k, Flow.unpack(v)) for k, v in fresh.kernel.entries.items()), box.now + 5)
    assert (adopted, stale) == (1, [])
    [(key, parked)] = fresh.tracker.parked()
    conn = fresh.tracker._unpark(key, parked, box.now + 5)
    for name in ("client_addr", "client_port", "host", "src6", "host_sport", "delta", "ts_off", "c2h_shift",
                 "h2c_shift", "client_wscale", "our_wscale", "client_isn", "our_isn", "host_isn", "client_mss",
                 "host_key", "client_key"):
        assert getattr(conn, name) == getattr(original, name), name
    fresh.tracker._offload(conn, box.now + 5)
    # Its teardown works in the new process, and the record counts the bytes of the old one.
    walk.box = fresh
    walk.from_client("FA", walk.c + 1 + len(CHROME), walk.k + 1 + len(data))
    walk.from_host("FA", walk.h + 1 + len(data), walk.c + 2 + len(CHROME), host_tick=40)
    walk.from_client("A", walk.c + 2 + len(CHROME), walk.k + 2 + len(data))
    [record] = fresh.tracker.records
    assert record.outcome == "closed" and record.bytes_to_client == len(data)
    assert record.name is None


def test_adoption_drops_half_flows_and_flows_of_listeners_that_are_gone():
    box = KernelBox()
    established(box)
    fresh = KernelBox()
    entries = dict(box.kernel.entries)
    client_key = next(k for k in entries if k[0] == 4)
    host_key = next(k for k in entries if k[0] == 6)
    assert adopt(fresh.tracker, {client_key: Flow.unpack(entries[client_key])}.items(), box.now) == (0, [client_key])
    gone = Tracker(TrackerConfig(prefix=PREFIX), LISTENERS[1:], resolve, lambda: 4)
    adopted, stale = adopt(gone, ((k, Flow.unpack(v)) for k, v in entries.items()), box.now)
    assert adopted == 0 and sorted(stale) == sorted([client_key, host_key])
    assert struct.unpack_from("!H", client_key, 38)[0] == 443


def test_a_connection_whose_client_sent_nothing_goes_in_once_the_host_speaks():
    # A tcp listener: no hello; the host speaks first (SSH, SMTP, the benchmark's holders).
    box = KernelBox()
    walk = Walk(box, dport=22)
    synack = walk.syn()[0]
    walk.k = synack.tcp.seq
    walk.synack_ts = synack.ts[0] if synack.ts else 0
    walk.expect_host_syn(walk.from_client("A", walk.c + 1, walk.k + 1))
    replay = walk.host_synack()
    assert len(replay) == 1 and replay[0].payload == b""
    out = walk.from_host("PA", walk.h + 1, walk.c + 1, b"S", host_tick=5)
    assert out[0].v4 and out[0].payload == b"S"
    box.wait(OFFLOAD_DELAY)
    assert the_connection(box).__class__ is tuple and len(box.kernel.entries) == 2


def test_a_process_with_no_kernel_path_and_no_map_left_counts_parked_connections_lost_and_goes_on():
    # kracauer.daemon.take_back, which the daemon and every worker call at start without a kernel path:
    # a connection saved as carried by the kernel must not stay parked in a loop with no map to read
    # (a segment of it would look the map up), whether or not the old map is still there.
    from kracauer.daemon import take_back
    box = KernelBox()
    walk = established(box)
    state = snapshot(box.tracker, box.now)
    fresh = Box()
    assert restore(fresh.tracker, state, box.now) == 1 and fresh.tracker.in_kernel == 1
    assert take_back(fresh.tracker, None) == 0
    assert fresh.tracker.in_kernel == 0 and fresh.tracker.clients == {} and fresh.tracker.parked() == []
    # The client's next segment is a connection the box does not know: dropped, no exception.
    fresh.now = box.now
    walk.box = fresh
    assert walk.from_client("PA", walk.c + 1 + len(CHROME), walk.k + 1, b"q") == []
    assert fresh.tracker.drops["no_connection"] == 1
    # With the map left, the same restore is taken back whole.
    left = KernelSim()
    left.entries = dict(box.kernel.entries)
    again = Box()
    restore(again.tracker, state, box.now)
    assert take_back(again.tracker, left) == 1 and left.entries == {}
    assert isinstance(the_connection(again), Connection)
