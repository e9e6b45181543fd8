"""Inflight I/O tracking (QEMU docs/interop/vhost-user.rst "Inflight I/O tracking").

The region's bytes against the doc's structs, the order of the steps when
buffers are taken and returned, recovery after a "crash" between any two of
those steps (a fresh queue object over the same shared memory, as a back end
started again sees it), the resubmit order, and the session's
GET_INFLIGHT_FD / SET_INFLIGHT_FD with hostile values.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable, Iterator

import pytest

from conftest import RingPair, publish_heads, write_desc
from kit_devices import EchoDevice
from pyvirtio.core.errors import PeerError
from pyvirtio.core.layout import SplitLayout
from pyvirtio.core.spec import F_RING_PACKED, VRING_DESC_F_WRITE
from pyvirtio.transports.device import DEFERRED, VirtQueue
from pyvirtio.transports.device import Request as KitRequest
from pyvirtio.transports.vhost_user.inflight import (
    DESC_STATE,
    INFLIGHT_VERSION,
    QUEUE_HEADER,
    InflightRegion,
    InflightSplitQueue,
    queue_region_size,
)
from pyvirtio.transports.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    InflightDesc,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
)
from pyvirtio.transports.vhost_user.session import VhostUserSession
from test_vhost_user_backend import FEATURES, UADDR, Front

Pair = Callable[..., RingPair]
NUM = 8


class Crash(Exception):
    """The back end died here."""


# ------------------------------------------------------------------- layout
def test_struct_sizes_and_region_stride_match_the_doc() -> None:
    assert QUEUE_HEADER.size == 16   # u64 features, u16 version/desc_num/last_batch_head/used_idx
    assert DESC_STATE.size == 16     # u8 inflight, u8 padding[5], u16 next, u64 counter
    for qs in (1, 2, 4, 128, 256, 1024, 32768):
        # libvhost-user's vu_inflight_queue_size: ALIGN_UP(16 * qs + 2, 64).
        assert queue_region_size(qs) == -(-(16 * qs + 2) // 64) * 64
        assert queue_region_size(qs) >= 16 + 16 * qs
    assert InflightRegion.size_for(2, 128) == 2 * 2112


def test_fields_land_at_the_doc_offsets() -> None:
    region = InflightRegion.create(2, NUM)
    try:
        q1 = region.queues[1]
        q1.init_header()
        q1.counter = 0x1122334455
        q1.get(3)
        q1.pre_put(3)
        q1.post_put([], 0xBEEF)
        raw = os.pread(region.fd, region.mmap_size, 0)
        base = queue_region_size(NUM)  # queue 1's region
        features, version, desc_num, last_batch, used_idx = QUEUE_HEADER.unpack_from(raw, base)
        assert (features, version, desc_num, last_batch, used_idx) == (0, 0, NUM, 3, 0xBEEF)
        inflight, nxt, counter = DESC_STATE.unpack_from(raw, base + 16 + 3 * 16)
        assert (inflight, nxt, counter) == (1, 0, 0x1122334455)
        assert raw[:base] == bytes(base)  # queue 0 untouched
        # Padding bytes stay zero.
        assert raw[base + 16 + 3 * 16 + 1:base + 16 + 3 * 16 + 6] == bytes(5)
    finally:
        region.close()


def test_created_buffer_is_a_sealed_memfd() -> None:
    region = InflightRegion.create(1, NUM)
    try:
        seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(OSError):
            os.ftruncate(region.fd, 0)
    finally:
        region.close()


# ------------------------------------------------------- queue over a ring
class Rig:
    """A ring pair plus an inflight buffer; :meth:`restart` is a back end started again."""

    def __init__(self, pair: RingPair) -> None:
        self.pair = pair
        self.buffer = InflightRegion.create(1, pair.num)
        self.regions: list[InflightRegion] = []
        self.q = self.restart()

    def restart(self) -> InflightSplitQueue:
        """A new process: map the same fd again, recover from it."""
        region = InflightRegion.map(os.dup(self.buffer.fd), self.buffer.mmap_size, 0, 1,
                                    self.pair.num)
        self.regions.append(region)
        q = InflightSplitQueue(self.pair.device.rings, self.pair.mem, self.pair.features,
                               region.queues[0])
        q.recover()
        self.q = q
        return q

    def offer(self, *heads: int) -> None:
        """The driver makes ``heads`` available (one writable descriptor each)."""
        for h in heads:
            write_desc(self.pair, h, self.pair.buf(4), 4, VRING_DESC_F_WRITE, 0)
        publish_heads(self.pair, *heads)

    def used(self) -> list[int]:
        """Heads in the used ring, in order, up to used.idx."""
        rings = self.pair.device.rings
        idx = int(rings.used16[1])
        return [int(rings.used32[1 + 2 * (i % self.pair.num)]) for i in range(idx)]

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.buffer.close()


@pytest.fixture
def rig(ring_pair: Pair) -> Iterator[Rig]:
    r = Rig(ring_pair(num=NUM))
    yield r
    r.close()


def test_fresh_region_is_initialized_and_has_nothing_in_flight(rig: Rig) -> None:
    region = rig.q.region
    assert region.version == INFLIGHT_VERSION and region.used_idx == 0
    assert rig.q.resubmit == type(rig.q.resubmit)() and rig.q.inuse == 0


def test_pop_marks_and_completion_clears_in_the_doc_order(rig: Rig) -> None:
    rig.offer(7, 2, 5)
    q = rig.q
    got = [e.head for e in q.pop_batch(8)]
    assert got == [7, 2, 5]
    region = q.region
    assert [region.inflight(h) for h in (7, 2, 5)] == [1, 1, 1]
    assert [region.counter_of(h) for h in (7, 2, 5)] == [0, 1, 2]
    # Out of order: 5 then 2, one batch.
    q.fill(5, 4, 0)
    q.fill(2, 4, 1)
    q.flush(2)
    assert rig.used() == [5, 2]
    assert region.last_batch_head == 2 and region.next(2) == 5
    assert [region.inflight(h) for h in (7, 2, 5)] == [1, 0, 0]
    assert region.used_idx == 2
    q.push(7, 0)
    assert region.inflight(7) == 0 and region.used_idx == 3 and region.last_batch_head == 7


def test_unpop_gives_the_marks_back(rig: Rig) -> None:
    rig.offer(1, 3)
    q = rig.q
    assert len(q.pop_batch(8)) == 2
    q.unpop(1)
    assert q.region.inflight(3) == 0 and q.region.inflight(1) == 1
    assert q.pop() is not None and q.region.inflight(3) == 1


def test_restart_resubmits_in_the_order_made_available(rig: Rig) -> None:
    rig.offer(7, 2, 5, 1)
    q = rig.q
    assert [e.head for e in q.pop_batch(8)] == [7, 2, 5, 1]
    q.fill(2, 4, 0)
    q.fill(1, 4, 1)
    q.flush(2)
    rig.offer(4)  # made available, never popped
    q = rig.restart()
    # Whatever VRING_BASE said: last_avail = used + in flight.
    assert q.get_state() == (4, 2) and q.inuse == 2
    assert q.available() == 3
    assert [e.head for e in q.pop_batch(8)] == [7, 5, 4]
    # The counter goes on after the newest head in flight: order survives the next crash.
    assert [q.region.counter_of(h) for h in (7, 5, 4)] == [0, 2, 3]


def test_resubmitted_heads_come_before_new_ones_through_pop_too(rig: Rig) -> None:
    rig.offer(6, 3)
    assert len(rig.q.pop_batch(8)) == 2
    rig.offer(0)
    q = rig.restart()
    e1, e2, e3 = q.pop(), q.pop(), q.pop()
    assert [e.head for e in (e1, e2, e3) if e is not None] == [6, 3, 0]
    assert q.pop() is None
    # unpop of a resubmitted head puts it back in front.
    q2 = rig.restart()
    first = q2.pop()
    assert first is not None and first.head == 6
    q2.unpop(1)
    again = q2.pop()
    assert again is not None and again.head == 6


def _patch(obj: object, name: str, fn: Callable[..., None]) -> None:
    setattr(obj, name, fn)


@pytest.mark.parametrize("step", ["pre_put", "publish", "clear", "used_idx", "none"])
def test_crash_at_each_completion_step(rig: Rig, step: str) -> None:
    """Heads 7, 2, 5 in flight; a batch of (5, 2) is being returned when the back end dies."""
    rig.offer(7, 2, 5)
    q = rig.q
    assert len(q.pop_batch(8)) == 3
    region = q.region
    real_pre, real_post = region.pre_put, region.post_put
    if step == "pre_put":  # died after linking the first head, before used.idx moved
        def pre(heads: list[int]) -> None:
            real_pre(heads[0])
            raise Crash
        _patch(region, "pre_put_all", pre)
    elif step == "publish":  # used.idx moved, nothing of the batch cleared
        def post(heads: list[int], used_idx: int) -> None:
            raise Crash
        _patch(region, "post_put", post)
    elif step == "clear":  # one of the two cleared
        def post(heads: list[int], used_idx: int) -> None:
            real_post(heads[:1], region.used_idx)
            raise Crash
        _patch(region, "post_put", post)
    elif step == "used_idx":  # both cleared, used_idx not yet written
        def post(heads: list[int], used_idx: int) -> None:
            real_post(heads, region.used_idx)
            raise Crash
        _patch(region, "post_put", post)
    q.fill(5, 4, 0)
    q.fill(2, 4, 1)
    try:
        q.flush(2)
    except Crash:
        assert step != "none"
    published = rig.used() == [5, 2]
    assert published == (step != "pre_put")
    q = rig.restart()
    want = [7, 2, 5] if not published else [7]
    assert list(q.resubmit) == want
    assert q.region.used_idx == (2 if published else 0)
    assert q.get_state() == ((q.used_idx + len(want)) & 0xFFFF, q.used_idx)
    # Nothing the driver saw completed comes back; everything else does, once.
    assert [e.head for e in q.pop_batch(8)] == want


def test_crash_right_after_pop_before_marking_pops_it_again(rig: Rig) -> None:
    rig.offer(4, 6)
    q = rig.q

    def get(head: int) -> None:
        raise Crash
    _patch(q.region, "get", get)
    with pytest.raises(Crash):
        q.pop()
    q = rig.restart()
    # Not marked: last_avail restarts at used + 0 and the head is simply available.
    assert q.get_state() == (0, 0)
    assert [e.head for e in q.pop_batch(8)] == [4, 6]


def test_hostile_regions_break_the_ring(rig: Rig) -> None:
    rig.offer(1)
    assert rig.q.pop() is not None
    raw = rig.regions[-1]
    # used_idx far behind the used ring: more than a batch can hold.
    struct.pack_into("<H", memoryview(raw._mm), 14, 0x8000)
    with pytest.raises(PeerError, match="more than"):
        rig.restart()
    # A last-batch list that leaves the array.
    struct.pack_into("<HH", memoryview(raw._mm), 12, 0xFFFF, 0xFFFF)
    rig.pair.device.rings.used16[1] = 1
    with pytest.raises(PeerError, match="last-batch list"):
        rig.restart()
    struct.pack_into("<H", memoryview(raw._mm), 8, 7)  # unknown version
    with pytest.raises(PeerError, match="version 7"):
        rig.restart()


def test_ring_larger_than_the_region_is_refused(ring_pair: Pair) -> None:
    pair = ring_pair(num=16)
    region = InflightRegion.create(1, 8)
    try:
        with pytest.raises(PeerError, match="ring of 16"):
            InflightSplitQueue(pair.device.rings, pair.mem, pair.features, region.queues[0])
    finally:
        region.close()


# ------------------------------------------------------------ map(): hostile
def _memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.mark.parametrize(("size", "offset", "seal", "file_size", "match"), [
    (100, 0, True, 4096, "needed"),
    (4352, 100, True, 8192, "not page aligned"),
    (4352, 4096, True, 4352, "beyond"),
    (4352, 0, False, 4352, "sealed"),
    (1 << 62, 0, True, 4352, "beyond"),
])
def test_map_refuses_unusable_buffers(size: int, offset: int, seal: bool, file_size: int,
                                      match: str) -> None:
    fd = _memfd(file_size, seal)
    try:
        with pytest.raises(PeerError, match=match):
            InflightRegion.map(fd, size, offset, 2, 128)
    finally:
        os.close(fd)


def test_map_refuses_a_pipe() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(PeerError, match="sealed"):
            InflightRegion.map(r, 4352, 0, 2, 128)
    finally:
        os.close(r)
        os.close(w)


# ------------------------------------------------------------------ session
INFLIGHT_PROTO = 1 << ProtocolFeature.INFLIGHT_SHMFD | 1 << ProtocolFeature.REPLY_ACK


class Holding(EchoDevice):
    """Keeps every request (completes only when the test says)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.held: list[KitRequest] = []

    def handle(self, queue: VirtQueue, req: KitRequest) -> int:
        self.held.append(req)
        return DEFERRED  # type: ignore[return-value]  # (EchoDevice narrows handle to int)


