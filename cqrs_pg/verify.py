"""`cqrs-pg verify [PROJECTION]`: each read model compared with its definition computed
from the write model (cqrs.verify), one line per relation.

The comparison is one REPEATABLE READ transaction, rolled back: the read model as of its
snapshot against what the state function (a materialized view's own query) computes in
the same snapshot. Equal only once the projection has applied every event that snapshot
sees, so a projection found behind is compared again, in a new snapshot, until it has
caught up or `wait` runs out.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from cqrs_pg.db import connect, require_migrated
from cqrs_pg.errors import CqrsPgError, refusals

# what makes `cqrs-pg verify` exit 3
FAILING = ("different", "halted", "behind")


def _compare(conn: psycopg.Connection, projection: str) -> list[tuple[Any, ...]]:
    with conn.transaction(force_rollback=True):
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return conn.execute("SELECT relation, outcome, differing FROM cqrs.verify(%s)", (projection,)).fetchall()


def verify(dsn: str, projection: str | None = None, wait: float = 30.0) -> list[dict[str, Any]]:
    """One result per relation (or per projection that was not compared): projection,
    relation, outcome (equal, different, halted, behind, undeclared), differing rows."""
    with connect(dsn, application_name="cqrs-pg verify") as conn:
        require_migrated(conn)
        names = [r[0] for r in conn.execute("SELECT name FROM cqrs.projections ORDER BY name")]
        if projection is not None:
            if projection not in names:
                raise CqrsPgError(f"no projection named {projection!r}: choose one of {', '.join(names) or 'none'}")
            names = [projection]
        results = []
        deadline = time.monotonic() + wait
        for name in names:
            with refusals():
                rows = _compare(conn, name)
                while rows and rows[0][1] == "behind" and time.monotonic() < deadline:
                    time.sleep(0.1)
                    rows = _compare(conn, name)
            results += [{"projection": name, "relation": relation, "outcome": outcome, "differing": differing}
                        for relation, outcome, differing in rows]
    return results


def render(results: list[dict[str, Any]], wait: float) -> str:
    lines = []
    for r in results:
        what = r["projection"] + (f" {r['relation']}" if r["relation"] else "")
        outcome = r["outcome"]
        if outcome == "equal":
            lines.append(f"{what}: equal")
        elif outcome == "different":
            lines.append(f"{what}: {r['differing']} rows differ from its definition")
        elif outcome == "halted":
            lines.append(f"{what}: halted (cqrs-pg status): not compared")
        elif outcome == "behind":
            lines.append(f"{what}: still behind the log after {wait:g}s: not compared")
        else:
            lines.append(f"{what}: no state function declared (cqrs.set_state_function): not compared")
    return "\n".join(lines) if lines else "no projections"
