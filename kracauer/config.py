"""kracauer's configuration file: TOML in, frozen dataclasses out.

``load_config(path)`` reads and validates a file, ``parse_config(text)`` a
string. Every problem raises ``ConfigError`` with one line of text that names
the file, the line when it is known, the key and what was expected::

    kracauer.toml:14: listen[1].protocol: expected one of "tls", "http", "tcp", "connect", "quic", "bridge", got "smtp"

Array entries are counted from 0 (``listen[0]`` is the first ``[[listen]]``).
Line numbers come from the TOML parser for syntax errors; for the other errors
they are found by a light scan of the text for the key (or its table header),
and left out when the key cannot be located.

docs/configuration.md is the reference for every key; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "Config",
    "ConfigError",
    "Bridge",
    "BridgeListener",
    "Fallback",
    "Limits",
    "Listener",
    "LogConfig",
    "MetricsConfig",
    "StateConfig",
    "AgentsConfig",
    "AgentToken",
    "AgentConfig",
    "PROTOCOLS",
    "ResolverConfig",
    "Route",
    "TunConfig",
    "load_config",
    "parse_config",
    "load_agent_config",
    "parse_agent_config",
    "agent_name_key",
]

PROTOCOLS = ("tls", "http", "tcp", "connect", "quic", "bridge")
# Listeners whose packets come through the TUN (a "bridge" listener is a TLS socket of its own;
# a "quic" one takes UDP, netstack.udptracker).
TUN_PROTOCOLS = ("tls", "http", "tcp", "connect", "quic")


class ConfigError(ValueError):
    """An invalid configuration. ``str()`` is the whole single-line message.

    ``source``, ``line`` and ``key`` repeat the parts of the message for
    callers that want them separately (each may be None).
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.line = line
        self.key = key


@dataclass(frozen=True)
class TunConfig:
    name: str = "kracauer0"      # 1..15 bytes, no '/', ':' or whitespace (IFNAMSIZ)
    mtu: int = 1500              # MTU of the IPv6 path to the hosts; 1280..65535 (RFC 8200 section 5)
    offload: bool = True         # IFF_VNET_HDR with TSO/checksum offloads: 64 KiB super-packets
    user: str | None = None      # drop to this user (and its group), with no capabilities, once set up
    # Worker processes, one per TUN queue; None ("auto"): one per CPU this process may run on.
    workers: int | None = None

    def worker_count(self) -> int:
        """The number of workers to run: `workers`, or one per usable CPU."""
        if self.workers is not None:
            return self.workers
        return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def _all_hosts(obj) -> None:
    """Fill `hosts` from `host` when only one host was given (frozen dataclasses)."""
    if not obj.hosts and obj.host is not None:
        object.__setattr__(obj, "hosts", (obj.host,))


@dataclass(frozen=True)
class Listener:
    address: ipaddress.IPv4Address
    port: int                    # 1..65535
    protocol: str                # "tls" | "http" | "tcp" | "connect" | "quic" (UDP)
    host: ipaddress.IPv6Address | None = None   # required for "tcp", forbidden for the others (the first host)
    hosts: tuple[ipaddress.IPv6Address, ...] = ()   # every host, in the order written
    prefix: ipaddress.IPv6Network | None = None     # overrides [translate] prefix for this listener
    allow: tuple[ipaddress.IPv4Network, ...] = ()   # "connect" only (required): client networks it serves
    ports: tuple[int, ...] = ()  # "connect" only: the ports a CONNECT may name (default 443)

    def __post_init__(self) -> None:
        _all_hosts(self)


@dataclass(frozen=True)
class BridgeListener:
    """A bridge peer's TLS listener (docs/configuration.md, "protocol = bridge"): sockets, not the TUN."""

    address: ipaddress.IPv4Address
    port: int
    cert: str                    # this peer's certificate chain (PEM), read at start while still root
    key: str                     # its private key (PEM)
    client_ca: str               # only ingress boxes with a certificate from this CA may open tunnels
    prefix: ipaddress.IPv6Network   # the hosts see prefix::client; routed `local` on lo, never into the TUN
    ports: tuple[int, ...] = (443,)  # the ports a tunnel's CONNECT may name


@dataclass(frozen=True)
class Bridge:
    """An ingress box's peer kracauer ([[bridge]]), which routes bridge routes' connections onwards."""

    name: str
    address: str                 # the peer: a host name or an IP address (as written, without port)
    port: int
    server_name: str             # the outer SNI: the one name the firewall lets through
    ca: str                      # verifies the peer's certificate
    cert: str                    # this box's client certificate (PEM)
    key: str                     # its private key


@dataclass(frozen=True)
class Route:
    name: str                    # as written in the file
    host: ipaddress.IPv6Address | None  # the first host; None for a resolve route; the relay's address for a bridge route
    port: int | None = None      # None: the listener's port
    hosts: tuple[ipaddress.IPv6Address, ...] = ()   # every host (a client's address picks one)
    alpn: str | None = None      # only for TLS clients that offer this ALPN protocol
    # resolve = true: the hosts are the client's name's AAAA records (kracauer.resolver),
    # those inside `networks` only; such a route has no host.
    resolve: bool = False
    networks: tuple[ipaddress.IPv6Network, ...] = ()
    bridge: str | None = None    # the [[bridge]] name: the connection goes to the local relay (relay_address()), then the peer

    def __post_init__(self) -> None:
        _all_hosts(self)


@dataclass(frozen=True)
class Fallback:
    host: ipaddress.IPv6Address
    port: int | None = None
    hosts: tuple[ipaddress.IPv6Address, ...] = ()

    def __post_init__(self) -> None:
        _all_hosts(self)


@dataclass(frozen=True)
class Health:
    max_fails: int = 3           # consecutive failed connects before a host is skipped
    fail_timeout: float = 30.0   # seconds a failing host is skipped


@dataclass(frozen=True)
class Limits:
    hello_timeout: float = 10.0      # seconds to wait for the first bytes / a decision; > 0
    hello_max_bytes: int = 16384     # 512..65536
    connect_timeout: float = 10.0    # seconds to wait for the host's SYN-ACK; > 0
    idle_timeout: float = 7440.0     # established idle timeout, RFC 5382 REQ-5 (2 h 4 min); > 0
    max_connections: int = 100_000   # all tracked connections; new ones past it get an RST
    max_peeking: int = 10_000        # connections still sending their hello; the oldest is reset past it
    syn_backlog: int = 1024          # half-open handshakes kept with state; SYN cookies past it
    host_try_timeout: float = 3.0    # with several hosts, seconds one may take before the next is tried; <= connect_timeout
    max_tunnels: int = 10_000        # bridge tunnels open at once in this process (ingress relay and peer listener each)
    udp_idle_timeout: float = 60.0   # quic: a flow ends this long after its last datagram; > 0
    udp_max_peeking: int = 10_000    # quic: flows still sending their Initials; the oldest is dropped past it
    udp_peek_max_bytes: int = 16384  # quic: datagram bytes held per peeking flow, 1200..65536
    udp_peek_max_datagrams: int = 8  # quic: datagrams held per peeking flow, 1..64


@dataclass(frozen=True)
class ResolverConfig:
    """``[resolver]``: how resolve routes look names up (kracauer.resolver)."""

    # (address, port) of each DNS server, tried in order; () for the system's (/etc/resolv.conf).
    servers: tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...] = ()
    timeout: float = 2.0         # seconds one query waits for an answer from one server
    attempts: int = 2            # rounds over the servers before a lookup gives up (a timeout)
    cache_size: int = 10_000     # names cached; the oldest goes past it
    max_ttl: int = 3600          # cap on the TTL of an answer (seconds)
    negative_ttl: int = 60       # cap on the TTL of a name without AAAA (RFC 2308 §5: the SOA's)
    failure_ttl: int = 5         # how long a timeout or server failure is remembered (RFC 2308 §7)


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogConfig:
    access: str | None = None        # access log: an absolute path, "-" for stdout, None for none
    level: str = "info"              # threshold of the daemon's own log (stderr): LOG_LEVELS


