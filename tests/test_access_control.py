"""Who may connect: front ends of another uid are refused unless ``--allow-uid`` names them.

The socket's mode (0600 by default) is the first fence; the server's
``SO_PEERCRED`` check at accept (Linux socket(7)) is the second, for sockets
whose mode lets others reach them and for inherited ``--fd`` sockets.  The
tests run as root and connect for real as ``nobody``: a forked child drops to
that uid with ``os.setuid`` and talks vhost-user to the back end, over a
socket made world-writable so that only the uid check stands in the way.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kit_devices import EchoDevice
from pyvirtio.transports.vhost_user.messages import HEADER, VERSION, Request
from pyvirtio.transports.vhost_user.program import BackendProgram
from pyvirtio.transports.vhost_user.server import VhostUserServer

pytestmark = pytest.mark.timeout(120)

NOBODY = pwd.getpwnam("nobody")
#: GET_FEATURES' reply: header and a u64.
REPLY_LEN = HEADER.size + 8
WAIT = 10.0  # a liveness bound, not a timing assertion


def test_the_tests_run_as_root() -> None:
    # Dropping to another uid needs root (the project's tests run as root).
    assert os.getuid() == 0


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory ``nobody`` may enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pyvirtio-acl-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def connect_as(uid: int, gid: int, path: str) -> tuple[int, bytes]:
    """Fork, become ``uid``/``gid``, send GET_FEATURES on ``path``; (child's uid, reply bytes).

    The reply is empty when the back end closed the connection instead of answering.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no logging, no pytest, only system calls, then _exit
        status = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(WAIT)
            sock.connect(path)
            reply = b""
            try:
                sock.sendall(HEADER.pack(Request.GET_FEATURES, VERSION, 0))
                while len(reply) < REPLY_LEN:
                    chunk = sock.recv(REPLY_LEN - len(reply))
                    if not chunk:
                        break
                    reply += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass  # refused: closed before or after our request arrived
            os.write(w, os.getuid().to_bytes(4, "little") + reply)
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    data = b""
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return int.from_bytes(data[:4], "little"), data[4:]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _serve(path: Path, allow: tuple[int, ...]) -> tuple[VhostUserServer, threading.Thread, Lines]:
    lines = Lines()
    logger = logging.getLogger(f"test-acl-{path.name}-{len(allow)}")
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    server = VhostUserServer(EchoDevice(), socket_path=str(path), socket_mode=0o666,
                             allow_uids=allow, logger=logger)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, lines


def _stop(server: VhostUserServer, thread: threading.Thread) -> None:
    server.stop()
    thread.join(WAIT)
    assert not thread.is_alive()


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cond(), what


def test_another_uid_is_refused_with_one_log_line(shared_dir: Path) -> None:
    server, thread, lines = _serve(shared_dir / "vu.sock", ())
    try:
        uid, reply = connect_as(NOBODY.pw_uid, NOBODY.pw_gid, str(shared_dir / "vu.sock"))
        assert uid == NOBODY.pw_uid
        assert reply == b""  # closed without an answer
        _wait_for(lambda: server.denied == 1, "the refusal is counted")
        refusals = [m for m in lines.lines if "refusing" in m]
        assert len(refusals) == 1
        assert re.fullmatch(rf"vhost-user: refusing a front end of uid {NOBODY.pw_uid} "
                            r"\(pid \d+\): not this back end's user, not root, not given "
                            r"with --allow-uid", refusals[0]), refusals
        assert server.connections == 0  # never became the served front end
        # Our own uid is still served at once.
        own, reply = connect_as(os.getuid(), os.getgid(), str(shared_dir / "vu.sock"))
        assert own == os.getuid() and len(reply) == REPLY_LEN
        assert HEADER.unpack_from(reply)[0] == Request.GET_FEATURES
    finally:
        _stop(server, thread)


def test_an_allowed_uid_is_served(shared_dir: Path) -> None:
    server, thread, lines = _serve(shared_dir / "vu.sock", (NOBODY.pw_uid,))
    try:
        uid, reply = connect_as(NOBODY.pw_uid, NOBODY.pw_gid, str(shared_dir / "vu.sock"))
        assert uid == NOBODY.pw_uid
        assert len(reply) == REPLY_LEN
        code, _flags, size = HEADER.unpack_from(reply)
        assert (code, size) == (Request.GET_FEATURES, 8)
        assert server.denied == 0 and not [m for m in lines.lines if "refusing" in m]
        _wait_for(lambda: server.connections == 1, "the connection is counted")
    finally:
        _stop(server, thread)


def test_allow_uid_option_takes_numbers_and_names_and_repeats() -> None:
    cli = BackendProgram("t", "test", "rng")
    args = cli.parser.parse_args(["--socket-path", "x", "--allow-uid", "nobody",
                                  "--allow-uid", "1234"])
    assert args.allow_uid == [NOBODY.pw_uid, 1234]
    assert cli.parser.parse_args(["--socket-path", "x"]).allow_uid == []


def test_allow_uid_option_refuses_unknown_users(capsys: pytest.CaptureFixture[str]) -> None:
    cli = BackendProgram("t", "test", "rng")
    with pytest.raises(SystemExit) as info:
        cli.parser.parse_args(["--socket-path", "x", "--allow-uid", "no-such-user-here"])
    assert info.value.code == 2
    assert "neither a uid nor a user name" in capsys.readouterr().err


@pytest.mark.parametrize("allow", [False, True])
def test_back_end_program_applies_allow_uid(shared_dir: Path, allow: bool) -> None:
    # The whole path: command line -> serve_all -> VhostUserServer, in a real pyvirtio-rng.
    sock = shared_dir / "rng.sock"
    cmd = [sys.executable, "-m", "pyvirtio.devices.rng", "--socket-path", str(sock),
           "--socket-mode", "0666"] + (["--allow-uid", "nobody"] if allow else [])
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock.exists, "the back end listens")
        uid, reply = connect_as(NOBODY.pw_uid, NOBODY.pw_gid, str(sock))
        assert uid == NOBODY.pw_uid
        assert len(reply) == (REPLY_LEN if allow else 0)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    refused = f"refusing a front end of uid {NOBODY.pw_uid}" in err
    assert refused is not allow, err
