"""The virtio-blk device model driven by pyvirtio's driver over core rings (no sockets).

VIRTIO 1.2 §5.2: features, config space, every request type, read-only
mode, and hostile requests that must break only their queue.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blk_loop_harness import make_loop
from pyvirtio.core.errors import PeerError, QueueBrokenError
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.devices.blk.driver import BlkIOError, Slot
from pyvirtio.devices.blk.file_store import FileStore
from pyvirtio.devices.blk.spec import (
    REQ_HEADER,
    BlkConfig,
    BlkFeature,
    ReqType,
    Status,
)
from pyvirtio.transports.device import offered_features

SIZE = 4 << 20


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


def dev(img: Path, **kw: object) -> BlkDevice:
    ro = bool(kw.pop("read_only", False))
    return BlkDevice(FileStore(str(img), read_only=ro), **kw)  # type: ignore[arg-type]


def test_features_and_config(img: Path) -> None:
    d = dev(img)
    f = offered_features(d.device_features)
    for bit in (F_VERSION_1, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, BlkFeature.SEG_MAX,
                BlkFeature.BLK_SIZE, BlkFeature.FLUSH, BlkFeature.DISCARD,
                BlkFeature.WRITE_ZEROES):
        assert f >> bit & 1, bit
    assert not f >> BlkFeature.MQ & 1 and not f >> BlkFeature.RO & 1
    cfg = BlkConfig.unpack(d.get_config(0, 60))
    assert cfg.capacity == SIZE // 512 and cfg.num_queues == 1 and cfg.blk_size == 512
    assert cfg.seg_max > 0 and cfg.max_discard_seg > 0
    assert d.get_config(0, 8) == (SIZE // 512).to_bytes(8, "little")
    assert d.get_config(90, 20) == bytes(20)  # beyond the struct reads as zero
    ro = dev(img, read_only=True, num_queues=4)
    f = offered_features(ro.device_features)
    assert f >> BlkFeature.RO & 1 and f >> BlkFeature.MQ & 1
    assert not f >> BlkFeature.DISCARD & 1
    assert BlkConfig.unpack(ro.get_config(0, 60)).num_queues == 4


def test_read_write_flush_id(img: Path) -> None:
    drv, ports = make_loop(dev(img, serial="serial-123"))
    original = img.read_bytes()
    assert drv.read(0, 4096) == original[:4096]
    assert drv.read(100 * 512, 64 * 1024 + 512) == original[100 * 512:100 * 512 + 64 * 1024 + 512]
    pattern = bytes(range(256)) * 48  # 12 KiB
    drv.write(7 * 512, pattern)
    drv.flush()
    assert drv.read(7 * 512, len(pattern)) == pattern
    assert img.read_bytes()[7 * 512:7 * 512 + len(pattern)] == pattern
    assert drv.get_id() == "serial-123"
    assert ports[0].kick.count > 0


def test_used_lengths(img: Path) -> None:
    drv, _ = make_loop(dev(img))
    s = drv.submit(ReqType.IN, 0, 8192)
    drv.wait(s)
    assert (s.status, s.used_len) == (Status.OK, 8193)  # data + status byte
    drv.release(s)
    s = drv.submit(ReqType.OUT, 0, data=b"q" * 512)
    drv.wait(s)
    assert (s.status, s.used_len) == (Status.OK, 1)
    drv.release(s)
    s = drv.submit(ReqType.GET_ID)
    drv.wait(s)
    assert (s.status, s.used_len) == (Status.OK, 21)


def test_discard_and_write_zeroes(img: Path) -> None:
    drv, _ = make_loop(dev(img))
    drv.write_zeroes(16 * 512, 4096)
    drv.write_zeroes(64 * 512, 8192, unmap=True)
    drv.discard(256 * 512, 4096)
    assert drv.read(16 * 512, 4096) == bytes(4096)
    assert drv.read(64 * 512, 8192) == bytes(8192)


def test_errors_come_back_as_status(img: Path) -> None:
    drv, _ = make_loop(dev(img))
    cap = SIZE // 512
    with pytest.raises(BlkIOError) as e:
        drv.read((cap - 1) * 512, 1024)
    assert e.value.status == Status.IOERR
    with pytest.raises(BlkIOError):
        drv.write(cap * 512, b"x" * 512)
    s = drv.submit(ReqType.IN, 0, 100)  # not whole sectors
    assert drv.wait(s).status == Status.IOERR
    drv.release(s)
    s = drv.submit(77, 0)  # unknown type
    assert drv.wait(s).status == Status.UNSUPP
    drv.release(s)
    s = drv.submit(ReqType.DISCARD, data=REQ_HEADER.pack(0, 0, 0)[:16])  # unmap=0 ok,
    assert drv.wait(s).status == Status.OK                                # 0 sectors
    drv.release(s)
    with pytest.raises(BlkIOError) as e:
        drv._dwz_segments(ReqType.DISCARD, [(0, 8, 1)])  # unmap on a discard
    assert e.value.status == Status.UNSUPP
    assert drv.read(0, 512)  # the queue still works


def test_read_only_device_refuses_writes(img: Path) -> None:
    before = img.read_bytes()
    drv, _ = make_loop(dev(img, read_only=True))
    assert drv.read_only
    with pytest.raises(BlkIOError) as e:
        drv.write(0, b"w" * 4096)
    assert e.value.status == Status.IOERR
    with pytest.raises(BlkIOError):
        drv.write_zeroes(0, 4096)
    drv.flush()
    assert drv.read(0, 4096) == before[:4096]
    assert img.read_bytes() == before


def test_many_in_flight_over_two_queues(img: Path) -> None:
    drv, _ports = make_loop(dev(img, num_queues=2), num=64)
    original = img.read_bytes()
    assert drv.num_queues == 2
    for q in range(2):
        slots = [drv.submit(ReqType.IN, i * 8, 4096, queue=q, kick=False)
                 for i in range(drv.depth(q))]
        drv.kick(q)
        done: list[Slot] = []
        while len(done) < len(slots):
            done += drv.reap(q)
        for s in slots:
            assert s.status == Status.OK
            assert bytes(s.payload()) == original[s.sector * 512:s.sector * 512 + 4096]
            drv.release(s)


def test_hostile_request_breaks_only_its_queue(img: Path) -> None:
    d = dev(img, num_queues=2)
    drv, ports = make_loop(d)
    # A request with no writable descriptor: nowhere to put the status.
    hdr = drv.memory.translate(0x100, 16)
    hdr[:] = REQ_HEADER.pack(ReqType.IN, 0, 0)
    ports[0].queue.add([(0x100, 16)], [], "evil")
    with pytest.raises(PeerError, match="status"):
        d.process_queue(0, ports[0].dev_queue)
    assert ports[0].dev_queue.broken
    with pytest.raises(QueueBrokenError):
        d.process_queue(0, ports[0].dev_queue)
    # Descriptor pointing outside guest memory on queue 0 is also refused, queue 1 works.
    drv._next_queue = 1
    assert drv.read(0, 512) == img.read_bytes()[:512]


def test_descriptor_outside_memory_is_refused(img: Path) -> None:
    d = dev(img)
    drv, ports = make_loop(d, mem_size=8 << 20)
    hdr = drv.memory.translate(0x100, 16)
    hdr[:] = REQ_HEADER.pack(ReqType.IN, 0, 0)
    ports[0].queue.add([(0x100, 16)], [((8 << 20) - 100, 4097)], "evil")
    with pytest.raises(PeerError):
        d.process_queue(0, ports[0].dev_queue)
    assert ports[0].dev_queue.broken


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(min_size=0, max_size=40),
       rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 14, 99, 0xFFFFFFFF]),
       sector=st.one_of(st.integers(0, 9000), st.integers(0, 2**64 - 1)),
       use_header=st.booleans(),
       out_lens=st.lists(st.integers(1, 3000), max_size=3),
       in_lens=st.lists(st.integers(1, 5000), max_size=3))
def test_hostile_requests_only_answer_or_break_the_queue(
        img: Path, header: bytes, rtype: int, sector: int, use_header: bool,
        out_lens: list[int], in_lens: list[int]) -> None:
    """Any request: a status byte and a right used length, or a PeerError; no stray writes."""
    if not out_lens and not in_lens:
        in_lens = [1]
    d = dev(img)
    drv, ports = make_loop(d, mem_size=2 << 20)
    mem = drv.memory
    base = 1 << 20
    pos = base
    out_segs, in_segs = [], []
    body = (REQ_HEADER.pack(rtype, 0, sector) + header) if use_header else header
    body = body + os.urandom(max(0, sum(out_lens) - len(body)))
    off = 0
    for n in out_lens:
        mem.write(pos, body[off:off + n].ljust(n, b"\0"))
        out_segs.append((pos, n))
        off += n
        pos += n + 64
    for n in in_lens:
        in_segs.append((pos, n))
        pos += n + 64
    mem.write(base - 64, b"\xee" * 64)
    snapshot_end = pos
    before = bytes(mem.translate(base - 64, snapshot_end - base + 64))
    ports[0].queue.add(out_segs, in_segs, "req")
    try:
        n = d.process_queue(0, ports[0].dev_queue)
    except PeerError:
        assert ports[0].dev_queue.broken
        return
    assert n == 1
    token, used = ports[0].queue.get_buf()  # type: ignore[misc]
    assert token == "req"
    after = bytes(mem.translate(base - 64, snapshot_end - base + 64))
    writable: set[int] = set()
    for a, ln in in_segs:
        writable.update(range(a - base + 64, a - base + 64 + ln))
    changed = {i for i in range(len(before)) if before[i] != after[i]}
    assert changed <= writable  # nothing outside the device-writable buffers
    assert 1 <= used <= sum(ln for _a, ln in in_segs)
    last_a, last_n = in_segs[-1]
    assert mem.read(last_a + last_n - 1, 1)[0] in (Status.OK, Status.IOERR, Status.UNSUPP)


def test_bad_request_mid_batch_leaves_later_ones_in_the_ring(img: Path) -> None:
    """A batch that breaks on its 3rd request has popped exactly 3, like the scalar loop."""
    d = dev(img)
    drv, ports = make_loop(d)
    a = drv.submit(ReqType.IN, 0, 512, kick=False)
    b = drv.submit(ReqType.IN, 1, 512, kick=False)
    hdr = drv.memory.translate(0x100, 16)
    hdr[:] = REQ_HEADER.pack(ReqType.IN, 0, 0)
    ports[0].queue.add([(0x100, 16)], [], "evil")
    drv.submit(ReqType.IN, 2, 512, kick=False)
    q = ports[0].dev_queue
    with pytest.raises(PeerError, match="status"):
        d.process_queue(0, q)
    assert q.broken and q.get_state() == (3, 2)
    assert [s.index for s in drv.poll(0)] == [a.index, b.index]
    assert a.status == b.status == Status.OK


def test_requests_done_before_a_bad_pop_are_published(img: Path) -> None:
    """A chain that breaks the queue at pop time leaves the earlier completions visible."""
    d = dev(img)
    drv, ports = make_loop(d, mem_size=8 << 20)
    a = drv.submit(ReqType.IN, 0, 512, kick=False)
    b = drv.submit(ReqType.IN, 1, 512, kick=False)
    hdr = drv.memory.translate(0x100, 16)
    hdr[:] = REQ_HEADER.pack(ReqType.IN, 0, 0)
    # Its data descriptor runs past the end of guest memory: pop itself refuses it.
    ports[0].queue.add([(0x100, 16)], [((8 << 20) - 100, 4097)], "evil")
    q = ports[0].dev_queue
    with pytest.raises(PeerError):
        d.process_queue(0, q)
    assert q.broken and q.used_idx == 2 and d.completed == 2
    assert [s.index for s in drv.poll(0)] == [a.index, b.index]
    assert a.status == b.status == Status.OK
    data = img.read_bytes()
    assert bytes(a.payload()) == data[:512] and bytes(b.payload()) == data[512:1024]


@pytest.mark.parametrize("spin", [0.2, 0.001])
def test_reap_spins_then_sleeps(img: Path, spin: float) -> None:
    """With ``spin`` the driver polls the used ring before sleeping; either way it completes."""
    import threading

    drv, ports = make_loop(dev(img))
    drv.spin = spin
    slot = drv.submit(ReqType.IN, 8, 4096, kick=False)
    timer = threading.Timer(0.02, ports[0].kick.signal)
    timer.start()
    try:
        assert drv.reap(0, timeout=10) == [slot]
    finally:
        timer.join()
    assert slot.status == Status.OK and bytes(slot.payload()) == img.read_bytes()[4096:8192]


@pytest.mark.parametrize(("rtype", "sector", "nbytes", "extra"), [
    (ReqType.IN, 3, 4096, 0), (ReqType.IN, 0, 0, 0), (ReqType.IN, 5, 1000, 0),
    (ReqType.IN, SIZE // 512 - 1, 1024, 0), (ReqType.IN, 2**64 - 1, 512, 0),
    (ReqType.IN, 9, 512, 7), (ReqType.OUT, 4, 2048, 0), (ReqType.OUT, 4, 0, 3),
    (ReqType.OUT, 4, 700, 0), (ReqType.OUT, SIZE // 512, 512, 0),
    (ReqType.OUT, 11, 512, 5),
])
def test_one_header_one_reply_shape_answers_like_any_other(
        img: Path, rtype: int, sector: int, nbytes: int, extra: int) -> None:
    """The two-descriptor fast path gives the general path's status, length and bytes."""
    original = img.read_bytes()
    d = dev(img)
    _drv, ports = make_loop(d)
    q, dq, mem = ports[0].queue, ports[0].dev_queue, ports[0].memory
    hdr, buf = 16 << 20, 20 << 20  # far above the rings and slots
    payload = bytes(range(256)) * (nbytes // 256 + 1)
    results = []
    for split in (False, True):
        mem.translate(buf, 8192)[:] = b"\xee" * 8192
        view = mem.translate(hdr, 16 + max(nbytes, extra))
        view[:16] = REQ_HEADER.pack(rtype, 0, sector)
        if rtype == ReqType.IN:
            out = [(hdr, 16 + extra)] if not split else [(hdr, 8), (hdr + 8, 8 + extra)]
            inn = [(buf, nbytes + 1)]
        else:
            view[16:16 + nbytes] = payload[:nbytes]
            out = [(hdr, 16 + nbytes)] if not split else [(hdr, 16)] + (
                [(hdr + 16, nbytes)] if nbytes else [])
            inn = [(buf, 1 + extra)]
        q.add(out, inn, "req")
        assert d.process_queue(0, dq) == 1
        got = q.get_buf()
        assert got is not None
        results.append((got[1], bytes(mem.translate(buf, 8192)), img.read_bytes()))
        img.write_bytes(original)
    assert results[0] == results[1]
    used, memory, disk = results[0]
    cap = SIZE // 512
    ok = nbytes % 512 == 0 and sector <= cap and nbytes // 512 <= cap - sector
    assert memory[nbytes if rtype == ReqType.IN else extra] == (Status.OK if ok else Status.IOERR)
    if rtype == ReqType.IN:
        assert used == (nbytes + 1 if ok else 1)
        if ok:
            assert memory[:nbytes] == original[sector * 512:sector * 512 + nbytes]
    else:
        assert used == 1
        assert disk[sector * 512:sector * 512 + nbytes] == (
            payload[:nbytes] if ok else original[sector * 512:sector * 512 + nbytes])


def test_batch_limits_each_process_queue_call(img: Path) -> None:
    d = dev(img, batch=4)
    drv, ports = make_loop(d)
    slots = [drv.submit(ReqType.IN, 8 * i, 4096, kick=False) for i in range(10)]
    q = ports[0].dev_queue
    # Half of what waits, at most 4: 10 -> 4, 6 -> 3, 3 -> 2, 1 -> 1.
    assert [d.process_queue(0, q) for _ in range(5)] == [4, 3, 2, 1, 0]
    assert [s.index for s in drv.poll(0)] == [s.index for s in slots]
    data = img.read_bytes()
    for i, s in enumerate(slots):
        assert s.status == Status.OK and bytes(s.payload()) == data[4096 * i:4096 * (i + 1)]
