"""Hosts behind NAT dial in (issue 11): ``kracauer agent`` on real hosts, through a real NAT.

::

    client ns ── box ns (kracauer, [agents] listen 203.0.113.1:4444)
                   └─ wan0 203.0.113.1 ── nat ns 203.0.113.2 (nftables masquerade,
                                           forward: only established back in)
                                             └─ br 10.77.0.1/24 ── agent1 ns 10.77.0.11  nginx, kracauer agent
                                                                └── agent2 ns 10.77.0.12  nginx, kracauer agent

The agents' hosts have no address the box can reach: each agent dials the
box through the NAT, registers its names, and the box carries the client
connections for those names down its tunnel. The hosts' nginx must log the
client's embedded address, as every kracauer host does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import textwrap
import time

import pytest

from tests import netlab
from tests.netlab import CLIENT_ADDRESS, HOSTS, PREFIX, SERVICE_ADDRESS, Lab, LabError, embed, wait_until

MISSING = netlab.missing_requirements() + ([] if shutil.which("nft") else ["nft (nftables)"])
if os.geteuid() != 0:
    MISSING.append("root")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="the agents lab needs " + ", ".join(MISSING)),
]

BOX_WAN = "203.0.113.1"
NAT_WAN = "203.0.113.2"
NAT_LAN = "10.77.0.1"
AGENT_HOSTS = {"agent1": "10.77.0.11", "agent2": "10.77.0.12"}
AGENT_PORT = 4444
SINK_PORT = 9443          # a TLS upload sink on the agents' hosts (nginx has the other ports)
METRICS = "127.0.0.1:9477"
EMBEDDED_CLIENT = embed(CLIENT_ADDRESS)
BIG = 100 << 20
# Extra client addresses, so that rendezvous hashing has several clients to spread.
CLIENTS = [f"198.51.100.{i}" for i in range(10, 26)]

TOKENS = {"t1": "lab-token-one-" + "a" * 32, "t2": "lab-token-two-" + "b" * 32}

SINK = textwrap.dedent("""
    import hashlib, socket, ssl, sys
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    server = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
            buf = b""
            while b"\\r\\n\\r\\n" not in buf:
                data = tls.recv(65536)
                if not data:
                    break
                buf += data
            head, _, rest = buf.partition(b"\\r\\n\\r\\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\\r\\n")
                          if line.lower().startswith(b"content-length:"))
            digest, got = hashlib.sha256(rest), len(rest)
            while got < length:
                data = tls.recv(1 << 20)
                if not data:
                    break
                digest.update(data)
                got += len(data)
            body = digest.hexdigest().encode()
            tls.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(body) + body)
            tls.close()
        except Exception as exc:
            print(exc, file=sys.stderr, flush=True)
