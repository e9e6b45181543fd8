"""pyvirtio-net serving Linux guests in QEMU 7.2 (TCG): ``-netdev vhost-user`` + ``virtio-net-pci``.

VIRTIO 1.2 §5.1 with Linux's virtio_net driver as the peer, over QEMU
docs/interop/vhost-user.rst.  Guests boot the Debian kernel with one
busybox initramfs per session (tests/qemu_guest.py) and run a shell workload
passed on the kernel command line; scripts/peers/boot-guest.sh ``-n SOCK``
attaches the NIC with ``vectors=0`` (INTx: QEMU 7.2 under TCG crashes in
``msix_set_vector_notifiers`` <- ``vhost_net_start`` when a vhost-user
virtio-net-pci uses MSI-X) and ``NET_MAC`` as the guest's MAC.

* Two guests on one ``--switch`` (two sockets, one process) ping each
  other.  They boot at the same time and synchronise over the network
  itself: each starts a one-shot TCP listener (busybox ``nc``) before its
  address exists, pings the other once it answers, then delivers "done" to
  the other's listener and powers off only once the other's "done" arrived —
  so neither leaves while the other still pings it.
* QEMU restarted on the same port: the first guest on port A powers off, a
  new QEMU (same MAC, a new address) connects to port A and pings the guest
  on port B — which is the same boot and the same vhost-user connection as
  before, and loses no frame meanwhile.  While port A has no front end,
  frames for it are dropped and counted (``rx_no_frontend``).
* One guest on ``--tap``: the back end runs inside a network namespace the
  test creates (``ip netns exec``), so its TAP interface is created there; the
  namespace has nothing else (no route out), the guest pings the address the
  test gives the TAP.  At exit the back end's TAP is gone again.

Each boot takes ~5-10 s under TCG; the switch tests share one back end and
one long-running guest on port B.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from net_backend import NetBackend, PortCounters
from qemu_guest import MAX_ENCODED_SCRIPT, PEERS, Guest, build_initramfs

pytestmark = pytest.mark.timeout(400)

MAC_A = "52:54:00:00:00:0a"
MAC_B = "52:54:00:00:00:0b"
PINGS = 5

# busybox sh -e.  reach: wait (bounded) until ADDR answers; pings: PINGS echo
# requests to ADDR, the result line (tagged TAG) printed and kept in /tmp/result;
# done_to: deliver that line to ADDR's listener (retried until it listens);
# wait_done: until FILE got the peer's line, then print it.  A listener's stdin
# is a pipe that stays open and silent, so nc does not half-close towards the
# sender before the sender's line arrived.  The serial console is not read
# until a guest powers off, so what B saw reaches the host through A's console.
PRELUDE = f"""
up() {{ ip link set lo up; ip addr add $1/24 dev eth0; ip link set eth0 up; }}
reach() {{ i=0; until ping -c 1 -W 1 $1 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 90 ]; done; }}
pings() {{ ping -c {PINGS} -i 0.2 -W 5 $1 >/tmp/ping || true
  echo "$2: $(grep transmitted /tmp/ping)" | tee /tmp/result; }}
listen() {{ sleep 1000 | nc -l -p 5000 >$1 & }}
done_to() {{ until nc -w 2 $1 5000 </tmp/result; do sleep 0.2; done; }}
wait_done() {{ until [ -s $1 ]; do sleep 0.2; done; echo "peer $(cat $1)"; }}
"""


def script_a(me: str) -> str:
    return PRELUDE + f"""
listen /tmp/b
up {me}
reach 10.0.0.2; pings 10.0.0.2 A; done_to 10.0.0.2; wait_done /tmp/b
"""


# Guest B stays up across both guests on port A; its second listener is up long
# before the second guest on A can reach it (and done_to retries anyway).
GUEST_B = PRELUDE + """
listen /tmp/a1
up 10.0.0.2
reach 10.0.0.1; pings 10.0.0.1 B1; done_to 10.0.0.1; wait_done /tmp/a1
listen /tmp/a2
reach 10.0.0.3; pings 10.0.0.3 B2; done_to 10.0.0.3; wait_done /tmp/a2
"""

# After the pings: the features the driver accepted, then 4 MiB each way over TCP
# (segmentation offload in both directions when it was negotiated).
GUEST_TAP = PRELUDE + """
up 10.0.1.2
reach 10.0.1.1; pings 10.0.1.1 T
cat /sys/class/net/eth0/address
echo "FEATURES $(cat /sys/bus/virtio/devices/virtio0/features)"
wget -q -O /tmp/down http://10.0.1.1:8000/blob; echo "DOWN $(sha256sum /tmp/down)"
dd if=/dev/urandom of=/tmp/up bs=64k count=64 2>/dev/null; echo "UP $(sha256sum /tmp/up)"
nc 10.0.1.1 5001 </tmp/up >/tmp/ack; echo "ACK $(cat /tmp/ack)"
"""
BLOB = 4 << 20
# In the namespace: an HTTP server with the blob, and a TCP sink that reads BLOB
# bytes, answers their SHA-256 and closes (so the guest's nc ends).
NS_SERVERS = f"""
import hashlib, http.server, os, socket, sys, threading
os.chdir(sys.argv[1])
httpd = http.server.ThreadingHTTPServer(("10.0.1.1", 8000), http.server.SimpleHTTPRequestHandler)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
srv = socket.create_server(("10.0.1.1", 5001))
conn, _ = srv.accept()
h, n = hashlib.sha256(), 0
while n < {BLOB}:
    data = conn.recv(1 << 16)
    if not data:
        break
    h.update(data); n += len(data)