@dataclass(frozen=True)
class MetricsConfig:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address   # where /metrics is served
    port: int                                                 # 1..65535

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class StateConfig:
    file: str                        # absolute path of the state file written on SIGTERM/SIGINT


KERNEL_PATH_MODES = ("auto", True, False)


@dataclass(frozen=True)
class KernelPathConfig:
    # "auto": translate established connections in the kernel (BPF) when the
    # program loads, else say why once and use the Python path; True: fail at
    # start if it cannot load; False: the Python path only.
    enabled: str | bool = "auto"
    pin_dir: str = "/sys/fs/bpf/kracauer"   # the maps are pinned under <pin_dir>/<tun name>/ (a bpffs)
    max_flows: int | None = None            # flow map entries (two per connection); None: 2 x max_connections
    # SYNs without timestamps a second, per listener and per CPU, that the kernel
    # hands to Python (answered with state, keeping window scale and SACK); past
    # it the kernel answers them with cookies too. 0: the kernel answers every SYN.
    python_syn_rate: int = 1000


@dataclass(frozen=True)
class AgentToken:
    sha256: str                      # 64 lowercase hex digits: SHA-256 of the token (never the token itself)
    names: tuple[str, ...]           # exact names and "*.suffix" wildcards this token may register


@dataclass(frozen=True)
class AgentsConfig:
    """``[agents]``: hosts behind NAT dial in (kracauer/agents.py, docs/agents.md)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address   # where agents connect (TLS)
    port: int
    cert: str                        # the box's certificate chain (PEM) and key, for the agents' TLS
    key: str
    tokens: tuple[AgentToken, ...]
    tun: str = "kagents0"            # the hub's TUN: packets for the agents' addresses are routed into it
    network: ipaddress.IPv6Network = ipaddress.IPv6Network("fd00:6b72::/64")   # agents' addresses come from here
    keepalive: float = 10.0          # seconds between keepalives; 3 silent intervals end a tunnel

    @property
    def listen(self) -> str:
        return f"[{self.address}]:{self.port}" if self.address.version == 6 else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Config:
    tun: TunConfig
    prefix: ipaddress.IPv6Network    # exactly a /96 (RFC 6052 section 2.2), host bits zero
    listeners: tuple[Listener, ...]  # at least one; (address, port) unique
    routes: tuple[Route, ...]
    fallback: Fallback | None
    limits: Limits
    source: str = "<string>"         # file path for messages
    health: Health = Health()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig | None = None   # None: no metrics endpoint
    state: StateConfig | None = None       # None: no state kept across restarts, TUN not persistent
    kernel_path: KernelPathConfig = KernelPathConfig()
    resolver: ResolverConfig = ResolverConfig()
    bridges: tuple[Bridge, ...] = ()                  # [[bridge]]: peers of this ingress box
    bridge_listeners: tuple[BridgeListener, ...] = ()  # [[listen]] with protocol "bridge" (not in `listeners`)
    agents: AgentsConfig | None = None     # None: no agents can dial in
    # The TOML it was read from (a supervisor hands this text to its workers); not part of its value.
    text: str = dataclasses.field(default="", compare=False, repr=False)


def normalize_server_name(name: str) -> str:
    name = name.lower() if name.isascii() else name
    return name[:-1] if name.endswith(".") else name


def relay_address(prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """The ingress relay's address: the prefix with 255.255.255.255 embedded.

    No client can have that address (RFC 919 §7: limited broadcast is never a
    source), it lies in the prefix that is routed into the TUN already (so the
    relay's answers to prefix::client go back into the TUN with no new route),
    and kracauer puts it on its own TUN device (/128), so the packets it
    writes into the TUN for it are delivered locally.
    """
    return prefix.network_address + 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Entry points

def load_config(path: str | os.PathLike) -> Config:
    """Read, parse and validate the configuration file at ``path``."""
    source = os.fspath(path)
    if isinstance(source, bytes):
        source = os.fsdecode(source)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"{source}: cannot read the file: {reason}", source=source) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{source}:{line}: the file is not valid UTF-8 (TOML files must be)",
                          source=source, line=line) from None
    return parse_config(text, source=source)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML ``text``; ``source`` names it in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(e, source, text) from None
    return dataclasses.replace(_Validator(text, source).config(doc), text=text)


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$|\s*\(at end of document\)$")


def _syntax_error(e: Exception, source: str, text: str) -> ConfigError:
    message = str(e)
    line = getattr(e, "lineno", None)
    column = getattr(e, "colno", None)
    match = _TOML_POSITION.search(message)
    if match:
        # Python 3.11..3.13 only put the position in the message.
        if match.group(1) and line is None:
            line, column = int(match.group(1)), int(match.group(2))
        elif line is None:  # "at end of document"
            line = max(1, len(text.splitlines()))
        message = message[:match.start()]
    where = source if line is None else f"{source}:{line}" if column is None else f"{source}:{line}:{column}"
    return ConfigError(f"{where}: invalid TOML: {message}", source=source, line=line)


# ---------------------------------------------------------------------------
# Locating keys in the text (best effort, for line numbers in messages)

Path = tuple  # of str (table keys) and int (array indices)

_KEY_PART = r'(?:[A-Za-z0-9_-]+|"[^"\\\n]*"|\'[^\'\n]*\')'
_DOTTED = rf"{_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART})*"
_ARRAY_HEADER = re.compile(rf"[ \t]*\[\[[ \t]*({_DOTTED})[ \t]*\]\][ \t]*(?:#.*)?$")
_TABLE_HEADER = re.compile(rf"[ \t]*\[[ \t]*({_DOTTED})[ \t]*\][ \t]*(?:#.*)?$")
_KEY_VALUE = re.compile(rf"[ \t]*({_DOTTED})[ \t]*=(.*)$")
_PART = re.compile(_KEY_PART)


def _key_parts(dotted: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _PART.findall(dotted))


class _Locator:
    """Maps key paths to the line that defines them, by scanning the TOML text.

    Handles tables, arrays of tables, dotted keys and skips multi-line
    strings; keys inside inline tables are not located (the line of the
    enclosing key is used instead).
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[Path, int] = {}
        arrays: dict[Path, int] = {}
        current: Path = ()
        in_string: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            match = _ARRAY_HEADER.match(line)
            if match:
                parts = _key_parts(match.group(1))
                array = self._resolve(parts, arrays)
                index = arrays.get(array, -1) + 1
                arrays[array] = index
                self.lines.setdefault(array, number)
                current = array + (index,)
                self.lines.setdefault(current, number)
                continue
            match = _TABLE_HEADER.match(line)
            if match:
                current = self._resolve(_key_parts(match.group(1)), arrays)
                self.lines.setdefault(current, number)
                continue
            match = _KEY_VALUE.match(line)
            if match:
                self.lines.setdefault(current + _key_parts(match.group(1)), number)
                value = match.group(2)
                for quote in ('"""', "'''"):
                    if value.count(quote) % 2 == 1:
                        in_string = quote
                        break

    @staticmethod
    def _resolve(parts: tuple[str, ...], arrays: dict[Path, int]) -> Path:
        path: Path = ()
        for i, part in enumerate(parts):
            path += (part,)
            if path in arrays and i < len(parts) - 1:
                path += (arrays[path],)
        return path

    def line(self, path: Path) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def _format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


# ---------------------------------------------------------------------------
# Describing values in messages

def _quote(s: str, limit: int = 60) -> str:
    if len(s) > limit:
        s = s[:limit] + "..."
    return json.dumps(s, ensure_ascii=False)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a date/time ({value})"


def _show(value: Any) -> str:
    """The value as it would be written in TOML, for "got X" in range errors."""
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------
# Names of routes

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def _dns_name_problem(name: str) -> str | None:
    """Why ``name`` (already lowercased, without trailing dot) is not a DNS name, or None."""
    if not name:
        return "the name is empty"
    if not name.isascii():
        return "only ASCII letters, digits, hyphens and dots are allowed (write internationalized names in their xn-- form)"
    if len(name) > 253:
        return f"a DNS name has at most 253 characters, this one has {len(name)}"
    for label in name.split("."):
        if not label:
            return "empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"label {_quote(label)} is longer than 63 characters"
        if not _LABEL.match(label):
            if label.startswith("-") or label.endswith("-"):
                return f"label {_quote(label)} starts or ends with a hyphen"
            return f"label {_quote(label)} may only contain letters, digits and hyphens"
    return None


def _route_name_key(name: str) -> tuple[str, str] | str:
    """Classify a route name: ("exact"|"wildcard"|"regex", key) or a problem string.

    The key is what duplicates are detected on: the normalized name, the
    normalized wildcard suffix, or the regular expression as written.
    """
    if name.startswith("~"):
        pattern = name[1:]
        if not pattern:
            return "a regular expression route needs a pattern after '~'"
        try:
            re.compile(pattern, re.IGNORECASE | re.ASCII)
        except re.error as e:
            return f"invalid regular expression {_quote(pattern)}: {e}"
        return ("regex", pattern)
    lowered = name.lower() if name.isascii() else name
    if lowered.endswith("."):
        lowered = lowered[:-1]
    if lowered.startswith("*."):
        suffix = lowered[2:]
        problem = _dns_name_problem(suffix)
        if problem:
            return f"invalid wildcard name: {problem}"
        return ("wildcard", suffix)
    if "*" in lowered:
        return "a wildcard is only allowed as the whole first label, like \"*.example.com\""
    problem = _dns_name_problem(lowered)
    if problem:
        return f"invalid name: {problem}"
    return ("exact", lowered)


def agent_name_key(name: str) -> tuple[str, str]:
    """An agent's name (or a token's allowed name): ("exact"|"wildcard", normalized key); ValueError if it is neither.

    Agents register exact names and ``*.suffix`` wildcards only: a regular
    expression is the operator's tool, not something a host may claim.
    """
    if name.startswith("~"):
        raise ValueError("agents register exact names and \"*.suffix\" wildcards, not regular expressions")
    kind = _route_name_key(name)
    if isinstance(kind, str):
        raise ValueError(f"{kind}; got {_quote(name)}")
    return kind  # type: ignore[return-value]


def agent_name_allowed(name: tuple[str, str], allowed: Iterable[tuple[str, str]]) -> bool:
    """Whether a token whose names are `allowed` may register `name` (both as agent_name_key returns them).

    An exact allowed name covers itself; an allowed ``*.s`` covers every name
    under s and every wildcard ``*.t`` with t equal to s or under it, so that
    a token for ``*.dev.example.com`` may register ``app.dev.example.com`` and
    ``*.team.dev.example.com`` but not ``dev.example.com`` itself (as route
    wildcards do not match their bare domain, routing.py).
    """
    kind, key = name
    for allowed_kind, allowed_key in allowed:
        if allowed_kind == "exact":
            if kind == "exact" and key == allowed_key:
                return True
        elif key.endswith("." + allowed_key) or (kind == "wildcard" and key == allowed_key):
            return True
    return False


@dataclass(frozen=True)
class AgentConfig:
    """``kracauer agent --config FILE``: the ``[agent]`` table of a host behind NAT."""

    box_host: str                  # name or address of the box
    box_port: int
    server_name: str               # checked against the box's certificate
    ca: str                        # CA certificate(s) (PEM) the box's certificate must chain to
    token_file: str                # holds the token (its first line)
    names: tuple[str, ...]         # to register; each must be allowed by the box for this token
    tun: str = "kagent0"
    source: str = "<string>"


def load_agent_config(path: str | os.PathLike) -> AgentConfig:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}", source=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}", source=path) from None
    return parse_agent_config(text, path)


