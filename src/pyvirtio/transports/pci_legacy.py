"""The legacy virtio-pci register block, both sides (VIRTIO 1.2 §4.1.4.8, §4.1.5).

VIRTIO 1.2 §4.1.4.8 ("Legacy Interfaces: A Note on PCI Device Layout") gives
the legacy I/O BAR 0::

    offset width  register
      0    32     HOST_FEATURES     (device features, bits 0..31; read-only)
      4    32     GUEST_FEATURES    (driver features)
      8    32     QUEUE_PFN         (ring address >> 12 of the selected queue; 0 = reset)
     12    16     QUEUE_NUM         (size of the selected queue; read-only)
     14    16     QUEUE_SEL
     16    16     QUEUE_NOTIFY      (write a queue index: a kick)
     18     8     STATUS            (§2.1; writing 0 resets)
     19     8     ISR               (§4.1.4.5: bit 0 queue, bit 1 config; reading clears)
     20    16     CONFIG_VECTOR     (only with MSI-X enabled, §4.1.5.1.2)
     22    16     QUEUE_VECTOR      (only with MSI-X enabled)
     20|24  ..    device configuration space

:class:`LegacyPciDevice` is the device (VMM) side as a sans-I/O model:
``read(offset, width) -> value`` and ``write(offset, width, value) ->
effects``; the caller moves the bytes (a VM exit, a socket message, a direct
call) and acts on the effects (a kick of a queue, a reset).  The rules follow
what QEMU's legacy ``virtio_ioport_write`` does: writing QUEUE_PFN sets up the
selected queue with the contiguous legacy layout (§2.7.2, align 4096) and
writing 0 there resets the whole device, as does writing STATUS 0;
QUEUE_SEL takes any index below ``VIRTIO_QUEUE_MAX`` (:data:`QUEUE_MAX`), and
a selected queue the device does not have reads QUEUE_NUM 0 (which is how a
driver learns how many queues there are) and ignores writes; QUEUE_NOTIFY of
such a queue is ignored; an MSI-X vector that does not exist reads back as
``VIRTIO_MSI_NO_VECTOR``.

:class:`LegacyPciDriver` is the driver side over any :class:`RegisterBus`:
the reset / ACKNOWLEDGE / DRIVER / features / DRIVER_OK sequence (§3.1.2,
legacy variant without FEATURES_OK) and :meth:`LegacyPciDriver.setup_vq`,
which sets a queue up exactly the way Linux's legacy ``setup_vq`` does.

Register accesses come from the guest: a bad width raises :class:`PeerError`,
accesses that hit no register read as all ones and writes to them are
dropped, as on real hardware.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvirtio.core.errors import CallerError, PeerError, VirtioError
from pyvirtio.core.layout import RingViews, SplitLayout, align_up, is_valid_queue_size, vring_size
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import LEGACY_VRING_ALIGN, Status
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.core.split_driver import SplitDriverQueue

log = logging.getLogger(__name__)

# Register offsets, §4.1.4.8.
HOST_FEATURES = 0
GUEST_FEATURES = 4
QUEUE_PFN = 8
QUEUE_NUM = 12
QUEUE_SEL = 14
QUEUE_NOTIFY = 16
STATUS = 18
ISR = 19
CONFIG_VECTOR = 20
QUEUE_VECTOR = 22
CONFIG_OFFSET = 20
CONFIG_OFFSET_MSIX = 24

# QUEUE_PFN holds the ring address in 4096-byte pages (VIRTIO_PCI_QUEUE_ADDR_SHIFT).
QUEUE_ADDR_SHIFT = 12
PAGE_SIZE = 1 << QUEUE_ADDR_SHIFT
# QUEUE_PFN is 32 bits wide: rings must lie below 2**44 (and not in page 0).
PFN_LIMIT = 1 << 32
# QEMU's VIRTIO_QUEUE_MAX: QUEUE_SEL accepts any index below it.
QUEUE_MAX = 1024
# §4.1.5.1.2: "no vector" for config and queue interrupts.
NO_VECTOR = 0xFFFF
# ISR status bits, §4.1.4.5.
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

_WIDTHS = {
    HOST_FEATURES: 4, GUEST_FEATURES: 4, QUEUE_PFN: 4, QUEUE_NUM: 2, QUEUE_SEL: 2,
    QUEUE_NOTIFY: 2, STATUS: 1, ISR: 1, CONFIG_VECTOR: 2, QUEUE_VECTOR: 2,
}


def config_offset(msix: bool) -> int:
    """Where the device configuration starts in BAR 0 (§4.1.4.8)."""
    return CONFIG_OFFSET_MSIX if msix else CONFIG_OFFSET


def _all_ones(width: int) -> int:
    return (1 << (8 * width)) - 1


# ------------------------------------------------------------------ effects
@dataclass(frozen=True, slots=True)
class Kick:
    """The driver notified queue ``queue`` (a QUEUE_NOTIFY write)."""

    queue: int


@dataclass(frozen=True, slots=True)
class Reset:
    """The device was reset (STATUS 0 or QUEUE_PFN 0): drop all queue state."""


@dataclass(frozen=True, slots=True)
class QueueReady:
    """Queue ``queue`` was set up at guest address ``addr``; ``device_queue`` serves it."""

    queue: int
    addr: int
    device_queue: SplitDeviceQueue


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """The driver wrote a non-zero STATUS."""

    old: int
    new: int


@dataclass(frozen=True, slots=True)
class ConfigWritten:
    """The driver wrote ``width`` bytes at ``offset`` of the device configuration."""

    offset: int
    width: int
    value: int


Effect = Kick | Reset | QueueReady | StatusChanged | ConfigWritten


@dataclass(slots=True)
class LegacyQueue:
    """One queue as the register block sees it."""

    size: int
    pfn: int = 0
    vector: int = NO_VECTOR
    device: SplitDeviceQueue | None = None


# ------------------------------------------------------------- device side
class LegacyPciDevice:
    """The device side of the legacy register block (sans-I/O).

    ``queue_sizes`` are the sizes QUEUE_NUM reports; ``msix_vectors`` is how
    many MSI-X vectors the function has, 0 meaning MSI-X disabled (INTx and
    ISR only).
    """

    def __init__(self, memory: GuestMemory, host_features: int, queue_sizes: Sequence[int],
                 config: bytes = b"", msix_vectors: int = 0) -> None:
        for n in queue_sizes:
            if not is_valid_queue_size(n):
                raise CallerError(f"queue size {n} is not a power of two in 1..32768")
        if not 0 <= host_features < 1 << 32:
            raise CallerError("legacy HOST_FEATURES has 32 bits")
        self.memory = memory
        self.host_features = host_features
        self.queues = [LegacyQueue(n) for n in queue_sizes]
        self.config = bytearray(config)
        self.msix_vectors = msix_vectors
        self.guest_features = 0
        self.status = 0
        self.isr = 0
        self.queue_sel = 0
        self.config_vector = NO_VECTOR

    @property
    def msix(self) -> bool:
        return self.msix_vectors > 0

    @property
    def config_offset(self) -> int:
        return config_offset(self.msix)

    @property
    def size(self) -> int:
        """Size of the register block plus the device configuration."""
        return self.config_offset + len(self.config)

    # ---------------------------------------------------------------- reset
    def reset(self) -> None:
        """What QEMU's ``virtio_reset`` clears."""
        self.guest_features = 0
        self.status = 0
        self.isr = 0
        self.queue_sel = 0
        self.config_vector = NO_VECTOR
        for q in self.queues:
            q.pfn = 0
            q.vector = NO_VECTOR
            q.device = None

    # ------------------------------------------------------------ accesses
    @staticmethod
    def _check_width(offset: int, width: int) -> None:
        if width not in (1, 2, 4):
            raise PeerError(f"register access of width {width} at offset {offset}")
        if offset < 0:
            raise PeerError(f"register access at negative offset {offset}")

    def _register_at(self, offset: int, width: int) -> int | None:
        """The register the access names, or None (config space or nothing)."""
        if offset >= self.config_offset:
            return None
        if offset in (CONFIG_VECTOR, QUEUE_VECTOR) and not self.msix:
            return None
        if _WIDTHS.get(offset) != width:
            return None
        return offset

    def read(self, offset: int, width: int) -> int:
        """The value a driver reads at ``offset`` (all ones if nothing is there)."""
        self._check_width(offset, width)
        if offset >= self.config_offset:
            return self._config_read(offset - self.config_offset, width)
        reg = self._register_at(offset, width)
        q = self._selected()
        if reg == HOST_FEATURES:
            return self.host_features
        if reg == GUEST_FEATURES:
            return self.guest_features
        if reg == QUEUE_PFN:
            return q.pfn if q else 0
        if reg == QUEUE_NUM:
            return q.size if q else 0
        if reg == QUEUE_SEL:
            return self.queue_sel
        if reg == STATUS:
            return self.status
        if reg == ISR:
            # Reading ISR acknowledges the interrupt and lowers INTx (§4.1.4.5).
            isr, self.isr = self.isr, 0
            return isr
        if reg == CONFIG_VECTOR:
            return self.config_vector
        if reg == QUEUE_VECTOR:
            return q.vector if q else NO_VECTOR
        return _all_ones(width)

    def write(self, offset: int, width: int, value: int) -> list[Effect]:
        """Apply a driver write; returns what the caller must act on."""
        self._check_width(offset, width)
        value &= _all_ones(width)
        if offset >= self.config_offset:
            return self._config_write(offset - self.config_offset, width, value)
        reg = self._register_at(offset, width)
        if reg == GUEST_FEATURES:
            # A driver can only accept what the device offered.
            self.guest_features = value & self.host_features
        elif reg == QUEUE_PFN:
            return self._write_pfn(value)
        elif reg == QUEUE_SEL:
            if value < QUEUE_MAX:
                self.queue_sel = value
        elif reg == QUEUE_NOTIFY:
            if value < len(self.queues):
                return [Kick(value)]
        elif reg == STATUS:
            if value == 0:
                self.reset()
                return [Reset()]
            old, self.status = self.status, value
            return [StatusChanged(old, value)]
        elif reg == CONFIG_VECTOR:
            self.config_vector = self._vector(value)
        elif reg == QUEUE_VECTOR:
            q = self._selected()
            if q is not None:
                q.vector = self._vector(value)
        else:
            log.debug("legacy virtio-pci: write of %d bytes to offset %d ignored", width, offset)
        return []

    def _selected(self) -> LegacyQueue | None:
        """The selected queue, or None when the device has no queue of that index."""
        sel = self.queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def _vector(self, value: int) -> int:
        # QEMU maps a vector it cannot use to NO_VECTOR; the driver reads it back to see.
        return value if value < self.msix_vectors else NO_VECTOR

    def _write_pfn(self, pfn: int) -> list[Effect]:
        if pfn == 0:
            self.reset()
            return [Reset()]
        q = self._selected()
        if q is None:
            # QEMU virtio_queue_set_addr: a queue of size 0 takes no address.
            return []
        addr = pfn << QUEUE_ADDR_SHIFT
        layout = SplitLayout.legacy(addr, q.size, LEGACY_VRING_ALIGN)
        try:
            rings = RingViews.map(self.memory, layout)
        except PeerError as exc:
            self.needs_reset(f"queue {self.queue_sel} at {addr:#x}: {exc}")
            return []
        q.pfn = pfn
        q.device = SplitDeviceQueue(rings, self.memory, self.guest_features)
        return [QueueReady(self.queue_sel, addr, q.device)]

    # --------------------------------------------------------- config space
    def _config_read(self, offset: int, width: int) -> int:
        if offset + width > len(self.config):
            return _all_ones(width)
        # Legacy config is guest-endian; pyvirtio's guests are little-endian.
        return int.from_bytes(self.config[offset:offset + width], "little")

    def _config_write(self, offset: int, width: int, value: int) -> list[Effect]:
        if offset + width > len(self.config):
            return []
        self.config[offset:offset + width] = value.to_bytes(width, "little")
        return [ConfigWritten(offset, width, value)]

    # ------------------------------------------------------------ interrupts
    def interrupt(self, queue: int) -> int:
        """The device decided to interrupt for ``queue``: set ISR bit 0.

        Returns the MSI-X vector to signal, or ``NO_VECTOR`` for INTx.
        """
        self.isr |= ISR_QUEUE
        if self.msix and 0 <= queue < len(self.queues):
            return self.queues[queue].vector
        return NO_VECTOR

    def config_changed(self) -> int:
        """A configuration change interrupt: ISR bit 1; returns the vector (or NO_VECTOR)."""
        self.isr |= ISR_CONFIG
        return self.config_vector if self.msix else NO_VECTOR

    def needs_reset(self, reason: str) -> int:
        """The driver broke the spec: log once, set NEEDS_RESET, and raise a config interrupt."""
        if not self.status & Status.NEEDS_RESET:
            log.warning("legacy virtio-pci device needs reset: %s", reason)
        self.status |= Status.NEEDS_RESET
        return self.config_changed()


