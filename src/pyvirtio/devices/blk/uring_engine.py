"""The io_uring engine: virtio-blk reads, writes and flushes in flight in the kernel.

``pyvirtio-blk --aio io_uring``, QEMU's ``aio=io_uring`` (block/io_uring.c)
for pyvirtio: the event loop puts each request that the page cache cannot
answer at once into an io_uring submission queue (io_uring_setup(2),
io_uring_enter(2)) and submits a whole pass of the device with one system
call; no thread of ours waits on the disk.  The binding is the PyPI package
``liburing`` (a wrapper of C liburing), pinned by the ``uring`` extra.

* IN and OUT (VIRTIO 1.2 §5.2.6) become ``IORING_OP_READV`` /
  ``IORING_OP_WRITEV`` on the store's descriptor, with iovecs that point at
  the request's buffers in guest memory: ``liburing.iovec`` takes the
  memoryviews' addresses, nothing is copied (the engine keeps the views
  until the completion, so the memory stays mapped).  With ``--cache none``
  a request goes to the O_DIRECT descriptor when its buffers are aligned,
  to the buffered one when its range is not (as
  :class:`~pyvirtio.devices.blk.file_store.FileStore` decides); one whose
  memory is not aligned is run on the loop by the store (bounced).
* FLUSH becomes ``IORING_OP_FSYNC`` with ``IORING_FSYNC_DATASYNC``
  (fdatasync).  §5.2.6.2 asks a FLUSH to make the writes *completed* before
  it stable.  A write is completed when its used entry is published, which
  this engine does only after the write's CQE arrived — its data is in the
  page cache or on the device by then — and the FLUSH's fsync is submitted
  after that, so it covers it.  Writes still in the ring when the FLUSH is
  submitted are not completed yet and need no covering, so the fsync is not
  ordered after them (no ``IOSQE_IO_DRAIN``): a FLUSH does not wait for
  writes that are still in flight.
* Everything else (GET_ID, DISCARD, WRITE_ZEROES, a bounced O_DIRECT
  request, a store without a descriptor) runs synchronously on the loop via
  :meth:`BlkDevice.execute <pyvirtio.devices.blk.device.BlkDevice.execute>`
  and is returned with the next batch.
* Completions: an eventfd registered with ``io_uring_register_eventfd``
  wakes the loop, which drains every CQE there is, writes each status byte
  and returns the batch through
  :class:`~pyvirtio.devices.blk.engine.AsyncEngine` (one notification
  decision per batch).  A negative result is ``VIRTIO_BLK_S_IOERR``; so is
  a short read (the file ended early: the rest of the buffer would be stale
  guest memory); a short write is submitted again for the rest, as
  ``pwritev`` callers do, and is IOERR when the kernel refuses the rest.

Where it pays: with ``--cache none`` every request reaches the device and
the kernel keeps them in flight at a fraction of the thread engine's CPU per
request.  On a page-cached image on a file system without asynchronous
buffered writes (ext4 here: ``RWF_NOWAIT`` writes are refused), io_uring
hands each write to its kernel worker pool, which runs the writes to one
file one at a time (they are hashed by inode, Linux io_uring
``io_prep_async_work``): there the thread engine writes faster.
"""

from __future__ import annotations

import errno
import logging
from time import perf_counter_ns
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pyvirtio.core.errors import PeerError
from pyvirtio.core.split_device import Element
from pyvirtio.devices.blk.engine import AsyncEngine
from pyvirtio.devices.blk.file_store import FileStore, _skip
from pyvirtio.devices.blk.request import parse_request
from pyvirtio.devices.blk.spec import SECTOR_SHIFT, ReqType, Status
from pyvirtio.transports.device import VirtQueue

if TYPE_CHECKING:
    from pyvirtio.devices.blk.device import BlkDevice

__all__ = ["DEFAULT_ENTRIES", "UringEngine", "UringUnavailable"]

log = logging.getLogger(__name__)

#: Submission queue entries (the completion queue gets twice as many).  More
#: requests than that may be in flight: submitted entries leave the queue, and
#: the kernel keeps completions that overflow (IORING_FEAT_NODROP, Linux 5.5).
DEFAULT_ENTRIES = 1024
#: include/uapi/linux/io_uring.h (the binding does not export it).
IORING_FSYNC_DATASYNC = 1

#: What the engine calls in the binding.
_USED = ("io_uring", "io_uring_cqe", "io_uring_queue_init", "io_uring_queue_exit",
         "io_uring_register_eventfd", "io_uring_get_sqe", "io_uring_prep_readv",
         "io_uring_prep_writev", "io_uring_prep_fsync", "io_uring_submit", "io_uring_peek_cqe",
         "io_uring_cq_advance", "iovec")

