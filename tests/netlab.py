"""A network-namespace lab for kracauer: client, edge box and two IPv6 hosts.

Used by the integration tests, by ``scripts/demo`` and by benchmarks. Needs
root, iproute2 (``ip``, ``ss``), ``sysctl``, nginx (with the ssl module) and
curl/openssl for the clients. Every packet stays inside namespaces the lab
creates; nothing touches the machine's own interfaces.

::

    client ns                 box ns                              host1 ns
    eth0 198.51.100.2/24 ── cl0 198.51.100.1/24                ┌─ eth0 2001:db8::10/64
    default via .1           br0 2001:db8::1/64 ── h1 ─────────┘   nginx :80 :8080 :443 :8443
                             (kracauer0 TUN, made by kracauer)  host2 ns
                                                 └─ h2 ──────── eth0 2001:db8::20/64
                                                                   nginx :80 :8080 :443 :8443

Each host routes ``64:ff9b:1::/96`` via 2001:db8::1 (the box). The box has
IPv4 and IPv6 forwarding on. nginx runs as root with every path (pid, logs,
temp dirs, docroot) inside a per-lab temp dir, serves ``/`` (a page naming the
host) and ``/big.bin`` (random bytes, sha256 in ``lab.big_sha256``) and logs
one JSON line per request with ``$remote_addr``.

Usage::

    with Lab() as lab:
        k = lab.start_kracauer(example_config())
        r = lab.curl("https://www.example.com/")          # from the client ns
        assert r.stdout.strip() == "host1"
        entry = lab.wait_for_log("host1", lambda e: e["request"].startswith("GET / "))
        rc, stderr = k.stop()

Namespaces are named ``kl<pid><letters>-<role>``. A lab removes leftovers of
crashed runs (namespaces and temp dirs whose pid is gone) when it starts;
``python -m tests.netlab cleanup`` does the same by hand.

``python -m tests.netlab demo`` runs the demo (see ``scripts/demo``);
``python -m tests.netlab up [--config FILE]`` builds a lab and waits for Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import ipaddress
import json
import os
import pathlib
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
from typing import Any, Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent

# Addresses of the lab (documentation ranges only: RFC 5737, RFC 3849).
SERVICE_ADDRESS = "192.0.2.10"
CLIENT_ADDRESS = "198.51.100.2"
BOX_CLIENT_ADDRESS = "198.51.100.1"
BOX_HOST_ADDRESS = "2001:db8::1"
HOSTS = {"host1": "2001:db8::10", "host2": "2001:db8::20"}
PREFIX = "64:ff9b:1::/96"
ROLES = ("client", "box", "host1", "host2")

#: Names in the hosts' certificate (subjectAltName).
CERT_NAMES = ("www.example.com", "*.example.org", "example.org", "www.example.net", "app.example.com")
#: Ports every host's nginx listens on.
PLAIN_PORTS = (80, 8080)
TLS_PORTS = (443, 8443)
BIG_FILE_SIZE = 20 * 1024 * 1024

TOOLS = ("ip", "ss", "sysctl", "nginx", "curl", "openssl")

_NAME_RE = re.compile(r"^kl(?P<pid>\d+)(?P<rand>[a-z]+)-(?P<role>[a-z0-9]+)$")
_TMP_RE = re.compile(r"^kracauer-lab-kl(?P<pid>\d+)(?P<rand>[a-z]+)$")


class LabError(Exception):
    """The lab could not be built, or a process in it misbehaved."""


def embed(ipv4: str, prefix: str = PREFIX) -> str:
    """The IPv6 address a host sees for client ``ipv4`` (RFC 6052, /96)."""
    net = ipaddress.IPv6Network(prefix)
    return str(ipaddress.IPv6Address(int(net.network_address) | int(ipaddress.IPv4Address(ipv4))))


def example_config(
    *,
    tun: str = "kracauer0",
    address: str = SERVICE_ADDRESS,
    prefix: str = PREFIX,
    fallback: str | None = None,
    tcp_port: int = 8080,
) -> str:
    """The lab's standard kracauer config.

    - ``tls`` on 443 and ``http`` on 80, routing www.example.com to host1,
      ``*.example.org`` to host2 port 8443 and www.example.net to host2;
    - ``tcp`` on ``tcp_port`` (no peeking), always to host1 on the same port;
    - no fallback unless ``fallback`` names a host address.
    """
    text = f"""\
[tun]
name = "{tun}"
mtu = 1500

[translate]
prefix = "{prefix}"

[[listen]]
address = "{address}"
port = 443
protocol = "tls"

[[listen]]
address = "{address}"
port = 80
protocol = "http"

[[listen]]
address = "{address}"
port = {tcp_port}
protocol = "tcp"
host = "{HOSTS['host1']}"

[[route]]
name = "www.example.com"
host = "{HOSTS['host1']}"

[[route]]
name = "*.example.org"
host = "{HOSTS['host2']}"
port = 8443

[[route]]
name = "www.example.net"
host = "{HOSTS['host2']}"

