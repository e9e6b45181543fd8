"""The stats socket: a Unix socket that answers one JSON document per connection (docs/stats.md).

A back end started with ``--stats-socket PATH`` listens there (created as the
vhost-user socket is, :func:`~pyvirtio.transports.vhost_user.server.listen_unix`:
mode 0600 by default, never over a live socket, a symlink or another file)
on the loop that serves its rings.  A client connects and, optionally, sends
one request line (JSON, at most 4 KiB):

* nothing (shut the writing side, or just wait :data:`REQUEST_WAIT` s) or
  ``{"request": "snapshot"}``: the statistics snapshot (schema
  ``pyvirtio-stats``);
* ``{"request": "trace", "seconds": S}``: every ring records its kicks and
  interrupt decisions for S seconds (at most :data:`MAX_TRACE_SECONDS`), then
  the trace (schema ``pyvirtio-trace``) is the answer.

The server writes the answer and closes.  A reader must never stall the
rings, so every write is non-blocking: what the socket does not take now is
retried from a timer, and a reader that takes nothing for
:data:`SEND_TIMEOUT` s is dropped; at most :data:`MAX_CLIENTS` connections
are kept at once (the document is the only buffer, one per connection).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Final

from pyvirtio.core.errors import CallerError
from pyvirtio.io.loop import EventLoop, Timer
from pyvirtio.transports.stats import SCHEMA, SCHEMA_VERSION, DeviceStats, snapshot, trace_document
from pyvirtio.transports.vhost_user.server import listen_unix

__all__ = ["MAX_CLIENTS", "MAX_TRACE_SECONDS", "REQUEST_WAIT", "SEND_TIMEOUT", "StatsSocket",
           "request"]

log = logging.getLogger("pyvirtio.stats")

#: How long the server waits for a request line before answering with a snapshot.
REQUEST_WAIT: Final = 0.2
#: A reader that takes no byte of its answer for this long is dropped.
SEND_TIMEOUT: Final = 5.0
MAX_CLIENTS: Final = 16
MAX_REQUEST: Final = 4096
MAX_TRACE_SECONDS: Final = 60.0
_NO_WAIT = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class _Client:
    __slots__ = ("buf", "conn", "fd", "last_progress", "out", "timer")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.buf = b""
        self.out = memoryview(b"")
        self.timer: Timer | None = None
        self.last_progress = time.monotonic()


class StatsSocket:
    """Answer stats requests for ``devices`` on ``path``, served by ``loop``."""

    def __init__(self, path: str, devices: Sequence[DeviceStats], loop: EventLoop, *,
                 mode: int = 0o600) -> None:
        self.path = path
        self.devices = list(devices)
        self.loop = loop
        self._listener = listen_unix(path, mode, backlog=MAX_CLIENTS)
        self._listener.setblocking(False)
        self._clients: dict[int, _Client] = {}
        self._trace_end: Timer | None = None
        self._trace_waiting: list[_Client] = []
        self._closed = False
        #: Connections answered (for tests).
        self.answered = 0
        #: Readers dropped because they did not read their answer in time.
        self.dropped = 0
        loop.add_reader(self._listener.fileno(), self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for client in list(self._clients.values()):
            self._drop(client)
        if self._trace_end is not None:
            self._trace_end.cancel()
            for dev in self.devices:
                dev.stop_trace()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    # -------------------------------------------------------------- requests
    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("stats socket: accept failed: %s", exc)
            return
        if len(self._clients) >= MAX_CLIENTS:
            conn.close()  # bounded: a flood of readers costs nothing but this
            return
        conn.setblocking(False)
        client = _Client(conn)
        self._clients[client.fd] = client
        self.loop.add_reader(client.fd, lambda: self._on_request(client))
        client.timer = self.loop.call_later(REQUEST_WAIT, lambda: self._answer(client, None))

    def _on_request(self, client: _Client) -> None:
        try:
            data = client.conn.recv(MAX_REQUEST, _NO_WAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            client.buf += data
            if b"\n" not in client.buf and len(client.buf) < MAX_REQUEST:
                return
        self._answer(client, client.buf)

    def _answer(self, client: _Client, raw: bytes | None) -> None:
        """Answer ``raw`` (None or empty: a snapshot); once per client."""
        if not self._serving(client) or client.out:
            return
        self.loop.remove_reader(client.fd)
        if client.timer is not None:
            client.timer.cancel()
            client.timer = None
        try:
            req = json.loads(raw.split(b"\n", 1)[0]) if raw and raw.strip() else {}
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as exc:
            self._send(client, _error(f"bad request: {exc}"))
            return
        kind = req.get("request", "snapshot")
        if kind == "snapshot":
            self._send(client, snapshot(self.devices))
        elif kind == "trace":
            seconds = req.get("seconds")
            if (not isinstance(seconds, int | float) or isinstance(seconds, bool)
                    or not 0 < seconds <= MAX_TRACE_SECONDS):
                self._send(client, _error(f"trace seconds must be in (0, {MAX_TRACE_SECONDS:g}]"))
            elif self._trace_end is not None:
                self._send(client, _error("a trace is already running; try again later"))
            else:
                self._start_trace(client, float(seconds))
        else:
            self._send(client, _error(f"unknown request {kind!r}: snapshot or trace"))

    # ----------------------------------------------------------------- trace
    def _start_trace(self, client: _Client, seconds: float) -> None:
        start = time.monotonic_ns()
        for dev in self.devices:
            dev.start_trace()
        self._trace_waiting = [client]

        def finish() -> None:
            self._trace_end = None
            doc = trace_document(self.devices, start, seconds)
            for waiting in self._trace_waiting:
                if self._serving(waiting):
                    self._send(waiting, doc)
            self._trace_waiting = []

        self._trace_end = self.loop.call_later(seconds, finish)

    # --------------------------------------------------------------- writing
    def _send(self, client: _Client, doc: dict[str, object]) -> None:
        client.out = memoryview(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        client.last_progress = time.monotonic()
        self._flush(client)

    def _flush(self, client: _Client, delay: float = 0.001) -> None:
        client.timer = None
        if not self._serving(client):
            return
        try:
            sent = client.conn.send(client.out, _NO_WAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(client)  # the reader went away
            return
        if sent:
            client.out = client.out[sent:]
            client.last_progress = time.monotonic()
            delay = 0.001
        if not client.out:
            self.answered += 1
            self._drop(client)
            return
        if time.monotonic() - client.last_progress > SEND_TIMEOUT:
            self.dropped += 1
            log.warning("stats socket: dropping a reader that read nothing for %g s",
                        SEND_TIMEOUT)
            self._drop(client)
            return
        # Never wait for the reader on the loop: try again later, backing off.
        nxt = min(delay * 2, 0.05)
        client.timer = self.loop.call_later(delay, lambda: self._flush(client, nxt))

    def _serving(self, client: _Client) -> bool:
        # By identity: a dropped client's fd number may already serve a newer one.
        return self._clients.get(client.fd) is client

    def _drop(self, client: _Client) -> None:
        if not self._serving(client):
            return
        del self._clients[client.fd]
        self.loop.remove_reader(client.fd)
        if client.timer is not None:
            client.timer.cancel()
        client.conn.close()


def _error(message: str) -> dict[str, object]:
    return {"schema": SCHEMA, "version": SCHEMA_VERSION, "error": message}


def request(path: str, req: dict[str, object] | None = None,
            timeout: float = 5.0) -> dict[str, object]:
    """Ask the stats socket at ``path`` (client side); CallerError says what went wrong."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise CallerError(f"no stats socket at {path}: start the back end with "
                              f"--stats-socket {path}") from None
        except ConnectionRefusedError:
            raise CallerError(f"nobody listens on {path} (the back end stopped?)") from None
        except OSError as exc:
            raise CallerError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        if req is not None:
            sock.sendall(json.dumps(req).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        except TimeoutError:
            raise CallerError(f"{path}: no answer within {timeout:g} s") from None
    finally:
        sock.close()
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError:
        raise CallerError(f"{path}: the answer is not JSON (is this a stats socket?)") from None
    if not isinstance(doc, dict) or doc.get("schema") not in (SCHEMA, "pyvirtio-trace"):
        raise CallerError(f"{path}: not a pyvirtio stats document")
    if "error" in doc:
        raise CallerError(f"{path}: {doc['error']}")
    return doc
