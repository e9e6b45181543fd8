"""The demo's host process: a VMM serving one virtio-net device over legacy virtio-pci.

VIRTIO 1.2 §4.1.4.8 (legacy register block, through
:class:`~pyvirtio.transports.pci_legacy.LegacyPciDevice`), §4.1.5.1.2 (MSI-X
vectors), §5.1 (virtio-net, here a loopback that sends every transmitted
frame back to the receive queue).

The host creates guest memory as a memfd, one ``SOCK_SEQPACKET`` socketpair
for register accesses (VM exits) and one irqfd per MSI-X vector, then starts
the guest process with those descriptors.  When the driver sets DRIVER_OK
the host creates one ioeventfd per queue and installs it in the guest's
"KVM" (QEMU starts ioeventfd at DRIVER_OK too): from then on kicks arrive
on eventfds the host waits on with ``selectors``, and the eventfd counter
tells exactly how many kicks each wake-up stands for.  Interrupts are the
device's ``should_notify`` decisions, delivered by writing the queue's
vector's irqfd.

A guest that sends a malformed message loses its connection (one log line)
and is stopped; the host never hangs: it stops the guest when its time is up
and on Ctrl-C, and always reaps it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.spec import F_RING_EVENT_IDX, Status, bit
from pyvirtio.demo import wire
from pyvirtio.devices.net.device import NetDevice, load_bursts
from pyvirtio.devices.net.spec import (
    F_MAC,
    F_MRG_RXBUF,
    F_STATUS,
    RX_QUEUE,
    TX_QUEUE,
    net_config,
)
from pyvirtio.io.eventfd import EventFd
from pyvirtio.transports import pci_legacy as pci
from pyvirtio.transports.device import VirtQueue

log = logging.getLogger("pyvirtio.demo.host")

SUPPRESSION_MODES = ("none", "flags", "event-idx")
QUEUE_NAMES = ("rx", "tx")
MSIX_VECTORS = 3
DEMO_MAC = bytes.fromhex("525400123456")
# Time the guest gets beyond --seconds to set up, drain and report.
GRACE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class DemoConfig:
    suppression: str = "event-idx"
    seconds: float = 3.0
    queue_size: int = 256
    #: "split" (the two-process demo over legacy virtio-pci) or "packed"
    #: (pyvirtio.demo.inprocess: legacy virtio-pci has no packed ring).
    ring: str = "split"

    def host_features(self) -> int:
        features = bit(F_MAC) | bit(F_STATUS) | bit(F_MRG_RXBUF)
        if self.suppression == "event-idx":
            features |= bit(F_RING_EVENT_IDX)
        return features

    def memory_size(self) -> int:
        # Two rings, receive buffers (2 KiB each) and transmit slots, plus slack.
        per_queue = pci.legacy_ring_bytes(self.queue_size) + self.queue_size * 2048
        return max(4 << 20, ((2 * per_queue + (1 << 20)) + 0xFFFFF) & ~0xFFFFF)


@dataclass(slots=True)
class Snapshot:
    """Device-side counters, per queue (index 0 = rx, 1 = tx)."""

    elapsed: float
    seconds: float
    buffers: list[int]
    kicks: list[int]
    interrupts: list[int]


@dataclass
class DemoResult:
    config: DemoConfig
    buffers: list[int]
    kicks: list[int]
    interrupts: list[int]
    elapsed: float
    guest: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    guest_exit: int | None = None

    @property
    def ok(self) -> bool:
        return (not self.errors and bool(self.guest) and self.guest.get("errors") == 0
                and self.guest_exit == 0)

    def to_json(self) -> dict[str, Any]:
        def per_1000(n: int, bufs: int) -> float:
            return round(1000.0 * n / bufs, 2) if bufs else 0.0

        queues = []
        for i, name in enumerate(QUEUE_NAMES):
            queues.append({
                "name": name,
                "buffers": self.buffers[i],
                "kicks": self.kicks[i],
                "interrupts": self.interrupts[i],
                "kicks_per_1000": per_1000(self.kicks[i], self.buffers[i]),
                "interrupts_per_1000": per_1000(self.interrupts[i], self.buffers[i]),
            })
        total_b, total_k, total_i = sum(self.buffers), sum(self.kicks), sum(self.interrupts)
        g = self.guest
        return {
            "suppression": self.config.suppression,
            "ring": self.config.ring,
            "seconds": round(self.elapsed, 3),
            "queue_size": self.config.queue_size,
            "queues": queues,
            "total": {
                "buffers": total_b, "kicks": total_k, "interrupts": total_i,
                "kicks_per_1000": per_1000(total_k, total_b),
                "interrupts_per_1000": per_1000(total_i, total_b),
            },
            "frames": {
                "sent": g.get("frames_sent", 0),
                "received": g.get("frames_received", 0),
                "verified": g.get("frames_verified", 0),
                "errors": g.get("errors", 0),
                "error_samples": g.get("error_samples", []),
                "per_second": round(g.get("frames_received", 0)
                                    / max(g.get("send_seconds", 0.0), 1e-9), 1),
            },
            "driver_view": {
                "kicks": g.get("kicks", []),
                "interrupts": g.get("interrupts", []),
                "vm_exits": g.get("vm_exits", 0),
            },
            "features": f"{g.get('features', 0):#x}",
            "errors": self.errors,
            "ok": self.ok,
        }


class DemoHost:
    """Owns the guest process and everything shared with it; use as a context manager."""

    def __init__(self, config: DemoConfig) -> None:
        if config.suppression not in SUPPRESSION_MODES:
            raise CallerError(f"suppression must be one of {SUPPRESSION_MODES}")
        self.config = config
        self.memory = GuestMemory.anonymous(config.memory_size(), name="pyvirtio-demo-guest")
        self.regs = pci.LegacyPciDevice(
            self.memory, config.host_features(), [config.queue_size, config.queue_size],
            net_config(DEMO_MAC), msix_vectors=MSIX_VECTORS)
        self.sock, self._guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.irqfds = [EventFd(nonblocking=True) for _ in range(MSIX_VECTORS)]
        self.ioeventfds: dict[int, EventFd] = {}
        self.sel = selectors.DefaultSelector()
        self.net: NetDevice | None = None
        self.vqs: dict[int, VirtQueue] = {}
        #: Work the device kit scheduled (publishing, resuming transmit): run
        #: after each kick, as an event loop would.
        self._soon: list[Callable[[], None]] = []
        self.buffers = [0, 0]
        self.kicks = [0, 0]
        self.interrupts = [0, 0]
        self._base_buffers = [0, 0]
        self.guest_stats: dict[str, Any] = {}
        self.errors: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._connected = True

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        # The device is made at DRIVER_OK; what it imports is imported before the guest
        # runs (a Ctrl-C in the middle of importing numpy can hang the exit).
        load_bursts()
        mem_fd = self.memory.regions[0].fd
        fds = [mem_fd, self._guest_sock.fileno(), *(e.fd for e in self.irqfds)]
        cmd = [sys.executable, "-m", "pyvirtio.demo.guest",
               "--mem-fd", str(mem_fd), "--mem-size", str(self.config.memory_size()),
               "--sock-fd", str(self._guest_sock.fileno()),
               "--irq-fds", ",".join(str(e.fd) for e in self.irqfds),
               "--seconds", str(self.config.seconds),
               "--suppression", self.config.suppression]
        self.proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL)
        self._guest_sock.close()
        self.sel.register(self.sock, selectors.EVENT_READ, None)

    def close(self) -> None:
        """Stop the guest (if still running) and release everything; safe to call twice."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._drop_ioeventfds(tell_guest=False)
        self.sel.close()
        self.sock.close()
        self._guest_sock.close()
        for e in self.irqfds:
            e.close()
        self._stop_device()
        self.memory.close()

    def __enter__(self) -> DemoHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- run
    def run(self, on_tick: Callable[[Snapshot], None] | None = None,
            tick: float = 0.25) -> DemoResult:
        start = time.monotonic()
        hard_deadline = start + self.config.seconds + GRACE_SECONDS
        next_tick = start
        while self._connected:
            now = time.monotonic()
            if now > hard_deadline:
                self.errors.append("the guest did not finish in time; stopped it")
                break
            for key, _ in self.sel.select(timeout=tick):
                if key.data is None:
                    self._on_socket()
                    if not self._connected:
                        break
                else:
                    efd: EventFd = key.fileobj  # type: ignore[assignment]
                    self.kicks[key.data] += efd.drain()
                    self._service(key.data)
            if on_tick is not None and now >= next_tick:
                next_tick = now + tick
                on_tick(self.snapshot(now - start))
        elapsed = time.monotonic() - start
        exit_code = None
        if self.proc is not None:
            try:
                exit_code = self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.errors.append("the guest did not exit; killed it")
                self.proc.kill()
                self.proc.wait()
        if not self.guest_stats and not self.errors:
            self.errors.append(f"the guest exited (status {exit_code}) without a report")
        self._update_buffers()
        return DemoResult(self.config, list(self.buffers), list(self.kicks),
                          list(self.interrupts), elapsed, self.guest_stats,
                          list(self.errors), exit_code)

    def snapshot(self, elapsed: float) -> Snapshot:
        self._update_buffers()
        return Snapshot(elapsed, self.config.seconds, list(self.buffers), list(self.kicks),
                        list(self.interrupts))

    def _update_buffers(self) -> None:
        net = self.net
        if net is not None:
            self.buffers = [self._base_buffers[0] + net.stats.rx_buffers,
                            self._base_buffers[1] + net.stats.tx_buffers]

    # ----------------------------------------------------------- VM exits
    def _disconnect(self, reason: str) -> None:
        if self._connected:
            self._connected = False
            self.sel.unregister(self.sock)
            if reason:
                log.warning("dropping the guest: %s", reason)
                self.errors.append(reason)

    def _on_socket(self) -> None:
        try:
            msg = self.sock.recv(wire.MAX_MESSAGE)
        except OSError as exc:
            self._disconnect(f"socket error: {exc}")
            return
        if not msg:
            self._disconnect("")
            return
        try:
            req = wire.decode_guest(msg)
            if isinstance(req, wire.Stats):
                self.guest_stats = req.data
                return
            if req.write:
                for effect in self.regs.write(req.offset, req.width, req.value):
                    self._apply(effect)
                value = 0
            else:
                value = self.regs.read(req.offset, req.width)
            self.sock.send(wire.encode_value(value))
        except PeerError as exc:
            self._disconnect(f"malformed guest access: {exc}")
        except OSError as exc:
            self._disconnect(f"socket error: {exc}")

    def _apply(self, effect: pci.Effect) -> None:
        if isinstance(effect, pci.Kick):
            self.kicks[effect.queue] += 1
            self._service(effect.queue)
        elif isinstance(effect, pci.Reset):
            self._update_buffers()
            self._base_buffers = list(self.buffers)
            self._stop_device()
            self._drop_ioeventfds(tell_guest=True)
        elif (isinstance(effect, pci.StatusChanged) and effect.new & Status.DRIVER_OK
              and not effect.old & Status.DRIVER_OK):
            self._driver_ok()

    def _driver_ok(self) -> None:
        rxq = self.regs.queues[RX_QUEUE].device
        txq = self.regs.queues[TX_QUEUE].device
        if rxq is None or txq is None:
            self._signal_vector(self.regs.needs_reset("DRIVER_OK before both queues were set up"))
            return
        # The same device model pyvirtio-net serves over vhost-user, with its
        # loopback port: transmitted frames come back on receive.
        net = self.net = NetDevice(DEMO_MAC, queue_size=self.config.queue_size,
                                   tx_burst=self.config.queue_size, name="demo")
        net.suppress = self.config.suppression != "none"
        net.uplink = net.loopback
        net.set_features(self.regs.guest_features)
        for q, ring in ((RX_QUEUE, rxq), (TX_QUEUE, txq)):
            vq = VirtQueue(q, ring, net, functools.partial(self._interrupt, q),
                           on_broken=self._broken, schedule=self._soon.append)
            self.vqs[q] = vq
            net.queue_ready(vq)
        for q in (RX_QUEUE, TX_QUEUE):
            efd = EventFd(nonblocking=True)
            self.ioeventfds[q] = efd
            self.sel.register(efd, selectors.EVENT_READ, q)
            socket.send_fds(self.sock, [wire.encode_ioeventfd(pci.QUEUE_NOTIFY, 2, q, True)],
                            [efd.fd])

    def _drop_ioeventfds(self, tell_guest: bool) -> None:
        for q, efd in self.ioeventfds.items():
            # Kicks still pending in the counter belong to the old device instance.
            self.kicks[q] += efd.drain()
            if tell_guest and self._connected:
                self.sock.send(wire.encode_ioeventfd(pci.QUEUE_NOTIFY, 2, q, False))
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(efd)
            efd.close()
        self.ioeventfds.clear()

    # -------------------------------------------------------------- device
    def _service(self, queue: int) -> None:
        vq = self.vqs.get(queue)
        if vq is None:
            return
        vq.run()
        soon = self._soon
        while soon:
            soon.pop(0)()

    def _stop_device(self) -> None:
        net = self.net
        if net is not None:
            for vq in self.vqs.values():
                vq.close()
                net.queue_stopped(vq)
        self.vqs.clear()
        self._soon.clear()
        self.net = None

    def _interrupt(self, queue: int) -> None:
        self.interrupts[queue] += 1
        self._signal_vector(self.regs.interrupt(queue))

    def _broken(self, vq: VirtQueue, reason: str) -> None:
        log.warning("virtio-net: queue %d broken, device needs reset: %s", vq.index, reason)
        if not self.regs.status & Status.NEEDS_RESET:
            self._signal_vector(self.regs.needs_reset(reason))

    def _signal_vector(self, vector: int) -> None:
        if 0 <= vector < len(self.irqfds):
            self.irqfds[vector].signal()
        else:
            # The demo guest always assigns MSI-X vectors; INTx is not wired to it.
            log.debug("interrupt without an MSI-X vector (ISR=%#x)", self.regs.isr)


def run_demo(config: DemoConfig, on_tick: Callable[[Snapshot], None] | None = None) -> DemoResult:
    """Run the guest and the host for ``config.seconds``; always reaps the guest."""
    with DemoHost(config) as host:
        return host.run(on_tick)

