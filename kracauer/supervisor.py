"""The supervisor of a multi-queue kracauer (``[tun] workers`` > 1).

As nginx's master process: it stays root, sets everything up and owns what
is shared, and N worker processes (kracauer/worker.py) carry the
connections, each with its own tracker shard reading its own TUN queue.

The supervisor owns
- the TUN (IFF_MULTI_QUEUE, one queue per worker; it keeps every queue's
  descriptor open, so a worker that dies leaves its queue in place and the
  steering of every other connection unchanged), its routes, the kernel
  path's BPF program and maps, and the steering program that sends both
  directions of a connection to one worker (netstack/steer.py);
- signals: SIGHUP reads and checks the configuration once and hands its text
  to every worker; SIGTERM and SIGINT stop every worker (each saves its state
  shard, ``<[state] file>.<index>``), then the TUN is kept or removed;
- the one metrics endpoint (the workers' figures summed, kracauer/workers.py),
  the one access log (each worker sends whole lines; only the supervisor
  writes), systemd notification, and passive host health (a worker's change
  is passed to all the others);
- the SYN-cookie secret, the same in every worker, so any worker takes any
  cookie;
- restarts: a worker that dies is started again; the connections the kernel
  carried for it go on meanwhile and are adopted by the new worker.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server

from kracauer.config import Config
from kracauer.daemon import (
    LOG_LEVELS, SYNC_INTERVAL, STATUS_INTERVAL, Daemon, DaemonError, _connections, _set_aside, check_state_directory,
    saved_shards, set_syn_cookies,
)
from kracauer.kernel_path import KernelPathError
from kracauer.metrics import _Snapshot, _TrackerCollector, process_metrics
from kracauer.steering import Steering, SteeringError
from kracauer.systemd import Notifier
from kracauer.tun import add_routes, open_tun
from kracauer.worker import EXIT_OK, INIT
from kracauer.workers import (
    AGENTS, agents_message, HEALTH, LOG, METRICS, QUIC_CID, READY, RELOAD, RELOADED, STATUS, Channel, TableCounts,
    channel_pair, merge_expositions,
)

log = logging.getLogger("kracauer")

# How long the workers have to start, and to stop (saving their state).
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
# A worker that dies is started again after this long, doubled while it keeps dying young.
RESTART_DELAY = 0.0
RESTART_DELAY_MAX = 10.0
# A worker that ran at least this long before dying is restarted at once.
HEALTHY_RUN = 30.0


@dataclass
class WorkerHandle:
    """One worker as the supervisor sees it."""

    index: int
    proc: WorkerProcess | None = None
    channel: Channel | None = None
    ready: bool = False
    started: float = 0.0
    restarts: int = 0
    delay: float = RESTART_DELAY
    restart_at: float | None = None
    exit_status: int | None = None
    status: dict[str, Any] = field(default_factory=dict)
    metrics_text: str = ""


class SupervisorMetrics:
    """/metrics for the whole box: the supervisor's own families and the workers' summed."""

    def __init__(self, supervisor: Supervisor) -> None:
        disable_created_metrics()
        self.supervisor = supervisor
        self.own = CollectorRegistry()
        own = self.own
        self.reloads, self.reload_ok = process_metrics(own)
        own.register(_SupervisorCollector(supervisor))
        self.registry = CollectorRegistry()
        self.registry.register(_MergedCollector(self))
        self.server = None

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """The workers send their figures; nothing to copy here."""

    def serve(self, address: str, port: int) -> None:
        self.server, _ = start_http_server(port, addr=address, registry=self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class _SupervisorCollector:
    """The kernel path's counters and the workers themselves."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        sup = self.supervisor
        stats = sup._kernel_stats()
        for family in _TrackerCollector._kernel_families(_Snapshot(kernel=stats)):
            if family.name != "kracauer_connections_in_kernel":  # the workers' parked connections, summed
                yield family
        yield GaugeMetricFamily("kracauer_workers", "Worker processes configured ([tun] workers)", value=sup.count)
        up = GaugeMetricFamily("kracauer_worker_up", "1 while the worker runs and has said it is ready",
                               labels=["worker"])
        restarts = CounterMetricFamily("kracauer_worker_restarts", "Times the worker was started again after "
                                       "it died", labels=["worker"])
        active = GaugeMetricFamily("kracauer_worker_connections_active", "Connections in the worker's table "
                                   "(at its last report, once a second)", labels=["worker"])
        opened = CounterMetricFamily("kracauer_worker_connections_opened", "Connections the worker accepted "
                                     "since it started", labels=["worker"])
        pid = GaugeMetricFamily("kracauer_worker_pid", "The worker's process id (0: not running)", labels=["worker"])
        for w in sup.workers:
            label = [str(w.index)]
            up.add_metric(label, 1 if w.ready and w.proc is not None and w.proc.poll() is None else 0)
            restarts.add_metric(label, w.restarts)
            active.add_metric(label, w.status.get("connections", 0))
            opened.add_metric(label, w.status.get("opened", 0))
            pid.add_metric(label, w.proc.pid if w.proc is not None and w.proc.poll() is None else 0)
        yield from (up, restarts, active, opened, pid)


