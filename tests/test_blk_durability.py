"""What a completed FLUSH guarantees, and read-only images failing closed (VIRTIO 1.2 §5.2.6.2).

* many writes in flight on the thread or io_uring engine, a FLUSH, and the
  back end is SIGKILLed the moment the flush completes: every write
  completed before the flush is in the image (the FLUSH ran ``fdatasync``
  after them, see devices/blk/device.py and uring_engine.py), with the page
  cache and with O_DIRECT;
* an image the back end may not write (immutable, ``chattr +i``: root
  ignores permission bits) is refused at start-up with a one-line error
  naming ``--read-only``; with ``--read-only`` it is served, writes, discards
  and write-zeroes answer IOERR, and the image is unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blk_peers import start_pyvirtio_blk, stop
from pyvirtio.devices.blk.driver import BlkDriver, BlkIOError
from pyvirtio.devices.blk.spec import ReqType, Status

SIZE = 8 << 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cache", ["writeback", "none"])
@pytest.mark.parametrize("aio", ["threads", "io_uring"])
def test_sigkill_right_after_flush_loses_nothing(tmp_path: Path, cache: str, aio: str) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(SIZE))
    sock = tmp_path / "blk.sock"
    proc = start_pyvirtio_blk(img, sock, "--aio", aio, "--cache", cache)
    blocks = {i * 40 + (i % 3): os.urandom(4096 * (1 + i % 4)) for i in range(48)}
    try:
        with BlkDriver.connect(str(sock), timeout=30) as drv:
            slots = [drv.submit(ReqType.OUT, s, data=d, kick=False) for s, d in blocks.items()]
            drv.kick()
            for slot in slots:
                assert drv.wait(slot).status == Status.OK
                drv.release(slot)
            drv.flush()
            proc.send_signal(signal.SIGKILL)  # no clean shutdown after the flush
            proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    image = img.read_bytes()
    for s, data in blocks.items():
        assert image[s * 512:s * 512 + len(data)] == data, f"sector {s}"


@pytest.fixture
def immutable_img(tmp_path: Path) -> Iterator[Path]:
    img = tmp_path / "ro.img"
    img.write_bytes(os.urandom(SIZE))
    subprocess.run(["chattr", "+i", str(img)], check=True, timeout=30)
    yield img
    subprocess.run(["chattr", "-i", str(img)], check=True, timeout=30)


def test_unwritable_image_is_refused_without_read_only(tmp_path: Path,
                                                       immutable_img: Path) -> None:
    with pytest.raises(PermissionError):
        open(immutable_img, "r+b")  # noqa: SIM115 - the premise: even root may not write it
    res = subprocess.run([sys.executable, "-m", "pyvirtio.cli.blk", "--socket-path",
                          str(tmp_path / "x.sock"), "--blk-file", str(immutable_img)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "--read-only" in res.stderr
    assert not (tmp_path / "x.sock").exists()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("aio", ["threads", "io_uring", "sync"])
def test_read_only_fails_closed(tmp_path: Path, immutable_img: Path, aio: str) -> None:
    before = immutable_img.read_bytes()
    sock = tmp_path / "ro.sock"
    proc = start_pyvirtio_blk(immutable_img, sock, "--read-only", "--aio", aio)
    try:
        with BlkDriver.connect(str(sock), timeout=30) as drv:
            assert drv.read_only
            slots = [drv.submit(ReqType.OUT, i * 8, data=b"w" * 4096, kick=False)
                     for i in range(16)]
            drv.kick()
            for slot in slots:
                assert drv.wait(slot).status == Status.IOERR
                drv.release(slot)
            ops: list[Callable[[], None]] = [lambda: drv.discard(0, 4096),
                                             lambda: drv.write_zeroes(0, 4096)]
            for op in ops:
                with pytest.raises(BlkIOError) as err:
                    op()
                assert err.value.status in (Status.IOERR, Status.UNSUPP)
            drv.flush()  # nothing volatile: succeeds
            assert drv.read(0, 8192) == before[:8192]
    finally:
        assert stop(proc) == 0
    assert immutable_img.read_bytes() == before


@pytest.mark.timeout(90)
def test_restart_after_sigkill_takes_the_stale_socket_over(tmp_path: Path) -> None:
    """The socket file a killed back end leaves is replaced; a live back end's is not."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(SIZE))
    sock = tmp_path / "blk.sock"
    data = os.urandom(65536)
    proc = start_pyvirtio_blk(img, sock)
    with BlkDriver.connect(str(sock), timeout=30) as drv:
        drv.write(4096, data)
        drv.flush()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert sock.exists()  # nobody removed it
    log = tmp_path / "again.log"
    again = start_pyvirtio_blk(img, sock, log=log)  # the socket file is there already:
    while "serving" not in log.read_text():          # wait for the takeover itself
        assert again.poll() is None, log.read_text()
        time.sleep(0.05)
    try:
        live = subprocess.run([sys.executable, "-m", "pyvirtio.cli.blk", "--socket-path",
                               str(sock), "--blk-file", str(img)],
                              capture_output=True, text=True, timeout=60)
        assert live.returncode == 1 and "another process listens" in live.stderr
        with BlkDriver.connect(str(sock), timeout=30) as drv:
            assert drv.read(4096, len(data)) == data
    finally:
        assert stop(again) == 0
