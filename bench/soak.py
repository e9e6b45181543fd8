"""Soak: one pyvirtio-blk serving four disks for minutes, reconnected and SIGKILLed on schedule.

One ``pyvirtio-blk --aio threads`` process (a slow file store,
``--latency-us``, so requests are in flight at every kill) serves four
virtio-blk disks (VIRTIO 1.2 §5.2) on four vhost-user sockets (QEMU
docs/interop/vhost-user.rst, "Inflight I/O tracking" for what survives a
kill):

* two Linux guests in QEMU (TCG) on ``-chardev socket,...,reconnect=1`` and
  ``-device vhost-user-blk-pci``, each writing a pattern of its own per pass
  over 8 regions of its disk with parallel O_DIRECT dd's, reading them back
  and comparing (``PASS-DONE n`` or ``BAD-...`` on the serial console);
* two of pyvirtio's own front ends (``BlkDriver.connect(inflight=True)``),
  each in a thread, sweeping its disk with 4 KiB writes at queue depth 16
  (a pattern per sweep, front end and block) and then reading every block
  back and comparing.

Every ``--reconnect-every`` seconds one of the own front ends (in turn)
closes its connection with requests in flight and connects again
(``BlkDriver.reconnect``: the same back-end process resubmits them from the
inflight buffer).  Every ``--kill-every`` seconds the back end is SIGKILLed
and started again on the same sockets and images; QEMU reconnects by itself
(QEMU's vhost-user-blk inflight tracking, VHOST_USER_GET_INFLIGHT_FD), the
own front ends notice the hang-up and reconnect (``backend_gone``).

Sampled once a second: the back end's RSS (/proc/PID/status VmRSS, and
apart from it its own memory, VmRSS - RssShmem: VmRSS also counts every page
of the front ends' shared memory the back end has touched, guest RAM it
copied I/O buffers from or to, which grows with the guests' working set up
to the size of their RAM and is no leak), open fds (/proc/PID/fd), threads, and
its completed requests from the stats socket (``--stats-socket``,
docs/stats.md: the ``total`` ``buffers_pushed`` of every queue; IOPS is the
difference between samples of one process).
At the end the front ends drain, the guests are told to stop (a STOP block
written into their images), and every image is compared with what its
writer last completed: the guests' last verified pass, each own front end's
last completed write per block.

Reported per back-end incarnation (samples after the run's warm-up and
``--settle`` seconds after each start, while the process imports and the
front ends come back): RSS and fd min/max and their relative spread
(max - min) / min; errors; bytes verified.  ``--out DIR`` gets
``soak.json`` (every sample and event), ``soak.png`` (RSS, fds and IOPS over
time, kills and reconnects marked; matplotlib, the ``plot`` extra), the back
end's log and the guests' consoles.

    .venv/bin/python bench/soak.py [--minutes 10] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pyvirtio.core.errors import PeerError
from pyvirtio.devices.blk.driver import BlkDriver
from pyvirtio.devices.blk.spec import ReqType, Status

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from qemu_guest import (  # noqa: E402 - the tests' guest helpers
    Guest,
    boot,
    build_initramfs,
    verify_passes_script,
    verify_pattern,
)

BLOCK = 4096
SECTORS = BLOCK // 512
QUEUE_SIZE = 128
QD = 16
OWN_DISK = 16 << 20
GUEST_DISK = 32 << 20
REGIONS = 8                  # parallel dd's per guest pass
REGION_BLOCKS = 64           # 4 KiB blocks per region (256 KiB)
STOP_BLOCK = GUEST_DISK // BLOCK - 1
MAGIC = 0x50595649_534F414B  # "PYVISOAK"
GUEST_RAM_MIB = 256
FLAT = 0.10                  # the bound on the relative spread

def own_pattern(writer: int, sweep: int, block: int) -> bytes:
    """Front end ``writer``'s block ``block`` in sweep ``sweep`` (sweep 0: never written)."""
    if sweep == 0:
        return bytes(BLOCK)
    return struct.pack("<QQQQ", MAGIC, writer, sweep, block) * (BLOCK // 32)


# ------------------------------------------------------------ the back end
def read_stats(path: Path, timeout: float = 2.0) -> dict[str, Any] | None:
    """One snapshot from the stats socket (docs/stats.md), or None if nobody answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
        doc = json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def completed_requests(doc: dict[str, Any]) -> list[int]:
    """Per disk, the requests the back end returned over its life (``total.buffers_pushed``
    of every queue), in the order of the sockets."""
    return [sum(int(q["total"]["buffers_pushed"]) for q in dev["queues"])
            for dev in doc["devices"]]


class Backend:
    """pyvirtio-blk serving every (socket, image) pair; killed and started again."""

    def __init__(self, pairs: list[tuple[Path, Path]], stats: Path, log: Path,
                 latency_us: float) -> None:
        self.argv = [sys.executable, "-m", "pyvirtio.cli.blk", "--aio", "threads",
                     "--latency-us", f"{latency_us:g}", "--stats-socket", str(stats)]
        for sock, img in pairs:
            self.argv += ["--socket-path", str(sock), "--blk-file", str(img)]
        self.stats = stats
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, t: float) -> None:
        with self.log.open("ab") as out:  # one log across restarts
            out.write(f"--- soak: start at {t:.1f} s\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        # Ready once its own stats socket answers (the old sockets are still there).
        deadline = time.monotonic() + 30
        while True:
            doc = read_stats(self.stats, timeout=0.5)
            if doc is not None and doc.get("pid") == self.proc.pid:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pyvirtio-blk did not start (see {self.log})")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ------------------------------------------------------- pyvirtio's front ends
@dataclass
class Writer:
    """One own front end: write sweeps and read-back sweeps until told to stop."""

    index: int
    sock: Path
    blocks: int
    stop: threading.Event
    reconnect_now: threading.Event = field(default_factory=threading.Event)
    #: Per block: the sweep of the last write that completed (0: never written).
    last: list[int] = field(default_factory=list)
    completed: int = 0
    sweeps: int = 0
    bytes_read_verified: int = 0
    reconnects: int = 0          # asked for (the back end alive)
    recoveries: int = 0          # after the back end died
    errors: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.last = [0] * self.blocks
        self.thread = threading.Thread(target=self._run, name=f"writer{self.index}",
                                       daemon=True)
        self.thread.start()

    def _error(self, what: str) -> None:
        self.errors.append(f"front end {self.index}: {what}")

    def _reconnect(self, drv: BlkDriver) -> None:
        """Reconnect until it sticks (a kill may land in the middle of one)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                drv.reconnect(timeout=30)
                return
            except PeerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _run(self) -> None:
        try:
            drv = BlkDriver.connect(str(self.sock), queue_size=QUEUE_SIZE, inflight=True,
                                    timeout=60)
        except Exception as exc:
            self._error(f"connect: {exc!r}")
            return
        try:
            sweep = 0
            while not self.stop.is_set():
                sweep += 1
                if not self._sweep(drv, ReqType.OUT, sweep):
                    break
                if not self._sweep(drv, ReqType.IN, sweep):
                    break
                self.sweeps = sweep
        except Exception:
            self._error(traceback.format_exc())
        finally:
            drv.close()

    def _sweep(self, drv: BlkDriver, rtype: int, sweep: int) -> bool:
        """Every block once at queue depth QD; False if told to stop (drained first)."""
        todo = list(range(self.blocks - 1, -1, -1))
        pending: dict[int, int] = {}
        last_progress = time.monotonic()
        while todo or pending:
            if self.stop.is_set():
                todo.clear()
            while todo and len(pending) < QD:
                b = todo.pop()
                if rtype == ReqType.OUT:
                    slot = drv.submit(ReqType.OUT, b * SECTORS,
                                      data=own_pattern(self.index, sweep, b))
                else:
                    slot = drv.submit(ReqType.IN, b * SECTORS, BLOCK)
                pending[slot.index] = b
            if self.reconnect_now.is_set():
                self.reconnect_now.clear()
                self._reconnect(drv)  # with requests in flight: the back end resubmits them
                self.reconnects += 1
            if not pending:  # told to stop before anything was submitted
                continue
            try:
                finished = drv.reap(timeout=1)
            except TimeoutError:
                assert drv.frontend is not None
                if drv.frontend.backend_gone():
                    self._reconnect(drv)
                    self.recoveries += 1
                elif time.monotonic() - last_progress > 60:
                    self._error(f"no completion for 60 s, {len(pending)} in flight")
                    return False
                continue
            last_progress = time.monotonic()
            for slot in finished:
                b = pending.pop(slot.index)
                if slot.status != Status.OK:
                    self._error(f"block {b}: status {slot.status} (type {rtype})")
                elif rtype == ReqType.OUT:
                    self.last[b] = sweep
                elif bytes(slot.data[:BLOCK]) != own_pattern(self.index, self.last[b], b):
                    self._error(f"block {b}: read back differs (sweep {sweep})")
                else:
                    self.bytes_read_verified += BLOCK
                drv.release(slot)
                self.completed += 1
        return not self.stop.is_set()


# ----------------------------------------------------------------- the run
@dataclass
class Sample:
    t: float
    pid: int
    incarnation: int
    rss_kib: int
    own_kib: int                     # VmRSS - RssShmem: without the front ends' shared memory
    shmem_kib: int                   # RssShmem: mostly guest RAM mapped from the front ends
    fds: int
    threads: int
    backend_requests: list[int] | None  # per disk, since the back end started (stats socket)
    frontend_requests: int           # the own front ends' completions since the run started
    iops: float | None = None        # the back end's (4 disks), since the previous sample
    guest_iops: float | None = None  # the part the two guests asked for


def proc_sample(pid: int) -> tuple[int, int, int, int, int] | None:
    """(VmRSS, VmRSS - RssShmem, RssShmem (KiB), open fds, threads) of ``pid``, or None if
    it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie
        return None
    rss, shmem = int(fields["VmRSS"].split()[0]), int(fields["RssShmem"].split()[0])
    return rss, rss - shmem, shmem, fds, int(fields["Threads"])


def shared_mappings(pid: int) -> dict[str, int]:
    """KiB resident per shared-memory mapping (/proc/PID/smaps: memfds, by name)."""
    out: dict[str, int] = {}
    name = ""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            name = " ".join(head[5:]) if len(head) > 5 else ""
        elif head and head[0] == "Rss:" and "memfd:" in name:
            out[name] = out.get(name, 0) + int(head[1])
    return out


def spread(values: list[int]) -> float:
    """(max - min) / min; 0 for no values."""
    if not values:
        return 0.0
    low, high = min(values), max(values)
    return (high - low) / low if low else 0.0


def summarize(samples: list[Sample], starts: list[float], warmup: float,
              settle: float) -> list[dict[str, Any]]:
    """Per incarnation: the samples after the warm-up and ``settle`` s after its start."""
    out = []
    for inc, start in enumerate(starts):
        mine = [s for s in samples if s.incarnation == inc]
        kept = [s for s in mine if s.t >= warmup and s.t >= start + settle]
        rss = [s.rss_kib for s in kept]
        own = [s.own_kib for s in kept]
        fds = [s.fds for s in kept]
        iops = [s.iops for s in mine if s.iops is not None]
        row: dict[str, Any] = {"incarnation": inc, "pid": mine[0].pid if mine else None,
                               "start_s": round(start, 1), "samples": len(mine),
                               "samples_after_warmup": len(kept),
                               "mean_iops": sum(iops) / len(iops) if iops else None}
        if kept:
            row.update(rss_kib_min=min(rss), rss_kib_max=max(rss), rss_spread=spread(rss),
                   own_kib_min=min(own), own_kib_max=max(own), own_spread=spread(own),
                   shmem_kib_max=max(s.shmem_kib for s in kept),
                       fds_min=min(fds), fds_max=max(fds), fds_spread=spread(fds),
                       threads_max=max(s.threads for s in kept))
        out.append(row)
    return out


def plot(path: Path, samples: list[Sample], kills: list[float], reconnects: list[float],
         warmup: float, fe_iops: list[tuple[float, float]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(11, 8))
    axes[0].plot(t, [s.rss_kib / 1024 for s in samples], ".", ms=2, label="VmRSS")
    axes[0].plot(t, [s.own_kib / 1024 for s in samples], ".", ms=2,
                 label="VmRSS - RssShmem (its own memory)")
    axes[0].plot(t, [s.shmem_kib / 1024 for s in samples], ".", ms=2,
                 label="RssShmem (guest RAM it touched)")
    axes[0].set_ylabel("RSS MiB")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].plot(t, [s.fds for s in samples], ".", ms=2)
    axes[1].set_ylabel("open fds")
    axes[2].plot([s.t for s in samples if s.iops is not None],
                 [s.iops for s in samples if s.iops is not None], lw=0.8,
                 label="back end (stats socket, all 4 disks)")
    axes[2].plot([x for x, _ in fe_iops], [y for _, y in fe_iops], lw=0.8,
                 label="pyvirtio front ends (their completions)")
    axes[2].plot([s.t for s in samples if s.guest_iops is not None],
                 [s.guest_iops for s in samples if s.guest_iops is not None], lw=0.8,
                 label="the two guests (stats socket)")
    axes[2].set_ylabel("IOPS")
    axes[2].legend(loc="upper right", fontsize=8)
    axes[2].set_xlabel("s")
    for ax in axes:
        ax.axvspan(0, warmup, color="0.9")
        for k in kills:
            ax.axvline(k, color="red", lw=0.8)
        for r in reconnects:
            ax.axvline(r, color="0.5", lw=0.5, ls=":")
        ax.set_ylim(bottom=0)
    axes[0].set_title("pyvirtio-blk soak: 2 Linux guests + 2 pyvirtio front ends; "
                      "red: SIGKILL + restart, dotted: a front end reconnects, grey: warm-up",
                      fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verify_guest(img: Path, guest: int, last_pass: int) -> tuple[int, list[str]]:
    data = img.read_bytes()
    bad = []
    for i in range(REGIONS):
        off = i * REGION_BLOCKS * BLOCK
        want = verify_pattern(f"G{guest}-", last_pass, i, REGION_BLOCKS)
        if data[off:off + REGION_BLOCKS * BLOCK] != want:
            bad.append(f"guest {guest}: image region {i} is not pass {last_pass}'s")
    return REGIONS * REGION_BLOCKS * BLOCK, bad


def verify_writer(img: Path, w: Writer) -> tuple[int, list[str]]:
    data = img.read_bytes()
    bad = [f"front end {w.index}: image block {b} is not sweep {w.last[b]}'s"
           for b in range(w.blocks)
           if data[b * BLOCK:(b + 1) * BLOCK] != own_pattern(w.index, w.last[b], b)]
    return w.blocks * BLOCK, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the run (10)")
    ap.add_argument("--out", type=Path, help="directory for soak.json, soak.png and the logs "
                                             "(default: a new one under /tmp)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--reconnect-every", type=float, default=30.0, metavar="S",
                    help="an own front end reconnects every S s, in turn (30)")
    ap.add_argument("--kill-every", type=float, default=120.0, metavar="S",
                    help="SIGKILL and restart the back end every S s (120)")
    ap.add_argument("--warmup", type=float, default=60.0, metavar="S",
                    help="samples before this are not judged (60)")
    ap.add_argument("--settle", type=float, default=10.0, metavar="S",
                    help="nor those of the first S s of each back-end start (10)")
    ap.add_argument("--latency-us", type=float, default=1000.0, metavar="US",
                    help="every read and write of the back end takes this long (1000)")
    args = ap.parse_args(argv)
    out: Path = args.out or Path(f"/tmp/pyvirtio-soak-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60
    err = Console(stderr=True)

    guest_imgs = [out / f"guest{g}.img" for g in range(2)]
    own_imgs = [out / f"own{w}.img" for w in range(2)]
    for img, size in [(i, GUEST_DISK) for i in guest_imgs] + [(i, OWN_DISK) for i in own_imgs]:
        with img.open("wb") as f:
            f.truncate(size)
    socks = [out / f"{img.stem}.sock" for img in guest_imgs + own_imgs]
    backend = Backend(list(zip(socks, guest_imgs + own_imgs, strict=True)), out / "stats.sock",
                      out / "pyvirtio-blk.log", args.latency_us)
    initramfs = build_initramfs(out / "initramfs", ("virtio_pci", "virtio_blk"))

    t0 = time.monotonic()
    starts = [0.0]
    backend.start(0.0)
    guests: list[Guest] = []
    for g in range(2):
        script = verify_passes_script(REGIONS, REGION_BLOCKS, STOP_BLOCK, tag=f"G{g}-")
        guests.append(boot(initramfs, script, timeout=duration + 600, mem_mb=GUEST_RAM_MIB,
                           qemu_args=[
                               "-chardev", f"socket,id=blk0,path={socks[g]},reconnect=1",
                               "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"]))
    stop = threading.Event()
    writers = [Writer(w, socks[2 + w], OWN_DISK // BLOCK, stop) for w in range(2)]
    for w in writers:
        w.start()
    err.print(f"soak: {args.minutes:g} min, out {out}; back end pid {backend.pid}")

    samples: list[Sample] = []
    kills: list[float] = []
    reconnects: list[float] = []
    fe_iops: list[tuple[float, float]] = []
    next_reconnect, next_kill, turn = args.reconnect_every, args.kill_every, 0
    prev: Sample | None = None
    prev_fe: tuple[float, int] | None = None
    shared: dict[str, int] = {}
    try:
        while (now := time.monotonic() - t0) < duration:
            if now >= next_kill:
                backend.kill()
                kills.append(now)
                starts.append(time.monotonic() - t0)
                backend.start(starts[-1])
                err.print(f"{now:6.1f} s: SIGKILL, restarted as pid {backend.pid}")
                next_kill += args.kill_every
            if now >= next_reconnect:
                writers[turn].reconnect_now.set()
                reconnects.append(now)
                turn = 1 - turn
                next_reconnect += args.reconnect_every
            got = proc_sample(backend.pid)
            doc = read_stats(backend.stats)
            t = time.monotonic() - t0
            fe_total = sum(w.completed for w in writers)
            if prev_fe is not None and t > prev_fe[0]:
                fe_iops.append((t, (fe_total - prev_fe[1]) / (t - prev_fe[0])))
            prev_fe = (t, fe_total)
            if got is not None:
                s = Sample(t, backend.pid, len(starts) - 1, *got,
                           completed_requests(doc) if doc and doc.get("pid") == backend.pid
                           else None, fe_total)
                if (prev is not None and prev.pid == s.pid and prev.backend_requests is not None
                        and s.backend_requests is not None):
                    now_req, old_req = s.backend_requests, prev.backend_requests
                    s.iops = (sum(now_req) - sum(old_req)) / (s.t - prev.t)
                    s.guest_iops = (sum(now_req[:2]) - sum(old_req[:2])) / (s.t - prev.t)
                samples.append(s)
                prev = s
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - t)))
        # Where the shared part of its RSS lies, while every front end is still there.
        shared = shared_mappings(backend.pid)
        err.print("soak: stopping the front ends and the guests")
        stop.set()
        for w in writers:
            assert w.thread is not None
            w.thread.join(120)
            if w.thread.is_alive():
                w.errors.append(f"front end {w.index}: did not stop within 120 s")
        for img in guest_imgs:
            with img.open("r+b") as fh:  # the back end reads the image through the page cache
                fh.seek(STOP_BLOCK * BLOCK)
                fh.write(b"STOP\n".ljust(BLOCK, b"\0"))
        results = []
        for guest in guests:
            with contextlib.suppress(AssertionError):  # judged below from the log
                guest.wait_for("ALL-OK")
            results.append(guest.finish())
    finally:
        stop.set()
        for guest in guests:
            guest.kill()
        rc = backend.stop()
    end = time.monotonic() - t0

    errors: list[str] = []
    if rc != 0:
        errors.append(f"pyvirtio-blk exited with {rc} on SIGTERM")
    verified = 0
    passes = []
    for g, (img, res) in enumerate(zip(guest_imgs, results, strict=True)):
        (out / f"guest{g}.console.log").write_text(res.log)
        lines = res.log.splitlines()
        done = [int(line.split()[-1]) for line in lines if line.startswith("PASS-DONE")]
        passes.append(len(done))
        errors += [f"guest {g}: {line}" for line in lines if line.startswith("BAD-")]
        if res.rc != 0 or "ALL-OK" not in res.log:
            errors.append(f"guest {g}: workload rc {res.rc}, see guest{g}.console.log")
        if done != list(range(1, len(done) + 1)) or not done:
            errors.append(f"guest {g}: passes {done[:3]}...{done[-3:]}")
        else:
            n, bad = verify_guest(img, g, done[-1])
            verified += n
            errors += bad
    for w, img in zip(writers, own_imgs, strict=True):
        errors += w.errors
        n, bad = verify_writer(img, w)
        verified += n
        errors += bad[:20] + ([f"... {len(bad) - 20} more"] if len(bad) > 20 else [])
    log_text = backend.log.read_text(errors="replace")
    # Rings that started with requests to resubmit (after a kill or a reconnect), and how many.
    resubmitted = [n for n in (int(line.split("resubmitting ")[1].split()[0])
                               for line in log_text.splitlines() if "resubmitting" in line) if n]
    rows = summarize(samples, starts, args.warmup, args.settle)
    kept = [s for s in samples if s.t >= args.warmup
            and s.t >= starts[s.incarnation] + args.settle]
    overall: dict[str, Any] = {"rss_kib_min": min(s.rss_kib for s in kept) if kept else None,
               "rss_kib_max": max(s.rss_kib for s in kept) if kept else None,
               "rss_spread": spread([s.rss_kib for s in kept]),
               "own_kib_min": min(s.own_kib for s in kept) if kept else None,
               "own_kib_max": max(s.own_kib for s in kept) if kept else None,
               "own_spread": spread([s.own_kib for s in kept]),
               "fds_min": min(s.fds for s in kept) if kept else None,
               "fds_max": max(s.fds for s in kept) if kept else None,
               "fds_spread": spread([s.fds for s in kept])}

    def within(key: str) -> bool:
        return bool(kept) and overall[key] <= FLAT and all(r.get(key, 0) <= FLAT for r in rows)

    # Judged: the back end's own memory and its fds.  VmRSS is reported beside them: it
    # also counts the guest RAM the back end touched (RssShmem), which is not the back
    # end's to leak (it stops at the size of the guests' RAM).
    flat = within("own_spread") and within("fds_spread")
    summary: dict[str, Any] = {
        "minutes": args.minutes, "seconds": round(end, 1), "latency_us": args.latency_us,
        "reconnect_every_s": args.reconnect_every, "kill_every_s": args.kill_every,
        "warmup_s": args.warmup, "settle_s": args.settle, "cpus": os.cpu_count(),
        "pure_python": os.environ.get("PYVIRTIO_PURE_PYTHON") == "1",
        "kills": [round(k, 1) for k in kills], "reconnects": [round(r, 1) for r in reconnects],
        "incarnations": rows, "overall_after_warmup": overall, "flat_within_10pct": flat,
        "vmrss_flat_within_10pct": within("rss_spread"),
        "memfd_rss_kib_at_end": shared, "guest_ram_mib": GUEST_RAM_MIB,
        "errors": errors, "bytes_verified": verified, "guest_passes": passes,
        "frontend_sweeps": [w.sweeps for w in writers],
        "frontend_requests": [w.completed for w in writers],
        "frontend_bytes_read_verified": sum(w.bytes_read_verified for w in writers),
        "frontend_reconnects": [w.reconnects for w in writers],
        "frontend_recoveries": [w.recoveries for w in writers],
        "resubmitted_at_ring_starts": resubmitted,
        "connections_logged": log_text.count("front end connected"),
        "drops_logged": log_text.count("dropping front end"),
    }
    (out / "soak.json").write_text(json.dumps(
        {**summary, "samples": [vars(s) for s in samples], "frontend_iops": fe_iops},
        indent=1))
    png = out / "soak.png"
    try:
        plot(png, samples, kills, reconnects, args.warmup, fe_iops)
    except ImportError:
        err.print("no plot: pip install 'pyvirtio[plot]'")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        table = Table(title=f"pyvirtio-blk soak, {end / 60:.1f} min, 2 TCG guests + 2 pyvirtio "
                            f"front ends, --aio threads --latency-us {args.latency_us:g}, "
                            f"{len(kills)} SIGKILLs, {len(reconnects)} reconnects, "
                            f"{os.cpu_count()} CPUs; after {args.warmup:g} s warm-up and "
                            f"{args.settle:g} s per start")
        for col in ("start s", "pid", "samples", "RSS MiB min", "max", "spread",
                    "own MiB min", "max", "spread", "fds min", "max", "spread", "threads max",
                    "mean IOPS"):
            table.add_column(col, justify="right")
        for r in rows:
            if "rss_kib_min" not in r:
                table.add_row(f"{r['start_s']:.0f}", str(r["pid"]), str(r["samples"]),
                              *["(warm-up)"] + [""] * 9, "")
                continue
            table.add_row(
                f"{r['start_s']:.0f}", str(r["pid"]), str(r["samples_after_warmup"]),
                f"{r['rss_kib_min'] / 1024:.1f}", f"{r['rss_kib_max'] / 1024:.1f}",
                f"{100 * r['rss_spread']:.1f} %", f"{r['own_kib_min'] / 1024:.1f}",
                f"{r['own_kib_max'] / 1024:.1f}", f"{100 * r['own_spread']:.1f} %",
                str(r["fds_min"]), str(r["fds_max"]),
                f"{100 * r['fds_spread']:.1f} %", str(r["threads_max"]),
                f"{r['mean_iops']:,.0f}" if r["mean_iops"] is not None else "")
        if kept:
            table.add_row("all", "", str(len(kept)), f"{overall['rss_kib_min'] / 1024:.1f}",
                          f"{overall['rss_kib_max'] / 1024:.1f}",
                          f"{100 * overall['rss_spread']:.1f} %",
                          f"{overall['own_kib_min'] / 1024:.1f}",
                          f"{overall['own_kib_max'] / 1024:.1f}",
                          f"{100 * overall['own_spread']:.1f} %", str(overall["fds_min"]),
                          str(overall["fds_max"]), f"{100 * overall['fds_spread']:.1f} %",
                          "", "")
        console = Console(width=max(Console().width, 170))
        console.print(table)
        console.print(
            f"errors: {len(errors)}; bytes verified in the images: {verified:,}; "
            f"read back by the front ends: {summary['frontend_bytes_read_verified']:,}; "
            f"guest passes {passes}; front-end sweeps {summary['frontend_sweeps']}; "
            f"reconnects {summary['frontend_reconnects']}, after kills "
            f"{summary['frontend_recoveries']}; resubmitted at ring starts {resubmitted}; "
            f"own memory and fds flat within 10 %: {flat}; VmRSS: "
            f"{within('rss_spread')}; shared memory resident at the end (KiB): {shared}")
        for e in errors[:30]:
            console.print(f"  [red]{e}[/red]")
        console.print(f"{out / 'soak.json'}, {png}, {backend.log}")
    return 0 if flat and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
