"""Saving and restoring the tracker, so that a restart drops no connection.

kracauer holds no socket buffers: a spliced connection is a few numbers
(addresses, ports, the sequence and timestamp offsets, window scales, what
each side has acknowledged). A process that stops can write them down, and
the next one, reading them, carries on translating as if nothing happened; the
endpoints only see the packets lost in between, which TCP retransmits.

Connections still peeking or connecting are saved with their buffered hello,
and the peeker is rebuilt by feeding it those bytes again. Times are saved as
ages ("started 12.5 s ago"), since each process has its own monotonic clock.
The format is JSON with a version number; anything unexpected in it is an
error (StateError), never a half-restored table.
"""

from __future__ import annotations

from typing import Any, Iterable

from netstack import http, tls
from netstack.flow import Flow, flow_key, split_key
from netstack.peek import Decision
from netstack.reassembly import StreamBuffer
from netstack.tracker import (
    CONNECTING, ESTABLISHED, GONE, PEEKING, REFUSING, Connection, Target, Tracker,
)

VERSION = 1

# Slots holding times on the tracker's clock: saved as ages.
_TIMES = ("start", "last_seen", "timer_at", "connect_start", "host_start", "rst_at")
# Slots holding raw bytes: saved as hex.
_BYTES = ("client_addr", "client_key", "host", "src6", "host_key")
# Slots rebuilt rather than saved.
_REBUILT = ("listener", "hello", "peeker", "decision", "target", "candidates", "to_host_flow", "to_client_flow")


class StateError(ValueError):
    """A saved state cannot be restored."""


def snapshot(tracker: Tracker, now: float) -> dict[str, Any]:
    """Everything needed to carry on every connection, as JSON-ready data."""
    connections = []
    for key, conn in tracker.clients.items():
        if conn.__class__ is tuple:
            connections.append(_save_parked(key, conn))
            continue
        if conn.state in (GONE, REFUSING):
            continue  # a refusal is already answered; the client will close
        connections.append(_save_connection(conn, now))
    return {
        "version": VERSION,
        "connections": connections,
        "health": [[host.hex(), port, fails, max(until - now, 0.0)]
                   for (host, port), (fails, until) in tracker.health.items()],
    }


def restore(tracker: Tracker, state: dict[str, Any], now: float) -> int:
    """Put saved connections back into an empty tracker; return how many were restored.

    Connections whose listener no longer exists are skipped (and counted in
    ``tracker.events["state_skipped"]``).
    """
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise StateError(f"unsupported state format (expected version {VERSION})")
    if tracker.clients:
        raise StateError("the tracker already has connections")
    restored = 0
    try:
        for saved in state["connections"]:
            if "parked" in saved:
                restored += _load_parked(tracker, saved)
                continue
            conn = _load_connection(tracker, saved, now)
            if conn is None:
                tracker.events["state_skipped"] += 1
                continue
            _insert(tracker, conn)
            restored += 1
        for host, port, fails, left in state.get("health", []):
            tracker.health[(bytes.fromhex(host), int(port))] = (int(fails), now + float(left) if left else 0.0)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        tracker.clients.clear()
        tracker.in_kernel = 0
        tracker.hosts.clear()
        tracker.peeking.clear()
        tracker.half_open = 0
        raise StateError(f"saved state is damaged: {exc!r}") from exc
    return restored


def _save_connection(conn: Connection, now: float) -> dict[str, Any]:
    saved: dict[str, Any] = {}
    for slot in Connection.__slots__:
        if slot in _REBUILT:
            continue
        value = getattr(conn, slot, None)
        if slot in _TIMES:
            value = (now - value) if value else None
        elif slot in _BYTES:
            value = value.hex() if value else ""
        saved[slot] = value
    listener = conn.listener
    saved["listener"] = [listener.address.hex(), listener.port]
    if conn.hello is not None:
        saved["hello"] = [bytes(conn.hello.data).hex(), conn.hello.ranges]
    if conn.decision is not None:
        d = conn.decision
        saved["decision"] = [d.name, list(d.alpn), d.hello_size, d.records]
    if conn.target is not None:
        t = conn.target
        saved["target"] = [[h.hex() for h in t.hosts], t.port, t.route]
        saved["candidates"] = [h.hex() for h in conn.candidates]
    return saved


def _save_parked(key: bytes, parked: tuple) -> dict[str, Any]:
    """A connection the kernel carries: its flow map entries stay, only what they lack is saved."""
    decision, target, host, hello_segments, connect_time = parked
    return {
        "parked": key.hex(),
        "decision": [decision.name, list(decision.alpn), decision.hello_size, decision.records] if decision else None,
        "target": [[h.hex() for h in target.hosts], target.port, target.route],
        "host": host.hex(),
        "hello_segments": hello_segments,
        "connect_time": connect_time,
    }


