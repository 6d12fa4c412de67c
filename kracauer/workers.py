"""What the supervisor and its workers say to each other, and the one /metrics made of theirs.

With ``[tun] workers = N`` (N > 1) kracauer is one supervisor process and N
worker processes (kracauer/supervisor.py, kracauer/worker.py). Each worker
has a ``Channel`` to the supervisor: one end of a SOCK_SEQPACKET socket pair,
so every message arrives whole or not at all (a worker never tears a line,
and never blocks its packet loop on the supervisor: a message that does not
fit the socket's buffer is counted and dropped, as a full log queue is).

A message is one type byte and a payload:

=====  =========================  ==============================================
type   direction                  payload
=====  =========================  ==============================================
``R``  worker → supervisor        ready: JSON {"restored": n}
``S``  worker → supervisor        once a second: JSON {"connections": n, ...}
``M``  worker → supervisor        once a second: its Prometheus text exposition
``L``  worker → supervisor        one access-log line (JSON, no newline)
``H``  both ways                  passive health changed: JSON [host, port, fails, until]
``Q``  both ways                  a QUIC host's connection ID (NAT rebinding, netstack.udptracker):
                                  JSON [cid, listener, host, port, route, name, alpn]
``C``  supervisor → worker        reload: JSON {"text": config text, "source": path}
``c``  worker → supervisor        reload done: JSON {"ok": true|false}
``A``  supervisor → worker        agents changed: JSON {"routes": {name: [address,
                                  ...]}, "gone": [address, ...]} (kracauer/agents.py;
                                  the whole table each time, so a restarted worker
                                  is brought up to date with one message)
=====  =========================  ==============================================

The supervisor answers /metrics from the workers' latest texts
(``merge_expositions``): counters, histograms and most gauges are summed; the
families only the supervisor knows (the kernel path's counters, reloads,
build and uptime) are its own.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Channel", "TableCounts", "channel_pair", "merge_expositions", "MESSAGE_MAX"]

# The largest message (a worker's metrics text with many routes and hosts).
MESSAGE_MAX = 4 << 20
# Socket buffers: room for a metrics text and a burst of log lines.
SOCKET_BUFFER = 8 << 20

READY, STATUS, METRICS, LOG, HEALTH, RELOAD, RELOADED = b"R", b"S", b"M", b"L", b"H", b"C", b"c"
QUIC_CID = b"Q"
AGENTS = b"A"


def agents_message(routes: dict[str, Any], gone: Iterable[Any]) -> dict[str, Any]:
    """The ``A`` message's JSON for name → addresses and the addresses of agents that went."""
    return {"routes": {name: [str(a) for a in hosts] for name, hosts in routes.items()},
            "gone": [str(a) for a in gone]}


def parse_agents_message(message: dict[str, Any]) -> tuple[dict[str, tuple[Any, ...]], list[Any]]:
    import ipaddress

    routes = {str(name): tuple(ipaddress.IPv6Address(a) for a in hosts) for name, hosts in message["routes"].items()}
    return routes, [ipaddress.IPv6Address(a) for a in message["gone"]]


class Channel:
    """One end of a supervisor–worker socket pair (non-blocking; messages whole or not at all)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.dropped = 0
        self._buf = bytearray(MESSAGE_MAX + 1)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, kind: bytes, payload: bytes) -> bool:
        """Send one message; False (counted in `dropped`) if the peer's buffer is full or it is gone."""
        try:
            self.sock.send(kind + payload)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
            return False
        except OSError:
            self.dropped += 1
            return False
        return True

    def send_json(self, kind: bytes, value: Any) -> bool:
        return self.send(kind, json.dumps(value, separators=(",", ":")).encode())

    def receive(self) -> Iterator[tuple[bytes, bytes]]:
        """Every message waiting now, as (type, payload); raises EOFError when the peer has gone."""
        view = memoryview(self._buf)
        while True:
            try:
                n = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:
                raise EOFError from None
            if n == 0:
                raise EOFError
            if n > MESSAGE_MAX:  # truncated: cannot happen with the sender's checks; skip it
                continue
            yield bytes(view[:1]), bytes(view[1:n])

    def close(self) -> None:
        self.sock.close()


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A (supervisor end, worker end) socket pair with large buffers (set while still root)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (a, b):
        for option, forced in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # SO_SNDBUFFORCE, SO_RCVBUFFORCE
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    b.set_inheritable(True)
    return a, b


class TableCounts:
    """How many connections each worker holds, in memory all of them share (a memfd, one u64 per worker).

    ``[limits] max_connections`` is the box's: a worker refuses a new client
    when its own table and the others' reach it. Each worker writes only its
    own slot (after each round of packets) and reads the others'; a figure a
    round old is close enough for a limit.
    """

    SLOT = struct.Struct("=Q")

    def __init__(self, fd: int, workers: int) -> None:
        self.fd = fd
        self.workers = workers
        self.map = mmap.mmap(fd, self.SLOT.size * workers)

    @classmethod
    def create(cls, workers: int) -> TableCounts:
        fd = os.memfd_create("kracauer-table-counts", os.MFD_CLOEXEC)
        os.ftruncate(fd, cls.SLOT.size * workers)
        return cls(fd, workers)

    def set(self, worker: int, count: int) -> None:
        self.SLOT.pack_into(self.map, worker * self.SLOT.size, count)

    def others(self, worker: int) -> int:
        unpack, size = self.SLOT.unpack_from, self.SLOT.size
        return sum(unpack(self.map, i * size)[0] for i in range(self.workers) if i != worker)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


# -- one /metrics from many ----------------------------------------------------

# Gauges that are the same kind of fact in every process: the earliest or the
# largest stands for all, a sum would mean nothing.
_MIN_GAUGES = frozenset({"process_start_time_seconds", "kracauer_start_time_seconds"})
_MAX_GAUGES = frozenset({"process_max_fds", "kracauer_uptime_seconds"})


def _families(text: str) -> Iterator[Metric]:
    try:
        yield from text_string_to_metric_families(text)
    except ValueError:
        return


def merge_expositions(own: Iterable[Metric], workers: Iterable[str]) -> list[Metric]:
    """The supervisor's families plus the workers' texts, combined into one set of families.

    A family the supervisor has itself (`own`) is taken as it is, except the
    process_* ones, which cover every process; every other family is summed
    sample by sample over the workers (same name and labels: one sample).
    """
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    authoritative: set[str] = set()
    for family in own:
        merged[family.name] = family
        if not family.name.startswith("process_"):
            authoritative.add(family.name)
            continue
        values[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    for text in workers:
        for family in _families(text):
            if family.name in authoritative:
                continue
            if family.name not in merged:
                merged[family.name] = family
                values[family.name] = {}
            samples = values[family.name]
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = samples.get(key)
                if old is None:
                    samples[key] = s.value
                elif family.name in _MIN_GAUGES:
                    samples[key] = min(old, s.value)
                elif family.name in _MAX_GAUGES:
                    samples[key] = max(old, s.value)
                else:
                    samples[key] = old + s.value
    out = []
    for name, family in merged.items():
        if name in authoritative:
            out.append(family)
            continue
        combined = Metric(family.name, family.documentation, family.type, family.unit)
        for (sample_name, labels), value in values[name].items():
            combined.add_sample(sample_name, dict(labels), value)
        out.append(combined)
    return out
