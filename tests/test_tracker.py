"""netstack.tracker: whole connections walked packet by packet.

Every packet a client or host sends is built by scapy; every packet the
tracker returns is parsed by scapy and its checksums recomputed (``parse``),
which for translated packets checks the incremental update (RFC 1624).

Expected values are computed from the protocol, never read back from the
tracker: kracauer's ISN ``k`` and its window scale and timestamp clock are
learned from the SYN-ACK the client sees, the host's ISN ``h`` and clock are
chosen by the test, and e.g. a host segment must reach the client with
``seq - (h - k)``.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_RR, in4_chksum
from scapy.layers.inet6 import IPv6, in6_chksum
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from netstack.peek import Decision
from netstack.tracker import CLOSE_LINGER, RST_LINGER, Listener, Target, Tracker, TrackerConfig

M32 = 0xFFFFFFFF
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

PREFIX = V6("64:ff9b:1::").packed[:12]
CLIENT = "198.51.100.2"
CLIENT6 = "64:ff9b:1::c633:6402"  # PREFIX + 198.51.100.2
SERVICE = "192.0.2.10"
SERVICE2 = "192.0.2.11"
HOST_WWW = "2001:db8::10"
HOST_ORG = "2001:db8::20"
HOST_SSH = "2001:db8::22"

DATA = pathlib.Path(__file__).parent / "data"
HELLOS = {entry["file"]: entry for entry in json.loads((DATA / "clienthellos.json").read_text())}
# A post-quantum Chrome ClientHello for www.example.com, 1.7 KB: more than one segment.
CHROME = (DATA / "chrome_pq_curl_cffi.bin").read_bytes()
CHROME_META = HELLOS["chrome_pq_curl_cffi.bin"]
# Firefox's, 1.9 KB, for shop.example.com: a name no route knows.
FIREFOX = (DATA / "firefox_pq_curl_cffi.bin").read_bytes()
FIREFOX_META = HELLOS["firefox_pq_curl_cffi.bin"]
# openssl s_client for api.example.org (the wildcard route).
OPENSSL_ORG = (DATA / "openssl_s_client_tls13.bin").read_bytes()

LISTENERS = [
    Listener(V4(SERVICE).packed, 443, "tls"),
    Listener(V4(SERVICE).packed, 80, "http"),
    Listener(V4(SERVICE).packed, 22, "tcp"),
    Listener(V4(SERVICE2).packed, 443, "tls"),
]


def resolve(listener: Listener, decision: Decision) -> Target | None:
    """www.example.com and *.example.org; the tcp listener has one fixed target."""
    if listener.protocol == "tcp":
        return Target(V6(HOST_SSH).packed, 22, "ssh")
    name = decision.name
    if name == "www.example.com":
        host, port, route = HOST_WWW, 443, "www"
    elif name is not None and name.endswith(".example.org"):
        host, port, route = HOST_ORG, 8443, "org"
    else:
        return None
    if listener.protocol == "http":
        port = 80
    return Target(V6(host).packed, port, route)


# -- parsing what the tracker sends, checksums included ----------------------------------

def same_checksum(a: int, b: int) -> bool:
    # RFC 1071 §2: 0x0000 and 0xFFFF are the same ones' complement zero.
    return a % 0xFFFF == b % 0xFFFF


@dataclass
class Out:
    """One packet the tracker sent, parsed by scapy, checksums verified."""

    raw: bytes
    ip: IP | IPv6
    tcp: TCP
    payload: bytes

    @property
    def v4(self) -> bool:
        return isinstance(self.ip, IP)

    @property
    def options(self) -> dict:
        return {name: value for name, value in self.tcp.options if name not in ("NOP", "EOL")}

    @property
    def ts(self) -> tuple[int, int] | None:
        return self.options.get("Timestamp")

    @property
    def flags(self) -> str:
        return str(self.tcp.flags)

    def has(self, flags: str) -> bool:
        return all(flag in self.flags for flag in flags)


def parse(raw: bytes) -> Out:
    raw = bytes(raw)
    version = raw[0] >> 4
    if version == 4:
        ip = IP(raw)
        header_len = ip.ihl * 4
        assert ip.len == len(raw)
        zeroed = raw[:10] + b"\0\0" + raw[12:header_len]
        assert same_checksum(scapy_checksum(zeroed), ip.chksum), "bad IPv4 header checksum"
        assert ip.proto == 6
        segment = raw[header_len:]
        expected = in4_chksum(6, ip, segment[:16] + b"\0\0" + segment[18:])
    else:
        assert version == 6
        ip = IPv6(raw)
        assert ip.plen == len(raw) - 40
        assert ip.nh == 6
        segment = raw[40:]
        expected = in6_chksum(6, ip, segment[:16] + b"\0\0" + segment[18:])
    tcp = ip[TCP]
    assert same_checksum(tcp.chksum, expected), "bad TCP checksum"
    return Out(raw, ip, tcp, segment[tcp.dataofs * 4:])


# -- the box: a tracker, a fake clock, deterministic randomness ------------------------------

class Box:
    def __init__(self, **config) -> None:
        self.now = 1000.0
        rng = random.Random(1)
        self.tracker = Tracker(TrackerConfig(prefix=PREFIX, **config), LISTENERS, resolve,
                               lambda: rng.getrandbits(32))

    def send(self, packet) -> list[Out]:
        return [parse(raw) for raw in self.tracker.receive(bytes(packet), self.now)]

    def wait(self, seconds: float) -> list[Out]:
        """Let `seconds` pass, running every timer that falls due on the way."""
        self.now += seconds
        out = []
        for _ in range(1000):
            at = self.tracker.next_timer()
            if at is None or at > self.now:
                return out
            out += [parse(raw) for raw in self.tracker.on_timer(self.now)]
        raise AssertionError("timers never settle")

    def next_timer(self) -> list[Out]:
        """Jump to the next timer and run it."""
        at = self.tracker.next_timer()
        assert at is not None
        self.now = max(self.now, at)
        return [parse(raw) for raw in self.tracker.on_timer(self.now)]

    @property
    def connections(self) -> int:
        return len(self.tracker.clients)


def client_packet(flags: str, seq: int, ack: int = 0, payload: bytes = b"", *, sport: int = 40000,
                  dst: str = SERVICE, dport: int = 443, window: int = 502, options=None, ts=None, sack=None,
                  tos: int = 0, ttl: int = 64, src: str = CLIENT):
    if options is None:
        options = []
        if ts is not None:
            options += [("NOP", None), ("NOP", None), ("Timestamp", ts)]
        if sack is not None:
            options += [("NOP", None), ("NOP", None), ("SAck", tuple(edge & M32 for edge in sack))]
    packet = IP(src=src, dst=dst, tos=tos, ttl=ttl) / TCP(sport=sport, dport=dport, flags=flags, seq=seq & M32,
                                                         ack=ack & M32, window=window, options=options)
    return packet / Raw(payload) if payload else packet


def host_packet(flags: str, seq: int, ack: int = 0, payload: bytes = b"", *, src: str = HOST_WWW,
                dst: str = CLIENT6, sport: int = 443, dport: int = 40000, window: int = 300, options=None,
                ts=None, sack=None, tc: int = 0, hlim: int = 64):
    if options is None:
        options = []
        if ts is not None:
            options += [("NOP", None), ("NOP", None), ("Timestamp", tuple(v & M32 for v in ts))]
        if sack is not None:
            options += [("NOP", None), ("NOP", None), ("SAck", tuple(edge & M32 for edge in sack))]
    packet = IPv6(src=src, dst=dst, tc=tc, hlim=hlim) / TCP(sport=sport, dport=dport, flags=flags, seq=seq & M32,
                                                           ack=ack & M32, window=window, options=options)
    return packet / Raw(payload) if payload else packet


def syn_options(tsval: int | None = None, mss: int | None = 1460, sack: bool = True, wscale: int | None = 7):
    """A client SYN's options, laid out as Linux does; each one can be left out."""
    options = []
    if mss is not None:
        options.append(("MSS", mss))
    if sack:
        options.append(("SAckOK", b""))
    if tsval is not None:
        options.append(("Timestamp", (tsval, 0)))
    if wscale is not None:
        options += [("NOP", None), ("WScale", wscale)]
    return options


