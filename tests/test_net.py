"""virtio-net (VIRTIO 1.2 §5.1): header codec, loopback device, Linux-shaped driver."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable

import pytest

from pyvirtio.core.errors import PeerError
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_RING_PACKED, F_VERSION_1, bit
from pyvirtio.demo.frames import check_frame, make_frame
from pyvirtio.devices.net import NetDevice, NetDriver, NetHdr, hdr_size
from pyvirtio.devices.net.spec import F_MRG_RXBUF, RX_QUEUE, TX_QUEUE, net_config
from pyvirtio.transports.device import VirtQueue
from pyvirtio.transports.inprocess import InProcessTransport

MAC = bytes.fromhex("525400abcdef")
MEM = 8 << 20


def test_hdr_sizes_and_codec() -> None:
    assert hdr_size(0) == 10
    assert hdr_size(bit(F_MRG_RXBUF)) == 12
    assert hdr_size(bit(F_VERSION_1)) == 12
    h = NetHdr(1, 3, 54, 1448, 34, 16, 2)
    raw12 = h.pack(12)
    assert raw12 == bytes([1, 3, 54, 0, 0xA8, 5, 34, 0, 16, 0, 2, 0])
    assert NetHdr.unpack(raw12, 12) == h
    raw10 = h.pack(10)
    assert raw10 == raw12[:10]
    assert NetHdr.unpack(raw10, 10) == NetHdr(1, 3, 54, 1448, 34, 16, 0)
    with pytest.raises(PeerError):
        NetHdr.unpack(b"\0" * 9, 10)
    assert net_config(MAC) == MAC + b"\x01\x00"


class Loop:
    """Driver and loopback device over the in-process transport, notifications queued."""

    def __init__(self, features: int, suppress: bool, qsize: int = 64,
                 rx_buf_size: int = 2048) -> None:
        self.mem = GuestMemory.anonymous(MEM)
        alloc = BumpAllocator(0x1000, MEM)
        self.events: deque[tuple[str, int]] = deque()
        self.t = InProcessTransport(self.mem, alloc, [qsize, qsize], features,
                                    on_kick=lambda q: self.events.append(("kick", q)),
                                    on_interrupt=lambda q: self.events.append(("irq", q)))
        self.frames: list[bytes] = []
        # The device model of pyvirtio-net and the demo, with its loopback port.
        self.dev = NetDevice(MAC, queue_size=qsize)
        self.dev.suppress = suppress
        self.dev.uplink = self.dev.loopback
        self.dev.set_features(features)
        self.soon: list[Callable[[], None]] = []
        self.broken: list[str] = []
        self.vqs = [VirtQueue(q, self.t.device(q), self.dev,
                              functools.partial(self.t.notify_driver, q),
                              on_broken=lambda vq, why: self.broken.append(why),
                              schedule=self.soon.append) for q in (RX_QUEUE, TX_QUEUE)]
        for vq in self.vqs:
            self.dev.queue_ready(vq)
        self.drv = NetDriver(self.t.driver(RX_QUEUE), self.t.driver(TX_QUEUE), self.mem, alloc,
                             features, kick=self.t.notify_device,
                             on_frame=lambda f: self.frames.append(bytes(f)),
                             suppress=suppress, rx_buf_size=rx_buf_size)

    def deliver(self) -> None:
        while self.events:
            kind, q = self.events.popleft()
            if kind == "kick":
                self.run(q)
            elif q == RX_QUEUE:
                self.drv.rx_interrupt()
            else:
                self.drv.tx_interrupt()

    def run(self, queue: int) -> int:
        """The device's kick handler for ``queue``, then what it scheduled; tx chains done."""
        before = self.dev.stats.tx_buffers
        self.vqs[queue].run()
        while self.soon:
            self.soon.pop(0)()
        return self.dev.stats.tx_buffers - before

    def run_frames(self, count: int, max_steps: int = 100_000) -> None:
        self.drv.try_fill_recv()
        sent = 0
        for _ in range(max_steps):
            if sent < count and not self.drv.tx_stopped and self.drv.xmit(make_frame(sent, MAC)):
                sent += 1
            if self.drv.napi_scheduled:
                self.drv.napi_poll()
            self.deliver()
            if len(self.frames) >= count:
                return
        raise AssertionError(f"stuck after {len(self.frames)} of {count} frames")