def parse_agent_config(text: str, source: str = "<string>") -> AgentConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(e, source, text) from None
    return _Validator(text, source).agent(doc)


# ---------------------------------------------------------------------------
# Validation

_TOP_KEYS = ("tun", "translate", "listen", "route", "fallback", "limits", "health", "log", "metrics", "state", "resolver",
             "kernel_path", "bridge", "agents")
_AGENTS_KEYS = ("listen", "cert", "key", "token", "tun", "network", "keepalive")
_AGENT_TOKEN_KEYS = ("sha256", "names")
_AGENT_KEYS = ("box", "server_name", "ca", "token_file", "names", "tun")
# Names one HELLO may carry (netstack.agentwire.NAMES_MAX; a longer one is refused by the box).
AGENT_NAMES_MAX = 64
_KERNEL_PATH_KEYS = ("enabled", "pin_dir", "max_flows", "python_syn_rate")
_LOG_KEYS = ("access", "level")
_METRICS_KEYS = ("listen",)
_STATE_KEYS = ("file",)
_HEALTH_KEYS = ("max_fails", "fail_timeout")
_TUN_KEYS = ("name", "mtu", "offload", "user", "workers")
# A TUN has at most 256 queues (drivers/net/tun.c, MAX_TAP_QUEUES).
MAX_WORKERS = 256
_TRANSLATE_KEYS = ("prefix",)
_LISTEN_KEYS = ("address", "port", "protocol", "host", "prefix", "allow", "ports", "cert", "key", "client_ca")
_BRIDGE_KEYS = ("name", "address", "server_name", "ca", "cert", "key")
# The target ports a connect listener's CONNECT may name when `ports` is not given.
CONNECT_PORTS = (443,)
_ROUTE_KEYS = ("name", "host", "port", "alpn", "resolve", "networks", "bridge")
_RESOLVER_KEYS = ("servers", "timeout", "attempts", "cache_size", "max_ttl", "negative_ttl", "failure_ttl")
# [resolver] integer keys and their ranges (seconds for the TTLs).
_RESOLVER_COUNTS = {"attempts": (1, 10), "cache_size": (1, 1_000_000), "max_ttl": (1, 86400),
                    "negative_ttl": (0, 86400), "failure_ttl": (0, 300)}
MAX_RESOLVER_TIMEOUT = 30.0
_FALLBACK_KEYS = ("host", "port")
_LIMITS_KEYS = ("hello_timeout", "hello_max_bytes", "connect_timeout", "host_try_timeout", "idle_timeout",
                "max_connections", "max_peeking", "syn_backlog", "max_tunnels", "udp_idle_timeout", "udp_max_peeking",
                "udp_peek_max_bytes", "udp_peek_max_datagrams")
_LIMITS_COUNTS = {"max_connections": (1, 10_000_000), "max_peeking": (1, 10_000_000), "syn_backlog": (0, 10_000_000),
                  "max_tunnels": (1, 1_000_000), "udp_max_peeking": (1, 10_000_000),
                  # RFC 9000 §14.1: a client's Initial datagram is at least 1200 bytes.
                  "udp_peek_max_bytes": (1200, 65536), "udp_peek_max_datagrams": (1, 64)}

_MISSING = object()

# Prefixes that cannot carry client addresses: the source addresses would be
# unspecified/loopback (::/96), IPv4-mapped, link-local or multicast.
_BAD_PREFIX_RANGES = (
    (ipaddress.IPv6Network("::/96"), "the IPv4-compatible range ::/96 (contains :: and ::1)"),
    (ipaddress.IPv6Network("::ffff:0:0/96"), "the IPv4-mapped range ::ffff:0:0/96"),
    (ipaddress.IPv6Network("fe80::/10"), "the link-local range fe80::/10"),
    (ipaddress.IPv6Network("ff00::/8"), "the multicast range ff00::/8"),
)


