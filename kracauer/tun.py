"""The TUN device and the routes that lead into it.

The device is opened with the TUNSETIFF ioctl (the only way to get its file
descriptor); bringing it up, its MTU and the routes go through netlink with
pyroute2, never by running `ip`. By default the device is not persistent:
when the descriptor closes the kernel removes it, and its routes with it, so
even a crash leaves nothing behind. A clean stop does not rely on that alone:
it deletes the routes and the device through netlink, closes the descriptor
and waits until the name is gone, so that whoever looks right after the
process has exited finds nothing.

At start, a device that already has the name is looked at first
(``inspect_device``): a persistent TUN nobody uses is one an earlier kracauer
left (stopped with ``[state]``, or crashed) and is taken over; one in use, one
that is not a TUN, or one that cannot be reused is refused with what it is
and what to do about it.

With ``persist`` (kracauer's ``[state]`` table), the device is made
persistent (TUNSETPERSIST): when the process exits the device and its routes
stay, packets routed into it are dropped by the kernel (no carrier, no ICMP
errors), and the next process attaches to the same device (TUNSETIFF on an
existing device) and carries on. ``remove_tun`` takes such a device away for
good.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("kracauer.tun")

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETLE = 0x400454DC
TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)
IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
IFNAMSIZ = 16
# Packets each queue holds for its reader before the kernel drops (the
# default 500 drops under bursts: open5gs#3933).
TXQUEUELEN = 1000
# include/uapi/linux/rtnetlink.h
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2
RTPROT_RA = 9


# How long a stop waits for the kernel to have removed the device.
GONE_TIMEOUT = 5.0


class TunError(RuntimeError):
    """The TUN device or its routes could not be set up."""


@dataclass(frozen=True)
class DeviceInfo:
    """What a network device of kracauer's name is (``inspect_device``)."""

    name: str
    index: int
    kind: str  # IFLA_INFO_KIND: "tun" for TUN and TAP devices, "" if the kernel says none
    tap: bool = False
    persistent: bool = False
    multi_queue: bool = False
    queues: int | None = None  # multi-queue devices: queues attached to a descriptor now

    @property
    def is_tun(self) -> bool:
        return self.kind == "tun" and not self.tap

    def describe(self) -> str:
        if self.kind != "tun":
            return f"a {self.kind or 'non-TUN'} device"
        flags = ["TAP" if self.tap else "TUN"]
        if self.persistent:
            flags.append("persistent")
        if self.multi_queue:
            flags.append("multi-queue")
        return "a " + ", ".join(flags) + " device"


@dataclass
class Tun:
    """An open TUN device with the routes kracauer added for it."""

    name: str
    fd: int
    index: int
    offload: bool = False
    # False once kracauer dropped root: the kernel removes the routes with the device.
    privileged: bool = True
    routes: list[tuple[int, str]] = field(default_factory=list)
    # The device outlives the process (TUNSETPERSIST), routes included.
    persistent: bool = False
    # The device was already there (left by an earlier kracauer) and was attached to.
    attached: bool = False
    # Multi-queue ([tun] workers > 1): one descriptor per queue, queue 0's is `fd`.
    queue_fds: list[int] = field(default_factory=list)
    multi_queue: bool = False

    def _close_fds(self) -> None:
        for fd in self.queue_fds[1:]:
            os.close(fd)
        self.queue_fds = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_steering(self, prog_fd: int) -> None:
        """Attach the queue-steering program (TUNSETSTEERINGEBPF; -1 detaches it)."""
        try:
            fcntl.ioctl(self.fd, TUNSETSTEERINGEBPF, struct.pack("i", prog_fd))
        except OSError as exc:
            raise TunError(f"cannot attach the queue-steering program to {self.name}: {exc}") from exc

    def close(self, keep: bool | None = None) -> None:
        """Remove the routes, then the device (closing a non-persistent TUN deletes it).

        A persistent device is kept with its routes (``keep`` defaults to
        ``persistent``); ``keep=False`` clears the persistence first, so that
        closing removes it.
        """
        if keep is None:
            keep = self.persistent
        if keep:
            self.routes.clear()
            self._close_fds()
            return
        if self.persistent and self.fd >= 0:
            try:
                fcntl.ioctl(self.fd, TUNSETPERSIST, 0)
                self.persistent = False
            except OSError as exc:
                log.warning("could not make TUN %s non-persistent: %s", self.name, exc)
        if not self.privileged:
            self.routes.clear()
        try:
            with IPRoute() as ipr:
                for family, dst in reversed(self.routes):
                    try:
                        ipr.route("del", dst=dst, oif=self.index, family=family)
                    except NetlinkError as exc:
                        if exc.code not in (errno.ESRCH, errno.ENODEV):
                            log.warning("could not remove route %s: %s", dst, exc)
                self.routes.clear()
                if self.privileged:
                    # RTM_DELLINK: the kernel unregisters the device before it
                    # answers, whatever else still holds the descriptor.
                    _delete_link(ipr, self.index, self.name)
        finally:
            self._close_fds()
        wait_gone(self.name, self.index)


