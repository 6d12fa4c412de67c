"""Attach BPF programs to an interface's tc hooks, over netlink (pyroute2).

The hook is the clsact qdisc's ingress or egress side; the program is a
``cls_bpf`` filter in direct-action mode, so its return value is the verdict
(TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT...). Everything happens in the
calling thread's network namespace, where the daemon runs.

A filter outlives the process that attached it (it holds the program); it
goes when detached, when its device goes, or with the clsact qdisc.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("kracauer.bpf")

# include/uapi/linux/pkt_sched.h: TC_H_CLSACT | TC_H_MIN_{INGRESS,EGRESS}
TC_H_CLSACT = 0xFFFFFFF1
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
ETH_P_ALL = 0x0003
# The filter's handle within its priority: one kracauer filter per hook.
FILTER_HANDLE = 1

# include/uapi/linux/pkt_cls.h: TCA_BPF_* inside TCA_OPTIONS
TCA_BPF_CLASSID = 3
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_FLAGS_GEN = 9
TCA_BPF_TAG = 10
TCA_BPF_ID = 11
TCA_BPF_FLAG_ACT_DIRECT = 1
_NLA_HEADER = struct.Struct("=HH")
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER


class TcError(OSError):
    """A tc (netlink) request failed; ``errno`` says why."""


def _parent(direction: str) -> int:
    try:
        return PARENTS[direction]
    except KeyError:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}") from None


def _tc_error(exc: NetlinkError, operation: str) -> TcError:
    return TcError(exc.code, f"{operation}: {exc}")


def _ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    """Add the clsact qdisc unless the device has one already."""
    for qdisc in ipr.get_qdiscs(index=ifindex):
        if qdisc.get_attr("TCA_KIND") == "clsact":
            return
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        # EEXIST: another process added it meanwhile, or the device has the
        # older "ingress" qdisc at the same handle (then the filter add says so).
        if exc.code != errno.EEXIST:
            raise _tc_error(exc, f"add clsact qdisc on ifindex {ifindex}") from None


def _nla_attrs(raw: bytes) -> dict[int, bytes]:
    """The attributes of a netlink attribute list, by type (last one wins)."""
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + _NLA_HEADER.size <= len(raw):
        length, type_ = _NLA_HEADER.unpack_from(raw, offset)
        if length < _NLA_HEADER.size:
            break
        attrs[type_ & _NLA_TYPE_MASK] = raw[offset + _NLA_HEADER.size : offset + length]
        offset += (length + 3) & ~3
    return attrs


def _bpf_options(msg: object) -> dict[int, bytes] | None:
    """TCA_OPTIONS of a bpf filter, raw.

    pyroute2 0.9's table stops at TCA_BPF_FLAGS: it shows TCA_BPF_FLAGS_GEN,
    TCA_BPF_TAG and TCA_BPF_ID as UNKNOWN without a value, so the nested
    attributes are read from the message's bytes, which the decoded
    attribute still points into.
    """
    options = msg.get_attr("TCA_OPTIONS")  # type: ignore[attr-defined]
    if options is None:
        return None
    raw = bytes(options.data[options.offset : options.offset + options.length])
    return _nla_attrs(raw[_NLA_HEADER.size :])


def _u32(value: bytes | None) -> int | None:
    return None if value is None or len(value) < 4 else struct.unpack_from("=I", value)[0]


def _filter_entry(msg: object, direction: str) -> dict | None:
    if msg.get_attr("TCA_KIND") != "bpf":  # type: ignore[attr-defined]
        return None
    options = _bpf_options(msg)
    if options is None:
        # The first message of each priority is its chain head, without a filter.
        return None
    info = msg["info"]  # type: ignore[index]
    name = options.get(TCA_BPF_NAME, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    flags = _u32(options.get(TCA_BPF_FLAGS)) or 0
    tag = options.get(TCA_BPF_TAG)
    return {
        "direction": direction,
        "handle": msg["handle"],  # type: ignore[index]
        "priority": info >> 16,
        "protocol": socket.ntohs(info & 0xFFFF),
        "name": name,
        "prog_id": _u32(options.get(TCA_BPF_ID)),
        "tag": tag.hex() if tag is not None else None,
        "direct_action": bool(flags & TCA_BPF_FLAG_ACT_DIRECT),
    }


def _attached(ipr: IPRoute, ifindex: int, direction: str) -> list[dict]:
    parent = _parent(direction)
    try:
        messages = list(ipr.get_filters(index=ifindex, parent=parent))
    except NetlinkError as exc:
        # No clsact qdisc: nothing can be attached there.
        if exc.code == errno.EINVAL:
            return []
        raise _tc_error(exc, f"list {direction} filters of ifindex {ifindex}") from None
    entries = (_filter_entry(msg, direction) for msg in messages)
    return [e for e in entries if e is not None]


def attached(ifindex: int, direction: str = "egress") -> list[dict]:
    """The bpf filters on a hook, each a dict: ``direction``, ``handle``,
    ``priority``, ``protocol``, ``name`` (the filter's name, as given to
    ``attach``), ``prog_id`` (compare with ``libbpf.prog_fd_info(fd).id``),
    ``tag`` (hex) and ``direct_action``."""
    with IPRoute() as ipr:
        return _attached(ipr, ifindex, direction)


def _filter_args(ifindex: int, direction: str, priority: int, protocol: int = ETH_P_ALL) -> dict:
    return {
        "index": ifindex,
        "handle": FILTER_HANDLE,
        "parent": _parent(direction),
        "prio": priority,
        "protocol": protocol,
    }


def attach(
    ifindex: int,
    prog_fd: int,
    direction: str = "egress",
    name: str = "kracauer",
    priority: int = 1,
) -> None:
    """Run ``prog_fd`` on every packet of a hook, in direct-action mode.

    The clsact qdisc is added if missing. A filter already at this priority
    and handle is replaced atomically (no packet sees no program), which is
    what a restarted daemon does to the one its predecessor left; if the
    kernel refuses the replace (a different filter kind there), the old
    filter is deleted and the new one added.
    """
    args = _filter_args(ifindex, direction, priority)
    options = {"fd": prog_fd, "name": name, "direct_action": True}
    with IPRoute() as ipr:
        _ensure_clsact(ipr, ifindex)
        try:
            ipr.tc("replace-filter", "bpf", **args, **options)
            return
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.EBADF):
                raise _tc_error(exc, f"attach {name} to {direction} of ifindex {ifindex}") from None
            log.debug("replacing the %s filter on ifindex %d failed (%s), deleting it first", direction, ifindex, exc)
        for entry in _attached(ipr, ifindex, direction):
            if entry["priority"] == priority and entry["handle"] == FILTER_HANDLE:
                _delete(ipr, ifindex, direction, entry)
        try:
            ipr.tc("add-filter", "bpf", **args, **options)
        except NetlinkError as exc:
            raise _tc_error(exc, f"attach {name} to {direction} of ifindex {ifindex}") from None


def _delete(ipr: IPRoute, ifindex: int, direction: str, entry: dict) -> None:
    args = _filter_args(ifindex, direction, entry["priority"], entry["protocol"])
    args["handle"] = entry["handle"]
    try:
        ipr.tc("del-filter", "bpf", **args)
    except NetlinkError as exc:
        if exc.code != errno.ENOENT:
            raise _tc_error(exc, f"detach {entry['name']} from {direction} of ifindex {ifindex}") from None


def detach(ifindex: int, direction: str = "egress", name: str = "kracauer") -> bool:
    """Remove the bpf filters called ``name`` from a hook; False if none was
    there. The clsact qdisc stays (other filters may use it)."""
    with IPRoute() as ipr:
        found = [e for e in _attached(ipr, ifindex, direction) if e["name"] == name]
        for entry in found:
            _delete(ipr, ifindex, direction, entry)
        return bool(found)
