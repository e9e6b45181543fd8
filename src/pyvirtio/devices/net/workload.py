"""Traffic generator and sink on :class:`NetDriver` (VIRTIO 1.2 §5.1.6): ``pyvirtio bench net``.

Three modes, named after DPDK testpmd's forwarding modes from the front
end's side:

* ``txonly``: transmit ``size``-byte frames as fast as the back end takes
  them (the back end is the sink);
* ``rxonly``: receive and count what the back end sends (it is the source);
* ``io``: transmit and receive what comes back (a back end that loops or
  forwards frames to the same port), with at most as many frames in flight
  as there are receive buffers, so a loop that keeps up drops nothing.

Reported: frames and bytes each way, packets per second and Gbit/s of
Ethernet frames (without the virtio header and the wire's preamble, gap and
FCS) in the measured direction (received for ``rxonly`` and ``io``),
drops, and kicks and interrupts per 1,000 packets — what notification
suppression (§2.7.10) saved.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from pyvirtio.core.errors import CallerError
from pyvirtio.devices.net.driver import NAPI_WEIGHT, NetDriver
from pyvirtio.devices.net.spec import ETH_FRAME_MAX, RX_QUEUE, TX_QUEUE

MODES = ("txonly", "rxonly", "io")
#: Smallest Ethernet frame without its FCS (IEEE 802.3: 64 bytes on the wire).
MIN_FRAME = 60
#: IEEE 802 "local experimental" EtherType: nobody on the way will parse it.
ETHERTYPE = 0x88B5
BROADCAST = b"\xff" * 6
#: Seconds io mode waits for frames still looping back after the measurement.
DRAIN_SECONDS = 2.0

Progress = Callable[["Snapshot"], None]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Counters during a run, for a progress display."""

    mode: str
    elapsed: float
    seconds: float
    sent: int
    received: int

    @property
    def pps(self) -> float:
        count = self.sent if self.mode == "txonly" else self.received
        return count / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class NetBenchResult:
    mode: str
    size: int
    seconds: float
    frames_sent: int
    bytes_sent: int
    frames_received: int
    bytes_received: int
    pps: float
    gbit_s: float
    drops: int
    kicks: int
    interrupts: int
    kicks_per_1000: float
    interrupts_per_1000: float
    kicks_tx: int
    kicks_rx: int
    interrupts_tx: int
    interrupts_rx: int
    #: The back end stopped returning transmit buffers before the time was up.
    stalled: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def check_size(size: int) -> int:
    """``size`` if it is an Ethernet frame length this benchmark can send, else CallerError."""
    if not MIN_FRAME <= size <= ETH_FRAME_MAX:
        raise CallerError(f"frame size {size} must be in {MIN_FRAME}..{ETH_FRAME_MAX} bytes "
                          f"(an Ethernet frame without FCS)")
    return size


def make_frames(src: bytes, size: int, count: int) -> list[bytes]:
    """``count`` broadcast frames of ``size`` bytes from ``src``, each with its number."""
    check_size(size)
    header = BROADCAST + src + ETHERTYPE.to_bytes(2, "big")
    pad = bytes(size - len(header) - 4)
    return [header + i.to_bytes(4, "big") + pad for i in range(count)]


