"""Running the cases against one back end, one connection each, and judging each.

Per case: connect and prove the rings with a good request (on canary-filled
memory), run the case, watch the back end for ``settle`` seconds (or until it
answers, breaks the queue, or hangs up), disconnect, then judge: the process
(:func:`~pyvirtio.torture.judge.alive`), a new connection doing good I/O,
guest memory (:func:`~pyvirtio.torture.judge.corruption`), CPU while idle and
open fds (with the pid).  A back end that died (or wedged, when its pid is
known) is started again with ``restart_cmd`` before the next case.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvirtio.core.errors import PeerError
from pyvirtio.core.spec import Status
from pyvirtio.torture.cases import Case
from pyvirtio.torture.harness import Conn, close_conn, open_conn, profile_for, release
from pyvirtio.torture.judge import (
    SPIN_SHARE,
    Verdict,
    alive,
    corruption,
    cpu_share,
    fd_count,
    listener_pid,
    socket_accepts,
)
from pyvirtio.transports.vhost_user.frontend import VhostUserBusy

__all__ = ["Result", "Torture", "unjudged"]


@dataclass
class Result:
    case: str
    verdict: Verdict
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"case": self.case, "verdict": self.verdict.value, "detail": self.detail}


def unjudged(pid: int | None) -> list[str]:
    """What cannot be judged without the back end's pid, in words (empty with it)."""
    if pid is not None:
        return []
    return ["LEAKED (open fds are read from /proc/PID/fd)",
            "WEDGED by spinning (CPU time is read from /proc/PID/stat)",
            "CRASHED only as 'nothing listens on the socket any more'"]


