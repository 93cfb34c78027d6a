"""`cqrs-pg rebuild PROJECTION`: a read model built anew from the whole event log, swapped
in atomically while readers keep reading the old one and the daemon keeps running.

A sql projection is rebuilt in a shadow schema (cqrs.rebuild_begin), filled batch by
batch in short transactions (cqrs.rebuild_step), then caught up and swapped in one
transaction (cqrs.rebuild_finish). A materialized view is rebuilt by a refresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from cqrs_pg.db import connect, require_migrated
from cqrs_pg.errors import CqrsPgError


def rebuild(dsn: str, projection: str, batch_size: int, echo: Callable[[str], None]) -> int:
    """Rebuild one projection; returns the number of events it was built from."""
    with connect(dsn, application_name="cqrs-pg rebuild") as conn:
        require_migrated(conn)
        kinds = dict(conn.execute("SELECT name, kind FROM cqrs.projections").fetchall())
        if projection not in kinds:
            raise CqrsPgError(f"no projection named {projection!r}: choose one of {', '.join(sorted(kinds))}")
        try:
            if kinds[projection] == "matview":
                return _refresh(conn, projection, echo)
            return _rebuild_from_log(conn, projection, batch_size, echo)
        except psycopg.Error as exc:
            if exc.sqlstate and exc.sqlstate.startswith("CQ"):
                raise CqrsPgError(exc.diag.message_primary or str(exc)) from exc
            raise


def _rebuild_from_log(conn: psycopg.Connection, projection: str, batch_size: int, echo: Callable[[str], None]) -> int:
    started = time.monotonic()
    total = conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone()[0]  # type: ignore[index]
    conn.execute("SELECT cqrs.rebuild_begin(%s)", (projection,))
    echo(f"rebuilding {projection} from {total} events in a shadow schema; readers keep the old one")
    done, next_report = 0, started + 1.0
    while True:
        applied, more = conn.execute(
            "SELECT applied, more FROM cqrs.rebuild_step(%s, %s)", (projection, batch_size)
        ).fetchone()  # type: ignore[misc]
        done += applied
        if time.monotonic() >= next_report:
            echo(f"  {done} events applied ({done / (time.monotonic() - started):,.0f}/s)")
            next_report += 1.0
        if not more:
            break
    # The rest (events that arrived meanwhile) and the swap, in one transaction.
    built = conn.execute("SELECT cqrs.rebuild_finish(%s, %s)", (projection, batch_size)).fetchone()[0]  # type: ignore[index]
    echo(f"rebuilt {projection} from {built} events and swapped it in ({time.monotonic() - started:.1f}s)")
    return int(built)


def _refresh(conn: psycopg.Connection, projection: str, echo: Callable[[str], None]) -> int:
    matview = conn.execute("SELECT matview::text FROM cqrs.projections WHERE name = %s", (projection,)).fetchone()[0]  # type: ignore[index]
    conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(sql.SQL(matview)))
    echo(f"refreshed {matview} (a materialized view is rebuilt by a refresh)")
    return 0
