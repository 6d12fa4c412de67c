"""Read the server name out of a QUIC client's Initial packets, and refuse a name with a CONNECTION_CLOSE.

Sans-I/O, like the TLS peeker it feeds: the caller keeps one ``InitialReader``
per peeking flow (a client's 4-tuple) and hands it each UDP payload with
``feed``. Each answer is about that datagram and the flow:

- ``Dropped(reason)``: this datagram is not a client Initial kracauer can read
  (not QUIC, not an Initial, an unknown version, under 1200 bytes, failing
  decryption, another connection's): drop it, count it, never forward it. The
  flow is as it was before.
- ``NEED_DATA``: the datagram carried a valid Initial and is now part of the
  flow's first flight: hold it (to forward once routed) and wait for more.
- ``Decision``: the ClientHello is complete (``netstack.tls.TlsPeeker`` read it,
  as for TCP): route by its name and ALPN, forward every held datagram.
- ``NotProtocol(reason)``: the flow can never be routed (a malformed hello, a
  frame that has no place in an Initial, a cap reached): drop the flow.

What a datagram goes through, each step citing its RFC:

    long header (RFC 9000 §17.2) -> version: v1 or v2 (RFC 9369 §3)
    -> Initial keys from the first DCID (RFC 9001 §5.2, cached per reader)
    -> header protection off (RFC 9001 §5.4) -> AEAD open (RFC 9001 §5.3)
    -> frames (RFC 9000 §19, only those an Initial may hold, §12.4)
    -> CRYPTO data by offset (RFC 9000 §19.6), reassembled across frames,
       packets and datagrams -> contiguous prefix -> TlsPeeker

and coalesced packets (RFC 9000 §12.2) are walked by their Length field.

``build_connection_close`` makes the refusal: a server Initial carrying a
CONNECTION_CLOSE with the TLS alert unrecognized_name (RFC 9001 §4.8),
protected with the server's Initial keys. ``long_header_cids`` and
``short_header_dcid`` read connection IDs from the host's and the client's
later packets (for following the host's chosen CIDs after a NAT rebinding).

Cost (``scripts/bench_quic.py``, one core of the dev box, CPython 3.11,
cryptography 46, best of 5): a new reader and aioquic's one 1200-byte Initial
to a Decision, about 140 µs, of which the Initial key derivation is 20 µs and
the TLS peeker's ClientHello parse about 55 µs; Chromium's first datagram
(many small CRYPTO frames, no decision yet) 130 µs, both datagrams 275 µs; a
datagram that is no long header 4 µs, a forged Initial (keys, failed AEAD)
50 µs; the refusal 7 µs. Frame walking through Buffer is the rest: the first
thing to make faster if the packet loop needs it.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .buffer import Buffer, BufferReadError
from .peek import NEED_DATA, Decision, NeedData, NotProtocol
from .reassembly import StreamBuffer
from .tls import ALERT_UNRECOGNIZED_NAME, TlsPeeker

# ------------------------------------------------------------------ versions

VERSION_1 = 0x00000001
VERSION_2 = 0x6B3343CF


@dataclass(frozen=True, slots=True)
class Version:
    """What differs between QUIC versions for reading and writing Initials."""

    number: int
    salt: bytes
    key_label: bytes
    iv_label: bytes
    hp_label: bytes
    initial_type: int  # the long-header Packet Type bits (first byte, 0x30) of an Initial


VERSIONS: dict[int, Version] = {
    # RFC 9001 §5.2: initial_salt; §5.1: "quic key", "quic iv", "quic hp";
    # RFC 9000 §17.2: Initial is packet type 0b00.
    VERSION_1: Version(VERSION_1, bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
                       b"quic key", b"quic iv", b"quic hp", 0b00),
    # RFC 9369 §3.3.1 salt, §3.3.2 labels, §3.2: Initial is packet type 0b01.
    VERSION_2: Version(VERSION_2, bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
                       b"quicv2 key", b"quicv2 iv", b"quicv2 hp", 0b01),
}

# RFC 9000 §17.2: in version 1 a connection ID is at most 20 bytes (v2 keeps it, RFC 9369 §3).
MAX_CID_LENGTH = 20
# RFC 9000 §7.2: a client's first Destination Connection ID is at least 8 bytes.
MIN_CLIENT_DCID_LENGTH = 8
# RFC 9000 §14.1: a client pads every datagram carrying an Initial to at least
# 1200 bytes, and a server discards smaller ones.
MIN_INITIAL_DATAGRAM = 1200

LONG_HEADER_BIT = 0x80
FIXED_BIT = 0x40
TYPE_BITS = 0x30
# RFC 9000 §17.2: the two reserved bits, under header protection, are zero.
LONG_RESERVED_BITS = 0x0C
PN_LENGTH_BITS = 0x03

AEAD_TAG_SIZE = 16  # AES-128-GCM, RFC 9001 §5.3
SAMPLE_SIZE = 16  # RFC 9001 §5.4.2
MAX_VARINT = (1 << 62) - 1  # RFC 9000 §16

# RFC 9000 §19 frame types an Initial may carry (§12.4, Table 3).
FRAME_PADDING = 0x00
FRAME_PING = 0x01
FRAME_ACK = 0x02
FRAME_ACK_ECN = 0x03
FRAME_CRYPTO = 0x06
FRAME_CONNECTION_CLOSE = 0x1C

# RFC 9001 §4.8: a TLS alert becomes the QUIC error 0x0100 + its code;
# unrecognized_name (112, RFC 8446 §6.2) is 0x0170.
CRYPTO_ERROR_BASE = 0x0100
UNRECOGNIZED_NAME_ERROR = CRYPTO_ERROR_BASE + ALERT_UNRECOGNIZED_NAME

# Why a datagram was dropped (Dropped.reason): short names for counters.
NOT_QUIC = "not_quic"
NOT_INITIAL = "not_initial"
UNSUPPORTED_VERSION = "unsupported_version"
TOO_SMALL = "too_small"
BAD_HEADER = "bad_header"
UNDECRYPTABLE = "undecryptable"
OTHER_CONNECTION = "other_connection"

_UINT32 = struct.Struct("!I")


class QuicError(ValueError):
    """Malformed QUIC bytes: a header, a varint or a frame that does not parse."""


class QuicViolation(QuicError):
    """An authenticated Initial breaks a rule of the protocol (RFC 9000 PROTOCOL_VIOLATION and kin)."""


# ------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class Dropped:
    """This datagram is not one to hold: drop it and count it by ``reason``; the flow is unchanged."""

    reason: str
    detail: str = ""


QuicResult = NeedData | Decision | NotProtocol | Dropped


# ------------------------------------------------------------------ keys


_SHA256_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


class HmacSha256:
    """HMAC-SHA256 (RFC 2104 §2) with the key's pads hashed once, for several messages under one key.

    Why not ``hmac.digest``: with OpenSSL 3 each call sets up a new HMAC
    context, about 4.5 µs, and an Initial key derivation takes five; two
    copied SHA-256 states cost about 2 µs. tests/test_quic.py checks it
    against ``hmac``.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    # RFC 5869 §2.2: PRK = HMAC-Hash(salt, IKM); QUIC's Initial hash is SHA-256 (RFC 9001 §5.2).
    return HmacSha256(salt).digest(ikm)


