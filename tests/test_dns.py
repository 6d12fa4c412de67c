"""netstack.dns: AAAA queries and responses (RFC 1035 §4, RFC 3596).

Responses are built by scapy's DNS layer (an independent encoder, with
name compression where scapy does it), or by hand where the test needs a
particular byte layout (pointers, truncation, loops).
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR, DNSRRSOA, dns_compress

from netstack import dns

V6 = ipaddress.IPv6Address


def response(qname: str = "a.service.example.com", *, id: int = 0x1234, rcode: int = 0, an=None, ns=None,
             tc: int = 0, qtype: str = "AAAA") -> bytes:
    def records(value):
        return [] if value is None else value if isinstance(value, list) else [value]

    return bytes(DNS(id=id, qr=1, rd=1, ra=1, tc=tc, rcode=rcode, qd=[DNSQR(qname=qname, qtype=qtype)],
                     an=records(an), ns=records(ns)))


def aaaa(name: str, address: str, ttl: int = 300) -> DNSRR:
    return DNSRR(rrname=name, type="AAAA", ttl=ttl, rdata=address)


# ----------------------------------------------------------------- queries

def test_a_query_is_what_scapy_reads_as_one_aaaa_question_with_rd():
    query = dns.build_query(0xBEEF, "A.Service.Example.COM.")
    parsed = DNS(query)
    assert parsed.id == 0xBEEF and parsed.qr == 0 and parsed.rd == 1 and parsed.opcode == 0
    assert parsed.qdcount == 1 and parsed.ancount == parsed.nscount == parsed.arcount == 0
    assert parsed.qd[0].qname == b"A.Service.Example.COM."
    assert parsed.qd[0].qtype == 28 and parsed.qd[0].qclass == 1
    # Byte for byte as scapy builds the same query.
    assert query == bytes(DNS(id=0xBEEF, rd=1, qd=DNSQR(qname="A.Service.Example.COM", qtype="AAAA")))


@pytest.mark.parametrize("name, problem", [
    ("a..example.com", "empty label"),
    ("x" * 64 + ".example.com", "longer than 63"),
    (".".join(["abcdefghi"] * 26), "longer than 255"),
    ("bücher.example", "not ASCII"),
])
def test_names_that_cannot_be_sent_are_refused(name, problem):
    with pytest.raises(dns.DnsError, match=problem):
        dns.build_query(1, name)


def test_a_name_of_exactly_255_octets_is_sent():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 4 + 63*3 + 61 + 1 = 255 octets on the wire
    assert len(dns.encode_name(name)) == 255
    with pytest.raises(dns.DnsError):
        dns.encode_name(name + "b")


# ---------------------------------------------------------------- responses

def test_a_response_with_two_aaaa_records_gives_both_and_the_smaller_ttl():
    data = response(an=[aaaa("a.service.example.com", "2001:db8:100::10", 300),
                        aaaa("a.service.example.com", "2001:db8:100::11", 60)])
    message = dns.parse_message(data)
    assert message.id == 0x1234 and message.is_response and not message.truncated
    assert message.rcode == dns.NOERROR
    assert message.questions == (dns.Question("a.service.example.com", dns.AAAA, dns.CLASS_IN),)
    addresses, ttl = dns.aaaa_answer(message, "a.service.example.com")
    assert [V6(a) for a in addresses] == [V6("2001:db8:100::10"), V6("2001:db8:100::11")]
    assert ttl == 60


def test_names_compare_without_case_and_trailing_dot():
    data = response("A.Service.Example.Com", an=aaaa("A.SERVICE.example.com", "2001:db8:100::10"))
    message = dns.parse_message(data)
    assert message.questions[0].name == "a.service.example.com"
    assert dns.aaaa_answer(message, "a.service.EXAMPLE.com.")[0] == (V6("2001:db8:100::10").packed,)


def test_compression_pointers_are_followed():
    # scapy's dns_compress turns the answer's owner name into a pointer at the question's name.
    data = bytes(dns_compress(DNS(response(an=aaaa("a.service.example.com", "2001:db8:100::10")))))
    assert b"\xc0\x0c" in data
    message = dns.parse_message(data)
    assert message.answers[0].name == "a.service.example.com"


def test_a_pointer_into_the_middle_of_a_name_gives_its_suffix():
    header = struct.pack("!HHHHHH", 7, 0x8180, 1, 1, 0, 0)
    question = b"\x01a\x07service\x07example\x03com\x00" + struct.pack("!HH", 28, 1)
    # The owner "b" + pointer to "service.example.com" (offset 12 + 2).
    owner = b"\x01b\xc0\x0e"
    record = owner + struct.pack("!HHIH", 28, 1, 30, 16) + V6("2001:db8:100::b").packed
    message = dns.parse_message(header + question + record)
    assert message.answers[0].name == "b.service.example.com"
    assert message.answers[0].ttl == 30


@pytest.mark.parametrize("compress", [False, True])
def test_a_cname_chain_is_followed_within_the_answer(compress):
    data = response("www.service.example.com",
                    an=[DNSRR(rrname="www.service.example.com", type="CNAME", ttl=120, rdata="web.service.example.com"),
                        DNSRR(rrname="web.service.example.com", type="CNAME", ttl=90, rdata="a.service.example.com"),
                        aaaa("a.service.example.com", "2001:db8:100::10", 300),
                        aaaa("other.example.com", "2001:db8:100::99", 300)])
    if compress:  # the CNAMEs' targets become pointers too
        data = bytes(dns_compress(DNS(data)))
    message = dns.parse_message(data)
    assert message.answers[0].data == "web.service.example.com"
    addresses, ttl = dns.aaaa_answer(message, "www.service.example.com")
    assert addresses == (V6("2001:db8:100::10").packed,)
    assert ttl == 90  # the smallest TTL on the way


def test_a_cname_loop_gives_no_address():
    data = response("x.example.com",
                    an=[DNSRR(rrname="x.example.com", type="CNAME", rdata="y.example.com"),
                        DNSRR(rrname="y.example.com", type="CNAME", rdata="x.example.com")])
    assert dns.aaaa_answer(dns.parse_message(data), "x.example.com") == ((), 0)


def test_records_for_other_names_are_not_believed():
    data = response(an=aaaa("evil.example.net", "2001:db8:100::66"))
    assert dns.aaaa_answer(dns.parse_message(data), "a.service.example.com") == ((), 0)


def test_nxdomain_with_an_soa_gives_the_negative_ttl_of_rfc_2308():
    soa = DNSRRSOA(rrname="example.com", ttl=900, mname="ns.example.com", rname="h.example.com", minimum=30)
    message = dns.parse_message(response("none.example.com", rcode=3, ns=soa))
    assert message.rcode == dns.NXDOMAIN
    assert dns.negative_ttl(message) == 30  # min(SOA TTL, MINIMUM)
    soa = DNSRRSOA(rrname="example.com", ttl=10, mname="ns.example.com", rname="h.example.com", minimum=30)
    assert dns.negative_ttl(dns.parse_message(response("none.example.com", ns=soa))) == 10
    assert dns.negative_ttl(dns.parse_message(response("none.example.com", rcode=3))) is None


def test_the_truncation_bit_is_read():
    assert dns.parse_message(response(tc=1)).truncated


def test_a_ttl_with_the_top_bit_set_is_zero():
    data = bytearray(response(an=aaaa("a.service.example.com", "2001:db8:100::10")))
    data[-22:-18] = b"\x80\x00\x00\x01"  # the TTL field of the last (AAAA) record
    assert dns.parse_message(bytes(data)).answers[0].ttl == 0


# ---------------------------------------------------------------- malformed

def test_a_pointer_loop_is_an_error_not_a_hang():
    header = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0)
    with pytest.raises(dns.DnsError, match="backwards"):
        dns.parse_message(header + b"\xc0\x0c" + struct.pack("!HH", 28, 1))  # points at itself
    with pytest.raises(dns.DnsError, match="backwards"):
        # a name at 12 pointing forward to 16, which points back to 12
        dns.parse_message(header + b"\xc0\x10\x00\x00\xc0\x0c")


@pytest.mark.parametrize("cut", [1, 5, 11, 13, 20, 30, 40, 50, 60])
def test_every_truncation_of_a_response_is_a_clear_error(cut):
    data = response(an=aaaa("a.service.example.com", "2001:db8:100::10"))
    with pytest.raises(dns.DnsError):
        dns.parse_message(data[:len(data) - cut] if cut < len(data) else data[:1])


def test_an_aaaa_record_of_the_wrong_size_is_an_error():
    header = struct.pack("!HHHHHH", 7, 0x8180, 0, 1, 0, 0)
    record = b"\x01a\x00" + struct.pack("!HHIH", 28, 1, 30, 4) + b"\x7f\x00\x00\x01"
    with pytest.raises(dns.DnsError, match="AAAA record with 4 bytes"):
        dns.parse_message(header + record)


def test_an_extended_label_type_is_an_error():
    header = struct.pack("!HHHHHH", 7, 0x8180, 1, 0, 0, 0)
    with pytest.raises(dns.DnsError, match="label type"):
        dns.parse_message(header + b"\x41a\x00" + struct.pack("!HH", 28, 1))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_dns_error(data):
    try:
        message = dns.parse_message(data)
    except dns.DnsError:
        return
    for question in message.questions:
        assert len(question.name) <= 255
    dns.aaaa_answer(message, "a.example.com")
    dns.negative_ttl(message)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True), min_size=1, max_size=5),
       st.lists(st.ip_addresses(v=6), max_size=4), st.integers(0, 2**31 - 1), st.data())
def test_responses_scapy_builds_are_read_back(labels, addresses, ttl, data):
    name = ".".join(labels)
    raw = response(name, an=[aaaa(name, str(address), ttl) for address in addresses])
    message = dns.parse_message(raw)
    got, got_ttl = dns.aaaa_answer(message, name)
    assert got == tuple(a.packed for a in addresses)
    assert got_ttl == (ttl if addresses else 0)
    flip = data.draw(st.integers(0, len(raw) - 1))
    # A flipped byte anywhere: parsed or a DnsError, nothing else.
    damaged = raw[:flip] + bytes([raw[flip] ^ 0xFF]) + raw[flip + 1:]
    try:
        dns.parse_message(damaged)
    except dns.DnsError:
        pass
