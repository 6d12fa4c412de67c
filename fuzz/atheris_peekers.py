#!/usr/bin/env python3
"""libFuzzer target (atheris) for the peekers and every parser in netstack/.

    .venv/bin/python fuzz/atheris_peekers.py -max_total_time=60 [corpus_dir]

The first byte of an input picks what to fuzz; the rest is its input (or, for
the "mutated" modes, edits applied to a real ClientHello or HTTP request, so
the fuzzer starts deep inside the parsers instead of at their first check):

- TlsPeeker and HttpPeeker: arbitrary or mutated streams, cut into pieces
  the input chooses; never an exception, the same answer however the stream
  is cut, and an answer once given stays;
- parse_client_hello: only BufferReadError or ClientHelloError;
- IPv4Header, IPv6Header, TcpHeader (options, timestamps()), IcmpHeader and
  the ICMP type maps, the virtio_net_hdr and gso_type_for: only PacketError or
  VnetError, and every offset they report lies inside the bytes;
- Buffer: only BufferReadError; StreamBuffer.add against a per-byte model;
- SynCookies.check and decode_options on any cookie and echo.
"""

from __future__ import annotations

import sys

try:
    import atheris
except ImportError:  # the target still imports and replays inputs without it
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["netstack"]):
        import netstack.tracker  # noqa: F401  (imports every parser, instrumented)

import common as c  # noqa: E402
from netstack.buffer import Buffer, BufferReadError  # noqa: E402
from netstack.http import HttpPeeker  # noqa: E402
from netstack.icmp import IcmpHeader, icmp4_to_icmp6, icmp6_to_icmp4  # noqa: E402
from netstack.ip import IPv4Header, IPv6Header, PacketError  # noqa: E402
from netstack.peek import NEED_DATA, BadRequest, Decision, NotProtocol  # noqa: E402
from netstack.reassembly import StreamBuffer  # noqa: E402
from netstack.syncookie import MSS_TABLE, SynCookies, decode_options, encode_options  # noqa: E402
from netstack.tcp import MAX_WSCALE, TcpHeader  # noqa: E402
from netstack.tls import ClientHelloError, TlsPeeker, parse_client_hello  # noqa: E402
from netstack.vnet import GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET_HEADER, VnetError, gso_type_for  # noqa: E402

HELLOS = list(c.CAPTURES.values())
COOKIES = SynCookies(bytes(range(16)))


def mutated(p: c.Provider, seeds: list[bytes]) -> bytes:
    """A seed with up to 8 edits: a byte xored, set, a run deleted, bytes inserted."""
    data = bytearray(p.pick(seeds))
    for _ in range(p.int(0, 8)):
        kind, at = p.int(0, 3), p.int(0, max(len(data) - 1, 0))
        if kind == 0 and data:
            data[at] ^= p.int(1, 255)
        elif kind == 1 and data:
            data[at] = p.pick([0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x0A, 0x3A])
        elif kind == 2:
            del data[at:at + p.int(1, 64)]
        else:
            data[at:at] = p.bytes(p.int(1, 8))
    return bytes(data)


def same(a, b) -> bool:
    if isinstance(a, NotProtocol) or isinstance(b, NotProtocol):
        return type(a) is type(b)
    return a == b


def fuzz_peeker(p: c.Provider, peeker_class, stream: bytes) -> None:
    max_bytes = p.pick([16384, 600, 64, 5])
    cuts = sorted({0, len(stream), *(p.int(0, len(stream)) for _ in range(p.int(0, 8)))})
    whole = peeker_class(max_bytes).feed(stream)
    assert whole is NEED_DATA or isinstance(whole, (Decision, BadRequest, NotProtocol)), whole
    peeker = peeker_class(max_bytes)
    answer = peeker.feed(b"")
    for low, high in zip(cuts, cuts[1:]):
        answer = peeker.feed(memoryview(stream)[low:high])
    assert same(answer, whole), f"{answer!r} in pieces, {whole!r} whole"
    if isinstance(whole, (Decision, BadRequest)):
        assert 0 < whole.hello_size <= min(len(stream), max_bytes), whole
    if answer is not NEED_DATA:
        assert peeker.feed(p.bytes(p.int(0, 20))) is answer, "an answer changed"


def fuzz_tcp(data: bytes) -> None:
    try:
        tcp = TcpHeader(memoryview(data))
    except PacketError:
        return
    assert 20 <= tcp.header_len <= len(data)
    assert tcp.mss is None or 0 <= tcp.mss <= 0xFFFF
    assert tcp.wscale is None or 0 <= tcp.wscale <= MAX_WSCALE
    if tcp.ts_at >= 0:
        assert 20 < tcp.ts_at and tcp.ts_at + 8 <= tcp.header_len
        assert tcp.timestamps(data) is not None
    else:
        assert tcp.timestamps(data) is None
    if tcp.sack_at >= 0:
        assert 20 < tcp.sack_at and tcp.sack_at + 8 * tcp.sack_blocks <= tcp.header_len


def fuzz_ip(data: bytes) -> None:
    try:
        ip = IPv4Header(data)
        assert 20 <= ip.header_len <= ip.total_len <= len(data)
        ip.is_fragment
    except PacketError:
        pass
    try:
        ip6 = IPv6Header(data)
        assert 40 + ip6.payload_len <= len(data)
    except PacketError:
        pass


