"""pyvirtio's virtio-blk front end against a real qemu-storage-daemon (QEMU 7.2).

A peer we did not write: write, read back, verify, flush, get_id, probe,
and the bench command (VIRTIO 1.2 §5.2, QEMU docs/interop/vhost-user.rst).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blk_peers import start_qsd, stop
from pyvirtio.devices.blk.driver import BlkDriver
from pyvirtio.devices.blk.spec import ReqType, Status

SIZE = 16 << 20


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    img = tmp_path / "qsd.img"
    img.write_bytes(os.urandom(SIZE))
    sock = tmp_path / "qsd.sock"
    proc = start_qsd(img, sock, queues=2)
    try:
        yield img, sock
    finally:
        stop(proc)


@pytest.mark.timeout(90)
def test_write_read_verify_flush(qsd: tuple[Path, Path]) -> None:
    img, sock = qsd
    original = img.read_bytes()
    with BlkDriver.connect(str(sock), timeout=10) as drv:
        assert drv.capacity == SIZE // 512
        assert drv.read(0, 4096) == original[:4096]
        data = os.urandom(256 * 1024 + 512)
        drv.write(2048 * 512, data)
        drv.flush()
        assert drv.read(2048 * 512, len(data)) == data
        drv.write_zeroes(100 * 512, 8 * 512)
        assert drv.read(100 * 512, 4096) == bytes(4096)
        assert isinstance(drv.get_id(), str)
        # many requests in flight
        slots = [drv.submit(ReqType.IN, 8 * i, 4096, kick=False) for i in range(drv.depth())]
        drv.kick()
        while any(not s.done for s in slots):
            drv.reap()
        expect = img.read_bytes()
        for s in slots:
            assert s.status == Status.OK
            assert bytes(s.payload()) == expect[s.sector * 512:s.sector * 512 + 4096]
            drv.release(s)
    assert img.read_bytes()[2048 * 512:2048 * 512 + len(data)] == data


@pytest.mark.timeout(90)
def test_two_queues(qsd: tuple[Path, Path]) -> None:
    _img, sock = qsd
    with BlkDriver.connect(str(sock), num_queues=2, timeout=10) as drv:
        assert drv.num_queues == 2
        drv.write(0, b"A" * 4096)   # queue 0
        drv.write(8 * 512, b"B" * 4096)   # queue 1 (round robin)
        drv.flush()
        assert drv.read(0, 4096) == b"A" * 4096
        assert drv.read(8 * 512, 4096) == b"B" * 4096


@pytest.mark.timeout(90)
def test_probe_qsd(qsd: tuple[Path, Path]) -> None:
    _img, sock = qsd
    res = subprocess.run([sys.executable, "-m", "pyvirtio.cli.main", "probe", "--socket-path",
                          str(sock), "--json"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["config"]["capacity"] == SIZE // 512
    assert info["config"]["num_queues"] == 2
    assert "VIRTIO_F_VERSION_1" in info["feature_names"]
    assert "VIRTIO_BLK_F_FLUSH" in info["feature_names"]
    text = subprocess.run([sys.executable, "-m", "pyvirtio.cli.main", "probe",
                           "--socket-path", str(sock)], capture_output=True, text=True,
                          timeout=30).stdout
    assert "capacity" in text and "VHOST_USER_PROTOCOL_F_CONFIG" in text
