"""The sans-I/O vhost-user back end: ring states, memory table, malformed requests."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kit_devices import EchoDevice, TwoAtATime
from pyvirtio.core.errors import PeerError
from pyvirtio.core.layout import (
    RingViews,
    SplitLayout,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.packed_device import PackedDeviceQueue
from pyvirtio.core.packed_layout import PackedLayout
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_RING_PACKED, F_VERSION_1, Status
from pyvirtio.core.split_driver import SplitDriverQueue
from pyvirtio.io.eventfd import EventFd
from pyvirtio.transports.device import RING_FEATURES
from pyvirtio.transports.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    VRING_NOFD_MASK,
    BackendMessage,
    BackendRequest,
    ConfigSpace,
    MemoryTable,
    MemRegion,
    Message,
    Payload,
    ProtocolFeature,
    RawPayload,
    Request,
    VringAddr,
    VringState,
    backend_reply,
    backend_request,
    request,
)
from pyvirtio.transports.vhost_user.session import (
    MAX_MEM_SLOTS,
    SUPPORTED_PROTOCOL_FEATURES,
    VhostUserSession,
)

MEM = 1 << 20
UADDR = 0x7F00_0000_0000
NUM = 8
FEATURES = 1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Front:
    """A hand-driven front end: guest memory, rings, and messages fed straight in."""

    def __init__(self, protocol: int | None = SUPPORTED_PROTOCOL_FEATURES,
                 queues: int = 2) -> None:
        self.device: EchoDevice = EchoDevice(queues)
        #: Call fds the session signalled, in order; rings reported broken.
        self.signals: list[int] = []
        self.broken: list[tuple[int, str]] = []
        self.be = VhostUserSession(self.device, signal=self.signals.append,
                                   on_broken=lambda i, why: self.broken.append((i, why)))
        self.memfd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM)
        self.mem = GuestMemory.from_fd(self.memfd, MEM, gpa=0, uaddr=UADDR)
        self.next = 0x1000
        self.eventfds: list[EventFd] = []
        if protocol is not None:
            self.send(Request.SET_PROTOCOL_FEATURES, protocol)

    def send(self, req: Request, payload: Payload = None, fds: tuple[int, ...] = (),
             need_reply: bool = False) -> list[Message]:
        return self.be.handle(request(req, payload, fds=fds, need_reply=need_reply)).replies

    def one(self, req: Request, payload: Payload = None) -> Payload:
        (rep,) = self.send(req, payload)
        assert rep.is_reply and rep.request is req
        return rep.payload

    def share(self) -> None:
        region = MemRegion(0, MEM, UADDR, 0)
        self.send(Request.SET_MEM_TABLE, MemoryTable((region,)), (os.dup(self.memfd),))

    def alloc(self, size: int, align: int) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        self.next = addr + size
        return addr

    def ring(self, index: int, num: int = NUM, kick: bool = True) -> SplitDriverQueue:
        """NUM, BASE, ADDR, CALL, KICK as QEMU sends them; returns the driver side."""
        desc = self.alloc(desc_table_size(num), 16)
        avail = self.alloc(avail_ring_size(num), 2)
        used = self.alloc(used_ring_size(num), 4)
        layout = SplitLayout.modern(num, desc, avail, used)
        self.send(Request.SET_VRING_NUM, VringState(index, num))
        self.send(Request.SET_VRING_BASE, VringState(index, 0))
        self.send(Request.SET_VRING_ADDR, VringAddr(index, 0, UADDR + desc, UADDR + used,
                                                    UADDR + avail))
        call = EventFd()
        self.eventfds.append(call)
        self.send(Request.SET_VRING_CALL, index, (os.dup(call.fd),))
        if kick:
            kfd = EventFd()
            self.eventfds.append(kfd)
            self.send(Request.SET_VRING_KICK, index, (os.dup(kfd.fd),))
        return SplitDriverQueue(RingViews.map(self.mem, layout), FEATURES)

    def close(self) -> None:
        self.be.reset()
        for e in self.eventfds:
            e.close()
        self.mem.close()
        os.close(self.memfd)


@pytest.fixture
def front() -> Iterator[Front]:
    f = Front()
    f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
    f.share()
    yield f
    f.close()


def _echo_one(f: Front, drv: SplitDriverQueue, index: int, text: bytes) -> int:
    out, inn = f.alloc(len(text), 1), f.alloc(64, 1)
    f.mem.write(out, text)
    drv.add([(out, len(text))], [(inn, 64)], token=text)
    f.be.run_ring(index)
    got = drv.get_buf()
    if got is None:
        return -1
    assert got == (text, len(text))
    assert f.mem.read(inn, len(text)) == text
    return got[1]


# ------------------------------------------------------------------ handshake
def test_features_offer_protocol_bit_and_supported_protocol_features() -> None:
    f = Front(protocol=None)
    assert f.one(Request.GET_FEATURES) == RING_FEATURES | 1 << F_PROTOCOL_FEATURES
    proto = f.one(Request.GET_PROTOCOL_FEATURES)
    assert isinstance(proto, int)
    for bit in ("MQ", "REPLY_ACK", "CONFIG", "CONFIGURE_MEM_SLOTS", "RESET_DEVICE", "STATUS",
                "INFLIGHT_SHMFD"):
        assert proto >> ProtocolFeature[bit] & 1
    assert not proto >> ProtocolFeature.PAGEFAULT & 1
    assert f.one(Request.GET_QUEUE_NUM) == 2
    f.send(Request.SET_OWNER)
    assert f.be.owner
    f.close()


def test_set_features_refuses_bits_not_offered(front: Front) -> None:
    with pytest.raises(PeerError, match="not offered"):
        front.send(Request.SET_FEATURES, 1 << 5)
    assert front.device.acked == FEATURES  # unchanged by the refused request


def test_set_protocol_features_refuses_bits_not_offered() -> None:
    f = Front(protocol=None)
    with pytest.raises(PeerError, match="not offered"):
        f.send(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.PAGEFAULT)
    f.close()


def test_set_features_reaches_the_device_without_bit_30(front: Front) -> None:
    assert front.device.acked == FEATURES


# -------------------------------------------------------------- ring states
def test_ring_states_with_protocol_features(front: Front) -> None:
    ring = front.be.rings[0]
    assert ring.state == "stopped"
    drv = front.ring(0)
    assert ring.state == "disabled"
    # Started but disabled: the back end must not process it.
    assert _echo_one(front, drv, 0, b"early") == -1
    out = front.be.handle(request(Request.SET_VRING_ENABLE, VringState(0, 1)))
    assert ring.state == "enabled"
    assert out.start == [0]  # run it now: a buffer is already waiting
    front.be.run_ring(0)
    assert drv.get_buf() == (b"early", 5)
    assert _echo_one(front, drv, 0, b"hello") == 5


def test_ring_starts_enabled_without_protocol_features() -> None:
    f = Front(protocol=None)
    f.send(Request.SET_FEATURES, FEATURES)
    f.share()
    drv = f.ring(0)
    assert f.be.rings[0].state == "enabled"
    assert _echo_one(f, drv, 0, b"x") == 1
    with pytest.raises(PeerError, match="PROTOCOL_FEATURES"):
        f.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    f.close()


def test_stopped_ring_is_never_processed(front: Front) -> None:
    drv = front.ring(0, kick=False)
    front.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    assert front.be.rings[0].state == "stopped"
    assert _echo_one(front, drv, 0, b"nope") == -1


def test_get_vring_base_stops_the_ring_and_returns_next_avail(front: Front) -> None:
    drv = front.ring(0)
    front.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    for i in range(5):
        assert _echo_one(front, drv, 0, b"m%d" % i) == 2
    kick, call = front.be.rings[0].kick_fd, front.be.rings[0].call_fd
    assert kick is not None and call is not None
    assert front.one(Request.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 5)
    ring = front.be.rings[0]
    assert ring.state == "stopped"
    assert not _is_open(kick) and not _is_open(call)
    # Restart where it stopped.
    front.send(Request.SET_VRING_BASE, VringState(0, 5))
    assert front.be.rings[0].base() == (5, 5)


def test_packed_vring_base_carries_positions_and_wrap_counters(front: Front) -> None:
    """vhost-user.rst "Vring descriptor indices for packed virtqueues": bits 0-14 and 15
    the available position and its wrap counter, bits 16-30 and 31 the used ones; a
    lower half alone (DPDK's virtio_user) sets both; SET_VRING_ADDR names the
    descriptor ring and the driver and device event areas."""
    front.send(Request.SET_FEATURES, FEATURES | 1 << F_RING_PACKED)
    assert front.be.packed
    front.share()
    num = 13  # packed rings need not be powers of two
    desc, drv_ev, dev_ev = front.alloc(16 * num, 16), front.alloc(4, 4), front.alloc(4, 4)
    front.send(Request.SET_VRING_NUM, VringState(0, num))
    front.send(Request.SET_VRING_BASE, VringState(0, 5 | 0 << 15 | (3 | 1 << 15) << 16))
    front.send(Request.SET_VRING_ADDR, VringAddr(0, 0, UADDR + desc, UADDR + dev_ev,
                                                 UADDR + drv_ev))
    queue = front.be.rings[0].queue
    assert isinstance(queue, PackedDeviceQueue)
    assert queue.get_state() == (5, 3 | 1 << 15)
    assert queue.rings.layout == PackedLayout(num, UADDR + desc, UADDR + drv_ev, UADDR + dev_ev)
    assert front.one(Request.GET_VRING_BASE, VringState(0, 0)) == VringState(
        0, 5 | (3 | 1 << 15) << 16)
    front.send(Request.SET_VRING_BASE, VringState(0, 7 | 1 << 15))  # lower half only
    assert front.be.rings[0].base(packed=True) == (7 | 1 << 15, 7 | 1 << 15)
    with pytest.raises(PeerError, match="outside packed ring"):
        front.send(Request.SET_VRING_BASE, VringState(0, 13 | 1 << 15))


def test_set_vring_base_on_started_ring_is_refused(front: Front) -> None:
    front.ring(0)
    with pytest.raises(PeerError, match="started"):
        front.send(Request.SET_VRING_BASE, VringState(0, 3))
    with pytest.raises(PeerError, match="started"):
        front.send(Request.SET_VRING_NUM, VringState(0, 16))


def test_kick_with_invalid_fd_flag_starts_a_polled_ring(front: Front) -> None:
    front.ring(1, kick=False)
    front.send(Request.SET_VRING_KICK, 1 | VRING_NOFD_MASK)
    ring = front.be.rings[1]
    assert ring.started and ring.polled and ring.kick_fd is None


def test_kick_before_addresses_is_refused(front: Front) -> None:
    kick = EventFd()
    dup = os.dup(kick.fd)
    with pytest.raises(PeerError, match="before SET_VRING_ADDR"):
        front.send(Request.SET_VRING_KICK, 0, (dup,))
    assert not _is_open(dup)
    kick.close()


# ----------------------------------------------------------- malformed rings
@pytest.mark.parametrize("num", [0, 3, 100, 512, 32768 * 2])
def test_set_vring_num_refuses_bad_sizes(front: Front, num: int) -> None:
    with pytest.raises(PeerError, match="SET_VRING_NUM"):
        front.send(Request.SET_VRING_NUM, VringState(0, num))


@pytest.mark.parametrize(("req", "payload"), [
    (Request.SET_VRING_NUM, VringState(2, 8)),
    (Request.SET_VRING_BASE, VringState(7, 0)),
    (Request.GET_VRING_BASE, VringState(200, 0)),
    (Request.SET_VRING_ENABLE, VringState(2, 1)),
    (Request.SET_VRING_ADDR, VringAddr(5, 0, 0, 0, 0)),
    (Request.SET_VRING_CALL, 9 | VRING_NOFD_MASK),
])
def test_queue_index_beyond_queue_count(front: Front, req: Request, payload: Payload) -> None:
    with pytest.raises(PeerError, match="beyond"):
        front.send(req, payload)


def test_ring_addresses_in_no_region(front: Front) -> None:
    front.send(Request.SET_VRING_NUM, VringState(0, NUM))
    with pytest.raises(PeerError, match="no memory region"):
        front.send(Request.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x3000, 0x2000))
    # The refusal unconfigured the ring: it needs its size again.
    assert front.be.rings[0].num == 0 and front.be.rings[0].addr is None
    front.send(Request.SET_VRING_NUM, VringState(0, NUM))
    # Guest addresses are not user addresses: the same numbers + UADDR work.
    front.send(Request.SET_VRING_ADDR, VringAddr(0, 0, UADDR + 0x1000, UADDR + 0x3000,
                                                 UADDR + 0x2000))
    assert front.be.rings[0].queue is not None


def test_ring_running_past_its_region(front: Front) -> None:
    front.send(Request.SET_VRING_NUM, VringState(0, 256))
    with pytest.raises(PeerError, match="runs past"):
        front.send(Request.SET_VRING_ADDR, VringAddr(0, 0, UADDR + MEM - 16, UADDR, UADDR))


def test_error_becomes_a_reply_ack_when_asked(front: Front) -> None:
    out = front.be.handle(request(Request.SET_VRING_NUM, VringState(0, 3), need_reply=True))
    assert [(r.request, r.payload) for r in out.replies] == [(Request.SET_VRING_NUM, 1)]
    assert out.error is not None and "SET_VRING_NUM" in out.error
    ok = front.be.handle(request(Request.SET_VRING_NUM, VringState(0, 4), need_reply=True))
    assert [r.payload for r in ok.replies] == [0]


def test_need_reply_is_ignored_without_reply_ack() -> None:
    f = Front(protocol=0)
    assert f.send(Request.SET_OWNER, need_reply=True) == []
    with pytest.raises(PeerError):
        f.send(Request.SET_VRING_NUM, VringState(0, 3), need_reply=True)
    f.close()


@pytest.mark.parametrize(("req", "payload"), [
    (Request.SEND_RARP, RawPayload(bytes(8))),
    (Request.POSTCOPY_ADVISE, None),
    (Request.IOTLB_MSG, RawPayload(bytes(32))),
])
def test_unsupported_requests_are_refused(front: Front, req: Request, payload: Payload) -> None:
    with pytest.raises(PeerError, match="not supported"):
        front.send(req, payload)
    if req is not Request.POSTCOPY_ADVISE:
        out = front.be.handle(request(req, payload, need_reply=True))
        assert [r.payload for r in out.replies] == [1]


# ------------------------------------------------------------------- memory
def _region_msg(gpa: int, size: int, uaddr: int, off: int, fd: int) -> Message:
    return request(Request.SET_MEM_TABLE, MemoryTable((MemRegion(gpa, size, uaddr, off),)),
                   fds=(fd,))


@pytest.mark.parametrize(("gpa", "size", "uaddr", "off", "words"), [
    (0, 0, UADDR, 0, "size 0"),
    ((1 << 64) - 0x1000, 0x2000, UADDR, 0, "wraps"),
    (0, 0x2000, (1 << 64) - 0x1000, 0, "wraps"),
    (0, 0x1000, UADDR, MEM, "past the end"),
    (0, MEM, UADDR, 0x1000, "past the end"),
])
def test_bad_memory_regions(front: Front, gpa: int, size: int, uaddr: int, off: int,
                            words: str) -> None:
    fd = os.dup(front.memfd)
    with pytest.raises(PeerError, match=words):
        front.be.handle(_region_msg(gpa, size, uaddr, off, fd))
    assert not _is_open(fd)
    assert front.be.memory is not None and len(front.be.memory.regions) == 1  # old table kept


def test_memory_region_fd_that_cannot_be_mapped(front: Front) -> None:
    r, w = os.pipe()
    with pytest.raises(PeerError):
        front.be.handle(_region_msg(0, 0x1000, UADDR, 0, r))
    assert not _is_open(r)
    os.close(w)


def test_memory_region_at_an_offset_maps_the_right_bytes(front: Front) -> None:
    front.mem.write(0x5000, b"offset-data")
    fd = os.dup(front.memfd)
    front.be.handle(_region_msg(0x100000, 0x4000, UADDR, 0x4000, fd))
    assert not _is_open(fd)  # mapped, then closed
    assert front.be.memory is not None
    assert front.be.memory.read(0x101000, 11) == b"offset-data"


def test_mem_table_change_remaps_rings_and_keeps_indices(front: Front) -> None:
    drv = front.ring(0)
    front.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    assert _echo_one(front, drv, 0, b"one") == 3
    front.share()  # a fresh table with the same layout
    assert _echo_one(front, drv, 0, b"two") == 3
    assert front.be.rings[0].base() == (2, 2)


def test_add_and_remove_memory_regions() -> None:
    f = Front()
    f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
    assert f.one(Request.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS
    half = MEM // 2
    f.send(Request.ADD_MEM_REG, MemRegion(0, half, UADDR, 0), (os.dup(f.memfd),))
    f.send(Request.ADD_MEM_REG, MemRegion(half, half, UADDR + half, half), (os.dup(f.memfd),))
    assert f.be.memory is not None and len(f.be.memory.regions) == 2
    drv = f.ring(0)
    f.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    f.next = half + 0x100  # buffers in the second region
    assert _echo_one(f, drv, 0, b"second-region") == 13
    with pytest.raises(PeerError, match="overlaps"):
        f.send(Request.ADD_MEM_REG, MemRegion(0x1000, 0x1000, 1 << 50, 0x1000),
               (os.dup(f.memfd),))
    # REM_MEM_REG may carry one fd for compatibility; it is closed unused.
    extra = os.dup(f.memfd)
    f.send(Request.REM_MEM_REG, MemRegion(half, half, UADDR + half, 0), (extra,))
    assert not _is_open(extra)
    assert len(f.be.memory.regions) == 1
    with pytest.raises(PeerError, match="no region"):
        f.send(Request.REM_MEM_REG, MemRegion(half, half, UADDR + half, 0))
    f.close()


def test_mem_slot_requests_need_the_protocol_feature() -> None:
    f = Front(protocol=1 << ProtocolFeature.REPLY_ACK)
    with pytest.raises(PeerError, match="CONFIGURE_MEM_SLOTS"):
        f.send(Request.GET_MAX_MEM_SLOTS)
    f.close()


# ------------------------------------------------------------------- config
def test_get_and_set_config(front: Front) -> None:
    assert front.one(Request.GET_CONFIG, ConfigSpace(2, 4, 0, bytes(4))) == ConfigSpace(
        2, 4, 0, bytes([2, 3, 4, 5]))
    front.send(Request.SET_CONFIG, ConfigSpace(0, 2, 0, b"\xaa\xbb"))
    assert front.device.config[:2] == b"\xaa\xbb"
    # Past what the device has: zero-filled, the size the front end asked for.
    assert front.one(Request.GET_CONFIG, ConfigSpace(12, 8, 0, bytes(8))) == ConfigSpace(
        12, 8, 0, bytes([12, 13, 14, 15, 0, 0, 0, 0]))
    # Beyond the config space: an empty reply is the error.
    assert front.one(Request.GET_CONFIG, ConfigSpace(250, 8, 0, bytes(8))) == ConfigSpace(
        0, 0, 0, b"")
    with pytest.raises(PeerError, match="out of range"):
        front.send(Request.SET_CONFIG, ConfigSpace(15, 4, 0, bytes(4)))
    with pytest.raises(PeerError, match="flags"):
        front.send(Request.SET_CONFIG, ConfigSpace(0, 1, 7, b"\0"))


def test_config_needs_the_protocol_feature() -> None:
    f = Front(protocol=0)
    with pytest.raises(PeerError, match="CONFIG"):
        f.send(Request.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)))
    f.close()


# ----------------------------------------------------------- reset / status
def test_reset_device_forgets_rings_and_features(front: Front) -> None:
    front.ring(0)
    kick = front.be.rings[0].kick_fd
    assert kick is not None
    front.send(Request.RESET_DEVICE)
    assert all(r.state == "stopped" and r.queue is None for r in front.be.rings)
    assert not _is_open(kick)
    assert front.be.features == 0 and front.device.resets == 1
    assert front.be.memory is not None  # memory stays


def test_status_round_trip_and_needs_reset_after_a_broken_ring(front: Front) -> None:
    front.send(Request.SET_STATUS, 0xF)
    assert front.one(Request.GET_STATUS) == 0xF
    with pytest.raises(PeerError, match="8-bit"):
        front.send(Request.SET_STATUS, 0x1FF)
    drv = front.ring(0)
    front.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    # A hostile driver: an available head beyond the ring.
    drv.rings.avail16[2] = 200
    drv.rings.avail16[1] = 1
    res = front.be.run_ring(0)
    assert res.broken is not None and "head 200" in res.broken
    status = front.one(Request.GET_STATUS)
    assert isinstance(status, int) and status & Status.NEEDS_RESET
    # Other rings keep working.
    drv1 = front.ring(1)
    front.send(Request.SET_VRING_ENABLE, VringState(1, 1))
    assert _echo_one(front, drv1, 1, b"still fine") == 10
    # The broken ring is not run again until the front end restarts it.
    assert front.be.run_ring(0).published == 0


def test_completions_before_a_hostile_head_are_published_and_signalled(front: Front) -> None:
    drv = front.ring(0)
    front.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    for i in range(2):
        drv.add([(front.alloc(8, 1), 8)], [(front.alloc(8, 1), 8)], token=i)
    # Then a head beyond the ring: the device pops it after echoing the first two.
    drv.rings.avail16[2 + 2] = 200
    drv.rings.avail16[1] = 3
    res = front.be.run_ring(0)
    assert res.broken is not None and "head 200" in res.broken
    assert res.published == 2
    assert front.signals == [front.be.rings[0].call_fd]
    assert front.broken == [(0, res.broken)]
    assert [drv.get_buf()[0] for _ in range(2)] == [0, 1]  # type: ignore[index]


def test_reset_closes_everything(front: Front) -> None:
    front.ring(0)
    fds = [front.be.rings[0].kick_fd, front.be.rings[0].call_fd]
    front.be.reset()
    assert not any(_is_open(fd) for fd in fds if fd is not None)
    assert front.be.memory is None and front.be.features == 0 and front.be.protocol == 0


# --------------------------------------------------------- back-end channel
def _channel(f: Front) -> socket.socket:
    """SET_BACKEND_REQ_FD with one end of a socketpair; returns the front end's end."""
    ours, theirs = socket.socketpair()
    f.send(Request.SET_BACKEND_REQ_FD, None, (theirs.detach(),))
    return ours


def _break_ring(f: Front, index: int) -> tuple[SplitDriverQueue, list[BackendMessage]]:
    drv = f.ring(index)
    f.send(Request.SET_VRING_ENABLE, VringState(index, 1))
    drv.rings.avail16[2] = 200  # a head beyond the ring
    drv.rings.avail16[1] = 1
    res = f.be.run_ring(index)
    assert res.broken is not None and f.broken[-1] == (index, res.broken)
    # The I/O layer answers on_broken with this message on the back-end channel.
    change = f.be.config_change_message()
    return drv, [] if change is None else [change]


def test_backend_req_is_offered_unless_disabled() -> None:
    f = Front(protocol=None)
    proto = f.one(Request.GET_PROTOCOL_FEATURES)
    assert isinstance(proto, int) and proto >> ProtocolFeature.BACKEND_REQ & 1
    f.close()
    be = VhostUserSession(EchoDevice(), backend_req=False)
    assert not be.offered_protocol >> ProtocolFeature.BACKEND_REQ & 1
    assert be.offered_protocol >> ProtocolFeature.REPLY_ACK & 1


def test_broken_ring_asks_for_a_config_change_with_reply_ack(front: Front) -> None:
    chan = _channel(front)
    fd = front.be.backend_fd
    assert fd is not None and not os.get_blocking(fd)
    _drv, msgs = _break_ring(front, 0)
    assert msgs == [backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)]
    status = front.one(Request.GET_STATUS)
    assert isinstance(status, int) and status & Status.NEEDS_RESET
    # The ack protocol: expected only after the I/O layer sent the request.
    change = msgs[0]
    front.be.backend_sent(change)
    assert front.be.backend_replies_due == 1
    assert front.be.handle_backend_reply(
        backend_reply(BackendRequest.CONFIG_CHANGE_MSG, 0)) is None
    assert front.be.backend_replies_due == 0
    with pytest.raises(PeerError, match="unsolicited"):
        front.be.handle_backend_reply(backend_reply(BackendRequest.CONFIG_CHANGE_MSG, 0))
    front.be.backend_sent(change)
    with pytest.raises(PeerError, match="expected one to CONFIG_CHANGE_MSG"):
        front.be.handle_backend_reply(backend_reply(BackendRequest.IOTLB_MSG, 0))
    front.be.backend_sent(change)
    error = front.be.handle_backend_reply(backend_reply(BackendRequest.CONFIG_CHANGE_MSG, 7))
    assert error is not None and "7" in error
    chan.close()


