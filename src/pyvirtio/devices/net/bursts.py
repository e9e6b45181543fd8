"""The batched paths of virtio-net: transmit (VIRTIO 1.2 §5.1.6.2) and loopback receive
(§5.1.6.3), with numpy.

A traffic generator fills the transmit ring with hundreds of small frames
per kick.  Taking them one :class:`~pyvirtio.core.split_device.Element` at a
time costs a few microseconds of interpreted Python per frame; here a whole
burst is popped with :class:`~pyvirtio.batch.DeviceBatch` (descriptor walk
and checks on arrays), the frames' Ethernet addresses are gathered from
guest memory in one numpy operation, and the burst is returned with one
used-index store.  A frame becomes ``bytes`` only when some port takes it: a
switch port whose frames go nowhere (a sink) never copies one.

:class:`FrameBatch` is what a port sees: the burst's destination and source
MAC addresses as 48-bit integers (gathered when a port first asks: the
loopback never does), sizes, and :meth:`FrameBatch.frame` to
copy one frame out.  The rules are those of the per-frame path in
:mod:`pyvirtio.devices.net.device` — the same drops (``tx_runt``,
``tx_oversize``), the same broken queue for a device-writable buffer, the
same back-pressure (a port that stops taking frames leaves the rest in the
ring) — and ``tests/test_net_bursts.py`` checks both paths give the same
result.

The loopback port takes a burst the same way (:func:`receive_batched`):
receive buffers are popped as one batch, header and frame written into each
(for a burst of equal frames up to a jumbo frame one gather and two scatters,
else a slice copy per frame from the transmit buffer), and published
with one used-index store and one interrupt decision.  A frame that needs
more than one receive buffer (``MRG_RXBUF``) goes the per-frame way.

Gathers and scatters of equal-sized pieces at arbitrary guest offsets (the
MAC addresses, a burst of small frames) go through a *window view* of the
region (:func:`windows`: item ``o`` is the ``size`` bytes from ``o``, one
opaque ``V<size>`` item), indexed by the offsets alone: numpy then copies
whole items, several times cheaper than indexing every byte (``offsets[:,
None] + arange(size)``) and two to three times cheaper than rows of a 2-D
byte window.  Every offset used was checked against the region by the pop,
so no item reaches past it.

Used only where numpy is installed (``pyvirtio[batch]``) and the ring is a
plain split ring; everything else takes the per-frame path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pyvirtio.batch import Chains, DeviceBatch
from pyvirtio.core.errors import PeerError
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.devices.net.spec import ETH_HLEN, MAX_TX_PACKET

if TYPE_CHECKING:
    from pyvirtio.devices.net.device import NetDevice
    from pyvirtio.transports.device import VirtQueue

__all__ = ["BatchUplink", "FrameBatch", "PerFrameUplink", "drain_tx_batched"]

#: Where a burst goes; returns how many frames (from the first) the port took.
BatchUplink = Callable[["FrameBatch"], int]

# One gather makes both addresses little-endian u64 words: bytes 5..0 of the
# destination then two don't-cares, bytes 11..6 of the source then two more;
# masking to 48 bits gives the big-endian MAC as an integer.
_MAC_GATHER = np.array([5, 4, 3, 2, 1, 0, 0, 0, 11, 10, 9, 8, 7, 6, 0, 0], np.int64)
_MASK48 = np.uint64((1 << 48) - 1)
_SHIFT16 = np.uint64(16)
#: Equal frames up to a jumbo frame go back in one gather and scatter; the gathered copy
#: of a 1,024-frame pass then stays under 10 MB.
_ITEMS_MAX = 9216
_BE64 = np.dtype(">u8")  # made once: a dtype string is parsed on every use
_ARANGE = np.arange(1 << 16, dtype=np.intp)
_ZEROS32 = np.zeros(1 << 16, np.uint32)
_ARANGE.flags.writeable = False
_ZEROS32.flags.writeable = False
# ufunc reductions called directly: half the cost of the ndarray methods.
_min = np.minimum.reduce
_max = np.maximum.reduce


class FrameBatch:
    """The sendable frames of one transmit burst (runts and oversize ones left out)."""

    __slots__ = ("_chains", "_hdr", "_idx", "_keys", "_mac_at", "_regions", "_starts", "_views",
                 "sizes", "uniform")

    def __init__(self, chains: Chains, idx: npt.NDArray[np.intp], sizes: npt.NDArray[np.uint32],
                 hdr_len: int, regions: _RegionArrays, mac_at: int, uniform: int = -1) -> None:
        self._chains = chains
        self._idx = idx  # chain index of each frame
        # numpy arrays over the guest memory regions the chains name.
        self._regions = regions
        self._hdr = hdr_len
        self._mac_at = mac_at  # where the Ethernet header starts in a chain (the device's header)
        self._views: list[memoryview] | None = None
        self._keys: tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]] | None = None
        self._starts: npt.NDArray[np.int64] | None = None
        #: Sizes of the frames as :meth:`frame` returns them (without the virtio_net_hdr,
        #: unless the port takes it: ``NetDevice.port_headers``).
        self.sizes = sizes
        #: The size of every frame when they are all one size (a traffic generator's), else -1.
        self.uniform = uniform

    # The addresses are gathered when a port first asks (a loopback never does).
    @property
    def dst(self) -> npt.NDArray[np.uint64]:
        """Destination MAC of each frame, big-endian 48-bit integers."""
        return self._mac_keys()[0]

    @property
    def src(self) -> npt.NDArray[np.uint64]:
        """Source MAC of each frame, big-endian 48-bit integers."""
        return self._mac_keys()[1]

    def _mac_keys(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        keys = self._keys
        if keys is None:
            keys = self._keys = _mac_keys(self._chains, self._idx, self.starts(), self._mac_at,
                                          self._regions)
        return keys

    def __len__(self) -> int:
        return len(self._idx)

    @staticmethod
    def counts(keys: npt.NDArray[np.uint64]) -> list[tuple[int, int]]:
        """The distinct values of ``keys`` (:attr:`dst`, :attr:`src`) with how often each
        occurs.  A burst usually has one sender and one destination: that case costs two
        reductions, not a sort."""
        low = int(_min(keys))
        if low == int(_max(keys)):
            return [(low, len(keys))]
        values, counts = np.unique(keys, return_counts=True)
        return list(zip(values.tolist(), counts.tolist(), strict=True))

    def starts(self) -> npt.NDArray[np.int64]:
        """Where each frame's chain starts: its first segment's offset in its region."""
        starts = self._starts
        if starts is None:
            c = self._chains
            idx = self._idx
            # Every chain one segment, every chain a frame (the common burst): no gather.
            whole = len(c.seg_len) == len(c) and len(idx) == len(c)
            first = c.seg_offset if whole else c.seg_offset[c.seg_start[idx]]
            starts = self._starts = first.view(np.int64)  # checked offsets: below 2**63
        return starts

    def view(self, i: int) -> memoryview | bytes:
        """Frame ``i`` in place in guest memory when it is one buffer, else a copy."""
        c = self._chains
        ci = int(self._idx[i])
        a = int(c.seg_start[ci])
        if int(c.seg_start[ci + 1]) - a != 1:
            return self.frame(i)
        views = self._views
        if views is None:
            views = self._views = [r.view for r in c.regions]
        off = int(c.seg_offset[a])
        return views[int(c.seg_region[a])][off + self._hdr:off + int(c.seg_len[a])]

    def items(self, start: int, count: int, size: int) -> npt.NDArray[np.void] | None:
        """Frames ``start`` .. ``start + count - 1``, all ``size`` bytes long, gathered
        from guest memory as ``count`` items of ``V<size>`` (``.view(np.uint8)``: the
        bytes); None unless each is one buffer of one region (then copy them one by one)."""
        regions = self._regions
        c = self._chains
        if len(regions.arrays) != 1 or len(c.seg_len) != len(c):
            return None
        off = self.starts()[start:start + count]
        items: npt.NDArray[np.void] = regions.window(size)[off + self._hdr]
        return items

    def frame(self, i: int) -> bytes:
        """Frame ``i`` (header stripped), copied out of guest memory."""
        c = self._chains
        ci = int(self._idx[i])
        a, b = int(c.seg_start[ci]), int(c.seg_start[ci + 1])
        views = self._views
        if views is None:
            views = self._views = [r.view for r in c.regions]
        hdr = self._hdr
        if b - a == 1:
            off = int(c.seg_offset[a])
            return views[int(c.seg_region[a])][off + hdr:off + int(c.seg_len[a])].tobytes()
        data = b"".join(views[int(c.seg_region[s])][int(c.seg_offset[s]):
                                                    int(c.seg_offset[s]) + int(c.seg_len[s])]
                        for s in range(a, b))
        return data[hdr:]


class PerFrameUplink:
    """A port that takes frames one at a time, as a :data:`BatchUplink`."""

    __slots__ = ("uplink",)

    def __init__(self, uplink: Callable[[bytes], bool]) -> None:
        self.uplink = uplink

    def __call__(self, batch: FrameBatch, start: int = 0) -> int:
        """Frames ``start``, ... one by one until the port refuses one; returns how many
        were taken from the first (``start`` included)."""
        uplink = self.uplink
        for i in range(start, len(batch)):
            if not uplink(batch.frame(i)):
                return i
        return len(batch)


def _mac_keys(chains: Chains, idx: npt.NDArray[np.intp], starts: npt.NDArray[np.int64],
              hdr_len: int,
              regions: _RegionArrays) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Destination and source MAC of the frames ``idx`` (whose chains start at ``starts``)
    as integers (one gather)."""
    single = len(chains.seg_len) == len(chains)
    # A frame in one segment was checked to hold a header and an Ethernet header;
    # a chain's first segment of several may not.
    if (len(regions.arrays) == 1 and hdr_len >= 2
            and (single or int(_min(chains.seg_len[chains.seg_start[idx]])) >= hdr_len
                 + ETH_HLEN)):
        # 16 bytes from 2 before the destination (the header's last two) as two
        # big-endian words: [h h d d d d d d] and [s s s s s s t t] (t: EtherType),
        # so the destination is the low 48 bits and the source the high 48.
        words = regions.window(16)[starts + (hdr_len - 2)].view(_BE64)
        return words[0::2] & _MASK48, words[1::2] >> _SHIFT16
    # Addresses split over buffers, or several regions: frame by frame.
    raw = np.empty((len(idx), 12), np.uint8)
    views = [r.view for r in chains.regions]
    for k, ci in enumerate(idx.tolist()):
        a, b = int(chains.seg_start[ci]), int(chains.seg_start[ci + 1])
        head = bytearray()
        for s in range(a, b):
            off = int(chains.seg_offset[s])
            head += views[int(chains.seg_region[s])][off:off + int(chains.seg_len[s])]
            if len(head) >= hdr_len + 12:
                break
        raw[k] = np.frombuffer(bytes(head[hdr_len:hdr_len + 12]), np.uint8)
    words = np.ascontiguousarray(raw[:, _MAC_GATHER]).view("<u8")
    words &= _MASK48
    return words[:, 0], words[:, 1]


