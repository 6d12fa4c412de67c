"""UDP flows of quic listeners: QUIC routed by the SNI in its Initial packets (../shared/design/quic.md).

QUIC v1 (RFC 9000, RFC 9001) and v2 (RFC 9369); the Initials are read by
``netstack.quic``, the datagrams rewritten by ``netstack.udp`` (RFC 768, RFC
7915, RFC 8200 §8.1).

Sans-I/O like the TCP tracker, and part of it: ``Tracker`` hands this module
the UDP datagrams and the ICMP errors about them (``netstack.tracker`` does
the frame handling, the vnet header and the dispatch by protocol), and it
shares the TCP tracker's routing (``resolve``: Target / Pending / Refused,
ALPN routes, the fallback), host order and health, source-port choice,
counters (``drops``, ``absorbed``, ``events``) and records (one
``ConnectionRecord`` per flow, protocol "quic").

One flow, keyed by the client's 4-tuple (client address + service address +
client port + service port, bytes 12:20 of the IPv4 header and 0:4 of UDP):

    PEEKING   datagrams are fed to a ``netstack.quic.InitialReader`` and held
              (never forwarded) until the ClientHello in their CRYPTO frames is
              whole. A datagram the reader drops (not QUIC, under 1200 bytes,
              undecryptable...) is counted and forgotten; a first datagram it
              drops makes no flow at all. A flow that waits for the resolver
              (``Pending``) stays here, its datagrams held.
    BOUND     a route and a host were chosen: the held datagrams went to the
              host in order, and each datagram since is translated both ways
              (``netstack.udp``). The host side is keyed by the host's 4-tuple
              (host + prefix::client + host port + source port towards the host,
              bytes 8:40 of the IPv6 header and 0:4 of UDP). A flow idles out
              ``udp_idle_timeout`` seconds after its last datagram.
    GONE      removed from the tables, its record written.

A name no route takes is refused with the reader's CONNECTION_CLOSE
(``unrecognized_name``, RFC 9001 §4.8) sent from the service address, and the
flow is dropped at once: a client that sends its Initial again is refused again.

NAT rebinding (RFC 9000 §9.3): the host's long-header packets carry, as their
Source Connection ID, a connection ID the host chose (RFC 9000 §7.2); the
client's short-header packets carry it as their Destination Connection ID
(§17.3). A short-header datagram (or a Handshake packet: a rebinding during
the handshake) from a 4-tuple kracauer does not know, to a quic listener,
whose DCID is one of those, becomes a new BOUND flow to the
same host and port: the host's QUIC stack validates the new path (§8.2) and
sees the client's new embedded address. Connection IDs the host hands out
later (NEW_CONNECTION_ID frames) are encrypted: a client that migrates on
purpose with one of those (§9.5 asks it to) cannot be followed.

The kernel path (``Tracker.flows``, a ``netstack.flow.FlowTable``; None
without one). A BOUND flow goes into the kernel's flow map when the host
sends its first short-header datagram through here (RFC 9000 §17.3: the
handshake is over on the host's side): by then the host's long-header
packets, whose SCIDs rebinding needs, have been seen. Its two entries are
keyed like ``client_key`` and ``host_key`` (with ``L4_UDP``) and hold the
rewrite ``netstack.udp`` does; the BPF program translates the datagrams
that match them and counts them in the entries. Unlike a parked TCP
connection the flow object stays in the tables (it is small, and what
rebinding, ICMP errors, the idle timer and the record need): ``kernel``
says it is in the map and ``kernel_base`` what the entries' counters held
when this process last accounted for them, so that their counts are added
once (``_leave_kernel``). A datagram of such a flow that reaches this
tracker anyway (one the program passes on: no checksum, a fragment, IP
options, TTL 1...) is translated here and counted here; the entries stay.
Its idle time is the latest of its own ``last_seen`` and its entries'. It
leaves the map only when it ends (``_finish``), a restart without a kernel
path takes it back (``take_back_all``), or its entries vanish (the flow
ends, event ``kernel_flow_lost``).
"""

from __future__ import annotations

import heapq
import struct
from typing import TYPE_CHECKING, Hashable

from netstack.icmp import icmp4_to_icmp6, icmp6_to_icmp4
from netstack.checksum import ones_sum, update
from netstack.flow import L4_UDP, Flow, FlowTable, flow_key
from netstack.ip import IPV4_HEADER_LEN, IPV6_HEADER_LEN, IPv4Header, IPv6Header, build_ipv4_header, build_ipv6_header
from netstack.peek import NEED_DATA, Decision, NotProtocol
from netstack.quic import (
    LONG_HEADER_BIT, NOT_INITIAL, TYPE_BITS, VERSION_1, VERSION_2, InitialReader, long_header_cids, short_header_dcid,
)
from netstack.udp import PROTO_UDP, UDP_CSUM_OFFSET, UDP_HEADER, UDP_HEADER_LEN, UdpHeader, build_datagram, to_client, to_host, udp_checksum
from netstack.vnet import F_NEEDS_CSUM, GSO_NONE, PLAIN, VNET_HEADER, VNET_HEADER_LEN

if TYPE_CHECKING:
    from netstack.tracker import Listener, Target, Tracker

PEEKING, BOUND, GONE = range(3)
STATE_NAMES = ("PEEKING", "BOUND", "GONE")

# Whether a bound flow is in the kernel's flow map: not (yet), in it, or never (the map refused it).
# KERNEL_NO and KERNEL_NEVER are netstack.tracker's values for TCP connections.
KERNEL_NO, KERNEL_IN, KERNEL_NEVER = 0, 1, 2
# What the entries of a flow that was never in the map hold: (packets up, packets down, bytes up, bytes down).
NO_BASE = (0, 0, 0, 0)

