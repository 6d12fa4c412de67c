"""kracauer.config: parsing and validating the TOML configuration."""

import dataclasses
import ipaddress
import pathlib
import re

import pytest

from kracauer.config import (
    Config,
    ConfigError,
    Fallback,
    Limits,
    Listener,
    Route,
    TunConfig,
    load_config,
    parse_config,
)
from tests.configs import BASE, parse

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "kracauer-config.toml"

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

FALLBACK = """
[fallback]
host = "2001:db8::99"
"""
MINIMAL = BASE + FALLBACK


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("k.toml")
    return message


def route(name: str, host: str = "2001:db8::10", extra: str = "") -> str:
    return f'\n[[route]]\nname = "{name}"\nhost = "{host}"\n{extra}'


# -- the documented example ---------------------------------------------------

def test_example_file_loads_with_the_documented_values():
    config = load_config(EXAMPLE)
    assert config == Config(
        tun=TunConfig(name="kracauer0", mtu=1500),
        prefix=ipaddress.IPv6Network("64:ff9b:1::/96"),
        listeners=(
            Listener(V4("192.0.2.10"), 443, "tls"),
            Listener(V4("192.0.2.10"), 80, "http"),
            Listener(V4("192.0.2.10"), 443, "quic"),
            Listener(V4("192.0.2.10"), 22, "tcp", V6("2001:db8::22")),
        ),
        routes=(
            Route("www.example.com", V6("2001:db8::10")),
            Route("*.example.org", V6("2001:db8::20"), 8443),
        ),
        fallback=Fallback(V6("2001:db8::99")),
        limits=Limits(hello_timeout=10.0, hello_max_bytes=16384, connect_timeout=10.0, idle_timeout=7440.0),
        source=str(EXAMPLE),
    )


def test_example_files_commented_out_connect_listener_is_valid_when_uncommented():
    text = EXAMPLE.read_text()
    block = re.search(r"^# \[\[listen\]\]\n(?:# \w+ = .*\n)+", text, re.M)
    assert block is not None and 'protocol = "connect"' in block[0]
    config = parse(text.replace(block[0], block[0].replace("# ", "")))
    [proxy] = [lst for lst in config.listeners if lst.protocol == "connect"]
    assert (proxy.port, proxy.allow, proxy.ports) == (3128, (ipaddress.IPv4Network("198.51.100.0/24"),), (443,))


def test_example_file_documents_the_optional_limits_commented_out():
    text = EXAMPLE.read_text()
    assert re.search(r"^# connect_timeout = 10\.0$", text, re.M)
    assert re.search(r"^# idle_timeout = 7440\.0$", text, re.M)
    assert re.search(r"^# host_try_timeout = 3\.0$", text, re.M)
    assert re.search(r"^# udp_idle_timeout = 60\.0$", text, re.M)


# -- defaults and types ---------------------------------------------------------

def test_minimal_config_gets_the_defaults():
    config = parse(MINIMAL)
    assert config.tun == TunConfig(name="kracauer0", mtu=1500)
    assert config.limits == Limits(hello_timeout=10.0, hello_max_bytes=16384, connect_timeout=10.0,
                                   idle_timeout=7440.0)
    assert config.routes == ()
    assert config.fallback == Fallback(V6("2001:db8::99"), None)
    assert config.listeners == (Listener(V4("192.0.2.10"), 443, "tls", None),)
    assert config.source == "k.toml"


def test_parse_config_default_source_is_string():
    assert parse_config(MINIMAL).source == "<string>"
    with pytest.raises(ConfigError, match=r"^<string>"):
        parse_config("x = 1")


