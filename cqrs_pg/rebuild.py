"""`cqrs-pg rebuild PROJECTION`: a read model built anew from the whole event log, swapped
in atomically while readers keep reading the old one and the daemon keeps running.

A sql or python projection is rebuilt in a shadow schema (cqrs.rebuild_begin), filled
batch by batch in short transactions, then caught up and swapped in one transaction
(cqrs.rebuild_finish). A sql projection's batches are applied by its apply function
(cqrs.rebuild_step); a python projection's by its registered handler, through the
daemon's own loop (cqrs_pg.projections.run_batch with rebuild: search_path names only the
shadow schema); in the final transaction the handler catches the shadow up under the
projection's lock before the swap. A materialized view is rebuilt by a refresh.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from cqrs_pg.db import connect, require_migrated, scalar
from cqrs_pg.errors import CqrsPgError, refusals
from cqrs_pg.projections import Handler, handler_for, run_batch


def rebuild(dsn: str, projection: str, batch_size: int, echo: Callable[[str], None]) -> int:
    """Rebuild one projection; returns the number of events it was built from. A python
    projection's handler must be registered in this process (cqrs_pg.projections)."""
    with connect(dsn, application_name="cqrs-pg rebuild") as conn:
        require_migrated(conn)
        kinds: dict[str, str] = dict(conn.execute("SELECT name, kind FROM cqrs.projections").fetchall())
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
        with refusals():
            if kinds[projection] == "matview":
                return _refresh(conn, projection, echo)
            return _rebuild_from_log(conn, projection, handler, batch_size, echo)


def _rebuild_from_log(
    conn: psycopg.Connection, projection: str, handler: Handler | None, batch_size: int, echo: Callable[[str], None]
) -> int:
    started = time.monotonic()
    total = scalar(conn, "SELECT count(*) FROM cqrs.outbox")
    conn.execute("SELECT cqrs.rebuild_begin(%s)", (projection,))
    try:
        return _fill_and_swap(conn, projection, handler, batch_size, echo, started, total)
    except BaseException:
        # Failed or stopped here: abandon its shadow tables (the live ones are untouched),
        # so that the next rebuild starts at once. Only a process that dies leaves an
        # interrupted rebuild behind, for `cqrs-pg rebuild --abort`.
        with contextlib.suppress(psycopg.Error):
            if not conn.closed and not conn.broken:
                conn.execute("SELECT cqrs.rebuild_abort(%s)", (projection,))
        raise


def _fill_and_swap(conn: psycopg.Connection, projection: str, handler: Handler | None, batch_size: int,
                   echo: Callable[[str], None], started: float, total: int) -> int:
    echo(f"rebuilding {projection} from {total} events in a shadow schema; readers keep the old one")
    done, next_report = 0, started + 1.0
    while True:
        if handler is None:
            row = conn.execute(
                "SELECT applied, more FROM cqrs.rebuild_step(%s, %s)", (projection, batch_size)
            ).fetchone()
            assert row is not None
            applied, more = row
        else:
            batch = run_batch(conn, projection, handler, batch_size, rebuild=True)
            applied, more = batch.applied, batch.more
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
            while run_batch(conn, projection, handler, batch_size, rebuild=True, final=True).applied:
                pass
        row = conn.execute("SELECT cqrs.rebuild_finish(%s, %s)", (projection, batch_size)).fetchone()
    assert row is not None
    return int(row[0])


def _refresh(conn: psycopg.Connection, projection: str, echo: Callable[[str], None]) -> int:
    matview = scalar(conn, "SELECT matview::text FROM cqrs.projections WHERE name = %s", (projection,))
    conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(sql.SQL(matview)))
    echo(f"refreshed {matview} (a materialized view is rebuilt by a refresh)")
    return 0


def abort(dsn: str, projection: str) -> None:
    """Abandons an interrupted rebuild (cqrs.rebuild_abort): one line when there is none,
    or when it is still running."""
    with connect(dsn, application_name="cqrs-pg rebuild") as conn:
        require_migrated(conn)
        with refusals():
            conn.execute("SELECT cqrs.rebuild_abort(%s)", (projection,))
