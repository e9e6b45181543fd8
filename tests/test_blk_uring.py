"""pyvirtio-blk's io_uring engine (``--aio io_uring``), devices/blk/uring_engine.py.

Through pyvirtio's own front end (BlkDriver over vhost-user) unless said:

* 32 writes of distinct patterns in flight at once, a FLUSH, 32 reads back:
  every request went through the ring (none answered by the page cache or
  run on the loop), the data is right through the front end and in the image,
  and the latency histogram has one sample per request;
* reads really wait in the kernel side by side: on a pipe, eight reads are
  in flight together and none completes before the test writes its data;
* a read past the end of a file that shrank, and writes to a descriptor that
  refuses them, answer VIRTIO_BLK_S_IOERR — never a wrong OK; a short write
  is submitted again for the rest (and fails when the rest cannot be written);
* GET_VRING_BASE with reads in flight: all are answered before the reply;
* the real program: ``--aio io_uring`` with ``--cache none`` (O_DIRECT);
  a one-line start-up error when the binding is missing or the kernel
  refuses io_uring (both simulated with a stand-in ``liburing`` module);
* a Linux guest in QEMU writes and verifies data with many O_DIRECT
  requests in flight on ``--aio io_uring``.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blk_peers import start_pyvirtio_blk, stop, write_flush_read_back
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.devices.blk.driver import BlkDriver, Slot
from pyvirtio.devices.blk.file_store import WOULD_BLOCK, FileStore
from pyvirtio.devices.blk.spec import ReqType, Status
from pyvirtio.devices.blk.uring_engine import UringEngine
from pyvirtio.transports.vhost_user.server import VhostUserServer
from test_blk_async import direct_dir  # noqa: F401 - the fixture
from test_blk_qemu_guest import boot, initramfs, pattern  # noqa: F401 - initramfs: a fixture

SIZE = 4 << 20
DEPTH = 8


class RingStore(FileStore):
    """A file store whose page cache answers nothing on the loop: every read and write
    goes to the engine (the io_uring under test)."""

    def try_read(self, sector: int, views: list[memoryview], total: int) -> int:
        return WOULD_BLOCK

    def try_write(self, sector: int, views: list[memoryview], total: int) -> int:
        return WOULD_BLOCK


class PipeStore(RingStore):
    """Reads come from a pipe: each waits in the kernel until the test writes its data."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        os.close(self.fd)
        self.fd, self.writer = os.pipe()
        self.buffered_fd = self.fd

    def close(self) -> None:
        super().close()
        os.close(self.writer)


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


Served = list[tuple[VhostUserServer, threading.Thread]]


@pytest.fixture
def serve() -> Iterator[Served]:
    """Servers started by serve_device, stopped and closed at the end."""
    served: Served = []
    yield served
    for server, thread in served:
        server.stop()
        thread.join(10)
        server.close()


def serve_device(serve: Served, device: BlkDevice, sock: Path) -> str:
    server = VhostUserServer(device, socket_path=str(sock))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    serve.append((server, thread))
    return str(sock)


def reads_held_in_the_ring(drv: BlkDriver, engine: UringEngine) -> list[Slot]:
    """Submit DEPTH 4 KiB reads with one kick; return once all are in the io_uring."""
    slots = [drv.submit(ReqType.IN, i * 8, 4096, kick=False) for i in range(DEPTH)]
    drv.kick()
    deadline = time.monotonic() + 30  # a hang guard, not a timing
    while engine.in_ring < DEPTH:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return slots


@pytest.mark.timeout(90)
def test_depth_32_writes_flush_reads_through_the_ring(tmp_path: Path, img: Path,
                                                      serve: Served) -> None:
    store = RingStore(str(img))
    engine = UringEngine()
    device = BlkDevice(store, queue_size=256, engine=engine)
    sock = serve_device(serve, device, tmp_path / "u.sock")
    blocks = {i * 24 + 8: os.urandom(8192) for i in range(32)}  # sector -> 8 KiB, distinct
    try:
        with BlkDriver.connect(sock, timeout=30) as drv:
            write_flush_read_back(drv, blocks)
    finally:
        store.close()
    assert (engine.in_ring, engine.run_here) == (32 + 1 + 32, 0)
    assert engine.in_flight == 0
    assert device.stats.latency.count == 65
    image = img.read_bytes()
    for s, data in blocks.items():
        assert image[s * 512:s * 512 + len(data)] == data


