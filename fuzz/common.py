"""What the atheris targets share: the box they fuzz, packet builders, and the checks.

The checks are those of tests/test_fuzz.py, without scapy (too slow for a
coverage-guided fuzzer): a packet is accounted for (answered, dropped or
absorbed); everything the tracker sends is well-formed with right checksums,
comes from a listen address (IPv4) or from inside a translation prefix (IPv6),
and goes to a configured host (IPv6: kracauer is no open relay); in the far
future nothing is left in the tables.

``Provider`` reads an input the way atheris' FuzzedDataProvider does, but is
plain Python: the targets run, and crash inputs replay, without atheris.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import random
import struct
import traceback

from netstack.checksum import finish, is_valid, ones_sum
from netstack.peek import Decision
from netstack.tracker import HEADROOM, REFUSAL_TRIES, Listener, Target, Tracker, TrackerConfig
from netstack.vnet import F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, PLAIN, VNET_HEADER

M32 = 0xFFFFFFFF
V4 = lambda text: ipaddress.IPv4Address(text).packed  # noqa: E731
V6 = lambda text: ipaddress.IPv6Address(text).packed  # noqa: E731

PREFIX = V6("64:ff9b:1::")[:12]
PREFIX2 = V6("64:ff9b:2::")[:12]
CLIENT = V4("198.51.100.2")
OTHER_CLIENT = V4("203.0.113.7")
SERVICE = V4("192.0.2.10")
SERVICE2 = V4("192.0.2.11")
NOT_SERVICE = V4("192.0.2.99")
ROUTER4 = V4("198.18.0.1")
HOST_WWW = V6("2001:db8::10")
HOST_WWW2 = V6("2001:db8::11")
HOST_ORG = V6("2001:db8::20")
HOST_SSH = V6("2001:db8::22")
STRANGER6 = V6("2001:db8:bad::1")
ROUTER6 = V6("2001:db8:ffff::1")

LISTENERS = [
    Listener(SERVICE, 443, "tls"),
    Listener(SERVICE, 80, "http"),
    Listener(SERVICE, 22, "tcp"),
    Listener(SERVICE2, 443, "tls"),
    Listener(SERVICE2, 8080, "http", prefix=PREFIX2),
]
LISTEN_ADDRESSES = {SERVICE, SERVICE2}
PREFIXES = {PREFIX, PREFIX2}
HOSTS = {HOST_WWW, HOST_WWW2, HOST_ORG, HOST_SSH}

DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data"
CAPTURES = {path.stem: path.read_bytes() for path in sorted(DATA.glob("*.bin"))}
HTTP_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: fuzz\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: nowhere.example.net\r\n\r\n",
    b"GET http://api.example.org:80/x HTTP/1.0\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
]


def resolve(listener: Listener, decision: Decision) -> Target | None:
    """www.example.com (two hosts) and *.example.org; the tcp listener has one fixed target."""
    if listener.protocol == "tcp":
        return Target(HOST_SSH, 22, "ssh")
    port = 80 if listener.protocol == "http" else None
    if decision.name == "www.example.com":
        return Target(HOST_WWW, port or 443, "www", hosts=(HOST_WWW, HOST_WWW2))
    if decision.name is not None and decision.name.endswith(".example.org"):
        return Target(HOST_ORG, port or 8443, "org")
    return None


# ------------------------------------------------------------ the input

class Provider:
    """Values read from the front of the fuzzer's bytes; zeros once they run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + max(n, 0)]
        self.pos += len(out)
        return out

    def int(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        span = high - low
        if span <= 0:
            return low
        size = (span.bit_length() + 7) // 8
        return low + int.from_bytes(self.bytes(size).ljust(size, b"\0"), "big") % (span + 1)

    def pick(self, choices):
        return choices[self.int(0, len(choices) - 1)]

    def bool(self) -> bool:
        return bool(self.int(0, 1))


# ----------------------------------------------------------- the builders

def tcp_segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
                options: bytes = b"", payload: bytes = b"", data_offset: int | None = None) -> bytes:
    """A TCP segment with its checksum over the pseudo-header (IPv4 or IPv6 alike: RFC 9293, RFC 8200 §8.1)."""
    options = options[:40] + bytes(-len(options[:40]) % 4)
    offset = data_offset if data_offset is not None else 5 + len(options) // 4
    segment = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & M32, ack & M32, (offset & 15) << 4, flags & 0xFF,
                                    window & 0xFFFF, 0, 0) + options + payload)
    segment[16:18] = finish(ones_sum(src + dst) + 6 + len(segment) + ones_sum(segment)).to_bytes(2, "big")
    return bytes(segment)


