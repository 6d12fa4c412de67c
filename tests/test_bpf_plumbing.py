"""kracauer.bpf: libbpf bindings, bpffs, tc attachment and the build, on the
real kernel with a small test program (tests/bpf/probe.bpf.c).

The probe reads a u32 key after the Ethernet header, counts every run in
per-CPU slot 0 (and misses in slot 1), and returns the verdict stored for the
key in the ``verdicts`` hash, writing it over the 4 bytes after the key.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import socket
import struct
import subprocess
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from kracauer.bpf import bpffs, libbpf, tc
from tests.bpf_build import build
from kracauer.bpf.libbpf import BpfError, BpfObject, BpfUnavailable, Map, MapInfo

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
PROBE_DIR = HERE / "bpf"


def _why_no_bpf() -> str | None:
    if os.geteuid() != 0:
        return "BPF needs root"
    if shutil.which("clang") is None:
        return "clang is not installed (the test program must be compiled)"
    try:
        libbpf.library()
    except BpfUnavailable as exc:
        return f"BPF unavailable: {exc}"
    return None


SKIP_REASON = _why_no_bpf()
needs_bpf = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def key(n: int) -> bytes:
    return struct.pack("=I", n)


def packet(k: int, filler: bytes = b"\xaa\xbb\xcc\xdd", payload: bytes = b"x" * 40) -> bytes:
    """An Ethernet frame whose first payload bytes are the probe's key."""
    eth = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    return eth + key(k) + filler + payload


@pytest.fixture(scope="module")
def objects_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    out = tmp_path_factory.mktemp("bpf-objects")
    objects = build.compile_all(PROBE_DIR, out)
    assert [p.name for p in objects] == ["probe.bpf.o"]
    return out


@pytest.fixture(scope="module")
def probe_path(objects_dir: Path) -> str:
    path = str(objects_dir / "probe.bpf.o")
    # The box may have libbpf but refuse BPF (no CAP_BPF in a container...).
    try:
        with BpfObject.open(path) as obj:
            obj.load()
    except BpfUnavailable as exc:
        pytest.skip(f"BPF unavailable: {exc}")
    return path


@pytest.fixture
def probe(probe_path: str):
    with BpfObject.open(probe_path) as obj:
        obj.load()
        yield obj


# -- layouts ---------------------------------------------------------------