def split(data: bytes, *cuts: int) -> list[tuple[int, bytes]]:
    bounds = [0, *cuts, len(data)]
    return [(bounds[i], data[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1)]


# -- one connection, walked step by step -------------------------------------------------------

@dataclass
class Walk:
    """Both ends of one connection through the box, and what each has learned."""

    box: Box
    sport: int = 40000
    service: str = SERVICE
    dport: int = 443
    # The client's ISN sits just below 2**32, so the hello wraps the sequence space.
    c: int = 0xFFFFFC18
    client_ts: int = 0x7FFFFF00
    client_wscale: int | None = 7
    client_window: int = 502
    # The host's side, chosen by the test.
    h: int = 0x80000010
    host_ts: int = 0xFFFFFF00  # the host's clock wraps during the walk
    host_wscale: int | None = 9
    host_mss: int = 1380
    # Learned from the box.
    k: int = -1
    k_wscale: int = 0
    synack_ts: int = 0
    synack_at: float = 0.0
    splice_at: float = 0.0
    host: str = ""
    host_port: int = 0
    host_sport: int = 0
    syn_tsval: int = 0
    hello: bytes = b""
    sent_tsvals: list = field(default_factory=list)

    # ---- the client

    def tsval(self) -> int:
        """The client's clock: one tick per call is enough for these tests."""
        self.client_ts = (self.client_ts + 1) & M32
        self.sent_tsvals.append(self.client_ts)
        return self.client_ts

    def from_client(self, flags: str, seq: int, ack: int = 0, payload: bytes = b"", *, tsecr: int | None = None,
                    **kw) -> list[Out]:
        ts = (self.tsval(), self.synack_ts if tsecr is None else tsecr)
        kw.setdefault("window", self.client_window)
        return self.box.send(client_packet(flags, seq, ack, payload, sport=self.sport, dst=self.service,
                                           dport=self.dport, ts=ts, **kw))

    def syn(self, **options) -> list[Out]:
        opts = syn_options(tsval=self.tsval(), wscale=self.client_wscale, **options)
        return self.box.send(client_packet("S", self.c, sport=self.sport, dst=self.service, dport=self.dport,
                                           window=64240, options=opts))

    def handshake(self) -> None:
        out = self.syn()
        assert len(out) == 1 and out[0].v4 and out[0].flags == "SA"
        synack = out[0]
        self.k = synack.tcp.seq
        self.k_wscale = synack.options.get("WScale", 0)
        self.synack_ts = synack.ts[0] if synack.ts else 0
        self.synack_at = self.box.now
        assert self.from_client("A", self.c + 1, self.k + 1) == []

    def send_hello(self, hello: bytes, pieces: list[tuple[int, bytes]] | None = None) -> list[Out]:
        """Send the hello (in order, 700-byte pieces, unless `pieces` says otherwise); all the box answers."""
        self.hello = hello
        out: list[Out] = []
        for offset, piece in pieces or split(hello, *range(700, len(hello), 700)):
            out += self.from_client("PA", self.c + 1 + offset, self.k + 1, piece)
        return out

    def expect_host_syn(self, out: list[Out]) -> Out:
        assert len(out) == 1
        syn = out[0]
        assert not syn.v4 and syn.flags == "S"
        self.host = syn.ip.dst
        self.host_port = syn.tcp.dport
        self.host_sport = syn.tcp.sport
        self.syn_tsval = syn.ts[0] if syn.ts else 0
        return syn

    # ---- the host

    def host_options(self) -> list:
        options = [("MSS", self.host_mss), ("SAckOK", b"")]
        if self.host_ts is not None:
            options.append(("Timestamp", (self.host_ts, self.syn_tsval)))
        if self.host_wscale is not None:
            options += [("NOP", None), ("WScale", self.host_wscale)]
        return options

    def from_host(self, flags: str, seq: int, ack: int, payload: bytes = b"", *, host_tick: int | None = None,
                  tsecr: int | None = None, **kw) -> list[Out]:
        """A host segment; its TSval is the host's clock `host_tick` ms after its SYN-ACK."""
        ts = None
        if self.host_ts is not None and "options" not in kw:
            ts = (self.host_ts + (host_tick or 0), self.client_ts if tsecr is None else tsecr)
        return self.box.send(host_packet(flags, seq, ack, payload, src=self.host, sport=self.host_port,
                                         dport=self.host_sport, ts=ts, **kw))

    def host_synack(self) -> list[Out]:
        self.splice_at = self.box.now
        return self.box.send(host_packet("SA", self.h, self.c + 1, src=self.host, sport=self.host_port,
                                         dport=self.host_sport, window=65535, options=self.host_options()))

    # ---- expectations, from the protocol

    @property
    def delta(self) -> int:
        return (self.h - self.k) & M32

    def our_clock(self, at: float) -> int:
        """kracauer's timestamp clock as the client knows it from the SYN-ACK (RFC 7323 §5.4: 1 ms ticks)."""
        return (self.synack_ts + round((at - self.synack_at) * 1000)) & M32

    def establish(self, hello: bytes = CHROME) -> None:
        """Handshake, hello, host SYN-ACK and the host's ACK of the hello."""
        self.handshake()
        self.box.now += 0.05
        self.expect_host_syn(self.send_hello(hello))
        self.box.now += 0.02
        replay = self.host_synack()
        assert replay and all(not out.v4 for out in replay)
        assert b"".join(out.payload for out in replay) == hello
        self.box.now += 0.02
        # The host's ACK of the hello is the first the client hears of it.
        out = self.from_host("A", self.h + 1, self.c + 1 + len(hello), host_tick=20)
        assert len(out) == 1 and out[0].v4
        assert out[0].tcp.ack == (self.c + 1 + len(hello)) & M32
        assert out[0].tcp.seq == (self.k + 1) & M32


def ms_distance(a: int, b: int) -> int:
    """b - a on a 32-bit timestamp clock, signed."""
    d = (b - a) & M32
    return d - (1 << 32) if d & 0x80000000 else d


# ================================================================ step 1: the SYN-ACK

def test_syn_ack_carries_our_isn_acks_the_client_isn_and_echoes_offered_options():
    box = Box()
    walk = Walk(box)
    out = walk.syn()
    assert len(out) == 1
    synack = out[0]
    assert synack.v4
    assert (synack.ip.src, synack.ip.dst) == (SERVICE, CLIENT)
    assert (synack.tcp.sport, synack.tcp.dport) == (443, 40000)
    assert synack.flags == "SA"
    assert synack.tcp.ack == (walk.c + 1) & M32
    options = synack.options
    # DESIGN.md step 1: MSS clamped so a full segment fits IPv6 once the header grows by 20.
    assert options["MSS"] == 1500 - 60
    assert "SAckOK" in options
    assert 0 <= options["WScale"] <= 14
    assert options["Timestamp"][1] == walk.client_ts  # TSecr echoes the client's TSval
    assert synack.tcp.window > 0
    assert synack.payload == b""
    assert box.connections == 1


@pytest.mark.parametrize("mtu", [1500, 1400, 1280])
def test_syn_ack_mss_is_mtu_minus_60(mtu):
    box = Box(mtu=mtu)
    out = Walk(box).syn()
    assert out[0].options["MSS"] == mtu - 60


@pytest.mark.parametrize("offered", [
    dict(mss=None, sack=False, ts=False, wscale=None),
    dict(mss=1460, sack=False, ts=False, wscale=None),
    dict(mss=1460, sack=True, ts=False, wscale=None),
    dict(mss=1460, sack=False, ts=True, wscale=None),
    dict(mss=1460, sack=False, ts=False, wscale=2),
    dict(mss=1460, sack=True, ts=True, wscale=14),
])
def test_syn_ack_echoes_sack_timestamps_and_window_scale_only_if_offered(offered):
    box = Box()
    options = syn_options(tsval=12345 if offered["ts"] else None, mss=offered["mss"], sack=offered["sack"],
                          wscale=offered["wscale"])
    out = box.send(client_packet("S", 777, options=options))
    assert len(out) == 1
    got = out[0].options
    assert got["MSS"] == 1440  # our receive MSS, whatever the client's
    assert ("SAckOK" in got) is offered["sack"]
    assert ("WScale" in got) is (offered["wscale"] is not None)
    assert ("Timestamp" in got) is offered["ts"]
    if offered["ts"]:
        assert got["Timestamp"][1] == 12345
    assert out[0].tcp.ack == 778


def test_client_syn_retransmission_gets_the_same_syn_ack():
    box = Box()
    walk = Walk(box)
    first = walk.syn()[0]
    box.now += 1.0
    walk.client_ts -= 1  # the retransmitted SYN carries the same options
    again = walk.syn()
    assert len(again) == 1
    second = again[0]
    assert second.flags == "SA"
    assert (second.tcp.seq, second.tcp.ack) == (first.tcp.seq, first.tcp.ack)
    assert second.tcp.window == first.tcp.window
    first_options, second_options = first.options, second.options
    assert first_options.pop("Timestamp")[1] == second_options.pop("Timestamp")[1]
    assert first_options == second_options
    # kracauer's clock never goes back (RFC 7323 §5.3).
    assert ms_distance(first.ts[0], second.ts[0]) >= 0
    assert box.connections == 1


def test_syn_with_a_bad_checksum_is_dropped():
    box = Box()
    raw = bytearray(bytes(client_packet("S", 1, options=syn_options(tsval=1))))
    raw[20 + 16] ^= 0xFF
    assert box.send(bytes(raw)) == []
    assert box.tracker.drops["bad_checksum"] == 1
    assert box.connections == 0


# ================================================================ step 2: the hello, buffered

def test_out_of_order_duplicated_hello_gives_one_syn_only_when_complete():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    a, b, c = split(CHROME, 600, 1200)
    # The last piece first, then the middle, the last again, and the middle
    # re-segmented over its neighbours: nothing can be routed yet.
    for offset, piece in (c, b, c, (550, CHROME[550:1300])):
        out = walk.from_client("PA", walk.c + 1 + offset, walk.k + 1, piece)
        # Nothing towards a host, and nothing acknowledged: no piece from the start is held yet.
        assert out == []
    box.now += 0.01
    out = walk.from_client("PA", walk.c + 1 + a[0], walk.k + 1, a[1])
    syn = walk.expect_host_syn(out)
    assert (syn.ip.src, syn.ip.dst) == (CLIENT6, HOST_WWW)
    assert syn.tcp.dport == 443
    # The client's own port and ISN: client-to-host sequence numbers need no change.
    assert syn.tcp.sport == 40000
    assert syn.tcp.seq == walk.c
    assert syn.tcp.ack == 0
    assert syn.payload == b""
    options = syn.options
    assert options["MSS"] == 1440  # min(client's 1460, mtu - 60)
    assert options["WScale"] == 7  # the client's own
    assert "SAckOK" in options
    tsval, tsecr = options["Timestamp"]
    assert tsval in walk.sent_tsvals and tsecr == 0
    # A duplicate of a piece after the decision changes nothing.
    assert walk.from_client("PA", walk.c + 1 + b[0], walk.k + 1, b[1]) == []
    assert box.tracker.hosts and len(box.tracker.hosts) == 1


def test_hello_is_not_acknowledged_while_it_is_buffered():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    for offset, piece in split(CHROME, 500, 1000, 1500)[:-1]:
        assert walk.from_client("PA", walk.c + 1 + offset, walk.k + 1, piece) == []


def test_no_decision_before_the_last_byte_of_the_hello():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    for offset in range(0, len(CHROME) - 1, 97):
        piece = CHROME[offset:min(offset + 97, len(CHROME) - 1)]
        assert walk.from_client("PA", walk.c + 1 + offset, walk.k + 1, piece) == []
    out = walk.from_client("PA", walk.c + len(CHROME), walk.k + 1, CHROME[-1:])
    walk.expect_host_syn(out)


@pytest.mark.parametrize("client_mss,mtu,expected", [(1460, 1500, 1440), (1200, 1500, 1200), (1460, 1400, 1340)])
def test_host_syn_mss_is_the_clients_clamped_to_mtu_minus_60(client_mss, mtu, expected):
    box = Box(mtu=mtu)
    walk = Walk(box)
    out = walk.syn(mss=client_mss)
    walk.k = out[0].tcp.seq
    walk.synack_ts = out[0].ts[0]
    walk.from_client("A", walk.c + 1, walk.k + 1)
    syn = walk.expect_host_syn(walk.send_hello(CHROME))
    assert syn.options["MSS"] == expected


def test_wildcard_route_chooses_its_host_and_port():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    syn = walk.expect_host_syn(walk.send_hello(OPENSSL_ORG, split(OPENSSL_ORG)))
    assert (syn.ip.dst, syn.tcp.dport) == (HOST_ORG, 8443)


def test_host_syn_window_is_not_a_scaled_window():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    syn = walk.expect_host_syn(walk.send_hello(CHROME))
    # The client offered 64240 bytes in its SYN and then 502 << 7 = 64256 bytes;
    # an unscaled SYN window must say one of those, not 502 bytes.
    assert syn.tcp.window in (64240, min(walk.client_window << 7, 0xFFFF))


# ================================================================ step 3/4: the splice

def test_host_syn_ack_replays_the_hello_and_nothing_reaches_the_client():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    last_client_tsval = walk.client_ts
    box.now += 0.03
    replay = walk.host_synack()
    assert replay
    # No SYN-ACK (nor anything else) leaks to the client: every packet goes to the host.
    assert all(not out.v4 for out in replay)
    offset = 0
    for out in replay:
        assert (out.ip.src, out.ip.dst) == (CLIENT6, HOST_WWW)
        assert (out.tcp.sport, out.tcp.dport) == (40000, 443)
        assert out.has("A") and not out.has("S") and not out.has("F") and not out.has("R")
        assert out.tcp.seq == (walk.c + 1 + offset) & M32
        assert out.tcp.ack == (walk.h + 1) & M32
        # TSecr is the host's TSval (RFC 7323 §4.3); TSval is the client's clock.
        assert out.ts == (last_client_tsval, walk.host_ts)
        # RFC 6691: payload plus options fit the host's MSS.
        assert len(out.payload) + (out.tcp.dataofs * 4 - 20) <= walk.host_mss
        # The client's window, in the scale the host was told (the client's own).
        assert out.tcp.window == walk.client_window
        offset += len(out.payload)
    assert b"".join(out.payload for out in replay) == CHROME
    assert len(replay) >= 2


def test_host_timestamp_value_zero_is_still_a_timestamp():
    box = Box()
    walk = Walk(box, host_ts=0)  # any 32-bit value is a valid TSval (RFC 7323 §3.2)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    replay = walk.host_synack()
    assert all(r.ts == (walk.client_ts, 0) for r in replay)


def test_host_syn_ack_retransmission_replays_again_without_reaching_the_client():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    first = walk.host_synack()
    box.now += 1.0
    second = walk.host_synack()
    assert all(not out.v4 for out in second)
    assert [(o.tcp.seq, o.payload) for o in second] == [(o.tcp.seq, o.payload) for o in first]


def test_host_syn_ack_with_a_bad_ack_is_dropped():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    out = box.send(host_packet("SA", walk.h, walk.c + 2, src=walk.host, sport=443, dport=40000,
                               options=walk.host_options()))
    assert out == []
    assert sum(box.tracker.drops.values()) == 1


# ================================================================ data, host to client

def test_host_data_reaches_the_client_translated():
    box = Box()
    walk = Walk(box)
    walk.establish()
    box.now += 0.1
    payload = bytes(range(256)) * 4
    out = walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), payload, host_tick=120, window=300,
                         tc=0x28, hlim=60)
    assert len(out) == 1
    seg = out[0]
    assert seg.v4
    assert (seg.ip.src, seg.ip.dst) == (SERVICE, CLIENT)
    assert (seg.tcp.sport, seg.tcp.dport) == (443, 40000)
    assert seg.flags == "PA"
    assert seg.tcp.seq == (walk.h + 1 - walk.delta) & M32 == (walk.k + 1) & M32
    assert seg.tcp.ack == (walk.c + 1 + len(CHROME)) & M32  # client sequence space: unchanged
    # The host's window in its scale (9), expressed in the scale the client was told.
    assert seg.tcp.window == min((300 << walk.host_wscale) >> walk.k_wscale, 0xFFFF)
    # RFC 7915 §5.1: TTL from hop limit, decremented; TOS from traffic class.
    assert seg.ip.ttl == 59
    assert seg.ip.tos == 0x28
    assert seg.payload == payload
    tsval, tsecr = seg.ts
    assert tsecr == walk.client_ts  # the client's own clock: unchanged
    # The client sees one clock, continuous with the SYN-ACK's.
    expected = (walk.our_clock(walk.splice_at) + 120) & M32
    assert abs(ms_distance(expected, tsval)) <= 1


