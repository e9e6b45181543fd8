"""pyvirtio-blk's asynchronous engine, O_DIRECT (``--cache none``) and the null store.

* the thread engine really keeps requests in flight side by side: a store
  that lets no read finish before eight are inside it at once serves eight
  reads submitted together (the synchronous engine would wait for ever), and
  every byte read is the image's;
* out-of-order completions, flushes and writes through the real program
  (``--aio threads``) leave exactly the data written in the image;
* ``--cache none``: O_DIRECT on a file system that supports it, guest
  buffers at any address (bounced when unaligned, open(2) "O_DIRECT"), and a
  one-line start-up error where the file system refuses O_DIRECT (ramfs);
* ``--null SIZE --latency-us N`` (QEMU null-co): reads return zeros, writes
  are accepted and dropped, many requests wait on its latency at once.
"""

from __future__ import annotations

import functools
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blk_peers import start_pyvirtio_blk, stop, write_flush_read_back
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_VERSION_1, bit
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.devices.blk.driver import BlkDriver
from pyvirtio.devices.blk.engine import ThreadEngine
from pyvirtio.devices.blk.file_store import FileStore
from pyvirtio.devices.blk.null_store import NullStore
from pyvirtio.devices.blk.spec import REQ_HEADER, ReqType, Status
from pyvirtio.transports.device import VirtQueue
from pyvirtio.transports.inprocess import InProcessTransport
from pyvirtio.transports.vhost_user.server import VhostUserServer

REPO = Path(__file__).resolve().parent.parent
SIZE = 4 << 20
DEPTH = 8


