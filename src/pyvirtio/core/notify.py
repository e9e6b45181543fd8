"""The event-index test of VIRTIO 1.2 §2.7.7.2 and §2.7.10.

One function serves both directions: the driver asks it whether to kick
(event = ``avail_event``), the device whether to interrupt
(event = ``used_event``).
"""

from __future__ import annotations


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True when moving an index from ``old`` to ``new`` crossed ``event``.

    All three are 16-bit ring indices; the arithmetic wraps at 2**16, so an
    index that just wrapped from 65535 to 0 still compares correctly.
    """
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
