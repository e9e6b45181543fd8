"""A hostile front end against the real VhostUserServer serving the real BlkDevice.

docs/architecture.md "Guest input is hostile", over a real Unix
socket with real SCM_RIGHTS (QEMU docs/interop/vhost-user.rst "Communication"):

* random and well-formed-but-wrong message sequences (hypothesis) with random
  fds attached (memfds of odd sizes, eventfds, /dev/null, pipes, sockets):
  every connection ends with exactly one log line, no internal error, no fd
  left open in the server, and a fresh front end then gets correct I/O;
* the nasty cases one by one: a header and then silence, a front end that
  never reads its replies, giant size fields and regions, memfds of size 0,
  too many fds, replaced kick fds the peer keeps open and signalled;
* hostile rings (VIRTIO 1.2 §2.7.5, §2.7.5.3, §2.7.6): garbage descriptor
  tables, avail.idx jumps, heads out of range, indirect loops and oversized
  indirect chains, descriptors in no region or pointing at the ring itself —
  only that queue breaks (NEEDS_RESET, one log line), the other queue keeps
  serving correct data, and nothing outside the driver's writable buffers
  changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyvirtio.transports.vhost_user.server as server_mod
from pyvirtio.core.errors import PeerError
from pyvirtio.core.layout import DESC, RingViews
from pyvirtio.core.spec import (
    F_RING_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Status,
)
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.devices.blk.driver import DRIVER_FEATURES, BlkDriver
from pyvirtio.devices.blk.file_store import FileStore
from pyvirtio.devices.blk.spec import CONFIG_SIZE_WRITE_ZEROES, REQ_HEADER, BlkConfig, ReqType
from pyvirtio.devices.blk.spec import Status as BlkStatus
from pyvirtio.transports.device import offered_features
from pyvirtio.transports.vhost_user.frontend import (
    DEFAULT_UADDR,
    FrontendQueue,
    VhostUserFrontend,
)
from pyvirtio.transports.vhost_user.inflight import InflightRegion
from pyvirtio.transports.vhost_user.messages import (
    FLAG_NEED_REPLY,
    HEADER,
    VERSION,
    ProtocolFeature,
    Request,
)
from pyvirtio.transports.vhost_user.server import VhostUserServer

pytestmark = pytest.mark.timeout(120)

SIZE = 1 << 20
QSIZE = 16
REPLY_WAIT = 5.0  # a liveness bound for each reply, not a timing assertion
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_SINGLE_REGION = struct.Struct("<QQQQQ")
_CONFIG_HDR = struct.Struct("<III")


# ------------------------------------------------------------------ fixtures
class Recorder(logging.Handler):
    """Keeps the server's log lines (formatted once, as they come)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._mu = threading.Lock()
        self._lines: list[str] = []
        self._ends = 0
        self._internal: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        with self._mu:
            self._lines.append(msg)
            if "front end disconnected" in msg or "dropping front end" in msg:
                self._ends += 1
            if record.exc_info is not None or "internal error" in msg:
                self._internal.append(msg)

    def messages(self) -> list[str]:
        with self._mu:
            return list(self._lines)

    def ends(self) -> int:
        """Lines that close a connection: exactly one per connection."""
        with self._mu:
            return self._ends

    def internal_errors(self) -> list[str]:
        with self._mu:
            return list(self._internal)


@dataclass
class Served:
    server: VhostUserServer
    thread: threading.Thread
    path: str
    img: Path
    log: Recorder

    def settle(self) -> None:
        """Wait (bounded) until the server has logged the end of every connection."""
        deadline = time.monotonic() + 10
        while self.log.ends() < self.server.connections and time.monotonic() < deadline:
            time.sleep(0.002)
        assert self.log.ends() == self.server.connections, self.log.messages()[-5:]
        assert self.thread.is_alive()

    def wait_epoll(self, want: set[int]) -> set[int]:
        """The epoll targets once they equal ``want`` (bounded wait: the server
        re-registers its listener just after logging a disconnect)."""
        deadline = time.monotonic() + 10
        while (got := self.epoll_targets()) != want and time.monotonic() < deadline:
            time.sleep(0.002)
        return got

    def epoll_targets(self) -> set[int]:
        """The fds registered in the server's epoll instance (from /proc fdinfo)."""
        sel = self.server.loop._sel
        assert isinstance(sel, selectors.EpollSelector)
        with open(f"/proc/self/fdinfo/{sel.fileno()}") as f:
            return {int(line.split()[1]) for line in f if line.startswith("tfd:")}


