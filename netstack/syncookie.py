"""SYN cookies: answering a SYN without keeping state (RFC 4987 §3.6).

When too many handshakes are half-open, kracauer keeps nothing for a new SYN:
its initial sequence number carries what it must remember, and the client's
ACK (ack = cookie + 1) brings it back. As in Linux:

- the ISN is a keyed hash of the connection's addresses, ports and the
  client's ISN, plus a coarse clock (5 bits of 64-second ticks: a cookie is
  good for two ticks) and an index into a table of MSS values (3 bits);
- window scale and SACK, which have no room in the ISN, ride in the low 6 bits
  of the timestamp kracauer sends, which the client echoes; a client that does
  not use timestamps gets neither (as with Linux's cookies).
"""

from __future__ import annotations

import hashlib
import struct

# MSS values a cookie can carry; a client's MSS is rounded down to one of them.
MSS_TABLE = (536, 1220, 1300, 1360, 1400, 1440, 1460, 8960)
TICK = 64.0
COUNTER_BITS = 5
# The low bits of kracauer's TSval in a cookie SYN-ACK: 4 bits of window scale
# (15 = none) and 1 bit of SACK-permitted.
TS_OPTION_BITS = 6
TS_OPTION_MASK = (1 << TS_OPTION_BITS) - 1
NO_WSCALE = 0xF

_TUPLE = struct.Struct("!I4s4sHHIB")


class SynCookies:
    """Make and check cookies with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the SYN cookie secret must have at least 16 bytes")
        self._secret = secret

    def _mac(self, counter: int, client: bytes, service: bytes, client_port: int, service_port: int,
             client_isn: int, index: int) -> int:
        # The MSS index is under the MAC too: a client must not pick its own MSS by editing the low bits.
        data = _TUPLE.pack(counter & 0xFFFFFFFF, client, service, client_port, service_port, client_isn, index)
        return int.from_bytes(hashlib.blake2s(data, key=self._secret, digest_size=3).digest(), "big")

    def make(self, now: float, client: bytes, service: bytes, client_port: int, service_port: int,
             client_isn: int, client_mss: int) -> int:
        """The ISN for a stateless SYN-ACK."""
        counter = int(now // TICK)
        index = max((i for i, mss in enumerate(MSS_TABLE) if mss <= client_mss), default=0)
        mac = self._mac(counter, client, service, client_port, service_port, client_isn, index)
        return (mac << 8) | ((counter & ((1 << COUNTER_BITS) - 1)) << 3) | index

    def check(self, now: float, cookie: int, client: bytes, service: bytes, client_port: int, service_port: int,
              client_isn: int) -> int | None:
        """The MSS the cookie carries if it is genuine and fresh, else None."""
        counter_now = int(now // TICK)
        low = (cookie >> 3) & ((1 << COUNTER_BITS) - 1)
        age = (counter_now - low) & ((1 << COUNTER_BITS) - 1)
        if age > 1:
            return None
        counter = counter_now - age
        if self._mac(counter, client, service, client_port, service_port, client_isn, cookie & 7) != cookie >> 8:
            return None
        return MSS_TABLE[cookie & 7]

    def ts_base(self, client: bytes, service: bytes, client_port: int, service_port: int) -> int:
        """A per-connection timestamp base that needs no state (the client's echo must make sense)."""
        data = _TUPLE.pack(0xFFFFFFFF, client, service, client_port, service_port, 0, 0)
        return int.from_bytes(hashlib.blake2s(data, key=self._secret, digest_size=4).digest(), "big")


def encode_options(tsval: int, wscale: int | None, sack: bool) -> int:
    """kracauer's TSval with the client's window scale and SACK-permitted in its low bits."""
    bits = ((NO_WSCALE if wscale is None else wscale) << 1) | int(sack)
    return (tsval & ~TS_OPTION_MASK & 0xFFFFFFFF) | bits


def decode_options(tsecr: int) -> tuple[int | None, bool]:
    """(window scale or None, SACK-permitted) from the timestamp the client echoed."""
    # The echo is the client's to choose: read only the 4 bits encode_options
    # writes (bit 5 is unused), so no echo yields a shift above 14 (RFC 7323
    # §2.3); 15 is "none". (Fuzzing found 5 bits read here: shifts up to 31.)
    wscale = (tsecr >> 1) & NO_WSCALE
    return (None if wscale == NO_WSCALE else wscale), bool(tsecr & 1)
