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
* a range past the end of the disk answers ``VIRTIO_BLK_S_IOERR``;
* ``direct=True`` is QEMU's ``cache=none``: the image is opened
  ``O_DIRECT``, bypassing the page cache.  O_DIRECT wants the buffer
  address, the length and the file offset aligned to the device's logical
  block size (open(2), "O_DIRECT"); a guest may hand any buffer, so a
  request whose memory is not aligned goes through an aligned bounce buffer,
  and one whose offset or length is not aligned through a second,
  buffered descriptor — never an I/O error the guest did not cause.  A file
  system that refuses O_DIRECT (ramfs; tmpfs before Linux 6.6) is a start-up error
  (:class:`DirectIOUnsupported`);
* :meth:`FileStore.try_read` / :meth:`FileStore.try_write` are the
  asynchronous engine's fast path: ``preadv2``/``pwritev2`` with
  ``RWF_NOWAIT`` answer at once what the page cache holds and say "would
  block" for the rest, which the engine then hands to a worker;
* :class:`SlowFileStore` is the same file answering like a slow disk (every
  read and write takes ``latency`` seconds in a worker): ``pyvirtio-blk
  --blk-file --aio threads --latency-us N``, so requests really are in flight
  when a test kills the back end.

Every method returns a :class:`Status`; host I/O errors never propagate as
exceptions into the device loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import time

from pyvirtio.devices.blk.spec import SECTOR_SHIFT, SECTOR_SIZE, Status

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = bytes(1 << 20)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
#: What a NOWAIT attempt answers when the data is not at hand (try a worker).
WOULD_BLOCK = -1


