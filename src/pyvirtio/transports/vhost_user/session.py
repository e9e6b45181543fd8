"""The vhost-user back end's protocol state machine: one session per front-end connection.

Implements QEMU docs/interop/vhost-user.rst: "Ring states" (stopped / started
but disabled / started and enabled; a ring starts on SET_VRING_KICK, stops on
GET_VRING_BASE; without VHOST_USER_F_PROTOCOL_FEATURES it starts enabled,
with it disabled until SET_VRING_ENABLE 1), "Memory access" and "Memory
regions description" (regions mmapped from their fds at their mmap offsets;
ring addresses are user addresses, descriptors hold guest addresses),
"Multiple queue support", "Front-end message types" and "REPLY_ACK", and
"Back-end communication": with protocol feature BACKEND_REQ (SLAVE_REQ in
QEMU 7.2) the front end hands over a socket with SET_BACKEND_REQ_FD, and
when a ring breaks the back end sends CONFIG_CHANGE_MSG on it (with
need_reply when REPLY_ACK is negotiated) after setting NEEDS_RESET (VIRTIO
1.2 §2.1.2: the device sets DEVICE_NEEDS_RESET and, when DRIVER_OK is set,
sends a configuration change notification).  The ring
layout itself is VIRTIO 1.2 §2.7, handled by
:class:`~pyvirtio.core.split_device.SplitDeviceQueue`.

:meth:`VhostUserSession.handle` takes one decoded :class:`Message` and
returns an :class:`Outcome`: the replies to send, the rings that just became
runnable, and the fds the I/O layer must start or stop watching (kick fds,
the back-end channel).  It never reads or writes a socket; the fds it keeps
(kick, call, err, back-end channel) are plain ints the I/O layer
(``server.py``) watches and writes to.  It does close the fds it replaces,
``mmap``s the memory regions it is given, and interrupts the driver through
the ``signal`` callable the I/O layer passes in (one eventfd write): those
are the only system calls.  Broken rules raise :class:`PeerError` — unless
the request asked for a REPLY_ACK, in which case the error becomes a
non-zero reply and the connection survives.

Ring processing is the device kit's (:class:`~pyvirtio.transports.device.VirtQueue`):
the session keeps one per started ring, rebinds it when the memory table or
the features change the ring's mapping, and closes it (the device's
``queue_stopped``) when the ring stops.  A ring configuration message that is
refused leaves that ring unusable until it is configured again: the back end
never carries on with the values from before the refusal.

The ring layout is VIRTIO 1.2 §2.7, or — when ``VIRTIO_F_RING_PACKED``
(bit 34) was negotiated — §2.8, handled by
:class:`~pyvirtio.core.packed_device.PackedDeviceQueue`.  For a packed ring
(vhost-user.rst "Vring descriptor indices for packed virtqueues")
SET_VRING_ADDR's three addresses are the descriptor ring, the driver event
suppression area and the device event suppression area; the ring size need
not be a power of two; SET_VRING_BASE and GET_VRING_BASE carry in bits 0-14
the next available position, in bit 15 its wrap counter, in bits 16-30 the
next used position and in bit 31 its wrap counter.  A SET_VRING_BASE whose
upper half is 0 sets the used position to the available one: DPDK's vhost
library reads only the lower half (nothing is in flight when a ring
starts), and its virtio_user front end sends only that.

Inflight I/O tracking (protocol feature INFLIGHT_SHMFD, vhost-user.rst
"Inflight I/O tracking", split rings only): GET_INFLIGHT_FD allocates a
sealed memfd for the queues the front end names and returns it;
SET_INFLIGHT_FD maps the buffer the front end keeps across back-end
restarts (refused, and the connection dropped, for a buffer too small for
its geometry, an unaligned offset, a range beyond the file, a file that
could shrink, a missing fd, or a packed ring).  Rings are then
:class:`~pyvirtio.transports.vhost_user.inflight.InflightSplitQueue` objects;
a ring that starts resubmits what its region shows in flight, and its
``last_avail_idx`` is the used index plus those (QEMU sends the used index
as VRING_BASE after a back end died).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.layout import (
    RingViews,
    SplitLayout,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_ring_size,
)
from pyvirtio.core.memory import GuestMemory, Region
from pyvirtio.core.packed_device import PackedDeviceQueue
from pyvirtio.core.packed_layout import (
    EVENT_SIZE,
    OFF_MASK,
    PackedLayout,
    PackedRingViews,
    is_valid_packed_queue_size,
    packed_ring_size,
)
from pyvirtio.core.queue import DeviceQueue
from pyvirtio.core.spec import F_RING_PACKED, MAX_QUEUE_SIZE, Status
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.transports.device import DeviceProtocol, VirtQueue, offered_features
from pyvirtio.transports.stats import DeviceStats
from pyvirtio.transports.vhost_user.inflight import InflightRegion, InflightSplitQueue
from pyvirtio.transports.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    MAX_CONFIG_SIZE,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
    BackendMessage,
    BackendRequest,
    ConfigSpace,
    InflightDesc,
    MemoryTable,
    MemRegion,
    Message,
    Payload,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    backend_request,
    reply,
)

__all__ = ["MAX_MEM_SLOTS", "SUPPORTED_PROTOCOL_FEATURES", "Outcome", "Ring", "RunResult",
           "VhostUserSession"]

#: Protocol features the back end implements (and offers).  BACKEND_REQ
#: goes with REPLY_ACK: the back end asks for (and reads) an ack of each
#: back-end request when REPLY_ACK is negotiated, without ever waiting for it.
#: INFLIGHT_SHMFD works for every device of the kit (the tracking is in the ring).
SUPPORTED_PROTOCOL_FEATURES: Final = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.INFLIGHT_SHMFD
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.BACKEND_REQ
    | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
    | 1 << ProtocolFeature.RESET_DEVICE
    | 1 << ProtocolFeature.STATUS
)

#: Memory regions a front end may add with ADD_MEM_REG (GET_MAX_MEM_SLOTS), by default.
#: vhost-user.rst leaves the number to the back end ("the maximum number of memory
#: slots for QEMU to expose to the guest"; QEMU caps it at its own platform limit,
#: 256 or 512).  509 is what rust-vmm's vhost-user-backend and libvhost-user (QEMU 9.0
#: on) answer: KVM's old slot count.  A region costs us one mapping and a bisect entry
#: (no fd: it is closed once mapped), so 509 is cheap.
MAX_MEM_SLOTS: Final = 509

#: Requests whose reply has its own body: REPLY_ACK cannot report an error for them.
_HAS_REPLY = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
    Request.GET_INFLIGHT_FD,
})

_VHOST_VRING_F_LOG = 1

#: Requests that configure a ring's layout or position.
_RING_CONFIG = frozenset({Request.SET_VRING_NUM, Request.SET_VRING_ADDR, Request.SET_VRING_BASE})


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(eq=False)
class Ring:
    """Back-end state of one ring (vhost-user.rst "Ring states")."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    #: The queue's get_state() while no queue object exists (SET_VRING_BASE);
    #: None: a fresh ring (split 0/0; packed position 0 with wrap counters 1).
    saved: tuple[int, int] | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool = False
    queue: DeviceQueue | None = None
    #: The device's handle on the ring while it is started (the kit's VirtQueue).
    vq: VirtQueue | None = None

    @property
    def state(self) -> str:
        if not self.started:
            return "stopped"
        return "enabled" if self.enabled else "disabled"

    @property
    def runnable(self) -> bool:
        """Started, enabled, mapped and not broken: the back end may process it."""
        q = self.queue
        return self.started and self.enabled and q is not None and q.broken is None

    @property
    def polled(self) -> bool:
        """Started with the invalid-fd flag: poll it instead of waiting for kicks."""
        return self.started and self.kick_fd is None

    def base(self, packed: bool = False) -> tuple[int, int]:
        if self.queue is not None:
            return self.queue.get_state()
        if self.saved is not None:
            return self.saved
        return (1 << 15, 1 << 15) if packed else (0, 0)

    def close_fds(self) -> None:
        _close(self.kick_fd)
        _close(self.call_fd)
        _close(self.err_fd)
        self.kick_fd = self.call_fd = self.err_fd = None


