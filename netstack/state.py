"""Saving and restoring the tracker, so that a restart drops no connection.

kracauer holds no socket buffers: a spliced connection is a few numbers
(addresses, ports, the sequence and timestamp offsets, window scales, what
each side has acknowledged). A process that stops can write them down, and
the next one, reading them, carries on translating as if nothing happened; the
endpoints only see the packets lost in between, which TCP retransmits.

Connections still peeking or connecting are saved with their buffered hello,
and the peeker is rebuilt by feeding it those bytes again. Times are saved as
ages ("started 12.5 s ago"), since each process has its own monotonic clock.

The format (version 3) is one line of JSON, the header, then binary sections
whose names and sizes the header lists, in order (``encode``, ``decode``):

    {"version": 3,
     "fields": [["client_addr", "5p"], ["client_port", "H"], ..., ["listener", "H"], ["decision", "i"],
                ["hello_size", "I"], ["target", "i"], ["candidates", "i"]],
     "count": 2,
     "parked_fields": [["key", "12s"], ["decision", "i"], ["hello_size", "I"], ["target", "i"], ["host", "17p"],
                       ["hello_segments", "I"], ["connect_time", "d"]],
     "parked_count": 1,
     "listeners": [["c000020a", 443]],
     "targets": [[["20010db8000000000000000000000010"], 443, "www.example.com"],
                 [["0064ff9b0001000000000000fffffffd"], 443, "*.service.example.com", true]],
     "decisions": [["www.example.com", ["h2", "http/1.1"], 1, "refused_unknown_name", null]],
     "candidates": [[]],
     "outcomes": [""],
     "hellos": [[row, size, [[0, 900]]], ...],
     "health": [[host, port, fails, seconds left]],
     "sections": [["rows", 538], ["parked", 53], ["hello_data", 900]]}\n
    <rows: count fixed-size little-endian rows, one per connection, laid out as "fields" says>
    <parked: parked_count rows, one per connection the kernel carries, as "parked_fields" says>
    <hello_data: the buffered hellos, one after the other, as "hellos" says>

The field names and their ``struct`` formats are written once; the rows are
raw bytes (numbers as JSON text, or base64, would cost several times the
space and time: 100 000 connections are some five million values). Values
that many connections share (listeners, targets, decisions, outcomes, host
orders) are kept once in tables that a row refers to by index; a decision's
hello size, which differs from one client to the next, is in the row.

Connections the kernel carries (parked, see netstack.tracker) are saved with
only what the kernel's flow map lacks (decision, target, host, hello segments,
connect time): their numbers stay in the map, which outlives the process, and
the next one rebuilds them from it.

quic listeners' bound UDP flows (netstack.udptracker) are few numbers each and
go in the header as a JSON list, ``"udp_flows"`` (``UdpTracker.saved``): the
client, listener, host, ports, route, name and ALPN, the host's connection IDs
(for NAT rebinding after the restart), ages and counts. Flows still peeking
are not saved (their clients send their Initials again).

In a row, -1 is "none" for an index and a window scale, NaN for a time or the
connect time. A field the reader does not know or knows with another format,
a damaged table or section, or a version other than 3 and 2 is an error
(StateError), never a half-restored table; a field the file lacks keeps the
value a new connection has. Version 2 (kracauer before this format: rows of the same
kind, without hello_size, base64-encoded inside one JSON object, the parked
connections and hellos as JSON lists) is still read.
"""

from __future__ import annotations

import base64
import binascii
import gc
import heapq
import json
import math
import struct
from typing import Any, Callable, Iterable

from netstack import connect, http, tls
from netstack.flow import F_SACK, F_TIMESTAMPS, L4_UDP, NO_WSCALE, Flow, flow_key, key_l4, split_key
from netstack.peek import Decision
from netstack.reassembly import StreamBuffer
from netstack.tcp import MOD32, U16
from netstack.tracker import (
    CONNECTING, ESTABLISHED, GONE, PEEKING, REFUSING, Connection, Target, Tracker,
)
from netstack.udptracker import KERNEL_IN

