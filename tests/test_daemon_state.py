"""The state file: written atomically at stop, restored at start only when the TUN was left (issue #5)."""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import shutil
import stat
import tempfile
import time
import types

import pytest

from kracauer.config import load_config
from kracauer.daemon import Daemon, DaemonError, check_state_directory, read_state, write_state
from netstack.state import StateError
from netstack.tracker import ESTABLISHED
from tests.test_daemon_reload import CONFIG, FakeNotifier
from tests.test_tracker import HOST_WWW, Box, Walk


def test_write_state_replaces_the_file_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    write_state(str(path), {"version": 1, "connections": []})
    assert json.loads(path.read_text()) == {"version": 1, "connections": []}
    assert os.listdir(tmp_path) == ["state.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # client addresses are in it


def test_write_state_into_a_missing_directory_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        write_state(str(tmp_path / "missing" / "state.json"), {})
    assert os.listdir(tmp_path) == []


def test_read_state(tmp_path):
    assert read_state(str(tmp_path / "none.json")) is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StateError):
        read_state(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(StateError):
        read_state(str(tmp_path / "list.json"))


def test_state_directory_must_exist(tmp_path):
    with pytest.raises(DaemonError, match="does not exist"):
        check_state_directory(str(tmp_path / "missing" / "state.json"), None)
    check_state_directory(str(tmp_path / "state.json"), None)


def _nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0 or _nobody() is None, reason="needs root and the user nobody")
def test_state_directory_must_be_writable_by_the_unprivileged_user():
    # Not under tmp_path: pytest's own directories are closed to other users.
    base = pathlib.Path(tempfile.mkdtemp(prefix="kracauer-test-"))
    try:
        _check_as_nobody(base)
    finally:
        shutil.rmtree(base)


def _check_as_nobody(base):
    base.chmod(0o755)
    directory = base / "state"
    directory.mkdir(mode=0o755)
    with pytest.raises(DaemonError, match=r"user nobody .* cannot create files in .*chown nobody"):
        check_state_directory(str(directory / "state.json"), "nobody")
    assert os.geteuid() == 0 and os.getegid() == 0  # switched back
    os.chown(directory, _nobody().pw_uid, -1)
    check_state_directory(str(directory / "state.json"), "nobody")
    assert os.listdir(directory) == []


def daemon_with_state(tmp_path, attached=True):
    path = tmp_path / "kracauer.toml"
    path.write_text(CONFIG.format(www=HOST_WWW) + f'\n[state]\nfile = "{tmp_path}/state.json"\n')
    daemon = Daemon(load_config(path), notifier=FakeNotifier())
    daemon.tun = types.SimpleNamespace(attached=attached, name="kracauer0")
    return daemon


def test_saved_connections_are_restored_by_the_next_daemon_and_the_file_is_removed(tmp_path):
    old = daemon_with_state(tmp_path)
    box = Box()
    box.tracker = old.tracker
    Walk(box).establish()
    assert old._save_state(str(tmp_path / "state.json")) == 1
    saved = read_state(str(tmp_path / "state.json"))
    assert saved["kracauer"] and saved["saved_at"] > 0

    new = daemon_with_state(tmp_path)
    new._restore(saved)
    assert new.restored == 1
    [conn] = new.tracker.clients.values()
    assert conn.state == ESTABLISHED
    # Removed by run() once the start succeeded (the lab tests check that).
    assert new._restored_from == [str(tmp_path / "state.json")]
    assert new.metrics.registry.get_sample_value("kracauer_restored_connections") == 1


def test_state_is_not_restored_when_the_tun_was_not_left_in_place(tmp_path):
    old = daemon_with_state(tmp_path)
    box = Box()
    box.tracker = old.tracker
    Walk(box).establish()
    old._save_state(str(tmp_path / "state.json"))
    new = daemon_with_state(tmp_path, attached=False)
    new._restore(read_state(str(tmp_path / "state.json")))
    assert new.restored == 0 and not new.tracker.clients
    assert (tmp_path / "state.json.stale").exists() and not (tmp_path / "state.json").exists()


def test_a_damaged_state_file_is_set_aside(tmp_path):
    (tmp_path / "state.json").write_text("{")
    daemon = daemon_with_state(tmp_path)
    assert daemon._read_saved_state() is None
    assert (tmp_path / "state.json.bad").exists()
    (tmp_path / "state.json").write_text('{"version": 99}')
    daemon._restore(read_state(str(tmp_path / "state.json")))
    assert daemon.restored == 0
    assert (tmp_path / "state.json.bad").read_text() == '{"version": 99}'


def test_restored_connections_have_aged_by_the_time_between_save_and_start(tmp_path):
    old = daemon_with_state(tmp_path)
    box = Box()
    box.tracker = old.tracker
    box.now = time.monotonic()
    walk = Walk(box)
    walk.establish()
    old._save_state(str(tmp_path / "state.json"))
    saved = read_state(str(tmp_path / "state.json"))
    saved["saved_at"] -= 30  # as if the restart took 30 s
    new = daemon_with_state(tmp_path)
    new._restore(saved)
    [conn] = new.tracker.clients.values()
    age = time.monotonic() - conn.last_seen
    assert 29 < age < 60
