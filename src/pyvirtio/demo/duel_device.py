"""The device process of the speed duel (VIRTIO 1.2 §2.7.7, §2.7.10).

Run by :mod:`pyvirtio.demo.duel` as ``python -m pyvirtio.demo.duel_device``
with the guest memory memfd, the kick eventfd and the interrupt eventfd
inherited.  It serves one ring — split (legacy layout, §2.7.2) or packed
(§2.8, descriptor ring then the two event suppression areas): pop a buffer,
spend ``--work-us`` microseconds on it, push it, and interrupt when
``should_notify`` says so — QEMU's order of things.  With suppression on it
disables kicks while it works and re-enables them (with the re-check) before
it sleeps.  It prints ``ready`` once set up, and its counters as one JSON line
when the driver sets the stop word and kicks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pyvirtio.core.layout import RingViews, SplitLayout
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.packed_device import PackedDeviceQueue
from pyvirtio.core.packed_layout import PackedLayout, PackedRingViews
from pyvirtio.core.queue import DeviceQueue
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.io.eventfd import EventFd


def busy_wait_us(us: float) -> None:
    """Spin for ``us`` microseconds: per-buffer work that holds the CPU like real work."""
    if us <= 0:
        return
    end = time.perf_counter_ns() + int(us * 1000)
    clock = time.perf_counter_ns
    while clock() < end:
        pass


def serve(memory: GuestMemory, base: int, num: int, features: int, stop_addr: int,
          kick: EventFd, irq: EventFd, work_us: float, suppress: bool,
          ring: str = "split") -> dict[str, int]:
    q: DeviceQueue
    if ring == "packed":
        q = PackedDeviceQueue(PackedRingViews.map(memory, PackedLayout.contiguous(base, num)),
                              memory, features)
    else:
        q = SplitDeviceQueue(RingViews.map(memory, SplitLayout.legacy(base, num)), memory,
                             features)
    stop = memory.translate(stop_addr, 4).cast("I")
    pushed = interrupts = kicks = sleeps = 0
    print("ready", flush=True)
    while True:
        if suppress:
            q.disable_notification()
        while (elem := q.pop()) is not None:
            busy_wait_us(work_us)
            q.push(elem.head, 0)
            pushed += 1
            if q.should_notify():
                irq.signal()
                interrupts += 1
        if stop[0]:
            break
        if suppress and q.enable_notification():
            continue
        sleeps += 1
        kicks += kick.wait(timeout=1.0)
    # The driver's last kick is the stop request, not a notification of work.
    return {"buffers": pushed, "interrupts": interrupts, "kicks_received": max(kicks - 1, 0),
            "sleeps": sleeps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyvirtio.demo.duel_device")
    for name in ("--mem-fd", "--mem-size", "--base", "--num", "--features", "--stop-addr",
                 "--kick-fd", "--irq-fd"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--work-us", type=float, required=True)
    p.add_argument("--suppress", type=int, choices=[0, 1], required=True)
    p.add_argument("--ring", choices=["split", "packed"], default="split")
    a = p.parse_args(argv)
    memory = GuestMemory.from_fd(a.mem_fd, a.mem_size)
    try:
        stats = serve(memory, a.base, a.num, a.features, a.stop_addr, EventFd(a.kick_fd),
                      EventFd(a.irq_fd), a.work_us, bool(a.suppress), a.ring)
    except KeyboardInterrupt:
        return 130
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
