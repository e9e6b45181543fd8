"""``pyvirtio duel``: sweep the driver/device speed ratio, count notifications per mode.

Wiring only; the measurement lives in :mod:`pyvirtio.demo.duel`
(notification suppression, VIRTIO 1.2 §2.7.7 / §2.7.10).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pyvirtio.cli.common import (
    non_negative_float,
    positive_int,
    queue_size,
    usage_error,
)
from pyvirtio.demo.duel import DEFAULT_RATIOS, MODES, RINGS, DuelPoint, sweep, write_outputs

PROG = "pyvirtio duel"


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("ratios must be positive numbers")
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}")
    return modes


def _rings(text: str) -> list[str]:
    rings = list(dict.fromkeys(r.strip() for r in text.split(",") if r.strip()))
    if not rings or any(r not in RINGS for r in rings):
        raise argparse.ArgumentTypeError(f"rings are {', '.join(RINGS)}")
    return rings


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "duel", help="notifications per 1,000 buffers against the driver/device speed ratio",
        description="A driver process and a device process exchange buffers over a shared "
                    "ring (split, or packed with --rings); each spins for its per-buffer work. "
                    "For each ring, suppression mode and speed ratio, count kicks and "
                    "interrupts per 1,000 buffers.")
    p.add_argument("--device-work-us", type=non_negative_float, default=20.0,
                   help="device work per buffer in microseconds (fixed)")
    p.add_argument("--driver-work-us", type=non_negative_float, default=None,
                   help="measure one ratio only: this driver work per buffer in microseconds "
                        "(default: sweep --ratios)")
    p.add_argument("--ratios", type=_floats, default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                   help="driver work / device work, comma-separated")
    p.add_argument("--modes", type=_modes, default=",".join(MODES),
                   help="suppression modes, comma-separated")
    p.add_argument("--rings", type=_rings, default="split",
                   help="ring kinds, comma-separated: split (VIRTIO 1.2 §2.7), packed (§2.8); "
                        "the plot shows them on one figure (packed dashed)")
    p.add_argument("--buffers", type=positive_int, default=4000, help="buffers per point")
    p.add_argument("--queue-size", type=queue_size(), default=128,
                   help="size of the shared ring (power of two, 2..32768)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write duel.csv and duel.png into this directory (created if missing; "
                        "checked before the sweep)")
    p.add_argument("--json", action="store_true",
                   help="print the points as JSON on stdout instead of a table")
    p.set_defaults(func=run)


def _table(points: list[DuelPoint]) -> Table:
    t = Table(title="speed duel: notifications per 1,000 buffers",
              caption="ratio = driver work / device work; lost = wake-ups that timed out",
              title_justify="left", caption_justify="left")
    for col in ("ring", "mode", "ratio", "drv µs", "dev µs", "kicks/1k", "irqs/1k", "secs",
                "lost"):
        t.add_column(col, justify="left" if col in ("ring", "mode") else "right")
    for p in points:
        t.add_row(p.ring, p.mode, f"{p.ratio:g}", f"{p.driver_work_us:g}", f"{p.device_work_us:g}",
                  f"{p.kicks_per_1000:.1f}", f"{p.interrupts_per_1000:.1f}", f"{p.seconds:.2f}",
                  str(p.lost_wakeups))
    return t


def _out_dir_problem(out: Path) -> str | None:
    """Why the results could not be written to ``out``; None once it is a writable directory."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is not a directory: give a directory (created if missing)"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out}: cannot create the directory ({exc.strerror}): give another one"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out}: the directory is not writable: give another one"
    if importlib.util.find_spec("matplotlib") is None:
        return "--out writes a plot, which needs matplotlib: pip install 'pyvirtio[plot]'"
    return None


def run(args: argparse.Namespace) -> int:
    ratios = args.ratios
    if args.driver_work_us is not None:
        if args.device_work_us == 0:
            return usage_error(PROG, "--driver-work-us needs a non-zero --device-work-us")
        ratios = [args.driver_work_us / args.device_work_us]
    # Checked before the sweep, which takes minutes: a bad --out must not lose the results.
    if args.out is not None and (problem := _out_dir_problem(args.out)) is not None:
        return usage_error(PROG, problem)
    err = Console(stderr=True)
    total = len(args.rings) * len(args.modes) * len(ratios)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, disable=not err.is_terminal,
                  transient=True) as progress:
        task = progress.add_task("duel", total=total)

        def done(p: DuelPoint) -> None:
            progress.update(task, advance=1,
                            description=f"{p.ring} {p.mode} ratio {p.ratio:g}: "
                                        f"{p.kicks_per_1000:.0f} kicks/1k")

        points = sweep(args.modes, ratios, args.device_work_us, args.buffers, args.queue_size,
                       done, args.rings)
    outputs: dict[str, str] = {}
    if args.out is not None:
        csv_path, png_path = write_outputs(points, args.out)
        outputs = {"csv": str(csv_path), "png": str(png_path)}
    if args.json:
        print(json.dumps({"points": [asdict(p) for p in points], **outputs}, indent=2))
    else:
        out = Console()
        out.print(_table(points))
        for kind, path in outputs.items():
            out.print(f"{kind}: {path}")
    return 0 if all(p.lost_wakeups == 0 for p in points) else 1
