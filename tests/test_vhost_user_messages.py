"""The vhost-user codec: round trips of every request, framing rules, garbage."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.core.errors import PeerError
from pyvirtio.transports.vhost_user.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_PAYLOAD,
    VERSION,
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
    RawPayload,
    Request,
    VringAddr,
    VringState,
    backend_reply,
    backend_request,
    encode,
    reply,
    request,
)


def _fd() -> int:
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _valid(req: Request) -> tuple[Payload, int]:
    """A well-formed payload for ``req`` and how many fds go with it."""
    region = MemRegion(0x1000, 0x2000, 0x7F00_0000_1000, 0x3000)
    table: dict[Request, tuple[Payload, int]] = {
        Request.SET_FEATURES: (1 << 32 | 1 << 30, 0),
        Request.SET_PROTOCOL_FEATURES: (0x1A209, 0),
        Request.SET_MEM_TABLE: (MemoryTable((region, MemRegion(0x100000, 0x1000, 9 << 40, 0))), 2),
        Request.SET_LOG_BASE: (RawPayload(bytes(16)), 1),
        Request.SET_LOG_FD: (RawPayload(b""), 1),
        Request.SET_VRING_NUM: (VringState(1, 256), 0),
        Request.SET_VRING_ADDR: (VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0), 0),
        Request.SET_VRING_BASE: (VringState(0, 65535), 0),
        Request.GET_VRING_BASE: (VringState(0, 0), 0),
        Request.SET_VRING_KICK: (3, 1),
        Request.SET_VRING_CALL: (3 | VRING_NOFD_MASK, 0),
        Request.SET_VRING_ERR: (0, 1),
        Request.SET_VRING_ENABLE: (VringState(0, 1), 0),
        Request.SEND_RARP: (RawPayload(bytes(8)), 0),
        Request.NET_SET_MTU: (RawPayload(bytes(8)), 0),
        Request.SET_BACKEND_REQ_FD: (None, 1),
        Request.IOTLB_MSG: (RawPayload(bytes(32)), 0),
        Request.SET_VRING_ENDIAN: (RawPayload(bytes(8)), 0),
        Request.GET_CONFIG: (ConfigSpace(0, 60, 0, bytes(60)), 0),
        Request.SET_CONFIG: (ConfigSpace(32, 1, 0, b"\x01"), 0),
        Request.CREATE_CRYPTO_SESSION: (RawPayload(bytes(40)), 0),
        Request.CLOSE_CRYPTO_SESSION: (RawPayload(bytes(8)), 0),
        Request.GET_INFLIGHT_FD: (InflightDesc(0, 0, 2, 128), 0),
        Request.SET_INFLIGHT_FD: (InflightDesc(4352, 0, 2, 128), 1),
        Request.GPU_SET_SOCKET: (RawPayload(b""), 1),
        Request.VRING_KICK: (VringState(0, 0), 0),
        Request.ADD_MEM_REG: (region, 1),
        Request.REM_MEM_REG: (region, 0),
        Request.SET_STATUS: (15, 0),
    }
    return table.get(req, (None, 0))


@pytest.mark.parametrize("req", list(Request))
def test_every_request_round_trips(req: Request) -> None:
    payload, nfds = _valid(req)
    fds = tuple(_fd() for _ in range(nfds))
    msg = request(req, payload, fds=fds, need_reply=True)
    dec = Decoder()
    dec.feed(encode(msg), fds)
    out = list(dec.messages())
    assert out == [msg]
    assert out[0].need_reply and not out[0].is_reply
    out[0].close_fds()


@pytest.mark.parametrize("req", list(Request))
def test_byte_by_byte_feeding(req: Request) -> None:
    payload, nfds = _valid(req)
    fds = tuple(_fd() for _ in range(nfds))
    data = encode(request(req, payload))
    dec = Decoder()
    got: list[Message] = []
    for i in range(len(data)):
        dec.feed(data[i:i + 1], fds if i == 0 else ())
        got.extend(dec.messages())
    assert [(m.request, m.payload, len(m.fds)) for m in got] == [(req, payload, nfds)]
    got[0].close_fds()


def test_fds_go_to_the_message_they_arrived_with() -> None:
    a, b, c = _fd(), _fd(), _fd()
    kick = encode(request(Request.SET_VRING_KICK, 0))
    call = encode(request(Request.SET_VRING_CALL, 0))
    feat = encode(request(Request.SET_FEATURES, 1))
    err = encode(request(Request.SET_VRING_ERR, 0))
    dec = Decoder()
    dec.feed(kick[:5], [a])
    dec.feed(kick[5:])
    dec.feed(call, [b])
    # One recvmsg that read a message without fds and then one with: the fds
    # are the second one's (the kernel stops a read after an fd-carrying send).
    dec.feed(feat + err, [c])
    msgs = list(dec.messages())
    assert [m.fds for m in msgs] == [(a,), (b,), (), (c,)]
    for m in msgs:
        m.close_fds()


def test_fds_without_data_are_refused() -> None:
    fd = _fd()
    dec = Decoder()
    with pytest.raises(PeerError, match="without data"):
        dec.feed(b"", [fd])
    assert not _is_open(fd)


@pytest.mark.parametrize(("req", "payload"), [
    (Request.GET_FEATURES, 0),
    (Request.GET_VRING_BASE, VringState(1, 42)),
    (Request.GET_CONFIG, ConfigSpace(0, 4, 0, b"abcd")),
    (Request.GET_CONFIG, ConfigSpace(0, 0, 0, b"")),
    (Request.SET_VRING_NUM, 1),  # a REPLY_ACK
])
def test_replies_round_trip(req: Request, payload: Payload) -> None:
    dec = Decoder(replies=True)
    dec.feed(encode(reply(req, payload)))
    (msg,) = dec.messages()
    assert msg.is_reply and msg.request is req and msg.payload == payload


def _frame(code: int, flags: int, body: bytes, size: int | None = None) -> bytes:
    return HEADER.pack(code, flags, len(body) if size is None else size) + body


@pytest.mark.parametrize(("data", "nfds", "words"), [
    (_frame(999, VERSION, b""), 0, "unknown request"),
    (_frame(0, VERSION, b""), 0, "unknown request"),
    (_frame(Request.GET_FEATURES, 2, b""), 0, "version"),
    (_frame(Request.GET_FEATURES, 0, b""), 0, "version"),
    (_frame(Request.GET_FEATURES, VERSION | FLAG_REPLY, b""), 0, "reply flag"),
    (_frame(Request.GET_FEATURES, VERSION | 0x100, b""), 0, "unknown flag"),
    (_frame(Request.GET_FEATURES, VERSION, bytes(8)), 0, "expected 0"),
    (_frame(Request.SET_FEATURES, VERSION, bytes(4)), 0, "expected 8"),
    (_frame(Request.SET_VRING_NUM, VERSION, bytes(12)), 0, "expected 8"),
    (_frame(Request.SET_VRING_ADDR, VERSION, bytes(32)), 0, "expected 40"),
    (_frame(Request.SET_VRING_KICK, VERSION, struct.pack("<Q", 0)), 0, "file descriptors"),
    (_frame(Request.SET_VRING_KICK, VERSION, struct.pack("<Q", 0x100)), 1, "file descriptors"),
    (_frame(Request.SET_VRING_NUM, VERSION, bytes(8)), 1, "file descriptors"),
    (_frame(Request.ADD_MEM_REG, VERSION, bytes(40)), 0, "file descriptors"),
    (_frame(Request.SET_MEM_TABLE, VERSION, struct.pack("<II", 1, 0) + bytes(32)), 2,
     "file descriptors"),
    (_frame(Request.SET_MEM_TABLE, VERSION, struct.pack("<II", 0, 0)), 0, "regions"),
    (_frame(Request.SET_MEM_TABLE, VERSION, struct.pack("<II", 9, 0) + bytes(288)), 9,
     "regions"),
    (_frame(Request.SET_MEM_TABLE, VERSION, struct.pack("<II", 2, 0) + bytes(32)), 2,
     "expected 72"),
    (_frame(Request.GET_CONFIG, VERSION, struct.pack("<III", 0, 8, 0) + bytes(4)), 0,
     "expected 20"),
    (_frame(Request.GET_CONFIG, VERSION, struct.pack("<III", 0, 300, 0) + bytes(300)), 0,
     "exceeds"),
    (_frame(Request.GET_CONFIG, VERSION, bytes(4)), 0, "shorter"),
    (_frame(Request.GET_FEATURES, VERSION, b"", size=MAX_PAYLOAD + 1), 0, "size field"),
    (_frame(Request.GET_FEATURES, VERSION, b"", size=0xFFFFFFFF), 0, "size field"),
])
def test_malformed_messages_raise_peer_error(data: bytes, nfds: int, words: str) -> None:
    fds = [_fd() for _ in range(nfds)]
    dec = Decoder()
    with pytest.raises(PeerError, match=words):
        dec.feed(data, fds)
        list(dec.messages())
    assert not any(_is_open(fd) for fd in fds), "the decoder must close fds it rejects"
    with pytest.raises(PeerError):  # dead after an error
        dec.next_message()


def test_reply_decoder_rules() -> None:
    dec = Decoder(replies=True)
    with pytest.raises(PeerError, match="reply flag"):
        dec.feed(encode(request(Request.GET_FEATURES)))
        dec.next_message()
    dec = Decoder(replies=True)
    with pytest.raises(PeerError, match="need_reply"):
        dec.feed(_frame(Request.GET_FEATURES, VERSION | FLAG_REPLY | FLAG_NEED_REPLY,
                        bytes(8)))
        dec.next_message()
    dec = Decoder(replies=True)
    with pytest.raises(PeerError, match="expected 8"):
        dec.feed(_frame(Request.GET_VRING_BASE, VERSION | FLAG_REPLY, bytes(4)))
        dec.next_message()


def test_partial_message_waits_for_more() -> None:
    data = encode(request(Request.SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3)))
    dec = Decoder()
    dec.feed(data[:-1])
    assert dec.next_message() is None
    assert dec.pending == len(data) - 1
    dec.feed(data[-1:])
    msg = dec.next_message()
    assert msg is not None and msg.payload == VringAddr(0, 0, 1, 2, 3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=80), st.integers(0, 3)), max_size=8),
       st.booleans())
def test_garbage_streams_only_raise_peer_errors(chunks: list[tuple[bytes, int]],
                                               replies: bool) -> None:
    dec = Decoder(replies=replies)
    opened: list[int] = []
    handed: list[int] = []
    try:
        for data, nfds in chunks:
            fds = [_fd() for _ in range(nfds)]
            opened.extend(fds)
            dec.feed(data, fds)
            for msg in dec.messages():
                assert msg.request in Request
                handed.extend(msg.fds)
                msg.close_fds()
    except PeerError:
        pass
    dec.close()
    # Every fd was either handed out with a message (and closed by us) or closed by the decoder.
    assert not any(_is_open(fd) for fd in opened)
    assert set(handed) <= set(opened)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Request)), st.integers(0, 0xFFFFFFFF), st.binary(max_size=300))
def test_any_header_with_any_body_is_decoded_or_refused(code: Request, flags: int,
                                                         body: bytes) -> None:
    dec = Decoder()
    try:
        dec.feed(_frame(code, flags, body))
        msgs = list(dec.messages())
    except PeerError:
        return
    assert len(msgs) == 1 and msgs[0].request is code
    # What decodes encodes back to the same bytes (the codec is a bijection on valid input).
    again = encode(msgs[0])
    dec2 = Decoder()
    dec2.feed(again)
    assert list(dec2.messages()) == msgs


# ------------------------------------------------------- back-end channel
def test_qemu_7_2_names_are_aliases_of_the_current_ones() -> None:
    assert Request["SET_SLAVE_REQ_FD"] is Request.SET_BACKEND_REQ_FD
    assert Request(21) is Request.SET_BACKEND_REQ_FD
    assert ProtocolFeature["SLAVE_REQ"] is ProtocolFeature.BACKEND_REQ
    assert int(ProtocolFeature.BACKEND_REQ) == 5
    assert int(ProtocolFeature.SLAVE_SEND_FD) == 10
    assert int(BackendRequest.CONFIG_CHANGE_MSG) == 2


def test_set_backend_req_fd_carries_exactly_one_fd_and_no_payload() -> None:
    fd = _fd()
    dec = Decoder()
    dec.feed(encode(request(Request.SET_BACKEND_REQ_FD, fds=(fd,))), [fd])
    (msg,) = dec.messages()
    assert msg.payload is None and msg.fds == (fd,)
    msg.close_fds()
    for data, nfds in ((_frame(Request.SET_BACKEND_REQ_FD, VERSION, b""), 0),
                       (_frame(Request.SET_BACKEND_REQ_FD, VERSION, bytes(8)), 1)):
        fds = [_fd() for _ in range(nfds)]
        dec = Decoder()
        with pytest.raises(PeerError, match="SET_BACKEND_REQ_FD"):
            dec.feed(data, fds)
            list(dec.messages())
        assert not any(_is_open(f) for f in fds)


def _valid_backend(req: BackendRequest) -> tuple[Payload, int]:
    table: dict[BackendRequest, tuple[Payload, int]] = {
        BackendRequest.IOTLB_MSG: (RawPayload(bytes(32)), 0),
        BackendRequest.CONFIG_CHANGE_MSG: (None, 0),
        BackendRequest.VRING_HOST_NOTIFIER_MSG: (RawPayload(bytes(24)), 1),
        BackendRequest.VRING_CALL: (VringState(1, 0), 0),
        BackendRequest.VRING_ERR: (VringState(0, 0), 0),
    }
    return table[req]


@pytest.mark.parametrize("req", list(BackendRequest))
@pytest.mark.parametrize("need_reply", [False, True])
def test_every_backend_request_and_its_ack_round_trip(req: BackendRequest,
                                                      need_reply: bool) -> None:
    payload, nfds = _valid_backend(req)
    fds = tuple(_fd() for _ in range(nfds))
    msg = backend_request(req, payload, fds=fds, need_reply=need_reply)
    dec = BackendDecoder()
    dec.feed(encode(msg), fds)
    (got,) = dec.messages()
    assert got == msg and got.need_reply == need_reply and not got.is_reply
    got.close_fds()
    ack = BackendDecoder(replies=True)
    ack.feed(encode(backend_reply(req, 1)))
    (rep,) = ack.messages()
    assert rep == BackendMessage(req, 1, VERSION | FLAG_REPLY) and rep.is_reply


def test_config_change_msg_is_a_bare_header() -> None:
    # What QEMU 7.2's slave_read expects: a 12-byte header, size 0.
    data = encode(backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True))
    assert data == HEADER.pack(2, VERSION | FLAG_NEED_REPLY, 0)
    assert encode(backend_reply(BackendRequest.CONFIG_CHANGE_MSG, 0)) == (
        HEADER.pack(2, VERSION | FLAG_REPLY, 8) + bytes(8))


@pytest.mark.parametrize(("data", "nfds", "replies", "words"), [
    (_frame(99, VERSION, b""), 0, False, "unknown back-end request 99"),
    (_frame(0, VERSION, b""), 0, False, "unknown back-end request"),
    (_frame(2, VERSION, bytes(8)), 0, False, "expected 0"),
    (_frame(2, VERSION, b""), 1, False, "file descriptors"),
    (_frame(4, VERSION, bytes(4)), 0, False, "expected 8"),
    (_frame(2, VERSION | FLAG_REPLY, bytes(8)), 0, False, "reply flag"),
    (_frame(2, VERSION, bytes(8)), 0, True, "without the reply flag"),
    (_frame(2, VERSION | FLAG_REPLY, bytes(4)), 0, True, "expected 8"),
    (_frame(2, VERSION | FLAG_REPLY, bytes(8)), 1, True, "file descriptors"),
    (_frame(2, VERSION | FLAG_REPLY | FLAG_NEED_REPLY, bytes(8)), 0, True, "need_reply"),
    (_frame(2, 2, b""), 0, False, "version"),
    (_frame(2, VERSION, b"", size=MAX_PAYLOAD + 1), 0, False, "size field"),
])
def test_malformed_backend_channel_messages(data: bytes, nfds: int, replies: bool,
                                            words: str) -> None:
    fds = [_fd() for _ in range(nfds)]
    dec = BackendDecoder(replies=replies)
    with pytest.raises(PeerError, match=words):
        dec.feed(data, fds)
        list(dec.messages())
    assert not any(_is_open(fd) for fd in fds)
    with pytest.raises(PeerError):
        dec.next_message()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=60), st.integers(0, 2)), max_size=8),
       st.booleans())
def test_backend_channel_garbage_only_raises_peer_errors(chunks: list[tuple[bytes, int]],
                                                        replies: bool) -> None:
    dec = BackendDecoder(replies=replies)
    opened: list[int] = []
    try:
        for data, nfds in chunks:
            fds = [_fd() for _ in range(nfds)]
            opened.extend(fds)
            dec.feed(data, fds)
            for msg in dec.messages():
                assert msg.request in BackendRequest
                msg.close_fds()
    except PeerError:
        pass
    dec.close()
    assert not any(_is_open(fd) for fd in opened)


# ------------------------------------------------------------------ inflight
def test_inflight_description_is_the_24_byte_struct_qemu_sends() -> None:
    # u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size, 4 bytes of
    # padding (QEMU's VhostUserInflight is not packed; libvhost-user checks 24).
    data = encode(request(Request.GET_INFLIGHT_FD, InflightDesc(0x1100, 0x2000, 3, 256)))
    assert data[HEADER.size:] == struct.pack("<QQHH4x", 0x1100, 0x2000, 3, 256)
    for size in (20, 28):
        dec = Decoder()
        dec.feed(HEADER.pack(Request.GET_INFLIGHT_FD, VERSION, size) + bytes(size))
        with pytest.raises(PeerError, match="expected 24"):
            dec.next_message()


def test_set_inflight_fd_without_its_fd_is_refused() -> None:
    dec = Decoder()
    dec.feed(encode(request(Request.SET_INFLIGHT_FD, InflightDesc(4352, 0, 2, 128))))
    with pytest.raises(PeerError, match="0 file descriptors, expected 1"):
        dec.next_message()


def test_get_inflight_fd_reply_carries_the_buffer() -> None:
    fd = _fd()
    rep = reply(Request.GET_INFLIGHT_FD, InflightDesc(4352, 0, 2, 128), (fd,))
    dec = Decoder(replies=True)
    dec.feed(encode(rep), (fd,))
    got = dec.next_message()
    assert got == rep
    got.close_fds()
    # Any other reply with an fd is a peer error.
    fd2 = _fd()
    dec = Decoder(replies=True)
    dec.feed(encode(Message(Request.GET_FEATURES, 1, VERSION | FLAG_REPLY)), (fd2,))
    with pytest.raises(PeerError, match="reply with 1 file descriptors"):
        dec.next_message()
