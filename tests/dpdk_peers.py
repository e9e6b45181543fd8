"""DPDK testpmd (22.11, package dpdk-dev) as a peer: start it with any vdevs, read its counters.

:class:`Testpmd` runs ``dpdk-testpmd`` directly (scripts/peers/testpmd-vhost.sh
runs one vdev; a test may need two, or a ``net_vhost`` and options of its
own) with what every test here wants: no hugepages (``--no-huge -m 512``),
no PCI scan, a unique ``--file-prefix`` (several testpmds may run at once),
two lcores with the main one idle (``-l 0,1 --main-lcore 1``: forwarding
spins on lcore 0; the main lcore sleeps between ``--stats-period``
prints), auto-start (``-a``) and a forwarding mode.  Its console is streamed
in by a thread:

* :meth:`Testpmd.nic_stats` — the latest periodic "NIC statistics for port N"
  (the PMD's own counters) per port, and :meth:`Testpmd.wait_rx` to wait
  until a port has received a number of packets (work done, not time spent);
* :meth:`Testpmd.stop` — SIGINT, which makes testpmd stop forwarding and
  print "Forward statistics for port N" (what the forwarding engine
  received, transmitted and dropped per port, accumulated over the run)
  before it closes its ports and exits; those blocks are returned per port.

Nothing here is specific to one vdev type: ``virtio_user`` (testpmd is the
front end, a client of the back end's socket) and ``net_vhost`` (testpmd is
the back end) both work.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TESTPMD = "dpdk-testpmd"
#: Packets per burst (testpmd's default, named so tests can reason about what is in flight).
BURST = 32

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NIC = re.compile(r"NIC statistics for port (\d+)")
_FWD = re.compile(r"Forward statistics for port (\d+)")
_RX = re.compile(r"RX-packets:\s*(\d+)\s+RX-(?:dropped|missed):\s*(\d+)")
_TX = re.compile(r"TX-packets:\s*(\d+)\s+TX-(?:dropped|errors):\s*(\d+)")
_prefixes = itertools.count()


@dataclass(frozen=True)
class PortStats:
    """One port's counters: "dropped" is RX-dropped/TX-dropped in forward statistics,
    RX-missed/TX-errors in NIC statistics."""

    rx_packets: int
    rx_dropped: int
    tx_packets: int
    tx_dropped: int


def _parse_blocks(lines: Sequence[str], header: re.Pattern[str]) -> dict[int, PortStats]:
    """The last block per port that starts with ``header`` and has RX- and TX- lines."""
    out: dict[int, PortStats] = {}
    port: int | None = None
    rx: tuple[int, int] | None = None
    for line in lines:
        if m := header.search(line):
            port, rx = int(m.group(1)), None
        elif port is None:
            continue
        elif (m := _RX.search(line)) and rx is None:
            rx = (int(m.group(1)), int(m.group(2)))
        elif (m := _TX.search(line)) and rx is not None:
            out[port] = PortStats(rx[0], rx[1], int(m.group(1)), int(m.group(2)))
            port = rx = None
    return out


def parse_forward_stats(text: str) -> dict[int, PortStats]:
    """Per-port "Forward statistics" blocks of a testpmd log (accumulated over the run)."""
    return _parse_blocks(_ANSI.sub("", text).splitlines(), _FWD)


class Testpmd:
    """One running ``dpdk-testpmd`` with its console read line by line."""

    __test__ = False  # a name pytest would otherwise try to collect

    def __init__(self, vdevs: Sequence[str], *, forward_mode: str = "io",
                 tx_first: bool = False, burst: int = BURST, stats_period: int = 1,
                 queues: int = 1, lcores: str = "0,1", main_lcore: int = 1,
                 eal_extra: Sequence[str] = (), app_extra: Sequence[str] = (),
                 log: Path | None = None) -> None:
        if not vdevs:
            raise ValueError("testpmd needs at least one --vdev here (there is no PCI)")
        if stats_period < 1:
            # Without it testpmd waits for Enter on stdin and ends at once on /dev/null.
            raise ValueError("stats_period must be >= 1")
        self.prefix = f"pyvirtio-tp-{os.getpid()}-{next(_prefixes)}"
        eal = ["-l", lcores, "--main-lcore", str(main_lcore), "--no-pci", "--no-huge",
               "-m", "512", "--file-prefix", self.prefix, *eal_extra]
        for vdev in vdevs:
            eal += ["--vdev", vdev]
        app = ["-a", f"--stats-period={stats_period}", f"--forward-mode={forward_mode}",
               f"--burst={burst}", "--nb-cores=1", f"--rxq={queues}", f"--txq={queues}",
               "--total-num-mbufs=16384", *app_extra]
        if tx_first:
            app.append("--tx-first")
        self.argv = [TESTPMD, *eal, "--", *app]
        self.log_path = log
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._ended = False
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w") if self.log_path else open(os.devnull, "w") as log:
            for raw in self.proc.stdout:
                text = _ANSI.sub("", raw.decode(errors="replace")).rstrip("\r\n")
                log.write(text + "\n")
                with self._cond:
                    self.lines.append(text)
                    self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        """The first console line matching the regex ``pattern``; AssertionError with the
        log if testpmd ends or ``timeout`` passes first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    why = "ended" if self._ended else f"nothing after {timeout} s"
                    raise AssertionError(f"testpmd {why} without /{pattern}/:\n"
                                         + "\n".join(self.lines[-60:]))
                self._cond.wait(left)

    def nic_stats(self) -> dict[int, PortStats]:
        """The latest periodic NIC statistics per port (empty before the first print)."""
        with self._cond:
            return _parse_blocks(self.lines, _NIC)

    def wait_rx(self, port: int, packets: int, timeout: float = 60.0) -> PortStats:
        """Wait until the periodic statistics show ``port`` received ``packets`` or more."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                stats = _parse_blocks(self.lines, _NIC).get(port)
                if stats is not None and stats.rx_packets >= packets:
                    return stats
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    raise AssertionError(f"port {port} of testpmd received {stats} "
                                         f"(wanted {packets} packets):\n"
                                         + "\n".join(self.lines[-60:]))
                self._cond.wait(left)

    def stop(self, timeout: float = 30.0) -> dict[int, PortStats]:
        """SIGINT, wait for the exit; the accumulated forward statistics per port."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"testpmd did not stop on SIGINT:\n{self.log}") from None
        self._reader.join(10)
        self._cleanup()
        assert rc == 0, f"testpmd exited with {rc}:\n{self.log}"
        stats = parse_forward_stats(self.log)
        assert stats, f"no forward statistics in testpmd's output:\n{self.log}"
        return stats

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        # EAL's runtime directory (config, fbarray files, mp socket) outlives the process.
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)

    def __enter__(self) -> Testpmd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
