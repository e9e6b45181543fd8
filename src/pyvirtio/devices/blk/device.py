"""The virtio-blk device model, VIRTIO 1.2 §5.2, on the device kit.

A :class:`~pyvirtio.transports.device.Device`:

* device features (§5.2.3): ``SEG_MAX``, ``BLK_SIZE``, ``FLUSH``, ``MQ``
  when there is more than one queue, ``DISCARD`` and ``WRITE_ZEROES`` for a
  writable disk, ``RO`` for a read-only one (the kit adds the ring's);
* the configuration space (§5.2.4) as :class:`BlkConfig`;
* :meth:`BlkDevice.process` (the kick handler) takes the kit's fast path:
  :meth:`BlkDevice.process_queue` pops requests in batches from the core
  queue, executes each on the :class:`FileStore` and returns it with the used
  length set to the number of bytes written into the request's writable
  buffers (data + the status byte, §2.7.8), publishing each batch with one
  used-index move; the kit then decides on the interrupt.

With an ``engine`` (:class:`~pyvirtio.devices.blk.engine.ThreadEngine` or
:class:`~pyvirtio.devices.blk.uring_engine.UringEngine`)
:meth:`BlkDevice.process` takes the asynchronous path instead: every popped
request is first tried without blocking (``RWF_NOWAIT``: what the page cache
holds is answered at once, on the loop, at the speed of the synchronous
path) and otherwise handed to the engine — a worker, which runs
:meth:`BlkDevice.execute` (the same code), or the kernel's io_uring — while
the loop pops the next one.  Many requests are then in flight and complete
out of order; the kit publishes them in batches.
A FLUSH needs no barrier for that: a write is completed for the driver only
after its ``pwritev`` returned, so the ``fdatasync`` the FLUSH's worker
starts afterwards covers every write completed before it (§5.2.6.2).

QEMU's vhost-user-blk reads the config space from the back end (vhost-user
protocol feature ``CONFIG``, which the kit offers for every device).
"""

from __future__ import annotations

import logging
from time import perf_counter_ns
from typing import TYPE_CHECKING

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.queue import DeviceQueue
from pyvirtio.core.spec import DeviceId
from pyvirtio.core.split_device import Element
from pyvirtio.devices.blk.delay import DelayLine
from pyvirtio.devices.blk.engine import AsyncEngine
from pyvirtio.devices.blk.request import id_bytes, parse_request, parse_segments
from pyvirtio.devices.blk.spec import (
    CONFIG_SIZE,
    REQ_HEADER,
    REQ_HEADER_SIZE,
    SECTOR_SIZE,
    BlkConfig,
    BlkFeature,
    ReqType,
    Status,
)
from pyvirtio.devices.blk.store import Store
from pyvirtio.transports.device import Device, VirtQueue
from pyvirtio.transports.histogram import LatencyHistogram

if TYPE_CHECKING:
    from pyvirtio.io.loop import EventLoop

log = logging.getLogger(__name__)


DEFAULT_QUEUE_SIZE = 1024
SEG_MAX = 126  # fits a 128-entry ring without indirect descriptors (+ header + status)
MAX_DWZ_SECTORS = 0x3FFFFF  # 2 GiB - 512 per segment, like QEMU's request limit
MAX_DWZ_SEG = 16

_OK = Status.OK
_IOERR = Status.IOERR
_UNSUPP = Status.UNSUPP
_IN = ReqType.IN
_OUT = ReqType.OUT
_unpack_header = REQ_HEADER.unpack_from


class BlkStats:
    """The device's own statistics (``device_stats`` in docs/stats.md): the
    request latency histogram, from pop to used entry filled."""

    def __init__(self) -> None:
        self.latency = LatencyHistogram()

    def as_dict(self) -> dict[str, object]:
        return {"requests": self.latency.count, "latency": self.latency.as_dict()}


#: Requests the null store's delay line takes as one entry: one timer and one
#: completion pass per four requests, yet a deep queue's completions still come
#: back a few at a time, so the driver refills while the rest wait (a whole
#: ring's batch on one deadline makes a convoy: at QD32 the driver and the
#: device then take turns instead of overlapping, and IOPS fall by a third).
_DELAY_CHUNK = 4