def _get_inflight(f: Front, nq: int = 1, qs: int = NUM) -> tuple[InflightDesc, int]:
    (rep,) = f.send(Request.GET_INFLIGHT_FD, InflightDesc(0, 0, nq, qs))
    assert isinstance(rep.payload, InflightDesc) and len(rep.fds) == 1
    return rep.payload, os.dup(rep.fds[0])


def _start(f: Front, layout: SplitLayout, base: int) -> None:
    f.send(Request.SET_VRING_NUM, VringState(0, layout.num))
    f.send(Request.SET_VRING_BASE, VringState(0, base))
    f.send(Request.SET_VRING_ADDR, VringAddr(0, 0, UADDR + layout.desc, UADDR + layout.used,
                                             UADDR + layout.avail))
    from pyvirtio.io.eventfd import EventFd
    for req in (Request.SET_VRING_CALL, Request.SET_VRING_KICK):
        e = EventFd()
        f.eventfds.append(e)
        f.send(req, 0, (os.dup(e.fd),))
    f.send(Request.SET_VRING_ENABLE, VringState(0, 1))


def test_session_survives_a_restart_and_resubmits() -> None:
    f = Front(protocol=INFLIGHT_PROTO, queues=1)
    dev = Holding()
    f.device = dev
    f.be = VhostUserSession(dev, signal=f.signals.append)
    f.send(Request.SET_PROTOCOL_FEATURES, INFLIGHT_PROTO)
    f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
    desc, fd = _get_inflight(f)
    assert desc.mmap_size == queue_region_size(NUM) and desc.mmap_offset == 0
    f.send(Request.SET_INFLIGHT_FD, desc, (os.dup(fd),))
    f.share()
    drv = f.ring(0)
    layout = drv.rings.layout
    f.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    bufs = [f.alloc(4, 4) for _ in range(4)]
    for i, b in enumerate(bufs):
        f.mem.write(b, bytes([i]) * 4)
        drv.add([(b, 4)], [(f.alloc(4, 4), 4)], token=i)
    f.be.run_ring(0)
    assert [r.read()[0] for r in dev.held] == [0, 1, 2, 3]
    dev.held[2].complete(4)
    assert drv.get_buf() == (2, 4)
    # The back end dies: nothing closes, the front end keeps the buffer and the rings.
    f.be = VhostUserSession(Holding(), signal=f.signals.append)
    dev2 = f.be.device
    assert isinstance(dev2, Holding)
    f.send(Request.SET_PROTOCOL_FEATURES, INFLIGHT_PROTO)
    f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
    f.send(Request.SET_INFLIGHT_FD, desc, (os.dup(fd),))
    f.share()
    _start(f, layout, base=drv.rings.used16[1])  # QEMU: the used index as VRING_BASE
    f.be.run_ring(0)
    # In the order they were made available, request 2 (completed) not again.
    assert [r.read()[0] for r in dev2.held] == [0, 1, 3]
    for r in dev2.held:
        r.complete(4)
    got = {tok for tok, _ in iter(drv.get_buf, None)}
    assert got == {0, 1, 3}
    os.close(fd)
    f.close()


