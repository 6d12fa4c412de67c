"""kracauer.bridge on a real asyncio loop over loopback sockets (127.0.0.1 and ::1 only).

TlsStream with the contexts the bridge itself builds (peer_context, ingress_context) from
certificates made here; the pump between two TCP connections (both directions, half-close,
backpressure, idle timeout, reset); the caps, metrics and access-log records of Tunnels; and the
peer listener's answers to a CONNECT (its host connection replaced by one to a loopback server:
the real one binds prefix::client, whose answers would leave the box).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kracauer import bridge as bridge_module
from kracauer.bridge import (
    CHUNK, HIGH_WATER, BridgeCollector, BridgeService, Stream, TlsStream, Tunnel, Tunnels, ingress_context,
    peer_context, pump,
)
from kracauer.config import Bridge, BridgeListener, parse_config
from netstack import connect

SERVER_NAME = "bridge.example.com"

# ---------------------------------------------------------------- certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path, cert: x509.Certificate, key) -> tuple[str, str]:
    (path.parent / f"{path.name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path.parent / f"{path.name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(path.parent / f"{path.name}.pem"), str(path.parent / f"{path.name}.key")


def make_ca(path) -> tuple[x509.Certificate, object, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(path.name)).issuer_name(_name(path.name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    pem, _ = _write(path, cert, key)
    return cert, key, pem


def make_leaf(path, ca, *, dns: str | None = None, client: bool = False) -> tuple[str, str]:
    ca_cert, ca_key, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(path.name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                     else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return _write(path, builder.sign(ca_key, hashes.SHA256()), key)


@dataclass
class Pki:
    peer: BridgeListener      # the peer's listener: its certificate, the ingress boxes' CA
    ingress: Bridge           # the ingress's [[bridge]]: the peer's CA, its own certificate
    stranger: Bridge          # an ingress whose certificate comes from another CA
    wrong_name: Bridge        # an ingress that expects another outer name


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    peer_ca, ingress_ca, other_ca = make_ca(d / "peer-ca"), make_ca(d / "ingress-ca"), make_ca(d / "other-ca")
    peer_cert, peer_key = make_leaf(d / "bridge", peer_ca, dns=SERVER_NAME)
    ingress_cert, ingress_key = make_leaf(d / "ingress", ingress_ca, client=True)
    stranger_cert, stranger_key = make_leaf(d / "stranger", other_ca, client=True)
    peer = BridgeListener(address=ipaddress.IPv4Address("127.0.0.1"), port=0, cert=peer_cert, key=peer_key,
                          client_ca=ingress_ca[2], prefix=ipaddress.IPv6Network("2001:db8:64::/96"), ports=(443,))
    ingress = Bridge(name="provider", address="127.0.0.1", port=0, server_name=SERVER_NAME, ca=peer_ca[2],
                     cert=ingress_cert, key=ingress_key)
    return Pki(peer, ingress,
               Bridge(**{**ingress.__dict__, "cert": stranger_cert, "key": stranger_key}),
               Bridge(**{**ingress.__dict__, "server_name": "other.example.com"}))


# ---------------------------------------------------------------- loopback plumbing


def run(coro, timeout: float = 5.0):
    """Run one test's coroutine on a fresh loop, bounded: a hung test fails instead of hanging."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def tcp_pair(host: str = "127.0.0.1", *, rcvbuf: int | None = None,
                   sndbuf: int | None = None) -> tuple[Stream, Stream]:
    """A connected (client end, server end) over loopback, as bridge Streams. `rcvbuf` is the client's
    receive buffer and `sndbuf` the server end's send buffer (small, to see backpressure soon)."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_accept(reader, writer):
        if sndbuf is not None:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        accepted.set_result(Stream(reader, writer))

    server = await asyncio.start_server(on_accept, host, 0, limit=CHUNK)
    port = server.sockets[0].getsockname()[1]
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window scale
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    server_end = await accepted
    server.close()
    return Stream(reader, writer), server_end


async def tls_pair(pki: Pki, ingress: Bridge | None = None) -> tuple[TlsStream, TlsStream]:
    """(ingress end, peer end) over loopback with the bridge's own contexts; not yet shaken hands."""
    ingress = ingress or pki.ingress
    client, server = await tcp_pair()
    c = TlsStream(client.reader, client.writer, ingress_context(ingress), server_side=False,
                  server_hostname=ingress.server_name)
    s = TlsStream(server.reader, server.writer, peer_context(pki.peer), server_side=True)
    return c, s


