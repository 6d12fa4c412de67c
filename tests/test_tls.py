"""netstack.tls: the incremental ClientHello peeker.

Real ClientHellos captured from real clients live in tests/data (see
capture_clienthellos.py there); clienthellos.json describes them as scapy read
them. Each is checked h11-style: all at once, one byte at a time, and with
trailing bytes. Synthetic hellos cover the malformed cases.
"""

import json
import math
import pathlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netstack.peek import NEED_DATA, Decision, NotProtocol
from netstack.tls import UNRECOGNIZED_NAME_ALERT, TlsPeeker

DATA = pathlib.Path(__file__).resolve().parent / "data"
CAPTURES = json.loads((DATA / "clienthellos.json").read_text())
BY_FILE = {entry["file"]: entry for entry in CAPTURES}
CURL = (DATA / "curl_tls13_alpn.bin").read_bytes()
CHROME = (DATA / "chrome_pq_curl_cffi.bin").read_bytes()

X25519MLKEM768 = "0x11ec"
ETHERNET_MSS = 1460


# --- helpers -----------------------------------------------------------------


def capture(entry: dict) -> bytes:
    return (DATA / entry["file"]).read_bytes()


def described_decision(entry: dict) -> Decision:
    return Decision(
        name=entry["sni"], alpn=tuple(entry["alpn"]), hello_size=entry["hello_size"], records=entry["records"]
    )


def feed_bytewise(data: bytes, **kwargs) -> list:
    peeker = TlsPeeker(**kwargs)
    return [peeker.feed(data[i : i + 1]) for i in range(len(data))]


def feed_chunked(data: bytes, sizes: list[int], **kwargs):
    peeker = TlsPeeker(**kwargs)
    result = peeker.feed(b"")
    pos = 0
    for i in range(len(data)):
        if pos >= len(data):
            break
        size = sizes[i % len(sizes)]
        result = peeker.feed(data[pos : pos + size])
        pos += size
    return result


def vec(length_size: int, body: bytes) -> bytes:
    return len(body).to_bytes(length_size, "big") + body


def record(payload: bytes, content_type: int = 22, version: int = 0x0301) -> bytes:
    return struct.pack("!BHH", content_type, version, len(payload)) + payload


def as_records(message: bytes, sizes: list[int]) -> bytes:
    """Cut a handshake message into records of the given sizes (cycled)."""
    out, pos, i = [], 0, 0
    while pos < len(message):
        size = sizes[i % len(sizes)]
        out.append(record(message[pos : pos + size]))
        pos, i = pos + size, i + 1
    return b"".join(out)


