"""Statistics counters (core queue, device kit), their accumulators and the JSON schema.

docs/stats.md: the core's SplitDeviceQueue counts buffers popped and pushed,
readable and used bytes, kick-suppression transitions and interrupts
suppressed (VIRTIO 1.2 §2.7.10, QEMU virtio_should_notify said no); the
kit's VirtQueue counts kicks, interrupts sent, batch sizes and errors; the
stats layer adds a lifetime accumulator and the current connection's values.
Driven in process over a RingPair: the test is the driver.
"""

from __future__ import annotations

import json

from conftest import EVENT_IDX, RingPair, pair_ctx
from pyvirtio.core.ring_stats import (
    COUNTERS,
    TRACE_IRQ,
    TRACE_IRQ_SUPPRESSED,
    TRACE_KICK,
    TRACE_KICKS_OFF,
    TRACE_KICKS_ON,
)
from pyvirtio.core.spec import VRING_AVAIL_F_NO_INTERRUPT, DeviceId
from pyvirtio.core.split_device import Element
from pyvirtio.transports.device import BATCH_BUCKETS, Device, Request, VirtQueue
from pyvirtio.transports.stats import SCHEMA, SCHEMA_VERSION, DeviceStats, snapshot


class Echo(Device):
    device_id = DeviceId.CONSOLE

    def handle(self, queue: VirtQueue, req: Request) -> int:
        return req.write(req.read())


def add(pair: RingPair, n_out: int, n_in: int) -> None:
    pair.driver.add([(pair.buf(n_out, b"x" * n_out), n_out)], [(pair.buf(n_in), n_in)], "req")


def test_core_counts_buffers_bytes_and_decisions() -> None:
    with pair_ctx(num=16, features=EVENT_IDX) as pair:
        dev = pair.device
        for _ in range(3):
            add(pair, 10, 20)
        dev.disable_notification()
        dev.disable_notification()  # not a transition: counted once
        elems = [dev.pop(), *dev.pop_batch(8)]
        assert all(e is not None for e in elems) and len(elems) == 3
        assert dev.buffers_popped == 3 and dev.readable_bytes == 30
        dev.fill(elems[0].head, 7, 0)  # type: ignore[union-attr]
        dev.fill(elems[1].head, 5, 1)  # type: ignore[union-attr]
        dev.flush(2)
        dev.push(elems[2].head, 4)  # type: ignore[union-attr]
        assert dev.buffers_pushed == 3 and dev.used_bytes == 16
        assert dev.should_notify()  # the first decision after a start is always yes
        # The driver asks for an interrupt only after used.idx passes 10.
        pair.used_event = 10
        add(pair, 1, 1)
        elem = dev.pop()
        assert elem is not None
        dev.push(elem.head, 1)
        assert not dev.should_notify()
        assert dev.interrupts_suppressed == 1
        assert dev.enable_notification() is False
        assert dev.enable_notification() is False  # already on: no transition
        counts = dev.counters()
        assert tuple(counts) == COUNTERS
        assert counts == {"buffers_popped": 4, "buffers_pushed": 4, "readable_bytes": 31,
                          "used_bytes": 17, "notifications_enabled": 1,
                          "notifications_disabled": 1, "interrupts_suppressed": 1}
        state = dev.ring_state()
        assert state["avail_idx"] == state["last_avail_idx"] == 4
        assert state["used_idx"] == 4 and state["used_event"] == 10
        assert state["avail_event"] == 4 and state["in_flight"] == 0
        assert state["signalled_used"] == 4 and state["signalled_used_valid"] == 1


def test_unpop_and_flags_mode_suppression() -> None:
    with pair_ctx(num=8, features=0) as pair:
        dev = pair.device
        add(pair, 4, 4)
        add(pair, 4, 4)
        assert len(dev.pop_batch(2)) == 2
        dev.unpop(1)
        assert dev.buffers_popped == 1 and dev.ring_state()["in_flight"] == 1
        pair.driver.rings.avail16[0] = VRING_AVAIL_F_NO_INTERRUPT
        assert not dev.should_notify()
        assert dev.interrupts_suppressed == 1
        assert dev.ring_state()["avail_event"] == -1 and dev.ring_state()["used_event"] == -1