def test_host_clock_maps_onto_the_syn_ack_clock_even_when_it_wraps():
    box = Box()
    walk = Walk(box)
    walk.host_ts = 0xFFFFFFF0  # wraps 16 ms after the SYN-ACK
    walk.establish()
    seen = []
    for tick in (20, 500, 3000):
        box.now = walk.splice_at + tick / 1000
        out = walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME), host_tick=tick)
        seen.append(out[0].ts[0])
    for tick, tsval in zip((20, 500, 3000), seen):
        assert abs(ms_distance((walk.our_clock(walk.splice_at) + tick) & M32, tsval)) <= 1
    assert ms_distance(walk.synack_ts, seen[0]) >= 0  # never behind the SYN-ACK (RFC 7323 §5.3)


def test_large_host_segment_gets_df_and_small_one_does_not():
    box = Box()
    walk = Walk(box)
    walk.establish()
    ack = walk.c + 1 + len(CHROME)
    small = walk.from_host("PA", walk.h + 1, ack, b"s" * 1000)[0]
    big = walk.from_host("PA", walk.h + 1001, ack, b"b" * 1300)[0]
    # RFC 7915 §5.1: DF exactly when the IPv4 packet is over 1260 bytes.
    assert small.ip.len <= 1260 and "DF" not in small.ip.flags
    assert big.ip.len > 1260 and "DF" in big.ip.flags
    assert big.tcp.seq == (walk.k + 1001) & M32