def handshake_message(stream: bytes) -> bytes:
    """The handshake bytes carried by a stream of records."""
    message, pos = b"", 0
    while pos < len(stream):
        _, _, length = struct.unpack_from("!BHH", stream, pos)
        message += stream[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return message


def extension(extension_type: int, data: bytes) -> bytes:
    return struct.pack("!H", extension_type) + vec(2, data)


def server_name(*names: bytes, name_type: int = 0) -> bytes:
    return extension(0, vec(2, b"".join(bytes([name_type]) + vec(2, name) for name in names)))


def alpn(*protocols: bytes) -> bytes:
    return extension(16, vec(2, b"".join(vec(1, p) for p in protocols)))


def client_hello(
    *extensions: bytes,
    legacy_version: int = 0x0303,
    session_id: bytes = b"\x11" * 32,
    cipher_suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
    compression: bytes = b"\x00",
    with_extensions: bool = True,
    tail: bytes = b"",
) -> bytes:
    """A ClientHello handshake message, header included."""
    body = struct.pack("!H", legacy_version) + b"\x5a" * 32 + vec(1, session_id)
    body += vec(2, cipher_suites) + vec(1, compression)
    if with_extensions:
        body += vec(2, b"".join(extensions))
    body += tail
    return b"\x01" + vec(3, body)


def decide(message: bytes, **kwargs):
    return TlsPeeker(**kwargs).feed(record(message))


# --- the captured hellos -----------------------------------------------------


def test_the_captures_cover_the_clients_the_peeker_must_handle():
    files = set(BY_FILE)
    assert {"curl_tls13_alpn.bin", "openssl_s_client_tls13.bin", "openssl_s_client_tls12.bin"} <= files
    assert {"python_ssl.bin", "openssl_s_client_noservername.bin", "chrome_pq_curl_cffi.bin"} <= files
    assert BY_FILE["curl_tls13_alpn.bin"]["alpn"] == ["h2", "http/1.1"]
    assert "0x0304" in BY_FILE["curl_tls13_alpn.bin"]["tls_versions"]
    assert BY_FILE["openssl_s_client_tls12.bin"]["tls_versions"] == ["0x0303"]
    assert BY_FILE["openssl_s_client_noservername.bin"]["sni"] is None


def test_the_chrome_capture_is_a_post_quantum_grease_hello_spanning_two_segments():
    entry = BY_FILE["chrome_pq_curl_cffi.bin"]
    assert X25519MLKEM768 in entry["key_share_groups"]
    assert entry["grease"] is True
    assert len(CHROME) == entry["size"] > ETHERNET_MSS


@pytest.mark.parametrize("entry", CAPTURES, ids=lambda e: e["file"])
def test_capture_file_is_whole_records_ending_with_the_hello(entry):
    data = capture(entry)
    assert len(data) == entry["size"]
    # Every record header is 5 bytes, the rest is exactly the ClientHello.
    assert len(data) == entry["hello_size"] + 5 * entry["records"]
    assert len(handshake_message(data)) == entry["hello_size"]


@pytest.mark.parametrize("entry", CAPTURES, ids=lambda e: e["file"])
def test_capture_fed_at_once_gives_the_described_decision(entry):
    assert TlsPeeker().feed(capture(entry)) == described_decision(entry)


@pytest.mark.parametrize("entry", CAPTURES, ids=lambda e: e["file"])
def test_capture_fed_byte_by_byte_decides_exactly_at_the_last_byte(entry):
    results = feed_bytewise(capture(entry))
    assert all(result is NEED_DATA for result in results[:-1])
    assert results[-1] == described_decision(entry)


@pytest.mark.parametrize("entry", CAPTURES, ids=lambda e: e["file"])
def test_capture_followed_by_more_records_gives_the_same_decision(entry):
    change_cipher_spec = record(b"\x01", content_type=20, version=0x0303)
    early_data = record(b"\x99" * 40, content_type=23, version=0x0303)
    trailing = change_cipher_spec + early_data + b"\x00garbage"
    data = capture(entry)
    assert TlsPeeker().feed(data + trailing) == described_decision(entry)
    peeker = TlsPeeker()
    first = peeker.feed(data)
    assert peeker.feed(trailing) is first


@pytest.mark.parametrize("entry", CAPTURES, ids=lambda e: e["file"])
@pytest.mark.parametrize("record_size", [1, 100, 1000])
def test_capture_refragmented_into_small_records_gives_the_same_name(entry, record_size):
    message = handshake_message(capture(entry))
    stream = as_records(message, [record_size])
    expected = Decision(
        name=entry["sni"],
        alpn=tuple(entry["alpn"]),
        hello_size=len(message),
        records=math.ceil(len(message) / record_size),
    )
    assert TlsPeeker().feed(stream) == expected
    results = feed_bytewise(stream)
    assert all(result is NEED_DATA for result in results[:-1])
    assert results[-1] == expected


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(CAPTURES),
    st.lists(st.integers(1, 600), min_size=1, max_size=10),
    st.lists(st.integers(1, 700), min_size=1, max_size=10),
)
def test_capture_in_random_records_and_random_tcp_chunks_gives_the_same_decision(entry, record_sizes, chunk_sizes):
    message = handshake_message(capture(entry))
    stream = as_records(message, record_sizes)
    records = len(stream) - len(message)
    assert records % 5 == 0
    expected = Decision(
        name=entry["sni"], alpn=tuple(entry["alpn"]), hello_size=len(message), records=records // 5
    )
    assert feed_chunked(stream, chunk_sizes) == expected


def test_a_hello_ending_mid_record_is_decided_at_its_last_byte_not_the_records():
    message = handshake_message(CURL)
    stream = record(message + b"\x04\x00\x00\x00")  # a second handshake message in the same record
    results = feed_bytewise(stream)
    assert all(result is NEED_DATA for result in results[: 5 + len(message) - 1])
    assert results[5 + len(message) - 1] == TlsPeeker().feed(CURL)


def test_after_a_decision_every_feed_returns_the_same_object():
    peeker = TlsPeeker()
    decision = peeker.feed(CURL)
    assert isinstance(decision, Decision)
    assert peeker.feed(b"\x17\x03\x03") is decision
    assert peeker.feed(b"") is decision


def test_an_empty_feed_needs_data():
    assert TlsPeeker().feed(b"") is NEED_DATA