def test_config_objects_are_frozen():
    config = parse(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.prefix = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listeners[0].port = 80


def test_integer_seconds_become_floats():
    limits = parse(MINIMAL + "[limits]\nhello_timeout = 5\nidle_timeout = 60\n").limits
    assert limits.hello_timeout == 5.0 and type(limits.hello_timeout) is float
    assert limits.idle_timeout == 60.0 and type(limits.idle_timeout) is float
    assert limits.connect_timeout == 10.0


def test_all_keys_are_read():
    config = parse(BASE + route("a.example", extra="port = 8443\n")
                   + '[tun]\nname = "edge7"\nmtu = 9000\n'
                   + '[fallback]\nhost = "2001:db8::99"\nport = 8080\n'
                   + "[limits]\nhello_timeout = 2.5\nhello_max_bytes = 512\nconnect_timeout = 3\nidle_timeout = 600.5\n")
    assert config.tun == TunConfig("edge7", 9000)
    assert config.routes == (Route("a.example", V6("2001:db8::10"), 8443),)
    assert config.fallback == Fallback(V6("2001:db8::99"), 8080)
    assert config.limits == Limits(2.5, 512, 3.0, 600.5)


# -- TOML syntax ------------------------------------------------------------------

def test_toml_syntax_error_gives_file_line_and_column():
    with pytest.raises(ConfigError) as info:
        parse(BASE + "\n[tun]\nmtu = 1500 1600\n")
    message = str(info.value)
    assert message.startswith("k.toml:10:12: invalid TOML: ")
    assert info.value.line == 10
    assert "(at line" not in message


def test_toml_duplicate_key_is_a_syntax_error_with_its_line():
    assert error(BASE + "port = 80\n").startswith("k.toml:8:")


# -- unknown keys at every level ------------------------------------------------

@pytest.mark.parametrize("text,key,allowed", [
    (MINIMAL + "\n[tunnel]\nname = 'x'\n", "tunnel", '"tun", "translate", "listen", "route", "fallback", "limits"'),
    ("verbose = true\n" + MINIMAL, "verbose", '"tun", "translate"'),
    (MINIMAL + "[tun]\nnmae = 'x'\n", "tun.nmae", '"name", "mtu"'),
    (MINIMAL.replace("[translate]\n", "[translate]\nsuffix = 'x'\n"), "translate.suffix", '"prefix"'),
    (MINIMAL.replace('protocol = "tls"\n', 'protocol = "tls"\nproto = "tls"\n'), "listen[0].proto",
     '"address", "port", "protocol", "host"'),
    (MINIMAL + route("a.example", extra="weight = 2\n"), "route[0].weight", '"name", "host", "port"'),
    (MINIMAL.replace("[fallback]\n", "[fallback]\nhosts = 1\n"), "fallback.hosts", '"host", "port"'),
    (MINIMAL + "[limits]\nhello_bytes = 1\n", "limits.hello_bytes",
     '"hello_timeout", "hello_max_bytes", "connect_timeout", "host_try_timeout", "idle_timeout"'),
])
def test_unknown_keys_are_errors_naming_the_key_and_the_allowed_keys(text, key, allowed):
    message = error(text)
    assert f": {key}: unknown key" in message
    assert f"allowed keys: {allowed}" in message


def test_unknown_key_suggests_the_closest_allowed_key():
    assert '(did you mean "name"?)' in error(MINIMAL + "[tun]\nnmae = 'x'\n")


def test_unknown_key_error_has_the_line_of_the_key():
    assert error(MINIMAL + "[limits]\nhello_timeout = 1\nhello_bytes = 1\n").startswith("k.toml:13: limits.hello_bytes")


# -- [tun] ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ('"abcdefghijklmnop"', "at most 15"),
    ('""', "empty"),
    ('"tun/0"', "'/'"),
    ('"tun 0"', "whitespace"),
    ('"tun:0"', "':'"),
    ('".."', '"."'),
    ('"tun\\u0000"', "control"),
    ("7", "expected a string, got integer 7"),
])
def test_bad_tun_names_are_rejected(value, expected):
    message = error(MINIMAL + f"[tun]\nname = {value}\n")
    assert ": tun.name: " in message
    assert expected in message


def test_fifteen_character_tun_name_is_accepted():
    assert parse(MINIMAL + '[tun]\nname = "abcdefghijklmno"\n').tun.name == "abcdefghijklmno"


@pytest.mark.parametrize("value,expected", [
    ("1279", "expected an integer from 1280 to 65535, got 1279"),
    ("65536", "got 65536"),
    ("true", "got boolean true"),
    ("1500.0", "got float 1500.0"),
    ('"1500"', 'got string "1500"'),
])
def test_bad_mtus_are_rejected(value, expected):
    message = error(MINIMAL + f"[tun]\nmtu = {value}\n")
    assert ": tun.mtu: " in message and expected in message


@pytest.mark.parametrize("mtu", [1280, 65535])
def test_mtu_range_ends_are_accepted(mtu):
    assert parse(MINIMAL + f"[tun]\nmtu = {mtu}\n").tun.mtu == mtu


def test_tun_must_be_a_table():
    assert "tun: expected a table ([tun]), got integer 1" in error("tun = 1\n" + MINIMAL)


# -- [translate] --------------------------------------------------------------------

def test_translate_table_is_required():
    message = error(MINIMAL.replace('[translate]\nprefix = "64:ff9b:1::/96"\n', ""))
    assert "translate: the [translate] table is missing" in message


def test_translate_prefix_is_required():
    message = error(MINIMAL.replace('prefix = "64:ff9b:1::/96"\n', ""))
    assert message == "k.toml:1: translate.prefix: required key is missing"


