"""kracauer under bad networks and bad clients (docs/robustness.md has the figures).

1. Loss, duplication and reordering (tests/impair.py on both sides of kracauer):
   50 MB down and up, over TLS and HTTP, all four at once, arrive intact.
2. The ClientHello's own segments lost, duplicated or reordered; the host's
   SYN-ACK lost; the replayed hello lost; the handshake ACK overtaken by the
   hello: the connection still completes (and as quickly as it would without
   kracauer). Also short connections under the random impairment of 1.
3. A SYN flood from spoofed addresses of the client's subnet: legitimate
   clients still get through, memory stays flat, service is back at once.
4. 20 000 clients that connect and never send a hello, and a few that trickle
   a byte at a time: the oldest are reset past ``max_peeking``, everyone at
   ``hello_timeout``, legitimate clients keep being served, memory bounded.
5. A full table (``max_connections``): the next client is refused with an RST
   (at its SYN; with the kernel path, which answers the SYN, at its first
   segment), the established ones carry on.

Bugs found are strict xfails whose reason starts with "BUG:" and says how to
reproduce them. Every test bounds its load in count and time; every packet
stays in the lab's namespaces (spoofed sources only inside 198.51.100.0/24).
Measurements are printed as ``robustness: {...}`` lines (``pytest -s`` shows
them) and attached with ``record_property``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from tests import netlab
from tests.impair import Impairment, Rule, Wire
from tests.netlab import HOSTS, SERVICE_ADDRESS, Lab, example_config

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"
MB = 1 << 20
BIG = 50 * MB
PYTHON = sys.executable

SINK_NAME = "sink.example.org"  # in the lab certificate (*.example.org)
SINK_HTTP_PORT = 9080
SINK_TLS_PORT = 9443
ECHO_PORT = 9001

# 2% loss, 1% duplication, 10 ms ± 10 ms in each of the four directions, as
# issue #4 asks. BBR (this kernel's default) sizes its window on a minimum RTT
# a quarter of the mean, so a 50 MB transfer takes a minute or more
# (docs/robustness.md).
LOSSY = Impairment(loss=0.02, dup=0.01, delay=0.010, jitter=0.010)
# Handshakes are impaired too (the hello losses they once tripped over are fixed).
SPARE = 0


def report(record_property, name: str, **figures) -> None:
    print(f"robustness: {json.dumps({'test': name, **figures}, sort_keys=True)}", flush=True)
    for key, value in figures.items():
        record_property(key, value)


def config(**limits) -> str:
    """The lab's standard config plus upload sinks, an echo listener, and ``limits``."""
    text = example_config()
    if "hello_timeout" in limits:
        text = text.replace("hello_timeout = 10.0", f"hello_timeout = {float(limits.pop('hello_timeout'))}")
    text = text.replace("[limits]\n", "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items()))
    text += textwrap.dedent(f"""
        [[listen]]
        address = "{SERVICE_ADDRESS}"
        port = {SINK_HTTP_PORT}
        protocol = "http"

        [[listen]]
        address = "{SERVICE_ADDRESS}"
        port = {SINK_TLS_PORT}
        protocol = "tls"

        [[listen]]
        address = "{SERVICE_ADDRESS}"
        port = {ECHO_PORT}
        protocol = "tcp"
        host = "{HOSTS['host1']}"

        [[route]]
        name = "{SINK_NAME}"
        host = "{HOSTS['host1']}"
    """)
    return text


def script(lab: Lab, name: str, text: str) -> str:
    path = lab.dir / name
    path.write_text(text)
    return str(path)


def kernel_answers_syns(k) -> bool:
    """Whether the kernel path is on (it answers SYNs with cookies), once kracauer says it runs."""
    netlab.wait_until(lambda: "running on" in k.stderr(), 10, "kracauer to run", k.stderr)
    return "answers SYNs with cookies" in k.stderr()


def daemon_pid(k) -> int:
    """The kracauer (python) process: the one `ip netns exec` became, or its child."""
    pid = k.pid
    for _ in range(3):
        try:
            argv0 = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except FileNotFoundError:
            return pid
        if not argv0.endswith(b"/ip") and argv0 != b"ip":
            return pid
        children = []
        for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, IndexError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
        if not children:
            return pid
        pid = min(children)
    return pid


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tun_stats(lab: Lab, dev: str = "kracauer0") -> dict:
    proc = lab.run("box", ["ip", "-s", "-j", "link", "show", "dev", dev])
    try:
        stats = json.loads(proc.stdout)[0]["stats64"]
    except (ValueError, IndexError, KeyError):
        return {}
    # The kernel's tx is what it handed (or failed to hand) to kracauer.
    return {"to_kracauer": stats["tx"]["packets"], "dropped_before_kracauer": stats["tx"]["dropped"],
            "from_kracauer": stats["rx"]["packets"]}


def kracauer_healthy(k) -> str:
    """Problems in kracauer's state/log ('' when none)."""
    problems = []
    if not k.running():
        problems.append(f"kracauer exited with {k.popen.poll()}")
    text = k.stderr()
    for bad in ("Traceback", "internal_error", "could not handle"):
        if bad in text:
            problems.append(f"{bad!r} in its log")
    return "; ".join(problems)


def tail(k, lines: int = 25) -> str:
    return "\n--- kracauer stderr (tail)\n" + "\n".join(k.log_lines()[-lines:])


@pytest.fixture(scope="module")
def lab():
    with Lab(big_file_size=BIG) as lab:
        yield lab


@pytest.fixture
def start(lab):
    """start(config_text) -> a kracauer that is stopped when the test ends."""
    started = []

    def _start(text: str):
        k = lab.start_kracauer(text)
        started.append(k)
        return k

    yield _start
    for k in started:
        k.stop(timeout=5)


class CurlLoop:
    """Legitimate clients: one curl to https://www.example.com/ every ``interval`` s, bounded in count."""

    def __init__(self, lab: Lab, *, interval: float = 0.25, max_time: float = 15, limit: int = 200):
        self.lab, self.interval, self.max_time, self.limit = lab, interval, max_time, limit
        self.procs: list[tuple[float, subprocess.Popen]] = []
        self._next = 0.0
        self.t0 = time.monotonic()

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.lab.ns("client"), "curl", "-sS", "--max-time", f"{self.max_time:g}",
                "--cacert", str(self.lab.ca_cert), "--resolve", f"www.example.com:443:{SERVICE_ADDRESS}",
                "-w", "\n%{http_code} %{time_connect} %{time_total}", "https://www.example.com/"]

    def tick(self) -> None:
        """Start the next curl if it is time (call often)."""
        now = time.monotonic()
        if now >= self._next and len(self.procs) < self.limit:
            self.procs.append((now - self.t0, subprocess.Popen(self.argv(), stdout=subprocess.PIPE,
                                                                stderr=subprocess.PIPE, text=True)))
            self._next = now + self.interval

    def run_for(self, seconds: float, also=lambda: None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            also()
            time.sleep(0.05)

    def results(self) -> dict:
        rows = []
        for started, proc in self.procs:
            try:
                out, err = proc.communicate(timeout=self.max_time + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            body, _, tail_ = out.rpartition("\n")
            fields = tail_.split()
            ok = proc.returncode == 0 and body.strip() == "host1" and fields[:1] == ["200"]
            total = float(fields[2]) if len(fields) == 3 else None
            rows.append(dict(started=round(started, 2), ok=ok, total=total, error=err.strip()[:120]))
        times = sorted(r["total"] for r in rows if r["ok"])
        return dict(
            attempts=len(rows), succeeded=sum(r["ok"] for r in rows),
            success_pct=round(100 * sum(r["ok"] for r in rows) / max(len(rows), 1), 1),
            within_3s_pct=round(100 * sum(r["ok"] and r["total"] <= 3 for r in rows) / max(len(rows), 1), 1),
            median_s=round(statistics.median(times), 3) if times else None,
            p90_s=round(times[int(0.9 * (len(times) - 1))], 3) if times else None,
            max_s=round(times[-1], 3) if times else None,
            failures=[r for r in rows if not r["ok"]][:10],
        )

    def kill(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- 1. loss, duplication, reordering ------------------------------------------

# Upload sink on host1: HTTP on one port, TLS on another; answers the sha256 of the body.
UPLOAD_SINK = textwrap.dedent(r"""
    import hashlib, socket, ssl, sys, threading
    http_port, tls_port, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def handle(conn, tls):
        try:
            conn.settimeout(150)
            if tls:
                conn = ctx.wrap_socket(conn, server_side=True)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            digest = hashlib.sha256(body)
            got = len(body)
            while got < length:
                data = conn.recv(min(1 << 20, length - got))
                if not data:
                    break
                digest.update(data)
                got += len(data)
            reply = f"{digest.hexdigest()} {got}".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(reply), reply))
        except OSError as e:
            print("sink:", repr(e), file=sys.stderr, flush=True)
        finally:
            conn.close()

    def serve(port, tls):
        server = socket.create_server(("::", port), family=socket.AF_INET6, backlog=64)
        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn, tls), daemon=True).start()

    threading.Thread(target=serve, args=(tls_port, True), daemon=True).start()
    threading.Thread(target=serve, args=(http_port, False), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")


def write_random_file(path: pathlib.Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MB))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def test_50mb_down_and_up_over_tls_and_http_survive_loss_duplication_and_reordering(lab, start, record_property):
    sink = lab.popen("host1", [PYTHON, script(lab, "upload_sink.py", UPLOAD_SINK), str(SINK_HTTP_PORT),
                               str(SINK_TLS_PORT), *map(str, lab.host_certs["host1"])],
                     stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    upload = lab.dir / "upload.bin"
    upload_sha = write_random_file(upload, BIG)
    k = start(config())
    limit = 150.0
    curl = (f"curl -sS --fail --max-time {limit:g} --cacert {lab.ca_cert} "
            f"--resolve www.example.com:443:{SERVICE_ADDRESS} --resolve www.example.com:80:{SERVICE_ADDRESS} "
            f"--resolve {SINK_NAME}:{SINK_TLS_PORT}:{SERVICE_ADDRESS} "
            f"--resolve {SINK_NAME}:{SINK_HTTP_PORT}:{SERVICE_ADDRESS}")
    transfers = {
        "tls_download": (f"{curl} https://www.example.com/big.bin | sha256sum", lab.big_sha256),
        "http_download": (f"{curl} http://www.example.com/big.bin | sha256sum", lab.big_sha256),
        "tls_upload": (f"{curl} -H 'Expect:' -T {upload} https://{SINK_NAME}:{SINK_TLS_PORT}/up", upload_sha),
        "http_upload": (f"{curl} -H 'Expect:' -T {upload} http://{SINK_NAME}:{SINK_HTTP_PORT}/up", upload_sha),
    }
    procs: dict[str, subprocess.Popen] = {}
    durations: dict[str, float] = {}
    try:
        with Wire(lab, client=LOSSY, host=LOSSY, seed=20240611, spare=SPARE) as wire:
            t0 = time.monotonic()
            for name, (cmd, _) in transfers.items():
                procs[name] = subprocess.Popen(
                    ["ip", "netns", "exec", lab.ns("client"), "bash", "-c", f"set -o pipefail; {cmd}"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # (The outputs are a line or two each: no pipe fills up while the others run.)
            while len(durations) < len(procs) and time.monotonic() - t0 < limit + 10:
                for name, proc in procs.items():
                    if name not in durations and proc.poll() is not None:
                        durations[name] = round(time.monotonic() - t0, 1)
                time.sleep(0.1)
            outputs = {}
            for name, proc in procs.items():
                if proc.poll() is None:
                    proc.kill()
                out, err = proc.communicate()
                durations.setdefault(name, round(time.monotonic() - t0, 1))
                outputs[name] = (proc.returncode, out, err)
            stats = wire.stats()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        upload.unlink(missing_ok=True)
    directions = stats["directions"]
    report(record_property, "loss",
           impairment=f"loss {LOSSY.loss:.0%}, dup {LOSSY.dup:.0%}, delay {LOSSY.delay * 1000:g}"
                      f" ms ± {LOSSY.jitter * 1000:g} ms per direction, client and host side",
           seconds=durations, mbyte_per_s={n: round(BIG / MB / d, 2) for n, d in durations.items()},
           wire={d: {key: directions[d][key] for key in ("packets", "dropped", "duplicated", "reordered", "spared")}
                 for d in directions},
           tun_queue_drops=stats["tun_tx_dropped"])
    for name, (code, out, err) in outputs.items():
        expected = transfers[name][1]
        got = out.split()[0] if out.split() else ""
        assert code == 0 and got == expected, (
            f"{name}: exit {code}, sha256 {got!r} expected {expected!r}; stderr {err.strip()!r}" + tail(k))
    for d in ("c2k", "k2c", "k2h", "h2k"):
        assert directions[d]["dropped"] > 0 and directions[d]["reordered"] > 0, (d, directions[d])
    assert directions["k2c"]["duplicated"] > 0 and directions["h2k"]["duplicated"] > 0, directions
    problems = kracauer_healthy(k)
    assert not problems, problems + tail(k)


# -- 2. the hello's own segments, the host's SYN-ACK and the replay ------------

# A TLS client whose ClientHello (~1.9 KB with a padded ALPN list) spans two
# segments at kracauer's MSS; it fetches / and prints what happened as JSON.
HELLO_CLIENT = textwrap.dedent(r"""
    import json, socket, ssl, sys, time
    ca, address, name, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"] + [f"pad{i:02d}-" + "x" * 190 for i in range(7)])
    t0 = time.monotonic()
    out = {}
    try:
        raw = socket.create_connection((address, 443), timeout=timeout)
        out["connected"] = round(time.monotonic() - t0, 3)
        time.sleep(0.01)  # the handshake ACK and the hello carry different TSvals
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            out["handshake"] = round(time.monotonic() - t0, 3)
            s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        out["status"] = data.split(b"\r\n", 1)[0].decode()
        out["body"] = data.split(b"\r\n\r\n", 1)[-1].decode()
    except Exception as e:
        out["error"] = repr(e)
    out["elapsed"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out))
""")

# Sends a captured ClientHello as is and reports the first handshake message that comes back.
RAW_HELLO_CLIENT = textwrap.dedent(r"""
    import json, socket, sys
    address, path = sys.argv[1], sys.argv[2]
    hello = open(path, "rb").read()
    out = {"sent": len(hello)}
    try:
        with socket.create_connection((address, 443), timeout=10) as s:
            s.sendall(hello)
            data = b""
            while len(data) < 6:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        out.update(record_type=data[0] if data else None, version=data[1:3].hex(),
                   handshake_type=data[5] if len(data) > 5 else None)
    except Exception as e:
        out["error"] = repr(e)
    print(json.dumps(out))
""")

BUG_HELLO_TAIL_LOST = (
    "BUG: when the ClientHello's second segment and its tail-loss-probe copy are both lost, the client "
    "(Linux, after its RTO: cwnd 1) retransmits only the first segment, which kracauer already holds "
    "unacknowledged; the second is never resent, the hello never completes and the client is reset at "
    "hello_timeout. A server would ACK the first segment and get the second. Repro: tests/impair.py "
    "Rule('c2k', 'payload', count=2, skip=1, port=443) with a ~1.9 KB ClientHello (two segments).")

BUG_TSECR = (
    "BUG: while the host is still in SYN-RECV (the replay was lost), the client's own retransmissions "
    "reach it with a TSecr Linux rejects (TcpExt TSEcrRejected, tcp_check_req wants it between the "
    "host's first and last SYN-ACK TSval): the echo of kracauer's SYN-ACK maps to the host's SYN-ACK "
    "TSval minus the ms between kracauer's SYN-ACK and the splice (ts_off is taken at the splice), and "
    "echoes of the host's dup ACKs are newer than any SYN-ACK. Only the host's SYN-ACK retransmission "
    "1 s later (kracauer's re-replay) completes the connection. Repro: tests/impair.py "
    "Rule('k2h', 'payload', count=2); nstat on the host.")


BUG_TSVAL_REGRESSES = (
    "BUG: kracauer takes the TSval of its replay from the last client segment it received, not the "
    "newest: when the client's handshake ACK arrives after its hello (reordering) while kracauer waits "
    "for the host, the replay carries an older TSval than the SYN kracauer sent the host, whose PAWS "
    "check drops it (TcpExt PAWSEstab); the value is not refreshed after the splice, so every re-replay "
    "is dropped too, and the client's retransmissions fail the host's TSecr check (previous bug). The "
    "connection hangs for seconds or for good (the host gives up after its SYN-ACK retries). Repro: "
    "Rule('c2k', 'ack', 'delay', count=1, seconds=0.05, port=443) + Rule('h2k', 'synack', 'delay', "
    "seconds=0.1), a client that sends its hello >= 1 ms after connecting.")


@dataclasses.dataclass(frozen=True)
class HelloCase:
    rules: tuple
    min_elapsed: float = 0.0  # the impairment must have cost at least this (s)
    max_elapsed: float | None = None  # and at most this, when a real server would be this quick
    bug: str | None = None


HELLO_CASES = {
    "first_hello_segment_lost": HelloCase((Rule("c2k", "payload", count=1, port=443),), 0.1),
    "both_hello_segments_lost": HelloCase((Rule("c2k", "payload", count=2, port=443),), 0.1),
    "hello_segments_duplicated": HelloCase((Rule("c2k", "payload", "dup", count=2, port=443),)),
    "hello_segments_reordered": HelloCase((Rule("c2k", "payload", "delay", count=1, seconds=0.05, port=443),), 0.04),
    "second_hello_segment_and_its_probe_lost": HelloCase((Rule("c2k", "payload", count=2, skip=1, port=443),), 0.1,
                                                         ),
    "host_synack_lost": HelloCase((Rule("h2k", "synack", count=1),), 0.9),
    # The client's own quick retransmission now gets through (its echo is the host's SYN-ACK's).
    "replayed_hello_lost": HelloCase((Rule("k2h", "payload", count=2),)),
    "replayed_hello_lost_client_retransmission_accepted": HelloCase((Rule("k2h", "payload", count=2),), 0.0, 0.9),
    "replay_and_retransmissions_lost_until_host_repeats_synack": HelloCase(
        (Rule("k2h", "payload", count=0, seconds=0.8),), 0.9),
    "handshake_ack_reordered_behind_hello_while_host_answers_slowly": HelloCase(
        (Rule("c2k", "ack", "delay", count=1, seconds=0.05, port=443), Rule("h2k", "synack", "delay", seconds=0.1)),
        0.1, 0.9),
}


def tcp_ext(lab: Lab, role: str) -> dict[str, int]:
    """TcpExt counters (/proc/net/netstat) of namespace ``role``."""
    lines = lab.run(role, ["cat", "/proc/net/netstat"]).stdout.splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            out.update(zip(names.split()[1:], map(int, values.split()[1:])))
    return out


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=c.bug)) if c.bug else name
    for name, c in HELLO_CASES.items()])
def test_connection_completes_when_hello_segments_synack_or_replay_are_lost(lab, start, case, record_property):
    c = HELLO_CASES[case]
    k = start(config())
    client = script(lab, "hello_client.py", HELLO_CLIENT)
    host_before = tcp_ext(lab, "host1")
    with Wire(lab, rules=c.rules, trace=True) as wire:
        proc = lab.run("client", [PYTHON, client, str(lab.ca_cert), SERVICE_ADDRESS, "www.example.com", "6"],
                       timeout=20)
        time.sleep(0.2)
    host_after = tcp_ext(lab, "host1")
    tsecr_rejected = host_after.get("TSEcrRejected", 0) - host_before.get("TSEcrRejected", 0)
    paws_rejected = host_after.get("PAWSEstab", 0) - host_before.get("PAWSEstab", 0)
    trace, stats = wire.trace(), wire.stats()
    result = json.loads(proc.stdout or "{}")
    report(record_property, f"hello:{case}", client=result, rule_hits=[r["hits"] for r in stats["rules"]],
           host_tsecr_rejected=tsecr_rejected, host_paws_rejected=paws_rejected)
    shown = (f"client: {proc.stdout.strip()} {proc.stderr.strip()}; host TSEcrRejected +{tsecr_rejected}"
             f" PAWSEstab +{paws_rejected}\ntrace:\n"
             + "\n".join(map(str, trace[:40])) + tail(k))
    assert all(r["hits"] >= 1 for r in stats["rules"]), "the impairment never applied: " + shown
    # The hello spanned two segments: two sequence numbers with payload before any answer, seen from the
    # client (c2k) or, when only the host side is impaired, in kracauer's replay (k2h).
    towards, back = ("c2k", "k2c") if any(e["dir"] == "c2k" for e in trace) else ("k2h", "h2k")
    hello_seqs = set()
    for e in trace:
        if e["dir"] == back and e["len"]:
            break
        if e["dir"] == towards and e["len"]:
            hello_seqs.add(e["seq"])
    assert len(hello_seqs) >= 2, shown
    assert result.get("status") == "HTTP/1.1 200 OK" and result.get("body") == "host1\n", shown
    assert result["elapsed"] >= c.min_elapsed, shown
    if c.max_elapsed is not None:
        assert tsecr_rejected == 0 and paws_rejected == 0 and result["elapsed"] <= c.max_elapsed, shown
    if case == "host_synack_lost":
        syns = [e["t"] for e in trace if e["dir"] == "k2h" and e["flags"] == "S"]
        assert len(syns) == 2 and 0.8 <= syns[1] - syns[0] <= 1.5, f"kracauer did not retry its SYN after ~1 s: {shown}"
    if case == "replay_and_retransmissions_lost_until_host_repeats_synack":
        synacks = [e["t"] for e in trace if e["dir"] == "h2k" and e["flags"] == "SA"]
        delivered = [e["t"] for e in trace if e["dir"] == "k2h" and e["len"] and e["action"] == "pass"]
        assert len(synacks) >= 2 and delivered, shown
        # The first hello bytes the host got are kracauer's re-replay, answering the repeated SYN-ACK.
        assert 0 <= delivered[0] - synacks[1] < 0.1, f"no re-replay on the repeated SYN-ACK: {shown}"
    problems = kracauer_healthy(k)
    assert not problems, problems + tail(k)


def test_captured_chrome_post_quantum_hello_with_first_segment_lost_reaches_the_host(lab, start, record_property):
    k = start(config())
    client = script(lab, "raw_hello.py", RAW_HELLO_CLIENT)
    with Wire(lab, rules=[Rule("c2k", "payload", count=1, port=443)], trace=True) as wire:
        proc = lab.run("client", [PYTHON, client, SERVICE_ADDRESS, str(DATA / "chrome_pq_curl_cffi.bin")], timeout=20)
    result = json.loads(proc.stdout or "{}")
    report(record_property, "hello:chrome_pq_raw", client=result)
    shown = f"{proc.stdout} {proc.stderr}\n" + "\n".join(map(str, wire.trace()[:20])) + tail(k)
    # A TLS handshake record (22) holding a ServerHello (2): nginx on host1 read the whole 1763-byte hello.
    assert (result.get("record_type"), result.get("handshake_type")) == (22, 2), shown
    assert wire.stats()["rules"][0]["hits"] == 1, shown
    problems = kracauer_healthy(k)
    assert not problems, problems + tail(k)


SHORT_CONNECTIONS = 40


def test_short_tls_connections_through_random_loss_and_reordering_complete_promptly(lab, start, record_property):
    """Handshakes under the random impairment of test 1 (not spared): retries cost a second or two, no more."""
    k = start(config())
    loop = CurlLoop(lab, interval=0.0, max_time=12, limit=SHORT_CONNECTIONS)
    try:
        with Wire(lab, client=LOSSY, host=LOSSY, seed=7) as wire:
            end = time.monotonic() + 60
            while time.monotonic() < end and (len(loop.procs) < SHORT_CONNECTIONS or
                                              any(p.poll() is None for _, p in loop.procs)):
                if sum(p.poll() is None for _, p in loop.procs) < 8:
                    loop.tick()
                time.sleep(0.02)
            stats = wire.stats()
        result = loop.results()
    finally:
        loop.kill()
    report(record_property, "short_connections", **{k_: v for k_, v in result.items() if k_ != "failures"},
           failures=result["failures"][:3], wire_dropped={d: stats["directions"][d]["dropped"]
                                                          for d in stats["directions"]})
    assert result["succeeded"] == SHORT_CONNECTIONS, result
    assert result["within_3s_pct"] >= 95.0, result
    problems = kracauer_healthy(k)
    assert not problems, problems + tail(k)


# -- 3. SYN flood ---------------------------------------------------------------

# Spoofed SYNs (Linux-like options) from SOURCES of the client's own subnet, for
# SECONDS, at most RATE a second (0: as fast as one Python raw socket goes), with
# random ports and ISNs from SEED; prints what it sent as JSON.
SYN_FLOOD = textwrap.dedent(r"""
    import json, random, socket, struct, sys, time
    dst, port, seconds, net, first, last = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], \
        int(sys.argv[5]), int(sys.argv[6])
    rate = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    seed = int(sys.argv[8]) if len(sys.argv) > 8 else 1
    assert net == "198.51.100." and 3 <= first <= last <= 254  # only the lab's client subnet
    seconds = min(seconds, 30.0)
    rng = random.Random(seed)
    dst_b = socket.inet_aton(dst)

    def checksum(data):
        if len(data) % 2:
            data += b"\0"
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF

    packets = []
    sources = [socket.inet_aton(f"{net}{i}") for i in range(first, last + 1)]
    for i in range(1 << 15):
        src = sources[i % len(sources)]
        sport = 1024 + rng.randrange(64000)
        options = struct.pack("!BBHBBBBIIBBBB", 2, 4, 1460, 4, 2, 8, 10, rng.getrandbits(32), 0, 1, 3, 3, 7)
        tcp = struct.pack("!HHIIBBHHH", sport, port, rng.getrandbits(32), 0, (20 + len(options)) // 4 << 4, 0x02,
                          64240, 0, 0) + options
        tcp = tcp[:16] + struct.pack("!H", checksum(src + dst_b + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xFFFF, 0x4000, 64, 6, 0, src, dst_b)
        packets.append(ip + tcp)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    print("ready", flush=True)
    sendto, addr, sent, errors = s.sendto, (dst, 0), 0, 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        for i in range(0, len(packets), 2048):
            for p in packets[i:i + 2048]:
                try:
                    sendto(p, addr)
                except OSError:
                    errors += 1
            sent += 2048
            if rate:
                ahead = t0 + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            if time.monotonic() >= deadline:
                break
    elapsed = time.monotonic() - t0
    print(json.dumps({"sent": sent, "errors": errors, "seconds": round(elapsed, 2), "rate": round(sent / elapsed)}),
          flush=True)
""")

FLOOD_SECONDS = 10.0
# With the kernel path, the BPF program on the TUN answers the SYNs (issue 9):
# two unpaced senders, as fast as the box lets them. Without it, one Python
# thread of kracauer answers some 130 000 SYN cookies a second (76% of a core at
# 100 000); faster than that, the kernel's queue in front of the TUN drops
# legitimate packets along with the flood (an unpaced Python sender reaches
# ~220 000 a second on an idle machine, and then ~92% of legitimate connections
# succeed, docs/robustness.md). So on the Python path the flood is one sender
# paced at FLOOD_RATE: 80 000 keeps a margin on a slower CI machine, and the
# bounds stay the same.
FLOOD_RATE = 80_000
# Each unpaced sender's half of the spoofed sources.
FLOOD_SENDERS = (("3", "128"), ("129", "254"))


# On this 2-core lab the flood, the legitimate client and kracauer share the cores
# with the rest of the suite: one legitimate handshake lost to a scheduling stall
# fails the 99% bound, so a failure is run once more before it counts (both runs
# are reported).
@pytest.mark.flaky(reruns=1)
def test_syn_flood_from_spoofed_sources_leaves_legitimate_clients_served_and_memory_flat(lab, start, record_property):
    k = start(config())
    pid = daemon_pid(k)
    kernel = kernel_answers_syns(k)
    assert kernel == (netlab.lab_kernel_path() != "off"), k.stderr()
    assert lab.curl("https://www.example.com/").stdout == "host1\n"
    rss_before = rss_mb(pid)
    cpu_before = cpu_seconds(pid)
    tun_before = tun_stats(lab)
    sender = script(lab, "syn_flood.py", SYN_FLOOD)
    if kernel:
        floods = [lab.popen("client", [PYTHON, sender, SERVICE_ADDRESS, "443", str(FLOOD_SECONDS), "198.51.100.",
                                       first, last, "0", str(seed)], stdout=subprocess.PIPE, text=True)
                  for seed, (first, last) in enumerate(FLOOD_SENDERS, start=1)]
    else:
        floods = [lab.popen("client", [PYTHON, sender, SERVICE_ADDRESS, "443", str(FLOOD_SECONDS), "198.51.100.",
                                       "3", "254", str(FLOOD_RATE)], stdout=subprocess.PIPE, text=True)]
    legit = CurlLoop(lab, interval=0.25, max_time=20, limit=60)
    samples: list[tuple[float, float]] = []
    try:
        for flood in floods:
            assert flood.stdout.readline().strip() == "ready"
        t0 = time.monotonic()

        def sample():
            if not samples or time.monotonic() - t0 - samples[-1][0] >= 0.5:
                samples.append((round(time.monotonic() - t0, 1), rss_mb(pid)))

        while any(f.poll() is None for f in floods) and time.monotonic() - t0 < FLOOD_SECONDS + 10:
            legit.tick()
            sample()
            time.sleep(0.05)
        each = [json.loads(f.stdout.readline() or "{}") for f in floods]
        sent = {"senders": len(each), "sent": sum(e.get("sent", 0) for e in each),
                "rate": sum(e.get("rate", 0) for e in each), "errors": sum(e.get("errors", 0) for e in each)}
        flood_cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - t0)
        tun = {key: value - tun_before.get(key, 0) for key, value in tun_stats(lab).items()}
        # Right after the flood: connections go through at once.
        after = [lab.curl("https://www.example.com/", "-w", "\n%{time_total}", max_time=5) for _ in range(5)]
        during = legit.results()
    finally:
        legit.kill()
        for flood in floods:
            if flood.poll() is None:
                flood.kill()
    rss_after = rss_mb(pid)
    after_times = [float(r.stdout.rpartition("\n")[2]) if r.returncode == 0 else None for r in after]
    early = [rss for t, rss in samples if 2.0 <= t <= 4.0]
    late = [rss for t, rss in samples if t >= FLOOD_SECONDS - 2.0]
    peak = max(rss for _, rss in samples)
    report(record_property, "syn_flood", kernel_path=kernel, flood=sent, legit_during=during,
           after_flood_s=after_times,
           rss_mb=dict(before=round(rss_before, 1), peak=round(peak, 1), early=round(max(early or [0]), 1),
                       late=round(max(late or [0]), 1), after=round(rss_after, 1)),
           kracauer_cpu_pct=round(100 * flood_cpu), tun=tun,
           hello_timeout_log_lines=sum("outcome=hello_timeout" in line for line in k.log_lines()))
    # Spoofed SYNs that never complete a handshake are not logged one line each.
    assert not any("outcome=handshake_timeout" in line for line in k.log_lines())
    assert sent.get("rate", 0) > 5000, f"the flood did not run: {sent}"
    assert during["attempts"] >= 20, during
    assert during["success_pct"] >= 99.0, f"legitimate clients during the flood: {during}" + tail(k)
    assert all(t is not None and t < 2.0 for t in after_times), \
        f"after the flood: {[(r.returncode, r.stderr.strip()) for r in after]} {after_times}" + tail(k)
    assert peak < 200, samples
    assert not early or not late or max(late) - max(early) < 10, f"RSS grows with the flood: {samples}"
    assert rss_after - rss_before < 20, f"RSS before {rss_before:.1f} MB, after {rss_after:.1f} MB: {samples}"
    if kernel:
        # Python held nothing and answered nothing for the flood: the kernel did.
        assert tun.get("to_kracauer", 0) < sent["sent"] / 10, (tun, sent)
    problems = kracauer_healthy(k)
    assert not problems, problems + tail(k)


# -- 4. silent and slow clients ---------------------------------------------------

# Opens N connections (from several source addresses) that never send a byte,
# then TRICKLE that send one byte of a ClientHello every EVERY seconds; records
# when each was established and when (and how) it ended, as JSON in RESULT.
SILENT_CLIENTS = textwrap.dedent(r"""
    import errno, json, resource, select, socket, sys, time
    svc, port, sources, n, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4]), \
        float(sys.argv[5])
    trickle_src, trickle_n, every, limit = sys.argv[6], int(sys.argv[7]), float(sys.argv[8]), float(sys.argv[9])
    result_path, grace = sys.argv[10], float(sys.argv[11])
    n, limit = min(n, 30000), min(limit, 90.0)
    # As many descriptors as allowed (CAP_SYS_RESOURCE may be missing); reset sockets are closed at once,
    # and opening waits while too many are live.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    max_live = hard - 200
    HELLO_START = bytes.fromhex("1603010200010001fc0303") + bytes(64)
    ep = select.epoll()
    conns = []  # by index
    live = {}  # fd -> conn, while its socket is open (descriptors are reused)
    t0 = time.monotonic()
    now = lambda: time.monotonic() - t0

    def open_one(i, src, kind):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((src, 0))
        err = s.connect_ex((svc, port))
        c = dict(i=i, kind=kind, sock=s, opened=now(), est=None, end=None, how=None, sent=0, next_send=None)
        conns.append(c)
        live[s.fileno()] = c
        if err not in (0, errno.EINPROGRESS):
            finish(c, errno.errorcode.get(err, str(err)))
            return
        ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP)

    def finish(c, how):
        c["end"], c["how"] = now(), how
        fd = c["sock"].fileno()
        live.pop(fd, None)
        try:
            ep.unregister(fd)
        except (OSError, ValueError):
            pass
        c["sock"].close()

    def events(timeout):
        for fd, ev in ep.poll(timeout):
            c = live.get(fd)
            if c is None:
                continue
            s = c["sock"]
            if c["est"] is None:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(c, errno.errorcode.get(err, str(err)))
                    continue
                if ev & select.EPOLLOUT:
                    c["est"] = now()
                    ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
                    if c["kind"] == "trickle":
                        c["next_send"] = c["est"]
                    continue
            try:
                data = s.recv(4096)
                finish(c, "fin" if not data else "data")
            except ConnectionResetError:
                finish(c, "reset")
            except BlockingIOError:
                pass
            except OSError as e:
                finish(c, errno.errorcode.get(e.errno, str(e.errno)))

    def trickle():
        for c in list(live.values()):
            if c["kind"] == "trickle" and c["end"] is None and c["next_send"] is not None and now() >= c["next_send"]:
                try:
                    c["sock"].send(HELLO_START[c["sent"]:c["sent"] + 1])
                    c["sent"] += 1
                except (ConnectionResetError, BrokenPipeError):  # the RST, noticed by send
                    finish(c, "reset")
                    continue
                except BlockingIOError:
                    pass
                c["next_send"] += every

    opened = 0
    gated = 0
    while opened < n and now() < limit:
        due = min(n, int(now() * rate) + 1)
        room = max_live - len(live)
        if room <= 0:
            gated += 1
        while opened < due and room > 0:
            open_one(opened, sources[opened % len(sources)], "silent")
            opened += 1
            room -= 1
        events(0.005)
    open_done = now()
    for j in range(trickle_n):
        open_one(n + j, trickle_src, "trickle")
    # Until every socket is closed, or those left were established (or opened) `grace` s ago: a
    # connection answered with a SYN cookie whose ACK kracauer never got stays open on this side only.
    while now() < limit and live:
        events(0.05)
        trickle()
        if all(now() - (c["est"] if c["est"] is not None else c["opened"]) > grace for c in live.values()):
            break
    # Those: one byte each brings kracauer's state back from the cookie, and hello_timeout resets them.
    # Paced, 50 every 50 ms: with the kernel path answering SYNs, thousands of handshake ACKs can be
    # lost in the queue in front of kracauer, and probing them all at once would lose the probes too
    # (each client's retransmissions then come in the same bursts).
    probed = [c for c in live.values() if c["est"] is not None and c["kind"] == "silent"]
    for count, c in enumerate(probed, start=1):
        c["probed"] = now()
        try:
            c["sock"].send(b"\x16")
        except OSError:
            pass
        if count % 50 == 0:
            events(0.05)
    # Three times the grace: a probe lost in that queue comes back after the client's backed-off RTO.
    deadline = now() + 3 * grace
    while now() < deadline and any(c["end"] is None for c in probed):
        events(0.05)
    for c in probed:
        if c["how"] == "reset":
            c["how"] = "reset_after_probe"
    for c in conns:
        if c["end"] is None:
            finish(c, "open")
        del c["sock"]
    with open(result_path, "w") as f:
        json.dump({"t_open_done": round(open_done, 2), "gated": gated, "fd_limit": hard, "conns": conns}, f)
