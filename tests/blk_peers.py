"""Helpers for the virtio-blk tests that run real processes.

pyvirtio-blk runs as ``python -m pyvirtio.cli.blk`` (the ``pyvirtio-blk``
console script's module); qemu-storage-daemon through
scripts/peers/ref-blk-backend.sh (which execs it, so the PID is the daemon's).
Every process is stopped with SIGTERM, then SIGKILL, by its own PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pyvirtio.devices.blk.driver import BlkDriver
from pyvirtio.devices.blk.spec import ReqType, Status

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "scripts" / "peers"


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before creating {path}")
        time.sleep(0.05)
    raise TimeoutError(f"no socket {path} after {timeout} s")


def start_pyvirtio_blk(img: Path, sock: Path, *extra: str,
                       log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log or sock.with_suffix(".log"), "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio.cli.blk", "--socket-path", str(sock),
         "--blk-file", str(img), *extra],
        stdout=out, stderr=subprocess.STDOUT)
    out.close()
    wait_for_socket(sock, proc)
    return proc


def start_qsd(img: Path, sock: Path, queues: int = 1) -> subprocess.Popen[bytes]:
    env = dict(os.environ, QUEUES=str(queues))
    out = open(sock.with_suffix(".log"), "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([str(PEERS / "ref-blk-backend.sh"), str(img), str(sock)],
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    out.close()
    wait_for_socket(sock, proc)
    time.sleep(0.2)  # the daemon binds before it listens
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def write_flush_read_back(drv: BlkDriver, blocks: dict[int, bytes]) -> None:
    """Every block written at once (sector -> data), a FLUSH, then every block read back
    at once and compared: many requests in flight each way."""
    slots = [drv.submit(ReqType.OUT, s, data=d, kick=False) for s, d in blocks.items()]
    drv.kick()
    for slot in slots:
        assert drv.wait(slot).status == Status.OK
        drv.release(slot)
    drv.flush()
    slots = [drv.submit(ReqType.IN, s, len(d), kick=False) for s, d in blocks.items()]
    drv.kick()
    for (s, data), slot in zip(blocks.items(), slots, strict=True):
        assert drv.wait(slot).status == Status.OK
        assert bytes(slot.payload()) == data, f"sector {s}"
        drv.release(slot)
