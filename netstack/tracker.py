"""The connection tracker: delayed binding and the IPv4⇄IPv6 TCP splice.

Sans-I/O, in the manner of aioquic's connection: ``receive(packet, now)``
returns the packets to send, ``next_timer()`` says when ``on_timer(now)`` wants
to run. The clock and the random source are the caller's.

One connection, as ../shared/DESIGN.md describes it:

    PEEKING     kracauer answered the client's SYN with its own ISN k and
                buffers the first bytes unacknowledged until the name is known
                and, for a name whose hosts are looked up (the resolver
                answered ``Pending``), until ``resume`` brings the answer.
    CONNECTING  a route was chosen; kracauer sent the host a SYN from
                prefix::client with the client's ISN c and options.
    ESTABLISHED the host answered (ISN h): delta = h - k; the buffered bytes
                were replayed and every packet is translated both ways.
    REFUSING    no route, or a bad request: an alert (TLS), a 421 or a 400
                (HTTP), a 4xx or 502 (CONNECT) and a FIN were sent.
    GONE        removed from the tables.

State changes happen in the ``_client_*`` and ``_host_*`` handlers named after
the state they handle; a packet a state has no use for is dropped and counted
in ``drops`` under a reason, never forwarded.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Mapping

from netstack import connect, http, tls
from netstack.checksum import is_valid, ones_sum, update
from netstack.flow import (
    F_SACK, F_TIMESTAMPS, F_WSCALE_MASK, NO_WSCALE, Flow, FlowTable, flow_key, to_client, to_host, track,
)
from netstack.icmp import (
    ICMP4_ECHO_REPLY, ICMP4_ECHO_REQUEST, ICMP4_ERROR_MAX, ICMP4_ERRORS, ICMP6_ERROR_MAX, ICMP6_ERRORS,
    ICMP6_UNREACHABLE, ICMP_HEADER_LEN, IcmpHeader, build_icmp4, build_icmp6, icmp4_to_icmp6, icmp6_to_icmp4,
)
from netstack.ip import (
    IPV4_HEADER_LEN, IPV6_HEADER_LEN, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, IPv4Header, IPv6Header, PacketError,
    build_ipv4_header, build_ipv6_header,
)
from netstack.peek import NEED_DATA, BadRequest, Decision, NotProtocol
from netstack.reassembly import StreamBuffer
from netstack.steer import queue_of
from netstack.udp import PROTO_UDP
from netstack.udptracker import UdpTracker
from netstack.syncookie import SynCookies, decode_options, encode_options
from netstack.vnet import (
    F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, PLAIN, TCP_CSUM_OFFSET, VNET_HEADER,
    VNET_HEADER_LEN, gso_type_for,
)
from netstack.tcp import (
    ACK, DEFAULT_MSS, FIN, MOD32, OPT_NOP, OPT_SACK, PSH, RST, SYN, TCP_HEADER_LEN, U16, U32, TcpHeader, add_u32, build_segment, seq_le, seq_lt,
    set_checksum, syn_options, timestamp_option,
)

PEEKING, CONNECTING, ESTABLISHED, REFUSING, GONE = range(5)
STATE_NAMES = ("PEEKING", "CONNECTING", "ESTABLISHED", "REFUSING", "GONE")

# Whether an established connection may go into the kernel's flow map
# (KERNEL_NO: not yet) or stays here for good because the map refused it
# (KERNEL_NEVER). One in the map is parked: see "the kernel path" below.
KERNEL_NO, KERNEL_NEVER = 0, 2
# Parked connections' idle times are checked this many at a time, every
# SWEEP_STEP seconds until all were seen, then again after at most SWEEP_INTERVAL.
SWEEP_BATCH = 256
SWEEP_STEP = 0.05
SWEEP_INTERVAL = 60.0
# An established connection goes into the kernel after this many packets
# translated here, or OFFLOAD_DELAY seconds after the splice, whichever is
# first: a short request and answer would end before the two map updates
# and the rebuild at its FIN paid for themselves.
OFFLOAD_PACKETS = 16
OFFLOAD_DELAY = 1.0

# The window scale kracauer announces to clients. Linux hosts with default
# buffers announce 7 as well, so their windows usually pass unchanged.
OUR_WSCALE = 7
# SYN-ACK windows are never scaled (RFC 7323 §2.2).
SYN_WINDOW = 65535
# Host SYN retransmissions after 1, 2, 4, ... seconds, as RFC 6298 §5.5 backs off.
SYN_RETRY_FIRST = 1.0
# How often a refusal (alert or 421, with FIN) is sent before giving up.
REFUSAL_TRIES = 3
# The smallest MSS taken from a peer, as Linux's tcp_min_snd_mss: a smaller one
# only multiplies packets (and could not carry a segment's options).
MIN_MSS = 48
# How long a connection whose FINs are both acknowledged keeps translating
# retransmitted FINs and ACKs before its state goes (a short TIME-WAIT).
CLOSE_LINGER = 10.0
# How long state waits after an in-window but inexact RST (RFC 5961 §3.2):
# the endpoint answers a blind RST with a challenge ACK, which revives it.
RST_LINGER = 5.0

LISTENER_PROTOCOLS = ("tls", "http", "tcp", "connect", "quic")

# What a refused connection is told before the FIN, by (listener protocol, outcome).
REFUSALS = {
    # RFC 8446 §6.2, RFC 6066 §3: a fatal unrecognized_name alert.
    ("tls", "refused_unknown_name"): tls.UNRECOGNIZED_NAME_ALERT,
    # RFC 9110 §15.5.20: 421 Misdirected Request, this server does not serve that host.
    ("http", "refused_unknown_name"): http.MISDIRECTED_REQUEST,
    # RFC 9110 §15.5.1, RFC 9112 §3.2: 400 Bad Request, the request names no (valid) host.
    ("http", "refused_bad_request"): http.BAD_REQUEST,
    # An explicit proxy's answers (netstack.connect has the RFC 9110 sections):
    # 400 for a malformed head, 501 for another method, 403 for a client, port
    # or name it does not serve, 502 when no host took the connection.
    ("connect", "refused_bad_request"): connect.BAD_REQUEST,
    ("connect", "refused_method"): connect.NOT_IMPLEMENTED,
    ("connect", "refused_client"): connect.FORBIDDEN_CLIENT,
    ("connect", "refused_port"): connect.FORBIDDEN_PORT,
    ("connect", "refused_unknown_name"): connect.FORBIDDEN_NAME,
    ("connect", "host_refused"): connect.BAD_GATEWAY,
    ("connect", "host_unreachable"): connect.BAD_GATEWAY,
}
# A name whose hosts were looked up (route by DNS) and none came back is refused
# as an unknown name is; the outcome says why, for operators.
UNRESOLVED_OUTCOMES = ("refused_unresolved", "refused_outside_networks", "refused_resolver_timeout",
                       "refused_resolver_error")
for _protocol in ("tls", "http", "connect"):
    for _outcome in UNRESOLVED_OUTCOMES:
        REFUSALS[(_protocol, _outcome)] = REFUSALS[(_protocol, "refused_unknown_name")]
# How often kracauer's 200 to a CONNECT is sent before the client is given up on.
ANSWER_TRIES = 5

_NOT_WAITING = object()

# Bytes a frame buffer must leave free before a packet: an IPv4 header of 20
# bytes becomes an IPv6 header of 40, and a vnet header goes before it.
HEADROOM = 64


@dataclass(frozen=True, slots=True)
class Listener:
    """An IPv4 service address and port, and how its connections are routed."""

    address: bytes  # 4 bytes
    port: int
    protocol: str  # "tls" | "http" | "tcp" | "connect" | "quic" (UDP: netstack.udptracker)
    prefix: bytes | None = None  # 12 bytes: this listener's own translation prefix

    def __str__(self) -> str:
        # A quic listener may share its address and port with a TCP one: its name
        # (access log, metrics' listener label) says UDP, as ss and HAProxy's "udp@" do.
        suffix = "/udp" if self.protocol == "quic" else ""
        return f"{ipaddress.IPv4Address(self.address)}:{self.port}{suffix}"


@dataclass(frozen=True)
class Target:
    """Where a connection goes: IPv6 hosts (one is chosen per client) and port, and the route that chose it."""

    host: bytes  # 16 bytes: the first host
    port: int
    route: str
    hosts: tuple[bytes, ...] = ()  # every host; () means (host,)
    # The host is kracauer's own bridge relay (kracauer.bridge, a route with
    # `bridge`): a connect listener's CONNECT head then goes to it unchanged,
    # and the relay, not the tracker, answers it (after the peer did).
    relay: bool = False

    def __post_init__(self) -> None:
        if not self.hosts:
            object.__setattr__(self, "hosts", (self.host,))


@dataclass(frozen=True, slots=True)
class Pending:
    """The resolver is still finding the hosts (a DNS lookup for `key`): the connection waits in
    PEEKING, its hello unacknowledged, until the caller's ``Tracker.resume(key, now)``."""

    key: Hashable


@dataclass(frozen=True, slots=True)
class Refused:
    """The resolver found no host for the name: refused as an unknown name, with this outcome
    (one of UNRESOLVED_OUTCOMES)."""

    outcome: str


# (listener, decision) -> target, None to refuse the name, Pending to wait, Refused to refuse with a reason.
Resolver = Callable[[Listener, Decision], "Target | Pending | Refused | None"]


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    prefix: bytes  # the 12 bytes of the /96 translation prefix
    mtu: int = 1500
    hello_timeout: float = 10.0
    hello_max_bytes: int = 16384
    connect_timeout: float = 10.0
    idle_timeout: float = 7440.0
    vnet: bool = False  # frames carry a virtio_net_hdr (TUN opened with IFF_VNET_HDR)
    max_connections: int = 100_000  # all connections; past it new ones are refused with an RST
    max_peeking: int = 10_000  # connections still sending their hello; past it the oldest is reset
    syn_backlog: int = 1024  # half-open handshakes kept with state; past it SYN cookies
    max_fails: int = 3  # consecutive failed connects before a host is skipped
    fail_timeout: float = 30.0  # seconds a failing host is skipped
    host_try_timeout: float = 3.0  # with several hosts, seconds one may take to answer before the next is tried
    # Who may use each connect listener, by (address, port); one without a policy serves nobody.
    connect_policies: Mapping[tuple[bytes, int], connect.ConnectPolicy] = field(default_factory=dict)
    # quic listeners' UDP flows (netstack.udptracker)
    udp_idle_timeout: float = 60.0  # a bound flow ends this long after its last datagram
    udp_max_peeking: int = 10_000  # flows still sending their hello; past it the oldest is dropped
    udp_peek_max_bytes: int = 16384  # datagram bytes held per peeking flow
    udp_peek_max_datagrams: int = 8  # datagrams held per peeking flow

    @property
    def mss(self) -> int:
        """The largest segment that still fits the IPv6 path: mtu - 40 (IPv6) - 20 (TCP)."""
        return self.mtu - 60


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """What is known about a connection when it ends (one access-log line)."""

    start: float
    duration: float
    client: str
    client_port: int
    listener: str
    protocol: str
    name: str | None
    alpn: tuple[str, ...]
    route: str | None
    host: str | None
    host_port: int | None
    bytes_to_host: int
    bytes_to_client: int
    packets_to_host: int
    packets_to_client: int
    hello_size: int
    outcome: str
    hello_segments: int = 0  # TCP segments that carried hello bytes
    hello_records: int = 0  # TLS records the ClientHello spanned
    connect_time: float | None = None  # from the routing decision to the host's SYN-ACK


class Connection:
    """Per-connection state; kept small (slots) since there may be very many."""

    __slots__ = (
        "listener", "client_addr", "client_port", "client_key", "state", "start", "last_seen", "timer_at",
        "tries",
        # client side of the handshake kracauer answered
        "client_isn", "our_isn", "client_mss", "client_wscale", "client_sack", "client_ts", "client_tsval",
        "client_window", "ts_base", "our_wscale",
        # the first bytes
        "hello", "peeker", "fed", "client_fin_offset", "decision",
        # the host side
        "target", "host", "candidates", "host_start", "src6", "host_sport", "host_key", "host_isn", "host_mss", "host_tsval", "host_ts",
        "delta", "ts_off", "c2h_shift", "h2c_shift", "host_wscale",
        # progress, for FIN/RST checks and byte counts
        "client_ack", "client_win", "host_ack", "host_win", "client_fin", "host_fin", "closing",
        "packets_to_host", "packets_to_client", "outcome", "connect_start", "rst_at", "recorded",
        "acked", "cookie",
        # RFC 5961 §5.2 ACK checks: SND.NXT and MAX.SND.WND of each side
        "client_nxt", "host_nxt", "client_max_win", "host_max_win",
        "hello_segments", "connect_time",
        # the established rewrite, one Flow per direction (netstack.flow), and who applies it
        "to_host_flow", "to_client_flow", "kernel",
    )

    def __init__(self, listener: Listener, client_addr: bytes, client_port: int, client_key: bytes) -> None:
        self.listener = listener
        self.client_addr = client_addr
        self.client_port = client_port
        self.client_key = client_key
        self.state = PEEKING
        self.timer_at = 0.0
        self.tries = 0
        self.hello: StreamBuffer | None = None
        self.peeker = None
        self.fed = 0
        self.client_fin_offset = -1
        self.decision: Decision | None = None
        self.target: Target | None = None
        self.host = b""
        self.candidates: tuple[bytes, ...] = ()  # hosts still to try, after the current one
        self.host_key = b""
        self.host_isn = 0
        self.delta = 0
        self.ts_off = 0
        self.c2h_shift = 0
        self.h2c_shift = 0
        self.host_wscale = 0
        self.client_fin = -1
        self.host_fin = -1
        self.closing = False
        self.packets_to_host = 0
        self.packets_to_client = 0
        self.outcome = ""
        self.connect_start = 0.0
        self.rst_at = 0.0
        self.recorded = False
        self.hello_segments = 0
        self.connect_time: float | None = None
        self.acked = False  # the client acknowledged kracauer's SYN-ACK
        self.cookie = False  # the handshake was answered with a SYN cookie
        self.to_host_flow: Flow | None = None
        self.to_client_flow: Flow | None = None
        self.kernel = KERNEL_NO


