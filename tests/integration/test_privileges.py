"""Least privilege: with `[tun] user`, kracauer keeps nothing of root once set up (issue #4)."""

from __future__ import annotations

import pwd

import pytest

from tests import netlab
from tests.netlab import Lab, example_config, wait_until

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def packet_processes(pid: int) -> list[int]:
    """The processes that read the TUN: the daemon, or with several workers its worker children."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except FileNotFoundError:
        children = []
    return children or [pid]


def test_daemon_runs_as_the_configured_user_with_no_capabilities_and_still_cleans_up():
    nobody = pwd.getpwnam("nobody")
    with Lab() as lab:
        config = example_config().replace('mtu = 1500', 'mtu = 1500\nuser = "nobody"')
        k = lab.start_kracauer(config)
        wait_until(lambda: any("dropped privileges" in line for line in k.log_lines()), 5, "privileges dropped",
                   lambda: k.stderr())
        # Every process that handles packets (with several workers: each worker; the supervisor,
        # which parses no packet, stays root as nginx's master does).
        processes = packet_processes(k.pid)
        if "workers, one per TUN queue" in k.stderr():
            wait_until(lambda: k.stderr().count("dropped privileges") >= len(processes) >= 2, 10,
                       "every worker to drop privileges", k.stderr)
        for pid in processes:
            status = proc_status(pid)
            assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
            assert status["Gid"].split() == [str(nobody.pw_gid)] * 4
            assert status["Groups"].strip() == ""
            for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(status[field], 16) == 0, f"{field} = {status[field]}"
            assert status["NoNewPrivs"].strip() == "1"

        # It still does its job unprivileged.
        proc = lab.curl("https://www.example.com/")
        assert proc.returncode == 0 and proc.stdout == "host1\n", proc.stderr
        if netlab.lab_kernel_path() == "on":
            # The flow map's descriptor works without a capability: connections still go into the kernel.
            assert "kernel path on" in k.stderr()
            assert "the kernel refused a flow" not in k.stderr(), k.stderr()
            proc = lab.curl("https://www.example.com/big.bin", "-o", "/dev/null", "-w", "%{size_download}")
            assert proc.returncode == 0, proc.stderr

        code, stderr = k.stop()
        assert code == 0, stderr
        # The kernel removed the non-persistent TUN, and its routes with it.
        assert not lab.link_exists("box", "kracauer0")
        assert lab.routes("box", family=4) and not any(r.get("dev") == "kracauer0" for r in lab.routes("box", family=4))
        assert not any(r.get("dev") == "kracauer0" for r in lab.routes("box", family=6))


def test_unknown_user_is_a_clear_error_and_leaves_nothing_behind():
    with Lab(hosts=False) as lab:
        config = example_config().replace('mtu = 1500', 'mtu = 1500\nuser = "no-such-user-kracauer"')
        k = lab.spawn_kracauer(config)
        code = k.wait(10)
        assert code == 2
        assert "no such user" in k.stderr()
        assert not lab.link_exists("box", "kracauer0")
