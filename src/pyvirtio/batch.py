"""Batched split-ring operations over numpy views, VIRTIO 1.2 §2.7 (optional: ``pyvirtio[batch]``).

The scalar ring sides (:mod:`pyvirtio.core.split_device`,
:mod:`pyvirtio.core.split_driver`) spend about a microsecond of interpreted
Python per descriptor (a third of that compiled with mypyc, setup.py).  The
classes here do the same work for many heads at once with numpy views over
the same ring bytes, on the same queue state (same indices, same ``broken``
marking, same hostile-input checks).  They reach that state only through the
queues' documented batch interfaces (``SplitDeviceQueue.pop_window`` /
``commit_pops`` / ``pop_failed``; ``SplitDriverQueue.take_free`` /
``record_heads`` / ``publish_avail`` / ``take_used``), so every rule about
indices, in-flight heads and broken queues stays in the queue classes.

This module lives outside :mod:`pyvirtio.core` because it needs numpy, which
the core does not: install it with ``pip install 'pyvirtio[batch]'``.

* :class:`DeviceBatch` — ``pop`` up to N heads (§2.7.6 available ring, §2.7.5
  descriptor chains, §2.7.5.3 indirect tables via the scalar walk), ``push``
  N used elements and publish ``used.idx`` once (§2.7.8), ``avail_event``
  published as the scalar pop does (§2.7.10);
* :class:`DriverBatch` — ``add`` N chains of k descriptors from the free list
  and publish ``avail.idx`` once (§2.7.13), ``get`` up to N used buffers and
  publish ``used_event`` once (§2.7.7.2) — the latter is
  ``SplitDriverQueue.take_used`` (``get_bufs``), with arrays for results.

Each operation picks its path by size: below a measured threshold a Python
loop (the scalar algorithm), above it numpy.  Both give byte-identical rings
and identical results (``tests/test_batch.py`` checks it).

A batch is "the scalar loop, fused": it stops before the first bad entry and
returns the good prefix; the bad entry is met again by the next call, which
(like the scalar call) marks the queue broken and raises :class:`PeerError`.
So a hostile ring breaks a batched queue exactly where it breaks a scalar one.

Memory ordering is the scalar one (barrier.py): numpy stores are plain x86-64
stores issued in program order (entries, then the index), and every guest
value is copied out of shared memory once (gather/``copy``) before it is
checked, so checks and uses see the same fetch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

try:
    import numpy as np
    import numpy.typing as npt
except ImportError as _exc:  # pragma: no cover - the test environment has numpy
    raise ImportError("pyvirtio.batch needs numpy, which pyvirtio's core does not: "
                      "pip install 'pyvirtio[batch]'") from _exc
from mypy_extensions import mypyc_attr

from pyvirtio.core.chain import iter_chain
from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError, QueueFull
from pyvirtio.core.layout import DESC_SIZE, unpack_desc
from pyvirtio.core.memory import Region
from pyvirtio.core.spec import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from pyvirtio.core.split_device import Element, SplitDeviceQueue
from pyvirtio.core.split_driver import SplitDriverQueue

__all__ = [
    "DESC_DTYPE",
    "USED_ELEM_DTYPE",
    "Chains",
    "DeviceBatch",
    "DriverBatch",
    "UsedBatch",
]

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
"""One descriptor, §2.7.5 (16 bytes)."""
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])
"""One used-ring element, §2.7.8 (8 bytes)."""

IntArray = npt.NDArray[np.intp]
#: Heads as popped: the available ring's own uint16 (a copy), or intp.
HeadArray = npt.NDArray[np.integer[Any]]
U64Array = npt.NDArray[np.uint64]
U32Array = npt.NDArray[np.uint32]
BoolArray = npt.NDArray[np.bool_]

# Crossovers measured on the 2-core reference machine (chains of 1 and 3
# descriptors): below these counts the Python loop beats numpy's fixed cost of
# roughly a microsecond per array operation.
POP_THRESHOLD = 20
PUSH_THRESHOLD = 2
ADD_THRESHOLD = 8

# Chains longer than this many descriptors leave the vectorised walk and take
# the scalar one (which applies the queue-size hop limit).
VECTOR_HOPS = 8

_NEXT = VRING_DESC_F_NEXT
_WRITE = VRING_DESC_F_WRITE
_INDIRECT = VRING_DESC_F_INDIRECT
_EMPTY_I = np.zeros(0, np.intp)
_EMPTY_U64 = np.zeros(0, np.uint64)
_EMPTY_U32 = np.zeros(0, np.uint32)
_EMPTY_B = np.zeros(0, np.bool_)
_ARANGE = np.arange(1 << 16, dtype=np.intp)
_ARANGE.flags.writeable = False
_ZEROS_I = np.zeros(1 << 16, dtype=np.intp)
# What a burst's writable mask is when every segment is readable, or every one
# writable (a transmit ring's, a receive ring's): no per-pop array needed.
# Sized for the most segments a vectorised pop returns: a 32768 ring of 8-hop chains.
_ALL_FALSE = np.zeros(1 << 18, np.bool_)
_ALL_TRUE = np.ones(1 << 18, np.bool_)
_ALL_FALSE.flags.writeable = False
_ALL_TRUE.flags.writeable = False
# ufunc reductions called directly: half the cost of the ndarray methods.
_max = np.maximum.reduce
_min = np.minimum.reduce
_or = np.bitwise_or.reduce
_lor = np.logical_or.reduce
_and = np.bitwise_and.reduce
_land = np.logical_and.reduce
_ZEROS_I.flags.writeable = False

Segment = tuple[int, int, int, bool]
"""(region index, offset in the region, length, writable) of one buffer."""


@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(slots=True)
class Chains:
    """Popped chains as arrays: chain ``i`` owns segments ``seg_start[i]:seg_start[i+1]``.

    A segment is ``seg_len`` bytes at ``seg_offset`` inside ``regions[seg_region]``;
    readable segments of a chain come before its writable ones (checked).
    """

    heads: HeadArray
    seg_start: IntArray
    seg_region: IntArray
    seg_offset: U64Array
    seg_len: U32Array
    seg_writable: BoolArray
    regions: list[Region]
    #: Whether some / every segment is writable, when the pop knew it from the flags it
    #: read (None: :meth:`any_writable` / :meth:`all_writable` look).
    known_any_writable: bool | None = None
    known_all_writable: bool | None = None

    def __len__(self) -> int:
        return len(self.heads)

    def any_writable(self) -> bool:
        """Some segment is device-writable."""
        known = self.known_any_writable
        if known is None:
            known = self.known_any_writable = bool(_lor(self.seg_writable))
        return known

    def all_writable(self) -> bool:
        """Every segment is device-writable (a receive ring's burst)."""
        known = self.known_all_writable
        if known is None:
            known = self.known_all_writable = bool(_land(self.seg_writable))
        return known

    def segments(self, i: int) -> list[Segment]:
        a, b = int(self.seg_start[i]), int(self.seg_start[i + 1])
        return list(zip(self.seg_region[a:b].tolist(), self.seg_offset[a:b].tolist(),
                        self.seg_len[a:b].tolist(), self.seg_writable[a:b].tolist(),
                        strict=True))

    def element(self, i: int) -> Element:
        """Chain ``i`` as the scalar :class:`Element` (memoryviews; readable ones read-only)."""
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        regions = self.regions
        for ri, off, length, w in self.segments(i):
            view = regions[ri].view[off:off + length]
            if w:
                writable.append(view)
            else:
                readable.append(view.toreadonly())
        return Element(int(self.heads[i]), readable, writable)

    def lengths(self, writable: bool) -> npt.NDArray[np.int64]:
        """Per chain, the total bytes of its writable (or readable) segments."""
        n = len(self.heads)
        sel = self.seg_writable if writable else ~self.seg_writable
        per_seg = np.where(sel, self.seg_len, 0).astype(np.int64)
        if n == 0:
            return np.zeros(0, np.int64)
        sums = np.add.reduceat(np.concatenate((per_seg, [0])), self.seg_start[:-1])
        # reduceat gives the element itself for an empty range; chains are never empty.
        return sums.astype(np.int64)


def _empty_chains(regions: list[Region]) -> Chains:
    return Chains(_EMPTY_I, np.zeros(1, np.intp), _EMPTY_I, _EMPTY_U64, _EMPTY_U32,
                  _EMPTY_B, regions)


def _ring_slices(start: int, n: int, num: int) -> tuple[slice, slice | None]:
    """The one or two slices of a ring of ``num`` covering ``n`` entries from ``start``."""
    end = start + n
    if end <= num:
        return slice(start, end), None
    return slice(start, num), slice(0, end - num)


# =============================================================== device side
@mypyc_attr(allow_interpreted_subclasses=True)
class DeviceBatch:
    """Batched pop/push over a :class:`SplitDeviceQueue` (shares its state)."""

    def __init__(self, queue: SplitDeviceQueue) -> None:
        self.q = queue
        rings = queue.rings
        num = queue.num
        self.num = num
        # Descriptors as two u64 words: plain-dtype gathers are much cheaper
        # than structured ones; fields are views of a gathered copy.
        self._desc = rings.desc
        self._desc2 = np.frombuffer(rings.desc, np.uint64, count=2 * num).reshape(num, 2)
        self._avail_ring = np.frombuffer(rings.avail16, np.uint16)[2:2 + num]
        used = np.frombuffer(rings.used32, np.uint32)
        self._used_id = used[1:1 + 2 * num:2]
        self._used_len = used[2:2 + 2 * num:2]
        self._reg_key: list[Region] = []
        self._reg_gpa = _EMPTY_U64
        self._reg_size = _EMPTY_U64

    # --------------------------------------------------------------- regions
    def _regions(self) -> list[Region]:
        memory = self.q.memory
        sole = memory.sole_region
        key = self._reg_key
        if sole is not None and len(key) == 1 and key[0] is sole:
            return key
        regions = memory.regions
        if len(key) != len(regions) or any(a is not b for a, b in zip(key, regions,
                                                                      strict=True)):
            self._reg_key = list(regions)
            self._reg_gpa = np.array([r.gpa for r in regions], np.uint64)
            self._reg_size = np.array([r.size for r in regions], np.uint64)
        return self._reg_key

    def _locate(self, addr: U64Array, length: U32Array,
                regions: list[Region]) -> tuple[IntArray, U64Array, BoolArray | None]:
        """(region index, offset, ok mask or None if all ok) per segment."""
        if len(regions) == 1:
            r = regions[0]
            ri = _ZEROS_I[:len(addr)]
            off = addr - r.gpa
            size = r.size
            # The common case in four reductions: the largest offset plus the
            # largest length fits (an addr below gpa wraps off past every size).
            if (len(off) and int(_max(off)) + int(_max(length)) <= size
                    and int(_min(length)) > 0):
                return ri, off, None
            end = off + length
            ok = (end > off) & (end <= size)
            return ri, off, ok
        if not regions:
            z = np.zeros(len(addr), np.bool_)
            return np.zeros(len(addr), np.intp), addr.copy(), z
        ri = np.searchsorted(self._reg_gpa, addr, side="right").astype(np.intp) - 1
        inside = ri >= 0
        ri[~inside] = 0
        off = addr - self._reg_gpa[ri]
        end = off + length
        ok = inside & (end > off) & (end <= self._reg_size[ri])
        if _land(ok):
            return ri, off, None
        return ri, off, ok

    # ------------------------------------------------------------------- pop
    def pop(self, max_n: int) -> Chains:
        """Pop up to ``max_n`` chains (fewer if fewer are available, or before a bad one).

        Raises :class:`PeerError` (and marks the queue broken) only when the
        very first available entry is bad, exactly as the scalar ``pop`` would.
        """
        q = self.q
        n = q.pop_window(max_n)
        regions = self._regions()
        if n <= 0:
            return _empty_chains(regions)
        num = self.num
        s1, s2 = _ring_slices(q.last_avail_idx & (num - 1), n, num)
        ring = self._avail_ring
        # A copy: the heads are read from the guest's ring once, and pushed as read.
        if s2 is None:
            heads: HeadArray = ring[s1].copy()
        else:
            heads = np.concatenate((ring[s1], ring[s2]))
        if n < POP_THRESHOLD:
            return self._pop_scalar(heads, regions)
        return self._pop_vector(heads, regions)

    def _walk(self, head: int, regions: list[Region]) -> list[Segment]:
        """The scalar chain walk (core.chain), as segments; PeerError unmarked."""
        q = self.q
        memory = q.memory
        region_of = memory.region_of
        single = regions[0] if len(regions) == 1 else None
        segs: list[Segment] = []
        table = self._desc
        first = unpack_desc(table, head * DESC_SIZE)
        for addr, length, is_write in iter_chain(table, first, q.num, q.indirect,
                                                 memory.translate):
            r = region_of(addr, length)
            segs.append((0 if r is single else regions.index(r), addr - r.gpa, length, is_write))
        return segs

    def _pop_scalar(self, heads: HeadArray, regions: list[Region]) -> Chains:
        num = self.num
        walk = self._walk
        table = self._desc
        single = regions[0] if len(regions) == 1 else None
        gpa, size = (single.gpa, single.size) if single is not None else (0, -1)
        starts = [0]
        segs: list[Segment] = []
        hl = heads.tolist()
        done = 0
        for h in hl:
            if h >= num:
                if done == 0:
                    raise self.q.pop_failed(h, None)
                break
            # One direct descriptor inside the only region: no walk needed.  On
            # any doubt the walk re-reads and decides; its values alone are used.
            addr, length, flags, _ = unpack_desc(table, h * DESC_SIZE)
            off = addr - gpa
            if not flags & (_NEXT | _INDIRECT) and off >= 0 and 0 < length <= size - off:
                segs.append((0, off, length, bool(flags & _WRITE)))
            else:
                try:
                    segs.extend(walk(h, regions))
                except PeerError as exc:
                    if done == 0:
                        raise self.q.pop_failed(h, exc) from None
                    break
            starts.append(len(segs))
            done += 1
        self.q.commit_pops(done)
        return self._chains_from(hl[:done], starts, segs, regions)

    @staticmethod
    def _chains_from(heads: list[int], starts: list[int], segs: list[Segment],
                     regions: list[Region]) -> Chains:
        if segs:
            ri, off, ln, w = zip(*segs, strict=True)
            return Chains(np.array(heads, np.intp), np.array(starts, np.intp),
                          np.array(ri, np.intp), np.array(off, np.uint64),
                          np.array(ln, np.uint32), np.array(w, np.bool_), regions)
        return _empty_chains(regions)

    def _pop_vector(self, heads: HeadArray, regions: list[Region]) -> Chains:
        num = self.num
        n = len(heads)
        special: BoolArray | None = None
        orig = heads
        desc = self._desc2
        try:
            # take: several times faster than desc[heads]; it checks every head is < num.
            d = desc.take(heads, axis=0)
        except IndexError:
            special = heads >= num
            heads = np.where(special, 0, heads)
            d = desc.take(heads, axis=0)
        flags = d.view(np.uint16)[:, 6]
        seen = int(_or(flags))
        ids: IntArray | None = None
        starts: IntArray = _ARANGE[:n + 1]
        if seen & (_NEXT | _INDIRECT):
            # Walk the chains round by round, one gather per hop.  Anything
            # unusual becomes "special" and takes the scalar walk, which also
            # gives the exact error; whole-chain checks run once at the end.
            if seen & _INDIRECT:
                ind = (flags & _INDIRECT).astype(np.bool_)
                special = ind if special is None else special | ind
            cont = flags & _NEXT
            if special is not None:
                cont &= ~special
            active = cont.nonzero()[0]
            rec_l = [d]
            ids_l = [_ARANGE[:n]]
            regular = len(active) == n
            nxt = d.view(np.uint16)[active, 7]
            hop = 1
            while len(active):
                if hop >= num or hop >= VECTOR_HOPS or int(_max(nxt)) >= num:
                    # Too long (or a loop), or a next out of range: scalar walk.
                    if special is None:
                        special = np.zeros(n, np.bool_)
                    special[active] = True
                    regular = False
                    break
                dr = desc.take(nxt, axis=0)
                rec_l.append(dr)
                ids_l.append(active)
                dr16 = dr.view(np.uint16)
                c = (dr16[:, 6] & _NEXT).nonzero()[0]
                if len(c) != len(active):
                    regular = regular and len(c) == 0
                    active = active[c]
                nxt = dr16[c, 7]
                hop += 1
            k = len(rec_l)
            if regular:
                # Every chain has k descriptors: interleave the rounds.
                grid = np.empty((n, k, 2), np.uint64)
                for j, r in enumerate(rec_l):
                    grid[:, j] = r
                allr = grid.reshape(n * k, 2)
                ids = np.repeat(_ARANGE[:n], k)
                starts = _ARANGE[:n * k + 1:k]
            else:
                ids = np.concatenate(ids_l)
                order = np.argsort(ids, kind="stable")
                ids = ids[order]
                allr = np.concatenate(rec_l)[order]
                starts = np.searchsorted(ids, _ARANGE[:n + 1])
            flags = allr.view(np.uint16)[:, 6]
            seen = int(_or(flags))  # over every segment now, not the heads only
            addr: U64Array = allr[:, 0]
            length: U32Array = allr.view(np.uint32)[:, 2]
            # Within a chain: no readable segment after a writable one, and no
            # indirect descriptor after the first (§2.7.5, §2.7.5.3.1).
            t = flags & _WRITE
            step = (t[:-1] > t[1:]) | (flags[1:] & _INDIRECT).astype(np.bool_)
            step &= ids[1:] == ids[:-1]
            if _lor(step):
                if special is None:
                    special = np.zeros(n, np.bool_)
                special[ids[1:][step]] = True
        else:
            addr = d[:, 0]
            length = d.view(np.uint32)[:, 2]
        any_w = bool(seen & _WRITE)
        all_w = any_w and bool(int(_and(flags)) & _WRITE)
        if not any_w:
            writable = _ALL_FALSE[:len(flags)]
        elif all_w:
            writable = _ALL_TRUE[:len(flags)]
        else:
            writable = (flags & _WRITE).astype(np.bool_)
        ri, off, ok = self._locate(addr, length, regions)
        if ok is not None:
            bad_chain = ~ok if ids is None else np.bincount(ids[~ok], minlength=n) > 0
            special = bad_chain if special is None else special | bad_chain
        if special is not None and _lor(special):
            return self._pop_mixed(orig, special, ids, ri, off, length, writable, regions)
        self.q.commit_pops(n)
        # length views ``d`` (or the rounds' copy), not guest memory: no copy needed.
        return Chains(heads, starts, ri, off, length, writable, regions, any_w, all_w)

    def _pop_mixed(self, heads: HeadArray, special: BoolArray, ids: IntArray | None,
                   ri: IntArray, off: U64Array, length: U32Array, writable: BoolArray,
                   regions: list[Region]) -> Chains:
        """Some chains need the scalar walk: indirect, long, or bad (cut the batch there)."""
        n = len(heads)
        num = self.num
        if ids is None:
            ids = _ARANGE[:n]
        vec_starts = np.searchsorted(ids, _ARANGE[:n + 1]).tolist()
        sp = np.flatnonzero(special).tolist()
        head_l = heads.tolist()
        ri_l, off_l, len_l, w_l = ri.tolist(), off.tolist(), length.tolist(), writable.tolist()
        segs: list[Segment] = []
        starts = [0]
        cut = n
        sp_set = set(sp)
        for i in range(n):
            if i in sp_set:
                h = head_l[i]
                if h >= num:
                    if i == 0:
                        raise self.q.pop_failed(h, None)
                    cut = i
                    break
                try:
                    segs.extend(self._walk(h, regions))
                except PeerError as exc:
                    if i == 0:
                        raise self.q.pop_failed(h, exc) from None
                    cut = i
                    break
            else:
                a, b = vec_starts[i], vec_starts[i + 1]
                segs.extend(zip(ri_l[a:b], off_l[a:b], len_l[a:b], w_l[a:b], strict=True))
            starts.append(len(segs))
        self.q.commit_pops(cut)
        return self._chains_from(head_l[:cut], starts, segs, regions)

    # ------------------------------------------------------------------ push
    def push(self, heads: npt.ArrayLike, lengths: npt.ArrayLike) -> None:
        """Fill one used element per head and publish them with one ``used.idx`` store.

        The same as ``fill(heads[i], lengths[i], i)`` for each ``i`` then
        ``flush(len(heads))`` (§2.7.8): entries first, then the index.
        """
        n = self.fill(heads, lengths)
        self.q.flush(n)

    def fill(self, heads: npt.ArrayLike, lengths: npt.ArrayLike, offset: int = 0) -> int:
        """Write used elements ``offset``, ``offset + 1``, ... past ``used.idx`` without
        publishing them (the queue's ``fill`` for many heads); returns how many.  They go
        out with the queue's next ``flush`` of ``offset`` + that many."""
        q = self.q
        h = np.asarray(heads)
        ln = np.asarray(lengths)
        n = len(h) if h.ndim == 1 else -1
        if h.ndim != 1 or ln.shape != h.shape:
            raise CallerError("push needs one length per head")
        if n and not (_fits_u32(h) and _fits_u32(ln)):
            raise CallerError("used ids and lengths must be 32-bit unsigned integers")
        if n < PUSH_THRESHOLD:
            fill = q.fill
            for i, (hh, ll) in enumerate(zip(h.tolist(), ln.tolist(), strict=True)):
                fill(hh, ll, offset + i)
            return n
        num = self.num
        s1, s2 = _ring_slices((q.used_idx + offset) & (num - 1), n, num)
        uid, ulen = self._used_id, self._used_len
        if s2 is None:
            uid[s1] = h
            ulen[s1] = ln
        else:
            k = s1.stop - s1.start
            uid[s1] = h[:k]
            ulen[s1] = ln[:k]
            uid[s2] = h[k:]
            ulen[s2] = ln[k:]
        return n

    def push_chains(self, chains: Chains, lengths: npt.ArrayLike) -> None:
        """Push every chain of a popped batch with its written length."""
        self.push(chains.heads, lengths)


# =============================================================== driver side
@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(slots=True)
class UsedBatch:
    """Used buffers: ``tokens[i]`` came back with ``lengths[i]`` bytes written."""

    tokens: npt.NDArray[Any]
    lengths: U32Array

    def __len__(self) -> int:
        return len(self.lengths)


@mypyc_attr(allow_interpreted_subclasses=True)
class DriverBatch:
    """Batched add/get over a :class:`SplitDriverQueue` (shares its state)."""

    def __init__(self, queue: SplitDriverQueue) -> None:
        self.q = queue
        rings = queue.rings
        num = queue.num
        self.num = num
        self._desc: npt.NDArray[Any] = np.frombuffer(rings.desc, DESC_DTYPE, count=num)
        self._avail_ring = np.frombuffer(rings.avail16, np.uint16)[2:2 + num]
        area = queue.indirect_area
        self._area: npt.NDArray[Any] | None = None
        if area is not None:
            self._area = np.frombuffer(area.view, DESC_DTYPE,
                                       count=num * area.per_head).reshape(num, area.per_head)

    # ------------------------------------------------------------------- add
    def add(self, addrs: npt.ArrayLike, lengths: npt.ArrayLike, n_out: int,
            tokens: npt.ArrayLike) -> IntArray:
        """Add ``N`` buffers of ``k`` segments each and publish them with one ``avail.idx``.

        ``addrs`` and ``lengths`` have shape (N, k) (or (N,) for k = 1); the
        first ``n_out`` segments of each buffer are readable, the rest
        writable; ``tokens`` are N integers returned by :meth:`get`.  The
        result is the N heads.  Unlike N scalar adds this is all or nothing:
        :class:`QueueFull` if the free list cannot take every buffer.
        """
        q = self.q
        if q.broken is not None:
            raise QueueBrokenError(f"queue is broken: {q.broken}")
        a = np.asarray(addrs, dtype=np.uint64)
        ln = np.asarray(lengths, dtype=np.uint32)
        if a.ndim == 1:
            a = a[:, None]
        if ln.ndim == 1:
            ln = ln[:, None]
        tok = np.asarray(tokens)
        if a.shape != ln.shape or a.ndim != 2 or tok.shape != (a.shape[0],):
            raise CallerError("add needs addrs and lengths of shape (N, k) and N tokens")
        n, k = a.shape
        if n == 0:
            return _EMPTY_I
        if k == 0:
            raise CallerError("a buffer needs at least one segment")
        if not 0 <= n_out <= k:
            raise CallerError(f"n_out {n_out} is not in 0..{k}")
        if tok.dtype.kind not in "iu":
            raise CallerError("batched tokens are integers")
        if n < ADD_THRESHOLD:
            return self._add_scalar(a, ln, n_out, tok)
        area = q.indirect_area
        indirect = q.use_indirect and k > 1 and area is not None and self._area is not None
        need = n if indirect else n * k
        if need > q.num_free:
            raise QueueFull(f"{need} descriptors needed, {q.num_free} free")
        if indirect and area is not None and k > area.per_head:
            raise CallerError(f"{k} segments exceed the indirect slot of {area.per_head}")
        flags = _chain_flags(k, n_out)
        taken = np.array(q.take_free(need), np.intp)
        desc = self._desc
        if indirect:
            assert area is not None and self._area is not None
            heads = taken
            rec = np.empty((n, k), DESC_DTYPE)
            rec["addr"] = a
            rec["len"] = ln
            rec["flags"] = flags
            nx = np.zeros(k, np.uint16)
            nx[:-1] = _ARANGE[1:k]
            rec["next"] = nx
            self._area[heads, :k] = rec
            top = np.empty(n, DESC_DTYPE)
            top["addr"] = area.gpa + (heads * (area.per_head * DESC_SIZE)).astype(np.uint64)
            top["len"] = k * DESC_SIZE
            top["flags"] = _INDIRECT
            top["next"] = 0
            desc[heads] = top
            chains_v: list[tuple[int, ...]] | None = None
        else:
            idx2 = taken.reshape(n, k)
            heads = idx2[:, 0]
            rec = np.empty((n, k), DESC_DTYPE)
            rec["addr"] = a
            rec["len"] = ln
            rec["flags"] = flags
            if k > 1:
                rec["next"][:, :-1] = idx2[:, 1:]
            rec["next"][:, -1] = 0
            desc[taken] = rec.reshape(-1)
            chains_v = None if k == 1 else list(map(tuple, idx2.tolist()))
        q.record_heads(heads.tolist(), tok.tolist(), chains_v)
        num = self.num
        s1, s2 = _ring_slices(q.avail_idx_shadow & (num - 1), n, num)
        ring = self._avail_ring
        if s2 is None:
            ring[s1] = heads
        else:
            m = s1.stop - s1.start
            ring[s1] = heads[:m]
            ring[s2] = heads[m:]
        q.publish_avail(n)
        return heads

    def _add_scalar(self, a: npt.NDArray[np.uint64], ln: U32Array, n_out: int,
                    tok: npt.NDArray[Any]) -> IntArray:
        q = self.q
        n, k = a.shape
        need = n if (q.use_indirect and k > 1 and q.indirect_area is not None) else n * k
        if need > q.num_free:
            raise QueueFull(f"{need} descriptors needed, {q.num_free} free")
        add = q.add
        out: list[int] = []
        for segs_a, segs_l, t in zip(a.tolist(), ln.tolist(), tok.tolist(), strict=True):
            segs = list(zip(segs_a, segs_l, strict=True))
            out.append(add(segs[:n_out], segs[n_out:], t))
        return np.array(out, np.intp)

    # ------------------------------------------------------------------- get
    def get(self, max_n: int) -> UsedBatch:
        """Up to ``max_n`` used buffers, publishing ``used_event`` once (§2.7.7.2).

        This is ``SplitDriverQueue.take_used(max_n)`` (``get_bufs``) with
        arrays for results: it stops before the first bad used element (id
        out of range or not an outstanding head), and raises
        :class:`PeerError` (queue broken) if that is the first one.  Tokens
        come back as an int64 array when they are all integers.
        """
        toks, lens = self.q.take_used(max_n)
        if not toks:
            return UsedBatch(np.zeros(0, np.int64), _EMPTY_U32)
        return UsedBatch(_token_array(toks), np.array(lens, np.uint32))


def _fits_u32(a: npt.NDArray[Any]) -> bool:
    """Every element is an integer in 0..2**32-1 (no range scan for narrow unsigned types)."""
    if a.dtype.kind == "u" and a.dtype.itemsize <= 4:
        return True
    return a.dtype.kind in "iu" and int(_min(a)) >= 0 and int(_max(a)) <= 0xFFFFFFFF


@functools.cache
def _chain_flags(k: int, n_out: int) -> npt.NDArray[np.uint16]:
    """Descriptor flags of a k-segment chain whose first n_out segments are readable."""
    flags = np.where(_ARANGE[:k] >= n_out, _WRITE, 0).astype(np.uint16)
    flags[:-1] |= _NEXT
    flags.flags.writeable = False
    return flags


def _token_array(toks: Sequence[object]) -> npt.NDArray[Any]:
    """int64 when every token is an int (the batched API's tokens), else objects."""
    try:
        arr = np.array(toks)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is not None and arr.dtype == np.int64 and arr.shape == (len(toks),):
        return arr
    out = np.empty(len(toks), object)
    for i, t in enumerate(toks):
        out[i] = t
    return out
