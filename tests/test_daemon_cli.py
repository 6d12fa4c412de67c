"""The command line's daemon options for operations: --no-keep-tun (issue #5)."""

from __future__ import annotations

import sys
import types

import pytest

from kracauer.cli import main
from tests.test_daemon_status import MINIMAL


@pytest.fixture
def fake_daemon(monkeypatch):
    module = types.ModuleType("kracauer.daemon")
    module.calls = []

    def run(config, **kwargs):
        module.calls.append((config, kwargs))
        return 0

    module.run = run
    monkeypatch.setitem(sys.modules, "kracauer.daemon", module)
    return module


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(MINIMAL + f'\n[state]\nfile = "{tmp_path}/state.json"\n')
    return path


def test_by_default_the_daemon_keeps_the_tun_for_the_next_start(config_file, fake_daemon):
    assert main(["--config", str(config_file)]) == 0
    [(config, kwargs)] = fake_daemon.calls
    assert config.state is not None and kwargs == {}


def test_no_keep_tun_stops_for_good(config_file, fake_daemon):
    assert main(["--config", str(config_file), "--no-keep-tun"]) == 0
    [(_, kwargs)] = fake_daemon.calls
    assert kwargs == {"keep_tun": False}


def test_log_level_error_is_accepted(config_file, fake_daemon):
    assert main(["--config", str(config_file), "--log-level", "error"]) == 0
