"""netstack.checksum: the Internet checksum (RFC 1071) and its incremental update (RFC 1624).

Expected values come from the RFCs' own examples and from scapy's independent
implementation. Ones' complement arithmetic has two zeros, 0x0000 and 0xFFFF;
RFC 1071 §2 makes them equivalent when a checksum is verified, so checksums
are compared modulo that equivalence (``same_checksum``).
"""

import struct

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.utils import checksum as scapy_checksum

from netstack.checksum import checksum, finish, is_valid, ones_sum, update


def same_checksum(a: int, b: int) -> bool:
    """Equal as ones' complement numbers: 0x0000 and 0xFFFF are both zero."""
    return a % 0xFFFF == b % 0xFFFF


def words(data: bytes) -> list[int]:
    padded = data + b"\0" * (len(data) & 1)
    return [int.from_bytes(padded[i:i + 2], "big") for i in range(0, len(padded), 2)]


def reference_sum(data: bytes) -> int:
    """RFC 1071 §4.1, the C loop: add 16-bit words, fold the carries back in."""
    total = 0
    for word in words(data):
        total += word
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


# -- RFC 1071 §3 numerical example ------------------------------------------------

RFC1071_BYTES = bytes.fromhex("0001f203f4f5f6f7")


def test_ones_sum_matches_the_rfc1071_numerical_example():
    # RFC 1071 §3: 0001 + f203 + f4f5 + f6f7 = 2ddf0, folded to ddf2.
    assert ones_sum(RFC1071_BYTES) == 0xDDF2


def test_checksum_is_the_complement_of_the_rfc1071_example_sum():
    assert checksum(RFC1071_BYTES) == 0xDDF2 ^ 0xFFFF == 0x220D


def test_ones_sum_is_byte_order_independent_as_rfc1071_shows():
    # RFC 1071 §2(B): swapping the bytes of every word swaps the bytes of the sum.
    swapped = bytes(b for i in range(0, 8, 2) for b in (RFC1071_BYTES[i + 1], RFC1071_BYTES[i]))
    assert ones_sum(swapped) == 0xF2DD


def test_data_with_its_checksum_appended_verifies():
    data = RFC1071_BYTES + checksum(RFC1071_BYTES).to_bytes(2, "big")
    assert is_valid(data)
    assert not is_valid(data[:-1] + bytes([data[-1] ^ 1]))


# -- odd lengths --------------------------------------------------------------------

def test_odd_trailing_byte_is_padded_with_zero_on_the_right():
    # RFC 1071 §4.1: the last byte is the high byte of a word whose low byte is 0.
    assert ones_sum(b"\x12") == 0x1200
    assert ones_sum(b"\x01\x02\x03") == 0x0102 + 0x0300
    assert checksum(b"\x01\x02\x03") == checksum(b"\x01\x02\x03\x00")


def test_empty_data_sums_to_zero():
    assert ones_sum(b"") == 0
    assert same_checksum(checksum(b""), 0xFFFF)


@given(st.binary(max_size=300))
def test_ones_sum_equals_the_rfc1071_reference_loop(data):
    assert ones_sum(data) % 0xFFFF == reference_sum(data) % 0xFFFF


@given(st.binary(max_size=300))
def test_checksum_equals_scapys(data):
    assert same_checksum(checksum(data), scapy_checksum(data))


@given(st.binary(max_size=300))
def test_checksum_accepts_bytearray_and_memoryview(data):
    assert checksum(bytearray(data)) == checksum(memoryview(data)) == checksum(data)


@given(st.binary(min_size=1, max_size=99), st.binary(max_size=99))
def test_sums_of_even_length_pieces_add_up(head, tail):
    # What the tracker relies on: a pseudo-header sum plus a segment sum.
    head = head + b"\0" * (len(head) & 1)
    assert (ones_sum(head) + ones_sum(tail)) % 0xFFFF == ones_sum(head + tail) % 0xFFFF


# -- real packets, checksummed by scapy ------------------------------------------

def test_checksum_of_a_scapy_ipv4_header_matches_its_checksum_field():
    packet = bytes(IP(src="198.51.100.2", dst="192.0.2.10", ttl=57, id=4242, options=b"\x01\x01\x01\x00")
                   / TCP(sport=40000, dport=443))
    header_len = (packet[0] & 0x0F) * 4
    zeroed = packet[:10] + b"\0\0" + packet[12:header_len]
    assert same_checksum(checksum(zeroed), struct.unpack_from("!H", packet, 10)[0])
    assert is_valid(packet[:header_len])