async def read_all(stream: Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.read():
        data += chunk
    return bytes(data)


def tunnel() -> Tunnel:
    return Tunnel("ingress", client="198.51.100.2", client_port=40000, peer="203.0.113.20:4443")


# ---------------------------------------------------------------- TlsStream


def test_tls_handshake_verifies_both_ends_tls13_and_notes_the_outer_name(pki):
    async def main():
        c, s = await tls_pair(pki)
        await asyncio.gather(c.handshake(), s.handshake())
        # RFC 8446: TLS 1.3 only; the ingress checked the peer's name, the peer the ingress's CA.
        assert c.tls.version() == s.tls.version() == "TLSv1.3"
        assert dict(x[0] for x in c.peer_certificate["subject"])["commonName"] == "bridge"
        assert dict(x[0] for x in s.peer_certificate["subject"])["commonName"] == "ingress"
        assert s.tls.outer_name == SERVER_NAME  # the SNI the ingress sent (for the access log)
        c.write(b"ping")
        assert await s.read() == b"ping"
        s.write(b"pong")
        assert await c.read() == b"pong"
        c.reset(), s.reset()
    run(main())


def test_tls_half_close_sends_close_notify_and_the_other_direction_goes_on(pki):
    # RFC 8446 §6.1: close_notify closes the sender's direction only; each side may keep
    # sending after it received one. A tunnel needs that for a client's half-close.
    async def main():
        c, s = await tls_pair(pki)
        await asyncio.gather(c.handshake(), s.handshake())
        c.write(b"request")
        await c.write_eof()
        await c.write_eof()  # a second one is a no-op, not an error
        assert await read_all(s) == b"request"
        # The b"" came from the close_notify alert, not from the TCP end that follows it.
        assert not s._raw_eof
        # The peer's direction is still open: an answer of several records, after the EOF.
        answer = os.urandom(3 * CHUNK + 17)
        s.write(answer)
        await s.drain()
        await s.write_eof()
        assert await read_all(c) == answer
        await asyncio.gather(c.close(), s.close())
    run(main())


def test_tls_half_close_is_a_tcp_fin_after_the_close_notify(pki):
    async def main():
        c, s = await tls_pair(pki)
        await asyncio.gather(c.handshake(), s.handshake())
        await c.write_eof()
        assert await s.read() == b"" and not s._raw_eof  # the alert first
        # The raw TCP stream ended as well (a FIN after the alert), not only the TLS one.
        assert await s.reader.read() == b"" and s.reader.at_eof()
        s.write(b"still here")
        await s.drain()
        assert await c.read() == b"still here"
        c.reset(), s.reset()
    run(main())


def test_a_tcp_end_without_close_notify_ends_the_direction(pki):
    # RFC 8446 §6.1 calls it a truncation; for a tunnel it ends the direction as a FIN would.
    async def main():
        c, s = await tls_pair(pki)
        await asyncio.gather(c.handshake(), s.handshake())
        c.write(b"last words")
        await c.drain()
        c.writer.write_eof()  # the TCP FIN alone
        assert await read_all(s) == b"last words"
        c.reset(), s.reset()
    run(main())


def test_an_ingress_certificate_from_another_ca_is_refused_with_an_alert(pki):
    # RFC 8446 §4.4.2: in TLS 1.3 the client's handshake completes before the server checked its
    # certificate; the refusal reaches the ingress as an alert on its first read (§6.2).
    async def main():
        c, s = await tls_pair(pki, pki.stranger)
        results = await asyncio.gather(c.handshake(), s.handshake(), return_exceptions=True)
        assert results[0] is None
        assert isinstance(results[1], ssl.SSLError) and "certificate verify failed" in str(results[1])
        with pytest.raises(ssl.SSLError, match="UNKNOWN_CA|unknown ca"):
            await c.read()
        c.reset(), s.reset()
    run(main())


def test_an_ingress_without_a_certificate_is_refused(pki):
    async def main():
        client, server = await tcp_pair()
        context = ssl.create_default_context(cafile=pki.ingress.ca)
        c = TlsStream(client.reader, client.writer, context, server_side=False, server_hostname=SERVER_NAME)
        s = TlsStream(server.reader, server.writer, peer_context(pki.peer), server_side=True)
        results = await asyncio.gather(c.handshake(), s.handshake(), return_exceptions=True)
        assert isinstance(results[1], ssl.SSLError)
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|certificate required"):
            await c.read()
        c.reset(), s.reset()
    run(main())


def test_the_ingress_refuses_a_peer_certificate_for_another_name(pki):
    async def main():
        c, s = await tls_pair(pki, pki.wrong_name)
        results = await asyncio.gather(c.handshake(), s.handshake(), return_exceptions=True)
        assert isinstance(results[0], ssl.SSLCertVerificationError)
        assert "Hostname mismatch" in str(results[0]) or "doesn't match" in str(results[0])
        assert isinstance(results[1], (ssl.SSLError, ConnectionError))
        c.reset(), s.reset()
    run(main())


def test_the_peer_refuses_tls_1_2(pki):
    async def main():
        client, server = await tcp_pair()
        context = ingress_context(pki.ingress)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
        c = TlsStream(client.reader, client.writer, context, server_side=False, server_hostname=SERVER_NAME)
        s = TlsStream(server.reader, server.writer, peer_context(pki.peer), server_side=True)
        results = await asyncio.gather(c.handshake(), s.handshake(), return_exceptions=True)
        assert all(isinstance(r, ssl.SSLError) for r in results), results
        c.reset(), s.reset()
    run(main())


def test_a_handshake_cut_short_is_a_connection_reset(pki):
    async def main():
        client, server = await tcp_pair()
        s = TlsStream(server.reader, server.writer, peer_context(pki.peer), server_side=True)
        client.writer.write_eof()
        with pytest.raises(ConnectionResetError, match="during the TLS handshake"):
            await s.handshake()
        client.reset(), s.reset()
    run(main())


# ---------------------------------------------------------------- the pump


async def relayed(*, idle: float = 5.0, host: str = "127.0.0.1", tls_pki: Pki | None = None, **buffers):
    """client app ⇄ [near | pump | far] ⇄ service app; the pump's task, the tunnel, and near.

    With `tls_pki`, the far leg is a TLS connection (as from the ingress to the peer)."""
    client_app, near = await tcp_pair(host, **buffers)
    if tls_pki is not None:
        far, service_app = await tls_pair(tls_pki)
        await asyncio.gather(far.handshake(), service_app.handshake())
    else:
        far, service_app = await tcp_pair(host)
    t = tunnel()
    task = asyncio.ensure_future(pump(near, far, t, idle))
    return client_app, service_app, task, t, near


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_pump_relays_both_ways_and_counts_the_bytes(host):
    async def main():
        client_app, service_app, task, t, near = await relayed(host=host)
        hello = os.urandom(517)
        client_app.write(hello)
        assert await service_app.reader.readexactly(len(hello)) == hello
        answer = os.urandom(5 * CHUNK + 3)  # more than one read
        service_app.write(answer)
        assert await client_app.reader.readexactly(len(answer)) == answer
        await client_app.write_eof()
        await service_app.write_eof()
        assert await task == "closed"
        assert (t.bytes_to_host, t.bytes_to_client) == (len(hello), len(answer))
        assert await client_app.read() == b"" and await service_app.read() == b""
        client_app.reset(), service_app.reset()
    run(main())


@pytest.mark.parametrize("first", ["client", "service"])
def test_a_half_close_passes_on_and_the_other_direction_goes_on(first):
    # RFC 9293 §3.6: after a FIN the other direction stays open ("half-closed"); the pump passes the
    # FIN on and keeps relaying the other way until that one ends too.
    async def main():
        client_app, service_app, task, t, near = await relayed()
        closer, other = (client_app, service_app) if first == "client" else (service_app, client_app)
        closer.write(b"the last of this direction")
        await closer.write_eof()
        assert await read_all(other) == b"the last of this direction"  # ... then the FIN
        big = os.urandom(2 * 1024 * 1024)
        other.write(big)
        await other.drain()
        received = await closer.reader.readexactly(len(big))
        assert hashlib.sha256(received).digest() == hashlib.sha256(big).digest()
        assert not task.done()  # one direction is still open
        await other.write_eof()
        assert await closer.read() == b""
        assert await task == "closed"
        client_app.reset(), service_app.reset()
    run(main())


def test_the_pump_relays_through_tls_with_half_close(pki):
    # As the ingress does: a client's TCP on one side, TLS to the peer on the other.
    async def main():
        client_app, service_app, task, t, near = await relayed(tls_pki=pki)
        client_app.write(b"GET / HTTP/1.1\r\n\r\n")
        await client_app.write_eof()
        assert await read_all(service_app) == b"GET / HTTP/1.1\r\n\r\n"  # FIN became close_notify
        body = os.urandom(300_000)
        service_app.write(body)
        await service_app.write_eof()
        assert await read_all(client_app) == body
        assert await task == "closed"
        assert (t.bytes_to_host, t.bytes_to_client) == (18, len(body))
        client_app.reset(), service_app.reset()
    run(main())


def test_a_slow_reader_stops_the_pump_reading_from_the_other_side():
    # Bounded buffers: the pump drains after every write, so while the client reads nothing it
    # holds at most HIGH_WATER plus one CHUNK, and stops reading from the service (whose own
    # writes then back up) instead of buffering the whole transfer.
    async def main():
        client_app, service_app, task, t, near = await relayed(rcvbuf=32 * 1024, sndbuf=32 * 1024)
        total = 16 * 1024 * 1024
        data = os.urandom(total)
        sender = asyncio.ensure_future(_send(service_app, data))
        last, steady_since = -1, time.monotonic()
        while time.monotonic() - steady_since < 0.1:  # until the pump stops moving bytes
            await asyncio.sleep(0.01)
            if t.bytes_to_client != last:
                last, steady_since = t.bytes_to_client, time.monotonic()
        assert not sender.done() and not task.done()
        # What the pump took from the service: its own buffer plus what the kernel's small buffers
        # on the client's side hold (a few times 32 KiB with their overhead), far from 16 MiB.
        assert HIGH_WATER < t.bytes_to_client < HIGH_WATER + CHUNK + 2 * 1024 * 1024, t.bytes_to_client
        # Now the client reads: everything arrives, in order.
        received = await client_app.reader.readexactly(total)
        assert received == data
        await sender
        await service_app.write_eof()
        await client_app.write_eof()
        assert await task == "closed"
        client_app.reset(), service_app.reset()
    run(main(), timeout=10)


async def _send(stream: Stream, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(data), CHUNK):
        stream.write(view[i:i + CHUNK])
        await stream.drain()


def test_the_pump_never_buffers_more_than_high_water_and_a_chunk():
    async def main():
        client_app, service_app, task, t, near = await relayed(rcvbuf=32 * 1024, sndbuf=32 * 1024)
        data = os.urandom(4 * 1024 * 1024)
        sender = asyncio.ensure_future(_send(service_app, data))
        peak = 0
        for _ in range(30):
            await asyncio.sleep(0.005)
            peak = max(peak, near.writer.transport.get_write_buffer_size())
        # drain() waits above HIGH_WATER; one CHUNK read may land on top before it does.
        assert HIGH_WATER <= peak <= HIGH_WATER + CHUNK
        assert await client_app.reader.readexactly(len(data)) == data
        await sender
        await service_app.write_eof()
        await client_app.write_eof()
        assert await task == "closed"
        client_app.reset(), service_app.reset()
    run(main(), timeout=10)


def test_an_idle_tunnel_ends_both_sides_with_a_reset():
    async def main():
        client_app, service_app, task, t, near = await relayed(idle=0.2)
        start = time.monotonic()
        assert await task == "idle_timeout"
        assert 0.2 <= time.monotonic() - start < 1.0
        # RFC 9293 §3.6 abort: both ends see a reset, not a clean end.
        for app in (client_app, service_app):
            with pytest.raises(ConnectionResetError):
                await app.read()
    run(main())


def test_traffic_one_way_keeps_the_tunnel_from_idling():
    # Idle means both directions: a long download with nothing from the client is not idle.
    async def main():
        client_app, service_app, task, t, near = await relayed(idle=0.2)
        for _ in range(8):  # 0.4 s of a trickle, twice the idle timeout
            service_app.write(b"x" * 100)
            await service_app.drain()
            await asyncio.sleep(0.05)
        assert not task.done()
        assert await client_app.reader.readexactly(800) == b"x" * 800
        assert await task == "idle_timeout"  # then nothing moves at all
    run(main())


@pytest.mark.parametrize("who", ["client", "service"])
def test_a_reset_on_either_side_resets_the_other(who):
    async def main():
        client_app, service_app, task, t, near = await relayed()
        client_app.write(b"hello")
        assert await service_app.reader.readexactly(5) == b"hello"
        resetter, other = (client_app, service_app) if who == "client" else (service_app, client_app)
        resetter.reset()
        assert await task == "reset"
        with pytest.raises(ConnectionResetError):
            await read_all(other)
    run(main())


# ---------------------------------------------------------------- Tunnels, metrics, records


def test_tunnels_admit_up_to_the_cap_per_side_and_count_the_ends():
    lines: list[str] = []
    tunnels = Tunnels(2, lines.append)
    assert tunnels.admit("ingress") and tunnels.admit("ingress")
    assert not tunnels.admit("ingress")  # the third is over the cap
    assert tunnels.admit("peer")         # each side has its own count
    assert tunnels.active == {"ingress": 2, "peer": 1}
    done = Tunnel("ingress", client="198.51.100.2", client_port=40000, peer="203.0.113.20:4443",
                  bytes_to_host=100, bytes_to_client=2000, outcome="closed")
    tunnels.done(done)
    assert tunnels.active == {"ingress": 1, "peer": 1}
    assert tunnels.admit("ingress")  # room again
    refused = Tunnel("ingress", client="198.51.100.3", client_port=40001, peer="", outcome="refused_tunnels")
    tunnels.done(refused, admitted=False)  # never admitted: the count stays
    assert tunnels.active == {"ingress": 2, "peer": 1}
    assert tunnels.opened == {("ingress", "closed"): 1, ("ingress", "refused_tunnels"): 1}
    assert tunnels.bytes == {("ingress", "to_host"): 100, ("ingress", "to_client"): 2000}
    assert [json.loads(line)["outcome"] for line in lines] == ["closed", "refused_tunnels"]


def test_a_reload_changes_the_cap_for_new_tunnels():
    config = parse_config('[translate]\nprefix = "64:ff9b:1::/96"\n[[listen]]\naddress = "192.0.2.10"\nport = 443\n'
                          'protocol = "tls"\n[fallback]\nhost = "2001:db8::1"\n[limits]\nmax_tunnels = 1\n')
    service = BridgeService(config, lambda line: None, "lo")  # no bridge configured: no sockets
    assert service.peers == [] and service.relay is None
    assert service.tunnels.admit("peer") and not service.tunnels.admit("peer")
    service.reconfigure(dataclass_replace_limits(config, max_tunnels=3))
    assert service.tunnels.admit("peer") and service.tunnels.admit("peer") and not service.tunnels.admit("peer")


def dataclass_replace_limits(config, **limits):
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, **limits))