def test_config_change_without_reply_ack_asks_for_no_reply() -> None:
    f = Front(protocol=SUPPORTED_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.REPLY_ACK))
    f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
    f.share()
    chan = _channel(f)
    _drv, msgs = _break_ring(f, 1)
    assert msgs == [backend_request(BackendRequest.CONFIG_CHANGE_MSG)]
    f.be.backend_sent(msgs[0])
    assert f.be.backend_replies_due == 0
    chan.close()
    f.close()


def test_no_config_change_without_channel_or_config_feature() -> None:
    f = Front()
    f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
    f.share()
    assert _break_ring(f, 0)[1] == []  # no channel
    f.close()
    f = Front(protocol=SUPPORTED_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.CONFIG))
    f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
    f.share()
    chan = _channel(f)
    assert _break_ring(f, 0)[1] == []  # "When VHOST_USER_PROTOCOL_F_CONFIG is negotiated"
    assert f.be.config_change_message() is None
    chan.close()
    f.close()


def test_set_backend_req_fd_is_refused_without_the_feature_or_a_socket() -> None:
    f = Front(protocol=SUPPORTED_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.BACKEND_REQ))
    ours, theirs = socket.socketpair()
    fd = theirs.detach()
    out = f.be.handle(request(Request.SET_BACKEND_REQ_FD, fds=(fd,), need_reply=True))
    assert [r.payload for r in out.replies] == [1] and out.error is not None
    assert not _is_open(fd) and f.be.backend_fd is None
    ours.close()
    f.close()
    f = Front()
    efd = os.eventfd(0)
    with pytest.raises(PeerError, match="not a socket"):
        f.send(Request.SET_BACKEND_REQ_FD, None, (efd,))
    assert not _is_open(efd)
    f.close()


