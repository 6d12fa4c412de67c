"""Peek at an HTTP/1.x request head for the host it is meant for, incrementally.

``HttpPeeker.feed`` answers ``NEED_DATA`` until the blank line that ends the
request head, then a ``Decision`` carrying the host, or a ``BadRequest`` for a
head whose Host is missing or broken (RFC 9112 §3.2: a 400). Bytes that cannot start an
HTTP request (TLS, SSH banners, binary noise) are ``NotProtocol`` at the first
byte that cannot belong to a method.

Like h11's receive buffer, the peeker remembers where its search for the next
line end stopped, so each byte is scanned once however the stream is cut:

    method (checked byte by byte) -> request line -> field lines -> blank line

Lines end in CRLF or a bare LF (RFC 9112 §2.2 allows a recipient to accept LF).
"""

from __future__ import annotations

import ipaddress
import re

from .peek import NEED_DATA, BadRequest, Decision, NotProtocol, PeekResult

# RFC 9110 §5.6.2: token = 1*tchar. Methods (§9.1) and field names (§5.1) are tokens.
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TCHARS = re.compile(rb"[%s]*" % _TCHAR)
# RFC 9112 §3: request-line = method SP request-target SP HTTP-version; the
# target is anything visible (servers meet raw non-ASCII bytes in the wild).
_REQUEST_LINE = re.compile(rb"[%s]+ ([^\x00-\x20\x7f]+) HTTP/([0-9]\.[0-9])\r?\n" % _TCHAR)
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS, no space before
# the colon. RFC 9110 §5.5: CR, LF and NUL never appear in a value.
_FIELD_LINE = re.compile(rb"([%s]+):([\t\x20-\x7e\x80-\xff]*)\r?\n" % _TCHAR)
_OWS = b" \t"
# RFC 9112 §3.2.2: absolute-form is an absolute URI; its authority (RFC 3986
# §3.2) runs from "//" to the next "/", "?" or "#". Userinfo ("user@"), an
# error in http(s) URIs (RFC 9110 §4.2.4), fails the host grammar below.
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)")
# RFC 9110 §7.2: Host = uri-host [ ":" port ]; uri-host is an IP-literal in
# brackets or a reg-name (RFC 3986 §3.2.2), which also covers IPv4 addresses.
_HOST = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9\-._~!$&'()*+,;=%]+))(?::([0-9]{1,5}))?")

# RFC 9113 §3.4: the connection preface of HTTP/2 with prior knowledge.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP2_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"

# RFC 9110 §15.5.20: 421, the request reached a server that does not serve
# that host. The connection is closed right after, which the header says.
_MISDIRECTED_BODY = b"421 Misdirected Request: this server does not serve that host.\n"
MISDIRECTED_REQUEST: bytes = (
    b"HTTP/1.1 421 Misdirected Request\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n"
    b"\r\n" % len(_MISDIRECTED_BODY)
) + _MISDIRECTED_BODY

# RFC 9110 §15.5.1: 400, the request is malformed; here it names no host, or
# names it wrongly (RFC 9112 §3.2). As nginx does, a short body and a close.
_BAD_REQUEST_BODY = b"400 Bad Request: the request names no valid host.\n"
BAD_REQUEST: bytes = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n"
    b"\r\n" % len(_BAD_REQUEST_BODY)
) + _BAD_REQUEST_BODY


