"""Peek at a TLS ClientHello for the server name and ALPN list, incrementally.

``TlsPeeker.feed`` takes the client's stream in whatever pieces TCP delivers and
answers ``NEED_DATA`` until the whole ClientHello handshake message is in, then
a ``Decision``. Anything that cannot be the start of a TLS connection is
``NotProtocol`` at the first byte that proves it, so a stray protocol is reset
without buffering.

The stream is read as a small state machine, each byte once:

    record header (5 bytes) -> record payload -> record header -> ...

Record payloads are appended to the handshake message until its 4-byte header
and then its whole body are in; only then is the ClientHello parsed, with a
``Buffer`` cursor. Bytes after the ClientHello are not looked at.

QUIC carries the handshake without the record layer (RFC 9001 §4: CRYPTO
frames hold the handshake messages themselves): ``TlsPeeker(record_layer=False)``
reads the stream as handshake messages straight away, with the same checks,
caps and parser (``netstack.quic`` feeds it the reassembled CRYPTO stream).
"""

from __future__ import annotations

import re
import struct

from .buffer import Buffer, BufferReadError
from .peek import NEED_DATA, Decision, NotProtocol, PeekResult

# RFC 8446 §5.1: TLSPlaintext header: content type, legacy_record_version, length.
RECORD_HEADER = struct.Struct("!BHH")
CONTENT_TYPE_ALERT = 21
CONTENT_TYPE_HANDSHAKE = 22
# RFC 8446 §5.1 caps a plaintext record at 2^14 bytes; we allow up to the
# ciphertext bound 2^14 + 256 and leave the finer judgement to the host's TLS.
MAX_RECORD_LENGTH = 2**14 + 256

HANDSHAKE_HEADER_SIZE = 4  # msg_type (1) + length (3), RFC 8446 §4
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
EXTENSION_ALPN = 16
NAME_TYPE_HOST_NAME = 0

# RFC 8446 §6 and §6.2: a fatal (2) unrecognized_name (112) alert, sent in the
# clear before any key exchange, so in a plaintext record.
ALERT_LEVEL_FATAL = 2
ALERT_UNRECOGNIZED_NAME = 112
UNRECOGNIZED_NAME_ALERT: bytes = RECORD_HEADER.pack(CONTENT_TYPE_ALERT, 0x0303, 2) + bytes(
    (ALERT_LEVEL_FATAL, ALERT_UNRECOGNIZED_NAME)
)

# RFC 6066 §3: HostName is an ASCII DNS name. We take any visible ASCII (so
# underscores and the like pass) and leave the real check to the route table.
_HOST_NAME = re.compile(rb"[\x21-\x7e]+")


class ClientHelloError(ValueError):
    """The ClientHello is complete but its structure is malformed."""


