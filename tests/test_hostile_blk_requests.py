"""Hostile virtio-blk requests against the device model, VIRTIO 1.2 §5.2.6.

What tests/test_blk_device.py's random requests do not reach: sectors near
2^64, lengths that are not whole sectors, DISCARD / WRITE_ZEROES payloads with
huge counts, overflowing ranges, too many segments or a payload of gigabytes,
GET_ID with buffers shorter or longer than 20 bytes, the status byte in a
device-readable descriptor, a read-only disk.  Each request is answered with
a status byte and the right used length (§2.7.8), or breaks its queue; the
image and guest memory change only where the request allowed it.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blk_loop_harness import LoopPort, make_loop
from pyvirtio.core.errors import PeerError
from pyvirtio.core.memory import GuestMemory
from pyvirtio.devices.blk.device import MAX_DWZ_SECTORS, MAX_DWZ_SEG, BlkDevice
from pyvirtio.devices.blk.file_store import FileStore
from pyvirtio.devices.blk.spec import DWZ_SEGMENT, REQ_HEADER, ReqType, Status

SIZE = 4 << 20
CAP = SIZE // 512
BASE = 1 << 20  # request buffers live from here in guest memory
MEM = 32 << 20


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


class Rig:
    """One device on one loop queue; requests are built by hand in guest memory."""

    def __init__(self, img: Path, read_only: bool = False) -> None:
        self.img = img
        self.device = BlkDevice(FileStore(str(img), read_only=read_only), serial="x" * 20)
        _drv, ports = make_loop(self.device, mem_size=MEM)
        self.port: LoopPort = ports[0]
        self.mem: GuestMemory = ports[0].memory
        self.pos = BASE

    def alloc(self, n: int) -> int:
        gpa = self.pos
        self.pos += n + 64
        return gpa

    def run(self, out: list[tuple[int, int]], inn: list[tuple[int, int]]) -> tuple[int, int]:
        """Submit one request; (status byte, used length).  PeerError if the queue broke."""
        self.port.queue.add(out, inn, "req")
        n = self.device.process_queue(0, self.port.dev_queue)
        assert n == 1
        got = self.port.queue.get_buf()
        assert got is not None and got[0] == "req"
        a, ln = inn[-1]
        return self.mem.read(a + ln - 1, 1)[0], got[1]

    def header(self, rtype: int, sector: int, payload: bytes = b"") -> tuple[int, int]:
        body = REQ_HEADER.pack(rtype, 0, sector) + payload
        gpa = self.alloc(len(body))
        self.mem.write(gpa, body)
        return gpa, len(body)

    def status(self) -> tuple[int, int]:
        gpa = self.alloc(1)
        self.mem.write(gpa, b"\xee")
        return gpa, 1

    def snapshot(self) -> bytes:
        return bytes(self.mem.translate(BASE, self.pos - BASE))


def only_changed(before: bytes, after: bytes, allowed: list[tuple[int, int]]) -> bool:
    ok: set[int] = set()
    for a, n in allowed:
        ok.update(range(a - BASE, a - BASE + n))
    return all(i in ok for i in range(len(before)) if before[i] != after[i])


@pytest.mark.parametrize("sector", [CAP, CAP + 1, 2**63, 2**64 - 1, 2**64 - 8, 2**55 + 1])
@pytest.mark.parametrize("rtype", [ReqType.IN, ReqType.OUT])
def test_sectors_past_the_end_and_near_2_64(img: Path, sector: int, rtype: int) -> None:
    r = Rig(img)
    before_img = img.read_bytes()
    data = r.alloc(4096)
    if rtype == ReqType.IN:
        out, inn = [r.header(rtype, sector)], [(data, 4096), r.status()]
    else:
        r.mem.write(data, os.urandom(4096))
        out, inn = [r.header(rtype, sector), (data, 4096)], [r.status()]
    before = r.snapshot()
    assert r.run(out, inn) == (Status.IOERR, 1)
    assert only_changed(before, r.snapshot(), [inn[-1]])
    assert img.read_bytes() == before_img


@pytest.mark.parametrize("sector,nbytes", [(CAP - 1, 1024), (CAP - 8, 8192), (CAP - 1, 512)])
def test_ranges_across_the_end(img: Path, sector: int, nbytes: int) -> None:
    r = Rig(img)
    data = r.alloc(nbytes)
    status, used = r.run([r.header(ReqType.IN, sector)], [(data, nbytes), r.status()])
    if sector * 512 + nbytes <= SIZE:
        assert (status, used) == (Status.OK, nbytes + 1)
        assert r.mem.read(data, nbytes) == img.read_bytes()[sector * 512:sector * 512 + nbytes]
    else:
        assert (status, used) == (Status.IOERR, 1)


@pytest.mark.parametrize("nbytes", [1, 511, 513, 1000, 4095])
@pytest.mark.parametrize("rtype", [ReqType.IN, ReqType.OUT])
def test_lengths_not_whole_sectors(img: Path, nbytes: int, rtype: int) -> None:
    r = Rig(img)
    before_img = img.read_bytes()
    data = r.alloc(nbytes)
    if rtype == ReqType.IN:
        out, inn = [r.header(rtype, 0)], [(data, nbytes), r.status()]
    else:
        out, inn = [r.header(rtype, 0), (data, nbytes)], [r.status()]
    before = r.snapshot()
    assert r.run(out, inn) == (Status.IOERR, 1)
    assert only_changed(before, r.snapshot(), [inn[-1]])
    assert img.read_bytes() == before_img


def dwz(segs: list[tuple[int, int, int]]) -> bytes:
    return b"".join(DWZ_SEGMENT.pack(s, n, f) for s, n, f in segs)


@pytest.mark.parametrize("rtype", [ReqType.DISCARD, ReqType.WRITE_ZEROES])
@pytest.mark.parametrize("payload,expect", [
    (dwz([(0, 2**32 - 1, 0)]), Status.IOERR),  # more sectors than one segment may hold
    (dwz([(0, MAX_DWZ_SECTORS + 1, 0)]), Status.IOERR),
    (dwz([(2**64 - 1, 1, 0)]), Status.IOERR),  # sector + count wraps 2^64
    (dwz([(2**64 - 8, 16, 0)]), Status.IOERR),
    (dwz([(CAP - 1, 2, 0)]), Status.IOERR),  # runs past the end
    (dwz([(CAP, 0, 0)]), Status.OK),  # zero sectors at the end
    (dwz([(0, 8, 0)] * (MAX_DWZ_SEG + 1)), Status.UNSUPP),  # more segments than offered
    (dwz([(0, 8, 0)] * 1000), Status.UNSUPP),
    (dwz([(0, 8, 0x80)]), Status.UNSUPP),  # unknown flag
    (dwz([(0, 8, 0)])[:15], Status.IOERR),  # not whole segments
    (dwz([(0, 8, 0)]) + b"\0", Status.IOERR),
    (b"", Status.IOERR),
])
def test_discard_and_write_zeroes_payloads(img: Path, rtype: int, payload: bytes,
                                           expect: Status) -> None:
    r = Rig(img)
    before_img = img.read_bytes()
    out = [r.header(rtype, 0, payload)]
    inn = [r.status()]
    before = r.snapshot()
    assert r.run(out, inn) == (expect, 1)
    assert only_changed(before, r.snapshot(), [inn[-1]])
    if expect != Status.OK:
        assert img.read_bytes() == before_img


def test_discard_payload_of_gigabytes_is_refused_without_copying_it(img: Path) -> None:
    """60 descriptors naming the same 8 MiB: the device must not join 480 MiB."""
    r = Rig(img)
    big = r.alloc(8 << 20)
    out = [r.header(ReqType.DISCARD, 0)] + [(big, 8 << 20)] * 60
    inn = [r.status()]
    tracemalloc.start()
    try:
        status, used = r.run(out, inn)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (status, used) == (Status.UNSUPP, 1)
    assert peak < 8 << 20  # not even one copy of the buffer


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rtype=st.sampled_from([ReqType.DISCARD, ReqType.WRITE_ZEROES]),
       segs=st.lists(st.tuples(
           st.one_of(st.integers(0, CAP + 2), st.integers(0, 2**64 - 1)),
           st.one_of(st.integers(0, 64), st.sampled_from([2**32 - 1, MAX_DWZ_SECTORS + 1])),
           st.sampled_from([0, 0, 1, 2, 2**31])), min_size=1, max_size=MAX_DWZ_SEG + 2))
def test_random_segments_touch_only_their_ranges(img: Path, rtype: int,
                                                 segs: list[tuple[int, int, int]]) -> None:
    r = Rig(img)
    before_img = img.read_bytes()
    status, used = r.run([r.header(rtype, 0, dwz(segs))], [r.status()])
    assert used == 1
    after = img.read_bytes()
    fits = all(s + n <= CAP and n <= MAX_DWZ_SECTORS for s, n, _f in segs)
    flags_ok = all(f == 0 or (f == 1 and rtype == ReqType.WRITE_ZEROES) for _s, _n, f in segs)
    if len(segs) > MAX_DWZ_SEG:
        assert status == Status.UNSUPP
    elif status == Status.OK:
        assert fits and flags_ok
    else:
        assert status in (Status.IOERR, Status.UNSUPP)
        assert not (fits and flags_ok)
    # Bytes outside the requested ranges never change; inside, zeros (or, for a
    # discard, the old data or zeros).
    touched = bytearray(SIZE // 512)
    if status == Status.OK:
        for s, n, _f in segs:
            touched[s:s + n] = b"\1" * n
    for sec in range(CAP):
        a, b = before_img[sec * 512:sec * 512 + 512], after[sec * 512:sec * 512 + 512]
        if a != b:
            assert touched[sec] and b == bytes(512)
    if status == Status.OK and rtype == ReqType.WRITE_ZEROES:
        for s, n, _f in segs:
            assert after[s * 512:(s + n) * 512] == bytes(n * 512)


@pytest.mark.parametrize("lens", [[], [1], [5], [19], [20], [21], [4096], [3, 4, 30],
                                  [10, 10], [1, 1, 1]])
def test_get_id_with_short_and_long_buffers(img: Path, lens: list[int]) -> None:
    r = Rig(img)
    bufs = [(r.alloc(n), n) for n in lens]
    for a, n in bufs:
        r.mem.write(a, b"\xaa" * n)
    inn = [*bufs, r.status()]
    before = r.snapshot()
    status, used = r.run([r.header(ReqType.GET_ID, 0)], inn)
    written = min(sum(lens), 20)
    assert (status, used) == (Status.OK, written + 1)
    got = b"".join(r.mem.read(a, n) for a, n in bufs)
    assert got[:written] == b"x" * written
    assert got[written:] == b"\xaa" * (len(got) - written)
    assert only_changed(before, r.snapshot(), inn)


def test_get_id_status_sharing_the_data_descriptor(img: Path) -> None:
    r = Rig(img)
    buf = r.alloc(8)
    status, used = r.run([r.header(ReqType.GET_ID, 0)], [(buf, 8)])
    assert (status, used) == (Status.OK, 8)
    assert r.mem.read(buf, 7) == b"x" * 7


@pytest.mark.parametrize("rtype", [ReqType.IN, ReqType.OUT, ReqType.GET_ID, ReqType.FLUSH])
def test_status_byte_in_a_device_readable_descriptor(img: Path, rtype: int) -> None:
    """No writable byte at the end: the request cannot be answered; the queue breaks."""
    r = Rig(img)
    before_img = img.read_bytes()
    data = r.alloc(512)
    status = r.alloc(1)
    r.mem.write(status, b"\xee")
    before = r.snapshot()
    r.port.queue.add([r.header(rtype, 0), (data, 512), (status, 1)], [], "req")
    with pytest.raises(PeerError):
        r.device.process_queue(0, r.port.dev_queue)
    assert r.port.dev_queue.broken
    assert r.snapshot()[:len(before)] == before
    assert img.read_bytes() == before_img


def test_header_split_and_truncated(img: Path) -> None:
    r = Rig(img)
    hdr = REQ_HEADER.pack(ReqType.IN, 0, 3)
    parts = [(r.alloc(k), k) for k in (3, 5, 8)]
    off = 0
    for a, k in parts:
        r.mem.write(a, hdr[off:off + k])
        off += k
    data = r.alloc(512)
    assert r.run(parts, [(data, 512), r.status()]) == (Status.OK, 513)
    assert r.mem.read(data, 512) == img.read_bytes()[3 * 512:4 * 512]
    # Fifteen header bytes: breaks the queue.
    short = r.alloc(15)
    r.port.queue.add([(short, 15)], [r.status()], "short")
    with pytest.raises(PeerError, match="header"):
        r.device.process_queue(0, r.port.dev_queue)


@pytest.mark.parametrize("rtype", [ReqType.OUT, ReqType.DISCARD, ReqType.WRITE_ZEROES])
def test_read_only_disk_never_changes(img: Path, rtype: int) -> None:
    r = Rig(img, read_only=True)
    before_img = img.read_bytes()
    payload = dwz([(0, 8, 0)]) if rtype != ReqType.OUT else os.urandom(4096)
    status, used = r.run([r.header(rtype, 0, payload)], [r.status()])
    assert used == 1 and status in (Status.IOERR, Status.UNSUPP)
    assert img.read_bytes() == before_img
