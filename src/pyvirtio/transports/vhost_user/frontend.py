"""The vhost-user front end: drive any vhost-user back end from Python.

QEMU docs/interop/vhost-user.rst from the front end's side: "Communication"
(SET_OWNER, feature and protocol-feature negotiation), "Memory access" and
"Memory regions description" (guest memory is a memfd shared with
SET_MEM_TABLE — or ADD_MEM_REG with CONFIGURE_MEM_SLOTS; rings are given as
the front end's user addresses, descriptors as guest addresses), "Ring states"
(SET_VRING_NUM/BASE/ADDR, CALL, KICK, then SET_VRING_ENABLE; GET_VRING_BASE
stops a ring), GET_CONFIG / SET_CONFIG, GET_QUEUE_NUM and REPLY_ACK (every
request without a reply of its own asks for an ack when negotiated, so a
refusal surfaces as :class:`VhostUserRefused` right at the call).
"Back-end communication": with protocol feature BACKEND_REQ the front end
hands the back end one end of a socketpair (SET_BACKEND_REQ_FD) and answers
the back end's requests on it ("Back-end message types"): CONFIG_CHANGE_MSG
is counted in :attr:`VhostUserFrontend.config_changes`, passed to
:attr:`VhostUserFrontend.on_config_change` by :meth:`poll_backend_channel`,
and acknowledged (REPLY_ACK, when the back end asks); other back-end requests
are refused with a non-zero ack.  While the front end waits for a reply it
also answers the back-end channel, so a back end that blocks on an ack there
cannot deadlock it.  "Inflight I/O tracking": with ``inflight=True`` the
front end negotiates INFLIGHT_SHMFD, gets the buffer once (GET_INFLIGHT_FD,
:meth:`VhostUserFrontend.setup_inflight`) and hands it back with
SET_INFLIGHT_FD; :meth:`VhostUserFrontend.reconnect` connects again to a
back end that died (or restarted), sends the features, the buffer, the
memory table and every ring again with the used index as VRING_BASE — what
QEMU's ``vhost_user_blk_connect`` / ``vhost_dev_start`` do — so the
requests that were in flight are resubmitted by the new back end and
complete.  The ring
itself is VIRTIO 1.2 §2.7 driven by :class:`~pyvirtio.core.split_driver.SplitDriverQueue`,
or — when ``VIRTIO_F_RING_PACKED`` was negotiated — §2.8 driven by
:class:`~pyvirtio.core.packed_driver.PackedDriverQueue` (SET_VRING_ADDR then
names the descriptor ring and the driver and device event suppression areas,
SET_VRING_BASE the positions with their wrap counters, as vhost-user.rst
"Vring descriptor indices for packed virtqueues" describes).

Example (a back end serving a device whose queue 0 takes a readable and a
writable buffer)::

    from pyvirtio.transports.vhost_user.frontend import VhostUserFrontend
    from pyvirtio.core.spec import F_VERSION_1, F_RING_EVENT_IDX

    fe = VhostUserFrontend.connect("/tmp/vhost.sock", memory_size=16 << 20)
    acked = fe.negotiate(fe.get_features() & (1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX))
    cfg = fe.get_config(0, 8)                 # needs protocol feature CONFIG
    q = fe.setup_queue(0, 256)                # rings live in fe.memory
    out_gpa, in_gpa = fe.alloc(512), fe.alloc(512)
    fe.memory.write(out_gpa, b"hello")
    q.queue.add([(out_gpa, 5)], [(in_gpa, 512)], token="req-1")
    q.notify()                                # kicks only if the back end wants it
    q.call.wait(5.0)                          # interrupt
    token, written = q.queue.get_buf()
    if fe.poll_backend_channel(0):            # CONFIG_CHANGE_MSG (e.g. a broken ring)
        print(fe.config_changes, hex(fe.get_status()))  # NEEDS_RESET is 0x40
    fe.stop_queue(0)                          # GET_VRING_BASE
    fe.close()
"""

from __future__ import annotations

