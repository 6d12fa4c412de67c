"""SYNs answered by the BPF program against the tracker's own cookie SYN-ACK.

The program (kracauer/bpf/xlat.bpf.c, "SYN cookies") is loaded for real and run
with BPF_PROG_TEST_RUN on SYNs built with scapy, with options chosen by
hypothesis; a tracker with the same secret, forced onto its cookie path
(syn_backlog 0), answers the same SYN at the same time. The two SYN-ACKs must
be equal byte for byte but for the IP Identification (random in the program, a
counter in the tracker) and so the IP header checksum; and a tracker must
accept the client's ACK of the program's SYN-ACK with the MSS, window scale
and SACK the SYN offered. Also what the program leaves to Python: SYNs to no
listener, SYNs of a connection in the flow map, SYNs with data, IP options or
malformed options, and SYNs without timestamps within the listener's budget.

Needs root and a kernel that loads the program; skips with the reason otherwise.
"""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from netstack.checksum import checksum
from netstack.flow import Flow, flow_key
from netstack.syncookie import MSS_TABLE, mss_index
from netstack.tcp import TcpHeader
from netstack.tracker import OUR_WSCALE, SYN_WINDOW, Listener, Tracker, TrackerConfig

TC_ACT_OK = 0
TC_ACT_REDIRECT = 7

SECRET = bytes(range(0x40, 0x50))
PREFIX = ipaddress.IPv6Address("64:ff9b:1::").packed[:12]
SERVICE = "192.0.2.10"
CLIENT = "198.51.100.7"
MTU = 1500
CLAMP = MTU - 60
LISTENERS = (Listener(ipaddress.IPv4Address(SERVICE).packed, 443, "tls"),
             Listener(ipaddress.IPv4Address(SERVICE).packed, 80, "http"),
             Listener(ipaddress.IPv4Address("192.0.2.11").packed, 443, "tcp"))
# Mid-millisecond, far from a 64-second tick: the program's integer clock and the
# tracker's float seconds give the same milliseconds and the same tick.
NOW_NS = 1_234_567 * 64_000_000_000 // 64_000 + 500_000


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
    # The per-CPU budget is counted on the CPU the test run happens on: stay on one.
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    yield kp
    os.sched_setaffinity(0, affinity)
    kp.close(keep=True)


def configure(kernel, now_ns: int = NOW_NS, rate: int = 0) -> None:
    kernel.set_syn_cookies(SECRET, mss=CLAMP, window=SYN_WINDOW, wscale=OUR_WSCALE, clock_ns=now_ns,
                           listeners={(lst.address, lst.port): rate for lst in LISTENERS})


def tracker() -> Tracker:
    counter = iter(range(1, 1 << 30))
    # syn_backlog 0: every SYN gets a cookie, as from the program.
    return Tracker(TrackerConfig(prefix=PREFIX, mtu=MTU, syn_backlog=0), LISTENERS, lambda _l, _d: None,
                   lambda: next(counter), cookie_secret=SECRET)


def eth(packet: bytes) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x0800)) + packet


def run(kernel, packet: bytes):
    from kracauer.bpf.libbpf import prog_test_run

    return prog_test_run(kernel.prog_fd, eth(packet))


def syn(options, sport=40000, dport=443, seq=1000, src=CLIENT, dst=SERVICE, window=64240, payload=b"",
        ip_options=None, **ip) -> bytes:
    if ip_options is not None:
        ip["options"] = ip_options
    packet = IP(src=src, dst=dst, ttl=63, **ip) / TCP(sport=sport, dport=dport, flags="S", seq=seq, window=window,
                                                    options=options)
    return bytes(packet / Raw(payload) if payload else packet)


def without_ident(packet: bytes) -> bytes:
    """The packet with its IP Identification and header checksum zeroed."""
    return packet[:4] + b"\0\0" + packet[6:10] + b"\0\0" + packet[12:]


# ------------------------------------------------------------------ strategies

mss_values = st.one_of(st.sampled_from([0, 1, 47, 48, 535, 536, 537, 1219, 1220, 1460, 1461, 8960, 65535]),
                       st.integers(0, 0xFFFF))
option = st.one_of(
    st.tuples(st.just("MSS"), mss_values),
    st.tuples(st.just("WScale"), st.one_of(st.integers(0, 16), st.integers(0, 255))),
    st.just(("SAckOK", b"")),
    st.tuples(st.just("Timestamp"), st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))),
    st.just(("NOP", None)),
    st.just(("EOL", None)),
)
LENGTHS = {"MSS": 4, "WScale": 3, "SAckOK": 2, "Timestamp": 10, "NOP": 1, "EOL": 1}


def fits(options) -> bool:
    return sum(LENGTHS[name] for name, _ in options) <= 40


