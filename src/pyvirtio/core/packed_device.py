"""Device side of the packed virtqueue, VIRTIO 1.2 §2.8 (what QEMU's virtio.c does).

* :meth:`PackedDeviceQueue.pop` is ``virtqueue_packed_pop``: the descriptor at
  ``last_avail_idx`` is available when its AVAIL/USED bits say so for the
  device's wrap counter (§2.8.1); its chain follows it in the ring (§2.8.6)
  or lies in one indirect table (§2.8.7), and comes back as the same
  :class:`~pyvirtio.core.split_device.Element` the split ring pops, whose
  ``head`` is the buffer id;
* :meth:`~PackedDeviceQueue.fill` + :meth:`~PackedDeviceQueue.flush` (or
  :meth:`~PackedDeviceQueue.push`) are ``virtqueue_packed_fill`` /
  ``virtqueue_packed_flush``: one used descriptor per buffer, each where the
  driver will look for it (after the ring positions of the buffers before
  it, §2.8.6), the first one's flags written last so the driver never sees
  part of a batch (§2.8.9);
* :meth:`~PackedDeviceQueue.should_notify` is ``virtio_packed_should_notify``:
  the driver's event suppression flags, or with ``RING_EVENT_FLAGS_DESC``
  ``vring_packed_need_event`` over the used index moved since the last
  decision, with QEMU's "signalled_used_valid" rule (the first decision,
  and every one after the used index wrapped, answers yes);
* :meth:`~PackedDeviceQueue.enable_notification` /
  :meth:`~PackedDeviceQueue.disable_notification` are
  ``virtio_queue_packed_set_notification``: the device event suppression
  structure, ``off_wrap`` before ``flags``, and enabling re-checks the ring
  after a full fence so a kick cannot be lost;
* :meth:`~PackedDeviceQueue.get_state` / :meth:`~PackedDeviceQueue.set_state`
  are (index | wrap counter << 15) pairs, :meth:`~PackedDeviceQueue.vring_base`
  the 32-bit vhost-user VRING_BASE (core/packed_layout.py).

Public names are :class:`SplitDeviceQueue`'s where the idea is the same:
both satisfy :class:`pyvirtio.core.queue.DeviceQueue`, the interface the
device kit, the statistics and the devices use, including the counters
(``COUNTERS``) and the trace records of docs/stats.md.  In a packed kick
record the indices are positions with their wrap counter in bit 15 and the
flags are the event suppression flags of the other side; an interrupt
decision's record has ring positions and the driver's event moved one ring
back when it lies in the other lap (as ``vring_packed_need_event`` takes it),
so ``new - event`` means what it means on a split ring.
``last_avail_idx`` and ``used_idx`` are ring positions (0..num-1) with their
wrap counters beside them, as in QEMU; ``inuse`` counts ring positions in
flight (a chain takes one per descriptor, an indirect table one), also as
QEMU does.

Everything the driver wrote is hostile (docs/architecture.md "Guest input is
hostile"): a descriptor's flags are read once and the rest after them, each
descriptor once; chains are bounded by the ring positions not in flight and
indirect tables by :func:`pyvirtio.core.chain.indirect_hop_limit`; and a
buffer id out of range, an id already in flight, a chained descriptor whose
AVAIL/USED bits are not those of an available one in its lap, an indirect
descriptor inside a chain or an indirect table, an indirect table whose
length is 0, not a multiple of 16 or too long, a readable buffer after a
writable one, and a buffer that is empty, wraps 2^64 or leaves guest memory
all raise :class:`PeerError` and mark the queue broken.  No I/O happens
here: a notification is a decision returned to the caller.
"""

from __future__ import annotations

from collections.abc import Callable

from mypy_extensions import mypyc_attr

from pyvirtio.core.barrier import full_fence
from pyvirtio.core.chain import indirect_hop_limit
from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.packed_layout import (
    AVAIL_USED_MASK,
    D16_FLAGS,
    D16_ID,
    D16_PER_DESC,
    D32_LEN,
    D32_PER_DESC,
    OFF_MASK,
    PACKED_DESC_SIZE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    PackedRingViews,
    pack_vring_base,
    unpack_desc_body,
    unpack_packed_desc,
    unpack_vring_base,
)
from pyvirtio.core.ring_stats import (
    TRACE_IRQ,
    TRACE_IRQ_SUPPRESSED,
    TRACE_KICK,
    TRACE_KICKS_OFF,
    TRACE_KICKS_ON,
    RingCounters,
)
from pyvirtio.core.spec import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from pyvirtio.core.split_device import Element


