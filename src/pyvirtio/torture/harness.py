"""The hostile front end's connection: canary-filled guest memory and a hand-written ring.

A torture case needs a ring it can break on purpose, so the driver side here
is not :class:`~pyvirtio.core.split_driver.SplitDriverQueue` (which keeps the
rules) but raw stores into the descriptor table and the available ring
(VIRTIO 1.2 §2.7.5, §2.7.6).  The vhost-user set-up is
:class:`~pyvirtio.transports.vhost_user.frontend.VhostUserFrontend`'s (QEMU
docs/interop/vhost-user.rst "Ring states"); :class:`HostileFrontend` adds
raw messages.

Every byte of guest memory starts as a canary pattern.  The connection
records what the back end may change: the used ring of each queue, at the
size the back end last accepted, and each buffer a descriptor marked
device-writable (§2.7.4: the device writes only there).  Anything else that
changes is a corruption (judged by :mod:`pyvirtio.torture.judge`).
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyvirtio.core.errors import PeerError
from pyvirtio.core.layout import DESC, used_ring_size
from pyvirtio.core.spec import (
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Status,
)
from pyvirtio.devices.blk.spec import REQ_HEADER, ReqType
from pyvirtio.devices.blk.spec import Status as BlkStatus
from pyvirtio.devices.net.spec import RX_QUEUE, TX_QUEUE
from pyvirtio.transports.vhost_user.frontend import (
    DEFAULT_UADDR,
    VhostUserFrontend,
    VhostUserRefused,
)
from pyvirtio.transports.vhost_user.messages import (
    HEADER,
    Message,
    Payload,
    ProtocolFeature,
    Request,
    encode,
    request,
)

__all__ = ["CANARY", "MEMORY_SIZE", "QUEUE_SIZE", "BlkProfile", "Conn", "HostileFrontend",
           "NetProfile", "Profile", "profile_for"]

#: Guest memory of one hostile connection (region A, at guest address 0).
MEMORY_SIZE = 4 << 20
#: Guest memory of a connection that only proves the back end still serves.
SMALL_MEMORY_SIZE = 1 << 20
#: The second region of the cases that share memory as two regions: right after
#: region A in guest addresses, but a separate memfd far away in user addresses.
REGION_B_SIZE = 1 << 20
REGION_B_UADDR = DEFAULT_UADDR + (1 << 40)
#: The ring size every case starts from: small, so "the whole queue" is cheap.
QUEUE_SIZE = 16
#: What unused guest memory holds; a back end that writes it is caught.
CANARY = b"\xa5pyvirtio-canary\x5a"
#: Where a hostile descriptor points when it must point at no memory at all.
NOWHERE = 1 << 40
_U16 = struct.Struct("<H")
_NET_HDR = 12  # struct virtio_net_hdr with VERSION_1 (§5.1.6)


class HostileFrontend(VhostUserFrontend):
    """A front end that can also send what no front end should."""

    def raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are (a header that lies, a payload of the wrong size)."""
        try:
            if fds:
                socket.send_fds(self._sock, [data], list(fds))
            else:
                self._sock.sendall(data)
        except OSError as exc:
            raise PeerError(f"cannot send to the back end: {exc}") from None

    def message(self, req: Request, payload: Payload = None, fds: Sequence[int] = ()) -> int | None:
        """Send one request (need_reply when REPLY_ACK is in force); its ack, or None.

        A request that has a reply of its own (GET_*) returns that reply's
        u64, or None when it is not a u64.
        """
        has_reply = req in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                            Request.GET_VRING_BASE, Request.GET_QUEUE_NUM, Request.GET_STATUS,
                            Request.GET_MAX_MEM_SLOTS, Request.GET_CONFIG)
        ack = not has_reply and self.has_protocol(ProtocolFeature.REPLY_ACK)
        self._write(request(req, payload, fds=fds, need_reply=ack))
        if not (ack or has_reply):
            return None
        value = self._read_reply(req)
        return value if isinstance(value, int) else None

    def frame(self, msg: Message) -> bytes:
        return encode(msg)

    def hung_up(self) -> bool:
        return self._peer_hung_up()

    def close_socket(self) -> None:
        """Disconnect, but keep guest memory mapped (the judge reads it afterwards)."""
        self._sock.close()


