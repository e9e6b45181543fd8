"""The virtio-blk device model served over vhost-user, VIRTIO 1.2 §5.2.

Implements :class:`pyvirtio.transports.vhost_user.device.VhostUserDevice`:

* features (§5.2.3): ``VERSION_1``, ``RING_EVENT_IDX``,
  ``RING_INDIRECT_DESC``, ``SEG_MAX``, ``BLK_SIZE``, ``FLUSH``, ``MQ`` when
  there is more than one queue, ``DISCARD`` and ``WRITE_ZEROES`` for a
  writable disk, ``RO`` for a read-only one;
* the configuration space (§5.2.4) as :class:`BlkConfig`;
* :meth:`BlkDevice.process_queue` pops every available request, executes it
  on the storage back end and returns it with the used length set to the
  number of bytes written into the request's writable buffers (data + the
  status byte, §2.7.8), publishing the whole batch with one used-index move.

vhost-user protocol features the device needs (QEMU docs/interop/
vhost-user.rst "Protocol features"): ``CONFIG`` (QEMU's vhost-user-blk reads
the config space from the back end) and ``MQ`` (GET_QUEUE_NUM).
"""

from __future__ import annotations

import logging

from pyvirtio.core.errors import PeerError
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, DeviceId
from pyvirtio.core.split_device import Element, SplitDeviceQueue
from pyvirtio.devices.blk.backend_file import FileBackend
from pyvirtio.devices.blk.request import id_bytes, parse_request, parse_segments
from pyvirtio.devices.blk.spec import (
    CONFIG_SIZE,
    REQ_HEADER,
    REQ_HEADER_SIZE,
    SECTOR_SIZE,
    BlkConfig,
    BlkFeature,
    ReqType,
    Status,
)
from pyvirtio.transports.vhost_user.messages import ProtocolFeature

log = logging.getLogger(__name__)


DEFAULT_QUEUE_SIZE = 1024
SEG_MAX = 126  # fits a 128-entry ring without indirect descriptors (+ header + status)
MAX_DWZ_SECTORS = 0x3FFFFF  # 2 GiB - 512 per segment, like QEMU's request limit
MAX_DWZ_SEG = 16

_OK = Status.OK
_IOERR = Status.IOERR
_UNSUPP = Status.UNSUPP
_IN = ReqType.IN
_OUT = ReqType.OUT
_unpack_header = REQ_HEADER.unpack_from


