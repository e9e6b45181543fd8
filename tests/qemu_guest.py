"""Boot a Linux guest in QEMU (TCG) with any vhost-user devices attached.

One initramfs (scripts/peers/make-initramfs.sh) serves every boot with the
same module set: its /workload.sh runs the shell script that arrives gzipped
and base64-encoded as ``pvcmd=`` on the kernel command line.  :func:`boot`
starts scripts/peers/boot-guest.sh with one ``-chardev socket`` +
``-device <kind>,chardev=...`` pair per :class:`VhostUserDevice` and returns a
:class:`Guest` whose serial console a test reads line by line: wait for a
marker the guest prints (:meth:`Guest.wait_for`), act on the host (inject
input, ...), then :meth:`Guest.finish` for the workload's exit status and the
whole log.  A boot takes ~5-10 s under TCG.
"""

from __future__ import annotations

import base64
import gzip
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "scripts" / "peers"

# /workload.sh: decode, decompress and run the script from the kernel command line.
DISPATCH = ("tr ' ' '\\n' < /proc/cmdline | sed -n 's/^pvcmd=//p' | base64 -d | gunzip"
            " > /tmp/pvcmd.sh; sh -e /tmp/pvcmd.sh")
# x86 COMMAND_LINE_SIZE is 2048; leave room for console=, quiet and friends.
MAX_ENCODED_SCRIPT = 1700


def build_initramfs(out: Path, modules: Iterable[str], extra_bins: Iterable[str] = ()) -> Path:
    """Kernel + initramfs with ``modules`` (and what they depend on) into ``out``.

    ``extra_bins``: host binaries copied in with the shared libraries ``ldd`` lists
    and the dynamic loader (make-initramfs.sh's EXTRA_BINS), e.g. ``/usr/bin/fio``;
    none by default, so the tests' initramfs stays small and boots fast.
    """
    env = dict(os.environ, MODULES=" ".join(modules), EXTRA_BINS=" ".join(extra_bins))
    subprocess.run([str(PEERS / "make-initramfs.sh"), str(out), DISPATCH], check=True,
                   capture_output=True, env=env, timeout=120)
    return out


@dataclass(frozen=True)
class VhostUserDevice:
    """``-device KIND,chardev=...`` on a vhost-user socket a back end listens on."""

    kind: str                      # e.g. "vhost-user-rng-pci"
    socket: Path
    options: str = ""              # extra ",key=value" device properties


@dataclass(frozen=True)
class GuestResult:
    rc: int                        # the workload's exit status (124 timeout, 125 no marker)
    log: str