def fuzz_icmp(p: c.Provider) -> None:
    data = p.bytes(p.int(0, 40))
    try:
        IcmpHeader(data)
    except PacketError:
        assert len(data) < 8
    type_, code, rest = p.int(0, 255), p.int(0, 255), p.bytes(4).ljust(4, b"\0")
    for mapped in (icmp4_to_icmp6(type_, code, rest, p.int(0, 0xFFFF)), icmp6_to_icmp4(type_, code, rest)):
        if mapped is not None:
            assert 0 <= mapped[0] <= 255 and 0 <= mapped[1] <= 255 and len(mapped[2]) == 4, mapped


def fuzz_vnet(p: c.Provider) -> None:
    header = p.bytes(10).ljust(10, b"\0")
    gso_type = VNET_HEADER.unpack_from(header)[1]
    version = p.pick([4, 6])
    try:
        out = gso_type_for(version, gso_type)
    except VnetError:
        assert gso_type & ~GSO_ECN not in (GSO_NONE, GSO_TCPV4, GSO_TCPV6)
        return
    assert out & ~GSO_ECN in (GSO_NONE, GSO_TCPV4 if version == 4 else GSO_TCPV6)


def fuzz_stream_buffer(p: c.Provider) -> None:
    capacity = p.int(0, 64)
    buffer = StreamBuffer(capacity)
    model: dict[int, int] = {}
    for _ in range(p.int(0, 16)):
        offset = p.int(-80, 100)
        payload = p.bytes(p.int(0, 40))
        kept = buffer.add(offset, payload)
        expected = [i for i in range(offset, offset + len(payload)) if 0 <= i < capacity]
        assert kept == len(expected), (kept, expected)
        for i in expected:
            model[i] = payload[i - offset]
        assert {i for low, high in buffer.ranges for i in range(low, high)} == set(model)
        assert all(high < low for (_, high), (low, _) in zip(buffer.ranges, buffer.ranges[1:]))
        assert all(buffer.data[i] == byte for i, byte in model.items())
        contiguous = 0
        while contiguous in model:
            contiguous += 1
        assert buffer.contiguous == contiguous


def fuzz_buffer(p: c.Provider) -> None:
    buf = Buffer(p.bytes(p.int(0, 40)))
    try:
        for _ in range(p.int(0, 12)):
            kind, n = p.int(0, 5), p.int(0, 40)
            if kind == 0:
                buf.pull_uint8()
            elif kind == 1:
                buf.pull_uint16()
            elif kind == 2:
                buf.pull_uint24()
            elif kind == 3:
                buf.pull_uint32()
            elif kind == 4:
                buf.pull_bytes(n)
            else:
                with buf.pull_block(p.int(1, 3)) as length:
                    buf.pull_bytes(min(length, n))
    except BufferReadError:
        pass


def fuzz_cookies(p: c.Provider) -> None:
    now = p.int(0, 10**9) / p.int(1, 1000)
    checked = COOKIES.check(now, p.int(0, c.M32), p.bytes(4).ljust(4, b"\0"), p.bytes(4).ljust(4, b"\0"),
                            p.int(0, 0xFFFF), p.int(0, 0xFFFF), p.int(0, c.M32))
    assert checked is None or (checked[0] in MSS_TABLE and 0 <= checked[1] <= c.M32)
    wscale, sack = decode_options(p.int(0, c.M32))
    assert wscale is None or 0 <= wscale <= MAX_WSCALE, wscale
    wscale = p.pick([None, p.int(0, MAX_WSCALE)])
    sack = p.bool()
    assert decode_options(encode_options(p.int(0, c.M32), wscale, sack)) == (wscale, sack)


def TestOneInput(data: bytes) -> None:
    p = c.Provider(data)
    mode = p.int(0, 12)
    if mode == 0:
        fuzz_peeker(p, TlsPeeker, p.bytes(p.remaining()))
    elif mode == 1:
        fuzz_peeker(p, TlsPeeker, mutated(p, HELLOS))
    elif mode == 2:
        fuzz_peeker(p, HttpPeeker, p.bytes(p.remaining()))
    elif mode == 3:
        fuzz_peeker(p, HttpPeeker, mutated(p, c.HTTP_REQUESTS))
    elif mode == 4:
        hello = mutated(p, HELLOS)
        try:
            parse_client_hello(hello[9:])  # past the record and handshake headers
        except (BufferReadError, ClientHelloError):
            pass
    elif mode == 5:
        fuzz_ip(p.bytes(p.remaining()))
    elif mode == 6:
        fuzz_tcp(p.bytes(p.remaining()))
    elif mode == 7:
        fuzz_icmp(p)
    elif mode == 8:
        fuzz_vnet(p)
    elif mode == 9:
        fuzz_stream_buffer(p)
    elif mode == 10:
        fuzz_buffer(p)
    elif mode == 11:
        fuzz_cookies(p)
    else:
        # Parsers in the order the tracker runs them, on one packet.
        packet = p.bytes(p.remaining())
        fuzz_ip(packet)
        if packet and packet[0] >> 4 == 4:
            fuzz_tcp(packet[(packet[0] & 15) * 4:])
        else:
            fuzz_tcp(packet[40:])


def main() -> None:
    if atheris is None:
        c.run_without_atheris(TestOneInput, sys.argv)
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
