"""Fuzz target 1: the vhost-user codec (``messages.Decoder`` and ``BackendDecoder``).

Arbitrary bytes, cut into chunks as ``recvmsg`` would return them, each
chunk with 0-3 real eventfds attached (the decoder owns them, as the server
hands them over), into one of the four decoders (requests or replies, main
channel or back-end channel).  Besides the common invariant (only PeerError,
no fd left open, see ``_harness.py``): every message decoded encodes back to
bytes that decode to the same message (the codec never yields a message it
could not have sent).

    python fuzz/fuzz_codec.py -max_total_time=60 -timeout=10 /tmp/corpus fuzz/corpus/codec
"""

from __future__ import annotations

import os

from _harness import atheris, checked, fuzz
from pyvirtio.transports.vhost_user.messages import (
    BackendDecoder,
    BackendMessage,
    Decoder,
    Message,
    encode,
)

_Decoders = Decoder | BackendDecoder


def _new(mode: int) -> _Decoders:
    return (Decoder(), Decoder(replies=True), BackendDecoder(),
            BackendDecoder(replies=True))[mode]


def _same_again(msg: Message | BackendMessage, mode: int) -> None:
    """Encoding ``msg`` and decoding it again gives ``msg`` back (without its fds)."""
    again = _new(mode)
    again.feed(encode(msg), ())
    try:
        got = list(again.messages()) if not msg.fds else None
    finally:
        again.close()
    if got is None:
        return  # a message with fds does not decode without them: nothing to compare
    if len(got) != 1:
        raise AssertionError(f"{msg!r} re-decoded as {got!r}")
    back = got[0]
    assert isinstance(back, Message | BackendMessage)
    if (back.request, back.payload, back.flags) != (msg.request, msg.payload, msg.flags):
        raise AssertionError(f"{msg!r} re-decoded as {back!r}")


@checked
def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    dec = _new(mode)
    try:
        while fdp.remaining_bytes():
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
            nfds = fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeBool() else 0
            # Created here, owned by the decoder from feed() on (the server's contract).
            dec.feed(chunk, [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)])
            for msg in dec.messages():
                try:
                    _same_again(msg, mode)
                finally:
                    msg.close_fds()
    finally:
        dec.close()


if __name__ == "__main__":
    fuzz(one_input)
