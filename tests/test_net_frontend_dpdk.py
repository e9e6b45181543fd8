"""pyvirtio's virtio-net front end against DPDK testpmd's ``net_vhost`` back end (DPDK 22.11).

A C back end we did not write (lib/vhost, drivers/net/vhost), in three
forwarding modes:

* ``io``: testpmd sends every frame it receives back out of the same port,
  so the frames we transmit come back on receiveq1, byte for byte and in
  order — including frames spread over several mergeable receive buffers
  (VIRTIO 1.2 §5.1.6.4) — on split rings and on packed ones (§2.8, a ring
  size that is not a power of two);
* ``rxonly``: testpmd counts and frees what we transmit; its accumulated
  statistics must count exactly our frames;
* ``txonly``: testpmd generates 64-byte UDP frames; we must receive exactly
  as many as it reports sent.

And ``pyvirtio bench net`` in each mode, its JSON checked against testpmd's
own counters.  testpmd's counters are its accumulated forward statistics,
printed when it stops (SIGINT; tests/dpdk_peers.py runs it as
scripts/peers/testpmd-vhost.sh does, without hugepages).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dpdk_peers import PortStats, Testpmd
from pyvirtio.core.spec import F_RING_PACKED
from pyvirtio.devices.net.driver import NetDriver
from pyvirtio.devices.net.spec import F_MRG_RXBUF
from pyvirtio.devices.net.workload import make_frames


@dataclass
class VhostPeer:
    """testpmd with one ``net_vhost`` port (the vhost-user server on ``sock``)."""

    testpmd: Testpmd
    sock: Path

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.testpmd.proc

    def stop(self) -> PortStats:
        """Stop testpmd; port 0's accumulated forward statistics."""
        return self.testpmd.stop()[0]


@pytest.fixture
def testpmd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VhostPeer]:
    sock = tmp_path / "vhost.sock"
    tp = Testpmd([f"net_vhost0,iface={sock},queues=1,client=0"], forward_mode=request.param,
                 log=tmp_path / "testpmd.log")
    with tp:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert tp.proc.poll() is None and time.monotonic() < deadline, \
                f"testpmd did not create {sock}:\n{tp.log}"
            time.sleep(0.05)
        yield VhostPeer(tp, sock)


def frames_of_sizes(src: bytes, sizes: list[int]) -> list[bytes]:
    """Frames of the given sizes, each with its number and a pattern that differs per frame."""
    out = []
    for i, size in enumerate(sizes):
        head = make_frames(src, 60, 1)[0][:14] + i.to_bytes(4, "big")
        body = bytes((i + k) & 0xFF for k in range(size - len(head)))
        out.append(head + body)
    return out


def loop_back(drv: NetDriver, frames: list[bytes], window: int) -> list[bytes]:
    """Send ``frames`` with at most ``window`` in flight; what came back, in order."""
    got: list[bytes] = []
    sent = 0
    while len(got) < len(frames):
        if sent < len(frames) and sent - len(got) < window:
            n = min(len(frames) - sent, window - (sent - len(got)), 32)
            drv.send_many(frames[sent:sent + n])
            sent += n
        can_send = sent < len(frames) and sent - len(got) < window
        more = drv.receive_many(64, timeout=0 if can_send else 10)
        if not more and not can_send:
            break  # nothing for 10 s: the assertions on the result say what is missing
        got += more
    return got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("testpmd", ["io"], indirect=True)
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_io_frames_come_back_intact_and_in_order(testpmd: VhostPeer, ring: str) -> None:
    sizes = [60 + (i * 37) % (1514 - 60 + 1) for i in range(3000)]
    packed = ring == "packed"
    with NetDriver.connect(str(testpmd.sock), timeout=10, packed=packed,
                           queue_size=200 if packed else 256) as drv:
        assert drv.features >> F_RING_PACKED & 1 == packed
        assert drv.features >> F_MRG_RXBUF & 1
        assert drv.hdr_len == 12
        assert len(drv.mac) == 6 and drv.link_up  # net_vhost has no config space
        frames = frames_of_sizes(drv.mac, sizes)
        got = loop_back(drv, frames, window=128)
        assert len(got) == len(frames)
        assert got == frames
        assert drv.drain_tx(10)
        stats = drv.stats()
    result = testpmd.stop()
    total = sum(sizes)
    assert stats["frames_sent"] == stats["frames_received"] == len(frames)
    assert stats["bytes_sent"] == stats["bytes_received"] == total
    assert stats["rx_dropped"] == 0 and stats["tx_reclaimed"] == len(frames)
    # The first receive waits for an interrupt: the driver never polls blindly.
    assert stats["interrupts_rx"] >= 1
    # A packed ring's device can switch kicks off outright (DISABLE), and DPDK's
    # vhost PMD does while it polls; the split driver with EVENT_IDX still kicks
    # when it crosses avail_event.
    assert stats["kicks_rx"] >= 1 or packed
    assert result.rx_packets == result.tx_packets == len(frames)
    assert result.tx_dropped == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("testpmd", ["io"], indirect=True)
