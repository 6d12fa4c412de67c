#!/usr/bin/env python3
"""What reading a QUIC client's Initials costs on the packet loop (netstack.quic).

Each case is timed over the real first flights in tests/data/quic, from the
datagram to the answer, with a new InitialReader per flow (so the Initial key
derivation is included where it says so):

    derive_keys        derive_initial_keys: HKDF, then the AES-GCM and AES-ECB objects
    aioquic_1_datagram a new reader, aioquic's one 1200-byte Initial -> Decision
    chromium_first     a new reader, Chromium's first 1250-byte datagram -> NEED_DATA
    chromium_flow      a new reader, both of Chromium's datagrams -> Decision
    drop_not_quic      a datagram that is no long header -> Dropped (no crypto)
    drop_undecryptable a corrupt Initial -> Dropped after key derivation and a failed AEAD
    refusal            build_connection_close with the flow's cached keys

Usage: ``scripts/bench_quic.py [--rounds 5] [--number 2000]``. No root, no
network. It prints the best and the median per call, in microseconds; the
figures depend on the machine and how busy it is (netstack/quic.py's
docstring quotes one run).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import timeit

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netstack.quic import InitialReader, build_connection_close, derive_initial_keys, parse_long_header  # noqa: E402

DATA = ROOT / "tests" / "data" / "quic"


def flight(name: str) -> list[bytes]:
    return [bytes.fromhex(d) for d in json.loads((DATA / f"{name}.json").read_text())["datagrams"]]


def cases() -> dict:
    aioquic = flight("aioquic")[0]
    chromium = flight("chromium")
    corrupt = bytearray(aioquic)
    corrupt[300] ^= 1
    corrupt = bytes(corrupt)
    dcid = parse_long_header(aioquic).dcid
    reader = InitialReader()
    reader.feed(aioquic)
    keys = reader.keys

    def chromium_flow() -> None:
        r = InitialReader()
        r.feed(chromium[0])
        r.feed(chromium[1])

    return {
        "derive_keys": lambda: derive_initial_keys(dcid, 1),
        "aioquic_1_datagram": lambda: InitialReader().feed(aioquic),
        "chromium_first": lambda: InitialReader().feed(chromium[0]),
        "chromium_flow": chromium_flow,
        "drop_not_quic": lambda: InitialReader().feed(b"\x40" + bytes(1199)),
        "drop_undecryptable": lambda: InitialReader().feed(corrupt),
        "refusal": lambda: build_connection_close(keys, reader.scid, b"\x01" * 8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.number} calls")
    for name, call in cases().items():
        times = [t / args.number * 1e6 for t in timeit.repeat(call, number=args.number, repeat=args.rounds)]
        print(f"{name:20s} best {min(times):7.1f} µs   median {statistics.median(times):7.1f} µs")


if __name__ == "__main__":
    main()
