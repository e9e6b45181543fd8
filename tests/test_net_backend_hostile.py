"""pyvirtio-net against a hostile driver: bad rings on one switch port, VIRTIO 1.2 §5.1.6.

The rules are :class:`~pyvirtio.devices.net.device.NetDevice`'s: a
device-writable buffer in a transmit chain, a device-readable buffer in a
receive chain and a receive buffer shorter than the ``virtio_net_hdr`` break
that queue (one log line, DEVICE_NEEDS_RESET, a configuration-change
request — docs/architecture.md "Guest input is hostile"); transmit chains
shorter than a header plus an Ethernet header or longer than a 64 KiB packet
plus headers, and frames larger than every receive buffer the driver could
post, are dropped and counted.  A ring index beyond the device's queue
pairs in SET_VRING_ENABLE is refused (REPLY_ACK) or, without REPLY_ACK,
drops that connection (QEMU docs/interop/vhost-user.rst), with one log line.

The back end runs in a thread: a 2-port learning switch, two ``NetDevice``
ports on one event loop, exactly what ``pyvirtio-net --switch`` builds.
Port A's front end is pyvirtio's ``VhostUserFrontend`` driving its rings by
hand (the hostile driver); port B's is a well-behaved driver written here
on the same rings.  After each bad input, the port's other queue and port B
still exchange frames, and guest memory is checked against a canary pattern
written over all of it before anything else: outside the rings' used areas
and the receive buffers the driver posted, no byte changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.core.spec import F_VERSION_1, Status
from pyvirtio.devices.net.device import NetDevice
from pyvirtio.devices.net.ports import Switch
from pyvirtio.devices.net.spec import F_MRG_RXBUF, MAX_TX_PACKET
from pyvirtio.io.loop import EventLoop
from pyvirtio.transports.vhost_user.frontend import (
    FRONTEND_PROTOCOL_FEATURES,
    FrontendQueue,
    VhostUserFrontend,
    VhostUserRefused,
)
from pyvirtio.transports.vhost_user.messages import ProtocolFeature
from pyvirtio.transports.vhost_user.server import VhostUserServer

pytestmark = pytest.mark.timeout(60)

MRG = 1 << F_VERSION_1 | 1 << F_MRG_RXBUF
HDR = 12                       # virtio_net_hdr with VERSION_1 (§5.1.6)
MEMORY = 4 << 20
CANARY = bytes(range(7, 256, 2)) * (MEMORY // 124 + 1)
MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")
WAIT = 10.0


def frame(dst: bytes, src: bytes, size: int, fill: int = 0x41) -> bytes:
    """An Ethernet frame of ``size`` bytes (local experimental EtherType 0x88b5)."""
    body = bytes((fill + i) & 0xFF for i in range(size - 14))
    return dst + src + b"\x88\xb5" + body


@dataclass
class Served:
    devices: tuple[NetDevice, NetDevice]
    paths: tuple[str, str]


@pytest.fixture
def switch(tmp_path: Path) -> Iterator[Served]:
    """Ports A and B of one learning switch, served from one loop in a thread."""
    sw = Switch("sw0")
    a = sw.add(NetDevice(bytes.fromhex("525400000001"), name="A", queue_size=256))
    b = sw.add(NetDevice(bytes.fromhex("525400000002"), name="B", queue_size=256))
    loop = EventLoop()
    paths = (str(tmp_path / "a.sock"), str(tmp_path / "b.sock"))
    servers = [VhostUserServer(dev, socket_path=p, loop=loop)
               for dev, p in zip((a, b), paths, strict=True)]
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield Served((a, b), paths)
    finally:
        loop.stop()
        thread.join(10)
        for server in servers:
            server.close()
        loop.close()
    assert not thread.is_alive()


class Driver:
    """A virtio-net driver on a vhost-user front end, rings driven by hand.

    Every byte of guest memory starts as :data:`CANARY`.  :attr:`device_may_write`
    lists the ranges the device may write (the used rings, the receive buffers
    posted as writable); :attr:`ours` the ranges this driver wrote (descriptor
    tables, available rings, transmitted data).  :meth:`check_memory` checks
    that the rest still holds the canary.
    """

    def __init__(self, path: str, features: int = MRG, size: int = 64,
                 protocol_mask: int = FRONTEND_PROTOCOL_FEATURES) -> None:
        self.fe = VhostUserFrontend.connect(path, memory_size=MEMORY,
                                            protocol_mask=protocol_mask)
        self.fe.memory.translate(0, MEMORY)[:] = CANARY[:MEMORY]
        self.features = self.fe.negotiate(self.fe.get_features() & features)
        assert self.features == features
        self.device_may_write: list[tuple[int, int]] = []
        self.ours: list[tuple[int, int]] = []
        self.rx = self.queue(0, size)
        self.tx = self.queue(1, size)
        self.rx_posted: dict[int, tuple[int, int]] = {}   # token -> buffer
        self._tokens = 0

    def queue(self, index: int, size: int) -> FrontendQueue:
        q = self.fe.setup_queue(index, size)
        lay = q.layout
        self.ours += [(lay.desc, 16 * size), (lay.avail, 6 + 2 * size)]
        self.device_may_write.append((lay.used, 6 + 8 * size))
        return q

    def token(self) -> int:
        self._tokens += 1
        return self._tokens

    def buffer(self, data: bytes) -> tuple[int, int]:
        """A device-readable buffer holding ``data``."""
        gpa = self.fe.alloc(len(data))
        self.fe.memory.write(gpa, data)
        self.ours.append((gpa, len(data)))
        return gpa, len(data)

    def untouched(self, size: int) -> tuple[int, int]:
        """A buffer the device must never write (still canary)."""
        return self.fe.alloc(size), size

    # ---------------------------------------------------------------- receive
    def post_rx(self, count: int, size: int = 2048) -> None:
        for _ in range(count):
            buf = (self.fe.alloc(size), size)
            self.device_may_write.append(buf)
            tok = self.token()
            self.rx_posted[tok] = buf
            self.rx.queue.add([], [buf], token=tok)
        self.rx.notify()

    def used(self, q: FrontendQueue, count: int) -> list[tuple[int, int]]:
        """``count`` used entries of ``q`` (waiting for the interrupts)."""
        out: list[tuple[int, int]] = []
        while len(out) < count:
            got = q.queue.get_buf()
            if got is None:
                assert q.wait(WAIT) or q.queue.more_used(), f"queue {q.index}: got {out}"
                continue
            tok, length = got
            assert isinstance(tok, int)
            out.append((tok, length))
        return out

    def receive(self) -> bytes:
        """One frame (its buffers are posted again)."""
        tok, length = self.used(self.rx, 1)[0]
        gpa, size = self.rx_posted.pop(tok)
        assert HDR <= length <= size
        data = self.fe.memory.read(gpa, length)
        bufs = [data]
        n = int.from_bytes(data[10:12], "little") if self.features >> F_MRG_RXBUF & 1 else 1
        for tok2, len2 in self.used(self.rx, n - 1):
            gpa2, size2 = self.rx_posted.pop(tok2)
            assert 0 < len2 <= size2
            bufs.append(self.fe.memory.read(gpa2, len2))
        self.post_rx(n, size)
        head = bufs[0]
        assert head[:10] == bytes(10), head[:HDR]   # no offload was negotiated
        return b"".join(bufs)[HDR:]

    # --------------------------------------------------------------- transmit
    def send_chain(self, readable: Sequence[tuple[int, int]],
                   writable: Sequence[tuple[int, int]] = ()) -> int:
        tok = self.token()
        self.tx.queue.add(readable, writable, token=tok)
        return tok

    def send(self, data: bytes) -> int:
        """Header + frame in one buffer; the token."""
        return self.send_chain([self.buffer(bytes(HDR) + data)])

    def sent(self, count: int) -> list[tuple[int, int]]:
        self.tx.notify()
        return self.used(self.tx, count)

    # ----------------------------------------------------------------- memory
    def check_memory(self) -> None:
        mem = self.fe.memory.read(0, MEMORY)
        spans = sorted(self.ours + self.device_may_write)
        pos = 0
        for start, length in [*spans, (MEMORY, 0)]:
            if start > pos:
                gap = mem[pos:start]
                if gap != CANARY[pos:start]:
                    bad = next(i for i in range(len(gap)) if gap[i] != CANARY[pos + i])
                    raise AssertionError(f"guest memory at {pos + bad:#x} was written "
                                         f"(outside every buffer the device may write)")
            pos = max(pos, start + length)

    def broken(self) -> bool:
        """The back end asked for a configuration change and says DEVICE_NEEDS_RESET."""
        return (self.fe.poll_backend_channel(WAIT) >= 1
                and bool(self.fe.get_status() & Status.NEEDS_RESET))

    def close(self) -> None:
        self.fe.close()


@pytest.fixture
def drivers(switch: Served) -> Iterator[Callable[..., Driver]]:
    made: list[Driver] = []

    def connect(port: int, **kw: int) -> Driver:
        drv = Driver(switch.paths[port], **kw)
        made.append(drv)
        return drv

    yield connect
    for drv in made:
        drv.close()


def a_to_b(a: Driver, b: Driver, size: int = 200) -> None:
    data = frame(MAC_B, MAC_A, size, fill=size)
    a.send(data)
    assert a.sent(1)[0][1] == 0   # transmit buffers come back with nothing written
    assert b.receive() == data


def b_to_a(a: Driver, b: Driver, size: int = 300) -> None:
    data = frame(MAC_A, MAC_B, size, fill=size)
    b.send(data)
    b.sent(1)
    assert a.receive() == data


def lines(caplog: pytest.LogCaptureFixture, text: str, at_least: int = 0) -> list[str]:
    """Log lines containing ``text``, once there are ``at_least`` of them (the server
    thread logs a drop after it closed the socket the front end sees closed)."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [r.getMessage() for r in caplog.records if text in r.getMessage()]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def broken_lines(caplog: pytest.LogCaptureFixture, at_least: int = 0) -> list[str]:
    return lines(caplog, "broken", at_least)


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyvirtio")


