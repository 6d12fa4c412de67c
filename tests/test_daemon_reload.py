"""SIGHUP: the daemon re-reads its configuration; new connections follow it, bound ones keep their host (issue #5)."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from kracauer.config import load_config, parse_config
from kracauer.daemon import Daemon, restart_needed
from netstack.peek import Decision
from tests.test_tracker import CHROME, HOST_WWW, Box, Walk

OTHER = "2001:db8::99"

CONFIG = """\
[tun]
offload = false

[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"

[[listen]]
address = "192.0.2.10"
port = 22
protocol = "tcp"
host = "2001:db8::22"

[[route]]
name = "www.example.com"
host = "{www}"

[metrics]
listen = "127.0.0.1:9477"
"""


class FakeNotifier:
    enabled = True
    watchdog_interval = None

    def __init__(self):
        self.sent = []

    def notify(self, *lines):
        self.sent.append(lines)
        return True

    def ready(self, status=None):
        return self.notify("READY=1", *((f"STATUS={status}",) if status else ()))

    def reloading(self):
        return self.notify("RELOADING=1")

    def status(self, text):
        return self.notify(f"STATUS={text}")

    def stopping(self, status=None):
        return self.notify("STOPPING=1")

    def close(self):
        pass


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "kracauer.toml"
    path.write_text(CONFIG.format(www=HOST_WWW))
    return path


@pytest.fixture
def daemon(config_file):
    return Daemon(load_config(config_file), notifier=FakeNotifier())


def tls_listener(daemon):
    return next(lst for lst in daemon.tracker.listeners.values() if lst.port == 443)


def host_for(daemon, name):
    target = daemon.tracker.resolve(tls_listener(daemon), Decision(name))
    return None if target is None else str(ipaddress.IPv6Address(target.host))


def box_for(daemon):
    box = Box()
    box.tracker = daemon.tracker
    return box


def test_a_changed_route_applies_to_new_connections_and_bound_ones_keep_their_host(daemon, config_file):
    box = box_for(daemon)
    old = Walk(box)
    old.establish()
    assert old.host == HOST_WWW
    config_file.write_text(CONFIG.format(www=OTHER) + '\n[[route]]\nname = "new.example.com"\nhost = "2001:db8::77"\n')
    assert daemon.reload() is True
    assert daemon.config.routes[0].host == ipaddress.IPv6Address(OTHER)
    assert host_for(daemon, "new.example.com") == "2001:db8::77"
    # The established connection still goes to its host...
    up = old.from_client("PA", old.c + 1 + len(CHROME), old.k + 1, b"more")
    assert len(up) == 1 and up[0].ip.dst == HOST_WWW
    # ...and a new one for the same name goes where the new configuration says.
    new = Walk(box, sport=40001)
    new.handshake()
    syn = new.expect_host_syn(new.send_hello(CHROME))
    assert syn.ip.dst == OTHER
    assert daemon.metrics.registry.get_sample_value("kracauer_config_reloads_total", {"result": "ok"}) == 1
    assert daemon.notifier.sent[0] == ("RELOADING=1",)
    assert daemon.notifier.sent[-1][0] == "READY=1"


def test_an_invalid_configuration_is_logged_and_the_running_one_stays(daemon, config_file, caplog):
    config_file.write_text(CONFIG.format(www=OTHER).replace('protocol = "tls"', 'protocol = "udp"'))
    with caplog.at_level(logging.ERROR, logger="kracauer"):
        assert daemon.reload() is False
    assert "reload refused" in caplog.text and 'listen[0].protocol: expected one of' in caplog.text
    assert host_for(daemon, "www.example.com") == HOST_WWW
    assert daemon.metrics.registry.get_sample_value("kracauer_config_reloads_total", {"result": "failed"}) == 1
    assert daemon.metrics.registry.get_sample_value("kracauer_config_last_reload_successful") == 0
    assert daemon.notifier.sent[-1][0] == "READY=1"  # systemd must not wait for a reload that failed


def test_a_change_that_needs_a_restart_is_refused_whole(daemon, config_file, caplog):
    config_file.write_text(CONFIG.format(www=OTHER).replace("offload = false", "offload = false\nmtu = 1400"))
    with caplog.at_level(logging.ERROR, logger="kracauer"):
        assert daemon.reload() is False
    assert "[tun] changed" in caplog.text and "needs a restart" in caplog.text
    assert host_for(daemon, "www.example.com") == HOST_WWW  # not even the route changed


def test_a_missing_file_is_refused(daemon, config_file):
    config_file.unlink()
    assert daemon.reload() is False
    assert host_for(daemon, "www.example.com") == HOST_WWW


def test_limits_apply_on_reload(daemon, config_file):
    config_file.write_text(CONFIG.format(www=HOST_WWW) + "\n[limits]\nhello_timeout = 3\nmax_connections = 7\n")
    assert daemon.reload()
    assert (daemon.tracker.config.hello_timeout, daemon.tracker.config.max_connections) == (3.0, 7)


def test_a_changed_log_level_applies_and_an_unchanged_one_leaves_the_command_line_s(daemon, config_file):
    root = logging.getLogger()
    saved = root.level
    try:
        root.setLevel(logging.DEBUG)  # as if --log-level debug
        assert daemon.reload()
        assert root.level == logging.DEBUG
        config_file.write_text(CONFIG.format(www=HOST_WWW) + '\n[log]\nlevel = "warning"\n')
        assert daemon.reload()
        assert root.level == logging.WARNING
    finally:
        root.setLevel(saved)


def test_a_new_access_log_path_is_opened_on_reload(daemon, config_file, tmp_path):
    path = tmp_path / "access.log"
    config_file.write_text(CONFIG.format(www=HOST_WWW) + f'\n[log]\naccess = "{path}"\n')
    assert daemon.reload()
    assert daemon.access_log is not None and daemon.access_log.target == str(path)
    config_file.write_text(CONFIG.format(www=HOST_WWW) + f'\n[log]\naccess = "{tmp_path}/no/such/dir.log"\n')
    assert daemon.reload() is False
    assert daemon.access_log.target == str(path)
    daemon.access_log.close()


BASE = CONFIG.format(www=HOST_WWW)


@pytest.mark.parametrize("change, problem", [
    (lambda t: t.replace('offload = false', 'offload = true'), "[tun]"),
    (lambda t: t.replace('offload = false', 'offload = false\nname = "k1"'), "[tun]"),
    (lambda t: t.replace('offload = false', 'offload = false\nuser = "nobody"'), "[tun]"),
    (lambda t: t.replace("64:ff9b:1::/96", "64:ff9b:2::/96"), "[translate] prefix"),
    (lambda t: t.replace("port = 443", "port = 8443"), "[[listen]]"),
    (lambda t: t.replace('protocol = "tls"', 'protocol = "http"'), "[[listen]]"),
    (lambda t: t.replace('protocol = "tls"', 'protocol = "tls"\nprefix = "64:ff9b:3::/96"'), "[[listen]]"),
    (lambda t: t.replace("127.0.0.1:9477", "127.0.0.1:9478"), "[metrics]"),
    (lambda t: t + '\n[state]\nfile = "/var/lib/kracauer/state.json"\n', "[state]"),
])
def test_what_needs_a_restart(change, problem):
    [found] = restart_needed(parse_config(BASE), parse_config(change(BASE)))
    assert found.startswith(problem)


@pytest.mark.parametrize("change", [
    lambda t: t.replace(f'host = "{HOST_WWW}"', f'host = ["{HOST_WWW}", "{OTHER}"]'),
    lambda t: t.replace('host = "2001:db8::22"', 'host = "2001:db8::23"'),  # a tcp listener's host
    lambda t: t + "\n[limits]\nidle_timeout = 60\n\n[health]\nmax_fails = 1\n",
    lambda t: t + '\n[log]\nlevel = "debug"\naccess = "-"\n',
    lambda t: t + '\n[fallback]\nhost = "2001:db8::5"\n',
])
def test_what_a_reload_applies(change):
    assert restart_needed(parse_config(BASE), parse_config(change(BASE))) == []


def test_a_state_path_in_a_missing_directory_is_refused_on_reload(tmp_path):
    path = tmp_path / "kracauer.toml"
    path.write_text(BASE + f'\n[state]\nfile = "{tmp_path}/state.json"\n')
    daemon = Daemon(load_config(path), notifier=FakeNotifier())
    path.write_text(BASE + f'\n[state]\nfile = "{tmp_path}/missing/state.json"\n')
    assert daemon.reload() is False
    path.write_text(BASE + f'\n[state]\nfile = "{tmp_path}/other.json"\n')
    assert daemon.reload() is True
    assert daemon.config.state.file == f"{tmp_path}/other.json"


def test_a_changed_state_path_applies():
    with_state = BASE + '\n[state]\nfile = "/var/lib/kracauer/state.json"\n'
    assert restart_needed(parse_config(with_state), parse_config(with_state.replace("state.json", "s2.json"))) == []


class FakeKernel:
    """What the daemon tells the kernel path about SYN cookies (kracauer.kernel_path.KernelPath)."""

    def __init__(self):
        self.calls = []

    def set_syn_cookies(self, secret, *, mss, window, wscale, listeners, clock_ns=0):
        self.calls.append(dict(secret=secret, mss=mss, window=window, wscale=wscale, listeners=listeners))


def test_the_kernels_syn_cookies_get_the_trackers_secret_and_the_new_budget_on_reload(daemon, config_file):
    from kracauer.daemon import set_syn_cookies

    kernel = FakeKernel()
    set_syn_cookies(kernel, daemon.config, daemon.cookie_secret)
    daemon.kernel = kernel
    config_file.write_text(CONFIG.format(www=HOST_WWW) + "\n[kernel_path]\npython_syn_rate = 0\n")
    try:
        assert daemon.reload()
    finally:
        daemon.kernel = None
    first, second = kernel.calls
    address = ipaddress.IPv4Address("192.0.2.10").packed
    assert first["listeners"] == {(address, 443): 1000, (address, 22): 1000}
    assert second["listeners"] == {(address, 443): 0, (address, 22): 0}
    # The same secret as the tracker's: cookies the kernel makes, the tracker accepts.
    assert first["secret"] == second["secret"] == daemon.tracker.cookies.secret and len(first["secret"]) == 16
    assert (first["mss"], first["window"], first["wscale"]) == (1440, 65535, 7)