@pytest.fixture
def inflight_front() -> Iterator[Front]:
    f = Front(protocol=INFLIGHT_PROTO, queues=2)
    f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
    yield f
    f.close()


@pytest.mark.parametrize("desc", [
    InflightDesc(0, 0, 0, 128),      # no queue
    InflightDesc(0, 0, 3, 128),      # more queues than the device has
    InflightDesc(0, 0, 1, 100),      # not a power of two
    InflightDesc(0, 0, 1, 0),
    InflightDesc(0, 0, 1, 65535),
])
def test_get_inflight_fd_refuses_bad_geometry(inflight_front: Front, desc: InflightDesc) -> None:
    with pytest.raises(PeerError, match="inflight buffer"):
        inflight_front.send(Request.GET_INFLIGHT_FD, desc)


def test_set_inflight_fd_refuses_hostile_buffers(inflight_front: Front) -> None:
    f = inflight_front
    desc, fd = _get_inflight(f, 2, 128)
    try:
        for bad in (InflightDesc(desc.mmap_size - 64, 0, 2, 128),     # too small
                    InflightDesc(desc.mmap_size, 4096, 2, 128),       # past the end
                    InflightDesc(desc.mmap_size, 0, 2, 256),          # geometry it cannot hold
                    InflightDesc(desc.mmap_size, 0, 9, 128)):         # queues
            dup = os.dup(fd)
            with pytest.raises(PeerError):
                f.send(Request.SET_INFLIGHT_FD, bad, (dup,))
            with pytest.raises(OSError):
                os.fstat(dup)  # the refused fd was closed, not leaked
        unsealed = _memfd(desc.mmap_size, seal=False)
        with pytest.raises(PeerError, match="sealed"):
            f.send(Request.SET_INFLIGHT_FD, desc, (unsealed,))
        assert f.be.inflight is None
        f.send(Request.SET_INFLIGHT_FD, desc, (os.dup(fd),))
        assert f.be.inflight is not None
    finally:
        os.close(fd)


