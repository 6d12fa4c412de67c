"""netstack.agentwire: the agent tunnel's frames and control messages.

Frames are read h11-style: all at once, one byte at a time (no frame before
its last byte), and with trailing bytes that stay buffered for the next one.
"""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netstack import agentwire as wire
from netstack.agentwire import (
    BODY_MAX, BYE, CONTROL_MAX, ERROR, HELLO, KEEPALIVE, PACKET, REGISTERED, Frame, FrameDecoder, FrameError,
    decode_control, encode_control, encode_frame, encode_packet, ipv6_endpoints, parse_hello, parse_refusal,
    parse_registered,
)

PACKET_BYTES = bytes([0x60, 0, 0, 0, 0, 0, 6, 64]) + bytes(range(16)) + bytes(range(16, 32)) + b"payload"
HELLO_FRAME = encode_control(HELLO, {"version": 1, "token": "t" * 43, "names": ["app.example.com"]})


def feed_all(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    return list(iter(decoder.next_frame, None))


def feed_bytewise(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    frames = []
    for i in range(len(data)):
        decoder.receive_data(data[i:i + 1])
        frame = decoder.next_frame()
        if frame is not None:
            frames.append(frame)
            assert decoder.next_frame() is None
    return frames


# -- framing ----------------------------------------------------------------------


def test_a_packet_frame_is_type_length_body():
    assert encode_packet(b"\x60abc") == b"\x01\x00\x04\x60abc"


@pytest.mark.parametrize("read", [feed_all, feed_bytewise], ids=["whole", "bytewise"])
def test_frames_come_out_whole_and_in_order(read):
    data = encode_packet(PACKET_BYTES) + HELLO_FRAME + encode_control(KEEPALIVE, {})
    frames = read(data)
    assert [f.type for f in frames] == [PACKET, HELLO, KEEPALIVE]
    assert frames[0].body == PACKET_BYTES


def test_no_frame_before_its_last_byte_and_trailing_bytes_stay_buffered():
    frame = encode_packet(PACKET_BYTES)
    decoder = FrameDecoder()
    decoder.receive_data(frame[:-1])
    assert decoder.next_frame() is None
    decoder.receive_data(frame[-1:] + frame[:5])
    assert decoder.next_frame().body == PACKET_BYTES
    assert decoder.next_frame() is None
    assert decoder.buffered == 5


def test_an_empty_body_is_a_frame():
    assert feed_all(encode_frame(KEEPALIVE, b"")) == [Frame(KEEPALIVE, b"")]


def test_the_largest_body_fits_and_one_more_byte_does_not():
    assert feed_all(encode_packet(bytes(BODY_MAX)))[0].body == bytes(BODY_MAX)
    with pytest.raises(ValueError, match="at most 65535"):
        encode_packet(bytes(BODY_MAX + 1))


def test_an_unknown_frame_type_is_a_clear_error_and_stays_one():
    decoder = FrameDecoder()
    decoder.receive_data(b"\x7f\x00\x00")
    with pytest.raises(FrameError, match="unknown frame type 0x7f"):
        decoder.next_frame()
    decoder.receive_data(encode_packet(PACKET_BYTES))
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_tls_or_http_bytes_instead_of_frames_are_refused_at_once():
    for stray in (b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\r\n"):
        decoder = FrameDecoder()
        decoder.receive_data(stray)
        with pytest.raises(FrameError):
            decoder.next_frame()


def test_an_oversized_control_frame_is_refused_from_its_header():
    decoder = FrameDecoder()
    decoder.receive_data(wire.HEADER.pack(HELLO, CONTROL_MAX + 1))
    with pytest.raises(FrameError, match="at most"):
        decoder.next_frame()


def test_encoding_refuses_unknown_types_and_oversized_control_messages():
    with pytest.raises(ValueError):
        encode_frame(0x7f, b"")
    with pytest.raises(ValueError):
        encode_control(PACKET, {})
    with pytest.raises(ValueError, match="control message"):
        encode_control(HELLO, {"x": "y" * CONTROL_MAX})


def test_the_buffer_is_compacted_as_frames_are_taken():
    decoder = FrameDecoder()
    frame = encode_packet(bytes(1000))
    for _ in range(1000):
        decoder.receive_data(frame)
        assert decoder.next_frame() is not None
    assert len(decoder._buf) < 4 * len(frame)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(wire.FRAME_TYPES)), st.binary(max_size=2000)), max_size=20),
       st.lists(st.integers(min_value=1, max_value=3000), max_size=50))
