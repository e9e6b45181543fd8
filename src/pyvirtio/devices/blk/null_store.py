"""A disk that stores nothing, with a fixed latency: for measuring a back end, not data.

The counterpart of qemu-storage-daemon's ``null-co`` block driver with
``latency-ns`` (QEMU block/null.c): reads return zeros (``read-zeroes=on``),
writes, flushes, discards and write-zeroes succeed and change nothing, and
every request takes ``latency`` seconds.  On the synchronous engine the
latency blocks the event loop, as a slow disk read in the loop would; on the
asynchronous engine the request is answered at once and its completion held
back on a timer of the loop (:class:`~pyvirtio.devices.blk.delay.DelayLine`),
as null-co does, so requests overlap as they do on a real device with a
queue.  Same interface as :class:`~pyvirtio.devices.blk.file_store.FileStore`.
"""

from __future__ import annotations

import time

from pyvirtio.devices.blk.spec import SECTOR_SHIFT, Status

_ZEROS = bytes(1 << 16)
_ZEROS_VIEW = memoryview(_ZEROS)  # slices of a view copy nothing


class NullStore:
    """``size`` bytes of zeros that take ``latency`` seconds per request."""

    read_only = False
    direct = False
    can_punch = False
    nowait_writes = False

    def __init__(self, size: int, latency: float = 0.0) -> None:
        if size < 512:
            raise ValueError(f"a null disk of {size} bytes is smaller than one sector")
        if latency < 0:
            raise ValueError(f"latency {latency} is negative")
        self.size = size
        self.capacity = size >> SECTOR_SHIFT
        self.latency = latency
        self.path = f"null-co({size} bytes, {latency * 1e6:g} us)"

    def _wait(self) -> None:
        if self.latency:
            time.sleep(self.latency)

    def read(self, sector: int, views: list[memoryview],
             total: int | None = None) -> tuple[Status, int]:
        n = 0
        for v in views:
            length = len(v)
            pos = 0
            while pos < length:
                step = min(length - pos, len(_ZEROS))
                v[pos:pos + step] = _ZEROS[:step]
                pos += step
            n += length
        self._wait()
        return Status.OK, n

    def write(self, sector: int, views: list[memoryview], total: int | None = None) -> Status:
        self._wait()
        return Status.OK

    def try_read(self, sector: int, views: list[memoryview], total: int) -> int:
        # Answered at once; the device holds the completion back for the latency.
        n = 0
        for v in views:
            length = len(v)
            v[:] = _ZEROS_VIEW[:length] if length <= len(_ZEROS) else bytes(length)
            n += length
        return n

    def try_write(self, sector: int, views: list[memoryview], total: int) -> int:
        return total

    def flush(self) -> Status:
        self._wait()
        return Status.OK

    def discard(self, sector: int, num_sectors: int) -> Status:
        self._wait()
        return Status.OK

    def write_zeroes(self, sector: int, num_sectors: int, unmap: bool) -> Status:
        self._wait()
        return Status.OK

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> NullStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
