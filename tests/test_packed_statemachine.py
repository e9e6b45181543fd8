"""Packed driver + device as a hypothesis state machine (VIRTIO 1.2 §2.8.10, §2.8.21, §2.8.22).

The packed counterpart of tests/test_ring_statemachine.py: random
interleavings of add (1–4 segments, with and without indirect tables) /
kick / pop / unpop / push / fill+flush (in or out of order) / get_buf /
enable / disable on both sides, on queue sizes that are mostly not powers of
two, starting at a random ring position and wrap counter (``set_state``), in
each suppression mode (none, flags, EVENT_IDX with ``off_wrap``).

Invariants checked on every step:

* the device pops buffers in the order the driver added them, with the
  driver's bytes; every buffer comes back from get_buf exactly once with its
  token, its written length and the device's bytes; used order = push order;
  buffer ids are reused in whatever order completions free them;
* no wake-up is lost.  A side *sleeps* after it re-enables notifications and
  finds nothing (``enable_notification()`` / ``enable_cb()`` /
  ``enable_cb_delayed()`` returned False) and wakes only on a notification
  (or spuriously).  A kick decision while the device sleeps with buffers
  pending must be True; an interrupt decision while the driver sleeps with
  more used ring positions pending than it asked to wait for must be True
  (packed event offsets count ring positions, a chain takes one per
  descriptor).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from packed_harness import INDIRECT, MODES, PackedPair, close_packed_pair, make_packed_pair
from pyvirtio.core.errors import QueueFull
from pyvirtio.core.split_device import Element


@dataclass
class Buf:
    """What the driver put in one buffer, to check both directions of data."""

    token: int
    readable: list[tuple[int, bytes]]  # (gpa, contents)
    writable: list[tuple[int, int]]  # (gpa, length)
    ndescs: int  # ring positions it takes

    def reply(self) -> list[bytes]:
        """The bytes the device writes into each writable segment."""
        return [bytes(((self.token * 7 + j * 13 + k) & 0xFF) for k in range(n))
                for j, (_, n) in enumerate(self.writable)]


class PackedMachine(RuleBasedStateMachine):
    mode = "none"

    def __init__(self) -> None:
        super().__init__()
        self.pair: PackedPair | None = None

    @initialize(
        num=st.sampled_from([1, 2, 3, 5, 6, 7, 8]),
        indirect=st.booleans(),
        pos=st.integers(0, 7),
        wrap=st.integers(0, 1),
    )
    def setup(self, num: int, indirect: bool, pos: int, wrap: int) -> None:
        features = MODES[self.mode] | (INDIRECT if indirect else 0)
        self.pair = make_packed_pair(num=num, features=features, start=(pos % num, wrap),
                                     indirect_per_head=4)
        self.next_token = 0
        self.bufs: dict[int, Buf] = {}
        self.to_pop: deque[int] = deque()  # added, not yet popped (avail order)
        self.held: list[tuple[Element, Buf]] = []  # popped, not yet pushed
        self.last_popped: int | None = None  # the most recent pop, while still held
        self.to_get: deque[int] = deque()  # pushed, not yet returned (push order)
        self.returned: set[int] = set()
        self.drv_pending_kick = False
        self.dev_pending_notify = False
        self.device_sleeping = False
        self.driver_sleeping = False
        self.driver_threshold = 0  # used ring positions the sleeping driver lets pile up

    @property
    def p(self) -> PackedPair:
        assert self.pair is not None
        return self.pair

    def teardown(self) -> None:
        if self.pair is None:
            return
        try:
            self._drain_and_check()
        finally:
            close_packed_pair(self.pair)
            self.pair = None

    def _drain_and_check(self) -> None:
        """Finish everything through the public API: every buffer back exactly once."""
        for held, buf in list(self.held):
            self._push_one(held, buf)
        self.held.clear()
        while (elem := self.p.device.pop()) is not None:
            self._push_one(elem, self._check_popped(elem))
        while self.to_get:
            self._get_one()
        assert self.p.driver.get_buf() is None
        assert self.returned == set(self.bufs)
        assert self.p.driver.outstanding == 0 and self.p.driver.num_free == self.p.num
        assert self.p.device.inuse == 0 and self.p.device.in_flight == 0

    # ------------------------------------------------------------------ driver
    @rule(nseg=st.integers(1, 4), nwrite=st.integers(0, 3),
          sizes=st.lists(st.integers(1, 24), min_size=4, max_size=4))
    def add(self, nseg: int, nwrite: int, sizes: list[int]) -> None:
        drv = self.p.driver
        nwrite = min(nwrite, nseg - 1)  # the first segment carries the token
        token = self.next_token
        readable = [(self.p.buf(8), token.to_bytes(8, "little"))]
        for j in range(1, nseg - nwrite):
            pattern = bytes([token & 0xFF, j]) * sizes[j]
            readable.append((self.p.buf(sizes[j]), pattern[:sizes[j]]))
        writable = [(self.p.buf(sizes[j]), sizes[j]) for j in range(nseg - nwrite, nseg)]
        needed = 1 if drv.use_indirect and nseg > 1 else nseg
        if drv.num_free < needed:
            try:
                drv.add([(a, len(b)) for a, b in readable], writable, token)
            except QueueFull:
                return
            raise AssertionError("add succeeded without enough free ring positions")
        for addr, data in readable:
            self.p.mem.write(addr, data)
        for addr, n in writable:
            self.p.mem.write(addr, b"\xaa" * n)
        drv.add([(a, len(b)) for a, b in readable], writable, token)
        self.bufs[token] = Buf(token, readable, writable, needed)
        self.to_pop.append(token)
        self.next_token += 1
        self.drv_pending_kick = True

    @rule()
    def kick(self) -> None:
        decided = self.p.driver.kick_prepare()
        self.drv_pending_kick = False
        if decided:
            self.device_sleeping = False
        elif self.device_sleeping:
            assert not self.to_pop, (
                f"lost kick: device sleeps with {len(self.to_pop)} buffers pending "
                f"and kick_prepare said no ({self.mode})")

    @precondition(lambda self: not self.driver_sleeping)
    @rule()
    def get_buf(self) -> None:
        if self.to_get:
            self._get_one()
        else:
            assert self.p.driver.get_buf() is None

    @precondition(lambda self: not self.driver_sleeping)
    @rule(max_n=st.integers(1, 8))
    def get_bufs(self, max_n: int) -> None:
        want = list(self.to_get)[:max_n]
        got = self.p.driver.get_bufs(max_n)
        assert [t for t, _ in got] == want
        for token, length in got:
            self._check_returned(token, length)
            self.to_get.popleft()

    def _get_one(self) -> None:
        got = self.p.driver.get_buf()
        assert got is not None
        token, length = got
        assert isinstance(token, int)
        assert token == self.to_get.popleft(), "used order differs from push order"
        self._check_returned(token, length)

    def _check_returned(self, token: object, length: int) -> None:
        assert isinstance(token, int)
        assert token not in self.returned, "buffer returned twice"
        self.returned.add(token)
        buf = self.bufs[token]
        assert length == sum(n for _, n in buf.writable)
        for (addr, n), data in zip(buf.writable, buf.reply(), strict=True):
            assert self.p.mem.read(addr, n) == data

    @precondition(lambda self: self.mode != "none" and not self.driver_sleeping)
    @rule()
    def disable_cb(self) -> None:
        self.p.driver.disable_cb()

    @precondition(lambda self: not self.driver_sleeping and not self.drv_pending_kick)
    @rule()
    def driver_sleep(self) -> None:
        more = self.p.driver.enable_cb()
        assert more == bool(self.to_get)
        if not more:
            self.driver_sleeping = True
            self.driver_threshold = 0

    @precondition(lambda self: self.mode == "event-idx" and not self.driver_sleeping
                  and not self.drv_pending_kick)
    @rule()
    def driver_sleep_delayed(self) -> None:
        in_flight = sum(self.bufs[t].ndescs for t in self.to_pop) + sum(
            b.ndescs for _, b in self.held) + sum(self.bufs[t].ndescs for t in self.to_get)
        assert in_flight == self.p.num - self.p.driver.num_free
        more = self.p.driver.enable_cb_delayed()
        # Linux's packed rule: poll again when the next descriptor is used.
        assert more == bool(self.to_get)
        if not more:
            self.driver_sleeping = True
            self.driver_threshold = in_flight * 3 // 4

    @precondition(lambda self: self.driver_sleeping)
    @rule()
    def driver_spurious_wake(self) -> None:
        self.driver_sleeping = False

    # ------------------------------------------------------------------ device
    def _check_popped(self, elem: Element) -> Buf:
        assert self.to_pop, "device popped a buffer the driver never added"
        token = self.to_pop.popleft()
        buf = self.bufs[token]
        assert [bytes(v) for v in elem.readable] == [d for _, d in buf.readable]
        assert [len(v) for v in elem.writable] == [n for _, n in buf.writable]
        return buf

    def _push_one(self, elem: Element, buf: Buf, offset: int | None = None) -> None:
        for view, data in zip(elem.writable, buf.reply(), strict=True):
            view[:] = data
        length = sum(len(v) for v in elem.writable)
        if offset is None:
            self.p.device.push(elem.head, length)
        else:
            self.p.device.fill(elem.head, length, offset)
        if buf.token == self.last_popped:
            self.last_popped = None
        self.to_get.append(buf.token)

    @precondition(lambda self: not self.device_sleeping)
    @rule()
    def pop(self) -> None:
        elem = self.p.device.pop()
        if not self.to_pop:
            assert elem is None
            return
        assert elem is not None
        buf = self._check_popped(elem)
        self.held.append((elem, buf))
        self.last_popped = buf.token

    @precondition(lambda self: not self.device_sleeping)
    @rule(max_n=st.integers(1, 8))
    def pop_batch(self, max_n: int) -> None:
        elems = self.p.device.pop_batch(max_n)
        assert len(elems) == min(max_n, len(self.to_pop))
        for elem in elems:
            buf = self._check_popped(elem)
            self.held.append((elem, buf))
            self.last_popped = buf.token

    @precondition(lambda self: not self.device_sleeping and self.last_popped is not None)
    @rule()
    def unpop(self) -> None:
        _, buf = self.held.pop()
        assert buf.token == self.last_popped
        self.p.device.unpop(1)
        self.to_pop.appendleft(buf.token)
        self.last_popped = None

    @precondition(lambda self: not self.device_sleeping and self.held)
    @rule(pick=st.integers(0, 7))
    def push(self, pick: int) -> None:
        elem, buf = self.held.pop(pick % len(self.held))
        self._push_one(elem, buf)
        self.dev_pending_notify = True

    @precondition(lambda self: not self.device_sleeping and self.held)
    @rule(count=st.integers(1, 8), reverse=st.booleans())
    def fill_flush(self, count: int, reverse: bool) -> None:
        count = min(count, len(self.held))
        batch = self.held[:count]
        del self.held[:count]
        if reverse:
            batch.reverse()
        for off, (elem, buf) in enumerate(batch):
            self._push_one(elem, buf, offset=off)
        self.p.device.flush(count)
        self.dev_pending_notify = True

    @precondition(lambda self: not self.device_sleeping)
    @rule()
    def interrupt(self) -> None:
        decided = self.p.device.should_notify()
        self.dev_pending_notify = False
        if decided:
            self.driver_sleeping = False
        elif self.driver_sleeping:
            pending = sum(self.bufs[t].ndescs for t in self.to_get)
            assert pending <= self.driver_threshold, (
                f"lost interrupt: driver sleeps with {pending} used ring positions "
                f"(threshold {self.driver_threshold}) and should_notify said no ({self.mode})")

    @precondition(lambda self: self.mode != "none" and not self.device_sleeping)
    @rule()
    def disable_notification(self) -> None:
        self.p.device.disable_notification()

    @precondition(lambda self: not self.device_sleeping and not self.held
                  and not self.dev_pending_notify)
    @rule()
    def device_sleep(self) -> None:
        more = self.p.device.enable_notification()
        assert more == bool(self.to_pop)
        if not more:
            self.device_sleeping = True

    @precondition(lambda self: self.device_sleeping)
    @rule()
    def device_spurious_wake(self) -> None:
        self.device_sleeping = False

    # ------------------------------------------------ whole loops, as real code runs
    @rule(count=st.integers(1, 6), nseg=st.integers(1, 3))
    def driver_submit(self, count: int, nseg: int) -> None:
        """Add a burst of buffers, then decide about one kick (virtio-net xmit / refill)."""
        for _ in range(count):
            self.add(nseg, nseg - 1, [8, 4, 4, 4])
        self.kick()

    @precondition(lambda self: not self.driver_sleeping and not self.drv_pending_kick)
    @rule()
    def driver_loop(self) -> None:
        """Interrupt handler / NAPI poll: interrupts off, reap everything, re-arm, re-check."""
        while True:
            if self.mode != "none":
                self.disable_cb()
            while self.to_get:
                self._get_one()
            self.driver_sleep()
            if self.driver_sleeping:
                return

    @precondition(lambda self: not self.device_sleeping)
    @rule(batch=st.booleans())
    def device_loop(self, batch: bool) -> None:
        """QEMU-style handler: kicks off, serve everything, interrupt, re-enable, re-check."""
        while True:
            if self.mode != "none":
                self.disable_notification()
            while self.to_pop:
                self.pop()
            if self.held:
                if batch:
                    self.fill_flush(len(self.held), False)
                else:
                    while self.held:
                        self.push(0)
                self.interrupt()
            self.device_sleep()
            if self.device_sleeping:
                return

    # -------------------------------------------------------------- invariants
    @invariant()
    def ring_state_agrees_with_the_model(self) -> None:
        if self.pair is None:
            return
        drv, dev = self.p.driver, self.p.device
        assert not drv.broken and not dev.broken
        assert drv.outstanding == len(self.to_pop) + len(self.held) + len(self.to_get)
        assert dev.in_flight == len(self.held)
        assert dev.inuse == sum(b.ndescs for _, b in self.held)
        assert dev.available() == len(self.to_pop)
        if self.mode == "none":
            # Nothing is ever suppressed without suppression.
            assert self.p.driver_event == (0, 0) and self.p.device_event[1] == 0


SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class NoneMachine(PackedMachine):
    mode = "none"


class FlagsMachine(PackedMachine):
    mode = "flags"


class EventIdxMachine(PackedMachine):
    mode = "event-idx"


TestPackedNoSuppression = NoneMachine.TestCase
TestPackedNoSuppression.settings = SETTINGS
TestPackedFlags = FlagsMachine.TestCase
TestPackedFlags.settings = SETTINGS
TestPackedEventIdx = EventIdxMachine.TestCase
TestPackedEventIdx.settings = SETTINGS
