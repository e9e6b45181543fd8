"""pyvirtio.core: the sans-I/O heart — spec constants, layouts, guest memory, split rings.

Nothing in this package does I/O: no sockets, selectors, asyncio or fds
(``tests/test_core_sans_io.py`` enforces it).  A notification is a decision
returned to the caller.
"""

from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError, QueueFull, VirtioError
from pyvirtio.core.layout import RingViews, SplitLayout, vring_size
from pyvirtio.core.memory import BumpAllocator, GuestMemory, Region
from pyvirtio.core.notify import vring_need_event
from pyvirtio.core.split_device import Element, SplitDeviceQueue
from pyvirtio.core.split_driver import IndirectArea, SplitDriverQueue

__all__ = [
    "BumpAllocator",
    "CallerError",
    "Element",
    "GuestMemory",
    "IndirectArea",
    "PeerError",
    "QueueBrokenError",
    "QueueFull",
    "Region",
    "RingViews",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "SplitLayout",
    "VirtioError",
    "vring_need_event",
    "vring_size",
]
