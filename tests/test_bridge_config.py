"""kracauer.config for the TLS bridge (issue 10 part 3): [[bridge]], route `bridge`, protocol "bridge"
listeners and [limits] max_tunnels; and what a reload of them cannot change.

Errors are asserted as test_config does: one line, ``file:line: key: what``.
"""

from __future__ import annotations

import ipaddress

import pytest

from kracauer.bridge import bridge_changes, ingress_context, peer_context, relay_addresses, relay_ports
from kracauer.config import Bridge, BridgeListener, ConfigError, Route, relay_address
from kracauer.daemon import restart_needed
from tests.configs import BASE, parse

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
N6 = ipaddress.IPv6Network

# Lines 8-15 when appended to BASE.
BRIDGE = """
[[bridge]]
name = "provider"
address = "203.0.113.20:4443"
server_name = "bridge.example.com"
ca = "/etc/kracauer/peer-ca.pem"
cert = "/etc/kracauer/ingress.pem"
key = "/etc/kracauer/ingress.key"
"""
# Lines 16-19 after BASE + BRIDGE.
BRIDGE_ROUTE = """
[[route]]
name = "*.service.example.com"
bridge = "provider"
"""
INGRESS = BASE + BRIDGE + BRIDGE_ROUTE
# A peer box's listener: lines 8-16 after BASE.
PEER_LISTEN = """
[[listen]]
address = "203.0.113.20"
port = 4443
protocol = "bridge"
cert = "/etc/kracauer/bridge.pem"
key = "/etc/kracauer/bridge.key"
client_ca = "/etc/kracauer/ingress-ca.pem"
prefix = "2001:db8:64::/96"
"""
HOST_ROUTE = """
[[route]]
name = "*.service.example.com"
host = "2001:db8::10"
"""
PEER = BASE + PEER_LISTEN + HOST_ROUTE


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message and message.startswith("k.toml:")
    return message


# ---------------------------------------------------------------- [[bridge]]

def test_a_bridge_and_its_route_are_read():
    config = parse(INGRESS)
    assert config.bridges == (Bridge(name="provider", address="203.0.113.20", port=4443,
                                     server_name="bridge.example.com", ca="/etc/kracauer/peer-ca.pem",
                                     cert="/etc/kracauer/ingress.pem", key="/etc/kracauer/ingress.key"),)
    # The route's host is the local relay: prefix + 255.255.255.255 (config.relay_address).
    relay = V6("64:ff9b:1::ffff:ffff")
    assert config.routes == (Route(name="*.service.example.com", host=relay, hosts=(relay,), bridge="provider"),)
    assert config.bridge_listeners == ()


def test_the_outer_server_name_is_lowercased_without_its_trailing_dot():
    # RFC 6066 §3: HostName is compared case-insensitively and sent without the trailing dot.
    config = parse(INGRESS.replace('"bridge.example.com"', '"Bridge.Example.COM."'))
    assert config.bridges[0].server_name == "bridge.example.com"


@pytest.mark.parametrize("address,host,port", [
    ("203.0.113.20:4443", "203.0.113.20", 4443),
    ("[2001:db8::20]:4443", "2001:db8::20", 4443),
    ("Peer.Example.com.:443", "peer.example.com", 443),
    ("peer:65535", "peer", 65535),
])
def test_bridge_addresses_may_be_ipv4_bracketed_ipv6_or_a_name(address, host, port):
    bridge = parse(INGRESS.replace("203.0.113.20:4443", address)).bridges[0]
    assert (bridge.address, bridge.port) == (host, port)


