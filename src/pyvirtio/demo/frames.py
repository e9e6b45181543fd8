"""Test frames for the demo: Ethernet frames (IEEE 802.3) carrying a sequence number.

Each frame is addressed to the device's MAC, has the local-experimental
EtherType 0x88B5, an 8-byte little-endian sequence number, and a payload
whose length and bytes follow from the sequence number, so the receiver can
rebuild the exact frame it expects and compare it byte for byte.
"""

from __future__ import annotations

ETHERTYPE = b"\x88\xb5"
MIN_FRAME = 60
MAX_FRAME = 1514
_PATTERN = bytes(i % 251 for i in range(MAX_FRAME + 256))
_HEAD = 14 + 8


def frame_length(seq: int) -> int:
    """Lengths sweep the whole Ethernet range as the sequence number grows."""
    return MIN_FRAME + (seq * 7919) % (MAX_FRAME - MIN_FRAME + 1)


def make_frame(seq: int, mac: bytes) -> bytes:
    n = frame_length(seq) - _HEAD
    start = seq % 251
    return mac + mac + ETHERTYPE + seq.to_bytes(8, "little") + _PATTERN[start:start + n]


def frame_seq(frame: bytes | memoryview) -> int | None:
    """The sequence number a frame claims, or None if it is too short or not ours."""
    if len(frame) < _HEAD or bytes(frame[12:14]) != ETHERTYPE:
        return None
    return int.from_bytes(frame[14:22], "little")


def check_frame(frame: bytes | memoryview, seq: int, mac: bytes) -> str | None:
    """None if ``frame`` is exactly frame ``seq``; otherwise what is wrong."""
    expected = make_frame(seq, mac)
    if frame == expected:
        return None
    got = frame_seq(frame)
    if got is None:
        return f"frame {seq}: not a demo frame ({len(frame)} bytes)"
    if got != seq:
        return f"frame {seq}: got sequence number {got} (out of order or lost)"
    return f"frame {seq}: {len(frame)} bytes, expected {len(expected)}, contents differ"
