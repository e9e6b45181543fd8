"""BlkDriver's blocking API: byte offsets like os.pread/os.pwrite, whole sectors only.

VIRTIO 1.2 §5.2.6: a request addresses the disk in 512-byte sectors; the
blocking API takes byte offsets and lengths and converts them, refusing
values that are not whole sectors before anything reaches the device.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blk_loop_harness import make_loop
from pyvirtio.core.errors import CallerError
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.devices.blk.driver import BlkDriver
from pyvirtio.devices.blk.file_store import FileStore

SIZE = 1 << 20


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


def loop(img: Path) -> BlkDriver:
    return make_loop(BlkDevice(FileStore(str(img))), max_io=8192)[0]


def test_offsets_are_bytes_like_pread_and_pwrite(img: Path) -> None:
    drv = loop(img)
    original = img.read_bytes()
    assert drv.read(4096, 1024) == original[4096:5120] == os.pread(
        os.open(img, os.O_RDONLY | os.O_CLOEXEC), 1024, 4096)
    data = os.urandom(20 * 1024)  # more than max_io: several requests, offsets advance in bytes
    drv.write(offset=512 * 3, data=data)
    drv.flush()
    assert img.read_bytes()[1536:1536 + len(data)] == data
    assert drv.read(offset=1536, nbytes=len(data)) == data


def test_discard_and_write_zeroes_take_byte_ranges(img: Path) -> None:
    drv = loop(img)
    before = img.read_bytes()
    drv.write_zeroes(8192, 4096)
    drv.write_zeroes(offset=65536, nbytes=1024, unmap=True)
    drv.discard(offset=131072, nbytes=4096)
    after = img.read_bytes()
    assert after[8192:12288] == bytes(4096) and after[65536:66560] == bytes(1024)
    # Only the named ranges changed (discard may leave its range as it was).
    assert after[:8192] == before[:8192] and after[12288:65536] == before[12288:65536]
    assert after[66560:131072] == before[66560:131072]


@pytest.mark.parametrize(("call", "named"), [
    (lambda d: d.read(100, 512), "offset 100"),
    (lambda d: d.read(512, 100), "nbytes 100"),
    (lambda d: d.read(-512, 512), "offset -512"),
    (lambda d: d.write(513, b"x" * 512), "offset 513"),
    (lambda d: d.write(0, b"x" * 10), "nbytes 10"),
    (lambda d: d.discard(0, 511), "nbytes 511"),
    (lambda d: d.write_zeroes(7, 512), "offset 7"),
])
def test_values_that_are_not_whole_sectors_are_refused(img: Path, call: object,
                                                       named: str) -> None:
    drv = loop(img)
    before = img.read_bytes()
    assert callable(call)
    with pytest.raises(CallerError, match="multiple of 512") as e:
        call(drv)
    assert named in str(e.value)
    assert drv.kicks == 0  # refused before anything reached the device
    assert img.read_bytes() == before
