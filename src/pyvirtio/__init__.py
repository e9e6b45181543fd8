"""pyvirtio: virtio (VIRTIO 1.2) in Python, driver and device side.

Layers, imports pointing down: ``cli`` → ``devices`` → ``transports`` → ``io``
→ ``core``.  Start with :mod:`pyvirtio.core` (split rings, §2.7) and the README.
The ring's hot paths are compiled with mypyc at install time; see
:mod:`pyvirtio._build` for running them interpreted.
"""

from typing import TYPE_CHECKING

from pyvirtio._build import install_docstring_loader, install_source_finder, pure_python_requested

if pure_python_requested():
    install_source_finder()
else:
    install_docstring_loader()

__version__ = "0.1.0"

# The public names, imported on first use (PEP 562) so that ``import
# pyvirtio.core`` stays free of sockets and selectors.
_LAZY = {
    **dict.fromkeys(
        ["BumpAllocator", "CallerError", "Element", "GuestMemory", "PeerError", "QueueFull",
         "RingViews", "SplitDeviceQueue", "SplitDriverQueue", "SplitLayout"],
        "pyvirtio.core"),
    **dict.fromkeys(
        ["DEFERRED", "BackendProgram", "Device", "DeviceId", "DeviceProtocol", "EventLoop",
         "Request", "VhostUserFrontend", "VhostUserServer", "VirtQueue", "serve"],
        "pyvirtio.vhost_user"),
}

__all__ = [
    "DEFERRED",
    "BackendProgram",
    "BumpAllocator",
    "CallerError",
    "Device",
    "DeviceId",
    "DeviceProtocol",
    "Element",
    "EventLoop",
    "GuestMemory",
    "PeerError",
    "QueueFull",
    "Request",
    "RingViews",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "SplitLayout",
    "VhostUserFrontend",
    "VhostUserServer",
    "VirtQueue",
    "__version__",
    "serve",
]

if TYPE_CHECKING:  # what the lazy names are, for type checkers
    from pyvirtio.core import (
        BumpAllocator,
        CallerError,
        Element,
        GuestMemory,
        PeerError,
        QueueFull,
        RingViews,
        SplitDeviceQueue,
        SplitDriverQueue,
        SplitLayout,
    )
    from pyvirtio.vhost_user import (
        DEFERRED,
        BackendProgram,
        Device,
        DeviceId,
        DeviceProtocol,
        EventLoop,
        Request,
        VhostUserFrontend,
        VhostUserServer,
        VirtQueue,
        serve,
    )


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyvirtio' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