def header(code: int, flags: int, size: int) -> bytes:
    return HEADER.pack(code, flags, size)


@dataclass
class Ring:
    """One ring as the hostile driver keeps it."""

    index: int
    desc: int  # guest addresses
    avail: int
    used: int
    size: int  # what the driver last told the back end
    accepted: int  # what the back end last accepted (the used ring's extent)
    avail_idx: int = 0
    used_seen: int = 0


@dataclass
class Conn:
    """One hostile connection: a front end, its rings, and what the back end may write."""

    fe: HostileFrontend
    profile: Profile
    rings: dict[int, Ring] = field(default_factory=dict)
    writable: list[tuple[int, int]] = field(default_factory=list)
    #: Set by cases that find something worth reporting (a status byte, an ack).
    notes: list[str] = field(default_factory=list)
    timeout: float = 5.0
    _next_desc: dict[int, int] = field(default_factory=dict)
    #: Memory regions (guest address, size) and their mappings kept by the judge.
    kept: list[tuple[int, mmap.mmap]] = field(default_factory=list)
    extra_fds: list[int] = field(default_factory=list)
    #: What guest memory must hold, region by region, once armed.
    shadow: list[tuple[int, bytearray]] = field(default_factory=list)

    # ---------------------------------------------------------------- memory
    @property
    def mem_end(self) -> int:
        return MEMORY_SIZE

    def alloc(self, size: int, align: int = 16) -> int:
        return self.fe.alloc(size, align)

    def buf(self, size: int, *, writable: bool = False, data: bytes | None = None,
            align: int = 16) -> int:
        """A fresh buffer; a writable one is recorded as the back end's to write."""
        gpa = self.alloc(size, align)
        if data is not None:
            self.write(gpa, data)
        if writable:
            self.allow(gpa, size)
        return gpa

    def allow(self, gpa: int, size: int) -> None:
        """The back end may change [gpa, gpa + size) (clipped to memory by the judge)."""
        if size > 0:
            self.writable.append((gpa, size))

    def write(self, gpa: int, data: bytes) -> None:
        """A driver store into guest memory (mirrored into the judge's expectation)."""
        self.fe.memory.write(gpa, data)
        for base, shadow in self.shadow:
            lo, hi = max(gpa, base), min(gpa + len(data), base + len(shadow))
            if lo < hi:
                shadow[lo - base:hi - base] = data[lo - gpa:hi - gpa]

    def arm(self) -> None:
        """From now on, the back end may change only what :meth:`allow` names.

        Takes the expectation: guest memory as it is now; every later driver
        store (:meth:`write`) updates it too.
        """
        self.shadow = [(gpa, bytearray(mm)) for gpa, mm in self.kept]

    # ------------------------------------------------------------------ ring
    @property
    def q(self) -> int:
        return self.profile.attack_queue

    def ring(self, q: int | None = None) -> Ring:
        return self.rings[self.q if q is None else q]

    def new_desc(self, q: int | None = None) -> int:
        """The next descriptor index nobody used yet (wraps over the table)."""
        qi = self.q if q is None else q
        i = self._next_desc.get(qi, 0)
        self._next_desc[qi] = i + 1
        return i % QUEUE_SIZE

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             q: int | None = None) -> None:
        """Store descriptor ``i`` of the ring's table as it is, valid or not (§2.7.5)."""
        r = self.ring(q)
        if flags & VRING_DESC_F_WRITE and not flags & VRING_DESC_F_INDIRECT:
            self._allow_buffer(addr, length)
        self.write(r.desc + 16 * i, DESC.pack(addr, length, flags, nxt))

    def table(self, entries: Sequence[tuple[int, int, int, int]]) -> tuple[int, int]:
        """An indirect table holding ``entries`` (addr, len, flags, next) as they are."""
        gpa = self.alloc(16 * max(len(entries), 1))
        for i, (addr, length, flags, nxt) in enumerate(entries):
            if flags & VRING_DESC_F_WRITE and not flags & VRING_DESC_F_INDIRECT:
                self._allow_buffer(addr, length)
            self.write(gpa + 16 * i, DESC.pack(addr, length, flags, nxt))
        return gpa, 16 * len(entries)

    def _allow_buffer(self, addr: int, length: int) -> None:
        if 0 <= addr < MEMORY_SIZE + REGION_B_SIZE + (1 << 30):
            self.allow(addr, min(length, MEMORY_SIZE + REGION_B_SIZE - addr))

    def chain(self, entries: Sequence[tuple[int, int, int]], q: int | None = None) -> int:
        """Lay ``entries`` (addr, len, flags) out as a direct chain; its head."""
        idx = [self.new_desc(q) for _ in entries]
        for k, (addr, length, flags) in enumerate(entries):
            last = k == len(entries) - 1
            self.desc(idx[k], addr, length, flags | (0 if last else VRING_DESC_F_NEXT),
                      0 if last else idx[k + 1], q)
        return idx[0]

    def indirect(self, entries: Sequence[tuple[int, int, int]], q: int | None = None) -> int:
        """``entries`` as an indirect table behind one ring descriptor; its head."""
        n = len(entries)
        gpa, size = self.table([(a, ln, f | (VRING_DESC_F_NEXT if k < n - 1 else 0),
                                 k + 1 if k < n - 1 else 0)
                                for k, (a, ln, f) in enumerate(entries)])
        head = self.new_desc(q)
        self.desc(head, gpa, size, VRING_DESC_F_INDIRECT, 0, q)
        return head

    def place(self, head: int, q: int | None = None) -> None:
        """Put ``head`` in the next available-ring slot without moving avail.idx."""
        r = self.ring(q)
        slot = r.avail_idx % r.size if r.size else 0
        self.write(r.avail + 4 + 2 * slot, _U16.pack(head & 0xFFFF))

    def set_avail_idx(self, value: int, q: int | None = None) -> None:
        r = self.ring(q)
        r.avail_idx = value & 0xFFFF
        self.write(r.avail + 2, _U16.pack(r.avail_idx))

    def publish(self, *heads: int, q: int | None = None) -> None:
        """Make ``heads`` available (§2.7.13): ring entries, then the index."""
        r = self.ring(q)
        for h in heads:
            self.place(h, q)
            r.avail_idx = (r.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(r.avail_idx, q)

    def kick(self, q: int | None = None, times: int = 1) -> None:
        fq = self.fe.queues.get(self.q if q is None else q)
        if fq is not None:
            for _ in range(times):
                fq.kick.signal()

    def used_idx(self, q: int | None = None) -> int:
        r = self.ring(q)
        return int(_U16.unpack(self.fe.memory.read(r.used + 2, 2))[0])

    def wait_used(self, q: int | None = None, timeout: float | None = None) -> bool:
        """Wait until the used index moves; True if it did."""
        r = self.ring(q)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self.used_idx(q) != r.used_seen:
                r.used_seen = self.used_idx(q)
                return True
            time.sleep(0.001)
        return False

    def send(self, req: Request, payload: Payload = None, fds: Sequence[int] = ()) -> int | None:
        """One request; a refusal (non-zero ack) is noted for the report, not raised."""
        value = self.fe.message(req, payload, fds)
        if value and req.name.startswith("SET_"):
            self.notes.append(f"{req.name} refused")
        return value

    def status(self) -> int | None:
        """GET_STATUS when the back end has it (NEEDS_RESET shows a broken queue)."""
        if not self.fe.has_protocol(ProtocolFeature.STATUS):
            return None
        return self.fe.get_status()

    # -------------------------------------------------------- vhost-user set-up
    def start_ring(self, q: int, size: int = QUEUE_SIZE) -> Ring:
        fq = self.fe.setup_queue(q, size)
        r = Ring(q, fq.layout.desc, fq.layout.avail, fq.layout.used, size, size)
        self.rings[q] = r
        self.allow(r.used, used_ring_size(size))
        return r

    def accept_size(self, q: int, size: int, ack: int | None) -> None:
        """The back end answered SET_VRING_NUM ``size`` with ``ack`` (None: no REPLY_ACK)."""
        r = self.rings[q]
        r.size = size
        if ack in (None, 0):
            r.accepted = size
            self.allow(r.used, used_ring_size(min(size, 1 << 16)))


class Profile:
    """What one device type needs: features, queues, a good request, bad buffers."""

    name = ""
    attack_queue = 0
    queues: tuple[int, ...] = (0,)

    def features(self, offered: int) -> int:
        return offered & (1 << F_VERSION_1 | 1 << F_RING_INDIRECT_DESC)

    def prepare(self, c: Conn) -> None:
        """After negotiation: read what the cases need (a disk's capacity)."""

    def entries(self, c: Conn, buffer: tuple[int, int] | None = None,
                writable: bool | None = None) -> list[tuple[int, int, int]]:
        """A valid request's buffers (addr, len, flags); ``buffer`` replaces its payload."""
        raise NotImplementedError

    def good_request(self, c: Conn) -> None:
        """Put one valid request on the attack queue, kick, and check the answer (PeerError)."""
        raise NotImplementedError


class BlkProfile(Profile):
    """virtio-blk (VIRTIO 1.2 §5.2): queue 0; the good request reads sector 0."""

    name = "blk"
    attack_queue = 0
    queues = (0,)
    capacity: int | None = None

    def prepare(self, c: Conn) -> None:
        if c.fe.has_protocol(ProtocolFeature.CONFIG):
            try:
                self.capacity = struct.unpack("<Q", c.fe.get_config(0, 8))[0]
            except VhostUserRefused:
                self.capacity = None

    def request(self, c: Conn, rtype: int = ReqType.IN, sector: int = 0, nbytes: int = 512, *,
                header_len: int = 16, data_flags: int | None = None,
                status_flags: int = VRING_DESC_F_WRITE,
                data: tuple[int, int] | None = None) -> tuple[list[tuple[int, int, int]], int]:
        """A request's buffers (header, data, status) and the status byte's address."""
        hdr = REQ_HEADER.pack(rtype, 0, sector)[:header_len].ljust(header_len, b"\0")
        out: list[tuple[int, int, int]] = [(c.buf(max(header_len, 1), data=hdr), header_len, 0)]
        if data_flags is None:
            data_flags = 0 if rtype == ReqType.OUT else VRING_DESC_F_WRITE
        if data is not None:
            out.append((data[0], data[1], data_flags))
        elif nbytes:
            out.append((c.buf(nbytes), nbytes, data_flags))
        status = c.buf(1)
        out.append((status, 1, status_flags))
        return out, status

    def entries(self, c: Conn, buffer: tuple[int, int] | None = None,
                writable: bool | None = None) -> list[tuple[int, int, int]]:
        flags = None if writable is None else (VRING_DESC_F_WRITE if writable else 0)
        return self.request(c, data=buffer, data_flags=flags)[0]

    def good_request(self, c: Conn) -> None:
        entries, status = self.request(c)
        c.publish(c.chain(entries))
        c.kick()
        if not c.wait_used():
            raise PeerError("a good read of sector 0 got no answer")
        got = c.fe.memory.read(status, 1)[0]
        if got != BlkStatus.OK:
            raise PeerError(f"a good read of sector 0 answered status {got}")


class NetProfile(Profile):
    """virtio-net (VIRTIO 1.2 §5.1): receiveq1 and transmitq1; the good request is a frame."""

    name = "net"
    attack_queue = TX_QUEUE
    queues = (RX_QUEUE, TX_QUEUE)

    def frame(self, size: int = 60) -> bytes:
        # A broadcast from a locally administered address, EtherType "local experimental".
        eth = b"\xff" * 6 + b"\x02\x00\x00\x70\x79\x76" + b"\x88\xb5"
        return bytes(_NET_HDR) + (eth + bytes(max(size - len(eth), 0)))[:size]

    def entries(self, c: Conn, buffer: tuple[int, int] | None = None,
                writable: bool | None = None) -> list[tuple[int, int, int]]:
        flags = VRING_DESC_F_WRITE if writable else 0
        if buffer is None:
            pkt = self.frame()
            return [(c.buf(len(pkt), data=pkt), len(pkt), flags)]
        hdr = bytes(_NET_HDR)
        return [(c.buf(len(hdr), data=hdr), len(hdr), 0), (buffer[0], buffer[1], flags)]

    def good_request(self, c: Conn) -> None:
        c.publish(c.chain(self.entries(c)))
        c.kick()
        if not c.wait_used():
            raise PeerError("a good 60-byte frame on transmitq1 was never returned")


def profile_for(device: str) -> Profile:
    return BlkProfile() if device == "blk" else NetProfile()


def _canary(size: int) -> bytes:
    if len(_CANARY_CACHE) < size:
        _CANARY_CACHE[:] = (CANARY * (size // len(CANARY) + 1))[:size]
    return bytes(_CANARY_CACHE[:size])


_CANARY_CACHE = bytearray()


def open_conn(path: str, profile: Profile, *, two_regions: bool = False,
              timeout: float = 5.0, hostile: bool = True) -> Conn:
    """Connect, fill memory with the canary, negotiate, start the rings, prove them.

    ``hostile=False``: a small connection without canary, only to prove the
    back end still serves.
    """
    size = MEMORY_SIZE if hostile else SMALL_MEMORY_SIZE
    fe = HostileFrontend.connect(path, memory_size=size, timeout=timeout)
    assert isinstance(fe, HostileFrontend)  # connect() builds its own class
    c = Conn(fe, profile, timeout=timeout)
    try:
        if hostile:
            fe.memory.translate(0, MEMORY_SIZE)[:] = _canary(MEMORY_SIZE)
        if two_regions:
            # (The front end closes every region's fd when it closes.)
            fd = os.memfd_create("pyvirtio-torture-b", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, REGION_B_SIZE)
                fe.memory.map_fd(fd, REGION_B_SIZE, MEMORY_SIZE, 0, REGION_B_UADDR)
            except BaseException:
                os.close(fd)
                raise
            fe.memory.translate(MEMORY_SIZE, REGION_B_SIZE)[:] = _canary(REGION_B_SIZE)
        for r in fe.memory.regions if hostile else ():
            # Our own mapping: it outlives the front end's, so the judge can
            # read what the back end wrote until it let go of the memory.
            mm = mmap.mmap(r.fd, r.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=r.mmap_offset)
            c.kept.append((r.gpa, mm))
        fe.negotiate(profile.features(fe.get_features()))
        profile.prepare(c)
        for q in profile.queues:
            c.start_ring(q)
        if fe.has_protocol(ProtocolFeature.STATUS):
            fe.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
                          | Status.DRIVER_OK)
        profile.good_request(c)
    except BaseException:
        close_conn(c)
        raise
    return c


def close_conn(c: Conn) -> None:
    """Close everything but the judge's mappings (:func:`release`)."""
    c.fe.close()
    for fd in c.extra_fds:
        os.close(fd)
    c.extra_fds.clear()


def release(c: Conn) -> None:
    for _gpa, mm in c.kept:
        mm.close()
    c.kept.clear()
