"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

The ones' complement sum of 16-bit big-endian words is computed with one
big-integer operation: since 2**16 == 1 (mod 0xFFFF), reading the bytes as one
big-endian integer and reducing it modulo 0xFFFF adds up all the 16-bit words
with end-around carry, in C. The result is in 0..0xFFFE, where 0 stands for
both ones' complement zeros (0x0000 and 0xFFFF); RFC 1071 §2 makes them
equivalent for verification and RFC 1624 §3 explains why it does not matter for
updates.
"""

from __future__ import annotations

_from_bytes = int.from_bytes


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Ones' complement sum of `data` as 16-bit words, reduced modulo 0xFFFF."""
    # RFC 1071 §4.1: an odd trailing byte is padded with a zero byte on the right.
    if len(data) & 1:
        return (_from_bytes(data, "big") << 8) % 0xFFFF
    return _from_bytes(data, "big") % 0xFFFF


def finish(total: int) -> int:
    """Fold a running ones' complement sum into the 16-bit checksum field value.

    A sum that reduces to 0 is the ones' complement "negative zero" 0xFFFF
    (the words of a real header are never all zero), whose complement is 0x0000:
    the value RFC 1071's end-around-carry loop would produce.
    """
    folded = total % 0xFFFF
    return ~folded & 0xFFFF if folded else 0


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum of `data` (RFC 1071)."""
    return finish(ones_sum(data))


def is_valid(data: bytes | bytearray | memoryview, pseudo_sum: int = 0) -> bool:
    """True when `data` (checksum field included) plus a pseudo-header sum verifies."""
    return (ones_sum(data) + pseudo_sum) % 0xFFFF == 0


def update(old_checksum: int, old_sum: int, new_sum: int) -> int:
    """Checksum after words summing to `old_sum` were replaced by words summing to `new_sum`.

    RFC 1624 §3, eqn. 3: HC' = ~(~HC + ~m + m'). Subtracting modulo 0xFFFF is
    adding the ones' complement.
    """
    return finish((~old_checksum & 0xFFFF) - old_sum + new_sum)


def update_partial(old_field: int, old_sum: int, new_sum: int) -> int:
    """A partial checksum field (the uncomplemented pseudo-header sum of a
    CHECKSUM_PARTIAL packet) after words summing to `old_sum` were replaced.

    The field is a plain ones' complement sum, not its complement, so the
    change is added directly (RFC 1624 §3 without the outer complements).
    """
    return (old_field - old_sum + new_sum) % 0xFFFF