import contextlib
import mmap
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pyvirtio.core.errors import CallerError, PeerError, VirtioError
from pyvirtio.core.layout import (
    RingViews,
    SplitLayout,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.packed_driver import PackedDriverQueue
from pyvirtio.core.packed_layout import (
    DESC_ALIGN,
    EVENT_ALIGN,
    EVENT_SIZE,
    PackedLayout,
    PackedRingViews,
    pack_vring_base,
    packed_ring_size,
)
from pyvirtio.core.spec import F_RING_INDIRECT_DESC, F_RING_PACKED
from pyvirtio.core.split_driver import IndirectArea, SplitDriverQueue
from pyvirtio.io.eventfd import EventFd
from pyvirtio.transports.vhost_user.messages import (
    CONFIG_HDR_SIZE,
    F_PROTOCOL_FEATURES,
    MAX_FDS,
    MAX_PAYLOAD,
    VRING_NOFD_MASK,
    BackendDecoder,
    BackendMessage,
    BackendRequest,
    ConfigSpace,
    Decoder,
    InflightDesc,
    MemoryTable,
    MemRegion,
    Message,
    Payload,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    backend_reply,
    close_all,
    encode,
    request,
)

__all__ = ["FRONTEND_PROTOCOL_FEATURES", "FrontendQueue", "VhostUserBusy", "VhostUserFrontend",
           "VhostUserRefused"]

#: Protocol features this front end can use.
FRONTEND_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.BACKEND_REQ
    | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
    | 1 << ProtocolFeature.RESET_DEVICE
    | 1 << ProtocolFeature.STATUS
)

#: Where the front end says its guest memory lives in its address space.  Any
#: value works (the back end only uses it to find the region); a value far from
#: the guest addresses keeps the two address kinds from being confused.
DEFAULT_UADDR = 0x7F00_0000_0000


class VhostUserRefused(VirtioError):
    """The back end refused a request (non-zero REPLY_ACK, empty config): not a spec violation."""


class VhostUserBusy(PeerError):
    """The back end closed the connection before its first reply.

    A back end that serves one front end at a time (vhost-user has no way to
    say "busy") accepts a second connection and closes it at once.
    """


@dataclass(eq=False)
class FrontendQueue:
    """One ring set up on the back end: the driver queue and its kick and call eventfds."""

    index: int
    queue: SplitDriverQueue
    kick: EventFd
    call: EventFd
    layout: SplitLayout

    @property
    def size(self) -> int:
        return self.queue.num

    def notify(self) -> bool:
        """Kick the back end if the ring's suppression state asks for it; True if kicked."""
        if self.queue.kick_prepare():
            self.kick.signal()
            return True
        return False

    def wait(self, timeout: float | None = None) -> int:
        """Wait for an interrupt (call eventfd); the count read, 0 on timeout."""
        return self.call.wait(timeout)

    def close(self) -> None:
        self.kick.close()
        self.call.close()


@dataclass(eq=False)
class PackedFrontendQueue(FrontendQueue):
    """A packed ring set up on the back end (VIRTIO_F_RING_PACKED negotiated)."""

    queue: PackedDriverQueue  # type: ignore[assignment]
    layout: PackedLayout  # type: ignore[assignment]


_FQ = TypeVar("_FQ", bound=FrontendQueue)