def hkdf_expand_label(secret: bytes | HmacSha256, label: bytes, context: bytes, length: int) -> bytes:
    # RFC 8446 §7.1: HkdfLabel = uint16 length, opaque label<7..255> = "tls13 " + Label,
    # opaque context<0..255>; then HKDF-Expand (RFC 5869 §2.3). Every output here
    # is at most 32 bytes, one SHA-256 block, so T(1) = HMAC(secret, info || 0x01)
    # is the whole answer.
    if length > hashlib.sha256().digest_size:
        raise ValueError("hkdf_expand_label here makes at most one block")
    full_label = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes((len(full_label),)) + full_label + bytes((len(context),)) + context
    prf = secret if isinstance(secret, HmacSha256) else HmacSha256(secret)
    return prf.digest(info + b"\x01")[:length]


def initial_secrets(dcid: bytes, version: Version) -> tuple[bytes, bytes]:
    """(client_initial_secret, server_initial_secret) for a client's first DCID (RFC 9001 §5.2)."""
    initial_secret = hkdf_extract(version.salt, dcid)
    return (hkdf_expand_label(initial_secret, b"client in", b"", 32),
            hkdf_expand_label(initial_secret, b"server in", b"", 32))


class PacketKeys:
    """One direction's Initial packet protection: AES-128-GCM and AES-ECB header protection."""

    __slots__ = ("key", "iv", "hp", "_aead", "_hp_ecb")

    def __init__(self, secret: bytes, version: Version) -> None:
        # RFC 9001 §5.1 (RFC 9369 §3.3.2 for v2's labels): key, iv and hp from the secret.
        prf = HmacSha256(secret)
        self.key = hkdf_expand_label(prf, version.key_label, b"", 16)
        self.iv = hkdf_expand_label(prf, version.iv_label, b"", 12)
        self.hp = hkdf_expand_label(prf, version.hp_label, b"", 16)
        self._aead = AESGCM(self.key)
        # ECB keeps no state from block to block: one encryptor serves every
        # sample (update() of one block returns that block, no finalize needed).
        self._hp_ecb = Cipher(algorithms.AES(self.hp), modes.ECB()).encryptor()

    def mask(self, sample: bytes | memoryview) -> bytes:
        # RFC 9001 §5.4.3: mask = AES-ECB(hp_key, sample).
        return self._hp_ecb.update(bytes(sample))

    def nonce(self, packet_number: int) -> bytes:
        # RFC 9001 §5.3: the packet number, left-padded to the IV's size, XORed with the IV.
        return (int.from_bytes(self.iv, "big") ^ packet_number).to_bytes(len(self.iv), "big")

    def open(self, packet_number: int, header: bytes, ciphertext: bytes | memoryview) -> bytes:
        """The plaintext, or cryptography's InvalidTag when the packet was not sealed with these keys."""
        return self._aead.decrypt(self.nonce(packet_number), bytes(ciphertext), header)

    def seal(self, packet_number: int, header: bytes, plaintext: bytes) -> bytes:
        return self._aead.encrypt(self.nonce(packet_number), plaintext, header)


