"""Peek at an explicit proxy's CONNECT request head, incrementally; and what the proxy answers.

A client told to use an HTTP proxy opens a tunnel with a request head
(RFC 9110 §9.3.6), here as curl sends it::

    CONNECT www.example.com:443 HTTP/1.1
    Host: www.example.com:443
    User-Agent: curl/7.88.1
    Proxy-Connection: Keep-Alive
    <blank line>

and once the proxy answers 2xx it speaks to the service through the tunnel
(its TLS ClientHello first). ``ConnectPeeker.feed`` answers ``NEED_DATA``
until the blank line that ends the head, then

- a ``Decision``: the authority's host as the name (lowercased, no trailing
  dot, an IPv6 literal without its brackets), its port, and the head's length,
  which is where the tunnelled bytes begin;
- a ``BadRequest`` for a head to be answered and closed: 400 for a malformed
  one or one larger than the cap, 501 for another method (``outcome`` says
  which);
- ``NotProtocol`` for bytes that cannot start an HTTP request at all (a TLS
  ClientHello sent to the proxy port directly), reset as on an http listener.

The head is all kracauer reads: fields are checked for syntax and otherwise
ignored (``Host``, RFC 9110 §7.2, repeats the authority; ``Proxy-Authorization``
is not checked: who may use the proxy is decided by the client's address),
except those named in ``keep``, whose values are collected in ``fields`` for
a caller that needs them (the bridge peer of ../shared/design/bridge.md reads
``Forwarded``). The same peeker serves wherever a CONNECT head is read: the
TUN listener and, later, the bridge's relay and peer.

It reads the head with ``netstack.http.RequestHeadReader``, as
``netstack.http.HttpPeeker`` does (and like h11's receive buffer it remembers
where its search for the next line end stopped, so each byte is scanned once
however the stream is cut):

    method (checked byte by byte) -> request line -> field lines -> blank line
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable

from .http import _FIELD_LINE, _OWS, _TCHAR, RequestHeadReader, host_of
from .peek import NEED_DATA, BadRequest, Decision, NeedData, PeekResult

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version, lines
# ending in CRLF or a bare LF (§2.2 lets a recipient accept LF alone).
_REQUEST_LINE = re.compile(rb"([%s]+) ([^\x00-\x20\x7f]+) HTTP/([0-9]\.[0-9])\r?\n" % _TCHAR)
# RFC 9112 §3.2.3: authority-form = uri-host ":" port, where uri-host is an
# IP-literal in brackets or a reg-name (RFC 3986 §3.2.2, which covers IPv4
# addresses too) and port = *DIGIT (§3.2.3); no userinfo, no path.
_AUTHORITY = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9\-._~!$&'()*+,;=%]+)):([0-9]*)")

METHOD = b"CONNECT"

# RFC 9110 §9.3.6: any 2xx turns the connection into a tunnel; a 2xx answer
# to CONNECT MUST NOT carry Content-Length or Transfer-Encoding.
CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


def _refusal(status: bytes, body: bytes) -> bytes:
    """A complete answer with a short text body; the connection is closed after it, which it says."""
    return (b"HTTP/1.1 %s\r\n"
            b"Content-Type: text/plain\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n"
            b"\r\n" % (status, len(body))) + body


# RFC 9110 §15.5.1: 400, a malformed request (RFC 9110 §9.3.6: also a CONNECT
# whose port is empty or invalid), or a head that does not end within the cap.
BAD_REQUEST = _refusal(b"400 Bad Request", b"400 Bad Request: malformed CONNECT request.\n")
# RFC 9110 §15.5.4: 403, understood but refused: the client's address is not
# one this proxy serves, the port is not allowed, or no route takes the name.
FORBIDDEN_CLIENT = _refusal(b"403 Forbidden", b"403 Forbidden: this proxy does not serve your address.\n")
FORBIDDEN_PORT = _refusal(b"403 Forbidden", b"403 Forbidden: tunnels to that port are not allowed.\n")
FORBIDDEN_NAME = _refusal(b"403 Forbidden", b"403 Forbidden: no route for that name.\n")
# RFC 9110 §15.6.2: 501, the method is not one this server implements (methods
# are case-sensitive, §9.1: "connect" is not CONNECT). The proxy only tunnels.
NOT_IMPLEMENTED = _refusal(b"501 Not Implemented", b"501 Not Implemented: this proxy only tunnels (CONNECT).\n")
# RFC 9110 §15.6.3: 502, the proxy could not get a connection from the host.
BAD_GATEWAY = _refusal(b"502 Bad Gateway", b"502 Bad Gateway: the host did not accept the connection.\n")


class ConnectPeeker(RequestHeadReader):
    """Feed the client's bytes in order; get NEED_DATA, a Decision, a BadRequest or NotProtocol."""

    def __init__(self, max_bytes: int = 16384, keep: Iterable[str] = ()) -> None:
        super().__init__(max_bytes)
        self._keep = frozenset(name.lower().encode("ascii") for name in keep)
        #: The values of the fields named in ``keep`` (by lowercased name), in order of arrival.
        self.fields: dict[str, list[str]] = {}
        self._method = b""
        self._target: tuple[str, int] | None = None
        self._bad_target = ""  # why the request target is unusable, if it is

    # Refused part way through the head: hello_size is what was read up to the end of the bad line.

    def _malformed(self, reason: str) -> PeekResult:
        return BadRequest(reason, hello_size=self._line_start)

    def _oversized(self) -> PeekResult:
        return BadRequest(f"request head larger than {self._max_bytes} bytes", hello_size=self._max_bytes)

    def _on_field(self, name: bytes, value: bytes) -> PeekResult:
        if name in self._keep:
            self.fields.setdefault(name.decode("ascii"), []).append(value.decode("latin-1"))
        return NEED_DATA

    def _on_request_line(self, line: bytes) -> PeekResult:
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            # Nothing after a broken request line can be trusted to end a head: answered at once.
            return self._malformed("malformed request line")
        self._method, target, version = match.groups()
        # RFC 9112 §2.3: we speak HTTP/1.0 and HTTP/1.1 only.
        if version not in (b"1.0", b"1.1"):
            return self._malformed(f"HTTP version {version.decode()} is not 1.0 or 1.1")
        if self._method != METHOD:
            return NEED_DATA  # answered (501) once the head is complete
        try:
            self._target = parse_authority(target)
        except ValueError as exc:
            self._bad_target = f"invalid CONNECT target: {exc}"
        return NEED_DATA

    def _on_head_end(self) -> PeekResult:
        # The answer waits for the end of the head so that it consumes the whole request.
        size = self._line_start
        if self._method != METHOD:
            return BadRequest(f"method {self._method.decode('ascii')[:32]} is not CONNECT", hello_size=size,
                              outcome="refused_method")
        if self._target is None:
            return BadRequest(self._bad_target, hello_size=size)
        host, port = self._target
        return Decision(name=host, hello_size=size, port=port)


