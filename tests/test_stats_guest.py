"""A Linux guest in QEMU (TCG) on pyvirtio-blk, watched through ``--stats-socket``.

The guest (Linux virtio_blk over vhost-user-blk-pci, VIRTIO 1.2 §5.2) prints
its own block-layer counters (/sys/block/vda/stat: requests and sectors,
flushes) and its interrupt count (/proc/interrupts, the virtio0-req.0
vector) before and after a dd workload, and then stays idle for a few
seconds while the test reads the back end.  Over that interval:

* requests: the back end returned exactly the requests the guest's block
  layer completed (reads + writes + flushes) — tolerance 0: nothing else
  touches the disk in between (the guest is a shell running dd, and the
  counters are read while it sleeps; a second read proves nothing moved);
* bytes: the used lengths are the sectors read × 512 plus one status byte
  per request; the device-readable bytes are a 16-byte header per request
  plus the sectors written × 512 — tolerance 0 for the same reason;
* interrupts: the guest counted at most as many as the back end sent and
  at least half as many.  The back end writes the call eventfd once per
  interrupt; QEMU (TCG: no irqfd) reads the eventfd from its main loop and
  injects one MSI-X message per read, so writes that land between two reads
  become one guest interrupt — fewer, never more;
* the Prometheus endpoint serves the same numbers as the socket, and
  ``pyvirtio top --once --json`` parses and shows the ring's indices.

The initramfs is built once per session (qemu_guest.build_initramfs); the
boot takes ~10 s under TCG plus the idle windows.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families  # type: ignore[import-not-found,unused-ignore]

from blk_peers import start_pyvirtio_blk, stop
from pyvirtio.transports.stats_socket import request
from qemu_guest import VhostUserDevice, boot, build_initramfs

IDLE = 4  # seconds the guest sleeps after each report, while the test reads the back end
GUEST = f"""
report() {{
  irq=$(grep virtio0-req /proc/interrupts \
        | awk '{{s=0; for (i=2; i<=NF && $i ~ /^[0-9]+$/; i++) s+=$i; print s}}')
  echo "REPORT $1 $(cat /sys/block/vda/stat | tr -s ' ' | sed 's/^ //') IRQ $irq"
  sleep {IDLE}
}}
report BEFORE
dd if=/dev/vda of=/dev/null bs=64k count=32 iflag=direct
yes PYVIRTIO-STATS | head -c 1048576 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=64k count=16 seek=64 oflag=direct conv=fsync
report AFTER
"""


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("initramfs"),
                           ["virtio_pci", "virtio_blk"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[Path, Path, int]]:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    sock, stats, port = tmp_path / "blk.sock", tmp_path / "blk.stats", _free_port()
    proc = start_pyvirtio_blk(img, sock, "--stats-socket", str(stats),
                              "--metrics-address", f"127.0.0.1:{port}")
    try:
        yield sock, stats, port
    finally:
        assert stop(proc, timeout=10) == 0, sock.with_suffix(".log").read_text()


def guest_report(line: str) -> dict[str, int]:
    m = re.search(r"REPORT \w+ ([\d ]+) IRQ (\d+)", line)
    assert m, line
    f = [int(x) for x in m.group(1).split()]
    # Documentation/block/stat.rst: reads, -, sectors read, -, writes, -, sectors written,
    # ..., field 15: flush requests.
    return {"reads": f[0], "read_sectors": f[2], "writes": f[4], "write_sectors": f[6],
            "flushes": f[14], "irqs": int(m.group(2))}


def steady_totals(stats: Path) -> dict[str, Any]:
    """The queue's lifetime counters, read twice: equal, so the guest was idle."""
    first = request(str(stats))
    time.sleep(0.3)
    second = request(str(stats))
    a, b = first["devices"][0]["queues"][0], second["devices"][0]["queues"][0]  # type: ignore[index]
    assert a["total"] == b["total"], "the guest was not idle while the back end was read"
    return dict(b)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {s.name: s.value for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples if s.labels.get("queue") == "0" and "kind" not in s.labels
            and "le" not in s.labels}


@pytest.mark.timeout(300)
def test_guest_dd_counted_by_the_back_end(initramfs: Path,
                                          backend: tuple[Path, Path, int]) -> None:
    sock, stats, port = backend
    vm = boot(initramfs, GUEST, [VhostUserDevice("vhost-user-blk-pci", sock)], timeout=200)
    try:
        before = guest_report(vm.wait_for("REPORT BEFORE"))
        q0 = steady_totals(stats)
        after = guest_report(vm.wait_for("REPORT AFTER"))
        q1 = steady_totals(stats)
        metrics = scrape(port)
        top = subprocess.run([sys.executable, "-m", "pyvirtio.cli.main", "top",
                              "--stats-socket", str(stats), "--once", "--json",
                              "--interval", "0.3"],
                             capture_output=True, text=True, timeout=30, check=True)
        result = vm.finish()
    finally:
        vm.kill()
    assert result.rc == 0, result.log[-3000:]

    g = {k: after[k] - before[k] for k in after}
    t0, t1 = q0["total"], q1["total"]
    d = {k: t1[k] - t0[k] for k in ("buffers_pushed", "buffers_popped", "used_bytes",
                                     "readable_bytes", "interrupts", "kicks")}
    requests = g["reads"] + g["writes"] + g["flushes"]
    print(f"guest: {g}\nback end: {d}")  # pytest -s shows what was compared
    # fsync's flush: Linux 6.1 accounts it as a write of 0 sectors (field 5), not field 15.
    assert g["reads"] >= 32 and g["writes"] + g["flushes"] >= 17, g
    assert d["buffers_pushed"] == d["buffers_popped"] == requests, (d, g)
    assert d["used_bytes"] == g["read_sectors"] * 512 + requests, (d, g)
    assert d["readable_bytes"] == 16 * requests + g["write_sectors"] * 512, (d, g)
    assert g["read_sectors"] * 512 >= 2 << 20 and g["write_sectors"] * 512 >= 1 << 20
    assert d["interrupts"] / 2 <= g["irqs"] <= d["interrupts"], (d, g)
    assert d["kicks"] >= 1
    # Prometheus: the same lifetime numbers as the socket.
    for name in ("buffers_pushed", "used_bytes", "readable_bytes", "kicks", "interrupts",
                 "interrupts_suppressed"):
        assert metrics[f"pyvirtio_queue_{name}_total"] == t1[name], name
    assert metrics["pyvirtio_queue_used_idx"] == q1["state"]["used_idx"]
    assert metrics["pyvirtio_queue_in_flight"] == 0
    # pyvirtio top: one row for the guest's queue, its indices as the socket shows them.
    (row,) = json.loads(top.stdout)["queues"]
    assert row["used_idx"] == q1["state"]["used_idx"] and row["buffers"] == t1["buffers_pushed"]
    assert row["buffers_per_s"] == 0  # idle
    # blk's latency histogram: one sample per request the guest made, over the back end's life.
    (lat,) = json.loads(top.stdout)["latency"]
    assert lat["requests"] == t1["buffers_pushed"] and lat["p50_us"] <= lat["p99_us"]
