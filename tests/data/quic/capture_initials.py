"""Capture real QUIC client Initial datagrams into tests/data/quic/*.json.

Run by hand, never by the test suite (it needs the PyPI package aioquic, from
the test extra, and a Chromium binary: ``apt-get install -y chromium``):

    .venv/bin/python tests/data/quic/capture_initials.py

A UDP socket on 127.0.0.1 (an ephemeral port) records what arrives and never
answers, so each client sends its first flight and then retransmits it on its
probe timer. Each client is told a server name that never reaches DNS (aioquic
gets it as server_name; Chromium maps it with --host-resolver-rules) and an
ALPN list. The first flight -- the datagrams that arrive within FLIGHT seconds
of the first one -- is saved, datagram by datagram, in arrival order, as hex,
with what the client was told and its version. Nothing but loopback is used.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
FLIGHT = 0.2  # seconds: a client sends its first flight back to back, its PTO is later
WAIT = 5.0


def record(start_client: Callable[[int], Callable[[], None]]) -> list[bytes]:
    """Run a client against a silent UDP socket; return its first flight."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(WAIT)
    stop = start_client(sock.getsockname()[1])
    datagrams: list[bytes] = []
    try:
        data, _ = sock.recvfrom(65536)
        first = time.monotonic()
        datagrams.append(data)
        while (left := first + FLIGHT - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                datagrams.append(sock.recvfrom(65536)[0])
            except TimeoutError:
                break
    finally:
        stop()
        sock.close()
    return datagrams


def aioquic_client(server_name: str, alpn: list[str]) -> Callable[[int], Callable[[], None]]:
    def start(port: int) -> Callable[[], None]:
        from aioquic.asyncio import connect
        from aioquic.quic.configuration import QuicConfiguration

        async def run() -> None:
            config = QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name=server_name)
            try:
                async with connect("127.0.0.1", port, configuration=config, wait_connected=True):
                    pass
            except Exception:  # noqa: BLE001 -- the handshake is meant to fail
                pass

        def main() -> None:
            try:
                asyncio.run(asyncio.wait_for(run(), WAIT))
            except TimeoutError:  # nobody answers: expected
                pass

        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        return lambda: thread.join(WAIT + 1)

    return start


def chromium_client(server_name: str) -> Callable[[int], Callable[[], None]]:
    def start(port: int) -> Callable[[], None]:
        profile = tempfile.TemporaryDirectory()
        argv = [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions",
            f"--user-data-dir={profile.name}",
            f"--origin-to-force-quic-on={server_name}:443",
            f"--host-resolver-rules=MAP {server_name}:443 127.0.0.1:{port}, EXCLUDE localhost",
            "--dump-dom", f"https://{server_name}/",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            profile.cleanup()

        return stop

    return start


def version_of(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout.strip().splitlines()[-1]


def main() -> None:
    import aioquic

    captures = [
        ("aioquic.json", f"aioquic {aioquic.__version__}", "www.example.com", ["h3"],
         aioquic_client("www.example.com", ["h3"])),
        ("aioquic_alpn.json", f"aioquic {aioquic.__version__}", "api.example.org", ["h3", "hq-interop"],
         aioquic_client("api.example.org", ["h3", "hq-interop"])),
        ("chromium.json", version_of(["chromium", "--version"]), "www.example.com", ["h3"],
         chromium_client("www.example.com")),
    ]
    only = set(sys.argv[1:])
    for name, client, sni, alpn, start in captures:
        if only and name not in only:
            continue
        datagrams = record(start)
        entry = {"client": client, "sni": sni, "alpn": alpn, "sizes": [len(d) for d in datagrams],
                 "datagrams": [d.hex() for d in datagrams]}
        (HERE / name).write_text(json.dumps(entry, indent=1) + "\n")
        print(f"{name}: {client}, {len(datagrams)} datagram(s) of {entry['sizes']} bytes")


if __name__ == "__main__":
    main()
