"""The agent tunnel's wire format: length-prefixed frames over one TLS stream (sans-I/O).

An agent (``kracauer agent``, on a host behind NAT) dials the box, and both
ends then exchange frames over that one TLS 1.3 connection
(../shared/design/agents.md). A frame is::

    +------+----------------+------------------------+
    | type | length (u16 BE)| body (length bytes)    |
    +------+----------------+------------------------+

- ``PACKET``: one IPv6 packet, as read from (or to be written into) a TUN.
  The body is the packet and nothing else; a TUN packet never exceeds the
  MTU, which is at most 65535 (RFC 8200 section 5 for the floor of 1280), so
  a u16 length bounds every frame without a separate check.
- control frames (``HELLO``, ``REGISTERED``, ``ERROR``, ``KEEPALIVE``,
  ``BYE``): a JSON object, at most ``CONTROL_MAX`` bytes. JSON is plenty for
  a few messages per connection and keeps them readable in a capture.

The conversation::

    agent                                   box
    HELLO {version, token, names}   ──▶
                                    ◀──     REGISTERED {address, prefixes, mtu, keepalive}
                                            or ERROR {reason, message, retry} and close
    PACKET ... ⇄ PACKET ...
    KEEPALIVE {} ⇄ KEEPALIVE {}             (every `keepalive` seconds; silence for
                                             3 x keepalive ends the tunnel)
    BYE {reason}                    ──▶     (either side, then close)

``FrameDecoder`` follows h11's shape: ``receive_data`` only buffers,
``next_frame`` returns a ``Frame`` or None (need more bytes), and malformed
input raises ``FrameError`` once, with what was wrong.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PACKET", "HELLO", "REGISTERED", "ERROR", "KEEPALIVE", "BYE", "CONTROL_TYPES", "FRAME_TYPES",
    "HEADER", "BODY_MAX", "CONTROL_MAX", "VERSION",
    "Frame", "FrameError", "FrameDecoder", "encode_frame", "encode_packet", "encode_control",
    "decode_control", "Hello", "Registered", "Refusal", "parse_hello", "parse_registered", "parse_refusal",
]

VERSION = 1

PACKET = 0x01
HELLO = 0x10
REGISTERED = 0x11
ERROR = 0x12
KEEPALIVE = 0x13
BYE = 0x14
CONTROL_TYPES = frozenset({HELLO, REGISTERED, ERROR, KEEPALIVE, BYE})
FRAME_TYPES = CONTROL_TYPES | {PACKET}
TYPE_NAMES = {PACKET: "PACKET", HELLO: "HELLO", REGISTERED: "REGISTERED", ERROR: "ERROR", KEEPALIVE: "KEEPALIVE",
              BYE: "BYE"}

HEADER = struct.Struct("!BH")
BODY_MAX = 0xFFFF
# A HELLO lists names: 64 names of 253 characters fit with room to spare.
CONTROL_MAX = 32768
# Names one agent may register, and how long a token may be (it is hashed, never kept).
NAMES_MAX = 64
TOKEN_MAX = 512


class FrameError(ValueError):
    """The peer sent something that is not a valid frame or control message (the tunnel is closed)."""


@dataclass(frozen=True)
class Frame:
    type: int
    body: bytes


def encode_frame(kind: int, body: bytes | bytearray | memoryview) -> bytes:
    """One frame; ValueError for an unknown type or a body longer than BODY_MAX."""
    if kind not in FRAME_TYPES:
        raise ValueError(f"unknown frame type {kind:#x}")
    if len(body) > BODY_MAX:
        raise ValueError(f"a frame body has at most {BODY_MAX} bytes, got {len(body)}")
    return HEADER.pack(kind, len(body)) + bytes(body)


def encode_packet(packet: bytes | bytearray | memoryview) -> bytes:
    return encode_frame(PACKET, packet)


def encode_control(kind: int, message: dict[str, Any]) -> bytes:
    if kind not in CONTROL_TYPES:
        raise ValueError(f"{kind:#x} is not a control frame type")
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > CONTROL_MAX:
        raise ValueError(f"a control message has at most {CONTROL_MAX} bytes, got {len(body)}")
    return encode_frame(kind, body)


def decode_control(frame: Frame) -> dict[str, Any]:
    """The JSON object of a control frame; FrameError if it is not one."""
    if frame.type not in CONTROL_TYPES:
        raise FrameError(f"expected a control frame, got {TYPE_NAMES.get(frame.type, hex(frame.type))}")
    try:
        message = json.loads(frame.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"{TYPE_NAMES[frame.type]}: the body is not JSON ({exc})") from None
    if not isinstance(message, dict):
        raise FrameError(f"{TYPE_NAMES[frame.type]}: expected a JSON object, got {type(message).__name__}")
    return message


class FrameDecoder:
    """Bytes from the TLS stream in, whole frames out; never holds more than one frame's bytes beyond the input."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._error: FrameError | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos * 2 >= len(self._buf):
            # Compact when the consumed head is at least half: amortised O(1) per byte.
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive; FrameError for malformed input (sticky)."""
        if self._error is not None:
            raise self._error
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER.size:
            return None
        kind, length = HEADER.unpack_from(buf, pos)
        if kind not in FRAME_TYPES:
            self._error = FrameError(f"unknown frame type {kind:#04x} (not a kracauer agent tunnel, or another version)")
            raise self._error
        if kind in CONTROL_TYPES and length > CONTROL_MAX:
            self._error = FrameError(f"{TYPE_NAMES[kind]} of {length} bytes; a control message has at most {CONTROL_MAX}")
            raise self._error
        end = pos + HEADER.size + length
        if len(buf) < end:
            return None
        body = bytes(buf[pos + HEADER.size:end])
        self._pos = end
        return Frame(kind, body)


# -- the control messages ---------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    version: int
    token: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class Registered:
    address: str                  # the agent's IPv6 address (the "host" the box routes its names to)
    prefixes: tuple[str, ...]     # the /96 prefixes clients are embedded in: routed into the agent's TUN
    mtu: int
    keepalive: float              # seconds between keepalives; silence for 3 x this ends the tunnel
    names: tuple[str, ...]


@dataclass(frozen=True)
class Refusal:
    reason: str                   # machine-readable: "bad_token", "name_not_allowed", "bad_hello", ...
    message: str                  # for the agent's log
    retry: bool                   # False: trying again with the same settings cannot help


def _field(message: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = message.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise FrameError(f"{what}: {key!r} missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _strings(message: dict[str, Any], key: str, what: str, limit: int) -> tuple[str, ...]:
    value = _field(message, key, list, what)
    if len(value) > limit or not all(isinstance(item, str) and 0 < len(item) <= 255 for item in value):
        raise FrameError(f"{what}: {key!r} must be a list of at most {limit} non-empty strings")
    return tuple(value)


def parse_hello(message: dict[str, Any]) -> Hello:
    version = _field(message, "version", int, "HELLO")
    token = _field(message, "token", str, "HELLO")
    if not 0 < len(token) <= TOKEN_MAX:
        raise FrameError(f"HELLO: the token must have 1 to {TOKEN_MAX} characters")
    names = _strings(message, "names", "HELLO", NAMES_MAX)
    if not names:
        raise FrameError("HELLO: no names to register")
    return Hello(version, token, names)


def parse_registered(message: dict[str, Any]) -> Registered:
    address = _field(message, "address", str, "REGISTERED")
    prefixes = _strings(message, "prefixes", "REGISTERED", 64)
    mtu = _field(message, "mtu", int, "REGISTERED")
    if not 1280 <= mtu <= BODY_MAX:
        raise FrameError(f"REGISTERED: mtu {mtu} outside 1280..{BODY_MAX}")
    keepalive = _field(message, "keepalive", (int, float), "REGISTERED")
    if not 0 < keepalive <= 3600:
        raise FrameError(f"REGISTERED: keepalive {keepalive} outside (0, 3600]")
    names = _strings(message, "names", "REGISTERED", NAMES_MAX)
    return Registered(address, prefixes, mtu, float(keepalive), names)


def parse_refusal(message: dict[str, Any]) -> Refusal:
    reason = _field(message, "reason", str, "ERROR")
    text = message.get("message")
    retry = message.get("retry")
    return Refusal(reason, text if isinstance(text, str) else reason, retry is True)


# -- what a PACKET frame may carry ---------------------------------------------------

IPV6_HEADER_LEN = 40
# What the box sends down a tunnel, by the IPv6 Next Header (RFC 8200 section 3; IANA protocol numbers):
# the tracker's TCP, and the ICMPv6 errors it translates from the client's side (RFC 7915 section 4.2).
TCP, ICMPV6 = 6, 58
DOWN_PROTOCOLS = frozenset({TCP, ICMPV6})


def ipv6_endpoints(packet: bytes | bytearray | memoryview) -> tuple[bytes, bytes] | None:
    """(source, destination) of an IPv6 packet (RFC 8200 section 3), or None if it is not one.

    The box only forwards, upwards, packets from the agent's own address to a
    client prefix, and only sends an agent packets for its address: the
    tunnel is never a way into anywhere else.
    """
    if len(packet) < IPV6_HEADER_LEN or packet[0] >> 4 != 6:
        return None
    return bytes(packet[8:24]), bytes(packet[24:40])