@contextlib.contextmanager
def serving(tmp_path: Path, poll: bool = False) -> Iterator[Served]:
    """pyvirtio-blk's device (two queues, file back end) served in a thread."""
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(SIZE))
    backend = FileStore(str(img))
    device = BlkDevice(backend, num_queues=2, queue_size=256)
    logger = logging.getLogger(f"pyvirtio.test.hostile.{id(tmp_path)}.{poll}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    rec = Recorder()
    logger.addHandler(rec)
    path = str(tmp_path / f"blk-{int(poll)}.sock")
    server = VhostUserServer(device, socket_path=path, logger=logger, poll=poll)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.loop.running and time.monotonic() < deadline:
        time.sleep(0.001)
    try:
        yield Served(server, thread, path, img, rec)
    finally:
        server.stop()
        thread.join(10)
        backend.close()
        logger.removeHandler(rec)
    assert not thread.is_alive()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serving(tmp_path) as s:
        yield s


@pytest.fixture
def served_poll(tmp_path: Path) -> Iterator[Served]:
    with serving(tmp_path, poll=True) as s:
        yield s


def fd_count() -> int:
    """Open fds of this process, after a garbage collection: an mmap whose views a
    dropped connection still exported keeps its own dup of the memfd until the
    views are collected, which would otherwise land in a later count."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def check_io(s: Served) -> None:
    """A fresh pyvirtio front end writes, reads back and flushes through both queues."""
    rnd = random.Random()
    with BlkDriver.connect(s.path, num_queues=2, queue_size=QSIZE, max_io=8192,
                           timeout=REPLY_WAIT) as drv:
        assert drv.capacity == SIZE // 512
        sector = rnd.randrange(0, SIZE // 512 - 8)
        data = rnd.randbytes(4096)
        drv.write(sector * 512, data)
        assert drv.read(sector * 512, 4096) == data
        drv.write((sector + 1) * 512, data[:512])  # the second write lands on the other queue
        assert drv.read((sector + 1) * 512, 512) == data[:512]
        drv.flush()
    with open(s.img, "rb") as f:
        f.seek(sector * 512)
        assert f.read(4096) == data[:512] + data[:512] + data[1024:]


# -------------------------------------------------------------- raw front end
def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)  # blocking, like QEMU: waits while the backlog is full
    sock.settimeout(REPLY_WAIT)
    return sock


def frame(code: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(code, flags, len(payload)) + payload


def send(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> bool:
    """Send one message; False once the server has hung up."""
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.sendall(data)
    except OSError:
        return False
    return True


def hung_up(sock: socket.socket) -> bool:
    """Read until EOF (the server dropped us); False if it is still talking after the wait."""
    sock.settimeout(REPLY_WAIT)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


FD_KINDS = ["memfd0", "memfd_page", "memfd_mib", "memfd_huge", "eventfd", "devnull",
            "pipe_r", "pipe_w", "socket", "regular"]


def make_fd(kind: str, tmp: Path | None = None) -> int:
    """One fd of ``kind`` (the caller closes it)."""
    if kind.startswith("memfd"):
        fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
        size = {"memfd0": 0, "memfd_page": 4096, "memfd_mib": 1 << 20,
                "memfd_huge": 1 << 40}[kind]
        os.ftruncate(fd, size)
        return fd
    if kind == "eventfd":
        return os.eventfd(1, os.EFD_CLOEXEC)
    if kind == "devnull":
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    if kind in ("pipe_r", "pipe_w"):
        r, w = os.pipe()
        keep, drop = (r, w) if kind == "pipe_r" else (w, r)
        os.close(drop)
        return keep
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    assert tmp is not None, "a regular file needs a directory"
    fd = os.open(tmp / "regular-file", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, 1 << 20)
    return fd


# --------------------------------------------------- message generation
BIG = [0, 1, 2, 3, 7, 8, 15, 16, 255, 256, 257, 4095, 4096, 0xFFFF, 0x10000, 0x8000,
       1 << 20, 2**31, 2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 4096, 2**64 - 1]
U = DEFAULT_UADDR
UADDRS = [U, U + 0x800, U + 0x1000, U + 0x2000, U + 0xFFFF0, U + (1 << 20)]
u64s = st.one_of(st.sampled_from(BIG), st.integers(0, 2**64 - 1), st.sampled_from(UADDRS))
u32s = st.one_of(st.sampled_from([b for b in BIG if b < 2**32]), st.integers(0, 2**32 - 1))
#: Mostly plausible values (so a connection goes on to later messages), sometimes not.
ring_index = st.one_of(st.sampled_from([0, 0, 1, 1, 2]), u32s)
ring_num = st.one_of(st.sampled_from([1, 2, 8, 8, 16, 256, 0, 3, 32768, 65536, 0xFFFF]), u32s)
vring_u64 = st.one_of(st.sampled_from([0, 1, 0x100, 0x101, 2, 0x1FF]), u64s)
gpas = st.sampled_from([0, 0, 1 << 20, 4096, 2**64 - 4096, 2**63])
sizes = st.sampled_from([1 << 20, 1 << 20, 4096, 0, 1 << 40, 2**63, 2**64 - 1])
uaddrs = st.sampled_from([U, U, U + (1 << 20), 0, 2**64 - 4096])
offsets = st.sampled_from([0, 0, 4096, 1 << 20, 2**63])
PROTOCOLS = [0, 1 << ProtocolFeature.REPLY_ACK,
             sum(1 << b for b in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                                  ProtocolFeature.CONFIG, ProtocolFeature.CONFIGURE_MEM_SLOTS,
                                  ProtocolFeature.RESET_DEVICE, ProtocolFeature.STATUS,
                                  ProtocolFeature.BACKEND_REQ)),
             sum(1 << b for b in (ProtocolFeature.MQ, ProtocolFeature.CONFIG,
                                  ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.STATUS))]


@st.composite
def payloads(draw: st.DrawFn, req: Request) -> bytes:
    if req is Request.SET_PROTOCOL_FEATURES:
        return _U64.pack(draw(st.one_of(st.sampled_from(PROTOCOLS), u64s)))
    if req in (Request.SET_FEATURES, Request.SET_STATUS):
        return _U64.pack(draw(st.one_of(st.sampled_from([0, 0x40, 0xF, 1 << 32 | 1 << 30]),
                                        u64s)))
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        return _U64.pack(draw(vring_u64))
    if req in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
               Request.SET_VRING_ENABLE, Request.VRING_KICK):
        return _STATE.pack(draw(ring_index), draw(ring_num))
    if req is Request.SET_VRING_ADDR:
        return _ADDR.pack(draw(ring_index), draw(st.sampled_from([0, 0, 1, 2])), draw(u64s),
                          draw(u64s), draw(u64s), draw(u64s))
    if req is Request.SET_MEM_TABLE:
        n = draw(st.integers(0, 9))
        regions = b"".join(_REGION.pack(draw(gpas), draw(sizes), draw(uaddrs), draw(offsets))
                           for _ in range(n))
        return struct.pack("<II", draw(st.sampled_from([n, n, n, 0, 9, 2**32 - 1])),
                           0) + regions
    if req in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        return _SINGLE_REGION.pack(0, draw(gpas), draw(sizes), draw(uaddrs), draw(offsets))
    if req in (Request.GET_CONFIG, Request.SET_CONFIG):
        size = draw(st.sampled_from([0, 1, 8, 60, 256, 257, 4000]))
        data = bytes(min(size, 300))
        return _CONFIG_HDR.pack(draw(st.one_of(st.sampled_from([0, 8, 255]), u32s)), size,
                                draw(st.sampled_from([0, 1, 2]))) + data
    return b""


#: The requests the back end implements (the rest are refused at once).
HANDLED = [Request.GET_FEATURES, Request.SET_FEATURES, Request.SET_OWNER, Request.RESET_OWNER,
           Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_MEM_TABLE,
           Request.GET_MAX_MEM_SLOTS, Request.ADD_MEM_REG, Request.REM_MEM_REG,
           Request.SET_VRING_NUM, Request.SET_VRING_ADDR, Request.SET_VRING_BASE,
           Request.GET_VRING_BASE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
           Request.SET_VRING_ERR, Request.GET_QUEUE_NUM, Request.SET_VRING_ENABLE,
           Request.GET_CONFIG, Request.SET_CONFIG, Request.RESET_DEVICE, Request.SET_STATUS,
           Request.GET_STATUS, Request.SET_BACKEND_REQ_FD]
MEMFDS = ["memfd_mib", "memfd_mib", "memfd_page", "memfd0", "memfd_huge"]


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """One message: (bytes, kinds of fds to attach)."""
    shape = draw(st.sampled_from(["structured"] * 8 + ["mangled", "raw"]))
    if shape == "raw":
        return draw(st.binary(min_size=1, max_size=80)), draw(
            st.lists(st.sampled_from(FD_KINDS), max_size=2))
    req = draw(st.one_of(st.sampled_from(HANDLED), st.sampled_from(HANDLED),
                         st.sampled_from(HANDLED), st.sampled_from(list(Request))))
    body = draw(payloads(req))
    flags = VERSION | (FLAG_NEED_REPLY if draw(st.integers(0, 3)) else 0)
    if shape == "mangled":
        how = draw(st.sampled_from(["truncate", "extend", "flags", "size"]))
        if how == "truncate" and body:
            body = body[:draw(st.integers(0, len(body) - 1))]
        elif how == "extend":
            body += draw(st.binary(min_size=1, max_size=16))
        elif how == "flags":
            flags = draw(st.sampled_from([0, 2, 3, VERSION | 4, VERSION | 0x10, 2**32 - 1]))
        else:
            return HEADER.pack(req, flags, draw(u32s)) + body, []
    wants_fds = {Request.SET_MEM_TABLE: 1, Request.ADD_MEM_REG: 1, Request.SET_VRING_KICK: 1,
                 Request.SET_VRING_CALL: 1, Request.SET_VRING_ERR: 1,
                 Request.SET_BACKEND_REQ_FD: 1}.get(req, 0)
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL,
               Request.SET_VRING_ERR) and len(body) == 8 and body[1] & 1:
        wants_fds = 0  # the "no fd" flag
    n = draw(st.sampled_from([wants_fds] * 6 + [0, 1, 2, 3]))
    if req is Request.SET_MEM_TABLE and len(body) >= 8:
        n = draw(st.sampled_from([struct.unpack_from("<I", body)[0] % 10] * 3 + [n]))
    memory = req in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG)
    notifiers = req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR)
    kind = st.sampled_from(MEMFDS) if memory else (
        st.sampled_from(["eventfd"] * 4 + FD_KINDS) if notifiers else (
            st.sampled_from(["socket"] * 4 + FD_KINDS)
            if req is Request.SET_BACKEND_REQ_FD else st.sampled_from(FD_KINDS)))
    if draw(st.integers(0, 4)) == 0:
        kind = st.sampled_from(FD_KINDS)
    kinds = draw(st.lists(kind, min_size=n, max_size=n))
    return frame(req, body, flags), kinds


def legit_prefix(ring: bytes, feats: int,
                 protocol: int) -> tuple[list[tuple[bytes, list[int]]], list[int]]:
    """Set-up messages that bring the back end to a started ring 0 (fds to close later)."""
    mem = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(mem, 1 << 20)
    os.pwrite(mem, ring, 0)
    kick = os.eventfd(1, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    msgs: list[tuple[bytes, list[int]]] = [
        (frame(Request.SET_OWNER), []),
        (frame(Request.SET_FEATURES, _U64.pack(feats)), []),
        (frame(Request.SET_PROTOCOL_FEATURES, _U64.pack(protocol)), []),
        (frame(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0)
               + _REGION.pack(0, 1 << 20, U, 0)), [mem]),
        (frame(Request.SET_VRING_NUM, _STATE.pack(0, 8)), []),
        (frame(Request.SET_VRING_ADDR, _ADDR.pack(0, 0, U, U + 0x1000, U + 0x800, 0)), []),
        (frame(Request.SET_VRING_CALL, _U64.pack(0)), [call]),
        (frame(Request.SET_VRING_KICK, _U64.pack(0)), [kick]),
        (frame(Request.SET_VRING_ENABLE, _STATE.pack(0, 1)), []),
    ]
    return msgs, [mem, kick, call]


def attack(s: Served, prefix: int | None, ring: bytes, msgs: list[tuple[bytes, list[str]]],
           tmp: Path) -> None:
    """One hostile connection: an optional set-up (with protocol features ``prefix``), then
    ``msgs``; replies are never read."""
    own: list[int] = []
    sock = raw_connect(s.path)
    try:
        plan: list[tuple[bytes, list[int]]] = []
        if prefix is not None:
            offer = offered_features(s.server.device.device_features) | 1 << 30
            head, fds = legit_prefix(ring, offer, prefix)
            own += fds
            plan += head
        for data, kinds in msgs:
            fds = [make_fd(k, tmp) for k in kinds]
            own += fds
            plan.append((data, fds))
        for data, fds in plan:
            if not send(sock, data, fds):
                break
    finally:
        sock.close()
        for fd in own:
            os.close(fd)


prefixes = st.one_of(st.none(), st.sampled_from(PROTOCOLS))


@settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "100")), deadline=None,
          database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prefix=prefixes, ring=st.binary(min_size=0, max_size=4096),
       msgs=st.lists(messages(), min_size=1, max_size=12))
def test_random_message_sequences_cost_only_their_connection(
        served: Served, tmp_path: Path, prefix: int | None, ring: bytes,
        msgs: list[tuple[bytes, list[str]]]) -> None:
    _attack_then_serve(served, tmp_path, prefix, ring, msgs)


def _attack_then_serve(served: Served, tmp_path: Path, prefix: int | None, ring: bytes,
                       msgs: list[tuple[bytes, list[str]]]) -> None:
    served.settle()
    before = fd_count()
    attack(served, prefix, ring, msgs, tmp_path)
    served.settle()
    check_io(served)
    served.settle()
    assert fd_count() == before
    assert served.log.internal_errors() == []


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prefix=prefixes, ring=st.binary(min_size=0, max_size=4096),
       msgs=st.lists(messages(), min_size=1, max_size=12))
def test_random_message_sequences_against_a_polling_server(
        served_poll: Served, tmp_path: Path, prefix: int | None, ring: bytes,
        msgs: list[tuple[bytes, list[str]]]) -> None:
    _attack_then_serve(served_poll, tmp_path, prefix, ring, msgs)


# -------------------------------------------------------- specific nasty cases
def test_header_then_silence_is_dropped(served: Served,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "PARTIAL_TIMEOUT", 0.3)
    before = fd_count()
    sock = raw_connect(served.path)
    # A SET_MEM_TABLE header announcing a payload that never comes, with its fd.
    fd = make_fd("memfd_mib")
    assert send(sock, HEADER.pack(Request.SET_MEM_TABLE, VERSION, 40), [fd])
    os.close(fd)
    assert hung_up(sock)
    sock.close()
    served.settle()
    assert fd_count() == before  # the server closed its copy of the memfd
    assert any("stalled" in m for m in served.log.messages())
    check_io(served)


def test_front_end_that_never_reads_replies(served: Served,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "SEND_TIMEOUT", 0.5)
    sock = raw_connect(served.path)
    burst = frame(Request.GET_FEATURES) * 4096
    sock.settimeout(REPLY_WAIT)
    with contextlib.suppress(OSError):
        for _ in range(200):  # far more replies than any socket buffer holds
            sock.sendall(burst)
    # Now read: the server gave up on us and hung up.
    assert hung_up(sock)
    sock.close()
    served.settle()
    assert any("dropping front end: socket error" in m for m in served.log.messages())
    check_io(served)


@pytest.mark.parametrize("size", [2**32 - 1, 4097, 1 << 20])
def test_giant_size_fields(served: Served, size: int) -> None:
    sock = raw_connect(served.path)
    assert send(sock, HEADER.pack(Request.SET_MEM_TABLE, VERSION, size))
    assert hung_up(sock)
    sock.close()
    served.settle()
    assert any(f"size field {size}" in m for m in served.log.messages())
    check_io(served)


def _mem_table(regions: list[tuple[int, int, int, int]]) -> bytes:
    return frame(Request.SET_MEM_TABLE, struct.pack("<II", len(regions), 0)
                 + b"".join(_REGION.pack(*r) for r in regions), VERSION | FLAG_NEED_REPLY)


def _negotiated(sock: socket.socket) -> None:
    """SET_OWNER and REPLY_ACK + CONFIGURE_MEM_SLOTS, so refusals come back as acks."""
    for data in (frame(Request.SET_OWNER),
                 frame(Request.SET_PROTOCOL_FEATURES, _U64.pack(
                     1 << ProtocolFeature.REPLY_ACK | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS))):
        assert send(sock, data)


def _ack(sock: socket.socket) -> int:
    hdr = b""
    while len(hdr) < HEADER.size + 8:
        chunk = sock.recv(HEADER.size + 8 - len(hdr))
        assert chunk, "the server hung up"
        hdr += chunk
    return int(_U64.unpack_from(hdr, HEADER.size)[0])


@pytest.mark.parametrize("case", ["eight_giant", "zero_size_memfd", "region_size_0",
                                  "wraps", "offset_past_end", "overlap", "devnull",
                                  "pipe", "eventfd"])
def test_bad_memory_tables_are_refused_without_leaks(served: Served, case: str) -> None:
    before = fd_count()
    sock = raw_connect(served.path)
    _negotiated(sock)
    g = 1 << 40
    regions: list[tuple[int, int, int, int]]
    kinds: list[str]
    if case == "eight_giant":
        regions = [(i * g, g, DEFAULT_UADDR + i * g, 0) for i in range(8)]
        kinds = ["memfd_huge"] * 8
    elif case == "zero_size_memfd":
        regions, kinds = [(0, 4096, DEFAULT_UADDR, 0)], ["memfd0"]
    elif case == "region_size_0":
        regions, kinds = [(0, 0, DEFAULT_UADDR, 0)], ["memfd_page"]
    elif case == "wraps":
        regions, kinds = [(2**64 - 4096, 8192, DEFAULT_UADDR, 0)], ["memfd_huge"]
    elif case == "offset_past_end":
        regions, kinds = [(0, 4096, DEFAULT_UADDR, 1 << 20)], ["memfd_mib"]
    elif case == "overlap":
        regions = [(0, 1 << 20, DEFAULT_UADDR, 0), (4096, 4096, DEFAULT_UADDR, 0)]
        kinds = ["memfd_mib", "memfd_mib"]
    else:
        regions = [(0, 4096, DEFAULT_UADDR, 0)]
        kinds = {"devnull": ["devnull"], "pipe": ["pipe_r"], "eventfd": ["eventfd"]}[case]
    fds = [make_fd(k) for k in kinds]
    assert send(sock, _mem_table(regions), fds)
    for fd in fds:
        os.close(fd)
    ack = _ack(sock)
    if case == "eight_giant":
        assert ack in (0, 1)  # mapping 8 TiB of address space may or may not work
    else:
        assert ack == 1
    sock.close()
    served.settle()
    assert fd_count() == before
    check_io(served)
    served.settle()
    assert fd_count() == before


_INFLIGHT = struct.Struct("<QQHH4x")


def _sealed_memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("hostile-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.mark.parametrize("case", ["set_without_fd", "set_unsealed", "set_too_small",
                                  "set_giant", "set_unaligned_offset", "set_past_end",
                                  "set_pipe", "get_no_queue", "get_odd_size", "get_short"])
def test_hostile_inflight_messages_cost_only_their_connection(served: Served,
                                                               case: str) -> None:
    """GET/SET_INFLIGHT_FD with hostile sizes, offsets and fds: one log line, the
    connection dropped, no fd left behind, the next front end served."""
    before = fd_count()
    sock = raw_connect(served.path)
    for data in (frame(Request.SET_OWNER), frame(Request.SET_PROTOCOL_FEATURES, _U64.pack(
            1 << ProtocolFeature.INFLIGHT_SHMFD))):
        assert send(sock, data)
    need = InflightRegion.size_for(2, 128)  # what GET_INFLIGHT_FD would have answered
    fds: list[int] = []
    if case.startswith("get"):
        body = {"get_no_queue": _INFLIGHT.pack(0, 0, 0, 128),
                "get_odd_size": _INFLIGHT.pack(0, 0, 1, 100),
                "get_short": _INFLIGHT.pack(0, 0, 1, 128)[:20]}[case]
        msg = frame(Request.GET_INFLIGHT_FD, body)
    else:
        size, offset, make = {
            "set_without_fd": (need, 0, None),
            "set_unsealed": (need, 0, lambda: _sealed_memfd(need, seal=False)),
            "set_too_small": (need - 64, 0, lambda: _sealed_memfd(need)),
            "set_giant": (1 << 62, 0, lambda: _sealed_memfd(need)),
            "set_unaligned_offset": (need, 100, lambda: _sealed_memfd(2 * need)),
            "set_past_end": (need, 4096, lambda: _sealed_memfd(need)),
            "set_pipe": (need, 0, lambda: make_fd("pipe_r")),
        }[case]
        fds = [make()] if make is not None else []
        msg = frame(Request.SET_INFLIGHT_FD, _INFLIGHT.pack(size, offset, 2, 128))
    assert send(sock, msg, fds)
    for fd in fds:
        os.close(fd)
    assert hung_up(sock)
    sock.close()
    served.settle()
    assert fd_count() == before
    check_io(served)
    served.settle()
    assert fd_count() == before
    assert not served.log.internal_errors()


def test_memory_slots_beyond_the_limit(served: Served) -> None:
    before = fd_count()
    sock = raw_connect(served.path)
    _negotiated(sock)
    acks = []
    for i in range(served.server.max_mem_slots + 3):
        fd = make_fd("memfd_page")
        body = _SINGLE_REGION.pack(0, i * 4096, 4096, DEFAULT_UADDR + i * 4096, 0)
        assert send(sock, frame(Request.ADD_MEM_REG, body, VERSION | FLAG_NEED_REPLY), [fd])
        os.close(fd)
        acks.append(_ack(sock))
    assert acks == [0] * served.server.max_mem_slots + [1, 1, 1]
    sock.close()
    served.settle()
    assert fd_count() == before
    check_io(served)


def test_more_fds_than_any_message_carries(served: Served) -> None:
    before = fd_count()
    sock = raw_connect(served.path)
    fds = [make_fd("eventfd") for _ in range(20)]
    send(sock, frame(Request.SET_OWNER), fds)
    for fd in fds:
        os.close(fd)
    assert hung_up(sock)
    sock.close()
    served.settle()
    assert fd_count() == before
    check_io(served)


@pytest.mark.parametrize("kind", ["devnull", "regular", "memfd_page", "pipe_w"])
def test_kick_fds_that_cannot_be_waited_on(served: Served, tmp_path: Path, kind: str) -> None:
    before = fd_count()
    with VhostUserFrontend.connect(served.path, memory_size=1 << 20,
                                   timeout=REPLY_WAIT) as fe:
        fe.negotiate(DRIVER_FEATURES)
        fe.setup_queue(0, 8)
        fd = make_fd(kind, tmp_path)
        try:
            fe._send(Request.SET_VRING_KICK, 0, (fd,))
            fe.get_features()  # still served (a pipe's write end is pollable)
        except PeerError:
            pass  # dropped with one line
        finally:
            os.close(fd)
    served.settle()
    assert fd_count() == before
    check_io(served)


def test_replaced_kick_fd_that_the_peer_keeps_signalling(served: Served) -> None:
    """The server must unregister a kick fd before closing it: the peer keeps the file."""
    idle = served.epoll_targets()
    kept: list[int] = []
    try:
        with VhostUserFrontend.connect(served.path, memory_size=1 << 20,
                                       timeout=REPLY_WAIT) as fe:
            fe.negotiate(DRIVER_FEATURES)
            q = fe.setup_queue(0, 8)
            kept.append(os.dup(q.kick.fd))
            fresh = os.eventfd(0, os.EFD_CLOEXEC)
            kept.append(fresh)
            fe._send(Request.SET_VRING_KICK, 0, (fresh,))  # replaces the first kick fd
            fe.stop_queue(0)  # and GET_VRING_BASE closes the second
            for fd in kept:
                os.eventfd_write(fd, 1)  # readable forever: nobody reads them now
            assert fe.get_features()
        served.settle()
        assert served.wait_epoll(idle) == idle
        check_io(served)
        served.settle()
        assert served.wait_epoll(idle) == idle
    finally:
        for fd in kept:
            os.close(fd)


def test_call_fd_nobody_reads(served: Served) -> None:
    """A call fd that is a full pipe: interrupts are dropped, the server never blocks."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, bytes(65536))
    try:
        fe = VhostUserFrontend.connect(served.path, memory_size=4 << 20, timeout=REPLY_WAIT)
        acked = fe.negotiate(DRIVER_FEATURES)
        config = BlkConfig.unpack(fe.get_config(0, CONFIG_SIZE_WRITE_ZEROES))
        ports = [fe.setup_queue(i, QSIZE) for i in range(2)]
        fe._send(Request.SET_VRING_CALL, 0, (w,))
        with BlkDriver(ports, fe.memory, fe.alloc, acked, config, max_io=8192,
                       timeout=REPLY_WAIT, frontend=fe) as drv:
            slots = [drv.submit(ReqType.IN, i, 512, queue=0) for i in range(4)]
            for slot in slots:  # no interrupt can come: poll the used ring
                deadline = time.monotonic() + REPLY_WAIT
                while not slot.done and time.monotonic() < deadline:
                    drv.poll(0)
                assert slot.done and slot.status == BlkStatus.OK
                assert bytes(slot.payload()) == served.img.read_bytes()[
                    slot.sector * 512:slot.sector * 512 + 512]
    finally:
        os.close(r)
        os.close(w)
    served.settle()
    check_io(served)


# --------------------------------------------------------------- hostile rings
@dataclass
class Guest:
    fe: VhostUserFrontend
    drv: BlkDriver
    ports: list[FrontendQueue]

    @property
    def rings(self) -> RingViews:
        return self.ports[0].queue.rings

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.rings.desc, i * 16, addr, length, flags, nxt)

    def publish(self, heads: list[int], idx: int | None = None) -> None:
        """Fill queue 0's available ring and move avail.idx (no kick yet)."""
        avail = self.rings.avail16
        for k, h in enumerate(heads):
            avail[2 + k % QSIZE] = h
        avail[1] = len(heads) if idx is None else idx

    def kick(self) -> None:
        self.drv.ports[0].kick.signal()


