"""The tracker's timer heap stays proportional to the live connections."""

from __future__ import annotations

from tests.test_tracker import CHROME, Box, Walk


def test_stale_timer_entries_are_compacted_away():
    box = Box()
    walks = []
    for port in range(20000, 22000):
        walk = Walk(box, sport=port)
        walk.handshake()
        walk.expect_host_syn(walk.send_hello(CHROME))  # hello timer replaced by a connect timer
        walks.append(walk)
    live = len(box.tracker.clients)
    assert live == 2000
    # Every connection re-armed its timer once; without compaction the heap would hold 4000 entries.
    assert len(box.tracker._timers) <= live * 4 // 3 + 1024 + 1
    # And every live connection still has its current entry.
    current = {(entry[0], id(entry[2])) for entry in box.tracker._timers}
    assert all((conn.timer_at, id(conn)) in current for conn in box.tracker.clients.values())
    # The timers still fire: SYN retransmissions for all of them.
    assert len(box.wait(1.0)) == 2000