class InitialKeys:
    """Both directions' Initial keys for one connection (its client's first DCID and its version).

    The server's half is derived on first use: a reader needs it only to refuse.
    """

    __slots__ = ("version", "dcid", "client", "_initial_secret", "_server")

    def __init__(self, dcid: bytes, version: Version) -> None:
        self.version = version
        self.dcid = bytes(dcid)
        # RFC 9001 §5.2: initial_secret = HKDF-Extract(initial_salt, client_dst_connection_id).
        self._initial_secret = HmacSha256(hkdf_extract(version.salt, self.dcid))
        self.client = PacketKeys(hkdf_expand_label(self._initial_secret, b"client in", b"", 32), version)
        self._server: PacketKeys | None = None

    @property
    def server(self) -> PacketKeys:
        if self._server is None:
            self._server = PacketKeys(hkdf_expand_label(self._initial_secret, b"server in", b"", 32), self.version)
        return self._server


def derive_initial_keys(dcid: bytes, version: int | Version) -> InitialKeys:
    """The client's and the server's Initial keys for a client's first Destination Connection ID."""
    return InitialKeys(dcid, VERSIONS[version] if isinstance(version, int) else version)


# ------------------------------------------------------------------ varints and headers


def pull_varint(buf: Buffer) -> int:
    # RFC 9000 §16: the two high bits of the first byte give the length, 1, 2, 4 or 8 bytes.
    first = buf.pull_uint8()
    size = 1 << (first >> 6)
    value = first & 0x3F
    if size > 1:
        value = (value << (8 * (size - 1))) | int.from_bytes(buf.pull_bytes(size - 1), "big")
    return value


def encode_varint(value: int) -> bytes:
    # RFC 9000 §16: the shortest of the four encodings.
    if value < 0x40:
        return value.to_bytes(1, "big")
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x40000000:
        return (value | 0x80000000).to_bytes(4, "big")
    if value <= MAX_VARINT:
        return (value | 0xC000000000000000).to_bytes(8, "big")
    raise ValueError(f"{value} does not fit a varint")


@dataclass(frozen=True, slots=True)
class LongHeader:
    """The unprotected part of a long header (RFC 9000 §17.2), and where its packet lies in the datagram.

    ``packet_type`` is the raw 2-bit field; compare with ``Version.initial_type``
    (v1 and v2 number the types differently). For an Initial, ``token`` is set
    and ``pn_offset``/``end`` delimit the packet number and the protected
    payload; for other types, only the fields up to the SCID are read, and
    ``pn_offset`` and ``end`` are -1.
    """

    first_byte: int
    version: int
    dcid: bytes
    scid: bytes
    packet_type: int
    start: int = 0
    token: bytes = b""
    pn_offset: int = -1
    end: int = -1

    @property
    def is_initial(self) -> bool:
        known = VERSIONS.get(self.version)
        return known is not None and self.packet_type == known.initial_type


def parse_long_header(data: bytes | memoryview, start: int = 0) -> LongHeader:
    """Parse the long header of the packet at ``start``; raise QuicError when it is not one.

    An Initial of a known version is read to its Length field (RFC 9000
    §17.2.2), so its packet's extent is known; any other long header is read up
    to its connection IDs, which is all the version-independent format has
    (RFC 8999 §5.1).
    """
    buf = Buffer(memoryview(data)[start:])
    try:
        first = buf.pull_uint8()
        if not first & LONG_HEADER_BIT:
            raise QuicError("short header")
        version = buf.pull_uint32()
        dcid = _pull_cid(buf, version)
        scid = _pull_cid(buf, version)
        packet_type = (first & TYPE_BITS) >> 4
        header = LongHeader(first, version, dcid, scid, packet_type, start)
        if version == 0 or not header.is_initial:
            return header
        # RFC 9000 §17.2.2: Token Length (i), Token, Length (i) of packet number and payload.
        token = buf.pull_bytes(pull_varint(buf))
        length = pull_varint(buf)
    except BufferReadError as exc:
        raise QuicError(f"truncated long header: {exc}") from None
    pn_offset = start + buf.tell()
    end = pn_offset + length
    if end > len(data):
        raise QuicError(f"Length {length} runs past the datagram")
    return LongHeader(first, version, dcid, scid, packet_type, start, token, pn_offset, end)


