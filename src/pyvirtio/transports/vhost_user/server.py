"""The vhost-user back end's I/O layer: Unix socket, SCM_RIGHTS, kick and call eventfds.

QEMU docs/interop/vhost-user.rst: "Communication" (one front end per
connection; fds in ancillary data), "Ring states" (rings are processed on a
kick once started), "Backend program conventions" (``--socket-path`` or an
inherited listening ``--fd``; end quickly on SIGTERM), and the reconnection
note: after the front end goes away the back end resets and accepts the next
one (QEMU restarted, ``reconnect=``); "Back-end communication": the socket the
front end hands over with SET_BACKEND_REQ_FD carries the back end's requests
(CONFIG_CHANGE_MSG when a ring breaks) and the front end's REPLY_ACKs.  The
back end never waits for those acks: it writes without blocking and reads the
acks when they come, so a front end that never answers, stops reading or
closes the channel costs one log line and nothing else.

Everything protocol-related lives in the sans-I/O
:class:`~pyvirtio.transports.vhost_user.backend.VhostUserBackend`; this module
only moves bytes and fds, waits on a selector (epoll) over the socket and the
kick eventfds, and signals call eventfds when the core decides an interrupt is
due.  ``poll=True`` busy-polls the rings with spin-then-sleep instead of
waiting for kicks (VIRTIO 1.2 §2.7.10: the driver is told not to kick).

Logging: one line per connect, disconnect or dropped connection (with the
reason), negotiated feature set, broken queue, and lost back-end channel.
Hostile front ends cost their own connection only; the server keeps listening.
A front end that stops in the middle of a message (a header, then silence)
is dropped after ``_PARTIAL_TIMEOUT`` seconds, one that stops reading its
replies after ``_SEND_TIMEOUT``: neither can keep the next front end waiting.
The selector watches the server's own duplicates of the kick fds, removed
before they are closed: a kick fd the back end closes (replaced, or its ring
stopped) stays open in the front end, and an epoll registration of a closed
fd number would live on with it, firing for whatever reuses the number.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import threading
import time

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.io.eventfd import EventFd
from pyvirtio.transports.vhost_user.backend import VhostUserBackend
from pyvirtio.transports.vhost_user.device import VhostUserDevice
from pyvirtio.transports.vhost_user.messages import (
    MAX_FDS,
    BackendDecoder,
    BackendMessage,
    Decoder,
    Request,
    close_all,
    encode,
)

__all__ = ["VhostUserServer", "serve"]

log = logging.getLogger("pyvirtio.vhost_user")

_RECV_SIZE = 65536
_SEND_TIMEOUT = 5.0
#: How long a front end may leave a message half sent before it is dropped.
_PARTIAL_TIMEOUT = 5.0
_ONE = (1).to_bytes(8, "little")
_LISTEN = "listen"
_WAKE = "wake"
_CONN = "conn"
_BACKEND = "backend"
_NO_WAIT = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def _signal_fd(fd: int | None) -> None:
    """Write an eventfd increment; never block or fail on the peer's fd."""
    if fd is None:
        return
    try:  # noqa: SIM105 (contextlib.suppress costs more; this runs per interrupt)
        os.write(fd, _ONE)
    except OSError:
        pass


