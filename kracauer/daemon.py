"""The daemon: a thin loop around the tracker.

Read packets from the TUN, hand them to the tracker with the time, write back
what it returns, run its timers, log the connections that ended. Everything
about TCP lives in netstack.tracker; this module only does I/O.

Around the loop, for operations (docs/operations.md):

- each finished connection goes to the stderr log, the access log
  (kracauer.accesslog, written by a thread) and the metrics
  (kracauer.metrics); once a second the loop copies the tracker's counters
  for the metrics thread, and pings systemd's watchdog (kracauer.systemd);
- SIGHUP re-reads the configuration file: new routes and limits apply to new
  connections (Tracker.reconfigure); a configuration that is invalid, or that
  changes what only a restart can change, is refused and the old one stays;
- with ``[state] file``, SIGTERM/SIGINT write the tracker's state there
  (netstack.state, atomically) and leave the TUN (persistent) with its
  routes in place; the next start attaches to it and restores the state, so
  established connections carry on.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import logging.handlers
import os
import pwd
import queue
import array
import gc
import select
import signal
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

from kracauer import __version__
from kracauer.accesslog import AccessLog, NonBlockingQueueHandler
from kracauer.config import Config, ConfigError, Route, load_config
from kracauer.kernel_path import BpfFlowTable, KernelPath, KernelPathError, remove_pins
from netstack.flow import FLOW_KEY, FLOW_VALUE
from kracauer.metrics import Metrics
from kracauer.resolver import REFUSED_ERROR, NameResolver, hosts_for
from kracauer.routing import Resolve, Router
from kracauer.privileges import PrivilegeError, drop_privileges
from kracauer.services import Services
from kracauer.systemd import Notifier
from kracauer.tun import Tun, TunError, check_forwarding, open_tun, remove_tun
from netstack.connect import ConnectPolicy
from netstack.peek import Decision
from netstack.syncookie import BLAKE2S, SynCookies
from netstack.state import StateError, adopt, restore, snapshot
from netstack.state import decode as decode_state, encode as encode_state
from netstack.syncookie import SECRET_LEN
from netstack.tracker import (
    HEADROOM, OUR_WSCALE, SYN_WINDOW, ConnectionRecord, Listener, Pending, Refused, Resolver, Target, Tracker,
    TrackerConfig,
)

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
# How often the loop copies the tracker's counters for the metrics thread.
SYNC_INTERVAL = 1.0
# How often the STATUS= line systemd shows is refreshed.
STATUS_INTERVAL = 5.0
# Log lines waiting for the stderr writer thread; past this many they are dropped.
LOG_QUEUE_SIZE = 65536
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class DaemonError(RuntimeError):
    """kracauer cannot start (or stop) as configured; the message says why and what to do."""


def tracker_listeners(config: Config) -> list[Listener]:
    return [
        Listener(lst.address.packed, lst.port, lst.protocol, lst.prefix.network_address.packed[:12] if lst.prefix else None)
        for lst in config.listeners
    ]


# Shared Targets kept for resolve routes, whose host sets change with the answers: past this many, start afresh.
MAX_SHARED_TARGETS = 4096


def has_resolve_routes(config: Config) -> bool:
    return any(route.resolve for route in config.routes)


def agent_routes(agents: Mapping[str, Sequence[ipaddress.IPv6Address]] | None) -> list[Route]:
    """The routes for the names agents registered: name → their addresses (kracauer/agents.py)."""
    return [Route(name=name, host=hosts[0], hosts=tuple(hosts)) for name, hosts in sorted((agents or {}).items())
            if hosts]


def build_resolver(config: Config, names: NameResolver | None = None, *,
                   agents: Mapping[str, Sequence[ipaddress.IPv6Address]] | None = None) -> Resolver:
    """(listener, decision) → target over the config's routes and the agents' names; tcp listeners have fixed hosts.

    A resolve route's hosts come from `names` (kracauer.resolver): a cached
    answer gives the Target (or a Refused), no answer yet starts a lookup and
    gives Pending(name); the daemon calls Tracker.resume(name) when it is in.
    An agent's name (`agents`: name → the addresses of the agents that
    registered it) is a route to those addresses.
    """
    tcp_targets = {
        (lst.address.packed, lst.port): Target(lst.hosts[0].packed, lst.port, "listener",
                                               tuple(h.packed for h in lst.hosts))
        for lst in config.listeners if lst.protocol == "tcp"
    }
    router = Router(config.routes, config.fallback, agent_routes(agents))
    cache: dict[tuple, Target] = {}
    from kracauer.bridge import relay_addresses

    relays = relay_addresses(config.prefix)

    def resolve(listener: Listener, decision: Decision) -> Target | None:
        if listener.protocol == "tcp":
            return tcp_targets[(listener.address, listener.port)]
        # A CONNECT names its port: the host's unless the route gives one.
        port = decision.port if decision.port is not None else listener.port
        target = router.lookup(decision.name, port, decision.alpn)
        if target is None:
            return None
        if isinstance(target, Resolve):
            return resolved(target)
        if target.bridge is not None:
            # The local relay (kracauer.bridge), at the address of the listener's protocol, so that
            # it reads the connection's first bytes with the same peeker as the tracker.
            relay = relays[listener.protocol]
            return shared(target.route, target.port, (relay,), relay=True)
        return shared(target.route, target.port, target.hosts)

    def shared(route: str, port: int, hosts: tuple[ipaddress.IPv6Address, ...], relay: bool = False) -> Target:
        # One Target per (route, port, hosts), shared by all its connections: less memory per connection.
        key = (route, port, hosts)
        target = cache.get(key)
        if target is None:
            if len(cache) >= MAX_SHARED_TARGETS:
                cache.clear()
            target = cache[key] = Target(hosts[0].packed, port, route, tuple(h.packed for h in hosts), relay=relay)
        return target

    def resolved(wanted: Resolve) -> Target | Pending | Refused:
        if names is None:
            return Refused(REFUSED_ERROR)
        answer = names.cached(wanted.name)
        if answer is None:
            names.request(wanted.name)
            return Pending(wanted.name)
        hosts = hosts_for(answer, wanted.networks)
        if isinstance(hosts, str):
            return Refused(hosts)
        return shared(wanted.route, wanted.port, hosts)

    return resolve


def tracker_config(config: Config, workers: int = 1) -> TrackerConfig:
    """The tracker's settings; with several workers, each gets its share of the box-wide peeking and
    half-open limits (max_connections is checked against every worker's count: Tracker.elsewhere)."""
    limits = config.limits

    def share(limit: int) -> int:
        return max(1, -(-limit // workers))

    return TrackerConfig(
        prefix=config.prefix.network_address.packed[:12],
        mtu=config.tun.mtu,
        hello_timeout=limits.hello_timeout,
        hello_max_bytes=limits.hello_max_bytes,
        connect_timeout=limits.connect_timeout,
        host_try_timeout=limits.host_try_timeout,
        idle_timeout=limits.idle_timeout,
        vnet=config.tun.offload,
        max_connections=limits.max_connections,
        max_peeking=share(limits.max_peeking),
        syn_backlog=share(limits.syn_backlog),
        max_fails=config.health.max_fails,
        fail_timeout=config.health.fail_timeout,
        udp_idle_timeout=limits.udp_idle_timeout,
        udp_max_peeking=share(limits.udp_max_peeking),
        udp_peek_max_bytes=limits.udp_peek_max_bytes,
        udp_peek_max_datagrams=limits.udp_peek_max_datagrams,
        connect_policies={(lst.address.packed, lst.port): ConnectPolicy.of(lst.allow, lst.ports)
                          for lst in config.listeners if lst.protocol == "connect"},
    )


def build_tracker(config: Config, random32: Callable[[], int] | None = None,
                  cookie_secret: bytes | None = None, names: NameResolver | None = None) -> Tracker:
    """A tracker for `config`: its listeners, and a resolver over its routes."""
    return Tracker(tracker_config(config), tracker_listeners(config), build_resolver(config, names),
                   random32 or RandomPool(), cookie_secret=cookie_secret)


def new_cookie_secret() -> bytes:
    """The SYN cookie secret, made once per daemon: the tracker (every worker's) and the
    BPF program that answers SYNs must make and accept the same cookies."""
    return os.urandom(SECRET_LEN)


def set_syn_cookies(kernel: KernelPath, config: Config, secret: bytes) -> None:
    """Let the BPF program answer `config`'s listeners' SYNs with the tracker's cookies."""
    listeners = {(lst.address, lst.port): config.kernel_path.python_syn_rate for lst in tracker_listeners(config)
                 if lst.protocol != "quic"}
    kernel.set_syn_cookies(secret, mss=min(tracker_config(config).mss, 65535), window=SYN_WINDOW,
                           wscale=OUR_WSCALE, listeners=listeners)


class RandomPool:
    """32-bit random numbers from the kernel's CSPRNG, fetched a batch at a time.

    ISNs and timestamp bases must be unpredictable (RFC 6528); one getrandom()
    per 1024 values instead of one per value keeps that off the per-connection cost.
    """

    def __init__(self, batch: int = 1024) -> None:
        self._batch = batch
        self._values: list[int] = []

    def __call__(self) -> int:
        if not self._values:
            self._values = list(array.array("I", os.urandom(4 * self._batch)))
        return self._values.pop()


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


def restart_needed(old: Config, new: Config) -> list[str]:
    """What differs between `old` and `new` that a reload cannot change (empty: `new` can be applied)."""
    problems = []
    if old.tun != new.tun:
        problems.append("[tun]")
    if old.prefix != new.prefix:
        problems.append("[translate] prefix")
    if set(tracker_listeners(old)) != set(tracker_listeners(new)):
        problems.append("[[listen]] addresses, ports, protocols or prefixes")
    if old.metrics != new.metrics:
        problems.append("[metrics] listen")
    if (old.state is None) != (new.state is None):
        problems.append("[state] (added or removed)")
    from kracauer.bridge import bridge_changes

    problems += bridge_changes(old, new)
    if (old.agents is None) != (new.agents is None):
        problems.append("[agents] (added or removed)")
    elif old.agents is not None and new.agents is not None and \
            (old.agents.listen, old.agents.tun, old.agents.network, old.agents.cert, old.agents.key) != \
            (new.agents.listen, new.agents.tun, new.agents.network, new.agents.cert, new.agents.key):
        problems.append("[agents] listen, tun, network, cert or key")
    return problems


def take_back(tracker: Tracker, leftover: BpfFlowTable | None,
              mine: Callable[[bytes], bool] | None = None, who: str = "") -> int:
    """Translate here, in Python, what an earlier process left to the kernel; return how many.

    For a process that runs without a kernel path: the connections restored
    from the state file as carried by the kernel, and after a crash (no state
    file) those the map ``leftover`` alone holds, adopted first (only the
    keys ``mine`` accepts: a worker's share). Without a map left, parked TCP
    connections cannot be rebuilt (their sequence offsets were the map's)
    and are counted lost; quic flows need nothing from the map but what it
    counted, so none is lost. The daemon and each worker call this, so that
    no parked connection is left for a loop with no map to look it up in.
    """
    now = time.monotonic()
    if leftover is not None:
        entries = leftover.items() if mine is None else ((k, f) for k, f in leftover.items() if mine(k))
        adopted, _ = adopt(tracker, entries, now)
        if adopted:
            log.info("%sadopted %s the kernel carried while kracauer was down", who, _connections(adopted))
    parked = tracker.in_kernel
    taken = tracker.unpark_all(now, leftover)
    if parked > taken:
        log.warning("%s%s restored as carried by the kernel could not be taken back (their map is gone)",
                    who, _connections(parked - taken))
    if tracker.udp is not None:
        taken += tracker.udp.take_back_all(leftover)
    if taken:
        log.info("%stook %s back from the kernel path", who, _connections(taken))
    return taken


def _connections(n: int) -> str:
    return f"{n} connection" if n == 1 else f"{n} connections"


# -- the state file -----------------------------------------------------------

def write_state(path: str, data: dict[str, Any]) -> None:
    """Write `data` (netstack.state.encode) to `path` atomically: a temporary file in the same directory, fsync, rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".kracauer-state-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_state(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # The rename itself must reach the disk too.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state(path: str) -> dict[str, Any] | None:
    """The saved state at `path` (netstack.state.decode), or None if there is none; StateError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc}") from exc
    try:
        return decode_state(data)
    except StateError as exc:
        raise StateError(f"cannot read {path}: {exc}") from None


def _set_aside(path: str, suffix: str) -> str | None:
    """Rename `path` to `path + suffix` (kept for a look, never restored); the new name, or None."""
    try:
        os.replace(path, path + suffix)
        return path + suffix
    except OSError as exc:
        log.warning("could not rename %s: %s", path, exc)
        try:
            os.unlink(path)
        except OSError:
            pass
        return None


def saved_shards(path: str) -> list[str]:
    """The state files a previous kracauer left: its single file, and its workers' shards (``<path>.<index>``)."""
    found = [path] if os.path.exists(path) else []
    prefix = os.path.basename(path) + "."
    try:
        names = os.listdir(os.path.dirname(path) or ".")
    except OSError:
        return found
    shards = [name for name in names if name.startswith(prefix) and name[len(prefix):].isdigit()]
    return found + [os.path.join(os.path.dirname(path), name)
                    for name in sorted(shards, key=lambda name: int(name[len(prefix):]))]


def check_state_directory(path: str, user: str | None) -> None:
    """DaemonError unless the state file's directory exists and is writable by whoever writes it at exit.

    With `[tun] user`, that is the unprivileged user, so the check is made
    with that user's ids (effective ids only, switched back at once).
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise DaemonError(f"[state] file: the directory {directory} does not exist; create it "
                          f"(with systemd, StateDirectory=kracauer creates /var/lib/kracauer)")
    who = "kracauer"
    switched = False
    if user and os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise PrivilegeError(f"[tun] user: no such user {user!r}") from None
        who = f"user {user} (uid {entry.pw_uid})"
        os.setgroups([])  # as after the drop; drop_privileges clears them anyway
        os.setegid(entry.pw_gid)
        os.seteuid(entry.pw_uid)
        switched = True
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kracauer-write-test-", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        hint = ""
        if switched:
            hint = (f"; kracauer writes the state when it stops, after dropping to [tun] user, so that user "
                    f"must be able to create files there: chown {user} {directory} (with systemd, see "
                    f"docs/operations.md)")
        raise DaemonError(f"[state] file: {who} cannot create files in {directory}: {exc.strerror or exc}"
                          f"{hint}") from None
    finally:
        if switched:
            os.seteuid(0)
            os.setegid(0)


# -- the daemon -----------------------------------------------------------------

class Daemon:
    """Owns the TUN and the tracker, and runs the loop until a signal stops it.

    ``keep_tun=False`` is a stop for good even with ``[state]``: no state is
    saved and the TUN is removed at exit.
    """

    def __init__(self, config: Config, *, keep_tun: bool = True, notifier: Notifier | None = None) -> None:
        self.config = config
        self.cookie_secret = new_cookie_secret()
        # Route by DNS (kracauer.resolver): made with the first resolve route, its thread on first lookup.
        self.names: NameResolver | None = None
        self._names_for(config)
        self.tracker = build_tracker(config, cookie_secret=self.cookie_secret, names=self.names)
        self.tun: Tun | None = None
        self.kernel: KernelPath | None = None
        # With no kernel path this time: the map an earlier kracauer pinned, and where.
        self._leftover_flows: BpfFlowTable | None = None
        self._leftover_pins: str | None = None
        self.stopping = False
        self.reload_requested = False
        self.keep_tun = keep_tun
        # Decided at start: a reload cannot add or remove [state].
        self.persist = config.state is not None and keep_tun
        self.notifier = notifier if notifier is not None else Notifier()
        self.metrics: Metrics | None = Metrics(self.tracker) if config.metrics is not None else None
        if self.metrics is not None:
            self.metrics.dns_cache_entries.set_function(lambda: len(self.names) if self.names is not None else 0)
        self.access_log: AccessLog | None = None
        self.restored = 0
        self._restored_from: list[str] = []
        self._errors = 0
        self._last_error_log = 0.0
        self._buf = bytearray(HEADROOM + FRAME_MAX)
        self._rx_view = memoryview(self._buf)[HEADROOM:]
        self._next_sync = 0.0
        self._next_status = 0.0
        self._next_watchdog: float | None = None
        # Descriptors the loop also waits on, and what to call when one is readable (a worker's channel).
        self._extra_fds: dict[int, Callable[[], None]] = {}
        # The asyncio thread for socket work (kracauer.services), started by the first part that needs it.
        self.services: Services | None = None
        # The running loop's poller: a services thread started later (a reload) registers its pipe in it.
        self._loop_poller: select.epoll | None = None
        # The TLS bridge's two ends (kracauer.bridge), with the routes and addresses it added.
        self.bridge: Any = None
        self._bridge_routes: list[ipaddress.IPv6Network] = []
        self._bridge_addresses: list[ipaddress.IPv6Address] = []
        # [agents]: the hub (on the services thread) and the names agents registered, as the resolver uses them.
        self.hub = None
        self.agent_table: dict[str, tuple[ipaddress.IPv6Address, ...]] = {}

    # -- start and stop ------------------------------------------------------

    def run(self) -> int:
        # Log records need no process or thread details (a getpid() per record otherwise).
        logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
        # pyroute2 and asyncio chatter at debug level about every netlink message.
        for noisy in ("pyroute2", "asyncio"):
            logging.getLogger(noisy).setLevel(max(logging.getLogger(noisy).getEffectiveLevel(), logging.INFO))
        self._preflight()
        # Signals are taken from here on: one that arrives during set-up (which
        # loads a BPF program and may take a moment) stops the loop before it starts.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        old_wakeup = signal.set_wakeup_fd(wake_w)

        def restore_signals() -> None:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)

        try:
            self._start_outputs()
            self._set_up()
        except BaseException:
            self._stop_agents()
            self._stop_services()
            self._abort_set_up()
            self._stop_outputs()
            restore_signals()
            raise
        try:
            self._announce()
            if self.metrics is not None:
                self.metrics.sync(self.tracker, time.monotonic(), kernel=self._kernel_stats())
            self._ready()
            if self.notifier.watchdog_interval is not None:
                self._next_watchdog = 0.0
            # Everything made at start-up lives as long as the process: keep the
            # cyclic garbage collector from walking it again and again.
            gc.freeze()
            self._loop(wake_r)
        finally:
            restore_signals()
            self._shutdown()
        return 0

    def _tracker_config(self, config: Config) -> TrackerConfig:
        return tracker_config(config)

    def _use_services(self) -> Services:
        """The services thread, started on first use (during set-up: the loop waits on its
        wake-up pipe from its first round on, so it must exist before the loop starts)."""
        if self.services is None:
            self.services = Services()
            self.services.start()
            self._extra_fds[self.services.wake_fd] = self.services.run_posted
            if self._loop_poller is not None:
                self._loop_poller.register(self.services.wake_fd, select.EPOLLIN)
        return self.services

    # -- route by DNS ------------------------------------------------------------------

    def _names_for(self, config: Config) -> NameResolver | None:
        """The resolver for `config`'s resolve routes: the running one, or a new one when
        ``[resolver]`` changed (its cache starts empty; lookups in flight still re-drive their
        connections, which then ask the new one)."""
        if not has_resolve_routes(config):
            return self.names
        if self.names is None or self.names.settings != config.resolver:
            self.names = NameResolver(config.resolver, self._use_services, self._names_answered,
                                      count=self._count_lookup, hit=self._count_cache_hit)
        return self.names

    def _names_answered(self, name: str) -> None:
        """On the packet loop: a lookup is done; the connections waiting for it go on."""
        if self.tun is None or self.tun.fd < 0:
            return
        self._write(self.tun.fd, self.tracker.resume(name, time.monotonic()))

    def _count_lookup(self, outcome: str) -> None:
        if self.metrics is not None and hasattr(self.metrics, "dns_lookups"):
            self.metrics.dns_lookups.labels(outcome).inc()

    def _count_cache_hit(self) -> None:
        if self.metrics is not None and hasattr(self.metrics, "dns_cache_hits"):
            self.metrics.dns_cache_hits.inc()

    # -- agents (kracauer/agents.py) -----------------------------------------------

    def _start_agents(self) -> None:
        """[agents]: the hub's TUN, listener and TLS context (as root), then its server on the services thread."""
        config = self.config
        if config.agents is None:
            return
        from kracauer.agents import AgentHub, AgentsCollector

        prefixes = sorted({config.prefix} | {lst.prefix for lst in config.listeners if lst.prefix})
        services = self._use_services()

        def on_change(routes: dict, gone: list) -> None:  # on the services thread
            services.post(self._agents_changed, routes, gone)

        hub = AgentHub(config.agents, prefixes, config.tun.mtu, on_change, shadowed=self._configured_name)
        try:
            hub.open()
        except OSError as exc:
            raise DaemonError(str(exc.strerror or exc)) from None
        self.hub = hub
        services.run(hub.start(), timeout=10)
        if self.metrics is not None:
            self._metrics_registry().register(AgentsCollector(hub))

    def _metrics_registry(self) -> Any:
        return self.metrics.registry

    def _configured_name(self, name: str) -> bool:
        """Whether a configured [[route]] (without alpn) has exactly this name: it wins over an agent's."""
        from kracauer.routing import normalize_name

        return any(r.alpn is None and normalize_name(r.name) == name for r in self.config.routes)

    def _agents_changed(self, routes: dict[str, tuple[ipaddress.IPv6Address, ...]],
                        gone: list[ipaddress.IPv6Address]) -> None:
        """On the packet loop: the agents' names changed; connections through an agent that went are reset."""
        self.agent_table = routes
        self.tracker.reconfigure(self._tracker_config(self.config),
                                 build_resolver(self.config, self.names, agents=routes))
        if self.tun is None or self.tun.fd < 0:  # posted while stopping: nothing to reset any more
            return
        now = time.monotonic()
        for address in gone:
            out = self.tracker.reset_host(address.packed, now)
            if out:
                log.info("reset %s through the agent at %s, which is gone", _connections(len(out)), address)
            self._write(self.tun.fd, out)

    def _forget_agents_connections(self) -> None:
        """At a start: reset the connections restored ([state], the kernel's pinned flows) through the
        previous process's agents. Their tunnels closed with it; the agents dial this process and get
        addresses afresh, and an address is not to reach another agent's host with an old connection."""
        agents = self.config.agents
        if agents is None or self.tun is None or self.tun.fd < 0:
            return
        network = agents.network
        hosts = set()
        for conn in list(self.tracker.clients.values()):
            host = conn[2] if conn.__class__ is tuple else conn.host
            if host is not None and ipaddress.IPv6Address(bytes(host)) in network:
                hosts.add(bytes(host))
        now = time.monotonic()
        out: list = []
        for host in sorted(hosts):
            out += self.tracker.reset_host(host, now)
        if out:
            log.info("reset %s restored through agents of the previous process", _connections(len(out)))
            self._write(self.tun.fd, out)

    def _stop_agents(self) -> None:
        """Agents are told the box stops (BYE), then the hub's TUN goes."""
        hub, self.hub = self.hub, None
        if hub is None:
            return
        if self.services is not None and self.services.running:
            try:
                self.services.run(hub.stop(), timeout=5)
            except Exception as exc:  # stopping anyway
                log.warning("agents: stopping the hub: %s", exc)
        hub.close()

    def _stop_services(self) -> None:
        if self.services is not None:
            self._extra_fds.pop(self.services.wake_fd, None)
            self.services.stop()
            self.services = None

    def _preflight(self) -> None:
        """Checks before anything is made: forwarding on, the state directory writable."""
        check_forwarding()
        if self.config.state is not None:
            check_state_directory(self.config.state.file, self.config.tun.user)

    def _set_up(self) -> None:
        """The TUN, the kernel path, the previous process's connections; then root is dropped."""
        config = self.config
        # The state file, or the shards a kracauer with several workers left: one worker takes them all.
        paths = saved_shards(config.state.file) if config.state is not None and self.persist else []
        saved = [(path, self._read_saved_state(path)) for path in paths]
        addresses = sorted({lst.address for lst in config.listeners})
        self.tun = open_tun(
            config.tun.name,
            config.tun.mtu,
            [ipaddress.IPv4Network(a) for a in addresses],
            sorted({config.prefix} | {lst.prefix for lst in config.listeners if lst.prefix}),
            offload=config.tun.offload,
            persist=self.persist,
        )
        self.kernel = self._start_kernel_path()
        if self.kernel is None:
            # No program makes cookies: Python's may use the faster hash (netstack/syncookie.py).
            self.tracker.cookies = SynCookies(self.cookie_secret, BLAKE2S)
        for path, data in saved:
            self._restore(data, path, keep=(lambda addr, port: True) if len(saved) > 1 else None)
        if self.kernel is None:
            self._take_back()
        self._adopt_kernel_flows()
        self._forget_agents_connections()
        self._start_bridge()
        self._start_agents()
        if config.tun.user:
            drop_privileges(config.tun.user)
            self.tun.privileged = False
            if self.hub is not None:
                self.hub.tun.privileged = False
        for path in self._restored_from:
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("could not remove the state file %s after restoring it: %s", path, exc)

    def _start_bridge(self) -> None:
        """The TLS bridge (kracauer.bridge), if configured: its plumbing, then its service."""
        self._add_bridge_plumbing()
        self._start_bridge_service()

    def _add_bridge_plumbing(self) -> None:
        """As root: the peer prefixes' `local` routes and the relay's addresses on the TUN.

        A supervisor adds them (it stays root and removes them at the end);
        its first worker runs the service (kracauer.worker).
        """
        config = self.config
        if not config.bridges and not config.bridge_listeners:
            return
        from kracauer.bridge import relay_addresses
        from kracauer.tun import add_local_routes, add_tun_addresses

        try:
            self._bridge_routes = add_local_routes(sorted({lst.prefix for lst in config.bridge_listeners}))
            if config.bridges:
                self._bridge_addresses = add_tun_addresses(self.tun.name, list(relay_addresses(config.prefix).values()))
        except (OSError, TunError) as exc:
            self._remove_bridge_plumbing()
            raise DaemonError(f"the bridge cannot start: {exc}") from None

    def _start_bridge_service(self) -> None:
        """The bridge's two ends on the services loop, made before privileges are dropped: the
        listening sockets bound (ports below 1024 included), the certificate and key files read."""
        config = self.config
        if not config.bridges and not config.bridge_listeners:
            return
        import ssl

        from kracauer.bridge import BridgeCollector, BridgeService

        try:
            service = BridgeService(config, self._bridge_log_line, self.tun.name, names=self._names_for(config))
        except (OSError, ssl.SSLError) as exc:
            self._remove_bridge_plumbing()
            raise DaemonError(f"the bridge cannot start: {exc}") from None
        self._use_services().run(service.start(), timeout=10)
        self.bridge = service
        if self.metrics is not None:
            registry = getattr(self.metrics, "own", None) or self.metrics.registry
            registry.register(BridgeCollector(service.tunnels))
        log.info("bridge: %d peer listener(s) %s; ingress relay %s", len(service.peers),
                 ", ".join(p.name for p in service.peers) or "-",
                 "on " + ", ".join(f"[{s.getsockname()[0]}]:{s.getsockname()[1]}" for _, s in service.relay.sockets)
                 if service.relay is not None else "off")

    def _bridge_log_line(self, line: str) -> None:
        """An access-log record of a tunnel, from the services thread."""
        if self.services is not None:
            self.services.post(self._write_log_line, line)

    def _write_log_line(self, line: str) -> None:
        access_log = self.access_log  # read at each call: a reload may open another
        if access_log is not None:
            access_log.write_line(line)

    def _stop_bridge(self) -> None:
        """Close the bridge's listeners, end its tunnels (the services loop cancels them), undo its plumbing."""
        if self.bridge is not None and self.services is not None:
            try:
                self.services.run(self.bridge.stop(), timeout=5)
            except Exception as exc:
                log.warning("the bridge did not stop cleanly: %s", exc)
        self._stop_services()
        if self.bridge is not None:
            for sock in self.bridge.sockets():
                sock.close()
            self.bridge = None
        self._remove_bridge_plumbing()

    def _remove_bridge_plumbing(self) -> None:
        from kracauer.tun import remove_local_routes, remove_tun_addresses

        try:
            if self._bridge_routes:
                remove_local_routes(self._bridge_routes)
            if self._bridge_addresses and self.tun is not None:
                remove_tun_addresses(self.tun.name, self._bridge_addresses)
        except Exception as exc:  # without privileges (dropped) they stay: say so
            log.warning("could not remove the bridge's routes or addresses: %s", exc)
        self._bridge_routes, self._bridge_addresses = [], []

    def _abort_set_up(self) -> None:
        """A start that failed half way: undo what it made, keep what it found."""
        self._stop_bridge()
        if self.kernel is not None:
            self.kernel.close(keep=self.tun is not None and self.tun.attached and self.persist)
            self.kernel = None
        if self.tun is not None and self.tun.fd >= 0:
            # A device this process made goes; one it found (with connections) stays.
            self.tun.close(keep=self.tun.attached and self.persist)

    def _announce(self) -> None:
        config = self.config
        log.info(
            "kracauer %s running on %s: %s; prefix %s",
            __version__,
            self.tun.name,
            ", ".join(f"{lst.address}:{lst.port}/{lst.protocol}" for lst in config.listeners),
            config.prefix,
        )

    def _ready(self) -> None:
        self.notifier.ready(self._status_text())

    # -- the kernel data path ----------------------------------------------------

    def _pin_dir(self) -> str:
        return os.path.join(self.config.kernel_path.pin_dir, self.config.tun.name)

    def _start_kernel_path(self) -> KernelPath | None:
        """Load and attach the BPF program (``[kernel_path]``), or say once why the Python path does it all."""
        settings = self.config.kernel_path
        pin_dir = self._pin_dir()
        if settings.enabled is False:
            self._keep_leftover_flows(pin_dir)
            return None
        max_flows = settings.max_flows or 2 * self.config.limits.max_connections
        if not self.persist:
            # Without [state] the TUN, and every connection with it, goes with the process:
            # pins would only outlive what they describe (and could not be removed once root is dropped).
            if remove_pins(pin_dir):
                log.info("removed the kernel path's maps left in %s by a kracauer with [state]", pin_dir)
            pin_dir = None
        try:
            kernel = KernelPath.load(redirect_ifindex=self.tun.index, pin_dir=pin_dir, max_flows=max_flows)
            try:
                if not self.tun.attached:
                    # A new TUN: whatever the pinned map holds belongs to connections that are gone.
                    kernel.flows.clear()
                # Before the program is attached: from its first packet it answers SYNs.
                set_syn_cookies(kernel, self.config, self.cookie_secret)
                kernel.attach(self.tun.index)
            except BaseException:
                # A map a previous process left (on a TUN it left) still holds its connections.
                kernel.close(keep=self.tun.attached)
                raise
        except (KernelPathError, OSError) as exc:
            if settings.enabled is True:
                raise DaemonError(f"[kernel_path] enabled = true, but the kernel path cannot be used: {exc}") from None
            log.warning("kernel path unavailable, established connections are translated in Python: %s", exc)
            self._keep_leftover_flows(pin_dir)
            return None
        self.tracker.flows = kernel.flows
        log.info("kernel path on: a BPF program on %s's egress translates established connections "
                 "and answers SYNs with cookies (%d flow entries%s)", self.tun.name, max_flows, f", maps pinned in {pin_dir}" if pin_dir else "")
        return kernel

    def _keep_leftover_flows(self, pin_dir: str | None) -> None:
        """No kernel path this time: stop an earlier kracauer's program, keep its flow map for _take_back."""
        self._leftover_pins = pin_dir or self._pin_dir()
        if not self.tun.attached:
            return
        try:
            from kracauer.bpf import tc
            from kracauer.bpf.libbpf import Map

            # Nothing may translate behind this process's back.
            if tc.detach(self.tun.index, "egress"):
                log.info("removed the BPF program an earlier kracauer left on %s", self.tun.name)
            path = os.path.join(self._leftover_pins, "flows")
            if os.path.exists(path):
                leftover = Map.from_pin(path)
                if (leftover.key_size, leftover.value_size) == (FLOW_KEY.size, FLOW_VALUE.size):
                    self._leftover_flows = BpfFlowTable(leftover)
                else:
                    log.warning("the flow map left in %s has another layout (another kracauer version): "
                                "its connections cannot be taken back", path)
                    leftover.close()
        except (ImportError, OSError) as exc:
            log.debug("no BPF program or map left on %s: %s", self.tun.name, exc)

    def _take_back(self) -> None:
        """Connections the previous process left in the kernel are translated here now (``take_back``)."""
        take_back(self.tracker, self._leftover_flows)
        if self._leftover_flows is not None:
            self._leftover_flows.map.close()
            self._leftover_flows = None
        if self._leftover_pins is not None and remove_pins(self._leftover_pins):
            log.info("removed the kernel path's maps left in %s", self._leftover_pins)

    def _adopt_kernel_flows(self) -> None:
        """Connections the kernel carried while no kracauer ran (a crash): take them on."""
        if self.kernel is None or not self.tun.attached:
            return
        now = time.monotonic()
        adopted, stale = adopt(self.tracker, self.kernel.flows.items(), now)
        for key in stale:
            self.kernel.flows.map.delete(key)
        if adopted or stale:
            log.info("adopted %s the kernel carried while kracauer was down%s", _connections(adopted),
                     f"; removed {len(stale)} flow entries with no connection" if stale else "")
        if adopted and self.metrics is not None:
            self.metrics.skip_existing(now)

    def _start_outputs(self) -> None:
        """The metrics endpoint and the access log, opened while still privileged."""
        config = self.config
        if self.metrics is not None and config.metrics is not None:
            try:
                self.metrics.serve(str(config.metrics.address), config.metrics.port)
            except OSError as exc:
                raise DaemonError(f"[metrics] listen: cannot serve metrics on {config.metrics}: "
                                  f"{exc.strerror or exc}") from None
            log.info("metrics on http://%s/metrics", config.metrics)
        if config.log.access is not None:
            self.access_log = self._open_access_log(config.log.access)

    @staticmethod
    def _open_access_log(target: str) -> AccessLog:
        try:
            return AccessLog(target)
        except OSError as exc:
            raise DaemonError(f"[log] access: cannot open {target}: {exc.strerror or exc}") from None

    def _stop_outputs(self) -> None:
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None
        if self.metrics is not None:
            self.metrics.close()
        self.notifier.close()

    def _state_path(self) -> str:
        return self.config.state.file

    def _read_saved_state(self, path: str | None = None) -> dict[str, Any] | None:
        """One state file's content (None: there is none, or it is unreadable and set aside)."""
        if self.config.state is None:
            return None
        path = path or self._state_path()
        try:
            return read_state(path)
        except StateError as exc:
            aside = _set_aside(path, ".bad")
            log.warning("%s; starting with no connections%s", exc, f" (moved to {aside})" if aside else "")
            return None

    def _restore(self, saved: dict[str, Any] | None, path: str | None = None,
                 keep: Callable[[bytes, int], bool] | None = None) -> None:
        """Put the previous process's connections back (those `keep` accepts), if it left them and the TUN."""
        if saved is None or self.config.state is None:
            return
        path = path or self._state_path()
        if not self.tun.attached:
            # No TUN was left in place (a reboot, or `kracauer cleanup`): those connections are gone.
            aside = _set_aside(path, ".stale")
            log.warning("state file %s not restored: the TUN %s was not left in place by the previous process%s",
                        path, self.tun.name, f" (moved to {aside})" if aside else "")
            return
        now = time.monotonic()
        saved_at = saved.get("saved_at")
        gap = 0.0
        if isinstance(saved_at, (int, float)):
            gap = min(max(time.time() - saved_at, 0.0), 86400.0)
        skipped_before = self.tracker.events.get("state_skipped", 0)
        try:
            # The time between the save and now passed for every connection: their ages grow by it.
            restored = restore(self.tracker, saved, now - gap, keep)
        except StateError as exc:
            aside = _set_aside(path, ".bad")
            log.warning("state file %s not restored: %s%s", path, exc, f" (moved to {aside})" if aside else "")
            return
        self.restored += restored
        # Removed once kracauer is up (see run()), so that a failed start leaves it for the next try.
        self._restored_from.append(path)
        skipped = self.tracker.events.get("state_skipped", 0) - skipped_before
        log.info("restored %s from %s (saved %.1f s ago)%s", _connections(restored), path, gap,
                 f"; {skipped} skipped (their listener is gone)" if skipped else "")
        if self.metrics is not None:
            self.metrics.restored.set(self.restored)
            self.metrics.skip_existing(now)

    def _shutdown(self) -> None:
        """After the loop: log what ended, save the state (or not), keep or remove the TUN."""
        self.notifier.stopping("saving state" if self.persist else "stopping")
        self._stop_agents()
        self._stop_bridge()
        self._log_records()
        saved = None
        if self.persist and self.config.state is not None:
            saved = self._save_state(self._state_path())
        keep = self.persist and saved is not None
        try:
            self._release(keep)
        finally:
            self._stop_outputs()
        self._report_stop(keep, saved)

    def _release(self, keep: bool) -> None:
        if self.kernel is not None:
            # Kept: the program stays on the persistent TUN and goes on translating until the next start.
            self.kernel.close(keep=keep)
            self.kernel = None
        self.tun.close(keep=keep)

    def _report_stop(self, keep: bool, saved: int | None) -> None:
        name = self.config.tun.name
        if keep:
            log.info("stopped; saved %s to %s; TUN %s and its routes left in place for the next start "
                     "(`kracauer cleanup` removes them)", _connections(saved), self._state_path(), name)
        else:
            # Connections that already closed but linger for late retransmissions are not "active".
            active = sum(1 for conn in self.tracker.clients.values() if conn.__class__ is tuple or not conn.closing)
            log.info("stopped; %d connections were active; TUN %s and its routes removed", active, name)

    def _save_state(self, path: str) -> int | None:
        """Write the tracker's state; the number of connections saved, or None if it failed."""
        now = time.monotonic()
        data = snapshot(self.tracker, now)
        data["saved_at"] = time.time()
        data["kracauer"] = __version__
        try:
            write_state(path, data)
        except OSError as exc:
            log.error("could not save the state to %s: %s; the TUN is removed and the %d connections are lost",
                      path, exc, len(self.tracker))
            return None
        # parked: carried by the kernel, their numbers in its map; udp_flows: quic listeners' bound flows
        return data["count"] + data["parked_count"] + len(data.get("udp_flows", ()))

    # -- signals -------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stopping = True

    def reload(self) -> bool:
        """Re-read the configuration file and apply it to new connections; False if it was refused."""
        self.reload_requested = False
        self.notifier.reloading()
        source = self.config.source
        try:
            ok = self._apply(load_config(source))
        except (ConfigError, DaemonError) as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            ok = False
        if self.metrics is not None:
            self.metrics.reloads.labels("ok" if ok else "failed").inc()
            self.metrics.reload_ok.set(1 if ok else 0)
        self.notifier.ready(self._status_text() + ("" if ok else "; last reload refused, see the log"))
        return ok

    def _needs_restart(self, new: Config) -> bool:
        """True (and logged) if `new` changes what only a restart can change."""
        problems = restart_needed(self.config, new)
        if problems:
            log.error("reload refused, the running configuration stays: %s changed in %s, which needs a restart",
                      ", ".join(problems), new.source)
        return bool(problems)

    def _apply(self, new: Config) -> bool:
        if self._needs_restart(new):
            return False
        if new.state is not None and new.state != self.config.state:
            # Written at stop by this process, as whatever user it runs as now.
            check_state_directory(new.state.file, None)
        access_log = self.access_log
        if new.log.access != self.config.log.access:
            access_log = self._open_access_log(new.log.access) if new.log.access is not None else None
        try:
            self.tracker.reconfigure(self._tracker_config(new),
                                     build_resolver(new, self._names_for(new), agents=self.agent_table))
        except ValueError as exc:  # the checks above should have caught it
            log.error("reload refused, the running configuration stays: %s", exc)
            if access_log is not self.access_log and access_log is not None:
                access_log.close()
            return False
        if access_log is not self.access_log:
            if self.access_log is not None:
                self.access_log.close()
            self.access_log = access_log
        self._reconfigure_bridge(new)
        if self.kernel is not None:
            try:
                set_syn_cookies(self.kernel, new, self.cookie_secret)
            except (KernelPathError, OSError) as exc:
                log.warning("the kernel path keeps answering SYNs as before the reload: %s", exc)
        if new.log.level != self.config.log.level:
            # Only a changed [log] level applies, so that --log-level stays in force otherwise.
            logging.getLogger().setLevel(LOG_LEVELS[new.log.level])
        self.config = new
        self._reconfigure_agents(new)
        self._report_reload(new)
        return True

    def _reconfigure_bridge(self, new: Config) -> None:
        """New routes and limits for new tunnels; the open ones go on (on the services loop)."""
        if self.bridge is not None and self.services is not None:
            self.services.call_soon(self.bridge.reconfigure, new, self._names_for(new))

    def _reconfigure_agents(self, new: Config) -> None:
        """Connected agents stay; their tokens and names are checked against the new [agents] (AgentHub.reconfigure)."""
        if self.hub is not None and new.agents is not None and self.services is not None:
            self.services.call_soon(self.hub.reconfigure, new.agents)

    def _report_reload(self, new: Config) -> None:
        log.info("reloaded %s: %d routes, fallback %s; connections already bound keep their host",
                 new.source, len(new.routes), "yes" if new.fallback is not None else "no")

    # -- the loop ------------------------------------------------------------

    def _loop(self, wake_fd: int) -> None:
        tun_fd = self.tun.fd
        tracker = self.tracker
        poller = self._loop_poller = select.epoll()
        poller.register(tun_fd, select.EPOLLIN)
        poller.register(wake_fd, select.EPOLLIN)
        for fd in self._extra_fds:
            poller.register(fd, select.EPOLLIN)
        max_sleep = MAX_SLEEP
        if self.notifier.watchdog_interval is not None:
            max_sleep = min(max_sleep, self.notifier.watchdog_interval)
        try:
            while not self.stopping:
                deadline = tracker.next_timer()
                timeout = max_sleep
                if deadline is not None:
                    timeout = min(max(deadline - time.monotonic(), 0.0), max_sleep)
                # Wake for the once-a-second sync too, so the metrics are never more than a second old.
                timeout = min(timeout, max(self._next_sync - time.monotonic(), 0.0))
                for fd, _ in poller.poll(timeout):
                    if fd == tun_fd:
                        self._read_packets(tun_fd)
                    elif fd == wake_fd:
                        self._drain(wake_fd)
                    else:
                        self._extra_fds[fd]()
                self._after_poll()
                now = time.monotonic()
                self._write(tun_fd, tracker.on_timer(now))
                if tracker.records:
                    self._log_records()
                if self.reload_requested:
                    self.reload()
                if now >= self._next_sync:
                    self._tick(now)
                if self._next_watchdog is not None and now >= self._next_watchdog:
                    self.notifier.watchdog()
                    self._next_watchdog = now + self.notifier.watchdog_interval
        finally:
            self._loop_poller = None
            poller.close()

    def _after_poll(self) -> None:
        """After each round of packets (a worker shares its table size here)."""

    def _tick(self, now: float) -> None:
        """Once a second: counters for the metrics thread, and the status line for systemd."""
        self._next_sync = now + SYNC_INTERVAL
        if self.metrics is not None:
            dropped = {"access": self.access_log.dropped if self.access_log is not None else 0,
                       "daemon": _LOG_QUEUE.dropped if _LOG_QUEUE is not None else 0}
            self.metrics.sync(self.tracker, now, dropped, self._kernel_stats())
        if self.notifier.enabled and now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL
            self.notifier.status(self._status_text())

    def _kernel_stats(self) -> dict[str, int] | None:
        if self.kernel is None:
            return None
        try:
            return self.kernel.stats()
        except OSError as exc:
            log.debug("reading the kernel path's counters: %s", exc)
            return None

    def _status_text(self) -> str:
        n = len(self.tracker)
        text = f"{n} connection{'' if n == 1 else 's'}"
        if self.restored:
            text += f" ({self.restored} restored at start)"
        return text

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
        access_log = self.access_log
        metrics = self.metrics
        wall_offset = time.time() - time.monotonic()
        info = conn_log.isEnabledFor(logging.INFO)
        if metrics is not None:
            # Opened before closed: a scrape never sees more connections ended than begun.
            metrics.count_opened(self.tracker)
        for record in records:
            if record.outcome == "handshake_timeout":
                # SYNs whose handshake never completed (floods): counted, not logged one by one.
                if conn_log.isEnabledFor(logging.DEBUG):
                    conn_log.debug("%s", format_record(record))
                if metrics is not None:
                    metrics.observe(record)
                continue
            if info:
                conn_log.info("%s", format_record(record))
            if access_log is not None:
                access_log.log(record, wall_offset)
            if metrics is not None:
                metrics.observe(record)


# -- the daemon's own log, written by a thread ----------------------------------

_LOG_QUEUE: NonBlockingQueueHandler | None = None


def _log_through_queue() -> logging.handlers.QueueListener | None:
    """Move the root logger's handlers (stderr) behind a queue, so a slow stderr never stalls the loop."""
    global _LOG_QUEUE
    root = logging.getLogger()
    handlers = [h for h in root.handlers if not isinstance(h, logging.handlers.QueueHandler)]
    if not handlers:
        return None
    q: queue.Queue = queue.Queue(LOG_QUEUE_SIZE)
    _LOG_QUEUE = NonBlockingQueueHandler(q)
    listener = logging.handlers.QueueListener(q, *handlers, respect_handler_level=True)
    for h in handlers:
        root.removeHandler(h)
    root.addHandler(_LOG_QUEUE)
    listener.start()
    return listener


def _log_directly(listener: logging.handlers.QueueListener | None) -> None:
    global _LOG_QUEUE
    if listener is None:
        return
    listener.stop()  # writes what is queued
    root = logging.getLogger()
    if _LOG_QUEUE is not None:
        root.removeHandler(_LOG_QUEUE)
    for h in listener.handlers:
        root.addHandler(h)
    _LOG_QUEUE = None


def worker_count(config: Config) -> int:
    """How many workers to run: ``[tun] workers``, or with "auto" one per CPU if the steering program loads."""
    count = config.tun.worker_count()
    if count > 1 and config.tun.workers is None:
        from kracauer.steering import Steering, SteeringError

        try:
            Steering.load().close()
        except SteeringError as exc:
            log.warning("[tun] workers = \"auto\": running one worker, not %d: %s", count, exc)
            return 1
    return count


def run(config: Config, keep_tun: bool = True) -> int:
    """Run kracauer with `config` in the foreground until SIGTERM or SIGINT; the exit status.

    `keep_tun=False`: stop for good (no state saved, TUN removed) even with [state].
    """
    listener = _log_through_queue()
    try:
        count = worker_count(config)
        if count > 1:
            from kracauer.supervisor import Supervisor

            level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
            return Supervisor(config, count, keep_tun=keep_tun,
                              log_level=level if level in LOG_LEVELS else None).run()
        return Daemon(config, keep_tun=keep_tun).run()
    except (TunError, PrivilegeError, DaemonError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        _log_directly(listener)


def cleanup(config: Config) -> list[str]:
    """Stop for good after a stop with [state]: remove the persistent TUN and the state file; what was done."""
    done = []
    if remove_tun(config.tun.name):
        done.append(f"removed the TUN {config.tun.name} and its routes (and the BPF program on it)")
    pin_dir = os.path.join(config.kernel_path.pin_dir, config.tun.name)
    if remove_pins(pin_dir):
        done.append(f"removed the kernel path's pinned maps in {pin_dir}")
    if config.state is not None:
        for path in saved_shards(config.state.file):
            try:
                os.unlink(path)
                done.append(f"removed the state file {path} (its connections are abandoned)")
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DaemonError(f"cannot remove the state file {path}: {exc.strerror or exc}") from None
    return done
