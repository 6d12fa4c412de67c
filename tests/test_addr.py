"""netstack.addr: RFC 6052 section 2.2 /96 embedding."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.addr import embed, embed_address, extract, extract_address

PREFIX = ipaddress.IPv6Network("64:ff9b:1::/96")
ipv4s = st.ip_addresses(v=4)


def test_embed_puts_the_ipv4_bytes_after_the_12_prefix_bytes():
    prefix = bytes.fromhex("0064ff9b0001000000000000")
    assert embed(prefix, bytes([203, 0, 113, 7])) == bytes.fromhex("0064ff9b0001000000000000cb007107")


def test_embed_accepts_memoryviews_and_returns_bytes():
    out = embed(memoryview(bytes(12)), memoryview(bytearray(b"\x01\x02\x03\x04")))
    assert type(out) is bytes
    assert out == bytes(12) + b"\x01\x02\x03\x04"


def test_extract_returns_the_low_32_bits():
    assert extract(ipaddress.IPv6Address("64:ff9b:1::cb00:7107").packed) == bytes([203, 0, 113, 7])


@pytest.mark.parametrize("prefix,ipv4", [(bytes(11), bytes(4)), (bytes(16), bytes(4)), (bytes(12), bytes(3)),
                                         (bytes(12), bytes(16))])
def test_embed_rejects_wrong_lengths(prefix, ipv4):
    with pytest.raises(ValueError):
        embed(prefix, ipv4)


@pytest.mark.parametrize("length", [4, 15, 17])
def test_extract_rejects_wrong_lengths(length):
    with pytest.raises(ValueError):
        extract(bytes(length))


def test_embed_address_rfc6052_example():
    # RFC 6052 section 2.4: 192.0.2.33 in 64:ff9b::/96 is 64:ff9b::c000:221.
    address = embed_address(ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv4Address("192.0.2.33"))
    assert address == ipaddress.IPv6Address("64:ff9b::c000:221")


def test_embed_address_design_example():
    assert str(embed_address(PREFIX, ipaddress.IPv4Address("203.0.113.7"))) == "64:ff9b:1::cb00:7107"


def test_extract_address_ignores_the_prefix():
    assert extract_address(ipaddress.IPv6Address("2001:db8:aa:bb:cc:dd:cb00:7107")) == ipaddress.IPv4Address("203.0.113.7")


@pytest.mark.parametrize("length", [64, 95, 97, 128])
def test_embed_address_requires_a_96(length):
    network = ipaddress.IPv6Network(f"2001:db8::/{length}")
    with pytest.raises(ValueError, match="/96"):
        embed_address(network, ipaddress.IPv4Address("192.0.2.1"))


def test_embed_address_rejects_swapped_families():
    with pytest.raises(TypeError):
        embed_address(PREFIX, ipaddress.IPv6Address("::1"))
    with pytest.raises(TypeError):
        extract_address(ipaddress.IPv4Address("192.0.2.1"))


@given(ipv4s)
def test_address_round_trip_for_every_ipv4_address(v4):
    v6 = embed_address(PREFIX, v4)
    assert v6 in PREFIX
    assert extract_address(v6) == v4


@given(ipv4s, st.binary(min_size=12, max_size=12))
def test_bytes_round_trip_and_agree_with_the_address_form(v4, prefix):
    v6 = embed(prefix, v4.packed)
    assert v6[:12] == prefix
    assert extract(v6) == v4.packed
    network = ipaddress.IPv6Network((prefix + bytes(4), 96))
    assert embed_address(network, v4).packed == v6
