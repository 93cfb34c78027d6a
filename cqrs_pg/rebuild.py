"""`cqrs-pg rebuild PROJECTION`: a read model built anew from the whole event log, swapped
in atomically while readers keep reading the old one and the daemon keeps running.

A sql or python projection is rebuilt in a shadow schema (cqrs.rebuild_begin), filled
batch by batch in short transactions, then caught up and swapped in one transaction
(cqrs.rebuild_finish). A sql projection's batches are applied by its apply function
(cqrs.rebuild_step); a python projection's by its registered handler, as the daemon runs
it but with search_path naming only the shadow schema (cqrs.rebuild_claim,
cqrs.rebuild_events, handler, cqrs.rebuild_complete); in the final transaction the
handler catches the shadow up under the projection's lock before the swap. A
materialized view is rebuilt by a refresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from cqrs_pg.db import connect, require_migrated
from cqrs_pg.errors import CqrsPgError
from cqrs_pg.projections import Event, Handler, handler_for

CLAIM_SQL = "SELECT from_position, to_position, n, shadow_schema FROM cqrs.rebuild_claim(%s, %s, %s)"
EVENTS_SQL = (
    "SELECT position, tx_id::text::bigint AS tx_id, event_type, aggregate_type, aggregate_id, aggregate_version,"
    " payload, metadata, occurred_at FROM cqrs.rebuild_events(%s, %s, %s)"
)
COMPLETE_SQL = "SELECT cqrs.rebuild_complete(%s, %s, %s)"


def rebuild(dsn: str, projection: str, batch_size: int, echo: Callable[[str], None]) -> int:
    """Rebuild one projection; returns the number of events it was built from. A python
    projection's handler must be registered in this process (cqrs_pg.projections)."""
    with connect(dsn, application_name="cqrs-pg rebuild") as conn:
        require_migrated(conn)
        kinds = dict(conn.execute("SELECT name, kind FROM cqrs.projections").fetchall())
        if projection not in kinds:
            raise CqrsPgError(f"no projection named {projection!r}: choose one of {', '.join(sorted(kinds))}")
        handler = None
        if kinds[projection] == "python":
            handler = handler_for(projection)
            if handler is None:
                raise CqrsPgError(
                    f"{projection!r} is a python projection and no handler is registered for it: "
                    "name the module that registers it with --import MODULE, as for cqrs-pg listen"
                )
        try:
            if kinds[projection] == "matview":
                return _refresh(conn, projection, echo)
            return _rebuild_from_log(conn, projection, handler, batch_size, echo)
        except psycopg.Error as exc:
            if exc.sqlstate and exc.sqlstate.startswith("CQ"):
                raise CqrsPgError(exc.diag.message_primary or str(exc)) from exc
            raise


def apply_rebuild_batch(
    conn: psycopg.Connection, projection: str, handler: Handler, max_events: int, *, final: bool = False
) -> tuple[int, bool]:
    """One batch of a python projection's rebuild, in the caller's transaction: the next
    events after the rebuild's checkpoint, applied by `handler` to the shadow tables (its
    search_path names only the shadow schema), and the rebuild's checkpoint moved past
    them. final: take the projection's lock first; cqrs.rebuild_finish follows in this
    transaction. Returns (applied, more)."""
    row = conn.execute(CLAIM_SQL, (projection, max_events, final)).fetchone()
    assert row is not None
    from_position, to_position, n, shadow = row
    if to_position is None:
        return 0, False
    # local to this transaction: unqualified table names are the shadow's, never the live ones
    path = sql.SQL("pg_catalog, {}, pg_temp").format(sql.Identifier(shadow)).as_string(conn)
    conn.execute("SELECT set_config('search_path', %s, true)", (path,))
    with conn.cursor(row_factory=class_row(Event)) as cur:
        events = cur.execute(EVENTS_SQL, (projection, from_position, to_position)).fetchall()
    if events:
        handler(conn, events)
    conn.execute(COMPLETE_SQL, (projection, to_position, n))
    return int(n), n >= max_events


def _rebuild_from_log(
    conn: psycopg.Connection, projection: str, handler: Handler | None, batch_size: int, echo: Callable[[str], None]
) -> int:
    started = time.monotonic()
    total = conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone()[0]  # type: ignore[index]
    conn.execute("SELECT cqrs.rebuild_begin(%s)", (projection,))
    echo(f"rebuilding {projection} from {total} events in a shadow schema; readers keep the old one")
    done, next_report = 0, started + 1.0
    while True:
        if handler is None:
            applied, more = conn.execute(
                "SELECT applied, more FROM cqrs.rebuild_step(%s, %s)", (projection, batch_size)
            ).fetchone()  # type: ignore[misc]
        else:
            with conn.transaction():
                applied, more = apply_rebuild_batch(conn, projection, handler, batch_size)
        done += applied
        if time.monotonic() >= next_report:
            echo(f"  {done} events applied ({done / (time.monotonic() - started):,.0f}/s)")
            next_report += 1.0
        if not more:
            break
    built = _finish(conn, projection, handler, batch_size)
    echo(f"rebuilt {projection} from {built} events and swapped it in ({time.monotonic() - started:.1f}s)")
    return built


def _finish(conn: psycopg.Connection, projection: str, handler: Handler | None, batch_size: int) -> int:
    """The rest (events that arrived meanwhile) and the swap, in one transaction."""
    with conn.transaction():
        if handler is not None:
            # under the projection's lock (the first claim takes it): the live tables stand
            # still while the handler catches the shadow up
            while apply_rebuild_batch(conn, projection, handler, batch_size, final=True)[0]:
                pass
        row = conn.execute("SELECT cqrs.rebuild_finish(%s, %s)", (projection, batch_size)).fetchone()
    assert row is not None
    return int(row[0])


def _refresh(conn: psycopg.Connection, projection: str, echo: Callable[[str], None]) -> int:
    matview = conn.execute("SELECT matview::text FROM cqrs.projections WHERE name = %s", (projection,)).fetchone()[0]  # type: ignore[index]
    conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(sql.SQL(matview)))
    echo(f"refreshed {matview} (a materialized view is rebuilt by a refresh)")
    return 0
