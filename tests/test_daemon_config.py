"""The configuration tables for operations: [log], [metrics], [state] (issue #5)."""

from __future__ import annotations

import ipaddress

import pytest

from kracauer.config import ConfigError, LogConfig, parse_config

MINIMAL = """\
[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"

[fallback]
host = "2001:db8::99"
"""


def parse(text):
    return parse_config(text, source="k.toml")


def error(text):
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def test_defaults_without_the_tables():
    config = parse(MINIMAL)
    assert config.log == LogConfig(access=None, level="info")
    assert config.metrics is None and config.state is None


def test_all_three_tables():
    config = parse(MINIMAL + '[log]\naccess = "/var/log/kracauer/access.log"\nlevel = "debug"\n'
                   '[metrics]\nlisten = "127.0.0.1:9477"\n[state]\nfile = "/var/lib/kracauer/state.json"\n')
    assert config.log == LogConfig(access="/var/log/kracauer/access.log", level="debug")
    assert (config.metrics.address, config.metrics.port) == (ipaddress.ip_address("127.0.0.1"), 9477)
    assert str(config.metrics) == "127.0.0.1:9477"
    assert config.state.file == "/var/lib/kracauer/state.json"


def test_access_log_to_stdout():
    assert parse(MINIMAL + '[log]\naccess = "-"\n').log.access == "-"


@pytest.mark.parametrize("listen, address, port", [
    ("[::1]:9477", "::1", 9477),
    ("0.0.0.0:1", "0.0.0.0", 1),
    ("[::]:65535", "::", 65535),
])
def test_metrics_listen_forms(listen, address, port):
    metrics = parse(MINIMAL + f'[metrics]\nlisten = "{listen}"\n').metrics
    assert (metrics.address, metrics.port) == (ipaddress.ip_address(address), port)
    assert str(metrics) == listen


@pytest.mark.parametrize("text, message", [
    ('[log]\naccess = "access.log"\n', 'k.toml:12: log.access: expected an absolute path or "-" (a file, not a directory), got "access.log"'),
    ('[log]\naccess = "/var/log/"\n', "log.access: expected an absolute path"),
    ('[log]\naccess = 1\n', "log.access: expected a string, got integer 1"),
    ('[log]\nlevel = "trace"\n', 'log.level: expected one of "debug", "info", "warning", "error", got "trace"'),
    ('[log]\nacess = "-"\n', 'log.acess: unknown key (did you mean "access"?)'),
    ('[metrics]\n', "k.toml:11: metrics.listen: required key is missing"),
    ('[metrics]\nlisten = "9477"\n', 'metrics.listen: expected "ADDRESS:PORT" with an IP address'),
    ('[metrics]\nlisten = "localhost:9477"\n', 'got "localhost:9477"'),
    ('[metrics]\nlisten = "::1:9477"\n', "(IPv6 addresses in brackets)"),
    ('[metrics]\nlisten = "127.0.0.1:70000"\n', "expected a port from 1 to 65535, got 70000"),
    ('[metrics]\nlisten = "127.0.0.1:0"\n', "expected a port from 1 to 65535, got 0"),
    ('[metrics]\nport = 9477\n', 'metrics.port: unknown key'),
    ('[state]\n', "state.file: required key is missing"),
    ('[state]\nfile = "state.json"\n', "state.file: expected an absolute path (a file, not a directory)"),
])
def test_errors_name_the_key_and_what_was_expected(text, message):
    assert message in error(MINIMAL + text)


def test_state_must_be_a_table():
    assert "state: expected a table ([state])" in error('state = "/x"\n' + MINIMAL)


def test_unknown_top_level_table_lists_the_new_ones():
    assert '"log", "metrics", "state"' in error(MINIMAL + "[stats]\nx = 1\n")
