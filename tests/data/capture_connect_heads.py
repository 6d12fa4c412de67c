"""Capture the CONNECT request heads curl sends to an explicit proxy (tests/data/curl_connect_*.bin).

A listening socket on 127.0.0.1 stands in for the proxy; each curl run sends
its head and gets no answer. Run from the repository root:

    python3 tests/data/capture_connect_heads.py
"""

import pathlib
import socket
import subprocess

DATA = pathlib.Path(__file__).resolve().parent

RUNS = {
    "curl_connect.bin": ["-p", "-x", "http://127.0.0.1:PORT", "https://www.example.com/"],
    "curl_connect_auth.bin": ["-p", "-x", "http://127.0.0.1:PORT", "-U", "alice:secret",
                              "https://www.example.com:8443/"],
    "curl_connect_http10_ipv6.bin": ["-p", "--proxy1.0", "127.0.0.1:PORT", "https://[2001:db8::10]/"],
}


def capture(args: list[str]) -> bytes:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = str(server.getsockname()[1])
        curl = subprocess.Popen(["curl", "-sS", "--max-time", "3", *[a.replace("PORT", port) for a in args]],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        conn, _ = server.accept()
        conn.settimeout(2)
        data = b""
        with conn:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        curl.kill()
        curl.wait()
        return data


if __name__ == "__main__":
    for name, args in RUNS.items():
        head = capture(args)
        (DATA / name).write_bytes(head)
        print(name, head)
