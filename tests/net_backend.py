"""pyvirtio-net as a subprocess for the back-end tests: start it, read its per-port counters.

The back end runs as ``python -m pyvirtio.cli.net`` (the module of the
``pyvirtio-net`` console script) and logs, per port, on SIGUSR1 and once
more when SIGTERM ends it::

    port PATH: tx N frames B bytes, rx N frames B bytes, drops {...} | none

(src/pyvirtio/cli/net.py ``report``).  :class:`NetBackend` streams its log
in, :meth:`NetBackend.counters` asks for a fresh report and
:meth:`NetBackend.stop` returns the final one.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_REPORT = re.compile(r"port (\S+): tx (\d+) frames (\d+) bytes, rx (\d+) frames (\d+) bytes, "
                     r"drops (none|\{.*\})$")


@dataclass(frozen=True)
class PortCounters:
    tx_frames: int
    tx_bytes: int
    rx_frames: int
    rx_bytes: int
    drops: dict[str, int] = field(default_factory=dict)


def parse_report(line: str) -> tuple[str, PortCounters] | None:
    m = _REPORT.search(line)
    if m is None:
        return None
    drops = {} if m.group(6) == "none" else ast.literal_eval(m.group(6))
    assert isinstance(drops, dict)
    return m.group(1), PortCounters(int(m.group(2)), int(m.group(3)), int(m.group(4)),
                                    int(m.group(5)), drops)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"pyvirtio-net exited with {proc.returncode} before "
                                 f"creating {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no socket {path} after {timeout} s")
        time.sleep(0.05)


class NetBackend:
    """A running pyvirtio-net serving ``sockets`` with the packet back end ``kind``.

    ``kind`` is e.g. ``["--loopback"]``, ``["--switch", "sw0"]`` or
    ``["--tap", "tap0"]``; ``prefix`` goes before the interpreter (``ip netns
    exec NS``).
    """

    def __init__(self, sockets: Sequence[Path], kind: Sequence[str], *,
                 extra: Sequence[str] = (), prefix: Sequence[str] = ()) -> None:
        self.sockets = list(sockets)
        argv = [*prefix, sys.executable, "-m", "pyvirtio.cli.net", *kind, *extra]
        for sock in self.sockets:
            argv += ["--socket-path", str(sock)]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        for sock in self.sockets:
            wait_for_socket(sock, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def count(self, text: str) -> int:
        """Log lines containing ``text`` so far."""
        with self._cond:
            return sum(text in line for line in self.lines)

    def wait_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``count`` log lines contain ``text``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(text in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"pyvirtio-net did not log {text!r} {count} time(s):"
                                         f"\n{self.log}")
                self._cond.wait(left)

    def _reports_since(self, start: int) -> dict[str, PortCounters]:
        out: dict[str, PortCounters] = {}
        for line in self.lines[start:]:
            parsed = parse_report(line)
            if parsed is not None:
                out[parsed[0]] = parsed[1]
        return out

    def counters(self, timeout: float = 30.0) -> dict[str, PortCounters]:
        """SIGUSR1 and the report it logs: socket path -> counters."""
        with self._cond:
            start = len(self.lines)
        os.kill(self.proc.pid, signal.SIGUSR1)
        return self._wait_reports(start, timeout)

    def _wait_reports(self, start: int, timeout: float) -> dict[str, PortCounters]:
        deadline = time.monotonic() + timeout
        want = {str(s) for s in self.sockets}
        with self._cond:
            while True:
                got = self._reports_since(start)
                if want <= got.keys():
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no counters for every port:\n{self.log}")
                self._cond.wait(left)

    def stop(self, timeout: float = 30.0) -> dict[str, PortCounters]:
        """SIGTERM; the exit status must be 0; the counters it logs at exit."""
        with self._cond:
            start = len(self.lines)
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"pyvirtio-net ignored SIGTERM:\n{self.log}") from None
        self._reader.join(10)
        assert rc == 0, f"pyvirtio-net exited with {rc}:\n{self.log}"
        return self._wait_reports(start, 0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
