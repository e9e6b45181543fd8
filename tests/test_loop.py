"""The event loop (pyvirtio.io.loop): readers, timers, soon and thread-safe calls, pollers."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import pytest

from pyvirtio.io.eventfd import EventFd
from pyvirtio.io.loop import EventLoop


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    yield lp
    lp.close()


def test_reader_fires_until_removed(loop: EventLoop) -> None:
    seen: list[int] = []
    with EventFd(nonblocking=True) as efd:
        loop.add_reader(efd.fd, lambda: seen.append(efd.drain()))
        efd.signal()
        efd.signal()
        loop.run_once(0.5)
        assert seen == [2]
        loop.remove_reader(efd.fd)
        efd.signal()
        loop.run_once(0)
        assert seen == [2]
        loop.remove_reader(efd.fd)  # unknown fds are ignored


def test_a_reader_replaced_in_the_same_round_is_not_called(loop: EventLoop) -> None:
    calls: list[str] = []
    a, b = EventFd(nonblocking=True), EventFd(nonblocking=True)
    try:
        def first() -> None:
            calls.append("a")
            a.drain()
            loop.remove_reader(b.fd)  # as a message that closes a kick fd does

        loop.add_reader(a.fd, first)
        loop.add_reader(b.fd, lambda: calls.append("b"))
        a.signal()
        b.signal()
        loop.run_once(0.5)
        assert calls in (["a"], ["b", "a"])
    finally:
        a.close()
        b.close()


def test_timers_in_order_and_cancel(loop: EventLoop) -> None:
    order: list[str] = []
    loop.call_later(0.02, lambda: order.append("late"))
    loop.call_later(0.0, lambda: order.append("now"))
    cancelled = loop.call_later(0.01, lambda: order.append("never"))
    cancelled.cancel()
    loop.call_soon(lambda: order.append("soon"))
    loop.call_later(0.05, loop.stop)
    loop.run()
    assert order == ["now", "soon", "late"]


def test_stop_and_call_soon_threadsafe_from_another_thread(loop: EventLoop) -> None:
    got: list[str] = []

    def other() -> None:
        loop.call_soon_threadsafe(lambda: got.append("from thread"))
        loop.stop()

    t = threading.Thread(target=other)
    loop.call_soon(t.start)
    loop.run()  # returns: stop() woke the selector
    t.join()
    loop.run_once(0)
    assert got == ["from thread"]


def test_pollers_spin_while_they_find_work_then_sleep(loop: EventLoop) -> None:
    work = [3]

    def poller() -> bool:
        if work[0]:
            work[0] -= 1
            return True
        return False

    loop.add_poller(poller)
    for _ in range(5):
        loop.run_once()
    assert work == [0]
    assert loop._timeout() in (0, loop.idle_sleep)
    loop.remove_poller(poller)
    assert loop._timeout() is None


def test_a_failing_callback_is_logged_and_the_loop_goes_on(
        loop: EventLoop, caplog: pytest.LogCaptureFixture) -> None:
    done: list[int] = []
    def broken() -> None:
        raise ZeroDivisionError("a device bug")

    loop.call_soon(broken)
    loop.call_soon(lambda: done.append(1))
    with caplog.at_level(logging.ERROR, "pyvirtio.loop"):
        loop.run_once(0)
    assert done == [1] and "failed" in caplog.text


def test_close_releases_its_fds() -> None:
    before = len(os.listdir("/proc/self/fd"))
    lp = EventLoop()
    lp.close()
    assert len(os.listdir("/proc/self/fd")) == before
