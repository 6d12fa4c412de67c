"""SipHash-2-4, the keyed hash of SYN cookies (Aumasson and Bernstein, 2012).

Pure Python, with the same arithmetic as ``kracauer/bpf/siphash.h``, so that
a cookie the BPF program makes is one ``netstack.syncookie`` checks. SipHash
is a PRF made for short inputs (hash-table keys, cookies) under a 128-bit
key; the kernel's own ``siphash()`` is the same function. Only the cookie path
calls it, once per cookie made or checked.

The key is 16 bytes, read as two little-endian 64-bit words k0, k1; the
message is cut into little-endian 64-bit words, the last one carrying the
message length in its top byte (the paper's §2).
"""

from __future__ import annotations

import struct

M64 = 0xFFFFFFFFFFFFFFFF
KEY = struct.Struct("<QQ")
_WORDS: dict[int, struct.Struct] = {}


def key_words(key: bytes) -> tuple[int, int]:
    """(k0, k1): the 16-byte key as the two words the rounds use (and the BPF map holds)."""
    if len(key) != 16:
        raise ValueError("a SipHash key has 16 bytes")
    return KEY.unpack(key)


def _round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    """One SipRound: add, rotate, xor on 64-bit words (the paper's Figure 2.1)."""
    v0 = (v0 + v1) & M64
    v1 = ((v1 << 13) & M64 | v1 >> 51) ^ v0
    v0 = (v0 << 32) & M64 | v0 >> 32
    v2 = (v2 + v3) & M64
    v3 = ((v3 << 16) & M64 | v3 >> 48) ^ v2
    v0 = (v0 + v3) & M64
    v3 = ((v3 << 21) & M64 | v3 >> 43) ^ v0
    v2 = (v2 + v1) & M64
    v1 = ((v1 << 17) & M64 | v1 >> 47) ^ v2
    v2 = (v2 << 32) & M64 | v2 >> 32
    return v0, v1, v2, v3


def siphash24(k0: int, k1: int, data: bytes) -> int:
    """SipHash-2-4 of ``data`` under the key (k0, k1), as a 64-bit integer.

    The reference implementation writes the result out little-endian: that
    is the byte order of its test vectors.
    """
    n = len(data)
    full = n & ~7
    words = _WORDS.get(full)
    if words is None:
        words = _WORDS[full] = struct.Struct(f"<{full // 8}Q")
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    # The last block: the 0..7 remaining bytes, and the length mod 256 in the top byte.
    for m in (*words.unpack_from(data), int.from_bytes(data[full:], "little") | (n & 0xFF) << 56):
        v3 ^= m
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)  # c = 2 compression rounds
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= m
    v2 ^= 0xFF
    for _ in range(4):  # d = 4 finalization rounds
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3