def wait_gone(name: str, index: int, timeout: float = GONE_TIMEOUT) -> bool:
    """Wait until the device `index` called `name` no longer exists; False (logged) if it outlived `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while _index_of(name) == index:
        if time.monotonic() >= deadline:
            log.warning("the TUN %s still exists %.0f s after it was removed", name, timeout)
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def _delete_link(ipr: IPRoute, index: int, name: str) -> None:
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code not in (errno.ENODEV, errno.ESRCH):
            log.warning("could not delete the TUN %s: %s", name, exc)


def _index_of(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def check_forwarding() -> None:
    """DESIGN.md: the box forwards between interfaces, so both sysctls must be 1."""
    missing = []
    for path, name in (
        ("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding"),
    ):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError as exc:
            raise TunError(f"cannot read {name} ({path}): {exc}") from exc
        if value != "1":
            missing.append(name)
    if missing:
        settings = " ".join(f"{name}=1" for name in missing)
        raise TunError(f"forwarding is off: kracauer needs {', '.join(missing)} = 1 (run: sysctl -w {settings})")


def inspect_device(name: str) -> DeviceInfo | None:
    """What the network device `name` is (kind, TUN flags, who has it open), or None if there is none."""
    index = _index_of(name)
    if index is None:
        return None
    kind, data = "", None
    try:
        with IPRoute() as ipr:
            link = ipr.link("get", index=index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        if info is not None:
            kind = info.get_attr("IFLA_INFO_KIND") or ""
            data = info.get_attr("IFLA_INFO_DATA")
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise TunError(f"cannot read what the device {name!r} is: {exc}") from exc
    # include/uapi/linux/if_link.h: IFLA_TUN_TYPE is IFF_TUN (1) or IFF_TAP (2).
    attr = (lambda key: data.get_attr(key)) if data is not None and not isinstance(data, (str, bytes)) else (lambda key: None)
    return DeviceInfo(
        name=name, index=index, kind=kind, tap=attr("IFLA_TUN_TYPE") == 2, persistent=bool(attr("IFLA_TUN_PERSIST")),
        multi_queue=bool(attr("IFLA_TUN_MULTI_QUEUE")), queues=attr("IFLA_TUN_NUM_QUEUES"),
    )


def tun_holders(name: str, proc: str = "/proc") -> list[tuple[int, str]]:
    """The processes of this network namespace that have a TUN `name` open: (pid, command).

    drivers/net/tun.c (tun_chr_show_fdinfo) writes ``iff:\t<name>`` in the
    fdinfo of a descriptor attached to a device. Only for messages: the name
    says nothing of the namespace, so processes of other namespaces (with
    their own device of that name) are left out, as are unreadable ones.
    """
    wanted = f"iff:\t{name}\n"
    found = []
    try:
        pids = [entry for entry in os.listdir(proc) if entry.isdigit()]
        ours = os.stat(f"{proc}/self/ns/net")
    except OSError:
        return []
    for pid in pids:
        fdinfo = f"{proc}/{pid}/fdinfo"
        try:
            theirs = os.stat(f"{proc}/{pid}/ns/net")
            if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
                continue
            fds = os.listdir(fdinfo)
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"{fdinfo}/{fd}") as f:
                    text = f.read()
            except OSError:
                continue
            if wanted in text:
                found.append((int(pid), _command(proc, pid)))
                break
    return sorted(found)


def _command(proc: str, pid: str) -> str:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return "?"
    return " ".join(w.decode(errors="replace") for w in words if w)[:120] or "?"


def in_use_error(name: str) -> TunError:
    holders = tun_holders(name)
    who = ", ".join(f"pid {pid} ({command})" for pid, command in holders) if holders else "another process"
    return TunError(f"the TUN {name!r} is in use by {who}: is another kracauer running with this device name? "
                    f"Stop it first")


def check_existing(name: str) -> DeviceInfo | None:
    """Before TUNSETIFF: say clearly what a device that already has our name is, or refuse it.

    None: there is no such device. A DeviceInfo: a persistent TUN that may
    have been left by an earlier kracauer (whether some process still has it
    open, TUNSETIFF tells: EBUSY).
    """
    device = inspect_device(name)
    if device is None:
        return None
    if not device.is_tun:
        raise TunError(f"a network device named {name!r} exists and is {device.describe()}, not a TUN that "
                       f"kracauer could have left: set another [tun] name, or remove it (ip link del {name})")
    if not device.persistent:
        # A non-persistent TUN lives only while a descriptor holds it, or while the kernel removes it.
        if wait_gone(name, device.index, timeout=1.0):
            return None
        raise in_use_error(name)
    if device.multi_queue and device.queues:
        raise in_use_error(name)
    return device


def _attach(name: str, offload: bool, multi_queue: bool = False) -> int:
    """A descriptor for TUN `name` (one queue of it if `multi_queue`): created, or attached if a persistent one is there."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(f"cannot open /dev/net/tun: {exc} (kracauer must run as root, with the tun module)") from exc
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0) | (IFF_MULTI_QUEUE if multi_queue else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise in_use_error(name) from exc
        raise TunError(f"cannot create TUN device {name!r}: {exc}") from exc
    return fd


def open_tun(name: str, mtu: int, ipv4_routes: list[ipaddress.IPv4Network],
             ipv6_routes: list[ipaddress.IPv6Network], offload: bool = True, persist: bool = False,
             queues: int = 1, route: bool = True) -> Tun:
    """Create the TUN `name`, set its MTU, bring it up and route the given prefixes into it.

    With `offload`, every frame carries a virtio_net_hdr (netstack.vnet) and
    the kernel exchanges TCP super-packets with partial checksums.

    With `persist`, the device outlives the process and, if a persistent
    device of that name is already there (left by an earlier kracauer), this
    attaches to it: its routes are kept, missing ones added, and routes of
    the old configuration that this one does not have are removed. Without
    `persist`, such a leftover device is attached to and made non-persistent
    again, so that it goes away when this process exits.

    With `queues` > 1 the device is multi-queue (IFF_MULTI_QUEUE) and one
    descriptor is opened per queue (``Tun.queue_fds``); a multi-queue device
    left by an earlier kracauer is reattached as multi-queue even for one
    queue. A single-queue device cannot become multi-queue while it exists.
    """
    found = check_existing(name)
    if found is not None and queues > 1 and not found.multi_queue and not persist:
        # Without [state] nothing of it could be carried over anyway: make it anew, multi-queue.
        remove_tun(name)
        log.warning("removed the single-queue TUN %s left by an earlier kracauer: %d workers need a multi-queue "
                    "one", name, queues)
        found = None
    existed = found is not None
    multi_queue = queues > 1 or (found is not None and found.multi_queue)
    if found is not None and queues > 1 and not found.multi_queue:
        raise TunError(f"the TUN {name!r} left by an earlier kracauer is single-queue ([tun] workers = 1) and "
                       f"cannot take {queues} workers while it exists: start with workers = 1 to keep its "
                       f"connections, or `kracauer cleanup --config FILE` (they are lost) and start again")
    try:
        fd = _attach(name, offload, multi_queue)
        fds = [fd]
    except TunError as exc:
        if not existed or getattr(exc.__cause__, "errno", None) == errno.EBUSY:
            raise
        # A leftover device with settings this process cannot take (multi-queue, another owner...).
        raise TunError(f"the TUN {name!r} left by an earlier kracauer ({found.describe()}, no process attached) "
                       f"cannot be reused: {exc.__cause__ or exc}; `kracauer cleanup --config FILE` removes it") from exc
    try:
        if persist or existed:
            try:
                fcntl.ioctl(fd, TUNSETPERSIST, 1 if persist else 0)
            except OSError as exc:
                raise TunError(f"cannot make TUN device {name!r} {'persistent' if persist else 'non-persistent'}: {exc}") from exc
        if offload:
            _enable_offloads(fd)
        elif existed:
            # An earlier process may have turned offloads on; this one reads plain packets.
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            except OSError as exc:
                raise TunError(f"cannot turn TUN offloads off on {name!r}: {exc}") from exc
        os.set_blocking(fd, False)
        tun = Tun(name=name, fd=fd, index=socket.if_nametoindex(name), offload=offload, persistent=persist,
                  attached=existed, queue_fds=fds, multi_queue=multi_queue)
        for _ in range(1, queues):
            fds.append(_attach(name, offload, True))
            os.set_blocking(fds[-1], False)
    except BaseException:
        if persist and not existed:
            try:
                fcntl.ioctl(fd, TUNSETPERSIST, 0)
            except OSError:
                pass
        for queue_fd in fds:
            os.close(queue_fd)
        raise
    if existed and persist:
        log.info("attached to the existing TUN %s", name)
    elif existed:
        # No [state]: nothing to restore, but the device (and its routes) are taken over and go at exit.
        log.warning("attached to the existing TUN %s: %s with no process attached, left by an earlier kracauer "
                    "(stopped with [state], or crashed); it is removed when this process exits "
                    "(`kracauer cleanup` removes such a device without starting)", name, found.describe())
    if route:
        add_routes(tun, mtu, ipv4_routes, ipv6_routes)
    return tun


def add_routes(tun: Tun, mtu: int, ipv4_routes: list[ipaddress.IPv4Network],
               ipv6_routes: list[ipaddress.IPv6Network]) -> None:
    """Set the MTU, bring the device up and route the prefixes into it (kept ones kept, stale ones removed).

    open_tun does it at once; a supervisor calls it once its workers read the
    queues, so that no client is routed into a TUN nobody reads yet.
    """
    existed = tun.attached
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=tun.index, mtu=mtu, txqlen=TXQUEUELEN, state="up")
            wanted = [(socket.AF_INET, str(net)) for net in ipv4_routes] + \
                     [(socket.AF_INET6, str(net)) for net in ipv6_routes]
            present = _device_routes(ipr, tun.index) if existed else set()
            for family, dst in sorted(present - set(wanted)):
                _remove_stale_route(ipr, tun, family, dst)
            for family, dst in wanted:
                if (family, dst) in present:
                    tun.routes.append((family, dst))
                    log.info("route %s dev %s (kept)", dst, tun.name)
                else:
                    _add_route(ipr, tun, family, dst)
    except BaseException:
        # A device this process created goes; one it found stays as it was found.
        tun.close(keep=existed and tun.persistent)
        raise


