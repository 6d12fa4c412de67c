"""Saving the tracker and restoring it in a new process: connections carry on (issue #5)."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import pathlib
import random
import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack.peek import Decision
from netstack.reassembly import StreamBuffer
from netstack.state import FIELDS, PARKED_FIELDS, VERSION, StateError, decode, encode, restore, snapshot
from netstack.tracker import CONNECTING, ESTABLISHED, PEEKING, Connection, Target, Tracker, TrackerConfig
from tests.test_tracker import CHROME, CHROME_META, LISTENERS, PREFIX, Box, Walk, resolve

DATA = pathlib.Path(__file__).parent / "data"
TIMES = ("start", "last_seen", "timer_at", "connect_start", "host_start", "rst_at")


def through_a_file(state: dict) -> dict:
    """What the next process reads: the state encoded as the file's bytes and decoded again."""
    return decode(bytes(encode(state)))


def restart(box: Box, clock_jump: float = 5000.0) -> Box:
    """Snapshot through the file's bytes into a fresh tracker whose monotonic clock reads something else entirely."""
    saved = through_a_file(snapshot(box.tracker, box.now))
    new = Box()
    new.now = box.now + clock_jump  # another process, another monotonic origin
    rng = random.Random(99)
    new.tracker = Tracker(TrackerConfig(prefix=PREFIX), LISTENERS, resolve, lambda: rng.getrandbits(32))
    assert restore(new.tracker, saved, new.now) == len(box.tracker.clients)
    return new


def shift(walk: Walk, box: Box, old_now: float) -> None:
    """The walk's notion of when things happened, moved onto the new clock."""
    walk.synack_at += box.now - old_now
    walk.splice_at += box.now - old_now
    walk.box = box


def test_established_connection_translates_identically_after_a_restart():
    box = Box()
    walk = Walk(box)
    walk.establish()
    before = walk.from_host("PA", walk.h + 1, walk.c + 1 + len(CHROME), b"abc", host_tick=30)[0]
    old_now = box.now
    new = restart(box)
    shift(walk, new, old_now)
    after = walk.from_host("PA", walk.h + 4, walk.c + 1 + len(CHROME), b"def", host_tick=30)[0]
    assert after.tcp.seq == before.tcp.seq + 3
    assert after.ts[0] == before.ts[0]  # the host's clock, shifted by the same offset as before
    assert (after.ip.src, after.ip.dst, after.tcp.sport, after.tcp.dport) == \
        (before.ip.src, before.ip.dst, before.tcp.sport, before.tcp.dport)
    up = walk.from_client("A", walk.c + 1 + len(CHROME), walk.k + 7)[0]
    assert up.tcp.ack == (walk.h + 7) & 0xFFFFFFFF
    assert new.tracker.clients and next(iter(new.tracker.clients.values())).state == ESTABLISHED


def test_connection_still_peeking_finishes_its_hello_after_a_restart():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    assert walk.send_hello(CHROME, [(0, CHROME[:900])]) == []
    old_now = box.now
    new = restart(box)
    shift(walk, new, old_now)
    assert next(iter(new.tracker.clients.values())).state == PEEKING
    assert len(new.tracker.peeking) == 1
    out = walk.from_client("PA", walk.c + 1 + 900, walk.k + 1, CHROME[900:])
    syn = walk.expect_host_syn(out)
    assert syn.tcp.seq == walk.c & 0xFFFFFFFF
    replay = walk.host_synack()
    assert b"".join(r.payload for r in replay) == CHROME


def test_connection_waiting_for_the_host_keeps_waiting_after_a_restart():
    box = Box()
    walk = Walk(box)
    walk.handshake()
    walk.expect_host_syn(walk.send_hello(CHROME))
    old_now = box.now
    new = restart(box)
    shift(walk, new, old_now)
    assert next(iter(new.tracker.clients.values())).state == CONNECTING
    # Its SYN retransmission timer survived the move.
    retry = new.wait(1.5)
    assert len(retry) == 1 and retry[0].flags == "S"
    assert b"".join(r.payload for r in walk.host_synack()) == CHROME