@pytest.mark.parametrize(("features", "suppress", "rx_buf"), [
    (0, False, 2048),
    (0, True, 2048),
    (bit(F_RING_EVENT_IDX), True, 2048),
    (bit(F_MRG_RXBUF), True, 2048),
    (bit(F_MRG_RXBUF) | bit(F_RING_EVENT_IDX), True, 300),  # frames span several buffers
    # The same over packed rings (VIRTIO 1.2 §2.8): the in-process transport builds them.
    (bit(F_RING_PACKED), False, 2048),
    (bit(F_RING_PACKED) | bit(F_RING_EVENT_IDX), True, 2048),
    (bit(F_RING_PACKED) | bit(F_MRG_RXBUF) | bit(F_RING_EVENT_IDX), True, 300),
])
def test_loopback_frames_intact_in_order(features: int, suppress: bool, rx_buf: int) -> None:
    loop = Loop(features, suppress, rx_buf_size=rx_buf)
    loop.run_frames(700)
    assert len(loop.frames) == 700
    assert [check_frame(f, i, MAC) for i, f in enumerate(loop.frames)] == [None] * 700
    assert loop.dev.stats.tx_frames == 700 and not loop.dev.stats.drops
    assert loop.drv.frames_received == 700
    if rx_buf < 1514:
        assert loop.drv.rx_buffers > 700  # merged buffers were used
    queues = loop.t.queues
    if not suppress:
        # Without suppression every transmitted frame kicks.
        assert queues[TX_QUEUE].kicks == 700
    else:
        assert queues[TX_QUEUE].interrupts < 700


def test_tx_buffers_are_reclaimed_late() -> None:
    loop = Loop(bit(F_RING_EVENT_IDX), True, qsize=16)
    loop.drv.try_fill_recv()
    assert loop.drv.xmit(make_frame(0, MAC))
    loop.deliver()  # the device's first interrupt is never suppressed
    assert loop.t.queues[TX_QUEUE].interrupts == 1 and loop.drv.tx_reclaimed == 1
    for i in range(1, 4):
        assert loop.drv.xmit(make_frame(i, MAC))
    loop.deliver()  # device loops them back; tx interrupts stay off now
    assert loop.drv.tx_reclaimed == 1
    assert loop.t.queues[TX_QUEUE].interrupts == 1
    assert loop.drv.xmit(make_frame(4, MAC))  # free_old_xmit runs first
    assert loop.drv.tx_reclaimed == 4


def test_rx_refill_threshold() -> None:
    loop = Loop(0, True, qsize=64, rx_buf_size=2048)
    assert loop.drv.try_fill_recv() == 32  # two descriptors per non-mergeable buffer
    assert loop.drv.rx.num_free == 0
    for i in range(10):
        loop.drv.xmit(make_frame(i, MAC))
    loop.deliver()
    loop.drv.rx_interrupt()
    loop.drv.napi_poll(64)
    # 20 free descriptors is not above min(64, 64) / 2: no refill yet.
    assert loop.drv.rx.num_free == 20
    for i in range(10, 16):
        loop.drv.xmit(make_frame(i, MAC))
    loop.deliver()
    loop.drv.napi_poll(64)
    assert loop.drv.rx.num_free == 32  # exactly the threshold: still no refill
    loop.drv.xmit(make_frame(16, MAC))
    loop.deliver()
    loop.drv.napi_poll(64)
    assert loop.drv.rx.num_free == 0  # 34 > 32: refilled to the top
    assert len(loop.frames) == 17


def test_device_breaks_on_writable_tx_chain() -> None:
    loop = Loop(0, True, qsize=16)
    loop.drv.try_fill_recv()
    tx = loop.t.driver(TX_QUEUE)
    tx.add([(0x200000, 10)], [(0x200100, 64)], "bad")
    assert loop.run(TX_QUEUE) == 0 and loop.run(TX_QUEUE) == 0
    assert len(loop.broken) == 1 and "device-writable" in loop.broken[0]
    assert not loop.vqs[TX_QUEUE].ready and loop.vqs[RX_QUEUE].ready