@pytest.mark.parametrize("host_wscale,window", [(9, 300), (7, 300), (5, 301), (14, 10), (9, 0xFFFF)])
def test_host_window_is_rescaled_to_the_scale_the_client_was_told(host_wscale, window):
    box = Box()
    walk = Walk(box, host_wscale=host_wscale)
    walk.establish()
    seg = walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME), window=window)[0]
    in_bytes = window << host_wscale
    # Rounded up and capped: never a smaller window than the host offered.
    expected = min(-(-in_bytes // (1 << walk.k_wscale)), 0xFFFF)
    assert seg.tcp.window == expected


def test_host_without_window_scaling_has_its_window_scaled_down_for_the_client():
    box = Box()
    walk = Walk(box, host_wscale=None)
    walk.establish()
    seg = walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME), window=1000)[0]
    # RFC 7323 §2.2: the host did not scale, the client believes kracauer's scale.
    assert seg.tcp.window == -(-1000 // (1 << walk.k_wscale))
    # And the client's windows reach the host in bytes (the host does not scale).
    out = walk.from_client("A", walk.c + 1 + len(CHROME), walk.k + 1, window=100)
    assert out[0].tcp.window == min(100 << 7, 0xFFFF)


def test_host_sack_blocks_reach_the_client_unchanged():
    box = Box()
    walk = Walk(box)
    walk.establish()
    base = walk.c + 1 + len(CHROME)
    # The host SACKs client data: blocks name the client's sequence space.
    blocks = (base + 100, base + 200, base + 300, base + 400)
    seg = walk.from_host("A", walk.h + 1, base, sack=blocks)[0]
    assert seg.options["SAck"] == tuple(b & M32 for b in blocks)
    assert seg.tcp.ack == base & M32


def test_host_segment_with_hop_limit_one_is_not_forwarded():
    box = Box()
    walk = Walk(box)
    walk.establish()
    assert walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME), hlim=1) == []
    assert sum(box.tracker.drops.values()) == 1


def test_host_rst_in_window_but_inexact_reaches_the_client_and_state_waits_for_the_linger():
    box = Box()
    walk = Walk(box)
    walk.establish()
    hello_end = walk.c + 1 + len(CHROME)
    out = box.send(host_packet("R", walk.h + 1 + 100, src=walk.host, dport=walk.host_sport))
    assert len(out) == 1 and out[0].v4 and out[0].has("R")
    assert out[0].tcp.seq == (walk.k + 1 + 100) & M32
    assert box.connections == 1
    box.now += 0.05
    # The client's challenge ACK keeps the connection.
    challenge = walk.from_client("A", hello_end, walk.k + 1)
    assert len(challenge) == 1 and not challenge[0].v4
    box.wait(RST_LINGER + 1)
    assert box.connections == 1


def test_client_without_window_scaling_sees_unscaled_windows_both_ways():
    box = Box()
    walk = Walk(box, client_wscale=None)
    walk.handshake()
    assert walk.k_wscale == 0
    syn = walk.expect_host_syn(walk.send_hello(CHROME))
    # RFC 7323 §2.2: the host is not offered scaling, so neither side scales.
    assert "WScale" not in syn.options
    walk.host_synack()
    down = walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME), window=40000)
    assert down[0].tcp.window == 40000
    up = walk.from_client("A", walk.c + 1 + len(CHROME), walk.k + 1, window=30000)
    assert up[0].tcp.window == 30000


def test_client_window_scale_other_than_ours_passes_to_the_host_unchanged():
    box = Box()
    walk = Walk(box, client_wscale=2, host_wscale=9)
    walk.establish()
    # The host was told the client's own scale (2): client windows need no change.
    up = walk.from_client("A", walk.c + 1 + len(CHROME), walk.k + 1, window=12345)
    assert up[0].tcp.window == 12345
    down = walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME), window=100)
    assert down[0].tcp.window == min(-(-(100 << 9) // (1 << walk.k_wscale)), 0xFFFF)


def test_connection_without_timestamps_carries_none():
    box = Box()
    walk = Walk(box)
    out = box.send(client_packet("S", walk.c, window=64240, options=syn_options(tsval=None)))
    walk.k = out[0].tcp.seq
    assert "Timestamp" not in out[0].options
    box.send(client_packet("A", walk.c + 1, walk.k + 1))
    out = []
    for offset, piece in split(CHROME, 900):
        out += box.send(client_packet("PA", walk.c + 1 + offset, walk.k + 1, piece))
    syn = walk.expect_host_syn(out)
    assert "Timestamp" not in syn.options
    walk.host_ts = None
    replay = walk.host_synack()
    assert all(r.ts is None for r in replay)
    assert b"".join(r.payload for r in replay) == CHROME
    down = box.send(host_packet("PA", walk.h + 1, walk.c + 1 + len(CHROME), b"hi", src=walk.host,
                                dport=walk.host_sport))
    assert down[0].ts is None and down[0].tcp.seq == (walk.k + 1) & M32


def test_bytes_the_client_sends_while_the_host_is_connecting_are_replayed_too():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    extra = b"early data after the hello"
    assert walk.from_client("PA", walk.c + 1 + len(CHROME), walk.k + 1, extra) == []
    replay = walk.host_synack()
    assert b"".join(r.payload for r in replay) == CHROME + extra


def test_hello_with_fin_is_replayed_with_the_fin():
    box = Box()
    walk = Walk(box, dport=80)
    walk.handshake()
    request = b"GET / HTTP/1.0\r\nHost: www.example.com\r\n\r\n"
    out = walk.from_client("FPA", walk.c + 1, walk.k + 1, request)
    walk.expect_host_syn(out)
    replay = walk.host_synack()
    assert b"".join(r.payload for r in replay) == request
    assert replay[-1].has("F") and not any(r.has("F") for r in replay[:-1])
    # The host answers, acknowledges the FIN and closes: the connection is over.
    end = walk.c + 1 + len(request) + 1
    down = walk.from_host("FPA", walk.h + 1, end, b"HTTP/1.0 200 OK\r\n\r\n")
    assert down[0].tcp.ack == end & M32 and down[0].has("F")
    walk.from_client("A", end, walk.k + 1 + 19 + 1)
    box.wait(CLOSE_LINGER + 1)
    assert box.connections == 0
    assert [r.outcome for r in box.tracker.records] == ["closed"]
    assert box.tracker.records[0].bytes_to_host == len(request)
    assert box.tracker.records[0].bytes_to_client == 19


def test_client_rst_while_the_host_is_connecting_resets_the_host_side():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    out = box.send(client_packet("R", walk.c + 1 + len(CHROME)))
    assert len(out) == 1
    rst = out[0]
    assert not rst.v4 and rst.has("R")
    assert (rst.ip.dst, rst.tcp.sport, rst.tcp.dport) == (HOST_WWW, 40000, 443)
    # In the host's window: it has acknowledged (or will acknowledge) c + 1.
    assert rst.tcp.seq == (walk.c + 1) & M32
    assert box.connections == 0 and box.tracker.hosts == {}
    assert [r.outcome for r in box.tracker.records] == ["reset_by_client"]


def test_client_rst_before_the_hello_is_complete_ends_the_connection_silently():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:500])
    assert box.send(client_packet("R", walk.c + 501)) == []
    assert box.connections == 0
    assert [r.outcome for r in box.tracker.records] == ["reset_by_client"]


def test_new_syn_on_the_port_of_a_closed_connection_starts_afresh():
    box = Box()
    walk = Walk(box)
    walk.establish()
    close_both_ways(walk, sent_to_client=0, sent_to_host=0)
    assert box.connections == 1  # lingering
    fresh = Walk(box, c=0x01020304)
    out = fresh.syn()
    assert len(out) == 1 and out[0].flags == "SA"
    assert out[0].tcp.ack == 0x01020305
    assert [r.outcome for r in box.tracker.records] == ["closed"]
    fresh.k = out[0].tcp.seq
    fresh.synack_ts = out[0].ts[0]
    fresh.from_client("A", fresh.c + 1, fresh.k + 1)
    syn = fresh.expect_host_syn(fresh.send_hello(CHROME))
    assert syn.tcp.seq == fresh.c


def test_idle_connection_is_removed_after_the_idle_timeout():
    box = Box(idle_timeout=60.0)
    walk = Walk(box)
    walk.establish()
    box.wait(30.0)
    walk.from_client("A", walk.c + 1 + len(CHROME), walk.k + 1)
    box.wait(59.0)
    assert box.connections == 1  # the client's ACK 30 s in restarted the clock
    box.wait(2.0)
    assert box.connections == 0
    assert [r.outcome for r in box.tracker.records] == ["idle_timeout"]


# ================================================================ data, client to host

def test_client_ack_reaches_the_host_translated_with_sack_and_tsecr():
    box = Box()
    walk = Walk(box)
    walk.establish()
    base_k = walk.k + 1
    box.now += 0.1
    host_seen = walk.from_host("PA", walk.h + 1 + 1000, walk.c + 1 + len(CHROME), b"x" * 1000, host_tick=100)[0]
    echoed = host_seen.ts[0]  # what the client saw, and will echo
    box.now += 0.01
    # The client missed the first 1000 bytes and SACKs the second thousand.
    out = walk.from_client("A", walk.c + 1 + len(CHROME), base_k, tsecr=echoed, sack=(base_k + 1000, base_k + 2000),
                           tos=0xB8, ttl=50)
    assert len(out) == 1
    seg = out[0]
    assert not seg.v4
    assert (seg.ip.src, seg.ip.dst) == (CLIENT6, HOST_WWW)
    assert (seg.tcp.sport, seg.tcp.dport) == (40000, 443)
    assert seg.tcp.seq == (walk.c + 1 + len(CHROME)) & M32
    assert seg.tcp.ack == (base_k + walk.delta) & M32 == (walk.h + 1) & M32
    # SACK edges name the host's sequence space: shifted by delta (RFC 2018 §3).
    assert seg.options["SAck"] == ((walk.h + 1 + 1000) & M32, (walk.h + 1 + 2000) & M32)
    # The round trip: the client's echo comes back to the host as the host's own TSval.
    assert seg.ts == (walk.client_ts, (walk.host_ts + 100) & M32)
    # RFC 7915 §4.1: hop limit from TTL, decremented; traffic class from TOS; flow label 0.
    assert seg.ip.hlim == 49
    assert seg.ip.tc == 0xB8
    assert seg.ip.fl == 0
    assert seg.tcp.window == walk.client_window


