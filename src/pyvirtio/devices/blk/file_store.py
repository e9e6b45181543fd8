"""A raw image file (or block device) as virtio-blk storage, VIRTIO 1.2 §5.2.6.

* reads and writes are ``os.preadv`` / ``os.pwritev`` straight between the
  file and the guest-memory views of the request: no copy in Python;
* FLUSH is ``os.fdatasync`` (§5.2.6.2: a completed flush makes every
  completed write stable);
* DISCARD punches a hole and WRITE_ZEROES uses ``FALLOC_FL_ZERO_RANGE`` (or
  ``PUNCH_HOLE`` when ``unmap`` is set), both through ``fallocate(2)`` called
  with ctypes, because ``os.posix_fallocate`` can only allocate.  When the
  file system refuses (``EOPNOTSUPP``), discard is simply skipped (it is
  advisory) and write-zeroes falls back to writing zeros with ``pwrite``;
* read-only mode opens the file ``O_RDONLY``, so nothing here can change it;
  a write then answers ``VIRTIO_BLK_S_IOERR`` (§5.2.6.2 "MUST NOT write any
  data");
* a range past the end of the disk answers ``VIRTIO_BLK_S_IOERR``.

Every method returns a :class:`Status`; host I/O errors never propagate as
exceptions into the device loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os

from pyvirtio.devices.blk.spec import SECTOR_SHIFT, SECTOR_SIZE, Status

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = bytes(1 << 20)


def _load_fallocate() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


class FileStore:
    """Block storage on a file descriptor; sizes in bytes, offsets in bytes."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        size = os.lseek(self.fd, 0, os.SEEK_END)  # works for block devices too
        self.size = size
        self.capacity = size >> SECTOR_SHIFT
        self.can_punch = _fallocate is not None and not read_only
        self._closed = False

    # ------------------------------------------------------------------ data
    def read(self, sector: int, views: list[memoryview],
             total: int | None = None) -> tuple[Status, int]:
        """Fill ``views`` (``total`` bytes, if the caller knows) from ``sector``.

        Returns (status, bytes read).
        """
        try:
            n = os.preadv(self.fd, views, sector << SECTOR_SHIFT)
        except OSError as exc:
            log.warning("%s: read at sector %d failed: %s", self.path, sector, exc)
            return Status.IOERR, 0
        if total is None:
            total = sum(len(v) for v in views)
        if n < total:
            # The file shrank under us: the rest of the buffer would be stale guest memory.
            return Status.IOERR, n
        return Status.OK, n

    def write(self, sector: int, views: list[memoryview], total: int | None = None) -> Status:
        if self.read_only:
            return Status.IOERR
        offset = sector << SECTOR_SHIFT
        if total is None:
            total = sum(len(v) for v in views)
        try:
            n = os.pwritev(self.fd, views, offset)
            while n < total:  # short writes are legal; finish them
                done = n
                rest = _skip(views, done)
                n = done + os.pwritev(self.fd, rest, offset + done)
        except OSError as exc:
            log.warning("%s: write at sector %d failed: %s", self.path, sector, exc)
            return Status.IOERR
        return Status.OK

    def flush(self) -> Status:
        if self.read_only:
            return Status.OK  # nothing volatile can exist
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            log.warning("%s: fdatasync failed: %s", self.path, exc)
            return Status.IOERR
        return Status.OK

    # --------------------------------------------------------- deallocation
    def discard(self, sector: int, num_sectors: int) -> Status:
        if self.read_only:
            return Status.IOERR
        if not num_sectors or not self.can_punch:
            return Status.OK
        err = self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, sector, num_sectors)
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            self.can_punch = False  # discard is only a hint (§5.2.6.2 "MAY deallocate")
            return Status.OK
        return Status.OK if err == 0 else Status.IOERR

    def write_zeroes(self, sector: int, num_sectors: int, unmap: bool) -> Status:
        if self.read_only:
            return Status.IOERR
        if not num_sectors:
            return Status.OK
        if self.can_punch:
            mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) if unmap else FALLOC_FL_ZERO_RANGE
            if self._fallocate(mode, sector, num_sectors) == 0:
                return Status.OK
        return self._write_zero_bytes(sector << SECTOR_SHIFT, num_sectors << SECTOR_SHIFT)

    def _fallocate(self, mode: int, sector: int, num_sectors: int) -> int:
        assert _fallocate is not None
        rc = _fallocate(self.fd, mode, sector * SECTOR_SIZE, num_sectors * SECTOR_SIZE)
        return 0 if rc == 0 else ctypes.get_errno()

    def _write_zero_bytes(self, offset: int, length: int) -> Status:
        try:
            while length:
                n = os.pwrite(self.fd, memoryview(_ZERO_CHUNK)[:min(length, len(_ZERO_CHUNK))],
                              offset)
                offset += n
                length -= n
        except OSError as exc:
            log.warning("%s: writing zeros failed: %s", self.path, exc)
            return Status.IOERR
        return Status.OK

    # ------------------------------------------------------------------ misc
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> FileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    out: list[memoryview] = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out
