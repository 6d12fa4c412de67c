"""netstack.quic: client Initials read into the TLS peeker, and the CONNECTION_CLOSE refusal.

Three sources of truth, none of them netstack: the test vectors of RFC 9001
Appendix A (v1) and RFC 9369 Appendix A (v2) in tests/data/quic/rfc_vectors.json;
real first flights captured from aioquic and Chromium (tests/data/quic/*.json,
see capture_initials.py there); and aioquic's QUIC stack, run in memory (no
socket), which makes fresh Initials of both versions and reads the refusal.
"""

from __future__ import annotations

import json
import pathlib
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netstack import quic
from netstack.peek import NEED_DATA, Decision, NotProtocol
from netstack.quic import (
    BAD_HEADER, NOT_INITIAL, NOT_QUIC, OTHER_CONNECTION, TOO_SMALL, UNDECRYPTABLE, UNRECOGNIZED_NAME_ERROR,
    UNSUPPORTED_VERSION, VERSION_1, VERSION_2, VERSIONS, ConnectionClose, Dropped, InitialReader, QuicError,
    build_connection_close, build_initial, decode_packet_number, derive_initial_keys, encode_packet_number,
    encode_varint, hkdf_expand_label, hkdf_extract, initial_secrets, long_header_cids, open_initials,
    parse_initial_frames, short_header_dcid,
)
from netstack.tls import TlsPeeker

DATA = pathlib.Path(__file__).resolve().parent / "data" / "quic"
RFC = json.loads((DATA / "rfc_vectors.json").read_text())
RFC_DCID = bytes.fromhex(RFC["dcid"])
RFC_VERSIONS = {"v1": VERSION_1, "v2": VERSION_2}
CAPTURES = {path.stem: json.loads(path.read_text()) for path in sorted(DATA.glob("*.json")) if path.stem != "rfc_vectors"}
DATAGRAMS = {name: [bytes.fromhex(d) for d in entry["datagrams"]] for name, entry in CAPTURES.items()}
CHROMIUM = DATAGRAMS["chromium"]
AIOQUIC = DATAGRAMS["aioquic"]
ALL_INITIALS = [d for datagrams in DATAGRAMS.values() for d in datagrams] + [
    bytes.fromhex(RFC[v]["client_packet"]) for v in RFC_VERSIONS]
SERVER_SCID = bytes.fromhex("5b1e0c3a9d2f4e61")

RESULT_TYPES = (Decision, NotProtocol, Dropped)


def rfc(version: str, field: str) -> bytes:
    return bytes.fromhex(RFC[version][field])


def rfc_keys(version: str) -> quic.InitialKeys:
    return derive_initial_keys(RFC_DCID, RFC_VERSIONS[version])


def feed_all(datagrams, **kwargs):
    reader = InitialReader(**kwargs)
    return reader, [reader.feed(d) for d in datagrams]


def decided(entry: dict) -> tuple[str, tuple[str, ...]]:
    return entry["sni"], tuple(entry["alpn"])


def client_initial(payload: bytes, *, version: int = VERSION_1, dcid: bytes = RFC_DCID, scid: bytes = b"\x07" * 4,
                   packet_number: int = 0, size: int = 1200) -> bytes:
    """A client Initial of our own making, padded (PADDING frames) to a datagram of `size` bytes."""
    keys = derive_initial_keys(dcid, version)
    padding = 0
    while True:
        packet = build_initial(keys, dcid, scid, payload + bytes(padding), packet_number=packet_number, server=False)
        if len(packet) >= size:
            return packet
        padding += size - len(packet)


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + encode_varint(offset) + encode_varint(len(data)) + data


def crypto_frames(datagrams: list[bytes]) -> list[quic.CryptoFrame]:
    """Every CRYPTO frame of a capture's datagrams, in the order sent."""
    keys = derive_initial_keys(_first_dcid(datagrams[0]), quic.parse_long_header(datagrams[0]).version)
    return [frame for datagram in datagrams for packet in open_initials(datagram, keys.client)
            for frame in packet.frames.crypto]


