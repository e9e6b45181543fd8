"""Judging a back end after a hostile case: verdicts, memory, process state.

* memory: the back end may change only the used rings and the buffers the
  driver made device-writable (VIRTIO 1.2 §2.7.4, §2.7.8); every other
  byte of guest memory must still hold what the driver left there (the
  canary, or what it wrote itself);
* the process (with its pid): alive or gone (``/proc/PID/stat`` state), CPU
  time spent over an idle window (utime + stime, proc(5)), open file
  descriptors (``/proc/PID/fd``);
* the socket: which process listens on it (``/proc/net/unix``), so a back
  end restarted by its shell command can be watched again.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import socket
import time
from collections.abc import Iterable

from pyvirtio.torture.harness import Conn

__all__ = ["Verdict", "alive", "corruption", "cpu_share", "fd_count", "listener_pid",
           "socket_accepts"]


class Verdict(enum.Enum):
    REJECTED = "REJECTED"  # the case cost at most its own connection or ring
    WEDGED = "WEDGED"  # alive, but no longer serves a new front end, or spins
    CRASHED = "CRASHED"  # the process is gone
    CORRUPTED = "CORRUPTED"  # guest memory outside what the device may write changed
    LEAKED = "LEAKED"  # file descriptors that outlived the connection


#: The back end counts as spinning above this share of one CPU while idle.
SPIN_SHARE = 0.8


def _ranges(a: mmap.mmap, b: bytearray, base: int) -> list[tuple[int, int]]:
    """Differing byte ranges [lo, hi) in guest addresses (compared chunk by chunk)."""
    out: list[tuple[int, int]] = []
    step = 1 << 16
    for off in range(0, len(b), step):
        x, y = a[off:off + step], b[off:off + step]  # bytes: compared by memcmp
        if x == y:
            continue
        i = 0
        while i < len(x):
            if x[i] != y[i]:
                j = i
                while j < len(x) and x[j] != y[j]:
                    j += 1
                if out and out[-1][1] == base + off + i:
                    out[-1] = (out[-1][0], base + off + j)
                else:
                    out.append((base + off + i, base + off + j))
                i = j
            else:
                i += 1
    return out


def _outside(changed: Iterable[tuple[int, int]],
             allowed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``changed`` not covered by any allowed range."""
    spans = sorted((a, a + n) for a, n in allowed)
    bad: list[tuple[int, int]] = []
    for lo, hi in changed:
        cur = lo
        for a, b in spans:
            if b <= cur or a >= hi:
                continue
            if a > cur:
                bad.append((cur, a))
            cur = max(cur, b)
            if cur >= hi:
                break
        if cur < hi:
            bad.append((cur, hi))
    return bad


def corruption(c: Conn) -> str | None:
    """What changed where the back end may not write, in words; None if nothing did."""
    bad: list[tuple[int, int]] = []
    for (gpa, mm), (_g, shadow) in zip(c.kept, c.shadow, strict=True):
        bad += _outside(_ranges(mm, shadow, gpa), c.writable)
    if not bad:
        return None
    total = sum(hi - lo for lo, hi in bad)
    where = ", ".join(f"{lo:#x}+{hi - lo}" for lo, hi in bad[:4])
    more = f" and {len(bad) - 4} more ranges" if len(bad) > 4 else ""
    return f"{total} guest bytes changed outside the used ring and writable buffers: {where}{more}"


# ------------------------------------------------------------------ process
def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def cpu_share(pid: int, window: float) -> float | None:
    """Share of one CPU the process used over ``window`` seconds (None: it is gone)."""
    hz = os.sysconf("SC_CLK_TCK")
    t0, c0 = time.monotonic(), _cpu_ticks(pid)
    time.sleep(window)
    t1, c1 = time.monotonic(), _cpu_ticks(pid)
    if c0 is None or c1 is None:
        return None
    return (c1 - c0) / hz / (t1 - t0)


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def socket_accepts(path: str) -> bool | None:
    """True if something listens on ``path``; False if nothing does (a dead back end's
    socket refuses); None if it cannot be told (the connect did not finish)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        return False if exc.errno in (errno.ECONNREFUSED, errno.ENOENT) else None
    finally:
        s.close()
    return True


def listener_pid(path: str) -> int | None:
    """The process listening on Unix socket ``path`` (via its inode), if we may see it."""
    inodes = set()
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                # Flags 00010000 is __SO_ACCEPTCON: a listening socket.
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                    inodes.add(parts[6])
    except OSError:
        return None
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                    return int(entry)
        except OSError:
            continue
    return None