class VhostUserFrontend:
    """A vhost-user front end connected to one back end over a Unix socket."""

    def __init__(self, sock: socket.socket, memory: GuestMemory, *,
                 protocol_mask: int = FRONTEND_PROTOCOL_FEATURES,
                 use_mem_slots: bool = False) -> None:
        self._sock = sock
        self._timeout = sock.gettimeout()
        self._decoder = Decoder(replies=True)
        self.memory = memory
        region = memory.regions[0]
        self._alloc = BumpAllocator(region.gpa, region.end)
        self.protocol_mask = protocol_mask
        self.use_mem_slots = use_mem_slots
        #: Features the back end offers (including bit 30, VHOST_USER_F_PROTOCOL_FEATURES).
        self.device_features = 0
        #: Virtio features acknowledged by :meth:`negotiate` (without bit 30).
        self.features = 0
        self.backend_protocol_features = 0
        #: Protocol features in force.
        self.protocol_features = 0
        self.queues: dict[int, FrontendQueue] = {}
        self._memory_shared = False
        self._closed = False
        # The back-end channel (our end of the socketpair) and its request decoder.
        self._chan: socket.socket | None = None
        self._chan_decoder = BackendDecoder()
        self._callbacks_due = 0
        self._chan_error: PeerError | None = None
        #: CONFIG_CHANGE_MSG requests received from the back end so far.
        self.config_changes = 0
        #: Called (no arguments) by :meth:`poll_backend_channel` once per CONFIG_CHANGE_MSG.
        self.on_config_change: Callable[[], None] | None = None
        #: The socket path :meth:`connect` used (:meth:`reconnect` goes there again).
        self.path: str | None = None
        #: The inflight buffer (GET_INFLIGHT_FD's answer and its fd), kept across reconnects.
        self.inflight: InflightDesc | None = None
        self.inflight_fd = -1

    # ------------------------------------------------------------ connecting
    @classmethod
    def connect(cls, path: str, memory_size: int = 64 << 20, *, timeout: float = 10.0,
                protocol_mask: int = FRONTEND_PROTOCOL_FEATURES, use_mem_slots: bool = False,
                uaddr: int = DEFAULT_UADDR, inflight: bool = False) -> VhostUserFrontend:
        """Connect, SET_OWNER, read the offered features and settle protocol features.

        ``memory_size`` bytes of memfd-backed guest memory (at guest address 0)
        hold the rings and the buffers (:meth:`alloc`).  ``use_mem_slots``
        shares it with ADD_MEM_REG instead of SET_MEM_TABLE when the back end
        supports CONFIGURE_MEM_SLOTS.  ``timeout`` bounds every reply wait.
        ``inflight``: negotiate INFLIGHT_SHMFD (then call :meth:`setup_inflight`
        before the rings: a libvhost-user back end refuses to start a ring
        without the buffer once the feature is negotiated).
        """
        if inflight:
            protocol_mask |= 1 << ProtocolFeature.INFLIGHT_SHMFD
        if memory_size <= 0 or memory_size % mmap.PAGESIZE:
            raise CallerError(f"memory_size {memory_size} is not a positive multiple of "
                              f"the page size")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = -1
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            fd = os.memfd_create("pyvirtio-vhost-user-guest", os.MFD_CLOEXEC)
            os.ftruncate(fd, memory_size)
            memory = GuestMemory.from_fd(fd, memory_size, gpa=0, offset=0, uaddr=uaddr)
        except BaseException:
            sock.close()
            if fd >= 0:
                os.close(fd)
            raise
        fe = cls(sock, memory, protocol_mask=protocol_mask, use_mem_slots=use_mem_slots)
        fe.path = path
        try:
            fe._handshake()
        except BaseException:
            fe.close()
            raise
        return fe

    def _handshake(self) -> None:
        try:
            self._send(Request.SET_OWNER)
            self.device_features = self._call(Request.GET_FEATURES)
        except PeerError:
            if not self._decoder.pending and self._peer_hung_up():
                raise VhostUserBusy("the back end closed the connection before its first "
                                    "reply: back end busy (it serves another front end?)"
                                    ) from None
            raise
        if self.device_features >> F_PROTOCOL_FEATURES & 1:
            self.backend_protocol_features = self._call(Request.GET_PROTOCOL_FEATURES)
            wanted = self.backend_protocol_features & self.protocol_mask
            # REPLY_ACK applies from the next message on, not to this one.
            self._send(Request.SET_PROTOCOL_FEATURES, wanted)
            self.protocol_features = wanted
            if self.has_protocol(ProtocolFeature.BACKEND_REQ):
                self._open_backend_channel()

    def _peer_hung_up(self) -> bool:
        """True if the back end has closed its end of the main socket."""
        timeout = self._sock.gettimeout()
        self._sock.settimeout(0)  # a socket timeout would make even a peek wait for data
        try:
            return not self._sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # ECONNRESET, EPIPE: closed with data unread
            return True
        finally:
            self._sock.settimeout(timeout)

    def _open_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD with one end of a fresh socketpair; keep the other."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Non-blocking: reads happen after a readiness wait, acks are 20 bytes.
        ours.setblocking(False)
        try:
            self._send(Request.SET_BACKEND_REQ_FD, None, (theirs.fileno(),))
        except VhostUserRefused:
            ours.close()  # the back end keeps no channel; everything else works
            return
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._chan = ours

    def has_protocol(self, bit: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> bit & 1)

    # --------------------------------------------------------------- framing
    def _write(self, msg: Message) -> None:
        data = encode(msg)
        try:
            if msg.fds:
                socket.send_fds(self._sock, [data], list(msg.fds))
            else:
                self._sock.sendall(data)
        except OSError as exc:
            raise PeerError(f"{msg.request.name}: cannot send to the back end: {exc}") from None

    def _read_reply(self, req: Request) -> Payload:
        msg = self._read_reply_msg(req)
        if msg.fds:
            msg.close_fds()
            raise PeerError(f"{req.name}: reply with file descriptors")
        return msg.payload

    def _read_reply_msg(self, req: Request) -> Message:
        """The reply to ``req``, with its fds (the caller owns them)."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            msg = self._decoder.next_message()
            if msg is not None:
                break
            # A back end that trickles a reply byte by byte still has one deadline.
            if deadline is not None and time.monotonic() >= deadline:
                raise PeerError(f"{req.name}: the back end did not reply in time")
            if self._chan is not None:
                self._wait_main_socket(req, deadline)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, 4096, MAX_FDS)
            except TimeoutError:
                raise PeerError(f"{req.name}: the back end did not reply in time") from None
            except OSError as exc:
                raise PeerError(f"{req.name}: cannot read the reply: {exc}") from None
            if not data:
                close_all(fds)
                raise PeerError(f"{req.name}: the back end closed the connection")
            self._decoder.feed(data, fds)
        if msg.request is not req:
            msg.close_fds()
            raise PeerError(f"reply to {msg.request.name} while waiting for {req.name}")
        return msg

    def _wait_main_socket(self, req: Request, deadline: float | None) -> None:
        """Wait for the main socket, answering the back-end channel meanwhile.

        A back end may block on the ack of a back-end request (libvhost-user
        does) before it answers us: serving the channel here avoids the deadlock.
        """
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ, "main")
            if self._chan is not None:
                sel.register(self._chan, selectors.EVENT_READ, "backend")
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = {key.data for key, _ in sel.select(left)}
                if "main" in ready:
                    return
                # (A back end flooding its channel must not keep us here past the deadline.)
                if not ready or (deadline is not None and time.monotonic() >= deadline):
                    raise PeerError(f"{req.name}: the back end did not reply in time")
                if "backend" in ready and self._chan is not None:
                    try:
                        self._serve_backend_channel()
                    except PeerError as exc:
                        # Not this request's fault: report it at the next poll.
                        self._chan_error = exc
                    if self._chan is None:  # closed: just wait for the reply
                        return

    def _call(self, req: Request, payload: Payload = None) -> int:
        """A request whose reply is a u64."""
        self._write(request(req, payload))
        value = self._read_reply(req)
        if not isinstance(value, int):
            raise PeerError(f"{req.name}: reply is not a u64")
        return value

    def _send(self, req: Request, payload: Payload = None, fds: tuple[int, ...] = ()) -> None:
        """A request without a reply body; waits for the REPLY_ACK when negotiated."""
        ack = self.has_protocol(ProtocolFeature.REPLY_ACK)
        self._write(request(req, payload, fds=fds, need_reply=ack))
        if ack:
            value = self._read_reply(req)
            if not isinstance(value, int):
                raise PeerError(f"{req.name}: REPLY_ACK is not a u64")
            if value != 0:
                raise VhostUserRefused(f"the back end refused {req.name} (ack {value})")

    # -------------------------------------------------------------- features
    def get_features(self) -> int:
        """The virtio feature bits the back end offers (without the vhost-user bit 30)."""
        self.device_features = self._call(Request.GET_FEATURES)
        return self.device_features & ~(1 << F_PROTOCOL_FEATURES)

    def negotiate(self, wanted_features: int) -> int:
        """SET_FEATURES with ``wanted_features`` ∩ offered, then share guest memory.

        Returns the acknowledged virtio features.  Bit 30 is added on the wire
        when the back end offered it, as the protocol requires.
        """
        acked = wanted_features & self.device_features & ~(1 << F_PROTOCOL_FEATURES)
        wire = acked | (self.device_features & 1 << F_PROTOCOL_FEATURES)
        self._send(Request.SET_FEATURES, wire)
        self.features = acked
        if not self._memory_shared:
            self.share_memory()
        return acked

    # ---------------------------------------------------------------- memory
    def share_memory(self) -> None:
        """Tell the back end about guest memory (SET_MEM_TABLE or ADD_MEM_REG)."""
        regions = self.memory.regions
        table = tuple(MemRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in regions)
        fds = tuple(r.fd for r in regions)
        if self.use_mem_slots and self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            slots = self._call(Request.GET_MAX_MEM_SLOTS)
            if slots < len(table):
                raise PeerError(f"the back end has {slots} memory slots, "
                                f"{len(table)} regions needed")
            for region, fd in zip(table, fds, strict=True):
                self._send(Request.ADD_MEM_REG, region, (fd,))
        else:
            self._send(Request.SET_MEM_TABLE, MemoryTable(table), fds)
        self._memory_shared = True

    def alloc(self, size: int, align: int = 16) -> int:
        """Guest address of ``size`` fresh bytes of shared guest memory (never freed)."""
        return self._alloc.alloc(size, align)

    def uaddr(self, gpa: int, length: int = 1) -> int:
        """The user address the back end knows guest range [gpa, gpa + length) by."""
        r = self.memory.region_of(gpa, length)
        return r.uaddr + (gpa - r.gpa)

    # ---------------------------------------------------------------- config
    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device configuration space (GET_CONFIG)."""
        self._write(request(Request.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size))))
        cfg = self._read_reply(Request.GET_CONFIG)
        if not isinstance(cfg, ConfigSpace):
            raise PeerError("GET_CONFIG: reply is not a config payload")
        if cfg.size == 0 and size != 0:
            raise VhostUserRefused("the back end refused GET_CONFIG")
        if cfg.size != size or cfg.offset != offset:
            raise PeerError(f"GET_CONFIG: asked {offset}+{size}, got {cfg.offset}+{cfg.size}")
        return cfg.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """Write the device configuration space (SET_CONFIG)."""
        if CONFIG_HDR_SIZE + len(data) > MAX_PAYLOAD:
            raise CallerError("config write too long")
        self._send(Request.SET_CONFIG, ConfigSpace(offset, len(data), flags, bytes(data)))

    def get_queue_num(self) -> int:
        """How many queues the back end supports (GET_QUEUE_NUM; needs protocol feature MQ)."""
        if not self.has_protocol(ProtocolFeature.MQ):
            raise CallerError("GET_QUEUE_NUM needs the MQ protocol feature")
        return self._call(Request.GET_QUEUE_NUM)

    def get_status(self) -> int:
        return self._call(Request.GET_STATUS)

    def set_status(self, status: int) -> None:
        self._send(Request.SET_STATUS, status)

    def reset_device(self) -> None:
        """RESET_DEVICE: the back end forgets rings and features (memory stays).

        The inflight buffer goes too (it describes the old rings): call
        :meth:`setup_inflight` again before new rings, as QEMU does after a reset.
        """
        self._send(Request.RESET_DEVICE)
        for fq in self.queues.values():
            fq.close()
        self.queues.clear()
        self.features = 0
        if self.inflight_fd >= 0:
            close_all([self.inflight_fd])
        self.inflight, self.inflight_fd = None, -1

    # ----------------------------------------------------------------- rings
    def setup_queue(self, index: int, size: int, *, indirect_per_head: int = 0,
                    base: int = 0, enable: bool = True) -> FrontendQueue:
        """Allocate ring ``index`` of ``size`` entries in guest memory and start it.

        Sends SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (user addresses),
        SET_VRING_CALL, SET_VRING_KICK and — with protocol features —
        SET_VRING_ENABLE.  ``indirect_per_head`` > 0 reserves indirect tables
        when VIRTIO_F_INDIRECT_DESC was negotiated.  A split ring: with
        VIRTIO_F_RING_PACKED negotiated use :meth:`setup_packed_queue` (or
        :meth:`setup_ring`, which picks).
        """
        self._check_new(index)
        if self.packed:
            raise CallerError("VIRTIO_F_RING_PACKED was negotiated: rings are packed "
                              "(setup_packed_queue)")
        desc = self.alloc(desc_table_size(size), 16)
        avail = self.alloc(avail_ring_size(size), 2)
        used = self.alloc(used_ring_size(size), 4)
        try:
            layout = SplitLayout.modern(size, desc, avail, used)
        except PeerError as exc:
            raise CallerError(str(exc)) from None
        for gpa, length in ((desc, desc_table_size(size)), (avail, avail_ring_size(size)),
                            (used, used_ring_size(size))):
            self.memory.translate(gpa, length)[:] = bytes(length)
        views = RingViews.map(self.memory, layout)
        area = self._indirect_area(size, indirect_per_head)
        queue = SplitDriverQueue(views, self.features, area)
        return self._start_queue(FrontendQueue(index, queue, EventFd(nonblocking=True),
                                               EventFd(nonblocking=True), layout),
                                 base, desc, avail, used, enable)

    def _indirect_area(self, size: int, per_head: int) -> IndirectArea | None:
        if per_head <= 0 or not self.features >> F_RING_INDIRECT_DESC & 1:
            return None
        isize = IndirectArea.size_for(size, per_head)
        igpa = self.alloc(isize, 16)
        return IndirectArea(igpa, self.memory.translate(igpa, isize), per_head)

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was negotiated: every ring is packed (§2.8)."""
        return bool(self.features >> F_RING_PACKED & 1)

    def _check_new(self, index: int) -> None:
        if index in self.queues:
            raise CallerError(f"queue {index} is already set up")
        if not self._memory_shared:
            self.share_memory()

    def setup_ring(self, index: int, size: int, *, indirect_per_head: int = 0,
                   enable: bool = True) -> FrontendQueue | PackedFrontendQueue:
        """:meth:`setup_packed_queue` if VIRTIO_F_RING_PACKED was negotiated, else
        :meth:`setup_queue` (for drivers written against core.queue.DriverQueue)."""
        if self.packed:
            return self.setup_packed_queue(index, size, indirect_per_head=indirect_per_head,
                                           enable=enable)
        return self.setup_queue(index, size, indirect_per_head=indirect_per_head,
                                enable=enable)

    def setup_packed_queue(self, index: int, size: int, *, indirect_per_head: int = 0,
                           enable: bool = True) -> PackedFrontendQueue:
        """Allocate packed ring ``index`` of ``size`` entries (1..32768) and start it.

        The same messages as :meth:`setup_queue`; SET_VRING_ADDR names the
        descriptor ring and the driver and device event suppression areas,
        SET_VRING_BASE position 0 with both wrap counters 1 (§2.8.1).
        """
        self._check_new(index)
        if not self.packed:
            raise CallerError("a packed ring needs VIRTIO_F_RING_PACKED negotiated")
        desc = self.alloc(packed_ring_size(size), DESC_ALIGN)
        driver = self.alloc(EVENT_SIZE, EVENT_ALIGN)
        device = self.alloc(EVENT_SIZE, EVENT_ALIGN)
        try:
            layout = PackedLayout.modern(size, desc, driver, device)
        except PeerError as exc:
            raise CallerError(str(exc)) from None
        for gpa, length in ((desc, packed_ring_size(size)), (driver, EVENT_SIZE),
                            (device, EVENT_SIZE)):
            self.memory.translate(gpa, length)[:] = bytes(length)
        queue = PackedDriverQueue(PackedRingViews.map(self.memory, layout), self.features,
                                  self._indirect_area(size, indirect_per_head))
        # The driver and device areas travel where split's avail and used rings do.
        fq = PackedFrontendQueue(index, queue, EventFd(nonblocking=True),
                                 EventFd(nonblocking=True), layout)
        self._start_queue(fq, pack_vring_base(0, 1, 0, 1), desc, driver, device, enable)
        return fq

    def _start_queue(self, fq: _FQ, base: int, desc: int, avail: int, used: int,
                     enable: bool) -> _FQ:
        index, size, kick, call = fq.index, fq.size, fq.kick, fq.call
        try:
            self._send(Request.SET_VRING_NUM, VringState(index, size))
            self._send(Request.SET_VRING_BASE, VringState(index, base))
            self._send(Request.SET_VRING_ADDR, VringAddr(
                index, 0, self.uaddr(desc), self.uaddr(used), self.uaddr(avail), 0))
            self._send(Request.SET_VRING_CALL, index, (call.fd,))
            self._send(Request.SET_VRING_KICK, index, (kick.fd,))
            if enable and self.device_features >> F_PROTOCOL_FEATURES & 1:
                self._send(Request.SET_VRING_ENABLE, VringState(index, 1))
        except BaseException:
            fq.close()
            raise
        self.queues[index] = fq
        return fq

    def enable_queue(self, index: int, enable: bool = True) -> None:
        self._send(Request.SET_VRING_ENABLE, VringState(index, int(enable)))

    def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: the back end stops the ring; returns its next available index
        (a packed ring's: the 32-bit positions and wrap counters)."""
        self._write(request(Request.GET_VRING_BASE, VringState(index, 0)))
        state = self._read_reply(Request.GET_VRING_BASE)
        if not isinstance(state, VringState) or state.index != index:
            raise PeerError(f"GET_VRING_BASE: bad reply {state!r}")
        fq = self.queues.pop(index, None)
        if fq is not None:
            fq.close()
        return state.num

    def set_vring_call_nofd(self, index: int) -> None:
        """SET_VRING_CALL with the invalid-fd flag (the front end polls the used ring)."""
        self._send(Request.SET_VRING_CALL, index | VRING_NOFD_MASK)

    # ------------------------------------------------------------- inflight
    def setup_inflight(self, num_queues: int, queue_size: int) -> bool:
        """GET_INFLIGHT_FD once, then SET_INFLIGHT_FD; False without tracking.

        Call it after :meth:`negotiate` and before the rings start (QEMU's
        ``vhost_user_blk_start`` does the same); the buffer is kept for
        :meth:`reconnect`.  False without INFLIGHT_SHMFD, or when the back end
        answers with no buffer (``mmap_size`` 0, as for a packed ring): the
        rings then run untracked, as QEMU's ``vhost_user_get_inflight_fd``
        lets them.
        """
        if not self.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            return False
        if self.inflight is None:
            self._write(request(Request.GET_INFLIGHT_FD,
                                InflightDesc(0, 0, num_queues, queue_size)))
            msg = self._read_reply_msg(Request.GET_INFLIGHT_FD)
            desc = msg.payload
            if not isinstance(desc, InflightDesc):
                msg.close_fds()
                raise PeerError(f"GET_INFLIGHT_FD: reply is not an inflight description: "
                                f"{desc!r}")
            if desc.mmap_size == 0:
                msg.close_fds()
                return False
            if len(msg.fds) != 1:
                msg.close_fds()
                raise PeerError("GET_INFLIGHT_FD: a buffer without its fd")
            self.inflight, self.inflight_fd = desc, msg.fds[0]
        self._send(Request.SET_INFLIGHT_FD, self.inflight, (self.inflight_fd,))
        return True

    def backend_gone(self) -> bool:
        """True if the back end closed the connection (it died or stopped)."""
        return self._peer_hung_up()

    def reconnect(self, path: str | None = None, *, timeout: float = 10.0) -> None:
        """Connect again (the back end restarted) and resume every ring where it was.

        Retries the connection for up to ``timeout`` seconds (a back end
        being restarted takes a moment to listen), then: SET_OWNER and the
        feature handshake, SET_FEATURES with the features acknowledged
        before, SET_INFLIGHT_FD with the kept buffer, the memory table, and
        each ring's NUM / BASE / ADDR / CALL / KICK / ENABLE with the same
        addresses and eventfds and the used index as VRING_BASE.  Requests in
        flight stay in the driver queues: with inflight tracking the back end
        resubmits them; without it, only a back end that completes in order
        can resume from the used index.
        """
        target = path if path is not None else self.path
        if target is None:
            raise CallerError("reconnect: no socket path")
        for fq in self.queues.values():
            if not isinstance(fq.layout, SplitLayout):
                raise CallerError("reconnect supports split rings only")
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            self._sock.close()
        self._decoder.close()
        self._decoder = Decoder(replies=True)
        self._close_backend_channel()
        self._chan_decoder = BackendDecoder()
        self._chan_error = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout)
            try:
                sock.connect(target)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise PeerError(f"reconnect: nobody listens on {target} after "
                                    f"{timeout:g} s") from None
                time.sleep(0.02)
        self._sock = sock
        self.path = target
        # A new back end: nothing is negotiated yet (REPLY_ACK included).
        self.protocol_features = 0
        self._handshake()
        if self.features & ~self.device_features:
            raise PeerError(f"reconnect: the back end no longer offers "
                            f"{self.features & ~self.device_features:#x}")
        self._send(Request.SET_FEATURES,
                   self.features | (self.device_features & 1 << F_PROTOCOL_FEATURES))
        if self.inflight is not None:
            if not self.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
                raise PeerError("reconnect: the back end no longer offers INFLIGHT_SHMFD")
            self._send(Request.SET_INFLIGHT_FD, self.inflight, (self.inflight_fd,))
        self._memory_shared = False
        self.share_memory()
        for index, fq in sorted(self.queues.items()):
            layout = fq.layout
            used = int(fq.queue.rings.used16[1])
            self._send(Request.SET_VRING_NUM, VringState(index, fq.size))
            self._send(Request.SET_VRING_BASE, VringState(index, used))
            self._send(Request.SET_VRING_ADDR, VringAddr(
                index, 0, self.uaddr(layout.desc), self.uaddr(layout.used),
                self.uaddr(layout.avail), 0))
            self._send(Request.SET_VRING_CALL, index, (fq.call.fd,))
            self._send(Request.SET_VRING_KICK, index, (fq.kick.fd,))
            if self.device_features >> F_PROTOCOL_FEATURES & 1:
                self._send(Request.SET_VRING_ENABLE, VringState(index, 1))

    # ------------------------------------------------------ back-end channel
    @property
    def backend_channel_fd(self) -> int | None:
        """Our end of the back-end channel (readable when the back end sent a request)."""
        return self._chan.fileno() if self._chan is not None else None

    def poll_backend_channel(self, timeout: float | None = 0) -> int:
        """Answer the back end's requests; returns how many CONFIG_CHANGE_MSG were new.

        Waits up to ``timeout`` seconds (None: forever) for the channel to
        become readable, then handles everything that arrived, runs
        :attr:`on_config_change` once per config change (including those
        acknowledged while waiting for a reply) and returns their number.  0
        without a channel.  A back end breaking the channel's rules raises
        PeerError (here, even if it happened while waiting for a reply) and the
        channel is closed.
        """
        if self._chan_error is not None:
            error, self._chan_error = self._chan_error, None
            raise error
        if self._chan is not None:
            with selectors.DefaultSelector() as sel:
                sel.register(self._chan, selectors.EVENT_READ)
                if sel.select(timeout):
                    self._serve_backend_channel()
        due, self._callbacks_due = self._callbacks_due, 0
        if self.on_config_change is not None:
            for _ in range(due):
                self.on_config_change()
        return due

    def _serve_backend_channel(self) -> None:
        """Read what the channel holds now; answer each back-end request."""
        chan = self._chan
        assert chan is not None
        try:
            data, fds, _flags, _addr = socket.recv_fds(chan, 4096, MAX_FDS, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close_backend_channel()
            raise PeerError(f"back-end channel: cannot read: {exc}") from None
        if not data:
            close_all(fds)
            self._close_backend_channel()  # the back end closed it: no more requests
            return
        try:
            self._chan_decoder.feed(data, fds)
            for msg in self._chan_decoder.messages():
                self._answer_backend(msg)
        except PeerError:
            self._close_backend_channel()
            raise

    def _answer_backend(self, msg: BackendMessage) -> None:
        msg.close_fds()  # no back-end request we accept carries an fd
        if msg.request is BackendRequest.CONFIG_CHANGE_MSG:
            self.config_changes += 1
            self._callbacks_due += 1
            result = 0
        else:
            result = 1  # IOTLB, host notifiers, in-band notifications: not negotiated
        if msg.need_reply:
            assert self._chan is not None
            try:
                self._chan.sendall(encode(backend_reply(msg.request, result)), socket.MSG_NOSIGNAL)
            except OSError as exc:
                raise PeerError(f"back-end channel: cannot answer {msg.request.name}: "
                                f"{exc}") from None

    def _close_backend_channel(self) -> None:
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        self._chan_decoder.close()

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        """Disconnect and release guest memory and eventfds."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        self._decoder.close()
        self._close_backend_channel()
        for fq in self.queues.values():
            fq.close()
        self.queues.clear()
        if self.inflight_fd >= 0:
            close_all([self.inflight_fd])
            self.inflight_fd = -1
        fds = [r.fd for r in self.memory.regions if r.fd >= 0]
        self.memory.close()
        close_all(fds)

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
