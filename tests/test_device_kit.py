"""The device kit (pyvirtio.transports.device): features, sync and deferred answers, breakage.

Driven in process over a ring pair — split (VIRTIO 1.2 §2.7, conftest's
:class:`RingPair`) or packed (§2.8, packed_harness's :class:`PackedPair`):
the kit's :class:`VirtQueue` wraps the device side, the test is the driver.
The tests that need no ring internals run on both kinds (``any_pair``): a
device cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import EVENT_IDX, RingPair
from packed_harness import close_packed_pair, make_packed_pair
from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.spec import (
    F_NOTIFY_ON_EMPTY,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    DeviceId,
)
from pyvirtio.transports.device import (
    DEFERRED,
    RING_FEATURES,
    Deferred,
    Device,
    DeviceProtocol,
    Request,
    VirtQueue,
    offered_features,
)


class Upper(Device):
    """Answers each request with its readable bytes upper-cased."""

    device_id = DeviceId.CONSOLE

    def handle(self, queue: VirtQueue, req: Request) -> int:
        return req.write(req.read().upper())


class Holder(Device):
    """Keeps every request (deferred) until the test completes it."""

    device_id = DeviceId.CONSOLE

    def __init__(self) -> None:
        self.held: list[Request] = []
        self.stopped: list[VirtQueue] = []

    def handle(self, queue: VirtQueue, req: Request) -> Deferred:
        self.held.append(req)
        return DEFERRED

    def queue_stopped(self, queue: VirtQueue) -> None:
        self.stopped.append(queue)


@pytest.fixture(params=["split", "packed"])
def any_pair(request: pytest.FixtureRequest,
             ring_pair: Callable[..., RingPair]) -> Iterator[Callable[..., Any]]:
    """``ring_pair`` for split rings, its packed counterpart for packed ones."""
    if request.param == "split":
        yield ring_pair
        return
    made: list[Any] = []

    def factory(num: int = 8, features: int = 0) -> Any:
        pair = make_packed_pair(num, features)
        made.append(pair)
        return pair

    yield factory
    for pair in made:
        close_packed_pair(pair)


class Kit:
    """A VirtQueue over a ring pair, recording interrupts, breaks and scheduled work."""

    def __init__(self, pair: Any, device: DeviceProtocol, schedule: bool = False) -> None:
        self.pair = pair
        self.irqs = 0
        self.broken: list[str] = []
        self.soon: list[object] = []
        self.vq = VirtQueue(0, pair.device, device, self._irq,
                            on_broken=lambda vq, why: self.broken.append(why),
                            schedule=self.soon.append if schedule else None)

    def _irq(self) -> None:
        self.irqs += 1

    def request(self, text: bytes, room: int = 64, token: object = None) -> int:
        out = self.pair.buf(len(text), text)
        inn: int = self.pair.buf(room)
        self.pair.driver.add([(out, len(text))], [(inn, room)],
                             token=text if token is None else token)
        return inn


def test_offered_features_add_the_ring_bits_and_mask_transport_bits() -> None:
    assert RING_FEATURES == (1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX
                             | 1 << F_RING_INDIRECT_DESC | 1 << F_NOTIFY_ON_EMPTY
                             | 1 << F_RING_PACKED)
    # Device bits (0..23, 50..63) pass; transport bits the core does not do
    # (ACCESS_PLATFORM 33, IN_ORDER 35) never get offered.
    dev_bits = 1 << 0 | 1 << 23 | 1 << 50 | 1 << 63
    assert offered_features(dev_bits | 1 << 33 | 1 << 35 | 1 << 30) == (
        dev_bits | RING_FEATURES)


def test_defaults_make_a_minimal_device() -> None:
    dev = Upper()
    assert isinstance(dev, DeviceProtocol)
    assert (dev.num_queues, dev.queue_size, dev.device_features) == (1, 1024, 0)
    assert dev.get_config(0, 4) == bytes(4)
    dev.set_config(0, b"xx")  # ignored
    dev.set_features(RING_FEATURES)
    assert dev.acked_features == RING_FEATURES
    dev.reset()
    assert dev.acked_features == 0


def test_a_device_without_a_handler_says_so() -> None:
    class Nothing(Device):
        device_id = 1

    with pytest.raises(NotImplementedError, match="handle"):
        Nothing().handle(None, None)  # type: ignore[arg-type]


def test_request_read_write_scatter(any_pair: Callable[..., Any]) -> None:
    pair: Any = any_pair(8)
    kit = Kit(pair, Upper())
    a, b = pair.buf(3), pair.buf(5)
    out = pair.buf(4, b"abcd")
    pair.driver.add([(out, 4)], [(a, 3), (b, 5)], token="t")
    req = kit.vq.pop()
    assert req is not None and req.read() == b"abcd"
    assert (req.readable_len, req.writable_len) == (4, 8)
    assert req.write(b"0123456789", offset=1) == 7  # cut at the end of the buffers
    assert pair.mem.read(a, 3) == b"\x0001" and pair.mem.read(b, 5) == b"23456"
    with pytest.raises(CallerError):
        req.write(b"x", offset=-1)


@pytest.mark.parametrize("features", [0, EVENT_IDX], ids=["flags", "event-idx"])
def test_sync_handler_publishes_a_batch_and_interrupts_once(any_pair: Callable[..., Any],
                                                            features: int) -> None:
    pair: Any = any_pair(16, features)
    kit = Kit(pair, Upper())
    bufs = [kit.request(f"req-{i}".encode()) for i in range(5)]
    assert kit.vq.run() == 5
    assert kit.irqs == 1
    for i, inn in enumerate(bufs):
        token, length = pair.driver.get_buf()
        assert (token, length) == (f"req-{i}".encode(), 5)
        assert pair.mem.read(inn, 5) == f"REQ-{i}".encode()
    # Kicks are wanted again after the pass (the re-check found nothing).
    pair.driver.kick_prepare()
    kit.request(b"next")
    assert pair.driver.kick_prepare()


def test_deferred_requests_complete_later_through_the_loop(any_pair: Callable[..., Any]) -> None:
    pair: Any = any_pair(8, EVENT_IDX)
    dev = Holder()
    kit = Kit(pair, dev, schedule=True)
    for i in range(3):
        kit.request(b"x", token=i)
    assert kit.vq.run() == 0 and len(dev.held) == 3 and kit.irqs == 0
    # Completed out of order, outside a kick: published by the scheduled callback.
    dev.held[2].complete(2)
    dev.held[0].complete(0)
    assert pair.driver.get_buf() is None and len(kit.soon) == 1
    kit.soon.pop()()  # type: ignore[operator]
    assert kit.irqs == 1
    assert [pair.driver.get_buf() for _ in range(2)] == [(2, 2), (0, 0)]
    # Without a loop the completion is published at once.
    kit2 = Kit(any_pair(8), Holder())
    kit2.request(b"y", token="y")
    kit2.vq.run()
    holder = kit2.vq.device
    assert isinstance(holder, Holder)
    holder.held[0].complete(1)
    assert kit2.pair.driver.get_buf() == ("y", 1)


def test_completions_of_a_stopped_queue_are_dropped(any_pair: Callable[..., Any]) -> None:
    pair: Any = any_pair(8)
    dev = Holder()
    kit = Kit(pair, dev)
    kit.request(b"x")
    kit.vq.run()
    kit.vq.close()
    dev.held[0].complete(1)
    assert pair.driver.get_buf() is None
    other = Kit(any_pair(8), Holder())
    with pytest.raises(CallerError, match="another queue"):
        other.vq.complete(dev.held[0], 1)


def test_a_device_that_waits_for_something_else_leaves_kicks_on(
        any_pair: Callable[..., Any]) -> None:
    """process() that takes nothing must not spin although buffers wait (net rx, input)."""

    class Idle(Device):
        device_id = DeviceId.INPUT
        calls = 0

        def process(self, queue: VirtQueue) -> None:
            self.calls += 1

    pair: Any = any_pair(8, EVENT_IDX)
    dev = Idle()
    kit = Kit(pair, dev)
    kit.request(b"x")
    # Offered twice: the re-check shows it a buffer its first pass had not looked at
    # (the kit cannot know it was not looking); then the kit stops instead of spinning.
    assert kit.vq.run() == 0 and dev.calls == 2
    assert kit.vq.available() == 1


def test_a_buffer_the_recheck_finds_is_processed_without_a_kick(
        any_pair: Callable[..., Any]) -> None:
    """The lost wake-up: the driver publishes a buffer after the device's last pop but
    before its re-check, and reads the avail_event the re-check wrote (so it does not
    kick).  The device must process that buffer in the same run."""

    class Racing(Device):
        device_id = DeviceId.CONSOLE

        def __init__(self, kit: Kit) -> None:
            self.kit = kit
            self.raced = False

        def process(self, queue: VirtQueue) -> None:
            while (req := queue.pop()) is not None:
                queue.complete(req, 0)
            if not self.raced:
                self.raced = True
                self.kit.request(b"late", token="late")  # after the pop found nothing

    pair: Any = any_pair(8, EVENT_IDX)
    kit = Kit(pair, Upper())
    dev = Racing(kit)
    kit.vq.device = dev
    kit.vq.run()  # a kick with nothing there yet: the first pass takes nothing
    assert pair.driver.get_buf() == ("late", 0)


def test_a_peer_error_breaks_only_this_queue_after_publishing_what_was_done(
        any_pair: Callable[..., Any]) -> None:
    class Picky(Device):
        device_id = DeviceId.CONSOLE

        def handle(self, queue: VirtQueue, req: Request) -> int:
            if req.read() == b"bad":
                raise PeerError("a request this device cannot take")
            return 0

    pair: Any = any_pair(8, EVENT_IDX)
    kit = Kit(pair, Picky())
    kit.request(b"ok1", token=1)
    kit.request(b"ok2", token=2)
    kit.request(b"bad", token=3)
    kit.vq.run()
    assert kit.broken == ["a request this device cannot take"] and not kit.vq.ready
    assert kit.irqs == 1  # the two completions were signalled
    assert [pair.driver.get_buf() for _ in range(2)] == [(1, 0), (2, 0)]
    assert kit.vq.run() == 0  # a broken queue is not run


def test_a_device_bug_breaks_the_queue_not_the_process(any_pair: Callable[..., Any]) -> None:
    class Buggy(Device):
        device_id = DeviceId.CONSOLE

        def handle(self, queue: VirtQueue, req: Request) -> int:
            raise ZeroDivisionError("bug")

    pair: Any = any_pair(8)
    kit = Kit(pair, Buggy())
    kit.request(b"x")
    kit.vq.run()
    assert len(kit.broken) == 1 and "ZeroDivisionError" in kit.broken[0]


def test_a_hostile_head_after_good_requests(ring_pair: type) -> None:
    pair: RingPair = ring_pair(8)
    kit = Kit(pair, Upper())
    kit.request(b"a", token="a")
    avail = pair.driver.rings.avail16
    avail[2 + 1] = 200  # a head beyond the ring
    avail[1] = 2
    kit.vq.run()
    assert kit.broken and "head 200" in kit.broken[0]
    assert pair.used_idx == 1 and kit.irqs == 1


def test_used_length_must_be_32_bit(any_pair: Callable[..., Any]) -> None:
    pair: Any = any_pair(8)
    dev = Holder()
    kit = Kit(pair, dev)
    kit.request(b"x")
    kit.vq.run()
    with pytest.raises(CallerError, match="32-bit"):
        dev.held[0].complete(1 << 32)


def test_kick_runs_the_queue_again(any_pair: Callable[..., Any]) -> None:
    pair: Any = any_pair(8)
    kit = Kit(pair, Upper(), schedule=True)
    kit.request(b"q")
    kit.vq.kick()
    kit.vq.kick()  # one run scheduled, not two
    assert len(kit.soon) == 1
    kit.soon.pop()()  # type: ignore[operator]
    assert pair.driver.get_buf() is not None


def test_the_counters_and_state_the_stats_read(any_pair: Callable[..., Any]) -> None:
    """Free-running counts on both rings (a packed ring's used_idx is a ring position)."""
    from pyvirtio.transports.stats import QueueStats

    pair = any_pair(16, EVENT_IDX)
    kit = Kit(pair, Upper())
    qs = QueueStats(0)
    qs.attach(kit.vq, tracing=True)
    for round_ in range(4):  # 12 two-descriptor buffers through a ring of 16: past a wrap
        for i in range(3):
            kit.request(f"r{round_}{i}".encode())
        pair.driver.enable_cb()  # interrupts armed at the next used buffer
        assert kit.vq.run() == 3
        assert len(pair.driver.get_bufs()) == 3
        pair.driver.disable_cb()  # and off while the driver polls (NAPI)
    kit.vq.kicked()
    doc = qs.document()
    total = doc["total"]
    assert isinstance(total, dict)
    assert (total["buffers_popped"], total["buffers_pushed"]) == (12, 12)
    assert (total["readable_bytes"], total["used_bytes"]) == (36, 36)
    assert total["batched_entries"] == 12 and total["batches"][1] == 4
    state = doc["state"]
    assert isinstance(state, dict) and state["in_flight"] == 0 and state["kicks_wanted"] == 1
    # Every gauge the Prometheus exporter reads is there on both rings.
    from pyvirtio.transports.metrics import GAUGES
    assert all(isinstance(state[key], int) for _name, key, _text in GAUGES)
    trace = kit.vq.ring.trace
    assert trace is not None and {r[1] for r in trace} >= {1, 3, 4, 5}  # irq, kick, on, off
    # pyvirtio trace's rule holds on both rings: with EVENT_IDX an interrupt is sent
    # exactly when 1 <= new - event <= new - old (16-bit), after the first decision.
    from pyvirtio.cli.trace import distance
    packed = "Packed" in type(pair).__name__
    decisions = [r for r in trace if r[1] in (1, 2) and r[2] >= 0 and r[4] >= 0
                 and (not packed or r[5] == 2)]  # packed: only DESC-armed decisions
    assert decisions
    for _t, kind, old, new, event, _flags in decisions:
        d = distance(new, event)
        assert d is not None and (kind == 1) == (1 <= d <= (new - old) & 0xFFFF)