def hello_stream(entry_name: str = "aioquic") -> bytes:
    """The CRYPTO stream (the ClientHello) of a capture."""
    stream = bytearray()
    for frame in sorted(crypto_frames(DATAGRAMS[entry_name]), key=lambda f: f.offset):
        stream[frame.offset : frame.offset + len(frame.data)] = frame.data
    return bytes(stream)


def _first_dcid(datagram: bytes) -> bytes:
    return quic.parse_long_header(datagram).dcid


# ============================================================ RFC 9001 / RFC 9369 vectors


def test_the_v1_initial_secret_is_rfc_9001_a1s():
    assert hkdf_extract(VERSIONS[VERSION_1].salt, RFC_DCID).hex() == (
        "7db5df06e7a69e432496adedb00851923595221596ae2ae9fb8115c1e9ed0a44")


@pytest.mark.parametrize("version", RFC_VERSIONS)
def test_initial_secrets_and_keys_match_the_rfc_a1_vectors(version):
    client_secret, server_secret = initial_secrets(RFC_DCID, VERSIONS[RFC_VERSIONS[version]])
    assert client_secret == rfc(version, "client_initial_secret")
    assert server_secret == rfc(version, "server_initial_secret")
    keys = rfc_keys(version)
    for side, packet_keys in (("client", keys.client), ("server", keys.server)):
        assert packet_keys.key == rfc(version, f"{side}_key")
        assert packet_keys.iv == rfc(version, f"{side}_iv")
        assert packet_keys.hp == rfc(version, f"{side}_hp")


def test_hkdf_expand_label_builds_the_rfc_8446_label():
    # RFC 8446 §7.1 by hand: HMAC(secret, uint16 length || "tls13 " label || context || 0x01).
    import hashlib
    import hmac
    secret = bytes(range(32))
    info = (16).to_bytes(2, "big") + bytes([6 + 8]) + b"tls13 quic key" + b"\x00" + b"\x01"
    assert hkdf_expand_label(secret, b"quic key", b"", 16) == hmac.digest(secret, info, hashlib.sha256)[:16]


@pytest.mark.parametrize("version", RFC_VERSIONS)
def test_the_rfc_a2_client_initial_decrypts_to_its_frames(version):
    packets = open_initials(rfc(version, "client_packet"), rfc_keys(version).client)
    assert len(packets) == 1
    packet = packets[0]
    assert packet.packet_number == 2
    assert packet.header.version == RFC_VERSIONS[version]
    assert packet.header.dcid == RFC_DCID and packet.header.scid == b"" and packet.header.token == b""
    # The payload is one CRYPTO frame (the ClientHello) and PADDING.
    hello = rfc(version, "client_plain_payload")
    assert packet.frames.crypto == (quic.CryptoFrame(0, hello[4:]),)  # 06 00 40f1: offset 0, length 241
    assert packet.frames.close is None and packet.frames.ack_eliciting


@pytest.mark.parametrize("version", RFC_VERSIONS)
def test_the_rfc_a2_client_initial_gives_its_server_name_and_alpn(version):
    reader = InitialReader()
    result = reader.feed(rfc(version, "client_packet"))
    assert result == Decision(name="example.com", alpn=("alpn",), hello_size=241, records=0)
    assert (reader.version, reader.dcid, reader.scid, reader.largest_pn) == (RFC_VERSIONS[version], RFC_DCID, b"", 2)
    assert reader.datagrams == 1 and reader.bytes_held == 1200


@pytest.mark.parametrize("version", RFC_VERSIONS)
def test_the_rfc_a3_server_initial_decrypts_to_an_ack_and_the_server_hello(version):
    packet, = open_initials(rfc(version, "server_packet"), rfc_keys(version).server)
    assert packet.packet_number == 1
    assert packet.header.dcid == b"" and packet.header.scid == bytes.fromhex("f067a5502a4262b5")
    payload = rfc(version, "server_plain_payload")
    assert payload[:1] == b"\x02"  # ACK of packet 0, then CRYPTO: the ServerHello
    assert packet.frames.crypto == (quic.CryptoFrame(0, payload[9:]),)  # 02 00 00 00 00, then 06 00 405a
    assert packet.frames.crypto[0].data[:1] == b"\x02"  # server_hello


