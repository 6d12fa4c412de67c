"""The kernel data path: the BPF program that translates established connections.

kracauer's tracker decides; this module gives its decisions to the kernel.
``KernelPath.load`` opens ``kracauer/bpf/xlat.bpf.o`` with libbpf, reuses or
creates its maps pinned under ``<pin_dir>/<tun>/`` (so that they, and the
connections in them, outlive the process), loads the program and attaches it
to the TUN's tc egress, where every packet routed into the TUN passes before
it reaches kracauer's queue (../shared/design/kernel-path.md, hook A).

The tracker reaches the flow map through ``BpfFlowTable``, which implements
``netstack.flow.FlowTable``: install a direction's entry, take it back (lookup
and delete in one step, so no packet counted by the kernel is lost between a
read and a delete), or peek at it.

Why the TUN's egress (hook A) and not the box's interfaces' ingress (hook B):
A needs no interface configuration (kracauer already owns the TUN and its
routes), the kernel then routes the translated packet as if kracauer had
written it, so TTL, MTU and Packet Too Big, neighbours, netfilter and policy
routing all behave exactly as on the Python path; B must redo those itself.
The probe measured A at 0.74–0.85x plain forwarding against B's 0.83–0.99x;
docs/kernel-path.md has the measurements of this program.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from netstack.flow import (
    COOKIE_CONFIG, COOKIE_ENABLED, FLOW_KEY, FLOW_VALUE, LAST_SEEN, LAST_SEEN_OFFSET, LISTENER_KEY, LISTENER_VALUE,
    LISTENERS_MAX, STATS, SYN_STATS, XLAT_CONFIG, XLAT_ENABLED, Flow, listener_key,
)
from netstack.siphash import key_words

log = logging.getLogger("kracauer.kernel")

OBJECT = Path(__file__).parent / "bpf" / "xlat.bpf.o"
PROGRAM = "kracauer_xlat"
FILTER_NAME = "kracauer"
PINNED_MAPS = ("flows", "config", "stats")
U32_KEY = struct.Struct("=I")


class KernelPathError(RuntimeError):
    """The kernel path cannot be used (the reason is for the operator)."""


def object_path() -> Path | None:
    """The compiled program shipped with this package, or None (built without clang)."""
    return OBJECT if OBJECT.is_file() else None


class BpfFlowTable:
    """``netstack.flow.FlowTable`` over the flow map.

    A failing map operation never reaches the tracker as an exception (it
    runs inside the packet loop and the timers): it is logged once and
    answered as "not there" / "refused".
    """

    def __init__(self, flow_map) -> None:
        self.map = flow_map
        self.errors = 0

    def _failed(self, operation: str, exc: OSError) -> None:
        self.errors += 1
        if self.errors == 1:
            log.warning("the kernel's flow map refused a %s (%s); connections it concerns stay on, or go back "
                        "to, the Python path", operation, exc)

    def install(self, key: bytes, flow: Flow) -> bool:
        try:
            self.map.update(key, flow.pack())
        except OSError as exc:
            self._failed("flow", exc)
            return False
        return True

    def take(self, key: bytes) -> Flow | None:
        try:
            value = self.map.lookup_and_delete(key)
        except OSError as exc:
            self._failed("lookup", exc)
            return None
        return None if value is None else Flow.unpack(value)

    def _lookup(self, key: bytes) -> bytes | None:
        try:
            return self.map.lookup(key)
        except OSError as exc:
            self._failed("lookup", exc)
            return None

    def peek(self, key: bytes) -> Flow | None:
        value = self._lookup(key)
        return None if value is None else Flow.unpack(value)

    def last_seen(self, key: bytes) -> int | None:
        value = self._lookup(key)
        return None if value is None else LAST_SEEN.unpack_from(value, LAST_SEEN_OFFSET)[0]

    def items(self) -> Iterator[tuple[bytes, Flow]]:
        """Every entry now in the map (for adoption after a crash)."""
        for key in list(self.map.keys()):
            flow = self.peek(key)
            if flow is not None:
                yield key, flow

    def clear(self) -> int:
        removed = 0
        for key in list(self.map.keys()):
            removed += self.map.delete(key)
        return removed


@dataclass
class KernelPath:
    """The loaded program, its maps, and where it is attached."""

    obj: object
    flows: BpfFlowTable
    config_map: object
    stats_map: object
    prog_fd: int
    ifindex: int = 0          # the TUN it is attached to (0: not attached, as in tests)
    pin_dir: str | None = None
    # SYN cookies (set_syn_cookies); not pinned: every kracauer sets them at start.
    cookie_map: object = None
    listeners_map: object = None
    syn_stats_map: object = None

    @classmethod
    def load(cls, *, redirect_ifindex: int, pin_dir: str | None, max_flows: int, l3_offset: int = 0,
             path: Path | None = None) -> "KernelPath":
        """Load the program and its maps (reusing pinned ones in ``pin_dir``); not attached yet.

        ``l3_offset`` is 0 at a TUN (no link-layer header) and 14 for
        BPF_PROG_TEST_RUN, which hands the program an Ethernet frame.
        """
        from kracauer.bpf import bpffs
        from kracauer.bpf.libbpf import BpfError, BpfObject

        path = path or object_path()
        if path is None:
            raise KernelPathError(f"no BPF object at {OBJECT} (kracauer was built without clang)")
        pins = None
        if pin_dir is not None:
            try:
                if bpffs.ensure_bpffs(pin_dir):
                    log.info("mounted a bpffs on %s for kracauer's pinned maps", pin_dir)
            except OSError as exc:
                raise KernelPathError(f"cannot use {pin_dir} for pinned maps: {exc}") from None
            pins = {name: os.path.join(pin_dir, name) for name in PINNED_MAPS}
            max_flows = _pinned_size(pins["flows"], max_flows)
            _unpin_misfits(pins)
        try:
            obj = BpfObject.open(str(path), pin_maps=pins)
            try:
                obj.set_max_entries("flows", max_flows)
                obj.load()
            except BpfError as exc:
                if pins is not None and any(os.path.exists(p) for p in pins.values()):
                    raise KernelPathError(
                        f"{exc}; maps pinned in {pin_dir} by another kracauer version do not fit "
                        f"(`kracauer cleanup` removes them, and the connections they carry)") from None
                raise
        except BpfError as exc:
            raise KernelPathError(str(exc)) from None
        kp = cls(obj=obj, flows=BpfFlowTable(obj.map("flows")), config_map=obj.map("config"),
                 stats_map=obj.map("stats"), prog_fd=obj.program_fd(PROGRAM), pin_dir=pin_dir,
                 cookie_map=obj.map("cookie_config"), listeners_map=obj.map("listeners"),
                 syn_stats_map=obj.map("syn_stats"))
        kp.configure(redirect_ifindex, l3_offset, enabled=True)
        return kp

    def configure(self, redirect_ifindex: int, l3_offset: int = 0, enabled: bool = True) -> None:
        value = XLAT_CONFIG.pack(XLAT_ENABLED if enabled else 0, l3_offset, redirect_ifindex, 0)
        self.config_map.update(U32_KEY.pack(0), value)

    def set_syn_cookies(self, secret: bytes, *, mss: int, window: int, wscale: int,
                        listeners: dict[tuple[bytes, int], int], clock_ns: int = 0) -> None:
        """Let the program answer SYNs to ``listeners`` with the tracker's cookies (and set them anew on reload).

        ``secret`` is the tracker's SYN cookie secret (16 bytes); ``mss``, ``window``
        and ``wscale`` are what the tracker's SYN-ACKs announce (its MSS clamp,
        SYN_WINDOW, OUR_WSCALE). ``listeners`` maps (service address, port) to
        the SYNs without timestamps a second, per CPU, that still go to Python
        (``[kernel_path] python_syn_rate``; 0: the kernel answers every SYN).
        Listeners no longer named stop being answered and lose their counters;
        the others keep them. ``clock_ns`` replaces the kernel's monotonic clock
        (for BPF_PROG_TEST_RUN); 0 keeps it.
        """
        if len(listeners) > LISTENERS_MAX:
            raise KernelPathError(f"the kernel answers SYNs for at most {LISTENERS_MAX} listeners")
        keys = {listener_key(address, port): rate for (address, port), rate in listeners.items()}
        # Gone first, so that no SYN is answered for a listener that is no longer one.
        for key in list(self.listeners_map.keys()):
            if key not in keys:
                self.listeners_map.delete(key)
                self.syn_stats_map.delete(key)
        for key, rate in keys.items():
            if self.syn_stats_map.lookup_percpu(key) is None:
                ncpu = _possible_cpus()
                self.syn_stats_map.update_percpu(key, [SYN_STATS.pack(0, 0, 0, 0)] * ncpu)
            self.listeners_map.update(key, LISTENER_VALUE.pack(rate, 0))
        k0, k1 = key_words(secret)
        self.cookie_map.update(U32_KEY.pack(0), COOKIE_CONFIG.pack(k0, k1, clock_ns, mss, window, wscale,
                                                                   COOKIE_ENABLED, 0))

    def syn_stats(self) -> dict[tuple[bytes, int], tuple[int, int]]:
        """Per listener (address, port): (SYNs the program answered with cookies, SYNs without
        timestamps it handed to Python), summed over CPUs."""
        out = {}
        for key in list(self.syn_stats_map.keys()):
            values = self.syn_stats_map.lookup_percpu(key)
            if values is None:
                continue
            address, port = LISTENER_KEY.unpack(key)
            cookies = passed = 0
            for value in values:
                c, p, _, _ = SYN_STATS.unpack_from(value)
                cookies += c
                passed += p
            out[(address, int.from_bytes(port, "big"))] = (cookies, passed)
        return out

    def attach(self, ifindex: int) -> None:
        """Put the program on the TUN's egress (replacing the one a previous kracauer left)."""
        from kracauer.bpf import tc

        try:
            tc.attach(ifindex, self.prog_fd, "egress", name=FILTER_NAME)
        except OSError as exc:
            raise KernelPathError(f"cannot attach the BPF program to the TUN: {exc}") from None
        self.ifindex = ifindex

    def stats(self) -> dict[str, int]:
        """The program's counters, summed over CPUs."""
        out = {}
        for index, name in enumerate(STATS):
            values = self.stats_map.lookup_percpu(U32_KEY.pack(index)) or []
            out[name] = sum(struct.unpack_from("=Q", v)[0] for v in values)
        if self.syn_stats_map is not None:
            # Per listener, as "syn_cookies <address>:<port>" (kracauer.metrics labels them).
            for (address, port), (cookies, passed) in self.syn_stats().items():
                name = f"{ipaddress.IPv4Address(address)}:{port}"
                out[f"syn_cookies {name}"] = cookies
                out[f"syn_passed {name}"] = passed
        return out

    def close(self, keep: bool) -> None:
        """Let go of the descriptors; ``keep=False`` also detaches, empties and unpins.

        Kept (a stop with [state], or a crash), the program stays attached to
        the persistent TUN and goes on translating the connections in the map
        until the next kracauer adopts them.
        """
        from kracauer.bpf import tc

        if keep and self.cookie_map is not None:
            # No process will read the ACKs of SYNs answered now, and the next one has another
            # secret: until it starts, SYNs go unanswered to the TUN, and the clients send them again.
            try:
                self.cookie_map.update(U32_KEY.pack(0), bytes(COOKIE_CONFIG.size))
            except OSError as exc:
                log.debug("turning the kernel's SYN cookies off: %s", exc)
        if not keep:
            if self.ifindex:
                try:
                    tc.detach(self.ifindex, "egress", name=FILTER_NAME)
                except OSError as exc:
                    log.debug("detaching the BPF program: %s", exc)
            if self.pin_dir is not None:
                # An unpinned map goes with its last descriptor; a pinned one is emptied and unpinned.
                try:
                    self.flows.clear()
                except OSError as exc:
                    log.debug("emptying the flow map: %s", exc)
                remove_pins(self.pin_dir)
        self.obj.close()