@pytest.fixture
def guest(served: Served) -> Iterator[Guest]:
    fe = VhostUserFrontend.connect(served.path, memory_size=16 << 20, timeout=REPLY_WAIT)
    acked = fe.negotiate(DRIVER_FEATURES | 1 << F_RING_INDIRECT_DESC)
    assert acked >> F_RING_INDIRECT_DESC & 1
    config = BlkConfig.unpack(fe.get_config(0, CONFIG_SIZE_WRITE_ZEROES))
    ports = [fe.setup_queue(i, QSIZE) for i in range(2)]
    with BlkDriver(ports, fe.memory, fe.alloc, acked, config, max_io=8192,
                   timeout=REPLY_WAIT, frontend=fe) as drv:
        yield Guest(fe, drv, ports)
    served.settle()
    check_io(served)


def _queue1_works(g: Guest, img: Path) -> None:
    data = os.urandom(1024)
    slot = g.drv.submit(ReqType.OUT, 7, queue=1, data=data)
    g.drv.wait(slot)
    assert slot.status == BlkStatus.OK
    g.drv.release(slot)
    slot = g.drv.submit(ReqType.IN, 7, 1024, queue=1)
    g.drv.wait(slot)
    assert slot.status == BlkStatus.OK and bytes(slot.payload()) == data
    g.drv.release(slot)
    with open(img, "rb") as f:
        f.seek(7 * 512)
        assert f.read(1024) == data