@pytest.mark.parametrize("version", RFC_VERSIONS)
def test_the_builder_reproduces_both_rfc_packets_byte_for_byte(version):
    keys = rfc_keys(version)
    client_payload = rfc(version, "client_plain_payload") + bytes(RFC[version]["client_padding"])
    assert build_initial(keys, RFC_DCID, b"", client_payload, packet_number=2, server=False,
                         pn_length=4) == rfc(version, "client_packet")
    assert build_initial(keys, b"", bytes.fromhex("f067a5502a4262b5"), rfc(version, "server_plain_payload"),
                         packet_number=1, pn_length=2) == rfc(version, "server_packet")


def test_the_client_packet_does_not_open_with_the_server_keys_nor_with_the_other_version():
    with pytest.raises(QuicError, match="AEAD"):
        open_initials(rfc("v1", "client_packet"), rfc_keys("v1").server)
    with pytest.raises(QuicError):
        open_initials(rfc("v1", "client_packet"), rfc_keys("v2").client)


# ============================================================ packet numbers and varints


@pytest.mark.parametrize("truncated, length, largest, expected", [
    (0x9B32, 2, 0xA82F30EA, 0xA82F9B32),  # RFC 9000 Appendix A.3's example
    (2, 4, -1, 2),
    (0, 1, 254, 256),
    (0xFF, 1, 256, 255),
])
def test_packet_numbers_decode_as_rfc_9000_appendix_a3(truncated, length, largest, expected):
    assert decode_packet_number(truncated, length, largest) == expected


@given(st.integers(0, 2**32), st.integers(1, 4))
def test_an_encoded_packet_number_decodes_back_whatever_its_length(largest, extra):
    packet_number = largest + extra
    encoded = encode_packet_number(packet_number, largest)
    assert decode_packet_number(int.from_bytes(encoded, "big"), len(encoded), largest) == packet_number


@given(st.integers(0, quic.MAX_VARINT))
def test_varints_round_trip_in_their_shortest_form(value):
    from netstack.buffer import Buffer
    encoded = encode_varint(value)
    assert len(encoded) == next(n for n in (1, 2, 4, 8) if value < 1 << (8 * n - 2))
    assert quic.pull_varint(Buffer(encoded)) == value


# ============================================================ the captures


def test_the_captures_are_of_two_implementations_and_chromiums_hello_is_post_quantum():
    assert CAPTURES["aioquic"]["client"].startswith("aioquic")
    assert CAPTURES["chromium"]["client"].startswith("Chromium")
    # Chromium's X25519MLKEM768 key share (0x11ec, 1216 bytes) makes a hello of
    # about 1.9 KB: two Initial datagrams.
    assert len(CHROMIUM) == 2
    stream = hello_stream("chromium")
    assert len(stream) > 1800 and bytes.fromhex("11ec04c0") in stream
    # Chromium cuts its hello in many small CRYPTO frames, out of order.
    offsets = [frame.offset for frame in crypto_frames(CHROMIUM)]
    assert len(offsets) > 4 and offsets != sorted(offsets)


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_each_capture_read_whole_in_order_gives_the_name_and_alpn_the_client_was_told(name):
    reader, results = feed_all(DATAGRAMS[name])
    entry = CAPTURES[name]
    decision = next(r for r in results if isinstance(r, Decision))
    assert (decision.name, decision.alpn) == decided(entry)
    assert reader.version == VERSION_1
    assert reader.dcid == _first_dcid(DATAGRAMS[name][0]) and len(reader.dcid) >= 8
    assert reader.scid == quic.parse_long_header(DATAGRAMS[name][0]).scid


def test_the_chromium_hello_needs_both_datagrams_in_either_order():
    assert InitialReader().feed(CHROMIUM[0]) is NEED_DATA
    assert InitialReader().feed(CHROMIUM[1]) is NEED_DATA
    for order in (CHROMIUM, CHROMIUM[::-1]):
        reader, results = feed_all(order)
        assert results[0] is NEED_DATA
        assert (results[1].name, results[1].alpn) == ("www.example.com", ("h3",))
        assert reader.datagrams == 2 and reader.bytes_held == 2500


