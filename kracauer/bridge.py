"""The TLS bridge between two kracauer boxes: the ingress relay and the peer listener.

../shared/design/bridge.md. A firewall in the client's network passes TLS only
when its server name is the bridge's (``bridge.example.com``). The ingress
kracauer carries each client connection, its bytes untouched, inside a TLS
connection with that outer name to a peer kracauer, which routes it by the
inner name and connects to the host from ``prefix::client``::

    client ─▶ [ingress: TUN splice ─▶ relay] ═TLS(outer SNI)═▶ firewall ═▶ [peer listener] ─▶ host
                                              CONNECT name:port, Forwarded: for="client"

Ingress (``IngressRelay``). A route with ``bridge = "..."`` has the relay as
its host: the tracker splices the connection (the TUN packet path, kernel path
included, exactly as for a host) to ``prefix::255.255.255.x`` (config.relay_address),
an address kracauer puts on its own TUN, so the kernel delivers the packets
kracauer writes for it locally and routes the relay's answers to
``prefix::client`` back into the TUN. The relay thus learns the client's IPv4
from its peer address, with no side channel. Each listener protocol has its
own relay address (tls, http, connect), so that the relay re-reads the name
from the same bytes with the same peeker the tracker used; the relay listens
on every port a bridge route can be reached on (the target port is the port
it names in its CONNECT). The listening sockets are bound to the TUN device
(SO_BINDTODEVICE), so nothing that arrives on another interface reaches them.
For a connect listener the tracker passes the client's CONNECT head through
(``Target.relay``) and the relay answers it itself once the peer said 200.

Peer (``PeerListener``). A TLS 1.3 socket listener that requires a client
certificate from ``client_ca``, reads the CONNECT head with the same capped
incremental reader as a connect listener (netstack.connect.ConnectPeeker),
trusts ``Forwarded`` because the client certificate was verified, routes the
name with its own [[route]] table and connects from ``prefix::client``
(IPV6_FREEBIND, with ``local PREFIX dev lo`` added by kracauer).

One TLS connection per client connection: the simple and robust first
version; the outer handshake costs one round trip per connection
(docs/operations.md). TLS half-close (RFC 8446 §6.1: close_notify closes one
direction only) is done with ``ssl.SSLObject`` over memory BIOs, since
asyncio's SSL transport cannot write an EOF and keep reading.

Everything here runs on the one services loop (kracauer.services); the
sockets are made and the certificate files read during set-up, before the
daemon drops its privileges.
"""

from __future__ import annotations

import asyncio
# ssl encodes server names with the idna codec, which Python imports on first use: after the
# privileges are dropped the interpreter's own files may no longer be readable (a root-only prefix).
import encodings.idna  # noqa: F401
import ipaddress
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kracauer.config import Bridge, BridgeListener, Config, relay_address
from kracauer.resolver import REFUSED_ERROR, NameResolver
from kracauer.routing import Resolve, Router, Target
from netstack.tracker import Refused
from netstack import connect, http, tls
from netstack.peek import NEED_DATA, BadRequest, Decision, NotProtocol

__all__ = ["BridgeService", "IPV6_FREEBIND", "Stream", "TlsStream", "pump", "relay_addresses"]

log = logging.getLogger("kracauer.bridge")

# linux/in6.h: IPV6_FREEBIND (level IPPROTO_IPV6) lets a socket bind an address
# no interface has; Python's socket module does not name it.
IPV6_FREEBIND = 78
# Bytes read at a time, and what a transport buffers before drain() waits (backpressure).
CHUNK = 65536
HIGH_WATER = 256 * 1024
# How long a TLS close_notify exchange or a last flush may take at the end of a tunnel.
CLOSE_TIMEOUT = 5.0
# Listen backlog of each bridge socket.
BACKLOG = 1024
# One relay address per listener protocol: prefix + 255.255.255.x (config.relay_address is .255).
RELAY_PROTOCOLS = {"tls": 0, "http": 1, "connect": 2}


