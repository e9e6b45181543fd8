"""The vhost-user back end's I/O layer: Unix socket, SCM_RIGHTS, kick and call eventfds.

QEMU docs/interop/vhost-user.rst: "Communication" (one front end per
connection; fds in ancillary data), "Ring states" (rings are processed on a
kick once started), "Backend program conventions" (``--socket-path`` or an
inherited listening ``--fd``), and the reconnection note: after the front end
goes away the back end resets and accepts the next one (QEMU restarted,
``reconnect=``); "Back-end communication": the socket the front end hands
over with SET_BACKEND_REQ_FD carries the back end's requests
(CONFIG_CHANGE_MSG when a ring breaks) and the front end's REPLY_ACKs.  The
back end never waits for those acks: it writes without blocking and reads the
acks when they come, so a front end that never answers, stops reading or
closes the channel costs one log line and nothing else.

Everything protocol-related lives in the
:class:`~pyvirtio.transports.vhost_user.session.VhostUserSession`; this module
moves bytes and fds, registers the socket, the kick eventfds and the back-end
channel on an :class:`~pyvirtio.io.loop.EventLoop` (one loop may host many
servers — several devices or switch ports in one process), and writes call
eventfds when the device kit decides an interrupt is due.  ``poll=True``
busy-polls the rings with spin-then-sleep instead of waiting for kicks
(VIRTIO 1.2 §2.7.10: the driver is told not to kick).

One front end at a time: a second one that connects while the first is
served is refused at once (accepted, closed, one log line) — unless the
first still has messages or its hang-up waiting to be read: those are
handled first (the second may be the first one's successor, QEMU restarted).

The socket: created with mode ``socket_mode`` (0600 by default), never
through a symlink, never over a file that is not a socket, never over a
socket another process still listens on (a stale one, left by a back end
that was killed, is replaced).  A front end whose uid (``SO_PEERCRED``, read
at accept) is neither the back end's own, nor root's, nor in ``allow_uids``
is refused at once with one log line: the socket's mode is the first fence,
the uid check holds even when a socket mode or an inherited ``--fd`` lets
others connect.

Logging: one line per connect, disconnect or dropped connection (with the
reason), refused front end, negotiated feature set, broken queue, and lost
back-end channel.  Hostile front ends cost their own connection only; the
server keeps listening.  A front end that stops in the middle of a message
(a header, then silence) is dropped after ``PARTIAL_TIMEOUT`` seconds, one
that stops reading its replies after ``SEND_TIMEOUT``.  The loop watches the
server's own duplicates of the kick fds, removed before they are closed: a
kick fd the session closes (replaced, or its ring stopped) stays open in the
front end, and an epoll registration of a closed fd number would live on
with it, firing for whatever reuses the number.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Iterable

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.io.loop import EventLoop, Timer
from pyvirtio.transports.device import DeviceProtocol
from pyvirtio.transports.stats import DeviceStats
from pyvirtio.transports.vhost_user.messages import (
    MAX_FDS,
    BackendDecoder,
    BackendMessage,
    Decoder,
    Request,
    close_all,
    encode,
)
from pyvirtio.transports.vhost_user.session import MAX_MEM_SLOTS, VhostUserSession

__all__ = ["PARTIAL_TIMEOUT", "SEND_TIMEOUT", "VhostUserServer", "listen_unix"]

log = logging.getLogger("pyvirtio.vhost_user")

_RECV_SIZE = 65536
#: How long a front end may leave our reply unread before it is dropped.
SEND_TIMEOUT = 5.0
#: How long a front end may leave a message half sent before it is dropped.
PARTIAL_TIMEOUT = 5.0
_ONE = (1).to_bytes(8, "little")
_NO_WAIT = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
#: struct ucred (Linux socket(7), SO_PEERCRED): pid, uid, gid.
_UCRED = struct.Struct("=iII")


def _signal_fd(fd: int) -> None:
    """Write an eventfd increment; never block or fail on the peer's fd."""
    try:  # noqa: SIM105 (contextlib.suppress costs more; this runs per interrupt)
        os.write(fd, _ONE)
    except OSError:
        pass


