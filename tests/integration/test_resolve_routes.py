"""Route by DNS in the namespace lab: dnsmasq answers the AAAA records, real curl and nginx (issue #10).

dnsmasq runs in host2's namespace on [2001:db8::20]:5353 with a hosts file
of its own (a short TTL, nothing else: no upstream, no /etc/hosts):

    a.example.org    → host1 (2001:db8::10)
    b.example.org    → host2 (2001:db8::20)
    out.example.org  → 2001:db8::1:10, outside the route's networks
    none.example.org → an A record only (NODATA for AAAA)
    nx.example.org   → nothing (NXDOMAIN: dnsmasq is authoritative for example.org here)
    move.example.org → host1, then host2 (the file rewritten, dnsmasq told with SIGHUP)

kracauer's one route ``*.example.org`` has ``resolve = true`` and
``networks = ["2001:db8::/120"]`` (both hosts, not out.example.org). curl
reaches each name's host over tls, http and the connect listener, and the
host logs the client's embedded address; the other names are refused as
unknown names are, each with its own access-log outcome. The last test
reloads kracauer with a DNS server that never answers.

Runs with the lab's workers setting (KRACAUER_LAB_WORKERS; scripts/test's
first run uses 2): each worker has its own resolver and cache.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time

import pytest

from tests import netlab
from tests.netlab import CLIENT_ADDRESS, HOSTS, SERVICE_ADDRESS, Lab, wait_until

MISSING = netlab.missing_requirements() + ([] if shutil.which("dnsmasq") else ["`dnsmasq` (scripts/setup-env)"])

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

DNS_ADDRESS = HOSTS["host2"]
DNS_PORT = 5353
SILENT_PORT = 5354  # a UDP socket that reads nothing and answers nothing
TTL = 2
OUTSIDE = "2001:db8::1:10"
PROXY = f"http://{SERVICE_ADDRESS}:3128"
METRICS = "127.0.0.1:9481"
RECORDS = {
    "a.example.org": HOSTS["host1"],
    "b.example.org": HOSTS["host2"],
    "out.example.org": OUTSIDE,
    "none.example.org": "192.0.2.99",
    "move.example.org": HOSTS["host1"],
}
SINK = ("import socket, time\n"
        f"s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(('{DNS_ADDRESS}', {SILENT_PORT}))\n"
        "time.sleep(3600)\n")


def config(lab: Lab, servers: str = f'["[{DNS_ADDRESS}]:{DNS_PORT}"]', extra: str = "") -> str:
    return f"""\
[tun]
name = "kracauer0"

[translate]
prefix = "{netlab.PREFIX}"

[[listen]]
address = "{SERVICE_ADDRESS}"
port = 443
protocol = "tls"

[[listen]]
address = "{SERVICE_ADDRESS}"
port = 80
protocol = "http"

[[listen]]
address = "{SERVICE_ADDRESS}"
port = 3128
protocol = "connect"
allow = ["{CLIENT_ADDRESS}/32"]

[[route]]
name = "*.example.org"
resolve = true
networks = ["2001:db8::/120"]

[[route]]
name = "www.example.com"
host = "{HOSTS['host1']}"

[resolver]
servers = {servers}
{extra}
[metrics]
listen = "{METRICS}"

