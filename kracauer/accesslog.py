"""The access log: one JSON object per line for each connection, written when it ends.

``[log] access = "/var/log/kracauer/access.log"`` (or ``"-"`` for stdout).
The packet loop never writes a file itself: it hands each finished
connection's record to a ``QueueHandler`` (a bounded queue, never blocking;
records that do not fit are counted in ``dropped`` and lost), and a
``QueueListener`` thread turns them into JSON and writes them. The file is a
``WatchedFileHandler``: after logrotate moves it away, the next line goes to
a new file of the same name (no signal needed).

A line, with the keys in this order (docs/operations.md describes them)::

    {"start": "2025-06-01T12:00:00.123456Z", "duration": 0.007, "client": "198.51.100.2",
     "client_port": 45740, "listener": "192.0.2.10:443", "protocol": "tls",
     "name": "www.example.com", "alpn": ["h2", "http/1.1"], "route": "www.example.com",
     "host": "2001:db8::10", "host_port": 443, "bytes_to_host": 722, "bytes_to_client": 1734,
     "packets_to_host": 7, "packets_to_client": 9, "outcome": "closed", "connect_time": 0.0011,
     "hello_size": 517, "hello_segments": 1, "hello_records": 1}

``hello_*`` keys appear for tls, http and connect listeners (``hello_records`` for tls
only); quic listeners' lines have ``hello_size`` and ``hello_datagrams`` (the Initial
datagrams that carried the ClientHello), and their ``packets_*`` count datagrams.
Values that are not known are ``null``.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

from netstack.tracker import ConnectionRecord

__all__ = ["AccessLog", "NonBlockingQueueHandler", "record_fields"]

# Records waiting for the writer thread; past this many the newest are dropped.
QUEUE_SIZE = 65536


def _iso(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_fields(record: ConnectionRecord, start_wall: float) -> dict[str, Any]:
    """The access-log object for `record`, which started at `start_wall` (Unix time)."""
    fields: dict[str, Any] = {
        "start": _iso(start_wall),
        "duration": round(record.duration, 6),
        "client": record.client,
        "client_port": record.client_port,
        "listener": record.listener,
        "protocol": record.protocol,
        "name": record.name,
        "alpn": list(record.alpn),
        "route": record.route,
        "host": record.host,
        "host_port": record.host_port,
        "bytes_to_host": record.bytes_to_host,
        "bytes_to_client": record.bytes_to_client,
        "packets_to_host": record.packets_to_host,
        "packets_to_client": record.packets_to_client,
        "outcome": record.outcome,
        "connect_time": None if record.connect_time is None else round(record.connect_time, 6),
    }
    if record.protocol in ("tls", "http", "connect"):
        fields["hello_size"] = record.hello_size
        fields["hello_segments"] = record.hello_segments
        if record.protocol == "tls":
            fields["hello_records"] = record.hello_records
    elif record.protocol == "quic":
        # packets_* count datagrams; bytes_* their UDP payloads (QUIC packets, encrypted).
        fields["hello_size"] = record.hello_size
        fields["hello_datagrams"] = record.hello_segments
    return fields


class JsonRecordFormatter(logging.Formatter):
    """Formats the log records AccessLog makes (they carry a ConnectionRecord) as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        line = getattr(record, "line", None)
        if line is not None:
            return line  # formatted by a worker (kracauer/worker.py)
        conn = getattr(record, "connection", None)
        if conn is None:
            return json.dumps({"message": record.getMessage()})
        return json.dumps(record_fields(conn, record.start_wall), ensure_ascii=False, separators=(", ", ": "))


class NonBlockingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler on a bounded queue that drops (and counts) instead of blocking or raising.

    With ``defer_format``, records go into the queue as they are and the
    listener's handlers format them in the writer thread.
    """

    def __init__(self, q: queue.Queue, *, defer_format: bool = False) -> None:
        super().__init__(q)
        self.defer_format = defer_format
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if self.defer_format:
            return record
        return super().prepare(record)

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Listener(logging.handlers.QueueListener):
    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel)  # at shutdown waiting is fine: the writer is draining


class AccessLog:
    """Where finished connections are logged; `log()` is cheap and never blocks."""

    def __init__(self, target: str) -> None:
        self.target = target
        if target == "-":
            self.handler: logging.Handler = logging.StreamHandler(sys.stdout)
        else:
            # Opened now (possibly still as root), so a later privilege drop does not stop it.
            self.handler = logging.handlers.WatchedFileHandler(target, encoding="utf-8")
        self.handler.setFormatter(JsonRecordFormatter())
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._producer = NonBlockingQueueHandler(self._queue, defer_format=True)
        self._listener = _Listener(self._queue, self.handler)
        self._listener.start()
        self._running = True

    @property
    def dropped(self) -> int:
        """Records lost because the writer could not keep up."""
        return self._producer.dropped

    def log(self, record: ConnectionRecord, wall_offset: float | None = None) -> None:
        """Queue `record`; `wall_offset` is time.time() - time.monotonic() (the tracker's clock)."""
        if wall_offset is None:
            wall_offset = time.time() - time.monotonic()
        entry = logging.LogRecord("kracauer.access", logging.INFO, "", 0, "", None, None)
        entry.connection = record
        entry.start_wall = record.start + wall_offset
        self._producer.handle(entry)

    def write_line(self, line: str) -> None:
        """Queue a line a worker formatted (one JSON object, no newline)."""
        entry = logging.LogRecord("kracauer.access", logging.INFO, "", 0, "", None, None)
        entry.line = line
        self._producer.handle(entry)

    def close(self) -> None:
        """Write what is queued, then close the file."""
        if self._running:
            self._running = False
            self._listener.stop()
            self.handler.close()