def test_the_collector_reports_active_tunnels_ends_by_outcome_and_bytes():
    tunnels = Tunnels(10, lambda line: None)
    tunnels.admit("ingress"), tunnels.admit("ingress"), tunnels.admit("peer")
    for side, outcome, up, down in [("ingress", "closed", 10, 20), ("ingress", "reset", 1, 2),
                                    ("peer", "closed", 5, 7)]:
        tunnels.done(Tunnel(side, client="198.51.100.2", client_port=1, peer="p", bytes_to_host=up,
                            bytes_to_client=down, outcome=outcome))
    tunnels.admit("peer")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in BridgeCollector(tunnels).collect() for s in family.samples}
    assert samples[("kracauer_bridge_tunnels_active", (("side", "ingress"),))] == 0
    assert samples[("kracauer_bridge_tunnels_active", (("side", "peer"),))] == 1
    assert samples[("kracauer_bridge_tunnels_total", (("outcome", "closed"), ("side", "ingress")))] == 1
    assert samples[("kracauer_bridge_tunnels_total", (("outcome", "reset"), ("side", "ingress")))] == 1
    assert samples[("kracauer_bridge_tunnels_total", (("outcome", "closed"), ("side", "peer")))] == 1
    assert samples[("kracauer_bridge_bytes_total", (("direction", "to_host"), ("side", "ingress")))] == 11
    assert samples[("kracauer_bridge_bytes_total", (("direction", "to_client"), ("side", "ingress")))] == 22
    assert samples[("kracauer_bridge_bytes_total", (("direction", "to_client"), ("side", "peer")))] == 7


