"""The two-process demo (VIRTIO 1.2 §2.7; §4.1.4.8 legacy virtio-pci).

Real guest and host processes, each suppression mode; and ``--ring packed``
(§2.8), the same driver and device in one process over the in-process
transport.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.core.errors import PeerError
from pyvirtio.demo import wire
from pyvirtio.demo.frames import check_frame, frame_length, frame_seq, make_frame
from pyvirtio.demo.host import DemoConfig, DemoHost
from pyvirtio.transports import pci_legacy as pci

PYVIRTIO = [sys.executable, "-m", "pyvirtio.cli.main"]
MODES = ("none", "flags", "event-idx")


RINGS = ("split", "packed")


def run_demo_json(mode: str, ring: str) -> dict[str, Any]:
    out = subprocess.run([*PYVIRTIO, "demo", "--seconds", "2", "--json", "--suppression", mode,
                          "--ring", ring],
                         capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], dict[str, Any]]:
    return {(ring, mode): run_demo_json(mode, ring) for ring in RINGS for mode in MODES}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", MODES)
def test_demo_moves_real_frames(results: dict[tuple[str, str], dict[str, Any]], mode: str,
                                ring: str) -> None:
    data = results[ring, mode]
    assert data["suppression"] == mode and data["ring"] == ring and data["ok"] is True
    assert (int(data["features"], 16) >> 34 & 1) == (ring == "packed")
    names = [q["name"] for q in data["queues"]]
    assert names == ["rx", "tx"]
    rx, tx = data["queues"]
    frames = data["frames"]
    assert frames["sent"] > 0 and frames["errors"] == 0
    assert frames["received"] == frames["sent"] == frames["verified"]
    # Mergeable receive buffers of 2 KiB: one buffer per frame, one tx chain per frame.
    assert tx["buffers"] == frames["sent"] and rx["buffers"] == frames["received"]
    for q in data["queues"]:
        assert q["kicks_per_1000"] == pytest.approx(1000 * q["kicks"] / q["buffers"], abs=0.01)
        assert q["interrupts_per_1000"] == pytest.approx(
            1000 * q["interrupts"] / q["buffers"], abs=0.01)
    # The host counted (eventfd counters, or the in-process transport's calls) what the
    # guest decided and received.
    assert data["driver_view"]["kicks"] == [rx["kicks"], tx["kicks"]]
    assert data["driver_view"]["interrupts"] == [rx["interrupts"], tx["interrupts"]]
    assert data["total"]["buffers"] == rx["buffers"] + tx["buffers"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ring", RINGS)
def test_suppression_saves_notifications(results: dict[tuple[str, str], dict[str, Any]],
                                         ring: str) -> None:
    none, flags, eidx = (results[ring, m] for m in MODES)
    assert eidx["total"]["kicks_per_1000"] < none["total"]["kicks_per_1000"]
    # Without suppression every transmitted frame kicks the device.
    assert none["queues"][1]["kicks"] == none["queues"][1]["buffers"]
    assert flags["features"] == none["features"]  # EVENT_IDX not negotiated in either
    assert int(eidx["features"], 16) & (1 << 29)


@pytest.mark.timeout(60)
def test_table_output() -> None:
    out = subprocess.run([*PYVIRTIO, "demo", "--seconds", "0.5", "--suppression", "flags"],
                         capture_output=True, text=True, timeout=50, check=False)
    assert out.returncode == 0, out.stderr
    for word in ("rx", "tx", "total", "kicks", "interrupts", "verified"):
        assert word in out.stdout


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _diagnose(sid: int) -> str:
    """State, wait channel and signal masks of the session's processes (for a failure)."""
    out = []
    for pid in _session_pids(sid):
        fields = {}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("Name", "State", "SigBlk", "SigIgn", "SigCgt", "Threads"):
                    fields[key] = value.strip()
            fields["wchan"] = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            continue
        out.append(f"{pid} {fields}")
    return "; ".join(out)


@pytest.mark.timeout(60)
def test_ctrl_c_leaves_no_process() -> None:
    proc = subprocess.Popen([*PYVIRTIO, "demo", "--seconds", "30"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while len(_session_pids(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_session_pids(proc.pid)) >= 2, "the guest process never started"
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 20 s after Ctrl-C: {_diagnose(proc.pid)}") from None
        assert rc == 130
        deadline = time.monotonic() + 10
        while _session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _session_pids(proc.pid) == []
        assert proc.stderr is not None
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(30)
def test_host_drops_a_malformed_guest() -> None:
    host = DemoHost(DemoConfig("event-idx", 1.0, 64))
    try:
        host.sel.register(host.sock, 1, None)
        guest = host._guest_sock
        guest.send(wire.encode_read(pci.QUEUE_NUM, 2))
        guest.send(b"Zjunk")
        result = host.run()
        assert guest.recv(64) == wire.encode_value(64)
        assert any("malformed" in e for e in result.errors)
        assert not result.ok
    finally:
        host.close()


def test_wire_codec_round_trip_and_garbage() -> None:
    assert wire.decode_guest(wire.encode_write(16, 2, 1)) == wire.Access(True, 16, 2, 1)
    assert wire.decode_guest(wire.encode_read(12, 2)) == wire.Access(False, 12, 2, 0)
    assert wire.decode_guest(wire.encode_stats({"a": 1})) == wire.Stats({"a": 1})
    assert wire.decode_host(wire.encode_value(7), []) == wire.Value(7)
    assert wire.decode_host(wire.encode_ioeventfd(16, 2, 1, True), [9]) == wire.IoEventFd(
        16, 2, 1, 9)
    assert wire.decode_host(wire.encode_ioeventfd(16, 2, 1, False), []) == wire.IoEventFd(
        16, 2, 1, -1)
    for bad in (b"", b"R", b"W\x03" + bytes(6), b"S[1]", b"S{", b"Q" * 8):
        with pytest.raises(PeerError):
            wire.decode_guest(bad)
    with pytest.raises(PeerError):
        wire.decode_host(wire.encode_ioeventfd(16, 2, 1, True), [])
    with pytest.raises(PeerError):
        wire.decode_host(wire.encode_value(1), [3])
    with pytest.raises(PeerError):
        wire.decode_host(b"V", [])


def test_frames() -> None:
    mac = bytes(6)
    for seq in (0, 1, 2, 1000, 2**40):
        f = make_frame(seq, mac)
        assert len(f) == frame_length(seq) and 60 <= len(f) <= 1514
        assert frame_seq(f) == seq and check_frame(f, seq, mac) is None
    bad = bytearray(make_frame(5, mac))
    bad[-1] ^= 1
    assert "differ" in (check_frame(bytes(bad), 5, mac) or "")
    assert "out of order" in (check_frame(make_frame(6, mac), 5, mac) or "")
    assert frame_seq(b"short") is None


def test_socketpair_is_seqpacket() -> None:
    host = DemoHost(DemoConfig("none", 1.0, 16))
    try:
        assert host.sock.type == socket.SOCK_SEQPACKET
        assert host.config.memory_size() >= 4 << 20
    finally:
        host.close()
