"""Legacy virtio-pci register block (VIRTIO 1.2 §4.1.4.8): every register rule, both sides."""

from __future__ import annotations

import errno

import pytest

from pyvirtio.core.errors import PeerError
from pyvirtio.core.layout import SplitLayout, vring_size
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import F_RING_EVENT_IDX, Status, bit
from pyvirtio.transports import pci_legacy as pci

MEM = 4 << 20


def make(queue_sizes: tuple[int, ...] = (256, 128), msix: int = 0, host: int = 0xF0F0,
         config: bytes = b"\x01\x02\x03\x04\x05\x06\x07\x08"
         ) -> tuple[GuestMemory, pci.LegacyPciDevice]:
    mem = GuestMemory.anonymous(MEM)
    return mem, pci.LegacyPciDevice(mem, host, list(queue_sizes), config, msix_vectors=msix)


class RecordingBus(pci.DirectBus):
    def __init__(self, device: pci.LegacyPciDevice) -> None:
        super().__init__(device)
        self.log: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, width: int) -> int:
        value = super().read(offset, width)
        self.log.append(("r", offset, width, value))
        return value

    def write(self, offset: int, width: int, value: int) -> None:
        self.log.append(("w", offset, width, value))
        super().write(offset, width, value)


def test_register_offsets_match_the_spec() -> None:
    assert (pci.HOST_FEATURES, pci.GUEST_FEATURES, pci.QUEUE_PFN, pci.QUEUE_NUM,
            pci.QUEUE_SEL, pci.QUEUE_NOTIFY, pci.STATUS, pci.ISR) == (0, 4, 8, 12, 14, 16, 18, 19)
    assert (pci.CONFIG_VECTOR, pci.QUEUE_VECTOR) == (20, 22)
    assert pci.config_offset(False) == 20 and pci.config_offset(True) == 24


def test_host_features_read_only_and_guest_features_masked() -> None:
    _, dev = make(host=0x0000_00FF)
    assert dev.read(pci.HOST_FEATURES, 4) == 0xFF
    assert dev.write(pci.HOST_FEATURES, 4, 0xFFFF) == []
    assert dev.read(pci.HOST_FEATURES, 4) == 0xFF
    dev.write(pci.GUEST_FEATURES, 4, 0xFFFF_FFFF)
    assert dev.read(pci.GUEST_FEATURES, 4) == 0xFF


def test_queue_sel_selects_and_queue_num_is_read_only() -> None:
    _, dev = make((256, 128))
    assert dev.read(pci.QUEUE_NUM, 2) == 256
    dev.write(pci.QUEUE_SEL, 2, 1)
    assert dev.read(pci.QUEUE_SEL, 2) == 1
    assert dev.read(pci.QUEUE_NUM, 2) == 128
    dev.write(pci.QUEUE_NUM, 2, 16)  # read-only in the legacy interface
    assert dev.read(pci.QUEUE_NUM, 2) == 128


@pytest.mark.parametrize("sel", [2, 5, pci.QUEUE_MAX - 1])
def test_queue_sel_beyond_the_queues_selects_a_queue_of_size_0(sel: int) -> None:
    # QEMU's legacy virtio_ioport_write takes any selector below VIRTIO_QUEUE_MAX;
    # a queue the device does not have reads QUEUE_NUM 0 and ignores writes.
    _, dev = make((256, 128), msix=3)
    dev.write(pci.QUEUE_SEL, 2, 1)
    dev.write(pci.QUEUE_SEL, 2, sel)
    assert dev.read(pci.QUEUE_SEL, 2) == sel
    assert dev.read(pci.QUEUE_NUM, 2) == 0
    assert dev.read(pci.QUEUE_PFN, 4) == 0
    assert dev.write(pci.QUEUE_PFN, 4, 0x10) == []
    assert dev.read(pci.QUEUE_PFN, 4) == 0
    dev.write(pci.QUEUE_VECTOR, 2, 1)
    assert dev.read(pci.QUEUE_VECTOR, 2) == pci.NO_VECTOR
    assert all(q.pfn == 0 and q.device is None and q.vector == pci.NO_VECTOR
               for q in dev.queues)
    assert not dev.status & Status.NEEDS_RESET