def test_channel_lifetime(front: Front) -> None:
    first = _channel(front)
    fd1 = front.be.backend_fd
    ours, theirs = socket.socketpair()
    out = front.be.handle(request(Request.SET_BACKEND_REQ_FD, None, fds=(theirs.detach(),)))
    second = ours  # replaces (and closes) the first; the I/O layer is told to re-watch
    fd2 = front.be.backend_fd
    assert fd1 is not None and fd2 is not None and fd2 != fd1 and out.channel
    assert first.recv(16) == b""  # the back end's end of the first pair is closed
    front.send(Request.RESET_DEVICE)  # device state only: the channel stays
    assert front.be.backend_fd == fd2 and _is_open(fd2)
    front.be.drop_backend_channel()
    assert front.be.backend_fd is None and not _is_open(fd2)
    third = _channel(front)
    fd3 = front.be.backend_fd
    assert fd3 is not None
    front.be.reset()  # the front end went away
    assert front.be.backend_fd is None and not _is_open(fd3)
    for s in (first, second, third):
        s.close()


# ------------------------------------------------------------------ garbage
_small = st.integers(0, 4)
_idx = st.integers(0, 3)
_addr = st.one_of(st.sampled_from([UADDR + k * 0x400 for k in range(16)]),
                  st.integers(0, MEM + 0x100), st.integers(UADDR - 0x100, UADDR + MEM + 0x100),
                  st.integers(0, (1 << 64) - 1))
