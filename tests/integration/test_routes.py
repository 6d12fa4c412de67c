"""Several hosts per route with failover, ALPN routes and a per-listener prefix, in the lab (issue #5)."""

from __future__ import annotations

import hashlib
import ipaddress
import subprocess
import time

import pytest

from netstack.steer import queue_of
from tests import netlab
from tests.netlab import CLIENT_ADDRESS, HOSTS, SERVICE_ADDRESS, Lab, wait_until

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

SECOND_ADDRESS = "192.0.2.11"
SECOND_PREFIX = "64:ff9b:2::/96"


def rank(client: str, host: str) -> bytes:
    """The rendezvous score kracauer gives `host` for `client` (netstack.tracker._host_order)."""
    return hashlib.blake2s(ipaddress.IPv4Address(client).packed + ipaddress.IPv6Address(host).packed,
                           digest_size=8).digest()


def dead_host_tried_first() -> str:
    """An address on the hosts' link where nobody answers, that the lab's client tries before host1."""
    for last in range(0x30, 0x100):
        dead = f"2001:db8::{last:x}"
        if rank(CLIENT_ADDRESS, dead) > rank(CLIENT_ADDRESS, HOSTS["host1"]):
            return dead
    raise AssertionError("no candidate ranks above host1")


def config(dead: str) -> str:
    return f"""
[tun]
name = "kracauer0"

[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "{SERVICE_ADDRESS}"
port = 443
protocol = "tls"

[[listen]]
address = "{SECOND_ADDRESS}"
port = 443
protocol = "tls"
prefix = "{SECOND_PREFIX}"

[[route]]
name = "www.example.com"
host = ["{dead}", "{HOSTS['host1']}"]

[[route]]
name = "www.example.com"
alpn = "acme-tls/1"
host = "{HOSTS['host2']}"

[health]
max_fails = 1
fail_timeout = 60
"""


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        # The hosts route the second prefix back through the box, as docs/configuration.md says.
        for host in HOSTS:
            lab.run(host, ["ip", "-6", "route", "add", SECOND_PREFIX, "via", netlab.BOX_HOST_ADDRESS], check=True)
        lab.run("client", ["ip", "route", "add", f"{SECOND_ADDRESS}/32", "via", netlab.BOX_CLIENT_ADDRESS],
                check=False)
        yield lab


@pytest.fixture(scope="module")
def kracauer(lab):
    k = lab.start_kracauer(config(dead_host_tried_first()))
    yield k
    code, stderr = k.stop()
    assert code == 0, stderr


def fetch(lab: Lab, address: str = SERVICE_ADDRESS) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = lab.curl("https://www.example.com/", address=address, max_time=20)
    return proc, time.monotonic() - started


def test_a_dead_host_is_failed_over_unnoticed_then_skipped(lab, kracauer):
    first, took = fetch(lab)
    assert first.returncode == 0 and first.stdout == "host1\n", first.stderr + kracauer.stderr()[-2000:]
    assert took > 1.0, "the dead host was tried first (it ranks first for this client)"
    # It failed once (max_fails = 1): the next connection goes straight to host1.
    second, took = fetch(lab)
    assert second.returncode == 0 and second.stdout == "host1\n", second.stderr
    assert took < 1.0
    entries = [e for e in lab.access_log("host1") if e["remote_addr"] == netlab.embed(CLIENT_ADDRESS)]
    assert len(entries) >= 2


def test_with_several_workers_every_worker_skips_the_host_one_marked_down(lab, kracauer):
    # After the test above, one worker saw the dead host fail; within a second every worker knows.
    if "workers, one per TUN queue" not in kracauer.stderr():
        pytest.skip("kracauer runs one worker here (KRACAUER_LAB_WORKERS=1)")
    fetch(lab)  # in case this test runs alone: someone marks it down
    time.sleep(1.5)
    client = ipaddress.IPv4Address(CLIENT_ADDRESS).packed
    ports = {queue_of(client, port, 2): port for port in range(46000, 46020)}
    assert sorted(ports) == [0, 1]
    for worker, port in sorted(ports.items()):
        started = time.monotonic()
        proc = lab.curl("https://www.example.com/", "--local-port", str(port), max_time=20)
        took = time.monotonic() - started
        assert proc.returncode == 0 and proc.stdout == "host1\n", proc.stderr
        assert took < 1.0, f"worker {worker} tried the dead host again ({took:.1f} s)"


def test_alpn_route_takes_clients_offering_the_protocol(lab, kracauer):
    proc = lab.run("client", ["openssl", "s_client", "-connect", f"{SERVICE_ADDRESS}:443", "-servername",
                              "www.example.com", "-alpn", "acme-tls/1,http/1.1", "-CAfile", str(lab.ca_cert)],
                   input="", timeout=20)
    assert "host2.lab" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-1000:]
    plain = lab.run("client", ["openssl", "s_client", "-connect", f"{SERVICE_ADDRESS}:443", "-servername",
                               "www.example.com", "-alpn", "http/1.1", "-CAfile", str(lab.ca_cert)],
                    input="", timeout=20)
    assert "host1.lab" in plain.stdout, plain.stdout[-2000:]


def test_a_listener_with_its_own_prefix_shows_hosts_which_address_was_used(lab, kracauer):
    proc, _ = fetch(lab, address=SECOND_ADDRESS)
    assert proc.returncode == 0 and proc.stdout == "host1\n", proc.stderr + kracauer.stderr()[-2000:]
    expected = netlab.embed(CLIENT_ADDRESS, prefix=SECOND_PREFIX)
    wait_until(lambda: any(e["remote_addr"] == expected for e in lab.access_log("host1")), 5,
               f"host1 logging {expected}", lambda: lab.access_log_text("host1"))
