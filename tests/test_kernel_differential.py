"""The BPF program against netstack.flow: the same packet and flow, the same bytes out.

The program (kracauer/bpf/xlat.bpf.c) is loaded for real and run with
BPF_PROG_TEST_RUN on packets built with scapy; the Python rewrite
(netstack.flow.to_host / to_client) runs on the same packet with the same
Flow. Everything after the Ethernet header must match byte for byte, and the
tracking fields the program writes back must be what the tracker would keep.
Needs root and a kernel that loads the program; skips with the reason
otherwise (CI runs as root).
"""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from netstack.flow import FLOW_KEY, FLOW_VALUE, L4_TCP, L4_UDP, Flow, flow_key, to_client, to_host
from netstack.ip import IPv4Header, IPv6Header
from netstack.tcp import TcpHeader

TC_ACT_OK = 0
TC_ACT_REDIRECT = 7

CLIENT = ipaddress.IPv4Address("198.51.100.7").packed
SERVICE = ipaddress.IPv4Address("192.0.2.10").packed
HOST = ipaddress.IPv6Address("2001:db8:1::10").packed
SRC6 = ipaddress.IPv6Address("64:ff9b:1::c633:6407").packed


def _load():
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    from kracauer.kernel_path import KernelPath, KernelPathError, object_path

    if object_path() is None:
        pytest.skip("kracauer/bpf/xlat.bpf.o is not built (no clang when kracauer was installed)")
    try:
        return KernelPath.load(redirect_ifindex=1, pin_dir=None, max_flows=64, l3_offset=14)
    except KernelPathError as exc:
        pytest.skip(f"the BPF program does not load here: {exc}")


@pytest.fixture(scope="module")
def kernel():
    kp = _load()
    yield kp
    kp.close(keep=True)


def run(kernel, frame: bytes, gso_size: int = 0):
    from kracauer.bpf.libbpf import prog_test_run, skb_ctx

    ctx = skb_ctx(gso_size=gso_size, gso_segs=1 if gso_size else 0) if gso_size else None
    return prog_test_run(kernel.prog_fd, frame, ctx=ctx)


def up_flow(**kw) -> Flow:
    defaults = dict(src=SRC6, dst=HOST, sport=40000, dport=8443, ack_add=0x12345678, tsecr_add=0x1000,
                    wscale_shift=0, mss=1440)
    defaults.update(kw)
    return Flow(**defaults)


def down_flow(**kw) -> Flow:
    defaults = dict(src=SERVICE, dst=CLIENT, sport=443, dport=40000, seq_add=-0x12345678, tsval_add=-0x1000,
                    wscale_shift=0, mss=1460)
    defaults.update(kw)
    return Flow(**defaults)


def python_to_host(packet: bytes, flow: Flow) -> bytes:
    buf = bytearray(64) + bytearray(packet)
    ip = IPv4Header(memoryview(buf)[64:])
    tcp = TcpHeader(memoryview(buf)[64 + ip.header_len:64 + ip.total_len])
    start = to_host(buf, 64, ip, tcp, ip.total_len - ip.header_len, flow, partial=False)
    return bytes(buf[start:64 + ip.total_len])


def python_to_client(packet: bytes, flow: Flow, ident: int) -> bytes:
    buf = bytearray(64) + bytearray(packet)
    ip = IPv6Header(memoryview(buf)[64:])
    tcp = TcpHeader(memoryview(buf)[64 + 40:64 + 40 + ip.payload_len])
    start = to_client(buf, 64, ip, tcp, ip.payload_len, flow, partial=False, ident=ident)
    return bytes(buf[start:64 + 40 + ip.payload_len])


def install(kernel, key: bytes, flow: Flow) -> None:
    assert kernel.flows.install(key, flow)


def client_packet(sport=40000, dport=443, **tcp) -> bytes:
    return bytes(IP(src="198.51.100.7", dst="192.0.2.10", ttl=tcp.pop("ttl", 63), tos=tcp.pop("tos", 0)) /
                 TCP(sport=sport, dport=dport, **tcp))


