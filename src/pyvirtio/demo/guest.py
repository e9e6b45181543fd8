"""The demo's guest process: a virtio-net driver over legacy virtio-pci (VIRTIO 1.2 §4.1.4.8, §5.1).

Run by the host as ``python -m pyvirtio.demo.guest`` with its file
descriptors inherited: the guest memory (a memfd the host created, as a VMM
creates guest RAM), one end of a ``SOCK_SEQPACKET`` socketpair and one irqfd
per MSI-X vector.

:class:`SocketBus` plays the vCPU plus KVM: a register access is a message
to the host that blocks for the answer (a VM exit), except a write that
matches an installed ioeventfd — ``QUEUE_NOTIFY`` with the queue index —
which only signals that eventfd, as KVM does.  The driver is Linux-shaped:
reset, ACKNOWLEDGE, DRIVER, features, ``setup_vq`` for receiveq1 and
transmitq1 with MSI-X vectors 1 and 2, DRIVER_OK, then fill the receive
queue.  It then streams numbered frames for ``--seconds`` and checks that
each one comes back intact and in order, drains, sends its statistics,
resets the device and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import socket
import sys
import time
from typing import Any

from pyvirtio.core.errors import PeerError, VirtioError
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import F_RING_EVENT_IDX, bit
from pyvirtio.demo import wire
from pyvirtio.demo.frames import check_frame, make_frame
from pyvirtio.devices.net.driver import NetDriver
from pyvirtio.devices.net.spec import F_MAC, F_MRG_RXBUF, F_STATUS, RX_QUEUE, TX_QUEUE
from pyvirtio.io.eventfd import EventFd
from pyvirtio.transports.pci_legacy import QUEUE_NOTIFY, LegacyPciDriver

log = logging.getLogger("pyvirtio.demo.guest")

CONFIG_VECTOR = 0
RX_VECTOR = 1
TX_VECTOR = 2
TX_BURST = 16
NAPI_BUDGET = 64
DRAIN_SECONDS = 10.0
MAX_ERROR_SAMPLES = 5
# Never hand a ring page frame number 0 (QUEUE_PFN 0 means reset): start above it.
GUEST_MEMORY_START = 0x10000


class SocketBus:
    """Register accesses as VM exits over a socket, kicks as ioeventfd writes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ioeventfds: dict[tuple[int, int, int], EventFd] = {}
        self.exits = 0

    def _exit(self, msg: bytes) -> int:
        self.exits += 1
        self.sock.send(msg)
        while True:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, wire.MAX_MESSAGE, 4)
            if not data:
                raise PeerError("the host closed the connection")
            reply = wire.decode_host(data, fds)
            if isinstance(reply, wire.Value):
                return reply.value
            key = (reply.offset, reply.width, reply.datamatch)
            old = self.ioeventfds.pop(key, None)
            if old is not None:
                old.close()
            if reply.fd >= 0:
                self.ioeventfds[key] = EventFd(reply.fd)

    def read(self, offset: int, width: int) -> int:
        return self._exit(wire.encode_read(offset, width))

    def write(self, offset: int, width: int, value: int) -> None:
        efd = self.ioeventfds.get((offset, width, value))
        if efd is not None:
            efd.signal()
            return
        self._exit(wire.encode_write(offset, width, value))

    def send_stats(self, data: dict[str, Any]) -> None:
        self.sock.send(wire.encode_stats(data))

    def close(self) -> None:
        for efd in self.ioeventfds.values():
            efd.close()
        self.ioeventfds.clear()


class FrameChecker:
    """Checks that received frames are exactly the sent ones, in order."""

    def __init__(self, mac: bytes) -> None:
        self.mac = mac
        self.next_seq = 0
        self.verified = 0
        self.errors = 0
        self.samples: list[str] = []

    def __call__(self, frame: bytes | memoryview) -> None:
        problem = check_frame(frame, self.next_seq, self.mac)
        self.next_seq += 1
        if problem is None:
            self.verified += 1
            return
        self.errors += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(problem)


def run_guest(mem_fd: int, mem_size: int, sock_fd: int, irq_fds: list[int], seconds: float,
              suppression: str) -> int:
    memory = GuestMemory.from_fd(mem_fd, mem_size)
    sock = socket.socket(fileno=sock_fd)
    bus = SocketBus(sock)
    irqs = [EventFd(fd, nonblocking=True) for fd in irq_fds]
    try:
        return _drive(memory, bus, sock, irqs, seconds, suppression)
    finally:
        bus.close()
        for e in irqs:
            e.close()
        sock.close()


