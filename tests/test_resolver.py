"""The daemon's resolver: config routes as the tracker sees them (kracauer.daemon.build_resolver)."""

from __future__ import annotations

import ipaddress

from kracauer.config import parse_config
from kracauer.daemon import build_resolver, tracker_listeners
from netstack.peek import Decision

CONFIG = """
[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"

[[listen]]
address = "192.0.2.11"
port = 443
protocol = "tls"
prefix = "64:ff9b:2::/96"

[[listen]]
address = "192.0.2.10"
port = 22
protocol = "tcp"
host = ["2001:db8::22", "2001:db8::23"]

[[route]]
name = "www.example.com"
host = ["2001:db8::10", "2001:db8::11"]

[[route]]
name = "www.example.com"
alpn = "acme-tls/1"
host = "2001:db8::ac"
"""


def packed(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def test_resolver_maps_routes_alpn_tcp_listeners_and_prefixes():
    config = parse_config(CONFIG)
    listeners = tracker_listeners(config)
    resolve = build_resolver(config)
    tls, tls2, tcp = listeners
    web = resolve(tls, Decision("www.example.com", ("h2",)))
    assert web.hosts == (packed("2001:db8::10"), packed("2001:db8::11")) and web.port == 443
    acme = resolve(tls, Decision("www.example.com", ("acme-tls/1",)))
    assert acme.hosts == (packed("2001:db8::ac"),) and acme.route == "www.example.com"
    assert resolve(tls, Decision("other.example.com")) is None
    ssh = resolve(tcp, Decision(None))
    assert ssh.hosts == (packed("2001:db8::22"), packed("2001:db8::23")) and ssh.port == 22
    assert tls.prefix is None and tls2.prefix == ipaddress.IPv6Address("64:ff9b:2::").packed[:12]
    # Connections to one route share one Target.
    assert resolve(tls2, Decision("www.example.com")) is resolve(tls, Decision("www.example.com", ("h2",)))


def test_random_pool_gives_distinct_32_bit_values_across_refills():
    from kracauer.daemon import RandomPool

    pool = RandomPool(batch=8)
    values = [pool() for _ in range(50)]  # several refills
    assert all(0 <= v < 1 << 32 for v in values)
    assert len(set(values)) >= 48  # collisions among 50 random 32-bit values are vanishingly rare