VERSION = 3
READS = (2, 3)  # the versions this kracauer restores

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
# (A decision's hello_size differs from one client to the next: it is in the row, the rest in the table.)
_INDEXES = (("listener", "H"), ("decision", "i"), ("hello_size", "I"), ("target", "i"), ("candidates", "i"))

_PLAIN = tuple(slot for slot in Connection.__slots__ if slot not in _REBUILT)
if set(_PLAIN) != set(_SLOT_FORMATS):  # a slot added to Connection must get a format here
    raise ImportError(f"netstack.state does not cover Connection's slots: {set(_PLAIN) ^ set(_SLOT_FORMATS)}")
FIELDS = tuple((slot, _SLOT_FORMATS[slot]) for slot in _PLAIN) + _INDEXES
_ROW = struct.Struct("<" + "".join(fmt for _, fmt in FIELDS))
_TIMES = ("start", "last_seen", "timer_at", "connect_start", "host_start", "rst_at")
# What a slot that was never set is read as (the host side of a connection still peeking).
_UNSET = {"5p": b"", "17p": b"", "?": False}

# A parked connection: its client key and what the kernel's flow map does not hold.
PARKED_FIELDS = (("key", "12s"), ("decision", "i"), ("hello_size", "I"), ("target", "i"), ("host", "17p"),
                 ("hello_segments", "I"), ("connect_time", "d"))
_PARKED = struct.Struct("<" + "".join(fmt for _, fmt in PARKED_FIELDS))

# The binary sections of a version 3 file, in the order they are written.
_SECTIONS = ("rows", "parked", "hello_data")


# A row is some fifty slots, a hundred thousand connections five million
# values: a loop over slots with getattr/setattr costs seconds. Like
# dataclasses' __init__, the functions below are generated once, as plain
# attribute loads and stores (which the interpreter specialises for slots).
def _compile(name: str, source: str) -> Any:
    namespace: dict[str, Any] = {"NAN": NAN}
    exec(compile(source, f"<netstack.state.{name}>", "exec"), namespace)  # noqa: S102 (our own slot names)
    return namespace[name]


def _save_expression(slot: str, get: str) -> str:
    """The value saved for `slot` of connection `c`, read as `get` says (times as ages, None as -1 or NaN,
    outcome as an index)."""
    value = get.format(slot=slot, default=_UNSET.get(_SLOT_FORMATS[slot], 0))
    if slot in _TIMES:
        return f"(now - x) if (x := {value}) else NAN"
    if slot == "client_wscale":
        return f"-1 if (x := {value}) is None else x"
    if slot == "connect_time":
        return f"NAN if (x := {value}) is None else x"
    if slot == "outcome":
        return "oi"
    return value


def _load_statement(slot: str) -> str:
    """Set `slot` of connection `c` from the local of its name (the reverse of _save_expression)."""
    if slot in _TIMES:
        return f"c.{slot} = now - {slot} if {slot} == {slot} else 0.0"  # NaN: never set
    if slot == "client_wscale":
        return f"c.{slot} = None if {slot} == -1 else {slot}"
    if slot == "connect_time":
        return f"c.{slot} = None if {slot} != {slot} else {slot}"
    if slot == "outcome":
        return f"c.{slot} = outcomes[{slot}]"
    return f"c.{slot} = {slot}"


def _packer(name: str, get: str) -> Any:
    """A function that packs connection `c` as the row at `off` of `rows` (its outcome and table indexes
    worked out by the caller): one call with every value an argument, no tuple in between."""
    values = "".join(f"        {_save_expression(slot, get)},\n" for slot in _PLAIN)
    return _compile(name, f"def {name}(pack_into, rows, off, c, now, oi, li, di, hs, t, ci):\n"
                          f"    pack_into(rows, off,\n{values}        li, di, hs, t, ci)\n")