class RequestHeadReader:
    """What both HTTP/1 peekers share (this module's and netstack.connect's): the method checked
    byte by byte, then the head line by line, each byte scanned once, bytes past the cap never read.

    A subclass says what a request line, a field and the end of the head mean
    (``_on_request_line``, ``_on_field``, ``_on_head_end``) and what a malformed or
    oversized head gets (``_malformed``, ``_oversized``); ``_lines_done`` stops the line
    scan early (the HTTP/2 preface) and ``_after_lines`` takes over from there.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._fed = 0
        self._result: PeekResult = NEED_DATA
        self._head = bytearray()
        self._method_checked = 0  # leading bytes known to be tchar
        self._method_done = False
        self._line_start = 0  # where the current, unfinished line starts
        self._scan = 0  # where the search for the next LF resumes
        self._request_line_done = False
        self._lines_done = False

    def feed(self, data: bytes | memoryview) -> PeekResult:
        """Take the next bytes of the client's stream (each byte exactly once)."""
        if self._result is not NEED_DATA:
            return self._result
        # Bytes past the cap are never looked at, so the answer does not depend
        # on how the stream was cut into pieces.
        room = max(self._max_bytes - self._fed, 0)
        self._fed += len(data)
        self._head += memoryview(data)[:room]
        result = self._advance()
        if result is NEED_DATA and self._fed > self._max_bytes:
            # As h11's max_incomplete_event_size: a head that has not ended within the cap never will be read.
            result = self._oversized()
        self._result = result
        return result

    def _advance(self) -> PeekResult:
        if not self._method_done:
            result = self._check_method()
            if result is not NEED_DATA or not self._method_done:
                return result
        while not self._lines_done:
            end = self._head.find(b"\n", self._scan)
            if end < 0:
                self._scan = len(self._head)
                return NEED_DATA
            line = bytes(self._head[self._line_start:end + 1])
            self._line_start = self._scan = end + 1
            result = self._on_line(line)
            if result is not NEED_DATA:
                return result
        return self._after_lines()

    def _check_method(self) -> PeekResult:
        # RFC 9110 §9.1, RFC 9112 §3: the request starts with a token method
        # and one SP. Checking each byte as it comes turns other protocols away
        # at their first byte (0x16 for TLS) or within a few bytes.
        end = _TCHARS.match(self._head, self._method_checked).end()
        self._method_checked = end
        if end == len(self._head):
            return NEED_DATA
        byte = self._head[end]
        if end == 0:
            return NotProtocol(f"byte 0x{byte:02x} cannot start an HTTP request")
        if byte != 0x20:
            return NotProtocol(f"byte 0x{byte:02x} cannot be in an HTTP method")
        self._method_done = True
        return NEED_DATA

    def _on_line(self, line: bytes) -> PeekResult:
        if not self._request_line_done:
            self._request_line_done = True
            return self._on_request_line(line)
        if line in (b"\r\n", b"\n"):
            return self._on_head_end()
        # RFC 9112 §5.2: obsolete line folding may be rejected with a 400.
        if line[0] in _OWS:
            return self._malformed("obsolete line folding in the request head")
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            return self._malformed("malformed header field line")
        return self._on_field(match[1].lower(), match[2].strip(_OWS))

    # What a subclass says.

    def _on_request_line(self, line: bytes) -> PeekResult:
        raise NotImplementedError

    def _on_field(self, name: bytes, value: bytes) -> PeekResult:
        """One field line: its name lowercased, its value without the surrounding whitespace."""
        return NEED_DATA

    def _on_head_end(self) -> PeekResult:
        raise NotImplementedError

    def _after_lines(self) -> PeekResult:
        raise NotImplementedError

    def _malformed(self, reason: str) -> PeekResult:
        raise NotImplementedError

    def _oversized(self) -> PeekResult:
        raise NotImplementedError


