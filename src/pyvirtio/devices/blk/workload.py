"""An fio-like load generator on :class:`BlkDriver` (VIRTIO 1.2 §5.2.6 requests).

Keeps ``iodepth`` requests in flight on one queue for a fixed time: each
completion is timed, and its slot is resubmitted at once with a new offset
(random or sequential).  Kicks and interrupts are counted by the driver, so
the notification-suppression behaviour of the device shows up per 1,000
requests next to IOPS and latency percentiles.
"""

from __future__ import annotations

import math
import random as _random
import statistics
import time
from dataclasses import asdict, dataclass

from pyvirtio.core.errors import CallerError
from pyvirtio.devices.blk.driver import BlkDriver
from pyvirtio.devices.blk.spec import SECTOR_SIZE, ReqType, Status

RW_MODES = ("randread", "randwrite", "read", "write")
PERCENTILES = (1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9, 99.99)


def percentile(ordered: list[float], p: float) -> float:
    """The ``p``-th percentile of sorted values, linearly interpolated (as fio reports)."""
    if not ordered:
        return 0.0
    pos = p / 100.0 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def parse_size(text: str) -> int:
    """'4k', '64K', '1m', '512' -> bytes (fio's binary suffixes)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise CallerError(f"not a size: {text!r}") from None
    if value <= 0 or value % SECTOR_SIZE:
        raise CallerError(f"size {text!r} must be a positive multiple of 512")
    return value


@dataclass
class WorkloadResult:
    rw: str
    bs: int
    iodepth: int
    seconds: float
    requests: int
    errors: int
    iops: float
    mib_s: float
    lat_us_min: float
    lat_us_avg: float
    lat_us_max: float
    lat_us_stdev: float
    percentiles_us: dict[str, float]
    kicks_per_1000: float
    interrupts_per_1000: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_workload(drv: BlkDriver, rw: str, bs: int, iodepth: int, seconds: float,
                 queue: int = 0, seed: int = 1, warmup: float = 0.0, *,
                 allow_writes: bool = False) -> WorkloadResult:
    """Run ``rw`` with ``bs``-byte requests, ``iodepth`` in flight, for ``seconds``.

    ``write`` and ``randwrite`` overwrite the disk with random blocks: they
    run only with ``allow_writes=True``.
    """
    if rw not in RW_MODES:
        raise CallerError(f"rw must be one of {', '.join(RW_MODES)}")
    if rw.endswith("write") and not allow_writes:
        raise CallerError(f"rw={rw} overwrites the disk: pass allow_writes=True if nothing "
                          f"on it matters")
    if bs > drv.max_io:
        raise CallerError(f"bs {bs} exceeds the driver's max_io {drv.max_io}")
    if not 1 <= iodepth <= drv.depth(queue):
        raise CallerError(f"iodepth {iodepth} must be in 1..{drv.depth(queue)} "
                          f"(half the queue size)")
    blocks = drv.capacity * SECTOR_SIZE // bs
    if blocks == 0:
        raise CallerError("the disk is smaller than one block")
    write = rw.endswith("write")
    rtype = ReqType.OUT if write else ReqType.IN
    per_block = bs // SECTOR_SIZE
    rng = _random.Random(seed)
    random = rw.startswith("rand")
    # Precomputed offsets: no per-request random-number call on the hot path.
    offsets = [rng.randrange(blocks) * per_block for _ in range(1 << 16)]
    mask = len(offsets) - 1
    pattern = rng.randbytes(bs)

    slots = []
    for _ in range(iodepth):
        s = drv.prepare(queue)
        if write:
            s.data[:bs] = pattern
        slots.append(s)

    lat: list[int] = []
    errors = 0
    n = 0
    seq = 0
    submit = drv.submit_slot
    for s in slots:
        sector = offsets[n & mask] if random else (seq % blocks) * per_block
        seq += 1
        n += 1
        submit(s, rtype, sector, bs, kick=False)
    drv.kick(queue)

    start = time.perf_counter_ns()
    measure_from = start + int(warmup * 1e9)
    end = measure_from + int(seconds * 1e9)
    kicks0 = interrupts0 = 0
    measuring = warmup <= 0
    if measuring:
        kicks0, interrupts0 = drv.kicks, drv.interrupts
    reap = drv.reap
    kick = drv.kick
    perf = time.perf_counter_ns
    append = lat.append
    ok = Status.OK
    while True:
        done = reap(queue)
        now = perf()
        if not measuring and now >= measure_from:
            measuring = True
            lat.clear()
            errors = 0
            kicks0, interrupts0 = drv.kicks, drv.interrupts
            measure_from = now
            end = now + int(seconds * 1e9)
        stop = now >= end
        for s in done:
            append(now - s.submit_ns)
            if s.status != ok:
                errors += 1
            if not stop:
                if random:
                    sector = offsets[n & mask]
                    n += 1
                else:
                    sector = (seq % blocks) * per_block
                    seq += 1
                submit(s, rtype, sector, bs, kick=False)
        if stop:
            break
        kick(queue)
    elapsed = (perf() - measure_from) / 1e9
    kicks = drv.kicks - kicks0
    interrupts = drv.interrupts - interrupts0
    # Drain what is still in flight so the driver can be reused.
    while drv.in_flight(queue):
        reap(queue)
    for s in slots:
        drv.release(s)

    arr = sorted(x / 1000.0 for x in lat)
    count = len(arr)
    pct = [percentile(arr, p) for p in PERCENTILES]
    per_k = 1000.0 / count if count else 0.0
    return WorkloadResult(
        rw=rw, bs=bs, iodepth=iodepth, seconds=round(elapsed, 3), requests=count,
        errors=errors, iops=count / elapsed if elapsed else 0.0,
        mib_s=count * bs / elapsed / (1 << 20) if elapsed else 0.0,
        lat_us_min=arr[0] if count else 0.0,
        lat_us_avg=statistics.fmean(arr) if count else 0.0,
        lat_us_max=arr[-1] if count else 0.0,
        lat_us_stdev=statistics.pstdev(arr) if count else 0.0,
        percentiles_us={f"{p:.2f}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)},
        kicks_per_1000=kicks * per_k, interrupts_per_1000=interrupts * per_k,
    )


def format_fio(r: WorkloadResult) -> str:
    """fio-style text for one result."""
    kind = "write" if r.rw.endswith("write") else "read"

    def si(x: float) -> str:
        return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"

    lines = [
        f"pyvirtio-bench: (rw={r.rw}, bs={r.bs}B, iodepth={r.iodepth})",
        f"  {kind}: IOPS={si(r.iops)}, BW={r.mib_s:.1f}MiB/s "
        f"({r.requests * r.bs / (1 << 20):.1f}MiB/{r.seconds * 1000:.0f}msec)"
        + (f", errors={r.errors}" if r.errors else ""),
        f"    lat (usec): min={r.lat_us_min:.1f}, max={r.lat_us_max:.1f}, "
        f"avg={r.lat_us_avg:.1f}, stdev={r.lat_us_stdev:.1f}",
        "    lat percentiles (usec):",
    ]
    items = [f"{float(k):6.2f}th=[{v:8.1f}]" for k, v in r.percentiles_us.items()]
    for i in range(0, len(items), 3):
        lines.append("     | " + ", ".join(items[i:i + 3]))
    lines.append(f"  notifications: kicks/1000 req={r.kicks_per_1000:.1f}, "
                 f"interrupts/1000 req={r.interrupts_per_1000:.1f}")
    return "\n".join(lines)
