"""The daemon's socket side: one asyncio loop in one thread beside the packet loop.

The packet loop (kracauer.daemon) must never block: a DNS lookup, a TLS
handshake with a bridge peer or an agent's tunnel all wait on the network. They
run here, on an asyncio event loop in a thread of its own, and talk to the
packet loop in two directions only:

- packet loop → services: ``submit(coro)`` / ``call_soon(fn, ...)`` (thread-safe,
  they only queue work on the asyncio loop);
- services → packet loop: ``post(fn, ...)`` queues a call and writes one byte to a
  pipe the packet loop waits on (``wake_fd``); the packet loop runs the queued
  calls with ``run_posted()``, so the tracker is only ever touched from its own
  thread.

One ``Services`` per process, started only when something needs it (the bridge,
agents, route by DNS); without them kracauer has no second thread doing network
work.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
from typing import Any, Awaitable, Callable, Coroutine

__all__ = ["Services"]

log = logging.getLogger("kracauer.services")


class Services:
    """An asyncio loop in a thread, and a way back to the packet loop."""

    def __init__(self, name: str = "kracauer-services") -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._posted: collections.deque[tuple[Callable[..., Any], tuple]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending_wake = False
        self._lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread and its loop; returns once the loop runs."""
        if self._thread is not None:
            return
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                self._finish(loop)

        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what still runs (each task gets its cancellation), stop the loop, join the thread."""
        thread, loop = self._thread, self.loop
        if thread is None or loop is None:
            self._close_pipe()
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the services thread did not stop within %.0f s", timeout)
        self._thread = None
        self._close_pipe()

    @staticmethod
    def _finish(loop: asyncio.AbstractEventLoop) -> None:
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- packet loop → services ----------------------------------------------------

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Run `coro` on the services loop; the future is resolved from that thread."""
        if self.loop is None:
            coro.close()
            raise RuntimeError("the services thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.loop is None:
            raise RuntimeError("the services thread is not running")
        self.loop.call_soon_threadsafe(fn, *args)

    def run(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        """Run `coro` there and wait for its result here (set-up and shutdown only, never the loop)."""
        return self.submit(coro).result(timeout)  # type: ignore[arg-type]

    # -- services → packet loop ----------------------------------------------------

    @property
    def wake_fd(self) -> int:
        """Readable when `post` queued calls: the packet loop waits on it and calls `run_posted`."""
        return self._wake_r

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Have the packet loop call fn(*args) (from any thread); one wake-up per batch."""
        self._posted.append((fn, args))
        with self._lock:
            if self._pending_wake:
                return
            self._pending_wake = True
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the packet loop is already due to wake

    def run_posted(self) -> int:
        """The packet loop's side: drain the pipe and run what was posted, in order."""
        with self._lock:
            self._pending_wake = False
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        done = 0
        posted = self._posted
        while posted:
            fn, args = posted.popleft()
            try:
                fn(*args)
            except Exception:  # one failing callback must not stop the packet loop
                log.exception("a call posted by the services thread failed")
            done += 1
        return done