@pytest.mark.parametrize("address,expected", [
    ("203.0.113.20", 'expected "HOST:PORT"'),
    ("peer:", 'expected "HOST:PORT"'),
    (":4443", 'expected "HOST:PORT"'),
    ("2001:db8::20:4443", "(IPv6 addresses in brackets)"),
    ("[2001:db8::zz]:4443", 'expected "HOST:PORT"'),
    ("peer:0", "expected a port from 1 to 65535, got 0"),
    ("peer:65536", "expected a port from 1 to 65535, got 65536"),
    ("peer:４４３", 'expected "HOST:PORT"'),  # str.isdigit() is true for fullwidth digits: refused all the same
    ("bad_name!:443", 'expected "HOST:PORT"'),
])
def test_bad_bridge_addresses_are_rejected_at_their_line(address, expected):
    message = error(INGRESS.replace("203.0.113.20:4443", address))
    assert message.startswith("k.toml:11: bridge[0].address: ") and expected in message


@pytest.mark.parametrize("value,expected", [
    ('""', "the name is empty"),
    ('"*.example.com"', 'label "*" may only contain letters, digits and hyphens'),
    ('"bücher.example"', "xn-- form"),
    ('"-bad.example"', 'label "-bad" starts or ends with a hyphen'),
    ("7", "expected a string, got integer 7"),
])
def test_bad_outer_server_names_are_rejected(value, expected):
    message = error(INGRESS.replace('"bridge.example.com"', value))
    assert message.startswith("k.toml:12: bridge[0].server_name: ") and expected in message


@pytest.mark.parametrize("value", ['"203.0.113.20"', '"2001:db8::20"'])
def test_an_ip_address_is_not_an_outer_server_name(value):
    # RFC 6066 §3: "Literal IPv4 and IPv6 addresses are not permitted in HostName"; Python's ssl
    # sends no SNI at all for one, so the firewall that passes only the bridge's name drops it.
    message = error(INGRESS.replace('"bridge.example.com"', value))
    assert message.startswith("k.toml:12: bridge[0].server_name: ") and "IP address" in message


@pytest.mark.parametrize("key,line", [("name", 9), ("address", 9), ("server_name", 9), ("ca", 9), ("cert", 9),
                                      ("key", 9)])
def test_every_bridge_key_is_required(key, line):
    text = BASE + "".join(l + "\n" for l in BRIDGE.splitlines() if not l.startswith(f"{key} ")) + BRIDGE_ROUTE
    assert error(text).startswith(f"k.toml:{line}: bridge[0].{key}: required key is missing")


def test_an_unknown_bridge_key_is_an_error_with_the_allowed_keys():
    message = error(INGRESS.replace('key = "/etc/kracauer/ingress.key"\n',
                                    'key = "/etc/kracauer/ingress.key"\nsni = "x"\n'))
    assert message == ('k.toml:16: bridge[0].sni: unknown key; allowed keys: "name", "address", "server_name", '
                       '"ca", "cert", "key"')


def test_two_bridges_with_one_name_are_rejected_at_the_second():
    message = error(BASE + BRIDGE + BRIDGE + BRIDGE_ROUTE)
    assert message == 'k.toml:18: bridge[1].name: "provider" is already the name of bridge[0]'


def test_two_bridges_with_their_own_names_are_read_in_order():
    config = parse(BASE + BRIDGE + BRIDGE.replace('"provider"', '"backup"') + BRIDGE_ROUTE)
    assert [b.name for b in config.bridges] == ["provider", "backup"]


@pytest.mark.parametrize("value,expected", [('""', 'got ""'), ('"a b"', 'got "a b"'), ("5", "expected a string")])
def test_bad_bridge_names_are_rejected(value, expected):
    message = error(INGRESS.replace('name = "provider"', f"name = {value}"))
    assert message.startswith("k.toml:10: bridge[0].name: ") and expected in message


@pytest.mark.parametrize("key", ["ca", "cert", "key"])
def test_bridge_files_must_be_absolute_paths(key):
    text = INGRESS.replace(f'{key} = "/etc/kracauer/', f'{key} = "')
    message = error(text)
    assert f": bridge[0].{key}: expected an absolute path (a file, not a directory)" in message


