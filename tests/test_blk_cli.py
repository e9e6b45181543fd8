"""The pyvirtio-blk command line (QEMU vhost-user.rst "Backend program conventions")."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blk_peers import REPO, start_pyvirtio_blk, stop, wait_for_socket
from pyvirtio.cli import blk as blk_cli
from pyvirtio.cli.main import build_parser


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirtio.cli.blk", *args],
                          capture_output=True, text=True, timeout=60)


def test_help_lists_the_convention_options() -> None:
    out = run("--help").stdout
    for opt in ("--socket-path", "--fd", "--print-capabilities", "--blk-file", "--read-only",
                "--num-queues", "--poll"):
        assert opt in out


def test_also_reachable_as_pyvirtio_blk_subcommand() -> None:
    args = build_parser().parse_args(["blk", "--socket-path", "/x", "--blk-file", "/y",
                                      "--num-queues", "2"])
    assert args.func.func is blk_cli.run and args.num_queues == 2


def test_print_capabilities_is_the_block_json_and_ignores_other_options() -> None:
    res = run("--print-capabilities", "--blk-file", "/nonexistent")
    assert res.returncode == 0
    caps = json.loads(res.stdout)
    assert caps == {"type": "block", "features": ["read-only", "blk-file"]}


def test_descriptor_is_a_vhost_user_json_backend() -> None:
    shipped = json.loads((REPO / "src/pyvirtio/data/50-pyvirtio-blk.json").read_text())
    assert shipped["type"] == "block" and shipped["binary"].startswith("/")
    assert isinstance(shipped["description"], str)
    res = run("--print-descriptor")
    desc = json.loads(res.stdout)
    assert desc["type"] == "block" and os.path.isabs(desc["binary"])


def test_start_up_failures_exit_non_zero(tmp_path: Path) -> None:
    assert run("--blk-file", "x").returncode == 2            # no socket
    assert run("--socket-path", str(tmp_path / "s")).returncode == 2  # no image
    res = run("--socket-path", str(tmp_path / "s"), "--blk-file", str(tmp_path / "missing"))
    assert res.returncode == 1 and "cannot open" in res.stderr
    res = run("--socket-path", "a", "--fd", "3", "--blk-file", "x")
    assert res.returncode == 2  # mutually exclusive


@pytest.mark.timeout(60)
def test_sigterm_ends_cleanly(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    proc = start_pyvirtio_blk(img, sock)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not sock.exists()
    assert "serving" in sock.with_suffix(".log").read_text()


@pytest.mark.timeout(60)
def test_inherited_listening_fd(tmp_path: Path) -> None:
    from pyvirtio.devices.blk.driver import BlkDriver

    img = tmp_path / "d.img"
    img.write_bytes(b"F" * (1 << 20))
    path = tmp_path / "fd.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    fd = lsock.fileno()
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio.cli.blk", "--fd", str(fd),
                             "--blk-file", str(img)], pass_fds=(fd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lsock.close()
    try:
        with BlkDriver.connect(str(path), timeout=10) as drv:
            assert drv.read(0, 512) == b"F" * 512
    finally:
        assert stop(proc) == 0


def test_blk_file_count_must_match_the_sockets(tmp_path: Path) -> None:
    res = run("--socket-path", str(tmp_path / "a"), "--socket-path", str(tmp_path / "b"),
              "--blk-file", str(tmp_path / "a.img"))
    assert res.returncode == 2
    assert "1 --blk-file for 2 socket(s)" in res.stderr and len(res.stderr.splitlines()) == 1
    res = run("--socket-path", str(tmp_path / "a"), "--blk-file", "x", "--blk-file", "y")
    assert res.returncode == 2 and "2 --blk-file for 1 socket(s)" in res.stderr


@pytest.mark.timeout(60)
def test_two_sockets_two_images_each_front_end_its_own_disk(tmp_path: Path) -> None:
    """One process, two disks: --blk-file pairs with --socket-path in order."""
    from pyvirtio.devices.blk.driver import BlkDriver

    imgs = [tmp_path / "a.img", tmp_path / "b.img"]
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    imgs[0].write_bytes(b"A" * (1 << 20))
    imgs[1].write_bytes(b"B" * (2 << 20))
    log = open(tmp_path / "blk.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio.cli.blk", "--aio", "threads",
                             "--socket-path", str(socks[0]), "--blk-file", str(imgs[0]),
                             "--socket-path", str(socks[1]), "--blk-file", str(imgs[1])],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        for sock in socks:
            wait_for_socket(sock, proc)
        with BlkDriver.connect(str(socks[0]), timeout=10) as a, \
                BlkDriver.connect(str(socks[1]), timeout=10) as b:
            assert (a.config.capacity, b.config.capacity) == (2048, 4096)
            assert a.read(4096, 512) == b"A" * 512 and b.read(4096, 512) == b"B" * 512
            a.write(0, b"a" * 4096)
            b.write(8192, b"b" * 4096)
            a.flush()
            b.flush()
            assert b.read(0, 512) == b"B" * 512 and a.read(8192, 512) == b"A" * 512
    finally:
        assert stop(proc) == 0
    assert imgs[0].read_bytes()[:4097] == b"a" * 4096 + b"A"
    assert imgs[1].read_bytes()[:4096] == b"B" * 4096
    assert imgs[1].read_bytes()[8192:12289] == b"b" * 4096 + b"B"
    assert (tmp_path / "blk.log").read_text().count("front end connected") == 2


@pytest.mark.timeout(60)
def test_null_disk_per_socket(tmp_path: Path) -> None:
    from pyvirtio.devices.blk.driver import BlkDriver

    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio.cli.blk", "--null", "1M",
                             "--socket-path", str(socks[0]), "--socket-path", str(socks[1])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for sock in socks:
            wait_for_socket(sock, proc)
            with BlkDriver.connect(str(sock), timeout=10) as drv:
                assert drv.config.capacity == 2048 and drv.read(0, 512) == bytes(512)
    finally:
        assert stop(proc) == 0


def test_latency_on_an_image_needs_the_thread_engine(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    res = run("--socket-path", str(tmp_path / "s"), "--blk-file", str(img),
              "--latency-us", "100")
    assert res.returncode == 2 and "--aio threads" in res.stderr
    assert "Traceback" not in res.stderr