""")


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def box_config(lab: Lab, keepalive: float = 2, extra: str = "", tokens: tuple[str, ...] = ("t1", "t2")) -> str:
    cert, key = lab.host_certs["host1"]
    allowed = {"t1": '["app.example.com", "shared.example.org"]', "t2": '["shared.example.org"]'}
    token_tables = "".join(f'\n[[agents.token]]\nsha256 = "{sha(TOKENS[t])}"\nnames = {allowed[t]}\n' for t in tokens)
    return textwrap.dedent(f"""\
        [tun]
        name = "kracauer0"
        mtu = 1500

        [translate]
        prefix = "{PREFIX}"

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
        port = {SINK_PORT}
        protocol = "tls"

        [[route]]
        name = "www.example.com"
        host = "{HOSTS['host1']}"

        [metrics]
        listen = "{METRICS}"

        [agents]
        listen = "{BOX_WAN}:{AGENT_PORT}"
        cert = "{cert}"
        key = "{key}"
        keepalive = {keepalive}
        """) + token_tables + extra


def build_nat(lab: Lab) -> None:
    """The NAT namespace and the agents' hosts behind it; nothing outside can open a connection to them."""
    box, nat = lab.ns("box"), lab.add_namespace("nat")
    run = subprocess.run
    def ip(*args: str) -> None:
        run(["ip", *args], check=True, capture_output=True)
    ip("-n", box, "link", "add", "wan0", "type", "veth", "peer", "name", "wan0", "netns", nat)
    ip("-n", box, "addr", "add", f"{BOX_WAN}/24", "dev", "wan0")
    ip("-n", box, "link", "set", "wan0", "up")
    ip("-n", nat, "addr", "add", f"{NAT_WAN}/24", "dev", "wan0")
    ip("-n", nat, "link", "set", "wan0", "up")
    ip("-n", nat, "link", "add", "lan0", "type", "bridge")
    ip("-n", nat, "addr", "add", f"{NAT_LAN}/24", "dev", "lan0")
    ip("-n", nat, "link", "set", "lan0", "up")
    lab.run("nat", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True)
    for i, (role, address) in enumerate(AGENT_HOSTS.items(), start=1):
        ns = lab.add_namespace(role)
        ip("-n", nat, "link", "add", f"a{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", nat, "link", "set", f"a{i}", "master", "lan0")
        ip("-n", nat, "link", "set", f"a{i}", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", NAT_LAN)
    rules = textwrap.dedent("""
        table ip labnat {
            chain masq { type nat hook postrouting priority srcnat; oifname "wan0" masquerade; }
            chain outbound_only {
                type filter hook forward priority filter; policy drop;
                ct state established,related accept
                iifname "lan0" oifname "wan0" accept
            }
            chain guard {
                type filter hook input priority filter; policy accept;
                iifname "wan0" ct state new drop
            }
        }
    """)
    lab.run("nat", ["nft", "-f", "-"], input=rules, check=True)
    for i, address in enumerate(CLIENTS):
        ip("-n", lab.ns("client"), "addr", "add", f"{address}/24", "dev", "eth0")


class Agent:
    """A ``kracauer agent`` process in an agent host's namespace."""

    def __init__(self, lab: Lab, role: str, token: str, names: list[str], tag: str) -> None:
        self.lab, self.role = lab, role
        directory = lab.dir / f"agent-{tag}"
        directory.mkdir(exist_ok=True)
        (directory / "token").write_text(token + "\n")
        (directory / "token").chmod(0o600)
        self.config = directory / "agent.toml"
        self.config.write_text(textwrap.dedent(f"""\
            [agent]
            box = "{BOX_WAN}:{AGENT_PORT}"
            server_name = "www.example.com"
            ca = "{lab.ca_cert}"
            token_file = "{directory / 'token'}"
            names = {names!r}
            tun = "kagent0"
            """).replace("'", '"'))
        self.log_path = directory / "agent.log"
        self.popen: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Agent":
        before = self.log().count("registered ")
        out = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.ns(self.role), *self.lab.kracauer_cmd, "agent", "--config",
                 str(self.config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        finally:
            out.close()
        self.lab._procs.append(netlab._Proc(f"agent {self.role}", self.popen, (self.log_path,)))
        if wait:
            self.wait_registered(before)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_registered(self, before: int, timeout: float = 15) -> None:
        def registered():
            if self.popen.poll() is not None:
                raise LabError(f"the agent in {self.role} exited with {self.popen.returncode}:\n{self.log()}")
            return self.log().count("registered ") > before and self.lab.link_exists(self.role, "kagent0")
        wait_until(registered, timeout, f"the agent in {self.role} to register", self.log)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else 0
        self.popen.send_signal(sig)
        return self.popen.wait(timeout)


@pytest.fixture(scope="module")
def lab():
    with Lab(big_file_size=BIG) as lab:
        build_nat(lab)
        for role in AGENT_HOSTS:
            lab.start_nginx(role)
        yield lab


@pytest.fixture(scope="module")
def box(lab):
    k = lab.start_kracauer(box_config(lab))
    wait_until(lambda: "agents: listening" in k.stderr(), 10, "the box's agent hub to listen", k.stderr)
    return k


@pytest.fixture(scope="module")
def agent1(lab, box):
    a = Agent(lab, "agent1", TOKENS["t1"], ["app.example.com", "shared.example.org"], "one").start()
    return a


def curl(lab: Lab, url: str, *args: str, **kwargs):
    return lab.curl(url, *args, **kwargs)


def seen(proc, k=None, agent=None) -> str:
    text = f"exit {proc.returncode}\n--- stdout\n{str(proc.stdout)[-1500:]}\n--- stderr\n{str(proc.stderr)[-1500:]}"
    if k is not None:
        text += "\n--- box (tail)\n" + "\n".join(k.log_lines()[-30:])
    if agent is not None:
        text += "\n--- agent (tail)\n" + agent.log()[-3000:]
    return text


def running(agent: Agent) -> Agent:
    if agent.popen.poll() is not None:
        agent.start()
    return agent


# -- the lab itself ----------------------------------------------------------------------


def test_nothing_can_connect_in_to_the_agents_hosts(lab, box):
    for target in (AGENT_HOSTS["agent1"], NAT_WAN):
        proc = lab.run("box", ["curl", "-sS", "--max-time", "2", f"http://{target}/"], timeout=10)
        assert proc.returncode != 0, f"the box reached {target} through the NAT: {proc.stdout}"


# -- an agent serves its names --------------------------------------------------------


def test_an_agent_behind_nat_serves_its_name_over_tls_and_http(lab, box, agent1):
    running(agent1)
    proc = curl(lab, "https://app.example.com/")
    assert proc.returncode == 0 and proc.stdout.strip() == "agent1", seen(proc, box, agent1)
    entry = lab.wait_for_log("agent1", lambda e: e["sni"] == "app.example.com")
    assert entry["remote_addr"] == EMBEDDED_CLIENT
    proc = curl(lab, "http://app.example.com/")
    assert proc.returncode == 0 and proc.stdout.strip() == "agent1", seen(proc, box, agent1)
    # A configured route still goes where it did.
    proc = curl(lab, "https://www.example.com/")
    assert proc.stdout.strip() == "host1", seen(proc, box)


def test_openssl_completes_the_handshake_with_the_agents_host(lab, box, agent1):
    running(agent1)
    proc = lab.run("client", ["openssl", "s_client", "-connect", f"{SERVICE_ADDRESS}:443", "-servername",
                              "app.example.com", "-CAfile", str(lab.ca_cert), "-verify_return_error"],
                   input="", timeout=15)
    assert proc.returncode == 0 and "Verify return code: 0 (ok)" in proc.stdout, seen(proc, box, agent1)


def test_a_100_mb_download_and_upload_through_the_tunnel_arrive_intact(lab, box, agent1):
    running(agent1)
    cert, key = lab.host_certs["host1"]
    script = lab.dir / "sink.py"
    script.write_text(SINK)
    sink = lab.popen("agent1", ["python3", str(script), str(SINK_PORT), str(cert), str(key)], stdout=-1, text=True)
    assert sink.stdout.readline().strip() == "ready"
    cmd = (f"curl -sS --fail --max-time 120 --cacert {lab.ca_cert} --resolve app.example.com:443:{SERVICE_ADDRESS} "
           f"https://app.example.com/big.bin | sha256sum")
    proc = lab.run("client", ["sh", "-c", cmd], timeout=130)
    assert proc.stdout.split()[0] == lab.big_sha256, seen(proc, box, agent1)
    upload = lab.dir / "upload.bin"
    with open(upload, "wb") as f:
        digest = hashlib.sha256()
        for _ in range(BIG >> 22):
            chunk = os.urandom(4 << 20)
            digest.update(chunk)
            f.write(chunk)
    proc = curl(lab, f"https://app.example.com:{SINK_PORT}/up", "-H", "Expect:", "-T", str(upload), max_time=120)
    upload.unlink()
    assert proc.returncode == 0 and proc.stdout.strip() == digest.hexdigest(), seen(proc, box, agent1)
    if netlab.lab_kernel_path() == "on":
        # Agents' connections are like any host's to the kernel path: their established packets went through BPF.
        offloaded = metric(lab, 'kracauer_events_total{kind="kernel_offloaded"}')
        assert offloaded >= 2, "no agent connection was handed to the kernel path"


def metric(lab: Lab, sample: str) -> float:
    text = lab.run("box", ["curl", "-sS", f"http://{METRICS}/metrics"]).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample))


