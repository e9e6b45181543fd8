"""pyvirtio's vhost-user front end against pyvirtio's back end over a real Unix socket.

Real eventfds, real SCM_RIGHTS, real memfd mappings in a server thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kit_devices import EchoDevice as KitEcho
from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.packed_layout import pack_vring_base
from pyvirtio.core.spec import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    Status,
)
from pyvirtio.io.eventfd import EventFd
from pyvirtio.transports.device import RING_FEATURES
from pyvirtio.transports.vhost_user.frontend import (
    FRONTEND_PROTOCOL_FEATURES,
    FrontendQueue,
    PackedFrontendQueue,
    VhostUserFrontend,
    VhostUserRefused,
)
from pyvirtio.transports.vhost_user.messages import (
    FLAG_REPLY,
    HEADER,
    VERSION,
    BackendDecoder,
    BackendRequest,
    ProtocolFeature,
    Request,
    VringState,
    backend_request,
    encode,
)
from pyvirtio.transports.vhost_user.server import VhostUserServer

pytestmark = pytest.mark.timeout(60)

ALL = 1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX | 1 << F_RING_INDIRECT_DESC
LOGGER = "pyvirtio.vhost_user"


class EchoDevice(KitEcho):
    """Queue i: copy the readable bytes, each XOR-ed with i, into the writable buffers."""

    queue_size = 1024

    def __init__(self, queues: int = 2) -> None:
        super().__init__(queues, xor=True)
        self.acked = 0
        self.config = b"pyvirtio-echo-config"

    def set_config(self, offset: int, data: bytes) -> None:
        raise PeerError("read-only config")


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
        assert fe.get_features() == RING_FEATURES
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


@pytest.mark.parametrize("features", [ALL, 1 << F_VERSION_1], ids=["event-idx", "flags"])
def test_packed_rings_flow_and_stop_at_their_positions(served: Running, sock_path: str,
                                                       features: int) -> None:
    """VIRTIO_F_RING_PACKED (§2.8): sizes that are not powers of two, many laps, and
    GET_VRING_BASE answering the positions with wrap counters (vhost-user.rst)."""
    with VhostUserFrontend.connect(sock_path, memory_size=4 << 20) as fe:
        assert fe.negotiate(features | 1 << F_RING_PACKED) == features | 1 << F_RING_PACKED
        q0 = fe.setup_ring(0, 48)
        q1 = fe.setup_ring(1, 13, indirect_per_head=4)
        assert isinstance(q0, PackedFrontendQueue) and isinstance(q1, PackedFrontendQueue)
        msgs = [os.urandom(1 + i * 7) for i in range(20)]
        assert roundtrip(fe, q0, msgs) == msgs
        assert roundtrip(fe, q1, msgs[:3], segments=3) == [xor(m, 1) for m in msgs[:3]]
        for _ in range(7):  # laps of the 13-entry ring: the wrap counters flip
            assert roundtrip(fe, q1, msgs[:6]) == [xor(m, 1) for m in msgs[:6]]
        for fq in (q0, q1):
            d = fq.queue
            assert d.outstanding == 0
            expected = pack_vring_base(d.next_avail_idx, d.avail_wrap_counter,
                                       d.last_used_idx, d.used_wrap_counter)
            assert fe.stop_queue(fq.index) == expected
        assert expected >> 15 & 1 != 1 or expected & 0x7FFF != 0  # q1 went round


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
        assert fe.get_features() == RING_FEATURES


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


# ------------------------------------------------- back-end channel ------------
GARBAGE = b"\xde\xad\xbe\xef"


def _garbage_descriptors(fe: VhostUserFrontend, q: FrontendQueue) -> None:
    """The guest makes a request, then scribbles over its descriptor table and kicks."""
    out = fe.alloc(16)
    q.queue.add([(out, 16)], [], token="doomed")
    desc = q.queue.rings.desc
    desc[:] = GARBAGE * (len(desc) // len(GARBAGE))
    q.kick.signal()


def _eventually(cond: object, timeout: float = 10.0) -> bool:
    """Wait for a condition another thread makes true (bounded; not a timing assertion)."""
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return bool(cond())


def _lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def test_hostile_descriptors_raise_a_config_change_at_the_front_end(
        served: Running, sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    server = served.server
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
            assert fe.has_protocol(ProtocolFeature.BACKEND_REQ)
            assert fe.backend_channel_fd is not None
            fe.negotiate(ALL)
            q0 = fe.setup_queue(0, 8)
            q1 = fe.setup_queue(1, 8)
            seen: list[int] = []
            fe.on_config_change = lambda: seen.append(fe.config_changes)
            assert fe.poll_backend_channel(0) == 0
            _garbage_descriptors(fe, q0)
            # The driver side sees the configuration change ...
            assert fe.poll_backend_channel(10) == 1
            assert fe.config_changes == 1 and seen == [1]
            # ... re-reads the device state as QEMU does, finds NEEDS_RESET ...
            assert fe.get_status() & Status.NEEDS_RESET
            assert fe.get_config(0, 8) == b"pyvirtio"
            # ... and the other queue keeps working.
            assert roundtrip(fe, q1, [b"q1 alive"]) == [xor(b"q1 alive", 1)]
            backend = server.session
            assert backend is not None
            assert _eventually(lambda: backend.backend_replies_due == 0), "ack not read"
            assert fe.poll_backend_channel(0) == 0 and fe.config_changes == 1
        # The process survives and serves the next front end.
        with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe2:
            fe2.negotiate(ALL)
            q = fe2.setup_queue(0, 8)
            assert roundtrip(fe2, q, [b"next"]) == [b"next"]
    assert served.thread.is_alive()
    assert len(_lines(caplog, "broken")) == 1
    assert _lines(caplog, "back-end channel") == []


def test_config_change_without_reply_ack(served: Running, sock_path: str) -> None:
    mask = FRONTEND_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.REPLY_ACK)
    with VhostUserFrontend.connect(sock_path, memory_size=1 << 20, protocol_mask=mask) as fe:
        fe.negotiate(ALL)
        q0 = fe.setup_queue(0, 8)
        q1 = fe.setup_queue(1, 8)
        _garbage_descriptors(fe, q0)
        assert fe.poll_backend_channel(10) == 1
        assert fe.get_status() & Status.NEEDS_RESET
        assert roundtrip(fe, q1, [b"ok"]) == [xor(b"ok", 1)]
        backend = served.server.session
        assert backend is not None and backend.backend_replies_due == 0


def test_config_change_acked_while_waiting_for_a_reply(served: Running, sock_path: str) -> None:
    """A CONFIG_CHANGE_MSG arriving during another request is answered at once."""
    with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        fe.negotiate(ALL)
        q0 = fe.setup_queue(0, 8)
        fe.setup_queue(1, 8)
        seen: list[int] = []
        fe.on_config_change = lambda: seen.append(1)
        _garbage_descriptors(fe, q0)
        backend = served.server.session
        assert backend is not None
        # Requests keep the channel served; the ack reaches the back end ...
        assert _eventually(lambda: fe.get_status() & Status.NEEDS_RESET
                           and fe.config_changes == 1 and backend.backend_replies_due == 0)
        assert seen == []  # ... the callback waits for poll_backend_channel
        assert fe.poll_backend_channel(0) == 1 and seen == [1]


def test_server_notify_config_change(served: Running, sock_path: str) -> None:
    with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        fe.negotiate(ALL)
        served.server.notify_config_change()
        assert fe.poll_backend_channel(10) == 1
        assert fe.get_status() & Status.NEEDS_RESET == 0


def _own_channel(fe: VhostUserFrontend) -> socket.socket:
    """Replace the back-end channel with a socketpair the test drives by hand."""
    ours, theirs = socket.socketpair()
    try:
        fe._send(Request.SET_BACKEND_REQ_FD, None, (theirs.fileno(),))
    finally:
        theirs.close()
    return ours


def test_front_end_that_never_answers(served: Running, sock_path: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER), \
            VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        fe.negotiate(ALL)
        chan = _own_channel(fe)
        q0 = fe.setup_queue(0, 8)
        q1 = fe.setup_queue(1, 8)
        _garbage_descriptors(fe, q0)
        chan.settimeout(10)
        dec = BackendDecoder()
        while (msg := dec.next_message()) is None:
            dec.feed(chan.recv(64))
        assert msg == backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
        # Never answered: the back end keeps serving everything else.
        assert fe.get_status() & Status.NEEDS_RESET
        assert roundtrip(fe, q1, [b"unanswered"]) == [xor(b"unanswered", 1)]
        backend = served.server.session
        assert backend is not None and backend.backend_replies_due == 1
        chan.close()
    assert served.thread.is_alive()


def test_front_end_closed_the_channel(served: Running, sock_path: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER), \
            VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        fe.negotiate(ALL)
        chan = _own_channel(fe)
        chan.close()
        q0 = fe.setup_queue(0, 8)
        q1 = fe.setup_queue(1, 8)
        _garbage_descriptors(fe, q0)
        assert _eventually(lambda: fe.get_status() & Status.NEEDS_RESET)
        assert roundtrip(fe, q1, [b"alone"]) == [xor(b"alone", 1)]
        assert _eventually(lambda: len(_lines(caplog, "back-end channel")) == 1)
    assert served.thread.is_alive()
    assert len(_lines(caplog, "back-end channel")) == 1
    assert len(_lines(caplog, "broken")) == 1


def test_front_end_that_stops_reading_the_channel(served: Running, sock_path: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER), \
            VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        fe.negotiate(ALL)
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # fill the channel: the back end's sends would block
                theirs.send(bytes(4096))
        fe._send(Request.SET_BACKEND_REQ_FD, None, (theirs.fileno(),))
        theirs.close()
        q0 = fe.setup_queue(0, 8)
        q1 = fe.setup_queue(1, 8)
        _garbage_descriptors(fe, q0)
        assert _eventually(lambda: fe.get_status() & Status.NEEDS_RESET)
        assert roundtrip(fe, q1, [b"not blocked"]) == [xor(b"not blocked", 1)]
        assert _eventually(lambda: len(_lines(caplog, "back-end channel full")) == 1)
        ours.close()
    assert served.thread.is_alive()


@pytest.mark.parametrize("junk", [
    encode(backend_request(BackendRequest.CONFIG_CHANGE_MSG)),  # a request, not a reply
    HEADER.pack(BackendRequest.CONFIG_CHANGE_MSG, VERSION | FLAG_REPLY, 8) + bytes(8),  # unasked
    b"\xff" * 40,
])
def test_garbage_on_the_channel_costs_only_the_channel(
        served: Running, sock_path: str, caplog: pytest.LogCaptureFixture, junk: bytes) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER), \
            VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        fe.negotiate(ALL)
        chan = _own_channel(fe)
        chan.sendall(junk)
        assert _eventually(lambda: len(_lines(caplog, "back-end channel")) == 1)
        assert chan.recv(16) == b""  # the back end closed its end
        q = fe.setup_queue(0, 8)
        assert roundtrip(fe, q, [b"still here"]) == [b"still here"]
        chan.close()
    assert "broke the protocol" in _lines(caplog, "back-end channel")[0]


def test_front_end_refuses_requests_it_did_not_negotiate_and_garbage(
        served: Running, sock_path: str) -> None:
    with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
        fe.negotiate(ALL)
        backend = served.server.session
        assert backend is not None and backend.backend_fd is not None
        # Written straight on the back end's end: an in-band VRING_CALL asking for an ack.
        peer = socket.socket(fileno=os.dup(backend.backend_fd))
        peer.setblocking(True)
        peer.sendall(encode(backend_request(BackendRequest.VRING_CALL, VringState(0, 0),
                                            need_reply=True)))
        assert fe.poll_backend_channel(10) == 0 and fe.config_changes == 0
        peer.sendall(b"\x02\x00\x00\x00" + b"\xff" * 8)  # bad version and flags
        # A request in flight meanwhile is not failed by the channel's garbage ...
        assert fe.get_status() & Status.NEEDS_RESET == 0
        with pytest.raises(PeerError, match="version"):  # ... the next poll reports it
            fe.poll_backend_channel(10)
        assert fe.backend_channel_fd is None
        assert fe.poll_backend_channel(0) == 0
        peer.close()
        q = fe.setup_queue(0, 8)  # the main connection is unaffected
        assert roundtrip(fe, q, [b"fine"]) == [b"fine"]


def test_backend_req_can_be_turned_off(sock_path: str) -> None:
    run = Running(VhostUserServer(EchoDevice(), socket_path=sock_path, backend_req=False))
    try:
        with VhostUserFrontend.connect(sock_path, memory_size=1 << 20) as fe:
            assert not fe.backend_protocol_features >> ProtocolFeature.BACKEND_REQ & 1
            assert fe.backend_channel_fd is None
            fe.negotiate(ALL)
            q0 = fe.setup_queue(0, 8)
            _garbage_descriptors(fe, q0)
            assert _eventually(lambda: fe.get_status() & Status.NEEDS_RESET)
            assert fe.poll_backend_channel(0) == 0
    finally:
        run.stop()
