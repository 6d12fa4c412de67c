"""The daemon: a thin loop around the tracker.

Read packets from the TUN, hand them to the tracker with the time, write back
what it returns, run its timers, log the connections that ended. Everything
about TCP lives in netstack.tracker; this module only does I/O.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import secrets
import select
import signal
import time
from typing import Callable

from kracauer.config import Config
from kracauer.routing import Router
from kracauer.privileges import PrivilegeError, drop_privileges
from kracauer.tun import Tun, TunError, check_forwarding, open_tun
from netstack.peek import Decision
from netstack.tracker import HEADROOM, ConnectionRecord, Listener, Resolver, Target, Tracker, TrackerConfig

log = logging.getLogger("kracauer")
conn_log = logging.getLogger("kracauer.conn")

# Packets read per wake-up before timers and signals get a look in.
READ_BATCH = 256
# The largest frame a TUN read returns: a 64 KiB super-packet and its vnet header.
FRAME_MAX = 65536 + 64
# Longest sleep when no timer is due, so signals and stats are never late for long.
MAX_SLEEP = 1.0
# One log line at most this often for packets that made the tracker raise.
ERROR_LOG_INTERVAL = 10.0


def tracker_listeners(config: Config) -> list[Listener]:
    return [
        Listener(lst.address.packed, lst.port, lst.protocol, lst.prefix.network_address.packed[:12] if lst.prefix else None)
        for lst in config.listeners
    ]


def build_resolver(config: Config) -> Resolver:
    """(listener, decision) → target over the config's routes; tcp listeners have fixed hosts."""
    tcp_targets = {
        (lst.address.packed, lst.port): Target(lst.hosts[0].packed, lst.port, "listener",
                                               tuple(h.packed for h in lst.hosts))
        for lst in config.listeners if lst.protocol == "tcp"
    }
    router = Router(config.routes, config.fallback)

    def resolve(listener: Listener, decision: Decision) -> Target | None:
        if listener.protocol == "tcp":
            return tcp_targets[(listener.address, listener.port)]
        target = router.lookup(decision.name, listener.port, decision.alpn)
        if target is None:
            return None
        return Target(target.host.packed, target.port, target.route, tuple(h.packed for h in target.hosts))

    return resolve


def tracker_config(config: Config) -> TrackerConfig:
    limits = config.limits
    return TrackerConfig(
        prefix=config.prefix.network_address.packed[:12],
        mtu=config.tun.mtu,
        hello_timeout=limits.hello_timeout,
        hello_max_bytes=limits.hello_max_bytes,
        connect_timeout=limits.connect_timeout,
        idle_timeout=limits.idle_timeout,
        vnet=config.tun.offload,
        max_connections=limits.max_connections,
        max_peeking=limits.max_peeking,
        syn_backlog=limits.syn_backlog,
        max_fails=config.health.max_fails,
        fail_timeout=config.health.fail_timeout,
    )


def build_tracker(config: Config, random32: Callable[[], int] | None = None) -> Tracker:
    """A tracker for `config`: its listeners, and a resolver over its routes."""
    return Tracker(tracker_config(config), tracker_listeners(config), build_resolver(config),
                   random32 or (lambda: secrets.randbits(32)))


def format_record(record: ConnectionRecord) -> str:
    """One log line per connection: client, name, host, bytes, duration, outcome."""
    host = f"[{record.host}]:{record.host_port}" if record.host else "-"
    name = record.name if record.name is not None else "-"
    return (
        f"client={record.client}:{record.client_port} listener={record.listener}/{record.protocol} "
        f"name={name} route={record.route or '-'} host={host} "
        f"bytes_in={record.bytes_to_host} bytes_out={record.bytes_to_client} "
        f"duration={record.duration:.3f}s outcome={record.outcome}"
    )