def parse_authority(value: bytes) -> tuple[str, int]:
    """A CONNECT target's host (lowercased, no trailing dot, no brackets) and port; ValueError if it is not one.

    RFC 9110 §9.3.6: the target is only the host and port of the tunnel's
    destination, and a server MUST reject an empty or invalid port with a 400.
    """
    match = _AUTHORITY.fullmatch(value)
    if match is None:
        raise ValueError(f"{value[:64]!r} is not host:port")
    literal, reg_name, port = match.groups()
    if not port:
        raise ValueError("no port")
    if len(port) > 5 or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port[:8].decode()} out of range")
    return host_of(literal, reg_name), int(port)


@dataclass(frozen=True, slots=True)
class ConnectPolicy:
    """Who may open tunnels through a connect listener, and to which ports: never an open proxy.

    ``allow``: the client networks, as (network, netmask) pairs of 32-bit
    integers; empty allows nobody. ``ports``: the ports a CONNECT may name.
    """

    allow: tuple[tuple[int, int], ...]
    ports: frozenset[int] = frozenset({443})

    @classmethod
    def of(cls, networks: Iterable[ipaddress.IPv4Network], ports: Iterable[int] = (443,)) -> ConnectPolicy:
        return cls(tuple((int(n.network_address), int(n.netmask)) for n in networks), frozenset(ports))

    def allows(self, client: bytes) -> bool:
        """Whether the IPv4 address `client` (4 bytes) lies in one of the allowed networks."""
        address = int.from_bytes(client, "big")
        return any(address & mask == network for network, mask in self.allow)


# ---------------------------------------------------------------- the bridge
#
# ../shared/design/bridge.md: an ingress kracauer repeats a client's tunnel as
# CONNECT to its peer kracauer, with the client's address in a Forwarded field
# (RFC 7239), and reads the peer's answer head before it relays the tunnel.

FORWARDED = "forwarded"


def connect_request(name: str, port: int, client: str) -> bytes:
    """The head an ingress sends its peer: RFC 9110 §9.3.6 authority-form, Host, and Forwarded.

    RFC 9110 §7.2: a client MUST send Host, here the same authority. RFC 7239
    §4/§5.2: ``for=`` names the node that made the request; an IPv4 address may
    be a token, but a quoted-string is always allowed (§4, value = token /
    quoted-string), and quoting every value keeps one form for IPv4 and IPv6
    (which §6 requires quoted, in brackets).
    """
    host = f"[{name}]" if ":" in name else name
    authority = f"{host}:{port}"
    return (f"CONNECT {authority} HTTP/1.1\r\n"
            f"Host: {authority}\r\n"
            f"Forwarded: {format_forwarded(client)}\r\n"
            f"\r\n").encode("ascii")


