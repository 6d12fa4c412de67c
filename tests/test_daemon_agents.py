"""The daemon's side of the agents: the hub's changes re-route the tracker, and the A message to workers.

The hub itself (kracauer.agents) is tested in tests/test_agents.py; here the
packet loop's part (Daemon._agents_changed, as the services thread posts it)
runs against a real tracker, with a datagram socket standing in for the TUN.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
from types import SimpleNamespace

import pytest

from kracauer.config import parse_config
from kracauer.daemon import Daemon
from kracauer.workers import agents_message, parse_agents_message
from tests.test_daemon_reload import FakeNotifier
from tests.test_tracker import CHROME, Box, Walk, parse

V6 = ipaddress.IPv6Address
AGENT = V6("fd00:6b72::2")

CONFIG = """\
[tun]
offload = false

[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"

[agents]
listen = "127.0.0.1:4444"
cert = "/etc/kracauer/box.pem"
key = "/etc/kracauer/box.key"
"""


@pytest.fixture
def daemon():
    d = Daemon(parse_config(CONFIG), notifier=FakeNotifier())
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.tun = SimpleNamespace(fd=w.fileno())
    d.tun_read = r.fileno()
    yield d
    d._stop_services()
    r.close()
    w.close()


def written(daemon: Daemon) -> list:
    out = []
    while select.select([daemon.tun_read], [], [], 0)[0]:
        out.append(parse(os.read(daemon.tun_read, 65536)))
    return out


def box_of(daemon: Daemon) -> Box:
    box = Box()
    box.tracker = daemon.tracker
    return box


def test_an_agents_name_is_routed_once_registered_and_refused_once_it_is_gone(daemon):
    box = box_of(daemon)
    # Nothing registered: the name (www.example.com, the hello's SNI) is unknown.
    walk = Walk(box, sport=41000)
    walk.handshake()
    refusal = walk.send_hello(CHROME)
    assert refusal and all(out.v4 for out in refusal)  # the alert, not a SYN to a host

    daemon._agents_changed({"www.example.com": (AGENT,)}, [])
    walk = Walk(box, sport=41001)
    walk.establish()
    assert walk.host == str(AGENT)

    # The agent goes: its established connection ends with an RST to the client, now.
    daemon._agents_changed({}, [AGENT])
    [rst] = written(daemon)
    assert rst.v4 and rst.flags == "RA" and rst.tcp.dport == 41001
    assert box.tracker.records[-1].outcome == "host_gone"
    walk = Walk(box, sport=41002)
    walk.handshake()
    refusal = walk.send_hello(CHROME)
    assert refusal and all(out.v4 for out in refusal)


def test_a_reload_keeps_the_agents_names(daemon):
    daemon._agents_changed({"www.example.com": (AGENT,)}, [])
    assert daemon._apply(parse_config(CONFIG + '\n[[route]]\nname = "x.example.net"\nhost = "2001:db8::30"\n'))
    walk = Walk(box_of(daemon), sport=41010)
    walk.handshake()
    assert walk.expect_host_syn(walk.send_hello(CHROME)).ip.dst == str(AGENT)


def test_a_change_posted_while_stopping_only_updates_the_table(daemon):
    daemon.tun = SimpleNamespace(fd=-1)
    daemon._agents_changed({}, [AGENT])
    assert daemon.agent_table == {}


def test_the_workers_message_carries_the_whole_table_and_the_gone_agents():
    routes = {"app.example.com": (AGENT, V6("fd00:6b72::3")), "*.dev.example.com": (AGENT,)}
    message = json.loads(json.dumps(agents_message(routes, [V6("fd00:6b72::9")])))
    assert parse_agents_message(message) == (routes, [V6("fd00:6b72::9")])


def test_at_a_start_connections_restored_through_agents_are_reset_and_others_kept():
    d = Daemon(parse_config(CONFIG + '\n[fallback]\nhost = "2001:db8::10"\n'), notifier=FakeNotifier())
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.tun = SimpleNamespace(fd=w.fileno())
    d.tun_read = r.fileno()
    try:
        box = box_of(d)
        other = Walk(box, sport=41020)
        other.establish()
        assert other.host == "2001:db8::10"
        d._agents_changed({"www.example.com": (AGENT,)}, [])
        through = Walk(box, sport=41021)
        through.establish()
        assert through.host == str(AGENT)
        # As if restored from [state] by a new process: the agents' tunnels went with the old one.
        d._forget_agents_connections()
        [rst] = written(d)
        assert rst.v4 and rst.flags == "RA" and rst.tcp.dport == 41021
        assert box.connections == 1
    finally:
        d._stop_services()
        r.close()
        w.close()