def _possible_cpus() -> int:
    from kracauer.bpf.libbpf import num_possible_cpus

    return num_possible_cpus()


def _pinned_size(path: str, wanted: int) -> int:
    """The flow map a previous kracauer pinned keeps its size (libbpf reuses only a map of the same
    layout): a new size applies after `kracauer cleanup`."""
    from kracauer.bpf.libbpf import BpfError, map_fd_info, obj_get

    if not os.path.exists(path):
        return wanted
    try:
        fd = obj_get(path)
    except BpfError:
        return wanted
    try:
        info = map_fd_info(fd)
    finally:
        os.close(fd)
    if info.key_size != FLOW_KEY.size or info.value_size != FLOW_VALUE.size:
        return wanted  # another layout: the load says so
    if info.max_entries != wanted:
        log.warning("the pinned flow map %s has %d entries, not the %d configured; it is kept with its "
                    "connections (`kracauer cleanup` and a start make it anew)", path, info.max_entries, wanted)
    return info.max_entries


# The pinned maps whose contents a new kracauer writes anew or can lose (counters), and the
# (key size, value size, entries) this version's program has for them.
DISPOSABLE_MAPS = {"config": (U32_KEY.size, XLAT_CONFIG.size, 1), "stats": (U32_KEY.size, 8, len(STATS))}


def _unpin_misfits(pins: dict[str, str]) -> None:
    """A pinned config or stats map an older version made to another size (flow.h gained a counter)
    is unpinned, so the load makes it anew: only the flow map's entries are worth keeping."""
    from kracauer.bpf.libbpf import BpfError, map_fd_info, obj_get

    for name, shape in DISPOSABLE_MAPS.items():
        path = pins[name]
        if not os.path.exists(path):
            continue
        try:
            fd = obj_get(path)
        except BpfError:
            continue
        try:
            info = map_fd_info(fd)
        finally:
            os.close(fd)
        if (info.key_size, info.value_size, info.max_entries) != shape:
            log.info("the pinned %s map %s was made by another kracauer version; it is made anew", name, path)
            os.unlink(path)


def remove_pins(pin_dir: str) -> bool:
    """Remove kracauer's pinned maps in ``pin_dir`` (``kracauer cleanup``); True if there were any."""
    found = False
    for name in PINNED_MAPS:
        try:
            os.unlink(os.path.join(pin_dir, name))
            found = True
        except FileNotFoundError:
            pass
    try:
        os.rmdir(pin_dir)
    except OSError:
        pass
    return found

