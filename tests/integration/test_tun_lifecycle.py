"""The TUN's life in the namespace lab: gone by the time kracauer has exited, and leftovers named clearly (issue #13).

A small lab without hosts: kracauer only needs its TUN and routes here.
"""

from __future__ import annotations

import signal
import sys

import pytest

from tests import netlab
from tests.netlab import SERVICE_ADDRESS, Lab, example_config, wait_until

MISSING = netlab.missing_requirements()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="netns lab needs " + ", ".join(MISSING)),
]

TUN = "kracauer0"


@pytest.fixture(scope="module")
def lab():
    with Lab(hosts=False) as lab:
        yield lab


@pytest.fixture
def box(lab):
    """After the test: no kracauer running and no kracauer0 in the box, whatever the test left."""
    yield lab
    for k in list(lab._kracauers):
        k.stop(timeout=10)
    if lab.link_exists("box", TUN):
        lab.run("box", ["ip", "link", "del", TUN], timeout=10)
    assert not lab.link_exists("box", TUN)


def leftovers(lab) -> list[str]:
    """What of kracauer's set-up is still in the box: the device, a /32 or the /96 route."""
    found = []
    if lab.link_exists("box", TUN):
        found.append(f"TUN {TUN}")
    v4 = lab.run("box", ["ip", "-4", "route", "show", "table", "all"], check=True).stdout
    v6 = lab.run("box", ["ip", "-6", "route", "show", "table", "all"], check=True).stdout
    found += [f"IPv4 route: {line}" for line in v4.splitlines() if SERVICE_ADDRESS in line]
    found += [f"IPv6 route: {line}" for line in v6.splitlines() if "64:ff9b:1::" in line]
    return found


def test_ten_stops_each_leave_nothing_behind_the_moment_the_process_has_exited(lab, box):
    for cycle in range(10):
        k = lab.start_kracauer(example_config())
        # Alternate the signals, and stop some right after start-up, some a little later.
        rc, stderr = k.stop(signal.SIGINT if cycle % 2 else signal.SIGTERM)
        assert rc == 0, f"cycle {cycle}: exit {rc}\n{stderr}"
        left = leftovers(lab)
        assert not left, f"cycle {cycle}: still there right after exit: {left}\n{stderr}"
        assert "TUN kracauer0 and its routes removed" in stderr


def with_workers(text: str, workers: int) -> str:
    return text.replace("[tun]\n", f"[tun]\nworkers = {workers}\n", 1)


def test_a_leftover_persistent_tun_is_named_taken_over_and_removed_at_exit(lab, box):
    # What a kracauer with [state] that crashed (or stopped) leaves: a persistent TUN nobody has open.
    lab.run("box", ["ip", "tuntap", "add", "dev", TUN, "mode", "tun"], check=True)
    k = lab.start_kracauer(with_workers(example_config(), 1))
    wait_until(lambda: "running on" in k.stderr(), 10, "kracauer to run", k.stderr)
    log = k.stderr()
    assert "attached to the existing TUN kracauer0: a TUN, persistent device with no process attached, " \
           "left by an earlier kracauer" in log, log
    assert "`kracauer cleanup`" in log
    rc, stderr = k.stop()
    assert rc == 0, stderr
    assert not leftovers(lab)
    # Several workers need a multi-queue TUN: without [state] nothing is lost by making it anew.
    lab.run("box", ["ip", "tuntap", "add", "dev", TUN, "mode", "tun"], check=True)
    k = lab.start_kracauer(with_workers(example_config(), 2))
    wait_until(lambda: "running on" in k.stderr(), 20, "kracauer to run", k.stderr)
    assert "removed the single-queue TUN kracauer0 left by an earlier kracauer: 2 workers need a multi-queue " \
           "one" in k.stderr(), k.stderr()
    rc, stderr = k.stop()
    assert rc == 0, stderr
    assert not leftovers(lab)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_leftover_multi_queue_tun_is_taken_over_by_any_number_of_workers(lab, box, workers):
    # What a kracauer with several workers and [state] leaves.
    lab.run("box", ["ip", "tuntap", "add", "dev", TUN, "mode", "tun", "multi_queue"], check=True)
    k = lab.start_kracauer(with_workers(example_config(), workers))
    wait_until(lambda: "running on" in k.stderr(), 20, "kracauer to run", k.stderr)
    assert "attached to the existing TUN kracauer0: a TUN, persistent, multi-queue device with no process " \
           "attached" in k.stderr(), k.stderr()
    rc, stderr = k.stop()
    assert rc == 0 and not leftovers(lab), stderr


