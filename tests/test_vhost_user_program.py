"""Back-end program conventions (BackendProgram, serve) and one loop hosting several devices.

QEMU docs/interop/vhost-user.rst "Backend program conventions"; the socket
rules of ``listen_unix`` (mode 0600, no symlinks, no live socket stolen, a
stale one replaced).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kit_devices import EchoDevice
from pyvirtio.core.errors import CallerError
from pyvirtio.io.loop import EventLoop
from pyvirtio.transports.vhost_user.frontend import VhostUserBusy, VhostUserFrontend
from pyvirtio.transports.vhost_user.program import BackendProgram
from pyvirtio.transports.vhost_user.server import VhostUserServer, listen_unix

pytestmark = pytest.mark.timeout(60)


def echo(fe: VhostUserFrontend, index: int, text: bytes) -> bytes:
    q = fe.queues[index]
    out, inn = fe.alloc(len(text)), fe.alloc(64)
    fe.memory.write(out, text)
    q.queue.add([(out, len(text))], [(inn, 64)], token=text)
    q.notify()
    for _ in range(100):
        got = q.queue.get_buf()
        if got is not None:
            return fe.memory.read(inn, got[1])
        q.wait(0.1)
    raise AssertionError("no answer")


def test_one_loop_serves_several_devices_at_once(tmp_path: Path) -> None:
    loop = EventLoop()
    paths = [str(tmp_path / f"dev{i}.sock") for i in range(3)]
    servers = [VhostUserServer(EchoDevice(queues=1, xor=True), socket_path=p, loop=loop)
               for p in paths]
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    fronts: list[VhostUserFrontend] = []
    try:
        for p in paths:
            fe = VhostUserFrontend.connect(p, memory_size=1 << 20)
            fe.negotiate(fe.get_features())  # everything, the packed ring too
            assert fe.packed
            fe.setup_ring(0, 16)
            fronts.append(fe)
        for round_ in range(3):
            for i, fe in enumerate(fronts):
                assert echo(fe, 0, f"dev{i}-{round_}".encode()) == f"dev{i}-{round_}".encode()
        assert all(s.connections == 1 for s in servers)
    finally:
        for fe in fronts:
            fe.close()
        def close_all() -> None:
            for s in servers:
                s.close()
            loop.stop()

        loop.call_soon_threadsafe(close_all)
        thread.join(10)
        loop.close()
    assert not any(os.path.exists(p) for p in paths)


def test_a_second_front_end_is_refused_while_one_is_served(tmp_path: Path) -> None:
    path = str(tmp_path / "one.sock")
    server = VhostUserServer(EchoDevice(queues=1), socket_path=path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with VhostUserFrontend.connect(path, memory_size=1 << 20) as first:
            with pytest.raises(VhostUserBusy):
                VhostUserFrontend.connect(path, memory_size=1 << 20, timeout=5)
            assert first.get_features()  # the first one is unharmed
        assert server.refused == 1
        # Once the first has left, the next is served.
        with VhostUserFrontend.connect(path, memory_size=1 << 20) as again:
            assert again.get_features()
    finally:
        server.stop()
        thread.join(10)


def test_socket_rules(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    live = listen_unix(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(CallerError, match="another process listens"):
            listen_unix(path)
    finally:
        live.close()
    # Its listener is gone: stale, replaced.
    again = listen_unix(path, mode=0o660)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    again.close()
    regular = tmp_path / "file"
    regular.write_text("data")
    with pytest.raises(CallerError, match="not a socket"):
        listen_unix(str(regular))
    assert regular.read_text() == "data"
    link = tmp_path / "link.sock"
    link.symlink_to(tmp_path / "elsewhere.sock")
    with pytest.raises(CallerError, match="symlink"):
        listen_unix(str(link))
    with pytest.raises(CallerError, match="does not exist"):
        listen_unix(str(tmp_path / "missing" / "x.sock"))


def test_listen_fd_must_be_a_listening_unix_socket() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(CallerError, match="not a listening"):
            VhostUserServer(EchoDevice(), listen_fd=a.fileno())
    finally:
        a.close()
        b.close()


def test_program_capabilities_descriptor_and_usage_errors(
        capsys: pytest.CaptureFixture[str]) -> None:
    prog = BackendProgram("pyvirtio-blk", "a disk", "block", ["read-only"])
    with pytest.raises(SystemExit) as exit_:
        prog.parse_args(["--print-capabilities"])
    assert exit_.value.code == 0
    assert json.loads(capsys.readouterr().out) == {"type": "block", "features": ["read-only"]}
    with pytest.raises(SystemExit):
        prog.parse_args(["--print-descriptor"])
    desc = json.loads(capsys.readouterr().out)
    assert desc["type"] == "block" and desc["binary"].endswith("pyvirtio-blk")
    with pytest.raises(SystemExit) as exit_:
        prog.parse_args([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--socket-path" in err
    args = prog.parse_args(["--socket-path", "/x", "--socket-mode", "0640"])
    assert args.socket_mode == 0o640


def test_program_fails_with_one_line_when_it_cannot_listen(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prog = BackendProgram("my-echo", "echo", "console")
    args = prog.parse_args(["--socket-path", str(tmp_path / "nodir" / "x.sock")])
    assert prog.serve(EchoDevice(), args) == 1
    err = capsys.readouterr().err
    assert err.startswith("my-echo: ") and "does not exist" in err and err.count("\n") == 1


def test_sigterm_ends_a_served_program(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from kit_devices import EchoDevice\n"
            "from pyvirtio.vhost_user import BackendProgram\n"
            "p = BackendProgram('t', 't', 'console'); a = p.parse_args(sys.argv[2:])\n"
            "sys.exit(p.serve(EchoDevice(), a))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent),
                             "--socket-path", str(path)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with VhostUserFrontend.connect(str(path), memory_size=1 << 20) as fe:
            assert fe.get_queue_num() == 2
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _out, err = proc.communicate()
    assert "connected" in err and "SIGTERM: stopping" in err
    assert not path.exists()
