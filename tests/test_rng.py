"""pyvirtio-rng (VIRTIO 1.2 §5.4) through the device kit, without QEMU.

* over a real vhost-user socket with pyvirtio's own front end: the buffers
  come back holding the source file's bytes in order, with and without the
  rate limit, and a device-readable buffer breaks the queue;
* on an in-process ring with a fake loop and a fake clock (the rate limit is
  about time, so the test owns the clock): a request gets what is left of the
  period's budget, the rest wait (deferred) for the timer that starts the next
  period and are then completed in arrival order;
* the command line: ``--print-capabilities`` says ``rng``, bad values are
  usage errors (2), an unreadable source a start-up failure (1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import RingPair
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_VERSION_1, DeviceId, Status
from pyvirtio.devices import rng
from pyvirtio.devices.rng import RngDevice
from pyvirtio.transports.device import VirtQueue
from pyvirtio.transports.vhost_user.frontend import FrontendQueue, VhostUserFrontend
from pyvirtio.transports.vhost_user.server import VhostUserServer

pytestmark = pytest.mark.timeout(60)

FEATURES = 1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "entropy.bin"
    path.write_bytes(os.urandom(1 << 16))
    return path


class Served:
    def __init__(self, device: RngDevice, path: str) -> None:
        self.server = VhostUserServer(device, socket_path=path)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[RngDevice], str]]:
    running: list[Served] = []

    def start(device: RngDevice) -> str:
        path = str(tmp_path / f"rng{len(running)}.sock")
        running.append(Served(device, path))
        return path

    yield start
    for s in running:
        s.stop()


def request_entropy(fe: VhostUserFrontend, q: FrontendQueue, sizes: list[int]) -> list[bytes]:
    """Post one device-writable buffer per size at once; the bytes written, in token order."""
    bufs = [fe.alloc(size) for size in sizes]
    for i, (gpa, size) in enumerate(zip(bufs, sizes, strict=True)):
        q.queue.add([], [(gpa, size)], token=i)
    q.notify()
    got: dict[int, bytes] = {}
    while len(got) < len(sizes):
        used = q.queue.get_buf()
        if used is None:
            assert q.wait(10) or q.queue.more_used(), "no interrupt from the rng back end"
            continue
        token, length = used
        assert isinstance(token, int) and length <= sizes[token]
        got[token] = fe.memory.read(bufs[token], length)
    return [got[i] for i in range(len(sizes))]


def connect(path: str) -> tuple[VhostUserFrontend, FrontendQueue]:
    fe = VhostUserFrontend.connect(path, memory_size=4 << 20)
    assert fe.get_queue_num() == 1
    fe.negotiate(fe.get_features() & FEATURES)
    return fe, fe.setup_queue(0, 64)


def test_buffers_hold_the_source_bytes_in_order(serve: Callable[[RngDevice], str],
                                                source: Path) -> None:
    device = RngDevice(str(source))
    assert device.device_id == DeviceId.ENTROPY and int(DeviceId.ENTROPY) == 4
    assert device.num_queues == 1
    fe, q = connect(serve(device))
    with fe:
        sizes = [64, 1, 4096, 17, 64, 333] * 3
        first = b"".join(request_entropy(fe, q, sizes))
        second = b"".join(request_entropy(fe, q, [512] * 8))
    data = source.read_bytes()
    assert first == data[:sum(sizes)]
    assert second == data[sum(sizes):sum(sizes) + 4096]


def test_rate_limited_bytes_stay_in_order(serve: Callable[[RngDevice], str],
                                          source: Path) -> None:
    # 1000 bytes per 20 ms: 64 requests of 64 bytes need at least 5 periods, so
    # requests are deferred; each is answered whole.
    fe, q = connect(serve(RngDevice(str(source), max_bytes=1000, period_ms=20)))
    with fe:
        answers = request_entropy(fe, q, [64] * 64)
    assert [len(a) for a in answers] == [64] * 64
    assert b"".join(answers) == source.read_bytes()[:4096]


def test_device_readable_buffer_breaks_the_queue(serve: Callable[[RngDevice], str],
                                                 source: Path) -> None:
    fe, q = connect(serve(RngDevice(str(source))))
    with fe:
        out, into = fe.alloc(16), fe.alloc(16)
        q.queue.add([(out, 16)], [(into, 16)], token="bad")
        q.notify()
        fe.poll_backend_channel(10)  # CONFIG_CHANGE_MSG: the ring broke
        assert fe.get_status() & Status.NEEDS_RESET


# ------------------------------------------------------------ fake time
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class FakeLoop:
    """Records timers instead of running them; the test fires them."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeLoop:
        self.timers.append((delay, callback))
        return self

    def cancel(self) -> None:
        raise AssertionError("the rng device never cancels its timer")

    def fire(self) -> None:
        _delay, callback = self.timers.pop(0)
        callback()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(rng, "time", fake)
    return fake


