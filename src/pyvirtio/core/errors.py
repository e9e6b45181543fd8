"""The two error families of pyvirtio (docs/architecture.md, "Guest input is hostile").

* :class:`PeerError`: the other side broke the specification — a guest driver
  wrote a malformed ring, a device returned a bogus used id, a vhost-user
  front end sent a malformed message.  Arbitrary bytes from a peer raise only
  this family (and never ``IndexError``/``struct.error``).
* :class:`CallerError`: the program using pyvirtio misused the API.

:class:`QueueFull` is neither: the driver ran out of free descriptors, a normal
condition that the caller handles by waiting for used buffers.
"""

from __future__ import annotations

from mypy_extensions import mypyc_attr


class VirtioError(Exception):
    """Base of every error pyvirtio raises on purpose."""


class PeerError(VirtioError):
    """The peer (guest driver, device, vhost-user front or back end) broke the spec."""


class QueueBrokenError(PeerError):
    """The queue was marked broken by an earlier :class:`PeerError`; reset it to use it again."""


class CallerError(VirtioError):
    """The caller misused the pyvirtio API."""


class QueueFull(VirtioError):
    """No free descriptors are left for the buffer being added."""


@mypyc_attr(allow_interpreted_subclasses=True)
class Breakable:
    """A queue that a :class:`PeerError` marks broken until it is reset (docs/architecture.md).

    Both ring sides use it, so "broken" means the same thing on each: the
    first reason is kept, and every later use raises :class:`QueueBrokenError`.
    """

    broken: str | None = None

    def mark_broken(self, reason: str) -> PeerError:
        """Mark the queue broken; returns the error for the caller to raise."""
        if self.broken is None:
            self.broken = reason
        return PeerError(reason)

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise QueueBrokenError(f"queue is broken: {self.broken}")
