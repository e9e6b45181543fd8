"""Where a virtio-net device's frames go: a learning switch, or a Linux TAP interface.

A port connects :attr:`NetDevice.uplink <pyvirtio.devices.net.device.NetDevice.uplink>`
(frames the driver transmitted) to something, and hands frames for the
driver to :meth:`NetDevice.deliver`.  The third port, loopback, is
:meth:`NetDevice.loopback` itself.

* :class:`Switch` — an L2 learning switch between devices of one process
  (IEEE 802.1D forwarding without spanning tree or ageing): a source MAC is
  learned on the port it came from; a frame to a known unicast MAC goes to
  that port only; broadcasts, multicasts and unknown destinations flood to
  every other port.  A port with no front end drops (the device counts it).
* :class:`TapPort` — a Linux TAP interface (``/dev/net/tun``, ``IFF_TAP |
  IFF_NO_PI | IFF_VNET_HDR``).  With ``IFF_VNET_HDR`` every frame read or
  written carries a ``struct virtio_net_hdr`` (Linux include/uapi/linux/
  virtio_net.h, the same layout as VIRTIO 1.2 §5.1.6), so the guest's
  checksum and segmentation offloads go through unchanged: the device offers
  CSUM, GUEST_CSUM, HOST_TSO4/6 and GUEST_TSO4/6, and once the driver has
  chosen, the TAP is told the header size (``TUNSETVNETHDRSZ``: 10 or 12)
  and which offloads it may hand us (``TUNSETOFFLOAD``: only what the driver
  accepts on receive).  ``offloads=False`` opens it without the header and
  offers none, as the switch ports do.  Opened by name: an existing
  (persistent) interface is attached to and left as it was; a missing one is
  created for the life of the process and disappears when it ends.  Its fd
  is one more reader on the process's event loop.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import struct
from typing import TYPE_CHECKING

from pyvirtio.core.errors import CallerError
from pyvirtio.devices.net.device import NetDevice
from pyvirtio.devices.net.spec import F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, hdr_size

if TYPE_CHECKING:
    from pyvirtio.devices.net.bursts import FrameBatch
from pyvirtio.io.loop import EventLoop

__all__ = ["Switch", "TapPort"]

log = logging.getLogger("pyvirtio.net")

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFNAMSIZ = 16
#: The group (multicast/broadcast) bit of a MAC address as a 48-bit integer.
_GROUP = 1 << 40
_READ_SIZE = 65536 + 64
#: Frames read from the TAP per loop round, so one busy port cannot starve the rest.
_READ_BUDGET = 256


class Switch:
    """A learning switch joining the :class:`NetDevice` ports added to it."""

    def __init__(self, name: str = "switch") -> None:
        self.name = name
        self.ports: list[NetDevice] = []
        #: Learned MAC address (a big-endian 48-bit integer) -> port.
        self.table: dict[int, NetDevice] = {}
        self.flooded = 0

    def add(self, port: NetDevice) -> NetDevice:
        self.ports.append(port)
        port.uplink = functools.partial(self.forward, port)
        port.uplink_batch = functools.partial(self.forward_batch, port)
        return port

    def forget(self, port: NetDevice) -> None:
        """The port's front end left: the addresses behind it are unknown again."""
        for mac in [m for m, p in self.table.items() if p is port]:
            del self.table[mac]

    def forward(self, source: NetDevice, frame: bytes) -> bool:
        """Forward one frame that ``source`` transmitted; never refuses (drops are counted)."""
        src = int.from_bytes(frame[6:12], "big")
        if not src & _GROUP:
            self.table[src] = source
        dst = int.from_bytes(frame[:6], "big")
        if dst & _GROUP or dst not in self.table:
            self.flooded += 1
        for port in self._targets(source, dst):
            port.deliver(frame)
        return True

    def forward_batch(self, source: NetDevice, batch: FrameBatch) -> int:
        """:meth:`forward` for a transmit burst, in order; a frame is copied out of
        guest memory only if some port takes it (a sink's never are)."""
        table = self.table
        for src, _count in batch.counts(batch.src):  # learned once per address, not per frame
            if not src & _GROUP:
                table[src] = source
        targets: dict[int, list[NetDevice]] = {}
        for dst, count in batch.counts(batch.dst):
            if dst & _GROUP or dst not in table:
                self.flooded += count
            targets[dst] = self._targets(source, dst)
        if any(targets.values()):  # else nowhere to go: a sink, or a switch of one
            for i, dst in enumerate(batch.dst.tolist()):
                ports = targets[dst]
                if ports:
                    frame = batch.frame(i)
                    for port in ports:
                        port.deliver(frame)
        return len(batch)

    def _targets(self, source: NetDevice, dst: int) -> list[NetDevice]:
        """The ports a frame from ``source`` to ``dst`` goes to: the learned one, else all
        others (a flood)."""
        out = None if dst & _GROUP else self.table.get(dst)
        if out is not None:
            return [] if out is source else [out]
        return [port for port in self.ports if port is not source]