def relay_addresses(prefix: ipaddress.IPv6Network) -> dict[str, ipaddress.IPv6Address]:
    """The ingress relay's address for each listener protocol (255.255.255.255, .254, .253 embedded)."""
    base = relay_address(prefix)
    return {protocol: base - offset for protocol, offset in RELAY_PROTOCOLS.items()}


def relay_ports(config: Config) -> dict[str, set[int]]:
    """The ports each relay address listens on: every target port a bridge route can have."""
    bridge_routes = [route for route in config.routes if route.bridge is not None]
    ports: dict[str, set[int]] = {protocol: set() for protocol in RELAY_PROTOCOLS}
    if not bridge_routes:
        return ports
    for lst in config.listeners:
        if lst.protocol not in ports:
            continue
        for route in bridge_routes:
            if route.port is not None:
                ports[lst.protocol].add(route.port)
            elif lst.protocol == "connect":
                ports[lst.protocol].update(lst.ports)
            else:
                ports[lst.protocol].add(lst.port)
    return ports


# ---------------------------------------------------------------------------
# Streams: plain TCP and TLS, one interface, so that one pump serves both ends


class Stream:
    """A TCP connection: read, write with backpressure, half-close, close or reset."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        writer.transport.set_write_buffer_limits(high=HIGH_WATER)

    @property
    def peername(self) -> Any:
        return self.writer.get_extra_info("peername")

    @property
    def sockname(self) -> Any:
        return self.writer.get_extra_info("sockname")

    async def read(self, n: int = CHUNK) -> bytes:
        """Up to n bytes; b"" at the end of the stream."""
        return await self.reader.read(n)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        # StreamWriter.drain waits while the transport holds more than its high-water mark.
        await self.writer.drain()

    async def write_eof(self) -> None:
        """TCP half-close (FIN); reading goes on."""
        if self.writer.can_write_eof() and not self.writer.is_closing():
            self.writer.write_eof()

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass

    def reset(self) -> None:
        """Close with an RST: SO_LINGER with a zero timeout, then close (RFC 9293 §3.6, abort)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
        self.writer.transport.abort()


