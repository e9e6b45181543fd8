"""Hostile packed rings: random bytes where the driver's descriptors and tables should be.

docs/architecture.md "Guest input is hostile", VIRTIO 1.2 §2.8.6 (chains),
§2.8.7 (indirect tables), §2.8.13 (descriptors), §2.8.14 (event
suppression).  Whatever the ring, the indirect tables and the driver's event
suppression structure hold, at any starting position and wrap counter:

* the device's pop raises nothing but :class:`PeerError` (including
  :class:`QueueBrokenError`), always returns, and pops no more ring
  positions than the queue has;
* the device, writing every writable view it is handed, changes no guest byte
  outside the ranges some descriptor marked writable (and the descriptor
  ring and its own event structure, which are the device's to write);
* likewise the driver's get_buf over a random ring raises only PeerError and
  hands back only tokens it had outstanding, each once.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from packed_harness import EVENT_IDX, INDIRECT, close_packed_pair, make_packed_pair
from pyvirtio.core.errors import PeerError
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.packed_layout import PACKED_DESC, avail_flags

MEM_SIZE = 0x10000
DATA = 0x4000  # data buffers live in [DATA, IND)
IND = 0x8000  # indirect tables live in [IND, IND + IND_SIZE)
IND_SIZE = 0x100

GARBAGE = settings(max_examples=120, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.large_base_example])


@st.composite
def plausible(draw: st.DrawFn, num: int, wrap: int) -> tuple[int, int, int, int]:
    """A descriptor a driver could have written, so pops get past the first checks."""
    bits = draw(st.sampled_from([avail_flags(wrap)] * 4 + [avail_flags(wrap ^ 1), 0, 0x8080]))
    kind = draw(st.sampled_from([0, 0, 2, 2, 1, 3, 4]))  # NEXT / WRITE / INDIRECT
    if kind == 4:
        return (IND + 16 * draw(st.integers(0, 15)), 16 * draw(st.integers(0, 5)),
                draw(st.integers(0, num)), bits | kind)
    return (draw(st.integers(DATA, IND - 64)), draw(st.integers(0, 64)),
            draw(st.one_of(st.integers(0, num - 1), st.integers(0, 0xFFFF))), bits | kind)


anything = st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1),
                     st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))


@settings(GARBAGE)
@given(data=st.data(), num=st.sampled_from([1, 2, 3, 5, 8]), indirect=st.booleans(),
       event_idx=st.booleans(), wrap=st.integers(0, 1), pos=st.integers(0, 7))
def test_garbage_ring_raises_only_peer_errors(data: st.DataObject, num: int, indirect: bool,
                                              event_idx: bool, wrap: int, pos: int) -> None:
    features = (INDIRECT if indirect else 0) | (EVENT_IDX if event_idx else 0)
    pair = make_packed_pair(num=num, features=features, start=(pos % num, wrap),
                            mem_size=MEM_SIZE)
    try:
        dev, mem, lay = pair.device, pair.mem, pair.layout
        one = st.one_of(plausible(num, wrap), plausible(num, wrap), anything)
        ring = data.draw(st.lists(one, min_size=num, max_size=num), label="ring")
        mem.write(lay.desc, b"".join(PACKED_DESC.pack(*d) for d in ring))
        tables = data.draw(st.lists(st.one_of(plausible(num, wrap), anything),
                                    min_size=IND_SIZE // 16, max_size=IND_SIZE // 16))
        mem.write(IND, b"".join(PACKED_DESC.pack(*d) for d in tables))
        mem.write(lay.driver, data.draw(st.binary(min_size=4, max_size=4), label="driver"))
        mem.write(DATA, bytes(range(256)) * ((IND - DATA) // 256))

        before = np.frombuffer(mem.read(0, MEM_SIZE), dtype=np.uint8)
        allowed = np.zeros(MEM_SIZE, dtype=bool)
        allowed[lay.desc:lay.device + 4] = True  # the ring and the device's event area
        allowed[lay.driver:lay.driver + 4] = False
        pops = 0
        while True:
            try:
                elem = dev.pop()
            except PeerError:
                assert dev.broken is not None
                try:
                    dev.pop()
                except PeerError:
                    pass
                else:
                    raise AssertionError("a broken queue popped again") from None
                break
            if elem is None:
                break
            pops += 1
            assert dev.inuse <= num, "more ring positions in flight than the queue has"
            written = 0
            for v in elem.readable:
                assert v.readonly
                bytes(v)
            for v in elem.writable:
                lo = _gpa_of(mem, v)
                assert lo >= 0 and lo + len(v) <= MEM_SIZE
                allowed[lo:lo + len(v)] = True
                v[:] = b"\xfe" * len(v)
                written += len(v)
            dev.push(elem.head, written)
            dev.should_notify()
        assert pops <= num
        event(f"popped {min(pops, 3)}{'+' if pops > 3 else ''}, "
              f"{'broken' if dev.broken else 'clean'}")
        if dev.broken is None:
            dev.available()
            dev.enable_notification()
        after = np.frombuffer(mem.read(0, MEM_SIZE), dtype=np.uint8)
        outside = np.flatnonzero((after != before) & ~allowed)
        assert outside.size == 0, (
            f"device changed guest bytes outside every writable buffer, first at "
            f"{int(outside[0]):#x}")
    finally:
        close_packed_pair(pair)


def _gpa_of(mem: GuestMemory, view: memoryview) -> int:
    """The guest address of a view into the one region (which starts at guest address 0)."""
    region = mem.sole_region
    assert region is not None and region.gpa == 0
    base = np.frombuffer(region.view, dtype=np.uint8).ctypes.data
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) - int(base)


@settings(GARBAGE)
@given(data=st.data(), num=st.sampled_from([1, 3, 8]), outstanding=st.integers(0, 8),
       wrap=st.integers(0, 1), pos=st.integers(0, 7))
def test_garbage_used_descriptors_raise_only_peer_errors(data: st.DataObject, num: int,
                                                         outstanding: int, wrap: int,
                                                         pos: int) -> None:
    pair = make_packed_pair(num=num, features=EVENT_IDX, start=(pos % num, wrap),
                            mem_size=MEM_SIZE)
    try:
        drv = pair.driver
        tokens = set()
        for t in range(min(outstanding, num)):
            drv.add([(pair.buf(4), 4)], [], token=t)
            tokens.add(t)
        raw = data.draw(st.lists(st.one_of(anything, st.tuples(
            st.just(0), st.integers(0, 64), st.integers(0, num),
            st.sampled_from([0, 0x8080, 0x8082]))), min_size=num, max_size=num))
        pair.mem.write(pair.layout.desc, b"".join(PACKED_DESC.pack(*d) for d in raw))
        got = []
        for _ in range(num + 2):
            try:
                r = drv.get_buf()
            except PeerError:
                assert drv.broken is not None
                break
            if r is None:
                break
            got.append(r[0])
        else:
            raise AssertionError("get_buf kept returning buffers past the queue size")
        assert len(got) == len(set(got)) and set(got) <= tokens
        assert drv.num_free <= num
    finally:
        close_packed_pair(pair)
