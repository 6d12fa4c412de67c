"""The daemon's route by DNS: a real lookup on the services thread re-drives the waiting connection.

A UDP DNS server on 127.0.0.1 (a thread, answers built by scapy) answers the
daemon's resolver; the packet loop's part is played by the test: it waits
on the services' wake-up pipe and runs what was posted, as Daemon._loop
does. The packets the daemon writes go to a datagram socket standing in for the TUN.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR

from kracauer.config import parse_config
from kracauer.daemon import Daemon
from tests.test_daemon_reload import FakeNotifier
from tests.test_tracker import CHROME, HOST_ORG, HOST_WWW, Box, Walk, parse

CONFIG = """\
[tun]
offload = false

[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"

[[route]]
name = "*.example.com"
resolve = true
networks = ["2001:db8::/112"]

[resolver]
servers = ["127.0.0.1:{port}"]
timeout = {timeout}
"""


class DnsServer(threading.Thread):
    """Answers every AAAA query with `addresses` (TTL 60), counting the queries."""

    def __init__(self, addresses=(HOST_WWW,)) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.addresses = addresses
        self.queries = 0
        # Cleared: answers wait until it is set (so that a test can keep a lookup in flight).
        self.release = threading.Event()
        self.release.set()

    def run(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            self.queries += 1
            self.release.wait(5)
            query = DNS(data)
            q = query.qd[0]
            an = [DNSRR(rrname=q.qname, type="AAAA", ttl=60, rdata=a) for a in self.addresses]
            self.sock.sendto(bytes(DNS(id=query.id, qr=1, rd=1, ra=1, qd=[DNSQR(qname=q.qname, qtype=28)], an=an)),
                             peer)


@pytest.fixture
def server():
    s = DnsServer()
    s.start()
    yield s
    s.sock.close()


@pytest.fixture
def daemon(server):
    d = Daemon(parse_config(CONFIG.format(port=server.port, timeout=2)), notifier=FakeNotifier())
    # A datagram socket pair: one packet per write, as a TUN keeps them.
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.tun = SimpleNamespace(fd=w.fileno())
    d.tun_read = r.fileno()
    yield d
    d._stop_services()
    r.close()
    w.close()


def run_posted_until(daemon: Daemon, done, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "nothing was posted back"
        if daemon.services is not None:
            select.select([daemon.services.wake_fd], [], [], 0.05)
            daemon.services.run_posted()
        else:
            time.sleep(0.01)


def written(daemon: Daemon) -> list:
    out = []
    while select.select([daemon.tun_read], [], [], 0)[0]:
        out.append(parse(os.read(daemon.tun_read, 65536)))
    return out


def test_a_looked_up_name_binds_the_waiting_connections_with_one_query(daemon, server):
    box = Box()
    box.tracker = daemon.tracker
    walks = [Walk(box, sport=40000 + i) for i in range(3)]
    server.release.clear()  # the answer waits until every hello is held (else the cache may serve the last)
    for walk in walks:
        walk.handshake()
        assert walk.send_hello(CHROME) == []  # www.example.com: looked up, the hello held
    assert daemon.services is not None and daemon.services.running
    server.release.set()
    run_posted_until(daemon, lambda: not daemon.tracker.waiting)
    syns = written(daemon)
    assert sorted(s.tcp.sport for s in syns) == [40000, 40001, 40002]
    assert {s.ip.dst for s in syns} == {HOST_WWW} and all(s.flags == "S" for s in syns)
    assert server.queries == 1
    # The next connection is routed from the cache at once.
    walk = Walk(box, sport=40010)
    walk.handshake()
    assert walk.expect_host_syn(walk.send_hello(CHROME)).ip.dst == HOST_WWW
    assert server.queries == 1
    assert len(daemon.names) == 1


def test_a_reload_keeps_the_resolver_unless_resolver_changed(daemon, server, tmp_path):
    first = daemon.names
    same = parse_config(CONFIG.format(port=server.port, timeout=2) + '\n[[route]]\nname = "x.example.net"\n'
                                                                       'host = "2001:db8::30"\n')
    assert daemon._apply(same) is True and daemon.names is first
    other = DnsServer(addresses=(HOST_ORG,))
    other.start()
    try:
        assert daemon._apply(parse_config(CONFIG.format(port=other.port, timeout=1))) is True
        assert daemon.names is not first and len(daemon.names) == 0
        box = Box()
        box.tracker = daemon.tracker
        walk = Walk(box)
        walk.handshake()
        assert walk.send_hello(CHROME) == []
        run_posted_until(daemon, lambda: not daemon.tracker.waiting)
        [syn] = written(daemon)
        assert syn.ip.dst == HOST_ORG and other.queries == 1
    finally:
        other.sock.close()
