"""`cqrs-pg status`: how far each projection is, how far each replica is, what blocks."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from cqrs_pg.db import connect, require_migrated


def _rows(conn: psycopg.Connection, query: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query))


def collect(dsn: str, replica_dsn: str | None = None) -> dict[str, Any]:
    with connect(dsn, application_name="cqrs-pg status") as conn:
        require_migrated(conn)
        projections = _rows(
            conn,
            "SELECT name, kind, last_tx::text AS last_tx, last_position, applied_events, events_behind,"
            " round(seconds_behind::numeric, 3)::float AS seconds_behind, updated_at::text AS updated_at,"
            " refreshed_at::text AS refreshed_at FROM cqrs.projection_status()",
        )
        blockers = _rows(
            conn,
            "SELECT pid, database, username, application_name, state, xid::text AS xid,"
            " round(seconds::numeric, 3)::float AS seconds, query FROM cqrs.fence_blockers()",
        )
        senders = _rows(
            conn,
            "SELECT application_name, client_addr::text AS client_addr, state,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS replay_lag_bytes,"
            " extract(epoch FROM replay_lag)::float AS replay_lag_seconds"
            " FROM pg_stat_replication ORDER BY application_name",
        )
    replica = None
    if replica_dsn:
        with connect(replica_dsn, application_name="cqrs-pg status") as conn:
            rows = _rows(
                conn,
                "SELECT pg_is_in_recovery() AS in_recovery,"
                " coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::bigint"
                "   AS replay_lag_bytes,"
                " CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
                "      ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END::float"
                "   AS replay_lag_seconds,"
                " current_setting('port')::int AS port",
            )
            replica = rows[0]
    return {"projections": projections, "fence_blockers": blockers, "replication": senders, "replica": replica}


def render(status: dict[str, Any]) -> str:
    lines = ["projection       kind     applied    behind  seconds behind  checkpoint (tx, position)"]
    for p in status["projections"]:
        lines.append(
            f"{p['name']:<16} {p['kind']:<8} {p['applied_events']:>8} {p['events_behind']:>9}"
            f" {p['seconds_behind']:>15.3f}  ({p['last_tx']}, {p['last_position']})"
        )
    lines.append("")
    if status["replication"]:
        for r in status["replication"]:
            lag_s = "n/a" if r["replay_lag_seconds"] is None else f"{r['replay_lag_seconds']:.3f}s"
            lines.append(
                f"replica {r['application_name'] or r['client_addr']}: {r['state']}, "
                f"replay lag {r['replay_lag_bytes']} bytes, {lag_s}"
            )
    else:
        lines.append("no streaming replicas attached to the primary")
    if status["replica"] is not None:
        r = status["replica"]
        lines.append(
            f"reads go to port {r['port']} ({'standby' if r['in_recovery'] else 'NOT a standby'}): "
            f"replay lag {r['replay_lag_bytes']} bytes, {r['replay_lag_seconds']:.3f}s"
        )
    lines.append("")
    if status["fence_blockers"]:
        b = status["fence_blockers"][0]
        lines.append(
            f"oldest open transaction holding the fence: pid {b['pid']} ({b['application_name']}, "
            f"{b['database']}, {b['state']}), open {b['seconds']:.1f}s"
        )
    else:
        lines.append("no open transaction holds the fence back")
    return "\n".join(lines)
