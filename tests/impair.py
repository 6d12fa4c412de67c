"""An impairment wire for the netns lab: loss, duplication, delay/jitter (reordering), and exact drops.

The kernel here has no netem, so the wire is a small userspace router. It is
spliced into the lab's **box** namespace with policy routing, in front of
kracauer's TUN, without touching the lab's links or addresses::

    client ──cl0──▶ [rule: iif cl0, to service ─▶ table 7101 ─▶ TUN impc0] ─▶ wire process
                                                                                 │ impair (c2k)
    kracauer0 ◀── main table (192.0.2.10/32 dev kracauer0) ◀── written back into impc0

    kracauer0 ─▶ [rule: iif kracauer0 (IPv4) ─▶ table 7101 ─▶ impc0] ─▶ wire ─ impair (k2c) ─▶ impc0 ─▶ main ─▶ cl0
    kracauer0 ─▶ [rule: iif kracauer0 (IPv6) ─▶ table 7102 ─▶ imph0] ─▶ wire ─ impair (k2h) ─▶ imph0 ─▶ main ─▶ br0
    br0 ─▶ [rule: iif br0, to prefix ─▶ table 7102 ─▶ imph0] ─▶ wire ─ impair (h2k) ─▶ imph0 ─▶ main ─▶ kracauer0

Every packet between the client and kracauer crosses the "client side" wire
once and every packet between kracauer and a host crosses the "host side" wire
once. Four directions: ``c2k`` (client to kracauer), ``k2c``, ``k2h`` (kracauer
to host) and ``h2k``. Packets the wire writes back come in on its own TUN, so
no rule matches them again and the main table routes them on.

- The wire's TUNs are opened **without** ``IFF_VNET_HDR`` and without
  offloads, so the kernel segments TCP super-packets (GSO) and completes
  checksums before the wire sees them: loss, duplication and delay apply per
  wire-sized packet, as on a real link. No ethtool needed.
- One process (this file run as a script, in the box namespace) owns both TUNs
  and a scheduler: a heap of (send time, arrival order, packet). Per direction
  a seeded ``random.Random`` decides loss, duplication (the copy gets its own
  delay) and a delay drawn uniformly from ``delay ± jitter`` (clipped at 0),
  which reorders packets whose delays differ by more than their spacing.
- ``spare=N`` leaves each TCP connection's first N packets with payload (and
  its SYNs and SYN-ACKs) alone: random impairment then hits the bulk of a
  transfer but not its handshakes, which test bugs of their own.
- Deterministic :class:`Rule` s come first: drop / duplicate / delay the first
  N packets of a kind (``payload``, ``syn``, ``synack``, ``ack``, ``fin``,
  ``rst``, ``any``) in one direction, optionally only on one TCP port,
  optionally after skipping some, or every match for some seconds after the
  first. Packets a rule acted on get no random impairment.
- The process answers ``stats`` and ``trace`` on stdin with one JSON line each
  (per-direction counters: seen, dropped, duplicated, reordered, rule hits,
  the TUN queues' own drops; and, with ``trace=True``, one record per TCP
  packet: time, direction, flags, ports, seq, ack, payload length, action,
  TSval and TSecr; at most 50 000). A packet counts as ``reordered`` when
  the wire sends it after one that arrived later in the same direction.
  ``quit`` or EOF ends it.

Limits: kracauer's own output is segmented by the kernel before the wire sees
it, and what the wire writes back reaches kracauer one segment per read (no
GRO), so with a wire in place kracauer's offload path only carries its output.
Delays have the resolution of ``epoll`` (1 ms). One Python process moves some
tens of thousands of packets a second: plenty for the ~5 MB/s that TCP gets
through 2% loss, not a line-rate tool. The wire lives in the box namespace
rather than in a namespace of its own so the lab's links and addresses stay
exactly as tests/netlab.py made them.

:class:`Wire` is the context manager: it starts the process, configures the
TUNs (up, MTU, a long queue), the tables and the rules, and on exit removes
the rules and tables and stops the process (its TUNs vanish with its file
descriptors). A wire can be entered before or after kracauer starts (a rule on
``iif kracauer0`` waits, detached, for the device). The lab's teardown kills
anything left in its namespaces anyway.

Example::

    with Wire(lab, client=Impairment(loss=0.02, dup=0.01, delay=0.010, jitter=0.010),
              host=Impairment(loss=0.02, dup=0.01, delay=0.010, jitter=0.010), seed=7) as wire:
        lab.curl("https://www.example.com/big.bin", ...)
        print(wire.stats())

    with Wire(lab, rules=[Rule("h2k", "synack")], trace=True) as wire:   # lose the host's first SYN-ACK
        ...
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
import json
import os
import random
import select
import struct
import subprocess
import sys
import time
from typing import Any, Sequence

DIRECTIONS = ("c2k", "k2c", "k2h", "h2k")
CLIENT_SIDE = ("c2k", "k2c")
HOST_SIDE = ("k2h", "h2k")
MATCHES = ("any", "tcp", "payload", "syn", "synack", "ack", "fin", "rst")
ACTIONS = ("drop", "dup", "delay")

CLIENT_TUN = "impc0"
HOST_TUN = "imph0"
CLIENT_TABLE = 7101
HOST_TABLE = 7102
RULE_PREF = 100

# TCP flags
_FIN, _SYN, _RST, _PSH, _ACK = 0x01, 0x02, 0x04, 0x08, 0x10

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

# Bounds, so a runaway test cannot eat the machine.
MAX_QUEUED = 200_000  # packets waiting in the scheduler
MAX_TRACE = 50_000  # trace records kept
MAX_FLOWS = 100_000  # connections remembered for ``spare``


@dataclasses.dataclass(frozen=True)
class Impairment:
    """Random impairment of one direction: loss and duplication probabilities, delay ± jitter (seconds)."""

    loss: float = 0.0
    dup: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.loss < 1 and 0 <= self.dup < 1 and self.delay >= 0 and self.jitter >= 0):
            raise ValueError(f"bad impairment {self}")

    @property
    def active(self) -> bool:
        return bool(self.loss or self.dup or self.delay or self.jitter)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A deterministic action on chosen packets of one direction.

    ``match`` picks TCP packets: ``payload`` (carries data), ``syn`` (SYN
    without ACK), ``synack``, ``ack`` (pure ACK: no data, SYN, FIN or RST),
    ``fin``, ``rst``, ``tcp`` (any TCP) or ``any`` (any packet). ``port``
    narrows to packets with that TCP source or destination port. The rule
    leaves the first ``skip`` matches alone, then acts on the next ``count``
    (0: no limit). With ``seconds`` a ``drop`` rule keeps dropping every match
    for that long after its first hit (``count`` then still caps it unless 0);
    a ``delay`` rule holds its packets ``seconds`` longer; ``dup`` sends one
    extra copy.
    """

    direction: str
    match: str
    action: str = "drop"
    count: int = 1
    skip: int = 0
    seconds: float = 0.0
    port: int | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {MATCHES}, got {self.match!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")
        if self.count < 0 or self.skip < 0 or self.seconds < 0:
            raise ValueError(f"bad rule {self}")


class WireError(RuntimeError):
    """The wire could not be set up or its process misbehaved."""


class Wire:
    """Impairment on the client side and/or the host side of kracauer, in a lab's box namespace.

    ``client`` / ``host`` set both directions of a side; ``c2k``, ``k2c``,
    ``k2h``, ``h2k`` set one direction (and win over the side's setting).
    A side is spliced in when one of its directions has an impairment or a
    rule. ``spare``: leave each connection's first ``spare`` packets with
    payload (and its SYNs) unimpaired by the random part. ``listen``: the
    service addresses whose client traffic goes through the client side;
    ``tun``: kracauer's TUN device.
    """

    def __init__(self, lab, *, client: Impairment | None = None, host: Impairment | None = None,
                 c2k: Impairment | None = None, k2c: Impairment | None = None,
                 k2h: Impairment | None = None, h2k: Impairment | None = None,
                 rules: Sequence[Rule] = (), seed: int = 1, trace: bool = False, spare: int = 0,
                 tun: str = "kracauer0", listen: Sequence[str] | None = None,
                 client_net: str | None = None, prefix: str | None = None,
                 client_dev: str = "cl0", host_dev: str = "br0", txqueuelen: int = 10000):
        from tests import netlab  # the worker process must not need the repo on sys.path

        self.lab = lab
        self.ns = lab.ns("box")
        self.tun = tun
        self.listen = list(listen or [netlab.SERVICE_ADDRESS])
        self.client_net = client_net or str(ipaddress.IPv4Network(f"{netlab.CLIENT_ADDRESS}/24", strict=False))
        self.prefix = prefix or netlab.PREFIX
        self.client_dev, self.host_dev = client_dev, host_dev
        self.txqueuelen = txqueuelen
        self.seed = seed
        self.trace_enabled = trace
        self.spare = spare
        self.rules = list(rules)
        profiles = {d: Impairment() for d in DIRECTIONS}
        for side, directions in ((client, CLIENT_SIDE), (host, HOST_SIDE)):
            if side is not None:
                for d in directions:
                    profiles[d] = side
        for d, p in (("c2k", c2k), ("k2c", k2c), ("k2h", k2h), ("h2k", h2k)):
            if p is not None:
                profiles[d] = p
        self.profiles = profiles
        used = {d for d, p in profiles.items() if p.active} | {r.direction for r in self.rules}
        self.client_side = bool(used & set(CLIENT_SIDE))
        self.host_side = bool(used & set(HOST_SIDE))
        self.proc: subprocess.Popen | None = None
        self._rules_added: list[list[str]] = []
        self._tables: list[tuple[str, int]] = []
        self._sysctls: list[tuple[str, str]] = []
        self.final_stats: dict | None = None
        self.final_trace: list | None = None

    # -- life cycle --

    def __enter__(self) -> "Wire":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ip", "-n", self.ns, *args], capture_output=True, text=True, timeout=10)
        if check and proc.returncode != 0:
            raise WireError(f"`ip -n {self.ns} {' '.join(args)}` failed: {proc.stderr.strip()}")
        return proc

    def _sysctl(self, key: str, value: str) -> None:
        get = subprocess.run(["ip", "netns", "exec", self.ns, "sysctl", "-n", key], capture_output=True, text=True,
                             timeout=10)
        if get.returncode == 0:
            self._sysctls.append((key, get.stdout.strip()))
        subprocess.run(["ip", "netns", "exec", self.ns, "sysctl", "-q", "-w", f"{key}={value}"], check=True,
                       capture_output=True, timeout=10)

    def _start(self) -> None:
        if not (self.client_side or self.host_side):
            return
        config = {
            "seed": self.seed,
            "trace": self.trace_enabled,
            "spare": self.spare,
            "client_tun": CLIENT_TUN if self.client_side else None,
            "host_tun": HOST_TUN if self.host_side else None,
            "client_net": self.client_net,
            "prefix": self.prefix,
            "profiles": {d: dataclasses.asdict(p) for d, p in self.profiles.items()},
            "rules": [dataclasses.asdict(r) for r in self.rules],
        }
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        line = self._readline(10)
        if not line.startswith("ready"):
            raise WireError(f"the wire process did not start: {line!r} {self._stderr()}")
        if self.client_side:
            self._splice(CLIENT_TUN, CLIENT_TABLE, "-4",
                         [[ "iif", self.client_dev, "to", f"{a}/32"] for a in self.listen] + [["iif", self.tun]])
            # Packets come back out of the wire's TUN with addresses routed elsewhere.
            self._sysctl(f"net.ipv4.conf.{CLIENT_TUN}.rp_filter", "0")
            self._sysctl("net.ipv4.conf.all.rp_filter", "0")
        if self.host_side:
            self._splice(HOST_TUN, HOST_TABLE, "-6",
                         [["iif", self.host_dev, "to", self.prefix], ["iif", self.tun]])

    def _splice(self, dev: str, table: int, family: str, selectors: list[list[str]]) -> None:
        self._ip("link", "set", dev, "mtu", "1500", "txqueuelen", str(self.txqueuelen), "up")
        self._ip(family, "route", "add", "default", "dev", dev, "table", str(table))
        self._tables.append((family, table))
        for selector in selectors:
            args = [family, "rule", "add", "pref", str(RULE_PREF), *selector, "lookup", str(table)]
            self._ip(*args)
            self._rules_added.append([family, "rule", "del", "pref", str(RULE_PREF), *selector, "lookup", str(table)])

    def close(self) -> None:
        """Unsplice (rules and tables first, so traffic flows directly again), then stop the process."""
        errors = []
        for args in reversed(self._rules_added):
            proc = self._ip(*args, check=False)
            if proc.returncode != 0 and "No such file" not in proc.stderr:
                errors.append(proc.stderr.strip())
        self._rules_added.clear()
        for family, table in self._tables:
            self._ip(family, "route", "flush", "table", str(table), check=False)
        self._tables.clear()
        for key, value in reversed(self._sysctls):
            subprocess.run(["ip", "netns", "exec", self.ns, "sysctl", "-q", "-w", f"{key}={value}"],
                           capture_output=True, timeout=10)
        self._sysctls.clear()
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.final_stats = self._ask("stats")
                    if self.trace_enabled:
                        self.final_trace = self._ask("trace")
                except Exception:  # a dead or stuck worker: kill it below
                    pass
                try:
                    self.proc.stdin.write("quit\n")
                    self.proc.stdin.close()
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            for f in (self.proc.stdout, self.proc.stderr):
                try:
                    f.close()
                except Exception:
                    pass
            self.proc = None
        for dev in (CLIENT_TUN, HOST_TUN):
            if self._ip("link", "show", dev, check=False).returncode == 0:
                errors.append(f"{dev} still exists")
        if errors:
            raise WireError("wire teardown incomplete: " + "; ".join(errors))

    # -- talking to the process --

    def _readline(self, timeout: float) -> str:
        assert self.proc is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise WireError(f"no answer from the wire process within {timeout:g}s; {self._stderr()}")
        return self.proc.stdout.readline()

    def _stderr(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        return f"exit {self.proc.returncode}; stderr: {self.proc.stderr.read()[-2000:]}"

    def _ask(self, command: str) -> Any:
        if self.proc is None:
            raise WireError("the wire is not running")
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self._readline(10)
        if not line:
            raise WireError(f"the wire process ended; {self._stderr()}")
        return json.loads(line)

    def stats(self) -> dict:
        """Counters per direction (seen, dropped, duplicated, delayed, reordered, ...) and per rule."""
        if self.proc is None:
            return self.final_stats or {}
        return self._ask("stats")

    def trace(self) -> list[dict]:
        """One record per TCP packet the wire saw (needs ``trace=True``)."""
        if self.proc is None:
            return self.final_trace or []
        return self._ask("trace")


# ----------------------------------------------------------------------------
# The wire process (stdlib only: it runs as a script inside the box namespace).


def _open_tun(name: str) -> int:
    import fcntl

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def _tcp_info(pkt: bytes) -> tuple[int, int, int, int, int, int] | None:
    """(flags, sport, dport, seq, ack, payload length) of an IPv4/IPv6 TCP packet, or None."""
    if not pkt:
        return None
    version = pkt[0] >> 4
    if version == 4 and len(pkt) >= 20:
        ihl = (pkt[0] & 0x0F) * 4
        if pkt[9] != 6 or len(pkt) < ihl + 20:
            return None
        total = int.from_bytes(pkt[2:4], "big")
        t = ihl
    elif version == 6 and len(pkt) >= 60:
        if pkt[6] != 6:
            return None
        total = 40 + int.from_bytes(pkt[4:6], "big")
        t = 40
    else:
        return None
    sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", pkt, t)
    return flags, sport, dport, seq, ack, max(total - t - (off >> 4) * 4, 0)


def _timestamps(pkt: bytes) -> tuple[int, int] | None:
    """(TSval, TSecr) of a TCP packet's timestamp option, or None."""
    t = (pkt[0] & 0x0F) * 4 if pkt[0] >> 4 == 4 else 40
    end = t + (pkt[t + 12] >> 4) * 4
    i = t + 20
    while i < end:
        kind = pkt[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or pkt[i + 1] < 2:
            break
        if kind == 8 and pkt[i + 1] == 10 and i + 10 <= end:
            return struct.unpack_from("!II", pkt, i + 2)
        i += pkt[i + 1]
    return None


_NO_IMPAIRMENT = {"loss": 0.0, "dup": 0.0, "delay": 0.0, "jitter": 0.0}


def _flow_key(pkt: bytes) -> bytes:
    """The same bytes for both directions of one TCP connection (addresses and ports)."""
    if pkt[0] >> 4 == 4:
        t = (pkt[0] & 0x0F) * 4
        a, b = pkt[12:16] + pkt[t:t + 2], pkt[16:20] + pkt[t + 2:t + 4]
    else:
        a, b = pkt[8:24] + pkt[40:42], pkt[24:40] + pkt[42:44]
    return a + b if a < b else b + a


def _matches(match: str, info) -> bool:
    if match == "any":
        return True
    if info is None:
        return False
    flags, plen = info[0], info[5]
    if match == "tcp":
        return True
    if match == "payload":
        return plen > 0
    if match == "syn":
        return flags & (_SYN | _ACK) == _SYN
    if match == "synack":
        return flags & (_SYN | _ACK) == _SYN | _ACK
    if match == "ack":
        return plen == 0 and flags & (_SYN | _FIN | _RST) == 0 and bool(flags & _ACK)
    if match == "fin":
        return bool(flags & _FIN)
    if match == "rst":
        return bool(flags & _RST)
    return False


def _flag_names(flags: int) -> str:
    return "".join(c for bit, c in ((_SYN, "S"), (_FIN, "F"), (_RST, "R"), (_PSH, "P"), (_ACK, "A")) if flags & bit)


def _worker(config: dict) -> int:
    start = time.monotonic()
    fds: dict[int, str] = {}
    names: dict[int, str] = {}
    client_fd = host_fd = -1
    if config["client_tun"]:
        client_fd = _open_tun(config["client_tun"])
        fds[client_fd], names[client_fd] = "client", config["client_tun"]
    if config["host_tun"]:
        host_fd = _open_tun(config["host_tun"])
        fds[host_fd], names[host_fd] = "host", config["host_tun"]
    client_net = ipaddress.IPv4Network(config["client_net"])
    net_int, net_mask = int(client_net.network_address), int(client_net.netmask)
    prefix12 = ipaddress.IPv6Network(config["prefix"]).network_address.packed[:12]

    profiles = {d: config["profiles"][d] for d in DIRECTIONS}
    rngs = {d: random.Random(f"{config['seed']}:{d}") for d in DIRECTIONS}
    rules = config["rules"]
    for r in rules:
        r["seen"] = r["hits"] = 0
        r["first"] = None
    by_dir = {d: [r for r in rules if r["direction"] == d] for d in DIRECTIONS}
    counters = {d: dict(packets=0, bytes=0, dropped=0, duplicated=0, delayed=0, reordered=0, rule_dropped=0,
                        rule_duplicated=0, rule_delayed=0, spared=0, write_errors=0, overflow=0) for d in DIRECTIONS}
    spare = int(config.get("spare") or 0)
    flows: dict[bytes, int] = {}  # connection -> payload packets seen (for spare)
    arrivals = {d: 0 for d in DIRECTIONS}
    max_sent = {d: -1 for d in DIRECTIONS}
    tracing = bool(config["trace"])
    trace: list = []
    heap: list = []
    order = 0

    def direction(fd: int, pkt: bytes) -> str:
        if fd == client_fd:
            src = int.from_bytes(pkt[12:16], "big") if len(pkt) >= 20 else 0
            return "c2k" if src & net_mask == net_int else "k2c"
        return "h2k" if pkt[24:36] == prefix12 else "k2h"

    def schedule(at: float, fd: int, pkt: bytes, d: str, idx: int) -> None:
        nonlocal order
        if len(heap) >= MAX_QUEUED:
            counters[d]["overflow"] += 1
            return
        order += 1
        heapq.heappush(heap, (at, order, fd, pkt, d, idx))

    def send(fd: int, pkt: bytes, d: str, idx: int) -> None:
        if idx < max_sent[d]:
            counters[d]["reordered"] += 1
        elif idx > max_sent[d]:
            max_sent[d] = idx
        try:
            os.write(fd, pkt)
        except OSError:
            counters[d]["write_errors"] += 1

    def handle(fd: int, pkt: bytes, now: float) -> None:
        d = direction(fd, pkt)
        c = counters[d]
        c["packets"] += 1
        c["bytes"] += len(pkt)
        idx = arrivals[d]
        arrivals[d] += 1
        info = _tcp_info(pkt) if (tracing or by_dir[d] or spare) else None
        action = "pass"
        extra = 0.0
        copies = 1
        ruled = False
        for r in by_dir[d]:
            if not _matches(r["match"], info):
                continue
            if r["port"] is not None and (info is None or r["port"] not in (info[1], info[2])):
                continue
            r["seen"] += 1
            if r["seen"] <= r["skip"]:
                continue
            if r["count"] and r["hits"] >= r["count"]:
                continue
            if r["first"] is not None and r["seconds"] and r["action"] == "drop" and now > r["first"] + r["seconds"]:
                continue
            if r["first"] is None:
                r["first"] = now
            r["hits"] += 1
            ruled = True
            if r["action"] == "drop":
                copies = 0
                c["rule_dropped"] += 1
                action = "rule_drop"
                break
            if r["action"] == "dup":
                copies += 1
                c["rule_duplicated"] += 1
                action = "rule_dup"
            elif r["action"] == "delay":
                extra += r["seconds"]
                c["rule_delayed"] += 1
                action = "rule_delay"
        p = _NO_IMPAIRMENT if ruled else profiles[d]
        rng = rngs[d]
        if spare and not ruled and info is not None:
            key = _flow_key(pkt)
            seen = flows.get(key, 0)
            if seen < spare:
                if info[5]:
                    if len(flows) >= MAX_FLOWS:
                        flows.clear()
                    flows[key] = seen + 1
                c["spared"] += 1
                ruled = True  # no random impairment
                p = _NO_IMPAIRMENT
                action = "spared"
        if not ruled and (p["loss"] or p["dup"]):
            if p["loss"] and rng.random() < p["loss"]:
                copies = 0
                c["dropped"] += 1
                action = "drop"
            elif p["dup"] and rng.random() < p["dup"]:
                copies = 2
                c["duplicated"] += 1
                action = "dup"
        if tracing and info is not None and len(trace) < MAX_TRACE:
            flags, sport, dport, seq, ack, plen = info
            stamps = _timestamps(pkt)
            trace.append(dict(t=round(now - start, 6), dir=d, flags=_flag_names(flags), sport=sport, dport=dport,
                              seq=seq, ack=ack, len=plen, action=action, tsval=stamps[0] if stamps else None,
                              tsecr=stamps[1] if stamps else None))
        for _ in range(copies):
            delay = extra
            if p["delay"] or p["jitter"]:
                delay += max(p["delay"] + (rng.uniform(-p["jitter"], p["jitter"]) if p["jitter"] else 0.0), 0.0)
            if delay > 0:
                c["delayed"] += 1
                schedule(now + delay, fd, pkt, d, idx)
            elif heap:
                # Keep FIFO behind packets already waiting for the same time.
                schedule(now, fd, pkt, d, idx)
            else:
                send(fd, pkt, d, idx)

    def tun_drops() -> dict:
        out = {}
        for fd, name in names.items():
            try:
                with open(f"/sys/class/net/{name}/statistics/tx_dropped") as f:
                    out[name] = int(f.read())
            except OSError:
                out[name] = None
        return out

    def answer(command: str) -> None:
        if command == "stats":
            reply: Any = dict(directions=counters, queued=len(heap), tun_tx_dropped=tun_drops(),
                              rules=[{k: r[k] for k in ("direction", "match", "action", "count", "skip", "seconds",
                                                        "port", "seen", "hits")} for r in rules],
                              uptime=round(time.monotonic() - start, 3))
        elif command == "trace":
            reply = trace
        else:
            reply = {"error": f"unknown command {command!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    poller = select.epoll()
    for fd in fds:
        poller.register(fd, select.EPOLLIN)
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    poller.register(stdin, select.EPOLLIN)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    pending = b""
    read = os.read
    while True:
        timeout = -1.0
        if heap:
            timeout = max(heap[0][0] - time.monotonic(), 0.0)
        for fd, _ in poller.poll(timeout):
            if fd == stdin:
                try:
                    data = read(stdin, 4096)
                except BlockingIOError:
                    continue
                if not data:
                    return 0
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    command = line.decode().strip()
                    if command == "quit":
                        return 0
                    answer(command)
                continue
            now = time.monotonic()
            for _ in range(256):
                try:
                    pkt = read(fd, 65536)
                except BlockingIOError:
                    break
                handle(fd, pkt, now)
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, fd, pkt, d, idx = heapq.heappop(heap)
            send(fd, pkt, d, idx)


if __name__ == "__main__":
    try:
        sys.exit(_worker(json.loads(sys.argv[1])))
    except KeyboardInterrupt:
        sys.exit(0)
