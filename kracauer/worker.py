"""One worker of a multi-queue kracauer: a tracker shard reading and writing one TUN queue.

The supervisor (kracauer/supervisor.py) starts each worker as
``python -m kracauer.worker FD``: FD is the worker's end of its channel
(kracauer/workers.py), whose first message (``I``) says everything else: the
configuration's text, which TUN queue descriptor it inherited, the kernel
path's flow map, the SYN-cookie secret every worker shares, which state
shards to restore, and whether to adopt what the kernel carries (a restart
after this worker died).

A worker is the single-process daemon (kracauer.daemon.Daemon) with its
edges replaced: it does not make the TUN or load BPF (the supervisor did),
never removes the device, serves no metrics (it sends its text once a
second), writes no access log (it sends each line), and reloads with the
configuration text the supervisor checked. The packet loop is the same.

The supervisor's death kills the worker (PR_SET_PDEATHSIG): a worker never
outlives it holding a queue.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from kracauer.accesslog import record_fields
from kracauer.config import Config, ConfigError, parse_config
from kracauer.daemon import Daemon, DaemonError, _connections, take_back, tracker_config
from netstack.tracker import TrackerConfig
from kracauer.privileges import drop_privileges
from kracauer.systemd import Notifier
from kracauer.tun import Tun
from kracauer.workers import (
    AGENTS, HEALTH, LOG, METRICS, QUIC_CID, READY, RELOAD, RELOADED, STATUS, Channel, TableCounts,
    parse_agents_message,
)
from netstack.state import adopt
from netstack.steer import flow_key_owner
from netstack.syncookie import BLAKE2S, SynCookies

log = logging.getLogger("kracauer")

INIT = b"I"
INIT_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1
# Exit statuses the supervisor reads.
EXIT_OK = 0
EXIT_SAVE_FAILED = 3
EXIT_START_FAILED = 2


def state_shard(path: str, index: int) -> str:
    """Where worker `index` saves its connections: ``<[state] file>.<index>``."""
    return f"{path}.{index}"


@dataclass(frozen=True)
class WorkerSetup:
    """What the supervisor tells a worker at its start (the ``I`` message)."""

    index: int
    count: int
    supervisor: int           # the supervisor's pid
    text: str                 # the configuration, as the supervisor read and checked it
    source: str
    log_level: str
    tun_fd: int
    tun_name: str
    tun_index: int
    offload: bool
    persist: bool             # [state] and a stop that keeps the TUN
    attached: bool            # the TUN was left by an earlier process
    flows_fd: int             # the kernel path's flow map, -1: no kernel path
    leftover_fd: int          # a flow map left by an earlier process, to take back (-1: none)
    secret: str               # hex: the SYN-cookie secret shared by every worker
    restore: tuple[str, ...]  # state files to restore from (entries that steer to this worker)
    adopt: bool               # restarted after a crash: adopt the kernel's flows that steer here
    counts_fd: int            # every worker's table size (workers.TableCounts)
    fresh: bool = False       # started with a new supervisor (not restarted beside a running agent hub)

    @classmethod
    def from_json(cls, payload: bytes) -> WorkerSetup:
        data = json.loads(payload)
        data["restore"] = tuple(data["restore"])
        return cls(**data)


class ChannelAccessLog:
    """The access log as a worker writes it: each line goes whole to the supervisor, which writes them all."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._dropped_before = channel.dropped
        self.dropped = 0

    def log(self, record: Any, wall_offset: float | None = None) -> None:
        if wall_offset is None:
            wall_offset = time.time() - time.monotonic()
        line = json.dumps(record_fields(record, record.start + wall_offset), ensure_ascii=False,
                          separators=(", ", ": "))
        if not self.channel.send(LOG, line.encode()):
            self.dropped += 1

    def write_line(self, line: str) -> None:
        """A record formatted already (a bridge tunnel's), from the packet loop's thread."""
        if not self.channel.send(LOG, line.encode()):
            self.dropped += 1

    def close(self) -> None:
        pass


