"""What a device must provide to be served by the vhost-user back end.

The shape follows rust-vmm's ``VhostUserBackend`` and libvhost-user's
``VuDevIface``: the back end owns the socket, the memory table, the rings and
the event loop; the device only says what it offers and processes a queue when
it is kicked.  Sections: QEMU docs/interop/vhost-user.rst "Ring states",
"Feature negotiation", VHOST_USER_GET_CONFIG / SET_CONFIG.
"""

from __future__ import annotations

from typing import Protocol

from pyvirtio.core.split_device import SplitDeviceQueue


class VhostUserDevice(Protocol):
    """A virtio device model the vhost-user back end can serve."""

    #: virtio device id (pyvirtio.core.spec.DeviceId), e.g. 2 for block.
    device_id: int

    def num_queues(self) -> int:
        """How many virtqueues the device has (GET_QUEUE_NUM)."""
        ...

    def max_queue_size(self) -> int:
        """Largest ring size the device accepts (SET_VRING_NUM above it is refused)."""
        ...

    def features(self) -> int:
        """Virtio feature bits offered: device bits plus transport bits the device supports
        (VERSION_1, RING_EVENT_IDX, RING_INDIRECT_DESC, NOTIFY_ON_EMPTY ...). The back end
        adds VHOST_USER_F_PROTOCOL_FEATURES (bit 30) itself."""
        ...

    def protocol_features(self) -> int:
        """Extra vhost-user protocol feature bits the device needs (e.g. CONFIG, MQ)."""
        ...

    def set_features(self, features: int) -> None:
        """The feature bits the front end acknowledged (SET_FEATURES)."""
        ...

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device configuration space from ``offset`` (GET_CONFIG)."""
        ...

    def set_config(self, offset: int, data: bytes) -> None:
        """A write to the configuration space (SET_CONFIG); may raise PeerError."""
        ...

    def process_queue(self, index: int, queue: SplitDeviceQueue) -> int:
        """Pop and complete every available request of queue ``index``; return how many
        used entries were published.  The back end then asks ``queue.should_notify()``
        and signals the call eventfd.  A PeerError raised here marks the queue broken."""
        ...

    def reset(self) -> None:
        """Forget per-connection state (front end disconnected, RESET_DEVICE)."""
        ...
