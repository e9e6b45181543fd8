"""pyvirtio's vhost-user front end against pyvirtio's back end over a real Unix socket.

Real eventfds, real SCM_RIGHTS, real memfd mappings in a server thread.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, Status
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.io.eventfd import EventFd
from pyvirtio.transports.vhost_user.frontend import (
    FRONTEND_PROTOCOL_FEATURES,
    FrontendQueue,
    VhostUserFrontend,
    VhostUserRefused,
)
from pyvirtio.transports.vhost_user.messages import (
    HEADER,
    VERSION,
    ProtocolFeature,
    Request,
)
from pyvirtio.transports.vhost_user.server import VhostUserServer

pytestmark = pytest.mark.timeout(60)

ALL = 1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX | 1 << F_RING_INDIRECT_DESC
LOGGER = "pyvirtio.vhost_user"


class EchoDevice:
    """Queue i: copy the readable bytes, each XOR-ed with i, into the writable buffers."""

    device_id = 99

    def __init__(self, queues: int = 2) -> None:
        self.queues = queues
        self.acked = 0
        self.resets = 0

    def num_queues(self) -> int:
        return self.queues

    def max_queue_size(self) -> int:
        return 1024

    def features(self) -> int:
        return ALL

    def protocol_features(self) -> int:
        return 0

    def set_features(self, features: int) -> None:
        self.acked = features

    def get_config(self, offset: int, size: int) -> bytes:
        return b"pyvirtio-echo-config"[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        raise PeerError("read-only config")

    def process_queue(self, index: int, queue: SplitDeviceQueue) -> int:
        n = 0
        while (elem := queue.pop()) is not None:
            data = bytes(b ^ index for b in b"".join(bytes(v) for v in elem.readable))
            written = 0
            for v in elem.writable:
                k = min(len(v), len(data) - written)
                v[:k] = data[written:written + k]
                written += k
            queue.push(elem.head, written)
            n += 1
        return n

    def reset(self) -> None:
        self.resets += 1


class Running:
    def __init__(self, server: VhostUserServer) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "vhost.sock")


@pytest.fixture(params=[False, True], ids=["kick", "poll"])
def served(request: pytest.FixtureRequest, sock_path: str) -> Iterator[Running]:
    run = Running(VhostUserServer(EchoDevice(), socket_path=sock_path, poll=request.param))
    yield run
    run.stop()


def roundtrip(fe: VhostUserFrontend, q: FrontendQueue, payloads: list[bytes],
              *, segments: int = 1) -> list[bytes]:
    """Put all payloads in flight at once, kick, collect the echoes in order of tokens."""
    bufs = []
    for i, data in enumerate(payloads):
        out = fe.alloc(len(data))
        fe.memory.write(out, data)
        ins = [fe.alloc(len(data) // segments + 8) for _ in range(segments)]
        in_segs = [(a, len(data) // segments + 8) for a in ins]
        q.queue.add([(out, len(data))], in_segs, token=i)
        bufs.append(ins)
    q.notify()
    results: dict[int, bytes] = {}
    while len(results) < len(payloads):
        got = q.queue.get_buf()
        if got is None:
            assert q.wait(10) or q.queue.more_used(), "no interrupt from the back end"
            continue
        token, length = got
        assert isinstance(token, int)
        seg = len(payloads[token]) // segments + 8
        data = b"".join(fe.memory.read(a, seg) for a in bufs[token])[:length]
        results[token] = data
    return [results[i] for i in range(len(payloads))]


def xor(data: bytes, k: int) -> bytes:
    return bytes(b ^ k for b in data)


def test_data_flows_through_two_queues(served: Running, sock_path: str) -> None:
    with VhostUserFrontend.connect(sock_path, memory_size=4 << 20) as fe:
        assert fe.get_features() == ALL
        assert fe.negotiate(ALL) == ALL
        assert fe.get_queue_num() == 2
        assert fe.get_config(0, 8) == b"pyvirtio"
        q0 = fe.setup_queue(0, 64)
        q1 = fe.setup_queue(1, 16, indirect_per_head=4)
        msgs = [os.urandom(1 + i * 7) for i in range(30)]
        assert roundtrip(fe, q0, msgs) == msgs
        assert roundtrip(fe, q1, msgs[:16], segments=3) == [xor(m, 1) for m in msgs[:16]]
        # More requests than the ring holds, in rounds: indices keep going.
        for _ in range(5):
            assert roundtrip(fe, q1, msgs[:10]) == [xor(m, 1) for m in msgs[:10]]
        assert fe.stop_queue(0) == 30
        assert fe.stop_queue(1) == 66


def test_without_event_idx_and_with_mem_slots(served: Running, sock_path: str) -> None:
    with VhostUserFrontend.connect(sock_path, memory_size=1 << 20, use_mem_slots=True) as fe:
        assert fe.negotiate(1 << F_VERSION_1) == 1 << F_VERSION_1
        q = fe.setup_queue(0, 8)
        for r in range(20):
            msgs = [b"round %d item %d" % (r, i) for i in range(4)]
            assert roundtrip(fe, q, msgs) == msgs


def test_without_reply_ack_or_protocol_features(served: Running, sock_path: str) -> None:
    with VhostUserFrontend.connect(sock_path, memory_size=1 << 20, protocol_mask=0) as fe:
        assert fe.protocol_features == 0
        fe.negotiate(ALL)
        q = fe.setup_queue(1, 32)
        assert roundtrip(fe, q, [b"abc"]) == [xor(b"abc", 1)]


def test_refusals_surface_as_errors_and_keep_the_connection(served: Running,
                                                            sock_path: str) -> None:
    with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        fe.negotiate(ALL)
        with pytest.raises(VhostUserRefused):
            fe.setup_queue(5, 8)  # queue index beyond the queue count
        with pytest.raises(VhostUserRefused):
            fe.set_config(0, b"x")
        q = fe.setup_queue(0, 8)
        assert roundtrip(fe, q, [b"still served"]) == [b"still served"]


def test_second_front_end_after_first_disconnects(served: Running, sock_path: str) -> None:
    for n in range(3):
        with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
            fe.negotiate(ALL)
            q = fe.setup_queue(0, 8)
            assert roundtrip(fe, q, [b"connection %d" % n]) == [b"connection %d" % n]
    assert served.server.connections == 3


def test_front_end_vanishing_mid_flight_then_next_one(served: Running, sock_path: str) -> None:
    fe = VhostUserFrontend.connect(sock_path, memory_size=1 << 20)
    fe.negotiate(ALL)
    fe.setup_queue(0, 8)
    fe.close()  # no GET_VRING_BASE: QEMU killed
    with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe2:
        fe2.negotiate(ALL)
        q = fe2.setup_queue(0, 8)
        assert roundtrip(fe2, q, [b"after crash"]) == [b"after crash"]


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _dropped(s: socket.socket) -> bool:
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("garbage", [
    HEADER.pack(999, VERSION, 0),  # unknown request
    HEADER.pack(Request.SET_FEATURES, VERSION, 4) + bytes(4),  # wrong payload size
    HEADER.pack(Request.GET_FEATURES, 2, 0),  # bad version
    HEADER.pack(Request.GET_FEATURES, VERSION, 1 << 30),  # size field too large
    HEADER.pack(Request.SET_VRING_NUM, VERSION, 8) + struct.pack("<II", 0, 3),  # not pow2
    HEADER.pack(Request.SET_VRING_KICK, VERSION, 8) + struct.pack("<Q", 0),  # fd missing
])
def test_malformed_message_drops_only_that_connection(
        sock_path: str, garbage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    run = Running(VhostUserServer(EchoDevice(), socket_path=sock_path))
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            s = _raw(sock_path)
            s.sendall(garbage)
            assert _dropped(s)
            s.close()
            with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
                fe.negotiate(ALL)
                q = fe.setup_queue(0, 8)
                assert roundtrip(fe, q, [b"next one"]) == [b"next one"]
        drops = [r for r in caplog.records if "dropping front end" in r.getMessage()]
        assert len(drops) == 1
    finally:
        run.stop()


def test_wrong_fd_count_drops_the_connection(served: Running, sock_path: str) -> None:
    s = _raw(sock_path)
    r, w = os.pipe()
    msg = HEADER.pack(Request.SET_OWNER, VERSION, 0)
    socket.send_fds(s, [msg], [r, w])
    assert _dropped(s)
    s.close()
    os.close(r)
    os.close(w)
    with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        assert fe.get_features() == ALL


def test_bad_memory_table_drops_without_reply_ack(served: Running, sock_path: str) -> None:
    fe = VhostUserFrontend.connect(sock_path, memory_size=1 << 20,
                                   protocol_mask=FRONTEND_PROTOCOL_FEATURES
                                   & ~(1 << ProtocolFeature.REPLY_ACK))
    try:
        region = fe.memory.regions[0]
        region.mmap_offset = 1 << 30  # past the end of the memfd
        fe.negotiate(ALL)
        with pytest.raises(PeerError):
            fe.get_features()  # the back end hung up
    finally:
        fe.close()


def test_hostile_ring_breaks_only_that_queue(served: Running, sock_path: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER), \
            VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        fe.negotiate(ALL)
        q0 = fe.setup_queue(0, 8)
        q1 = fe.setup_queue(1, 8)
        err = os.eventfd(0, os.EFD_CLOEXEC)
        fe._send(Request.SET_VRING_ERR, 0, (err,))
        # The guest puts a head beyond the ring into the available ring.
        avail = q0.queue.rings.avail16
        avail[2] = 77
        avail[1] = 1
        q0.kick.signal()
        with EventFd(err) as err_fd:  # the back end reports the broken ring
            assert err_fd.wait(10) >= 1
        assert fe.get_status() & Status.NEEDS_RESET
        assert roundtrip(fe, q1, [b"q1 alive"]) == [xor(b"q1 alive", 1)]
        # The front end resets the ring: stop, restart from the index, works again.
        base = fe.stop_queue(0)
        avail[1] = 0
        q0b = fe.setup_queue(0, 8, base=base)
        assert roundtrip(fe, q0b, [b"q0 again"]) == [b"q0 again"]
    broken = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(broken) == 1 and "77" in broken[0].getMessage()


def test_listen_fd_and_stop_from_another_thread(tmp_path: Path) -> None:
    path = str(tmp_path / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    run = Running(VhostUserServer(EchoDevice(1), listen_fd=listener.detach()))
    try:
        with VhostUserFrontend.connect(path, memory_size=1 << 20) as fe:
            fe.negotiate(ALL)
            assert fe.get_queue_num() == 1
            q = fe.setup_queue(0, 8)
            assert roundtrip(fe, q, [b"inherited"]) == [b"inherited"]
            # stop() while a front end is still connected
    finally:
        run.stop()


def test_stop_with_a_connected_front_end(sock_path: str) -> None:
    dev = EchoDevice()
    run = Running(VhostUserServer(dev, socket_path=sock_path))
    fe = VhostUserFrontend.connect(sock_path, memory_size=1 << 20)
    fe.negotiate(ALL)
    fe.setup_queue(0, 8)
    run.stop()
    assert dev.resets >= 1
    assert not os.path.exists(sock_path)
    fe.close()


# ----------------------------------------------------- hostile back ends
@pytest.mark.parametrize("answer", [
    b"",  # hangs up
    HEADER.pack(Request.GET_PROTOCOL_FEATURES, VERSION | 4, 8) + bytes(8),  # wrong request
    HEADER.pack(Request.GET_FEATURES, VERSION, 8) + bytes(8),  # reply flag missing
    HEADER.pack(Request.GET_FEATURES, VERSION | 4, 4) + bytes(4),  # wrong size
    HEADER.pack(Request.GET_FEATURES, VERSION | 4, 1 << 20),  # size too large
    None,  # never answers
])
def test_front_end_refuses_a_hostile_back_end(tmp_path: Path, answer: bytes | None) -> None:
    path = str(tmp_path / "evil.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    done = threading.Event()

    def evil() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)  # SET_OWNER and GET_FEATURES
            if answer:
                conn.sendall(answer)
            if answer is None or answer:
                done.wait(10)

    t = threading.Thread(target=evil, daemon=True)
    t.start()
    try:
        with pytest.raises(PeerError):
            VhostUserFrontend.connect(path, memory_size=1 << 20,
                                      timeout=0.5 if answer is None else 10)
    finally:
        done.set()
        t.join(10)
        listener.close()


def test_listen_fd_must_be_a_listening_unix_socket() -> None:
    a, b = socket.socketpair()
    with pytest.raises(CallerError, match="listening"):
        VhostUserServer(EchoDevice(), listen_fd=a.fileno())
    os.fstat(a.fileno())  # still open: the server neither took nor closed it
    a.close()
    b.close()
