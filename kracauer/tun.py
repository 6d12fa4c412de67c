"""The TUN device and the routes that lead into it.

The device is opened with the TUNSETIFF ioctl (the only way to get its file
descriptor); bringing it up, its MTU and the routes go through netlink with
pyroute2, never by running `ip`. The device is not persistent: when the
descriptor closes the kernel removes it, and its routes with it, so even a
crash leaves nothing behind.
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

    def close(self) -> None:
        """Remove the routes, then the device (closing a non-persistent TUN deletes it)."""
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


def open_tun(name: str, mtu: int, ipv4_routes: list[ipaddress.IPv4Network],
             ipv6_routes: list[ipaddress.IPv6Network], offload: bool = True) -> Tun:
    """Create the TUN `name`, set its MTU, bring it up and route the given prefixes into it.

    With `offload`, every frame carries a virtio_net_hdr (netstack.vnet) and
    the kernel exchanges TCP super-packets with partial checksums.
    """
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(f"cannot open /dev/net/tun: {exc} (kracauer must run as root, with the tun module)") from exc
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            hint = " (is another kracauer running with this device name?)" if exc.errno == errno.EBUSY else ""
            raise TunError(f"cannot create TUN device {name!r}: {exc}{hint}") from exc
        if offload:
            _enable_offloads(fd)
        os.set_blocking(fd, False)
        tun = Tun(name=name, fd=fd, index=socket.if_nametoindex(name), offload=offload)
    except BaseException:
        os.close(fd)
        raise
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=tun.index, mtu=mtu, state="up")
            for net in ipv4_routes:
                _add_route(ipr, tun, socket.AF_INET, str(net))
            for net in ipv6_routes:
                _add_route(ipr, tun, socket.AF_INET6, str(net))
    except BaseException:
        tun.close()
        raise
    return tun


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