def test_client_data_reaches_the_host_byte_for_byte():
    box = Box()
    walk = Walk(box)
    walk.establish()
    payload = bytes(range(200)) + b"\0"  # odd length: the checksum pads it
    out = walk.from_client("PA", walk.c + 1 + len(CHROME), walk.k + 1, payload)
    seg = out[0]
    assert seg.payload == payload
    assert seg.tcp.seq == (walk.c + 1 + len(CHROME)) & M32
    assert seg.flags == "PA"


def test_client_sack_with_four_blocks_and_no_timestamps_is_shifted():
    box = Box()
    walk = Walk(box)
    walk.establish()
    walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), bytes(9000))
    k1 = walk.k + 1
    blocks = tuple(k1 + 1000 * i for i in range(1, 9))
    packet = client_packet("A", walk.c + 1 + len(CHROME), k1, options=[("NOP", None), ("NOP", None),
                                                                      ("SAck", tuple(b & M32 for b in blocks))])
    seg = box.send(packet)[0]
    assert seg.options["SAck"] == tuple((b + walk.delta) & M32 for b in blocks)


@given(st.integers(0, 1400), st.lists(st.integers(0, 0x7FFF), min_size=2, max_size=6))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_client_ack_and_sack_is_shifted_by_delta_with_a_valid_checksum(ack_offset, edges):
    box = Box()
    walk = Walk(box)
    walk.establish(OPENSSL_ORG)
    # The client may only acknowledge what the host sent (RFC 5961 §5.2).
    walk.from_host("PA", walk.h + 1, walk.c + 1 + len(OPENSSL_ORG), bytes(1400))
    edges = edges[:len(edges) // 2 * 2][:6]
    ack = walk.k + 1 + ack_offset
    sack = tuple(walk.k + 1 + e for e in edges)
    seg = walk.from_client("A", walk.c + 1 + len(OPENSSL_ORG), ack, sack=sack)[0]  # parse() checks the checksum
    assert seg.tcp.ack == (ack + walk.delta) & M32
    assert seg.options["SAck"] == tuple((e + walk.delta) & M32 for e in sack)


def test_client_packet_with_ip_options_is_translated_from_where_ihl_says():
    box = Box()
    walk = Walk(box)
    walk.establish()
    packet = client_packet("PA", walk.c + 1 + len(CHROME), walk.k + 1, b"with options",
                           ts=(walk.tsval(), walk.synack_ts))
    packet[IP].options = [IPOption_RR(routers=["10.0.0.1", "10.0.0.2", "10.0.0.3"])]
    raw = bytes(packet)
    assert raw[0] & 0x0F > 5
    out = box.send(raw)
    assert len(out) == 1
    seg = out[0]
    assert not seg.v4 and seg.payload == b"with options"
    assert seg.tcp.ack == (walk.h + 1) & M32


def test_link_layer_padding_after_the_ip_packet_is_not_forwarded():
    box = Box()
    walk = Walk(box)
    walk.establish()
    raw = bytes(client_packet("PA", walk.c + 1 + len(CHROME), walk.k + 1, b"x")) + b"\0" * 5
    out = box.send(raw)
    assert out[0].payload == b"x"  # parse() checked the payload length too
    raw = bytes(host_packet("PA", walk.h + 1, walk.c + 1 + len(CHROME), b"y", src=walk.host,
                            dport=walk.host_sport)) + b"\0" * 3
    out = box.send(raw)
    assert out[0].payload == b"y"


def test_a_corrupted_client_segment_stays_corrupted_after_translation():
    box = Box()
    walk = Walk(box)
    walk.establish()
    raw = bytearray(bytes(client_packet("PA", walk.c + 1 + len(CHROME), walk.k + 1, b"payload bytes",
                                        ts=(walk.tsval(), walk.synack_ts))))
    raw[-1] ^= 0x01  # a bit flipped on the way, after the client checksummed it
    out = box.tracker.receive(bytes(raw), box.now)
    assert len(out) == 1
    ip = IPv6(bytes(out[0]))
    segment = bytes(out[0])[40:]
    correct = in6_chksum(6, ip, segment[:16] + b"\0\0" + segment[18:])
    # The incremental update carries the error along: the host will drop it.
    assert not same_checksum(ip[TCP].chksum, correct)


def test_a_corrupted_host_segment_stays_corrupted_after_translation():
    box = Box()
    walk = Walk(box)
    walk.establish()
    raw = bytearray(bytes(host_packet("PA", walk.h + 1, walk.c + 1 + len(CHROME), b"payload", src=walk.host,
                                      dport=walk.host_sport)))
    raw[-2] ^= 0x40
    out = box.tracker.receive(bytes(raw), box.now)
    assert len(out) == 1
    ip = IP(bytes(out[0]))
    segment = bytes(out[0])[20:]
    assert not same_checksum(ip[TCP].chksum, in4_chksum(6, ip, segment[:16] + b"\0\0" + segment[18:]))


def test_client_packet_with_ttl_one_is_not_forwarded():
    box = Box()
    walk = Walk(box)
    walk.establish()
    assert box.send(client_packet("PA", walk.c + 1 + len(CHROME), walk.k + 1, b"x", ttl=1)) == []
    assert box.connections == 1


# ================================================================ teardown

def close_both_ways(walk: Walk, sent_to_client: int, sent_to_host: int) -> None:
    """Host FIN, client FIN+ACK, host ACK; each step checked on the far side."""
    box = walk.box
    hello_end = walk.c + 1 + len(walk.hello)
    fin = walk.from_host("FA", walk.h + 1 + sent_to_client, hello_end + sent_to_host, host_tick=400)
    assert len(fin) == 1 and fin[0].v4 and fin[0].has("F")
    assert fin[0].tcp.seq == (walk.k + 1 + sent_to_client) & M32
    box.now += 0.01
    out = walk.from_client("FA", hello_end + sent_to_host, walk.k + 1 + sent_to_client + 1)
    assert len(out) == 1 and not out[0].v4 and out[0].has("FA")
    assert out[0].tcp.ack == (walk.h + 1 + sent_to_client + 1) & M32
    box.now += 0.01
    last = walk.from_host("A", walk.h + 2 + sent_to_client, hello_end + sent_to_host + 1, host_tick=420)
    assert len(last) == 1 and last[0].v4
    assert last[0].tcp.ack == (hello_end + sent_to_host + 1) & M32


def test_fin_both_ways_removes_state_after_the_linger_and_records_the_connection():
    box = Box()
    walk = Walk(box)
    walk.establish()
    start = walk.synack_at
    ack = walk.c + 1 + len(CHROME)
    walk.from_host("PA", walk.h + 1, ack, b"s" * 1000, host_tick=30)
    walk.from_host("PA", walk.h + 1001, ack, b"t" * 300, host_tick=31)
    walk.from_client("PA", ack, walk.k + 1301, b"r" * 200)
    walk.from_host("A", walk.h + 1301, ack + 200, host_tick=40)
    close_both_ways(walk, sent_to_client=1300, sent_to_host=200)
    closed_at = box.now
    assert box.connections == 1  # retransmitted FINs and ACKs are still translated
    box.wait(CLOSE_LINGER - 0.5)
    assert box.connections == 1
    retransmitted = walk.from_host("FA", walk.h + 1301, ack + 201, host_tick=900)
    assert len(retransmitted) == 1 and retransmitted[0].v4
    box.wait(CLOSE_LINGER + 1)
    assert box.connections == 0
    assert box.tracker.hosts == {}
    assert box.tracker.next_timer() is None
    assert len(box.tracker.records) == 1
    record = box.tracker.records[0]
    assert record.outcome == "closed"
    assert record.bytes_to_host == len(CHROME) + 200
    assert record.bytes_to_client == 1300
    assert record.client == CLIENT and record.client_port == 40000
    assert record.listener == f"{SERVICE}:443" and record.protocol == "tls"
    assert record.name == CHROME_META["sni"]
    assert record.alpn == tuple(CHROME_META["alpn"])
    assert record.hello_size == CHROME_META["hello_size"]
    assert (record.host, record.host_port, record.route) == (HOST_WWW, 443, "www")
    assert record.start == start
    assert closed_at - start <= record.duration <= box.now - start


def test_client_closes_first_then_host():
    box = Box()
    walk = Walk(box)
    walk.establish()
    hello_end = walk.c + 1 + len(CHROME)
    out = walk.from_client("FA", hello_end, walk.k + 1)
    assert out[0].has("F") and out[0].tcp.seq == hello_end & M32
    out = walk.from_host("FA", walk.h + 1, hello_end + 1)
    assert out[0].has("F") and out[0].tcp.seq == (walk.k + 1) & M32 and out[0].tcp.ack == (hello_end + 1) & M32
    out = walk.from_client("A", hello_end + 1, walk.k + 2)
    assert out[0].tcp.ack == (walk.h + 2) & M32
    box.wait(CLOSE_LINGER + 1)
    assert box.connections == 0
    assert [r.outcome for r in box.tracker.records] == ["closed"]
    assert box.tracker.records[0].bytes_to_host == len(CHROME)
    assert box.tracker.records[0].bytes_to_client == 0


def test_half_close_keeps_the_connection_open():
    box = Box()
    walk = Walk(box)
    walk.establish()
    hello_end = walk.c + 1 + len(CHROME)
    walk.from_client("FA", hello_end, walk.k + 1)
    walk.from_host("A", walk.h + 1, hello_end + 1)
    box.wait(CLOSE_LINGER + 1)
    assert box.connections == 1
    out = walk.from_host("PA", walk.h + 1, hello_end + 1, b"still talking")
    assert out[0].payload == b"still talking"


# ================================================================ RST, RFC 5961 §3.2

def test_client_rst_with_the_exact_sequence_number_is_translated_and_ends_the_connection():
    box = Box()
    walk = Walk(box)
    walk.establish()
    rcv_nxt = walk.c + 1 + len(CHROME)  # what the host acknowledged last
    out = box.send(client_packet("RA", rcv_nxt, walk.k + 1))
    assert len(out) == 1
    rst = out[0]
    assert not rst.v4 and rst.has("R")
    assert (rst.ip.src, rst.ip.dst) == (CLIENT6, HOST_WWW)
    assert (rst.tcp.sport, rst.tcp.dport) == (40000, 443)
    assert rst.tcp.seq == rcv_nxt & M32
    assert rst.tcp.ack == (walk.h + 1) & M32
    assert box.connections == 0 and box.tracker.hosts == {}
    assert [r.outcome for r in box.tracker.records] == ["reset_by_client"]


def test_client_rst_in_window_but_inexact_is_forwarded_and_state_kept_until_the_linger():
    box = Box()
    walk = Walk(box)
    walk.establish()
    rcv_nxt = walk.c + 1 + len(CHROME)
    out = box.send(client_packet("R", rcv_nxt + 1000))
    assert len(out) == 1 and out[0].has("R") and out[0].tcp.seq == (rcv_nxt + 1000) & M32
    assert box.connections == 1
    box.wait(RST_LINGER - 0.5)
    assert box.connections == 1
    box.wait(1.0)
    assert box.connections == 0
    assert [r.outcome for r in box.tracker.records] == ["reset_by_client"]


def test_client_rst_in_window_is_survived_when_the_host_answers_with_a_challenge_ack():
    box = Box()
    walk = Walk(box)
    walk.establish()
    rcv_nxt = walk.c + 1 + len(CHROME)
    box.send(client_packet("R", rcv_nxt + 1000))
    box.now += 0.05
    # RFC 5961 §3.2: the host answers a blind RST with a challenge ACK.
    challenge = walk.from_host("A", walk.h + 1, rcv_nxt)
    assert len(challenge) == 1 and challenge[0].v4
    box.wait(RST_LINGER + 1)
    assert box.connections == 1
    assert box.tracker.records == []
    out = walk.from_client("PA", rcv_nxt, walk.k + 1, b"after the RST")
    assert out[0].payload == b"after the RST"


@pytest.mark.parametrize("offset", [-1, -1000, 300 << 9, 0x40000000])
def test_client_rst_outside_the_window_is_dropped_and_counted(offset):
    box = Box()
    walk = Walk(box)
    walk.establish()
    walk.from_host("A", walk.h + 1, walk.c + 1 + len(CHROME), window=300)  # host window: 300 << 9 bytes
    rcv_nxt = walk.c + 1 + len(CHROME)
    assert box.send(client_packet("R", rcv_nxt + offset)) == []
    assert box.tracker.drops["rst_out_of_window"] == 1
    assert box.connections == 1
    box.wait(RST_LINGER + 1)
    assert box.connections == 1


def test_host_rst_with_the_exact_sequence_number_reaches_the_client_and_ends_the_connection():
    box = Box()
    walk = Walk(box)
    walk.establish()
    hello_end = walk.c + 1 + len(CHROME)
    walk.from_host("PA", walk.h + 1, hello_end, b"z" * 500)
    walk.from_client("A", hello_end, walk.k + 501)
    out = box.send(host_packet("RA", walk.h + 501, hello_end, src=walk.host, dport=walk.host_sport))
    assert len(out) == 1
    rst = out[0]
    assert rst.v4 and rst.has("R")
    assert (rst.ip.src, rst.ip.dst) == (SERVICE, CLIENT)
    assert rst.tcp.seq == (walk.k + 501) & M32
    assert rst.tcp.ack == hello_end & M32  # the client's sequence space: unchanged
    assert box.connections == 0
    assert [r.outcome for r in box.tracker.records] == ["reset_by_host"]
    assert box.tracker.records[0].bytes_to_client == 500


def test_host_rst_outside_the_window_is_dropped():
    box = Box()
    walk = Walk(box)
    walk.establish()
    out = box.send(host_packet("R", walk.h - 5, src=walk.host, dport=walk.host_sport))
    assert out == []
    assert box.tracker.drops["rst_out_of_window"] == 1
    assert box.connections == 1


def test_host_rst_beyond_the_clients_window_right_after_the_splice_is_dropped():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    walk.host_synack()
    # The client's last segments offered 502 << 7 = 64256 bytes; 100000 bytes on is out of its window.
    assert box.send(host_packet("R", walk.h + 1 + 100000, src=walk.host, dport=walk.host_sport)) == []
    assert box.tracker.drops["rst_out_of_window"] == 1


def test_client_rst_beyond_the_hosts_syn_ack_window_is_dropped():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    walk.host_synack()  # window 65535, unscaled
    assert box.send(client_packet("R", walk.c + 1 + 65535 + 1000)) == []
    assert box.tracker.drops["rst_out_of_window"] == 1


# ================================================================ the host does not take it

def test_host_rst_to_our_syn_resets_the_client():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    out = box.send(host_packet("RA", 0, walk.c + 1, src=walk.host, dport=walk.host_sport))
    assert len(out) == 1
    rst = out[0]
    assert rst.v4 and rst.has("R")
    assert (rst.ip.src, rst.ip.dst) == (SERVICE, CLIENT)
    assert (rst.tcp.sport, rst.tcp.dport) == (443, 40000)
    # Acceptable to the client: exactly its RCV.NXT (RFC 9293 §3.10.7.4, RFC 5961 §3.2).
    assert rst.tcp.seq == (walk.k + 1) & M32
    assert box.connections == 0 and box.tracker.hosts == {}
    assert [r.outcome for r in box.tracker.records] == ["host_refused"]


def test_host_rst_without_ack_to_our_syn_is_ignored():
    # RFC 9293 §3.10.7.3: in SYN-SENT an RST without an acceptable ACK is dropped.
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    assert box.send(host_packet("R", 0, src=walk.host, dport=walk.host_sport)) == []
    assert box.connections == 1


def test_unanswered_syn_is_retransmitted_with_backoff_then_the_client_is_reset():
    box = Box(connect_timeout=10.0)
    walk = Walk(box)
    walk.handshake()
    first = walk.expect_host_syn(walk.send_hello(CHROME))
    connect_start = box.now
    syn_times = [box.now]
    while True:
        out = box.next_timer()
        assert len(out) == 1
        if out[0].v4:
            rst = out[0]
            break
        syn = out[0]
        assert syn.flags == "S"
        assert syn.raw[40:] == first.raw[40:]  # the same SYN each time
        syn_times.append(box.now)
    gaps = [b - a for a, b in zip(syn_times, syn_times[1:])]
    assert len(gaps) >= 2
    assert gaps[0] >= 1.0  # RFC 6298 §2.1: the first RTO is 1 s
    for earlier, later in zip(gaps, gaps[1:]):
        assert later == pytest.approx(2 * earlier)  # RFC 6298 §5.5: back off
    assert syn_times[-1] < connect_start + 10.0
    assert rst.has("R") and rst.tcp.seq == (walk.k + 1) & M32
    assert box.now == pytest.approx(connect_start + 10.0)
    assert box.connections == 0
    assert [r.outcome for r in box.tracker.records] == ["host_unreachable"]


def test_hello_timeout_resets_the_client():
    box = Box(hello_timeout=10.0)
    walk = Walk(box)
    walk.handshake()
    started = walk.synack_at
    walk.from_client("PA", walk.c + 1, walk.k + 1, CHROME[:600])
    assert box.wait(started + 10.0 - 0.01 - box.now) == []
    assert box.connections == 1
    out = box.wait(0.02)
    assert len(out) == 1
    rst = out[0]
    assert rst.v4 and rst.has("R") and rst.tcp.seq == (walk.k + 1) & M32
    assert box.connections == 0
    assert [r.outcome for r in box.tracker.records] == ["hello_timeout"]


# ================================================================ refusals

def test_unknown_name_gets_an_unrecognized_name_alert_with_fin_and_the_client_fin_is_acknowledged():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    out = walk.send_hello(FIREFOX)
    assert len(out) == 1
    alert = out[0]
    assert alert.v4 and alert.has("FA")
    assert (alert.ip.src, alert.ip.dst) == (SERVICE, CLIENT)
    # RFC 8446 §6: a plaintext alert record, fatal (2), unrecognized_name (112).
    assert alert.payload == bytes.fromhex("15030300020270")
    assert alert.tcp.seq == (walk.k + 1) & M32
    # The hello is consumed: acknowledged with the alert.
    hello_end = (walk.c + 1 + len(FIREFOX)) & M32
    assert alert.tcp.ack == hello_end
    # The client acknowledges the alert and its FIN, and closes too.
    our_fin = walk.k + 1 + len(alert.payload)
    out = walk.from_client("FA", hello_end, our_fin + 1)
    assert len(out) == 1
    ack = out[0]
    assert ack.v4 and ack.flags == "A"
    assert ack.tcp.ack == (hello_end + 1) & M32
    assert ack.tcp.seq == (our_fin + 1) & M32
    assert box.connections == 0
    assert box.tracker.hosts == {}
    record = box.tracker.records[0]
    assert record.outcome == "refused_unknown_name"
    assert record.name == FIREFOX_META["sni"]
    assert record.host is None


def test_refusal_segments_carry_timestamps_on_our_clock():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    box.now += 0.5
    alert = walk.send_hello(FIREFOX)[0]
    tsval, tsecr = alert.ts  # RFC 7323 §3.2: every non-RST segment carries them
    assert tsecr == walk.client_ts
    assert abs(ms_distance(walk.our_clock(box.now), tsval)) <= 1


def test_hello_larger_than_the_cap_resets_the_client():
    box = Box(hello_max_bytes=1024)
    walk = Walk(box)
    walk.handshake()
    out = walk.send_hello(CHROME)
    assert len(out) == 1 and out[0].v4 and out[0].has("R")
    assert box.connections == 0
    assert box.tracker.hosts == {}


def test_unacknowledged_refusal_is_retransmitted_then_given_up():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    first = walk.send_hello(FIREFOX)[0]
    resent = []
    for _ in range(20):
        if box.tracker.next_timer() is None:
            break
        resent += box.next_timer()
    assert resent
    assert all(r.payload == first.payload and r.tcp.seq == first.tcp.seq and r.has("F") for r in resent)
    assert box.connections == 0
    assert [r.outcome for r in box.tracker.records] == ["refused_unknown_name"]


def test_acknowledged_refusal_is_not_retransmitted():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    alert = walk.send_hello(FIREFOX)[0]
    hello_end = walk.c + 1 + len(FIREFOX)
    # The client acknowledges the alert and the FIN but keeps its own side open.
    assert walk.from_client("A", hello_end, walk.k + 1 + len(alert.payload) + 1) == []
    assert box.wait(30.0) == []


def test_unknown_http_host_gets_421_with_fin():
    box = Box()
    walk = Walk(box, dport=80)
    walk.handshake()
    request = b"GET / HTTP/1.1\r\nHost: unknown.example.net\r\nUser-Agent: test\r\n\r\n"
    out = walk.send_hello(request, split(request, 20))
    assert len(out) == 1
    answer = out[0]
    assert answer.v4 and answer.has("FA")
    assert answer.tcp.sport == 80
    assert answer.payload.startswith(b"HTTP/1.1 421 ")
    head, _, body = answer.payload.partition(b"\r\n\r\n")
    length = [line.split(b":")[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    assert length and int(length[0]) == len(body)
    assert answer.tcp.ack == (walk.c + 1 + len(request)) & M32
    assert answer.tcp.seq == (walk.k + 1) & M32
    out = walk.from_client("FA", walk.c + 1 + len(request), walk.k + 1 + len(answer.payload) + 1)
    assert out[0].tcp.ack == (walk.c + 1 + len(request) + 1) & M32
    assert box.connections == 0


def _bad_request_walk(request: bytes, resolver=resolve) -> tuple[Box, Walk, list[Out]]:
    box = Box()
    box.tracker.resolve = resolver
    walk = Walk(box, dport=80)
    walk.handshake()
    return box, walk, walk.send_hello(request, split(request, 7))


def _assert_400_with_fin(walk: Walk, out: list[Out], request: bytes) -> Out:
    """RFC 9110 §15.5.1: a whole 400 response in one segment with FIN, the request consumed."""
    assert len(out) == 1
    answer = out[0]
    assert answer.v4 and answer.has("FA") and not answer.has("R")
    assert answer.tcp.sport == 80
    head, _, body = answer.payload.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 400 Bad Request"
    fields = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:])}
    assert fields[b"connection"] == b"close"
    assert int(fields[b"content-length"]) == len(body) > 0
    assert answer.tcp.seq == (walk.k + 1) & M32
    assert answer.tcp.ack == (walk.c + 1 + len(request)) & M32
    return answer


