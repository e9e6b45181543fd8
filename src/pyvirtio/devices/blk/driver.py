"""A virtio-blk driver (front end) in Python, VIRTIO 1.2 §5.2 and §2.7.13.

:class:`BlkDriver` drives one or more request queues — each a
:class:`~pyvirtio.core.queue.DriverQueue` (a split ring, §2.7, or with
``packed=True`` a packed one, §2.8) with a kick and a call eventfd (a
vhost-user ``FrontendQueue``, or anything shaped like it) — and offers:

* a blocking API on byte offsets, like ``os.pread`` / ``os.pwrite``:
  :meth:`~BlkDriver.read`, :meth:`~BlkDriver.write`,
  :meth:`~BlkDriver.flush`, :meth:`~BlkDriver.get_id`,
  :meth:`~BlkDriver.discard`, :meth:`~BlkDriver.write_zeroes` (offsets and
  lengths in bytes, multiples of 512);
* an asynchronous one for many requests in flight: :meth:`~BlkDriver.submit`
  (which, like the request header, counts in 512-byte sectors)
  returns a :class:`Slot`, :meth:`~BlkDriver.kick` notifies the device (only
  when ``kick_prepare`` says so, §2.7.10), :meth:`~BlkDriver.reap` returns
  completed slots, sleeping on the call eventfd after re-arming interrupts
  (``enable_cb``; a True answer means "poll again", so no wake-up is lost).

Each in-flight request owns a slot of guest memory laid out so a request
takes two descriptors (§2.6.4 message framing lets the driver place the
parts freely)::

    base           status byte (writes, flush, id... )
    base+4080      16-byte header   } one readable descriptor for OUT:
    base+4096      data (max_io)    } header + data are contiguous
    base+4096+n    status byte of an IN: data + status is one writable descriptor

The data buffer is page aligned, so back ends that use O_DIRECT accept it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pyvirtio.core.errors import CallerError, PeerError, QueueFull
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.queue import DriverQueue
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_RING_PACKED, F_VERSION_1
from pyvirtio.devices.blk.spec import (
    CONFIG_SIZE_WRITE_ZEROES,
    DWZ_F_UNMAP,
    DWZ_SEGMENT,
    ID_BYTES,
    REQ_HEADER,
    REQ_HEADER_SIZE,
    SECTOR_SIZE,
    BlkConfig,
    BlkFeature,
    ReqType,
    Status,
)
from pyvirtio.transports.vhost_user.messages import ProtocolFeature

if TYPE_CHECKING:
    from pyvirtio.transports.vhost_user.frontend import VhostUserFrontend

PAGE = 4096
DEFAULT_MAX_IO = 128 * 1024
DEFAULT_TIMEOUT = 30.0

# Device features this driver understands (§5.2.3) plus the ring features.
DRIVER_FEATURES = (
    1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX
    | 1 << BlkFeature.SIZE_MAX | 1 << BlkFeature.SEG_MAX | 1 << BlkFeature.GEOMETRY
    | 1 << BlkFeature.RO | 1 << BlkFeature.BLK_SIZE | 1 << BlkFeature.FLUSH
    | 1 << BlkFeature.TOPOLOGY | 1 << BlkFeature.MQ | 1 << BlkFeature.DISCARD
    | 1 << BlkFeature.WRITE_ZEROES
)

_pack_header = REQ_HEADER.pack_into
_IN = int(ReqType.IN)
_GET_ID = int(ReqType.GET_ID)
_perf_ns = time.perf_counter_ns


class BlkIOError(OSError):
    """The device completed a request with IOERR (EIO) or UNSUPP (EOPNOTSUPP)."""

    def __init__(self, status: int, what: str) -> None:
        code = errno.EOPNOTSUPP if status == Status.UNSUPP else errno.EIO
        name = Status(status).name if status in (0, 1, 2) else str(status)
        super().__init__(code, f"{what}: device status {name}")
        self.status = status


class QueuePort(Protocol):
    """What the driver needs of one queue: the ring and its two eventfds."""

    @property
    def queue(self) -> DriverQueue: ...

    @property
    def kick(self) -> _Signal: ...

    @property
    def call(self) -> _Waitable: ...


class _Signal(Protocol):
    def signal(self) -> None: ...


class _Waitable(Protocol):
    def wait(self, timeout: float | None = None) -> int: ...


@dataclass(eq=False, slots=True)
class Slot:
    """One request's guest memory and, while in flight, its state."""

    index: int
    queue: int
    status_gpa: int
    header_gpa: int
    data_gpa: int
    header: memoryview
    data: memoryview          # max_io + 1 bytes: room for an IN's trailing status
    status_byte: memoryview
    type: int = -1
    sector: int = 0
    nbytes: int = 0
    status: int = -1
    used_len: int = 0
    done: bool = False
    submit_ns: int = 0
    user: object = field(default=None)

    def payload(self) -> memoryview:
        """The data of a completed read (``nbytes`` bytes, a view into guest memory)."""
        return self.data[:self.nbytes]


