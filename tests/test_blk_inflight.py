"""Crash-safe restart of pyvirtio-blk: inflight tracking with real peers.

QEMU docs/interop/vhost-user.rst "Inflight I/O tracking".

``pyvirtio-blk --aio threads`` on a slow store (``--latency-us``: every
completion is held back, so dozens of requests are in flight) is killed with
SIGKILL at random moments, at least five times, and started again on the
same socket path and image.  The front end keeps the inflight buffer and
reconnects; the new back end resubmits what was in flight.  Every block is
written once with a pattern of its own and must read back right — through
the front end and in the image file afterwards.

The front ends: pyvirtio's own (``BlkDriver`` with ``inflight=True``,
``reconnect()``), and QEMU 7.2 with ``-chardev socket,...,reconnect=1`` and
``-device vhost-user-blk-pci`` under a Linux guest whose parallel O_DIRECT
dd's write and verify a pattern per pass until the host has killed the back
end ``KILLS`` times (one boot, TCG).
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest

from blk_peers import start_pyvirtio_blk, stop
from pyvirtio.core.errors import PeerError
from pyvirtio.core.split_driver import SplitDriverQueue
from pyvirtio.devices.blk.driver import BlkDriver
from pyvirtio.devices.blk.spec import ReqType, Status
from pyvirtio.transports.vhost_user.inflight import QueueRegion, queue_region_size
from qemu_guest import boot, build_initramfs, verify_passes_script, verify_pattern

BLOCK = 4096
DISK = 8 << 20
LATENCY_US = "20000"  # every write takes 20 ms in a worker: requests stay in flight
KILLS = 6
QD = 32
SEED = 11


def pattern(block: int) -> bytes:
    return struct.pack("<QQ", block, SEED * 1000003 + block) * (BLOCK // 16)


def _start(img: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    # Appends to one log across restarts, so the resubmissions can be counted.
    with log.open("ab") as f:
        f.write(b"--- start\n")
    proc = start_pyvirtio_blk(img, sock, "--aio", "threads", "--latency-us", LATENCY_US,
                              "--queue-size", "128", log=log.with_suffix(".part"))
    return proc


def _collect(log: Path) -> None:
    part = log.with_suffix(".part")
    if part.exists():
        with log.open("ab") as f:
            f.write(part.read_bytes())
        part.unlink()


def region_in_flight(drv: BlkDriver, wait: float = 0.0) -> int:
    """Heads marked in flight in the front end's inflight buffer (waits up to ``wait`` s
    for one)."""
    fe = drv.frontend
    assert fe is not None and fe.inflight is not None
    size = fe.inflight.queue_size
    deadline = time.monotonic() + wait
    while True:
        raw = os.pread(fe.inflight_fd, 16 + 16 * size, 0)
        n = sum(raw[16 + 16 * i] for i in range(size))
        if n or time.monotonic() >= deadline:
            return n
        time.sleep(0.001)


def due_for_resubmit(drv: BlkDriver) -> int:
    """What a back end started now will resubmit: recovery run on a private copy of the
    front end's buffer (MAP_PRIVATE: the shared one is left as it is)."""
    fe = drv.frontend
    assert fe is not None and fe.inflight is not None
    qs = fe.inflight.queue_size
    mm = mmap.mmap(fe.inflight_fd, fe.inflight.mmap_size, mmap.MAP_PRIVATE,
                   mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(mm)
    region = QueueRegion(view[:queue_region_size(qs)], qs)
    ring = drv.ports[0].queue
    assert isinstance(ring, SplitDriverQueue)
    try:
        return len(region.recover(int(ring.rings.used16[1])))
    finally:
        region.release()
        view.release()
        mm.close()


def _wait_for_line(path: Path, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.01)


def _reconnect(drv: BlkDriver) -> None:
    """Reconnect until it sticks (a kill may land in the middle of one)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            drv.reconnect(timeout=15)
            return
        except PeerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_own_frontend_survives_backend_sigkill(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(DISK))
    sock = tmp_path / "blk.sock"
    log = tmp_path / "blk.log"
    rng = random.Random(SEED)
    proc = _start(img, sock, log)
    blocks = list(range(DISK // BLOCK))
    rng.shuffle(blocks)
    # Kill points (completed writes); more than KILLS in case a kill finds nothing in flight.
    kill_at = sorted(rng.sample(range(QD, len(blocks) - QD), 3 * KILLS))
    kills = 0
    due: list[int] = []  # per kill: what the buffer says the next back end must resubmit
    drv = BlkDriver.connect(str(sock), queue_size=128, inflight=True, timeout=60)
    try:
        assert drv.frontend is not None and drv.frontend.inflight is not None
        pending: dict[int, int] = {}  # slot index -> block
        todo = list(blocks)
        done = 0
        while todo or pending:
            while todo and len(pending) < QD:
                b = todo.pop()
                slot = drv.submit(ReqType.OUT, b * (BLOCK // 512), data=pattern(b))
                pending[slot.index] = b
            if sum(n > 0 for n in due) < KILLS and kills < len(kill_at) and done >= kill_at[kills]:
                # Once the back end holds requests (its region says so), at a random
                # moment of the 20 ms they take.
                region_in_flight(drv, wait=5.0)
                time.sleep(rng.uniform(0, 0.010))
                proc.kill()
                proc.wait()
                due.append(due_for_resubmit(drv))
                _collect(log)
                kills += 1
                proc = _start(img, sock, log)
                _reconnect(drv)
                # Let the ring start (and log) before the next kill can land.
                _wait_for_line(log.with_suffix(".part"), "resubmitting")
            try:
                finished = drv.reap(timeout=2)
            except TimeoutError:
                if drv.frontend is not None and drv.frontend.backend_gone():
                    _reconnect(drv)
                continue
            for slot in finished:
                assert slot.status == Status.OK, f"block {pending[slot.index]}: {slot.status}"
                del pending[slot.index]
                drv.release(slot)
                done += 1
        assert sum(n > 0 for n in due) >= KILLS and done == len(blocks), due
        # Read everything back through the back end (the last one started), QD blocks at once.
        order = sorted(blocks)
        for i in range(0, len(order), QD):
            reads = {drv.submit(ReqType.IN, b * (BLOCK // 512), BLOCK).index: b
                     for b in order[i:i + QD]}
            while reads:
                for slot in drv.reap(timeout=10):
                    b = reads.pop(slot.index)
                    assert slot.status == Status.OK
                    assert bytes(slot.data[:BLOCK]) == pattern(b), f"block {b}"
                    drv.release(slot)
    finally:
        drv.close()
        stop(proc)
        _collect(log)
    text = log.read_text()
    resubmitted = [int(line.split("resubmitting ")[1].split()[0])
                   for line in text.splitlines() if "resubmitting" in line]
    # The first start had nothing to resubmit; each restart resubmitted exactly what
    # the buffer held in flight when its predecessor died.
    assert resubmitted == [0, *due], (due, text[-3000:])
    data = img.read_bytes()
    for b in blocks:
        assert data[b * BLOCK:(b + 1) * BLOCK] == pattern(b), f"image block {b}"


# ------------------------------------------------------------ a Linux guest
GUEST_DISK = 32 << 20
REGIONS = 16            # parallel dd's: as many requests in flight
REGION_BLOCKS = 48      # 4 KiB blocks each
STOP_BLOCK = GUEST_DISK // BLOCK - 1  # the host writes STOP here when it is done killing

GUEST_SCRIPT = verify_passes_script(REGIONS, REGION_BLOCKS, STOP_BLOCK)


def backend_in_flight(pid: int, queue_size: int = 128) -> int:
    """Requests the back end ``pid`` has marked in flight in queue 0's inflight region,
    read through its own fd of the buffer (the memfd it allocated for QEMU)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "pyvirtio-inflight" not in os.readlink(f"/proc/{pid}/fd/{fd}"):
                continue
            with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                raw = f.read(16 + 16 * queue_size)
        except OSError:
            continue
        return sum(raw[16 + 16 * i] for i in range(queue_size))
    return 0


def _wait_for_text(path: Path, text: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while path.read_text(errors="replace").count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_qemu_guest_survives_backend_sigkill(tmp_path: Path) -> None:
    """QEMU (-chardev socket,reconnect=1, vhost-user-blk-pci) and a Linux guest."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(GUEST_DISK))
    sock = tmp_path / "blk.sock"
    log = tmp_path / "blk.log"
    rng = random.Random(SEED + 1)
    initramfs = build_initramfs(tmp_path / "initramfs", ("virtio_pci", "virtio_blk"))
    proc = _start(img, sock, log)
    guest = boot(initramfs, GUEST_SCRIPT, timeout=200, qemu_args=[
        "-chardev", f"socket,id=blk0,path={sock},reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"])
    kills = 0
    try:
        guest.wait_for("PASS-DONE 1")
        _wait_for_text(log.with_suffix(".part"), "resubmitting", 1)
        while kills < KILLS:
            time.sleep(rng.uniform(0.2, 1.2))  # a random moment of the guest's I/O...
            deadline = time.monotonic() + 30
            while backend_in_flight(proc.pid) == 0:  # ...once requests are in flight
                assert time.monotonic() < deadline, "the guest stopped doing I/O"
                time.sleep(0.002)
            proc.kill()
            proc.wait()
            _collect(log)
            kills += 1
            proc = _start(img, sock, log)
            # QEMU reconnects (every second) and starts the ring again from the
            # buffer (logged); the next kill comes after that.
            _wait_for_text(log.with_suffix(".part"), "resubmitting", 1)
        with img.open("r+b") as f:  # the back end reads the file through the page cache too
            f.seek(STOP_BLOCK * BLOCK)
            f.write(b"STOP\n".ljust(BLOCK, b"\0"))
        guest.wait_for("ALL-OK")
        res = guest.finish()
    finally:
        guest.kill()
        stop(proc)
        _collect(log)
    assert res.rc == 0, res.log[-3000:]
    assert "BAD-" not in res.log, res.log[-3000:]
    passes = [int(line.split()[-1]) for line in res.log.splitlines() if "PASS-DONE" in line]
    last = passes[-1]
    assert passes == list(range(1, last + 1))
    data = img.read_bytes()
    for i in range(REGIONS):
        off = i * REGION_BLOCKS * BLOCK
        want = verify_pattern("", last, i, REGION_BLOCKS)
        assert data[off:off + REGION_BLOCKS * BLOCK] == want, f"region {i}"
    text = log.read_text()
    assert text.count("front end connected") == KILLS + 1, text[-3000:]
    # Per back-end process, the ring starts from the buffer: the first process's
    # (SeaBIOS, then Linux) had nothing to resubmit; requests were in flight at
    # every kill, so each restart resubmitted some (and none was lost: above).
    starts = [[int(line.split("resubmitting ")[1].split()[0])
               for line in part.splitlines() if "resubmitting" in line]
              for part in text.split("--- start")[1:]]
    assert len(starts) == KILLS + 1 and starts[0] and not any(starts[0]), starts
    assert all(len(s) == 1 and s[0] > 0 for s in starts[1:]), starts


def test_packed_ring_runs_untracked(tmp_path: Path) -> None:
    """Inflight tracking is split-only: on a packed ring GET_INFLIGHT_FD answers no
    buffer and the front end goes on without one (as QEMU does)."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    proc = start_pyvirtio_blk(img, sock, "--aio", "threads")
    try:
        with BlkDriver.connect(str(sock), queue_size=64, inflight=True, packed=True) as drv:
            assert drv.frontend is not None and drv.frontend.inflight is None
            drv.write(4096, pattern(1))
            assert drv.read(4096, BLOCK) == pattern(1)
    finally:
        assert stop(proc) == 0
