"""A small DNS message codec: AAAA queries out, responses in (sans-I/O).

Enough of RFC 1035 §4 for a stub resolver that asks one question: build a
query for a name's AAAA records (RFC 3596), and read a response's header,
question and resource records, with name compression and the checks a
stub resolver needs before it believes an answer. The client that sends the
queries (UDP, TCP fallback, timeouts) is kracauer.resolver; nothing here does
I/O or keeps time.

Names are given and returned as text: labels joined by dots, without the
trailing dot, ASCII letters lowercased (RFC 4343: DNS names compare
case-insensitively in ASCII only). A label's other bytes are kept as they
are (decoded as Latin-1, so that every byte string has one text).

Malformed input raises ``DnsError`` (a ValueError), never IndexError or
struct.error: a truncated header, a name that runs past the end, a pointer
loop, a record whose data overruns the message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "AAAA", "CLASS_IN", "CNAME", "DnsError", "Message", "NOERROR", "NXDOMAIN", "Question", "Record", "SERVFAIL",
    "SOA", "aaaa_answer", "build_query", "encode_name", "negative_ttl", "parse_message",
]

# RFC 1035 §3.2.2 / RFC 3596 §2.1: the types this codec reads the data of.
A, CNAME, SOA, AAAA = 1, 5, 6, 28
# RFC 1035 §3.2.4: the Internet class.
CLASS_IN = 1
# RFC 1035 §4.1.1 RCODE values.
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = range(6)

# RFC 1035 §4.1.1: ID, flags, QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT.
_HEADER = struct.Struct("!HHHHHH")
HEADER_LEN = _HEADER.size
# RFC 1035 §4.1.2: QTYPE, QCLASS after the name.
_QUESTION_TAIL = struct.Struct("!HH")
# RFC 1035 §4.1.3: TYPE, CLASS, TTL, RDLENGTH after the name.
_RR_TAIL = struct.Struct("!HHIH")
_U32 = struct.Struct("!I")

# Flag bits of the second header word (RFC 1035 §4.1.1).
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
RCODE_MASK = 0x000F

# RFC 1035 §2.3.4: a label is at most 63 octets, a name at most 255 (its wire form).
MAX_LABEL = 63
MAX_NAME = 255
# How many CNAMEs of an answer are followed before giving up (a chain that long is a loop or a mistake).
MAX_CNAME_CHAIN = 16
# RFC 2181 §8: a TTL with the top bit set is read as 0.
MAX_TTL = 0x7FFFFFFF

_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


class DnsError(ValueError):
    """A DNS message that cannot be read, or a name that cannot be sent."""


@dataclass(frozen=True, slots=True)
class Question:
    name: str
    qtype: int
    qclass: int


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record. ``data``: the raw RDATA, except for CNAME (the target name, as text)
    and SOA (the MINIMUM field, an int: all a negative answer needs of it, RFC 2308 §5)."""

    name: str
    rtype: int
    rclass: int
    ttl: int
    data: bytes | str | int


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...]
    answers: tuple[Record, ...]
    authority: tuple[Record, ...]

    @property
    def is_response(self) -> bool:
        return bool(self.flags & QR)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & TC)

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11


# ------------------------------------------------------------------ queries

def encode_name(name: str) -> bytes:
    """RFC 1035 §3.1: a name as length-prefixed labels ending with the root's empty label (no compression)."""
    name = name[:-1] if name.endswith(".") else name
    if not name:
        return b"\0"
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise DnsError(f"name {name!r} is not ASCII (IDNs go in A-label form, RFC 5890)") from None
    out = bytearray()
    for label in raw.split(b"."):
        if not label:
            raise DnsError(f"name {name!r} has an empty label")
        if len(label) > MAX_LABEL:
            raise DnsError(f"name {name!r} has a label longer than {MAX_LABEL} octets")
        out.append(len(label))
        out += label
    out.append(0)
    if len(out) > MAX_NAME:
        raise DnsError(f"name {name!r} is longer than {MAX_NAME} octets")
    return bytes(out)


def build_query(query_id: int, name: str, qtype: int = AAAA, recursion_desired: bool = True) -> bytes:
    """One question (RFC 1035 §4.1.1, §4.1.2): opcode QUERY, RD set for a recursive resolver."""
    if not 0 <= query_id <= 0xFFFF:
        raise DnsError(f"query id {query_id} is not 16 bits")
    flags = RD if recursion_desired else 0
    return _HEADER.pack(query_id, flags, 1, 0, 0, 0) + encode_name(name) + _QUESTION_TAIL.pack(qtype, CLASS_IN)


# ---------------------------------------------------------------- responses