class BlkDriver:
    """virtio-blk requests over one or more request queues."""

    def __init__(self, ports: Sequence[QueuePort], memory: GuestMemory,
                 alloc: Callable[[int, int], int], features: int, config: BlkConfig,
                 max_io: int = DEFAULT_MAX_IO, timeout: float = DEFAULT_TIMEOUT,
                 frontend: VhostUserFrontend | None = None, spin: float = 0.0) -> None:
        if max_io <= 0 or max_io % SECTOR_SIZE:
            raise CallerError(f"max_io {max_io} must be a positive multiple of 512")
        if not ports:
            raise CallerError("a virtio-blk driver needs at least one queue")
        self.ports = list(ports)
        self.memory = memory
        self._alloc = alloc
        self.features = features
        self.config = config
        self.max_io = max_io
        self.timeout = timeout
        #: Seconds :meth:`reap` busy-polls the used ring before sleeping on the
        #: call eventfd (0: sleep at once).  Trades front-end CPU for the
        #: wake-up latency, like a guest driver's polled completions.
        self.spin = spin
        self.frontend = frontend
        self.read_only = bool(features >> BlkFeature.RO & 1)
        self.capacity = config.capacity
        # A request takes two descriptors; keep the slot count within the ring.
        self._depth = [p.queue.num // 2 for p in self.ports]
        self._slots: list[list[Slot]] = [[] for _ in self.ports]
        self._free: list[list[Slot]] = [[] for _ in self.ports]
        self._stride = 2 * PAGE + max_io
        self.kicks = 0
        self.interrupts = 0
        self.completed = 0
        self._next_queue = 0

    # ------------------------------------------------------------ connecting
    @classmethod
    def connect(cls, path: str, *, num_queues: int | None = None, queue_size: int = 256,
                max_io: int = DEFAULT_MAX_IO, timeout: float = DEFAULT_TIMEOUT,
                spin: float = 0.0, packed: bool = False, inflight: bool = False) -> BlkDriver:
        """Connect to a vhost-user-blk socket, negotiate, and set up the queues.

        ``packed``: ask for VIRTIO_F_RING_PACKED (§2.8); PeerError if the back
        end does not offer it.
        """
        from pyvirtio.transports.vhost_user.frontend import VhostUserFrontend

        nq_hint = num_queues or 1
        memory_size = nq_hint * (queue_size // 2) * (2 * PAGE + max_io) + (8 << 20)
        memory_size = (memory_size + (2 << 20) - 1) & ~((2 << 20) - 1)
        fe = VhostUserFrontend.connect(path, memory_size=memory_size, inflight=inflight)
        try:
            offered = fe.get_features()
            if packed and not offered >> F_RING_PACKED & 1:
                raise PeerError("the back end does not offer VIRTIO_F_RING_PACKED")
            acked = fe.negotiate(offered & (DRIVER_FEATURES | int(packed) << F_RING_PACKED))
            proto = fe.protocol_features
            if proto >> ProtocolFeature.CONFIG & 1:
                config = BlkConfig.unpack(fe.get_config(0, CONFIG_SIZE_WRITE_ZEROES))
            else:
                raise PeerError("the back end does not offer VHOST_USER_PROTOCOL_F_CONFIG: "
                                "the disk capacity cannot be read")
            available = config.num_queues if acked >> BlkFeature.MQ & 1 else 1
            if proto >> ProtocolFeature.MQ & 1:
                available = min(available, fe.get_queue_num())
            nq = max(1, min(available, num_queues or 1))
            if inflight:  # the buffer before the rings start (reconnect() hands it back)
                fe.setup_inflight(nq, queue_size)
            ports = [fe.setup_ring(i, queue_size) for i in range(nq)]
        except BaseException:
            fe.close()
            raise
        return cls(ports, fe.memory, fe.alloc, acked, config, max_io=max_io,
                   timeout=timeout, frontend=fe, spin=spin)

    def close(self) -> None:
        if self.frontend is not None:
            self.frontend.close()
            self.frontend = None

    def reconnect(self, path: str | None = None, timeout: float = 10.0) -> None:
        """The back end died or restarted: connect again and resume every queue.

        :meth:`VhostUserFrontend.reconnect`; requests in flight stay in
        flight.  Connected with ``inflight=True``, the new back end resubmits
        them (in the order they were made available) and :meth:`reap` gets
        each exactly once.
        """
        if self.frontend is None:
            raise CallerError("reconnect: the driver is not on a vhost-user front end")
        self.frontend.reconnect(path, timeout=timeout)

    def __enter__(self) -> BlkDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- slots
    @property
    def num_queues(self) -> int:
        return len(self.ports)

    def depth(self, queue: int = 0) -> int:
        """How many requests queue ``queue`` can have in flight."""
        return self._depth[queue]

    def _new_slot(self, qi: int) -> Slot:
        base = self._alloc(self._stride, PAGE)
        mem = self.memory
        status_gpa = base
        header_gpa = base + PAGE - REQ_HEADER_SIZE
        data_gpa = base + PAGE
        slot = Slot(len(self._slots[qi]), qi, status_gpa, header_gpa, data_gpa,
                    mem.translate(header_gpa, REQ_HEADER_SIZE),
                    mem.translate(data_gpa, self.max_io + 1),
                    mem.translate(status_gpa, 1))
        self._slots[qi].append(slot)
        return slot

    def _get_slot(self, qi: int) -> Slot:
        free = self._free[qi]
        if free:
            return free.pop()
        if len(self._slots[qi]) >= self._depth[qi]:
            raise QueueFull(f"queue {qi}: {self._depth[qi]} requests already in flight")
        return self._new_slot(qi)

    def release(self, slot: Slot) -> None:
        """Give a completed slot back (its data view must not be used afterwards)."""
        if not slot.done:
            raise CallerError("release of a slot still in flight")
        slot.done = False
        slot.user = None
        self._free[slot.queue].append(slot)

    def in_flight(self, queue: int = 0) -> int:
        return self.ports[queue].queue.outstanding

    # ---------------------------------------------------------------- submit
    def prepare(self, queue: int = 0) -> Slot:
        """A free slot whose ``data`` the caller may fill before :meth:`submit_slot`."""
        return self._get_slot(queue)

    def submit(self, rtype: int, sector: int = 0, nbytes: int = 0, *, queue: int = 0,
               data: bytes | bytearray | memoryview | None = None, kick: bool = True) -> Slot:
        """Queue one request of type ``rtype`` at ``sector`` (512-byte units, §5.2.6).

        ``data`` is copied into the slot for OUT (and sets ``nbytes``);
        ``nbytes`` is the length of an IN.  Returns the slot to :meth:`wait`
        on; :meth:`release` it after reading its result.
        """
        slot = self._get_slot(queue)
        try:
            if data is not None:
                nbytes = len(data)
                if nbytes > self.max_io:
                    raise CallerError(f"{nbytes} bytes exceed max_io {self.max_io}")
                slot.data[:nbytes] = data
            self.submit_slot(slot, rtype, sector, nbytes, kick=kick)
        except BaseException:
            self._free[queue].append(slot)
            raise
        return slot

    def submit_slot(self, slot: Slot, rtype: int, sector: int = 0, nbytes: int = 0,
                    *, kick: bool = True) -> None:
        """Queue a request in ``slot`` (from :meth:`prepare`; OUT data already in place)."""
        if nbytes > self.max_io or nbytes < 0:
            raise CallerError(f"{nbytes} bytes exceed max_io {self.max_io}")
        _pack_header(slot.header, 0, rtype, 0, sector)
        slot.type = rtype
        slot.sector = sector
        slot.nbytes = nbytes
        slot.status = -1
        slot.used_len = 0
        slot.done = False
        if rtype in (_IN, _GET_ID):
            if rtype == _GET_ID:
                nbytes = slot.nbytes = ID_BYTES
            # Poison the status byte so a device that "completes" without writing it shows.
            slot.data[nbytes] = 0xFF
            out = ((slot.header_gpa, REQ_HEADER_SIZE),)
            inn = ((slot.data_gpa, nbytes + 1),)
        else:
            slot.status_byte[0] = 0xFF
            out = ((slot.header_gpa, REQ_HEADER_SIZE + nbytes),)
            inn = ((slot.status_gpa, 1),)
        slot.submit_ns = _perf_ns()
        self.ports[slot.queue].queue.add(out, inn, slot)
        if kick:
            self.kick(slot.queue)

    def kick(self, queue: int = 0) -> bool:
        """Notify the device of new requests if it asked for it; True if a kick was sent."""
        port = self.ports[queue]
        if port.queue.kick_prepare():
            port.kick.signal()
            self.kicks += 1
            return True
        return False

    # ------------------------------------------------------------------ reap
    def poll(self, queue: int = 0) -> list[Slot]:
        """Completed requests of ``queue`` without waiting."""
        # One used_event publication for the whole batch (split_driver.get_bufs).
        bufs = self.ports[queue].queue.get_bufs()
        if not bufs:
            return []
        out: list[Slot] = []
        append = out.append
        for slot, length in bufs:
            assert isinstance(slot, Slot)
            # The status byte: after the data of an IN / GET_ID, else its own.
            if slot.type == _IN or slot.type == _GET_ID:
                slot.status = slot.data[slot.nbytes]
            else:
                slot.status = slot.status_byte[0]
            slot.used_len = length
            slot.done = True
            append(slot)
        self.completed += len(out)
        return out

    def reap(self, queue: int = 0, timeout: float | None = None) -> list[Slot]:
        """At least one completed request of ``queue``; sleeps on the call eventfd.

        Raises TimeoutError after ``timeout`` (default: the driver's) seconds
        without any completion, and CallerError if nothing is in flight.
        """
        port = self.ports[queue]
        q = port.queue
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            done = self.poll(queue)
            if done:
                return done
            if not q.outstanding:
                raise CallerError(f"queue {queue}: nothing in flight to wait for")
            if self.spin > 0 and self._spin_until_used(
                    q, min(time.monotonic() + self.spin, deadline)):
                continue
            if q.enable_cb():
                continue  # buffers arrived while re-arming: no interrupt will tell us
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {queue}: no completion within {limit} s")
            self.interrupts += port.call.wait(left)

    @staticmethod
    def _spin_until_used(q: DriverQueue, until: float) -> bool:
        """Busy-poll used.idx until ``until`` (time.monotonic); True if buffers came."""
        more = q.more_used
        now = time.monotonic
        while now() < until:
            if more():
                return True
        return more()

    def wait(self, slot: Slot, timeout: float | None = None) -> Slot:
        """Block until ``slot`` completes (others that complete meanwhile are marked done)."""
        while not slot.done:
            self.reap(slot.queue, timeout)
        return slot

    # -------------------------------------------------------- blocking API
    def _pick_queue(self) -> int:
        qi = self._next_queue
        self._next_queue = (qi + 1) % len(self.ports)
        return qi

    def _run(self, rtype: int, sector: int, nbytes: int = 0,
             data: bytes | bytearray | memoryview | None = None, what: str = "") -> Slot:
        qi = self._pick_queue()
        slot = self.submit(rtype, sector, nbytes, queue=qi, data=data)
        self.wait(slot)
        if slot.status != Status.OK:
            status = slot.status
            self.release(slot)
            raise BlkIOError(status, what or ReqType(rtype).name)
        return slot

    @staticmethod
    def _check_range(offset: int, nbytes: int) -> None:
        """Refuse byte ranges the device cannot address: virtio-blk counts in sectors (§5.2.6)."""
        for name, value in (("offset", offset), ("nbytes", nbytes)):
            if value < 0 or value % SECTOR_SIZE:
                raise CallerError(f"{name} {value}: must be a non-negative multiple of "
                                  f"{SECTOR_SIZE} (the virtio-blk sector size)")

    def read(self, offset: int, nbytes: int) -> bytes:
        """Read ``nbytes`` bytes of the disk starting at byte ``offset``, like ``os.pread``.

        Both must be multiples of 512 (the virtio-blk sector size, §5.2.6),
        else CallerError.  Longer reads are split into requests of at most
        ``max_io`` bytes.  A device error raises :class:`BlkIOError`.
        """
        self._check_range(offset, nbytes)
        out = bytearray()
        while nbytes:
            n = min(nbytes, self.max_io)
            slot = self._run(ReqType.IN, offset // SECTOR_SIZE, n, what=f"read at offset {offset}")
            out += slot.payload()
            self.release(slot)
            offset += n
            nbytes -= n
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to the disk starting at byte ``offset``, like ``os.pwrite``.

        ``offset`` and ``len(data)`` must be multiples of 512 (the virtio-blk
        sector size, §5.2.6), else CallerError.  Returns once the device has
        completed every request; call :meth:`flush` to make the data durable.
        """
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        done = 0
        while done < len(view):
            n = min(len(view) - done, self.max_io)
            slot = self._run(ReqType.OUT, (offset + done) // SECTOR_SIZE,
                             data=view[done:done + n], what=f"write at offset {offset + done}")
            self.release(slot)
            done += n

    def flush(self) -> None:
        """VIRTIO_BLK_T_FLUSH on every queue: completed writes reach stable storage."""
        for qi in range(len(self.ports)):
            slot = self.submit(ReqType.FLUSH, queue=qi)
            self.wait(slot)
            status = slot.status
            self.release(slot)
            if status != Status.OK:
                raise BlkIOError(status, "flush")

    def get_id(self) -> str:
        """The device's serial number (VIRTIO_BLK_T_GET_ID, at most 20 bytes)."""
        slot = self._run(ReqType.GET_ID, 0, what="get_id")
        raw = bytes(slot.payload())
        self.release(slot)
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    def discard(self, offset: int, nbytes: int) -> None:
        """Tell the device ``nbytes`` bytes at byte ``offset`` are unused (VIRTIO_BLK_T_DISCARD).

        Both must be multiples of 512.  Needs VIRTIO_BLK_F_DISCARD; the
        device answers UNSUPP (:class:`BlkIOError`) otherwise.
        """
        self._dwz(ReqType.DISCARD, offset, nbytes, 0)

    def write_zeroes(self, offset: int, nbytes: int, unmap: bool = False) -> None:
        """Zero ``nbytes`` bytes at byte ``offset`` (VIRTIO_BLK_T_WRITE_ZEROES).

        Both must be multiples of 512.  ``unmap=True`` lets the device
        deallocate the range instead of writing zeroes (reads still return
        zeroes).  Needs VIRTIO_BLK_F_WRITE_ZEROES.
        """
        self._dwz(ReqType.WRITE_ZEROES, offset, nbytes, DWZ_F_UNMAP if unmap else 0)

    def _dwz(self, rtype: int, offset: int, nbytes: int, flags: int) -> None:
        self._check_range(offset, nbytes)
        sectors = nbytes // SECTOR_SIZE
        if sectors > 0xFFFF_FFFF:  # num_sectors is a le32 (§5.2.6)
            raise CallerError(f"nbytes {nbytes}: one request covers at most "
                              f"{0xFFFF_FFFF * SECTOR_SIZE} bytes")
        self._dwz_segments(rtype, [(offset // SECTOR_SIZE, sectors, flags)])

    def _dwz_segments(self, rtype: int, segments: list[tuple[int, int, int]]) -> None:
        payload = b"".join(DWZ_SEGMENT.pack(s, n, f) for s, n, f in segments)
        if len(payload) > self.max_io:
            raise CallerError("too many segments")
        slot = self._run(rtype, 0, data=payload, what=ReqType(rtype).name.lower())
        self.release(slot)

    # ------------------------------------------------------------ describing
    def describe(self) -> dict[str, object]:
        return {
            "capacity_sectors": self.capacity,
            "capacity_bytes": self.capacity * SECTOR_SIZE,
            "read_only": self.read_only,
            "num_queues": len(self.ports),
            "queue_depth": self._depth,
            "features": self.features,
        }