def _device_routes(ipr: IPRoute, index: int) -> set[tuple[int, str]]:
    """The unicast routes of the main table through device `index` that kracauer could have added."""
    routes = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.route("dump", family=family, oif=index):
            if route.get("table") != RT_TABLE_MAIN or route.get("type") != RTN_UNICAST \
                    or route.get("proto") in (RTPROT_KERNEL, RTPROT_RA) or route.get_attr("RTA_OIF") != index:
                continue
            dst = route.get_attr("RTA_DST")
            if dst is None:
                continue
            net = ipaddress.ip_network(f"{dst}/{route.get('dst_len')}", strict=False)
            routes.add((family, str(net)))
    return routes


def _remove_stale_route(ipr: IPRoute, tun: Tun, family: int, dst: str) -> None:
    try:
        ipr.route("del", dst=dst, oif=tun.index, family=family)
        log.info("removed route %s dev %s (not in the configuration any more)", dst, tun.name)
    except NetlinkError as exc:
        log.warning("could not remove route %s dev %s: %s", dst, tun.name, exc)


def remove_tun(name: str) -> bool:
    """Remove the persistent TUN `name` left by a kracauer (with [state], or crashed); False if there is none.

    TunError if a process still uses it, or if it is not a TUN device. The
    device goes through netlink (RTM_DELLINK), whatever flags it was made
    with, and its routes with it; this returns once it is gone.
    """
    device = inspect_device(name)
    if device is None:
        return False
    if not device.is_tun:
        raise TunError(f"{name!r} is {device.describe()}, not a TUN kracauer could have left; not removing it")
    if not device.persistent or (device.multi_queue and device.queues):
        raise in_use_error(name)
    if not device.multi_queue:
        # A single-queue TUN is in use exactly when attaching to it fails with EBUSY.
        os.close(_attach(name, offload=False))
    with IPRoute() as ipr:
        try:
            ipr.link("del", index=device.index)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ESRCH):
                raise TunError(f"cannot remove the TUN {name!r}: {exc}") from exc
    if not wait_gone(name, device.index):
        raise TunError(f"the TUN {name!r} was removed but still exists after {GONE_TIMEOUT:.0f} s")
    return True


