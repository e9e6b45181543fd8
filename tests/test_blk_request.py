"""virtio-blk request parsing and config layout (VIRTIO 1.2 §5.2.4, §5.2.6)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtio.core.errors import PeerError
from pyvirtio.core.split_device import Element
from pyvirtio.devices.blk.request import (
    BlkRequest,
    id_bytes,
    parse_request,
    parse_segments,
    rw_status,
)
from pyvirtio.devices.blk.spec import (
    CONFIG_SIZE,
    DWZ_SEGMENT,
    REQ_HEADER,
    BlkConfig,
    BlkFeature,
    ReqType,
    Status,
    feature_names,
)


def ro(data: bytes) -> memoryview:
    return memoryview(bytearray(data)).toreadonly()


def rw(n: int) -> memoryview:
    return memoryview(bytearray(n))


def test_config_offsets_match_the_spec() -> None:
    cfg = BlkConfig(capacity=0x1122334455667788, seg_max=126, blk_size=4096, num_queues=3,
                    max_discard_sectors=7, max_write_zeroes_seg=9, write_zeroes_may_unmap=1,
                    cylinders=0x0102, heads=5, sectors=6)
    raw = cfg.pack()
    assert len(raw) == CONFIG_SIZE == 96
    assert struct.unpack_from("<Q", raw, 0)[0] == 0x1122334455667788
    assert struct.unpack_from("<I", raw, 12)[0] == 126
    assert struct.unpack_from("<HBB", raw, 16) == (0x0102, 5, 6)
    assert struct.unpack_from("<I", raw, 20)[0] == 4096
    assert struct.unpack_from("<H", raw, 34)[0] == 3
    assert struct.unpack_from("<I", raw, 36)[0] == 7
    assert struct.unpack_from("<I", raw, 52)[0] == 9
    assert raw[56] == 1
    assert raw[33] == 0 and raw[57:60] == bytes(3)  # padding stays zero (§5.2.5.2)
    assert BlkConfig.unpack(raw) == cfg


def test_config_short_read_is_zero_extended() -> None:
    cfg = BlkConfig(capacity=2048, num_queues=2)
    short = BlkConfig.unpack(cfg.pack()[:60])
    assert short.capacity == 2048 and short.num_queues == 2 and short.zone_sectors == 0


def test_feature_names() -> None:
    bits = 1 << BlkFeature.FLUSH | 1 << BlkFeature.RO
    assert feature_names(bits) == ["VIRTIO_BLK_F_RO", "VIRTIO_BLK_F_FLUSH"]


def test_read_with_status_sharing_the_data_descriptor() -> None:
    hdr = REQ_HEADER.pack(ReqType.IN, 0, 42)
    data_and_status = rw(4097)
    req = parse_request(Element(3, [ro(hdr)], [data_and_status]))
    assert (req.head, req.type, req.sector, req.data_len) == (3, ReqType.IN, 42, 4096)
    req.status[0] = 7
    assert data_and_status[4096] == 7
    req.data[0][:] = b"x" * 4096
    assert bytes(data_and_status[:4096]) == b"x" * 4096


def test_write_with_header_and_data_in_one_descriptor() -> None:
    buf = REQ_HEADER.pack(ReqType.OUT, 0, 8) + b"d" * 1024
    req = parse_request(Element(0, [ro(buf)], [rw(1)]))
    assert req.type == ReqType.OUT and req.sector == 8 and req.data_len == 1024
    assert b"".join(bytes(v) for v in req.data) == b"d" * 1024


def test_header_split_over_tiny_buffers() -> None:
    hdr = REQ_HEADER.pack(ReqType.OUT, 0, 99) + b"abc"
    pieces = [ro(hdr[i:i + 3]) for i in range(0, len(hdr), 3)]
    req = parse_request(Element(1, pieces, [rw(1)]))
    assert req.sector == 99 and b"".join(bytes(v) for v in req.data) == b"abc"


def test_no_writable_byte_is_a_peer_error() -> None:
    with pytest.raises(PeerError, match="status"):
        parse_request(Element(0, [ro(REQ_HEADER.pack(0, 0, 0))], []))


def test_short_header_is_a_peer_error() -> None:
    with pytest.raises(PeerError, match="header"):
        parse_request(Element(0, [ro(b"123456789")], [rw(1)]))
    with pytest.raises(PeerError, match="header"):
        parse_request(Element(0, [], [rw(513)]))


def test_flush_has_no_data() -> None:
    req = parse_request(Element(0, [ro(REQ_HEADER.pack(ReqType.FLUSH, 0, 0))], [rw(1)]))
    assert req.type == ReqType.FLUSH and req.data == [] and req.data_len == 0


@given(st.binary(max_size=64), st.lists(st.integers(1, 40), max_size=4))
def test_garbage_elements_only_raise_peer_errors(readable: bytes, wlens: list[int]) -> None:
    cut = [ro(readable[i:i + 7]) for i in range(0, len(readable), 7)]
    try:
        req = parse_request(Element(0, cut, [rw(n) for n in wlens]))
    except PeerError:
        return
    assert len(req.status) == 1


def test_rw_status() -> None:
    assert rw_status(0, 512, 1) == Status.OK
    assert rw_status(1, 512, 1) == Status.IOERR          # past the end
    assert rw_status(0, 100, 8) == Status.IOERR          # not whole sectors
    assert rw_status(1 << 63, 512, 8) == Status.IOERR
    assert rw_status(8, 0, 8) == Status.OK               # empty at the very end


def _dwz(rtype: int, segs: list[tuple[int, int, int]]) -> BlkRequest:
    payload = b"".join(DWZ_SEGMENT.pack(*s) for s in segs)
    return BlkRequest(0, rtype, 0, [ro(payload)], rw(1), len(payload))


def test_parse_segments() -> None:
    assert parse_segments(_dwz(ReqType.DISCARD, [(0, 8, 0), (16, 8, 0)]), 4, 100, 64) == [
        (0, 8, 0), (16, 8, 0)]
    assert parse_segments(_dwz(ReqType.WRITE_ZEROES, [(0, 8, 1)]), 4, 100, 64) == [(0, 8, 1)]
    # unmap on a discard, unknown flags: UNSUPP (§5.2.6.2)
    assert parse_segments(_dwz(ReqType.DISCARD, [(0, 8, 1)]), 4, 100, 64) == Status.UNSUPP
    assert parse_segments(_dwz(ReqType.WRITE_ZEROES, [(0, 8, 2)]), 4, 100, 64) == Status.UNSUPP
    assert parse_segments(_dwz(ReqType.DISCARD, [(0, 1, 0)] * 5), 4, 100, 64) == Status.UNSUPP
    assert parse_segments(_dwz(ReqType.DISCARD, [(60, 8, 0)]), 4, 100, 64) == Status.IOERR
    assert parse_segments(_dwz(ReqType.DISCARD, [(0, 200, 0)]), 4, 100, 1000) == Status.IOERR
    bad = BlkRequest(0, ReqType.DISCARD, 0, [ro(b"x" * 17)], rw(1), 17)
    assert parse_segments(bad, 4, 100, 64) == Status.IOERR
    empty = BlkRequest(0, ReqType.DISCARD, 0, [], rw(1), 0)
    assert parse_segments(empty, 4, 100, 64) == Status.IOERR


def test_id_bytes() -> None:
    assert id_bytes("disk") == b"disk" + bytes(16)
    assert id_bytes("x" * 25) == b"x" * 20
