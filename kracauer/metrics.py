"""Prometheus metrics: ``[metrics] listen = "127.0.0.1:9477"`` serves /metrics.

Nothing here runs per packet. The packet loop feeds this module in two ways:

- ``observe(record)`` for each connection that ended (its ConnectionRecord):
  closed connections by listener, route and outcome, bytes and packets each
  way, the time from the routing decision to the host's SYN-ACK, hello sizes
  and connection durations;
- ``sync(tracker, now)`` at most once a second: copies of the tracker's
  counters (``drops``, ``absorbed``, ``events``, ``opened`` by listener) and
  sizes.

An HTTP server thread (prometheus_client's WSGI server) answers scrapes from
those copies. One family is computed at scrape time instead, in the server
thread: ``kracauer_connections_active_by_route`` (and ``..._by_state``),
counted over a copy of the tracker's table. That costs about 25 ms per
100 000 connections, once per scrape, rather than once a second in the loop.

Bytes and packets are counted when a connection ends, so a long download
shows up in ``kracauer_bytes_total`` at its end.
"""

from __future__ import annotations

import ipaddress
import platform
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server

from kracauer import __version__
from netstack.tracker import STATE_NAMES, ConnectionRecord, Tracker
from netstack.udptracker import STATE_NAMES as UDP_STATE_NAMES

__all__ = ["Metrics"]

# Seconds from the routing decision to the host's SYN-ACK.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HELLO_BUCKETS = (128, 256, 512, 1024, 1536, 2048, 4096, 8192, 16384, 65536)
DURATION_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0)


@dataclass(frozen=True)
class _Snapshot:
    """What the loop copied from the tracker at its last sync (replaced whole, never changed)."""

    drops: dict[str, int] = field(default_factory=dict)
    absorbed: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    active: int = 0
    host_entries: int = 0
    peeking: int = 0
    half_open: int = 0
    hosts_down: int = 0
    log_dropped: dict[str, int] = field(default_factory=dict)
    in_kernel: int = 0
    # The BPF program's counters (kracauer.kernel_path.KernelPath.stats), None: no kernel path.
    kernel: dict[str, int] | None = None
    # quic listeners' UDP flows (netstack.udptracker)
    udp_flows: int = 0
    udp_peeking: int = 0
    udp_in_kernel: int = 0  # bound ones in the kernel's flow map (not in in_kernel, which is TCP's)


def process_metrics(registry: CollectorRegistry) -> tuple[Counter, Gauge]:
    """The families every kracauer process has (build, start, uptime, process_*) and the reload ones."""
    ProcessCollector(registry=registry)
    started = time.monotonic()
    Gauge("kracauer_build_info", "kracauer's version and Python's, always 1", ["version", "python"],
          registry=registry).labels(__version__, platform.python_version()).set(1)
    Gauge("kracauer_start_time_seconds", "When this kracauer process started (Unix time)",
          registry=registry).set(time.time())
    Gauge("kracauer_uptime_seconds", "Seconds since this kracauer process started",
          registry=registry).set_function(lambda: time.monotonic() - started)
    reloads = Counter("kracauer_config_reloads", "Configuration reloads (SIGHUP), by result", ["result"],
                      registry=registry)
    reload_ok = Gauge("kracauer_config_last_reload_successful",
                      "1 if the last reload was applied (or there was none), 0 if it was refused", registry=registry)
    reload_ok.set(1)
    for result in ("ok", "failed"):
        reloads.labels(result)
    return reloads, reload_ok


