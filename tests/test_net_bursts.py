"""The batched transmit path (devices/net/bursts.py) against the per-frame one.

Both paths must give the same result for the same ring: the same frames to
the same ports in the same order, the same drops, the same used ring, the
same broken queue at the same chain, the same back-pressure.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_VERSION_1, bit
from pyvirtio.devices.net import device as net_device
from pyvirtio.devices.net.device import NetDevice
from pyvirtio.devices.net.ports import Switch
from pyvirtio.devices.net.spec import MAX_TX_PACKET, RX_QUEUE, TX_QUEUE
from pyvirtio.transports.device import VirtQueue
from pyvirtio.transports.inprocess import InProcessTransport

MEM = 8 << 20
HDR = 12
FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX)
A, B, C = (bytes.fromhex(m) for m in ("525400000001", "525400000002", "525400000003"))
BCAST = b"\xff" * 6


@dataclass
class Port:
    """One NetDevice with its rings in process memory; frames for it are recorded."""

    dev: NetDevice
    t: InProcessTransport
    alloc: BumpAllocator
    mem: GuestMemory
    vqs: list[VirtQueue]
    broken: list[str]
    got: list[bytes]

    def chain(self, readable: list[bytes], writable: int = 0) -> None:
        """Make one transmit chain available: readable buffers (+ a writable one)."""
        outs = []
        for data in readable:
            gpa = self.alloc.alloc(max(1, len(data)), 16)
            self.mem.translate(gpa, len(data))[:] = data
            outs.append((gpa, len(data)))
        ins = [(self.alloc.alloc(writable, 16), writable)] if writable else []
        self.t.driver(TX_QUEUE).add(outs, ins, token=len(outs))

    def used(self) -> list[tuple[int, int]]:
        return [(int(h), n) for h, n in self.t.driver(TX_QUEUE).get_bufs()]  # type: ignore[call-overload]


def make_port(name: str, switch: Switch | None, qsize: int = 256,
              loopback: bool = False,
              schedule: Callable[[Callable[[], None]], None] | None = None) -> Port:
    mem = GuestMemory.anonymous(MEM)
    alloc = BumpAllocator(0x1000, MEM)
    t = InProcessTransport(mem, alloc, [qsize, qsize], FEATURES)
    dev = NetDevice(name=name, queue_size=qsize, tx_burst=256)
    dev.set_features(FEATURES)
    broken: list[str] = []
    vqs = [VirtQueue(q, t.device(q), dev, functools.partial(t.notify_driver, q),
                     on_broken=lambda vq, why: broken.append(why), schedule=schedule)
           for q in (RX_QUEUE, TX_QUEUE)]
    got: list[bytes] = []
    if switch is not None:
        switch.add(dev)
    if loopback:
        dev.uplink = dev.loopback
        dev.queue_ready(vqs[0])
    else:
        def record(frame: bytes, offload: bytes | None = None) -> bool:
            got.append(bytes(frame))
            return True
        # What reaches this port, recorded instead of written into receive buffers.
        dev.deliver = record  # type: ignore[method-assign]
    dev.queue_ready(vqs[1])
    return Port(dev, t, alloc, mem, vqs, broken, got)


def eth(dst: bytes, src: bytes, n: int, size: int = 64) -> bytes:
    body = dst + src + b"\x08\x00" + n.to_bytes(4, "big")
    return body + bytes(size - len(body))


@pytest.fixture(params=["batched", "per-frame"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "per-frame":
        monkeypatch.setattr(net_device, "TX_BATCH_MIN", 1 << 30)
    yield request.param


Outcome = tuple[list[list[bytes]], list[list[tuple[int, int]]], list[dict[str, object]], int,
                list[list[str]]]


def run_switch(seed: int) -> Outcome:
    rng = random.Random(seed)
    sw = Switch()
    ports = [make_port(n, sw) for n in ("a", "b", "c")]
    macs = [A, B, C]
    # Everyone announces itself first, so later unicasts are switched, not flooded.
    for p, mac in zip(ports, macs, strict=True):
        p.chain([bytes(HDR) + eth(BCAST, mac, 0)])
        p.vqs[1].run()
    sent = 0
    for _round in range(4):
        for p, mac in zip(ports, macs, strict=True):
            for _ in range(rng.randrange(20, 60)):
                sent += 1
                kind = rng.random()
                dst = rng.choice([*macs, BCAST, bytes.fromhex("525400999999")])
                frame = eth(dst, mac, sent, rng.choice([60, 64, 200, 1514]))
                if kind < 0.05:
                    p.chain([bytes(HDR) + frame[:10]])                       # runt
                elif kind < 0.08:
                    p.chain([bytes(HDR) + frame, bytes(MAX_TX_PACKET)])     # oversize
                elif kind < 0.2:
                    p.chain([bytes(HDR), frame[:5], frame[5:]])  # header apart, MAC split
                else:
                    p.chain([bytes(HDR) + frame])
            p.vqs[1].run()
    return ([p.got for p in ports], [p.used() for p in ports],
            [p.dev.stats.as_dict() for p in ports], sw.flooded, [p.broken for p in ports])


@pytest.mark.parametrize("seed", [1, 2])
def test_switch_forwards_the_same_with_and_without_batching(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    batched = run_switch(seed)
    monkeypatch.setattr(net_device, "TX_BATCH_MIN", 1 << 30)
    per_frame = run_switch(seed)
    assert batched == per_frame
    got, used, stats, flooded, broken = batched
    assert all(not b for b in broken)
    assert sum(len(g) for g in got) > 100 and flooded > 0
    assert all(s["drops"] for s in stats)  # runts and oversize frames were counted
    assert all(n == 0 for u in used for _h, n in u)  # transmit buffers come back with length 0


def test_a_writable_buffer_breaks_the_queue_after_the_frames_before_it(mode: str) -> None:
    sw = Switch()
    a, b = make_port("a", sw), make_port("b", sw)
    for i in range(40):
        if i == 25:
            a.chain([bytes(HDR) + eth(BCAST, A, i)], writable=64)
        else:
            a.chain([bytes(HDR) + eth(BCAST, A, i)])
    a.vqs[1].run()
    assert len(a.broken) == 1 and "device-writable" in a.broken[0]
    assert [int.from_bytes(f[14:18], "big") for f in b.got] == list(range(25))
    assert len(a.used()) == 25 and a.dev.stats.tx_buffers == 25


def test_a_full_port_leaves_the_rest_in_the_ring(mode: str) -> None:
    """Back-pressure (loopback with a full receive side): the frames a port refuses stay
    available, and are sent, in order, when it takes them again."""
    port = make_port("a", None)
    room = [10]
    taken: list[bytes] = []

    def uplink(frame: bytes) -> bool:
        if room[0] == 0:
            return False
        room[0] -= 1
        taken.append(frame)
        return True

    port.dev.uplink = uplink
    for i in range(30):
        port.chain([bytes(HDR) + eth(B, A, i)])
    port.vqs[1].run()
    assert len(taken) == 10 and len(port.used()) == 10
    assert port.vqs[1].ring.available() == 20
    room[0] = 100
    port.vqs[1].run()
    assert [int.from_bytes(f[14:18], "big") for f in taken] == list(range(30))
    assert port.dev.stats.tx_frames == 30 and not port.broken


def run_loopback(sizes: list[int], rx_bufs: list[int], mergeable: bool) -> tuple[object, ...]:
    """Frames of ``sizes`` sent in one burst on a loopback port with receive buffers of
    ``rx_bufs`` bytes posted; returns everything the driver can see."""
    port = make_port("lo", None, loopback=True)
    if not mergeable:
        port.dev.set_features(bit(F_VERSION_1))  # header 12 bytes, one buffer per frame
    rx = port.t.driver(RX_QUEUE)
    bufs: list[tuple[int, int]] = []
    for n in rx_bufs:
        gpa = port.alloc.alloc(n, 16)
        port.mem.translate(gpa, n)[:] = b"\xee" * n  # what the device must not touch stays
        rx.add([], [(gpa, n)], token=len(bufs))
        bufs.append((gpa, n))
    for i, size in enumerate(sizes):
        port.chain([bytes(HDR) + eth(B, A, i, size)])
    port.vqs[1].run()
    used = rx.get_bufs()
    memory = [bytes(port.mem.translate(g, n)) for g, n in bufs]
    return (used, memory, port.used(), port.vqs[1].ring.available(),
            port.dev.stats.as_dict(), port.broken)


@pytest.mark.parametrize(("sizes", "rx_bufs", "mergeable"), [
    ([64] * 40, [2048] * 64, True),                    # equal small frames: the scatter
    ([1514] * 20, [2048] * 24, True),                  # ... and equal full-size ones
    ([60, 64, 1514, 200] * 10, [2048] * 64, True),     # mixed sizes: a copy per frame
    ([64] * 60, [2048] * 25, True),                    # 25 buffers for 60 frames: back-pressure
    ([64, 300] * 20, [128] * 120, True),               # 300 B frames span 3 buffers (merged)
    ([64, 300] * 20, [128] * 120, False),              # ... or do not fit: dropped, counted
    ([64] * 30, [2048] * 10 + [8] + [2048] * 30, True),  # a buffer shorter than the header
])
def test_loopback_bursts_as_frame_by_frame(sizes: list[int], rx_bufs: list[int],
                                           mergeable: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    batched = run_loopback(sizes, rx_bufs, mergeable)
    monkeypatch.setattr(net_device, "TX_BATCH_MIN", 1 << 30)
    per_frame = run_loopback(sizes, rx_bufs, mergeable)
    assert batched == per_frame
    used, memory, tx_used, left, stats, broken = batched
    assert isinstance(used, list) and isinstance(memory, list) and isinstance(stats, dict)
    assert isinstance(tx_used, list) and used and stats["rx_frames"]
    # Frames that found no receive buffer wait in the transmit ring, not in a copy.
    assert isinstance(left, int) and len(tx_used) + left == len(sizes)
    assert not broken or "shorter than" in str(broken)
    # Frames came back in order, each after its header.
    first = memory[used[0][0]]
    assert first[HDR:HDR + 6] == B and first[HDR + 14:HDR + 18] == (0).to_bytes(4, "big")


@pytest.mark.parametrize("frames", [40, 8])  # a batched pass, and one frame by frame
def test_looped_frames_are_published_at_the_end_of_their_pass(frames: int) -> None:
    """Under an event loop (publishes deferred to it), the frames a transmit pass looped
    back are published before the transmit run returns, right after that pass's transmit
    entries: a forwarding driver sees its transmit room first, then the frames."""
    deferred: list[Callable[[], None]] = []  # an event loop that has not run yet
    port = make_port("lo", None, loopback=True, schedule=deferred.append)
    rx = port.t.driver(RX_QUEUE)
    for i in range(64):
        rx.add([], [(port.alloc.alloc(2048, 16), 2048)], token=i)
    rxq, txq = port.vqs
    seen: list[tuple[int, int]] = []
    publish = rxq.publish

    def spy() -> int:
        seen.append((txq.filled, txq.ring.buffers_pushed))  # transmit side at that moment
        return publish()

    rxq.publish = spy  # type: ignore[method-assign]
    for i in range(frames):
        port.chain([bytes(HDR) + eth(B, A, i)])
    txq.run()
    got = rx.get_bufs()
    assert len(got) == frames  # published by the pass itself, not by the deferred callback
    assert seen and seen[0] == (0, frames)  # the transmit entries were out already
    assert len(port.used()) == frames and not port.broken
    for callback in deferred:  # the loop runs later: nothing is published twice
        callback()
    assert not rx.get_bufs() and port.vqs[0].ring.buffers_pushed == frames