class Guest:
    """A running boot-guest.sh (and its QEMU) with the serial console streamed in."""

    def __init__(self, proc: subprocess.Popen[str], timeout: float) -> None:
        self.proc = proc
        self.deadline = time.monotonic() + timeout
        self.lines: list[str] = []
        self._unread: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._unread.put(line.rstrip("\n"))
        self._unread.put(None)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, marker: str) -> str:
        """The next console line containing ``marker``; AssertionError with the log if
        the guest ends or the boot's timeout passes first."""
        while True:
            left = self.deadline - time.monotonic()
            try:
                line = self._unread.get(timeout=max(left, 0.0))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} before the timeout:\n{self.log}") from None
            if line is None:
                self._unread.put(None)
                raise AssertionError(f"guest ended without {marker!r}:\n{self.log}")
            if marker in line:
                return line

    def finish(self) -> GuestResult:
        """Wait for the guest to power off (or the timeout to kill it)."""
        try:
            rc = self.proc.wait(timeout=max(self.deadline - time.monotonic(), 0.0) + 10)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait()
        self._reader.join(10)
        return GuestResult(rc, self.log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            # boot-guest.sh, timeout and QEMU share the session started for them.
            os.killpg(self.proc.pid, signal.SIGKILL)


def wait_for_socket(path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no socket {path} after {timeout} s")
        time.sleep(0.05)


def qemu_device_args(devices: Sequence[VhostUserDevice]) -> list[str]:
    args: list[str] = []
    for i, dev in enumerate(devices):
        args += ["-chardev", f"socket,id=vu{i},path={dev.socket}",
                 "-device", f"{dev.kind},chardev=vu{i}{dev.options}"]
    return args


def boot(initramfs: Path, script: str, devices: Sequence[VhostUserDevice] = (), *,
         timeout: float = 150, mem_mb: int = 512, kappend: str = "",
         qemu_args: Sequence[str] = (), qemu_dir: Path | None = None) -> Guest:
    """Start a guest running ``script`` (busybox ``sh -e``) with ``devices`` attached.

    ``qemu_args``: more QEMU arguments (no spaces inside one), e.g. QEMU's own devices.
    ``qemu_dir``: a directory whose ``qemu-system-x86_64`` runs instead of the one on
    PATH (boot-guest.sh finds it there), e.g. the newer QEMU install-peers.sh unpacks.
    """
    encoded = base64.b64encode(gzip.compress(script.encode(), mtime=0)).decode()
    assert len(encoded) <= MAX_ENCODED_SCRIPT, f"script too long ({len(encoded)} encoded)"
    extra = [*qemu_device_args(devices), *qemu_args]
    assert all(" " not in a for a in extra), "QEMU_EXTRA is split on spaces"
    for dev in devices:
        wait_for_socket(dev.socket)
    env = dict(os.environ, QEMU_EXTRA=" ".join(extra),
               KAPPEND=f"{kappend} pvcmd={encoded}".strip())
    if qemu_dir is not None:
        env["PATH"] = f"{qemu_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
    proc = subprocess.Popen(
        [str(PEERS / "boot-guest.sh"), "-i", str(initramfs), "-t", str(int(timeout)),
         "-m", str(mem_mb), "true"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    return Guest(proc, timeout)


# Passes until the host writes STOP into block ``stop`` of the disk: each pass n writes
# a pattern of its own (``<tag>P<n>-R<i>`` repeated) to every region i with parallel
# O_DIRECT dd's — as many requests in flight as regions — reads them all back in
# parallel and compares; BAD-W/BAD-R lines report a failure, PASS-DONE n a pass.
_VERIFY_PASSES = """
D=/dev/vda; N={regions}; B={blocks}; n=0
while :; do
n=$((n+1)); i=0
while [ $i -lt $N ]; do
(yes {tag}P$n-R$i | head -c $((B*4096)) > /tmp/p$i
dd if=/tmp/p$i of=$D bs=4096 seek=$((i*B)) count=$B oflag=direct 2>/dev/null || echo BAD-W-$n-$i) &
i=$((i+1)); done; wait; i=0
while [ $i -lt $N ]; do
(dd if=$D of=/tmp/r$i bs=4096 skip=$((i*B)) count=$B iflag=direct 2>/dev/null
cmp /tmp/p$i /tmp/r$i || echo BAD-R-$n-$i) &
i=$((i+1)); done; wait
echo PASS-DONE $n
dd if=$D of=/tmp/s bs=4096 skip={stop} count=1 iflag=direct 2>/dev/null
if grep -q STOP /tmp/s; then break; fi
done
echo ALL-OK
"""


def verify_passes_script(regions: int, blocks: int, stop: int, tag: str = "") -> str:
    """The guest script of pattern passes over ``regions`` regions of ``blocks`` 4 KiB
    blocks each (see :func:`verify_pattern`), until STOP appears in block ``stop``."""
    return _VERIFY_PASSES.format(regions=regions, blocks=blocks, stop=stop, tag=tag)


def verify_pattern(tag: str, n: int, region: int, blocks: int) -> bytes:
    """What pass ``n`` of :func:`verify_passes_script` wrote to region ``region``."""
    line = f"{tag}P{n}-R{region}\n".encode()
    size = blocks * 4096
    return (line * (size // len(line) + 1))[:size]
