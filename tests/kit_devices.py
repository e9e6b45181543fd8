"""Small devices on the device kit, shared by the vhost-user tests.

:class:`EchoDevice` copies each request's readable bytes into its writable
buffers (XORed with the queue index, so a test can tell queues apart) and
has a 16-byte writable configuration space; :class:`TwoAtATime` completes
at most two requests per kick pass (a batching device).
"""

from __future__ import annotations

from pyvirtio.core.errors import PeerError
from pyvirtio.transports.device import Device, Request, VirtQueue


class EchoDevice(Device):
    """Echoes readable bytes (XOR the queue index) into the writable buffers."""

    device_id = 99
    queue_size = 256

    def __init__(self, queues: int = 2, device_features: int = 0, xor: bool = False) -> None:
        self.num_queues = queues
        self.device_features = device_features
        self.xor = xor
        self.acked = -1
        self.resets = 0
        self.config = bytearray(range(16))  # type: ignore[assignment]

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.acked = features

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset:offset + size])

    def set_config(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.config):
            raise PeerError("config write out of range")
        cfg = self.config
        assert isinstance(cfg, bytearray)
        cfg[offset:offset + len(data)] = data

    def handle(self, queue: VirtQueue, req: Request) -> int:
        data = req.read()
        if self.xor:
            data = bytes(b ^ queue.index for b in data)
        return req.write(data)

    def reset(self) -> None:
        super().reset()
        self.resets += 1


class TwoAtATime(EchoDevice):
    """Completes at most two requests per process() call (a batching device)."""

    def process(self, queue: VirtQueue) -> None:
        for _ in range(2):
            req = queue.pop()
            if req is None:
                return
            req.complete(0)
