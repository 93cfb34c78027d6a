"""Consuming the event stream from Python: a subscription (cqrs.create_subscription,
cqrs.poll, cqrs.ack) read as an iterator that acknowledges what it handed out, and
reconnects when the connection is lost.

    from cqrs_pg.subscriptions import Subscription, create_subscription

    create_subscription(dsn, "billing", event_types=["order.created"], exist_ok=True)
    with Subscription(dsn, "billing") as sub:
        for event in sub:
            handle(event)

Delivery is at least once: an event counts as handled once the loop asks for the next
one, and what was handled is acknowledged with the next poll (or on close). So the event
in hand when the loop is left (by break or by an exception), and events handled before a
crash or a lost connection, are handed out again.
Make handling idempotent by ``event.position``. The connection needs only the role
``cqrs_consumer``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import psycopg

from cqrs_pg import projections
from cqrs_pg.db import connect
from cqrs_pg.errors import DatabaseUnavailable, first_line, from_psycopg

logger = logging.getLogger("cqrs_pg.subscriptions")

MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class Event(projections.Event):
    """One event as cqrs.poll hands it out: a row of cqrs.outbox, as a python projection's
    handler gets it, and the cursor that acknowledges it."""

    cursor: str = ""


POLL = (
    "SELECT position, tx_id::text::bigint, event_type, aggregate_type, aggregate_id, aggregate_version, payload,"
    " metadata, occurred_at, payload_version, cursor FROM cqrs.poll(%s, %s)"
)


def create_subscription(
    conn_or_dsn: psycopg.Connection | str,
    name: str,
    *,
    event_types: Sequence[str] | None = None,
    aggregate_types: Sequence[str] | None = None,
    from_beginning: bool = False,
    exist_ok: bool = False,
) -> bool:
    """Creates a subscription (cqrs.create_subscription); returns whether it did. exist_ok:
    one of that name already there is no error (its filter is left as it is)."""
    for what, types in (("event_types", event_types), ("aggregate_types", aggregate_types)):
        if isinstance(types, str):  # list("order.created") would filter on its letters
            raise ValueError(f"{what} must be a list of types, not the string {types!r}: {what}=[{types!r}]")
    if isinstance(conn_or_dsn, str):
        with connect(conn_or_dsn, application_name="cqrs-pg subscription") as conn:
            return create_subscription(conn, name, event_types=event_types, aggregate_types=aggregate_types,
                                       from_beginning=from_beginning, exist_ok=exist_ok)
    try:
        with conn_or_dsn.transaction():
            conn_or_dsn.execute(
                "SELECT cqrs.create_subscription(%s, %s, %s, %s)",
                (name, None if event_types is None else list(event_types),
                 None if aggregate_types is None else list(aggregate_types), from_beginning),
            )
    except psycopg.Error as exc:
        if exist_ok and exc.sqlstate == "CQ003":
            return False
        raise from_psycopg(exc) from exc
    return True


class Subscription:
    """Iterates over a subscription's events, for one consumer at a time (another holding
    the subscription's events makes this one wait). ``for event in sub`` runs until
    ``stop()`` (from a signal handler or another thread); ``batches()`` yields the lists
    that polls return. ``idle_exit``: stop once a poll finds nothing for this consumer (a
    catch-up job; also when another consumer holds the events). A login the server
    refuses at the first connection is an error at once; a connection lost after that
    is retried with backoff."""

    def __init__(
        self,
        dsn: str,
        name: str,
        *,
        max_events: int = 100,
        poll_interval: float = 0.5,
        idle_exit: bool = False,
        application_name: str = "cqrs-pg subscription",
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, not {max_events}")
        if not 0 < poll_interval < math.inf:
            raise ValueError(f"poll_interval must be a finite number of seconds above 0, not {poll_interval}")
        self.dsn = dsn
        self.name = name
        self.max_events = max_events
        self.poll_interval = poll_interval
        self.idle_exit = idle_exit
        self.application_name = application_name
        self._conn: psycopg.Connection | None = None
        self._stop = threading.Event()
        self._unacked: str | None = None
        self._connected_once = False

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def stop(self) -> None:
        """Ends the iteration at the next event (the batch in hand is acknowledged up to
        the events handed out and handled)."""
        self._stop.set()

    def close(self) -> None:
        """Acknowledges the events handled so far, if the connection still serves, and
        closes it."""
        self._stop.set()
        if self._conn is not None and not self._conn.closed:
            # a lost ack: handed out again to the next consumer, at least once
            with contextlib.suppress(psycopg.OperationalError):
                self.ack_now()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __iter__(self) -> Iterator[Event]:
        for batch in self.batches():
            for event in batch:
                if self._stop.is_set():
                    return
                yield event
                # handled: what the next ack covers
                self._unacked = event.cursor

    def batches(self) -> Iterator[list[Event]]:
        """Each poll's events; a batch is acknowledged when the next one is asked for."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                conn = self._connection()
                if self._unacked is not None:
                    conn.execute("SELECT cqrs.ack(%s, %s)", (self.name, self._unacked))
                    self._unacked = None
                if self._stop.is_set():
                    return
                rows = conn.execute(POLL, (self.name, self.max_events)).fetchall()
                backoff = 0.1
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                if not self._connected_once:
                    raise  # a wrong DSN or login is said at once; only lost connections are retried
                # unacknowledged events are handed out again after the reconnect
                self._drop_connection()
                self._unacked = None
                logger.warning("subscription %s: %s; reconnecting in %.1fs", self.name, first_line(exc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            except psycopg.Error as exc:
                raise from_psycopg(exc) from exc
            if not rows:
                if self.idle_exit:
                    return
                self._stop.wait(self.poll_interval)
                continue
            batch = [Event(*row) for row in rows]
            yield batch
            # asked for the next batch: this one is handled
            if self._unacked is None:
                self._unacked = batch[-1].cursor

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, application_name=self.application_name)
            self._connected_once = True
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def ack_now(self) -> None:
        """Acknowledges what was handed out and handled so far, without waiting for the
        next poll (before a pause, say)."""
        if self._unacked is not None:
            self._connection().execute("SELECT cqrs.ack(%s, %s)", (self.name, self._unacked))
            self._unacked = None


