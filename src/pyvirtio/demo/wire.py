"""Messages between the demo's guest and host processes (a sans-I/O codec).

They stand in for what KVM carries between a vCPU and the VMM for legacy
virtio-pci (VIRTIO 1.2 §4.1.4.8): a port access that exits to the VMM, the
VMM's answer, and the ioeventfd table the VMM installs so that a write of
queue index ``i`` to ``QUEUE_NOTIFY`` signals an eventfd instead of exiting
(KVM_IOEVENTFD with a data match).  The transport is a ``SOCK_SEQPACKET``
socketpair, so one message is one datagram and eventfds ride along with
SCM_RIGHTS.

Guest to host:  ``R`` (width, offset) read; ``W`` (width, offset, value) write;
                ``S`` + JSON, the guest's closing statistics.
Host to guest:  ``V`` (value) the answer to every access (writes too: a VM
                exit blocks the vCPU until the VMM is done);
                ``E`` (offset, width, datamatch, assign) + one fd when assigning:
                install / remove an ioeventfd.

Every decoder raises :class:`PeerError` on malformed input.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from pyvirtio.core.errors import PeerError

ACCESS = struct.Struct("<cBHI")
REPLY = struct.Struct("<cI")
IOEVENTFD = struct.Struct("<cHBH?")
MAX_MESSAGE = 65536

OP_READ = b"R"
OP_WRITE = b"W"
OP_STATS = b"S"
OP_VALUE = b"V"
OP_IOEVENTFD = b"E"


@dataclass(frozen=True, slots=True)
class Access:
    """A guest register access (a VM exit)."""

    write: bool
    offset: int
    width: int
    value: int = 0


@dataclass(frozen=True, slots=True)
class Stats:
    """The guest's closing report."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Value:
    """The host's answer to an access."""

    value: int


@dataclass(frozen=True, slots=True)
class IoEventFd:
    """Install (``fd`` >= 0) or remove (``fd`` == -1) an ioeventfd for a data-matched write."""

    offset: int
    width: int
    datamatch: int
    fd: int = -1


def encode_read(offset: int, width: int) -> bytes:
    return ACCESS.pack(OP_READ, width, offset, 0)


def encode_write(offset: int, width: int, value: int) -> bytes:
    return ACCESS.pack(OP_WRITE, width, offset, value & 0xFFFFFFFF)


def encode_stats(data: dict[str, Any]) -> bytes:
    return OP_STATS + json.dumps(data).encode()


def decode_guest(msg: bytes) -> Access | Stats:
    """Decode a guest message (hostile)."""
    if not msg:
        raise PeerError("empty message from the guest")
    op = msg[:1]
    if op in (OP_READ, OP_WRITE):
        if len(msg) != ACCESS.size:
            raise PeerError(f"register access message of {len(msg)} bytes, not {ACCESS.size}")
        _, width, offset, value = ACCESS.unpack(msg)
        if width not in (1, 2, 4):
            raise PeerError(f"register access of width {width}")
        return Access(op == OP_WRITE, offset, width, value)
    if op == OP_STATS:
        try:
            data = json.loads(msg[1:])
        except (ValueError, UnicodeDecodeError) as exc:
            raise PeerError(f"guest statistics are not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PeerError("guest statistics are not a JSON object")
        return Stats(data)
    raise PeerError(f"unknown guest message type {op!r}")


def encode_value(value: int) -> bytes:
    return REPLY.pack(OP_VALUE, value & 0xFFFFFFFF)


def encode_ioeventfd(offset: int, width: int, datamatch: int, assign: bool) -> bytes:
    return IOEVENTFD.pack(OP_IOEVENTFD, offset, width, datamatch, assign)


def decode_host(msg: bytes, fds: list[int]) -> Value | IoEventFd:
    """Decode a host message; an ioeventfd assignment must carry exactly one fd."""
    op = msg[:1]
    if op == OP_VALUE and len(msg) == REPLY.size:
        if fds:
            raise PeerError("a register value arrived with file descriptors")
        return Value(REPLY.unpack(msg)[1])
    if op == OP_IOEVENTFD and len(msg) == IOEVENTFD.size:
        _, offset, width, datamatch, assign = IOEVENTFD.unpack(msg)
        if assign != (len(fds) == 1) or len(fds) > 1:
            raise PeerError(f"ioeventfd message with {len(fds)} fds (assign={assign})")
        return IoEventFd(offset, width, datamatch, fds[0] if assign else -1)
    raise PeerError(f"malformed host message {msg[:8]!r} ({len(msg)} bytes)")