def test_both_ways_before_anything_bad(drivers: Callable[..., Driver]) -> None:
    a, b = drivers(0), drivers(1)
    a.post_rx(8)
    b.post_rx(8)
    a_to_b(a, b)
    b_to_a(a, b)
    a.check_memory()
    b.check_memory()


def test_memory_check_sees_a_stray_write(drivers: Callable[..., Driver]) -> None:
    a = drivers(0)
    a.post_rx(2)
    a.check_memory()
    stray = a.untouched(64)[0] + 17
    a.fe.memory.write(stray, b"\x00")
    with pytest.raises(AssertionError, match=f"{stray:#x}"):
        a.check_memory()


@pytest.mark.parametrize("bad", ["short", "readable"])
def test_bad_receive_buffer_breaks_only_that_receive_queue(
        drivers: Callable[..., Driver], switch: Served, caplog: pytest.LogCaptureFixture,
        bad: str) -> None:
    a, b = drivers(0), drivers(1)
    b.post_rx(8)
    a_to_b(a, b)                                       # the switch learns MAC_A on port A
    if bad == "short":
        a.rx.queue.add([], [a.untouched(HDR - 1)], token=a.token())
    else:
        a.rx.queue.add([a.buffer(b"R" * 64)], [a.untouched(2048)], token=a.token())
    a.rx.notify()
    for _ in range(3):   # the bad buffer is taken only when a frame for A arrives
        b.send(frame(MAC_A, MAC_B, 100))
    b.tx.notify()
    # A's receive queue breaks; B, which only sent A frames, must not notice.
    assert a.broken(), f"port A's receive queue is not broken; log: {broken_lines(caplog)}"
    assert [length for _tok, length in b.used(b.tx, 3)] == [0, 0, 0]
    broken = broken_lines(caplog, 1)
    assert len(broken) == 1 and "queue 0 " in broken[0], broken
    dev_a, dev_b = switch.devices
    assert dev_a.stats.rx_frames == 0
    # Port A still transmits, port B still sends and receives.
    a_to_b(a, b)
    a_to_b(a, b, 1500)
    assert b.tx.queue.broken is None
    assert dev_b.stats.drops == {} and dev_b.stats.tx_frames == dev_b.stats.rx_frames == 3
    a.check_memory()
    b.check_memory()