def test_status_lists_the_agent_its_names_and_traffic(lab, box, agent1):
    running(agent1)
    assert curl(lab, "https://app.example.com/").returncode == 0
    time.sleep(1.2)
    proc = lab.run("box", [*lab.kracauer_cmd, "status", "--metrics", f"http://{METRICS}/metrics"])
    assert proc.returncode == 0, proc.stderr
    assert "agents: 1 connected" in proc.stdout, proc.stdout
    row = next(line for line in proc.stdout.splitlines() if "app.example.com" in line)
    assert "fd00:6b72::" in row and "shared.example.org" in row, proc.stdout
    assert metric(lab, 'kracauer_agent_packets_total{agent="') > 0


# -- refusals ---------------------------------------------------------------------------


def refused_as_unknown(proc) -> bool:
    """curl got the box's refusal of a name no route has: TLS alert unrecognized_name (RFC 6066 section 3)."""
    return proc.returncode != 0 and "unrecognized name" in str(proc.stderr).lower()


@pytest.mark.parametrize("token, names, reason, message", [
    ("wrong-token-" + "c" * 40, ["other.example.org"], "bad_token", "the token is not accepted by this box"),
    # One name the token may have and one it may not: the whole registration is refused.
    (TOKENS["t2"], ["shared.example.org", "other.example.org"], "name_not_allowed",
     "this token may not register other.example.org"),
], ids=["wrong-token", "name-not-allowed"])
def test_a_refused_agent_says_why_and_its_name_stays_unrouted(lab, box, agent1, token, names, reason, message):
    running(agent1)
    agent = Agent(lab, "agent2", token, names, f"refused-{reason}").start(wait=False)
    code = agent.popen.wait(20)
    assert code == 2, agent.log()
    assert "refused this agent" in agent.log() and f"{message}" in agent.log() and f"({reason})" in agent.log(), \
        agent.log()
    assert "not trying again" in agent.log()
    wait_until(lambda: f"({reason})" in box.stderr(), 5, "the box to log the refusal", box.stderr)
    line = next(line for line in box.log_lines() if "refused the agent" in line and f"({reason})" in line)
    assert message in line, line
    assert TOKENS["t2"] not in box.stderr() and "wrong-token" not in box.stderr(), "a token in the box's log"
    proc = curl(lab, "https://other.example.org/")
    assert refused_as_unknown(proc), seen(proc, box)
    assert not lab.link_exists("agent2", "kagent0")
    assert metric(lab, "kracauer_agents_connected") == 1
    assert metric(lab, f'kracauer_agent_refusals_total{{reason="{reason}"}}') >= 1
    # shared.example.org stays with agent1 alone.
    for address in CLIENTS[:6]:
        proc = curl(lab, "https://shared.example.org/", "--interface", address, max_time=5)
        assert proc.stdout.strip() == "agent1", seen(proc, box)


