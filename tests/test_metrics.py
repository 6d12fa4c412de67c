"""kracauer.metrics: counters from finished connections, copies from the tracker once a second (issue #5)."""

from __future__ import annotations

import platform
import urllib.request

import pytest

from kracauer import __version__
from kracauer.metrics import Metrics
from tests.test_tracker import CHROME, HOST_WWW, Box, Walk, client_packet

LISTENER = "192.0.2.10:443"


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def drain(box: Box, metrics: Metrics) -> list:
    """What the daemon loop does with finished connections."""
    records, box.tracker.records = box.tracker.records, []
    for record in records:
        metrics.observe(record)
    return records


@pytest.fixture
def box():
    return Box()


@pytest.fixture
def metrics(box):
    return Metrics(box.tracker, now=box.now)


def test_connection_open_at_a_sync_counts_once_as_opened_and_once_as_closed(box, metrics):
    walk = Walk(box)
    box.now += 0.1
    walk.establish()
    metrics.sync(box.tracker, box.now)
    assert value(metrics, "kracauer_connections_opened_total", listener=LISTENER) == 1
    box.now += 1
    metrics.sync(box.tracker, box.now)
    assert value(metrics, "kracauer_connections_opened_total", listener=LISTENER) == 1
    # The client resets it.
    walk.from_client("R", walk.c + 1 + len(CHROME))
    [record] = drain(box, metrics)
    assert record.outcome == "reset_by_client"
    metrics.sync(box.tracker, box.now)
    assert value(metrics, "kracauer_connections_opened_total", listener=LISTENER) == 1
    assert value(metrics, "kracauer_connections_closed_total", listener=LISTENER, route="www",
                 outcome="reset_by_client") == 1
    assert value(metrics, "kracauer_connect_seconds_count") == 1
    assert value(metrics, "kracauer_connect_seconds_sum") == pytest.approx(record.connect_time)
    assert value(metrics, "kracauer_hello_bytes_count", protocol="tls") == 1
    assert value(metrics, "kracauer_packets_total", direction="to_host") == record.packets_to_host > 0
    assert value(metrics, "kracauer_bytes_total", direction="to_host") == record.bytes_to_host == len(CHROME)


def test_connection_that_opens_and_ends_between_two_syncs_counts_once(box, metrics):
    walk = Walk(box)
    box.now += 0.1
    walk.handshake()
    box.wait(11)  # no hello: hello_timeout
    [record] = drain(box, metrics)
    assert record.outcome == "hello_timeout"
    metrics.sync(box.tracker, box.now)
    assert value(metrics, "kracauer_connections_opened_total", listener=LISTENER) == 1
    metrics.sync(box.tracker, box.now)
    assert value(metrics, "kracauer_connections_opened_total", listener=LISTENER) == 1
    assert value(metrics, "kracauer_connections_closed_total", listener=LISTENER, route="",
                 outcome="hello_timeout") == 1


def test_connections_already_in_the_table_at_start_are_not_counted_as_opened(box):
    Walk(box).establish()
    metrics = Metrics(box.tracker, now=0.0)
    metrics.skip_existing(box.now)  # what the daemon does after restoring
    metrics.sync(box.tracker, box.now + 1)
    assert value(metrics, "kracauer_connections_opened_total", listener=LISTENER) is None


def test_drops_reach_the_metrics_only_at_a_sync(box, metrics):
    box.send(client_packet("A", 1234, 5678))  # belongs to nothing
    assert box.tracker.drops["no_connection"] == 1
    assert value(metrics, "kracauer_packets_dropped_total", reason="no_connection") is None
    metrics.sync(box.tracker, box.now)
    assert value(metrics, "kracauer_packets_dropped_total", reason="no_connection") == 1


def test_sizes_and_active_connections_by_route_and_host(box, metrics):
    Walk(box).establish()
    half = Walk(box, sport=40001)
    half.syn()  # half-open, still peeking
    metrics.sync(box.tracker, box.now)
    assert value(metrics, "kracauer_connections_active") == 2
    assert value(metrics, "kracauer_connections_peeking") == 1
    assert value(metrics, "kracauer_connections_half_open") == 1
    assert value(metrics, "kracauer_tracker_host_entries") == 1
    # Counted when scraped, from the table itself.
    assert value(metrics, "kracauer_connections_active_by_route", route="www", host=HOST_WWW) == 1
    assert value(metrics, "kracauer_connections_active_by_route", route="", host="") == 1
    assert value(metrics, "kracauer_connections_by_state", state="established") == 1
    assert value(metrics, "kracauer_connections_by_state", state="peeking") == 1


def test_build_info_and_uptime(metrics):
    assert value(metrics, "kracauer_build_info", version=__version__, python=platform.python_version()) == 1
    assert value(metrics, "kracauer_uptime_seconds") >= 0


def test_serves_prometheus_text_over_http(box, metrics):
    metrics.serve("127.0.0.1", 0)
    try:
        port = metrics.server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain")
    finally:
        metrics.close()
    assert "# TYPE kracauer_connections_opened_total counter" in text
    assert "kracauer_build_info{" in text
    assert "_created" not in text


def test_nothing_is_counted_while_packets_flow(box, metrics):
    """The loop feeds metrics only with records and syncs: the tracker alone changes no metric."""
    walk = Walk(box)
    walk.establish()
    before = {s.name + str(sorted(s.labels.items())): s.value for f in metrics.registry.collect()
              for s in f.samples if not s.name.startswith(("process_", "kracauer_uptime", "kracauer_connections_a",
                                                           "kracauer_connections_by"))}
    for i in range(20):
        walk.from_host("PA", walk.h + 1 + i * 100, walk.c + 1 + len(CHROME), b"x" * 100, host_tick=30)
    after = {s.name + str(sorted(s.labels.items())): s.value for f in metrics.registry.collect()
             for s in f.samples if not s.name.startswith(("process_", "kracauer_uptime", "kracauer_connections_a",
                                                          "kracauer_connections_by"))}
    assert before == after
