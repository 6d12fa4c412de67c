"""Dropping root once the TUN and its routes are in place.

kracauer needs root (CAP_NET_ADMIN) only to create the TUN and add routes.
After that it reads and writes one file descriptor. With `[tun] user` set, it
empties the capability bounding set, switches to that user and its primary
group (setuid from root clears the permitted, effective and ambient sets,
capabilities(7) "Effect of user ID changes on capabilities"), and sets
no_new_privs so that nothing it could execute regains privileges.

Without `[state]` the TUN is not persistent, so when the unprivileged process
exits and the descriptor closes, the kernel removes the device and every route
through it: clean-up needs no privilege. With `[state]` the TUN is meant to
outlive the process (docs/operations.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import logging
import os
import pwd

log = logging.getLogger("kracauer.privileges")

# include/uapi/linux/prctl.h
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class PrivilegeError(RuntimeError):
    """The configured user does not exist or the switch failed."""


def _prctl():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 63


def drop_privileges(user: str) -> tuple[int, int]:
    """Become `user` with no capabilities left; return (uid, gid)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"[tun] user: no such user {user!r}") from None
    uid, gid = entry.pw_uid, entry.pw_gid
    if uid == 0:
        raise PrivilegeError("[tun] user: that is root; name an unprivileged user such as \"nobody\"")
    prctl = _prctl()
    # The bounding set must be emptied while CAP_SETPCAP is still held.
    for cap in range(_last_capability() + 1):
        if prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1 and prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise PrivilegeError(f"cannot drop capability {cap} from the bounding set: "
                                 f"{os.strerror(ctypes.get_errno())}")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {user!r}: {exc}") from exc
    if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise PrivilegeError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    log.info("dropped privileges: now %s (uid %d), group %s (gid %d), no capabilities", user, uid, group, gid)
    return uid, gid