def test_aioquic_pads_its_datagram_with_zeros_after_the_initial_packet():
    packet = quic.parse_long_header(AIOQUIC[0])
    assert packet.end < len(AIOQUIC[0]) == 1200
    assert not any(AIOQUIC[0][packet.end:])


def test_the_aioquic_alpn_capture_holds_a_retransmission_of_the_same_hello():
    first, second = DATAGRAMS["aioquic_alpn"]
    one, two = (open_initials(d, derive_initial_keys(_first_dcid(first), VERSION_1).client)[0] for d in (first, second))
    assert (one.packet_number, two.packet_number) == (0, 1)
    assert one.frames.crypto == two.frames.crypto
    assert InitialReader().feed(second).name == "api.example.org"


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(CAPTURES)), st.data())
def test_captures_reordered_and_duplicated_give_the_same_decision(name, data):
    datagrams = DATAGRAMS[name]
    extra = data.draw(st.lists(st.sampled_from(datagrams), max_size=4))
    order = data.draw(st.permutations(datagrams + extra))
    reader, results = feed_all(order)
    decisions = [r for r in results if isinstance(r, Decision)]
    assert decisions and all(r is NEED_DATA for r in results[: results.index(decisions[0])])
    assert (decisions[0].name, decisions[0].alpn) == decided(CAPTURES[name])
    assert all(r == decisions[0] for r in results[results.index(decisions[0]):])  # an answer sticks


# ============================================================ aioquic's client, in memory


def aioquic_first_flight(version: int, server_name: str, alpn: list[str]) -> list[bytes]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    config = QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name=server_name,
                               original_version=version, supported_versions=[version])
    client = QuicConnection(configuration=config)
    client.connect(("192.0.2.10", 443), now=0.0)
    return client, [datagram for datagram, _ in client.datagrams_to_send(now=0.0)]


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2], ids=["v1", "v2"])
def test_fresh_aioquic_initials_of_both_versions_are_read(version):
    _, datagrams = aioquic_first_flight(version, "shop.example.net", ["h3", "h3-29"])
    reader, results = feed_all(datagrams)
    assert (results[-1].name, results[-1].alpn) == ("shop.example.net", ("h3", "h3-29"))
    assert reader.version == version


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2], ids=["v1", "v2"])
def test_aioquic_takes_the_refusal_as_a_connection_close_with_unrecognized_name(version):
    from aioquic.quic.events import ConnectionTerminated
    client, datagrams = aioquic_first_flight(version, "nowhere.example.net", ["h3"])
    reader = InitialReader()
    assert isinstance(reader.feed(datagrams[0]), Decision)
    refusal = reader.refusal(SERVER_SCID)
    client.receive_datagram(refusal, ("192.0.2.10", 443), now=0.05)
    # aioquic drains (RFC 9000 §10.2.2), then reports the close when its timer runs out.
    client.handle_timer(now=client.get_timer())
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    assert ConnectionTerminated(error_code=0x0170, frame_type=0x06, reason_phrase="") in events


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2], ids=["v1", "v2"])
def test_the_refusal_parses_with_aioquics_packet_code_as_a_server_initial(version):
    from aioquic.buffer import Buffer as AioBuffer
    from aioquic.quic.crypto import CryptoPair
    from aioquic.quic.packet import pull_quic_header
    _, datagrams = aioquic_first_flight(version, "nowhere.example.net", ["h3"])
    reader = InitialReader()
    reader.feed(datagrams[0])
    refusal = reader.refusal(SERVER_SCID)
    buf = AioBuffer(data=refusal)
    header = pull_quic_header(buf, host_cid_length=8)
    assert header.version == version
    assert header.destination_cid == reader.scid and header.source_cid == SERVER_SCID and header.token == b""
    pair = CryptoPair()
    pair.setup_initial(cid=reader.dcid, is_client=True, version=version)
    plain_header, payload, packet_number = pair.decrypt_packet(refusal, buf.tell(), 0)
    assert packet_number == 0
    frames = AioBuffer(data=payload)
    assert frames.pull_uint_var() == 0x1C
    assert (frames.pull_uint_var(), frames.pull_uint_var(), frames.pull_uint_var()) == (0x0170, 0x06, 0)
    assert all(b == 0 for b in payload[frames.tell():])  # only PADDING after it