def test_http11_request_without_host_gets_400_with_fin_and_the_client_fin_is_acknowledged():
    request = b"GET / HTTP/1.1\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    box, walk, out = _bad_request_walk(request)
    answer = _assert_400_with_fin(walk, out, request)
    assert box.tracker.hosts == {}
    # The client acknowledges the 400 and its FIN, and closes too (as curl does).
    hello_end = (walk.c + 1 + len(request)) & M32
    our_fin = (walk.k + 1 + len(answer.payload)) & M32
    assert walk.from_client("A", hello_end, our_fin + 1) == []
    out = walk.from_client("FA", hello_end, our_fin + 1)
    assert len(out) == 1 and out[0].flags == "A"
    assert out[0].tcp.ack == (hello_end + 1) & M32 and out[0].tcp.seq == (our_fin + 1) & M32
    assert box.connections == 0
    record = box.tracker.records[0]
    assert (record.outcome, record.name, record.route, record.host) == ("refused_bad_request", None, None, None)
    assert record.hello_size == len(request)


def test_unacknowledged_400_is_retransmitted_then_given_up():
    request = b"GET / HTTP/1.1\r\n\r\n"
    box, walk, out = _bad_request_walk(request)
    first = _assert_400_with_fin(walk, out, request)
    resent = []
    while box.tracker.next_timer() is not None:
        resent += box.next_timer()
    assert resent and all(r.payload == first.payload and r.tcp.seq == first.tcp.seq and r.has("F") for r in resent)
    assert [r.outcome for r in box.tracker.records] == ["refused_bad_request"]


