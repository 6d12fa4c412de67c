"""Saving and restoring the tracker, so that a restart drops no connection.

kracauer holds no socket buffers: a spliced connection is a few numbers
(addresses, ports, the sequence and timestamp offsets, window scales, what
each side has acknowledged). A process that stops can write them down, and
the next one, reading them, carries on translating as if nothing happened; the
endpoints only see the packets lost in between, which TCP retransmits.

Connections still peeking or connecting are saved with their buffered hello,
and the peeker is rebuilt by feeding it those bytes again. Times are saved as
ages ("started 12.5 s ago"), since each process has its own monotonic clock.

The format (version 2) is one JSON-ready object. The connections are a table:
the field names and their ``struct`` formats once, then one fixed-size
little-endian row per connection, all rows packed together and base64-encoded
(numbers in JSON text would cost several times the space and time). Values
that many connections share (listeners, targets, decisions, outcomes, host
orders) are kept once in tables that a row refers to by index:

    {"version": 2,
     "fields": [["client_addr", "5p"], ["client_port", "H"], ..., ["listener", "H"], ["decision", "i"], ...],
     "count": 2,
     "rows": "<base64 of count rows>",
     "listeners": [["c000020a", 443]],
     "targets": [[["20010db8000000000000000000000010"], 443, "www.example.com"]],
     "decisions": [["www.example.com", ["h2", "http/1.1"], 1758, 1, "refused_unknown_name"]],
     "candidates": [[]],
     "outcomes": [""],
     "hellos": {"1": ["160301...", [[0, 900]]]},
     "health": [[host, port, fails, seconds left]]}

Connections the kernel carries (parked, see netstack.tracker) are saved as
``"parked": [[client key, decision index, target index, host, hello segments,
connect time], ...]``: their numbers stay in the kernel's flow map, which
outlives the process, and the next one rebuilds them from it.

In a row, -1 is "none" for an index and a window scale, NaN for a time or the
connect time. A field the reader does not know or knows with another format,
a damaged table, or any other version is an error (StateError), never a
half-restored table; a field the file lacks keeps the value a new connection
has.
"""

from __future__ import annotations

import base64
import binascii
import gc
import heapq
import math
import struct
from typing import Any, Callable, Iterable

from netstack import connect, http, tls
from netstack.flow import Flow, flow_key, split_key
from netstack.peek import Decision
from netstack.reassembly import StreamBuffer
from netstack.tcp import U16
from netstack.tracker import (
    CONNECTING, ESTABLISHED, GONE, PEEKING, REFUSING, Connection, Target, Tracker,
)

VERSION = 2

NAN = math.nan

# Every saved slot and its struct format. Times (ages) and the connect time are
# doubles, NaN for none; "p" is a Pascal string (a length byte, then the bytes)
# so that an empty address stays empty; -1 stands for a window scale of None.
_SLOT_FORMATS = {
    "client_addr": "5p", "client_port": "H", "state": "B", "start": "d", "last_seen": "d", "timer_at": "d",
    "tries": "I", "client_isn": "I", "our_isn": "I", "client_mss": "I", "client_wscale": "b", "client_sack": "?",
    "client_ts": "?", "client_tsval": "I", "client_window": "I", "ts_base": "I", "our_wscale": "B", "fed": "I",
    "client_fin_offset": "q", "host": "17p", "host_start": "d", "src6": "17p", "host_sport": "H", "host_isn": "I",
    "host_mss": "I", "host_tsval": "I", "host_ts": "?", "delta": "I", "ts_off": "I", "c2h_shift": "b",
    "h2c_shift": "b", "host_wscale": "B", "client_ack": "I", "client_win": "I", "host_ack": "I", "host_win": "I",
    "client_fin": "q", "host_fin": "q", "closing": "?", "packets_to_host": "Q", "packets_to_client": "Q",
    "outcome": "H", "connect_start": "d", "rst_at": "d", "recorded": "?", "acked": "?", "cookie": "?",
    "client_nxt": "I", "host_nxt": "I", "client_max_win": "Q", "host_max_win": "Q", "hello_segments": "I",
    "connect_time": "d", "kernel": "B",
}
# Slots rebuilt rather than saved as they are: the table keys are made from the
# addresses and ports again, the peeker by feeding it the hello.
_REBUILT = ("listener", "hello", "peeker", "decision", "target", "candidates", "client_key", "host_key",
            "to_host_flow", "to_client_flow")
