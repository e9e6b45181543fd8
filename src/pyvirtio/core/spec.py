"""Constants of the VIRTIO 1.2 specification that pyvirtio uses.

Sections: §2.1 device status field, §2.2 feature bits, §2.7.5 descriptor
flags, §2.7.6/§2.7.8 ring flags, §5 device ids, §6 reserved feature bits,
§4.1.4.8 legacy virtio-pci register layout (in ``transports.pci_legacy``).
"""

from __future__ import annotations

import enum


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
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_UNUSED = 30  # legacy "bad feature" bit; a driver must not ack it
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_RING_RESET = 40


def bit(feature: int) -> int:
    """The mask of feature bit number ``feature``."""
    return 1 << feature


# Descriptor flags, §2.7.5.
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

# Available ring flags (driver -> device), §2.7.6.
VRING_AVAIL_F_NO_INTERRUPT = 1
# Used ring flags (device -> driver), §2.7.8.
VRING_USED_F_NO_NOTIFY = 1

# Largest split queue size, §2.7 ("Queue Size ... maximum 32768").
MAX_QUEUE_SIZE = 32768

# Legacy interface: rings are aligned to this in the contiguous layout, §2.7.2.
LEGACY_VRING_ALIGN = 4096