def _enable_offloads(fd: int) -> None:
    """Ask for super-packets and partial checksums (Documentation/networking/tuntap.rst)."""
    # netstack.vnet reads the header as little-endian; say so even on big-endian hosts.
    try:
        fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
    except OSError as exc:
        if sys.byteorder != "little":
            raise TunError(f"cannot make the TUN's vnet header little-endian: {exc}") from exc
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    except OSError as exc:
        raise TunError(f"cannot enable TUN offloads: {exc} (set [tun] offload = false)") from exc


def _add_route(ipr: IPRoute, tun: Tun, family: int, dst: str) -> None:
    try:
        ipr.route("add", dst=dst, oif=tun.index, family=family)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            raise TunError(f"a route for {dst} already exists; remove it or change the config") from exc
        raise TunError(f"cannot add route {dst} via {tun.name}: {exc}") from exc
    tun.routes.append((family, dst))
    log.info("route %s dev %s", dst, tun.name)


# -- the bridge's addresses and routes (kracauer.bridge) ----------------------------

# linux/if_addr.h: no duplicate address detection (the address is kracauer's own, on its own TUN).
IFA_F_NODAD = 0x02
RT_TABLE_LOCAL = 255


def add_tun_addresses(name: str, addresses: list[ipaddress.IPv6Address]) -> list[ipaddress.IPv6Address]:
    """Put /128 addresses on the TUN (the bridge relay's): packets kracauer writes for them are
    then delivered locally. Returns the ones added (an address already there is kept, not owned)."""
    added = []
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        for address in addresses:
            try:
                ipr.addr("add", index=index, address=str(address), prefixlen=128, family=socket.AF_INET6,
                         flags=IFA_F_NODAD)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise TunError(f"cannot add address {address}/128 to {name}: {exc}") from exc
                continue
            added.append(address)
            log.info("address %s/128 dev %s (bridge relay)", address, name)
    return added


