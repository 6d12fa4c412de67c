#!/usr/bin/env python3
"""libFuzzer target (atheris) for the connection tracker, plain and with virtio_net_hdr frames.

    .venv/bin/python fuzz/atheris_tracker.py -max_total_time=60 [corpus_dir]

Each input is a small script. Its first byte sets the box up (vnet or not, SYN
cookies from the first SYN, tiny caps on peeking and connections); the rest is
a list of steps, each one of:

- the next step of a real connection (SYN, ACK, hello pieces, host SYN-ACK,
  host ACK, FINs), so that the fuzzer reaches every state cheaply;
- a client or host TCP segment whose every field comes from the input, with
  sequence numbers near the ones the connection uses and a right checksum
  (or not);
- an ICMPv4 or ICMPv6 error quoting one of the connection's packets, an echo
  request, raw bytes;
- a bit flip or a truncation of the previous frame, sent again;
- time passing (timers run).

After every step the checks of common.py run; at the end the far future
comes and the tables must be empty. Without atheris, the inputs named on the
command line are replayed (or random ones are fed for a while).
"""

from __future__ import annotations

import dataclasses
import sys

try:
    import atheris
except ImportError:  # the target still imports and replays inputs without it
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["netstack"]):
        import netstack.tracker  # noqa: F401  (instrumented for coverage before common imports it)

import common as c  # noqa: E402  (after the instrumented import)
from netstack.vnet import (  # noqa: E402
    F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP, PLAIN, VNET_HEADER,
)

LINUX_SYN = bytes.fromhex("020405b4" "0402" "080a0000006400000000" "01" "030307")
# MSS 1380, SACK-permitted, timestamps (5000, 100), window scale 9.
LINUX_SYN_ACK = bytes.fromhex("02040564" "0402" "080a0000138800000065" "01" "030309")
HELLOS = {"tls": [c.CAPTURES["chrome_pq_curl_cffi"], c.CAPTURES["firefox_pq_curl_cffi"],
                  c.CAPTURES["openssl_s_client_tls13"]],
          "http": c.HTTP_REQUESTS, "tcp": [b""]}
FLAGS = [0x02, 0x10, 0x18, 0x11, 0x04, 0x14, 0x12, 0x01, 0x00, 0x39, 0x06]
OPTION_PIECES = [b"\x01", b"\x00", b"\x02\x04\x00\x00", b"\x02\x04\x05\xb4", b"\x03\x03\x07", b"\x03\x03\x0e",
                 b"\x04\x02", b"\x08\x0a", b"\x05\x0a", b"\x05\x12", b"\x05\x02", b"\x02", b"\xfe\x04"]


def swapped_resolve(listener, decision):
    """Other routes after a reload: www to the org host, org to both www hosts."""
    target = c.resolve(listener, decision)
    if target is None or target.route == "ssh":
        return target
    if target.route == "www":
        return c.Target(c.HOST_ORG, target.port, "www")
    return c.Target(c.HOST_WWW2, target.port, "org", hosts=(c.HOST_WWW2, c.HOST_WWW))