class Daemon:
    """Owns the TUN and the tracker, and runs the loop until a signal stops it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tracker = build_tracker(config)
        self.tun: Tun | None = None
        self.stopping = False
        self._errors = 0
        self._last_error_log = 0.0
        self._buf = bytearray(HEADROOM + FRAME_MAX)
        self._rx_view = memoryview(self._buf)[HEADROOM:]

    def run(self) -> int:
        # pyroute2 and asyncio chatter at debug level about every netlink message.
        for noisy in ("pyroute2", "asyncio"):
            logging.getLogger(noisy).setLevel(max(logging.getLogger(noisy).getEffectiveLevel(), logging.INFO))
        check_forwarding()
        addresses = sorted({lst.address for lst in self.config.listeners})
        self.tun = open_tun(
            self.config.tun.name,
            self.config.tun.mtu,
            [ipaddress.IPv4Network(a) for a in addresses],
            sorted({self.config.prefix} | {lst.prefix for lst in self.config.listeners if lst.prefix}),
            offload=self.config.tun.offload,
        )
        if self.config.tun.user:
            try:
                drop_privileges(self.config.tun.user)
            except PrivilegeError:
                self.tun.close()
                raise
            self.tun.privileged = False
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            log.info(
                "kracauer running on %s: %s; prefix %s",
                self.tun.name,
                ", ".join(f"{lst.address}:{lst.port}/{lst.protocol}" for lst in self.config.listeners),
                self.config.prefix,
            )
            self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            self.tun.close()
            self._log_records()
            log.info("stopped; %d connections were active; TUN %s and its routes removed",
                     len(self.tracker), self.config.tun.name)
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _loop(self, wake_fd: int) -> None:
        tun_fd = self.tun.fd
        tracker = self.tracker
        poller = select.epoll()
        poller.register(tun_fd, select.EPOLLIN)
        poller.register(wake_fd, select.EPOLLIN)
        try:
            while not self.stopping:
                deadline = tracker.next_timer()
                timeout = MAX_SLEEP
                if deadline is not None:
                    timeout = min(max(deadline - time.monotonic(), 0.0), MAX_SLEEP)
                for fd, _ in poller.poll(timeout):
                    if fd == tun_fd:
                        self._read_packets(tun_fd)
                    else:
                        self._drain(wake_fd)
                now = time.monotonic()
                self._write(tun_fd, tracker.on_timer(now))
                if tracker.records:
                    self._log_records()
        finally:
            poller.close()

    def _read_packets(self, fd: int) -> None:
        # One preallocated buffer: read after HEADROOM so the translated header
        # can grow in place, write memoryviews of it (DESIGN.md, Packet I/O).
        buf = self._buf
        rx = [self._rx_view]
        receive = self.tracker.receive_frame
        readv = os.readv
        write = os.write
        monotonic = time.monotonic
        for _ in range(READ_BATCH):
            try:
                n = readv(fd, rx)
            except BlockingIOError:
                return
            try:
                out = receive(buf, HEADROOM, HEADROOM + n, monotonic())
            except Exception:  # one bad packet must never stop the loop
                self._packet_error(bytes(buf[HEADROOM:HEADROOM + n]))
                continue
            for packet in out:
                try:
                    write(fd, packet)
                except OSError as exc:
                    self._write_error(exc)

    def _write(self, fd: int, packets: list) -> None:
        for packet in packets:
            try:
                os.write(fd, packet)
            except OSError as exc:
                self._write_error(exc)

    def _write_error(self, exc: OSError) -> None:
        self.tracker.drops["write_" + errno.errorcode.get(exc.errno, str(exc.errno)).lower()] += 1

    def _packet_error(self, packet: bytes) -> None:
        self._errors += 1
        self.tracker.drops["internal_error"] += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.exception("dropped a packet the tracker could not handle (%d so far); first bytes %s",
                          self._errors, packet[:64].hex())

    @staticmethod
    def _drain(fd: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass

    def _log_records(self) -> None:
        records = self.tracker.records
        self.tracker.records = []
        for record in records:
            conn_log.info("%s", format_record(record))


def run(config: Config) -> int:
    """Run kracauer with `config` in the foreground until SIGTERM or SIGINT; the exit status."""
    try:
        return Daemon(config).run()
    except (TunError, PrivilegeError) as exc:
        log.error("%s", exc)
        return 2
