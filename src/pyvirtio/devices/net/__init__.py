"""virtio-net (VIRTIO 1.2 §5.1): header codec, a loopback device model, and a driver.

* :mod:`~pyvirtio.devices.net.spec`: feature bits (§5.1.3), the device
  configuration (§5.1.4) and the ``virtio_net_hdr`` (§5.1.6), 10 or 12 bytes;
* :mod:`~pyvirtio.devices.net.device`: the device model on the device kit,
  whose frames go to a port (loopback, a switch port, a TAP);
* :mod:`~pyvirtio.devices.net.driver`: the driver side, keeping the receive
  queue filled (Linux ``try_fill_recv``) and reclaiming transmit buffers late
  (Linux ``free_old_xmit``).
"""

from pyvirtio.devices.net.device import NetDevice, NetStats
from pyvirtio.devices.net.driver import NetDriver
from pyvirtio.devices.net.spec import RX_QUEUE, TX_QUEUE, NetHdr, hdr_size

__all__ = ["RX_QUEUE", "TX_QUEUE", "NetDevice", "NetDriver", "NetHdr", "NetStats", "hdr_size"]
