"""``kracauer status``: what a running kracauer is doing, read from its metrics endpoint.

The daemon serves Prometheus text at ``[metrics] listen``; this fetches it,
parses it with prometheus_client's parser and prints active connections by
route and host, connections by state, drops by reason and uptime::

    kracauer 0.1.0 up 2h 03m 04s (http://127.0.0.1:9477/metrics)
    connections: 4 tracked (established 2, closing 1, peeking 1; 0 half-open), 120 opened, 116 closed, 0 restored at start
      route              host              active
      www.example.com    2001:db8::10      2
      (no host yet)      -                 1
    closed by outcome: closed 110, reset_by_client 5, refused_unknown_name 2
    packets dropped by reason: no_connection 12, rst_out_of_window 1

With ``[agents]``, the agents connected, their names and their traffic::

    agents: 1 connected
      agent         names            peer               to agent           from agent         drops
      fd00:6b72::2  app.example.org  192.0.2.99:40112   1200 pkts 1.6 MB   900 pkts 80.0 kB   0
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from kracauer.config import Config, MetricsConfig

__all__ = ["StatusError", "Status", "fetch", "format_status", "metrics_url", "parse"]

DEFAULT_URL = "http://127.0.0.1:9477/metrics"


class StatusError(RuntimeError):
    """The metrics endpoint could not be read or is not kracauer's."""


@dataclass
class Status:
    version: str = "?"
    uptime: float | None = None
    active: int = 0
    peeking: int = 0
    half_open: int = 0
    opened: int = 0
    closed: int = 0
    restored: int = 0
    udp_flows: int = 0  # quic listeners' UDP flows
    udp_in_kernel: int = 0  # of which the kernel translates
    by_route: dict[tuple[str, str], int] = field(default_factory=dict)
    by_state: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    reload_ok: bool = True
    # Several workers ([tun] workers): their count, and per worker (up, restarts, active connections).
    workers: int = 0
    worker_rows: dict[str, list[float]] = field(default_factory=dict)
    # [agents]: None when the box has no hub; else agent address -> its row.
    agents: dict[str, "AgentRow"] | None = None
    agent_refusals: dict[str, int] = field(default_factory=dict)


@dataclass
class AgentRow:
    names: str = ""
    peer: str = ""
    packets_to: int = 0
    bytes_to: int = 0
    packets_from: int = 0
    bytes_from: int = 0
    drops: int = 0


def metrics_url(config: Config) -> str:
    """The /metrics URL of the daemon that runs `config` (its [metrics] listen, wildcards as loopback)."""
    metrics: MetricsConfig | None = config.metrics
    if metrics is None:
        raise StatusError(f"{config.source}: no [metrics] table, so kracauer serves no status "
                          f"(add [metrics] listen = \"127.0.0.1:9477\" and restart it)")
    address = metrics.address
    if address.is_unspecified:
        host = "[::1]" if address.version == 6 else "127.0.0.1"
    else:
        host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{metrics.port}/metrics"