def format_forwarded(client: str) -> str:
    """RFC 7239 §4 forwarded-element with one pair: ``for="198.51.100.2"`` (IPv6 as ``for="[2001:db8::1]"``)."""
    address = ipaddress.ip_address(client)
    node = f"[{address}]" if address.version == 6 else str(address)
    return f'for="{node}"'


# RFC 7239 §4: forwarded-pair = token "=" value; value = token / quoted-string
# (RFC 7230 §3.2.6: quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE).
_PAIR = re.compile(r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)=(?:"((?:[^"\\]|\\.)*)"|([!#$%&\'*+\-.^_`|~0-9A-Za-z]+))\s*')
# RFC 7239 §6: node = nodename [ ":" node-port ]; an IPv6 nodename in brackets.
_NODE = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+))(?::([0-9]{1,5}|_[0-9A-Za-z._-]+))?")


def parse_forwarded(values: list[str]) -> ipaddress.IPv4Address:
    """The client's IPv4 address from the Forwarded field(s) of a bridge CONNECT; ValueError if there is not exactly one.

    The peer trusts it only because the ingress box that sent it proved who
    it is with a client certificate. It must be one field with one element
    (RFC 7239 §4: elements are comma-separated, one per proxy) whose ``for``
    is an IPv4 address: a chain or an obfuscated or IPv6 node is not what an
    ingress kracauer sends, and the host must see a real client address.
    """
    if len(values) != 1:
        raise ValueError(f"expected one Forwarded field, got {len(values)}")
    element = values[0]
    pairs: dict[str, str] = {}
    for part in element.split(";"):
        match = _PAIR.fullmatch(part)
        if match is None:
            raise ValueError(f"malformed forwarded-pair {part[:64]!r}")
        key = match[1].lower()  # RFC 7239 §4: parameter names are case-insensitive
        if key in pairs:
            raise ValueError(f"the parameter {key} appears twice")
        value = match[2] if match[2] is not None else match[3]
        pairs[key] = re.sub(r"\\(.)", r"\1", value)
    node = pairs.get("for")
    if node is None:
        raise ValueError("no for= parameter")
    match = _NODE.fullmatch(node)
    if match is None or match[1] is not None:
        raise ValueError(f"for={node[:64]!r} is not an IPv4 address")
    return ipaddress.IPv4Address(match[2])  # raises ValueError for 300.1.1.1


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The peer's complete answer head: its status and its length (the tunnel's bytes start after it)."""

    status: int
    reason: str
    size: int


@dataclass(frozen=True, slots=True)
class BadResponse:
    """An answer that is not an HTTP/1.x response head, or one longer than the cap."""

    reason: str


# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]. The SP before
# an empty reason may be missing (as h11 accepts), but a status code is three digits and no more.
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r?\n")


class ResponseHeadReader:
    """Feed the peer's bytes as they arrive; NEED_DATA, then a ResponseHead or a BadResponse.

    ATS's tls_bridge recognises the end of the peer's response head with a
    restartable state machine; so does this (and like h11 it remembers where
    its search stopped): the head may arrive split anywhere, even inside the
    CRLF CRLF, and the bytes after it in the same read belong to the tunnel
    (``rest`` after a ResponseHead).
    """

    def __init__(self, max_bytes: int = 16384) -> None:
        self._max_bytes = max_bytes
        self._buf = bytearray()
        self._scan = 0
        self._line_start = 0
        self._status: tuple[int, str] | None = None
        self._result: NeedData | ResponseHead | BadResponse = NEED_DATA
        #: After a ResponseHead: the bytes that followed it (the tunnel's first bytes).
        self.rest = b""

    def feed(self, data: bytes | memoryview) -> "NeedData | ResponseHead | BadResponse":
        if self._result is not NEED_DATA:
            raise RuntimeError("the response head is complete; the rest belongs to the tunnel")
        self._buf += data
        self._result = result = self._advance()
        if result is NEED_DATA and len(self._buf) > self._max_bytes:
            self._result = result = BadResponse(f"response head larger than {self._max_bytes} bytes")
        return result

    def _advance(self) -> "NeedData | ResponseHead | BadResponse":
        while True:
            end = self._buf.find(b"\n", self._scan)
            if end < 0:
                self._scan = len(self._buf)
                return NEED_DATA
            if end >= self._max_bytes:
                return BadResponse(f"response head larger than {self._max_bytes} bytes")
            line = bytes(self._buf[self._line_start:end + 1])
            self._line_start = self._scan = end + 1
            if self._status is None:
                match = _STATUS_LINE.fullmatch(line)
                if match is None:
                    return BadResponse("malformed status line")
                self._status = (int(match[1]), (match[2] or b"").decode("latin-1"))
                continue
            if line in (b"\r\n", b"\n"):
                size = self._line_start
                self.rest = bytes(self._buf[size:])
                self._buf.clear()
                return ResponseHead(self._status[0], self._status[1], size)
            if line[0] in _OWS or _FIELD_LINE.fullmatch(line) is None:
                return BadResponse("malformed header field line")
