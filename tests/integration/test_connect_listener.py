"""The explicit proxy (a connect listener) in the namespace lab, with real curl and nginx (issue #10).

curl in the client namespace uses kracauer as its HTTPS proxy
(``curl -p -x http://192.0.2.10:3128 https://www.example.com/``): it sends
``CONNECT www.example.com:443``, kracauer answers 200 once host1 accepted,
and curl's TLS session runs end to end with host1's nginx, which logs the
client's embedded address. Every test runs twice, with the kernel data path
on and off; with it on, the 20 MB download's bytes must have gone through
the BPF program.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from tests import netlab
from tests.netlab import CLIENT_ADDRESS, SERVICE_ADDRESS, Lab, example_config, wait_until

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

PROXY = f"http://{SERVICE_ADDRESS}:3128"
# A second address of the client namespace, outside the proxy's `allow`.
OUTSIDER = "198.51.100.3"
METRICS = "127.0.0.1:9479"
# Both data paths in the default run; a run with KRACAUER_LAB_KERNEL_PATH=off (scripts/test's second) only that one.
MODES = ("on", "off") if netlab.lab_kernel_path() == "on" else (netlab.lab_kernel_path(),)


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        lab.run("client", ["ip", "addr", "add", f"{OUTSIDER}/24", "dev", "eth0"], check=True)
        yield lab


@pytest.fixture(scope="module", params=MODES, ids=[f"kernel-path-{mode}" for mode in MODES])
def kracauer(request, lab):
    mode = request.param
    text = example_config() + f"""
[[listen]]
address = "{SERVICE_ADDRESS}"
port = 3128
protocol = "connect"
allow = ["{CLIENT_ADDRESS}/32"]
ports = [443, 8443]

[metrics]
listen = "{METRICS}"

[log]
access = "{lab.dir}/access-{mode}.log"
"""
    k = lab.start_kracauer(lab.with_kernel_path(text, mode))
    wait_until(lambda: not k.running() or "running on" in k.stderr(), 15, "kracauer to run", k.stderr)
    assert k.running(), k.stderr()
    assert ("kernel path on" in k.stderr()) is (mode == "on"), k.stderr()
    k.mode = mode
    yield k
    code, stderr = k.stop()
    assert code == 0, stderr


def via_proxy(lab: Lab, url: str, *args: str, max_time: float = 15):
    """curl `url` through the proxy (tunnel, -p); stdout ends with the proxy's status (%{http_connect})."""
    argv = ["curl", "-sS", "--max-time", f"{max_time:g}", "--cacert", str(lab.ca_cert), "-p", "-x", PROXY,
            "-w", "\n%{http_connect}", *args, url]
    return lab.run("client", argv, timeout=max_time + 10)


def access_log(lab: Lab, k) -> list[dict]:
    path = lab.dir / f"access-{k.mode}.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged(lab: Lab, k, predicate) -> dict:
    return wait_until(lambda: next((e for e in access_log(lab, k) if predicate(e)), None), 5,
                      "kracauer's access-log line", lambda: str(access_log(lab, k)))


def scrape(lab: Lab) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = lab.run("box", ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics"], timeout=10)
    assert r.returncode == 0, r.stderr
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.stdout) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, x) in ls for k, x in labels.items()))


def test_curl_through_the_proxy_reaches_the_named_host_which_sees_the_client(lab, kracauer):
    r = via_proxy(lab, "https://www.example.com/")
    assert r.returncode == 0, r.stderr + kracauer.stderr()[-2000:]
    assert r.stdout == "host1\n\n200", r.stdout
    embedded = netlab.embed(CLIENT_ADDRESS)
    lab.wait_for_log("host1", lambda e: e["remote_addr"] == embedded and e["request"].startswith("GET / "))
    entry = logged(lab, kracauer, lambda e: e["name"] == "www.example.com:443" and e["outcome"] == "closed")
    assert entry["protocol"] == "connect" and entry["listener"] == f"{SERVICE_ADDRESS}:3128"
    assert entry["host"] == netlab.HOSTS["host1"] and entry["host_port"] == 443
    assert entry["hello_size"] > 0 and entry["bytes_to_host"] > 0 and entry["bytes_to_client"] > 0


def test_a_route_with_its_own_port_is_followed(lab, kracauer):
    # *.example.org goes to host2 on 8443 whatever port the CONNECT names.
    r = via_proxy(lab, "https://api.example.org/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "host2\n\n200"


@pytest.mark.parametrize(("url", "args", "outcome"), [
    ("https://www.example.com/", ("--interface", OUTSIDER), "refused_client"),
    ("https://www.example.com:8080/", (), "refused_port"),
    ("https://unknown.example.com/", (), "refused_unknown_name"),
], ids=["client-outside-allow", "port-not-allowed", "unknown-name"])
def test_the_proxy_answers_403(lab, kracauer, url, args, outcome):
    r = via_proxy(lab, url, *args)
    # curl: "CONNECT tunnel failed, response 403" (exit code 56).
    assert r.returncode == 56, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.splitlines()[-1] == "403"
    assert "403" in r.stderr
    entry = logged(lab, kracauer, lambda e: e["outcome"] == outcome)
    assert entry["protocol"] == "connect" and entry["host"] is None


def test_a_20_mb_download_through_the_proxy_is_intact(lab, kracauer):
    before = scrape(lab)
    out = lab.dir / f"big-{kracauer.mode}.bin"
    r = via_proxy(lab, "https://www.example.com/big.bin", "-o", str(out), max_time=60)
    assert r.returncode == 0, r.stderr + kracauer.stderr()[-2000:]
    assert r.stdout.splitlines()[-1] == "200"
    assert out.stat().st_size == netlab.BIG_FILE_SIZE
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.big_sha256
    out.unlink()
    entry = logged(lab, kracauer, lambda e: e["outcome"] == "closed" and e["bytes_to_client"] > netlab.BIG_FILE_SIZE)
    assert entry["name"] == "www.example.com:443"

    def kernel_bytes() -> float:
        # The kernel's counters reach the metrics once a second.
        return (metric(scrape(lab), "kracauer_kernel_bytes_total", direction="to_client")
                - metric(before, "kracauer_kernel_bytes_total", direction="to_client"))

    if kracauer.mode == "on":
        # The tunnel went into the kernel: the program carried nearly all of it.
        wait_until(lambda: kernel_bytes() > netlab.BIG_FILE_SIZE * 0.9, 5, "the kernel's byte count",
                   lambda: str(kernel_bytes()))
    else:
        wait_until(lambda: metric(scrape(lab), "kracauer_bytes_total", direction="to_client")
                   > metric(before, "kracauer_bytes_total", direction="to_client") + netlab.BIG_FILE_SIZE, 5,
                   "the Python path's byte count")
        assert kernel_bytes() == 0