# Connection IDs remembered per flow for NAT rebinding: the host's SCIDs seen
# in its long-header packets (one, mostly; a Retry or a server that changes it
# during the handshake adds one).
MAX_CIDS_PER_FLOW = 4
# Bindings other workers learnt (a rebinding client may steer to any worker); oldest dropped past this.
MAX_REMOTE_CIDS = 65536
# Datagrams held while a flow waits for the resolver (its hello was whole), and 0-RTT datagrams held.
MAX_HELD_WAITING = 16
# The long-header Packet Type of 0-RTT: RFC 9000 §17.2 (v1: 0b01), RFC 9369 §3.2 (v2: 0b10).
ZERO_RTT_TYPES = {VERSION_1: 0b01, VERSION_2: 0b10}
_U16 = struct.Struct("!H")


def _kernel_base(saved: list | None) -> tuple[int, int, int, int] | None:
    """The saved kernel entries' counters of a flow (UdpTracker.saved), checked; None: not in the kernel."""
    if saved is None:
        return None
    base = tuple(int(n) for n in saved)
    if len(base) != 4 or min(base) < 0:
        raise ValueError(f"a saved quic flow's kernel counters are damaged: {saved!r}")
    return base


def _reason(dropped: str) -> str:
    """The drop counter of a datagram the reader dropped: "not_quic", or "quic_" + its reason."""
    return dropped if dropped == "not_quic" else "quic_" + dropped


class UdpFlow:
    """One client 4-tuple of a quic listener; kept small (slots)."""

    __slots__ = (
        "listener", "client_addr", "client_port", "client_key", "state", "start", "last_seen", "timer_at",
        "reader", "held", "decision", "target", "host", "src6", "host_sport", "host_key", "cids",
        "datagrams_to_host", "datagrams_to_client", "bytes_to_host", "bytes_to_client", "hello_datagrams",
        "waiting", "kernel", "kernel_base",
    )

    def __init__(self, listener: Listener, client_addr: bytes, client_port: int, key: bytes, now: float) -> None:
        self.listener = listener
        self.client_addr = client_addr
        self.client_port = client_port
        self.client_key = key
        self.state = PEEKING
        self.start = now
        self.last_seen = now
        self.timer_at = 0.0
        self.reader: InitialReader | None = None
        self.held: list[tuple[bytes, int, int]] = []  # (UDP payload, TTL, TOS) of each held datagram
        self.decision: Decision | None = None
        self.target: Target | None = None
        self.host = b""
        self.src6 = b""
        self.host_sport = 0
        self.host_key = b""
        self.cids: list[bytes] = []
        self.datagrams_to_host = 0
        self.datagrams_to_client = 0
        self.bytes_to_host = 0
        self.bytes_to_client = 0
        self.hello_datagrams = 0
        self.waiting: Hashable | None = None
        self.kernel = KERNEL_NO
        # The entries' (packets up, packets down, bytes up, bytes down) already in the counts above.
        self.kernel_base = NO_BASE


