"""Prometheus metrics of the appliance, through prometheus_client: one registry per appliance, counters the
camera loop, lookups and the web layer increment, and gauges read from their owners when /metrics is scraped."""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# "<name>_created" timestamps per series double the page for nothing a dashboard of this device uses.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest() writes
LOOKUP_SOURCES = ("camera", "requested", "upload", "cli")


class _Readings:
    """A collector whose values are read from callables at scrape time (camera status, index size)."""

    def __init__(self) -> None:
        self._readings: list[tuple[str, str, str, Callable, str | None]] = []

    def add(self, name: str, documentation: str, kind: str, read: Callable, label: str | None) -> None:
        self._readings.append((name, documentation, kind, read, label))

    def collect(self):
        for name, documentation, kind, read, label in self._readings:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            if label is None:
                yield family(name, documentation, value=float(read()))
                continue
            labelled = family(name, documentation, labels=[label])
            for key, value in read().items():
                labelled.add_metric([str(key)], float(value))
            yield labelled


class Metrics:
    """The appliance's metrics (names ``appliance_*``). ``value(name, **labels)`` reads one sample back
    (health page, tests); ``exposition()`` is the Prometheus text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.lookups = Counter("appliance_lookups", "Lookups by source", ["source"], registry=r)
        for source in LOOKUP_SOURCES:
            self.lookups.labels(source)
        self.lookup_ms = Counter("appliance_lookup_ms_sum", "Time spent in lookups, milliseconds", registry=r)
        self.outcomes = Counter("appliance_lookup_outcomes", "Lookup decisions", ["outcome"], registry=r)
        for outcome in ("match", "no_match"):
            self.outcomes.labels(outcome)
        self.errors = Counter("appliance_errors", "Errors by kind", ["kind"], registry=r)
        self.http_requests = Counter("appliance_http_requests", "HTTP requests by route and status",
                                     ["method", "route", "status"], registry=r)
        # each open live view holds a waitress thread: worth watching
        self.http_streams_open = Gauge("appliance_http_streams_open", "Open MJPEG live views", registry=r)
        self.http_event_streams_open = Gauge("appliance_http_event_streams_open",
                                             "Open Server-Sent Events streams (GET /api/events)", registry=r)
        self._readings = _Readings()
        r.register(self._readings)

    def read_at_scrape(self, name: str, documentation: str, kind: Literal["counter", "gauge"],
                       read: Callable[[], float | dict[str, float]], label: str | None = None) -> None:
        """Expose ``read()`` as ``name`` (a counter's name without ``_total``), evaluated at each scrape; with
        ``label``, ``read()`` returns {label value: value}."""
        self._readings.add(name, documentation, kind, read, label)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (``appliance_lookups_total``, source="camera"); 0 when absent."""
        return self.registry.get_sample_value(name, labels or None) or 0.0

    def exposition(self) -> bytes:
        """Prometheus text exposition format of every metric."""
        return prometheus_client.generate_latest(self.registry)
