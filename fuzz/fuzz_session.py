"""Fuzz target 2: the back end's protocol state machine (``VhostUserSession.handle``).

Each input is one front-end connection: a sequence of vhost-user requests
built from the input (any request, mostly plausible payloads — ring indices
near the queue count, power-of-two sizes, addresses inside the memory the
input shares, sometimes anything), with the fds each one should carry (or
not): real memfds of guest memory filled with input bytes, eventfds for
kicks, calls and errors, a socket for the back-end channel; raw garbage in
between.  Bytes go through ``messages.Decoder`` as the server feeds them;
rings that start, or that the input kicks, run through the device kit
against an echo device.  A PeerError ends the connection (the server drops
it), then ``session.reset()`` as the server's disconnect does.  Invariant:
see ``_harness.py``.

    python fuzz/fuzz_session.py -max_total_time=60 -timeout=10 /tmp/corpus fuzz/corpus/session
"""

from __future__ import annotations

import mmap
import os
import socket
import struct

from _harness import atheris, checked, fuzz
from pyvirtio.transports.device import Device, Request, VirtQueue, offered_features
from pyvirtio.transports.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    HEADER,
    VERSION,
    VRING_NOFD_MASK,
    Decoder,
)
from pyvirtio.transports.vhost_user.messages import Request as Req
from pyvirtio.transports.vhost_user.session import VhostUserSession

QUEUES = 2
REGION = 1 << 16  # bytes per memory region
UADDR = 0x7F00_0000_0000  # the front end's user address of region 0
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_SINGLE_REGION = struct.Struct("<QQQQQ")
_CONFIG_HDR = struct.Struct("<III")
_REQUESTS = list(Req)
#: Features the session offers the echo device's front end (its own ring features
#: and VHOST_USER_F_PROTOCOL_FEATURES); SET_FEATURES may ack any of them.
OFFERED = offered_features(0) | 1 << F_PROTOCOL_FEATURES
_SIZES = [0, 1, 2, 4, 8, 16, 64, 256, 3, 512, 1 << 15, 1 << 16]


class Echo(Device):
    """Copies each request's readable bytes into its writable buffers."""

    device_id = 99
    num_queues = QUEUES
    queue_size = 256

    def __init__(self) -> None:
        self.space = bytearray(range(16))

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(self.space[offset:offset + size])

    def set_config(self, offset: int, data: bytes) -> None:
        self.space[offset:offset + len(data)] = data[:max(0, 16 - offset)]
        del self.space[16:]

    def handle(self, queue: VirtQueue, req: Request) -> int:
        return req.write(req.read())