@pytest.mark.parametrize("prefix,expected", [
    ("64:ff9b:1::/64", "exactly a /96"),
    ("64:ff9b:1::/128", "exactly a /96"),
    ("64:ff9b:1::", "no /96"),
    ("64:ff9b:1::5/96", "host bits set"),
    ("192.0.2.0/24", "IPv4"),
    ("nonsense/96", 'got "nonsense/96"'),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::/96", "::/96"),
    ("ff02::/96", "multicast"),
    ("fe80::/96", "link-local"),
    ("64:ff9b:1::%eth0/96", "zone"),
])
def test_bad_prefixes_are_rejected(prefix, expected):
    message = error(MINIMAL.replace("64:ff9b:1::/96", prefix))
    assert message.startswith("k.toml:2: translate.prefix: ")
    assert expected in message


def test_well_known_prefix_is_accepted():
    assert parse(MINIMAL.replace("64:ff9b:1::/96", "64:ff9b::/96")).prefix == ipaddress.IPv6Network("64:ff9b::/96")


# -- [[listen]] ----------------------------------------------------------------------

def listen(address='"192.0.2.10"', port="443", protocol='"tls"', host=None) -> str:
    text = f"\n[[listen]]\naddress = {address}\nport = {port}\nprotocol = {protocol}\n"
    return text + (f"host = {host}\n" if host is not None else "")


HEAD = '[translate]\nprefix = "64:ff9b:1::/96"\n' + FALLBACK


def test_at_least_one_listener_is_required():
    assert "listen: at least one [[listen]] entry is required" in error(HEAD)


def test_listen_must_be_an_array_of_tables():
    message = error(HEAD + '[listen]\naddress = "192.0.2.10"\nport = 443\nprotocol = "tls"\n')
    assert "listen: expected an array of tables ([[listen]]), got a table" in message


@pytest.mark.parametrize("missing", ["address", "port", "protocol"])
def test_listener_keys_are_required(missing):
    text = HEAD + "\n".join(line for line in listen().splitlines() if not line.startswith(missing)) + "\n"
    message = error(text)
    assert f"listen[0].{missing}: required key is missing" in message
    assert message.startswith("k.toml:7:")  # the [[listen]] header


@pytest.mark.parametrize("address,expected", [
    ('"2001:db8::1"', 'expected an IPv4 address, got IPv6 address "2001:db8::1"'),
    ('"192.0.2"', 'expected an IPv4 address, got "192.0.2"'),
    ('"0.0.0.0"', "unspecified"),
    ('"127.0.0.1"', "loopback"),
    ('"224.0.0.1"', "multicast"),
    ('"255.255.255.255"', "broadcast"),
    ("3221225994", "expected a string, got integer"),
])
def test_bad_listener_addresses_are_rejected(address, expected):
    message = error(HEAD + listen(address=address))
    assert ": listen[0].address: " in message and expected in message


@pytest.mark.parametrize("port,expected", [
    ("0", "expected an integer from 1 to 65535, got 0"),
    ("65536", "got 65536"),
    ('"443"', 'got string "443"'),
    ("false", "got boolean false"),
])
def test_bad_listener_ports_are_rejected(port, expected):
    message = error(HEAD + listen(port=port))
    assert ": listen[0].port: " in message and expected in message


def test_unknown_protocol_is_rejected_with_the_choices_and_the_line():
    text = HEAD + listen() + listen(port="80", protocol='"udp"')
    assert error(text) == ('k.toml:15: listen[1].protocol: expected one of "tls", "http", "tcp", "connect", "quic", '
                           '"bridge", got "udp" (a UDP listener is protocol = "quic": HTTP/3 routed by name)')


def test_protocol_names_are_case_sensitive():
    assert 'got "TLS"' in error(HEAD + listen(protocol='"TLS"'))


def test_tcp_listener_requires_a_host():
    assert "listen[0].host: required key is missing" in error(HEAD + listen(protocol='"tcp"'))


@pytest.mark.parametrize("protocol", ["tls", "http"])
def test_host_is_forbidden_on_tls_and_http_listeners(protocol):
    message = error(HEAD + listen(protocol=f'"{protocol}"', host='"2001:db8::1"'))
    assert f'listen[0].host: only allowed with protocol "tcp" (this listener is "{protocol}"' in message


def test_tcp_listener_gets_its_host():
    config = parse(HEAD + listen(port="22", protocol='"tcp"', host='"2001:db8::22"'))
    assert config.listeners == (Listener(V4("192.0.2.10"), 22, "tcp", V6("2001:db8::22")),)


# -- connect listeners (explicit proxy) ------------------------------------------

def connect_listen(extra: str = 'allow = ["198.51.100.0/24"]\n') -> str:
    return listen(port="3128", protocol='"connect"') + extra


def test_connect_listener_gets_its_networks_and_the_default_port_443():
    config = parse(HEAD + connect_listen('allow = ["198.51.100.0/24", "203.0.113.7"]\n'))
    [listener] = config.listeners
    assert (listener.protocol, listener.port) == ("connect", 3128)
    assert listener.allow == (ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv4Network("203.0.113.7/32"))
    assert listener.ports == (443,)
    assert listener.host is None and listener.hosts == ()