def _die_with_parent(supervisor: int) -> None:
    """SIGKILL when the supervisor goes (set again after a privilege drop, which clears it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:
        os._exit(EXIT_START_FAILED)


class Worker(Daemon):
    """The daemon's loop over one TUN queue, as one of `count` workers."""

    def __init__(self, config: Config, setup: WorkerSetup, channel: Channel) -> None:
        super().__init__(config, keep_tun=setup.persist or config.state is None, notifier=Notifier({}))
        self.setup = setup
        self.channel = channel
        self.persist = setup.persist
        tracker = self.tracker
        tracker.reconfigure(self._tracker_config(config), tracker.resolve)
        tracker.queue, tracker.queues = setup.index, setup.count
        tracker.health_changes = []
        if tracker.udp is not None:
            tracker.udp.cid_changes = []
        tracker.cookies = SynCookies(bytes.fromhex(setup.secret))
        self._extra_fds[channel.fileno()] = self._on_channel
        self.save_failed = False
        self.counts = TableCounts(setup.counts_fd, setup.count)

    # -- the daemon's edges, replaced ------------------------------------------------

    def _tracker_config(self, config: Config) -> TrackerConfig:
        # [limits] are the box's: each worker holds its share.
        return tracker_config(config, self.setup.count)

    def _report_reload(self, new: Config) -> None:
        log.debug("worker %d reloaded %s", self.setup.index, new.source)

    def _preflight(self) -> None:
        pass  # the supervisor checked forwarding and the state directory

    def _start_outputs(self) -> None:
        if self.config.log.access is not None:
            self.access_log = ChannelAccessLog(self.channel)

    def _open_access_log(self, target: str) -> ChannelAccessLog:  # type: ignore[override]
        return ChannelAccessLog(self.channel)

    def _stop_outputs(self) -> None:
        self.access_log = None

    def _set_up(self) -> None:
        setup = self.setup
        self.tun = Tun(name=setup.tun_name, fd=setup.tun_fd, index=setup.tun_index, offload=setup.offload,
                       privileged=False, persistent=setup.persist, attached=setup.attached,
                       queue_fds=[setup.tun_fd])
        os.set_blocking(setup.tun_fd, False)
        if setup.flows_fd < 0:
            # No program makes cookies: Python's may use the faster hash (netstack/syncookie.py).
            self.tracker.cookies = SynCookies(self.tracker.cookies.secret, BLAKE2S)
        if setup.flows_fd >= 0:
            from kracauer.bpf.libbpf import Map
            from kracauer.kernel_path import BpfFlowTable

            self.tracker.flows = BpfFlowTable(Map.from_fd(setup.flows_fd, owned=True))
        now = time.monotonic()
        for path in setup.restore:
            self._restore_shard(path, now)
        if self.tracker.flows is None:
            self._take_back_shard()
        if setup.adopt and self.tracker.flows is not None:
            self._adopt_own_flows(now)
        if setup.fresh:
            # A new box process (not a worker restarted beside a running hub): see Daemon's.
            self._forget_agents_connections()
        if setup.index == 0:
            # The bridge's ends live in one process: the first worker (its plumbing is the supervisor's).
            self._start_bridge_service()
        if self.config.tun.user:
            drop_privileges(self.config.tun.user)
            _die_with_parent(setup.supervisor)

    def _mine(self, key: bytes) -> bool:
        return flow_key_owner(key, self.setup.count) == self.setup.index

    def _restore_shard(self, path: str, now: float) -> None:
        """Restore the connections of one state file that steer to this worker."""
        self._restore(self._read_saved_state(path), path, keep=self._mine_client)
        self._restored_from = []  # the supervisor removes the files once every worker has read them

    def _mine_client(self, client: bytes, port: int) -> bool:
        from netstack.steer import queue_of

        return queue_of(client, port, self.setup.count) == self.setup.index

    def _take_back_shard(self) -> None:
        """No kernel path here: this worker's share of what an earlier process left to the kernel is
        translated here (``take_back``), from the map it left if there is one (the supervisor's)."""
        leftover = None
        if self.setup.leftover_fd >= 0:
            from kracauer.bpf.libbpf import Map
            from kracauer.kernel_path import BpfFlowTable

            leftover = BpfFlowTable(Map.from_fd(self.setup.leftover_fd, owned=True))
        take_back(self.tracker, leftover, self._mine, who=f"worker {self.setup.index}: ")
        if leftover is not None:
            leftover.map.close()

    def _adopt_own_flows(self, now: float) -> None:
        """After this worker died: the connections the kernel carried for it are its again."""
        flows = self.tracker.flows
        adopted, stale = adopt(self.tracker, ((k, f) for k, f in flows.items() if self._mine(k)), now)
        for key in stale:
            flows.map.delete(key)
        if adopted or stale:
            log.info("worker %d: adopted %s the kernel carried%s", self.setup.index, _connections(adopted),
                     f"; removed {len(stale)} flow entries with no connection" if stale else "")
        if adopted and self.metrics is not None:
            self.metrics.skip_existing(now)

    def _abort_set_up(self) -> None:
        self._release(False)

    def _announce(self) -> None:
        log.debug("worker %d of %d running (pid %d)", self.setup.index, self.setup.count, os.getpid())

    def _ready(self) -> None:
        self.channel.send_json(READY, {"restored": self.restored})

    def _state_path(self) -> str:
        return state_shard(self.config.state.file, self.setup.index)

    def _save_state(self, path: str) -> int | None:
        saved = super()._save_state(path)
        self.save_failed = saved is None
        self.channel.send_json(STATUS, {"connections": len(self.tracker), "saved": saved, "restored": self.restored})
        return saved

    def _release(self, keep: bool) -> None:
        # The device is the supervisor's: only this worker's descriptor of its queue closes.
        if self.tun is not None and self.tun.fd >= 0:
            os.close(self.tun.fd)
            self.tun.fd = -1
            self.tun.queue_fds = []
        flows = self.tracker.flows
        if flows is not None and hasattr(flows, "map"):
            flows.map.close()
        self.counts.set(self.setup.index, 0)

    def _report_stop(self, keep: bool, saved: int | None) -> None:
        if saved is not None:
            log.info("worker %d stopped; saved %s to %s", self.setup.index, _connections(saved), self._state_path())
        else:
            log.debug("worker %d stopped", self.setup.index)

    def _kernel_stats(self) -> dict[str, int] | None:
        return None  # the supervisor reads the kernel path's counters

    def _after_poll(self) -> None:
        udp = self.tracker.udp
        if udp is not None and udp.cid_changes:
            # Sent at once, not with the next tick: a client may rebind soon after its handshake.
            for cid, flow in udp.cid_changes:
                self.channel.send_json(QUIC_CID, udp.export_cid(cid, flow))
            udp.cid_changes.clear()
        index = self.setup.index
        self.counts.set(index, len(self.tracker.clients))
        self.tracker.elsewhere = self.counts.others(index)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGHUP:  # a reload comes from the supervisor, with the checked configuration
            self.stopping = True

    # -- the channel -----------------------------------------------------------------

    def _tick(self, now: float) -> None:
        super()._tick(now)
        self._send_health()
        tracker = self.tracker
        self.channel.send_json(STATUS, {"connections": len(tracker), "opened": sum(tracker.opened.values()),
                                        "in_kernel": tracker.in_kernel, "restored": self.restored})
        if self.metrics is not None:
            from prometheus_client.exposition import generate_latest

            self.channel.send(METRICS, generate_latest(self.metrics.registry))

    def _send_health(self) -> None:
        changes = self.tracker.health_changes
        if not changes:
            return
        for (host, port), value in changes:
            self.channel.send_json(HEALTH, [host.hex(), port, *(value if value is not None else (0, 0.0))])
        changes.clear()

    def _on_channel(self) -> None:
        try:
            for kind, payload in self.channel.receive():
                if kind == RELOAD:
                    self._reload_from(json.loads(payload))
                elif kind == QUIC_CID:
                    if self.tracker.udp is not None:
                        self.tracker.udp.learn_remote(json.loads(payload))
                elif kind == AGENTS:
                    self._agents_changed(*parse_agents_message(json.loads(payload)))
                elif kind == HEALTH:
                    host, port, fails, until = json.loads(payload)
                    key = (bytes.fromhex(host), port)
                    if fails:
                        self.tracker.health[key] = (fails, until)
                    else:
                        self.tracker.health.pop(key, None)
        except EOFError:
            # The supervisor is gone (its death also sends SIGKILL): stop at once, as it did.
            os._exit(EXIT_START_FAILED)

    def _reload_from(self, message: dict[str, Any]) -> None:
        try:
            ok = self._apply(parse_config(message["text"], message["source"]))
        except (ConfigError, DaemonError) as exc:
            log.error("worker %d: reload refused: %s", self.setup.index, exc)
            ok = False
        if self.metrics is not None:
            self.metrics.reloads.labels("ok" if ok else "failed").inc()
            self.metrics.reload_ok.set(1 if ok else 0)
        self.channel.send_json(RELOADED, {"ok": ok})


