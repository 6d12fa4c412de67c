#!/usr/bin/env python3
"""kracauer's benchmark: kernel forwarding vs nginx vs kracauer in one netns lab.

One run builds a lab of network namespaces (tests/netlab.py: client, box,
host1), starts on host1 an nginx web server, an upload sink, an iperf3 server
and (for the memory test) a connection holder, and compares four ways from
the client to host1, alternating between them round after round:

    kernel           client → box (IPv4 forwarding, no proxy) → host1 203.0.113.10
    nginx            client → box nginx `stream` 192.0.2.11 → host1 [2001:db8::10]
    kracauer         client → box kracauer 192.0.2.10 (TUN kracauer0, [kernel_path]
                     enabled = true: the BPF program translates established
                     connections)                            → host1 [2001:db8::10]
    kracauer-python  client → box kracauer 192.0.2.12 (TUN kracauer1, [kernel_path]
                     enabled = false: the Python loop translates every packet)
                                                             → host1 [2001:db8::10]

The two kracauer daemons run side by side in the box, each with its own TUN,
service address and translation prefix (64:ff9b:1::/96 and 64:ff9b:1:1::/96,
both routed back to the box by host1), so that one round measures every path
with nothing restarted in between; the idle one costs next to nothing.

Workloads (``--only``): synflood (the SYN rate each proxy absorbs while 99% of
legitimate requests are served, ``syn_flood_part``); bulk (curl downloads and uploads, 1 and 4 streams;
iperf3 -P 1/-P 4, both directions), rate (connections per second with wrk and
``Connection: close``; latency at one connection, new connection per request
and keep-alive) and memory (the proxy's RSS growth with N held connections;
the tracker's own bytes per connection with tracemalloc), and profiles
kracauer with py-spy under the bulk and the rate load. It prints a table of
medians with the ratios kracauer/nginx and kracauer/kernel (medians of the
per-round ratios), writes JSON and draws a PNG chart. docs/benchmarks.md
describes it all.

CPU: during every bulk transfer the bench reads the CPU time of the proxy's
processes (/proc/<pid>/stat) and of the whole machine (/proc/stat: busy and
softirq time). /proc/stat is not per network namespace: it counts the
client, box and host1 together, which is the only honest figure for the
kernel path (its translation runs in softirq context, on whichever process's
core the packet arrives, and is charged to no kracauer process). The report
gives both, as cores and as CPU-seconds per Gbit transferred.

Memory: with the kernel path the flow map lives in kernel memory, not in the
daemon's RSS; the bench reads its size from the daemon's bpf-map descriptors
(/proc/<pid>/fdinfo, `memlock`), with the map sized for the held connections
(``[kernel_path] max_flows``), and adds it to the RSS growth.

nginx runs with ``worker_processes auto`` (one per core) for the bulk, rate
and latency parts. Only the memory part may start more workers: this
container caps descriptors at RLIMIT_NOFILE's hard limit (20 000 per process,
not raisable without CAP_SYS_RESOURCE), and nginx needs two descriptors per
held connection, so 100 000 connections need ~12 workers here
(``nginx_workers_for``); the number used is in the results.

Needs root, iproute2, nginx with the stream module, curl, iperf3, wrk, and
matplotlib for the chart (``scripts/bench`` installs them). Every packet stays
inside the lab's namespaces; every load is bounded in count and time; the lab
is removed at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import linecache
import os
import pathlib
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import netlab  # noqa: E402
from tests.netlab import CLIENT_ADDRESS, HOSTS, PREFIX, Lab, LabError, wait_until  # noqa: E402

AGENTS = REPO / "scripts" / "bench_agents.py"

# Addresses (documentation ranges only, RFC 5737 / RFC 3849).
KRACAUER_ADDR = "192.0.2.10"       # routed into kracauer's TUN (kernel path on)
KRACAUER_PY_ADDR = "192.0.2.12"    # routed into the second kracauer's TUN (kernel path off)
NGINX_ADDR = "192.0.2.11"          # on the box's lo, nginx listens here
HOST_V4 = "203.0.113.10"           # host1's IPv4 address (kernel path only)
BOX_V4_HOSTSIDE = "203.0.113.1"    # the box on the hosts' bridge, IPv4
CLIENT_SOURCES = [CLIENT_ADDRESS] + [f"198.51.100.{i}" for i in range(3, 10)]
HOST = HOSTS["host1"]
NAME = "www.example.com"           # the HTTP Host / TLS name routed to host1
TLS_NAME = "bench.example.org"     # matches the lab certificate's *.example.org

HTTP_PORT, UPLOAD_PORT, TLS_PORT, IPERF_PORT = 80, 81, 443, 5201
HOLD_PORTS = tuple(range(7001, 7009))  # one holder per port, at most 12 500 connections each

PATHS = ("kernel", "nginx", "kracauer", "kracauer-python")
PATH_ADDR = {"kernel": HOST_V4, "nginx": NGINX_ADDR, "kracauer": KRACAUER_ADDR, "kracauer-python": KRACAUER_PY_ADDR}
# The two kracauer paths: TUN, translation prefix, and tests/netlab.py's kernel-path mode.
KRACAUERS = ("kracauer", "kracauer-python")
KRACAUER_TUN = {"kracauer": "kracauer0", "kracauer-python": "kracauer1"}
KRACAUER_PREFIX = {"kracauer": PREFIX, "kracauer-python": "64:ff9b:1:1::/96"}  # RFC 8215 local-use
KERNEL_PATH_MODE = {"kracauer": "on", "kracauer-python": "off"}
# Flow map entries (two per connection) for the bulk and rate parts: what a
# default config gets (2 x 100 000); the memory part sizes the map for its count.
BULK_MAX_FLOWS = 200_000
PROXIES = ("kracauer", "kracauer-python", "nginx")

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
TOOLS = ("ip", "nginx", "curl", "iperf3", "wrk")

MiB = 1 << 20
GiB = 1 << 30

# The SYN flood's spoofed sources (last octets in the client subnet; the bench's own clients use .2-.9).
SYNFLOOD_SOURCES = ("100-176", "177-254")
SYNFLOOD_PATHS = ("kracauer", "kracauer-python", "nginx")
SYNFLOOD_SERVED = 99.0  # % of legitimate requests served (within 5 s) for a level to count as absorbed


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int
    download_size: int          # one stream
    download_size_p4: int       # each of four streams
    iperf_seconds: int
    wrk_seconds: int
    latency_count: int          # new connection per request
    keepalive_seconds: int      # wrk -c1 keep-alive latency
    memory_counts: tuple[int, ...]
    tracker_connections: int
    profile_seconds: int
    # The SYN flood part: seconds per level, and the levels (SYN/s over two senders; 0: unpaced).
    synflood_seconds: float = 5.0
    synflood_rates: tuple[int, ...] = (25_000, 50_000, 100_000, 0)


FULL = Settings(rounds=5, download_size=GiB, download_size_p4=512 * MiB, iperf_seconds=5, wrk_seconds=5,
                latency_count=500, keepalive_seconds=3, memory_counts=(10_000, 100_000),
                tracker_connections=20_000, profile_seconds=5)
QUICK = Settings(rounds=1, download_size=256 * MiB, download_size_p4=64 * MiB, iperf_seconds=2, wrk_seconds=2,
                 latency_count=100, keepalive_seconds=1, memory_counts=(1_000, 5_000),
                 tracker_connections=2_000, profile_seconds=3, synflood_seconds=3.0, synflood_rates=(50_000, 0))

# Workloads: key, phase, label, unit, higher is better.
WORKLOADS = [
    ("download_1", "bulk", "HTTP download, 1 stream", "Gbit/s", True),
    ("download_4", "bulk", "HTTP download, 4 streams", "Gbit/s", True),
    ("upload_1", "bulk", "HTTP upload, 1 stream", "Gbit/s", True),
    ("upload_4", "bulk", "HTTP upload, 4 streams", "Gbit/s", True),
    ("iperf3_up_1", "bulk", "iperf3 client→host -P1", "Gbit/s", True),
    ("iperf3_up_4", "bulk", "iperf3 client→host -P4", "Gbit/s", True),
    ("iperf3_down_1", "bulk", "iperf3 host→client -P1 (-R)", "Gbit/s", True),
    ("iperf3_down_4", "bulk", "iperf3 host→client -P4 (-R)", "Gbit/s", True),
    ("conn_rate", "rate", "connections/s (wrk -c8, Connection: close)", "conn/s", True),
    ("latency_new_p50", "rate", "new-connection request p50", "ms", False),
    ("latency_new_p99", "rate", "new-connection request p99", "ms", False),
    ("latency_keepalive_p50", "rate", "keep-alive request p50 (wrk -c1)", "ms", False),
    ("latency_keepalive_p99", "rate", "keep-alive request p99 (wrk -c1)", "ms", False),
]
WORKLOAD_INFO = {w[0]: w for w in WORKLOADS}


def say(msg: str = "") -> None:
    print(msg, flush=True)


class BenchError(Exception):
    pass


# -- requirements ---------------------------------------------------------------


def missing_requirements(parts: set[str] | None = None) -> list[str]:
    """What this machine lacks to run ``parts`` (bulk, rate, memory); empty when nothing."""
    parts = parts or {"bulk", "rate", "memory"}
    missing = list(netlab.missing_requirements())
    tools = ["ip", "nginx", "curl"]
    if "bulk" in parts:
        tools.append("iperf3")
    if "rate" in parts:
        tools.append("wrk")
    missing += [f"`{t}`" for t in tools if shutil.which(t) is None and f"`{t}`" not in missing]
    if shutil.which("nginx") and not os.path.exists(NGINX_STREAM_MODULE):
        missing.append(f"nginx stream module ({NGINX_STREAM_MODULE}, Debian: libnginx-mod-stream)")
    return missing


# -- configurations ---------------------------------------------------------------


def kracauer_config(path: str = "kracauer") -> str:
    """Listeners equivalent to nginx's: tls and http routed by name, tcp for iperf3 and the holders.

    ``path`` (kracauer or kracauer-python) chooses the TUN, service address
    and prefix; [kernel_path] is added by :meth:`Bench.kracauer_config`.
    """
    addr = PATH_ADDR[path]
    hold = "".join(f'[[listen]]\naddress = "{addr}"\nport = {p}\nprotocol = "tcp"\nhost = "{HOST}"\n\n'
                   for p in HOLD_PORTS)
    return f"""\
[tun]
name = "{KRACAUER_TUN[path]}"
mtu = 1500
offload = true