def test_inflight_requests_need_the_protocol_feature() -> None:
    f = Front(protocol=1 << ProtocolFeature.REPLY_ACK)
    with pytest.raises(PeerError, match="INFLIGHT_SHMFD"):
        f.send(Request.GET_INFLIGHT_FD, InflightDesc(0, 0, 1, 128))
    f.close()


def test_no_inflight_buffer_for_packed_rings(inflight_front: Front) -> None:
    """Packed rings are not tracked: GET_INFLIGHT_FD answers mmap_size 0 without an fd
    (QEMU then starts the device without a buffer), SET_INFLIGHT_FD is refused."""
    f = inflight_front
    f.be.features |= 1 << F_RING_PACKED
    (rep,) = f.send(Request.GET_INFLIGHT_FD, InflightDesc(0, 0, 1, 128))
    assert rep.payload == InflightDesc(0, 0, 1, 128) and rep.fds == ()
    with pytest.raises(PeerError, match="packed"):  # (send closes the fd it passes)
        f.send(Request.SET_INFLIGHT_FD, InflightDesc(4096, 0, 1, 128), (os.dup(0),))


def test_set_inflight_fd_refused_on_a_started_ring(inflight_front: Front) -> None:
    f = inflight_front
    f.share()
    f.ring(0)
    desc, fd = _get_inflight(f, 2, 128)
    try:
        with pytest.raises(PeerError, match="started"):
            f.send(Request.SET_INFLIGHT_FD, desc, (os.dup(fd),))
    finally:
        os.close(fd)


