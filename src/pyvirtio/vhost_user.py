"""vhost-user in both roles, and the device kit: the names a user imports.

Serve a device (back end)::

    from pyvirtio.vhost_user import Device, DeviceId, serve

    class Echo(Device):
        device_id = DeviceId.CONSOLE
        def handle(self, queue, req):
            return req.write(req.read())

    serve(Echo(), socket_path="/tmp/echo.sock")

Drive a back end (front end): :class:`VhostUserFrontend`.  The device kit is
documented in :mod:`pyvirtio.transports.device` and docs/device-kit.md; the
protocol in QEMU docs/interop/vhost-user.rst.
"""

from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError
from pyvirtio.core.spec import DeviceId
from pyvirtio.io.loop import EventLoop, Timer
from pyvirtio.transports.device import (
    DEFERRED,
    Deferred,
    Device,
    DeviceProtocol,
    Request,
    VirtQueue,
    offered_features,
)
from pyvirtio.transports.vhost_user.frontend import (
    FrontendQueue,
    VhostUserFrontend,
    VhostUserRefused,
)
from pyvirtio.transports.vhost_user.program import BackendProgram, serve
from pyvirtio.transports.vhost_user.server import VhostUserServer
from pyvirtio.transports.vhost_user.session import VhostUserSession

__all__ = [
    "DEFERRED",
    "BackendProgram",
    "CallerError",
    "Deferred",
    "Device",
    "DeviceId",
    "DeviceProtocol",
    "EventLoop",
    "FrontendQueue",
    "PeerError",
    "QueueBrokenError",
    "Request",
    "Timer",
    "VhostUserFrontend",
    "VhostUserRefused",
    "VhostUserServer",
    "VhostUserSession",
    "VirtQueue",
    "offered_features",
    "serve",
]