class TlsStream(Stream):
    """TLS over a Stream with ssl.SSLObject and memory BIOs, which (unlike asyncio's SSL
    transport) can send close_notify and keep reading: TLS 1.3 half-close (RFC 8446 §6.1)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: str | None = None) -> None:
        super().__init__(reader, writer)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._eof_sent = False
        self._raw_eof = False

    def _flush(self) -> None:
        data = self._out.read()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _fill(self) -> bool:
        """More TLS bytes from the socket; False at its end."""
        data = await self.reader.read(CHUNK)
        if not data:
            self._raw_eof = True
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                await self.writer.drain()
                return
            except ssl.SSLWantReadError:
                self._flush()
                await self.writer.drain()
                if not await self._fill():
                    raise ConnectionResetError("the connection ended during the TLS handshake")
            except ssl.SSLError:
                # RFC 8446 §6.2: the alert that says why (unknown_ca, certificate_required…) is
                # in the outgoing BIO; send it so that the other end can log the reason.
                self._flush()
                await self._drain_quietly()
                raise

    async def _drain_quietly(self) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), 1.0)
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass

    async def read(self, n: int = CHUNK) -> bytes:
        while True:
            try:
                data = self.tls.read(n)
                self._flush()  # a TLS 1.3 session ticket or key update may want an answer
                return data
            except ssl.SSLWantReadError:
                self._flush()
                if self._raw_eof or not await self._fill():
                    # A TCP end without close_notify (RFC 8446 §6.1: a truncation); for a
                    # tunnel it ends the direction as a FIN would.
                    return b""
            except ssl.SSLZeroReturnError:
                return b""  # close_notify: the peer closed its direction

    def write(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    async def write_eof(self) -> None:
        """close_notify (one direction only in TLS 1.3), then the TCP FIN; reading goes on."""
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass  # unwrap also waits for the peer's close_notify, which read() takes later
        self._flush()
        await super().write_eof()

    @property
    def peer_certificate(self) -> dict | None:
        return self.tls.getpeercert()


# ---------------------------------------------------------------------------
# The pump


@dataclass
class Tunnel:
    """One bridged connection as the logs and metrics see it."""

    side: str                  # "ingress" | "peer"
    client: str                # the client's IPv4 address
    client_port: int
    peer: str                  # ingress: the peer "address:port"; peer: the ingress box's address
    bridge: str = ""           # ingress: the [[bridge]] name; peer: the listener "address:port"
    outer_name: str = ""       # the outer SNI
    protocol: str = ""         # ingress: the listener protocol the client came through
    name: str | None = None    # the inner name (SNI, Host or CONNECT authority)
    port: int = 0
    route: str | None = None
    host: str | None = None
    bytes_to_host: int = 0     # client → host (the direction towards the service)
    bytes_to_client: int = 0
    outcome: str = ""
    start: float = field(default_factory=time.monotonic)
    start_wall: float = field(default_factory=time.time)
    last: float = field(default_factory=time.monotonic)

    def record(self) -> dict[str, Any]:
        return {
            "start": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.start_wall)) + f".{int(self.start_wall % 1 * 1e6):06d}Z",
            "duration": round(time.monotonic() - self.start, 6),
            "protocol": "bridge", "side": self.side, "client": self.client, "client_port": self.client_port,
            "listener_protocol": self.protocol or None, "bridge": self.bridge, "peer": self.peer,
            "outer_name": self.outer_name or None, "name": self.name, "port": self.port or None,
            "route": self.route, "host": self.host, "bytes_to_host": self.bytes_to_host,
            "bytes_to_client": self.bytes_to_client, "outcome": self.outcome,
        }


class IdleTimeout(Exception):
    pass


async def _copy(src: Stream, dst: Stream, tunnel: Tunnel, to_host: bool, idle: float) -> None:
    """One direction: read, write, drain (so a slow reader slows the writer: bounded buffers), then pass the EOF on."""
    while True:
        try:
            data = await asyncio.wait_for(src.read(CHUNK), idle)
        except asyncio.TimeoutError:
            # Idle means both directions: the other one may be busy (a long download).
            if time.monotonic() - tunnel.last < idle:
                continue
            raise IdleTimeout() from None
        if not data:
            break
        tunnel.last = time.monotonic()
        if to_host:
            tunnel.bytes_to_host += len(data)
        else:
            tunnel.bytes_to_client += len(data)
        dst.write(data)
        await dst.drain()
    await dst.write_eof()  # half-close: the other direction goes on


async def pump(client: Stream, server: Stream, tunnel: Tunnel, idle: float) -> str:
    """Relay both ways until both directions ended (half-close included); the outcome.

    ``client`` is the side towards the client, ``server`` the side towards the
    service. A reset or an idle timeout on either side ends both with a reset.
    """
    up = asyncio.ensure_future(_copy(client, server, tunnel, True, idle))
    down = asyncio.ensure_future(_copy(server, client, tunnel, False, idle))
    outcome = "closed"
    try:
        for task in asyncio.as_completed((up, down)):
            try:
                await task
            except IdleTimeout:
                outcome = "idle_timeout"
                break
            except (OSError, ssl.SSLError, ConnectionError):
                outcome = "reset"
                break
    finally:
        for task in (up, down):
            if not task.done():
                task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
    if outcome == "closed":
        await asyncio.gather(client.close(), server.close())
    else:
        client.reset()
        server.reset()
    return outcome


# ---------------------------------------------------------------------------
# Tunnels: caps, metrics, logs


class Tunnels:
    """The tunnels of one process: the cap, the counts for /metrics, a log line for each."""

    def __init__(self, max_tunnels: int, log_line: Callable[[str], None]) -> None:
        self.max_tunnels = max_tunnels
        self.log_line = log_line
        self.active: dict[str, int] = {"ingress": 0, "peer": 0}
        self.opened: dict[tuple[str, str], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}

    def admit(self, side: str) -> bool:
        if self.active[side] >= self.max_tunnels:
            return False
        self.active[side] += 1
        return True

    def done(self, tunnel: Tunnel, admitted: bool = True) -> None:
        if admitted:
            self.active[tunnel.side] -= 1
        key = (tunnel.side, tunnel.outcome)
        self.opened[key] = self.opened.get(key, 0) + 1
        for direction, count in (("to_host", tunnel.bytes_to_host), ("to_client", tunnel.bytes_to_client)):
            self.bytes[tunnel.side, direction] = self.bytes.get((tunnel.side, direction), 0) + count
        record = tunnel.record()
        log.info("bridge %s client=%s:%d name=%s peer=%s host=%s bytes_in=%d bytes_out=%d outcome=%s",
                 tunnel.side, tunnel.client, tunnel.client_port, tunnel.name or "-", tunnel.peer,
                 tunnel.host or "-", tunnel.bytes_to_host, tunnel.bytes_to_client, tunnel.outcome)
        try:
            self.log_line(json.dumps(record, ensure_ascii=False, separators=(", ", ": ")))
        except Exception:  # the log must never end a tunnel
            log.exception("could not write a bridge access-log record")


async def run_tunnel(tunnels: Tunnels, tunnel: Tunnel, stream: Stream, serve: Callable[[], Awaitable[str]],
                     what: str) -> None:
    """Admit `tunnel` under max_tunnels, run serve() and record its outcome; a failure is logged, never raised
    (a cancellation, at a stop, is recorded as "shutdown" and passed on)."""
    if not tunnels.admit(tunnel.side):
        tunnel.outcome = "refused_tunnels"
        stream.reset()
        tunnels.done(tunnel, admitted=False)
        return
    try:
        tunnel.outcome = await serve()
    except asyncio.CancelledError:
        tunnel.outcome = "shutdown"
        stream.reset()
        raise
    except Exception:
        log.exception("%s failed", what)
        tunnel.outcome = "error"
        stream.reset()
    finally:
        tunnels.done(tunnel)


class BridgeCollector:
    """/metrics families of the bridge (read from the services thread's counters)."""

    def __init__(self, tunnels: Tunnels) -> None:
        self.tunnels = tunnels

    def collect(self) -> Iterator[Any]:
        t = self.tunnels
        active = GaugeMetricFamily("kracauer_bridge_tunnels_active", "Bridge tunnels open now", labels=["side"])
        for side, count in sorted(t.active.items()):
            active.add_metric([side], count)
        opened = CounterMetricFamily("kracauer_bridge_tunnels", "Bridge tunnels ended, by outcome",
                                     labels=["side", "outcome"])
        for (side, outcome), count in sorted(dict(t.opened).items()):
            opened.add_metric([side, outcome], count)
        moved = CounterMetricFamily("kracauer_bridge_bytes", "Bytes relayed by bridge tunnels (to_host: "
                                    "from the client towards the service)", labels=["side", "direction"])
        for (side, direction), count in sorted(dict(t.bytes).items()):
            moved.add_metric([side, direction], count)
        yield from (active, opened, moved)


# ---------------------------------------------------------------------------
# TLS contexts (the files are read here, during set-up, before privileges are dropped)


def peer_context(listener: BridgeListener) -> ssl.SSLContext:
    """The peer's server context: TLS 1.3 only (RFC 8446), a client certificate from client_ca required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(listener.cert, listener.key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=listener.client_ca)

    def note_server_name(sslobj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.outer_name = name  # for the access log: the outer SNI the ingress sent
    context.sni_callback = note_server_name
    return context


def ingress_context(bridge: Bridge) -> ssl.SSLContext:
    """The ingress's client context: TLS 1.3, the peer verified against `ca` for `server_name`, our certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=bridge.ca)
    context.load_cert_chain(bridge.cert, bridge.key)
    return context


# ---------------------------------------------------------------------------
# The peer


class PeerListener:
    """One ``protocol = "bridge"`` listener: TLS in, CONNECT, then the host from prefix::client."""

    def __init__(self, service: "BridgeService", listener: BridgeListener) -> None:
        self.service = service
        self.listener = listener
        self.context = peer_context(listener)
        self.sock = _listening_socket(socket.AF_INET, str(listener.address), listener.port)
        self.server: asyncio.AbstractServer | None = None

    @property
    def name(self) -> str:
        return f"{self.listener.address}:{self.listener.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, sock=self.sock, limit=CHUNK)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        service = self.service
        raw = Stream(reader, writer)
        address = raw.peername[0] if raw.peername else "?"
        tunnel = Tunnel("peer", client="", client_port=0, peer=address, bridge=self.name)
        await run_tunnel(service.tunnels, tunnel, raw, lambda: self._serve(reader, writer, tunnel),
                         f"bridge peer: a tunnel from {address}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tunnel: Tunnel) -> str:
        limits = self.service.config.limits
        stream = TlsStream(reader, writer, self.context, server_side=True)
        try:
            await asyncio.wait_for(stream.handshake(), limits.hello_timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("bridge peer: TLS handshake with %s failed: %s", tunnel.peer, exc)
            stream.reset()
            return "client_tls_failed"
        tunnel.outer_name = getattr(stream.tls, "outer_name", None) or ""
        try:
            result, rest, peeker = await asyncio.wait_for(self._read_head(stream), limits.hello_timeout)
        except asyncio.TimeoutError:
            stream.reset()
            return "hello_timeout"
        if not isinstance(result, Decision):
            return await self._refuse(stream, connect.BAD_REQUEST if not isinstance(result, BadRequest) or
                                      result.outcome != "refused_method" else connect.NOT_IMPLEMENTED,
                                      "refused_bad_request" if not isinstance(result, BadRequest) else result.outcome)
        tunnel.name, tunnel.port = result.name, result.port or 0
        # The Forwarded field is trusted: the ingress box proved who it is (its certificate is from client_ca).
        try:
            client = connect.parse_forwarded(peeker.fields.get(connect.FORWARDED, []))
        except ValueError as exc:
            log.info("bridge peer: %s sent no usable Forwarded field: %s", tunnel.peer, exc)
            return await self._refuse(stream, connect.BAD_REQUEST, "refused_bad_request")
        tunnel.client, tunnel.client_port = str(client), 0
        if result.port not in self.listener.ports:
            return await self._refuse(stream, connect.FORBIDDEN_PORT, "refused_port")
        target = await self.service.resolve_peer(result.name, result.port)
        if target is None:
            return await self._refuse(stream, connect.FORBIDDEN_NAME, "refused_unknown_name")
        if isinstance(target, Refused):
            # A resolve route with no usable AAAA: refused as an unknown name is (403), as a
            # connect listener does; the outcome says why.
            return await self._refuse(stream, connect.FORBIDDEN_NAME, target.outcome)
        tunnel.route = target.route
        host, outcome = await self._connect_host(client, target, limits.connect_timeout)
        if host is None:
            return await self._refuse(stream, connect.BAD_GATEWAY, outcome)
        tunnel.host = host.peername[0] if host.peername else None
        stream.write(connect.CONNECTION_ESTABLISHED)
        if rest:
            host.write(rest)
            tunnel.bytes_to_host += len(rest)
        return await pump(stream, host, tunnel, limits.idle_timeout)

    async def _read_head(self, stream: TlsStream) -> tuple[Any, bytes, connect.ConnectPeeker]:
        """The CONNECT head with the capped incremental reader; the bytes after it belong to the tunnel."""
        peeker = connect.ConnectPeeker(self.service.config.limits.hello_max_bytes, keep=[connect.FORWARDED])
        buffered = bytearray()
        result: Any = NEED_DATA
        while result is NEED_DATA:
            data = await stream.read(CHUNK)
            if not data:
                return BadRequest("the connection ended inside the CONNECT head"), b"", peeker
            buffered += data
            result = peeker.feed(data)
        rest = bytes(buffered[result.hello_size:]) if isinstance(result, Decision) else b""
        return result, rest, peeker

    async def _connect_host(self, client: ipaddress.IPv4Address, target: Target,
                            timeout: float) -> tuple[Stream | None, str]:
        """A connection to the route's hosts, in order, from prefix::client (the host logs the client)."""
        source = str(self.listener.prefix.network_address + int(client))
        outcome = "host_unreachable"
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        for host in target.hosts:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
                sock.bind((source, 0))
                await asyncio.wait_for(loop.sock_connect(sock, (str(host), target.port)),
                                       max(deadline - time.monotonic(), 0.01))
            except ConnectionRefusedError:
                sock.close()
                outcome = "host_refused"
                continue
            except (OSError, asyncio.TimeoutError) as exc:
                log.info("bridge peer: cannot reach [%s]:%d from %s: %s", host, target.port, source, exc)
                sock.close()
                continue
            reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
            return Stream(reader, writer), "connected"
        return None, outcome

    async def _refuse(self, stream: TlsStream, answer: bytes, outcome: str) -> str:
        """The same answers as a connect listener (RFC 9110 §15), then close."""
        try:
            stream.write(answer)
            await asyncio.wait_for(stream.drain(), CLOSE_TIMEOUT)
            await stream.write_eof()
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            pass
        await stream.close()
        return outcome


# ---------------------------------------------------------------------------
# The ingress relay


_PEEKERS = {"tls": tls.TlsPeeker, "http": http.HttpPeeker, "connect": connect.ConnectPeeker}


class IngressRelay:
    """The relay's listening sockets (one per relay address and port) and what it does with a connection."""

    def __init__(self, service: "BridgeService", config: Config, device: str) -> None:
        self.service = service
        self.contexts = {bridge.name: ingress_context(bridge) for bridge in config.bridges}
        self.prefixes = [config.prefix] + [lst.prefix for lst in config.listeners if lst.prefix is not None]
        self.sockets: list[tuple[str, socket.socket]] = []
        addresses = relay_addresses(config.prefix)
        for protocol, ports in relay_ports(config).items():
            for port in sorted(ports):
                sock = _listening_socket(socket.AF_INET6, str(addresses[protocol]), port, device=device)
                self.sockets.append((protocol, sock))
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        for protocol, sock in self.sockets:
            async def accept(reader, writer, protocol=protocol):
                await self._accept(protocol, reader, writer)
            self.servers.append(await asyncio.start_server(accept, sock=sock, limit=CHUNK))

    def _client_of(self, address: str) -> ipaddress.IPv4Address | None:
        """The client's IPv4 from prefix::client (the tracker's source), or None for anything else."""
        ip = ipaddress.IPv6Address(address.split("%")[0])
        for prefix in self.prefixes:
            if ip in prefix:
                return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        return None

    async def _accept(self, protocol: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        service = self.service
        client = Stream(reader, writer)
        peer_address, peer_port = client.peername[:2]
        address = self._client_of(peer_address)
        tunnel = Tunnel("ingress", client=str(address or peer_address), client_port=peer_port, peer="",
                        protocol=protocol, port=client.sockname[1])
        if address is None:
            # Only the tracker's splices reach this socket (bound to the TUN); anything else is refused.
            tunnel.outcome = "refused_source"
            client.reset()
            service.tunnels.done(tunnel, admitted=False)
            return
        await run_tunnel(service.tunnels, tunnel, client, lambda: self._serve(protocol, client, tunnel),
                         f"bridge relay: a tunnel for {tunnel.client}")

    async def _serve(self, protocol: str, client: Stream, tunnel: Tunnel) -> str:
        limits = self.service.config.limits
        try:
            decision, buffered = await asyncio.wait_for(self._peek(protocol, client), limits.hello_timeout)
        except asyncio.TimeoutError:
            client.reset()
            return "hello_timeout"
        if not isinstance(decision, Decision):
            # The tracker routed these bytes already: not reading them the same way is a bug, not a client's.
            log.warning("bridge relay: %s's bytes read differently than in the tracker: %s", tunnel.client, decision)
            client.reset()
            return "refused_bad_request"
        port = tunnel.port
        target = self.service.router.lookup(decision.name, port, decision.alpn)
        bridge = self.service.bridges.get(target.bridge) if target is not None and target.bridge else None
        tunnel.name, tunnel.route = decision.name, target.route if target is not None else None
        if bridge is None or decision.name is None:
            client.reset()  # the routes changed (a reload) between the tracker's decision and now
            return "refused_unknown_name"
        tunnel.bridge, tunnel.outer_name = bridge.name, bridge.server_name
        # RFC 3986 §3.2.2: an IPv6 address in brackets, as the config writes it ("::1:4443" is ambiguous).
        tunnel.peer = f"[{bridge.address}]:{bridge.port}" if ":" in bridge.address else f"{bridge.address}:{bridge.port}"
        if protocol == "connect":
            # The relay answers the client's CONNECT itself: its head is not passed on, what follows is the tunnel's.
            buffered = buffered[decision.hello_size:]
        peer, outcome = await self._open_peer(bridge, limits.connect_timeout)
        if peer is None:
            client.reset()
            return outcome
        tunnel.host = tunnel.peer
        try:
            peer.write(connect.connect_request(decision.name, port, tunnel.client))
            await peer.drain()
            head, rest = await asyncio.wait_for(self._read_answer(peer), limits.connect_timeout)
        except ssl.SSLError as exc:
            # TLS 1.3 (RFC 8446 §4.4.2): the peer checks this box's certificate after the client's
            # handshake is done, so a refused certificate is an alert on the first read.
            log.warning("bridge relay: TLS with peer %s (%s) failed: %s", tunnel.peer, bridge.server_name, exc)
            peer.reset()
            client.reset()
            return "peer_tls_failed"
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("bridge relay: peer %s did not answer the CONNECT: %s", tunnel.peer, exc)
            peer.reset()
            client.reset()
            return "peer_failed"
        # RFC 9110 §9.3.6: any 2xx makes the connection a tunnel.
        if not isinstance(head, connect.ResponseHead) or not 200 <= head.status < 300:
            what = f"{head.status} {head.reason}" if isinstance(head, connect.ResponseHead) else head.reason
            log.info("bridge relay: peer %s refused %s:%d for %s: %s", tunnel.peer, decision.name, port,
                     tunnel.client, what)
            peer.reset()
            client.reset()  # the client learns it as a reset (its TLS session never began)
            status = head.status if isinstance(head, connect.ResponseHead) else 0
            return f"peer_refused_{status}" if status else "peer_bad_answer"
        if protocol == "connect":
            client.write(connect.CONNECTION_ESTABLISHED)
        if rest:
            client.write(rest)
            tunnel.bytes_to_client += len(rest)
        if buffered:
            peer.write(bytes(buffered))
            tunnel.bytes_to_host += len(buffered)
        return await pump(client, peer, tunnel, limits.idle_timeout)

    async def _peek(self, protocol: str, client: Stream) -> tuple[Any, bytearray]:
        """Read the name again from the same bytes, with the peeker the tracker used (one parser, not two)."""
        peeker = _PEEKERS[protocol](self.service.config.limits.hello_max_bytes)
        buffered = bytearray()
        result: Any = NEED_DATA
        while result is NEED_DATA:
            data = await client.read(CHUNK)
            if not data:
                return NotProtocol("the client closed before its hello ended"), buffered
            buffered += data
            result = peeker.feed(data)
        return result, buffered

    async def _open_peer(self, bridge: Bridge, timeout: float) -> tuple[TlsStream | None, str]:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(bridge.address, bridge.port, limit=CHUNK),
                                                    timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("bridge relay: cannot connect to peer %s:%d: %s", bridge.address, bridge.port, exc)
            return None, "peer_unreachable"
        peer = TlsStream(reader, writer, self.contexts[bridge.name], server_side=False,
                         server_hostname=bridge.server_name)
        try:
            await asyncio.wait_for(peer.handshake(), timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.warning("bridge relay: TLS with peer %s:%d (%s) failed: %s", bridge.address, bridge.port,
                        bridge.server_name, exc)
            peer.reset()
            return None, "peer_tls_failed"
        return peer, "connected"

    @staticmethod
    async def _read_answer(peer: TlsStream) -> tuple[Any, bytes]:
        reader = connect.ResponseHeadReader()
        while True:
            data = await peer.read(CHUNK)
            if not data:
                return connect.BadResponse("the peer closed before its answer ended"), b""
            result = reader.feed(data)
            if result is not NEED_DATA:
                return result, reader.rest


# ---------------------------------------------------------------------------
# Sockets, and the service that owns both ends


def _listening_socket(family: int, address: str, port: int, device: str | None = None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if device is not None:
            # Only what comes out of the TUN (the tracker's splices) reaches the relay.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"bridge: cannot listen on {address}:{port}: {exc.strerror}") from None
    return sock


class BridgeService:
    """The bridge's two ends in one process. Made during set-up (root: sockets bound, routes and the
    relay's addresses added, certificate files read); runs on the services loop."""

    def __init__(self, config: Config, log_line: Callable[[str], None], device: str,
                 names: NameResolver | None = None) -> None:
        self.config = config
        self.router = Router(config.routes, config.fallback)
        self.names = names
        self.bridges = {bridge.name: bridge for bridge in config.bridges}
        self.tunnels = Tunnels(config.limits.max_tunnels, log_line)
        self.device = device
        self.peers = [PeerListener(self, lst) for lst in config.bridge_listeners]
        self.relay = IngressRelay(self, config, device) if config.bridges else None

    async def resolve_peer(self, name: str | None, port: int) -> Target | Refused | None:
        """The peer's routing: its own [[route]] table, resolve routes (route by DNS) included,
        looked up on this loop with the daemon's resolver and its cache."""
        if self.names is not None:
            target = await self.names.lookup_route(self.router, name, port)
        else:
            target = self.router.lookup(name, port)
            if isinstance(target, Resolve):
                return Refused(REFUSED_ERROR)  # no resolver: cannot happen with a valid configuration
        if isinstance(target, Target) and target.bridge is not None:
            return None  # a bridge route is an ingress's: a peer never bridges onwards
        return target

    def reconfigure(self, config: Config, names: NameResolver | None = None) -> None:
        """A reload (on the services loop): new routes and limits for new tunnels; open ones go on."""
        self.config = config
        self.router = Router(config.routes, config.fallback)
        self.names = names
        self.tunnels.max_tunnels = config.limits.max_tunnels

    async def start(self) -> None:
        for peer in self.peers:
            await peer.start()
        if self.relay is not None:
            await self.relay.start()

    async def stop(self) -> None:
        servers = [p.server for p in self.peers] + (self.relay.servers if self.relay is not None else [])
        for server in servers:
            if server is not None:
                server.close()

    def sockets(self) -> list[socket.socket]:
        return [p.sock for p in self.peers] + ([s for _, s in self.relay.sockets] if self.relay else [])


def bridge_changes(old: Config, new: Config) -> list[str]:
    """What a reload cannot change about the bridge (sockets and files are set up once, as root)."""
    problems = []
    if old.bridges != new.bridges:
        problems.append("[[bridge]]")
    if old.bridge_listeners != new.bridge_listeners:
        problems.append("bridge [[listen]] entries")
    if relay_ports(old) != relay_ports(new):
        problems.append("the ports bridge routes are reached on")
    return problems


__all__ += ["BridgeCollector", "Tunnel", "Tunnels", "bridge_changes", "relay_ports"]
