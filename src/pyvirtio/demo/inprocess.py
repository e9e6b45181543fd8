"""The demo on the in-process transport: what ``pyvirtio demo --ring packed`` runs.

Legacy virtio-pci (VIRTIO 1.2 §4.1.4.8), the transport of the two-process
demo, has no packed ring: its QUEUE_PFN register places one contiguous split
ring and nothing else (§4.1.5.1.3.1).  So the packed demo runs the same
driver and the same device — pyvirtio's Linux-shaped virtio-net driver and
pyvirtio-net's device model with its loopback port, on the device kit — in
one process, over :class:`~pyvirtio.transports.inprocess.InProcessTransport`
with ``VIRTIO_F_RING_PACKED`` (§2.8): the rings are real packed rings in one
memfd, a kick is a call of the device's kick handler and an interrupt a call
of the driver's interrupt handler, each after its side's suppression decision
(``kick_prepare`` / ``should_notify`` on the event suppression structures,
§2.8.10).  Notifications are queued and delivered in order, as eventfds
would deliver them, so neither side runs inside the other's call.

The driver streams numbered frames for ``seconds`` and checks that each one
comes back intact and in order; the counts go into the same
:class:`~pyvirtio.demo.host.DemoResult` the two-process demo reports (no VM
exits: there are no registers).
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable

from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import F_RING_PACKED, bit
from pyvirtio.demo.frames import make_frame
from pyvirtio.demo.guest import NAPI_BUDGET, TX_BURST, FrameChecker
from pyvirtio.demo.host import DEMO_MAC, DemoConfig, DemoResult, Snapshot
from pyvirtio.devices.net.device import NetDevice
from pyvirtio.devices.net.driver import NetDriver
from pyvirtio.devices.net.spec import RX_QUEUE, TX_QUEUE
from pyvirtio.transports.device import VirtQueue
from pyvirtio.transports.inprocess import InProcessTransport

#: Ring of the demo's memory the allocator never hands out (address 0 stays unused).
MEMORY_START = 0x10000


def run_inprocess_demo(config: DemoConfig,
                       on_tick: Callable[[Snapshot], None] | None = None,
                       tick: float = 0.25) -> DemoResult:
    """Run driver and device over packed rings for ``config.seconds``."""
    features = config.host_features() | bit(F_RING_PACKED)
    memory = GuestMemory.anonymous(config.memory_size(), name="pyvirtio-demo-inprocess")
    try:
        return _run(memory, config, features, on_tick, tick)
    finally:
        memory.close()


def _run(memory: GuestMemory, config: DemoConfig, features: int,
         on_tick: Callable[[Snapshot], None] | None, tick: float) -> DemoResult:
    alloc = BumpAllocator(MEMORY_START, memory.regions[0].end)
    events: deque[tuple[bool, int]] = deque()  # (is a kick, queue)
    t = InProcessTransport(memory, alloc, [config.queue_size, config.queue_size], features,
                           on_kick=lambda q: events.append((True, q)),
                           on_interrupt=lambda q: events.append((False, q)))
    net = NetDevice(DEMO_MAC, queue_size=config.queue_size, tx_burst=config.queue_size,
                    name="demo")
    net.suppress = config.suppression != "none"
    net.uplink = net.loopback
    net.set_features(features)
    soon: list[Callable[[], None]] = []
    errors: list[str] = []
    vqs = [VirtQueue(q, t.device(q), net, functools.partial(t.notify_driver, q),
                     on_broken=lambda vq, why: errors.append(f"queue {vq.index}: {why}"),
                     schedule=soon.append) for q in (RX_QUEUE, TX_QUEUE)]
    for vq in vqs:
        net.queue_ready(vq)
    checker = FrameChecker(DEMO_MAC)
    drv = NetDriver(t.driver(RX_QUEUE), t.driver(TX_QUEUE), memory, alloc, features,
                    kick=t.notify_device, on_frame=checker,
                    suppress=config.suppression != "none")
    received_irqs = [0, 0]

    def deliver() -> None:
        while events:
            kick, q = events.popleft()
            if kick:
                vqs[q].kicked()
                vqs[q].run()
                while soon:
                    soon.pop(0)()
            elif q == RX_QUEUE:
                received_irqs[RX_QUEUE] += 1
                drv.rx_interrupt()
            else:
                received_irqs[TX_QUEUE] += 1
                drv.tx_interrupt()

    def snapshot(elapsed: float) -> Snapshot:
        return Snapshot(elapsed, config.seconds, [net.stats.rx_buffers, net.stats.tx_buffers],
                        [q.kicks for q in t.queues], [q.interrupts for q in t.queues])

    drv.try_fill_recv()
    deliver()
    start = time.monotonic()
    deadline = start + config.seconds
    next_tick = start
    seq = 0
    while (now := time.monotonic()) < deadline and not errors:
        if not drv.tx_stopped:
            for _ in range(TX_BURST):
                if not drv.xmit(make_frame(seq, DEMO_MAC)):
                    break
                seq += 1
        deliver()
        while drv.napi_scheduled:
            drv.napi_poll(NAPI_BUDGET)
            deliver()
        if on_tick is not None and now >= next_tick:
            next_tick = now + tick
            on_tick(snapshot(now - start))
    send_seconds = time.monotonic() - start
    # Drain: everything sent comes back (a loopback loses nothing); bounded by the rings.
    for _ in range(4 * config.queue_size):
        drv.free_old_xmit()
        if (drv.frames_received >= seq and drv.tx_reclaimed >= seq) or errors:
            break
        drv.kick_tx()
        deliver()
        drv.napi_poll(NAPI_BUDGET)
        deliver()
    elapsed = time.monotonic() - start
    lost = seq - drv.frames_received
    guest = {
        "features": features, "frames_sent": seq, "frames_received": drv.frames_received,
        "frames_verified": checker.verified, "errors": checker.errors + lost,
        "error_samples": checker.samples + ([f"{lost} frames did not come back"]
                                            if lost else []),
        "kicks": drv.kicks, "interrupts": received_irqs, "rx_buffers": drv.rx_buffers,
        "tx_buffers": drv.tx_reclaimed, "vm_exits": 0, "send_seconds": send_seconds,
    }
    snap = snapshot(elapsed)
    return DemoResult(config, snap.buffers, snap.kicks, snap.interrupts, elapsed, guest,
                      errors, 0)