def _pull_cid(buf: Buffer, version: int) -> bytes:
    length = buf.pull_uint8()
    # RFC 9000 §17.2: a v1 packet with a longer CID is dropped. RFC 8999 §5.1
    # lets other versions use up to 255 bytes: those are not ours to judge.
    if length > MAX_CID_LENGTH and version in VERSIONS:
        raise QuicError(f"connection ID of {length} bytes")
    return buf.pull_bytes(length)


def long_header_cids(datagram: bytes | memoryview) -> tuple[int, bytes, bytes] | None:
    """(version, DCID, SCID) of the long-header packet a datagram starts with, or None.

    For the host's packets: its SCID is a connection ID it chose, which the
    client puts in the DCID of its short-header packets (RFC 9000 §5.1, §7.2).
    """
    try:
        header = parse_long_header(datagram)
    except QuicError:
        return None
    return header.version, header.dcid, header.scid


def short_header_dcid(datagram: bytes | memoryview, cid_length: int) -> bytes | None:
    """The Destination Connection ID of a short-header packet whose CID length is known, or None.

    RFC 9000 §17.3: a short header carries no CID length; the receiver knows
    the length of the IDs it issued (here: the host's, learned from its
    long-header SCIDs). RFC 9000 §9: after a NAT rebinding this DCID still
    names the connection.
    """
    if not datagram or datagram[0] & LONG_HEADER_BIT or len(datagram) < 1 + cid_length:
        return None
    return bytes(datagram[1 : 1 + cid_length])


def decode_packet_number(truncated: int, pn_length: int, largest: int) -> int:
    # RFC 9000 §17.1 and Appendix A.3: the packet number closest to largest + 1.
    expected = largest + 1
    window = 1 << (8 * pn_length)
    half = window // 2
    candidate = (expected & ~(window - 1)) | truncated
    if candidate <= expected - half and candidate < (1 << 62) - window:
        return candidate + window
    if candidate > expected + half and candidate >= window:
        return candidate - window
    return candidate


def unprotect(datagram: bytes | memoryview, header: LongHeader, keys: PacketKeys, largest_pn: int = -1
              ) -> tuple[int, bytes]:
    """(packet number, plaintext payload) of an Initial; raise QuicError when it does not decrypt.

    RFC 9001 §5.4.2: the sample starts 4 bytes after the packet number's
    start, as if it were 4 bytes long; §5.4.1: the mask's first byte hides
    the low 4 bits of a long header's first byte, the next ones the packet
    number; §5.3: the AEAD's associated data is the unprotected header.
    """
    data = memoryview(datagram)
    pn_offset = header.pn_offset
    sample_at = pn_offset + 4
    if sample_at + SAMPLE_SIZE > header.end:
        raise QuicError("packet too short to sample for header protection")
    mask = keys.mask(data[sample_at : sample_at + SAMPLE_SIZE])
    first = header.first_byte ^ (mask[0] & 0x0F)
    pn_length = (first & PN_LENGTH_BITS) + 1
    head = bytearray(data[header.start : pn_offset + pn_length])
    head[0] = first
    pn_at = pn_offset - header.start
    for i in range(pn_length):
        head[pn_at + i] ^= mask[1 + i]
    truncated = int.from_bytes(head[pn_at:], "big")
    packet_number = decode_packet_number(truncated, pn_length, largest_pn)
    if header.end - (pn_offset + pn_length) < AEAD_TAG_SIZE:
        raise QuicError("payload shorter than the AEAD tag")
    try:
        plaintext = keys.open(packet_number, bytes(head), data[pn_offset + pn_length : header.end])
    except InvalidTag:
        raise QuicError("AEAD authentication failed") from None
    # RFC 9000 §17.2: nonzero reserved bits, once protection is removed, are a
    # PROTOCOL_VIOLATION (checked after the AEAD, so a forgery cannot trigger it).
    if first & LONG_RESERVED_BITS:
        raise QuicViolation("reserved header bits set")
    return packet_number, plaintext


# ------------------------------------------------------------------ frames


@dataclass(frozen=True, slots=True)
class CryptoFrame:
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClose:
    error_code: int
    frame_type: int
    reason: bytes


