"""A real Linux guest reading key events from pyvirtio-input (QEMU >= 8.0, TCG).

``-device vhost-user-input-pci`` on a ``pyvirtio-input`` process; the peer is
Linux's virtio_input under the input core, read through evdev.  The guest
finds the event device named like our keyboard, turns the input core's
software autorepeat off (an EV_REP/REP_PERIOD 0 event written to it: a key
held past REP_DELAY would otherwise add repeats whenever the guest or the back
end is slow, and the write reaches the back end's statusq too), starts
reading /dev/input/eventN and prints ``INPUT READY`` (on its second serial
port) once the reader holds the device open.  Then the test types through the
control socket (``pyvirtio input type``) and the guest's 24-byte
``struct input_event`` records, reduced to (type, code, value), must be
exactly the typed sequence: every press and release with its SYN_REPORT,
shifts included.

Why not the system QEMU: Debian 12's QEMU 7.2 refuses vhost-user-input-pci
without KVM ("vhost initialization failed: requires kvm" from
vhost_user_backend_dev_init in backends/vhost-user.c, which demanded
kvm_enabled() && kvm_eventfds_enabled()); upstream dropped that check in QEMU
8.0 (commit "backends/vhost-user: remove the ioeventfd check": TCG simulates
ioeventfds), and KVM cannot boot our guests on the test machines.  So
scripts/peers/install-peers.sh unpacks QEMU from bookworm-backports into a
directory of its own (PYVIRTIO_QEMU_BPO, /opt/pyvirtio-peers/qemu-bpo by
default) and only this test runs it; every other guest test keeps QEMU 7.2.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from blk_peers import stop
from pyvirtio.devices.input import text_events
from qemu_guest import Guest, VhostUserDevice, boot, build_initramfs

# Where install-peers.sh unpacks the backported QEMU (same variable, same default).
QEMU_BPO = Path(os.environ.get("PYVIRTIO_QEMU_BPO", "/opt/pyvirtio-peers/qemu-bpo"))
QEMU_DIR = QEMU_BPO / "usr" / "bin"
MODULES = ("virtio_pci", "virtio_input", "evdev")
NAME = "pyvirtio keyboard"
# Shift, punctuation, space, Tab and Enter; a doubled letter (press, release, press).
# Capitals, punctuation, Tab and Enter, in 36 events: evdev keeps at most 64
# events per reader (EVDEV_MIN_BUFFER_SIZE) and drops the rest when the reader
# lags, which a reader under TCG on a busy machine does; 80 events at once
# lost some that way (the device had delivered all of them).
TEXT = "Hi!\tok\n"
EXPECTED = text_events(TEXT)
assert len(EXPECTED) <= 64
# struct input_event on x86-64: struct timeval (16 bytes), __u16 type, __u16 code, __s32 value.
INPUT_EVENT = struct.Struct("<16xHHi")

# Z: the 16 zero bytes of a timeval; the write is EV_REP (0x14) REP_PERIOD (1) 0
# and a SYN_REPORT, which flushes it through the input core while no reader is open.
GUEST = f"""
for e in /sys/class/input/event*; do
  if [ "$(cat $e/device/name)" = "{NAME}" ]; then D=/dev/input/${{e##*/}}; fi
done
echo "INPUT device=$D"
echo "INPUT machine=$(cat /sys/class/dmi/id/product_version)"
Z='\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0'
printf "$Z\\024\\0\\001\\0\\0\\0\\0\\0$Z\\0\\0\\0\\0\\0\\0\\0\\0" > $D
cat $D > /tmp/ev &
P=$!
until ls -l /proc/$P/fd | grep -q " $D\\$"; do usleep 10000; done
echo "INPUT READY" > /dev/ttyS1
while [ "$(stat -c %s /tmp/ev)" -lt {len(EXPECTED) * INPUT_EVENT.size} ]; do usleep 20000; done
kill $P
echo "INPUT-HEX $(od -An -tx1 -v /tmp/ev | tr -d ' \\n')"
"""


@dataclass
class Run:
    rc: int
    log: str
    qemu_version: str
    typed: str
    input_log: str

    def line(self, prefix: str) -> str:
        found = [ln for ln in self.log.splitlines() if ln.startswith(prefix)]
        assert found, f"no {prefix!r} line from the guest:\n{self.log[-3000:]}"
        return found[-1][len(prefix):].strip()


def newer_qemu() -> str:
    """The backported QEMU's version line; fails (never skips) when it is missing."""
    binary = QEMU_DIR / "qemu-system-x86_64"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no {binary}: vhost-user-input-pci under TCG needs QEMU >= 8.0 "
                    "(Debian 12's 7.2 demands KVM for it); run scripts/peers/install-peers.sh "
                    "as root to unpack QEMU from bookworm-backports", pytrace=False)
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                         timeout=30)
    first = out.stdout.splitlines()[0] if out.stdout else out.stderr
    match = re.match(r"QEMU emulator version (\d+)\.", first)
    if out.returncode != 0 or match is None or int(match.group(1)) < 8:
        pytest.fail(f"{binary} --version: {first!r} (want QEMU >= 8.0); rerun "
                    "scripts/peers/install-peers.sh", pytrace=False)
    return first


