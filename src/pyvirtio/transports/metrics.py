"""A Prometheus endpoint for a back end's statistics (``--metrics-address``, docs/stats.md).

The exposition is the ``prometheus_client`` library's (the ``metrics``
extra), fed by a custom collector that turns the same snapshot the stats
socket answers (:func:`pyvirtio.transports.stats.snapshot`) into metric
families: counters for the life of the process, gauges for the ring state.

Threads: ``prometheus_client`` serves HTTP from a thread of its own, so a
slow or hostile scraper holds that thread, never the loop.  That thread
never touches ring state: a scrape asks the loop for a snapshot
(``call_soon_threadsafe``), the loop takes it between two events exactly as
the stats socket does, and hands the finished document over (a dict the loop
no longer changes); scrapes that arrive while one is pending share it.  If the
loop does not answer within :data:`SNAPSHOT_WAIT` seconds (it is stopping),
the last snapshot is served.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Final

from pyvirtio.core.errors import CallerError
from pyvirtio.io.loop import EventLoop
from pyvirtio.transports.histogram import is_histogram
from pyvirtio.transports.stats import DeviceStats, snapshot

__all__ = ["METRICS", "SNAPSHOT_WAIT", "MetricsServer", "metrics_available", "parse_address"]

SNAPSHOT_WAIT: Final = 2.0
_PREFIX: Final = "pyvirtio_queue_"

#: Per-queue counters: (metric name without _total, counter in the snapshot, help).
METRICS: Final = (
    ("buffers_popped", "buffers_popped", "Buffers (descriptor chains) the device took"),
    ("buffers_pushed", "buffers_pushed", "Buffers returned through the used ring"),
    ("readable_bytes", "readable_bytes", "Bytes of device-readable buffers taken"),
    ("used_bytes", "used_bytes", "Used lengths returned (bytes the device wrote)"),
    ("kicks", "kicks", "Kicks (driver notifications) received"),
    ("interrupts", "interrupts", "Interrupts (used buffer notifications) sent"),
    ("interrupts_suppressed", "interrupts_suppressed",
     "Interrupt decisions that said no (VIRTIO 1.2 2.7.10: used_event or NO_INTERRUPT)"),
    ("notifications_enabled", "notifications_enabled", "Times the device asked for kicks again"),
    ("notifications_disabled", "notifications_disabled", "Times the device turned kicks off"),
)
#: Per-queue gauges read live from the ring: (metric name, state field, help).
GAUGES: Final = (
    ("in_flight", "in_flight", "Requests taken and not yet returned"),
    ("avail_idx", "avail_idx", "avail.idx as the driver wrote it"),
    ("last_avail_idx", "last_avail_idx", "The next available entry the device will take"),
    ("used_idx", "used_idx", "used.idx as the device published it"),
    ("avail_event", "avail_event", "avail_event the device published (-1 without EVENT_IDX)"),
    ("used_event", "used_event", "used_event the driver published (-1 without EVENT_IDX)"),
    ("signalled_used", "signalled_used", "used.idx at the last interrupt decision"),
)


def metrics_available() -> bool:
    """Whether prometheus_client (the ``metrics`` extra) is installed."""
    return importlib.util.find_spec("prometheus_client") is not None


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (the last two: localhost)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise CallerError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9100)") from None
    if not 0 <= port <= 65535:
        raise CallerError(f"port {port} is not in 0..65535")
    if not host:
        host = "127.0.0.1"  # only this machine unless told otherwise
    elif host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise CallerError(f"{host!r} is not an IP address (or localhost)") from None
    return host, port


class MetricsServer:
    """Serve ``devices``' statistics at ``http://address/metrics`` (snapshots taken on ``loop``)."""

    def __init__(self, address: str, devices: Sequence[DeviceStats], loop: EventLoop) -> None:
        host, port = parse_address(address)
        try:
            # (An optional extra: mypy may run where it is not installed.)
            from prometheus_client import start_http_server  # type: ignore[import-not-found,unused-ignore]
            from prometheus_client.registry import CollectorRegistry  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise CallerError("--metrics-address needs prometheus_client: "
                              "pip install 'pyvirtio[metrics]'") from None
        self.devices = list(devices)
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: tuple[threading.Event, list[dict[str, Any]]] | None = None
        self._last: dict[str, Any] | None = None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))  # type: ignore[arg-type,unused-ignore]
        try:
            started = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise CallerError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        self._httpd: Any = started[0]  # (server, thread) since prometheus_client 0.20
        #: The port actually bound (``:0`` picks one).
        self.port: int = int(self._httpd.server_address[1])
        self.host = host
        self.url_host = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def fresh_snapshot(self) -> dict[str, Any] | None:
        """A snapshot taken on the loop for this scrape (any thread; see the module docstring)."""
        with self._lock:
            if self._pending is None:
                event, box = threading.Event(), list[dict[str, Any]]()
                self._pending = (event, box)
                self.loop.call_soon_threadsafe(lambda: self._take(event, box))
            event, box = self._pending
        if event.wait(SNAPSHOT_WAIT) and box:
            return box[0]
        with self._lock:
            if self._pending is not None and self._pending[0] is event:
                self._pending = None  # the loop did not answer: let the next scrape ask again
            return self._last

    def _take(self, event: threading.Event, box: list[dict[str, Any]]) -> None:
        doc = snapshot(self.devices)
        box.append(doc)
        with self._lock:
            self._last = doc
            if self._pending is not None and self._pending[0] is event:
                self._pending = None
        event.set()