def test_connect_listener_ports_are_read():
    config = parse(HEAD + connect_listen('allow = ["198.51.100.0/24"]\nports = [443, 8443]\n'))
    assert config.listeners[0].ports == (443, 8443)


def test_connect_listener_without_allow_is_refused_no_open_proxy():
    message = error(HEAD + connect_listen(""))
    assert message.startswith("k.toml:")
    assert ': listen[0].allow: required with protocol "connect"' in message
    assert "never an open proxy" in message


@pytest.mark.parametrize(("extra", "key", "expected"), [
    ("allow = []\n", "allow", "the list is empty: this proxy would serve nobody"),
    ('allow = "198.51.100.0/24"\n', "allow", 'expected a list of IPv4 networks like ["198.51.100.0/24"], got string'),
    ('allow = ["2001:db8::/32"]\n', "allow", 'expected an IPv4 network (clients connect over IPv4), got "2001:db8::/32"'),
    ('allow = ["198.51.100.1/24"]\n', "allow", '"198.51.100.1/24" has host bits set; the network is "198.51.100.0/24"'),
    ('allow = ["everyone"]\n', "allow", 'expected an IPv4 network like "198.51.100.0/24", got "everyone"'),
    ('allow = [24]\n', "allow", "expected a string, got integer 24"),
    ('allow = ["198.51.100.0/24"]\nports = []\n', "ports", "the list is empty: no CONNECT could be served"),
    ('allow = ["198.51.100.0/24"]\nports = 443\n', "ports", "expected a list of ports like [443], got integer 443"),
    ('allow = ["198.51.100.0/24"]\nports = [0]\n', "ports", "expected an integer from 1 to 65535, got 0"),
    ('allow = ["198.51.100.0/24"]\nports = [443, 443]\n', "ports", "the same port is listed twice"),
    ('allow = ["198.51.100.0/24"]\nhost = "2001:db8::1"\n', "host", 'only allowed with protocol "tcp"'),
])
def test_bad_connect_listener_keys_are_rejected(extra, key, expected):
    message = error(HEAD + connect_listen(extra))
    assert f": listen[0].{key}: " in message and expected in message


@pytest.mark.parametrize("key,value", [("allow", '["198.51.100.0/24"]'), ("ports", "[443]")])
@pytest.mark.parametrize("protocol", ["tls", "http"])
def test_allow_and_ports_are_forbidden_on_other_listeners(protocol, key, value):
    message = error(HEAD + listen(protocol=f'"{protocol}"') + f"{key} = {value}\n")
    assert f': listen[0].{key}: only allowed with protocol "connect" (this listener is "{protocol}")' in message


def test_connect_listener_needs_something_to_route_to():
    message = error('[translate]\nprefix = "64:ff9b:1::/96"\n' + connect_listen())
    assert "listen[0]: nothing to route to: this connect listener" in message


def test_two_listeners_on_the_same_address_and_port_are_rejected():
    message = error(HEAD + listen() + listen(protocol='"http"'))
    assert message == "k.toml:12: listen[1]: 192.0.2.10:443 is already used by listen[0]"


def test_same_port_on_two_addresses_is_accepted():
    config = parse(HEAD + listen() + listen(address='"192.0.2.11"'))
    assert [l.address for l in config.listeners] == [V4("192.0.2.10"), V4("192.0.2.11")]


# -- hosts ---------------------------------------------------------------------------

