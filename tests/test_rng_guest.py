"""A real Linux guest (QEMU 7.2, TCG) reading /dev/hwrng from pyvirtio-rng.

``-device vhost-user-rng-pci`` on a ``pyvirtio-rng`` process; the peer is
Linux's virtio_rng under the hw_random core.  ``rng_current`` names
virtio_rng, and 4 KiB read from /dev/hwrng are the source file's bytes, in
order.  Where in the file they start depends on what the kernel took
before: the hw_random core reads 32 bytes at registration
(add_early_randomness) and its khwrngd thread reads 64 now and then, at any
quality (Linux 6.1 starts it for every rng; rng_quality 0 does not stop
it).  So the guest reads while watching khwrngd's context switches and
reads again if the thread ran meanwhile (on one vCPU it cannot take bytes
without being switched in and out); the read it reports is contiguous in
the source, at a 64-byte boundary (virtio_rng asks for 64 bytes at a time,
and Debian's 6.1 virtio_rng drops what is left of a buffer that
add_early_randomness half read).  The back end runs with a rate limit
(1024 bytes per 50 ms), so the read spans several periods and deferred
requests.

(The keyboard has its own guest test, test_input_guest.py: QEMU 7.2 refuses
vhost-user-input-pci without KVM, backends/vhost-user.c
``vhost_user_backend_dev_init``, so that one runs on QEMU 8.0 or newer.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from blk_peers import stop
from qemu_guest import VhostUserDevice, boot, build_initramfs

MODULES = ("virtio_pci", "virtio_rng")
RNG_READ = 4096

GUEST = f"""
R=/sys/class/misc/hw_random
echo "RNG current=$(cat $R/rng_current)"
P=$(ps | awk '/\\[hwrng\\]/{{print $1}}')
sw() {{ awk '/ctxt_switches/{{s+=$2}} END{{print s}}' /proc/$P/status; }}
i=0
while :; do
  a=$(sw); dd if=/dev/hwrng of=/tmp/r bs={RNG_READ} count=1 2>/dev/null; b=$(sw)
  [ "$a" = "$b" ] && break
  i=$((i+1)); [ $i -lt 8 ]
done
echo "RNG rereads=$i"
echo "RNG-HEX $(od -An -tx1 -v /tmp/r | tr -d ' \\n')"
"""


@dataclass
class Run:
    rc: int
    log: str
    source: bytes
    rng_log: str

    def line(self, prefix: str) -> str:
        found = [ln for ln in self.log.splitlines() if ln.startswith(prefix)]
        assert found, f"no {prefix!r} line from the guest:\n{self.log[-3000:]}"
        return found[-1][len(prefix):].strip()


def start(tmp: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    with open(tmp / f"{name}.log", "wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("guest")
    initramfs = build_initramfs(tmp / "initramfs", MODULES)
    source = os.urandom(1 << 20)
    (tmp / "entropy.bin").write_bytes(source)
    rng = start(tmp, "rng", "pyvirtio.devices.rng", "--socket-path", str(tmp / "rng.sock"),
                "--source", str(tmp / "entropy.bin"), "--max-bytes", "1024",
                "--period-ms", "50")
    try:
        vm = boot(initramfs, GUEST, [VhostUserDevice("vhost-user-rng-pci", tmp / "rng.sock")])
        try:
            vm.wait_for("RNG-HEX")
            res = vm.finish()
        finally:
            vm.kill()
    finally:
        rc = stop(rng, timeout=10)
    log = (tmp / "rng.log").read_text()
    assert rc == 0, log
    return Run(res.rc, res.log, source, log)


@pytest.mark.timeout(300)
def test_guest_reads_the_source_bytes_in_order_from_dev_hwrng(guest: Run) -> None:
    assert guest.rc == 0, guest.log[-3000:]
    assert guest.line("RNG current=") == "virtio_rng.0"
    got = bytes.fromhex(guest.line("RNG-HEX"))
    assert len(got) == RNG_READ
    at = guest.source.find(got)
    assert at >= 0, "the guest's bytes are not a contiguous run of the source file"
    assert at % 64 == 0 and guest.source[at:at + RNG_READ] == got
    assert "front end connected" in guest.rng_log
