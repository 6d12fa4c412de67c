"""SYN cookies: answering a SYN without keeping state (RFC 4987 §3.6).

When too many handshakes are half-open, kracauer keeps nothing for a new SYN:
its initial sequence number carries what it must remember, and the client's
ACK (ack = cookie + 1) brings it back. As in Linux:

- the ISN is a keyed hash of the connection's addresses, ports and the
  client's ISN, plus a coarse clock (5 bits of 64-second ticks: a cookie is
  good for two ticks) and an index into a table of MSS values (3 bits):
  ``MAC (24 bits) | counter (5 bits) | MSS index (3 bits)``;
- window scale and SACK, which have no room in the ISN, ride in the low 6 bits
  of the timestamp kracauer sends, which the client echoes; a client that does
  not use timestamps gets neither (as with Linux's cookies).

The hash is SipHash-2-4 (``netstack.siphash``) under a 16-byte secret, over
one 24-byte message, so that the BPF program on the TUN
(``kracauer/bpf/syncookie.h``) makes the same cookies from the same secret:
a SYN the kernel answered is accepted by the tracker, and the other way round.
The 64-bit result gives both the MAC (its low 24 bits) and the connection's
timestamp base (its high 32 bits): one hash per cookie made or checked.

SipHash in pure Python costs about 22 µs a cookie, which caps a flood the
Python path can answer near 40 000 SYNs a second. Without the kernel path no
program has to agree with Python, so the daemon then asks for ``BLAKE2S``
(hashlib's, in C: about 2 µs) over the same message, with the same layout
of the result: the Python path answers floods as fast as before the kernel
learnt to make cookies.
"""

from __future__ import annotations

import hashlib
import struct

from netstack.siphash import key_words, siphash24

# The keyed hashes a SynCookies can use: SIPHASH (what the BPF program computes) or BLAKE2S (faster in Python).
SIPHASH = "siphash-2-4"
BLAKE2S = "blake2s"

# MSS values a cookie can carry; a client's MSS is rounded down to one of them.
MSS_TABLE = (536, 1220, 1300, 1360, 1400, 1440, 1460, 8960)
TICK = 64.0
TICK_NS = 64_000_000_000
COUNTER_BITS = 5
COUNTER_MASK = (1 << COUNTER_BITS) - 1
# The low bits of kracauer's TSval in a cookie SYN-ACK: 4 bits of window scale
# (15 = none) and 1 bit of SACK-permitted.
TS_OPTION_BITS = 6
TS_OPTION_MASK = (1 << TS_OPTION_BITS) - 1
NO_WSCALE = 0xF
SECRET_LEN = 16
M32 = 0xFFFFFFFF

# The hashed message, 24 bytes (three SipHash words, kracauer/bpf/syncookie.h
# lays it out the same way): the full tick counter, client address, service
# address, client port, service port, client ISN, MSS index, then zeros.
MESSAGE = struct.Struct("!I4s4sHHIB3x")


def mss_index(client_mss: int) -> int:
    """The largest MSS_TABLE entry no larger than the client's MSS (the first if none is)."""
    return max((i for i, mss in enumerate(MSS_TABLE) if mss <= client_mss), default=0)


class SynCookies:
    """Make and check cookies with one secret."""

    def __init__(self, secret: bytes, mac: str = SIPHASH) -> None:
        if len(secret) != SECRET_LEN:
            raise ValueError(f"the SYN cookie secret must have {SECRET_LEN} bytes")
        if mac not in (SIPHASH, BLAKE2S):
            raise ValueError(f"unknown cookie hash {mac!r}")
        self.secret = secret
        self.mac = mac
        self._blake2s = mac == BLAKE2S
        self._k0, self._k1 = key_words(secret)

    def _hash(self, counter: int, client: bytes, service: bytes, client_port: int, service_port: int,
              client_isn: int, index: int) -> int:
        # The MSS index is under the MAC too: a client must not pick its own MSS by editing the low bits.
        message = MESSAGE.pack(counter & M32, client, service, client_port, service_port, client_isn, index)
        if self._blake2s:
            return int.from_bytes(hashlib.blake2s(message, key=self.secret, digest_size=8).digest(), "little")
        return siphash24(self._k0, self._k1, message)

    def make(self, now: float, client: bytes, service: bytes, client_port: int, service_port: int,
             client_isn: int, client_mss: int) -> tuple[int, int]:
        """(ISN, timestamp base) for a stateless SYN-ACK.

        The timestamp base is per connection and needs no state either: the
        check of the client's ACK gives it back (see ``check``).
        """
        counter = int(now // TICK)
        index = mss_index(client_mss)
        h = self._hash(counter, client, service, client_port, service_port, client_isn, index)
        return ((h & 0xFFFFFF) << 8) | ((counter & COUNTER_MASK) << 3) | index, h >> 32

    def check(self, now: float, cookie: int, client: bytes, service: bytes, client_port: int, service_port: int,
              client_isn: int) -> tuple[int, int] | None:
        """(MSS, timestamp base) the cookie carries if it is genuine and fresh, else None."""
        counter_now = int(now // TICK)
        low = (cookie >> 3) & COUNTER_MASK
        age = (counter_now - low) & COUNTER_MASK
        # Made this tick or the one before; or stamped by the kernel a hair after a
        # tick began while the caller's clock (read once per batch of packets) was
        # still in the previous one. Either way no cookie lives longer than two ticks.
        if age > 1 and age != COUNTER_MASK:
            return None
        counter = counter_now - age if age <= 1 else counter_now + 1
        h = self._hash(counter, client, service, client_port, service_port, client_isn, cookie & 7)
        if h & 0xFFFFFF != cookie >> 8:
            return None
        return MSS_TABLE[cookie & 7], h >> 32


def encode_options(tsval: int, wscale: int | None, sack: bool) -> int:
    """kracauer's TSval with the client's window scale and SACK-permitted in its low bits.

    Never ahead of the clock it stands for (as Linux's cookie_init_timestamp):
    a SYN-ACK stamped later than the segments after it would make the client
    drop those as old (RFC 7323 §5.3, PAWS).
    """
    bits = ((NO_WSCALE if wscale is None else wscale) << 1) | int(sack)
    tsval &= M32
    encoded = (tsval & ~TS_OPTION_MASK & M32) | bits
    if bits > tsval & TS_OPTION_MASK:
        encoded = (encoded - (1 << TS_OPTION_BITS)) & M32
    return encoded


def decode_options(tsecr: int) -> tuple[int | None, bool]:
    """(window scale or None, SACK-permitted) from the timestamp the client echoed."""
    # The echo is the client's to choose: read only the 4 bits encode_options
    # writes (bit 5 is unused), so no echo yields a shift above 14 (RFC 7323
    # §2.3); 15 is "none". (Fuzzing found 5 bits read here: shifts up to 31.)
    wscale = (tsecr >> 1) & NO_WSCALE
    return (None if wscale == NO_WSCALE else wscale), bool(tsecr & 1)