def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at `offset` and the offset after it (after the first pointer, if any).

    RFC 1035 §4.1.4: a label length with the top two bits set is a pointer
    to an earlier name. Each pointer must point before the label sequence it
    ends, so every jump goes backwards and a loop is impossible; the 255-octet
    limit bounds the work besides.
    """
    labels: list[bytes] = []
    length = 0
    end = -1           # where the name ends in the stream we were reading (after the first pointer)
    floor = offset     # a pointer must go below this
    size = len(data)
    while True:
        if offset >= size:
            raise DnsError("a name runs past the end of the message")
        n = data[offset]
        if n & 0xC0 == 0xC0:
            if offset + 1 >= size:
                raise DnsError("a compression pointer runs past the end of the message")
            target = ((n & 0x3F) << 8) | data[offset + 1]
            if target >= floor:
                raise DnsError("a compression pointer does not point backwards (a loop)")
            if end < 0:
                end = offset + 2
            offset = floor = target
            continue
        if n & 0xC0:
            # 0x40 and 0x80: extended label types (RFC 6891 §5), not used in names.
            raise DnsError(f"unknown label type 0x{n & 0xC0:02x}")
        offset += 1
        if n == 0:
            break
        if offset + n > size:
            raise DnsError("a label runs past the end of the message")
        length += n + 1
        if length + 1 > MAX_NAME:
            raise DnsError(f"a name is longer than {MAX_NAME} octets")
        labels.append(data[offset:offset + n].translate(_ASCII_LOWER))
        offset += n
    return b".".join(labels).decode("latin-1"), end if end >= 0 else offset


def _read_record(data: bytes, offset: int) -> tuple[Record, int]:
    """RFC 1035 §4.1.3: NAME, TYPE, CLASS, TTL, RDLENGTH, RDATA."""
    name, offset = _read_name(data, offset)
    if offset + _RR_TAIL.size > len(data):
        raise DnsError("a resource record runs past the end of the message")
    rtype, rclass, ttl, rdlength = _RR_TAIL.unpack_from(data, offset)
    offset += _RR_TAIL.size
    end = offset + rdlength
    if end > len(data):
        raise DnsError("a record's data runs past the end of the message")
    if ttl > MAX_TTL:
        ttl = 0  # RFC 2181 §8
    rdata: bytes | str | int = data[offset:end]
    if rtype == CNAME and rclass == CLASS_IN:
        # RFC 1035 §3.3.1: the canonical name, possibly compressed, filling RDATA exactly.
        target, after = _read_name(data, offset)
        if after != end:
            raise DnsError("a CNAME's name does not fill its record data")
        rdata = target
    elif rtype == SOA and rclass == CLASS_IN:
        # RFC 1035 §3.3.13: MNAME, RNAME, then SERIAL REFRESH RETRY EXPIRE MINIMUM (5 x 32 bits).
        _, after = _read_name(data, offset)
        _, after = _read_name(data, after)
        if after + 20 != end:
            raise DnsError("an SOA record's data has the wrong length")
        rdata = _U32.unpack_from(data, after + 16)[0]
    elif rtype == AAAA and rclass == CLASS_IN and rdlength != 16:
        # RFC 3596 §2.2: a 128-bit address.
        raise DnsError(f"an AAAA record with {rdlength} bytes of data")
    return Record(name, rtype, rclass, ttl, rdata), end


def parse_message(data: bytes | bytearray | memoryview) -> Message:
    """Read a DNS message (RFC 1035 §4.1): header, questions, answers and authority.

    The additional section is not read (a stub resolver has no use for it,
    and its records may be of any type, OPT included).
    """
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise DnsError(f"a DNS message of {len(data)} bytes is shorter than its {HEADER_LEN}-byte header")
    query_id, flags, qdcount, ancount, nscount, _ = _HEADER.unpack_from(data)
    offset = HEADER_LEN
    questions = []
    for _ in range(qdcount):
        name, offset = _read_name(data, offset)
        if offset + _QUESTION_TAIL.size > len(data):
            raise DnsError("a question runs past the end of the message")
        qtype, qclass = _QUESTION_TAIL.unpack_from(data, offset)
        offset += _QUESTION_TAIL.size
        questions.append(Question(name, qtype, qclass))
    sections: list[list[Record]] = [[], []]
    for section, count in zip(sections, (ancount, nscount)):
        for _ in range(count):
            record, offset = _read_record(data, offset)
            section.append(record)
    return Message(query_id, flags, tuple(questions), tuple(sections[0]), tuple(sections[1]))


def _norm(name: str) -> str:
    name = name[:-1] if name.endswith(".") else name
    return name.encode("latin-1", "replace").translate(_ASCII_LOWER).decode("latin-1")


def aaaa_answer(message: Message, name: str) -> tuple[tuple[bytes, ...], int]:
    """The AAAA addresses the answer section gives for `name` and the smallest TTL on the way.

    RFC 1034 §3.6.2, §4.3.2 and RFC 2181 §10.1: an alias is answered with its
    CNAME record and then the records of the canonical name, in the same
    answer; the chain is followed within the answer only (records for names
    the chain does not reach are ignored, RFC 2181 §5.4.1). The TTL is the
    smallest of the CNAMEs followed and the addresses returned. No address:
    ((), 0).
    """
    wanted = _norm(name)
    ttl = MAX_TTL
    seen = {wanted}
    for _ in range(MAX_CNAME_CHAIN + 1):
        addresses = tuple(r.data for r in message.answers
                          if r.rtype == AAAA and r.rclass == CLASS_IN and r.name == wanted)
        if addresses:
            ttl = min([ttl] + [r.ttl for r in message.answers
                               if r.rtype == AAAA and r.rclass == CLASS_IN and r.name == wanted])
            return addresses, ttl  # type: ignore[return-value]
        alias = next((r for r in message.answers
                      if r.rtype == CNAME and r.rclass == CLASS_IN and r.name == wanted), None)
        if alias is None or alias.data in seen:
            return (), 0
        ttl = min(ttl, alias.ttl)
        wanted = alias.data  # type: ignore[assignment]
        seen.add(wanted)
    return (), 0


def negative_ttl(message: Message) -> int | None:
    """RFC 2308 §5: how long a negative answer (NXDOMAIN or NODATA) may be cached:
    the smaller of the authority section's SOA record's TTL and its MINIMUM field.
    None when there is no SOA (such answers SHOULD NOT be cached)."""
    for record in message.authority:
        if record.rtype == SOA and record.rclass == CLASS_IN:
            return min(record.ttl, record.data)  # type: ignore[type-var]
    return None
