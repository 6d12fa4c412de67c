"""A tiny sd_notify client: tell systemd (Type=notify) how the daemon is doing.

systemd passes the address of a datagram socket in ``$NOTIFY_SOCKET``: a path,
or an abstract-namespace name written with a leading ``@`` (sd_notify(3)).
Each message is one datagram of ``KEY=VALUE`` lines:

- ``READY=1`` once the TUN, its routes and the restored state are in place;
- ``RELOADING=1`` (with ``MONOTONIC_USEC=``) when SIGHUP arrives, and
  ``READY=1`` again once the new configuration is in force or refused;
- ``STOPPING=1`` when SIGTERM or SIGINT arrives;
- ``STATUS=...``, a line ``systemctl status`` shows;
- ``WATCHDOG=1`` every ``$WATCHDOG_USEC / 2`` from the packet loop, so a loop
  that hangs gets the service restarted (``WatchdogSec=`` in the unit).

Without ``$NOTIFY_SOCKET`` every call does nothing. Errors never reach the
caller: a notification that cannot be sent is logged once and dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("kracauer.systemd")


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (or nowhere, if it is not set)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address: str | bytes | None = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval: float | None = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram with `lines` (``"READY=1"``, ``"STATUS=..."``); True if it went out."""
        if self.address is None or not lines:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET", "?"), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *(("STATUS=" + status,) if status else ()))

    def reloading(self) -> bool:
        # systemd >= 253 wants the time the reload started, on CLOCK_MONOTONIC.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *(("STATUS=" + status,) if status else ()))

    def status(self, text: str) -> bool:
        return self.notify("STATUS=" + text)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as an address for sendto: a path, or ``@name`` for the abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock addresses and the like: not supported, stay silent


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None without a watchdog."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # the watchdog is meant for another process
    return int(usec) / 2_000_000