def test_missing_certificate_files_are_found_when_the_bridge_is_set_up_not_by_the_parser(tmp_path):
    # The files are read once, as root, when the daemon starts (kracauer.bridge reads them before the
    # privileges are dropped): the parser only checks the paths, so check-config may run unprivileged.
    config = parse(INGRESS.replace("/etc/kracauer", str(tmp_path)))
    with pytest.raises(FileNotFoundError):
        ingress_context(config.bridges[0])
    config = parse(PEER.replace("/etc/kracauer", str(tmp_path)))
    with pytest.raises(FileNotFoundError):
        peer_context(config.bridge_listeners[0])


# ---------------------------------------------------------------- route `bridge`

def test_a_route_naming_no_configured_bridge_is_rejected_with_the_names():
    assert error(INGRESS.replace('bridge = "provider"', 'bridge = "other"')) == \
        'k.toml:19: route[0].bridge: no [[bridge]] is called "other" ("provider")'
    assert error(BASE + BRIDGE_ROUTE) == \
        'k.toml:11: route[0].bridge: no [[bridge]] is called "provider" (none is configured)'


@pytest.mark.parametrize("extra", ['host = "2001:db8::10"', "resolve = true", 'networks = ["2001:db8::/32"]'])
def test_a_bridge_route_has_no_host_resolve_or_networks(extra):
    key = extra.split(" ")[0]
    message = error(INGRESS + extra + "\n")
    assert message == f"k.toml:20: route[0].{key}: a route goes to a bridge or has {key}, not both"


def test_a_bridge_route_keeps_its_port_and_alpn():
    [route] = parse(INGRESS + 'port = 8443\nalpn = "h2"\n').routes
    assert (route.port, route.alpn, route.bridge, route.host) == (8443, "h2", "provider", V6("64:ff9b:1::ffff:ffff"))


def test_a_bridge_route_name_must_be_a_string():
    assert error(INGRESS.replace('bridge = "provider"', "bridge = 5")).startswith(
        "k.toml:19: route[0].bridge: expected a string, got integer 5")


def test_the_relay_address_is_the_prefix_with_the_limited_broadcast_address():
    # RFC 919 §7: 255.255.255.255 is never a source, so no client is ever prefix::255.255.255.255.
    assert relay_address(N6("64:ff9b:1::/96")) == V6("64:ff9b:1::ffff:ffff")
    assert relay_address(N6("2001:db8:1:2::/96")) == V6("2001:db8:1:2::ffff:ffff")
    # One per listener protocol, all inside the prefix, none of them a possible client of a unicast source.
    relays = relay_addresses(N6("64:ff9b:1::/96"))
    assert relays == {"tls": V6("64:ff9b:1::ffff:ffff"), "http": V6("64:ff9b:1::ffff:fffe"),
                      "connect": V6("64:ff9b:1::ffff:fffd")}


# ---------------------------------------------------------------- protocol "bridge" listeners

def test_a_bridge_listener_is_read_apart_from_the_tun_listeners():
    config = parse(PEER)
    assert config.bridge_listeners == (BridgeListener(
        address=V4("203.0.113.20"), port=4443, cert="/etc/kracauer/bridge.pem", key="/etc/kracauer/bridge.key",
        client_ca="/etc/kracauer/ingress-ca.pem", prefix=N6("2001:db8:64::/96"), ports=(443,)),)
    # Only the TUN's listeners reach the tracker.
    assert [lst.protocol for lst in config.listeners] == ["tls"]


def test_a_peer_with_only_a_bridge_listener_is_valid():
    text = PEER_LISTEN.replace("[[listen]]", '[translate]\nprefix = "64:ff9b:1::/96"\n\n[[listen]]') + HOST_ROUTE
    config = parse(text)
    assert config.listeners == () and len(config.bridge_listeners) == 1


