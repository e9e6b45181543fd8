"""Rendering of demo results: the live progress view and the closing table (rich).

The numbers are the ones VIRTIO 1.2 §2.7.7 and §2.7.10 (notification
suppression) are about: per queue, buffers moved, kicks (driver to device)
and interrupts (device to driver), and both per 1,000 buffers.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pyvirtio.demo.host import QUEUE_NAMES, Snapshot


def _per_1000(n: int, bufs: int) -> str:
    return f"{1000.0 * n / bufs:.1f}" if bufs else "-"


def live_view(snap: Snapshot, suppression: str) -> RenderableType:
    """What the progress display shows while the demo runs."""
    table = Table(title=f"pyvirtio demo — suppression: {suppression}", title_justify="left")
    for col in ("queue", "buffers", "kicks", "interrupts", "kicks/1k", "irqs/1k"):
        table.add_column(col, justify="right" if col != "queue" else "left")
    for i, name in enumerate(QUEUE_NAMES):
        b, k, n = snap.buffers[i], snap.kicks[i], snap.interrupts[i]
        table.add_row(name, f"{b:,}", f"{k:,}", f"{n:,}", _per_1000(k, b), _per_1000(n, b))
    done = min(snap.elapsed, snap.seconds)
    bar = ProgressBar(total=snap.seconds, completed=done, width=40)
    return Group(table, Text(f"{snap.elapsed:5.1f} s of {snap.seconds:g} s"), bar)


def result_table(result: dict[str, Any]) -> Table:
    """The closing table, from :meth:`DemoResult.to_json` output."""
    frames = result["frames"]
    table = Table(
        title=f"suppression: {result['suppression']}   queue size: {result['queue_size']}   "
              f"{result['seconds']:.1f} s",
        caption=f"frames sent {frames['sent']:,}, received {frames['received']:,}, "
                f"verified {frames['verified']:,}, errors {frames['errors']}"
                f"  ({frames['per_second']:,.0f} frames/s)",
        title_justify="left", caption_justify="left")
    for col in ("queue", "buffers", "kicks", "interrupts", "kicks/1k buf", "irqs/1k buf"):
        table.add_column(col, justify="left" if col == "queue" else "right")
    rows = [*result["queues"], {"name": "total", **result["total"]}]
    for q in rows:
        table.add_row(q["name"], f"{q['buffers']:,}", f"{q['kicks']:,}", f"{q['interrupts']:,}",
                      f"{q['kicks_per_1000']:.1f}", f"{q['interrupts_per_1000']:.1f}",
                      end_section=q["name"] == QUEUE_NAMES[-1])
    return table
