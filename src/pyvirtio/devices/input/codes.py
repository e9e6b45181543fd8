"""The numbers virtio-input carries, and a US keyboard layout.

VIRTIO 1.2 §5.8.2 (configuration ``select`` values, ``virtio_input_devids``)
and §5.8.6 (events are Linux evdev events: the type and code values of
Linux include/uapi/linux/input-event-codes.h).  :func:`text_events` turns
text into the key presses and releases a US keyboard makes for it.
"""

from __future__ import annotations

from typing import Final

# §5.8.2: what the driver selects in the configuration space.
CFG_UNSET: Final = 0x00
CFG_ID_NAME: Final = 0x01
CFG_ID_SERIAL: Final = 0x02
CFG_ID_DEVIDS: Final = 0x03
CFG_PROP_BITS: Final = 0x10
CFG_EV_BITS: Final = 0x11
CFG_ABS_INFO: Final = 0x12

# Event types and codes (input-event-codes.h).
EV_SYN: Final = 0x00
EV_KEY: Final = 0x01
EV_LED: Final = 0x11
EV_REP: Final = 0x14
SYN_REPORT: Final = 0
REP_DELAY: Final = 0
REP_PERIOD: Final = 1
BUS_VIRTUAL: Final = 0x06

KEY_ESC: Final = 1
KEY_TAB: Final = 15
KEY_ENTER: Final = 28
KEY_LEFTSHIFT: Final = 42
KEY_SPACE: Final = 57
KEY_CAPSLOCK: Final = 58
KEY_F12: Final = 88

EVENT_NAMES: Final = {EV_SYN: "EV_SYN", EV_KEY: "EV_KEY", EV_LED: "EV_LED", EV_REP: "EV_REP"}
LED_NAMES: Final = {0: "num lock", 1: "caps lock", 2: "scroll lock", 3: "compose", 4: "kana"}
REP_NAMES: Final = {REP_DELAY: "delay", REP_PERIOD: "period"}

# The rows of a US keyboard: the unshifted characters and the code of the first key.
_ROWS = (("1234567890-=", 2), ("qwertyuiop[]", 16), ("asdfghjkl;'`", 30), ("\\zxcvbnm,./", 43))
_SHIFTED = dict(zip("1234567890-=[];'`\\,./", "!@#$%^&*()_+{}:\"~|<>?", strict=True))


def _keymap() -> dict[str, tuple[int, bool]]:
    keys = {" ": (KEY_SPACE, False), "\n": (KEY_ENTER, False), "\t": (KEY_TAB, False)}
    for row, first in _ROWS:
        for i, ch in enumerate(row):
            keys[ch] = (first + i, False)
            if ch.isalpha():
                keys[ch.upper()] = (first + i, True)
            elif ch in _SHIFTED:
                keys[_SHIFTED[ch]] = (first + i, True)
    return keys


#: character -> (key code, with shift) for printable ASCII, space, Enter and Tab.
KEYMAP: Final = _keymap()

Event = tuple[int, int, int]  # (type, code, value)


def text_events(text: str) -> list[Event]:
    """The events of typing ``text``: every press and release followed by a SYN_REPORT.

    Raises ValueError naming the first character a US keyboard cannot type.
    """
    events: list[Event] = []
    syn = (EV_SYN, SYN_REPORT, 0)
    for ch in text:
        if ch not in KEYMAP:
            raise ValueError(f"no key for {ch!r} (printable ASCII, Enter and Tab only)")
        code, shift = KEYMAP[ch]
        strokes = [(code, 1), (code, 0)]
        if shift:
            strokes = [(KEY_LEFTSHIFT, 1), *strokes, (KEY_LEFTSHIFT, 0)]
        for key, value in strokes:
            events += [(EV_KEY, key, value), syn]
    return events
