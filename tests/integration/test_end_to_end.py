"""kracauer end to end: real curl/openssl clients, real nginx hosts, network namespaces.

One lab per module (tests/netlab.py) with kracauer started once on the lab's
standard config (``netlab.example_config``):

- tls :443 and http :80 on 192.0.2.10: www.example.com -> host1,
  *.example.org -> host2 port 8443, www.example.net -> host2, no fallback;
- tcp :8080 -> host1:8080, no peeking.

The client is 198.51.100.2, so the hosts must log 64:ff9b:1::c633:6402.
Start/stop behaviour uses its own small labs (no nginx).
"""

from __future__ import annotations

import hashlib
import secrets
import signal
import sys

import pytest

from tests import netlab
from tests.netlab import CLIENT_ADDRESS, HOSTS, SERVICE_ADDRESS, Lab, LabError, embed, example_config, wait_until

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

EMBEDDED_CLIENT = embed(CLIENT_ADDRESS)  # 64:ff9b:1::c633:6402


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def running_kracauer(lab):
    """kracauer on the standard config, started once; the lab stops it at teardown."""
    return lab.start_kracauer(example_config())


@pytest.fixture
def kracauer(running_kracauer):
    k = running_kracauer
    assert k.running(), f"kracauer died (exit {k.popen.poll()}); its stderr:\n{k.stderr()}"
    yield k
    assert k.running(), f"kracauer died during the test (exit {k.popen.poll()}); its stderr:\n{k.stderr()}"


def seen(proc, k=None) -> str:
    """What a client saw, plus the tail of kracauer's log, for assertion messages."""
    text = f"exit {proc.returncode}\n--- stdout\n{str(proc.stdout)[-2000:]}\n--- stderr\n{str(proc.stderr)[-2000:]}"
    if k is not None:
        text += "\n--- kracauer stderr (tail)\n" + "\n".join(k.log_lines()[-30:])
    return text


def token() -> str:
    return secrets.token_hex(6)


def openssl_client(lab, name: str, port: int = 443):
    return lab.run("client", [
        "openssl", "s_client", "-connect", f"{SERVICE_ADDRESS}:{port}", "-servername", name,
        "-CAfile", str(lab.ca_cert), "-verify_return_error",
    ], input="", timeout=15)


# -- the lab itself (a failure here is not kracauer's) ------------------------


@pytest.mark.parametrize("host", list(HOSTS))
def test_lab_hosts_answer_the_box_directly(lab, host):
    t = token()
    r = lab.curl(f"https://www.example.com/?t={t}", role="box", address=HOSTS[host], max_time=5)
    assert r.returncode == 0 and r.stdout == f"{host}\n", seen(r)
    entry = lab.wait_for_log(host, lambda e: t in e["request"])
    assert entry["remote_addr"] == netlab.BOX_HOST_ADDRESS


# -- routing by name ----------------------------------------------------------


def test_tls_name_reaches_host1_and_host1_logs_the_embedded_client_address(lab, kracauer):
    t = token()
    r = lab.curl(f"https://www.example.com/?t={t}")
    assert r.returncode == 0 and r.stdout == "host1\n", seen(r, kracauer)
    entry = lab.wait_for_log("host1", lambda e: t in e["request"])
    assert entry["remote_addr"] == EMBEDDED_CLIENT == "64:ff9b:1::c633:6402"
    assert (entry["server_port"], entry["sni"]) == ("443", "www.example.com")


def test_wildcard_name_reaches_host2_on_the_route_port(lab, kracauer):
    t = token()
    r = lab.curl(f"https://a.example.org/?t={t}")
    assert r.returncode == 0 and r.stdout == "host2\n", seen(r, kracauer)
    entry = lab.wait_for_log("host2", lambda e: t in e["request"])
    assert entry["remote_addr"] == EMBEDDED_CLIENT
    assert (entry["server_port"], entry["sni"]) == ("8443", "a.example.org")


def test_openssl_handshake_completes_with_host1_certificate(lab, kracauer):
    r = openssl_client(lab, "www.example.com")
    assert r.returncode == 0, seen(r, kracauer)
    assert "CN = host1.lab" in r.stdout, seen(r, kracauer)
    assert "Verify return code: 0 (ok)" in r.stdout, seen(r, kracauer)


@pytest.mark.parametrize("name, host", [("www.example.com", "host1"), ("www.example.net", "host2")])
def test_http_host_header_routes_to_the_named_host(lab, kracauer, name, host):
    t = token()
    r = lab.curl(f"http://{name}/?t={t}")
    assert r.returncode == 0 and r.stdout == f"{host}\n", seen(r, kracauer)
    entry = lab.wait_for_log(host, lambda e: t in e["request"])
    assert entry["remote_addr"] == EMBEDDED_CLIENT
    assert (entry["server_port"], entry["host"]) == ("80", name)


def test_tcp_listener_reaches_its_host_whatever_the_bytes_say(lab, kracauer):
    t = token()
    # The Host header names host2; a tcp listener must not look at it.
    r = lab.curl(f"http://{SERVICE_ADDRESS}:8080/?t={t}", "-H", "Host: www.example.net")
    assert r.returncode == 0 and r.stdout == "host1\n", seen(r, kracauer)
    entry = lab.wait_for_log("host1", lambda e: t in e["request"])
    assert entry["remote_addr"] == EMBEDDED_CLIENT
    assert entry["server_port"] == "8080"


