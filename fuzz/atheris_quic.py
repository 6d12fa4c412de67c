#!/usr/bin/env python3
"""libFuzzer target (atheris) for netstack.quic: the client Initial reader and the header helpers.

    .venv/bin/python fuzz/atheris_quic.py -max_total_time=60 [corpus_dir]

The first byte of an input picks the mode; the rest is its input:

- 0: the rest is one datagram, fed to a fresh InitialReader;
- 1: the rest is cut into up to 6 datagrams the input sizes, fed to one reader
  with small caps;
- 2: edits (as in atheris_peekers.py) to real first flights from
  tests/data/quic (aioquic, Chromium) and the RFC 9001 / RFC 9369 sample
  Initials, fed with the untouched datagrams of the same flight in an order
  the input picks; the fuzzer starts past the AEAD, deep in the frames;
- 3: the rest, as a decrypted Initial payload, to parse_initial_frames;
- 4: the rest to long_header_cids and short_header_dcid.

Checked: only the documented answers (NEED_DATA, Decision, NotProtocol,
Dropped with a known reason; QuicViolation from parse_initial_frames), the
caps hold, and an answer once given stays.
"""

from __future__ import annotations

import json
import pathlib
import sys

try:
    import atheris
except ImportError:  # the target still imports and replays inputs without it
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["netstack"]):
        import netstack.quic  # noqa: F401

import common as c  # noqa: E402
from netstack.peek import NEED_DATA, Decision, NotProtocol  # noqa: E402
from netstack.quic import (  # noqa: E402
    BAD_HEADER, NOT_INITIAL, NOT_QUIC, OTHER_CONNECTION, TOO_SMALL, UNDECRYPTABLE, UNSUPPORTED_VERSION, Dropped,
    InitialReader, QuicViolation, long_header_cids, parse_initial_frames, short_header_dcid,
)

QUIC_DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "quic"
REASONS = {NOT_QUIC, NOT_INITIAL, UNSUPPORTED_VERSION, TOO_SMALL, BAD_HEADER, UNDECRYPTABLE, OTHER_CONNECTION}


def _flights() -> list[list[bytes]]:
    flights = []
    for path in sorted(QUIC_DATA.glob("*.json")):
        entry = json.loads(path.read_text())
        if path.stem == "rfc_vectors":
            flights += [[bytes.fromhex(entry[v]["client_packet"])] for v in ("v1", "v2")]
        else:
            flights.append([bytes.fromhex(d) for d in entry["datagrams"]])
    return flights


FLIGHTS = _flights()


def check(reader: InitialReader, result, previous) -> None:
    assert result is NEED_DATA or isinstance(result, (Decision, NotProtocol, Dropped)), result
    if isinstance(result, Dropped):
        assert result.reason in REASONS, result
    if isinstance(previous, (Decision, NotProtocol)):
        assert result is previous, "an answer changed"
    assert reader.bytes_held <= reader.max_bytes and reader.datagrams <= reader.max_datagrams


def feed(reader: InitialReader, datagrams: list[bytes]) -> None:
    previous = None
    for datagram in datagrams:
        result = reader.feed(datagram)
        check(reader, result, previous)
        if not isinstance(result, Dropped):
            previous = result


def mutated(p: c.Provider, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(p.int(1, 6)):
        kind, at = p.int(0, 3), p.int(0, max(len(data) - 1, 0))
        if kind == 0 and data:
            data[at] ^= p.int(1, 255)
        elif kind == 1 and data:
            data[at] = p.pick([0, 1, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFF])
        elif kind == 2:
            del data[at:at + p.int(1, 64)]
        else:
            data[at:at] = p.bytes(p.int(1, 8))
    return bytes(data)


def TestOneInput(data: bytes) -> None:
    p = c.Provider(data)
    mode = p.int(0, 4)
    if mode == 0:
        feed(InitialReader(), [p.bytes(p.remaining())])
    elif mode == 1:
        datagrams = [p.bytes(p.int(0, 1500)) for _ in range(p.int(1, 6))]
        feed(InitialReader(max_bytes=p.pick([16384, 3000, 1200]), max_datagrams=p.int(1, 4)), datagrams)
    elif mode == 2:
        flight = list(p.pick(FLIGHTS))
        at = p.int(0, len(flight) - 1)
        flight[at] = mutated(p, flight[at])
        order = [flight[p.int(0, len(flight) - 1)] for _ in range(p.int(1, 4))] + flight
        feed(InitialReader(max_bytes=p.pick([16384, 2500]), max_datagrams=p.int(2, 8)), order)
    elif mode == 3:
        try:
            parse_initial_frames(p.bytes(p.remaining()))
        except QuicViolation:
            pass
    else:
        datagram = p.bytes(p.remaining())
        cids = long_header_cids(datagram)
        assert cids is None or (len(cids[1]) <= 255 and len(cids[2]) <= 255)
        dcid = short_header_dcid(datagram, 8)
        assert dcid is None or len(dcid) == 8


def main() -> None:
    if atheris is None:
        c.run_without_atheris(TestOneInput, sys.argv)
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
