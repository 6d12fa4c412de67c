"""The agent hub: hosts behind NAT dial in, and the box routes their names down their tunnels.

``[agents]`` (docs/configuration.md, ../shared/design/agents.md). An agent
(``kracauer agent``, kracauer/agent.py) opens one TLS 1.3 connection to
``[agents] listen``, sends its token and the names it serves
(netstack/agentwire.py), and gets one address from ``[agents] network``.
From then on the box treats it as a plain IPv6 host at that address:

- its names become routes (kracauer/routing.py, ``dynamic``) whose hosts are
  the addresses of the agents that registered them, so two agents for one
  name share it with the usual rendezvous choice and failover;
- the tracker is unchanged: it writes the translated IPv6 packets into the
  main TUN as for any host; the kernel routes ``[agents] network`` into the
  hub's own TUN (``[agents] tun``), where this module reads them and sends
  each down the tunnel of the agent whose address it is for;
- what an agent sends up (the host kernel's answers, from its address to
  ``prefix::client``) is written into the hub's TUN, and the kernel routes
  it into the main TUN, where the tracker (or the kernel path's BPF program)
  translates it back to IPv4 as usual.

So the kernel data path carries agents' connections as it carries any
host's: it sits on the main TUN and never sees the hub's.

Everything here runs on the services thread (kracauer/services.py); the
packet loop hears of changes through ``on_change(routes, gone)``, which the
daemon posts to its own thread. Tokens are only ever held as their SHA-256
and compared with ``hmac.compare_digest``.

Backpressure: each tunnel's TLS connection is its flow control. A packet
for an agent whose connection has more than ``SEND_BUFFER_MAX`` bytes
waiting is dropped and counted (TCP retransmits it), so a stuck tunnel
never grows memory; so is one that cannot be written into the TUN.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from kracauer.config import AgentsConfig, AgentToken, agent_name_allowed, agent_name_key
from kracauer.tun import Tun, open_tun
from netstack import agentwire as wire

__all__ = ["AgentHub", "AgentSession", "AddressPool", "new_token", "token_sha256", "find_token", "check_names",
           "AgentsCollector"]

log = logging.getLogger("kracauer.agents")

# Bytes waiting in one tunnel's TLS connection past which packets for it are dropped.
SEND_BUFFER_MAX = 4 << 20
# Packets read from the hub's TUN per wake-up, written to each tunnel as one write.
READ_BATCH = 64
# How long an agent has, once connected, to say who it is.
HELLO_TIMEOUT = 10.0
# Missed keepalive intervals after which a silent tunnel is closed.
KEEPALIVE_MISSES = 3
# Refusals logged at most this often (a misconfigured agent retries).
REFUSAL_LOG_INTERVAL = 10.0

OnChange = Callable[[dict[str, tuple[ipaddress.IPv6Address, ...]], list[ipaddress.IPv6Address]], None]


# -- tokens -----------------------------------------------------------------------------

def new_token() -> str:
    """A new agent token: 256 bits from the kernel's CSPRNG, URL-safe text (design/agents.md: at least 128)."""
    return secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    """What ``[[agents.token]] sha256`` holds for `token`."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def find_token(token: str, tokens: Sequence[AgentToken]) -> AgentToken | None:
    """The configured token `token` is, or None; every entry is compared, each in constant time."""
    digest = token_sha256(token).encode()
    found = None
    for entry in tokens:
        if hmac.compare_digest(digest, entry.sha256.encode()):
            found = entry
    return found


def check_names(names: Iterable[str], token: AgentToken) -> list[str]:
    """The names (as given) that `token` may not register, or that are not names at all."""
    allowed = [agent_name_key(n) for n in token.names]
    refused = []
    for name in names:
        try:
            key = agent_name_key(name)
        except ValueError:
            refused.append(name)
            continue
        if not agent_name_allowed(key, allowed):
            refused.append(name)
    return refused


def _route_name(name: str) -> str:
    """The name as the router keys it: ("exact", "a.b") → "a.b", ("wildcard", "b") → "*.b"."""
    kind, key = agent_name_key(name)
    return "*." + key if kind == "wildcard" else key


# -- addresses --------------------------------------------------------------------------

class AddressPool:
    """The agents' addresses, from ``[agents] network``, handed out in turn.

    Round-robin rather than lowest-free: an address that was just given back
    is not given to the next agent at once, so late packets of connections
    through the old agent never reach a new one.
    """

    def __init__(self, network: ipaddress.IPv6Network) -> None:
        self.network = network
        # ::0 is the subnet-router anycast address (RFC 4291 section 2.6.1) and ::1 kept for the box.
        self._first = 2
        self._size = min(network.num_addresses, 1 << 32)
        self._next = self._first
        self.used: set[ipaddress.IPv6Address] = set()

    def allocate(self) -> ipaddress.IPv6Address | None:
        for _ in range(self._size - self._first):
            offset = self._next
            self._next = self._next + 1 if self._next + 1 < self._size else self._first
            address = self.network.network_address + offset
            if address not in self.used:
                self.used.add(address)
                return address
        return None

    def release(self, address: ipaddress.IPv6Address) -> None:
        self.used.discard(address)


# -- one agent ----------------------------------------------------------------------

@dataclass
class AgentSession:
    """One connected agent, as the hub sees it."""

    address: ipaddress.IPv6Address
    names: tuple[str, ...]          # as registered (route names: "app.example.com", "*.dev.example.com")
    peer: str
    token_sha256: str
    writer: asyncio.StreamWriter
    connected_at: float = field(default_factory=time.time)
    packets_to_agent: int = 0
    bytes_to_agent: int = 0
    packets_from_agent: int = 0
    bytes_from_agent: int = 0
    drops: Counter = field(default_factory=Counter)
    pending: list = field(default_factory=list)
    closing: bool = False

    @property
    def key(self) -> bytes:
        return self.address.packed

    def send_control(self, kind: int, message: dict) -> None:
        if not self.writer.is_closing():
            self.writer.write(wire.encode_control(kind, message))

    def flush(self) -> None:
        """Write the packets queued in this batch, or drop them if the tunnel is backed up."""
        frames, self.pending = self.pending, []
        if not frames:
            return
        transport = self.writer.transport
        if self.writer.is_closing() or transport.get_write_buffer_size() > SEND_BUFFER_MAX:
            self.drops["tunnel_full"] += len(frames)
            return
        self.writer.write(b"".join(frames))


class _Refused(Exception):
    def __init__(self, reason: str, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry


# -- the hub --------------------------------------------------------------------------

class AgentHub:
    """The agents' listener, their sessions and the hub's TUN (on the services thread)."""

    def __init__(self, config: AgentsConfig, prefixes: Sequence[ipaddress.IPv6Network], mtu: int,
                 on_change: OnChange, shadowed: Callable[[str], bool] | None = None) -> None:
        self.config = config
        self.prefixes = tuple(prefixes)
        self.mtu = mtu
        self.on_change = on_change
        # Whether a configured route has this very name (the agent's is not used then; logged once).
        self.shadowed = shadowed or (lambda name: False)
        self.pool = AddressPool(config.network)
        self.sessions: dict[bytes, AgentSession] = {}
        self.names: dict[str, list[AgentSession]] = {}
        self.refusals: Counter = Counter()
        self.drops: Counter = Counter()      # packets for no agent, or not allowed up
        self.tun: Tun | None = None
        self.sock: socket.socket | None = None
        self.ssl: ssl.SSLContext | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_refusal_log = 0.0
        self._prefix_keys = tuple((p.network_address.packed[:p.prefixlen // 8], p.prefixlen // 8) for p in self.prefixes)

    # -- set-up, as root ---------------------------------------------------------------

    def open(self) -> None:
        """The hub's TUN with the route for the agents' network, the listening socket, the TLS context.

        All made before root is dropped; from here on the hub only reads and
        writes what it holds.
        """
        self.ssl = self._ssl_context(self.config)
        family = socket.AF_INET6 if self.config.address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((str(self.config.address), self.config.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"[agents] listen: cannot listen on {self.config.listen}: "
                                     f"{exc.strerror or exc}") from None
        self.sock = sock
        try:
            self.tun = open_tun(self.config.tun, self.mtu, [], [self.config.network], offload=False, persist=False)
        except BaseException:
            sock.close()
            self.sock = None
            raise

    @staticmethod
    def _ssl_context(config: AgentsConfig) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # The tunnel is ours on both ends: TLS 1.3 only.
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_cert_chain(config.cert, config.key)
        except (OSError, ssl.SSLError) as exc:
            raise OSError(errno.EINVAL, f"[agents] cert/key: cannot load {config.cert} and {config.key}: {exc}") from None
        return context

    def close(self) -> None:
        """The TUN (and its route) go; after ``stop``."""
        if self.tun is not None:
            self.tun.close(keep=False)
            self.tun = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- on the services loop ---------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, sock=self.sock, ssl=self.ssl,
                                                  ssl_handshake_timeout=HELLO_TIMEOUT)
        self.sock = None  # the server owns it now
        loop.add_reader(self.tun.fd, self._on_tun)
        log.info("agents: listening on %s (TLS 1.3), addresses from %s on %s, %d tokens", self.config.listen,
                 self.config.network, self.config.tun, len(self.config.tokens))

    async def stop(self) -> None:
        """Say BYE to every agent (they deregister; their names go) and stop listening."""
        loop = asyncio.get_running_loop()
        if self.tun is not None:
            loop.remove_reader(self.tun.fd)
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions.values()):
            session.send_control(wire.BYE, {"reason": "box_stopping"})
            session.writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)

    def reconfigure(self, config: AgentsConfig) -> None:
        """A reload: new tokens and names for new agents; connected ones are checked against them.

        An agent whose token is gone, or that holds a name its token may no
        longer have, is sent an ERROR and disconnected (its names go, and its
        connections end); the others keep their tunnel and connections.
        """
        self.config = config
        for session in list(self.sessions.values()):
            token = next((t for t in config.tokens if hmac.compare_digest(t.sha256, session.token_sha256)), None)
            if token is None:
                self._disconnect(session, "token_revoked", "the box's configuration no longer accepts this token")
                continue
            refused = check_names(session.names, token)
            if refused:
                self._disconnect(session, "name_not_allowed",
                                 f"the box's configuration no longer lets this token register {', '.join(refused)}")

    def _disconnect(self, session: AgentSession, reason: str, message: str) -> None:
        log.warning("agents: disconnecting the agent at %s (%s, names %s): %s", session.address, session.peer,
                    ", ".join(session.names), message)
        session.send_control(wire.ERROR, {"reason": reason, "message": message, "retry": False})
        session.closing = True
        session.writer.close()

    def routes(self) -> dict[str, tuple[ipaddress.IPv6Address, ...]]:
        """Name → the addresses of the agents that registered it, oldest first."""
        return {name: tuple(s.address for s in sessions) for name, sessions in self.names.items() if sessions}

    # -- one agent's connection --------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        session = None
        decoder = wire.FrameDecoder()
        try:
            try:
                hello = await asyncio.wait_for(self._read_hello(reader, decoder), HELLO_TIMEOUT)
                session = self._register(hello, peer, writer)
            except _Refused as refusal:
                await self._refuse(writer, peer, refusal)
                return
            except (asyncio.TimeoutError, wire.FrameError, ConnectionError, asyncio.IncompleteReadError) as exc:
                await self._refuse(writer, peer, _Refused("bad_hello", f"no valid HELLO: {exc or 'timeout'}", True))
                return
            await self._relay(session, reader, decoder)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            if session is not None:
                log.info("agents: the tunnel of the agent at %s (%s) broke: %s", session.address, peer, exc)
        finally:
            if session is not None:
                self._unregister(session)
            writer.close()
            self._tasks.discard(task)

    async def _read_hello(self, reader: asyncio.StreamReader, decoder: wire.FrameDecoder) -> wire.Hello:
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                if frame.type != wire.HELLO:
                    raise wire.FrameError(f"expected HELLO first, got frame type {frame.type:#x}")
                return wire.parse_hello(wire.decode_control(frame))
            data = await reader.read(wire.CONTROL_MAX)
            if not data:
                raise ConnectionError("closed before its HELLO")
            decoder.receive_data(data)

    def _register(self, hello: wire.Hello, peer: str, writer: asyncio.StreamWriter) -> AgentSession:
        if hello.version != wire.VERSION:
            raise _Refused("bad_version", f"this box speaks agent protocol version {wire.VERSION}, the agent "
                                          f"{hello.version}: run the same kracauer version on both")
        token = find_token(hello.token, self.config.tokens)
        if token is None:
            raise _Refused("bad_token", "the token is not accepted by this box (check token_file against the "
                                        "box's [[agents.token]] sha256)")
        refused = check_names(hello.names, token)
        if refused:
            raise _Refused("name_not_allowed", f"this token may not register {', '.join(refused)} (it may register "
                                               f"{', '.join(token.names)})")
        names = tuple(dict.fromkeys(_route_name(n) for n in hello.names))
        address = self.pool.allocate()
        if address is None:
            raise _Refused("no_address", f"no free address left in [agents] network {self.config.network}", True)
        session = AgentSession(address=address, names=names, peer=peer, token_sha256=token.sha256, writer=writer)
        self.sessions[session.key] = session
        for name in names:
            self.names.setdefault(name, []).append(session)
            if self.shadowed(name):
                log.warning("agents: %s is also a configured [[route]], which wins: the agent at %s gets no "
                            "connections for it", name, address)
        session.send_control(wire.REGISTERED, {
            "address": str(address), "prefixes": [str(p) for p in self.prefixes], "mtu": self.mtu,
            "keepalive": self.config.keepalive, "names": list(names)})
        log.info("agents: agent from %s registered %s at %s", peer, ", ".join(names), address)
        self.on_change(self.routes(), [])
        return session

    async def _refuse(self, writer: asyncio.StreamWriter, peer: str, refusal: _Refused) -> None:
        self.refusals[refusal.reason] += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL or refusal.reason != "bad_hello":
            self._last_refusal_log = now
            log.warning("agents: refused the agent from %s: %s (%s)", peer, refusal.message, refusal.reason)
        if not writer.is_closing():
            writer.write(wire.encode_control(wire.ERROR, {"reason": refusal.reason, "message": refusal.message,
                                                          "retry": refusal.retry}))
            try:
                await asyncio.wait_for(writer.drain(), 2.0)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass

    def _unregister(self, session: AgentSession) -> None:
        if self.sessions.get(session.key) is not session:
            return
        del self.sessions[session.key]
        for name in session.names:
            holders = self.names.get(name, [])
            if session in holders:
                holders.remove(session)
            if not holders:
                self.names.pop(name, None)
        self.pool.release(session.address)
        log.info("agents: the agent at %s (%s) is gone; its names %s with it", session.address, session.peer,
                 ", ".join(session.names))
        self.on_change(self.routes(), [session.address])

    async def _relay(self, session: AgentSession, reader: asyncio.StreamReader, decoder: wire.FrameDecoder) -> None:
        """Frames from the agent until it goes; keepalives both ways."""
        interval = self.config.keepalive
        keepalive = asyncio.ensure_future(self._keepalive(session, interval))
        try:
            while True:
                while True:
                    frame = decoder.next_frame()
                    if frame is None:
                        break
                    if frame.type == wire.PACKET:
                        self._packet_up(session, frame.body)
                    elif frame.type == wire.BYE:
                        log.info("agents: the agent at %s said bye", session.address)
                        return
                    elif frame.type != wire.KEEPALIVE:
                        raise wire.FrameError(f"unexpected frame type {frame.type:#x}")
                try:
                    data = await asyncio.wait_for(reader.read(1 << 18), interval * KEEPALIVE_MISSES)
                except asyncio.TimeoutError:
                    log.warning("agents: nothing from the agent at %s for %.0f s: closing its tunnel",
                                session.address, interval * KEEPALIVE_MISSES)
                    return
                if not data:
                    return
                decoder.receive_data(data)
        except wire.FrameError as exc:
            log.warning("agents: the agent at %s sent a bad frame, closing: %s", session.address, exc)
        finally:
            keepalive.cancel()

    async def _keepalive(self, session: AgentSession, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            session.send_control(wire.KEEPALIVE, {})

    def _packet_up(self, session: AgentSession, packet: bytes) -> None:
        """A packet from the agent: only from its own address, only to a client prefix, into the hub's TUN."""
        endpoints = wire.ipv6_endpoints(packet)
        if endpoints is None or len(packet) > self.mtu:
            session.drops["not_ipv6"] += 1
            return
        src, dst = endpoints
        if src != session.key:
            session.drops["wrong_source"] += 1
            return
        if not self._from_client(dst):
            session.drops["not_to_client"] += 1
            return
        try:
            os.write(self.tun.fd, packet)
        except OSError as exc:
            session.drops["tun_" + errno.errorcode.get(exc.errno, str(exc.errno)).lower()] += 1
            return
        session.packets_from_agent += 1
        session.bytes_from_agent += len(packet)

    def _from_client(self, address: bytes) -> bool:
        return any(address[:n] == key for key, n in self._prefix_keys)

    def _on_tun(self) -> None:
        """Packets the kernel routed to the agents' network: each down its agent's tunnel."""
        fd = self.tun.fd
        sessions = self.sessions
        touched = []
        for _ in range(READ_BATCH):
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                self.drops["tun_read_" + errno.errorcode.get(exc.errno, str(exc.errno)).lower()] += 1
                break
            endpoints = wire.ipv6_endpoints(packet)
            if endpoints is None:
                self.drops["not_ipv6"] += 1
                continue
            if not self._from_client(endpoints[0]) or packet[6] not in wire.DOWN_PROTOCOLS:
                # The kernel routes [agents] network here from any interface: only what the tracker
                # made (TCP, ICMPv6 errors, from prefix::client) goes down, never a way into the host.
                self.drops["not_from_client"] += 1
                continue
            session = sessions.get(endpoints[1])
            if session is None or session.closing:
                self.drops["no_agent"] += 1
                continue
            if not session.pending:
                touched.append(session)
            session.pending.append(wire.encode_packet(packet))
            session.packets_to_agent += 1
            session.bytes_to_agent += len(packet)
        for session in touched:
            session.flush()


