"""The one walk of a split-ring descriptor chain, VIRTIO 1.2 §2.7.5 and §2.7.5.3.

Every device-side pop — the scalar :meth:`SplitDeviceQueue.pop` and the
batched :class:`pyvirtio.batch.DeviceBatch` — takes the buffers of any chain
its fast path does not fully check from :func:`iter_chain`, so every rule for
hostile chains lives here (the fast paths take only chains of one or two
direct descriptors whose checks they repeat, and leave anything else here):

* each descriptor is unpacked once into locals (no double fetch);
* an indirect descriptor must be negotiated, carry no ``NEXT``, and name a
  table whose length is a positive multiple of 16; an indirect descriptor
  inside an indirect table is refused.  It may end a chain of direct
  descriptors (§2.7.5.3.2: the device MUST handle "zero or more normal
  chained descriptors followed by a single descriptor with
  flags&VIRTQ_DESC_F_INDIRECT", as Linux vhost's ``get_vq_desc`` does); since
  it carries no ``NEXT``, it is always the last one there;
* readable descriptors come before writable ones (§2.7.4.2);
* ``next`` must lie inside the current table, and the walk stops after
  at most the queue size descriptors of the ring's table plus
  :func:`indirect_hop_limit` of the indirect one, so a loop cannot hang it.

Violations raise :class:`PeerError`; the caller marks its queue broken.
Translation of each buffer is the caller's (a view, a region offset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pyvirtio.core.errors import PeerError
from pyvirtio.core.layout import DESC_SIZE, unpack_desc
from pyvirtio.core.spec import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

#: Most descriptors an indirect chain may have on a queue smaller than this.
#: §2.7.5.3.1 bounds a chain by the queue size, but drivers do put a few more
#: entries in the indirect table of a tiny queue; QEMU (VIRTQUEUE_MAX_SIZE) and
#: Linux vhost (UIO_MAXIOV) accept 1024.  An indirect table's length is the
#: driver's (up to 2^28 entries): its walk needs a bound of its own.
MAX_INDIRECT_CHAIN = 1024


def indirect_hop_limit(entries: int, num: int) -> int:
    """Most descriptors walked in an indirect table of ``entries`` on a queue of ``num``."""
    return min(entries, max(num, MAX_INDIRECT_CHAIN))


def iter_chain(table: memoryview, first: tuple[int, int, int, int], num: int,
               indirect_ok: bool,
               map_table: Callable[[int, int], memoryview]) -> Iterator[tuple[int, int, bool]]:
    """Yield (guest address, length, writable) for each buffer of a chain.

    ``table`` is the descriptor table, ``first`` the head descriptor already
    unpacked from it, ``num`` the queue size, and ``map_table`` translates an
    indirect table's guest range (raising PeerError when it is unmapped).
    """
    limit = hop_limit = num
    hops = 0
    in_indirect = False
    seen_write = False
    addr, length, flags, nxt = first
    while True:
        if flags & VRING_DESC_F_INDIRECT:
            if not indirect_ok:
                raise PeerError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            if in_indirect:
                raise PeerError("indirect descriptor inside an indirect table")
            if flags & VRING_DESC_F_NEXT:
                raise PeerError("indirect descriptor with VRING_DESC_F_NEXT")
            if length == 0 or length % DESC_SIZE:
                raise PeerError(f"indirect table length {length} is not a "
                                f"positive multiple of 16")
            table = map_table(addr, length)
            limit = length // DESC_SIZE
            hop_limit = indirect_hop_limit(limit, num)
            # The table's bound is its own; the direct prefix had the ring's.
            hops = 0
            in_indirect = True
            addr, length, flags, nxt = unpack_desc(table, 0)
            continue
        writable = bool(flags & VRING_DESC_F_WRITE)
        if writable:
            seen_write = True
        elif seen_write:
            raise PeerError("readable descriptor after a writable one")
        yield addr, length, writable
        hops += 1
        if not flags & VRING_DESC_F_NEXT:
            return
        if hops >= hop_limit:
            raise PeerError(f"descriptor chain longer than {hop_limit} descriptors "
                            f"(table of {limit}): a loop or an oversized chain")
        if nxt >= limit:
            raise PeerError(f"descriptor next={nxt} out of range (table of {limit})")
        addr, length, flags, nxt = unpack_desc(table, nxt * DESC_SIZE)