def pseudo_sum(src: bytes, dst: bytes, length: int) -> int:
    return ones_sum(src + dst) + 6 + length


def test_tcp_checksum_over_ipv4_pseudo_header_matches_scapy():
    packet = bytes(IP(src="198.51.100.2", dst="192.0.2.10") / TCP(sport=40000, dport=443, flags="PA", seq=7)
                   / (b"odd length payload!"))
    segment = packet[20:]
    expected = struct.unpack_from("!H", segment, 16)[0]
    zeroed = segment[:16] + b"\0\0" + segment[18:]
    assert same_checksum(finish(pseudo_sum(packet[12:16], packet[16:20], len(segment)) + ones_sum(zeroed)), expected)
    assert is_valid(segment, pseudo_sum(packet[12:16], packet[16:20], len(segment)))


def test_tcp_checksum_over_ipv6_pseudo_header_matches_scapy():
    packet = bytes(IPv6(src="2001:db8::10", dst="64:ff9b:1::c633:6402") / TCP(sport=443, dport=40000, flags="A")
                   / (b"x" * 101))
    segment = packet[40:]
    pseudo = pseudo_sum(packet[8:24], packet[24:40], len(segment))
    assert is_valid(segment, pseudo)
    assert not is_valid(segment, pseudo + 1)


# -- RFC 1624 incremental update ----------------------------------------------------

def test_update_matches_the_rfc1624_example():
    # RFC 1624 §4: HC = 0xDD2F, a field changes from 0x5555 to 0x3285; the
    # other header words sum to 0xCD7A. Eqn. 3 gives 0x0000 (the recomputed
    # value); 0xFFFF is the same ones' complement zero.
    new = update(0xDD2F, 0x5555, 0x3285)
    assert same_checksum(new, 0x0000)
    # Both representations verify against the new header's words.
    assert (0xCD7A + 0x3285 + new) % 0xFFFF == 0


def test_update_of_an_unchanged_field_keeps_the_checksum():
    for old_checksum in (0x1234, 0xDD2F, 0x0001):
        assert update(old_checksum, 0x5555, 0x5555) == old_checksum


fields = st.lists(st.tuples(st.integers(0, 31), st.integers(0, 0xFFFF)), max_size=6)


@given(st.binary(min_size=64, max_size=64), fields)
def test_incremental_update_equals_full_recomputation(data, changes):
    header = bytearray(data)
    header[16:18] = b"\0\0"
    header[16:18] = checksum(header).to_bytes(2, "big")
    original_checksum = int.from_bytes(header[16:18], "big")
    changed = bytearray(header)
    old_sum = new_sum = 0
    for word, value in changes:
        if word == 8:  # the checksum field itself
            continue
        at = word * 2
        old_sum += int.from_bytes(changed[at:at + 2], "big")
        changed[at:at + 2] = value.to_bytes(2, "big")
        new_sum += value
    incremental = update(original_checksum, old_sum, new_sum)
    changed[16:18] = b"\0\0"
    assert same_checksum(incremental, checksum(changed))
    changed[16:18] = incremental.to_bytes(2, "big")
    assert is_valid(changed)


@given(st.binary(min_size=20, max_size=20), st.binary(min_size=20, max_size=20), st.binary(max_size=40))
def test_update_over_a_block_of_words_equals_scapys_recomputation(old_block, new_block, rest):
    # The tracker's use: swap addresses and header words in one go.
    rest = rest + b"\0" * (len(rest) & 1)
    old_checksum = scapy_checksum(old_block + rest)
    incremental = update(old_checksum, ones_sum(old_block), ones_sum(new_block))
    assert same_checksum(incremental, scapy_checksum(new_block + rest))


# -- partial checksums (virtio CHECKSUM_PARTIAL) ----------------------------------------

@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.integers(20, 0xFFFF))
def test_update_partial_moves_a_pseudo_header_sum_to_new_addresses(old_addresses, new_addresses, length):
    # The field of a CHECKSUM_PARTIAL segment holds the folded, uncomplemented
    # pseudo-header sum; after the addresses change it must hold the new one.
    from netstack.checksum import update_partial

    old_field = (ones_sum(old_addresses) + 6 + length) % 0xFFFF
    new_field = update_partial(old_field, ones_sum(old_addresses), ones_sum(new_addresses))
    assert new_field % 0xFFFF == (ones_sum(new_addresses) + 6 + length) % 0xFFFF
    assert 0 <= new_field <= 0xFFFF
