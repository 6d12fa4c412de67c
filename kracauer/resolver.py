"""Route by DNS: the AAAA records of a client's name become its route's hosts.

A route with ``resolve = true`` has no hosts in the file. When a client's
hello names, say, ``a.service.example.com``, kracauer asks DNS for that name's
AAAA records and keeps those inside the route's ``networks``: they are the
route's hosts, so the tracker's rendezvous choice and failover apply as for
any route. No address inside the networks and the connection is refused
like an unknown name (TLS alert, HTTP 421, CONNECT 403), with its own
outcome: ``refused_unresolved`` (no AAAA: NXDOMAIN or NODATA),
``refused_outside_networks``, ``refused_resolver_timeout`` (no server
answered) or ``refused_resolver_error`` (SERVFAIL, REFUSED, a broken answer).

The pieces, from the wire up:

- ``netstack.dns``: the message codec (pure);
- ``DnsClient``: one lookup on asyncio: UDP from a fresh socket (so a
  fresh source port) with a random query ID, answers accepted only from the
  server asked, with that ID and that question (RFC 5452 §4.1); the next
  server on a timeout or a server failure, ``attempts`` rounds; TCP when an
  answer comes truncated (RFC 7766 §5);
- ``NameResolver``: a bounded cache of answers for their TTL (capped;
  negative answers for the SOA's TTL, RFC 2308 §5, capped too; failures
  for a few seconds, RFC 2308 §7), one lookup in flight per name however
  many connections wait for it, and the two ways in:

  * the packet loop (``cached`` / ``request``): the tracker's resolver
    (kracauer.daemon.build_resolver) finds no answer in the cache, asks
    ``request(name)`` and returns ``netstack.tracker.Pending(name)``; the
    tracker keeps the connection in PEEKING with the hello unacknowledged.
    The lookup runs on the services thread (kracauer.services); its answer
    is posted back to the packet loop, which calls ``on_answer(name)``: the
    daemon's ``Tracker.resume(name, now)`` re-routes the waiting
    connections, and finds the answer this time. The hello timeout still
    applies meanwhile.
  * coroutines on the services thread (the TLS bridge's peer side)::

        result = await resolver.lookup_route(router, name, port, alpn)

    returns a ``kracauer.routing.Target`` (static or resolved), a
    ``netstack.tracker.Refused`` with the outcome above, or None for a name
    no route takes. ``await resolver.lookup(name)`` gives the bare
    ``Answer``. Both share the cache and the lookups in flight with the
    packet loop.

The DNS servers are ``[resolver] servers``, or the ``nameserver`` lines of
/etc/resolv.conf (read when the resolver is made), or 127.0.0.1 as the C
library does without any (resolv.conf(5)).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kracauer.config import ResolverConfig
from kracauer.routing import Resolve, Router, Target
from netstack import dns
from netstack.tracker import Refused

__all__ = ["Answer", "DnsClient", "NameResolver", "hosts_for", "system_servers"]

log = logging.getLogger("kracauer.resolver")

Server = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]

RESOLV_CONF = "/etc/resolv.conf"
# resolv.conf(5): with no nameserver line, the local host's server.
DEFAULT_SERVERS: tuple[Server, ...] = ((ipaddress.IPv4Address("127.0.0.1"), 53),)
# RFC 1035 §4.2.1: UDP messages are at most 512 bytes without EDNS; read more in case a server sends it.
UDP_MAX = 65535
_LENGTH = struct.Struct("!H")

# Lookup outcomes (the metric's labels); only "answer" carries addresses.
ANSWER, NXDOMAIN, NODATA, TIMEOUT, ERROR = "answer", "nxdomain", "nodata", "timeout", "error"
OUTCOMES = (ANSWER, NXDOMAIN, NODATA, TIMEOUT, ERROR)
# The tracker's outcome for each way a lookup gives no usable host.
REFUSED_UNRESOLVED = "refused_unresolved"
REFUSED_OUTSIDE = "refused_outside_networks"
REFUSED_TIMEOUT = "refused_resolver_timeout"
REFUSED_ERROR = "refused_resolver_error"
_REFUSAL_OF = {NXDOMAIN: REFUSED_UNRESOLVED, NODATA: REFUSED_UNRESOLVED, TIMEOUT: REFUSED_TIMEOUT,
               ERROR: REFUSED_ERROR}


@dataclass(frozen=True)
class Answer:
    """What a lookup found: the outcome, the addresses (for ANSWER) and how long it may be cached."""

    outcome: str
    addresses: tuple[ipaddress.IPv6Address, ...] = ()
    ttl: float = 0.0


def system_servers(path: str = RESOLV_CONF) -> tuple[Server, ...]:
    """The ``nameserver`` lines of resolv.conf (port 53), in order; DEFAULT_SERVERS without any."""
    servers: list[Server] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError as exc:
        log.warning("cannot read %s (%s): resolve routes ask %s", path, exc.strerror or exc,
                    DEFAULT_SERVERS[0][0])
        return DEFAULT_SERVERS
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append((ipaddress.ip_address(fields[1]), 53))
            except ValueError:
                log.warning("%s: ignoring nameserver %r (not an IP address)", path, fields[1])
    return tuple(servers) or DEFAULT_SERVERS


def hosts_for(answer: Answer, networks: Sequence[ipaddress.IPv6Network]) -> tuple[ipaddress.IPv6Address, ...] | str:
    """The answer's addresses inside `networks` (in the answer's order), or the refusal outcome."""
    if answer.outcome != ANSWER:
        return _REFUSAL_OF[answer.outcome]
    hosts = tuple(a for a in answer.addresses if any(a in network for network in networks))
    return hosts or REFUSED_OUTSIDE


# ------------------------------------------------------------------ one lookup

class _UdpExchange(asyncio.DatagramProtocol):
    """One query on a connected UDP socket; the first answer that matches resolves `done`."""

    def __init__(self, query: bytes, accept: Callable[[bytes], dns.Message | None]) -> None:
        self.query = query
        self.accept = accept
        self.done: asyncio.Future[dns.Message] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.sendto(self.query)  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        message = self.accept(data)
        if message is not None and not self.done.done():
            self.done.set_result(message)

    def error_received(self, exc: Exception) -> None:
        # An ICMP port unreachable: this server will not answer.
        if not self.done.done():
            self.done.set_exception(exc)


class DnsClient:
    """AAAA lookups against `servers`, `attempts` rounds, `timeout` seconds per query."""

    def __init__(self, servers: Sequence[Server], timeout: float = 2.0, attempts: int = 2,
                 random16: Callable[[], int] | None = None) -> None:
        self.servers = tuple(servers)
        self.timeout = timeout
        self.attempts = attempts
        # RFC 5452 §9.2: an unpredictable ID for each query.
        self.random16 = random16 or (lambda: secrets.randbits(16))

    async def lookup(self, name: str) -> Answer:
        """The AAAA answer for `name`, trying each server in turn; TIMEOUT when none answered."""
        failed = False
        for _ in range(self.attempts):
            for server in self.servers:
                try:
                    message = await self._ask(server, name)
                except (asyncio.TimeoutError, OSError) as exc:
                    log.debug("DNS server %s: no answer for %s (%s)", _server_text(server), name,
                              exc.__class__.__name__)
                    continue
                except dns.DnsError as exc:
                    log.debug("DNS server %s: cannot send a query for %r: %s", _server_text(server), name, exc)
                    return Answer(ERROR, ttl=0.0)
                answer = self._answer(message, name)
                if answer is not None:
                    return answer
                # RFC 1034 §5.3.3: a server failure or refusal: ask the next one.
                failed = True
        return Answer(ERROR if failed else TIMEOUT)

    @staticmethod
    def _answer(message: dns.Message, name: str) -> Answer | None:
        """The message's Answer; None for a server failure (try another server)."""
        rcode = message.rcode
        if rcode == dns.NXDOMAIN:
            return Answer(NXDOMAIN, ttl=_negative(message))
        if rcode != dns.NOERROR:
            return None
        addresses, ttl = dns.aaaa_answer(message, name)
        if not addresses:
            # RFC 2308 §2.2: NODATA, the name exists without AAAA records.
            return Answer(NODATA, ttl=_negative(message))
        return Answer(ANSWER, tuple(ipaddress.IPv6Address(a) for a in addresses), float(ttl))

    async def _ask(self, server: Server, name: str) -> dns.Message:
        query_id = self.random16() & 0xFFFF
        query = dns.build_query(query_id, name)
        accept = _matcher(query_id, name)
        message = await self._udp(server, query, accept)
        if message.truncated:
            # RFC 7766 §5: a truncated UDP answer is asked again over TCP.
            message = await self._tcp(server, query, accept)
        return message

    async def _udp(self, server: Server, query: bytes, accept: Callable[[bytes], dns.Message | None]) -> dns.Message:
        loop = asyncio.get_running_loop()
        # A connected socket of its own: the kernel drops datagrams from other addresses and
        # ports, and each query gets a fresh ephemeral source port (RFC 5452 §9.2).
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(query, accept), remote_addr=(str(server[0]), server[1]))
        try:
            return await asyncio.wait_for(protocol.done, self.timeout)
        finally:
            transport.close()

    async def _tcp(self, server: Server, query: bytes, accept: Callable[[bytes], dns.Message | None]) -> dns.Message:
        async def exchange() -> dns.Message:
            reader, writer = await asyncio.open_connection(str(server[0]), server[1])
            try:
                # RFC 1035 §4.2.2: each message is prefixed with its length (two octets).
                writer.write(_LENGTH.pack(len(query)) + query)
                await writer.drain()
                length = _LENGTH.unpack(await reader.readexactly(2))[0]
                message = accept(await reader.readexactly(length))
                if message is None:
                    raise dns.DnsError("the TCP answer does not match the query")
                return message
            finally:
                writer.close()

        try:
            return await asyncio.wait_for(exchange(), self.timeout)
        except (asyncio.IncompleteReadError, dns.DnsError) as exc:
            raise OSError(f"TCP: {exc}") from None


