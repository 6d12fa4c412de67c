"""The TLS bridge in the lab, with real curl, openssl and nginx (issue #10, tests.bridgelab).

First the peer alone: curl as an HTTPS-proxy client with the ingress box's
client certificate talks to the peer's bridge listener directly and gets the
service, whose log shows the client's embedded address from the peer's own
prefix. Then the whole chain: client → ingress kracauer (TUN) → the
SNI-filtering firewall → peer kracauer → hosts. The data path of the ingress
follows KRACAUER_LAB_KERNEL_PATH and both kracauers KRACAUER_LAB_WORKERS.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys

import pytest

from tests import netlab
from tests.bridgelab import (
    BCLIENT_ADDRESS, BRIDGE_NAME, BRIDGE_PORT, FW_INGRESS_SIDE, HASH_SERVER, PEER_ADDRESS, PEER_PREFIX, BridgeLab,
)
from tests.netlab import HOSTS, SERVICE_ADDRESS, wait_until

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

BIG = 100 * 1024 * 1024
METRICS = "127.0.0.1:9477"  # each kracauer's, in its own namespace
UPLOAD_PORT = 8444
# The peer routes *.example.net by DNS (route by DNS): dnsmasq in host2's namespace answers.
DNS_ADDRESS, DNS_PORT = HOSTS["host2"], 5353
DNS_RECORDS = {"dyn.example.net": HOSTS["host1"], "out.example.net": HOSTS["host2"]}
RESOLVE_ROUTE = f"""
[[route]]
name = "*.example.net"
resolve = true
networks = ["{HOSTS['host1']}/128"]

[resolver]
servers = ["[{DNS_ADDRESS}]:{DNS_PORT}"]
timeout = 1.0
"""


@pytest.fixture(scope="module")
def lab():
    with BridgeLab(big_file_size=BIG) as lab:
        host1 = lab.host_dir("host1")
        script = host1 / "hash_server.py"
        script.write_text(HASH_SERVER)
        cert, key = lab.host_certs["host1"]
        proc = lab.popen("host1", [sys.executable, str(script), str(UPLOAD_PORT), str(cert), str(key)],
                         stdout=open(host1 / "hash.out", "wb"), stderr=open(host1 / "hash.err", "wb"))
        wait_until(lambda: str(UPLOAD_PORT) in lab.listening_ports("host1"), 10, "the hash server",
                   lambda: (host1 / "hash.err").read_text())
        assert proc.poll() is None
        if shutil.which("dnsmasq"):
            hosts = lab.dir / "dns-hosts"
            hosts.write_text("".join(f"{address} {name}\n" for name, address in DNS_RECORDS.items()))
            dnsmasq = lab.popen("host2", [
                "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                f"--addn-hosts={hosts}", "--local=/example.net/", f"--listen-address={DNS_ADDRESS}",
                "--bind-interfaces", f"--port={DNS_PORT}", "--user=root", "--group=root",
                f"--pid-file={lab.dir}/dnsmasq.pid"], stdin=None, stdout=None, stderr=None)
            wait_until(lambda: str(DNS_PORT) in " ".join(lab.listening_ports("host2")) or dnsmasq.poll() is not None,
                       10, "dnsmasq to listen")
        yield lab


@pytest.fixture(scope="module")
def peer(lab):
    text = lab.peer_config(RESOLVE_ROUTE + f'\n[log]\naccess = "{lab.dir}/peer-access.log"\n'
                                          f'\n[metrics]\nlisten = "{METRICS}"\n')
    k = lab.start_kracauer(text)
    k.config_text = text
    wait_until(lambda: not k.running() or "running on" in k.stderr(), 15, "the peer kracauer", k.stderr)
    assert k.running(), k.stderr()
    yield k
    code, stderr = k.stop()
    assert code == 0, stderr


@pytest.fixture(scope="module")
def ingress(lab, peer):
    text = lab.ingress_config(extra=f'\n[log]\naccess = "{lab.dir}/ingress-access.log"\n'
                                    f'\n[metrics]\nlisten = "{METRICS}"\n')
    k = lab.start_kracauer(text, role="ingress")
    k.config_text = text
    wait_until(lambda: not k.running() or "running on" in k.stderr(), 15, "the ingress kracauer", k.stderr)
    assert k.running(), k.stderr()
    yield k
    code, stderr = k.stop()
    assert code == 0, stderr


def records(lab, name: str) -> list[dict]:
    path = lab.dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def direct_to_peer(lab, url: str, *args: str, cert: str = "ingress", forwarded: str | None = f'for="{BCLIENT_ADDRESS}"'):
    """curl from the firewall's namespace, with the peer as its HTTPS proxy (no firewall in between)."""
    c, k = lab.certs[cert]
    argv = ["curl", "-sS", "--max-time", "15", "--cacert", str(lab.ca_cert), "-p",
            "--proxy", f"https://{BRIDGE_NAME}:{BRIDGE_PORT}", "--resolve", f"{BRIDGE_NAME}:{BRIDGE_PORT}:{PEER_ADDRESS}",
            "--proxy-cacert", str(lab.certs["peer-ca"][0]), "--proxy-cert", str(c), "--proxy-key", str(k),
            "-w", "\n%{http_connect}"]
    if forwarded is not None:
        argv += ["--proxy-header", f"Forwarded: {forwarded}"]
    return lab.run("fw", [*argv, *args, url], timeout=30)