def fetch(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot read {url}: {reason} (is kracauer running, with [metrics] listen?)") from None


_WORKER_COLUMNS = {"kracauer_worker_up": 0, "kracauer_worker_restarts_total": 1,
                   "kracauer_worker_connections_active": 2}


def parse(text: str) -> Status:
    """The figures `kracauer status` shows, from the Prometheus text of kracauer's /metrics."""
    status = Status()
    seen = False
    outcomes: dict[str, float] = defaultdict(float)
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise StatusError(f"not Prometheus text: {exc}") from None
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "kracauer_build_info":
                status.version = labels.get("version", "?")
                seen = True
            elif name == "kracauer_uptime_seconds":
                status.uptime = value
            elif name == "kracauer_connections_active":
                status.active = int(value)
            elif name == "kracauer_connections_peeking":
                status.peeking = int(value)
            elif name == "kracauer_udp_flows_active":
                status.udp_flows = int(value)
            elif name == "kracauer_udp_flows_in_kernel":
                status.udp_in_kernel = int(value)
            elif name == "kracauer_connections_half_open":
                status.half_open = int(value)
            elif name == "kracauer_connections_opened_total":
                status.opened += int(value)
            elif name == "kracauer_connections_closed_total":
                status.closed += int(value)
                outcomes[labels.get("outcome", "?")] += value
            elif name == "kracauer_restored_connections":
                status.restored = int(value)
            elif name == "kracauer_connections_active_by_route":
                key = (labels.get("route", ""), labels.get("host", ""))
                status.by_route[key] = status.by_route.get(key, 0) + int(value)
            elif name == "kracauer_connections_by_state":
                status.by_state[labels.get("state", "?")] = int(value)
            elif name == "kracauer_packets_dropped_total":
                status.drops[labels.get("reason", "?")] = int(value)
            elif name == "kracauer_config_last_reload_successful":
                status.reload_ok = value == 1
            elif name == "kracauer_workers":
                status.workers = int(value)
            elif name.startswith("kracauer_agent"):
                _agent_sample(status, name, labels, value)
            elif name in _WORKER_COLUMNS:
                row = status.worker_rows.setdefault(labels.get("worker", "?"), [0.0, 0.0, 0.0])
                row[_WORKER_COLUMNS[name]] = value
    if not seen:
        raise StatusError("no kracauer_build_info in the metrics: is this kracauer's endpoint?")
    status.outcomes = {k: int(v) for k, v in outcomes.items() if v}
    return status


def _agent_sample(status: Status, name: str, labels: dict[str, str], value: float) -> None:
    if status.agents is None:
        status.agents = {}
    if name == "kracauer_agent_refusals_total":
        status.agent_refusals[labels.get("reason", "?")] = int(value)
        return
    agent = labels.get("agent")
    if agent is None or agent == "-":
        return
    row = status.agents.setdefault(agent, AgentRow())
    if name == "kracauer_agent_info":
        row.names, row.peer = labels.get("names", "").replace(",", ", "), labels.get("peer", "")
    elif name == "kracauer_agent_packets_total":
        if labels.get("direction") == "to_agent":
            row.packets_to = int(value)
        else:
            row.packets_from = int(value)
    elif name == "kracauer_agent_bytes_total":
        if labels.get("direction") == "to_agent":
            row.bytes_to = int(value)
        else:
            row.bytes_from = int(value)
    elif name == "kracauer_agent_drops_total":
        row.drops += int(value)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _agent_lines(status: Status) -> list[str]:
    agents = status.agents or {}
    lines = [f"agents: {len(agents)} connected"
             + (f"; refused at registration: {_pairs(status.agent_refusals)}" if status.agent_refusals else "")]
    if agents:
        table = [("agent", "names", "peer", "to agent", "from agent", "drops")]
        for address, row in sorted(agents.items()):
            table.append((address, row.names, row.peer, f"{row.packets_to} pkts {_size(row.bytes_to)}",
                          f"{row.packets_from} pkts {_size(row.bytes_from)}", str(row.drops)))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _pairs(counts: dict[str, int]) -> str:
    items = sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v}" for k, v in items) if items else "none"


def format_status(status: Status, url: str) -> str:
    lines = [f"kracauer {status.version} up {_duration(status.uptime)} ({url})"]
    if not status.reload_ok:
        lines.append("the last configuration reload was refused (see kracauer's log)")
    states = _pairs(status.by_state) if status.by_state else f"{status.peeking} peeking"
    quic = f" and {status.udp_flows} quic flows" if status.udp_flows else ""
    if status.udp_in_kernel:
        quic += f" ({status.udp_in_kernel} in the kernel)"
    lines.append(f"connections: {status.active} tracked{quic} ({states}; {status.half_open} half-open), "
                 f"{status.opened} opened, {status.closed} closed, {status.restored} restored at start")
    rows = sorted(status.by_route.items(), key=lambda kv: (kv[0][0] == "", kv[0][0], kv[0][1]))
    if rows:
        table = [("route", "host", "active")]
        table += [(route or "(no host yet)", host or "-", str(n)) for (route, host), n in rows]
        widths = [max(len(row[i]) for row in table) for i in range(3)]
        for row in table:
            lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    if status.workers:
        rows = sorted(status.worker_rows.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1)
        up = sum(1 for _, (alive, _, _) in rows if alive)
        lines.append(f"workers: {status.workers} ({up} up): " + ", ".join(
            f"{w}: {int(active)} active" + (f", {int(restarts)} restarts" if restarts else "")
            + ("" if alive else ", down") for w, (alive, restarts, active) in rows))
    if status.agents is not None:
        lines.extend(_agent_lines(status))
    lines.append("closed by outcome: " + _pairs(status.outcomes))
    lines.append("packets dropped by reason: " + _pairs(status.drops))
    return "\n".join(lines)