[translate]
prefix = "{KRACAUER_PREFIX[path]}"

[[listen]]
address = "{addr}"
port = {TLS_PORT}
protocol = "tls"

[[listen]]
address = "{addr}"
port = {HTTP_PORT}
protocol = "http"

[[listen]]
address = "{addr}"
port = {UPLOAD_PORT}
protocol = "http"

[[listen]]
address = "{addr}"
port = {IPERF_PORT}
protocol = "tcp"
host = "{HOST}"

{hold}
# Port: the listener's (80 → 80, 81 → 81, 443 → 443).
[[route]]
name = "{NAME}"
host = "{HOST}"

[[route]]
name = "*.example.org"
host = "{HOST}"

[limits]
# The default (100 000) would refuse the memory test's last connections.
max_connections = 1000000
"""


def nofile_hard_limit() -> int:
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def nginx_workers_for(connections: int) -> int:
    """Workers needed to hold ``connections`` proxied connections (two descriptors each).

    Where the bench cannot raise RLIMIT_NOFILE (a container without
    CAP_SYS_RESOURCE), one worker holds at most about hard-limit/2
    connections; otherwise ``auto`` (one per core) as usual.
    """
    per_worker = max(nofile_hard_limit() - 256, 1024)
    needed = -(-int(2 * connections * 1.15) // per_worker)
    return max(needed, os.cpu_count() or 1)


def nginx_proxy_config(directory: pathlib.Path, workers: int | None = None, worker_connections: int = 4096) -> str:
    """The box's nginx: the stream module only, defaults everywhere else.

    ``workers`` None is ``auto``; ``worker_connections`` is capped by the
    descriptor limit nginx can get.
    """
    hard = nofile_hard_limit()
    worker_connections = min(worker_connections, hard - 128)
    hold = "\n".join(f"    server {{\n        listen {NGINX_ADDR}:{p} reuseport;\n        proxy_pass [{HOST}]:{p};\n    }}"
                     for p in HOLD_PORTS)
    return f"""\
# nginx on the edge box, as users run it today: the stream module, SNI routing
# with ssl_preread for TLS, plain TCP proxies for the other ports.
load_module {NGINX_STREAM_MODULE};
user root;
worker_processes {workers or "auto"};
worker_rlimit_nofile {min(worker_connections + 128, hard)};
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;

events {{
    worker_connections {worker_connections};
}}

stream {{
    map $ssl_preread_server_name $tls_backend {{
        {NAME}             [{HOST}]:{TLS_PORT};
        ~\\.example\\.org$   [{HOST}]:{TLS_PORT};
        default             "";
    }}

    # TLS: route by the ClientHello's server name (what kracauer's tls listener does).
    server {{
        listen {NGINX_ADDR}:{TLS_PORT};
        ssl_preread on;
        proxy_pass $tls_backend;
    }}

    # HTTP ports: the stream module cannot read Host, so one fixed upstream each
    # (kracauer routes these by Host; only www.example.com is used here).
    server {{
        listen {NGINX_ADDR}:{HTTP_PORT};
        proxy_pass [{HOST}]:{HTTP_PORT};
    }}
    server {{
        listen {NGINX_ADDR}:{UPLOAD_PORT};
        proxy_pass [{HOST}]:{UPLOAD_PORT};
    }}

    # iperf3 (kracauer: a tcp listener).
    server {{
        listen {NGINX_ADDR}:{IPERF_PORT};
        proxy_pass [{HOST}]:{IPERF_PORT};
    }}

    # Held connections for the memory test: one listener per holder port on
    # host1 (one box address towards one upstream port has ~28 000 ephemeral
    # ports); reuseport spreads them evenly over the workers.
{hold}
}}
"""


def nginx_host_config(directory: pathlib.Path, cert: pathlib.Path, key: pathlib.Path) -> str:
    """host1's web server: dual-stack, sendfile, no access log."""
    return f"""\
user root;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    client_body_temp_path {directory}/tmp/body;
    proxy_temp_path {directory}/tmp/proxy;
    fastcgi_temp_path {directory}/tmp/fastcgi;
    uwsgi_temp_path {directory}/tmp/uwsgi;
    scgi_temp_path {directory}/tmp/scgi;
    types {{
        text/plain txt;
        application/octet-stream bin;
    }}
    default_type text/plain;
    sendfile on;
    tcp_nopush on;
    access_log off;
    keepalive_requests 1000000;

    server {{
        listen {HTTP_PORT} backlog=4096;
        listen [::]:{HTTP_PORT} backlog=4096;
        listen {TLS_PORT} ssl;
        listen [::]:{TLS_PORT} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        server_name _;
        root {directory}/www;
        index index.txt;
    }}
}}
"""


# -- processes and measurements -----------------------------------------------------


def proc_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def proc_cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def slab_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0


def machine_ticks() -> tuple[int, int]:
    """(non-idle, softirq) CPU time of the whole machine, in clock ticks.

    /proc/stat is not per network namespace: client, box, host1 and
    everything else on the machine are in it.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, (fields[6] if len(fields) > 6 else 0)


def machine_busy_ticks() -> int:
    """Non-idle CPU time of the whole machine (all namespaces share it), in clock ticks."""
    return machine_ticks()[0]


class CpuMeter:
    """CPU time of some processes, and of the whole machine, over an interval; ``cores(duration)``."""

    def __init__(self, pids: Callable[[], list[int]]):
        self.pids = pids
        self.hz = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "CpuMeter":
        self.pid_list = self.pids()
        self.c0 = sum(proc_cpu_ticks(p) for p in self.pid_list)
        self.m0, self.s0 = machine_ticks()
        self.proxy_seconds = self.machine_seconds = self.softirq_seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.proxy_seconds = (sum(proc_cpu_ticks(p) for p in self.pid_list) - self.c0) / self.hz
        m1, s1 = machine_ticks()
        self.machine_seconds = (m1 - self.m0) / self.hz
        self.softirq_seconds = (s1 - self.s0) / self.hz

    def per_gbit(self, bits: float) -> dict[str, float | None]:
        """CPU-seconds per Gbit transferred: the proxy's processes (None: no proxy), the machine, its softirq."""
        gbit = bits / 1e9
        if gbit <= 0:
            return {"proxy": None, "machine": None, "softirq": None}
        return {"proxy": self.proxy_seconds / gbit if self.pid_list else None,
                "machine": self.machine_seconds / gbit, "softirq": self.softirq_seconds / gbit}

    def cores(self, duration: float) -> tuple[float, float]:
        """(proxy, machine) CPU in cores (1.0 = one core busy) over a transfer of ``duration`` s."""
        if duration <= 0:
            return 0.0, 0.0
        return self.proxy_seconds / duration, self.machine_seconds / duration


def bpf_maps(pid: int) -> list[dict]:
    """The BPF maps ``pid`` holds descriptors of, from /proc/<pid>/fdinfo (no bpftool needed).

    Each: fd, map_id, map_type, key_size, value_size, max_entries and
    memlock (bytes the kernel charges for the map; for a preallocated hash
    map, the whole table). A map held by two descriptors counts once.
    """
    out: dict[str, dict] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError):
        return []
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read()
        except OSError:
            continue
        info: dict[str, Any] = {"fd": int(fd)}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            value = value.strip()
            if key in ("map_type", "key_size", "value_size", "max_entries", "memlock", "map_id", "map_flags"):
                try:
                    info[key] = int(value, 0)
                except ValueError:
                    info[key] = value
        if "memlock" in info:
            out.setdefault(str(info.get("map_id", fd)), info)
    return sorted(out.values(), key=lambda m: -m["memlock"])


def flow_map(maps: list[dict], max_flows: int) -> dict | None:
    """The flow map among ``maps``: the one with ``max_entries`` = the configured ``max_flows``
    (its type, hash or LRU hash, is the program's business)."""
    return next((m for m in maps if m.get("max_entries") == max_flows), None)