[limits]
hello_timeout = 10.0
hello_max_bytes = 16384
"""
    if fallback:
        text += f'\n[fallback]\nhost = "{fallback}"\n'
    return text


def missing_requirements() -> list[str]:
    """Why a lab cannot be built here (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    missing += [f"`{tool}`" for tool in TOOLS if shutil.which(tool) is None]
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    return missing


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, detail: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something true; LabError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    interval = 0.01
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            extra = detail() if detail else ""
            raise LabError(f"timed out after {timeout:g}s waiting for {what}" + (f"\n{extra}" if extra else ""))
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_list() -> list[str]:
    proc = _ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _kill_netns_processes(ns: str) -> None:
    """SIGKILL whatever still runs inside lab namespace ``ns`` (processes the lab started)."""
    for _ in range(20):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _delete_netns(ns: str) -> None:
    _kill_netns_processes(ns)
    _ip("netns", "del", ns, check=False)


def cleanup_stale(log: Callable[[str], None] | None = None) -> list[str]:
    """Remove namespaces and temp dirs left by lab runs whose process is gone.

    Only names made by this module (``kl<pid><letters>-<role>``,
    ``kracauer-lab-kl<pid><letters>``) with a dead ``pid`` are touched, so
    labs of parallel runs are left alone. Returns what was removed.
    """
    removed = []
    for ns in _netns_list():
        m = _NAME_RE.match(ns)
        if m and not _pid_alive(int(m["pid"])):
            _delete_netns(ns)
            removed.append(f"netns {ns}")
    tmp = pathlib.Path(tempfile.gettempdir())
    for path in tmp.glob("kracauer-lab-kl*"):
        m = _TMP_RE.match(path.name)
        if m and path.is_dir() and not _pid_alive(int(m["pid"])):
            _unmount_bpffs(path / "bpf")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"dir {path}")
    if log:
        for item in removed:
            log(f"removed stale {item}")
    return removed


# The kernel data path in the lab: KRACAUER_LAB_KERNEL_PATH=on (the default:
# kracauer must load its BPF program), off (the Python path only) or auto.
KERNEL_PATH_MODES = {"on": "true", "off": "false", "auto": '"auto"'}


def lab_kernel_path() -> str:
    mode = os.environ.get("KRACAUER_LAB_KERNEL_PATH", "on")
    if mode not in KERNEL_PATH_MODES:
        raise LabError(f"KRACAUER_LAB_KERNEL_PATH must be one of {', '.join(KERNEL_PATH_MODES)}, got {mode!r}")
    return mode


def lab_workers() -> int | None:
    """KRACAUER_LAB_WORKERS=N: run kracauer with [tun] workers = N where a config does not say (unset: its default)."""
    value = os.environ.get("KRACAUER_LAB_WORKERS")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise LabError(f"KRACAUER_LAB_WORKERS must be a positive integer, got {value!r}")
    return int(value)


def with_workers(config_text: str, workers: int) -> str:
    """``config_text`` with ``[tun] workers = N`` unless it sets workers itself."""
    config = tomllib.loads(config_text)
    if "workers" in config.get("tun", {}):
        return config_text
    if "tun" not in config:
        return config_text + f"\n[tun]\nworkers = {workers}\n"
    return re.sub(r"^\[tun\][ \t]*$", f"[tun]\nworkers = {workers}", config_text, count=1, flags=re.M)


def _mount_bpffs(path: pathlib.Path) -> None:
    """A bpffs for kracauer's pinned maps, mounted in the root mount namespace.

    `ip netns exec` remounts /sys, so /sys/fs/bpf is not there inside the box;
    a mount made here propagates into every `ip netns exec` (they are slaves
    of this namespace), so kracauer processes started one after the other
    share their pins, as on a real box.
    """
    path.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", str(path)], check=True, capture_output=True)


def _unmount_bpffs(path: pathlib.Path) -> None:
    if path.is_dir():
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _default_kracauer_cmd() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "kracauer"
    if script.exists():
        return [str(script)]
    venv_script = REPO / ".venv" / "bin" / "kracauer"
    if venv_script.exists():
        return [str(venv_script)]
    return [sys.executable, "-m", "kracauer"]


# -- certificates -------------------------------------------------------------


