"""virtio-blk constants and the configuration space, VIRTIO 1.2 §5.2.

* §5.2.3 feature bits (``VIRTIO_BLK_F_*``);
* §5.2.4 ``struct virtio_blk_config`` — every field, little-endian, at the
  spec's byte offsets (:class:`BlkConfig`);
* §5.2.6 request types (``VIRTIO_BLK_T_*``), the 16-byte request header,
  ``struct virtio_blk_discard_write_zeroes`` segments and the status byte
  values (``VIRTIO_BLK_S_*``).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields

from pyvirtio.core.errors import PeerError

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
ID_BYTES = 20
"""GET_ID answers a NUL-padded ASCII string of up to 20 bytes (§5.2.6)."""


class BlkFeature(enum.IntEnum):
    """Device feature bit numbers, §5.2.3."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


class ReqType(enum.IntEnum):
    """Request types, §5.2.6."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    """The status byte the device writes last, §5.2.6."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


# struct virtio_blk_req header: le32 type; le32 reserved (ioprio); le64 sector.
REQ_HEADER = struct.Struct("<IIQ")
REQ_HEADER_SIZE = REQ_HEADER.size  # 16

# struct virtio_blk_discard_write_zeroes: le64 sector; le32 num_sectors; le32 flags.
DWZ_SEGMENT = struct.Struct("<QII")
DWZ_SEGMENT_SIZE = DWZ_SEGMENT.size  # 16
DWZ_F_UNMAP = 1
"""``flags.unmap``: only meaningful for WRITE_ZEROES; a discard with it set is UNSUPP."""

# struct virtio_blk_config, §5.2.4, through the zoned characteristics.
_CONFIG = struct.Struct(
    "<Q"     # 0  capacity (512-byte sectors)
    "I"      # 8  size_max
    "I"      # 12 seg_max
    "HBB"    # 16 geometry: cylinders, heads, sectors
    "I"      # 20 blk_size
    "BBHI"   # 24 topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "B"      # 32 writeback
    "x"      # 33 unused0
    "H"      # 34 num_queues
    "I"      # 36 max_discard_sectors
    "I"      # 40 max_discard_seg
    "I"      # 44 discard_sector_alignment
    "I"      # 48 max_write_zeroes_sectors
    "I"      # 52 max_write_zeroes_seg
    "B"      # 56 write_zeroes_may_unmap
    "3x"     # 57 unused1
    "I"      # 60 max_secure_erase_sectors
    "I"      # 64 max_secure_erase_seg
    "I"      # 68 secure_erase_sector_alignment
    "IIIII"  # 72 zoned: zone_sectors, max_open_zones, max_active_zones,
             #    max_append_sectors, write_granularity
    "B"      # 92 zoned.model
    "3x"     # 93 unused2
)
CONFIG_SIZE = _CONFIG.size  # 96

CONFIG_SIZE_WRITE_ZEROES = 60
"""Config bytes up to write_zeroes_may_unmap + padding: what QEMU 7.2 asks for."""


@dataclass(slots=True)
class BlkConfig:
    """``struct virtio_blk_config`` as Python ints (§5.2.4)."""

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = SECTOR_SIZE
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0
    zone_sectors: int = 0
    max_open_zones: int = 0
    max_active_zones: int = 0
    max_append_sectors: int = 0
    write_granularity: int = 0
    zoned_model: int = 0

    def pack(self) -> bytes:
        return _CONFIG.pack(*(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> BlkConfig:
        """Decode config bytes; a short read (older devices) is zero-extended.

        Raises PeerError: the bytes come from the device.
        """
        if len(data) > CONFIG_SIZE:
            data = bytes(data[:CONFIG_SIZE])
        padded = bytes(data) + bytes(CONFIG_SIZE - len(data))
        try:
            return cls(*_CONFIG.unpack(padded))
        except struct.error as exc:  # pragma: no cover - padded to the exact size
            raise PeerError(f"bad virtio-blk config: {exc}") from exc

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def feature_names(features: int) -> list[str]:
    """Names of the virtio-blk feature bits set in ``features`` (device bits only)."""
    return [f"VIRTIO_BLK_F_{f.name}" for f in BlkFeature if features >> f & 1]
