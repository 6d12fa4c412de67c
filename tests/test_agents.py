"""The agent hub (kracauer.agents) and the agent (kracauer.agent) talking over loopback TLS.

No root: each TUN is a SOCK_DGRAM socket pair (one packet per read and
write, as a TUN), so the tunnel's registration, relaying, anti-spoofing,
refusals and bye are checked with the real TLS and framing code.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket

import pytest

from kracauer import agent as agent_mod
from kracauer.agents import AddressPool, AgentHub, check_names, find_token, new_token, token_sha256
from kracauer.config import AgentConfig, AgentToken, AgentsConfig
from tests.netlab import _make_certificates

V6 = ipaddress.IPv6Address
PREFIX = ipaddress.IPv6Network("64:ff9b:1::/96")
CLIENT6 = V6("64:ff9b:1::c633:6402")
TOKEN = new_token()


def ipv6_packet(src: V6, dst: V6, payload: bytes = b"x" * 20, next_header: int = 6) -> bytes:
    return bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([next_header, 64]) + src.packed \
        + dst.packed + payload


# -- tokens and addresses ----------------------------------------------------------------


def test_a_new_token_has_at_least_128_bits_and_only_its_digest_is_kept():
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 43 for t in tokens)  # 256 bits, base64
    assert token_sha256(TOKEN) == __import__("hashlib").sha256(TOKEN.encode()).hexdigest()
    assert token_sha256(TOKEN + "\n") == token_sha256(TOKEN)


def test_find_token_takes_the_matching_entry_only():
    entries = [AgentToken(token_sha256("other"), ("a.example",)), AgentToken(token_sha256(TOKEN), ("b.example",))]
    assert find_token(TOKEN, entries) is entries[1]
    assert find_token("nope", entries) is None
    assert find_token(TOKEN[:-1], entries) is None


def test_check_names_lists_what_a_token_may_not_register():
    token = AgentToken("0" * 64, ("app.example.com", "*.dev.example.com"))
    assert check_names(["app.example.com", "x.dev.example.com"], token) == []
    assert check_names(["app.example.com", "other.example.com", "~re", "dev.example.com"], token) == [
        "other.example.com", "~re", "dev.example.com"]


def test_the_address_pool_hands_out_in_turn_and_skips_the_reserved():
    pool = AddressPool(ipaddress.IPv6Network("fd00:6b72::/124"))
    first = pool.allocate()
    assert first == V6("fd00:6b72::2")
    pool.release(first)
    assert pool.allocate() == V6("fd00:6b72::3")  # not the one just given back
    while pool.allocate() is not None:
        pass
    assert len(pool.used) == 14  # ::2 .. ::f, ::2 again once free
    pool.release(V6("fd00:6b72::9"))
    assert pool.allocate() == V6("fd00:6b72::9")


# -- the hub and an agent, over loopback ---------------------------------------------------


class FakeTun:
    def __init__(self, fd: int, name: str = "fake") -> None:
        self.fd, self.name, self.privileged = fd, name, False
        self.closed = False

    def close(self, keep: bool | None = None) -> None:
        if not self.closed:
            os.close(self.fd)
            self.closed = True


def tun_pair() -> tuple[FakeTun, socket.socket]:
    """A TUN as the program sees it, and the kernel's side of it."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    kernel.settimeout(5)
    return FakeTun(ours.detach()), kernel


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    ca, host_certs = _make_certificates(directory, ["box"])
    return ca, host_certs["box"]


