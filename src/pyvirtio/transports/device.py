"""The device kit: what a virtio device written in Python provides, and what it gets.

A device states its id (VIRTIO 1.2 §5), its own feature bits (§6 reserves
bits 24–49 for the transport and the ring), its queues, its configuration
space and a request handler.  Everything that is the same for every device
is the kit's:

* the ring features the core implements — ``VERSION_1``,
  ``RING_EVENT_IDX`` (§2.7.10), ``RING_INDIRECT_DESC`` (§2.7.5.3),
  ``NOTIFY_ON_EMPTY``, ``RING_PACKED`` (§2.8) — are added to what the device offers, and every bit
  outside the device-specific ranges is masked (:func:`offered_features`),
  so a device can never have a feature accepted that the ring code does
  not do;
* popping, publishing the used ring in batches, the interrupt decision
  (§2.7.7, QEMU ``virtio_should_notify``) and the re-check after kicks are
  enabled again (§2.7.10) are done by :meth:`VirtQueue.run`, the kick
  handler, as QEMU's virtio-blk and virtio-net loops do;
* a request is answered either synchronously (:meth:`Device.handle`
  returns the used length) or later (it returns :data:`DEFERRED`, the device
  keeps the :class:`Request` and calls :meth:`Request.complete` from a timer
  or an fd callback of the process's :class:`~pyvirtio.io.loop.EventLoop`);
* a :class:`~pyvirtio.core.errors.PeerError` from the device or the ring
  breaks that queue only (§2.1.2 DEVICE_NEEDS_RESET, reported by the
  transport); completions made before are still published and signalled.

The kit is transport-neutral: the vhost-user back end builds one
:class:`VirtQueue` per started ring of a connection, an in-process harness
can build one over any :class:`~pyvirtio.core.queue.DeviceQueue` — a split
(§2.7) or a packed (§2.8) ring, the device cannot tell.
A device that moves millions of buffers a second overrides
:meth:`Device.process` and uses the core queue (:attr:`VirtQueue.ring`:
``pop_batch``/``fill``/``flush``) directly; the kit still decides on the
interrupt.  See docs/device-kit.md for a walk-through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Final, Protocol, runtime_checkable

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.queue import DeviceQueue
from pyvirtio.core.spec import (
    F_NOTIFY_ON_EMPTY,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
)
from pyvirtio.core.split_device import Element

if TYPE_CHECKING:
    from pyvirtio.io.loop import EventLoop

__all__ = [
    "DEFERRED",
    "DEVICE_FEATURE_MASK",
    "RING_FEATURES",
    "Deferred",
    "Device",
    "DeviceProtocol",
    "Request",
    "VirtQueue",
    "offered_features",
    "scatter",
]

log = logging.getLogger("pyvirtio.device")

#: Ring and transport features the core implements; the kit offers them for every device.
RING_FEATURES: Final = (1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX | 1 << F_RING_INDIRECT_DESC
                        | 1 << F_NOTIFY_ON_EMPTY | 1 << F_RING_PACKED)
#: Buckets of the batch-size histogram (VirtQueue.batches): 1, 2-3, 4-7, ... 32768-65535.
BATCH_BUCKETS: Final = 16
#: Bits a device may offer itself: 0–23 and 50–127 are device-specific (VIRTIO 1.2 §6).
DEVICE_FEATURE_MASK: Final = (1 << 24) - 1 | ((1 << 64) - 1) & ~((1 << 50) - 1)


def offered_features(device_features: int) -> int:
    """What the transport offers for a device listing ``device_features``."""
    return device_features & DEVICE_FEATURE_MASK | RING_FEATURES


class Deferred:
    """The type of :data:`DEFERRED`."""

    _instance: ClassVar[Deferred | None] = None

    def __new__(cls) -> Deferred:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFERRED"


#: Returned by :meth:`Device.handle`: the device keeps the request and completes it later.
DEFERRED: Final = Deferred()


class Request(Element):
    """One popped request: its buffers as views into guest memory, and its queue.

    ``readable`` views were filled by the driver; ``writable`` views are the
    only guest memory the device may write (already translated and
    bounds-checked by the core).
    """

    __slots__ = ("queue",)

    def __init__(self, queue: VirtQueue, elem: Element) -> None:
        super().__init__(elem.head, elem.readable, elem.writable)
        self.queue = queue

    def __repr__(self) -> str:
        return (f"Request(queue={self.queue.index}, head={self.head}, "
                f"readable={self.readable_len} B, writable={self.writable_len} B)")

    def read(self) -> bytes:
        """Every readable byte, in order."""
        return b"".join(self.readable)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the writable buffers from byte ``offset``; returns bytes written.

        What does not fit is cut off (the caller compares the result).
        """
        return scatter(self.writable, data, offset)

    def complete(self, length: int) -> None:
        """Return the request to the driver with ``length`` bytes written (§2.7.8)."""
        self.queue.complete(self, length)


