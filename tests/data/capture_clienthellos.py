"""Capture real TLS ClientHellos from real clients into tests/data/*.bin.

Run by hand, never by the test suite (it needs curl, openssl and, for the
post-quantum Chrome hello, the PyPI package curl_cffi):

    .venv/bin/pip install curl_cffi
    .venv/bin/python tests/data/capture_clienthellos.py

It listens on 127.0.0.1 only (an ephemeral port), points each client at it with
an SNI name such as www.example.com (curl's --resolve keeps the name from ever
reaching DNS), reads each connection until the end of the TLS record that
completes the ClientHello, saves exactly those bytes and closes the connection,
so the client's handshake fails, which is expected. Then it describes every
capture in clienthellos.json. The description is read with scapy's TLS layer,
not with netstack, so the tests that compare netstack against it compare two
independent parsers.
"""

from __future__ import annotations

import json
import pathlib
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
RECORD_HEADER = struct.Struct("!BHH")
TIMEOUT = 10.0


def read_client_hello(conn: socket.socket) -> bytes:
    """Read whole TLS records until the handshake bytes hold a full ClientHello."""
    stream = bytearray()
    handshake = bytearray()
    pos = 0
    while True:
        while len(stream) < pos + RECORD_HEADER.size:
            stream += recv_some(conn)
        content_type, _, length = RECORD_HEADER.unpack_from(stream, pos)
        if content_type != 22:
            raise RuntimeError(f"record type {content_type} before the ClientHello was complete")
        while len(stream) < pos + RECORD_HEADER.size + length:
            stream += recv_some(conn)
        handshake += stream[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]
        pos += RECORD_HEADER.size + length
        if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
            return bytes(stream[:pos])


def recv_some(conn: socket.socket) -> bytes:
    data = conn.recv(65536)
    if not data:
        raise RuntimeError("client closed before its ClientHello was complete")
    return data


def run_command(argv: list[str]) -> Callable[[int], None]:
    def client(port: int) -> None:
        subprocess.run(
            [arg.format(port=port) for arg in argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=TIMEOUT,
            check=False,
        )

    return client


def python_ssl(server_name: str) -> Callable[[int], None]:
    def client(port: int) -> None:
        context = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            try:
                context.wrap_socket(sock, server_hostname=server_name)
            except (OSError, ssl.SSLError):
                pass  # the capture server hangs up after the hello

    return client


def curl_cffi_get(server_name: str, impersonate: str) -> Callable[[int], None]:
    def client(port: int) -> None:
        from curl_cffi import requests
        from curl_cffi.const import CurlOpt

        session = requests.Session(curl_options={CurlOpt.RESOLVE: [f"{server_name}:{port}:127.0.0.1"]})
        try:
            session.get(f"https://{server_name}:{port}/", impersonate=impersonate, verify=False, timeout=TIMEOUT)
        except requests.RequestsError:
            pass

    return client


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[0]

    import curl_cffi

    return {
        "curl": first_line(["curl", "--version"]).split(" (")[0],
        "openssl": first_line(["openssl", "version"]).split(" (")[0],
        "python": f"Python {sys.version.split()[0]} ssl module, {ssl.OPENSSL_VERSION}",
        "curl_cffi": f"curl_cffi {curl_cffi.__version__}",
    }


def clients(v: dict[str, str]) -> list[tuple[str, str, str | None, Callable[[int], None]]]:
    """(file, client description, SNI the client is told to send, client)."""
    return [
        (
            "curl_tls13_alpn.bin",
            f"{v['curl']}: curl -k https://www.example.com/ (defaults: TLS 1.3, ALPN h2,http/1.1)",
            "www.example.com",
            run_command(["curl", "-sk", "--resolve", "www.example.com:{port}:127.0.0.1", "https://www.example.com:{port}/"]),
        ),
        (
            "openssl_s_client_tls13.bin",
            f"{v['openssl']}: openssl s_client -servername api.example.org",
            "api.example.org",
            run_command(["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-servername", "api.example.org"]),
        ),
        (
            "openssl_s_client_tls12.bin",
            f"{v['openssl']}: openssl s_client -tls1_2 -servername legacy.example.net",
            "legacy.example.net",
            run_command(
                ["openssl", "s_client", "-tls1_2", "-connect", "127.0.0.1:{port}", "-servername", "legacy.example.net"]
            ),
        ),
        (
            "python_ssl.bin",
            f"{v['python']}: ssl.create_default_context().wrap_socket(server_hostname='python.example.com')",
            "python.example.com",
            python_ssl("python.example.com"),
        ),
        (
            "openssl_s_client_noservername.bin",
            f"{v['openssl']}: openssl s_client -noservername (no SNI)",
            None,
            run_command(["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-noservername"]),
        ),
        (
            "chrome_pq_curl_cffi.bin",
            f"{v['curl_cffi']} (BoringSSL): requests.get(impersonate='chrome'): Chrome hello, GREASE, X25519MLKEM768",
            "www.example.com",
            curl_cffi_get("www.example.com", "chrome"),
        ),
        (
            "firefox_pq_curl_cffi.bin",
            f"{v['curl_cffi']}: requests.get(impersonate='firefox'): Firefox hello, X25519MLKEM768, no GREASE",
            "shop.example.com",
            curl_cffi_get("shop.example.com", "firefox"),
        ),
    ]


def capture(server: socket.socket, client: Callable[[int], None]) -> bytes:
    port = server.getsockname()[1]
    thread = threading.Thread(target=client, args=(port,), daemon=True)
    thread.start()
    conn, _ = server.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        hello = read_client_hello(conn)
    thread.join(TIMEOUT)
    return hello


def describe(hello: bytes) -> dict[str, object]:
    """SNI, ALPN, versions, key share groups and GREASE, as scapy reads them."""
    from scapy.layers.tls.record import TLS

    records = TLS(hello)
    chunks = []
    layer = records
    while layer is not None and layer.__class__.__name__ == "TLS":
        chunks.append(layer)
        layer = layer.payload if layer.payload.__class__.__name__ == "TLS" else None
    client_hello = records.msg[0]
    extensions = {ext.type: ext for ext in client_hello.ext or []}
    sni = None
    if 0 in extensions:
        sni = extensions[0].servernames[0].servername.decode()
    alpn = [p.protocol.decode() for p in extensions[16].protocols] if 16 in extensions else []
    if 43 in extensions:
        tls_versions = [f"0x{v:04x}" for v in extensions[43].versions]
    else:
        tls_versions = [f"0x{client_hello.version:04x}"]
    groups = [f"0x{ks.group:04x}" for ks in extensions[51].client_shares] if 51 in extensions else []
    grease = any(t & 0x0F0F == 0x0A0A and t >> 8 == t & 0xFF for t in extensions)
    return {
        "sni": sni,
        "alpn": alpn,
        "tls_versions": tls_versions,
        "key_share_groups": groups,
        "grease": grease,
        "records": len(chunks),
        "hello_size": len(client_hello),
    }


def main() -> None:
    described = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(TIMEOUT)
        for name, client_text, sni, client in clients(versions()):
            hello = capture(server, client)
            (HERE / name).write_bytes(hello)
            entry = {"file": name, "client": client_text, "size": len(hello), **describe(hello)}
            if entry["sni"] != sni:
                raise RuntimeError(f"{name}: scapy read SNI {entry['sni']!r}, the client was told {sni!r}")
            described.append(entry)
            print(f"{name}: {len(hello)} bytes, SNI {sni}, ALPN {entry['alpn']}")
    (HERE / "clienthellos.json").write_text(json.dumps(described, indent=2) + "\n")


if __name__ == "__main__":
    main()
