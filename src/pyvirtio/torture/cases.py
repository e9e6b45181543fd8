"""The torture cases: one hostile thing each, in the ring or on the socket.

Each case gets a connection whose rings already answered a good request
(:func:`pyvirtio.torture.harness.open_conn`) and does one thing a driver
or front end must never do, then kicks.  The rules broken are cited per
case: VIRTIO 1.2 §2.7 (split virtqueues), §5.1 (net), §5.2 (blk), and QEMU
docs/interop/vhost-user.rst for the socket.  What a case leaves in guest
memory that the back end may write is recorded on the connection
(:meth:`Conn.allow`); the judge does the rest.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyvirtio.core.errors import PeerError
from pyvirtio.core.spec import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from pyvirtio.devices.blk.spec import ReqType
from pyvirtio.torture.harness import (
    MEMORY_SIZE,
    NOWHERE,
    QUEUE_SIZE,
    BlkProfile,
    Conn,
    NetProfile,
)
from pyvirtio.transports.vhost_user.frontend import DEFAULT_UADDR
from pyvirtio.transports.vhost_user.messages import (
    FLAG_NEED_REPLY,
    HEADER,
    MAX_MEM_REGIONS,
    VERSION,
    MemoryTable,
    MemRegion,
    Payload,
    Request,
    VringAddr,
    VringState,
)

__all__ = ["CASES", "Case", "select"]

BOTH = frozenset({"blk", "net"})
BLK = frozenset({"blk"})
NET = frozenset({"net"})
W = VRING_DESC_F_WRITE
N = VRING_DESC_F_NEXT
I = VRING_DESC_F_INDIRECT  # noqa: E741 (the spec's name, as the flags above)


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    devices: frozenset[str]
    side: str  # "ring" or "socket"
    run: Callable[[Conn], None]
    two_regions: bool = False


CASES: dict[str, Case] = {}


def case(name: str, description: str, devices: frozenset[str] = BOTH, side: str = "ring",
         two_regions: bool = False) -> Callable[[Callable[[Conn], None]], Callable[[Conn], None]]:
    def register(fn: Callable[[Conn], None]) -> Callable[[Conn], None]:
        CASES[name] = Case(name, description, devices, side, fn, two_regions)
        return fn
    return register


def select(device: str, names: list[str] | None = None) -> list[Case]:
    """The cases for ``device`` (all, or ``names`` in that order); KeyError for a bad name."""
    if names is None:
        return [c for c in CASES.values() if device in c.devices]
    out = []
    for n in names:
        c = CASES[n]
        if device not in c.devices:
            raise KeyError(n)
        out.append(c)
    return out


# ------------------------------------------------------------------ helpers
def _go(c: Conn, head: int) -> None:
    c.publish(head)
    c.kick()


def _bad_buffer(c: Conn, addr: int, length: int) -> None:
    """A valid request whose payload buffer (blk data, net frame) is ``addr``/``length``."""
    _go(c, c.chain(c.profile.entries(c, buffer=(addr, length))))


def _valid(c: Conn) -> list[tuple[int, int, int]]:
    return c.profile.entries(c)


# ---------------------------------------------------------- chains (§2.7.5)
@case("chain_loop", "two descriptors whose next fields point at each other (§2.7.5.2)")
def chain_loop(c: Conn) -> None:
    a, b = c.new_desc(), c.new_desc()
    buf = c.buf(16, data=bytes(16))
    c.desc(a, buf, 16, N, b)
    c.desc(b, buf, 16, N, a)
    _go(c, a)


@case("chain_longer_than_queue", "an indirect chain of 2,049 descriptors or more, beyond any "
      "queue size (§2.7.5.3.1, QEMU/vhost stop at max(queue size, 1024))")
def chain_longer_than_queue(c: Conn) -> None:
    n = 2048
    if isinstance(c.profile, BlkProfile):
        hdr = c.profile.request(c, nbytes=0)[0][0]
        segs = [(c.buf(512), 512, W) for _ in range(n)]
        status = c.buf(1)
        entries = [hdr, *segs, (status, 1, W)]
    else:
        entries = [(c.buf(12, data=bytes(12)), 12, 0),
                   *((c.buf(32, data=bytes(32)), 32, 0) for _ in range(n))]
    _go(c, c.indirect(entries))


@case("next_out_of_range", "a descriptor whose next is beyond the table (§2.7.5.2)")
def next_out_of_range(c: Conn) -> None:
    addr, length, flags = _valid(c)[0]
    head = c.new_desc()
    c.desc(head, addr, length, flags | N, QUEUE_SIZE + 3)
    _go(c, head)


@case("addr_outside_memory", "a buffer at a guest address in no memory region (1 TiB)")
def addr_outside_memory(c: Conn) -> None:
    _bad_buffer(c, NOWHERE, 512)


@case("addr_len_wraps", "a buffer whose address + length wraps around 2^64")
def addr_len_wraps(c: Conn) -> None:
    _bad_buffer(c, 2**64 - 256, 512)


@case("len_zero", "a buffer of length 0")
def len_zero(c: Conn) -> None:
    _bad_buffer(c, c.buf(512), 0)


@case("len_max", "a buffer of length 0xFFFFFFFF (runs far past the end of guest memory)")
def len_max(c: Conn) -> None:
    _bad_buffer(c, c.buf(512), 0xFFFF_FFFF)


@case("buffer_spans_regions", "a buffer that starts in one memory region and ends in the "
      "next (adjacent in guest addresses, not in the front end's)", two_regions=True)
def buffer_spans_regions(c: Conn) -> None:
    _bad_buffer(c, MEMORY_SIZE - 256, 512)


@case("buffer_past_region_end", "a buffer that runs past the end of the only memory region")
def buffer_past_region_end(c: Conn) -> None:
    _bad_buffer(c, MEMORY_SIZE - 256, 512)


# ------------------------------------------------------ indirect (§2.7.5.3)
@case("indirect_len_0", "an indirect descriptor whose table has length 0")
def indirect_len_0(c: Conn) -> None:
    table, _ = c.table([(a, ln, f, 0) for a, ln, f in _valid(c)])
    head = c.new_desc()
    c.desc(head, table, 0, I)
    _go(c, head)


@case("indirect_len_not_16", "an indirect table whose length is not a multiple of 16")
def indirect_len_not_16(c: Conn) -> None:
    entries = _valid(c)
    table, size = c.table([(a, ln, f | (N if k < len(entries) - 1 else 0), k + 1)
                           for k, (a, ln, f) in enumerate(entries)])
    head = c.new_desc()
    c.desc(head, table, size - 8, I)
    _go(c, head)


@case("indirect_nested", "an indirect table holding another indirect descriptor "
      "(§2.7.5.3.1: the driver MUST NOT)")
def indirect_nested(c: Conn) -> None:
    entries = _valid(c)
    inner, size = c.table([(a, ln, f | (N if k < len(entries) - 1 else 0), k + 1)
                           for k, (a, ln, f) in enumerate(entries)])
    outer, osize = c.table([(inner, size, I, 0)])
    head = c.new_desc()
    c.desc(head, outer, osize, I)
    _go(c, head)


@case("indirect_with_next", "a descriptor with both INDIRECT and NEXT set "
      "(§2.7.5.3.1: the driver MUST NOT)")
def indirect_with_next(c: Conn) -> None:
    entries = _valid(c)
    table, size = c.table([(a, ln, f | (N if k < len(entries) - 1 else 0), k + 1)
                           for k, (a, ln, f) in enumerate(entries)])
    head, tail = c.new_desc(), c.new_desc()
    c.desc(head, table, size, I | N, tail)
    c.desc(tail, c.buf(1), 1, W)
    _go(c, head)


@case("indirect_outside_memory", "an indirect table at a guest address in no memory region")
def indirect_outside_memory(c: Conn) -> None:
    head = c.new_desc()
    c.desc(head, NOWHERE, 48, I)
    _go(c, head)


@case("indirect_loop", "an indirect table whose entries' next fields loop")
def indirect_loop(c: Conn) -> None:
    buf = c.buf(16, data=bytes(16))
    table, size = c.table([(buf, 16, N, (k + 1) % 4) for k in range(4)])
    head = c.new_desc()
    c.desc(head, table, size, I)
    _go(c, head)


@case("indirect_next_out_of_table", "an indirect entry whose next is beyond its table")
def indirect_next_out_of_table(c: Conn) -> None:
    entries = _valid(c)
    table, size = c.table([(a, ln, f | N, 200) for a, ln, f in entries])
    head = c.new_desc()
    c.desc(head, table, size, I)
    _go(c, head)


# --------------------------------------------------- available ring (§2.7.6)
@case("head_out_of_range", "an available-ring entry naming head queue size + 5")
def head_out_of_range(c: Conn) -> None:
    _go(c, QUEUE_SIZE + 5)


@case("head_ffff", "an available-ring entry naming head 65535")
def head_ffff(c: Conn) -> None:
    _go(c, 0xFFFF)


@case("avail_idx_jump", "avail.idx moved ahead by the queue size + 1")
def avail_idx_jump(c: Conn) -> None:
    head = c.chain(_valid(c))
    for _ in range(QUEUE_SIZE):
        c.place(head)
    c.set_avail_idx(c.ring().avail_idx + QUEUE_SIZE + 1)
    c.kick()


@case("avail_idx_back", "avail.idx moved back by one after a request was consumed")
def avail_idx_back(c: Conn) -> None:
    c.set_avail_idx(c.ring().avail_idx - 1)
    c.kick()


@case("same_head_twice", "the same head made available twice at once")
def same_head_twice(c: Conn) -> None:
    head = c.chain(_valid(c))
    c.publish(head, head)
    c.kick()


@case("more_heads_than_queue", "a full ring of heads, kicked, then another full ring before "
      "any was used: twice the queue size in flight (QEMU: 'Virtqueue size exceeded')")
def more_heads_than_queue(c: Conn) -> None:
    head = c.chain(_valid(c))
    c.publish(*[head] * QUEUE_SIZE)
    c.kick()
    c.publish(*[head] * QUEUE_SIZE)
    c.kick()


@case("desc_changed_after_available", "the payload descriptor's length flips between its "
      "value and 0xFFFFFFF0 while the back end works (a double fetch writes past the buffer)")
def desc_changed_after_available(c: Conn) -> None:
    entries = _valid(c)
    k = 1 if len(entries) > 1 else 0
    head = c.chain(entries)
    idx = head
    for _ in range(k):  # follow the chain to the payload descriptor
        idx = (idx + 1) % QUEUE_SIZE
    length = entries[k][1]
    field = c.fe.memory.translate(c.ring().desc + 16 * idx + 8, 4).cast("I")
    c.publish(head)
    c.kick()
    # Aligned 32-bit stores: the back end sees one value or the other, never a mix.
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        field[0] = 0xFFFF_FFF0
        field[0] = length
    field.release()


@case("spurious_kicks", "1,000 kicks with nothing new in the available ring")
def spurious_kicks(c: Conn) -> None:
    c.kick(times=1000)


@case("kick_after_stop", "a request made available and kicked after GET_VRING_BASE stopped "
      "the ring (vhost-user.rst 'Ring states')")
def kick_after_stop(c: Conn) -> None:
    c.send(Request.GET_VRING_BASE, VringState(c.q, 0))
    _go(c, c.chain(_valid(c)))


# ----------------------------------------------------------- blk (§5.2.6)
def _blk(c: Conn) -> BlkProfile:
    assert isinstance(c.profile, BlkProfile)
    return c.profile


def _blk_go(c: Conn, **kw: object) -> None:
    entries, _status = _blk(c).request(c, **kw)  # type: ignore[arg-type]
    _go(c, c.chain(entries))


def _past_end(c: Conn) -> int:
    cap = _blk(c).capacity
    return cap if cap is not None else 1 << 62


@case("blk_status_not_writable", "the status byte in a device-readable descriptor", BLK)
def blk_status_not_writable(c: Conn) -> None:
    _blk_go(c, status_flags=0)


@case("blk_no_status", "a read request without a status descriptor (header and data only)",
      BLK)
def blk_no_status(c: Conn) -> None:
    entries = _blk(c).request(c)[0][:-1]
    _go(c, c.chain(entries))


@case("blk_header_short", "a request header of 8 bytes instead of 16", BLK)
def blk_header_short(c: Conn) -> None:
    _blk_go(c, header_len=8)


@case("blk_in_data_readable", "a read whose data buffer is device-readable (wrong direction: "
      "writing it changes memory the driver did not offer)", BLK)
def blk_in_data_readable(c: Conn) -> None:
    _blk_go(c, data_flags=0)


@case("blk_out_data_writable", "a write whose data buffer is device-writable (wrong "
      "direction; it holds sector 0's own bytes, so nothing on the disk changes)", BLK)
def blk_out_data_writable(c: Conn) -> None:
    entries, _status = _blk(c).request(c)
    _go(c, c.chain(entries))
    if not c.wait_used():
        c.notes.append("the read of sector 0 before the case got no answer")
        return
    data = c.fe.memory.read(entries[1][0], 512)
    _blk_go(c, rtype=ReqType.OUT, data=(c.buf(512, data=data), 512), data_flags=W)


@case("blk_sector_past_end", "a read of the sector right after the disk's last", BLK)
def blk_sector_past_end(c: Conn) -> None:
    _blk_go(c, sector=_past_end(c))


@case("blk_sector_straddles_end", "a read of 2 sectors starting at the disk's last", BLK)
def blk_sector_straddles_end(c: Conn) -> None:
    _blk_go(c, sector=_past_end(c) - 1, nbytes=1024)


@case("blk_sector_overflow", "a read at sector 2^64 - 1 (sector * 512 wraps 2^64)", BLK)
def blk_sector_overflow(c: Conn) -> None:
    _blk_go(c, sector=2**64 - 1)


@case("blk_get_id_short", "GET_ID with a 4-byte buffer for the 20-byte id", BLK)
def blk_get_id_short(c: Conn) -> None:
    _blk_go(c, rtype=ReqType.GET_ID, nbytes=4)


@case("blk_unknown_type", "a request of type 0x7fff", BLK)
def blk_unknown_type(c: Conn) -> None:
    _blk_go(c, rtype=0x7FFF)


@case("blk_data_not_sector_multiple", "a read whose data buffer is 100 bytes", BLK)
def blk_data_not_sector_multiple(c: Conn) -> None:
    _blk_go(c, nbytes=100)


# ----------------------------------------------------------- net (§5.1.6)
def _net_go(c: Conn, entries: list[tuple[int, int, int]]) -> None:
    assert isinstance(c.profile, NetProfile)
    _go(c, c.chain(entries))


@case("net_tx_header_only", "a transmit chain holding only the 12-byte virtio-net header", NET)
def net_tx_header_only(c: Conn) -> None:
    _net_go(c, [(c.buf(12, data=bytes(12)), 12, 0)])


@case("net_tx_short_header", "a transmit chain of 4 bytes, shorter than the header", NET)
def net_tx_short_header(c: Conn) -> None:
    _net_go(c, [(c.buf(4, data=bytes(4)), 4, 0)])


@case("net_tx_oversize", "a transmit frame of 65,550 bytes (larger than any Ethernet frame "
      "or 64 KiB GSO packet)", NET)
def net_tx_oversize(c: Conn) -> None:
    assert isinstance(c.profile, NetProfile)
    pkt = c.profile.frame(65550)
    _net_go(c, [(c.buf(len(pkt), data=pkt), len(pkt), 0)])


@case("net_tx_writable", "a transmit frame in a device-writable descriptor (wrong direction)",
      NET)
def net_tx_writable(c: Conn) -> None:
    _net_go(c, c.profile.entries(c, writable=True))


# ------------------------------------------------- the socket (vhost-user.rst)
def _restart_ring(c: Conn, size: int | None = None, desc: int | None = None) -> None:
    """Stop the attack ring, give it a new size or address, start it, and use it."""
    r = c.ring()
    fq = c.fe.queues[c.q]
    base = c.send(Request.GET_VRING_BASE, VringState(c.q, 0))
    if size is not None:
        c.accept_size(c.q, size, c.send(Request.SET_VRING_NUM, VringState(c.q, size)))
    c.send(Request.SET_VRING_BASE, VringState(c.q, r.avail_idx if base is None
                                                    else base & 0xFFFF))
    c.send(Request.SET_VRING_ADDR, VringAddr(
        c.q, 0, c.fe.uaddr(r.desc) if desc is None else desc, c.fe.uaddr(r.used),
        c.fe.uaddr(r.avail), 0))
    c.send(Request.SET_VRING_CALL, c.q, (fq.call.fd,))
    c.send(Request.SET_VRING_KICK, c.q, (fq.kick.fd,))
    c.send(Request.SET_VRING_ENABLE, VringState(c.q, 1))
    if r.size:
        _go(c, c.chain(_valid(c)))
    else:
        c.kick()


@case("sock_size_beyond_payload", "SET_VRING_NUM whose size field says 40 bytes, "
      "followed by other messages the back end must not read as its payload", side="socket")
def sock_size_beyond_payload(c: Conn) -> None:
    body = struct.pack("<II", c.q, QUEUE_SIZE)
    c.fe.raw(HEADER.pack(Request.SET_VRING_NUM, VERSION, 40) + body)
    time.sleep(0.05)
    c.fe.raw(HEADER.pack(Request.GET_FEATURES, VERSION, 0) * 3)
    c.kick()


@case("sock_size_huge", "a header whose size field is 0xFFFFFFFF", side="socket")
def sock_size_huge(c: Conn) -> None:
    c.fe.raw(HEADER.pack(Request.SET_MEM_TABLE, VERSION, 0xFFFF_FFFF) + bytes(64))


@case("sock_unknown_request", "request 99 (unknown) with need_reply, then GET_FEATURES",
      side="socket")
def sock_unknown_request(c: Conn) -> None:
    c.fe.raw(HEADER.pack(99, VERSION | FLAG_NEED_REPLY, 8) + bytes(8))
    c.fe.raw(HEADER.pack(Request.GET_FEATURES, VERSION, 0))


@case("sock_vring_num_0", "SET_VRING_NUM 0 on a stopped ring, then the ring is used",
      side="socket")
def sock_vring_num_0(c: Conn) -> None:
    _restart_ring(c, size=0)


@case("sock_vring_num_3", "SET_VRING_NUM 3 (not a power of two, §2.7), then the ring is used",
      side="socket")
def sock_vring_num_3(c: Conn) -> None:
    _restart_ring(c, size=3)


@case("sock_vring_num_65536", "SET_VRING_NUM 65536 (beyond 32768, §2.7), then the ring is "
      "used", side="socket")
def sock_vring_num_65536(c: Conn) -> None:
    _restart_ring(c, size=65536)


@case("sock_ring_addr_nowhere", "SET_VRING_ADDR with a descriptor table in no region, then "
      "the ring is used", side="socket")
def sock_ring_addr_nowhere(c: Conn) -> None:
    _restart_ring(c, desc=0xDEAD_0000)


def _mem_table(c: Conn, extra: list[tuple[MemRegion, int]], keep: bool = True) -> None:
    """SET_MEM_TABLE: our region (if ``keep``) plus ``extra``, then the ring is used."""
    regions = [(MemRegion(r.gpa, r.size, r.uaddr, r.mmap_offset), r.fd)
               for r in c.fe.memory.regions] if keep else []
    table = regions + extra
    c.send(Request.SET_MEM_TABLE, MemoryTable(tuple(m for m, _ in table)),
                 tuple(fd for _, fd in table))
    _go(c, c.chain(_valid(c)))


def _memfd(c: Conn, size: int) -> int:
    fd = os.memfd_create("pyvirtio-torture", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    c.extra_fds.append(fd)
    return fd


FAR = DEFAULT_UADDR + (1 << 41)  # user addresses of extra regions: far from everything


@case("sock_region_size_0", "SET_MEM_TABLE with a region of size 0, then the ring is used",
      side="socket")
def sock_region_size_0(c: Conn) -> None:
    _mem_table(c, [(MemRegion(1 << 32, 0, FAR, 0), _memfd(c, 4096))])


@case("sock_mmap_offset_past_end", "SET_MEM_TABLE with a region whose mmap offset is past "
      "the end of its 1 MiB memfd, then the ring is used", side="socket")
def sock_mmap_offset_past_end(c: Conn) -> None:
    _mem_table(c, [(MemRegion(1 << 32, 1 << 20, FAR, 1 << 30), _memfd(c, 1 << 20))])


@case("sock_too_many_regions", f"SET_MEM_TABLE with {MAX_MEM_REGIONS + 1} regions (QEMU's "
      f"limit is {MAX_MEM_REGIONS}), then the ring is used", side="socket")
def sock_too_many_regions(c: Conn) -> None:
    _mem_table(c, [(MemRegion((1 << 32) + i * 4096, 4096, FAR + i * 4096, 0), _memfd(c, 4096))
                   for i in range(MAX_MEM_REGIONS)])


@case("sock_region_count_mismatch", "SET_MEM_TABLE whose region count says 2 while the "
      "payload holds one region (and one fd)", side="socket")
def sock_region_count_mismatch(c: Conn) -> None:
    r = c.fe.memory.regions[0]
    body = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", r.gpa, r.size, r.uaddr,
                                                  r.mmap_offset)
    c.fe.raw(HEADER.pack(Request.SET_MEM_TABLE, VERSION, len(body)) + body, [r.fd])
    _go(c, c.chain(_valid(c)))


@case("sock_mem_table_without_rings", "SET_MEM_TABLE replacing guest memory with a region "
      "that holds no ring, then a kick of the running ring", side="socket")
def sock_mem_table_without_rings(c: Conn) -> None:
    _mem_table(c, [(MemRegion(1 << 32, 1 << 20, FAR, 0), _memfd(c, 1 << 20))], keep=False)


@case("sock_extra_fds", "GET_FEATURES and SET_VRING_NUM carrying 4 file descriptors each "
      "they have no use for", side="socket")
def sock_extra_fds(c: Conn) -> None:
    fds = [_memfd(c, 4096) for _ in range(4)]
    c.fe.raw(HEADER.pack(Request.GET_FEATURES, VERSION, 0), fds)
    c.fe.raw(HEADER.pack(Request.SET_VRING_NUM, VERSION, 8)
             + struct.pack("<II", c.q, QUEUE_SIZE), fds)
    _go(c, c.chain(_valid(c)))


def _index_255(req: Request) -> Callable[[Conn], None]:
    def run(c: Conn) -> None:
        r = c.ring()
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        c.extra_fds.append(fd)
        payload: Payload
        fds: tuple[int, ...] = ()
        if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            payload, fds = 255, (fd,)
        elif req is Request.SET_VRING_ADDR:
            payload = VringAddr(255, 0, c.fe.uaddr(r.desc), c.fe.uaddr(r.used),
                                c.fe.uaddr(r.avail), 0)
        else:
            payload = VringState(255, {Request.SET_VRING_NUM: QUEUE_SIZE,
                                       Request.SET_VRING_ENABLE: 1}.get(req, 0))
        try:
            c.send(req, payload, fds)
        except PeerError as exc:
            c.notes.append(str(exc))
        os.eventfd_write(fd, 1)  # as a kick (or a call) of ring 255 would
        _go(c, c.chain(_valid(c)))
    return run


for _req in (Request.SET_VRING_NUM, Request.SET_VRING_ADDR, Request.SET_VRING_BASE,
             Request.GET_VRING_BASE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
             Request.SET_VRING_ERR, Request.SET_VRING_ENABLE):
    _short = _req.name.lower().replace("set_", "").replace("get_", "get_")
    case(f"sock_index_255_{_short}", f"{_req.name} for ring 255 (no such ring), then the real "
         f"ring is used", side="socket")(_index_255(_req))
