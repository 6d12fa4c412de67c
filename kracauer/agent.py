"""``kracauer agent``: a host behind NAT dials the box and serves its names through the tunnel.

The host side of ../shared/design/agents.md (the box side is
kracauer/agents.py). The agent

1. opens one TLS 1.3 connection to ``[agent] box``, verifying the box's
   certificate against ``ca`` for ``server_name``;
2. sends HELLO with its token (the first line of ``token_file``) and its
   ``names`` (netstack/agentwire.py), and gets back REGISTERED with its
   address, the prefixes clients are embedded in, the MTU and the keepalive
   interval, or ERROR;
3. creates its TUN (``[agent] tun``) with that address and a route for each
   prefix through it, so the host's own kernel answers the client
   connections the box sends down (nginx on ``[::]:443``, say) and sees the
   client's embedded address;
4. relays: each PACKET from the box is written into the TUN, each packet the
   host's kernel routes into the TUN goes up as a PACKET.

Keepalives both ways; silence for three intervals ends the tunnel. A tunnel
that fails is dialled again with exponential backoff (1 s doubling to
``BACKOFF_MAX``, with jitter; reset after a tunnel that lasted). A refusal
the box marks final (a wrong token, a name the token may not register) is
logged with the box's reason and ends the agent with exit status 2: trying
again cannot help, and must not hammer the box. SIGTERM/SIGINT say BYE (the
box removes the names at once), remove the TUN and exit 0.

This is its own process, with its own asyncio loop: not the daemon.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import random
import signal
import ssl
import time

from kracauer.config import AgentConfig
from kracauer.tun import Tun, TunError, add_address, open_tun
from netstack import agentwire as wire

__all__ = ["AgentError", "AgentRefused", "Agent", "read_token", "run"]

log = logging.getLogger("kracauer.agent")

CONNECT_TIMEOUT = 15.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
# A tunnel that lasted this long resets the backoff.
STABLE_TUNNEL = 30.0
SEND_BUFFER_MAX = 4 << 20
READ_BATCH = 64
KEEPALIVE_MISSES = 3

EXIT_OK = 0
EXIT_REFUSED = 2


class AgentError(RuntimeError):
    """The agent cannot run as configured (the message says why); exit status 2."""


class AgentRefused(AgentError):
    """The box refused this agent for good (wrong token, a name not allowed)."""


class _Retry(Exception):
    """This tunnel failed; dial again after the backoff."""


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as exc:
        raise AgentError(f"[agent] token_file: cannot read {path}: {exc.strerror or exc}") from None
    if not token:
        raise AgentError(f"[agent] token_file: {path} is empty (`kracauer agent-token` makes a token)")
    return token


def ssl_context(config: AgentConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca)
    except (OSError, ssl.SSLError) as exc:
        raise AgentError(f"[agent] ca: cannot load {config.ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


class Agent:
    """One agent: dials, registers, relays; again after a failure, until stopped."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.token = read_token(config.token_file)
        self.ssl = ssl_context(config)
        self.stopping = False
        self._stop = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self.tun: Tun | None = None
        self.address: ipaddress.IPv6Address | None = None
        self.drops = 0

    def stop(self) -> None:
        """SIGTERM/SIGINT: say BYE on the open tunnel and end."""
        self.stopping = True
        self._stop.set()
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(wire.encode_control(wire.BYE, {"reason": "agent_stopping"}))
            writer.close()

    async def run(self) -> int:
        backoff = BACKOFF_FIRST
        box = f"{self.config.box_host}:{self.config.box_port}"
        while not self.stopping:
            started = time.monotonic()
            try:
                await self._tunnel()
                if self.stopping:
                    break
                log.warning("the tunnel to %s closed; dialling again", box)
            except AgentRefused as exc:
                log.error("the box %s refused this agent: %s; not trying again (fix the token or the names, "
                          "or the box's [[agents.token]], and start the agent again)", box, exc)
                return EXIT_REFUSED
            except TunError as exc:
                raise AgentError(str(exc)) from None
            except (_Retry, OSError, ssl.SSLError, asyncio.TimeoutError, wire.FrameError,
                    asyncio.IncompleteReadError) as exc:
                if self.stopping:
                    break
                log.warning("cannot keep a tunnel to %s: %s", box, exc or type(exc).__name__)
            if time.monotonic() - started >= STABLE_TUNNEL:
                backoff = BACKOFF_FIRST
            delay = backoff * random.uniform(0.5, 1.0)
            backoff = min(backoff * 2, BACKOFF_MAX)
            log.info("dialling %s again in %.1f s", box, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        log.info("stopped")
        return EXIT_OK

    # -- one tunnel ----------------------------------------------------------------

    async def _tunnel(self) -> None:
        config = self.config
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(config.box_host, config.box_port, ssl=self.ssl,
                                    server_hostname=config.server_name), CONNECT_TIMEOUT)
        self._writer = writer
        try:
            if self.stopping:
                return
            writer.write(wire.encode_control(wire.HELLO, {"version": wire.VERSION, "token": self.token,
                                                          "names": list(config.names)}))
            decoder = wire.FrameDecoder()
            registered = await asyncio.wait_for(self._registration(reader, decoder), CONNECT_TIMEOUT)
            # pyroute2's synchronous calls run an event loop of their own: not on this thread's.
            await asyncio.get_running_loop().run_in_executor(None, self._open_tun, registered)
            log.info("registered %s at %s with the box %s:%d; TUN %s routes %s", ", ".join(registered.names),
                     registered.address, config.box_host, config.box_port, config.tun, ", ".join(registered.prefixes))
            await self._relay(registered, reader, writer, decoder)
        finally:
            self._writer = None
            writer.close()
            await self._close_tun()

    async def _registration(self, reader: asyncio.StreamReader, decoder: wire.FrameDecoder) -> wire.Registered:
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                message = wire.decode_control(frame)
                if frame.type == wire.ERROR:
                    refusal = wire.parse_refusal(message)
                    if refusal.retry:
                        raise _Retry(f"the box refused for now: {refusal.message} ({refusal.reason})")
                    raise AgentRefused(f"{refusal.message} ({refusal.reason})")
                if frame.type == wire.BYE:
                    raise _Retry(f"the box said bye: {message.get('reason')}")
                if frame.type != wire.REGISTERED:
                    raise wire.FrameError(f"expected REGISTERED or ERROR, got frame type {frame.type:#x}")
                return wire.parse_registered(message)
            data = await reader.read(wire.CONTROL_MAX)
            if not data:
                raise _Retry("the box closed the connection before answering")
            decoder.receive_data(data)

    def _open_tun(self, registered: wire.Registered) -> None:
        address = ipaddress.IPv6Address(registered.address)
        prefixes = [ipaddress.IPv6Network(p) for p in registered.prefixes]
        tun = open_tun(self.config.tun, registered.mtu, [], prefixes, offload=False, persist=False)
        try:
            add_address(tun, address)
        except BaseException:
            tun.close(keep=False)
            raise
        self.tun = tun
        self.address = address
        self._prefix_keys = tuple((p.network_address.packed[:p.prefixlen // 8], p.prefixlen // 8) for p in prefixes)
        self._mtu = registered.mtu

    async def _close_tun(self) -> None:
        tun, self.tun = self.tun, None
        if tun is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(tun.fd)
            await loop.run_in_executor(None, tun.close, False)

    async def _relay(self, registered: wire.Registered, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, decoder: wire.FrameDecoder) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.tun.fd, self._on_tun, writer)
        keepalive = asyncio.ensure_future(self._keepalive(writer, registered.keepalive))
        fd = self.tun.fd
        own = self.address.packed
        silence = registered.keepalive * KEEPALIVE_MISSES
        try:
            while True:
                while True:
                    frame = decoder.next_frame()
                    if frame is None:
                        break
                    if frame.type == wire.PACKET:
                        self._packet_down(fd, own, frame.body)
                    elif frame.type in (wire.BYE, wire.ERROR):
                        message = wire.decode_control(frame)
                        if frame.type == wire.ERROR:
                            refusal = wire.parse_refusal(message)
                            if not refusal.retry:
                                raise AgentRefused(f"{refusal.message} ({refusal.reason})")
                            raise _Retry(f"{refusal.message} ({refusal.reason})")
                        raise _Retry(f"the box said bye ({message.get('reason')})")
                    elif frame.type != wire.KEEPALIVE:
                        raise wire.FrameError(f"unexpected frame type {frame.type:#x}")
                try:
                    data = await asyncio.wait_for(reader.read(1 << 18), silence)
                except asyncio.TimeoutError:
                    raise _Retry(f"nothing from the box for {silence:.0f} s") from None
                if not data:
                    if self.stopping:
                        return
                    raise _Retry("the box closed the tunnel")
                decoder.receive_data(data)
        finally:
            keepalive.cancel()

    def _packet_down(self, fd: int, own: bytes, packet: bytes) -> None:
        endpoints = wire.ipv6_endpoints(packet)
        # Only packets from a client prefix to this host's tunnel address: the box never sends others.
        if endpoints is None or endpoints[1] != own or len(packet) > self._mtu or \
                not any(endpoints[0][:n] == key for key, n in self._prefix_keys):
            self.drops += 1
            return
        try:
            os.write(fd, packet)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                raise
            self.drops += 1

    def _on_tun(self, writer: asyncio.StreamWriter) -> None:
        """Answers of the host's kernel, routed into the TUN: up the tunnel (only from our address to a client)."""
        tun = self.tun
        if tun is None:
            return
        own = self.address.packed
        frames = []
        for _ in range(READ_BATCH):
            try:
                packet = os.read(tun.fd, 65536)
            except BlockingIOError:
                break
            endpoints = wire.ipv6_endpoints(packet)
            if endpoints is None or endpoints[0] != own or \
                    not any(endpoints[1][:n] == key for key, n in self._prefix_keys):
                continue  # router solicitations, MLD and the like: not for the box
            frames.append(wire.encode_packet(packet))
        if not frames or writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > SEND_BUFFER_MAX:
            self.drops += len(frames)  # the tunnel is backed up: TCP retransmits
            return
        writer.write(b"".join(frames))

    async def _keepalive(self, writer: asyncio.StreamWriter, interval: float) -> None:
        frame = wire.encode_control(wire.KEEPALIVE, {})
        while not writer.is_closing():
            await asyncio.sleep(interval)
            if not writer.is_closing():
                writer.write(frame)


def run(config: AgentConfig) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT; the exit status."""
    async def main() -> int:
        agent = Agent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        return await agent.run()

    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.getLogger(noisy).getEffectiveLevel(), logging.INFO))
    try:
        return asyncio.run(main())
    except AgentError as exc:
        log.error("%s", exc)
        return EXIT_REFUSED