def add_local_routes(prefixes: list[ipaddress.IPv6Network]) -> list[ipaddress.IPv6Network]:
    """`ip -6 route add local PREFIX dev lo` (table local), so that sockets bound to any address of
    the prefix (IPV6_FREEBIND) get the hosts' answers. Returns the routes added."""
    added = []
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for prefix in prefixes:
            try:
                ipr.route("add", dst=str(prefix), family=socket.AF_INET6, type="local", oif=lo,
                          table=RT_TABLE_LOCAL)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise TunError(f"cannot add route local {prefix} dev lo: {exc}") from exc
                log.info("route local %s dev lo (kept)", prefix)
                continue
            added.append(prefix)
            log.info("route local %s dev lo (bridge listener)", prefix)
    return added


def remove_local_routes(prefixes: list[ipaddress.IPv6Network]) -> None:
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for prefix in prefixes:
            try:
                ipr.route("del", dst=str(prefix), family=socket.AF_INET6, type="local", oif=lo,
                          table=RT_TABLE_LOCAL)
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    log.warning("could not remove route local %s dev lo: %s", prefix, exc)


def remove_tun_addresses(name: str, addresses: list[ipaddress.IPv6Address]) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return  # the TUN went, and its addresses with it
        for address in addresses:
            try:
                ipr.addr("del", index=found[0], address=str(address), prefixlen=128, family=socket.AF_INET6)
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                    log.warning("could not remove address %s from %s: %s", address, name, exc)


# -- the agent's address (kracauer.agent) ---------------------------------------------

def add_address(tun: Tun, address: ipaddress.IPv6Address, prefixlen: int = 128) -> None:
    """Give the TUN an IPv6 address (``kracauer agent``: the one the box assigned), without duplicate detection.

    DAD has nothing to probe on a point-to-point TUN, and would hold the
    address tentative (unusable) for a second.
    """
    try:
        with IPRoute() as ipr:
            ipr.addr("add", index=tun.index, address=str(address), prefixlen=prefixlen, family=socket.AF_INET6,
                     flags=IFA_F_NODAD)
    except NetlinkError as exc:
        raise TunError(f"cannot add the address {address}/{prefixlen} to {tun.name}: {exc}") from exc
