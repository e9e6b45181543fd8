"""virtio-blk, VIRTIO 1.2 §5.2: spec constants, request parsing, file back end,
the device model (vhost-user back end) and the driver (front end)."""

from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.devices.blk.file_store import FileStore
from pyvirtio.devices.blk.spec import BlkConfig, BlkFeature, ReqType, Status

__all__ = ["BlkConfig", "BlkDevice", "BlkFeature", "FileStore", "ReqType", "Status"]