def _wait_broken(g: Guest) -> bool:
    deadline = time.monotonic() + REPLY_WAIT
    while time.monotonic() < deadline:
        if g.fe.get_status() & Status.NEEDS_RESET:
            return True
        time.sleep(0.005)
    return False


def _header(g: Guest, rtype: int, sector: int = 0) -> int:
    gpa = g.fe.alloc(16)
    g.fe.memory.write(gpa, REQ_HEADER.pack(rtype, 0, sector))
    return gpa


def _ranges_of_queue1(g: Guest) -> list[tuple[int, int]]:
    """Guest memory queue 1 traffic may change: its rings and its request slots."""
    layout = g.ports[1].layout
    out = [(layout.desc, 16 * QSIZE), (layout.avail, 6 + 2 * QSIZE),
           (layout.used, 6 + 8 * QSIZE)]
    for s in g.drv._slots[1]:
        out += [(s.status_gpa, 1), (s.header_gpa, 16), (s.data_gpa, 8192 + 1)]
    return out


def _changed(before: bytes, after: bytes) -> list[tuple[int, int]]:
    """Changed byte ranges [lo, hi) (found page by page, then byte by byte)."""
    out: list[tuple[int, int]] = []
    for page in range(0, len(before), 4096):
        a, b = before[page:page + 4096], after[page:page + 4096]
        if a == b:
            continue
        i = 0
        while i < len(a):
            if a[i] != b[i]:
                j = i
                while j < len(a) and a[j] != b[j]:
                    j += 1
                out.append((page + i, page + j))
                i = j
            else:
                i += 1
    return out