_pack_row = _packer("_pack_row", "c.{slot}")
# For a connection still peeking (its host side never set) or connecting: a slot never set is saved as
# what it is read as (no address, zero, False).
_pack_unset_row = _packer("_pack_unset_row", "getattr(c, {slot!r}, {default!r})")


# The loop that turns rows back into connections (_Loader.run), compiled for
# the file's own field list: each row is unpacked into locals named after its
# fields ({unpack}), the connection's slots are set from them ({stores}), and
# the keys and the timer are made from the same locals; the rewrites wait for
# the connection's first packet. Slots a file lacks ({defaults}) keep a new
# connection's value.
_ROWS_BACK = """
def _rows_back(rows, now, loader, tracker):
    listeners, targets, candidates, outcomes = loader.listeners, loader.targets, loader.candidates, loader.outcomes
    made_decision, decision = loader.made.get, loader.decision
    # What each listener adds to a client key, and each target to a host key.
    listener_ends = [lst.address if lst else b"" for lst in listeners]
    listener_ports = [U16.pack(lst.port) if lst else b"" for lst in listeners]
    target_ports = [U16.pack(t.port) for t in targets]
    pack_port, new = U16.pack, Connection.__new__
    clients, hosts, timers = tracker.clients, tracker.hosts, tracker._timers
    by_row, waiting = loader.by_row, loader.waiting
    seq = tracker._timer_seq
    keep = loader.keep
    _decision = _target = _candidates = -1
    _hello_size = None
    skipped = others = 0
    for {unpack} in rows:
        listener = listeners[_listener]
        if listener is None:
            skipped += 1
            by_row.append(None)
            continue
        if state not in (PEEKING, CONNECTING, ESTABLISHED):
            raise ValueError(f"state {{state!r}}")
        if len(client_addr) != 4:
            raise ValueError(f"client address {{client_addr.hex()!r}}")
        if keep is not None and not keep(client_addr, client_port):
            others += 1  # another worker's
            by_row.append(None)
            continue
        # As Tracker keys them: bytes 12:20 of the client's IPv4 header and 0:4 of its TCP header.
        key = client_addr + listener_ends[_listener] + pack_port(client_port) + listener_ports[_listener]
        if {complete}:
            c = new(Connection)
            c.listener = listener
            c.client_key = key
            c.hello = c.peeker = None
        else:
            c = Connection(listener, client_addr, client_port, key)
{stores}
{defaults}
        c.decision = None if _decision < 0 else made_decision((_decision, _hello_size)) or decision(_decision, _hello_size)
        clients[key] = c
        if _target >= 0:
            target = c.target = targets[_target]
            c.candidates = candidates[_candidates] if _candidates >= 0 else ()
        else:
            c.target = None
            c.candidates = ()
        # The two rewrites (Tracker._make_flows) are made on the connection's first packet:
        # two objects and forty stores fewer here, for connections that may never send again.
        c.to_host_flow = c.to_client_flow = None
        if state == PEEKING:
            c.host_key = b""
            waiting.append(c)
        else:
            # Bound to a host: its key, as Tracker makes it (host + prefix::client + ports).
            c.host_key = host_key = host + src6 + target_ports[_target] + pack_port(host_sport)
            hosts[host_key] = c
        by_row.append(c)
        seq += 1
        timers.append((c.timer_at, seq, c))
    tracker._timer_seq = seq
    return skipped, others
"""
# The locals the loop uses besides the slots it sets.
_LOOP_LOCALS = ("host", "src6", "host_sport")