def run_net_bench(drv: NetDriver, mode: str, size: int, seconds: float, *, batch: int = 64,
                  progress: Progress | None = None,
                  progress_every: float = 0.25) -> NetBenchResult:
    """Run ``mode`` for ``seconds`` with ``size``-byte frames, ``batch`` per call."""
    if mode not in MODES:
        raise CallerError(f"mode must be one of {', '.join(MODES)}")
    check_size(size)
    if seconds <= 0:
        raise CallerError(f"seconds {seconds} must be positive")
    if batch < 1:
        raise CallerError(f"batch {batch} must be at least 1")
    frames = make_frames(drv.mac, size, batch)
    # In io mode every frame in flight must find a receive buffer when it comes back;
    # up to half a NAPI budget of descriptors waits for the next refill (napi_poll).
    per_frame = -(-(size + drv.hdr_len) // drv.rx_slot) if drv.mergeable else 1
    posted = drv.rx.num - min(NAPI_WEIGHT, drv.rx.num) // 2
    window = max(1, posted // drv.rx_descs // per_frame)
    kicks0 = list(drv.kicks)
    irqs0 = list(drv.interrupts)
    sent0, rx0 = drv.frames_sent, drv.frames_received
    bsent0, brx0 = drv.bytes_sent, drv.bytes_received
    drops0 = drv.rx_dropped
    send_many = drv.send_many
    receive_many = drv.receive_many
    now = time.monotonic
    start = now()
    end = start + seconds
    next_report = start + progress_every
    sent = received = 0
    t = start
    stalled = False
    while t < end:
        try:
            if mode == "txonly":
                sent += send_many(frames, end - t + 1.0)
            elif mode == "rxonly":
                received += len(receive_many(batch, min(0.1, end - t)))
            else:
                room = window - (sent - received)
                if room > 0:
                    sent += send_many(frames if room >= batch else frames[:room], end - t + 1.0)
                got = receive_many(batch, 0 if room > 0 else min(0.1, end - t))
                received += len(got)
        except TimeoutError:
            # The back end stopped taking frames (a loopback nobody receives from):
            # what got through until then is the result.
            stalled = True
            t = now()
            break
        t = now()
        if progress is not None and t >= next_report:
            progress(Snapshot(mode, t - start, seconds, sent, received))
            next_report = t + progress_every
    elapsed = t - start
    if mode == "io":
        # Frames still on their way back: wait for them (and no longer) before counting drops.
        limit = now() + DRAIN_SECONDS
        while received < sent and now() < limit:
            received += len(receive_many(batch, max(0.0, limit - now())))
    if mode != "rxonly" and not stalled:
        drv.drain_tx(DRAIN_SECONDS)
    frames_sent = drv.frames_sent - sent0
    frames_received = drv.frames_received - rx0
    bytes_sent = drv.bytes_sent - bsent0
    bytes_received = drv.bytes_received - brx0
    if mode == "txonly":
        count, nbytes = frames_sent, bytes_sent
    else:
        count, nbytes = frames_received, bytes_received
    drops = drv.rx_dropped - drops0
    if mode == "io":
        drops += frames_sent - frames_received
    kicks_tx = drv.kicks[TX_QUEUE] - kicks0[TX_QUEUE]
    kicks_rx = drv.kicks[RX_QUEUE] - kicks0[RX_QUEUE]
    irqs_tx = drv.interrupts[TX_QUEUE] - irqs0[TX_QUEUE]
    irqs_rx = drv.interrupts[RX_QUEUE] - irqs0[RX_QUEUE]
    per_k = 1000.0 / count if count else 0.0
    return NetBenchResult(
        mode=mode, size=size, seconds=round(elapsed, 3),
        frames_sent=frames_sent, bytes_sent=bytes_sent,
        frames_received=frames_received, bytes_received=bytes_received,
        pps=count / elapsed if elapsed > 0 else 0.0,
        gbit_s=nbytes * 8 / elapsed / 1e9 if elapsed > 0 else 0.0,
        drops=drops, kicks=kicks_tx + kicks_rx, interrupts=irqs_tx + irqs_rx,
        kicks_per_1000=(kicks_tx + kicks_rx) * per_k,
        interrupts_per_1000=(irqs_tx + irqs_rx) * per_k,
        kicks_tx=kicks_tx, kicks_rx=kicks_rx, interrupts_tx=irqs_tx, interrupts_rx=irqs_rx,
        stalled=stalled,
    )


def format_result(r: NetBenchResult) -> str:
    """Text report of one run."""
    what = "transmitted" if r.mode == "txonly" else "received"
    lines = [
        f"pyvirtio-bench net: (mode={r.mode}, size={r.size}B, {r.seconds:.2f} s)",
        f"  {what}: {r.pps / 1e6:.3f} Mpps, {r.gbit_s:.3f} Gbit/s",
        f"  frames: sent={r.frames_sent:,} ({r.bytes_sent:,} B), "
        f"received={r.frames_received:,} ({r.bytes_received:,} B), drops={r.drops:,}",
        f"  notifications: kicks/1000 pkts={r.kicks_per_1000:.2f} "
        f"(tx {r.kicks_tx}, rx {r.kicks_rx}), interrupts/1000 pkts="
        f"{r.interrupts_per_1000:.2f} (tx {r.interrupts_tx}, rx {r.interrupts_rx})",
    ]
    if r.stalled:
        lines.append("  stalled: the back end stopped returning transmit buffers (nobody "
                     "receives what it loops back?)")
    return "\n".join(lines)


@contextlib.contextmanager
def live_progress(enabled: bool) -> Iterator[Progress | None]:
    """A one-line live display on stderr (rich) while a run lasts; None if not ``enabled``."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    with Live(console=Console(stderr=True), auto_refresh=False, transient=True) as live:

        def update(s: Snapshot) -> None:
            live.update(Text(f"{s.mode} {s.elapsed:5.1f}/{s.seconds:g} s  "
                             f"sent {s.sent:,}  received {s.received:,}  "
                             f"{s.pps / 1e6:.3f} Mpps"), refresh=True)

        yield update