def test_queue_sel_at_or_past_queue_max_is_ignored() -> None:
    _, dev = make((256, 128))
    dev.write(pci.QUEUE_SEL, 2, 1)
    dev.write(pci.QUEUE_SEL, 2, pci.QUEUE_MAX)
    assert dev.read(pci.QUEUE_SEL, 2) == 1
    dev.write(pci.QUEUE_SEL, 2, 0xFFFF)
    assert dev.read(pci.QUEUE_NUM, 2) == 128


def test_queue_pfn_sets_up_legacy_ring() -> None:
    _mem, dev = make()
    dev.write(pci.GUEST_FEATURES, 4, 0)
    dev.write(pci.QUEUE_SEL, 2, 1)
    effects = dev.write(pci.QUEUE_PFN, 4, 0x10)
    assert len(effects) == 1 and isinstance(effects[0], pci.QueueReady)
    ready = effects[0]
    assert ready.queue == 1 and ready.addr == 0x10 << 12
    assert ready.device_queue.rings.layout == SplitLayout.legacy(0x10000, 128, 4096)
    assert dev.read(pci.QUEUE_PFN, 4) == 0x10
    assert dev.queues[1].device is ready.device_queue
    dev.write(pci.QUEUE_SEL, 2, 0)
    assert dev.read(pci.QUEUE_PFN, 4) == 0


def test_queue_pfn_gets_the_negotiated_features() -> None:
    _, dev = make(host=bit(F_RING_EVENT_IDX))
    dev.write(pci.GUEST_FEATURES, 4, bit(F_RING_EVENT_IDX))
    (ready,) = dev.write(pci.QUEUE_PFN, 4, 0x20)
    assert isinstance(ready, pci.QueueReady) and ready.device_queue.event_idx


@pytest.mark.parametrize("how", ["pfn0", "status0"])
def test_reset_clears_everything(how: str) -> None:
    _, dev = make(msix=3)
    dev.write(pci.GUEST_FEATURES, 4, 0xF0)
    dev.write(pci.STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER)
    dev.write(pci.QUEUE_PFN, 4, 0x10)
    dev.write(pci.QUEUE_VECTOR, 2, 1)
    dev.write(pci.CONFIG_VECTOR, 2, 0)
    dev.write(pci.QUEUE_SEL, 2, 1)
    dev.interrupt(0)
    effects = (dev.write(pci.QUEUE_PFN, 4, 0) if how == "pfn0"
               else dev.write(pci.STATUS, 1, 0))
    assert effects == [pci.Reset()]
    assert dev.read(pci.STATUS, 1) == 0
    assert dev.read(pci.GUEST_FEATURES, 4) == 0
    assert dev.read(pci.QUEUE_SEL, 2) == 0
    assert dev.read(pci.QUEUE_PFN, 4) == 0
    assert dev.read(pci.QUEUE_VECTOR, 2) == pci.NO_VECTOR
    assert dev.read(pci.CONFIG_VECTOR, 2) == pci.NO_VECTOR
    assert dev.read(pci.ISR, 1) == 0
    assert all(q.device is None for q in dev.queues)


def test_queue_notify_kicks_in_range_only() -> None:
    _, dev = make((256, 128))
    assert dev.write(pci.QUEUE_NOTIFY, 2, 1) == [pci.Kick(1)]
    assert dev.write(pci.QUEUE_NOTIFY, 2, 0) == [pci.Kick(0)]
    assert dev.write(pci.QUEUE_NOTIFY, 2, 2) == []
    assert dev.write(pci.QUEUE_NOTIFY, 2, 0xFFFF) == []


def test_status_write() -> None:
    _, dev = make()
    assert dev.write(pci.STATUS, 1, 1) == [pci.StatusChanged(0, 1)]
    assert dev.write(pci.STATUS, 1, 7) == [pci.StatusChanged(1, 7)]
    assert dev.read(pci.STATUS, 1) == 7


def test_isr_bits_and_read_clears() -> None:
    _, dev = make()
    assert dev.read(pci.ISR, 1) == 0
    assert dev.interrupt(0) == pci.NO_VECTOR  # no MSI-X: INTx
    assert dev.read(pci.ISR, 1) == pci.ISR_QUEUE
    assert dev.read(pci.ISR, 1) == 0
    dev.config_changed()
    dev.interrupt(1)
    assert dev.read(pci.ISR, 1) == pci.ISR_QUEUE | pci.ISR_CONFIG
    assert dev.read(pci.ISR, 1) == 0