def _read_setup(channel: Channel) -> WorkerSetup:
    deadline = time.monotonic() + INIT_TIMEOUT
    while time.monotonic() < deadline:
        select.select([channel.fileno()], [], [], max(deadline - time.monotonic(), 0.0))
        for kind, payload in channel.receive():
            if kind == INIT:
                return WorkerSetup.from_json(payload)
    raise SystemExit("kracauer worker: no set-up message from the supervisor")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m kracauer.worker FD (started by kracauer's supervisor, not by hand)",
              file=sys.stderr)
        return 2
    channel = Channel(socket.socket(fileno=int(argv[0])))
    try:
        setup = _read_setup(channel)
    except EOFError:
        return EXIT_START_FAILED
    _die_with_parent(setup.supervisor)
    from kracauer.cli import LOG_FORMAT, LOG_LEVELS

    logging.basicConfig(stream=sys.stderr, format=LOG_FORMAT.replace("%(name)s", f"%(name)s[{setup.index}]"),
                        level=LOG_LEVELS[setup.log_level])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops the workers
    from kracauer.daemon import _log_directly, _log_through_queue

    listener = _log_through_queue()
    try:
        config = parse_config(setup.text, setup.source)
        worker = Worker(config, setup, channel)
        worker.run()
        return EXIT_SAVE_FAILED if worker.save_failed else EXIT_OK
    except (ConfigError, DaemonError, OSError) as exc:
        log.error("worker %d could not start: %s", setup.index, exc)
        return EXIT_START_FAILED
    finally:
        _log_directly(listener)


if __name__ == "__main__":
    sys.exit(main())
