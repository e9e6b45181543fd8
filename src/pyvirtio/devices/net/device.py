"""The virtio-net device model, VIRTIO 1.2 §5.1, on the device kit.

One model serves every transport: ``pyvirtio-net`` (vhost-user) and the
demo's legacy virtio-pci device both run :class:`NetDevice`; only where the
frames go differs (a *port*: loopback, a switch port, a TAP).

* Queues (§5.1.2): receiveq N is queue 2N, transmitq N is 2N+1, for
  ``pairs`` queue pairs; with more than one pair ``VIRTIO_NET_F_MQ`` and
  ``max_virtqueue_pairs`` in the configuration (§5.1.4).  The control queue
  is not offered (``VIRTIO_NET_F_CTRL_VQ``): QEMU and DPDK's ``virtio_user``
  emulate it in front of a vhost-user back end.
* Configuration: ``mac`` and ``status`` (link up) — ``VIRTIO_NET_F_MAC``,
  ``VIRTIO_NET_F_STATUS``.
* The header (§5.1.6): 12 bytes with ``VERSION_1`` or ``MRG_RXBUF``, else 10.
  No checksum or segmentation offload is offered (the ports pass plain
  Ethernet frames), so a transmitted header carries nothing to act on and a
  received one is all zero but ``num_buffers``.
* Transmit (§5.1.6.2): every chain is header + frame, device-readable only;
  the frame goes to the port, the chain comes back with used length 0.
  While the device drains transmitq, kicks are off (the kit); a port that
  cannot take a frame now (loopback with a full receive side) leaves it in
  the ring until the receive side has room again.
* Receive (§5.1.6.3, §5.1.6.4): a frame fills one buffer, or with
  ``VIRTIO_NET_F_MRG_RXBUF`` as many as it needs (``num_buffers`` says how
  many; they are published together).  Buffers are taken only when a frame
  arrives (deferred completion).  Kicks on receiveq are wanted only while it
  has no buffers (QEMU ``virtio_net_has_buffers``); meanwhile frames wait in
  a bounded backlog, beyond which they are dropped and counted.

Bad input (a peer error breaks that queue only, with one log line): a
device-writable buffer in a transmit chain, a device-readable buffer in a
receive chain, a receive buffer shorter than the header.  Dropped and
counted instead: transmit chains shorter than a header plus an Ethernet
header, longer than a 64 KiB packet plus headers, and frames larger than
every receive buffer the driver could post.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.spec import DeviceId
from pyvirtio.core.split_device import Element, SplitDeviceQueue
from pyvirtio.devices.net.spec import (
    ETH_HLEN,
    F_GUEST_CSUM,
    F_MAC,
    F_MQ,
    F_MRG_RXBUF,
    F_STATUS,
    HDR_MRG,
    MAX_TX_PACKET,
    OFFLOAD_FEATURES,
    S_LINK_UP,
    format_mac,
    hdr_size,
    net_config,
)
from pyvirtio.io.loop import EventLoop
from pyvirtio.transports.device import Device, VirtQueue, scatter

if TYPE_CHECKING:
    from types import ModuleType

    from pyvirtio.devices.net.bursts import BatchUplink, FrameBatch, PerFrameUplink, RingBatcher

#: The batched paths (bursts.py) once loaded; None without numpy (``pyvirtio[batch]``):
#: frame by frame then.  Imported when the first device is made, not when this module
#: is (a driver process never needs numpy), and not in the middle of serving either;
#: held here because an import statement on every pass costs as much as a numpy call.
_bursts: ModuleType | None = None


def load_bursts() -> None:
    """Import the batched paths now (numpy: a few hundred ms).  Done when a device is
    made; a program that makes its device later (the demo, at DRIVER_OK) calls it
    before it starts anything that may be interrupted."""
    global _bursts
    try:
        import pyvirtio.devices.net.bursts as bursts
    except ImportError:  # pragma: no cover - the test environment has numpy
        return
    _bursts = bursts

log = logging.getLogger("pyvirtio.net")

#: Below this many waiting transmit chains the per-frame path is cheaper than
#: numpy's fixed cost per array operation (a guest sends a frame or two per kick).
TX_BATCH_MIN = 16

DEFAULT_MAC = bytes.fromhex("525400123456")

#: Where a transmitted frame goes; False: the port cannot take it now (retry later).
Uplink = Callable[[bytes], bool]


@dataclass
class NetStats:
    """Counters of one device (port), cumulative for the life of the process."""

    tx_frames: int = 0
    tx_bytes: int = 0
    #: Transmit chains returned (frames sent plus frames dropped).
    tx_buffers: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_buffers: int = 0
    #: Segmentation offload packets (virtio_net_hdr gso_type set) through a port that
    #: carries the header (a TAP with IFF_VNET_HDR): to it, and from it.
    tx_gso: int = 0
    rx_gso: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {"tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes,
                "tx_buffers": self.tx_buffers,
                "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
                "rx_buffers": self.rx_buffers, "tx_gso": self.tx_gso, "rx_gso": self.rx_gso,
                "drops": dict(self.drops)}


def _no_uplink(frame: bytes) -> bool:
    return True  # not connected to anything: the frame is gone (counted by the caller)


class NetDevice(Device):
    """A virtio-net device whose frames go to and come from a port (see :attr:`uplink`)."""

    device_id = int(DeviceId.NET)

    def __init__(self, mac: bytes = DEFAULT_MAC, *, pairs: int = 1, queue_size: int = 1024,
                 backlog: int = 256, name: str = "net", tx_burst: int = 1024) -> None:
        if len(mac) != 6:
            raise CallerError("a MAC address has 6 bytes")
        if not 1 <= pairs <= 128:
            raise CallerError(f"{pairs} queue pairs: use 1..128")
        if backlog < 0 or tx_burst < 1:
            raise CallerError("backlog must be >= 0 and tx_burst >= 1")
        load_bursts()
        self.mac = bytes(mac)
        self.name = name
        self.pairs = pairs
        self.num_queues = 2 * pairs
        self.queue_size = queue_size
        self.device_features = 1 << F_MAC | 1 << F_STATUS | 1 << F_MRG_RXBUF
        if pairs > 1:
            self.device_features |= 1 << F_MQ
        self.config = net_config(self.mac, S_LINK_UP, pairs if pairs > 1 else None)
        self.backlog_limit = backlog
        #: Chains one transmit pass takes at most (QEMU's virtio-net ``x-txburst``, 256
        #: there): as many as a 1024-entry ring holds, because the batched path's cost is
        #: mostly per pass — a sink at 1,024 a pass spends half the CPU per frame of 256.
        self.tx_burst = tx_burst
        #: The port: where transmitted frames go.  Loopback: :meth:`deliver`.
        self.uplink: Uplink = _no_uplink
        #: The same port for a whole burst (bursts.py), if it has a batched form;
        #: None: the burst goes to :attr:`uplink` frame by frame.
        self.uplink_batch: BatchUplink | None = None
        #: Batched ring state by queue index (bursts.py), for the ring object it was made for.
        self._batchers: dict[int, RingBatcher] = {}
        self.stats = NetStats()
        #: Whether the kit may suppress notifications (False: the demo's baseline).
        self.suppress = True
        self._rx: list[VirtQueue | None] = [None] * pairs
        self._tx: list[VirtQueue | None] = [None] * pairs
        #: Frames waiting for receive buffers, each with its offload header (None: none).
        self._backlog: deque[tuple[bytes, bytes | None]] = deque()
        self._tx_blocked: set[VirtQueue] = set()
        self.hdr_len = HDR_MRG.size
        self.mergeable = True
        self._header1 = bytes(10) + b"\x01\x00"
        #: Called with the serving loop when the device is attached (a TAP registers its fd).
        self.attach_hooks: list[Callable[[EventLoop], None]] = []
        #: Called with the negotiated features (a TAP sets its header size and offloads).
        self.feature_hooks: list[Callable[[int], None]] = []
        #: The port carries virtio_net_hdr itself (a TAP with IFF_VNET_HDR): transmitted
        #: frames go to :attr:`uplink` with their header, received ones may bring one.
        self.port_headers = False
        #: The driver takes partially checksummed packets (GUEST_CSUM): a port's header
        #: flags are passed on; without it they are cleared (§5.1.6.3.1).
        self.guest_csum = False

    def __repr__(self) -> str:
        return f"NetDevice({self.name}, mac={format_mac(self.mac)}, pairs={self.pairs})"

    # ------------------------------------------------------------ the kit
    def attach(self, loop: EventLoop) -> None:
        super().attach(loop)
        for hook in self.attach_hooks:
            hook(loop)

    def offer_offloads(self) -> None:
        """The port carries virtio_net_hdr (a TAP with IFF_VNET_HDR): offer checksum and
        segmentation offload both ways (§5.1.3); never offered where it would be dropped."""
        self.port_headers = True
        self.device_features |= OFFLOAD_FEATURES

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.hdr_len = hdr_size(features)
        self.mergeable = bool(features >> F_MRG_RXBUF & 1)
        self.guest_csum = bool(features >> F_GUEST_CSUM & 1)
        # A header of our own is all zero but num_buffers (1 here).
        self._header1 = bytes(10) + (b"\x01\x00" if self.hdr_len == HDR_MRG.size else b"")
        for hook in self.feature_hooks:
            hook(features)

    @property
    def rx_header(self) -> bytes:
        """The virtio_net_hdr of a frame received in one buffer."""
        return self._header1

    def reset(self) -> None:
        super().reset()
        self._backlog.clear()
        self._tx_blocked.clear()
        self._rx = [None] * self.pairs
        self._tx = [None] * self.pairs
        self._batchers.clear()

    def queue_ready(self, queue: VirtQueue) -> None:
        pair, is_tx = divmod(queue.index, 2)
        queue.notifications = self.suppress
        if is_tx:
            self._tx[pair] = queue
        else:
            self._rx[pair] = queue
            # Kicks only when the ring runs dry (QEMU virtio_net_has_buffers).
            queue.kicks_when_idle = False

    def queue_stopped(self, queue: VirtQueue) -> None:
        # Its numpy views export the guest memory's mapping: let it go with the ring.
        self._batchers.pop(queue.index, None)
        pair, is_tx = divmod(queue.index, 2)
        ring_list = self._tx if is_tx else self._rx
        if ring_list[pair] is queue:
            ring_list[pair] = None
        self._tx_blocked.discard(queue)

    @property
    def link_ready(self) -> bool:
        """A front end has a receive queue running: frames can be delivered."""
        return any(q is not None and q.ready for q in self._rx)

    def process(self, queue: VirtQueue) -> None:
        if queue.index & 1:
            self._drain_tx(queue)
        else:
            self._fill_rx(queue)

    # ------------------------------------------------------------- transmit
    def _drain_tx(self, queue: VirtQueue) -> None:
        """Send up to ``tx_burst`` frames to the port (the kit loops while more wait).

        A burst of at least :data:`TX_BATCH_MIN` chains on a split ring takes
        the numpy path (:mod:`~pyvirtio.devices.net.bursts`): this is the
        path a traffic generator stresses.  Fewer, or a packed ring, take the
        batched core calls (``pop_batch``/``fill``/``flush``) frame by frame.
        """
        ring = queue.ring
        strip = 0 if self.port_headers else self.hdr_len
        tx = self._batcher(queue) if ring.available() >= TX_BATCH_MIN else None
        if tx is not None:
            assert _bursts is not None  # a batcher exists only then
            if self.uplink == self.loopback:
                send: BatchUplink = self._loopback_batch
            else:
                send = self.uplink_batch or _bursts.PerFrameUplink(self.uplink)
            _bursts.drain_tx_batched(self, tx, send, lambda: self._tx_blocked.add(queue))
            if send == self._loopback_batch:
                self._publish_looped(queue)
            return
        batch = ring.pop_batch(self.tx_burst)
        if not batch:
            return
        stats = self.stats
        drops = stats.drops
        hdr_len = self.hdr_len
        min_size = hdr_len + ETH_HLEN
        max_size = hdr_len + MAX_TX_PACKET
        uplink = self.uplink
        fill = ring.fill
        done = 0
        sent = sent_bytes = 0
        try:
            for elem in batch:
                if elem.writable:
                    raise PeerError(f"{self.name}: transmit head {elem.head} has a "
                                    f"device-writable buffer (VIRTIO 1.2 §5.1.6.2)")
                views = elem.readable
                size = len(views[0]) if len(views) == 1 else sum(len(v) for v in views)
                if size < min_size:
                    drops["tx_runt"] += 1
                elif size > max_size:
                    drops["tx_oversize"] += 1
                else:
                    frame = (views[0][strip:].tobytes() if len(views) == 1
                             else b"".join(views)[strip:])
                    if not uplink(frame):
                        # The port is full: the frame stays in the ring for later.
                        self._tx_blocked.add(queue)
                        break
                    sent += 1
                    sent_bytes += size - hdr_len
                fill(elem.head, 0, done)
                done += 1
        finally:
            left = len(batch) - done
            if left:
                ring.unpop(left)
            if done:
                ring.flush(done)
            stats.tx_frames += sent
            stats.tx_bytes += sent_bytes
            stats.tx_buffers += done
        if uplink == self.loopback:
            self._publish_looped(queue)

    def _publish_looped(self, txq: VirtQueue) -> None:
        """Publish the frames a transmit pass looped back now, after that pass's transmit
        entries, rather than when the kit's transmit run ends.

        A loop's driver (DPDK testpmd forwarding io) sends on what it receives, so it
        stalls while the looped frames wait; and the run ends only when the transmit
        ring is empty, several passes later when the driver keeps up.  Transmit first:
        the driver then has room to send the frames on when it sees them.
        """
        waiting = [q for q in self._rx if q is not None and q.ready and q.filled]
        if not waiting:
            return
        txq.publish()
        for rxq in waiting:
            try:
                rxq.publish()
            except PeerError as exc:
                rxq.fail(str(exc))  # the receive ring broke, not the transmit ring

    def _batcher(self, queue: VirtQueue) -> RingBatcher | None:
        """The batched state of ``queue``'s ring (None: not a plain split ring)."""
        ring = queue.ring
        if _bursts is None or type(ring) is not SplitDeviceQueue:
            return None
        b = self._batchers.get(queue.index)
        if b is None or b.ring is not ring:  # a remapped ring is a new object
            b = self._batchers[queue.index] = _bursts.RingBatcher(ring)
        return b

    def _resume_tx(self) -> None:
        blocked = list(self._tx_blocked)
        self._tx_blocked.clear()
        for q in blocked:
            q.kick()

    # -------------------------------------------------------------- receive
    def _fill_rx(self, queue: VirtQueue) -> None:
        """The driver added receive buffers: move waiting frames into them."""
        backlog = self._backlog
        while backlog:
            if not self._put(queue, *backlog[0]):
                return
            backlog.popleft()
        if self._tx_blocked:
            self._resume_tx()

    def _rx_queue(self, frame: bytes) -> VirtQueue | None:
        ready = [q for q in self._rx if q is not None and q.ready]
        if not ready:
            return None
        if len(ready) == 1:
            return ready[0]
        # One flow (source and destination MAC) stays on one queue: in order.
        return ready[zlib.crc32(frame[:12]) % len(ready)]

    def deliver(self, frame: bytes, offload: bytes | None = None) -> bool:
        """A frame for the driver; True when it was taken (delivered or waiting).

        Frames wait in order while the receive queue has no buffers, up to
        ``backlog`` of them; beyond that, or without a front end, they are
        dropped and counted.  ``offload``: the first 10 bytes of a
        virtio_net_hdr the port supplied (flags, GSO type and sizes, checksum
        start and offset: a TAP's), passed on to the driver.
        """
        queue = self._rx_queue(frame)
        drops = self.stats.drops
        if queue is None:
            drops["rx_no_frontend"] += 1
            return False
        if not self._backlog:
            try:
                if self._put(queue, frame, offload):
                    return True
            except PeerError as exc:
                # This port's driver broke its receive ring: that ring breaks
                # (NEEDS_RESET, one log line), not the sender's transmit ring.
                queue.fail(str(exc))
                drops["rx_queue_broken"] += 1
                return False
        if len(self._backlog) >= self.backlog_limit:
            drops["rx_no_buffer"] += 1
            return False
        self._backlog.append((frame, offload))
        return True

    def loopback(self, frame: bytes) -> bool:
        """The loopback port: a transmitted frame comes back on receive.

        While the receive queue has no buffer for it, the frame waits in the
        transmit ring (False: the device retries when buffers come): the ring
        is the loopback's queue, no backlog copy is needed.
        """
        queue = self._rx_queue(frame)
        if queue is None:
            return False
        if self._backlog:
            return self.deliver(frame)  # loopback frames bring no offload header
        try:
            return self._put(queue, frame)
        except PeerError as exc:
            queue.fail(str(exc))  # the receive ring broke, not the sender's transmit ring
            self.stats.drops["rx_queue_broken"] += 1
            return True

    def _loopback_batch(self, frames: FrameBatch) -> int:
        """:meth:`loopback` for a transmit burst: as many frames as receive buffers
        take go back in one receive burst; the rest wait in the transmit ring
        (it is the loopback's queue) until the driver posts buffers."""
        assert _bursts is not None  # a burst was made there
        per_frame: PerFrameUplink = _bursts.PerFrameUplink(self.loopback)
        receive_batched = _bursts.receive_batched
        rxq = self._rx[0] if self.pairs == 1 else None
        rx = None if rxq is None or not rxq.ready or self._backlog else self._batcher(rxq)
        if rx is None or rxq is None:
            return per_frame(frames)
        done = 0
        total = len(frames)
        while done < total:
            try:
                n = receive_batched(self, rxq, rx, frames, done)
            except PeerError as exc:
                rxq.fail(str(exc))  # the receive ring broke, not the sender's transmit ring
                return done
            if n:
                done += n
            elif rxq.ring.available():
                # A buffer that cannot hold the next frame alone: that frame per frame.
                if not self.loopback(frames.frame(done)):
                    return done
                done += 1
                if self._backlog:
                    return done + per_frame(frames, done)
            elif not rxq.need_buffers():
                return done  # kicks on for receive buffers; the rest stays in the ring
        return done

    def _put(self, queue: VirtQueue, frame: bytes, offload: bytes | None = None) -> bool:
        """Write one frame into receive buffers; False (nothing taken) if there are too few."""
        hdr_len = self.hdr_len
        need = hdr_len + len(frame)
        if offload is not None and not self.guest_csum:
            offload = None  # the driver takes only fully checksummed packets: flags 0
        elem = queue.pop_element()
        if elem is not None and not elem.readable:
            views = elem.writable
            if len(views) == 1 and len(views[0]) >= need:
                # The common case: one buffer holds header and frame.
                view = views[0]
                view[:hdr_len] = self._header1
                if offload is not None:
                    view[:10] = offload
                view[hdr_len:need] = frame
                queue.complete(elem, need)
                stats = self.stats
                stats.rx_frames += 1
                stats.rx_bytes += len(frame)
                stats.rx_buffers += 1
                return True
        elems: list[Element] = []
        room = 0
        try:
            while True:
                if elem is None:
                    if len(elems) >= queue.size:
                        break  # more than the whole ring could hold: never deliverable
                    queue.ring.unpop(len(elems))
                    if queue.need_buffers():
                        return self._put(queue, frame, offload)
                    return False
                elems.append(elem)
                if elem.readable:
                    raise PeerError(f"{self.name}: receive head {elem.head} has a "
                                    f"device-readable buffer (VIRTIO 1.2 §5.1.6.3)")
                length = elem.writable_len
                if length < hdr_len:
                    raise PeerError(f"{self.name}: receive buffer of {length} bytes is shorter "
                                    f"than the {hdr_len}-byte virtio_net_hdr")
                room += length
                if room >= need or not self.mergeable:
                    break
                elem = queue.pop_element()
        except PeerError:
            queue.ring.unpop(len(elems))
            raise
        stats = self.stats
        if room < need:
            # Without mergeable buffers one buffer must hold it all (§5.1.6.3.1);
            # with them, the whole ring could not.  The buffers stay posted.
            stats.drops["rx_too_big"] += 1
            queue.ring.unpop(len(elems))
            return True
        header = bytearray(hdr_len)
        if offload is not None:
            header[:10] = offload
        if hdr_len == HDR_MRG.size:
            header[10:12] = len(elems).to_bytes(2, "little")
        data = memoryview(bytes(header) + frame)
        pos = 0
        for elem in elems:
            n = scatter(elem.writable, data[pos:])
            pos += n
            queue.complete(elem, n)
        stats.rx_frames += 1
        stats.rx_bytes += len(frame)
        stats.rx_buffers += len(elems)
        return True
