"""kracauer.resolver: the DNS client, the cache, and resolve routes as the tracker sees them.

The DNS servers here are small asyncio servers on 127.0.0.1 (UDP and TCP)
whose answers scapy builds; each test says how its server behaves (answers,
stays silent, answers with the wrong ID, truncates, fails).
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR, DNSRRSOA

from kracauer.config import ConfigError, ResolverConfig, parse_config
from kracauer.daemon import build_resolver, tracker_listeners
from kracauer.resolver import (
    ANSWER, ERROR, NODATA, NXDOMAIN, TIMEOUT, Answer, DnsClient, NameResolver, hosts_for, system_servers,
)
from kracauer.routing import Router, Target
from kracauer.services import Services
from netstack.peek import Decision
from netstack.tracker import Pending, Refused

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
LOCAL = V4("127.0.0.1")
NAME = "a.service.example.com"
INSIDE = "2001:db8:100::10"
OUTSIDE = "2001:db8:999::10"


def answer_for(query: DNS, addresses=(INSIDE,), ttl=300, rcode=0, tc=0, id=None, soa=None, qname=None) -> bytes:
    q = query.qd[0]
    an = [DNSRR(rrname=q.qname, type="AAAA", ttl=ttl, rdata=a) for a in addresses]
    ns = [soa] if soa is not None else []
    return bytes(DNS(id=query.id if id is None else id, qr=1, rd=1, ra=1, rcode=rcode, tc=tc,
                     qd=[DNSQR(qname=qname or q.qname, qtype=q.qtype)], an=an, ns=ns))


class Server:
    """A DNS server on 127.0.0.1: `udp(query) -> [datagrams]`, `tcp(query) -> answer`; it notes each query."""

    def __init__(self, udp=None, tcp=None) -> None:
        self.udp = udp or (lambda q: [answer_for(q)])
        self.tcp = tcp or (lambda q: answer_for(q))
        self.queries: list[DNS] = []
        self.tcp_queries: list[DNS] = []
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                query = DNS(data)
                server.queries.append(query)
                for datagram in server.udp(query):
                    self.transport.sendto(datagram, addr)

        self.transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
        self.port = self.transport.get_extra_info("sockname")[1]

        async def handle(reader, writer):
            length = int.from_bytes(await reader.readexactly(2), "big")
            query = DNS(await reader.readexactly(length))
            self.tcp_queries.append(query)
            data = self.tcp(query)
            writer.write(len(data).to_bytes(2, "big") + data)
            await writer.drain()
            writer.close()

        self.tcp_server = await asyncio.start_server(handle, "127.0.0.1", self.port)

    def close(self) -> None:
        self.transport.close()
        self.tcp_server.close()

    @property
    def address(self):
        return (LOCAL, self.port)


def run(coro):
    return asyncio.run(coro)


async def with_servers(*servers: Server):
    for server in servers:
        await server.start()


# ------------------------------------------------------------------ the client

def test_an_answer_gives_the_addresses_and_ttl_and_the_query_is_an_aaaa_with_a_random_id():
    async def main():
        server = Server(udp=lambda q: [answer_for(q, (INSIDE, OUTSIDE), ttl=42)])
        await server.start()
        client = DnsClient([server.address], timeout=1.0)
        first = await client.lookup(NAME)
        second = await client.lookup(NAME)
        server.close()
        return server, first, second

    server, first, second = run(main())
    assert first == Answer(ANSWER, (V6(INSIDE), V6(OUTSIDE)), 42.0) == second
    assert [q.qd[0].qname for q in server.queries] == [b"a.service.example.com."] * 2
    assert all(q.qd[0].qtype == 28 and q.rd == 1 for q in server.queries)
    ids = {q.id for q in server.queries}
    assert len(ids) == 2  # a fresh ID per query (a 1 in 65536 chance of a false failure)


def test_answers_with_the_wrong_id_or_question_are_ignored():
    def udp(q):
        return [answer_for(q, (OUTSIDE,), id=(q.id + 1) & 0xFFFF),
                answer_for(q, (OUTSIDE,), qname="evil.example.net"),
                b"\x00garbage",
                answer_for(q, (INSIDE,))]

    async def main():
        server = Server(udp=udp)
        await server.start()
        answer = await DnsClient([server.address], timeout=1.0).lookup(NAME)
        server.close()
        return answer

    assert run(main()).addresses == (V6(INSIDE),)


def test_a_truncated_answer_is_asked_again_over_tcp():
    async def main():
        server = Server(udp=lambda q: [answer_for(q, (), tc=1)], tcp=lambda q: answer_for(q, (INSIDE, OUTSIDE)))
        await server.start()
        answer = await DnsClient([server.address], timeout=1.0).lookup(NAME)
        server.close()
        return server, answer

    server, answer = run(main())
    assert answer.addresses == (V6(INSIDE), V6(OUTSIDE))
    assert len(server.tcp_queries) == 1 and server.tcp_queries[0].qd[0].qname == b"a.service.example.com."


@pytest.mark.parametrize("first", ["silent", "servfail", "refused"])
def test_a_silent_or_failing_server_gives_way_to_the_next(first):
    behaviour = {"silent": lambda q: [], "servfail": lambda q: [answer_for(q, (), rcode=2)],
                 "refused": lambda q: [answer_for(q, (), rcode=5)]}[first]

    async def main():
        bad, good = Server(udp=behaviour), Server()
        await with_servers(bad, good)
        started = time.monotonic()
        answer = await DnsClient([bad.address, good.address], timeout=0.3).lookup(NAME)
        took = time.monotonic() - started
        bad.close(), good.close()
        return answer, took, bad, good

    answer, took, bad, good = run(main())
    assert answer.outcome == ANSWER and len(bad.queries) == 1 and len(good.queries) == 1
    assert took < (0.6 if first == "silent" else 0.25)


def test_no_answer_from_any_server_is_a_timeout_after_the_attempts_and_failures_an_error():
    async def main():
        silent, failing = Server(udp=lambda q: []), Server(udp=lambda q: [answer_for(q, (), rcode=2)])
        await with_servers(silent, failing)
        started = time.monotonic()
        timeout = await DnsClient([silent.address], timeout=0.2, attempts=2).lookup(NAME)
        took = time.monotonic() - started
        error = await DnsClient([failing.address], timeout=0.2, attempts=2).lookup(NAME)
        silent.close(), failing.close()
        return timeout, took, error, silent, failing

    timeout, took, error, silent, failing = run(main())
    assert timeout.outcome == TIMEOUT and len(silent.queries) == 2 and 0.35 < took < 1.0
    assert error.outcome == ERROR and len(failing.queries) == 2


def test_nxdomain_and_nodata_carry_the_soa_negative_ttl():
    soa = DNSRRSOA(rrname="example.com", ttl=600, mname="ns.example.com", rname="h.example.com", minimum=20)

    def udp(q):
        if q.qd[0].qname.startswith(b"none"):
            return [answer_for(q, (), soa=soa)]
        return [answer_for(q, (), rcode=3, soa=soa)]

    async def main():
        server = Server(udp=udp)
        await server.start()
        client = DnsClient([server.address], timeout=1.0)
        result = await client.lookup("nx.example.com"), await client.lookup("none.example.com")
        server.close()
        return result

    nx, nodata = run(main())
    assert nx == Answer(NXDOMAIN, (), 20.0) and nodata == Answer(NODATA, (), 20.0)


# ------------------------------------------------------------------- the cache

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """Answers from a dict, counting lookups; `gate` holds them until set."""

    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.gate: asyncio.Event | None = None

    async def lookup(self, name: str) -> Answer:
        self.asked.append(name)
        if self.gate is not None:
            await self.gate.wait()
        return self.answers.get(name, Answer(NXDOMAIN))


def resolver(answers, clock=None, **settings) -> tuple[NameResolver, FakeClient]:
    client = FakeClient(answers)
    return NameResolver(ResolverConfig(servers=((LOCAL, 53),), **settings), client=client,
                        clock=clock or Clock()), client


def test_answers_are_cached_for_their_ttl_then_asked_again():
    clock = Clock()
    names, client = resolver({NAME: Answer(ANSWER, (V6(INSIDE),), 30.0)}, clock)

    async def main():
        await names.lookup(NAME)
        clock.now += 29.9
        await names.lookup(NAME)
        assert client.asked == [NAME]
        clock.now += 0.2
        await names.lookup(NAME)

    run(main())
    assert client.asked == [NAME, NAME]


@pytest.mark.parametrize("answer, settings, kept", [
    (Answer(ANSWER, (V6(INSIDE),), 86400.0), {"max_ttl": 60}, 60),
    (Answer(NXDOMAIN, (), 3600.0), {"negative_ttl": 10}, 10),
    (Answer(NODATA, (), 0.0), {}, 0),      # no SOA: not cached (RFC 2308 §5)
    (Answer(TIMEOUT), {"failure_ttl": 3}, 3),
    (Answer(ERROR), {"failure_ttl": 0}, 0),
])
def test_ttls_are_capped_and_negative_answers_cached_briefly(answer, settings, kept):
    clock = Clock()
    names, client = resolver({NAME: answer}, clock, **settings)
    names.store(NAME, answer)
    if kept:
        clock.now += kept - 0.01
        assert names.cached(NAME) == answer
    clock.now += 0.02
    assert names.cached(NAME) is None


def test_the_cache_is_bounded_oldest_out():
    names, _ = resolver({}, cache_size=2)
    for n in ("a.example.com", "b.example.com", "c.example.com"):
        names.store(n, Answer(ANSWER, (V6(INSIDE),), 60.0))
    assert len(names) == 2
    assert names.cached("a.example.com") is None and names.cached("c.example.com") is not None


def test_concurrent_lookups_of_one_name_share_one_query():
    names, client = resolver({NAME: Answer(ANSWER, (V6(INSIDE),), 60.0)})

    async def main():
        client.gate = asyncio.Event()
        tasks = [asyncio.ensure_future(names.lookup(NAME)) for _ in range(20)]
        await asyncio.sleep(0.01)
        client.gate.set()
        return await asyncio.gather(*tasks)

    results = run(main())
    assert client.asked == [NAME]
    assert all(r.addresses == (V6(INSIDE),) for r in results)


def test_the_packet_loop_asks_once_and_hears_back_through_post():
    services = Services()
    services.start()
    answered: list[tuple[str, Answer | None, str]] = []
    try:
        names, client = resolver({NAME: Answer(ANSWER, (V6(INSIDE),), 0.0)})
        names.services = lambda: services
        # TTL 0: not cached, but the connections that waited still get it.
        names.on_answer = lambda name: answered.append((name, names.cached(name), threading.current_thread().name))
        names.request(NAME)
        names.request(NAME)
        deadline = time.monotonic() + 5
        while not answered and time.monotonic() < deadline:
            services.run_posted()
            time.sleep(0.01)
    finally:
        services.stop()
    assert client.asked == [NAME]
    assert answered == [(NAME, Answer(ANSWER, (V6(INSIDE),), 0.0), threading.current_thread().name)]
    assert names.cached(NAME) is None


def test_hosts_are_the_addresses_inside_the_networks_or_a_refusal():
    networks = (ipaddress.IPv6Network("2001:db8:100::/48"),)
    assert hosts_for(Answer(ANSWER, (V6(OUTSIDE), V6(INSIDE)), 5), networks) == (V6(INSIDE),)
    assert hosts_for(Answer(ANSWER, (V6(OUTSIDE),), 5), networks) == "refused_outside_networks"
    assert hosts_for(Answer(NXDOMAIN), networks) == "refused_unresolved"
    assert hosts_for(Answer(NODATA), networks) == "refused_unresolved"
    assert hosts_for(Answer(TIMEOUT), networks) == "refused_resolver_timeout"
    assert hosts_for(Answer(ERROR), networks) == "refused_resolver_error"


def test_system_servers_come_from_resolv_conf(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n"
                    "nameserver not-an-address\noptions edns0\n")
    assert system_servers(str(conf)) == ((V4("192.0.2.53"), 53), (V6("2001:db8::53"), 53))
    conf.write_text("search example.com\n")
    assert system_servers(str(conf)) == ((V4("127.0.0.1"), 53),)
    assert system_servers(str(tmp_path / "missing")) == ((V4("127.0.0.1"), 53),)


# --------------------------------------------------- resolve routes, end to end

CONFIG = """
[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"

[[route]]
name = "*.service.example.com"
resolve = true
networks = ["2001:db8:100::/48", "2001:db8:200::/48"]

[[route]]
name = "~^api-[0-9]+\\\\.example\\\\.net$"
resolve = true
networks = ["2001:db8:100::/48"]
port = 8443

[[route]]
name = "acme.example.com"
alpn = "acme-tls/1"
resolve = true
networks = ["2001:db8:100::/48"]

[[route]]
name = "www.example.com"
host = "2001:db8::10"

[resolver]
servers = ["127.0.0.1:5353"]
"""


class StubNames:
    """The packet loop's side of a NameResolver, with answers given by the test."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.requested: list[str] = []

    def cached(self, name):
        return self.answers.get(name)

    def request(self, name):
        self.requested.append(name)


def test_build_resolver_waits_then_routes_to_the_addresses_inside_the_networks():
    config = parse_config(CONFIG)
    names = StubNames()
    resolve = build_resolver(config, names)
    [tls] = tracker_listeners(config)
    decision = Decision("B.Service.example.com")
    assert resolve(tls, Decision("b.service.example.com")) == Pending("b.service.example.com")
    assert names.requested == ["b.service.example.com"]
    names.answers["b.service.example.com"] = Answer(ANSWER, (V6(OUTSIDE), V6("2001:db8:200::7"), V6(INSIDE)), 60)
    target = resolve(tls, decision)
    assert target.hosts == (V6("2001:db8:200::7").packed, V6(INSIDE).packed) and target.port == 443
    assert target.route == "*.service.example.com"
    assert resolve(tls, decision) is target  # shared by the connections of one answer
    names.answers["c.service.example.com"] = Answer(ANSWER, (V6(OUTSIDE),), 60)
    assert resolve(tls, Decision("c.service.example.com")) == Refused("refused_outside_networks")
    names.answers["d.service.example.com"] = Answer(TIMEOUT)
    assert resolve(tls, Decision("d.service.example.com")) == Refused("refused_resolver_timeout")
    # Regex and ALPN resolve routes; the static route untouched.
    names.answers["api-7.example.net"] = Answer(ANSWER, (V6(INSIDE),), 60)
    assert resolve(tls, Decision("api-7.example.net")).port == 8443
    names.answers["acme.example.com"] = Answer(ANSWER, (V6(INSIDE),), 60)
    assert resolve(tls, Decision("acme.example.com", ("acme-tls/1",))).route == "acme.example.com"
    assert resolve(tls, Decision("acme.example.com")) is None
    assert resolve(tls, Decision("www.example.com")).hosts == (V6("2001:db8::10").packed,)
    assert names.requested == ["b.service.example.com"]


def test_lookup_route_for_the_bridge_gives_targets_refusals_and_none():
    config = parse_config(CONFIG)
    router = Router(config.routes, config.fallback)
    names, client = resolver({"x.service.example.com": Answer(ANSWER, (V6(INSIDE),), 60),
                              "y.service.example.com": Answer(ANSWER, (V6(OUTSIDE),), 60)})

    async def main():
        return (await names.lookup_route(router, "x.service.example.com", 443),
                await names.lookup_route(router, "y.service.example.com", 443),
                await names.lookup_route(router, "www.example.com", 443),
                await names.lookup_route(router, "nothing.example.org", 443))

    x, y, www, nothing = run(main())
    assert x == Target(V6(INSIDE), 443, "*.service.example.com", (V6(INSIDE),))
    assert y == Refused("refused_outside_networks")
    assert www.host == V6("2001:db8::10") and nothing is None


# ---------------------------------------------------------------- validation

HEAD = """
[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"
"""


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + text, "k.toml")
    return str(info.value)