@dataclasses.dataclass
class Nginx:
    popen: subprocess.Popen
    directory: pathlib.Path

    @property
    def master(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return [self.master] + children_of(self.master)

    def workers(self) -> list[int]:
        return children_of(self.master)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class Bench:
    """The lab plus the bench's own processes; measurements as methods."""

    def __init__(self, settings: Settings, parts: set[str], log: Callable[[str], None] = say):
        self.s = settings
        self.parts = parts
        self.log = log
        self.lab = Lab(hosts=False, log=log)
        self.python = sys.executable
        self.kracauers: dict[str, netlab.Kracauer] = {}
        self.proxy_nginx: Nginx | None = None
        self.host_nginx: Nginx | None = None
        self.files: dict[str, pathlib.Path] = {}

    # -- building --

    def __enter__(self) -> "Bench":
        self.lab.start()
        try:
            self._build()
        except BaseException:
            self.lab.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lab.__exit__(*exc)

    def _ip(self, role: str, *args: str) -> None:
        self.lab._ns_exec(role, "ip", *args)

    def _build(self) -> None:
        lab = self.lab
        d = lab.dir
        # IPv4 between box and host1, for the kernel path.
        self._ip("box", "addr", "add", f"{BOX_V4_HOSTSIDE}/24", "dev", "br0")
        self._ip("host1", "addr", "add", f"{HOST_V4}/24", "dev", "eth0")
        self._ip("host1", "route", "add", "198.51.100.0/24", "via", BOX_V4_HOSTSIDE)
        # The second kracauer's prefix (the lab routes the first one).
        self._ip("host1", "-6", "route", "add", KRACAUER_PREFIX["kracauer-python"], "via", netlab.BOX_HOST_ADDRESS)
        # nginx's service address is local to the box; kracauer's is routed into its TUN.
        self._ip("box", "addr", "add", f"{NGINX_ADDR}/32", "dev", "lo")
        # More client addresses, so that 100 000 connections do not run out of ports.
        for address in CLIENT_SOURCES[1:]:
            self._ip("client", "addr", "add", f"{address}/24", "dev", "eth0")

        lab.ca_cert, certs = netlab._make_certificates(d, ["host1"])
        cert, key = certs["host1"]
        hdir = d / "host1"
        for sub in ("www", "tmp"):
            (hdir / sub).mkdir(parents=True)
        (hdir / "www" / "index.txt").write_text("host1\n")
        # Sparse files: the page cache serves zeros, no disk in the way.
        for name, size in (("big.bin", self.s.download_size), ("part.bin", self.s.download_size_p4)):
            path = hdir / "www" / name
            with open(path, "wb") as f:
                f.truncate(size)
            self.files[name] = path
        conf = hdir / "nginx.conf"
        conf.write_text(nginx_host_config(hdir, cert, key))
        self.host_nginx = self._start_nginx("host1", hdir, conf)
        self.wait_listening("host1", {HTTP_PORT, TLS_PORT})

        self.agent_popen("host1", ["sink", "--ports", str(UPLOAD_PORT), "--max-time", "3600"],
                         d / "sink.log")
        if "bulk" in self.parts:
            self.bg("host1", ["iperf3", "-s", "-p", str(IPERF_PORT)], d / "iperf3.log")
        self.wait_listening("host1", {UPLOAD_PORT} | ({IPERF_PORT} if "bulk" in self.parts else set()))

        self.start_proxy_nginx()
        for path in KRACAUERS:
            self.start_kracauer(path)

    def bg(self, role: str, argv: list[str], log_path: pathlib.Path) -> subprocess.Popen:
        out = open(log_path, "ab")
        try:
            return self.lab.popen(role, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()

    def agent_popen(self, role: str, args: list[str], log_path: pathlib.Path, **kwargs) -> subprocess.Popen:
        if kwargs:
            return self.lab.popen(role, [self.python, str(AGENTS), *args], **kwargs)
        return self.bg(role, [self.python, str(AGENTS), *args], log_path)

    def agent(self, role: str, args: list[str], timeout: float) -> dict:
        proc = self.lab.run(role, [self.python, str(AGENTS), *args], timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise BenchError(f"agent {args[0]} in {role} printed nothing (exit {proc.returncode}):\n{proc.stderr}")
        return json.loads(lines[-1])

    def wait_listening(self, role: str, ports: set[int], timeout: float = 10) -> None:
        want = {str(p) for p in ports}
        wait_until(lambda: want <= self.lab.listening_ports(role), timeout,
                   f"{role} to listen on {sorted(want)}")

    def _start_nginx(self, role: str, directory: pathlib.Path, conf: pathlib.Path) -> Nginx:
        out = open(directory / "nginx.out", "ab")
        try:
            popen = self.lab.popen(role, ["nginx", "-p", str(directory), "-c", str(conf), "-e",
                                          str(directory / "error.log"), "-g", "daemon off;"],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()
        time.sleep(0.05)
        if popen.poll() is not None:
            raise BenchError(f"nginx in {role} exited at once:\n{(directory / 'nginx.out').read_text()}"
                             f"\n{(directory / 'error.log').read_text() if (directory / 'error.log').exists() else ''}")
        return Nginx(popen, directory)

    def start_proxy_nginx(self, workers: int | None = None, worker_connections: int = 4096) -> Nginx:
        if self.proxy_nginx is not None:
            self.proxy_nginx.stop()
        d = self.lab.dir / "box-nginx"
        d.mkdir(exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(nginx_proxy_config(d, workers, worker_connections))
        self.proxy_nginx = self._start_nginx("box", d, conf)
        self.wait_listening("box", {HTTP_PORT, UPLOAD_PORT, TLS_PORT, IPERF_PORT, *HOLD_PORTS})
        want = workers or os.cpu_count() or 1
        wait_until(lambda: len(self.proxy_nginx.workers()) >= want, 10, f"{want} nginx workers")
        return self.proxy_nginx

    def kracauer_config(self, path: str, max_flows: int = BULK_MAX_FLOWS) -> str:
        """kracauer_config(path) with [kernel_path] set explicitly: enabled = true (kracauer) or false (kracauer-python)."""
        text = self.lab.with_kernel_path(kracauer_config(path), KERNEL_PATH_MODE[path])
        # with_kernel_path appends the [kernel_path] table last: its keys can follow.
        return text + f"max_flows = {max_flows}\n"

    def start_kracauer(self, path: str, max_flows: int = BULK_MAX_FLOWS) -> netlab.Kracauer:
        old = self.kracauers.get(path)
        if old is not None and old.running():
            old.stop()
        k = self.lab.start_kracauer(self.kracauer_config(path, max_flows))
        self.kracauers[path] = k
        if KERNEL_PATH_MODE[path] == "on":
            # The TUN and routes are up before the program is loaded: wait for the flow map.
            try:
                wait_until(lambda: not k.running() or flow_map(bpf_maps(k.pid), max_flows), 15,
                           f"{path}'s flow map")
            except LabError:
                pass
            if not k.running() or not flow_map(bpf_maps(k.pid), max_flows):
                raise BenchError(f"{path}: [kernel_path] enabled = true, but the daemon holds no flow map "
                                 f"(running: {k.running()}):\n{k.stderr()[-2000:]}")
        return k

    def proxy_pids(self, path: str) -> list[int]:
        if path in self.kracauers:
            # The supervisor and its workers ([tun] workers, one per core by default).
            pid = self.kracauers[path].pid
            return [pid, *children_of(pid)]
        if path == "nginx":
            return self.proxy_nginx.pids()
        return []

    def check_alive(self) -> None:
        for path, k in self.kracauers.items():
            if not k.running():
                raise BenchError(f"{path} died (exit {k.popen.poll()}):\n{k.stderr()[-3000:]}")
        if self.proxy_nginx.popen.poll() is not None:
            raise BenchError("the box's nginx died:\n" + (self.proxy_nginx.directory / "error.log").read_text()[-3000:])

    # -- checks --

    def check_paths(self) -> None:
        """Every path reaches host1 by HTTP and (proxies) TLS with the right name, before measuring."""
        for path in PATHS:
            addr = PATH_ADDR[path]
            r = self.lab.curl(f"http://{NAME}/", address=addr, max_time=10)
            if r.returncode != 0 or r.stdout.strip() != "host1":
                raise BenchError(f"{path}: http://{NAME}/ via {addr} gave {r.returncode} {r.stdout!r} {r.stderr!r}")
            r = self.lab.curl(f"https://{TLS_NAME}/", address=addr, max_time=10)
            if r.returncode != 0 or r.stdout.strip() != "host1":
                raise BenchError(f"{path}: https://{TLS_NAME}/ via {addr} gave {r.returncode} {r.stdout!r} {r.stderr!r}")
        # Warm the page cache with the big files (first reads of a sparse file fill it).
        for path in self.files.values():
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(4 * MiB)
                while f.readinto(buf):
                    pass

    # -- bulk --

    def curls(self, path: str, parallel: int, upload: bool) -> tuple[float, CpuMeter, float, float]:
        addr = PATH_ADDR[path]
        name = "big.bin" if parallel == 1 else "part.bin"
        port = UPLOAD_PORT if upload else HTTP_PORT
        args = ["curls", "--host", NAME, "--parallel", str(parallel), "--max-time", "120"]
        if upload:
            args += ["--url", f"http://{addr}:{port}/upload", "--upload", str(self.files[name])]
        else:
            args += ["--url", f"http://{addr}:{port}/{name}"]
        with CpuMeter(lambda: self.proxy_pids(path)) as cpu:
            result = self.agent("client", args, timeout=150)
        if result.get("errors"):
            raise BenchError(f"{path} curl {'upload' if upload else 'download'} x{parallel}: {result['errors']}")
        return result["bits_per_second"] / 1e9, cpu, result["seconds"], result["bytes"] * 8

    def iperf(self, path: str, parallel: int, reverse: bool) -> tuple[float, CpuMeter, float, float]:
        argv = ["iperf3", "-c", PATH_ADDR[path], "-p", str(IPERF_PORT), "-t", str(self.s.iperf_seconds),
                "-P", str(parallel), "-J"] + (["-R"] if reverse else [])
        for attempt in range(3):
            with CpuMeter(lambda: self.proxy_pids(path)) as cpu:
                proc = self.lab.run("client", argv, timeout=self.s.iperf_seconds + 30)
            try:
                data = json.loads(proc.stdout)
            except json.JSONDecodeError:
                data = {"error": proc.stdout[-500:] + proc.stderr[-500:]}
            if "error" not in data:
                received = data["end"]["sum_received"]
                return received["bits_per_second"] / 1e9, cpu, received["seconds"], received["bytes"] * 8
            if "busy" not in str(data["error"]) or attempt == 2:
                raise BenchError(f"{path} iperf3 {' '.join(argv[1:])}: {data['error']}")
            time.sleep(1)
        raise AssertionError("unreachable")

    def bulk_once(self, key: str, path: str) -> tuple[float, tuple[float, float], dict, int]:
        """(Gbit/s, (proxy cores, machine cores), CPU-seconds per Gbit (proxy, machine, softirq),
        TCP segments retransmitted in the lab)."""
        before = self.retransmits()
        if key.startswith("download_"):
            rate, cpu, seconds, bits = self.curls(path, int(key[-1]), upload=False)
        elif key.startswith("upload_"):
            rate, cpu, seconds, bits = self.curls(path, int(key[-1]), upload=True)
        elif key.startswith("iperf3_"):
            rate, cpu, seconds, bits = self.iperf(path, int(key[-1]), reverse="down" in key)
        else:
            raise ValueError(key)
        return rate, cpu.cores(seconds), cpu.per_gbit(bits), self.retransmits() - before

    def retransmits(self) -> int:
        """TcpRetransSegs summed over client, box and host1 (/proc/net/snmp is per namespace)."""
        total = 0
        for role in ("client", "box", "host1"):
            text = self.lab.run(role, ["cat", "/proc/net/snmp"], timeout=10).stdout
            rows = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
            if len(rows) == 2 and "RetransSegs" in rows[0]:
                total += int(rows[1][rows[0].index("RetransSegs")])
        return total

    # -- rate and latency --

    def wrk(self, path: str, connections: int, seconds: int, close: bool) -> dict:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Host: {NAME}"]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(f"http://{PATH_ADDR[path]}:{HTTP_PORT}/")
        with CpuMeter(lambda: self.proxy_pids(path)) as cpu:
            proc = self.lab.run("client", argv, timeout=seconds + 30)
        out = parse_wrk(proc.stdout)
        if proc.returncode != 0 or "requests_per_second" not in out:
            raise BenchError(f"{path}: {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        out["cpu"] = cpu.cores(seconds)
        return out

    def syn_flood(self, path: str, rate: float, seconds: float) -> dict:
        """Two raw senders flood ``path``'s HTTP port with spoofed SYNs (``rate`` a second in all, 0:
        as fast as they go) while a legitimate client makes a request on a new connection every 50 ms."""
        addr = PATH_ADDR[path]
        floods = [self.agent_popen("client", ["synflood", "--dst", addr, "--port", str(HTTP_PORT), "--seconds",
                                              str(seconds), "--rate", str(rate / len(SYNFLOOD_SOURCES)),
                                              "--sources", sources, "--seed", str(seed)],
                                   self.lab.dir / "synflood.log", stdout=subprocess.PIPE, text=True)
                  for seed, sources in enumerate(SYNFLOOD_SOURCES, start=1)]
        try:
            time.sleep(0.3)  # the senders build their packets first
            legit = self.agent("client", ["legit", "--target", f"{addr}:{HTTP_PORT}", "--host", NAME, "--seconds",
                                          str(seconds), "--interval", "0.05", "--timeout", "5"],
                               timeout=seconds + 30)
            sent = [json.loads(f.communicate(timeout=seconds + 30)[0].strip().splitlines()[-1]) for f in floods]
        finally:
            for f in floods:
                if f.poll() is None:
                    f.kill()
        return {"offered": rate, "flood_rate": sum(x["rate"] for x in sent), "flood_sent": sum(x["sent"] for x in sent),
                "served_pct": legit["served_pct"], "attempts": legit["attempts"], "p50_ms": legit["p50_ms"],
                "max_ms": legit["max_ms"]}

    def latency_new(self, path: str) -> dict:
        return self.agent("client", ["latency", "--target", f"{PATH_ADDR[path]}:{HTTP_PORT}", "--host", NAME,
                                     "--count", str(self.s.latency_count)], timeout=180)

    # -- memory --

    def hold(self, proxy: str, count: int) -> dict:
        """RSS of ``proxy`` on the box before and with ``count`` established connections (fresh processes).

        The connections are spread over up to eight client processes, client
        addresses and holder ports (at most 12 500 each), so that no process
        needs more than the container's descriptor limit.
        """
        d = self.lab.dir
        k = min(len(HOLD_PORTS), max(1, -(-count // 12_500)))
        shares = [count // k + (1 if i < count % k else 0) for i in range(k)]
        statuses = [d / f"holder-{proxy}-{count}-{HOLD_PORTS[i]}.json" for i in range(k)]
        holders = [self.agent_popen("host1", ["holder", "--ports", str(HOLD_PORTS[i]), "--status", str(statuses[i]),
                                              "--max-conns", str(shares[i] + 500), "--max-time", "900"],
                                    d / "holder.log") for i in range(k)]
        connectors: list[subprocess.Popen] = []

        def holder_open() -> int:
            total = 0
            for st in statuses:
                try:
                    total += json.loads(st.read_text())["open"]
                except (FileNotFoundError, json.JSONDecodeError):
                    pass
            return total

        try:
            wait_until(lambda: all(st.exists() for st in statuses), 10, "the holders on host1")
            if proxy in KRACAUERS:
                # The flow map sized for this count (two entries per connection, a quarter spare):
                # what a box meant to hold this many connections would configure.
                max_flows = max(2 * count * 5 // 4, 1024)
                daemon = self.start_kracauer(proxy, max_flows=max_flows)
                pids = lambda: [daemon.pid, *children_of(daemon.pid)]  # noqa: E731
                workers = 1
            else:
                workers = nginx_workers_for(count)
                self.start_proxy_nginx(workers, nofile_hard_limit())
                pids = self.proxy_nginx.pids
            time.sleep(1.0)
            rss0 = sum(proc_rss_kib(p) for p in pids())
            maps0 = [m for p in pids() for m in bpf_maps(p)]
            slab0 = slab_kib()
            t0 = time.monotonic()
            window = max(256 // k, 16)
            for i in range(k):
                connectors.append(self.agent_popen(
                    "client", ["connect", "--target", f"{PATH_ADDR[proxy]}:{HOLD_PORTS[i]}",
                               "--sources", CLIENT_SOURCES[i], "--count", str(shares[i]), "--window", str(window),
                               "--timeout", str(60 + count / 500), "--max-time", str(300 + count / 200),
                               # Resets at about 5000/s in all, so the proxy keeps up.
                               "--close-batch", str(max(100 // k, 10)), "--close-pause", "0.02"],
                    d / "connect.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True))
            results = []
            for c in connectors:
                result: dict[str, Any] = {}
                for line in c.stdout:
                    msg = json.loads(line)
                    if "progress" not in msg:
                        result = msg
                        break
                results.append(result)
            seconds = time.monotonic() - t0
            bad = [r for r in results if "established" not in r]
            if bad:
                raise BenchError(f"{proxy}: connector failed: {bad}")
            established = sum(r["established"] for r in results)
            time.sleep(1.0)
            rss1 = sum(proc_rss_kib(p) for p in pids())
            maps1 = [m for p in pids() for m in bpf_maps(p)]
            slab1 = slab_kib()
            map_bytes = sum(m["memlock"] for m in maps1)
            flows = flow_map(maps1, max_flows) if proxy in KRACAUERS else None
            # All told: what the proxy's own memory grew by, plus the BPF maps (kernel memory, not in
            # RSS, allocated whole when the daemon starts: it is there for these connections).
            total_bytes = (rss1 - rss0) * 1024 + map_bytes
            out = {
                "connections": established,
                "requested": count,
                "holder_open": holder_open(),
                "failures": sum(r["failures"] for r in results),
                "seconds_to_open": round(seconds, 2),
                "processes": len(pids()),
                "nginx_workers": workers if proxy == "nginx" else None,
                "rss_before_kib": rss0,
                "rss_after_kib": rss1,
                "rss_growth_kib": rss1 - rss0,
                "rss_growth_bytes_per_connection": (rss1 - rss0) * 1024 / max(established, 1),
                "bpf_map_bytes_before": sum(m["memlock"] for m in maps0),
                "bpf_map_bytes": map_bytes,
                "bpf_flow_map": flows,
                "bpf_maps": maps1,
                "total_growth_kib": total_bytes / 1024,
                "total_bytes_per_connection": total_bytes / max(established, 1),
                "machine_slab_growth_kib": slab1 - slab0,
                "box_tcp_sockets": box_tcp_sockets(self.lab),
            }
            if established < count * 0.99:
                raise BenchError(f"{proxy}: only {established} of {count} connections were established ({results})")
        finally:
            t1 = time.monotonic()
            for c in connectors:
                try:
                    if c.poll() is None:
                        c.stdin.write("close\n")
                        c.stdin.flush()
                except OSError:
                    pass
            for c in connectors:
                try:
                    c.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    c.kill()
            try:
                wait_until(lambda: holder_open() == 0, 30, "the holders' connections to close")
            except LabError:
                self.log(f"   note: {holder_open()} held connections were still open after 30s")
            for h in holders:
                h.terminate()
            for h in holders:
                try:
                    h.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    h.kill()
            self.log(f"   closed in {time.monotonic() - t1:.1f}s")
        return out


def box_tcp_sockets(lab: Lab) -> int:
    """TCP sockets in use in the box's namespace (/proc/net/sockstat, IPv4 + IPv6)."""
    total = 0
    for name in ("sockstat", "sockstat6"):
        proc = lab.run("box", ["cat", f"/proc/net/{name}"], timeout=10)
        m = re.search(r"^TCP6?: inuse (\d+)", proc.stdout, re.M)
        if m:
            total += int(m.group(1))
    return total


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(text: str) -> dict:
    out: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["requests_per_second"] = float(m.group(1))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        if m:
            out[f"p{pct}_ms"] = float(m.group(1)) * _WRK_UNITS[m.group(2)]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(map(int, m.groups())) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    return out


# -- the tracker alone ----------------------------------------------------------------


def tracker_bytes_per_connection(n: int) -> dict:
    """tracemalloc around ``n`` connections driven to ESTABLISHED in an in-process Tracker.

    Each connection goes the way a real one does through an http listener:
    client SYN, handshake ACK, a GET with Host (the route is chosen and the
    host gets a SYN), the host's SYN-ACK (the request is replayed), the host's
    ACK and first response bytes, the client's ACK. Frames carry a vnet header
    (offload on, as the daemon runs) with checksums marked valid.
    """
    import ipaddress
    import random

    from netstack.ip import build_ipv4_header, build_ipv6_header, PROTO_TCP
    from netstack.tcp import ACK, PSH, SYN, build_segment, syn_options, timestamp_option
    from netstack.tracker import ESTABLISHED, Listener, Target, Tracker, TrackerConfig
    from netstack.vnet import F_DATA_VALID, GSO_NONE, VNET_HEADER

    prefix = ipaddress.IPv6Address(PREFIX.split("/")[0]).packed[:12]
    service = ipaddress.IPv4Address(KRACAUER_ADDR).packed
    host = ipaddress.IPv6Address(HOST).packed
    listener = Listener(service, HTTP_PORT, "http")
    target = Target(host, HTTP_PORT, NAME)
    rng = random.Random(7)
    tracker = Tracker(TrackerConfig(prefix=prefix, vnet=True), [listener], lambda lst, d: target,
                      lambda: rng.getrandbits(32))
    vnet = VNET_HEADER.pack(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0)
    request = f"GET / HTTP/1.1\r\nHost: {NAME}\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n".encode()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhost1\n"

    def v4(src: bytes, sport: int, seq: int, ack: int, flags: int, options: bytes = b"", payload: bytes = b""):
        seg = build_segment(sport, HTTP_PORT, seq, ack, flags, 502, options, payload)
        return vnet + build_ipv4_header(src, service, PROTO_TCP, len(seg)) + seg

    def v6(dst: bytes, dport: int, seq: int, ack: int, flags: int, options: bytes = b"", payload: bytes = b""):
        seg = build_segment(HTTP_PORT, dport, seq, ack, flags, 509, options, payload)
        return vnet + build_ipv6_header(host, dst, PROTO_TCP, len(seg)) + seg

    def parse_tcp(frame: bytes, ip_len: int) -> tuple[int, int, int]:
        t = 10 + ip_len
        return (int.from_bytes(frame[t + 4:t + 8], "big"), int.from_bytes(frame[t + 8:t + 12], "big"),
                frame[t + 13])

    def connect(i: int, now: float) -> None:
        src = (0xC6336400 + 2 + (i // 50000)).to_bytes(4, "big")  # 198.51.100.2, .3, ...
        sport = 10000 + i % 50000
        cisn = rng.getrandbits(32)
        ts = 1000 + i
        out = tracker.receive(v4(src, sport, cisn, 0, SYN, syn_options(1460, 7, True, (ts, 0))), now)
        kisn, _, _ = parse_tcp(out[0], 20)
        tracker.receive(v4(src, sport, cisn + 1, kisn + 1, ACK, timestamp_option(ts, 1)), now)
        out = tracker.receive(v4(src, sport, cisn + 1, kisn + 1, ACK | PSH, timestamp_option(ts, 1), request), now)
        _, _, flags = parse_tcp(out[0], 40)
        assert flags & SYN, "no SYN to the host"
        dst6 = prefix + src
        hisn = rng.getrandbits(32)
        out = tracker.receive(v6(dst6, sport, hisn, cisn + 1, SYN | ACK, syn_options(1440, 7, True, (5000, ts))), now)
        req_end = cisn + 1 + len(request)
        tracker.receive(v6(dst6, sport, hisn + 1, req_end, ACK | PSH, timestamp_option(5001, ts), response), now)
        tracker.receive(v4(src, sport, req_end, kisn + 1 + len(response), ACK, timestamp_option(ts + 1, 2)), now)

    # Warm up: first-use allocations (struct caches, interned strings) do not count.
    for i in range(100):
        connect(n + 1000 + i, 0.0)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for i in range(n):
        connect(i, 1.0)
    after, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    established = sum(1 for c in tracker.clients.values() if c.state == ESTABLISHED)
    if established < n:
        raise BenchError(f"tracker: only {established} of {n + 100} connections established; drops {dict(tracker.drops)}")
    top = []
    for stat in snapshot.statistics("lineno")[:10]:
        frame = stat.traceback[0]
        top.append({"where": f"{pathlib.Path(frame.filename).name}:{frame.lineno}",
                    "code": linecache.getline(frame.filename, frame.lineno).strip(),
                    "bytes_per_connection": round(stat.size / n, 1)})
    return {
        "connections": n,
        "bytes_per_connection": (after - before) / n,
        "top_allocations": top,
        "state_file": state_file_timing(tracker),
    }


def state_file_timing(tracker) -> dict:
    """The [state] file for these connections, end to end (scripts/bench_state.py): seconds from the tracker
    to the file on disk (snapshot, encoding, write, fsync) and back to a tracker (read, decoding, restore)."""
    import tempfile

    import bench_state

    with tempfile.TemporaryDirectory(prefix="kracauer-bench-state-") as directory:
        m = bench_state.measure(tracker, 2.0, directory)
    return {"connections": len(tracker.clients), "bytes": m["bytes"], "save_seconds": m["save_seconds"],
            "load_seconds": m["load_seconds"]}


# -- profile -----------------------------------------------------------------------------


def py_spy_path() -> str | None:
    candidate = pathlib.Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def profile_kracauer(bench: Bench, seconds: int, workload: str, path: str = "kracauer") -> dict:
    """Sample kracauer (``path``: kracauer or kracauer-python) with py-spy under load: ``bulk``
    (the big file downloaded in a loop) or ``rate`` (wrk -c8 with Connection: close)."""
    spy = py_spy_path()
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    d = bench.lab.dir
    raw = d / f"profile-{path}-{workload}.txt"
    run_for = seconds + 3
    addr = PATH_ADDR[path]
    if workload == "bulk":
        url = f"http://{addr}:{HTTP_PORT}/big.bin"
        loop = (f"end=$((SECONDS+{run_for})); while [ $SECONDS -lt $end ]; do "
                f"curl -s -o /dev/null --max-time {run_for} -H 'Host: {NAME}' {url}; done")
        argv = ["bash", "-c", loop]
    else:
        argv = ["wrk", "-t1", "-c8", f"-d{run_for}s", "-H", f"Host: {NAME}", "-H", "Connection: close",
                f"http://{addr}:{HTTP_PORT}/"]
    load = bench.lab.popen("client", argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        # With several workers, the first worker (they run the same loop on their share); the
        # supervisor only waits.
        pid = bench.kracauers[path].pid
        pid = next(iter(sorted(children_of(pid))), pid)
        # --native shows the C functions (the TUN syscalls) under the Python ones.
        for extra in (["--native"], []):
            argv = [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "--idle",
                    *extra, "-f", "raw", "-o", str(raw)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
            if proc.returncode == 0 and raw.exists():
                break
    finally:
        load.wait(timeout=2 * seconds + 30)
    if proc.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed ({proc.returncode}): {proc.stderr[-1000:]}"}
    summary = summarize_collapsed(raw.read_text())
    summary["tool"] = "py-spy record --idle -r 200 " + " ".join(extra)
    summary["path"] = path
    return summary


def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)".
    m = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    path = path.replace(str(REPO) + "/", "")
    for marker in ("/netstack/", "/kracauer/"):
        if marker in path:
            path = path[path.index(marker) + 1:]
    return f"{func} ({pathlib.PurePath(path).name if '/' not in path else path})"


def summarize_collapsed(text: str, top: int = 12) -> dict:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    lines = [line.rpartition(" ") for line in text.splitlines()]
    lines = [(stack, int(count)) for stack, _, count in lines if stack and count.isdigit()]
    # Only the packet loop's thread: the access-log and metrics threads mostly wait.
    loop = [(stack, n) for stack, n in lines if re.search(r"(^|;)Daemon\._loop \(", stack)]
    for stack, n in loop or lines:
        # Unresolved native frames ("0x7f... (libc.so.6)") count for the nearest named caller.
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ") and not f.startswith("0x")]
        if not frames:
            continue
        samples += n
        self_counts[frames[-1]] += n
        for f in set(frames):
            total_counts[f] += n
    if not samples:
        return {"error": "py-spy recorded no samples"}
    # Frames on every stack (the module, main, the loop) say nothing.
    total = [(f, c) for f, c in total_counts.most_common() if c < 0.99 * samples][:top]
    return {
        "samples": samples,
        "self": [{"function": f, "percent": round(100 * c / samples, 1)} for f, c in self_counts.most_common(top)],
        "total": [{"function": f, "percent": round(100 * c / samples, 1)} for f, c in total],
    }


# -- the run --------------------------------------------------------------------------------

# Profiles: results key, part, path, what runs.
PROFILES = [
    ("profile", "bulk", "kracauer", "a bulk download"),
    ("profile_python", "bulk", "kracauer-python", "a bulk download"),
    ("profile_rate", "rate", "kracauer", "the connection-rate load"),
    ("profile_rate_python", "rate", "kracauer-python", "the connection-rate load"),
]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run(args: argparse.Namespace) -> dict:
    s = QUICK if args.quick else FULL
    if args.rounds:
        s = dataclasses.replace(s, rounds=args.rounds)
    if args.memory_counts:
        s = dataclasses.replace(s, memory_counts=tuple(int(x) for x in args.memory_counts.split(",")))
    if args.tracker_connections:
        s = dataclasses.replace(s, tracker_connections=args.tracker_connections)
    parts = set(args.only.split(",")) if args.only else {"bulk", "rate", "memory", "synflood"}
    unknown = parts - {"bulk", "rate", "memory", "synflood"}
    if unknown:
        raise SystemExit(f"bench: unknown part(s) {sorted(unknown)}; choose from bulk, rate, memory, synflood")

    results: dict[str, Any] = {
        "meta": machine_info(),
        "settings": dataclasses.asdict(s) | {"parts": sorted(parts), "quick": args.quick},
        "paths": {"kernel": f"client → box IPv4 forwarding → host1 {HOST_V4}",
                  "nginx": f"client → box nginx stream {NGINX_ADDR} (worker_processes auto) → host1 [{HOST}]",
                  "kracauer": f"client → box kracauer {KRACAUER_ADDR} (TUN, offload, [kernel_path] enabled = true) "
                              f"→ host1 [{HOST}]",
                  "kracauer-python": f"client → box kracauer {KRACAUER_PY_ADDR} (TUN, offload, [kernel_path] "
                                     f"enabled = false) → host1 [{HOST}]"},
        "runs": {}, "medians": {}, "proxy_cpu": {}, "machine_cpu": {}, "cpu_per_gbit": {}, "retransmits": {},
    }
    # The figures only mean something on an otherwise idle machine: say how busy it was.
    results["meta"]["busy_cores_before"] = background_load()
    if results["meta"]["busy_cores_before"] > 0.25:
        say(f"== warning: {results['meta']['busy_cores_before']:.2f} cores were busy before the run started "
            "(other processes); the figures will be noisy")
    started = time.monotonic()
    runs: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    cpu: dict[str, dict[str, list[tuple[float, float]]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    per_gbit: dict[str, dict[str, list[dict]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    retrans: dict[str, dict[str, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))

    if "memory" in parts:
        say(f"== tracker: {s.tracker_connections} connections in-process (tracemalloc)")
        results["tracker"] = tracker_bytes_per_connection(s.tracker_connections)
        say(f"   {results['tracker']['bytes_per_connection']:.0f} bytes per established connection")

    with Bench(s, parts) as bench:
        say(bench.lab.describe())
        bench.check_paths()
        say("== every path reaches host1 (HTTP by Host, TLS by SNI)")
        workloads = [w for w in WORKLOADS if w[1] in parts]
        for rnd in range(1, s.rounds + 1 if parts & {"bulk", "rate"} else 1):
            say(f"== round {rnd}/{s.rounds}  ({time.monotonic() - started:.0f}s)")
            # Each round starts with another path, so that none is always first (or last).
            order = PATHS[(rnd - 1) % len(PATHS):] + PATHS[:(rnd - 1) % len(PATHS)]
            if "bulk" in parts:
                for key, *_ in [w for w in workloads if w[1] == "bulk"]:
                    for path in order:
                        value, cores, pg, rtx = bench.bulk_once(key, path)
                        runs[key][path].append(value)
                        cpu[key][path].append(cores)
                        per_gbit[key][path].append(pg)
                        retrans[key][path].append(rtx)
                        bench.check_alive()
                    say(f"   {key:24}" + "".join(f"{p} {runs[key][p][-1]:7.2f}  " for p in PATHS) + "Gbit/s")
            if "rate" in parts:
                for path in order:
                    w = bench.wrk(path, 8, s.wrk_seconds, close=True)
                    if w["socket_errors"] or w["non_2xx"]:
                        say(f"   note: {path} wrk errors {w['socket_errors']}, non-2xx {w['non_2xx']}")
                    runs["conn_rate"][path].append(w["requests_per_second"])
                    cpu["conn_rate"][path].append(w["cpu"])
                    bench.check_alive()
                for path in order:
                    lat = bench.latency_new(path)
                    runs["latency_new_p50"][path].append(lat["p50_ms"])
                    runs["latency_new_p99"][path].append(lat["p99_ms"])
                for path in order:
                    w = bench.wrk(path, 1, s.keepalive_seconds, close=False)
                    runs["latency_keepalive_p50"][path].append(w["p50_ms"])
                    runs["latency_keepalive_p99"][path].append(w["p99_ms"])
                for key in ("conn_rate", "latency_new_p50", "latency_keepalive_p50"):
                    say(f"   {key:24}" + "".join(f"{p} {runs[key][p][-1]:9.3f}  " for p in PATHS)
                        + WORKLOAD_INFO[key][3])
            # Other load on the machine between rounds (measured while the bench idles).
            busy = background_load(1.0)
            results["meta"].setdefault("busy_cores_between_rounds", []).append(busy)
            if busy > 0.25:
                say(f"   warning: {busy:.2f} cores busy with other processes after this round")
        if not args.no_profile:
            for key, part, path, what in PROFILES:
                if part in parts:
                    say(f"== profiling {path} for {s.profile_seconds}s during {what} (py-spy)")
                    results[key] = profile_kracauer(bench, s.profile_seconds, part, path)
                    bench.check_alive()
        if "synflood" in parts:
            results["synflood"] = syn_flood_part(bench, s, started)
        if "memory" in parts:
            results["memory"] = {p: {} for p in PROXIES}
            for count in s.memory_counts:
                for proxy in PROXIES:
                    say(f"== memory: {count} connections through {proxy}  ({time.monotonic() - started:.0f}s)")
                    m = bench.hold(proxy, count)
                    results["memory"][proxy][str(count)] = m
                    maps = (f", BPF maps {m['bpf_map_bytes'] / MiB:.1f} MiB, all told "
                            f"{m['total_bytes_per_connection']:.0f} B/conn" if m["bpf_map_bytes"] else "")
                    say(f"   RSS {m['rss_before_kib'] / 1024:.1f} → {m['rss_after_kib'] / 1024:.1f} MiB "
                        f"(+{m['rss_growth_bytes_per_connection']:.0f} B/conn{maps}), "
                        f"opened in {m['seconds_to_open']:.1f}s, "
                        f"box TCP sockets {m['box_tcp_sockets']}, machine slab +{m['machine_slab_growth_kib'] / 1024:.0f} MiB")

    for key, per_path in runs.items():
        results["runs"][key] = {p: v for p, v in per_path.items()}
        results["medians"][key] = {p: median(v) for p, v in per_path.items()}
    for key, per_path in cpu.items():
        results["proxy_cpu"][key] = {p: median([c[0] for c in v]) for p, v in per_path.items() if p != "kernel"}
        results["machine_cpu"][key] = {p: median([c[1] for c in v]) for p, v in per_path.items()}
    for key, per_path in per_gbit.items():
        results["cpu_per_gbit"][key] = {
            p: {what: median([x[what] for x in v if x[what] is not None]) for what in ("proxy", "machine", "softirq")}
            for p, v in per_path.items()}
    for key, per_path in retrans.items():
        results["retransmits"][key] = {p: median(v) for p, v in per_path.items()}
    results["ratios"] = ratios(results)
    results["targets"] = targets(results)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["busy_cores_after"] = background_load()
    return results


def syn_flood_part(bench: Bench, s: Settings, started: float) -> dict:
    """The SYN rate each proxy absorbs while >= 99% of legitimate requests are served.

    Level by level (s.synflood_rates, the last usually unpaced), each path in
    turn: kracauer with the kernel path (the BPF program answers the SYNs),
    kracauer on the Python path (Python's cookies), nginx (the box kernel's
    own cookies, net.ipv4.tcp_syncookies). A path's figure is the highest
    flood rate the senders reached at a level where it still served
    SYNFLOOD_SERVED% of the legitimate requests within 5 s; if that is the
    unpaced level, the senders were the limit, not the proxy.
    """
    out: dict[str, Any] = {"levels": {p: [] for p in SYNFLOOD_PATHS}, "absorbed": {}, "sender_limited": {}}
    for rate in s.synflood_rates:
        for path in SYNFLOOD_PATHS:
            say(f"== SYN flood {'unpaced' if not rate else f'{rate} SYN/s'} at {path}  "
                f"({time.monotonic() - started:.0f}s)")
            level = bench.syn_flood(path, rate, s.synflood_seconds)
            out["levels"][path].append(level)
            say(f"   flood {level['flood_rate']:.0f} SYN/s, legitimate served {level['served_pct']:.1f}% "
                f"of {level['attempts']} (p50 {fmt(level['p50_ms'], ' ms')}, max {fmt(level['max_ms'], ' ms')})")
            bench.check_alive()
            time.sleep(2)  # neighbour entries and queues of the spoofed sources drain
    for path, levels in out["levels"].items():
        good = [lv for lv in levels if lv["served_pct"] >= SYNFLOOD_SERVED]
        out["absorbed"][path] = max((lv["flood_rate"] for lv in good), default=0.0)
        out["sender_limited"][path] = any(lv["offered"] == 0 for lv in good)
    return out


def background_load(seconds: float = 2.0) -> float:
    """Cores the whole machine kept busy over ``seconds`` while the bench itself idled."""
    hz = os.sysconf("SC_CLK_TCK")
    t0, b0 = time.monotonic(), machine_busy_ticks()
    time.sleep(seconds)
    return round((machine_busy_ticks() - b0) / hz / (time.monotonic() - t0), 2)


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    """Median of the per-round ratios a[i]/b[i].

    The paths of one round are measured seconds apart, so pairing them
    cancels what drifts between rounds (other load on the machine).
    """
    pairs = [x / y for x, y in zip(a, b) if x and y]
    return statistics.median(pairs) if pairs else None


# Ratios reported for every workload: each kracauer path against nginx and the kernel,
# and the kernel path's gain over the Python path.
RATIOS = [(k, other) for k in KRACAUERS for other in ("nginx", "kernel")] + [("kracauer", "kracauer-python")]


def ratios(results: dict) -> dict:
    out = {}
    for key, runs in results["runs"].items():
        out[key] = {f"{a}/{b}": paired_ratio(runs.get(a, []), runs.get(b, [])) for a, b in RATIOS}
    mem = results.get("memory")
    if mem:
        out["memory"] = {}
        for count in mem["nginx"]:
            n = mem["nginx"][count]
            out["memory"][count] = {}
            for k in KRACAUERS:
                if count not in mem.get(k, {}):
                    continue
                m = mem[k][count]
                # RSS alone (as before), and all told: RSS growth plus the BPF maps against nginx's RSS growth.
                out["memory"][count][f"{k}/nginx"] = (m["rss_growth_kib"] / n["rss_growth_kib"]
                                                      if n["rss_growth_kib"] > 0 else None)
                out["memory"][count][f"{k}/nginx all told"] = (m["total_growth_kib"] / n["total_growth_kib"]
                                                               if n["total_growth_kib"] > 0 else None)
    return out


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    out = []
    r = results["ratios"]

    def add(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": met})

    for k in KRACAUERS:
        for key in ("download_1", "upload_1", "iperf3_up_1", "iperf3_down_1"):
            if key in r:
                v = r[key][f"{k}/nginx"]
                add(f"{key}: {k}/nginx", v, ">= 1.0", v is not None and v >= 1.0)
                v = r[key][f"{k}/kernel"]
                add(f"{key}: {k}/kernel", v, ">= 0.5", v is not None and v >= 0.5)
        if "conn_rate" in r:
            v = r["conn_rate"][f"{k}/nginx"]
            add(f"connection rate: {k}/nginx", v, ">= 0.5", v is not None and v >= 0.5)
        for key in ("latency_new_p50", "latency_keepalive_p50"):
            if key in r:
                v = r[key][f"{k}/nginx"]
                add(f"{key}: {k}/nginx", v, "<= 1.0", v is not None and v <= 1.0)
    if "tracker" in results:
        v = results["tracker"]["bytes_per_connection"]
        add("tracker bytes per established connection", v, "<= 1024", v <= 1024)
    if "memory" in r and r["memory"]:
        count = max(r["memory"], key=int)
        for k in KRACAUERS:
            v = r["memory"][count].get(f"{k}/nginx all told")
            add(f"box RSS growth + BPF maps at {int(count)} connections: {k}/nginx", v, "<= 0.25",
                v is not None and v <= 0.25)
    return out


def machine_info() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (p.stdout + p.stderr).strip().splitlines()
        words = text[0].replace("nginx version: ", "").split() if text else ["?"]
        return " ".join(words[:2])

    def git(*argv: str) -> str:
        try:
            p = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return p.stdout.strip() if p.returncode == 0 else ""

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes to the code under test, if any.
        "dirty": bool(git("status", "--porcelain", "--", "kracauer", "netstack")),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": version(["nginx", "-v"]),
        "iperf3": version(["iperf3", "--version"]),
        "wrk": version(["wrk", "--version"]),
        "curl": version(["curl", "--version"]),
    }


# -- output ----------------------------------------------------------------------------------


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v:.3f}"
    if unit == "conn/s":
        return f"{v:,.0f}"
    return f"{v:.2f}"


SHORT = {"kernel": "kernel", "nginx": "nginx", "kracauer": "kracauer", "kracauer-python": "kr-python"}
RATIO_SHORT = {"kracauer/nginx": "k/nginx", "kracauer/kernel": "k/kernel", "kracauer-python/nginx": "py/nginx",
               "kracauer-python/kernel": "py/kernel", "kracauer/kracauer-python": "k/py"}
RATIO_KEYS = [f"{a}/{b}" for a, b in RATIOS]


def _memory_rows(results: dict):
    """(count, proxy, measurement, ratio all told vs nginx) for the memory tables."""
    mem = results.get("memory") or {}
    counts = list(mem.get("nginx", {}))
    for count in counts:
        for proxy in PROXIES:
            if count not in mem.get(proxy, {}):
                continue
            ratio = results["ratios"]["memory"][count].get(f"{proxy}/nginx all told") if proxy != "nginx" else None
            yield count, proxy, mem[proxy][count], ratio


def _fmt_opt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict) -> str:
    lines = []
    head = (f"{'workload':44} {'unit':7} " + " ".join(f"{SHORT[p]:>9}" for p in PATHS) + " "
            + " ".join(f"{RATIO_SHORT[r]:>9}" for r in RATIO_KEYS))
    if results["medians"]:
        lines += [head, "-" * len(head)]
    for key, _, label, unit, _ in WORKLOADS:
        if key not in results["medians"]:
            continue
        m = results["medians"][key]
        r = results["ratios"][key]
        lines.append(f"{label:44} {unit:7} " + " ".join(f"{fmt(m.get(p), unit):>9}" for p in PATHS) + " "
                     + " ".join(f"{fmt(r.get(k)):>9}" for k in RATIO_KEYS))
    if results["medians"]:
        lines.append("k = kracauer ([kernel_path] enabled = true), py = kr-python = kracauer-python (enabled = false); "
                     "ratios: medians of the per-round ratios")
    mem = results.get("memory")
    if mem:
        lines.append("")
        lines.append(f"{'held connections':16} {'proxy':15} {'RSS before':>10} {'RSS with':>10} {'growth':>9} "
                     f"{'B/conn':>7} {'BPF maps':>9} {'all B/conn':>10} {'/nginx':>7} {'box sockets':>11} "
                     f"{'slab+ (all)':>11}")
        for count, proxy, m, ratio in _memory_rows(results):
            lines.append(f"{int(count):>16,} {proxy:15} {m['rss_before_kib'] / 1024:>8.1f}Mi "
                         f"{m['rss_after_kib'] / 1024:>8.1f}Mi {m['rss_growth_kib'] / 1024:>7.1f}Mi "
                         f"{m['rss_growth_bytes_per_connection']:>7.0f} {m['bpf_map_bytes'] / MiB:>7.1f}Mi "
                         f"{m['total_bytes_per_connection']:>10.0f} {fmt(ratio):>7} "
                         f"{m['box_tcp_sockets']:>11,} {m['machine_slab_growth_kib'] / 1024:>9.0f}Mi")
        lines.append("all B/conn: (RSS growth + the BPF maps' memlock, sized for the count) per connection; "
                     "/nginx: the same against nginx's RSS growth")
    if results.get("synflood"):
        lines.append("")
        lines += synflood_lines(results["synflood"])
    if "tracker" in results:
        t = results["tracker"]
        lines.append("")
        lines.append(f"tracker alone: {t['bytes_per_connection']:.0f} bytes per established connection "
                     f"({t['connections']} connections, tracemalloc)")
        if "state_file" in t:
            f = t["state_file"]
            lines.append(f"state file: {f['connections']} connections, {f['bytes'] / f['connections']:.0f} bytes each, "
                         f"saved in {f['save_seconds']:.3f} s, loaded in {f['load_seconds']:.3f} s")
    if results.get("targets"):
        lines.append("")
        lines.append("targets:")
        for t in results["targets"]:
            v = t["value"]
            shown = "-" if v is None else (f"{v:.0f}" if "bytes" in t["target"] else f"{v:.2f}")
            lines.append(f"  {'MET ' if t['met'] else 'MISS'} {t['target']:70} {shown:>8} (goal {t['goal']})")
    cpu = results.get("proxy_cpu")
    if cpu:
        lines.append("")
        lines.append("CPU during the transfers, in cores (proxy process(es) / whole machine):")
        for key, per_path in cpu.items():
            machine = results["machine_cpu"][key]
            shown = "  ".join(f"{SHORT[p]} {_fmt_opt(per_path.get(p))}/{_fmt_opt(machine.get(p))}" for p in PATHS)
            lines.append(f"  {key:16} {shown}")
    per_gbit = results.get("cpu_per_gbit")
    if per_gbit:
        lines.append("")
        lines.append("CPU-seconds per Gbit transferred (proxy process(es) / whole machine, its softirq part):")
        for key, per_path in per_gbit.items():
            shown = "  ".join(f"{SHORT[p]} {_fmt_opt(per_path[p]['proxy'], '.3f')}/"
                              f"{_fmt_opt(per_path[p]['machine'], '.3f')},{_fmt_opt(per_path[p]['softirq'], '.3f')}"
                              for p in PATHS if p in per_path)
            lines.append(f"  {key:16} {shown}")
    if results.get("retransmits"):
        lines.append("")
        lines.append("TCP segments retransmitted in the lab per transfer (median):")
        for key, per_path in results["retransmits"].items():
            lines.append(f"  {key:16} " + "  ".join(f"{SHORT[p]} {per_path[p]:>6.0f}" for p in PATHS if p in per_path))
    for key, _, path, what in PROFILES:
        prof = results.get(key)
        if prof and "self" in prof:
            lines.append("")
            lines.append(f"{path} profile during {what} ({prof['tool']}, {prof['samples']} samples):")
            lines.append("  inclusive                                              self")
            for a, b in zip(prof["total"][:10], prof["self"][:10]):
                lines.append(f"  {a['percent']:5.1f}%  {a['function'][:44]:44}  {b['percent']:5.1f}%  {b['function']}")
        elif prof:
            lines.append(f"profile ({path}, {what}): {prof.get('error')}")
    return "\n".join(lines)


def synflood_lines(sf: dict) -> list[str]:
    """The SYN flood part: every level, then what each path absorbed."""
    lines = [f"SYN flood (two raw senders, spoofed sources; legitimate: a request on a new connection every "
             f"50 ms, served = answered within 5 s):",
             f"  {'path':16} {'offered':>10} {'flood SYN/s':>12} {'served':>8} {'p50 ms':>8} {'max ms':>8}"]
    for path, levels in sf["levels"].items():
        for lv in levels:
            offered = "unpaced" if not lv["offered"] else f"{lv['offered']:,.0f}"
            lines.append(f"  {path:16} {offered:>10} {lv['flood_rate']:>12,.0f} {lv['served_pct']:>7.1f}% "
                         f"{_fmt_opt(lv['p50_ms'], '.1f'):>8} {_fmt_opt(lv['max_ms'], '.0f'):>8}")
    for path, rate in sf["absorbed"].items():
        limited = " (unpaced: the senders were the limit)" if sf["sender_limited"][path] else ""
        lines.append(f"  absorbed with >= {SYNFLOOD_SERVED:.0f}% served: {path:16} {rate:>10,.0f} SYN/s{limited}")
    return lines


def markdown(results: dict) -> str:
    """The results as Markdown tables (for docs/benchmarks.md)."""
    meta = results["meta"]
    commit = f", kracauer at commit {meta.get('commit')}{' (with uncommitted changes)' if meta.get('dirty') else ''}"
    out = [f"Run of {meta['date']}{commit}: {meta['nproc']} cores ({meta['cpu']}), {meta['memory_gib']} GiB, "
           f"Linux {meta['kernel']}, Python {meta['python']}, {meta['nginx']}, {meta['iperf3']}, {meta['wrk']}. "
           f"Medians of {results['settings']['rounds']} rounds; the run took {results['seconds'] / 60:.1f} minutes. "
           f"Background load (cores kept busy by other processes while the bench idled): "
           f"{meta.get('busy_cores_before', '?')} before, {meta.get('busy_cores_between_rounds', '?')} after each "
           f"round, {meta.get('busy_cores_after', '?')} at the end. Ratios are medians of the per-round ratios. "
           f"kracauer: `[kernel_path] enabled = true` (the BPF program translates established connections); "
           f"kracauer-python: `enabled = false` (the Python loop translates every packet); "
           f"nginx: `worker_processes auto`.", ""]
    if results["medians"]:
        out += ["| workload | unit | " + " | ".join(PATHS) + " | " + " | ".join(RATIO_KEYS) + " |",
                "|---|---|" + "---:|" * (len(PATHS) + len(RATIO_KEYS))]
        for key, _, label, unit, _ in WORKLOADS:
            if key in results["medians"]:
                m, r = results["medians"][key], results["ratios"][key]
                cells = [f"**{fmt(m.get(p), unit)}**" if p in KRACAUERS else fmt(m.get(p), unit) for p in PATHS]
                out.append(f"| {label} | {unit} | " + " | ".join(cells) + " | "
                           + " | ".join(fmt(r.get(k)) for k in RATIO_KEYS) + " |")
        out.append("")
    if results.get("proxy_cpu"):
        proxies = [p for p in PATHS if p != "kernel"]
        out += ["CPU during the transfers: in cores (1.0 = one core busy) and in CPU-seconds per Gbit transferred;",
                "the proxy's own processes, and the whole machine (/proc/stat: client, box, host and kernel",
                "together; the kernel path's translation is softirq time charged to no process, so the machine",
                "figure is the one to compare), with its softirq part; and TCP segments retransmitted in the lab",
                "(median per transfer).", "",
                f"| workload | proxy cores: {' / '.join(proxies)} | machine cores: {' / '.join(PATHS)} | "
                f"proxy CPU-s/Gbit: {' / '.join(proxies)} | machine CPU-s/Gbit: {' / '.join(PATHS)} | "
                f"softirq CPU-s/Gbit: {' / '.join(PATHS)} | retransmits: {' / '.join(PATHS)} |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for key, per_path in results["proxy_cpu"].items():
            mc = results["machine_cpu"][key]
            pg = results.get("cpu_per_gbit", {}).get(key)
            rt = results.get("retransmits", {}).get(key)
            rts = " / ".join(f"{rt[p]:.0f}" for p in PATHS if p in rt) if rt else "-"

            def gbit(what: str, paths) -> str:
                return " / ".join(_fmt_opt(pg[p][what], ".3f") for p in paths if p in pg) if pg else "-"
            out.append(f"| {key} | {' / '.join(_fmt_opt(per_path.get(p)) for p in proxies)} | "
                       f"{' / '.join(_fmt_opt(mc.get(p)) for p in PATHS)} | {gbit('proxy', proxies)} | "
                       f"{gbit('machine', PATHS)} | {gbit('softirq', PATHS)} | {rts} |")
        out.append("")
    if results.get("memory"):
        out += ["| held connections | proxy | RSS before | RSS with | RSS growth | RSS per connection | BPF maps "
                "(memlock) | all told per connection | all told /nginx | TCP sockets in the box | "
                "kernel slab growth (whole machine) |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for count, proxy, m, ratio in _memory_rows(results):
            workers = f" ({m['nginx_workers']} workers)" if m.get("nginx_workers") else ""
            out.append(f"| {int(count):,} | {proxy}{workers} | {m['rss_before_kib'] / 1024:.1f} MiB | "
                       f"{m['rss_after_kib'] / 1024:.1f} MiB | {m['rss_growth_kib'] / 1024:.1f} MiB | "
                       f"{m['rss_growth_bytes_per_connection']:,.0f} B | {m['bpf_map_bytes'] / MiB:.1f} MiB | "
                       f"**{m['total_bytes_per_connection']:,.0f} B** | {fmt(ratio)} | "
                       f"{m['box_tcp_sockets']:,} | {m['machine_slab_growth_kib'] / 1024:,.0f} MiB |")
        out += ["", "All told: the proxy's RSS growth plus its BPF maps (kernel memory, not in RSS; the flow map, "
                "is sized for the count: `max_flows` = 2.5 × connections). "
                "nginx's workers are `auto` unless the descriptor limit needs more.", ""]
    if "tracker" in results:
        t = results["tracker"]
        out += [f"The tracker alone (tracemalloc, {t['connections']:,} connections): "
                f"**{t['bytes_per_connection']:,.0f} bytes per established connection**. Largest allocation sites:", "",
                "| where | code | bytes per connection |", "|---|---|---:|"]
        for a in t["top_allocations"]:
            code = a["code"].replace("|", "\\|")
            out.append(f"| {a['where']} | `{code}` | {a['bytes_per_connection']:.0f} |")
        out.append("")
        if "state_file" in t:
            f = t["state_file"]
            out += [f"The `[state]` file for them: {f['bytes'] / f['connections']:,.0f} bytes per connection, "
                    f"saved in {f['save_seconds']:.3f} s and loaded in {f['load_seconds']:.3f} s "
                    f"(end to end: tracker to file on disk and back, scripts/bench_state.py).", ""]
    if results.get("targets"):
        out += ["| target | measured | goal | |", "|---|---:|---:|---|"]
        for t in results["targets"]:
            v = t["value"]
            shown = "-" if v is None else (f"{v:,.0f} B" if "bytes" in t["target"] else f"{v:.2f}")
            out.append(f"| {t['target']} | {shown} | {t['goal']} | {'met' if t['met'] else '**missed**'} |")
        out.append("")
    for key, _, path, what in PROFILES:
        prof = results.get(key)
        if prof and "self" in prof:
            out += [f"Profile of {path} during {what} ({prof['tool']}, {prof['samples']} samples of the packet "
                    "loop's thread):", "",
                    "| inclusive | function | | self | function |", "|---:|---|---|---:|---|"]
            for a, b in zip(prof["total"][:12], prof["self"][:12]):
                out.append(f"| {a['percent']:.1f}% | `{a['function']}` | | {b['percent']:.1f}% | `{b['function']}` |")
            out.append("")
    if results.get("synflood"):
        out += ["", "```", *synflood_lines(results["synflood"]), "```"]
    return "\n".join(out)


def chart(results: dict, path: pathlib.Path) -> None:
    """Five panels: bulk, connection rate, latency, memory, CPU per Gbit. Bars are medians, whiskers min..max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"kernel": "#9e9e9e", "nginx": "#2e7d32", "kracauer": "#1565c0", "kracauer-python": "#64b5f6"}
    labels_of = {"kernel": "kernel", "nginx": "nginx", "kracauer": "kracauer (kernel path)",
                 "kracauer-python": "kracauer-python (no kernel path)"}
    meta = results["meta"]
    rounds = results["settings"]["rounds"]
    fig, axes = plt.subplots(3, 2, figsize=(15, 13), gridspec_kw={"width_ratios": [2.2, 1]})
    fig.suptitle(f"kracauer benchmark, {meta['date']}: {meta['nproc']} cores {meta['cpu']}, Linux {meta['kernel']}, "
                 f"Python {meta['python']}; median of {rounds} round{'s' if rounds != 1 else ''} (whiskers: min–max)",
                 fontsize=10)

    def bars(ax, keys: list[str], labels: list[str], unit: str, fmt_ratio: str = "{:.2f}×") -> None:
        width = 0.8 / len(PATHS)
        for i, p in enumerate(PATHS):
            values = [results["medians"][k].get(p) or 0 for k in keys]
            runs = [results["runs"][k].get(p) or [0] for k in keys]
            err = [[v - min(r) for v, r in zip(values, runs)], [max(r) - v for v, r in zip(values, runs)]]
            xs = [x + (i - (len(PATHS) - 1) / 2) * width for x in range(len(keys))]
            ax.bar(xs, values, width, label=labels_of[p], color=colors[p], yerr=err, capsize=2,
                   error_kw={"elinewidth": 0.8, "alpha": 0.6})
            if p in KRACAUERS:
                for x, k, v in zip(xs, keys, values):
                    ratio = results["ratios"][k][f"{p}/nginx"]
                    if ratio is not None:
                        ax.annotate(fmt_ratio.format(ratio), (x, v), xytext=(0, 2), textcoords="offset points",
                                    ha="center", va="bottom", fontsize=6, color=colors[p], rotation=90)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlim(-0.6, len(keys) - 0.4)
        ax.set_ylabel(unit)
        ax.margins(y=0.12)  # room for the ratio labels
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)

    med = results["medians"]
    bulk = [k for k in ("download_1", "download_4", "upload_1", "upload_4", "iperf3_up_1", "iperf3_up_4",
                        "iperf3_down_1", "iperf3_down_4") if k in med]
    bulk_labels = [k.replace("iperf3_up", "iperf3 up").replace("iperf3_down", "iperf3 down").replace("_", "\n×")
                   for k in bulk]
    ax = axes[0][0]
    if bulk:
        bars(ax, bulk, bulk_labels, "Gbit/s")
        ax.set_title("bulk throughput (higher is better; blue labels: each kracauer path / nginx)", fontsize=10)
    else:
        ax.set_axis_off()
    ax = axes[0][1]
    if "conn_rate" in med:
        bars(ax, ["conn_rate"], ["wrk -t1 -c8\nConnection: close"], "connections/s")
        ax.set_title("connection rate (higher is better)", fontsize=10)
    else:
        ax.set_axis_off()
    ax = axes[1][0]
    lat = [k for k in ("latency_new_p50", "latency_new_p99", "latency_keepalive_p50", "latency_keepalive_p99")
           if k in med]
    if lat:
        labels = [k.replace("latency_new", "new connection").replace("latency_keepalive", "keep-alive")
                  .replace("_p", "\np") for k in lat]
        bars(ax, lat, labels, "ms")
        ax.set_yscale("log")
        ax.set_title("request latency at one connection (lower is better; log scale)", fontsize=10)
    else:
        ax.set_axis_off()
    ax = axes[1][1]
    mem = results.get("memory")
    if mem:
        counts = list(mem["nginx"])
        proxies = [p for p in PROXIES if p in mem]
        width = 0.8 / len(proxies)
        for i, proxy in enumerate(proxies):
            rss = [mem[proxy][c]["rss_growth_kib"] / 1024 for c in counts]
            maps = [mem[proxy][c]["bpf_map_bytes"] / MiB for c in counts]
            xs = [x + (i - (len(proxies) - 1) / 2) * width for x in range(len(counts))]
            ax.bar(xs, rss, width, label=f"{proxy} RSS growth", color=colors[proxy])
            if any(maps):
                ax.bar(xs, maps, width, bottom=rss, color=colors[proxy], alpha=0.45, hatch="//",
                       label=f"{proxy} BPF maps")
            for x, r, m, c in zip(xs, rss, maps, counts):
                ax.annotate(f"{mem[proxy][c]['total_bytes_per_connection']:.0f} B/conn", (x, r + m),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=6,
                            rotation=90)
        ax.set_xticks(range(len(counts)))
        ax.set_xticklabels([f"{int(c):,}\nconnections" for c in counts], fontsize=8)
        ax.set_ylabel("box memory growth (RSS + BPF maps), MiB")
        ax.margins(y=0.15)  # room for the labels
        title = "memory with held connections (lower is better)"
        if "tracker" in results:
            title += f"\ntracker alone: {results['tracker']['bytes_per_connection']:.0f} B per connection"
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
    ax = axes[2][0]
    pg = results.get("cpu_per_gbit") or {}
    cpu_keys = [k for k in bulk if k in pg]
    if cpu_keys:
        width = 0.8 / len(PATHS)
        for i, p in enumerate(PATHS):
            machine = [(pg[k].get(p) or {}).get("machine") or 0 for k in cpu_keys]
            proxy = [(pg[k].get(p) or {}).get("proxy") or 0 for k in cpu_keys]
            xs = [x + (i - (len(PATHS) - 1) / 2) * width for x in range(len(cpu_keys))]
            ax.bar(xs, machine, width, color=colors[p], alpha=0.45, label=f"{labels_of[p]}: machine")
            if any(proxy):
                ax.bar(xs, proxy, width, color=colors[p], label=f"{p}: its processes")
        ax.set_xticks(range(len(cpu_keys)))
        ax.set_xticklabels([bulk_labels[bulk.index(k)] for k in cpu_keys], fontsize=8)
        ax.set_xlim(-0.6, len(cpu_keys) - 0.4)
        ax.set_ylabel("CPU-seconds per Gbit")
        ax.set_title("CPU per Gbit transferred (lower is better): whole machine (light), proxy processes (solid)",
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    else:
        ax.set_axis_off()
    axes[2][1].set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, small sizes (about two minutes)")
    parser.add_argument("--rounds", type=int, help="rounds of alternating measurements (default 5, quick 1)")
    parser.add_argument("--only", help="comma-separated parts: bulk, rate, memory, synflood (default all); "
                                       "or state alone: the [state] file's timing, no lab (scripts/bench_state.py)")
    parser.add_argument("--out", default="bench-results.json", help="JSON results file (default %(default)s)")
    parser.add_argument("--chart", help="PNG chart (default: the --out path with .png)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    parser.add_argument("--markdown", help="also write the results as Markdown tables to this file")
    parser.add_argument("--no-profile", action="store_true", help="do not profile kracauer (during the bulk and rate parts)")
    parser.add_argument("--memory-counts", help="held connections per memory test, e.g. 10000,100000")
    parser.add_argument("--tracker-connections", type=int, help="connections for the in-process tracker test")
    args = parser.parse_args(argv)
    if args.only == "state":
        import bench_state
        return bench_state.main(["--out", args.out] + (["--rounds", str(args.rounds)] if args.rounds else [])
                                + (["--rounds", "1", "--connections", "20000"] if args.quick else []))

    parts = set(args.only.split(",")) if args.only else None
    missing = missing_requirements(parts)
    if missing:
        print(f"bench: cannot run here, missing: {', '.join(missing)} (scripts/bench installs them)", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    try:
        results = run(args)
    except (BenchError, LabError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    say()
    say(table(results))
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(results, indent=2) + "\n")
    say(f"\nresults: {out}")
    if args.markdown:
        pathlib.Path(args.markdown).write_text(markdown(results) + "\n")
        say(f"markdown: {args.markdown}")
    if not args.no_chart:
        chart_path = pathlib.Path(args.chart) if args.chart else out.with_suffix(".png")
        try:
            chart(results, chart_path)
            say(f"chart: {chart_path}")
        except ImportError:
            say("chart: matplotlib not installed (pip install -e '.[bench]'); skipped")
    say(f"took {results['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
