"""Driver side of the packed virtqueue, VIRTIO 1.2 §2.8 (what Linux's virtio_ring.c does).

* :meth:`PackedDriverQueue.add` writes a scatter-gather list into the next
  ring positions — or one descriptor naming an indirect table (§2.8.7) when
  negotiated and the list has more than one segment — under a buffer id
  taken from a free list, and makes it available by storing the first
  descriptor's flags last (``virtqueue_add_packed``, §2.8.21.1).  Ids come
  back in whatever order the device completes them and are reused from the
  top of the free list, so they are reused out of order;
* :meth:`~PackedDriverQueue.kick_prepare` is ``virtqueue_kick_prepare_packed``:
  a full fence, one 32-bit read of the device event suppression structure,
  then its flags, or with ``RING_EVENT_FLAGS_DESC`` the event-index test
  with the wrap counter folded into the offset (§2.8.10);
* :meth:`~PackedDriverQueue.get_buf` is ``virtqueue_get_buf_ctx_packed``: the
  next used descriptor, its id, skipping the ring positions that buffer took
  (``detach_buf_packed``), and ``off_wrap`` re-armed when interrupts are on
  with EVENT_IDX;
* :meth:`~PackedDriverQueue.disable_cb`, :meth:`~PackedDriverQueue.enable_cb`
  (``enable_cb_prepare`` + poll), :meth:`~PackedDriverQueue.enable_cb_delayed`
  (3/4 of the descriptors in flight) write the driver event suppression
  structure.

Method names and return conventions are :class:`SplitDriverQueue`'s where the
idea is the same, so a caller can take either.  The device is a peer: a used
id that is out of range or not outstanding raises :class:`PeerError` and
marks the queue broken.  The driver keeps its own record of each buffer (its
token and how many ring positions it took), like Linux's ``desc_state``; it
never reads back what it wrote to shared memory.
"""

from __future__ import annotations

from collections.abc import Sequence

from mypy_extensions import mypyc_attr

from pyvirtio.core.barrier import full_fence
from pyvirtio.core.errors import Breakable, CallerError, QueueBrokenError, QueueFull
from pyvirtio.core.packed_layout import (
    AVAIL_USED_MASK,
    D16_FLAGS,
    D16_ID,
    D16_PER_DESC,
    D32_LEN,
    D32_PER_DESC,
    PACKED_DESC_SIZE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    PackedRingViews,
    pack_desc_body,
    pack_packed_desc,
)
from pyvirtio.core.spec import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from pyvirtio.core.split_driver import IndirectArea, Segment


