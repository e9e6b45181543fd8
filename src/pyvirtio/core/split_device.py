"""Device side of the split virtqueue, VIRTIO 1.2 §2.7 (what QEMU's virtio.c does).

* :meth:`SplitDeviceQueue.pop` takes the next available head, walks its
  descriptor chain (§2.7.5, indirect tables §2.7.5.3) and returns an
  :class:`Element` whose readable and writable buffers are already translated
  and bounds-checked views into guest memory;
* :meth:`~SplitDeviceQueue.fill` + :meth:`~SplitDeviceQueue.flush` (or
  :meth:`~SplitDeviceQueue.push`) return buffers through the used ring (§2.7.8);
* :meth:`~SplitDeviceQueue.should_notify` is the interrupt decision of §2.7.7
  and §2.7.10 — ``VIRTIO_F_NOTIFY_ON_EMPTY``, ``VRING_AVAIL_F_NO_INTERRUPT``,
  or ``used_event`` with the "signalled_used_valid" rule QEMU uses so the
  first interrupt is never suppressed and a flush that jumped over the last
  signalled index re-arms it;
* :meth:`~SplitDeviceQueue.enable_notification` /
  :meth:`~SplitDeviceQueue.disable_notification` write
  ``VRING_USED_F_NO_NOTIFY`` or ``avail_event`` (§2.7.10), and enabling
  re-checks the ring after a full fence so a kick cannot be lost.

Everything the driver wrote is hostile: each descriptor is read once, chains
are walked with a hop limit, and any violation raises :class:`PeerError` and
marks the queue broken (docs/architecture.md).  No I/O happens here: a notification is a
decision returned to the caller.

Statistics (docs/stats.md) are plain integers the hot paths bump as they
work — buffers popped and pushed, their bytes, kick-suppression transitions,
interrupts suppressed — and nothing else: no lock, no call, no allocation per
request.  While :attr:`SplitDeviceQueue.trace` is a list, each interrupt
decision and kick-suppression change is appended to it with its inputs.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import mypyc_attr

from pyvirtio.core.barrier import full_fence
from pyvirtio.core.chain import iter_chain
from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError
from pyvirtio.core.layout import DESC_SIZE, RingViews, unpack_desc
from pyvirtio.core.memory import GuestMemory, Region
from pyvirtio.core.ring_stats import (
    TRACE_IRQ,
    TRACE_IRQ_SUPPRESSED,
    TRACE_KICK,
    TRACE_KICKS_OFF,
    TRACE_KICKS_ON,
    RingCounters,
)
from pyvirtio.core.spec import (
    F_NOTIFY_ON_EMPTY,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)

_NEXT_OR_INDIRECT: Final = VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT

def _jumped_over_signalled(new: int, old: int, signalled: int) -> bool:
    """Whether moving used.idx from ``old`` to ``new`` passed the last signalled index.

    Then ``used_event`` may lie behind us where vring_need_event can no longer
    see it, so the next interrupt must be sent unconditionally (QEMU
    ``virtqueue_flush``; its distance is a signed 16-bit value, so a device that
    ran 32768 or more entries past its last notification re-arms too).
    """
    dist = (new - signalled) & 0xFFFF
    if dist >= 0x8000:
        dist -= 0x10000
    return dist < ((new - old) & 0xFFFF)


@mypyc_attr(allow_interpreted_subclasses=True)
class Element:
    """One popped request: its head and its buffers as views into guest memory.

    ``readable`` views are read-only (the driver filled them); ``writable``
    views are the only guest memory the device may write.
    """

    # A plain class rather than a dataclass: one is built per request, and
    # mypyc compiles this form into a native class (see setup.py).
    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[memoryview],
                 writable: list[memoryview]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable

    def __repr__(self) -> str:
        return (f"Element(head={self.head}, readable={len(self.readable)} views, "
                f"writable={len(self.writable)} views)")

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


@mypyc_attr(allow_interpreted_subclasses=True)
class SplitDeviceQueue(RingCounters):
    """The device's view of one split virtqueue."""

    def __init__(self, rings: RingViews, memory: GuestMemory, features: int = 0) -> None:
        super().__init__()
        self.rings = rings
        self.memory = memory
        self.num = rings.num
        self._mask = rings.num - 1
        self.event_idx = bool(features >> F_RING_EVENT_IDX & 1)
        self.indirect = bool(features >> F_RING_INDIRECT_DESC & 1)
        self.notify_on_empty = bool(features >> F_NOTIFY_ON_EMPTY & 1)
        self._avail = rings.avail16
        self._used16 = rings.used16
        self._used32 = rings.used32
        self._desc = rings.desc
        self._used_event_i = 2 + rings.num
        self._avail_event_i = 2 + 4 * rings.num
        self.last_avail_idx = 0
        self.shadow_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.inuse = 0
        self.notification = True
        self.broken: str | None = None
        self._ro_region: Region | None = None
        self._ro_view = memoryview(b"")

    # ---------------------------------------------------------------- state
    def get_state(self) -> tuple[int, int]:
        """(last_avail_idx, used_idx): what vhost-user GET_VRING_BASE reports."""
        return self.last_avail_idx, self.used_idx

    def set_state(self, last_avail_idx: int, used_idx: int | None = None) -> None:
        """Resume at ``last_avail_idx`` (vhost-user SET_VRING_BASE; migration)."""
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise CallerError(f"last_avail_idx {last_avail_idx} is not a 16-bit index")
        self.last_avail_idx = self.shadow_avail_idx = last_avail_idx
        self.used_idx = last_avail_idx if used_idx is None else used_idx & 0xFFFF
        self.signalled_used_valid = False
        self.inuse = 0
        self.broken = None

    def ring_state(self) -> dict[str, int]:
        """The ring's indices and flags now, read live from the rings (QEMU's
        ``x-query-virtio-queue-status`` shows the same); event indices are -1
        without EVENT_IDX."""
        avail = self._avail
        used = self._used16
        return {"avail_idx": avail[1], "last_avail_idx": self.last_avail_idx,
                "shadow_avail_idx": self.shadow_avail_idx, "used_idx": self.used_idx,
                "avail_event": used[self._avail_event_i] if self.event_idx else -1,
                "used_event": avail[self._used_event_i] if self.event_idx else -1,
                "avail_flags": avail[0], "used_flags": used[0],
                "signalled_used": self.signalled_used,
                "signalled_used_valid": int(self.signalled_used_valid),
                "in_flight": self.inuse, "kicks_wanted": int(self.notification)}

    def trace_kick(self) -> None:
        """Record a kick the transport received (while tracing) with the avail side's state."""
        if self.trace is not None:
            self._record(TRACE_KICK, self.shadow_avail_idx, self._avail[1],
                         self._used16[self._avail_event_i] if self.event_idx else -1,
                         self._used16[0])


    # ----------------------------------------------------------------- avail
    def _fetch_avail_idx(self) -> int:
        """Read avail.idx once, validate it, and cache it in ``shadow_avail_idx``."""
        idx = self._avail[1]
        if (idx - self.last_avail_idx) & 0xFFFF > self.num:
            raise self.mark_broken(
                f"driver moved avail.idx from {self.last_avail_idx} to {idx}: "
                f"more than the queue size {self.num} ahead")
        self.shadow_avail_idx = idx
        return idx

    def available(self) -> int:
        """How many heads are known to be available and not yet popped.

        Like QEMU's ``virtio_queue_empty`` it trusts the cached avail.idx while
        that still shows work and re-reads the ring only when it shows none, so
        the answer is "at least this many"; zero is exact.
        """
        self._check_usable()
        if self.shadow_avail_idx != self.last_avail_idx:
            return (self.shadow_avail_idx - self.last_avail_idx) & 0xFFFF
        return (self._fetch_avail_idx() - self.last_avail_idx) & 0xFFFF

    def is_empty(self) -> bool:
        return self.available() == 0

    # ------------------------------------------------------------------- pop
    def _size_exceeded(self) -> PeerError:
        """Break the queue: a head is available while every head is in flight.

        Only a driver that made a head available again before it was used can
        get there; QEMU's ``virtqueue_split_pop`` refuses it the same way.
        """
        return self.mark_broken(f"Virtqueue size exceeded: {self.inuse} heads in flight "
                                f"on a queue of size {self.num}, and more made available")

    def _bad_head(self, head: int) -> PeerError:
        return self.mark_broken(f"available ring entry {self.last_avail_idx} names head {head} "
                                f"of a queue of size {self.num}")

    def pop_head(self) -> int | None:
        """Take the next available head index without walking its chain."""
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        last = self.last_avail_idx
        if self.shadow_avail_idx == last and self._fetch_avail_idx() == last:
            return None
        if self.inuse >= self.num:
            raise self._size_exceeded()
        head = self._avail[2 + (last & self._mask)]
        if head >= self.num:
            raise self._bad_head(head)
        last = (last + 1) & 0xFFFF
        self.last_avail_idx = last
        if self.event_idx and self.notification:
            # Ask for a kick once the driver goes beyond what we have taken (QEMU pop).
            self._used16[self._avail_event_i] = last
        self.inuse += 1
        self.buffers_popped += 1
        return head

    def pop(self) -> Element | None:
        """Pop the next request, or None if the ring is empty."""
        # pop_head inlined: this is the per-request hot path (docs/architecture.md "Speed").
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        last = self.last_avail_idx
        avail = self._avail
        if self.shadow_avail_idx == last:
            # _fetch_avail_idx inlined.
            idx = avail[1]
            if idx == last:
                return None
            if (idx - last) & 0xFFFF > self.num:
                raise self.mark_broken(
                    f"driver moved avail.idx from {last} to {idx}: "
                    f"more than the queue size {self.num} ahead")
            self.shadow_avail_idx = idx
        if self.inuse >= self.num:
            raise self._size_exceeded()
        head = avail[2 + (last & self._mask)]
        if head >= self.num:
            raise self._bad_head(head)
        last = (last + 1) & 0xFFFF
        self.last_avail_idx = last
        if self.event_idx and self.notification:
            self._used16[self._avail_event_i] = last
        self.inuse += 1
        self.buffers_popped += 1
        first = unpack_desc(self._desc, head * DESC_SIZE)
        flags = first[2]
        if not flags & _NEXT_OR_INDIRECT:
            # One direct descriptor inside the only region: the common request.
            # Anything else (or any failed check) takes the general walk, which
            # raises the precise error; it reuses this fetch, never re-reads.
            r = self.memory.sole_region
            if r is not None:
                length = first[1]
                off = first[0] - r.gpa
                if off >= 0 and length > 0 and off + length <= r.size:
                    if flags & VRING_DESC_F_WRITE:
                        return Element(head, [], [r.view[off:off + length]])
                    ro = self._ro_view if r is self._ro_region else self._readonly_of(r)
                    self.readable_bytes += length
                    return Element(head, [ro[off:off + length]], [])
        elif not flags & VRING_DESC_F_INDIRECT and self.num > 1 and first[3] < self.num:
            # Two direct descriptors (a request header + its reply, say): the
            # walk unrolled with the same checks.  Any doubt takes the general
            # walk, which decides on its own fetch of the second descriptor.
            r = self.memory.sole_region
            if r is not None:
                a1, l1, f1, _ = unpack_desc(self._desc, first[3] * DESC_SIZE)
                off0 = first[0] - r.gpa
                l0 = first[1]
                off1 = a1 - r.gpa
                size = r.size
                if (not f1 & _NEXT_OR_INDIRECT and off0 >= 0 and l0 > 0
                        and off0 + l0 <= size and off1 >= 0 and l1 > 0
                        and off1 + l1 <= size):
                    view = r.view
                    if not f1 & VRING_DESC_F_WRITE:
                        if not flags & VRING_DESC_F_WRITE:
                            ro = self._ro_view if r is self._ro_region else self._readonly_of(r)
                            self.readable_bytes += l0 + l1
                            return Element(head, [ro[off0:off0 + l0], ro[off1:off1 + l1]], [])
                    elif flags & VRING_DESC_F_WRITE:
                        return Element(head, [], [view[off0:off0 + l0], view[off1:off1 + l1]])
                    else:
                        ro = self._ro_view if r is self._ro_region else self._readonly_of(r)
                        self.readable_bytes += l0
                        return Element(head, [ro[off0:off0 + l0]], [view[off1:off1 + l1]])
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        try:
            self._walk(head, first, readable, writable)
        except PeerError:
            self.inuse -= 1
            self.buffers_popped -= 1
            raise
        for v in readable:
            self.readable_bytes += len(v)
        return Element(head, readable, writable)

    def pop_batch(self, max_n: int = 0x10000) -> list[Element]:
        """Up to ``max_n`` requests, as that many :meth:`pop` calls would return them.

        Empty when the ring is.  Chains of one or two direct descriptors in a
        single-region memory are popped here with :meth:`pop`'s checks and
        its results; the batch ends before anything else (another shape, a
        doubtful entry, the end of the cached ``avail.idx``), which the next
        call hands to :meth:`pop` — so a bad entry raises (and breaks the
        queue) exactly when the scalar loop would reach it, never earlier.
        """
        out: list[Element] = []
        if max_n <= 0:
            return out
        first = self.pop()  # validates avail.idx and re-reads it when needed
        if first is None:
            return out
        out.append(first)
        r = self.memory.sole_region
        last = self.last_avail_idx
        # Never more in flight than the queue size: pop raises on the next one.
        todo = min((self.shadow_avail_idx - last) & 0xFFFF, max_n - 1, self.num - self.inuse)
        if todo <= 0 or r is None:
            return out
        gpa, size, view = r.gpa, r.size, r.view
        ro = self._ro_view if r is self._ro_region else self._readonly_of(r)
        avail = self._avail
        desc = self._desc
        num = self.num
        mask = self._mask
        append = out.append
        rbytes = 0
        for _ in range(todo):
            head = avail[2 + (last & mask)]
            if head >= num:
                break
            a0, l0, f0, n0 = unpack_desc(desc, head * DESC_SIZE)
            o0 = a0 - gpa
            if not (o0 >= 0 and l0 > 0 and o0 + l0 <= size):
                break
            if f0 & _NEXT_OR_INDIRECT:
                # Two direct descriptors, no loop, readable before writable.
                if f0 & VRING_DESC_F_INDIRECT or n0 >= num or num < 2:
                    break
                a1, l1, f1, _ = unpack_desc(desc, n0 * DESC_SIZE)
                o1 = a1 - gpa
                if f1 & _NEXT_OR_INDIRECT or not (o1 >= 0 and l1 > 0 and o1 + l1 <= size):
                    break
                if f1 & VRING_DESC_F_WRITE:
                    if f0 & VRING_DESC_F_WRITE:
                        append(Element(head, [], [view[o0:o0 + l0], view[o1:o1 + l1]]))
                    else:
                        append(Element(head, [ro[o0:o0 + l0]], [view[o1:o1 + l1]]))
                        rbytes += l0
                elif f0 & VRING_DESC_F_WRITE:
                    break
                else:
                    append(Element(head, [ro[o0:o0 + l0], ro[o1:o1 + l1]], []))
                    rbytes += l0 + l1
            elif f0 & VRING_DESC_F_WRITE:
                append(Element(head, [], [view[o0:o0 + l0]]))
            else:
                append(Element(head, [ro[o0:o0 + l0]], []))
                rbytes += l0
            last = (last + 1) & 0xFFFF
        self.inuse += len(out) - 1
        self.buffers_popped += len(out) - 1
        self.readable_bytes += rbytes
        self.last_avail_idx = last
        if self.event_idx and self.notification:
            self._used16[self._avail_event_i] = last
        return out

    # ------------------------------------------------------ batch interface
    # What a batched pop built on this queue (pyvirtio.batch.DeviceBatch) needs
    # to behave exactly as repeated pop() calls: it reads heads and descriptors
    # itself (rings.avail16 / rings.desc, chains through core.chain.iter_chain)
    # and leaves the queue's state and its rules to these three methods.
    def pop_window(self, max_n: int) -> int:
        """How many heads a batch may take now from ``last_avail_idx`` (at most ``max_n``).

        The same ``avail.idx`` reads and checks as that many :meth:`pop` calls:
        the cached index while it still shows work (re-read when it shows less
        than ``max_n``, but a bad re-read only shortens the window — the scalar
        loop would pop the cached heads first), and never more heads in flight
        than the queue size.  Raises :class:`PeerError` (queue broken) where
        the first of those pops would.
        """
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        if max_n <= 0:
            return 0
        last = self.last_avail_idx
        have = (self.shadow_avail_idx - last) & 0xFFFF
        if have == 0:
            have = (self._fetch_avail_idx() - last) & 0xFFFF
        elif have < max_n:
            idx = self._avail[1]
            if (idx - last) & 0xFFFF <= self.num:
                self.shadow_avail_idx = idx
                have = (idx - last) & 0xFFFF
        room = self.num - self.inuse
        if have and room <= 0:
            raise self._size_exceeded()
        return min(max_n, have, room)

    def commit_pops(self, count: int) -> None:
        """Take ``count`` heads of the window, as ``count`` successful pops do (§2.7.10)."""
        last = (self.last_avail_idx + count) & 0xFFFF
        self.last_avail_idx = last
        if self.event_idx and self.notification:
            self._used16[self._avail_event_i] = last
        self.inuse += count
        self.buffers_popped += count

    def pop_failed(self, head: int, error: PeerError | None) -> PeerError:
        """Break the queue as a pop of the next entry, naming ``head``, does; returns the error.

        ``error`` None: ``head`` is out of range.  Otherwise the walk of its
        chain raised ``error``; that pop consumed the entry without taking a
        buffer.
        """
        if error is None:
            return self._bad_head(head)
        self.commit_pops(1)
        self.inuse -= 1
        self.buffers_popped -= 1
        return self.mark_broken(f"head {head}: {error}")

    def _readonly_of(self, region: Region) -> memoryview:
        """A read-only view of a whole region, cached so slices of it need no copy."""
        self._ro_region = region
        self._ro_view = ro = region.view.toreadonly()
        return ro

    def walk_chain(self, head: int, readable: list[memoryview],
                   writable: list[memoryview]) -> None:
        """Append the translated buffers of the chain at ``head`` (§2.7.5, §2.7.5.3)."""
        self._walk(head, unpack_desc(self._desc, head * DESC_SIZE), readable, writable)

    def _walk(self, head: int, first: tuple[int, int, int, int], readable: list[memoryview],
              writable: list[memoryview]) -> None:
        translate = self.memory.translate
        try:
            for addr, length, is_write in iter_chain(self._desc, first, self.num, self.indirect,
                                                     translate):
                view = translate(addr, length)
                if is_write:
                    writable.append(view)
                else:
                    readable.append(view.toreadonly())
        except PeerError as exc:
            raise self.mark_broken(f"head {head}: {exc}") from None

    def unpop(self, count: int = 1) -> None:
        """Give back the last ``count`` popped heads (QEMU ``virtqueue_unpop``)."""
        if count > self.inuse:
            raise CallerError("unpop of more heads than are in use")
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF
        self.inuse -= count
        self.buffers_popped -= count

    # ------------------------------------------------------------------ used
    def fill(self, head: int, length: int, offset: int = 0) -> None:
        """Write used-ring entry ``used_idx + offset`` without publishing it."""
        slot = (self.used_idx + offset) & self._mask
        used32 = self._used32
        used32[1 + 2 * slot] = head
        used32[2 + 2 * slot] = length
        self.used_bytes += length

    def flush(self, count: int) -> None:
        """Publish ``count`` filled entries by moving used.idx (§2.7.8)."""
        self._check_usable()
        if count > self.inuse:
            raise CallerError(f"flush of {count} entries with only {self.inuse} in use")
        old = self.used_idx
        new = (old + count) & 0xFFFF
        # Entries were stored first; x86 keeps stores in order (barrier.py).
        self._used16[1] = new
        self.used_idx = new
        self.inuse -= count
        self.buffers_pushed += count
        if _jumped_over_signalled(new, old, self.signalled_used):
            self.signalled_used_valid = False

    def push(self, head: int, length: int) -> None:
        """Return one buffer: fill + flush."""
        # fill + flush inlined (same checks, same stores, same order).
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        if self.inuse < 1:
            raise CallerError(f"flush of 1 entries with only {self.inuse} in use")
        old = self.used_idx
        slot = old & self._mask
        used32 = self._used32
        used32[1 + 2 * slot] = head
        used32[2 + 2 * slot] = length
        new = (old + 1) & 0xFFFF
        self._used16[1] = new
        self.used_idx = new
        self.inuse -= 1
        self.buffers_pushed += 1
        self.used_bytes += length
        if _jumped_over_signalled(new, old, self.signalled_used):
            self.signalled_used_valid = False

    # ------------------------------------------------------------ interrupts
    def should_notify(self) -> bool:
        """Whether to interrupt the driver now (QEMU ``virtio_should_notify``)."""
        # Expose the used entries before reading used_event / avail.flags.
        full_fence()
        if self.notify_on_empty and self.inuse == 0 and self.is_empty():
            if self.trace is not None:
                self._record(TRACE_IRQ, self.signalled_used, self.used_idx, -1, self._avail[0])
            return True
        if not self.event_idx:
            flags = self._avail[0]
            if flags & VRING_AVAIL_F_NO_INTERRUPT:
                self.interrupts_suppressed += 1
                if self.trace is not None:
                    self._record(TRACE_IRQ_SUPPRESSED, self.used_idx, self.used_idx, -1, flags)
                return False
            if self.trace is not None:
                self._record(TRACE_IRQ, self.used_idx, self.used_idx, -1, flags)
            return True
        valid = self.signalled_used_valid
        self.signalled_used_valid = True
        old = self.signalled_used
        new = self.signalled_used = self.used_idx
        # vring_need_event(used_event, new, old), inlined on the hot path.
        event = self._avail[self._used_event_i]
        if not valid or ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF):
            if self.trace is not None:
                self._record(TRACE_IRQ, old if valid else -1, new, event, self._avail[0])
            return True
        self.interrupts_suppressed += 1
        if self.trace is not None:
            self._record(TRACE_IRQ_SUPPRESSED, old, new, event, self._avail[0])
        return False

    # ----------------------------------------------------------------- kicks
    def disable_notification(self) -> None:
        """Tell the driver not to kick (it may still; kicks are only hints)."""
        if self.notification:
            self.notifications_disabled += 1
            if self.trace is not None:
                self._record(TRACE_KICKS_OFF, self.last_avail_idx, self.shadow_avail_idx,
                             self._used16[self._avail_event_i] if self.event_idx else -1,
                             self._used16[0])
        self.notification = False
        if not self.event_idx:
            self._used16[0] |= VRING_USED_F_NO_NOTIFY

    def enable_notification(self) -> bool:
        """Ask for kicks again; returns True if work is already waiting.

        The fence orders our write of the flag / ``avail_event`` before the
        re-read of ``avail.idx``; together with the driver's fence between
        writing ``avail.idx`` and reading them, either the driver sees our
        request and kicks, or we see its buffer here.  A caller that gets True
        must process the ring instead of sleeping.
        """
        self._check_usable()
        if not self.notification:
            self.notifications_enabled += 1
        self.notification = True
        if self.event_idx:
            self._used16[self._avail_event_i] = self._fetch_avail_idx()
        else:
            self._used16[0] &= ~VRING_USED_F_NO_NOTIFY & 0xFFFF
        if self.trace is not None:
            self._record(TRACE_KICKS_ON, self.last_avail_idx, self.shadow_avail_idx,
                         self._used16[self._avail_event_i] if self.event_idx else -1,
                         self._used16[0])
        full_fence()
        return self.available() != 0
