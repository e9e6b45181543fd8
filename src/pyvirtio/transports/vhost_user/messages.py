"""vhost-user messages: constants, payloads and a sans-I/O codec.

Implements QEMU docs/interop/vhost-user.rst, "Message Specification"
(header: request, flags = version 1 | reply | need_reply, size; the payload
kinds "A single 64-bit integer", "A vring state description", "A vring address
description", "Memory regions description", "Single memory region
description", "Virtio device config space", "Inflight description"), "Communication" (which requests
carry file descriptors in SCM_RIGHTS ancillary data, which ones get replies),
"Protocol features", "Front-end message types", "Back-end communication" and
"Back-end message types" (the second socket, handed over with
SET_BACKEND_REQ_FD — SET_SLAVE_REQ_FD in QEMU 7.2 — on which the back end
sends requests such as CONFIG_CHANGE_MSG and the front end replies), and
"REPLY_ACK" (on both channels).

Like h11 for HTTP, nothing here touches a socket: :class:`Decoder` is fed
bytes and the file descriptors that arrived with them, and yields frozen
:class:`Message` objects; :func:`encode` turns a message back into bytes (the
caller sends its fds).  Every malformed input — unknown request, bad version
or flags, a payload size wrong for the request, a size field beyond the
largest message, the wrong number of fds — raises
:class:`~pyvirtio.core.errors.PeerError` and nothing else.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pyvirtio.core.errors import CallerError, PeerError

__all__ = [
    "CONFIG_HDR_SIZE",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "F_PROTOCOL_FEATURES",
    "HEADER",
    "MAX_CONFIG_SIZE",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD",
    "VERSION",
    "VRING_INDEX_MASK",
    "VRING_NOFD_MASK",
    "BackendDecoder",
    "BackendMessage",
    "BackendRequest",
    "ConfigSpace",
    "Decoder",
    "InflightDesc",
    "MemRegion",
    "MemoryTable",
    "Message",
    "Payload",
    "ProtocolFeature",
    "RawPayload",
    "Request",
    "VringAddr",
    "VringState",
    "backend_reply",
    "backend_request",
    "close_all",
    "encode",
    "reply",
    "request",
]


class Request(enum.IntEnum):
    """Front-end message types (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    #: QEMU 7.2's name of SET_BACKEND_REQ_FD (an alias: same member).
    SET_SLAVE_REQ_FD = 21


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers (vhost-user.rst, "Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    #: QEMU 7.2's names (aliases: same members).
    SLAVE_REQ = 5
    SLAVE_SEND_FD = 10


class BackendRequest(enum.IntEnum):
    """Back-end message types (vhost-user.rst, "Back-end message types").

    Sent by the back end on the back-end channel; the front end replies.
    QEMU 7.2 spells them ``VHOST_USER_SLAVE_*``.
    """

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


#: Virtio feature bit 30 (UNUSED) reused to announce protocol-feature support.
F_PROTOCOL_FEATURES = 30

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
_KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: SET_VRING_KICK/CALL/ERR payload: bits 0-7 the ring index, bit 8 "no fd".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

#: SET_MEM_TABLE carries at most this many regions (QEMU's VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_REGIONS = 8
#: GET_CONFIG/SET_CONFIG payloads are at most this long (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
#: No request we understand is longer; a larger size field is refused before reading it.
MAX_PAYLOAD = 4096
#: At most this many fds may arrive with one message.
MAX_FDS = MAX_MEM_REGIONS

HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_MEM_HDR = struct.Struct("<II")
_REGION = struct.Struct("<QQQQ")
_SINGLE_REGION = struct.Struct("<QQQQQ")
CONFIG_HDR_SIZE = 12
_CONFIG_HDR = struct.Struct("<III")
# mmap size, mmap offset, num queues, queue size; QEMU's VhostUserInflight is not
# packed, so the struct is padded to 24 bytes (and libvhost-user checks that size).
_INFLIGHT = struct.Struct("<QQHH4x")


# ------------------------------------------------------------------ payloads
@dataclass(frozen=True, slots=True)
class VringState:
    """"A vring state description": ring index and a number (size, base, enable)."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """"A vring address description": user addresses of the three ring parts."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One memory region: guest address, size, front end's user address, mmap offset."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """"Memory regions description" (SET_MEM_TABLE); one fd per region, same order."""

    regions: tuple[MemRegion, ...]


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """"Virtio device config space": offset, size, flags and ``size`` bytes."""

    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class InflightDesc:
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD: where the inflight buffer lies in its fd."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True, slots=True)
class RawPayload:
    """A payload of a request pyvirtio does not interpret (it refuses the request)."""

    data: bytes


Payload = (None | int | VringState | VringAddr | MemoryTable | MemRegion | ConfigSpace
           | InflightDesc | RawPayload)


class _Framed:
    """What both channels' messages share: the header flags and the fds that came along."""

    __slots__ = ()
    flags: int
    fds: tuple[int, ...]

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def close_fds(self) -> None:
        close_all(self.fds)


@dataclass(frozen=True, slots=True)
class Message(_Framed):
    """One decoded (or to-be-encoded) vhost-user message and the fds that came with it.

    The receiver owns ``fds``: it must keep or close each one.
    """

    request: Request
    payload: Payload = None
    flags: int = VERSION
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class BackendMessage(_Framed):
    """One message of the back-end channel: a back-end request or the front end's reply.

    Same framing as :class:`Message` (vhost-user.rst, "Back-end communication");
    the receiver owns ``fds``.
    """

    request: BackendRequest
    payload: Payload = None
    flags: int = VERSION
    fds: tuple[int, ...] = ()


# --------------------------------------------------------------------- kinds
class _Kind(enum.Enum):
    EMPTY = "empty"
    U64 = "u64"
    STATE = "state"
    ADDR = "addr"
    MEMTABLE = "memtable"
    REGION = "region"
    CONFIG = "config"
    INFLIGHT = "inflight"
    RAW = "raw"


# Request payload kind and allowed fd counts (None: decided by the payload).
_REQUESTS: dict[Request, tuple[_Kind, tuple[int, ...] | None]] = {
    Request.GET_FEATURES: (_Kind.EMPTY, (0,)),
    Request.SET_FEATURES: (_Kind.U64, (0,)),
    Request.SET_OWNER: (_Kind.EMPTY, (0,)),
    Request.RESET_OWNER: (_Kind.EMPTY, (0,)),
    Request.SET_MEM_TABLE: (_Kind.MEMTABLE, None),
    Request.SET_LOG_BASE: (_Kind.RAW, (0, 1)),
    Request.SET_LOG_FD: (_Kind.RAW, (0, 1)),
    Request.SET_VRING_NUM: (_Kind.STATE, (0,)),
    Request.SET_VRING_ADDR: (_Kind.ADDR, (0,)),
    Request.SET_VRING_BASE: (_Kind.STATE, (0,)),
    Request.GET_VRING_BASE: (_Kind.STATE, (0,)),
    Request.SET_VRING_KICK: (_Kind.U64, None),
    Request.SET_VRING_CALL: (_Kind.U64, None),
    Request.SET_VRING_ERR: (_Kind.U64, None),
    Request.GET_PROTOCOL_FEATURES: (_Kind.EMPTY, (0,)),
    Request.SET_PROTOCOL_FEATURES: (_Kind.U64, (0,)),
    Request.GET_QUEUE_NUM: (_Kind.EMPTY, (0,)),
    Request.SET_VRING_ENABLE: (_Kind.STATE, (0,)),
    Request.SEND_RARP: (_Kind.RAW, (0,)),
    Request.NET_SET_MTU: (_Kind.RAW, (0,)),
    # "request payload: N/A", the socket in the ancillary data (QEMU sends size 0).
    Request.SET_BACKEND_REQ_FD: (_Kind.EMPTY, (1,)),
    Request.IOTLB_MSG: (_Kind.RAW, (0,)),
    Request.SET_VRING_ENDIAN: (_Kind.RAW, (0,)),
    Request.GET_CONFIG: (_Kind.CONFIG, (0,)),
    Request.SET_CONFIG: (_Kind.CONFIG, (0,)),
    Request.CREATE_CRYPTO_SESSION: (_Kind.RAW, (0,)),
    Request.CLOSE_CRYPTO_SESSION: (_Kind.RAW, (0,)),
    Request.POSTCOPY_ADVISE: (_Kind.EMPTY, (0,)),
    Request.POSTCOPY_LISTEN: (_Kind.EMPTY, (0,)),
    Request.POSTCOPY_END: (_Kind.EMPTY, (0,)),
    Request.GET_INFLIGHT_FD: (_Kind.INFLIGHT, (0,)),
    Request.SET_INFLIGHT_FD: (_Kind.INFLIGHT, (1,)),
    Request.GPU_SET_SOCKET: (_Kind.RAW, (0, 1)),
    Request.RESET_DEVICE: (_Kind.EMPTY, (0,)),
    Request.VRING_KICK: (_Kind.STATE, (0,)),
    Request.GET_MAX_MEM_SLOTS: (_Kind.EMPTY, (0,)),
    Request.ADD_MEM_REG: (_Kind.REGION, (1,)),
    # "For compatibility with existing incorrect implementations, the back-end
    # MAY accept messages with one file descriptor" (REM_MEM_REG).
    Request.REM_MEM_REG: (_Kind.REGION, (0, 1)),
    Request.SET_STATUS: (_Kind.U64, (0,)),
    Request.GET_STATUS: (_Kind.EMPTY, (0,)),
}

# Reply payload kinds (back end -> front end).  Any request may also get a u64
# REPLY_ACK when it was sent with need_reply.
_REPLIES: dict[Request, _Kind] = {
    Request.GET_FEATURES: _Kind.U64,
    Request.GET_PROTOCOL_FEATURES: _Kind.U64,
    Request.GET_VRING_BASE: _Kind.STATE,
    Request.GET_QUEUE_NUM: _Kind.U64,
    Request.GET_CONFIG: _Kind.CONFIG,
    Request.GET_MAX_MEM_SLOTS: _Kind.U64,
    Request.GET_STATUS: _Kind.U64,
    Request.GET_INFLIGHT_FD: _Kind.INFLIGHT,
}

# Replies that may carry fds: GET_INFLIGHT_FD's is the buffer (none when mmap_size is 0).
_REPLY_FDS: dict[Request, tuple[int, ...]] = {
    Request.GET_INFLIGHT_FD: (0, 1),
}

# Back-end requests: payload kind and allowed fd counts.  Every reply on the
# back-end channel is a u64 REPLY_ACK.
_BACKEND_REQUESTS: dict[BackendRequest, tuple[_Kind, tuple[int, ...]]] = {
    BackendRequest.IOTLB_MSG: (_Kind.RAW, (0,)),
    BackendRequest.CONFIG_CHANGE_MSG: (_Kind.EMPTY, (0,)),
    # "vring area description", the notifier's fd in the ancillary data (or none).
    BackendRequest.VRING_HOST_NOTIFIER_MSG: (_Kind.RAW, (0, 1)),
    BackendRequest.VRING_CALL: (_Kind.STATE, (0,)),
    BackendRequest.VRING_ERR: (_Kind.STATE, (0,)),
}

_FIXED_SIZE = {
    _Kind.EMPTY: 0,
    _Kind.U64: _U64.size,
    _Kind.STATE: _STATE.size,
    _Kind.ADDR: _ADDR.size,
    _Kind.REGION: _SINGLE_REGION.size,
    _Kind.INFLIGHT: _INFLIGHT.size,
}


def _parse(name: str, kind: _Kind, body: bytes, reply: bool) -> Payload:
    """Parse ``body`` as ``kind``; PeerError if its size is wrong for request ``name``."""
    fixed = _FIXED_SIZE.get(kind)
    if fixed is not None and len(body) != fixed:
        raise PeerError(f"{name}: payload of {len(body)} bytes, expected {fixed}")
    if kind is _Kind.EMPTY:
        return None
    if kind is _Kind.U64:
        return int(_U64.unpack(body)[0])
    if kind is _Kind.STATE:
        return VringState(*_STATE.unpack(body))
    if kind is _Kind.ADDR:
        return VringAddr(*_ADDR.unpack(body))
    if kind is _Kind.REGION:
        _pad, gpa, size, uaddr, off = _SINGLE_REGION.unpack(body)
        return MemRegion(gpa, size, uaddr, off)
    if kind is _Kind.INFLIGHT:
        return InflightDesc(*_INFLIGHT.unpack(body))
    if kind is _Kind.MEMTABLE:
        if len(body) < _MEM_HDR.size:
            raise PeerError(f"{name}: payload of {len(body)} bytes has no region count")
        n, _pad = _MEM_HDR.unpack_from(body)
        if not 1 <= n <= MAX_MEM_REGIONS:
            raise PeerError(f"{name}: {n} regions (1..{MAX_MEM_REGIONS} allowed)")
        want = _MEM_HDR.size + n * _REGION.size
        if len(body) != want:
            raise PeerError(f"{name}: payload of {len(body)} bytes for {n} regions, "
                            f"expected {want}")
        return MemoryTable(tuple(
            MemRegion(*_REGION.unpack_from(body, _MEM_HDR.size + i * _REGION.size))
            for i in range(n)))
    if kind is _Kind.CONFIG:
        if reply and len(body) == 0:
            # "vhost-user back-end uses zero length of payload to indicate an error".
            return ConfigSpace(0, 0, 0, b"")
        if len(body) < CONFIG_HDR_SIZE:
            raise PeerError(f"{name}: payload of {len(body)} bytes, shorter than the "
                            f"{CONFIG_HDR_SIZE}-byte config header")
        offset, size, flags = _CONFIG_HDR.unpack_from(body)
        if size > MAX_CONFIG_SIZE:
            raise PeerError(f"{name}: config size {size} exceeds {MAX_CONFIG_SIZE}")
        if len(body) != CONFIG_HDR_SIZE + size:
            raise PeerError(f"{name}: payload of {len(body)} bytes for a config size of "
                            f"{size}, expected {CONFIG_HDR_SIZE + size}")
        return ConfigSpace(offset, size, flags, bytes(body[CONFIG_HDR_SIZE:]))
    return RawPayload(bytes(body))


def _check_fds(request: Request, payload: Payload, nfds: int) -> None:
    allowed = _REQUESTS[request][1]
    if allowed is None:
        if request is Request.SET_MEM_TABLE:
            assert isinstance(payload, MemoryTable)
            allowed = (len(payload.regions),)
        else:  # SET_VRING_KICK / CALL / ERR
            assert isinstance(payload, int)
            allowed = (0,) if payload & VRING_NOFD_MASK else (1,)
    if nfds not in allowed:
        want = " or ".join(str(a) for a in allowed)
        raise PeerError(f"{request.name}: {nfds} file descriptors, expected {want}")


# ------------------------------------------------------------------- decoder
_M = TypeVar("_M", Message, BackendMessage)


def close_all(fds: Sequence[int]) -> None:
    """Close each fd, ignoring the ones already closed or invalid."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _StreamDecoder(Generic[_M]):
    """Framing shared by both channels: header, size limit, fds, dead after an error."""

    def __init__(self, *, replies: bool = False) -> None:
        self._replies = replies
        self._buf = bytearray()
        self._consumed = 0  # stream offset of self._buf[0]
        self._fds: list[tuple[int, int]] = []  # (stream offset, fd)
        self._error: PeerError | None = None

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Add received bytes and the fds that arrived with them (the decoder owns the fds).

        A Unix stream socket hands over a sender's fds with the ``recvmsg`` that
        reads into that sender's ``sendmsg``, and ends that ``recvmsg`` there
        (Linux ``unix_stream_read_generic``): so the fds belong to the message
        holding the *last* byte received with them.
        """
        pos = self._consumed + len(self._buf) + len(data) - 1
        self._fds.extend((pos, fd) for fd in fds)
        if self._error is None and fds and not len(data):
            self._error = PeerError("file descriptors arrived without data")
        if self._error is not None:
            self.close()
            raise self._error
        self._buf += data

    def next_message(self) -> _M | None:
        """The next complete message, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except PeerError as exc:
            self._error = exc
            self.close()
            raise

    def messages(self) -> Iterator[_M]:
        """Every complete message fed so far."""
        while (msg := self.next_message()) is not None:
            yield msg

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole message."""
        return len(self._buf)

    def close(self) -> None:
        """Close every fd not handed out with a message."""
        close_all([fd for _pos, fd in self._fds])
        self._fds.clear()

    def _lookup(self, code: int) -> Request | BackendRequest:
        raise NotImplementedError

    def _build(self, request: Request | BackendRequest, flags: int, body: bytes,
               fds: tuple[int, ...]) -> _M:
        raise NotImplementedError

    def _next(self) -> _M | None:
        buf = self._buf
        if len(buf) < HEADER.size:
            if not buf and self._fds:
                raise PeerError("file descriptors arrived without a message")
            return None
        code, flags, size = HEADER.unpack_from(buf)
        request = self._lookup(code)
        if flags & VERSION_MASK != VERSION:
            raise PeerError(f"{request.name}: protocol version {flags & VERSION_MASK}, "
                            f"expected {VERSION}")
        if flags & ~_KNOWN_FLAGS:
            raise PeerError(f"{request.name}: unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
        if self._replies:
            if not flags & FLAG_REPLY:
                raise PeerError(f"{request.name}: message without the reply flag")
            if flags & FLAG_NEED_REPLY:
                raise PeerError(f"{request.name}: reply with the need_reply flag")
        elif flags & FLAG_REPLY:
            raise PeerError(f"{request.name}: request with the reply flag set")
        if size > MAX_PAYLOAD:
            raise PeerError(f"{request.name}: size field {size} exceeds {MAX_PAYLOAD}")
        total = HEADER.size + size
        if len(buf) < total:
            return None
        body = bytes(buf[HEADER.size:total])
        end = self._consumed + total
        fds = tuple(fd for pos, fd in self._fds if pos < end)
        self._fds = [(pos, fd) for pos, fd in self._fds if pos >= end]
        del buf[:total]
        self._consumed = end
        try:
            return self._build(request, flags, body, fds)
        except PeerError:
            close_all(fds)
            raise


class Decoder(_StreamDecoder[Message]):
    """Incremental decoder of one direction of a vhost-user stream.

    ``Decoder()`` decodes requests (the back end's side); ``Decoder(replies=True)``
    decodes the back end's replies (the front end's side).  Feed it whatever
    ``recvmsg`` returned with :meth:`feed` and iterate :meth:`messages`.  File
    descriptors belong to the message holding the last byte they arrived with
    (see :meth:`feed`).  After a
    :class:`PeerError` the decoder is dead and has closed the fds it held.
    """

    def _lookup(self, code: int) -> Request:
        try:
            return Request(code)
        except ValueError:
            raise PeerError(f"unknown request {code}") from None

    def _build(self, request: Request | BackendRequest, flags: int, body: bytes,
               fds: tuple[int, ...]) -> Message:
        assert isinstance(request, Request)
        if self._replies:
            kind = _REPLIES.get(request, _Kind.U64)
            payload = _parse(request.name, kind, body, reply=True)
            if len(fds) not in _REPLY_FDS.get(request, (0,)):
                raise PeerError(f"{request.name}: reply with {len(fds)} file descriptors")
        else:
            payload = _parse(request.name, _REQUESTS[request][0], body, reply=False)
            _check_fds(request, payload, len(fds))
        return Message(request, payload, flags, fds)


class BackendDecoder(_StreamDecoder[BackendMessage]):
    """Incremental decoder of the back-end channel (vhost-user.rst, "Back-end communication").

    ``BackendDecoder()`` decodes the back end's requests (the front end's
    side); ``BackendDecoder(replies=True)`` decodes the front end's REPLY_ACKs
    (the back end's side).  Same framing and fd rules as :class:`Decoder`.
    """

    def _lookup(self, code: int) -> BackendRequest:
        try:
            return BackendRequest(code)
        except ValueError:
            raise PeerError(f"unknown back-end request {code}") from None

    def _build(self, request: Request | BackendRequest, flags: int, body: bytes,
               fds: tuple[int, ...]) -> BackendMessage:
        assert isinstance(request, BackendRequest)
        name = f"back-end {request.name}"
        if self._replies:
            payload = _parse(name, _Kind.U64, body, reply=True)
            if fds:
                raise PeerError(f"{name}: reply with {len(fds)} file descriptors")
        else:
            kind, allowed = _BACKEND_REQUESTS[request]
            payload = _parse(name, kind, body, reply=False)
            if len(fds) not in allowed:
                want = " or ".join(str(a) for a in allowed)
                raise PeerError(f"{name}: {len(fds)} file descriptors, expected {want}")
        return BackendMessage(request, payload, flags, fds)


# ------------------------------------------------------------------- encoder
def _encode_payload(payload: Payload) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, bool):
        raise CallerError("a boolean is not a vhost-user payload")
    if isinstance(payload, int):
        return _U64.pack(payload)
    if isinstance(payload, VringState):
        return _STATE.pack(payload.index, payload.num)
    if isinstance(payload, VringAddr):
        return _ADDR.pack(payload.index, payload.flags, payload.desc, payload.used,
                          payload.avail, payload.log)
    if isinstance(payload, MemRegion):
        return _SINGLE_REGION.pack(0, payload.gpa, payload.size, payload.uaddr,
                                   payload.mmap_offset)
    if isinstance(payload, MemoryTable):
        return _MEM_HDR.pack(len(payload.regions), 0) + b"".join(
            _REGION.pack(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in payload.regions)
    if isinstance(payload, ConfigSpace):
        if payload.size == 0 and not payload.data and payload.offset == 0:
            return b""
        if len(payload.data) != payload.size:
            raise CallerError("config payload length differs from its size field")
        return _CONFIG_HDR.pack(payload.offset, payload.size, payload.flags) + payload.data
    if isinstance(payload, InflightDesc):
        return _INFLIGHT.pack(payload.mmap_size, payload.mmap_offset, payload.num_queues,
                              payload.queue_size)
    if isinstance(payload, RawPayload):
        return payload.data
    raise CallerError(f"not a vhost-user payload: {payload!r}")


def encode(msg: Message | BackendMessage) -> bytes:
    """The bytes of ``msg`` (header and payload); send ``msg.fds`` with them."""
    try:
        body = _encode_payload(msg.payload)
        return HEADER.pack(int(msg.request), msg.flags, len(body)) + body
    except struct.error as exc:
        raise CallerError(f"{msg.request.name}: field out of range: {exc}") from None


def request(req: Request, payload: Payload = None, *, fds: Sequence[int] = (),
            need_reply: bool = False) -> Message:
    """A front-end request message."""
    return Message(req, payload, VERSION | (FLAG_NEED_REPLY if need_reply else 0), tuple(fds))


def reply(req: Request, payload: Payload = None, fds: Sequence[int] = ()) -> Message:
    """A back-end reply to ``req`` (``fds``: GET_INFLIGHT_FD's buffer)."""
    return Message(req, payload, VERSION | FLAG_REPLY, tuple(fds))


def backend_request(req: BackendRequest, payload: Payload = None, *, fds: Sequence[int] = (),
                    need_reply: bool = False) -> BackendMessage:
    """A back-end request for the back-end channel."""
    return BackendMessage(req, payload, VERSION | (FLAG_NEED_REPLY if need_reply else 0),
                          tuple(fds))


def backend_reply(req: BackendRequest, value: int) -> BackendMessage:
    """The front end's REPLY_ACK to back-end request ``req`` (0: success)."""
    return BackendMessage(req, value, VERSION | FLAG_REPLY)
