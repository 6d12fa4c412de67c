"""[agents] on the box and [agent] on a host: validation (kracauer.config), and names a token allows."""

import hashlib
import ipaddress
import pathlib

import pytest

from kracauer.config import (
    ConfigError, agent_name_allowed, agent_name_key, load_agent_config, parse_agent_config, parse_config,
)
from kracauer.daemon import restart_needed
from tests.configs import BASE

DIGEST = hashlib.sha256(b"secret-token").hexdigest()



def agents(extra: str = "", token: str = f'sha256 = "{DIGEST}"\nnames = ["app.example.com", "*.dev.example.com"]') -> str:
    return BASE + f"""
[agents]
listen = "203.0.113.5:4444"
cert = "/etc/kracauer/box.pem"
key = "/etc/kracauer/box.key"
{extra}

[[agents.token]]
{token}
"""


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "k.toml")
    return str(info.value)


def test_agents_with_defaults():
    config = parse_config(agents())
    a = config.agents
    assert (a.address, a.port, a.tun, a.network, a.keepalive) == (
        ipaddress.IPv4Address("203.0.113.5"), 4444, "kagents0", ipaddress.IPv6Network("fd00:6b72::/64"), 10.0)
    assert a.tokens[0].sha256 == DIGEST and a.tokens[0].names == ("app.example.com", "*.dev.example.com")
    assert a.listen == "203.0.113.5:4444"


def test_agents_alone_are_enough_to_route_to():
    # No [[route]] and no [fallback]: the agents' names are the routes.
    assert parse_config(agents()).routes == ()
    assert "nothing to route to" in error(BASE)


def test_no_agents_table_means_no_agents():
    assert parse_config(BASE + '[fallback]\nhost = "2001:db8::1"\n').agents is None


@pytest.mark.parametrize("token, problem", [
    ('sha256 = "abc"\nnames = ["a.example.com"]', "64 hex digits"),
    (f'sha256 = "{"g" * 64}"\nnames = ["a.example.com"]', "64 hex digits"),
    (f'sha256 = "{DIGEST}"\nnames = []', "non-empty list"),
    (f'sha256 = "{DIGEST}"\nnames = ["~^a.*$"]', "not regular expressions"),
    (f'sha256 = "{DIGEST}"\nnames = ["a..example.com"]', "empty label"),
    (f'sha256 = "{DIGEST}"\nnames = ["a.*.example.com"]', "whole first label"),
    (f'sha256 = "{DIGEST}"\nnames = ["A.example.com", "a.example.com"]', "listed twice"),
    (f'sha256 = "{DIGEST}"', "required key"),
    (f'sha256 = "{DIGEST}"\nnames = ["a.example.com"]\ntoken = "clear"', "unknown key"),
])
def test_bad_tokens_are_refused_with_what_is_wrong(token, problem):
    message = error(agents(token=token))
    assert problem in message and "agents.token[0]" in message


def test_the_same_token_twice_is_refused():
    text = agents() + f'\n[[agents.token]]\nsha256 = "{DIGEST.upper()}"\nnames = ["b.example.com"]\n'
    assert "the same token as agents.token[0]" in error(text)


@pytest.mark.parametrize("extra, problem", [
    ('network = "fd00:6b72::/48"', "a /64 to a /120"),
    ('network = "64:ff9b:1::/96"', "overlaps the translate prefix"),
    ('network = "ff02::/64"', "not a unicast network"),
    ('network = "10.0.0.0/24"', "expected an IPv6 network"),
    ('tun = "kracauer0"', "needs its own"),
    ('tun = "a/b"', "may not contain"),
    ('keepalive = 0', "greater than 0"),
    ('keepalive = 7200', "at most 3600"),
])
def test_bad_agents_settings_are_refused(extra, problem):
    assert problem in error(agents(extra))


def test_agents_listen_needs_address_and_port():
    assert "ADDRESS:PORT" in error(agents().replace('listen = "203.0.113.5:4444"', 'listen = "203.0.113.5"'))


def test_a_configured_host_inside_the_agents_network_is_refused():
    text = agents('network = "fd00:6b72::/64"') + '\n[[route]]\nname = "x.example.com"\nhost = "fd00:6b72::5"\n'
    assert "contains the configured host fd00:6b72::5" in error(text)


def test_a_configured_host_inside_the_default_agents_network_is_refused_too():
    text = agents() + '\n[[route]]\nname = "x.example.com"\nhost = "fd00:6b72::5"\n'
    assert "fd00:6b72::/64 (the default [agents] network) contains the configured host fd00:6b72::5" in error(text)