def scatter(views: list[memoryview], data: bytes | bytearray | memoryview,
            offset: int = 0) -> int:
    """Copy ``data`` into ``views`` (in order) from byte ``offset``; returns bytes copied."""
    if offset < 0:
        raise CallerError(f"offset {offset} is negative")
    src = memoryview(data).cast("B")
    done = 0
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        n = min(len(view) - offset, len(src) - done)
        view[offset:offset + n] = src[done:done + n]
        done += n
        offset = 0
        if done == len(src):
            break
    return done


@runtime_checkable
class DeviceProtocol(Protocol):
    """What the kit needs of a device; :class:`Device` implements it with defaults."""

    # Read-only for the kit: properties let a device declare them as plain
    # (class) attributes of any int subtype (DeviceId.BLOCK, say).
    @property
    def device_id(self) -> int: ...
    @property
    def num_queues(self) -> int: ...
    @property
    def queue_size(self) -> int: ...
    @property
    def device_features(self) -> int: ...

    def attach(self, loop: EventLoop) -> None: ...
    def close(self) -> None: ...
    def get_config(self, offset: int, size: int) -> bytes: ...
    def set_config(self, offset: int, data: bytes) -> None: ...
    def set_features(self, features: int) -> None: ...
    def reset(self) -> None: ...
    def queue_ready(self, queue: VirtQueue) -> None: ...
    def queue_stopped(self, queue: VirtQueue) -> None: ...
    def process(self, queue: VirtQueue) -> None: ...


class Device:
    """Base class of a device: state ``device_id``, ``num_queues`` and :meth:`handle`.

    Every other member has a default.  Class attributes may be overridden per
    instance (``self.num_queues = n`` in ``__init__``).
    """

    #: The virtio device id (VIRTIO 1.2 §5; :class:`pyvirtio.core.spec.DeviceId`).
    device_id: int
    #: How many virtqueues (vhost-user GET_QUEUE_NUM).
    num_queues: int = 1
    #: The largest ring size accepted.
    queue_size: int = 1024
    #: The device's own feature bits; the kit adds the ring features.
    device_features: int = 0
    #: The configuration space the default :meth:`get_config` reads.
    config: bytes = b""
    #: Features the driver accepted (set by :meth:`set_features`).
    acked_features: int = 0
    #: The loop serving this device; set by :meth:`attach` before any other hook.
    loop: EventLoop

    def __repr__(self) -> str:
        return type(self).__name__

    def attach(self, loop: EventLoop) -> None:
        """The device is served on ``loop``; override to add fds and timers (call super)."""
        self.loop = loop

    def close(self) -> None:
        """The server stopped: release the device's own fds (its loop is going away)."""

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the configuration space from ``offset``; beyond it reads 0."""
        chunk = self.config[offset:offset + size] if offset >= 0 else b""
        return chunk + bytes(max(0, size) - len(chunk))

    def set_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space; ignored unless overridden."""
        log.debug("%s: ignoring a config write of %d bytes at %d", type(self).__name__,
                  len(data), offset)

    def set_features(self, features: int) -> None:
        """The features the driver accepted (ring bits included)."""
        self.acked_features = features

    def reset(self) -> None:
        """The front end went away or reset the device: forget per-connection state."""
        self.acked_features = 0

    def queue_ready(self, queue: VirtQueue) -> None:
        """``queue`` was started and enabled; the kit processes it right after this."""

    def queue_stopped(self, queue: VirtQueue) -> None:
        """``queue`` stopped (or the front end left): requests deferred from it are void."""

    def process(self, queue: VirtQueue) -> None:
        """Handle what ``queue`` holds (called on kicks); the default pops every request.

        Override it to take only what the device can use now (a receive
        queue waiting for frames), or to use the core queue's batched calls.
        """
        handle = self.handle
        while (req := queue.pop()) is not None:
            length = handle(queue, req)
            if not isinstance(length, Deferred):
                queue.complete(req, length)

    def handle(self, queue: VirtQueue, req: Request) -> int | Deferred:
        """Answer one request: return the used length, or :data:`DEFERRED`."""
        raise NotImplementedError(f"{type(self).__name__} must define handle() or process()")


Signal = Callable[[], None]
OnBroken = Callable[["VirtQueue", str], None]