def test_reset_unmaps_the_buffer(inflight_front: Front) -> None:
    f = inflight_front
    desc, fd = _get_inflight(f, 1, 128)
    f.send(Request.SET_INFLIGHT_FD, desc, (os.dup(fd),))
    region = f.be.inflight
    assert region is not None
    held = region.fd
    f.be.reset()
    assert f.be.inflight is None
    with pytest.raises(OSError):
        os.fstat(held)
    os.close(fd)



def test_a_used_entry_rewritten_before_publication_stays_inside_the_region(rig: Rig) -> None:
    rig.offer(3, 4)
    q = rig.q
    assert len(q.pop_batch(8)) == 2
    q.fill(3, 4, 0)
    q.fill(4, 4, 1)
    rig.pair.device.rings.used32[1] = 0xFFFF  # a hostile driver rewrites entry 0
    q.flush(2)
    # Only the head still named in the used ring is cleared; nothing beyond the ring is touched.
    assert q.region.inflight(4) == 0 and q.region.inflight(3) == 1
    assert q.region.used_idx == 2


def test_reset_device_drops_the_buffer(inflight_front: Front) -> None:
    f = inflight_front
    f.send(Request.SET_PROTOCOL_FEATURES, INFLIGHT_PROTO | 1 << ProtocolFeature.RESET_DEVICE)
    desc, fd = _get_inflight(f, 1, 128)
    f.send(Request.SET_INFLIGHT_FD, desc, (os.dup(fd),))
    assert f.be.inflight is not None
    f.send(Request.RESET_DEVICE)
    # New rings after a reset are not the ones the marks name: untracked until the
    # front end hands a buffer again.
    assert f.be.inflight is None
    os.close(fd)


def test_fresh_buffer_keeps_the_vring_base(ring_pair: Pair) -> None:
    pair = ring_pair(num=NUM)
    region = InflightRegion.create(1, NUM)
    try:
        q = InflightSplitQueue(pair.device.rings, pair.mem, pair.features, region.queues[0])
        q.set_state(5, 5)  # SET_VRING_BASE of a ring that has run before
        pair.device.rings.used16[1] = 5
        assert q.recover() == 0
        assert q.get_state() == (5, 5) and q.region.version == INFLIGHT_VERSION
        assert q.region.used_idx == 5
    finally:
        region.close()