_region = st.builds(MemRegion, st.sampled_from([0, 0x1000, MEM // 2, (1 << 64) - 0x1000]),
                    st.sampled_from([0, 0x1000, MEM // 2, MEM, 1 << 40]),
                    st.sampled_from([UADDR, UADDR + MEM // 2, 0]),
                    st.sampled_from([0, 0x1000, MEM // 2, MEM]))
_msgs = st.one_of(
    st.tuples(st.just(Request.SET_FEATURES), st.sampled_from([0, FEATURES, FEATURES | 1 << 30,
                                                              1 << 3])),
    st.tuples(st.just(Request.SET_PROTOCOL_FEATURES), st.integers(0, (1 << 17) - 1)),
    st.tuples(st.just(Request.SET_MEM_TABLE), st.lists(_region, min_size=1, max_size=3)),
    st.tuples(st.just(Request.ADD_MEM_REG), _region),
    st.tuples(st.just(Request.REM_MEM_REG), _region),
    st.tuples(st.sampled_from([Request.SET_VRING_NUM, Request.SET_VRING_BASE,
                               Request.GET_VRING_BASE, Request.SET_VRING_ENABLE]),
              st.builds(VringState, _idx, st.sampled_from([0, 1, 2, 3, 8, 16, 0xFFFF, 1 << 20]))),
    st.tuples(st.just(Request.SET_VRING_ADDR),
              st.builds(VringAddr, _idx, st.sampled_from([0, 1, 2]), _addr, _addr, _addr)),
    st.tuples(st.sampled_from([Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                               Request.SET_VRING_ERR]),
              st.sampled_from([0, 1, 3, 0x100, 0x101, 0x200])),
    st.tuples(st.sampled_from([Request.GET_CONFIG, Request.SET_CONFIG]),
              st.builds(lambda o, n, f: ConfigSpace(o, n, f, bytes(n)), st.integers(0, 300),
                        st.integers(0, 40), _small)),
    st.tuples(st.sampled_from([Request.RESET_DEVICE, Request.RESET_OWNER, Request.SET_OWNER,
                               Request.GET_STATUS, Request.GET_FEATURES, Request.GET_QUEUE_NUM,
                               Request.GET_MAX_MEM_SLOTS, Request.POSTCOPY_END]), st.none()),
    st.tuples(st.just(Request.SET_STATUS), st.integers(0, 0x1FF)),
    st.tuples(st.just(Request.SET_BACKEND_REQ_FD), st.none()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_msgs, st.booleans()), max_size=25),
       st.binary(min_size=64, max_size=64), st.booleans())
def test_random_request_sequences_only_raise_peer_errors(
        seq: list[tuple[tuple[Request, object], bool]], ring_bytes: bytes, setup: bool) -> None:
    f = Front()
    opened: list[int] = []
    try:
        if setup:  # start from two running rings so the garbage meets live state
            f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
            f.share()
            for index in (0, 1):
                f.ring(index)
                f.send(Request.SET_VRING_ENABLE, VringState(index, 1))
            ours, theirs = socket.socketpair()
            ours.close()
            opened.append(theirs.fileno())
            f.send(Request.SET_BACKEND_REQ_FD, None, (theirs.detach(),))
        f.mem.write(0x1000, ring_bytes * (0x3000 // 64))  # hostile ring contents
        for (req, raw), need_reply in seq:
            fds: tuple[int, ...] = ()
            payload: Payload
            if req is Request.SET_MEM_TABLE:
                assert isinstance(raw, list)
                payload = MemoryTable(tuple(raw))
                fds = tuple(os.dup(f.memfd) for _ in raw)
            else:
                payload = raw  # type: ignore[assignment]
            if req in (Request.ADD_MEM_REG,) or (
                    req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                            Request.SET_VRING_ERR) and isinstance(raw, int)
                    and not raw & VRING_NOFD_MASK):
                fds = (os.eventfd(0) if req is not Request.ADD_MEM_REG else os.dup(f.memfd),)
            if req is Request.SET_BACKEND_REQ_FD:
                ours, theirs = socket.socketpair()
                ours.close()  # a front end that already hung up its end
                fds = (theirs.detach(),)
            opened.extend(fds)
            try:
                out = f.be.handle(request(req, payload, fds=fds, need_reply=need_reply))
            except PeerError:
                f.be.reset()
                continue
            for index in range(len(f.be.rings)):
                for poll in (False, True):
                    res = f.be.run_ring(index, poll=poll)
                    event("ring broken" if res.broken else
                          "ring ran" if f.be.rings[index].runnable else "ring idle")
            assert all(r.is_reply for r in out.replies)
    finally:
        f.close()
    assert not any(_is_open(fd) for fd in opened)


def test_run_ring_drains_a_batching_device_and_interrupts_per_batch() -> None:
    f = Front()
    f.device = f.be.device = TwoAtATime()
    f.send(Request.SET_FEATURES, FEATURES | 1 << F_PROTOCOL_FEATURES)
    f.share()
    try:
        drv = f.ring(0)
        f.send(Request.SET_VRING_ENABLE, VringState(0, 1))
        for i in range(5):
            drv.add([], [(f.alloc(8, 1), 8)], token=i)
        res = f.be.run_ring(0)
        assert res.published == 5 and res.broken is None
        got = []
        while (b := drv.get_buf()) is not None:
            got.append(b[0])
        assert got == [0, 1, 2, 3, 4]
        # EVENT_IDX with used_event never moved: only the first batch crosses it.
        assert len(f.signals) == 1
    finally:
        f.close()