def parse_prefix(text: str) -> ipaddress.IPv6Network:
    """Parse a translation prefix; ValueError with a readable reason if it is unusable.

    Shared with the CLI (``kracauer encode --prefix``).
    """
    if "/" not in text:
        raise ValueError(f"expected an IPv6 /96 prefix like \"64:ff9b:1::/96\", got {_quote(text)} (no /96)")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"expected an IPv6 /96 prefix like \"64:ff9b:1::/96\", got {_quote(text)}") from None
    if network.version != 6:
        raise ValueError(f"expected an IPv6 prefix, got IPv4 network {_quote(text)}")
    if "%" in text:
        raise ValueError(f"expected an IPv6 /96 prefix without a zone index, got {_quote(text)}")
    if network.prefixlen != 96:
        raise ValueError(f"the prefix must be exactly a /96 (RFC 6052 section 2.2), got /{network.prefixlen}")
    if ipaddress.ip_interface(text).ip != network.network_address:
        raise ValueError(f"{_quote(text)} has host bits set; the /96 network is \"{network}\"")
    for bad, why in _BAD_PREFIX_RANGES:
        if network.subnet_of(bad):
            raise ValueError(f"the prefix {network} lies in {why}; use a global or ULA prefix such as 64:ff9b:1::/96")
    return network


