"""The driver side of virtio-net (VIRTIO 1.2 §5.1.6), shaped like Linux's virtio_net.

* Receive (§5.1.6.3): :meth:`NetDriver.try_fill_recv` adds empty buffers
  until receiveq1 is full and kicks once; :meth:`NetDriver.napi_poll` takes
  used buffers (joining ``num_buffers`` buffers under
  ``VIRTIO_NET_F_MRG_RXBUF``, §5.1.6.4) and refills only when more than
  ``min(budget, size) / 2`` descriptors are free, as Linux's ``virtnet_poll``
  does; the interrupt handler disables callbacks and the poll re-enables
  them when it runs out of work (NAPI), re-checking for work that slipped in.
  Frames shorter than an Ethernet header are dropped and counted
  (``rx_dropped``), as Linux's ``receive_buf`` does.
* Transmit (§5.1.6.2): :meth:`NetDriver.xmit` first reclaims finished
  buffers (``free_old_xmit``), then adds the header and the frame: one
  descriptor when ``VIRTIO_F_VERSION_1`` or ``VIRTIO_F_ANY_LAYOUT`` lets the
  header share the frame's buffer (§2.6.4, Linux ``xmit_skb`` "can_push"),
  else two.  ``more=True`` defers the kick to the last frame of a batch
  (Linux ``netdev_xmit_more``).  Transmit interrupts are off; when the ring
  fills the queue stops and asks for one interrupt after about 3/4 of the
  buffers are used (``enable_cb_delayed``), so transmit buffers are
  reclaimed late.

With ``suppress=False`` the driver never writes the suppression fields
(``VRING_AVAIL_F_NO_INTERRUPT`` / ``used_event`` moves): every used buffer may
interrupt and nothing is batched but what the device batches itself.

:meth:`NetDriver.connect` runs the same driver over vhost-user
(:class:`~pyvirtio.transports.vhost_user.frontend.VhostUserFrontend`) with a
blocking API on top: :meth:`~NetDriver.send`, :meth:`~NetDriver.send_many`,
:meth:`~NetDriver.receive`, :meth:`~NetDriver.receive_many`.  They sleep on
the call eventfds only after re-arming interrupts, so no wake-up is lost.

Both ring kinds: over a split ring (§2.7) the one-descriptor buffers go
through its batch interface with descriptors written once, as DPDK's
virtio PMD does; over a packed ring (§2.8, ``packed=True``) every buffer is
made available with ``add`` (a packed descriptor is rewritten on each lap).

The device is a peer: a used length larger than the buffer, a missing
header, or a ``num_buffers`` that does not match the used ring raise
:class:`PeerError`.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from pyvirtio.core.errors import CallerError, PeerError, VirtioError
from pyvirtio.core.layout import DESC_SIZE, is_valid_queue_size, pack_desc
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.queue import DriverQueue
from pyvirtio.core.spec import (
    F_ANY_LAYOUT,
    F_RING_EVENT_IDX,
    F_RING_PACKED,
    F_VERSION_1,
    VRING_DESC_F_WRITE,
    Status,
    bit,
)
from pyvirtio.core.split_driver import SplitDriverQueue
from pyvirtio.devices.net.spec import (
    ETH_FRAME_MAX,
    F_MAC,
    F_MRG_RXBUF,
    F_STATUS,
    RX_QUEUE,
    S_LINK_UP,
    TX_QUEUE,
    hdr_size,
)

if TYPE_CHECKING:
    from pyvirtio.transports.vhost_user.frontend import FrontendQueue, VhostUserFrontend

FrameHandler = Callable[[bytes | memoryview], None]
Kick = Callable[[int], None]
Frame = bytes | bytearray | memoryview

#: Linux's NAPI_POLL_WEIGHT: frames one poll takes before it yields.
NAPI_WEIGHT = 64
ETH_HLEN = 14
DEFAULT_TIMEOUT = 30.0
# num_buffers is the last field of the 12-byte header (§5.1.6).
_NUM_BUFFERS = struct.Struct("<H")
_NUM_BUFFERS_OFF = 10


class Allocator(Protocol):
    """Hands out guest memory: a ``BumpAllocator``, or ``VhostUserFrontend.alloc``'s owner."""

    def alloc(self, size: int, align: int = 16) -> int: ...


