"""Operations in the namespace lab: access log, metrics, status, reload, restart with state, systemd (issue #5).

One lab for the module (nginx hosts serving a 200 MB big.bin); each test
starts its own kracauer in the box and leaves no TUN behind.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pwd
import signal
import socket
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kracauer.daemon import saved_shards
from tests import netlab
from tests.netlab import CLIENT_ADDRESS, HOSTS, SERVICE_ADDRESS, Lab, LabError, embed, example_config, wait_until

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

BIG = 200 * 1024 * 1024
METRICS_URL = "http://127.0.0.1:9477/metrics"
EMBEDDED_CLIENT = embed(CLIENT_ADDRESS)


@pytest.fixture(scope="module")
def lab():
    with Lab(big_file_size=BIG) as lab:
        yield lab


@pytest.fixture
def clean_box(lab):
    """After the test: no kracauer running and no TUN left in the box."""
    yield lab
    lab.reset_box(timeout=10)


def config(lab, *, access=True, metrics=True, state=False, extra="", **kw) -> str:
    text = example_config(**kw)
    if access:
        text += f'\n[log]\naccess = "{lab.dir}/access.log"\n'
    if metrics:
        text += '\n[metrics]\nlisten = "127.0.0.1:9477"\n'
    if state:
        text += f'\n[state]\nfile = "{lab.dir}/state/state.json"\n'
    return text + extra


def start(lab, text: str, *, extra_args=()) -> netlab.Kracauer:
    """Start kracauer and wait until it says it runs (a TUN left in place is there before it is ready)."""
    k = lab.start_kracauer(text, extra_args=extra_args)
    try:
        wait_until(lambda: not k.running() or "running on" in k.stderr(), 15, "kracauer to run", k.stderr)
    except LabError:
        k.stop()
        raise
    assert k.running(), k.stderr()
    return k


def scrape(lab) -> dict[tuple, float]:
    r = lab.run("box", ["curl", "-sS", "--max-time", "5", METRICS_URL], timeout=10)
    assert r.returncode == 0, r.stderr
    out = {}
    for family in text_string_to_metric_families(r.stdout):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def saved_state(lab) -> list[str]:
    """The state files a stop left: state.json, or one per worker (state.json.0, ...)."""
    return saved_shards(str(lab.dir / "state" / "state.json"))


def access_entries(lab) -> list[dict]:
    path = lab.dir / "access.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def slow_download(lab, name: str, out, rate: str, *args: str) -> subprocess.Popen:
    """curl big.bin at `rate` in the background; the request carries ``?t=<out's name>`` for the host logs."""
    return lab.popen("client", [
        "curl", "-sS", "--max-time", "120", "--cacert", str(lab.ca_cert), "--resolve", f"{name}:443:{SERVICE_ADDRESS}",
        "--limit-rate", rate, "-o", str(out), "-w", "%{http_code} %{num_connects} %{size_download}", *args,
        f"https://{name}/big.bin?t={out.name}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sha256_prefix(path, n: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(n))
    return digest.hexdigest()


def host_connections(lab, host: str) -> list[str]:
    """Established TCP connections to :443 in a host's namespace, as 'peer' strings."""
    r = lab.run(host, ["ss", "-Htn", "state", "established", "( sport = :443 )"], timeout=10)
    return [line.split()[-1] for line in r.stdout.splitlines() if line.strip()]


# -- access log, metrics, status ------------------------------------------------


def test_access_log_metrics_and_status(lab, clean_box):
    (lab.dir / "access.log").unlink(missing_ok=True)
    k = start(lab, config(lab))
    assert lab.curl("https://www.example.com/").stdout == "host1\n"
    assert lab.curl("http://www.example.net/").stdout == "host2\n"
    assert lab.curl("http://unknown.invalid/", "-o", "/dev/null", "-w", "%{http_code}").stdout == "421"
    entries = wait_until(lambda: len(access_entries(lab)) >= 3 and access_entries(lab), 20,
                         "three access-log lines", lambda: k.stderr())
    by_name = {e["name"]: e for e in entries}
    tls = by_name["www.example.com"]
    assert (tls["client"], tls["listener"], tls["protocol"]) == (CLIENT_ADDRESS, f"{SERVICE_ADDRESS}:443", "tls")
    assert (tls["route"], tls["host"], tls["host_port"], tls["outcome"]) == \
        ("www.example.com", HOSTS["host1"], 443, "closed")
    assert tls["bytes_to_client"] > 0 and tls["bytes_to_host"] > 0 and tls["packets_to_client"] > 0
    assert tls["hello_size"] > 0 and tls["hello_segments"] >= 1 and tls["hello_records"] >= 1
    assert "http/1.1" in tls["alpn"] and tls["connect_time"] > 0
    start_time = datetime.datetime.strptime(tls["start"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - start_time).total_seconds()) < 60
    assert by_name["www.example.net"]["protocol"] == "http" and "hello_records" not in by_name["www.example.net"]
    assert by_name["unknown.invalid"]["outcome"] == "refused_unknown_name"
    assert by_name["unknown.invalid"]["host"] is None

    # A connection in progress shows up by route and host.
    out = lab.dir / "partial.bin"
    curl = slow_download(lab, "www.example.com", out, "4M", "-r", "0-8388607")
    try:
        samples = wait_until(lambda: (s := scrape(lab)) and total(
            s, "kracauer_connections_active_by_route", route="www.example.com", host=HOSTS["host1"]) == 1 and s,
            10, "the download in the metrics")
        status = lab.run("box", [*lab.kracauer_cmd, "status", "--config", str(k.config_path)], timeout=20)
        assert status.returncode == 0, status.stderr
        assert any(line.split() == ["www.example.com", HOSTS["host1"], "1"] for line in status.stdout.splitlines()), \
            status.stdout
        assert " up " in status.stdout.splitlines()[0]
        assert "packets dropped by reason:" in status.stdout
    finally:
        curl.kill()
        curl.wait()
    # The loop copies its counters once a second (with several workers, each worker's reach the
    # endpoint then): wait for the connections made above to be counted.
    samples = wait_until(lambda: (s := scrape(lab)) and total(
        s, "kracauer_connections_opened_total", listener=f"{SERVICE_ADDRESS}:80") >= 2 and total(
        s, "kracauer_connections_opened_total", listener=f"{SERVICE_ADDRESS}:443") >= 2 and s, 5,
        "the connections counted", lambda: str(scrape(lab)))
    assert total(samples, "kracauer_connections_opened_total", listener=f"{SERVICE_ADDRESS}:443") >= 2
    assert total(samples, "kracauer_connections_opened_total", listener=f"{SERVICE_ADDRESS}:80") >= 2
    assert total(samples, "kracauer_connections_closed_total", route="www.example.com", outcome="closed") >= 1
    assert total(samples, "kracauer_connections_closed_total", outcome="refused_unknown_name") == 1
    assert total(samples, "kracauer_bytes_total", direction="to_client") >= tls["bytes_to_client"]
    assert total(samples, "kracauer_connect_seconds_count") >= 2
    assert total(samples, "kracauer_build_info") == 1
    assert ("kracauer_connections_active", ()) in samples
    assert ("kracauer_connections_half_open", ()) in samples
    rc, stderr = k.stop()
    assert rc == 0, stderr


def test_http_without_host_is_400_in_http11_and_goes_to_the_fallback_in_http10(lab, clean_box):
    (lab.dir / "access.log").unlink(missing_ok=True)
    k = start(lab, config(lab, fallback=HOSTS["host2"]))
    r = lab.curl("http://www.example.com/", "--http1.1", "-H", "Host:", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.returncode == 0 and r.stdout == "400", (r.stdout, r.stderr, k.stderr())
    r = lab.curl("http://www.example.com/", "--http1.0", "-H", "Host:")
    assert r.returncode == 0 and r.stdout == "host2\n", (r.stdout, r.stderr, k.stderr())
    entries = wait_until(lambda: len(access_entries(lab)) >= 2 and access_entries(lab), 20,
                         "two access-log lines", lambda: k.stderr())
    assert sorted((e["outcome"], e["route"]) for e in entries) == [("closed", "fallback"), ("refused_bad_request", None)]
    rc, stderr = k.stop()
    assert rc == 0, stderr


def test_status_without_a_running_daemon_exits_1(lab):
    r = lab.run("box", [*lab.kracauer_cmd, "status", "--metrics", "http://127.0.0.1:9/metrics"], timeout=20)
    assert r.returncode == 1 and "cannot read" in r.stderr


# -- reload ----------------------------------------------------------------------


def test_sighup_moves_new_connections_while_a_bound_one_keeps_its_host(lab, clean_box):
    k = start(lab, config(lab, access=False))
    out = lab.dir / "reload.bin"
    size = 12 * 1024 * 1024
    curl = slow_download(lab, "www.example.com", out, "4M", "-r", f"0-{size - 1}")
    wait_until(lambda: out.exists() and out.stat().st_size > 1_000_000, 10, "the download to start")
    assert host_connections(lab, "host1") == [f"[{EMBEDDED_CLIENT}]:{host_connections(lab, 'host1')[0].rsplit(':', 1)[1]}"]

    # www.example.com moves to host2.
    k.rewrite_config(config(lab, access=False).replace(
        f'name = "www.example.com"\nhost = "{HOSTS["host1"]}"', f'name = "www.example.com"\nhost = "{HOSTS["host2"]}"'))
    k.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in k.stderr(), 5, "the reload", k.stderr)
    assert lab.curl("https://www.example.com/").stdout == "host2\n"

    # A broken file, then one that needs a restart: both refused, host2 stays.
    good = k.config_path.read_text()
    k.config_path.write_text(good.replace("[tun]", "[tun"))
    k.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: k.stderr().count("reload refused") == 1, 5, "the refusal", k.stderr)
    assert "invalid TOML" in k.stderr()
    k.rewrite_config(good.replace("mtu = 1500", "mtu = 1400"))
    k.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: k.stderr().count("reload refused") == 2, 5, "the second refusal", k.stderr)
    assert "[tun] changed" in k.stderr()
    assert lab.curl("https://www.example.com/").stdout == "host2\n"

    stdout, stderr = curl.communicate(timeout=30)
    assert stdout.split() == ["206", "1", str(size)], stderr
    assert sha256_prefix(out, size) == sha256_prefix(lab.dir / "big.bin", size)
    assert [e["status"] for e in lab.access_log("host1") if out.name in e["request"]] == ["206"]
    samples = scrape(lab)
    assert total(samples, "kracauer_config_reloads_total", result="ok") == 1
    assert total(samples, "kracauer_config_reloads_total", result="failed") == 2
    assert k.running()