# ============================================================ the refusal, read by our own server side


@pytest.mark.parametrize("version", RFC_VERSIONS)
def test_the_refusal_is_a_server_initial_with_connection_close_0x170(version):
    reader = InitialReader()
    reader.feed(rfc(version, "client_packet"))
    refusal = reader.refusal(SERVER_SCID)
    packet, = open_initials(refusal, rfc_keys(version).server)
    header = packet.header
    assert header.version == RFC_VERSIONS[version] and header.is_initial
    assert header.packet_type == VERSIONS[RFC_VERSIONS[version]].initial_type
    assert (header.dcid, header.scid, header.token) == (b"", SERVER_SCID, b"")
    assert packet.frames.close == ConnectionClose(UNRECOGNIZED_NAME_ERROR, 0x06, b"")
    assert UNRECOGNIZED_NAME_ERROR == 0x0170
    assert not packet.frames.ack_eliciting and packet.frames.crypto == ()
    # The client's keys do not open it: it is the server's direction.
    with pytest.raises(QuicError):
        open_initials(refusal, rfc_keys(version).client)


def test_the_refusal_can_be_padded_and_carries_a_given_packet_number():
    keys = rfc_keys("v1")
    refusal = build_connection_close(keys, b"\x01\x02", SERVER_SCID, packet_number=300, pad_to=1200, reason=b"no")
    assert len(refusal) == 1200
    packet, = open_initials(refusal, keys.server)
    assert packet.packet_number == 300 and packet.frames.close == ConnectionClose(0x0170, 6, b"no")


def test_a_refusal_needs_a_read_initial_and_connection_ids_of_at_most_20_bytes():
    with pytest.raises(ValueError):
        InitialReader().refusal(SERVER_SCID)
    with pytest.raises(ValueError):
        build_connection_close(rfc_keys("v1"), b"", bytes(21))


# ============================================================ helpers for the host's packets


def test_long_header_cids_reads_the_hosts_chosen_connection_id():
    assert long_header_cids(rfc("v1", "server_packet")) == (VERSION_1, b"", bytes.fromhex("f067a5502a4262b5"))
    assert long_header_cids(rfc("v2", "server_packet"))[0] == VERSION_2
    assert long_header_cids(b"\x40" + bytes(30)) is None
    assert long_header_cids(b"\xc0\x00\x00\x00\x01\x15" + bytes(40)) is None  # a 21-byte DCID


def test_long_header_cids_reads_handshake_packets_and_unknown_versions_too():
    handshake = bytes([0xE0]) + VERSION_1.to_bytes(4, "big") + b"\x02ab\x03cde" + bytes(30)
    assert long_header_cids(handshake) == (VERSION_1, b"ab", b"cde")
    unknown = bytes([0xC0]) + (0x1A2A3A4A).to_bytes(4, "big") + b"\x00\x01z"
    assert long_header_cids(unknown) == (0x1A2A3A4A, b"", b"z")


def test_short_header_dcid_takes_the_known_length():
    packet = bytes([0x41]) + bytes.fromhex("b01fd24a586a9cf3") + b"payload"
    assert short_header_dcid(packet, 8) == bytes.fromhex("b01fd24a586a9cf3")
    assert short_header_dcid(packet[:5], 8) is None
    assert short_header_dcid(rfc("v1", "server_packet"), 8) is None  # a long header
    assert short_header_dcid(b"", 0) is None


# ============================================================ datagrams dropped, flow unchanged


def _dropped(datagram: bytes, reader: InitialReader | None = None) -> str:
    result = (reader or InitialReader()).feed(datagram)
    assert isinstance(result, Dropped), result
    return result.reason


