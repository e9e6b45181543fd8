"""vring_need_event, VIRTIO 1.2 §2.7.7.2 and §2.7.10, against its meaning.

``vring_need_event(event, new, old)`` must be true exactly when ``event`` is one
of the indices the other side moved across: ``old, old + 1, ..., new - 1``
(mod 2^16).  The reference below enumerates that set instead of reusing the
formula.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyvirtio.core.notify import vring_need_event

u16 = st.integers(0, 0xFFFF)


def crossed(event: int, new: int, old: int) -> bool:
    steps = (new - old) % 65536
    return any((old + k) % 65536 == event for k in range(steps))


@given(event=u16, old=u16, steps=st.integers(0, 512))
def test_need_event_is_true_iff_event_was_crossed(event: int, old: int, steps: int) -> None:
    new = (old + steps) & 0xFFFF
    assert vring_need_event(event, new, old) == crossed(event, new, old)


@given(old=u16, steps=st.integers(1, 300), back=st.integers(0, 299))
def test_event_inside_the_window(old: int, steps: int, back: int) -> None:
    new = (old + steps) & 0xFFFF
    event = (old + back % steps) & 0xFFFF
    assert vring_need_event(event, new, old)


def test_wrap_around_65535() -> None:
    for old in range(65530, 65536):
        for steps in range(1, 12):
            new = (old + steps) & 0xFFFF
            for event in [*range(65525, 65536), *range(12)]:
                assert vring_need_event(event, new, old) == crossed(event, new, old)


def test_no_movement_never_needs_an_event() -> None:
    for idx in (0, 1, 4, 0x7FFF, 0xFFFF):
        for event in (0, idx, (idx - 1) & 0xFFFF, (idx + 1) & 0xFFFF):
            assert not vring_need_event(event, idx, idx)


def test_seed_numbers() -> None:
    # The seed's worked example: kick from 8 to 13 with avail_event 4 is not needed,
    # interrupt from 3 to 6 with used_event 2 is not needed; 0 -> 8 with event 0 is.
    assert vring_need_event(0, 8, 0) == crossed(0, 8, 0)
    assert not crossed(4, 13, 8) and not vring_need_event(4, 13, 8)
    assert not crossed(2, 6, 3) and not vring_need_event(2, 6, 3)
    assert crossed(0, 8, 0) and vring_need_event(0, 8, 0)