@mypyc_attr(allow_interpreted_subclasses=True)
class PackedDeviceQueue(RingCounters):
    """The device's view of one packed virtqueue."""

    def __init__(self, rings: PackedRingViews, memory: GuestMemory, features: int = 0) -> None:
        super().__init__()
        self.rings = rings
        self.memory = memory
        self.num = rings.num
        self.event_idx = bool(features >> F_RING_EVENT_IDX & 1)
        self.indirect = bool(features >> F_RING_INDIRECT_DESC & 1)
        self._desc = rings.desc
        self._desc16 = rings.desc16
        self._desc32 = rings.desc32
        self._device16 = rings.device16
        self._driver32 = rings.driver32
        #: Next ring position to pop and the Device Ring Wrap Counter of that lap
        #: (QEMU last_avail_idx / last_avail_wrap_counter).
        self.last_avail_idx = 0
        self.last_avail_wrap_counter = 1
        #: Next ring position to mark used and its wrap counter (§2.8.1).
        self.used_idx = 0
        self.used_wrap_counter = 1
        self.signalled_used = 0
        self.signalled_used_valid = False
        #: Ring positions popped and not yet flushed (QEMU inuse).
        self.inuse = 0
        self.notification = True
        self.broken: str | None = None
        # Buffer id -> (ring positions it took, where its first one was as
        # index | wrap << 15), in pop order: ids in flight once, and unpop.
        self._inflight: dict[int, tuple[int, int]] = {}
        # fill() slots until flush() (QEMU used_elems): id (-1: empty) and length.
        self._fill_ids: list[int] = [-1] * self.num
        self._fill_lens: list[int] = [0] * self.num
        # buffers_popped and buffers_pushed (RingCounters) are the free-running
        # counts here: ring positions wrap at ``num``.
        #: Buffers popped plus those seen waiting, mod 2^16: the packed ring has
        #: no avail.idx; this plays its role in the kit's re-check
        #: (core/queue.py).
        self.shadow_avail_idx = 0

    # ---------------------------------------------------------------- state
    def get_state(self) -> tuple[int, int]:
        """(last_avail_idx | wrap << 15, used_idx | wrap << 15): the ring's two positions."""
        return (self.last_avail_idx | self.last_avail_wrap_counter << 15,
                self.used_idx | self.used_wrap_counter << 15)

    def set_state(self, avail_state: int, used_state: int | None = None) -> None:
        """Resume at the positions :meth:`get_state` gave (migration, vhost-user).

        ``used_state`` None: the same as ``avail_state`` (nothing in flight).
        """
        used = avail_state if used_state is None else used_state
        for name, state in (("avail", avail_state), ("used", used)):
            if not 0 <= state <= 0xFFFF or state & OFF_MASK >= self.num:
                raise CallerError(f"{name} state {state:#x} is not a position of a "
                                  f"queue of size {self.num} with its wrap counter")
        self.last_avail_idx = avail_state & OFF_MASK
        self.last_avail_wrap_counter = avail_state >> 15
        self.used_idx = used & OFF_MASK
        self.used_wrap_counter = used >> 15
        self.signalled_used_valid = False
        self.inuse = 0
        self._inflight.clear()
        self._fill_ids = [-1] * self.num
        self.broken = None

    def vring_base(self) -> int:
        """The state as vhost-user GET_VRING_BASE carries it for a packed ring."""
        return pack_vring_base(self.last_avail_idx, self.last_avail_wrap_counter,
                               self.used_idx, self.used_wrap_counter)

    def set_vring_base(self, num: int) -> None:
        """Resume at a vhost-user SET_VRING_BASE value for a packed ring."""
        if not 0 <= num <= 0xFFFFFFFF:
            raise CallerError(f"vring base {num:#x} is not a 32-bit value")
        ai, aw, ui, uw = unpack_vring_base(num)
        self.set_state(ai | aw << 15, ui | uw << 15)

    @property
    def in_flight(self) -> int:
        """Buffers popped and not yet flushed."""
        return len(self._inflight)

    # ----------------------------------------------------------- statistics
    def carry_counters(self, old: RingCounters) -> None:
        """Continue ``old``'s statistics and trace (the same ring, mapped anew)."""
        super().carry_counters(old)
        if isinstance(old, PackedDeviceQueue):
            self.shadow_avail_idx = old.shadow_avail_idx

    def carry_in_flight(self, old: PackedDeviceQueue) -> None:
        """Keep ``old``'s buffers in flight (the same ring mapped anew: the device
        still holds them and completes them on this object)."""
        self._inflight = dict(old._inflight)
        self.inuse = old.inuse

    def ring_state(self) -> dict[str, int]:
        """The ring's positions and event suppression structures now (read live).

        ``avail_event`` / ``used_event`` are the device's and the driver's
        ``off_wrap`` (-1 without EVENT_IDX), the flags their event flags:
        the split ring's names for the same roles; ``avail_idx`` is -1 (a
        packed ring has none).
        """
        device = self._device16
        driver = self._driver32[0]
        return {"packed": 1, "avail_idx": -1,
                "last_avail_idx": self.last_avail_idx,
                "last_avail_wrap_counter": self.last_avail_wrap_counter,
                "used_idx": self.used_idx, "used_wrap_counter": self.used_wrap_counter,
                "avail_event": device[0] if self.event_idx else -1,
                "used_event": driver & 0xFFFF if self.event_idx else -1,
                "avail_flags": driver >> 16, "used_flags": device[1],
                "signalled_used": self.signalled_used,
                "signalled_used_valid": int(self.signalled_used_valid),
                "in_flight": self.inuse, "kicks_wanted": int(self.notification)}

    def trace_kick(self) -> None:
        """Record a kick the transport received (while tracing)."""
        if self.trace is not None:
            self._record(TRACE_KICK, self.last_avail_idx | self.last_avail_wrap_counter << 15,
                         self.last_avail_idx | self.last_avail_wrap_counter << 15,
                         self._device16[0] if self.event_idx else -1, self._device16[1])

    # ----------------------------------------------------------------- avail
    def is_empty(self) -> bool:
        """Whether the descriptor at ``last_avail_idx`` is not available (QEMU
        ``virtio_queue_packed_empty``)."""
        self._check_usable()
        flags = self._desc16[self.last_avail_idx * D16_PER_DESC + D16_FLAGS]
        empty = flags & AVAIL_USED_MASK != (VRING_PACKED_DESC_F_AVAIL
                                            if self.last_avail_wrap_counter
                                            else VRING_PACKED_DESC_F_USED)
        seen = self.buffers_popped + (0 if empty else 1)
        if empty or (self.shadow_avail_idx - self.buffers_popped) & 0xFFFF == 0:
            self.shadow_avail_idx = seen & 0xFFFF
        return empty

    def available(self) -> int:
        """How many buffers are available and not yet popped: at least this many; 0 is exact.

        Reads the flags of the ring positions after ``last_avail_idx`` (only
        the positions not in flight) and counts the chains that are complete;
        nothing else is checked here, so a malformed one is counted and
        :meth:`pop` raises when it gets there.
        """
        self._check_usable()
        num = self.num
        desc16 = self._desc16
        pos = self.last_avail_idx
        want = (VRING_PACKED_DESC_F_AVAIL if self.last_avail_wrap_counter
                else VRING_PACKED_DESC_F_USED)
        count = 0
        for _ in range(num - self.inuse):
            flags = desc16[pos * D16_PER_DESC + D16_FLAGS]
            if flags & AVAIL_USED_MASK != want:
                break
            if not flags & VRING_DESC_F_NEXT:
                count += 1
            pos += 1
            if pos == num:
                pos = 0
                want ^= AVAIL_USED_MASK
        self.shadow_avail_idx = (self.buffers_popped + count) & 0xFFFF
        return count

    # ------------------------------------------------------------------- pop
    def pop(self) -> Element | None:
        """Pop the next request, or None if no buffer is available."""
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        try:
            return self._pop()
        except PeerError as exc:
            raise self.mark_broken(str(exc)) from None

    def pop_batch(self, max_n: int = 0x10000) -> list[Element]:
        """Up to ``max_n`` requests, as that many :meth:`pop` calls would return them.

        A bad buffer after the first ends the batch before it, without
        breaking the queue: the next call meets it first and raises, exactly
        when the scalar loop would.
        """
        out: list[Element] = []
        if max_n <= 0:
            return out
        first = self.pop()
        if first is None:
            return out
        out.append(first)
        while len(out) < max_n:
            try:
                elem = self._pop()
            except PeerError:
                break
            if elem is None:
                break
            out.append(elem)
        return out

    def _pop(self) -> Element | None:
        """The pop itself: raises a plain PeerError, commits nothing unless it succeeds."""
        num = self.num
        head = self.last_avail_idx
        wrap = self.last_avail_wrap_counter
        desc16 = self._desc16
        flags = desc16[head * D16_PER_DESC + D16_FLAGS]  # once, before the rest
        want = VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED
        if flags & AVAIL_USED_MASK != want:
            self.shadow_avail_idx = self.buffers_popped & 0xFFFF
            return None
        room = num - self.inuse
        if room <= 0:
            raise PeerError(f"Virtqueue size exceeded: {self.inuse} ring positions in flight "
                            f"on a queue of size {num}, and more made available")
        addr, length, bid = unpack_desc_body(self._desc, head * PACKED_DESC_SIZE)
        translate = self.memory.translate
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        if flags & VRING_DESC_F_INDIRECT:
            if not self.indirect:
                raise PeerError(f"descriptor {head}: indirect without VIRTIO_F_INDIRECT_DESC")
            if flags & VRING_DESC_F_NEXT:
                raise PeerError(f"descriptor {head}: indirect descriptor with VIRTQ_DESC_F_NEXT")
            if length == 0 or length % PACKED_DESC_SIZE:
                raise PeerError(f"descriptor {head}: indirect table length {length} is not "
                                f"a positive multiple of 16")
            entries = length // PACKED_DESC_SIZE
            if entries > indirect_hop_limit(entries, num):
                raise PeerError(f"descriptor {head}: indirect table of {entries} descriptors "
                                f"on a queue of size {num}")
            table = translate(addr, length)
            # Every entry of the table is part of the buffer; only WRITE counts
            # there, NEXT and the id are ignored (§2.8.7, virtqueue_packed_pop).
            for j in range(entries):
                a, ln, _, f = unpack_packed_desc(table, j * PACKED_DESC_SIZE)
                if f & VRING_DESC_F_INDIRECT:
                    raise PeerError(f"descriptor {head}: indirect descriptor inside an "
                                    f"indirect table")
                self._add_buffer(translate, a, ln, bool(f & VRING_DESC_F_WRITE), readable,
                                 writable)
            ndescs = 1
        else:
            pos = head
            ndescs = 1
            while True:
                self._add_buffer(translate, addr, length, bool(flags & VRING_DESC_F_WRITE),
                                 readable, writable)
                if not flags & VRING_DESC_F_NEXT:
                    break
                if ndescs >= room:
                    raise PeerError(f"descriptor chain at {head} longer than the {room} ring "
                                    f"positions not in flight (queue size {num})")
                pos += 1
                if pos == num:
                    pos = 0
                    want ^= AVAIL_USED_MASK
                # The head's flags published the whole chain: one read of each.
                addr, length, bid, flags = unpack_packed_desc(self._desc,
                                                              pos * PACKED_DESC_SIZE)
                if flags & AVAIL_USED_MASK != want:
                    raise PeerError(f"descriptor {pos} in the chain at {head} has AVAIL/USED "
                                    f"bits {flags & AVAIL_USED_MASK:#x}: not available in "
                                    f"this lap")
                if flags & VRING_DESC_F_INDIRECT:
                    raise PeerError(f"descriptor {pos}: indirect descriptor inside a chain")
                ndescs += 1
            # The buffer id is the last descriptor's (§2.8.6).
        if bid >= num:
            raise PeerError(f"descriptor {head}: buffer id {bid} out of range "
                            f"(queue size {num})")
        if bid in self._inflight:
            raise PeerError(f"descriptor {head}: buffer id {bid} is already in flight")
        self._inflight[bid] = (ndescs, head | wrap << 15)
        self.inuse += ndescs
        nxt = head + ndescs
        if nxt >= num:
            nxt -= num
            self.last_avail_wrap_counter = wrap ^ 1
        self.last_avail_idx = nxt
        self.buffers_popped += 1
        if (self.shadow_avail_idx - self.buffers_popped) & 0xFFFF >= 0x8000:
            self.shadow_avail_idx = self.buffers_popped & 0xFFFF
        for v in readable:
            self.readable_bytes += len(v)
        return Element(bid, readable, writable)

    @staticmethod
    def _add_buffer(translate: Callable[[int, int], memoryview], addr: int, length: int,
                    is_write: bool, readable: list[memoryview],
                    writable: list[memoryview]) -> None:
        view = translate(addr, length)
        if is_write:
            writable.append(view)
        elif writable:
            raise PeerError("readable descriptor after a writable one")
        else:
            readable.append(view.toreadonly())

    def unpop(self, count: int = 1) -> None:
        """Give back the last ``count`` popped buffers (QEMU ``virtqueue_unpop``).

        They must be the most recent pops and still in flight (not filled
        and flushed); the next pop returns them again.
        """
        if count > len(self._inflight):
            raise CallerError("unpop of more buffers than are in flight")
        for _ in range(count):
            bid, (ndescs, start) = next(reversed(self._inflight.items()))
            end = (start & OFF_MASK) + ndescs
            wrap = start >> 15
            if end >= self.num:
                end -= self.num
                wrap ^= 1
            if end != self.last_avail_idx or wrap != self.last_avail_wrap_counter:
                raise CallerError(f"buffer {bid} is not the last one popped")
            del self._inflight[bid]
            self.last_avail_idx = start & OFF_MASK
            self.last_avail_wrap_counter = start >> 15
            self.inuse -= ndescs
            self.buffers_popped -= 1

    # ------------------------------------------------------------------ used
    def fill(self, head: int, length: int, offset: int = 0) -> None:
        """Record buffer ``head`` as used with ``length`` bytes, the ``offset``-th of the
        next flush (QEMU ``virtqueue_packed_fill``; nothing reaches the ring yet)."""
        if not 0 <= offset < self.num:
            raise CallerError(f"fill offset {offset} outside a queue of size {self.num}")
        self._fill_ids[offset] = head
        self._fill_lens[offset] = length
        self.used_bytes += length

    def flush(self, count: int) -> None:
        """Write the ``count`` filled buffers as used descriptors (``virtqueue_packed_flush``)."""
        self._check_usable()
        if count <= 0:
            if count < 0:
                raise CallerError(f"flush of {count} entries")
            return
        inflight = self._inflight
        if count > len(inflight):
            raise CallerError(f"flush of {count} entries with only {len(inflight)} in flight")
        ids = self._fill_ids[:count]
        for bid in ids:
            if bid not in inflight:
                raise CallerError(f"flush of buffer id {bid}, which is not in flight")
        if len(set(ids)) != count:
            raise CallerError(f"flush of the same buffer id twice: {ids}")
        num = self.num
        desc16 = self._desc16
        desc32 = self._desc32
        lens = self._fill_lens
        pos = self.used_idx
        wrap = self.used_wrap_counter
        wrapped = False
        first = pos
        first_flags = 0
        total = 0
        for k in range(count):
            bid = ids[k]
            length = lens[k]
            flags = (AVAIL_USED_MASK if wrap else 0) | (VRING_DESC_F_WRITE if length else 0)
            desc32[pos * D32_PER_DESC + D32_LEN] = length
            desc16[pos * D16_PER_DESC + D16_ID] = bid
            if k == 0:
                first_flags = flags
            else:
                desc16[pos * D16_PER_DESC + D16_FLAGS] = flags
            ndescs = inflight.pop(bid)[0]
            total += ndescs
            pos += ndescs
            if pos >= num:
                pos -= num
                wrap ^= 1
                wrapped = True
            self._fill_ids[k] = -1
        # The first used descriptor last: the driver polls it, so it never
        # sees part of the batch (x86-64 keeps stores in order; barrier.py).
        desc16[first * D16_PER_DESC + D16_FLAGS] = first_flags
        self.used_idx = pos
        self.used_wrap_counter = wrap
        self.inuse -= total
        self.buffers_pushed += count
        if wrapped:
            # QEMU: vring_packed_need_event cannot see across a wrap of the
            # used index, so the next decision interrupts unconditionally.
            self.signalled_used_valid = False

    def push(self, head: int, length: int) -> None:
        """Return one buffer: fill + flush."""
        self._check_usable()
        self.fill(head, length, 0)
        self.flush(1)

    # ------------------------------------------------------------ interrupts
    def should_notify(self) -> bool:
        """Whether to interrupt the driver now (QEMU ``virtio_packed_should_notify``)."""
        # Expose the used descriptors before reading the driver's suppression.
        full_fence()
        snapshot = self._driver32[0]  # off_wrap and flags from the same instant
        flags = snapshot >> 16
        old = self.signalled_used
        new = self.signalled_used = self.used_idx
        valid = self.signalled_used_valid
        self.signalled_used_valid = True
        off_wrap = snapshot & 0xFFFF
        if flags == VRING_PACKED_EVENT_FLAG_DISABLE:
            notify = False
        elif flags == VRING_PACKED_EVENT_FLAG_ENABLE or not valid:
            notify = True
        else:
            # vring_packed_need_event: an event in the other lap lies one ring behind.
            off = off_wrap & OFF_MASK
            if off_wrap >> 15 != self.used_wrap_counter:
                off -= self.num
            notify = ((new - off - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        if not notify:
            self.interrupts_suppressed += 1
        if self.trace is not None:
            # The event as vring_packed_need_event sees it (one ring back when it
            # lies in the other lap), so new - event is the split ring's distance.
            event = -1
            if self.event_idx:
                ev = off_wrap & OFF_MASK
                if off_wrap >> 15 != self.used_wrap_counter:
                    ev -= self.num
                event = ev & 0xFFFF
            self._record(TRACE_IRQ if notify else TRACE_IRQ_SUPPRESSED,
                         old if valid else -1, new, event, flags)
        return notify

    # ----------------------------------------------------------------- kicks
    def disable_notification(self) -> None:
        """Tell the driver not to kick (it may still; kicks are only hints)."""
        if self.notification:
            self.notifications_disabled += 1
            if self.trace is not None:
                pos = self.last_avail_idx | self.last_avail_wrap_counter << 15
                self._record(TRACE_KICKS_OFF, pos, pos,
                             self._device16[0] if self.event_idx else -1,
                             VRING_PACKED_EVENT_FLAG_DISABLE)
        self.notification = False
        self._device16[1] = VRING_PACKED_EVENT_FLAG_DISABLE

    def enable_notification(self) -> bool:
        """Ask for kicks again; returns True if work is already waiting.

        With EVENT_IDX the driver is asked to kick when it makes the
        descriptor at ``last_avail_idx`` available (``off_wrap`` is stored
        before the flags that make it count).  The fence orders these stores
        before the re-read of that descriptor's flags; with the driver's
        fence between storing flags and reading ours, either the driver sees
        our request and kicks, or we see its buffer here.  A caller that gets
        True must process the ring instead of sleeping.
        """
        self._check_usable()
        if not self.notification:
            self.notifications_enabled += 1
        self.notification = True
        if self.event_idx:
            self._device16[0] = self.last_avail_idx | self.last_avail_wrap_counter << 15
            self._device16[1] = VRING_PACKED_EVENT_FLAG_DESC
        else:
            self._device16[1] = VRING_PACKED_EVENT_FLAG_ENABLE
        if self.trace is not None:
            pos = self.last_avail_idx | self.last_avail_wrap_counter << 15
            self._record(TRACE_KICKS_ON, pos, pos, self._device16[0] if self.event_idx else -1,
                         self._device16[1])
        full_fence()
        return not self.is_empty()
