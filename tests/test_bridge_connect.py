"""netstack.connect for the TLS bridge: the CONNECT an ingress sends its peer, the Forwarded field
(RFC 7239) that carries the client's address, and the reader of the peer's answer head.

The reader is checked three ways, as h11 checks its own (../shared/STYLE.md): the whole input at
once, cut at every byte position (in one byte at a time too), and with trailing bytes that must be
handed back unconsumed in ``rest``.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from netstack.connect import (
    FORWARDED, BadResponse, ConnectPeeker, ResponseHead, ResponseHeadReader, connect_request, format_forwarded,
    parse_forwarded,
)
from netstack.peek import NEED_DATA, Decision

# ---------------------------------------------------------------- the CONNECT an ingress sends


def test_the_connect_request_names_the_authority_twice_and_the_client_once():
    # RFC 9110 §9.3.6: authority-form; §7.2: a client MUST send Host (the same authority).
    assert connect_request("www.example.com", 443, "198.51.100.2") == (
        b"CONNECT www.example.com:443 HTTP/1.1\r\n"
        b"Host: www.example.com:443\r\n"
        b'Forwarded: for="198.51.100.2"\r\n'
        b"\r\n")


def test_an_ipv6_name_is_bracketed_in_the_target_and_in_host():
    # RFC 3986 §3.2.2: an IPv6 literal in an authority is an IP-literal in brackets.
    head = connect_request("2001:db8::10", 8443, "198.51.100.2")
    assert head.startswith(b"CONNECT [2001:db8::10]:8443 HTTP/1.1\r\nHost: [2001:db8::10]:8443\r\n")


@given(name=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True) |
       st.ip_addresses(v=6).map(str),
       port=st.integers(1, 65535), client=st.ip_addresses(v=4))
def test_the_peer_reads_back_what_the_ingress_sends(name, port, client):
    # One parser for both ends: the peer reads the head with the connect listener's peeker.
    head = connect_request(name, port, str(client))
    peeker = ConnectPeeker(keep=[FORWARDED])
    result = peeker.feed(head + b"\x16\x03\x01")  # the client's ClientHello follows in the same read
    assert isinstance(result, Decision)
    assert (result.name, result.port, result.hello_size) == (name, port, len(head))
    assert parse_forwarded(peeker.fields[FORWARDED]) == client


# ---------------------------------------------------------------- Forwarded (RFC 7239)

def test_format_forwarded_quotes_every_node():
    # RFC 7239 §4: value = token / quoted-string; §6: an IPv6 node MUST be quoted, in brackets.
    assert format_forwarded("198.51.100.2") == 'for="198.51.100.2"'
    assert format_forwarded("2001:db8::1") == 'for="[2001:db8::1]"'
    with pytest.raises(ValueError):
        format_forwarded("client.example")  # a node the ingress sends is always an address


@pytest.mark.parametrize("value,client", [
    ('for="198.51.100.2"', "198.51.100.2"),           # §4: a quoted-string
    ("for=198.51.100.2", "198.51.100.2"),             # §4: a token (an IPv4 address is one)
    ("FOR=198.51.100.2", "198.51.100.2"),             # §4: parameter names are case-insensitive
    ("For=198.51.100.2", "198.51.100.2"),
    ('for="198.51.100.2:4711"', "198.51.100.2"),      # §6: node = nodename [ ":" node-port ]
    ('for="198.51.100.2:_port1"', "198.51.100.2"),    # §6.3: an obfuscated port
    ("for=198.51.100.2;proto=https;by=203.0.113.1", "198.51.100.2"),  # §5: other parameters are ignored
    ("proto=https;for=198.51.100.2", "198.51.100.2"),
    (' for=198.51.100.2 ', "198.51.100.2"),
    ('for="\\198.51.100.2"', "198.51.100.2"),         # RFC 9110 §5.6.4: a quoted-pair stands for its octet
])
def test_parse_forwarded_reads_the_client(value, client):
    assert parse_forwarded([value]) == ipaddress.IPv4Address(client)


@pytest.mark.parametrize("values,why", [
    ([], "expected one Forwarded field, got 0"),
    (["for=198.51.100.2", "for=198.51.100.2"], "expected one Forwarded field, got 2"),
    # §4: elements are comma-separated, one per proxy: a chain is not what an ingress sends.
    (["for=198.51.100.2, for=203.0.113.7"], "malformed forwarded-pair"),
    (['for="198.51.100.2, 203.0.113.7"'], "is not an IPv4 address"),
    (["for=198.51.100.2;for=203.0.113.7"], "the parameter for appears twice"),
    (["for=198.51.100.2;FOR=203.0.113.7"], "the parameter for appears twice"),
    # §6: IPv6 and obfuscated or unknown nodes give the host no IPv4 address to see.
    (['for="[2001:db8::1]"'], "is not an IPv4 address"),
    (["for=_hidden"], "is not an IPv4 address"),
    (["for=unknown"], "is not an IPv4 address"),
    (["for=300.1.1.1"], "300"),
    (["for=198.51.100"], "4 octets"),
    (["for=01.2.3.4"], "Leading zeros"),
    (['for="198.51.100.2:"'], "is not an IPv4 address"),
    (["for=198.51.100.2:99999"], "malformed forwarded-pair"),  # ':' is not a tchar: unquoted, no port
    (["proto=https"], "no for= parameter"),
    (["by=203.0.113.1;proto=https"], "no for= parameter"),
    ([""], "malformed forwarded-pair"),
    (['for="198.51.100.2'], "malformed forwarded-pair"),
    (["for = 198.51.100.2"], "malformed forwarded-pair"),  # §4: no whitespace around "="
    (['for="198.51.100.2";'], "malformed forwarded-pair"),
])
def test_parse_forwarded_refuses_anything_but_one_ipv4_client(values, why):
    with pytest.raises(ValueError, match=why):
        parse_forwarded(values)


@given(st.ip_addresses(v=4))
def test_forwarded_round_trips_every_ipv4_address(client):
    assert parse_forwarded([format_forwarded(str(client))]) == client


def test_an_ipv6_client_can_be_formatted_but_is_not_accepted():
    # What the host sees is prefix::client: the client must be IPv4.
    with pytest.raises(ValueError, match="is not an IPv4 address"):
        parse_forwarded([format_forwarded("2001:db8::1")])


# ---------------------------------------------------------------- the peer's answer head

HEAD = b"HTTP/1.1 200 Connection Established\r\nVia: 1.1 kracauer\r\n\r\n"
TUNNEL = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03"  # the server's first TLS bytes


def feed_pieces(pieces: list[bytes], max_bytes: int = 16384):
    """Every result the reader gave, and the reader."""
    reader = ResponseHeadReader(max_bytes)
    return [reader.feed(piece) for piece in pieces], reader


def test_a_whole_head_is_read_at_once():
    [result], reader = feed_pieces([HEAD])
    assert result == ResponseHead(200, "Connection Established", len(HEAD))
    assert reader.rest == b""


def test_the_bytes_after_the_head_are_the_tunnels():
    [result], reader = feed_pieces([HEAD + TUNNEL])
    assert result == ResponseHead(200, "Connection Established", len(HEAD))
    assert reader.rest == TUNNEL


@pytest.mark.parametrize("data", [HEAD, HEAD + TUNNEL])
def test_a_head_cut_at_any_position_gives_the_same_answer_only_at_its_last_byte(data):
    # ATS's tls_bridge: a restartable state machine; the head may be split anywhere, inside the
    # CRLF CRLF too, and the decision comes with the byte that completes it, never before.
    for cut in range(1, len(HEAD)):
        results, reader = feed_pieces([data[:cut], data[cut:]])
        assert results == [NEED_DATA, ResponseHead(200, "Connection Established", len(HEAD))], cut
        assert reader.rest == data[len(HEAD):]


def test_a_head_one_byte_at_a_time_decides_at_its_last_byte():
    results, reader = feed_pieces([HEAD[i:i + 1] for i in range(len(HEAD))])
    assert results[:-1] == [NEED_DATA] * (len(HEAD) - 1)
    assert results[-1] == ResponseHead(200, "Connection Established", len(HEAD))
    assert reader.rest == b""


@given(st.lists(st.integers(1, len(HEAD + TUNNEL) - 1), unique=True, max_size=8))
def test_a_head_cut_into_many_pieces_keeps_the_tunnels_bytes(cuts):
    data = HEAD + TUNNEL
    bounds = [0, *sorted(cuts), len(data)]
    reader = ResponseHeadReader()
    results, fed = [], 0
    for a, b in zip(bounds, bounds[1:]):
        results.append(reader.feed(data[a:b]))
        fed = b
        if results[-1] is not NEED_DATA:
            break
    assert results[-1] == ResponseHead(200, "Connection Established", len(HEAD))
    assert all(r is NEED_DATA for r in results[:-1])
    # What the reader did not take (rest) and what was not fed yet, in order, are the tunnel's bytes.
    assert reader.rest + data[fed:] == TUNNEL


@pytest.mark.parametrize("head,status,reason", [
    (b"HTTP/1.1 200 OK\n\n", 200, "OK"),                       # RFC 9112 §2.2: a bare LF may end a line
    (b"HTTP/1.1 200 OK\r\nX: y\n\r\n", 200, "OK"),
    (b"HTTP/1.0 200 Connection established\r\n\r\n", 200, "Connection established"),
    (b"HTTP/1.1 200 \r\n\r\n", 200, ""),                       # RFC 9112 §4: the reason may be empty
    (b"HTTP/1.1 200\r\n\r\n", 200, ""),                        # ... and its SP missing
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\n", 403, "Forbidden"),
    (b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n", 502, "Bad Gateway"),
])
def test_heads_read(head, status, reason):
    [result], reader = feed_pieces([head + b"rest"])
    assert result == ResponseHead(status, reason, len(head))
    assert reader.rest == b"rest"


STATUS = b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize("before,bad,why", [
    (b"", b"HTTP/2 200 OK\r\n", "malformed status line"),        # RFC 9112 §2.3: HTTP/1.x only
    (b"", b"HTTP/1.1 2000 OK\r\n", "malformed status line"),     # RFC 9112 §4: three digits
    (b"", b"HTTP/1.1 20 OK\r\n", "malformed status line"),
    (b"", b"HTTP/1.1  200 OK\r\n", "malformed status line"),
    (b"", b"http/1.1 200 OK\r\n", "malformed status line"),      # RFC 9112 §2.3: the name is case-sensitive
    (b"", b"HTTP/1.1 200 OK\r\r\n", "malformed status line"),
    (b"", b"HTTP/1.1 200 OK\x00\r\n", "malformed status line"),
    (b"", b"\r\n", "malformed status line"),
    (b"", b"SSH-2.0-OpenSSH_9.2\r\n", "malformed status line"),
    (STATUS, b"no colon\r\n", "malformed header field line"),
    (STATUS, b"X : y\r\n", "malformed header field line"),          # RFC 9112 §5.1: no space before ':'
    (STATUS + b"X: y\r\n", b" folded\r\n", "malformed header field line"),  # RFC 9112 §5.2: obs-fold
    (STATUS, b"X: \x00\r\n", "malformed header field line"),
])
def test_malformed_heads_are_refused_at_the_end_of_the_bad_line(before, bad, why):
    # The answer comes with the bad line's last byte: nothing after it could be trusted to end the head.
    data = before + bad + b"\r\n"
    results, _ = feed_pieces([data[i:i + 1] for i in range(len(before + bad))])
    assert results[:-1] == [NEED_DATA] * (len(before + bad) - 1)
    assert results[-1] == BadResponse(why)
    [result], _ = feed_pieces([data + TUNNEL])
    assert result == BadResponse(why)


def test_a_head_longer_than_the_cap_is_refused_and_one_as_long_is_read():
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    [result], _ = feed_pieces([head], max_bytes=len(head))
    assert result == ResponseHead(200, "OK", len(head))
    # The cap is on the head, not on the read: tunnel bytes after it do not count.
    [result], reader = feed_pieces([head + TUNNEL * 10], max_bytes=len(head))
    assert isinstance(result, ResponseHead) and reader.rest == TUNNEL * 10
    [result], _ = feed_pieces([head], max_bytes=len(head) - 1)
    assert result == BadResponse(f"response head larger than {len(head) - 1} bytes")


def test_an_endless_head_is_refused_once_the_cap_is_passed_without_a_line_end():
    # A peer that never ends a line must not make the ingress buffer without bound.
    reader = ResponseHeadReader(64)
    assert reader.feed(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 40) is NEED_DATA
    assert reader.feed(b"y" * 10) == BadResponse("response head larger than 64 bytes")


def test_feeding_after_the_answer_raises():
    for data in (HEAD, b"garbage\r\n", b"HTTP/1.1 200 OK\r\n" + b"x" * 20):
        reader = ResponseHeadReader(32)
        assert reader.feed(data) is not NEED_DATA
        with pytest.raises(RuntimeError, match="the rest belongs to the tunnel"):
            reader.feed(b"more")


def test_a_memoryview_is_read_as_bytes():
    reader = ResponseHeadReader()
    assert reader.feed(memoryview(HEAD + TUNNEL)) == ResponseHead(200, "Connection Established", len(HEAD))
    assert reader.rest == TUNNEL and isinstance(reader.rest, bytes)
