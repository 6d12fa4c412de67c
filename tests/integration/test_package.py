"""The Debian package (scripts/package): built, installed with dpkg on this machine, checked, purged (issue #13).

Root only, and only where dpkg is, and no kracauer package or user is there
already (the test would not know what to give back). The package is built
from a copy of the tree that also holds a stand-in BPF object, so that the
test can see package data reach the venv. dpkg runs in a network namespace
of its own (unshare -n): the prerm's `kracauer cleanup` must not touch this
machine's devices.
"""

from __future__ import annotations

import fcntl
import grp
import marshal
import os
import pathlib
import pwd
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
TOOLS = ("dpkg", "dpkg-deb", "unshare")
WANTS = pathlib.Path("/etc/systemd/system/multi-user.target.wants/kracauer.service")
UNIT = pathlib.Path("/lib/systemd/system/kracauer.service")
AGENT_UNIT = pathlib.Path("/lib/systemd/system/kracauer-agent.service")
CONFIG = pathlib.Path("/etc/kracauer/kracauer.toml")
SITE = pathlib.Path("/opt/kracauer/lib")


def _reason_to_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root (dpkg -i)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return "needs " + ", ".join(missing)
    if subprocess.run(["dpkg-query", "-W", "kracauer"], capture_output=True).returncode == 0:
        return "a kracauer package is already known to dpkg on this machine"
    if pathlib.Path("/opt/kracauer").exists() or pathlib.Path("/etc/kracauer").exists():
        return "/opt/kracauer or /etc/kracauer already exists on this machine"
    try:
        pwd.getpwnam("kracauer")
        return "a user kracauer already exists on this machine"
    except KeyError:
        return None


pytestmark = [pytest.mark.netns, pytest.mark.skipif(bool(_reason_to_skip()), reason=_reason_to_skip() or "")]


