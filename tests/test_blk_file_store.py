"""The file back end of virtio-blk (VIRTIO 1.2 §5.2.6): preadv/pwritev, flush, holes."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from pyvirtio.devices.blk.file_store import WOULD_BLOCK, FileStore, SlowFileStore
from pyvirtio.devices.blk.spec import Status


def image(tmp_path: Path, size: int = 1 << 20, fill: bytes = b"\xab") -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(fill * size)
    return p


def test_capacity_in_sectors(tmp_path: Path) -> None:
    with FileStore(str(image(tmp_path, 5 * 512 + 100))) as be:
        assert be.capacity == 5 and be.size == 5 * 512 + 100


def test_scatter_read_and_gather_write(tmp_path: Path) -> None:
    p = image(tmp_path)
    with FileStore(str(p)) as be:
        a, b = memoryview(bytearray(512)), memoryview(bytearray(1024))
        assert be.write(3, [memoryview(b"1" * 512), memoryview(b"2" * 1024)]) == Status.OK
        assert be.read(3, [a, b]) == (Status.OK, 1536)
        assert bytes(a) == b"1" * 512 and bytes(b) == b"2" * 1024
        assert be.flush() == Status.OK
    raw = p.read_bytes()
    assert raw[3 * 512:4 * 512] == b"1" * 512 and raw[4 * 512:6 * 512] == b"2" * 1024
    assert raw[:3 * 512] == b"\xab" * 1536


def test_read_past_the_end_of_file_is_an_error(tmp_path: Path) -> None:
    with FileStore(str(image(tmp_path, 1024))) as be:
        assert be.read(1, [memoryview(bytearray(1024))])[0] == Status.IOERR


@pytest.mark.parametrize("punch", [True, False])
def test_discard_and_write_zeroes(tmp_path: Path, punch: bool) -> None:
    p = image(tmp_path, 64 * 1024)
    with FileStore(str(p)) as be:
        be.can_punch = be.can_punch and punch  # False: the pwrite fallback
        assert be.write_zeroes(8, 8, unmap=False) == Status.OK
        assert be.write_zeroes(32, 16, unmap=True) == Status.OK
        assert be.discard(96, 8) == Status.OK
    raw = p.read_bytes()
    assert raw[8 * 512:16 * 512] == bytes(4096)
    assert raw[32 * 512:48 * 512] == bytes(8192)
    assert raw[:8 * 512] == b"\xab" * 4096 and raw[16 * 512:32 * 512] == b"\xab" * 8192
    assert len(raw) == 64 * 1024  # KEEP_SIZE: punching never shrinks the disk


def test_read_only_never_opens_writable(tmp_path: Path) -> None:
    p = image(tmp_path)
    before = p.read_bytes()
    with FileStore(str(p), read_only=True) as be:
        assert fcntl.fcntl(be.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert be.write(0, [memoryview(b"z" * 512)]) == Status.IOERR
        assert be.write_zeroes(0, 8, unmap=True) == Status.IOERR
        assert be.discard(0, 8) == Status.IOERR
        assert be.flush() == Status.OK
        buf = memoryview(bytearray(512))
        assert be.read(0, [buf]) == (Status.OK, 512)
    assert p.read_bytes() == before


def test_slow_store_sends_everything_to_a_worker(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    with SlowFileStore(str(img), 0.001) as store:
        assert store.latency == 0.001
        data = memoryview(bytearray(b"s" * 4096))
        # Nothing from the page cache on the loop: the engine's workers take it all.
        assert store.try_write(8, [data], 4096) == WOULD_BLOCK
        assert store.try_read(8, [data], 4096) == WOULD_BLOCK
        assert store.write(8, [data]) == Status.OK
        back = memoryview(bytearray(4096))
        assert store.read(8, [back]) == (Status.OK, 4096)
        assert bytes(back) == b"s" * 4096
