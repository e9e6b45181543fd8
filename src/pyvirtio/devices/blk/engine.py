"""The asynchronous engines' common part, and the thread engine.

Both engines (:class:`ThreadEngine` here, the io_uring engine in
:mod:`pyvirtio.devices.blk.uring_engine`) keep many virtio-blk requests in
flight and take their completions back on the event loop's thread in
batches.  :class:`AsyncEngine` is what they share: one eventfd that wakes
the loop, a deque of finished requests, the counters (in flight, per ring),
one latency sample per request, and :meth:`AsyncEngine._collect`, which
returns a whole batch with
:meth:`~pyvirtio.transports.device.VirtQueue.complete`: the device kit
publishes them together and decides on the interrupt once per batch
(VIRTIO 1.2 §2.7.7, QEMU ``virtio_should_notify``).  Completions are
published in the order they finish, not the order they were made available
(§2.7.8 allows that: the used ring names each head).

The thread engine: the event loop pops requests and hands each one that
cannot be answered at once (see :meth:`FileStore.try_read`) to a pool of
worker threads, as QEMU's ``aio=threads`` does (util/thread-pool.c).
``os.preadv``/``os.pwritev``/``os.fdatasync`` release the GIL, so workers
wait on the disk side by side while the loop keeps popping.  A worker runs
the request to the end (data and status byte in guest memory) and appends
its used length to the deque; the first completion of a batch writes the
eventfd.

A completion for a ring that stopped meanwhile (the front end went away) is
dropped by the kit: the driver no longer waits for it on that ring.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from time import perf_counter_ns
from typing import TYPE_CHECKING

from pyvirtio.core.errors import PeerError
from pyvirtio.core.split_device import Element
from pyvirtio.io.eventfd import EventFd
from pyvirtio.transports.device import VirtQueue
from pyvirtio.transports.histogram import LatencyHistogram

if TYPE_CHECKING:
    from pyvirtio.devices.blk.device import BlkDevice
    from pyvirtio.io.loop import EventLoop

__all__ = ["DEFAULT_WORKERS", "AsyncEngine", "ThreadEngine"]

log = logging.getLogger(__name__)

#: QEMU's thread pool allows 64 workers (util/thread-pool.c ``max_threads``).
DEFAULT_WORKERS = 64

#: A job, its queue, its element and when it was submitted (perf_counter_ns).
Job = tuple[Callable[[], int], VirtQueue, Element, int]
#: A finished request: its queue, its element, its used length or what it raised, its start.
Done = tuple[VirtQueue, Element, "int | BaseException", int]


def rerun(queues: set[VirtQueue]) -> None:
    """Process again the rings that have requests waiting after completions freed heads.

    A pass stops popping when every head is in flight (the ring is full); the
    driver's kick for what it added meanwhile was consumed by that pass, so
    nothing else would pick those requests up.
    """
    for vq in queues:
        if vq.ready and vq.ring.available():
            vq.kick()


class AsyncEngine:
    """Requests in flight, their completions taken back on the loop's thread in batches.

    A subclass starts requests (counting each with :meth:`_started`), puts
    what finished into ``_done`` and writes ``_wake``; it says how finished
    requests are gathered (:meth:`_gather`) and how to wait for the next
    (:meth:`_wait`).
    """

    def __init__(self) -> None:
        self._done: deque[Done] = deque()
        self._wake = EventFd(nonblocking=True)
        self._loop: EventLoop | None = None
        #: Requests submitted and not yet returned to the loop (for statistics and tests).
        self.in_flight = 0
        self._per_queue: dict[VirtQueue, int] = {}
        self.submitted = 0
        #: Where the latency of each request (submit to completion taken) is counted, if anywhere.
        self.latency: LatencyHistogram | None = None

    def attach(self, loop: EventLoop) -> None:
        """Take completions on ``loop``."""
        if self._loop is loop:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._wake.fd)
        self._loop = loop
        loop.add_reader(self._wake.fd, self._collect)

    def start(self, device: BlkDevice, vq: VirtQueue, elem: Element) -> None:
        """Take ``elem`` of ``device`` (popped from ``vq``) in flight; done when returned."""
        raise NotImplementedError

    def push(self) -> None:
        """Start what was queued during a pass of the device (nothing to do for threads)."""

    def _started(self, vq: VirtQueue) -> None:
        self.in_flight += 1
        self.submitted += 1
        self._per_queue[vq] = self._per_queue.get(vq, 0) + 1

    def _returned(self, vq: VirtQueue) -> None:
        self.in_flight -= 1
        left = self._per_queue[vq] - 1
        if left:
            self._per_queue[vq] = left
        else:
            del self._per_queue[vq]

    def _gather(self) -> None:
        """Bring what finished into ``_done`` (called after the eventfd was drained)."""

    def _wait(self) -> None:
        """Block until more requests may have finished (at most about a second)."""
        self._wake.wait(1.0)

    # ------------------------------------------------------------------ loop
    def _collect(self) -> None:
        # Drain first, then gather: a completion that writes the eventfd in
        # between has its write drained but is itself taken below; gathered the
        # other way round, it would wait for a write that never comes.
        self._wake.drain()
        self._gather()
        done = self._done
        touched: set[VirtQueue] = set()
        latency = self.latency
        now = perf_counter_ns()
        while done:
            vq, elem, result, started = done.popleft()
            self._returned(vq)
            if latency is not None:
                latency.add(now - started)
            touched.add(vq)
            # Not re-raised: a raised exception's traceback would tie this frame
            # (and the request's views) into a cycle only the GC breaks.
            if isinstance(result, BaseException):
                if vq.ready:
                    if isinstance(result, PeerError):
                        vq.fail(str(result))
                    else:  # a bug must not strand the rest of the batch
                        log.error("queue %d: request failed: %r", vq.index, result)
                        vq.fail(f"device failed: {result!r}")
                continue
            try:
                vq.complete(elem, result)
            except PeerError as exc:
                if vq.ready:
                    vq.fail(str(exc))
            except Exception as exc:  # a bug must not strand the rest of the batch
                if vq.ready:
                    log.error("queue %d: request failed: %r", vq.index, exc)
                    vq.fail(f"device failed: {exc!r}")
        rerun(touched)

    def drain(self, vq: VirtQueue) -> list[tuple[Element, int]]:
        """Wait for every request of ``vq`` in flight; returns (element, used length) of each.

        Blocks the loop, as QEMU drains a block device before it stops a
        ring (``bdrv_drain``): the ring stopped, and the front end was told a
        ``last_avail_idx`` that counts these requests as taken.  Completions of
        other rings that arrive meanwhile are left for :meth:`_collect`.
        """
        out: list[tuple[Element, int]] = []
        done = self._done
        while True:
            self._gather()
            keep: list[Done] = []
            while done:
                item = done.popleft()
                if item[0] is not vq:
                    keep.append(item)
                    continue
                self._returned(vq)
                if isinstance(item[2], int):
                    out.append((item[1], item[2]))
            done.extend(keep)
            if not self._per_queue.get(vq, 0):
                break
            self._wait()
        if done:  # other rings' completions: the loop takes them when it runs again
            self._wake.signal()
        return out

    def close(self) -> None:
        """Release the eventfd (a subclass stops what runs first)."""
        if self._loop is not None:
            self._loop.remove_reader(self._wake.fd)
            self._loop = None
        self._wake.close()


class ThreadEngine(AsyncEngine):
    """``workers`` threads run submitted jobs; completions come back on the loop's thread."""

    def __init__(self, workers: int = DEFAULT_WORKERS) -> None:
        if workers < 1:
            raise ValueError(f"a thread engine needs at least one worker, not {workers}")
        super().__init__()
        self.workers = workers
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # True from a worker's eventfd write until the loop takes the batch.
        self._signalled = False
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"threads({self.workers})"

    def start(self, device: BlkDevice, vq: VirtQueue, elem: Element) -> None:
        self.submit(partial(device.execute, elem), vq, elem)

    def submit(self, job: Callable[[], int], vq: VirtQueue, elem: Element) -> None:
        """Run ``job`` (it answers ``elem`` in guest memory, returns the used length)."""
        self._started(vq)
        threads = self._threads
        if self.in_flight > len(threads) and len(threads) < self.workers:
            # Workers are started as the depth asks for them (QEMU's thread pool
            # spawns on demand too): a page-cached or idle disk keeps none.
            t = threading.Thread(target=self._work, name=f"blk-io-{len(threads)}", daemon=True)
            t.start()
            threads.append(t)
        self._jobs.put((job, vq, elem, perf_counter_ns()))

    # --------------------------------------------------------------- workers
    def _work(self) -> None:
        get = self._jobs.get
        done = self._done
        while (item := get()) is not None:
            job, vq, elem, started = item
            result: int | BaseException
            try:
                result = job()
            except BaseException as exc:  # reported on the loop, which breaks the ring
                # Without its traceback: the frames in it hold the request's views.
                result = exc.with_traceback(None)
            done.append((vq, elem, result, started))
            # One eventfd write per batch: the loop clears the flag (after
            # draining the eventfd) before it takes the batch, so a completion
            # appended after that writes again.
            if not self._signalled:
                self._signalled = True
                self._wake.signal()
            # Hold nothing of this request while waiting for the next: its views
            # (and an exception's traceback) keep the guest memory mapped, and a
            # front end that left must get its memory unmapped now.
            del item, job, vq, elem, result

    def _gather(self) -> None:
        # The workers appended already; what they append from now on signals again.
        self._signalled = False

    def close(self) -> None:
        """Stop the workers (after the jobs queued before) and release the eventfd."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(5)
        self._threads.clear()
        super().close()
