"""A real Linux guest in QEMU (TCG) on pyvirtio-blk's socket: -device vhost-user-blk-pci.

VIRTIO 1.2 §5.2 with Linux's virtio_blk driver as the peer, over QEMU
docs/interop/vhost-user.rst.  One initramfs is built per session
(scripts/peers/make-initramfs.sh); its /workload.sh runs the shell script
passed base64-encoded as ``pvcmd=`` on the kernel command line, so every
boot reuses it (boot-guest.sh -i DIR).  Each boot takes ~5-10 s under TCG.

* the guest writes a pattern with O_DIRECT and reads it back; the host finds
  those bytes in the image; data the host wrote before boot reads back right;
* QEMU restarted against the same back-end process: the second guest works
  (and sees the first one's data);
* 2 queues with 2 vCPUs (blk-mq has 2 hardware queues; I/O from both CPUs),
  with the back end woken by kicks and with ``--poll``;
* ``packed=on``: QEMU offers the packed ring (VIRTIO 1.2 §2.8), the guest's
  sysfs shows it negotiated (features bit 34), and 2 MiB of 4 KiB O_DIRECT
  writes and reads go round the 128-entry ring several times;
* --read-only: the guest sees a read-only disk (VIRTIO_BLK_F_RO), its
  O_DIRECT writes fail and the image is unchanged.  (Linux refuses them
  itself, even after ``blockdev --setrw``; the device's own IOERR answer to a
  write is covered by test_blk_loopback.py and test_blk_device.py.)
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blk_peers import PEERS, start_pyvirtio_blk, stop

SIZE = 64 << 20
HOST_SECTOR = 2048          # where the host writes its pattern before boot
GUEST_BLOCK = 1024          # 4 KiB block where the guest writes (byte offset 4 MiB)
GUEST_COUNT = 16            # 64 KiB

# /workload.sh: decode and run the script from the kernel command line.
DISPATCH = "eval \"$(tr ' ' '\\n' < /proc/cmdline | sed -n 's/^pvcmd=//p' | base64 -d)\""


def pattern(tag: str, size: int) -> bytes:
    """What busybox ``yes TAG | head -c SIZE`` prints."""
    line = (tag + "\n").encode()
    return (line * (size // len(line) + 1))[:size]


@pytest.fixture(scope="session")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("initramfs")
    subprocess.run([str(PEERS / "make-initramfs.sh"), str(out), DISPATCH], check=True,
                   capture_output=True, timeout=120)
    return out


def boot(initramfs: Path, sock: Path, script: str, smp: int = 1, queues: int = 1,
         timeout: int = 150, packed: bool = False) -> tuple[int, str]:
    cmd = base64.b64encode(script.encode()).decode()
    assert len(cmd) < 1500, "kernel command line too long"
    env = dict(os.environ, SMP=str(smp), BLK_QUEUES=str(queues), KAPPEND=f"pvcmd={cmd}")
    if packed:
        env["BLK_PACKED"] = "1"  # vhost-user-blk-pci,packed=on
    res = subprocess.run([str(PEERS / "boot-guest.sh"), "-i", str(initramfs), "-b", str(sock),
                          "-t", str(timeout), "true"],
                         capture_output=True, text=True, env=env, timeout=timeout + 30)
    return res.returncode, res.stdout + res.stderr


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
        f.seek(HOST_SECTOR * 512)
        f.write(pattern("HOSTDATA-before-boot", 8192))
    return img


@pytest.fixture
def backend(tmp_path: Path, disk: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    args = getattr(request, "param", ())
    sock = tmp_path / "blk.sock"
    proc = start_pyvirtio_blk(disk, sock, *args)
    try:
        yield sock
    finally:
        assert stop(proc, timeout=10) == 0, sock.with_suffix(".log").read_text()


WRITE_AND_VERIFY = f"""
test "$(cat /sys/block/vda/size)" = {SIZE // 512}
yes HOSTDATA-before-boot | head -c 8192 > /tmp/h
dd if=/dev/vda of=/tmp/hr bs=4096 skip={HOST_SECTOR // 8} count=2 iflag=direct
cmp /tmp/h /tmp/hr
yes GUESTDATA-o-direct | head -c {GUEST_COUNT * 4096} > /tmp/p
dd if=/tmp/p of=/dev/vda bs=4096 seek={GUEST_BLOCK} count={GUEST_COUNT} oflag=direct conv=fsync
dd if=/dev/vda of=/tmp/r bs=4096 skip={GUEST_BLOCK} count={GUEST_COUNT} iflag=direct
cmp /tmp/p /tmp/r
echo GUEST-OK
"""

SECOND_GUEST = f"""
yes GUESTDATA-o-direct | head -c {GUEST_COUNT * 4096} > /tmp/p
dd if=/dev/vda of=/tmp/r bs=4096 skip={GUEST_BLOCK} count={GUEST_COUNT} iflag=direct
cmp /tmp/p /tmp/r
yes SECOND-GUEST | head -c 4096 > /tmp/s
dd if=/tmp/s of=/dev/vda bs=4096 seek=0 count=1 oflag=direct
echo SECOND-OK
"""


@pytest.mark.timeout(400)
def test_guest_writes_reads_and_qemu_restart(initramfs: Path, backend: Path, disk: Path) -> None:
    rc, out = boot(initramfs, backend, WRITE_AND_VERIFY)
    assert rc == 0 and "GUEST-OK" in out, out[-3000:]
    raw = disk.read_bytes()
    off = GUEST_BLOCK * 4096
    assert raw[off:off + GUEST_COUNT * 4096] == pattern("GUESTDATA-o-direct", GUEST_COUNT * 4096)
    # QEMU ended (guest powered off); a new QEMU connects to the same back-end process.
    rc, out = boot(initramfs, backend, SECOND_GUEST)
    assert rc == 0 and "SECOND-OK" in out, out[-3000:]
    assert disk.read_bytes()[:4096] == pattern("SECOND-GUEST", 4096)
    log = backend.with_suffix(".log").read_text()
    assert log.count("front end connected") == 2  # one back-end process served both QEMUs
    assert log.count("front end disconnected") == 2


MULTIQUEUE = """
test "$(ls /sys/block/vda/mq | wc -l)" = 2
test "$(nproc)" = 2
yes CPU0 | head -c 65536 > /tmp/a
yes CPU1 | head -c 65536 > /tmp/b
taskset -c 0 dd if=/tmp/a of=/dev/vda bs=4096 seek=100 count=16 oflag=direct
taskset -c 1 dd if=/tmp/b of=/dev/vda bs=4096 seek=200 count=16 oflag=direct
taskset -c 1 dd if=/dev/vda of=/tmp/ra bs=4096 skip=100 count=16 iflag=direct
taskset -c 0 dd if=/dev/vda of=/tmp/rb bs=4096 skip=200 count=16 iflag=direct
cmp /tmp/a /tmp/ra
cmp /tmp/b /tmp/rb
echo MQ-OK
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", [("--num-queues", "2"), ("--num-queues", "2", "--poll")],
                         indirect=True, ids=["kicks", "poll"])
def test_two_queues_two_vcpus(initramfs: Path, backend: Path, disk: Path) -> None:
    rc, out = boot(initramfs, backend, MULTIQUEUE, smp=2, queues=2)
    assert rc == 0 and "MQ-OK" in out, out[-3000:]
    raw = disk.read_bytes()
    assert raw[100 * 4096:116 * 4096] == pattern("CPU0", 65536)
    assert raw[200 * 4096:216 * 4096] == pattern("CPU1", 65536)


READ_ONLY = f"""
test "$(cat /sys/block/vda/ro)" = 1
yes HOSTDATA-before-boot | head -c 8192 > /tmp/h
dd if=/dev/vda of=/tmp/hr bs=4096 skip={HOST_SECTOR // 8} count=2 iflag=direct
cmp /tmp/h /tmp/hr
yes NOPE | head -c 4096 > /tmp/w
if dd if=/tmp/w of=/dev/vda bs=4096 seek=10 count=1 oflag=direct; then echo WROTE; exit 1; fi
blockdev --setrw /dev/vda || true
if dd if=/tmp/w of=/dev/vda bs=4096 seek=10 count=1 oflag=direct; then echo WROTE; exit 1; fi
echo RO-OK
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", [("--read-only",)], indirect=True)
def test_read_only_guest_cannot_write(initramfs: Path, backend: Path, disk: Path) -> None:
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    rc, out = boot(initramfs, backend, READ_ONLY)
    assert rc == 0 and "RO-OK" in out and "WROTE" not in out, out[-3000:]
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before


# 512 requests each way: several laps of QEMU's 128-entry ring (wrap counters flip).
PACKED_BYTES = 2 << 20
PACKED_BLOCKS = PACKED_BYTES // 4096
# /sys/bus/virtio/devices/virtioN/features: one '0'/'1' per feature bit, bit 0 first.
PACKED = f"""
f=$(cat /sys/block/vda/device/features)
echo "FEATURES $f"
test "$(echo "$f" | cut -c35)" = 1
yes PACKED-RING | head -c {PACKED_BYTES} > /tmp/p
dd if=/tmp/p of=/dev/vda bs=4096 seek={GUEST_BLOCK} count={PACKED_BLOCKS} oflag=direct conv=fsync
dd if=/dev/vda of=/tmp/r bs=4096 skip={GUEST_BLOCK} count={PACKED_BLOCKS} iflag=direct
cmp /tmp/p /tmp/r
echo PACKED-OK
"""


@pytest.mark.timeout(300)
def test_packed_ring_negotiated_and_data_verified(initramfs: Path, backend: Path,
                                                  disk: Path) -> None:
    rc, out = boot(initramfs, backend, PACKED, packed=True)
    assert rc == 0 and "PACKED-OK" in out, out[-3000:]
    features = next(line.split()[1] for line in out.splitlines()
                    if line.startswith("FEATURES "))
    assert features[34] == "1" and features[29] == "1"  # RING_PACKED, and EVENT_IDX with it
    raw = disk.read_bytes()
    off = GUEST_BLOCK * 4096
    assert raw[off:off + PACKED_BYTES] == pattern("PACKED-RING", PACKED_BYTES)
