"""A virtio-net device that loops transmitted frames back to the driver (VIRTIO 1.2 §5.1.6).

§5.1.6.2 (transmit): the device pops a chain from transmitq1 whose readable
part is the ``virtio_net_hdr`` followed by the frame, and returns it with a
used length of 0.  §5.1.6.3/§5.1.6.4 (receive): the device fills buffers
from receiveq1 with a header and the frame; with ``VIRTIO_NET_F_MRG_RXBUF`` a
frame may span several single buffers and ``num_buffers`` says how many.

The loop follows QEMU's ``virtio-net``: transmit notifications are off while
the device drains transmitq1 and turned back on (with the re-check) when it
is empty; receive notifications are wanted only while receiveq1 has no
buffers (``virtio_net_has_buffers``), since only then does the device need to
hear about a refill.  A frame waits in transmitq1 until a receive buffer is
there.  With ``suppress=False`` the device never touches the suppression
fields, which is the baseline the demo compares against.

Notifications are decisions: :meth:`NetLoopbackDevice.poll` returns which
queues need an interrupt; the caller signals them.  A malformed chain marks
the queue broken (:class:`PeerError` from the core), logs one line, and the
device stops moving frames until it is reset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyvirtio.core.errors import PeerError
from pyvirtio.core.split_device import Element, SplitDeviceQueue
from pyvirtio.devices.net.spec import F_MRG_RXBUF, HDR_MRG, NetHdr, hdr_size

log = logging.getLogger(__name__)

#: Largest packet after the virtio_net_hdr the device copies: a 64 KiB GSO
#: packet plus its Ethernet and VLAN headers.  A transmit chain may name far
#: more guest memory than that (the same buffer many times over); such a frame
#: is dropped before anything is copied.
MAX_TX_PACKET = 65536 + 18


@dataclass(slots=True)
class PollResult:
    """What one :meth:`NetLoopbackDevice.poll` did and which interrupts it wants."""

    frames: int = 0
    rx_buffers: int = 0
    interrupt_tx: bool = False
    interrupt_rx: bool = False


class NetLoopbackDevice:
    """Device side of one receive/transmit queue pair that loops tx back to rx."""

    def __init__(self, rx: SplitDeviceQueue, tx: SplitDeviceQueue, features: int,
                 suppress: bool = True, burst: int = 256) -> None:
        self.rx = rx
        self.tx = tx
        self.hdr_len = hdr_size(features)
        self.mergeable = bool(features >> F_MRG_RXBUF & 1)
        self.suppress = suppress
        self.burst = burst
        self.frames = 0
        self.tx_buffers = 0
        self.rx_buffers = 0
        self.dropped = 0
        self.broken: str | None = None
        if suppress:
            # Until receiveq1 runs dry the device does not need refill kicks.
            rx.disable_notification()

    # ------------------------------------------------------------- main loop
    def poll(self) -> PollResult:
        """Move every frame that can move now; returns the interrupts to send."""
        res = PollResult()
        if self.broken is not None:
            return res
        try:
            self._poll(res)
        except PeerError as exc:
            self.broken = str(exc)
            log.warning("virtio-net: queue broken, device stops until reset: %s", exc)
            return res
        if res.frames:
            res.interrupt_tx = self.tx.should_notify()
        if res.rx_buffers:
            res.interrupt_rx = self.rx.should_notify()
        return res

    def _poll(self, res: PollResult) -> None:
        tx = self.tx
        suppress = self.suppress
        if suppress and self.rx.notification:
            # Buffers may be back: refill kicks are not needed until the next shortage.
            self.rx.disable_notification()
        while True:
            if suppress:
                tx.disable_notification()
            blocked = self._flush_tx(res)
            if blocked:
                # Frames wait for receive buffers: ask for the refill kick, then re-check.
                if suppress and self.rx.enable_notification():
                    self.rx.disable_notification()
                    continue
                if not suppress and self.rx.available():
                    continue
                return
            if not suppress or not tx.enable_notification():
                return

    def _flush_tx(self, res: PollResult) -> bool:
        """Loop up to ``burst`` frames; True if a frame waits for a receive buffer."""
        tx = self.tx
        rx = self.rx
        for _ in range(self.burst):
            if tx.available() == 0:
                return False
            if rx.available() == 0:
                return True
            elem = tx.pop()
            if elem is None:
                return False
            size = elem.readable_len
            if size < self.hdr_len:
                raise tx.mark_broken(f"tx head {elem.head}: {size} bytes, shorter "
                                     f"than the {self.hdr_len}-byte virtio_net_hdr")
            if elem.writable:
                raise tx.mark_broken(f"tx head {elem.head}: device-writable buffer in a "
                                     f"transmit chain")
            if size > self.hdr_len + MAX_TX_PACKET:
                tx.push(elem.head, 0)
                self.tx_buffers += 1
                self.dropped += 1
                res.frames += 1  # a transmit buffer came back: the tx interrupt decision
                continue
            packet = b"".join(elem.readable)
            used = self._receive(packet)
            if used < 0:
                tx.unpop(1)
                return True
            tx.push(elem.head, 0)
            self.tx_buffers += 1
            self.frames += 1
            res.frames += 1
            res.rx_buffers += used
        return False

    # --------------------------------------------------------------- receive
    def _receive(self, packet: bytes) -> int:
        """Put one packet (tx header + frame) into receive buffers.

        Returns the number of receive buffers used (a dropped frame uses one,
        with length 0), or -1 if receiveq1 ran out (nothing consumed).
        """
        rx = self.rx
        hdr_len = self.hdr_len
        need = len(packet)
        elems: list[Element] = []
        room = 0
        while room < need:
            elem = rx.pop()
            if elem is None:
                rx.unpop(len(elems))
                return -1
            elems.append(elem)
            room += elem.writable_len
            if elem.readable:
                raise rx.mark_broken(f"rx head {elem.head}: driver-readable buffer in a "
                                     f"receive chain")
            if not self.mergeable:
                break
        if room < need:
            # Without mergeable buffers one buffer must hold it all (§5.1.6.3.1).
            self.dropped += 1
            rx.push(elems[0].head, 0)
            self.rx_buffers += 1
            return 1
        # The receive header: the transmit one, with num_buffers when it exists.
        data = bytearray(packet)
        if hdr_len == HDR_MRG.size:
            hdr = NetHdr.unpack(packet, hdr_len)
            data[:hdr_len] = NetHdr(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size,
                                    hdr.csum_start, hdr.csum_offset, len(elems)).pack(hdr_len)
        src = memoryview(data)
        pos = 0
        for k, elem in enumerate(elems):
            written = 0
            for view in elem.writable:
                n = min(len(view), need - pos)
                if n <= 0:
                    break
                view[:n] = src[pos:pos + n]
                pos += n
                written += n
            rx.fill(elem.head, written, k)
        rx.flush(len(elems))
        self.rx_buffers += len(elems)
        return len(elems)