def test_writable_transmit_buffer_breaks_only_that_transmit_queue(
        drivers: Callable[..., Driver], caplog: pytest.LogCaptureFixture) -> None:
    a, b = drivers(0), drivers(1)
    a.post_rx(8)
    b.post_rx(8)
    good = frame(MAC_B, MAC_A, 120)
    a.send(good)
    a.send_chain([a.buffer(bytes(HDR) + frame(MAC_B, MAC_A, 80))], [a.untouched(512)])
    a.tx.notify()
    assert a.broken()
    # The frame before the bad chain went out and its buffer came back.
    assert b.receive() == good
    assert [length for _tok, length in a.used(a.tx, 1)] == [0]
    broken = broken_lines(caplog, 1)
    assert len(broken) == 1 and "queue 1 " in broken[0], broken
    # Port A still receives; port B both ways.
    b_to_a(a, b)
    b_to_a(a, b, 1514)
    a.check_memory()
    b.check_memory()


def test_transmit_chain_of_a_header_only_is_dropped(
        drivers: Callable[..., Driver], switch: Served, caplog: pytest.LogCaptureFixture) -> None:
    a, b = drivers(0), drivers(1)
    a.post_rx(8)
    b.post_rx(8)
    a.send_chain([a.buffer(bytes(HDR))])
    a.send_chain([a.buffer(bytes(HDR) + MAC_B + MAC_A)])   # 13 bytes short of a frame header
    assert [length for _tok, length in a.sent(2)] == [0, 0]
    dev_a = switch.devices[0]
    assert dev_a.stats.drops == {"tx_runt": 2}
    assert dev_a.stats.tx_frames == 0 and dev_a.stats.tx_buffers == 2
    a_to_b(a, b)
    b_to_a(a, b)
    assert broken_lines(caplog) == []
    a.check_memory()
    b.check_memory()