def ipv4_packet(src: bytes, dst: bytes, proto: int, payload: bytes, ttl: int = 64, tos: int = 0,
                flags_offset: int = 0, total: int | None = None, ihl: int = 5) -> bytes:
    options = bytes(max(ihl - 5, 0) * 4)
    total = 4 * max(ihl, 5) + len(payload) if total is None else total
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | (ihl & 15), tos, total & 0xFFFF, 1, flags_offset, ttl,
                                   proto, 0, src, dst) + options)
    header[10:12] = finish(ones_sum(header)).to_bytes(2, "big")
    return bytes(header) + payload


def ipv6_packet(src: bytes, dst: bytes, next_header: int, payload: bytes, hop_limit: int = 64, tc: int = 0,
                payload_len: int | None = None) -> bytes:
    length = len(payload) if payload_len is None else payload_len
    return struct.pack("!IHBB16s16s", 0x60000000 | (tc << 20), length & 0xFFFF, next_header, hop_limit, src, dst) \
        + payload


def icmp4_message(type_: int, code: int, rest: bytes, body: bytes) -> bytes:
    message = bytearray(struct.pack("!BBH", type_, code, 0) + rest[:4].ljust(4, b"\0") + body)
    message[2:4] = finish(ones_sum(message)).to_bytes(2, "big")
    return bytes(message)


def icmp6_message(src: bytes, dst: bytes, type_: int, code: int, rest: bytes, body: bytes) -> bytes:
    message = bytearray(struct.pack("!BBH", type_, code, 0) + rest[:4].ljust(4, b"\0") + body)
    message[2:4] = finish(ones_sum(src + dst) + 58 + len(message) + ones_sum(message)).to_bytes(2, "big")
    return bytes(message)


def make_partial(packet: bytearray) -> None:
    """Put the pseudo-header sum in the TCP checksum field, as the kernel leaves a NEEDS_CSUM packet."""
    if not packet or packet[0] >> 4 not in (4, 6):
        return
    v6 = packet[0] >> 4 == 6
    at = 40 if v6 else (packet[0] & 15) * 4
    if len(packet) < at + 18:
        return
    addresses = bytes(packet[8:40]) if v6 else bytes(packet[12:20])
    packet[at + 16:at + 18] = ((ones_sum(addresses) + 6 + len(packet) - at) % 0xFFFF).to_bytes(2, "big")


# ------------------------------------------------------------ the checks

class KnownBug(Exception):
    """The input ran into a bug already pinned by a strict xfail test in tests/test_fuzz.py."""


# Keep in step with KNOWN_BUGS in tests/test_fuzz.py; KRACAUER_FUZZ_KNOWN_BUGS=fail reports them as crashes.
KNOWN_BUGS: dict[str, str] = {}
# "fail" for all of them, or a comma-separated list of their names.
FAIL_ON_KNOWN_BUGS = set(os.environ.get("KRACAUER_FUZZ_KNOWN_BUGS", "").split(","))


def known_bug(name: str) -> None:
    if name in KNOWN_BUGS and not FAIL_ON_KNOWN_BUGS & {"fail", name}:
        raise KnownBug(name)


