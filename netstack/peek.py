"""What a peeker answers after each ``feed``: wait, route, answer with an error, or reset.

The peekers (``netstack.tls.TlsPeeker``, ``netstack.http.HttpPeeker`` and
``netstack.connect.ConnectPeeker``) look at the first bytes a client sends and
return one of these. Like h11's events they are small immutable values;
``NEED_DATA`` is a singleton so callers can test it with ``is``.
"""

from __future__ import annotations

from dataclasses import dataclass


class NeedData:
    """No decision yet: feed the next bytes of the stream."""

    __slots__ = ()
    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        # One instance only, so that ``result is NEED_DATA`` always works.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class Decision:
    """Enough bytes were seen to route the connection.

    ``name``: the TLS SNI host_name or the HTTP host, lowercased, without port
    or trailing dot; None when the hello or request carries no name.
    ``alpn``: the TLS ALPN protocols offered, in order; () for HTTP.
    ``hello_size``: TLS: bytes of the ClientHello handshake message including
    its 4-byte header; HTTP: bytes of the request head including the blank line.
    ``records``: TLS: how many TLS records the ClientHello spanned; HTTP and
    QUIC (a hello in CRYPTO frames, no record layer): 0.
    ``unrouted``: the outcome when no route takes the connection; the tracker
    answers by it: "refused_unknown_name" (TLS alert, HTTP 421, CONNECT 403), or
    "refused_bad_request" (HTTP 400) for a request that names no host at all.
    ``port``: CONNECT: the port the authority names (the host's port unless the
    route gives one); None for TLS and HTTP, whose host port is the listener's.
    """

    name: str | None
    alpn: tuple[str, ...] = ()
    hello_size: int = 0
    records: int = 0
    unrouted: str = "refused_unknown_name"
    port: int | None = None


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A complete request of this protocol that must be answered with an error (HTTP 400) and a close.

    ``hello_size``: bytes of the request head including the blank line.
    ``outcome``: how the tracker answers: "refused_bad_request" (400), or for a
    CONNECT listener "refused_method" (501) for a request that is not a CONNECT.
    """

    reason: str
    hello_size: int = 0
    outcome: str = "refused_bad_request"


@dataclass(frozen=True, slots=True)
class NotProtocol:
    """The bytes are not this protocol, or exceed the cap: reset the connection."""

    reason: str


PeekResult = NeedData | Decision | BadRequest | NotProtocol