def test_damaged_or_foreign_state_is_refused_and_leaves_the_tracker_empty():
    box = Box()
    walk = Walk(box)
    walk.establish()
    saved = snapshot(box.tracker, box.now)
    fresh = Box().tracker
    with pytest.raises(StateError):
        restore(fresh, {"version": 99, "connections": []}, 0.0)
    broken = through_a_file(saved)
    broken["rows"] = broken["rows"][:-8]
    with pytest.raises(StateError):
        restore(fresh, broken, 0.0)
    broken = through_a_file(saved)
    broken["targets"] = []
    with pytest.raises(StateError):
        restore(fresh, broken, 0.0)
    assert not fresh.clients and not fresh.hosts and fresh.next_timer() is None


def test_connections_of_a_listener_that_is_gone_are_skipped():
    box = small_box()  # all four, the parked one too, on 192.0.2.10:443
    saved = snapshot(box.tracker, box.now)
    rng = random.Random(5)
    other = Tracker(TrackerConfig(prefix=PREFIX), LISTENERS[2:], resolve, lambda: rng.getrandbits(32))
    assert restore(other, saved, 0.0) == 0
    assert other.events["state_skipped"] == 4
    assert not other.clients and not other.hosts and not other.peeking and other.in_kernel == 0


# -- the format ---------------------------------------------------------------------


V6_WWW = bytes.fromhex("20010db8000000000000000000000010")
V6_ORG = bytes.fromhex("20010db8000000000000000000000020")


def small_box() -> Box:
    """One connection of each kind (established, still peeking, waiting for its host, carried by the kernel)
    and a failing host. tests/data/state-v2.json is what kracauer wrote for it in format version 2 (commit
    8b4ca32, whose tracker chose other sequence numbers)."""
    box = Box()
    Walk(box, sport=40000).establish()
    peeking = Walk(box, sport=40001)
    peeking.handshake()
    peeking.send_hello(CHROME, [(0, CHROME[:900])])
    connecting = Walk(box, sport=40002)
    connecting.handshake()
    connecting.expect_host_syn(connecting.send_hello(CHROME))
    # 198.51.100.9:40003 -> 192.0.2.10:443, parked.
    key = bytes.fromhex("c6336409c000020a") + (40003).to_bytes(2, "big") + (443).to_bytes(2, "big")
    box.tracker.clients[key] = (Decision("www.example.com", ("h2",), 1758, 1), Target(V6_WWW, 443, "www"), V6_WWW,
                                2, 0.0125)
    box.tracker.in_kernel += 1
    box.tracker.health[(V6_ORG, 8443)] = (2, box.now + 12.5)
    return box


def copy_connection(model: Connection, box: Box, i: int, rng: random.Random) -> Connection:
    """`model` for another client (198.51.100.2 + i), with its own numbers and times."""
    tracker = box.tracker
    conn = Connection(model.listener, b"", 0, b"")
    for slot in Connection.__slots__:
        if hasattr(model, slot):
            setattr(conn, slot, getattr(model, slot))
    conn.client_addr = (int.from_bytes(model.client_addr, "big") + i).to_bytes(4, "big")
    conn.client_key = conn.client_addr + model.client_key[4:]
    for slot in ("client_isn", "our_isn", "client_tsval", "ts_base"):
        setattr(conn, slot, rng.getrandbits(32))
    conn.start = box.now - rng.uniform(0.0, 100.0)
    conn.last_seen = box.now - rng.uniform(0.0, 10.0)
    conn.timer_at = box.now + rng.uniform(0.0, 10.0)
    if model.decision is not None:
        conn.decision = Decision(model.decision.name, model.decision.alpn, rng.randrange(500, 2000), 1)
    if model.hello is not None:
        conn.hello = StreamBuffer(model.hello.capacity)
        conn.hello.data = bytearray(model.hello.data)
        conn.hello.ranges = [list(r) for r in model.hello.ranges]
    if model.state == PEEKING:
        tracker.peeking[conn.client_key] = conn
        tracker.half_open += not conn.acked
    else:
        conn.src6 = model.src6[:12] + conn.client_addr
        conn.host_key = conn.host + conn.src6 + model.host_key[32:]
        tracker.hosts[conn.host_key] = conn
    if model.state == ESTABLISHED:
        conn.delta, conn.ts_off = rng.getrandbits(32), rng.getrandbits(32)
        conn.client_wscale = rng.choice((None, 0, 7, 14))
        conn.client_ts = conn.host_ts = rng.random() < 0.5
        conn.packets_to_host, conn.packets_to_client = rng.randrange(2**40), rng.randrange(2**40)
        conn.outcome = rng.choice(("", "", "closed", "reset_by_client"))
        tracker._make_flows(conn)  # its own rewrite, for its own addresses
    tracker._set_timer(conn, conn.timer_at)
    return conn