def _drive(memory: GuestMemory, bus: SocketBus, sock: socket.socket, irqs: list[EventFd],
           seconds: float, suppression: str) -> int:
    allocator = BumpAllocator(GUEST_MEMORY_START, memory.regions[0].end)
    pci = LegacyPciDriver(bus, memory, allocator, msix=True)
    wanted = bit(F_MAC) | bit(F_STATUS) | bit(F_MRG_RXBUF)
    if suppression == "event-idx":
        wanted |= bit(F_RING_EVENT_IDX)
    features = pci.negotiate(wanted)
    mac = bytes(pci.config_read(i, 1) for i in range(6))
    pci.set_config_vector(CONFIG_VECTOR)
    rxq = pci.setup_vq(RX_QUEUE, RX_VECTOR)
    txq = pci.setup_vq(TX_QUEUE, TX_VECTOR)
    pci.driver_ok()
    checker = FrameChecker(mac)
    net = NetDriver(rxq, txq, memory, allocator, features, kick=pci.notify,
                    on_frame=checker, suppress=suppression != "none")
    received_irqs = [0, 0, 0]
    poller = select.poll()
    for e in irqs:
        poller.register(e.fd, select.POLLIN)
    poller.register(sock.fileno(), select.POLLIN)
    by_fd = {e.fd: vec for vec, e in enumerate(irqs)}
    net.try_fill_recv()

    start = time.monotonic()
    deadline = start + seconds
    drain_deadline = 0.0
    sending = True
    seq = 0
    timed_out = False
    send_seconds = seconds
    while True:
        now = time.monotonic()
        busy = False
        if sending and now >= deadline:
            sending = False
            send_seconds = now - start
            drain_deadline = now + DRAIN_SECONDS
        if sending and not net.tx_stopped:
            for _ in range(TX_BURST):
                if not net.xmit(make_frame(seq, mac)):
                    break
                seq += 1
            busy = not net.tx_stopped
        if net.napi_scheduled:
            net.napi_poll(NAPI_BUDGET)
            busy = True
        if not sending:
            net.free_old_xmit()
            if net.frames_received >= seq and net.tx_reclaimed >= seq:
                break
            if now > drain_deadline:
                timed_out = True
                break
        for fd, _ev in poller.poll(0 if busy else 50):
            vector = by_fd.get(fd)
            if vector is None:
                log.warning("guest: the host went away")
                return 1
            received_irqs[vector] += irqs[vector].drain()
            if vector == RX_VECTOR:
                net.rx_interrupt()
            elif vector == TX_VECTOR:
                net.tx_interrupt()
    for i, e in enumerate(irqs):
        received_irqs[i] += e.drain()
    stats = {
        "features": features,
        "frames_sent": seq,
        "frames_received": net.frames_received,
        "frames_verified": checker.verified,
        "errors": checker.errors + (seq - net.frames_received) + int(timed_out),
        "error_samples": checker.samples + (["timed out draining"] if timed_out else []),
        "kicks": net.kicks,
        "interrupts": [received_irqs[RX_VECTOR], received_irqs[TX_VECTOR]],
        "config_interrupts": received_irqs[CONFIG_VECTOR],
        "rx_buffers": net.rx_buffers,
        "tx_buffers": net.tx_reclaimed,
        "vm_exits": bus.exits,
        "send_seconds": send_seconds,
        "kick_register": QUEUE_NOTIFY,
    }
    bus.send_stats(stats)
    pci.reset()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyvirtio.demo.guest")
    p.add_argument("--mem-fd", type=int, required=True)
    p.add_argument("--mem-size", type=int, required=True)
    p.add_argument("--sock-fd", type=int, required=True)
    p.add_argument("--irq-fds", required=True, help="comma-separated, one per MSI-X vector")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--suppression", choices=["none", "flags", "event-idx"], required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        return run_guest(args.mem_fd, args.mem_size, args.sock_fd,
                         [int(x) for x in args.irq_fds.split(",")], args.seconds,
                         args.suppression)
    except KeyboardInterrupt:
        return 130
    except (VirtioError, OSError) as exc:
        log.warning("guest stops: %s", exc)
        return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