# -------------------------------------------------------------- driver side
class RegisterBus(Protocol):
    """How a driver reaches the register block: port I/O, a socket, a direct call."""

    def read(self, offset: int, width: int) -> int: ...

    def write(self, offset: int, width: int, value: int) -> None: ...


class DirectBus:
    """A bus that calls a :class:`LegacyPciDevice` directly and hands effects to a callback."""

    def __init__(self, device: LegacyPciDevice,
                 on_effect: Callable[[Effect], None] | None = None) -> None:
        self.device = device
        self.on_effect = on_effect
        self.effects: list[Effect] = []

    def read(self, offset: int, width: int) -> int:
        return self.device.read(offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        for effect in self.device.write(offset, width, value):
            self.effects.append(effect)
            if self.on_effect is not None:
                self.on_effect(effect)


class VqSetupError(VirtioError):
    """``setup_vq`` failed; ``errno`` is what Linux would return (ENOENT, EBUSY, E2BIG...)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def legacy_ring_bytes(num: int) -> int:
    """PAGE_ALIGN(vring_size(num, 4096)): what setup_vq allocates for a queue."""
    return align_up(vring_size(num, LEGACY_VRING_ALIGN), PAGE_SIZE)


class LegacyPciDriver:
    """The driver side of legacy virtio-pci: status sequence, features, queue set-up."""

    def __init__(self, bus: RegisterBus, memory: GuestMemory, allocator: BumpAllocator,
                 msix: bool = False) -> None:
        self.bus = bus
        self.memory = memory
        self.allocator = allocator
        self.msix = msix
        self.features = 0

    # ----------------------------------------------------------- status
    def reset(self) -> None:
        """Write STATUS 0, then read ISR to flush the write (Linux ``vp_reset``)."""
        self.bus.write(STATUS, 1, 0)
        self.bus.read(ISR, 1)

    def get_status(self) -> int:
        return self.bus.read(STATUS, 1)

    def add_status(self, bits: int) -> None:
        self.bus.write(STATUS, 1, self.get_status() | bits)

    def negotiate(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, then accept ``wanted & HOST_FEATURES``."""
        self.reset()
        self.add_status(Status.ACKNOWLEDGE)
        self.add_status(Status.DRIVER)
        offered = self.bus.read(HOST_FEATURES, 4)
        self.features = offered & wanted & 0xFFFFFFFF
        self.bus.write(GUEST_FEATURES, 4, self.features)
        return self.features

    def driver_ok(self) -> None:
        self.add_status(Status.DRIVER_OK)

    def fail(self) -> None:
        self.add_status(Status.FAILED)

    # ------------------------------------------------------------ queues
    def setup_vq(self, index: int, msix_vector: int = NO_VECTOR) -> SplitDriverQueue:
        """Set queue ``index`` up the way Linux's legacy ``setup_vq`` does."""
        self.bus.write(QUEUE_SEL, 2, index)
        num = self.bus.read(QUEUE_NUM, 2)
        if not num or self.bus.read(QUEUE_PFN, 4):
            raise VqSetupError(errno.ENOENT,
                               f"queue {index} is not available or already active")
        if not is_valid_queue_size(num):
            raise PeerError(f"device reports queue {index} size {num}: not a power of two")
        size = legacy_ring_bytes(num)
        addr = self.allocator.alloc(size, PAGE_SIZE)
        pfn = addr >> QUEUE_ADDR_SHIFT
        # The register cannot express these rings: page 0 is the reset value,
        # and bits above 32 would be dropped, pointing the device at another
        # ring.  Linux's legacy setup_vq refuses q_pfn >> 32 with E2BIG.
        if pfn >= PFN_LIMIT:
            raise VqSetupError(errno.E2BIG, f"queue {index}: ring at {addr:#x} is above "
                                            f"what the 32-bit QUEUE_PFN can address")
        if pfn == 0:
            raise VqSetupError(errno.EINVAL, f"queue {index}: a ring in page 0 would "
                                             f"write QUEUE_PFN 0, which resets the device")
        # Rings must start zeroed (alloc_pages_exact with __GFP_ZERO).
        self.memory.translate(addr, size)[:] = bytes(size)
        self.bus.write(QUEUE_PFN, 4, pfn)
        layout = SplitLayout.legacy(addr, num, LEGACY_VRING_ALIGN)
        vq = SplitDriverQueue(RingViews.map(self.memory, layout), self.features)
        if self.msix and msix_vector != NO_VECTOR:
            self.bus.write(QUEUE_VECTOR, 2, msix_vector)
            if self.bus.read(QUEUE_VECTOR, 2) == NO_VECTOR:
                # Deactivate the queue again (this resets a legacy device, as in Linux).
                self.bus.write(QUEUE_PFN, 4, 0)
                raise VqSetupError(errno.EBUSY, f"queue {index}: MSI-X vector {msix_vector} "
                                                f"refused by the device")
        return vq

    def set_config_vector(self, vector: int) -> bool:
        """Assign the config-change vector; False if the device refused it."""
        self.bus.write(CONFIG_VECTOR, 2, vector)
        return self.bus.read(CONFIG_VECTOR, 2) != NO_VECTOR

    def notify(self, index: int) -> None:
        """A kick: write the queue index to QUEUE_NOTIFY (Linux ``vp_notify``)."""
        self.bus.write(QUEUE_NOTIFY, 2, index)

    def read_isr(self) -> int:
        return self.bus.read(ISR, 1)

    def config_read(self, offset: int, width: int) -> int:
        return self.bus.read(config_offset(self.msix) + offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.bus.write(config_offset(self.msix) + offset, width, value)
