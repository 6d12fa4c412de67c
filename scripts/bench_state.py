#!/usr/bin/env python3
"""How long the [state] file takes: 100 000 connections saved and loaded, end to end.

Save is what a stopping kracauer does (``snapshot`` of the tracker, then
``write_state``: encoding, a temporary file, fsync, rename); load is what the
next one does (``read_state``, then ``restore`` into a new tracker, tables,
flows and timers included). Each is timed from the tracker to the bytes on
disk and back to a working tracker.

The connections are copies of a few walked through a real tracker with
packets (an http listener, as ``scripts/bench.py``'s tracker test), each copy
with its own addresses, ports, sequence numbers, times and hello size:

    established  every connection established on the Python path (no kernel
                 path): the most a restart has to rebuild
    mixed        as with the kernel path on: 70% carried by the kernel
                 (parked), 28% established here, 1% waiting for their host,
                 1% still sending their request

Usage: ``scripts/bench_state.py [--connections 100000] [--mix established,mixed]
[--rounds 3] [--out results.json]``. Needs no root and no lab; the figures
depend on how busy the machine is, so it prints the best and the median of
the rounds with the machine's load. docs/benchmarks.md ("State file") has
the figures.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kracauer.daemon import read_state, write_state  # noqa: E402
from netstack.ip import PROTO_TCP, build_ipv4_header, build_ipv6_header  # noqa: E402
from netstack.peek import Decision  # noqa: E402
from netstack.reassembly import StreamBuffer  # noqa: E402
from netstack.state import restore, snapshot  # noqa: E402
from netstack.tcp import ACK, PSH, SYN, build_segment, syn_options, timestamp_option  # noqa: E402
from netstack.vnet import F_DATA_VALID, GSO_NONE, VNET_HEADER  # noqa: E402
from netstack.tracker import (  # noqa: E402
    CONNECTING, ESTABLISHED, PEEKING, Connection, Listener, Target, Tracker, TrackerConfig,
)

PREFIX = ipaddress.IPv6Address("64:ff9b:1::").packed[:12]
SERVICE = ipaddress.IPv4Address("192.0.2.10").packed
HOST = ipaddress.IPv6Address("2001:db8::10").packed
PORT = 80
# Frames with a virtio_net_hdr whose checksums are vouched for, as the daemon runs (offload on).
VNET = VNET_HEADER.pack(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0)
NAMES = ("www.example.com", "api.example.com", "static.example.com", "example.com")
MIXES = {
    "established": {ESTABLISHED: 1.0},
    "mixed": {"parked": 0.70, ESTABLISHED: 0.28, CONNECTING: 0.01, PEEKING: 0.01},
}


def new_tracker(max_connections: int) -> Tracker:
    rng = random.Random(7)
    listener = Listener(SERVICE, PORT, "http")
    targets = {name: Target(HOST, PORT, name) for name in NAMES}
    return Tracker(TrackerConfig(prefix=PREFIX, vnet=True, max_connections=max_connections), [listener],
                   lambda lst, d: targets.get(d.name), lambda: rng.getrandbits(32))


def walk_models(tracker: Tracker, now: float) -> dict[Any, Connection]:
    """One connection of each state, driven there by packets."""
    def v4(sport: int, seq: int, ack: int, flags: int, options: bytes = b"", payload: bytes = b"") -> bytes:
        seg = build_segment(sport, PORT, seq, ack, flags, 502, options, payload)
        return VNET + build_ipv4_header(client, SERVICE, PROTO_TCP, len(seg)) + seg

    def v6(sport: int, seq: int, ack: int, flags: int, options: bytes = b"", payload: bytes = b"") -> bytes:
        seg = build_segment(PORT, sport, seq, ack, flags, 509, options, payload)
        return VNET + build_ipv6_header(HOST, PREFIX + client, PROTO_TCP, len(seg)) + seg

    client = ipaddress.IPv4Address("198.51.100.2").packed
    request = b"GET / HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    models = {}
    for state, sport in ((PEEKING, 1000), (CONNECTING, 1001), (ESTABLISHED, 1002)):
        cisn, ts = 1_000_000 * sport, 5000
        out = tracker.receive(v4(sport, cisn, 0, SYN, syn_options(1460, 7, True, (ts, 0))), now)
        kisn = int.from_bytes(out[0][VNET_HEADER.size + 24:VNET_HEADER.size + 28], "big")
        tracker.receive(v4(sport, cisn + 1, kisn + 1, ACK, timestamp_option(ts, 1)), now)
        sent = request if state != PEEKING else request[:30]
        tracker.receive(v4(sport, cisn + 1, kisn + 1, ACK | PSH, timestamp_option(ts, 1), sent), now)
        if state == ESTABLISHED:
            hisn, end = 77_000_000, cisn + 1 + len(request)
            tracker.receive(v6(sport, hisn, cisn + 1, SYN | ACK, syn_options(1440, 7, True, (9000, ts))), now)
            tracker.receive(v6(sport, hisn + 1, end, ACK | PSH, timestamp_option(9001, ts), b"HTTP/1.1 200 OK\r\n"),
                            now)
            tracker.receive(v4(sport, end, kisn + 18, ACK, timestamp_option(ts + 1, 9001)), now)
        conn = tracker.clients[client + SERVICE + sport.to_bytes(2, "big") + PORT.to_bytes(2, "big")]
        if conn.state != state:
            raise SystemExit(f"bench_state: the model connection is in state {conn.state}, not {state}")
        models[state] = conn
    return models


def build(connections: int, mix: dict[Any, float], seed: int = 1) -> tuple[Tracker, float]:
    """A tracker holding `connections` connections in the proportions of `mix`, and its clock."""
    now = 100_000.0
    tracker = new_tracker(connections + 10)
    models = walk_models(tracker, now - 4000.0)
    tracker.clients.clear()
    tracker.hosts.clear()
    tracker.peeking.clear()
    tracker._timers.clear()
    tracker.half_open = 0
    rng = random.Random(seed)
    kinds = [kind for kind, share in mix.items() for _ in range(round(share * connections))]
    kinds = (kinds + [ESTABLISHED] * connections)[:connections]
    rng.shuffle(kinds)
    targets = {name: Target(HOST, PORT, name) for name in NAMES}
    for i, kind in enumerate(kinds):
        client = (0xC6336402 + i // 60000).to_bytes(4, "big")  # 198.51.100.2, .3, ...
        port = 1024 + i % 60000
        key = client + SERVICE + port.to_bytes(2, "big") + PORT.to_bytes(2, "big")
        name = rng.choice(NAMES)
        # Each connection has its own Decision, as peekers make them; the hello sizes differ.
        decision = Decision(name=name, hello_size=rng.randrange(60, 400))
        if kind == "parked":
            decision = tracker._decisions.setdefault(decision, decision)
            tracker.clients[key] = (decision, targets[name], HOST, 1, rng.uniform(0.0005, 0.02))
            tracker.in_kernel += 1
            continue
        tracker.clients[key] = copy_of(models[kind], tracker, client, port, key, decision, targets[name], now, rng)
    return tracker, now


def copy_of(model: Connection, tracker: Tracker, client: bytes, port: int, key: bytes, decision: Decision,
            target: Target, now: float, rng: random.Random) -> Connection:
    conn = Connection(model.listener, client, port, key)
    for slot in Connection.__slots__:
        if hasattr(model, slot):
            setattr(conn, slot, getattr(model, slot))
    conn.client_addr, conn.client_port, conn.client_key = client, port, key
    conn.decision = decision if model.decision is not None else None
    conn.start = now - rng.uniform(1.0, 3600.0)
    conn.last_seen = now - rng.uniform(0.0, 60.0)
    conn.timer_at = conn.last_seen + tracker.config.idle_timeout
    shift = rng.getrandbits(32)
    for slot in ("client_isn", "client_ack", "client_nxt", "client_tsval", "ts_base"):
        if hasattr(conn, slot):
            setattr(conn, slot, (getattr(conn, slot) + shift) & 0xFFFFFFFF)
    if model.state == PEEKING:
        conn.hello = copy_hello(model.hello)
        tracker.peeking[key] = conn
        return conn
    conn.target = target
    conn.src6 = PREFIX + client
    conn.host_sport = port
    conn.host_key = conn.host + conn.src6 + target.port.to_bytes(2, "big") + port.to_bytes(2, "big")
    tracker.hosts[conn.host_key] = conn
    if model.state == CONNECTING:
        conn.hello = copy_hello(model.hello)
        return conn
    conn.delta = rng.getrandbits(32)
    conn.host_isn = (conn.our_isn + conn.delta) & 0xFFFFFFFF
    conn.packets_to_host, conn.packets_to_client = rng.randrange(3, 10_000), rng.randrange(3, 50_000)
    tracker._make_flows(conn)
    return conn


def copy_hello(hello: StreamBuffer | None) -> StreamBuffer | None:
    if hello is None:
        return None
    copy = StreamBuffer(hello.capacity)
    copy.data = bytearray(hello.data)
    copy.ranges = [list(r) for r in hello.ranges]
    return copy


def measure(tracker: Tracker, now: float, directory: str) -> dict[str, float]:
    """One save and one load through a file in `directory`, stage by stage."""
    path = os.path.join(directory, "state.json")
    c0 = time.process_time()
    t0 = time.perf_counter()
    data = snapshot(tracker, now)
    data["saved_at"] = time.time()
    t1 = time.perf_counter()
    write_state(path, data)
    t2 = time.perf_counter()
    save_cpu = time.process_time() - c0
    size = os.path.getsize(path)
    del data
    gc.collect()
    # The next process's tracker: the same configuration and listeners, no connections.
    fresh = Tracker(tracker.config, list(tracker.listeners.values()), tracker.resolve, tracker.random32)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c3 = time.process_time()
    t3 = time.perf_counter()
    saved = read_state(path)
    t4 = time.perf_counter()
    count = restore(fresh, saved, now + 5.0)
    t5 = time.perf_counter()
    load_cpu = time.process_time() - c3
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    if count != len(tracker.clients) or len(fresh.clients) != len(tracker.clients):
        raise SystemExit(f"bench_state: restored {count} of {len(tracker.clients)} connections")
    check_same(tracker, fresh)
    os.unlink(path)
    # CPU seconds (user and system) too: on a busy machine they say more than the wall clock.
    return {"save_seconds": t2 - t0, "load_seconds": t5 - t3, "save_cpu": save_cpu, "load_cpu": load_cpu, "bytes": size, "snapshot": t1 - t0,
            "write": t2 - t1, "read": t4 - t3, "restore": t5 - t4, "load_page_faults": faults}


def check_same(old: Tracker, new: Tracker) -> None:
    """A sample of connections came back as they were (times aside: they moved to the new clock)."""
    keys = list(old.clients)
    for key in random.Random(3).sample(keys, min(len(keys), 200)):
        a, b = old.clients[key], new.clients[key]
        if a.__class__ is tuple:
            if a != b:
                raise SystemExit(f"bench_state: parked connection {key.hex()} came back as {b}")
            continue
        if b.to_host_flow is None and a.to_host_flow is not None:
            new._make_flows(b)  # made on a restored connection's first packet
        for slot in ("state", "client_isn", "our_isn", "host_isn", "delta", "host_key", "decision", "target",
                     "packets_to_client", "to_host_flow", "to_client_flow"):
            if getattr(a, slot, None) != getattr(b, slot, None):
                raise SystemExit(f"bench_state: {slot} of {key.hex()} differs: {getattr(a, slot, None)!r} "
                                 f"!= {getattr(b, slot, None)!r}")


def run(connections: int, mixes: list[str], rounds: int, directory: str) -> dict[str, Any]:
    results: dict[str, Any] = {"connections": connections, "rounds": rounds, "python": sys.version.split()[0],
                               "cores": os.cpu_count(), "load_before": os.getloadavg()[0], "mixes": {}}
    for mix in mixes:
        tracker, now = build(connections, MIXES[mix])
        runs = [measure(tracker, now, directory) for _ in range(rounds)]
        summary: dict[str, Any] = {"bytes": runs[0]["bytes"], "bytes_per_connection": runs[0]["bytes"] / connections}
        for what in ("save_seconds", "load_seconds", "save_cpu", "load_cpu", "snapshot", "write", "read", "restore", "load_page_faults"):
            values = [r[what] for r in runs]
            summary[what] = {"best": min(values), "median": statistics.median(values)}
        results["mixes"][mix] = summary
        print(f"{mix:12} save {summary['save_seconds']['best']:.3f} s (median {summary['save_seconds']['median']:.3f}, "
              f"CPU {summary['save_cpu']['best']:.3f}: snapshot {summary['snapshot']['median']:.3f}, "
              f"write {summary['write']['median']:.3f})  "
              f"load {summary['load_seconds']['best']:.3f} s (median {summary['load_seconds']['median']:.3f}, "
              f"CPU {summary['load_cpu']['best']:.3f}: read {summary['read']['median']:.3f}, "
              f"restore {summary['restore']['median']:.3f}; {summary['load_page_faults']['median']:.0f} page faults)  "
              f"{summary['bytes'] / 1e6:.1f} MB, {summary['bytes_per_connection']:.0f} B/conn", flush=True)
        del tracker
        gc.collect()
    results["load_after"] = os.getloadavg()[0]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=100_000, help="connections (default %(default)s)")
    parser.add_argument("--mix", default="established,mixed", help=f"comma-separated: {', '.join(MIXES)}")
    parser.add_argument("--rounds", type=int, default=3, help="save/load rounds per mix (default %(default)s)")
    parser.add_argument("--dir", help="where the state file is written (default: a temporary directory)")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    mixes = args.mix.split(",")
    unknown = set(mixes) - set(MIXES)
    if unknown:
        parser.error(f"unknown mix(es) {sorted(unknown)}; choose from {', '.join(MIXES)}")
    print(f"== state file: {args.connections} connections, {args.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="kracauer-bench-state-", dir=args.dir) as directory:
        results = run(args.connections, mixes, args.rounds, directory)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