class VhostUserServer:
    """Serve ``device`` to one vhost-user front end at a time.

    Listens on ``socket_path`` (created now; a stale socket file is replaced) or
    on the already-listening socket ``listen_fd``.  :meth:`serve_forever` runs
    the loop in the calling thread; :meth:`stop` (from any thread or a signal
    handler) makes it return.  ``backend_req=False`` stops offering protocol
    feature BACKEND_REQ (no back-end channel, no CONFIG_CHANGE_MSG).
    """

    def __init__(self, device: VhostUserDevice, socket_path: str | None = None,
                 listen_fd: int | None = None, poll: bool = False, *,
                 spin_seconds: float = 200e-6, idle_sleep: float = 1e-3,
                 max_mem_slots: int = 32, logger: logging.Logger | None = None,
                 backend_req: bool = True) -> None:
        if (socket_path is None) == (listen_fd is None):
            raise CallerError("give exactly one of socket_path and listen_fd")
        self.device = device
        self.poll = poll
        self.spin_seconds = spin_seconds
        self.idle_sleep = idle_sleep
        self.max_mem_slots = max_mem_slots
        self.backend_req = backend_req
        self.log = logger or log
        self.socket_path = socket_path
        self._owns_path = False
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
                    os.unlink(socket_path)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(socket_path)
            self._listener.listen(1)
            self._owns_path = True
        else:
            assert listen_fd is not None
            self._listener = socket.socket(fileno=listen_fd)
            if (self._listener.family != socket.AF_UNIX
                    or not self._listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                self._listener.detach()
                raise CallerError(f"fd {listen_fd} is not a listening Unix socket")
        self._listener.setblocking(False)
        self._wake = EventFd(nonblocking=True)
        self._stopping = False
        self._sel: selectors.BaseSelector | None = None
        self._conn: socket.socket | None = None
        self._decoder: Decoder | None = None
        self.backend: VhostUserBackend | None = None
        self._kick_gen = -1
        self._kicks: dict[int, int] = {}  # our dup of a kick fd -> ring index
        #: When the message now half received began arriving (None: no partial message).
        self._partial_since: float | None = None
        self._last_work = 0.0
        self._negotiated = (-1, -1)
        # The back-end channel: our own dup of the back end's fd, as a socket
        # object (MSG_DONTWAIT | MSG_NOSIGNAL sends), and its reply decoder.
        self._chan: socket.socket | None = None
        self._chan_decoder: BackendDecoder | None = None
        self._chan_gen = -1
        self._config_change_requested = False
        #: Connections served so far (for tests and tools).
        self.connections = 0

    # ------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        """Make :meth:`serve_forever` return soon (thread- and signal-safe)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake.signal()

    def notify_config_change(self) -> None:
        """Send CONFIG_CHANGE_MSG to the connected front end soon (thread-safe).

        For devices whose configuration changed (a resized disk, say).  Nothing
        is sent without a back-end channel and protocol feature CONFIG.
        """
        self._config_change_requested = True
        with contextlib.suppress(OSError):
            self._wake.signal()

    def serve_forever(self) -> None:
        """Accept front ends one after the other until :meth:`stop`."""
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, _LISTEN)
        sel.register(self._wake.fd, selectors.EVENT_READ, _WAKE)
        try:
            while not self._stopping:
                for key, _events in sel.select(self._timeout()):
                    if self._stopping:
                        break
                    self._dispatch(key.data, key.fd)
                self._check_stall()
                if self._config_change_requested:
                    self._config_change_requested = False
                    self._send_config_change()
                if self._conn is not None and not self._stopping:
                    self._poll_rings()
        finally:
            if self._conn is not None:
                self._close_connection(None, note="server stopping")
            sel.close()
            self._sel = None
            self._listener.close()
            self._wake.close()
            if self._owns_path and self.socket_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)

    def _dispatch(self, tag: object, fd: int) -> None:
        if tag == _LISTEN:
            self._accept()
        elif tag == _WAKE:
            self._wake.drain()
        elif tag == _CONN:
            if self._conn is not None and self._conn.fileno() == fd:
                self._on_readable()
        elif tag == _BACKEND:
            if self._chan is not None and self._chan.fileno() == fd:
                self._on_backend_readable()
        elif isinstance(tag, int) and self._kicks.get(fd) == tag:
            # (An event from this batch may name a kick fd a message just replaced.)
            self._on_kick(tag, fd)

    # ------------------------------------------------------------ connection
    def _accept(self) -> None:
        assert self._sel is not None
        try:
            conn, _addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.error("vhost-user: accept failed: %s", exc)
            time.sleep(0.01)
            return
        conn.settimeout(_SEND_TIMEOUT)
        self._conn = conn
        self._decoder = Decoder()
        self.backend = VhostUserBackend(self.device, max_mem_slots=self.max_mem_slots,
                                        backend_req=self.backend_req)
        self._kick_gen = self.backend.kick_generation
        self._chan_gen = self.backend.backend_generation
        self._kicks = {}
        self._partial_since = None
        self._negotiated = (-1, -1)
        self.connections += 1
        # One front end at a time: the next waits in the backlog until this one leaves.
        self._sel.unregister(self._listener)
        self._sel.register(conn, selectors.EVENT_READ, _CONN)
        self.log.info("vhost-user: front end connected (connection %d)", self.connections)

    def _close_connection(self, reason: str | None, note: str = "front end disconnected") -> None:
        """Reset everything the connection set up; log one line (``reason``: a drop)."""
        sel = self._sel
        conn = self._conn
        if conn is None:
            return
        if sel is not None:
            self._unregister_kicks()
            with contextlib.suppress(KeyError, ValueError, OSError):
                sel.unregister(conn)
        self._close_channel()
        conn.close()
        self._conn = None
        self._partial_since = None
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self.backend is not None:
            try:
                self.backend.reset()
            except Exception:
                self.log.exception("vhost-user: device reset failed")
            self.backend = None
        if reason is None:
            self.log.info("vhost-user: %s", note)
        else:
            self.log.warning("vhost-user: dropping front end: %s", reason)
        if sel is not None and not self._stopping:
            sel.register(self._listener, selectors.EVENT_READ, _LISTEN)

    def _on_readable(self) -> None:
        conn, decoder, backend = self._conn, self._decoder, self.backend
        assert conn is not None and decoder is not None and backend is not None
        try:
            data, fds, flags, _addr = socket.recv_fds(conn, _RECV_SIZE, MAX_FDS)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as exc:
            self._close_connection(f"receive failed: {exc}")
            return
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            self._close_connection(f"more than {MAX_FDS} file descriptors in one message")
            return
        if not data:
            close_all(fds)
            if decoder.pending:
                self._close_connection(f"connection closed inside a message "
                                       f"({decoder.pending} bytes pending)")
            else:
                self._close_connection(None)
            return
        completed = False
        try:
            decoder.feed(data, fds)
            debug = self.log.isEnabledFor(logging.DEBUG)
            for msg in decoder.messages():
                completed = True
                if debug:
                    self.log.debug("vhost-user: <- %s %r fds=%s%s", msg.request.name, msg.payload,
                                   list(msg.fds), " need_reply" if msg.need_reply else "")
                outcome = backend.handle(msg)
                if outcome.error is not None:
                    self.log.warning("vhost-user: %s", outcome.error)
                for rep in outcome.replies:
                    conn.sendall(encode(rep))
                negotiated = (backend.virtio_features, backend.protocol)
                if msg.request is Request.SET_FEATURES and negotiated != self._negotiated:
                    self._negotiated = negotiated
                    self.log.info("vhost-user: negotiated features %#x, protocol features %#x",
                                  backend.virtio_features, backend.protocol)
                self._sync_kicks()
                self._sync_backend_channel()
                for index in outcome.start:
                    self._run(index)
            if not decoder.pending:
                self._partial_since = None
            elif completed or self._partial_since is None:
                self._partial_since = time.monotonic()
        except PeerError as exc:
            self._close_connection(str(exc))
        except OSError as exc:
            self._close_connection(f"socket error: {exc}")
        except Exception as exc:  # a bug of ours must not end the server
            self.log.exception("vhost-user: internal error")
            self._close_connection(f"internal error: {exc!r}")

    def _check_stall(self) -> None:
        """Drop a front end that left a message half sent for too long."""
        since = self._partial_since
        if self._conn is None or since is None:
            return
        if time.monotonic() - since >= _PARTIAL_TIMEOUT:
            pending = self._decoder.pending if self._decoder is not None else 0
            self._close_connection(f"stalled inside a message ({pending} bytes received, "
                                   f"nothing more for {_PARTIAL_TIMEOUT:g} s)")

    # ----------------------------------------------------------------- kicks
    def _unregister_kicks(self) -> None:
        """Unregister our kick fd duplicates, then close them (in that order)."""
        sel = self._sel
        for fd in self._kicks:
            if sel is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    sel.unregister(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._kicks = {}

    def _sync_kicks(self) -> None:
        """Re-register the kick fds after a message changed any of them."""
        backend, sel = self.backend, self._sel
        assert backend is not None and sel is not None
        if backend.kick_generation == self._kick_gen:
            return
        self._kick_gen = backend.kick_generation
        self._unregister_kicks()
        for ring in backend.rings:
            if ring.kick_fd is not None:
                # Our own duplicate: the back end may close its fd at any message,
                # and only an fd still open can be taken out of epoll.
                dup = os.dup(ring.kick_fd)
                self._kicks[dup] = ring.index
                try:
                    sel.register(dup, selectors.EVENT_READ, ring.index)
                except (OSError, ValueError, KeyError) as exc:
                    raise PeerError(f"kick fd of ring {ring.index} cannot be waited on: "
                                    f"{exc}") from None

    def _on_kick(self, index: int, fd: int) -> None:
        try:
            data = os.read(fd, 8)
        except (BlockingIOError, InterruptedError):
            data = _ONE
        except OSError:
            data = b""
        if not data:
            # A pipe whose writer is gone stays readable forever: stop watching it.
            if self._sel is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(fd)
            if self._kicks.pop(fd, None) is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.log.warning("vhost-user: kick fd of ring %d is closed; not watching it", index)
            return
        if not self.poll:
            self._run(index)

    def _run(self, index: int, poll: bool = False) -> int:
        backend = self.backend
        assert backend is not None
        ring = backend.rings[index]
        call_fd = ring.call_fd
        # Interrupts go out as soon as each batch is published (pipelining).
        res = backend.run_ring(index, poll=poll, notify=lambda: _signal_fd(call_fd))
        if res.broken is not None:
            self.log.error("vhost-user: queue %d broken, device needs reset: %s",
                           index, res.broken)
            _signal_fd(ring.err_fd)
        if res.backend_messages:
            self._send_backend(res.backend_messages)
        return res.published

    # ------------------------------------------------------ back-end channel
    def _close_channel(self) -> None:
        chan = self._chan
        if chan is None:
            return
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(chan)
        chan.close()
        self._chan = None
        if self._chan_decoder is not None:
            self._chan_decoder.close()
            self._chan_decoder = None

    def _sync_backend_channel(self) -> None:
        """Watch the back-end channel the last SET_BACKEND_REQ_FD gave (for its acks)."""
        backend, sel = self.backend, self._sel
        assert backend is not None and sel is not None
        if backend.backend_generation == self._chan_gen:
            return
        self._chan_gen = backend.backend_generation
        self._close_channel()
        if backend.backend_fd is None:
            return
        chan = socket.socket(fileno=os.dup(backend.backend_fd))
        chan.setblocking(False)
        self._chan = chan
        self._chan_decoder = BackendDecoder(replies=True)
        sel.register(chan, selectors.EVENT_READ, _BACKEND)

    def _lose_channel(self, why: str) -> None:
        """Give up the back-end channel with one log line; the connection goes on."""
        self.log.warning("vhost-user: back-end channel %s; not using it any more", why)
        self._close_channel()
        if self.backend is not None:
            self.backend.drop_backend_channel()
            self._chan_gen = self.backend.backend_generation

    def _send_backend(self, msgs: list[BackendMessage]) -> None:
        """Write back-end requests without ever blocking; never wait for their acks."""
        backend = self.backend
        assert backend is not None
        self._sync_backend_channel()
        for msg in msgs:
            chan = self._chan
            if chan is None:
                return
            data = encode(msg)
            try:
                sent = chan.send(data, _NO_WAIT)
            except BlockingIOError:
                # The front end does not read the channel: drop this message, keep the channel.
                self.log.warning("vhost-user: back-end channel full (the front end does not "
                                 "read it): %s not sent", msg.request.name)
                continue
            except OSError as exc:
                self._lose_channel(f"closed by the front end ({exc.strerror or exc}): "
                                   f"{msg.request.name} not sent")
                return
            if sent != len(data):
                self._lose_channel(f"took {sent} of {len(data)} bytes of {msg.request.name}")
                return
            backend.backend_sent(msg)
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("vhost-user: => %s%s", msg.request.name,
                               " need_reply" if msg.need_reply else "")

    def _send_config_change(self) -> None:
        backend = self.backend
        if backend is None or self._conn is None:
            return
        msg = backend.config_change_message()
        if msg is not None:
            self._send_backend([msg])

    def _on_backend_readable(self) -> None:
        chan, decoder, backend = self._chan, self._chan_decoder, self.backend
        assert chan is not None and decoder is not None and backend is not None
        try:
            data, fds, _flags, _addr = socket.recv_fds(chan, 4096, MAX_FDS, _NO_WAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose_channel(f"failed: {exc}")
            return
        if not data:
            close_all(fds)
            due = backend.backend_replies_due
            self._lose_channel("closed by the front end" + (
                f" ({due} acks unanswered)" if due else ""))
            return
        try:
            decoder.feed(data, fds)
            for rep in decoder.messages():
                error = backend.handle_backend_reply(rep)
                if error is not None:
                    self.log.warning("vhost-user: %s", error)
                elif self.log.isEnabledFor(logging.DEBUG):
                    self.log.debug("vhost-user: <= %s ack %r", rep.request.name, rep.payload)
        except PeerError as exc:
            self._lose_channel(f"broke the protocol: {exc}")

    # --------------------------------------------------------------- polling
    def _polled_rings(self) -> list[int]:
        backend = self.backend
        if backend is None:
            return []
        return [r.index for r in backend.rings
                if r.runnable and (self.poll or r.polled)]

    def _timeout(self) -> float | None:
        if self._conn is None:
            return None
        timeout: float | None = None
        if self._polled_rings():
            spinning = time.monotonic() - self._last_work < self.spin_seconds
            timeout = 0 if spinning else self.idle_sleep
        if self._partial_since is not None:
            left = max(0.0, self._partial_since + _PARTIAL_TIMEOUT - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    def _poll_rings(self) -> None:
        work = 0
        for index in self._polled_rings():
            work += self._run(index, poll=True)
        if work:
            self._last_work = time.monotonic()


def serve(device: VhostUserDevice, socket_path: str | None = None, fd: int | None = None,
          poll: bool = False, stop_event: threading.Event | None = None) -> int:
    """Run a server until SIGTERM/SIGINT (main thread) or ``stop_event``; returns 0.

    The convenience entry point for command-line back ends (``--socket-path``
    / ``--fd`` of the backend program conventions).
    """
    server = VhostUserServer(device, socket_path=socket_path, listen_fd=fd, poll=poll)
    restore: list[tuple[signal.Signals, object]] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            restore.append((signum, signal.signal(signum, lambda *_: server.stop())))
    watcher: threading.Thread | None = None
    if stop_event is not None:
        def _watch() -> None:
            stop_event.wait()
            server.stop()
        watcher = threading.Thread(target=_watch, name="vhost-user-stop", daemon=True)
        watcher.start()
    try:
        server.serve_forever()
    finally:
        for signum, handler in restore:
            signal.signal(signum, handler)  # type: ignore[arg-type]
    return 0
