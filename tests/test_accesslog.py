"""kracauer.accesslog: one JSON line per finished connection, written by a thread (issue #5)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from kracauer import accesslog
from kracauer.accesslog import AccessLog, record_fields
from netstack.tracker import ConnectionRecord

TLS = ConnectionRecord(
    start=1000.0, duration=0.0072, client="198.51.100.2", client_port=45740, listener="192.0.2.10:443",
    protocol="tls", name="www.example.com", alpn=("h2", "http/1.1"), route="www.example.com",
    host="2001:db8::10", host_port=443, bytes_to_host=722, bytes_to_client=1734, packets_to_host=7,
    packets_to_client=9, hello_size=1812, outcome="closed", hello_segments=2, hello_records=1,
    connect_time=0.0011,
)
TCP = ConnectionRecord(
    start=1000.0, duration=1.5, client="198.51.100.2", client_port=40000, listener="192.0.2.10:22",
    protocol="tcp", name=None, alpn=(), route="listener", host="2001:db8::22", host_port=22,
    bytes_to_host=10, bytes_to_client=20, packets_to_host=3, packets_to_client=4, hello_size=0,
    outcome="reset_by_host",
)
REFUSED = ConnectionRecord(
    start=1000.0, duration=0.001, client="198.51.100.2", client_port=40001, listener="192.0.2.10:80",
    protocol="http", name="unknown.invalid", alpn=(), route=None, host=None, host_port=None,
    bytes_to_host=0, bytes_to_client=0, packets_to_host=0, packets_to_client=1, hello_size=79,
    outcome="refused_unknown_name", hello_segments=1,
)

KEYS = ["start", "duration", "client", "client_port", "listener", "protocol", "name", "alpn", "route", "host",
        "host_port", "bytes_to_host", "bytes_to_client", "packets_to_host", "packets_to_client", "outcome",
        "connect_time"]


def test_tls_record_has_every_field_in_order_with_the_hello_details():
    fields = record_fields(TLS, 1_750_000_000.25)
    assert list(fields) == KEYS + ["hello_size", "hello_segments", "hello_records"]
    assert fields["start"] == "2025-06-15T15:06:40.250000Z"
    assert fields["alpn"] == ["h2", "http/1.1"]
    assert (fields["hello_size"], fields["hello_segments"], fields["hello_records"]) == (1812, 2, 1)
    assert (fields["bytes_to_host"], fields["bytes_to_client"]) == (722, 1734)
    assert (fields["packets_to_host"], fields["packets_to_client"]) == (7, 9)
    assert fields["connect_time"] == 0.0011
    assert fields["outcome"] == "closed"


def test_tcp_record_has_no_hello_fields_and_unknowns_are_null():
    fields = record_fields(TCP, 0.0)
    assert list(fields) == KEYS
    assert fields["name"] is None and fields["connect_time"] is None
    assert fields["start"] == "1970-01-01T00:00:00.000000Z"


def test_http_refusal_has_hello_size_but_no_tls_records():
    fields = record_fields(REFUSED, 0.0)
    assert list(fields) == KEYS + ["hello_size", "hello_segments"]
    assert fields["route"] is None and fields["host"] is None and fields["host_port"] is None


def test_file_gets_one_json_object_per_line_with_the_start_on_the_wall_clock(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    # Monotonic 1000.0 with the wall clock 1.75e9 s ahead of it.
    for record in (TLS, TCP, REFUSED):
        log.log(record, wall_offset=1_750_000_000.0 - 1000.0)
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    entries = [json.loads(line) for line in lines]
    assert [e["outcome"] for e in entries] == ["closed", "reset_by_host", "refused_unknown_name"]
    assert entries[0]["start"] == "2025-06-15T15:06:40.000000Z"
    assert entries[0]["name"] == "www.example.com" and entries[1]["name"] is None


def test_dash_writes_to_stdout(capsys):
    log = AccessLog("-")
    log.log(TLS, 0.0)
    log.close()
    out = capsys.readouterr().out
    assert json.loads(out)["client_port"] == 45740


def test_a_stuck_writer_never_blocks_the_caller_and_lost_lines_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(accesslog, "QUEUE_SIZE", 4)
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    release = threading.Event()
    started = threading.Event()
    emit = log.handler.emit

    def stuck(record):
        started.set()
        release.wait(10)
        emit(record)

    monkeypatch.setattr(log.handler, "emit", stuck)
    log.log(TLS, 0.0)
    assert started.wait(5)  # the writer holds the first record
    t0 = time.monotonic()
    for _ in range(100):
        log.log(TCP, 0.0)
    assert time.monotonic() - t0 < 1.0
    assert log.dropped == 100 - 4
    release.set()
    log.close()
    assert len(path.read_text().splitlines()) == 1 + 4


def test_a_rotated_file_is_reopened_by_name(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.log(TLS, 0.0)
    deadline = time.monotonic() + 5
    while not path.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.rename(path, tmp_path / "access.log.1")  # what logrotate does
    log.log(TCP, 0.0)
    log.close()
    assert json.loads((tmp_path / "access.log.1").read_text())["protocol"] == "tls"
    assert json.loads(path.read_text())["protocol"] == "tcp"


def test_an_unwritable_path_fails_at_once(tmp_path):
    with pytest.raises(OSError):
        AccessLog(str(tmp_path / "missing-dir" / "access.log"))