@dataclass(frozen=True, slots=True)
class InitialFrames:
    """What an Initial packet's payload carried, as far as kracauer cares."""

    crypto: tuple[CryptoFrame, ...]
    close: ConnectionClose | None
    ack_eliciting: bool


_NONZERO = re.compile(rb"[^\x00]")


def parse_initial_frames(payload: bytes) -> InitialFrames:
    """Read every frame of a decrypted Initial; raise QuicViolation for one that is not allowed there.

    RFC 9000 §12.4, Table 3: an Initial carries only PADDING, PING, ACK,
    CRYPTO and CONNECTION_CLOSE of type 0x1c; anything else, or a payload with
    no frame at all, is a PROTOCOL_VIOLATION.
    """
    if not payload:
        raise QuicViolation("Initial without frames")
    view = memoryview(payload)
    crypto: list[CryptoFrame] = []
    close: ConnectionClose | None = None
    ack_eliciting = False
    pos = 0
    try:
        while pos < len(payload):
            # RFC 9000 §19.1: PADDING is one zero byte, and a client sends
            # hundreds of them: skip each run at once, not byte by byte.
            if payload[pos] == FRAME_PADDING:
                nonzero = _NONZERO.search(payload, pos)
                pos = nonzero.start() if nonzero else len(payload)
                continue
            buf = Buffer(view[pos:])
            # RFC 9000 §12.4: frame types are varints; each allowed one fits a
            # single byte, so a longer encoding is no frame we accept.
            frame_type = buf.pull_uint8()
            if frame_type == FRAME_PING:
                ack_eliciting = True
            elif frame_type in (FRAME_ACK, FRAME_ACK_ECN):
                _skip_ack(buf, frame_type)
            elif frame_type == FRAME_CRYPTO:
                crypto.append(_pull_crypto(buf))
                ack_eliciting = True
            elif frame_type == FRAME_CONNECTION_CLOSE:
                # RFC 9000 §19.19: Error Code (i), Frame Type (i), Reason Phrase Length (i), Reason Phrase.
                error_code = pull_varint(buf)
                offending = pull_varint(buf)
                close = ConnectionClose(error_code, offending, buf.pull_bytes(pull_varint(buf)))
            else:
                raise QuicViolation(f"frame type 0x{frame_type:02x} in an Initial")
            pos += buf.tell()
    except BufferReadError as exc:
        # RFC 9000 §12.4: a frame that does not parse is a FRAME_ENCODING_ERROR.
        raise QuicViolation(f"truncated frame: {exc}") from None
    return InitialFrames(tuple(crypto), close, ack_eliciting)


def _skip_ack(buf: Buffer, frame_type: int) -> None:
    # RFC 9000 §19.3: Largest Acknowledged, ACK Delay, ACK Range Count, First
    # ACK Range, then Range Count (Gap, ACK Range Length) pairs; ACK_ECN adds
    # the ECT0, ECT1 and ECN-CE counts (§19.3.2). The count can claim 2^62
    # ranges: each takes at least two bytes, so a false count runs out of
    # bytes long before it runs out of time.
    pull_varint(buf)
    pull_varint(buf)
    ranges = pull_varint(buf)
    pull_varint(buf)
    for _ in range(ranges):
        pull_varint(buf)
        pull_varint(buf)
    if frame_type == FRAME_ACK_ECN:
        for _ in range(3):
            pull_varint(buf)


def _pull_crypto(buf: Buffer) -> CryptoFrame:
    # RFC 9000 §19.6: Offset (i), Length (i), Crypto Data; offset + length must
    # stay below 2^62 (a FRAME_ENCODING_ERROR otherwise, and not worth holding).
    offset = pull_varint(buf)
    length = pull_varint(buf)
    if offset + length > MAX_VARINT:
        raise QuicViolation("CRYPTO data past 2^62")
    return CryptoFrame(offset, buf.pull_bytes(length))


# ------------------------------------------------------------------ the reader


@dataclass(frozen=True, slots=True)
class InitialPacket:
    """One decrypted Initial packet of a datagram."""

    header: LongHeader
    packet_number: int
    frames: InitialFrames