# -- restart without dropping a connection -------------------------------------------


def test_a_200mb_download_carries_on_across_a_stop_and_start_with_state(lab, clean_box):
    (lab.dir / "state").mkdir(exist_ok=True)
    text = config(lab, state=True)
    k1 = start(lab, text)
    out = lab.dir / "restart.bin"
    curl = slow_download(lab, "www.example.com", out, "30M")
    try:
        wait_until(lambda: out.exists() and out.stat().st_size > 20_000_000, 15, "the download to be under way")
        [peer] = host_connections(lab, "host1")
        rc, stderr = k1.stop()
        assert rc == 0, stderr
        assert "saved 1 connection" in stderr
        assert saved_state(lab)
        # The TUN and its routes stay for the next process.
        assert lab.link_exists("box", "kracauer0")
        assert {r["dst"] for r in lab.routes("box", "kracauer0")} == {SERVICE_ADDRESS}
        assert out.stat().st_size < BIG

        k2 = start(lab, text)
        assert "restored 1 connection" in k2.stderr(), k2.stderr()
        assert not saved_state(lab)
        assert host_connections(lab, "host1") == [peer]  # the same connection, nothing new
        stdout, stderr = curl.communicate(timeout=60)
    finally:
        if curl.poll() is None:
            curl.kill()
    assert stdout.split() == ["200", "1", str(BIG)], stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.big_sha256
    out.unlink()
    requests = [e for e in lab.access_log("host1") if out.name in e["request"]]
    assert len(requests) == 1 and requests[0]["status"] == "200" and requests[0]["bytes"] == str(BIG)
    assert requests[0]["remote_addr"] == EMBEDDED_CLIENT
    # The second process logs the connection when it ends, with the whole transfer.
    wait_until(lambda: any(e["bytes_to_client"] > BIG and e["route"] == "www.example.com"
                           for e in access_entries(lab)), 15, "the download in the access log", k2.stderr)

    # Stop for good.
    rc, stderr = k2.stop()
    assert rc == 0 and "left in place" in stderr
    r = lab.run("box", [*lab.kracauer_cmd, "cleanup", "--config", str(k2.config_path)], timeout=20)
    assert r.returncode == 0 and "removed the TUN kracauer0" in r.stdout, r.stdout + r.stderr
    assert not lab.link_exists("box", "kracauer0")
    assert not any(r.get("dev") == "kracauer0" for r in lab.routes("box", family=6))
    assert not saved_state(lab)