class UdpTracker:
    """The quic listeners' flows of one Tracker (which owns the counters, routing and frame handling)."""

    def __init__(self, tracker: Tracker, listeners: list[Listener]) -> None:
        self.tracker = tracker
        self.listeners = {lst.address + _U16.pack(lst.port): lst for lst in listeners}
        self.flows: dict[bytes, UdpFlow] = {}
        self.hosts: dict[bytes, UdpFlow] = {}
        self.peeking: dict[bytes, UdpFlow] = {}  # oldest first
        self.waiting: dict[Hashable, dict[bytes, UdpFlow]] = {}
        # The host's connection IDs (RFC 9000 §5.1) → the flow they belong to, and their lengths.
        self.cids: dict[bytes, UdpFlow] = {}
        self.cid_lengths: set[int] = set()
        # With several workers: bindings learnt here for the others ((cid, fields) pairs, see
        # export_cid) and theirs: cid → (listener key, host, host port, route, name, alpn).
        self.cid_changes: list[tuple[bytes, UdpFlow]] | None = None
        self.remote_cids: dict[bytes, tuple] = {}
        self._timers: list[tuple[float, int, UdpFlow]] = []
        self._timer_seq = 0
        # Bound flows whose datagrams the kernel translates (kernel == KERNEL_IN).
        self.in_kernel = 0

    def __len__(self) -> int:
        return len(self.flows)

    # ------------------------------------------------------------- helpers

    @property
    def config(self):
        return self.tracker.config

    def _drop(self, reason: str) -> list:
        self.tracker.drops[reason] += 1
        return []

    def _absorb(self, reason: str) -> list:
        self.tracker.absorbed[reason] += 1
        return []

    def _vnet(self, buf: bytearray, start: int, hl: int, partial: int, csum_start: int) -> int:
        """The vnet header before a translated datagram; where the frame now starts."""
        start -= VNET_HEADER_LEN
        VNET_HEADER.pack_into(buf, start, partial, GSO_NONE, hl + UDP_HEADER_LEN, 0,
                              csum_start if partial else 0, UDP_CSUM_OFFSET if partial else 0)
        return start

    def _frame(self, packet: bytearray) -> bytearray:
        if not self.config.vnet:
            return packet
        out = bytearray(PLAIN)
        out += packet
        return out

    # ------------------------------------------------------------ clients

    def from_client(self, packet: memoryview, ip: IPv4Header, now: float) -> list:
        """An IPv4 UDP datagram to a service address."""
        # DESIGN.md: never forward half a datagram; QUIC sets DF (RFC 9000 §14).
        if ip.is_fragment:
            return self._drop("fragment")
        hl = ip.header_len
        data = packet[hl:ip.total_len]
        udp = UdpHeader(data)
        key = ip.src + ip.dst + data[:4].tobytes()
        flow = self.flows.get(key)
        if flow is not None:
            flow.last_seen = now
            if flow.state == BOUND:
                return self._to_host(flow, ip, udp)
            return self._peek(flow, ip, data[UDP_HEADER_LEN:udp.length], now)
        listener = self.listeners.get(ip.dst + data[2:4].tobytes())
        if listener is None:
            return self._drop("no_listener")
        payload = data[UDP_HEADER_LEN:udp.length]
        if payload and not payload[0] & LONG_HEADER_BIT:
            return self._short_header(listener, key, ip, udp, payload, now)
        return self._new(listener, key, ip, udp, payload, now)

    def _new(self, listener: Listener, key: bytes, ip: IPv4Header, udp: UdpHeader, payload: memoryview,
             now: float) -> list:
        config = self.config
        reader = InitialReader(config.udp_peek_max_bytes, config.udp_peek_max_datagrams)
        result = reader.feed(payload)
        if result is not NEED_DATA and not isinstance(result, Decision):
            if result.reason == NOT_INITIAL:
                # A Handshake (or 0-RTT) packet from a new 4-tuple: a client that rebound
                # during its handshake addresses the host by the host's ID as well.
                cids = long_header_cids(payload)
                if cids is not None and (cids[1] in self.cids or cids[1] in self.remote_cids):
                    return self._rebind(listener, key, ip, udp, cids[1], now)
            # A first datagram that is no readable Initial makes no flow (a flood of
            # garbage costs no state); one whose hello is refused neither.
            return self._drop("quic_bad_hello" if isinstance(result, NotProtocol) else _reason(result.reason))
        if len(self.flows) >= config.max_connections:
            return self._drop("udp_table_full")
        if len(self.peeking) >= config.udp_max_peeking:
            # As for TCP: the oldest peeking flow makes room (a slow or stuck client).
            oldest = next(iter(self.peeking.values()))
            self._finish(oldest, "evicted_while_peeking", now)
            self.tracker.events["peeking_evicted"] += 1
        flow = UdpFlow(listener, ip.src, _U16.unpack_from(key, 8)[0], key, now)
        flow.reader = reader
        self.flows[key] = flow
        self.peeking[key] = flow
        self.tracker.opened[listener] += 1
        self._set_timer(flow, now + config.hello_timeout)
        return self._held(flow, ip, payload, result, now)

    def _peek(self, flow: UdpFlow, ip: IPv4Header, payload: memoryview, now: float) -> list:
        if flow.waiting is not None:
            # The hello was whole; the resolver has not answered: keep what follows for the host.
            if len(flow.held) >= MAX_HELD_WAITING:
                return self._drop("quic_held_full")
            flow.held.append((bytes(payload), ip.ttl, ip.tos))
            return self._absorb("quic_held_resolving")
        reader = flow.reader
        result = reader.feed(payload)
        if isinstance(result, NotProtocol):
            self._finish(flow, "not_quic", now)
            return self._drop("quic_bad_hello")
        if result is not NEED_DATA and not isinstance(result, Decision):
            if result.reason == NOT_INITIAL and self._is_0rtt(reader, payload) and len(flow.held) < MAX_HELD_WAITING:
                # RFC 9001 §4.6.1: 0-RTT packets of this connection, in datagrams of their own: held
                # with the Initials (never read: their keys are the client's and the host's) and
                # sent after them, so that the host need not wait for their retransmission.
                flow.held.append((bytes(payload), ip.ttl, ip.tos))
                return self._absorb("quic_0rtt_held")
            return self._drop(_reason(result.reason))
        return self._held(flow, ip, payload, result, now)

    @staticmethod
    def _is_0rtt(reader: InitialReader, payload: memoryview) -> bool:
        """A 0-RTT long header (RFC 9000 §17.2.3; RFC 9369 §3.2 numbers it 0b10) of the reader's connection."""
        if reader.dcid is None:
            return False
        cids = long_header_cids(payload)
        if cids is None or cids[0] != reader.version or cids[1] != reader.dcid:
            return False
        return (payload[0] & TYPE_BITS) >> 4 == ZERO_RTT_TYPES.get(reader.version)

    def _held(self, flow: UdpFlow, ip: IPv4Header, payload: memoryview, result, now: float) -> list:
        flow.held.append((bytes(payload), ip.ttl, ip.tos))
        flow.hello_datagrams += 1
        if result is NEED_DATA:
            return self._absorb("quic_hello_held")
        flow.decision = result
        return self._route(flow, now)

    def _route(self, flow: UdpFlow, now: float) -> list:
        from netstack.tracker import Pending, Refused

        target = self.tracker.resolve(flow.listener, flow.decision)
        if target is None:
            return self._refuse(flow, flow.decision.unrouted, now)
        if isinstance(target, Refused):
            return self._refuse(flow, target.outcome, now)
        if isinstance(target, Pending):
            flow.waiting = target.key
            self.waiting.setdefault(target.key, {})[flow.client_key] = flow
            self.tracker.events["waiting_for_resolver"] += 1
            return self._absorb("quic_held_resolving")
        return self._bind(flow, target, now)

    def resume(self, key: Hashable, now: float) -> list:
        """The resolver has the answer for `key`: route the flows waiting for it."""
        group = self.waiting.pop(key, None)
        out: list = []
        for flow in (group or {}).values():
            flow.waiting = None
            if flow.state == PEEKING:
                out.extend(self._route(flow, now))
        return out

    def _refuse(self, flow: UdpFlow, outcome: str, now: float) -> list:
        """RFC 9001 §4.8: a CONNECTION_CLOSE with the TLS alert unrecognized_name, then the flow is gone."""
        random32 = self.tracker.random32
        scid = (random32() & 0xFFFFFFFF).to_bytes(4, "big") + (random32() & 0xFFFFFFFF).to_bytes(4, "big")
        payload = flow.reader.refusal(scid)
        flow.datagrams_to_client += 1
        flow.bytes_to_client += len(payload)
        packet = build_datagram(flow.listener.address, flow.client_addr, flow.listener.port, flow.client_port,
                                payload)
        self._finish(flow, outcome, now)
        return [self._frame(packet)]

    def _bind(self, flow: UdpFlow, target: Target, now: float) -> list:
        """Choose the host (as the TCP tracker orders them) and send it the held datagrams, in order."""
        flow.target = target
        flow.host = self.tracker._host_order(flow.client_addr, target, now)[0]
        flow.src6 = (flow.listener.prefix or self.config.prefix) + flow.client_addr
        if not self._host_side(flow, flow.client_port):
            self._finish(flow, "no_source_port", now)
            return []
        self.peeking.pop(flow.client_key, None)
        flow.state = BOUND
        flow.reader = None
        self._set_timer(flow, now + self.config.udp_idle_timeout)
        out = []
        for payload, ttl, tos in flow.held:
            if ttl <= 1:
                self.tracker.drops["ttl_exceeded"] += 1
                continue
            out.append(self._datagram_to_host(flow, payload, ttl - 1, tos))
        flow.held = []
        return out

    def _host_side(self, flow: UdpFlow, sport: int) -> bool:
        """Key the flow on the host side; DESIGN.md, Collisions: another source port if the client's is taken."""
        port = flow.target.port
        key = flow.host + flow.src6 + _U16.pack(port) + _U16.pack(sport)
        for _ in range(64):
            if key not in self.hosts:
                break
            sport = self.tracker._source_port(flow.client_addr)
            key = flow.host + flow.src6 + _U16.pack(port) + _U16.pack(sport)
        else:
            return False
        flow.host_sport = sport
        flow.host_key = key
        self.hosts[key] = flow
        return True

    def _datagram_to_host(self, flow: UdpFlow, payload: bytes, hop_limit: int, tos: int) -> bytearray:
        """A held datagram as a new IPv6 packet (RFC 8200 §8.1: with its checksum)."""
        datagram = bytearray(UDP_HEADER.pack(flow.host_sport, flow.target.port, UDP_HEADER_LEN + len(payload), 0))
        datagram += payload
        _U16.pack_into(datagram, UDP_CSUM_OFFSET, udp_checksum(flow.src6, flow.host, datagram))
        packet = bytearray(PLAIN) if self.config.vnet else bytearray()
        # RFC 7915 §4.1: traffic class from TOS, hop limit from TTL (already decremented).
        packet += build_ipv6_header(flow.src6, flow.host, PROTO_UDP, len(datagram), hop_limit, tos)
        packet += datagram
        flow.datagrams_to_host += 1
        flow.bytes_to_host += len(payload)
        return packet

    def _to_host(self, flow: UdpFlow, ip: IPv4Header, udp: UdpHeader) -> list:
        if ip.ttl <= 1:
            return self._drop("ttl_exceeded")
        tracker = self.tracker
        buf = tracker._rx_buf
        start = tracker._rx_start
        partial = tracker._rx_flags & F_NEEDS_CSUM
        out = to_host(buf, start, ip.header_len, ip.ttl, ip.tos, udp, flow.src6, flow.host, flow.host_sport,
                      flow.target.port, partial)
        flow.datagrams_to_host += 1
        flow.bytes_to_host += udp.length - UDP_HEADER_LEN
        end = start + ip.header_len + udp.length
        if self.config.vnet:
            out = self._vnet(buf, out, IPV6_HEADER_LEN, partial, IPV6_HEADER_LEN)
        return [memoryview(buf)[out:end]]

    # ---------------------------------------------------------- rebinding

    def _short_header(self, listener: Listener, key: bytes, ip: IPv4Header, udp: UdpHeader, payload: memoryview,
                      now: float) -> list:
        """A short-header packet of no known 4-tuple: a client that rebound (RFC 9000 §9.3), or nobody's."""
        for length in self.cid_lengths:
            cid = short_header_dcid(payload, length)
            if cid is not None and (cid in self.cids or cid in self.remote_cids):
                return self._rebind(listener, key, ip, udp, cid, now)
        return self._drop("quic_no_flow")

    def _rebind(self, listener: Listener, key: bytes, ip: IPv4Header, udp: UdpHeader, cid: bytes,
                now: float) -> list:
        """A new 4-tuple whose packet names a connection ID a host chose: the same host, a new path."""
        old = self.cids.get(cid)
        if old is not None and old.state == BOUND and old.listener == listener:
            flow = self._rebound(listener, key, ip, old.decision, old.target, old.host, now)
            if flow is None:
                return []
            # The connection's IDs now lead to the new path.
            for c in old.cids:
                self.cids[c] = flow
            flow.cids, old.cids = old.cids, []
            return self._to_host(flow, ip, udp)
        remote = self.remote_cids.get(cid)
        if remote is not None and remote[0] == listener.address + _U16.pack(listener.port):
            _, host, port, route, name, alpn = remote
            from netstack.tracker import Target

            target = Target(host, port, route)
            flow = self._rebound(listener, key, ip, Decision(name=name, alpn=tuple(alpn)), target, host, now)
            if flow is None:
                return []
            flow.cids = [cid]
            self.cids[cid] = flow
            return self._to_host(flow, ip, udp)
        return self._drop("quic_no_flow")

    def _rebound(self, listener: Listener, key: bytes, ip: IPv4Header, decision: Decision | None, target: Target,
                 host: bytes, now: float) -> UdpFlow | None:
        if len(self.flows) >= self.config.max_connections:
            self._drop("udp_table_full")
            return None
        flow = UdpFlow(listener, ip.src, _U16.unpack_from(key, 8)[0], key, now)
        flow.decision = decision
        flow.target = target
        flow.host = host
        flow.src6 = (listener.prefix or self.config.prefix) + ip.src
        if not self._host_side(flow, flow.client_port):
            self._drop("no_source_port")
            return None
        flow.state = BOUND
        self.flows[key] = flow
        self.tracker.opened[listener] += 1
        self.tracker.events["quic_rebinding"] += 1
        self._set_timer(flow, now + self.config.udp_idle_timeout)
        return flow

    def export_cid(self, cid: bytes, flow: UdpFlow) -> list:
        """A binding for the other workers (JSON-able): [cid, listener, host, port, route, name, alpn] in hex/text."""
        lst = flow.listener
        decision = flow.decision
        return [cid.hex(), (lst.address + _U16.pack(lst.port)).hex(), flow.host.hex(), flow.target.port,
                flow.target.route, decision.name if decision else None, list(decision.alpn) if decision else []]

    def learn_remote(self, fields: list) -> None:
        """Another worker's binding (export_cid's list): a client that rebinds here reaches the same host."""
        cid_hex, listener_hex, host_hex, port, route, name, alpn = fields
        cid = bytes.fromhex(cid_hex)
        if len(self.remote_cids) >= MAX_REMOTE_CIDS:
            del self.remote_cids[next(iter(self.remote_cids))]
        self.remote_cids[cid] = (bytes.fromhex(listener_hex), bytes.fromhex(host_hex), port, route, name, alpn)
        self.cid_lengths.add(len(cid))

    # -------------------------------------------------------------- hosts

    def from_host(self, packet: memoryview, ip: IPv6Header, now: float) -> list:
        """An IPv6 UDP datagram to prefix::client."""
        data = packet[IPV6_HEADER_LEN:IPV6_HEADER_LEN + ip.payload_len]
        udp = UdpHeader(data)
        flow = self.hosts.get(ip.src + ip.dst + data[:4].tobytes())
        if flow is None:
            return self._drop("no_connection")
        # RFC 8200 §8.1: an IPv6 receiver discards a UDP datagram with a zero checksum.
        if udp.checksum == 0:
            return self._drop("udp_zero_checksum")
        if ip.hop_limit <= 1:
            return self._drop("ttl_exceeded")
        flow.last_seen = now
        payload = data[UDP_HEADER_LEN:udp.length]
        short = False
        if payload:
            if payload[0] & LONG_HEADER_BIT:
                if len(flow.cids) < MAX_CIDS_PER_FLOW:
                    self._learn_cid(flow, payload)
            else:
                short = True
        tracker = self.tracker
        buf = tracker._rx_buf
        start = tracker._rx_start
        partial = tracker._rx_flags & F_NEEDS_CSUM
        # RFC 6864 §4: the Identification need only not repeat soon within the flow; the count of
        # datagrams sent to the client so far is what the BPF program writes too (its entry's packets).
        out = to_client(buf, start, ip.hop_limit, ip.traffic_class, udp, flow.listener.address, flow.client_addr,
                        flow.listener.port, flow.client_port, partial, flow.datagrams_to_client)
        flow.datagrams_to_client += 1
        flow.bytes_to_client += udp.length - UDP_HEADER_LEN
        end = start + IPV6_HEADER_LEN + udp.length
        if self.config.vnet:
            out = self._vnet(buf, out, IPV4_HEADER_LEN, partial, IPV4_HEADER_LEN)
        if short and flow.kernel == KERNEL_NO and tracker.flows is not None:
            self._offload(flow)
        return [memoryview(buf)[out:end]]

    def _learn_cid(self, flow: UdpFlow, payload: memoryview) -> None:
        """RFC 9000 §7.2: the SCID of the host's long-header packets is the DCID the client will use."""
        cids = long_header_cids(payload)
        if cids is None:
            return
        scid = cids[2]
        # A zero-length CID (RFC 9000 §5.1) names nothing: such a connection cannot be followed.
        if not scid or scid in flow.cids:
            return
        flow.cids.append(scid)
        self.cids[scid] = flow
        self.cid_lengths.add(len(scid))
        if self.cid_changes is not None:
            self.cid_changes.append((scid, flow))

    # ---------------------------------------------------- the kernel path

    @staticmethod
    def _kernel_keys(flow: UdpFlow) -> tuple[bytes, bytes]:
        """The flow map's keys: the client's datagrams as they reach the TUN, and the host's."""
        return (flow_key(flow.client_addr, flow.listener.address, flow.client_key[8:12], L4_UDP),
                flow_key(flow.host, flow.src6, flow.host_key[32:36], L4_UDP))

    def _offload(self, flow: UdpFlow) -> None:
        """Put a bound flow's two entries into the kernel's flow map (the host just sent a short header).

        The entries are netstack.udp's rewrite as numbers: the new addresses and
        ports, and the datagrams counted so far, from which the program writes
        the IPv4 Identification as this tracker does. No TCP field is used.
        """
        lst = flow.listener
        start_ns = max(int(flow.start * 1e9), 0)
        last_ns = max(int(flow.last_seen * 1e9), 0)
        up = Flow(src=flow.src6, dst=flow.host, sport=flow.host_sport, dport=flow.target.port, mss=0,
                  packets=flow.datagrams_to_host, start_ns=start_ns, last_seen=last_ns)
        down = Flow(src=lst.address, dst=flow.client_addr, sport=lst.port, dport=flow.client_port, mss=0,
                    packets=flow.datagrams_to_client, start_ns=start_ns, last_seen=last_ns)
        table = self.tracker.flows
        client_key, host_key = self._kernel_keys(flow)
        if not (table.install(client_key, up) and table.install(host_key, down)):
            table.take(client_key)
            table.take(host_key)
            # As for TCP: a full map stays full for a while; this flow is not tried again.
            flow.kernel = KERNEL_NEVER
            self.tracker.events["kernel_install_failed"] += 1
            return
        flow.kernel = KERNEL_IN
        flow.kernel_base = (up.packets, down.packets, 0, 0)
        self.in_kernel += 1
        self.tracker.events["kernel_offloaded_udp"] += 1

    def _entries(self, flow: UdpFlow, table: FlowTable | None, take: bool) -> tuple[Flow | None, Flow | None]:
        """A flow's two entries as they are now in `table` (removed from it with `take`)."""
        if table is None:
            return None, None
        client_key, host_key = self._kernel_keys(flow)
        read = table.take if take else table.peek
        return read(client_key), read(host_key)

    @staticmethod
    def _counts(flow: UdpFlow, up: Flow | None, down: Flow | None) -> tuple[int, int, int, int]:
        """The flow's (datagrams up, down, bytes up, down) with what its entries counted since kernel_base."""
        base_up, base_down, base_bytes_up, base_bytes_down = flow.kernel_base
        counts = [flow.datagrams_to_host, flow.datagrams_to_client, flow.bytes_to_host, flow.bytes_to_client]
        # max(..., 0): an entry with less than its base is not this flow's (a map made anew).
        if up is not None:
            counts[0] += max(up.packets - base_up, 0)
            counts[2] += max(up.bytes - base_bytes_up, 0)
        if down is not None:
            counts[1] += max(down.packets - base_down, 0)
            counts[3] += max(down.bytes - base_bytes_down, 0)
        return counts[0], counts[1], counts[2], counts[3]

    @staticmethod
    def _latest(flow: UdpFlow, up: Flow | None, down: Flow | None) -> float:
        """The flow's last datagram, here or in the kernel (bpf_ktime_get_ns: the same clock as `now`)."""
        return max(flow.last_seen, (up.last_seen / 1e9) if up else 0.0, (down.last_seen / 1e9) if down else 0.0)

    def _leave_kernel(self, flow: UdpFlow, table: FlowTable | None) -> bool:
        """Take the flow's entries out of `table`, add what they counted to the flow's counts, and mark it
        out of the kernel; True if both entries were there."""
        up, down = self._entries(flow, table, take=True)
        (flow.datagrams_to_host, flow.datagrams_to_client, flow.bytes_to_host,
         flow.bytes_to_client) = self._counts(flow, up, down)
        flow.last_seen = self._latest(flow, up, down)
        flow.kernel = KERNEL_NO
        flow.kernel_base = NO_BASE
        self.in_kernel -= 1
        return up is not None and down is not None

    def _kernel_idle_since(self, flow: UdpFlow) -> float | None:
        """When a flow in the kernel last had a datagram; None if an entry vanished (removed from outside)."""
        table = self.tracker.flows
        client_key, host_key = self._kernel_keys(flow)
        # The cheap read (last_seen only), as the TCP sweep does.
        up, down = table.last_seen(client_key), table.last_seen(host_key)
        if up is None or down is None:
            return None
        return max(flow.last_seen, up / 1e9, down / 1e9)

    def take_back_all(self, table: FlowTable | None) -> int:
        """Flows restored (or adopted) as in the kernel, translated here from now on: their entries are
        taken from `table` (a map a previous process left; None: there is none) and their counts added.

        For a process without a kernel path (Tracker.unpark_all is the TCP side). Unlike a
        parked TCP connection a flow has all it needs without its entries: with none it goes on
        here with the counts it was saved with. Returns how many had both entries.
        """
        taken = 0
        for flow in self.flows.values():
            if flow.kernel == KERNEL_IN:
                taken += self._leave_kernel(flow, table)
        return taken

    def adopt(self, client_key: bytes, up: Flow, down: Flow, now: float) -> bool:
        """Take on a flow only the kernel's map knows (kracauer was killed): its two entries, the client
        side's `up` under `client_key` (its 12 bytes, as `flows` keys it). False if it cannot be
        (no such quic listener, the table full, a 4-tuple already in use): its entries are stale.

        What the map does not hold is missing from its record (the name, the ALPN, the route) and
        from its rebinding: the host's connection IDs are not known, so a client that rebinds is
        not followed.
        """
        listener = self.listeners.get(client_key[4:8] + client_key[10:12])
        if listener is None or len(self.flows) >= self.config.max_connections:
            return False
        host_key = up.dst + up.src + _U16.pack(up.dport) + _U16.pack(up.sport)
        if client_key in self.flows or host_key in self.hosts:
            return False
        from netstack.tracker import Target

        flow = UdpFlow(listener, client_key[:4], _U16.unpack_from(client_key, 8)[0], client_key,
                       up.start_ns / 1e9 if up.start_ns else now)
        flow.last_seen = max(up.last_seen, down.last_seen) / 1e9 or now
        flow.target = Target(up.dst, up.dport, "")
        flow.host, flow.src6, flow.host_sport, flow.host_key = up.dst, up.src, up.sport, host_key
        # The entries count from the flow's start (packets) or from its install (bytes): as a base they
        # make the record count what the kernel saw, whatever was counted here before the crash.
        flow.datagrams_to_host, flow.datagrams_to_client = up.packets, down.packets
        flow.bytes_to_host, flow.bytes_to_client = up.bytes, down.bytes
        flow.kernel_base = (up.packets, down.packets, up.bytes, down.bytes)
        flow.kernel = KERNEL_IN
        flow.state = BOUND
        self.flows[client_key] = flow
        self.hosts[host_key] = flow
        self.in_kernel += 1
        self._set_timer(flow, max(flow.last_seen + self.config.udp_idle_timeout, now))
        return True

    # --------------------------------------------------------------- ICMP

    def icmp_from_client_side(self, ip: IPv4Header, type_: int, code: int, rest: bytes, quoted: memoryview,
                              ihl: int) -> tuple[bytes, bytes, tuple, bytearray] | None:
        """An ICMPv4 error quoting a datagram kracauer sent a client: (source, host, mapped type, inner IPv6
        packet) for the tracker to send the host, or None (counted) to drop it."""
        service, client = quoted[12:16].tobytes(), quoted[16:20].tobytes()
        key = client + service + quoted[ihl + 2:ihl + 4].tobytes() + quoted[ihl:ihl + 2].tobytes()
        flow = self.flows.get(key)
        if flow is None or flow.state != BOUND:
            self._drop("icmp_no_connection")
            return None
        total_len = int.from_bytes(quoted[2:4], "big")
        mapped = icmp4_to_icmp6(type_, code, rest, total_len)
        if mapped is None:
            self._drop("icmp_untranslatable")
            return None
        # RFC 7915 §4.5: the quoted packet becomes the IPv6 datagram the host sent.
        udp = bytearray(quoted[ihl:])
        old = ones_sum(service + client + udp[:4])
        _U16.pack_into(udp, 0, flow.target.port)
        _U16.pack_into(udp, 2, flow.host_sport)
        csum = _U16.unpack_from(udp, 6)[0]
        if csum:
            _U16.pack_into(udp, 6, update(csum, old, ones_sum(flow.host + flow.src6 + udp[:4])) or 0xFFFF)
        inner = bytearray(build_ipv6_header(flow.host, flow.src6, PROTO_UDP, max(total_len - ihl, len(udp)),
                                            quoted[8], quoted[1]))
        inner += udp
        return flow.src6[:12] + ip.src, flow.host, mapped, inner

    def icmp_from_host_side(self, type_: int, code: int, rest: bytes, quoted: memoryview
                            ) -> tuple[bytes, bytes, tuple, bytearray] | None:
        """An ICMPv6 error quoting a datagram kracauer sent a host: (service, client, mapped type, inner
        IPv4 packet) for the tracker to send the client, or None (counted) to drop it."""
        src6, host = quoted[8:24].tobytes(), quoted[24:40].tobytes()
        u = IPV6_HEADER_LEN
        flow = self.hosts.get(host + src6 + quoted[u + 2:u + 4].tobytes() + quoted[u:u + 2].tobytes())
        if flow is None or flow.state != BOUND:
            self._drop("icmp_no_connection")
            return None
        mapped = icmp6_to_icmp4(type_, code, rest)
        if mapped is None:
            self._drop("icmp_untranslatable")
            return None
        # RFC 7915 §5.5: the quoted packet becomes the IPv4 datagram the client sent.
        udp = bytearray(quoted[u:])
        client, service = flow.client_addr, flow.listener.address
        old = ones_sum(src6 + host + udp[:4])
        _U16.pack_into(udp, 0, flow.client_port)
        _U16.pack_into(udp, 2, flow.listener.port)
        csum = _U16.unpack_from(udp, 6)[0]
        if csum:
            _U16.pack_into(udp, 6, update(csum, old, ones_sum(client + service + udp[:4])) or 0xFFFF)
        payload_len = int.from_bytes(quoted[4:6], "big")
        inner = build_ipv4_header(client, service, PROTO_UDP,
                                  min(max(payload_len, len(udp)), 0xFFFF - IPV4_HEADER_LEN), quoted[7],
                                  ((quoted[0] & 0x0F) << 4) | (quoted[1] >> 4))
        inner += udp
        return service, client, mapped, inner

    # ------------------------------------------------------------- timers

    def _set_timer(self, flow: UdpFlow, at: float) -> None:
        flow.timer_at = at
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, flow))

    def next_timer(self) -> float | None:
        timers = self._timers
        while timers:
            at, _, flow = timers[0]
            if flow.state != GONE and flow.timer_at == at:
                return at
            heapq.heappop(timers)
        return None

    def on_timer(self, now: float) -> list:
        """Hello timeouts and idle expiry (a bound flow's timer is moved on lazily, not per datagram)."""
        timers = self._timers
        idle = self.config.udp_idle_timeout
        while timers and timers[0][0] <= now:
            at, _, flow = heapq.heappop(timers)
            if flow.state == GONE or flow.timer_at != at:
                continue
            if flow.state == PEEKING:
                self._finish(flow, "hello_timeout", now)
                continue
            if flow.kernel == KERNEL_IN and self.tracker.flows is not None:
                # The kernel's datagrams count as activity: its entries say when it saw the last one.
                last = self._kernel_idle_since(flow)
                if last is None:
                    self.tracker.events["kernel_flow_lost"] += 1
                    self._finish(flow, "kernel_flow_lost", now)
                    continue
                flow.last_seen = last
            due = flow.last_seen + idle
            if due > now:
                self._set_timer(flow, due)
            else:
                self._finish(flow, "idle_timeout", now)
        return []

    # ------------------------------------------------------ saved state

    def saved(self, now: float) -> list[list]:
        """The bound flows, JSON-ready, for netstack.state (peeking ones are not kept: clients send
        their Initials again). Times are ages, as for TCP connections.

        A flow in the kernel is saved with what its entries counted so far, and, as a 21st value,
        their counters as they are now ([packets up, packets down, bytes up, bytes down]; None for
        a flow not in the kernel): the map outlives the process, and the next one, finding the
        entries, counts from there on (``restore``)."""
        out = []
        for flow in self.flows.values():
            if flow.state != BOUND:
                continue
            lst, target, decision = flow.listener, flow.target, flow.decision
            counts = (flow.datagrams_to_host, flow.datagrams_to_client, flow.bytes_to_host, flow.bytes_to_client)
            last_seen, in_kernel = flow.last_seen, None
            if flow.kernel == KERNEL_IN:
                up, down = self._entries(flow, self.tracker.flows, take=False)
                if self.tracker.flows is None:
                    in_kernel = list(flow.kernel_base)  # not taken back yet: as it was restored
                elif up is not None and down is not None:
                    counts = self._counts(flow, up, down)
                    last_seen = self._latest(flow, up, down)
                    in_kernel = [up.packets, down.packets, up.bytes, down.bytes]
            out.append([flow.client_addr.hex(), flow.client_port, lst.address.hex(), lst.port, flow.host.hex(),
                        target.port, target.route, [h.hex() for h in target.hosts], flow.host_sport,
                        decision.name if decision else None, list(decision.alpn) if decision else [],
                        decision.hello_size if decision else 0, [c.hex() for c in flow.cids],
                        now - flow.start, now - last_seen, *counts, flow.hello_datagrams, in_kernel])
        return out

    def restore(self, entries: list, now: float, keep=None) -> tuple[int, int]:
        """Put saved bound flows back (those of listeners this tracker has and, with `keep`, whose client
        it accepts); (restored, skipped). Every entry is read before any goes in: a damaged one raises
        (ValueError, TypeError, IndexError...) with the tables as they were."""
        from netstack.tracker import Target

        flows = []
        skipped = 0
        for entry in entries:
            # 20 values (kracauer before UDP flows went in the kernel), or 21: the kernel entries' counters.
            (client, cport, address, port, host, host_port, route, hosts, sport, name, alpn, hello_size, cids,
             age, idle, up, down, bytes_up, bytes_down, hello_datagrams, *rest) = entry
            if len(rest) > 1:
                raise ValueError(f"a saved quic flow has {len(entry)} values: {entry!r}")
            base = _kernel_base(rest[0]) if rest else None
            client, host = bytes.fromhex(client), bytes.fromhex(host)
            listener = self.listeners.get(bytes.fromhex(address) + _U16.pack(int(port)))
            if len(client) != 4 or len(host) != 16 or not 0 < int(cport) < 65536 or not 0 < int(sport) < 65536:
                raise ValueError(f"a saved quic flow is damaged: {entry!r}")
            if listener is None:
                skipped += 1
                continue
            if keep is not None and not keep(client, int(cport)):
                continue
            key = client + listener.address + _U16.pack(int(cport)) + _U16.pack(listener.port)
            flow = UdpFlow(listener, client, int(cport), key, now - float(age))
            flow.last_seen = now - float(idle)
            flow.decision = Decision(name=name, alpn=tuple(alpn), hello_size=int(hello_size))
            flow.target = Target(host, int(host_port), route, tuple(bytes.fromhex(h) for h in hosts) or (host,))
            flow.host = host
            flow.src6 = (listener.prefix or self.config.prefix) + client
            flow.host_sport = int(sport)
            flow.host_key = host + flow.src6 + _U16.pack(int(host_port)) + _U16.pack(int(sport))
            flow.cids = [bytes.fromhex(c) for c in cids][:MAX_CIDS_PER_FLOW]
            flow.datagrams_to_host, flow.datagrams_to_client = int(up), int(down)
            flow.bytes_to_host, flow.bytes_to_client = int(bytes_up), int(bytes_down)
            flow.hello_datagrams = int(hello_datagrams)
            flow.state = BOUND
            flows.append((flow, base))
        restored = 0
        for flow, base in flows:
            if flow.client_key in self.flows or flow.host_key in self.hosts:
                continue
            self.flows[flow.client_key] = flow
            self.hosts[flow.host_key] = flow
            for cid in flow.cids:
                self.cids[cid] = flow
                self.cid_lengths.add(len(cid))
            if base is not None:
                self._restored_in_kernel(flow, base)
            self._set_timer(flow, flow.last_seen + self.config.udp_idle_timeout)
            restored += 1
        return restored, skipped

    def _restored_in_kernel(self, flow: UdpFlow, base: tuple[int, int, int, int]) -> None:
        """A restored flow that the previous process had in the kernel. With a kernel path its entries
        are looked for: there, it is in the kernel still (counting from `base`, what they held at the
        save); gone (a map made anew), it is translated here, and goes in again on the usual rule.
        Without one it is marked in the kernel until ``take_back_all`` takes it from the map left."""
        flow.kernel, flow.kernel_base = KERNEL_IN, base
        self.in_kernel += 1
        table = self.tracker.flows
        if table is None:
            return
        up, down = self._entries(flow, table, take=False)
        if up is None or down is None:
            self._leave_kernel(flow, table)  # a half left is removed

    # ------------------------------------------------------------ the end

    def _finish(self, flow: UdpFlow, outcome: str, now: float) -> None:
        if flow.state == GONE:
            return
        if flow.kernel == KERNEL_IN:
            # Its entries go, and what the kernel counted goes into the record.
            self._leave_kernel(flow, self.tracker.flows)
        flow.state = GONE
        self.flows.pop(flow.client_key, None)
        self.peeking.pop(flow.client_key, None)
        if flow.host_key and self.hosts.get(flow.host_key) is flow:
            del self.hosts[flow.host_key]
        for cid in flow.cids:
            if self.cids.get(cid) is flow:
                del self.cids[cid]
        if flow.waiting is not None:
            self.waiting.get(flow.waiting, {}).pop(flow.client_key, None)
        flow.held = []
        flow.reader = None
        self.tracker.records.append(self._record(flow, outcome, now))

    def reset_host(self, host: bytes, now: float) -> None:
        """The host is gone for good (Tracker.reset_host): its flows end, outcome ``host_gone``. Nothing is
        sent to their clients (only the host could close a QUIC connection); their packets are
        ``quic_no_flow`` or no_connection from now on, and their QUIC stacks time out."""
        for flow in [f for f in self.flows.values() if f.state == BOUND and f.host == host]:
            self.tracker.events["host_gone_reset"] += 1
            self._finish(flow, "host_gone", now)

    def finish_all(self, outcome: str, now: float) -> None:
        for flow in list(self.flows.values()):
            self._finish(flow, outcome, now)

    def _record(self, flow: UdpFlow, outcome: str, now: float):
        from netstack.tracker import ConnectionRecord

        decision = flow.decision
        target = flow.target
        tracker = self.tracker
        return ConnectionRecord(
            start=flow.start,
            duration=now - flow.start,
            client="%d.%d.%d.%d" % tuple(flow.client_addr),
            client_port=flow.client_port,
            listener=tracker._name_of(flow.listener),
            protocol="quic",
            name=decision.name if decision else None,
            alpn=decision.alpn if decision else (),
            route=target.route if target else None,
            host=tracker._name_of(flow.host) if flow.host else None,
            host_port=target.port if target and flow.host else None,
            bytes_to_host=flow.bytes_to_host,
            bytes_to_client=flow.bytes_to_client,
            packets_to_host=flow.datagrams_to_host,
            packets_to_client=flow.datagrams_to_client,
            hello_size=decision.hello_size if decision else 0,
            outcome=outcome,
            hello_segments=flow.hello_datagrams,
        )