def test_what_is_no_client_initial_is_dropped_with_its_reason():
    initial = AIOQUIC[0]
    assert _dropped(b"") == NOT_QUIC
    assert _dropped(b"\x01" + bytes(1300)) == NOT_QUIC  # no fixed bit: not even a short header
    assert _dropped(b"\x41" + bytes(1300)) == NOT_INITIAL  # a short header
    assert _dropped(b"\x80\x00\x00\x00\x00\x08" + bytes(1300)) == NOT_INITIAL  # Version Negotiation
    assert _dropped(b"\xc0\xfa\xce\xb0\x0c\x08" + bytes(1300)) == UNSUPPORTED_VERSION
    assert _dropped(bytes([initial[0] | 0x20]) + initial[1:]) == NOT_INITIAL  # v1 Handshake type
    assert _dropped(initial[:40]) == BAD_HEADER  # the Length runs past the datagram
    assert _dropped(initial[:5] + b"\x15" + initial[6:]) == BAD_HEADER  # a 21-byte DCID
    corrupt = bytearray(initial)
    corrupt[300] ^= 1
    assert _dropped(bytes(corrupt)) == UNDECRYPTABLE


def test_v2_packet_type_bits_are_not_v1s():
    # RFC 9369 §3.2: in v2, type 0b00 is Retry, not Initial.
    initial = rfc("v2", "client_packet")
    assert _dropped(bytes([initial[0] & ~0x30 & 0xFF]) + initial[1:]) == NOT_INITIAL


def test_an_initial_in_a_datagram_under_1200_bytes_is_dropped():
    hello = hello_stream()
    small = client_initial(crypto_frame(0, hello), size=1199)
    assert len(small) == 1199
    assert _dropped(small) == TOO_SMALL
    assert isinstance(InitialReader().feed(client_initial(crypto_frame(0, hello), size=1200)), Decision)


def test_a_client_dcid_under_8_bytes_is_dropped():
    assert _dropped(client_initial(crypto_frame(0, hello_stream()), dcid=b"1234567")) == BAD_HEADER


def test_after_a_dropped_datagram_the_flow_reads_on():
    reader = InitialReader()
    assert _dropped(b"\x00junk", reader) == NOT_QUIC
    corrupt = bytearray(CHROMIUM[0])
    corrupt[-1] ^= 0xFF
    assert _dropped(bytes(corrupt), reader) == UNDECRYPTABLE
    assert reader.dcid is None and reader.datagrams == 0  # a forgery does not pin the flow
    assert reader.feed(CHROMIUM[0]) is NEED_DATA
    assert reader.feed(CHROMIUM[1]).name == "www.example.com"


def test_once_a_dcid_is_read_another_connections_initials_are_dropped():
    reader = InitialReader()
    assert reader.feed(CHROMIUM[0]) is NEED_DATA
    assert _dropped(AIOQUIC[0], reader) == OTHER_CONNECTION
    v2 = client_initial(crypto_frame(0, hello_stream()), version=VERSION_2, dcid=reader.dcid)
    assert _dropped(v2, reader) == OTHER_CONNECTION
    assert reader.feed(CHROMIUM[1]).name == "www.example.com"


# ============================================================ coalesced packets


def test_coalesced_initials_carry_one_hello_between_them():
    hello = hello_stream()
    keys = derive_initial_keys(RFC_DCID, VERSION_1)
    first = build_initial(keys, RFC_DCID, b"c", crypto_frame(0, hello[:200]), packet_number=0, server=False)
    second = build_initial(keys, RFC_DCID, b"c", crypto_frame(200, hello[200:]) + bytes(700), packet_number=1,
                           server=False)
    reader = InitialReader()
    result = reader.feed(first + second)
    assert result.name == "www.example.com" and reader.largest_pn == 1


