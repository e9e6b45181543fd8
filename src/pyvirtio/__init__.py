"""pyvirtio: virtio (VIRTIO 1.2) in Python, driver and device side.

Layers, imports pointing down: ``cli`` → ``devices`` → ``transports`` → ``io``
→ ``core``.  Start with :mod:`pyvirtio.core` (split rings, §2.7) and the README.
The ring's hot paths are compiled with mypyc at install time; see
:mod:`pyvirtio._build` for running them interpreted.
"""

from pyvirtio._build import install_source_finder, pure_python_requested

if pure_python_requested():
    install_source_finder()

__version__ = "0.1.0"
