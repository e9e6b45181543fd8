"""``pyvirtio torture``: attack a vhost-user back end and judge how it copes.

Wiring only: the cases, the judge and the loop live in :mod:`pyvirtio.torture`.
The exit status is the number of cases whose verdict is not REJECTED (at
most 125), 1 or 2 for a failure before any case ran.
"""

from __future__ import annotations

import argparse
import json
import sys

from pyvirtio.cli.common import failure, positive_float, socket_problem, usage_error

PROG = "pyvirtio torture"


def _cases(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give case names separated by commas (see --list)")
    return names


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pyvirtio.torture.cases import select
    from pyvirtio.torture.judge import Verdict, alive, socket_accepts
    from pyvirtio.torture.runner import Torture, unjudged

    try:
        cases = select(args.device, args.cases)
    except KeyError as exc:
        return usage_error(PROG, f"no {args.device} case named {exc.args[0]!r}: "
                                 f"see {PROG} --list --device {args.device}")
    if args.list:
        for c in cases:
            print(f"{c.name:<32} {c.side:<6} {c.description}")
        return 0
    if args.socket_path is None:
        return usage_error(PROG, "--socket-path is required (unless --list)")
    if args.pid is not None and not alive(args.pid):
        return failure(PROG, f"no process with pid {args.pid}: give the back end's pid")
    torture = Torture(args.socket_path, args.device, args.pid, args.restart_cmd,
                      timeout=args.timeout, settle=args.settle)
    if args.restart_cmd is not None and socket_accepts(args.socket_path) is False:
        note = torture.restart()  # nothing serves yet: the restart command starts it
        print(f"{PROG}: {note}", file=sys.stderr)
    problem = socket_problem(args.socket_path)
    if problem is not None:
        return failure(PROG, problem)
    why = torture.good_connection()
    if why is not None:
        return failure(PROG, f"{args.socket_path}: the back end does not answer a good "
                             f"{args.device} request, so no case could be judged: {why}")
    tty = sys.stderr.isatty()

    def progress(i: int, n: int, name: str, verdict: Verdict | None) -> None:
        state = "…" if verdict is None else verdict.value
        sys.stderr.write(f"\r\x1b[K[{i}/{n}] {name} {state}")
        sys.stderr.flush()

    if tty:
        torture.progress = progress
    results = torture.run(cases)
    if tty:
        sys.stderr.write("\r\x1b[K")
    bad = sum(r.verdict is not Verdict.REJECTED for r in results)
    missing = unjudged(args.pid)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        if missing:
            print(f"{PROG}: without --pid, not judged: " + "; ".join(missing), file=sys.stderr)
    else:
        styles = {Verdict.REJECTED: "green", Verdict.LEAKED: "yellow"}
        table = Table(title=f"pyvirtio torture: {args.device} back end at {args.socket_path}")
        table.add_column("case", no_wrap=True)
        table.add_column("side", no_wrap=True)
        table.add_column("verdict", no_wrap=True)
        table.add_column("detail", overflow="fold")
        side = {c.name: c.side for c in cases}
        for r in results:
            table.add_row(r.case, side[r.case],
                          f"[{styles.get(r.verdict, 'bold red')}]{r.verdict.value}[/]",
                          r.detail)
        console = Console()
        console.print(table)
        counts = {v: sum(r.verdict is v for r in results) for v in Verdict}
        console.print(", ".join(f"{v.value} {n}" for v, n in counts.items() if n)
                      + f" ({len(results)} cases)", highlight=False)
        if missing:
            console.print("Without --pid, not judged: " + "; ".join(missing), highlight=False)
    for proc in torture.restarted:
        if proc.poll() is None:
            print(f"{PROG}: the back end started by --restart-cmd keeps running "
                  f"(pid {torture.pid or proc.pid})", file=sys.stderr)
    return min(bad, 125)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "torture", help="attack a vhost-user back end with hostile rings and messages",
        description="A malicious front end against any vhost-user back end. Each case "
                    "connects, proves a ring with a good request on canary-filled guest "
                    "memory, does one hostile thing in the ring or on the socket, and judges: "
                    "REJECTED (still serves a new front end, memory intact), WEDGED (alive but "
                    "serves no new front end, or spins), CRASHED (gone), CORRUPTED (guest "
                    "memory changed outside the used ring and writable buffers), LEAKED (fds "
                    "that outlived the connection). Exit status: the number of verdicts other "
                    "than REJECTED. Runs read-only requests on a blk back end.")
    p.add_argument("--socket-path", metavar="PATH", help="the Unix socket the back end listens on")
    p.add_argument("--pid", type=int, help="the back end's pid: judges LEAKED, spinning and "
                                           "CRASHED from /proc")
    p.add_argument("--device", choices=["blk", "net"], default="blk",
                   help="the device the back end serves")
    p.add_argument("--cases", type=_cases, metavar="NAME,...", help="run only these cases")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--restart-cmd", metavar="CMD",
                   help="shell command that starts the back end again after a crash (or a "
                        "wedge, with --pid) so the run goes on")
    p.add_argument("--timeout", type=positive_float, default=5.0, metavar="S",
                   help="longest wait for a reply or a good request")
    p.add_argument("--settle", type=positive_float, default=0.5, metavar="S",
                   help="how long to watch the back end after each case")
    p.add_argument("--json", action="store_true",
                   help="print a list of {case, verdict, detail} as JSON")
    p.set_defaults(func=run)