LAYOUT_C = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <bpf/bpf.h>
#define F(x) printf(#x " %zu\n", offsetof(struct __sk_buff, x))
int main(void)
{
	printf("sk_buff %zu\n", sizeof(struct __sk_buff));
	printf("test_run_opts %zu\n", sizeof(struct bpf_test_run_opts));
	printf("retval %zu\n", offsetof(struct bpf_test_run_opts, retval));
	printf("batch_size %zu\n", offsetof(struct bpf_test_run_opts, batch_size));
	F(mark); F(priority); F(ingress_ifindex); F(ifindex); F(cb); F(tstamp);
	F(wire_len); F(gso_segs); F(gso_size); F(hwtstamp);
	return 0;
}
"""


@needs_bpf
def test_python_structs_match_the_c_headers(tmp_path: Path) -> None:
    src = tmp_path / "layout.c"
    src.write_text(LAYOUT_C)
    exe = tmp_path / "layout"
    subprocess.run(["clang", *build.include_flags("clang"), str(src), "-o", str(exe)], check=True)
    printed = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    c = {name: int(value) for name, value in (line.split() for line in printed.splitlines())}
    assert c["sk_buff"] == libbpf.SKB_CTX_SIZE
    assert c["test_run_opts"] == ctypes.sizeof(libbpf._TestRunOpts)
    assert c["retval"] == libbpf._TestRunOpts.retval.offset
    assert c["batch_size"] == libbpf._TestRunOpts.batch_size.offset
    for field, (offset, _fmt) in libbpf._SKB_FIELDS.items():
        assert c[field] == offset, field


# -- objects and maps --------------------------------------------------------


@needs_bpf
def test_open_lists_programs_and_maps_and_resizes_before_load(probe_path: str) -> None:
    with BpfObject.open(probe_path) as obj:
        assert obj.program_names() == ["probe"]
        assert {"verdicts", "counters"} <= set(obj.map_names())
        assert obj.map_info("verdicts") == MapInfo(
            type=libbpf.BPF_MAP_TYPE_HASH, key_size=4, value_size=4, max_entries=64, name="verdicts"
        )
        obj.set_max_entries("verdicts", 1000)
        obj.load()
        with pytest.raises(ValueError):
            obj.set_max_entries("verdicts", 10)
        info = libbpf.map_fd_info(obj.map_fd("verdicts"))
        assert (info.type, info.key_size, info.value_size, info.max_entries) == (libbpf.BPF_MAP_TYPE_HASH, 4, 4, 1000)
        assert info.name == "verdicts" and info.id > 0
        counters = obj.map_info("counters")
        assert counters.percpu and counters.value_size == 8
        prog = libbpf.prog_fd_info(obj.program_fd("probe"))
        assert prog.name == "probe" and prog.id > 0 and len(prog.tag) == 8
        with pytest.raises(KeyError):
            obj.map_fd("no_such_map")
        with pytest.raises(KeyError):
            obj.program_fd("no_such_program")


@needs_bpf
def test_map_update_lookup_delete_and_keys(probe: BpfObject) -> None:
    fd = probe.map_fd("verdicts")
    assert libbpf.map_lookup(fd, key(1), 4) is None
    libbpf.map_update(fd, key(1), key(11))
    libbpf.map_update(fd, key(2), key(22), libbpf.BPF_NOEXIST)
    with pytest.raises(BpfError) as exc:
        libbpf.map_update(fd, key(2), key(99), libbpf.BPF_NOEXIST)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(BpfError) as exc:
        libbpf.map_update(fd, key(3), key(33), libbpf.BPF_EXIST)
    assert exc.value.errno == errno.ENOENT
    assert libbpf.map_lookup(fd, key(2), 4) == key(22)
    assert sorted(libbpf.map_keys(fd, 4)) == [key(1), key(2)]

    assert libbpf.map_delete(fd, key(1)) is True
    assert libbpf.map_delete(fd, key(1)) is False
    assert libbpf.map_lookup_and_delete(fd, key(2), 4) == key(22)
    assert libbpf.map_lookup_and_delete(fd, key(2), 4) is None
    assert list(libbpf.map_keys(fd, 4)) == []


@needs_bpf
def test_map_wrapper_checks_sizes_and_deleting_while_iterating_ends(probe: BpfObject) -> None:
    verdicts = probe.map("verdicts")
    for n in range(10):
        verdicts.update(key(n), key(n * 10))
    with pytest.raises(TypeError):
        verdicts.lookup_percpu(key(1))
    with pytest.raises(ValueError):
        verdicts.update(b"\x01", key(1))
    with pytest.raises(ValueError):
        verdicts.update(key(1), b"\x01\x02")
    seen = set()
    for k in verdicts.keys():
        seen.add(k)
        assert verdicts.delete(k) in (True, False)
    assert seen == {key(n) for n in range(10)}
    assert list(verdicts.keys()) == []


@needs_bpf
def test_percpu_counters_sum_the_runs(probe: BpfObject) -> None:
    counters = probe.map("counters")
    assert counters.percpu
    with pytest.raises(TypeError):
        counters.lookup(key(0))
    before = counters.lookup_percpu(key(0))
    assert before is not None and len(before) == libbpf.num_possible_cpus()
    libbpf.prog_test_run(probe.program_fd("probe"), packet(5), repeat=7)
    after = counters.lookup_percpu(key(0))
    total = lambda values: sum(struct.unpack("=Q", v)[0] for v in values)  # noqa: E731
    assert total(after) - total(before) == 7
    # Slot 1 counts misses: key 5 is not in the map.
    assert total(counters.lookup_percpu(key(1))) == 7
    # Writing every CPU's slot, then reading it back.
    ncpus = libbpf.num_possible_cpus()
    counters.update_percpu(key(1), [struct.pack("=Q", 100 + i) for i in range(ncpus)])
    assert counters.lookup_percpu(key(1)) == [struct.pack("=Q", 100 + i) for i in range(ncpus)]
    assert counters.lookup_percpu(key(5)) is None  # an array has only 2 slots


def test_num_possible_cpus_matches_sysfs() -> None:
    try:
        libbpf.library()
    except BpfUnavailable as exc:
        pytest.skip(f"no libbpf: {exc}")
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        pytest.skip("no /sys/devices/system/cpu/possible")
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    assert libbpf.num_possible_cpus() == count


# -- BPF_PROG_TEST_RUN --------------------------------------------------------


@needs_bpf
def test_test_run_returns_the_verdict_and_the_rewritten_packet(probe: BpfObject) -> None:
    probe.map("verdicts").update(key(7), key(libbpf.TC_ACT_SHOT))
    data = packet(7)
    run = libbpf.prog_test_run(probe.program_fd("probe"), data)
    assert run.retval == libbpf.TC_ACT_SHOT
    assert run.data_out == data[:18] + key(libbpf.TC_ACT_SHOT) + data[22:]
    assert run.ctx_out is None
    assert run.duration_ns >= 0


@needs_bpf
def test_test_run_leaves_an_unknown_key_alone(probe: BpfObject) -> None:
    data = packet(8)
    run = libbpf.prog_test_run(probe.program_fd("probe"), data)
    assert (run.retval, run.data_out) == (libbpf.TC_ACT_OK, data)


@needs_bpf
def test_test_run_is_limited_by_the_output_buffer(probe: BpfObject) -> None:
    data = packet(8)
    with pytest.raises(BpfError) as exc:
        libbpf.prog_test_run(probe.program_fd("probe"), data, data_out_size=len(data) - 1)
    assert exc.value.errno == errno.ENOSPC


@needs_bpf
def test_skb_ctx_fields_are_accepted_and_come_back(probe: BpfObject) -> None:
    data = packet(8)
    ctx = libbpf.skb_ctx(
        gso_size=1400,
        gso_segs=3,
        mark=0xBEEF,
        priority=6,
        ingress_ifindex=1,
        cb=(1, 2, 3, 4, 5),
        wire_len=len(data) + 100,
        tstamp=1234,
    )
    assert len(ctx) == libbpf.SKB_CTX_SIZE
    run = libbpf.prog_test_run(probe.program_fd("probe"), data, ctx=ctx)
    fields = libbpf.skb_ctx_fields(run.ctx_out)
    assert (fields["gso_size"], fields["gso_segs"], fields["mark"]) == (1400, 3, 0xBEEF)
    assert fields["cb"] == (1, 2, 3, 4, 5)
    assert fields["wire_len"] == len(data) + 100
    # Any other field set is refused by the kernel: here __sk_buff.len.
    bad = struct.pack("=I", 60) + ctx[4:]
    with pytest.raises(BpfError) as exc:
        libbpf.prog_test_run(probe.program_fd("probe"), data, ctx=bad)
    assert exc.value.errno == errno.EINVAL


# -- errors and logging -------------------------------------------------------

BAD_PROGRAM = """\
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int unchecked(struct __sk_buff *skb)
{
	/* reads the packet without a bounds check: the verifier must refuse */
	return *(__u32 *)(long)skb->data;
}

