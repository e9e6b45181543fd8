"""pyvirtio-net against a C front end we did not write: DPDK testpmd's ``virtio_user``.

VIRTIO 1.2 §5.1 over QEMU docs/interop/vhost-user.rst, with DPDK 22.11's
virtio PMD (``virtio_user`` vdev, a client of our socket) as the driver.
testpmd forwards in io mode and starts with ``--tx-first``: each forwarding
stream sends one burst of :data:`~dpdk_peers.BURST` 64-byte frames, after
which io forwarding only moves packets (every one received is transmitted
again), so exactly ``streams * BURST`` packets circulate for the whole run.

That makes the counts of both sides checkable, not just "close": along the
path testpmd TX → back end tx (taken from transmitq) → back end rx (written
into receiveq buffers) → testpmd RX, every counter is at least the next one,
and the gaps — packets in flight when testpmd stopped — add up to exactly
the packets in circulation.  A packet in flight at the stop is one of: still
in transmitq when the back end stopped the ring; in the back end's backlog
(a frame waiting for a receive buffer; the session's end discards it); used
in receiveq but not yet polled by testpmd; or (switch) dropped and counted
because it reached a port whose rings testpmd had already stopped.
testpmd's counters are its accumulated forward statistics; the back end's
are what it logs at exit, after testpmd disconnected, so they are final.

* ``--loopback``: one ``virtio_user`` port, frames come back on its receive
  queue; on split rings and, with ``packed_vq=1``, on packed ones (VIRTIO 1.2
  §2.8: the back end's log shows bit 34 negotiated);
* a 2-port ``--switch``: one testpmd with two ``virtio_user`` ports forwards
  between them (port 0's receive goes out on port 1 and back), through the
  switch; io forwarding keeps the source MAC, and the destination (testpmd's
  default peer address 02:00:00:00:00:0N) is never a learned source, so each
  frame floods — to the one other port.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpdk_peers import BURST, PortStats, Testpmd, parse_forward_stats
from net_backend import NetBackend, PortCounters
from pyvirtio.core.spec import F_RING_PACKED
from pyvirtio.devices.net.spec import F_MQ

pytestmark = pytest.mark.timeout(180)

FRAME = 64             # testpmd's txonly frame (the --tx-first burst), without FCS
#: Packets each testpmd port must receive: the first burst went round many times.
LOOPS = 40 * BURST


@pytest.fixture
def sockets(tmp_path: Path) -> list[Path]:
    return [tmp_path / "a.sock", tmp_path / "b.sock"]


@pytest.fixture
def backends() -> Iterator[list[NetBackend]]:
    started: list[NetBackend] = []
    yield started
    for be in started:
        be.kill()


def check_backend(port: PortCounters, may_drop: frozenset[str] = frozenset()) -> None:
    assert set(port.drops) <= may_drop, port
    assert port.tx_bytes == FRAME * port.tx_frames, port
    assert port.rx_bytes == FRAME * port.rx_frames, port


def in_flight(tp_tx: int, be_tx: int, be_rx: int, tp_rx: int) -> int:
    """Packets between testpmd's TX and its RX on one path; each stage has at most
    what the stage before it had."""
    assert tp_tx >= be_tx >= be_rx >= tp_rx, (tp_tx, be_tx, be_rx, tp_rx)
    return tp_tx - tp_rx


@pytest.mark.parametrize(("ring", "poll"), [("split", False), ("packed", False), ("split", True)])
def test_testpmd_io_through_loopback(sockets: list[Path], backends: list[NetBackend],
                                     tmp_path: Path, ring: str, poll: bool) -> None:
    sock = sockets[0]
    be = NetBackend([sock], ["--loopback", *(["--poll"] if poll else [])])
    backends.append(be)
    packed = ",packed_vq=1" if ring == "packed" else ""
    with Testpmd([f"virtio_user0,path={sock}{packed}"], tx_first=True,
                 log=tmp_path / "testpmd.log") as tp:
        tp.wait_rx(0, LOOPS)
        stats = tp.stop()
    ours = be.stop()[str(sock)]
    port = stats[0]
    assert port.rx_dropped == port.tx_dropped == 0, port
    # io forwarding: the first burst, then exactly what was received.
    assert port.tx_packets == BURST + port.rx_packets, port
    assert port.rx_packets >= LOOPS
    check_backend(ours)
    assert in_flight(port.tx_packets, ours.tx_frames, ours.rx_frames, port.rx_packets) == BURST
    assert be.count("front end connected") == be.count("front end disconnected") == 1
    features = re.findall(r"negotiated features (0x[0-9a-f]+)", be.log)
    assert features and all((int(f, 16) >> F_RING_PACKED & 1) == (ring == "packed")
                            for f in features), features


def test_testpmd_io_loop_with_a_ring_full_in_flight(sockets: list[Path],
                                                   backends: list[NetBackend],
                                                   tmp_path: Path) -> None:
    """Bursts of 256 on 256-entry rings: the back end takes them as batches (numpy),
    and the driver must see its transmit buffers back no later than the frames, or its
    io loop (which only sends what it receives) finds a full ring, drops, and stops."""
    sock = sockets[0]
    be = NetBackend([sock], ["--loopback"])
    backends.append(be)
    with Testpmd([f"virtio_user0,path={sock}"], tx_first=True, burst=256,
                 log=tmp_path / "testpmd.log") as tp:
        tp.wait_rx(0, 20 * 256)
        stats = tp.stop()
    ours = be.stop()[str(sock)]
    port = stats[0]
    assert port.rx_packets >= 20 * 256, port
    assert port.rx_dropped == 0, port
    check_backend(ours)


def test_testpmd_two_queue_pairs_through_loopback(sockets: list[Path],
                                                   backends: list[NetBackend],
                                                   tmp_path: Path) -> None:
    """VIRTIO_NET_F_MQ: testpmd runs one io stream per queue pair, each with its burst."""
    sock = sockets[0]
    be = NetBackend([sock], ["--loopback", "--num-queues", "2"])
    backends.append(be)
    with Testpmd([f"virtio_user0,path={sock},queues=2"], tx_first=True, queues=2,
                 log=tmp_path / "testpmd.log") as tp:
        tp.wait_rx(0, LOOPS)
        stats = tp.stop()
    ours = be.stop()[str(sock)]
    port = stats[0]
    assert port.rx_dropped == port.tx_dropped == 0, port
    assert port.tx_packets == 2 * BURST + port.rx_packets, port
    check_backend(ours)
    assert in_flight(port.tx_packets, ours.tx_frames, ours.rx_frames,
                     port.rx_packets) == 2 * BURST
    features = re.findall(r"negotiated features (0x[0-9a-f]+)", be.log)
    assert features and all(int(f, 16) >> F_MQ & 1 for f in features), features


def test_testpmd_two_ports_through_switch(sockets: list[Path], backends: list[NetBackend],
                                          tmp_path: Path) -> None:
    a, b = sockets
    be = NetBackend([a, b], ["--switch", "sw0"])
    backends.append(be)
    vdevs = [f"virtio_user0,path={a},mac=02:00:00:00:0a:00",
             f"virtio_user1,path={b},mac=02:00:00:00:0b:00"]
    with Testpmd(vdevs, tx_first=True, log=tmp_path / "testpmd.log") as tp:
        # Stream 0 forwards port 0's receive out of port 1, stream 1 the reverse.
        tp.wait_for(r"RX P=0/Q=0 .* -> TX P=1/Q=0", 60)
        tp.wait_rx(0, LOOPS)
        tp.wait_rx(1, LOOPS)
        stats = tp.stop()
    ours = be.stop()
    pa, pb = ours[str(a)], ours[str(b)]
    p0, p1 = stats[0], stats[1]
    for port in (p0, p1):
        assert port.rx_dropped == port.tx_dropped == 0, stats
    assert p1.tx_packets == BURST + p0.rx_packets, stats
    assert p0.tx_packets == BURST + p1.rx_packets, stats
    # testpmd stops port 0's rings before port 1's: a frame port 1 sent just before the
    # stop that the back end takes after that finds no front end on A (and the reverse
    # for a frame of port 0 taken after both stopped).  It is counted, and it is one of
    # the packets in flight below.
    check_backend(pa, frozenset({"rx_no_frontend"}))
    check_backend(pb, frozenset({"rx_no_frontend"}))
    # Both ways: testpmd port 0 -> switch port A -> switch port B -> testpmd port 1, and back.
    assert pa.tx_frames > 0 and pb.tx_frames > 0
    forward = in_flight(p0.tx_packets, pa.tx_frames, pb.rx_frames + sum(pb.drops.values()),
                        p1.rx_packets)
    backward = in_flight(p1.tx_packets, pb.tx_frames, pa.rx_frames + sum(pa.drops.values()),
                         p0.rx_packets)
    assert forward + backward == 2 * BURST, (stats, ours)
    assert be.count("front end connected") == be.count("front end disconnected") == 2


def test_forward_stats_parser() -> None:
    """The blocks testpmd prints at the end of a run (io mode, two ports, per-stream
    blocks first: their RX/TX lines are not the ports')."""
    text = """
  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 1/Queue= 0 -------
  RX-packets: 7              TX-packets: 7              TX-dropped: 0
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 100            RX-dropped: 0             RX-total: 100
  TX-packets: 132            TX-dropped: 1             TX-total: 133
  ----------------------------------------------------------------------------
  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 99             RX-dropped: 2             RX-total: 101
  TX-packets: 131            TX-dropped: 0             TX-total: 131
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 199            RX-dropped: 2             RX-total: 201
"""
    assert parse_forward_stats(text) == {0: PortStats(100, 0, 132, 1),
                                         1: PortStats(99, 2, 131, 0)}
