"""Guest memory: regions of shared memory and address translation.

A region is a guest-physical range backed by a ``mmap`` (usually of a memfd,
so another process — QEMU, a vhost-user back end — can map the same pages).
Translation of (address, length) gives a writable ``memoryview`` into the
mapping without copying.  A range that leaves every region, or runs from one
region into the next, is refused with :class:`PeerError`: addresses come from
the other side and are hostile (docs/architecture.md).  Regions also carry the front
end's user address (vhost-user's ``userspace_addr``), since vhost-user rings
are given as user addresses while descriptors hold guest addresses
(QEMU docs/interop/vhost-user.rst, "Memory region description").
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import stat

from mypy_extensions import mypyc_attr

from pyvirtio.core.errors import CallerError, PeerError

_U64 = 1 << 64


@mypyc_attr(allow_interpreted_subclasses=True)
class Region:
    """One guest-physical range [gpa, gpa + size) mapped at ``view``.

    ``owner`` keeps the mapping alive; ``owns_fd`` says whether
    GuestMemory.close() closes ``fd`` (true for memory it created).
    """

    # A plain class rather than a dataclass: mypyc compiles this form into a
    # native class whose fields the hot paths read directly (see setup.py).
    __slots__ = ("fd", "gpa", "mmap_offset", "owner", "owns_fd", "size", "uaddr", "view")

    def __init__(self, gpa: int, size: int, view: memoryview, uaddr: int = 0, fd: int = -1,
                 mmap_offset: int = 0, owner: object = None, owns_fd: bool = False) -> None:
        self.gpa = gpa
        self.size = size
        self.view = view
        self.uaddr = uaddr
        self.fd = fd
        self.mmap_offset = mmap_offset
        self.owner = owner
        self.owns_fd = owns_fd

    def __repr__(self) -> str:
        return (f"Region(gpa={self.gpa:#x}, size={self.size:#x}, uaddr={self.uaddr:#x}, "
                f"fd={self.fd}, mmap_offset={self.mmap_offset:#x})")

    @property
    def end(self) -> int:
        return self.gpa + self.size


@mypyc_attr(allow_interpreted_subclasses=True)
class GuestMemory:
    """A set of non-overlapping regions with translation from guest and user addresses."""

    def __init__(self, regions: list[Region] | None = None) -> None:
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self._ustarts: list[tuple[int, Region]] = []
        #: The region when there is exactly one, else None: the common case,
        #: which the rings' per-request fast paths read without a call.
        self.sole_region: Region | None = None
        for r in regions or []:
            self.add_region(r)

    # ----------------------------------------------------------------- building
    @classmethod
    def anonymous(cls, size: int, gpa: int = 0, name: str = "pyvirtio-guest") -> GuestMemory:
        """One memfd-backed region of ``size`` bytes at ``gpa`` (shareable by fd)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        region = Region(gpa=gpa, size=size, view=memoryview(mm), uaddr=gpa, fd=fd, owner=mm,
                        owns_fd=True)
        return cls([region])

    @classmethod
    def from_fd(cls, fd: int, size: int, gpa: int = 0, offset: int = 0,
                uaddr: int | None = None) -> GuestMemory:
        """Map ``size`` bytes of ``fd`` from ``offset`` as one region at ``gpa``."""
        mem = cls()
        mem.map_fd(fd, size, gpa, offset, gpa if uaddr is None else uaddr)
        return mem

    def map_fd(self, fd: int, size: int, gpa: int, offset: int, uaddr: int) -> Region:
        """Map a region from a file descriptor (the fd is not closed)."""
        if size <= 0:
            raise PeerError(f"memory region at {gpa:#x} has size {size}")
        if gpa < 0 or gpa + size > _U64 or uaddr < 0 or uaddr + size > _U64:
            raise PeerError(f"memory region gpa={gpa:#x} uaddr={uaddr:#x} size={size:#x} "
                            f"is negative or wraps 2^64")
        if offset < 0:
            raise PeerError(f"memory region mmap_offset {offset} is negative")
        # mmap needs a page-aligned offset: map from the page boundary, then slice.
        page = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            st = os.fstat(fd)
            # A mapping past the end of a regular file (memfds are regular) would
            # SIGBUS on first touch: refuse it now, while it is a clean error.
            if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
                raise PeerError(f"region mmap_offset {offset:#x} + size {size:#x} is past the end "
                                f"of its file ({st.st_size:#x} bytes)")
            mm = mmap.mmap(fd, size + (offset - page), mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE, offset=page)
        except (OSError, ValueError, OverflowError) as exc:
            raise PeerError(f"cannot map memory region fd={fd} offset={offset:#x} "
                            f"size={size:#x}: {exc}") from exc
        view = memoryview(mm)[offset - page:]
        region = Region(gpa=gpa, size=size, view=view, uaddr=uaddr, fd=fd,
                        mmap_offset=offset, owner=mm)
        self.add_region(region)
        return region

    def add_region(self, region: Region) -> None:
        if region.size <= 0 or len(region.view) < region.size:
            raise CallerError("region view is shorter than its size")
        i = bisect.bisect_right(self._starts, region.gpa)
        if i > 0 and self._regions[i - 1].end > region.gpa:
            raise PeerError(f"memory region at {region.gpa:#x} overlaps another")
        if i < len(self._regions) and region.end > self._regions[i].gpa:
            raise PeerError(f"memory region at {region.gpa:#x} overlaps another")
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)
        self._ustarts = sorted(((r.uaddr, r) for r in self._regions), key=lambda t: t[0])
        self._regions_changed()

    def _regions_changed(self) -> None:
        regions = self._regions
        self.sole_region = regions[0] if len(regions) == 1 else None

    def remove_region(self, gpa: int, size: int) -> Region:
        """Remove the region that starts at ``gpa`` with ``size`` (PeerError if none)."""
        for i, r in enumerate(self._regions):
            if r.gpa == gpa and r.size == size:
                del self._regions[i]
                del self._starts[i]
                self._ustarts = [(u, x) for (u, x) in self._ustarts if x is not r]
                self._regions_changed()
                return r
        raise PeerError(f"no memory region at {gpa:#x} of size {size:#x}")

    def close(self) -> None:
        """Release every mapping (and the fds it created); views handed out before must
        not be used after."""
        for r in self._regions:
            if r.owns_fd and r.fd >= 0:
                os.close(r.fd)
                r.fd = -1
            # Someone may still hold a view (or a numpy array over one); the
            # mapping then dies with the last of them.
            with contextlib.suppress(BufferError):
                r.view.release()
            if isinstance(r.owner, mmap.mmap):
                with contextlib.suppress(BufferError):
                    r.owner.close()
        self._regions.clear()
        self._starts.clear()
        self._ustarts.clear()
        self._regions_changed()

    # -------------------------------------------------------------- translation
    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def region_of(self, addr: int, length: int) -> Region:
        """The one region holding [addr, addr + length); PeerError otherwise."""
        regions = self._regions
        if len(regions) == 1:
            r = regions[0]
        else:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0:
                raise PeerError(f"guest address {addr:#x} is in no memory region")
            r = regions[i]
        if length <= 0:
            raise PeerError(f"zero-length buffer at guest address {addr:#x}")
        if addr < r.gpa or addr + length > r.gpa + r.size:
            if r.gpa <= addr < r.gpa + r.size:
                raise PeerError(f"buffer {addr:#x}+{length:#x} runs past the end of its "
                                f"memory region")
            raise PeerError(f"guest address {addr:#x} is in no memory region")
        return r

    def translate(self, addr: int, length: int) -> memoryview:
        """A writable view of guest range [addr, addr + length)."""
        r = self.region_of(addr, length)
        off = addr - r.gpa
        return r.view[off:off + length]

    def translate_uaddr(self, uaddr: int, length: int) -> memoryview:
        """Translate a front end's user address (vhost-user ring addresses)."""
        if length <= 0:
            raise PeerError(f"zero-length range at user address {uaddr:#x}")
        for start, r in self._ustarts:
            if start <= uaddr < start + r.size:
                if uaddr + length > start + r.size:
                    raise PeerError(f"user range {uaddr:#x}+{length:#x} runs past its region")
                off = uaddr - start
                return r.view[off:off + length]
        raise PeerError(f"user address {uaddr:#x} is in no memory region")

    def uaddr_to_gpa(self, uaddr: int) -> int:
        for start, r in self._ustarts:
            if start <= uaddr < start + r.size:
                return r.gpa + (uaddr - start)
        raise PeerError(f"user address {uaddr:#x} is in no memory region")

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.translate(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if len(data):
            self.translate(addr, len(data))[:] = data


@mypyc_attr(allow_interpreted_subclasses=True)
class BumpAllocator:
    """Hands out aligned guest ranges from [start, end) — for drivers and tests.

    A driver needs guest memory for its rings, indirect tables and buffers;
    this is the simplest allocator that does (no free: drivers here allocate
    once at set-up and recycle buffers themselves).
    """

    def __init__(self, start: int, end: int) -> None:
        self._next = start
        self._end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self._end:
            raise CallerError(f"guest memory exhausted: need {size} bytes at {addr:#x}, "
                              f"end {self._end:#x}")
        self._next = addr + size
        return addr

    @property
    def used(self) -> int:
        return self._next