def test_io_frames_spanning_mergeable_buffers(testpmd: VhostPeer) -> None:
    """256-byte receive buffers: net_vhost spreads each frame over up to 6 (num_buffers)."""
    sizes = [1514, 60, 1000, 244, 245, 700] * 200
    with NetDriver.connect(str(testpmd.sock), rx_buf_size=256, timeout=10) as drv:
        frames = frames_of_sizes(drv.mac, sizes)
        # A 1514-byte frame takes 6 buffers: keep the ring's 224 posted buffers enough.
        got = loop_back(drv, frames, window=32)
        assert got == frames
        # 12 + 244 bytes fill one buffer exactly, 12 + 245 spill into a second.
        assert drv.rx_buffers == sum(-(-(size + 12) // 256) for size in sizes) == 3400
        assert drv.rx_dropped == 0
    result = testpmd.stop()
    assert result.rx_packets == result.tx_packets == len(frames)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("testpmd", ["rxonly"], indirect=True)
def test_rxonly_testpmd_counts_what_we_send(testpmd: VhostPeer) -> None:
    count = 100_000
    with NetDriver.connect(str(testpmd.sock), timeout=10) as drv:
        frames = make_frames(drv.mac, 64, 64)
        sent = 0
        while sent < count:
            sent += drv.send_many(frames[:min(64, count - sent)])
        assert drv.drain_tx(10)  # testpmd has dequeued every frame
        assert (drv.frames_sent, drv.bytes_sent) == (count, 64 * count)
        assert drv.tx_reclaimed == count
        # Late reclaim: transmit interrupts only when the ring filled up.
        assert drv.interrupts[1] < count // 100
    result = testpmd.stop()
    assert result.rx_packets == count
    assert result.rx_dropped == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("testpmd", ["txonly"], indirect=True)
def test_txonly_we_count_what_testpmd_sends(testpmd: VhostPeer) -> None:
    with NetDriver.connect(str(testpmd.sock), timeout=10) as drv:
        received = 0
        sizes: set[int] = set()
        ethertypes: set[bytes] = set()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for frame in drv.receive_many(256, timeout=1):
                sizes.add(len(frame))
                ethertypes.add(frame[12:14])
                received += 1
        assert received > 0
        os.kill(testpmd.proc.pid, signal.SIGINT)
        # testpmd stops forwarding, then prints its counters: take everything it sent.
        while testpmd.proc.poll() is None:
            received += len(drv.receive_many(256, timeout=0.1))
        received += len(drv.receive_many(256, timeout=0))
        assert drv.frames_received == received
        assert drv.bytes_received == 64 * received
        assert drv.rx_dropped == 0
    result = testpmd.stop()
    assert sizes == {64}                     # testpmd txonly: 64-byte IPv4/UDP frames
    assert ethertypes == {b"\x08\x00"}
    assert result.tx_packets == received


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("testpmd", "mode", "ring"),
                         [("io", "io", "split"), ("rxonly", "txonly", "split"),
                          ("txonly", "rxonly", "split"), ("io", "io", "packed")],
                         indirect=["testpmd"])
def test_bench_net_cli(testpmd: VhostPeer, mode: str, ring: str) -> None:
    packed = ["--packed"] if ring == "packed" else []
    res = subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli.main", "bench", "net", "--socket-path",
         str(testpmd.sock), "--mode", mode, "--size", "128", "--seconds", "1", "--json",
         *packed], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # no progress line when stderr is not a terminal
    out = json.loads(res.stdout)
    result = testpmd.stop()
    assert out["mode"] == mode and out["size"] == 128
    assert out["pps"] > 0 and out["gbit_s"] > 0
    if mode == "io":
        assert out["frames_received"] == out["frames_sent"] > 0 and out["drops"] == 0
        assert out["bytes_received"] == out["bytes_sent"] == 128 * out["frames_sent"]
        assert result.rx_packets == result.tx_packets == out["frames_sent"]
    elif mode == "txonly":
        assert out["frames_received"] == 0 and out["bytes_sent"] == 128 * out["frames_sent"]
        assert result.rx_packets == out["frames_sent"] > 0
    else:
        # testpmd kept sending after we left: it sent at least what we counted.
        assert out["frames_sent"] == 0 and out["frames_received"] > 0
        assert out["bytes_received"] == 64 * out["frames_received"]
        assert result.tx_packets >= out["frames_received"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("testpmd", ["io"], indirect=True)
def test_readme_example_runs(testpmd: VhostPeer, capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Drive any vhost-user-net back end from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None and "/tmp/vhost-net.sock" in code.group(1)
    exec(compile(code.group(1).replace("/tmp/vhost-net.sock", str(testpmd.sock)), "README.md",
                 "exec"), {})
    assert "'frames_received': 1" in capsys.readouterr().out
    result = testpmd.stop()
    assert result.rx_packets == result.tx_packets == 1
