"""The speed duel: notifications per 1,000 buffers against the driver/device speed ratio.

The seed article calls delayed notification "a duel of speeds": with
VIRTIO 1.2 §2.7.7 / §2.7.10 suppression each side notifies the other only
when the other has caught up.  This module measures it.  For each suppression
mode (``none``, ``flags``, ``event-idx``) and each speed ratio, a driver
and a device exchange a fixed number of buffers over one ring in a memfd —
a split ring (§2.7) or a packed one (§2.8, whose suppression is the event
suppression structures of §2.8.10: ENABLE / DISABLE / DESC with an
``off_wrap`` in place of ``used_event`` / ``avail_event``); each side spins
for its chosen per-buffer work (microseconds) and the driver's work is
``ratio`` times the device's.  The driver counts its kicks,
the device its interrupts.

Why two processes (the driver here, the device in ``pyvirtio.demo.duel_device``)
and not two threads: CPython threads share one interpreter lock, so two
spinning threads would not run at the same time; they would take turns every
switch interval (5 ms), and what the duel would measure is the lock's
schedule, not the sides' speeds.  Two processes on the machine's two cores
race for real, and talk the way the demo does: shared memory plus a kick
eventfd and an interrupt eventfd, both with blocking waits.

The driver side follows Linux: it keeps interrupts off while it has work,
and before it sleeps re-arms them (``enable_cb_delayed`` when the ring is
full, so it wakes once about 3/4 of the buffers are back; ``enable_cb`` at
the end), re-checking for buffers that came back meanwhile.  A wait that
times out is counted as a lost wake-up (it must stay 0).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pyvirtio.core.errors import CallerError
from pyvirtio.core.layout import RingViews, SplitLayout, vring_size
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.packed_driver import PackedDriverQueue
from pyvirtio.core.packed_layout import EVENT_SIZE, PackedLayout, PackedRingViews, packed_ring_size
from pyvirtio.core.queue import DriverQueue
from pyvirtio.core.spec import F_RING_EVENT_IDX, LEGACY_VRING_ALIGN, bit
from pyvirtio.core.split_driver import SplitDriverQueue
from pyvirtio.demo.duel_device import busy_wait_us
from pyvirtio.io.eventfd import EventFd

MODES = ("none", "flags", "event-idx")
RINGS = ("split", "packed")
DEFAULT_RATIOS = (0.25, 0.5, 1.0, 2.0, 4.0)
BUFFER_BYTES = 64
WAIT_TIMEOUT = 1.0
CSV_NAME = "duel.csv"
PNG_NAME = "duel.png"


@dataclass(frozen=True, slots=True)
class DuelPoint:
    """One measured point of the sweep."""

    mode: str
    ratio: float
    driver_work_us: float
    device_work_us: float
    buffers: int
    kicks: int
    interrupts: int
    kicks_per_1000: float
    interrupts_per_1000: float
    seconds: float
    driver_sleeps: int
    device_sleeps: int
    lost_wakeups: int
    ring: str = "split"


def ring_bytes(ring: str, num: int) -> int:
    """Bytes of one ring of ``num`` entries laid out in one piece."""
    if ring == "packed":
        return packed_ring_size(num) + 2 * EVENT_SIZE
    return vring_size(num, LEGACY_VRING_ALIGN)


def _start_device(memory: GuestMemory, size: int, base: int, num: int, features: int,
                  stop_addr: int, kick: EventFd, irq: EventFd, work_us: float,
                  suppress: bool, ring: str) -> subprocess.Popen[str]:
    mem_fd = memory.regions[0].fd
    cmd = [sys.executable, "-m", "pyvirtio.demo.duel_device",
           "--mem-fd", str(mem_fd), "--mem-size", str(size), "--base", str(base),
           "--num", str(num), "--features", str(features), "--stop-addr", str(stop_addr),
           "--kick-fd", str(kick.fd), "--irq-fd", str(irq.fd), "--work-us", str(work_us),
           "--suppress", str(int(suppress)), "--ring", ring]
    proc = subprocess.Popen(cmd, pass_fds=[mem_fd, kick.fd, irq.fd], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"duel device did not start (said {line!r})")
    return proc


def run_point(mode: str, ratio: float, device_work_us: float, buffers: int,
              queue_size: int, ring: str = "split") -> DuelPoint:
    """Exchange ``buffers`` buffers in ``mode`` over a ``ring`` ring with driver work =
    ratio * device work."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if ring not in RINGS:
        raise ValueError(f"ring must be one of {RINGS}")
    suppress = mode != "none"
    features = bit(F_RING_EVENT_IDX) if mode == "event-idx" else 0
    driver_work_us = ratio * device_work_us
    size = max(1 << 20, 2 * ring_bytes(ring, queue_size)
               + queue_size * BUFFER_BYTES + (64 << 10))
    memory = GuestMemory.anonymous(size, name="pyvirtio-duel")
    alloc = BumpAllocator(LEGACY_VRING_ALIGN, size)
    stop_addr = alloc.alloc(64, 64)
    base = alloc.alloc(ring_bytes(ring, queue_size), LEGACY_VRING_ALIGN)
    bufs = alloc.alloc(queue_size * BUFFER_BYTES, 64)
    q: DriverQueue
    if ring == "packed":
        q = PackedDriverQueue(PackedRingViews.map(memory, PackedLayout.contiguous(base,
                                                                                 queue_size)),
                              features)
    else:
        q = SplitDriverQueue(RingViews.map(memory, SplitLayout.legacy(base, queue_size)),
                             features)
    stop = memory.translate(stop_addr, 4).cast("I")
    kick = EventFd()
    irq = EventFd(nonblocking=True)
    proc: subprocess.Popen[str] | None = None
    try:
        proc = _start_device(memory, size, base, queue_size, features, stop_addr, kick, irq,
                             device_work_us, suppress, ring)
        kicks = sleeps = lost = 0
        produced = consumed = 0
        free = list(range(queue_size))
        if suppress:
            q.disable_cb()
        t0 = time.perf_counter()
        while consumed < buffers:
            while (got := q.get_buf()) is not None:
                consumed += 1
                free.append(got[0])  # type: ignore[arg-type]
            if produced < buffers and q.num_free:
                busy_wait_us(driver_work_us)
                slot = free.pop()
                q.add(((bufs + slot * BUFFER_BYTES, BUFFER_BYTES),), (), slot)
                produced += 1
                if q.kick_prepare():
                    kick.signal()
                    kicks += 1
                continue
            if consumed >= buffers:
                break
            if suppress:
                more = q.enable_cb_delayed() if produced < buffers else q.enable_cb()
                if more:
                    q.disable_cb()
                    continue
            sleeps += 1
            if irq.wait(WAIT_TIMEOUT) == 0 and not q.more_used():
                lost += 1
            if suppress:
                q.disable_cb()
        seconds = time.perf_counter() - t0
        stop[0] = 1
        kick.signal()
        out, _ = proc.communicate(timeout=10.0)
        dev = json.loads(out.strip().splitlines()[-1])
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        stop.release()
        kick.close()
        irq.close()
        memory.close()
    interrupts = int(dev["interrupts"])
    return DuelPoint(mode, ratio, driver_work_us, device_work_us, buffers, kicks, interrupts,
                     round(1000.0 * kicks / buffers, 2), round(1000.0 * interrupts / buffers, 2),
                     round(seconds, 4), sleeps, int(dev["sleeps"]), lost, ring)