char LICENSE[] SEC("license") = "GPL";
"""


@needs_bpf
def test_verifier_rejection_carries_the_verifier_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "bad.bpf.c").write_text(BAD_PROGRAM)
    [obj_path] = build.compile_all(tmp_path)
    caplog.set_level(logging.DEBUG, logger="kracauer.bpf")
    with BpfObject.open(str(obj_path)) as obj:
        with pytest.raises(BpfError) as exc:
            obj.load()
    error = exc.value
    assert not isinstance(error, BpfUnavailable)
    assert error.errno == errno.EACCES
    message = str(error)
    assert "bpf_object__load" in message
    assert "prog 'unchecked': BPF program load failed" in message
    assert "verifier log" in message
    assert "invalid access to packet" in message
    # The whole log reaches the debug log; libbpf's warnings are not repeated
    # as warnings (they are in the exception).
    assert any("invalid access to packet" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_verifier_tail_keeps_the_last_lines() -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    tail = libbpf._verifier_tail(text, 5).splitlines()
    assert tail == ["...", "line 95", "line 96", "line 97", "line 98", "line 99"]
    assert libbpf._verifier_tail("a\nb\n", 5) == "a\nb"


@needs_bpf
def test_libbpf_messages_go_to_the_kracauer_bpf_logger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kracauer.bpf")
    missing = tmp_path / "missing.bpf.o"
    with pytest.raises(BpfError) as exc:
        BpfObject.open(str(missing))
    assert exc.value.errno == errno.ENOENT
    warnings = [r.getMessage() for r in caplog.records if r.name == "kracauer.bpf" and r.levelno == logging.WARNING]
    assert any(str(missing) in m and "libbpf:" in m for m in warnings), warnings
    assert any(r.levelno == logging.DEBUG for r in caplog.records if r.name == "kracauer.bpf")


# -- pins on a bpffs ------------------------------------------------------------


@pytest.fixture
def bpffs_dir(tmp_path: Path):
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    path = tmp_path / "bpffs"
    assert not bpffs.is_bpffs(str(tmp_path))
    assert bpffs.ensure_bpffs(str(path)) is True
    try:
        assert bpffs.is_bpffs(str(path))
        yield path
    finally:
        bpffs.unmount(str(path), lazy=True)
    assert not bpffs.is_bpffs(str(path))


@needs_bpf
def test_ensure_bpffs_reuses_a_mount_above(bpffs_dir: Path) -> None:
    sub = bpffs_dir / "kracauer" / "maps"
    assert bpffs.ensure_bpffs(str(sub)) is False
    assert sub.is_dir() and bpffs.is_bpffs(str(sub))
    assert bpffs.ensure_bpffs(str(bpffs_dir)) is False


@needs_bpf
def test_pinned_map_is_reused_by_the_next_load(probe_path: str, bpffs_dir: Path) -> None:
    pin_dir = bpffs_dir / "kracauer"
    bpffs.ensure_bpffs(str(pin_dir))
    pin = str(pin_dir / "verdicts")
    with BpfObject.open(probe_path, pin_maps={"verdicts": pin}) as first:
        first.load()
        first.map("verdicts").update(key(42), key(4242))
        first_id = libbpf.map_fd_info(first.map_fd("verdicts")).id
        expected = first.map_info("verdicts")
    assert os.path.exists(pin)

    # The map outlived its object: the pin holds it.
    with Map.from_pin(pin) as pinned:
        info = pinned.info()
        assert info.id == first_id
        assert info.same_layout(expected)
        assert pinned.lookup(key(42)) == key(4242)

    with BpfObject.open(probe_path, pin_maps={"verdicts": pin}) as second:
        second.load()
        assert libbpf.map_fd_info(second.map_fd("verdicts")).id == first_id
        assert second.map("verdicts").lookup(key(42)) == key(4242)
        # The program uses the reused map.
        probe_run = libbpf.prog_test_run(second.program_fd("probe"), packet(42))
        assert probe_run.retval == 4242

    # A map of another size cannot reuse the pin: the load says so.
    with BpfObject.open(probe_path, pin_maps={"verdicts": pin}) as third:
        third.set_max_entries("verdicts", 128)
        with pytest.raises(BpfError) as exc:
            third.load()
        assert "pinned" in str(exc.value)

    assert bpffs.remove_pins(str(bpffs_dir)) == 1
    assert not os.path.exists(pin) and not pin_dir.exists()
    assert bpffs_dir.is_dir()


@needs_bpf
def test_obj_pin_and_obj_get_a_program(probe: BpfObject, bpffs_dir: Path) -> None:
    path = str(bpffs_dir / "probe_prog")
    prog_fd = probe.program_fd("probe")
    libbpf.obj_pin(prog_fd, path)
    fd = libbpf.obj_get(path)
    try:
        assert libbpf.prog_fd_info(fd).id == libbpf.prog_fd_info(prog_fd).id
    finally:
        os.close(fd)
    with pytest.raises(BpfError) as exc:
        libbpf.obj_pin(prog_fd, path)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(BpfError) as exc:
        libbpf.obj_get(str(bpffs_dir / "nothing"))
    assert exc.value.errno == errno.ENOENT
    assert bpffs.remove_pins(str(bpffs_dir)) == 1


def test_remove_pins_refuses_a_directory_off_bpffs(tmp_path: Path) -> None:
    victim = tmp_path / "not-a-pin"
    victim.write_text("keep me")
    with pytest.raises(OSError) as exc:
        bpffs.remove_pins(str(tmp_path))
    assert exc.value.errno == errno.EINVAL
    assert victim.read_text() == "keep me"
    assert bpffs.remove_pins(str(tmp_path / "absent")) == 0


# -- tc ------------------------------------------------------------------------

CLONE_NEWNET = 0x40000000


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread moved into network namespace ``name``.

    setns changes only the calling thread's namespace, as the daemon's own
    process would be placed with ``ip netns exec``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


@pytest.fixture
def netns():
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    name = f"kbpf{os.getpid()}-tc"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "v0", "up"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "v1", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def send_frame(ifname: str, frame: bytes) -> None:
    """Send a raw frame out of ``ifname``; it passes the device's tc egress."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        sock.send(frame)