class Metrics:
    """The daemon's metrics on a registry of their own; `serve()` starts the HTTP thread."""

    def __init__(self, tracker: Tracker, now: float | None = None) -> None:
        self.tracker = tracker
        # No *_created series: they double the output and say little here.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        registry = self.registry
        self.reloads, self.reload_ok = process_metrics(registry)
        self.opened = Counter("kracauer_connections_opened", "Connections accepted (client handshake answered)",
                              ["listener"], registry=registry)
        self.closed = Counter("kracauer_connections_closed", "Connections that ended, by how they ended",
                              ["listener", "route", "outcome"], registry=registry)
        self.bytes = Counter("kracauer_bytes", "Payload bytes of connections that ended, by direction",
                             ["direction"], registry=registry)
        self.packets = Counter("kracauer_packets", "Packets of connections that ended, by direction",
                               ["direction"], registry=registry)
        self.connect_time = Histogram("kracauer_connect_seconds",
                                      "Time from the routing decision (hello read) to the host's SYN-ACK",
                                      buckets=CONNECT_BUCKETS, registry=registry)
        self.hello_size = Histogram("kracauer_hello_bytes", "Size of the TLS ClientHello or HTTP request head",
                                    ["protocol"], buckets=HELLO_BUCKETS, registry=registry)
        self.duration = Histogram("kracauer_connection_duration_seconds", "Lifetime of connections that ended",
                                  buckets=DURATION_BUCKETS, registry=registry)
        self.restored = Gauge("kracauer_restored_connections",
                              "Connections restored from the state file at start", registry=registry)
        # Route by DNS (kracauer.resolver): counted on the services thread (prometheus_client locks).
        self.dns_lookups = Counter("kracauer_dns_lookups", "AAAA lookups sent for resolve routes, by outcome "
                                   "(answer, nxdomain, nodata, timeout, error)", ["outcome"], registry=registry)
        self.dns_cache_hits = Counter("kracauer_dns_cache_hits", "Resolve-route names answered from the cache",
                                      registry=registry)
        # Its value is read at scrape time (the daemon sets the function).
        self.dns_cache_entries = Gauge("kracauer_dns_cache_entries", "Names in the resolver's cache",
                                       registry=registry)
        for direction in ("to_host", "to_client"):
            self.bytes.labels(direction)
            self.packets.labels(direction)
        self._bytes_to_host = self.bytes.labels("to_host")
        self._bytes_to_client = self.bytes.labels("to_client")
        self._packets_to_host = self.packets.labels("to_host")
        self._packets_to_client = self.packets.labels("to_client")
        self._opened: dict[str, Any] = {}
        self._closed: dict[tuple[str, str, str], Any] = {}
        self._hello: dict[str, Any] = {}
        self._listener_names: dict[Any, str] = {}
        # The tracker's `opened` counts already turned into metrics, by listener.
        self._opened_seen: dict[Any, int] = dict(tracker.opened)
        self.snapshot = _Snapshot()
        registry.register(_TrackerCollector(self))
        self.server = None
        self.thread = None

    # -- fed by the loop ---------------------------------------------------

    def observe(self, record: ConnectionRecord) -> None:
        """Count one connection that ended."""
        listener = record.listener
        key = (listener, record.route or "", record.outcome)
        child = self._closed.get(key)
        if child is None:
            child = self._closed[key] = self.closed.labels(*key)
        child.inc()
        if record.bytes_to_host:
            self._bytes_to_host.inc(record.bytes_to_host)
        if record.bytes_to_client:
            self._bytes_to_client.inc(record.bytes_to_client)
        if record.packets_to_host:
            self._packets_to_host.inc(record.packets_to_host)
        if record.packets_to_client:
            self._packets_to_client.inc(record.packets_to_client)
        if record.connect_time is not None:
            self.connect_time.observe(record.connect_time)
        if record.hello_size:
            hello = self._hello.get(record.protocol)
            if hello is None:
                hello = self._hello[record.protocol] = self.hello_size.labels(record.protocol)
            hello.observe(record.hello_size)
        self.duration.observe(record.duration)

    def sync(self, tracker: Tracker, now: float, log_dropped: dict[str, int] | None = None,
             kernel: dict[str, int] | None = None) -> None:
        """Copy the tracker's counters and sizes; count the connections opened since the last sync.

        Call it after the tracker's pending records went through observe():
        a connection already recorded was counted as opened there.
        """
        self.count_opened(tracker)
        self.snapshot = _Snapshot(
            drops=dict(tracker.drops),
            absorbed=dict(tracker.absorbed),
            events=dict(tracker.events),
            active=len(tracker.clients),
            host_entries=len(tracker.hosts),
            peeking=len(tracker.peeking),
            half_open=tracker.half_open,
            hosts_down=sum(1 for _, until in tracker.health.values() if until > now),
            log_dropped=dict(log_dropped or {}),
            in_kernel=tracker.in_kernel,
            kernel=kernel,
            udp_flows=len(tracker.udp.flows) if tracker.udp is not None else 0,
            udp_peeking=len(tracker.udp.peeking) if tracker.udp is not None else 0,
            udp_in_kernel=tracker.udp.in_kernel if tracker.udp is not None else 0,
        )

    def count_opened(self, tracker: Tracker) -> None:
        """Turn the tracker's per-listener `opened` counts into the counter (a few listeners: cheap)."""
        for listener, count in tracker.opened.items():
            new = count - self._opened_seen.get(listener, 0)
            if new > 0:
                self._opened_child(self._listener_name(listener)).inc(new)
                self._opened_seen[listener] = count

    def skip_existing(self, now: float) -> None:
        """Do not count what the tracker opened before now (e.g. restored connections) as opened."""
        self._opened_seen = dict(self.tracker.opened)

    def _opened_child(self, listener: str):
        child = self._opened.get(listener)
        if child is None:
            child = self._opened[listener] = self.opened.labels(listener)
        return child

    def _listener_name(self, listener: Any) -> str:
        name = self._listener_names.get(listener)
        if name is None:
            name = self._listener_names[listener] = str(listener)
        return name

    # -- the HTTP thread -----------------------------------------------------

    def serve(self, address: str, port: int) -> None:
        """Start answering /metrics on address:port (OSError if it cannot bind)."""
        self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def active_by_route(self) -> tuple[Tally, Tally]:
        """(route, host) → connections and state → connections, counted now over the tracker's table.

        Connections that are over but linger in the table for retransmitted
        FINs count as state "closing" and under no route.

        Runs in the HTTP thread while the loop changes the table: it works on
        a copy (one C-level call under the GIL) and retries if the table
        changed size during that copy anyway.
        """
        conns: list = []
        for _ in range(5):
            try:
                conns = list(self.tracker.clients.values())
                break
            except RuntimeError:
                continue
        by_route: Tally = Tally()
        by_state: Tally = Tally()
        for conn in conns:
            if conn.__class__ is tuple:
                # Parked: the kernel carries it (netstack.tracker, "the kernel path").
                _, target, host, _, _ = conn
                by_route[(target.route, host)] += 1
                by_state["established"] += 1
                continue
            if conn.recorded:
                # Over (its record is written), lingering a few seconds for retransmissions.
                by_state["closing"] += 1
                continue
            target = conn.target
            by_route[(target.route if target is not None else "", conn.host)] += 1
            by_state[STATE_NAMES[conn.state].lower()] += 1
        udp = self.tracker.udp
        flows: list = []
        for _ in range(5 if udp is not None else 0):
            try:
                flows = list(udp.flows.values())
                break
            except RuntimeError:
                continue
        for flow in flows:
            # quic flows: state "udp_peeking" or "udp_bound".
            target = flow.target
            by_route[(target.route if target is not None else "", flow.host)] += 1
            by_state["udp_" + UDP_STATE_NAMES[flow.state].lower()] += 1
        return by_route, by_state