def mixed_box(connections: int, seed: int = 3) -> Box:
    """`connections` of every kind, each copied from a walked one with numbers of its own."""
    model_box = small_box()
    models = [c for c in model_box.tracker.clients.values() if c.__class__ is Connection]
    parked_model = next(c for c in model_box.tracker.clients.values() if c.__class__ is tuple)
    box = Box(max_connections=connections)
    box.now = model_box.now
    rng = random.Random(seed)
    for i in range(connections):
        kind = rng.choice(("established", "established", "parked", "parked", "peeking", "connecting"))
        if kind == "parked":
            key = (0xC6336402 + i).to_bytes(4, "big") + bytes.fromhex("c000020a") + rng.randbytes(2) \
                + (443).to_bytes(2, "big")
            decision = Decision("www.example.com", ("h2",), rng.randrange(500, 2000), 1)
            box.tracker.clients[key] = (box.tracker._decisions.setdefault(decision, decision), *parked_model[1:3],
                                        rng.randrange(1, 4), rng.choice((None, rng.uniform(0.0, 1.0))))
            box.tracker.in_kernel += 1
            continue
        model = next(m for m in models if m.state == {"established": ESTABLISHED, "peeking": PEEKING,
                                                        "connecting": CONNECTING}[kind])
        conn = copy_connection(model, box, i, rng)
        box.tracker.clients[conn.client_key] = conn
    return box


def assert_same_tracker(old: Box, new: Box) -> None:
    """Every connection came back as it was, in every table, its times moved to the new clock."""
    a, b = old.tracker, new.tracker
    assert set(b.clients) == set(a.clients) and len(b.clients) == len(a.clients)
    assert list(b.peeking) == list(a.peeking) and b.half_open == a.half_open and b.in_kernel == a.in_kernel
    assert {k: v.client_key for k, v in b.hosts.items()} == {k: v.client_key for k, v in a.hosts.items()}
    for key, conn in a.clients.items():
        copy = b.clients[key]
        if conn.__class__ is tuple:
            assert copy == conn
            continue
        for slot in Connection.__slots__:
            if slot in TIMES:
                was = getattr(conn, slot, 0.0)
                assert (getattr(copy, slot) - new.now if was else 0.0) == pytest.approx(was - old.now if was else 0.0)
            elif slot == "hello":
                assert (copy.hello is None) == (conn.hello is None), key
                if conn.hello is not None:
                    assert (copy.hello.data, copy.hello.ranges) == (conn.hello.data, conn.hello.ranges)
            elif slot == "peeker":  # rebuilt for those still peeking; the others are done with it
                assert (copy.peeker is None) == (conn.peeker is None or conn.state != PEEKING), key
            elif slot in ("to_host_flow", "to_client_flow"):
                # Made on the connection's first packet (Tracker._make_flows), from the restored slots.
                assert getattr(copy, slot) is None, (key, slot)
            elif hasattr(conn, slot):
                assert getattr(copy, slot) == getattr(conn, slot), (key, slot)
            else:  # never set (the host side of one still peeking): a new connection's value
                assert getattr(copy, slot) in (0, b""), (key, slot)
    due = sorted((round(at - old.now, 6), c.client_key) for at, _, c in a._timers if c.timer_at == at)
    assert sorted((round(at - new.now, 6), c.client_key) for at, _, c in b._timers) == due


