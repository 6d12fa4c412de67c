"""ICMP through kracauer: ping, and path MTU discovery across IPv4/IPv6 (RFC 7915 §4.2, §5.2).

kracauer's config says the IPv6 path MTU is 1500, but one link on the way is
narrower. The box's kernel then reports "fragmentation needed" (IPv4) or
"packet too big" (IPv6) to the source of the oversized packet, which is the
service address or prefix::client, so the error arrives in the TUN. kracauer
must translate it, with the quoted packet, to the other side, or the transfer
stalls.
"""

from __future__ import annotations

import hashlib
import textwrap

import pytest

from tests import netlab
from tests.netlab import HOSTS, SERVICE_ADDRESS, Lab, example_config

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

NARROW = 1300
SINK_PORT = 9000

SINK = textwrap.dedent("""
    import hashlib, socket, sys
    server = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6)
    print("ready", flush=True)
    conn, _ = server.accept()
    digest = hashlib.sha256()
    while data := conn.recv(1 << 20):
        digest.update(data)
    conn.sendall(digest.hexdigest().encode())
""")

UPLOAD = textwrap.dedent("""
    import hashlib, os, socket, sys
    data = os.urandom(int(sys.argv[3]))
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        print(s.recv(200).decode(), hashlib.sha256(data).hexdigest())
""")


def config() -> str:
    return example_config() + textwrap.dedent(f"""
        [[listen]]
        address = "{SERVICE_ADDRESS}"
        port = {SINK_PORT}
        protocol = "tcp"
        host = "{HOSTS['host1']}"
    """)


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


def test_ping_to_the_service_address_is_answered(lab):
    k = lab.start_kracauer(config())
    proc = lab.run("client", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SERVICE_ADDRESS], timeout=10)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 received" in proc.stdout
    code, stderr = k.stop()
    assert code == 0, stderr


def test_download_completes_when_the_client_side_link_is_narrower(lab):
    # Only the box's end of the client link: the client still announces MSS 1460.
    lab.run("box", ["ip", "link", "set", "cl0", "mtu", str(NARROW)], check=True)
    k = lab.start_kracauer(config())
    proc = lab.run("client", ["sh", "-c",
                              f"curl -sS --fail --max-time 30 --cacert {lab.ca_cert} --resolve "
                              f"www.example.com:443:{SERVICE_ADDRESS} https://www.example.com/big.bin | sha256sum"],
                   timeout=40)
    code, stderr = k.stop()
    assert proc.stdout.split()[0] == lab.big_sha256, proc.stderr + stderr[-3000:]
    # The host learnt the smaller MTU from a translated Packet Too Big.
    routes = lab.run("host1", ["ip", "-6", "route", "show", "cache"]).stdout
    assert f"mtu {NARROW + 20}" in routes, routes
    assert code == 0, stderr


def test_upload_completes_when_the_host_side_link_is_narrower(lab):
    for dev in ("br0", "h1"):
        lab.run("box", ["ip", "link", "set", dev, "mtu", str(NARROW)], check=True)
    lab.run("host1", ["ip", "link", "set", "eth0", "mtu", str(NARROW)], check=True)
    sink = lab.dir / "sink.py"
    sink.write_text(SINK)
    server = lab.popen("host1", ["python3", str(sink), str(SINK_PORT)], stdout=-1, text=True)
    assert server.stdout.readline().strip() == "ready"
    k = lab.start_kracauer(config())
    upload = lab.dir / "upload.py"
    upload.write_text(UPLOAD)
    proc = lab.run("client", ["python3", str(upload), SERVICE_ADDRESS, str(SINK_PORT), str(8 << 20)], timeout=40)
    code, stderr = k.stop()
    assert proc.returncode == 0, proc.stderr + stderr[-3000:]
    seen, sent = proc.stdout.split()
    assert seen == sent
    # The client learnt the smaller MTU from a translated "fragmentation needed".
    cache = lab.run("client", ["ip", "route", "get", SERVICE_ADDRESS]).stdout
    assert f"mtu {NARROW - 20}" in cache, cache
    assert code == 0, stderr
