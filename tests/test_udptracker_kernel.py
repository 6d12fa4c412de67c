"""netstack.udptracker's side of the kernel data path: quic flows in the kernel's flow map.

``UdpKernelSim`` is a FlowTable (a dict of packed entries) and, for a
datagram "routed into the TUN", does what the BPF program does with UDP: a
datagram with an entry is rewritten as netstack.udp rewrites it (the lead's
differential tests show the program writes the same bytes), its entry
counted (packets, payload bytes, last_seen); what the program passes on
(IPv4 checksum 0, fragments, IP options, TTL or hop limit 1, no entry) goes
to the tracker. So these tests walk flows whose middle the tracker never
sees, as in the daemon.
"""

from __future__ import annotations

import ipaddress
import struct
import types

import pytest
from scapy.layers.inet import IP, UDP, IPerror
from scapy.packet import Raw

from netstack.flow import L4_TCP, L4_UDP, Flow, flow_key, key_l4
from netstack.ip import IPv4Header, IPv6Header
from netstack.state import StateError, adopt, decode, encode, restore, snapshot
from netstack.tracker import Listener, Tracker, TrackerConfig
from netstack.udp import PROTO_UDP, UdpHeader, to_client, to_host
from netstack.udptracker import KERNEL_IN, KERNEL_NEVER, KERNEL_NO, UdpFlow
from tests.test_tracker_kernel import KernelSim
from tests.test_udptracker import (
    AIOQUIC, CAPTURES, CLIENT, CLIENT6, CLIENT_B, CLIENT_B6, HOST_CID, HOST_HANDSHAKE, HOST_WWW, LISTENERS, PREFIX,
    SERVICE, Counter32, Link, from_client, from_host, make_tracker, parse, resolve,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
U16 = struct.Struct("!H")
IDLE = 60.0  # TrackerConfig's udp_idle_timeout
SHORT = bytes([0x40]) + HOST_CID + b"1-rtt" * 20  # a short header (RFC 9000 §17.3) naming the host's CID
SERVICE_B = "192.0.2.11"


class UdpKernelSim(KernelSim):
    """A FlowTable (tests.test_tracker_kernel's), and the program's UDP path over it."""

    def __init__(self, refuse: bool = False, refuse_second: bool = False) -> None:
        super().__init__(refuse)
        self.refuse_second = refuse_second  # the host side's install fails, the client side's works
        self.installs = 0
        self.pass_all = False  # hand everything to the tracker (as for datagrams queued before the install)
        self.map = types.SimpleNamespace(close=lambda: None)  # what the daemon closes after a take-back

    def install(self, key: bytes, flow: Flow) -> bool:
        self.installs += 1
        if self.refuse_second and self.installs % 2 == 0:
            return False
        return super().install(key, flow)

    # the program
    def carry(self, raw: bytes) -> bytes | None:
        """The translated datagram if the program takes it, None if it goes on to the tracker."""
        if self.pass_all:
            return None
        buf = bytearray(64) + bytearray(raw)
        view = memoryview(buf)[64:]
        if raw[0] >> 4 == 4:
            ip = IPv4Header(view)
            if ip.proto != PROTO_UDP or ip.is_fragment or ip.header_len != 20 or ip.ttl <= 1:
                return None
            data = view[20:ip.total_len]
        else:
            ip = IPv6Header(view)
            if ip.next_header != PROTO_UDP or ip.hop_limit <= 1:
                return None
            data = view[40:40 + ip.payload_len]
        udp = UdpHeader(data)
        # As load_udp in xlat.bpf.c: a zero checksum goes to Python both ways (IPv4's must be computed
        # whole, IPv6's is invalid).
        if udp.length != len(data) or udp.checksum == 0:
            return None
        value = self.entries.get(flow_key(ip.src, ip.dst, raw[len(raw) - len(data):][:4], L4_UDP))
        if value is None:
            return None
        flow = Flow.unpack(value)
        if raw[0] >> 4 == 4:
            start = to_host(buf, 64, 20, ip.ttl, ip.tos, udp, flow.src, flow.dst, flow.sport, flow.dport, False)
            end = 64 + 20 + udp.length
        else:
            # The Identification: the entry's packets before this datagram is counted.
            start = to_client(buf, 64, ip.hop_limit, ip.traffic_class, udp, flow.src, flow.dst, flow.sport,
                              flow.dport, False, flow.packets & 0xFFFF)
            end = 64 + 40 + udp.length
        flow.packets += 1
        flow.bytes += udp.length - 8
        flow.last_seen = self.now_ns
        self.entries[flow_key(ip.src, ip.dst, bytes(data[:4]), L4_UDP)] = flow.pack()
        return bytes(buf[start:end])


class Box:
    """A tracker behind the simulated program, and a clock."""

    def __init__(self, kernel: bool = True, tracker: Tracker | None = None, sim: UdpKernelSim | None = None,
                 **config) -> None:
        self.tracker = tracker if tracker is not None else make_tracker(**config)
        self.kernel = sim if sim is not None else UdpKernelSim()
        if kernel:
            self.tracker.flows = self.kernel
        self.now = 1.0
        self.carried = 0

    @property
    def udp(self):
        return self.tracker.udp

    def send(self, raw: bytes) -> list[bytes]:
        if self.tracker.flows is not None:
            self.kernel.now_ns = int(self.now * 1e9)
            out = self.kernel.carry(raw)
            if out is not None:
                self.carried += 1
                return [out]
        return self.tracker.receive(raw, self.now)

    def receive(self, raw: bytes, now: float) -> list[bytes]:
        """Tracker.receive's signature (for Link), through the program."""
        self.now = now
        return self.send(raw)

    def bind(self, sport: int = 50000, client: str = CLIENT) -> UdpFlow:
        """A flow whose Initials went to the host (bound, not in the kernel yet)."""
        for datagram in AIOQUIC:
            self.send(from_client(datagram, sport, client))
        return self.udp.flows[V4(client).packed + V4(SERVICE).packed + U16.pack(sport) + U16.pack(443)]

    def offloaded(self, sport: int = 50000) -> UdpFlow:
        """A bound flow the host's Handshake (its CID learnt) and then a short header put in the kernel."""
        flow = self.bind(sport)
        self.now += 0.1
        self.send(from_host(HOST_HANDSHAKE, dport=sport))
        self.now += 0.1
        self.send(from_host(SHORT, dport=sport))
        assert flow.kernel == KERNEL_IN
        return flow


def keys(sport: int = 50000, client: str = CLIENT, client6: str = CLIENT6, host_sport: int | None = None):
    """The contract's two keys of a flow from `client`:`sport` to SERVICE:443, bound to HOST_WWW:443."""
    host_sport = sport if host_sport is None else host_sport
    return (flow_key(V4(client).packed, V4(SERVICE).packed, U16.pack(sport) + U16.pack(443), L4_UDP),
            flow_key(V6(HOST_WWW).packed, V6(client6).packed, U16.pack(443) + U16.pack(host_sport), L4_UDP))


# ============================================================ going in


def test_a_bound_flow_goes_in_at_the_hosts_first_short_header_and_not_before():
    box = Box()
    flow = box.bind()
    assert flow.kernel == KERNEL_NO and box.kernel.entries == {}
    # The client's own short headers, and the host's long headers, leave it in Python.
    box.send(from_client(b"\x40" + b"c" * 50))
    box.send(from_host(HOST_HANDSHAKE))
    assert box.kernel.entries == {} and box.kernel.installs == 0 and box.udp.cids  # the SCID was learnt
    (out,) = box.send(from_host(SHORT))
    assert parse(out)[UDP].dport == 50000  # the datagram that triggers it is translated here
    assert set(box.kernel.entries) == set(keys())
    assert flow.kernel == KERNEL_IN and box.udp.in_kernel == 1
    assert box.tracker.events["kernel_offloaded_udp"] == 1
    # From now on the kernel carries it, both ways.
    box.send(from_client(b"\x40" + b"c" * 50))
    box.send(from_host(SHORT))
    assert box.carried == 2
    assert flow.datagrams_to_host == len(AIOQUIC) + 1 and flow.datagrams_to_client == 2  # Python's counts did not move


def test_the_two_entries_hold_exactly_the_contracts_rewrite():
    box = Box()
    flow = box.offloaded()
    up_key, down_key = keys()
    assert key_l4(up_key) == key_l4(down_key) == L4_UDP
    start_ns, last_ns = int(flow.start * 1e9), int(flow.last_seen * 1e9)
    assert box.kernel.peek(up_key) == Flow(
        src=V6(CLIENT6).packed, dst=V6(HOST_WWW).packed, sport=50000, dport=443, mss=0, packets=len(AIOQUIC),
        start_ns=start_ns, last_seen=last_ns)
    assert box.kernel.peek(down_key) == Flow(
        src=V4(SERVICE).packed, dst=V4(CLIENT).packed, sport=443, dport=50000, mss=0, packets=2,
        start_ns=start_ns, last_seen=last_ns)
    assert Flow.unpack(box.kernel.entries[up_key]).bytes == 0


def test_the_host_side_entry_has_the_source_port_kracauer_chose_not_the_clients():
    box = Box()
    # Another flow already uses the client's port towards that host (DESIGN.md, Collisions).
    taken = V6(HOST_WWW).packed + V6(CLIENT6).packed + U16.pack(443) + U16.pack(50000)
    box.udp.hosts[taken] = "another flow"
    flow = box.bind()
    assert flow.host_sport != 50000
    box.send(from_host(HOST_HANDSHAKE, dport=flow.host_sport))
    box.send(from_host(SHORT, dport=flow.host_sport))
    up_key, down_key = keys(host_sport=flow.host_sport)
    assert set(box.kernel.entries) == {up_key, down_key}
    assert box.kernel.peek(up_key).sport == flow.host_sport and box.kernel.peek(down_key).dport == 50000
    (out,) = box.send(from_client(b"\x40" * 30))
    assert box.carried == 1 and parse(out)[UDP].sport == flow.host_sport


def test_a_datagram_the_program_passes_on_is_translated_here_and_the_entries_stay():
    box = Box()
    flow = box.offloaded()
    before = dict(box.kernel.entries)
    # IPv4 without a checksum: the program leaves it to Python, which computes the IPv6 one.
    (up,) = box.send(from_client(b"\x40" + b"z" * 80, checksum=0))
    pkt = parse(up)
    assert (pkt.src, pkt.dst, pkt[UDP].sport, bytes(pkt[UDP].payload)) == (CLIENT6, HOST_WWW, 50000, b"\x40" + b"z" * 80)
    box.kernel.pass_all = True  # e.g. queued in the TUN before the install
    (down,) = box.send(from_host(SHORT))
    assert (parse(down).dst, parse(down)[UDP].dport) == (CLIENT, 50000)
    assert box.carried == 0 and box.kernel.entries == before and flow.kernel == KERNEL_IN
    assert (flow.datagrams_to_host, flow.datagrams_to_client) == (len(AIOQUIC) + 1, 3)
    assert box.tracker.events["kernel_offloaded_udp"] == 1  # not installed again


def test_a_hosts_zero_checksum_datagram_of_a_flow_in_the_kernel_is_passed_on_and_dropped_here():
    box = Box()
    flow = box.offloaded()
    before = dict(box.kernel.entries)
    down = flow.datagrams_to_client
    assert box.send(from_host(SHORT, checksum=0)) == []
    assert box.carried == 0 and box.tracker.drops["udp_zero_checksum"] == 1
    assert box.kernel.entries == before and flow.datagrams_to_client == down and flow.kernel == KERNEL_IN
    (out,) = box.send(from_host(SHORT))  # the next, with its checksum, is the kernel's
    assert box.carried == 1 and parse(out).dst == CLIENT


def host_datagrams(box: Box, n: int) -> list[bytes]:
    return [box.send(from_host(SHORT + bytes([i]) * i))[0] for i in range(n)]


def test_the_ipv4_identification_is_the_datagrams_sent_to_the_client_before_on_both_paths():
    python, kernel = Box(kernel=False), Box()
    outputs = []
    for box in (python, kernel):
        box.bind()
        out = box.send(from_host(HOST_HANDSHAKE))
        outputs.append(out + host_datagrams(box, 6))
    assert kernel.carried == 5  # the first short header went through Python
    assert [parse(p).id for p in outputs[0]] == list(range(7))
    # The same bytes whichever path translated them (the lead's differential test compares the program too).
    assert outputs[0] == outputs[1]


def test_no_kernel_path_no_entries_and_no_kernel_events():
    box = Box(kernel=False)
    flow = box.bind()
    box.send(from_host(HOST_HANDSHAKE))
    host_datagrams(box, 3)
    assert flow.kernel == KERNEL_NO and box.udp.in_kernel == 0 and box.kernel.installs == 0
    assert not [kind for kind in box.tracker.events if kind.startswith("kernel_")]
    box.tracker.on_timer(box.now + IDLE + 1)
    (record,) = box.tracker.records
    assert (record.outcome, record.packets_to_host, record.packets_to_client) == ("idle_timeout", len(AIOQUIC), 4)


def test_an_aioquic_connection_goes_into_the_kernel_and_its_stream_data_goes_through_it():
    from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
    box = Box()
    link = Link(box)
    link.pump()
    assert any(isinstance(e, HandshakeCompleted) for e in link.events(link.client))
    assert box.udp.in_kernel == 1
    carried = box.carried
    link.client.send_stream_data(0, b"GET /" * 100, end_stream=True)
    link.pump()
    received = [e for e in link.events(link.server) if isinstance(e, StreamDataReceived)]
    assert b"".join(e.data for e in received) == b"GET /" * 100
    assert box.carried > carried


# ============================================================ the kernel's activity and counts


def test_kernel_activity_keeps_a_flow_alive_and_none_ends_it():
    box = Box()
    flow = box.offloaded()
    went_in = box.now
    box.now = went_in + 50
    box.send(from_host(SHORT))  # carried: Python's last_seen does not move
    assert box.carried == 1 and flow.last_seen == went_in
    box.tracker.on_timer(went_in + IDLE + 1)
    assert flow.client_key in box.udp.flows
    box.tracker.on_timer(went_in + 50 + IDLE - 0.5)
    assert flow.client_key in box.udp.flows
    box.tracker.on_timer(went_in + 50 + IDLE + 0.5)
    assert flow.client_key not in box.udp.flows and box.kernel.entries == {} and box.udp.in_kernel == 0
    assert box.tracker.records[-1].outcome == "idle_timeout"


def test_either_entry_counts_as_activity():
    box = Box()
    flow = box.offloaded()
    went_in = box.now
    box.now = went_in + 40
    box.send(from_client(b"\x40" * 20))  # the client side's entry only
    box.tracker.on_timer(went_in + IDLE + 1)
    assert flow.client_key in box.udp.flows
    box.tracker.on_timer(went_in + 40 + IDLE + 1)
    assert flow.client_key not in box.udp.flows


def test_the_record_counts_the_kernels_datagrams_and_bytes_once():
    box = Box()
    flow = box.offloaded()
    python_up, python_down = flow.datagrams_to_host, flow.datagrams_to_client
    python_bytes_up, python_bytes_down = flow.bytes_to_host, flow.bytes_to_client
    for size in (10, 200, 1200):
        box.send(from_client(b"\x40" * size))
    for size in (30, 1300):
        box.send(from_host(b"\x40" * size))
    box.send(from_client(b"\x40" * 7, checksum=0))  # passed on: counted here
    assert box.carried == 5
    box.tracker.on_timer(box.now + IDLE + 1)
    (record,) = box.tracker.records
    assert record.packets_to_host == python_up + 3 + 1 and record.packets_to_client == python_down + 2
    assert record.bytes_to_host == python_bytes_up + 1410 + 7
    assert record.bytes_to_client == python_bytes_down + 1330
    assert box.kernel.entries == {}


@pytest.mark.parametrize("end", ["host_gone", "finish_all"])
def test_every_end_takes_the_entries_and_counts_them(end):
    box = Box()
    flow = box.offloaded()
    box.send(from_client(b"\x40" * 100))
    if end == "host_gone":
        box.tracker.reset_host(V6(HOST_WWW).packed, box.now)
    else:
        box.udp.finish_all("stopped", box.now)
    (record,) = box.tracker.records
    assert record.outcome == end if end == "host_gone" else record.outcome == "stopped"
    assert record.packets_to_host == len(AIOQUIC) + 1 and record.bytes_to_host == flow.bytes_to_host
    assert box.kernel.entries == {} and box.udp.in_kernel == 0


@pytest.mark.parametrize("refuse, refuse_second", [(True, False), (False, True)], ids=["both", "host_side"])
def test_a_flow_the_map_refuses_stays_in_python_for_good(refuse, refuse_second):
    box = Box(sim=UdpKernelSim(refuse=refuse, refuse_second=refuse_second))
    flow = box.bind()
    box.send(from_host(SHORT))
    assert flow.kernel == KERNEL_NEVER and box.kernel.entries == {} and box.udp.in_kernel == 0
    assert box.tracker.events["kernel_install_failed"] == 1
    installs = box.kernel.installs
    (out,) = box.send(from_host(SHORT))
    assert parse(out).dst == CLIENT and box.kernel.installs == installs  # not tried again
    assert "kernel_offloaded_udp" not in box.tracker.events


def test_a_refused_install_leaves_no_entry_of_the_flow_not_even_a_stale_one():
    box = Box(sim=UdpKernelSim(refuse=True))
    flow = box.bind()
    # Left by a process that crashed.
    box.kernel.entries[keys()[1]] = Flow(src=V4(SERVICE).packed, dst=V4(CLIENT).packed, sport=443, dport=1).pack()
    box.kernel.pass_all = True
    box.send(from_host(SHORT))
    assert flow.kernel == KERNEL_NEVER and box.kernel.entries == {}


def test_a_flow_whose_entries_vanished_ends_at_its_timer_counted():
    box = Box()
    flow = box.offloaded()
    up_key, down_key = keys()
    del box.kernel.entries[down_key]  # bpftool, a cleanup while running
    box.tracker.on_timer(flow.timer_at)
    assert flow.client_key not in box.udp.flows and not box.udp.hosts and not box.udp.cids
    assert box.tracker.events["kernel_flow_lost"] == 1 and box.tracker.records[-1].outcome == "kernel_flow_lost"
    assert box.kernel.entries == {} and box.udp.in_kernel == 0  # the other half went too


# ============================================================ rebinding


def test_a_rebinding_while_the_old_flow_is_in_the_kernel_reaches_the_same_host_and_goes_in_too():
    box = Box()
    old = box.offloaded()
    (out,) = box.send(from_client(SHORT, sport=61000, client=CLIENT_B))
    assert box.carried == 0  # no entry for the new 4-tuple: Python follows the rebinding
    pkt = parse(out)
    assert (pkt.src, pkt.dst, pkt[UDP].sport) == (CLIENT_B6, HOST_WWW, 61000)
    new = box.udp.flows[V4(CLIENT_B).packed + V4(SERVICE).packed + U16.pack(61000) + U16.pack(443)]
    assert new.kernel == KERNEL_NO and old.kernel == KERNEL_IN and box.tracker.events["quic_rebinding"] == 1
    # The host answers on the new path: the new flow goes in on the same rule.
    box.send(from_host(SHORT, dport=61000, dst=CLIENT_B6))
    assert new.kernel == KERNEL_IN and len(box.kernel.entries) == 4 and box.udp.in_kernel == 2
    assert set(keys(61000, CLIENT_B, CLIENT_B6)) <= set(box.kernel.entries)
    # The old path still works through the kernel until it idles out.
    box.send(from_client(b"\x40" * 10))
    box.send(from_client(b"\x40" * 10, sport=61000, client=CLIENT_B))
    assert box.carried == 2
    box.now += 30
    box.send(from_client(b"\x40" * 10, sport=61000, client=CLIENT_B))
    box.tracker.on_timer(box.now - 30 + IDLE + 1)
    assert list(box.udp.flows.values()) == [new] and len(box.kernel.entries) == 2


def two_listener_tracker() -> Tracker:
    listeners = LISTENERS + [Listener(V4(SERVICE_B).packed, 443, "quic")]
    return Tracker(TrackerConfig(prefix=PREFIX), listeners, resolve, Counter32())


def test_a_new_flow_does_not_take_the_host_side_tuple_of_one_in_the_kernel():
    box = Box(tracker=two_listener_tracker())
    first = box.offloaded()
    # The same client and port to another service address routed to the same host and port.
    for datagram in AIOQUIC:
        out = box.send(bytes(IP(src=CLIENT, dst=SERVICE_B, flags="DF") / UDP(sport=50000, dport=443) / Raw(datagram)))
    second = box.udp.flows[V4(CLIENT).packed + V4(SERVICE_B).packed + U16.pack(50000) + U16.pack(443)]
    assert second.host_sport != first.host_sport and parse(out[0])[UDP].sport == second.host_sport
    box.send(from_host(SHORT, dport=second.host_sport))
    assert second.kernel == KERNEL_IN and len(box.kernel.entries) == 4
    (back,) = box.send(from_host(SHORT, dport=second.host_sport))
    assert parse(back).src == SERVICE_B and box.kernel.peek(keys()[1]).dst == V4(CLIENT).packed


# ============================================================ restarts


def saved_with_kernel_traffic():
    """A tracker with a flow in the kernel that carried 2 datagrams each way, saved."""
    box = Box()
    flow = box.offloaded()
    for size in (100, 200):
        box.send(from_client(b"\x40" * size))
        box.send(from_host(b"\x40" * (size + 1)))
    python = (flow.datagrams_to_host, flow.datagrams_to_client, flow.bytes_to_host, flow.bytes_to_client)
    box.now += 1
    state = decode(encode(snapshot(box.tracker, box.now)))
    return box, python, state


def test_a_saved_flow_in_the_kernel_counts_what_the_kernel_carried_so_far():
    box, (up, down, bytes_up, bytes_down), state = saved_with_kernel_traffic()
    (entry,) = state["udp_flows"]
    assert len(entry) == 21
    assert entry[15:19] == [up + 2, down + 2, bytes_up + 300, bytes_down + 302]
    # Its idle age is from the kernel's last datagram, one second before the save.
    assert entry[14] == pytest.approx(1.0)
    up_entry, down_entry = box.kernel.peek(keys()[0]), box.kernel.peek(keys()[1])
    assert entry[20] == [up_entry.packets, down_entry.packets, up_entry.bytes, down_entry.bytes]
    assert len(box.kernel.entries) == 2  # the map and the program stay for the next process


def test_a_restored_flow_whose_entries_are_there_stays_in_the_kernel_and_counts_each_datagram_once():
    old, (up, down, bytes_up, bytes_down), state = saved_with_kernel_traffic()
    box = Box(sim=old.kernel)  # the next process, with the pinned map
    box.now = old.now + 5
    box.send(from_client(b"\x40" * 50))  # the kernel carries on between the save and the restore
    assert restore(box.tracker, state, box.now) == 1
    (flow,) = box.udp.flows.values()
    assert flow.kernel == KERNEL_IN and box.udp.in_kernel == 1
    box.send(from_client(b"\x40" * 60))
    box.send(from_host(b"\x40" * 70))
    assert box.carried == 3
    box.tracker.on_timer(box.now + IDLE + 1)
    (record,) = box.tracker.records
    assert (record.packets_to_host, record.packets_to_client) == (up + 2 + 2, down + 2 + 1)
    assert (record.bytes_to_host, record.bytes_to_client) == (bytes_up + 300 + 110, bytes_down + 302 + 70)
    assert record.name == CAPTURES["aioquic"]["sni"] and box.kernel.entries == {}


def test_a_restored_flow_whose_entries_are_gone_is_translated_here_and_goes_in_again():
    _, (up, down, _, _), state = saved_with_kernel_traffic()
    box = Box()  # a map made anew
    assert restore(box.tracker, state, 10.0) == 1
    (flow,) = box.udp.flows.values()
    assert flow.kernel == KERNEL_NO and box.udp.in_kernel == 0
    (out,) = box.send(from_client(b"\x40" * 50))
    assert parse(out).dst == HOST_WWW and box.carried == 0
    box.send(from_host(SHORT))
    assert flow.kernel == KERNEL_IN and box.kernel.peek(keys()[1]).packets == down + 2 + 1


def test_a_restored_flow_finds_one_entry_left_takes_it_and_stays_here():
    old, _, state = saved_with_kernel_traffic()
    del old.kernel.entries[keys()[0]]
    box = Box(sim=old.kernel)
    restore(box.tracker, state, 10.0)
    (flow,) = box.udp.flows.values()
    assert flow.kernel == KERNEL_NO and box.kernel.entries == {}


def test_a_saved_flow_of_an_older_kracauer_with_20_values_is_restored_in_python():
    _, (up, _, _, _), state = saved_with_kernel_traffic()
    state["udp_flows"] = [entry[:20] for entry in state["udp_flows"]]
    box = Box(kernel=False)
    assert restore(box.tracker, state, 10.0) == 1
    (flow,) = box.udp.flows.values()
    assert flow.kernel == KERNEL_NO and flow.datagrams_to_host == up + 2


@pytest.mark.parametrize("damage", [[1, 2, 3], [1, 2, 3, -4], "many", [1, 2, 3, 4, 5]])
def test_damaged_kernel_counters_in_a_saved_flow_are_an_error(damage):
    _, _, state = saved_with_kernel_traffic()
    state["udp_flows"][0][20] = damage
    box = Box()
    with pytest.raises(StateError):
        restore(box.tracker, state, 10.0)
    assert not box.udp.flows and box.udp.in_kernel == 0
    state["udp_flows"][0].append(None)  # 22 values
    state["udp_flows"][0][20] = None
    with pytest.raises(StateError):
        restore(box.tracker, state, 10.0)


def test_a_process_without_a_kernel_path_takes_restored_flows_back_from_the_map_left():
    old, (up, down, bytes_up, bytes_down), state = saved_with_kernel_traffic()
    old.send(from_client(b"\x40" * 40))  # carried after the save, before the new process stopped the program
    box = Box(kernel=False)
    assert restore(box.tracker, state, 10.0) == 1
    (flow,) = box.udp.flows.values()
    assert flow.kernel == KERNEL_IN and box.udp.in_kernel == 1  # until it is taken back
    assert box.udp.take_back_all(old.kernel) == 1
    assert flow.kernel == KERNEL_NO and box.udp.in_kernel == 0 and old.kernel.entries == {}
    assert (flow.datagrams_to_host, flow.bytes_to_host) == (up + 2 + 1, bytes_up + 300 + 40)
    (out,) = box.send(from_host(SHORT))
    assert parse(out).dst == CLIENT
    box.tracker.on_timer(box.now + IDLE + 100)
    assert box.tracker.records[-1].packets_to_client == down + 2 + 1


def test_without_a_map_left_restored_flows_go_on_here_with_the_counts_they_were_saved_with():
    _, (up, _, _, _), state = saved_with_kernel_traffic()
    box = Box(kernel=False)
    restore(box.tracker, state, 10.0)
    assert box.udp.take_back_all(None) == 0
    (flow,) = box.udp.flows.values()
    assert flow.kernel == KERNEL_NO and box.udp.in_kernel == 0 and flow.datagrams_to_host == up + 2
    # Saved again from here: no kernel counters.
    assert snapshot(box.tracker, 11.0)["udp_flows"][0][20] is None


def test_the_daemons_take_back_takes_quic_flows_too():
    from kracauer.daemon import Daemon
    old, (up, _, _, _), state = saved_with_kernel_traffic()
    box = Box(kernel=False)
    restore(box.tracker, state, 10.0)
    daemon = types.SimpleNamespace(tracker=box.tracker, _leftover_flows=old.kernel, _leftover_pins=None)
    Daemon._take_back(daemon)
    (flow,) = box.udp.flows.values()
    assert flow.kernel == KERNEL_NO and old.kernel.entries == {} and daemon._leftover_flows is None
    assert flow.datagrams_to_host == up + 2


# ============================================================ adoption after a crash


def tcp_pair(sport: int) -> dict[bytes, Flow]:
    """A TCP connection's two entries from CLIENT:`sport` to the tls listener SERVICE:443, host HOST_WWW."""
    up = Flow(src=V6(CLIENT6).packed, dst=V6(HOST_WWW).packed, sport=sport, dport=443, seq_base=1000, start_ns=10**9,
              last_seen=2 * 10**9)
    down = Flow(src=V4(SERVICE).packed, dst=V4(CLIENT).packed, sport=443, dport=sport, seq_base=5000,
                start_ns=10**9, last_seen=2 * 10**9)
    return {flow_key(V4(CLIENT).packed, V4(SERVICE).packed, U16.pack(sport) + U16.pack(443), L4_TCP): up,
            flow_key(V6(HOST_WWW).packed, V6(CLIENT6).packed, U16.pack(443) + U16.pack(sport), L4_TCP): down}


def test_a_crashed_processs_quic_flows_are_adopted_in_the_kernel_beside_its_tcp_connections():
    crashed = Box()
    crashed.offloaded()
    crashed.send(from_client(b"\x40" * 100))
    crashed.send(from_host(b"\x40" * 200))
    entries = crashed.kernel.entries
    # A TCP connection with the very same 4-tuple: only the transport byte tells the keys apart.
    tcp = tcp_pair(50000)
    entries.update((key, flow.pack()) for key, flow in tcp.items())
    box = Box(sim=crashed.kernel)
    box.now = crashed.now + 1
    adopted, stale = adopt(box.tracker, box.kernel.items(), box.now)
    assert (adopted, stale) == (2, [])
    assert len(box.tracker.clients) == 1 and box.tracker.in_kernel == 1  # the TCP one, parked
    (flow,) = box.udp.flows.values()
    assert flow.kernel == KERNEL_IN and box.udp.in_kernel == 1 and flow.state == 1  # BOUND
    assert (flow.client_addr, flow.client_port, flow.host, flow.src6, flow.host_sport) == (
        V4(CLIENT).packed, 50000, V6(HOST_WWW).packed, V6(CLIENT6).packed, 50000)
    # It goes on in the kernel, a passed datagram is translated here, and its record has the kernel's counts.
    box.send(from_client(b"\x40" * 10))
    (out,) = box.send(from_client(b"\x40" * 20, checksum=0))
    assert parse(out).dst == HOST_WWW and box.carried == 1
    box.tracker.on_timer(box.now + IDLE + 1)
    (record,) = box.tracker.records
    assert (record.name, record.route, record.host_port) == (None, "", 443)
    assert record.packets_to_host == len(AIOQUIC) + 1 + 1 + 1
    assert record.bytes_to_host == 100 + 10 + 20  # the bytes before the install were Python's, unknown now
    assert set(box.kernel.entries) == set(tcp)  # the TCP connection's entries are the TCP tracker's


def test_adoption_drops_half_pairs_and_flows_of_listeners_that_are_gone():
    crashed = Box()
    crashed.offloaded(50000)
    crashed.offloaded(50001)
    half = keys(50001)[1]
    del crashed.kernel.entries[keys(50001)[0]]
    no_quic = Tracker(TrackerConfig(prefix=PREFIX), LISTENERS[:1], resolve, Counter32())
    adopted, stale = adopt(no_quic, crashed.kernel.items(), 5.0)
    assert adopted == 0 and sorted(stale) == sorted([*keys(50000), half])
    box = Box(sim=crashed.kernel)
    adopted, stale = adopt(box.tracker, box.kernel.items(), 5.0)
    assert adopted == 1 and stale == [half] and len(box.udp.flows) == 1


def test_a_udp_entry_never_completes_a_tcp_connections_half_pair():
    crashed = Box()
    crashed.offloaded()
    tcp_host_key = next(key for key in tcp_pair(50000) if key_l4(key) == L4_TCP and len(key) and key[0] == 6)
    crashed.kernel.entries[tcp_host_key] = tcp_pair(50000)[tcp_host_key].pack()
    box = Box(sim=crashed.kernel)
    adopted, stale = adopt(box.tracker, box.kernel.items(), 5.0)
    assert (adopted, stale) == (1, [tcp_host_key])
    assert box.tracker.clients == {} and box.tracker.in_kernel == 0 and len(box.udp.flows) == 1


def test_a_restored_flow_in_the_kernel_is_not_adopted_again_and_its_entries_stay():
    old, _, state = saved_with_kernel_traffic()
    box = Box(sim=old.kernel)
    restore(box.tracker, state, 10.0)
    assert adopt(box.tracker, box.kernel.items(), 10.0) == (0, [])
    assert len(box.udp.flows) == 1 and box.udp.in_kernel == 1


def test_adoption_past_max_connections_leaves_the_flow_stale():
    crashed = Box()
    crashed.offloaded()
    box = Box(sim=crashed.kernel, max_connections=0)
    adopted, stale = adopt(box.tracker, box.kernel.items(), 5.0)
    assert adopted == 0 and sorted(stale) == sorted(keys())


# ============================================================ metrics


def test_the_metrics_count_quic_flows_in_the_kernel_apart_from_tcp_connections():
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from kracauer.metrics import Metrics
    box = Box()
    box.offloaded()
    metrics = Metrics(box.tracker, now=box.now)
    metrics.sync(box.tracker, box.now)
    text = generate_latest(metrics.registry).decode()
    assert "kracauer_udp_flows_in_kernel 1.0" in text
    assert "kracauer_connections_in_kernel 0.0" in text
    assert "kracauer_udp_flows_active 1.0" in text


# ============================================================ hostile traffic around a flow in the kernel

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# One datagram: who sends it, its payload, whether its checksum is 0, its TTL or hop limit, whether it is
# of the flow's own 4-tuple or another port, and whether the program passes it on anyway (queued
# before the install, say).
DATAGRAM = st.tuples(
    st.sampled_from(["client", "host"]),
    st.one_of(st.binary(min_size=0, max_size=1400), st.just(SHORT), st.just(HOST_HANDSHAKE),
              st.binary(min_size=1, max_size=60).map(lambda b: bytes([0xC0 | b[0] & 0x3F]) + b[1:])),
    st.booleans(),
    st.sampled_from([0, 1, 2, 64, 255]),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(DATAGRAM, max_size=40))
def test_hostile_datagrams_around_a_flow_in_the_kernel_are_counted_once_and_never_misdelivered(datagrams):
    """Whatever arrives, split between the program and the tracker as the program would, every datagram
    kracauer sends is checksummed and goes to its flow's own ends, and each flow's record counts exactly
    what was sent each way, once, whichever of the two sent it. The other port is another client port
    of the same client: a short header naming the host's CID from there is a rebinding (a second flow)."""
    box = Box()
    flow = box.offloaded()
    base = (flow.datagrams_to_host, flow.datagrams_to_client, flow.bytes_to_host, flow.bytes_to_client)
    sent = {50000: [0, 0, 0, 0], 50001: [0, 0, 0, 0]}
    for who, payload, zero, ttl, own, passed in datagrams:
        box.now += 0.01
        box.kernel.pass_all = passed
        checksum = 0 if zero else None
        port = 50000 if own else 50001
        if who == "client":
            raw = from_client(payload, sport=port, ttl=ttl, checksum=checksum)
        else:
            raw = from_host(payload, dport=port, hlim=ttl, checksum=checksum)
        for out in box.send(raw):
            pkt = parse(out)  # checks every checksum
            if out[0] >> 4 == 6:
                assert (pkt.src, pkt.dst, pkt[UDP].sport, pkt[UDP].dport) == (CLIENT6, HOST_WWW, port, 443)
                assert who == "client" and bytes(pkt[UDP].payload) == payload and pkt.hlim == ttl - 1
                sent[port][0] += 1
                sent[port][2] += len(payload)
            elif UDP in pkt and not pkt.haslayer(IPerror):
                assert (pkt.src, pkt.dst, pkt[UDP].sport, pkt[UDP].dport) == (SERVICE, CLIENT, 443, port)
                assert who == "host" and bytes(pkt[UDP].payload) == payload and pkt.ttl == ttl - 1
                assert not zero  # RFC 8200 §8.1: a host's zero checksum is never passed on
                sent[port][1] += 1
                sent[port][3] += len(payload)
            else:
                raise AssertionError(f"unexpected packet {pkt.summary()}")
    assert flow.kernel == KERNEL_IN
    box.tracker.on_timer(box.now + IDLE + 1)
    records = {r.client_port: r for r in box.tracker.records if r.outcome == "idle_timeout"}
    expected = {50000: tuple(b + n for b, n in zip(base, sent[50000]))}
    if 50001 in records:  # a rebinding flow counts from its first datagram
        expected[50001] = tuple(sent[50001])
    else:
        assert sent[50001] == [0, 0, 0, 0]
    got = {port: (r.packets_to_host, r.packets_to_client, r.bytes_to_host, r.bytes_to_client)
           for port, r in records.items()}
    assert got == expected
    assert box.kernel.entries == {} and box.udp.in_kernel == 0