def _load_parked(tracker: Tracker, saved: dict[str, Any]) -> int:
    key = bytes.fromhex(saved["parked"])
    if len(key) != 12:
        raise ValueError("a parked connection's key is 12 bytes")
    if key[4:8] + key[10:12] not in tracker.listeners:
        tracker.events["state_skipped"] += 1
        return 0
    decision = None
    if saved["decision"] is not None:
        name, alpn, hello_size, records = saved["decision"]
        decision = Decision(name, tuple(alpn), int(hello_size), int(records))
    hosts, port, route = saved["target"]
    packed = tuple(bytes.fromhex(h) for h in hosts)
    tracker.clients[key] = (decision, Target(packed[0], int(port), route, packed), bytes.fromhex(saved["host"]),
                            int(saved["hello_segments"]), saved["connect_time"])
    tracker.in_kernel += 1
    return 1


def _load_connection(tracker: Tracker, saved: dict[str, Any], now: float) -> Connection | None:
    address, port = saved["listener"]
    listener = tracker.listeners.get(bytes.fromhex(address) + int(port).to_bytes(2, "big"))
    if listener is None:
        return None
    conn = Connection(listener, bytes.fromhex(saved["client_addr"]), int(saved["client_port"]),
                      bytes.fromhex(saved["client_key"]))
    for slot in Connection.__slots__:
        if slot in _REBUILT or slot not in saved:
            continue
        value = saved[slot]
        if slot in _TIMES:
            value = (now - float(value)) if value is not None else 0.0
        elif slot in _BYTES:
            value = bytes.fromhex(value)
        setattr(conn, slot, value)
    if conn.state not in (PEEKING, CONNECTING, ESTABLISHED):
        raise ValueError(f"state {conn.state!r}")
    if "decision" in saved:
        name, alpn, hello_size, records = saved["decision"]
        conn.decision = Decision(name, tuple(alpn), hello_size, records)
    if "target" in saved:
        hosts, port, route = saved["target"]
        packed = tuple(bytes.fromhex(h) for h in hosts)
        conn.target = Target(packed[0], int(port), route, packed)
        conn.candidates = tuple(bytes.fromhex(h) for h in saved.get("candidates", []))
    if "hello" in saved:
        data, ranges = saved["hello"]
        conn.hello = StreamBuffer(tracker.config.hello_max_bytes)
        conn.hello.data = bytearray.fromhex(data)
        conn.hello.ranges = [[int(a), int(b)] for a, b in ranges]
    if conn.state == PEEKING:
        _rebuild_peeker(tracker, conn)
    if conn.state == ESTABLISHED:
        tracker._make_flows(conn)
    return conn


def _rebuild_peeker(tracker: Tracker, conn: Connection) -> None:
    protocol = conn.listener.protocol
    if protocol == "tls":
        conn.peeker = tls.TlsPeeker(tracker.config.hello_max_bytes)
    elif protocol == "http":
        conn.peeker = http.HttpPeeker(tracker.config.hello_max_bytes)
    if conn.peeker is not None and conn.fed:
        conn.peeker.feed(memoryview(conn.hello.data)[:conn.fed])


def _insert(tracker: Tracker, conn: Connection) -> None:
    tracker.clients[conn.client_key] = conn
    if conn.host_key:
        tracker.hosts[conn.host_key] = conn
    if conn.state == PEEKING:
        tracker.peeking[conn.client_key] = conn
        if not conn.acked:
            tracker.half_open += 1
    tracker._set_timer(conn, conn.timer_at)


# ---------------------------------------------------------------- adoption

def adopt(tracker: Tracker, entries: Iterable[tuple[bytes, Flow]], now: float) -> tuple[int, list[bytes]]:
    """Take on the connections the kernel carries that this tracker does not know.

    After a crash (SIGKILL, an OOM kill) no state file was written, but the
    pinned flow map and the program on the persistent TUN went on
    translating. Each pair of entries (client side and host side) holds what
    the splice recorded, so the connection is parked here as any connection
    the kernel carries, to be rebuilt from its entries when it needs the
    tracker. What the map does not hold (the server name, the route, the
    hello's size) is missing from its access-log line.

    Returns how many were adopted, and the keys of entries to remove (their
    other half is missing, or their listener is gone).
    """
    entries = dict(entries)
    adopted = 0
    keep: set[bytes] = set()
    for key, up in entries.items():
        src, dst, sport, dport = split_key(key)
        if len(src) != 4:
            continue
        client_key = src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
        host_key = flow_key(up.dst, up.src, up.dport.to_bytes(2, "big") + up.sport.to_bytes(2, "big"))
        if host_key not in entries or dst + dport.to_bytes(2, "big") not in tracker.listeners:
            continue
        keep.update((key, host_key))
        if client_key in tracker.clients:
            continue  # restored from the state file
        if len(tracker.clients) >= tracker.config.max_connections:
            keep.difference_update((key, host_key))
            continue
        tracker.clients[client_key] = (None, Target(up.dst, up.dport, ""), up.dst, 0, None)
        tracker.in_kernel += 1
        adopted += 1
    return adopted, [key for key in entries if key not in keep]
