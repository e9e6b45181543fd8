"""The two-process guest/host demo and the speed duel (VIRTIO 1.2 §2.7.7, §2.7.10).

* :mod:`~pyvirtio.demo.host` runs the device side (the VMM): the legacy
  virtio-pci register model and a virtio-net loopback device, serving a
  guest process that runs the driver;
* :mod:`~pyvirtio.demo.guest` is the guest process (``python -m
  pyvirtio.demo.guest``): register accesses become socket messages (VM
  exits), kicks go through ioeventfds, interrupts arrive through irqfds;
* :mod:`~pyvirtio.demo.duel` sweeps the speed ratio of a driver and a device
  process and counts kicks and interrupts per 1,000 buffers.
"""