def established_box(connections: int) -> Box:
    """A tracker with `connections` established connections: one walked, the rest its copies from other clients."""
    box = Box(max_connections=max(connections, 1))
    walk = Walk(box)
    walk.establish()
    [model] = box.tracker.clients.values()
    rng = random.Random(4)
    for i in range(1, connections):
        conn = copy_connection(model, box, i, rng)
        box.tracker.clients[conn.client_key] = conn
    return box


def header_of(data: bytes) -> dict:
    return json.loads(data[:data.index(b"\n")])


def test_the_file_is_a_json_header_naming_each_field_once_then_raw_rows():
    box = established_box(50)
    data = encode(snapshot(box.tracker, box.now))
    header = header_of(data)
    assert header["version"] == VERSION == 3
    assert [tuple(field) for field in header["fields"]] == list(FIELDS)
    assert [tuple(field) for field in header["parked_fields"]] == list(PARKED_FIELDS)
    assert header["count"] == 50 and header["parked_count"] == 0
    row_size = struct.calcsize("<" + "".join(fmt for _, fmt in FIELDS))
    assert header["sections"] == [["rows", 50 * row_size], ["parked", 0], ["hello_data", 0]]
    assert len(data) == data.index(b"\n") + 1 + 50 * row_size
    # One listener, target, decision and outcome table entry however many connections use them (each
    # connection's hello size is in its row).
    assert header["listeners"] == [["c000020a", 443]]
    assert header["targets"] == [[["20010db8000000000000000000000010"], 443, "www"]]
    assert header["decisions"] == [[CHROME_META["sni"], CHROME_META["alpn"], 1, "refused_unknown_name", None]]
    assert header["candidates"] == [[]] and header["hellos"] == []
    assert data.count(b'"delta"') == 1 and data.count(b"c000020a") == 1
    # A row is about 270 bytes of numbers, and nothing else grows with the connections.
    assert row_size < 280
    more = encode(snapshot(established_box(500).tracker, box.now))
    assert len(more) - 500 * row_size - len(data) + 50 * row_size < 100


def test_the_rows_decode_with_the_field_list_alone():
    box = established_box(3)
    [first, *_] = box.tracker.clients.values()
    data = encode(snapshot(box.tracker, box.now))
    header = header_of(data)
    row = struct.Struct("<" + "".join(fmt for _, fmt in header["fields"]))
    values = dict(zip((name for name, _ in header["fields"]), row.unpack_from(data, data.index(b"\n") + 1)))
    assert values["client_addr"] == first.client_addr and values["client_port"] == first.client_port
    assert values["delta"] == first.delta and values["src6"] == first.src6 and values["state"] == ESTABLISHED
    assert values["last_seen"] == pytest.approx(box.now - first.last_seen)  # an age
    assert (values["listener"], values["target"], values["decision"]) == (0, 0, 0)


def test_2000_connections_of_every_kind_come_back_as_they_were():
    box = mixed_box(2000)
    kinds = {c.state if c.__class__ is Connection else "parked" for c in box.tracker.clients.values()}
    assert kinds == {ESTABLISHED, CONNECTING, PEEKING, "parked"}
    new = restart(box)
    assert_same_tracker(box, new)
    # The restored copy is itself saved as it was read.
    again = restart(new, clock_jump=-300.0)
    assert_same_tracker(box, again)


