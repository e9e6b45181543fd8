"""Ring benchmark: descriptors per second on one core, pyvirtio against C.

Not a test.  Run ``.venv/bin/python bench/ring.py [--json] [--seconds S]``.

Measures the split virtqueue of VIRTIO 1.2 §2.7 (legacy contiguous layout,
§2.7.2, ``num`` = 4096, ``VIRTIO_RING_F_EVENT_IDX`` negotiated) and, in rows
next to it, the packed virtqueue of §2.8 (descriptor ring then the two event
suppression structures, ``num`` = 4096, EVENT_IDX) with both sides in this
process:

* ``device``: device-side pop + push only.  The driver fills the whole ring
  with the batched add first (untimed) and reclaims it afterwards (untimed).
* ``full``: the whole cycle per batch — driver add, kick_prepare, device pop,
  push, should_notify, driver get_buf.

at batch sizes 1, 16 and 256 and chains of 1 descriptor (readable) and 3
(one readable, two writable).  Batch 1 uses the scalar API
(``SplitDriverQueue.add`` ... ``get_buf``); larger batches use
:mod:`pyvirtio.batch` (the ``batch`` extra), which picks its scalar loop or
numpy by size.  The packed rows use the packed queues' own calls: ``add`` per
buffer and ``get_bufs`` on the driver side, ``pop_batch`` + ``fill`` +
``flush`` on the device side (batch 1: ``pop`` / ``push``); there is no
numpy path for packed rings.  The same algorithms in C (``bench/ring_loop.c``:
same layouts, same checks, same fences) are compiled with ``gcc -O2`` into a
temporary directory and run in the same invocation; the table shows
pyvirtio/C.

pyvirtio runs twice: as installed (the ring's hot paths compiled with mypyc,
setup.py) in this process, and interpreted from the same source
(``PYVIRTIO_PURE_PYTHON=1``) in a child process; targets are judged on the
installed build.  Every figure is the best of three timed runs (other
processes share the machine).  The garbage collector stays on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# No BLAS is used here; keep OpenBLAS from starting (spinning) worker threads
# on a two-core machine before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from rich.console import Console
from rich.table import Table

from pyvirtio._build import PURE_ENV, build_kind
from pyvirtio.batch import DeviceBatch, DriverBatch
from pyvirtio.core.layout import RingViews, SplitLayout, vring_size
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.packed_device import PackedDeviceQueue
from pyvirtio.core.packed_driver import PackedDriverQueue
from pyvirtio.core.packed_layout import EVENT_SIZE, PackedLayout, PackedRingViews, packed_ring_size
from pyvirtio.core.spec import F_RING_EVENT_IDX
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.core.split_driver import SplitDriverQueue

NUM = 4096
BATCHES = (1, 16, 256)
CHAINS = (1, 3)
TARGETS = {
    # (mode, batch, chain): minimum descriptors per second (the targets in the README)
    ("full", 1, 1): 0.7e6,
    ("full", 256, 1): 2.5e6,
    ("device", 256, 1): 5e6,
}
HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    ring: str
    mode: str
    batch: int
    chain: int
    build: str
    py_desc_per_s: float
    py_chains_per_s: float
    interpreted_desc_per_s: float | None
    c_desc_per_s: float
    ratio: float
    target_desc_per_s: float | None
    target_met: bool | None


class Rig:
    """Guest memory, one ring, its two sides and the batched helpers."""

    def __init__(self, chain: int) -> None:
        ring = vring_size(NUM, 4096)
        self.mem = GuestMemory.anonymous(ring + (1 << 22))
        layout = SplitLayout.legacy(0, NUM)
        feats = 1 << F_RING_EVENT_IDX
        self.drv = SplitDriverQueue(RingViews.map(self.mem, layout), feats)
        self.dev = SplitDeviceQueue(RingViews.map(self.mem, layout), self.mem, feats)
        self.db = DriverBatch(self.drv)
        self.vb = DeviceBatch(self.dev)
        data = ring + 64
        self.addrs = [data + 4096 * j for j in range(chain)]
        self.chain = chain

    def close(self) -> None:
        self.mem.close()   # also closes the memfd anonymous() created

    def segs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        segs = [(a, 64) for a in self.addrs]
        return segs[:1], segs[1:]

    def arrays(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.tile(np.array(self.addrs, np.uint64), (n, 1))
        return a, np.full(a.shape, 64, np.uint32)


class PackedRig:
    """Guest memory and one packed ring (§2.8) with its two sides."""

    def __init__(self, chain: int) -> None:
        ring = packed_ring_size(NUM) + 2 * EVENT_SIZE
        self.mem = GuestMemory.anonymous(ring + (1 << 22))
        layout = PackedLayout.contiguous(0, NUM)
        feats = 1 << F_RING_EVENT_IDX
        self.drv = PackedDriverQueue(PackedRingViews.map(self.mem, layout), feats)
        self.dev = PackedDeviceQueue(PackedRingViews.map(self.mem, layout), self.mem, feats)
        data = ring + 64
        segs = [(data + 4096 * j, 64) for j in range(chain)]
        self.out, self.inn = segs[:1], segs[1:]

    def close(self) -> None:
        self.mem.close()


def run_packed_full(batch: int, chain: int, seconds: float) -> tuple[int, float]:
    rig = PackedRig(chain)
    drv, dev, out, inn = rig.drv, rig.dev, rig.out, rig.inn
    add, kick, get_buf, get_bufs = drv.add, drv.kick_prepare, drv.get_buf, drv.get_bufs
    pop, push, pop_batch, fill, flush, notify = (dev.pop, dev.push, dev.pop_batch, dev.fill,
                                                 dev.flush, dev.should_notify)
    best = (0, 1.0)
    for _ in range(3):
        gc.collect()
        count = 0
        t0 = time.perf_counter()
        end = t0 + seconds / 3
        now = t0
        while now < end:
            if batch == 1:
                for _ in range(2000):
                    add(out, inn, 1)
                    kick()
                    e = pop()
                    assert e is not None
                    push(e.head, 0)
                    notify()
                    get_buf()
                count += 2000
            else:
                for _ in range(max(1, 4000 // batch)):
                    for _ in range(batch):
                        add(out, inn, 1)
                    kick()
                    elems = pop_batch(batch)
                    for k, e in enumerate(elems):
                        fill(e.head, 0, k)
                    flush(len(elems))
                    notify()
                    got = get_bufs(batch)
                    assert len(got) == batch
                    count += batch
            now = time.perf_counter()
        elapsed = now - t0
        if count / elapsed > best[0] / best[1]:
            best = (count, elapsed)
    rig.close()
    return best[0] * chain, best[1]


def run_packed_device(batch: int, chain: int, seconds: float) -> tuple[int, float]:
    rig = PackedRig(chain)
    drv, dev, out, inn = rig.drv, rig.dev, rig.out, rig.inn
    fill_n = NUM // chain
    add, get_bufs = drv.add, drv.get_bufs
    pop, push, pop_batch, fill, flush = dev.pop, dev.push, dev.pop_batch, dev.fill, dev.flush
    best = (0, 1.0)
    for _ in range(3):
        gc.collect()
        count = 0
        elapsed = 0.0
        t_end = time.perf_counter() + seconds / 3
        while time.perf_counter() < t_end:
            for _ in range(fill_n):                 # untimed
                add(out, inn, 1)
            t0 = time.perf_counter()
            if batch == 1:
                for _ in range(fill_n):
                    e = pop()
                    assert e is not None
                    push(e.head, 0)
            else:
                left = fill_n
                while left:
                    elems = pop_batch(batch)
                    for k, e in enumerate(elems):
                        fill(e.head, 0, k)
                    flush(len(elems))
                    left -= len(elems)
            elapsed += time.perf_counter() - t0
            got = 0
            while got < fill_n:                     # untimed
                got += len(get_bufs(NUM))
            count += fill_n
        if count / elapsed > best[0] / best[1]:
            best = (count, elapsed)
    rig.close()
    return best[0] * chain, best[1]


def run_full(batch: int, chain: int, seconds: float) -> tuple[int, float]:
    rig = Rig(chain)
    drv, dev, db, vb = rig.drv, rig.dev, rig.db, rig.vb
    out, inn = rig.segs()
    addrs, lens = rig.arrays(batch)
    toks = np.arange(batch)
    zeros = np.zeros(batch, np.uint32)
    add, kick, pop, push, notify, get_buf = (drv.add, drv.kick_prepare, dev.pop, dev.push,
                                             dev.should_notify, drv.get_buf)
    best = (0, 1.0)
    for _ in range(3):
        gc.collect()
        count = 0
        t0 = time.perf_counter()
        end = t0 + seconds / 3
        now = t0
        while now < end:
            if batch == 1:
                for _ in range(2000):
                    add(out, inn, 1)
                    kick()
                    e = pop()
                    assert e is not None
                    push(e.head, 0)
                    notify()
                    get_buf()
                count += 2000
            else:
                for _ in range(max(1, 4000 // batch)):
                    db.add(addrs, lens, 1, toks)
                    kick()
                    ch = vb.pop(batch)
                    vb.push(ch.heads, zeros[:len(ch)])
                    notify()
                    got = db.get(batch)
                    assert len(got) == batch
                    count += batch
            now = time.perf_counter()
        elapsed = now - t0
        if count / elapsed > best[0] / best[1]:
            best = (count, elapsed)
    rig.close()
    return best[0] * chain, best[1]


def run_device(batch: int, chain: int, seconds: float) -> tuple[int, float]:
    rig = Rig(chain)
    dev, db, vb = rig.dev, rig.db, rig.vb
    fill = NUM // chain
    addrs, lens = rig.arrays(fill)
    toks = np.arange(fill)
    zeros = np.zeros(batch, np.uint32)
    pop, push = dev.pop, dev.push
    best = (0, 1.0)
    for _ in range(3):
        gc.collect()
        count = 0
        elapsed = 0.0
        t_end = time.perf_counter() + seconds / 3
        while time.perf_counter() < t_end:
            db.add(addrs, lens, 1, toks)            # untimed
            t0 = time.perf_counter()
            if batch == 1:
                for _ in range(fill):
                    e = pop()
                    assert e is not None
                    push(e.head, 0)
            else:
                left = fill
                while left:
                    ch = vb.pop(batch)
                    vb.push(ch.heads, zeros[:len(ch)])
                    left -= len(ch)
            elapsed += time.perf_counter() - t0
            got = 0
            while got < fill:                       # untimed
                got += len(db.get(NUM))
            count += fill
        if count / elapsed > best[0] / best[1]:
            best = (count, elapsed)
    rig.close()
    return best[0] * chain, best[1]


def build_c(tmp: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("gcc is needed for the C reference loop (apt-get install gcc)")
    exe = tmp / "ring_loop"
    subprocess.run([gcc, "-O2", "-o", str(exe), str(HERE / "ring_loop.c")], check=True)
    return exe


def run_c(exe: Path, ring: str, mode: str, batch: int, chain: int,
          seconds: float) -> tuple[int, float]:
    res = subprocess.run([str(exe), mode, str(NUM), str(batch), str(chain), str(seconds), ring],
                         check=True, capture_output=True, text=True, timeout=60 + 10 * seconds)
    m = re.search(r"descs=(\d+) seconds=([0-9.]+)", res.stdout)
    if m is None:
        raise RuntimeError(f"unexpected output from ring_loop: {res.stdout!r}")
    return int(m.group(1)), float(m.group(2))


ROWS = [(ring, mode, batch, chain) for ring in ("split", "packed") for mode in ("device", "full")
        for batch in BATCHES for chain in CHAINS]
RUNNERS = {("split", "device"): run_device, ("split", "full"): run_full,
           ("packed", "device"): run_packed_device, ("packed", "full"): run_packed_full}


def python_rows(seconds: float, console: Console) -> list[tuple[float, float]]:
    """(descriptors, seconds) of this process's pyvirtio build for every row."""
    out: list[tuple[float, float]] = []
    for ring, mode, batch, chain in ROWS:
        out.append(RUNNERS[ring, mode](batch, chain, seconds))
        d, t = out[-1]
        console.log(f"{build_kind():11s} {ring:6s} {mode:6s} batch {batch:3d} chain {chain}: "
                    f"{d / t / 1e6:6.2f} M desc/s")
    return out


