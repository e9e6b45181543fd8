"""A request latency histogram a device keeps of its own (docs/stats.md).

Latency here is what the back end adds: from the moment a request is
popped off the available ring (VIRTIO 1.2 §2.7.13.4) until its used entry
is filled (§2.7.14) — what the guest sees on top is the time the request
waited in the available ring and the interrupt's way back.  Buckets are
powers of two in microseconds, like the batch-size histogram of the kit,
so adding a sample is a ``bit_length`` and an index: cheap enough to keep
on for every request.  A batch of requests popped together and completed
together adds one sample ``count`` times (one clock read per batch, not per
request).

The snapshot (:meth:`LatencyHistogram.as_dict`) is what the stats socket
carries in ``device_stats``; the Prometheus exporter turns it into a
histogram in seconds (``pyvirtio_device_<name>_seconds``).
"""

from __future__ import annotations

from typing import Any, Final, TypeGuard

__all__ = ["BUCKETS", "LatencyHistogram", "is_histogram", "quantile"]

#: Bucket i counts samples below 2**i µs (i = 0: under 1 µs); the last one
#: also takes everything from 2**(BUCKETS-2) µs on (about 0.5 s and more).
BUCKETS: Final = 22


class LatencyHistogram:
    """Counts of latencies in power-of-two microsecond buckets, with their sum."""

    __slots__ = ("count", "counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.count = 0
        self.sum_ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        """``count`` requests that took ``ns`` nanoseconds each."""
        if ns < 0:  # a clock that went back (it is monotonic; be safe anyway)
            ns = 0
        self.counts[min((ns // 1000).bit_length(), BUCKETS - 1)] += count
        self.count += count
        self.sum_ns += ns * count

    def as_dict(self) -> dict[str, object]:
        """The snapshot: ``le_us`` bounds (the last bucket is unbounded), per-bucket
        ``counts`` (not cumulative), ``count`` and ``sum_us``."""
        return {"unit": "us", "le_us": [1 << i for i in range(BUCKETS - 1)] + [None],
                "counts": list(self.counts), "count": self.count,
                "sum_us": round(self.sum_ns / 1000, 3)}


def is_histogram(value: object) -> TypeGuard[dict[str, Any]]:
    """Whether a ``device_stats`` entry is a :meth:`LatencyHistogram.as_dict` snapshot."""
    return isinstance(value, dict) and "le_us" in value and "counts" in value


def quantile(snapshot: dict[str, object], q: float) -> float | None:
    """The upper bound (µs) of the bucket holding quantile ``q`` of a snapshot;
    None without samples, inf when it falls in the unbounded bucket."""
    counts = snapshot.get("counts")
    bounds = snapshot.get("le_us")
    if not isinstance(counts, list) or not isinstance(bounds, list):
        return None
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for n, bound in zip(counts, bounds, strict=True):
        seen += n
        if seen >= rank and n:
            return float("inf") if bound is None else float(bound)
    return float("inf")