def sweep(modes: Sequence[str], ratios: Sequence[float], device_work_us: float, buffers: int,
          queue_size: int, on_point: Callable[[DuelPoint], None] | None = None,
          rings: Sequence[str] = ("split",)) -> list[DuelPoint]:
    points = []
    for ring in rings:
        for mode in modes:
            for ratio in ratios:
                point = run_point(mode, ratio, device_work_us, buffers, queue_size, ring)
                points.append(point)
                if on_point is not None:
                    on_point(point)
    return points


def write_csv(points: Sequence[DuelPoint], path: Path) -> None:
    fields = list(DuelPoint.__dataclass_fields__)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for p in points:
            w.writerow(asdict(p))


def write_plot(points: Sequence[DuelPoint], path: Path) -> None:
    """Kicks and interrupts per 1,000 buffers against the ratio, one line per mode and ring
    (color: the mode; solid: split, dashed: packed)."""
    try:
        import matplotlib
    except ImportError:
        raise CallerError("the plot needs matplotlib: pip install 'pyvirtio[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    styles = {"none": ("tab:red", "o"), "flags": ("tab:blue", "s"),
              "event-idx": ("tab:green", "^")}
    for ax, key, title in ((axes[0], "kicks_per_1000", "kicks (driver → device)"),
                           (axes[1], "interrupts_per_1000", "interrupts (device → driver)")):
        rings = list(dict.fromkeys(p.ring for p in points))
        for ring in rings:
            for mode in dict.fromkeys(p.mode for p in points):
                pts = sorted((p for p in points if p.mode == mode and p.ring == ring),
                             key=lambda p: p.ratio)
                if not pts:
                    continue
                color, marker = styles.get(mode, ("black", "x"))
                ax.plot([p.ratio for p in pts], [getattr(p, key) for p in pts],
                        marker=marker, color=color,
                        ls="--" if ring == "packed" else "-", mfc="none" if ring == "packed"
                        else color, label=f"{mode} ({ring})" if len(rings) > 1 else mode)
        ax.set_xscale("log", base=2)
        ticks = sorted({p.ratio for p in points})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("driver work / device work per buffer")
        ax.set_ylabel("per 1,000 buffers")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.legend(title="suppression", loc="best", framealpha=0.85)
    dev = points[0].device_work_us if points else 0
    fig.suptitle(f"pyvirtio speed duel: device work {dev:g} µs/buffer, "
                 f"{points[0].buffers if points else 0} buffers per point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(points: Sequence[DuelPoint], out_dir: Path) -> tuple[Path, Path]:
    os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path = out_dir / CSV_NAME, out_dir / PNG_NAME
    write_csv(points, csv_path)
    write_plot(points, png_path)
    return csv_path, png_path
