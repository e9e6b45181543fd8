"""The queue interfaces both ring kinds implement (VIRTIO 1.2 §2.7, §2.8), device and driver.

:class:`~pyvirtio.core.split_device.SplitDeviceQueue` (what QEMU's
``virtqueue_split_*`` do) and :class:`~pyvirtio.core.packed_device.PackedDeviceQueue`
(``virtqueue_packed_*``) are separate classes with the same public names,
as QEMU's ``virtqueue_pop``/``virtqueue_fill``/``virtqueue_flush``/
``virtio_should_notify`` dispatch on the ring kind behind one API.
:class:`DeviceQueue` is that API as a :class:`typing.Protocol`: the device
kit (``transports/device.py``), the statistics and the devices are typed
against it, so a device works on either ring without a change.

Where the two rings differ the protocol says what a member means:

* ``last_avail_idx`` and ``used_idx`` are free-running 16-bit indices on a
  split ring but ring positions (0..num-1, wrap counters beside them) on a
  packed one: never subtract them.  ``buffers_popped`` and ``buffers_pushed``
  are the free-running counts on both (they only grow);
* ``shadow_avail_idx`` is what the device has seen made available: the
  cached ``avail.idx`` of a split ring; on a packed ring, which has no such
  index, the buffers popped plus those seen waiting, modulo 2^16.  The kit
  only compares it with an earlier value (did the re-check find new work?);
* ``get_state`` / ``set_state`` carry (last_avail_idx, used_idx) for a split
  ring and (position | wrap counter << 15) pairs for a packed one.

:class:`DriverQueue` is the driver side's common part (Linux's
``virtqueue_add``/``virtqueue_kick_prepare``/``virtqueue_get_buf``/
``virtqueue_enable_cb``, which dispatch to ``*_split`` and ``*_packed``):
:class:`~pyvirtio.core.split_driver.SplitDriverQueue` and
:class:`~pyvirtio.core.packed_driver.PackedDriverQueue` satisfy it, and a
driver written against it (pyvirtio's blk driver) runs on either ring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pyvirtio.core.errors import PeerError
from pyvirtio.core.ring_stats import TraceRecord
from pyvirtio.core.split_device import Element
from pyvirtio.core.split_driver import Segment

__all__ = ["DeviceQueue", "DriverQueue"]


class DeviceQueue(Protocol):
    """What the kit, the statistics and the devices use of a device-side ring."""

    num: int
    event_idx: bool
    broken: str | None
    last_avail_idx: int
    shadow_avail_idx: int
    used_idx: int
    inuse: int
    buffers_popped: int
    buffers_pushed: int
    trace: list[TraceRecord] | None
    trace_dropped: int

    # Requests.
    def pop(self) -> Element | None: ...
    def pop_batch(self, max_n: int = 0x10000) -> list[Element]: ...
    def unpop(self, count: int = 1) -> None: ...
    def available(self) -> int: ...
    def fill(self, head: int, length: int, offset: int = 0) -> None: ...
    def flush(self, count: int) -> None: ...
    def push(self, head: int, length: int) -> None: ...
    def mark_broken(self, reason: str) -> PeerError: ...

    # Notifications.
    def should_notify(self) -> bool: ...
    def enable_notification(self) -> bool: ...
    def disable_notification(self) -> None: ...

    # State and statistics.
    def get_state(self) -> tuple[int, int]: ...
    def set_state(self, avail_state: int, used_state: int | None = None, /) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def ring_state(self) -> dict[str, int]: ...
    def trace_kick(self) -> None: ...


class DriverQueue(Protocol):
    """What a driver uses of a driver-side ring, split or packed."""

    num: int
    num_added: int
    broken: str | None

    @property
    def num_free(self) -> int: ...
    @property
    def outstanding(self) -> int: ...
    def add(self, out_segs: Sequence[Segment], in_segs: Sequence[Segment],
            token: object) -> int: ...
    def kick_prepare(self) -> bool: ...
    def more_used(self) -> bool: ...
    def get_buf(self) -> tuple[object, int] | None: ...
    def get_bufs(self, max_n: int = 0x10000) -> list[tuple[object, int]]: ...
    def detach_unused(self) -> list[object]: ...
    def disable_cb(self) -> None: ...
    def enable_cb(self) -> bool: ...
    def enable_cb_delayed(self) -> bool: ...
    def mark_broken(self, reason: str) -> PeerError: ...
