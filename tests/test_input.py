"""pyvirtio-input (VIRTIO 1.2 §5.8) through the device kit, with pyvirtio's own front end.

These tests play the front end's part over a real vhost-user socket exactly
as QEMU's vhost-user-input forwards Linux's virtio_input (``virtinput_probe``);
a real guest reads the keyboard in test_input_guest.py:

* configuration: every driver write of ``select``/``subsel`` arrives as a
  SET_CONFIG of the whole 136-byte space at offset 0, every read as a
  GET_CONFIG of it; ID_NAME, ID_SERIAL, ID_DEVIDS, PROP_BITS, EV_BITS for
  each event type and ABS_INFO get the keyboard's answers;
* eventq: typed text waits while no buffers are posted, then fills 8-byte
  buffers in order — the US keymap's presses, releases and SYN_REPORTs; a
  batch the backlog cannot take is dropped whole and counted;
* statusq: LED and autorepeat events from the driver are logged and the LEDs
  remembered;
* the control socket (``pyvirtio input type``) and typing lines from stdin.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtio.core.spec import F_RING_EVENT_IDX, F_VERSION_1, DeviceId
from pyvirtio.devices.input import InputDevice, codes, keyboard_config, text_events, type_text
from pyvirtio.devices.input.control import StdinTyper
from pyvirtio.devices.input.device import CONFIG_SIZE, bitmap
from pyvirtio.io.loop import EventLoop
from pyvirtio.transports.vhost_user.frontend import FrontendQueue, VhostUserFrontend
from pyvirtio.transports.vhost_user.server import VhostUserServer

pytestmark = pytest.mark.timeout(60)

FEATURES = 1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX
Events = list[tuple[int, int, int]]


class Served:
    def __init__(self, device: InputDevice, path: str) -> None:
        self.device = device
        self.server = VhostUserServer(device, socket_path=path)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.device.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[InputDevice], str]]:
    running: list[Served] = []

    def start(device: InputDevice) -> str:
        path = str(tmp_path / f"kbd{len(running)}.sock")
        running.append(Served(device, path))
        return path

    yield start
    for s in running:
        s.stop()


def select(fe: VhostUserFrontend, sel: int, subsel: int = 0) -> bytes:
    """What virtinput_cfg_select + a read of ``u`` see through QEMU: the payload."""
    space = bytearray(fe.get_config(0, CONFIG_SIZE))
    space[0], space[1] = sel, subsel
    fe.set_config(0, bytes(space))  # QEMU writes back the whole space
    cfg = fe.get_config(0, CONFIG_SIZE)
    assert cfg[:2] == bytes([sel, subsel]) and cfg[3:8] == bytes(5)
    return cfg[8:8 + cfg[2]]


def test_configuration_answers_like_a_keyboard(serve: Callable[[InputDevice], str]) -> None:
    device = InputDevice(keyboard_config("test kbd", "SN-1", (codes.BUS_VIRTUAL, 1, 2, 3)))
    assert device.device_id == DeviceId.INPUT and device.num_queues == 2
    with VhostUserFrontend.connect(serve(device), memory_size=1 << 20) as fe:
        assert fe.get_queue_num() == 2
        assert select(fe, codes.CFG_ID_NAME) == b"test kbd"
        assert select(fe, codes.CFG_ID_SERIAL) == b"SN-1"
        assert struct.unpack("<4H", select(fe, codes.CFG_ID_DEVIDS)) == (6, 1, 2, 3)
        assert select(fe, codes.CFG_PROP_BITS) == b""           # no input properties
        assert select(fe, codes.CFG_EV_BITS, codes.EV_SYN) == b"\x01"
        keys = select(fe, codes.CFG_EV_BITS, codes.EV_KEY)
        assert keys == bitmap(range(codes.KEY_ESC, codes.KEY_F12 + 1)) and len(keys) == 12
        assert all(keys[k // 8] >> k % 8 & 1 for k, _shift in codes.KEYMAP.values())
        assert select(fe, codes.CFG_EV_BITS, codes.EV_LED) == b"\x1f"
        assert select(fe, codes.CFG_EV_BITS, codes.EV_REP) == b"\x03"
        for ev_type in (0x02, 0x03, 0x04, 0x05):                 # REL, ABS, MSC, SW: none
            assert select(fe, codes.CFG_EV_BITS, ev_type) == b""
        assert select(fe, codes.CFG_ABS_INFO, 0) == b""
        assert select(fe, codes.CFG_UNSET) == b""
        assert select(fe, 0x7F, 9) == b""
        # Byte-wise writes (a driver's virtio_cwrite8) work as well.
        fe.set_config(0, bytes([codes.CFG_ID_NAME]))
        fe.set_config(1, bytes([0]))
        assert fe.get_config(2, 1) == bytes([8]) and fe.get_config(8, 8) == b"test kbd"
        assert fe.get_config(130, 20) == bytes(20)               # beyond the space reads 0


def setup(fe: VhostUserFrontend) -> tuple[FrontendQueue, FrontendQueue]:
    fe.negotiate(fe.get_features() & FEATURES)
    return fe.setup_queue(0, 64), fe.setup_queue(1, 64)


def post_event_buffers(fe: VhostUserFrontend, q: FrontendQueue, n: int) -> list[int]:
    gpas = [fe.alloc(8) for _ in range(n)]
    for gpa in gpas:
        q.queue.add([], [(gpa, 8)], token=gpa)
    q.notify()
    return gpas


def receive(fe: VhostUserFrontend, q: FrontendQueue, n: int) -> Events:
    got: Events = []
    while len(got) < n:
        used = q.queue.get_buf()
        if used is None:
            assert q.wait(10) or q.queue.more_used(), "no event from the back end"
            continue
        gpa, length = used
        assert isinstance(gpa, int) and length == 8
        got.append(struct.unpack("<HHi", fe.memory.read(gpa, 8)))
    return got


def test_typed_events_wait_for_buffers_then_arrive_in_order(
        serve: Callable[[InputDevice], str]) -> None:
    device = InputDevice()
    path = serve(device)
    loop = device.loop  # the server thread's: the device is only touched from there

    def on_loop(action: Callable[[], object]) -> None:
        done = threading.Event()

        def run() -> None:
            action()
            done.set()

        loop.call_soon_threadsafe(run)
        assert done.wait(10)

    with VhostUserFrontend.connect(path, memory_size=1 << 20) as fe:
        eventq, _statusq = setup(fe)
        expected = text_events("Hi!\n")
        # No buffers posted yet: the events wait in the device.
        on_loop(lambda: device.type_text("Hi!\n"))
        assert len(expected) == 24
        first = post_event_buffers(fe, eventq, 10)
        got = receive(fe, eventq, 10)
        post_event_buffers(fe, eventq, 30)
        got += receive(fe, eventq, 14)
        assert got == expected and len(first) == 10
        assert eventq.queue.get_buf() is None                    # 16 buffers stay posted
        # With buffers waiting, events go out as soon as they are sent.
        on_loop(lambda: device.send([(codes.EV_KEY, codes.KEY_CAPSLOCK, 1), (codes.EV_SYN, 0, 0)]))
        assert receive(fe, eventq, 2) == [(1, codes.KEY_CAPSLOCK, 1), (0, 0, 0)]
        assert device.delivered == 26 and device.dropped == 0


def test_a_batch_the_backlog_cannot_take_is_dropped_whole(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    device = InputDevice(backlog=10)
    assert device.type_text("ab") == 8
    with caplog.at_level(logging.WARNING, "pyvirtio.input"):
        assert device.type_text("c") == 0                         # 8 + 4 > 10
    assert device.dropped == 4 and len(device.pending) == 8
    assert "dropped 4 events" in caplog.text
    with pytest.raises(ValueError, match="no key for 'é'"):
        device.type_text("é")
    assert len(device.pending) == 8


def test_status_queue_leds_and_autorepeat(serve: Callable[[InputDevice], str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    device = InputDevice()
    with caplog.at_level(logging.INFO, "pyvirtio.input"), \
            VhostUserFrontend.connect(serve(device), memory_size=1 << 20) as fe:
        _eventq, statusq = setup(fe)
        sent = [(codes.EV_LED, 1, 1), (codes.EV_LED, 0, 1), (codes.EV_LED, 1, 0),
                (codes.EV_REP, codes.REP_PERIOD, 0)]
        for i, ev in enumerate(sent):
            gpa = fe.alloc(8)
            fe.memory.write(gpa, struct.pack("<HHi", *ev))
            statusq.queue.add([(gpa, 8)], [], token=i)
        statusq.notify()
        done: list[tuple[object, int]] = []
        while len(done) < len(sent):
            if (used := statusq.queue.get_buf()) is None:
                assert statusq.wait(10) or statusq.queue.more_used()
                continue
            done.append(used)
        assert done == [(i, 0) for i in range(4)]
    assert device.leds == {1: False, 0: True} and device.status_events == 4
    for line in ("LED caps lock on", "LED num lock on", "LED caps lock off",
                 "autorepeat period 0 ms"):
        assert line in caplog.text


def test_control_socket_types_and_answers(serve: Callable[[InputDevice], str],
                                          tmp_path: Path) -> None:
    ctl = str(tmp_path / "kbd.ctl")
    device = InputDevice(control_socket=ctl)
    with VhostUserFrontend.connect(serve(device), memory_size=1 << 20) as fe:
        eventq, _statusq = setup(fe)
        post_event_buffers(fe, eventq, 40)
        assert type_text(ctl, "hello") == "ok 20"
        assert receive(fe, eventq, 20) == text_events("hello")
        assert type_text(ctl, "naïve").startswith("error: no key for 'ï'")
        assert type_text(ctl, "") == "ok 0"
        # The command line client: one line out, exit 0; a missing socket: exit 1.
        res = subprocess.run([sys.executable, "-m", "pyvirtio.cli.main", "input", "type",
                              "ok", "--control-socket", ctl], capture_output=True, text=True,
                             timeout=30)
        assert (res.returncode, res.stdout) == (0, "ok 8\n"), res.stderr
        assert receive(fe, eventq, 8) == text_events("ok")
    res = subprocess.run([sys.executable, "-m", "pyvirtio.cli.main", "input", "type", "x",
                          "--control-socket", str(tmp_path / "none.ctl")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr


def test_stdin_lines_are_typed_with_enter() -> None:
    device = InputDevice()
    loop = EventLoop()
    r, w = os.pipe()
    try:
        StdinTyper(device, loop, fd=r)
        os.write(w, b"hi\nthe")
        os.write(w, b"re")
        os.close(w)
        for _ in range(5):
            loop.run_once(0.1)
    finally:
        os.close(r)
        loop.close()
    assert list(device.pending) == [struct.pack("<HHi", *ev)
                                    for ev in text_events("hi\nthere\n")]


def test_print_capabilities_says_input() -> None:
    res = subprocess.run([sys.executable, "-m", "pyvirtio.cli.input", "--print-capabilities"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"type": "input", "features": []}
