"""`cqrs-pg rebuild PROJECTION`: a read model built anew, swapped in atomically while
readers keep reading the old one and the daemon keeps running.

A sql or python projection is rebuilt in a shadow schema (cqrs.rebuild_begin): loaded
from the write model's current state when it declares a state function
(cqrs.rebuild_load, one REPEATABLE READ transaction), else from the whole event log; then
filled from the log batch by batch in short transactions (after the load, only the
events its snapshot did not see), and caught up and swapped in one transaction
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


def rebuild(dsn: str, projection: str, batch_size: int, echo: Callable[[str], None], source: str | None = None) -> int:
    """Rebuild one projection; returns the number of events it applied from the log. From
    its state function when it declares one (source None or "state"), else from the log
    (or with source "log"). A python projection's handler must be registered in this
    process (cqrs_pg.projections)."""
    with connect(dsn, application_name="cqrs-pg rebuild") as conn:
        require_migrated(conn)
        rows = conn.execute("SELECT name, kind, state_function IS NOT NULL FROM cqrs.projections").fetchall()
        kinds: dict[str, str] = {name: kind for name, kind, _ in rows}
        declared = {name for name, _, has in rows if has}
        if projection not in kinds:
            raise CqrsPgError(f"no projection named {projection!r}: choose one of {', '.join(sorted(kinds))}")
        if source == "state" and projection not in declared:
            raise CqrsPgError(
                f"{projection!r} declares no state function to rebuild from (cqrs.set_state_function): "
                "rebuild it from the log (leave out --from)"
            )
        from_state = projection in declared and source != "log"
        if not from_state and kinds[projection] != "matview":
            start = scalar(conn, "SELECT history_start FROM cqrs.outbox_status()")
            if start is not None:
                raise CqrsPgError(
                    f"the outbox's history before position {start} was pruned: {projection!r} cannot be rebuilt "
                    "from the log; " + ("rebuild it from the write model's state (leave out --from log)"
                                        if projection in declared else
                                        "declare how its read model is computed from the write model "
                                        "(cqrs.set_state_function), then rebuild it")
                )
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
            return _rebuild(conn, projection, handler, batch_size, echo, from_state)


def _rebuild(conn: psycopg.Connection, projection: str, handler: Handler | None, batch_size: int,
             echo: Callable[[str], None], from_state: bool) -> int:
    started = time.monotonic()
    conn.execute("SELECT cqrs.rebuild_begin(%s)", (projection,))
    try:
        if from_state:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                resumed = scalar(conn, "SELECT cqrs.rebuild_load(%s)", (projection,))
            echo(f"loaded {projection} from the write model's state in a shadow schema "
                 f"({time.monotonic() - started:.1f}s); readers keep the old one; "
                 f"the log from position {resumed} on follows")
        else:
            total = scalar(conn, "SELECT count(*) FROM cqrs.outbox")
            echo(f"rebuilding {projection} from {total} events in a shadow schema; readers keep the old one")
        return _fill_and_swap(conn, projection, handler, batch_size, echo, started)
    except BaseException:
        # Failed or stopped here: abandon its shadow tables (the live ones are untouched),
        # so that the next rebuild starts at once. Only a process that dies leaves an
        # interrupted rebuild behind, for `cqrs-pg rebuild --abort`.
        with contextlib.suppress(psycopg.Error):
            if not conn.closed and not conn.broken:
                conn.execute("SELECT cqrs.rebuild_abort(%s)", (projection,))
        raise


def _fill_and_swap(conn: psycopg.Connection, projection: str, handler: Handler | None, batch_size: int,
                   echo: Callable[[str], None], started: float) -> int:
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
        waiting = not more and _before_snapshot_end(conn, projection)
        if time.monotonic() >= next_report:
            echo(f"  {done} events applied ({done / (time.monotonic() - started):,.0f}/s)"
                 + (", waiting for transactions open when the state was loaded" if waiting else ""))
            next_report += 1.0
        if waiting:
            time.sleep(0.02)
        elif not more:
            break
    built = _finish(conn, projection, handler, batch_size)
    echo(f"rebuilt {projection} ({built} events from the log) and swapped it in ({time.monotonic() - started:.1f}s)")
    return built


def _before_snapshot_end(conn: psycopg.Connection, projection: str) -> bool:
    """A rebuild loaded from state has not yet applied every position up to its
    snapshot's end: events of transactions open at the load may still come below it, and
    the swap waits for them (cqrs.rebuild_finish refuses it until then)."""
    return bool(scalar(conn, "SELECT coalesce(last_position < snapshot_position, false) FROM cqrs.rebuilds"
                             " WHERE projection = %s", (projection,)))


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
