"""Per-device and per-queue statistics of a back end, as one JSON-able snapshot (docs/stats.md).

The counters themselves are plain integers kept where the work happens: the
core queue (:class:`~pyvirtio.core.queue.DeviceQueue`, split or packed: buffers
popped and pushed, bytes, kick-suppression changes, interrupts suppressed)
and the kit's :class:`~pyvirtio.transports.device.VirtQueue` (kicks,
interrupts sent, batch sizes, errors).  This module only reads them — on the
loop's thread, so a snapshot never races a ring — and adds what a single
ring object cannot know:

* a ring object lives for one start of one connection; :class:`QueueStats`
  folds the counters of every ring that stopped into an accumulator for the
  life of the process (a Prometheus counter never goes back) and one for the
  current connection, so ``total`` = retired + live and ``connection`` =
  retired this connection + live;
* the ring state (indices, event indices, flags, in flight) is read live from
  the rings when the snapshot is taken, as QEMU's ``x-query-virtio-queue-status``
  reads it;
* a trace: while on, every started ring records its interrupt decisions and
  kick-suppression changes (core) and the kicks it received (kit) in a
  bounded list, collected here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Final

from pyvirtio.core.ring_stats import (
    COUNTERS,
    TRACE_IRQ,
    TRACE_IRQ_SUPPRESSED,
    TRACE_KICK,
    TRACE_KICKS_OFF,
    TRACE_KICKS_ON,
    TraceRecord,
)
from pyvirtio.core.spec import DeviceId
from pyvirtio.transports.device import BATCH_BUCKETS, DeviceProtocol, VirtQueue

__all__ = ["SCHEMA", "SCHEMA_VERSION", "TRACE_KINDS", "TRACE_SCHEMA", "DeviceStats",
           "QueueStats", "snapshot", "trace_document"]

SCHEMA: Final = "pyvirtio-stats"
TRACE_SCHEMA: Final = "pyvirtio-trace"
#: Bumped when a field changes meaning or goes away (adding fields does not bump it).
SCHEMA_VERSION: Final = 1
#: The kit's counters (VirtQueue), after the core's (COUNTERS).
KIT_COUNTERS: Final = ("kicks", "interrupts", "batched_entries")
ERROR_KINDS: Final = ("ring", "device", "dropped_completions")
TRACE_KINDS: Final = {TRACE_IRQ: "irq", TRACE_IRQ_SUPPRESSED: "irq-suppressed",
                      TRACE_KICK: "kick", TRACE_KICKS_ON: "kicks-on",
                      TRACE_KICKS_OFF: "kicks-off"}

Counts = dict[str, int]
_T0 = time.monotonic()


def _zero() -> Counts:
    counts = dict.fromkeys((*COUNTERS, *KIT_COUNTERS), 0)
    for kind in ERROR_KINDS:
        counts[f"errors_{kind}"] = 0
    for i in range(BATCH_BUCKETS):
        counts[f"batch_{i}"] = 0
    return counts


def _counts_of(vq: VirtQueue) -> Counts:
    counts = vq.ring.counters()
    counts["kicks"] = vq.kicks
    counts["interrupts"] = vq.interrupts
    counts["batched_entries"] = vq.batched_entries
    counts["errors_ring"] = vq.errors_ring
    counts["errors_device"] = vq.errors_device
    counts["errors_dropped_completions"] = vq.completions_dropped
    for i, n in enumerate(vq.batches):
        counts[f"batch_{i}"] = n
    return counts


def _add(into: Counts, more: Counts) -> None:
    for key, value in more.items():
        into[key] += value


def _document(counts: Counts) -> dict[str, object]:
    """The counters object of the schema (flat counters, ``errors`` and ``batches``)."""
    doc: dict[str, object] = {k: counts[k] for k in (*COUNTERS, *KIT_COUNTERS)}
    doc["errors"] = {kind: counts[f"errors_{kind}"] for kind in ERROR_KINDS}
    doc["batches"] = [counts[f"batch_{i}"] for i in range(BATCH_BUCKETS)]
    return doc


class QueueStats:
    """One queue index of a device: the counters of its rings gone, and the live one."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.retired_total = _zero()
        self.retired_connection = _zero()
        self.live: VirtQueue | None = None
        #: Trace records of rings that stopped while a trace ran.
        self.trace_records: list[TraceRecord] = []
        self.trace_dropped = 0

    def attach(self, vq: VirtQueue, tracing: bool) -> None:
        """``vq`` started on this queue index (its counters count from now)."""
        if self.live is not None and self.live is not vq:
            self.retire(self.live)
        self.live = vq
        if tracing and vq.ring.trace is None:
            vq.ring.trace = []

    def retire(self, vq: VirtQueue) -> None:
        """``vq`` stopped: keep its counts (and trace) in the accumulators."""
        if self.live is not vq:
            return
        self.live = None
        counts = _counts_of(vq)
        _add(self.retired_total, counts)
        _add(self.retired_connection, counts)
        ring = vq.ring
        if ring.trace is not None:
            self.trace_records.extend(ring.trace)
            self.trace_dropped += ring.trace_dropped
            ring.trace = None

    def new_connection(self) -> None:
        self.retired_connection = _zero()

    def totals(self) -> tuple[Counts, Counts]:
        """(for the life of the process, for the current connection)."""
        total = dict(self.retired_total)
        conn = dict(self.retired_connection)
        if self.live is not None:
            live = _counts_of(self.live)
            _add(total, live)
            _add(conn, live)
        return total, conn

    def document(self) -> dict[str, object]:
        vq = self.live
        state: dict[str, int] | None = None
        doc: dict[str, object] = {"index": self.index, "active": False, "size": None,
                                  "event_idx": None, "broken": None}
        if vq is not None:
            ring = vq.ring
            try:
                state = ring.ring_state()
            except (ValueError, IndexError):  # its memory was just unmapped
                state = None
            doc.update(active=vq.ready, size=ring.num, event_idx=ring.event_idx,
                       broken=ring.broken)
        total, conn = self.totals()
        doc["state"] = state
        doc["total"] = _document(total)
        doc["connection"] = _document(conn)
        return doc