linux_like = st.builds(
    lambda mss, sack, ts, wscale: ([("MSS", mss)] if mss is not None else []) +
    ([("SAckOK", b"")] if sack else []) + ([("Timestamp", (ts, 0))] if ts is not None else []) +
    ([("NOP", None), ("WScale", wscale)] if wscale is not None else []),
    st.one_of(st.none(), mss_values), st.booleans(), st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)),
    st.one_of(st.none(), st.integers(0, 15)))
syn_option_lists = st.one_of(linux_like, st.lists(option, max_size=12).filter(fits))
clock_ms = st.integers(1, 1 << 40).filter(lambda ms: ms % 64_000 not in (0, 63_999))


# ------------------------------------------------------------------ differential

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=syn_option_lists, sport=st.integers(1, 0xFFFF), dport=st.sampled_from([443, 80]),
       seq=st.integers(0, 0xFFFFFFFF), client=st.integers(0, 0xFFFFFFFF), ms=clock_ms,
       window=st.integers(0, 0xFFFF))
def test_the_kernels_cookie_syn_ack_is_the_trackers_and_its_ack_is_accepted(kernel, options, sport, dport, seq,
                                                                             client, ms, window):
    src = str(ipaddress.IPv4Address(client))
    packet = syn(options, sport=sport, dport=dport, seq=seq, src=src, window=window)
    now_ns = ms * 1_000_000 + 500_000
    now = now_ns / 1e9
    configure(kernel, now_ns)
    tcp = TcpHeader(packet[20:])  # raises on a malformed list: the strategy builds none
    python = tracker().receive(packet, now)
    result = run(kernel, packet)
    assert result.retval == TC_ACT_REDIRECT
    out = result.data_out[14:]
    assert len(python) == 1
    assert without_ident(out) == without_ident(python[0])
    assert checksum(out[:20]) == 0, "the program's IPv4 header checksum"

    # The client's ACK of the program's SYN-ACK, to a tracker that never saw the SYN.
    answer = IP(out)
    stamps = dict(o for o in answer[TCP].options if o[0] == "Timestamp").get("Timestamp")
    ack_options = [("NOP", None), ("NOP", None), ("Timestamp", (12345, stamps[0]))] if stamps else []
    ack = bytes(IP(src=src, dst=SERVICE) / TCP(sport=sport, dport=dport, flags="A", seq=(seq + 1) & 0xFFFFFFFF,
                                                ack=(answer[TCP].seq + 1) & 0xFFFFFFFF, window=500, options=ack_options))
    later = tracker()
    later.receive(ack, now + 0.05)
    conn = later.clients.get(ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(SERVICE).packed +
                             struct.pack("!HH", sport, dport))
    assert conn is not None and later.events["syn_cookie_accepted"] == 1
    client_mss = 536 if tcp.mss is None else max(tcp.mss, 48)
    assert conn.client_mss == MSS_TABLE[mss_index(client_mss)]
    timestamps = tcp.ts_at >= 0
    assert conn.client_ts == timestamps
    assert conn.client_wscale == (tcp.wscale if timestamps else None)
    assert conn.client_sack == (tcp.sack_permitted and timestamps)


def test_a_linux_syn_gets_exactly_the_trackers_options(kernel):
    configure(kernel)
    packet = syn([("MSS", 1460), ("SAckOK", b""), ("Timestamp", (777, 0)), ("NOP", None), ("WScale", 7)])
    result = run(kernel, packet)
    assert result.retval == TC_ACT_REDIRECT
    answer = IP(result.data_out[14:])
    assert answer.src == SERVICE and answer.dst == CLIENT and answer.ttl == 64
    assert str(answer[TCP].flags) == "SA" and answer[TCP].ack == 1001 and answer[TCP].window == SYN_WINDOW
    names = [name for name, _ in answer[TCP].options]
    assert names == ["MSS", "SAckOK", "Timestamp", "NOP", "WScale"]
    assert dict(answer[TCP].options)["MSS"] == CLAMP and dict(answer[TCP].options)["WScale"] == OUR_WSCALE
    assert dict(answer[TCP].options)["Timestamp"][1] == 777


# ------------------------------------------------------------------ what goes to Python

def flow_entry(sport: int) -> tuple[bytes, Flow]:
    key = flow_key(ipaddress.IPv4Address(CLIENT).packed, ipaddress.IPv4Address(SERVICE).packed,
                   struct.pack("!HH", sport, 443))
    return key, Flow(src=PREFIX + ipaddress.IPv4Address(CLIENT).packed,
                     dst=ipaddress.IPv6Address("2001:db8::10").packed, sport=sport, dport=8443)


TS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]