def test_trace_records_decisions_only_while_on() -> None:
    with pair_ctx(num=8, features=EVENT_IDX) as pair:
        dev = pair.device
        add(pair, 1, 1)
        elem = dev.pop()
        assert elem is not None
        dev.push(elem.head, 1)
        assert dev.should_notify()
        assert dev.trace is None  # off: nothing kept
        dev.trace = []
        dev.disable_notification()
        add(pair, 1, 1)
        dev.trace_kick()
        elem = dev.pop()
        assert elem is not None
        dev.push(elem.head, 1)
        pair.used_event = 5
        assert not dev.should_notify()
        dev.enable_notification()
        pair.used_event = 2  # in [old, new): the interrupt is due
        add(pair, 1, 1)
        elem = dev.pop()
        assert elem is not None
        dev.push(elem.head, 1)
        assert dev.should_notify()
        kinds = [r[1] for r in dev.trace]
        assert kinds == [TRACE_KICKS_OFF, TRACE_KICK, TRACE_IRQ_SUPPRESSED, TRACE_KICKS_ON,
                         TRACE_IRQ]
        _t, _k, old, new, event, _flags = dev.trace[2]
        assert (old, new, event) == (1, 2, 5)  # signalled_used, used.idx, used_event
        _t, _k, old, new, event, _flags = dev.trace[4]
        assert (old, new, event) == (2, 3, 2)
        _t, _k, old, new, event, _flags = dev.trace[1]
        assert (old, new) == (1, 2)  # the avail.idx seen before, the one the kick announced
        assert [r[0] for r in dev.trace] == sorted(r[0] for r in dev.trace)


class Kit:
    def __init__(self, pair: RingPair, device: Device) -> None:
        self.irqs = 0
        self.vq = VirtQueue(0, pair.device, device, self._irq)

    def _irq(self) -> None:
        self.irqs += 1


def test_kit_counts_kicks_interrupts_batches_and_errors() -> None:
    with pair_ctx(num=16, features=EVENT_IDX) as pair:
        kit = Kit(pair, Echo())
        vq = kit.vq
        for _ in range(5):
            add(pair, 3, 8)
        vq.kicked(2)
        assert vq.run() == 5
        add(pair, 3, 8)
        vq.kicked()
        vq.run()
        assert vq.kicks == 3 and vq.interrupts == kit.irqs
        # One decision per pass: a batch of 5 (bucket 4-7) and a batch of 1.
        assert vq.batches[0] == 1 and vq.batches[2] == 1 and sum(vq.batches) == 2
        assert vq.batched_entries == 6 and len(vq.batches) == BATCH_BUCKETS
        vq.close()
        vq.complete(Request(vq, pair.device.pop() or _elem(pair)), 1)
        assert vq.completions_dropped == 1
        assert (vq.errors_ring, vq.errors_device) == (0, 0)


def _elem(pair: RingPair) -> Element:
    add(pair, 1, 1)
    elem = pair.device.pop()
    assert elem is not None
    return elem


def test_a_broken_ring_and_a_failing_device_are_counted_apart() -> None:
    class Boom(Device):
        device_id = DeviceId.CONSOLE

        def handle(self, queue: VirtQueue, req: Request) -> int:
            raise RuntimeError("bug")

    with pair_ctx(num=8, features=EVENT_IDX) as pair:
        vq = Kit(pair, Boom()).vq
        add(pair, 1, 1)
        vq.run()
        assert (vq.errors_ring, vq.errors_device) == (0, 1)
    with pair_ctx(num=8, features=EVENT_IDX) as pair:
        vq = Kit(pair, Echo()).vq
        pair.driver.rings.avail16[1] = 100  # more than the queue size ahead
        vq.run()
        assert (vq.errors_ring, vq.errors_device) == (1, 0)