def test_a_bridge_listener_reads_its_ports():
    assert parse(PEER.replace('prefix = "2001:db8:64::/96"\n', 'prefix = "2001:db8:64::/96"\nports = [443, 8443]\n')
                 ).bridge_listeners[0].ports == (443, 8443)
    message = error(PEER.replace('prefix = "2001:db8:64::/96"\n', 'prefix = "2001:db8:64::/96"\nports = []\n'))
    assert message.startswith("k.toml:17: listen[1].ports: the list is empty")


@pytest.mark.parametrize("key", ["cert", "key", "client_ca", "prefix"])
def test_a_bridge_listener_requires_its_files_and_prefix(key):
    text = BASE + "".join(l + "\n" for l in PEER_LISTEN.splitlines() if not l.startswith(f"{key} ")) + HOST_ROUTE
    assert error(text) == f"k.toml:9: listen[1].{key}: required key is missing"


@pytest.mark.parametrize("key,value", [("host", '"2001:db8::1"'), ("allow", '["198.51.100.0/24"]')])
def test_host_and_allow_are_not_allowed_on_a_bridge_listener(key, value):
    message = error(PEER.replace('prefix = "2001:db8:64::/96"\n', f'prefix = "2001:db8:64::/96"\n{key} = {value}\n'))
    assert message.startswith(f'k.toml:17: listen[1].{key}: not allowed with protocol "bridge"')


@pytest.mark.parametrize("key", ["cert", "key", "client_ca"])
@pytest.mark.parametrize("protocol", ["tls", "http", "tcp", "connect"])
def test_certificate_keys_are_only_allowed_on_bridge_listeners(protocol, key):
    extra = {"tcp": 'host = "2001:db8::22"\n', "connect": 'allow = ["198.51.100.0/24"]\n'}.get(protocol, "")
    text = BASE.replace('"tls"', f'"{protocol}"') + extra + f'{key} = "/etc/kracauer/x.pem"\n' + HOST_ROUTE
    assert error(text) == (f'k.toml:{8 + bool(extra)}: listen[0].{key}: only allowed with protocol "bridge" '
                           f'(this listener is "{protocol}")')


def test_a_bridge_listener_prefix_must_not_be_the_translate_prefix():
    # The bridge's prefix is routed `local` on lo: the same /96 routed into the TUN would take the
    # hosts' answers away from one of them.
    message = error(PEER.replace("2001:db8:64::/96", "64:ff9b:1::/96"))
    assert message == ("k.toml:16: listen[1].prefix: 64:ff9b:1::/96 is also [translate] prefix, which is routed "
                       "into the TUN; a bridge listener needs a prefix of its own (routed local on lo)")


def test_a_bridge_listener_prefix_must_not_be_a_tun_listeners_prefix():
    text = BASE + 'prefix = "2001:db8:64::/96"\n' + PEER_LISTEN + HOST_ROUTE
    message = error(text)
    assert message.startswith("k.toml:17: listen[1].prefix: 2001:db8:64::/96 is also the prefix of a TUN listener")


def test_two_bridge_listeners_may_share_a_prefix_but_not_an_address_and_port():
    second = PEER_LISTEN.replace("4443", "4444")
    assert len(parse(BASE + PEER_LISTEN + second + HOST_ROUTE).bridge_listeners) == 2
    assert error(BASE + PEER_LISTEN + PEER_LISTEN + HOST_ROUTE) == \
        "k.toml:18: listen[2]: 203.0.113.20:4443 is already used by listen[1]"
    # Nor the address and port of a TUN listener.
    text = BASE + PEER_LISTEN.replace("203.0.113.20", "192.0.2.10").replace("4443", "443") + HOST_ROUTE
    assert error(text) == "k.toml:9: listen[1]: 192.0.2.10:443 is already used by listen[0]"


