"""Inflight I/O tracking for split rings (vhost-user protocol feature INFLIGHT_SHMFD).

Implements QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking" and the
"Inflight description" payload, split virtqueue only (packed rings are
refused by the session):

* the shared buffer holds one region per queue, each a ``QueueRegionSplit``
  header (``features`` u64, ``version`` u16, ``desc_num`` u16,
  ``last_batch_head`` u16, ``used_idx`` u16: 16 bytes) followed by
  ``desc_num`` ``DescStateSplit`` entries (``inflight`` u8, 5 bytes of
  padding, ``next`` u16, ``counter`` u64: 16 bytes each); regions start on
  64-byte boundaries (the layout libvhost-user's ``vu_inflight_queue_size``
  gives, so a buffer allocated by either back end reads the same);
* when a head is taken from the available ring its ``counter`` is set from
  the queue's global counter and then ``inflight`` to 1
  (:meth:`QueueRegion.get` / ``get_all``, before the device sees the request);
* when used entries are supplied, each head is linked into the last-batch
  list (``next`` = ``last_batch_head``, ``last_batch_head`` = head), the used
  ring's ``idx`` is moved, then every ``inflight`` of the batch is cleared and
  ``used_idx`` set to the used ring's ``idx`` (:meth:`QueueRegion.pre_put_all`,
  which stores ``last_batch_head`` once after the batch's ``next`` links —
  it is only read after the used ``idx`` moved —, and
  :meth:`QueueRegion.post_put`);
* on reconnect, a region whose ``used_idx`` differs from the used ring's
  ``idx`` was interrupted after the batch was published: the batch (as many
  entries of the last-batch list as the two indices differ) is cleared and
  ``used_idx`` caught up; then every entry still in flight is resubmitted in
  the order of its ``counter`` — the order the driver made them available
  (:meth:`QueueRegion.recover`, as libvhost-user's
  ``vu_check_queue_inflights``).

:class:`InflightSplitQueue` is a :class:`~pyvirtio.core.split_device.SplitDeviceQueue`
that keeps its region up to date in every call a device pops or completes
with (``pop``, ``pop_batch``, ``fill``/``flush``, ``push``, ``unpop``), and
after :meth:`InflightSplitQueue.recover` hands the resubmitted heads out
before anything newly available (libvhost-user's ``vu_queue_pop`` takes its
resubmit list first the same way).  The session builds it instead of the
plain queue only when the front end gave a region, so a ring without
inflight tracking pays nothing.  Every device of the kit gets it, the fast
ones (blk, net) included: they pop and complete through these calls.

The region is shared with the front end, which keeps it across back-end
restarts; its contents are read back after a crash, so they are hostile
input like the rings: indices are bounded by the ring size, list walks by
the batch size.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections import deque
from typing import Final

from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError
from pyvirtio.core.layout import RingViews
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.ring_stats import RingCounters
from pyvirtio.core.spec import MAX_QUEUE_SIZE
from pyvirtio.core.split_device import Element, SplitDeviceQueue

__all__ = ["DESC_STATE", "INFLIGHT_ALIGN", "INFLIGHT_VERSION", "QUEUE_HEADER",
           "InflightRegion", "InflightSplitQueue", "QueueRegion", "queue_region_size"]

#: ``QueueRegionSplit`` without its array: features, version, desc_num, last_batch_head, used_idx.
QUEUE_HEADER: Final = struct.Struct("<QHHHH")
#: ``DescStateSplit``: inflight, padding[5], next, counter.
DESC_STATE: Final = struct.Struct("<B5xHQ")
#: Each queue's region starts on a cache line (libvhost-user's INFLIGHT_ALIGNMENT).
INFLIGHT_ALIGN: Final = 64
#: "The version of this region. It's 1 currently. Zero value indicates an uninitialized buffer".
INFLIGHT_VERSION: Final = 1

# Positions in the region's u16 / u64 / byte views (header 16 bytes, entries 16 bytes).
_H_VERSION = 4
_H_DESC_NUM = 5
_H_LAST_BATCH = 6
_H_USED_IDX = 7

#: The seals a region must carry: a front end that could shrink the file would
#: turn our stores into SIGBUS (libvhost-user seals its memfd the same way).
_SEALS: Final = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL

# Marks a resubmitted head in InflightSplitQueue's unpop record (heads are < 2**15).
_RESUBMITTED: Final = 1 << 16


def queue_region_size(queue_size: int) -> int:
    """Bytes one queue's region takes in the buffer (header + entries, 64-byte aligned)."""
    raw = QUEUE_HEADER.size + DESC_STATE.size * queue_size
    return -(-raw // INFLIGHT_ALIGN) * INFLIGHT_ALIGN


class QueueRegion:
    """One queue's ``QueueRegionSplit``, over ``view`` (shared memory)."""

    def __init__(self, view: memoryview, desc_num: int) -> None:
        if len(view) < QUEUE_HEADER.size + DESC_STATE.size * desc_num:
            raise CallerError(f"{len(view)} bytes cannot hold {desc_num} descriptor states")
        size = QUEUE_HEADER.size + DESC_STATE.size * desc_num
        self._view = view[:size]
        self._b = self._view.cast("B")
        self._h = self._view.cast("H")
        self._q = self._view.cast("Q")
        #: Entries of the array (the ring size the buffer was made for): the only
        #: bound used; the header's copy is the front end's to overwrite.
        self.desc_num = desc_num
        #: The global counter of vhost-user.rst (in our memory only).
        self.counter = 0

    def release(self) -> None:
        """Drop the views (the mapping is going away); later use raises ValueError."""
        for v in (self._b, self._h, self._q, self._view):
            v.release()

    # --------------------------------------------------------------- header
    @property
    def features(self) -> int:
        return int(self._q[0])

    @property
    def version(self) -> int:
        return int(self._h[_H_VERSION])

    @property
    def last_batch_head(self) -> int:
        return int(self._h[_H_LAST_BATCH])

    @property
    def used_idx(self) -> int:
        return int(self._h[_H_USED_IDX])

    def init_header(self) -> None:
        """SET_INFLIGHT_FD: record the array size (as libvhost-user's ``vu_set_inflight_fd``)."""
        self._h[_H_DESC_NUM] = self.desc_num

    # -------------------------------------------------------------- entries
    def inflight(self, head: int) -> int:
        return int(self._b[QUEUE_HEADER.size + DESC_STATE.size * head])

    def next(self, head: int) -> int:
        return int(self._h[8 + 8 * head + 3])

    def counter_of(self, head: int) -> int:
        return int(self._q[2 + 2 * head + 1])

    def in_flight(self) -> list[int]:
        """Heads marked in flight, by descriptor index."""
        b = self._b
        base = QUEUE_HEADER.size
        step = DESC_STATE.size
        return [i for i in range(self.desc_num) if b[base + step * i]]

    # ------------------------------------------------------------ the steps
    def get(self, head: int) -> None:
        """A head was taken from the available ring: ``counter``, then ``inflight`` = 1."""
        self._q[2 + 2 * head + 1] = self.counter
        self.counter += 1
        self._b[QUEUE_HEADER.size + DESC_STATE.size * head] = 1

    def get_all(self, heads: list[int]) -> None:
        """:meth:`get` for each of ``heads``, in order (one call per batch popped)."""
        b = self._b
        q = self._q
        c = self.counter
        for head in heads:
            q[3 + 2 * head] = c
            c += 1
            b[16 + 16 * head] = 1
        self.counter = c

    def unget(self, head: int) -> None:
        """Undo :meth:`get` (the head went back to the available ring unprocessed)."""
        self._b[QUEUE_HEADER.size + DESC_STATE.size * head] = 0
        self.counter -= 1

    def pre_put(self, head: int) -> None:
        """Link ``head`` into the last-batch list (before the used ring's idx moves)."""
        h = self._h
        h[8 + 8 * head + 3] = h[_H_LAST_BATCH]
        h[_H_LAST_BATCH] = head

    def pre_put_all(self, heads: list[int]) -> None:
        """:meth:`pre_put` for each of ``heads``, in order.

        ``last_batch_head`` is stored once, after every ``next`` of the batch:
        it is read back only once the used ring's idx has moved, which comes
        after this.
        """
        h = self._h
        last = h[_H_LAST_BATCH]
        for head in heads:
            h[11 + 8 * head] = last
            last = head
        h[_H_LAST_BATCH] = last

    def post_put(self, heads: list[int], used_idx: int) -> None:
        """The batch is published (used.idx = ``used_idx``): clear it, then record the index."""
        b = self._b
        base = QUEUE_HEADER.size
        step = DESC_STATE.size
        for head in heads:
            b[base + step * head] = 0
        self._h[_H_USED_IDX] = used_idx

    def recover(self, used_ring_idx: int) -> list[int]:
        """The heads to resubmit, oldest first, after the back end (re)starts the ring.

        ``used_ring_idx`` is the used ring's ``idx`` now.  An uninitialized
        region (version 0) is initialized and has nothing in flight.
        """
        h = self._h
        if h[_H_VERSION] == 0:
            # Fresh buffer: start the bookkeeping at the ring's current position
            # (libvhost-user leaves used_idx at 0, which a crash before the first
            # completion would misread as a published batch).
            h[_H_USED_IDX] = used_ring_idx
            h[_H_VERSION] = INFLIGHT_VERSION
            self.counter = 0
            return []
        if h[_H_VERSION] != INFLIGHT_VERSION:
            raise PeerError(f"inflight region version {h[_H_VERSION]} (only "
                            f"{INFLIGHT_VERSION} is known)")
        if h[_H_USED_IDX] != used_ring_idx:
            # The batch was published before the crash but not yet cleared.
            batch = (used_ring_idx - h[_H_USED_IDX]) & 0xFFFF
            if batch > self.desc_num:
                raise PeerError(f"inflight region: used_idx {h[_H_USED_IDX]} is {batch} entries "
                                f"behind the used ring's {used_ring_idx}, more than the "
                                f"{self.desc_num} a batch can hold")
            head = h[_H_LAST_BATCH]
            b = self._b
            for _ in range(batch):
                if head >= self.desc_num:
                    raise PeerError(f"inflight region: last-batch list names head {head} "
                                    f"of {self.desc_num}")
                b[QUEUE_HEADER.size + DESC_STATE.size * head] = 0
                head = h[8 + 8 * head + 3]
            h[_H_USED_IDX] = used_ring_idx
        heads = self.in_flight()
        heads.sort(key=self.counter_of)
        self.counter = self.counter_of(heads[-1]) + 1 if heads else 0
        return heads


class InflightRegion:
    """The whole inflight buffer: ``num_queues`` regions for rings of ``queue_size``, mapped.

    :meth:`create` allocates one (GET_INFLIGHT_FD), :meth:`map` maps the one a
    front end gives (SET_INFLIGHT_FD).  The object owns ``fd`` and the mapping.
    """

    def __init__(self, fd: int, mm: mmap.mmap, num_queues: int, queue_size: int,
                 mmap_size: int, mmap_offset: int) -> None:
        self.fd = fd
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset
        self._mm = mm
        self._view = memoryview(mm)
        stride = queue_region_size(queue_size)
        self.queues = [QueueRegion(self._view[i * stride:(i + 1) * stride], queue_size)
                       for i in range(num_queues)]

    @staticmethod
    def size_for(num_queues: int, queue_size: int) -> int:
        return num_queues * queue_region_size(queue_size)

    @staticmethod
    def check_geometry(num_queues: int, queue_size: int, max_queues: int) -> None:
        """PeerError unless ``num_queues`` (1..``max_queues``) rings of ``queue_size`` fit."""
        if not 1 <= num_queues <= max_queues:
            raise PeerError(f"inflight buffer for {num_queues} queues (1..{max_queues})")
        if not 0 < queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise PeerError(f"inflight buffer for rings of {queue_size} (a power of two "
                            f"in 1..{MAX_QUEUE_SIZE})")

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightRegion:
        """A zeroed buffer in a sealed memfd (it cannot grow or shrink under us)."""
        size = cls.size_for(num_queues, queue_size)
        fd = os.memfd_create("pyvirtio-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mm, num_queues, queue_size, size, 0)

    @classmethod
    def map(cls, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
            queue_size: int) -> InflightRegion:
        """Map a front end's buffer; PeerError (and nothing mapped) if it is not usable.

        The file must be sealed against shrinking and hold ``mmap_offset`` +
        the regions; only the regions' bytes are mapped, so no store can land
        outside the file.  Takes ownership of ``fd`` on success only.
        """
        need = cls.size_for(num_queues, queue_size)
        if mmap_size < need:
            raise PeerError(f"inflight buffer of {mmap_size} bytes, {need} needed for "
                            f"{num_queues} queues of {queue_size}")
        if mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise PeerError(f"inflight mmap offset {mmap_offset:#x} is not page aligned")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise PeerError("inflight fd is not a memfd sealed against shrinking")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise PeerError(f"inflight fd unusable: {exc}") from None
        if mmap_offset + mmap_size > st.st_size:
            raise PeerError(f"inflight buffer {mmap_offset:#x}+{mmap_size:#x} beyond the "
                            f"{st.st_size:#x}-byte file")
        try:
            mm = mmap.mmap(fd, need, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=mmap_offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise PeerError(f"inflight buffer cannot be mapped: {exc}") from None
        region = cls(fd, mm, num_queues, queue_size, mmap_size, mmap_offset)
        for q in region.queues:
            q.init_header()
        return region

    def close(self) -> None:
        """Unmap and close the fd (idempotent)."""
        for q in self.queues:
            with contextlib.suppress(ValueError):
                q.release()
        self._view.release()
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class InflightSplitQueue(SplitDeviceQueue):
    """A split ring whose pops and completions are tracked in an inflight region.

    Same API and results as :class:`SplitDeviceQueue`; in addition the heads
    found in flight by :meth:`recover` are popped first, in the order they
    were made available.  The per-request calls are not overridden (``fill``)
    or cost one list entry (pops): the region is written once per batch.
    """

    def __init__(self, rings: RingViews, memory: GuestMemory, features: int,
                 region: QueueRegion) -> None:
        super().__init__(rings, memory, features)
        if rings.num > region.desc_num:
            raise PeerError(f"ring of {rings.num} entries, inflight region for "
                            f"{region.desc_num}")
        self.region = region
        #: Heads to hand out again, oldest first.
        self.resubmit: deque[int] = deque()
        # Heads popped lately, newest last (for unpop); resubmitted ones | _RESUBMITTED.
        self._recent: list[int] = []
        self._batching = False

    def carry_counters(self, old: RingCounters) -> None:
        super().carry_counters(old)
        if isinstance(old, InflightSplitQueue) and old.region is self.region:
            self.resubmit = old.resubmit
            self._recent = old._recent

    def set_state(self, last_avail_idx: int, used_idx: int | None = None) -> None:
        super().set_state(last_avail_idx, used_idx)
        self.resubmit.clear()
        self._recent.clear()

    def recover(self) -> int:
        """Start the ring from its region (vhost-user.rst "When reconnecting").

        ``used_idx`` is the used ring's ``idx``; ``last_avail_idx`` is that
        plus the heads in flight (whatever SET_VRING_BASE said: after a crash
        QEMU sends the used index); those heads are popped first.  Returns
        how many.  A fresh buffer (version 0) is initialized and the ring
        keeps the position SET_VRING_BASE gave.  PeerError (queue broken) for
        a region that cannot be right.
        """
        used = self._used16[1]
        if self.region.version == 0:
            # A fresh buffer knows nothing of this ring: SET_VRING_BASE stands
            # (libvhost-user's vu_check_queue_inflights leaves it too).
            self.region.recover(used)
            self.resubmit.clear()
            return 0
        try:
            heads = self.region.recover(used)
            if len(heads) > self.num:
                raise PeerError(f"inflight region: {len(heads)} heads in flight on a ring "
                                f"of {self.num}")
            if any(h >= self.num for h in heads):
                raise PeerError("inflight region: a head in flight beyond the ring")
        except PeerError as exc:
            raise self.mark_broken(str(exc)) from None
        super().set_state((used + len(heads)) & 0xFFFF, used)
        self.inuse = len(heads)
        self.resubmit = deque(heads)
        self._recent = []
        return len(heads)

    # ------------------------------------------------------------------ pop
    def _note(self, head: int) -> None:
        recent = self._recent
        recent.append(head)
        if len(recent) > 2 * self.num:
            # unpop gives back at most what is in flight: the ring size bounds it.
            del recent[:len(recent) - self.num]

    def _pop_resubmitted(self) -> Element:
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        head = self.resubmit.popleft()
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        try:
            self.walk_chain(head, readable, writable)
        except PeerError:
            self.resubmit.appendleft(head)
            raise
        self._note(head | _RESUBMITTED)
        for v in readable:
            self.readable_bytes += len(v)
        return Element(head, readable, writable)

    def pop(self) -> Element | None:
        if self._batching:
            return super().pop()
        if self.resubmit:
            return self._pop_resubmitted()
        elem = super().pop()
        if elem is not None:
            self.region.get(elem.head)
            self._note(elem.head)
        return elem

    def pop_head(self) -> int | None:
        if self.resubmit:
            return self._pop_resubmitted().head
        head = super().pop_head()
        if head is not None:
            self.region.get(head)
            self._note(head)
        return head

    def pop_batch(self, max_n: int = 0x10000) -> list[Element]:
        out: list[Element] = []
        while self.resubmit and len(out) < max_n:
            out.append(self._pop_resubmitted())
        if len(out) < max_n:
            self._batching = True
            try:
                fresh = super().pop_batch(max_n - len(out))
            finally:
                self._batching = False
            if fresh:
                heads = [elem.head for elem in fresh]
                self.region.get_all(heads)
                recent = self._recent
                recent += heads
                if len(recent) > 2 * self.num:
                    del recent[:len(recent) - self.num]
                out += fresh
        return out

    def pop_window(self, max_n: int) -> int:
        if self.resubmit:
            raise CallerError("batched pops (pyvirtio.batch) cannot take resubmitted heads: "
                              "pop them with pop()/pop_batch() first")
        return super().pop_window(max_n)

    def commit_pops(self, count: int) -> None:
        avail = self._avail
        last = self.last_avail_idx
        for i in range(count):
            head = avail[2 + ((last + i) & self._mask)]
            if head < self.num:  # (pyvirtio.batch checked it; a changed entry is not tracked)
                self.region.get(head)
                self._note(head)
        super().commit_pops(count)

    def unpop(self, count: int = 1) -> None:
        if count > self.inuse:
            raise CallerError("unpop of more heads than are in use")
        fresh = 0
        recent = self._recent
        for _ in range(count):
            head = recent.pop()
            if head & _RESUBMITTED:
                self.resubmit.appendleft(head & ~_RESUBMITTED)
            else:
                self.region.unget(head)
                fresh += 1
        if fresh:
            super().unpop(fresh)

    # ----------------------------------------------------------------- used
    def flush(self, count: int) -> None:
        # The heads of the batch, from the used entries ``fill`` wrote (not
        # tracked per fill: that would cost every request a Python call).  A
        # driver that rewrites them before they are published only misleads
        # its own recovery; a head beyond the ring is not tracked.
        used32 = self._used32
        mask = self._mask
        num = self.num
        start = self.used_idx
        heads = [h for i in range(count) if (h := used32[1 + 2 * ((start + i) & mask)]) < num]
        region = self.region
        # Linked before used.idx moves (a refused flush leaves only links nobody reads).
        region.pre_put_all(heads)
        SplitDeviceQueue.flush(self, count)
        region.post_put(heads, self.used_idx)

    def push(self, head: int, length: int) -> None:
        self.region.pre_put(head)
        super().push(head, length)
        self.region.post_put([head], self.used_idx)

    def available(self) -> int:
        return len(self.resubmit) + super().available()