# Indexes into the tables, after the slots.
_INDEXES = (("listener", "H"), ("decision", "i"), ("target", "i"), ("candidates", "i"))

_PLAIN = tuple(slot for slot in Connection.__slots__ if slot not in _REBUILT)
if set(_PLAIN) != set(_SLOT_FORMATS):  # a slot added to Connection must get a format here
    raise ImportError(f"netstack.state does not cover Connection's slots: {set(_PLAIN) ^ set(_SLOT_FORMATS)}")
FIELDS = tuple((slot, _SLOT_FORMATS[slot]) for slot in _PLAIN) + _INDEXES
_ROW = struct.Struct("<" + "".join(fmt for _, fmt in FIELDS))
_TIMES = ("start", "last_seen", "timer_at", "connect_start", "host_start", "rst_at")
# What a slot that was never set is read as (the host side of a connection still peeking).
_UNSET = {"5p": b"", "17p": b"", "?": False}


# A row is some fifty slots, a hundred thousand connections five million
# values: a loop over slots with getattr/setattr costs seconds. Like
# dataclasses' __init__, the two functions below are generated once, as plain
# attribute loads and stores (which the interpreter specialises for slots).
def _compile(name: str, source: str) -> Any:
    namespace: dict[str, Any] = {"NAN": NAN}
    exec(compile(source, f"<netstack.state.{name}>", "exec"), namespace)  # noqa: S102 (our own slot names)
    return namespace[name]


def _save_expression(slot: str) -> str:
    """The value saved for `slot` of connection `c` (times as ages, None as -1 or NaN, outcome as an index)."""
    if slot in _TIMES:
        return f"(now - c.{slot}) if c.{slot} else NAN"
    if slot == "client_wscale":
        return "-1 if c.client_wscale is None else c.client_wscale"
    if slot == "connect_time":
        return "NAN if c.connect_time is None else c.connect_time"
    if slot == "outcome":
        return "outcome(c.outcome)"
    return f"c.{slot}"


def _load_statement(slot: str, i: int) -> str:
    """Set `slot` of connection `c` from value `i` of row `v` (the reverse of _save_expression)."""
    if slot in _TIMES:
        return f"x = v[{i}]; c.{slot} = now - x if x == x else 0.0"  # NaN: never set
    if slot == "client_wscale":
        return f"x = v[{i}]; c.{slot} = None if x == -1 else x"
    if slot == "connect_time":
        return f"x = v[{i}]; c.{slot} = None if x != x else x"
    if slot == "outcome":
        return f"c.{slot} = outcomes[v[{i}]]"
    return f"c.{slot} = v[{i}]"


_save_values = _compile("_save_values", "def _save_values(c, now, outcome):\n    return (\n"
                        + "".join(f"        {_save_expression(slot)},\n" for slot in _PLAIN) + "    )\n")


def _loader_for(slots: list[str]) -> Any:
    body = "".join(f"    {_load_statement(slot, i)}\n" for i, slot in enumerate(slots)) or "    pass\n"
    return _compile("_fill", "def _fill(c, v, now, outcomes):\n" + body)


