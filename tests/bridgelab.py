"""The TLS bridge's lab (issue #10): two kracauers and an SNI-filtering firewall between them.

Built on tests.netlab's Lab (its ``box`` is the peer kracauer, its hosts are
the services) with three more namespaces::

    bclient 198.51.100.2 ─ ingress (kracauer, TUN; 192.0.2.10 routed into it) ─ fw ─ box/peer ─ host1, host2
                          198.51.100.1 · 198.18.0.2 ─── 198.18.0.1 · 203.0.113.1 ── 203.0.113.20

``fw`` runs nginx's stream module with ``ssl_preread``: a TLS connection to
198.18.0.1:4443 is passed to the peer only when its SNI is
``bridge.example.com``, as the firewall of ../shared/design/bridge.md would;
anything else is closed. The certificates the bridge needs (a CA for the
peer's server certificate, one for the ingress boxes' client certificates,
and an outsider CA with a certificate the peer must refuse) are made with
the ``openssl`` command.
"""

from __future__ import annotations

import pathlib
import subprocess

from tests import netlab
from tests.netlab import Lab, LabError, _ip, wait_until

BRIDGE_NAME = "bridge.example.com"
BCLIENT_ADDRESS = "198.51.100.2"
INGRESS_CLIENT_SIDE = "198.51.100.1"
FW_INGRESS_SIDE = "198.18.0.1"
INGRESS_FW_SIDE = "198.18.0.2"
FW_PEER_SIDE = "203.0.113.1"
PEER_ADDRESS = "203.0.113.20"
BRIDGE_PORT = 4443
# The prefix the peer connects to the hosts from (routed `local` on its lo by kracauer).
PEER_PREFIX = "64:ff9b:2::/96"
EXTRA_ROLES = ("bclient", "ingress", "fw")

_FW_NGINX = """\
# the lab's firewall: TLS passes only with the bridge's server name
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
events {{ worker_connections 1024; }}
stream {{
    map $ssl_preread_server_name $upstream {{
        {bridge} {peer}:{port};
        default 127.0.0.1:9;
    }}
    log_format fw '$remote_addr $ssl_preread_server_name $upstream $status $bytes_sent $bytes_received';
    access_log {dir}/access.log fw;
    server {{
        listen {listen}:{port};
        ssl_preread on;
        proxy_pass $upstream;
        proxy_half_close on;
        proxy_connect_timeout 5s;
    }}
}}
"""


def openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise LabError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def make_ca(directory: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_leaf(directory: pathlib.Path, name: str, ca: tuple[pathlib.Path, pathlib.Path], *,
              dns: str | None = None, client: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
    """A key and a certificate signed by `ca`: a server's for `dns`, or a client's."""
    cert, key, csr, ext = (directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr",
                           directory / f"{name}.ext")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(csr))
    lines = ["basicConstraints=critical,CA:FALSE",
             f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
    if dns:
        lines.append(f"subjectAltName=DNS:{dns}")
    ext.write_text("\n".join(lines) + "\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(cert))
    key.chmod(0o600)
    return cert, key


class BridgeLab(Lab):
    """netlab's Lab (box = the peer) plus bclient, ingress and fw, and the bridge's certificates."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.namespaces.update({role: f"{self.prefix}-{role}" for role in EXTRA_ROLES})
        self.certs: dict[str, tuple[pathlib.Path, pathlib.Path]] = {}

    def _build_network(self) -> None:
        super()._build_network()
        for role in EXTRA_ROLES:
            _ip("netns", "add", self.ns(role))
            self._created.append(self.ns(role))
            _ip("-n", self.ns(role), "link", "set", "lo", "up")
            self._ns_exec(role, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
                          "net.ipv6.conf.default.accept_dad=0")
        self._ns_exec("ingress", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        links = (
            ("bclient", "eth0", BCLIENT_ADDRESS, "ingress", "cl0", INGRESS_CLIENT_SIDE),
            ("ingress", "fw0", INGRESS_FW_SIDE, "fw", "eth0", FW_INGRESS_SIDE),
            ("fw", "eth1", FW_PEER_SIDE, "box", "fw0", PEER_ADDRESS),
        )
        for a, a_dev, a_addr, b, b_dev, b_addr in links:
            _ip("-n", self.ns(a), "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", self.ns(b))
            for ns, dev, addr in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
                _ip("-n", self.ns(ns), "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", self.ns(ns), "link", "set", dev, "up")
        _ip("-n", self.ns("bclient"), "route", "add", "default", "via", INGRESS_CLIENT_SIDE)
        for host in netlab.HOSTS:
            _ip("-n", self.ns(host), "-6", "route", "add", PEER_PREFIX, "via", netlab.BOX_HOST_ADDRESS)

    def _build_hosts(self) -> None:
        super()._build_hosts()
        assert self.dir is not None
        d = self.dir / "bridge"
        d.mkdir()
        peer_ca = make_ca(d, "peer-ca")
        ingress_ca = make_ca(d, "ingress-ca")
        outsider_ca = make_ca(d, "outsider-ca")
        self.certs = {
            "peer-ca": peer_ca, "ingress-ca": ingress_ca,
            "peer": make_leaf(d, "peer", peer_ca, dns=BRIDGE_NAME),
            "ingress": make_leaf(d, "ingress", ingress_ca, client=True),
            "outsider": make_leaf(d, "outsider", outsider_ca, client=True),
        }
        self._start_firewall()

    def _start_firewall(self) -> None:
        assert self.dir is not None
        fdir = self.dir / "fw"
        fdir.mkdir()
        conf = fdir / "nginx.conf"
        conf.write_text(_FW_NGINX.format(dir=fdir, bridge=BRIDGE_NAME, peer=PEER_ADDRESS, port=BRIDGE_PORT,
                                         listen=FW_INGRESS_SIDE))
        out = open(fdir / "nginx.out", "wb")
        try:
            popen = subprocess.Popen(["ip", "netns", "exec", self.ns("fw"), "nginx", "-p", str(fdir), "-c", str(conf),
                                      "-e", str(fdir / "error.log"), "-g", "daemon off;"],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()
        proc = netlab._Proc("nginx fw", popen, (fdir / "nginx.out", fdir / "error.log"))
        self._procs.append(proc)

        def ready():
            if popen.poll() is not None:
                raise LabError(f"the firewall's nginx exited:\n{self._tail(proc)}")
            return str(BRIDGE_PORT) in self.listening_ports("fw")
        wait_until(ready, 10, "the firewall's nginx to listen", lambda: self._tail(proc))

    # -- configurations --

    def peer_config(self, extra: str = "") -> str:
        hosts = netlab.HOSTS
        cert, key = self.certs["peer"]
        return f"""\
[tun]
name = "kracauer0"
user = "nobody"  # the bridge's ends run without privileges, as the daemon does

[translate]
prefix = "{netlab.PREFIX}"

[[listen]]
address = "{PEER_ADDRESS}"
port = {BRIDGE_PORT}
protocol = "bridge"
cert = "{cert}"
key = "{key}"
client_ca = "{self.certs['ingress-ca'][0]}"
prefix = "{PEER_PREFIX}"
ports = [80, 443, 8444]

[[route]]
name = "www.example.com"
host = "{hosts['host1']}"

[[route]]
name = "*.example.org"
host = "{hosts['host2']}"
port = 8443

[[route]]
name = "upload.example.org"
host = "{hosts['host1']}"
port = 8444
{extra}"""

    def ingress_config(self, *, cert: str = "ingress", extra: str = "") -> str:
        c, k = self.certs[cert]
        return f"""\
[tun]
name = "kracauer0"
user = "nobody"  # the bridge's ends run without privileges, as the daemon does

[translate]
prefix = "{netlab.PREFIX}"

[[listen]]
address = "{netlab.SERVICE_ADDRESS}"
port = 443
protocol = "tls"

[[listen]]
address = "{netlab.SERVICE_ADDRESS}"
port = 80
protocol = "http"

[[listen]]
address = "{netlab.SERVICE_ADDRESS}"
port = 3128
protocol = "connect"
allow = ["{BCLIENT_ADDRESS}/32"]

[[bridge]]
name = "provider"
address = "{FW_INGRESS_SIDE}:{BRIDGE_PORT}"
server_name = "{BRIDGE_NAME}"
ca = "{self.certs['peer-ca'][0]}"
cert = "{c}"
key = "{k}"

[[route]]
name = "*.example.com"
bridge = "provider"

[[route]]
name = "*.example.org"
bridge = "provider"
{extra}"""


# A service on host1 that hashes what it is sent: HTTPS POST, answers "sha256 client-address".
HASH_SERVER = r'''
import hashlib, http.server, socket, ssl, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        left = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        while left:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        body = f"{digest.hexdigest()} {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

server = Server(("::", int(sys.argv[1])), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[2], sys.argv[3])
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
'''