def test_the_rewrites_come_back_as_they_were_once_made_from_the_restored_slots():
    box = mixed_box(300, seed=8)
    new = restart(box)
    established = [key for key, conn in box.tracker.clients.items()
                   if conn.__class__ is Connection and conn.state == ESTABLISHED]
    assert established
    for key in established:
        conn, copy = box.tracker.clients[key], new.tracker.clients[key]
        assert copy.to_host_flow is None and copy.to_client_flow is None
        new.tracker._make_flows(copy)
        assert (copy.to_host_flow, copy.to_client_flow) == (conn.to_host_flow, conn.to_client_flow)


def test_a_version_2_file_as_the_previous_kracauer_wrote_it_is_still_read():
    saved = decode((DATA / "state-v2.json").read_bytes())
    assert saved["version"] == 2 and isinstance(saved["rows"], str)  # base64 inside one JSON object
    new = Box()
    new.now = 6000.0
    assert restore(new.tracker, saved, new.now) == 4
    tracker = new.tracker
    kinds = {int.from_bytes(key[8:10], "big"): conn if conn.__class__ is tuple else conn.state
             for key, conn in tracker.clients.items()}
    assert kinds == {40000: ESTABLISHED, 40001: PEEKING, 40002: CONNECTING,
                     40003: (Decision("www.example.com", ("h2",), 1758, 1), Target(V6_WWW, 443, "www"), V6_WWW, 2,
                             0.0125)}
    established, peeking, connecting = (next(c for c in tracker.clients.values() if c.__class__ is Connection
                                             and c.state == state) for state in (ESTABLISHED, PEEKING, CONNECTING))
    assert established.decision.name == CHROME_META["sni"] and established.decision.hello_size == len(CHROME) - 5
    assert bytes(peeking.hello.data) == CHROME[:900] and peeking.peeker is not None
    assert list(tracker.peeking) == [peeking.client_key] and tracker.hosts[connecting.host_key] is connecting
    assert established.to_host_flow is None  # made on its first packet
    tracker._make_flows(established)
    assert established.to_host_flow.ack_add == established.delta
    assert established.to_client_flow.seq_add == -established.delta & 0xFFFFFFFF
    assert tracker.health == {(V6_ORG, 8443): (2, pytest.approx(new.now + 12.5))}
    # Saved again, in this format, it comes back the same.
    assert_same_tracker(new, restart(new))


def test_an_older_or_unknown_version_is_refused_clearly():
    saved = through_a_file(snapshot(established_box(1).tracker, 0.0))
    for version in (1, 4, None):
        saved["version"] = version
        with pytest.raises(StateError, match=rf"format version {version!r}, this kracauer reads versions 2 and 3 only"):
            restore(Box().tracker, saved, 0.0)


def test_a_version_1_file_as_kracauer_wrote_it_before_is_refused():
    old = json.dumps({"version": 1, "connections": [{"listener": ["c000020a", 443], "client_addr": "c6336402"}],
                      "health": []}).encode()
    with pytest.raises(StateError, match="format version 1"):
        restore(Box().tracker, decode(old), 0.0)


@pytest.mark.parametrize("damage, message", [
    # The hellos of the one peeking (900 bytes so far) and of the one connecting (all of it, until replayed).
    (lambda data: data[:-1], f"truncated: its section 'hello_data' needs {900 + len(CHROME)} bytes, "
                             f"{899 + len(CHROME)} are left"),
    (lambda data: data[:data.index(b"\n") + 11], "truncated: its section 'rows' needs 807 bytes, 10 are left"),
    (lambda data: data + b"\0", "1 bytes after its last section"),
    (lambda data: b"", "not a state file"),
    (lambda data: b"\x89PNG\r\n", "not a state file"),
    (lambda data: b"[3]\n", "does not start with a JSON object"),
    (lambda data: data.replace(b'["rows",', b'["count",', 1), "section list is damaged"),
    (lambda data: data.replace(b'"sections":[', b'"sections":[["rows",-1],', 1), "section list is damaged"),
])
def test_a_damaged_file_is_refused_with_what_is_wrong(damage, message):
    data = encode(snapshot(small_box().tracker, 1000.0))
    with pytest.raises(StateError, match=message):
        decode(damage(data))