def test_a_leftover_tun_that_cannot_be_reused_is_refused_with_the_way_out(lab, box):
    # A persistent single-queue TUN left by a kracauer with one worker and [state] (its connections
    # may be in it) cannot become multi-queue: two workers are refused, with the two ways out.
    lab.run("box", ["ip", "tuntap", "add", "dev", TUN, "mode", "tun"], check=True)
    state = lab.dir / "state-lifecycle"
    state.mkdir(exist_ok=True)
    text = with_workers(example_config(), 2) + f'\n[state]\nfile = "{state}/state.json"\n'
    k = lab.spawn_kracauer(text)
    assert k.wait(15) == 2, k.stderr()
    stderr = k.stderr()
    assert "the TUN 'kracauer0' left by an earlier kracauer is single-queue ([tun] workers = 1) and cannot " \
           "take 2 workers while it exists" in stderr, stderr
    assert "start with workers = 1 to keep its connections, or `kracauer cleanup --config FILE`" in stderr
    assert lab.link_exists("box", TUN)  # kept: it may carry connections
    r = lab.run("box", [*lab.kracauer_cmd, "cleanup", "--config", str(k.config_path)], timeout=20)
    assert r.returncode == 0 and "removed the TUN kracauer0" in r.stdout, r.stdout + r.stderr
    assert not lab.link_exists("box", TUN)
    k = lab.start_kracauer(text, timeout=20)
    rc, stderr = k.stop()
    assert rc == 0, stderr
    r = lab.run("box", [*lab.kracauer_cmd, "cleanup", "--config", str(k.config_path)], timeout=20)
    assert not leftovers(lab), stderr


HOLDER = """
import fcntl, os, struct, sys, time
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", b"kracauer0", 0x1001))  # TUNSETIFF, IFF_TUN | IFF_NO_PI
print("holding", flush=True)
time.sleep(60)
"""


def test_a_tun_another_process_holds_is_refused_naming_that_process(lab, box):
    holder = lab.popen("box", [sys.executable, "-c", HOLDER], stdout=netlab.subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        k = lab.spawn_kracauer(example_config())
        assert k.wait(15) == 2, k.stderr()
        stderr = k.stderr()
        assert f"the TUN 'kracauer0' is in use by pid {holder.pid} (" in stderr, stderr
        assert "is another kracauer running with this device name?" in stderr
        r = lab.run("box", [*lab.kracauer_cmd, "cleanup", "--config", str(k.config_path)], timeout=20)
        assert r.returncode == 2 and f"in use by pid {holder.pid}" in r.stderr, r.stdout + r.stderr
        assert lab.link_exists("box", TUN)  # neither of them touched it
    finally:
        holder.kill()
        holder.wait()
    wait_until(lambda: not lab.link_exists("box", TUN), 5, "the holder's TUN to go")


@pytest.mark.parametrize("make, what", [
    (["ip", "tuntap", "add", "dev", TUN, "mode", "tap"], "a TAP, persistent device"),
    (["ip", "link", "add", TUN, "type", "veth", "peer", "name", "kpeer0"], "a veth device"),
], ids=["tap", "veth"])
def test_a_device_of_the_name_that_is_no_tun_is_refused_and_left_alone(lab, box, make, what):
    lab.run("box", make, check=True)
    k = lab.spawn_kracauer(example_config())
    assert k.wait(15) == 2, k.stderr()
    assert f"a network device named 'kracauer0' exists and is {what}, not a TUN" in k.stderr(), k.stderr()
    r = lab.run("box", [*lab.kracauer_cmd, "cleanup", "--config", str(k.config_path)], timeout=20)
    assert r.returncode == 2 and "not removing it" in r.stderr, r.stdout + r.stderr
    assert lab.link_exists("box", TUN)