@pytest.mark.parametrize("route, expected", [
    ('name = "*.s.example.com"\nresolve = true', "route[0].networks: required with resolve = true"),
    ('name = "*.s.example.com"\nresolve = true\nhost = "2001:db8::1"\nnetworks = ["2001:db8::/32"]',
     "route[0].host: a route with resolve = true has no host"),
    ('name = "*.s.example.com"\nhost = "2001:db8::1"\nnetworks = ["2001:db8::/32"]',
     "route[0].networks: networks only goes with resolve = true"),
    ('name = "*.s.example.com"\nresolve = true\nnetworks = []', "expected a non-empty list of IPv6 networks"),
    ('name = "*.s.example.com"\nresolve = true\nnetworks = ["10.0.0.0/8"]', "expected an IPv6 network"),
    ('name = "*.s.example.com"\nresolve = true\nnetworks = ["2001:db8::1/32"]', "has host bits set"),
    ('name = "*.s.example.com"\nresolve = true\nnetworks = ["64:ff9b::/32"]', "overlaps the translate prefix"),
    ('name = "*.s.example.com"\nresolve = "yes"\nnetworks = ["2001:db8::/32"]', "expected true or false"),
])
def test_resolve_routes_are_validated(route, expected):
    assert expected in config_error("\n[[route]]\n" + route + "\n")


