"""The stats socket, the Prometheus endpoint, ``pyvirtio top`` and ``pyvirtio trace``.

A pyvirtio-blk back end runs in process (one EventLoop thread: the vhost-user
server, the stats socket, the metrics endpoint's snapshots) and pyvirtio's
own front end (``BlkDriver``) drives it.  Checked: the counters equal what
the driver did (requests, bytes: the request layout is known exactly; kicks
and interrupts: both sides count eventfd values, so they are equal once the
driver drained its call eventfd); the socket is 0600 and the metrics endpoint
binds to localhost by default; readers that never read (of a small answer or
of a large one) and a scraper that never finishes its request never stall
the rings; the Prometheus exposition serves the same numbers as the socket.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import stat
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families  # type: ignore[import-not-found,unused-ignore]

from pyvirtio.cli.main import main
from pyvirtio.core.errors import CallerError
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.devices.blk.driver import BlkDriver
from pyvirtio.devices.blk.file_store import FileStore
from pyvirtio.io.loop import EventLoop
from pyvirtio.transports import stats_socket
from pyvirtio.transports.metrics import MetricsServer, parse_address
from pyvirtio.transports.stats_socket import MAX_CLIENTS, StatsSocket, request
from pyvirtio.transports.vhost_user.program import BackendProgram
from pyvirtio.transports.vhost_user.server import VhostUserServer


@dataclass
class Served:
    blk: str
    stats: str
    server: VhostUserServer
    socket: StatsSocket
    metrics: MetricsServer
    loop: EventLoop


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    store = FileStore(str(img))
    loop = EventLoop()
    server = VhostUserServer(BlkDevice(store), socket_path=str(tmp_path / "blk.sock"), loop=loop)
    sock = StatsSocket(str(tmp_path / "stats.sock"), [server.stats], loop)
    metrics = MetricsServer(":0", [server.stats], loop)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield Served(str(tmp_path / "blk.sock"), str(tmp_path / "stats.sock"), server, sock,
                     metrics, loop)
    finally:
        loop.stop()
        thread.join(10)
        metrics.close()
        sock.close()
        server.close()
        loop.close()
        store.close()


def traffic(drv: BlkDriver, writes: int, reads: int) -> None:
    for i in range(writes):
        drv.write(i * 4096, bytes([i & 0xFF]) * 4096)
    for i in range(reads):
        data = drv.read(i * 8192, 8192)
        if 2 * i < writes:
            assert data[:1] == bytes([(2 * i) & 0xFF])


def device0(doc: dict[str, Any]) -> dict[str, Any]:
    (dev,) = doc["devices"]
    return dict(dev)


def queue0(doc: dict[str, Any]) -> dict[str, Any]:
    q: dict[str, Any] = device0(doc)["queues"][0]
    return q


def test_counters_equal_what_the_front_end_did(served: Served) -> None:
    with BlkDriver.connect(served.blk) as drv:
        traffic(drv, writes=40, reads=20)
        drv.interrupts += drv.ports[0].call.wait(0)  # interrupts it had not waited for
        q = queue0(request(served.stats))
        total, conn = q["total"], q["connection"]
        assert total == conn  # the first connection
        n = 60
        assert total["buffers_popped"] == total["buffers_pushed"] == n
        # Requests: header (16 B) readable, +4096 data for writes; used: data + status byte.
        assert total["readable_bytes"] == 16 * n + 40 * 4096
        assert total["used_bytes"] == 20 * (8192 + 1) + 40 * 1
        assert total["kicks"] == drv.kicks
        assert total["interrupts"] == drv.interrupts
        assert total["interrupts"] + total["interrupts_suppressed"] == sum(total["batches"])
        assert total["errors"] == {"ring": 0, "device": 0, "dropped_completions": 0}
        state = q["state"]
        assert q["active"] and q["event_idx"] and q["size"] == 256
        assert state["avail_idx"] == state["last_avail_idx"] == state["used_idx"] == n
        assert state["in_flight"] == 0
        # blk's own: one latency sample per request.
        dev = device0(request(served.stats))
        assert dev["device_stats"]["requests"] == dev["device_stats"]["latency"]["count"] == n
    # After a reconnect the lifetime counters go on, the connection's start again.
    with BlkDriver.connect(served.blk) as drv:
        traffic(drv, writes=1, reads=0)
        doc = request(served.stats)
        q = queue0(doc)
        assert q["total"]["buffers_pushed"] == 61 and q["connection"]["buffers_pushed"] == 1
        devices: Any = doc["devices"]
        assert devices[0]["connections"] == 2


def test_socket_access_rules(served: Served, tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(served.stats).st_mode) == 0o600
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(CallerError, match="not a socket"):
        StatsSocket(str(plain), [], served.loop)
    with pytest.raises(CallerError, match="another process listens"):
        StatsSocket(served.stats, [], served.loop)
    # Requests: an unknown one and a bad trace get an error document, one line.
    with pytest.raises(CallerError, match="unknown request"):
        request(served.stats, {"request": "reboot"})
    with pytest.raises(CallerError, match="trace seconds"):
        request(served.stats, {"request": "trace", "seconds": 0})


def test_readers_that_never_read_do_not_stall_the_rings(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    # More idle readers than the server keeps: they neither send nor read.
    idle = []
    for _ in range(MAX_CLIENTS + 4):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(served.stats)
        idle.append(s)
    # A reader of a large answer (every device listed 3000 times: megabytes) that
    # asks and then never reads: the answer cannot go out at once.
    big = StatsSocket(served.stats + ".big", [served.server.stats] * 3000, served.loop)
    hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hostile.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hostile.connect(served.stats + ".big")
    hostile.shutdown(socket.SHUT_WR)
    # A scraper that sends half a request and waits forever.
    host, port = "127.0.0.1", served.metrics.port
    scraper = socket.create_connection((host, port))
    scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    try:
        with BlkDriver.connect(served.blk) as drv:
            traffic(drv, writes=100, reads=100)
            assert big.dropped == 0 and len(big._clients) == 1  # still held, not waited for
            traffic(drv, writes=50, reads=0)
            # The idle readers are answered (0.2 s without a request) and let go as their
            # answers fit their sockets; the loop also served the rings meanwhile, so on a
            # busy machine that may take a moment.  Then a reader that reads gets its answer
            # while the big one is still held, and the scrape works.
            deadline = time.monotonic() + 10
            while len(served.socket._clients) >= MAX_CLIENTS and time.monotonic() < deadline:
                time.sleep(0.05)
            assert queue0(request(served.stats))["total"]["buffers_pushed"] == 250
            text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read()
            assert b"pyvirtio_queue_buffers_pushed_total" in text
        deadline = time.monotonic() + stats_socket.SEND_TIMEOUT + 10
        while big.dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert big.dropped == 1 and not big._clients
    finally:
        for s in [*idle, hostile, scraper]:
            s.close()
        served.loop.call_soon_threadsafe(big.close)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_prometheus_serves_the_same_numbers(served: Served) -> None:
    assert served.metrics.host == "127.0.0.1"  # localhost unless told otherwise
    assert served.metrics._httpd is not None
    assert served.metrics._httpd.server_address[0] == "127.0.0.1"
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    with pytest.raises(CallerError):
        parse_address("example.com:9100")
    with BlkDriver.connect(served.blk) as drv:
        traffic(drv, writes=10, reads=10)
    q = queue0(request(served.stats))
    samples = _scrape(served.metrics.port)
    labels = (("device", served.blk), ("queue", "0"), ("type", "block"))
    for name in ("buffers_popped", "buffers_pushed", "readable_bytes", "used_bytes", "kicks",
                 "interrupts", "interrupts_suppressed", "notifications_enabled",
                 "notifications_disabled"):
        assert samples[(f"pyvirtio_queue_{name}_total", labels)] == q["total"][name], name
    assert samples[("pyvirtio_queue_batch_size_count", labels)] == sum(q["total"]["batches"])
    assert samples[("pyvirtio_queue_batch_size_sum", labels)] == q["total"]["batched_entries"]
    assert samples[("pyvirtio_device_connections_total", labels[:1] + labels[2:])] == 1
    # blk's latency histogram, in seconds.
    hist = device0(request(served.stats))["device_stats"]["latency"]
    dl = labels[:1] + labels[2:]
    assert samples[("pyvirtio_device_latency_seconds_count", dl)] == hist["count"] == 20
    assert samples[("pyvirtio_device_latency_seconds_sum", dl)] == pytest.approx(
        hist["sum_us"] / 1e6)
    assert samples[("pyvirtio_device_latency_seconds_bucket", (dl[0], ("le", "+Inf"), dl[1]))] == 20
    le_128us = (dl[0], ("le", repr(128 / 1e6)), dl[1])  # _scrape sorts the labels
    assert samples[("pyvirtio_device_latency_seconds_bucket", le_128us)] == sum(
        hist["counts"][:8])
    # The front end left: the ring is gone, its counters stay.
    assert ("pyvirtio_queue_used_idx", labels) not in samples


def test_top_once_json_and_trace(served: Served, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with BlkDriver.connect(served.blk) as drv:
        traffic(drv, writes=5, reads=5)
        assert main(["top", "--stats-socket", served.stats, "--once", "--json",
                     "--interval", "0.2"]) == 0
        view = json.loads(capsys.readouterr().out)
        (row,) = view["queues"]
        assert row["buffers"] == 10 and row["used_idx"] == 10 and row["in_flight"] == 0
        assert row["notifications_per_1k"] == pytest.approx(
            1000 * (row["kicks"] + row["interrupts"]) / 10)
        (lat,) = view["latency"]  # blk's request latency: the whole life while idle
        assert lat["histogram"] == "latency" and lat["requests"] == 10
        assert lat["p50_us"] <= lat["p99_us"]
        assert main(["top", "--stats-socket", served.stats, "--once",
                     "--interval", "0.1"]) == 0
        assert "latency: p50 < " in capsys.readouterr().out

        before = queue0(request(served.stats))["total"]
        out = tmp_path / "trace"
        result: list[int] = []
        tracer = threading.Thread(target=lambda: result.append(main(
            ["trace", "--stats-socket", served.stats, "--seconds", "1.5", "--out", str(out)])))
        tracer.start()
        deadline = time.monotonic() + 10
        while not served.server.stats.tracing and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.server.stats.tracing
        traffic(drv, writes=30, reads=30)
        tracer.join(30)
        after = queue0(request(served.stats))["total"]
    assert result == [0]
    with open(out / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    kinds = [r["kind"] for r in rows]
    # Every decision of the traced interval is in the trace, with its inputs.
    assert kinds.count("irq") == after["interrupts"] - before["interrupts"] > 0
    assert kinds.count("irq-suppressed") == (after["interrupts_suppressed"]
                                             - before["interrupts_suppressed"])
    assert 0 < kinds.count("kick") <= after["kicks"] - before["kicks"]
    for r in rows:
        if r["kind"] == "irq" and int(r["old"]) >= 0:
            old, new, event = int(r["old"]), int(r["new"]), int(r["event"])
            assert (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF  # vring_need_event
            assert 1 <= int(r["distance"]) <= (new - old) & 0xFFFF
    assert (out / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not served.server.stats.tracing
    assert all(q.live is None or q.live.ring.trace is None for q in served.server.stats.queues)


def test_program_options(capsys: pytest.CaptureFixture[str]) -> None:
    prog = BackendProgram("pyvirtio-test", "test", "block")
    args = prog.parser.parse_args(["--socket-path", "/tmp/x.sock", "--stats-socket", "/tmp/s",
                                   "--metrics-address", "9100"])
    assert (args.stats_socket, args.metrics_address) == ("/tmp/s", "9100")
    args = prog.parser.parse_args(["--socket-path", "/tmp/x.sock", "--metrics-address", "a:b"])
    with pytest.raises(SystemExit) as exc:
        prog.check_args(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--metrics-address" in err


def test_prometheus_shows_a_devices_own_counters() -> None:
    from pyvirtio.devices.net.device import NetDevice
    from pyvirtio.transports.stats import DeviceStats

    net = NetDevice(pairs=1)
    net.stats.tx_frames = 7
    net.stats.drops["backlog-full"] = 4
    loop = EventLoop()
    metrics = MetricsServer("127.0.0.1:0", [DeviceStats("/tmp/n.sock", net)], loop)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        samples = _scrape(metrics.port)
    finally:
        loop.stop()
        thread.join(10)
        metrics.close()
        loop.close()
    dev = (("device", "/tmp/n.sock"), ("type", "net"))
    assert samples[("pyvirtio_device_tx_frames_total", dev)] == 7
    assert samples[("pyvirtio_device_drops_total", (*dev[:1], ("reason", "backlog-full"),
                                                    *dev[1:]))] == 4