class _MergedCollector:
    def __init__(self, metrics: SupervisorMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        texts = [w.metrics_text for w in self.metrics.supervisor.workers if w.metrics_text]
        yield from merge_expositions(self.metrics.own.collect(), texts)


class Supervisor(Daemon):
    """Sets up the TUN for `count` workers, runs them, and stops them."""

    def __init__(self, config: Config, count: int, *, keep_tun: bool = True,
                 notifier: Notifier | None = None, log_level: str | None = None) -> None:
        super().__init__(config, keep_tun=keep_tun, notifier=notifier)
        self.count = count
        self.log_level = log_level or config.log.level
        self.metrics = SupervisorMetrics(self) if config.metrics is not None else None
        self.workers = [WorkerHandle(i) for i in range(count)]
        # Shared by every worker (and every restart of one) and by the BPF program that answers
        # SYNs (Daemon._start_kernel_path gives it the same): any worker takes any cookie.
        self.secret = self.cookie_secret
        self.counts = TableCounts.create(count)
        self.steering: Steering | None = None
        self.text = ""
        self._restore_files: list[str] = []
        self._child_exited = False
        self._stop_deadline: float | None = None
        self._by_fd: dict[int, WorkerHandle] = {}
        self._poller: select.epoll | None = None
        self._previous_sigchld: Any = None

    # -- set-up -----------------------------------------------------------------------

    def _set_up(self) -> None:
        config = self.config
        self.text = config.text
        if config.state is not None and self.persist:
            self._restore_files = saved_shards(config.state.file)
        ipv4_routes = [ipaddress.IPv4Network(a) for a in sorted({lst.address for lst in config.listeners})]
        ipv6_routes = sorted({config.prefix} | {lst.prefix for lst in config.listeners if lst.prefix})
        # The routes come once the workers read their queues.
        self.tun = open_tun(config.tun.name, config.tun.mtu, ipv4_routes, ipv6_routes, offload=config.tun.offload,
                            persist=self.persist, queues=self.count, route=False)
        if self._restore_files and not self.tun.attached:
            for path in self._restore_files:
                aside = _set_aside(path, ".stale")
                log.warning("state file %s not restored: the TUN %s was not left in place by the previous "
                            "process%s", path, self.tun.name, f" (moved to {aside})" if aside else "")
            self._restore_files = []
        self.kernel = self._start_kernel_path()
        try:
            self.steering = Steering.load()
            self.steering.attach(self.tun)
        except SteeringError as exc:
            raise DaemonError(f"[tun] workers = {self.count} needs the queue-steering program: {exc} "
                              f"(workers = 1 runs without it)") from None
        self._poller = select.epoll()
        self._previous_sigchld = signal.signal(signal.SIGCHLD, self._on_child)
        # The bridge's routes and addresses are the supervisor's (it stays root and removes them at the
        # end); its sockets and tunnels are worker 0's, which binds them and then drops privileges.
        self._add_bridge_plumbing()
        for w in self.workers:
            self._spawn(w, restore=self._restore_files, adopt=self.kernel is not None and self.tun.attached,
                        fresh=True)
        self._wait_ready()
        add_routes(self.tun, config.tun.mtu, ipv4_routes, ipv6_routes)
        # The hub runs here; the workers hear of its agents over their channels (_agents_changed).
        self._start_agents()
        if self.services is not None:
            self._poller.register(self.services.wake_fd, select.EPOLLIN)
        for path in self._restore_files:
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("could not remove the state file %s after restoring it: %s", path, exc)
        if self._leftover_flows is not None:
            self._leftover_flows.map.close()
            self._leftover_flows = None
            from kracauer.kernel_path import remove_pins

            if self._leftover_pins is not None and remove_pins(self._leftover_pins):
                log.info("removed the kernel path's maps left in %s", self._leftover_pins)
        self.restored = sum(w.status.get("restored", 0) for w in self.workers)
        if self.restored:
            log.info("restored %s from %s", _connections(self.restored), ", ".join(self._restore_files))

    def _spawn(self, w: WorkerHandle, restore: list[str], adopt: bool, fresh: bool = False) -> None:
        """Start worker `w` on its queue; its first message is its set-up."""
        tun = self.tun
        supervisor_end, worker_end = channel_pair()
        queue_fd = tun.queue_fds[w.index]
        flows_fd = self.kernel.flows.map.fd if self.kernel is not None else -1
        leftover_fd = self._leftover_flows.map.fd if self._leftover_flows is not None else -1
        fds = [worker_end.fileno(), queue_fd, self.counts.fd] + [fd for fd in (flows_fd, leftover_fd) if fd >= 0]
        self.counts.set(w.index, 0)  # a worker that died held nothing any more
        setup = {
            "index": w.index, "count": self.count, "supervisor": os.getpid(), "text": self.text,
            "source": str(self.config.source), "log_level": self.log_level, "tun_fd": queue_fd,
            "tun_name": tun.name, "tun_index": tun.index, "offload": tun.offload, "persist": self.persist,
            "attached": tun.attached, "flows_fd": flows_fd, "leftover_fd": leftover_fd, "secret": self.secret.hex(),
            "restore": list(restore), "adopt": adopt, "counts_fd": self.counts.fd, "fresh": fresh,
        }
        try:
            w.proc = WorkerProcess.spawn([sys.executable, "-m", "kracauer.worker", str(worker_end.fileno())], fds)
        finally:
            worker_end.close()
        w.channel = Channel(supervisor_end)
        w.channel.send(INIT, json.dumps(setup).encode())
        if self.agent_table:
            # A restarted worker learns the agents' names at once.
            w.channel.send_json(AGENTS, agents_message(self.agent_table, []))
        w.ready = False
        w.started = time.monotonic()
        w.restart_at = None
        w.exit_status = None
        w.metrics_text = ""
        self._by_fd[w.channel.fileno()] = w
        self._poller.register(w.channel.fileno(), select.EPOLLIN)
        log.debug("started worker %d (pid %d)", w.index, w.proc.pid)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.ready for w in self.workers):
            if self.stopping:
                raise DaemonError("stopped by a signal while the workers were starting")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"the workers did not start within {START_TIMEOUT:.0f} s")
            self._poll(min(left, 0.5))
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    raise DaemonError(f"worker {w.index} exited with status {w.proc.returncode} while starting "
                                      f"(its log says why)")

    def _abort_set_up(self) -> None:
        self._stop_workers(signal.SIGKILL)
        super()._abort_set_up()
        self._close_rest()

    def _close_rest(self) -> None:
        if self.counts is not None:
            self.counts.close()
            self.counts = None
        if self.steering is not None:
            self.steering.close()
            self.steering = None
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        if self._previous_sigchld is not None:
            signal.signal(signal.SIGCHLD, self._previous_sigchld)
            self._previous_sigchld = None

    def _announce(self) -> None:
        super()._announce()
        log.info("%d workers, one per TUN queue (pids %s)", self.count,
                 ", ".join(str(w.proc.pid) for w in self.workers if w.proc is not None))

    # -- the loop ---------------------------------------------------------------------

    def _on_child(self, signum: int, frame: object) -> None:
        self._child_exited = True

    def _loop(self, wake_fd: int) -> None:
        self._poller.register(wake_fd, select.EPOLLIN)
        self._wake_fd = wake_fd
        while True:
            now = time.monotonic()
            if self.stopping and self._stop_deadline is None:
                self._stop_deadline = now + STOP_TIMEOUT
                self._stop_workers(signal.SIGTERM)
            if self._stop_deadline is not None:
                if all(w.proc is None or w.proc.poll() is not None for w in self.workers):
                    self._drain_channels()
                    break
                if now >= self._stop_deadline:
                    log.error("workers still running %.0f s after SIGTERM: killing them", STOP_TIMEOUT)
                    self._stop_workers(signal.SIGKILL)
                    self._stop_deadline = now + 5.0
            timeout = SYNC_INTERVAL
            pending = [w.restart_at for w in self.workers if w.restart_at is not None]
            if pending:
                timeout = min(timeout, max(min(pending) - now, 0.0))
            self._poll(timeout)
            if self._child_exited:
                self._child_exited = False
                self._reap()
            now = time.monotonic()
            for w in self.workers:
                if w.restart_at is not None and now >= w.restart_at and not self.stopping:
                    log.info("starting worker %d again", w.index)
                    w.restarts += 1
                    self._spawn(w, restore=[], adopt=self.kernel is not None)
            if self.reload_requested:
                self.reload()
            if now >= self._next_sync:
                self._tick(now)
            if self._next_watchdog is not None and now >= self._next_watchdog:
                self.notifier.watchdog()
                self._next_watchdog = now + self.notifier.watchdog_interval

    def _poll(self, timeout: float) -> None:
        for fd, _ in self._poller.poll(timeout):
            w = self._by_fd.get(fd)
            if w is None:
                handler = self._extra_fds.get(fd)
                if handler is not None:
                    handler()  # the services thread's posts (the agent hub)
                else:
                    self._drain(fd)
                continue
            self._read_channel(w)

    def _drain_channels(self) -> None:
        for w in self.workers:
            if w.channel is not None:
                self._read_channel(w)

    def _read_channel(self, w: WorkerHandle) -> None:
        channel = w.channel
        try:
            for kind, payload in channel.receive():
                self._message(w, kind, payload)
        except EOFError:
            self._poller.unregister(channel.fileno())
            del self._by_fd[channel.fileno()]
            channel.close()
            w.channel = None

    def _message(self, w: WorkerHandle, kind: bytes, payload: bytes) -> None:
        if kind == LOG:
            if self.access_log is not None:
                self.access_log.write_line(payload.decode("utf-8", "replace"))
        elif kind == METRICS:
            w.metrics_text = payload.decode("utf-8", "replace")
        elif kind == STATUS:
            w.status = json.loads(payload)
        elif kind == HEALTH or kind == QUIC_CID:
            # Passive health and QUIC connection IDs: every worker must know them (a rebinding
            # client's new address and port may steer to any worker).
            for other in self.workers:
                if other is not w and other.channel is not None:
                    other.channel.send(kind, payload)
        elif kind == READY:
            w.ready = True
            w.status.update(json.loads(payload))
        elif kind == RELOADED:
            if not json.loads(payload).get("ok"):
                log.error("worker %d refused the reload (its log says why)", w.index)

    def _metrics_registry(self) -> Any:
        return self.metrics.own

    def _agents_changed(self, routes: dict, gone: list) -> None:
        """The hub's agents changed: every worker's resolver gets the names, and resets what went through a gone one."""
        self.agent_table = routes
        message = agents_message(routes, gone)
        for w in self.workers:
            if w.channel is not None and not w.channel.send_json(AGENTS, message):
                log.error("worker %d missed a change of the agents' names (its channel is full)", w.index)

    def _reap(self) -> None:
        for w in self.workers:
            if w.proc is None or w.proc.poll() is None or w.exit_status is not None:
                continue
            w.exit_status = w.proc.returncode
            w.ready = False
            if w.channel is not None:
                self._read_channel(w)  # what it sent before it went (log lines)
            if self.stopping:
                continue
            ran = time.monotonic() - w.started
            w.delay = RESTART_DELAY if ran >= HEALTHY_RUN else min(max(w.delay * 2, 0.5), RESTART_DELAY_MAX)
            w.restart_at = time.monotonic() + (0.0 if ran >= HEALTHY_RUN else w.delay)
            log.error("worker %d (pid %d) exited with status %s after %.1f s; starting it again%s", w.index,
                      w.proc.pid, _describe_status(w.exit_status), ran,
                      "" if w.restart_at <= time.monotonic() else f" in {w.delay:.1f} s")

    def _stop_workers(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
        if sig == signal.SIGKILL:
            for w in self.workers:
                if w.proc is not None:
                    w.proc.wait(timeout=5)

    def _tick(self, now: float) -> None:
        self._next_sync = now + SYNC_INTERVAL
        if self.notifier.enabled and now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL
            self.notifier.status(self._status_text())

    def _status_text(self) -> str:
        n = sum(w.status.get("connections", 0) for w in self.workers)
        text = f"{n} connection{'' if n == 1 else 's'}, {self.count} workers"
        if self.restored:
            text += f" ({self.restored} restored at start)"
        return text

    # -- reload -----------------------------------------------------------------------

    def _apply(self, new: Config) -> bool:
        """Check the new configuration once; the workers each apply the same text (Config.text)."""
        if self._needs_restart(new):
            return False
        if new.state is not None and new.state != self.config.state:
            check_state_directory(new.state.file, new.tun.user)
        if new.log.access != self.config.log.access:
            access_log = self._open_access_log(new.log.access) if new.log.access is not None else None
            if self.access_log is not None:
                self.access_log.close()
            self.access_log = access_log
        if new.log.level != self.config.log.level:
            logging.getLogger().setLevel(LOG_LEVELS[new.log.level])
        if self.kernel is not None:
            try:
                set_syn_cookies(self.kernel, new, self.cookie_secret)
            except (KernelPathError, OSError) as exc:
                log.warning("the kernel path keeps answering SYNs as before the reload: %s", exc)
        self._reconfigure_bridge(new)
        self.config = new
        self.text = new.text
        self._reconfigure_agents(new)
        for w in self.workers:
            if w.channel is not None:
                w.channel.send_json(RELOAD, {"text": new.text, "source": str(new.source)})
        log.info("reloaded %s: %d routes, fallback %s; connections already bound keep their host "
                 "(handed to %d workers)", new.source, len(new.routes), "yes" if new.fallback is not None else "no",
                 self.count)
        return True

    # -- stop -------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self.notifier.stopping("saving state" if self.persist else "stopping")
        self._stop_agents()
        self._stop_bridge()
        # The return codes, not exit_status: the last SIGCHLD may not have been handled yet.
        saved_all = all(w.proc is not None and w.proc.poll() == EXIT_OK for w in self.workers)
        keep = self.persist and self.config.state is not None and saved_all
        if self.persist and not saved_all:
            log.error("a worker could not save its state (see its log): the TUN is removed and its "
                      "connections are lost")
        try:
            self._release(keep)
        finally:
            self._close_rest()
            self._stop_outputs()
        name = self.config.tun.name
        if keep:
            saved = sum(w.status.get("saved") or 0 for w in self.workers)
            log.info("stopped; saved %s to %s.0 to .%d (one file per worker); TUN %s and its routes left in "
                     "place for the next start (`kracauer cleanup` removes them)", _connections(saved),
                     self.config.state.file, self.count - 1, name)
        else:
            log.info("stopped; TUN %s and its routes removed", name)


class WorkerProcess:
    """A worker process started with posix_spawn: the supervisor's own Python, no shell, no fork of
    its threads and memory. returncode is the exit code, or minus
    the signal that ended it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def spawn(cls, argv: list[str], pass_fds: list[int]) -> WorkerProcess:
        """Start `argv` with stdin on /dev/null and only `pass_fds` inherited (PEP 446: every other
        descriptor is close-on-exec); SIGPIPE and SIGXFSZ, which Python ignores, back to default."""
        was = {fd: os.get_inheritable(fd) for fd in pass_fds}
        try:
            for fd in pass_fds:
                os.set_inheritable(fd, True)
            pid = os.posix_spawn(argv[0], argv, os.environ,
                                 file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
                                 setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        finally:
            for fd, inheritable in was.items():
                os.set_inheritable(fd, inheritable)
        return cls(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode  # reaped elsewhere: nothing more to learn
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        """Poll until it has exited or `timeout` seconds passed; its returncode (None if still running)."""
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # never signal a pid that may have been reused
            os.kill(self.pid, sig)


def _describe_status(status: int | None) -> str:
    if status is None:
        return "?"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return str(status)
