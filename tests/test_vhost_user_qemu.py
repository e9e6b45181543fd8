"""The back-end channel against a real front end: QEMU 7.2 with vhost-user-blk-pci.

QEMU docs/interop/vhost-user.rst "Back-end communication": QEMU negotiates
BACKEND_REQ (SLAVE_REQ in 7.2), hands over the channel with
SET_BACKEND_REQ_FD, and answers CONFIG_CHANGE_MSG by re-reading the config
(GET_CONFIG) and — for vhost-user-blk, whose handler is "valid for resize
only" — interrupting the guest when the capacity changed.  One boot of the lab
guest (2 vCPUs, 2 queues) on an in-process server checks both paths: a grown
disk (the guest gets a config interrupt and sees the new size) and a broken
ring (QEMU acks the config change, the other queue keeps working, the back end
survives).  The guest signals the host through marker sectors of its disk,
because boot-guest.sh's console pipe is block-buffered.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from pyvirtio.core.errors import PeerError
from pyvirtio.core.queue import DeviceQueue
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.devices.blk.file_store import FileStore
from pyvirtio.transports.vhost_user.server import VhostUserServer

PEERS = Path(__file__).resolve().parent.parent / "scripts" / "peers"
SECTORS = 131072  # a 64 MiB disk
GROWN = SECTORS + 4096
RESIZE_MARK, BREAK_MARK = 1000, 1001

WORKLOAD = rf"""
irq() {{ awk '/virtio0-config/ {{ print $2 + $3 }}' /proc/interrupts; }}
echo "H6 size before $(cat /sys/block/vda/size) irq $(irq)"
echo H6RESIZE | dd of=/dev/vda bs=512 seek={RESIZE_MARK} count=1 conv=sync oflag=direct 2>/dev/null
i=0; while [ "$(cat /sys/block/vda/size)" = {SECTORS} ] && [ $i -lt 600 ]; do
  sleep 0.1; i=$((i+1)); done
echo "H6 size after $(cat /sys/block/vda/size) irq $(irq)"
echo H6BREAK | dd of=/dev/vda bs=512 seek={BREAK_MARK} count=1 conv=sync oflag=direct 2>/dev/null
sleep 1
taskset 2 dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct skip=7 2>/dev/null &
sleep 3
taskset 1 dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct skip=9 2>/dev/null \
  && echo "H6 other queue works"
echo "H6 irq at the end $(irq)"
"""


class CheckDevice(BlkDevice):
    """BlkDevice that can grow (capacity is config bytes 0..7) and break its next ring."""

    grown = False
    break_next = False

    def get_config(self, offset: int, size: int) -> bytes:
        data = bytearray(super().get_config(0, max(offset + size, 8)))
        if self.grown:
            data[0:8] = GROWN.to_bytes(8, "little")
        return bytes(data[offset:offset + size])

    def process_queue(self, index: int, queue: DeviceQueue) -> int:
        if self.break_next:
            self.break_next = False
            raise PeerError(f"queue {index}: a hostile ring (simulated)")
        return super().process_queue(index, queue)


def _watch_marks(img: Path, dev: CheckDevice, server: VhostUserServer,
                 done: threading.Event) -> None:
    seen: set[int] = set()
    fd = os.open(img, os.O_RDONLY)
    try:
        while not done.wait(0.05) and len(seen) < 2:
            for sector, word in ((RESIZE_MARK, b"H6RESIZE"), (BREAK_MARK, b"H6BREAK")):
                if sector in seen or not os.pread(fd, 8, sector * 512).startswith(word):
                    continue
                seen.add(sector)
                if sector == RESIZE_MARK:
                    dev.grown = True
                    server.notify_config_change()
                else:
                    dev.break_next = True
    finally:
        os.close(fd)


def _value(serial: str, pattern: str) -> list[int]:
    m = re.search(pattern, serial)
    assert m is not None, f"{pattern!r} not in the guest output:\n{serial}"
    return [int(g) for g in m.groups()]


@pytest.mark.timeout(400)
def test_qemu_acks_config_changes_and_the_guest_sees_a_resize(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    img, sock = tmp_path / "disk.img", tmp_path / "blk.sock"
    img.write_bytes(b"")
    os.truncate(img, SECTORS * 512)
    file_store = FileStore(str(img))
    dev = CheckDevice(file_store, num_queues=2)
    server = VhostUserServer(dev, socket_path=str(sock))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    done = threading.Event()
    watcher = threading.Thread(target=_watch_marks, args=(img, dev, server, done), daemon=True)
    env = dict(os.environ, SMP="2", BLK_QUEUES="2")
    with caplog.at_level(logging.DEBUG, logger="pyvirtio.vhost_user"):
        thread.start()
        watcher.start()
        proc = subprocess.Popen([str(PEERS / "boot-guest.sh"), "-b", str(sock), "-t", "300",
                                 WORKLOAD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
        try:
            serial, _ = proc.communicate(timeout=360)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            done.set()
            watcher.join(10)
            server.stop()
            thread.join(10)
            file_store.close()
    assert proc.returncode == 0, serial
    assert not thread.is_alive()
    log = [r.getMessage() for r in caplog.records]
    # QEMU 7.2 took the channel (and REPLY_ACK'd it).
    assert any("<- SET_BACKEND_REQ_FD" in m and "need_reply" in m for m in log)
    # Resize: CONFIG_CHANGE_MSG -> QEMU re-reads the config -> guest config interrupt.
    size0, irq0 = _value(serial, r"H6 size before (\d+) irq (\d+)")
    size1, irq1 = _value(serial, r"H6 size after (\d+) irq (\d+)")
    assert (size0, size1) == (SECTORS, GROWN)
    assert irq1 == irq0 + 1
    # Broken ring: one log line, a CONFIG_CHANGE_MSG that QEMU acks with 0.
    broken = [m for m in log if "broken, device needs reset" in m]
    assert len(broken) == 1 and "hostile ring (simulated)" in broken[0]
    sent = [i for i, m in enumerate(log) if "=> CONFIG_CHANGE_MSG need_reply" in m]
    acks = [m for m in log if "<= CONFIG_CHANGE_MSG ack" in m]
    assert len(sent) == 2 and acks == ["vhost-user: <= CONFIG_CHANGE_MSG ack 0"] * 2
    assert any("<- GET_CONFIG" in m for m in log[sent[1]:])
    assert not any("back-end channel" in m for m in log)
    # QEMU 7.2 interrupts the guest for a capacity change only: none for the break.
    (irq2,) = _value(serial, r"H6 irq at the end (\d+)")
    assert irq2 == irq1
    assert "H6 other queue works" in serial