def test_the_collector_is_served_in_the_prometheus_text_format():
    from prometheus_client import CollectorRegistry, generate_latest
    tunnels = Tunnels(10, lambda line: None)
    tunnels.done(Tunnel("peer", client="198.51.100.2", client_port=0, peer="203.0.113.9", bytes_to_host=3,
                        outcome="refused_port"))
    registry = CollectorRegistry()
    registry.register(BridgeCollector(tunnels))
    text = generate_latest(registry).decode()
    assert 'kracauer_bridge_tunnels_total{outcome="refused_port",side="peer"} 1.0' in text
    assert 'kracauer_bridge_bytes_total{direction="to_host",side="peer"} 3.0' in text


def test_the_access_log_record_names_both_names_the_peer_the_bytes_and_the_outcome():
    lines: list[str] = []
    tunnels = Tunnels(10, lines.append)
    t = Tunnel("ingress", client="198.51.100.2", client_port=40000, peer="203.0.113.20:4443", bridge="provider",
               outer_name=SERVER_NAME, protocol="tls", name="www.service.example.com", port=443,
               route="*.service.example.com", host="203.0.113.20:4443", bytes_to_host=517, bytes_to_client=4096,
               outcome="closed")
    tunnels.done(t)
    [line] = lines
    record = json.loads(line)
    duration = record.pop("duration")
    start = record.pop("start")
    assert record == {
        "protocol": "bridge", "side": "ingress", "client": "198.51.100.2", "client_port": 40000,
        "listener_protocol": "tls", "bridge": "provider", "peer": "203.0.113.20:4443",
        "outer_name": SERVER_NAME, "name": "www.service.example.com", "port": 443,
        "route": "*.service.example.com", "host": "203.0.113.20:4443", "bytes_to_host": 517,
        "bytes_to_client": 4096, "outcome": "closed",
    }
    assert 0 <= duration < 5
    # RFC 3339 UTC with microseconds, as the connection records have.
    parsed = datetime.datetime.strptime(start, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert abs(parsed.timestamp() - t.start_wall) < 1e-5


def test_an_unset_record_field_is_null_not_an_empty_string():
    record = Tunnel("peer", client="", client_port=0, peer="127.0.0.1", outcome="client_tls_failed").record()
    assert (record["outer_name"], record["name"], record["port"], record["listener_protocol"],
            record["host"]) == (None, None, None, None, None)


def test_a_failing_access_log_never_ends_a_tunnel():
    def broken(line: str) -> None:
        raise OSError("disk full")
    tunnels = Tunnels(1, broken)
    assert tunnels.admit("peer")
    tunnels.done(Tunnel("peer", client="198.51.100.2", client_port=0, peer="x", outcome="closed"))
    assert tunnels.active["peer"] == 0 and tunnels.opened == {("peer", "closed"): 1}


# ---------------------------------------------------------------- the peer listener


PEER_CONFIG = """\
[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "203.0.113.20"
port = 4443
protocol = "bridge"
cert = "/x/bridge.pem"
key = "/x/bridge.key"
client_ca = "/x/ingress-ca.pem"
prefix = "2001:db8:64::/96"

[[route]]
name = "www.service.example.com"
host = "2001:db8::10"

[[route]]
name = "www.example.com"
host = "2001:db8::20"

[limits]
idle_timeout = 2
hello_timeout = 0.5
connect_timeout = 1
"""


class PeerBox:
    """A BridgeService with one peer listener on 127.0.0.1 (port chosen by the kernel), whose host
    connections go to a loopback echo-and-record server instead of [host]:port from prefix::client."""

    def __init__(self, pki: Pki, max_tunnels: int = 10, ports: tuple[int, ...] = (443,)) -> None:
        config = parse_config(PEER_CONFIG + f"max_tunnels = {max_tunnels}\n")
        config = dataclasses.replace(config, bridge_listeners=(dataclasses.replace(pki.peer, ports=ports),))
        self.lines: list[str] = []
        self.service = BridgeService(config, self.lines.append, "lo")
        [self.peer] = self.service.peers
        self.port = self.peer.sock.getsockname()[1]
        self.pki = pki
        self.host_connects: list[tuple[str, str, int]] = []
        self.host_received = bytearray()

    async def start(self) -> None:
        async def host(reader, writer):
            writer.write(b"service hello")
            await writer.drain()
            while data := await reader.read(CHUNK):
                self.host_received.extend(data)
            writer.close()
        self.host_server = await asyncio.start_server(host, "127.0.0.1", 0)
        host_port = self.host_server.sockets[0].getsockname()[1]

        async def connect_host(client, target, timeout):
            # What the real one would bind: the listener's prefix + the client's IPv4 (RFC 6052 style).
            source = str(self.pki.peer.prefix.network_address + int(client))
            self.host_connects.append((source, str(target.hosts[0]), target.port))
            reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
            return Stream(reader, writer), "connected"
        self.peer._connect_host = connect_host
        await self.service.start()

    async def stop(self) -> None:
        await self.service.stop()
        self.host_server.close()
        self.peer.sock.close()

    async def ingress(self, bridge: Bridge | None = None) -> TlsStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        bridge = bridge or self.pki.ingress
        stream = TlsStream(reader, writer, ingress_context(bridge), server_side=False,
                           server_hostname=bridge.server_name)
        await stream.handshake()
        return stream

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


async def until(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_the_peer_answers_200_connects_from_prefix_client_and_relays(pki):
    async def main():
        box = PeerBox(pki)
        await box.start()
        stream = await box.ingress()
        # The CONNECT and the client's first bytes in one write: those belong to the tunnel.
        stream.write(connect.connect_request("www.service.example.com", 443, "198.51.100.2") + b"client hello")
        reader = connect.ResponseHeadReader()
        result = connect.NEED_DATA
        while result is connect.NEED_DATA:
            result = reader.feed(await stream.read())
        assert isinstance(result, connect.ResponseHead) and result.status == 200
        rest = reader.rest
        while len(rest) < len(b"service hello"):
            rest += await stream.read()
        assert rest == b"service hello"
        assert box.host_connects == [("2001:db8:64::c633:6402", "2001:db8::10", 443)]
        await stream.write_eof()
        assert await stream.read() == b""  # the host closed after our EOF
        await until(lambda: box.lines)
        [record] = box.records()
        assert box.host_received == b"client hello"
        assert {k: record[k] for k in ("side", "client", "outer_name", "name", "port", "route", "bytes_to_host",
                                        "bytes_to_client", "outcome")} == {
            "side": "peer", "client": "198.51.100.2", "outer_name": SERVER_NAME, "name": "www.service.example.com",
            "port": 443, "route": "www.service.example.com", "bytes_to_host": 12, "bytes_to_client": 13,
            "outcome": "closed"}
        assert record["peer"] == "127.0.0.1" and box.service.tunnels.active == {"ingress": 0, "peer": 0}
        stream.reset()
        await box.stop()
    run(main())


@pytest.mark.parametrize("head,answer,outcome", [
    (connect.connect_request("nowhere.example.com", 443, "198.51.100.2"), connect.FORBIDDEN_NAME,
     "refused_unknown_name"),
    (connect.connect_request("www.service.example.com", 22, "198.51.100.2"), connect.FORBIDDEN_PORT,
     "refused_port"),
    # The peer trusts Forwarded, but needs it: without a client address the host would see none.
    (b"CONNECT www.service.example.com:443 HTTP/1.1\r\nHost: www.service.example.com:443\r\n\r\n",
     connect.BAD_REQUEST, "refused_bad_request"),
    (b"CONNECT www.service.example.com:443 HTTP/1.1\r\nForwarded: for=198.51.100.2, for=203.0.113.1\r\n\r\n",
     connect.BAD_REQUEST, "refused_bad_request"),
    (b"GET / HTTP/1.1\r\nHost: www.service.example.com\r\n\r\n", connect.NOT_IMPLEMENTED, "refused_method"),
    (b"CONNECT www.service.example.com HTTP/1.1\r\n\r\n", connect.BAD_REQUEST, "refused_bad_request"),
])
def test_the_peer_answers_a_refused_connect_as_a_connect_listener_would(pki, head, answer, outcome):
    async def main():
        box = PeerBox(pki)
        await box.start()
        stream = await box.ingress()
        stream.write(head)
        assert await read_all(stream) == answer  # then close_notify: the answer is the whole reply
        await until(lambda: box.lines)
        [record] = box.records()
        assert record["outcome"] == outcome and box.host_connects == []
        stream.reset()
        await box.stop()
    run(main())


def test_the_peer_refuses_a_tunnel_over_the_cap_with_a_reset(pki):
    async def main():
        box = PeerBox(pki, max_tunnels=1)
        await box.start()
        first = await box.ingress()  # admitted, waits in its CONNECT head
        await until(lambda: box.service.tunnels.active["peer"] == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", box.port)
        with pytest.raises(ConnectionResetError):
            await read_all(Stream(reader, writer))
        await until(lambda: box.lines)
        assert [r["outcome"] for r in box.records()] == ["refused_tunnels"]
        assert box.service.tunnels.active["peer"] == 1
        first.reset(), writer.transport.abort()
        await box.stop()
    run(main())


def test_the_peer_logs_a_refused_ingress_certificate(pki):
    async def main():
        box = PeerBox(pki)
        await box.start()
        stream = await box.ingress(pki.stranger)  # TLS 1.3: the client's side completes
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await read_all(stream)
        await until(lambda: box.lines)
        assert [r["outcome"] for r in box.records()] == ["client_tls_failed"]
        stream.reset()
        await box.stop()
    run(main())


def test_the_peer_resets_a_head_that_never_ends(pki):
    async def main():
        box = PeerBox(pki)
        await box.start()
        stream = await box.ingress()
        stream.write(b"CONNECT www.service.example.com:443 HTTP/1.1\r\n")
        start = time.monotonic()
        with pytest.raises((ConnectionResetError, ssl.SSLError)):
            await read_all(stream)
        assert time.monotonic() - start < 1.8  # hello_timeout = 0.5
        await until(lambda: box.lines)
        assert [r["outcome"] for r in box.records()] == ["hello_timeout"]
        stream.reset()
        await box.stop()
    run(main())


# ---------------------------------------------------------------- the ingress relay, to a peer on loopback

INGRESS_CONFIG = """\
[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = {listen_port}
protocol = "{protocol}"
{extra}
[[bridge]]
name = "provider"
address = "127.0.0.1:{peer_port}"
server_name = "bridge.example.com"
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[[route]]
name = "www.example.com"
bridge = "provider"
port = {port}

[limits]
idle_timeout = 2
hello_timeout = 0.5
connect_timeout = 1
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


class IngressBox:
    """An ingress BridgeService whose relay listens on [::1]:port, the port a bridge route names (on the
    box: prefix::255.255.255.x, bound to the TUN). Connections from ::1 count as from the client 0.0.0.1,
    as if ::/96 were the prefix the tracker spliced them from."""

    def __init__(self, pki: Pki, peer_port: int, protocol: str, monkeypatch, bridge: Bridge | None = None) -> None:
        bridge = bridge or pki.ingress
        self.port = free_port()
        extra = "allow = [\"198.51.100.0/24\"]\nports = [%d]\n" % self.port if protocol == "connect" else ""
        text = INGRESS_CONFIG.format(listen_port=3128 if protocol == "connect" else 443, protocol=protocol,
                                     extra=extra, peer_port=peer_port, ca=bridge.ca, cert=bridge.cert, key=bridge.key,
                                     port=self.port)
        bound: list[tuple[str, int, str | None]] = []

        def listening_socket(family, address, port, device=None):
            bound.append((address, port, device))
            return original(family, "::1", port)
        original = bridge_module._listening_socket
        monkeypatch.setattr(bridge_module, "_listening_socket", listening_socket)
        self.lines: list[str] = []
        self.service = BridgeService(parse_config(text), self.lines.append, "kracauer0")
        # The relay's real address for the protocol, on the TUN device (only the tracker's splices reach it).
        assert bound == [(str(bridge_module.relay_addresses(ipaddress.IPv6Network("64:ff9b:1::/96"))[protocol]),
                          self.port, "kracauer0")]
        self.service.relay.prefixes = [ipaddress.IPv6Network("::/96")]

    async def client(self) -> Stream:
        reader, writer = await asyncio.open_connection("::1", self.port, limit=CHUNK)
        return Stream(reader, writer)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


async def both(pki, monkeypatch, protocol: str, *, peer_ports=None, bridge=None):
    peer = PeerBox(pki, ports=peer_ports or ())
    ingress = IngressBox(pki, peer.port, protocol, monkeypatch, bridge)
    if peer_ports is None:
        peer.peer.listener = dataclasses.replace(peer.peer.listener, ports=(ingress.port,))
    await peer.start()
    await ingress.service.start()
    return peer, ingress


def test_a_tls_client_goes_through_relay_and_peer_to_the_host_untouched(pki, monkeypatch):
    from tests.test_tracker import CHROME

    async def main():
        peer, ingress = await both(pki, monkeypatch, "tls")
        client = await ingress.client()
        client.write(CHROME)  # the client's own ClientHello: the relay reads its name, passes it on unchanged
        assert await client.reader.readexactly(13) == b"service hello"
        await client.write_eof()
        assert await client.read() == b""
        await until(lambda: ingress.lines and peer.lines)
        assert bytes(peer.host_received) == CHROME
        # The peer connected from its prefix + the client (0.0.0.1 here), told by Forwarded.
        assert peer.host_connects == [("2001:db8:64::1", "2001:db8::20", ingress.port)]
        [record] = ingress.records()
        assert {k: record[k] for k in ("side", "client", "listener_protocol", "bridge", "peer", "outer_name", "name",
                                        "port", "route", "bytes_to_host", "bytes_to_client", "outcome")} == {
            "side": "ingress", "client": "0.0.0.1", "listener_protocol": "tls", "bridge": "provider",
            "peer": f"127.0.0.1:{peer.port}", "outer_name": SERVER_NAME, "name": "www.example.com",
            "port": ingress.port, "route": "www.example.com", "bytes_to_host": len(CHROME), "bytes_to_client": 13,
            "outcome": "closed"}
        [record] = peer.records()
        assert (record["client"], record["outer_name"], record["name"], record["outcome"]) == (
            "0.0.0.1", SERVER_NAME, "www.example.com", "closed")
        assert ingress.service.tunnels.active == {"ingress": 0, "peer": 0}
        client.reset()
        await ingress.service.stop(), await peer.stop()
    run(main())


def test_for_a_connect_listener_the_relay_answers_the_connect_after_the_peer(pki, monkeypatch):
    async def main():
        peer, ingress = await both(pki, monkeypatch, "connect")
        client = await ingress.client()
        head = b"CONNECT www.example.com:%d HTTP/1.1\r\nHost: www.example.com\r\n\r\n" % ingress.port
        client.write(head + b"early bytes")  # the tunnel's first bytes may follow the head at once
        expected = connect.CONNECTION_ESTABLISHED + b"service hello"
        assert await client.reader.readexactly(len(expected)) == expected
        await client.write_eof()
        assert await client.read() == b""
        await until(lambda: ingress.lines and peer.lines)
        # The client's head is the relay's: the peer got its own CONNECT, the host only the tunnel.
        assert bytes(peer.host_received) == b"early bytes"
        [record] = ingress.records()
        assert (record["name"], record["listener_protocol"], record["bytes_to_host"], record["outcome"]) == (
            "www.example.com", "connect", len(b"early bytes"), "closed")
        client.reset()
        await ingress.service.stop(), await peer.stop()
    run(main())


def test_a_peer_that_refuses_gets_the_client_a_reset(pki, monkeypatch):
    # Issue 10: a non-200 from the peer makes the ingress reset the client (its TLS never began).
    from tests.test_tracker import CHROME

    async def main():
        peer, ingress = await both(pki, monkeypatch, "tls", peer_ports=(443,))  # not the route's port: 403
        client = await ingress.client()
        client.write(CHROME)
        with pytest.raises(ConnectionResetError):
            await read_all(client)
        await until(lambda: ingress.lines and peer.lines)
        assert [r["outcome"] for r in ingress.records()] == ["peer_refused_403"]
        assert [r["outcome"] for r in peer.records()] == ["refused_port"]
        await ingress.service.stop(), await peer.stop()
    run(main())


def test_a_peer_that_refuses_the_ingress_certificate_is_peer_tls_failed(pki, monkeypatch):
    from tests.test_tracker import CHROME

    async def main():
        peer, ingress = await both(pki, monkeypatch, "tls", bridge=pki.stranger)
        client = await ingress.client()
        client.write(CHROME)
        with pytest.raises(ConnectionResetError):
            await read_all(client)
        await until(lambda: ingress.lines and peer.lines)
        assert [r["outcome"] for r in ingress.records()] == ["peer_tls_failed"]
        assert [r["outcome"] for r in peer.records()] == ["client_tls_failed"]
        await ingress.service.stop(), await peer.stop()
    run(main())


def test_the_relay_refuses_a_connection_from_outside_the_prefixes(pki, monkeypatch):
    async def main():
        peer, ingress = await both(pki, monkeypatch, "tls")
        ingress.service.relay.prefixes = [ipaddress.IPv6Network("64:ff9b:1::/96")]  # ::1 is not a client
        client = await ingress.client()
        with pytest.raises(ConnectionResetError):
            await read_all(client)
        await until(lambda: ingress.lines)
        assert [(r["client"], r["outcome"]) for r in ingress.records()] == [("::1", "refused_source")]
        assert peer.lines == []
        await ingress.service.stop(), await peer.stop()
    run(main())


def test_an_unreachable_peer_is_peer_unreachable(pki, monkeypatch):
    from tests.test_tracker import CHROME

    async def main():
        ingress = IngressBox(pki, free_port(), "tls", monkeypatch)  # nothing listens there
        ingress.service.bridges["provider"] = dataclasses.replace(ingress.service.bridges["provider"],
                                                                 address="::1")
        await ingress.service.start()
        client = await ingress.client()
        client.write(CHROME)
        with pytest.raises(ConnectionResetError):
            await read_all(client)
        await until(lambda: ingress.lines)
        [record] = ingress.records()
        assert record["outcome"] == "peer_unreachable"
        # An IPv6 peer is written in brackets (RFC 3986 §3.2.2), as in the config: "::1:443" would be ambiguous.
        assert record["peer"] == f"[::1]:{ingress.service.bridges['provider'].port}"
        await ingress.service.stop()
    run(main())
