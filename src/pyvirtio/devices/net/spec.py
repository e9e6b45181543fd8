"""virtio-net constants, configuration and packet header (VIRTIO 1.2 §5.1).

§5.1.2 virtqueues: receiveq1 is queue 0, transmitq1 queue 1.
§5.1.3 feature bits; §5.1.4 device configuration layout (``mac``, ``status``).
§5.1.6 ``struct virtio_net_hdr``::

    u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
    le16 csum_start; le16 csum_offset; le16 num_buffers;

``num_buffers`` exists only when ``VIRTIO_NET_F_MRG_RXBUF`` or
``VIRTIO_F_VERSION_1`` is negotiated (§5.1.6.1, "Legacy Interface: Device
Operation"): the header is 12 bytes then, else 10.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.spec import F_VERSION_1

RX_QUEUE = 0
TX_QUEUE = 1

# Feature bits, §5.1.3.
F_CSUM = 0
F_GUEST_CSUM = 1
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_MQ = 22

# Header flags and GSO types, §5.1.6.
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0

#: The checksum and segmentation offloads a TAP with IFF_VNET_HDR carries
#: (§5.1.3: a device may send partially checksummed and TSO packets only with
#: GUEST_CSUM / GUEST_TSO4/6, and takes them with CSUM / HOST_TSO4/6).
OFFLOAD_FEATURES = (1 << F_CSUM | 1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6
                    | 1 << F_HOST_TSO4 | 1 << F_HOST_TSO6)

# Config status bits, §5.1.4.
S_LINK_UP = 1

HDR_LEGACY = struct.Struct("<BBHHHH")
HDR_MRG = struct.Struct("<BBHHHHH")

# Largest Ethernet frame without FCS and VLAN tag; what a driver's buffer must hold.
ETH_FRAME_MAX = 1514


def hdr_size(features: int) -> int:
    """Bytes of the header for the negotiated ``features`` (10 or 12)."""
    if features >> F_MRG_RXBUF & 1 or features >> F_VERSION_1 & 1:
        return HDR_MRG.size
    return HDR_LEGACY.size


@dataclass(frozen=True, slots=True)
class NetHdr:
    """A decoded ``virtio_net_hdr``."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self, size: int) -> bytes:
        fields = (self.flags, self.gso_type, self.hdr_len, self.gso_size,
                  self.csum_start, self.csum_offset)
        if size == HDR_MRG.size:
            return HDR_MRG.pack(*fields, self.num_buffers)
        if size == HDR_LEGACY.size:
            return HDR_LEGACY.pack(*fields)
        raise CallerError(f"virtio_net_hdr is 10 or 12 bytes, not {size}")

    @classmethod
    def unpack(cls, data: bytes | memoryview, size: int) -> NetHdr:
        """Decode the first ``size`` bytes; PeerError if there are fewer."""
        if len(data) < size:
            raise PeerError(f"virtio_net_hdr needs {size} bytes, buffer has {len(data)}")
        if size == HDR_MRG.size:
            return cls(*HDR_MRG.unpack_from(data))
        return cls(*HDR_LEGACY.unpack_from(data))


#: Ethernet header: destination, source, type.
ETH_HLEN = 14
#: Largest packet after the header: a 64 KiB GSO packet plus Ethernet and VLAN
#: headers.  A chain may name far more guest memory (the same buffer many
#: times over); such a frame is dropped before anything is copied.
MAX_TX_PACKET = 65536 + 18


def net_config(mac: bytes, status: int = S_LINK_UP, max_pairs: int | None = None) -> bytes:
    """The device configuration (§5.1.4): ``mac[6]``, ``le16 status``
    and, with ``VIRTIO_NET_F_MQ``, ``le16 max_virtqueue_pairs``."""
    if len(mac) != 6:
        raise CallerError("a MAC address has 6 bytes")
    cfg = bytes(mac) + status.to_bytes(2, "little")
    if max_pairs is not None:
        cfg += max_pairs.to_bytes(2, "little")
    return cfg


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` as 6 bytes; CallerError if it is not a MAC address."""
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6 or any(len(p) != 2 for p in parts):
        raise CallerError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    return mac


def format_mac(mac: bytes | memoryview) -> str:
    return ":".join(f"{b:02x}" for b in bytes(mac))