def host_packet(sport=8443, dport=40000, **tcp) -> bytes:
    return bytes(IPv6(src="2001:db8:1::10", dst="64:ff9b:1::c633:6407", hlim=tcp.pop("hlim", 63),
                      tc=tcp.pop("tc", 0)) / TCP(sport=sport, dport=dport, **tcp))


def eth(packet: bytes) -> bytes:
    kind = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=kind)) + packet


def _option_running_past_the_header() -> bytes:
    packet = bytearray(bytes(IP(src="198.51.100.7", dst="192.0.2.10") /
                             TCP(sport=40000, dport=443, flags="A", options=[(8, b"\x00" * 2)])))
    packet[20 + 21] = 0x30  # the option's length: 48 bytes, past the 24-byte header
    return bytes(packet)


# ---------------------------------------------------------------- layout

def test_flow_record_layout_matches_the_c_header(tmp_path):
    """Every offset and size of struct flow_key/flow_value, compiled from flow.h, against the struct.Structs."""
    from tests.bpf_build import build

    try:
        clang = build.find_clang()
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"no clang to compile flow.h: {exc}")
    fields = ("src", "dst", "sport", "dport", "seq_add", "ack_add", "tsval_add", "tsecr_add", "wscale_shift",
              "family", "mss", "flags", "seq_base", "start_ns", "ack_max", "seq_next", "window", "window_max",
              "packets", "bytes", "last_seen")
    source = tmp_path / "layout.c"
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "flow.h"', "int main(void) {",
             'printf("%zu %zu\\n", sizeof(struct flow_key), sizeof(struct flow_value));',
             'printf("%zu %zu %zu %zu %zu %zu\\n", offsetof(struct flow_key, family), offsetof(struct flow_key, l4), '
             'offsetof(struct flow_key, src), offsetof(struct flow_key, dst), offsetof(struct flow_key, sport), '
             'offsetof(struct flow_key, dport));',
             'printf("%d %d\\n", FLOW_L4_TCP, FLOW_L4_UDP);']
    for name in fields:
        lines.append(f'printf("%zu\\n", offsetof(struct flow_value, {name}));')
    lines += ["return 0; }"]
    source.write_text("\n".join(lines))
    import subprocess

    header_dir = os.path.join(os.path.dirname(__file__), "..", "kracauer", "bpf")
    binary = tmp_path / "layout"
    result = subprocess.run([clang, *build.include_flags(clang), "-I", header_dir, str(source), "-o", str(binary)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot compile a host program with {clang}: {result.stderr[-300:]}")
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split()
    key_size, value_size, *offsets = (int(x) for x in out)
    key_offsets, (l4_tcp, l4_udp), offsets = offsets[:6], offsets[6:8], offsets[8:]
    assert key_size == FLOW_KEY.size == 40
    # family, l4, then the 4-tuple (FLOW_KEY = "=BB2x16s16s2s2s").
    assert key_offsets == [0, 1, 4, 20, 36, 38]
    assert (l4_tcp, l4_udp) == (L4_TCP, L4_UDP)
    assert value_size == FLOW_VALUE.size
    # struct.calcsize of each prefix of the format gives the Python offsets.
    fmt = FLOW_VALUE.format
    python_offsets = []
    codes = [c for c in _split_format(fmt)]
    for i in range(len(codes)):
        python_offsets.append(struct.calcsize("=" + "".join(codes[:i])))
    python_offsets = [off for off, code in zip(python_offsets, codes) if not code.endswith("x")]
    assert python_offsets == offsets


def _split_format(fmt: str) -> list[str]:
    out, number = [], ""
    for ch in fmt.lstrip("="):
        if ch.isdigit():
            number += ch
        else:
            out.append(number + ch)
            number = ""
    return out


def test_flow_packs_and_unpacks_to_the_same_record():
    flow = up_flow(packets=7, bytes=1 << 40, last_seen=123, ack_max=0xFFFFFFFF, wscale_shift=-7, flags=0x37)
    assert Flow.unpack(flow.pack()) == flow
    down = down_flow()
    assert Flow.unpack(down.pack()) == down and down.family == 4


# ---------------------------------------------------------------- client to host

def test_a_plain_client_segment_is_translated_as_python_does(kernel):
    flow = up_flow()
    install(kernel, flow_key(CLIENT, SERVICE, struct.pack("!HH", 40000, 443)), flow)
    packet = bytes(IP(src="198.51.100.7", dst="192.0.2.10", ttl=63) /
                   TCP(sport=40000, dport=443, seq=1000, ack=2000, flags="PA", window=501,
                       options=[("NOP", None), ("NOP", None), ("Timestamp", (111, 222))]) / (b"x" * 300))
    result = run(kernel, eth(packet))
    assert result.retval == TC_ACT_REDIRECT
    assert result.data_out[14:] == python_to_host(packet, flow)
    out = IPv6(result.data_out[14:])
    assert out.src == "64:ff9b:1::c633:6407" and out[TCP].ack == (2000 + 0x12345678) & 0xFFFFFFFF
    assert out.hlim == 62
    # The checksum is right, not just equal to Python's.
    sent = out[TCP].chksum
    del out[TCP].chksum
    assert IPv6(bytes(out))[TCP].chksum == sent


def test_the_program_tracks_ack_sequence_window_and_counts(kernel):
    key = flow_key(CLIENT, SERVICE, struct.pack("!HH", 40001, 443))
    install(kernel, key, up_flow(sport=40001, ack_max=1990, seq_next=900, packets=5))
    packet = bytes(IP(src="198.51.100.7", dst="192.0.2.10", ttl=63) /
                   TCP(sport=40001, dport=443, seq=1000, ack=2000, flags="A", window=777) / (b"y" * 100))
    assert run(kernel, eth(packet)).retval == TC_ACT_REDIRECT
    seen = kernel.flows.peek(key)
    assert (seen.ack_max, seen.seq_next, seen.window, seen.window_max) == (2000, 1100, 777, 777)
    assert (seen.packets, seen.bytes) == (6, 100)
    assert seen.last_seen > 0
    taken = kernel.flows.take(key)
    assert taken == seen and kernel.flows.peek(key) is None


@pytest.mark.parametrize("why, packet", [
    ("syn", client_packet(flags="S")),
    ("fin", client_packet(flags="FA")),
    ("rst", client_packet(flags="R")),
    ("ttl", client_packet(flags="A", ttl=1)),
    ("ip options", bytes(IP(src="198.51.100.7", dst="192.0.2.10", options=[b"\x01\x01\x01\x00"]) /
                         TCP(sport=40000, dport=443, flags="A"))),
    ("fragment", bytes(IP(src="198.51.100.7", dst="192.0.2.10", flags="MF") / TCP(sport=40000, dport=443))),
    ("no flow", client_packet(sport=40999, flags="A")),
    ("bad options", _option_running_past_the_header()),
])
def test_what_the_program_cannot_handle_goes_on_unchanged(kernel, why, packet):
    install(kernel, flow_key(CLIENT, SERVICE, struct.pack("!HH", 40000, 443)), up_flow())
    frame = eth(packet)
    result = run(kernel, frame)
    assert result.retval == TC_ACT_OK, why
    assert result.data_out == frame, why


def test_a_gso_packet_too_big_for_the_ipv6_side_goes_to_python(kernel):
    install(kernel, flow_key(CLIENT, SERVICE, struct.pack("!HH", 40000, 443)), up_flow(mss=1440))
    packet = bytes(IP(src="198.51.100.7", dst="192.0.2.10") / TCP(sport=40000, dport=443, flags="A") / (b"z" * 3000))
    assert run(kernel, eth(packet), gso_size=1441).retval == TC_ACT_OK
    assert run(kernel, eth(packet), gso_size=1440).retval == TC_ACT_REDIRECT


def test_the_stats_count_what_passed_and_why(kernel):
    before = kernel.stats()
    run(kernel, eth(client_packet(sport=40998, flags="A")))
    after = kernel.stats()
    assert after["pass_no_flow"] == before["pass_no_flow"] + 1


# ---------------------------------------------------------------- properties

seq32 = st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0xFFFFFF00, 0xFFFFFFFF), st.integers(0, 0xFF))
sack_blocks = st.lists(st.tuples(seq32, seq32), min_size=0, max_size=3)
flags = st.sampled_from(["A", "PA", "UA", "EA", "CA", "ECA", "P"])


