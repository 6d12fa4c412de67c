"""SipHash-2-4 against the reference vectors, and the SYN cookies built on it."""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.siphash import key_words, siphash24
from netstack.syncookie import MESSAGE, MSS_TABLE, TICK, SynCookies, decode_options, encode_options, mss_index

VECTORS = pathlib.Path(__file__).parent / "data" / "siphash24_vectors.txt"
M32 = 0xFFFFFFFF


def vectors() -> list[tuple[int, str]]:
    out = []
    for line in VECTORS.read_text().splitlines():
        if line and not line.startswith("#"):
            n, value = line.split()
            out.append((int(n), value))
    return out


def test_the_vector_file_covers_every_length_up_to_the_cookie_message():
    lengths = [n for n, _ in vectors()]
    assert lengths == list(range(len(lengths)))
    assert len(lengths) > MESSAGE.size


@pytest.mark.parametrize("n,expected", vectors())
def test_siphash24_matches_the_reference_vectors(n, expected):
    k0, k1 = key_words(bytes(range(16)))
    assert siphash24(k0, k1, bytes(range(n))).to_bytes(8, "little").hex() == expected


def test_the_papers_appendix_example():
    # SipHash paper, Appendix A: key 00..0f, message 00..0e.
    k0, k1 = key_words(bytes(range(16)))
    assert siphash24(k0, k1, bytes(range(15))) == 0xA129CA6149BE45E5


def test_a_key_must_have_16_bytes():
    with pytest.raises(ValueError):
        key_words(bytes(15))
    with pytest.raises(ValueError):
        SynCookies(bytes(32))


def test_the_cookie_message_is_three_siphash_words():
    assert MESSAGE.size == 24


SECRET = bytes(range(100, 116))
CLIENT, SERVICE = bytes((198, 51, 100, 7)), bytes((192, 0, 2, 10))


@given(st.floats(0, 1e9), st.integers(0, 0xFFFF), st.integers(0, M32), st.integers(0, 0xFFFF))
def test_a_cookie_round_trips_with_its_mss_and_timestamp_base(now, port, isn, client_mss):
    cookies = SynCookies(SECRET)
    cookie, ts_base = cookies.make(now, CLIENT, SERVICE, port, 443, isn, client_mss)
    assert cookies.check(now, cookie, CLIENT, SERVICE, port, 443, isn) == (MSS_TABLE[mss_index(client_mss)], ts_base)
    # Any other tuple or ISN fails (24 bits of MAC: a collision is a 1-in-16-million event).
    assert cookies.check(now, cookie, CLIENT, SERVICE, port ^ 1, 443, isn) is None
    assert cookies.check(now, cookie, CLIENT, SERVICE, port, 443, isn ^ 1) is None
    assert SynCookies(bytes(16)).check(now, cookie, CLIENT, SERVICE, port, 443, isn) is None


def test_a_cookie_is_good_for_two_ticks_and_one_tick_early():
    cookies = SynCookies(SECRET)
    now = 1000 * TICK + 1.0
    cookie, _ = cookies.make(now, CLIENT, SERVICE, 40000, 443, 12345, 1460)
    assert cookies.check(now + TICK, cookie, CLIENT, SERVICE, 40000, 443, 12345) is not None
    assert cookies.check(now + 2 * TICK, cookie, CLIENT, SERVICE, 40000, 443, 12345) is None
    # The kernel stamped it just after a tick began; the checker's clock was read just before.
    assert cookies.check(now - 1.5, cookie, CLIENT, SERVICE, 40000, 443, 12345) is not None
    assert cookies.check(now - 1.5 - TICK, cookie, CLIENT, SERVICE, 40000, 443, 12345) is None


def test_the_mss_index_rounds_down_to_the_table():
    assert [MSS_TABLE[mss_index(m)] for m in (0, 48, 536, 1219, 1220, 1459, 1460, 9000, 65535)] == \
        [536, 536, 536, 536, 1220, 1440, 1460, 8960, 8960]


@given(st.integers(0, M32), st.one_of(st.none(), st.integers(0, 14)), st.booleans())
def test_encoded_timestamps_are_never_ahead_of_the_clock_and_at_most_63_behind(tsval, wscale, sack):
    encoded = encode_options(tsval, wscale, sack)
    assert decode_options(encoded) == (wscale, sack)
    assert 0 <= (tsval - encoded) & M32 < 64


def test_the_faster_python_only_hash_makes_cookies_of_the_same_layout_that_only_it_accepts():
    from netstack.syncookie import BLAKE2S, SIPHASH, SynCookies

    secret = bytes(range(16))
    fast, kernel_like = SynCookies(secret, BLAKE2S), SynCookies(secret, SIPHASH)
    args = (b"\xc6\x33\x64\x07", b"\xc0\x00\x02\x0a", 40000, 443, 123456789)
    isn, ts_base = fast.make(1000.0, *args, 1460)
    assert isn & 7 == 6 and (isn >> 3) & 31 == int(1000.0 // 64) & 31  # MSS 1460, this tick
    assert fast.check(1000.0, isn, *args) == (1460, ts_base)
    assert fast.check(1000.0 + 64, isn, *args) == (1460, ts_base)  # the next tick still
    assert fast.check(1000.0 + 128, isn, *args) is None
    assert fast.check(1000.0, isn ^ 0x100, *args) is None
    # The kernel's hash is another: a cookie of one is not a cookie of the other.
    assert kernel_like.check(1000.0, isn, *args) is None
    assert kernel_like.make(1000.0, *args, 1460) != (isn, ts_base)
    with pytest.raises(ValueError):
        SynCookies(secret, "md5")
