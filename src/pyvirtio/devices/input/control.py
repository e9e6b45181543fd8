"""Typing on a running pyvirtio-input: its control socket, and lines from stdin.

The control socket is a Unix stream socket the device owns and watches on
the kit's event loop (no thread).  A client connects, sends UTF-8 text,
shuts down its write side and reads one line back: ``ok N`` (N events
queued for the guest) or ``error: WHY`` (nothing was typed).
:func:`type_text` is that client (``pyvirtio input type``).  With
:class:`StdinTyper` every line read from stdin is typed, Enter included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING

from pyvirtio.core.errors import CallerError
from pyvirtio.io.loop import EventLoop
from pyvirtio.transports.vhost_user.server import listen_unix

if TYPE_CHECKING:
    from pyvirtio.devices.input.device import InputDevice

__all__ = ["MAX_TEXT", "ControlSocket", "StdinTyper", "type_text"]

log = logging.getLogger("pyvirtio.input")

#: The most a client may send at once (bytes of UTF-8).
MAX_TEXT = 65536


def _answer(device: InputDevice, raw: bytes) -> str:
    try:
        text = raw.decode()
        queued = device.type_text(text)
    except (UnicodeDecodeError, ValueError) as exc:
        return f"error: {exc}"
    if queued == 0 and text:
        return "error: the guest is not taking events (backlog full); nothing was typed"
    return f"ok {queued}"


class ControlSocket:
    """The device's control socket at ``path`` on ``loop``."""

    def __init__(self, device: InputDevice, path: str, loop: EventLoop) -> None:
        self.device, self.path, self.loop = device, path, loop
        # The vhost-user socket's rules: 0600, a stale socket replaced, a live
        # one or any other file refused.
        try:
            self.listener = listen_unix(path)
        except CallerError as exc:
            raise CallerError(f"control socket: {exc}") from None
        self.listener.setblocking(False)
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self.clients[conn.fileno()] = (conn, bytearray())
        self.loop.add_reader(conn.fileno(), lambda: self._readable(conn))

    def _readable(self, conn: socket.socket) -> None:
        _, buf = self.clients[conn.fileno()]
        try:
            chunk = conn.recv(MAX_TEXT + 1 - len(buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        buf += chunk
        if len(buf) > MAX_TEXT:
            reply = f"error: more than {MAX_TEXT} bytes at once"
        elif chunk:
            return
        else:
            reply = _answer(self.device, bytes(buf))
        log.info("input: control socket: %s", reply)
        with contextlib.suppress(OSError):
            conn.send((reply + "\n").encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self.loop.remove_reader(conn.fileno())
        self.clients.pop(conn.fileno(), None)
        conn.close()

    def close(self) -> None:
        for conn, _ in list(self.clients.values()):
            self._drop(conn)
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class StdinTyper:
    """Types every line read from ``fd`` (stdin), Enter included; stops at end of file."""

    def __init__(self, device: InputDevice, loop: EventLoop, fd: int = 0) -> None:
        self.device, self.loop, self.fd = device, loop, fd
        self.partial = b""
        self.was_blocking = os.get_blocking(fd)
        os.set_blocking(fd, False)  # restored by close(): a terminal is shared
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        if not chunk:  # end of file: a last line without its newline is typed too
            self.close()
            chunk = b"\n" if self.partial else b""
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            log.info("input: stdin: %s", _answer(self.device, line + b"\n"))

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.set_blocking(self.fd, self.was_blocking)


def type_text(path: str, text: str, timeout: float = 10.0) -> str:
    """Send ``text`` to the control socket at ``path``; the device's one-line answer."""
    data = text.encode()
    if len(data) > MAX_TEXT:
        raise CallerError(f"{len(data)} bytes of text: send at most {MAX_TEXT} at once")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return reply.decode(errors="replace").strip()