class BlkDevice(Device):
    """A virtio-blk device on a :class:`Store` (a file, or the null store).

    ``engine``: None runs every request in the loop (the synchronous engine),
    an :class:`AsyncEngine` (threads or io_uring) keeps many in flight.
    """

    device_id = int(DeviceId.BLOCK)

    def __init__(self, store: Store, num_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, serial: str = "pyvirtio-blk",
                 batch: int = 0, engine: AsyncEngine | None = None) -> None:
        if not 1 <= num_queues <= 256:
            raise CallerError(f"num_queues {num_queues} must be in 1..256")
        if batch < 0:
            raise CallerError(f"batch {batch} must be 0 or more")
        self.store = store
        self.engine = engine
        self.stats = BlkStats()
        latency = self.stats.latency
        if engine is not None:
            engine.latency = latency
        #: The null store's latency on the asynchronous engine: a timer, not a worker.
        self._delay = (DelayLine(store.latency, latency)
                       if engine is not None and store.latency else None)
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.serial = serial
        self._id = id_bytes(serial)
        self.read_only = store.read_only
        writable = not self.read_only
        bits = [BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH]
        if num_queues > 1:
            bits.append(BlkFeature.MQ)
        if self.read_only:
            bits.append(BlkFeature.RO)
        else:
            bits += [BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES]
        self.device_features = sum(1 << b for b in bits)
        self.blk_config = BlkConfig(
            capacity=store.capacity,
            seg_max=SEG_MAX,
            blk_size=SECTOR_SIZE,
            num_queues=num_queues,
            max_discard_sectors=MAX_DWZ_SECTORS if writable else 0,
            max_discard_seg=MAX_DWZ_SEG if writable else 0,
            # Hole punching works in file-system blocks: advertise 4 KiB granularity.
            discard_sector_alignment=8 if writable else 0,
            max_write_zeroes_sectors=MAX_DWZ_SECTORS if writable else 0,
            max_write_zeroes_seg=MAX_DWZ_SEG if writable else 0,
            write_zeroes_may_unmap=1 if store.can_punch else 0,
        )
        self.config = self.blk_config.pack()
        self.completed = 0
        #: Requests one process_queue call completes at most (0: all available;
        #: else half of what is available, capped at ``batch``).  The back end
        #: publishes and interrupts after each call and calls again while the
        #: ring has work, so the driver refills the ring while the device works
        #: on the rest: a pipeline, not a lockstep.
        self.batch = batch

    def __repr__(self) -> str:
        return (f"BlkDevice({self.store.path}, {self.store.capacity} sectors"
                f"{', read-only' if self.read_only else ''}, {self.num_queues} queue(s))")

    # ------------------------------------------------------------ the kit
    def set_config(self, offset: int, data: bytes) -> None:
        # Only ``writeback`` is driver-writable, and only with CONFIG_WCE, which
        # we do not offer: ignore the write (the spec leaves it without effect).
        log.debug("ignoring config write of %d bytes at offset %d", len(data), offset)

    def attach(self, loop: EventLoop) -> None:
        super().attach(loop)
        if self.engine is not None:
            self.engine.attach(loop)
        if self._delay is not None:
            self._delay.attach(loop)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self._delay is not None:
            self._delay.close()

    def queue_stopped(self, queue: VirtQueue) -> None:
        """Finish what the asynchronous engine still holds of ``queue`` before it stops.

        A ring stops on GET_VRING_BASE (its reply gives ``last_avail_idx``,
        which counts the requests in flight as taken), on disable and on
        disconnect: a request left in flight would then never be answered.
        So the engine is drained (the loop blocks meanwhile) and the results
        published on the ring — still mapped, its call fd still open: the
        session closes them after this hook — before the reply leaves.
        """
        results: list[tuple[Element, int]] = []
        if self.engine is not None:
            results += self.engine.drain(queue)
        if self._delay is not None:
            results += self._delay.drain(queue)
        if not results or queue.broken is not None:
            return
        # complete() drops the requests of a closed ring; this once it must not.
        queue.closed = False
        try:
            for elem, length in results:
                queue.complete(elem, length)
            queue.publish()
        finally:
            queue.closed = True

    def process(self, queue: VirtQueue) -> None:
        if self.engine is None:
            self.process_queue(queue.index, queue.ring)
        else:
            self.process_async(queue, self.engine)

    def process_async(self, queue: VirtQueue, engine: AsyncEngine) -> None:
        """Answer what the page cache holds now, hand the rest to ``engine``.

        Everything available is popped: the engine, not the ring, bounds what
        is in flight.  Completions made here are published by the kit when
        this returns; the engine's come back through it in batches (io_uring
        submits the whole pass with one system call, at the end).
        """
        ring = queue.ring
        delay = self._delay
        # Answered here and now: one latency sample per batch (the delay line
        # measures its own, the engine each request it ran).
        latency = self.stats.latency if delay is None else None
        start = engine.start
        store = self.store
        while batch := ring.pop_batch(ring.num):
            t0 = perf_counter_ns()
            left = len(batch)
            # What this pass answers itself: completed (or handed to the delay
            # line) together at the end, also when a request raised midway.
            done: list[tuple[Element, int]] = []
            answered = done.append
            try:
                for elem in batch:
                    left -= 1
                    if delay is not None and len(done) >= _DELAY_CHUNK:
                        delay.add_batch(queue, done)
                        done = []
                        answered = done.append
                    readable = elem.readable
                    writable = elem.writable
                    if (len(readable) == 1 and len(writable) == 1
                            and len(readable[0]) >= REQ_HEADER_SIZE):
                        first = readable[0]
                        rtype, _reserved, sector = _unpack_header(first)
                        if rtype <= _OUT:
                            last = writable[0]
                            nbytes = (len(last) - 1 if rtype == _IN
                                      else len(first) - REQ_HEADER_SIZE)
                            if (nbytes and not nbytes & 511 and sector <= store.capacity
                                    and nbytes >> 9 <= store.capacity - sector):
                                if rtype == _IN:
                                    n = store.try_read(sector, [last[:nbytes]], nbytes)
                                    if n >= 0:
                                        last[nbytes] = _OK
                                        answered((elem, n + 1))
                                        continue
                                elif not self.read_only:
                                    n = store.try_write(sector, [first[REQ_HEADER_SIZE:]],
                                                        nbytes)
                                    if n >= 0:
                                        last[-1] = _OK
                                        answered((elem, 1))
                                        continue
                    elif (length := self._answer_now(elem)) >= 0:
                        # Another shape (a Linux guest's: header | data... | status).
                        answered((elem, length))
                        continue
                    start(self, queue, elem)
            except BaseException:
                if left:
                    ring.unpop(left)
                raise
            finally:
                engine.push()  # what the batch handed over must start, also after a raise
                if done:
                    if delay is None:
                        queue.complete_many(done)
                    else:
                        delay.add_batch(queue, done)
            if latency is not None and done:
                latency.add(perf_counter_ns() - t0, len(done))

    def _answer_now(self, elem: Element) -> int:
        """An IN or OUT request of any shape answered by the store without blocking
        (``try_read``/``try_write``): its used length, or -1 (the engine must run it)."""
        try:
            req = parse_request(elem)
        except PeerError:
            return -1  # the engine runs it, fails the same way and breaks the ring
        rtype = req.type
        if rtype > _OUT:
            return -1
        store = self.store
        nbytes = req.data_len
        sector = req.sector
        if (not nbytes or nbytes & 511 or sector > store.capacity
                or nbytes >> 9 > store.capacity - sector):
            return -1
        if rtype == _IN:
            n = store.try_read(sector, req.data, nbytes)
            if n < 0:
                return -1
            req.status[0] = _OK
            return n + 1
        if self.read_only or store.try_write(sector, req.data, nbytes) < 0:
            return -1
        req.status[0] = _OK
        return 1

    def process_queue(self, index: int, queue: DeviceQueue) -> int:
        """Execute waiting requests of the core ``queue``; returns how many were published.

        At most ``batch`` (or half of what waits) per call when ``batch`` is
        set: the caller interrupts and calls again, so the driver refills the
        ring while the device works.
        """
        pop_batch = queue.pop_batch
        fill = queue.fill
        execute = self.execute
        latency = self.stats.latency
        done = 0  # published by this call
        n = 0     # filled, not yet published
        t0 = 0    # when the batch being filled was popped

        def publish() -> None:
            nonlocal done, n
            if n:
                queue.flush(n)
                # The whole batch took as long as its last request: one sample, n times.
                latency.add(perf_counter_ns() - t0, n)
                self.completed += n
                done += n
                n = 0

        try:
            # pop_batch is repeated pop(): same elements, same errors at the same point.
            budget = 0x10000
            if self.batch:
                # Half of what waits (at most ``batch``): the driver gets the first
                # half back while the second is served, even at a low iodepth.
                # (available() fails exactly as the first pop would.)
                budget = min(self.batch, (queue.available() + 1) // 2 or 1)
            while done < budget and (batch := pop_batch(budget - done)):
                t0 = perf_counter_ns()
                left = len(batch)
                try:
                    for elem in batch:
                        left -= 1
                        try:
                            length = execute(elem)
                        except PeerError as exc:
                            # Publish what completed before the bad request, then break the queue.
                            publish()
                            raise queue.mark_broken(
                                f"virtio-blk queue {index}: {exc}") from None
                        fill(elem.head, length, n)
                        n += 1
                except BaseException:
                    # The scalar loop would not have popped the requests after this one.
                    if left:
                        queue.unpop(left)
                    raise
                # Publish each batch before popping the next: a pop that breaks
                # the queue must not strand requests that are already done.
                publish()
        finally:
            if queue.broken is None:
                publish()
        return done

    # ------------------------------------------------------------- requests
    def execute(self, elem: Element) -> int:
        """Run one request and write its status byte; returns the used length."""
        readable = elem.readable
        writable = elem.writable
        if len(readable) == 1 and len(writable) == 1 and len(readable[0]) >= REQ_HEADER_SIZE:
            # The common shape — header (+ OUT data) | (IN data +) status — handled
            # as parse_request + the IN/OUT path below would, without building
            # the request; other types and shapes take the general path.
            first = readable[0]
            rtype, _reserved, sector = _unpack_header(first)
            if rtype <= _OUT:
                last = writable[0]
                store = self.store
                nbytes = len(last) - 1 if rtype == _IN else len(first) - REQ_HEADER_SIZE
                if nbytes & 511 or sector > store.capacity or (
                        nbytes >> 9 > store.capacity - sector):
                    last[-1] = _IOERR
                    return 1
                if not nbytes:
                    last[-1] = _OK
                    return 1
                if rtype == _IN:
                    status, done = store.read(sector, [last[:nbytes]], nbytes)
                    last[nbytes] = status
                    return done + 1
                last[-1] = store.write(sector, [first[REQ_HEADER_SIZE:]], nbytes)
                return 1
        req = parse_request(elem)
        rtype = req.type
        store = self.store
        if rtype <= _OUT:  # IN (0) or OUT (1): the hot path; rtype is a u32
            nbytes = req.data_len
            sector = req.sector
            # rw_status inlined: whole sectors inside the disk.
            if nbytes & 511 or sector > store.capacity or (
                    nbytes >> 9 > store.capacity - sector):
                req.status[0] = _IOERR
                return 1
            if rtype == _IN:
                done = 0
                status = _OK
                if nbytes:
                    status, done = store.read(sector, req.data, nbytes)
                req.status[0] = status
                return done + 1
            req.status[0] = store.write(sector, req.data, nbytes) if nbytes else _OK
            return 1
        if rtype == ReqType.FLUSH:
            req.status[0] = store.flush()
            return 1
        if rtype == ReqType.GET_ID:
            n = 0
            for view in req.data:
                take = min(len(view), len(self._id) - n)
                view[:take] = self._id[n:n + take]
                n += take
                if n == len(self._id):
                    break
            req.status[0] = _OK
            return n + 1
        if rtype == ReqType.DISCARD or rtype == ReqType.WRITE_ZEROES:
            req.status[0] = self._dwz(req.type, parse_segments(
                req, MAX_DWZ_SEG, MAX_DWZ_SECTORS, store.capacity))
            return 1
        req.status[0] = _UNSUPP
        return 1

    def _dwz(self, rtype: int, segs: list[tuple[int, int, int]] | Status) -> Status:
        if isinstance(segs, Status):
            return segs
        if self.read_only:
            return _IOERR
        for sector, num, flags in segs:
            if rtype == ReqType.DISCARD:
                status = self.store.discard(sector, num)
            else:
                status = self.store.write_zeroes(sector, num, bool(flags & 1))
            if status != _OK:
                return status
        return _OK


__all__ = ["CONFIG_SIZE", "BlkDevice"]