@pytest.mark.timeout(90)
def test_reads_wait_in_the_kernel_side_by_side(tmp_path: Path, img: Path,
                                               serve: Served) -> None:
    store = PipeStore(str(img))
    engine = UringEngine()
    device = BlkDevice(store, queue_size=256, engine=engine)
    sock = serve_device(serve, device, tmp_path / "p.sock")
    chunks = [bytes([0x41 + i]) * 4096 for i in range(DEPTH)]
    try:
        with BlkDriver.connect(sock, timeout=30) as drv:
            slots = reads_held_in_the_ring(drv, engine)
            # All eight are in the kernel at once; none can finish without data.
            assert engine.in_flight == DEPTH and drv.poll(0) == []
            got = []
            for chunk in chunks:
                os.write(store.writer, chunk)  # one pipe buffer: one read takes all of it
                got += drv.reap(0, timeout=30)
            assert len(got) == DEPTH and {s.index for s in got} == {s.index for s in slots}
            for slot in got:
                assert slot.status == Status.OK
            assert sorted(bytes(s.payload()) for s in got) == chunks
    finally:
        store.close()
    assert engine.run_here == 0


@pytest.mark.timeout(90)
def test_short_reads_and_refused_writes_answer_ioerr(tmp_path: Path, img: Path,
                                                     serve: Served) -> None:
    store = RingStore(str(img))
    engine = UringEngine()
    device = BlkDevice(store, queue_size=256, engine=engine)
    sock = serve_device(serve, device, tmp_path / "e.sock")
    image = img.read_bytes()
    half = SIZE // 2
    os.truncate(img, half)  # the file shrinks under the device: its capacity says 4 MiB
    try:
        with BlkDriver.connect(sock, timeout=30) as drv:
            cases = [(0, Status.OK), ((half - 4096) // 512, Status.OK),
                     ((half - 2048) // 512, Status.IOERR),   # half of it past the end
                     (half // 512 + 8, Status.IOERR)]         # all of it past the end
            slots = [drv.submit(ReqType.IN, s, 4096, kick=False) for s, _ in cases]
            drv.kick()
            for (sector, want), slot in zip(cases, slots, strict=True):
                assert drv.wait(slot).status == want, sector
                if want == Status.OK:
                    assert bytes(slot.payload()) == image[sector * 512:sector * 512 + 4096]
                drv.release(slot)
            # Writes on a descriptor opened read-only: EBADF from the kernel.
            ro = os.open(img, os.O_RDONLY)
            os.dup2(ro, store.fd)
            os.close(ro)
            slots = [drv.submit(ReqType.OUT, i * 8, data=b"x" * 4096, kick=False)
                     for i in range(4)]
            drv.kick()
            for slot in slots:
                assert drv.wait(slot).status == Status.IOERR
                drv.release(slot)
    finally:
        store.close()
    assert engine.run_here == 0 and engine.in_ring == 8
    assert img.read_bytes() == image[:half]


@pytest.mark.timeout(90)
def test_short_write_is_finished_or_fails(tmp_path: Path, img: Path, serve: Served) -> None:
    """A write that the kernel takes in part is submitted again for the rest.

    RLIMIT_FSIZE makes the kernel write only up to the limit (a short write)
    and refuse the rest with EFBIG: the rest is submitted, fails, and the
    request answers IOERR; a write below the limit is unaffected.
    """
    store = RingStore(str(img))
    engine = UringEngine()
    device = BlkDevice(store, queue_size=256, engine=engine)
    sock = serve_device(serve, device, tmp_path / "w.sock")
    limit = SIZE - 2048
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a dead process
    try:
        with BlkDriver.connect(sock, timeout=30) as drv:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
            try:
                crossing = drv.submit(ReqType.OUT, (SIZE - 4096) // 512, data=b"s" * 4096)
                below = drv.submit(ReqType.OUT, 0, data=b"b" * 4096)
                statuses = [drv.wait(crossing).status, drv.wait(below).status]
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            assert statuses == [Status.IOERR, Status.OK]
    finally:
        signal.signal(signal.SIGXFSZ, old_handler)
        store.close()
    assert engine.in_ring == 3 and engine.run_here == 0  # the crossing write went in twice
    raw = img.read_bytes()
    assert raw[:4096] == b"b" * 4096
    assert raw[SIZE - 4096:limit] == b"s" * 2048  # what the kernel took of it


@pytest.mark.timeout(90)
def test_stopping_a_ring_answers_what_is_in_the_kernel(tmp_path: Path, img: Path,
                                                       serve: Served) -> None:
    """GET_VRING_BASE while reads wait in io_uring: all are answered before the reply
    (its last_avail_idx counts them as taken; vhost-user.rst "Ring states")."""
    store = PipeStore(str(img))
    engine = UringEngine()
    device = BlkDevice(store, queue_size=256, engine=engine)
    sock = serve_device(serve, device, tmp_path / "s.sock")
    chunk = b"\x5a" * 4096 * DEPTH
    try:
        with BlkDriver.connect(sock, timeout=30) as drv:
            slots = reads_held_in_the_ring(drv, engine)
            assert drv.frontend is not None
            # The data arrives only once the stop is on its way: the loop drains meanwhile.
            feeder = threading.Timer(0.2, os.write, (store.writer, chunk))
            feeder.start()
            assert drv.frontend.stop_queue(0) == DEPTH
            feeder.join()
            done = drv.poll(0)  # no waiting: the used ring holds them already
            assert sorted(s.index for s in done) == sorted(s.index for s in slots)
            for slot in slots:
                assert slot.status == Status.OK and bytes(slot.payload()) == b"\x5a" * 4096
    finally:
        store.close()
    assert engine.in_flight == 0


@pytest.mark.timeout(90)
def test_program_io_uring_cache_none(direct_dir: Path) -> None:  # noqa: F811 - the fixture
    img = direct_dir / "uring.img"
    img.write_bytes(os.urandom(SIZE))
    sock = direct_dir / "uring.sock"
    proc = start_pyvirtio_blk(img, sock, "--aio", "io_uring", "--cache", "none")
    blocks = {i * 16: os.urandom(8192) for i in range(32)}
    try:
        with BlkDriver.connect(str(sock), timeout=30) as drv:
            write_flush_read_back(drv, blocks)
            assert drv.get_id() == "pyvirtio-blk"  # not a ring request: run on the loop
    finally:
        assert stop(proc) == 0
    log = sock.with_suffix(".log").read_text()
    assert "io_uring engine: 65 requests went through the ring, 1 ran on the loop" in log, log
    image = img.read_bytes()
    for s, data in blocks.items():
        assert image[s * 512:s * 512 + len(data)] == data


STAND_INS = {
    "missing": "raise ImportError('No module named liburing')\n",
    "refused": ("def __getattr__(name):\n    return lambda *args: None\n"
                "def io_uring_queue_init(entries, ring, flags):\n"
                "    raise PermissionError(1, 'Operation not permitted')\n"),
}


@pytest.mark.parametrize("case", sorted(STAND_INS))
def test_unavailable_io_uring_is_a_one_line_start_up_error(tmp_path: Path, case: str) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "liburing.py").write_text(STAND_INS[case])
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(fake), *filter(None, [os.environ.get("PYTHONPATH")])]))
    res = subprocess.run([sys.executable, "-m", "pyvirtio.cli.blk", "--socket-path",
                          str(tmp_path / "x.sock"), "--blk-file", str(img), "--aio", "io_uring"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    if case == "missing":
        assert "pip install 'pyvirtio[uring]'" in res.stderr
    else:
        assert "refuses io_uring" in res.stderr and "--aio threads" in res.stderr
    assert not (tmp_path / "x.sock").exists()


# Eight dd's at once, 64 KiB O_DIRECT requests: many in flight on the io_uring.
GUEST_BYTES = 256 << 10
GUEST_PARALLEL = f"""
for i in 0 1 2 3 4 5 6 7; do yes "URING-$i" | head -c {GUEST_BYTES} > /tmp/p$i; done
for i in 0 1 2 3 4 5 6 7; do
  dd if=/tmp/p$i of=/dev/vda bs=65536 seek=$((i * 16 + 64)) count=4 oflag=direct 2>/dev/null &
done
wait
sync
for i in 0 1 2 3 4 5 6 7; do
  dd if=/dev/vda of=/tmp/r$i bs=65536 skip=$((i * 16 + 64)) count=4 iflag=direct 2>/dev/null &
done
wait
for i in 0 1 2 3 4 5 6 7; do cmp /tmp/p$i /tmp/r$i || exit 1; done
echo URING-OK
"""


@pytest.mark.timeout(300)
def test_linux_guest_on_io_uring(initramfs: Path, tmp_path: Path,  # noqa: F811 - fixture
                                 direct_dir: Path) -> None:  # noqa: F811 - the fixture
    disk = direct_dir / "guest.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    sock = direct_dir / "guest.sock"
    proc = start_pyvirtio_blk(disk, sock, "--aio", "io_uring", "--cache", "none")
    try:
        rc, out = boot(initramfs, sock, GUEST_PARALLEL)
    finally:
        assert stop(proc, timeout=10) == 0, sock.with_suffix(".log").read_text()
    assert rc == 0 and "URING-OK" in out, out[-3000:]
    # The guest's requests went through the ring (its data buffers are page aligned).
    log = sock.with_suffix(".log").read_text()
    found = re.search(r"io_uring engine: (\d+) requests went through the ring", log)
    assert found is not None and int(found[1]) >= 8 * 4 * 2, log
    raw = disk.read_bytes()
    for i in range(8):
        off = (i * 16 + 64) * 65536
        assert raw[off:off + GUEST_BYTES] == pattern(f"URING-{i}", GUEST_BYTES), i