class Script:
    """One connection driven step by step, and the hostile packets around it."""

    def __init__(self, data: c.Provider) -> None:
        self.p = data
        setup = data.int(0, 255)
        self.vnet = bool(setup & 1)
        config = {}
        if setup & 2:
            config["syn_backlog"] = 0
        if setup & 4:
            config["max_peeking"] = 1
        if setup & 8:
            config["max_connections"] = 2
        self.box = c.Box(self.vnet, seed=setup, **config)
        self.listener = c.LISTENERS[data.int(0, len(c.LISTENERS) - 1)]
        hellos = HELLOS[self.listener.protocol]
        self.hello = hellos[data.int(0, len(hellos) - 1)]
        self.sport = data.pick([40000, 1024, 65535])
        self.c = data.int(0, c.M32)
        self.h = data.int(0, c.M32)
        self.k = 0
        self.tsval = None
        self.stage = 0
        self.sent = 0  # hello bytes sent
        self.host = None  # (address, port, source port) learned from the host SYN
        self.src6 = (self.listener.prefix or c.PREFIX) + c.CLIENT
        self.last = b""

    # ---- frames

    def vnet_header(self, packet: bytearray) -> bytes:
        kind = self.p.int(0, 7)
        if kind <= 3:
            return PLAIN
        if kind == 4:
            return VNET_HEADER.pack(F_DATA_VALID, 0, 0, 0, 0, 0)
        if kind == 7:
            return self.p.bytes(10).ljust(10, b"\0")
        c.make_partial(packet)
        gso = self.p.pick([GSO_TCPV4, GSO_TCPV6, GSO_TCPV4 | GSO_ECN, GSO_UDP]) if kind == 6 else 0
        ip_len = 40 if packet and packet[0] >> 4 == 6 else 20
        return VNET_HEADER.pack(F_NEEDS_CSUM, gso, ip_len + 32, self.p.pick([1, 536, 1448, 9000]), ip_len, 16)

    def send(self, packet: bytes) -> list[bytes]:
        frame = bytearray(packet)
        header = self.vnet_header(frame) if self.vnet else b""
        self.last = header + bytes(frame)
        outs = self.box.receive(self.last)
        self.learn(outs)
        return outs

    def learn(self, outs: list[bytes]) -> None:
        for raw in outs:
            ip = raw[10:] if self.vnet else raw
            if ip[0] >> 4 == 4 and ip[9] == 6 and ip[33] & 0x12 == 0x12:  # SYN-ACK to the client
                self.k = int.from_bytes(ip[24:28], "big")
                options = ip[40:20 + (ip[32] >> 4) * 4]
                at = options.find(b"\x08\x0a")
                self.tsval = int.from_bytes(options[at + 2:at + 6], "big") if at >= 0 else None
            elif ip[0] >> 4 == 6 and ip[6] == 6 and ip[53] & 0x17 == 0x02:  # SYN to a host
                self.host = (ip[24:40], int.from_bytes(ip[42:44], "big"), int.from_bytes(ip[40:42], "big"))

    def client(self, flags: int, seq: int, ack: int, payload: bytes = b"", options: bytes = b"", **ip) -> bytes:
        src, dst = ip.pop("src", c.CLIENT), ip.pop("dst", self.listener.address)
        segment = c.tcp_segment(src, dst, ip.pop("sport", self.sport), ip.pop("dport", self.listener.port), seq, ack,
                                flags, ip.pop("window", 502), options, payload, ip.pop("data_offset", None))
        return c.ipv4_packet(src, dst, 6, segment, **ip)

    def from_host(self, flags: int, seq: int, ack: int, payload: bytes = b"", options: bytes = b"", **ip) -> bytes:
        host, port, sport = self.host or (c.HOST_WWW, 443, self.sport)
        src, dst = ip.pop("src", host), ip.pop("dst", self.src6)
        segment = c.tcp_segment(src, dst, port, ip.pop("dport", sport), seq, ack, flags, ip.pop("window", 300),
                                options, payload, ip.pop("data_offset", None))
        return c.ipv6_packet(src, dst, 6, segment, **ip)

    def stamp(self) -> bytes:
        return b"\x01\x01\x08\x0a" + (101).to_bytes(4, "big") + (self.tsval or 0).to_bytes(4, "big") \
            if self.tsval is not None else b""

    # ---- the steps

    def next_step(self) -> None:
        """The connection's next packet, as a well-behaved client and host send it."""
        stage = self.stage
        self.stage += 1
        end = self.c + 1 + len(self.hello)
        if stage == 0:
            # Linux's, none, tiny MSS (0, 12) with Linux's others, or raw bytes.
            options = self.p.pick([LINUX_SYN, b"", b"\x02\x04\x00\x00" + LINUX_SYN[4:],
                                   b"\x02\x04\x00\x0c" + LINUX_SYN[4:], self.p.bytes(self.p.int(0, 16))])
            self.send(self.client(0x02, self.c, 0, options=options, window=64240))
        elif stage == 1:
            self.send(self.client(0x10, self.c + 1, self.k + 1, options=self.stamp()))
        elif self.sent < len(self.hello):
            size = self.p.int(1, len(self.hello) - self.sent)
            self.send(self.client(0x18, self.c + 1 + self.sent, self.k + 1, self.hello[self.sent:self.sent + size],
                                  self.stamp()))
            self.sent += size
        elif stage < 40 and self.host is not None and self.p.int(0, 3) == 0:
            host_options = self.p.pick([LINUX_SYN_ACK, b"", self.p.bytes(self.p.int(0, 20))])
            self.send(self.from_host(0x12, self.h, self.c + 1, options=host_options, window=65535))
        else:
            self.send(self.p.pick([
                lambda: self.from_host(0x10, self.h + 1, end),
                lambda: self.client(0x11, end, self.k + 1, options=self.stamp()),
                lambda: self.from_host(0x11, self.h + 1, end + 1),
                lambda: self.client(0x10, end + 1, self.k + 2, options=self.stamp()),
                lambda: self.from_host(0x18, self.h + 1, end, self.p.bytes(self.p.int(0, 1500))),
            ])())

    def number(self) -> int:
        n = len(self.hello)
        base = self.p.pick([self.c, self.c + 1, self.c + 1 + n, self.k, self.k + 1, self.h, self.h + 1,
                            self.p.int(0, c.M32)])
        return (base + self.p.pick([0, 0, 1, -1, self.p.int(-70000, 70000), 0x80000000])) & c.M32

    def options(self) -> bytes:
        return b"".join(self.p.pick(OPTION_PIECES) + self.p.bytes(self.p.int(0, 4)) for _ in range(self.p.int(0, 4)))

    def payload(self) -> bytes:
        return self.p.pick([b"", self.hello[:200], self.hello, bytes(self.p.int(0, 3000))]) or \
            self.p.bytes(self.p.int(0, 64))

    def hostile(self) -> None:
        kind = self.p.int(0, 7)
        flags = self.p.pick(FLAGS + [self.p.int(0, 255)])
        if kind in (0, 1):
            self.send(self.client(
                flags, self.number(), self.number(), self.payload(), self.options(),
                src=self.p.pick([c.CLIENT, c.OTHER_CLIENT]), dst=self.p.pick([self.listener.address, c.SERVICE2,
                                                                             c.NOT_SERVICE]),
                sport=self.p.pick([self.sport, self.sport, 1]), dport=self.p.pick([self.listener.port, 443, 80, 22]),
                window=self.p.int(0, 0xFFFF), ttl=self.p.pick([64, 1, 0]), tos=self.p.int(0, 255),
                flags_offset=self.p.pick([0, 0x4000, 0x2000, 0x0001]),
                data_offset=self.p.pick([None, None, None, self.p.int(0, 15)]),
                total=self.p.pick([None, None, None, self.p.int(0, 0xFFFF)]), ihl=self.p.pick([5, 5, 5, 6, 4])))
        elif kind in (2, 3):
            host = self.host[0] if self.host else c.HOST_WWW
            self.send(self.from_host(
                flags, self.number(), self.number(), self.payload(), self.options(),
                src=self.p.pick([host, host, c.STRANGER6, c.HOST_WWW2]),
                dst=self.p.pick([self.src6, self.src6, c.PREFIX + bytes(4), c.PREFIX2 + c.CLIENT]),
                window=self.p.int(0, 0xFFFF), hop_limit=self.p.pick([64, 1, 0]), tc=self.p.int(0, 255),
                data_offset=self.p.pick([None, None, None, self.p.int(0, 15)]),
                payload_len=self.p.pick([None, None, None, self.p.int(0, 0xFFFF)])))
        elif kind == 4:
            # An ICMPv4 error about a packet kracauer sent the client (RFC 792 quoting, cut anywhere).
            inner = self.client(flags, self.number(), self.number(), self.payload(), self.options(),
                                src=self.listener.address, dst=c.CLIENT, sport=self.listener.port, dport=self.sport,
                                total=self.p.pick([None, self.p.int(0, 0xFFFF)]))
            inner = inner[:self.p.pick([20, 27, 28, 40, 48, 576, 3000])]
            type_, code = self.p.pick([(3, 4), (3, 0), (3, 3), (3, 13), (11, 0), (12, 0), (3, 2), (5, 0)])
            message = c.icmp4_message(type_, code, self.p.bytes(4), inner)
            self.send(c.ipv4_packet(self.p.pick([c.ROUTER4, c.CLIENT]), self.listener.address, 1, message))
        elif kind == 5:
            # An ICMPv6 error about a packet kracauer sent a host (RFC 4443 quoting, cut anywhere).
            host, port, sport = self.host or (c.HOST_WWW, 443, self.sport)
            segment = c.tcp_segment(self.src6, host, sport, port, self.number(), self.number(), flags, 300,
                                    self.options(), self.payload())
            inner = c.ipv6_packet(self.src6, host, 6, segment,
                                  payload_len=self.p.pick([None, self.p.int(0, 0xFFFF)]))
            inner = inner[:self.p.pick([40, 47, 48, 60, 1232, 3000])]
            type_, code = self.p.pick([(2, 0), (1, 0), (1, 4), (3, 0), (4, 1), (4, 0), (128, 0)])
            source = self.p.pick([c.ROUTER6, host])
            message = c.icmp6_message(source, self.src6, type_, code, self.p.bytes(4), inner)
            self.send(c.ipv6_packet(source, self.src6, 58, message))
        elif kind == 6:
            echo = c.icmp4_message(self.p.pick([8, 8, 0, 13]), 0, b"\0\x07\0\x01", self.p.bytes(self.p.int(0, 100)))
            self.send(c.ipv4_packet(self.p.pick([c.CLIENT, c.OTHER_CLIENT]),
                                    self.p.pick([c.SERVICE, c.NOT_SERVICE]), 1, echo))
        else:
            self.box.receive(self.p.bytes(self.p.int(0, 200)))

    def mutate_last(self) -> None:
        if not self.last:
            return
        frame = bytearray(self.last)
        if self.p.bool():
            del frame[self.p.int(0, len(frame)):]
        else:
            for _ in range(self.p.int(1, 3)):
                frame[self.p.int(0, len(frame) - 1)] ^= 1 << self.p.int(0, 7)
        self.box.receive(bytes(frame))

    def reconfigure(self) -> None:
        """SIGHUP: new caps and routes for new connections; bound ones keep their host."""
        tracker = self.box.tracker
        config = dataclasses.replace(tracker.config, max_connections=self.p.pick([100, 1, 0]),
                                     max_peeking=self.p.pick([100, 1]), syn_backlog=self.p.pick([100, 0]))
        tracker.reconfigure(config, self.p.pick([c.resolve, swapped_resolve, lambda listener, decision: None]))
        self.box.check_tables()

    def run(self) -> None:
        for _ in range(40):
            if self.p.remaining() <= 0:
                break
            op = self.p.int(0, 15)
            if op < 6:
                self.next_step()
            elif op < 12:
                self.hostile()
            elif op < 14:
                self.mutate_last()
            elif op == 14:
                self.box.tick(self.p.pick([0.001, 0.5, 1.5, 3.5, 11.0, 7500.0]))
            else:
                self.reconfigure()
        self.box.far_future()


def TestOneInput(data: bytes) -> None:
    try:
        Script(c.Provider(data)).run()
    except c.KnownBug:
        pass


def main() -> None:
    if atheris is None:
        c.run_without_atheris(TestOneInput, sys.argv)
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