class Rig:
    """A hub on 127.0.0.1 and agents that dial it, in one event loop."""

    def __init__(self, certs, tmp_path, monkeypatch, tokens=None) -> None:
        ca, (cert, key) = certs
        self.ca = ca
        self.tmp_path = tmp_path
        tokens = tokens or (AgentToken(token_sha256(TOKEN), ("app.example.com", "*.dev.example.com")),)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self.config = AgentsConfig(address=ipaddress.IPv4Address("127.0.0.1"), port=self.port, cert=str(cert),
                                   key=str(key), tokens=tokens, keepalive=1.0)
        self.changes: list[tuple[dict, list]] = []
        self.hub = AgentHub(self.config, [PREFIX], 1500, lambda routes, gone: self.changes.append((routes, gone)))
        self.hub.ssl = AgentHub._ssl_context(self.config)
        self.hub.sock = listener
        self.hub.tun, self.hub_kernel = tun_pair()
        self.agent_tuns: list[tuple[FakeTun, socket.socket]] = []

        def fake_open_tun(name, mtu, ipv4, ipv6, offload=True, persist=False):
            assert ipv6 == [PREFIX] and mtu == 1500
            pair = tun_pair()
            self.agent_tuns.append(pair)
            return pair[0]
        monkeypatch.setattr(agent_mod, "open_tun", fake_open_tun)
        monkeypatch.setattr(agent_mod, "add_address", lambda tun, address: None)

    def agent(self, token: str = TOKEN, names=("app.example.com",)) -> agent_mod.Agent:
        token_file = self.tmp_path / f"token-{len(self.agent_tuns)}-{names[0]}"
        token_file.write_text(token + "\n")
        return agent_mod.Agent(AgentConfig(box_host="127.0.0.1", box_port=self.port, server_name="www.example.com",
                                           ca=str(self.ca), token_file=str(token_file), names=tuple(names)))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


async def read_kernel(sock: socket.socket) -> bytes:
    return await asyncio.get_running_loop().run_in_executor(None, sock.recv, 65536)


def test_an_agent_registers_relays_both_ways_and_its_bye_removes_its_names(certs, tmp_path, monkeypatch):
    rig = Rig(certs, tmp_path, monkeypatch)

    async def main():
        await rig.hub.start()
        agent = rig.agent(names=("app.example.com", "x.dev.example.com"))
        task = asyncio.ensure_future(agent.run())
        await until(lambda: rig.changes)
        routes, gone = rig.changes[-1]
        address = routes["app.example.com"][0]
        assert routes == {"app.example.com": (address,), "x.dev.example.com": (address,)} and gone == []
        await until(lambda: agent.address is not None)
        assert agent.address == address
        agent_tun, agent_kernel = rig.agent_tuns[-1]

        # Down: the box's kernel routes a packet for the agent's address into the hub's TUN.
        down = ipv6_packet(CLIENT6, address)
        rig.hub_kernel.send(down)
        assert await read_kernel(agent_kernel) == down
        # A packet for no agent goes nowhere.
        rig.hub_kernel.send(ipv6_packet(CLIENT6, V6("fd00:6b72::99")))
        await until(lambda: rig.hub.drops["no_agent"] == 1)
        # The kernel routes the agents' network from anywhere: only the tracker's TCP and ICMPv6 from a
        # client prefix go down, so the tunnel is no way into the host for a neighbour of the box.
        rig.hub_kernel.send(ipv6_packet(V6("2001:db8::66"), address))
        rig.hub_kernel.send(ipv6_packet(CLIENT6, address, next_header=17))
        await until(lambda: rig.hub.drops["not_from_client"] == 2)
        icmp = ipv6_packet(CLIENT6, address, next_header=58)
        rig.hub_kernel.send(icmp)
        assert await read_kernel(agent_kernel) == icmp

        # Up: the host's answer, from the agent's address to the client.
        up = ipv6_packet(address, CLIENT6)
        agent_kernel.send(up)
        assert await read_kernel(rig.hub_kernel) == up
        session = rig.hub.sessions[address.packed]
        assert (session.packets_to_agent, session.packets_from_agent) == (2, 1)
        # The agent itself takes only packets from a client prefix to its address.
        drops = agent.drops
        agent._packet_down(agent.tun.fd, address.packed, ipv6_packet(V6("2001:db8::66"), address))
        agent._packet_down(agent.tun.fd, address.packed, ipv6_packet(CLIENT6, V6("fd00:6b72::99")))
        assert agent.drops == drops + 2

        # The agent does not send what is not its own; and the box would not take it.
        agent_kernel.send(ipv6_packet(V6("2001:db8::66"), CLIENT6))
        rig.hub._packet_up(session, ipv6_packet(V6("2001:db8::66"), CLIENT6))
        rig.hub._packet_up(session, ipv6_packet(address, V6("2001:db8::1")))
        assert session.drops == {"wrong_source": 1, "not_to_client": 1}

        # Keepalives keep a quiet tunnel open past three intervals.
        await asyncio.sleep(3.5)
        assert address.packed in rig.hub.sessions

        agent.stop()
        assert await asyncio.wait_for(task, 5) == 0
        await until(lambda: rig.changes[-1][1] == [address])
        assert rig.changes[-1][0] == {} and rig.hub.sessions == {}
        assert agent_tun.closed
        await rig.hub.stop()

    asyncio.run(main())
    rig.hub.close = lambda: None