def test_no_keep_tun_stops_for_good_and_a_config_without_state_removes_a_left_tun(lab, clean_box):
    (lab.dir / "state").mkdir(exist_ok=True)
    k = start(lab, config(lab, state=True), extra_args=["--no-keep-tun"])
    rc, stderr = k.stop()
    assert rc == 0 and "routes removed" in stderr, stderr
    assert not lab.link_exists("box", "kracauer0")
    assert not saved_state(lab)

    k = start(lab, config(lab, state=True))
    k.stop()
    assert lab.link_exists("box", "kracauer0")
    # Without [state] kracauer behaves as always: its TUN goes when it stops, even one it found.
    k = start(lab, config(lab))
    assert "attached to the existing TUN" in k.stderr()
    rc, stderr = k.stop()
    assert rc == 0, stderr
    assert not lab.link_exists("box", "kracauer0")
    for path in saved_state(lab):
        os.unlink(path)


def test_cleanup_refuses_while_kracauer_runs(lab, clean_box):
    (lab.dir / "state").mkdir(exist_ok=True)
    k = start(lab, config(lab, state=True))
    r = lab.run("box", [*lab.kracauer_cmd, "cleanup", "--config", str(k.config_path)], timeout=20)
    assert r.returncode == 2 and "another kracauer" in r.stderr
    assert k.running()
    k.stop()


