"""Test harness: a virtio-blk driver and device on the same guest memory, no sockets.

Each queue is a core SplitDriverQueue and a SplitDeviceQueue over the same
ring bytes; the driver's kick runs the device's ``process_queue`` right away
and the device's interrupt decision signals a real call eventfd.
"""

from __future__ import annotations

from pyvirtio.core.layout import RingViews, SplitLayout, avail_ring_size, used_ring_size
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_VERSION_1
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.core.split_driver import SplitDriverQueue
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.devices.blk.driver import DRIVER_FEATURES, BlkDriver
from pyvirtio.devices.blk.spec import CONFIG_SIZE_WRITE_ZEROES, BlkConfig
from pyvirtio.io.eventfd import EventFd
from pyvirtio.transports.device import offered_features


class LoopKick:
    def __init__(self, port: LoopPort) -> None:
        self.port = port
        self.count = 0

    def signal(self) -> None:
        self.count += 1
        p = self.port
        n = p.device.process_queue(p.index, p.dev_queue)
        if n and p.dev_queue.should_notify():
            p.call.signal()


class LoopPort:
    def __init__(self, memory: GuestMemory, alloc: BumpAllocator, device: BlkDevice,
                 index: int, num: int, features: int) -> None:
        desc = alloc.alloc(16 * num, 16)
        avail = alloc.alloc(avail_ring_size(num), 2)
        used = alloc.alloc(used_ring_size(num), 4)
        layout = SplitLayout.modern(num, desc, avail, used)
        self.memory = memory
        self.device = device
        self.index = index
        self.queue = SplitDriverQueue(RingViews.map(memory, layout), features)
        self.dev_queue = SplitDeviceQueue(RingViews.map(memory, layout), memory, features)
        self.kick = LoopKick(self)
        self.call = EventFd()


def make_loop(device: BlkDevice, num: int = 64, max_io: int = 64 * 1024,
              mem_size: int = 32 << 20) -> tuple[BlkDriver, list[LoopPort]]:
    memory = GuestMemory.anonymous(mem_size)
    alloc = BumpAllocator(0x1000, mem_size)
    features = offered_features(device.device_features) & (
        DRIVER_FEATURES | 1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX)
    device.set_features(features)
    config = BlkConfig.unpack(device.get_config(0, CONFIG_SIZE_WRITE_ZEROES))
    ports = [LoopPort(memory, alloc, device, i, num, features)
             for i in range(device.num_queues)]
    drv = BlkDriver(ports, memory, alloc.alloc, features, config, max_io=max_io, timeout=5)
    return drv, ports