def test_config_space_follows_the_registers() -> None:
    cfg = bytes(range(1, 9))
    _, plain = make(config=cfg)
    assert plain.read(20, 1) == 1
    assert plain.read(20, 4) == int.from_bytes(cfg[:4], "little")
    assert plain.read(26, 2) == int.from_bytes(cfg[6:8], "little")
    assert plain.read(27, 2) == 0xFFFF  # past the end
    _, msix = make(config=cfg, msix=2)
    assert msix.read(24, 2) == int.from_bytes(cfg[:2], "little")
    assert msix.write(25, 1, 0xAA) == [pci.ConfigWritten(1, 1, 0xAA)]
    assert msix.read(24, 2) == 0xAA01


def test_msix_vectors() -> None:
    _, dev = make(msix=3)
    dev.write(pci.CONFIG_VECTOR, 2, 0)
    assert dev.read(pci.CONFIG_VECTOR, 2) == 0
    dev.write(pci.QUEUE_SEL, 2, 1)
    dev.write(pci.QUEUE_VECTOR, 2, 2)
    assert dev.read(pci.QUEUE_VECTOR, 2) == 2
    dev.write(pci.QUEUE_VECTOR, 2, 3)  # no such vector
    assert dev.read(pci.QUEUE_VECTOR, 2) == pci.NO_VECTOR
    dev.write(pci.QUEUE_VECTOR, 2, 2)
    assert dev.interrupt(1) == 2
    assert dev.config_changed() == 0
    assert dev.read(pci.ISR, 1) == pci.ISR_QUEUE | pci.ISR_CONFIG


def test_no_vector_registers_without_msix() -> None:
    _, dev = make(config=b"\x11\x22\x33\x44")
    dev.write(pci.CONFIG_VECTOR, 2, 0x1234)  # a config write at offset 0 instead
    assert dev.read(pci.CONFIG_VECTOR, 2) == 0x1234
    assert dev.config[:2] == b"\x34\x12"


def test_bad_accesses() -> None:
    _, dev = make()
    with pytest.raises(PeerError):
        dev.read(0, 3)
    with pytest.raises(PeerError):
        dev.write(0, 8, 0)
    assert dev.read(pci.QUEUE_NUM, 4) == 0xFFFF_FFFF  # wrong width: nothing there
    assert dev.read(1, 1) == 0xFF
    assert dev.write(pci.STATUS, 2, 0) == []  # not the STATUS register: no reset
    assert dev.read(1000, 4) == 0xFFFF_FFFF


def test_pfn_outside_memory_needs_reset() -> None:
    _, dev = make()
    assert dev.write(pci.QUEUE_PFN, 4, (MEM >> 12) + 5) == []
    assert dev.queues[0].device is None
    assert dev.read(pci.STATUS, 1) & Status.NEEDS_RESET
    assert dev.read(pci.ISR, 1) == pci.ISR_CONFIG


# ---------------------------------------------------------------- driver side
def driver_for(dev: pci.LegacyPciDevice, mem: GuestMemory, msix: bool = False
               ) -> tuple[RecordingBus, pci.LegacyPciDriver]:
    bus = RecordingBus(dev)
    return bus, pci.LegacyPciDriver(bus, mem, BumpAllocator(0x1000, MEM), msix=msix)


def test_setup_vq_sequence_like_linux() -> None:
    mem, dev = make((256, 128))
    mem.translate(0x1000, 0x10000)[:] = b"\xee" * 0x10000  # setup_vq must zero its rings
    bus, drv = driver_for(dev, mem)
    vq = drv.setup_vq(1)
    size = pci.legacy_ring_bytes(128)
    assert size == (vring_size(128, 4096) + 4095) & ~4095
    addr = dev.queues[1].pfn << 12
    assert bus.log == [("w", pci.QUEUE_SEL, 2, 1), ("r", pci.QUEUE_NUM, 2, 128),
                       ("r", pci.QUEUE_PFN, 4, 0), ("w", pci.QUEUE_PFN, 4, addr >> 12)]
    assert addr % 4096 == 0
    assert mem.read(addr, size) == bytes(size)
    assert vq.num == 128 and vq.rings.layout == SplitLayout.legacy(addr, 128, 4096)


def test_setup_vq_refuses_active_or_missing_queue() -> None:
    mem, dev = make((64,))
    _, drv = driver_for(dev, mem)
    drv.setup_vq(0)
    with pytest.raises(pci.VqSetupError) as e:
        drv.setup_vq(0)
    assert e.value.errno == errno.ENOENT
    mem2, none = make(())
    _, drv2 = driver_for(none, mem2)
    with pytest.raises(pci.VqSetupError) as e2:
        drv2.setup_vq(0)
    assert e2.value.errno == errno.ENOENT


