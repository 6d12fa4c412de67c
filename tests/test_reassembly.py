"""netstack.reassembly.StreamBuffer: the first bytes of a stream, in any arrival order."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.reassembly import StreamBuffer

DATA = bytes(range(256)) * 4  # 1024 distinct-ish bytes


def prefix(buf: StreamBuffer) -> bytes:
    return bytes(buf.data[:buf.contiguous])


def test_in_order_segments_are_contiguous():
    buf = StreamBuffer(4096)
    assert buf.add(0, DATA[:100]) == 100
    assert buf.add(100, DATA[100:300]) == 200
    assert buf.contiguous == 300
    assert prefix(buf) == DATA[:300]


def test_nothing_is_contiguous_until_the_first_byte_arrives():
    buf = StreamBuffer(4096)
    assert buf.contiguous == 0
    buf.add(100, DATA[100:200])
    buf.add(200, DATA[200:300])
    assert buf.contiguous == 0
    buf.add(0, DATA[:100])
    assert buf.contiguous == 300
    assert prefix(buf) == DATA[:300]


def test_out_of_order_with_a_gap_stops_at_the_gap():
    buf = StreamBuffer(4096)
    buf.add(0, DATA[:10])
    buf.add(20, DATA[20:30])
    assert buf.contiguous == 10
    buf.add(10, DATA[10:20])
    assert buf.contiguous == 30


def test_filling_the_middle_of_three_pieces_joins_them():
    buf = StreamBuffer(4096)
    buf.add(0, DATA[:10])
    buf.add(30, DATA[30:40])
    buf.add(12, DATA[12:18])
    assert buf.contiguous == 10
    buf.add(10, DATA[10:31])  # overlaps 12..18 and the start of 30..40
    assert buf.contiguous == 40
    assert prefix(buf) == DATA[:40]


def test_overlapping_retransmission_spanning_several_pieces():
    buf = StreamBuffer(4096)
    buf.add(5, DATA[5:10])
    buf.add(15, DATA[15:20])
    buf.add(25, DATA[25:30])
    buf.add(0, DATA[:40])  # re-segmented retransmission covering everything
    assert buf.contiguous == 40
    assert prefix(buf) == DATA[:40]


def test_duplicate_segment_changes_nothing():
    buf = StreamBuffer(4096)
    buf.add(0, DATA[:50])
    buf.add(0, DATA[:50])
    buf.add(10, DATA[10:20])
    assert buf.contiguous == 50
    assert prefix(buf) == DATA[:50]


def test_touching_ranges_merge():
    buf = StreamBuffer(4096)
    buf.add(10, DATA[10:20])
    buf.add(0, DATA[:10])
    assert buf.contiguous == 20


def test_bytes_beyond_capacity_are_not_kept():
    buf = StreamBuffer(100)
    assert buf.add(90, DATA[90:120]) == 10
    assert buf.add(100, DATA[100:150]) == 0
    assert buf.add(500, DATA[500:600]) == 0
    assert len(buf.data) <= 100
    buf.add(0, DATA[:90])
    assert buf.contiguous == 100
    assert buf.full
    assert prefix(buf) == DATA[:100]


def test_not_full_below_capacity():
    buf = StreamBuffer(100)
    buf.add(0, DATA[:99])
    assert not buf.full
    buf.add(99, DATA[99:100])
    assert buf.full


def test_negative_offset_keeps_only_the_bytes_from_zero():
    # A segment that starts before the stream (e.g. one carrying the SYN's
    # sequence number) has bytes before offset 0; they are not stream bytes.
    buf = StreamBuffer(4096)
    assert buf.add(-3, b"xyz" + DATA[:10]) == 10
    assert buf.contiguous == 10
    assert prefix(buf) == DATA[:10]


def test_negative_offset_entirely_before_the_stream_adds_nothing():
    buf = StreamBuffer(4096)
    assert buf.add(-10, b"0123456789") == 0
    assert buf.add(-10, b"012345") == 0
    assert buf.contiguous == 0
    assert buf.ranges == []


def test_empty_payload_adds_nothing():
    buf = StreamBuffer(4096)
    assert buf.add(0, b"") == 0
    assert buf.contiguous == 0


def test_memoryview_payload_is_copied():
    source = bytearray(DATA[:20])
    buf = StreamBuffer(4096)
    buf.add(0, memoryview(source))
    source[:] = b"\0" * 20
    assert prefix(buf) == DATA[:20]


@st.composite
def segmentations(draw):
    """A byte string, cut into pieces, shuffled, some sent more than once."""
    data = draw(st.binary(min_size=1, max_size=600))
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=12)) if len(data) > 1 else set())
    bounds = [0, *cuts, len(data)]
    pieces = [(bounds[i], data[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1)]
    duplicates = draw(st.lists(st.sampled_from(pieces), max_size=6))
    # A retransmission may be re-segmented: any sub-range of the data.
    resegmented = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 200)), max_size=4))
    extra = [(start, data[start:start + length]) for start, length in resegmented]
    order = draw(st.permutations(pieces + duplicates + extra))
    return data, order


@given(segmentations())
def test_any_arrival_order_gives_the_same_contiguous_bytes(case):
    data, order = case
    buf = StreamBuffer(4096)
    for offset, piece in order:
        buf.add(offset, piece)
    assert buf.contiguous == len(data)
    assert prefix(buf) == data


@given(segmentations(), st.integers(1, 600))
def test_the_cap_cuts_every_arrival_order_at_the_same_byte(case, capacity):
    data, order = case
    buf = StreamBuffer(capacity)
    for offset, piece in order:
        buf.add(offset, piece)
    assert buf.contiguous == min(len(data), capacity)
    assert prefix(buf) == data[:capacity]
    assert len(buf.data) <= capacity


@given(segmentations())
def test_contiguous_only_grows_and_ranges_stay_sorted_and_disjoint(case):
    data, order = case
    buf = StreamBuffer(4096)
    seen = 0
    for offset, piece in order:
        buf.add(offset, piece)
        assert buf.contiguous >= seen
        seen = buf.contiguous
        for (low, high), (next_low, _) in zip(buf.ranges, buf.ranges[1:]):
            assert low < high < next_low


def test_consume_drops_the_first_bytes_and_shifts_what_is_held():
    buf = StreamBuffer(100)
    buf.add(0, b"HEAD")
    buf.add(4, b"ab")
    buf.add(10, b"later")
    buf.consume(4)
    assert buf.contiguous == 2
    assert bytes(buf.data[:2]) == b"ab"
    assert buf.ranges == [[0, 2], [6, 11]]
    assert bytes(buf.data[6:11]) == b"later"
    # Offsets are the new ones: the gap is filled at 2..6.
    buf.add(2, b"cdef")
    assert buf.contiguous == 11
    assert bytes(buf.data[:11]) == b"abcdeflater"


def test_consuming_everything_contiguous_leaves_an_empty_start():
    buf = StreamBuffer(100)
    buf.add(0, b"HEAD")
    buf.add(8, b"x")
    buf.consume(4)
    assert buf.contiguous == 0
    assert buf.ranges == [[4, 5]]
    with pytest.raises(ValueError):
        buf.consume(1)