def _make_certificates(directory: pathlib.Path, hosts: Sequence[str]) -> tuple[pathlib.Path, dict[str, tuple[pathlib.Path, pathlib.Path]]]:
    """A self-signed lab CA and, per host, a key and a certificate for CERT_NAMES.

    Each host's certificate names the host in its subject (``CN=<host>.lab``)
    so a client can tell which host completed the handshake.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kracauer lab CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    out = {}
    for host in hosts:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kracauer lab"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{host}.lab"),
            ]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in CERT_NAMES]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key_path, cert_path = directory / f"{host}.key", directory / f"{host}.pem"
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        key_path.chmod(0o600)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[host] = (cert_path, key_path)
    return ca_path, out


# -- nginx --------------------------------------------------------------------

_NGINX_CONF = """\
# nginx for lab host {host}; every path is inside {dir}
user root;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log info;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;

    types {{
        text/plain txt;
        application/octet-stream bin;
    }}
    default_type text/plain;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 5;

    # One JSON object per request; $remote_addr is what kracauer is about.
    log_format lab escape=json '{{"remote_addr":"$remote_addr","server_addr":"$server_addr",'
        '"server_port":"$server_port","host":"$host","sni":"$ssl_server_name",'
        '"request":"$request","status":"$status","bytes":"$body_bytes_sent"}}';
    access_log {dir}/access.log lab;

    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;

    server {{
{listen}
        server_name _;
        root {dir}/www;
        index index.txt;
    }}
}}
"""


@dataclasses.dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_paths: tuple[pathlib.Path, ...] = ()


class Kracauer:
    """A kracauer process started by :meth:`Lab.start_kracauer` in the box namespace."""

    def __init__(self, lab: "Lab", popen: subprocess.Popen, config_path: pathlib.Path,
                 stderr_path: pathlib.Path, config: dict | None, role: str = "box"):
        self.lab = lab
        self.role = role  # the namespace it runs in
        self.popen = popen
        self.config_path = config_path
        self.stderr_path = stderr_path
        self.config = config
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def tun(self) -> str | None:
        return (self.config or {}).get("tun", {}).get("name")

    def running(self) -> bool:
        return self.popen.poll() is None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rewrite_config(self, config_text: str) -> None:
        """Replace the config file (for a reload), with the lab's settings added as at the start."""
        self.config_path.write_text(self.lab.lab_config(config_text)[0])

    def log_lines(self) -> list[str]:
        return self.stderr().splitlines()

    def wait(self, timeout: float) -> int | None:
        """Wait for the process to exit by itself; its exit code, or None on timeout."""
        try:
            self.returncode = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, str]:
        """Send ``sig`` (SIGTERM), wait up to ``timeout`` s; (exit code, stderr).

        A process that does not exit in time is killed; its exit code is then
        -9 and a note is appended to the returned stderr.
        """
        note = ""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                note = f"\n[netlab: kracauer did not exit within {timeout:g}s of signal {sig}; killed]\n"
        self.returncode = self.popen.returncode
        return self.returncode, self.stderr() + note

    # Readiness: the TUN is up and every route the config implies is on it.
    def missing_setup(self) -> list[str]:
        """What of the daemon's promised set-up is not (yet) in the box namespace."""
        cfg = self.config or {}
        tun = self.tun
        missing = []
        link = _ip("-n", self.lab.ns(self.role), "-j", "link", "show", "dev", tun, check=False) if tun else None
        if link is None or link.returncode != 0:
            missing.append(f"TUN {tun}")
            return missing
        info = json.loads(link.stdout or "[]")
        if not info or "UP" not in info[0].get("flags", []):
            missing.append(f"TUN {tun} up")
        v4 = {r.get("dst") for r in self.lab.routes(self.role, tun, 4)}
        # A bridge listener is a socket of its own, not routed into the TUN.
        for address in sorted({lst.get("address") for lst in cfg.get("listen", [])
                               if lst.get("address") and lst.get("protocol") != "bridge"}):
            if address not in v4 and f"{address}/32" not in v4:
                missing.append(f"route {address}/32 dev {tun}")
        prefix = cfg.get("translate", {}).get("prefix")
        if prefix:
            v6 = {r.get("dst") for r in self.lab.routes(self.role, tun, 6)}
            if str(ipaddress.IPv6Network(prefix, strict=False)) not in v6:
                missing.append(f"route {prefix} dev {tun}")
        return missing