def windows(array: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.void]:
    """A view of ``array`` whose item ``o`` is ``array[o:o + size]`` as one ``V<size>``
    item (items overlap; no copy).  ``.view(np.uint8)`` of a gathered copy gives bytes."""
    rows = max(0, len(array) - size + 1)
    view: npt.NDArray[np.void] = np.ndarray((rows,), np.dtype(f"V{size}"), array, 0, (1,))
    if not array.flags.writeable:
        view.flags.writeable = False
    return view


class _RegionArrays:
    """numpy arrays over the memory regions of a ring's guest memory (rebuilt on change),
    and window views of the first (:func:`windows`) by size."""

    __slots__ = ("_windows", "arrays", "key")

    def __init__(self) -> None:
        self.key: list[Any] = []
        self.arrays: list[npt.NDArray[np.uint8]] = []
        self._windows: dict[int, npt.NDArray[np.void]] = {}

    def of(self, chains: Chains) -> list[npt.NDArray[np.uint8]]:
        regions = chains.regions
        if regions is self.key:  # DeviceBatch hands out the same list until they change
            return self.arrays
        if len(regions) != len(self.key) or any(a is not b for a, b in
                                                 zip(regions, self.key, strict=True)):
            self.arrays = [np.frombuffer(r.view, np.uint8) for r in regions]
            self._windows = {}
        self.key = regions
        return self.arrays

    def window(self, size: int) -> npt.NDArray[np.void]:
        """:func:`windows` of the first region (of the last :meth:`of`), cached."""
        w = self._windows.get(size)
        if w is None:
            w = self._windows[size] = windows(self.arrays[0], size)
        return w