def test_a_bridge_listener_needs_something_to_route_to():
    text = PEER_LISTEN.replace("[[listen]]", '[translate]\nprefix = "64:ff9b:1::/96"\n\n[[listen]]')
    assert "listen[0]: nothing to route to: this bridge listener needs at least one [[route]]" in error(text)


# ---------------------------------------------------------------- [limits] max_tunnels

def test_max_tunnels_defaults_to_10000_and_is_read():
    assert parse(INGRESS).limits.max_tunnels == 10_000
    assert parse(INGRESS + "\n[limits]\nmax_tunnels = 1\n").limits.max_tunnels == 1
    assert parse(INGRESS + "\n[limits]\nmax_tunnels = 1000000\n").limits.max_tunnels == 1_000_000


@pytest.mark.parametrize("value,shown", [("0", "0"), ("1000001", "1000001"), ("1.5", "float 1.5"),
                                         ('"5"', 'string "5"'), ("true", "boolean true")])
def test_max_tunnels_out_of_range_is_rejected(value, shown):
    assert error(INGRESS + f"\n[limits]\nmax_tunnels = {value}\n") == \
        f"k.toml:22: limits.max_tunnels: expected an integer from 1 to 1000000, got {shown}"


# ---------------------------------------------------------------- reload

CONNECT_LISTEN = """
[[listen]]
address = "192.0.2.10"
port = 3128
protocol = "connect"
allow = ["198.51.100.0/24"]
ports = [443, 8443]
"""


def test_the_relay_listens_on_every_port_a_bridge_route_can_be_reached_on():
    config = parse(BASE + CONNECT_LISTEN + BRIDGE + BRIDGE_ROUTE + '\n[[route]]\nname = "x.example"\n'
                   'bridge = "provider"\nport = 9443\n')
    # tls: the listener's port or the route's; connect: every port a CONNECT may name, or the route's.
    assert relay_ports(config) == {"tls": {443, 9443}, "http": set(), "connect": {443, 8443, 9443}}
    # No bridge route: nothing to listen on.
    assert relay_ports(parse(BASE + CONNECT_LISTEN + BRIDGE + HOST_ROUTE)) == {"tls": set(), "http": set(),
                                                                             "connect": set()}


@pytest.mark.parametrize("old,new,problem", [
    (INGRESS, INGRESS.replace("4443", "4444"), "[[bridge]]"),
    (INGRESS, INGRESS.replace("ingress.pem", "other.pem"), "[[bridge]]"),
    (INGRESS, INGRESS.replace("bridge.example.com", "b2.example.com"), "[[bridge]]"),
    (PEER, PEER.replace("bridge.key", "other.key"), "bridge [[listen]] entries"),
    (PEER, PEER.replace("2001:db8:64::", "2001:db8:65::"), "bridge [[listen]] entries"),
    (PEER, PEER.replace('prefix = "2001:db8:64::/96"\n', 'prefix = "2001:db8:64::/96"\nports = [8443]\n'),
     "bridge [[listen]] entries"),
    (INGRESS, INGRESS + "port = 8443\n", "the ports bridge routes are reached on"),
    (BASE + BRIDGE + HOST_ROUTE, INGRESS, "the ports bridge routes are reached on"),
])
def test_what_a_reload_cannot_change_about_the_bridge(old, new, problem):
    # The sockets are bound and the files read once, as root (kracauer.bridge): a reload keeps them.
    assert bridge_changes(parse(old), parse(new)) == [problem]
    assert restart_needed(parse(old), parse(new)) == [problem]


def test_a_reload_may_change_bridge_routes_that_keep_their_ports_and_max_tunnels():
    new = INGRESS.replace('"*.service.example.com"', '"*.other.example.com"') + "\n[limits]\nmax_tunnels = 5\n"
    assert restart_needed(parse(INGRESS), parse(new)) == []
    # A peer's routes are its own [[route]] table: they change on reload too.
    assert restart_needed(parse(PEER), parse(PEER.replace("2001:db8::10", "2001:db8::11"))) == []