class Connection:
    """One front end's fds and bytes, built from the input."""

    def __init__(self, fdp: atheris.FuzzedDataProvider) -> None:
        self.fdp = fdp
        self.own: list[int] = []  # fds of ours to close at the end (socket peers)
        #: Our mapping of the guest memory set up by :meth:`setup` (the driver's view),
        #: and the rings there: index -> (size, desc, avail) offsets.
        self.guest: mmap.mmap | None = None
        self.layouts: dict[int, tuple[int, int, int]] = {}

    def setup(self) -> list[tuple[bytes, list[int]]]:
        """A well-formed start (features, one region, rings started), input-chosen sizes.

        Random requests alone rarely get a ring running; this gets the fuzzer to
        ring processing over guest memory that is still the input's bytes.
        """
        fdp = self.fdp
        msgs: list[tuple[bytes, list[int]]] = []
        features = int(fdp.ConsumeInt(8)) & OFFERED
        msgs.append((HEADER.pack(Req.SET_FEATURES, VERSION, 8) + _U64.pack(features), []))
        fd = self.memfd()
        if self.guest is None:
            self.guest = mmap.mmap(fd, REGION)  # holds its own dup of the fd until closed
        body = struct.pack("<II", 1, 0) + _REGION.pack(0, REGION, UADDR, 0)
        msgs.append((HEADER.pack(Req.SET_MEM_TABLE, VERSION, len(body)) + body, [fd]))
        for i in range(QUEUES):
            if not fdp.ConsumeBool():
                continue
            num = 1 << fdp.ConsumeIntInRange(0, 6)
            desc = i * (REGION // QUEUES)
            avail = desc + 16 * num
            used = (avail + 6 + 2 * num + 3) // 4 * 4
            self.layouts[i] = (num, desc, avail)
            for req, payload in ((Req.SET_VRING_NUM, _STATE.pack(i, num)),
                                 (Req.SET_VRING_ADDR, _ADDR.pack(i, 0, UADDR + desc, UADDR + used,
                                                                 UADDR + avail, 0))):
                msgs.append((HEADER.pack(req, VERSION, len(payload)) + payload, []))
            msgs.append((HEADER.pack(Req.SET_VRING_KICK, VERSION, 8) + _U64.pack(i),
                         [self.eventfd()]))
            if features >> F_PROTOCOL_FEATURES & 1:
                msgs.append((HEADER.pack(Req.SET_VRING_ENABLE, VERSION, 8)
                             + _STATE.pack(i, 1), []))
        return msgs

    def driver_adds(self) -> None:
        """A descriptor inside guest memory on a set-up ring, made available."""
        fdp, guest = self.fdp, self.guest
        if guest is None or not self.layouts:
            return
        i = list(self.layouts)[fdp.ConsumeIntInRange(0, len(self.layouts) - 1)]
        num, desc, avail = self.layouts[i]
        d = fdp.ConsumeIntInRange(0, num - 1)
        struct.pack_into("<QIHH", guest, desc + 16 * d, fdp.ConsumeIntInRange(0, REGION),
                         fdp.ConsumeIntInRange(0, 4096), fdp.ConsumeIntInRange(0, 7),
                         fdp.ConsumeIntInRange(0, num))
        idx = struct.unpack_from("<H", guest, avail + 2)[0]
        struct.pack_into("<H", guest, avail + 4 + 2 * (idx % num), d)
        struct.pack_into("<H", guest, avail + 2, (idx + 1) & 0xFFFF)

    def index(self) -> int:
        fdp = self.fdp
        return int(fdp.ConsumeIntInRange(0, QUEUES) if fdp.ConsumeBool()
                   else fdp.ConsumeInt(4) & 0xFF)

    def addr(self) -> int:
        fdp = self.fdp
        if fdp.ConsumeIntInRange(0, 7):
            return UADDR + int(fdp.ConsumeIntInRange(0, 2 * REGION)) // 16 * 16
        return int(fdp.ConsumeInt(8)) & (1 << 64) - 1

    def region(self, i: int) -> tuple[int, int, int, int]:
        fdp = self.fdp
        if fdp.ConsumeIntInRange(0, 7):
            return i * REGION, REGION, UADDR + i * REGION, 0
        a, b, c, d = (int(fdp.ConsumeInt(8)) & (1 << 64) - 1 for _ in range(4))
        return a, b, c, d

    def memfd(self) -> int:
        fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, REGION)
        data = self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, 4096))
        if data:
            os.pwrite(fd, data * (REGION // len(data) + 1), 0)  # the rings' bytes are the input's
        return fd

    def eventfd(self) -> int:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def backend_socket(self) -> int:
        ours, theirs = socket.socketpair()
        self.own.append(ours.detach())
        return theirs.detach()

    def message(self) -> tuple[bytes, list[int]]:
        """One request: its bytes and the fds that go with it."""
        fdp = self.fdp
        req = _REQUESTS[fdp.ConsumeIntInRange(0, len(_REQUESTS) - 1)]
        flags = VERSION | (FLAG_NEED_REPLY if fdp.ConsumeBool() else 0)
        fds: list[int] = []
        body = b""
        if req in (Req.SET_FEATURES, Req.SET_PROTOCOL_FEATURES, Req.SET_STATUS):
            body = _U64.pack(fdp.ConsumeInt(8) & (1 << 64) - 1)
        elif req in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
            nofd = fdp.ConsumeIntInRange(0, 3) == 0
            body = _U64.pack(self.index() | (VRING_NOFD_MASK if nofd else 0))
            fds = [] if nofd else [self.eventfd()]
        elif req in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.GET_VRING_BASE,
                     Req.SET_VRING_ENABLE, Req.VRING_KICK):
            num = (_SIZES[fdp.ConsumeIntInRange(0, len(_SIZES) - 1)] if fdp.ConsumeBool()
                   else fdp.ConsumeInt(4) & 0xFFFF_FFFF)
            body = _STATE.pack(self.index(), num)
        elif req is Req.SET_VRING_ADDR:
            body = _ADDR.pack(self.index(), fdp.ConsumeIntInRange(0, 2), self.addr(),
                              self.addr(), self.addr(), 0)
        elif req is Req.SET_MEM_TABLE:
            n = fdp.ConsumeIntInRange(0, 3)
            body = struct.pack("<II", n, 0) + b"".join(_REGION.pack(*self.region(i))
                                                       for i in range(n))
            fds = [self.memfd() for _ in range(n)]
        elif req in (Req.ADD_MEM_REG, Req.REM_MEM_REG):
            body = _SINGLE_REGION.pack(0, *self.region(fdp.ConsumeIntInRange(0, 2)))
            fds = [self.memfd()] if req is Req.ADD_MEM_REG or fdp.ConsumeBool() else []
        elif req in (Req.GET_CONFIG, Req.SET_CONFIG):
            size = fdp.ConsumeIntInRange(0, 300)
            body = _CONFIG_HDR.pack(fdp.ConsumeIntInRange(0, 300), size,
                                    fdp.ConsumeIntInRange(0, 2)) + bytes(size)
        elif req is Req.SET_BACKEND_REQ_FD:
            fds = [self.backend_socket() if fdp.ConsumeIntInRange(0, 3) else self.eventfd()]
        elif fdp.ConsumeBool():
            body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        if fdp.ConsumeIntInRange(0, 15) == 0:  # the wrong number of fds
            fds.append(self.eventfd())
        return HEADER.pack(req, flags, len(body)) + body, fds


@checked
def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    conn = Connection(fdp)
    session = VhostUserSession(Echo(), max_mem_slots=4)
    decoder = Decoder()
    try:
        for _ in range(64):
            if not fdp.remaining_bytes():
                break
            op = fdp.ConsumeIntInRange(0, 11)
            if op == 10:
                for raw, fds in conn.setup():
                    decoder.feed(raw, fds)
            elif op == 11:
                conn.driver_adds()
            elif op == 0:  # garbage on the socket
                decoder.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 32)))
            elif op == 1:  # a kick
                i = fdp.ConsumeIntInRange(0, QUEUES - 1)
                session.run_ring(i, poll=fdp.ConsumeBool())
            else:
                raw, fds = conn.message()
                decoder.feed(raw, fds)
            for msg in decoder.messages():
                outcome = session.handle(msg)
                for i in outcome.start:
                    session.run_ring(i)
    finally:
        session.reset()  # the server's disconnect
        decoder.close()
        for fd in conn.own:
            os.close(fd)
        if conn.guest is not None:
            conn.guest.close()


if __name__ == "__main__":
    fuzz(one_input)