def test_setup_vq_of_a_queue_the_device_lacks_is_enoent() -> None:
    # Linux's virtio_pci_legacy find_vqs probes queues until setup_vq says ENOENT.
    mem, dev = make((64, 64))
    _, drv = driver_for(dev, mem)
    for missing in (2, 5):
        with pytest.raises(pci.VqSetupError) as e:
            drv.setup_vq(missing)
        assert e.value.errno == errno.ENOENT
        assert all(q.pfn == 0 and q.device is None for q in dev.queues)
    drv.setup_vq(1)
    assert dev.queues[1].device is not None and dev.queues[0].device is None


@pytest.mark.parametrize(("ring_addr", "err"), [(0, errno.EINVAL), (1 << 44, errno.E2BIG),
                                                 ((1 << 45) + (1 << 20), errno.E2BIG)])
def test_setup_vq_refuses_a_ring_the_pfn_register_cannot_hold(ring_addr: int, err: int) -> None:
    # QUEUE_PFN holds 32 bits of 4096-byte pages: a ring in page 0 would read as
    # "reset", one at or above 2**44 would be truncated to another address
    # (Linux's legacy setup_vq refuses q_pfn >> 32 with E2BIG).
    mem, dev = make((64,))
    bus = RecordingBus(dev)
    drv = pci.LegacyPciDriver(bus, mem, BumpAllocator(ring_addr, ring_addr + MEM))
    with pytest.raises(pci.VqSetupError) as e:
        drv.setup_vq(0)
    assert e.value.errno == err
    assert not any(k == "w" and o == pci.QUEUE_PFN for (k, o, _w, _v) in bus.log)
    assert dev.queues[0].pfn == 0 and dev.read(pci.STATUS, 1) == 0


def test_setup_vq_msix_vector_checked() -> None:
    mem, dev = make((64, 64), msix=2)
    bus, drv = driver_for(dev, mem, msix=True)
    drv.setup_vq(0, msix_vector=1)
    assert dev.queues[0].vector == 1
    assert bus.log[-2:] == [("w", pci.QUEUE_VECTOR, 2, 1), ("r", pci.QUEUE_VECTOR, 2, 1)]
    with pytest.raises(pci.VqSetupError) as e:
        drv.setup_vq(1, msix_vector=5)
    assert e.value.errno == errno.EBUSY
    assert bus.log[-1] == ("w", pci.QUEUE_PFN, 4, 0)  # deactivated, which resets the device
    assert dev.queues[0].pfn == 0 and dev.queues[1].pfn == 0


def test_negotiation_and_status_sequence() -> None:
    mem, dev = make(host=0b1011)
    dev.write(pci.STATUS, 1, Status.FAILED)
    bus, drv = driver_for(dev, mem)
    assert drv.negotiate(0b0110) == 0b0010
    drv.setup_vq(0)
    drv.driver_ok()
    writes = [(o, v) for (k, o, _w, v) in bus.log if k == "w" and o in (pci.STATUS,
                                                                        pci.GUEST_FEATURES)]
    assert writes == [(pci.STATUS, 0), (pci.STATUS, Status.ACKNOWLEDGE),
                      (pci.STATUS, Status.ACKNOWLEDGE | Status.DRIVER),
                      (pci.GUEST_FEATURES, 0b0010),
                      (pci.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)]
    assert dev.guest_features == 0b0010
    assert dev.status == Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK


def test_driver_and_device_share_the_ring() -> None:
    mem, dev = make((16,))
    _, drv = driver_for(dev, mem)
    drv.negotiate(0)
    vq = drv.setup_vq(0)
    drv.notify(0)
    assert isinstance(drv.bus, pci.DirectBus) and drv.bus.effects[-1] == pci.Kick(0)
    mem.write(0x100000, b"hello")
    vq.add([(0x100000, 5)], [(0x100010, 8)], "tok")
    devq = dev.queues[0].device
    assert devq is not None
    elem = devq.pop()
    assert elem is not None and bytes(elem.readable[0]) == b"hello"
    elem.writable[0][:3] = b"abc"
    devq.push(elem.head, 3)
    assert vq.get_buf() == ("tok", 3)
    assert mem.read(0x100010, 3) == b"abc"
    assert drv.config_read(0, 1) == 1