def _matcher(query_id: int, name: str) -> Callable[[bytes], dns.Message | None]:
    """A check that a datagram is the answer to this query: RFC 5452 §4.1 (ID, question), RFC 1035 §4.1.1."""
    wanted = dns.Question(_lower(name), dns.AAAA, dns.CLASS_IN)

    def accept(data: bytes) -> dns.Message | None:
        try:
            message = dns.parse_message(data)
        except dns.DnsError as exc:
            log.debug("ignoring a malformed DNS answer: %s", exc)
            return None
        if message.id != query_id or not message.is_response or message.opcode != 0:
            return None
        if message.questions != (wanted,):
            return None
        return message

    return accept


def _negative(message: dns.Message) -> float:
    ttl = dns.negative_ttl(message)
    return 0.0 if ttl is None else float(ttl)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lower(name: str) -> str:
    """As netstack.dns returns names: ASCII letters lowercased (RFC 4343), no trailing dot."""
    name = name[:-1] if name.endswith(".") else name
    return name.translate(_ASCII_LOWER)


def _server_text(server: Server) -> str:
    address, port = server
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


# --------------------------------------------------------- cache and callers

class NameResolver:
    """The cache and the lookups in flight, shared by the packet loop and the services thread.

    `services` gives the services thread (started on first use: the daemon's
    ``_use_services``); `on_answer(name)` runs on the packet loop when a
    lookup it requested is done. `count(outcome)` counts each lookup sent to
    DNS (the metrics), `hit()` each answer taken from the cache.
    """

    def __init__(self, settings: ResolverConfig, services: Callable[[], Any] | None = None,
                 on_answer: Callable[[str], None] | None = None, *, client: DnsClient | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 count: Callable[[str], None] | None = None, hit: Callable[[], None] | None = None) -> None:
        self.settings = settings
        servers = settings.servers or system_servers()
        self.client = client or DnsClient(servers, settings.timeout, settings.attempts)
        self.services = services
        self.on_answer = on_answer
        self.clock = clock
        self.count = count
        self.hit = hit
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, tuple[float, Answer]] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Future[Answer]] = {}   # services loop only
        self._requested: set[str] = set()                        # packet loop only
        self._fresh: dict[str, Answer] = {}                      # packet loop only: answers being delivered

    # -- the cache (any thread) ----------------------------------------------------

    def __len__(self) -> int:
        return len(self._cache)

    def cached(self, name: str) -> Answer | None:
        """The cached answer for `name` if it has not expired; None otherwise."""
        fresh = self._fresh.get(name)
        if fresh is not None:
            return fresh
        now = self.clock()
        with self._lock:
            entry = self._cache.get(name)
            if entry is None:
                return None
            if entry[0] <= now:
                del self._cache[name]
                return None
        if self.hit is not None:
            self.hit()
        return entry[1]

    def store(self, name: str, answer: Answer) -> None:
        """Cache `answer` for its TTL within the configured caps (an entry of 0 seconds is not kept)."""
        ttl = self._cache_time(answer)
        if ttl <= 0:
            return
        with self._lock:
            cache = self._cache
            cache.pop(name, None)
            cache[name] = (self.clock() + ttl, answer)
            while len(cache) > self.settings.cache_size:
                cache.popitem(last=False)

    def _cache_time(self, answer: Answer) -> float:
        settings = self.settings
        if answer.outcome == ANSWER:
            return min(answer.ttl, settings.max_ttl)
        if answer.outcome in (NXDOMAIN, NODATA):
            # RFC 2308 §5: the SOA's TTL (0 without one: not cached), capped.
            return min(answer.ttl, settings.negative_ttl)
        # RFC 2308 §7.1, §7.2: a server failure or a dead server, remembered briefly (at most 5 minutes).
        return settings.failure_ttl

    # -- the services thread -------------------------------------------------------

    async def lookup(self, name: str) -> Answer:
        """The answer for `name`: from the cache, or from the lookup in flight, or a new lookup."""
        name = _lower(name)
        answer = self.cached(name)
        if answer is not None:
            return answer
        future = self._inflight.get(name)
        if future is None:
            future = self._inflight[name] = asyncio.ensure_future(self._lookup_and_store(name))
            future.add_done_callback(lambda _: self._inflight.pop(name, None))
        return await asyncio.shield(future)

    async def _lookup_and_store(self, name: str) -> Answer:
        try:
            answer = await self.client.lookup(name)
        except Exception:  # a bug must not leave the waiting connections without an answer
            log.exception("looking up %s failed", name)
            answer = Answer(ERROR)
        if self.count is not None:
            self.count(answer.outcome)
        self.store(name, answer)
        log.debug("DNS %s AAAA: %s %s (ttl %.0f)", name, answer.outcome,
                  " ".join(map(str, answer.addresses)), answer.ttl)
        return answer

    async def lookup_route(self, router: Router, name: str | None, port: int,
                           alpn: Sequence[str] = ()) -> Target | Refused | None:
        """The bridge's routing: a Target for `name` (static or resolved), a Refused, or None (no route)."""
        target = router.lookup(name, port, alpn)
        if not isinstance(target, Resolve):
            return target
        hosts = hosts_for(await self.lookup(target.name), target.networks)
        if isinstance(hosts, str):
            return Refused(hosts)
        return Target(hosts[0], target.port, target.route, hosts)

    # -- the packet loop -----------------------------------------------------------

    def request(self, name: str) -> None:
        """Look `name` up on the services thread (once, however many connections ask); `on_answer` follows."""
        if name in self._requested:
            return
        self._requested.add(name)
        services = self.services()
        services.submit(self._answer_back(services, name))

    async def _answer_back(self, services: Any, name: str) -> None:
        try:
            answer = await self.lookup(name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("looking up %s failed", name)
            answer = Answer(ERROR)
        services.post(self._delivered, name, answer)

    def _delivered(self, name: str, answer: Answer) -> None:
        """On the packet loop: the connections waiting for `name` are re-routed with `answer`.

        The answer is handed over directly as well as through the cache, so an
        answer with TTL 0 (or one that expired on the way) still serves the
        connections that waited for it."""
        self._requested.discard(name)
        self._fresh[name] = answer
        try:
            if self.on_answer is not None:
                self.on_answer(name)
        finally:
            self._fresh.pop(name, None)