def test_http11_request_with_two_host_headers_gets_400_even_if_both_have_a_route():
    request = b"GET / HTTP/1.1\r\nHost: www.example.com\r\nHost: www.example.com\r\n\r\n"
    box, walk, out = _bad_request_walk(request)
    _assert_400_with_fin(walk, out, request)
    assert box.tracker.hosts == {}


def _with_fallback(listener: Listener, decision: Decision) -> Target | None:
    return resolve(listener, decision) or Target(V6(HOST_ORG).packed, 80, "fallback")


def test_http10_request_without_host_gets_400_when_there_is_no_fallback():
    request = b"GET / HTTP/1.0\r\nUser-Agent: old\r\n\r\n"
    box, walk, out = _bad_request_walk(request)
    _assert_400_with_fin(walk, out, request)
    assert box.tracker.hosts == {}
    box.wait(30.0)
    assert [r.outcome for r in box.tracker.records] == ["refused_bad_request"]


def test_http10_request_without_host_goes_to_the_fallback():
    request = b"GET / HTTP/1.0\r\nUser-Agent: old\r\n\r\n"
    box, walk, out = _bad_request_walk(request, _with_fallback)
    syn = walk.expect_host_syn(out)
    assert (syn.ip.dst, syn.tcp.dport, syn.tcp.seq) == (HOST_ORG, 80, walk.c)
    assert b"".join(r.payload for r in walk.host_synack()) == request


def test_http11_request_without_host_gets_400_even_with_a_fallback():
    request = b"GET / HTTP/1.1\r\n\r\n"
    box, walk, out = _bad_request_walk(request, _with_fallback)
    _assert_400_with_fin(walk, out, request)
    assert box.tracker.hosts == {}


def test_known_http_host_is_routed_to_its_host():
    box = Box()
    walk = Walk(box, dport=80)
    walk.handshake()
    request = b"GET / HTTP/1.1\r\nHost: WWW.Example.COM\r\n\r\n"
    syn = walk.expect_host_syn(walk.send_hello(request, split(request, 5, 30)))
    assert (syn.ip.dst, syn.tcp.dport, syn.tcp.seq) == (HOST_WWW, 80, walk.c)
    replay = walk.host_synack()
    assert b"".join(r.payload for r in replay) == request


