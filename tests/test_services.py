"""kracauer.services: the asyncio thread beside the packet loop, and the way back to it."""

from __future__ import annotations

import asyncio
import select
import threading

import pytest

from kracauer.services import Services


@pytest.fixture
def services():
    s = Services()
    s.start()
    yield s
    s.stop()


def test_submit_runs_on_the_services_thread(services):
    async def where():
        await asyncio.sleep(0)
        return threading.current_thread().name

    assert services.run(where(), timeout=5) == "kracauer-services"
    assert threading.current_thread().name != "kracauer-services"


def test_post_wakes_the_packet_loop_and_runs_there_in_order(services):
    seen = []

    def note(i):
        seen.append((i, threading.current_thread().name))

    async def produce():
        for i in range(5):
            services.post(note, i)

    services.run(produce(), timeout=5)
    assert seen == []  # nothing runs until the packet loop says so
    poller = select.epoll()
    poller.register(services.wake_fd, select.EPOLLIN)
    assert poller.poll(5)
    assert services.run_posted() == 5
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {threading.current_thread().name}
    # Drained: not readable again until something is posted.
    assert poller.poll(0) == []
    poller.close()


def test_a_failing_posted_call_does_not_stop_the_rest(services):
    seen = []
    services.post(lambda: 1 / 0)
    services.post(seen.append, "after")
    assert services.run_posted() == 2
    assert seen == ["after"]


def test_stop_cancels_running_tasks():
    s = Services()
    s.start()
    cancelled = threading.Event()
    started = threading.Event()

    async def forever():
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    s.submit(forever())
    assert started.wait(5)
    s.stop(timeout=5)
    assert cancelled.is_set()
    assert not s.running


def test_submit_before_start_is_a_clear_error():
    s = Services()

    async def nothing():
        return None

    with pytest.raises(RuntimeError, match="not running"):
        s.submit(nothing())
    s.stop()
