"""netstack.connect: the incremental CONNECT request-head peeker, its answers and the listener policy.

Every head is checked h11-style: all at once, one byte at a time (no decision
before the blank line), and followed by bytes that must not change the
decision (the client's TLS ClientHello, sent without waiting for the 200).
The curl heads are real captures (tests/data/capture_connect_heads.py).
"""

import ipaddress
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netstack.connect import (
    BAD_GATEWAY, BAD_REQUEST, CONNECTION_ESTABLISHED, FORBIDDEN_CLIENT, FORBIDDEN_NAME, FORBIDDEN_PORT,
    NOT_IMPLEMENTED, ConnectPeeker, ConnectPolicy, parse_authority,
)
from netstack.peek import NEED_DATA, BadRequest, Decision, NotProtocol

DATA = pathlib.Path(__file__).resolve().parent / "data"
CURL = (DATA / "curl_connect.bin").read_bytes()
CURL_AUTH = (DATA / "curl_connect_auth.bin").read_bytes()
CURL_HTTP10_IPV6 = (DATA / "curl_connect_http10_ipv6.bin").read_bytes()
CURL_HELLO = (DATA / "curl_tls13_alpn.bin").read_bytes()

# (head, name, port)
HEADS = {
    "curl": (CURL, "www.example.com", 443),
    "curl-proxy-authorization-ignored": (CURL_AUTH, "www.example.com", 8443),
    "curl-http10-ipv6-literal": (CURL_HTTP10_IPV6, "2001:db8::10", 443),
    "no-fields": (b"CONNECT a.example:443 HTTP/1.1\r\n\r\n", "a.example", 443),
    "http10-no-fields": (b"CONNECT a.example:443 HTTP/1.0\r\n\r\n", "a.example", 443),
    "host-field-differs-and-is-not-read": (b"CONNECT a.example:443 HTTP/1.1\r\nHost: b.example\r\n\r\n", "a.example", 443),
    "two-host-fields-are-not-read": (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "a.example", 443),
    "upper-case-trailing-dot": (b"CONNECT WWW.Example.COM.:443 HTTP/1.1\r\n\r\n", "www.example.com", 443),
    "ipv4-address": (b"CONNECT 192.0.2.10:8443 HTTP/1.1\r\n\r\n", "192.0.2.10", 8443),
    "ipv6-upper-case": (b"CONNECT [2001:DB8::A]:443 HTTP/1.1\r\n\r\n", "2001:db8::a", 443),
    "leading-zeros-in-port": (b"CONNECT a.example:00443 HTTP/1.1\r\n\r\n", "a.example", 443),
    "highest-port": (b"CONNECT a.example:65535 HTTP/1.1\r\n\r\n", "a.example", 65535),
    "bare-lf-line-ends": (b"CONNECT lf.example:443 HTTP/1.1\nHost: lf.example:443\n\n", "lf.example", 443),
    "obs-text-and-empty-values": (b"CONNECT a.example:443 HTTP/1.1\r\nX-Empty:\r\nX-T: caf\xe9\r\n\r\n", "a.example", 443),
}

# What may follow a head in the same segment: the tunnel's first bytes.
TRAILERS = [CURL_HELLO, b"\r\n\r\n", b"CONNECT b.example:443 HTTP/1.1\r\n\r\n", b"\x00"]


def feed_bytewise(data: bytes, **kwargs) -> list:
    peeker = ConnectPeeker(**kwargs)
    return [peeker.feed(data[i:i + 1]) for i in range(len(data))]


def feed_chunked(data: bytes, sizes: list[int], **kwargs):
    peeker = ConnectPeeker(**kwargs)
    result = peeker.feed(b"")
    pos, i = 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        result = peeker.feed(data[pos:pos + size])
        pos, i = pos + size, i + 1
    return result


# --- heads that open a tunnel, three ways --------------------------------------


@pytest.mark.parametrize(("head", "name", "port"), HEADS.values(), ids=HEADS.keys())
def test_head_at_once_gives_the_authority_and_the_head_size(head, name, port):
    assert ConnectPeeker().feed(head) == Decision(name=name, hello_size=len(head), port=port)


@pytest.mark.parametrize(("head", "name", "port"), HEADS.values(), ids=HEADS.keys())
def test_head_byte_by_byte_is_decided_exactly_at_the_blank_line(head, name, port):
    results = feed_bytewise(head)
    assert all(result is NEED_DATA for result in results[:-1])
    assert results[-1] == Decision(name=name, hello_size=len(head), port=port)


