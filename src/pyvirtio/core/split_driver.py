"""Driver side of the split virtqueue, VIRTIO 1.2 §2.7 (what Linux's virtio_ring.c does).

* :meth:`SplitDriverQueue.add` places a scatter-gather list (readable
  segments, then writable ones) in the descriptor table — or in an indirect
  table (§2.7.5.3) when negotiated and the list has more than one segment —
  and publishes its head in the available ring (§2.7.13);
* :meth:`~SplitDriverQueue.kick_prepare` is the notification decision of
  §2.7.10 exactly as Linux's ``virtqueue_kick_prepare``: a full fence, then
  ``VRING_USED_F_NO_NOTIFY`` or ``vring_need_event(avail_event, new, old)``
  (with EVENT_IDX, 2**16 or more adds since the last decision always answer
  "kick", where Linux kicks from ``virtqueue_add_split`` after 65,535);
* :meth:`~SplitDriverQueue.get_buf` returns (token, written length) from the
  used ring and publishes ``used_event`` (§2.7.7.2);
* :meth:`~SplitDriverQueue.disable_cb`, :meth:`~SplitDriverQueue.enable_cb`,
  :meth:`~SplitDriverQueue.enable_cb_delayed` suppress and re-arm interrupts.

The device is a peer too: a used id that is not an outstanding head, or a
used index that runs ahead of what was made available, raises
:class:`PeerError` and marks the queue broken.  The driver keeps its own
record of each chain (it never trusts ``next`` fields read back from shared
memory), like Linux's ``desc_extra``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from mypy_extensions import mypyc_attr

from pyvirtio.core.barrier import full_fence
from pyvirtio.core.errors import Breakable, CallerError, QueueBrokenError, QueueFull
from pyvirtio.core.layout import DESC_SIZE, RingViews, pack_desc
from pyvirtio.core.spec import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)

Segment = tuple[int, int]
"""A buffer segment: (guest address, length)."""

# take_used reads up to this many used elements one by one, more as a slice.
_READ_BY_ELEMENT: Final = 8


@mypyc_attr(allow_interpreted_subclasses=True)
class IndirectArea:
    """Guest memory for indirect tables: one slot of ``per_head`` descriptors per head."""

    __slots__ = ("gpa", "per_head", "view")

    def __init__(self, gpa: int, view: memoryview, per_head: int) -> None:
        self.gpa = gpa
        self.view = view
        self.per_head = per_head

    @staticmethod
    def size_for(num: int, per_head: int) -> int:
        return num * per_head * DESC_SIZE


@mypyc_attr(allow_interpreted_subclasses=True)
class SplitDriverQueue(Breakable):
    """The driver's view of one split virtqueue. The ring memory must start zeroed."""

    def __init__(self, rings: RingViews, features: int = 0,
                 indirect_area: IndirectArea | None = None) -> None:
        self.rings = rings
        self.num = rings.num
        self._mask = rings.num - 1
        self.event_idx = bool(features >> F_RING_EVENT_IDX & 1)
        self.use_indirect = bool(features >> F_RING_INDIRECT_DESC & 1) and indirect_area is not None
        if indirect_area is not None and len(indirect_area.view) < IndirectArea.size_for(
                self.num, indirect_area.per_head):
            raise CallerError("indirect area too small for the queue")
        self._indirect = indirect_area
        self._desc = rings.desc
        self._avail = rings.avail16
        self._used16 = rings.used16
        self._used32 = rings.used32
        self._used_event_i = 2 + rings.num
        self._avail_event_i = 2 + 4 * rings.num
        self._free: list[int] = list(range(self.num - 1, -1, -1))
        self._tokens: list[object | None] = [None] * self.num
        # The descriptors of each outstanding head's chain (Linux's desc_extra).
        # A head that is not outstanding always holds its shared 1-tuple, so a
        # one-segment add (scalar or batched) need not store anything here.
        self._singles: list[tuple[int, ...]] = [(i,) for i in range(self.num)]
        self._chains: list[tuple[int, ...]] = list(self._singles)
        self.avail_idx_shadow = 0
        self.last_used_idx = 0
        self.num_added = 0
        self.avail_flags_shadow = 0
        self._outstanding = 0
        # Outstanding heads whose chain has several descriptors; while 0, every
        # returned head frees exactly itself (the batched get relies on it).
        self._multi = 0
        self.broken: str | None = None

    # ------------------------------------------------------------------ state
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def outstanding(self) -> int:
        """Buffers made available and not yet returned by get_buf."""
        return self._outstanding

    @property
    def indirect_area(self) -> IndirectArea | None:
        return self._indirect


    # -------------------------------------------------------------------- add
    def add(self, out_segs: Sequence[Segment], in_segs: Sequence[Segment],
            token: object) -> int:
        """Make a buffer available; returns its head. ``token`` comes back from get_buf."""
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        if token is None:
            raise CallerError("token must not be None")
        n_out = len(out_segs)
        total = n_out + len(in_segs)
        if total == 1:
            # One segment, never indirect: the per-request hot path (docs/architecture.md "Speed").
            free = self._free
            if not free:
                raise QueueFull("1 descriptors needed, 0 free")
            head = free.pop()
            if n_out:
                addr, length = out_segs[0]
                pack_desc(self._desc, head * DESC_SIZE, addr, length, 0, 0)
            else:
                addr, length = in_segs[0]
                pack_desc(self._desc, head * DESC_SIZE, addr, length, VRING_DESC_F_WRITE, 0)
            self._tokens[head] = token
            self._outstanding += 1
            shadow = self.avail_idx_shadow
            avail = self._avail
            avail[2 + (shadow & self._mask)] = head
            shadow = (shadow + 1) & 0xFFFF
            self.avail_idx_shadow = shadow
            avail[1] = shadow
            self.num_added += 1
            return head
        if total == 0:
            raise CallerError("a buffer needs at least one segment")
        free = self._free
        if total == 2 and not self.use_indirect and len(free) >= 2:
            # Two direct descriptors (a request and its reply, e.g. virtio-blk):
            # the general loop below, unrolled; same stores in the same order.
            first = free.pop()
            second = free.pop()
            if n_out == 2:
                (a0, l0), (a1, l1) = out_segs
                f0, f1 = VRING_DESC_F_NEXT, 0
            elif n_out == 1:
                a0, l0 = out_segs[0]
                a1, l1 = in_segs[0]
                f0, f1 = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
            else:
                (a0, l0), (a1, l1) = in_segs
                f0, f1 = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
            desc = self._desc
            pack_desc(desc, first * DESC_SIZE, a0, l0, f0, second)
            pack_desc(desc, second * DESC_SIZE, a1, l1, f1, 0)
            self._chains[first] = (first, second)
            self._multi += 1
            self._tokens[first] = token
            self._outstanding += 1
            shadow = self.avail_idx_shadow
            avail = self._avail
            avail[2 + (shadow & self._mask)] = first
            shadow = (shadow + 1) & 0xFFFF
            self.avail_idx_shadow = shadow
            avail[1] = shadow
            self.num_added += 1
            return first
        indirect = self.use_indirect and total > 1 and self._indirect is not None
        if indirect:
            assert self._indirect is not None
            if total > self._indirect.per_head:
                raise CallerError(f"{total} segments exceed the indirect slot of "
                                  f"{self._indirect.per_head}")
            if not free:
                raise QueueFull("no free descriptor for an indirect table")
            head = free.pop()
            area = self._indirect
            base = head * area.per_head
            table = area.view
            for j in range(total):
                addr, length = out_segs[j] if j < n_out else in_segs[j - n_out]
                flags = (VRING_DESC_F_WRITE if j >= n_out else 0) | (
                    VRING_DESC_F_NEXT if j + 1 < total else 0)
                pack_desc(table, (base + j) * DESC_SIZE, addr, length, flags,
                           j + 1 if j + 1 < total else 0)
            pack_desc(self._desc, head * DESC_SIZE, area.gpa + base * DESC_SIZE,
                       total * DESC_SIZE, VRING_DESC_F_INDIRECT, 0)
            self._chains[head] = self._singles[head]
        else:
            if len(free) < total:
                raise QueueFull(f"{total} descriptors needed, {len(free)} free")
            idxs = tuple(free.pop() for _ in range(total))
            desc = self._desc
            last = total - 1
            for j in range(total):
                addr, length = out_segs[j] if j < n_out else in_segs[j - n_out]
                if j < last:
                    pack_desc(desc, idxs[j] * DESC_SIZE, addr, length,
                               (VRING_DESC_F_WRITE if j >= n_out else 0) | VRING_DESC_F_NEXT,
                               idxs[j + 1])
                else:
                    pack_desc(desc, idxs[j] * DESC_SIZE, addr, length,
                               VRING_DESC_F_WRITE if j >= n_out else 0, 0)
            head = idxs[0]
            self._chains[head] = idxs
            self._multi += 1
        self._tokens[head] = token
        self._outstanding += 1
        # Ring entry first, then the index (x86 keeps stores in order; barrier.py).
        shadow = self.avail_idx_shadow
        self._avail[2 + (shadow & self._mask)] = head
        shadow = (shadow + 1) & 0xFFFF
        self.avail_idx_shadow = shadow
        self._avail[1] = shadow
        self.num_added += 1
        return head

    # ------------------------------------------------------------------- kick
    def kick_prepare(self) -> bool:
        """Whether the device must be notified of the buffers added since the last call."""
        # Publish avail.idx before reading avail_event / used.flags (lost wake-up).
        full_fence()
        added = self.num_added
        self.num_added = 0
        if self.event_idx:
            # vring_need_event(avail_event, new, old) inlined, with the distance
            # new - old taken as the true count of adds rather than mod 2**16.
            # Up to 65,535 adds the two are equal.  From 65,536 on, the 16-bit
            # distance wraps (to 0 after exactly 2**16, and the kick would be
            # lost) while the window of indices passed covers every value
            # avail_event can hold, so the answer is "kick" — which the
            # comparison below gives by itself, since its left side is < 2**16.
            # Linux bounds the window instead: virtqueue_add_split calls
            # virtqueue_kick at num_added == 2**16 - 1.  A sans-I/O driver
            # cannot kick from add(), and refusing the 65,536th add would make a
            # queue unusable for a caller that takes its decisions late; the
            # cost here is at most one spurious kick (kicks are hints, §2.7.10),
            # never a lost one, and add() does no extra work.
            return ((self.avail_idx_shadow - self._used16[self._avail_event_i] - 1)
                    & 0xFFFF) < added
        return not self._used16[0] & VRING_USED_F_NO_NOTIFY

    # ------------------------------------------------------------------- used
    def more_used(self) -> bool:
        return self.last_used_idx != self._used16[1]

    def get_buf(self) -> tuple[object, int] | None:
        """The next used buffer as (token, length written by the device), or None."""
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        last = self.last_used_idx
        used_idx = self._used16[1]
        if last == used_idx:
            return None
        if ((used_idx - last) & 0xFFFF) > self.num:
            raise self.mark_broken(f"device moved used.idx from {last} to {used_idx}: "
                                   f"more than the queue size ahead")
        slot = 1 + 2 * (last & self._mask)
        used32 = self._used32
        head = used32[slot]
        length = used32[slot + 1]
        if head >= self.num:
            raise self.mark_broken(f"used id {head} out of range (queue size {self.num})")
        tokens = self._tokens
        token = tokens[head]
        if token is None:
            raise self.mark_broken(f"used id {head} is not an outstanding head")
        tokens[head] = None
        chain = self._chains[head]
        self._free.extend(chain)
        if len(chain) > 1:
            self._chains[head] = self._singles[head]
            self._multi -= 1
        self._outstanding -= 1
        last = (last + 1) & 0xFFFF
        self.last_used_idx = last
        if not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self._avail[self._used_event_i] = last
            full_fence()
        return token, length

    def get_bufs(self, max_n: int = 0x10000) -> list[tuple[object, int]]:
        """Up to ``max_n`` used buffers available now, as get_buf would return them one by one.

        ``used_event`` is published once, after the last one (§2.7.7.2): until
        then the device sees an older value, which can only cause an extra
        interrupt, never a lost one.  A bad used element ends the batch before
        it; the next call (or get_buf) meets it again and raises, exactly as
        get_buf does when it is the first.
        """
        tokens, lengths = self.take_used(max_n)
        return [(token, lengths[i]) for i, token in enumerate(tokens)]

    def take_used(self, max_n: int = 0x10000) -> tuple[list[object], list[int]]:
        """:meth:`get_bufs` as two lists, tokens and written lengths (the one implementation).

        The batched ``DriverBatch.get`` (pyvirtio.batch) is this method too.
        """
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        last = self.last_used_idx
        used_idx = self._used16[1]
        pending = (used_idx - last) & 0xFFFF
        if pending == 0:
            return [], []
        num = self.num
        if pending > num:
            raise self.mark_broken(f"device moved used.idx from {last} to {used_idx}: "
                                   f"more than the queue size ahead")
        n = pending if pending <= max_n else max_n
        if n <= 0:
            return [], []
        # Every used element (id, len) read once into ``flat``: one copy of the
        # ring span (two when it wraps), or element by element for a few,
        # where slicing costs more than it saves.  Checks and results use it.
        used32 = self._used32
        start = last & self._mask
        if n <= _READ_BY_ELEMENT:
            mask = self._mask
            flat: list[int] = []
            for i in range(n):
                slot = 1 + 2 * ((start + i) & mask)
                flat.append(used32[slot])
                flat.append(used32[slot + 1])
        elif start + n <= num:
            flat = used32[1 + 2 * start:1 + 2 * (start + n)].tolist()
        else:
            flat = (used32[1 + 2 * start:1 + 2 * num].tolist()
                    + used32[1:1 + 2 * (start + n - num)].tolist())
        tokens = self._tokens
        out: list[object] = []
        heads: list[int] = []
        lengths: list[int] = []
        for i in range(n):
            head = flat[2 * i]
            if head >= num:
                break
            token = tokens[head]
            if token is None:  # not outstanding, or twice in this batch
                break
            tokens[head] = None
            out.append(token)
            heads.append(head)
            lengths.append(flat[2 * i + 1])
        got = len(out)
        if got == 0:
            # The first one is bad: get_buf's errors, nothing consumed.
            head = flat[0]
            if head >= num:
                raise self.mark_broken(f"used id {head} out of range (queue size {num})")
            raise self.mark_broken(f"used id {head} is not an outstanding head")
        if self._multi:
            chains = self._chains
            singles = self._singles
            extend = self._free.extend
            for head in heads:
                chain = chains[head]
                extend(chain)
                if len(chain) > 1:
                    chains[head] = singles[head]
                    self._multi -= 1
        else:
            # Every outstanding chain is its head alone.
            self._free.extend(heads)
        self._outstanding -= got
        last = (last + got) & 0xFFFF
        self.last_used_idx = last
        if not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self._avail[self._used_event_i] = last
            full_fence()
        return out, lengths

    # ------------------------------------------------------ batch interface
    # What a batched add built on this queue (pyvirtio.batch.DriverBatch) needs
    # to leave the queue exactly as repeated add() calls would: it writes the
    # descriptors and available-ring entries itself (rings.desc / rings.avail16,
    # indirect_area.view) between take_free() and publish_avail().
    def take_free(self, count: int) -> list[int]:
        """Take ``count`` free descriptors, in the order ``count`` one-descriptor adds would.

        :class:`QueueFull` (nothing taken) if fewer are free.
        """
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
        free = self._free
        if count > len(free):
            raise QueueFull(f"{count} descriptors needed, {len(free)} free")
        cut = len(free) - count
        taken = free[cut:]
        del free[cut:]
        taken.reverse()
        return taken

    def record_heads(self, heads: Sequence[int], tokens: Sequence[object],
                     chains: Sequence[tuple[int, ...]] | None = None) -> None:
        """Make ``heads`` (taken with :meth:`take_free`) outstanding with their tokens.

        ``chains[i]`` lists the descriptors of head ``i``'s chain (head first)
        when it has several; None when every head is alone in the table (one
        segment, or an indirect table).  get_buf frees them.
        """
        tok = self._tokens
        for h, t in zip(heads, tokens, strict=True):
            if t is None:
                raise CallerError("token must not be None")
            tok[h] = t
        if chains is not None:
            chain_of = self._chains
            for h, c in zip(heads, chains, strict=True):
                chain_of[h] = c
                if len(c) > 1:
                    self._multi += 1
        self._outstanding += len(heads)

    def publish_avail(self, count: int) -> None:
        """Publish ``count`` available-ring entries written from ``avail_idx_shadow`` on (§2.7.13).

        The entries (and their descriptors) must already be stored: this
        store of ``avail.idx`` is what makes them visible (x86-64 keeps stores
        in order; core/barrier.py).
        """
        shadow = (self.avail_idx_shadow + count) & 0xFFFF
        self.avail_idx_shadow = shadow
        self._avail[1] = shadow
        self.num_added += count

    def detach_unused(self) -> list[object]:
        """Take back every outstanding token (after a device reset)."""
        out: list[object] = []
        for head, token in enumerate(self._tokens):
            if token is not None:
                out.append(token)
                self._tokens[head] = None
                self._free.extend(self._chains[head])
                self._chains[head] = self._singles[head]
        self._outstanding = 0
        self._multi = 0
        return out

    # ------------------------------------------------------------- interrupts
    def disable_cb(self) -> None:
        """Ask the device not to interrupt (a hint; it may still)."""
        if not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
            if self.event_idx:
                # The device ignores flags under EVENT_IDX.  Linux's
                # virtqueue_disable_cb_split writes used_event = 0 here (its
                # "hack" value), once per disable: the device may then still
                # interrupt when used.idx crosses 0, at most once per 2**16
                # buffers, which a driver with interrupts disabled tolerates
                # (they are hints, §2.7.7.2).  Same value as Linux, so a device
                # tested against pyvirtio sees what a Linux guest writes.
                self._avail[self._used_event_i] = 0
            else:
                self._avail[0] = self.avail_flags_shadow

    def _rearm(self) -> None:
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                self._avail[0] = self.avail_flags_shadow

    def enable_cb(self) -> bool:
        """Re-arm interrupts at the next used buffer; True if more work arrived meanwhile.

        A True answer means an interrupt may not come for buffers already
        used: the caller must poll get_buf again (Linux's
        ``virtqueue_enable_cb`` returns the negation).
        """
        self._check_usable()
        self._rearm()
        self._avail[self._used_event_i] = self.last_used_idx
        full_fence()
        return self.more_used()

    def enable_cb_delayed(self) -> bool:
        """Re-arm interrupts after about 3/4 of the outstanding buffers are used.

        Returns True if that many were already used meanwhile (poll again).
        """
        self._check_usable()
        self._rearm()
        bufs = ((self.avail_idx_shadow - self.last_used_idx) & 0xFFFF) * 3 // 4
        self._avail[self._used_event_i] = (self.last_used_idx + bufs) & 0xFFFF
        full_fence()
        return ((self._used16[1] - self.last_used_idx) & 0xFFFF) > bufs