# -- an agent goes, and comes back ---------------------------------------------------


def test_killing_the_agent_unroutes_its_names_and_a_restart_brings_them_back(lab, box, agent1):
    running(agent1)
    assert curl(lab, "https://app.example.com/").stdout.strip() == "agent1"
    agent1.stop(signal.SIGKILL)
    killed = time.monotonic()

    def refused():
        return refused_as_unknown(curl(lab, "https://app.example.com/", max_time=3))
    wait_until(refused, 5, "new connections for app.example.com to be refused", lambda: "\n".join(box.log_lines()[-20:]))
    assert time.monotonic() - killed < 5
    agent1.start()
    proc = curl(lab, "https://app.example.com/")
    assert proc.stdout.strip() == "agent1", seen(proc, box, agent1)


def test_an_established_connection_through_a_gone_agent_is_reset(lab, box, agent1):
    running(agent1)
    slow = lab.popen("client", ["curl", "-sS", "-o", "/dev/null", "--limit-rate", "200k", "--max-time", "60",
                                "--cacert", str(lab.ca_cert), "--resolve", f"app.example.com:443:{SERVICE_ADDRESS}",
                                "https://app.example.com/big.bin"], stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    assert slow.poll() is None
    agent1.stop(signal.SIGKILL)
    gone = time.monotonic()
    slow.wait(15)
    stderr = slow.stderr.read()
    assert slow.returncode != 0
    assert time.monotonic() - gone < 10, "the client was left hanging instead of getting an RST"
    assert "reset" in stderr.lower() or "recv failure" in stderr.lower(), stderr
    agent1.start()


def test_two_agents_for_one_name_share_it_and_fail_over(lab, box, agent1):
    running(agent1)
    agent2 = Agent(lab, "agent2", TOKENS["t2"], ["shared.example.org"], "two").start()
    try:
        def served_by() -> dict[str, str]:
            out = {}
            for address in CLIENTS:
                proc = curl(lab, "https://shared.example.org/", "--interface", address, max_time=5)
                out[address] = proc.stdout.strip()
            return out
        first = served_by()
        assert set(first.values()) == {"agent1", "agent2"}, first
        # The choice is stable per client.
        assert served_by() == first
        agent2.stop(signal.SIGKILL)
        time.sleep(1)
        after = served_by()
        assert set(after.values()) == {"agent1"}, after
    finally:
        agent2.stop(signal.SIGKILL)


def test_a_stopped_agent_deregisters_and_removes_its_tun(lab, box, agent1):
    running(agent1)
    assert agent1.stop(signal.SIGTERM) == 0, agent1.log()
    assert not lab.link_exists("agent1", "kagent0")
    wait_until(lambda: "said bye" in box.stderr(), 5, "the box to hear the agent's bye", box.stderr)
    assert refused_as_unknown(curl(lab, "https://app.example.com/", max_time=3))
    agent1.start()


# -- reload --------------------------------------------------------------------------


def reload(box, text: str) -> None:
    before = box.stderr().count("reloaded ")
    box.rewrite_config(text)
    box.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: box.stderr().count("reloaded ") > before, 10, "the box to reload", box.stderr)


