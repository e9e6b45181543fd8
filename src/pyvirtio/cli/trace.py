"""``pyvirtio trace``: record a back end's kicks and interrupt decisions for a few seconds.

Asks the back end's ``--stats-socket`` for a trace (docs/stats.md): while
it runs, every ring appends each kick it receives, each interrupt decision
(sent or suppressed, with QEMU ``virtio_should_notify``'s inputs: old =
signalled_used, new = used.idx, event = used_event) and each change of its
kick suppression to a bounded list.  Writes ``trace.csv`` (one row per
record, with ``distance`` = new - event as a signed 16-bit number) and
``trace.png``: the events over time, and the distance of every interrupt
decision against the batch it covered — with EVENT_IDX (VIRTIO 1.2
§2.7.10) an interrupt is sent exactly when 1 <= distance <= new - old.
The plot needs matplotlib (``pip install 'pyvirtio[plot]'``), checked
before anything is recorded.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
from typing import Any

from pyvirtio.cli.common import failure, positive_float
from pyvirtio.core.errors import CallerError
from pyvirtio.transports.stats_socket import MAX_TRACE_SECONDS, request

PROG = "pyvirtio trace"
CSV_COLUMNS = ["t", "device", "queue", "kind", "old", "new", "event", "distance", "flags"]
_MARKERS = {"kick": ("kick", "v", 4), "irq": ("interrupt sent", "^", 3),
            "irq-suppressed": ("interrupt suppressed", "x", 2),
            "kicks-on": ("kicks on", "|", 1), "kicks-off": ("kicks off", "|", 0)}


def distance(new: int, event: int) -> int | None:
    """new - event as a signed 16-bit number (None without an event index)."""
    if event < 0:
        return None
    d = (new - event) & 0xFFFF
    return d - 0x10000 if d >= 0x8000 else d


def write_csv(path: str, records: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for t, dev, queue, kind, old, new, event, flags in records:
            d = distance(new, event) if kind.startswith("irq") else None
            w.writerow([f"{t:.6f}", dev, queue, kind, old, new, event,
                        "" if d is None else d, flags])


def write_png(path: str, records: list[list[Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (events, dist) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                       gridspec_kw={"height_ratios": [1, 1.4]})
    queues = sorted({(r[1], r[2]) for r in records})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for qi, (dev, queue) in enumerate(queues):
        mine = [r for r in records if (r[1], r[2]) == (dev, queue)]
        color = colors[qi % len(colors)]
        tag = f"q{queue}" if len({d for d, _ in queues}) == 1 else f"{dev} q{queue}"
        for kind, (label, marker, row) in _MARKERS.items():
            ts = [r[0] for r in mine if r[3] == kind]
            if ts:
                events.scatter(ts, [row + 0.15 * qi] * len(ts), marker=marker, s=18,
                               color=color, label=f"{tag} {label}" if qi < 4 else None)
        decisions = [r for r in mine if r[3].startswith("irq") and r[6] >= 0]
        for sent, marker in ((True, "^"), (False, "x")):
            pts = [r for r in decisions if (r[3] == "irq") == sent]
            if pts:
                dist.scatter([r[0] for r in pts], [distance(r[5], r[6]) for r in pts],
                             marker=marker, s=14, color=color,
                             label=f"{tag} {'sent' if sent else 'suppressed'}")
        if decisions:
            dist.step([r[0] for r in decisions], [(r[5] - r[4]) & 0xFFFF if r[4] >= 0 else 0
                                                  for r in decisions],
                       where="post", color=color, alpha=0.35, linewidth=1,
                       label=f"{tag} batch (new - old)")
    events.set_yticks([v[2] for v in _MARKERS.values()], [v[0] for v in _MARKERS.values()])
    events.set_title(title)
    events.legend(fontsize=7, loc="upper right", ncol=2)
    dist.axhline(0, color="black", linewidth=0.8)
    dist.axhline(1, color="grey", linewidth=0.6, linestyle="--")
    dist.set_ylabel("used.idx - used_event")
    dist.set_xlabel("seconds")
    dist.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.seconds > MAX_TRACE_SECONDS:
        return failure(PROG, f"--seconds {args.seconds:g}: at most {MAX_TRACE_SECONDS:g}")
    if importlib.util.find_spec("matplotlib") is None:
        return failure(PROG, "the trace plot needs matplotlib: pip install 'pyvirtio[plot]'")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        return failure(PROG, f"cannot create --out {args.out}: {exc.strerror}")
    try:
        doc = request(args.stats_socket, {"request": "trace", "seconds": args.seconds},
                      timeout=args.seconds + 10)
    except CallerError as exc:
        return failure(PROG, str(exc))
    records: list[list[Any]] = doc["records"]  # type: ignore[assignment]
    csv_path = os.path.join(args.out, "trace.csv")
    png_path = os.path.join(args.out, "trace.png")
    write_csv(csv_path, records)
    write_png(png_path, records, f"pyvirtio trace: {args.stats_socket}, {args.seconds:g} s")
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r[3]] = kinds.get(r[3], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no events"
    dropped = f" ({doc['dropped']} records dropped: a ring's list was full)" \
        if doc.get("dropped") else ""
    print(f"{len(records)} records: {summary}{dropped}\n{csv_path}\n{png_path}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "trace", help="record a back end's kicks and interrupt decisions (CSV + PNG)",
        description="Record every kick and interrupt decision of a pyvirtio back end (its "
                    "--stats-socket) with its inputs (old, new, event index) for a few "
                    "seconds; write trace.csv and a trace.png timeline.")
    p.add_argument("--stats-socket", required=True, metavar="PATH",
                   help="the back end's --stats-socket")
    p.add_argument("--seconds", type=positive_float, default=3.0, metavar="S",
                   help=f"how long to record (at most {MAX_TRACE_SECONDS:g})")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the files")
    p.set_defaults(func=run)


if __name__ == "__main__":
    from pyvirtio.cli.main import main

    sys.exit(main(["trace", *sys.argv[1:]]))