BAD_HOSTS = [
    ("192.0.2.5", "expected an IPv6 address, got IPv4 address"),
    ("::ffff:192.0.2.5", "IPv4-mapped"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("ff02::1", "multicast"),
    ("fe80::1", "link-local"),
    ("2001:db8::1%eth0", "zone"),
    ("64:ff9b:1::c000:205", "inside the translate prefix 64:ff9b:1::/96"),
    ("www.example.com", 'expected an IPv6 address, got "www.example.com"'),
]


@pytest.mark.parametrize("host,expected", BAD_HOSTS)
def test_bad_route_hosts_are_rejected(host, expected):
    message = error(MINIMAL + route("a.example", host=host))
    assert ": route[0].host: " in message and expected in message


@pytest.mark.parametrize("host,expected", BAD_HOSTS)
def test_bad_fallback_hosts_are_rejected(host, expected):
    message = error(BASE + f'[fallback]\nhost = "{host}"\n')
    assert ": fallback.host: " in message and expected in message


@pytest.mark.parametrize("host,expected", BAD_HOSTS[:3] + BAD_HOSTS[-2:])
def test_bad_tcp_listener_hosts_are_rejected(host, expected):
    message = error(HEAD + listen(protocol='"tcp"', host=f'"{host}"'))
    assert ": listen[0].host: " in message and expected in message


def test_host_must_be_a_string_or_a_list_of_strings():
    assert "route[0].host: expected a string, got integer 5" in error(
        MINIMAL + '\n[[route]]\nname = "a.example"\nhost = 5\n')
    assert "route[0].host: expected a string" in error(
        MINIMAL + '\n[[route]]\nname = "a.example"\nhost = [5]\n')
    assert "route[0].host: expected at least one" in error(
        MINIMAL + '\n[[route]]\nname = "a.example"\nhost = []\n')
    assert "listed twice" in error(
        MINIMAL + '\n[[route]]\nname = "a.example"\nhost = ["2001:db8::1", "2001:db8::1"]\n')


SEVERAL = """
[[listen]]
address = "192.0.2.10"
port = 22
protocol = "tcp"
host = ["2001:db8::22", "2001:db8::23"]

[[route]]
name = "a.example"
host = ["2001:db8::10", "2001:db8::11"]

[fallback]
host = ["2001:db8::98", "2001:db8::99"]
"""


def test_several_hosts_per_route_fallback_and_tcp_listener():
    config = parse(BASE + SEVERAL)
    assert config.routes[0].hosts == (V6("2001:db8::10"), V6("2001:db8::11"))
    assert config.routes[0].host == V6("2001:db8::10")
    assert config.fallback.hosts == (V6("2001:db8::98"), V6("2001:db8::99"))
    assert config.listeners[1].hosts == (V6("2001:db8::22"), V6("2001:db8::23"))
    # One host is a list of one.
    assert parse(MINIMAL + route("b.example")).routes[0].hosts == (V6("2001:db8::10"),)


EXTRA_LISTENER = """
[[listen]]
address = "192.0.2.11"
port = 443
protocol = "tls"
prefix = "64:ff9b:2::/96"

[health]
max_fails = 5
fail_timeout = 60
"""


def test_route_alpn_and_listener_prefix_and_health():
    config = parse(MINIMAL + route("a.example", extra='alpn = "acme-tls/1"') + route("a.example") + EXTRA_LISTENER)
    assert config.routes[0].alpn == "acme-tls/1" and config.routes[1].alpn is None
    assert config.listeners[1].prefix == ipaddress.IPv6Network("64:ff9b:2::/96")
    assert config.listeners[0].prefix is None
    assert (config.health.max_fails, config.health.fail_timeout) == (5, 60.0)
    assert "duplicates" in error(MINIMAL + route("a.example", extra='alpn = "h2"') * 2)
    bad_prefix = '[[listen]]\naddress = "192.0.2.11"\nport = 1\nprotocol = "tls"\nprefix = "64:ff9b::/64"\n'
    assert "listen[1].prefix" in error(MINIMAL + bad_prefix)
    assert "route[0].alpn" in error(MINIMAL + route("a.example", extra='alpn = ""'))


def test_fallback_requires_a_host():
    assert "fallback.host: required key is missing" in error(BASE + "[fallback]\nport = 80\n")


@pytest.mark.parametrize("where", ["route", "fallback"])
@pytest.mark.parametrize("port", ["0", "65536", '"8443"', "true"])
def test_bad_route_and_fallback_ports_are_rejected(where, port):
    if where == "route":
        text, key = MINIMAL + route("a.example", extra=f"port = {port}\n"), "route[0].port"
    else:
        text, key = BASE + f'[fallback]\nhost = "2001:db8::99"\nport = {port}\n', "fallback.port"
    assert f": {key}: expected an integer from 1 to 65535" in error(text)


# -- [[route]] names ---------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "www.example.com", "WWW.Example.COM", "www.example.com.", "localhost", "xn--bcher-kva.example",
    "a-b.example", "192.0.2.10", "*.example.org", "*.com", "~.*", "~api-[0-9]+\\\\.example\\\\.net",
    "a" * 63 + ".example", ".".join(["a" * 61] * 4) + "a",
])
def test_valid_route_names_are_kept_as_written(name):
    config = parse(MINIMAL + route(name))
    assert config.routes[0].name == name.replace("\\\\", "\\")


@pytest.mark.parametrize("name,expected", [
    ("", "the name is empty"),
    (".", "the name is empty"),
    ("*", "whole first label"),
    ("a.*.example.com", "whole first label"),
    ("foo*.example.com", "whole first label"),
    ("*.", "whole first label"),
    ("*..", "invalid wildcard name: the name is empty"),
    ("*.*.example.com", "invalid wildcard name"),
    ("exa_mple.com", "may only contain letters, digits and hyphens"),
    ("-a.example", "starts or ends with a hyphen"),
    ("a-.example", "starts or ends with a hyphen"),
    ("a..example", "empty label"),
    (".a.example", "empty label"),
    ("a.example..", "empty label"),
    ("a" * 64 + ".example", "longer than 63"),
    (".".join(["a" * 63] * 4), "at most 253"),
    ("bücher.example", "xn--"),
    ("~", "needs a pattern"),
])
def test_invalid_route_names_are_rejected(name, expected):
    message = error(MINIMAL + route(name))
    assert message.startswith("k.toml:")
    assert ": route[0].name: " in message and expected in message


