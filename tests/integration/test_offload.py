"""Large transfers through kracauer, with TUN offloads on (super-packets) and off.

With ``[tun] offload = true`` (the default) the kernel hands kracauer TCP
super-packets of up to 64 KiB with partial checksums; with ``false`` one packet
per read with full checksums. Both must carry every byte intact, both ways.
"""

from __future__ import annotations

import hashlib
import os
import textwrap

import pytest

from tests import netlab
from tests.netlab import HOSTS, SERVICE_ADDRESS, Lab, example_config

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

GIB = 1 << 30
SINK_PORT = 9000

# A host-side sink: reads everything the client sends, answers with its sha256.
SINK = textwrap.dedent("""
    import hashlib, socket, sys
    server = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6)
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        conn, _ = server.accept()
        digest = hashlib.sha256()
        while data := conn.recv(1 << 20):
            digest.update(data)
        conn.sendall(digest.hexdigest().encode())
        conn.close()
""")

# A client that sends a file through kracauer and prints the sha256 the host saw.
UPLOAD = textwrap.dedent("""
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as s:
        with open(sys.argv[3], "rb") as f:
            s.sendfile(f)
        s.shutdown(socket.SHUT_WR)
        print(s.recv(200).decode())
""")


def config(offload: bool) -> str:
    text = example_config().replace("mtu = 1500", f"mtu = 1500\noffload = {'true' if offload else 'false'}")
    text += textwrap.dedent(f"""
        [[listen]]
        address = "{SERVICE_ADDRESS}"
        port = {SINK_PORT}
        protocol = "tcp"
        host = "{HOSTS['host1']}"
    """)
    return text


def write_random_file(path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 << 20))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        yield lab


def download_sha256(lab: Lab, url: str, max_time: float) -> str:
    cmd = (f"curl -sS --fail --max-time {max_time:g} --cacert {lab.ca_cert} "
           f"--resolve www.example.com:443:{SERVICE_ADDRESS} {url} | sha256sum")
    proc = lab.run("client", ["sh", "-c", cmd], timeout=max_time + 10)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[0]


def upload_sha256(lab: Lab, path) -> str:
    script = lab.dir / "upload.py"
    script.write_text(UPLOAD)
    proc = lab.run("client", ["python3", str(script), SERVICE_ADDRESS, str(SINK_PORT), str(path)], timeout=90)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def start_sink(lab: Lab, uploads: int) -> None:
    script = lab.dir / "sink.py"
    script.write_text(SINK)
    sink = lab.popen("host1", ["python3", str(script), str(SINK_PORT), str(uploads)], stdout=-1, text=True)
    assert sink.stdout.readline().strip() == "ready"


def test_one_gib_download_over_tls_with_offloads_arrives_intact(lab):
    expected = write_random_file(lab.host_dir("host1") / "www" / "gib.bin", GIB)
    k = lab.start_kracauer(config(offload=True))
    try:
        got = download_sha256(lab, "https://www.example.com/gib.bin", max_time=120)
        assert got == expected, "the 1 GiB download through kracauer was corrupted"
    finally:
        code, stderr = k.stop()
        (lab.host_dir("host1") / "www" / "gib.bin").unlink()
    assert code == 0, stderr
    assert "internal_error" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_download_and_upload_arrive_intact(lab, offload, tmp_path):
    start_sink(lab, uploads=1)
    upload = lab.dir / f"upload-{offload}.bin"
    sent = write_random_file(upload, 64 << 20)
    k = lab.start_kracauer(config(offload=offload))
    try:
        assert download_sha256(lab, "https://www.example.com/big.bin", max_time=60) == lab.big_sha256
        assert upload_sha256(lab, upload) == sent
    finally:
        code, stderr = k.stop()
        upload.unlink()
    assert code == 0, stderr
    assert "Traceback" not in stderr
