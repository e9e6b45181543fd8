"""Spec constants against VIRTIO 1.2: §2.1 status, §2.7.5/§2.7.6/§2.7.8 flags, §5 ids, §6 bits."""

from __future__ import annotations

from pyvirtio.core import spec


def test_device_status_bits_match_section_2_1() -> None:
    assert int(spec.Status.ACKNOWLEDGE) == 1
    assert int(spec.Status.DRIVER) == 2
    assert int(spec.Status.DRIVER_OK) == 4
    assert int(spec.Status.FEATURES_OK) == 8
    assert int(spec.Status.NEEDS_RESET) == 64
    assert int(spec.Status.FAILED) == 128
    # Status bits are distinct single bits that combine into one byte.
    values = [int(s) for s in spec.Status]
    assert all(v & (v - 1) == 0 for v in values)
    assert sum(values) < 256


def test_reserved_feature_bits_match_section_6() -> None:
    assert spec.F_NOTIFY_ON_EMPTY == 24
    assert spec.F_ANY_LAYOUT == 27
    assert spec.F_RING_INDIRECT_DESC == 28
    assert spec.F_RING_EVENT_IDX == 29
    assert spec.F_VERSION_1 == 32
    assert spec.F_ACCESS_PLATFORM == 33
    assert spec.F_RING_PACKED == 34
    assert spec.F_IN_ORDER == 35
    assert spec.F_ORDER_PLATFORM == 36
    assert spec.F_SR_IOV == 37
    assert spec.F_NOTIFICATION_DATA == 38
    assert spec.F_RING_RESET == 40


def test_bit_is_the_mask_of_a_feature_number() -> None:
    assert spec.bit(spec.F_RING_EVENT_IDX) == 0x2000_0000
    assert spec.bit(spec.F_VERSION_1) == 0x1_0000_0000
    assert spec.bit(0) == 1


def test_descriptor_and_ring_flags() -> None:
    assert spec.VRING_DESC_F_NEXT == 1
    assert spec.VRING_DESC_F_WRITE == 2
    assert spec.VRING_DESC_F_INDIRECT == 4
    assert spec.VRING_AVAIL_F_NO_INTERRUPT == 1
    assert spec.VRING_USED_F_NO_NOTIFY == 1


def test_device_ids_match_section_5() -> None:
    assert int(spec.DeviceId.NET) == 1
    assert int(spec.DeviceId.BLOCK) == 2
    assert int(spec.DeviceId.CONSOLE) == 3
    assert int(spec.DeviceId.ENTROPY) == 4
    assert int(spec.DeviceId.SCSI) == 8
    assert int(spec.DeviceId.VSOCK) == 19
    assert int(spec.DeviceId.FS) == 26


def test_queue_limits() -> None:
    assert spec.MAX_QUEUE_SIZE == 32768
    assert spec.LEGACY_VRING_ALIGN == 4096