class _Validator:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.text = text
        self._locator: _Locator | None = None
        self.prefix: ipaddress.IPv6Network | None = None
        self.bridge_names: list[str] = []
        self.bridge_listeners: list[BridgeListener] = []
        self.doc_listen: list[dict] = []

    # -- errors ----------------------------------------------------------

    def error(self, path: Path, message: str) -> ConfigError:
        if self._locator is None:
            self._locator = _Locator(self.text)
        line = self._locator.line(path)
        where = f"{self.source}:{line}" if line is not None else self.source
        key = _format_path(path)
        text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
        return ConfigError(text, source=self.source, line=line, key=key or None)

    # -- generic checks ---------------------------------------------------

    def table(self, parent: dict, path: Path, allowed: Iterable[str], *, required: bool = False) -> dict | None:
        value = parent.get(path[-1], _MISSING)
        if value is _MISSING:
            if required:
                raise self.error(path, f"the [{_format_path(path)}] table is missing (required)")
            return None
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table ([{_format_path(path)}]), got {_describe(value)}")
        self.known_keys(value, path, allowed)
        return value

    def known_keys(self, table: dict, path: Path, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                did_you_mean = f" (did you mean {_quote(hint[0])}?)" if hint else ""
                names = ", ".join(_quote(k) for k in allowed)
                raise self.error(path + (key,), f"unknown key{did_you_mean}; allowed keys: {names}")

    def array_of_tables(self, parent: dict, key: str, allowed: Iterable[str]) -> list[dict]:
        value = parent.get(key, _MISSING)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            raise self.error((key,), f"expected an array of tables ([[{key}]]), got {_describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error((key, i), f"expected a table ([[{key}]]), got {_describe(item)}")
            self.known_keys(item, (key, i), allowed)
        return value

    def require(self, table: dict, path: Path) -> Any:
        value = table.get(path[-1], _MISSING)
        if value is _MISSING:
            raise self.error(path, "required key is missing")
        return value

    def string(self, value: Any, path: Path) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {_describe(value)}")
        return value

    def integer(self, value: Any, path: Path, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"expected an integer from {low} to {high}, got {_describe(value)}")
        if not low <= value <= high:
            raise self.error(path, f"expected an integer from {low} to {high}, got {value}")
        return value

    def boolean(self, value: Any, path: Path) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {_describe(value)}")
        return value

    def port(self, value: Any, path: Path) -> int:
        return self.integer(value, path, 1, 65535)

    def seconds(self, value: Any, path: Path) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(path, f"expected a number of seconds greater than 0, got {_describe(value)}")
        if not math.isfinite(value) or value <= 0:
            raise self.error(path, f"expected a number of seconds greater than 0, got {_show(value)}")
        return float(value)

    def ipv4_address(self, value: Any, path: Path) -> ipaddress.IPv4Address:
        text = self.string(value, path)
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise self.error(path, f"expected an IPv4 address, got {_quote(text)}") from None
        if address.version != 4:
            raise self.error(path, f"expected an IPv4 address, got IPv6 address {_quote(text)}")
        for bad, what in ((address.is_unspecified, "unspecified"), (address.is_loopback, "loopback"),
                          (address.is_multicast, "multicast"),
                          (address == ipaddress.IPv4Address("255.255.255.255"), "broadcast")):
            if bad:
                raise self.error(path, f"{_quote(text)} is a {what} address; expected a unicast address that can be routed into the TUN")
        return address

    def ipv6_hosts(self, value: Any, path: Path) -> tuple[ipaddress.IPv6Address, ...]:
        """One host ("2001:db8::10") or several (["2001:db8::10", "2001:db8::11"])."""
        if isinstance(value, list):
            if not value:
                raise self.error(path, "expected at least one IPv6 address in the list")
            hosts = tuple(self.ipv6_host(item, path) for item in value)
            if len(set(hosts)) != len(hosts):
                raise self.error(path, "the same host is listed twice")
            return hosts
        return (self.ipv6_host(value, path),)

    def ipv6_host(self, value: Any, path: Path) -> ipaddress.IPv6Address:
        text = self.string(value, path)
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise self.error(path, f"expected an IPv6 address, got {_quote(text)}") from None
        if address.version != 6:
            raise self.error(path, f"expected an IPv6 address, got IPv4 address {_quote(text)} (hosts are reached over IPv6)")
        if address.scope_id is not None:
            raise self.error(path, f"expected an IPv6 address without a zone index, got {_quote(text)}")
        problems = (
            (address.ipv4_mapped is not None, "an IPv4-mapped address"),
            (address.is_unspecified, "the unspecified address"),
            (address.is_loopback, "the loopback address"),
            (address.is_multicast, "a multicast address"),
            (address.is_link_local, "a link-local address"),
        )
        for bad, what in problems:
            if bad:
                raise self.error(path, f"{_quote(text)} is {what}; expected a unicast IPv6 address of a host")
        if self.prefix is not None and address in self.prefix:
            raise self.error(path, f"{_quote(text)} lies inside the translate prefix {self.prefix}, which is kept for embedded client addresses")
        return address

    # -- sections -----------------------------------------------------------

    def config(self, doc: dict) -> Config:
        self.known_keys(doc, (), _TOP_KEYS)
        tun = self.tun(doc)
        self.prefix = self.translate(doc)
        bridges = self.bridges(doc)
        self.bridge_names = [b.name for b in bridges]
        listeners = self.listeners(doc)
        self.check_bridge_prefixes(listeners)
        routes = self.routes(doc)
        fallback = self.fallback(doc)
        limits = self.limits(doc)
        health = self.health(doc)
        log = self.log(doc)
        metrics = self.metrics(doc)
        state = self.state(doc)
        kernel_path = self.kernel_path(doc)
        resolver = self.resolver(doc)
        agents = self.agents(doc, tun, listeners, routes, fallback)
        if not routes and fallback is None and agents is None:
            named = [i for i, item in enumerate(doc.get("listen", [])) if item.get("protocol") != "tcp"]
            if named:
                i = named[0]
                raise self.error(("listen", i), f"nothing to route to: this {doc['listen'][i]['protocol']} listener "
                                                "needs at least one [[route]] or a [fallback]")
        return Config(tun=tun, prefix=self.prefix, listeners=tuple(listeners), routes=tuple(routes),
                      fallback=fallback, limits=limits, source=self.source, health=health, log=log,
                      metrics=metrics, state=state, kernel_path=kernel_path,
                      resolver=resolver, bridges=tuple(bridges),
                      bridge_listeners=tuple(self.bridge_listeners), agents=agents)

    def check_bridge_prefixes(self, listeners: list[Listener]) -> None:
        """A bridge listener's prefix is routed `local` on lo: it must not be one routed into the TUN."""
        tun_prefixes = {self.prefix: "[translate] prefix"}
        for i, lst in enumerate(listeners):
            if lst.prefix is not None:
                tun_prefixes.setdefault(lst.prefix, "the prefix of a TUN listener")
        for i, item in enumerate(self.doc_listen):
            if item.get("protocol") != "bridge":
                continue
            bridge = next(b for b in self.bridge_listeners if b.address == ipaddress.IPv4Address(item["address"])
                          and b.port == item["port"])
            if bridge.prefix in tun_prefixes:
                raise self.error(("listen", i, "prefix"), f"{bridge.prefix} is also {tun_prefixes[bridge.prefix]}, "
                                                          "which is routed into the TUN; a bridge listener needs a "
                                                          "prefix of its own (routed local on lo)")

    def tun(self, doc: dict) -> TunConfig:
        table = self.table(doc, ("tun",), _TUN_KEYS)
        if table is None:
            return TunConfig()
        defaults = TunConfig()
        name = defaults.name
        if "name" in table:
            name = self.interface_name(table["name"], ("tun", "name"))
        mtu = defaults.mtu
        if "mtu" in table:
            mtu = self.integer(table["mtu"], ("tun", "mtu"), 1280, 65535)
        offload = defaults.offload
        if "offload" in table:
            offload = self.boolean(table["offload"], ("tun", "offload"))
        user = defaults.user
        if "user" in table:
            user = self.string(table["user"], ("tun", "user"))
            if not user or any(c.isspace() or c == ":" for c in user):
                raise self.error(("tun", "user"), f"expected a user name, got {_quote(user)}")
        workers = defaults.workers
        if "workers" in table:
            value = table["workers"]
            if value != "auto":
                if isinstance(value, str):
                    raise self.error(("tun", "workers"), f'expected "auto" or an integer from 1 to {MAX_WORKERS}, '
                                                         f"got {_describe(value)}")
                workers = self.integer(value, ("tun", "workers"), 1, MAX_WORKERS)
        return TunConfig(name=name, mtu=mtu, offload=offload, user=user, workers=workers)

    def interface_name(self, value: Any, path: Path) -> str:
        name = self.string(value, path)
        problem = None
        if not name:
            problem = "the name is empty"
        elif len(name.encode("utf-8")) > 15:
            problem = f"an interface name has at most 15 bytes (IFNAMSIZ), this one has {len(name.encode('utf-8'))}"
        elif name in (".", ".."):
            problem = "\".\" and \"..\" are not interface names"
        elif any(c.isspace() or c in "/:" or not c.isprintable() for c in name):
            problem = "an interface name may not contain '/', ':', whitespace or control characters"
        if problem:
            raise self.error(path, f"{problem}, got {_quote(name)}")
        return name

    def translate(self, doc: dict) -> ipaddress.IPv6Network:
        table = self.table(doc, ("translate",), _TRANSLATE_KEYS, required=True)
        assert table is not None
        path = ("translate", "prefix")
        text = self.string(self.require(table, path), path)
        try:
            return parse_prefix(text)
        except ValueError as e:
            raise self.error(path, str(e)) from None

    def listeners(self, doc: dict) -> list[Listener]:
        items = self.array_of_tables(doc, "listen", _LISTEN_KEYS)
        self.doc_listen = items
        if not items:
            raise self.error(("listen",), "at least one [[listen]] entry is required")
        listeners: list[Listener] = []
        seen: dict[tuple[ipaddress.IPv4Address, int, str], int] = {}
        for i, item in enumerate(items):
            path = ("listen", i)
            address = self.ipv4_address(self.require(item, path + ("address",)), path + ("address",))
            port = self.port(self.require(item, path + ("port",)), path + ("port",))
            protocol = self.string(self.require(item, path + ("protocol",)), path + ("protocol",))
            if protocol not in PROTOCOLS:
                choices = ", ".join(_quote(p) for p in PROTOCOLS)
                hint = " (a UDP listener is protocol = \"quic\": HTTP/3 routed by name)" if protocol in ("udp", "h3", "http3") else ""
                raise self.error(path + ("protocol",), f"expected one of {choices}, got {_quote(protocol)}{hint}")
            hosts: tuple[ipaddress.IPv6Address, ...] = ()
            # A quic listener takes UDP: it may share its address and port with a TCP listener (HTTP/3
            # next to HTTPS on 443), not with another quic one.
            transport = "udp" if protocol == "quic" else "tcp"
            if (address, port, transport) in seen:
                raise self.error(path, f"{address}:{port} is already used by listen[{seen[address, port, transport]}]"
                                       + (" (UDP)" if transport == "udp" else ""))
            if protocol == "bridge":
                seen[address, port, transport] = i
                self.bridge_listeners.append(self.bridge_listener(item, path, address, port))
                continue
            for key in ("cert", "key", "client_ca"):
                if key in item:
                    raise self.error(path + (key,), f"only allowed with protocol \"bridge\" (this listener is {_quote(protocol)})")
            if protocol == "tcp":
                hosts = self.ipv6_hosts(self.require(item, path + ("host",)), path + ("host",))
            elif "host" in item:
                raise self.error(path + ("host",), f"only allowed with protocol \"tcp\" (this listener is {_quote(protocol)}; "
                                                   "its hosts come from [[route]] and [fallback])")
            allow, ports = self.connect_policy(item, path, protocol)
            seen[address, port, transport] = i
            prefix = None
            if "prefix" in item:
                text = self.string(item["prefix"], path + ("prefix",))
                try:
                    prefix = parse_prefix(text)
                except ValueError as e:
                    raise self.error(path + ("prefix",), str(e)) from None
            listeners.append(Listener(address=address, port=port, protocol=protocol,
                                      host=hosts[0] if hosts else None, hosts=hosts, prefix=prefix,
                                      allow=allow, ports=ports))
        return listeners

    def bridge_listener(self, item: dict, path: Path, address: ipaddress.IPv4Address, port: int) -> BridgeListener:
        """A bridge peer's listener: its certificate, the CA of the ingress boxes, and its own local prefix."""
        for key in ("host", "allow"):
            if key in item:
                raise self.error(path + (key,), "not allowed with protocol \"bridge\" (its hosts come from [[route]]; "
                                                "who may use it is decided by client_ca)")
        files = {key: self.absolute_path(self.require(item, path + (key,)), path + (key,))
                 for key in ("cert", "key", "client_ca")}
        text = self.string(self.require(item, path + ("prefix",)), path + ("prefix",))
        try:
            prefix = parse_prefix(text)
        except ValueError as e:
            raise self.error(path + ("prefix",), str(e)) from None
        ports = CONNECT_PORTS
        if "ports" in item:
            ports = self.port_list(item["ports"], path + ("ports",))
        return BridgeListener(address=address, port=port, prefix=prefix, ports=ports, **files)

    def port_list(self, value: Any, path: Path) -> tuple[int, ...]:
        if value == []:
            raise self.error(path, "the list is empty: no CONNECT could be served")
        if not isinstance(value, list):
            raise self.error(path, f"expected a list of ports like [443], got {_describe(value)}")
        ports = tuple(self.port(entry, path) for entry in value)
        if len(set(ports)) != len(ports):
            raise self.error(path, "the same port is listed twice")
        return ports

    def bridges(self, doc: dict) -> list[Bridge]:
        items = self.array_of_tables(doc, "bridge", _BRIDGE_KEYS)
        bridges: list[Bridge] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            path = ("bridge", i)
            name = self.string(self.require(item, path + ("name",)), path + ("name",))
            if not name or any(c.isspace() for c in name):
                raise self.error(path + ("name",), f"expected a name without spaces, got {_quote(name)}")
            if name in seen:
                raise self.error(path + ("name",), f"{_quote(name)} is already the name of bridge[{seen[name]}]")
            seen[name] = i
            host, port = self.host_port(self.require(item, path + ("address",)), path + ("address",))
            server_name = normalize_server_name(self.string(self.require(item, path + ("server_name",)),
                                                            path + ("server_name",)))
            try:
                ipaddress.ip_address(server_name)
                # RFC 6066 §3: no IP literal in a server_name; ssl would send no SNI at all for it.
                problem = "an IP address is not a server name (RFC 6066 §3), and no SNI would be sent for it"
            except ValueError:
                problem = _dns_name_problem(server_name)
            if problem:
                raise self.error(path + ("server_name",), f"expected a DNS name (the outer SNI): {problem}")
            files = {key: self.absolute_path(self.require(item, path + (key,)), path + (key,))
                     for key in ("ca", "cert", "key")}
            bridges.append(Bridge(name=name, address=host, port=port, server_name=server_name, **files))
        return bridges

    def host_port(self, value: Any, path: Path) -> tuple[str, int]:
        """ "203.0.113.20:4443", "[2001:db8::20]:4443" or "peer.example.com:4443"."""
        text = self.string(value, path)
        expected = 'expected "HOST:PORT", e.g. "203.0.113.20:4443", "[2001:db8::20]:4443" or "peer.example.com:4443"'
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or not port_text.isascii() or not host:
            raise self.error(path, f"{expected}, got {_quote(text)}")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise self.error(path, f"expected a port from 1 to 65535, got {port} in {_quote(text)}")
        if host.startswith("[") and host.endswith("]"):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise self.error(path, f"{expected}, got {_quote(text)}") from None
            return host[1:-1], port
        try:
            ipaddress.IPv4Address(host)
            return host, port
        except ValueError:
            pass
        if ":" in host or _dns_name_problem(normalize_server_name(host)):
            raise self.error(path, f"{expected} (IPv6 addresses in brackets), got {_quote(text)}")
        return normalize_server_name(host), port

    def connect_policy(self, item: dict, path: Path,
                       protocol: str) -> tuple[tuple[ipaddress.IPv4Network, ...], tuple[int, ...]]:
        """A connect listener's `allow` (required: never an open proxy) and `ports`; forbidden elsewhere."""
        if protocol != "connect":
            for key in ("allow", "ports"):
                if key in item:
                    raise self.error(path + (key,), f"only allowed with protocol \"connect\" (this listener is {_quote(protocol)})")
            return (), ()
        if "allow" not in item:
            raise self.error(path + ("allow",), "required with protocol \"connect\": the client networks that may use "
                                                "this proxy, like [\"198.51.100.0/24\"] (kracauer is never an open proxy)")
        value = item["allow"]
        if value == []:
            raise self.error(path + ("allow",), "the list is empty: this proxy would serve nobody")
        if not isinstance(value, list):
            raise self.error(path + ("allow",), f"expected a list of IPv4 networks like [\"198.51.100.0/24\"], got {_describe(value)}")
        allow = tuple(self.ipv4_network(entry, path + ("allow",)) for entry in value)
        ports = CONNECT_PORTS
        if "ports" in item:
            value = item["ports"]
            if value == []:
                raise self.error(path + ("ports",), "the list is empty: no CONNECT could be served")
            if not isinstance(value, list):
                raise self.error(path + ("ports",), f"expected a list of ports like [443], got {_describe(value)}")
            ports = tuple(self.port(entry, path + ("ports",)) for entry in value)
            if len(set(ports)) != len(ports):
                raise self.error(path + ("ports",), "the same port is listed twice")
        return allow, ports

    def ipv4_network(self, value: Any, path: Path) -> ipaddress.IPv4Network:
        """An IPv4 network ("198.51.100.0/24") or one address ("198.51.100.7", a /32)."""
        text = self.string(value, path)
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise self.error(path, f"expected an IPv4 network like \"198.51.100.0/24\", got {_quote(text)}") from None
        if network.version != 4:
            raise self.error(path, f"expected an IPv4 network (clients connect over IPv4), got {_quote(text)}")
        if ipaddress.ip_interface(text).ip != network.network_address and "/" in text:
            raise self.error(path, f"{_quote(text)} has host bits set; the network is \"{network}\"")
        return network

    def routes(self, doc: dict) -> list[Route]:
        items = self.array_of_tables(doc, "route", _ROUTE_KEYS)
        routes: list[Route] = []
        seen: dict[tuple[str, str], int] = {}
        for i, item in enumerate(items):
            path = ("route", i)
            name = self.string(self.require(item, path + ("name",)), path + ("name",))
            kind = _route_name_key(name)
            if isinstance(kind, str):
                got = "" if name.startswith("~") else f"; got {_quote(name)}"
                raise self.error(path + ("name",), kind + got)
            alpn = None
            if "alpn" in item:
                alpn = self.string(item["alpn"], path + ("alpn",))
                # RFC 7301 §3.1: a protocol name is 1 to 255 bytes.
                if not 1 <= len(alpn.encode()) <= 255:
                    raise self.error(path + ("alpn",), f"expected an ALPN protocol name of 1 to 255 bytes, got {_quote(alpn)}")
            if (kind, alpn) in seen:
                raise self.error(path + ("name",), f"{_quote(name)} duplicates route[{seen[kind, alpn]}].name "
                                                   f"{_quote(items[seen[kind, alpn]]['name'])}")
            seen[kind, alpn] = i
            port = self.port(item["port"], path + ("port",)) if "port" in item else None
            if "bridge" in item:
                bridge = self.string(item["bridge"], path + ("bridge",))
                for other in ("host", "resolve", "networks"):
                    if other in item:
                        raise self.error(path + (other,), f"a route goes to a bridge or has {other}, not both")
                if bridge not in self.bridge_names:
                    names = ", ".join(_quote(n) for n in self.bridge_names) or "none is configured"
                    raise self.error(path + ("bridge",), f"no [[bridge]] is called {_quote(bridge)} ({names})")
                # The connection is spliced to the relay in kracauer itself (kracauer.bridge).
                relay = relay_address(self.prefix)
                routes.append(Route(name=name, host=relay, port=port, hosts=(relay,), alpn=alpn, bridge=bridge))
                continue
            resolve = self.boolean(item["resolve"], path + ("resolve",)) if "resolve" in item else False
            if resolve:
                routes.append(self.resolve_route(item, path, name, port, alpn))
                continue
            if "networks" in item:
                raise self.error(path + ("networks",), "networks only goes with resolve = true "
                                                       "(the addresses a looked-up name may have)")
            hosts = self.ipv6_hosts(self.require(item, path + ("host",)), path + ("host",))
            routes.append(Route(name=name, host=hosts[0], port=port, hosts=hosts, alpn=alpn))
        return routes

    def resolve_route(self, item: dict, path: Path, name: str, port: int | None, alpn: str | None) -> Route:
        """A route whose hosts are the name's AAAA records inside `networks`."""
        if "host" in item:
            raise self.error(path + ("host",), "a route with resolve = true has no host: its hosts are the "
                                               "name's AAAA records (inside networks)")
        if "networks" not in item:
            raise self.error(path + ("networks",), "required with resolve = true: the IPv6 networks the "
                                                   "looked-up addresses must lie in (others are refused)")
        value = item["networks"]
        if not isinstance(value, list) or not value:
            raise self.error(path + ("networks",), f"expected a non-empty list of IPv6 networks like "
                                                   f"[\"2001:db8:100::/48\"], got {_describe(value)}")
        networks = tuple(self.ipv6_network(v, path + ("networks",)) for v in value)
        return Route(name=name, host=None, port=port, alpn=alpn, resolve=True, networks=networks)

    def ipv6_network(self, value: Any, path: Path) -> ipaddress.IPv6Network:
        text = self.string(value, path)
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise self.error(path, f"expected an IPv6 network like \"2001:db8:100::/48\", got {_quote(text)}") from None
        if network.version != 6:
            raise self.error(path, f"expected an IPv6 network (hosts are reached over IPv6), got {_quote(text)}")
        if ipaddress.ip_interface(text).ip != network.network_address and "/" in text:
            raise self.error(path, f"{_quote(text)} has host bits set; the network is \"{network}\"")
        if self.prefix is not None and network.overlaps(self.prefix):
            raise self.error(path, f"{_quote(text)} overlaps the translate prefix {self.prefix}, which is kept "
                                   f"for embedded client addresses")
        return network

    def resolver(self, doc: dict) -> ResolverConfig:
        table = self.table(doc, ("resolver",), _RESOLVER_KEYS)
        if table is None:
            return ResolverConfig()
        values: dict[str, Any] = {}
        if "servers" in table:
            path = ("resolver", "servers")
            servers = table["servers"]
            if not isinstance(servers, list) or not servers:
                raise self.error(path, f"expected a non-empty list of DNS servers like [\"2001:db8::53\", "
                                       f"\"192.0.2.53:5353\"], got {_describe(servers)}")
            values["servers"] = tuple(self.dns_server(v, path) for v in servers)
        if "timeout" in table:
            timeout = self.seconds(table["timeout"], ("resolver", "timeout"))
            if timeout > MAX_RESOLVER_TIMEOUT:
                raise self.error(("resolver", "timeout"), f"expected at most {_show(MAX_RESOLVER_TIMEOUT)} "
                                                          f"seconds, got {_show(timeout)}")
            values["timeout"] = timeout
        for key, (low, high) in _RESOLVER_COUNTS.items():
            if key in table:
                values[key] = self.integer(table[key], ("resolver", key), low, high)
        return ResolverConfig(**values)

    def dns_server(self, value: Any, path: Path) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        """"192.0.2.53", "192.0.2.53:5353", "2001:db8::53" or "[2001:db8::53]:5353" (port 53 by default)."""
        text = self.string(value, path)
        host, port = text, 53
        match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]+):(\d+)", text)
        if match:
            host = match.group(1) or match.group(3)
            port = int(match.group(2) or match.group(4))
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise self.error(path, f"expected a DNS server's address, optionally with a port (\"192.0.2.53:5353\", "
                                   f"\"[2001:db8::53]:5353\"), got {_quote(text)}") from None
        if not 1 <= port <= 65535:
            raise self.error(path, f"expected a port from 1 to 65535 in {_quote(text)}")
        if address.is_unspecified or address.is_multicast:
            raise self.error(path, f"{_quote(text)} is not a unicast address")
        return address, port

    def fallback(self, doc: dict) -> Fallback | None:
        table = self.table(doc, ("fallback",), _FALLBACK_KEYS)
        if table is None:
            return None
        path = ("fallback",)
        hosts = self.ipv6_hosts(self.require(table, path + ("host",)), path + ("host",))
        port = self.port(table["port"], path + ("port",)) if "port" in table else None
        return Fallback(host=hosts[0], port=port, hosts=hosts)

    def health(self, doc: dict) -> Health:
        table = self.table(doc, ("health",), _HEALTH_KEYS)
        if table is None:
            return Health()
        values: dict[str, Any] = {}
        if "max_fails" in table:
            values["max_fails"] = self.integer(table["max_fails"], ("health", "max_fails"), 1, 1000)
        if "fail_timeout" in table:
            values["fail_timeout"] = self.seconds(table["fail_timeout"], ("health", "fail_timeout"))
        return Health(**values)

    def absolute_path(self, value: Any, path: Path, *, dash: bool = False) -> str:
        text = self.string(value, path)
        if dash and text == "-":
            return text
        expected = 'an absolute path or "-"' if dash else "an absolute path"
        if not text.startswith("/") or text.endswith("/") or "\0" in text:
            raise self.error(path, f"expected {expected} (a file, not a directory), got {_quote(text)}")
        return text

    def log(self, doc: dict) -> LogConfig:
        table = self.table(doc, ("log",), _LOG_KEYS)
        if table is None:
            return LogConfig()
        access = None
        if "access" in table:
            access = self.absolute_path(table["access"], ("log", "access"), dash=True)
        level = LogConfig.level
        if "level" in table:
            level = self.string(table["level"], ("log", "level"))
            if level not in LOG_LEVELS:
                choices = ", ".join(_quote(v) for v in LOG_LEVELS)
                raise self.error(("log", "level"), f"expected one of {choices}, got {_quote(level)}")
        return LogConfig(access=access, level=level)

    def metrics(self, doc: dict) -> MetricsConfig | None:
        table = self.table(doc, ("metrics",), _METRICS_KEYS)
        if table is None:
            return None
        path = ("metrics", "listen")
        address, port = self.socket_address(self.require(table, path), path, "127.0.0.1:9477")
        return MetricsConfig(address=address, port=port)

    def socket_address(self, value: Any, path: Path,
                       example: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        """ "ADDRESS:PORT" with an IP address (IPv6 in brackets)."""
        text = self.string(value, path)
        port6 = example.rpartition(":")[2]
        expected = f'expected "ADDRESS:PORT" with an IP address, e.g. "{example}" or "[::1]:{port6}"'
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or not port_text.isascii():
            raise self.error(path, f"{expected}, got {_quote(text)}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            version = 6
        else:
            version = 4
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise self.error(path, f"{expected}, got {_quote(text)}") from None
        if address.version != version:
            raise self.error(path, f"{expected} (IPv6 addresses in brackets), got {_quote(text)}")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise self.error(path, f"expected a port from 1 to 65535, got {port} in {_quote(text)}")
        return address, port

    def agents(self, doc: dict, tun: TunConfig, listeners: list[Listener], routes: list[Route],
               fallback: Fallback | None) -> AgentsConfig | None:
        table = self.table(doc, ("agents",), _AGENTS_KEYS)
        if table is None:
            return None
        path = ("agents",)
        address, port = self.socket_address(self.require(table, path + ("listen",)), path + ("listen",),
                                            "203.0.113.5:4444")
        cert = self.absolute_path(self.require(table, path + ("cert",)), path + ("cert",))
        key = self.absolute_path(self.require(table, path + ("key",)), path + ("key",))
        defaults = AgentsConfig(address=address, port=port, cert=cert, key=key, tokens=())
        name = defaults.tun
        if "tun" in table:
            name = self.interface_name(table["tun"], path + ("tun",))
        if name == tun.name:
            raise self.error(path + ("tun",), f"{_quote(name)} is already [tun] name; the agents' TUN needs its own")
        network = defaults.network
        if "network" in table:
            network = self.agents_network(table["network"], path + ("network",))
        self.agents_network_free(network, path + ("network",) if "network" in table else path, listeners, routes,
                                 fallback)
        keepalive = defaults.keepalive
        if "keepalive" in table:
            keepalive = self.seconds(table["keepalive"], path + ("keepalive",))
            if keepalive > 3600:
                raise self.error(path + ("keepalive",), f"at most 3600 seconds, got {_show(keepalive)}")
        tokens = self.agent_tokens(table, path)
        return AgentsConfig(address=address, port=port, cert=cert, key=key, tokens=tokens, tun=name,
                            network=network, keepalive=keepalive)

    def agents_network(self, value: Any, path: Path) -> ipaddress.IPv6Network:
        text = self.string(value, path)
        try:
            network = ipaddress.IPv6Network(text)
        except ValueError as e:
            raise self.error(path, f"expected an IPv6 network like \"fd00:6b72::/64\": {e}") from None
        if not 64 <= network.prefixlen <= 120:
            raise self.error(path, f"expected a /64 to a /120 (room for the agents' addresses), got /{network.prefixlen}")
        if network.is_multicast or network.is_link_local or network.is_loopback or network.network_address.ipv4_mapped:
            raise self.error(path, f"{_quote(text)} is not a unicast network")
        return network

    def agents_network_free(self, network: ipaddress.IPv6Network, path: Path, listeners: list[Listener],
                            routes: list[Route], fallback: Fallback | None) -> None:
        """The agents' network (given or the default) must not hold anything else kracauer routes to."""
        what = "" if path[-1] == "network" else " (the default [agents] network)"
        prefixes = [self.prefix] + [lst.prefix for lst in listeners if lst.prefix] + \
            [lst.prefix for lst in self.bridge_listeners if lst.prefix]
        for prefix in prefixes:
            if prefix is not None and network.overlaps(prefix):
                raise self.error(path, f"{network}{what} overlaps the translate prefix {prefix}")
        hosts = [h for r in routes for h in r.hosts] + list(fallback.hosts if fallback else ()) + \
                [h for lst in listeners for h in lst.hosts]
        for host in hosts:
            if host in network:
                raise self.error(path, f"{network}{what} contains the configured host {host}; agents' addresses "
                                       "must not be taken for configured hosts")
        for route in routes:
            for allowed in route.networks:
                if network.overlaps(allowed):
                    # A DNS answer must never make an agent's address the host of a resolve route.
                    raise self.error(path, f"{network}{what} overlaps the networks {allowed} of the resolve route "
                                           f"{_quote(route.name)}")

    def agent_tokens(self, table: dict, path: Path) -> tuple[AgentToken, ...]:
        value = table.get("token", [])
        if not isinstance(value, list):
            raise self.error(path + ("token",), f"expected an array of tables ([[agents.token]]), got {_describe(value)}")
        tokens = []
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            item_path = path + ("token", i)
            if not isinstance(item, dict):
                raise self.error(item_path, f"expected a table ([[agents.token]]), got {_describe(item)}")
            self.known_keys(item, item_path, _AGENT_TOKEN_KEYS)
            digest = self.string(self.require(item, item_path + ("sha256",)), item_path + ("sha256",)).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise self.error(item_path + ("sha256",), "expected the token's SHA-256 as 64 hex digits "
                                                          "(`kracauer agent-token` prints a new token and its sha256)")
            if digest in seen:
                raise self.error(item_path + ("sha256",), f"the same token as agents.token[{seen[digest]}]")
            seen[digest] = i
            names = self.agent_names(self.require(item, item_path + ("names",)), item_path + ("names",))
            tokens.append(AgentToken(sha256=digest, names=names))
        return tuple(tokens)

    def agent_names(self, value: Any, path: Path) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(path, f"expected a non-empty list of names like [\"app.example.com\", \"*.dev.example.com\"], "
                                   f"got {_describe(value)}")
        names = []
        for item in value:
            name = self.string(item, path)
            try:
                agent_name_key(name)
            except ValueError as e:
                raise self.error(path, str(e)) from None
            names.append(name)
        if len({agent_name_key(n) for n in names}) != len(names):
            raise self.error(path, "the same name is listed twice")
        return tuple(names)

    def agent(self, doc: dict) -> AgentConfig:
        self.known_keys(doc, (), ("agent",))
        table = self.table(doc, ("agent",), _AGENT_KEYS, required=True)
        assert table is not None
        path = ("agent",)
        box = self.string(self.require(table, path + ("box",)), path + ("box",))
        host, sep, port_text = box.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise self.error(path + ("box",), f"expected \"NAME:PORT\" (or \"[IPv6]:PORT\"), got {_quote(box)}")
        server_name = self.string(self.require(table, path + ("server_name",)), path + ("server_name",))
        problem = _dns_name_problem(server_name.lower().rstrip("."))
        if problem:
            try:
                ipaddress.ip_address(server_name)
            except ValueError:
                raise self.error(path + ("server_name",), f"invalid name: {problem}") from None
        ca = self.absolute_path(self.require(table, path + ("ca",)), path + ("ca",))
        token_file = self.absolute_path(self.require(table, path + ("token_file",)), path + ("token_file",))
        names = self.agent_names(self.require(table, path + ("names",)), path + ("names",))
        if len(names) > AGENT_NAMES_MAX:
            raise self.error(path + ("names",), f"an agent registers at most {AGENT_NAMES_MAX} names, got "
                                                f"{len(names)} (run a second agent for more)")
        tun = AgentConfig.tun
        if "tun" in table:
            tun = self.interface_name(table["tun"], path + ("tun",))
        return AgentConfig(box_host=host, box_port=int(port_text), server_name=server_name, ca=ca,
                           token_file=token_file, names=names, tun=tun, source=self.source)

    def state(self, doc: dict) -> StateConfig | None:
        table = self.table(doc, ("state",), _STATE_KEYS)
        if table is None:
            return None
        path = ("state", "file")
        return StateConfig(file=self.absolute_path(self.require(table, path), path))

    def kernel_path(self, doc: dict) -> KernelPathConfig:
        table = self.table(doc, ("kernel_path",), _KERNEL_PATH_KEYS)
        if table is None:
            return KernelPathConfig()
        defaults = KernelPathConfig()
        enabled = defaults.enabled
        if "enabled" in table:
            enabled = table["enabled"]
            if enabled not in KERNEL_PATH_MODES or (not isinstance(enabled, bool) and enabled != "auto"):
                raise self.error(("kernel_path", "enabled"),
                                 f'expected "auto", true or false, got {_describe(enabled)}')
        pin_dir = defaults.pin_dir
        if "pin_dir" in table:
            pin_dir = self.absolute_path(table["pin_dir"], ("kernel_path", "pin_dir"))
        max_flows = defaults.max_flows
        if "max_flows" in table:
            max_flows = self.integer(table["max_flows"], ("kernel_path", "max_flows"), 2, 1 << 26)
        python_syn_rate = defaults.python_syn_rate
        if "python_syn_rate" in table:
            python_syn_rate = self.integer(table["python_syn_rate"], ("kernel_path", "python_syn_rate"), 0, 1 << 24)
        return KernelPathConfig(enabled=enabled, pin_dir=pin_dir, max_flows=max_flows,
                                python_syn_rate=python_syn_rate)

    def limits(self, doc: dict) -> Limits:
        table = self.table(doc, ("limits",), _LIMITS_KEYS)
        if table is None:
            return Limits()
        values: dict[str, Any] = {}
        for field in dataclasses.fields(Limits):
            if field.name not in table:
                continue
            path = ("limits", field.name)
            if field.name == "hello_max_bytes":
                values[field.name] = self.integer(table[field.name], path, 512, 65536)
            elif field.name in _LIMITS_COUNTS:
                values[field.name] = self.integer(table[field.name], path, *_LIMITS_COUNTS[field.name])
            else:
                values[field.name] = self.seconds(table[field.name], path)
        connect = values.get("connect_timeout", Limits.connect_timeout)
        if "host_try_timeout" not in values:
            # The default never outlasts a short connect_timeout (the tracker caps it there anyway).
            values["host_try_timeout"] = min(Limits.host_try_timeout, connect)
        elif values["host_try_timeout"] > connect:
            raise self.error(("limits", "host_try_timeout"),
                             f"{_show(values['host_try_timeout'])} seconds is more than connect_timeout "
                             f"({_show(connect)}): the next host would never be tried; "
                             f"use at most {_show(connect)} or raise connect_timeout")
        return Limits(**values)
