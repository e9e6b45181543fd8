"""A virtio input device (VIRTIO 1.2 §5.8) on the device kit: a keyboard by default.

* Configuration (§5.8.2, §5.8.5): the driver writes ``select`` and ``subsel``
  and reads ``size`` and ``u``.  QEMU's vhost-user-input forwards every such
  write as SET_CONFIG (the whole 136-byte space at offset 0) and every read as
  GET_CONFIG, so the device keeps only the two selector bytes and answers
  each read from a table: ID_NAME, ID_SERIAL, ID_DEVIDS, PROP_BITS, EV_BITS
  per event type, ABS_INFO; whatever is not in the table has size 0.
* eventq (queue 0, §5.8.6.1): :meth:`InputDevice.send` queues events; they
  fill the driver's 8-byte buffers as it posts them, in order.  While the
  driver has posted none (or no driver is there) they wait, up to
  ``backlog`` events; a batch that does not fit is dropped whole (a key
  pressed and never released would be worse) and counted in ``dropped``.
* statusq (queue 1, §5.8.6.2): events from the driver — LED changes,
  autorepeat settings — are logged, counted and the LEDs remembered.
* A control socket (``control_socket``) and ``--stdin`` type text:
  see :mod:`pyvirtio.devices.input.control`.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Iterable, Mapping

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.spec import DeviceId
from pyvirtio.devices.input import codes
from pyvirtio.devices.input.codes import Event
from pyvirtio.devices.input.control import ControlSocket, StdinTyper
from pyvirtio.io.loop import EventLoop
from pyvirtio.transports.device import Device, VirtQueue

__all__ = ["CONFIG_SIZE", "EVENT", "InputDevice", "keyboard_config"]

log = logging.getLogger("pyvirtio.input")

#: struct virtio_input_event (§5.8.6): le16 type, le16 code, le32 value.
EVENT = struct.Struct("<HHi")
#: select, subsel, size, reserved[5], then the 128-byte union (§5.8.2).
CONFIG_SIZE = 136
_PAYLOAD_MAX = 128
EVENTQ, STATUSQ = 0, 1

Config = Mapping[tuple[int, int], bytes]


def bitmap(bits: Iterable[int]) -> bytes:
    """A ``u.bitmap`` with ``bits`` set (bit n is byte n // 8, bit n % 8), no trailing zeros."""
    out = bytearray(_PAYLOAD_MAX)
    for b in bits:
        out[b // 8] |= 1 << (b % 8)
    return bytes(out).rstrip(b"\0")


def keyboard_config(name: str = "pyvirtio keyboard", serial: str = "pyvirtio-kbd",
                    ids: tuple[int, int, int, int] = (codes.BUS_VIRTUAL, 0x5056, 0x4B42, 1)
                    ) -> dict[tuple[int, int], bytes]:
    """The configuration answers of a keyboard: ESC..F12, LEDs, autorepeat, no axes.

    ``ids``: bustype, vendor, product, version (ID_DEVIDS).
    """
    for what, text in (("name", name), ("serial", serial)):
        if not text.isascii() or not 0 < len(text) <= _PAYLOAD_MAX:
            raise CallerError(f"{what} {text!r}: use 1..{_PAYLOAD_MAX} ASCII characters")
    return {
        (codes.CFG_ID_NAME, 0): name.encode(),
        (codes.CFG_ID_SERIAL, 0): serial.encode(),
        (codes.CFG_ID_DEVIDS, 0): struct.pack("<4H", *ids),
        # PROP_BITS: a keyboard has no input properties (size 0); ABS_INFO: no axes.
        (codes.CFG_EV_BITS, codes.EV_SYN): bitmap([codes.SYN_REPORT]),
        (codes.CFG_EV_BITS, codes.EV_KEY): bitmap(range(codes.KEY_ESC, codes.KEY_F12 + 1)),
        (codes.CFG_EV_BITS, codes.EV_LED): bitmap(codes.LED_NAMES),
        (codes.CFG_EV_BITS, codes.EV_REP): bitmap([codes.REP_DELAY, codes.REP_PERIOD]),
    }


class InputDevice(Device):
    """virtio-input: configuration answered from ``config``, events sent with :meth:`send`."""

    device_id: int = DeviceId.INPUT
    num_queues = 2

    def __init__(self, config: Config | None = None, *, backlog: int = 4096,
                 control_socket: str | None = None, stdin: bool = False) -> None:
        self.answers = dict(keyboard_config() if config is None else config)
        for key, payload in self.answers.items():
            if len(payload) > _PAYLOAD_MAX:
                raise CallerError(f"config answer {key} is {len(payload)} bytes (at most 128)")
        self.select = self.subsel = 0
        self.backlog = backlog
        self.pending: deque[bytes] = deque()
        self.eventq: VirtQueue | None = None
        #: Events sent to the driver, dropped (backlog full), and status events received.
        self.delivered = self.dropped = self.status_events = 0
        #: LED code -> lit, as the driver last set it (statusq).
        self.leds: dict[int, bool] = {}
        self.control_socket = control_socket
        self.stdin = stdin
        self._inputs: list[ControlSocket | StdinTyper] = []

    def __repr__(self) -> str:
        name = self.answers.get((codes.CFG_ID_NAME, 0), b"").decode()
        return f"InputDevice({name!r})"

    def attach(self, loop: EventLoop) -> None:
        super().attach(loop)
        if self.control_socket is not None:
            self._inputs.append(ControlSocket(self, self.control_socket, loop))
        if self.stdin:
            self._inputs.append(StdinTyper(self, loop))

    def close(self) -> None:
        """Close the control socket and stop reading stdin."""
        for source in self._inputs:
            source.close()
        if self._inputs:
            log.info("input: %d events delivered, %d waiting for buffers, %d dropped",
                     self.delivered, len(self.pending), self.dropped)
        self._inputs.clear()

    # ------------------------------------------------------------ config space
    def get_config(self, offset: int, size: int) -> bytes:
        payload = self.answers.get((self.select, self.subsel), b"")
        space = bytes([self.select, self.subsel, len(payload)]) + bytes(5) + payload
        space = space.ljust(CONFIG_SIZE, b"\0")
        chunk = space[offset:offset + size] if offset >= 0 else b""
        return chunk.ljust(max(size, 0), b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        # Only select (byte 0) and subsel (byte 1) are the driver's to write;
        # QEMU sends the whole space back with them, the rest is ignored.
        for pos in (0, 1):
            if offset <= pos < offset + len(data):
                value = data[pos - offset]
                if pos == 0:
                    self.select = value
                else:
                    self.subsel = value

    # ------------------------------------------------------------------ events
    def send(self, events: Iterable[Event]) -> int:
        """Queue ``events`` for the driver as one batch; returns how many were queued.

        The batch is dropped whole (and counted) if the backlog cannot take it.
        Call it on the serving loop's thread (from another thread:
        ``device.loop.call_soon_threadsafe``).
        """
        packed = [EVENT.pack(t, c, v) for t, c, v in events]
        if len(self.pending) + len(packed) > self.backlog:
            self.dropped += len(packed)
            log.warning("input: backlog full (%d events waiting for the driver's buffers): "
                        "dropped %d events (%d so far)", len(self.pending), len(packed),
                        self.dropped)
            return 0
        self.pending.extend(packed)
        if self.eventq is not None:
            self.eventq.kick()
        return len(packed)

    def type_text(self, text: str) -> int:
        """Type ``text`` on the keyboard (a US layout); returns the events queued.

        Raises ValueError for a character the keymap has no key for (nothing is typed).
        """
        return self.send(codes.text_events(text))

    # ------------------------------------------------------------------ queues
    def queue_ready(self, queue: VirtQueue) -> None:
        if queue.index == EVENTQ:
            self.eventq = queue

    def queue_stopped(self, queue: VirtQueue) -> None:
        if queue is self.eventq:
            self.eventq = None

    def reset(self) -> None:
        super().reset()
        self.select = self.subsel = 0
        self.pending.clear()  # typed for the guest that left

    def process(self, queue: VirtQueue) -> None:
        if queue.index == EVENTQ:
            # Take buffers only for events there are: the rest stay posted.
            while self.pending and (req := queue.pop()) is not None:
                if req.writable_len < EVENT.size or req.readable:
                    raise PeerError(f"eventq buffer of {req.writable_len} writable bytes "
                                    f"(an event is {EVENT.size}, VIRTIO 1.2 §5.8.6.1)")
                queue.complete(req, req.write(self.pending.popleft()))
                self.delivered += 1
            return
        while (req := queue.pop()) is not None:
            data = req.read()
            if len(data) < EVENT.size:
                raise PeerError(f"statusq buffer of {len(data)} bytes (an event is "
                                f"{EVENT.size}, VIRTIO 1.2 §5.8.6.2)")
            self._status(*EVENT.unpack_from(data))
            queue.complete(req, 0)

    def _status(self, type_: int, code: int, value: int) -> None:
        self.status_events += 1
        if type_ == codes.EV_LED:
            self.leds[code] = bool(value)
            log.info("input: LED %s %s", codes.LED_NAMES.get(code, code),
                     "on" if value else "off")
        elif type_ == codes.EV_REP:
            log.info("input: autorepeat %s %d ms", codes.REP_NAMES.get(code, code), value)
        else:
            log.info("input: status event %s code %d value %d",
                     codes.EVENT_NAMES.get(type_, type_), code, value)
