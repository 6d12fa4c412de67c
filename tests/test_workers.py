"""The pieces of multi-worker kracauer that need no lab: config, steering-aware choices,
state shards, the supervisor–worker channel and the one /metrics made of many."""

from __future__ import annotations

import json
import socket

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kracauer.config import ConfigError, parse_config
from kracauer.daemon import saved_shards
from kracauer.worker import state_shard
from kracauer.workers import LOG, MESSAGE_MAX, Channel, TableCounts, channel_pair, merge_expositions
from netstack.state import restore, snapshot
from netstack.steer import queue_of
from netstack.tracker import Tracker, TrackerConfig
from tests.test_config import MINIMAL as BASE
from tests.test_state import established_box
from tests.test_tracker import LISTENERS, PREFIX, resolve


# -- [tun] workers ---------------------------------------------------------------------

def test_workers_is_auto_by_default_and_an_integer_when_given():
    assert parse_config(BASE).tun.workers is None
    assert parse_config(BASE).tun.worker_count() >= 1
    assert parse_config(BASE + '\n[tun]\nworkers = "auto"\n').tun.workers is None
    config = parse_config(BASE + "\n[tun]\nworkers = 3\n")
    assert (config.tun.workers, config.tun.worker_count()) == (3, 3)


@pytest.mark.parametrize("value", ["0", "257", '"two"', "1.5", "true"])
def test_a_bad_worker_count_is_refused_clearly(value):
    with pytest.raises(ConfigError, match="workers"):
        parse_config(BASE + f"\n[tun]\nworkers = {value}\n")


# -- the tracker's choices --------------------------------------------------------------

def tracker_for(queue: int, queues: int, seed: int = 1) -> Tracker:
    import random

    rng = random.Random(seed)
    t = Tracker(TrackerConfig(prefix=PREFIX), LISTENERS, resolve, lambda: rng.getrandbits(32))
    t.queue, t.queues = queue, queues
    return t


@pytest.mark.parametrize("queues", [2, 3, 8])
def test_a_source_port_picked_for_a_collision_steers_back_to_the_same_worker(queues):
    client = bytes([198, 51, 100, 7])
    for queue in range(queues):
        t = tracker_for(queue, queues, seed=queue)
        ports = {t._source_port(client) for _ in range(200)}
        assert len(ports) > 100  # still random
        assert {queue_of(client, port, queues) for port in ports} == {queue}
        assert all(1024 <= port <= 65535 for port in ports)


def test_one_worker_picks_any_port():
    t = tracker_for(0, 1)
    client = bytes([198, 51, 100, 7])
    assert len({queue_of(client, t._source_port(client), 2) for _ in range(100)}) == 2


def test_health_changes_are_recorded_only_when_shared():
    import ipaddress

    from tests.test_tracker import CHROME, Box, Walk, host_packet

    quiet = Box()
    walk = Walk(quiet)
    walk.handshake()
    syn = walk.expect_host_syn(walk.send_hello(CHROME))
    quiet.send(host_packet("RA", 0, syn.tcp.seq + 1, src=str(syn.ip.dst), dport=syn.tcp.sport))
    assert quiet.tracker.health and quiet.tracker.health_changes is None

    box = Box()
    box.tracker.health_changes = []
    walk = Walk(box)
    walk.handshake()
    syn = walk.expect_host_syn(walk.send_hello(CHROME))
    # The host refuses: its failure is recorded, for the other workers.
    box.send(host_packet("RA", 0, syn.tcp.seq + 1, src=str(syn.ip.dst), dport=syn.tcp.sport))
    key = (ipaddress.IPv6Address(syn.ip.dst).packed, syn.tcp.dport)
    assert box.tracker.health_changes == [(key, box.tracker.health[key])]


def test_max_connections_counts_what_the_other_workers_hold():
    from tests.test_tracker import Box, Walk

    box = Box(max_connections=3)
    box.tracker.elsewhere = 2
    Walk(box).handshake()
    assert len(box.tracker.clients) == 1
    # The box holds 3: the next client is refused with an RST, whichever worker it reaches.
    [out] = Walk(box, c=0x1234, sport=40001).syn()
    assert out.has("R") and box.tracker.events["refused_table_full"] == 1
    box.tracker.elsewhere = 1
    [out] = Walk(box, c=0x5678, sport=40002).syn()
    assert out.has("SA")


def test_table_counts_are_shared_through_one_memory():
    counts = TableCounts.create(3)
    other = TableCounts(counts.fd, 3)  # what a worker maps from the inherited descriptor
    counts.set(0, 10)
    other.set(1, 5)
    counts.set(2, 7)
    assert other.others(1) == 17 and counts.others(0) == 12
    other.map.close()
    counts.close()