class TlsPeeker:
    """Feed the client's bytes in order; get NEED_DATA, a Decision or NotProtocol."""

    def __init__(self, max_bytes: int = 16384, *, record_layer: bool = True) -> None:
        self._max_bytes = max_bytes
        # False: the stream is the handshake messages themselves (QUIC's CRYPTO
        # stream, RFC 9001 §4), with no TLS record header to read.
        self._record_layer = record_layer
        self._fed = 0
        self._result: PeekResult = NEED_DATA
        self._record_header = bytearray()  # the part of a record header read so far
        self._record_left = 0  # payload bytes of the current record still to come
        self._records = 0
        self._message = bytearray()  # handshake bytes collected from record payloads
        self._message_size = 0  # header + body, known once the 4-byte header is in

    def feed(self, data: bytes | memoryview) -> PeekResult:
        """Take the next bytes of the client's stream (each byte exactly once)."""
        if self._result is not NEED_DATA:
            return self._result
        # Bytes past the cap are never looked at, so the answer does not depend
        # on how the stream was cut into pieces.
        room = max(self._max_bytes - self._fed, 0)
        self._fed += len(data)
        result = self._consume(memoryview(data)[:room])
        if result is NEED_DATA and self._fed > self._max_bytes:
            result = NotProtocol(f"hello larger than {self._max_bytes} bytes")
        self._result = result
        return result

    def _consume(self, data: memoryview) -> PeekResult:
        pos = 0
        result: PeekResult = NEED_DATA
        while pos < len(data) and result is NEED_DATA:
            if not self._record_layer:
                n = min(self._message_wanted(), len(data) - pos)
                self._message += data[pos : pos + n]
                result = self._check_message()
            elif self._record_left:
                n = min(self._message_wanted(), self._record_left, len(data) - pos)
                self._message += data[pos : pos + n]
                self._record_left -= n
                result = self._check_message()
            else:
                n = min(RECORD_HEADER.size - len(self._record_header), len(data) - pos)
                self._record_header += data[pos : pos + n]
                result = self._check_record_header()
            pos += n
        return result

    def _check_record_header(self) -> PeekResult:
        header = self._record_header
        # RFC 8446 §5.1: the ClientHello travels in handshake records; any
        # other content type before it is complete is not a TLS client.
        if header[0] != CONTENT_TYPE_HANDSHAKE:
            return NotProtocol(self._wrong_record_type(header[0]))
        # RFC 8446 §5.1, Appendix D: legacy_record_version is 0x03XX.
        if len(header) >= 2 and header[1] != 3:
            return NotProtocol(f"record version major byte {header[1]} is not 3")
        if len(header) < RECORD_HEADER.size:
            return NEED_DATA
        _, _, length = RECORD_HEADER.unpack(header)
        # RFC 8446 §5.1: no zero-length handshake fragments; bounded length.
        if length == 0 or length > MAX_RECORD_LENGTH:
            return NotProtocol(f"record length {length} out of range")
        self._record_header.clear()
        self._record_left = length
        self._records += 1
        return NEED_DATA

    def _wrong_record_type(self, content_type: int) -> str:
        if self._records:
            return f"record of type {content_type} before the ClientHello was complete"
        # RFC 5246 Appendix E.2: an SSLv2-compatible hello starts with a
        # 2-byte length whose high bit is set.
        if content_type & 0x80:
            return "SSLv2-compatible hello"
        return f"first byte 0x{content_type:02x} is not a TLS handshake record"

    def _message_wanted(self) -> int:
        """Handshake bytes still needed before the next check can run."""
        if not self._message:
            return 1  # the message type alone already decides a lot
        return (self._message_size or HANDSHAKE_HEADER_SIZE) - len(self._message)

    def _check_message(self) -> PeekResult:
        message = self._message
        if not self._message_size:
            # RFC 8446 §4.1.2: a client's first handshake message is its ClientHello.
            if message[0] != HANDSHAKE_CLIENT_HELLO:
                return NotProtocol(f"handshake message type {message[0]} is not client_hello")
            if len(message) < HANDSHAKE_HEADER_SIZE:
                return NEED_DATA
            self._message_size = HANDSHAKE_HEADER_SIZE + int.from_bytes(message[1:4], "big")
            # It could never fit (record headers come on top): say so now
            # rather than after buffering max_bytes.
            if self._message_size > self._max_bytes:
                return NotProtocol(f"hello larger than {self._max_bytes} bytes")
        if len(message) < self._message_size:
            return NEED_DATA
        try:
            name, alpn = parse_client_hello(bytes(message[HANDSHAKE_HEADER_SIZE:]))
        except (BufferReadError, ClientHelloError) as exc:
            return NotProtocol(f"malformed ClientHello: {exc}")
        return Decision(name=name, alpn=alpn, hello_size=self._message_size, records=self._records)