def _rows_back_for(names: list[str], complete: bool) -> Any:
    """_ROWS_BACK for a file with these fields (in this order)."""
    unpack = "(" + ", ".join(name if name in _SLOT_FORMATS else f"_{name}" for name in names) + ",)"
    stores = "\n".join(f"        {_load_statement(name)}" for name in names if name in _SLOT_FORMATS)
    # A slot the loop needs that the file lacks: the new connection's value (or AttributeError: damaged).
    defaults = "\n".join(f"        {name} = c.{name}" for name in _LOOP_LOCALS if name not in names) or "        pass"
    source = _ROWS_BACK.format(unpack=unpack, complete=complete, stores=stores, defaults=defaults)
    namespace: dict[str, Any] = {
        "NAN": NAN, "U16": U16, "Connection": Connection, "PEEKING": PEEKING, "CONNECTING": CONNECTING,
        "ESTABLISHED": ESTABLISHED,
    }
    exec(compile(source, "<netstack.state._rows_back>", "exec"), namespace)  # noqa: S102 (our own field names)
    return namespace["_rows_back"]


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


class _Shared:
    """The tables of one snapshot; objects many connections share are looked up by identity first."""

    def __init__(self) -> None:
        self.listeners, self.decisions, self.outcomes, self.candidates = _Table(), _Table(), _Table(), _Table()
        self.targets: list[Target] = []
        self.target_at: dict[int, int] = {}  # id(target) -> index: one Target object is shared per route
        self.decision_at: dict[int, int] = {}  # id(decision) -> index, for the decisions parked ones share

    def target(self, target: Target) -> int:
        t = self.target_at.get(id(target))
        if t is None:
            t = self.target_at[id(target)] = len(self.targets)
            self.targets.append(target)
        return t

    def decision(self, d: Decision) -> int:
        # A tuple hashes faster than the dataclass.
        return self.decisions((d.name, d.alpn, d.records, d.unrouted, d.port))

    def shared_decision(self, d: Decision | None) -> int:
        if d is None:
            return -1
        di = self.decision_at.get(id(d))
        if di is None:
            di = self.decision_at[id(d)] = self.decision(d)
        return di


def snapshot(tracker: Tracker, now: float) -> dict[str, Any]:
    """Everything needed to carry on every connection: a header of JSON-ready data and binary sections."""
    shared = _Shared()
    sections = _pack(tracker, shared, now)
    return {
        "version": VERSION,
        "fields": [list(field) for field in FIELDS],
        "count": len(sections["rows"]) // _ROW.size,
        "parked_fields": [list(field) for field in PARKED_FIELDS],
        "parked_count": len(sections["parked"]) // _PARKED.size,
        "listeners": [[lst.address.hex(), lst.port] for lst in shared.listeners.values],
        # A relay target (kracauer's own bridge relay) says so: the tracker must not answer its CONNECT.
        "targets": [[[h.hex() for h in t.hosts], t.port, t.route] + ([True] if t.relay else [])
                    for t in shared.targets],
        "decisions": [[name, list(alpn), records, unrouted, port]
                      for name, alpn, records, unrouted, port in shared.decisions.values],
        "candidates": [[h.hex() for h in hosts] for hosts in shared.candidates.values],
        "outcomes": shared.outcomes.values,
        "hellos": sections.pop("hellos"),
        "health": [[host.hex(), port, fails, max(until - now, 0.0)]
                   for (host, port), (fails, until) in tracker.health.items()],
        # quic listeners' bound UDP flows (netstack.udptracker.UdpTracker.saved); an older
        # kracauer ignores the key, and their clients' packets are then quic_no_flow.
        "udp_flows": tracker.udp.saved(now) if tracker.udp is not None else [],
        **sections,
    }