@pytest.mark.parametrize("why, packet", [
    ("no listener on the port", syn(TS, dport=8080)),
    ("no listener on the address", syn(TS, dst="192.0.2.99")),
    ("data on the SYN", syn(TS, payload=b"early")),
    ("IP options", syn(TS, ip_options=[b"\x01\x01\x01\x00"])),
    ("a fragment", syn(TS, flags="MF")),
    ("SYN-ACK", bytes(IP(src=CLIENT, dst=SERVICE) / TCP(sport=40000, dport=443, flags="SA", options=TS))),
    ("SYN with RST", bytes(IP(src=CLIENT, dst=SERVICE) / TCP(sport=40000, dport=443, flags="SR", options=TS))),
])
def test_what_the_program_does_not_answer_goes_on_unchanged(kernel, why, packet):
    configure(kernel)
    result = run(kernel, packet)
    assert result.retval == TC_ACT_OK, why
    assert result.data_out[14:] == packet, why


def test_a_syn_with_options_running_past_the_header_goes_on_unchanged(kernel):
    configure(kernel)
    packet = bytearray(syn([("MSS", 1460), ("Timestamp", (1, 0))]))
    packet[20 + 24 + 1] = 30  # the timestamp option's length, past the header's end
    result = run(kernel, bytes(packet))
    assert result.retval == TC_ACT_OK and result.data_out[14:] == bytes(packet)


def test_a_syn_of_a_connection_in_the_flow_map_goes_to_python(kernel):
    configure(kernel)
    key, flow = flow_entry(41000)
    assert kernel.flows.install(key, flow)
    try:
        assert run(kernel, syn(TS, sport=41000)).retval == TC_ACT_OK
        assert run(kernel, syn(TS, sport=41001)).retval == TC_ACT_REDIRECT
    finally:
        kernel.flows.take(key)


def test_without_cookie_configuration_every_syn_goes_to_python(kernel):
    from netstack.flow import COOKIE_CONFIG
    from kracauer.kernel_path import U32_KEY

    kernel.cookie_map.update(U32_KEY.pack(0), bytes(COOKIE_CONFIG.size))
    try:
        assert run(kernel, syn(TS)).retval == TC_ACT_OK
    finally:
        configure(kernel)


def stats(kernel, port=443) -> tuple[int, int]:
    return kernel.syn_stats()[(ipaddress.IPv4Address(SERVICE).packed, port)]


def test_syns_without_timestamps_go_to_python_within_the_budget_then_get_cookies(kernel):
    no_ts = [("MSS", 1460), ("NOP", None), ("WScale", 8), ("SAckOK", b"")]
    second = 5_000 * 1_000_000_000 + 100_000_000
    configure(kernel, second, rate=3)
    cookies, passed = stats(kernel)
    verdicts = [run(kernel, syn(no_ts, sport=42000 + i)).retval for i in range(5)]
    assert verdicts == [TC_ACT_OK] * 3 + [TC_ACT_REDIRECT] * 2
    # With timestamps: answered whatever the budget.
    assert run(kernel, syn(TS, sport=42100)).retval == TC_ACT_REDIRECT
    # The budget is per listener: port 80 has its own.
    assert run(kernel, syn(no_ts, sport=42200, dport=80)).retval == TC_ACT_OK
    assert stats(kernel) == (cookies + 3, passed + 3)
    # A cookie for a SYN without timestamps keeps neither window scale nor SACK, as the tracker's.
    answered = run(kernel, syn(no_ts, sport=42300)).data_out[14:]
    assert [name for name, _ in IP(answered)[TCP].options] == ["MSS"]
    # The next second, a new budget.
    configure(kernel, second + 1_000_000_000, rate=3)
    assert run(kernel, syn(no_ts, sport=42400)).retval == TC_ACT_OK
    # Rate 0: the kernel answers every SYN.
    configure(kernel, second + 2_000_000_000, rate=0)
    assert run(kernel, syn(no_ts, sport=42500)).retval == TC_ACT_REDIRECT


def test_listeners_reset_on_reload_keep_their_counters_and_removed_ones_stop(kernel):
    configure(kernel)
    run(kernel, syn(TS, sport=43000))
    before = stats(kernel)
    assert before[0] >= 1
    kernel.set_syn_cookies(SECRET, mss=CLAMP, window=SYN_WINDOW, wscale=OUR_WSCALE, clock_ns=NOW_NS,
                           listeners={(LISTENERS[0].address, 443): 0})
    try:
        assert stats(kernel) == before
        assert (LISTENERS[0].address, 80) not in kernel.syn_stats()
        assert run(kernel, syn(TS, sport=43001, dport=80)).retval == TC_ACT_OK
        counters = kernel.stats()
        assert counters[f"syn_cookies {SERVICE}:443"] == before[0]
    finally:
        configure(kernel)