class InitialReader:
    """One peeking flow's client Initials: feed each datagram, get a ``QuicResult``.

    ``max_bytes`` caps the datagram bytes held (accepted datagrams, which the
    caller keeps to forward) and so the ClientHello, which they carry;
    ``max_datagrams`` caps how many datagrams are held. Either one reached
    without a whole ClientHello is ``NotProtocol``.

    Once the first Initial decrypts, ``version``, ``dcid`` (the client's first
    Destination Connection ID, from which both directions' Initial keys come)
    and ``scid`` (the client's Source Connection ID: the DCID of anything sent
    back) are set. Datagrams of another version or DCID are then
    ``Dropped(OTHER_CONNECTION)``: RFC 9000 §7.2 keeps a client on one DCID
    until it hears from the server, and nothing reaches it while it peeks.
    """

    def __init__(self, max_bytes: int = 16384, max_datagrams: int = 8) -> None:
        self.max_bytes = max_bytes
        self.max_datagrams = max_datagrams
        self.version: int | None = None
        self.dcid: bytes | None = None
        self.scid: bytes | None = None
        self.token: bytes = b""
        self.datagrams = 0  # datagrams held (answered NEED_DATA or the Decision)
        self.bytes_held = 0
        self.largest_pn = -1
        self._keys: InitialKeys | None = None
        self._crypto = StreamBuffer(max_bytes)
        self._tls_fed = 0  # CRYPTO stream bytes handed to the TLS peeker so far
        self._tls = TlsPeeker(max_bytes, record_layer=False)
        self._result: Decision | NotProtocol | None = None

    @property
    def keys(self) -> InitialKeys | None:
        """The flow's Initial keys, once a first Initial decrypted (for ``build_connection_close``)."""
        return self._keys

    def feed(self, datagram: bytes | memoryview) -> QuicResult:
        """Read one UDP payload from the client; see the module docstring for the answers."""
        if self._result is not None:
            return self._result
        opened = self._open(memoryview(datagram))
        if isinstance(opened, (Dropped, NotProtocol)):
            if isinstance(opened, NotProtocol):
                self._result = opened
            return opened
        result = self._take(*opened, len(datagram))
        if result is not NEED_DATA:
            self._result = result
        return result

    def _open(self, data: memoryview) -> tuple[InitialKeys, list[InitialPacket]] | Dropped | NotProtocol:
        """Check the datagram's first packet, then decrypt it and every Initial coalesced after it."""
        try:
            first = parse_long_header(data)
        except QuicError as exc:
            return Dropped(_not_long_header(data), str(exc))
        if first.version not in VERSIONS:
            # Version 0 is a Version Negotiation packet (RFC 9000 §17.2.1), which no client sends first.
            return Dropped(NOT_INITIAL if first.version == 0 else UNSUPPORTED_VERSION, f"version 0x{first.version:08x}")
        if not first.is_initial:
            return Dropped(NOT_INITIAL, f"long-header packet type {first.packet_type}")
        if len(data) < MIN_INITIAL_DATAGRAM:
            return Dropped(TOO_SMALL, f"{len(data)} bytes")
        keys = self._keys_for(first)
        if isinstance(keys, Dropped):
            return keys
        packets: list[InitialPacket] = []
        header: LongHeader | None = first
        largest = self.largest_pn
        while header is not None:
            try:
                packet_number, payload = unprotect(data, header, keys.client, largest)
                frames = parse_initial_frames(payload)
            except QuicViolation as exc:
                return NotProtocol(f"protocol violation in an Initial: {exc}")
            except QuicError as exc:
                if not packets:
                    return Dropped(UNDECRYPTABLE, str(exc))
                break  # RFC 9000 §12.2: each coalesced packet stands alone; this one is discarded
            packets.append(InitialPacket(header, packet_number, frames))
            largest = max(largest, packet_number)
            header = _next_initial(data, header)
        return keys, packets

    def _keys_for(self, header: LongHeader) -> InitialKeys | Dropped:
        keys = self._keys
        if keys is not None:
            if keys.version.number != header.version or keys.dcid != header.dcid:
                return Dropped(OTHER_CONNECTION, "a DCID or version other than the flow's first Initial")
            return keys
        # RFC 9000 §7.2: the client's first DCID is unpredictable and at least 8 bytes.
        if len(header.dcid) < MIN_CLIENT_DCID_LENGTH:
            return Dropped(BAD_HEADER, f"client DCID of {len(header.dcid)} bytes")
        # Derived per datagram until one decrypts: a stranger's junk on the
        # flow's 4-tuple must not pin the keys.
        return derive_initial_keys(header.dcid, header.version)

    def _take(self, keys: InitialKeys, packets: list[InitialPacket], size: int) -> NeedData | Decision | NotProtocol:
        """Hold an authenticated datagram: its CRYPTO data joins the stream, the stream goes to TLS."""
        first = packets[0].header
        if self.bytes_held + size > self.max_bytes:
            return NotProtocol(f"no whole ClientHello in the {self.max_bytes}-byte cap ({self.datagrams} datagrams)")
        if self._keys is None:
            self._keys = keys
            self.version, self.dcid, self.scid, self.token = first.version, first.dcid, first.scid, first.token
        self.largest_pn = max(self.largest_pn, *(p.packet_number for p in packets))
        self.datagrams += 1
        self.bytes_held += size
        for packet in packets:
            if packet.frames.close is not None:
                close = packet.frames.close
                return NotProtocol(f"the client closed the connection (error 0x{close.error_code:x})")
            for frame in packet.frames.crypto:
                rejected = self._add_crypto(frame)
                if rejected is not None:
                    return rejected
        result = self._feed_tls()
        if result is NEED_DATA and self.datagrams >= self.max_datagrams:
            return NotProtocol(f"no whole ClientHello in {self.datagrams} datagrams")
        return result

    def _add_crypto(self, frame: CryptoFrame) -> NotProtocol | None:
        end = frame.offset + len(frame.data)
        if end > self.max_bytes:
            return NotProtocol(f"CRYPTO data up to offset {end}, past the {self.max_bytes}-byte cap")
        # RFC 9000 §19.6 (and §2.2 for streams): retransmitted data at the same
        # offsets must not change; a client whose copies disagree is not one
        # whose hello we could trust (and the host would close the connection).
        if not _agrees(self._crypto, frame.offset, frame.data):
            return NotProtocol(f"CRYPTO data at offset {frame.offset} differs from what arrived before")
        self._crypto.add(frame.offset, frame.data)
        return None

    def _feed_tls(self) -> NeedData | Decision | NotProtocol:
        contiguous = self._crypto.contiguous
        if contiguous <= self._tls_fed:
            return NEED_DATA
        new = memoryview(self._crypto.data)[self._tls_fed : contiguous]
        self._tls_fed = contiguous
        return self._tls.feed(new)  # NEED_DATA, a Decision or NotProtocol: BadRequest is HTTP's only

    def refusal(self, server_scid: bytes, packet_number: int = 0) -> bytes:
        """The CONNECTION_CLOSE datagram refusing this flow's name (see ``build_connection_close``)."""
        if self._keys is None or self.scid is None:
            raise ValueError("no Initial has been read: nothing to refuse")
        return build_connection_close(self._keys, self.scid, server_scid, packet_number=packet_number)


