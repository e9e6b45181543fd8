"""pyvirtio-rng: the virtio entropy device (VIRTIO 1.2 §5.4) as a vhost-user back end.

One queue (requestq, §5.4.2), no feature bits, no config space; each device-writable buffer
gets the next bytes of ``--source`` in order (§5.4.6).  At most ``--max-bytes`` per
``--period-ms`` as in rust-vmm's vhost-device-rng: a request beyond the budget waits (deferred).
"""

from __future__ import annotations

import os
import sys
import time
from argparse import ArgumentParser, Namespace
from collections import deque

from pyvirtio import vhost_user as vu


class RngDevice(vu.Device):
    device_id: int = vu.DeviceId.ENTROPY
    def __init__(self, source: str, max_bytes: int | None = None, period_ms: int = 1000) -> None:
        self.fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        self.max_bytes = sys.maxsize if max_bytes is None else max_bytes  # None: no limit
        self.period_ms, self.budget, self.period_end, self.timer_at = period_ms, 0, 0.0, 0.0
        self.waiting: deque[vu.Request] = deque()  # first come, first served: bytes in order

    def handle(self, queue: vu.VirtQueue, req: vu.Request) -> vu.Deferred:
        if req.readable:
            raise vu.PeerError("a device-readable buffer on requestq (VIRTIO 1.2 §5.4.6.1)")
        self.waiting.append(req)
        self.serve_waiting()
        return vu.DEFERRED  # completed already, unless the budget is spent

    def serve_waiting(self) -> None:
        while self.waiting and (n := self._grant(self.waiting[0].writable_len)):
            req = self.waiting.popleft()
            req.complete(req.write(os.read(self.fd, n)))  # 0 bytes at the end of a file
        if self.waiting and self.timer_at != self.period_end:  # one timer per period
            self.timer_at = self.period_end
            self.loop.call_later(self.period_end - time.monotonic(), self.serve_waiting)

    def _grant(self, wanted: int) -> int:
        if (now := time.monotonic()) >= self.period_end:
            self.period_end, self.budget = now + self.period_ms / 1000, self.max_bytes
        # Whole requests only: Debian 12's virtio_rng (copy_data) can stall on a short answer.
        granted = want if (want := min(wanted, self.max_bytes)) <= self.budget else 0
        self.budget -= granted
        return granted

    def queue_stopped(self, queue: vu.VirtQueue) -> None:
        self.waiting.clear()  # the driver no longer waits for them on this ring


def program(prog: str = "pyvirtio-rng", parser: ArgumentParser | None = None) -> vu.BackendProgram:
    cli = vu.BackendProgram(prog, "virtio entropy device (VIRTIO 1.2 §5.4)", "rng",
                            binary="pyvirtio-rng", parser=parser)
    add = cli.parser.add_argument
    add("--source", default="/dev/urandom", help="the file to read, in order")
    add("--max-bytes", type=int, help="at most this many bytes per period (default: no limit)")
    add("--period-ms", type=int, default=1000, help="the limit's period, 1..65536")
    return cli


def run(cli: vu.BackendProgram, args: Namespace) -> int:
    cli.check_args(args)
    if (args.max_bytes is not None and args.max_bytes < 1) or not 1 <= args.period_ms <= 65536:
        cli.error("--max-bytes must be at least 1 and --period-ms within 1..65536")
    try:
        device = RngDevice(args.source, args.max_bytes, args.period_ms)
    except OSError as exc:
        return cli.fail(f"cannot read --source: {exc}")
    return cli.serve(device, args)


def main(argv: list[str] | None = None) -> int:
    return run(cli := program(), cli.parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
