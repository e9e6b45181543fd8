"""pyvirtio's virtio-blk front end against pyvirtio-blk running as a separate process.

VIRTIO 1.2 §5.2 over QEMU docs/interop/vhost-user.rst: every request type,
two queues, many requests in flight, read-only mode, reconnection, probe and
bench on the command line — on split rings and on packed ones (§2.8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blk_peers import start_pyvirtio_blk, stop
from pyvirtio.core.spec import F_RING_PACKED
from pyvirtio.devices.blk.driver import BlkDriver, BlkIOError
from pyvirtio.devices.blk.spec import BlkFeature, ReqType, Status

SIZE = 8 << 20


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


@pytest.fixture
def server(tmp_path: Path, img: Path) -> Iterator[Path]:
    sock = tmp_path / "blk.sock"
    proc = start_pyvirtio_blk(img, sock, "--num-queues", "2", "--serial", "loop-serial")
    try:
        yield sock
    finally:
        assert stop(proc) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_write_read_verify_flush(server: Path, img: Path, packed: bool) -> None:
    original = img.read_bytes()
    with BlkDriver.connect(str(server), num_queues=2, timeout=10, packed=packed) as drv:
        assert drv.features >> F_RING_PACKED & 1 == packed
        assert drv.capacity == SIZE // 512 and drv.num_queues == 2
        assert drv.features >> BlkFeature.MQ & 1
        assert drv.read(0, 8192) == original[:8192]
        data = os.urandom(300 * 1024)  # more than max_io: split into several requests
        drv.write(1000 * 512, data)
        drv.flush()
        assert drv.read(1000 * 512, len(data)) == data
        assert drv.get_id() == "loop-serial"
        drv.write_zeroes(4000 * 512, 16 * 512)
        drv.discard(6000 * 512, 8 * 512)
        assert drv.read(4000 * 512, 16 * 512) == bytes(16 * 512)
        with pytest.raises(BlkIOError) as e:
            drv.read(SIZE, 512)
        assert e.value.status == Status.IOERR
    after = img.read_bytes()
    assert after[1000 * 512:1000 * 512 + len(data)] == data
    assert after[4000 * 512:4016 * 512] == bytes(8192)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_many_in_flight_on_both_queues(server: Path, img: Path, packed: bool) -> None:
    original = img.read_bytes()
    with BlkDriver.connect(str(server), num_queues=2, queue_size=128, timeout=10,
                           packed=packed) as drv:
        for q in range(2):
            slots = [drv.submit(ReqType.IN, 64 * i + q, 4096, queue=q, kick=False)
                     for i in range(drv.depth(q))]
            drv.kick(q)
            while any(not s.done for s in slots):
                drv.reap(q)
            for s in slots:
                assert s.status == Status.OK and s.used_len == 4097
                assert bytes(s.payload()) == original[s.sector * 512:s.sector * 512 + 4096]
                drv.release(s)


@pytest.mark.timeout(60)
def test_reconnect_sees_earlier_writes(server: Path) -> None:
    with BlkDriver.connect(str(server), timeout=10) as drv:
        drv.write(77 * 512, b"first connection" + bytes(496))
    with BlkDriver.connect(str(server), timeout=10) as drv:
        assert drv.read(77 * 512, 512).startswith(b"first connection")


@pytest.mark.timeout(60)
def test_read_only_back_end(tmp_path: Path, img: Path) -> None:
    before = img.read_bytes()
    sock = tmp_path / "ro.sock"
    proc = start_pyvirtio_blk(img, sock, "--read-only")
    try:
        with BlkDriver.connect(str(sock), timeout=10) as drv:
            assert drv.read_only
            with pytest.raises(BlkIOError) as e:
                drv.write(0, b"x" * 4096)
            assert e.value.status == Status.IOERR
            assert drv.read(0, 4096) == before[:4096]
    finally:
        assert stop(proc) == 0
    assert img.read_bytes() == before


@pytest.mark.timeout(90)
def test_probe_and_bench_commands(server: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pyvirtio.cli.main", "probe", "--socket-path",
                          str(server), "--json"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["config"]["capacity"] == SIZE // 512
    assert info["queue_count"] == 2
    assert "VIRTIO_BLK_F_MQ" in info["feature_names"]
    assert "VHOST_USER_PROTOCOL_F_CONFIG" in info["protocol_feature_names"]
    bench = [sys.executable, "-m", "pyvirtio.cli.main", "bench", "blk", "--socket-path",
             str(server), "--rw", "randwrite", "--iodepth", "4", "--seconds", "0.5", "--json"]
    refused = subprocess.run(bench, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--allow-writes" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and not refused.stdout
    res = subprocess.run([*bench, "--allow-writes"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["requests"] > 0 and out["errors"] == 0
    assert set(out["percentiles_us"]) >= {"50.00", "99.00"}
    res = subprocess.run([*bench, "--allow-writes", "--packed"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["requests"] > 0 and out["errors"] == 0