def _not_long_header(data: memoryview) -> str:
    if not data:
        return NOT_QUIC
    if data[0] & LONG_HEADER_BIT:
        return BAD_HEADER
    # RFC 9000 §17.3.1: a short header has the fixed bit set; with it, the
    # datagram may well be QUIC, just no connection's first flight.
    return NOT_INITIAL if data[0] & FIXED_BIT else NOT_QUIC


def _next_initial(data: memoryview, previous: LongHeader) -> LongHeader | None:
    """The next coalesced packet if it is an Initial of the same connection, else None.

    RFC 9000 §12.2: packets follow each other by their Length field; a short
    header can only be last, and what follows an Initial in a client's first
    flight is 0-RTT (none of kracauer's business) or padding. Receivers SHOULD
    ignore coalesced packets with another DCID than the first.
    """
    if previous.end >= len(data):
        return None
    try:
        header = parse_long_header(data, previous.end)
    except QuicError:
        return None
    if not header.is_initial or header.version != previous.version or header.dcid != previous.dcid:
        return None
    return header


def _agrees(stream: StreamBuffer, offset: int, payload: bytes) -> bool:
    """True when the bytes of ``payload`` that already arrived in ``stream`` are the same."""
    end = offset + len(payload)
    for low, high in stream.ranges:
        start, stop = max(low, offset), min(high, end)
        if start < stop and stream.data[start:stop] != payload[start - offset : stop - offset]:
            return False
    return True


# ------------------------------------------------------------------ the refusal


def encode_packet_number(packet_number: int, largest_acked: int | None = None, length: int | None = None) -> bytes:
    # RFC 9000 §17.1 and Appendix A.2: enough bytes for twice the unacknowledged range.
    if length is None:
        unacked = packet_number + 1 if largest_acked is None else packet_number - largest_acked
        length = next(n for n in (1, 2, 3, 4) if unacked < 1 << (8 * n - 1))
    return (packet_number & ((1 << (8 * length)) - 1)).to_bytes(length, "big")