def test_invalid_regex_shows_the_re_error():
    message = error(MINIMAL + route("~api-(0-9]+"))
    assert message == ('k.toml:13: route[0].name: invalid regular expression "api-(0-9]+": '
                       "missing ), unterminated subpattern at position 4")


def test_route_name_must_be_a_string():
    assert "route[0].name: expected a string, got integer 5" in error(MINIMAL + "[[route]]\nname = 5\nhost = '2001:db8::1'\n")


@pytest.mark.parametrize("missing", ["name", "host"])
def test_route_keys_are_required(missing):
    text = MINIMAL + "\n".join(line for line in route("a.example").splitlines() if not line.startswith(missing))
    assert f"route[0].{missing}: required key is missing" in error(text)


@pytest.mark.parametrize("first,second", [
    ("www.example.com", "www.example.com"),
    ("www.example.com", "WWW.Example.com"),
    ("www.example.com", "www.example.com."),
    ("*.example.com", "*.EXAMPLE.com."),
    ("~a.*", "~a.*"),
])
def test_duplicate_route_names_are_rejected(first, second):
    message = error(MINIMAL + route(first) + route(second, host="2001:db8::11"))
    assert f': route[1].name: "{second}" duplicates route[0].name "{first}"' in message


def test_a_wildcard_and_the_bare_domain_are_not_duplicates():
    assert len(parse(MINIMAL + route("*.example.com") + route("example.com")).routes) == 2


def test_routes_keep_file_order():
    names = ["~b.*", "b.example", "*.example", "~a.*"]
    config = parse(MINIMAL + "".join(route(n) for n in names))
    assert [r.name for r in config.routes] == names


# -- nothing to route to -----------------------------------------------------------

@pytest.mark.parametrize("protocol", ["tls", "http"])
def test_named_listener_without_routes_or_fallback_is_an_error(protocol):
    message = error(HEAD.replace(FALLBACK, "") + listen(protocol=f'"{protocol}"'))
    assert f"listen[0]: nothing to route to: this {protocol} listener" in message


def test_a_route_alone_is_enough_to_route_to():
    config = parse(BASE + route("a.example"))
    assert config.fallback is None and len(config.routes) == 1


def test_tcp_only_config_needs_no_routes():
    config = parse('[translate]\nprefix = "64:ff9b:1::/96"\n' + listen(protocol='"tcp"', host='"2001:db8::22"'))
    assert config.routes == () and config.fallback is None


# -- [limits] ----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["hello_timeout", "connect_timeout", "host_try_timeout", "idle_timeout"])
@pytest.mark.parametrize("value,expected", [
    ("0", "got 0"),
    ("-1.5", "got -1.5"),
    ("inf", "got inf"),
    ("nan", "got nan"),
    ('"10"', 'got string "10"'),
    ("true", "got boolean true"),
])
def test_bad_timeouts_are_rejected(key, value, expected):
    message = error(MINIMAL + f"[limits]\n{key} = {value}\n")
    assert f"limits.{key}: expected a number of seconds greater than 0, {expected}" in message


def test_host_try_timeout_is_read_and_defaults_to_3_seconds():
    assert parse(MINIMAL).limits.host_try_timeout == 3.0
    limits = parse(MINIMAL + "[limits]\nhost_try_timeout = 1\n").limits
    assert limits.host_try_timeout == 1.0 and type(limits.host_try_timeout) is float
    assert parse(MINIMAL + "[limits]\nconnect_timeout = 5\nhost_try_timeout = 5\n").limits.host_try_timeout == 5.0


def test_host_try_timeout_default_is_capped_by_a_short_connect_timeout():
    assert parse(MINIMAL + "[limits]\nconnect_timeout = 2\n").limits.host_try_timeout == 2.0


@pytest.mark.parametrize("limits,shown", [
    ("host_try_timeout = 10.5\n", "10.5 seconds is more than connect_timeout (10.0)"),
    ("connect_timeout = 2\nhost_try_timeout = 3\n", "3.0 seconds is more than connect_timeout (2.0)"),
    ("host_try_timeout = 4\nconnect_timeout = 2.5\n", "4.0 seconds is more than connect_timeout (2.5)"),
])
def test_host_try_timeout_longer_than_connect_timeout_is_refused_at_its_line(limits, shown):
    text = MINIMAL + "[limits]\n" + limits
    line = text.splitlines().index(next(x for x in text.splitlines() if x.startswith("host_try_timeout"))) + 1
    message = error(text)
    assert message.startswith(f"k.toml:{line}: limits.host_try_timeout: {shown}"), message
    assert "raise connect_timeout" in message


