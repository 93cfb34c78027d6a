"""A projection's failed events, for operators: `cqrs-pg parked`, `cqrs-pg retry`,
`cqrs-pg skip`.

The daemon retries a failing batch, narrows it to the event that fails, then acts by the
projection's policy (``on_error`` of cqrs.register_projection): ``halt`` stays at the event
until an operator retries or skips it; ``park`` sets it aside in cqrs.parked and goes on.
These read and change that state through SQL functions (sql/cqrs/functions/), so they do
the same from psql.
"""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row

from cqrs_pg.db import connect, require_migrated
from cqrs_pg.errors import CqrsPgError, refusals

PARKED_SQL = (
    "SELECT projection, position, event_type, outcome, error, sqlstate, attempts, at::text AS at, retry"
    " FROM cqrs.parked WHERE %(projection)s::text IS NULL OR projection = %(projection)s"
    " ORDER BY projection, position"
)


def parked(dsn: str, projection: str | None = None) -> list[dict[str, Any]]:
    """Events set aside (outcome 'parked') or skipped by an operator ('skipped')."""
    with connect(dsn, application_name="cqrs-pg parked") as conn:
        require_migrated(conn)
        if projection is not None and conn.execute(
            "SELECT 1 FROM cqrs.projections WHERE name = %s", (projection,)
        ).fetchone() is None:
            raise CqrsPgError(f"projection {projection!r} does not exist")
        with conn.cursor(row_factory=dict_row) as cur:
            return list(cur.execute(PARKED_SQL, {"projection": projection}))


def retry(dsn: str, projection: str) -> tuple[int | None, int]:
    """A halted projection tries its failing event again, and its parked events are
    queued to be applied again. Returns the event it was halted at (None: it was running)
    and how many parked events were queued."""
    with connect(dsn, application_name="cqrs-pg retry") as conn:
        require_migrated(conn)
        with refusals():
            row = conn.execute("SELECT halted_at, queued FROM cqrs.retry_projection(%s)", (projection,)).fetchone()
    assert row is not None
    return row[0], row[1]


def skip(dsn: str, projection: str, position: int) -> None:
    """A projection halted at event `position` records it as skipped and goes on."""
    with connect(dsn, application_name="cqrs-pg skip") as conn:
        require_migrated(conn)
        with refusals():
            conn.execute("SELECT cqrs.skip_event(%s, %s)", (projection, position))


def render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no parked or skipped events"
    lines = ["projection       position  event type          outcome  tries  when                           error"]
    for r in rows:
        error = r["error"] or ""
        if r["sqlstate"]:
            error += f" [SQLSTATE {r['sqlstate']}]"
        outcome = r["outcome"] + ("*" if r["retry"] else "")
        lines.append(
            f"{r['projection']:<16} {r['position']:>8}  {r['event_type']:<18}  {outcome:<8} {r['attempts']:>5}"
            f"  {r['at']:<30} {error}"
        )
    if any(r["retry"] for r in rows):
        lines.append("* queued by `cqrs-pg retry`: a running daemon applies it again")
    return "\n".join(lines)
