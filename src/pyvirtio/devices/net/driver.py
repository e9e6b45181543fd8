"""The driver side of virtio-net (VIRTIO 1.2 §5.1.6), shaped like Linux's virtio_net.

* Receive (§5.1.6.3): :meth:`NetDriver.try_fill_recv` adds empty buffers
  until receiveq1 is full and kicks once; :meth:`NetDriver.napi_poll` takes
  used buffers (joining ``num_buffers`` buffers under
  ``VIRTIO_NET_F_MRG_RXBUF``, §5.1.6.4) and refills only when more than
  ``min(budget, size) / 2`` descriptors are free, as Linux's ``virtnet_poll``
  does; the interrupt handler disables callbacks and the poll re-enables
  them when it runs out of work (NAPI), re-checking for work that slipped in.
* Transmit (§5.1.6.2): :meth:`NetDriver.xmit` first reclaims finished
  buffers (``free_old_xmit``), then adds the header and the frame as two
  readable descriptors (the legacy layout without ``VIRTIO_F_ANY_LAYOUT``).
  Transmit interrupts are off; when the ring fills the queue stops and asks
  for one interrupt after about 3/4 of the buffers are used
  (``enable_cb_delayed``), so transmit buffers are reclaimed late.

With ``suppress=False`` the driver never writes the suppression fields
(``VRING_AVAIL_F_NO_INTERRUPT`` / ``used_event`` moves): every used buffer may
interrupt and nothing is batched but what the device batches itself.

The device is a peer: a used length larger than the buffer, a missing
header, or a ``num_buffers`` that does not match the used ring raise
:class:`PeerError`.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.split_driver import SplitDriverQueue
from pyvirtio.devices.net.spec import (
    ETH_FRAME_MAX,
    F_MRG_RXBUF,
    RX_QUEUE,
    TX_QUEUE,
    NetHdr,
    hdr_size,
)

FrameHandler = Callable[[bytes | memoryview], None]
Kick = Callable[[int], None]


class NetDriver:
    """One receive/transmit queue pair driven the way Linux drives it."""

    def __init__(self, rx: SplitDriverQueue, tx: SplitDriverQueue, memory: GuestMemory,
                 allocator: BumpAllocator, features: int, kick: Kick,
                 on_frame: FrameHandler, suppress: bool = True,
                 rx_buf_size: int = 2048) -> None:
        self.rx = rx
        self.tx = tx
        self.memory = memory
        self.kick_device = kick
        self.on_frame = on_frame
        self.suppress = suppress
        self.hdr_len = hdr_size(features)
        self.mergeable = bool(features >> F_MRG_RXBUF & 1)
        # Mergeable buffers are single descriptors; otherwise header + full frame.
        self.rx_descs = 1 if self.mergeable else 2
        self.rx_slot = rx_buf_size if self.mergeable else self.hdr_len + ETH_FRAME_MAX
        if self.rx_slot <= self.hdr_len:
            raise CallerError("receive buffers must be larger than the header")
        n_rx = rx.num // self.rx_descs
        self.rx_base = allocator.alloc(self.rx_slot * n_rx, 64)
        self.rx_view = memory.translate(self.rx_base, self.rx_slot * n_rx)
        self._rx_free = list(range(n_rx - 1, -1, -1))
        self.tx_slot = self.hdr_len + ETH_FRAME_MAX
        n_tx = tx.num // 2
        self.tx_base = allocator.alloc(self.tx_slot * n_tx, 64)
        self.tx_view = memory.translate(self.tx_base, self.tx_slot * n_tx)
        self.tx_view[:] = bytes(len(self.tx_view))  # headers stay all zero: no offloads
        self._tx_free = list(range(n_tx - 1, -1, -1))
        self.tx_stopped = False
        self.napi_scheduled = False
        self.kicks = [0, 0]
        self.frames_sent = 0
        self.frames_received = 0
        self.rx_buffers = 0
        self.tx_reclaimed = 0
        if suppress:
            # Transmit completions are collected late, not per interrupt.
            tx.disable_cb()

    def _kick(self, queue: int) -> None:
        self.kicks[queue] += 1
        self.kick_device(queue)

    # ---------------------------------------------------------------- receive
    def try_fill_recv(self) -> int:
        """Add empty receive buffers until the ring is full; kick if the device wants it."""
        rx = self.rx
        free = self._rx_free
        slot_size = self.rx_slot
        base = self.rx_base
        hdr_len = self.hdr_len
        added = 0
        while free and rx.num_free >= self.rx_descs:
            slot = free.pop()
            addr = base + slot * slot_size
            if self.mergeable:
                rx.add((), ((addr, slot_size),), slot)
            else:
                rx.add((), ((addr, hdr_len), (addr + hdr_len, slot_size - hdr_len)), slot)
            added += 1
        if added and rx.kick_prepare():
            self._kick(RX_QUEUE)
        return added

    def _take_rx(self) -> tuple[int, int] | None:
        got = self.rx.get_buf()
        if got is None:
            return None
        token, length = got
        assert isinstance(token, int)
        if length > self.rx_slot:
            raise PeerError(f"device used {length} bytes of a {self.rx_slot}-byte receive buffer")
        self.rx_buffers += 1
        return token, length

    def receive(self, budget: int) -> int:
        """Hand up to ``budget`` received frames to ``on_frame``; returns how many."""
        hdr_len = self.hdr_len
        view = self.rx_view
        size = self.rx_slot
        free = self._rx_free
        done = 0
        while done < budget:
            got = self._take_rx()
            if got is None:
                break
            slot, length = got
            off = slot * size
            if length < hdr_len:
                free.append(slot)
                raise PeerError(f"receive buffer of {length} bytes has no virtio_net_hdr")
            if not self.mergeable:
                self.on_frame(view[off + hdr_len:off + length])
                free.append(slot)
            else:
                count = NetHdr.unpack(view[off:off + hdr_len], hdr_len).num_buffers
                parts = [bytes(view[off + hdr_len:off + length])]
                free.append(slot)
                if count < 1:
                    raise PeerError("num_buffers is 0")
                for _ in range(count - 1):
                    more = self._take_rx()
                    if more is None:
                        raise PeerError(f"num_buffers {count} but fewer buffers were used")
                    s2, l2 = more
                    parts.append(bytes(view[s2 * size:s2 * size + l2]))
                    free.append(s2)
                self.on_frame(b"".join(parts))
            done += 1
            self.frames_received += 1
        return done

    def rx_interrupt(self) -> None:
        """The receive interrupt: schedule the poll with callbacks off (NAPI)."""
        if self.suppress:
            self.rx.disable_cb()
        self.napi_scheduled = True

    def napi_poll(self, budget: int = 64) -> int:
        """Receive up to ``budget`` frames, refill below the threshold, re-arm when idle."""
        done = self.receive(budget)
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

    # --------------------------------------------------------------- transmit
    def free_old_xmit(self) -> int:
        """Reclaim every transmit buffer the device has used."""
        n = 0
        tx = self.tx
        free = self._tx_free
        while (got := tx.get_buf()) is not None:
            token = got[0]
            assert isinstance(token, int)
            free.append(token)
            n += 1
        self.tx_reclaimed += n
        return n

    def _has_room(self) -> bool:
        return bool(self._tx_free) and self.tx.num_free >= 2

    def xmit(self, frame: bytes | memoryview) -> bool:
        """Send one frame; False if the queue is stopped (try again after an interrupt)."""
        if len(frame) > ETH_FRAME_MAX:
            raise CallerError(f"frame of {len(frame)} bytes is larger than {ETH_FRAME_MAX}")
        self.free_old_xmit()
        if not self._has_room():
            self._stop_queue()
            return False
        slot = self._tx_free.pop()
        off = slot * self.tx_slot
        hdr_len = self.hdr_len
        self.tx_view[off + hdr_len:off + hdr_len + len(frame)] = frame
        addr = self.tx_base + off
        tx = self.tx
        tx.add(((addr, hdr_len), (addr + hdr_len, len(frame))), (), slot)
        self.frames_sent += 1
        if tx.kick_prepare():
            self._kick(TX_QUEUE)
        if not self._has_room():
            self._stop_queue()
        return True

    def _stop_queue(self) -> None:
        self.tx_stopped = True
        if self.suppress and self.tx.enable_cb_delayed():
            # Most buffers came back already: reclaim them instead of waiting.
            self.free_old_xmit()
            if self._has_room():
                self.tx_stopped = False
                self.tx.disable_cb()

    def tx_interrupt(self) -> None:
        """The transmit interrupt: callbacks off again, reclaim, wake the queue."""
        if self.suppress:
            self.tx.disable_cb()
        self.free_old_xmit()
        if self.tx_stopped and self._has_room():
            self.tx_stopped = False