conn.sendall(h.hexdigest().encode() + b"\\n"); conn.close()
print("received", n, h.hexdigest(), flush=True)
threading.Event().wait()
"""
OFFLOAD_BITS = {"CSUM": 0, "GUEST_CSUM": 1, "GUEST_TSO4": 7, "GUEST_TSO6": 8, "HOST_TSO4": 11,
                "HOST_TSO6": 12}

ALL_ANSWERED = f"{PINGS} packets transmitted, {PINGS} packets received"


def boot_on(initramfs: Path, sock: Path, mac: str, script: str,
            timeout: float = 150) -> Guest:
    """A guest whose eth0 (MAC ``mac``) is on the vhost-user-net socket ``sock``."""
    encoded = base64.b64encode(gzip.compress(script.encode(), mtime=0)).decode()
    assert len(encoded) <= MAX_ENCODED_SCRIPT, f"script too long ({len(encoded)} encoded)"
    env = dict(os.environ, NET_MAC=mac, KAPPEND=f"pvcmd={encoded}")
    proc = subprocess.Popen(
        [str(PEERS / "boot-guest.sh"), "-i", str(initramfs), "-n", str(sock),
         "-t", str(int(timeout)), "-m", "256", "true"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    return Guest(proc, timeout)


def finished(guest: Guest, *tags: str) -> str:
    """The log of a guest that powered off with status 0, every ``TAG: `` line in it
    saying all echo requests were answered."""
    result = guest.finish()
    assert result.rc == 0, result.log
    for tag in tags:
        lines = [line for line in result.log.splitlines() if f"{tag}: " in line]
        assert lines and all(ALL_ANSWERED in line for line in lines), (tag, result.log)
    return result.log


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("net-initramfs"), ["virtio_pci", "virtio_net"])


class SwitchLab:
    """One pyvirtio-net ``--switch`` with ports A and B, guest B booted for the module."""

    def __init__(self, initramfs: Path, tmp: Path) -> None:
        self.initramfs = initramfs
        self.a, self.b = tmp / "a.sock", tmp / "b.sock"
        self.backend = NetBackend([self.a, self.b], ["--switch", "sw0"])
        self.guests: list[Guest] = []
        self.guest_b = self.boot(self.b, MAC_B, GUEST_B, timeout=300)
        self.first_a: str | None = None

    def boot(self, sock: Path, mac: str, script: str, timeout: float = 150) -> Guest:
        guest = boot_on(self.initramfs, sock, mac, script, timeout)
        self.guests.append(guest)
        return guest

    def port(self, counters: dict[str, PortCounters], sock: Path) -> PortCounters:
        return counters[str(sock)]

    def first_guest_on_a(self) -> str:
        """Boot the first guest on A (B is booting meanwhile); its log once it powered off.

        It holds its own result (``A:``) and, as the ``peer`` line, guest B's (``B1:``)."""
        if self.first_a is None:
            guest = self.boot(self.a, MAC_A, script_a("10.0.0.1"))
            self.first_a = finished(guest, "A", "peer B1")
        return self.first_a

    def close(self) -> None:
        for guest in self.guests:
            guest.kill()
        self.backend.kill()


@pytest.fixture(scope="module")
def lab(initramfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwitchLab]:
    lab = SwitchLab(initramfs, tmp_path_factory.mktemp("switch"))
    try:
        yield lab
    finally:
        lab.close()


def test_two_guests_on_a_switch_ping_each_other(lab: SwitchLab) -> None:
    lab.first_guest_on_a()
    counters = lab.backend.counters()
    for sock in (lab.a, lab.b):
        port = lab.port(counters, sock)
        # Both ways: echo requests and replies, ARP, the TCP exchanges.
        assert port.tx_frames >= 2 * PINGS and port.rx_frames >= 2 * PINGS, counters