def listen_unix(path: str, mode: int = 0o600, backlog: int = 4) -> socket.socket:
    """A listening Unix socket at ``path``, created safely; CallerError says what is wrong.

    A stale socket (nobody accepts on it any more: its back end was killed)
    is replaced; a live one, a symlink or any other file is refused.
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise CallerError(f"cannot create socket {path}: directory {directory} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
            raise CallerError(f"{path} exists and is {kind}: remove it or choose another "
                              f"--socket-path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise CallerError(f"cannot check socket {path}: {exc.strerror}") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its listener is gone
        else:
            raise CallerError(f"another process listens on {path}: stop it or choose another "
                              f"--socket-path")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask makes the socket file private from its creation on (no window
        # in which another user could connect before a chmod).
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise CallerError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


class VhostUserServer:
    """Serve ``device`` to one vhost-user front end at a time.

    Listens on ``socket_path`` (created now, see :func:`listen_unix`) or on
    the already-listening socket ``listen_fd``.  With ``loop`` the server
    registers on that loop (several servers may share one; run the loop
    yourself); without, :meth:`serve_forever` runs a loop of its own.
    :meth:`stop` (from any thread or a signal handler) ends
    :meth:`serve_forever`; :meth:`close` takes the server off a shared loop.
    ``backend_req=False`` stops offering protocol feature BACKEND_REQ (no
    back-end channel, no CONFIG_CHANGE_MSG).  Front ends of the back end's own
    uid and root's are served; ``allow_uids`` adds more (``--allow-uid``).
    """

    def __init__(self, device: DeviceProtocol, socket_path: str | None = None,
                 listen_fd: int | None = None, poll: bool = False, *,
                 loop: EventLoop | None = None, socket_mode: int = 0o600,
                 max_mem_slots: int = MAX_MEM_SLOTS, logger: logging.Logger | None = None,
                 backend_req: bool = True, allow_uids: Iterable[int] = ()) -> None:
        if (socket_path is None) == (listen_fd is None):
            raise CallerError("give exactly one of socket_path and listen_fd")
        self.device = device
        self.poll = poll
        self.max_mem_slots = max_mem_slots
        #: Peer uids served: our own, root (who can reach any socket anyway), and the allowed.
        self.allowed_uids = frozenset({os.getuid(), 0, *allow_uids})
        self.backend_req = backend_req
        self.log = logger or log
        self.socket_path = socket_path
        if socket_path is not None:
            self._listener = listen_unix(socket_path, socket_mode)
        else:
            assert listen_fd is not None
            try:
                self._listener = socket.socket(fileno=listen_fd)
            except OSError as exc:
                raise CallerError(f"fd {listen_fd} is not a socket: {exc.strerror}") from None
            if (self._listener.family != socket.AF_UNIX
                    or not self._listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                self._listener.detach()
                raise CallerError(f"fd {listen_fd} is not a listening Unix socket")
        self._listener.setblocking(False)
        self._own_loop = loop is None
        self.loop = loop if loop is not None else EventLoop()
        self._conn: socket.socket | None = None
        self._decoder: Decoder | None = None
        self.session: VhostUserSession | None = None
        self._kicks: dict[int, int] = {}  # ring index -> our dup of its kick fd
        self._stall: Timer | None = None
        self._negotiated = (-1, -1)
        # The back-end channel: our own dup of the session's fd, as a socket
        # object (MSG_DONTWAIT | MSG_NOSIGNAL sends), and its reply decoder.
        self._chan: socket.socket | None = None
        self._chan_decoder: BackendDecoder | None = None
        self._closed = False
        #: Connections served so far (for tests and tools).
        self.connections = 0
        #: Front ends refused because another one was being served.
        self.refused = 0
        #: Front ends refused because their uid is not allowed.
        self.denied = 0
        #: Counters of every connection's rings, for the stats socket and metrics.
        self.stats = DeviceStats(socket_path if socket_path is not None else f"fd {listen_fd}",
                                 device)
        device.attach(self.loop)
        self.loop.add_reader(self._listener.fileno(), self._accept)
        self._polling = poll
        if poll:
            self.loop.add_poller(self._poll_rings)

    # ------------------------------------------------------------- lifecycle
    def serve_forever(self) -> None:
        """Run the loop until :meth:`stop`; then close the server."""
        try:
            self.loop.run()
        finally:
            self.close()

    def stop(self) -> None:
        """Make :meth:`serve_forever` return soon (thread- and signal-safe)."""
        self.loop.stop()

    def close(self) -> None:
        """Drop the front end, stop listening and remove the socket file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._conn is not None:
            self._close_connection(None, note="server stopping")
        self.loop.remove_reader(self._listener.fileno())
        self.loop.remove_poller(self._poll_rings)
        self._listener.close()
        try:
            self.device.close()
        except Exception:
            self.log.exception("vhost-user: closing the device failed")
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        if self._own_loop:
            self.loop.close()

    def notify_config_change(self) -> None:
        """Send CONFIG_CHANGE_MSG to the connected front end soon (thread-safe).

        For devices whose configuration changed (a resized disk, say).  Nothing
        is sent without a back-end channel and protocol feature CONFIG.
        """
        self.loop.call_soon_threadsafe(self._send_config_change)

    # ------------------------------------------------------------ connection
    def _accept(self) -> None:
        if self._conn is not None and self._has_input(self._conn):
            # The served front end has messages (or its hang-up) still to be
            # read: handle them first, the newcomer is accepted on a later
            # round (the listener stays readable) — it may be that front end's
            # successor, and must not be refused for its predecessor's backlog.
            return
        try:
            conn, _addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.error("vhost-user: accept failed: %s", exc)
            return
        try:
            pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           _UCRED.size))
        except OSError as exc:
            self.log.error("vhost-user: refusing a front end: SO_PEERCRED failed: %s", exc)
            conn.close()
            return
        if uid not in self.allowed_uids:
            self.denied += 1
            self.log.warning("vhost-user: refusing a front end of uid %d (pid %d): not this "
                             "back end's user, not root, not given with --allow-uid", uid, pid)
            conn.close()
            return
        if self._conn is not None:
            self.refused += 1
            self.log.warning("vhost-user: refusing a second front end: busy serving "
                             "connection %d", self.connections)
            conn.close()
            return
        conn.settimeout(SEND_TIMEOUT)
        self._conn = conn
        self._decoder = Decoder()
        self.session = VhostUserSession(self.device, max_mem_slots=self.max_mem_slots,
                                        backend_req=self.backend_req, signal=_signal_fd,
                                        on_broken=self._on_broken,
                                        schedule=self.loop.call_soon, stats=self.stats)
        self._kicks = {}
        self._negotiated = (-1, -1)
        self.connections += 1
        self.stats.connection_started()
        self.loop.add_reader(conn.fileno(), self._on_readable)
        self.log.info("vhost-user: front end connected (connection %d)", self.connections)

    @staticmethod
    def _has_input(conn: socket.socket) -> bool:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def _close_connection(self, reason: str | None, note: str = "front end disconnected") -> None:
        """Reset everything the connection set up; log one line (``reason``: a drop)."""
        conn = self._conn
        if conn is None:
            return
        self._unwatch_kicks()
        self.loop.remove_reader(conn.fileno())
        if self._polling and not self.poll:
            self._polling = False
            self.loop.remove_poller(self._poll_rings)
        self._close_channel()
        self._cancel_stall()
        conn.close()
        self._conn = None
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self.session is not None:
            try:
                self.session.reset()
            except Exception:
                self.log.exception("vhost-user: device reset failed")
            self.session = None
        self.stats.connection_ended()
        if reason is None:
            self.log.info("vhost-user: %s", note)
        else:
            self.log.warning("vhost-user: dropping front end: %s", reason)

    def _on_readable(self) -> None:
        conn, decoder, session = self._conn, self._decoder, self.session
        if conn is None or decoder is None or session is None:
            return
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
                outcome = session.handle(msg)
                if outcome.error is not None:
                    self.log.warning("vhost-user: %s", outcome.error)
                for rep in outcome.replies:
                    if rep.fds:  # GET_INFLIGHT_FD: the buffer goes with its reply
                        socket.send_fds(conn, [encode(rep)], list(rep.fds))
                    else:
                        conn.sendall(encode(rep))
                negotiated = (session.virtio_features, session.protocol)
                if msg.request is Request.SET_FEATURES and negotiated != self._negotiated:
                    self._negotiated = negotiated
                    self.log.info("vhost-user: negotiated features %#x, protocol features %#x",
                                  session.virtio_features, session.protocol)
                for index in outcome.kicks:
                    self._watch_kick(index)
                if outcome.channel:
                    self._watch_channel()
                for index in outcome.start:
                    res = session.run_ring(index)
                    if res.resubmitted is not None:
                        self.log.info("vhost-user: ring %d started from its inflight region: "
                                      "resubmitting %d requests that were in flight", index,
                                      res.resubmitted)
            if not decoder.pending:
                self._cancel_stall()
            elif completed or self._stall is None:
                self._cancel_stall()
                self._stall = self.loop.call_later(PARTIAL_TIMEOUT, self._stalled)
        except PeerError as exc:
            self._close_connection(str(exc))
        except OSError as exc:
            self._close_connection(f"socket error: {exc}")
        except Exception as exc:  # a bug of ours must not end the server
            self.log.exception("vhost-user: internal error")
            self._close_connection(f"internal error: {exc!r}")

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        """Drop a front end that left a message half sent for too long."""
        self._stall = None
        pending = self._decoder.pending if self._decoder is not None else 0
        self._close_connection(f"stalled inside a message ({pending} bytes received, "
                               f"nothing more for {PARTIAL_TIMEOUT:g} s)")

    # ----------------------------------------------------------------- kicks
    def _unwatch_kick(self, index: int) -> None:
        dup = self._kicks.pop(index, None)
        if dup is not None:
            self.loop.remove_reader(dup)
            with contextlib.suppress(OSError):
                os.close(dup)

    def _unwatch_kicks(self) -> None:
        for index in list(self._kicks):
            self._unwatch_kick(index)

    def _watch_kick(self, index: int) -> None:
        """Watch ring ``index``'s current kick fd (a message changed it)."""
        session = self.session
        assert session is not None
        self._unwatch_kick(index)
        ring = session.rings[index]
        fd = ring.kick_fd
        if fd is None:
            if ring.polled and not self._polling:
                # Started with the invalid-fd flag: the front end will not kick.
                self._polling = True
                self.loop.add_poller(self._poll_rings)
            return
        # Our own duplicate: the session may close its fd at any message, and
        # only an fd still open can be taken out of epoll.
        dup = os.dup(fd)
        self._kicks[index] = dup
        try:
            self.loop.add_reader(dup, lambda: self._on_kick(index, dup))
        except (OSError, ValueError, KeyError) as exc:
            raise PeerError(f"kick fd of ring {index} cannot be waited on: {exc}") from None

    def _on_kick(self, index: int, fd: int) -> None:
        try:
            data = os.read(fd, 8)
        except (BlockingIOError, InterruptedError):
            data = _ONE
        except OSError:
            data = b""
        if not data:
            # A pipe whose writer is gone stays readable forever: stop watching it.
            self._unwatch_kick(index)
            self.log.warning("vhost-user: kick fd of ring %d is closed; not watching it", index)
            return
        session = self.session
        if session is None:
            return
        # The eventfd's value: how many kicks the front end wrote since the last read.
        vq = session.virtqueue(index)
        if vq is not None:
            vq.kicked(int.from_bytes(data, "little") if len(data) == 8 else 1)
        if not self.poll:
            session.run_ring(index)

    def _on_broken(self, index: int, reason: str) -> None:
        session = self.session
        self.log.error("vhost-user: queue %d broken, device needs reset: %s", index, reason)
        if session is None:
            return
        err = session.rings[index].err_fd
        if err is not None:
            _signal_fd(err)
        msg = session.config_change_message()
        if msg is not None:
            self._send_backend([msg])

    # ------------------------------------------------------ back-end channel
    def _close_channel(self) -> None:
        chan = self._chan
        if chan is None:
            return
        self.loop.remove_reader(chan.fileno())
        chan.close()
        self._chan = None
        if self._chan_decoder is not None:
            self._chan_decoder.close()
            self._chan_decoder = None

    def _watch_channel(self) -> None:
        """Watch the back-end channel the last SET_BACKEND_REQ_FD gave (for its acks)."""
        session = self.session
        assert session is not None
        self._close_channel()
        if session.backend_fd is None:
            return
        chan = socket.socket(fileno=os.dup(session.backend_fd))
        chan.setblocking(False)
        self._chan = chan
        self._chan_decoder = BackendDecoder(replies=True)
        self.loop.add_reader(chan.fileno(), self._on_backend_readable)

    def _lose_channel(self, why: str) -> None:
        """Give up the back-end channel with one log line; the connection goes on."""
        self.log.warning("vhost-user: back-end channel %s; not using it any more", why)
        self._close_channel()
        if self.session is not None:
            self.session.drop_backend_channel()

    def _send_backend(self, msgs: list[BackendMessage]) -> None:
        """Write back-end requests without ever blocking; never wait for their acks."""
        session = self.session
        assert session is not None
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
            session.backend_sent(msg)
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("vhost-user: => %s%s", msg.request.name,
                               " need_reply" if msg.need_reply else "")

    def _send_config_change(self) -> None:
        session = self.session
        if session is None or self._conn is None:
            return
        msg = session.config_change_message()
        if msg is not None:
            self._send_backend([msg])

    def _on_backend_readable(self) -> None:
        chan, decoder, session = self._chan, self._chan_decoder, self.session
        if chan is None or decoder is None or session is None:
            return
        try:
            data, fds, _flags, _addr = socket.recv_fds(chan, 4096, MAX_FDS, _NO_WAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose_channel(f"failed: {exc}")
            return
        if not data:
            close_all(fds)
            due = session.backend_replies_due
            self._lose_channel("closed by the front end" + (
                f" ({due} acks unanswered)" if due else ""))
            return
        try:
            decoder.feed(data, fds)
            for rep in decoder.messages():
                error = session.handle_backend_reply(rep)
                if error is not None:
                    self.log.warning("vhost-user: %s", error)
                elif self.log.isEnabledFor(logging.DEBUG):
                    self.log.debug("vhost-user: <= %s ack %r", rep.request.name, rep.payload)
        except PeerError as exc:
            self._lose_channel(f"broke the protocol: {exc}")

    # --------------------------------------------------------------- polling
    def _poll_rings(self) -> bool:
        session = self.session
        if session is None:
            return False
        work = 0
        for ring in session.rings:
            if ring.runnable and (self.poll or ring.polled):
                work += session.run_ring(ring.index, poll=True).published
        return work > 0