def transport_ok(ip: bytes) -> tuple[bool, bool]:
    """(full TCP checksum verifies, checksum field holds the pseudo-header sum) for an input packet."""
    try:
        version = ip[0] >> 4
        if version == 4:
            hl, total = (ip[0] & 15) * 4, int.from_bytes(ip[2:4], "big")
            if hl < 20 or total < hl or total > len(ip):
                return False, False
            body, addresses = ip[hl:total], ip[12:20]
        elif version == 6:
            if len(ip) < 40 or 40 + int.from_bytes(ip[4:6], "big") > len(ip):
                return False, False
            body, addresses = ip[40:40 + int.from_bytes(ip[4:6], "big")], ip[8:40]
        else:
            return False, False
    except IndexError:
        return False, False
    pseudo = ones_sum(addresses) + 6 + len(body)
    partial = len(body) >= 18 and int.from_bytes(body[16:18], "big") % 0xFFFF == pseudo % 0xFFFF
    return is_valid(body, pseudo), partial


def check_output(raw: bytes, vnet: bool, translated: bool, came_in=None) -> None:
    """One packet the tracker sends (see the module docstring)."""
    partial = False
    if vnet:
        assert len(raw) > 10, "frame shorter than its vnet header"
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HEADER.unpack_from(raw)
        if not translated:
            assert raw[:10] == PLAIN, "kracauer's own packets are whole, with full checksums"
        raw = raw[10:]
        version = raw[0] >> 4
        ip_len = 20 if version == 4 else 40
        assert not flags & ~(F_NEEDS_CSUM | F_DATA_VALID), f"vnet flags {flags:#x}"
        assert gso_type & ~GSO_ECN in (GSO_NONE, GSO_TCPV4 if version == 4 else GSO_TCPV6), f"gso_type {gso_type:#x}"
        if gso_type & ~GSO_ECN != GSO_NONE and came_in is not None and came_in[2] > 0:
            if gso_size == 0 and version == 4:
                known_bug("tiny_client_mss_gso")
            assert 0 < gso_size <= came_in[2], f"gso_size {gso_size} (came with {came_in[2]})"
        if flags & F_NEEDS_CSUM:
            assert (csum_start, csum_offset) == (ip_len, 16) and hdr_len >= ip_len + 20, "vnet offsets"
            at = csum_start + csum_offset
            raw = raw[:at] + finish(ones_sum(raw[csum_start:])).to_bytes(2, "big") + raw[at + 2:]
            partial = True
    owed = not translated or (came_in[1] if partial else came_in[0])
    version = raw[0] >> 4
    if version == 4:
        assert len(raw) >= 20 and raw[0] == 0x45, "IPv4 header"
        assert int.from_bytes(raw[2:4], "big") == len(raw) <= 0xFFFF, "IPv4 total length"
        assert is_valid(raw[:20]), "IPv4 header checksum"
        assert raw[12:16] in LISTEN_ADDRESSES, f"IPv4 packet from {ipaddress.IPv4Address(raw[12:16])}"
        assert int.from_bytes(raw[6:8], "big") & 0x3FFF == 0, "kracauer sends no fragments"
        body, proto = raw[20:], raw[9]
        if proto == 6:
            assert len(body) >= 20 and 20 <= (body[12] >> 4) * 4 <= len(body), "TCP header"
            if owed:
                assert is_valid(body, ones_sum(raw[12:20]) + 6 + len(body)), "TCP checksum (IPv4)"
        else:
            assert proto == 1 and not translated, f"IPv4 protocol {proto}"
            assert len(body) >= 8 and body[0] in (0, 3, 11) and is_valid(body), "ICMP message"
    else:
        assert version == 6 and len(raw) >= 40, "IP version"
        assert int.from_bytes(raw[4:6], "big") == len(raw) - 40, "IPv6 payload length"
        assert raw[8:20] in PREFIXES, f"IPv6 packet from {ipaddress.IPv6Address(raw[8:24])}"
        assert raw[24:40] in HOSTS, f"IPv6 packet to {ipaddress.IPv6Address(raw[24:40])}: an open relay"
        body, next_header = raw[40:], raw[6]
        assert next_header in (6, 58), f"IPv6 next header {next_header}"
        if next_header == 58:
            assert not translated and len(body) >= 8 and body[0] in (1, 2, 3), "ICMPv6 message"
        else:
            assert len(body) >= 20 and 20 <= (body[12] >> 4) * 4 <= len(body), "TCP header"
        if owed or next_header == 58:
            assert is_valid(body, ones_sum(raw[8:40]) + next_header + len(body)), "TCP/ICMPv6 checksum"