def _inside(changed: list[tuple[int, int]], allowed: list[tuple[int, int]]) -> bool:
    return all(any(a <= lo and hi <= a + n for a, n in allowed) for lo, hi in changed)


BREAKERS: dict[str, Callable[[Guest], None]] = {}


def breaker(fn: Callable[[Guest], None]) -> Callable[[Guest], None]:
    BREAKERS[fn.__name__] = fn
    return fn


@breaker
def garbage_table(g: Guest) -> None:
    g.rings.desc[:] = os.urandom(len(g.rings.desc))
    g.publish([random.randrange(QSIZE) for _ in range(QSIZE)])


@breaker
def avail_idx_jump(g: Guest) -> None:
    g.publish([], idx=QSIZE + 1)


@breaker
def head_out_of_range(g: Guest) -> None:
    g.publish([QSIZE + 5])


@breaker
def direct_loop(g: Guest) -> None:
    hdr = _header(g, ReqType.IN)
    g.desc(0, hdr, 16, VRING_DESC_F_NEXT, 1)
    g.desc(1, hdr, 16, VRING_DESC_F_NEXT, 0)
    g.publish([0])


@breaker
def indirect_loop(g: Guest) -> None:
    table = g.fe.alloc(4 * 16)
    hdr = _header(g, ReqType.IN)
    view = g.fe.memory.translate(table, 64)
    for i in range(4):
        DESC.pack_into(view, i * 16, hdr, 16, VRING_DESC_F_NEXT, (i + 1) % 4)
    g.desc(0, table, 64, VRING_DESC_F_INDIRECT)
    g.publish([0])


