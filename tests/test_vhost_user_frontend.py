"""The vhost-user front end's connect path against back ends that will not talk.

A back end already serving a front end accepts the next connection and closes
it at once (vhost-user has no "busy" message): ``connect`` says so with
VhostUserBusy.  A back end that stays silent is a plain timeout, not "busy".
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.core.errors import PeerError
from pyvirtio.transports.vhost_user.frontend import VhostUserBusy, VhostUserFrontend


def _serve_once(path: Path, close_at_once: bool) -> Iterator[threading.Event]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    done = threading.Event()

    def accept() -> None:
        conn, _ = listener.accept()
        if not close_at_once:
            done.wait(30)
        conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield done
    finally:
        done.set()
        t.join(30)
        listener.close()


@pytest.fixture
def closing_backend(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "busy.sock"
    for _ in _serve_once(path, close_at_once=True):
        yield path


@pytest.fixture
def silent_backend(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "silent.sock"
    for _ in _serve_once(path, close_at_once=False):
        yield path


def test_connection_closed_before_the_first_reply_is_busy(closing_backend: Path) -> None:
    with pytest.raises(VhostUserBusy, match="back end busy"):
        VhostUserFrontend.connect(str(closing_backend), memory_size=1 << 20, timeout=10)


def test_a_silent_back_end_is_a_timeout_not_busy(silent_backend: Path) -> None:
    with pytest.raises(PeerError, match="did not reply in time") as e:
        VhostUserFrontend.connect(str(silent_backend), memory_size=1 << 20, timeout=0.3)
    assert not isinstance(e.value, VhostUserBusy)