def _type_name(device_id: int) -> str:
    try:
        return DeviceId(device_id).name.lower()
    except ValueError:
        return str(device_id)


def device_counters(device: object) -> dict[str, object] | None:
    """The device's own counters, if it keeps them: ``device.stats.as_dict()``
    (pyvirtio-net: frames, bytes, buffers, drops by reason), cumulative."""
    as_dict = getattr(getattr(device, "stats", None), "as_dict", None)
    if not callable(as_dict):
        return None
    counters = as_dict()
    return dict(counters) if isinstance(counters, dict) else None


class DeviceStats:
    """The statistics of one served device (one vhost-user socket)."""

    def __init__(self, name: str, device: DeviceProtocol) -> None:
        self.name = name
        self.device = device
        self.queues = [QueueStats(i) for i in range(device.num_queues)]
        self.connections = 0
        self.connected = False
        self.tracing = False
        self.trace_start_ns = 0

    # ------------------------------------------------------------ the server
    def connection_started(self) -> None:
        self.connections += 1
        self.connected = True
        for q in self.queues:
            q.new_connection()

    def connection_ended(self) -> None:
        self.connected = False

    def queue_started(self, vq: VirtQueue) -> None:
        if 0 <= vq.index < len(self.queues):
            self.queues[vq.index].attach(vq, self.tracing)

    def queue_stopped(self, vq: VirtQueue) -> None:
        if 0 <= vq.index < len(self.queues):
            self.queues[vq.index].retire(vq)

    # --------------------------------------------------------------- readers
    def document(self) -> dict[str, object]:
        dev = self.device
        doc: dict[str, object] = {
            "name": self.name, "type": _type_name(dev.device_id),
            "device_id": int(dev.device_id), "description": repr(dev),
            "connections": self.connections, "connected": self.connected,
            "reconnects": max(0, self.connections - 1),
            "queues": [q.document() for q in self.queues]}
        own = device_counters(dev)
        if own is not None:
            doc["device_stats"] = own
        return doc

    # ----------------------------------------------------------------- trace
    def start_trace(self) -> None:
        """Every ring of this device records its decisions from now on (bounded)."""
        self.tracing = True
        for q in self.queues:
            q.trace_records = []
            q.trace_dropped = 0
            if q.live is not None:
                q.live.ring.trace = []
                q.live.ring.trace_dropped = 0

    def stop_trace(self) -> list[tuple[int, TraceRecord]]:
        """Stop recording; returns (queue index, record) in time order."""
        self.tracing = False
        out: list[tuple[int, TraceRecord]] = []
        for q in self.queues:
            records = q.trace_records
            q.trace_records = []
            if q.live is not None:
                ring = q.live.ring
                if ring.trace is not None:
                    records = records + ring.trace
                    q.trace_dropped += ring.trace_dropped
                ring.trace = None
            out.extend((q.index, r) for r in records)
        out.sort(key=lambda item: item[1][0])
        return out

    @property
    def trace_dropped(self) -> int:
        return sum(q.trace_dropped for q in self.queues)


def snapshot(devices: Iterable[DeviceStats]) -> dict[str, object]:
    """The stats document (schema ``pyvirtio-stats``, docs/stats.md); call on the loop's thread."""
    now = time.monotonic()
    return {"schema": SCHEMA, "version": SCHEMA_VERSION, "pid": os.getpid(),
            "time": now, "uptime": now - _T0,
            "devices": [d.document() for d in devices]}


def trace_document(devices: Iterable[DeviceStats], start_ns: int,
                   seconds: float) -> dict[str, object]:
    """Stop tracing ``devices`` and return the trace (schema ``pyvirtio-trace``)."""
    records: list[list[object]] = []
    dropped = 0
    for dev in devices:
        for index, (t_ns, kind, old, new, event, flags) in dev.stop_trace():
            records.append([(t_ns - start_ns) / 1e9, dev.name, index,
                            TRACE_KINDS.get(kind, str(kind)), old, new, event, flags])
        dropped += dev.trace_dropped
    records.sort(key=lambda r: r[0])  # type: ignore[arg-type,return-value]
    return {"schema": TRACE_SCHEMA, "version": SCHEMA_VERSION, "pid": os.getpid(),
            "seconds": seconds, "dropped": dropped,
            "columns": ["t", "device", "queue", "kind", "old", "new", "event", "flags"],
            "records": records}
