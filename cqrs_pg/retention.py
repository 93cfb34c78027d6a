"""Outbox retention: `cqrs-pg prune` and the daemon's scheduled prune.

The outbox is partitioned by position (1,000,000 positions a partition); cqrs.prune drops
the oldest partitions whose every event each projection (and rebuild) has passed and
whose newest event is older than the keep period, whole, never by DELETE. See
docs/production.md, "Retention".
"""

from __future__ import annotations

import re
import time
from typing import Any

import click
import psycopg
from psycopg.rows import dict_row

from cqrs_pg.config import MAX_DURATION
from cqrs_pg.db import connect, require_migrated
from cqrs_pg.errors import CqrsPgError, refusals

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+)(s|m|h|d)")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 0s, 30m, 12h or 7d."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise CqrsPgError(f"{text!r} is not a duration: give a whole number and a unit, e.g. 0s, 30m, 12h, 7d")
    seconds = int(match[1]) * UNITS[match[2]]
    if seconds > MAX_DURATION:
        raise CqrsPgError(f"{text!r} is too long a duration: at most {MAX_DURATION // UNITS['d']}d")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds and seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{seconds:g}s"


class Duration(click.ParamType):  # type: ignore[type-arg]
    """A command-line duration (0s, 30m, 12h, 7d) as seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except CqrsPgError as exc:
            self.fail(str(exc), param, ctx)


PRUNE_SQL = (
    "SELECT partition, first_position, end_position, events, bytes, newest_event"
    " FROM cqrs.prune(make_interval(secs => %s), %s)"
)


def prune(dsn: str, keep: float, dry_run: bool = False) -> dict[str, Any]:
    """Drops (dry_run: lists) the outbox partitions cqrs.prune may drop; returns them, the
    time it took and what history remains."""
    with connect(dsn, application_name="cqrs-pg prune") as conn:
        require_migrated(conn)
        started = time.monotonic()
        with refusals(), conn.cursor(row_factory=dict_row) as cur:
            try:
                dropped = list(cur.execute(PRUNE_SQL, (keep, dry_run)))
            except psycopg.errors.LockNotAvailable as exc:
                raise CqrsPgError(
                    "prune waited 5 s for its lock on cqrs.outbox and gave up, changing nothing: a long "
                    "transaction reads or writes it (pg_locks lists the sessions holding a lock on cqrs.outbox "
                    "and its partitions); try again"
                ) from exc
        seconds = time.monotonic() - started
        # what the daemon's role may read too: prune is granted to it, and it has pruned by now
        start = conn.execute("SELECT history_start FROM cqrs.outbox_status()").fetchone()
        # who keeps history, said when nothing went (subscription_status counts their backlogs)
        holder = None if dropped else conn.execute(HOLDER_SQL).fetchone()
    return {"dropped": dropped, "seconds": seconds, "history_start": start[0] if start else None,
            "holder": tuple(holder) if holder else None, "dry_run": dry_run, "keep": keep}


# The reader furthest behind, which holds history back: a projection, a subscription or a
# parked event (a retry reads it again), as cqrs.prune weighs them.
HOLDER_SQL = """
SELECT what, name, position FROM (
    SELECT 'projection' AS what, p.name, p.last_position AS position FROM cqrs.projections p
    UNION ALL
    SELECT 'subscription', s.name, s.last_position FROM cqrs.subscription_status() s
    UNION ALL
    SELECT 'parked event of', k.projection, k.position - 1 FROM cqrs.parked k WHERE k.outcome = 'parked'
) r
ORDER BY position, what, name
LIMIT 1
"""


def render(result: dict[str, Any]) -> str:
    verb = "would drop" if result["dry_run"] else "dropped"
    lines = []
    for part in result["dropped"]:
        first = part["first_position"] if part["first_position"] is not None else 1
        newest = part["newest_event"].isoformat(timespec="seconds") if part["newest_event"] else "none"
        lines.append(f"{verb} {part['partition']}: positions {first}..{part['end_position'] - 1}, "
                     f"about {part['events']:,} events, {part['bytes'] / 1e6:,.1f} MB, newest event {newest}")
    freed = sum(p["bytes"] for p in result["dropped"])
    start = result["history_start"]
    kept = "all of it" if start is None else f"from position {start} on"
    if not result["dropped"]:
        holder = result.get("holder")
        lines.append(f"nothing to drop: history kept {kept}"
                     + (f"; furthest behind: {holder[0]} {holder[1]!r}, at position {holder[2]}" if holder else "")
                     + "; a partition goes once every reader has passed all of it and its newest event is older "
                     f"than {format_duration(result['keep'])}")
    else:
        lines.append(f"{verb} {len(result['dropped'])} partition{'s' if len(result['dropped']) != 1 else ''}, "
                     f"{freed / 1e6:,.1f} MB, in {result['seconds']:.2f}s; history kept {kept}")
    return "\n".join(lines)