def _options(ts, sacks, nops):
    options = [("NOP", None)] * nops
    if ts is not None:
        options += [("NOP", None), ("NOP", None), ("Timestamp", ts)]
    if sacks:
        options += [("NOP", None), ("NOP", None), ("SAck", tuple(x for block in sacks for x in block))]
    return options


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=seq32, ack=seq32, delta=seq32, ts_off=seq32, window=st.integers(0, 0xFFFF),
       shift=st.integers(0, 14), tos=st.integers(0, 255), ttl=st.integers(2, 255),
       payload=st.integers(0, 1400), ts=st.one_of(st.none(), st.tuples(seq32, seq32)), sacks=sack_blocks,
       nops=st.integers(0, 3), flag=flags)
def test_client_to_host_matches_python(kernel, seq, ack, delta, ts_off, window, shift, tos, ttl, payload, ts, sacks,
                                       nops, flag):
    options = _options(ts, sacks if ts is None or len(sacks) < 4 else sacks[:3], nops)
    tcp = TCP(sport=41000, dport=443, seq=seq, ack=ack, flags=flag, window=window, options=options)
    assume(len(bytes(tcp)) <= 60)
    packet = bytes(IP(src="198.51.100.7", dst="192.0.2.10", ttl=ttl, tos=tos) / tcp / (b"\xab" * payload))
    flow = up_flow(sport=41001, ack_add=delta, tsecr_add=ts_off, wscale_shift=shift)
    install(kernel, flow_key(CLIENT, SERVICE, struct.pack("!HH", 41000, 443)), flow)
    result = run(kernel, eth(packet))
    assert result.retval == TC_ACT_REDIRECT
    assert result.data_out[14:] == python_to_host(packet, flow)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=seq32, ack=seq32, delta=seq32, ts_off=seq32, window=st.integers(0, 0xFFFF),
       shift=st.integers(-14, 14), tc=st.integers(0, 255), hlim=st.integers(2, 255),
       payload=st.integers(0, 1400), ts=st.one_of(st.none(), st.tuples(seq32, seq32)), sacks=sack_blocks,
       nops=st.integers(0, 3), flag=flags, packets=st.integers(0, 1 << 20))
def test_host_to_client_matches_python(kernel, seq, ack, delta, ts_off, window, shift, tc, hlim, payload, ts, sacks,
                                       nops, flag, packets):
    options = _options(ts, sacks, nops)
    tcp = TCP(sport=8443, dport=42000, seq=seq, ack=ack, flags=flag, window=window, options=options)
    assume(len(bytes(tcp)) <= 60)
    packet = bytes(IPv6(src="2001:db8:1::10", dst="64:ff9b:1::c633:6407", hlim=hlim, tc=tc) / tcp /
                   (b"\xcd" * payload))
    flow = down_flow(dport=42000, seq_add=-delta, tsval_add=-ts_off, wscale_shift=shift, packets=packets)
    install(kernel, flow_key(HOST, SRC6, struct.pack("!HH", 8443, 42000)), flow)
    result = run(kernel, eth(packet))
    assert result.retval == TC_ACT_REDIRECT
    assert result.data_out[14:] == python_to_client(packet, flow, ident=packets)