def driver_features(mergeable: bool = True, event_idx: bool = True) -> int:
    """The feature bits :meth:`NetDriver.connect` asks for (§5.1.3, §6).

    ``VIRTIO_F_NOTIFY_ON_EMPTY`` is left out on purpose: with it the device
    would interrupt whenever transmitq1 runs empty, which late reclaim makes
    pointless (Linux does not negotiate it for virtio-net either).
    """
    features = bit(F_VERSION_1) | bit(F_MAC) | bit(F_STATUS)
    if mergeable:
        features |= bit(F_MRG_RXBUF)
    if event_idx:
        features |= bit(F_RING_EVENT_IDX)
    return features


def random_mac() -> bytes:
    """A random locally administered unicast MAC (§5.1.5 without VIRTIO_NET_F_MAC)."""
    mac = bytearray(os.urandom(6))
    mac[0] = (mac[0] & 0xFE) | 0x02  # unicast, locally administered (Linux eth_random_addr)
    return bytes(mac)


class NetDriver:
    """One receive/transmit queue pair driven the way Linux drives it.

    Counters, all cumulative: ``frames_sent`` / ``bytes_sent`` (frames
    handed to the device), ``frames_received`` / ``bytes_received`` (frames
    handed up, Ethernet bytes without the virtio header), ``rx_dropped``
    (runt frames dropped), ``kicks`` and ``interrupts`` (``[rx, tx]``;
    interrupts count the device's signals, coalesced ones included),
    ``rx_buffers`` and ``tx_reclaimed`` (buffers the device returned).
    """

    def __init__(self, rx: DriverQueue, tx: DriverQueue, memory: GuestMemory,
                 allocator: Allocator, features: int, kick: Kick,
                 on_frame: FrameHandler | None = None, suppress: bool = True,
                 rx_buf_size: int = 2048) -> None:
        self.rx = rx
        self.tx = tx
        self.memory = memory
        self.features = features
        self.kick_device = kick
        #: Received frames collect here for :meth:`receive_many` when no handler is given.
        self._pending: list[bytes] = []
        self.on_frame: FrameHandler = on_frame if on_frame is not None else self._collect
        self.suppress = suppress
        self.hdr_len = hdr_size(features)
        self.mergeable = bool(features >> F_MRG_RXBUF & 1)
        # Without ANY_LAYOUT a legacy device expects the header in a descriptor of its own.
        self.any_layout = bool(features >> F_VERSION_1 & 1 or features >> F_ANY_LAYOUT & 1)
        self.rx_descs = 1 if self.mergeable or self.any_layout else 2
        # Mergeable buffers are what the caller chose; otherwise header + full frame.
        self.rx_slot = rx_buf_size if self.mergeable else self.hdr_len + ETH_FRAME_MAX
        if self.rx_slot < self.hdr_len:
            raise CallerError("receive buffers must hold at least the header (§5.1.6.3.1)")
        n_rx = rx.num // self.rx_descs
        self.rx_base = allocator.alloc(self.rx_slot * n_rx, 64)
        self.rx_view = memory.translate(self.rx_base, self.rx_slot * n_rx)
        # As on transmit (below): one descriptor per buffer, written once, so a
        # refill only makes heads available again (DPDK's virtio PMD does so too).
        # Split rings only: a packed ring has no descriptor table to keep.
        self._rx_split = rx if isinstance(rx, SplitDriverQueue) else None
        self._tx_split = tx if isinstance(tx, SplitDriverQueue) else None
        self._rx_direct = self.rx_descs == 1 and self._rx_split is not None
        self._rx_free = [] if self._rx_direct else list(range(n_rx - 1, -1, -1))
        if self._rx_split is not None and self._rx_direct:
            for i in range(n_rx):
                pack_desc(self._rx_split.rings.desc, i * DESC_SIZE,
                          self.rx_base + i * self.rx_slot, self.rx_slot, VRING_DESC_F_WRITE, 0)
        self.tx_descs = 1 if self.any_layout else 2
        self.tx_slot = self.hdr_len + ETH_FRAME_MAX
        n_tx = tx.num // self.tx_descs
        self.tx_base = allocator.alloc(self.tx_slot * n_tx, 64)
        self.tx_view = memory.translate(self.tx_base, self.tx_slot * n_tx)
        self.tx_view[:] = bytes(len(self.tx_view))  # headers stay all zero: no offloads
        # One descriptor per frame: slot i is descriptor i, whose address never
        # changes, so it is written once here and a transmit stores only the
        # length (DPDK's virtio PMD pre-fills its descriptors the same way).
        # Buffers go through the queue's batch interface (take_free,
        # record_heads, publish_avail), which keeps it as add() would.
        self._direct = self.tx_descs == 1 and self._tx_split is not None
        self._tx_free = [] if self._direct else list(range(n_tx - 1, -1, -1))
        if self._tx_split is not None and self._direct:
            desc = self._tx_split.rings.desc
            for i in range(n_tx):
                pack_desc(desc, i * DESC_SIZE, self.tx_base + i * self.tx_slot, 0, 0, 0)
            self._desc_u32 = desc.cast("I")
        self.tx_stopped = False
        self.napi_scheduled = False
        self.kicks = [0, 0]
        self.interrupts = [0, 0]
        self.frames_sent = 0
        self.bytes_sent = 0
        self.frames_received = 0
        self.bytes_received = 0
        self.rx_dropped = 0
        self.rx_buffers = 0
        self.tx_reclaimed = 0
        # Set by connect(): the vhost-user transport behind the blocking API.
        self.frontend: VhostUserFrontend | None = None
        self._ports: tuple[FrontendQueue, FrontendQueue] | None = None
        #: The device's MAC (config space), or a random one if it has none (§5.1.5).
        self.mac = b""
        self.timeout = DEFAULT_TIMEOUT
        if suppress:
            # Transmit completions are collected late, not per interrupt.
            tx.disable_cb()

    # ------------------------------------------------------------ connecting
    @classmethod
    def connect(cls, path: str, *, queue_size: int = 256, mergeable: bool = True,
                rx_buf_size: int = 2048, event_idx: bool = True,
                timeout: float = DEFAULT_TIMEOUT, packed: bool = False) -> NetDriver:
        """Connect to a vhost-user-net back end at ``path`` and start one queue pair.

        Negotiates ``VERSION_1``, ``MRG_RXBUF`` (if ``mergeable``),
        ``RING_EVENT_IDX`` (if ``event_idx``), and ``MAC`` / ``STATUS`` when
        the back end can show its configuration space (protocol feature
        CONFIG); checks GET_QUEUE_NUM; sets DRIVER_OK (protocol feature
        STATUS: DPDK's vhost library waits for it) and fills receiveq1.
        ``rx_buf_size`` is the size of each mergeable receive buffer;
        ``timeout`` bounds the vhost-user replies and the blocking calls'
        default waits.  ``packed``: ask for VIRTIO_F_RING_PACKED (§2.8; any
        ``queue_size`` up to 32768); PeerError if the back end does not offer it.
        """
        from pyvirtio.transports.vhost_user.frontend import VhostUserFrontend
        from pyvirtio.transports.vhost_user.messages import ProtocolFeature

        if not (0 < queue_size <= 32768 if packed else is_valid_queue_size(queue_size)):
            raise CallerError(f"queue_size {queue_size} is not a power of two in 1..32768")
        hdr_max = 12
        # Each mergeable buffer holds at least the header (§5.1.6.3.1).
        if mergeable and not hdr_max <= rx_buf_size <= 65536:
            raise CallerError(f"rx_buf_size {rx_buf_size} must be in {hdr_max}..65536")
        buffers = queue_size * (max(rx_buf_size, hdr_max + ETH_FRAME_MAX)
                                + hdr_max + ETH_FRAME_MAX)
        memory_size = (buffers + (4 << 20) + (2 << 20) - 1) & ~((2 << 20) - 1)
        fe = VhostUserFrontend.connect(path, memory_size=memory_size, timeout=timeout)
        try:
            offered = fe.get_features()
            wanted = driver_features(mergeable, event_idx) | int(packed) << F_RING_PACKED
            if packed and not offered >> F_RING_PACKED & 1:
                raise PeerError("the back end does not offer VIRTIO_F_RING_PACKED")
            has_config = fe.has_protocol(ProtocolFeature.CONFIG)
            if not has_config:
                # MAC and link status live in the config space this back end cannot show.
                wanted &= ~(bit(F_MAC) | bit(F_STATUS))
            acked = fe.negotiate(offered & wanted)
            if fe.has_protocol(ProtocolFeature.MQ):
                queues = fe.get_queue_num()
                if queues < 2:
                    raise PeerError(f"the back end has {queues} queue(s): virtio-net needs "
                                    f"receiveq1 and transmitq1")
            mac = fe.get_config(0, 6) if acked >> F_MAC & 1 else random_mac()
            rxq = fe.setup_ring(RX_QUEUE, queue_size)
            txq = fe.setup_ring(TX_QUEUE, queue_size)
            ports = (rxq, txq)

            def kick(queue: int) -> None:
                ports[queue].kick.signal()

            drv = cls(rxq.queue, txq.queue, fe.memory, fe, acked, kick,
                      rx_buf_size=rx_buf_size)
            drv.frontend = fe
            drv._ports = ports
            drv.mac = mac
            drv.timeout = timeout
            if fe.has_protocol(ProtocolFeature.STATUS):
                fe.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
                              | Status.DRIVER_OK)
            # As Linux virtnet_open: receive buffers go in once the device is live.
            drv.try_fill_recv()
        except BaseException:
            fe.close()
            raise
        return drv

    @property
    def link_up(self) -> bool:
        """The link status (§5.1.4); True without VIRTIO_NET_F_STATUS, as §5.1.4.2 says."""
        if self.frontend is None or not self.features >> F_STATUS & 1:
            return True
        status = int.from_bytes(self.frontend.get_config(6, 2), "little")
        return bool(status & S_LINK_UP)

    def close(self) -> None:
        """Stop both rings (GET_VRING_BASE) and disconnect."""
        fe, self.frontend = self.frontend, None
        if fe is None:
            return
        try:
            for q in (RX_QUEUE, TX_QUEUE):
                fe.stop_queue(q)
        except (VirtioError, OSError):
            pass  # the back end is gone or broken: closing is all that is left
        finally:
            self._ports = None
            fe.close()

    def __enter__(self) -> NetDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _port(self, queue: int) -> FrontendQueue:
        if self._ports is None:
            raise CallerError("this NetDriver has no transport (closed, or not made by "
                              "NetDriver.connect)")
        return self._ports[queue]

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def stats(self) -> dict[str, int]:
        """The counters as one dictionary."""
        return {
            "frames_sent": self.frames_sent, "bytes_sent": self.bytes_sent,
            "frames_received": self.frames_received, "bytes_received": self.bytes_received,
            "rx_dropped": self.rx_dropped,
            "kicks_rx": self.kicks[RX_QUEUE], "kicks_tx": self.kicks[TX_QUEUE],
            "interrupts_rx": self.interrupts[RX_QUEUE],
            "interrupts_tx": self.interrupts[TX_QUEUE],
            "rx_buffers": self.rx_buffers, "tx_reclaimed": self.tx_reclaimed,
        }

    def _kick(self, queue: int) -> None:
        self.kicks[queue] += 1
        self.kick_device(queue)

    # ---------------------------------------------------------------- receive
    def _collect(self, frame: bytes | memoryview) -> None:
        self._pending.append(bytes(frame))  # bytes(bytes) is the same object: no copy

    def try_fill_recv(self) -> int:
        """Add empty receive buffers until the ring is full; kick if the device wants it."""
        rx = self.rx
        added = 0
        split = self._rx_split
        if split is not None and self._rx_direct:
            rx = split
            added = rx.num_free
            if added:
                heads = rx.take_free(added)
                avail = rx.rings.avail16
                mask = rx.num - 1
                shadow = rx.avail_idx_shadow
                for k, head in enumerate(heads):
                    avail[2 + ((shadow + k) & mask)] = head
                rx.record_heads(heads, heads)
                rx.publish_avail(added)
        else:
            free = self._rx_free
            slot_size = self.rx_slot
            base = self.rx_base
            hdr_len = self.hdr_len
            descs = self.rx_descs
            while free and rx.num_free >= descs:
                slot = free.pop()
                addr = base + slot * slot_size
                if descs == 1:
                    rx.add((), ((addr, slot_size),), slot)
                else:
                    rx.add((), ((addr, hdr_len), (addr + hdr_len, slot_size - hdr_len)), slot)
                added += 1
        if added and rx.kick_prepare():
            self._kick(RX_QUEUE)
        return added

    def _check_rx(self, slot: int, length: int) -> None:
        if not self._rx_direct:
            self._rx_free.append(slot)  # its bytes are read before the next refill
        if length > self.rx_slot:
            raise self.rx.mark_broken(f"device used {length} bytes of a {self.rx_slot}-byte "
                                      f"receive buffer")

    def poll_receive(self, budget: int) -> int:
        """Hand up to ``budget`` received frames to ``on_frame``; returns how many buffers
        were taken as frames (drops included, as Linux's ``virtnet_receive`` counts).

        A malformed used buffer marks receiveq1 broken (the device broke the
        spec; Linux's ``BAD_RING``) and raises PeerError, here and at every
        later use.
        """
        rx = self.rx
        # One used_event publication for the batch; a merged frame's tail may lie beyond.
        # Every token is a buffer's slot number (an int).
        bufs = cast("list[tuple[int, int]]", rx.get_bufs(budget))
        if not bufs:
            return 0
        self.rx_buffers += len(bufs)
        hdr_len = self.hdr_len
        runt = hdr_len + ETH_HLEN
        view = self.rx_view
        size = self.rx_slot
        on_frame = self.on_frame
        # Frames for receive_many go straight to its list: no call per frame.
        collect = self._pending.append if on_frame == self._collect else None
        mergeable = self.mergeable
        direct = self._rx_direct
        check = self._check_rx
        frames = 0
        nbytes = 0
        done = 0
        i = 0
        try:
            while i < len(bufs):
                slot, length = bufs[i]
                i += 1
                done += 1
                if length > size or length < hdr_len or not direct:
                    check(slot, length)
                    if length < hdr_len:
                        raise rx.mark_broken(f"receive buffer of {length} bytes has no "
                                             f"virtio_net_hdr")
                off = slot * size
                if not mergeable:
                    if length < runt:
                        self.rx_dropped += 1  # shorter than an Ethernet header
                        continue
                    on_frame(view[off + hdr_len:off + length])
                    nbytes += length - hdr_len
                    frames += 1
                    continue
                count = _NUM_BUFFERS.unpack_from(view, off + _NUM_BUFFERS_OFF)[0]
                if count == 1:
                    if length < runt:
                        self.rx_dropped += 1
                        continue
                    frame = bytes(view[off + hdr_len:off + length])
                else:
                    if count < 1:
                        raise rx.mark_broken("num_buffers is 0")
                    parts = [bytes(view[off + hdr_len:off + length])]
                    for _ in range(count - 1):
                        if i < len(bufs):
                            s2, length = bufs[i]
                            i += 1
                        else:
                            got = rx.get_buf()
                            if got is None:
                                raise rx.mark_broken(f"num_buffers {count} but fewer "
                                                     f"buffers were used")
                            s2 = cast(int, got[0])
                            length = got[1]
                            self.rx_buffers += 1
                        check(s2, length)
                        parts.append(bytes(view[s2 * size:s2 * size + length]))
                    frame = b"".join(parts)
                    if len(frame) < ETH_HLEN:
                        self.rx_dropped += 1
                        continue
                if collect is not None:
                    collect(frame)
                else:
                    on_frame(frame)
                nbytes += len(frame)
                frames += 1
        finally:
            self.frames_received += frames
            self.bytes_received += nbytes
        return done

    def rx_interrupt(self, signals: int = 1) -> None:
        """The receive interrupt: schedule the poll with callbacks off (NAPI)."""
        self.interrupts[RX_QUEUE] += signals
        if self.suppress:
            self.rx.disable_cb()
        self.napi_scheduled = True

    def napi_poll(self, budget: int = NAPI_WEIGHT) -> int:
        """Receive up to ``budget`` frames, refill below the threshold, re-arm when idle."""
        done = self.poll_receive(budget)
        if self.rx.num_free > min(budget, self.rx.num) // 2:
            self.try_fill_recv()
        if done < budget:
            self.napi_scheduled = False
            if self.suppress:
                if self.rx.enable_cb():
                    # Work slipped in between the last get_buf and the re-arm.
                    self.rx.disable_cb()
                    self.napi_scheduled = True
            elif self.rx.more_used():
                self.napi_scheduled = True
        return done

    def receive_many(self, max_frames: int = NAPI_WEIGHT,
                     timeout: float | None = None) -> list[bytes]:
        """Up to ``max_frames`` received frames (Ethernet, without the virtio header).

        Polls while frames keep coming (NAPI) and sleeps on the receive
        interrupt only after re-arming it.  Returns ``[]`` after ``timeout``
        seconds without a frame (``None``: wait for one; ``0``: do not wait).
        """
        if max_frames < 1:
            raise CallerError(f"max_frames {max_frames} must be at least 1")
        pending = self._pending
        if not pending:
            port = self._port(RX_QUEUE)
            deadline = None if timeout is None else time.monotonic() + timeout
            while not pending:
                if self.napi_scheduled:
                    self.napi_poll(NAPI_WEIGHT)
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                signals = port.wait(left)
                if signals:
                    self.rx_interrupt(signals)
        if len(pending) <= max_frames:
            self._pending = []
            return pending
        out = pending[:max_frames]
        del pending[:max_frames]
        return out

    def receive(self, timeout: float | None = None) -> bytes | None:
        """One received frame, or None after ``timeout`` seconds (``None``: wait for one)."""
        frames = self.receive_many(1, timeout)
        return frames[0] if frames else None

    # --------------------------------------------------------------- transmit
    def free_old_xmit(self) -> int:
        """Reclaim every transmit buffer the device has used."""
        bufs = self.tx.get_bufs()
        if bufs:
            if not self._direct:
                free = self._tx_free
                for token, _len in bufs:
                    free.append(cast(int, token))
            self.tx_reclaimed += len(bufs)
        return len(bufs)

    def _has_room(self) -> bool:
        if self._direct:
            return self.tx.num_free > 0
        return bool(self._tx_free) and self.tx.num_free >= self.tx_descs

    def xmit(self, frame: Frame, more: bool = False) -> bool:
        """Send one frame; False if the queue is stopped (try again after an interrupt).

        ``more=True``: another frame follows at once, so the kick waits for it
        unless the queue stops (Linux ``netdev_xmit_more``); :meth:`kick_tx`
        kicks for frames left pending.
        """
        return self.xmit_many((frame,), 0, more) == 1

    def xmit_many(self, frames: Sequence[Frame], start: int = 0, more: bool = False) -> int:
        """Send ``frames[start:]`` as far as the ring has room; returns how many went.

        Linux's ``start_xmit`` for each frame, with the reclaim done once
        for the batch: 0 means the queue is stopped (try again after an
        interrupt).  The kick follows the last frame added (or the stop),
        unless ``more``.
        """
        self.free_old_xmit()
        free = self._tx_free
        tx = self.tx
        direct = self._direct
        room = tx.num_free if direct else min(len(free), tx.num_free // self.tx_descs)
        if room == 0:
            self._stop_queue()
            return 0
        if self.tx_stopped:
            self._wake_queue()
        end = min(len(frames), start + room)
        too_big = -1
        for i in range(start, end):
            if len(frames[i]) > ETH_FRAME_MAX:
                too_big = len(frames[i])
                end = i
                break
        view = self.tx_view
        slot_size = self.tx_slot
        hdr_len = self.hdr_len
        nbytes = 0
        sent = end - start
        split = self._tx_split
        if split is not None and direct and sent:
            heads = split.take_free(sent)
            lens = self._desc_u32
            avail = split.rings.avail16
            mask = split.num - 1
            shadow = split.avail_idx_shadow
            for k, head in enumerate(heads):
                frame = frames[start + k]
                n = len(frame)
                off = head * slot_size + hdr_len
                view[off:off + n] = frame
                lens[head * 4 + 2] = hdr_len + n   # le32 len of descriptor ``head``
                avail[2 + ((shadow + k) & mask)] = head
                nbytes += n
            split.record_heads(heads, heads)
            split.publish_avail(sent)   # avail.idx last: the entries above are visible first
        else:
            base = self.tx_base
            add = tx.add
            for i in range(start, end):
                frame = frames[i]
                n = len(frame)
                slot = free.pop()
                off = slot * slot_size
                view[off + hdr_len:off + hdr_len + n] = frame
                addr = base + off
                if self.tx_descs == 1:
                    add(((addr, hdr_len + n),), (), slot)
                else:
                    add(((addr, hdr_len), (addr + hdr_len, n)), (), slot)
                nbytes += n
        self.frames_sent += sent
        self.bytes_sent += nbytes
        if sent == room:
            self._stop_queue()
        if (not more or self.tx_stopped or too_big >= 0) and tx.num_added and tx.kick_prepare():
            self._kick(TX_QUEUE)
        if too_big >= 0:
            raise CallerError(f"frame of {too_big} bytes is larger than {ETH_FRAME_MAX}")
        return sent

    def kick_tx(self) -> bool:
        """Kick for frames added with ``more=True`` if the device wants it; True if kicked."""
        if self.tx.num_added and self.tx.kick_prepare():
            self._kick(TX_QUEUE)
            return True
        return False

    def _stop_queue(self) -> None:
        self.tx_stopped = True
        if self.suppress and self.tx.enable_cb_delayed():
            # Most buffers came back already: reclaim them instead of waiting.
            self.free_old_xmit()
            if self._has_room():
                self._wake_queue()

    def _wake_queue(self) -> None:
        self.tx_stopped = False
        if self.suppress:
            self.tx.disable_cb()

    def tx_interrupt(self, signals: int = 1) -> None:
        """The transmit interrupt: callbacks off again, reclaim, wake the queue."""
        self.interrupts[TX_QUEUE] += signals
        if self.suppress:
            self.tx.disable_cb()
        self.free_old_xmit()
        if self.tx_stopped and self._has_room():
            self.tx_stopped = False

    def send_many(self, frames: Iterable[Frame], timeout: float | None = None) -> int:
        """Transmit every frame of ``frames`` (Ethernet, at most 1514 bytes), in order.

        One kick for the batch (if the device wants kicks at all).  When the
        ring is full, waits for the transmit interrupt that
        ``enable_cb_delayed`` asked for; TimeoutError if no buffer comes back
        within ``timeout`` seconds (default: the driver's).  Returns the
        number of frames sent.
        """
        self._port(TX_QUEUE)
        batch = frames if isinstance(frames, Sequence) else list(frames)
        deadline = self._deadline(timeout)
        xmit_many = self.xmit_many
        total = len(batch)
        sent = 0
        try:
            while sent < total:
                n = xmit_many(batch, sent, True)
                if n:
                    sent += n
                else:
                    self._wait_tx_room(deadline)
        finally:
            self.kick_tx()
        return sent

    def send(self, frame: Frame, timeout: float | None = None) -> None:
        """Transmit one frame (see :meth:`send_many`)."""
        self.send_many((frame,), timeout)

    def _wait_tx_room(self, deadline: float) -> None:
        """Sleep until the transmit interrupt; the caller retries (and re-arms if it was stale)."""
        port = self._port(TX_QUEUE)
        self.kick_tx()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("transmitq1: the device returned no buffer in time")
            signals = port.wait(left)
            if signals:
                self.tx_interrupt(signals)
                return

    def drain_tx(self, timeout: float | None = None) -> bool:
        """Wait until the device has used every transmit buffer; False on timeout."""
        port = self._port(TX_QUEUE)
        deadline = self._deadline(timeout)
        tx = self.tx
        self.kick_tx()
        while True:
            self.free_old_xmit()
            if not tx.outstanding:
                if self.tx_stopped:
                    self._wake_queue()
                return True
            if tx.enable_cb():
                if self.suppress:
                    tx.disable_cb()
                continue
            left = deadline - time.monotonic()
            signals = port.wait(left) if left > 0 else 0
            if signals:
                self.tx_interrupt(signals)
            elif time.monotonic() >= deadline:
                if self.suppress:
                    tx.disable_cb()
                return False