@dataclass
class Torture:
    path: str
    device: str = "blk"
    pid: int | None = None
    restart_cmd: str | None = None
    timeout: float = 5.0
    settle: float = 0.5
    cpu_window: float = 0.25
    #: Called with (index, total, case name, verdict or None) as cases start and end.
    progress: Callable[[int, int, str, Verdict | None], None] | None = None
    restarted: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # ------------------------------------------------------------ the back end
    def _alive(self) -> bool:
        if self.pid is not None:
            return alive(self.pid)
        return socket_accepts(self.path) is not False

    def restart(self) -> str:
        """Start the back end again with the restart command; wait for its socket."""
        assert self.restart_cmd is not None
        if self.pid is not None and alive(self.pid):
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)  # wedged: it would not serve again
            deadline = time.monotonic() + self.timeout
            while alive(self.pid) and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.01)
        self._reap()
        # Its own session: the back end outlives this tool, as the original did.
        proc = subprocess.Popen(self.restart_cmd, shell=True, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.restarted.append(proc)
        deadline = time.monotonic() + max(self.timeout, 30.0)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"the restart command exited with status {proc.returncode}"
            if socket_accepts(self.path):
                if self.pid is not None:
                    self.pid = listener_pid(self.path) or proc.pid
                return f"restarted (pid {self.pid if self.pid is not None else proc.pid})"
            time.sleep(0.05)
        return "the restarted back end did not listen in time"

    def _reap(self) -> None:
        for proc in self.restarted:
            proc.poll()

    def good_connection(self) -> str | None:
        """Why a new front end cannot do good I/O now (None: it can)."""
        deadline = time.monotonic() + self.timeout
        profile = profile_for(self.device)
        while True:
            try:
                c = open_conn(self.path, profile, timeout=self.timeout, hostile=False)
            except VhostUserBusy as exc:
                # One front end at a time: the last one may not be let go of yet.
                if time.monotonic() >= deadline:
                    return str(exc)
                time.sleep(0.02)
                continue
            except (PeerError, OSError) as exc:
                return str(exc) or type(exc).__name__
            close_conn(c)
            release(c)
            return None

    # ------------------------------------------------------------------- cases
    def _watch(self, c: Conn, case: Case) -> None:
        """Until the back end used the ring, broke it, hung up, or ``settle`` passed."""
        ring = c.ring()
        deadline = time.monotonic() + self.settle
        status_ok = case.side == "ring"
        while time.monotonic() < deadline:
            if c.used_idx() != ring.used_seen:
                time.sleep(0.05)  # let it finish what it is writing
                return
            if c.fe.hung_up():
                if not any("closed the connection" in n for n in c.notes):
                    c.notes.append("the back end closed the connection")
                return
            if status_ok:
                try:
                    status = c.status()
                except PeerError:
                    status_ok = False
                    status = None
                if status is not None and status & Status.NEEDS_RESET:
                    c.notes.append("NEEDS_RESET")
                    return
            time.sleep(0.02)

    def run_case(self, case: Case) -> Result:
        if not self._alive():
            if self.restart_cmd is None:
                return Result(case.name, Verdict.CRASHED, "the back end was gone before the case")
            self.restart()
        base_fds = self._idle_fds()
        try:
            c = open_conn(self.path, profile_for(self.device), two_regions=case.two_regions,
                          timeout=self.timeout)
        except (PeerError, OSError) as exc:
            verdict = Verdict.WEDGED if self._alive() else Verdict.CRASHED
            return self._after(Result(case.name, verdict,
                                      f"before the case, a good request failed: {exc}"))
        try:
            c.arm()
            try:
                case.run(c)
            except (PeerError, OSError) as exc:
                c.notes.append(f"connection: {exc}")
            self._watch(c, case)
            close_conn(c)
            return self._after(self._judge(case, c, base_fds))
        finally:
            close_conn(c)
            release(c)

    def _judge(self, case: Case, c: Conn, base_fds: int | None) -> Result:
        findings: list[tuple[Verdict, str]] = []
        broken = self.good_connection()
        gone = not self._alive()
        if gone:
            findings.append((Verdict.CRASHED, "the back end died"))
        elif broken is not None:
            findings.append((Verdict.WEDGED, f"a new front end failed: {broken}"))
        bad = corruption(c)
        if bad is not None:
            findings.append((Verdict.CORRUPTED, bad))
        if not gone and self.pid is not None:
            share = cpu_share(self.pid, self.cpu_window)
            if share is not None and share >= SPIN_SHARE:
                findings.append((Verdict.WEDGED, f"spins at {share:.0%} CPU while idle"))
            if base_fds is not None and broken is None:
                leak = self._leak(base_fds)
                if leak is not None:
                    findings.append((Verdict.LEAKED, leak))
        notes = "; ".join(dict.fromkeys(c.notes))
        if not findings:
            return Result(case.name, Verdict.REJECTED, notes)
        order = [Verdict.CRASHED, Verdict.CORRUPTED, Verdict.WEDGED, Verdict.LEAKED]
        findings.sort(key=lambda f: order.index(f[0]))
        detail = "; ".join(d for _v, d in findings) + (f" ({notes})" if notes else "")
        return Result(case.name, findings[0][0], detail)

    def _idle_fds(self) -> int | None:
        """The open fd count once the last connection's fds are let go of (stable 3 reads)."""
        if self.pid is None:
            return None
        seen: list[int | None] = [fd_count(self.pid)]
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not (len(seen) >= 3 and
                                                   seen[-1] == seen[-2] == seen[-3]):
            time.sleep(0.03)
            seen.append(fd_count(self.pid))
        return seen[-1]

    def _leak(self, base: int) -> str | None:
        """fds above ``base`` that stay open after every connection closed."""
        assert self.pid is not None
        deadline = time.monotonic() + 1.0
        while True:
            now = fd_count(self.pid)
            if now is None or now <= base:
                return None
            if time.monotonic() >= deadline:
                return f"open fds grew from {base} to {now} and stayed"
            time.sleep(0.05)

    def _after(self, result: Result) -> Result:
        """Start the back end again when the case killed or wedged it (and we can)."""
        needs = result.verdict is Verdict.CRASHED or (
            result.verdict is Verdict.WEDGED and self.pid is not None)
        if needs and self.restart_cmd is not None:
            result.detail += f"; {self.restart()}"
        return result

    def run(self, cases: list[Case]) -> list[Result]:
        results = []
        for i, case in enumerate(cases):
            if self.progress is not None:
                self.progress(i, len(cases), case.name, None)
            result = self.run_case(case)
            results.append(result)
            if self.progress is not None:
                self.progress(i + 1, len(cases), case.name, result.verdict)
        return results