""")

SILENT = 20_000
MAX_PEEKING = 5000
SLOW_HELLO_TIMEOUT = 3.0
EXTRA_SOURCES = [f"198.51.100.{i}" for i in range(3, 8)]  # .3-.6 silent, .7 trickle


# Timing-bound like the flood test above: one legitimate connection caught by an
# eviction on a stalled core fails the 99% bound; a failure is run once more before it counts.
@pytest.mark.flaky(reruns=1)
def test_silent_and_trickling_clients_are_reset_oldest_first_while_others_are_served(lab, start, record_property):
    k = start(config(hello_timeout=SLOW_HELLO_TIMEOUT, max_peeking=MAX_PEEKING))
    pid = daemon_pid(k)
    kernel = kernel_answers_syns(k)
    rss_before = rss_mb(pid)
    for address in EXTRA_SOURCES:
        lab.run("client", ["ip", "addr", "add", f"{address}/24", "dev", "eth0"], check=True)
    legit = CurlLoop(lab, interval=0.25, max_time=15, limit=80)
    result_path = lab.dir / "silent_clients.json"
    peak = rss_before
    try:
        opener = lab.popen("client", [
            PYTHON, script(lab, "silent_clients.py", SILENT_CLIENTS), SERVICE_ADDRESS, "443",
            ",".join(EXTRA_SOURCES[:4]), str(SILENT), "5000", EXTRA_SOURCES[4], "20", "1.0", "40", str(result_path),
            str(SLOW_HELLO_TIMEOUT + 3)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while opener.poll() is None and time.monotonic() - t0 < 60:
            legit.tick()
            peak = max(peak, rss_mb(pid))
            time.sleep(0.05)
        out, err = opener.communicate(timeout=30)
        during = legit.results()
    finally:
        legit.kill()
        for address in EXTRA_SOURCES:
            lab.run("client", ["ip", "addr", "del", f"{address}/24", "dev", "eth0"])
    rss_after = rss_mb(pid)
    assert opener.returncode == 0, err
    result = json.loads(result_path.read_text())
    conns = result["conns"]
    silent = [c for c in conns if c["kind"] == "silent"]
    trickle = [c for c in conns if c["kind"] == "trickle"]
    hows: dict[str, int] = {}
    for c in silent:
        hows[c["how"]] = hows.get(c["how"], 0) + 1
    established = [c for c in silent if c["est"] is not None]
    lifetimes = sorted(c["end"] - c["est"] for c in established if c["how"] == "reset")
    # Oldest first: among connections whose handshake took no retry (kracauer's state is as old as the
    # client's), one reset well after a younger one was (0.5 s slack for batches).
    prompt = [c for c in established if c["est"] - c["opened"] < 0.2]
    younger_min = float("inf")
    out_of_order = 0
    for c in sorted(prompt, key=lambda c: c["est"], reverse=True):
        if c["how"] == "reset":
            if younger_min < c["end"] - 0.5:
                out_of_order += 1
            younger_min = min(younger_min, c["end"])
    evicted_early = sum(1 for t in lifetimes if t < SLOW_HELLO_TIMEOUT - 0.5)
    # The most silent connections alive at once, as the client saw them.
    edges = sorted([(c["est"], 1) for c in established] + [(c["end"], -1) for c in established if c["end"] is not None])
    alive = max_alive = 0
    for _, step in edges:
        alive += step
        max_alive = max(max_alive, alive)
    trickle_life = sorted(c["end"] - c["est"] for c in trickle if c["est"] is not None and c["how"] == "reset")
    report(record_property, "silent_clients",
           silent=dict(opened=len(silent), established=len(established), outcomes=hows,
                       open_seconds=result["t_open_done"], opening_paused_for_fds=result["gated"],
                       reset_before_hello_timeout=evicted_early, max_alive_at_once=max_alive,
                       lifetime_s=dict(min=round(lifetimes[0], 2), median=round(statistics.median(lifetimes), 2),
                                       max=round(lifetimes[-1], 2)) if lifetimes else None,
                       reset_out_of_order=out_of_order, prompt_handshakes=len(prompt)),
           trickle=dict(n=len(trickle), reset=len(trickle_life), bytes_sent=[c["sent"] for c in trickle][:5],
                        lifetime_s=[round(t, 2) for t in trickle_life[:3] + trickle_life[-2:]]),
           legit_during=during, rss_mb=dict(before=round(rss_before, 1), peak=round(peak, 1),
                                            after=round(rss_after, 1)),
           log_outcomes={o: sum(f"outcome={o}" in line for line in k.log_lines())
                         for o in ("evicted_while_peeking", "hello_timeout")})
    assert len(established) >= 0.99 * SILENT, hows
    # Every one is reset; a connection whose handshake ACK (to a SYN cookie) was lost in kracauer's
    # full queue is unknown to kracauer (as it would be to Linux) until it sends a byte.
    assert hows.get("reset", 0) + hows.get("reset_after_probe", 0) == len(established), \
        f"not reset: {hows}" + tail(k)
    # Past max_peeking, the oldest are reset before their hello_timeout, in order. With the kernel
    # path the client counts as alive the handshakes the kernel answered whose ACK kracauer never got
    # (it holds nothing for them): the bound on what kracauer holds shows from the client's side only
    # when kracauer answers the SYNs itself.
    if not kernel:
        assert max_alive <= 1.2 * MAX_PEEKING, max_alive
    # How many must have been reset early follows from how fast the client opened them (a loaded
    # machine opens them slower): a prompt connection with more than max_peeking (and 20% slack)
    # younger ones established within its hello_timeout cannot still be peeking when it ends.
    started = sorted(c["est"] for c in established)
    must = sum(1 for c in prompt
               if bisect.bisect_left(started, c["est"] + SLOW_HELLO_TIMEOUT - 0.5)
               - bisect.bisect_right(started, c["est"]) > 1.2 * MAX_PEEKING)
    assert must < 0.02 * SILENT or evicted_early >= min(0.1 * SILENT, 0.5 * must), \
        (evicted_early, must, lifetimes[:5])
    assert out_of_order <= 0.05 * len(prompt), (out_of_order, len(prompt))
    assert lifetimes[-1] < SLOW_HELLO_TIMEOUT + 3.0, lifetimes[-5:]
    # Trickling a byte a second does not extend hello_timeout (they may be evicted sooner: while silent
    # connections whose SYN was retried are still coming in, the trickling ones are not the newest).
    assert len(trickle_life) == len(trickle), [(c["how"], c["est"], c["end"]) for c in trickle]
    assert all(c["sent"] >= 1 for c in trickle), [c["sent"] for c in trickle]
    assert max(trickle_life) < SLOW_HELLO_TIMEOUT + 2.0, trickle_life
    assert during["attempts"] >= 10 and during["success_pct"] >= 99.0, f"legitimate clients: {during}" + tail(k)
    assert peak < 200, peak
    problems = kracauer_healthy(k)
    assert not problems, problems + tail(k)


# -- 5. table full ----------------------------------------------------------------

ECHO_SERVER = textwrap.dedent(r"""
    import socket, sys, threading
    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    server = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, backlog=256)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