def _open_tap(name: str, vnet_hdr: bool) -> int:
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise CallerError(f"{name!r} is not an interface name (1..15 characters, no '/')")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CallerError(f"cannot open /dev/net/tun for TAP {name}: {exc.strerror} "
                          f"(load the tun module; it needs CAP_NET_ADMIN)") from None
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        hint = (" (it exists with other flags, or belongs to another user)"
                if exc.errno in (errno.EINVAL, errno.EBUSY, errno.EPERM) else "")
        raise CallerError(f"cannot attach to TAP {name}: {exc.strerror}{hint}") from None
    return fd


class TapPort:
    """One :class:`NetDevice` bridged to the TAP interface ``name``."""

    def __init__(self, name: str, device: NetDevice, offloads: bool = True) -> None:
        self.name = name
        self.existed = os.path.exists(f"/sys/class/net/{name}")
        self.fd = _open_tap(name, offloads)
        self.device = device
        self.loop: EventLoop | None = None
        #: Bytes of virtio_net_hdr before each frame on the fd (0: opened without it).
        self.hdr_len = 10 if offloads else 0
        device.uplink = self.write
        device.attach_hooks.append(self.attach)
        if offloads:
            device.offer_offloads()
            device.feature_hooks.append(self._features)
        self.write_drops = 0

    def _features(self, features: int) -> None:
        """The driver chose: the header size it uses, and what the TAP may send it."""
        hdr_len = hdr_size(features)
        tun = 0
        if features >> F_GUEST_CSUM & 1:
            tun |= TUN_F_CSUM
            if features >> F_GUEST_TSO4 & 1:
                tun |= TUN_F_TSO4
            if features >> F_GUEST_TSO6 & 1:
                tun |= TUN_F_TSO6
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", hdr_len))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, tun)
        except OSError as exc:
            # Frames would be misparsed: better none than wrong ones.
            log.error("TAP %s: cannot set the virtio_net_hdr size %d / offloads %#x: %s",
                      self.name, hdr_len, tun, exc.strerror)
            raise
        self.hdr_len = hdr_len
        log.info("TAP %s: virtio_net_hdr of %d bytes, offloads to the guest %#x",
                 self.name, hdr_len, tun)

    def attach(self, loop: EventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.fd, self._on_readable)

    def write(self, frame: bytes) -> bool:
        if self.hdr_len and frame[1]:  # the guest's header asks the kernel to segment
            self.device.stats.tx_gso += 1
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            self.device.stats.drops["tap_full"] += 1
        except OSError as exc:
            # EIO while the interface is down: the frame had nowhere to go.
            self.device.stats.drops[f"tap_{errno.errorcode.get(exc.errno or 0, 'error')}"] += 1
        return True

    def _on_readable(self) -> None:
        deliver = self.device.deliver
        hdr = self.hdr_len
        for _ in range(_READ_BUDGET):
            try:
                frame = os.read(self.fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("TAP %s: read failed: %s", self.name, exc)
                return
            if not frame:
                return
            if hdr:
                if len(frame) <= hdr:
                    continue
                if frame[1]:
                    self.device.stats.rx_gso += 1
                deliver(frame[hdr:], frame[:10])
            else:
                deliver(frame)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.fd)
            self.loop = None
        os.close(self.fd)