@needs_bpf
def test_tc_attach_replace_and_detach(probe_path: str, netns: str) -> None:
    with BpfObject.open(probe_path) as first, BpfObject.open(probe_path) as second:
        first.load()
        second.load()
        first_id = libbpf.prog_fd_info(first.program_fd("probe")).id
        second_id = libbpf.prog_fd_info(second.program_fd("probe")).id
        assert first_id != second_id

        def scenario() -> dict:
            v0 = socket.if_nametoindex("v0")
            out = {"before": tc.attached(v0, "egress"), "detach_nothing": tc.detach(v0)}
            tc.attach(v0, first.program_fd("probe"))
            out["first"] = tc.attached(v0, "egress")
            counters = first.map("counters")
            runs_before = sum(struct.unpack("=Q", v)[0] for v in counters.lookup_percpu(key(0)))
            send_frame("v0", packet(1))
            out["runs"] = sum(struct.unpack("=Q", v)[0] for v in counters.lookup_percpu(key(0))) - runs_before
            tc.attach(v0, second.program_fd("probe"))
            out["replaced"] = tc.attached(v0, "egress")
            tc.attach(v0, first.program_fd("probe"), direction="ingress", priority=5)
            out["ingress"] = tc.attached(v0, "ingress")
            out["detach"] = tc.detach(v0, "egress")
            out["after"] = tc.attached(v0, "egress")
            out["detach_again"] = tc.detach(v0, "egress")
            out["ingress_after"] = tc.attached(v0, "ingress")
            return out

        out = in_netns(netns, scenario)

    assert out["before"] == [] and out["detach_nothing"] is False
    [entry] = out["first"]
    assert entry["prog_id"] == first_id
    assert (entry["name"], entry["direct_action"], entry["priority"], entry["handle"]) == ("kracauer", True, 1, 1)
    assert entry["protocol"] == tc.ETH_P_ALL and len(entry["tag"]) == 16
    # The frame went through the attached program (at least once; the kernel
    # may send its own packets, e.g. IPv6 router solicitations, meanwhile).
    assert out["runs"] >= 1
    # Replaced in place: still one filter, now running the second program.
    assert [e["prog_id"] for e in out["replaced"]] == [second_id]
    [ingress] = out["ingress"]
    assert (ingress["prog_id"], ingress["priority"], ingress["direction"]) == (first_id, 5, "ingress")
    assert out["detach"] is True and out["after"] == [] and out["detach_again"] is False
    assert [e["prog_id"] for e in out["ingress_after"]] == [first_id]


def test_tc_rejects_an_unknown_direction() -> None:
    with pytest.raises(ValueError):
        tc.attach(1, 0, direction="sideways")


@needs_bpf
def test_tc_attach_to_a_missing_device_fails(probe: BpfObject, netns: str) -> None:
    def attach_to_nothing() -> None:
        tc.attach(424242, probe.program_fd("probe"))

    with pytest.raises(tc.TcError) as exc:
        in_netns(netns, attach_to_nothing)
    assert exc.value.errno == errno.ENODEV


# -- build -----------------------------------------------------------------------


def test_build_without_clang_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(build.BuildError, match="not found"):
        build.compile_all(PROBE_DIR, tmp_path, clang="no-such-clang-kracauer")
    assert build.main([str(PROBE_DIR), "-o", str(tmp_path), "--clang", "no-such-clang-kracauer"]) == 1
    assert "no-such-clang-kracauer not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed")
def test_build_reports_compile_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.bpf.c").write_text(textwrap.dedent("""\
        int broken(void) { return undeclared; }
    """))
    with pytest.raises(build.BuildError, match="broken.bpf.c does not compile") as exc:
        build.compile_all(tmp_path)
    assert "undeclared" in str(exc.value)
