"""Constants of the VIRTIO 1.2 specification that pyvirtio uses.

Sections: §2.1 device status field, §2.2 feature bits, §2.7.5 descriptor
flags, §2.7.6/§2.7.8 ring flags, §5 device ids, §6 reserved feature bits,
§4.1.4.8 legacy virtio-pci register layout (in ``transports.pci_legacy``).
"""

from __future__ import annotations

import enum
from typing import Final


class Status(enum.IntFlag):
    """Device status field, §2.1."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 64
    FAILED = 128


class DeviceId(enum.IntEnum):
    """Device types, §5."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON = 5
    SCSI = 8
    NINEP = 9
    GPU = 16
    INPUT = 18
    VSOCK = 19
    FS = 26


# Reserved (device-independent) feature bits, §6.
F_NOTIFY_ON_EMPTY: Final = 24
F_ANY_LAYOUT: Final = 27
F_RING_INDIRECT_DESC: Final = 28
F_RING_EVENT_IDX: Final = 29
F_UNUSED: Final = 30  # legacy "bad feature" bit; a driver must not ack it
F_VERSION_1: Final = 32
F_ACCESS_PLATFORM: Final = 33
F_RING_PACKED: Final = 34
F_IN_ORDER: Final = 35
F_ORDER_PLATFORM: Final = 36
F_SR_IOV: Final = 37
F_NOTIFICATION_DATA: Final = 38
F_RING_RESET: Final = 40


def bit(feature: int) -> int:
    """The mask of feature bit number ``feature``."""
    return 1 << feature


# Descriptor flags, §2.7.5.
VRING_DESC_F_NEXT: Final = 1
VRING_DESC_F_WRITE: Final = 2
VRING_DESC_F_INDIRECT: Final = 4

# Available ring flags (driver -> device), §2.7.6.
VRING_AVAIL_F_NO_INTERRUPT: Final = 1
# Used ring flags (device -> driver), §2.7.8.
VRING_USED_F_NO_NOTIFY: Final = 1

# Largest split queue size, §2.7 ("Queue Size ... maximum 32768").
MAX_QUEUE_SIZE: Final = 32768

# Legacy interface: rings are aligned to this in the contiguous layout, §2.7.2.
LEGACY_VRING_ALIGN: Final = 4096
