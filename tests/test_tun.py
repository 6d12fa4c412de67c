"""kracauer.tun without a kernel: what a device of our name is, and who holds a TUN (issue #13)."""

from __future__ import annotations

import os

from kracauer.tun import DeviceInfo, tun_holders


def fake_proc(tmp_path, processes: dict[str, tuple[str, list[str]]]):
    """A /proc with `self` and the given pids: pid -> (netns file name, fdinfo texts)."""
    proc = tmp_path / "proc"
    namespaces = tmp_path / "ns"
    namespaces.mkdir()
    for name in ("ours", "theirs"):
        (namespaces / name).write_text(name)
    for pid, (netns, fdinfos) in {"self": ("ours", []), **processes}.items():
        (proc / pid / "ns").mkdir(parents=True)
        os.link(namespaces / netns, proc / pid / "ns" / "net")  # same inode = same namespace
        (proc / pid / "fdinfo").mkdir()
        for fd, text in enumerate(fdinfos):
            (proc / pid / "fdinfo" / str(fd)).write_text(text)
        (proc / pid / "cmdline").write_bytes(b"python3\0-m\0kracauer\0")
    return proc


TUN_FDINFO = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1060\niff:\tkracauer0\n"


def test_holders_are_the_processes_of_our_namespace_with_the_tun_open(tmp_path):
    proc = fake_proc(tmp_path, {
        "100": ("ours", ["pos:\t0\n", TUN_FDINFO]),
        "200": ("theirs", [TUN_FDINFO]),  # another namespace's kracauer0: not ours
        "300": ("ours", [TUN_FDINFO.replace("kracauer0", "kracauer01")]),  # another name
        "400": ("ours", []),
    })
    assert tun_holders("kracauer0", str(proc)) == [(100, "python3 -m kracauer")]
    assert tun_holders("kracauer01", str(proc)) == [(300, "python3 -m kracauer")]
    assert tun_holders("other0", str(proc)) == []


def test_holders_of_an_unreadable_proc_are_none(tmp_path):
    assert tun_holders("kracauer0", str(tmp_path / "nowhere")) == []


def test_a_device_says_what_it_is():
    assert DeviceInfo("k", 5, "tun", persistent=True).describe() == "a TUN, persistent device"
    assert DeviceInfo("k", 5, "tun", persistent=True, multi_queue=True).describe() == \
        "a TUN, persistent, multi-queue device"
    assert DeviceInfo("k", 5, "tun", tap=True, persistent=True).describe() == "a TAP, persistent device"
    assert DeviceInfo("k", 5, "veth").describe() == "a veth device"
    assert DeviceInfo("k", 5, "").describe() == "a non-TUN device"
    assert DeviceInfo("k", 5, "tun").is_tun and not DeviceInfo("k", 5, "tun", tap=True).is_tun
    assert not DeviceInfo("k", 5, "veth").is_tun