def test_damaged_tables_and_sections_are_refused_and_leave_the_tracker_empty():
    saved = through_a_file(snapshot(small_box().tracker, 1000.0))
    cases = {
        "hello_data": (lambda s: s.update(hello_data=s["hello_data"][:100]), "hellos do not fit"),
        "parked": (lambda s: s.update(parked=s["parked"][:-1]), "bytes of parked connections for 1 connections"),
        "parked_fields": (lambda s: s["parked_fields"].reverse(), "saves parked connections as"),
        "count": (lambda s: s.update(count=4), "bytes of rows for 4 connections"),
        "decisions": (lambda s: s.update(decisions=[]), "damaged"),
        "state": (lambda s: s.update(rows=b"\x04\xc6\x33\x64\x02\x40\x9c\x09" + bytes(s["rows"][8:])), "state 9"),
    }
    for name, (damage, message) in cases.items():
        broken = dict(saved, parked_fields=[list(f) for f in saved["parked_fields"]])
        damage(broken)
        fresh = Box().tracker
        with pytest.raises(StateError, match=message):
            restore(fresh, broken, 0.0)
        assert not fresh.clients and not fresh.hosts and not fresh.peeking and fresh.next_timer() is None, name
        assert fresh.in_kernel == fresh.half_open == 0


def test_unknown_fields_and_other_formats_are_refused():
    saved = through_a_file(snapshot(established_box(2).tracker, 0.0))
    unknown = dict(saved, fields=[list(f) for f in saved["fields"]])
    unknown["fields"][-1][0] = "frobnication"
    with pytest.raises(StateError, match="a field this kracauer does not know: frobnication"):
        restore(Box().tracker, unknown, 0.0)
    other = dict(saved, fields=[list(f) for f in saved["fields"]])
    other["fields"][other["fields"].index(["delta", "I"])][1] = "Q"
    with pytest.raises(StateError, match="saves delta as 'Q', this kracauer as 'I'"):
        restore(Box().tracker, other, 0.0)


@pytest.mark.parametrize("lacking", ["hello_segments", "ts_off"])
def test_a_field_the_file_lacks_keeps_the_new_connections_default(lacking):
    saved = through_a_file(snapshot(established_box(2).tracker, 1000.0))
    fields = [tuple(field) for field in saved["fields"]]
    at = [name for name, _ in fields].index(lacking)
    old, new = struct.Struct("<" + "".join(f for _, f in fields)), \
        struct.Struct("<" + "".join(f for i, (_, f) in enumerate(fields) if i != at))
    saved["rows"] = b"".join(new.pack(*(v for i, v in enumerate(values) if i != at))
                             for values in old.iter_unpack(saved["rows"]))
    saved["fields"] = [list(field) for i, field in enumerate(fields) if i != at]
    fresh = Box().tracker
    assert restore(fresh, saved, 0.0) == 2
    assert all(getattr(conn, lacking) == 0 and conn.state == ESTABLISHED for conn in fresh.clients.values())
    # The rewrites are made with that value too.
    for conn in fresh.clients.values():
        fresh._make_flows(conn)
        assert conn.to_host_flow.tsecr_add == conn.ts_off


def test_a_restored_copy_translates_like_the_original():
    box = established_box(3)
    new = restart(box)
    for key, conn in box.tracker.clients.items():
        copy = new.tracker.clients[key]
        assert new.tracker.hosts[conn.host_key] is copy
        for slot in Connection.__slots__:
            if slot in ("peeker", "hello", "to_host_flow", "to_client_flow") or slot in TIMES:
                continue
            assert getattr(copy, slot, None) == getattr(conn, slot, None), slot
        assert copy.timer_at - new.now == pytest.approx(conn.timer_at - box.now)
        # Its first packets each way (which make its rewrites) come out as the original's do.
        for packet in (data_from_client(conn, b"more of the request"), data_from_host(conn, b"the answer")):
            out_old = [bytes(p) for p in box.tracker.receive(bytes(packet), box.now)]
            out_new = [bytes(p) for p in new.tracker.receive(bytes(packet), new.now)]
            assert out_new == out_old and out_old
        assert (copy.to_host_flow, copy.to_client_flow) == (conn.to_host_flow, conn.to_client_flow)