[log]
access = "{lab.dir}/access.log"
"""


def write_hosts(path, records: dict[str, str]) -> None:
    path.write_text("".join(f"{address} {name}\n" for name, address in records.items()))


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        hosts = lab.dir / "dns-hosts"
        write_hosts(hosts, RECORDS)
        dnsmasq = lab.popen("host2", [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--addn-hosts={hosts}", "--local=/example.org/", f"--local-ttl={TTL}",
            f"--listen-address={DNS_ADDRESS}", "--bind-interfaces", f"--port={DNS_PORT}",
            "--user=root", "--group=root", f"--pid-file={lab.dir}/dnsmasq.pid",
            "--log-queries", f"--log-facility={lab.dir}/dnsmasq.log"],
            stdin=None, stdout=None, stderr=None)
        wait_until(lambda: f"{DNS_PORT}" in " ".join(lab.listening_ports("host2")) or dnsmasq.poll() is not None,
                   10, "dnsmasq to listen")
        assert dnsmasq.poll() is None, (lab.dir / "dnsmasq.log").read_text() if (lab.dir / "dnsmasq.log").exists() else ""
        lab.popen("host2", [sys.executable, "-c", SINK])
        lab.dnsmasq = dnsmasq
        lab.hosts_file = hosts
        yield lab


@pytest.fixture(scope="module")
def kracauer(lab):
    k = lab.start_kracauer(config(lab))
    wait_until(lambda: not k.running() or "running on" in k.stderr(), 15, "kracauer to run", k.stderr)
    assert k.running(), k.stderr()
    yield k
    code, stderr = k.stop()
    assert code == 0, stderr


def access_log(lab: Lab) -> list[dict]:
    path = lab.dir / "access.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged(lab: Lab, predicate) -> dict:
    return wait_until(lambda: next((e for e in access_log(lab) if predicate(e)), None), 10,
                      "kracauer's access-log line", lambda: json.dumps(access_log(lab)[-5:], indent=1))


def scrape(lab: Lab) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = lab.run("box", ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics"], timeout=10)
    assert r.returncode == 0, r.stderr
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.stdout) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, x) in ls for k, x in labels.items()))


def test_dnsmasq_answers_the_lab_records(lab):
    # The lab's own check: the records are what the tests below rely on (dig is not in the lab, curl is not
    # a resolver, so ask with Python's codec from the box namespace).
    probe = ("import socket, sys\nsys.path.insert(0, '.')\nfrom netstack import dns\n"
             f"s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(3)\n"
             f"s.sendto(dns.build_query(7, 'a.example.org'), ('{DNS_ADDRESS}', {DNS_PORT}))\n"
             "m = dns.parse_message(s.recv(4096)); print(m.rcode, [r.ttl for r in m.answers])\n"
             "print(socket.inet_ntop(socket.AF_INET6, dns.aaaa_answer(m, 'a.example.org')[0][0]))\n")
    r = lab.run("box", [sys.executable, "-c", probe], timeout=10)
    assert r.returncode == 0, r.stderr
    rcode, address = r.stdout.splitlines()
    assert rcode == f"0 [{TTL}]" and address == HOSTS["host1"]


@pytest.mark.parametrize("name, host", [("a.example.org", "host1"), ("b.example.org", "host2")])
def test_each_name_reaches_the_host_of_its_aaaa_record_which_sees_the_client(lab, kracauer, name, host):
    r = lab.curl(f"https://{name}/")
    assert r.returncode == 0, r.stderr + kracauer.stderr()[-2000:]
    assert r.stdout == f"{host}\n"
    embedded = netlab.embed(CLIENT_ADDRESS)
    lab.wait_for_log(host, lambda e: e["remote_addr"] == embedded and e["sni"] == name)
    entry = logged(lab, lambda e: e["name"] == name and e["outcome"] == "closed")
    assert entry["route"] == "*.example.org" and entry["host"] == HOSTS[host] and entry["host_port"] == 443


def test_http_and_connect_listeners_route_by_dns_too(lab, kracauer):
    r = lab.curl("http://b.example.org/")
    assert r.returncode == 0 and r.stdout == "host2\n", r.stderr
    lab.wait_for_log("host2", lambda e: e["host"] == "b.example.org" and e["server_port"] == "80")
    argv = ["curl", "-sS", "--max-time", "15", "--cacert", str(lab.ca_cert), "-p", "-x", PROXY,
            "https://a.example.org/"]
    r = lab.run("client", argv, timeout=25)
    assert r.returncode == 0 and r.stdout == "host1\n", r.stderr
    logged(lab, lambda e: e["name"] == "a.example.org:443" and e["protocol"] == "connect"
           and e["outcome"] == "closed" and e["host"] == HOSTS["host1"])


@pytest.mark.parametrize("name, outcome", [
    ("out.example.org", "refused_outside_networks"),
    ("none.example.org", "refused_unresolved"),
    ("nx.example.org", "refused_unresolved"),
])
def test_names_without_an_address_inside_the_networks_are_refused_as_unknown_names(lab, kracauer, name, outcome):
    r = lab.curl(f"https://{name}/")
    # The TLS alert unrecognized_name: curl fails the handshake (35).
    assert r.returncode == 35, (r.returncode, r.stdout, r.stderr)
    entry = logged(lab, lambda e: e["name"] == name and e["protocol"] == "tls")
    assert entry["outcome"] == outcome and entry["host"] is None
    r = lab.curl(f"http://{name}/", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.stdout == "421", (r.stdout, r.stderr)
    assert logged(lab, lambda e: e["name"] == name and e["protocol"] == "http")["outcome"] == outcome
    assert not any(e.get("host") == name for host in HOSTS for e in lab.access_log(host))


def test_a_changed_record_moves_new_connections_once_its_ttl_ran_out(lab, kracauer):
    assert lab.curl("https://move.example.org/").stdout == "host1\n"
    write_hosts(lab.hosts_file, {**RECORDS, "move.example.org": HOSTS["host2"]})
    lab.dnsmasq.send_signal(signal.SIGHUP)  # dnsmasq re-reads its hosts files
    time.sleep(TTL + 0.5)
    # Each worker has its cache: a few connections from different ports reach them all.
    for port in range(43000, 43004):
        r = lab.curl("https://move.example.org/", "--local-port", str(port))
        assert r.stdout == "host2\n", (r.stdout, r.stderr)


def test_lookups_and_the_cache_are_counted(lab, kracauer):
    def counted():
        samples = scrape(lab)
        return samples if metric(samples, "kracauer_dns_lookups_total", outcome="answer") else None

    samples = wait_until(counted, 5, "the lookup metrics")
    assert metric(samples, "kracauer_dns_lookups_total", outcome="nxdomain") >= 1
    assert metric(samples, "kracauer_dns_lookups_total", outcome="nodata") >= 1
    assert metric(samples, "kracauer_dns_cache_entries") >= 0
    assert metric(samples, "kracauer_connections_closed_total", outcome="refused_outside_networks") >= 2


def test_a_reload_to_a_dns_server_that_never_answers_gives_the_timeout_outcome(lab, kracauer):
    kracauer.rewrite_config(config(lab, servers=f'["[{DNS_ADDRESS}]:{SILENT_PORT}"]',
                                   extra="timeout = 0.5\nattempts = 1\n"))
    kracauer.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in kracauer.stderr(), 10, "the reload", kracauer.stderr)
    time.sleep(0.5)  # the workers apply it after the supervisor
    started = time.monotonic()
    r = lab.curl("https://a.example.org/")
    assert r.returncode == 35, (r.returncode, r.stdout, r.stderr)
    assert time.monotonic() - started < 5
    entry = logged(lab, lambda e: e["outcome"] == "refused_resolver_timeout")
    assert entry["name"] == "a.example.org"
    # A name with a static route is not affected.
    assert lab.curl("https://www.example.com/").stdout == "host1\n"
    assert "reload refused" not in kracauer.stderr()
