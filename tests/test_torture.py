"""``pyvirtio torture`` against real back ends, and against back ends broken on purpose.

* pyvirtio-blk and pyvirtio-net (real processes) reject every case;
* the judge is checked by planting faults: a small kit device
  (docs/device-kit.md) that, on one request type, writes outside its
  buffers (CORRUPTED), exits (CRASHED, and ``--restart-cmd`` brings it back
  for the next case), blocks its event loop (WEDGED), or keeps one fd per
  connection (LEAKED);
* qemu-storage-daemon: a few cases run to the end and are reported (its
  verdicts are a finding, not a contract: the README shows them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blk_peers import start_pyvirtio_blk, start_qsd, stop, wait_for_socket
from pyvirtio.torture.cases import CASES, select
from pyvirtio.torture.harness import MEMORY_SIZE
from pyvirtio.torture.judge import Verdict, listener_pid

pytestmark = pytest.mark.timeout(120)

ENV = dict(os.environ, PYVIRTIO_PURE_PYTHON=os.environ.get("PYVIRTIO_PURE_PYTHON", "1"))


def torture(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pyvirtio.cli.main", "torture", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(proc: subprocess.Popen[str]) -> tuple[int, list[dict[str, str]], str]:
    out, err = proc.communicate(timeout=100)
    return proc.returncode, json.loads(out) if out.strip() else [], err


def verdicts(results: list[dict[str, str]]) -> dict[str, str]:
    return {r["case"]: r["verdict"] for r in results}


def test_there_are_at_least_40_cases_per_device_ring_and_socket() -> None:
    for device in ("blk", "net"):
        cases = select(device)
        assert len(cases) >= 40
        assert {c.side for c in cases} == {"ring", "socket"}
        assert all(c.description for c in cases)
    proc = torture("--list", "--device", "net")
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert len(out.splitlines()) == len(select("net"))


def test_bad_usage_is_one_line(tmp_path: Path) -> None:
    proc = torture("--socket-path", str(tmp_path / "s"), "--cases", "no_such_case")
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1
    assert "no_such_case" in err
    proc = torture("--socket-path", str(tmp_path / "missing.sock"))
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "no vhost-user socket" in err


def test_pyvirtio_back_ends_reject_every_case(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    before = img.read_bytes()
    blk = start_pyvirtio_blk(img, tmp_path / "blk.sock")
    net_sock = tmp_path / "net.sock"
    with open(tmp_path / "net.log", "wb") as log:
        net = subprocess.Popen([sys.executable, "-m", "pyvirtio.cli.net", "--socket-path",
                                str(net_sock), "--switch", "sw"], stdout=log,
                               stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_for_socket(net_sock, net)
        # Both runs at once: each back end serves one front end at a time anyway.
        runs = [torture("--socket-path", str(tmp_path / "blk.sock"), "--pid", str(blk.pid),
                        "--settle", "0.1", "--json"),
                torture("--socket-path", str(net_sock), "--pid", str(net.pid),
                        "--device", "net", "--settle", "0.1", "--json")]
        (blk_rc, blk_res, blk_err), (net_rc, net_res, net_err) = [finish(p) for p in runs]
        assert blk.poll() is None and net.poll() is None
    finally:
        stop(blk)
        stop(net)
    for device, rc, res, err in (("blk", blk_rc, blk_res, blk_err),
                                 ("net", net_rc, net_res, net_err)):
        assert [r["case"] for r in res] == [c.name for c in select(device)], err
        bad = {r["case"]: r["detail"] for r in res if r["verdict"] != "REJECTED"}
        assert bad == {}, f"{device}: {bad}"
        assert rc == 0
        assert "not judged" not in err  # --pid was given: every verdict was judged
    assert img.read_bytes() == before  # the tool writes nothing a disk did not hold


FAULTY = '''
import os, struct, sys, time
from pyvirtio.vhost_user import Device, DeviceId, VhostUserServer

MODE, PATH = sys.argv[1], sys.argv[2]


class Faulty(Device):
    """Answers reads with zeros; on request type 0x7fff it misbehaves as MODE says."""

    device_id = DeviceId.BLOCK
    config = struct.pack("<Q", 2048).ljust(60, b"\\0")

    def __init__(self):
        self.kept = []

    def set_features(self, features):
        super().set_features(features)
        if MODE == "leak":  # one fd per connection, never closed
            self.kept.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))

    def handle(self, queue, req):
        head = req.read()[:4].ljust(4, b"\\0")
        if struct.unpack("<I", head)[0] == 0x7FFF:
            if MODE == "crash":
                os._exit(3)
            if MODE == "hang":
                time.sleep(3600)
            if MODE == "corrupt":
                mm = req.writable[-1].obj  # the mapping of all of guest memory
                mm[len(mm) - 1] ^= 0xFF
        return req.write(bytes(sum(len(v) for v in req.writable)))


VhostUserServer(Faulty(), socket_path=PATH).serve_forever()
'''


def start_faulty(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], Path, str]:
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    sock = tmp_path / f"{mode}.sock"
    cmd = f"exec {sys.executable} {script} {mode} {sock}"
    proc = subprocess.Popen(cmd, shell=True, env=ENV, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, proc)
    return proc, sock, cmd


@pytest.mark.parametrize(("mode", "verdict"), [("corrupt", Verdict.CORRUPTED),
                                               ("hang", Verdict.WEDGED),
                                               ("leak", Verdict.LEAKED)])
def test_planted_faults_are_judged(tmp_path: Path, mode: str, verdict: Verdict) -> None:
    proc, sock, _cmd = start_faulty(tmp_path, mode)
    try:
        rc, res, err = finish(torture("--socket-path", str(sock), "--pid", str(proc.pid),
                                      "--cases", "len_zero,blk_unknown_type", "--timeout", "1",
                                      "--settle", "0.1", "--json"))
    finally:
        stop(proc)
    got = verdicts(res)
    # Leaking happens on every connection; the others only on request type 0x7fff.
    assert got == {"len_zero": "LEAKED" if mode == "leak" else "REJECTED",
                   "blk_unknown_type": verdict.value}, err
    assert rc == sum(v != "REJECTED" for v in got.values())
    detail = {r["case"]: r["detail"] for r in res}["blk_unknown_type"]
    if mode == "corrupt":
        assert f"{MEMORY_SIZE - 1:#x}+1" in detail  # the last byte of guest memory


def test_a_crash_is_judged_and_the_back_end_restarted(tmp_path: Path) -> None:
    proc, sock, cmd = start_faulty(tmp_path, "crash")
    restarted = None
    try:
        rc, res, err = finish(torture("--socket-path", str(sock), "--pid", str(proc.pid),
                                      "--cases", "blk_unknown_type,len_zero,blk_unknown_type",
                                      "--restart-cmd", cmd, "--settle", "0.1", "--json"))
        restarted = listener_pid(str(sock))
    finally:
        stop(proc)
        if restarted is not None:
            os.kill(restarted, signal.SIGKILL)
    assert proc.returncode == 3  # it exited by itself, as planted
    assert [r["verdict"] for r in res] == ["CRASHED", "REJECTED", "CRASHED"], err
    assert "restarted" in res[0]["detail"]
    assert rc == 2
    assert restarted is not None and restarted != proc.pid


def test_without_pid_a_crash_is_still_seen_and_the_rest_is_named(tmp_path: Path) -> None:
    proc, sock, _cmd = start_faulty(tmp_path, "crash")
    try:
        rc, res, err = finish(torture("--socket-path", str(sock), "--cases", "blk_unknown_type",
                                      "--settle", "0.1", "--json"))
    finally:
        stop(proc)
    assert verdicts(res) == {"blk_unknown_type": "CRASHED"} and rc == 1
    assert "not judged" in err and "LEAKED" in err


def test_qemu_storage_daemon_runs_to_the_end(tmp_path: Path) -> None:
    """A peer we did not write: the run completes and reports every case it was given."""
    img = tmp_path / "qsd.img"
    img.write_bytes(bytes(4 << 20))
    sock = tmp_path / "qsd.sock"
    qsd = start_qsd(img, sock)
    cmd = f"exec {Path(__file__).resolve().parent.parent}/scripts/peers/ref-blk-backend.sh " \
          f"{img} {sock}"
    names = ["chain_loop", "len_zero", "blk_sector_past_end", "sock_unknown_request"]
    restarted = None
    try:
        rc, res, err = finish(torture("--socket-path", str(sock), "--pid", str(qsd.pid),
                                      "--cases", ",".join(names), "--restart-cmd", cmd,
                                      "--settle", "0.1", "--json"))
        restarted = listener_pid(str(sock))
    finally:
        stop(qsd)
        if restarted is not None and restarted != qsd.pid:
            os.kill(restarted, signal.SIGKILL)
    assert [r["case"] for r in res] == names, err
    assert all(r["verdict"] in {v.value for v in Verdict} for r in res)
    assert rc == sum(r["verdict"] != "REJECTED" for r in res)
    assert set(names) <= set(CASES)


def test_readme_security_table_names_every_case() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Security"):]
    rows = [line.split("`")[1] for line in section.splitlines()
            if line.startswith("| `")]
    assert rows == list(CASES)
    assert f"{len(select('blk'))} cases for a blk back end and {len(select('net'))} " \
           f"for a net one" in " ".join(section.split())