def test_non_tls_bytes_on_the_tls_port_reset_the_client():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    out = walk.send_hello(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n", [(0, b"GET / HTTP/1.1\r\n")])
    assert len(out) == 1
    rst = out[0]
    assert rst.v4 and rst.has("R")
    assert rst.tcp.seq == (walk.k + 1) & M32
    assert box.connections == 0 and box.tracker.hosts == {}
    assert [r.outcome for r in box.tracker.records] == ["not_tls"]


# ================================================================ the tcp listener

def test_tcp_listener_binds_right_after_the_handshake_ack():
    box = Box()
    walk = Walk(box, dport=22)
    out = walk.syn()
    walk.k = out[0].tcp.seq
    walk.synack_ts = out[0].ts[0]
    walk.synack_at = box.now
    out = walk.from_client("A", walk.c + 1, walk.k + 1)
    syn = walk.expect_host_syn(out)
    assert (syn.ip.src, syn.ip.dst) == (CLIENT6, HOST_SSH)
    assert (syn.tcp.sport, syn.tcp.dport, syn.tcp.seq) == (40000, 22, walk.c)
    replay = walk.host_synack()
    # The host's handshake is completed with a bare ACK: there are no bytes to replay.
    assert len(replay) == 1
    assert replay[0].flags == "A" and replay[0].payload == b""
    assert replay[0].tcp.seq == (walk.c + 1) & M32 and replay[0].tcp.ack == (walk.h + 1) & M32
    banner = b"SSH-2.0-OpenSSH_9.6\r\n"
    out = walk.from_host("PA", walk.h + 1, walk.c + 1, banner, host_tick=5)
    assert out[0].v4 and out[0].payload == banner
    assert out[0].tcp.seq == (walk.k + 1) & M32 and out[0].tcp.sport == 22


# ================================================================ packets of no connection

def test_stray_ack_is_dropped_and_counted():
    box = Box()
    assert box.send(client_packet("A", 1000, 2000)) == []
    assert box.send(client_packet("PA", 1000, 2000, b"data")) == []
    assert box.tracker.drops["no_connection"] == 2
    assert box.connections == 0


def test_syn_to_an_unconfigured_port_or_address_is_dropped_and_counted():
    box = Box()
    assert box.send(client_packet("S", 1, dport=8080, options=syn_options())) == []
    assert box.send(client_packet("S", 1, dst="192.0.2.99", options=syn_options())) == []
    assert box.send(client_packet("S", 1, dst=SERVICE2, dport=80, options=syn_options())) == []
    assert box.tracker.drops["no_listener"] == 3
    assert box.connections == 0


def test_ipv6_packets_of_no_connection_are_dropped_and_counted():
    box = Box()
    walk = Walk(box)
    walk.establish()
    hello_end = walk.c + 1 + len(CHROME)
    before = sum(box.tracker.drops.values())
    strays = [
        # prefix::another-client
        host_packet("PA", walk.h + 1, hello_end, b"x", dst="64:ff9b:1::c633:6403", dport=walk.host_sport),
        # another host, right client address and ports
        host_packet("PA", walk.h + 1, hello_end, b"x", src="2001:db8::99", dport=walk.host_sport),
        # the right host, another port
        host_packet("PA", walk.h + 1, hello_end, b"x", src=walk.host, sport=8443, dport=walk.host_sport),
        host_packet("PA", walk.h + 1, hello_end, b"x", src=walk.host, dport=walk.host_sport + 1),
        # outside the prefix
        host_packet("PA", walk.h + 1, hello_end, b"x", dst="2001:db8:ffff::c633:6402", dport=walk.host_sport),
        # a SYN from a host towards a client: never opens anything
        host_packet("S", 5, 0, dst="64:ff9b:1::c633:6403", dport=40000),
    ]
    for packet in strays:
        assert box.send(packet) == []
    assert sum(box.tracker.drops.values()) - before == len(strays)
    assert box.tracker.drops["not_prefix"] == 1
    assert box.connections == 1


def test_ipv4_fragment_is_dropped_and_counted():
    box = Box()
    packet = IP(src=CLIENT, dst=SERVICE, flags="MF") / TCP(sport=40000, dport=443, flags="S", options=syn_options())
    assert box.send(packet) == []
    assert box.tracker.drops["fragment"] == 1
    assert box.connections == 0


@pytest.mark.parametrize("raw", [
    pytest.param(b"\x45\x00", id="short-ipv4"),
    pytest.param(bytes(IP(src=CLIENT, dst=SERVICE) / TCP(dataofs=4)), id="tcp-data-offset-4"),
    pytest.param(b"\x60" + bytes(10), id="short-ipv6"),
    pytest.param(b"\x00" * 40, id="not-ip"),
])
def test_malformed_packets_are_dropped_and_counted(raw):
    box = Box()
    assert box.send(raw) == []
    assert sum(box.tracker.drops.values()) == 1


# ================================================================ collisions

def test_same_client_port_to_two_listeners_routed_to_one_host_gets_two_source_ports():
    box = Box()
    first = Walk(box, service=SERVICE)
    second = Walk(box, service=SERVICE2, c=0x12345678, h=0x0BADF00D, host_ts=5000)
    first.handshake()
    second.handshake()
    syn1 = first.expect_host_syn(first.send_hello(CHROME))
    syn2 = second.expect_host_syn(second.send_hello(CHROME))
    # One host and port, one embedded client address: the source port tells them apart.
    assert (syn1.ip.src, syn1.ip.dst, syn1.tcp.dport) == (syn2.ip.src, syn2.ip.dst, syn2.tcp.dport)
    assert syn1.tcp.sport == 40000
    assert syn2.tcp.sport != syn1.tcp.sport
    assert 1024 <= syn2.tcp.sport <= 65535
    assert (syn1.tcp.seq, syn2.tcp.seq) == (first.c, second.c)
    replay2 = second.host_synack()
    replay1 = first.host_synack()
    assert {r.tcp.sport for r in replay1} == {40000}
    assert {r.tcp.sport for r in replay2} == {second.host_sport}
    assert all(r.tcp.ack == (first.h + 1) & M32 for r in replay1)
    assert all(r.tcp.ack == (second.h + 1) & M32 for r in replay2)
    # Host data on each goes back to the right listener address with the right numbers.
    out1 = first.from_host("PA", first.h + 1, first.c + 1 + len(CHROME), b"one")
    out2 = second.from_host("PA", second.h + 1, second.c + 1 + len(CHROME), b"two")
    assert (out1[0].ip.src, out1[0].tcp.dport, out1[0].tcp.seq, out1[0].payload) == (
        SERVICE, 40000, (first.k + 1) & M32, b"one")
    assert (out2[0].ip.src, out2[0].tcp.dport, out2[0].tcp.seq, out2[0].payload) == (
        SERVICE2, 40000, (second.k + 1) & M32, b"two")
    # Client data on each goes to the right host-side port.
    up1 = first.from_client("PA", first.c + 1 + len(CHROME), first.k + 4, b"uno")
    up2 = second.from_client("PA", second.c + 1 + len(CHROME), second.k + 4, b"dos")
    assert (up1[0].tcp.sport, up1[0].tcp.ack, up1[0].payload) == (40000, (first.h + 4) & M32, b"uno")
    assert (up2[0].tcp.sport, up2[0].tcp.ack, up2[0].payload) == (second.host_sport, (second.h + 4) & M32, b"dos")
    # Closing one leaves the other alone.
    box.send(client_packet("RA", first.c + 1 + len(CHROME), first.k + 4, dst=SERVICE))  # the host's RCV.NXT
    assert box.connections == 1
    out2 = second.from_host("PA", second.h + 4, second.c + 1 + len(CHROME) + 3, b"still")
    assert out2[0].ip.src == SERVICE2 and out2[0].payload == b"still"


# ================================================================ property: any arrival order

@st.composite
def hello_arrivals(draw):
    cuts = sorted(draw(st.sets(st.integers(1, len(CHROME) - 1), min_size=1, max_size=6)))
    pieces = split(CHROME, *cuts)
    duplicates = draw(st.lists(st.sampled_from(pieces), max_size=3))
    order = draw(st.permutations(pieces + duplicates))
    return order


@given(hello_arrivals())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_arrival_order_of_the_hello_gives_one_syn_and_an_exact_replay(order):
    box = Box()
    walk = Walk(box)
    walk.handshake()
    received = set()
    syns = []
    for offset, piece in order:
        out = walk.from_client("PA", walk.c + 1 + offset, walk.k + 1, piece)
        received.add(offset)
        complete = all(o in received for o, _ in split(CHROME, *sorted({o for o, _ in order} - {0})))
        if not complete:
            # Nothing towards a host; at most an ACK of the bytes held from the start.
            assert all(o.v4 and o.flags == "A" and 0 < ((o.tcp.ack - walk.c - 1) & M32) <= len(CHROME)
                       for o in out)
            continue
        syns += out
    assert len(syns) == 1 and syns[0].flags == "S" and not syns[0].v4
    walk.expect_host_syn(syns)
    replay = walk.host_synack()
    assert b"".join(r.payload for r in replay) == CHROME


def test_a_handshake_that_never_completes_ends_as_handshake_timeout():
    box = Box()
    Walk(box).syn()
    box.wait(11)
    assert [r.outcome for r in box.tracker.records] == ["handshake_timeout"]
