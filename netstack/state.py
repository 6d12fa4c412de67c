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
from netstack.flow import F_SACK, F_TIMESTAMPS, F_WSCALE_MASK, NO_WSCALE, Flow, flow_key, split_key
from netstack.peek import Decision
from netstack.reassembly import StreamBuffer
from netstack.tracker import (
    CONNECTING, ESTABLISHED, GONE, KERNEL_YES, PEEKING, REFUSING, Connection, Target, Tracker,
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
    for conn in tracker.clients.values():
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
    if conn.kernel == KERNEL_YES:
        tracker.in_kernel += 1
        conn.to_host_flow = conn.to_client_flow = None  # the kernel's map holds them
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
    the splice recorded, so the connection is rebuilt from them, ESTABLISHED
    and still in the kernel. What the map does not hold (the server name,
    the route, the hello's size) is missing from its access-log line.

    Returns how many were adopted, and the keys of entries to remove (their
    other half is missing, or their listener is gone).
    """
    entries = dict(entries)
    adopted = 0
    stale: list[bytes] = []
    for key, up in entries.items():
        src, dst, sport, dport = split_key(key)
        if len(src) != 4:
            continue
        host_key = flow_key(up.dst, up.src, up.dport.to_bytes(2, "big") + up.sport.to_bytes(2, "big"))
        down = entries.get(host_key)
        client_key = src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
        if client_key in tracker.clients:
            continue  # restored from the state file, or already adopted
        listener = tracker.listeners.get(dst + dport.to_bytes(2, "big"))
        if down is None or listener is None or len(tracker.clients) >= tracker.config.max_connections:
            stale.append(key)
            if down is not None:
                stale.append(host_key)
            continue
        conn = _adopted_connection(tracker, listener, client_key, up, down, now)
        _insert(tracker, conn)
        adopted += 1
    known = {k for conn in tracker.clients.values() if conn.kernel == KERNEL_YES for k in tracker._kernel_keys(conn)}
    stale.extend(k for k in entries if k not in known and k not in stale)
    return adopted, stale


def _adopted_connection(tracker: Tracker, listener, client_key: bytes, up: Flow, down: Flow, now: float) -> Connection:
    conn = Connection(listener, client_key[:4], int.from_bytes(client_key[8:10], "big"), client_key)
    conn.state = ESTABLISHED
    conn.acked = True
    conn.kernel = KERNEL_YES
    conn.start = up.start_ns / 1e9 if up.start_ns else now
    conn.last_seen = max(up.last_seen, down.last_seen) / 1e9 or now
    conn.src6, conn.host, conn.host_sport = up.src, up.dst, up.sport
    conn.target = Target(up.dst, up.dport, "")
    conn.host_key = up.dst + up.src + up.dport.to_bytes(2, "big") + up.sport.to_bytes(2, "big")
    conn.delta, conn.ts_off = up.ack_add, up.tsecr_add
    conn.c2h_shift, conn.h2c_shift = up.wscale_shift, down.wscale_shift
    client_ws = up.flags & F_WSCALE_MASK
    conn.client_wscale = None if client_ws == NO_WSCALE else client_ws
    conn.host_wscale = down.flags & F_WSCALE_MASK
    conn.our_wscale = conn.host_wscale - conn.h2c_shift if conn.client_wscale is not None else 0
    conn.client_ts = conn.host_ts = bool(up.flags & F_TIMESTAMPS)
    conn.client_sack = bool(up.flags & F_SACK)
    conn.client_isn = (up.seq_base - 1) & 0xFFFFFFFF
    conn.host_isn = (down.seq_base - 1) & 0xFFFFFFFF
    conn.our_isn = (conn.host_isn - conn.delta) & 0xFFFFFFFF
    conn.client_mss = down.mss
    conn.client_ack, conn.client_nxt, conn.client_win = up.ack_max, up.seq_next, up.window
    conn.host_ack, conn.host_win = down.ack_max, down.window
    conn.host_nxt = (down.seq_next - conn.delta) & 0xFFFFFFFF
    conn.client_max_win = max(up.window_max << (conn.client_wscale or 0), 0xFFFF)
    conn.host_max_win = max(down.window_max << conn.host_wscale, 0xFFFF)
    conn.packets_to_host, conn.packets_to_client = up.packets, down.packets
    tracker._make_flows(conn)
    conn.timer_at = now + tracker.config.idle_timeout
    return conn