def test_20mb_download_over_tls_arrives_intact(lab, kracauer):
    out = lab.dir / f"download-{token()}.bin"
    try:
        r = lab.curl("https://www.example.com/big.bin", "-o", str(out), max_time=60)
        assert r.returncode == 0, seen(r, kracauer)
        data = out.read_bytes()
        assert len(data) == lab.big_file_size
        assert hashlib.sha256(data).hexdigest() == lab.big_sha256
    finally:
        out.unlink(missing_ok=True)


# -- refusals -----------------------------------------------------------------


def test_unknown_name_over_tls_gets_unrecognized_name_alert(lab, kracauer):
    r = openssl_client(lab, "unknown.invalid")
    assert r.returncode != 0, seen(r, kracauer)
    assert "unrecognized name" in (r.stdout + r.stderr).lower(), seen(r, kracauer)


def test_unknown_name_over_http_gets_421_and_reaches_no_host(lab, kracauer):
    r = lab.curl("http://unknown.invalid/", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.stdout == "421", seen(r, kracauer)
    for host in HOSTS:
        assert not [e for e in lab.access_log(host) if e["host"] == "unknown.invalid"]


@pytest.mark.parametrize("version", ["--http1.1", "--http1.0"])
def test_http_request_without_host_gets_400_and_a_clean_close(lab, kracauer, version):
    # RFC 9112 §3.2: HTTP/1.1 without Host is a 400; HTTP/1.0 without Host has
    # no fallback to go to in this lab, so it is a 400 too. -H 'Host:' makes
    # curl leave the header out. curl exits 0: it got a whole response, no reset.
    r = lab.curl("http://www.example.com/", version, "-H", "Host:", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.returncode == 0 and r.stdout == "400", seen(r, kracauer)
    r = lab.curl("http://www.example.com/", version, "-H", "Host:", "-i")
    assert r.returncode == 0, seen(r, kracauer)
    assert r.stdout.startswith("HTTP/1.1 400 Bad Request\n") and "Connection: close" in r.stdout, seen(r, kracauer)


GARBAGE_CLIENT = f"""
import socket
s = socket.create_connection(("{SERVICE_ADDRESS}", 443), timeout=5)
s.sendall(b"hello\\r\\n")
try:
    data = s.recv(4096)
    print("eof" if not data else "data " + data[:64].hex())
except ConnectionResetError:
    print("reset")
except TimeoutError:
    print("timeout (no answer within 5 s)")
"""


def test_non_tls_bytes_on_the_tls_port_get_a_reset(lab, kracauer):
    r = lab.run("client", [sys.executable, "-c", GARBAGE_CLIENT], timeout=15)
    assert r.stdout.strip() == "reset", seen(r, kracauer)


# -- kracauer's own log -------------------------------------------------------


def test_kracauer_logs_one_line_per_connection_with_client_and_name(lab, kracauer):
    name = f"log{token()}.example.org"
    r = lab.curl(f"https://{name}/")
    assert r.returncode == 0 and r.stdout == "host2\n", seen(r, kracauer)
    try:
        # kracauer logs a connection when it forgets it, some seconds after the close.
        wait_until(lambda: any(name in line for line in kracauer.log_lines()), 25, f"a log line naming {name}")
    except LabError as e:
        pytest.fail(f"{e}\nkracauer stderr:\n{kracauer.stderr()}")
    lines = [line for line in kracauer.log_lines() if name in line]
    assert len(lines) == 1, lines
    assert CLIENT_ADDRESS in lines[0], lines[0]
    assert HOSTS["host2"] in lines[0], lines[0]


# -- start and stop -----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_kracauer_and_removes_its_tun_and_routes(sig):
    with Lab(hosts=False) as lab:
        k = lab.start_kracauer(example_config())  # waits for the TUN, /32 and /96 routes
        rc, stderr = k.stop(sig)
        assert rc == 0, f"kracauer exited with {rc} on {sig.name}; stderr:\n{stderr}"
        show = lab.run("box", ["ip", "link", "show", "kracauer0"])
        assert show.returncode != 0, f"kracauer0 still exists:\n{show.stdout}"
        v4 = lab.run("box", ["ip", "-4", "route", "show", "table", "all"], check=True).stdout
        v6 = lab.run("box", ["ip", "-6", "route", "show", "table", "all"], check=True).stdout
        assert SERVICE_ADDRESS not in v4, v4
        assert "64:ff9b:1::" not in v6, v6


@pytest.mark.parametrize("sysctl", ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"])
def test_kracauer_refuses_to_start_without_forwarding(sysctl):
    with Lab(hosts=False) as lab:
        lab.run("box", ["sysctl", "-q", "-w", f"{sysctl}=0"], check=True)
        k = lab.spawn_kracauer(example_config())
        rc = k.wait(timeout=10)
        assert rc == 2, f"expected exit 2, got {rc}; stderr:\n{k.stderr()}"
        assert sysctl.rsplit(".", 1)[-1] in k.stderr(), k.stderr()
        assert not lab.link_exists("box", "kracauer0")
