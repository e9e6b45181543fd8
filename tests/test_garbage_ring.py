"""Hostile rings: random bytes where the driver's ring and tables should be.

docs/architecture.md "Guest input is hostile", VIRTIO 1.2 §2.7.5 (descriptors), §2.7.5.3
(indirect tables), §2.7.6 (available ring), §2.7.8 (used ring).  Whatever the
descriptor table, the available ring and the indirect tables hold:

* the device's pop raises nothing but :class:`PeerError` (including
  :class:`QueueBrokenError`), and always returns;
* the device, writing every writable view it is handed, changes no guest byte
  outside the ranges some descriptor marked writable (and the used ring,
  which is the device's to write);
* likewise the driver's get_buf over a random used ring raises only
  PeerError and hands back only tokens it had outstanding.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import INDIRECT, close_pair, make_pair
from pyvirtio.core.errors import PeerError
from pyvirtio.core.layout import DESC, DESC_SIZE, used_ring_size
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.spec import (
    F_RING_EVENT_IDX,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    bit,
)

MEM_SIZE = 0x10000
DATA = 0x4000  # data buffers live in [DATA, IND)
IND = 0x8000  # indirect tables live in [IND, IND + IND_SIZE)
IND_SIZE = 0x100

GARBAGE = settings(max_examples=400, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.large_base_example])

addrs = st.one_of(
    st.integers(DATA, IND - 1),
    st.integers(IND, IND + IND_SIZE - 1).map(lambda a: a & ~15),
    st.integers(0, MEM_SIZE + 64),
    st.integers(0, (1 << 64) - 1),
)
lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 64, 128, 1024]),
                    st.integers(0, (1 << 32) - 1))
flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
descs = st.tuples(addrs, lengths, flags, st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF)))


@st.composite
def plausible_desc(draw: st.DrawFn, entries: int) -> tuple[int, int, int, int]:
    """A descriptor a driver could have written, so pops get past the first checks."""
    fl = draw(st.sampled_from([0, 0, 2, 2, 1, 3, 4]))
    if fl == VRING_DESC_F_INDIRECT:
        return (IND + 16 * draw(st.integers(0, 15)), 16 * draw(st.integers(1, 5)), fl, 0)
    addr = draw(st.integers(DATA, IND - 64))
    nxt = draw(st.one_of(st.integers(0, entries - 1), st.integers(0, entries + 1)))
    return (addr, draw(st.integers(1, 64)), fl, nxt)


def _mostly(usual: st.SearchStrategy[int], rare: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """``usual`` about 7 times in 8, so deep paths are reached as often as the shallow checks."""
    return st.integers(0, 7).flatmap(lambda k: rare if k == 0 else usual)


def _desc_bytes(items: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(DESC.pack(*d) for d in items)


@st.composite
def table_bytes(draw: st.DrawFn, entries: int) -> bytes:
    """A descriptor table: structured entries (to reach deep checks) or raw random bytes."""
    kind = draw(st.sampled_from(["plausible", "plausible", "mixed", "raw"]))
    if kind == "raw":
        return draw(st.binary(min_size=16 * entries, max_size=16 * entries))
    plausible = plausible_desc(min(entries, 16))
    one = plausible if kind == "plausible" else st.one_of(plausible, descs)
    return _desc_bytes(draw(st.lists(one, min_size=entries, max_size=entries)))


def _reference_chain(mem: GuestMemory, desc: int, head: int,
                     hop_bound: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Walk an accepted chain independently: readable lengths and writable (start, end)."""
    table, i = desc, head
    readable: list[int] = []
    writable: list[tuple[int, int]] = []
    for _ in range(hop_bound):
        addr, length, fl, nxt = DESC.unpack(mem.read(table + DESC_SIZE * i, DESC_SIZE))
        if fl & VRING_DESC_F_INDIRECT:
            table, i = addr, 0
            continue
        if fl & VRING_DESC_F_WRITE:
            writable.append((addr, addr + length))
        else:
            readable.append(length)
        if not fl & VRING_DESC_F_NEXT:
            return readable, writable
        i = nxt
    raise AssertionError("the device accepted a chain the reference walk cannot finish")


