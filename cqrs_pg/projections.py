"""Python handler projections: kind 'python' in cqrs.projections, applied by a function
registered here under the projection's name.

    from cqrs_pg.projections import register

    @register("customer_orders_by_status")
    def apply(conn, events):
        for e in events:
            ...  # conn.execute(...): unqualified table names resolve in the projection's search_path

The daemon (`cqrs-pg listen --import MODULE`, which imports the modules that register
handlers) runs each batch in ONE transaction: cqrs.claim_batch (the projection's lock and
the next batch, up to what may be read), cqrs.batch_events, handler(conn, events),
cqrs.complete_batch (the checkpoint). The handler's writes and the checkpoint commit
together, so a daemon killed at any moment neither loses nor repeats an event; a handler
that raises rolls the whole batch back. See docs/adding-a-projection.md.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from cqrs_pg.errors import CqrsPgError


@dataclass(frozen=True)
class Event:
    """One row of cqrs.outbox (tx_id as an int, as receipts' tokens are)."""

    position: int
    tx_id: int
    event_type: str
    aggregate_type: str
    aggregate_id: uuid.UUID
    aggregate_version: int
    payload: dict[str, Any]
    metadata: dict[str, Any]
    occurred_at: datetime
    # the payload's shape, the newest of its event type: older ones arrive upcast
    payload_version: int = 1


Handler = Callable[[psycopg.Connection, list[Event]], None]

_handlers: dict[str, Handler] = {}


def register(name: str) -> Callable[[Handler], Handler]:
    """Decorator: `handler(conn, events)` applies batches of the python projection `name`."""

    def decorate(handler: Handler) -> Handler:
        known = _handlers.get(name)
        if known is not None and _qualname(known) != _qualname(handler):
            raise ValueError(f"projection {name!r} already has a handler: {_qualname(known)}")
        _handlers[name] = handler
        return handler

    return decorate


def handler_for(name: str) -> Handler | None:
    """The handler registered for projection `name`, or None."""
    return _handlers.get(name)


def unregister(name: str) -> None:
    _handlers.pop(name, None)


def import_modules(modules: Iterable[str]) -> None:
    """Import modules that register handlers (`cqrs-pg listen --import MODULE`), found as
    `python -m` finds them: from the current directory first, then the installed ones. A
    module that cannot be found, or fails while it is imported, is one line."""
    modules = list(modules)
    if modules and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise CqrsPgError(f"cannot import {module!r} (--import): {exc}") from exc
        except Exception as exc:  # the module's own error, reported in one line
            where = ""
            if isinstance(exc, SyntaxError) and exc.filename:
                where = f" ({exc.filename}, line {exc.lineno})"
            raise CqrsPgError(f"importing {module!r} (--import) failed: {type(exc).__name__}: {exc}{where}") from exc


@dataclass(frozen=True)
class BatchResult:
    applied: int
    more: bool
    busy: bool
    # seconds from the start to the commit (which waits for the disk, not for the CPU)
    work_seconds: float = 0.0


CLAIM_SQL = "SELECT from_position, to_position, n, busy, search_path FROM cqrs.claim_batch(%s, %s, %s, %s)"
EVENTS_SQL = (
    "SELECT position, tx_id::text::bigint AS tx_id, event_type, aggregate_type, aggregate_id, aggregate_version,"
    " payload, metadata, occurred_at, payload_version FROM cqrs.batch_events(%s, %s, %s)"
)
COMPLETE_SQL = "SELECT cqrs.complete_batch(%s, %s, %s, %s, %s)"


def run_batch(
    conn: psycopg.Connection, name: str, handler: Handler, max_events: int, *, rebuild: bool = False,
    final: bool = False,
) -> BatchResult:
    """Apply the next batch of python projection `name` with `handler`, checkpoint
    included, in one transaction on `conn` (a savepoint when `conn` is in one already):
    the daemon's batch, or with rebuild a batch of the projection's rebuild into its shadow
    tables (final: with the projection's lock held, for cqrs.rebuild_finish to follow in
    the caller's transaction). The handler's unqualified table names resolve in the
    search_path the claim names: the projection's schemas, or only the shadow schema."""
    started = time.monotonic()
    with conn.transaction():
        row = conn.execute(CLAIM_SQL, (name, max_events, rebuild, final)).fetchone()
        assert row is not None
        from_position, to_position, n, busy, search_path = row
        if busy or to_position is None:
            return BatchResult(0, False, bool(busy), time.monotonic() - started)
        # local to this transaction, like the SET clause of a sql projection's apply call
        conn.execute("SELECT set_config('search_path', %s, true)", (f"pg_catalog, {search_path}, pg_temp",))
        events = read_events(conn, name, from_position, to_position)
        if events:
            handler(conn, events)
        conn.execute(COMPLETE_SQL, (name, to_position, n, max_events, rebuild))
        work = time.monotonic() - started
    return BatchResult(int(n), n >= max_events, False, work)


def read_events(conn: psycopg.Connection, name: str, from_position: int, to_position: int) -> list[Event]:
    """The events after from_position up to to_position that python projection `name`
    sees, in the transaction that claimed them."""
    with conn.cursor(row_factory=class_row(Event)) as cur:
        return cur.execute(EVENTS_SQL, (name, from_position, to_position)).fetchall()


def _qualname(handler: Handler) -> str:
    """Where a handler is defined: its module, name and first line. The same definition
    registered again (its module imported again) is no conflict; two definitions of one
    name in one module (a copied decorator) are."""
    name = f"{getattr(handler, '__module__', '?')}.{getattr(handler, '__qualname__', repr(handler))}"
    code = getattr(handler, "__code__", None)
    return name if code is None else f"{name} (line {code.co_firstlineno})"