def test_qemu_restarted_on_port_a_while_port_b_carries_on(lab: SwitchLab) -> None:
    lab.first_guest_on_a()
    backend = lab.backend
    backend.wait_log("front end disconnected", 1)    # the first QEMU on A is gone
    assert backend.count("front end connected") == 2
    gone = lab.port(backend.counters(), lab.a).drops.get("rx_no_frontend", 0)
    # Guest B now looks for 10.0.0.3 (ARP broadcasts): with nobody on port A they are
    # dropped there and counted.  Waiting for one puts the restart after that.
    deadline = time.monotonic() + 60
    while lab.port(counters := backend.counters(), lab.a).drops.get("rx_no_frontend", 0) <= gone:
        assert time.monotonic() < deadline, backend.log
        time.sleep(0.5)
    b_before = lab.port(counters, lab.b)

    guest_a2 = lab.boot(lab.a, MAC_A, script_a("10.0.0.3"))
    finished(guest_a2, "A", "peer B2")
    log_b = finished(lab.guest_b, "B1", "B2", "peer A")
    # One boot of B, one connection: the only new front end is the new QEMU on A.
    assert backend.count("front end connected") == 3, backend.log
    assert "broken" not in backend.log and "dropping" not in backend.log, backend.log
    final = backend.stop()
    b_after = lab.port(final, lab.b)
    assert b_after.drops == b_before.drops, (b_before, b_after)
    assert b_after.rx_frames > b_before.rx_frames and b_after.tx_frames > b_before.tx_frames
    assert backend.count("front end disconnected") == 3
    assert log_b.count("peer A: ") == 2


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pvnet-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=False)


def test_guest_on_a_tap_in_a_namespace_pings_it(initramfs: Path, netns: str,
                                                tmp_path: Path) -> None:
    sock = tmp_path / "tap.sock"
    assert in_ns(netns, "ip", "link", "show", "tap0").returncode != 0
    backend = NetBackend([sock], ["--tap", "tap0"], prefix=["ip", "netns", "exec", netns])
    blob = os.urandom(BLOB)
    (tmp_path / "blob").write_bytes(blob)
    guest: Guest | None = None
    servers: subprocess.Popen[str] | None = None
    try:
        for cmd in (["ip", "addr", "add", "10.0.1.1/24", "dev", "tap0"],
                    ["ip", "link", "set", "tap0", "up"]):
            res = in_ns(netns, *cmd)
            assert res.returncode == 0, res.stderr
        servers = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c",
                                    NS_SERVERS, str(tmp_path)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        guest = boot_on(initramfs, sock, "52:54:00:00:01:02", GUEST_TAP)
        log = finished(guest, "T")
        assert "52:54:00:00:01:02" in log
        # The namespace's side saw the guest: its neighbour entry has the guest's MAC.
        neigh = in_ns(netns, "ip", "neigh", "show", "10.0.1.2", "dev", "tap0").stdout
        assert "52:54:00:00:01:02" in neigh, neigh
        port = backend.stop()[str(sock)]
    finally:
        if guest is not None:
            guest.kill()
        backend.kill()
        if servers is not None:
            servers.kill()
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in log.splitlines()
             if ln.split(" ", 1)[0] in ("FEATURES", "DOWN", "UP", "ACK") and " " in ln}
    features = lines["FEATURES"].strip()
    # The driver took the offloads the TAP carries (sysfs: one character per bit).
    assert all(features[bit] == "1" for bit in OFFLOAD_BITS.values()), features
    # 4 MiB each way arrived intact.
    assert lines["DOWN"].split()[0] == hashlib.sha256(blob).hexdigest(), lines
    assert lines["ACK"].split()[0] == lines["UP"].split()[0], lines
    # ... in segments larger than the MTU, both ways through the TAP's virtio_net_hdr.
    m = re.search(r"segmentation offload packets: tx (\d+), rx (\d+)", backend.log)
    assert m is not None and int(m.group(1)) > 0 and int(m.group(2)) > 0, backend.log
    print(f"TAP: {m.group(0)}; port {port}")  # pytest -s shows it
    assert port.tx_frames >= PINGS and port.rx_frames >= PINGS, port
    # The namespace's own IPv6 chatter may reach the port before the guest's driver is up.
    assert set(port.drops) <= {"rx_no_frontend"}, port
    # Created by the back end, gone with it.
    assert in_ns(netns, "ip", "link", "show", "tap0").returncode != 0