def _pack(tracker: Tracker, shared: _Shared, now: float) -> dict[str, Any]:
    """The rows of the tracker's connections and of its parked ones, and the hellos (row, size, ranges; bytes).

    One pass over the client table: with a hundred thousand connections,
    each visit of an object costs more than what is done with it.
    """
    clients = tracker.clients
    rows = bytearray(_ROW.size * len(clients))  # room for all; what parked ones leave is cut off below
    parked_rows = bytearray(_PARKED.size * len(clients))
    hellos: list[list] = []
    hello_data: list[bytes] = []
    pack_into, size, pack = _ROW.pack_into, _ROW.size, _pack_row
    pack_parked, parked_size = _PARKED.pack_into, _PARKED.size
    listener_at: dict[int, int] = {}  # id(listener) -> index (few objects, shared)
    outcome_at, add_outcome = shared.outcomes.index.get, shared.outcomes
    candidates_at, add_candidates = shared.candidates.index.get, shared.candidates
    target_at, add_target = shared.target_at.get, shared.target
    decision, decision_at, shared_decision = shared.decision, shared.decisions.index.get, shared.shared_decision
    parked_decision_at = shared.decision_at.get
    n = p = 0
    for key, conn in clients.items():
        if conn.__class__ is tuple:
            # Carried by the kernel: only what its flow map lacks.
            d, target, host, hello_segments, connect_time = conn
            t = target_at(id(target))
            if t is None:
                t = add_target(target)
            if d is None:
                di = -1
                hs = 0
            else:
                di = parked_decision_at(id(d))  # the tracker shares equal ones between parked connections
                if di is None:
                    di = shared_decision(d)
                hs = d.hello_size
            pack_parked(parked_rows, p * parked_size, key, di, hs, t, host, hello_segments,
                        NAN if connect_time is None else connect_time)
            p += 1
            continue
        if conn.state in (GONE, REFUSING):
            continue  # (a refusal is already answered; the client will close)
        listener = conn.listener
        li = listener_at.get(id(listener))
        if li is None:
            li = listener_at[id(listener)] = shared.listeners(listener)
        target = conn.target
        if target is None:
            t = ci = -1
        else:
            t = target_at(id(target))
            if t is None:
                t = add_target(target)
            ci = candidates_at(conn.candidates)
            if ci is None:
                ci = add_candidates(conn.candidates)
        # Each connection has its own Decision (equal ones are kept once).
        d = conn.decision
        if d is None:
            di = -1
            hs = 0
        else:
            # (A tuple hashes faster than the dataclass.)
            di = decision_at((d.name, d.alpn, d.records, d.unrouted, d.port))
            if di is None:
                di = decision(d)
            hs = d.hello_size
        oi = outcome_at(conn.outcome)
        if oi is None:
            oi = add_outcome(conn.outcome)
        try:
            pack(pack_into, rows, n * size, conn, now, oi, li, di, hs, t, ci)
        except AttributeError:  # still peeking or connecting: some slots were never set
            _pack_unset_row(pack_into, rows, n * size, conn, now, oi, li, di, hs, t, ci)
        if conn.hello is not None:
            data = bytes(conn.hello.data)
            hellos.append([n, len(data), conn.hello.ranges])
            hello_data.append(data)
        n += 1
    del rows[n * size:]
    del parked_rows[p * parked_size:]
    return {"hellos": hellos, "rows": rows, "parked": parked_rows, "hello_data": b"".join(hello_data)}


# ---------------------------------------------------------------- the file

def encode(state: dict[str, Any]) -> bytes:
    """The file for `state`: its JSON entries as the header line, then its binary ones as sections."""
    header = {}
    sections = []
    for name, value in state.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            sections.append((name, value))
        else:
            header[name] = value
    if sections:
        header["sections"] = [[name, len(value)] for name, value in sections]
    return b"".join([json.dumps(header, separators=(",", ":")).encode(), b"\n", *(value for _, value in sections)])


def decode(data: bytes) -> dict[str, Any]:
    """The state in a file's bytes (the reverse of encode; a version 2 file is its JSON object alone)."""
    end = data.find(b"\n")
    if end < 0:
        end = len(data)
    try:
        state = json.loads(data[:end])
    except ValueError as exc:
        raise StateError(f"not a state file: {exc}") from None
    if not isinstance(state, dict):
        raise StateError("not a state file: it does not start with a JSON object")
    view = memoryview(data)
    at = end + 1
    sections = state.pop("sections", [])
    if not isinstance(sections, list):
        raise StateError("the state file's section list is damaged")
    for section in sections:
        if not (isinstance(section, list) and len(section) == 2 and isinstance(section[0], str)
                and isinstance(section[1], int) and section[1] >= 0 and section[0] not in state):
            raise StateError(f"the state file's section list is damaged: {section!r}")
        name, size = section
        if at + size > len(data):
            raise StateError(f"the state file is truncated: its section {name!r} needs {size} bytes, "
                             f"{max(len(data) - at, 0)} are left")
        state[name] = view[at:at + size]
        at += size
    if at < len(data) and (sections or data[at:].strip()):
        raise StateError(f"the state file has {len(data) - at} bytes after its last section")
    return state