def test_what_follows_the_initials_in_a_datagram_ends_the_walk_and_is_held_with_it():
    hello = hello_stream()
    keys = derive_initial_keys(RFC_DCID, VERSION_1)
    first = build_initial(keys, RFC_DCID, b"c", crypto_frame(0, hello[:200]), server=False)
    rest = crypto_frame(200, hello[200:])
    other = derive_initial_keys(b"otherdcid", VERSION_1)
    followers = {
        "zero_rtt": bytes([0xD0]) + VERSION_1.to_bytes(4, "big") + bytes(1200),
        "short_header": b"\x40" + bytes(1200),
        "zeros": bytes(1200),
        "another_dcid": build_initial(other, b"otherdcid", b"c", rest + bytes(1200), packet_number=1, server=False),
        "undecryptable": build_initial(keys, RFC_DCID, b"c", rest + bytes(1200), packet_number=1, server=True),
    }
    for name, follower in followers.items():
        reader = InitialReader()
        assert reader.feed(first + follower) is NEED_DATA, name
        assert reader.bytes_held == len(first + follower)


# ============================================================ the flow refused


def _refused(*datagrams: bytes, **kwargs) -> str:
    reader = InitialReader(**kwargs)
    results = [reader.feed(d) for d in datagrams]
    assert isinstance(results[-1], NotProtocol), results
    assert reader.feed(AIOQUIC[0]) is results[-1]  # an answer sticks
    return results[-1].reason


@pytest.mark.parametrize("frame", [
    b"\x08\x00\x05hello",  # STREAM
    b"\x1d\x00\x00",  # CONNECTION_CLOSE of the application type
    b"\x18\x01\x00\x08" + bytes(8) + bytes(16),  # NEW_CONNECTION_ID
    b"\x1e",  # HANDSHAKE_DONE
    b"\x40\x06\x00\x01a",  # CRYPTO with a two-byte type encoding
])
def test_a_frame_an_initial_may_not_carry_refuses_the_flow(frame):
    assert "protocol violation" in _refused(client_initial(frame + bytes(10)))


@pytest.mark.parametrize("frame", [b"\x06\x00\x44", b"\x02\x00", b"\x03\x05\x00\x00\x00\x01\x02", b"\x1c\x41"])
def test_a_truncated_frame_refuses_the_flow(frame):
    assert "truncated frame" in _refused(client_initial(frame, size=0) + bytes(1200))


def test_an_initial_of_only_padding_ping_and_acks_is_held_without_deciding():
    frames = b"\x01" + b"\x02\x05\x00\x01\x00\x01\x00" + b"\x03\x05\x00\x00\x02\x01\x02\x03"
    reader, results = feed_all([client_initial(frames)])
    assert results == [NEED_DATA] and reader.datagrams == 1


def test_crypto_data_that_changes_on_retransmission_refuses_the_flow():
    hello = hello_stream()
    changed = bytearray(hello[:100])
    changed[50] ^= 1
    reason = _refused(client_initial(crypto_frame(0, hello[:60])), client_initial(crypto_frame(40, bytes(changed[40:]))))
    assert "differs" in reason


def test_overlapping_consistent_crypto_data_is_fine():
    hello = hello_stream()
    pieces = [crypto_frame(30, hello[30:300]), crypto_frame(0, hello[:40]), crypto_frame(290, hello[290:]),
              crypto_frame(0, hello)]
    assert InitialReader().feed(client_initial(b"".join(pieces))).name == "www.example.com"


def test_crypto_data_past_the_cap_refuses_the_flow():
    assert "past the" in _refused(client_initial(crypto_frame(5000, b"x")), max_bytes=5000)
    assert "2^62" in _refused(client_initial(b"\x06" + encode_varint(quic.MAX_VARINT) + b"\x01x"))


def test_the_datagram_and_byte_caps_refuse_a_flow_that_never_completes_its_hello():
    ping = client_initial(b"\x01")
    assert "in 3 datagrams" in _refused(ping, ping, ping, max_datagrams=3)
    assert "cap" in _refused(ping, ping, max_bytes=2000)
    # Chromium's two datagrams fit caps of exactly their size.
    assert feed_all(CHROMIUM, max_bytes=2500, max_datagrams=2)[1][-1].name == "www.example.com"