def data_from_client(conn: Connection, payload: bytes):
    """The client's next segment: in order, acknowledging what it has."""
    return (IP(src=str(ipaddress.IPv4Address(conn.client_addr)), dst=str(ipaddress.IPv4Address(conn.listener.address)))
            / TCP(sport=conn.client_port, dport=conn.listener.port, seq=conn.client_nxt, ack=conn.client_ack,
                  flags="PA", window=conn.client_win) / payload)


def data_from_host(conn: Connection, payload: bytes):
    """The host's next segment, in its own sequence space (ours plus delta)."""
    return (IPv6(src=str(ipaddress.IPv6Address(conn.host)), dst=str(ipaddress.IPv6Address(conn.src6)))
            / TCP(sport=conn.target.port, dport=conn.host_sport, seq=(conn.host_nxt + conn.delta) & 0xFFFFFFFF,
                  ack=conn.host_ack, flags="PA", window=conn.host_win) / payload)


def test_the_state_benchmark_runs(tmp_path):
    """scripts/bench_state.py, small: every mix saved, loaded and checked (the figures are docs/benchmarks.md's)."""
    spec = importlib.util.spec_from_file_location("bench_state", pathlib.Path(__file__).parents[1] / "scripts"
                                                  / "bench_state.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.run(300, ["established", "mixed"], 1, str(tmp_path))
    for mix in ("established", "mixed"):
        m = results["mixes"][mix]
        assert m["save_seconds"]["best"] > 0 and m["load_seconds"]["best"] > 0 and m["bytes"] > 300 * 100
    assert results["mixes"]["mixed"]["bytes"] < results["mixes"]["established"]["bytes"]


def test_with_keep_only_the_connections_it_accepts_are_restored_parked_ones_too():
    box = small_box()
    saved = through_a_file(snapshot(box.tracker, box.now))
    fresh = Box()
    fresh.now = box.now
    mine = {40001, 40003}  # the one still peeking and the parked one
    assert restore(fresh.tracker, saved, fresh.now, keep=lambda addr, port: port in mine) == 2
    assert {int.from_bytes(key[8:10], "big") for key in fresh.tracker.clients} == mine
    assert fresh.tracker.in_kernel == 1 and list(fresh.tracker.peeking) and not fresh.tracker.hosts
    # The rest, from the same file, into the same tracker.
    assert restore(fresh.tracker, saved, fresh.now, keep=lambda addr, port: port not in mine) == 2
    assert_same_tracker(box, fresh)


def test_a_damaged_second_shard_leaves_the_first_shards_connections_in_place():
    box = small_box()
    saved = through_a_file(snapshot(box.tracker, box.now))
    fresh = Box()
    fresh.now = box.now
    mine = {40001, 40003}
    assert restore(fresh.tracker, saved, fresh.now, keep=lambda addr, port: port in mine) == 2
    tables = (dict(fresh.tracker.clients), dict(fresh.tracker.hosts), list(fresh.tracker.peeking),
              sorted(fresh.tracker._timers, key=lambda entry: entry[1]), fresh.tracker.half_open,
              fresh.tracker.in_kernel)
    # The other shard is damaged half way (its parked section cut short): what it added goes again.
    broken = dict(saved, parked=saved["parked"][:-1])
    with pytest.raises(StateError):
        restore(fresh.tracker, broken, fresh.now, keep=lambda addr, port: port not in mine)
    assert (dict(fresh.tracker.clients), dict(fresh.tracker.hosts), list(fresh.tracker.peeking),
            sorted(fresh.tracker._timers, key=lambda entry: entry[1]), fresh.tracker.half_open,
            fresh.tracker.in_kernel) == tables
    assert {int.from_bytes(key[8:10], "big") for key in fresh.tracker.clients} == mine