# -- the peer alone ---------------------------------------------------------------


def test_peer_alone_serves_curl_as_https_proxy_and_the_host_sees_the_forwarded_client(lab, peer):
    result = direct_to_peer(lab, "https://www.example.com/")
    assert result.returncode == 0, result.stderr
    body, status = result.stdout.rsplit("\n", 1)
    assert (body.strip(), status) == ("host1", "200")
    embedded = netlab.embed(BCLIENT_ADDRESS, PEER_PREFIX)
    lab.wait_for_log("host1", lambda e: e["remote_addr"] == embedded and e["sni"] == "www.example.com")


def test_peer_alone_refuses_an_unknown_name_with_403(lab, peer):
    result = direct_to_peer(lab, "https://nowhere.example.com/")
    assert result.returncode != 0
    assert result.stdout.rsplit("\n", 1)[-1] == "403", result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq (scripts/setup-env)")
def test_peer_alone_routes_by_dns_and_refuses_an_answer_outside_networks(lab, peer):
    # The peer's own resolve route: the AAAA record names the host (RFC 3596), inside `networks`.
    result = direct_to_peer(lab, "https://dyn.example.net/", "-k")
    assert result.returncode == 0, result.stderr
    body, status = result.stdout.rsplit("\n", 1)
    assert (body.strip(), status) == ("host1", "200")
    embedded = netlab.embed(BCLIENT_ADDRESS, PEER_PREFIX)
    lab.wait_for_log("host1", lambda e: e["remote_addr"] == embedded and e["sni"] == "dyn.example.net")
    # host2's address is outside the route's networks: refused as an unknown name is.
    result = direct_to_peer(lab, "https://out.example.net/", "-k")
    assert result.stdout.rsplit("\n", 1)[-1] == "403", result.stdout + result.stderr
    wait_until(lambda: any(r["outcome"] == "refused_outside_networks" and r["name"] == "out.example.net"
                           for r in records(lab, "peer-access.log")), 5, "the peer's record of the refusal",
               lambda: str(records(lab, "peer-access.log")))


def test_peer_alone_refuses_a_missing_forwarded_with_400(lab, peer):
    result = direct_to_peer(lab, "https://www.example.com/", forwarded=None)
    assert result.stdout.rsplit("\n", 1)[-1] == "400", result.stdout + result.stderr


def test_peer_alone_refuses_a_client_certificate_from_another_ca(lab, peer):
    result = direct_to_peer(lab, "https://www.example.com/", cert="outsider")
    assert result.returncode != 0
    assert result.stdout.rsplit("\n", 1)[-1] in ("", "000"), result.stdout
    wait_until(lambda: any(r["outcome"] == "client_tls_failed" for r in records(lab, "peer-access.log")), 5,
               "the peer's record of the refused handshake", lambda: str(records(lab, "peer-access.log")))


# -- the whole chain ---------------------------------------------------------------


def via_bridge(lab, url: str, *args: str, max_time: float = 20):
    return lab.curl(url, "-w", "\n%{http_code}", *args, role="bclient", max_time=max_time)