def test_any_split_of_a_stream_of_frames_gives_the_same_frames(frames, cuts):
    data = b"".join(encode_frame(kind, body) for kind, body in frames)
    decoder = FrameDecoder()
    out = []
    pos = 0
    for cut in cuts + [len(data)]:
        decoder.receive_data(data[pos:pos + cut])
        pos += cut
        out.extend(iter(decoder.next_frame, None))
    assert [(f.type, f.body) for f in out] == frames


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_frames_or_a_frame_error_never_anything_else(data):
    decoder = FrameDecoder()
    decoder.receive_data(data)
    try:
        frames = list(iter(decoder.next_frame, None))
    except FrameError:
        return
    for frame in frames:
        if frame.type in wire.CONTROL_TYPES:
            try:
                decode_control(frame)
            except FrameError:
                pass


# -- control messages -------------------------------------------------------------


def test_a_hello_round_trips():
    hello = parse_hello(decode_control(feed_all(HELLO_FRAME)[0]))
    assert hello == wire.Hello(1, "t" * 43, ("app.example.com",))


@pytest.mark.parametrize("message, problem", [
    ({"token": "x", "names": ["a.example"]}, "'version'"),
    ({"version": True, "token": "x", "names": ["a.example"]}, "'version'"),
    ({"version": 1, "names": ["a.example"]}, "'token'"),
    ({"version": 1, "token": "", "names": ["a.example"]}, "token"),
    ({"version": 1, "token": "x" * 513, "names": ["a.example"]}, "token"),
    ({"version": 1, "token": "x", "names": []}, "no names"),
    ({"version": 1, "token": "x", "names": "a.example"}, "'names'"),
    ({"version": 1, "token": "x", "names": [1]}, "'names'"),
    ({"version": 1, "token": "x", "names": ["a.example"] * 65}, "'names'"),
])
def test_a_malformed_hello_says_what_is_wrong(message, problem):
    with pytest.raises(FrameError, match=problem):
        parse_hello(message)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"not json", b"[1, 2]", b'"text"'])
def test_a_control_body_must_be_a_json_object(body):
    with pytest.raises(FrameError, match="HELLO"):
        decode_control(Frame(HELLO, body))


def test_a_packet_frame_is_not_a_control_message():
    with pytest.raises(FrameError, match="control frame"):
        decode_control(Frame(PACKET, b"{}"))


def test_registered_and_refusal_round_trip():
    message = {"address": "fd00:6b72::2", "prefixes": ["64:ff9b:1::/96"], "mtu": 1500, "keepalive": 10,
               "names": ["app.example.com"]}
    registered = parse_registered(decode_control(feed_all(encode_control(REGISTERED, message))[0]))
    assert registered == wire.Registered("fd00:6b72::2", ("64:ff9b:1::/96",), 1500, 10.0, ("app.example.com",))
    refusal = parse_refusal(json.loads(json.dumps({"reason": "bad_token", "message": "no", "retry": False})))
    assert refusal == wire.Refusal("bad_token", "no", False)
    assert parse_refusal({"reason": "x"}).retry is False


@pytest.mark.parametrize("key, value", [("mtu", 1279), ("mtu", 70000), ("keepalive", 0), ("keepalive", 4000)])
def test_registered_values_out_of_range_are_refused(key, value):
    message = {"address": "fd00:6b72::2", "prefixes": [], "mtu": 1500, "keepalive": 10, "names": []}
    message[key] = value
    with pytest.raises(FrameError, match=key):
        parse_registered(message)


def test_every_control_type_encodes():
    for kind in (HELLO, REGISTERED, ERROR, KEEPALIVE, BYE):
        assert feed_all(encode_control(kind, {"k": 1}))[0].type == kind


# -- what a packet frame carries -------------------------------------------------------


def test_ipv6_endpoints_of_a_packet():
    assert ipv6_endpoints(PACKET_BYTES) == (bytes(range(16)), bytes(range(16, 32)))


@pytest.mark.parametrize("packet", [b"", PACKET_BYTES[:39], b"\x45" + PACKET_BYTES[1:]], ids=["empty", "short", "ipv4"])
def test_not_an_ipv6_packet_has_no_endpoints(packet):
    assert ipv6_endpoints(packet) is None