@dataclass
class Outcome:
    """What handling one message produced: replies, rings to run, fds to (un)watch."""

    replies: list[Message] = field(default_factory=list)
    #: Rings that just became started and enabled: process them once now, since
    #: buffers may already wait (a kick sent before the ring started is lost).
    start: list[int] = field(default_factory=list)
    #: Rings whose kick fd changed (watch ``rings[i].kick_fd`` now; None: stop).
    kicks: list[int] = field(default_factory=list)
    #: The back-end channel changed (watch ``backend_fd`` now; None: stop).
    channel: bool = False
    #: An error reported to the front end with a non-zero REPLY_ACK (log it).
    error: str | None = None


@dataclass
class RunResult:
    """What processing one ring produced."""

    published: int = 0
    #: The ring broke during this run, for this reason (``on_broken`` was called).
    broken: str | None = None
    #: The ring started from its inflight region with this many requests to resubmit
    #: (None: it did not start now, or has no region).
    resubmitted: int | None = None


def _no_signal(fd: int) -> None:
    """The default ``signal`` of a session nobody waits on (tests of the protocol alone)."""


def _no_broken(index: int, reason: str) -> None:
    """The default ``on_broken``."""


class VhostUserSession:
    """Protocol state of one front-end connection, serving ``device``.

    ``signal(fd)`` interrupts the driver through a call eventfd;
    ``on_broken(index, reason)`` tells the I/O layer a ring broke (log it,
    write the ring's err fd, send :meth:`config_change_message`);
    ``schedule(callback)`` runs a callback soon on the serving loop
    (completions the device makes outside a kick are published from there).
    ``stats`` accumulates the counters of the rings this session starts and
    stops (docs/stats.md).
    """

    def __init__(self, device: DeviceProtocol, *, max_mem_slots: int = MAX_MEM_SLOTS,
                 backend_req: bool = True, signal: Callable[[int], None] = _no_signal,
                 on_broken: Callable[[int, str], None] = _no_broken,
                 schedule: Callable[[Callable[[], None]], None] | None = None,
                 stats: DeviceStats | None = None) -> None:
        self.device = device
        self.stats = stats
        self.max_mem_slots = max_mem_slots
        self.signal = signal
        self.on_broken = on_broken
        self.schedule = schedule
        self.offered_features = offered_features(device.device_features) | 1 << F_PROTOCOL_FEATURES
        self.offered_protocol = SUPPORTED_PROTOCOL_FEATURES
        if not backend_req:
            self.offered_protocol &= ~(1 << ProtocolFeature.BACKEND_REQ)
        self.num_queues = device.num_queues
        if not 1 <= self.num_queues <= VRING_INDEX_MASK + 1:
            raise CallerError(f"a vhost-user device has 1..{VRING_INDEX_MASK + 1} queues, "
                              f"not {self.num_queues}")
        self.max_queue_size = min(device.queue_size, MAX_QUEUE_SIZE)
        self.features = 0
        self.protocol = 0
        self.protocol_set = False
        self.owner = False
        self.status = 0
        self.memory: GuestMemory | None = None
        self.rings = [Ring(i) for i in range(self.num_queues)]
        #: The back-end channel (SET_BACKEND_REQ_FD), non-blocking; None without one.
        self.backend_fd: int | None = None
        #: Back-end requests sent with need_reply whose REPLY_ACK has not come yet.
        self._awaiting: deque[BackendRequest] = deque()
        self._adopted: set[int] = set()
        #: The inflight buffer in use (SET_INFLIGHT_FD), and the one last allocated
        #: by GET_INFLIGHT_FD (kept open until replaced: its fd goes out in the reply).
        self.inflight: InflightRegion | None = None
        self._inflight_offer: InflightRegion | None = None
        # Requests a ring found in flight when it started, until run_ring reports them.
        self._resubmitted: dict[int, int] = {}
        self._handlers: dict[Request, Callable[[Message], Payload | _NoReply | _WithFds]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.RESET_DEVICE: self._reset_device,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
        }
        self._outcome = Outcome()

    # ------------------------------------------------------------ negotiated
    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol >> ProtocolFeature.REPLY_ACK & 1)

    @property
    def protocol_features_negotiated(self) -> bool:
        """VHOST_USER_F_PROTOCOL_FEATURES is in force (acked, or protocol features set)."""
        return bool(self.features >> F_PROTOCOL_FEATURES & 1) or self.protocol_set

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was acknowledged: every ring is a packed one (§2.8)."""
        return bool(self.features >> F_RING_PACKED & 1)

    @property
    def virtio_features(self) -> int:
        """The acknowledged virtio feature bits, without the vhost-user bit 30."""
        return self.features & ~(1 << F_PROTOCOL_FEATURES)

    def _has_protocol(self, bit: ProtocolFeature, request: Request) -> None:
        if not self.protocol >> bit & 1:
            raise PeerError(f"{request.name} without protocol feature {bit.name} negotiated")

    # ---------------------------------------------------------------- handle
    def handle(self, msg: Message) -> Outcome:
        """Apply one request; returns the replies to send and the rings to run now.

        Raises :class:`PeerError` when the connection must be dropped.  The fds
        of ``msg`` are kept (kick, call, err) or closed here.
        """
        self._outcome = out = Outcome()
        self._adopted = set()
        handler = self._handlers.get(msg.request)
        try:
            if handler is None:
                raise PeerError(f"{msg.request.name} is not supported")
            result = handler(msg)
        except PeerError as exc:
            out.start.clear()
            self._unconfigure_refused(msg)
            if msg.need_reply and self.reply_ack and msg.request not in _HAS_REPLY:
                out.replies.append(reply(msg.request, 1))
                out.error = f"{msg.request.name} refused: {exc}"
                return out
            raise
        finally:
            for fd in msg.fds:
                if fd not in self._adopted:
                    _close(fd)
        if isinstance(result, _WithFds):
            out.replies.append(reply(msg.request, result.payload, result.fds))
        elif not isinstance(result, _NoReply):
            out.replies.append(reply(msg.request, result))
        elif msg.need_reply and self.reply_ack:
            out.replies.append(reply(msg.request, 0))
        return out

    def _unconfigure_refused(self, msg: Message) -> None:
        """A refused ring configuration leaves the ring unusable until configured again.

        Carrying on with the values from before the refusal would have the
        back end write a used ring where the front end (which may ignore the
        NACK) no longer expects one.
        """
        if msg.request not in _RING_CONFIG:
            return
        payload = msg.payload
        index = payload.index if isinstance(payload, VringState | VringAddr) else -1
        if 0 <= index < self.num_queues:
            ring = self.rings[index]
            self._close_vq(ring)
            ring.queue = None
            ring.num = 0
            ring.addr = None
            ring.saved = None

    def _ring(self, index: int, request: Request) -> Ring:
        if not 0 <= index < self.num_queues:
            raise PeerError(f"{request.name}: ring {index} beyond the {self.num_queues} queues")
        return self.rings[index]

    # -------------------------------------------------------------- features
    def _get_features(self, msg: Message) -> Payload:
        return self.offered_features

    def _set_features(self, msg: Message) -> _NoReply:
        assert isinstance(msg.payload, int)
        extra = msg.payload & ~self.offered_features
        if extra:
            raise PeerError(f"SET_FEATURES acks bits {extra:#x} that were not offered")
        self.features = msg.payload
        self.device.set_features(self.virtio_features)
        for ring in self.rings:
            if ring.queue is not None:
                self._map_ring(ring, strict=False)
        return NO_REPLY

    def _get_protocol_features(self, msg: Message) -> Payload:
        return self.offered_protocol

    def _set_protocol_features(self, msg: Message) -> _NoReply:
        assert isinstance(msg.payload, int)
        extra = msg.payload & ~self.offered_protocol
        if extra:
            raise PeerError(f"SET_PROTOCOL_FEATURES sets bits {extra:#x} that were not offered")
        self.protocol = msg.payload
        self.protocol_set = True
        return NO_REPLY

    def _set_owner(self, msg: Message) -> _NoReply:
        self.owner = True
        return NO_REPLY

    def _reset_owner(self, msg: Message) -> _NoReply:
        # Deprecated; the spec recommends ignoring it or disabling all rings.
        for ring in self.rings:
            ring.enabled = False
        return NO_REPLY

    # ---------------------------------------------------------------- memory
    def _map_region(self, memory: GuestMemory, region: MemRegion, fd: int) -> None:
        # map_fd refuses empty, wrapping and past-the-end-of-file regions (PeerError).
        try:
            mapped = memory.map_fd(fd, region.size, region.gpa, region.mmap_offset,
                                   region.uaddr)
        except CallerError as exc:
            raise PeerError(f"memory region rejected: {exc}") from None
        mapped.fd = -1  # closed by handle(); the mapping outlives it

    def _replace_memory(self, memory: GuestMemory | None) -> None:
        old = self.memory
        self.memory = memory
        for ring in self.rings:
            if ring.addr is not None:
                self._map_ring(ring, strict=False)
        if old is not None and old is not memory:
            old.close()

    def _set_mem_table(self, msg: Message) -> _NoReply:
        table = msg.payload
        assert isinstance(table, MemoryTable)
        memory = GuestMemory()
        try:
            for region, fd in zip(table.regions, msg.fds, strict=True):
                self._map_region(memory, region, fd)
        except BaseException:
            memory.close()
            raise
        self._replace_memory(memory)
        return NO_REPLY

    def _get_max_mem_slots(self, msg: Message) -> Payload:
        self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, msg.request)
        return self.max_mem_slots

    def _add_mem_reg(self, msg: Message) -> _NoReply:
        self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, msg.request)
        region = msg.payload
        assert isinstance(region, MemRegion)
        memory = self.memory if self.memory is not None else GuestMemory()
        if len(memory.regions) >= self.max_mem_slots:
            raise PeerError(f"ADD_MEM_REG beyond the {self.max_mem_slots} memory slots")
        self._map_region(memory, region, msg.fds[0])
        self._replace_memory(memory)
        return NO_REPLY

    def _rem_mem_reg(self, msg: Message) -> _NoReply:
        self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, msg.request)
        region = msg.payload
        assert isinstance(region, MemRegion)
        memory = self.memory
        found: Region | None = None
        if memory is not None:
            for r in memory.regions:
                if r.gpa == region.gpa and r.size == region.size and r.uaddr == region.uaddr:
                    found = r
        if memory is None or found is None:
            raise PeerError(f"REM_MEM_REG: no region gpa={region.gpa:#x} size={region.size:#x} "
                            f"uaddr={region.uaddr:#x}")
        memory.remove_region(found.gpa, found.size)
        self._replace_memory(memory)
        found.view.release()
        if isinstance(found.owner, mmap.mmap):
            with contextlib.suppress(BufferError):
                found.owner.close()
        return NO_REPLY

    # ----------------------------------------------------------------- rings
    def _map_ring(self, ring: Ring, *, strict: bool) -> None:
        """(Re)build the ring's queue from its addresses, keeping its indices.

        ``strict``: raise when the addresses do not translate (SET_VRING_ADDR);
        otherwise (memory table or feature change) leave the ring unmapped until
        the memory comes back.
        """
        old = ring.queue
        packed = self.packed
        if old is not None:
            # The ring kind changed with the features: its positions mean nothing now.
            same_kind = isinstance(old, PackedDeviceQueue) == packed
            ring.saved = old.get_state() if same_kind else None
        ring.queue = None
        addr = ring.addr
        if addr is None or ring.num == 0:
            self._close_vq(ring)
            return
        try:
            if self.memory is None:
                raise PeerError("ring addresses set before any memory table")
            num = ring.num
            mem = self.memory
            if packed:
                self._map_packed_ring(ring, old, mem)
                return
            if not is_valid_queue_size(num):
                raise PeerError(f"split ring size {num} is not a power of two")
            layout = SplitLayout.modern(num, addr.desc, addr.avail, addr.used)
            views = RingViews(layout, mem.translate_uaddr(addr.desc, desc_table_size(num)),
                              mem.translate_uaddr(addr.avail, avail_ring_size(num)),
                              mem.translate_uaddr(addr.used, used_ring_size(num)))
        except PeerError as exc:
            self._close_vq(ring)
            if strict:
                raise PeerError(f"ring {ring.index}: {exc}") from None
            return
        inflight = self.inflight
        if inflight is not None and ring.index < inflight.num_queues:
            try:
                queue: SplitDeviceQueue = InflightSplitQueue(
                    views, mem, self.virtio_features, inflight.queues[ring.index])
            except PeerError as exc:  # a ring larger than the buffer can track
                self._close_vq(ring)
                if strict:
                    raise PeerError(f"ring {ring.index}: {exc}") from None
                return
        else:
            queue = SplitDeviceQueue(views, mem, self.virtio_features)
        queue.set_state(*ring.base())
        # A running ring remapped (new memory table, new features) is the same
        # ring: its statistics go on.  A stopped one's were handed to the
        # statistics when it stopped (carried again, they would count twice).
        if isinstance(old, SplitDeviceQueue) and ring.vq is not None:
            queue.carry_counters(old)
            # Requests the device still holds stay in flight on the new mapping
            # (same guest pages), so it can complete them.
            queue.inuse = old.inuse
            if old.broken is not None:
                queue.broken = old.broken
        ring.queue = queue
        if ring.vq is not None:
            ring.vq.ring = queue

    def _map_packed_ring(self, ring: Ring, old: DeviceQueue | None, mem: GuestMemory) -> None:
        """:meth:`_map_ring` for a packed ring (§2.8): SET_VRING_ADDR's desc / avail /
        used are the descriptor ring and the driver and device event suppression
        areas (QEMU ``vhost_virtqueue_set_addr``).  Raises PeerError."""
        addr = ring.addr
        assert addr is not None
        num = ring.num
        layout = PackedLayout.modern(num, addr.desc, addr.avail, addr.used)
        views = PackedRingViews(layout, mem.translate_uaddr(addr.desc, packed_ring_size(num)),
                                mem.translate_uaddr(addr.avail, EVENT_SIZE),
                                mem.translate_uaddr(addr.used, EVENT_SIZE))
        queue = PackedDeviceQueue(views, mem, self.virtio_features)
        try:
            queue.set_state(*ring.base(packed=True))
        except CallerError as exc:
            raise PeerError(str(exc)) from None
        if isinstance(old, PackedDeviceQueue) and ring.vq is not None:  # as _map_ring
            queue.carry_counters(old)
            queue.carry_in_flight(old)
            if old.broken is not None:
                queue.broken = old.broken
        ring.queue = queue
        if ring.vq is not None:
            ring.vq.ring = queue

    def _set_vring_num(self, msg: Message) -> _NoReply:
        assert isinstance(msg.payload, VringState)
        ring = self._ring(msg.payload.index, msg.request)
        num = msg.payload.num
        valid = is_valid_packed_queue_size(num) if self.packed else is_valid_queue_size(num)
        if not valid or num > self.max_queue_size:
            kind = "a size" if self.packed else "a power of two"
            raise PeerError(f"SET_VRING_NUM {num} for ring {ring.index}: not {kind} "
                            f"in 1..{self.max_queue_size}")
        if ring.started:
            raise PeerError(f"SET_VRING_NUM on started ring {ring.index}")
        ring.num = num
        self._map_ring(ring, strict=False)
        return NO_REPLY

    def _set_vring_addr(self, msg: Message) -> _NoReply:
        addr = msg.payload
        assert isinstance(addr, VringAddr)
        ring = self._ring(addr.index, msg.request)
        if addr.flags & ~_VHOST_VRING_F_LOG:
            raise PeerError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        if ring.num == 0:
            raise PeerError(f"SET_VRING_ADDR before SET_VRING_NUM on ring {ring.index}")
        ring.addr = addr
        self._map_ring(ring, strict=True)
        return NO_REPLY

    def _set_vring_base(self, msg: Message) -> _NoReply:
        assert isinstance(msg.payload, VringState)
        ring = self._ring(msg.payload.index, msg.request)
        base = msg.payload.num
        if ring.started:
            raise PeerError(f"SET_VRING_BASE on started ring {ring.index}")
        if self.packed:
            avail_state = base & 0xFFFF
            used_state = base >> 16 or avail_state
            for state in (avail_state, used_state):
                if ring.num and state & OFF_MASK >= ring.num:
                    raise PeerError(f"SET_VRING_BASE {base:#x}: position {state & OFF_MASK} "
                                    f"outside packed ring {ring.index} of size {ring.num}")
            ring.saved = (avail_state, used_state)
        else:
            if base > 0xFFFF:
                raise PeerError(f"SET_VRING_BASE {base:#x} is not a 16-bit split-ring index")
            ring.saved = (base, base)
        if ring.queue is not None:
            ring.queue.set_state(*ring.saved)
        return NO_REPLY

    def _get_vring_base(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, VringState)
        ring = self._ring(msg.payload.index, msg.request)
        last_avail, used = ring.base(self.packed)
        self._stop(ring)
        if self.packed:
            return VringState(ring.index, last_avail | used << 16)
        return VringState(ring.index, last_avail)

    def _stop(self, ring: Ring) -> None:
        self._close_vq(ring)
        ring.started = False
        if ring.kick_fd is not None:
            self._outcome.kicks.append(ring.index)
        _close(ring.kick_fd)
        _close(ring.call_fd)
        ring.kick_fd = ring.call_fd = None

    def _vring_fd(self, msg: Message) -> tuple[Ring, int | None]:
        assert isinstance(msg.payload, int)
        value = msg.payload
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise PeerError(f"{msg.request.name}: unknown bits in {value:#x}")
        ring = self._ring(value & VRING_INDEX_MASK, msg.request)
        if value & VRING_NOFD_MASK:
            return ring, None
        fd = msg.fds[0]
        try:
            # Never block on the peer's fd (a pipe that nobody drains, say).
            os.set_blocking(fd, False)
        except OSError as exc:
            raise PeerError(f"{msg.request.name}: unusable fd: {exc}") from None
        self._adopted.add(fd)
        return ring, fd

    def _set_vring_kick(self, msg: Message) -> _NoReply:
        ring, fd = self._vring_fd(msg)
        if ring.addr is None:
            if fd is not None:
                self._adopted.discard(fd)
            raise PeerError(f"SET_VRING_KICK on ring {ring.index} before SET_VRING_ADDR")
        _close(ring.kick_fd)
        ring.kick_fd = fd
        self._outcome.kicks.append(ring.index)
        was_runnable = ring.runnable
        ring.started = True
        if not self.protocol_features_negotiated:
            ring.enabled = True
        if ring.runnable and not was_runnable:
            self._outcome.start.append(ring.index)
        return NO_REPLY

    def _set_vring_call(self, msg: Message) -> _NoReply:
        ring, fd = self._vring_fd(msg)
        _close(ring.call_fd)
        ring.call_fd = fd
        return NO_REPLY

    def _set_vring_err(self, msg: Message) -> _NoReply:
        ring, fd = self._vring_fd(msg)
        _close(ring.err_fd)
        ring.err_fd = fd
        return NO_REPLY

    def _set_vring_enable(self, msg: Message) -> _NoReply:
        assert isinstance(msg.payload, VringState)
        ring = self._ring(msg.payload.index, msg.request)
        if not self.protocol_features_negotiated:
            raise PeerError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if msg.payload.num not in (0, 1):
            raise PeerError(f"SET_VRING_ENABLE {msg.payload.num} is neither 0 nor 1")
        was_runnable = ring.runnable
        ring.enabled = bool(msg.payload.num)
        if not ring.enabled:
            self._close_vq(ring)
        if ring.runnable and not was_runnable:
            self._outcome.start.append(ring.index)
        return NO_REPLY

    def _get_queue_num(self, msg: Message) -> Payload:
        return self.num_queues

    # ---------------------------------------------------------------- config
    def _get_config(self, msg: Message) -> Payload:
        self._has_protocol(ProtocolFeature.CONFIG, msg.request)
        cfg = msg.payload
        assert isinstance(cfg, ConfigSpace)
        if cfg.offset + cfg.size > MAX_CONFIG_SIZE:
            return ConfigSpace(0, 0, 0, b"")
        try:
            data = bytes(self.device.get_config(cfg.offset, cfg.size))
        except PeerError:
            return ConfigSpace(0, 0, 0, b"")
        data = data[:cfg.size].ljust(cfg.size, b"\0")
        return ConfigSpace(cfg.offset, cfg.size, cfg.flags, data)

    def _set_config(self, msg: Message) -> _NoReply:
        self._has_protocol(ProtocolFeature.CONFIG, msg.request)
        cfg = msg.payload
        assert isinstance(cfg, ConfigSpace)
        if cfg.flags not in (0, 1):
            raise PeerError(f"SET_CONFIG flags {cfg.flags:#x} unknown")
        if cfg.offset + cfg.size > MAX_CONFIG_SIZE:
            raise PeerError(f"SET_CONFIG {cfg.offset}+{cfg.size} beyond the config space")
        self.device.set_config(cfg.offset, cfg.data)
        return NO_REPLY

    # ----------------------------------------------------------------- reset
    def _reset_device(self, msg: Message) -> _NoReply:
        self._has_protocol(ProtocolFeature.RESET_DEVICE, msg.request)
        self._reset_rings()
        # The rings that follow are new: marks left in the buffer do not name
        # their requests (QEMU frees its buffer on a reset and asks for another).
        self._drop_inflight()
        self.features = 0
        self.status = 0
        self.device.reset()
        return NO_REPLY

    def _set_status(self, msg: Message) -> _NoReply:
        self._has_protocol(ProtocolFeature.STATUS, msg.request)
        assert isinstance(msg.payload, int)
        if msg.payload > 0xFF:
            raise PeerError(f"SET_STATUS {msg.payload:#x} is not an 8-bit status")
        # Recorded only: a 0 here is not a reset (QEMU 7.2 writes it on every stop).
        self.status = msg.payload
        return NO_REPLY

    def _get_status(self, msg: Message) -> Payload:
        self._has_protocol(ProtocolFeature.STATUS, msg.request)
        return self.status

    def _reset_rings(self) -> None:
        for ring in self.rings:
            self._close_vq(ring)
            if ring.kick_fd is not None:
                self._outcome.kicks.append(ring.index)
            ring.close_fds()
        self.rings = [Ring(i) for i in range(self.num_queues)]

    def reset(self) -> None:
        """Forget the connection (front end gone): rings, fds, memory, features."""
        self.drop_backend_channel()
        self._reset_rings()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.features = self.protocol = self.status = 0
        self.protocol_set = self.owner = False
        self._drop_inflight()
        self.device.reset()

    close = reset

    # -------------------------------------------------------------- inflight
    def _inflight_allowed(self, request: Request) -> None:
        self._has_protocol(ProtocolFeature.INFLIGHT_SHMFD, request)
        if self.virtio_features >> F_RING_PACKED & 1:
            raise PeerError(f"{request.name}: inflight tracking of packed rings is not "
                            f"implemented")

    def _get_inflight_fd(self, msg: Message) -> _WithFds:
        desc = msg.payload
        assert isinstance(desc, InflightDesc)
        if self.packed:
            # No buffer (mmap_size 0, no fd): QEMU's vhost_user_get_inflight_fd
            # then goes on without inflight tracking rather than failing the
            # start of a packed ring, which is not tracked.
            self._has_protocol(ProtocolFeature.INFLIGHT_SHMFD, msg.request)
            return _WithFds(InflightDesc(0, 0, desc.num_queues, desc.queue_size), ())
        self._inflight_allowed(msg.request)
        InflightRegion.check_geometry(desc.num_queues, desc.queue_size, self.num_queues)
        try:
            region = InflightRegion.create(desc.num_queues, desc.queue_size)
        except OSError as exc:
            raise PeerError(f"GET_INFLIGHT_FD: cannot allocate the buffer: {exc}") from None
        if self._inflight_offer is not None:
            self._inflight_offer.close()
        self._inflight_offer = region
        return _WithFds(InflightDesc(region.mmap_size, 0, desc.num_queues, desc.queue_size),
                        (region.fd,))

    def _set_inflight_fd(self, msg: Message) -> _NoReply:
        self._inflight_allowed(msg.request)
        desc = msg.payload
        assert isinstance(desc, InflightDesc)
        if any(r.started for r in self.rings):
            raise PeerError("SET_INFLIGHT_FD while a ring is started")
        InflightRegion.check_geometry(desc.num_queues, desc.queue_size, self.num_queues)
        region = InflightRegion.map(msg.fds[0], desc.mmap_size, desc.mmap_offset,
                                    desc.num_queues, desc.queue_size)
        self._adopted.add(region.fd)
        self._drop_inflight()
        self.inflight = region
        for ring in self.rings:
            if ring.queue is not None:
                self._map_ring(ring, strict=False)
        return NO_REPLY

    def _drop_inflight(self) -> None:
        for region in (self.inflight, self._inflight_offer):
            if region is not None:
                region.close()
        self.inflight = self._inflight_offer = None

    # ------------------------------------------------------- back-end channel
    def _set_backend_req_fd(self, msg: Message) -> _NoReply:
        self._has_protocol(ProtocolFeature.BACKEND_REQ, msg.request)
        fd = msg.fds[0]
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise PeerError(f"{msg.request.name}: the fd is not a socket")
            # Never block on a front end that stops reading the channel.
            os.set_blocking(fd, False)
        except OSError as exc:
            raise PeerError(f"{msg.request.name}: unusable fd: {exc}") from None
        self.drop_backend_channel()
        self._adopted.add(fd)
        self.backend_fd = fd
        self._outcome.channel = True
        return NO_REPLY

    def drop_backend_channel(self) -> None:
        """Close the back-end channel (the front end closed it or broke its rules)."""
        if self.backend_fd is not None:
            _close(self.backend_fd)
            self.backend_fd = None
            self._outcome.channel = True
        self._awaiting.clear()

    @property
    def backend_replies_due(self) -> int:
        """REPLY_ACKs the front end still owes on the back-end channel."""
        return len(self._awaiting)

    def config_change_message(self) -> BackendMessage | None:
        """CONFIG_CHANGE_MSG for the back-end channel, or None if it cannot be sent.

        It needs the channel and protocol feature CONFIG ("When
        VHOST_USER_PROTOCOL_F_CONFIG is negotiated, vhost-user back-end sends
        such messages"); it asks for a REPLY_ACK when REPLY_ACK is negotiated.
        """
        if self.backend_fd is None or not self.protocol >> ProtocolFeature.CONFIG & 1:
            return None
        return backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=self.reply_ack)

    def backend_sent(self, msg: BackendMessage) -> None:
        """The I/O layer wrote ``msg`` on the back-end channel: expect its ack if asked."""
        if msg.need_reply:
            self._awaiting.append(msg.request)

    def handle_backend_reply(self, msg: BackendMessage) -> str | None:
        """A REPLY_ACK read from the back-end channel; returns an error to log, if any.

        Raises PeerError for a reply nobody asked for (drop the channel).
        """
        if not self._awaiting:
            raise PeerError(f"unsolicited back-end channel reply to {msg.request.name}")
        expected = self._awaiting.popleft()
        if msg.request is not expected:
            raise PeerError(f"back-end channel reply to {msg.request.name}, "
                            f"expected one to {expected.name}")
        if msg.payload != 0:
            return f"the front end answered {msg.request.name} with {msg.payload}"
        return None

    # ------------------------------------------------------------ processing
    def _signal_ring(self, ring: Ring) -> None:
        if ring.call_fd is not None:
            self.signal(ring.call_fd)

    def _vq_broken(self, vq: VirtQueue, reason: str) -> None:
        # VIRTIO 1.2 §2.1.2: the device sets DEVICE_NEEDS_RESET; the I/O layer
        # asks the front end for the configuration change notification.
        self.status |= Status.NEEDS_RESET
        self.on_broken(vq.index, reason)

    def _vq_broken_index(self, index: int, reason: str) -> None:
        self.status |= Status.NEEDS_RESET
        self.on_broken(index, reason)

    def _close_vq(self, ring: Ring) -> None:
        vq = ring.vq
        if vq is not None:
            ring.vq = None
            vq.close()
            if self.stats is not None:
                self.stats.queue_stopped(vq)
            self.device.queue_stopped(vq)

    def virtqueue(self, index: int) -> VirtQueue | None:
        """The device's handle on ring ``index`` if it runs (created on first use)."""
        ring = self.rings[index]
        if not ring.runnable:
            return None
        vq = ring.vq
        if vq is None:
            queue = ring.queue
            assert queue is not None
            if isinstance(queue, InflightSplitQueue):
                try:
                    self._resubmitted[ring.index] = queue.recover()
                except PeerError as exc:
                    self._vq_broken_index(ring.index, str(exc))
                    return None
            vq = ring.vq = VirtQueue(ring.index, queue, self.device,
                                     lambda: self._signal_ring(ring),
                                     on_broken=self._vq_broken, schedule=self.schedule)
            if self.stats is not None:
                self.stats.queue_started(vq)
            self.device.queue_ready(vq)
        return vq

    def run_ring(self, index: int, *, poll: bool = False) -> RunResult:
        """Process ring ``index`` (the kick handler; see :meth:`VirtQueue.run`).

        Interrupts go out through ``signal`` as the kit decides them; a ring
        that breaks is reported through ``on_broken`` and in the result.
        """
        res = RunResult()
        vq = self.virtqueue(index)
        res.resubmitted = self._resubmitted.pop(index, None)
        if vq is None:
            return res
        if poll:
            vq.polled = True  # its own later passes (VirtQueue.kick) stay polling passes
        res.published = vq.run(poll)
        res.broken = vq.broken
        return res


class _NoReply:
    """Marker: the request has no reply body (only a REPLY_ACK if asked)."""


@dataclass(frozen=True)
class _WithFds:
    """A reply body with fds in its ancillary data (GET_INFLIGHT_FD)."""

    payload: Payload
    fds: tuple[int, ...]


NO_REPLY = _NoReply()
