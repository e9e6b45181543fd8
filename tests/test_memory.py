"""Guest memory: regions, translation and refusal of hostile ranges.

Translation of (address, length) is what every descriptor of VIRTIO 1.2 §2.7.5
goes through; vhost-user ring addresses are user addresses
(QEMU docs/interop/vhost-user.rst, "Memory region description").
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.memory import BumpAllocator, GuestMemory, Region

R1_GPA, R1_SIZE, R1_UADDR = 0x0, 0x10000, 0x7F00_0000_0000
R2_GPA, R2_SIZE, R2_UADDR = 0x10000, 0x10000, 0x7F00_1000_0000  # adjacent to R1
R3_GPA, R3_SIZE, R3_UADDR = 0x100000, 0x8000, 0x7F00_2000_0000  # after a gap


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("pyvirtio-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, R1_SIZE + R2_SIZE + R3_SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
def three(memfd: int) -> Iterator[GuestMemory]:
    """Three regions of one memfd: two adjacent, one after a gap, each with a user address."""
    mem = GuestMemory()
    mem.map_fd(memfd, R1_SIZE, R1_GPA, 0, R1_UADDR)
    mem.map_fd(memfd, R2_SIZE, R2_GPA, R1_SIZE, R2_UADDR)
    mem.map_fd(memfd, R3_SIZE, R3_GPA, R1_SIZE + R2_SIZE, R3_UADDR)
    yield mem
    mem.close()


def test_anonymous_translate_write_read_round_trip() -> None:
    mem = GuestMemory.anonymous(1 << 16, gpa=0x4000_0000)
    fd = mem.regions[0].fd
    try:
        view = mem.translate(0x4000_0010, 5)
        assert len(view) == 5 and not view.readonly
        view[:] = b"hello"
        assert mem.read(0x4000_0010, 5) == b"hello"
        mem.write(0x4000_0012, b"LL")
        assert bytes(view) == b"heLLo"
        mem.write(0x4000_0000, b"")  # empty write is a no-op
        # The memfd is shared: another mapping of it sees the same bytes.
        other = GuestMemory.from_fd(fd, 1 << 16, gpa=0)
        assert other.read(0x10, 5) == b"heLLo"
        other.close()
        # from_fd borrows the fd: it is still open after other.close().
        os.fstat(fd)
    finally:
        mem.close()
    # anonymous() owns its memfd: close() closed it.
    with pytest.raises(OSError):
        os.fstat(fd)


def test_translation_in_each_region(three: GuestMemory) -> None:
    for gpa, size in ((R1_GPA, R1_SIZE), (R2_GPA, R2_SIZE), (R3_GPA, R3_SIZE)):
        three.write(gpa, b"first")
        three.write(gpa + size - 4, b"last")
        assert three.read(gpa, 5) == b"first"
        assert three.read(gpa + size - 4, 4) == b"last"
        assert len(three.translate(gpa, size)) == size
        assert three.region_of(gpa + size - 1, 1).gpa == gpa


def test_regions_share_the_backing_fd_at_their_offsets(three: GuestMemory, memfd: int) -> None:
    three.write(R2_GPA + 3, b"xyz")
    assert os.pread(memfd, 3, R1_SIZE + 3) == b"xyz"
    os.pwrite(memfd, b"from-fd", R1_SIZE + R2_SIZE + 100)
    assert three.read(R3_GPA + 100, 7) == b"from-fd"


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (R1_GPA + R1_SIZE - 4, 8),  # spans R1 into the adjacent R2
        (R2_GPA + R2_SIZE - 1, 2),  # runs from R2 into the gap
        (R2_GPA + R2_SIZE, 1),  # inside the gap
        (R3_GPA - 16, 32),  # starts in the gap, ends in R3
        (R3_GPA + R3_SIZE, 1),  # after the last region
        (R3_GPA + R3_SIZE - 1, 2),  # runs past the last region
        (R1_GPA, R1_SIZE + R2_SIZE + 1),
        ((1 << 64) - 1, 1),
        ((1 << 64) - 8, 16),  # wraps 2^64
        (R1_GPA, 0),  # zero length
        (R3_GPA, 0),
    ],
)
def test_bad_ranges_are_peer_errors(three: GuestMemory, addr: int, length: int) -> None:
    with pytest.raises(PeerError):
        three.translate(addr, length)


def test_below_the_first_region_is_a_peer_error(memfd: int) -> None:
    mem = GuestMemory.from_fd(memfd, 0x1000, gpa=0x10000)
    try:
        with pytest.raises(PeerError):
            mem.translate(0xFFF0, 4)
        with pytest.raises(PeerError):
            mem.translate(0xFFF0, 0x20)  # starts below, ends inside
        assert len(mem.translate(0x10000, 0x1000)) == 0x1000
    finally:
        mem.close()


def test_empty_memory_translates_nothing() -> None:
    with pytest.raises(PeerError):
        GuestMemory().translate(0, 1)


def test_user_addresses(three: GuestMemory) -> None:
    three.write(R2_GPA + 0x40, b"ring")
    assert bytes(three.translate_uaddr(R2_UADDR + 0x40, 4)) == b"ring"
    assert three.uaddr_to_gpa(R3_UADDR + 0x10) == R3_GPA + 0x10
    for uaddr, length in ((R1_UADDR - 1, 1), (R2_UADDR + R2_SIZE - 2, 4), (R3_UADDR, 0), (0, 1)):
        with pytest.raises(PeerError):
            three.translate_uaddr(uaddr, length)
    with pytest.raises(PeerError):
        three.uaddr_to_gpa(0x1234)


def test_remove_region(three: GuestMemory) -> None:
    removed = three.remove_region(R2_GPA, R2_SIZE)
    assert removed.gpa == R2_GPA and removed.uaddr == R2_UADDR
    assert [r.gpa for r in three.regions] == [R1_GPA, R3_GPA]
    with pytest.raises(PeerError):
        three.translate(R2_GPA, 1)
    with pytest.raises(PeerError):
        three.translate_uaddr(R2_UADDR, 1)
    assert three.read(R3_GPA, 1) == b"\0"
    with pytest.raises(PeerError):
        three.remove_region(R2_GPA, R2_SIZE)  # already gone
    with pytest.raises(PeerError):
        three.remove_region(R1_GPA, R1_SIZE - 1)  # wrong size


def test_overlapping_regions_are_refused(three: GuestMemory, memfd: int) -> None:
    with pytest.raises(PeerError):
        three.map_fd(memfd, 0x1000, R1_GPA + 0x800, 0, 0x1234_0000)
    with pytest.raises(PeerError):
        three.map_fd(memfd, 0x1000, R3_GPA - 0x800, 0, 0x1234_0000)
    assert len(three.regions) == 3


@pytest.mark.parametrize(
    ("size", "gpa", "offset"),
    [(0, 0, 0), (0x1000, -1, 0), (0x1000, (1 << 64) - 0x800, 0), (0x1000, 0, -4096),
     (0x100000, 0, 0), (0x1000, 0, 0x7F000)],
)
def test_bad_map_fd_is_a_peer_error(memfd: int, size: int, gpa: int, offset: int) -> None:
    with pytest.raises(PeerError):
        GuestMemory().map_fd(memfd, size, gpa, offset, 0)


def test_map_fd_with_unaligned_offset(memfd: int) -> None:
    os.pwrite(memfd, b"offset!", 0x1010)
    mem = GuestMemory.from_fd(memfd, 0x100, gpa=0x2000, offset=0x1010)
    try:
        assert mem.read(0x2000, 7) == b"offset!"
        assert mem.regions[0].mmap_offset == 0x1010
    finally:
        mem.close()


@given(addr=st.integers(0, (1 << 64) - 1), length=st.integers(-4, 1 << 20))
def test_translate_never_leaks_other_errors(addr: int, length: int) -> None:
    mem = _SHARED
    try:
        view = mem.translate(addr, length)
    except PeerError:
        return
    r = mem.region_of(addr, length)
    assert len(view) == length
    assert r.gpa <= addr and addr + length <= r.end


def _make_shared() -> GuestMemory:
    buf = mmap.mmap(-1, 0x3000)
    return GuestMemory([
        Region(gpa=0x1000, size=0x1000, view=memoryview(buf)[:0x1000], owner=None),
        Region(gpa=0x2000, size=0x1000, view=memoryview(buf)[0x1000:0x2000], owner=None),
        Region(gpa=0x9000, size=0x1000, view=memoryview(buf)[0x2000:], owner=None),
    ])


_SHARED = _make_shared()


def test_region_view_shorter_than_size_is_a_caller_error() -> None:
    with pytest.raises(CallerError):
        GuestMemory([Region(gpa=0, size=0x100, view=memoryview(bytearray(0x80)))])


def test_bump_allocator_aligns_and_runs_out() -> None:
    alloc = BumpAllocator(0x1001, 0x3000)
    assert alloc.alloc(10, 16) == 0x1010
    assert alloc.alloc(1, 4096) == 0x2000
    assert alloc.used == 0x2001
    with pytest.raises(CallerError):
        alloc.alloc(0x1000, 16)  # 0x2010 + 0x1000 is past the end
    assert alloc.alloc(0xFF0, 16) == 0x2010
    assert alloc.used == 0x3000


def test_close_while_a_numpy_array_still_exports_a_view() -> None:
    import numpy as np

    mem = GuestMemory.anonymous(1 << 16)
    arr = np.frombuffer(mem.regions[0].view, dtype=np.uint8)
    arr_view = mem.translate(0x100, 4)
    arr_view[:] = b"abcd"
    mem.close()  # must not raise BufferError: the mapping lives on with its last user
    assert bytes(arr[0x100:0x104]) == b"abcd"
    assert mem.regions == []