def parse_client_hello(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    """Return (server name, ALPN protocols) of a ClientHello body (no 4-byte header).

    Raises BufferReadError or ClientHelloError when the structure is malformed.
    """
    buf = Buffer(body)
    # RFC 8446 §4.1.2 (RFC 5246 §7.4.1.2 for TLS 1.2): legacy_version, random,
    # legacy_session_id<0..32>, cipher_suites<2..2^16-2>,
    # legacy_compression_methods<1..2^8-1>, extensions.
    legacy_version = buf.pull_uint16()
    if legacy_version >> 8 != 3:
        raise ClientHelloError(f"legacy_version 0x{legacy_version:04x}")
    buf.pull_bytes(32)
    with buf.pull_block(1) as length:
        if length > 32:
            raise ClientHelloError(f"legacy_session_id of {length} bytes")
        buf.pull_bytes(length)
    with buf.pull_block(2) as length:
        if length < 2 or length % 2:
            raise ClientHelloError(f"cipher_suites of {length} bytes")
        buf.pull_bytes(length)
    with buf.pull_block(1) as length:
        if length < 1:
            raise ClientHelloError("no compression methods")
        buf.pull_bytes(length)
    # RFC 5246 §7.4.1.2: a TLS 1.2 hello may stop here, with no extensions.
    if buf.eof():
        return None, ()
    extensions = _pull_extensions(buf)
    if not buf.eof():
        raise ClientHelloError("bytes after the extensions")
    name = _parse_server_name(extensions[EXTENSION_SERVER_NAME]) if EXTENSION_SERVER_NAME in extensions else None
    alpn = _parse_alpn(extensions[EXTENSION_ALPN]) if EXTENSION_ALPN in extensions else ()
    return name, alpn


def _pull_extensions(buf: Buffer) -> dict[int, bytes]:
    # RFC 8446 §4.2: Extension extensions<..2^16-1>, each a type and opaque data.
    # GREASE types (RFC 8701 §2) are unknown types like any other: kept, unused.
    extensions: dict[int, bytes] = {}
    with buf.pull_block(2):
        while not buf.eof():
            extension_type = buf.pull_uint16()
            with buf.pull_block(2) as length:
                data = buf.pull_bytes(length)
            # RFC 8446 §4.2: no more than one extension of the same type.
            if extension_type in extensions:
                raise ClientHelloError(f"duplicate extension {extension_type}")
            extensions[extension_type] = data
    return extensions


def _parse_server_name(data: bytes) -> str | None:
    # RFC 6066 §3: ServerName server_name_list<1..2^16-1>; each entry is a
    # name_type and, for host_name(0), HostName<1..2^16-1>. No two entries of
    # the same type. Other name types are undefined; their entries are skipped.
    buf = Buffer(data)
    host_name: bytes | None = None
    with buf.pull_block(2) as length:
        if length == 0:
            raise ClientHelloError("empty server_name_list")
        while not buf.eof():
            name_type = buf.pull_uint8()
            with buf.pull_block(2) as length:
                name = buf.pull_bytes(length)
            if name_type != NAME_TYPE_HOST_NAME:
                continue
            if host_name is not None:
                raise ClientHelloError("two host_name entries")
            host_name = name
    if not buf.eof():
        raise ClientHelloError("bytes after server_name_list")
    return None if host_name is None else _normalize_host_name(host_name)


def _normalize_host_name(raw: bytes) -> str:
    if not _HOST_NAME.fullmatch(raw):
        raise ClientHelloError(f"host_name {raw!r} is not visible ASCII")
    # Names compare case-insensitively (RFC 4343); a trailing dot (absolute
    # form, which RFC 6066 §3 forbids but clients send) names the same host.
    name = raw.decode("ascii").lower()
    name = name[:-1] if name.endswith(".") else name
    if not name:
        raise ClientHelloError("host_name is only a dot")
    return name


def _parse_alpn(data: bytes) -> tuple[str, ...]:
    # RFC 7301 §3.1: ProtocolName protocol_name_list<2..2^16-1>, each
    # ProtocolName<1..2^8-1> (so never empty).
    buf = Buffer(data)
    protocols = []
    with buf.pull_block(2) as length:
        if length < 2:
            raise ClientHelloError("empty ALPN protocol_name_list")
        while not buf.eof():
            with buf.pull_block(1) as length:
                if length == 0:
                    raise ClientHelloError("empty ALPN protocol name")
                name = buf.pull_bytes(length)
            # RFC 8701 §2: GREASE ALPN ids exist only to be ignored; no route
            # should ever see one. latin-1 maps every byte, so decoding cannot fail.
            if not _is_grease(name):
                protocols.append(name.decode("latin-1"))
    if not buf.eof():
        raise ClientHelloError("bytes after protocol_name_list")
    return tuple(protocols)


def _is_grease(value: bytes) -> bool:
    # RFC 8701 §2: 0x0A0A, 0x1A1A, ..., 0xFAFA.
    return len(value) == 2 and value[0] == value[1] and value[0] & 0x0F == 0x0A