def test_a_reload_keeps_connected_agents_and_their_connections(lab, box, agent1):
    running(agent1)
    registered = agent1.log().count("registered ")
    size = 8 << 20
    with open(lab.dir / "big.bin", "rb") as f:
        want = hashlib.sha256(f.read(size)).hexdigest()
    cmd = (f"curl -sS --fail --max-time 60 --limit-rate 2M -r 0-{size - 1} --cacert {lab.ca_cert} "
           f"--resolve app.example.com:443:{SERVICE_ADDRESS} https://app.example.com/big.bin | sha256sum")
    slow = lab.popen("client", ["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        assert slow.poll() is None, slow.stderr.read()
        # A new route for a name: the reload applies, the agents stay.
        reload(box, box_config(lab, extra=f'\n[[route]]\nname = "www.example.net"\nhost = "{HOSTS["host2"]}"\n'))
        proc = curl(lab, "https://www.example.net/")
        assert proc.stdout.strip() == "host2", seen(proc, box)
        proc = curl(lab, "https://app.example.com/")
        assert proc.stdout.strip() == "agent1", seen(proc, box, agent1)
        out, err = slow.communicate(timeout=30)
        assert slow.returncode == 0 and out.split()[0] == want, err
    finally:
        if slow.poll() is None:
            slow.kill()
        reload(box, box_config(lab))
    assert agent1.log().count("registered ") == registered, agent1.log()[-2000:]
    assert agent1.popen.poll() is None


def test_a_reload_that_revokes_a_token_disconnects_its_agent_and_no_other(lab, box, agent1):
    running(agent1)
    registered = agent1.log().count("registered ")
    agent2 = Agent(lab, "agent2", TOKENS["t2"], ["shared.example.org"], "revoked").start()
    try:
        reload(box, box_config(lab, tokens=("t1",)))
        assert agent2.popen.wait(15) == 2, agent2.log()
        assert "token_revoked" in agent2.log() and "not trying again" in agent2.log(), agent2.log()
        assert "disconnecting the agent" in box.stderr()
        assert not lab.link_exists("agent2", "kagent0")
        for address in CLIENTS[:8]:
            proc = curl(lab, "https://shared.example.org/", "--interface", address, max_time=5)
            assert proc.stdout.strip() == "agent1", seen(proc, box)
    finally:
        agent2.stop(signal.SIGKILL)
        reload(box, box_config(lab))
    assert agent1.log().count("registered ") == registered


# -- a tunnel that goes silent ----------------------------------------------------------


def test_a_silent_tunnel_is_dropped_after_three_keepalives_and_the_agent_comes_back(lab, box, agent1):
    """The NAT drops everything (no FIN, no RST reaches either end): keepalives find the dead tunnel."""
    running(agent1)
    registered = agent1.log().count("registered ")
    assert curl(lab, "https://app.example.com/").stdout.strip() == "agent1"
    cut = "table ip labcut {\n chain cut { type filter hook forward priority -10; policy drop; }\n}\n"
    lab.run("nat", ["nft", "-f", "-"], input=cut, check=True)
    try:
        cut_at = time.monotonic()
        # keepalive = 2: three silent intervals, 6 s; a little more for the checks.
        wait_until(lambda: refused_as_unknown(curl(lab, "https://app.example.com/", max_time=2)), 12,
                   "the box to drop the silent tunnel", lambda: "\n".join(box.log_lines()[-20:]))
        assert time.monotonic() - cut_at >= 5, "the tunnel was dropped before three keepalive intervals"
        assert "nothing from the agent" in box.stderr()
    finally:
        lab.run("nat", ["nft", "delete", "table", "ip", "labcut"], check=True)
    # The agent notices too, dials again with backoff, and gets through once the NAT passes packets again.
    agent1.wait_registered(registered, timeout=45)
    proc = curl(lab, "https://app.example.com/")
    assert proc.stdout.strip() == "agent1", seen(proc, box, agent1)


# -- the box restarts (last: it replaces the module's box) ---------------------------------


def test_a_box_restart_says_bye_and_the_agents_dial_back(lab, box, agent1):
    running(agent1)
    registered = agent1.log().count("registered ")
    code, _ = box.stop(signal.SIGTERM)
    assert code == 0, box.stderr()[-2000:]
    wait_until(lambda: "the box said bye (box_stopping)" in agent1.log(), 5, "the agent to hear the box's bye",
               agent1.log)
    assert agent1.popen.poll() is None, "the agent gave up instead of dialling again"
    lab.reset_box()
    again = lab.start_kracauer(box_config(lab))
    wait_until(lambda: "agents: listening" in again.stderr(), 10, "the new box's agent hub to listen", again.stderr)
    # Backoff from 1 s, doubling: the first few attempts while the box was down failed.
    agent1.wait_registered(registered, timeout=30)
    proc = curl(lab, "https://app.example.com/")
    assert proc.stdout.strip() == "agent1", seen(proc, again, agent1)
    again.stop(signal.SIGTERM)
    lab.reset_box()


def test_with_state_a_restart_resets_what_went_through_agents_and_they_serve_again(lab, box, agent1):
    """[state] keeps host connections across a restart, but not an agent's: its tunnel closed with the
    old process, and its address may go to another agent. The client gets an RST, not a hang."""
    for k in lab._kracauers:
        k.stop()
    lab.reset_box()
    running(agent1)
    text = box_config(lab, extra=f'\n[state]\nfile = "{lab.dir / "state.json"}"\n')
    first = lab.start_kracauer(text)
    wait_until(lambda: "agents: listening" in first.stderr(), 10, "the agent hub to listen", first.stderr)
    registered = agent1.log().count("registered ")
    agent1.wait_registered(registered - 1, timeout=30)  # dialled back to this box
    registered = agent1.log().count("registered ")
    slow = lab.popen("client", ["curl", "-sS", "-o", "/dev/null", "--limit-rate", "500k", "--max-time", "60",
                                "--cacert", str(lab.ca_cert), "--resolve", f"app.example.com:443:{SERVICE_ADDRESS}",
                                "https://app.example.com/big.bin"], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert slow.poll() is None, slow.stderr.read()
        code, stderr = first.stop(signal.SIGTERM)
        assert code == 0 and "saved" in stderr, stderr[-2000:]
        second = lab.start_kracauer(text)
        slow.wait(20)
        assert slow.returncode != 0, "the download through the old tunnel went on"
        wait_until(lambda: "restored through agents of the previous process" in second.stderr(), 5,
                   "the new box to reset the agents' restored connections", second.stderr)
        agent1.wait_registered(registered, timeout=30)
        proc = curl(lab, "https://app.example.com/")
        assert proc.stdout.strip() == "agent1", seen(proc, second, agent1)
    finally:
        if slow.poll() is None:
            slow.kill()
        for k in lab._kracauers:
            k.stop()
        lab.reset_box()
