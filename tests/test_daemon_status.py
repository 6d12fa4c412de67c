"""`kracauer status` (from the metrics endpoint) and `kracauer cleanup` (issue #5)."""

from __future__ import annotations

import secrets

import pytest
from prometheus_client import generate_latest

from kracauer.cli import main
from kracauer.config import parse_config
from kracauer.metrics import Metrics
from kracauer.status import StatusError, format_status, metrics_url, parse
from tests.test_tracker import CHROME, HOST_WWW, Box, Walk, client_packet

MINIMAL = """\
[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"

[fallback]
host = "2001:db8::99"
"""


@pytest.fixture
def busy():
    """A tracker with one established connection, one half-open, one closed and one drop, and its metrics."""
    box = Box()
    metrics = Metrics(box.tracker, now=box.now)
    box.now += 0.1
    Walk(box).establish()
    Walk(box, sport=40001).syn()
    gone = Walk(box, sport=40002)
    gone.establish()
    gone.from_client("R", gone.c + 1 + len(CHROME))
    box.send(client_packet("A", 1, 2, sport=50000))
    for record in box.tracker.records:
        metrics.observe(record)
    box.tracker.records = []
    metrics.sync(box.tracker, box.now)
    return metrics


def test_parse_reads_what_status_shows(busy):
    status = parse(generate_latest(busy.registry).decode())
    assert status.active == 2 and status.peeking == 1 and status.half_open == 1
    assert status.opened == 3 and status.closed == 1
    assert status.by_route == {("www", HOST_WWW): 1, ("", ""): 1}
    assert status.outcomes == {"reset_by_client": 1}
    assert status.drops == {"no_connection": 1}
    assert status.uptime is not None and status.reload_ok


def test_format_lists_routes_hosts_drops_and_uptime(busy):
    status = parse(generate_latest(busy.registry).decode())
    status.uptime = 3 * 3600 + 62
    text = format_status(status, "http://127.0.0.1:9477/metrics")
    lines = text.splitlines()
    assert lines[0].endswith("up 3h 01m 02s (http://127.0.0.1:9477/metrics)")
    assert "connections: 2 tracked (established 1, peeking 1; 1 half-open), 3 opened, 1 closed, 0 restored at start" \
        in text
    assert any(line.split() == ["www", HOST_WWW, "1"] for line in lines)
    assert any(line.split() == ["(no", "host", "yet)", "-", "1"] for line in lines)
    assert "packets dropped by reason: no_connection 1" in text
    assert "closed by outcome: reset_by_client 1" in text


def test_other_text_is_not_kracauer_s():
    with pytest.raises(StatusError, match="kracauer_build_info"):
        parse("# TYPE up gauge\nup 1\n")


@pytest.mark.parametrize("listen, url", [
    ("127.0.0.1:9477", "http://127.0.0.1:9477/metrics"),
    ("0.0.0.0:9100", "http://127.0.0.1:9100/metrics"),
    ("[::]:9477", "http://[::1]:9477/metrics"),
    ("[2001:db8::1]:9477", "http://[2001:db8::1]:9477/metrics"),
])
def test_metrics_url_from_the_config(listen, url):
    assert metrics_url(parse_config(MINIMAL + f'\n[metrics]\nlisten = "{listen}"\n')) == url


def test_metrics_url_without_a_metrics_table_says_what_to_add():
    with pytest.raises(StatusError, match=r"no \[metrics\] table"):
        metrics_url(parse_config(MINIMAL))


def test_status_command_prints_the_status_of_a_running_endpoint(busy, capsys):
    busy.serve("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{busy.server.server_port}/metrics"
        assert main(["status", "--metrics", url]) == 0
    finally:
        busy.close()
    out = capsys.readouterr().out
    assert out.startswith("kracauer ") and url in out and "2 tracked" in out


def test_status_command_with_the_daemon_down_exits_1(capsys, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    path = tmp_path / "k.toml"
    path.write_text(MINIMAL + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    assert main(["status", "--config", str(path)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_status_command_usage_errors(tmp_path, capsys):
    path = tmp_path / "k.toml"
    path.write_text(MINIMAL)
    assert main(["status", "--config", str(path), "--metrics", "http://x/"]) == 2
    assert main(["status", "--config", str(path)]) == 2
    assert "no [metrics] table" in capsys.readouterr().err


def test_cleanup_with_nothing_left_says_so(tmp_path, capsys):
    name = "kq" + secrets.token_hex(4)
    path = tmp_path / "k.toml"
    state = tmp_path / "state.json"
    path.write_text(MINIMAL.replace("[translate]", f'[tun]\nname = "{name}"\n\n[translate]')
                    + f'\n[state]\nfile = "{state}"\n')
    assert main(["cleanup", "--config", str(path)]) == 0
    assert capsys.readouterr().out == f"nothing to clean up: no TUN {name} and no state file {state}\n"
    state.write_text("{}")
    assert main(["--config", str(path), "cleanup"]) == 0
    assert "removed the state file" in capsys.readouterr().out
    assert not state.exists()


def test_cleanup_needs_a_config(capsys):
    assert main(["cleanup"]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_status_lists_the_workers_when_there_are_several(busy):
    text = generate_latest(busy.registry).decode() + """\
# HELP kracauer_workers Worker processes configured
# TYPE kracauer_workers gauge
kracauer_workers 2.0
# TYPE kracauer_worker_up gauge
kracauer_worker_up{worker="0"} 1.0
kracauer_worker_up{worker="1"} 0.0
# TYPE kracauer_worker_restarts counter
kracauer_worker_restarts_total{worker="0"} 0.0
kracauer_worker_restarts_total{worker="1"} 3.0
# TYPE kracauer_worker_connections_active gauge
kracauer_worker_connections_active{worker="0"} 7.0
kracauer_worker_connections_active{worker="1"} 0.0
"""
    out = format_status(parse(text), "http://x/metrics")
    assert "workers: 2 (1 up): 0: 7 active, 1: 0 active, 3 restarts, down" in out
    assert "workers:" not in format_status(parse(generate_latest(busy.registry).decode()), "http://x/metrics")


def test_quic_flows_are_counted_beside_the_connections():
    """A quic listener's UDP flows (netstack.udptracker) show in the metrics and in the status line."""
    import ipaddress

    from scapy.layers.inet import IP, UDP

    from tests.test_udptracker import AIOQUIC, LISTENERS as QUIC_LISTENERS, PREFIX, Counter32
    from tests.test_udptracker import resolve as quic_resolve
    from netstack.tracker import Tracker, TrackerConfig

    tracker = Tracker(TrackerConfig(prefix=PREFIX), QUIC_LISTENERS, quic_resolve, Counter32())
    tracker.receive(bytes(IP(src="198.51.100.2", dst="192.0.2.10") / UDP(sport=5000, dport=443) / AIOQUIC[0]), 1.0)
    metrics = Metrics(tracker)
    metrics.sync(tracker, 1.0)
    text = generate_latest(metrics.registry).decode()
    assert "kracauer_udp_flows_active 1.0" in text
    assert 'kracauer_connections_by_state{state="udp_bound"} 1.0' in text
    status = parse(text)
    assert status.udp_flows == 1
    assert "connections: 0 tracked and 1 quic flows (udp_bound 1;" in format_status(status, "http://x/metrics")
    assert ipaddress.IPv6Address("2001:db8::10").packed in {flow.host for flow in tracker.udp.flows.values()}
