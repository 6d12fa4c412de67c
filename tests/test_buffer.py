"""netstack.buffer: the read cursor the TLS peeker parses with."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.buffer import Buffer, BufferReadError


def test_integers_are_read_big_endian_and_advance_the_cursor():
    buf = Buffer(bytes.fromhex("01 0203 040506 0708090a"))
    assert buf.pull_uint8() == 0x01
    assert buf.tell() == 1
    assert buf.pull_uint16() == 0x0203
    assert buf.tell() == 3
    assert buf.pull_uint24() == 0x040506
    assert buf.tell() == 6
    assert buf.pull_uint32() == 0x0708090A
    assert buf.tell() == 10
    assert buf.eof()


def test_pull_bytes_returns_bytes_and_zero_length_is_allowed():
    buf = Buffer(memoryview(b"abcdef"))
    assert buf.pull_bytes(0) == b""
    data = buf.pull_bytes(4)
    assert data == b"abcd"
    assert type(data) is bytes
    assert not buf.eof()
    assert buf.pull_bytes(2) == b"ef"
    assert buf.eof()


def test_a_buffer_over_a_bytearray_reads_the_same_as_over_bytes():
    assert Buffer(bytearray(b"\x12\x34")).pull_uint16() == Buffer(b"\x12\x34").pull_uint16() == 0x1234


@pytest.mark.parametrize(
    ("read", "width"),
    [
        (Buffer.pull_uint8, 1),
        (Buffer.pull_uint16, 2),
        (Buffer.pull_uint24, 3),
        (Buffer.pull_uint32, 4),
        (lambda buf: buf.pull_bytes(5), 5),
    ],
    ids=["uint8", "uint16", "uint24", "uint32", "bytes"],
)
def test_every_short_read_raises_buffer_read_error(read, width):
    buf = Buffer(b"\xff" * (width - 1))
    with pytest.raises(BufferReadError):
        read(buf)


def test_a_short_read_does_not_move_the_cursor():
    buf = Buffer(b"\x01\x02\x03")
    with pytest.raises(BufferReadError):
        buf.pull_uint32()
    assert buf.tell() == 0
    assert buf.pull_uint24() == 0x010203


def test_a_negative_length_is_a_read_error():
    with pytest.raises(BufferReadError):
        Buffer(b"abc").pull_bytes(-1)


def test_buffer_read_error_is_a_value_error():
    assert issubclass(BufferReadError, ValueError)


def test_pull_block_yields_the_length_and_accepts_an_exactly_consumed_block():
    buf = Buffer(b"\x00\x03abcZ")
    with buf.pull_block(2) as length:
        assert length == 3
        assert buf.pull_bytes(3) == b"abc"
    assert buf.tell() == 5
    assert buf.pull_bytes(1) == b"Z"


def test_pull_block_raises_when_the_block_is_not_consumed():
    buf = Buffer(b"\x03abcZ")
    with pytest.raises(BufferReadError):
        with buf.pull_block(1):
            buf.pull_bytes(2)


def test_reads_inside_a_block_cannot_run_past_its_end():
    buf = Buffer(b"\x02abcdef")
    with pytest.raises(BufferReadError):
        with buf.pull_block(1):
            buf.pull_bytes(3)


def test_eof_is_true_at_the_end_of_a_block_even_with_bytes_after_it():
    buf = Buffer(b"\x02abXYZ")
    with buf.pull_block(1):
        assert not buf.eof()
        buf.pull_bytes(2)
        assert buf.eof()
    assert not buf.eof()
    assert buf.pull_bytes(3) == b"XYZ"


def test_a_block_longer_than_the_data_is_a_read_error():
    buf = Buffer(b"\x00\x09abc")
    with pytest.raises(BufferReadError):
        with buf.pull_block(2):
            pass


def test_a_block_longer_than_its_enclosing_block_is_a_read_error():
    buf = Buffer(b"\x03\x05abcdefgh")
    with pytest.raises(BufferReadError):
        with buf.pull_block(1):
            with buf.pull_block(1):
                pass


def test_nested_blocks_read_a_list_of_length_prefixed_items():
    buf = Buffer(b"\x00\x07\x02h2\x03abc")
    items = []
    with buf.pull_block(2):
        while not buf.eof():
            with buf.pull_block(1) as length:
                items.append(buf.pull_bytes(length))
    assert items == [b"h2", b"abc"]
    assert buf.eof()


def test_an_error_inside_a_block_propagates_and_restores_the_outer_end():
    buf = Buffer(b"\x01aXY")
    with pytest.raises(KeyError):
        with buf.pull_block(1):
            raise KeyError("from the body")
    # The block's narrowed end is gone: the rest of the data is readable again.
    assert buf.pull_bytes(3) == b"aXY"


def test_a_zero_length_prefix_of_three_bytes_is_an_empty_block():
    buf = Buffer(b"\x00\x00\x00")
    with buf.pull_block(3) as length:
        assert length == 0
        assert buf.eof()
    assert buf.tell() == 3


@given(st.binary(max_size=32), st.lists(st.sampled_from([1, 2, 3, 4]), max_size=20))
def test_integer_reads_match_int_from_bytes_or_raise_without_moving(data, widths):
    buf = Buffer(data)
    readers = {1: buf.pull_uint8, 2: buf.pull_uint16, 3: buf.pull_uint24, 4: buf.pull_uint32}
    for width in widths:
        before = buf.tell()
        if before + width > len(data):
            with pytest.raises(BufferReadError):
                readers[width]()
            assert buf.tell() == before
        else:
            assert readers[width]() == int.from_bytes(data[before : before + width], "big")
            assert buf.tell() == before + width


@given(st.binary(max_size=64))
def test_reading_arbitrary_bytes_as_a_block_list_raises_only_buffer_read_error(data):
    buf = Buffer(data)
    try:
        with buf.pull_block(2):
            while not buf.eof():
                with buf.pull_block(1) as length:
                    buf.pull_bytes(length)
    except BufferReadError:
        return
    assert buf.tell() == 2 + int.from_bytes(data[:2], "big")