class HttpPeeker(RequestHeadReader):
    """Feed the client's bytes in order; get NEED_DATA, a Decision or NotProtocol."""

    def __init__(self, max_bytes: int = 16384) -> None:
        super().__init__(max_bytes)
        self._version = b""
        self._target_name: str | None = None  # from an absolute-form target
        self._host: str | None = None
        self._host_lines = 0
        self._bad_host = ""  # why the Host field is unusable, if it is

    def _malformed(self, reason: str) -> PeekResult:
        return NotProtocol(reason)

    def _oversized(self) -> PeekResult:
        return NotProtocol(f"request head larger than {self._max_bytes} bytes")

    def _on_field(self, name: bytes, value: bytes) -> PeekResult:
        if name != b"host":
            return NEED_DATA
        # RFC 9112 §3.2: more than one Host field line, or an invalid Host
        # value, MUST get a 400 (Bad Request). The answer waits for the end of
        # the head, so that it consumes the whole request.
        self._host_lines += 1
        if self._host_lines > 1:
            self._bad_host = self._bad_host or "more than one Host header"
            return NEED_DATA
        try:
            self._host = _parse_host(value)
        except ValueError as exc:
            self._bad_host = f"invalid Host header: {exc}"
        return NEED_DATA

    def _on_request_line(self, line: bytes) -> PeekResult:
        if line == _HTTP2_PREFACE_LINE:
            self._lines_done = True  # the rest of the preface is not lines
            return NEED_DATA
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            return NotProtocol("malformed request line")
        target, self._version = match[1], match[2]
        # RFC 9112 §2.3: we speak HTTP/1.0 and HTTP/1.1 only.
        if self._version not in (b"1.0", b"1.1"):
            return NotProtocol(f"HTTP version {self._version.decode()} is not 1.0 or 1.1")
        absolute = _ABSOLUTE_FORM.match(target)
        if absolute is None:
            return NEED_DATA
        try:
            self._target_name = _parse_host(absolute[1])
        except ValueError as exc:
            return NotProtocol(f"invalid request target authority: {exc}")
        return NEED_DATA

    def _on_head_end(self) -> PeekResult:
        size = self._line_start
        if self._bad_host:
            return BadRequest(self._bad_host, hello_size=size)
        # RFC 9112 §3.2: a server MUST answer an HTTP/1.1 request without Host
        # with a 400 (Bad Request), even when its target is in absolute-form
        # (the client MUST send Host then too; nginx answers 400 as well).
        if self._host_lines == 0 and self._version == b"1.1":
            return BadRequest("HTTP/1.1 request without Host header", hello_size=size)
        # RFC 9112 §3.2.2: the authority of an absolute-form target wins over Host.
        name = self._target_name or self._host
        if name is None:
            # HTTP/1.0 (RFC 1945) has no Host field; RFC 9112 §3.2 requires
            # it (RFC 9110 §7.2) of HTTP/1.1 requests only.
            # Such a request goes to the fallback; with none, a 400 (there is
            # no host to have been misdirected from, so not a 421).
            return Decision(name=None, hello_size=size, unrouted="refused_bad_request")
        return Decision(name=name, hello_size=size)

    def _after_lines(self) -> PeekResult:
        """After the HTTP/2 preface's first line: the rest of the preface, byte for byte."""
        if not HTTP2_PREFACE.startswith(self._head[: len(HTTP2_PREFACE)]):
            return NotProtocol("broken HTTP/2 connection preface")
        if len(self._head) < len(HTTP2_PREFACE):
            return NEED_DATA
        return Decision(name=None, hello_size=len(HTTP2_PREFACE))


def _parse_host(value: bytes) -> str:
    """The host of a Host value or URI authority: lowercased, no port, no brackets."""
    match = _HOST.fullmatch(value)
    if match is None:
        raise ValueError(f"{value[:64]!r} is not host[:port]")
    literal, reg_name, port = match.groups()
    if port is not None and int(port) > 65535:
        raise ValueError(f"port {port.decode()} out of range")
    return host_of(literal, reg_name)


def host_of(literal: bytes | None, reg_name: bytes | None) -> str:
    """An authority's host (RFC 3986 §3.2.2) as routes name it: an IPv6 literal without its brackets,
    or a name lowercased without its trailing dot; ValueError if it is neither."""
    if literal is not None:
        ipaddress.IPv6Address(literal.decode("ascii"))  # raises ValueError
        return literal.decode("ascii").lower()
    # Names compare case-insensitively; a trailing dot names the same host.
    name = reg_name.decode("ascii").lower() if reg_name is not None else ""
    name = name[:-1] if name.endswith(".") else name
    if not name:
        raise ValueError("empty host")
    return name