# ---------------------------------------------------------------- restoring

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
    if version not in READS:
        raise StateError(f"the state file has format version {version!r}, this kracauer reads versions "
                         f"{' and '.join(map(str, READS))} only; its connections cannot be carried over")
    if tracker.clients and keep is None:
        raise StateError("the tracker already has connections")
    # A hundred thousand new objects would set off collections that walk them
    # all again and again (more than halves the time); none of them is garbage.
    collecting = gc.isenabled()
    gc.disable()
    # What the tracker held before (an earlier shard's connections, with `keep`): a damaged file
    # takes back only what it added.
    before = _Tables(tracker)
    try:
        loader = _Loader(tracker, state, now, keep)
        restored = loader.run() + loader.parked()
        for host, port, fails, left in state.get("health", []):
            tracker.health[(bytes.fromhex(host), int(port))] = (int(fails), now + float(left) if left else 0.0)
        udp_flows = state.get("udp_flows", [])
        if udp_flows and tracker.udp is not None:
            udp_restored, udp_skipped = tracker.udp.restore(udp_flows, now, keep)
            restored += udp_restored
            if udp_skipped:
                tracker.events["state_skipped"] += udp_skipped
        elif udp_flows:
            tracker.events["state_skipped"] += len(udp_flows)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, struct.error, binascii.Error) as exc:
        before.put_back(tracker)
        if isinstance(exc, StateError):
            raise
        raise StateError(f"saved state is damaged: {exc!r}") from exc
    finally:
        if collecting:
            gc.enable()
    return restored


class _Tables:
    """The tracker's tables as they were before a restore, to go back to if the file is damaged."""

    def __init__(self, tracker: Tracker) -> None:
        self.clients = dict(tracker.clients)
        self.hosts = dict(tracker.hosts)
        self.peeking = dict(tracker.peeking)
        self.timers = list(tracker._timers)
        self.half_open = tracker.half_open
        self.in_kernel = tracker.in_kernel
        self.health = dict(tracker.health)

    def put_back(self, tracker: Tracker) -> None:
        for name in ("clients", "hosts", "peeking", "health"):
            table = getattr(tracker, name)
            table.clear()
            table.update(getattr(self, name))
        tracker._timers[:] = self.timers
        heapq.heapify(tracker._timers)
        tracker.half_open = self.half_open
        tracker.in_kernel = self.in_kernel


def _check_fields(fields: list[tuple], known: dict[str, str], required: Iterable[str]) -> None:
    """StateError unless every field is known, with the format this kracauer has, once; and `required` are there."""
    names = [name for name, _ in fields]
    if len(set(names)) != len(names):
        raise StateError("the state file's field list names a field twice")
    for name, fmt in fields:
        if name not in known:
            raise StateError(f"the state file has a field this kracauer does not know: {name}")
        if fmt != known[name]:
            raise StateError(f"the state file saves {name} as {fmt!r}, this kracauer as {known[name]!r}")
    for name in required:
        if name not in names:
            raise StateError(f"the state file lacks the field {name!r}")


def _rows(data: Any, row: struct.Struct, count: int, what: str) -> Any:
    if len(data) != count * row.size:
        raise StateError(f"the state file has {len(data)} bytes of {what} for {count} connections "
                         f"of {row.size} bytes")
    return data


