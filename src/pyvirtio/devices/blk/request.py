"""Parsing a popped virtqueue element into a virtio-blk request, VIRTIO 1.2 §5.2.6.

Pure functions, no I/O.  A request is ``struct virtio_blk_req``: the 16-byte
header (type, reserved, sector) in the device-readable part, then ``data``,
then the ``status`` byte, which is the *last* device-writable byte.  Since
VIRTIO 1.0 the driver may split or merge these across descriptors as it
likes (§2.6.4 "Message Framing"), so the header may span several readable
buffers and the status byte may share a descriptor with read data.

What is malformed and who answers it:

* no writable byte (nowhere to put the status) or a header shorter than 16
  bytes: the request cannot even be failed, so :class:`PeerError` — the
  queue is broken (QEMU does the same: ``virtio_error``);
* a data length that is not a multiple of 512, a range past the capacity,
  a discard / write-zeroes payload that is not whole segments: the request
  is answered with ``VIRTIO_BLK_S_IOERR`` (a driver error, §5.2.6);
* an unknown type, unknown segment flags, ``unmap`` on a discard, more
  segments than advertised: ``VIRTIO_BLK_S_UNSUPP`` (§5.2.6.2 device
  requirements).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvirtio.core.errors import PeerError
from pyvirtio.core.split_device import Element
from pyvirtio.devices.blk.spec import (
    DWZ_F_UNMAP,
    DWZ_SEGMENT,
    DWZ_SEGMENT_SIZE,
    REQ_HEADER,
    REQ_HEADER_SIZE,
    SECTOR_SIZE,
    ReqType,
    Status,
)

_unpack_header = REQ_HEADER.unpack_from
_IN = ReqType.IN
_GET_ID = ReqType.GET_ID
_FLUSH = ReqType.FLUSH


@dataclass(slots=True)
class BlkRequest:
    """One parsed request; ``data`` views point straight into guest memory.

    For IN and GET_ID ``data`` are the writable views (status byte excluded);
    for OUT, DISCARD and WRITE_ZEROES the readable views after the header;
    FLUSH and unknown types carry whatever came after the header.
    """

    head: int
    type: int
    sector: int
    data: list[memoryview]
    status: memoryview
    data_len: int


def parse_request(elem: Element) -> BlkRequest:
    """Split ``elem`` into header, data and status; PeerError if it cannot be answered."""
    writable = elem.writable
    if not writable:
        raise PeerError(f"virtio-blk request at head {elem.head} has no writable status byte")
    last = writable[-1]
    status = last[-1:]
    readable = elem.readable
    if readable and len(readable[0]) >= REQ_HEADER_SIZE:
        first = readable[0]
        rtype, _reserved, sector = _unpack_header(first)
        rest = [first[REQ_HEADER_SIZE:]] if len(first) > REQ_HEADER_SIZE else []
        rest.extend(readable[1:])
    else:
        rtype, sector, rest = _gather_header(elem.head, readable)
    if rtype in (_IN, _GET_ID):
        data = writable[:-1]
        if len(last) > 1:
            data.append(last[:-1])
    elif rtype == _FLUSH:
        data = []
    else:
        data = rest
    if len(data) == 1:
        nbytes = len(data[0])
    else:
        nbytes = 0
        for v in data:
            nbytes += len(v)
    return BlkRequest(elem.head, rtype, sector, data, status, nbytes)


def _gather_header(head: int, readable: list[memoryview]) -> tuple[int, int, list[memoryview]]:
    """Slow path: the 16-byte header is split over several small readable buffers."""
    buf = bytearray()
    rest: list[memoryview] = []
    for view in readable:
        need = REQ_HEADER_SIZE - len(buf)
        if need > 0:
            buf += view[:need]
            if len(view) > need:
                rest.append(view[need:])
        else:
            rest.append(view)
    if len(buf) < REQ_HEADER_SIZE:
        raise PeerError(f"virtio-blk request at head {head} has a {len(buf)}-byte header "
                        f"(needs {REQ_HEADER_SIZE})")
    rtype, _reserved, sector = _unpack_header(buf)
    return rtype, sector, rest


def rw_status(sector: int, nbytes: int, capacity: int) -> Status:
    """OK if [sector, sector + nbytes) is whole sectors inside a disk of ``capacity`` sectors."""
    if nbytes % SECTOR_SIZE:
        return Status.IOERR
    if sector > capacity or nbytes // SECTOR_SIZE > capacity - sector:
        return Status.IOERR
    return Status.OK


Segment = tuple[int, int, int]
"""A discard / write-zeroes range: (sector, num_sectors, flags)."""


def parse_segments(req: BlkRequest, max_seg: int, max_sectors: int,
                   capacity: int) -> list[Segment] | Status:
    """The segments of a DISCARD or WRITE_ZEROES request, or the status that refuses it."""
    # Sizes first: the driver may name gigabytes of guest memory here (the same
    # buffer many times over); only an acceptable payload is ever copied.
    nbytes = req.data_len
    if not nbytes or nbytes % DWZ_SEGMENT_SIZE:
        return Status.IOERR
    count = nbytes // DWZ_SEGMENT_SIZE
    if count > max_seg:
        return Status.UNSUPP
    raw = b"".join(req.data)
    is_discard = req.type == ReqType.DISCARD
    segs: list[Segment] = []
    for i in range(count):
        sector, num, flags = DWZ_SEGMENT.unpack_from(raw, i * DWZ_SEGMENT_SIZE)
        if flags & ~DWZ_F_UNMAP or (is_discard and flags & DWZ_F_UNMAP):
            return Status.UNSUPP
        if num > max_sectors:
            return Status.IOERR
        if rw_status(sector, num * SECTOR_SIZE, capacity) != Status.OK:
            return Status.IOERR
        segs.append((sector, num, flags))
    return segs


def id_bytes(serial: str) -> bytes:
    """The 20-byte GET_ID answer: ASCII, NUL-padded, no terminator at full length."""
    raw = serial.encode("ascii", "replace")[:20]
    return raw + bytes(20 - len(raw))