class Box:
    """A tracker, its clock, and the checks after every packet and timer run."""

    def __init__(self, vnet: bool, seed: int = 1, **config) -> None:
        self.vnet = vnet
        self.now = 1000.0
        rng = random.Random(seed)
        self.tracker = Tracker(TrackerConfig(prefix=PREFIX, vnet=vnet, **config), LISTENERS, resolve,
                               lambda: rng.getrandbits(32))

    def receive(self, frame: bytes) -> list[bytes]:
        tracker = self.tracker
        drops, absorbed = sum(tracker.drops.values()), sum(tracker.absorbed.values())
        ip = frame[10:] if self.vnet else frame
        gso_size = VNET_HEADER.unpack_from(frame)[3] if self.vnet and len(frame) >= 10 else 0
        came_in = (*transport_ok(ip), gso_size)
        buf = bytearray(HEADROOM + len(frame))
        buf[HEADROOM:] = frame
        try:
            outs = tracker.receive_frame(buf, HEADROOM, len(buf), self.now)
        except struct.error as exc:
            functions = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
            for name, function in KNOWN_BUGS.items():
                if function in functions:
                    known_bug(name)
            raise
        assert outs or sum(tracker.drops.values()) > drops or sum(tracker.absorbed.values()) > absorbed, \
            "a packet neither answered, dropped nor absorbed"
        result = []
        for out in outs:
            raw = bytes(out)
            check_output(raw, self.vnet, isinstance(out, memoryview), came_in)
            result.append(raw)
        self.check_tables()
        return result

    def tick(self, seconds: float) -> list[bytes]:
        self.now += seconds
        out = [bytes(packet) for packet in self.tracker.on_timer(self.now)]
        # Everything due has run: the next timer, if any, lies ahead.
        at = self.tracker.next_timer()
        assert at is None or at > self.now, f"timer at {at} still due at {self.now}"
        for raw in out:
            check_output(raw, self.vnet, False)
        self.check_tables()
        return out

    def check_tables(self) -> None:
        tracker = self.tracker
        assert 0 <= tracker.half_open <= len(tracker.peeking), f"half_open {tracker.half_open}"
        assert all(tracker.clients.get(key) is conn for key, conn in tracker.peeking.items()), "peeking not a client"
        live = {id(conn) for conn in tracker.clients.values()}
        assert all(id(conn) in live for conn in tracker.hosts.values()), "a host entry outlived its connection"

    def far_future(self) -> None:
        # A refusal is retransmitted REFUSAL_TRIES times however late (xfail test in tests/test_fuzz.py).
        for _ in range(REFUSAL_TRIES + 1):
            self.tick(1e7)
        tracker = self.tracker
        assert not tracker.clients and not tracker.hosts and not tracker.peeking, (
            f"left after the far future: {len(tracker.clients)} clients, {len(tracker.hosts)} hosts, "
            f"{len(tracker.peeking)} peeking")
        assert tracker.half_open == 0, f"half_open {tracker.half_open} after the far future"


def run_without_atheris(test_one_input, argv: list[str], seconds: float = 10.0) -> None:
    """Replay the input files named in argv; with none, feed random inputs for a few seconds."""
    import time

    paths = [arg for arg in argv[1:] if not arg.startswith("-")]
    if paths:
        for path in paths:
            files = sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else [path]
            for name in files:
                test_one_input(pathlib.Path(name).read_bytes())
        print(f"replayed {len(paths)} path(s) without atheris: no failure")
        return
    print("atheris is not installed (pip install atheris): feeding random inputs instead, without coverage")
    rng = random.Random(0)
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        test_one_input(rng.randbytes(rng.randrange(1, 600)))
        runs += 1
    print(f"{runs} random inputs: no failure")
