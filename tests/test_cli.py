"""kracauer.cli: check-config, decode, encode, --version, daemon start-up."""

import ipaddress
import pathlib
import subprocess
import sys
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kracauer
from kracauer.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "kracauer-config.toml"

MINIMAL = """\
[translate]
prefix = "2001:db8:64::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"

[fallback]
host = "2001:db8::99"
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(MINIMAL)
    return path


@pytest.fixture
def bad_config_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL.replace('"tls"', '"udp"'))
    return path


# -- check-config -----------------------------------------------------------------

def test_check_config_ok_prints_a_summary_and_exits_0(capsys):
    assert main(["check-config", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE}: OK (4 listeners, 2 routes, fallback: yes)\n"
    assert err == ""


def test_check_config_summary_uses_singular_and_reports_no_fallback(tmp_path, capsys):
    path = tmp_path / "k.toml"
    path.write_text(MINIMAL.replace('[fallback]\nhost = "2001:db8::99"\n',
                                    '[[route]]\nname = "a.example"\nhost = "2001:db8::1"\n'))
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK (1 listener, 1 route, fallback: no)\n"


def test_check_config_error_goes_to_stderr_and_exits_2(bad_config_file, capsys):
    assert main(["check-config", str(bad_config_file)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f'kracauer: {bad_config_file}:7: listen[0].protocol: expected one of "tls", "http", "tcp", "connect", '
                   '"quic", "bridge", got "udp" (a UDP listener is protocol = "quic": HTTP/3 routed by name)\n')


def test_check_config_missing_file_exits_2(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read the file" in capsys.readouterr().err


def test_check_config_without_file_is_a_usage_error(capsys):
    assert main(["check-config"]) == 2
    assert "FILE" in capsys.readouterr().err


# -- decode / encode --------------------------------------------------------------

def test_decode_prints_the_embedded_ipv4_address(capsys):
    assert main(["decode", "64:ff9b:1::cb00:7107"]) == 0
    assert capsys.readouterr().out == "203.0.113.7\n"


def test_decode_prints_one_line_per_address_for_any_prefix(capsys):
    assert main(["decode", "64:ff9b:1::cb00:7107", "2001:db8:1:2:3:4:c000:221", "64:ff9b::192.0.2.1"]) == 0
    assert capsys.readouterr().out == "203.0.113.7\n192.0.2.33\n192.0.2.1\n"


@pytest.mark.parametrize("bad,expected", [
    ("not-an-address", "not an IPv6 address: 'not-an-address'"),
    ("203.0.113.7", "expected an IPv6 address, got IPv4 address '203.0.113.7'"),
])
def test_decode_bad_input_prints_nothing_and_exits_2(bad, expected, capsys):
    assert main(["decode", "64:ff9b:1::cb00:7107", bad]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"kracauer: decode: {expected}\n"


def test_encode_with_prefix_prints_the_compressed_address(capsys):
    assert main(["encode", "--prefix", "64:ff9b:1::/96", "203.0.113.7", "192.0.2.33"]) == 0
    assert capsys.readouterr().out == "64:ff9b:1::cb00:7107\n64:ff9b:1::c000:221\n"


def test_encode_takes_the_prefix_from_the_config(config_file, capsys):
    assert main(["encode", "--config", str(config_file), "203.0.113.7"]) == 0
    assert main(["--config", str(config_file), "encode", "203.0.113.7"]) == 0
    assert capsys.readouterr().out == "2001:db8:64::cb00:7107\n" * 2


@pytest.mark.parametrize("args,expected", [
    (["encode", "--prefix", "64:ff9b:1::/64", "192.0.2.1"], "encode: --prefix: the prefix must be exactly a /96"),
    (["encode", "--prefix", "64:ff9b:1::/96", "2001:db8::1"], "encode: not an IPv4 address: '2001:db8::1'"),
    (["encode", "192.0.2.1"], "encode: needs --prefix P or --config FILE"),
])
def test_encode_errors_exit_2(args, expected, capsys):
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"kracauer: {expected}")


def test_encode_rejects_both_prefix_and_config(config_file, capsys):
    assert main(["encode", "--prefix", "64:ff9b:1::/96", "--config", str(config_file), "192.0.2.1"]) == 2
    assert "not both" in capsys.readouterr().err


def test_encode_with_a_bad_config_reports_the_config_error(bad_config_file, capsys):
    assert main(["encode", "--config", str(bad_config_file), "192.0.2.1"]) == 2
    assert "listen[0].protocol" in capsys.readouterr().err


@given(st.ip_addresses(v=4))
def test_encode_then_decode_round_trips_every_ipv4_address(v4):
    import contextlib
    import io

    encoded = io.StringIO()
    with contextlib.redirect_stdout(encoded):
        assert main(["encode", "--prefix", "64:ff9b:1::/96", str(v4)]) == 0
    v6 = encoded.getvalue().strip()
    assert ipaddress.IPv6Address(v6) in ipaddress.IPv6Network("64:ff9b:1::/96")
    assert v6 == str(ipaddress.IPv6Address(v6))  # compressed form
    decoded = io.StringIO()
    with contextlib.redirect_stdout(decoded):
        assert main(["decode", v6]) == 0
    assert decoded.getvalue() == f"{v4}\n"


# -- running the daemon --------------------------------------------------------------

@pytest.fixture
def fake_daemon(monkeypatch):
    """A stand-in for kracauer.daemon (written separately) that records its calls."""
    module = types.ModuleType("kracauer.daemon")
    module.calls = []
    module.status = 0

    def run(config):
        module.calls.append(config)
        return module.status

    module.run = run
    monkeypatch.setitem(sys.modules, "kracauer.daemon", module)
    return module


def test_config_option_runs_the_daemon_with_the_loaded_config(config_file, fake_daemon):
    fake_daemon.status = 3
    assert main(["--config", str(config_file), "--log-level", "debug"]) == 3
    [config] = fake_daemon.calls
    assert config.source == str(config_file)
    assert str(config.prefix) == "2001:db8:64::/96"


def test_daemon_is_not_started_with_a_bad_config(bad_config_file, fake_daemon, capsys):
    assert main(["--config", str(bad_config_file)]) == 2
    assert fake_daemon.calls == []
    assert capsys.readouterr().err.startswith(f"kracauer: {bad_config_file}:7: listen[0].protocol: ")


def test_no_config_and_no_command_is_a_usage_error(fake_daemon, capsys):
    assert main([]) == 2
    assert fake_daemon.calls == []
    assert "--config FILE is required" in capsys.readouterr().err


def test_bad_log_level_is_a_usage_error(config_file, fake_daemon, capsys):
    assert main(["--config", str(config_file), "--log-level", "trace"]) == 2
    assert fake_daemon.calls == []
    assert "invalid choice" in capsys.readouterr().err


# -- --version -------------------------------------------------------------------------

def test_version_option_prints_the_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"kracauer {kracauer.__version__}\n"


def test_python_dash_m_kracauer_version():
    result = subprocess.run([sys.executable, "-m", "kracauer", "--version"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"kracauer {kracauer.__version__}\n"


def test_python_dash_m_kracauer_check_config_exit_status(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[tun\n")
    result = subprocess.run([sys.executable, "-m", "kracauer", "check-config", str(bad)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"kracauer: {bad}:1:")


def test_check_config_lists_routes_by_dns_with_their_networks_and_servers(tmp_path, capsys):
    path = tmp_path / "k.toml"
    path.write_text(MINIMAL + '\n[[route]]\nname = "*.service.example.com"\nresolve = true\n'
                    'networks = ["2001:db8:100::/48"]\n\n[resolver]\nservers = ["2001:db8::53", "192.0.2.53:5353"]\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: OK (1 listener, 1 route, fallback: yes)"
    assert out[1] == ("  1 route by DNS (AAAA records, looked up when the hello arrives) via "
                      "[2001:db8::53]:53, 192.0.2.53:5353:")
    assert out[2] == "    *.service.example.com: hosts inside 2001:db8:100::/48"


# -- agents ---------------------------------------------------------------------------

def test_agent_token_prints_a_token_and_the_sha256_the_box_needs(capsys):
    import hashlib

    assert main(["agent-token"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].removeprefix("token:").strip()
    digest = out[1].removeprefix("sha256:").strip()
    assert len(token) >= 43 and hashlib.sha256(token.encode()).hexdigest() == digest


def test_check_config_lists_the_agents_listener_and_what_each_token_may_register(tmp_path, capsys):
    path = tmp_path / "k.toml"
    path.write_text(MINIMAL + f"""
[agents]
listen = "203.0.113.5:4444"
cert = "{tmp_path}/box.pem"
key = "{tmp_path}/box.key"
[[agents.token]]
sha256 = "{'ab' * 32}"
names = ["app.example.com", "*.dev.example.com"]
""")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "agents dial in on 203.0.113.5:4444 (TLS 1.3), addresses from fd00:6b72::/64 on kagents0" in out
    assert "1 token:" in out and "abababababab…: may register app.example.com, *.dev.example.com" in out


def test_the_agent_without_a_config_or_with_a_missing_token_file_exits_2(tmp_path, capsys, caplog):
    assert main(["agent"]) == 2
    assert "needs --config FILE" in capsys.readouterr().err
    path = tmp_path / "agent.toml"
    path.write_text(f"""[agent]
box = "edge.example.com:4444"
server_name = "edge.example.com"
ca = "{tmp_path}/ca.pem"
token_file = "{tmp_path}/absent.token"
names = ["app.example.com"]
""")
    assert main(["agent", "--config", str(path)]) == 2
    assert f"token_file: cannot read {tmp_path}/absent.token" in caplog.text  # logged, as the agent logs