def build_initial(keys: InitialKeys, dcid: bytes, scid: bytes, payload: bytes, *, packet_number: int = 0,
                  server: bool = True, token: bytes = b"", pn_length: int | None = None) -> bytes:
    """One protected Initial packet (RFC 9000 §17.2.2) carrying ``payload`` (frames).

    ``server`` picks the direction's keys; ``pn_length`` forces a packet
    number length (1 to 4 bytes) instead of the shortest safe one.
    """
    version = keys.version
    pn = encode_packet_number(packet_number, length=pn_length)
    # RFC 9001 §5.4.2: the sample needs 4 - pn_length + 16 bytes after the
    # packet number's start: pad with PADDING frames when the frames are shorter.
    payload += bytes(max(4 - len(pn) - len(payload), 0))
    length = len(pn) + len(payload) + AEAD_TAG_SIZE
    first = LONG_HEADER_BIT | FIXED_BIT | (version.initial_type << 4) | (len(pn) - 1)
    header = bytearray(bytes((first,)) + _UINT32.pack(version.number) + bytes((len(dcid),)) + dcid
                       + bytes((len(scid),)) + scid + encode_varint(len(token)) + token
                       + _varint2(length) + pn)
    packet_keys = keys.server if server else keys.client
    sealed = packet_keys.seal(packet_number, bytes(header), payload)
    return _protect_header(header, len(pn), sealed, packet_keys)


def _varint2(value: int) -> bytes:
    # The Length field as a 2-byte varint (RFC 9000 §16), as most stacks write it:
    # fixed-size, so the header is laid out before the payload is sealed.
    if value >= 0x4000:
        raise ValueError(f"Initial payload of {value} bytes")
    return (value | 0x4000).to_bytes(2, "big")


def _protect_header(header: bytearray, pn_length: int, sealed: bytes, keys: PacketKeys) -> bytes:
    # RFC 9001 §5.4.1-§5.4.2: the sample is 16 bytes from 4 bytes past the packet number's start.
    pn_offset = len(header) - pn_length
    packet = header + sealed
    sample_at = pn_offset + 4
    mask = keys.mask(packet[sample_at : sample_at + SAMPLE_SIZE])
    packet[0] ^= mask[0] & 0x0F
    for i in range(pn_length):
        packet[pn_offset + i] ^= mask[1 + i]
    return bytes(packet)


def connection_close_frame(error_code: int, frame_type: int = 0, reason: bytes = b"") -> bytes:
    # RFC 9000 §19.19: type 0x1c (a transport error: RFC 9001 §4.8 carries TLS
    # alerts as transport errors), Error Code, Frame Type, Reason Phrase.
    return (bytes((FRAME_CONNECTION_CLOSE,)) + encode_varint(error_code) + encode_varint(frame_type)
            + encode_varint(len(reason)) + reason)


def build_connection_close(keys: InitialKeys, client_scid: bytes, server_scid: bytes, *,
                           error_code: int = UNRECOGNIZED_NAME_ERROR, reason: bytes = b"",
                           packet_number: int = 0, pad_to: int = 0) -> bytes:
    """A server Initial datagram that closes the connection: refuses the client's name.

    ``keys``: the flow's Initial keys (from the client's first DCID; the
    server's half protects this packet, RFC 9001 §5.2). DCID is the client's
    SCID, SCID is ``server_scid``, a connection ID the caller chose at random
    (RFC 9000 §7.2: the client takes it as the new DCID; here it only has to
    be a well-formed one, 0 to 20 bytes). The error defaults to 0x0170, the TLS
    alert unrecognized_name (RFC 9001 §4.8), with Frame Type CRYPTO (the frame
    that carried the name). RFC 9000 §14.1 asks padding to 1200 bytes only of
    ack-eliciting server Initials, which a CONNECTION_CLOSE is not (§13.2.1),
    so the packet stays small; ``pad_to`` pads it with PADDING frames anyway.
    """
    if len(server_scid) > MAX_CID_LENGTH or len(client_scid) > MAX_CID_LENGTH:
        raise ValueError("connection IDs are at most 20 bytes")
    frames = connection_close_frame(error_code, FRAME_CRYPTO, reason)
    packet = build_initial(keys, client_scid, server_scid, frames, packet_number=packet_number)
    if len(packet) < pad_to:
        packet = build_initial(keys, client_scid, server_scid, frames + bytes(pad_to - len(packet)),
                               packet_number=packet_number)
    return packet


def open_initials(datagram: bytes | memoryview, keys: PacketKeys, largest_pn: int = -1) -> list[InitialPacket]:
    """Decrypt every Initial of a datagram with the given direction's keys (tests, and the server side).

    Raises QuicError when the first packet is no Initial or does not decrypt;
    stops at the first coalesced packet that is not an Initial of the same
    connection or fails.
    """
    data = memoryview(datagram)
    header: LongHeader | None = parse_long_header(data)
    if not header.is_initial:
        raise QuicError("not an Initial")
    packets: list[InitialPacket] = []
    while header is not None:
        try:
            packet_number, payload = unprotect(data, header, keys, largest_pn)
        except QuicError:
            if not packets:
                raise
            break
        packets.append(InitialPacket(header, packet_number, parse_initial_frames(payload)))
        largest_pn = max(largest_pn, packet_number)
        header = _next_initial(data, header)
    return packets