def in_process(pair: RingPair, device: RngDevice) -> tuple[VirtQueue, FakeLoop]:
    loop = FakeLoop()
    device.attach(loop)  # type: ignore[arg-type]
    return VirtQueue(0, pair.device, device, signal=lambda: None), loop


def post(pair: RingPair, sizes: list[int], first_token: int = 0) -> list[int]:
    gpas = [pair.buf(size) for size in sizes]
    for i, (gpa, size) in enumerate(zip(gpas, sizes, strict=True)):
        pair.driver.add([], [(gpa, size)], token=first_token + i)
    return gpas


def used(pair: RingPair) -> list[tuple[object, int]]:
    return pair.driver.get_bufs()


def test_budget_per_period_and_deferred_requests(ring_pair: Callable[..., RingPair],
                                                 clock: FakeClock, source: Path) -> None:
    pair = ring_pair(num=8)
    device = RngDevice(str(source), max_bytes=100, period_ms=500)
    vq, loop = in_process(pair, device)
    sizes = [64, 16, 64, 200, 8]
    gpas = post(pair, sizes)
    vq.run()
    # First period: 64 + 16 of 100; the next 64 do not fit what is left, so it and
    # everything behind it wait for the timer that starts the next period.
    assert used(pair) == [(0, 64), (1, 16)]
    assert len(device.waiting) == 3 and [d for d, _cb in loop.timers] == [0.5]
    clock.now += 0.2
    vq.run()  # a kick within the period changes nothing
    assert used(pair) == [] and len(loop.timers) == 1
    clock.now += 0.3
    loop.fire()
    vq.publish()
    # Second period: 64; the 200-byte request can never fit, it gets a whole period's budget.
    assert used(pair) == [(2, 64)]
    assert [d for d, _cb in loop.timers] == [pytest.approx(0.5)]
    clock.now += 0.5
    loop.fire()
    vq.publish()
    assert used(pair) == [(3, 100)] and len(loop.timers) == 1
    clock.now += 0.5
    loop.fire()
    vq.publish()
    assert used(pair) == [(4, 8)] and loop.timers == [] and not device.waiting
    lengths = [64, 16, 64, 100, 8]
    got = b"".join(pair.mem.read(g, n) for g, n in zip(gpas, lengths, strict=True))
    assert got == source.read_bytes()[:sum(lengths)]


def test_new_requests_wait_behind_deferred_ones(ring_pair: Callable[..., RingPair],
                                                clock: FakeClock, source: Path) -> None:
    pair = ring_pair(num=8)
    device = RngDevice(str(source), max_bytes=64, period_ms=100)
    vq, loop = in_process(pair, device)
    gpas = post(pair, [64, 8])
    vq.run()
    assert used(pair) == [(0, 64)]
    clock.now += 0.1  # the next period has begun, its timer has not run yet
    gpas += post(pair, [8], first_token=2)
    vq.run()
    assert used(pair) == [(1, 8), (2, 8)]  # the deferred request first
    loop.fire()  # the timer finds nothing left to do
    vq.publish()
    assert used(pair) == []
    data = source.read_bytes()
    assert [pair.mem.read(g, n) for g, n in zip(gpas, [64, 8, 8], strict=True)] == [
        data[:64], data[64:72], data[72:80]]


def test_stopped_queue_voids_deferred_requests(ring_pair: Callable[..., RingPair],
                                               clock: FakeClock, source: Path) -> None:
    pair = ring_pair(num=8)
    device = RngDevice(str(source), max_bytes=10, period_ms=100)
    vq, loop = in_process(pair, device)
    post(pair, [16, 16])
    vq.run()
    assert used(pair) == [(0, 10)] and len(device.waiting) == 1
    vq.close()
    device.queue_stopped(vq)
    assert not device.waiting
    clock.now += 0.1
    loop.fire()
    assert used(pair) == []


# ---------------------------------------------------------- command line
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirtio.devices.rng", *args],
                          capture_output=True, text=True, timeout=30)


def test_print_capabilities_says_rng() -> None:
    res = run_cli("--print-capabilities")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"type": "rng", "features": []}


@pytest.mark.parametrize("args", [("--period-ms", "0"), ("--period-ms", "65537"),
                                  ("--max-bytes", "0"), ()],
                         ids=["period-0", "period-too-long", "no-bytes", "no-socket"])
def test_usage_errors_exit_2(args: tuple[str, ...], tmp_path: Path) -> None:
    sock = () if args == () else ("--socket-path", str(tmp_path / "s.sock"))
    res = run_cli(*sock, *args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("pyvirtio-rng: ") and len(res.stderr.splitlines()) == 1


def test_unreadable_source_fails_with_1(tmp_path: Path) -> None:
    res = run_cli("--socket-path", str(tmp_path / "s.sock"), "--source", str(tmp_path / "nope"))
    assert res.returncode == 1
    assert "cannot read --source" in res.stderr and "nope" in res.stderr
