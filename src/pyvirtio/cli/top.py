"""``pyvirtio top``: a live view of a back end's queues, read from its ``--stats-socket``.

One row per queue: buffers, kicks and interrupts per second, notifications
(kicks + interrupts) per 1,000 buffers — the suppression ratio of VIRTIO 1.2
§2.7.10 — requests in flight, and the ring's indices and event indices as
they move.  Rates are differences of two snapshots over the back end's own
clock.  ``--once`` prints one view (two snapshots ``--interval`` apart) and
exits; ``--json`` prints it as JSON for scripts (schema in docs/stats.md).
Wiring and arithmetic only: the snapshot is
:func:`pyvirtio.transports.stats_socket.request`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pyvirtio.cli.common import failure, positive_float
from pyvirtio.core.errors import CallerError
from pyvirtio.transports.histogram import is_histogram, quantile
from pyvirtio.transports.stats_socket import request

PROG = "pyvirtio top"
#: Columns of the view: (row key, heading).
COLUMNS = (
    ("device", "device"), ("queue", "q"), ("buffers_per_s", "buf/s"),
    ("kicks_per_s", "kicks/s"), ("interrupts_per_s", "irqs/s"),
    ("notifications_per_1k", "notif/1k"), ("in_flight", "inflight"),
    ("avail_idx", "avail"), ("last_avail_idx", "last_avail"), ("avail_event", "avail_evt"),
    ("used_idx", "used"), ("used_event", "used_evt"), ("kicks_wanted", "kicks"),
)


def rows(prev: dict[str, Any], cur: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per queue of ``cur``, with rates since ``prev`` (an earlier snapshot)."""
    dt = max(float(cur["time"]) - float(prev["time"]), 1e-9)
    before = {(d["name"], q["index"]): q["total"] for d in prev["devices"] for q in d["queues"]}
    out: list[dict[str, Any]] = []
    for dev in cur["devices"]:
        for q in dev["queues"]:
            total = q["total"]
            old = before.get((dev["name"], q["index"]), total)
            d = {k: total[k] - old[k] for k in ("buffers_pushed", "kicks", "interrupts")}
            if d["buffers_pushed"] == 0:
                d = {k: total[k] for k in d}  # idle: the ratio over the whole life
            buffers = d["buffers_pushed"]
            ratio = (1000 * (d["kicks"] + d["interrupts"]) / buffers) if buffers else None
            state = q["state"] or {}
            out.append({
                "device": dev["name"], "queue": q["index"], "active": q["active"],
                "buffers_per_s": (total["buffers_pushed"] - old["buffers_pushed"]) / dt,
                "kicks_per_s": (total["kicks"] - old["kicks"]) / dt,
                "interrupts_per_s": (total["interrupts"] - old["interrupts"]) / dt,
                "notifications_per_1k": ratio,
                "in_flight": state.get("in_flight"),
                **{k: state.get(k) for k in ("avail_idx", "last_avail_idx", "avail_event",
                                             "used_idx", "used_event", "kicks_wanted")},
                "buffers": total["buffers_pushed"], "kicks": total["kicks"],
                "interrupts": total["interrupts"],
                "interrupts_suppressed": total["interrupts_suppressed"],
            })
    return out


def latencies(prev: dict[str, Any], cur: dict[str, Any]) -> list[dict[str, Any]]:
    """Per device histogram (blk: request latency): requests and the p50/p99 bucket
    bounds (µs) since ``prev``, or over the whole life when nothing happened since."""
    before = {d["name"]: d.get("device_stats") or {} for d in prev["devices"]}
    out: list[dict[str, Any]] = []
    for dev in cur["devices"]:
        for key, hist in (dev.get("device_stats") or {}).items():
            if not is_histogram(hist):
                continue
            old = before.get(dev["name"], {}).get(key)
            counts = list(hist["counts"])
            if is_histogram(old) and sum(counts) > sum(old["counts"]):
                counts = [a - b for a, b in zip(counts, old["counts"], strict=True)]
            window = {"counts": counts, "le_us": hist["le_us"]}
            out.append({"device": dev["name"], "histogram": key, "requests": sum(counts),
                        "p50_us": _finite(quantile(window, 0.5)),
                        "p99_us": _finite(quantile(window, 0.99))})
    return out


