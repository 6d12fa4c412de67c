"""The TUN device and the routes that lead into it.

The device is opened with the TUNSETIFF ioctl (the only way to get its file
descriptor); bringing it up, its MTU and the routes go through netlink with
pyroute2, never by running `ip`. By default the device is not persistent:
when the descriptor closes the kernel removes it, and its routes with it, so
even a crash leaves nothing behind.

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
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("kracauer.tun")

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETLE = 0x400454DC
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
IFNAMSIZ = 16
# include/uapi/linux/rtnetlink.h
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2
RTPROT_RA = 9


class TunError(RuntimeError):
    """The TUN device or its routes could not be set up."""


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
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            return
        if self.persistent and self.fd >= 0:
            try:
                fcntl.ioctl(self.fd, TUNSETPERSIST, 0)
                self.persistent = False
            except OSError as exc:
                log.warning("could not make TUN %s non-persistent: %s", self.name, exc)
        if not self.privileged:
            self.routes.clear()
        with IPRoute() as ipr:
            for family, dst in reversed(self.routes):
                try:
                    ipr.route("del", dst=dst, oif=self.index, family=family)
                except NetlinkError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENODEV):
                        log.warning("could not remove route %s: %s", dst, exc)
            self.routes.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


def _device_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _attach(name: str, offload: bool) -> int:
    """A descriptor for TUN `name`: created, or attached if a persistent one is there."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(f"cannot open /dev/net/tun: {exc} (kracauer must run as root, with the tun module)") from exc
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            hint = " (is another kracauer running with this device name?)"
        elif exc.errno == errno.EINVAL and _device_exists(name):
            hint = " (a network device of that name exists and is not a TUN device)"
        else:
            hint = ""
        raise TunError(f"cannot create TUN device {name!r}: {exc}{hint}") from exc
    return fd


def open_tun(name: str, mtu: int, ipv4_routes: list[ipaddress.IPv4Network],
             ipv6_routes: list[ipaddress.IPv6Network], offload: bool = True, persist: bool = False) -> Tun:
    """Create the TUN `name`, set its MTU, bring it up and route the given prefixes into it.

    With `offload`, every frame carries a virtio_net_hdr (netstack.vnet) and
    the kernel exchanges TCP super-packets with partial checksums.

    With `persist`, the device outlives the process and, if a persistent
    device of that name is already there (left by an earlier kracauer), this
    attaches to it: its routes are kept, missing ones added, and routes of
    the old configuration that this one does not have are removed. Without
    `persist`, such a leftover device is attached to and made non-persistent
    again, so that it goes away when this process exits.
    """
    existed = _device_exists(name)
    fd = _attach(name, offload)
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
                  attached=existed)
    except BaseException:
        if persist and not existed:
            try:
                fcntl.ioctl(fd, TUNSETPERSIST, 0)
            except OSError:
                pass
        os.close(fd)
        raise
    if existed:
        log.info("attached to the existing TUN %s", name)
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=tun.index, mtu=mtu, state="up")
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
        tun.close(keep=existed and persist)
        raise
    return tun


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
    """Remove the persistent TUN `name` left by a kracauer with [state]; False if there is none.

    TunError if a process still uses it, or if it is not a TUN device.
    """
    if not _device_exists(name):
        return False
    fd = _attach(name, offload=False)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    except OSError as exc:
        raise TunError(f"cannot make TUN device {name!r} non-persistent: {exc}") from exc
    finally:
        os.close(fd)  # the last descriptor of a non-persistent device: the kernel removes it and its routes
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