class RingBatcher:
    """The batched transmit state of one ring object (a remapped ring gets a new one)."""

    __slots__ = ("_items", "batch", "regions", "ring")

    def __init__(self, ring: SplitDeviceQueue) -> None:
        self.ring = ring
        self.batch = DeviceBatch(ring)
        self.regions = _RegionArrays()
        self._items: dict[bytes, np.void] = {}

    def item(self, data: bytes) -> np.void:
        """``data`` as one ``V<len>`` item, to scatter into a window (made once)."""
        item = self._items.get(data)
        if item is None:
            item = self._items[data] = np.frombuffer(data, np.dtype(f"V{len(data)}"))[0]
        return item


def drain_tx_batched(device: NetDevice, tx: RingBatcher, uplink: BatchUplink,
                     blocked: Callable[[], None]) -> None:
    """Pop up to ``device.tx_burst`` chains, hand the frames to ``uplink``, push what was
    taken (used length 0) and give back the rest (back-pressure: ``blocked`` is called,
    the device retries when the port has room)."""
    ring = tx.ring
    chains = tx.batch.pop(device.tx_burst)
    n = len(chains)
    if not n:
        return
    stats = device.stats
    hdr_len = device.hdr_len
    bad: str | None = None
    if chains.any_writable():
        first_bad = int(np.searchsorted(chains.seg_start, np.argmax(chains.seg_writable),
                                        side="right")) - 1
        bad = (f"{device.name}: transmit head {int(chains.heads[first_bad])} has a "
               f"device-writable buffer (VIRTIO 1.2 §5.1.6.2)")
        # The chains before it are sent; it and the rest go back (the ring breaks).
        ring.unpop(n - first_bad)
        n = first_bad
    # One buffer per chain: its length is the size.
    sizes: npt.NDArray[np.integer[Any]] = (chains.seg_len[:n] if len(chains.seg_len) == len(chains)
                                           else chains.lengths(False)[:n])
    low, high = hdr_len + ETH_HLEN, hdr_len + MAX_TX_PACKET
    # Two reductions decide the usual burst (every size sendable, often all one size).
    least = int(_min(sizes)) if n else 0
    most = int(_max(sizes)) if n else 0
    any_dropped = bool(n) and not (least >= low and most <= high)
    # A port that carries virtio_net_hdr itself (a TAP) gets the frames with it.
    strip = 0 if device.port_headers else hdr_len
    uniform = -1
    if any_dropped:
        runt = sizes < low
        over = sizes > high
        idx = np.flatnonzero(~(runt | over))
        kept = sizes[idx]
    else:
        idx = _ARANGE[:n]
        kept = sizes
        if least == most:
            uniform = least - strip
    taken = n
    if len(idx):
        tx.regions.of(chains)
        # Sizes of sendable frames fit 32 bits (used lengths are 32-bit, too).
        frame_sizes = (kept - strip).astype(np.uint32, copy=False)
        frames = FrameBatch(chains, idx, frame_sizes, strip, tx.regions, hdr_len, uniform)
        took = uplink(frames)
        if took < len(idx):
            # The port is full: frame ``took`` and everything after it stay in the ring.
            taken = int(idx[took])
            blocked()
            ring.unpop(n - taken)
        if took:
            stats.tx_frames += took
            sent = uniform * took if uniform >= 0 else int(frames.sizes[:took].sum())
            stats.tx_bytes += sent - (hdr_len - strip) * took
    if taken:
        if any_dropped:
            drops = stats.drops
            nr = int(runt[:taken].sum())
            no = int(over[:taken].sum())
            if nr:
                drops["tx_runt"] += nr
            if no:
                drops["tx_oversize"] += no
        tx.batch.push(chains.heads[:taken], _ZEROS32[:taken])
        stats.tx_buffers += taken
    if bad is not None:
        raise PeerError(bad)