class Tracker:
    """All connections of one kracauer instance, keyed from both sides."""

    def __init__(
        self,
        config: TrackerConfig,
        listeners: Iterable[Listener],
        resolve: Resolver,
        random32: Callable[[], int],
        flows: FlowTable | None = None,
        cookie_secret: bytes | None = None,
    ) -> None:
        if len(config.prefix) != 12:
            raise ValueError("the translation prefix must be 12 bytes (a /96)")
        self.config = config
        listeners = list(listeners)
        # quic listeners take UDP (netstack.udptracker); one may share its address and port with a TCP one.
        self.listeners = {lst.address + U16.pack(lst.port): lst for lst in listeners if lst.protocol != "quic"}
        quic = [lst for lst in listeners if lst.protocol == "quic"]
        self.listen_addresses = {lst.address for lst in listeners}
        self.prefixes = {config.prefix} | {lst.prefix for lst in listeners if lst.prefix}
        self.resolve = resolve
        self.random32 = random32
        # The kernel's flow map, if a BPF program translates established connections,
        # and how many connections it carries now.
        self.flows = flows
        self.in_kernel = 0
        self._sweep_at = 0.0
        self._sweep_keys: list[bytes] = []
        # Parked connections share equal decisions (one per name, mostly).
        self._decisions: dict[Decision, Decision] = {}
        # client key: client address + service address + client port + service port,
        # exactly bytes 12:20 of the IPv4 header and 0:4 of the TCP header.
        self.clients: dict[bytes, Connection] = {}
        # host key: host address + prefix::client + host port + source port towards
        # the host, exactly bytes 8:40 of the host's IPv6 header and 0:4 of its TCP header.
        self.hosts: dict[bytes, Connection] = {}
        self.records: list[ConnectionRecord] = []
        self.drops: Counter[str] = Counter()
        self.absorbed: Counter[str] = Counter()
        # Notable things that are neither drops nor absorbed packets (cookies sent, evictions...).
        self.events: Counter[str] = Counter()
        # Connections accepted (client handshake answered with state, or a cookie redeemed), by listener.
        self.opened: Counter[Listener] = Counter()
        self._names: dict[Listener | bytes, str] = {}
        # Passive health per (host, port): consecutive failures and until when to skip it.
        self.health: dict[tuple[bytes, int], tuple[int, float]] = {}
        # With several workers: each change to `health`, for the daemon to tell the other workers
        # ((host, port), (fails, until) or None when the host answered again). None: not shared.
        self.health_changes: list[tuple[tuple[bytes, int], tuple[int, float] | None]] | None = None
        # With several workers (netstack.steer): this worker's queue and the number of queues.
        # A source port kracauer picks towards a host must steer back to this worker.
        self.queue = 0
        self.queues = 1
        # Connections the other workers hold (the daemon keeps it current): max_connections is the box's.
        self.elsewhere = 0
        self._timers: list[tuple[float, int, Connection]] = []
        self._timer_seq = 0
        self._stale_timers = 0
        self._ident = 0
        # Connections still peeking, oldest first (dicts keep insertion order),
        # and how many of them have not completed the handshake.
        self.peeking: dict[bytes, Connection] = {}
        self.half_open = 0
        # Connections waiting for the resolver (Pending), by its key, and each one's key by client key.
        self.waiting: dict[Hashable, dict[bytes, Connection]] = {}
        self._waiting_on: dict[bytes, Hashable] = {}
        # The SYN cookie secret: the caller's, so that the BPF program on the TUN (and
        # other workers) make and accept the same cookies; else one of our own.
        if cookie_secret is None:
            cookie_secret = b"".join((random32() & MOD32).to_bytes(4, "big") for _ in range(4))
        self.cookies = SynCookies(cookie_secret)
        # The frame being handled (set by receive_frame, read by the handlers).
        self._rx_buf = bytearray()
        self._rx_start = 0
        self._rx_flags = 0
        self._rx_gso_type = 0
        self._rx_gso_size = 0
        # UDP flows of quic listeners, sharing this tracker's routing and counters (None: no quic listener).
        self.udp: UdpTracker | None = UdpTracker(self, quic) if quic else None

    def __len__(self) -> int:
        return len(self.clients)

    def reconfigure(self, config: TrackerConfig, resolve: Resolver) -> None:
        """New limits and routes for new connections (SIGHUP); connections already bound keep their host.

        The prefix, MTU and vnet mode belong to the TUN and cannot change here.
        """
        if (config.prefix, config.mtu, config.vnet) != (self.config.prefix, self.config.mtu, self.config.vnet):
            raise ValueError("prefix, mtu and offload need a restart")
        self.config = config
        self.resolve = resolve

    # ------------------------------------------------------------------ input

    def receive(self, packet: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """Handle one packet (with its vnet header if the tracker uses them); the packets to send.

        A convenience over ``receive_frame`` for callers that do not manage
        buffers (tests, tools): it copies the packet and the results.
        """
        buf = bytearray(HEADROOM + len(packet))
        buf[HEADROOM:] = packet
        return [bytes(out) for out in self.receive_frame(buf, HEADROOM, len(buf), now)]

    def receive_frame(self, buf: bytearray, start: int, end: int, now: float) -> list:
        """Handle the frame in ``buf[start:end]``; return the frames to write, in order.

        A translated packet is rewritten in place and returned as a memoryview
        of ``buf`` (valid until ``buf`` is reused); its IP header may grow into
        the HEADROOM bytes before ``start``, which the caller must leave free.
        Packets kracauer makes itself are new bytearrays.
        """
        if self.config.vnet:
            if end - start < VNET_HEADER_LEN:
                return self._drop("short_vnet_header")
            self._rx_flags, self._rx_gso_type, _, self._rx_gso_size, _, _ = VNET_HEADER.unpack_from(buf, start)
            start += VNET_HEADER_LEN
            if self._rx_gso_type & ~GSO_ECN not in (GSO_NONE, GSO_TCPV4, GSO_TCPV6):
                return self._drop("gso_not_tcp")
        else:
            self._rx_flags = self._rx_gso_type = self._rx_gso_size = 0
        if start >= end:
            return self._drop("empty")
        self._rx_buf = buf
        self._rx_start = start
        packet = memoryview(buf)[start:end]
        version = buf[start] >> 4
        try:
            if version == 4:
                return self._from_client(packet, now)
            if version == 6:
                return self._from_host(packet, now)
        except PacketError:
            return self._drop("malformed_ipv4" if version == 4 else "malformed_ipv6")
        return self._drop("not_ip")

    def _checksum_trusted(self) -> bool:
        """The kernel vouches for the TCP checksum (verified, or to be completed by it)."""
        return bool(self._rx_flags & (F_NEEDS_CSUM | F_DATA_VALID))

    def _drop(self, reason: str) -> list[bytearray]:
        """A packet kracauer will not act on: counted under `reason`, never forwarded."""
        self.drops[reason] += 1
        return []

    def _absorb(self, reason: str) -> list[bytearray]:
        """A packet kracauer acted on with nothing to send (yet): counted under `reason`."""
        self.absorbed[reason] += 1
        return []

    def _from_client(self, packet: memoryview, now: float) -> list[bytearray]:
        ip = IPv4Header(packet)
        if ip.proto != PROTO_TCP:
            if ip.proto == PROTO_UDP and self.udp is not None:
                return self.udp.from_client(packet, ip, now)
            if ip.proto == PROTO_ICMP:
                return self._icmp_from_client_side(packet, ip, now)
            return self._drop("not_tcp")
        # DESIGN.md: never forward half a segment; TCP sets DF, so fragments are rare.
        if ip.is_fragment:
            return self._drop("fragment")
        hl = ip.header_len
        segment = packet[hl:ip.total_len]
        tcp = TcpHeader(segment)
        key = ip.src + ip.dst + segment[:4].tobytes()
        conn = self.clients.get(key)
        if conn.__class__ is tuple:
            if not tcp.flags & (SYN | FIN | RST):
                # A plain segment the program did not take (queued before the flow went in, a
                # GSO packet too big for the other side, IP options...): rewritten here as the
                # program would, and the connection stays in the kernel.
                return self._parked_to_host(key, conn, ip, segment, tcp, now)
            conn = self._unpark(key, conn, now)
        if conn is None:
            if tcp.flags & (SYN | ACK | RST) == ACK:
                return self._client_cookie_ack(ip, segment, tcp, now)
            return self._client_new(packet, ip, segment, tcp, now)
        if conn.closing and tcp.flags & (SYN | ACK | RST) == ACK and not self._in_old_connection(conn, tcp):
            # A port reused while the old connection lingers: a SYN the kernel answered
            # with a cookie never reached this tracker, so the new handshake's ACK is
            # the first it hears of it.
            out = self._client_cookie_ack(ip, segment, tcp, now, old=conn)
            if out is not None:
                return out
        conn.last_seen = now
        if tcp.flags & SYN:
            return self._client_syn_again(conn, packet, ip, segment, tcp, now)
        if conn.state == ESTABLISHED:
            return self._client_established(conn, ip, segment, tcp, now)
        if conn.state == PEEKING or conn.state == CONNECTING:
            return self._client_early(conn, ip, segment, tcp, now)
        if conn.state == REFUSING:
            return self._client_refusing(conn, ip, segment, tcp, now)
        return self._drop("no_connection")

    def _from_host(self, packet: memoryview, now: float) -> list[bytearray]:
        ip = IPv6Header(packet)
        if ip.dst[:12] not in self.prefixes:
            return self._drop("not_prefix")
        # Hosts send TCP without extension headers; anything else is not ours to carry.
        if ip.next_header != PROTO_TCP:
            if ip.next_header == PROTO_UDP and self.udp is not None:
                return self.udp.from_host(packet, ip, now)
            if ip.next_header == PROTO_ICMPV6:
                return self._icmp_from_host_side(packet, ip, now)
            return self._drop("not_tcp")
        segment = packet[IPV6_HEADER_LEN:IPV6_HEADER_LEN + ip.payload_len]
        tcp = TcpHeader(segment)
        key = ip.src + ip.dst + segment[:4].tobytes()
        conn = self.hosts.get(key)
        if conn is None and self.in_kernel:
            down = self.flows.peek(flow_key(ip.src, ip.dst, key[32:36]))
            if down is not None:
                if not tcp.flags & (SYN | FIN | RST):
                    return self._parked_to_client(down, ip, segment, tcp, now)
                conn = self._unpark_from_host(key, now)
        if conn is None:
            return self._drop("no_connection")
        conn.last_seen = now
        if conn.state == ESTABLISHED:
            if tcp.flags & SYN:
                return self._host_synack_again(conn, tcp, now)
            return self._host_established(conn, ip, segment, tcp, now)
        if conn.state == CONNECTING:
            return self._host_connecting(conn, segment, tcp, now)
        return self._drop("host_packet_in_state")

    # ---------------------------------------------------------- client: SYN

    def _client_new(self, packet: memoryview, ip: IPv4Header, segment: memoryview, tcp: TcpHeader,
                    now: float) -> list[bytearray]:
        if tcp.flags & (SYN | ACK | RST | FIN) != SYN:
            return self._drop("no_connection")
        listener = self.listeners.get(ip.dst + segment[2:4].tobytes())
        if listener is None:
            return self._drop("no_listener")
        if not self._checksum_trusted() and not is_valid(segment, ones_sum(ip.src + ip.dst) + PROTO_TCP + len(segment)):
            return self._drop("bad_checksum")
        conn = Connection(listener, ip.src, tcp.sport, ip.src + ip.dst + segment[:4].tobytes())
        conn.start = conn.last_seen = now
        if len(self.clients) + self.elsewhere >= self.config.max_connections:
            # The table is full: refuse the newcomer, disturb nobody.
            self.events["refused_table_full"] += 1
            conn.client_isn = tcp.seq
            conn.our_isn = MOD32  # RFC 9293 §3.10.7.2: <SEQ=0><ACK=SEG.SEQ+1><CTL=RST,ACK>
            return [self._rst_to_client(conn, 0)]
        if self.half_open >= self.config.syn_backlog:
            return [self._cookie_syn_ack(conn, segment, tcp, now)]
        self._accept_syn(conn, segment, tcp)
        self.clients[conn.client_key] = conn
        self.opened[listener] += 1
        out = [self._syn_ack_to_client(conn, now)]
        self._enter_peeking(conn, now, out)
        return out

    def _enter_peeking(self, conn: Connection, now: float, out: list) -> None:
        """Track a connection that waits for its hello; past the cap the oldest such is reset."""
        self.peeking[conn.client_key] = conn
        if not conn.acked:
            self.half_open += 1
        self._set_timer(conn, now + self.config.hello_timeout)
        while len(self.peeking) > self.config.max_peeking:
            oldest = next(iter(self.peeking.values()))
            self.events["peeking_evicted"] += 1
            out.append(self._rst_to_client(oldest, oldest.hello.contiguous))
            self._finish(oldest, "evicted_while_peeking", now)

    def _leave_peeking(self, conn: Connection) -> None:
        if self.peeking.pop(conn.client_key, None) is not None and not conn.acked:
            self.half_open -= 1
        key = self._waiting_on.pop(conn.client_key, _NOT_WAITING)
        if key is not _NOT_WAITING:
            group = self.waiting.get(key)
            if group is not None:
                group.pop(conn.client_key, None)
                if not group:
                    del self.waiting[key]

    # RFC 4987 §3.6: past syn_backlog half-open handshakes, answer with a SYN
    # cookie and keep nothing; the client's ACK brings the state back.
    def _cookie_syn_ack(self, conn: Connection, segment: memoryview, tcp: TcpHeader, now: float) -> bytearray:
        self.events["syn_cookie_sent"] += 1
        self._accept_syn(conn, segment, tcp, stateless=True)
        conn.cookie = True
        conn.our_isn, conn.ts_base = self.cookies.make(now, conn.client_addr, conn.listener.address,
                                                       conn.client_port, conn.listener.port, conn.client_isn,
                                                       conn.client_mss)
        if not conn.client_ts:
            # Without timestamps there is nowhere to keep window scale and SACK.
            conn.client_wscale = None
            conn.client_sack = False
            conn.our_wscale = 0
        return self._syn_ack_to_client(conn, now)

    @staticmethod
    def _in_old_connection(conn: Connection, tcp: TcpHeader) -> bool:
        """The segment's sequence number is one the old connection's client sent (or the next)."""
        return seq_le(conn.client_isn, tcp.seq) and seq_le(tcp.seq, (conn.client_nxt + 1) & MOD32)

    # The ACK of a SYN-ACK kracauer sent with a cookie, either here (_cookie_syn_ack)
    # or from the BPF program on the TUN, which answers SYNs before this tracker sees
    # them (kracauer/bpf/syncookie.h): the same cookie, from the same secret. The
    # ACK may carry the first bytes of the hello already.
    def _client_cookie_ack(self, ip: IPv4Header, segment: memoryview, tcp: TcpHeader,
                           now: float, old: Connection | None = None) -> list[bytearray] | None:
        """An ACK for no known connection: the end of a handshake answered with a cookie?

        `old`: a closing connection the ACK's 4-tuple still names; if the cookie
        checks, it is finished and the new one takes its place; if not, None
        (the ACK is the old connection's to handle).
        """
        listener = self.listeners.get(ip.dst + segment[2:4].tobytes())
        if listener is None:
            return self._drop("no_listener")
        client_isn = (tcp.seq - 1) & MOD32
        our_isn = (tcp.ack - 1) & MOD32
        checked = self.cookies.check(now, our_isn, ip.src, ip.dst, tcp.sport, listener.port, client_isn)
        if checked is None:
            return None if old is not None else self._drop("no_connection")
        if old is not None:
            self.events["port_reused_by_cookie"] += 1
            self._finish(old, old.outcome or "closed", now)
        if len(self.clients) + self.elsewhere >= self.config.max_connections:
            # The table is full: the client believes it is connected (the kernel may have
            # answered its SYN), so tell it, as _client_new tells a SYN.
            self.events["refused_table_full"] += 1
            refused = Connection(listener, ip.src, tcp.sport, b"")
            refused.client_isn = client_isn
            refused.our_isn = our_isn  # RFC 9293 §3.10.7.1: <SEQ=SEG.ACK><CTL=RST>
            return [self._rst_to_client(refused, (len(segment) - tcp.header_len) + (tcp.flags & FIN))]
        mss, ts_base = checked
        self.events["syn_cookie_accepted"] += 1
        conn = Connection(listener, ip.src, tcp.sport, ip.src + ip.dst + segment[:4].tobytes())
        conn.start = conn.last_seen = now
        conn.cookie = True
        conn.acked = True
        conn.client_isn = client_isn
        conn.our_isn = our_isn
        conn.client_mss = mss
        conn.ts_base = ts_base
        stamps = tcp.timestamps(segment)
        conn.client_ts = stamps is not None
        conn.client_tsval = stamps[0] if stamps else 0
        conn.client_wscale, conn.client_sack = decode_options(stamps[1]) if stamps else (None, False)
        conn.our_wscale = OUR_WSCALE if conn.client_wscale is not None else 0
        # The SYN's unscaled window is gone; this ACK's, scaled, stands in for it.
        conn.client_window = min(tcp.window << (conn.client_wscale or 0), 0xFFFF)
        conn.client_ack = (our_isn + 1) & MOD32
        conn.client_win = tcp.window
        self._new_buffers(conn)
        self.clients[conn.client_key] = conn
        self.opened[listener] += 1
        out: list = []
        self._enter_peeking(conn, now, out)
        if conn.state == GONE:
            return out
        return out + self._client_early(conn, ip, segment, tcp, now)

    def _accept_syn(self, conn: Connection, segment: memoryview, tcp: TcpHeader, stateless: bool = False) -> None:
        """Record the client's SYN and choose kracauer's side of the handshake (DESIGN.md step 1).

        `stateless`: for a SYN cookie, whose ISN and clock the caller derives and
        which keeps no buffers (the connection object is thrown away).
        """
        conn.client_isn = tcp.seq
        if not stateless:
            conn.our_isn = self.random32() & MOD32
            conn.ts_base = self.random32() & MOD32
        conn.client_mss = max(tcp.mss, MIN_MSS) if tcp.mss is not None else DEFAULT_MSS
        conn.client_wscale = tcp.wscale
        conn.client_sack = tcp.sack_permitted
        stamps = tcp.timestamps(segment)
        conn.client_ts = stamps is not None
        conn.client_tsval = stamps[0] if stamps else 0
        conn.client_window = tcp.window
        # RFC 7323 §2.2: scaling is used only when both SYNs carry the option.
        conn.our_wscale = OUR_WSCALE if tcp.wscale is not None else 0
        conn.client_win = tcp.window
        if not stateless:
            conn.client_ack = (conn.our_isn + 1) & MOD32
            self._new_buffers(conn)

    def _new_buffers(self, conn: Connection) -> None:
        conn.hello = StreamBuffer(self.config.hello_max_bytes)
        protocol = conn.listener.protocol
        if protocol == "tls":
            conn.peeker = tls.TlsPeeker(self.config.hello_max_bytes)
        elif protocol == "http":
            conn.peeker = http.HttpPeeker(self.config.hello_max_bytes)
        elif protocol == "connect":
            conn.peeker = connect.ConnectPeeker(self.config.hello_max_bytes)

    def _client_syn_again(self, conn: Connection, packet: memoryview, ip: IPv4Header, segment: memoryview,
                          tcp: TcpHeader, now: float) -> list[bytearray]:
        if tcp.flags & ACK:
            return self._drop("syn_ack_from_client")
        if tcp.seq == conn.client_isn and conn.state == PEEKING:
            # Our SYN-ACK was lost: answer the retransmitted SYN the same way.
            return [self._syn_ack_to_client(conn, now)]
        if conn.closing or (conn.state == PEEKING and conn.hello.contiguous == 0 and tcp.seq != conn.client_isn):
            # A new connection reusing the port of one that is over (or never began).
            self._finish(conn, conn.outcome or "closed", now)
            return self._client_new(packet, ip, segment, tcp, now)
        # RFC 5961 §4: a SYN in a synchronized state must not tear it down.
        return self._drop("syn_in_connection")

    def _syn_ack_to_client(self, conn: Connection, now: float) -> bytearray:
        stamps = None
        if conn.client_ts:
            tsval = self._our_tsval(conn, now)
            if conn.cookie:
                tsval = encode_options(tsval, conn.client_wscale, conn.client_sack)
            stamps = (tsval, conn.client_tsval)
        wscale = conn.our_wscale if conn.client_wscale is not None else None
        # DESIGN.md step 1: MSS clamped so a full client segment still fits the IPv6 path.
        options = syn_options(min(self.config.mss, 65535), wscale, conn.client_sack, stamps)
        segment = build_segment(conn.listener.port, conn.client_port, conn.our_isn, conn.client_isn + 1,
                                SYN | ACK, SYN_WINDOW, options)
        return self._ipv4_to_client(conn, segment)

    # ------------------------------------------------- client: the first bytes

    def _client_early(self, conn: Connection, ip: IPv4Header, segment: memoryview, tcp: TcpHeader,
                      now: float) -> list[bytearray]:
        """Client packets before the splice: the handshake ACK and the hello, buffered unacknowledged."""
        if tcp.flags & RST:
            # RFC 5961 §3.2 is about synchronized state; here any RST in the
            # stretch the client may send in ends a connection that holds nothing yet.
            offset = (tcp.seq - conn.client_isn - 1) & MOD32
            if offset > SYN_WINDOW + self.config.hello_max_bytes:
                return self._drop("rst_out_of_window")
            self._finish(conn, "reset_by_client", now)
            if conn.target is not None:
                return [self._rst_to_host(conn)]
            return self._absorb("reset_before_splice")
        if not tcp.flags & ACK or tcp.ack != (conn.our_isn + 1) & MOD32:
            return self._drop("bad_ack_before_splice")
        if not conn.acked:
            conn.acked = True
            if conn.client_key in self.peeking:
                self.half_open -= 1
        if not self._checksum_trusted() and not is_valid(segment, ones_sum(ip.src + ip.dst) + PROTO_TCP + len(segment)):
            # These bytes are replayed in segments kracauer checksums itself:
            # a corrupted one must not be laundered into a valid one.
            return self._drop("bad_checksum")
        self._note_client_options(conn, segment, tcp)
        payload = segment[tcp.header_len:]
        offset = (tcp.seq - conn.client_isn - 1) & MOD32
        if offset >= 0x80000000:
            offset -= 0x100000000
        repeated = False
        if payload:
            repeated = conn.hello.covers(offset, offset + len(payload))
            conn.hello.add(offset, payload)
            conn.hello_segments += 1
        if tcp.flags & FIN and conn.client_fin_offset < 0:
            conn.client_fin_offset = offset + len(payload)
        if conn.state == CONNECTING:
            return self._absorb("hello_buffered")
        if conn.decision is not None:
            # Routed by name already and waiting for the resolver: nothing to do until it answers
            # (a connection restored from a state file while it waited asks again here).
            if conn.client_key in self._waiting_on:
                return self._absorb("hello_buffered_resolving")
            return self._route(conn, now)
        out = self._peek(conn, now)
        if repeated and not out and conn.state == PEEKING and conn.hello.contiguous:
            return [self._ack_held_hello(conn, now)]
        return out

    # A client whose retransmission timer fired resends only its first unacknowledged
    # segment and waits for a cumulative ACK before it sends more (RFC 6298 §5.4,
    # RFC 5681 §3.1: cwnd is one segment), and a SACK block cannot start at its
    # SND.UNA (Linux ignores such a block, RFC 2018 §4 implies it). So when a
    # repeated segment shows the client stuck behind a hole, and the name is
    # still unknown, kracauer acknowledges the contiguous bytes it holds (and
    # SACKs the pieces beyond). From then on those bytes are kracauer's to
    # deliver: it replays them to the host, and if no host takes them the
    # client is reset, as a proxy would do. Without losses nothing is ever
    # acknowledged before the host does it.
    def _ack_held_hello(self, conn: Connection, now: float) -> bytearray:
        self.events["hello_acked_after_retransmission"] += 1
        base = conn.client_isn + 1
        ranges = conn.hello.ranges
        option = b""
        if conn.client_sack and len(ranges) > 1:
            blocks = ranges[1:4 if conn.client_ts else 5]
            option = bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks)))
            option += b"".join(U32.pack((base + low) & MOD32) + U32.pack((base + high) & MOD32)
                               for low, high in blocks)
        return self._segment_to_client(conn, conn.our_isn + 1, base + conn.hello.contiguous, ACK, now,
                                       extra_options=option)

    def _note_client_options(self, conn: Connection, segment: memoryview, tcp: TcpHeader) -> None:
        # client_window stays the SYN's (unscaled) window for the host's SYN;
        # client_win is the latest, in the client's scale.
        conn.client_win = tcp.window
        if tcp.ts_at >= 0:
            tsval = U32.unpack_from(segment, tcp.ts_at)[0]
            # RFC 7323 §5.3: only ever move forward; a late packet's older value,
            # replayed to the host, would fail its PAWS check.
            if seq_lt(conn.client_tsval, tsval):
                conn.client_tsval = tsval

    def _peek(self, conn: Connection, now: float) -> list[bytearray]:
        """Feed newly contiguous bytes to the peeker and act on its answer."""
        if conn.peeker is None:
            # A tcp listener: no name to wait for, the handshake is enough.
            conn.decision = Decision(name=None)
            return self._route(conn, now)
        end = conn.hello.contiguous
        result = NEED_DATA
        if end > conn.fed:
            result = conn.peeker.feed(memoryview(conn.hello.data)[conn.fed:end])
            conn.fed = end
        if result is NEED_DATA and conn.hello.full and conn.listener.protocol == "connect":
            # The buffer holds no more than the cap, so the peeker never sees the byte past it:
            # a head that has not ended within the cap is oversized now (a 400, not a timeout).
            result = BadRequest(f"request head larger than {self.config.hello_max_bytes} bytes", hello_size=end)
        if result is NEED_DATA:
            if conn.client_fin_offset >= 0 and conn.client_fin_offset <= end:
                # The client closed before its hello was complete: nothing to route.
                self._finish(conn, "incomplete_hello", now)
                return [self._rst_to_client(conn, end)]
            return self._absorb("hello_buffered")
        if isinstance(result, NotProtocol):
            self._finish(conn, "not_" + conn.listener.protocol, now)
            return [self._rst_to_client(conn, end)]
        if isinstance(result, BadRequest):
            # A request that cannot be routed by any route: answered, not reset.
            # A proxy's client it does not serve learns only that.
            conn.decision = Decision(name=None, hello_size=result.hello_size)
            return self._refuse(conn, now, self._unserved_client(conn) or result.outcome)
        conn.decision = result
        return self._route(conn, now)

    def _route(self, conn: Connection, now: float) -> list[bytearray]:
        if conn.listener.protocol == "connect":
            return self._route_connect(conn, now)
        target = self.resolve(conn.listener, conn.decision)
        if target is None:
            return self._refuse(conn, now, conn.decision.unrouted)
        if isinstance(target, (Pending, Refused)):
            return self._unresolved(conn, target, now)
        return self._bind(conn, target, now)

    # ------------------------------------------------------ waiting for hosts
    #
    # ../shared/design/bridge.md, "Route by DNS": a route's hosts may come from a
    # lookup that must not block the caller's loop. The resolver then answers
    # Pending(key); the connection stays in PEEKING with its hello buffered and
    # unacknowledged (as while the hello arrives: the client keeps it for a
    # retransmission, the hello timeout still runs), grouped with the others
    # waiting for that key. When the caller has the answer it calls
    # resume(key, now), and each of them is routed again.

    def _unresolved(self, conn: Connection, result: Pending | Refused, now: float) -> list[bytearray]:
        if isinstance(result, Refused):
            return self._refuse(conn, now, result.outcome)
        key = result.key
        self.waiting.setdefault(key, {})[conn.client_key] = conn
        self._waiting_on[conn.client_key] = key
        self.events["waiting_for_resolver"] += 1
        return self._absorb("hello_buffered_resolving")

    def resume(self, key: Hashable, now: float) -> list[bytearray]:
        """The resolver has the answer for `key`: route the connections that wait for it."""
        out: list[bytearray] = [] if self.udp is None else self.udp.resume(key, now)
        group = self.waiting.pop(key, None)
        if not group:
            return out
        for conn in group.values():
            self._waiting_on.pop(conn.client_key, None)
            if conn.state == PEEKING:
                out.extend(self._route(conn, now))
        return out

    # ---------------------------------------------------- the explicit proxy
    #
    # A connect listener's client sends a CONNECT head, which kracauer reads
    # (netstack.connect) and never passes on, and gets kracauer's own answer.
    # ../shared/design/bridge.md, "CONNECT in the packet splice": with the
    # client's ISN c, its head takes c+1 .. c+L (RFC 9293 §3.4: the first data
    # byte is ISN+1); the host's SYN carries ISN c+L,
    # so client→host sequence numbers need no change. kracauer's answer takes
    # k+1 .. k+R, and the host's ISN h maps to k+R. Both are done by moving the
    # two ISNs the splice is computed from: client_isn becomes c+L when the head
    # is consumed (the route is known), our_isn becomes k+R when the 200 is sent
    # (the host accepted). delta = h - (k+R) then comes out of the unchanged
    # splice, and the flow records, the kernel's included, carry it as usual.
    # The answer is sent only once the host's SYN-ACK is in, so that a host
    # that refuses still gets the client a 502; it is kracauer's to
    # retransmit, and the connection stays here until the client acknowledged it.

    def _connect_policy(self, conn: Connection) -> connect.ConnectPolicy | None:
        return self.config.connect_policies.get((conn.listener.address, conn.listener.port))

    def _unserved_client(self, conn: Connection) -> str:
        """"refused_client" for a connect listener's client outside its `allow` networks, else ""."""
        if conn.listener.protocol != "connect":
            return ""
        policy = self._connect_policy(conn)
        return "" if policy is not None and policy.allows(conn.client_addr) else "refused_client"

    def _route_connect(self, conn: Connection, now: float) -> list[bytearray]:
        """A complete CONNECT head: refused with a 403, or bound to its host with the head consumed."""
        policy = self._connect_policy(conn)
        if policy is None or not policy.allows(conn.client_addr):
            return self._refuse(conn, now, "refused_client")
        if conn.decision.port not in policy.ports:
            return self._refuse(conn, now, "refused_port")
        target = self.resolve(conn.listener, conn.decision)
        if target is None:
            return self._refuse(conn, now, conn.decision.unrouted)
        if isinstance(target, (Pending, Refused)):
            return self._unresolved(conn, target, now)
        if not target.relay:
            # A bridge relay reads the head itself (with the same peeker) and answers
            # once its peer did: the relay is the CONNECT's proxy, kracauer's splice is plain.
            self._consume_head(conn)
        return self._bind(conn, target, now)

    def _consume_head(self, conn: Connection) -> None:
        """The client's stream to the host starts after the head: c becomes c+L, the buffered rest stays."""
        size = conn.decision.hello_size
        conn.hello.consume(size)
        conn.client_isn = (conn.client_isn + size) & MOD32
        conn.fed = max(conn.fed - size, 0)
        if conn.client_fin_offset >= 0:
            conn.client_fin_offset -= size

    def _answer_connect(self, conn: Connection, now: float) -> bytearray:
        """The host accepted: the 200 from k+1, acknowledging the head (not what followed it); k becomes k+R."""
        answer = connect.CONNECTION_ESTABLISHED
        segment = self._segment_to_client(conn, conn.our_isn + 1, conn.client_isn + 1, ACK | PSH, now, answer)
        conn.our_isn = (conn.our_isn + len(answer)) & MOD32
        conn.tries = 1
        return segment

    @staticmethod
    def _answer_unacked(conn: Connection) -> bool:
        """kracauer sent the client bytes (a 200) it has not acknowledged yet."""
        return seq_lt(conn.client_ack, (conn.our_isn + 1) & MOD32)

    def _resend_answer(self, conn: Connection, now: float) -> list[bytearray]:
        """No host has the 200 to retransmit: kracauer does, backing off; then gives the client up."""
        if conn.tries >= ANSWER_TRIES:
            self._finish(conn, "answer_unacknowledged", now)
            # RFC 5961 §3.2: each RST carries the sequence number its receiver expects next.
            to_client = build_segment(conn.listener.port, conn.client_port, conn.client_ack, conn.host_ack,
                                      RST | ACK, 0)
            to_host = build_segment(conn.host_sport, conn.target.port, conn.host_ack, 0, RST, 0)
            conn.packets_to_client += 1
            conn.packets_to_host += 1
            return [self._ipv4_to_client(conn, to_client), self._ipv6_to_host(conn, to_host)]
        conn.tries += 1
        self._set_timer(conn, now + SYN_RETRY_FIRST * (1 << (conn.tries - 1)))
        answer = connect.CONNECTION_ESTABLISHED
        self.events["connect_answer_retransmitted"] += 1
        return [self._segment_to_client(conn, conn.our_isn + 1 - len(answer), conn.host_ack, ACK | PSH, now,
                                        answer)]

    # ------------------------------------------------------------ host: bind

    def _bind(self, conn: Connection, target: Target, now: float) -> list[bytearray]:
        """DESIGN.md step 3: SYN to the host from prefix::client with the client's ISN and options."""
        conn.target = target
        conn.src6 = (conn.listener.prefix or self.config.prefix) + conn.client_addr
        conn.candidates = self._host_order(conn.client_addr, target, now)
        self._leave_peeking(conn)
        conn.state = CONNECTING
        conn.connect_start = now
        return self._try_next_host(conn, now)

    def _host_order(self, client: bytes, target: Target, now: float) -> tuple[bytes, ...]:
        """The target's hosts in the order this client tries them.

        Rendezvous hashing (highest random weight): each host gets a score from
        a hash of (client, host); the client goes to the best. The same client
        always lands on the same host, and when a host is removed only its own
        clients move. Hosts that keep failing go last for fail_timeout.
        """
        hosts = target.hosts
        if len(hosts) == 1:
            return hosts
        scored = sorted(hosts, key=lambda h: hashlib.blake2s(client + h, digest_size=8).digest(), reverse=True)
        health = self.health
        healthy = [h for h in scored if health.get((h, target.port), (0, 0.0))[1] <= now]
        return tuple(healthy + [h for h in scored if h not in healthy])

    def _try_next_host(self, conn: Connection, now: float) -> list[bytearray]:
        """Bind the connection to its next candidate host and send it a SYN."""
        if conn.host_key:
            del self.hosts[conn.host_key]
            conn.host_key = b""
        conn.host, conn.candidates = conn.candidates[0], conn.candidates[1:]
        port = conn.target.port
        sport = conn.client_port
        key = conn.host + conn.src6 + U16.pack(port) + U16.pack(sport)
        # DESIGN.md, Collisions: one client port towards two listeners that lead to
        # the same host and port; another source port keeps the two apart.
        for _ in range(64):
            if not self._host_key_taken(key):
                break
            sport = self._source_port(conn.client_addr)
            key = conn.host + conn.src6 + U16.pack(port) + U16.pack(sport)
        else:
            self._finish(conn, "no_source_port", now)
            return [self._rst_to_client(conn, conn.hello.contiguous)]
        conn.host_sport = sport
        conn.host_key = key
        self.hosts[key] = conn
        conn.tries = 1
        conn.host_start = now
        return self._connect_attempt(conn, now)

    def _source_port(self, client: bytes) -> int:
        """A random source port towards a host; with several workers, one that steers back to this one.

        The host's answers steer by (client, destination port) (netstack.steer):
        1 port in `queues` does, so a few tries find one.
        """
        sport = 1024 + self.random32() % (65536 - 1024)
        for _ in range(16 * self.queues):
            if self.queues <= 1 or queue_of(client, sport, self.queues) == self.queue:
                break
            sport = 1024 + self.random32() % (65536 - 1024)
        return sport

    def _host_failed(self, conn: Connection, outcome: str, now: float) -> list[bytearray]:
        """The current host refused or did not answer: try the next one, or reset the client."""
        key = (conn.host, conn.target.port)
        fails = self.health.get(key, (0, 0.0))[0] + 1
        skip_until = now + self.config.fail_timeout if fails >= self.config.max_fails else 0.0
        self.health[key] = (fails, skip_until)
        if self.health_changes is not None:
            self.health_changes.append((key, (fails, skip_until)))
        if skip_until:
            self.events["host_marked_down"] += 1
        if conn.candidates and now < conn.connect_start + self.config.connect_timeout:
            self.events["host_failover"] += 1
            return self._try_next_host(conn, now)
        if conn.listener.protocol == "connect":
            # An explicit proxy tells its client (RFC 9110 §15.6.3: 502).
            return self._refuse(conn, now, outcome)
        self._finish(conn, outcome, now)
        return [self._rst_to_client(conn, conn.hello.contiguous)]

    def _connect_attempt(self, conn: Connection, now: float) -> list[bytearray]:
        retry = now + SYN_RETRY_FIRST * (1 << (conn.tries - 1))
        self._set_timer(conn, min(retry, self._host_deadline(conn)))
        return [self._syn_to_host(conn)]

    def _host_deadline(self, conn: Connection) -> float:
        """When the current host has had its chance: host_try_timeout if others wait, never past connect_timeout."""
        overall = conn.connect_start + self.config.connect_timeout
        if conn.candidates:
            return min(conn.host_start + self.config.host_try_timeout, overall)
        return overall

    def _connect_timer(self, conn: Connection, now: float) -> list[bytearray]:
        """The host has not answered: send the SYN again, or move on."""
        if now >= self._host_deadline(conn):
            return self._host_failed(conn, "host_unreachable", now)
        conn.tries += 1
        return self._connect_attempt(conn, now)

    def _syn_to_host(self, conn: Connection) -> bytearray:
        stamps = (conn.client_tsval, 0) if conn.client_ts else None
        mss = min(conn.client_mss, self.config.mss)
        options = syn_options(mss, conn.client_wscale, conn.client_sack, stamps)
        segment = build_segment(conn.host_sport, conn.target.port, conn.client_isn, 0, SYN, conn.client_window,
                                options)
        return self._ipv6_to_host(conn, segment)

    def _host_connecting(self, conn: Connection, segment: memoryview, tcp: TcpHeader,
                         now: float) -> list[bytearray]:
        if tcp.flags & ACK == 0 or tcp.ack != (conn.client_isn + 1) & MOD32:
            return self._drop("bad_ack_from_host")
        if tcp.flags & RST:
            # The host refused (RFC 9293 §3.5): another host, or the client learns it the same way.
            return self._host_failed(conn, "host_refused", now)
        if tcp.flags & SYN == 0:
            return self._drop("host_packet_in_state")
        if not self._checksum_trusted() and not is_valid(
                segment, ones_sum(conn.host + conn.src6) + PROTO_TCP + len(segment)):
            return self._drop("bad_checksum")
        answer = (self._answer_connect(conn, now)
                  if conn.listener.protocol == "connect" and not conn.target.relay else None)
        self._splice(conn, segment, tcp, now)
        conn.connect_time = now - conn.connect_start
        if self.health.pop((conn.host, conn.target.port), None) is not None and self.health_changes is not None:
            self.health_changes.append(((conn.host, conn.target.port), None))
        if answer is None:
            return self._replay(conn, now)
        self._set_timer(conn, now + SYN_RETRY_FIRST)  # the 200's retransmission
        return [answer, *self._replay(conn, now)]

    def _splice(self, conn: Connection, segment: memoryview, tcp: TcpHeader, now: float) -> None:
        """DESIGN.md step 4: record delta, window scales and the host's timestamp clock."""
        conn.host_isn = tcp.seq
        conn.delta = (tcp.seq - conn.our_isn) & MOD32
        conn.host_mss = min(max(tcp.mss, MIN_MSS) if tcp.mss is not None else DEFAULT_MSS, self.config.mss)
        # RFC 7323 §2.2: scaling holds only if both SYNs carried it; the client was
        # told OUR_WSCALE, the host was told the client's own.
        scaled = conn.client_wscale is not None and tcp.wscale is not None
        conn.host_wscale = tcp.wscale if scaled else 0
        client_ws_seen_by_host = conn.client_wscale if scaled else 0
        conn.c2h_shift = (conn.client_wscale or 0) - client_ws_seen_by_host
        conn.h2c_shift = conn.host_wscale - conn.our_wscale
        stamps = tcp.timestamps(segment)
        conn.host_ts = stamps is not None
        conn.host_tsval = stamps[0] if stamps else 0
        # RFC 7323 §5.3 (PAWS): the client must see one clock that never goes
        # back, so the host's is moved onto the one kracauer started.
        conn.ts_off = (conn.host_tsval - self._our_tsval(conn, now)) & MOD32 if stamps else 0
        conn.host_ack = (conn.client_isn + 1) & MOD32
        # RFC 7323 §2.2: the SYN-ACK's window is unscaled; host_win is kept in the host's scale.
        conn.host_win = max(tcp.window >> conn.host_wscale, 1)
        conn.host_nxt = (conn.our_isn + 1) & MOD32
        # Generous floors: a window may have been larger before kracauer saw it.
        conn.host_max_win = max(tcp.window, 0xFFFF)
        conn.client_max_win = max(conn.client_win << (conn.client_wscale or 0), 0xFFFF)
        conn.client_nxt = (conn.client_isn + 1) & MOD32
        conn.state = ESTABLISHED
        conn.peeker = None
        self._make_flows(conn)
        # With a kernel path, the timer first says when the connection is old enough for it.
        self._set_timer(conn, now + (OFFLOAD_DELAY if self.flows is not None else self.config.idle_timeout))

    def _make_flows(self, conn: Connection) -> None:
        """The two directions' rewrites (netstack.flow), from what the splice recorded."""
        flags = (F_TIMESTAMPS if conn.client_ts and conn.host_ts else 0) | (F_SACK if conn.client_sack else 0)
        conn.to_host_flow = Flow(
            src=conn.src6, dst=conn.host, sport=conn.host_sport, dport=conn.target.port,
            ack_add=conn.delta, tsecr_add=conn.ts_off, wscale_shift=conn.c2h_shift, mss=self.config.mss,
            flags=flags | (NO_WSCALE if conn.client_wscale is None else conn.client_wscale),
            seq_base=conn.client_isn + 1)
        conn.to_client_flow = Flow(
            src=conn.listener.address, dst=conn.client_addr, sport=conn.listener.port, dport=conn.client_port,
            seq_add=-conn.delta, tsval_add=-conn.ts_off, wscale_shift=conn.h2c_shift, mss=conn.client_mss,
            flags=flags | conn.host_wscale, seq_base=conn.host_isn + 1)

    # ------------------------------------------------------ the kernel path
    #
    # A connection the kernel carries is "parked": its Connection object is
    # dropped, and the client table holds a small tuple instead,
    #
    #     (decision, target, host, hello_segments, connect_time)
    #
    # the part of its record the flow map does not hold. Everything else
    # (addresses, ports, ISNs, delta, offsets, scales, what each side sent and
    # acknowledged) is in its two map entries, and the Connection is rebuilt
    # from them ("unparked") when a packet of it needs the state machine (a
    # SYN, FIN or RST, an ICMP error) or when it has been idle too long. A plain
    # segment of it that reaches this tracker anyway (one queued before the
    # flow went in, or one the program passed on) is rewritten here with the
    # map's entry, which stays. A parked connection is not in the host table
    # (a host packet finds it through the map) nor in the timer heap (the
    # parked ones are swept instead).

    def _kernel_keys(self, conn: Connection) -> tuple[bytes, bytes]:
        """The flow map's keys: the client's packets as they reach the TUN, and the host's."""
        return (flow_key(conn.client_addr, conn.listener.address, conn.client_key[8:12]),
                flow_key(conn.host, conn.src6, conn.host_key[32:36]))

    def _offload(self, conn: Connection, now: float) -> None:
        """Hand an established connection to the kernel once nothing is held for it, and park it.

        ../shared/design/kernel-path.md, the split: a flow enters the map when
        the hello is replayed and acknowledged (nothing left to replay), and
        only while no FIN or RST is in play, since teardown stays here.
        """
        if conn.hello is not None or conn.client_fin >= 0 or conn.host_fin >= 0 or conn.rst_at or conn.closing:
            return
        if self._answer_unacked(conn):
            return  # a CONNECT's 200 is still kracauer's to retransmit
        if conn.packets_to_host + conn.packets_to_client < OFFLOAD_PACKETS and now < conn.connect_start + OFFLOAD_DELAY:
            return
        if conn.to_host_flow is None:  # restored, and no packet since
            self._make_flows(conn)
        up, down = conn.to_host_flow, conn.to_client_flow
        # What the program tracks starts from what this tracker knows.
        up.ack_max, up.seq_next, up.window = conn.client_ack, conn.client_nxt, conn.client_win
        up.window_max = min(max(conn.client_max_win >> (conn.client_wscale or 0), conn.client_win), 0xFFFF)
        up.packets = conn.packets_to_host
        down.ack_max, down.seq_next, down.window = conn.host_ack, (conn.host_nxt + conn.delta) & MOD32, conn.host_win
        down.window_max = min(max(conn.host_max_win >> conn.host_wscale, conn.host_win), 0xFFFF)
        down.packets = conn.packets_to_client
        up.start_ns = down.start_ns = int(conn.start * 1e9)
        up.last_seen = down.last_seen = int(conn.last_seen * 1e9)
        client_key, host_key = self._kernel_keys(conn)
        if not (self.flows.install(client_key, up) and self.flows.install(host_key, down)):
            self.flows.take(client_key)
            self.flows.take(host_key)
            conn.kernel = KERNEL_NEVER
            self.events["kernel_install_failed"] += 1
            return
        self.events["kernel_offloaded"] += 1
        if not self.in_kernel:
            self._sweep_at = now + min(max(self.config.idle_timeout / 8, 1.0), SWEEP_INTERVAL)
        self._park(conn)

    def _park(self, conn: Connection) -> None:
        decision = conn.decision
        if decision is not None:
            decision = self._decisions.setdefault(decision, decision) if len(self._decisions) < 65536 else decision
        self.clients[conn.client_key] = (decision, conn.target, conn.host, conn.hello_segments, conn.connect_time)
        self.hosts.pop(conn.host_key, None)
        if conn.timer_at:
            self._stale_timers += 1  # its heap entry is dead now
        conn.state = GONE
        self.in_kernel += 1

    def _unpark(self, client_key: bytes, parked: tuple, now: float) -> Connection | None:
        """Take a parked connection's entries out of the map and rebuild it here; None if they are gone."""
        up = self.flows.take(flow_key(client_key[:4], client_key[4:8], client_key[8:12]))
        down = None
        if up is not None:
            down = self.flows.take(flow_key(up.dst, up.src, U16.pack(up.dport) + U16.pack(up.sport)))
        self.in_kernel -= 1
        del self.clients[client_key]
        listener = self.listeners.get(client_key[4:8] + client_key[10:12])
        if listener is None or up is None or down is None:
            # Removed from outside (bpftool, a `kracauer cleanup` while running): nothing to rebuild from.
            self.events["kernel_flow_lost"] += 1
            return None
        conn = self._connection_from_flows(listener, client_key, up, down, now)
        conn.decision, conn.target, conn.host, conn.hello_segments, conn.connect_time = parked
        self.clients[client_key] = conn
        self.hosts[conn.host_key] = conn
        self._set_timer(conn, max(conn.last_seen + self.config.idle_timeout, now))
        return conn

    def _unpark_from_host(self, host_key: bytes, now: float) -> Connection | None:
        """A host packet (or an ICMP error quoting one) of no connection here: one the kernel carries?"""
        down = self.flows.peek(flow_key(host_key[:16], host_key[16:32], host_key[32:36]))
        if down is None:
            return None
        client_key = down.dst + down.src + U16.pack(down.dport) + U16.pack(down.sport)
        parked = self.clients.get(client_key)
        if parked.__class__ is not tuple:
            return None
        return self._unpark(client_key, parked, now)

    def _host_key_taken(self, key: bytes) -> bool:
        """Another connection already uses this host-side 4-tuple (parked ones are in the map)."""
        if key in self.hosts:
            return True
        return bool(self.in_kernel) and self.flows.peek(flow_key(key[:16], key[16:32], key[32:36])) is not None

    def _connection_from_flows(self, listener: Listener, client_key: bytes, up: Flow, down: Flow,
                               now: float) -> Connection:
        """An ESTABLISHED connection rebuilt from its two map entries (what the splice recorded, and since)."""
        conn = Connection(listener, client_key[:4], int.from_bytes(client_key[8:10], "big"), client_key)
        conn.state = ESTABLISHED
        conn.acked = True
        conn.start = up.start_ns / 1e9 if up.start_ns else now
        conn.last_seen = max(up.last_seen, down.last_seen) / 1e9 or now
        conn.src6, conn.host, conn.host_sport = up.src, up.dst, up.sport
        conn.target = Target(up.dst, up.dport, "")
        conn.host_key = up.dst + up.src + U16.pack(up.dport) + U16.pack(up.sport)
        conn.delta, conn.ts_off = up.ack_add, up.tsecr_add
        conn.c2h_shift, conn.h2c_shift = up.wscale_shift, down.wscale_shift
        client_ws = up.flags & F_WSCALE_MASK
        conn.client_wscale = None if client_ws == NO_WSCALE else client_ws
        conn.host_wscale = down.flags & F_WSCALE_MASK
        conn.our_wscale = conn.host_wscale - conn.h2c_shift if conn.client_wscale is not None else 0
        conn.client_ts = conn.host_ts = bool(up.flags & F_TIMESTAMPS)
        conn.client_sack = bool(up.flags & F_SACK)
        conn.client_isn = (up.seq_base - 1) & MOD32
        conn.host_isn = (down.seq_base - 1) & MOD32
        conn.our_isn = (conn.host_isn - conn.delta) & MOD32
        conn.client_mss = down.mss
        conn.client_ack, conn.client_nxt, conn.client_win = up.ack_max, up.seq_next, up.window
        conn.host_ack, conn.host_win = down.ack_max, down.window
        conn.host_nxt = (down.seq_next - conn.delta) & MOD32
        conn.client_max_win = max(up.window_max << (conn.client_wscale or 0), 0xFFFF)
        conn.host_max_win = max(down.window_max << conn.host_wscale, 0xFFFF)
        conn.packets_to_host, conn.packets_to_client = up.packets, down.packets
        conn.to_host_flow, conn.to_client_flow = up, down
        return conn

    def parked(self) -> list[tuple[bytes, tuple]]:
        """The connections the kernel carries: (client key, parked record)."""
        return [(key, value) for key, value in self.clients.items() if value.__class__ is tuple]

    def unpark_all(self, now: float, table: FlowTable | None = None) -> int:
        """Rebuild every parked connection here (from ``table``, a map a previous process left, if given).

        For a process that restored connections the kernel carried but runs
        without a kernel path: they are translated here from now on. Without
        a table to rebuild them from they are gone (counted as lost).
        """
        class _Gone:
            def take(self, key: bytes) -> None:
                return None

        flows = self.flows
        self.flows = table if table is not None else (flows if flows is not None else _Gone())
        taken = 0
        try:
            for key, parked in self.parked():
                taken += self._unpark(key, parked, now) is not None
        finally:
            self.flows = flows
        return taken

    def _sweep_parked(self, now: float) -> None:
        """Idle timeouts of parked connections, a batch at a time: their activity is the map's last_seen."""
        if not self._sweep_keys:
            self._sweep_keys = [key for key, _ in self.parked()]
        batch, self._sweep_keys = self._sweep_keys[:SWEEP_BATCH], self._sweep_keys[SWEEP_BATCH:]
        idle = self.config.idle_timeout
        for key in batch:
            parked = self.clients.get(key)
            if parked.__class__ is not tuple:
                continue
            # The client side's entry is read first (its ACKs flow whenever data does);
            # the host side's only when that one looks idle.
            up_key = flow_key(key[:4], key[4:8], key[8:12])
            last = self.flows.last_seen(up_key)
            if last is not None and last / 1e9 + idle <= now:
                up = self.flows.peek(up_key)
                if up is not None:
                    down = self.flows.last_seen(flow_key(up.dst, up.src, U16.pack(up.dport) + U16.pack(up.sport)))
                    last = max(last, down or 0)
            if last is None or last / 1e9 + idle <= now:
                conn = self._unpark(key, parked, now)
                if conn is not None:
                    self._finish(conn, "idle_timeout", now)
        self._sweep_at = now + (SWEEP_STEP if self._sweep_keys else min(max(idle / 8, 1.0), SWEEP_INTERVAL))

    def _replay(self, conn: Connection, now: float) -> list[bytearray]:
        """Complete the host's handshake and hand it the buffered bytes (and FIN), with ACK h+1."""
        data = memoryview(conn.hello.data)[:conn.hello.contiguous]
        fin_here = conn.client_fin_offset == len(data)
        ack = (conn.host_isn + 1) & MOD32
        options = timestamp_option(conn.client_tsval, conn.host_tsval) if conn.client_ts and conn.host_ts else b""
        window = self._client_window_for_host(conn, conn.client_win)
        out = []
        step = max(conn.host_mss - len(options), 1)
        offset = 0
        while True:
            chunk = data[offset:offset + step]
            last = offset + len(chunk) >= len(data)
            flags = ACK | (PSH if chunk else 0) | (FIN if last and fin_here else 0)
            segment = build_segment(conn.host_sport, conn.target.port, conn.client_isn + 1 + offset, ack, flags,
                                    window, options, chunk)
            out.append(self._ipv6_to_host(conn, segment))
            conn.packets_to_host += 1
            offset += len(chunk)
            if last:
                break
        if fin_here:
            conn.client_fin = (conn.client_isn + 1 + len(data)) & MOD32
        end = (conn.client_isn + 1 + len(data) + fin_here) & MOD32
        if seq_lt(conn.client_nxt, end):
            conn.client_nxt = end
        return out

    def _host_synack_again(self, conn: Connection, tcp: TcpHeader, now: float) -> list[bytearray]:
        # The host did not get the replay (or its ACK) and repeats its SYN-ACK.
        if conn.hello is None:
            return self._drop("syn_in_connection")
        if tcp.seq != conn.host_isn or seq_lt((conn.client_isn + 1 + conn.hello.contiguous) & MOD32, conn.host_ack) \
                or conn.host_ack != (conn.client_isn + 1) & MOD32:
            return self._drop("syn_in_connection")
        return self._replay(conn, now)

    # ---------------------------------------------------------- the splice

    def _client_established(self, conn: Connection, ip: IPv4Header, segment: memoryview, tcp: TcpHeader,
                            now: float) -> list:
        """Client → host: the RFC 5961 checks and FIN tracking here, the rewrite in netstack.flow."""
        flags = tcp.flags
        if flags & RST:
            return self._rst_from_client(conn, ip, segment, tcp, now)
        if ip.ttl <= 1:
            return self._drop("ttl_exceeded")
        hl = tcp.header_len
        tcp_len = len(segment)
        if flags & ACK:
            ack = tcp.ack
            # RFC 5961 §5.2: an ACK is acceptable only within
            # SND.UNA - MAX.SND.WND <= SEG.ACK <= SND.NXT of the host it goes to.
            if seq_lt(conn.host_nxt, ack) or seq_lt(ack, (conn.client_ack - conn.client_max_win) & MOD32):
                return self._drop("ack_out_of_window")
            if seq_lt(conn.client_ack, ack):
                conn.client_ack = ack
            conn.client_win = window = tcp.window
            if window << (conn.client_wscale or 0) > conn.client_max_win:
                conn.client_max_win = window << (conn.client_wscale or 0)
        end = (tcp.seq + tcp_len - hl + (flags & FIN)) & MOD32
        if seq_lt(conn.client_nxt, end):
            conn.client_nxt = end
        buf = self._rx_buf
        partial = self._rx_flags & F_NEEDS_CSUM
        if tcp.ts_at >= 0 and conn.hello is not None:
            self._echo_host_synack_tsval(conn, buf, self._rx_start + ip.header_len, segment, tcp, partial)
        flow = conn.to_host_flow
        if flow is None:  # restored from a state file: made on its first packet (netstack.state)
            self._make_flows(conn)
            flow = conn.to_host_flow
        start = to_host(buf, self._rx_start, ip, tcp, tcp_len, flow, partial)
        if flags & FIN and conn.client_fin < 0:
            conn.client_fin = (tcp.seq + tcp_len - hl) & MOD32
        conn.packets_to_host += 1
        if self.config.vnet:
            start = self._vnet_to_host(buf, start, hl, partial)
        self._check_closed(conn, now)
        if self.flows is not None and conn.kernel == KERNEL_NO and conn.hello is None:
            self._offload(conn, now)
        return [memoryview(buf)[start:self._rx_start + ip.header_len + tcp_len]]

    def _vnet_to_host(self, buf: bytearray, start: int, hl: int, partial: int) -> int:
        """The vnet header before a packet going to a host; where the frame now starts."""
        start -= VNET_HEADER_LEN
        gso_size = self._rx_gso_size
        if gso_size:
            gso_size = min(gso_size, self.config.mtu - IPV6_HEADER_LEN - hl)
        VNET_HEADER.pack_into(buf, start, partial, gso_type_for(6, self._rx_gso_type), IPV6_HEADER_LEN + hl,
                              gso_size, IPV6_HEADER_LEN if partial else 0, TCP_CSUM_OFFSET if partial else 0)
        return start

    def _vnet_to_client(self, buf: bytearray, start: int, hl: int, partial: int, client_mss: int) -> int:
        """The vnet header before a packet going to a client; where the frame now starts."""
        start -= VNET_HEADER_LEN
        gso_size = self._rx_gso_size
        if gso_size:
            # Segments must fit the client's MSS (which counts no options).
            gso_size = min(gso_size, client_mss + TCP_HEADER_LEN - hl)
        VNET_HEADER.pack_into(buf, start, partial, gso_type_for(4, self._rx_gso_type), IPV4_HEADER_LEN + hl,
                              gso_size, IPV4_HEADER_LEN if partial else 0, TCP_CSUM_OFFSET if partial else 0)
        return start

    def _parked_to_host(self, key: bytes, parked: tuple, ip: IPv4Header, segment: memoryview, tcp: TcpHeader,
                        now: float) -> list:
        """A plain client segment of a connection the kernel carries, rewritten with its map entry."""
        flow_k = flow_key(ip.src, ip.dst, key[8:12])
        up = self.flows.peek(flow_k)
        if up is None:
            self._unpark(key, parked, now)  # its entries are gone: counted as lost
            return self._drop("no_connection")
        if ip.ttl <= 1:
            return self._drop("ttl_exceeded")
        tcp_len = len(segment)
        track(up, tcp, tcp_len - tcp.header_len, int(now * 1e9))
        partial = self._rx_flags & F_NEEDS_CSUM
        buf = self._rx_buf
        start = to_host(buf, self._rx_start, ip, tcp, tcp_len, up, partial)
        up.packets += 1
        up.bytes += tcp_len - tcp.header_len
        self.flows.install(flow_k, up)
        self.events["kernel_segment_here"] += 1
        if self.config.vnet:
            start = self._vnet_to_host(buf, start, tcp.header_len, partial)
        return [memoryview(buf)[start:self._rx_start + ip.header_len + tcp_len]]

    def _parked_to_client(self, down: Flow, ip: IPv6Header, segment: memoryview, tcp: TcpHeader,
                          now: float) -> list:
        """A plain host segment of a connection the kernel carries, rewritten with its map entry."""
        if ip.hop_limit <= 1:
            return self._drop("ttl_exceeded")
        tcp_len = len(segment)
        if tcp_len + IPV4_HEADER_LEN > 0xFFFF:
            return self._drop("too_big_for_ipv4")
        track(down, tcp, tcp_len - tcp.header_len, int(now * 1e9))
        partial = self._rx_flags & F_NEEDS_CSUM
        buf = self._rx_buf
        start = to_client(buf, self._rx_start, ip, tcp, tcp_len, down, partial, down.packets)
        down.packets += 1
        down.bytes += tcp_len - tcp.header_len
        self.flows.install(flow_key(ip.src, ip.dst, segment[:4].tobytes()), down)
        self.events["kernel_segment_here"] += 1
        if self.config.vnet:
            start = self._vnet_to_client(buf, start, tcp.header_len, partial, down.mss)
        return [memoryview(buf)[start:self._rx_start + IPV6_HEADER_LEN + tcp_len]]

    def _echo_host_synack_tsval(self, conn: Connection, buf: bytearray, t: int, segment: memoryview, tcp: TcpHeader,
                                partial: int) -> None:
        """While the host has not acknowledged the replay, the client's TSecr becomes the host's SYN-ACK TSval.

        The host may still be in SYN-RECEIVED, where an echo older than its
        SYN-ACK is refused; the replay echoes that TSval too. The word is set
        so that the flow's offset lands on it, and the checksum follows.
        """
        tsval = U32.unpack_from(segment, tcp.ts_at)[0]
        if seq_lt(conn.client_tsval, tsval):
            conn.client_tsval = tsval
        # The whole header is summed: an option may sit at an odd offset, off the 16-bit words.
        header = memoryview(buf)[t:t + tcp.header_len]
        old = ones_sum(header)
        U32.pack_into(buf, t + tcp.ts_at + 4, (conn.host_tsval - conn.ts_off) & MOD32)
        if not partial:
            tcp.checksum = update(tcp.checksum, old, ones_sum(header))
            U16.pack_into(buf, t + 16, tcp.checksum)

    def _host_established(self, conn: Connection, ip: IPv6Header, segment: memoryview, tcp: TcpHeader,
                          now: float) -> list:
        """Host → client: the RFC 5961 checks and FIN tracking here, the rewrite in netstack.flow."""
        flags = tcp.flags
        if flags & RST:
            return self._rst_from_host(conn, ip, segment, tcp, now)
        if ip.hop_limit <= 1:
            return self._drop("ttl_exceeded")
        tcp_len = len(segment)
        if tcp_len + IPV4_HEADER_LEN > 0xFFFF:
            # Only an IPv6 super-packet larger than IPv4's 64 KiB limit (BIG TCP).
            return self._drop("too_big_for_ipv4")
        hl = tcp.header_len
        if flags & ACK:
            ack = tcp.ack
            # RFC 5961 §5.2, from the client's side.
            if seq_lt(conn.client_nxt, ack) or seq_lt(ack, (conn.host_ack - conn.host_max_win) & MOD32):
                return self._drop("ack_out_of_window")
            if seq_lt(conn.host_ack, ack):
                conn.host_ack = ack
            if conn.hello is not None and seq_le((conn.client_isn + 1 + conn.hello.contiguous) & MOD32, ack):
                # The host has every replayed byte (and is past SYN-RECEIVED, even when
                # there were none, as on a tcp listener whose client waits for the host to
                # speak first): the copy is no longer needed.
                conn.hello = None
            conn.host_win = window = tcp.window
            if window << conn.host_wscale > conn.host_max_win:
                conn.host_max_win = window << conn.host_wscale
        end = (tcp.seq - conn.delta + tcp_len - hl + (flags & FIN)) & MOD32
        if seq_lt(conn.host_nxt, end):
            conn.host_nxt = end
        buf = self._rx_buf
        partial = self._rx_flags & F_NEEDS_CSUM
        flow = conn.to_client_flow
        if flow is None:  # restored from a state file: made on its first packet (netstack.state)
            self._make_flows(conn)
            flow = conn.to_client_flow
        start = to_client(buf, self._rx_start, ip, tcp, tcp_len, flow, partial, conn.packets_to_client)
        if flags & FIN and conn.host_fin < 0:
            conn.host_fin = (tcp.seq - conn.delta + tcp_len - hl) & MOD32
        conn.packets_to_client += 1
        if self.config.vnet:
            start = self._vnet_to_client(buf, start, hl, partial, conn.client_mss)
        self._check_closed(conn, now)
        if self.flows is not None and conn.kernel == KERNEL_NO and conn.hello is None:
            self._offload(conn, now)
        return [memoryview(buf)[start:self._rx_start + IPV6_HEADER_LEN + tcp_len]]

    def _client_window_for_host(self, conn: Connection, window: int) -> int:
        if conn.c2h_shift:
            return min(window << conn.c2h_shift, 0xFFFF)
        return window

    def _check_closed(self, conn: Connection, now: float) -> None:
        """Both FINs sent and acknowledged: linger briefly for retransmissions, then go."""
        if conn.closing or conn.client_fin < 0 or conn.host_fin < 0:
            return
        if seq_le((conn.client_fin + 1) & MOD32, conn.host_ack) and seq_le((conn.host_fin + 1) & MOD32,
                                                                          conn.client_ack):
            conn.closing = True
            conn.outcome = "closed"
            # The connection is over now; its record should not wait for the linger.
            self.records.append(self._record(conn, "closed", now))
            conn.recorded = True
            self._set_timer(conn, now + CLOSE_LINGER)

    # RFC 5961 §3.2: an RST is acted on only when its sequence number is exactly the
    # next one expected; one merely inside the window is passed on (the endpoint
    # answers it with a challenge ACK) but the state stays; one outside is dropped.
    def _rst_from_client(self, conn: Connection, ip: IPv4Header, segment: memoryview, tcp: TcpHeader,
                         now: float) -> list[bytearray]:
        window = max(conn.host_win << conn.host_wscale, 1)
        if not (seq_le(conn.host_ack, tcp.seq) and seq_lt(tcp.seq, (conn.host_ack + window) & MOD32)):
            return self._drop("rst_out_of_window")
        packet = self._translate_rst_to_host(conn, ip, segment, tcp)
        if tcp.seq == conn.host_ack:
            self._finish(conn, "reset_by_client", now)
        else:
            self._rst_pending(conn, "reset_by_client", now)
        return [packet]

    def _rst_from_host(self, conn: Connection, ip: IPv6Header, segment: memoryview, tcp: TcpHeader,
                       now: float) -> list[bytearray]:
        expected = (conn.client_ack + conn.delta) & MOD32
        window = max(conn.client_win << (conn.client_wscale or 0), 1)
        if not (seq_le(expected, tcp.seq) and seq_lt(tcp.seq, (expected + window) & MOD32)):
            return self._drop("rst_out_of_window")
        seq = (tcp.seq - conn.delta) & MOD32
        ack = tcp.ack if tcp.flags & ACK else 0
        segment_out = build_segment(conn.listener.port, conn.client_port, seq, ack, tcp.flags & (RST | ACK), 0)
        packet = self._ipv4_to_client(conn, segment_out)
        if tcp.seq == expected:
            self._finish(conn, "reset_by_host", now)
        else:
            self._rst_pending(conn, "reset_by_host", now)
        return [packet]

    def _rst_pending(self, conn: Connection, outcome: str, now: float) -> None:
        conn.rst_at = now
        conn.outcome = outcome
        self._set_timer(conn, now + RST_LINGER)

    def _translate_rst_to_host(self, conn: Connection, ip: IPv4Header, segment: memoryview,
                               tcp: TcpHeader) -> bytearray:
        ack = (tcp.ack + conn.delta) & MOD32 if tcp.flags & ACK else 0
        out = build_segment(conn.host_sport, conn.target.port, tcp.seq, ack, tcp.flags & (RST | ACK), 0)
        conn.packets_to_host += 1
        return self._ipv6_to_host(conn, out)

    # ------------------------------------------------------------ a host gone

    def reset_host(self, host: bytes, now: float) -> list[bytearray]:
        """The host at address `host` is gone for good (an agent's tunnel closed): end its connections.

        Nothing will ever answer for them, so waiting for timeouts would only
        leave clients hanging: a connection still connecting moves on to the
        route's next host if it has one, every other one bound to `host`
        (those the kernel carries included) ends with an RST to the client,
        outcome ``host_gone``. Its host never sees a packet again.
        """
        out: list[bytearray] = []
        for key, conn in list(self.clients.items()):
            if conn.__class__ is tuple:
                if conn[2] != host:
                    continue
                conn = self._unpark(key, conn, now)
                if conn is None:
                    continue
            if conn.state in (PEEKING, REFUSING, GONE) or conn.host != host:
                continue
            self.events["host_gone_reset"] += 1
            if conn.state == CONNECTING:
                conn.candidates = tuple(h for h in conn.candidates if h != host)
                if conn.candidates and now < conn.connect_start + self.config.connect_timeout:
                    self.events["host_failover"] += 1
                    out.extend(self._try_next_host(conn, now))
                    continue
                self._finish(conn, "host_gone", now)
                out.append(self._rst_to_client(conn, conn.hello.contiguous if conn.hello is not None else 0))
                continue
            self._finish(conn, "host_gone", now)
            out.append(self._rst_established_client(conn))
        if self.udp is not None:
            self.udp.reset_host(host, now)
        return out

    def _rst_established_client(self, conn: Connection) -> bytearray:
        """RST|ACK to the client of a spliced connection, at the next sequence number it expects
        (RFC 5961 §3.2: only an exact match resets; host_nxt is what the host sent, in the client's space)."""
        segment = build_segment(conn.listener.port, conn.client_port, conn.host_nxt, conn.client_nxt, RST | ACK, 0)
        conn.packets_to_client += 1
        return self._ipv4_to_client(conn, segment)

    # ------------------------------------------------------------- refusals

    def _refuse(self, conn: Connection, now: float, outcome: str) -> list[bytearray]:
        """No route for the name, or a bad request: the answer ``REFUSALS`` has for `outcome`, then FIN (DESIGN.md)."""
        self._leave_peeking(conn)
        conn.state = REFUSING
        conn.outcome = outcome
        conn.tries = 1
        conn.connect_start = now  # when the refusal began (no host is ever connected)
        self._set_timer(conn, now + SYN_RETRY_FIRST)
        return [self._refusal_segment(conn, now)]

    @staticmethod
    def _refusal_payload(conn: Connection) -> bytes:
        return REFUSALS[(conn.listener.protocol, conn.outcome)]

    def _refusal_segment(self, conn: Connection, now: float) -> bytearray:
        payload = self._refusal_payload(conn)
        # The hello bytes are acknowledged (consumed) and answered in one segment with FIN.
        ack = conn.client_isn + 1 + conn.hello.contiguous
        return self._segment_to_client(conn, conn.our_isn + 1, ack, ACK | PSH | FIN, now, payload)

    def _client_refusing(self, conn: Connection, ip: IPv4Header, segment: memoryview, tcp: TcpHeader,
                         now: float) -> list[bytearray]:
        if tcp.flags & RST:
            self._finish(conn, conn.outcome, now)
            return self._absorb("reset_after_refusal")
        payload = self._refusal_payload(conn)
        our_fin = (conn.our_isn + 1 + len(payload)) & MOD32
        if tcp.flags & FIN:
            # The client closes too: acknowledge its FIN and forget the connection.
            fin_seq = (tcp.seq + len(segment) - tcp.header_len) & MOD32
            self._note_client_options(conn, segment, tcp)
            self._finish(conn, conn.outcome, now)
            return [self._segment_to_client(conn, (our_fin + 1) & MOD32, fin_seq + 1, ACK, now)]
        expected = (conn.client_isn + 1 + conn.hello.contiguous) & MOD32
        if len(segment) > tcp.header_len and seq_lt(expected, (tcp.seq + len(segment) - tcp.header_len) & MOD32):
            # New data after the refusal: nobody will read it.
            self._finish(conn, conn.outcome, now)
            return [self._rst_to_client(conn, conn.hello.contiguous)]
        if tcp.flags & ACK and tcp.ack == (our_fin + 1) & MOD32 and conn.tries < REFUSAL_TRIES:
            # The refusal arrived: stop resending it, wait a little for the client's FIN.
            conn.tries = REFUSAL_TRIES
            self._set_timer(conn, now + CLOSE_LINGER)
        return self._absorb("refusal_acknowledged")

    # ------------------------------------------------------------------ ICMP

    def _icmp_from_client_side(self, packet: memoryview, ip: IPv4Header, now: float) -> list:
        """ICMPv4 to a service address: echo requests, and errors about packets sent to clients."""
        if ip.is_fragment:
            return self._drop("fragment")
        message = packet[ip.header_len:ip.total_len]
        icmp = IcmpHeader(message)
        # RFC 792: the checksum covers the whole message. A corrupted error must
        # not become a valid one on the other side (with a wrong MTU, say).
        if not self._checksum_trusted() and not is_valid(message):
            return self._drop("icmp_bad_checksum")
        if icmp.type == ICMP4_ECHO_REQUEST:
            return self._echo_reply(ip, message)
        if icmp.type not in ICMP4_ERRORS:
            return self._drop("icmp_type")
        quoted = message[ICMP_HEADER_LEN:]
        # The quoted packet went from a service address to a client (RFC 792: its
        # header and at least 8 bytes of TCP, the ports and the sequence number, or of UDP).
        if len(quoted) < IPV4_HEADER_LEN or quoted[0] >> 4 != 4 or quoted[9] not in (PROTO_TCP, PROTO_UDP):
            return self._drop("icmp_quote")
        ihl = (quoted[0] & 0x0F) * 4
        if ihl < IPV4_HEADER_LEN or len(quoted) < ihl + 8:
            return self._drop("icmp_quote")
        if quoted[9] == PROTO_UDP:
            if self.udp is None:
                return self._drop("icmp_quote")
            made = self.udp.icmp_from_client_side(ip, icmp.type, icmp.code, icmp.rest, quoted, ihl)
            return [] if made is None else self._icmp6_error(*made)
        service, client = quoted[12:16].tobytes(), quoted[16:20].tobytes()
        key = client + service + quoted[ihl + 2:ihl + 4].tobytes() + quoted[ihl:ihl + 2].tobytes()
        conn = self.clients.get(key)
        if conn.__class__ is tuple:
            conn = self._unpark(key, conn, now)
        if conn is None or conn.state != ESTABLISHED:
            return self._drop("icmp_no_connection")
        total_len = int.from_bytes(quoted[2:4], "big")
        mapped = icmp4_to_icmp6(icmp.type, icmp.code, icmp.rest, total_len)
        if mapped is None:
            return self._drop("icmp_untranslatable")
        # RFC 7915 §4.5: the quoted packet becomes the IPv6 packet the host sent.
        tcp = bytearray(quoted[ihl:])
        old = ones_sum(service + client + tcp[:8])
        U16.pack_into(tcp, 0, conn.target.port)
        U16.pack_into(tcp, 2, conn.host_sport)
        add_u32(tcp, 4, conn.delta)
        if len(tcp) >= 18:
            U16.pack_into(tcp, 16, update(U16.unpack_from(tcp, 16)[0], old,
                                          ones_sum(conn.host + conn.src6 + tcp[:8])))
        inner = bytearray(build_ipv6_header(conn.host, conn.src6, PROTO_TCP, max(total_len - ihl, len(tcp)),
                                            quoted[8], quoted[1]))
        inner += tcp
        # §4.2: the error comes from the IPv4 router's address, embedded in the prefix.
        return self._icmp6_error(conn.src6[:12] + ip.src, conn.host, mapped, inner)

    def _icmp6_error(self, source: bytes, host: bytes, mapped: tuple[int, int, bytes], inner: bytearray) -> list:
        """A translated error to a host, its quote cut to fit (RFC 4443 §2.4 (c))."""
        room = ICMP6_ERROR_MAX - IPV6_HEADER_LEN - ICMP_HEADER_LEN
        message6 = build_icmp6(source, host, *mapped, inner[:room])
        out = bytearray(PLAIN) if self.config.vnet else bytearray()
        out += build_ipv6_header(source, host, PROTO_ICMPV6, len(message6))
        out += message6
        self.events["icmp_translated"] += 1
        return [out]

    def _icmp_from_host_side(self, packet: memoryview, ip: IPv6Header, now: float) -> list:
        """ICMPv6 to prefix::client: errors about packets kracauer sent to a host."""
        message = packet[IPV6_HEADER_LEN:IPV6_HEADER_LEN + ip.payload_len]
        icmp = IcmpHeader(message)
        # RFC 4443 §2.3: the checksum covers the message and the pseudo-header.
        if not self._checksum_trusted() and not is_valid(
                message, ones_sum(ip.src + ip.dst) + len(message) + PROTO_ICMPV6):
            return self._drop("icmp_bad_checksum")
        if icmp.type not in ICMP6_ERRORS:
            return self._drop("icmp_type")
        quoted = message[ICMP_HEADER_LEN:]
        if len(quoted) < IPV6_HEADER_LEN + 8 or quoted[0] >> 4 != 6 or quoted[6] not in (PROTO_TCP, PROTO_UDP):
            return self._drop("icmp_quote")
        if quoted[6] == PROTO_UDP:
            if self.udp is None:
                return self._drop("icmp_quote")
            made = self.udp.icmp_from_host_side(icmp.type, icmp.code, icmp.rest, quoted)
            return [] if made is None else self._icmp4_error(*made)
        src6, host = quoted[8:24].tobytes(), quoted[24:40].tobytes()
        tcp_at = IPV6_HEADER_LEN
        key = host + src6 + quoted[tcp_at + 2:tcp_at + 4].tobytes() + quoted[tcp_at:tcp_at + 2].tobytes()
        conn = self.hosts.get(key)
        if conn is None and self.in_kernel:
            conn = self._unpark_from_host(key, now)
        if conn is None:
            return self._drop("icmp_no_connection")
        if conn.state == CONNECTING and icmp.type == ICMP6_UNREACHABLE:
            # The host cannot be reached: move on now rather than at the timeout.
            return self._host_failed(conn, "host_unreachable", now)
        if conn.state != ESTABLISHED:
            return self._drop("icmp_no_connection")
        mapped = icmp6_to_icmp4(icmp.type, icmp.code, icmp.rest)
        if mapped is None:
            return self._drop("icmp_untranslatable")
        # RFC 7915 §5.5: the quoted packet becomes the IPv4 packet the client sent.
        tcp = bytearray(quoted[tcp_at:])
        client, service = conn.client_addr, conn.listener.address
        old = ones_sum(src6 + host + tcp[:12])
        U16.pack_into(tcp, 0, conn.client_port)
        U16.pack_into(tcp, 2, conn.listener.port)
        if len(tcp) >= 12:
            add_u32(tcp, 8, -conn.delta)
        if len(tcp) >= 18:
            U16.pack_into(tcp, 16, update(U16.unpack_from(tcp, 16)[0], old, ones_sum(client + service + tcp[:12])))
        payload_len = int.from_bytes(quoted[4:6], "big")
        # The quoted length is the sender's word; an IPv4 header can say at most 65535.
        inner = build_ipv4_header(client, service, PROTO_TCP, min(max(payload_len, len(tcp)), 0xFFFF - IPV4_HEADER_LEN), quoted[7],
                                  ((quoted[0] & 0x0F) << 4) | (quoted[1] >> 4))
        inner += tcp
        return self._icmp4_error(service, client, mapped, inner)

    def _icmp4_error(self, service: bytes, client: bytes, mapped: tuple[int, int, bytes], inner: bytearray) -> list:
        """A translated error to a client, its quote cut to fit (RFC 1812 §4.3.2.3)."""
        room = ICMP4_ERROR_MAX - 2 * IPV4_HEADER_LEN - ICMP_HEADER_LEN
        message4 = build_icmp4(*mapped, inner[:room + IPV4_HEADER_LEN])
        out = bytearray(PLAIN) if self.config.vnet else bytearray()
        out += build_ipv4_header(service, client, PROTO_ICMP, len(message4))
        out += message4
        self.events["icmp_translated"] += 1
        return [out]

    def _echo_reply(self, ip: IPv4Header, message: memoryview) -> list:
        """RFC 792: a listen address answers ping, as any router's address would."""
        if ip.dst not in self.listen_addresses:
            return self._drop("icmp_not_ours")
        icmp = IcmpHeader(message)
        reply = build_icmp4(ICMP4_ECHO_REPLY, 0, icmp.rest, message[ICMP_HEADER_LEN:])
        out = bytearray(PLAIN) if self.config.vnet else bytearray()
        out += build_ipv4_header(ip.dst, ip.src, PROTO_ICMP, len(reply))
        out += reply
        return [out]

    # --------------------------------------------------------------- timers

    def next_timer(self) -> float | None:
        """When ``on_timer`` next has work, or None when there are no connections."""
        at = self._next_tcp_timer()
        if self.udp is not None:
            udp = self.udp.next_timer()
            if udp is not None and (at is None or udp < at):
                return udp
        return at

    def _next_tcp_timer(self) -> float | None:
        sweep = self._sweep_at if self.in_kernel else None
        timers = self._timers
        while timers:
            at, _, conn = timers[0]
            if conn.state != GONE and conn.timer_at == at:
                return at if sweep is None else min(at, sweep)
            heapq.heappop(timers)
            self._stale_timers = max(self._stale_timers - 1, 0)
        return sweep

    def on_timer(self, now: float) -> list[bytearray]:
        """Run every timer that is due: timeouts, SYN and refusal retransmissions."""
        out: list[bytearray] = []
        # Re-read self._timers each time: _expire may compact it into a new list.
        while self._timers and self._timers[0][0] <= now:
            at, _, conn = heapq.heappop(self._timers)
            if conn.state == GONE or conn.timer_at != at:
                self._stale_timers = max(self._stale_timers - 1, 0)
                continue
            out.extend(self._expire(conn, now))
        if self.in_kernel and now >= self._sweep_at:
            self._sweep_parked(now)
        if self.udp is not None:
            out.extend(self.udp.on_timer(now))
        return out

    def _expire(self, conn: Connection, now: float) -> list[bytearray]:
        state = conn.state
        if state == PEEKING:
            # A handshake never completed (a lost ACK, or a spoofed SYN) is not
            # quite a connection; the daemon logs it at debug level only.
            self._finish(conn, "hello_timeout" if conn.acked else "handshake_timeout", now)
            return [self._rst_to_client(conn, conn.hello.contiguous)]
        if state == CONNECTING:
            return self._connect_timer(conn, now)
        if state == REFUSING:
            # Given up by count or by time, whichever comes first (a late timer must not send a stale refusal).
            if conn.tries >= REFUSAL_TRIES or now >= conn.connect_start + SYN_RETRY_FIRST * ((1 << REFUSAL_TRIES) - 1):
                self._finish(conn, conn.outcome, now)
                return []
            conn.tries += 1
            self._set_timer(conn, now + SYN_RETRY_FIRST * (1 << (conn.tries - 1)))
            return [self._refusal_segment(conn, now)]
        if conn.closing:
            self._finish(conn, conn.outcome, now)
            return []
        if conn.rst_at:
            if conn.last_seen <= conn.rst_at:
                # Nothing followed the RST: the endpoint took it.
                self._finish(conn, conn.outcome, now)
                return []
            conn.rst_at = 0.0
            conn.outcome = ""
        if conn.listener.protocol == "connect" and self._answer_unacked(conn):
            return self._resend_answer(conn, now)
        idle_until = conn.last_seen + self.config.idle_timeout
        if idle_until > now:
            if self.flows is not None and conn.kernel == KERNEL_NO:
                self._offload(conn, now)
                if conn.state == GONE:
                    return []  # parked: the sweep watches its idle time now
            self._set_timer(conn, idle_until)
            return []
        self._finish(conn, "idle_timeout", now)
        return []

    def _set_timer(self, conn: Connection, at: float) -> None:
        if conn.timer_at:
            # The connection's earlier entry stays in the heap until it is due:
            # rebuild the heap when they are a quarter of it (amortised O(1) per timer set).
            self._stale_timers += 1
            if self._stale_timers > 1024 and self._stale_timers * 4 > len(self._timers):
                self._compact_timers()
        conn.timer_at = at
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, conn))

    def _compact_timers(self) -> None:
        live = [entry for entry in self._timers if entry[2].state != GONE and entry[2].timer_at == entry[0]]
        heapq.heapify(live)
        self._timers = live
        self._stale_timers = 0

    # -------------------------------------------------------------- the end

    def _finish(self, conn: Connection, outcome: str, now: float) -> None:
        """Remove a connection from both tables and leave its record."""
        if conn.state == GONE:
            return
        if conn.state == PEEKING:
            self._leave_peeking(conn)
        conn.state = GONE
        self.clients.pop(conn.client_key, None)
        if conn.host_key:
            self.hosts.pop(conn.host_key, None)
        if not conn.recorded:
            self.records.append(self._record(conn, outcome, now))

    def _record(self, conn: Connection, outcome: str, now: float) -> ConnectionRecord:
        decision = conn.decision
        target = conn.target
        to_host = to_client = 0
        if conn.host_isn or conn.delta:
            to_host = (conn.host_ack - conn.client_isn - 1) & MOD32
            to_client = (conn.client_ack - conn.our_isn - 1) & MOD32
            # A FIN takes one sequence number but carries no byte.
            if conn.client_fin >= 0 and seq_lt(conn.client_fin, conn.host_ack):
                to_host -= 1
            if conn.host_fin >= 0 and seq_lt(conn.host_fin, conn.client_ack):
                to_client -= 1
        name = decision.name if decision else None
        if name is not None and decision.port is not None:
            # A CONNECT's authority, as the request named it.
            name = f"[{name}]:{decision.port}" if ":" in name else f"{name}:{decision.port}"
        return ConnectionRecord(
            start=conn.start,
            duration=now - conn.start,
            client="%d.%d.%d.%d" % tuple(conn.client_addr),
            client_port=conn.client_port,
            listener=self._name_of(conn.listener),
            protocol=conn.listener.protocol,
            name=name,
            alpn=decision.alpn if decision else (),
            route=target.route if target else None,
            host=self._name_of(conn.host) if conn.host else None,
            host_port=target.port if target else None,
            bytes_to_host=max(to_host, 0),
            bytes_to_client=max(to_client, 0),
            packets_to_host=conn.packets_to_host,
            packets_to_client=conn.packets_to_client,
            hello_size=decision.hello_size if decision else 0,
            outcome=outcome,
            hello_segments=conn.hello_segments,
            hello_records=decision.records if decision else 0,
            connect_time=conn.connect_time,
        )

    def _name_of(self, thing: Listener | bytes) -> str:
        """Text for a listener or a host address, formatted once (records are made per connection)."""
        name = self._names.get(thing)
        if name is None:
            name = str(thing) if isinstance(thing, Listener) else str(ipaddress.IPv6Address(thing))
            if len(self._names) < 65536:
                self._names[thing] = name
        return name

    # ------------------------------------------------------- packet building

    def _our_tsval(self, conn: Connection, now: float) -> int:
        """kracauer's timestamp clock for one connection: milliseconds from a random base."""
        return (conn.ts_base + int(now * 1000)) & MOD32

    def _segment_to_client(self, conn: Connection, seq: int, ack: int, flags: int, now: float,
                           payload: bytes = b"", extra_options: bytes = b"") -> bytearray:
        # RFC 7323 §3.2: once timestamps are on, every segment but an RST carries them.
        options = timestamp_option(self._our_tsval(conn, now), conn.client_tsval) if conn.client_ts else b""
        options += extra_options
        window = max(self.config.hello_max_bytes >> conn.our_wscale, 1)
        segment = build_segment(conn.listener.port, conn.client_port, seq, ack, flags, window, options, payload)
        conn.packets_to_client += 1
        return self._ipv4_to_client(conn, segment)

    def _rst_to_client(self, conn: Connection, consumed: int) -> bytearray:
        """RST|ACK from kracauer's side of the handshake (RFC 9293 §3.10.7.4)."""
        segment = build_segment(conn.listener.port, conn.client_port, conn.our_isn + 1,
                                conn.client_isn + 1 + consumed, RST | ACK, 0)
        conn.packets_to_client += 1
        return self._ipv4_to_client(conn, segment)

    def _rst_to_host(self, conn: Connection) -> bytearray:
        segment = build_segment(conn.host_sport, conn.target.port, conn.client_isn + 1, 0, RST, 0)
        return self._ipv6_to_host(conn, segment)

    def _ipv4_header(self, conn: Connection, payload_len: int, ttl: int = 64, tos: int = 0) -> bytearray:
        self._ident = (self._ident + 1) & 0xFFFF
        return build_ipv4_header(conn.listener.address, conn.client_addr, PROTO_TCP, payload_len, ttl, tos,
                                 self._ident)

    def _ipv4_to_client(self, conn: Connection, segment: bytearray) -> bytearray:
        set_checksum(segment, conn.listener.address, conn.client_addr)
        packet = bytearray(PLAIN) if self.config.vnet else bytearray()
        packet += self._ipv4_header(conn, len(segment))
        packet += segment
        return packet

    def _ipv6_to_host(self, conn: Connection, segment: bytearray) -> bytearray:
        set_checksum(segment, conn.src6, conn.host)
        packet = bytearray(PLAIN) if self.config.vnet else bytearray()
        packet += build_ipv6_header(conn.src6, conn.host, PROTO_TCP, len(segment))
        packet += segment
        return packet