# -- state shards ------------------------------------------------------------------------

def test_each_worker_restores_exactly_the_connections_that_steer_to_it():
    box = established_box(300)
    saved = json.loads(json.dumps(snapshot(box.tracker, box.now)))
    clients = {(key[:4], int.from_bytes(key[8:10], "big")) for key in box.tracker.clients}
    restored = 0
    for queue in range(3):
        t = tracker_for(queue, 3)
        n = restore(t, saved, box.now, keep=lambda addr, port, q=queue: queue_of(addr, port, 3) == q)
        assert n == len(t.clients)
        assert all(queue_of(key[:4], int.from_bytes(key[8:10], "big"), 3) == queue for key in t.clients)
        restored += n
    assert restored == len(clients) == 300


def test_shard_names_and_what_a_start_finds(tmp_path):
    base = str(tmp_path / "state.json")
    assert state_shard(base, 1) == base + ".1"
    assert saved_shards(base) == []
    for name in ("state.json", "state.json.10", "state.json.2", "state.json.bad", "state.json.2.stale"):
        (tmp_path / name).write_text("{}")
    assert saved_shards(base) == [base, base + ".2", base + ".10"]


# -- the channel ------------------------------------------------------------------------

def test_messages_arrive_whole_and_a_full_channel_drops_instead_of_blocking():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sender, receiver = Channel(a), Channel(b)
    line = json.dumps({"client": "198.51.100.7", "pad": "x" * 3000}).encode()
    sent = 0
    while sender.send(LOG, line):
        sent += 1
        assert sent < 10000, "never filled"
    assert sender.dropped == 1
    got = list(receiver.receive())
    assert len(got) == sent and all(kind == LOG and payload == line for kind, payload in got)
    sender.close()
    with pytest.raises(EOFError):
        list(receiver.receive())
    receiver.close()


def test_a_channel_pair_carries_a_large_metrics_text():
    sup, worker = channel_pair()
    text = b"x" * (1 << 20)
    assert Channel(worker).send(b"M", text)
    [(kind, payload)] = list(Channel(sup).receive())
    assert (kind, len(payload)) == (b"M", len(text))
    assert len(text) < MESSAGE_MAX
    sup.close()
    worker.close()


# -- one /metrics ------------------------------------------------------------------------

def worker_text(opened: int, active: int, hellos: list[int], reloads: int) -> str:
    registry = CollectorRegistry()
    Counter("kracauer_connections_opened", "opened", ["listener"], registry=registry).labels("a:443").inc(opened)
    Gauge("kracauer_connections_active", "active", registry=registry).set(active)
    h = Histogram("kracauer_hello_bytes", "hello", ["protocol"], buckets=(256, 1024), registry=registry)
    for size in hellos:
        h.labels("tls").observe(size)
    Counter("kracauer_config_reloads", "reloads", ["result"], registry=registry).labels("ok").inc(reloads)
    Gauge("process_start_time_seconds", "start", registry=registry).set(100 + opened)
    return generate_latest(registry).decode()


def samples(families) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_the_workers_figures_are_summed_and_the_supervisors_own_families_win():
    own = CollectorRegistry()
    Counter("kracauer_config_reloads", "reloads", ["result"], registry=own).labels("ok").inc(1)
    Gauge("process_start_time_seconds", "start", registry=own).set(50)
    merged = merge_expositions(own.collect(), [worker_text(3, 2, [100, 2000], 1), worker_text(4, 5, [500], 1)])
    got = samples(merged)
    assert got[("kracauer_connections_opened_total", (("listener", "a:443"),))] == 7
    assert got[("kracauer_connections_active", ())] == 7
    assert got[("kracauer_hello_bytes_bucket", (("le", "256.0"), ("protocol", "tls")))] == 1
    assert got[("kracauer_hello_bytes_bucket", (("le", "1024.0"), ("protocol", "tls")))] == 2
    assert got[("kracauer_hello_bytes_count", (("protocol", "tls"),))] == 3
    assert got[("kracauer_hello_bytes_sum", (("protocol", "tls"),))] == 2600
    # One reload is one reload, not one per worker; the earliest start stands for all.
    assert got[("kracauer_config_reloads_total", (("result", "ok"),))] == 1
    assert got[("process_start_time_seconds", ())] == 50
    # And the whole thing is valid exposition text again.
    registry = CollectorRegistry()

    class Fixed:
        def collect(self):
            return merged

    registry.register(Fixed())
    text = generate_latest(registry).decode()
    assert samples(text_string_to_metric_families(text)) == got


def test_a_worker_text_that_does_not_parse_is_left_out():
    merged = merge_expositions([], [worker_text(1, 1, [], 0), "this is { not metrics"])
    assert samples(merged)[("kracauer_connections_active", ())] == 1