def interpreted_rows(seconds: float, tmp: Path) -> list[tuple[float, float]]:
    """The same rows with the hot paths interpreted from source, in a child process."""
    dest = tmp / "interpreted.json"
    subprocess.run([sys.executable, __file__, "--seconds", str(seconds),
                    "--python-rows-to", str(dest)],
                   env=dict(os.environ, **{PURE_ENV: "1"}), check=True,
                   timeout=120 + 10 * seconds * len(ROWS))
    return [(d, t) for d, t in json.loads(dest.read_text())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true",
                    help="print the figures as JSON on stdout instead of the table")
    ap.add_argument("--seconds", type=float, default=1.5,
                    help="time per row and implementation (default 1.5)")
    ap.add_argument("--no-interpreted", action="store_true",
                    help="skip the interpreted run of the same source (saves a third of the time)")
    ap.add_argument("--python-rows-to", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # Progress on stderr, results on stdout (the table, or JSON with --json).
    console = Console(stderr=True, width=max(110, Console().width))
    if args.python_rows_to:  # the child of interpreted_rows
        args.python_rows_to.write_text(json.dumps(python_rows(args.seconds, console)))
        return 0
    build = build_kind()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-") as tmp:
        exe = build_c(Path(tmp))
        mine = python_rows(args.seconds, console)
        interp: list[tuple[float, float]] | list[None] = [None] * len(ROWS)
        if build != "interpreted" and not args.no_interpreted:
            interp = interpreted_rows(args.seconds, Path(tmp))
        for (ring, mode, batch, chain), (pd, pt), it in zip(ROWS, mine, interp, strict=True):
            cd, ct = run_c(exe, ring, mode, batch, chain, args.seconds)
            py, c = pd / pt, cd / ct
            console.log(f"C           {ring:6s} {mode:6s} batch {batch:3d} chain {chain}: "
                        f"{c / 1e6:6.1f} M desc/s")
            target = TARGETS.get((mode, batch, chain)) if ring == "split" else None
            rows.append(Row(ring, mode, batch, chain, build, py, py / chain,
                            None if it is None else it[0] / it[1], c, py / c, target,
                            None if target is None else py >= target))
    table = Table(title=f"pyvirtio ring benchmark (split and packed rings, num={NUM}, EVENT_IDX, "
                        f"one core)")
    for col in ("ring", "mode", "batch", "chain", f"pyvirtio ({build}) M desc/s", "M chains/s",
                "interpreted M desc/s", "C M desc/s", "pyvirtio/C", "target"):
        table.add_column(col, justify="right")
    for r in rows:
        tgt = "" if r.target_desc_per_s is None else (
            f"≥ {r.target_desc_per_s / 1e6:.1f} " + ("[green]met[/]" if r.target_met
                                                    else "[red]missed[/]"))
        table.add_row(r.ring, r.mode, str(r.batch), str(r.chain), f"{r.py_desc_per_s / 1e6:.2f}",
                      f"{r.py_chains_per_s / 1e6:.2f}",
                      "" if r.interpreted_desc_per_s is None
                      else f"{r.interpreted_desc_per_s / 1e6:.2f}",
                      f"{r.c_desc_per_s / 1e6:.1f}", f"{r.ratio:.3f}", tgt)
    if not args.json:
        Console(width=max(110, Console().width)).print(table)
    else:
        doc = {
            "benchmark": "ring",
            "num": NUM,
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "seconds_per_row": args.seconds,
            "build": build,
            "rows": [asdict(r) for r in rows],
        }
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