def test_an_agents_network_inside_a_resolve_routes_networks_is_refused():
    text = agents() + '\n[[route]]\nname = "*.svc.example.com"\nresolve = true\nnetworks = ["fd00::/16"]\n'
    assert 'overlaps the networks fd00::/16 of the resolve route "*.svc.example.com"' in error(text)
    assert parse_config(text.replace("fd00::/16", "2001:db8:100::/48")).agents is not None


def test_a_reload_cannot_change_where_agents_connect_but_can_change_tokens():
    old = parse_config(agents())
    tokens = parse_config(agents(token=f'sha256 = "{"1" * 64}"\nnames = ["x.example.com"]'))
    assert restart_needed(old, tokens) == []
    moved = parse_config(agents().replace("203.0.113.5:4444", "203.0.113.5:4445"))
    assert restart_needed(old, moved) == ["[agents] listen, tun, network, cert or key"]
    gone = parse_config(BASE + '[fallback]\nhost = "2001:db8::1"\n')
    assert restart_needed(old, gone) == ["[agents] (added or removed)"]


# -- which names a token allows ---------------------------------------------------------


@pytest.mark.parametrize("name, allowed", [
    ("app.example.com", True),
    ("APP.Example.com.", True),
    ("x.dev.example.com", True),
    ("a.b.dev.example.com", True),
    ("*.dev.example.com", True),
    ("*.team.dev.example.com", True),
    ("dev.example.com", False),          # a wildcard does not cover its bare domain
    ("other.example.com", False),
    ("*.example.com", False),            # wider than allowed
    ("evildev.example.com", False),      # a suffix, not a label boundary
    ("app.example.com.evil", False),
])
def test_names_a_token_may_register(name, allowed):
    patterns = [agent_name_key(n) for n in ("app.example.com", "*.dev.example.com")]
    assert agent_name_allowed(agent_name_key(name), patterns) is allowed


# -- the agent's own file ---------------------------------------------------------------

AGENT = """\
[agent]
box = "edge.example.com:4444"
server_name = "edge.example.com"
ca = "/etc/kracauer/box-ca.pem"
token_file = "/etc/kracauer/agent.token"
names = ["app.example.com", "*.dev.example.com"]
tun = "kagent0"
"""


def test_the_agent_config_of_the_issue_parses():
    config = parse_agent_config(AGENT, "agent.toml")
    assert (config.box_host, config.box_port, config.server_name, config.tun) == (
        "edge.example.com", 4444, "edge.example.com", "kagent0")
    assert config.names == ("app.example.com", "*.dev.example.com")


def test_an_ipv6_box_in_brackets():
    assert parse_agent_config(AGENT.replace("edge.example.com:4444", "[2001:db8::1]:4444")).box_host == "2001:db8::1"


@pytest.mark.parametrize("old, new, problem", [
    ('box = "edge.example.com:4444"', 'box = "edge.example.com"', "NAME:PORT"),
    ('box = "edge.example.com:4444"', 'box = "edge.example.com:0"', "NAME:PORT"),
    ('ca = "/etc/kracauer/box-ca.pem"', 'ca = "box-ca.pem"', "absolute path"),
    ('names = ["app.example.com", "*.dev.example.com"]', 'names = []', "non-empty list"),
    ('names = ["app.example.com", "*.dev.example.com"]', 'names = ["~x"]', "not regular expressions"),
    ('server_name = "edge.example.com"', 'server_name = "edge..example.com"', "invalid name"),
    ('tun = "kagent0"', 'tun = "kagent0"\nport = 1', "unknown key"),
    ('names = ["app.example.com", "*.dev.example.com"]',
     "names = [" + ", ".join(f'"n{i}.example.com"' for i in range(65)) + "]", "at most 64 names"),
])
def test_bad_agent_configs_are_refused(old, new, problem):
    with pytest.raises(ConfigError) as info:
        parse_agent_config(AGENT.replace(old, new), "agent.toml")
    assert problem in str(info.value) and str(info.value).startswith("agent.toml")


def test_the_agent_config_needs_its_table():
    with pytest.raises(ConfigError, match=r"\[agent\] table is missing"):
        parse_agent_config("", "agent.toml")


def test_the_example_agent_file_parses():
    path = pathlib.Path(__file__).resolve().parent.parent / "contrib" / "kracauer-agent.toml"
    config = load_agent_config(path)
    assert config.box_port == 4444 and config.names == ("app.example.com", "*.dev.example.com")


def test_an_agents_network_overlapping_a_bridge_listeners_prefix_is_refused():
    text = agents('network = "2001:db8:64::/112"') + """
[[listen]]
address = "203.0.113.20"
port = 4443
protocol = "bridge"
cert = "/etc/kracauer/bridge.pem"
key = "/etc/kracauer/bridge.key"
client_ca = "/etc/kracauer/ingress-ca.pem"
prefix = "2001:db8:64::/96"
"""
    assert "overlaps the translate prefix 2001:db8:64::/96" in error(text)
