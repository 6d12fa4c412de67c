"""netstack.http: the incremental HTTP/1.x request-head peeker.

Every request head is checked h11-style: all at once, one byte at a time (no
decision before the blank line), and followed by bytes that must not change
the decision (a body, a pipelined request).
"""

import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netstack.http import BAD_REQUEST, MISDIRECTED_REQUEST, HttpPeeker
from netstack.peek import NEED_DATA, BadRequest, Decision, NotProtocol

CURL_HELLO = (pathlib.Path(__file__).resolve().parent / "data" / "curl_tls13_alpn.bin").read_bytes()
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

BROWSER_GET = (
    b"GET /catalog/index.html?q=lamp&page=2 HTTP/1.1\r\n"
    b"Host: shop.example.com\r\n"
    b"Connection: keep-alive\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Cookie: session=abc123; theme=dark\r\n"
    b"\r\n"
)

HEADS = {
    "curl": (b"GET / HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n", "www.example.com"),
    "browser": (BROWSER_GET, "shop.example.com"),
    "post": (b"POST /api HTTP/1.1\r\nHost: api.example.org\r\nContent-Length: 11\r\n\r\n", "api.example.org"),
    "field-name-any-case": (b"GET / HTTP/1.1\r\nhOsT: a.example\r\n\r\n", "a.example"),
    "host-with-port": (b"GET / HTTP/1.1\r\nHost: api.example.org:8080\r\n\r\n", "api.example.org"),
    "host-upper-case-trailing-dot": (b"GET / HTTP/1.1\r\nHost: WWW.Example.COM.\r\n\r\n", "www.example.com"),
    "host-ows-trimmed": (b"GET / HTTP/1.1\r\nHost: \t a.example \t\r\n\r\n", "a.example"),
    "host-without-ows": (b"GET / HTTP/1.1\r\nHost:a.example\r\n\r\n", "a.example"),
    "ipv6-literal-with-port": (b"GET / HTTP/1.1\r\nHost: [2001:DB8::10]:8080\r\n\r\n", "2001:db8::10"),
    "ipv6-literal": (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", "::1"),
    "ipv4-address": (b"GET / HTTP/1.1\r\nHost: 192.0.2.10:80\r\n\r\n", "192.0.2.10"),
    "absolute-form-wins-over-host": (
        b"GET http://Target.Example:8080/p?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n",
        "target.example",
    ),
    "absolute-form-without-path": (b"GET http://a.example HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example"),
    "absolute-form-ipv6": (b"GET https://[2001:db8::1]/ HTTP/1.1\r\nHost: x\r\n\r\n", "2001:db8::1"),
    "absolute-form-http10-without-host": (b"GET http://old.example/ HTTP/1.0\r\n\r\n", "old.example"),
    "http10-with-host": (b"GET / HTTP/1.0\r\nHost: ten.example\r\n\r\n", "ten.example"),
    "bare-lf-line-ends": (b"GET / HTTP/1.1\nHost: lf.example\n\n", "lf.example"),
    "mixed-line-ends": (b"GET / HTTP/1.1\r\nHost: mix.example\nAccept: */*\r\n\n", "mix.example"),
    "options-asterisk": (b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example"),
    "connect-uses-host": (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", "a.example"),
    "extension-method": (b"M-SEARCH * HTTP/1.1\r\nHost: 239.255.255.250:1900\r\n\r\n", "239.255.255.250"),
    "empty-and-obs-text-values": (b"GET / HTTP/1.1\r\nX-Empty:\r\nX-Text: caf\xe9\r\nHost: a.example\r\n\r\n", "a.example"),
    "host-is-the-last-field": (b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: last.example\r\n\r\n", "last.example"),
    "underscore-and-digits": (b"GET / HTTP/1.1\r\nHost: my_host-01.example\r\n\r\n", "my_host-01.example"),
}

TRAILERS = [b"hello=world", b"GET /2 HTTP/1.1\r\nHost: other.example\r\n\r\n", b"\x16\x03\x01\x00", b"\r\n\r\n"]


# --- helpers -----------------------------------------------------------------


def feed_bytewise(data: bytes, **kwargs) -> list:
    peeker = HttpPeeker(**kwargs)
    return [peeker.feed(data[i : i + 1]) for i in range(len(data))]


def feed_chunked(data: bytes, sizes: list[int], **kwargs):
    peeker = HttpPeeker(**kwargs)
    result = peeker.feed(b"")
    pos, i = 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        result = peeker.feed(data[pos : pos + size])
        pos, i = pos + size, i + 1
    return result


# --- request heads, three ways -----------------------------------------------


@pytest.mark.parametrize(("head", "name"), HEADS.values(), ids=HEADS.keys())
def test_head_at_once_gives_the_host_and_the_head_size(head, name):
    assert HttpPeeker().feed(head) == Decision(name=name, alpn=(), hello_size=len(head), records=0)


@pytest.mark.parametrize(("head", "name"), HEADS.values(), ids=HEADS.keys())
def test_head_byte_by_byte_is_decided_exactly_at_the_blank_line(head, name):
    results = feed_bytewise(head)
    assert all(result is NEED_DATA for result in results[:-1])
    assert results[-1] == Decision(name=name, hello_size=len(head))


@pytest.mark.parametrize("trailer", TRAILERS)
@pytest.mark.parametrize(("head", "name"), HEADS.values(), ids=HEADS.keys())
def test_bytes_after_the_head_do_not_change_the_decision(head, name, trailer):
    expected = Decision(name=name, hello_size=len(head))
    assert HttpPeeker().feed(head + trailer) == expected
    peeker = HttpPeeker()
    decision = peeker.feed(head)
    assert peeker.feed(trailer) is decision


def test_the_http2_prior_knowledge_preface_has_no_name():
    settings_frame = bytes.fromhex("000000 04 00 00000000")
    expected = Decision(name=None, hello_size=len(HTTP2_PREFACE))
    assert HttpPeeker().feed(HTTP2_PREFACE) == expected
    results = feed_bytewise(HTTP2_PREFACE)
    assert all(result is NEED_DATA for result in results[:-1])
    assert results[-1] == expected
    assert HttpPeeker().feed(HTTP2_PREFACE + settings_frame) == expected


def test_a_memoryview_feed_is_copied_so_the_caller_may_reuse_its_buffer():
    head, name = HEADS["browser"]
    scratch = bytearray(64)
    peeker = HttpPeeker()
    result = NEED_DATA
    for pos in range(0, len(head), 64):
        piece = head[pos : pos + 64]
        scratch[: len(piece)] = piece
        result = peeker.feed(memoryview(scratch)[: len(piece)])
        scratch[:] = b"\n" * 64
    assert result == Decision(name=name, hello_size=len(head))


def test_an_empty_feed_needs_data():
    assert HttpPeeker().feed(b"") is NEED_DATA


# --- a request answered with 400 --------------------------------------------

# RFC 9112 §3.2: an HTTP/1.1 request without Host, or any with more than one
# Host line or an invalid Host value, gets a 400. (head, the reason, what follows)
BAD_REQUESTS = {
    "http11-without-host": (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", "HTTP/1.1 request without Host header", b"body"),
    "http11-nothing-but-the-request-line": (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 request without Host header", b""),
    "absolute-form-http11-without-host": (b"GET http://a.example/ HTTP/1.1\r\n\r\n", "HTTP/1.1 request without Host header", b""),
    "two-host-headers": (b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n", "more than one Host header", b"x"),
    "two-equal-host-headers": (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n", "more than one Host header", b""),
    "two-host-headers-in-http10": (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host header", b""),
    "bad-host-then-second-host": (b"GET / HTTP/1.1\r\nHost: a b\r\nHost: c\r\n\r\n", "invalid Host header", b""),
    "empty-host": (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", "invalid Host header", b""),
    "host-only-a-dot": (b"GET / HTTP/1.1\r\nHost: .\r\n\r\n", "invalid Host header", b""),
    "space-inside-host": (b"GET / HTTP/1.1\r\nHost: a b.example\r\n\r\n", "invalid Host header", b""),
    "letters-in-port": (b"GET / HTTP/1.1\r\nHost: a.example:abc\r\n\r\n", "invalid Host header", b""),
    "port-out-of-range": (b"GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n", "invalid Host header", b""),
    "empty-port": (b"GET / HTTP/1.1\r\nHost: a.example:\r\n\r\n", "invalid Host header", b""),
    "two-ports": (b"GET / HTTP/1.1\r\nHost: a.example:80:81\r\n\r\n", "invalid Host header", b""),
    "bad-ipv6-literal": (b"GET / HTTP/1.1\r\nHost: [2001:db8:::1:2:3:4:5]\r\n\r\n", "invalid Host header", b""),
    "unclosed-ipv6-literal": (b"GET / HTTP/1.1\r\nHost: [2001:db8::1\r\n\r\n", "invalid Host header", b""),
    "host-with-userinfo": (b"GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n", "invalid Host header", b""),
    "bad-host-in-http10": (b"GET / HTTP/1.0\r\nHost: a b\r\n\r\n", "invalid Host header", b""),
}


@pytest.mark.parametrize(("head", "reason", "rest"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_is_answered_only_once_its_whole_head_is_in(head, reason, rest):
    results = feed_bytewise(head + rest)
    assert all(result is NEED_DATA for result in results[: len(head) - 1])
    answer = results[len(head) - 1]
    assert isinstance(answer, BadRequest)
    assert answer.reason.startswith(reason)
    assert answer.hello_size == len(head)
    assert all(result is answer for result in results[len(head) :])
    assert HttpPeeker().feed(head + rest) == answer


@pytest.mark.parametrize(
    "head", [b"GET / HTTP/1.0\r\nUser-Agent: old\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n", b"HEAD /x HTTP/1.0\n\n"]
)
def test_http10_without_host_has_no_name_and_is_a_bad_request_if_nothing_routes_it(head):
    expected = Decision(name=None, hello_size=len(head), unrouted="refused_bad_request")
    results = feed_bytewise(head + b"body")
    assert all(result is NEED_DATA for result in results[: len(head) - 1])
    assert results[len(head) - 1] == expected
    assert HttpPeeker().feed(head) == expected


def test_a_named_request_is_misdirected_if_nothing_routes_it():
    head, name = HEADS["curl"]
    assert HttpPeeker().feed(head).unrouted == "refused_unknown_name"
    assert HttpPeeker().feed(HTTP2_PREFACE).unrouted == "refused_unknown_name"


# --- not HTTP, or a request we reset -----------------------------------------

# (stream whose last byte is the one that decides, what follows it)
REFUSALS = {
    "tls-hello": (CURL_HELLO[:1], CURL_HELLO[1:]),
    "ssh-banner": (b"SSH-2.0-OpenSSH_9.2\r", b"\n"),
    "leading-space": (b" ", b"GET / HTTP/1.1\r\n"),
    "leading-crlf": (b"\r", b"\nGET / HTTP/1.1\r\n"),
    "nul-byte": (b"\x00", b"\x00\x00\x00"),
    "slash-in-method": (b"GE/", b"T / HTTP/1.1\r\n"),
    "tab-after-method": (b"GET\t", b"/ HTTP/1.1\r\n"),
    "lower-case-version": (b"GET / http/1.1\r\n", b"Host: a\r\n\r\n"),
    "http-2-version": (b"GET / HTTP/2.0\r\n", b"Host: a\r\n\r\n"),
    "http-1-2-version": (b"GET / HTTP/1.2\r\n", b"Host: a\r\n\r\n"),
    "http-3-version": (b"GET / HTTP/3\r\n", b"Host: a\r\n\r\n"),
    "http-0-9-request": (b"GET /\r\n", b"\r\n"),
    "two-spaces-after-method": (b"GET  / HTTP/1.1\r\n", b"Host: a\r\n\r\n"),
    "words-after-version": (b"GET / HTTP/1.1 please\r\n", b"Host: a\r\n\r\n"),
    "bare-cr-in-request-line": (b"GET / HTTP/1.1\r\r\n", b"Host: a\r\n\r\n"),
    "userinfo-in-absolute-form": (b"GET http://user:pw@a.example/ HTTP/1.1\r\n", b"Host: a.example\r\n\r\n"),
    "empty-authority-in-absolute-form": (b"GET http:///x HTTP/1.1\r\n", b"Host: a.example\r\n\r\n"),
    "bad-port-in-absolute-form": (b"GET http://a.example:x/ HTTP/1.1\r\n", b"Host: a.example\r\n\r\n"),
    "obsolete-line-folding": (b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Long: one\r\n two\r\n", b"\r\n"),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost : a.example\r\n", b"\r\n"),
    "field-without-colon": (b"GET / HTTP/1.1\r\nHost a.example\r\n", b"\r\n"),
    "bare-cr-in-value": (b"GET / HTTP/1.1\r\nX-A: one\rtwo\r\n", b"Host: a\r\n\r\n"),
    "nul-in-value": (b"GET / HTTP/1.1\r\nX-A: one\x00two\r\n", b"Host: a\r\n\r\n"),
    "broken-http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSX", b"\r\n\r\n"),
    "http2-preface-with-bare-lf": (b"PRI * HTTP/2.0\n", b"\nSM\n\n"),
}


@pytest.mark.parametrize(("stream", "rest"), REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refused_stream_is_refused_at_the_byte_that_decides_it(stream, rest):
    results = feed_bytewise(stream + rest)
    assert all(result is NEED_DATA for result in results[: len(stream) - 1])
    refusal = results[len(stream) - 1]
    assert isinstance(refusal, NotProtocol)
    assert all(result is refusal for result in results[len(stream) :])
    assert HttpPeeker().feed(stream + rest) == refusal


def test_tls_bytes_are_refused_after_the_first_byte_with_a_reason():
    assert HttpPeeker().feed(CURL_HELLO[:1]) == NotProtocol("byte 0x16 cannot start an HTTP request")


def test_obsolete_line_folding_is_refused_with_a_reason():
    stream = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Long: one\r\n two\r\n\r\n"
    assert HttpPeeker().feed(stream) == NotProtocol("obsolete line folding in the request head")


def test_multiple_host_headers_are_a_bad_request_with_a_reason():
    stream = b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"
    assert HttpPeeker().feed(stream) == BadRequest("more than one Host header", hello_size=len(stream))


def test_a_head_larger_than_the_cap_is_refused_at_the_first_byte_past_it():
    head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n"
    results = feed_bytewise(head)
    assert all(result is NEED_DATA for result in results[:16384])
    assert results[16384] == NotProtocol("request head larger than 16384 bytes")
    assert HttpPeeker().feed(head) == results[16384]


def test_a_head_exactly_max_bytes_long_is_decided():
    head, name = HEADS["browser"]
    assert HttpPeeker(max_bytes=len(head)).feed(head + b"body") == Decision(name=name, hello_size=len(head))
    assert HttpPeeker(max_bytes=len(head) - 1).feed(head) == NotProtocol(
        f"request head larger than {len(head) - 1} bytes"
    )


def test_a_request_line_without_end_is_refused_at_the_cap():
    assert HttpPeeker(max_bytes=100).feed(b"GET /" + b"a" * 200) == NotProtocol("request head larger than 100 bytes")


# --- the 421 and 400 answers -------------------------------------------------


@pytest.mark.parametrize(
    ("response", "status_line"),
    [(MISDIRECTED_REQUEST, b"HTTP/1.1 421 Misdirected Request"), (BAD_REQUEST, b"HTTP/1.1 400 Bad Request")],
    ids=["421", "400"],
)
def test_the_refusal_is_a_complete_response_that_closes(response, status_line):
    head, _, body = response.partition(b"\r\n\r\n")
    status_line_seen, *field_lines = head.split(b"\r\n")
    fields = {}
    for line in field_lines:
        field_name, _, value = line.partition(b":")
        fields[field_name.lower()] = value.strip()
    assert status_line_seen == status_line
    assert fields[b"content-type"] == b"text/plain"
    assert fields[b"connection"] == b"close"
    assert int(fields[b"content-length"]) == len(body)
    assert body.endswith(b"\n")
    assert body.count(b"\n") == 1
    assert len(body) > 1


# --- properties --------------------------------------------------------------

chunk_sizes = st.lists(st.integers(1, 30), min_size=1, max_size=12)

# Pieces that reach every state of the peeker when glued together at random.
HTTPISH = st.lists(
    st.sampled_from(
        [
            b"GET",
            b" ",
            b"/",
            b"*",
            b"HTTP/1.1",
            b"HTTP/1.0",
            b"HTTP/2.0",
            b"\r\n",
            b"\n",
            b"\r",
            b"Host:",
            b"host: ",
            b"a.example",
            b":80",
            b"[::1]",
            b"http://b.example",
            b"PRI",
            b"SM",
            b"\t",
            b"X-A: v",
            b"\x00",
        ]
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=300)
@given(st.binary(max_size=200), chunk_sizes)
def test_arbitrary_bytes_in_arbitrary_chunks_give_the_same_result_as_at_once(data, sizes):
    assert feed_chunked(data, sizes) == HttpPeeker().feed(data)


@settings(max_examples=500)
@given(HTTPISH, chunk_sizes, st.sampled_from([16384, 40, 10]))
def test_http_like_bytes_in_arbitrary_chunks_give_the_same_result_as_at_once(data, sizes, cap):
    assert feed_chunked(data, sizes, max_bytes=cap) == HttpPeeker(max_bytes=cap).feed(data)


label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
host_name = st.lists(label, min_size=1, max_size=4).map(".".join)
field_name = st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True)
field_value = st.from_regex(r"[ -~]{0,30}", fullmatch=True).map(str.strip)


@settings(max_examples=200)
@given(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"PATCH"]),
    host_name,
    st.one_of(st.none(), st.integers(0, 65535)),
    st.lists(st.tuples(field_name, field_value), max_size=5),
    st.integers(0, 5),
    st.sampled_from([b"\r\n", b"\n"]),
    chunk_sizes,
)
def test_generated_requests_in_arbitrary_chunks_give_their_host(method, host, port, fields, host_at, eol, sizes):
    host_value = host if port is None else f"{host}:{port}"
    lines = [f"{name}: {value}".encode() for name, value in fields]
    lines.insert(min(host_at, len(lines)), b"Host: " + host_value.encode())
    head = method + b" /path HTTP/1.1" + eol + b"".join(line + eol for line in lines) + eol
    assert feed_chunked(head + b"trailing body", sizes) == Decision(name=host.lower(), hello_size=len(head))
