"""virtio-input (VIRTIO 1.2 §5.8): a keyboard served over vhost-user (``pyvirtio-input``).

:class:`InputDevice` answers the configuration select/subsel queries, fills
the event queue with the events :meth:`InputDevice.send` queues and logs the
status queue (LED changes); :mod:`.codes` has the evdev numbers and a US
keymap, :mod:`.control` the control socket and the stdin typer.
"""

from pyvirtio.devices.input.codes import KEYMAP, text_events
from pyvirtio.devices.input.control import type_text
from pyvirtio.devices.input.device import InputDevice, keyboard_config

__all__ = ["KEYMAP", "InputDevice", "keyboard_config", "text_events", "type_text"]