ROUTE = '\n[[route]]\nname = "*.s.example.com"\nresolve = true\nnetworks = ["2001:db8:100::/48"]\n'


@pytest.mark.parametrize("table, expected", [
    ('servers = []', "expected a non-empty list of DNS servers"),
    ('servers = ["dns.example.com"]', "expected a DNS server's address"),
    ('servers = ["192.0.2.53:0"]', "expected a port from 1 to 65535"),
    ('servers = ["0.0.0.0"]', "is not a unicast address"),
    ('timeout = 0', "greater than 0"),
    ('timeout = 31', "expected at most 30"),
    ('attempts = 0', "expected an integer from 1 to 10"),
    ('cache_size = 0', "expected an integer from 1"),
    ('max_ttl = 0', "expected an integer from 1 to 86400"),
    ('failure_ttl = 301', "expected an integer from 0 to 300"),
    ('server = ["192.0.2.53"]', "resolver.server"),
])
def test_the_resolver_table_is_validated(table, expected):
    assert expected in config_error(ROUTE + "\n[resolver]\n" + table + "\n")


def test_the_resolver_table_parses_servers_with_and_without_ports():
    config = parse_config(HEAD + ROUTE + '\n[resolver]\nservers = ["2001:db8::53", "192.0.2.53:5353", '
                          '"[2001:db8::54]:5354", "192.0.2.54"]\ntimeout = 1.5\nattempts = 3\n')
    assert config.resolver == ResolverConfig(
        servers=((V6("2001:db8::53"), 53), (V4("192.0.2.53"), 5353), (V6("2001:db8::54"), 5354),
                 (V4("192.0.2.54"), 53)), timeout=1.5, attempts=3)
    [route] = config.routes
    assert route.resolve and route.host is None and route.hosts == ()
    assert route.networks == (ipaddress.IPv6Network("2001:db8:100::/48"),)
    assert parse_config(HEAD + ROUTE).resolver == ResolverConfig()
