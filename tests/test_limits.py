"""The documented limits (README "Security", the limits table): each at the limit and past it.

Only the pairs no other test already covers are here; the README table names
the tests of the others.  Past every limit the back end refuses (a NACK, a
dropped connection or a broken queue) and keeps no fd; at the limit it works.

* message size: ``MAX_PAYLOAD`` bytes of payload are read and answered;
* fds per message: ``MAX_FDS`` (8) arrive with a SET_MEM_TABLE of 8 regions;
  a ninth drops the connection (the kernel truncates the ancillary data,
  MSG_CTRUNC) and leaves no fd behind;
* memory slots: GET_MAX_MEM_SLOTS answers ``MAX_MEM_SLOTS`` (509);
* queue size: a ring of 32768 entries (VIRTIO 1.2 §2.7: "Queue Size ... the
  maximum Queue Size value is 32768") serves a request in its last slot,
  65536 is refused even by a device that would take it;
* chain length: an indirect table of 1024 chained descriptors on an 8-entry
  queue (QEMU's VIRTQUEUE_MAX_SIZE, Linux vhost's UIO_MAXIOV) is walked, a
  chain of 1025 breaks the queue.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import INDIRECT, RingPair, publish_heads, write_desc
from kit_devices import EchoDevice
from pyvirtio.core.chain import MAX_INDIRECT_CHAIN
from pyvirtio.core.errors import PeerError, QueueBrokenError
from pyvirtio.core.layout import DESC
from pyvirtio.core.spec import (
    F_RING_PACKED,
    MAX_QUEUE_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from pyvirtio.transports.vhost_user.frontend import (
    DEFAULT_UADDR,
    VhostUserFrontend,
)
from pyvirtio.transports.vhost_user.messages import (
    FLAG_NEED_REPLY,
    HEADER,
    MAX_FDS,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    VERSION,
    Decoder,
    ProtocolFeature,
    RawPayload,
    Request,
    VringState,
    request,
)
from pyvirtio.transports.vhost_user.server import VhostUserServer
from pyvirtio.transports.vhost_user.session import MAX_MEM_SLOTS, VhostUserSession
from test_hostile_vhost_user_server import (
    Served,
    _ack,
    _mem_table,
    _negotiated,
    check_io,
    fd_count,
    frame,
    hung_up,
    raw_connect,
    send,
    serving,
)

pytestmark = pytest.mark.timeout(120)

PAGE = 4096


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serving(tmp_path) as s:
        yield s


def _memfd_page() -> int:
    fd = os.memfd_create("limit-region", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE)
    return fd


# -------------------------------------------------------------- message size
def test_a_payload_of_max_payload_bytes_decodes() -> None:
    dec = Decoder()
    body = bytes(range(256)) * (MAX_PAYLOAD // 256)
    dec.feed(HEADER.pack(Request.SEND_RARP, VERSION, MAX_PAYLOAD) + body)
    (msg,) = list(dec.messages())
    assert msg.request is Request.SEND_RARP and msg.payload == RawPayload(body)
    assert dec.pending == 0
    # MAX_PAYLOAD + 1: tests/test_vhost_user_messages.py ("size field").


def test_the_server_reads_and_answers_a_message_of_max_payload_bytes(served: Served) -> None:
    before = fd_count()
    sock = raw_connect(served.path)
    _negotiated(sock)
    # An unsupported request of the largest size: the server reads all of it,
    # NACKs it (REPLY_ACK), and the connection goes on.
    data = frame(Request.SEND_RARP, b"\xaa" * MAX_PAYLOAD, VERSION | FLAG_NEED_REPLY)
    assert len(data) == HEADER.size + MAX_PAYLOAD
    assert send(sock, data)
    assert _ack(sock) == 1
    assert send(sock, frame(Request.GET_MAX_MEM_SLOTS))
    assert _ack(sock) == MAX_MEM_SLOTS  # the same stream, in step after the big message
    sock.close()
    served.settle()
    assert fd_count() == before


# ------------------------------------------------ fds per message, regions
def _eight_regions() -> bytes:
    return _mem_table([(i * PAGE, PAGE, DEFAULT_UADDR + i * PAGE, 0)
                       for i in range(MAX_MEM_REGIONS)])


def test_max_fds_arrive_with_a_table_of_max_regions(served: Served) -> None:
    assert MAX_FDS == MAX_MEM_REGIONS == 8  # QEMU's VHOST_MEMORY_BASELINE_NREGIONS
    before = fd_count()
    sock = raw_connect(served.path)
    _negotiated(sock)
    fds = [_memfd_page() for _ in range(MAX_FDS)]
    assert send(sock, _eight_regions(), fds)
    for fd in fds:
        os.close(fd)
    assert _ack(sock) == 0  # mapped: 8 regions, 8 fds
    sock.close()
    served.settle()
    assert fd_count() == before
    check_io(served)


def test_one_fd_past_max_fds_drops_the_connection_and_leaks_nothing(served: Served) -> None:
    before = fd_count()
    sock = raw_connect(served.path)
    _negotiated(sock)
    fds = [_memfd_page() for _ in range(MAX_FDS + 1)]
    send(sock, _eight_regions(), fds)
    for fd in fds:
        os.close(fd)
    assert hung_up(sock)
    sock.close()
    served.settle()
    assert any(f"more than {MAX_FDS} file descriptors" in m for m in served.log.messages())
    assert fd_count() == before
    check_io(served)


def test_get_max_mem_slots_answers_the_default() -> None:
    # ADD_MEM_REG up to the slots and past them, over a socket:
    # tests/test_hostile_vhost_user_server.py::test_memory_slots_beyond_the_limit.
    assert MAX_MEM_SLOTS == 509
    session = VhostUserSession(EchoDevice())
    session.handle(request(Request.SET_PROTOCOL_FEATURES,
                           1 << ProtocolFeature.CONFIGURE_MEM_SLOTS))
    out = session.handle(request(Request.GET_MAX_MEM_SLOTS))
    assert [r.payload for r in out.replies] == [MAX_MEM_SLOTS]
    session.reset()


# ---------------------------------------------------------------- queue size
class BigQueueEcho(EchoDevice):
    """A device that would take rings larger than virtio allows."""

    queue_size = 1 << 16


def test_a_ring_of_32768_entries_serves_its_last_slot(tmp_path: Path) -> None:
    assert MAX_QUEUE_SIZE == 32768
    path = str(tmp_path / "big.sock")
    server = VhostUserServer(BigQueueEcho(queues=1), socket_path=path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with VhostUserFrontend.connect(path, memory_size=8 << 20) as fe:
            # The split ring's last slot: its avail/used indices (the kit also offers packed).
            fe.negotiate(fe.get_features() & ~(1 << F_RING_PACKED))
            # Start at index 32767 so the request lands in the ring's last slot; the
            # ring's indices must say so before it is enabled (the back end checks
            # avail.idx against its base as soon as the ring runs).
            q = fe.setup_queue(0, MAX_QUEUE_SIZE, base=MAX_QUEUE_SIZE - 1, enable=False)
            q.queue.avail_idx_shadow = q.queue.last_used_idx = MAX_QUEUE_SIZE - 1
            q.queue.rings.avail16[1] = q.queue.rings.used16[1] = MAX_QUEUE_SIZE - 1
            fe.enable_queue(0)
            out, inn = fe.alloc(16), fe.alloc(16)
            fe.memory.write(out, b"the last slot!!!")
            q.queue.add([(out, 16)], [(inn, 16)], token="last")
            q.notify()
            q.wait(10.0)
            assert q.queue.get_buf() == ("last", 16)
            assert fe.memory.read(inn, 16) == b"the last slot!!!"
            assert fe.stop_queue(0) == MAX_QUEUE_SIZE  # avail index 32767 + 1
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_set_vring_num_past_32768_is_refused_even_if_the_device_would_take_it() -> None:
    session = VhostUserSession(BigQueueEcho(queues=1))
    assert session.max_queue_size == MAX_QUEUE_SIZE
    session.handle(request(Request.SET_VRING_NUM, VringState(0, MAX_QUEUE_SIZE)))
    assert session.rings[0].num == MAX_QUEUE_SIZE
    with pytest.raises(PeerError, match="SET_VRING_NUM 65536"):
        session.handle(request(Request.SET_VRING_NUM, VringState(0, 2 * MAX_QUEUE_SIZE)))
    assert session.rings[0].num == 0  # refused: the ring is unusable until configured again
    session.reset()


# -------------------------------------------------------------- chain length
def _indirect_chain(pair: RingPair, length: int) -> int:
    """Head 0: one indirect descriptor naming a table of ``length`` chained descriptors."""
    table = pair.buf(16 * length)
    data = pair.buf(length)
    raw = bytearray()
    for i in range(length):
        last = i == length - 1
        raw += DESC.pack(data + i, 1, VRING_DESC_F_WRITE if last else VRING_DESC_F_NEXT,
                         0 if last else i + 1)
    pair.mem.write(table, bytes(raw))
    write_desc(pair, 0, table, 16 * length, VRING_DESC_F_INDIRECT, 0)
    publish_heads(pair, 0)
    return data


def test_an_indirect_chain_of_1024_descriptors_is_walked(
        ring_pair: Callable[..., RingPair]) -> None:
    assert MAX_INDIRECT_CHAIN == 1024
    pair = ring_pair(num=8, features=INDIRECT)
    data = _indirect_chain(pair, MAX_INDIRECT_CHAIN)
    e = pair.device.pop()
    assert e is not None and pair.device.broken is None
    assert len(e.readable) == MAX_INDIRECT_CHAIN - 1 and len(e.writable) == 1
    assert pair.mem.translate(data, 1).tobytes() == e.readable[0].tobytes()


def test_an_indirect_chain_of_1025_descriptors_breaks_the_queue(
        ring_pair: Callable[..., RingPair]) -> None:
    pair = ring_pair(num=8, features=INDIRECT)
    _indirect_chain(pair, MAX_INDIRECT_CHAIN + 1)
    with pytest.raises(PeerError, match="longer than 1024 descriptors") as info:
        pair.device.pop()
    assert type(info.value) is PeerError and pair.device.broken is not None
    with pytest.raises(QueueBrokenError):
        pair.device.pop()


def test_limits_are_the_ones_the_readme_states() -> None:
    # The README's limits table quotes these numbers; a change must update it.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for needle in (f"| message payload | {MAX_PAYLOAD} bytes",
                   f"| fds per message | {MAX_FDS} ",
                   f"| memory regions | {MAX_MEM_REGIONS} per SET_MEM_TABLE, "
                   f"{MAX_MEM_SLOTS} with ADD_MEM_REG",
                   f"| queue size | {MAX_QUEUE_SIZE} ",
                   f"max(queue size, {MAX_INDIRECT_CHAIN})"):
        assert needle in readme, needle
