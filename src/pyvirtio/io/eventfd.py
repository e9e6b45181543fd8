"""Eventfds as kicks (ioeventfd) and interrupts (irqfd).

In KVM a guest's write to ``QUEUE_NOTIFY`` becomes a write to an eventfd
(ioeventfd) and the VMM injects an interrupt by writing one (irqfd); vhost-user
passes the same eventfds over its socket (SET_VRING_KICK / SET_VRING_CALL).
An eventfd is a 64-bit counter: writes add, a read returns the sum and
resets it, so many notifications coalesce into one wake-up.
"""

from __future__ import annotations

import os
import select


class EventFd:
    """One eventfd; ``signal`` is the kick/interrupt, ``wait``/``drain`` the receiving side."""

    __slots__ = ("_closed", "_poll", "fd")

    def __init__(self, fd: int | None = None, *, nonblocking: bool = False) -> None:
        flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
        self.fd = os.eventfd(0, flags) if fd is None else fd
        self._poll: select.poll | None = None
        self._closed = False

    def fileno(self) -> int:
        return self.fd

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)

    def drain(self) -> int:
        """Read and reset the counter without blocking; 0 if nothing was signalled."""
        if not self._readable(0):
            return 0
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def _readable(self, timeout_ms: int) -> bool:
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLIN)
        return bool(self._poll.poll(timeout_ms))

    def wait(self, timeout: float | None = None) -> int:
        """Block until signalled (or ``timeout`` seconds); returns the count read, 0 on timeout."""
        if not self._readable(-1 if timeout is None else max(0, int(timeout * 1000))):
            return 0
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
