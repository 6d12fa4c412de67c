"""The kernel data path in the namespace lab: established connections in BPF (issue #8).

Every other lab test runs with the lab's kernel-path mode (KRACAUER_LAB_KERNEL_PATH,
on by default; ./scripts/test runs the lab suite again with it off). These
check what only the kernel path does: the program carries the bulk of a
transfer (its counters in the metrics grow while the download runs), a
download goes on while kracauer is dead after `kill -9` and the next process
adopts it, and the `enabled` switch behaves as documented. And SYN cookies:
the program answers a client's SYN (timestamps on) and Python accepts the
cookie; a client without timestamps is answered by Python and keeps window
scaling and SACK, unless `python_syn_rate = 0`.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time

import pytest

from kracauer.daemon import saved_shards
from tests import netlab
from tests.netlab import SERVICE_ADDRESS, Lab, LabError, example_config, wait_until

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
    pytest.mark.skipif(netlab.lab_kernel_path() == "off", reason="KRACAUER_LAB_KERNEL_PATH=off: the Python path run"),
]

BIG = 200 * 1024 * 1024
METRICS = "127.0.0.1:9478"


@pytest.fixture(scope="module")
def lab():
    with Lab(big_file_size=BIG) as lab:
        yield lab


@pytest.fixture
def box(lab):
    yield lab
    lab.reset_box(timeout=10)


def config(lab, *, state: bool = False, kernel: str | None = "on", extra: str = "") -> str:
    text = example_config() + f'\n[metrics]\nlisten = "{METRICS}"\n[log]\naccess = "{lab.dir}/access.log"\n'
    if state:
        (lab.dir / "state").mkdir(exist_ok=True)
        text += f'\n[state]\nfile = "{lab.dir}/state/state.json"\n'
    text += extra
    return lab.with_kernel_path(text, kernel) if kernel else text


def start(lab, text: str) -> netlab.Kracauer:
    k = lab.start_kracauer(text)
    wait_until(lambda: not k.running() or "running on" in k.stderr(), 15, "kracauer to run", k.stderr)
    assert k.running(), k.stderr()
    return k


def scrape(lab) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = lab.run("box", ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics"], timeout=10)
    assert r.returncode == 0, r.stderr
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.stdout) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, x) in ls for k, x in labels.items()))


def download(lab, out, rate: str | None = None) -> subprocess.Popen:
    limit = ["--limit-rate", rate] if rate else []
    return lab.popen("client", [
        "curl", "-sS", "--max-time", "120", "--cacert", str(lab.ca_cert), "--resolve",
        f"www.example.com:443:{SERVICE_ADDRESS}", *limit, "-o", str(out), "-w", "%{http_code} %{size_download}",
        "https://www.example.com/big.bin"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(curl: subprocess.Popen, timeout: float = 90) -> str:
    try:
        stdout, stderr = curl.communicate(timeout=timeout)
    finally:
        if curl.poll() is None:
            curl.kill()
    assert curl.returncode == 0, stderr
    return stdout


def test_the_kernel_carries_a_download_and_its_bytes_show_while_it_runs(lab, box):
    k = start(lab, config(lab))
    assert "kernel path on" in k.stderr()
    out = lab.dir / "kernel.bin"
    curl = download(lab, out, "40M")
    try:
        wait_until(lambda: out.exists() and out.stat().st_size > 20_000_000, 15, "the download to be under way")
        first = scrape(lab)
        time.sleep(1.5)
        second = scrape(lab)
        assert metric(first, "kracauer_kernel_path_enabled") == 1
        assert metric(second, "kracauer_connections_in_kernel") == 1
        running = metric(second, "kracauer_kernel_bytes_total", direction="to_client")
        # A running download's bytes grow in the metrics, not only at its end.
        assert running > metric(first, "kracauer_kernel_bytes_total", direction="to_client") + 10_000_000
        assert metric(second, "kracauer_bytes_total", direction="to_client") == 0
        assert finish(curl).split() == ["200", str(BIG)]
    finally:
        if curl.poll() is None:
            curl.kill()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.big_sha256
    out.unlink()
    # Nearly every byte went through the program, not the Python loop (the
    # program's counters reach the metrics at the loop's next 1 s sync).
    samples = wait_until(lambda: (s := scrape(lab)) and metric(s, "kracauer_bytes_total", direction="to_client")
                         > BIG and metric(s, "kracauer_kernel_bytes_total", direction="to_client") > 0.95 * BIG
                         and metric(s, "kracauer_connections_in_kernel") == 0
                         and s, 10, "the ended download in the metrics, carried by the kernel",
                         lambda: str({k: v for k, v in scrape(lab).items() if "kernel" in k[0]}))
    [entry] = [e for e in netlab_access(lab) if e["route"] == "www.example.com"]
    assert entry["bytes_to_client"] > BIG and entry["outcome"] == "closed"


def netlab_access(lab) -> list[dict]:
    import json

    path = lab.dir / "access.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_download_survives_kill_9_and_the_next_process_adopts_it(lab, box):
    (lab.dir / "access.log").unlink(missing_ok=True)
    text = config(lab, state=True)
    k1 = start(lab, text)
    out = lab.dir / "crash.bin"
    curl = download(lab, out, "30M")
    try:
        wait_until(lambda: out.exists() and out.stat().st_size > 10_000_000, 15, "the download to be under way")
        k1.popen.send_signal(signal.SIGKILL)
        k1.popen.wait(timeout=10)
        size = out.stat().st_size
        time.sleep(1.5)
        # Nobody reads the TUN: the kernel alone carries the connection.
        assert out.stat().st_size > size + 10_000_000, "the download stalled while kracauer was dead"
        assert not saved_shards(str(lab.dir / "state" / "state.json"))
        k2 = start(lab, text)
        assert "adopted 1 connection" in k2.stderr(), k2.stderr()
        assert finish(curl).split() == ["200", str(BIG)]
    finally:
        if curl.poll() is None:
            curl.kill()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.big_sha256
    out.unlink()
    # The adopted connection ends in the new process's log, with its bytes (but no name: the map has none).
    entries = wait_until(lambda: [e for e in netlab_access(lab) if e["bytes_to_client"] > BIG], 15,
                         "the adopted download in the access log", k2.stderr)
    assert entries[0]["outcome"] == "closed" and entries[0]["client"] == netlab.CLIENT_ADDRESS
    rc, stderr = k2.stop()
    assert rc == 0, stderr


def test_maps_are_pinned_only_with_state_and_cleanup_removes_them(lab, box):
    pins = lab.dir / "bpf" / "kracauer0"
    k = start(lab, config(lab))
    # Without [state] the TUN goes with the process, and so do the maps: nothing to pin.
    assert not (pins / "flows").exists()
    rc, stderr = k.stop()
    assert rc == 0, stderr
    k = start(lab, config(lab, state=True))
    assert (pins / "flows").exists()
    rc, stderr = k.stop()
    assert rc == 0 and "left in place" in stderr, stderr
    assert (pins / "flows").exists()
    r = lab.run("box", [*lab.kracauer_cmd, "cleanup", "--config", str(k.config_path)], timeout=20)
    assert r.returncode == 0 and "removed the kernel path's pinned maps" in r.stdout, r.stdout + r.stderr
    assert not (pins / "flows").exists()
    assert not lab.link_exists("box", "kracauer0")


def test_enabled_false_uses_the_python_path(lab, box):
    k = start(lab, config(lab, kernel="off"))
    assert "kernel path on" not in k.stderr()
    out = lab.dir / "python.bin"
    assert finish(download(lab, out)).split() == ["200", str(BIG)]
    out.unlink()
    samples = scrape(lab)
    assert metric(samples, "kracauer_kernel_path_enabled") == 0
    assert metric(samples, "kracauer_kernel_bytes_total") == 0


def test_enabled_true_fails_at_start_when_the_program_cannot_load_and_auto_falls_back(lab, box):
    # /proc cannot hold a bpffs: the kernel path cannot pin its maps there (pins are made with [state]).
    broken = '\n[kernel_path]\npin_dir = "/proc/kracauer-none"\nenabled = '
    k = lab.spawn_kracauer(config(lab, state=True, kernel=None, extra=broken + "true\n"))
    assert k.wait(15) == 2, k.stderr()
    assert "[kernel_path] enabled = true, but the kernel path cannot be used" in k.stderr()
    assert not lab.link_exists("box", "kracauer0")  # a failed start leaves nothing behind
    k = start(lab, config(lab, state=True, kernel=None, extra=broken + '"auto"\n'))
    assert "kernel path unavailable, established connections are translated in Python" in k.stderr()
    out = lab.dir / "auto.bin"
    assert finish(download(lab, out)).split() == ["200", str(BIG)]
    out.unlink()


def test_a_restart_with_state_can_switch_the_kernel_path_off_and_on_mid_download(lab, box):
    (lab.dir / "access.log").unlink(missing_ok=True)
    out = lab.dir / "switch.bin"
    k = start(lab, config(lab, state=True))
    curl = download(lab, out, "30M")
    try:
        for kernel in ("off", "on"):
            wait_until(lambda: out.exists() and out.stat().st_size > (20_000_000 if kernel == "off" else 60_000_000),
                       20, "the download to be under way")
            rc, stderr = k.stop()
            assert rc == 0 and "saved 1 connection" in stderr, stderr
            k = start(lab, config(lab, state=True, kernel=kernel))
            assert "restored 1 connection" in k.stderr(), k.stderr()
            if kernel == "off":
                assert "took 1 connection back from the kernel path" in k.stderr(), k.stderr()
                assert not (lab.dir / "bpf" / "kracauer0" / "flows").exists()
        assert finish(curl).split() == ["200", str(BIG)]
    finally:
        if curl.poll() is None:
            curl.kill()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.big_sha256
    out.unlink()
    wait_until(lambda: any(e["bytes_to_client"] > BIG for e in netlab_access(lab)), 15,
               "the download in the access log", k.stderr)


# -- SYN cookies answered by the program -------------------------------------------

LISTENER = f"{SERVICE_ADDRESS}:443"


# One HTTP request from the client namespace; prints the response's status line and
# the options its TCP connection negotiated (struct tcp_info's tcpi_options and
# tcpi_snd_wscale: what the client learned from the SYN-ACK).
TCP_OPTIONS_CLIENT = """
import json, socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: www.example.com\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while len(data) < 4096:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
print(json.dumps({"status": data.split(b"\\r\\n", 1)[0].decode(), "body": data.rpartition(b"\\r\\n\\r\\n")[2].decode(),
                  "ts": bool(info[5] & 1), "sack": bool(info[5] & 2), "wscale": bool(info[5] & 4),
                  "snd_wscale": info[6] & 15}))
