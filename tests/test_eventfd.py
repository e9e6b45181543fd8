"""EventFd: kicks (ioeventfd) and interrupts (irqfd) as eventfd counters.

QEMU docs/interop/vhost-user.rst, SET_VRING_KICK / SET_VRING_CALL pass these fds.
"""

from __future__ import annotations

import multiprocessing
import os
import select

import pytest

from pyvirtio.io.eventfd import EventFd


def test_signals_coalesce_into_one_read() -> None:
    with EventFd() as ev:
        ev.signal()
        ev.signal()
        ev.signal()
        assert ev.wait(timeout=1.0) == 3
        assert ev.drain() == 0


def test_drain_without_signal_is_zero_and_does_not_block() -> None:
    with EventFd() as ev:
        assert ev.drain() == 0
        ev.signal()
        assert ev.drain() == 1
        assert ev.drain() == 0


def test_wait_times_out_with_zero() -> None:
    with EventFd() as ev:
        assert ev.wait(timeout=0.01) == 0
        assert ev.wait(timeout=0) == 0


def test_nonblocking_and_fileno_is_pollable() -> None:
    with EventFd(nonblocking=True) as ev:
        assert ev.fileno() == ev.fd
        assert not select.select([ev], [], [], 0)[0]
        ev.signal()
        assert select.select([ev], [], [], 0)[0] == [ev]
        assert ev.wait(timeout=0) == 1


def test_wraps_an_existing_fd_and_close_is_idempotent() -> None:
    raw = os.eventfd(0, os.EFD_CLOEXEC)
    ev = EventFd(raw)
    assert ev.fd == raw
    os.eventfd_write(raw, 5)
    assert ev.drain() == 5
    ev.close()
    ev.close()
    with pytest.raises(OSError):
        os.fstat(raw)


def _child_signal(fd: int, times: int) -> None:
    child = EventFd(fd)
    for _ in range(times):
        child.signal()


@pytest.mark.timeout(30)
def test_signal_crosses_processes() -> None:
    ctx = multiprocessing.get_context("fork")
    with EventFd() as ev:
        proc = ctx.Process(target=_child_signal, args=(ev.fd, 4))
        proc.start()
        try:
            proc.join(20)
            assert proc.exitcode == 0
            assert ev.wait(timeout=5.0) == 4
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
