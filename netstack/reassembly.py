"""Reassembly of the first bytes of a TCP stream, by sequence offset.

The hello may arrive in any number of segments, out of order, duplicated or
re-segmented on retransmission. kracauer keeps what it was sent (without
acknowledging it, so the client still holds every byte) and asks how far the
stream is contiguous from its start.
"""

from __future__ import annotations


class StreamBuffer:
    """Bytes at offsets [0, capacity) of a stream, and which ranges have arrived."""

    __slots__ = ("capacity", "data", "ranges")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data = bytearray()
        # Sorted, disjoint, non-touching [start, end) ranges that have arrived.
        self.ranges: list[list[int]] = []

    def add(self, offset: int, payload: bytes | bytearray | memoryview) -> int:
        """Store `payload` at stream `offset`; return how many bytes fitted under the cap.

        Bytes past the capacity are not kept: the sender still has them and
        will send them again once the connection is spliced.
        """
        if offset < 0:
            payload = payload[-offset:]
            offset = 0
        end = min(offset + len(payload), self.capacity)
        if end <= offset:
            return 0
        if len(self.data) < end:
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = payload[: end - offset]
        self._merge(offset, end)
        return end - offset

    def _merge(self, start: int, end: int) -> None:
        merged = []
        placed = False
        for low, high in self.ranges:
            if high < start:
                merged.append([low, high])
            elif low > end:
                if not placed:
                    merged.append([start, end])
                    placed = True
                merged.append([low, high])
            else:
                start, end = min(start, low), max(end, high)
        if not placed:
            merged.append([start, end])
        self.ranges = merged

    def covers(self, start: int, end: int) -> bool:
        """True when every byte of [start, end) (clipped to the capacity) has already arrived."""
        start = max(start, 0)
        end = min(end, self.capacity)
        if end <= start:
            return True
        return any(low <= start and end <= high for low, high in self.ranges)

    def consume(self, n: int) -> None:
        """Drop the first `n` bytes (all arrived): offset `n` becomes offset 0, the cap stays."""
        if n > self.contiguous:
            raise ValueError(f"cannot consume {n} bytes, only {self.contiguous} are contiguous")
        del self.data[:n]
        ranges = [[low - n, high - n] for low, high in self.ranges]
        # The first range started at 0 and covered n: it now starts at 0 again, or is gone if it was exactly n.
        self.ranges = [[max(low, 0), high] for low, high in ranges if high > 0]

    @property
    def contiguous(self) -> int:
        """How many bytes from offset 0 have all arrived."""
        if self.ranges and self.ranges[0][0] == 0:
            return self.ranges[0][1]
        return 0

    @property
    def full(self) -> bool:
        return self.contiguous >= self.capacity