"""


def negotiated_options(lab) -> dict:
    import json
    import sys

    script = lab.dir / "tcp_options_client.py"
    script.write_text(TCP_OPTIONS_CLIENT)
    r = lab.run("client", [sys.executable, str(script), SERVICE_ADDRESS], timeout=20)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["status"] == "HTTP/1.1 200 OK" and result["body"] == "host1\n", result
    return result


class ClientTimestamps:
    """net.ipv4.tcp_timestamps in the client namespace, for the duration of a with block."""

    def __init__(self, lab, on: bool) -> None:
        self.lab, self.on = lab, on

    def __enter__(self) -> None:
        r = self.lab.run("client", ["sysctl", "-n", "net.ipv4.tcp_timestamps"], timeout=10)
        self.before = r.stdout.strip()
        r = self.lab.run("client", ["sysctl", "-q", "-w", f"net.ipv4.tcp_timestamps={int(self.on)}"], timeout=10)
        assert r.returncode == 0, r.stderr

    def __exit__(self, *exc) -> None:
        self.lab.run("client", ["sysctl", "-q", "-w", f"net.ipv4.tcp_timestamps={self.before}"], timeout=10)


def test_the_kernel_answers_syns_with_cookies_and_python_accepts_them(lab, box):
    k = start(lab, config(lab))
    assert "answers SYNs with cookies" in k.stderr()
    with ClientTimestamps(lab, True):
        for _ in range(3):
            assert lab.curl("https://www.example.com/").stdout == "host1\n"
        # A cookie keeps the client's window scale and SACK (in the timestamp it echoes).
        options = negotiated_options(lab)
        assert (options["ts"], options["sack"], options["wscale"], options["snd_wscale"]) == (True, True, True, 7)
    # (With several workers their counters reach the metrics at their next sync.)
    samples = wait_until(lambda: (s := scrape(lab)) and metric(s, "kracauer_kernel_syn_cookies_total",
                                                                listener=LISTENER) >= 3
                         and metric(s, "kracauer_events_total", kind="syn_cookie_accepted") >= 4 and s,
                         5, "the kernel's SYN cookies in the metrics", lambda: str(scrape(lab)))
    assert metric(samples, "kracauer_events_total", kind="syn_cookie_accepted") >= 4
    assert metric(samples, "kracauer_kernel_syn_cookies_total", listener=f"{SERVICE_ADDRESS}:80") >= 1
    # Python made no cookie and answered no SYN itself.
    assert metric(samples, "kracauer_events_total", kind="syn_cookie_sent") == 0
    assert metric(samples, "kracauer_kernel_syns_passed_total", listener=LISTENER) == 0


def test_a_client_without_timestamps_is_answered_by_python_and_keeps_window_scaling(lab, box):
    start(lab, config(lab))
    with ClientTimestamps(lab, False):
        assert lab.curl("https://www.example.com/").stdout == "host1\n"
        options = negotiated_options(lab)
        assert (options["ts"], options["sack"], options["wscale"], options["snd_wscale"]) == (False, True, True, 7)
    samples = wait_until(lambda: (s := scrape(lab)) and metric(s, "kracauer_kernel_syns_passed_total") >= 2
                         and metric(s, "kracauer_connections_opened_total") >= 2 and s,
                         5, "the SYNs the kernel passed on in the metrics", lambda: str(scrape(lab)))
    assert metric(samples, "kracauer_kernel_syn_cookies_total") == 0
    assert metric(samples, "kracauer_events_total", kind="syn_cookie_accepted") == 0


def test_with_python_syn_rate_0_the_kernel_answers_clients_without_timestamps_too(lab, box):
    text = config(lab).replace("\n[kernel_path]\n", "\n[kernel_path]\npython_syn_rate = 0\n")
    start(lab, text)
    with ClientTimestamps(lab, False):
        assert lab.curl("https://www.example.com/").stdout == "host1\n"
        # As with Linux's own cookies: no timestamps, nowhere to keep window scale and SACK.
        options = negotiated_options(lab)
        assert (options["ts"], options["sack"], options["wscale"]) == (False, False, False)
    samples = wait_until(lambda: (s := scrape(lab)) and metric(s, "kracauer_kernel_syn_cookies_total") >= 2
                         and metric(s, "kracauer_events_total", kind="syn_cookie_accepted") >= 2 and s,
                         5, "the kernel's SYN cookies in the metrics", lambda: str(scrape(lab)))
    assert metric(samples, "kracauer_kernel_syns_passed_total") == 0
    assert metric(samples, "kracauer_events_total", kind="syn_cookie_accepted") >= 2