@breaker
def indirect_chain_longer_than_any_queue(g: Guest) -> None:
    """65536 chained entries in one indirect table: a chain far beyond the queue size."""
    n = 1 << 16
    table = g.fe.alloc(n * 16)
    hdr = _header(g, ReqType.OUT)
    view = g.fe.memory.translate(table, n * 16)
    for i in range(n):
        last = i == n - 1
        DESC.pack_into(view, i * 16, hdr + (i % 16 if i < 16 else 0), 1,
                       VRING_DESC_F_WRITE if last else VRING_DESC_F_NEXT, 0 if last else i + 1)
    g.desc(0, table, n * 16, VRING_DESC_F_INDIRECT)
    g.publish([0])


@breaker
def nested_indirect(g: Guest) -> None:
    inner = g.fe.alloc(16)
    DESC.pack_into(g.fe.memory.translate(inner, 16), 0, _header(g, ReqType.IN), 16, 0, 0)
    outer = g.fe.alloc(16)
    DESC.pack_into(g.fe.memory.translate(outer, 16), 0, inner, 16, VRING_DESC_F_INDIRECT, 0)
    g.desc(0, outer, 16, VRING_DESC_F_INDIRECT)
    g.publish([0])


@breaker
def indirect_bad_length(g: Guest) -> None:
    g.desc(0, g.fe.alloc(32), 24, VRING_DESC_F_INDIRECT)
    g.publish([0])


