"""Completions held back for a fixed time on the event loop: the null store's latency.

qemu-storage-daemon's ``null-co`` with ``latency-ns`` (QEMU block/null.c)
finishes each request on a timer of its event loop, without a thread; this
is the same for pyvirtio-blk ``--null --latency-us N`` on the asynchronous
engine.  The loop's own timers wait in ``epoll_wait``, which counts in
milliseconds; a ``timerfd`` (timerfd_create(2)) armed with an absolute
CLOCK_MONOTONIC deadline in nanoseconds keeps 100 µs a 100 µs.  With one
latency for all, deadlines come in the order requests arrive, so a FIFO is
the whole schedule: the timer is armed for the oldest, and when it fires
every request that is due is completed in one batch (one notification
decision, by the kit).  What one pass of the ring popped goes into the line
as one entry with one deadline (:meth:`DelayLine.add_batch`): at a deep
queue that is one timer arm, one histogram sample and one completion loop
per batch rather than per request.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import time
from collections import deque
from typing import TYPE_CHECKING

from pyvirtio.core.split_device import Element
from pyvirtio.devices.blk.engine import rerun
from pyvirtio.transports.device import VirtQueue
from pyvirtio.transports.histogram import LatencyHistogram

if TYPE_CHECKING:
    from pyvirtio.io.loop import EventLoop

__all__ = ["DelayLine"]

_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = 0o2000000
_TFD_NONBLOCK = 0o4000
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_timerfd_create = _libc.timerfd_create
_timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_timerfd_create.restype = ctypes.c_int
_timerfd_settime = _libc.timerfd_settime
_timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                             ctypes.c_void_p]
_timerfd_settime.restype = ctypes.c_int


class DelayLine:
    """Complete requests ``latency`` seconds after :meth:`add`, on the loop's thread."""

    def __init__(self, latency: float, histogram: LatencyHistogram | None = None) -> None:
        self.latency = latency
        #: Counts how long each request really waited (the timer fires late under load).
        self.histogram = histogram
        fd = _timerfd_create(_CLOCK_MONOTONIC, _TFD_CLOEXEC | _TFD_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self._pending: deque[tuple[float, VirtQueue, list[tuple[Element, int]]]] = deque()
        self._spec = _Itimerspec()
        self._spec_ref = ctypes.byref(self._spec)
        self._loop: EventLoop | None = None

    def attach(self, loop: EventLoop) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        self._loop = loop
        loop.add_reader(self.fd, self._fire)

    def add_batch(self, vq: VirtQueue, done: list[tuple[Element, int]]) -> None:
        """Return the ``(element, used length)`` pairs of ``done`` (already answered in guest
        memory), all ``latency`` seconds from now (the line keeps the list)."""
        if not done:
            return
        when = time.monotonic() + self.latency
        pending = self._pending
        pending.append((when, vq, done))
        if len(pending) == 1:
            self._arm(when)

    def _arm(self, when: float) -> None:
        sec = int(when)
        value = self._spec.it_value
        value.tv_sec = sec
        value.tv_nsec = max(1, int((when - sec) * 1e9))  # 0 would disarm the timer
        _timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, self._spec_ref, None)

    def _fire(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a re-arm may have cleared it
            os.read(self.fd, 8)
        pending = self._pending
        now = time.monotonic()
        touched: set[VirtQueue] = set()
        histogram = self.histogram
        while pending and pending[0][0] <= now:
            when, vq, done = pending.popleft()
            touched.add(vq)
            if histogram is not None:
                histogram.add(int((now - when + self.latency) * 1e9), len(done))
            vq.complete_many(done)
        if pending:
            self._arm(pending[0][0])
        rerun(touched)

    @property
    def held(self) -> int:
        """Requests waiting in the line."""
        return sum(len(done) for _w, _q, done in self._pending)

    def drain(self, vq: VirtQueue) -> list[tuple[Element, int]]:
        """Take every request of ``vq`` out of the line at once (its ring stopped)."""
        out = [pair for _w, q, done in self._pending if q is vq for pair in done]
        if out:
            self._pending = deque(p for p in self._pending if p[1] is not vq)
            if self._pending:
                self._arm(self._pending[0][0])
        return out

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._pending.clear()
