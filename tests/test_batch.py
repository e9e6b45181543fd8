"""The batched ring paths equal the scalar ones, byte for byte (VIRTIO 1.2 §2.7).

:mod:`pyvirtio.batch` promises that ``DriverBatch.add``/``get`` and
``DeviceBatch.pop``/``push`` leave the same ring bytes and the same queue
state, and return the same buffers, as the scalar calls they fuse (§2.7.5
descriptor chains, §2.7.5.3 indirect tables, §2.7.6 available ring, §2.7.8
used ring, §2.7.10 event indices), including:

* index wrap at 2**16 and ring-slot wrap inside one batch;
* both of its paths (Python loop and numpy), forced by the thresholds;
* hostile rings: a batch stops before the first bad entry, and the next call
  raises the very PeerError (same message, same state) the scalar call would.

Every comparison runs two identical pairs ("twins") side by side: one driven
by the scalar API, one by the batched API.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyvirtio.batch as sb
from conftest import EVENT_IDX, INDIRECT, RingPair, close_pair, make_pair
from pyvirtio.batch import DeviceBatch, DriverBatch
from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError, QueueFull
from pyvirtio.core.layout import RingViews, SplitLayout, vring_size
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.spec import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from pyvirtio.core.split_device import Element, SplitDeviceQueue
from pyvirtio.core.split_driver import SplitDriverQueue

PATHS = ["scalar", "numpy"]
HYP = settings(max_examples=150, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def forced(path: str) -> Iterator[None]:
    """Force one path of every batched operation by moving the thresholds."""
    names = ("POP_THRESHOLD", "PUSH_THRESHOLD", "ADD_THRESHOLD")
    saved = {n: getattr(sb, n) for n in names}
    for n in names:
        setattr(sb, n, 1 << 30 if path == "scalar" else 0)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(sb, n, v)


@contextlib.contextmanager
def twins(num: int, features: int = 0, start_idx: int = 0,
          per_head: int = 4) -> Iterator[tuple[RingPair, RingPair]]:
    a = make_pair(num, features, start_idx, per_head)
    b = make_pair(num, features, start_idx, per_head)
    try:
        yield a, b
    finally:
        close_pair(a)
        close_pair(b)


def mem_bytes(p: RingPair) -> bytes:
    return bytes(p.mem.regions[0].view)


def drv_state(q: SplitDriverQueue) -> dict[str, Any]:
    return {
        "avail_idx_shadow": q.avail_idx_shadow, "last_used_idx": q.last_used_idx,
        "num_added": q.num_added, "outstanding": q.outstanding, "free": list(q._free),
        "tokens": list(q._tokens), "broken": q.broken, "multi": q._multi,
        "chains": [q._chains[h] for h, t in enumerate(q._tokens) if t is not None],
    }


def dev_state(q: SplitDeviceQueue) -> dict[str, Any]:
    return {
        "last_avail_idx": q.last_avail_idx, "shadow_avail_idx": q.shadow_avail_idx,
        "used_idx": q.used_idx, "inuse": q.inuse, "broken": q.broken,
        "signalled_used": q.signalled_used, "signalled_valid": q.signalled_used_valid,
    }


def assert_same(a: RingPair, b: RingPair) -> None:
    assert mem_bytes(a) == mem_bytes(b)
    assert drv_state(a.driver) == drv_state(b.driver)
    assert dev_state(a.device) == dev_state(b.device)


def _addr(view: memoryview) -> int:
    return int(np.frombuffer(view, np.uint8).__array_interface__["data"][0])


def element_sig(p: RingPair, e: Element) -> tuple[Any, ...]:
    """An element as (head, [(guest offset, len, read-only)...] x2), memory-independent."""
    base = _addr(p.mem.regions[0].view)

    def sig(vs: list[memoryview]) -> list[tuple[int, int, bool]]:
        return [(_addr(v) - base, len(v), v.readonly) for v in vs]

    return e.head, sig(e.readable), sig(e.writable)


def chains_sigs(p: RingPair, ch: sb.Chains) -> list[tuple[Any, ...]]:
    # What the pop knew of the writable segments from the flags agrees with the mask.
    writable = ch.seg_writable.tolist()
    assert ch.any_writable() == any(writable) and ch.all_writable() == all(writable)
    return [element_sig(p, ch.element(i)) for i in range(len(ch))]


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except PeerError as exc:
        return type(exc).__name__, str(exc)


def fill_buffers(p: RingPair, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    addrs = np.array([[p.buf(64 + 8 * j) for j in range(k)] for _ in range(n)], np.uint64)
    lens = np.array([[64 + 8 * j for j in range(k)] for _ in range(n)], np.uint32)
    return addrs, lens


def scalar_add(p: RingPair, addrs: np.ndarray, lens: np.ndarray, n_out: int,
               tokens: list[int]) -> list[int]:
    heads = []
    for row_a, row_l, t in zip(addrs.tolist(), lens.tolist(), tokens, strict=True):
        segs = list(zip(row_a, row_l, strict=True))
        heads.append(p.driver.add(segs[:n_out], segs[n_out:], t))
    return heads


# ------------------------------------------------------------ round trips
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("features", [0, EVENT_IDX, INDIRECT | EVENT_IDX])
@pytest.mark.parametrize("k,n_out", [(1, 1), (1, 0), (3, 1), (4, 2)])
@pytest.mark.parametrize("start_idx", [0, 65530])
def test_cycle_equals_scalar(path: str, features: int, k: int, n_out: int,
                             start_idx: int) -> None:
    """add, pop, push, get in batches of several sizes == the scalar calls, with wraps."""
    num = 16
    with twins(num, features, start_idx) as (a, b), forced(path):
        db, vb = DriverBatch(a.driver), DeviceBatch(a.device)
        for rnd, n in enumerate([3, 1, num // k, 2, 5]):
            n = min(n, num // k if not features & INDIRECT or k == 1 else num)
            addrs, lens = fill_buffers(a, n, k)
            fill_buffers(b, n, k)
            tokens = list(range(100 * rnd, 100 * rnd + n))
            heads = db.add(addrs, lens, n_out, np.array(tokens))
            assert heads.tolist() == scalar_add(b, addrs, lens, n_out, tokens)
            assert a.driver.kick_prepare() == b.driver.kick_prepare()
            assert_same(a, b)
            ch = vb.pop(n + 3)
            scalar = [b.device.pop() for _ in range(n)]
            assert b.device.pop() is None
            assert chains_sigs(a, ch) == [element_sig(b, e) for e in scalar if e]
            assert_same(a, b)
            written = [7 * i for i in range(n)]
            vb.push(ch.heads, np.array(written))
            for e, w in zip(scalar, written, strict=True):
                assert e is not None
                b.device.push(e.head, w)
            assert a.device.should_notify() == b.device.should_notify()
            assert_same(a, b)
            got = DriverBatch(a.driver).get(n + 2)
            scalar_got = [b.driver.get_buf() for _ in range(n)]
            assert b.driver.get_buf() is None
            assert list(zip(got.tokens.tolist(), got.lengths.tolist(), strict=True)) == \
                scalar_got
            assert_same(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_full_ring_and_slot_wrap(path: str) -> None:
    """Whole-ring batches starting mid-ring, at 16-bit indices crossing 65535."""
    num = 8
    with twins(num, EVENT_IDX, start_idx=65533) as (a, b), forced(path):
        db, vb = DriverBatch(a.driver), DeviceBatch(a.device)
        for rnd in range(6):
            n = num if rnd % 2 else 5
            addrs, lens = fill_buffers(a, n, 1)
            fill_buffers(b, n, 1)
            db.add(addrs, lens, 0, np.arange(n) + rnd)
            scalar_add(b, addrs, lens, 0, list(range(rnd, rnd + n)))
            ch = vb.pop(num)
            es = [b.device.pop() for _ in range(n)]
            assert chains_sigs(a, ch) == [element_sig(b, e) for e in es if e]
            vb.push(ch.heads[::-1].copy(), np.full(n, 3))
            for e in reversed(es):
                assert e is not None
                b.device.push(e.head, 3)
            assert len(db.get(num)) == n
            while b.driver.get_buf() is not None:
                pass
            assert_same(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_fill_flush_semantics_of_push(path: str) -> None:
    """push(N) is fill x N + flush(N): a flush jumping over signalled_used re-arms (§2.7.10)."""
    with twins(8, EVENT_IDX) as (a, b), forced(path):
        for p in (a, b):
            addrs, lens = fill_buffers(p, 6, 1)
            scalar_add(p, addrs, lens, 1, list(range(6)))
        heads = DeviceBatch(a.device).pop(6).heads
        for _ in range(6):
            b.device.pop()
        # Both sides signalled at used_idx 0 ... then one batch of 6 jumps past 3.
        for p in (a, b):
            p.device.signalled_used, p.device.signalled_used_valid = 3, True
        DeviceBatch(a.device).push(heads, np.zeros(6, np.int64))
        for i, h in enumerate(heads.tolist()):
            b.device.fill(h, 0, i)
        b.device.flush(6)
        assert a.device.signalled_used_valid is False
        assert_same(a, b)


def test_push_more_than_in_use_is_caller_error() -> None:
    p = make_pair(8)
    try:
        with pytest.raises(CallerError):
            DeviceBatch(p.device).push(np.array([0, 1]), np.array([0, 0]))
        with pytest.raises(CallerError):
            DeviceBatch(p.device).push(np.array([-1]), np.array([0]))
    finally:
        close_pair(p)


def test_add_is_all_or_nothing() -> None:
    p = make_pair(8)
    try:
        db = DriverBatch(p.driver)
        addrs, lens = fill_buffers(p, 3, 3)
        with pytest.raises(QueueFull):
            db.add(addrs, lens, 1, np.arange(3))
        assert p.driver.num_free == 8 and p.avail_idx == 0
        with pytest.raises(CallerError):
            db.add(addrs, lens, 4, np.arange(3))
    finally:
        close_pair(p)


def test_indirect_add_over_slot_is_caller_error() -> None:
    p = make_pair(8, INDIRECT, indirect_per_head=2)
    try:
        addrs, lens = fill_buffers(p, 2, 3)
        with forced("numpy"), pytest.raises(CallerError):
            DriverBatch(p.driver).add(addrs, lens, 1, np.arange(2))
        assert p.driver.num_free == 8
    finally:
        close_pair(p)


def test_long_chain_takes_scalar_walk() -> None:
    """A chain longer than the vectorised hop count is walked by the scalar code."""
    k = sb.VECTOR_HOPS + 3
    with twins(16) as (a, b), forced("numpy"):
        for p in (a, b):
            addrs, lens = fill_buffers(p, 1, k)
            scalar_add(p, addrs, lens, 2, [1])
            addrs, lens = fill_buffers(p, 2, 1)
            scalar_add(p, addrs, lens, 1, [2, 3])
        ch = DeviceBatch(a.device).pop(8)
        assert chains_sigs(a, ch) == [element_sig(b, e) for e in
                                      (b.device.pop(), b.device.pop(), b.device.pop()) if e]
        assert_same(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_direct_chains_ending_in_indirect_tables(path: str) -> None:
    """§2.7.5.3.2: direct descriptors then one INDIRECT one, among plain chains."""
    num = 16
    with twins(num, INDIRECT) as (a, b), forced(path):
        for p in (a, b):
            data = p.buf(0x1000, bytes(range(256)) * 16)
            tables = p.buf(16 * 2 * num)
            rings = p.driver.rings
            for h in range(0, num, 2):
                # head h: a readable header, then the table (readable + writable);
                # head h + 1: one writable buffer.
                tbl = tables + 32 * h
                p.mem.write(tbl, np.array([(data + 64 * h, 8, VRING_DESC_F_NEXT, 1),
                                           (data + 64 * h + 16, 12, VRING_DESC_F_WRITE, 0)],
                                          sb.DESC_DTYPE).tobytes())
                rings.desc[16 * h:16 * h + 32] = np.array(
                    [(data + 64 * h + 32, 4, VRING_DESC_F_NEXT, h + 1),
                     (tbl, 32, VRING_DESC_F_INDIRECT, 0)], sb.DESC_DTYPE).tobytes()
            for i in range(num):
                rings.avail16[2 + i] = 2 * (i % (num // 2))
            rings.avail16[1] = num // 2
        ch = DeviceBatch(a.device).pop(num)
        es = [b.device.pop() for _ in range(num // 2)]
        assert b.device.pop() is None and not a.device.broken
        assert chains_sigs(a, ch) == [element_sig(b, e) for e in es if e]
        assert [len(ch.segments(i)) for i in range(len(ch))] == [3] * (num // 2)
        assert_same(a, b)


def test_chains_lengths() -> None:
    p = make_pair(16)
    try:
        addrs, lens = fill_buffers(p, 3, 3)
        scalar_add(p, addrs, lens, 1, [1, 2, 3])
        ch = DeviceBatch(p.device).pop(3)
        assert ch.lengths(writable=False).tolist() == [64] * 3
        assert ch.lengths(writable=True).tolist() == [72 + 80] * 3
        assert [len(s) for s in (ch.segments(i) for i in range(3))] == [3, 3, 3]
    finally:
        close_pair(p)


def test_two_regions_and_spanning_buffer() -> None:
    """The vectorised region lookup across two regions, and a buffer spanning both."""
    num = 16
    ring = vring_size(num, 4096)
    fds = []
    mems = []
    try:
        for _ in range(2):
            mem = GuestMemory()
            for gpa, size in ((0, 0x10000), (0x10000, 0x10000)):
                fd = os.memfd_create("t")
                fds.append(fd)
                os.ftruncate(fd, size)
                mem.map_fd(fd, size, gpa, 0, gpa)
            mems.append(mem)
        layout = SplitLayout.legacy(0, num)
        sides = []
        for mem in mems:
            drv = SplitDriverQueue(RingViews.map(mem, layout))
            dev = SplitDeviceQueue(RingViews.map(mem, layout), mem)
            sides.append((mem, drv, dev))
        segs = [(ring + 0x100, 64), (0x10000 + 0x200, 128), (0x12000, 16),
                (0x10000 - 8, 16), (0x30000, 8)]   # the last two are bad
        for _, drv, _ in sides:
            for i, s in enumerate(segs):
                drv.add([s], [], i + 1)
        _, _, dev_a = sides[0]
        _, _, dev_b = sides[1]
        with forced("numpy"):
            ch = DeviceBatch(dev_a).pop(16)
        assert len(ch) == 3
        assert ch.seg_region.tolist() == [0, 1, 1]
        assert ch.seg_offset.tolist() == [ring + 0x100, 0x200, 0x2000]
        for i in range(3):
            e = dev_b.pop()
            assert e is not None
            assert [bytes(v) for v in ch.element(i).readable] == [bytes(v) for v in e.readable]
        for dev in (dev_a, dev_b):
            with pytest.raises(PeerError) as exc:
                DeviceBatch(dev).pop(16) if dev is dev_a else dev.pop()
            assert "runs past the end" in str(exc.value)
        assert dev_a.broken == dev_b.broken
        assert dev_state(dev_a) == dev_state(dev_b)
    finally:
        for mem in mems:
            mem.close()
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------- hostile rings
def _desc_strategy(num: int, data: int, ind: int) -> st.SearchStrategy[tuple[int, ...]]:
    """Mostly well-formed descriptors (so chains get long), some hostile ones."""
    good = st.tuples(st.sampled_from([data, data + 64, data + 0x200]), st.sampled_from([16, 64]),
                     st.sampled_from([0, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT,
                                      VRING_DESC_F_NEXT | VRING_DESC_F_WRITE]),
                     st.integers(0, num - 1))
    addr = st.sampled_from([data, data + 0x3000, ind, ind + 16, 0xFFF8, 0x10000,
                            1 << 63, (1 << 64) - 8])
    length = st.sampled_from([0, 1, 16, 32, 64, 0x100, 0xFFFFFFFF])
    bad = st.tuples(addr, length, st.integers(0, 7), st.integers(0, num + 1))
    return st.one_of(good, good, good, good, bad)


@settings(HYP)
@given(data=st.data(), num=st.sampled_from([2, 4, 8, 16]), indirect=st.booleans(),
       event_idx=st.booleans(), start=st.sampled_from([0, 65534]),
       path=st.sampled_from(PATHS))
def test_hostile_pop_equals_scalar(data: st.DataObject, num: int, indirect: bool,
                                   event_idx: bool, start: int, path: str) -> None:
    """Random descriptors/avail entries: batch = scalar prefix, then the same error."""
    feats = (INDIRECT if indirect else 0) | (EVENT_IDX if event_idx else 0)
    with twins(num, feats, start) as (a, b), forced(path):
        data_gpa = a.buf(0x4000)
        b.buf(0x4000)
        ind = data_gpa + 0x3F00
        descs = data.draw(st.lists(_desc_strategy(num, data_gpa, ind), min_size=num,
                                   max_size=num))
        table = data.draw(st.lists(_desc_strategy(4, data_gpa, ind), min_size=4, max_size=4))
        heads = data.draw(st.lists(st.one_of(st.integers(0, num - 1), st.integers(0, num - 1),
                                             st.integers(0, num + 2)),
                                   min_size=num, max_size=num))
        ahead = data.draw(st.one_of(st.integers(0, num), st.integers(0, num + 2)))
        want = data.draw(st.integers(1, num + 2))
        for p in (a, b):
            rings = p.driver.rings
            for i, (ad, ln, fl, nx) in enumerate(descs):
                rings.desc[16 * i:16 * i + 16] = np.array(
                    [(ad, ln, fl, nx)], sb.DESC_DTYPE).tobytes()
            p.mem.write(ind, np.array(table, sb.DESC_DTYPE).tobytes())
            for i, h in enumerate(heads):
                rings.avail16[2 + i] = h
            rings.avail16[1] = (start + ahead) & 0xFFFF
        _pop_both(a, b, want)


def _pop_both(a: RingPair, b: RingPair, want: int) -> None:
    """Scalar pops on b and batched pops on a agree: same chains, then the same error."""
    vb = DeviceBatch(a.device)
    scalar: list[Any] = []
    err_b: tuple[str, Any] | None = None
    for _ in range(want):
        r = outcome(b.device.pop)
        if r[0] != "ok":
            err_b = r
            break
        if r[1] is None:
            break
        scalar.append(element_sig(b, r[1]))
    got: list[Any] = []
    err_a: tuple[str, Any] | None = None
    while len(got) < len(scalar) or (err_b is not None and err_a is None):
        r = outcome(lambda: vb.pop(want - len(got)))
        if r[0] != "ok":
            err_a = r
            break
        assert len(r[1]) > 0
        got.extend(chains_sigs(a, r[1]))
    assert got == scalar
    assert err_a == err_b
    assert_same(a, b)


@settings(HYP)
@given(data=st.data(), num=st.sampled_from([8, 32]), indirect=st.booleans(),
       start=st.sampled_from([0, 65530]), path=st.sampled_from(PATHS))
def test_corrupted_ring_pop_equals_scalar(data: st.DataObject, num: int, indirect: bool,
                                          start: int, path: str) -> None:
    """A driver-built ring with a few hostile edits: long good prefixes, then an error."""
    feats = (INDIRECT if indirect else 0) | EVENT_IDX
    with twins(num, feats, start) as (a, b), forced(path):
        lens = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=num // 4))
        n_outs = [data.draw(st.integers(0, k)) for k in lens]
        for p in (a, b):
            for i, (k, n_out) in enumerate(zip(lens, n_outs, strict=True)):
                segs = [(p.buf(32 + j), 32 + j) for j in range(k)]
                p.driver.add(segs[:n_out], segs[n_out:], i + 1)
        used_descs = len(lens) if indirect else sum(lens)
        # A few edits where the chains are: descriptors in use, heads made available.
        edits = data.draw(st.lists(st.tuples(
            st.sampled_from(["addr", "len", "flags", "next", "head"]),
            st.integers(0, used_descs - 1),
            st.sampled_from([0, 1, 2, 3, 4, 5, 7, num - 1, num, 0x10000, 0xFFFF,
                             0xFFFFFFFF, 1 << 63])), max_size=3))
        for p in (a, b):
            rings = p.driver.rings
            table = np.frombuffer(rings.desc, sb.DESC_DTYPE)
            for field, i, v in edits:
                if field == "head":
                    rings.avail16[2 + ((start + i % len(lens)) & (num - 1))] = v & 0xFFFF
                else:
                    width = {"addr": 64, "len": 32, "flags": 16, "next": 16}[field]
                    table[field][i] = v & ((1 << width) - 1)
        _pop_both(a, b, data.draw(st.integers(1, len(lens) + 1)))


@settings(HYP)
@given(data=st.data(), num=st.sampled_from([2, 8, 64]), path=st.sampled_from(PATHS),
       start=st.sampled_from([0, 65533]))
def test_hostile_get_equals_scalar(data: st.DataObject, num: int, path: str,
                                   start: int) -> None:
    """Random used ids/lengths/index from a hostile device: batch = scalar, then same error."""
    with twins(num, EVENT_IDX, start) as (a, b), forced(path):
        n_out = data.draw(st.integers(0, num))
        for p in (a, b):
            addrs, lens = fill_buffers(p, n_out, 1)
            scalar_add(p, addrs, lens, 1, list(range(1, n_out + 1)))
        used = data.draw(st.lists(st.tuples(st.integers(0, num + 1), st.integers(0, 99)),
                                  min_size=num, max_size=num))
        idx = (start + data.draw(st.integers(0, num + 1))) & 0xFFFF
        for p in (a, b):
            for i, (h, ln) in enumerate(used):
                p.driver.rings.used32[1 + 2 * i] = h
                p.driver.rings.used32[2 + 2 * i] = ln
            p.driver.rings.used16[1] = idx
        want = data.draw(st.integers(1, num + 1))
        scalar: list[Any] = []
        err_b: tuple[str, Any] | None = None
        for _ in range(want):
            r = outcome(b.driver.get_buf)
            if r[0] != "ok":
                err_b = r
                break
            if r[1] is None:
                break
            scalar.append(r[1])
        db = DriverBatch(a.driver)
        got: list[Any] = []
        err_a: tuple[str, Any] | None = None
        while len(got) < len(scalar) or (err_b is not None and err_a is None):
            r = outcome(lambda: db.get(want - len(got)))
            if r[0] != "ok":
                err_a = r
                break
            assert len(r[1]) > 0
            got.extend(zip(r[1].tokens.tolist(), r[1].lengths.tolist(), strict=True))
        assert got == scalar
        assert err_a == err_b
        assert_same(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_more_heads_in_flight_than_the_queue_size(path: str) -> None:
    """QEMU "Virtqueue size exceeded": the batch stops there, the next pop breaks the queue."""
    num = 32
    with twins(num) as (a, b), forced(path):
        for p in (a, b):
            data = p.buf(16 * num)
            rings = p.driver.rings
            for i in range(num):
                rings.desc[16 * i:16 * i + 16] = np.array(
                    [(data + 16 * i, 16, VRING_DESC_F_WRITE, 0)], sb.DESC_DTYPE).tobytes()
            # Every head once, then heads 0.. again while the device holds them.
            for i in range(num):
                rings.avail16[2 + i] = i
            rings.avail16[1] = num - 4
        for p in (a, b):
            assert len(DeviceBatch(p.device).pop(num) if p is a else
                       [p.device.pop() for _ in range(num - 4)]) == num - 4
            rings = p.driver.rings
            for i in range(num - 4):
                rings.avail16[2 + i] = i
            rings.avail16[1] = 2 * num - 8
        _pop_both(a, b, num)
        assert a.device.broken and "size exceeded" in a.device.broken
        assert a.device.inuse == num


def test_broken_queue_refuses_batches() -> None:
    p = make_pair(4)
    try:
        p.driver.rings.avail16[1] = 9      # more than the queue size ahead
        with pytest.raises(PeerError):
            DeviceBatch(p.device).pop(4)
        with pytest.raises(QueueBrokenError):
            DeviceBatch(p.device).pop(4)
        p.driver.rings.used16[1] = 9
        with pytest.raises(PeerError):
            DriverBatch(p.driver).get(4)
        with pytest.raises(QueueBrokenError):
            DriverBatch(p.driver).add(np.array([0x8000]), np.array([4]), 1, np.array([1]))
    finally:
        close_pair(p)


def test_object_tokens_come_back_as_objects() -> None:
    p = make_pair(8)
    try:
        tok = ("a", 1)
        p.driver.add([(p.buf(16), 16)], [], tok)
        e = p.device.pop()
        assert e is not None
        p.device.push(e.head, 5)
        got = DriverBatch(p.driver).get(8)
        assert got.tokens.dtype == object and got.tokens[0] == tok
        assert got.lengths.tolist() == [5]
    finally:
        close_pair(p)