def _finite(value: float | None) -> float | None:
    # JSON has no infinity: null also stands for "beyond the last bucket's bound".
    return None if value is None or math.isinf(value) else value


def caption(lat: list[dict[str, Any]]) -> str | None:
    """One line per device histogram under the table."""
    lines = [f"{os.path.basename(r['device']) or r['device']} {r['histogram']}: "
             + (f"p50 {_us(r['p50_us'])}, p99 {_us(r['p99_us'])} ({r['requests']:,} requests)"
                if r["requests"] else "no requests yet")
             for r in lat]
    return "\n".join(lines) or None


def _us(value: float | None) -> str:
    return "≥ 1 s" if value is None else f"< {value:,.0f} µs"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_per_s") or key == "notifications_per_1k":
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if key == "kicks_wanted":
        return "on" if value else "off"
    return str(value)


def table(view: list[dict[str, Any]], title: str,
          lat: Sequence[dict[str, Any]] = ()) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=None, header_style="bold",
              caption=caption(list(lat)), caption_justify="left")
    for key, heading in COLUMNS:
        t.add_column(heading, justify="left" if key == "device" else "right", no_wrap=True,
                     min_width=len(heading))
    for row in view:
        cells = [_cell(k, row[k]) for k, _ in COLUMNS]
        cells[0] = os.path.basename(cells[0]) or cells[0]  # the full path is in --json
        t.add_row(*cells, style=None if row["active"] else "dim")
    return t


def run(args: argparse.Namespace) -> int:
    try:
        prev = request(args.stats_socket)
        if args.once:
            time.sleep(args.interval)
            cur = request(args.stats_socket)
            view = rows(prev, cur)
            if args.json:
                print(json.dumps({"schema": "pyvirtio-top", "version": 1,
                                  "interval": float(cur["time"]) - float(prev["time"]),  # type: ignore[arg-type]
                                  "queues": view, "latency": latencies(prev, cur)},
                                 indent=2))
            else:
                from rich.console import Console
                Console().print(table(view, f"pyvirtio top: {args.stats_socket}",
                                      latencies(prev, cur)))
            return 0
        return _live(args, prev)
    except CallerError as exc:
        return failure(PROG, str(exc))


def _live(args: argparse.Namespace, prev: dict[str, Any]) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    title = f"pyvirtio top: {args.stats_socket} (every {args.interval:g} s, Ctrl-C quits)"
    try:
        with Live(table([], title), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                cur = request(args.stats_socket)
                if args.json:
                    print(json.dumps({"queues": rows(prev, cur),
                                      "latency": latencies(prev, cur)}), flush=True)
                else:
                    live.update(table(rows(prev, cur), title, latencies(prev, cur)),
                                refresh=True)
                prev = cur
    except KeyboardInterrupt:
        return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "top", help="live per-queue view of a back end (its --stats-socket)",
        description="Watch a pyvirtio back end's queues: buffers, kicks and interrupts per "
                    "second, notifications per 1,000 buffers, in flight, and the ring's "
                    "indices and event indices (VIRTIO 1.2 §2.7.10). The back end must run "
                    "with --stats-socket PATH.")
    p.add_argument("--stats-socket", required=True, metavar="PATH",
                   help="the back end's --stats-socket")
    p.add_argument("--interval", type=positive_float, default=1.0, metavar="S",
                   help="seconds between snapshots")
    p.add_argument("--once", action="store_true",
                   help="print one view (two snapshots --interval apart) and exit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


if __name__ == "__main__":
    from pyvirtio.cli.main import main

    sys.exit(main(["top", *sys.argv[1:]]))