def test_fed_memoryviews_are_copied_so_the_caller_may_reuse_its_buffer():
    scratch = bytearray(100)
    peeker = TlsPeeker()
    result = NEED_DATA
    for pos in range(0, len(CHROME), 100):
        piece = CHROME[pos : pos + 100]
        scratch[: len(piece)] = piece
        result = peeker.feed(memoryview(scratch)[: len(piece)])
        scratch[:] = b"\xee" * 100
    assert result == described_decision(BY_FILE["chrome_pq_curl_cffi.bin"])


def test_the_post_quantum_hello_needs_both_tcp_segments():
    peeker = TlsPeeker()
    assert peeker.feed(CHROME[:ETHERNET_MSS]) is NEED_DATA
    assert peeker.feed(CHROME[ETHERNET_MSS:]).name == "www.example.com"


# --- synthetic hellos: names, ALPN, GREASE -----------------------------------


def test_a_tls12_hello_without_extensions_has_no_name():
    assert decide(client_hello(with_extensions=False, session_id=b"")) == Decision(
        name=None, alpn=(), hello_size=4 + 2 + 32 + 1 + 2 + 6 + 2, records=1
    )


def test_a_hello_with_an_empty_extension_block_has_no_name():
    assert decide(client_hello()).name is None


def test_the_server_name_is_lowercased_and_loses_one_trailing_dot():
    assert decide(client_hello(server_name(b"WWW.Example.COM."))).name == "www.example.com"
    assert decide(client_hello(server_name(b"example.com.."))).name == "example.com."


def test_grease_extensions_and_grease_alpn_values_are_skipped():
    message = client_hello(
        extension(0x0A0A, b""),
        server_name(b"grease.example"),
        alpn(b"\x3a\x3a", b"h2", b"\xfa\xfa", b"http/1.1"),
        extension(0xFAFA, b"\x00"),
    )
    assert decide(message) == Decision(name="grease.example", alpn=("h2", "http/1.1"), hello_size=len(message), records=1)


def test_alpn_names_keep_their_order_and_decode_every_byte():
    assert decide(client_hello(alpn(b"http/1.1", b"h2", b"\xe9t\xe9"))).alpn == ("http/1.1", "h2", "\xe9t\xe9")


def test_server_name_entries_of_unknown_type_are_skipped():
    name_list = b"\x07" + vec(2, b"opaque") + b"\x00" + vec(2, b"real.example")
    assert decide(client_hello(extension(0, vec(2, name_list)))).name == "real.example"


def test_a_server_name_list_without_host_name_gives_no_name():
    assert decide(client_hello(server_name(b"other", name_type=9))).name is None


@pytest.mark.parametrize("version", [0x0300, 0x0301, 0x0303, 0x03FF])
def test_any_record_version_with_major_byte_3_is_accepted(version):
    stream = struct.pack("!BHH", 22, version, len(handshake_message(CURL))) + handshake_message(CURL)
    assert TlsPeeker().feed(stream).name == "www.example.com"


def test_the_largest_allowed_record_length_is_accepted():
    header = struct.pack("!BHH", 22, 0x0301, 2**14 + 256)
    assert TlsPeeker(max_bytes=20000).feed(header + b"\x01\x00\x01\x00") is NEED_DATA


def test_a_hello_exactly_max_bytes_long_is_decided():
    assert isinstance(TlsPeeker(max_bytes=len(CHROME)).feed(CHROME), Decision)
    assert TlsPeeker(max_bytes=len(CHROME) - 1).feed(CHROME) == NotProtocol(
        f"hello larger than {len(CHROME) - 1} bytes"
    )


# --- not TLS, decided early --------------------------------------------------

SSH_BANNER = b"SSH-2.0-OpenSSH_9.2\r\n"


@pytest.mark.parametrize(
    ("stream", "decided_at", "reason_part"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1, "not a TLS handshake record"),
        (SSH_BANNER, 1, "not a TLS handshake record"),
        (bytes.fromhex("15 0303 0002 0228"), 1, "not a TLS handshake record"),
        (bytes.fromhex("802e 01 0301 0015 0000 0010") + b"\x00" * 37, 1, "SSLv2"),
        (bytes.fromhex("16 0203 0010") + b"\x01" * 16, 2, "major"),
        (bytes.fromhex("16 0303 0000"), 5, "record length 0"),
        (bytes.fromhex("16 0303 4101") + b"\x01" * 10, 5, "record length 16641"),
        (record(b"\x02\x00\x00\x26" + b"\x03\x03" + b"\x00" * 36), 6, "not client_hello"),
    ],
    ids=["http", "ssh", "alert", "sslv2", "record-major-2", "record-length-0", "record-too-long", "server-hello"],
)
def test_non_tls_bytes_are_refused_at_the_first_byte_that_proves_it(stream, decided_at, reason_part):
    results = feed_bytewise(stream)
    assert all(result is NEED_DATA for result in results[: decided_at - 1])
    refusal = results[decided_at - 1]
    assert isinstance(refusal, NotProtocol)
    assert reason_part in refusal.reason
    assert all(result is refusal for result in results[decided_at:])
    assert TlsPeeker().feed(stream) == refusal