_READ, _WRITE, _FSYNC = 0, 1, 2
_IN = ReqType.IN
_OUT = ReqType.OUT
_FLUSH = ReqType.FLUSH
_OK = Status.OK
_IOERR = Status.IOERR


class UringUnavailable(RuntimeError):
    """io_uring cannot be used here: the binding is missing or the kernel refuses."""


def _binding() -> Any:
    # Imported when an engine is made: the binding is optional (pyvirtio[uring]).
    try:
        import liburing
    except ImportError as exc:
        raise UringUnavailable(
            f"--aio io_uring needs the liburing binding ({exc}): "
            "pip install 'pyvirtio[uring]'") from None
    return liburing


class _Op:
    """One request in the ring: what its completion needs (and the views it keeps alive)."""

    __slots__ = ("done", "elem", "fd", "iov", "kind", "nbytes", "offset", "started", "status",
                 "views", "vq")

    def __init__(self, kind: int, vq: VirtQueue, elem: Element, status: memoryview, fd: int,
                 offset: int, views: list[memoryview], nbytes: int, iov: Any) -> None:
        self.kind = kind
        self.vq = vq
        self.elem = elem
        self.status = status
        self.fd = fd
        self.offset = offset
        self.views = views
        self.nbytes = nbytes
        self.iov = iov
        self.done = 0
        self.started = perf_counter_ns()


