"""What both device-side rings count and trace (docs/stats.md), kept in one place.

A split ring (:mod:`pyvirtio.core.split_device`, VIRTIO 1.2 §2.7) and a
packed one (:mod:`pyvirtio.core.packed_device`, §2.8) count the same things
as they work — buffers popped and pushed, their bytes, kick-suppression
transitions (§2.7.10, §2.8.10), interrupts suppressed — as plain integers the
hot paths bump (no lock, no call, no allocation per request), and while
:attr:`RingCounters.trace` is a list each interrupt decision and
kick-suppression change is appended to it with its inputs.  Both queue
classes derive from :class:`RingCounters`; the statistics layer
(``transports/stats.py``) reads it through ``counters()`` and the trace.
"""

from __future__ import annotations

import time
from typing import Final

from mypy_extensions import mypyc_attr

from pyvirtio.core.errors import Breakable

__all__ = ["COUNTERS", "TRACE_IRQ", "TRACE_IRQ_SUPPRESSED", "TRACE_KICK", "TRACE_KICKS_OFF",
           "TRACE_KICKS_ON", "TRACE_LIMIT", "RingCounters", "TraceRecord"]

# Trace record kinds: (monotonic ns, kind, old, new, event index, flags).  Interrupt
# decisions carry QEMU virtio_should_notify's inputs (old = signalled_used, new =
# used.idx, event = used_event; flags = avail.flags); kicks and kick-suppression
# changes the avail side's (old = the avail.idx the device had seen, new = avail.idx,
# event = avail_event; flags = used.flags).  event is -1 without EVENT_IDX.
TRACE_IRQ: Final = 1
TRACE_IRQ_SUPPRESSED: Final = 2
TRACE_KICK: Final = 3
TRACE_KICKS_ON: Final = 4
TRACE_KICKS_OFF: Final = 5
#: Records a queue keeps at most while tracing; later ones are counted in trace_dropped.
TRACE_LIMIT: Final = 65536
TraceRecord = tuple[int, int, int, int, int, int]

#: The queue's counters, in the order docs/stats.md lists them.
COUNTERS: Final = ("buffers_popped", "buffers_pushed", "readable_bytes", "used_bytes",
                   "notifications_enabled", "notifications_disabled", "interrupts_suppressed")


@mypyc_attr(allow_interpreted_subclasses=True)
class RingCounters(Breakable):
    """The counters and the trace of a device-side ring (either kind)."""

    def __init__(self) -> None:
        # They only ever grow (a remapped ring carries them over).
        self.buffers_popped = 0
        self.buffers_pushed = 0
        #: Bytes of device-readable buffers popped (chains walked by pyvirtio.batch
        #: count as buffers only).
        self.readable_bytes = 0
        #: Used lengths filled (§2.7.8: bytes the device wrote).
        self.used_bytes = 0
        #: Kicks asked for again / turned off (transitions of kick suppression).
        self.notifications_enabled = 0
        self.notifications_disabled = 0
        #: should_notify said no.
        self.interrupts_suppressed = 0
        #: A list while a trace runs (see TRACE_*); None otherwise (one check per decision).
        self.trace: list[TraceRecord] | None = None
        self.trace_dropped = 0

    def carry_counters(self, old: RingCounters) -> None:
        """Continue ``old``'s statistics and trace (the same ring, mapped anew)."""
        self.buffers_popped = old.buffers_popped
        self.buffers_pushed = old.buffers_pushed
        self.readable_bytes = old.readable_bytes
        self.used_bytes = old.used_bytes
        self.notifications_enabled = old.notifications_enabled
        self.notifications_disabled = old.notifications_disabled
        self.interrupts_suppressed = old.interrupts_suppressed
        self.trace = old.trace
        self.trace_dropped = old.trace_dropped

    def counters(self) -> dict[str, int]:
        """The statistics counters by name (COUNTERS)."""
        return {"buffers_popped": self.buffers_popped, "buffers_pushed": self.buffers_pushed,
                "readable_bytes": self.readable_bytes, "used_bytes": self.used_bytes,
                "notifications_enabled": self.notifications_enabled,
                "notifications_disabled": self.notifications_disabled,
                "interrupts_suppressed": self.interrupts_suppressed}

    def _record(self, kind: int, old: int, new: int, event: int, flags: int) -> None:
        trace = self.trace
        if trace is None:
            return
        if len(trace) < TRACE_LIMIT:
            trace.append((time.monotonic_ns(), kind, old, new, event, flags))
        else:
            self.trace_dropped += 1
