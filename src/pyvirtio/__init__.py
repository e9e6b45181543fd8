"""pyvirtio: virtio (VIRTIO 1.2) in Python, driver and device side.

Layers, imports pointing down: ``cli`` → ``devices`` → ``transports`` → ``io``
→ ``core``.  Start with :mod:`pyvirtio.core` (split rings, §2.7) and the README.
"""

__version__ = "0.1.0"