class UringEngine(AsyncEngine):
    """Reads, writes and flushes of a :class:`FileStore` in flight in one io_uring."""

    def __init__(self, entries: int = DEFAULT_ENTRIES) -> None:
        lib = _binding()
        super().__init__()
        # Resolved once: the binding's module looks every attribute up lazily
        # (about 0.4 µs each, several per request).
        self._lib = SimpleNamespace(**{name: getattr(lib, name) for name in _USED})
        lib = self._lib
        self._ring = lib.io_uring()
        self._cqe = lib.io_uring_cqe()
        try:
            lib.io_uring_queue_init(entries, self._ring, 0)
        except OSError as exc:
            self._wake.close()
            raise UringUnavailable(
                f"the kernel refuses io_uring ({exc.strerror}; see "
                "/proc/sys/kernel/io_uring_disabled and seccomp): use --aio threads") from None
        try:
            lib.io_uring_register_eventfd(self._ring, self._wake.fd)
        except OSError as exc:
            lib.io_uring_queue_exit(self._ring)
            self._wake.close()
            raise UringUnavailable(f"io_uring_register_eventfd: {exc.strerror}; "
                                   "use --aio threads") from None
        self.entries = entries
        self._ops: dict[int, _Op] = {}
        self._tag = 0
        self._queued = 0      # SQEs prepared, not yet submitted
        self._ran_here = 0    # requests run synchronously since the last push
        self._open = True
        #: Requests put into the ring, and run synchronously on the loop (statistics, tests).
        self.in_ring = 0
        self.run_here = 0

    def __repr__(self) -> str:
        return f"io_uring({self.entries})"

    # ------------------------------------------------------------- submitting
    def start(self, device: BlkDevice, vq: VirtQueue, elem: Element) -> None:
        """Put ``elem`` in the ring (or run it now); :meth:`push` submits."""
        self._started(vq)
        store = device.store
        op = self._ring_op(store, vq, elem) if isinstance(store, FileStore) else None
        if op is not None:
            try:
                self._queue(op)
                return
            except (OSError, RuntimeError) as exc:  # the request is answered all the same
                log.warning("io_uring: cannot queue a request (%s); running it here", exc)
        self._run_here(device, vq, elem)

    def _ring_op(self, store: FileStore, vq: VirtQueue, elem: Element) -> _Op | None:
        """What the ring does for ``elem``, or None: it is run on the loop."""
        try:
            req = parse_request(elem)
        except PeerError:
            return None  # execute raises it again: the ring breaks
        rtype = req.type
        if rtype == _FLUSH:
            return (None if store.read_only else
                    _Op(_FSYNC, vq, elem, req.status, store.fd, 0, [], 0, None))
        if rtype > _OUT:
            return None
        nbytes = req.data_len
        sector = req.sector
        capacity = store.capacity
        if (not nbytes or nbytes & 511 or sector > capacity
                or nbytes >> 9 > capacity - sector or (rtype == _OUT and store.read_only)):
            return None  # answered at once by execute
        offset = sector << SECTOR_SHIFT
        views = req.data
        fd = store.fd
        if store.direct:
            fd, bounce = store._direct_path(offset, views, nbytes)
            if bounce is not None:  # unaligned guest memory: the store bounces it
                bounce.close()
                return None
        if len(views) > 1:
            views = [v for v in views if len(v)]  # an iovec has no empty entries
        try:
            iov = self._lib.iovec(views)
        except (OverflowError, ValueError):  # more buffers than IOV_MAX: execute answers
            return None
        return _Op(_READ if rtype == _IN else _WRITE, vq, elem, req.status, fd, offset,
                   views, nbytes, iov)

    def _queue(self, op: _Op) -> None:
        lib = self._lib
        ring = self._ring
        sqe = lib.io_uring_get_sqe(ring)
        if not sqe:  # the submission queue is full: hand it to the kernel first
            self._submit()
            sqe = lib.io_uring_get_sqe(ring)
            if not sqe:
                raise RuntimeError("io_uring: no submission entry after submitting")
        kind = op.kind
        if kind == _READ:
            lib.io_uring_prep_readv(sqe, op.fd, op.iov, op.offset)
        elif kind == _WRITE:
            lib.io_uring_prep_writev(sqe, op.fd, op.iov, len(op.iov), op.offset)
        else:
            lib.io_uring_prep_fsync(sqe, op.fd, IORING_FSYNC_DATASYNC)
        self._tag += 1
        sqe.user_data = self._tag  # never 0: the binding refuses 0
        self._ops[self._tag] = op
        self._queued += 1
        self.in_ring += 1

    def _run_here(self, device: BlkDevice, vq: VirtQueue, elem: Element) -> None:
        started = perf_counter_ns()
        result: int | BaseException
        try:
            result = device.execute(elem)
        except BaseException as exc:  # reported by _collect, which breaks the ring
            result = exc.with_traceback(None)
        self._done.append((vq, elem, result, started))
        self._ran_here += 1
        self.run_here += 1

    def _submit(self) -> None:
        retries = 0
        while self._queued:
            try:
                n = self._lib.io_uring_submit(self._ring)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBUSY) or retries == 3:
                    raise
                # The kernel wants completions reaped first (io_uring_enter(2)
                # EBUSY) or is short of memory for a moment: reap and try again.
                retries += 1
                self._gather_cqes()
                continue
            if n <= 0:
                raise RuntimeError("io_uring_submit took no entry")
            self._queued -= n

    def push(self) -> None:
        """Submit what this pass queued (one system call); wake the loop for what ran here."""
        if self._queued:
            self._submit()
        if self._ran_here:
            self._ran_here = 0
            self._wake.signal()

    # ------------------------------------------------------------ completions
    def _gather(self) -> None:
        self._gather_cqes()
        if self._queued:  # short writes submitted again
            self._submit()

    def _gather_cqes(self) -> None:
        lib = self._lib
        ring = self._ring
        cqe = self._cqe
        peek = lib.io_uring_peek_cqe
        seen = lib.io_uring_cq_advance
        ops = self._ops
        finish = self._finish
        while peek(ring, cqe) == 0:
            tag = cqe.user_data
            res = cqe.res
            seen(ring, 1)
            finish(ops.pop(tag), res)

    def _finish(self, op: _Op, res: int) -> None:
        kind = op.kind
        length = 1
        if res < 0:
            log.warning("%s at byte %d failed: errno %d",
                        ("read", "write", "fdatasync")[kind], op.offset, -res)
            status = _IOERR
        elif kind == _READ:
            length = res + 1
            # io_uring finishes short buffered reads itself: a short one ran
            # into the end of the file (it shrank), the rest would be stale.
            status = _OK if res == op.nbytes else _IOERR
        elif kind == _WRITE:
            done = op.done + res
            if done < op.nbytes and res > 0:
                # Short writes are legal; write the rest (same request, new entry).
                op.done = done
                op.iov = self._lib.iovec(_skip(op.views, done))
                op.offset += res
                try:
                    self._queue(op)
                    return
                except (OSError, RuntimeError) as exc:
                    log.warning("io_uring: cannot queue the rest of a short write: %s", exc)
            status = _OK if done == op.nbytes else _IOERR
        else:
            status = _OK
        op.status[0] = status
        self._done.append((op.vq, op.elem, length, op.started))

    def _wait(self) -> None:
        # The eventfd, not io_uring_wait_cqe: the binding keeps the GIL while it
        # blocks, and the loop's other threads must run meanwhile.
        self._wake.wait(1.0)

    def close(self) -> None:
        """Tear the ring down (what it still holds is cancelled) and release the eventfd."""
        if self._open:
            self._open = False
            self._lib.io_uring_queue_exit(self._ring)
            self._ops.clear()
            log.info("io_uring engine: %d requests went through the ring, %d ran on the loop",
                     self.in_ring, self.run_here)
        super().close()