class _Unset:
    """A connection seen with defaults for the slots it never set, for _save_values."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __getattr__(self, slot: str) -> Any:
        return getattr(self.conn, slot, _UNSET.get(_SLOT_FORMATS[slot], 0))


class StateError(ValueError):
    """A saved state cannot be restored."""


class _Table:
    """Values shared by many connections, each kept once; a row holds its index."""

    def __init__(self) -> None:
        self.index: dict[Any, int] = {}
        self.values: list[Any] = []

    def __call__(self, value: Any) -> int:
        i = self.index.get(value)
        if i is None:
            i = self.index[value] = len(self.values)
            self.values.append(value)
        return i


def snapshot(tracker: Tracker, now: float) -> dict[str, Any]:
    """Everything needed to carry on every connection, as JSON-ready data."""
    conns = [conn for conn in tracker.clients.values() if conn.__class__ is not tuple
             and conn.state not in (GONE, REFUSING)]
    # (A refusal is already answered; the client will close. Tuples are parked connections, below.)
    listeners, decisions, outcomes, candidates = _Table(), _Table(), _Table(), _Table()
    targets: dict[int, int] = {}  # id(target) -> index: one Target object is shared per route
    target_list: list[Target] = []
    hellos = {}
    rows = bytearray(_ROW.size * len(conns))
    pack_into, size, values = _ROW.pack_into, _ROW.size, _save_values
    listener_at: dict[int, int] = {}  # id(listener) -> index (few objects, shared)
    for n, conn in enumerate(conns):
        try:
            row = values(conn, now, outcomes)
        except AttributeError:
            row = values(_Unset(conn), now, outcomes)
        listener = conn.listener
        li = listener_at.get(id(listener))
        if li is None:
            li = listener_at[id(listener)] = listeners(listener)
        target = conn.target
        if target is None:
            t = c = -1
        else:
            t = targets.get(id(target))
            if t is None:
                t = targets[id(target)] = len(target_list)
                target_list.append(target)
            c = candidates(conn.candidates)
        d = conn.decision
        # Each connection has its own Decision; equal ones are kept once (a tuple hashes faster than the dataclass).
        di = -1 if d is None else decisions((d.name, d.alpn, d.hello_size, d.records, d.unrouted))
        pack_into(rows, n * size, *row, li, di, t, c)
        if conn.hello is not None:
            hellos[str(n)] = [bytes(conn.hello.data).hex(), conn.hello.ranges]
    # Connections the kernel carries (parked): their map entries stay; only what the map lacks is saved.
    parked = []
    for key, (d, target, host, hello_segments, connect_time) in tracker.parked():
        t = targets.get(id(target))
        if t is None:
            t = targets[id(target)] = len(target_list)
            target_list.append(target)
        di = -1 if d is None else decisions((d.name, d.alpn, d.hello_size, d.records, d.unrouted))
        parked.append([key.hex(), di, t, host.hex(), hello_segments, connect_time])
    return {
        "version": VERSION,
        "fields": [list(field) for field in FIELDS],
        "count": len(conns),
        "rows": base64.b64encode(rows).decode("ascii"),
        "listeners": [[lst.address.hex(), lst.port] for lst in listeners.values],
        "targets": [[[h.hex() for h in t.hosts], t.port, t.route] for t in target_list],
        "decisions": [[name, list(alpn), size, records, unrouted]
                      for name, alpn, size, records, unrouted in decisions.values],
        "candidates": [[h.hex() for h in hosts] for hosts in candidates.values],
        "outcomes": outcomes.values,
        "hellos": hellos,
        "parked": parked,
        "health": [[host.hex(), port, fails, max(until - now, 0.0)]
                   for (host, port), (fails, until) in tracker.health.items()],
    }


def restore(tracker: Tracker, state: dict[str, Any], now: float,
            keep: Callable[[bytes, int], bool] | None = None) -> int:
    """Put saved connections back into a tracker; return how many were restored.

    Connections whose listener no longer exists are skipped (and counted in
    ``tracker.events["state_skipped"]``). With `keep`, only the connections
    whose (client address, client port) it accepts are restored: a worker
    takes the ones that steer to it (netstack.steer), from any number of files.
    """
    if not isinstance(state, dict):
        raise StateError("the saved state is not a JSON object")
    version = state.get("version")
    if version != VERSION:
        raise StateError(f"the state file has format version {version!r}, this kracauer reads version {VERSION} "
                         f"only; its connections cannot be carried over")
    if tracker.clients and keep is None:
        raise StateError("the tracker already has connections")
    # A hundred thousand new objects would set off collections that walk them
    # all again and again (more than halves the time); none of them is garbage.
    collecting = gc.isenabled()
    gc.disable()
    try:
        loader = _Loader(tracker, state, now, keep)
        restored = loader.run() + loader.parked(state.get("parked", []))
        for host, port, fails, left in state.get("health", []):
            tracker.health[(bytes.fromhex(host), int(port))] = (int(fails), now + float(left) if left else 0.0)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, struct.error, binascii.Error) as exc:
        tracker.clients.clear()
        tracker.hosts.clear()
        tracker.peeking.clear()
        tracker.half_open = 0
        tracker.in_kernel = 0
        tracker._timers.clear()
        if isinstance(exc, StateError):
            raise
        raise StateError(f"saved state is damaged: {exc!r}") from exc
    finally:
        if collecting:
            gc.enable()
    return restored


class _Loader:
    """Rows back into connections, read with the file's own field list."""

    def __init__(self, tracker: Tracker, state: dict[str, Any], now: float,
                 keep: Callable[[bytes, int], bool] | None = None) -> None:
        self.tracker = tracker
        self.now = now
        self.keep = keep
        fields = [tuple(field) for field in state["fields"]]
        known = dict(FIELDS)
        names = [name for name, _ in fields]
        if len(set(names)) != len(names):
            raise StateError("the state file's field list names a field twice")
        for name, fmt in fields:
            if name not in known:
                raise StateError(f"the state file has a field this kracauer does not know: {name}")
            if fmt != known[name]:
                raise StateError(f"the state file saves {name} as {fmt!r}, this kracauer as {known[name]!r}")
        for name in ("client_addr", "client_port", "state", "listener"):
            if name not in names:
                raise StateError(f"the state file lacks the field {name!r}")
        self.row = struct.Struct("<" + "".join(fmt for _, fmt in fields))
        self.rows = base64.b64decode(state["rows"], validate=True)
        self.count = int(state["count"])
        if len(self.rows) != self.count * self.row.size:
            raise StateError(f"the state file has {len(self.rows)} bytes of rows for {self.count} connections "
                             f"of {self.row.size} bytes")
        self.names = names
        self.complete = fields == list(FIELDS)
        self.listeners = [tracker.listeners.get(bytes.fromhex(address) + U16.pack(int(port)))
                          for address, port in state["listeners"]]
        self.targets = []
        for hosts, port, route in state["targets"]:
            packed = tuple(bytes.fromhex(h) for h in hosts)
            self.targets.append(Target(packed[0], int(port), str(route), packed))
        self.decisions = [Decision(name, tuple(alpn), int(size), int(records), str(unrouted))
                          for name, alpn, size, records, unrouted in state["decisions"]]
        self.candidates = [tuple(bytes.fromhex(h) for h in hosts) for hosts in state["candidates"]]
        self.outcomes = [str(outcome) for outcome in state["outcomes"]]
        self.hellos = {int(n): hello for n, hello in state.get("hellos", {}).items()}

    def run(self) -> int:
        tracker, now = self.tracker, self.now
        names = self.names
        at = {name: i for i, name in enumerate(names)}
        slots = [name for name in names if name in _SLOT_FORMATS]
        n_slots = len(slots)
        fill = _loader_for(slots)
        i_addr, i_port, i_state = at["client_addr"], at["client_port"], at["state"]
        i_listener, i_decision = at["listener"], at.get("decision")
        i_target, i_candidates = at.get("target"), at.get("candidates")
        if list(names[:n_slots]) != slots:
            raise StateError("the state file's slots must come before its table indexes")
        listeners, decisions, targets, candidates, outcomes = \
            self.listeners, self.decisions, self.targets, self.candidates, self.outcomes
        # What each listener adds to a client key, and each target to a host key.
        listener_ends = [lst.address if lst else b"" for lst in listeners]
        listener_ports = [U16.pack(lst.port) if lst else b"" for lst in listeners]
        target_ports = [U16.pack(t.port) for t in targets]
        pack_port = U16.pack
        new = Connection.__new__
        complete = self.complete
        hellos = self.hellos
        clients, hosts, timers = tracker.clients, tracker.hosts, tracker._timers
        seq = tracker._timer_seq
        skipped = 0
        others = 0  # another worker's
        keep = self.keep
        for n, values in enumerate(self.row.iter_unpack(self.rows)):
            li = values[i_listener]
            listener = listeners[li]
            if listener is None:
                skipped += 1
                continue
            client_addr, client_port, state = values[i_addr], values[i_port], values[i_state]
            if state not in (PEEKING, CONNECTING, ESTABLISHED):
                raise ValueError(f"state {state!r}")
            if len(client_addr) != 4:
                raise ValueError(f"client address {client_addr.hex()!r}")
            if keep is not None and not keep(client_addr, client_port):
                others += 1
                continue
            # As Tracker keys them: bytes 12:20 of the client's IPv4 header and 0:4 of its TCP header.
            key = client_addr + listener_ends[li] + pack_port(client_port) + listener_ports[li]
            if complete:
                conn = new(Connection)
                conn.listener = listener
                conn.client_key = key
                conn.hello = conn.peeker = None
            else:
                # An older file of this version: what it lacks keeps a new connection's value.
                conn = Connection(listener, client_addr, client_port, key)
            fill(conn, values, now, outcomes)
            d = values[i_decision] if i_decision is not None else -1
            conn.decision = decisions[d] if d >= 0 else None
            t = values[i_target] if i_target is not None else -1
            clients[key] = conn
            if t >= 0:
                conn.target = targets[t]
                c = values[i_candidates] if i_candidates is not None else -1
                conn.candidates = candidates[c] if c >= 0 else ()
            else:
                conn.target = None
                conn.candidates = ()
            if state == ESTABLISHED:
                tracker._make_flows(conn)
            else:
                conn.to_host_flow = conn.to_client_flow = None
            if state == PEEKING:
                conn.host_key = b""
            else:
                # Bound to a host: its key, as Tracker makes it (host + prefix::client + ports).
                conn.host_key = host_key = conn.host + conn.src6 + target_ports[t] + pack_port(conn.host_sport)
                hosts[host_key] = conn
            if hellos:
                self._hello(conn, hellos.get(n))
            if state == PEEKING:
                self._peeking(conn)
            seq += 1
            timers.append((conn.timer_at, seq, conn))
        if skipped:
            tracker.events["state_skipped"] += skipped
        tracker._timer_seq = seq
        heapq.heapify(timers)
        return self.count - skipped - others

    def parked(self, saved: list) -> int:
        """Connections the kernel carries, back as parked records (rebuilt from the map when needed)."""
        tracker = self.tracker
        restored = 0
        for key_hex, d, t, host, hello_segments, connect_time in saved:
            key = bytes.fromhex(key_hex)
            if len(key) != 12:
                raise ValueError(f"parked connection key {key_hex!r}")
            if key[4:8] + key[10:12] not in tracker.listeners:
                tracker.events["state_skipped"] += 1
                continue
            if self.keep is not None and not self.keep(key[:4], U16.unpack(key[8:10])[0]):
                continue
            decision = self.decisions[d] if d >= 0 else None
            tracker.clients[key] = (decision, self.targets[t], bytes.fromhex(host), int(hello_segments),
                                    None if connect_time is None else float(connect_time))
            tracker.in_kernel += 1
            restored += 1
        return restored

    def _hello(self, conn: Connection, hello: list | None) -> None:
        if hello is not None:
            data, ranges = hello
            conn.hello = StreamBuffer(self.tracker.config.hello_max_bytes)
            conn.hello.data = bytearray.fromhex(data)
            conn.hello.ranges = [[int(a), int(b)] for a, b in ranges]

    def _peeking(self, conn: Connection) -> None:
        tracker = self.tracker
        if conn.hello is None:
            raise ValueError("a connection still peeking without its hello")
        _rebuild_peeker(tracker, conn)
        tracker.peeking[conn.client_key] = conn
        if not conn.acked:
            tracker.half_open += 1


def _rebuild_peeker(tracker: Tracker, conn: Connection) -> None:
    protocol = conn.listener.protocol
    if protocol == "tls":
        conn.peeker = tls.TlsPeeker(tracker.config.hello_max_bytes)
    elif protocol == "http":
        conn.peeker = http.HttpPeeker(tracker.config.hello_max_bytes)
    elif protocol == "connect":
        conn.peeker = connect.ConnectPeeker(tracker.config.hello_max_bytes)
    if conn.peeker is not None and conn.fed:
        conn.peeker.feed(memoryview(conn.hello.data)[:conn.fed])


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