class GateStore(FileStore):
    """A file store whose reads wait until ``DEPTH`` of them are inside at once."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        # Guards a deadlock (the test then fails), not a timing: 60 s is never needed.
        self.barrier = threading.Barrier(DEPTH, timeout=60)
        self.inside_max = 0
        self._inside = 0
        self._lock = threading.Lock()

    def try_read(self, sector: int, views: list[memoryview], total: int) -> int:
        return -1  # never answered on the loop: every read goes to a worker

    def read(self, sector: int, views: list[memoryview],
             total: int | None = None) -> tuple[Status, int]:
        with self._lock:
            self._inside += 1
            self.inside_max = max(self.inside_max, self._inside)
        self.barrier.wait()
        try:
            return super().read(sector, views, total)
        finally:
            with self._lock:
                self._inside -= 1


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


@pytest.mark.timeout(90)
def test_thread_engine_keeps_requests_in_flight(tmp_path: Path, img: Path) -> None:
    store = GateStore(str(img))
    device = BlkDevice(store, queue_size=256, engine=ThreadEngine(DEPTH))
    path = str(tmp_path / "gate.sock")
    server = VhostUserServer(device, socket_path=path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with BlkDriver.connect(path, timeout=60) as drv:
            sectors = [i * 64 + 8 for i in range(DEPTH)]
            slots = [drv.submit(ReqType.IN, s, 4096, kick=False) for s in sectors]
            drv.kick()
            for slot in slots:
                drv.wait(slot)
            image = img.read_bytes()
            for s, slot in zip(sectors, slots, strict=True):
                assert slot.status == Status.OK
                assert bytes(slot.payload()) == image[s * 512:s * 512 + 4096]
                drv.release(slot)
    finally:
        server.stop()
        thread.join(10)
        server.close()
        store.close()
    assert store.inside_max == DEPTH
    # Each request the workers ran is one latency sample (submit to completion taken).
    assert device.stats.latency.count == DEPTH
    assert device.stats.as_dict()["requests"] == DEPTH


@pytest.mark.timeout(90)
@pytest.mark.parametrize("aio", ["threads", "sync"])
def test_latency_histogram_counts_every_request(tmp_path: Path, img: Path, aio: str) -> None:
    """blk's latency histogram (docs/stats.md): one sample per request on both engines,
    page-cached answers and worker answers alike, and the null store's 200 µs in each."""
    store = FileStore(str(img))
    null = NullStore(SIZE, latency=200e-6)
    devices = [BlkDevice(s, queue_size=256, engine=ThreadEngine(4) if aio == "threads" else None)
               for s in (store, null)]
    servers = [VhostUserServer(d, socket_path=str(tmp_path / f"{i}.sock"))
               for i, d in enumerate(devices)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        for i, _device in enumerate(devices):
            with BlkDriver.connect(str(tmp_path / f"{i}.sock"), timeout=60) as drv:
                for _round in range(3):
                    slots = [drv.submit(ReqType.IN, s * 8, 4096, kick=False) for s in range(16)]
                    drv.kick()
                    for slot in slots:
                        assert drv.wait(slot).status == Status.OK
                        drv.release(slot)
                drv.flush()
    finally:
        for s in servers:
            s.stop()
        for t in threads:
            t.join(10)
        for s in servers:
            s.close()
        store.close()
    for device in devices:
        snap = device.stats.as_dict()
        hist = snap["latency"]
        assert isinstance(hist, dict)
        assert snap["requests"] == hist["count"] == sum(hist["counts"]) == 3 * 16 + 1
        assert hist["sum_us"] > 0
    # The null store answers no request in less than its latency (bucket 8: < 256 µs).
    null_counts = devices[1].stats.latency.counts
    assert sum(null_counts[:8]) == 0, null_counts


@pytest.mark.timeout(90)
def test_writes_flush_and_reads_through_workers(tmp_path: Path, img: Path) -> None:
    """--aio threads: 32 distinct writes in flight, a FLUSH, then reads of all of them."""
    sock = tmp_path / "blk.sock"
    proc = start_pyvirtio_blk(img, sock, "--aio", "threads", "--aio-workers", "16")
    blocks = {i * 16: os.urandom(8192) for i in range(32)}  # sector -> 8 KiB
    try:
        with BlkDriver.connect(str(sock), timeout=30) as drv:
            write_flush_read_back(drv, blocks)
    finally:
        assert stop(proc) == 0
    image = img.read_bytes()
    for s, data in blocks.items():
        assert image[s * 512:s * 512 + len(data)] == data


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose file system takes O_DIRECT: tmp_path, else one in the work tree."""
    probe = tmp_path / "probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        yield tmp_path
        return
    except OSError:
        pass
    with tempfile.TemporaryDirectory(dir=REPO, prefix=".direct-test-") as d:
        yield Path(d)


@pytest.mark.timeout(90)
def test_cache_none_program(direct_dir: Path) -> None:
    img = direct_dir / "direct.img"
    img.write_bytes(os.urandom(SIZE))
    sock = direct_dir / "direct.sock"
    proc = start_pyvirtio_blk(img, sock, "--cache", "none")
    data = os.urandom(64 << 10)
    try:
        with BlkDriver.connect(str(sock), timeout=30) as drv:
            drv.write(1 << 20, data)
            drv.write(512, data[:512])  # one sector: aligned to 512 only
            drv.flush()
            assert drv.read(1 << 20, len(data)) == data
            assert drv.read(512, 512) == data[:512]
    finally:
        assert stop(proc) == 0
    image = img.read_bytes()
    assert image[1 << 20:(1 << 20) + len(data)] == data and image[512:1024] == data[:512]


def test_cache_none_unaligned_buffers_bounce(direct_dir: Path) -> None:
    img = direct_dir / "bounce.img"
    content = os.urandom(1 << 20)
    img.write_bytes(content)
    with FileStore(str(img), direct=True) as store:
        assert store.align in (512, 4096)
        mem = mmap.mmap(-1, 4 * 4096)
        view = memoryview(mem)
        odd = [view[3:3 + 4096], view[8192 + 1:8192 + 1 + 4096]]  # two unaligned buffers
        fd, bounce = store._direct_path(8 * 512, odd, 8192)
        assert fd == store.fd and bounce is not None
        bounce.close()
        status, n = store.read(8, odd)
        assert status == Status.OK and n == 8192
        assert bytes(odd[0]) + bytes(odd[1]) == content[4096:4096 + 8192]
        new = os.urandom(8192)
        odd[0][:] = new[:4096]
        odd[1][:] = new[4096:]
        assert store.write(64, odd) == Status.OK
        assert store.flush() == Status.OK
        odd.clear()
        view.release()
        mem.close()
    assert img.read_bytes()[64 * 512:64 * 512 + 8192] == new


def test_cache_none_refused_by_ramfs(tmp_path: Path) -> None:
    """ramfs has no direct I/O (tmpfs has had it since Linux 6.6): a clear start-up error."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True, timeout=30)
    try:
        img = mnt / "disk.img"
        img.write_bytes(bytes(1 << 20))
        res = subprocess.run([sys.executable, "-m", "pyvirtio.cli.blk", "--socket-path",
                              str(tmp_path / "x.sock"), "--blk-file", str(img), "--cache",
                              "none"], capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "O_DIRECT" in res.stderr and "--cache writeback" in res.stderr
    assert not (tmp_path / "x.sock").exists()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("aio", ["threads", "sync"])
def test_null_store(tmp_path: Path, aio: str) -> None:
    sock = tmp_path / "null.sock"
    out = open(tmp_path / "null.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio.cli.blk", "--socket-path",
                             str(sock), "--null", "16M", "--latency-us", "100", "--aio", aio],
                            stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    try:
        with BlkDriver.connect(str(sock), timeout=30) as drv:
            assert drv.capacity == (16 << 20) // 512
            pattern = b"\x5a" * 4096
            slots = [drv.submit(ReqType.OUT, i * 8, data=pattern, kick=False)
                     for i in range(32)]
            drv.kick()
            for slot in slots:
                assert drv.wait(slot).status == Status.OK
            for slot in slots:
                drv.release(slot)
            # The same slots (their buffers still hold the pattern) read zeros back.
            slots = [drv.submit(ReqType.IN, i * 8, 4096, kick=False) for i in range(32)]
            drv.kick()
            for slot in slots:
                assert drv.wait(slot).status == Status.OK
                assert bytes(slot.payload()) == bytes(4096)
                drv.release(slot)
            drv.flush()
            assert drv.read((16 << 20) - 512, 512) == bytes(512)
    finally:
        assert stop(proc) == 0


class HoldStore(FileStore):
    """Reads wait (in their workers) until the test lets them go."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.inside = 0
        self.go = threading.Event()
        self._lock = threading.Lock()

    def try_read(self, sector: int, views: list[memoryview], total: int) -> int:
        return -1

    def read(self, sector: int, views: list[memoryview],
             total: int | None = None) -> tuple[Status, int]:
        with self._lock:
            self.inside += 1
        self.go.wait(60)
        return super().read(sector, views, total)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["null", "file"])
def test_stopping_a_ring_answers_what_is_in_flight(tmp_path: Path, img: Path,
                                                   kind: str) -> None:
    """GET_VRING_BASE while requests wait on the engine: all are answered before the reply.

    Its reply's last_avail_idx counts them as taken; a request left in flight
    would never be answered (vhost-user.rst "Ring states": a stopped ring is
    not processed).  Null store: 300 ms latency on the loop's timer; file:
    reads held in their workers until the stop has been sent.
    """
    hold: HoldStore | None = None
    store: FileStore | NullStore
    if kind == "null":
        store = NullStore(16 << 20, 0.3)
        expected = [bytes(4096)] * DEPTH
    else:
        store = hold = HoldStore(str(img))
        image = img.read_bytes()
        expected = [image[i * 4096:(i + 1) * 4096] for i in range(DEPTH)]
    device = BlkDevice(store, queue_size=256, engine=ThreadEngine(DEPTH))
    sock = str(tmp_path / "stop.sock")
    server = VhostUserServer(device, socket_path=sock)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def in_flight() -> int:
        return hold.inside if hold is not None else device._delay.held  # type: ignore[union-attr]

    try:
        with BlkDriver.connect(sock, timeout=30) as drv:
            slots = [drv.submit(ReqType.IN, i * 8, 4096, kick=False) for i in range(DEPTH)]
            drv.kick()
            while in_flight() < DEPTH:  # every request popped and waiting
                time.sleep(0.01)
            assert drv.frontend is not None
            if hold is not None:
                # Let the reads go only once the stop is on its way.
                threading.Timer(0.2, hold.go.set).start()
            last_avail = drv.frontend.stop_queue(0)
            assert last_avail == DEPTH
            done = drv.poll(0)  # no waiting: the used ring holds them already
            assert sorted(s.index for s in done) == sorted(s.index for s in slots)
            for slot, data in zip(slots, expected, strict=True):
                assert slot.status == Status.OK and bytes(slot.payload()) == data
    finally:
        if hold is not None:
            hold.go.set()
        server.stop()
        thread.join(10)
        server.close()
        store.close()


@pytest.mark.parametrize(("rtype", "sector", "nbytes"), [
    (ReqType.IN, 3, 4096), (ReqType.IN, 5, 1000), (ReqType.IN, SIZE // 512 - 1, 1024),
    (ReqType.OUT, 4, 2048), (ReqType.OUT, 4, 700), (ReqType.OUT, SIZE // 512, 512),
])
def test_a_guests_request_shape_is_answered_on_the_loop(img: Path, rtype: int, sector: int,
                                                        nbytes: int) -> None:
    """Linux's shape — header | data in two buffers | status, three or four descriptors —
    is answered from the page cache on the loop as the two-descriptor one is (no worker),
    with the synchronous engine's status, used length and bytes; what the page cache
    cannot answer (an I/O error to report) still goes to the engine."""
    ok = False
    original = img.read_bytes()
    results = []
    for engine in (None, ThreadEngine(2)):
        img.write_bytes(original)
        mem = GuestMemory.anonymous(32 << 20)
        t = InProcessTransport(mem, BumpAllocator(0x1000, 16 << 20), [64],
                               bit(F_VERSION_1) | bit(F_RING_EVENT_IDX))
        store = FileStore(str(img))
        device = BlkDevice(store, engine=engine)
        device.set_features(bit(F_VERSION_1) | bit(F_RING_EVENT_IDX))
        vq = VirtQueue(0, t.device(0), device, functools.partial(t.notify_driver, 0))
        hdr, buf, status = 16 << 20, 20 << 20, 24 << 20
        mem.translate(buf, 8192)[:] = b"\xee" * 8192
        mem.translate(hdr, 16)[:] = REQ_HEADER.pack(rtype, 0, sector)
        half = nbytes // 2
        data = [(buf, half), (buf + 4096, nbytes - half)]
        if rtype == ReqType.OUT:
            mem.translate(buf, half)[:] = b"\x11" * half
            mem.translate(buf + 4096, nbytes - half)[:] = b"\x22" * (nbytes - half)
            t.driver(0).add([(hdr, 16), *data], [(status, 1)], "req")
        else:
            t.driver(0).add([(hdr, 16)], [*data, (status, 1)], "req")
        vq.run()
        ok = nbytes % 512 == 0 and nbytes // 512 <= SIZE // 512 - sector
        if engine is not None:
            # Only an error (and a write where the file system takes none with
            # RWF_NOWAIT) leaves the loop.
            on_loop = ok and (rtype == ReqType.IN or store.nowait_writes)
            assert engine.submitted == (0 if on_loop else 1)
            deadline = time.monotonic() + 30
            while engine.in_flight:  # the worker's completion, taken as the loop would
                assert time.monotonic() < deadline
                time.sleep(0.01)
                engine._collect()
            engine.close()
        got = t.driver(0).get_buf()
        assert got is not None and got[0] == "req"
        results.append((got[1], bytes(mem.translate(status, 1)),
                        bytes(mem.translate(buf, 8192)), img.read_bytes()))
    assert results[0] == results[1]
    used, st, memory, disk = results[0]
    assert st == bytes([Status.OK if ok else Status.IOERR])
    if rtype == ReqType.IN and ok:
        assert used == nbytes + 1
        got_data = memory[:half] + memory[4096:4096 + nbytes - half]
        assert got_data == original[sector * 512:sector * 512 + nbytes]
    elif rtype == ReqType.OUT and ok:
        assert disk[sector * 512:sector * 512 + nbytes] == (
            b"\x11" * half + b"\x22" * (nbytes - half))