def test_each_service_is_reached_by_its_own_name_through_the_firewall(lab, ingress):
    for name, host in (("www.example.com", "host1"), ("a.example.org", "host2")):
        url = f"https://{name}/" if host == "host1" else f"https://{name}:443/"
        result = via_bridge(lab, url)
        assert result.returncode == 0, (name, result.stderr, ingress.stderr())
        assert result.stdout == f"{host}\n\n200", result.stdout
        embedded = netlab.embed(BCLIENT_ADDRESS, PEER_PREFIX)
        lab.wait_for_log(host, lambda e, name=name: e["remote_addr"] == embedded and e["sni"] == name)

    def closed_tunnels():
        # The relay writes its record once both directions have ended, a moment after curl's.
        found = [r for r in records(lab, "ingress-access.log") if r.get("side") == "ingress" and r["outcome"] == "closed"]
        return found if {r["name"] for r in found} >= {"www.example.com", "a.example.org"} else None

    tunnels = wait_until(closed_tunnels, 5, "the ingress's records of both tunnels",
                         lambda: (lab.dir / "ingress-access.log").read_text())
    assert all(r["outer_name"] == BRIDGE_NAME and r["client"] == BCLIENT_ADDRESS for r in tunnels)


def test_openssl_verifies_the_services_own_certificate(lab, ingress):
    proc = lab.run("bclient", ["openssl", "s_client", "-connect", f"{SERVICE_ADDRESS}:443", "-servername",
                               "www.example.com", "-CAfile", str(lab.ca_cert), "-verify_return_error",
                               "-verify_hostname", "www.example.com"], input="", timeout=20)
    assert "Verify return code: 0 (ok)" in proc.stdout, proc.stdout + proc.stderr
    assert "CN = host1.lab" in proc.stdout  # the service's certificate, not a proxy's


def test_the_connect_listener_goes_through_the_bridge_and_the_relay_answers_the_connect(lab, ingress):
    result = lab.run("bclient", ["curl", "-sS", "--max-time", "20", "--cacert", str(lab.ca_cert), "-p",
                                 "-x", f"http://{SERVICE_ADDRESS}:3128", "-w", "\n%{http_connect} %{http_code}",
                                 "https://www.example.com/"], timeout=30)
    assert result.returncode == 0, result.stderr + ingress.stderr()
    assert result.stdout == "host1\n\n200 200"


def test_plain_http_goes_through_the_bridge_by_its_host_header(lab, ingress):
    # An http listener's bridge route: the relay reads the Host header again (the same peeker) and the
    # firewall still only sees the outer TLS with the bridge's name.
    result = via_bridge(lab, "http://www.example.com/")
    assert result.returncode == 0, result.stderr + ingress.stderr()
    assert result.stdout == "host1\n\n200", result.stdout
    embedded = netlab.embed(BCLIENT_ADDRESS, PEER_PREFIX)
    lab.wait_for_log("host1", lambda e: e["remote_addr"] == embedded and e["server_port"] == "80")
    wait_until(lambda: any(r.get("listener_protocol") == "http" and r["outcome"] == "closed"
                           for r in records(lab, "ingress-access.log")), 5, "the ingress's record")


def test_the_firewall_drops_a_direct_connection_with_the_services_name(lab, ingress):
    proc = lab.run("ingress", ["openssl", "s_client", "-connect", f"{FW_INGRESS_SIDE}:{BRIDGE_PORT}",
                               "-servername", "www.example.com", "-CAfile", str(lab.ca_cert)], input="", timeout=20)
    # The firewall closes it: no certificate at all, neither the service's nor the peer's.
    assert "no peer certificate available" in proc.stdout, proc.stdout + proc.stderr
    assert "CN = host1.lab" not in proc.stdout


def test_a_name_the_peer_does_not_route_is_a_reset_for_the_client(lab, ingress):
    result = via_bridge(lab, "https://nowhere.example.com/")
    assert result.returncode in (35, 56), (result.returncode, result.stderr)  # reset during the handshake
    wait_until(lambda: any(r["outcome"] == "peer_refused_403" and r["name"] == "nowhere.example.com"
                           for r in records(lab, "ingress-access.log")), 5, "the ingress's record of the 403")
    assert any(r["outcome"] == "refused_unknown_name" and r["name"] == "nowhere.example.com"
               for r in records(lab, "peer-access.log"))