class DirectIOUnsupported(OSError):
    """The file system refuses O_DIRECT (``--cache none``)."""


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

    #: A real file takes the time it takes (the null store simulates one).
    latency = 0.0

    def __init__(self, path: str, read_only: bool = False, *, direct: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.direct = direct
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        #: The buffered descriptor: the only one without ``direct``, the fallback with it.
        self.buffered_fd = self.fd
        size = os.lseek(self.fd, 0, os.SEEK_END)  # works for block devices too
        self.size = size
        self.capacity = size >> SECTOR_SHIFT
        self.can_punch = _fallocate is not None and not read_only
        #: O_DIRECT alignment (address, length, offset); 1 without ``direct``.
        self.align = 1
        #: RWF_NOWAIT works for writes on this file (the page cache takes them at once).
        self.nowait_writes = bool(_RWF_NOWAIT) and not direct
        self._closed = False
        if direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT)
                self.align = self._probe_alignment()
            except OSError as exc:
                os.close(self.buffered_fd)
                if self.fd != self.buffered_fd:
                    os.close(self.fd)
                raise DirectIOUnsupported(
                    exc.errno or errno.EINVAL,
                    f"the file system of {path} refuses O_DIRECT (--cache none) "
                    f"({exc.strerror}); use --cache writeback or another file system") from None

    def _probe_alignment(self) -> int:
        """The smallest O_DIRECT alignment the file accepts: 512 or 4096 bytes.

        Reads one aligned block at offset 0 (an empty file reads 0 bytes, which
        still proves the alignment).
        """
        buf = mmap.mmap(-1, 4096)  # page aligned
        try:
            for align in (512, 4096):
                try:
                    os.preadv(self.fd, [memoryview(buf)[:align]], 0)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL or align == 4096:
                        raise
            raise AssertionError("unreachable")
        finally:
            buf.close()

    # ------------------------------------------------------------------ data
    def read(self, sector: int, views: list[memoryview],
             total: int | None = None) -> tuple[Status, int]:
        """Fill ``views`` (``total`` bytes, if the caller knows) from ``sector``.

        Returns (status, bytes read).
        """
        if self.direct:
            return self._read_direct(sector, views)
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
        fd = self.fd
        bounce: mmap.mmap | None = None
        if self.direct:
            fd, bounce = self._direct_path(offset, views, total)
            if bounce is not None:
                pos = 0
                for v in views:
                    bounce[pos:pos + len(v)] = v
                    pos += len(v)
                views = [memoryview(bounce)[:total]]
        try:
            n = os.pwritev(fd, views, offset)
            while n < total:  # short writes are legal; finish them
                done = n
                rest = _skip(views, done)
                n = done + os.pwritev(fd, rest, offset + done)
        except OSError as exc:
            log.warning("%s: write at sector %d failed: %s", self.path, sector, exc)
            return Status.IOERR
        finally:
            if bounce is not None:
                views.clear()  # the view into the bounce buffer must go before it closes
                bounce.close()
        return Status.OK

    # ------------------------------------------------- the engine's fast path
    def try_read(self, sector: int, views: list[memoryview], total: int) -> int:
        """Read from the page cache without blocking: bytes read, or WOULD_BLOCK.

        A short read is reported as WOULD_BLOCK too: the worker reads it all again.
        With O_DIRECT there is no page cache to answer from, and RWF_NOWAIT would
        still wait for the device: always the worker.
        """
        if self.direct:
            return WOULD_BLOCK
        try:
            n = os.preadv(self.fd, views, sector << SECTOR_SHIFT, _RWF_NOWAIT)
        except OSError:
            return WOULD_BLOCK  # EAGAIN, or an error the worker will meet and report
        return n if n == total else WOULD_BLOCK

    def try_write(self, sector: int, views: list[memoryview], total: int) -> int:
        """Write into the page cache without blocking: bytes written, or WOULD_BLOCK.

        What a short write wrote is written again by the worker, with the same
        bytes: the request is simply not complete yet, and until it is the driver
        may not rely on what overlapping requests in flight leave behind.
        """
        if not self.nowait_writes or self.read_only:
            return WOULD_BLOCK
        try:
            n = os.pwritev(self.fd, views, sector << SECTOR_SHIFT, _RWF_NOWAIT)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                self.nowait_writes = False  # the file system cannot: do not try again
            return WOULD_BLOCK
        return n if n == total else WOULD_BLOCK

    # ------------------------------------------------------------- O_DIRECT
    def _direct_path(self, offset: int, views: list[memoryview],
                     total: int) -> tuple[int, mmap.mmap | None]:
        """(fd, bounce buffer or None) for an O_DIRECT request on ``views``."""
        mask = self.align - 1
        if offset & mask or total & mask:
            return self.buffered_fd, None  # the range itself is unaligned: the page cache
        for v in views:
            if len(v) & mask or _address(v) & mask:
                # Page-aligned anonymous memory, rounded up to whole pages.
                return self.fd, mmap.mmap(-1, (total + mmap.PAGESIZE - 1) & -mmap.PAGESIZE)
        return self.fd, None

    def _read_direct(self, sector: int, views: list[memoryview]) -> tuple[Status, int]:
        offset = sector << SECTOR_SHIFT
        total = sum(len(v) for v in views)
        fd, bounce = self._direct_path(offset, views, total)
        target = views if bounce is None else [memoryview(bounce)[:total]]
        try:
            n = os.preadv(fd, target, offset)
            if n < total:
                return Status.IOERR, 0
            if bounce is not None:
                pos = 0
                for v in views:
                    v[:] = target[0][pos:pos + len(v)]
                    pos += len(v)
        except OSError as exc:
            log.warning("%s: read at sector %d failed: %s", self.path, sector, exc)
            return Status.IOERR, 0
        finally:
            if bounce is not None:
                target.clear()
                bounce.close()
        return Status.OK, total

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
                chunk = memoryview(_ZERO_CHUNK)[:min(length, len(_ZERO_CHUNK))]
                n = os.pwrite(self.buffered_fd, chunk, offset)
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
            if self.buffered_fd != self.fd:
                os.close(self.buffered_fd)

    def __enter__(self) -> FileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlowFileStore(FileStore):
    """A :class:`FileStore` whose reads and writes each take ``latency`` seconds.

    The wait happens in the asynchronous engine's worker, as on a slow disk
    (the engine keeps many in flight); nothing is answered from the page cache
    on the loop.  For tests and demonstrations of requests in flight.
    """

    def __init__(self, path: str, latency: float, read_only: bool = False, *,
                 direct: bool = False) -> None:
        super().__init__(path, read_only, direct=direct)
        self.latency = latency

    def read(self, sector: int, views: list[memoryview],
             total: int | None = None) -> tuple[Status, int]:
        time.sleep(self.latency)
        return super().read(sector, views, total)

    def write(self, sector: int, views: list[memoryview], total: int | None = None) -> Status:
        time.sleep(self.latency)
        return super().write(sector, views, total)

    def try_read(self, sector: int, views: list[memoryview], total: int) -> int:
        return WOULD_BLOCK

    def try_write(self, sector: int, views: list[memoryview], total: int) -> int:
        return WOULD_BLOCK


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (the buffer protocol, part of the stable ABI since 3.11)."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address(view: memoryview) -> int:
    """The address of ``view``'s first byte.

    Through the buffer protocol rather than ``ctypes.c_char.from_buffer``,
    which refuses read-only views: an OUT request's data (device-readable
    guest memory) is read-only, and its address decides whether O_DIRECT
    can take it without a bounce buffer.
    """
    buf = _PyBuffer()
    _get_buffer(view, ctypes.byref(buf), 0)  # PyBUF_SIMPLE; raises if it fails
    try:
        return buf.buf or 0
    finally:
        _release_buffer(ctypes.byref(buf))


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