""")

# Holds N connections (each checked with an echo), tries one more, then checks every held one again.
TABLE_CLIENT = textwrap.dedent(r"""
    import json, socket, sys, time
    svc, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out = {}
    def roundtrip(s, i, tag):
        msg = f"{tag} {i}\n".encode()
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(100)
            if not chunk:
                break
            got += chunk
        return got == msg
    held = []
    for i in range(n):
        s = socket.create_connection((svc, port), timeout=5)
        held.append(s)
    out["first_roundtrips_ok"] = sum(roundtrip(s, i, "first") for i, s in enumerate(held))
    t = time.monotonic()
    try:
        extra = socket.create_connection((svc, port), timeout=5)
        out["extra"] = "connected"
        try:
            out["extra_roundtrip"] = roundtrip(extra, -1, "extra")
        except OSError as e:
            out["extra_roundtrip"] = repr(e)
        extra.close()
    except OSError as e:
        out["extra"] = type(e).__name__
    out["extra_seconds"] = round(time.monotonic() - t, 3)
    out["second_roundtrips_ok"] = sum(roundtrip(s, i, "second") for i, s in enumerate(held))
    for s in held:
        s.close()
    print(json.dumps(out))
""")


def test_past_max_connections_a_new_client_is_refused_and_existing_ones_carry_on(lab, start, record_property):
    n = 50
    echo = lab.popen("host1", [PYTHON, script(lab, "echo.py", ECHO_SERVER), str(ECHO_PORT)], stdout=subprocess.PIPE,
                     text=True)
    assert echo.stdout.readline().strip() == "ready"
    k = start(config(max_connections=n))
    proc = lab.run("client", [PYTHON, script(lab, "table_client.py", TABLE_CLIENT), SERVICE_ADDRESS, str(ECHO_PORT),
                              str(n)], timeout=60)
    result = json.loads(proc.stdout or "{}")
    report(record_property, "table_full", **result)
    shown = f"{proc.stdout} {proc.stderr}" + tail(k)
    assert result.get("first_roundtrips_ok") == n, shown
    if kernel_answers_syns(k):
        # The kernel answered the SYN with a cookie (it does not know the table is full): the
        # client's handshake ACK, which reaches kracauer, gets the RST. The connect succeeds and the
        # first segment meets the reset, or, if the RST comes before the client runs again, the
        # connect itself reports it.
        assert result["extra_seconds"] < 1.0, shown
        if result.get("extra") == "connected":
            assert result.get("extra_roundtrip", "").startswith("ConnectionResetError"), shown
        else:
            assert result.get("extra") == "ConnectionResetError", shown
    else:
        assert result.get("extra") == "ConnectionRefusedError" and result["extra_seconds"] < 1.0, shown
    assert result.get("second_roundtrips_ok") == n, shown
    problems = kracauer_healthy(k)
    assert not problems, problems + tail(k)