def test_a_client_connection_close_refuses_the_flow():
    assert "closed" in _refused(client_initial(b"\x1c\x0a\x00\x00"))


def test_a_hello_the_tls_peeker_refuses_refuses_the_flow():
    assert "client_hello" in _refused(client_initial(crypto_frame(0, b"\x02\x00\x00\x10" + bytes(16))))
    hello = bytearray(hello_stream())
    hello[4:6] = b"\x02\x02"  # legacy_version
    assert "malformed" in _refused(client_initial(crypto_frame(0, bytes(hello))))


# ============================================================ properties


def _check(result) -> None:
    assert result is NEED_DATA or isinstance(result, RESULT_TYPES), result
    if isinstance(result, Dropped):
        assert result.reason in {NOT_QUIC, NOT_INITIAL, UNSUPPORTED_VERSION, TOO_SMALL, BAD_HEADER, UNDECRYPTABLE,
                                 OTHER_CONNECTION}


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=1400), max_size=4))
def test_arbitrary_bytes_get_only_the_documented_answers(datagrams):
    reader = InitialReader()
    for datagram in datagrams:
        _check(reader.feed(datagram))
    for parse in (long_header_cids, lambda d: short_header_dcid(d, 8)):
        for datagram in datagrams:
            parse(datagram)


@st.composite
def mutated_initials(draw):
    data = bytearray(draw(st.sampled_from(ALL_INITIALS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 3))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if kind == 0 and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == 1:
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(mutated_initials(), st.sampled_from(ALL_INITIALS)), min_size=1, max_size=5))
def test_mutated_real_initials_get_only_the_documented_answers(datagrams):
    reader = InitialReader(max_bytes=4000, max_datagrams=3)
    for datagram in datagrams:
        _check(reader.feed(datagram))
    assert reader.bytes_held <= 4000 and reader.datagrams <= 3


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 3))
def test_decrypted_payloads_of_any_bytes_parse_or_raise_a_violation(payload, prefix):
    frames = [b"", b"\x06\x00", b"\x02", b"\x1c"][prefix] + payload
    try:
        parse_initial_frames(frames)
    except quic.QuicViolation:
        pass


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_a_hello_in_any_crypto_frames_in_any_packets_and_order_gives_the_same_decision(data):
    """Cut the hello into frames, frames into Initials, in any order with repeats: one Decision, at the last piece."""
    hello = hello_stream("chromium")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(hello) - 1), max_size=12)))
    bounds = [0, *cuts, len(hello)]
    frames = [crypto_frame(low, hello[low:high]) for low, high in zip(bounds, bounds[1:])]
    frames += data.draw(st.lists(st.sampled_from(frames), max_size=3))
    frames = data.draw(st.permutations(frames))
    per_packet = data.draw(st.integers(1, 4))
    dcid = bytes(random.Random(len(cuts)).randbytes(8))
    datagrams = [client_initial(b"".join(frames[i:i + per_packet]), dcid=dcid, packet_number=n)
                 for n, i in enumerate(range(0, len(frames), per_packet))]
    reader, results = feed_all(datagrams, max_bytes=64000, max_datagrams=64)
    expected = TlsPeeker(record_layer=False).feed(hello)
    assert results[-1] == expected
    decided_at = results.index(expected)
    assert all(r is NEED_DATA for r in results[:decided_at]) and all(r is results[decided_at] for r in results[decided_at:])


def test_the_fuzz_target_replays_inputs_without_atheris():
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "fuzz"))
    try:
        import atheris_quic
    finally:
        sys.path.pop(0)
    rng = random.Random(12)
    for _ in range(300):
        atheris_quic.TestOneInput(rng.randbytes(rng.randrange(1, 200)))
    for seed in ALL_INITIALS:
        atheris_quic.TestOneInput(bytes([0]) + seed)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100), st.binary(max_size=200))
def test_the_hmac_with_precomputed_pads_is_hmac_sha256(key, message):
    import hashlib
    import hmac
    assert quic.HmacSha256(key).digest(message) == hmac.digest(key, message, hashlib.sha256)