def test_a_non_handshake_record_inside_a_fragmented_hello_is_refused():
    message = handshake_message(CURL)
    stream = record(message[:100]) + record(b"\x01", content_type=20) + record(message[100:])
    result = TlsPeeker().feed(stream)
    assert result == NotProtocol("record of type 20 before the ClientHello was complete")


def test_an_alert_record_between_hello_fragments_is_refused():
    message = handshake_message(CURL)
    stream = record(message[:3]) + record(b"\x02\x28", content_type=21)
    assert isinstance(TlsPeeker().feed(stream), NotProtocol)


def test_random_binary_is_refused_after_one_byte():
    peeker = TlsPeeker()
    assert peeker.feed(b"\x9c") == NotProtocol("SSLv2-compatible hello")


@pytest.mark.parametrize(
    "message",
    [
        client_hello(server_name(b"a.example"), server_name(b"b.example")),
        client_hello(alpn(b"h2"), alpn(b"h2")),
        client_hello(extension(0x0A0A, b""), extension(0x0A0A, b"")),
        client_hello(server_name(b"a.example", b"b.example")),
        client_hello(server_name(b"")),
        client_hello(server_name(b".")),
        client_hello(server_name(b"ex ample.com")),
        client_hello(server_name(b"example.com\x00")),
        client_hello(server_name(b"\x7fexample.com")),
        client_hello(server_name("bücher.example".encode())),
        client_hello(extension(0, vec(2, b""))),
        client_hello(extension(0, b"")),
        client_hello(extension(0, vec(2, b"\x00" + vec(2, b"a.example")) + b"\x00")),
        client_hello(alpn(b"h2", b"")),
        client_hello(extension(16, vec(2, b""))),
        client_hello(extension(16, b"\x00\x05\x02h2")),
        client_hello(session_id=b"\x00" * 33),
        client_hello(cipher_suites=b"\x13\x01\x13"),
        client_hello(cipher_suites=b""),
        client_hello(compression=b""),
        client_hello(legacy_version=0x0200),
        client_hello(server_name(b"a.example"), tail=b"\x00"),
        client_hello(with_extensions=False, tail=b"\x00"),
        client_hello(with_extensions=False, tail=b"\x00\x09\x00\x00"),
        b"\x01\x00\x00\x00",
        b"\x01\x00\x00\x10" + b"\x03\x03" + b"\x00" * 14,
    ],
    ids=[
        "duplicate-sni-extension",
        "duplicate-alpn-extension",
        "duplicate-grease-extension",
        "two-host-names",
        "empty-host-name",
        "host-name-only-a-dot",
        "space-in-host-name",
        "nul-in-host-name",
        "del-in-host-name",
        "utf8-host-name",
        "empty-server-name-list",
        "empty-server-name-extension",
        "bytes-after-server-name-list",
        "empty-alpn-protocol",
        "empty-alpn-list",
        "alpn-list-length-too-long",
        "session-id-33-bytes",
        "odd-cipher-suites-length",
        "no-cipher-suites",
        "no-compression-methods",
        "legacy-version-major-2",
        "bytes-after-extensions",
        "one-stray-byte-instead-of-extensions",
        "extension-block-longer-than-the-hello",
        "empty-hello",
        "hello-cut-inside-random",
    ],
)
def test_a_malformed_client_hello_is_refused(message):
    result = decide(message)
    assert isinstance(result, NotProtocol)
    assert result.reason.startswith("malformed ClientHello")


def test_a_handshake_length_shorter_than_the_real_hello_is_refused():
    message = handshake_message(CURL)
    short = message[:1] + (len(message) - 4 - 10).to_bytes(3, "big") + message[4:]
    assert isinstance(TlsPeeker().feed(record(short)), NotProtocol)


def test_a_corrupt_extension_length_in_a_real_hello_is_refused():
    message = bytearray(handshake_message(CURL))
    # The extensions block length sits right after the compression methods.
    session_id_end = 4 + 2 + 32 + 1 + message[4 + 2 + 32]
    suites_end = session_id_end + 2 + int.from_bytes(message[session_id_end : session_id_end + 2], "big")
    extensions_at = suites_end + 1 + message[suites_end]
    message[extensions_at : extensions_at + 2] = (0xFFFF).to_bytes(2, "big")
    result = TlsPeeker().feed(record(bytes(message)))
    assert isinstance(result, NotProtocol)
    assert "malformed" in result.reason