@pytest.mark.parametrize("token, names, reason", [
    ("wrong", ("app.example.com",), "bad_token"),
    (TOKEN, ("app.example.com", "other.example.com"), "name_not_allowed"),
])
def test_a_refused_agent_stops_with_status_2_and_nothing_is_registered(certs, tmp_path, monkeypatch, caplog,
                                                                        token, names, reason):
    rig = Rig(certs, tmp_path, monkeypatch)

    async def main():
        await rig.hub.start()
        code = await asyncio.wait_for(rig.agent(token, names).run(), 10)
        await rig.hub.stop()
        return code

    assert asyncio.run(main()) == 2
    assert rig.changes == [] and rig.agent_tuns == []
    assert rig.hub.refusals == {reason: 1}
    text = caplog.text
    assert "refused this agent" in text and reason in text and "not trying again" in text
    assert "refused the agent from 127.0.0.1" in text


def test_two_agents_for_one_name_are_both_its_hosts_and_a_reload_drops_one_no_longer_allowed(
        certs, tmp_path, monkeypatch):
    t2 = "second-" + new_token()
    tokens = (AgentToken(token_sha256(TOKEN), ("app.example.com",)), AgentToken(token_sha256(t2), ("app.example.com",)))
    rig = Rig(certs, tmp_path, monkeypatch, tokens=tokens)

    async def main():
        await rig.hub.start()
        one, two = rig.agent(), rig.agent(t2)
        tasks = [asyncio.ensure_future(one.run())]
        # The hub registers an agent before the agent has its REGISTERED and its TUN: wait for both.
        await until(lambda: len(rig.changes) == 1 and one.address is not None)
        tasks.append(asyncio.ensure_future(two.run()))
        await until(lambda: len(rig.changes) == 2 and two.address is not None)
        hosts = rig.changes[-1][0]["app.example.com"]
        assert len(hosts) == 2 and hosts[0] == one.address and hosts[1] == two.address
        # A reload without the second token: the first agent stays, the second is told and goes for good.
        rig.hub.reconfigure(AgentsConfig(**{**rig.config.__dict__, "tokens": tokens[:1]}))
        assert await asyncio.wait_for(tasks[1], 5) == 2
        await until(lambda: rig.changes[-1][1] == [hosts[1]])
        assert rig.changes[-1][0] == {"app.example.com": (hosts[0],)}
        assert not tasks[0].done()
        one.stop()
        assert await asyncio.wait_for(tasks[0], 5) == 0
        await rig.hub.stop()

    asyncio.run(main())


def test_a_silent_peer_is_closed_after_three_keepalive_intervals(certs, tmp_path, monkeypatch):
    rig = Rig(certs, tmp_path, monkeypatch)

    async def main():
        import ssl

        from netstack import agentwire as wire

        await rig.hub.start()
        context = ssl.create_default_context(cafile=str(rig.ca))
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port, ssl=context,
                                                       server_hostname="www.example.com")
        writer.write(wire.encode_control(wire.HELLO, {"version": 1, "token": TOKEN, "names": ["app.example.com"]}))
        await until(lambda: rig.changes)
        started = asyncio.get_running_loop().time()
        # Never answer: the hub's keepalives arrive, then it gives up.
        while await reader.read(65536):
            pass
        waited = asyncio.get_running_loop().time() - started
        assert 2.5 < waited < 5
        await until(lambda: rig.changes[-1][1])
        writer.close()
        await rig.hub.stop()

    asyncio.run(main())