class _Loader:
    """Rows back into connections, read with the file's own field list."""

    def __init__(self, tracker: Tracker, state: dict[str, Any], now: float,
                 keep: Callable[[bytes, int], bool] | None = None) -> None:
        self.tracker = tracker
        self.now = now
        self.keep = keep
        fields = [tuple(field) for field in state["fields"]]
        _check_fields(fields, dict(FIELDS), ("client_addr", "client_port", "state", "listener"))
        self.names = [name for name, _ in fields]
        self.complete = fields == list(FIELDS)
        self.row = struct.Struct("<" + "".join(fmt for _, fmt in fields))
        self.count = int(state["count"])
        self.listeners = [tracker.listeners.get(bytes.fromhex(address) + U16.pack(int(port)))
                          for address, port in state["listeners"]]
        self.targets = []
        for hosts, port, route, *relay in state["targets"]:
            if relay not in ([], [True]):
                raise ValueError(f"a target's fourth value is {relay!r}, not true")
            packed = tuple(bytes.fromhex(h) for h in hosts)
            self.targets.append(Target(packed[0], int(port), str(route), packed, relay=bool(relay)))
        self.candidates = [tuple(bytes.fromhex(h) for h in hosts) for hosts in state["candidates"]]
        self.outcomes = [str(outcome) for outcome in state["outcomes"]]
        if state["version"] == 2:
            self._version_2(state)
        else:
            self._version_3(state)

    def _version_3(self, state: dict[str, Any]) -> None:
        # A decision is made for each (table entry, hello_size) that rows name.
        self.decisions = [(name, tuple(alpn), int(records), str(unrouted), None if port is None else int(port))
                          for name, alpn, records, unrouted, port in state["decisions"]]
        self.made: dict[tuple[int, int | None], Decision] = {}
        self.rows = _rows(state["rows"], self.row, self.count, "rows")
        if [tuple(field) for field in state["parked_fields"]] != list(PARKED_FIELDS):
            raise StateError(f"the state file saves parked connections as {state['parked_fields']!r}, "
                             f"this kracauer as {[list(f) for f in PARKED_FIELDS]!r}")
        self.saved_parked = _PARKED.iter_unpack(_rows(state["parked"], _PARKED, int(state["parked_count"]),
                                                      "parked connections"))
        data = bytes(state["hello_data"])
        self.hellos = {}
        at = 0
        for n, size, ranges in state["hellos"]:
            if size < 0 or at + size > len(data):
                raise StateError("the state file's hellos do not fit its hello_data section")
            self.hellos[int(n)] = (data[at:at + size], ranges)
            at += size

    def _version_2(self, state: dict[str, Any]) -> None:
        """The same rows in base64, the parked connections and hellos as JSON lists (kracauer before version 3)."""
        # Whole decisions in the table (hello_size too), made once each.
        self.decisions = []
        self.made = {(i, None): Decision(name, tuple(alpn), int(size), int(records), str(unrouted))
                     for i, (name, alpn, size, records, unrouted) in enumerate(state["decisions"])}
        self.rows = _rows(base64.b64decode(state["rows"], validate=True), self.row, self.count, "rows")
        self.saved_parked = [(bytes.fromhex(key), d, None, t, bytes.fromhex(host), hello_segments,
                              NAN if connect_time is None else connect_time)
                             for key, d, t, host, hello_segments, connect_time in state.get("parked", [])]
        for key, *_ in self.saved_parked:
            if len(key) != 12:
                raise ValueError(f"parked connection key {key.hex()!r}")
        self.hellos = {int(n): (bytes.fromhex(data), ranges) for n, (data, ranges) in state.get("hellos", {}).items()}

    def run(self) -> int:
        names = self.names
        slots = [name for name in names if name in _SLOT_FORMATS]
        if list(names[:len(slots)]) != slots:
            raise StateError("the state file's slots must come before its table indexes")
        tracker = self.tracker
        self.by_row: list[Connection | None] = []  # for the hellos
        self.waiting: list[Connection] = []  # still peeking, in the order they came
        skipped, others = _rows_back_for(names, self.complete)(self.row.iter_unpack(self.rows), self.now, self,
                                                               tracker)
        for n, (data, ranges) in self.hellos.items():
            conn = self.by_row[n]
            if conn is not None:
                self._hello(conn, data, ranges)
        for conn in self.waiting:
            self._peeking(conn)
        if skipped:
            tracker.events["state_skipped"] += skipped
        heapq.heapify(tracker._timers)
        return self.count - skipped - others

    def parked(self) -> int:
        """Connections the kernel carries, back as parked records (rebuilt from the map when needed)."""
        tracker = self.tracker
        clients, listeners = tracker.clients, tracker.listeners
        made_decision, decision, targets = self.made.get, self.decision, self.targets
        # Whether a key's service address and port are a listener's, by key[4:12] (which adds the client
        # port): one slice per row rather than two and a concatenation.
        served: dict[bytes, bool] = {}
        # Parked connections to one host share its address (a hundred thousand copies are felt in memory).
        same_host: dict[bytes, bytes] = {}
        keep = self.keep
        restored = skipped = 0
        for key, d, hello_size, t, host, hello_segments, connect_time in self.saved_parked:
            middle = key[4:12]
            ours = served.get(middle)
            if ours is None:
                ours = served[middle] = middle[:4] + middle[6:] in listeners
            if not ours:
                skipped += 1
                continue
            if keep is not None and not keep(key[:4], U16.unpack(key[8:10])[0]):
                continue  # another worker's
            if t < 0:
                raise ValueError(f"parked connection {key.hex()!r} without a target")
            clients[key] = (None if d < 0 else made_decision((d, hello_size)) or decision(d, hello_size), targets[t],
                            same_host.setdefault(host, host), hello_segments,
                            None if connect_time != connect_time else connect_time)
            restored += 1
        tracker.in_kernel += restored
        if skipped:
            tracker.events["state_skipped"] += skipped
        return restored

    def decision(self, d: int, hello_size: int | None) -> Decision:
        """Table entry `d` with this hello_size (None: the entry's own, version 2), made once for all rows."""
        name, alpn, records, unrouted, port = self.decisions[d]
        made = self.made[(d, hello_size)] = Decision(name, alpn, int(hello_size), records, unrouted, port)
        return made

    def _hello(self, conn: Connection, data: bytes, ranges: list) -> None:
        conn.hello = StreamBuffer(self.tracker.config.hello_max_bytes)
        conn.hello.data = bytearray(data)
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

    Entries of UDP flows (``key_l4``) are quic listeners' bound flows
    (netstack.udptracker), adopted by ``UdpTracker.adopt`` the same way, in
    pairs.
    """
    entries = dict(entries)
    adopted = 0
    keep: set[bytes] = set()
    for key, up in entries.items():
        if key_l4(key) == L4_UDP:
            continue
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
    adopted += _adopt_udp(tracker, entries, keep, now)
    return adopted, [key for key in entries if key not in keep]


def _adopt_udp(tracker: Tracker, entries: dict[bytes, Flow], keep: set[bytes], now: float) -> int:
    """adopt() for the UDP entries: each client-side entry with its host-side one; both keys go in `keep`
    when the flow is the tracker's (adopted now, or restored from the state file)."""
    udp = tracker.udp
    if udp is None:
        return 0
    adopted = 0
    for key, up in entries.items():
        if key_l4(key) != L4_UDP:
            continue
        src, dst, sport, dport = split_key(key)
        if len(src) != 4:
            continue
        host_key = flow_key(up.dst, up.src, up.dport.to_bytes(2, "big") + up.sport.to_bytes(2, "big"), L4_UDP)
        down = entries.get(host_key)
        if down is None:
            continue
        client_key = src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
        known = udp.flows.get(client_key)
        if known is not None and known.kernel == KERNEL_IN:
            keep.update((key, host_key))  # restored from the state file, in the kernel still
        elif known is None and udp.adopt(client_key, up, down, now):
            keep.update((key, host_key))
            adopted += 1
    return adopted