def test_transmit_chain_longer_than_64k_is_dropped_the_largest_allowed_is_not(
        drivers: Callable[..., Driver], switch: Served, caplog: pytest.LogCaptureFixture) -> None:
    a, b = drivers(0), drivers(1)
    a.post_rx(8)
    b.post_rx(48)
    dev_a = switch.devices[0]
    # One buffer named 40 times: 80 KiB of packet out of 2 KiB of guest memory.
    looped = a.buffer(bytes(HDR) + frame(MAC_B, MAC_A, 2048 - HDR))
    a.send_chain([looped] * 40)
    # One byte more than a 64 KiB packet plus Ethernet and VLAN headers.
    a.send_chain([a.buffer(bytes(HDR) + frame(MAC_B, MAC_A, MAX_TX_PACKET + 1))])
    assert [length for _tok, length in a.sent(2)] == [0, 0]
    assert dev_a.stats.drops == {"tx_oversize": 2}
    assert dev_a.stats.tx_frames == 0
    # Exactly the limit goes through, over 33 mergeable receive buffers of port B.
    biggest = frame(MAC_B, MAC_A, MAX_TX_PACKET, fill=7)
    a.send(biggest)
    assert a.sent(1)[0][1] == 0
    assert b.receive() == biggest
    a_to_b(a, b)
    b_to_a(a, b)
    assert broken_lines(caplog) == []
    a.check_memory()
    b.check_memory()


@pytest.mark.parametrize("mergeable", [False, True], ids=["one-buffer", "mergeable"])
def test_frame_larger_than_every_receive_buffer_is_dropped(
        drivers: Callable[..., Driver], switch: Served, caplog: pytest.LogCaptureFixture,
        mergeable: bool) -> None:
    features = MRG if mergeable else 1 << F_VERSION_1
    a, b = drivers(0, features=features, size=8), drivers(1)
    b.post_rx(8)
    a_to_b(a, b)
    # Without MRG_RXBUF one 256-byte buffer must hold header and frame (§5.1.6.3.1);
    # with it, the whole ring (8 buffers of 64 bytes) cannot hold 1000 bytes.
    a.post_rx(8, 256 if not mergeable else 64)
    before = dict(a.rx_posted)
    b.send(frame(MAC_A, MAC_B, 1000))
    b.sent(1)
    dev_a = switch.devices[0]
    assert dev_a.stats.drops == {"rx_too_big": 1}
    assert dev_a.stats.rx_frames == 0 and a.rx.queue.get_buf() is None
    for gpa, size in before.values():   # the buffers stay posted, unwritten
        assert a.fe.memory.read(gpa, size) == CANARY[gpa:gpa + size]
    # ... and take the next frame that fits.
    small = frame(MAC_A, MAC_B, 200 if not mergeable else 60)
    b.send(small)
    b.sent(1)
    assert a.receive() == small
    a_to_b(a, b)
    assert broken_lines(caplog) == []
    a.check_memory()
    b.check_memory()


def test_set_vring_enable_beyond_the_pairs_is_refused(
        drivers: Callable[..., Driver], caplog: pytest.LogCaptureFixture) -> None:
    a, b = drivers(0), drivers(1)
    a.post_rx(8)
    b.post_rx(8)
    assert a.fe.has_protocol(ProtocolFeature.REPLY_ACK)
    for index in (2, 3, 255):
        with pytest.raises(VhostUserRefused):
            a.fe.enable_queue(index)
    refused = lines(caplog, "SET_VRING_ENABLE", 3)
    assert len(refused) == 3, refused
    a_to_b(a, b)
    b_to_a(a, b)
    a.check_memory()
    b.check_memory()


def test_set_vring_enable_beyond_the_pairs_without_reply_ack_drops_that_connection(
        drivers: Callable[..., Driver], switch: Served,
        caplog: pytest.LogCaptureFixture) -> None:
    mask = FRONTEND_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.REPLY_ACK)
    a, b = drivers(0, protocol_mask=mask), drivers(1)
    a.post_rx(8)
    b.post_rx(8)
    a.fe.enable_queue(2)     # no reply expected: the back end hangs up
    with pytest.raises(Exception):  # noqa: B017 - any error: the connection is gone
        a.fe.get_status()
    dropped = lines(caplog, "dropping front end", 1)
    assert len(dropped) == 1 and "SET_VRING_ENABLE" in dropped[0], dropped
    # Port B carries on (frames for A have no front end now: dropped and counted) ...
    b.send(frame(MAC_A, MAC_B, 100))
    b.sent(1)
    assert switch.devices[0].stats.drops == {"rx_no_frontend": 1}
    # ... and port A serves the next front end.
    a2 = drivers(0)
    a2.post_rx(8)
    a_to_b(a2, b)
    b_to_a(a2, b)
    a2.check_memory()
    b.check_memory()