def receive_batched(device: NetDevice, vq: VirtQueue, rx: RingBatcher, frames: FrameBatch,
                    start: int) -> int:
    """Write frames ``start``, ``start + 1``, ... into receive buffers of ``vq``, one
    buffer each, as one burst; returns how many were delivered (0: no buffer, or the
    next buffer cannot hold the next frame alone — the caller goes per frame)."""
    ring = rx.ring
    want = min(len(frames) - start, ring.available())
    if want <= 0:
        return 0
    chains = rx.batch.pop(want)
    m = len(chains)
    if not m:
        return 0
    hdr_len = device.hdr_len
    sizes = frames.sizes[start:start + m]
    seg_len = chains.seg_len
    uniform = frames.uniform
    if len(seg_len) != m:
        cut = 0
    elif chains.all_writable() and int(_min(seg_len)) >= hdr_len + (
            uniform if uniform >= 0 else int(_max(sizes))):
        cut = m  # the usual burst: writable buffers, each bigger than the biggest frame
    else:
        fits = chains.seg_writable & (seg_len >= sizes + hdr_len)
        cut = m if bool(fits.all()) else int(np.argmin(fits))
    if cut < m:
        # From here on the per-frame path: it merges buffers, drops or breaks the ring.
        ring.unpop(m - cut)
    if not cut:
        return 0
    offs = chains.seg_offset[:cut].view(np.int64)
    arrays = rx.regions.of(chains)
    sz = sizes[:cut]
    src = (frames.items(start, cut, uniform)
           if len(arrays) == 1 and 0 <= uniform <= _ITEMS_MAX else None)
    if src is not None:
        # A burst of equal frames (a traffic generator's): one gather, two scatters
        # (the header, then the frames after it).  A 256-frame loop pass of 1,500 B
        # frames: 4-5x cheaper than copying frame by frame.
        window = rx.regions.window
        window(hdr_len)[offs] = rx.item(device.rx_header)
        window(uniform)[offs + hdr_len] = src
    else:
        views = [r.view for r in chains.regions]
        regions = chains.seg_region[:cut].tolist()
        hdr = device.rx_header
        for i, (ri, off) in enumerate(zip(regions, offs.tolist(), strict=True)):
            frame = frames.view(start + i)
            view = views[ri]
            view[off:off + hdr_len] = hdr
            view[off + hdr_len:off + hdr_len + len(frame)] = frame
    # Written after the entries filled so far, published soon by the kit: after the
    # transmit ring's (a loopback driver sees its transmit buffers back before the
    # frames, as the per-frame path publishes them, so it can send them on at once).
    rx.batch.fill(chains.heads[:cut], sz + hdr_len, vq.filled)
    vq.add_filled(cut)
    stats = device.stats
    stats.rx_frames += cut
    stats.rx_bytes += uniform * cut if uniform >= 0 else int(sz.sum())
    stats.rx_buffers += cut
    return cut