def test_a_declared_hello_larger_than_the_cap_is_refused_at_its_header():
    stream = record(b"\x01" + (20000).to_bytes(3, "big") + b"\x03\x03")
    results = feed_bytewise(stream)
    assert all(result is NEED_DATA for result in results[:8])
    assert results[8] == NotProtocol("hello larger than 16384 bytes")


def test_a_hello_spread_over_more_than_max_bytes_is_refused_at_the_first_byte_past_the_cap():
    stream = as_records(handshake_message(CURL), [1])  # 512 records, 6 bytes each
    results = feed_bytewise(stream, max_bytes=2000)
    assert all(result is NEED_DATA for result in results[:2000])
    assert results[2000] == NotProtocol("hello larger than 2000 bytes")
    assert TlsPeeker(max_bytes=2000).feed(stream) == results[2000]


def test_the_default_cap_fits_the_post_quantum_hello_in_one_byte_records():
    stream = as_records(handshake_message(CHROME), [1])
    assert len(stream) > 10000
    assert TlsPeeker().feed(stream).name == "www.example.com"


def test_unrecognized_name_alert_is_a_fatal_alert_record():
    # RFC 8446 §6: content type 21, version 0x0303, length 2, fatal (2), unrecognized_name (112).
    assert UNRECOGNIZED_NAME_ALERT == bytes([21, 3, 3, 0, 2, 2, 112])


# --- properties --------------------------------------------------------------

chunk_sizes = st.lists(st.integers(1, 40), min_size=1, max_size=12)


@settings(max_examples=300)
@given(st.binary(max_size=300), chunk_sizes)
def test_arbitrary_bytes_in_arbitrary_chunks_give_the_same_result_as_at_once(data, sizes):
    assert feed_chunked(data, sizes) == TlsPeeker().feed(data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(CAPTURES),
    st.integers(0, 2000),
    st.integers(0, 255),
    chunk_sizes,
    st.sampled_from([16384, 400, 100]),
)
def test_corrupted_captures_in_arbitrary_chunks_give_the_same_result_as_at_once(entry, at, value, sizes, cap):
    data = bytearray(capture(entry))
    data[at % len(data)] = value
    data = bytes(data)
    assert feed_chunked(data, sizes, max_bytes=cap) == TlsPeeker(max_bytes=cap).feed(data)


@settings(max_examples=200)
@given(st.sampled_from(CAPTURES), st.integers(0, 2000), chunk_sizes)
def test_every_strict_prefix_of_a_capture_needs_data(entry, cut, sizes):
    data = capture(entry)
    assert feed_chunked(data[: cut % len(data)], sizes) is NEED_DATA


# --- without the record layer (QUIC's CRYPTO stream, RFC 9001 §4) -----------


@pytest.mark.parametrize("entry", CAPTURES, ids=lambda e: e["file"])
def test_a_hello_without_records_decides_as_with_them_at_its_last_byte(entry):
    message = handshake_message(capture(entry))
    peeker = TlsPeeker(record_layer=False)
    results = [peeker.feed(message[i : i + 1]) for i in range(len(message))]
    assert all(result is NEED_DATA for result in results[:-1])
    with_records = described_decision(entry)
    assert results[-1] == Decision(name=with_records.name, alpn=with_records.alpn,
                                   hello_size=with_records.hello_size, records=0)


def test_without_records_a_record_header_is_not_a_client_hello():
    result = TlsPeeker(record_layer=False).feed(CURL)
    assert isinstance(result, NotProtocol) and "handshake message type 22" in result.reason


def test_without_records_the_cap_still_holds():
    message = handshake_message(CHROME)
    result = TlsPeeker(max_bytes=len(message) - 1, record_layer=False).feed(message)
    assert isinstance(result, NotProtocol) and "larger than" in result.reason
    assert TlsPeeker(max_bytes=len(message), record_layer=False).feed(message).name == "www.example.com"


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CAPTURES), st.integers(0, 2000), st.integers(0, 255), chunk_sizes)
def test_without_records_corrupted_hellos_in_chunks_answer_as_at_once(entry, at, value, sizes):
    data = bytearray(handshake_message(capture(entry)))
    data[at % len(data)] = value
    data = bytes(data)
    assert feed_chunked(data, sizes, record_layer=False) == TlsPeeker(record_layer=False).feed(data)
