"""The latency histogram (transports/histogram.py): buckets, snapshot, quantiles."""

from __future__ import annotations

import json

from pyvirtio.transports.histogram import BUCKETS, LatencyHistogram, is_histogram, quantile


def test_buckets_are_powers_of_two_microseconds() -> None:
    h = LatencyHistogram()
    h.add(999)               # < 1 µs: bucket 0
    h.add(1_000)             # 1 µs: bucket 1 (< 2 µs)
    h.add(3_999)             # 3 µs: bucket 2 (< 4 µs)
    h.add(100_000, count=5)  # 100 µs, five requests of one batch: bucket 7 (< 128 µs)
    h.add(-5)                # a clock that went back counts as 0
    h.add(10**12)            # 1000 s: the last, unbounded bucket
    snap = h.as_dict()
    counts = snap["counts"]
    assert isinstance(counts, list) and len(counts) == BUCKETS
    assert counts[0] == 2 and counts[1] == 1 and counts[2] == 1 and counts[7] == 5
    assert counts[-1] == 1 and sum(counts) == h.count == 10
    assert snap["sum_us"] == round((999 + 1000 + 3999 + 5 * 100_000 + 10**12) / 1000, 3)
    bounds = snap["le_us"]
    assert isinstance(bounds, list)
    assert bounds[:3] == [1, 2, 4] and bounds[7] == 128 and bounds[-1] is None
    # Every sample lies below its bucket's bound and at or above the one before.
    for ns in (0, 1, 999, 1000, 1999, 2000, 65_535_999, 65_536_000):
        one = LatencyHistogram()
        one.add(ns)
        i = one.counts.index(1)
        assert ns / 1000 < (bounds[i] or float("inf"))
        assert i == 0 or ns / 1000 >= (bounds[i - 1] or 0)
    assert is_histogram(json.loads(json.dumps(snap)))  # the stats socket carries it as JSON
    assert not is_histogram({"drops": 1}) and not is_histogram(3)


def test_quantiles_name_the_bucket_bound() -> None:
    h = LatencyHistogram()
    assert quantile(h.as_dict(), 0.5) is None  # no samples
    h.add(50_000, count=98)   # 50 µs  -> < 64 µs
    h.add(900_000, count=2)   # 900 µs -> < 1024 µs
    snap = h.as_dict()
    assert quantile(snap, 0.5) == 64.0
    assert quantile(snap, 0.98) == 64.0
    assert quantile(snap, 0.99) == 1024.0
    h.add(10**12)
    assert quantile(h.as_dict(), 1.0) == float("inf")
