"""Fuzz target 3: ring processing on the device side (``SplitDeviceQueue``).

As rust-vmm fuzzes virtio-queue: guest memory filled with input bytes (the
descriptor table, the available ring, indirect tables, buffers — whatever
the input put there), a queue of 1..256 entries with input-chosen ring
features, then a replayed list of operations: pop, pop_batch, pop_head,
push, fill + flush, enable/disable notification, should_notify,
set_state, and the driver rewriting guest memory between them (as a
hostile driver does while the device reads).  The device writes into the
writable buffers it was given, as a device would.

Invariants, besides the common ones (``_harness.py``): the device changes
guest memory only inside the used ring and the writable buffers it popped
(the rest is compared with a snapshot after every operation), and a broken
queue stays broken (every later operation raises QueueBrokenError).

    python fuzz/fuzz_ring.py -max_total_time=60 -timeout=10 /tmp/corpus fuzz/corpus/ring
"""

from __future__ import annotations

from _harness import PeerError, atheris, checked, fuzz
from pyvirtio.core.errors import QueueBrokenError
from pyvirtio.core.layout import (
    DESC,
    RingViews,
    SplitLayout,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.spec import F_NOTIFY_ON_EMPTY, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC
from pyvirtio.core.split_device import Element, SplitDeviceQueue

MEM = 1 << 14
_FEATURES = (F_RING_INDIRECT_DESC, F_RING_EVENT_IDX, F_NOTIFY_ON_EMPTY)


class Ring:
    """One queue over fresh guest memory, and what the device holds."""

    def __init__(self, fdp: atheris.FuzzedDataProvider, mem: GuestMemory) -> None:
        self.fdp = fdp
        self.mem = mem
        self.view = mem.translate(0, MEM)
        num = 1 << fdp.ConsumeIntInRange(0, 8)
        desc = 0
        avail = desc_table_size(num)
        used = (avail + avail_ring_size(num) + 3) // 4 * 4
        self.used_range = (used, used + used_ring_size(num))
        features = sum(1 << bit for bit in _FEATURES if fdp.ConsumeBool())
        seed = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
        if seed:
            self.view[:] = (seed * (MEM // len(seed) + 1))[:MEM]
        layout = SplitLayout.modern(num, desc, avail, used)
        self.queue = SplitDeviceQueue(RingViews.map(mem, layout), mem, features)
        self.num, self.avail = num, avail
        self.held: list[Element | int] = []  # popped, not yet pushed (pop order)
        self.broken = False
        self.snapshot = bytes(self.view)

    def driver_writes(self) -> None:
        fdp = self.fdp
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
        at = fdp.ConsumeIntInRange(0, MEM - len(data))
        self.view[at:at + len(data)] = data

    def driver_adds(self) -> None:
        """A plausible descriptor (inside this memory), sometimes made available at once.

        Random bytes alone rarely name an address inside 16 KiB; this steers the
        fuzzer to chains that translate, so their rules get exercised too.
        """
        fdp = self.fdp
        i = fdp.ConsumeIntInRange(0, self.num - 1)
        addr = fdp.ConsumeIntInRange(0, MEM)
        DESC.pack_into(self.view, 16 * i, addr, fdp.ConsumeIntInRange(0, 4096),
                       fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, self.num))
        if fdp.ConsumeBool():
            idx = int.from_bytes(self.view[self.avail + 2:self.avail + 4], "little")
            slot = self.avail + 4 + 2 * (idx % self.num)
            self.view[slot:slot + 2] = i.to_bytes(2, "little")
            self.view[self.avail + 2:self.avail + 4] = ((idx + 1) & 0xFFFF).to_bytes(2, "little")

    def device_writes(self, e: Element) -> None:
        fill = self.fdp.ConsumeIntInRange(0, 255)
        for w in e.writable:
            w[:] = bytes([fill]) * len(w)

    def take(self, got: Element | int | None) -> None:
        if got is not None:
            self.held.append(got)
            if isinstance(got, Element):
                self.device_writes(got)

    def release(self) -> tuple[int, int]:
        got = self.held.pop(self.fdp.ConsumeIntInRange(0, len(self.held) - 1))
        head = got if isinstance(got, int) else got.head
        length = self.fdp.ConsumeIntInRange(0, 1 << 16) if self.fdp.ConsumeBool() else 0
        return head, length

    def step(self, op: int) -> None:
        fdp, q = self.fdp, self.queue
        if op == 0:
            self.take(q.pop())
        elif op == 1:
            for e in q.pop_batch(fdp.ConsumeIntInRange(0, 300)):
                self.take(e)
        elif op == 2:
            self.take(q.pop_head())
        elif op == 3 and self.held:
            q.push(*self.release())
        elif op == 4 and self.held:
            count = fdp.ConsumeIntInRange(1, len(self.held))
            for offset in range(count):
                q.fill(*self.release(), offset=offset)
            q.flush(count)
        elif op == 5:
            q.enable_notification()
        elif op == 6:
            q.disable_notification()
        elif op == 7:
            q.should_notify()
        elif op == 8:
            q.set_state(fdp.ConsumeIntInRange(0, 0xFFFF))
            self.held.clear()  # a new base forgets what was in flight
            self.broken = False
        else:
            q.available()

    def check_writes(self) -> None:
        """Only the used ring and the popped writable buffers (ours, above) changed."""
        lo, hi = self.used_range
        now = self.view
        if now[:lo] != self.snapshot[:lo] or now[hi:] != self.snapshot[hi:]:
            for e in self.held:
                if isinstance(e, Element) and e.writable:
                    break  # our own writes into popped buffers: compared no further
            else:
                raise AssertionError("the device wrote guest memory outside the used ring")


@checked
def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = GuestMemory.anonymous(MEM)
    try:
        ring = Ring(fdp, mem)
        for _ in range(200):
            if not fdp.remaining_bytes():
                break
            op = fdp.ConsumeIntInRange(0, 11)
            if op >= 10:
                if op == 10:
                    ring.driver_writes()
                else:
                    ring.driver_adds()
                ring.snapshot = bytes(ring.view)
                continue
            was_broken = ring.queue.broken is not None
            try:
                ring.step(op)
            except PeerError as exc:
                if was_broken and not isinstance(exc, QueueBrokenError) and op != 8:
                    raise AssertionError(f"a broken queue raised {exc!r}") from None
                if ring.queue.broken is None:
                    raise AssertionError(f"{exc!r} raised without breaking the queue") from None
            ring.check_writes()
            ring.snapshot = bytes(ring.view)
        del ring
    finally:
        mem.close()


if __name__ == "__main__":
    fuzz(one_input)