@settings(GARBAGE)
@given(data=st.data(), num=st.sampled_from([1, 2, 8, 16]), indirect=st.booleans(),
       event_idx=st.booleans(), start=st.integers(0, 0xFFFF))
def test_garbage_ring_raises_only_peer_errors(data: st.DataObject, num: int, indirect: bool,
                                              event_idx: bool, start: int) -> None:
    features = (INDIRECT if indirect else 0) | (bit(F_RING_EVENT_IDX) if event_idx else 0)
    pair = make_pair(num=num, features=features, mem_size=MEM_SIZE)
    try:
        dev, mem, lay = pair.device, pair.mem, pair.layout
        dev.set_state(start)
        table = data.draw(table_bytes(num), label="descriptor table")
        mem.write(lay.desc, table)
        ind = data.draw(table_bytes(IND_SIZE // 16), label="indirect tables")
        mem.write(IND, ind)
        mem.write(DATA, bytes(range(256)) * ((IND - DATA) // 256))
        ahead = data.draw(_mostly(st.integers(1, num), st.integers(0, 0xFFFF)), label="ahead")
        heads = data.draw(st.lists(_mostly(st.integers(0, num - 1), st.integers(0, 0xFFFF)),
                                   min_size=num, max_size=num), label="avail ring")
        avail = pair.driver.rings.avail16
        avail[0] = data.draw(st.integers(0, 0xFFFF), label="avail flags")
        for i, h in enumerate(heads):
            avail[2 + i] = h
        avail[2 + num] = data.draw(st.integers(0, 0xFFFF), label="used_event")
        avail[1] = (start + ahead) & 0xFFFF

        before = np.frombuffer(mem.read(0, MEM_SIZE), dtype=np.uint8)
        # Bytes the device may change: the used ring, and every buffer of an
        # accepted chain that its descriptor marked writable.
        allowed = np.zeros(MEM_SIZE, dtype=bool)
        allowed[lay.used:lay.used + used_ring_size(num)] = True

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
            assert pops <= num, "popped more heads than the queue holds"
            ref_r, ref_w = _reference_chain(mem, lay.desc, elem.head, 2 * num + IND_SIZE)
            assert [len(v) for v in elem.readable] == ref_r
            assert [len(v) for v in elem.writable] == [hi - lo for lo, hi in ref_w]
            for lo, hi in ref_w:
                assert 0 <= lo < hi <= MEM_SIZE
                allowed[lo:hi] = True
            for v in elem.readable:
                assert v.readonly
                bytes(v)  # readable views are really readable
            written = 0
            for v in elem.writable:
                v[:] = b"\xfe" * len(v)
                written += len(v)
            dev.push(elem.head, written)
            dev.should_notify()
        event(f"popped {min(pops, 3)}{'+' if pops > 3 else ''}, "
              f"{'broken' if dev.broken else 'clean'}")
        if dev.broken is None:
            assert dev.enable_notification() is False

        after = np.frombuffer(mem.read(0, MEM_SIZE), dtype=np.uint8)
        outside = np.flatnonzero((after != before) & ~allowed)
        assert outside.size == 0, (
            f"device changed guest bytes outside every writable buffer, first at "
            f"{int(outside[0]):#x}")
    finally:
        close_pair(pair)


@settings(GARBAGE)
@given(data=st.data(), num=st.sampled_from([2, 8]), outstanding=st.integers(0, 8),
       start=st.integers(0, 0xFFFF))
def test_garbage_used_ring_raises_only_peer_errors(data: st.DataObject, num: int,
                                                   outstanding: int, start: int) -> None:
    pair = make_pair(num=num, features=bit(F_RING_EVENT_IDX), start_idx=start, mem_size=MEM_SIZE)
    try:
        drv = pair.driver
        tokens = set()
        for t in range(min(outstanding, num)):
            drv.add([(pair.buf(4), 4)], [], token=t)
            tokens.add(t)
        used = pair.device.rings.used16
        raw = data.draw(st.binary(min_size=used_ring_size(num), max_size=used_ring_size(num)))
        pair.mem.write(pair.layout.used, raw)
        if data.draw(st.booleans()):
            used[1] = (start + data.draw(st.integers(0, num))) & 0xFFFF
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
    finally:
        close_pair(pair)