class _TrackerCollector:
    """The families read from the loop's last snapshot (and the scrape-time count by route)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        snap = self.metrics.snapshot
        for name, label, help_text, values in (
            ("kracauer_packets_dropped", "reason", "Packets kracauer did not act on, by reason (never forwarded)",
             snap.drops),
            ("kracauer_packets_absorbed", "reason",
             "Packets kracauer acted on with nothing to send (yet), by reason", snap.absorbed),
            ("kracauer_events", "kind", "Notable tracker events (SYN cookies, evictions, failovers...), by kind",
             snap.events),
            ("kracauer_log_dropped", "log", "Log lines lost because the writer thread could not keep up, by log",
             snap.log_dropped),
        ):
            family = CounterMetricFamily(name, help_text, labels=[label])
            for key in sorted(values):
                family.add_metric([key], values[key])
            yield family
        for name, help_text, value in (
            ("kracauer_connections_active", "Connections in the tracker's table, in any state", snap.active),
            ("kracauer_tracker_host_entries", "Entries of the tracker's host-side table", snap.host_entries),
            ("kracauer_connections_peeking", "Connections still sending their hello", snap.peeking),
            ("kracauer_connections_half_open", "Handshakes answered with state, not yet acknowledged",
             snap.half_open),
            ("kracauer_hosts_down", "Hosts skipped for now after repeated failures (passive health)",
             snap.hosts_down),
            ("kracauer_udp_flows_active", "UDP flows of quic listeners in the table (peeking or bound)",
             snap.udp_flows),
            ("kracauer_udp_flows_peeking", "UDP flows of quic listeners still sending their Initials",
             snap.udp_peeking),
            ("kracauer_udp_flows_in_kernel", "Bound UDP flows of quic listeners whose datagrams the kernel "
             "translates (also in kracauer_udp_flows_active)", snap.udp_in_kernel),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        yield from self._kernel_families(snap)
        by_route, by_state = self.metrics.active_by_route()
        family = GaugeMetricFamily("kracauer_connections_active_by_route",
                                   "Connections not yet over, by route and host (empty route: not bound to a "
                                   "host yet), counted at scrape time", labels=["route", "host"])
        for (route, host), n in sorted(by_route.items(), key=lambda item: (item[0][0], item[0][1])):
            family.add_metric([route, _host_text(host)], n)
        yield family
        family = GaugeMetricFamily("kracauer_connections_by_state",
                                   "Connections in the table by state (closing: over, lingering), counted at "
                                   "scrape time",
                                   labels=["state"])
        for state, n in sorted(by_state.items()):
            family.add_metric([state], n)
        yield family

    @staticmethod
    def _kernel_families(snap: _Snapshot) -> Iterator[Any]:
        """The kernel data path: on or not, what it carries now, and its running counts."""
        yield GaugeMetricFamily("kracauer_kernel_path_enabled",
                                "1 if a BPF program translates established connections, 0 if Python does",
                                value=0 if snap.kernel is None else 1)
        yield GaugeMetricFamily("kracauer_connections_in_kernel",
                                "Established connections whose packets the kernel translates", value=snap.in_kernel)
        if snap.kernel is None:
            return
        stats = snap.kernel
        for name, help_text, kind in (
            ("kracauer_kernel_bytes", "Payload bytes translated by the kernel path so far, by direction "
             "(grows while a transfer runs; kracauer_bytes_total counts connections at their end)", "bytes"),
            ("kracauer_kernel_packets", "Packets (GSO super-packets count once) translated by the kernel path, "
             "by direction", "packets"),
        ):
            family = CounterMetricFamily(name, help_text, labels=["direction"])
            for direction in ("to_host", "to_client"):
                family.add_metric([direction], stats.get(f"{direction}_{kind}", 0))
            yield family
        family = CounterMetricFamily("kracauer_kernel_passed",
                                     "Packets the kernel path handed on to kracauer's Python loop, by reason",
                                     labels=["reason"])
        for key in sorted(stats):
            if key.startswith("pass_"):
                family.add_metric([key[5:]], stats[key])
        yield family
        yield CounterMetricFamily("kracauer_kernel_errors", "Packets the kernel path dropped half translated "
                                  "(a helper failed; TCP sends them again)", value=stats.get("drop_error", 0))
        # SYN cookies answered by the program, per listener (kracauer.kernel_path.KernelPath.stats).
        for name, help_text, prefix in (
            ("kracauer_kernel_syn_cookies", "SYNs the kernel path answered with a SYN cookie, by listener "
             "(Python never saw them; their ACKs count in kracauer_events_total{kind=\"syn_cookie_accepted\"})",
             "syn_cookies "),
            ("kracauer_kernel_syns_passed", "SYNs without timestamps the kernel path handed to Python, which "
             "answers them with state, within [kernel_path] python_syn_rate, by listener", "syn_passed "),
        ):
            family = CounterMetricFamily(name, help_text, labels=["listener"])
            for key in sorted(stats):
                if key.startswith(prefix):
                    family.add_metric([key[len(prefix):]], stats[key])
            yield family


def _host_text(host: bytes) -> str:
    return str(ipaddress.IPv6Address(host)) if host else ""