@pytest.mark.parametrize("value,expected", [
    ("511", "expected an integer from 512 to 65536, got 511"),
    ("65537", "got 65537"),
    ("1024.0", "got float 1024.0"),
])
def test_bad_hello_max_bytes_is_rejected(value, expected):
    assert f"limits.hello_max_bytes: " in (message := error(MINIMAL + f"[limits]\nhello_max_bytes = {value}\n"))
    assert expected in message


@pytest.mark.parametrize("value", [512, 65536])
def test_hello_max_bytes_range_ends_are_accepted(value):
    assert parse(MINIMAL + f"[limits]\nhello_max_bytes = {value}\n").limits.hello_max_bytes == value


# -- load_config ----------------------------------------------------------------------

def test_load_config_accepts_a_path_object_and_records_the_source(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(MINIMAL)
    assert load_config(path).source == str(path)
    assert load_config(str(path)) == load_config(path)


def test_load_config_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: cannot read the file: No such file"):
        load_config(path)


def test_load_config_rejects_invalid_utf8_with_the_line(tmp_path):
    path = tmp_path / "k.toml"
    path.write_bytes(MINIMAL.encode() + b'[tun]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:12: the file is not valid UTF-8"):
        load_config(path)


def test_load_config_error_names_the_file(tmp_path):
    path = tmp_path / "kracauer.toml"
    path.write_text(MINIMAL + "[tun]\nmtu = 9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:12: tun.mtu: expected an integer from 1280 to 65535, got 9"
    assert (info.value.source, info.value.line, info.value.key) == (str(path), 12, "tun.mtu")


# -- line numbers of validation errors -------------------------------------------

def test_error_line_skips_multiline_strings_that_look_like_tables():
    text = MINIMAL + '[tun]\nname = """\n[limits]\nmtu = 1\n"""\n'
    # The name is invalid (contains newlines); the locator must not be fooled by the string's content.
    assert error(text).startswith("k.toml:12: tun.name: ")


def test_error_line_for_keys_in_inline_tables_is_the_enclosing_key():
    text = ('listen = [{address = "192.0.2.10", port = 443, protocol = "tls"},\n'
            '          {address = "192.0.2.10", port = 80, protocol = "udp"}]\n'
            '[translate]\nprefix = "64:ff9b:1::/96"\n' + FALLBACK)
    assert error(text).startswith("k.toml:1: listen[1].protocol: ")


def test_offload_defaults_on_and_can_be_turned_off():
    assert parse(MINIMAL).tun.offload is True
    assert parse("[tun]\noffload = false\n" + MINIMAL).tun.offload is False


def test_offload_must_be_a_boolean():
    message = error('[tun]\noffload = "yes"\n' + MINIMAL)
    assert "tun.offload" in message and "true or false" in message


def test_connection_caps_are_read_and_validated():
    limits = parse(MINIMAL + "\n[limits]\nmax_connections = 500\nmax_peeking = 50\nsyn_backlog = 0\n").limits
    assert (limits.max_connections, limits.max_peeking, limits.syn_backlog) == (500, 50, 0)
    defaults = parse(MINIMAL).limits
    assert (defaults.max_connections, defaults.max_peeking, defaults.syn_backlog) == (100_000, 10_000, 1024)
    message = error(MINIMAL + "\n[limits]\nmax_peeking = 0\n")
    assert "limits.max_peeking" in message and "from 1 to" in message
    message = error(MINIMAL + "\n[limits]\nmax_connections = 1.5\n")
    assert "limits.max_connections" in message


def test_tun_user_is_optional_and_must_be_a_name():
    assert parse(MINIMAL).tun.user is None
    assert parse('[tun]\nuser = "nobody"\n' + MINIMAL).tun.user == "nobody"
    assert "tun.user" in error('[tun]\nuser = ""\n' + MINIMAL)
    assert "tun.user" in error('[tun]\nuser = 65534\n' + MINIMAL)


# ---------------------------------------------------------------- [kernel_path]

def test_python_syn_rate_defaults_to_1000_and_0_is_allowed():
    assert parse(MINIMAL).kernel_path.python_syn_rate == 1000
    assert parse(MINIMAL + "\n[kernel_path]\npython_syn_rate = 0\n").kernel_path.python_syn_rate == 0
    assert parse(MINIMAL + "\n[kernel_path]\npython_syn_rate = 50000\n").kernel_path.python_syn_rate == 50000


@pytest.mark.parametrize("value", ["-1", "16777217", "1.5", '"1000"', "true"])
def test_python_syn_rate_must_be_an_integer_in_range(value):
    message = error(MINIMAL + f"\n[kernel_path]\npython_syn_rate = {value}\n")
    assert "kernel_path.python_syn_rate" in message and "expected an integer from 0 to 16777216" in message


def test_example_files_commented_out_resolve_route_and_resolver_are_valid_when_uncommented():
    text = EXAMPLE.read_text()
    block = re.search(r"^# \[\[route\]\]\n(?:# \w+ = .*\n)+#\n(?:# .*\n)+", text, re.M)
    assert block is not None and "resolve = true" in block[0] and "[resolver]" in block[0]
    uncommented = "\n".join(line[2:] for line in block[0].splitlines() if line.startswith("# ") and
                            ("=" in line or line.startswith("# [")))
    config = parse(text.replace(block[0], uncommented + "\n"))
    [route] = [r for r in config.routes if r.resolve]
    assert route.networks == (ipaddress.IPv6Network("2001:db8:100::/48"),)
    assert config.resolver.servers == ((V6("2001:db8::53"), 53), (V4("192.0.2.53"), 5353))
    assert (config.resolver.timeout, config.resolver.attempts, config.resolver.max_ttl) == (2.0, 2, 3600)


def test_example_files_commented_out_bridge_blocks_are_valid_when_uncommented():
    text = EXAMPLE.read_text()
    blocks = [m[0] for m in re.finditer(r"^# \[\[(?:bridge|route|listen)\]\]\n(?:# \w+ = .*\n)+", text, re.M)
              if "bridge" in m[0]]
    assert len(blocks) == 3, blocks  # the [[bridge]], its route, the peer's listener
    for block in blocks:
        text = text.replace(block, re.sub(r"^# ", "", block, flags=re.M))
    config = parse(text)
    [bridge] = config.bridges
    assert (bridge.name, bridge.address, bridge.port, bridge.server_name) == (
        "provider", "203.0.113.20", 4443, "bridge.example.com")
    [route] = [r for r in config.routes if r.bridge is not None]
    assert (route.name, route.bridge) == ("*.service.example.com", "provider")
    [peer] = config.bridge_listeners
    assert (peer.port, peer.prefix, peer.ports) == (4443, ipaddress.IPv6Network("64:ff9b:2::/96"), (443,))


# -- quic listeners (UDP) ------------------------------------------------------

QUIC = '\n[[listen]]\naddress = "192.0.2.10"\nport = 443\nprotocol = "quic"\n'


def test_a_quic_listener_may_share_a_tls_listeners_address_and_port():
    config = parse(BASE + QUIC + FALLBACK)
    assert [(lst.port, lst.protocol) for lst in config.listeners] == [(443, "tls"), (443, "quic")]


def test_two_quic_listeners_on_one_address_and_port_are_refused():
    message = error(BASE + QUIC + QUIC + FALLBACK)
    assert message.endswith("listen[2]: 192.0.2.10:443 is already used by listen[1] (UDP)")


def test_a_quic_listener_needs_routes_and_takes_no_host():
    quic_only = '[translate]\nprefix = "64:ff9b:1::/96"\n' + QUIC
    assert "nothing to route to: this quic listener" in error(quic_only)
    assert 'listen[0].host: only allowed with protocol "tcp"' in error(quic_only + 'host = "2001:db8::1"\n' + FALLBACK)


def test_protocol_udp_is_refused_with_a_hint_at_quic():
    message = error(BASE.replace('protocol = "tls"', 'protocol = "udp"') + FALLBACK)
    assert '"quic"' in message and 'got "udp"' in message


def test_udp_limits_default_and_are_checked():
    limits = parse(MINIMAL).limits
    assert (limits.udp_idle_timeout, limits.udp_max_peeking, limits.udp_peek_max_bytes,
            limits.udp_peek_max_datagrams) == (60.0, 10_000, 16384, 8)
    limits = parse(MINIMAL + "\n[limits]\nudp_idle_timeout = 30\nudp_max_peeking = 5\nudp_peek_max_bytes = 4096\n"
                             "udp_peek_max_datagrams = 3\n").limits
    assert (limits.udp_idle_timeout, limits.udp_max_peeking, limits.udp_peek_max_bytes,
            limits.udp_peek_max_datagrams) == (30.0, 5, 4096, 3)
    assert "limits.udp_peek_max_bytes" in error(MINIMAL + "\n[limits]\nudp_peek_max_bytes = 1000\n")
    assert "limits.udp_peek_max_datagrams" in error(MINIMAL + "\n[limits]\nudp_peek_max_datagrams = 0\n")
    assert "limits.udp_idle_timeout" in error(MINIMAL + "\n[limits]\nudp_idle_timeout = 0\n")
    assert "limits.udp_max_peeking" in error(MINIMAL + "\n[limits]\nudp_max_peeking = \"many\"\n")
