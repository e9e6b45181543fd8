"""One event loop per process: every socket, kick eventfd, device fd and timer.

A back end serves many rings, often for several devices or switch ports at
once; one thread per device would put the GIL between them and cost a
context switch per kick.  Instead one ``selectors`` (epoll) loop hosts
everything, as QEMU's main loop and libvhost-user's caller-owned loop do:

* :meth:`EventLoop.add_reader` — a callback when an fd becomes readable
  (listening sockets, vhost-user connections, kick eventfds, a TAP, a
  device's control socket);
* :meth:`EventLoop.call_later` / :meth:`EventLoop.call_soon` — timers and
  deferred work (a rate limiter's next period, publishing completions made
  outside a kick);
* :meth:`EventLoop.add_poller` — busy polling (VIRTIO 1.2 §2.7.10: a driver
  told not to kick): pollers run on every round, the loop spins while they
  find work and sleeps ``idle_sleep`` seconds between rounds once they have
  found none for ``spin_seconds``;
* :meth:`EventLoop.stop` and :meth:`EventLoop.call_soon_threadsafe` are safe
  from other threads and signal handlers (they write an eventfd the loop
  waits on).

A callback that raises is logged and the loop goes on: one device's bug
must not stop the others.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import time
from collections import deque
from collections.abc import Callable

from pyvirtio.io.eventfd import EventFd

__all__ = ["EventLoop", "Timer"]

log = logging.getLogger("pyvirtio.loop")

Callback = Callable[[], None]
Poller = Callable[[], bool]


class Timer:
    """A callback scheduled by :meth:`EventLoop.call_later`; :meth:`cancel` stops it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """A selectors-based loop; :meth:`run` runs it in the calling thread until :meth:`stop`."""

    def __init__(self, *, spin_seconds: float = 200e-6, idle_sleep: float = 1e-3) -> None:
        self.spin_seconds = spin_seconds
        self.idle_sleep = idle_sleep
        self._sel = selectors.DefaultSelector()
        self._readers: dict[int, Callback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._soon: deque[Callback] = deque()
        # Appended from other threads (deque.append is atomic), moved to _soon by the loop.
        self._foreign: deque[Callback] = deque()
        self._pollers: list[Poller] = []
        self._last_work = 0.0
        self._stopping = False
        self._running = False
        self._wake = EventFd(nonblocking=True)
        self._sel.register(self._wake.fd, selectors.EVENT_READ, self._wake.drain)

    @staticmethod
    def time() -> float:
        """The loop's clock (monotonic seconds): what :meth:`call_later` counts in."""
        return time.monotonic()

    # ------------------------------------------------------------- sources
    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (replaces an earlier one)."""
        if fd in self._readers:
            self._sel.modify(fd, selectors.EVENT_READ, callback)
        else:
            self._sel.register(fd, selectors.EVENT_READ, callback)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (call it before closing the fd; unknown fds are ignored)."""
        if self._readers.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(fd)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        """Run ``callback()`` once, ``delay`` seconds from now."""
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback()`` on the next round (from the loop's own thread)."""
        self._soon.append(callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run ``callback()`` on the next round; safe from any thread or signal handler."""
        self._foreign.append(callback)
        self.wake()

    def add_poller(self, poller: Poller) -> None:
        """Call ``poller()`` every round; it returns True when it found work."""
        self._pollers.append(poller)

    def remove_poller(self, poller: Poller) -> None:
        with contextlib.suppress(ValueError):
            self._pollers.remove(poller)

    def wake(self) -> None:
        """Make a waiting :meth:`run_once` return (thread- and signal-safe)."""
        with contextlib.suppress(OSError):
            self._wake.signal()

    # ----------------------------------------------------------------- run
    def _timeout(self) -> float | None:
        if self._soon or self._foreign:
            return 0
        timeout: float | None = None
        if self._pollers:
            spinning = time.monotonic() - self._last_work < self.spin_seconds
            timeout = 0 if spinning else self.idle_sleep
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if timers:
            left = max(0.0, timers[0][0] - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    def _call(self, callback: Callback) -> None:
        try:
            callback()
        except Exception:
            log.exception("event loop: callback %r failed", callback)

    def run_once(self, timeout: float | None = None) -> None:
        """Wait for events (at most ``timeout`` seconds, or as the loop decides) and run them."""
        wait = self._timeout()
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        for key, _events in self._sel.select(wait):
            if self._stopping:
                return
            # The callback registered *now*: an earlier callback of this round
            # may have replaced or removed it (a kick fd a message just closed).
            callback = self._readers.get(key.fd) if key.fd != self._wake.fd else key.data
            if callback is not None:
                self._call(callback)
        while self._foreign:
            self._soon.append(self._foreign.popleft())
        if self._timers:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _when, _seq, timer = heapq.heappop(self._timers)
                if not timer.cancelled:
                    self._call(timer.callback)
        for _ in range(len(self._soon)):
            self._call(self._soon.popleft())
        if self._pollers:
            work = False
            for poller in list(self._pollers):
                try:
                    work = poller() or work
                except Exception:
                    log.exception("event loop: poller %r failed", poller)
            if work:
                self._last_work = time.monotonic()

    def run(self) -> None:
        """Run until :meth:`stop`."""
        self._running = True
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self._running = False
            self._stopping = False

    def stop(self) -> None:
        """Make :meth:`run` return soon (thread- and signal-safe)."""
        self._stopping = True
        self.wake()

    @property
    def running(self) -> bool:
        return self._running

    def close(self) -> None:
        """Release the selector and the wake-up eventfd; the caller closed its own fds."""
        self._sel.close()
        self._wake.close()
        self._readers.clear()
        self._timers.clear()
        self._pollers.clear()