class BlkDevice:
    """A virtio-blk device on a :class:`FileBackend`."""

    device_id = int(DeviceId.BLOCK)

    def __init__(self, backend: FileBackend, num_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, serial: str = "pyvirtio-blk",
                 batch: int = 0) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} must be in 1..65535")
        self.backend = backend
        self._num_queues = num_queues
        self._queue_size = queue_size
        self.serial = serial
        self._id = id_bytes(serial)
        self.acked_features = 0
        self.read_only = backend.read_only
        writable = not self.read_only
        self.config = BlkConfig(
            capacity=backend.capacity,
            seg_max=SEG_MAX,
            blk_size=SECTOR_SIZE,
            num_queues=num_queues,
            max_discard_sectors=MAX_DWZ_SECTORS if writable else 0,
            max_discard_seg=MAX_DWZ_SEG if writable else 0,
            # Hole punching works in file-system blocks: advertise 4 KiB granularity.
            discard_sector_alignment=8 if writable else 0,
            max_write_zeroes_sectors=MAX_DWZ_SECTORS if writable else 0,
            max_write_zeroes_seg=MAX_DWZ_SEG if writable else 0,
            write_zeroes_may_unmap=1 if backend.can_punch else 0,
        )
        self._config_bytes = self.config.pack()
        self.completed = 0
        #: Requests one process_queue call completes at most (0: all available;
        #: else half of what is available, capped at ``batch``).  The back end
        #: publishes and interrupts after each call and calls again while the
        #: ring has work, so the driver refills the ring while the device works
        #: on the rest: a pipeline, not a lockstep.
        self.batch = batch

    # ---------------------------------------------------------- VhostUserDevice
    def num_queues(self) -> int:
        return self._num_queues

    def max_queue_size(self) -> int:
        return self._queue_size

    def features(self) -> int:
        bits = [F_VERSION_1, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC,
                BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH]
        if self._num_queues > 1:
            bits.append(BlkFeature.MQ)
        if self.read_only:
            bits.append(BlkFeature.RO)
        else:
            bits += [BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES]
        out = 0
        for b in bits:
            out |= 1 << b
        return out

    def protocol_features(self) -> int:
        return 1 << ProtocolFeature.CONFIG | 1 << ProtocolFeature.MQ

    def set_features(self, features: int) -> None:
        self.acked_features = features

    def get_config(self, offset: int, size: int) -> bytes:
        # Reads past our struct (a newer driver's longer layout) read as zero.
        data = self._config_bytes
        if offset < 0 or size < 0:
            return b""
        chunk = data[offset:offset + size]
        return chunk + bytes(size - len(chunk))

    def set_config(self, offset: int, data: bytes) -> None:
        # Only ``writeback`` is driver-writable, and only with CONFIG_WCE, which
        # we do not offer: ignore the write (the spec leaves it without effect).
        log.debug("ignoring config write of %d bytes at offset %d", len(data), offset)

    def reset(self) -> None:
        self.acked_features = 0

    def process_queue(self, index: int, queue: SplitDeviceQueue) -> int:
        pop_batch = queue.pop_batch
        fill = queue.fill
        execute = self.execute
        done = 0  # published by this call
        n = 0     # filled, not yet published

        def publish() -> None:
            nonlocal done, n
            if n:
                queue.flush(n)
                self.completed += n
                done += n
                n = 0

        try:
            # pop_batch is repeated pop(): same elements, same errors at the same point.
            budget = 0x10000
            if self.batch:
                # Half of what waits (at most ``batch``): the driver gets the first
                # half back while the second is served, even at a low iodepth.
                # (available() fails exactly as the first pop would.)
                budget = min(self.batch, (queue.available() + 1) // 2 or 1)
            while done < budget and (batch := pop_batch(budget - done)):
                left = len(batch)
                try:
                    for elem in batch:
                        left -= 1
                        try:
                            length = execute(elem)
                        except PeerError as exc:
                            # Publish what completed before the bad request, then break the queue.
                            publish()
                            raise queue.mark_broken(
                                f"virtio-blk queue {index}: {exc}") from None
                        fill(elem.head, length, n)
                        n += 1
                except BaseException:
                    # The scalar loop would not have popped the requests after this one.
                    if left:
                        queue.unpop(left)
                    raise
                # Publish each batch before popping the next: a pop that breaks
                # the queue must not strand requests that are already done.
                publish()
        finally:
            if queue.broken is None:
                publish()
        return done

    # ------------------------------------------------------------- requests
    def execute(self, elem: Element) -> int:
        """Run one request and write its status byte; returns the used length."""
        readable = elem.readable
        writable = elem.writable
        if len(readable) == 1 and len(writable) == 1 and len(readable[0]) >= REQ_HEADER_SIZE:
            # The common shape — header (+ OUT data) | (IN data +) status — handled
            # as parse_request + the IN/OUT path below would, without building
            # the request; other types and shapes take the general path.
            first = readable[0]
            rtype, _reserved, sector = _unpack_header(first)
            if rtype <= _OUT:
                last = writable[0]
                backend = self.backend
                nbytes = len(last) - 1 if rtype == _IN else len(first) - REQ_HEADER_SIZE
                if nbytes & 511 or sector > backend.capacity or (
                        nbytes >> 9 > backend.capacity - sector):
                    last[-1] = _IOERR
                    return 1
                if not nbytes:
                    last[-1] = _OK
                    return 1
                if rtype == _IN:
                    status, done = backend.read(sector, [last[:nbytes]], nbytes)
                    last[nbytes] = status
                    return done + 1
                last[-1] = backend.write(sector, [first[REQ_HEADER_SIZE:]], nbytes)
                return 1
        req = parse_request(elem)
        rtype = req.type
        backend = self.backend
        if rtype <= _OUT:  # IN (0) or OUT (1): the hot path; rtype is a u32
            nbytes = req.data_len
            sector = req.sector
            # rw_status inlined: whole sectors inside the disk.
            if nbytes & 511 or sector > backend.capacity or (
                    nbytes >> 9 > backend.capacity - sector):
                req.status[0] = _IOERR
                return 1
            if rtype == _IN:
                done = 0
                status = _OK
                if nbytes:
                    status, done = backend.read(sector, req.data, nbytes)
                req.status[0] = status
                return done + 1
            req.status[0] = backend.write(sector, req.data, nbytes) if nbytes else _OK
            return 1
        if rtype == ReqType.FLUSH:
            req.status[0] = backend.flush()
            return 1
        if rtype == ReqType.GET_ID:
            n = 0
            for view in req.data:
                take = min(len(view), len(self._id) - n)
                view[:take] = self._id[n:n + take]
                n += take
                if n == len(self._id):
                    break
            req.status[0] = _OK
            return n + 1
        if rtype == ReqType.DISCARD or rtype == ReqType.WRITE_ZEROES:
            req.status[0] = self._dwz(req.type, parse_segments(
                req, MAX_DWZ_SEG, MAX_DWZ_SECTORS, backend.capacity))
            return 1
        req.status[0] = _UNSUPP
        return 1

    def _dwz(self, rtype: int, segs: list[tuple[int, int, int]] | Status) -> Status:
        if isinstance(segs, Status):
            return segs
        if self.read_only:
            return _IOERR
        for sector, num, flags in segs:
            if rtype == ReqType.DISCARD:
                status = self.backend.discard(sector, num)
            else:
                status = self.backend.write_zeroes(sector, num, bool(flags & 1))
            if status != _OK:
                return status
        return _OK


__all__ = ["CONFIG_SIZE", "BlkDevice"]