class Lab:
    """Namespaces client, box, host1, host2 with nginx on the hosts. A context manager.

    ``hosts=False`` builds the namespaces and links only (no certificates,
    nginx or files): enough to start and stop kracauer.
    """

    def __init__(self, *, tag: str | None = None, hosts: bool = True, big_file_size: int = BIG_FILE_SIZE,
                 nginx_workers: int = 1, keep_dir: bool = False, kracauer_cmd: Sequence[str] | None = None,
                 log: Callable[[str], None] | None = None):
        if tag is None:
            tag = f"{os.getpid()}{''.join(random.choices(string.ascii_lowercase, k=4))}"
        if not re.fullmatch(r"\d+[a-z]+", tag):
            raise ValueError("tag must be <pid><lowercase letters> so stale labs can be recognised")
        self.tag = tag
        self.prefix = f"kl{tag}"
        self.namespaces = {role: f"{self.prefix}-{role}" for role in ROLES}
        self.with_hosts = hosts
        self.big_file_size = big_file_size
        self.nginx_workers = nginx_workers
        self.keep_dir = keep_dir
        self.kracauer_cmd = list(kracauer_cmd) if kracauer_cmd else _default_kracauer_cmd()
        self.log = log or (lambda msg: None)
        self.dir: pathlib.Path | None = None
        self.ca_cert: pathlib.Path | None = None
        self.host_certs: dict[str, tuple[pathlib.Path, pathlib.Path]] = {}
        self.big_sha256: str | None = None
        self._procs: list[_Proc] = []
        self._kracauers: list[Kracauer] = []
        self._created: list[str] = []
        self._started = False

    # -- life cycle --

    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except LabError as e:
            if exc_type is None:
                raise
            print(f"netlab: {e}", file=sys.stderr)  # do not hide the exception in flight

    def start(self) -> "Lab":
        missing = missing_requirements()
        if missing:
            raise LabError("cannot build the lab, missing: " + ", ".join(missing))
        if self._started:
            return self
        self._started = True
        cleanup_stale(self.log)
        try:
            self.dir = pathlib.Path(tempfile.gettempdir()) / f"kracauer-lab-{self.prefix}"
            self.dir.mkdir(mode=0o755)
            _mount_bpffs(self.dir / "bpf")
            self._build_network()
            if self.with_hosts:
                self._build_hosts()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process the lab started and delete its namespaces and temp dir."""
        errors = []
        for k in self._kracauers:
            try:
                k.stop(timeout=5)
            except Exception as e:  # keep tearing down
                errors.append(f"kracauer {k.pid}: {e}")
        for proc in self._procs:
            try:
                if proc.popen.poll() is None:
                    proc.popen.terminate()
                    try:
                        proc.popen.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        proc.popen.kill()
                        proc.popen.wait()
            except Exception as e:
                errors.append(f"{proc.name}: {e}")
        for ns in reversed(self._created):
            try:
                _delete_netns(ns)
            except Exception as e:
                errors.append(f"netns {ns}: {e}")
        self._created.clear()
        self._procs.clear()
        self._kracauers.clear()
        if self.dir and self.dir.exists():
            _unmount_bpffs(self.dir / "bpf")
            if not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
        leftover = [ns for ns in _netns_list() if ns.startswith(self.prefix + "-")]
        if leftover:
            errors.append(f"namespaces left: {leftover}")
        if errors:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))

    # -- building --

    def ns(self, role: str) -> str:
        return self.namespaces[role]

    def _ns_exec(self, role: str, *argv: str) -> None:
        proc = subprocess.run(["ip", "netns", "exec", self.ns(role), *argv], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise LabError(f"in {role}: `{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")

    def _build_network(self) -> None:
        c, b, h = self.ns("client"), self.ns("box"), {n: self.ns(n) for n in HOSTS}
        for role in ROLES:
            _ip("netns", "add", self.ns(role))
            self._created.append(self.ns(role))
            _ip("-n", self.ns(role), "link", "set", "lo", "up")
            # No router advertisements, no DAD: addresses usable at once.
            self._ns_exec(role, "sysctl", "-q", "-w",
                          "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0",
                          "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        self._ns_exec("box", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

        # client <-> box, IPv4
        _ip("-n", b, "link", "add", "cl0", "type", "veth", "peer", "name", "eth0", "netns", c)
        _ip("-n", b, "addr", "add", f"{BOX_CLIENT_ADDRESS}/24", "dev", "cl0")
        _ip("-n", b, "link", "set", "cl0", "up")
        _ip("-n", c, "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "eth0")
        _ip("-n", c, "link", "set", "eth0", "up")
        _ip("-n", c, "route", "add", "default", "via", BOX_CLIENT_ADDRESS)

        # box bridge <-> hosts, IPv6
        _ip("-n", b, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0",
            "mcast_snooping", "0")
        _ip("-n", b, "addr", "add", f"{BOX_HOST_ADDRESS}/64", "dev", "br0", "nodad")
        _ip("-n", b, "link", "set", "br0", "up")
        for i, (host, address) in enumerate(HOSTS.items(), start=1):
            port = f"h{i}"
            _ip("-n", b, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h[host])
            _ip("-n", b, "link", "set", port, "master", "br0")
            _ip("-n", b, "link", "set", port, "up")
            _ip("-n", h[host], "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
            _ip("-n", h[host], "link", "set", "eth0", "up")
            _ip("-n", h[host], "-6", "route", "add", PREFIX, "via", BOX_HOST_ADDRESS)

    def _build_hosts(self) -> None:
        assert self.dir is not None
        self.ca_cert, self.host_certs = _make_certificates(self.dir, list(HOSTS))
        big = self.dir / "big.bin"
        digest = hashlib.sha256()
        with big.open("wb") as f:
            remaining = self.big_file_size
            while remaining:
                chunk = os.urandom(min(remaining, 1 << 20))
                digest.update(chunk)
                f.write(chunk)
                remaining -= len(chunk)
        self.big_sha256 = digest.hexdigest()

        for host in HOSTS:
            hdir = self.host_dir(host)
            for sub in ("www", "tmp"):
                (hdir / sub).mkdir(parents=True)
            (hdir / "www" / "index.txt").write_text(f"{host}\n")
            os.link(big, hdir / "www" / "big.bin")
            cert, key = self.host_certs[host]
            listen = "\n".join(
                [f"        listen [::]:{p};" for p in PLAIN_PORTS]
                + [f"        listen [::]:{p} ssl;" for p in TLS_PORTS])
            conf = hdir / "nginx.conf"
            conf.write_text(_NGINX_CONF.format(host=host, dir=hdir, workers=self.nginx_workers,
                                               cert=cert, key=key, listen=listen))
            out = open(hdir / "nginx.out", "wb")
            try:
                popen = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns(host), "nginx", "-p", str(hdir), "-c", str(conf),
                     "-e", str(hdir / "error.log"), "-g", "daemon off;"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            finally:
                out.close()
            self._procs.append(_Proc(f"nginx {host}", popen, (hdir / "nginx.out", hdir / "error.log")))

        ports = {str(p) for p in PLAIN_PORTS + TLS_PORTS}
        for host, proc in zip(HOSTS, self._procs[-len(HOSTS):]):
            def ready(host=host, proc=proc):
                if proc.popen.poll() is not None:
                    raise LabError(f"nginx in {host} exited with {proc.popen.returncode}:\n{self._tail(proc)}")
                return ports <= self.listening_ports(host)
            wait_until(ready, 10, f"nginx in {host} to listen on {sorted(ports)}", lambda proc=proc: self._tail(proc))

    def _tail(self, proc: _Proc, lines: int = 20) -> str:
        out = []
        for path in proc.log_paths:
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    # -- inspection and commands --

    def host_dir(self, host: str) -> pathlib.Path:
        assert self.dir is not None
        return self.dir / host

    def listening_ports(self, role: str) -> set[str]:
        """TCP ports something listens on in namespace ``role`` (from ``ss -ltn``)."""
        proc = subprocess.run(["ip", "netns", "exec", self.ns(role), "ss", "-Hltn"], capture_output=True,
                              text=True, timeout=10)
        ports = set()
        for line in proc.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                ports.add(fields[3].rsplit(":", 1)[-1])
        return ports

    def routes(self, role: str, dev: str | None = None, family: int = 4) -> list[dict]:
        """``ip -j route`` of namespace ``role`` (optionally one device), as dicts."""
        args = ["-n", self.ns(role), "-j", f"-{family}", "route", "show"]
        if dev:
            args += ["dev", dev]
        proc = _ip(*args, check=False)
        if proc.returncode != 0:
            return []
        return json.loads(proc.stdout or "[]")

    def link_exists(self, role: str, dev: str) -> bool:
        return _ip("-n", self.ns(role), "link", "show", "dev", dev, check=False).returncode == 0

    def run(self, role: str, argv: Sequence[str], *, timeout: float = 30, input: str | bytes | None = None,
            check: bool = False, text: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` in namespace ``role``; LabError if it outlives ``timeout`` s."""
        cmd = ["ip", "netns", "exec", self.ns(role), *argv]
        try:
            proc = subprocess.run(cmd, input=input, capture_output=True, text=text, timeout=timeout,
                                  **({"errors": "replace"} if text else {}))
        except subprocess.TimeoutExpired as e:
            raise LabError(f"in {role}: `{' '.join(argv)}` did not finish within {timeout:g}s;"
                           f" output so far: {e.stdout!r} {e.stderr!r}") from None
        if check and proc.returncode != 0:
            raise LabError(f"in {role}: `{' '.join(argv)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, role: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a long-running process in ``role``; the lab stops it at teardown."""
        popen = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *argv], **kwargs)
        self._procs.append(_Proc(f"{role}: {argv[0]}", popen))
        return popen

    def curl(self, url: str, *args: str, address: str = SERVICE_ADDRESS, role: str = "client",
             max_time: float = 15, timeout: float | None = None, text: bool = True) -> subprocess.CompletedProcess:
        """curl ``url`` from ``role`` with the lab CA, the URL's name resolved to ``address``."""
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        argv = ["curl", "-sS", "--max-time", f"{max_time:g}"]
        if self.ca_cert:
            argv += ["--cacert", str(self.ca_cert)]
        host = parsed.hostname or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            resolved = f"[{address}]" if ":" in address else address
            argv += ["--resolve", f"{host}:{port}:{resolved}"]
        return self.run(role, [*argv, *args, url], timeout=timeout or max_time + 10, text=text)

    def access_log(self, host: str) -> list[dict]:
        """The entries of ``host``'s nginx access log (one dict per request, keys as in log_format)."""
        try:
            text = (self.host_dir(host) / "access.log").read_text(errors="replace")
        except FileNotFoundError:
            return []
        entries = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            entry["lab_host"] = host
            entries.append(entry)
        return entries

    def access_log_text(self, host: str) -> str:
        try:
            return (self.host_dir(host) / "access.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, host: str, predicate: Callable[[dict], bool], timeout: float = 5) -> dict:
        """The first entry of ``host``'s access log matching ``predicate`` (polls; LabError on timeout)."""
        def find():
            return next((e for e in self.access_log(host) if predicate(e)), None)
        return wait_until(find, timeout, f"a matching entry in {host}'s access log",
                          lambda: f"{host} access log:\n{self.access_log_text(host)[-3000:]}")

    # -- kracauer --

    def spawn_kracauer(self, config_text: str, *, extra_args: Sequence[str] = (), role: str = "box") -> Kracauer:
        """Write ``config_text`` and start kracauer in the ``role`` namespace (the box); do not wait."""
        assert self.dir is not None, "lab not started"
        n = len(self._kracauers)
        config_path = self.dir / f"kracauer-{n}.toml"
        stderr_path = self.dir / f"kracauer-{n}.stderr"
        config_text, config = self.lab_config(config_text)
        config_path.write_text(config_text)
        err = open(stderr_path, "wb")
        try:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(role), *self.kracauer_cmd, "--config", str(config_path), *extra_args],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=str(REPO))
        finally:
            err.close()
        k = Kracauer(self, popen, config_path, stderr_path, config, role)
        self._kracauers.append(k)
        return k

    def lab_config(self, config_text: str) -> tuple[str, dict | None]:
        """``config_text`` with the lab's settings where it has none: [kernel_path], [tun] workers.

        Also (text, None) for text that is not valid TOML, unchanged.
        """
        try:
            config = tomllib.loads(config_text)
        except tomllib.TOMLDecodeError:
            return config_text, None
        if "kernel_path" not in config:
            config_text = self.with_kernel_path(config_text)
        if lab_workers() is not None:
            config_text = with_workers(config_text, lab_workers())
        return config_text, tomllib.loads(config_text)

    def with_kernel_path(self, config_text: str, mode: str | None = None) -> str:
        """``config_text`` with the lab's [kernel_path] (KRACAUER_LAB_KERNEL_PATH, or ``mode``)."""
        enabled = KERNEL_PATH_MODES[mode or lab_kernel_path()]
        return config_text + f'\n[kernel_path]\nenabled = {enabled}\npin_dir = "{self.dir / "bpf"}"\n'

    def start_kracauer(self, config_text: str, *, timeout: float = 10, extra_args: Sequence[str] = (),
                       role: str = "box") -> Kracauer:
        """Start kracauer and wait until its TUN is up and its routes are in place.

        Raises LabError (with kracauer's stderr) if it exits or is not ready
        within ``timeout`` s; in the latter case it is stopped first.
        """
        k = self.spawn_kracauer(config_text, extra_args=extra_args, role=role)
        if k.config is None:
            k.stop()
            raise LabError(f"the kracauer config is not valid TOML:\n{config_text}")

        def ready():
            if not k.running():
                raise LabError(f"kracauer exited with code {k.popen.returncode} before it was ready"
                               f" ({' '.join(k.popen.args)}); its stderr:\n{k.stderr()}")
            return not k.missing_setup()

        try:
            wait_until(ready, timeout, "kracauer to set up its TUN and routes in the box namespace",
                       lambda: f"still missing: {', '.join(k.missing_setup())}\nkracauer stderr:\n{k.stderr()}")
        except LabError:
            k.stop(timeout=3)
            raise
        return k

    def stop_kracauer(self, k: Kracauer | None = None, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, str]:
        """Stop ``k`` (default: the last one started) with ``sig``; (exit code, stderr)."""
        k = k or self._kracauers[-1]
        return k.stop(sig, timeout)

    def reset_box(self, timeout: float = 10, tun: str = "kracauer0") -> None:
        """After a test: every kracauer stopped and, if one left its TUN (with [state]), that TUN
        removed with `kracauer cleanup`; then checks the box has no TUN of that name."""
        for k in list(self._kracauers):
            k.stop(timeout=timeout)
        if self.link_exists("box", tun) and self._kracauers:
            self.run("box", [*self.kracauer_cmd, "cleanup", "--config", str(self._kracauers[-1].config_path)],
                     timeout=20)
        if self.link_exists("box", tun):
            raise LabError(f"the box still has {tun} after the test")

    def decode(self, address: str) -> str:
        """``kracauer decode ADDRESS`` (run on the host side, no namespace needed)."""
        proc = subprocess.run([*self.kracauer_cmd, "decode", address], capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise LabError(f"`kracauer decode {address}` failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip()

    # -- more namespaces (a NAT and the hosts behind it: tests/integration/test_agents_lab.py) --

    def add_namespace(self, role: str) -> str:
        """A further namespace ``role`` (lo up, no RA, no DAD), removed with the lab."""
        if role in self.namespaces:
            raise LabError(f"the lab already has a namespace {role!r}")
        ns = f"{self.prefix}-{role}"
        _ip("netns", "add", ns)
        self._created.append(ns)
        self.namespaces[role] = ns
        _ip("-n", ns, "link", "set", "lo", "up")
        self._ns_exec(role, "sysctl", "-q", "-w",
                      "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0",
                      "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        return ns

    def start_nginx(self, role: str, cert_host: str = "host1") -> None:
        """nginx in namespace ``role`` as on the lab's hosts (ports, log format, ``/`` naming ``role``,
        ``/big.bin``), with ``cert_host``'s certificate; its files are in ``host_dir(role)``."""
        assert self.dir is not None and self.host_certs, "start the lab with hosts=True first"
        hdir = self.host_dir(role)
        for sub in ("www", "tmp"):
            (hdir / sub).mkdir(parents=True, exist_ok=True)
        (hdir / "www" / "index.txt").write_text(f"{role}\n")
        os.link(self.dir / "big.bin", hdir / "www" / "big.bin")
        cert, key = self.host_certs[cert_host]
        listen = "\n".join([f"        listen [::]:{p};" for p in PLAIN_PORTS]
                           + [f"        listen [::]:{p} ssl;" for p in TLS_PORTS])
        conf = hdir / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(host=role, dir=hdir, workers=self.nginx_workers, cert=cert, key=key,
                                           listen=listen))
        out = open(hdir / "nginx.out", "wb")
        try:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(role), "nginx", "-p", str(hdir), "-c", str(conf),
                 "-e", str(hdir / "error.log"), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()
        proc = _Proc(f"nginx {role}", popen, (hdir / "nginx.out", hdir / "error.log"))
        self._procs.append(proc)
        ports = {str(p) for p in PLAIN_PORTS + TLS_PORTS}

        def ready():
            if popen.poll() is not None:
                raise LabError(f"nginx in {role} exited with {popen.returncode}:\n{self._tail(proc)}")
            return ports <= self.listening_ports(role)
        wait_until(ready, 10, f"nginx in {role} to listen on {sorted(ports)}", lambda: self._tail(proc))

    def describe(self) -> str:
        lines = [f"lab {self.tag}: dir {self.dir}"]
        lines += [f"  {role:6} netns {name}" for role, name in self.namespaces.items()]
        return "\n".join(lines)


# -- demo ---------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    def say(msg: str = "") -> None:
        print(msg, flush=True)

    failures: list[str] = []
    with Lab(log=say) as lab:
        say(lab.describe())
        say(f"  client {CLIENT_ADDRESS} -> service {SERVICE_ADDRESS}; hosts "
            + ", ".join(f"{h} {a}" for h, a in HOSTS.items()) + f"; prefix {PREFIX}")
        say()
        access_log = lab.dir / "access.log"
        metrics_url = "http://127.0.0.1:9477/metrics"
        config = example_config() + f'\n[log]\naccess = "{access_log}"\n\n[metrics]\nlisten = "127.0.0.1:9477"\n'
        k = lab.start_kracauer(config)
        say(f"kracauer running in {lab.ns('box')} (pid {k.pid}), config:")
        say("".join(f"    {line}\n" for line in config.splitlines() if line and not line.startswith("#")))

        cases = [
            ("TLS ", "https://www.example.com/", "host1"),
            ("TLS ", "https://a.example.org/", "host2"),
            ("TLS ", "https://www.example.net/", "host2"),
            ("HTTP", "http://www.example.com/", "host1"),
            ("HTTP", "http://www.example.net/", "host2"),
            ("TCP ", f"http://{SERVICE_ADDRESS}:8080/", "host1"),
            ("TLS ", "https://www.example.com/big.bin", "sha256"),
            ("TLS ", "https://unknown.invalid/", "refused"),
            ("HTTP", "http://unknown.invalid/", "421"),
        ]
        say(f"from the client namespace ({CLIENT_ADDRESS}):")
        connections = 0
        for kind, url, expect in cases:
            connections += 1
            if expect == "sha256":
                out = lab.dir / "download.bin"
                r = lab.curl(url, "-o", str(out), "-w", "%{http_code} %{size_download}", max_time=60)
                ok = r.returncode == 0 and out.exists() and \
                    hashlib.sha256(out.read_bytes()).hexdigest() == lab.big_sha256
                shown = f"{r.stdout.strip()} bytes, sha256 {'matches' if ok else 'DIFFERS'}" if r.returncode == 0 \
                    else r.stderr.strip()
            else:
                r = lab.curl(url, "-w", "\n%{http_code}", max_time=10)
                body, _, code = r.stdout.rpartition("\n")
                if expect == "refused":
                    ok = r.returncode != 0 and "unrecognized name" in r.stderr.lower()
                    shown = "refused: " + r.stderr.strip() if r.returncode else f"{code} {body.strip()!r}"
                elif expect == "421":
                    ok = code == "421"
                    shown = f"{code} Misdirected Request" if ok else (f"{code} {body.strip()[:60]!r}" or r.stderr)
                else:
                    ok = r.returncode == 0 and code == "200" and body.strip() == expect
                    shown = f"{code} {body.strip()!r}" if r.returncode == 0 else r.stderr.strip()
            say(f"  {kind} {url:34} -> {shown}   [{'ok' if ok else 'FAILED, expected ' + expect}]")
            if not ok:
                failures.append(f"{url}: {shown}")

        say()
        decoded: dict[str, str] = {}
        for host in HOSTS:
            say(f"what {host} ({HOSTS[host]}) logged:")
            for e in lab.access_log(host):
                addr = e["remote_addr"]
                if addr not in decoded:
                    try:
                        decoded[addr] = lab.decode(addr)
                    except LabError as err:
                        decoded[addr] = "?"
                        failures.append(str(err))
                say(f"  {addr:22} = {decoded[addr]:15}  port {e['server_port']:5} host {e['host'] or '-':16}"
                    f" \"{e['request']}\" {e['status']}")
        expected = CLIENT_ADDRESS
        wrong = {a: d for a, d in decoded.items() if d != expected}
        if not decoded:
            failures.append("the hosts logged nothing")
        elif wrong:
            failures.append(f"host logs decode to {wrong}, expected {expected}")

        # kracauer logs a connection when it forgets it, a little after the close.
        say()
        say(f"waiting for kracauer to log the {connections} connections...")
        try:
            wait_until(lambda: sum(CLIENT_ADDRESS in line for line in k.log_lines()) >= connections, 20,
                       "kracauer's connection log lines")
        except LabError as e:
            failures.append(str(e))

        # The access log: one JSON object per connection, written when it ends.
        say()
        say(f"kracauer's access log ({access_log}), one JSON object per connection:")
        try:
            wait_until(lambda: access_log.exists() and len(access_log.read_text().splitlines()) >= connections, 10,
                       "the access log")
        except LabError as e:
            failures.append(str(e))
        entries = [json.loads(line) for line in access_log.read_text().splitlines()] if access_log.exists() else []
        for e in entries:
            say(f"  {json.dumps(e)}")
        if len(entries) < connections:
            failures.append(f"the access log has {len(entries)} lines, expected {connections}")

        # The metrics endpoint, and `kracauer status` reading it.
        time.sleep(1.1)  # the loop copies its counters for the metrics once a second
        say()
        scraped = lab.run("box", ["curl", "-sS", "--max-time", "5", metrics_url], timeout=10)
        shown = [line for line in scraped.stdout.splitlines()
                 if line.startswith(("kracauer_connections_opened", "kracauer_connections_closed", "kracauer_bytes",
                                     "kracauer_packets_dropped", "kracauer_connect_seconds_count",
                                     "kracauer_connections_active ", "kracauer_build_info"))]
        say(f"some of kracauer's metrics ({metrics_url}, {len(scraped.stdout.splitlines())} lines in all):")
        for line in shown:
            say(f"  {line}")
        if scraped.returncode != 0 or not any(line.startswith("kracauer_connections_closed_total") for line in shown):
            failures.append(f"no metrics from {metrics_url}: {scraped.stderr.strip()}")
        status = lab.run("box", [*lab.kracauer_cmd, "status", "--metrics", metrics_url], timeout=20)
        say()
        say("kracauer status:")
        for line in (status.stdout or status.stderr).splitlines():
            say(f"  {line}")
        if status.returncode != 0:
            failures.append(f"kracauer status exited with {status.returncode}")

        rc, stderr = k.stop()
        say()
        say(f"kracauer's log (stopped with SIGTERM, exit code {rc}):")
        for line in stderr.splitlines():
            say(f"  {line}")
        if rc != 0:
            failures.append(f"kracauer exited with {rc} on SIGTERM")
        if lab.link_exists("box", "kracauer0"):
            failures.append("the TUN kracauer0 is still there after SIGTERM")

    say()
    if failures:
        say("demo FAILED:")
        for f in failures:
            say(f"  - {f}")
        return 1
    say("demo OK: every name reached its host, refusals were refused, the hosts saw the client's address, "
        "and kracauer logged and counted every connection.")
    return 0


def _up(args: argparse.Namespace) -> int:
    with Lab(log=print, keep_dir=args.keep) as lab:
        print(lab.describe())
        if args.config:
            k = lab.start_kracauer(pathlib.Path(args.config).read_text())
            print(f"kracauer pid {k.pid}, stderr in {k.stderr_path}")
        print(f"CA certificate: {lab.ca_cert}; big file sha256 {lab.big_sha256}")
        print("try: ip netns exec", lab.ns("client"), "curl --cacert", lab.ca_cert,
              f"--resolve www.example.com:443:{SERVICE_ADDRESS} https://www.example.com/")
        print("Ctrl-C to tear down.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netlab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="build a lab, run kracauer, show what clients and hosts see")
    up = sub.add_parser("up", help="build a lab (optionally start kracauer) and wait for Ctrl-C")
    up.add_argument("--config", help="kracauer config to start in the box")
    up.add_argument("--keep", action="store_true", help="keep the lab's temp dir")
    sub.add_parser("cleanup", help="remove namespaces and temp dirs of crashed lab runs")
    args = parser.parse_args(argv)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    if args.cmd != "cleanup":
        missing = missing_requirements()
        if missing:
            print(f"netlab: cannot build the lab here, missing: {', '.join(missing)}", file=sys.stderr)
            return 2
    try:
        if args.cmd == "demo":
            return _demo(args)
        if args.cmd == "up":
            return _up(args)
        removed = cleanup_stale(print)
        print(f"removed {len(removed)} stale item(s)")
        return 0
    except LabError as e:
        print(f"netlab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