def wait_for_marker(vm: Guest, path: Path, marker: str) -> None:
    """Wait for ``marker`` on the guest's second serial port (a file QEMU writes).

    Not the console: boot-guest.sh pipes it through ``tr``, whose output is
    block-buffered, so a console line may reach us only when QEMU exits.
    """
    while marker not in (path.read_text(errors="replace") if path.exists() else ""):
        if vm.proc.poll() is not None or time.monotonic() > vm.deadline:
            vm.kill()
            raise AssertionError(f"no {marker!r} from the guest:\n{vm.finish().log}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Run:
    version = newer_qemu()
    tmp = tmp_path_factory.mktemp("guest")
    initramfs = build_initramfs(tmp / "initramfs", MODULES)
    sock, ctl, markers = tmp / "kbd.sock", tmp / "kbd.ctl", tmp / "ttyS1.log"
    with open(tmp / "input.log", "wb") as out:
        backend = subprocess.Popen(
            [sys.executable, "-m", "pyvirtio.cli.input", "--socket-path", str(sock),
             "--control-socket", str(ctl), "--name", NAME],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        # ttyS1 for the ready marker (see wait_for_marker).
        vm = boot(initramfs, GUEST, [VhostUserDevice("vhost-user-input-pci", sock)],
                  qemu_args=("-serial", f"file:{markers}"), qemu_dir=QEMU_DIR,
                  timeout=240)  # QEMU 10 under TCG on a busy 2-core machine
        try:
            wait_for_marker(vm, markers, "INPUT READY")
            typed = subprocess.run(
                [sys.executable, "-m", "pyvirtio.cli.main", "input", "type", TEXT,
                 "--control-socket", str(ctl)],
                capture_output=True, text=True, timeout=30)
            assert typed.returncode == 0, typed.stderr
            vm.wait_for("INPUT-HEX")
            res = vm.finish()
        finally:
            vm.kill()
    finally:
        rc = stop(backend, timeout=10)
    log = (tmp / "input.log").read_text()
    assert rc == 0, log
    return Run(res.rc, res.log, version, typed.stdout.strip(), log)


@pytest.mark.timeout(300)
def test_guest_reads_exactly_the_typed_events_from_dev_input(guest: Run) -> None:
    assert guest.rc == 0, guest.log[-3000:]
    assert guest.line("INPUT device=").startswith("/dev/input/event")
    assert guest.typed == f"ok {len(EXPECTED)}"
    raw = bytes.fromhex(guest.line("INPUT-HEX"))
    assert len(raw) % INPUT_EVENT.size == 0
    got = [INPUT_EVENT.unpack_from(raw, at) for at in range(0, len(raw), INPUT_EVENT.size)]
    assert got == EXPECTED


@pytest.mark.timeout(300)
def test_the_guests_autorepeat_setting_arrives_on_the_statusq(guest: Run) -> None:
    assert "front end connected" in guest.input_log
    assert "input: autorepeat period 0 ms" in guest.input_log, guest.input_log


@pytest.mark.timeout(300)
def test_the_guest_ran_on_the_backported_qemu(guest: Run) -> None:
    # SMBIOS type 1 "version" is the machine type, which names the QEMU release
    # that ran the guest (pc-i440fx-7.2 under the system QEMU).
    machine = re.fullmatch(r"pc-i440fx-(\d+)\.\d+", guest.line("INPUT machine="))
    assert machine is not None and int(machine.group(1)) >= 8, guest.line("INPUT machine=")
    assert f"version {machine.group(1)}." in guest.qemu_version