# -- metrics ----------------------------------------------------------------------------

class AgentsCollector:
    """The agents, their names and traffic, for /metrics (read from the metrics thread: copies only)."""

    def __init__(self, hub: AgentHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        hub = self.hub
        sessions = list(hub.sessions.values())
        yield GaugeMetricFamily("kracauer_agents_connected", "Agents with an open tunnel", value=len(sessions))
        info = GaugeMetricFamily("kracauer_agent_info", "One per connected agent: its address, peer and names",
                                 labels=["agent", "peer", "names"])
        packets = CounterMetricFamily("kracauer_agent_packets", "Packets through an agent's tunnel",
                                      labels=["agent", "direction"])
        octets = CounterMetricFamily("kracauer_agent_bytes", "IPv6 bytes through an agent's tunnel",
                                     labels=["agent", "direction"])
        drops = CounterMetricFamily("kracauer_agent_drops", "Packets of an agent's tunnel dropped, by reason",
                                    labels=["agent", "reason"])
        for s in sessions:
            agent = str(s.address)
            info.add_metric([agent, s.peer, ",".join(s.names)], 1)
            packets.add_metric([agent, "to_agent"], s.packets_to_agent)
            packets.add_metric([agent, "from_agent"], s.packets_from_agent)
            octets.add_metric([agent, "to_agent"], s.bytes_to_agent)
            octets.add_metric([agent, "from_agent"], s.bytes_from_agent)
            for reason, n in list(s.drops.items()):
                drops.add_metric([agent, reason], n)
        for reason, n in list(hub.drops.items()):
            drops.add_metric(["-", reason], n)
        refusals = CounterMetricFamily("kracauer_agent_refusals", "Agents refused at registration, by reason",
                                       labels=["reason"])
        for reason, n in list(hub.refusals.items()):
            refusals.add_metric([reason], n)
        yield from (info, packets, octets, drops, refusals)