def test_a_wrong_ingress_client_certificate_is_refused(lab, peer, ingress):
    k = lab.start_kracauer(lab.ingress_config(cert="outsider").replace(
        f'port = 443\nprotocol = "tls"', 'port = 8443\nprotocol = "tls"').replace('name = "kracauer0"',
                                                                               'name = "kracauer1"').replace(
        f'address = "{SERVICE_ADDRESS}"\nport = 3128', 'address = "192.0.2.11"\nport = 3128').replace(
        f'address = "{SERVICE_ADDRESS}"', 'address = "192.0.2.11"').replace(
        netlab.PREFIX, "64:ff9b:3::/96"), role="ingress")
    try:
        result = lab.curl("https://www.example.com:8443/", role="bclient", address="192.0.2.11", max_time=15)
        assert result.returncode in (35, 56), (result.returncode, result.stdout, result.stderr)
        # The peer's alert names the reason on the ingress (RFC 8446 §6.2), and the tunnel's outcome says it.
        wait_until(lambda: "outcome=peer_tls_failed" in k.stderr(), 5, "the ingress's record of the refusal", k.stderr)
        assert "bridge relay: TLS with peer" in k.stderr() and "alert" in k.stderr(), k.stderr()
    finally:
        code, stderr = k.stop()
        assert code == 0, stderr


def metric(lab, role: str, name: str, **labels: str) -> float:
    """One sample of a kracauer's /metrics (0 when absent), read from inside its namespace."""
    text = lab.run(role, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics"], timeout=10).stdout
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    return 0.0


def test_metrics_count_tunnels_and_bytes_on_both_ends(lab, ingress):
    before = metric(lab, "ingress", "kracauer_bridge_tunnels_total", side="ingress", outcome="closed")
    peer_before = metric(lab, "box", "kracauer_bridge_bytes_total", side="peer", direction="to_client")
    result = via_bridge(lab, "https://www.example.com/")
    assert result.stdout == "host1\n\n200", result.stdout + result.stderr
    # Worker 0's counters reach the supervisor's /metrics within about a second.
    wait_until(lambda: metric(lab, "ingress", "kracauer_bridge_tunnels_total", side="ingress",
                              outcome="closed") == before + 1, 5, "the ingress's tunnel count")
    wait_until(lambda: metric(lab, "box", "kracauer_bridge_bytes_total", side="peer", direction="to_client")
               > peer_before + 1000, 5, "the peer's byte count (the service's certificate and answer)")
    assert metric(lab, "ingress", "kracauer_bridge_tunnels_active", side="ingress") == 0


def test_a_reload_keeps_an_open_tunnel_and_routes_new_names(lab, peer, ingress):
    out = lab.dir / "reload-download.bin"
    download = lab.popen("bclient", ["curl", "-sS", "--max-time", "60", "--cacert", str(lab.ca_cert),
                                     "--resolve", f"www.example.com:443:{SERVICE_ADDRESS}", "--limit-rate", "25M",
                                     "-o", str(out), "https://www.example.com/big.bin"])
    wait_until(lambda: out.exists() and out.stat().st_size > 5_000_000, 15, "the download to start")
    assert via_bridge(lab, "https://later.example.com/", "-k").returncode != 0  # the peer has no such route yet
    # Both ends reload while the tunnel is open: the peer gains a route, the ingress a limit.
    peer.rewrite_config(peer.config_text + f'\n[[route]]\nname = "later.example.com"\nhost = "{HOSTS["host2"]}"\n'
                                           'port = 8443\n')
    ingress.rewrite_config(ingress.config_text.replace("[log]", "[limits]\nmax_tunnels = 500\n\n[log]", 1))
    for k in (peer, ingress):
        k.popen.send_signal(signal.SIGHUP)
        wait_until(lambda k=k: "reloaded" in k.stderr(), 5, "the reload", k.stderr)
    assert "reload refused" not in peer.stderr() + ingress.stderr()
    result = via_bridge(lab, "https://later.example.com/", "-k")
    assert result.stdout == "host2\n\n200", result.stdout + result.stderr
    assert download.wait(60) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.big_sha256


def test_100_mb_download_and_upload_are_intact(lab, ingress):
    result = lab.curl("https://www.example.com/big.bin", "-o", "-", role="bclient", max_time=120, text=False)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == lab.big_sha256
    result = lab.curl(f"https://upload.example.org/", "--data-binary", f"@{lab.dir / 'big.bin'}",
                      "-H", "Content-Type: application/octet-stream", role="bclient", max_time=120)
    assert result.returncode == 0, result.stderr
    digest, client = result.stdout.split()
    assert digest == lab.big_sha256
    assert client == netlab.embed(BCLIENT_ADDRESS, PEER_PREFIX)
    moved = [r for r in records(lab, "ingress-access.log") if r["name"] == "upload.example.org"]
    assert moved and moved[-1]["bytes_to_host"] > BIG