@mypyc_attr(allow_interpreted_subclasses=True)
class PackedDriverQueue(Breakable):
    """The driver's view of one packed virtqueue. The ring memory must start zeroed.

    ``indirect_area`` gives each buffer id a slot of ``per_head`` descriptors
    for its indirect table (the slot of id ``i`` is the ``i``-th).
    """

    def __init__(self, rings: PackedRingViews, features: int = 0,
                 indirect_area: IndirectArea | None = None) -> None:
        self.rings = rings
        self.num = rings.num
        self.event_idx = bool(features >> F_RING_EVENT_IDX & 1)
        self.use_indirect = bool(features >> F_RING_INDIRECT_DESC & 1) and indirect_area is not None
        if indirect_area is not None and len(indirect_area.view) < IndirectArea.size_for(
                self.num, indirect_area.per_head):
            raise CallerError("indirect area too small for the queue")
        self._indirect = indirect_area
        self._desc = rings.desc
        self._desc16 = rings.desc16
        self._desc32 = rings.desc32
        self._driver16 = rings.driver16
        self._device32 = rings.device32
        # Free buffer ids, taken from and returned to the end (Linux's free_head
        # list): the id a completion frees is the next one reused.
        self._free_ids: list[int] = list(range(self.num - 1, -1, -1))
        self._tokens: list[object | None] = [None] * self.num
        #: Ring positions each outstanding id took (Linux desc_state[id].num).
        self._ndescs: list[int] = [0] * self.num
        #: Free ring positions (Linux vq->num_free).
        self._num_free = self.num
        self._outstanding = 0
        #: Next ring position to fill, and the Driver Ring Wrap Counter (§2.8.1).
        self.next_avail_idx = 0
        self.avail_wrap_counter = 1
        #: The AVAIL/USED bits of an available descriptor in the current lap.
        self._avail_used_flags = VRING_PACKED_DESC_F_AVAIL
        #: Next ring position the device will mark used, and its wrap counter.
        self.last_used_idx = 0
        self.used_wrap_counter = 1
        #: Ring positions made available since the last kick decision.
        self.num_added = 0
        #: What the driver event suppression flags hold (Linux event_flags_shadow).
        self.event_flags_shadow = VRING_PACKED_EVENT_FLAG_ENABLE
        self.broken: str | None = None

    # ------------------------------------------------------------------ state
    @property
    def num_free(self) -> int:
        """Free ring positions (a buffer takes one per descriptor, or one if indirect)."""
        return self._num_free

    @property
    def outstanding(self) -> int:
        """Buffers made available and not yet returned by get_buf."""
        return self._outstanding

    @property
    def indirect_area(self) -> IndirectArea | None:
        return self._indirect

    def _advance(self, pos: int) -> int:
        """The ring position after ``pos``; flips the avail wrap counter at the end."""
        pos += 1
        if pos == self.num:
            pos = 0
            self.avail_wrap_counter ^= 1
            self._avail_used_flags ^= AVAIL_USED_MASK
        return pos

    # -------------------------------------------------------------------- add
    def add(self, out_segs: Sequence[Segment], in_segs: Sequence[Segment],
            token: object) -> int:
        """Make a buffer available; returns its buffer id. ``token`` comes back from get_buf."""
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        if token is None:
            raise CallerError("token must not be None")
        n_out = len(out_segs)
        total = n_out + len(in_segs)
        if total == 0:
            raise CallerError("a buffer needs at least one segment")
        head = self.next_avail_idx
        desc = self._desc
        area = self._indirect
        if self.use_indirect and total > 1 and area is not None:
            if total > area.per_head:
                raise CallerError(f"{total} segments exceed the indirect slot of "
                                  f"{area.per_head}")
            if self._num_free < 1:
                raise QueueFull("no free ring position for an indirect table")
            bid = self._free_ids.pop()
            base = bid * area.per_head
            table = area.view
            # Inside an indirect table only WRITE means anything (§2.8.7).
            for j in range(total):
                addr, length = out_segs[j] if j < n_out else in_segs[j - n_out]
                pack_packed_desc(table, (base + j) * PACKED_DESC_SIZE, addr, length, 0,
                                 VRING_DESC_F_WRITE if j >= n_out else 0)
            pack_desc_body(desc, head * PACKED_DESC_SIZE, area.gpa + base * PACKED_DESC_SIZE,
                           total * PACKED_DESC_SIZE, bid)
            head_flags = VRING_DESC_F_INDIRECT | self._avail_used_flags
            ndescs = 1
            self.next_avail_idx = self._advance(head)
        else:
            if self._num_free < total:
                raise QueueFull(f"{total} descriptors needed, {self._num_free} free")
            bid = self._free_ids.pop()
            pos = head
            last = total - 1
            head_flags = 0
            for j in range(total):
                addr, length = out_segs[j] if j < n_out else in_segs[j - n_out]
                flags = (self._avail_used_flags | (VRING_DESC_F_NEXT if j < last else 0)
                         | (VRING_DESC_F_WRITE if j >= n_out else 0))
                if j == 0:
                    # The head's flags are stored last, below: they publish the chain.
                    head_flags = flags
                    pack_desc_body(desc, pos * PACKED_DESC_SIZE, addr, length, bid)
                else:
                    # The id in every descriptor: the spec reads it from the
                    # last (§2.8.6), QEMU from the first; Linux writes all.
                    pack_packed_desc(desc, pos * PACKED_DESC_SIZE, addr, length, bid, flags)
                pos = self._advance(pos)
            ndescs = total
            self.next_avail_idx = pos
        self._tokens[bid] = token
        self._ndescs[bid] = ndescs
        self._num_free -= ndescs
        self._outstanding += 1
        self.num_added += ndescs
        # Everything above first, then the one store that makes it available
        # (x86-64 keeps stores in order; core/barrier.py).
        self._desc16[head * D16_PER_DESC + D16_FLAGS] = head_flags
        return bid

    # ------------------------------------------------------------------- kick
    def kick_prepare(self) -> bool:
        """Whether the device must be notified of the buffers added since the last call."""
        # Publish the new flags before reading the device's suppression (lost wake-up).
        full_fence()
        added = self.num_added
        self.num_added = 0
        snapshot = self._device32[0]  # off_wrap and flags from the same instant
        flags = snapshot >> 16
        if flags != VRING_PACKED_EVENT_FLAG_DESC:
            return flags != VRING_PACKED_EVENT_FLAG_DISABLE
        if added >= self.num:
            # Every ring position was made available since the last decision,
            # so whichever one the device named was among them.  (Linux's
            # 16-bit arithmetic would need the count below 2**16; a sans-I/O
            # driver that decides late can pass that.)
            return True
        off_wrap = snapshot & 0xFFFF
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.avail_wrap_counter:
            # The event lies in the previous lap: one ring behind, linearly.
            event -= self.num
        new = self.next_avail_idx
        # vring_need_event(event, new, old = new - added), 16-bit arithmetic.
        return ((new - event - 1) & 0xFFFF) < added

    # ------------------------------------------------------------------- used
    def more_used(self) -> bool:
        """Whether the descriptor at ``last_used_idx`` is used (``more_used_packed``)."""
        flags = self._desc16[self.last_used_idx * D16_PER_DESC + D16_FLAGS]
        return flags & AVAIL_USED_MASK == (AVAIL_USED_MASK if self.used_wrap_counter else 0)

    def get_buf(self) -> tuple[object, int] | None:
        """The next used buffer as (token, length written by the device), or None."""
        got = self._take_one()
        if got is not None and self.event_flags_shadow == VRING_PACKED_EVENT_FLAG_DESC:
            # Ask for an interrupt at the next used descriptor; the fence keeps
            # this store before the next get_buf's read of flags.
            self._driver16[0] = self.last_used_idx | self.used_wrap_counter << 15
            full_fence()
        return got

    def get_bufs(self, max_n: int = 0x10000) -> list[tuple[object, int]]:
        """Up to ``max_n`` used buffers available now, as get_buf would return them one by one.

        ``off_wrap`` is written once, after the last (an older value can only
        cause an extra interrupt).  A bad used descriptor ends the batch
        before it; the next call meets it again and raises.
        """
        out: list[tuple[object, int]] = []
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        while len(out) < max_n:
            if out and not self._next_is_good():
                break
            got = self._take_one()
            if got is None:
                break
            out.append(got)
        if out and self.event_flags_shadow == VRING_PACKED_EVENT_FLAG_DESC:
            self._driver16[0] = self.last_used_idx | self.used_wrap_counter << 15
            full_fence()
        return out

    def _next_is_good(self) -> bool:
        """Whether the next used descriptor, if any, names an outstanding id."""
        base = self.last_used_idx * D16_PER_DESC
        flags = self._desc16[base + D16_FLAGS]
        if flags & AVAIL_USED_MASK != (AVAIL_USED_MASK if self.used_wrap_counter else 0):
            return True
        bid = self._desc16[base + D16_ID]
        return bid < self.num and self._tokens[bid] is not None

    def _take_one(self) -> tuple[object, int] | None:
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        pos = self.last_used_idx
        base = pos * D16_PER_DESC
        desc16 = self._desc16
        # flags once, then (x86-64 keeps loads in order) the fields it publishes.
        flags = desc16[base + D16_FLAGS]
        if flags & AVAIL_USED_MASK != (AVAIL_USED_MASK if self.used_wrap_counter else 0):
            return None
        bid = desc16[base + D16_ID]
        length = self._desc32[pos * D32_PER_DESC + D32_LEN]
        num = self.num
        if bid >= num:
            raise self.mark_broken(f"used id {bid} out of range (queue size {num})")
        token = self._tokens[bid]
        if token is None:
            raise self.mark_broken(f"used id {bid} is not an outstanding buffer")
        self._tokens[bid] = None
        ndescs = self._ndescs[bid]
        self._free_ids.append(bid)
        self._num_free += ndescs
        self._outstanding -= 1
        # Skip the positions the buffer took: the next used descriptor is there.
        pos += ndescs
        if pos >= num:
            pos -= num
            self.used_wrap_counter ^= 1
        self.last_used_idx = pos
        return token, length

    def detach_unused(self) -> list[object]:
        """Take back every outstanding token (after a device reset)."""
        out: list[object] = []
        for bid, token in enumerate(self._tokens):
            if token is not None:
                out.append(token)
                self._tokens[bid] = None
                self._free_ids.append(bid)
                self._num_free += self._ndescs[bid]
        self._outstanding = 0
        return out

    # ------------------------------------------------------------- interrupts
    def disable_cb(self) -> None:
        """Ask the device not to interrupt (a hint; it may still)."""
        if self.event_flags_shadow != VRING_PACKED_EVENT_FLAG_DISABLE:
            self.event_flags_shadow = VRING_PACKED_EVENT_FLAG_DISABLE
            self._driver16[1] = VRING_PACKED_EVENT_FLAG_DISABLE

    def _rearm(self) -> None:
        if self.event_flags_shadow == VRING_PACKED_EVENT_FLAG_DISABLE:
            self.event_flags_shadow = (VRING_PACKED_EVENT_FLAG_DESC if self.event_idx
                                       else VRING_PACKED_EVENT_FLAG_ENABLE)
            self._driver16[1] = self.event_flags_shadow

    def enable_cb_prepare(self) -> int:
        """Re-arm interrupts at the next used descriptor; returns the state for :meth:`poll`.

        Linux's ``virtqueue_enable_cb_prepare_packed``: ``off_wrap`` first,
        then the flags.  The caller fences (or calls :meth:`enable_cb`).
        """
        self._check_usable()
        opaque = self.last_used_idx | self.used_wrap_counter << 15
        if self.event_idx:
            self._driver16[0] = opaque
        self._rearm()
        return opaque

    def poll(self, opaque: int) -> bool:
        """Whether a used descriptor is at the position ``opaque`` names (``virtqueue_poll``)."""
        flags = self._desc16[(opaque & 0x7FFF) * D16_PER_DESC + D16_FLAGS]
        return flags & AVAIL_USED_MASK == (AVAIL_USED_MASK if opaque >> 15 & 1 else 0)

    def enable_cb(self) -> bool:
        """Re-arm interrupts at the next used buffer; True if more work arrived meanwhile.

        A True answer means an interrupt may not come for buffers already
        used: the caller must poll get_buf again (Linux's
        ``virtqueue_enable_cb`` returns the negation).
        """
        opaque = self.enable_cb_prepare()
        full_fence()
        return self.poll(opaque)

    def enable_cb_delayed(self) -> bool:
        """Re-arm interrupts after about 3/4 of the descriptors in flight are used.

        Returns True if a used buffer is already waiting (poll again): like
        Linux's ``virtqueue_enable_cb_delayed_packed``, which looks at the
        next descriptor only, not at how many were used.
        """
        self._check_usable()
        if self.event_idx:
            bufs = (self.num - self._num_free) * 3 // 4
            pos = self.last_used_idx + bufs
            wrap = self.used_wrap_counter
            if pos >= self.num:
                pos -= self.num
                wrap ^= 1
            self._driver16[0] = pos | wrap << 15
        self._rearm()
        full_fence()
        return self.more_used()
