"""Saving the tracker and restoring it in a new process: connections carry on (issue #5)."""

from __future__ import annotations

import json
import random

import pytest

from netstack.state import StateError, restore, snapshot
from netstack.tracker import CONNECTING, ESTABLISHED, PEEKING, Tracker, TrackerConfig
from tests.test_tracker import CHROME, LISTENERS, PREFIX, Box, Walk, resolve


def restart(box: Box, clock_jump: float = 5000.0) -> Box:
    """Snapshot through JSON into a fresh tracker whose monotonic clock reads something else entirely."""
    saved = json.loads(json.dumps(snapshot(box.tracker, box.now)))
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
    broken = json.loads(json.dumps(saved))
    broken["connections"][0]["client_key"] = "zz"
    with pytest.raises(StateError):
        restore(fresh, broken, 0.0)
    assert not fresh.clients and not fresh.hosts


def test_connections_of_a_listener_that_is_gone_are_skipped():
    box = Box()
    walk = Walk(box)
    walk.establish()
    saved = snapshot(box.tracker, box.now)
    rng = random.Random(5)
    other = Tracker(TrackerConfig(prefix=PREFIX), LISTENERS[2:], resolve, lambda: rng.getrandbits(32))
    assert restore(other, saved, 0.0) == 0
    assert other.events["state_skipped"] == 1