class VirtQueue:
    """One started ring as the device sees it; the kit's publishing and notification logic.

    ``signal`` interrupts the driver (writes the call eventfd); ``on_broken``
    tells the transport that the ring broke (NEEDS_RESET, one log line).
    ``schedule`` runs a callback soon on the serving loop (for completions
    made outside a kick); without it they are published at once.
    """

    def __init__(self, index: int, ring: DeviceQueue, device: DeviceProtocol,
                 signal: Signal, *, on_broken: OnBroken | None = None,
                 schedule: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.index = index
        self.ring = ring
        self.device = device
        self._signal = signal
        self._on_broken = on_broken
        self._schedule = schedule
        #: Entries filled with :meth:`complete` and not yet published.
        self._filled = 0
        # Free-running counts, not used_idx: a packed ring's is a ring position.
        self._decided = ring.buffers_pushed
        self._dispatching = False
        self._publish_due = False
        self._run_due = False
        self.closed = False
        self._reported = False
        #: The kit turns kicks off while the device works and back on with the
        #: re-check after (§2.7.10).  False: never touch the suppression fields
        #: (a baseline that shows what suppression saves).
        self.notifications = True
        #: Turn kicks back on when a pass ends.  A receive queue sets it False:
        #: it wants kicks only when it runs out of buffers (:meth:`need_buffers`),
        #: as QEMU's virtio-net does (``virtio_net_has_buffers``).
        self.kicks_when_idle = True
        #: The transport polls this ring (``--poll``): every pass is one pass and
        #: kicks stay off, also for passes the device asks for (:meth:`kick`) and
        #: when it runs out of buffers (:meth:`need_buffers`) — the poller comes back.
        self.polled = False
        # Statistics (docs/stats.md): plain integers bumped as the kit works,
        # read by the stats layer on the loop's thread; the ring's own are on
        # the core queue (ring.buffers_popped, ...).
        #: Interrupts sent (signal calls) for this ring.
        self.interrupts = 0
        #: Kicks received: the driver's notifications, as the transport counted them.
        self.kicks = 0
        #: Interrupt decisions by the number of used entries they covered:
        #: bucket i counts batches of 2**i to 2**(i+1) - 1 entries.
        self.batches = [0] * BATCH_BUCKETS
        #: Used entries covered by those decisions (the histogram's sum).
        self.batched_entries = 0
        #: Errors by kind: the driver broke the ring; the device raised; a
        #: completion came for a ring that had stopped (dropped).
        self.errors_ring = 0
        self.errors_device = 0
        self.completions_dropped = 0

    def __repr__(self) -> str:
        return f"VirtQueue({self.index}, size={self.size}, ready={self.ready})"

    @property
    def size(self) -> int:
        return self.ring.num

    @property
    def ready(self) -> bool:
        """Open and not broken: requests can be popped and completed."""
        return not self.closed and self.ring.broken is None

    @property
    def broken(self) -> str | None:
        return self.ring.broken

    # ------------------------------------------------------------- device API
    def pop(self) -> Request | None:
        """The next request, or None when the driver has made none available."""
        elem = self.pop_element()
        return None if elem is None else Request(self, elem)

    def pop_element(self) -> Element | None:
        """:meth:`pop` without the :class:`Request` around it (hot paths); complete it
        with :meth:`complete` all the same."""
        ring = self.ring
        if self._filled:
            # Completions go out before the next pop: a pop that breaks the
            # ring must not strand them (the interrupt decision still waits
            # for the end of the pass).
            ring.flush(self._filled)
            self._filled = 0
        return ring.pop()

    def available(self) -> int:
        """Requests waiting to be popped (at least this many; 0 is exact)."""
        return self.ring.available()

    def complete(self, req: Request | Element, length: int) -> None:
        """Return ``req`` with ``length`` bytes written; published in a batch soon.

        A request of a queue that was stopped or broken since is dropped: the
        driver no longer waits for it on this ring.
        """
        if isinstance(req, Request) and req.queue is not self:
            raise CallerError(f"{req!r} belongs to another queue")
        if not self.ready:
            self.completions_dropped += 1
            return
        if not 0 <= length <= 0xFFFFFFFF:
            raise CallerError(f"used length {length} is not a 32-bit value")
        self.ring.fill(req.head, length, self._filled)
        self._filled += 1
        if not self._dispatching:
            self._publish_soon()

    def complete_many(self, done: Sequence[tuple[Element, int]]) -> None:
        """:meth:`complete` for each ``(element, used length)`` pair of ``done`` (elements of
        :meth:`pop_element`), with one readiness check: the batched devices' path."""
        if not self.ready:
            self.completions_dropped += len(done)
            return
        fill = self.ring.fill
        filled = self._filled
        try:
            for elem, length in done:
                if not 0 <= length <= 0xFFFFFFFF:
                    raise CallerError(f"used length {length} is not a 32-bit value")
                fill(elem.head, length, filled)
                filled += 1
        finally:
            self._filled = filled
        if not self._dispatching:
            self._publish_soon()

    @property
    def filled(self) -> int:
        """Used entries filled (:meth:`complete`) and not yet published."""
        return self._filled

    def add_filled(self, count: int) -> None:
        """``count`` more used entries were written after the :attr:`filled` ones by a
        batched writer (``pyvirtio.batch.DeviceBatch.fill``): publish them with the
        rest, soon — as :meth:`complete` does for one."""
        if not self.ready:
            self.completions_dropped += count
            return
        self._filled += count
        if not self._dispatching:
            self._publish_soon()

    def need_buffers(self) -> bool:
        """The device found no buffer: ask for the driver's next kick; True if one is there.

        Kicks are enabled, then the ring is read again (the re-check): a
        buffer made available meanwhile is reported rather than lost.
        """
        if self.notifications and not self.polled:
            return self.ring.enable_notification()
        return self.ring.available() > 0

    def kicked(self, count: int = 1) -> None:
        """The transport received ``count`` kicks for this ring (counted; traced when on)."""
        self.kicks += count
        if self.ring.trace is not None:
            self.ring.trace_kick()

    def kick(self) -> None:
        """Process this queue again soon, as if the driver had kicked it."""
        if self._schedule is None:
            self.run()
        elif not self._run_due:
            self._run_due = True
            self._schedule(self._scheduled_run)

    # --------------------------------------------------------------- the kit
    def _scheduled_run(self) -> None:
        self._run_due = False
        self.run()

    def _publish_soon(self) -> None:
        if self._schedule is None:
            self.publish()
        elif not self._publish_due:
            self._publish_due = True
            self._schedule(self._scheduled_publish)

    def _scheduled_publish(self) -> None:
        self._publish_due = False
        if self.ready:
            try:
                self.publish()
            except PeerError as exc:
                self.fail(str(exc))

    def publish(self) -> int:
        """Publish the filled entries and interrupt if the driver wants it; returns the count."""
        ring = self.ring
        n = self._filled
        if n:
            self._filled = 0
            ring.flush(n)
        used = ring.buffers_pushed
        if used != self._decided:
            # One interrupt decision per batch: the histogram costs a bit_length.
            batch = used - self._decided
            self.batches[min(batch.bit_length(), BATCH_BUCKETS) - 1] += 1
            self.batched_entries += batch
            self._decided = used
            if ring.should_notify():
                self.interrupts += 1
                self._signal()
        return n

    def run(self, poll: bool = False) -> int:
        """The kick handler: process until the ring is empty; returns entries published.

        Kicks are off while the device works (QEMU's virtio-blk loop turns
        them off on every pass, so work found by the re-check is processed
        without kicks too); then on again with the re-check (§2.7.10).  A
        device that took nothing (it waits for something else) ends the loop
        with kicks on.  ``poll``: one pass, kicks stay off.
        """
        if not self.ready:
            return 0
        poll = poll or self.polled
        ring = self.ring
        start = ring.buffers_pushed
        self._dispatching = True
        try:
            while True:
                if self.notifications:
                    ring.disable_notification()
                before = ring.last_avail_idx
                self.device.process(self)
                self.publish()
                if poll:
                    break
                # What the device has seen of avail.idx before the re-check below.
                seen = ring.shadow_avail_idx
                if self.notifications and self.kicks_when_idle:
                    more = ring.enable_notification()
                else:
                    more = ring.available() > 0
                if not more:
                    break
                if ring.last_avail_idx == before and ring.shadow_avail_idx == seen:
                    # The device saw these buffers and took none (it waits for
                    # something else): stop, or it would spin.  Buffers that only
                    # the re-check found must be offered to it: the driver may have
                    # read the avail_event just written and not kick for them.
                    break
        except PeerError as exc:
            self.fail(str(exc))
        except Exception as exc:  # a device bug must not take the other rings down
            log.exception("queue %d: device failed", self.index)
            self.fail(f"device failed: {exc!r}", by_device=True)
        finally:
            self._dispatching = False
        return ring.buffers_pushed - start

    def fail(self, reason: str, *, by_device: bool = False) -> None:
        """Break the ring (the device or the driver broke the rules) and tell the transport.

        ``by_device``: the device failed (counted apart from a driver's broken ring).

        Completions already filled are published and signalled unconditionally:
        the driver must learn of finished requests although no more will follow.
        """
        ring = self.ring
        if by_device:
            self.errors_device += 1
        else:
            self.errors_ring += 1
        if self._filled and ring.broken is None:
            ring.flush(self._filled)
        self._filled = 0
        ring.mark_broken(reason)
        if ring.buffers_pushed != self._decided:
            self._decided = ring.buffers_pushed
            self.interrupts += 1
            self._signal()
        if not self._reported:
            self._reported = True
            if self._on_broken is not None:
                self._on_broken(self, ring.broken or reason)

    def close(self) -> None:
        """The ring stopped: forget pending fills; later completions are dropped."""
        self.closed = True
        self._filled = 0