@breaker
def unmapped_buffer(g: Guest) -> None:
    g.desc(0, _header(g, ReqType.IN), 16, VRING_DESC_F_NEXT, 1)
    g.desc(1, 1 << 40, 513, VRING_DESC_F_WRITE)
    g.publish([0])


@breaker
def buffer_across_the_end_of_memory(g: Guest) -> None:
    g.desc(0, _header(g, ReqType.IN), 16, VRING_DESC_F_NEXT, 1)
    g.desc(1, (16 << 20) - 100, 513, VRING_DESC_F_WRITE)
    g.publish([0])


@breaker
def wrapping_address(g: Guest) -> None:
    g.desc(0, _header(g, ReqType.IN), 16, VRING_DESC_F_NEXT, 1)
    g.desc(1, 2**64 - 256, 513, VRING_DESC_F_WRITE)
    g.publish([0])


@breaker
def zero_length(g: Guest) -> None:
    g.desc(0, _header(g, ReqType.IN), 16, VRING_DESC_F_NEXT, 1)
    g.desc(1, g.fe.alloc(1), 0, VRING_DESC_F_WRITE)
    g.publish([0])


@breaker
def next_out_of_range(g: Guest) -> None:
    g.desc(0, _header(g, ReqType.IN), 16, VRING_DESC_F_NEXT, QSIZE + 3)
    g.publish([0])


@breaker
def status_in_a_readable_descriptor(g: Guest) -> None:
    g.desc(0, _header(g, ReqType.IN), 16, VRING_DESC_F_NEXT, 1)
    g.desc(1, g.fe.alloc(512), 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2)
    g.desc(2, g.fe.alloc(1), 1, 0)
    g.publish([0])