def run(*argv: str, netns: bool = False, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = (["unshare", "-n"] if netns else []) + list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def source(tmp_path):
    """A copy of the tree, with a stand-in for the BPF objects another part of kracauer builds."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT, copy, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info", "build"))
    (copy / "kracauer" / "bpf").mkdir(exist_ok=True)
    (copy / "kracauer" / "bpf" / "stand_in.bpf.o").write_bytes(b"\x7fELF stand-in BPF object for the test\n")
    return copy


@pytest.fixture
def serialized():
    """One package test at a time on this machine (other worktrees run the suite too)."""
    with open("/run/lock/kracauer-package-test.lock" if os.path.isdir("/run/lock") else "/tmp/kracauer-package.lock",
              "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def test_the_package_installs_checks_and_purges_leaving_nothing(source, tmp_path, serialized):
    out = tmp_path / "dist"
    build = run(str(source / "scripts" / "package"), "--out", str(out), timeout=600)
    [deb] = out.glob("kracauer_*.deb")
    assert "BuildBackendWarning" not in build.stderr and "Traceback" not in build.stderr, build.stderr
    contents = run("dpkg-deb", "-c", str(deb)).stdout
    # "mode owner size date time ./path" or "... ./path -> target" for a symlink
    files = [line.split(None, 5)[5].split(" -> ")[0].removeprefix(".") for line in contents.splitlines()]
    tree_objects = sorted(p.name for p in (source / "kracauer" / "bpf").glob("*.bpf.o"))
    assert tree_objects and all(any(f.endswith(f"/site-packages/kracauer/bpf/{name}") for f in files)
                                for name in tree_objects), tree_objects
    try:
        installed = run("dpkg", "-i", str(deb), netns=True)
        assert "enabled, not started" in installed.stdout

        # The command, the example configuration (a conffile), the docs, the user.
        assert os.path.realpath("/usr/bin/kracauer") == "/opt/kracauer/bin/kracauer"
        check = run("/usr/bin/kracauer", "check-config", str(CONFIG), check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert str(CONFIG) in run("dpkg-query", "-W", "-f", "${Conffiles}", "kracauer").stdout
        assert pathlib.Path("/usr/share/doc/kracauer/docs/troubleshooting.md").exists()
        assert pathlib.Path("/usr/share/doc/kracauer/copyright").exists()
        user = pwd.getpwnam("kracauer")
        assert user.pw_uid < 1000 and user.pw_shell.endswith("nologin")
        # Bytecode shipped compiled for the installed paths (tracebacks name /opt/kracauer, nothing to write).
        [pyc] = SITE.rglob("kracauer/__pycache__/cli.cpython-*.pyc")
        code = marshal.loads(pyc.read_bytes()[16:])
        assert code.co_filename.startswith("/opt/kracauer/lib/") and code.co_filename.endswith("/kracauer/cli.py")
        assert [p for p in SITE.rglob("kracauer/bpf/stand_in.bpf.o")], "the BPF object is not in the venv"
        # The venv names its installed path, not the staging directory it was built in.
        assert "/opt/kracauer/bin/python" in pathlib.Path("/opt/kracauer/bin/kracauer").read_text().splitlines()[0]
        assert "kracauer-package." not in pathlib.Path("/opt/kracauer/pyvenv.cfg").read_text()

        # The unit: enabled (the wants link), pointing at /usr/bin/kracauer, and nothing started.
        assert WANTS.is_symlink() and os.path.realpath(WANTS) in (str(UNIT), str(UNIT.resolve()))
        unit = UNIT.read_text()
        assert "ExecStart=/usr/bin/kracauer --config /etc/kracauer/kracauer.toml" in unit
        assert "/usr/local/bin" not in unit
        # The agent's unit (docs/agents.md): installed for hosts behind NAT, never enabled by the package.
        assert "ExecStart=/usr/bin/kracauer agent --config /etc/kracauer/agent.toml" in AGENT_UNIT.read_text()
        assert not AGENT_UNIT.with_name("multi-user.target.wants").joinpath(AGENT_UNIT.name).exists()
        assert not (WANTS.parent / AGENT_UNIT.name).exists()
        assert not _kracauer_daemons(), _kracauer_daemons()
        if shutil.which("systemd-analyze"):
            verify = run("systemd-analyze", "verify", str(UNIT), str(AGENT_UNIT), check=False, timeout=60)
            assert verify.returncode == 0, verify.stdout + verify.stderr
        else:
            print("systemd-analyze is not installed: the unit was not verified")  # shown with -rP
    finally:
        purged = run("dpkg", "--purge", "kracauer", netns=True, check=False)
    assert purged.returncode == 0, purged.stdout + purged.stderr

    # Nothing left: the package's files, the venv, the configuration, the unit's links, the user.
    shared = {"/", "/etc", "/lib", "/lib/systemd", "/lib/systemd/system", "/opt", "/usr", "/usr/bin", "/usr/share",
              "/usr/share/doc"}
    left = [f for f in files if f.rstrip("/") and f.rstrip("/") not in shared and os.path.lexists(f.rstrip("/"))]
    assert not left, left[:20]
    for path in ("/opt/kracauer", "/etc/kracauer", "/usr/bin/kracauer", str(WANTS), "/etc/systemd/system/kracauer.service",
                 "/var/lib/systemd/deb-systemd-helper-enabled/kracauer.service.dsh-also",
                 "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/kracauer.service",
                 "/var/lib/systemd/deb-systemd-helper-masked/kracauer.service"):
        assert not os.path.lexists(path), path
    with pytest.raises(KeyError):
        pwd.getpwnam("kracauer")
    with pytest.raises(KeyError):
        grp.getgrnam("kracauer")
    assert run("dpkg-query", "-W", "kracauer", check=False).returncode != 0


def _kracauer_daemons() -> list[str]:
    """Processes running the installed kracauer as a daemon."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "/opt/kracauer" in cmdline or "/usr/bin/kracauer --config" in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found