def test_header_only_and_short_tx_chains_are_dropped_and_counted() -> None:
    loop = Loop(bit(F_MRG_RXBUF), True, qsize=16)
    loop.drv.try_fill_recv()
    loop.t.driver(TX_QUEUE).add([(0x200000, 5)], [], "short")
    loop.t.driver(TX_QUEUE).add([(0x200000, 12)], [], "header only")
    assert loop.run(TX_QUEUE) == 2
    assert loop.dev.stats.drops == {"tx_runt": 2} and not loop.broken
    assert [loop.t.driver(TX_QUEUE).get_buf() for _ in range(2)] == [("short", 0),
                                                                     ("header only", 0)]


def test_driver_rejects_oversized_used_length() -> None:
    loop = Loop(bit(F_MRG_RXBUF), True, qsize=16, rx_buf_size=256)
    loop.drv.try_fill_recv()
    devq = loop.t.device(RX_QUEUE)
    elem = devq.pop()
    assert elem is not None
    devq.push(elem.head, 4096)
    with pytest.raises(PeerError):
        loop.drv.poll_receive(8)


def test_non_mergeable_too_small_frame_dropped_not_broken() -> None:
    loop = Loop(0, True, qsize=16)
    loop.drv.try_fill_recv()
    # A 2-segment receive buffer holds 10 + 1514 bytes; hand-craft a bigger packet.
    tx = loop.t.driver(TX_QUEUE)
    tx.add([(0x200000, 10), (0x200100, 1600)], [], "big")
    loop.run(TX_QUEUE)
    assert loop.dev.stats.drops == {"rx_too_big": 1} and not loop.broken


def test_tx_chain_naming_gigabytes_is_dropped_without_a_copy() -> None:
    """15 descriptors on the same 4 MiB: the device drops the frame instead of joining 60 MiB."""
    import tracemalloc

    loop = Loop(bit(F_MRG_RXBUF), True, qsize=16)
    loop.drv.try_fill_recv()
    tx = loop.t.driver(TX_QUEUE)
    tx.add([(0x400000, 4 << 20)] * 15, [], "huge")
    tracemalloc.start()
    try:
        done = loop.run(TX_QUEUE)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    assert done == 1 and loop.dev.stats.drops == {"tx_oversize": 1} and not loop.broken
    assert tx.get_buf() == ("huge", 0)
    assert loop.drv.xmit(make_frame(1, MAC))  # the queue pair still loops frames
    loop.deliver()
    loop.drv.napi_poll(64)
    assert [check_frame(f, 1, MAC) for f in loop.frames] == [None]


def test_offloads_only_where_the_port_carries_the_header() -> None:
    """CSUM/TSO are offered only with a port that carries virtio_net_hdr (a TAP with
    IFF_VNET_HDR); a port's header reaches the driver only if it took GUEST_CSUM."""
    from pyvirtio.devices.net.ports import Switch
    from pyvirtio.devices.net.spec import F_GUEST_CSUM, OFFLOAD_FEATURES
    from test_net_bursts import make_port

    assert NetDevice().device_features & OFFLOAD_FEATURES == 0
    sw = Switch()
    assert sw.add(NetDevice()).device_features & OFFLOAD_FEATURES == 0
    port = make_port("tap-like", None, loopback=True)
    dev = port.dev
    dev.offer_offloads()
    assert dev.device_features & OFFLOAD_FEATURES == OFFLOAD_FEATURES and dev.port_headers
    rx = port.t.driver(RX_QUEUE)
    gpa = port.alloc.alloc(4096, 16)
    offload = bytes([1, 1]) + (54).to_bytes(2, "little") + (1448).to_bytes(2, "little") + \
        (34).to_bytes(2, "little") + (16).to_bytes(2, "little")  # NEEDS_CSUM, TCPv4
    frame = make_frame(0, MAC)
    for guest_csum, expect in ((False, bytes(10)), (True, offload)):
        seen: list[int] = []
        dev.feature_hooks[:] = [seen.append]
        features = bit(F_VERSION_1) | (bit(F_GUEST_CSUM) if guest_csum else 0)
        dev.set_features(features)
        assert seen == [features]  # the port learns the driver's choice
        rx.add([], [(gpa, 4096)], token=1)
        assert dev.deliver(frame, offload)
        port.vqs[0].publish()
        ((_tok, n),) = rx.get_bufs()
        data = bytes(port.mem.translate(gpa, n))
        assert data[:10] == expect and data[10:12] == b"\x01\x00" and data[12:] == frame