def test_accumulators_survive_ring_restarts_and_connections() -> None:
    dev = Echo()
    stats = DeviceStats("/tmp/x.sock", dev)
    stats.connection_started()
    with pair_ctx(num=8, features=EVENT_IDX) as pair:
        vq = Kit(pair, dev).vq
        stats.queue_started(vq)
        for _ in range(3):
            add(pair, 2, 2)
        vq.kicked()
        vq.run()
        stats.queue_stopped(vq)  # the ring stopped (GET_VRING_BASE)
    with pair_ctx(num=8, features=EVENT_IDX) as pair:
        vq = Kit(pair, dev).vq
        stats.queue_started(vq)
        add(pair, 2, 2)
        vq.run()
        q = stats.queues[0]
        total, conn = q.totals()
        assert total["buffers_pushed"] == conn["buffers_pushed"] == 4
        assert total["kicks"] == 1 and total["readable_bytes"] == 8
        stats.queue_stopped(vq)
        stats.connection_ended()
    stats.connection_started()  # a reconnect: the connection's values start at 0
    total, conn = stats.queues[0].totals()
    assert total["buffers_pushed"] == 4 and conn["buffers_pushed"] == 0
    doc = stats.document()
    assert doc["connections"] == 2 and doc["reconnects"] == 1 and doc["connected"] is True


def test_snapshot_schema() -> None:
    dev = Echo()
    stats = DeviceStats("dev0", dev)
    stats.connection_started()
    with pair_ctx(num=8, features=EVENT_IDX) as pair:
        vq = Kit(pair, dev).vq
        stats.queue_started(vq)
        add(pair, 2, 2)
        vq.run()
        doc = json.loads(json.dumps(snapshot([stats])))
    assert doc["schema"] == SCHEMA and doc["version"] == SCHEMA_VERSION == 1
    assert set(doc) == {"schema", "version", "pid", "time", "uptime", "devices"}
    (d,) = doc["devices"]
    assert set(d) == {"name", "type", "device_id", "description", "connections", "connected",
                      "reconnects", "queues"}
    assert d["type"] == "console" and d["device_id"] == 3
    (q,) = d["queues"]
    assert set(q) == {"index", "active", "size", "event_idx", "broken", "state", "total",
                      "connection"}
    assert q["active"] is True and q["size"] == 8 and q["event_idx"] is True
    assert set(q["state"]) == {"avail_idx", "last_avail_idx", "shadow_avail_idx", "used_idx",
                               "avail_event", "used_event", "avail_flags", "used_flags",
                               "signalled_used", "signalled_used_valid", "in_flight",
                               "kicks_wanted"}
    counters = {*COUNTERS, "kicks", "interrupts", "batched_entries", "errors", "batches"}
    assert set(q["total"]) == set(q["connection"]) == counters
    assert q["total"]["errors"] == {"ring": 0, "device": 0, "dropped_completions": 0}
    assert q["total"]["batches"] == [1] + [0] * (BATCH_BUCKETS - 1)
    assert q["total"]["buffers_pushed"] == 1 and q["total"]["used_bytes"] == 2


def test_a_device_with_counters_of_its_own_shows_them() -> None:
    from pyvirtio.devices.net.device import NetDevice

    net = NetDevice(pairs=1)
    net.stats.tx_frames = 3
    net.stats.drops["no-buffer"] = 2
    doc = DeviceStats("/tmp/a.sock", net).document()
    assert doc["type"] == "net"
    own = doc["device_stats"]
    assert isinstance(own, dict)
    assert own["tx_frames"] == 3 and own["drops"] == {"no-buffer": 2}
    assert "device_stats" not in DeviceStats("x", Echo()).document()
