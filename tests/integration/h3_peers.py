"""An HTTP/3 server and client on aioquic, for the quic lab (tests/integration/test_quic_lab.py).

Run as a script inside a lab namespace:

    h3_peers.py server --cert C --key K --name host1 --www DIR --log FILE --port 443 --port 8443
    h3_peers.py client --cafile CA --name www.example.com --connect 192.0.2.10:443 --path / [--path /big.bin]
                       [--rebind-after BYTES --rebind-address 198.51.100.3]

The server answers ``/`` with its name and a newline and any other path with
the file of that name under ``--www`` (read once, into memory), and logs one
JSON line per request: the peer address and port as its QUIC stack saw them
when the request came and when the answer was sent, the authority and path.

The client makes the requests one after the other on one connection and
prints one JSON object: per request the status, the length and sha256 of the
body (and the body itself when short), or the error code of the
CONNECTION_CLOSE that ended the connection. ``--rebind-after`` moves the
client to a new UDP socket (a new source port, and ``--rebind-address`` if
given) once that many body bytes arrived: a NAT rebinding as the server sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import pathlib
import socket
import sys
import time

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent


# ------------------------------------------------------------------ server


class ServerProtocol(QuicConnectionProtocol):
    name = ""
    www: pathlib.Path
    log = None
    files: dict[str, bytes] = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3: H3Connection | None = None

    def _peer(self) -> tuple[str, int]:
        addr = self._quic._network_paths[0].addr
        return addr[0], addr[1]

    def quic_event_received(self, event: QuicEvent) -> None:
        if self.h3 is None:
            self.h3 = H3Connection(self._quic)
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                headers = dict(h3_event.headers)
                path = headers.get(b":path", b"/").decode()
                peer = self._peer()
                if path == "/":
                    body = f"{self.name}\n".encode()
                else:
                    body = self.files.get(path)
                    if body is None:
                        file = self.www / path.lstrip("/")
                        body = self.files[path] = file.read_bytes() if file.is_file() else b""
                self.h3.send_headers(h3_event.stream_id, [(b":status", b"200" if body else b"404"),
                                                          (b"content-length", str(len(body)).encode())])
                self.h3.send_data(h3_event.stream_id, body, end_stream=True)
                self.transmit()
                self.log.write(json.dumps({"peer": peer[0], "port": peer[1], "path": path,
                                           "authority": headers.get(b":authority", b"").decode(),
                                           "sent_peer": self._peer()[0], "time": time.time()}) + "\n")
                self.log.flush()


async def run_server(args: argparse.Namespace) -> None:
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    config.load_cert_chain(args.cert, args.key)
    ServerProtocol.name = args.name
    ServerProtocol.www = pathlib.Path(args.www)
    ServerProtocol.log = open(args.log, "a")
    for port in args.port:
        await serve("::", port, configuration=config, create_protocol=ServerProtocol)
    print("listening", flush=True)
    await asyncio.Future()


# ------------------------------------------------------------------ client


# The CONNECTION_CLOSE that ended the client's connection, also when it came before the
# handshake completed (aioquic's connect() then raises a bare ConnectionError).
TERMINATED: list[ConnectionTerminated] = []


class ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.streams: dict[int, dict] = {}
        self.waiters: dict[int, asyncio.Future] = {}
        self.terminated: ConnectionTerminated | None = None
        self.on_bytes = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
            TERMINATED.append(event)
            for waiter in self.waiters.values():
                if not waiter.done():
                    waiter.set_result(None)
        for h3_event in self.h3.handle_event(event):
            stream = self.streams.get(getattr(h3_event, "stream_id", -1))
            if stream is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                stream["status"] = int(dict(h3_event.headers).get(b":status", b"0"))
            elif isinstance(h3_event, DataReceived):
                stream["sha"].update(h3_event.data)
                stream["length"] += len(h3_event.data)
                if stream["length"] <= 256:
                    stream["head"] += h3_event.data
                if self.on_bytes is not None:
                    self.on_bytes(stream["length"])
            if getattr(h3_event, "stream_ended", False):
                waiter = self.waiters.get(h3_event.stream_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    async def get(self, authority: str, path: str) -> dict:
        stream_id = self._quic.get_next_available_stream_id()
        self.streams[stream_id] = {"status": 0, "length": 0, "sha": hashlib.sha256(), "head": b""}
        self.waiters[stream_id] = asyncio.get_running_loop().create_future()
        self.h3.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"https"),
                                         (b":authority", authority.encode()), (b":path", path.encode())],
                             end_stream=True)
        self.transmit()
        await self.waiters[stream_id]
        stream = self.streams[stream_id]
        return {"path": path, "status": stream["status"], "length": stream["length"],
                "sha256": stream["sha"].hexdigest(), "body": stream["head"].decode("utf-8", "replace")
                if stream["length"] <= 256 else None}


async def run_client(args: argparse.Namespace) -> dict:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=args.name,
                               idle_timeout=args.timeout)
    config.load_verify_locations(args.cafile)
    host, port = args.connect.rsplit(":", 1)
    result: dict = {"requests": []}
    loop = asyncio.get_running_loop()
    try:
        async with connect(host, int(port), configuration=config, create_protocol=ClientProtocol,
                           wait_connected=True) as client:
            result["local"] = list(client._transport.get_extra_info("sockname")[:2])
            if args.rebind_after:
                def rebind(length: int) -> None:
                    if length < args.rebind_after or client.on_bytes is None:
                        return
                    client.on_bytes = None
                    # NAT rebinding: the same connection, datagrams from a new socket.
                    # As aioquic's connect(): a dual-stack socket, the server's address IPv4-mapped.
                    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    local = "::ffff:" + args.rebind_address if args.rebind_address else "::"
                    sock.bind((local, 0, 0, 0))
                    result["rebound"] = list(sock.getsockname()[:2])

                    async def switch() -> None:
                        old = client._transport
                        await loop.create_datagram_endpoint(lambda: client, sock=sock)
                        client.transmit()
                        result["old_transport_kept"] = old is not None

                    loop.create_task(switch())
                client.on_bytes = rebind
            for path in args.path:
                result["requests"].append(await asyncio.wait_for(client.get(args.name, path), args.timeout))
                if client.terminated is not None:
                    break
            if client.terminated is not None:
                result["error_code"] = client.terminated.error_code
    except ConnectionError as exc:
        result["connect_error"] = repr(exc)
    except asyncio.TimeoutError:
        result["timeout"] = True
    if TERMINATED:
        result["error_code"] = TERMINATED[0].error_code
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--www", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--port", type=int, action="append", required=True)
    c = sub.add_parser("client")
    c.add_argument("--cafile", required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--connect", required=True)
    c.add_argument("--path", action="append", required=True)
    c.add_argument("--rebind-after", type=int, default=0)
    c.add_argument("--rebind-address")
    c.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.role == "server":
        asyncio.run(run_server(args))
        return 0
    print(json.dumps(asyncio.run(run_client(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
