"""The seed's worked example of delayed notification, replayed on the real objects.

The classic walk-through of EVENT_IDX, step by step (VIRTIO 1.2
§2.7.7.2 used_event, §2.7.10 avail_event; Linux ``virtqueue_kick_prepare``,
QEMU ``virtio_should_notify``):

* the driver adds 8 buffers and kicks — the first kick is always sent;
* the device pops them; it has taken 4 when the driver looks, so
  ``avail_event`` = 4; the device uses 3 and interrupts — the first interrupt
  is always sent;
* the driver adds 5 more (old = 8, new = 13): 13 - 4 - 1 = 8 is not < 5, so it
  must NOT kick;
* the driver has consumed only 2 used buffers, so ``used_event`` = 2; the device
  publishes 3 more (old = 3, new = 6): 6 - 2 - 1 = 3 is not < 3, so it must
  NOT interrupt.

The event fields are produced by the other side's real operations (pop writes
``avail_event``, get_buf writes ``used_event``) and read back from ring memory.
"""

from __future__ import annotations

from collections.abc import Callable

from conftest import EVENT_IDX, RingPair
from pyvirtio.core.split_device import Element

Pair = Callable[..., RingPair]


def _add(pair: RingPair, n: int, first_token: int) -> None:
    for t in range(first_token, first_token + n):
        pair.driver.add([(pair.buf(8, t.to_bytes(8, "little")), 8)], [(pair.buf(8), 8)], t)


def _pop(pair: RingPair, n: int) -> list[Element]:
    elems = []
    for _ in range(n):
        e = pair.device.pop()
        assert e is not None
        elems.append(e)
    return elems


def _serve(pair: RingPair, elems: list[Element]) -> None:
    """Device work: copy each request's token into its writable buffer, then flush once."""
    for off, e in enumerate(elems):
        e.writable[0][:] = bytes(e.readable[0])
        pair.device.fill(e.head, 8, offset=off)
    pair.device.flush(len(elems))


def test_seed_worked_example(ring_pair: Pair) -> None:
    pair = ring_pair(num=32, features=EVENT_IDX)
    drv, dev = pair.driver, pair.device

    # 1. Driver adds 8 and kicks: the first kick is always sent (avail_event starts at 0).
    _add(pair, 8, first_token=0)
    assert pair.avail_event == 0
    assert drv.kick_prepare() is True

    # 2. The device, woken, pops: after 4 pops avail_event = last_avail_idx = 4.
    first = _pop(pair, 4)
    assert pair.avail_event == 4
    # It uses 3 buffers and interrupts: the first interrupt is always sent.
    _serve(pair, first[:3])
    assert pair.used_idx == 3
    assert dev.should_notify() is True

    # 3. The driver adds 5 more: old = 8, new = 13, avail_event = 4 -> no kick.
    _add(pair, 5, first_token=8)
    assert pair.avail_idx == 13 and pair.avail_event == 4
    assert drv.kick_prepare() is False

    # 4. The driver is still on its second used buffer: used_event = 2.
    for t in range(2):
        assert drv.get_buf() == (t, 8)
    assert pair.used_event == 2
    # The device publishes 3 more used (old = 3, new = 6): no interrupt.
    more = [first[3], *_pop(pair, 2)]
    _serve(pair, more)
    assert pair.used_idx == 6
    assert dev.should_notify() is False

    # Nothing was lost: the device still holds the kicked work and the driver
    # gets every buffer back, with its data, in order.
    rest = _pop(pair, 13 - 6)
    assert dev.pop() is None
    _serve(pair, rest)
    got = [drv.get_buf() for _ in range(11)]
    assert got == [(t, 8) for t in range(2, 13)]
    assert drv.get_buf() is None


def test_seed_example_with_event_fields_written_through_memory(ring_pair: Pair) -> None:
    """The walk-through's literal phrasing: the device pops all 8, the fields are set to 4 and 2."""
    pair = ring_pair(num=32, features=EVENT_IDX)
    drv, dev = pair.driver, pair.device
    _add(pair, 8, first_token=0)
    assert drv.kick_prepare() is True
    elems = _pop(pair, 8)
    assert pair.avail_event == 8
    _serve(pair, elems[:3])
    assert dev.should_notify() is True
    # The device side publishes avail_event = 4 in the used ring, as it would have
    # after its fourth pop.
    pair.avail_event = 4
    _add(pair, 5, first_token=8)
    assert drv.kick_prepare() is False
    # The driver side publishes used_event = 2 in the available ring.
    pair.used_event = 2
    _serve(pair, elems[3:6])
    assert dev.should_notify() is False
    # One more used buffer crosses nothing either; moving used_event into the
    # published range does make the device interrupt.
    pair.used_event = 6
    _serve(pair, elems[6:7])
    assert dev.should_notify() is True


def test_first_notification_each_way_is_always_sent(ring_pair: Pair) -> None:
    pair = ring_pair(num=8, features=EVENT_IDX)
    drv, dev = pair.driver, pair.device
    # Both event fields start at 0, the value a fresh ring has: the first
    # kick crosses avail_event 0.
    _add(pair, 1, first_token=0)
    assert drv.kick_prepare() is True
    # Even with a used_event the device's first flush does not cross, the
    # first interrupt is sent (QEMU's signalled_used_valid starts false).
    pair.used_event = 0x1234
    _serve(pair, _pop(pair, 1))
    assert dev.should_notify() is True
    # The second one obeys used_event.
    _add(pair, 1, first_token=1)
    _serve(pair, _pop(pair, 1))
    assert dev.should_notify() is False
