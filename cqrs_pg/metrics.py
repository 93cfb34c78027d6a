"""Prometheus metrics of `cqrs-pg listen` (`--metrics-port`).

Each Metrics object has a registry of its own (not prometheus_client's global one), so
several daemons can live in one process, as they do in the tests. The daemon records
into it whether or not it is served; only serve() opens a port.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

# Names as exposed (counters get their _total suffix from prometheus_client).
NAMES = (
    "cqrs_pg_events_applied_total",
    "cqrs_pg_batch_size",
    "cqrs_pg_batch_duration_seconds",
    "cqrs_pg_lag_events",
    "cqrs_pg_lag_seconds",
    "cqrs_pg_fence_blocked_seconds",
    "cqrs_pg_reconnects_total",
    "cqrs_pg_projection_halted",
    "cqrs_pg_projection_errors_total",
    "cqrs_pg_events_parked_total",
)

BATCH_SIZE_BUCKETS = (1, 5, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 50000)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Served:
    """A registry of its own, served over HTTP on demand."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP on addr:port (0: any free port); returns the port."""
        if self._server is None:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None

    def render(self) -> str:
        """The exposition text, as /metrics serves it."""
        return generate_latest(self.registry).decode()


class Metrics(_Served):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self._applied = Counter(
            "cqrs_pg_events_applied", "Events applied (or covered by a refresh) per projection.", ["projection"], registry=r
        )
        self._batch_size = Histogram(
            "cqrs_pg_batch_size", "Events per applied batch.", ["projection"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self._batch_duration = Histogram(
            "cqrs_pg_batch_duration_seconds",
            "Time to apply and commit one batch (with its checkpoint).",
            ["projection"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._lag_events = Gauge(
            "cqrs_pg_lag_events", "Events in the outbox not yet applied by the projection.", ["projection"], registry=r
        )
        self._lag_seconds = Gauge(
            "cqrs_pg_lag_seconds", "Age of the oldest event not yet applied by the projection (0: none).", ["projection"], registry=r
        )
        self._fence_blocked = Gauge(
            "cqrs_pg_fence_blocked_seconds",
            "How long committed events have waited behind an open transaction holding the xmin fence (0: no stall).",
            registry=r,
        )
        self._reconnects = Counter("cqrs_pg_reconnects", "Connections re-established after one was lost.", registry=r)
        self._halted = Gauge(
            "cqrs_pg_projection_halted",
            "1 while the projection is halted at an event that fails (cqrs-pg status names it), else 0.",
            ["projection"], registry=r,
        )
        self._errors = Counter(
            "cqrs_pg_projection_errors", "Failed tries of a projection's batch or refresh.", ["projection"], registry=r
        )
        self._parked = Counter(
            "cqrs_pg_events_parked", "Events a projection set aside after they failed (cqrs-pg parked).",
            ["projection"], registry=r,
        )
    # -- what the daemon records ----------------------------------------------------------

    def batch(self, projection: str, applied: int, seconds: float) -> None:
        """One batch that applied events (empty polls are not batches)."""
        self._applied.labels(projection).inc(applied)
        self._batch_size.labels(projection).observe(applied)
        self._batch_duration.labels(projection).observe(seconds)

    def lag(self, projection: str, events: int, seconds: float) -> None:
        self._lag_events.labels(projection).set(events)
        self._lag_seconds.labels(projection).set(seconds)

    def fence_blocked(self, seconds: float) -> None:
        self._fence_blocked.set(seconds)

    def reconnected(self) -> None:
        self._reconnects.inc()

    def halted(self, projection: str, halted: bool) -> None:
        self._halted.labels(projection).set(1 if halted else 0)

    def projection_error(self, projection: str) -> None:
        self._errors.labels(projection).inc()

    def parked(self, projection: str) -> None:
        self._parked.labels(projection).inc()


# `cqrs-pg relay --metrics-port`
RELAY_NAMES = (
    "cqrs_pg_relay_events_published_total",
    "cqrs_pg_relay_batch_duration_seconds",
    "cqrs_pg_relay_position",
    "cqrs_pg_relay_lag_seconds",
    "cqrs_pg_relay_broker_up",
    "cqrs_pg_relay_errors_total",
)


class RelayMetrics(_Served):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self._published = Counter("cqrs_pg_relay_events_published", "Events published and acknowledged by the broker.",
                                  registry=r)
        self._duration = Histogram("cqrs_pg_relay_batch_duration_seconds",
                                   "Poll, publish, broker acknowledgements and the ack of one batch.",
                                   buckets=DURATION_BUCKETS, registry=r)
        self._position = Gauge("cqrs_pg_relay_position", "Outbox position of the last event published.", registry=r)
        self._lag = Gauge("cqrs_pg_relay_lag_seconds",
                          "While batches come full: how long ago the last event published was committed (0: caught up).",
                          registry=r)
        self._broker_up = Gauge("cqrs_pg_relay_broker_up", "1 while the broker acknowledges publishes, else 0.", registry=r)
        self._errors = Counter("cqrs_pg_relay_errors", "Rounds that failed, by what failed (database, broker).", ["kind"],
                               registry=r)

    def batch(self, events: int, seconds: float, position: int) -> None:
        self._published.inc(events)
        self._duration.observe(seconds)
        self._position.set(position)

    def lag(self, seconds: float) -> None:
        self._lag.set(seconds)

    def broker_up(self, up: bool) -> None:
        self._broker_up.set(1 if up else 0)

    def error(self, kind: str) -> None:
        self._errors.labels(kind).inc()
