"""A read cursor over bytes, in the style of aioquic's ``buffer.py``.

Every short read, and every length-prefixed block that is not consumed to the
byte, raises the one ``BufferReadError``: parsers then turn malformed input into
a protocol answer in a single ``except`` clause.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

_UINT8 = struct.Struct("!B")
_UINT16 = struct.Struct("!H")
_UINT32 = struct.Struct("!I")


class BufferReadError(ValueError):
    """The data ended early, or a length-prefixed block was not read exactly."""


class Buffer:
    """Reads big-endian integers and byte strings from ``data``, front to back.

    ``pull_block`` narrows the readable end to the block, so a parser cannot
    read past a length prefix into the bytes that follow it.
    """

    __slots__ = ("_data", "_pos", "_end")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._end = len(self._data)

    def tell(self) -> int:
        return self._pos

    def eof(self) -> bool:
        """True when nothing is left to read (in the innermost open block)."""
        return self._pos >= self._end

    def _advance(self, n: int) -> int:
        start = self._pos
        if n < 0 or start + n > self._end:
            raise BufferReadError(f"read of {n} bytes at offset {start} past the end ({self._end})")
        self._pos = start + n
        return start

    def pull_bytes(self, n: int) -> bytes:
        start = self._advance(n)
        return self._data[start : start + n].tobytes()

    def pull_uint8(self) -> int:
        return _UINT8.unpack_from(self._data, self._advance(1))[0]

    def pull_uint16(self) -> int:
        return _UINT16.unpack_from(self._data, self._advance(2))[0]

    def pull_uint24(self) -> int:
        start = self._advance(3)
        return int.from_bytes(self._data[start : start + 3], "big")

    def pull_uint32(self) -> int:
        return _UINT32.unpack_from(self._data, self._advance(4))[0]

    @contextmanager
    def pull_block(self, length_size: int) -> Iterator[int]:
        """Read a ``length_size``-byte length, then let the body read that block.

        Yields the block length. Reads inside the block cannot go past its end,
        and leaving the block before its end raises ``BufferReadError``.
        """
        start = self._advance(length_size)
        length = int.from_bytes(self._data[start : start + length_size], "big")
        block_end = self._pos + length
        if block_end > self._end:
            raise BufferReadError(f"block of {length} bytes at offset {self._pos} runs past the end ({self._end})")
        outer_end, self._end = self._end, block_end
        try:
            yield length
        finally:
            self._end = outer_end
        if self._pos != block_end:
            raise BufferReadError(f"block ending at offset {block_end} was left at offset {self._pos}")
