"""The routing table: from a server name to the host that gets the connection.

The name is the TLS ClientHello's server_name or the HTTP Host header (without
port), or None when the client sent none. Names are compared after
``normalize_name``: ASCII letters lowercased, one trailing dot removed
(``WWW.Example.COM.`` is ``www.example.com``).

Matching order, first hit wins:

1. **Exact names** (``www.example.com``): one dict look-up.
2. **Wildcards** (``*.example.com``), the longest suffix first. A wildcard
   matches subdomains at any depth (``a.example.com``, ``a.b.example.com``) but
   not the bare domain (``example.com``): add an exact route for that. The
   look-up walks the name's proper suffixes, longest first, each one dict
   look-up (``a.b.example.com`` tries ``b.example.com``, ``example.com``,
   ``com``), so ``*.b.example.com`` beats ``*.example.com``.
3. **Regular expressions** (``~^api-[0-9]+\\.example\\.net$``), in file order:
   ``re.fullmatch`` against the normalized name, compiled once with
   ``re.IGNORECASE | re.ASCII``. Names longer than 253 characters (no DNS name
   is) never reach a regular expression, which bounds their cost.
4. **The fallback**, if configured.

A missing name (None, or empty after normalization: TLS without SNI, HTTP/1.0
without Host) goes straight to the fallback. No match and no fallback: None,
and the daemon refuses the connection (TLS alert / HTTP 421).

**ALPN.** A route with ``alpn = "acme-tls/1"`` only takes TLS clients whose
ClientHello offers that protocol (RFC 7301), so that TLS-ALPN-01 certificate
challenges (RFC 8737) can go to one host. Such routes are tried before all
others, in the client's order of offered protocols, with the same name
matching (exact, wildcard, regex); then the routes without ``alpn``.

**Agents.** Names that agents registered (kracauer/agents.py) come as
``dynamic`` routes, exact names and wildcards only, whose hosts are the
agents' addresses. They take part in the same matching order, so an agent's
exact ``app.example.com`` beats a configured ``*.example.com`` and the
fallback; but where a configured route has the very same name (or wildcard),
the configured route wins and the agent's is not used.

**Several hosts.** A route may list several hosts; ``Target.hosts`` keeps them
in file order and the tracker picks one per client address (rendezvous
hashing) and fails over to the others.

**Resolve routes.** A route with ``resolve = true`` has no hosts of its own:
``lookup`` returns a ``Resolve`` for it (the name to look up, the port, and
the networks the AAAA addresses must lie in), and the caller looks the name
up (kracauer.resolver) and makes the Target from the answer.

A route without a port uses the listener's port. ``Target.route`` says which
rule matched: the route's name as written, ``"fallback"``, or ``"listener"``
(set by the daemon for tcp listeners, which do not go through the router).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from typing import Sequence

from kracauer.config import Fallback, Route

__all__ = ["Resolve", "Router", "Target", "normalize_name"]

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

#: Longest DNS name (RFC 1035 section 2.3.4, written form without trailing dot).
MAX_NAME_LENGTH = 253


def normalize_name(name: str) -> str:
    """Lowercase ASCII letters and remove one trailing dot.

    Only A-Z are folded: ``str.lower`` would also turn e.g. the Kelvin sign
    (U+212A) into an ASCII "k", and DNS names compare ASCII-case-insensitively
    only (RFC 4343).
    """
    name = name.lower() if name.isascii() else name.translate(_ASCII_LOWER)
    if name.endswith("."):
        name = name[:-1]
    return name


@dataclass(frozen=True)
class Target:
    host: ipaddress.IPv6Address   # the first host
    port: int
    route: str          # the route's name as written, "fallback" or "listener"
    hosts: tuple[ipaddress.IPv6Address, ...] = ()   # every host of the route
    bridge: str | None = None   # a bridge route: the [[bridge]] that carries it (host: the local relay)

    def __post_init__(self) -> None:
        if not self.hosts:
            object.__setattr__(self, "hosts", (self.host,))


@dataclass(frozen=True)
class Resolve:
    """A resolve route matched: the hosts are `name`'s AAAA records inside `networks`."""

    name: str           # the client's name, normalized: what is looked up
    port: int
    route: str          # the route's name as written
    networks: tuple[ipaddress.IPv6Network, ...]


class Router:
    """Name → Target look-ups over the routes of a configuration."""

    def __init__(self, routes: Sequence[Route], fallback: Fallback | None, dynamic: Sequence[Route] = ()) -> None:
        by_alpn: dict[str, list[Route]] = {}
        for route in routes:
            if route.alpn is not None:
                by_alpn.setdefault(route.alpn, []).append(route)
        # Each ALPN's routes form a router of their own (their alpn cleared so they are plain there).
        self._alpn = {alpn: Router([dataclasses.replace(r, alpn=None) for r in group], None)
                      for alpn, group in by_alpn.items()}
        routes = [route for route in routes if route.alpn is None]
        self._exact: dict[str, Route] = {}
        self._wildcards: dict[str, Route] = {}      # key: the suffix after "*."
        self._regexes: list[tuple[re.Pattern[str], Route]] = []
        for route in routes:
            if route.name.startswith("~"):
                self._regexes.append((re.compile(route.name[1:], re.IGNORECASE | re.ASCII), route))
                continue
            name = normalize_name(route.name)
            if name.startswith("*."):
                # The first of duplicate routes wins (the config rejects duplicates).
                self._wildcards.setdefault(name[2:], route)
            else:
                self._exact.setdefault(name, route)
        # After the configured routes, with setdefault: a configured route of the same name wins.
        for route in dynamic:
            name = normalize_name(route.name)
            if name.startswith("*."):
                self._wildcards.setdefault(name[2:], route)
            else:
                self._exact.setdefault(name, route)
        self._fallback = fallback

    def lookup(self, name: str | None, port: int, alpn: Sequence[str] = ()) -> Target | Resolve | None:
        """The target for ``name`` (and the ALPN protocols offered) on a listener with ``port``, or None to refuse;
        a ``Resolve`` for a resolve route."""
        if name is not None:
            name = normalize_name(name)
        if name:
            route = None
            for protocol in alpn:
                router = self._alpn.get(protocol)
                if router is not None:
                    route = router._match(name)
                    if route is not None:
                        break
            if route is None:
                route = self._match(name)
            if route is not None:
                if route.resolve:
                    return Resolve(name, route.port if route.port is not None else port, route.name, route.networks)
                return Target(route.host, route.port if route.port is not None else port, route.name, route.hosts,
                              route.bridge)
        fallback = self._fallback
        if fallback is None:
            return None
        return Target(fallback.host, fallback.port if fallback.port is not None else port, "fallback",
                      fallback.hosts)

    @property
    def resolves(self) -> bool:
        """Whether some route is a resolve route (and so needs kracauer.resolver)."""
        return any(r.resolve for r in self._all_routes())

    def _all_routes(self):
        yield from self._exact.values()
        yield from self._wildcards.values()
        yield from (route for _, route in self._regexes)
        for router in self._alpn.values():
            yield from router._all_routes()

    def _match(self, name: str) -> Route | None:
        route = self._exact.get(name)
        if route is not None:
            return route
        wildcards = self._wildcards
        if wildcards:
            dot = name.find(".")
            while dot != -1:
                route = wildcards.get(name[dot + 1:])
                if route is not None:
                    return route
                dot = name.find(".", dot + 1)
        if len(name) <= MAX_NAME_LENGTH:
            for pattern, route in self._regexes:
                if pattern.fullmatch(name):
                    return route
        return None