class _Collector:
    """The custom collector: metric families from one snapshot per scrape."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # type: ignore[import-not-found,unused-ignore]
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        doc = self.server.fresh_snapshot()
        devices: list[dict[str, Any]] = doc["devices"] if doc is not None else []
        dev_labels = ["device", "type"]
        q_labels = [*dev_labels, "queue"]
        connections = CounterMetricFamily("pyvirtio_device_connections",
                                          "Front-end connections served", labels=dev_labels)
        connected = GaugeMetricFamily("pyvirtio_device_connected",
                                      "1 while a front end is connected", labels=dev_labels)
        counters = {name: CounterMetricFamily(_PREFIX + name, text, labels=q_labels)
                    for name, _key, text in METRICS}
        errors = CounterMetricFamily(_PREFIX + "errors", "Errors by kind: ring (the driver "
                                     "broke it), device, dropped_completions",
                                     labels=[*q_labels, "kind"])
        gauges = {name: GaugeMetricFamily(_PREFIX + name, text, labels=q_labels)
                  for name, _key, text in GAUGES}
        size = GaugeMetricFamily(_PREFIX + "size", "Ring size (0: not started)", labels=q_labels)
        batches = HistogramMetricFamily(_PREFIX + "batch_size", "Used entries per interrupt "
                                        "decision (power-of-two buckets)", labels=q_labels)
        own: dict[str, Any] = {}  # the devices' own counters (device_stats), by name
        for dev in devices:
            dl = [str(dev["name"]), str(dev["type"])]
            connections.add_metric(dl, dev["connections"])
            connected.add_metric(dl, 1 if dev["connected"] else 0)
            for key, value in (dev.get("device_stats") or {}).items():
                if is_histogram(value):  # blk: request latency, in seconds as Prometheus wants
                    fam = own.setdefault(key, HistogramMetricFamily(
                        f"pyvirtio_device_{key}_seconds", f"The device's {key} (seconds)",
                        labels=dev_labels))
                    cumulative, buckets = 0, []
                    for bound, n in zip(value["le_us"], value["counts"], strict=True):
                        cumulative += n
                        buckets.append(("+Inf" if bound is None else repr(bound / 1e6),
                                        cumulative))
                    fam.add_metric(dl, buckets, sum_value=value["sum_us"] / 1e6)
                elif isinstance(value, dict):  # counts by reason (net: drops)
                    fam = own.setdefault(key, CounterMetricFamily(
                        f"pyvirtio_device_{key}", f"The device's {key}, by reason",
                        labels=[*dev_labels, "reason"]))
                    for reason, n in value.items():
                        fam.add_metric([*dl, str(reason)], n)
                elif isinstance(value, int) and not isinstance(value, bool):
                    fam = own.setdefault(key, CounterMetricFamily(
                        f"pyvirtio_device_{key}", f"The device's {key}", labels=dev_labels))
                    fam.add_metric(dl, value)
            for q in dev["queues"]:
                ql = [*dl, str(q["index"])]
                total = q["total"]
                for name, key, _text in METRICS:
                    counters[name].add_metric(ql, total[key])
                for kind, n in total["errors"].items():
                    errors.add_metric([*ql, kind], n)
                cumulative, buckets = 0, []
                for i, n in enumerate(total["batches"]):
                    cumulative += n
                    buckets.append((str(2 ** (i + 1) - 1), cumulative))
                buckets.append(("+Inf", cumulative))
                batches.add_metric(ql, buckets, sum_value=total["batched_entries"])
                size.add_metric(ql, q["size"] or 0)
                state = q["state"]
                if state is not None:
                    for name, key, _text in GAUGES:
                        gauges[name].add_metric(ql, state[key])
        yield connections
        yield connected
        yield from own.values()
        yield from counters.values()
        yield errors
        yield batches
        yield size
        yield from gauges.values()
