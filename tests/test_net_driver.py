"""NetDriver's blocking API over vhost-user, and its checks of what the device returns.

* ``NetDriver.connect`` against a small virtio-net loopback on the device
  kit, served in this process: features (VIRTIO 1.2 §5.1.3; never
  NOTIFY_ON_EMPTY), MAC and link status from the configuration space
  (§5.1.4), frames through both rings in order, timeouts, misuse.
* The receive path against a device side driven by hand (in-process rings):
  runt frames are dropped and counted (Linux ``receive_buf``); a used
  buffer without a header, ``num_buffers`` 0 or more than were used, and a
  used length beyond the buffer are the device's errors (PeerError).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import F_NOTIFY_ON_EMPTY, F_RING_EVENT_IDX, F_VERSION_1, DeviceId, bit
from pyvirtio.devices.net.driver import NetDriver
from pyvirtio.devices.net.spec import (
    F_MAC,
    F_MRG_RXBUF,
    F_STATUS,
    RX_QUEUE,
    S_LINK_UP,
    TX_QUEUE,
    NetHdr,
    net_config,
)
from pyvirtio.devices.net.workload import make_frames, run_net_bench
from pyvirtio.transports.device import Device, VirtQueue
from pyvirtio.transports.inprocess import InProcessTransport
from pyvirtio.transports.vhost_user.server import VhostUserServer

MAC = bytes.fromhex("525400c0ffee")


class Loopback(Device):
    """Transmitted frames come back on receiveq1 (one buffer each, 12-byte header)."""

    device_id = int(DeviceId.NET)
    num_queues = 2
    queue_size = 256
    device_features = bit(F_MAC) | bit(F_STATUS) | bit(F_MRG_RXBUF)

    def __init__(self, status: int = S_LINK_UP) -> None:
        self.config = net_config(MAC, status)
        self.backlog: deque[bytes] = deque()
        self.rxq: VirtQueue | None = None

    def queue_ready(self, queue: VirtQueue) -> None:
        if queue.index == RX_QUEUE:
            self.rxq = queue

    def process(self, queue: VirtQueue) -> None:
        if queue.index == TX_QUEUE:
            while (req := queue.pop()) is not None:
                self.backlog.append(req.read()[12:])
                req.complete(0)
        rxq = self.rxq
        while self.backlog and rxq is not None and (req := rxq.pop()) is not None:
            packet = NetHdr(num_buffers=1).pack(12) + self.backlog.popleft()
            req.complete(req.write(packet))


def serve(device: Loopback, sock: Path) -> Iterator[str]:
    server = VhostUserServer(device, socket_path=str(sock))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield str(sock)
    finally:
        server.stop()
        thread.join(10)


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[str]:
    yield from serve(Loopback(), tmp_path / "net.sock")


@pytest.fixture
def link_down(tmp_path: Path) -> Iterator[str]:
    yield from serve(Loopback(status=0), tmp_path / "down.sock")


@pytest.mark.timeout(60)
def test_connect_negotiates_and_reads_config(loopback: str) -> None:
    with NetDriver.connect(loopback, queue_size=64, timeout=10) as drv:
        want = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_MRG_RXBUF) | bit(F_MAC) \
            | bit(F_STATUS)
        assert drv.features == want
        assert not drv.features >> F_NOTIFY_ON_EMPTY & 1  # offered by the kit, declined
        assert drv.hdr_len == 12 and drv.mac == MAC and drv.link_up
        # try_fill_recv filled receiveq1 with single-descriptor buffers and kicked once.
        assert drv.rx.num_free == 0 and drv.rx.outstanding == 64
        assert drv.kicks == [1, 0]


@pytest.mark.timeout(60)
def test_link_down_is_read_from_status(link_down: str) -> None:
    with NetDriver.connect(link_down, queue_size=64, timeout=10) as drv:
        assert drv.mac == MAC and not drv.link_up


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mergeable", [True, False])
def test_frames_loop_back_in_order(loopback: str, mergeable: bool) -> None:
    with NetDriver.connect(loopback, queue_size=64, mergeable=mergeable, timeout=10) as drv:
        assert bool(drv.features >> F_MRG_RXBUF & 1) == mergeable
        frames = [f[:60 + (i * 91) % 1455] for i, f in
                  enumerate(make_frames(drv.mac, 1514, 500))]
        got: list[bytes] = []
        for i in range(0, len(frames), 20):
            drv.send_many(frames[i:i + 20])
            while len(got) < i + 20:
                more = drv.receive_many(64, timeout=10)
                assert more
                got += more
        assert got == frames
        assert drv.receive(timeout=0.05) is None
        drv.send(frames[0])
        assert drv.receive(timeout=10) == frames[0]
        assert drv.drain_tx(10)
        stats = drv.stats()
        total = sum(len(f) for f in frames) + len(frames[0])
        assert stats["frames_sent"] == stats["frames_received"] == 501
        assert stats["bytes_sent"] == stats["bytes_received"] == total
        assert stats["rx_dropped"] == 0 and stats["interrupts_rx"] >= 1


@pytest.mark.timeout(60)
def test_oversized_frame_is_refused_after_the_good_ones_went(loopback: str) -> None:
    with NetDriver.connect(loopback, queue_size=64, timeout=10) as drv:
        good = make_frames(drv.mac, 100, 2)
        with pytest.raises(CallerError, match="larger than 1514"):
            drv.send_many([good[0], bytes(1515), good[1]])
        assert drv.frames_sent == 1
        assert drv.receive(timeout=10) == good[0]  # kicked despite the error
        with pytest.raises(CallerError):
            drv.receive_many(0)


def test_blocking_api_needs_a_transport(loopback: str) -> None:
    drv = NetDriver.connect(loopback, queue_size=16, timeout=10)
    drv.close()
    drv.close()  # closing twice is harmless
    with pytest.raises(CallerError, match="no transport"):
        drv.send(bytes(60))
    with pytest.raises(CallerError, match="no transport"):
        drv.receive(0)


@pytest.mark.parametrize(("size", "buf"), [(3, 2048), (256, 11), (256, 70000)])
def test_connect_refuses_bad_sizes(loopback: str, size: int, buf: int) -> None:
    with pytest.raises(CallerError):
        NetDriver.connect(loopback, queue_size=size, rx_buf_size=buf)


class Hoarder(Loopback):
    """Takes transmit buffers and never gives them back."""

    def process(self, queue: VirtQueue) -> None:
        pass


@pytest.mark.timeout(60)
def test_bench_io_then_txonly_through_the_loopback(loopback: str) -> None:
    with NetDriver.connect(loopback, queue_size=64, timeout=10) as drv:
        io = run_net_bench(drv, "io", 100, 0.3, batch=16)
        assert io.frames_sent == io.frames_received > 0 and io.drops == 0
        assert io.bytes_received == 100 * io.frames_received and not io.stalled
        assert io.pps > 0 and io.kicks == io.kicks_tx + io.kicks_rx
        tx = run_net_bench(drv, "txonly", 60, 0.2)
        assert tx.frames_sent > 0 and tx.frames_received == 0 and not tx.stalled
        assert drv.frames_sent == io.frames_sent + tx.frames_sent


@pytest.mark.timeout(60)
def test_bench_txonly_reports_a_stalled_back_end(tmp_path: Path) -> None:
    for path in serve(Hoarder(), tmp_path / "hoard.sock"):
        with NetDriver.connect(path, queue_size=16, timeout=10) as drv:
            res = run_net_bench(drv, "txonly", 64, 0.2)
            assert res.stalled and res.frames_sent == 16  # one ring's worth, then nothing


class Slow(Loopback):
    """Returns transmit buffers 20 ms after it took them (a device that lags behind)."""

    def process(self, queue: VirtQueue) -> None:
        if queue.index != TX_QUEUE:
            return
        taken = []
        while (req := queue.pop()) is not None:
            taken.append(req)
        def complete() -> None:
            for req in taken:
                req.complete(0)

        if taken:
            self.loop.call_later(0.02, complete)


@pytest.mark.timeout(60)
def test_full_transmit_ring_waits_for_the_delayed_interrupt(tmp_path: Path) -> None:
    for path in serve(Slow(), tmp_path / "slow.sock"):
        with NetDriver.connect(path, queue_size=16, timeout=10) as drv:
            frames = make_frames(drv.mac, 64, 200)
            assert drv.send_many(frames) == 200
            # The ring (16) filled up: the queue stopped, asked for an interrupt
            # after 3/4 of the buffers (enable_cb_delayed), and woke on it.
            assert drv.interrupts[TX_QUEUE] >= 1 and not drv.tx_stopped
            assert drv.drain_tx(10) and drv.tx_reclaimed == 200
            assert drv.tx.outstanding == 0


# ------------------------------------------------- device side driven by hand
class Rings:
    """The driver's receive path with the device side of receiveq1 in the test's hands."""

    def __init__(self, features: int = bit(F_MRG_RXBUF) | bit(F_VERSION_1)) -> None:
        self.mem = GuestMemory.anonymous(4 << 20)
        alloc = BumpAllocator(0x1000, 4 << 20)
        self.t = InProcessTransport(self.mem, alloc, [16, 16], features)
        self.frames: list[bytes] = []
        self.drv = NetDriver(self.t.driver(RX_QUEUE), self.t.driver(TX_QUEUE), self.mem, alloc,
                             features, kick=lambda q: None,
                             on_frame=lambda f: self.frames.append(bytes(f)),
                             rx_buf_size=256)
        self.drv.try_fill_recv()
        self.dev = self.t.device(RX_QUEUE)

    def used(self, data: bytes, length: int | None = None) -> None:
        """Fill the next receive buffer with ``data`` and return it as ``length`` used bytes."""
        elem = self.dev.pop()
        assert elem is not None
        view = elem.writable[0]
        view[:len(data)] = data
        self.dev.push(elem.head, len(data) if length is None else length)

    def close(self) -> None:
        self.mem.close()


@pytest.fixture
def rings() -> Iterator[Rings]:
    r = Rings()
    yield r
    r.close()


def hdr(num_buffers: int) -> bytes:
    return NetHdr(num_buffers=num_buffers).pack(12)


def test_runt_frame_is_dropped_and_counted(rings: Rings) -> None:
    rings.used(hdr(1) + bytes(13))        # shorter than an Ethernet header
    rings.used(hdr(1) + b"E" * 14)
    assert rings.drv.poll_receive(8) == 2
    assert rings.frames == [b"E" * 14]
    assert rings.drv.rx_dropped == 1 and rings.drv.frames_received == 1


def test_frame_over_several_buffers_is_joined(rings: Rings) -> None:
    frame = bytes(range(256)) * 2
    rings.used(hdr(3) + frame[:244])
    rings.used(frame[244:500])
    rings.used(frame[500:])
    assert rings.drv.poll_receive(8) == 1
    assert rings.frames == [frame] and rings.drv.rx_buffers == 3
    assert rings.drv.bytes_received == 512


def test_first_buffer_may_hold_only_the_header(rings: Rings) -> None:
    """§5.1.6.3.1 lets a mergeable buffer be as small as the header; the frame follows."""
    rings.used(hdr(2))
    rings.used(b"F" * 60)
    rings.used(hdr(2) + b"G" * 5)
    rings.used(b"G" * 5)                # 10 bytes in all: a runt, dropped
    assert rings.drv.poll_receive(8) == 2
    assert rings.frames == [b"F" * 60] and rings.drv.rx_dropped == 1


@pytest.mark.parametrize(("buffers", "match"), [
    ([hdr(0) + bytes(50)], "num_buffers is 0"),
    ([hdr(3) + bytes(244), bytes(20)], "fewer buffers"),
    ([hdr(1)[:11]], "no virtio_net_hdr"),
])
def test_malformed_used_buffers_are_peer_errors(rings: Rings, buffers: list[bytes],
                                                match: str) -> None:
    for data in buffers:
        rings.used(data)
    with pytest.raises(PeerError, match=match):
        rings.drv.poll_receive(8)
    with pytest.raises(QueueBrokenError):  # receiveq1 stays broken, as Linux's BAD_RING
        rings.drv.poll_receive(8)


def test_used_length_beyond_the_buffer_is_a_peer_error(rings: Rings) -> None:
    rings.used(hdr(1) + bytes(50), length=257)
    with pytest.raises(PeerError, match="257 bytes of a 256-byte"):
        rings.drv.poll_receive(8)