@breaker
def no_writable_status(g: Guest) -> None:
    g.desc(0, _header(g, ReqType.OUT), 16)
    g.publish([0])


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_hostile_ring_breaks_only_that_queue(served: Served, guest: Guest, name: str) -> None:
    _queue1_works(guest, served.img)
    BREAKERS[name](guest)
    before = bytes(guest.fe.memory.translate(0, 16 << 20))
    guest.kick()
    assert _wait_broken(guest)
    _queue1_works(guest, served.img)
    after = bytes(guest.fe.memory.translate(0, 16 << 20))
    # No request of queue 0 completed: the device may have touched only queue
    # 0's used ring (avail_event) and what queue 1's traffic uses.
    used0 = guest.ports[0].layout.used
    allowed = [(used0, 6 + 8 * QSIZE), *_ranges_of_queue1(guest)]
    changed = _changed(before, after)
    assert _inside(changed, allowed), changed
    lines = [m for m in served.log.messages() if "queue 0 broken" in m]
    assert len(lines) == 1, served.log.messages()[-5:]
    assert guest.fe.get_features()  # the connection itself is fine


@pytest.mark.parametrize("target", ["desc", "avail", "used"])
def test_buffer_pointing_at_its_own_ring(served: Served, guest: Guest, target: str) -> None:
    """GET_ID into queue 0's own ring: the device writes only there, the status and used."""
    layout = guest.ports[0].layout
    where = {"desc": layout.desc + 32, "avail": layout.avail, "used": layout.used}[target]
    status = guest.fe.alloc(1)
    guest.desc(0, _header(guest, ReqType.GET_ID), 16, VRING_DESC_F_NEXT, 1)
    guest.desc(1, where, 20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 15)
    guest.desc(15, status, 1, VRING_DESC_F_WRITE)
    guest.publish([0])
    before = bytes(guest.fe.memory.translate(0, 16 << 20))
    guest.kick()
    deadline = time.monotonic() + REPLY_WAIT
    used16 = guest.rings.used16
    while (used16[1] == 0 and time.monotonic() < deadline
           and not guest.fe.get_status() & Status.NEEDS_RESET):
        time.sleep(0.002)
    assert used16[1] != 0 or guest.fe.get_status() & Status.NEEDS_RESET
    _queue1_works(guest, served.img)
    after = bytes(guest.fe.memory.translate(0, 16 << 20))
    allowed = [(where, 20), (status, 1), (layout.used, 6 + 8 * QSIZE),
               *_ranges_of_queue1(guest)]
    assert _inside(_changed(before, after), allowed)
    if target == "desc":
        assert after[where:where + 20] == b"pyvirtio-blk".ljust(20, b"\0")
        assert after[status] == BlkStatus.OK


# ------------------------------------------------ a hostile back end, for the front end
FLOOD = """
import os, struct, sys
fd = int(sys.argv[1])
burst = struct.pack("<III", 2, 1, 0) * 5000  # CONFIG_CHANGE_MSG, no ack wanted
try:
    while True:
        os.write(fd, burst)
except OSError:
    pass
"""


@pytest.mark.timeout(20)  # unbounded without the deadline check: fail, do not hang
def test_front_end_deadline_holds_against_a_flooding_back_end(tmp_path: Path) -> None:
    """A back end that floods its channel with CONFIG_CHANGE_MSG and never answers."""
    path = str(tmp_path / "evil.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    done = threading.Event()
    flooders: list[subprocess.Popen[bytes]] = []

    def reply(conn: socket.socket, req: Request, value: int) -> None:
        conn.sendall(HEADER.pack(req, VERSION | 4, 8) + _U64.pack(value))

    def evil() -> None:
        conn, _ = listener.accept()
        conn.settimeout(REPLY_WAIT)
        chan: socket.socket | None = None
        with conn:
            buf = b""
            while chan is None and not done.is_set():
                data, fds, _f, _a = socket.recv_fds(conn, 4096, 4)
                if not data:
                    return
                buf += data
                for fd in fds:
                    chan = socket.socket(fileno=fd)
                while len(buf) >= HEADER.size:
                    code, _flags, size = HEADER.unpack_from(buf)
                    buf = buf[HEADER.size + size:]
                    if code == Request.GET_FEATURES:
                        reply(conn, Request.GET_FEATURES, 1 << 30)
                    elif code == Request.GET_PROTOCOL_FEATURES:
                        reply(conn, Request.GET_PROTOCOL_FEATURES,
                              1 << ProtocolFeature.BACKEND_REQ)
            assert chan is not None
            # A separate process writes the flood, so it never waits for our GIL.
            with chan:
                proc = subprocess.Popen(
                    [sys.executable, "-c", FLOOD, str(chan.fileno())],
                    pass_fds=[chan.fileno()])
            flooders.append(proc)
            conn.settimeout(0.05)
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    if not conn.recv(4096):
                        break

    t = threading.Thread(target=evil, daemon=True)
    t.start()
    try:
        fe = VhostUserFrontend.connect(path, memory_size=1 << 20, timeout=0.5)
        try:
            assert fe.backend_channel_fd is not None
            assert fe.poll_backend_channel(REPLY_WAIT) > 0  # the flood is on
            seen = fe.config_changes
            with pytest.raises(PeerError, match="in time"):
                fe.get_features()
            assert fe.config_changes > seen  # it served the channel while it waited
        finally:
            fe.close()
    finally:
        done.set()
        for proc in flooders:
            proc.kill()
            proc.wait(10)
        t.join(10)
        listener.close()