@pytest.mark.parametrize("trailer", TRAILERS, ids=["client-hello", "blank-lines", "second-connect", "nul"])
@pytest.mark.parametrize(("head", "name", "port"), HEADS.values(), ids=HEADS.keys())
def test_tunnel_bytes_after_the_head_are_not_part_of_it(head, name, port, trailer):
    expected = Decision(name=name, hello_size=len(head), port=port)
    assert ConnectPeeker().feed(head + trailer) == expected
    peeker = ConnectPeeker()
    decision = peeker.feed(head)
    assert peeker.feed(trailer) is decision


def test_the_curl_capture_is_what_curl_sends():
    assert CURL.startswith(b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\n")
    assert b"Proxy-Authorization: Basic " in CURL_AUTH
    assert CURL.endswith(b"\r\n\r\n") and CURL.count(b"\r\n\r\n") == 1


def test_kept_fields_are_collected_and_others_are_not():
    head = (b"CONNECT a.example:443 HTTP/1.1\r\nForwarded: for=\"198.51.100.2\"\r\nX-Other: 1\r\n"
            b"forwarded:  for=192.0.2.1 \r\n\r\n")
    peeker = ConnectPeeker(keep=["Forwarded"])
    assert peeker.feed(head) == Decision(name="a.example", hello_size=len(head), port=443)
    assert peeker.fields == {"forwarded": ['for="198.51.100.2"', "for=192.0.2.1"]}
    assert ConnectPeeker().fields == {}


def test_an_empty_feed_needs_data():
    assert ConnectPeeker().feed(b"") is NEED_DATA


def test_a_memoryview_feed_is_copied_so_the_caller_may_reuse_its_buffer():
    scratch = bytearray(16)
    peeker = ConnectPeeker()
    result = NEED_DATA
    for pos in range(0, len(CURL_AUTH), 16):
        piece = CURL_AUTH[pos:pos + 16]
        scratch[:len(piece)] = piece
        result = peeker.feed(memoryview(scratch)[:len(piece)])
        scratch[:] = b"\n" * 16
    assert result == Decision(name="www.example.com", hello_size=len(CURL_AUTH), port=8443)


# --- heads answered with 400 or 501 once complete ------------------------------

# (head, outcome, reason, what follows)
COMPLETE_REFUSALS = {
    "no-port": (b"CONNECT a.example HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target: b'a.example'", b""),
    "empty-port": (b"CONNECT a.example: HTTP/1.1\r\nHost: a\r\n\r\n", "refused_bad_request", "invalid CONNECT target: no port", b""),
    "port-zero": (b"CONNECT a.example:0 HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target: port 0", b""),
    "port-too-large": (b"CONNECT a.example:65536 HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target: port 65536", b""),
    "port-too-long": (b"CONNECT a.example:000443 HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target: port 000443", b""),
    "letters-in-port": (b"CONNECT a.example:https HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target", b""),
    "origin-form": (b"CONNECT / HTTP/1.1\r\nHost: a.example:443\r\n\r\n", "refused_bad_request", "invalid CONNECT target", b""),
    "absolute-form": (b"CONNECT https://a.example:443/ HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target", b""),
    "userinfo": (b"CONNECT user@a.example:443 HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target", b""),
    "empty-host": (b"CONNECT :443 HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target", b""),
    "only-a-dot": (b"CONNECT .:443 HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target: empty host", b""),
    "bad-ipv6-literal": (b"CONNECT [2001:db8:::1]:443 HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target", b""),
    "ipv6-without-brackets": (b"CONNECT 2001:db8::1:443 HTTP/1.1\r\n\r\n", "refused_bad_request", "invalid CONNECT target", b""),
    # RFC 9110 §9.1: methods are case-sensitive.
    "lower-case-method": (b"connect a.example:443 HTTP/1.1\r\n\r\n", "refused_method", "method connect is not CONNECT", b""),
    "get-absolute-form": (b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "refused_method", "method GET is not CONNECT", b"body"),
    "get-origin-form": (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "refused_method", "method GET is not CONNECT", b""),
}


@pytest.mark.parametrize(("head", "outcome", "reason", "rest"), COMPLETE_REFUSALS.values(), ids=COMPLETE_REFUSALS.keys())
def test_a_refused_head_is_answered_only_once_it_is_complete(head, outcome, reason, rest):
    results = feed_bytewise(head + rest)
    assert all(result is NEED_DATA for result in results[:len(head) - 1])
    answer = results[len(head) - 1]
    assert isinstance(answer, BadRequest)
    assert answer.outcome == outcome
    assert answer.reason.startswith(reason)
    assert answer.hello_size == len(head)
    assert all(result is answer for result in results[len(head):])
    assert ConnectPeeker().feed(head + rest) == answer


# (stream whose last byte decides, what follows): a malformed line is answered at once.
MALFORMED = {
    "lower-case-version": (b"CONNECT a.example:443 http/1.1\r\n", b"\r\n"),
    "http-2-version": (b"CONNECT a.example:443 HTTP/2.0\r\n", b"\r\n"),
    "no-version": (b"CONNECT a.example:443\r\n", b"\r\n"),
    "two-spaces": (b"CONNECT  a.example:443 HTTP/1.1\r\n", b"\r\n"),
    "bare-cr-in-request-line": (b"CONNECT a.example:443 HTTP/1.1\r\r\n", b"\r\n"),
    "words-after-version": (b"CONNECT a.example:443 HTTP/1.1 now\r\n", b"\r\n"),
    "obsolete-line-folding": (b"CONNECT a.example:443 HTTP/1.1\r\nX-A: one\r\n two\r\n", b"\r\n"),
    "space-before-colon": (b"CONNECT a.example:443 HTTP/1.1\r\nHost : a\r\n", b"\r\n"),
    "field-without-colon": (b"CONNECT a.example:443 HTTP/1.1\r\nHost a\r\n", b"\r\n"),
    "nul-in-value": (b"CONNECT a.example:443 HTTP/1.1\r\nX-A: a\x00b\r\n", b"\r\n"),
}


@pytest.mark.parametrize(("stream", "rest"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_line_is_a_bad_request_at_its_end(stream, rest):
    results = feed_bytewise(stream + rest)
    assert all(result is NEED_DATA for result in results[:len(stream) - 1])
    answer = results[len(stream) - 1]
    assert isinstance(answer, BadRequest) and answer.outcome == "refused_bad_request"
    assert all(result is answer for result in results[len(stream):])
    assert ConnectPeeker().feed(stream + rest) == answer


@pytest.mark.parametrize(("stream", "rest"), [
    (CURL_HELLO[:1], CURL_HELLO[1:]),
    (b"SSH-2.0-OpenSSH_9.2\r", b"\n"),
    (b" ", CURL),
    (b"\r", b"\n" + CURL),
    (b"CONNECT\t", b"a.example:443 HTTP/1.1\r\n\r\n"),
], ids=["tls-hello", "ssh-banner", "leading-space", "leading-crlf", "tab-after-method"])
def test_bytes_that_cannot_start_a_request_are_not_http(stream, rest):
    results = feed_bytewise(stream + rest)
    assert all(result is NEED_DATA for result in results[:len(stream) - 1])
    assert isinstance(results[len(stream) - 1], NotProtocol)
    assert ConnectPeeker().feed(stream + rest) == results[len(stream) - 1]


def test_a_head_larger_than_the_cap_is_a_bad_request_at_the_first_byte_past_it():
    head = b"CONNECT a.example:443 HTTP/1.1\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n"
    results = feed_bytewise(head)
    assert all(result is NEED_DATA for result in results[:16384])
    assert results[16384] == BadRequest("request head larger than 16384 bytes", hello_size=16384)
    assert ConnectPeeker().feed(head) == results[16384]


def test_a_head_exactly_max_bytes_long_is_decided_and_one_byte_less_is_not():
    expected = Decision(name="www.example.com", hello_size=len(CURL), port=443)
    assert ConnectPeeker(max_bytes=len(CURL)).feed(CURL + CURL_HELLO) == expected
    refused = ConnectPeeker(max_bytes=len(CURL) - 1).feed(CURL)
    assert isinstance(refused, BadRequest) and refused.outcome == "refused_bad_request"


# --- authorities ---------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (b"www.example.com:443", ("www.example.com", 443)),
    (b"[::1]:1", ("::1", 1)),
    (b"A.B.:80", ("a.b", 80)),
])
def test_parse_authority(value, expected):
    assert parse_authority(value) == expected


@pytest.mark.parametrize("value", [b"a.example", b"a.example:", b":443", b"[::1]", b"a:b:443", b"a.example:1x"])
def test_parse_authority_refuses(value):
    with pytest.raises(ValueError):
        parse_authority(value)


# --- the answers ----------------------------------------------------------------


def test_the_200_is_a_bare_status_line_with_no_content_length():
    # RFC 9110 §9.3.6: no Content-Length or Transfer-Encoding in a 2xx to CONNECT.
    assert CONNECTION_ESTABLISHED == b"HTTP/1.1 200 Connection Established\r\n\r\n"


@pytest.mark.parametrize(("response", "status_line"), [
    (BAD_REQUEST, b"HTTP/1.1 400 Bad Request"),
    (FORBIDDEN_CLIENT, b"HTTP/1.1 403 Forbidden"),
    (FORBIDDEN_PORT, b"HTTP/1.1 403 Forbidden"),
    (FORBIDDEN_NAME, b"HTTP/1.1 403 Forbidden"),
    (NOT_IMPLEMENTED, b"HTTP/1.1 501 Not Implemented"),
    (BAD_GATEWAY, b"HTTP/1.1 502 Bad Gateway"),
], ids=["400", "403-client", "403-port", "403-name", "501", "502"])
def test_a_refusal_is_a_complete_response_that_closes(response, status_line):
    head, _, body = response.partition(b"\r\n\r\n")
    status_line_seen, *field_lines = head.split(b"\r\n")
    fields = {}
    for line in field_lines:
        name, _, value = line.partition(b":")
        fields[name.lower()] = value.strip()
    assert status_line_seen == status_line
    assert fields == {b"content-type": b"text/plain", b"content-length": str(len(body)).encode(),
                      b"connection": b"close"}
    assert body.startswith(status_line[9:12]) and body.endswith(b"\n") and body.count(b"\n") == 1


# --- the policy ------------------------------------------------------------------


def test_the_policy_allows_addresses_inside_its_networks_only():
    policy = ConnectPolicy.of([ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv4Network("203.0.113.7/32")],
                              [443, 8443])
    inside = ["198.51.100.0", "198.51.100.2", "198.51.100.255", "203.0.113.7"]
    outside = ["198.51.101.2", "198.51.99.255", "203.0.113.6", "203.0.113.8", "0.0.0.0"]
    assert [policy.allows(ipaddress.IPv4Address(a).packed) for a in inside] == [True] * len(inside)
    assert [policy.allows(ipaddress.IPv4Address(a).packed) for a in outside] == [False] * len(outside)
    assert policy.ports == {443, 8443}


def test_a_policy_without_networks_allows_nobody_and_the_default_port_is_443():
    policy = ConnectPolicy(())
    assert not policy.allows(bytes(4))
    assert policy.ports == {443}


# --- properties ------------------------------------------------------------------

chunk_sizes = st.lists(st.integers(1, 30), min_size=1, max_size=12)

# Pieces that reach every state of the peeker when glued together at random.
CONNECTISH = st.lists(st.sampled_from([
    b"CONNECT", b"connect", b"GET", b" ", b"a.example", b":443", b":", b"[::1]", b"[", b"]", b"HTTP/1.1",
    b"HTTP/1.0", b"HTTP/2.0", b"\r\n", b"\n", b"\r", b"Host:", b"X-A: v", b"\t", b"\x00", b"\x16\x03\x01",
]), max_size=30).map(b"".join)


@settings(max_examples=300)
@given(st.binary(max_size=200), chunk_sizes)
def test_arbitrary_bytes_in_arbitrary_chunks_give_the_same_result_as_at_once(data, sizes):
    assert feed_chunked(data, sizes) == ConnectPeeker().feed(data)


@settings(max_examples=500)
@given(CONNECTISH, chunk_sizes, st.sampled_from([16384, 40, 10]))
def test_connect_like_bytes_in_arbitrary_chunks_give_the_same_result_as_at_once(data, sizes, cap):
    result = ConnectPeeker(max_bytes=cap).feed(data)
    assert feed_chunked(data, sizes, max_bytes=cap) == result
    # Whatever the bytes, a decision never claims more than it read.
    if isinstance(result, (Decision, BadRequest)):
        assert 0 < result.hello_size <= min(len(data), cap)


label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
host_name = st.lists(label, min_size=1, max_size=4).map(".".join)
field_name = st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True)
field_value = st.from_regex(r"[ -~]{0,30}", fullmatch=True).map(str.strip)


@settings(max_examples=200)
@given(host_name, st.integers(1, 65535), st.lists(st.tuples(field_name, field_value), max_size=5),
       st.sampled_from([b"\r\n", b"\n"]), st.sampled_from([b"1.0", b"1.1"]), chunk_sizes, st.binary(max_size=64))
def test_generated_heads_in_arbitrary_chunks_give_their_authority(host, port, fields, eol, version, sizes, tunnel):
    lines = [f"{name}: {value}".encode() for name, value in fields]
    head = (b"CONNECT %s:%d HTTP/%s" % (host.encode(), port, version) + eol
            + b"".join(line + eol for line in lines) + eol)
    assert feed_chunked(head + tunnel, sizes) == Decision(name=host.lower(), hello_size=len(head), port=port)