def test_state_with_an_unprivileged_user(lab, clean_box):
    nobody = pwd.getpwnam("nobody")
    state_dir = lab.dir / "state-nobody"
    state_dir.mkdir(mode=0o755, exist_ok=True)
    text = config(lab, access=False, metrics=False).replace("mtu = 1500", 'mtu = 1500\nuser = "nobody"') \
        + f'\n[state]\nfile = "{state_dir}/state.json"\n'
    # Root's directory: refused at start, with the fix in the message, and nothing left behind.
    k = lab.spawn_kracauer(text)
    assert k.wait(15) == 2, k.stderr()
    assert "cannot create files in" in k.stderr() and f"chown nobody {state_dir}" in k.stderr()
    assert not lab.link_exists("box", "kracauer0")

    os.chown(state_dir, nobody.pw_uid, nobody.pw_gid)
    k1 = start(lab, text)
    out = lab.dir / "nobody.bin"
    size = 16 * 1024 * 1024
    curl = slow_download(lab, "www.example.com", out, "5M", "-r", f"0-{size - 1}")
    try:
        wait_until(lambda: out.exists() and out.stat().st_size > 1_000_000, 10, "the download to start")
        rc, stderr = k1.stop()
        assert rc == 0 and "saved 1 connection" in stderr, stderr
        files = saved_shards(str(state_dir / "state.json"))
        assert files and all(os.stat(path).st_uid == nobody.pw_uid for path in files)
        assert lab.link_exists("box", "kracauer0")
        k2 = start(lab, text)
        assert "restored 1 connection" in k2.stderr(), k2.stderr()
        stdout, stderr = curl.communicate(timeout=30)
    finally:
        if curl.poll() is None:
            curl.kill()
    assert stdout.split() == ["206", "1", str(size)], stderr
    assert sha256_prefix(out, size) == sha256_prefix(lab.dir / "big.bin", size)


# -- systemd -----------------------------------------------------------------------


def test_sd_notify_ready_watchdog_reload_and_stopping(lab, clean_box, monkeypatch):
    path = lab.dir / "notify.sock"
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    messages: list[str] = []

    def receive():
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            pass
        return messages

    def seen(prefix, n=1):
        return lambda: sum(m.startswith(prefix) for m in receive()) >= n

    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping every 0.5 s
    try:
        k = start(lab, config(lab, access=False, metrics=False))
        wait_until(seen("READY=1"), 10, "READY=1", lambda: f"{messages}\n{k.stderr()}")
        ready = next(m for m in messages if m.startswith("READY=1"))
        assert "STATUS=0 connections" in ready
        t0 = time.monotonic()
        wait_until(seen("WATCHDOG=1", 3), 5, "three WATCHDOG=1", lambda: str(messages))
        assert time.monotonic() - t0 < 3
        messages.clear()
        k.popen.send_signal(signal.SIGHUP)
        wait_until(seen("READY=1"), 5, "READY=1 after the reload", lambda: str(messages))
        states = [m.split("\n")[0] for m in messages if not m.startswith(("WATCHDOG", "STATUS"))]
        assert states[:2] == ["RELOADING=1", "READY=1"]
        assert "MONOTONIC_USEC=" in next(m for m in messages if m.startswith("RELOADING=1"))
        rc, _ = k.stop()
        assert rc == 0
        assert seen("STOPPING=1")()
    finally:
        sock.close()
