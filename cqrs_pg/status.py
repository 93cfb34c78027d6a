"""`cqrs-pg status`: how far each projection and subscription is, how far each replica is, what blocks,
and whether that is healthy by the thresholds given (the exit code of a probe).

The JSON form (``--json``) is ``collect()``'s dict; docs/production.md lists its fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from cqrs_pg.db import connect, require_migrated, scalar
from cqrs_pg.routing import replica_hosts

# Exit code of `cqrs-pg status` when a threshold is passed or a replica is not usable
# (1 means status itself could not run: no DSN, primary unreachable, not migrated).
UNHEALTHY = 3


@dataclass(frozen=True)
class Thresholds:
    """Past any of these (None: not checked), status reports unhealthy."""

    max_events_behind: int | None = None
    max_seconds_behind: float | None = None
    max_replica_lag: float | None = None  # seconds
    max_replica_lag_bytes: int | None = None


def _rows(conn: psycopg.Connection, query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query, params))


def collect(dsn: str, replica_dsn: str | None = None, thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The status report as a dict (what --json prints)."""
    thresholds = thresholds or Thresholds()
    with connect(dsn, application_name="cqrs-pg status") as conn:
        require_migrated(conn)
        projections = _rows(
            conn,
            "SELECT name, kind, last_tx::text AS last_tx, last_position, horizon::text AS horizon, applied_events,"
            " events_behind, round(seconds_behind::numeric, 3)::float AS seconds_behind,"
            " updated_at::text AS updated_at, refreshed_at::text AS refreshed_at, state, on_error,"
            " failed_position, failed_event_type, failed_error, failed_sqlstate, failed_attempts,"
            " failed_at::text AS failed_at, parked, skipped, held_by_pid, held_by_user, held_by_application,"
            " held_by_state, round(held_seconds::numeric, 3)::float AS held_seconds FROM cqrs.projection_status()",
        )
        # The transaction at the fence is the one with the oldest xid, listed first.
        blockers = _rows(
            conn,
            "SELECT pid, database, username, application_name, state, xid::text AS xid,"
            " round(seconds::numeric, 3)::float AS seconds, query_start::text AS query_start, query"
            " FROM cqrs.fence_blockers() ORDER BY age(xid) DESC, seconds DESC",
        )
        # As the primary sees each attached replica (lsn columns need pg_monitor: else null).
        senders = _rows(
            conn,
            "SELECT application_name, client_addr::text AS client_addr, state,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS replay_lag_bytes,"
            " CASE WHEN replay_lsn = pg_current_wal_lsn() THEN 0"
            "      ELSE extract(epoch FROM replay_lag) END::float AS replay_lag_seconds"
            " FROM pg_stat_replication ORDER BY application_name, client_addr",
        )
        primary_lsn = scalar(conn, "SELECT pg_current_wal_lsn()::text")
        xids_moved = bool(scalar(conn, "SELECT cqrs._xids_moved()"))
        rebuilds = _rows(
            conn,
            "SELECT projection, started_at::text AS started_at, last_position, applied_events, pid, running"
            " FROM cqrs.rebuild_status()",
        )
        subscriptions = _rows(
            conn,
            "SELECT name, event_types, aggregate_types, last_position, delivered_position, events_behind,"
            " round(seconds_behind::numeric, 3)::float AS seconds_behind, acked_events, held_by_pid,"
            " held_until::text AS held_until, created_at::text AS created_at, polled_at::text AS polled_at,"
            " acked_at::text AS acked_at FROM cqrs.subscription_status()",
        )
        outbox = _rows(
            conn,
            "SELECT history_start, partitions, bytes, ready_ahead, overflow_events FROM cqrs.outbox_status()",
        )[0]
    hosts = replica_hosts(replica_dsn, target_session_attrs=None) if replica_dsn else []
    replicas = [_replica(host.label, host.conninfo, primary_lsn) for host in hosts]
    report: dict[str, Any] = {
        "healthy": True,
        "problems": [],
        "thresholds": asdict(thresholds),
        "projections": projections,
        "subscriptions": subscriptions,
        "fence_blocker": blockers[0] if blockers else None,
        "fence_blockers": blockers,
        "replicas": replicas,
        "xids_moved": xids_moved,
        "rebuilds": rebuilds,
        "outbox": outbox,
        "replication": senders,
    }
    report["problems"] = problems(report, thresholds)
    report["healthy"] = not report["problems"]
    return report


def _replica(label: str, conninfo: str, primary_lsn: str) -> dict[str, Any]:
    """One host of the replica DSN, measured against the primary's WAL position."""
    entry: dict[str, Any] = {
        "host": label,
        "reachable": False,
        "in_recovery": None,
        "replay_lag_bytes": None,
        "replay_lag_seconds": None,
        "error": None,
    }
    try:
        # target_session_attrs=any: report a promoted replica, do not skip it.
        with psycopg.connect(
            conninfo, autocommit=True, connect_timeout=5, target_session_attrs="any", application_name="cqrs-pg status"
        ) as conn:
            row = _rows(
                conn,
                "SELECT pg_is_in_recovery() AS in_recovery,"
                " greatest(pg_wal_lsn_diff(%(lsn)s::pg_lsn, pg_last_wal_replay_lsn()), 0)::bigint AS replay_lag_bytes,"
                " CASE WHEN pg_last_wal_replay_lsn() >= %(lsn)s::pg_lsn THEN 0"
                "      ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END::float AS replay_lag_seconds",
                {"lsn": primary_lsn},
            )[0]
    except psycopg.Error as exc:
        text = " ".join(str(exc).split())
        entry["error"] = text or type(exc).__name__
        return entry
    entry["reachable"] = True
    entry.update(row)
    if not row["in_recovery"]:
        entry["replay_lag_bytes"] = entry["replay_lag_seconds"] = None
    return entry


def problems(report: dict[str, Any], t: Thresholds) -> list[str]:
    """What is unhealthy, one line each, by the thresholds (and unusable replicas)."""
    found = []
    if report.get("xids_moved"):
        found.append(
            "the engine holds transaction ids of another cluster (a logical dump and restore): read-your-writes "
            "answers false until they are rebased; start `cqrs-pg listen`, or run SELECT cqrs.adopt_cluster()"
        )
    for p in report["projections"]:
        if p["state"] == "halted":
            found.append(
                f"projection {p['name']}: halted at event {p['failed_position']} ({p['failed_event_type']}) after "
                f"{p['failed_attempts']} tries: {p['failed_error']}"
                + (f" [SQLSTATE {p['failed_sqlstate']}]" if p["failed_sqlstate"] else "")
                + f"; `cqrs-pg retry {p['name']}` once fixed, or `cqrs-pg skip {p['name']} --position {p['failed_position']}`"
            )
        if t.max_events_behind is not None and p["events_behind"] > t.max_events_behind:
            found.append(f"projection {p['name']}: {p['events_behind']} events behind (max {t.max_events_behind})")
        if t.max_seconds_behind is not None and p["seconds_behind"] > t.max_seconds_behind:
            found.append(f"projection {p['name']}: {p['seconds_behind']:.3f}s behind (max {t.max_seconds_behind:g}s)")
    for sub in report.get("subscriptions", []):
        if t.max_events_behind is not None and sub["events_behind"] > t.max_events_behind:
            found.append(f"subscription {sub['name']}: {sub['events_behind']} events not acknowledged "
                         f"(max {t.max_events_behind})")
        if t.max_seconds_behind is not None and sub["seconds_behind"] > t.max_seconds_behind:
            found.append(f"subscription {sub['name']}: {sub['seconds_behind']:.3f}s behind (max {t.max_seconds_behind:g}s)")
    # Replica lag: the hosts reads go to when a replica DSN is given, else every
    # replica attached to the primary.
    for r in report["replicas"]:
        if not r["reachable"]:
            found.append(f"replica {r['host']}: unreachable ({r['error']})")
        elif not r["in_recovery"]:
            found.append(f"replica {r['host']}: not a standby (promoted?)")
        else:
            found.extend(_lag(f"replica {r['host']}", r, t))
    if not report["replicas"]:
        for r in report["replication"]:
            found.extend(_lag(f"replica {r['application_name'] or r['client_addr']}", r, t))
    return found


def _lag(name: str, r: dict[str, Any], t: Thresholds) -> list[str]:
    seconds, size = r["replay_lag_seconds"], r["replay_lag_bytes"]
    found = []
    if t.max_replica_lag is not None and seconds is not None and seconds > t.max_replica_lag:
        found.append(f"{name}: replay lag {seconds:.3f}s (max {t.max_replica_lag:g}s)")
    if t.max_replica_lag_bytes is not None and size is not None and size > t.max_replica_lag_bytes:
        found.append(f"{name}: replay lag {size} bytes (max {t.max_replica_lag_bytes})")
    return found


def render(status: dict[str, Any]) -> str:
    lines = ["projection       kind     state    applied    behind  seconds behind  checkpoint  parked"]
    for p in status["projections"]:
        lines.append(
            f"{p['name']:<16} {p['kind']:<8} {p['state']:<8} {p['applied_events']:>8} {p['events_behind']:>9}"
            f" {p['seconds_behind']:>15.3f}  {p['last_position']:>10}  {p['parked']:>6}"
        )
    for p in status["projections"]:
        if p["held_by_pid"] is not None and not (
            (p["held_by_application"] or "").startswith("cqrs-pg listen") and (p["held_seconds"] or 0) < 5
        ):
            lines.append(
                f"  {p['name']} held by pid {p['held_by_pid']} (user {p['held_by_user']}, application "
                f"{p['held_by_application']!r}"
                + (f", {p['held_by_state']}, open {p['held_seconds']:.1f}s" if p["held_by_state"] is not None else "")
                + ")"
            )
        if p["state"] == "halted":
            lines.append(
                f"  {p['name']} halted at event {p['failed_position']} ({p['failed_event_type']}), "
                f"{p['failed_attempts']} tries, since {p['failed_at']}: {p['failed_error']}"
            )
    if status.get("subscriptions"):
        lines.append("subscription     acked     behind  seconds behind    cursor  held by")
        for sub in status["subscriptions"]:
            lines.append(
                f"{sub['name']:<16} {sub['acked_events']:>8} {sub['events_behind']:>9} {sub['seconds_behind']:>15.3f}"
                f"  {sub['last_position']:>8}  " + ("-" if sub["held_by_pid"] is None else f"pid {sub['held_by_pid']}")
            )
    for b in status.get("rebuilds", []):
        lines.append(
            f"  rebuild of {b['projection']} since {b['started_at']}: "
            + (f"running (pid {b['pid']}), at position {b['last_position']}" if b["running"] else
               f"interrupted at position {b['last_position']}: `cqrs-pg rebuild --abort {b['projection']}`, "
               "then rebuild again")
        )
    o = status.get("outbox")
    if o is not None:
        kept = "all of it" if o["history_start"] is None else f"from position {o['history_start']} on (pruned before)"
        lines.append(
            f"outbox: {o['partitions']} partitions, {o['bytes'] / 1e6:,.1f} MB, history kept {kept}; "
            f"{o['ready_ahead']:,} positions ready ahead"
            + (f"; {o['overflow_events']:,} events beyond them, in cqrs.outbox_default until the daemon "
               "(cqrs.extend_outbox) moves them" if o["overflow_events"] else "")
        )
    lines.append("")
    for r in status["replicas"]:
        if not r["reachable"]:
            lines.append(f"reads: replica {r['host']} unreachable: {r['error']}")
        elif not r["in_recovery"]:
            lines.append(f"reads: replica {r['host']} (NOT a standby)")
        else:
            lines.append(
                f"reads: replica {r['host']} (standby): replay lag {r['replay_lag_bytes']} bytes, "
                f"{_seconds(r['replay_lag_seconds'])}"
            )
    if status["replication"]:
        for r in status["replication"]:
            size = "n/a" if r["replay_lag_bytes"] is None else f"{r['replay_lag_bytes']} bytes"
            lines.append(
                f"attached: replica {r['application_name'] or r['client_addr']}: {r['state']}, "
                f"replay lag {size}, {_seconds(r['replay_lag_seconds'])}"
            )
    else:
        lines.append("no streaming replicas attached to the primary")
    lines.append("")
    b = status["fence_blocker"]
    if b is not None:
        lines.append(
            f"oldest open transaction holding the fence: pid {b['pid']} ({b['application_name']}, "
            f"{b['database']}, {b['state']}), open {b['seconds']:.1f}s"
        )
    else:
        lines.append("no open transaction holds the fence back")
    if status["problems"]:
        lines.append("")
        lines.extend(f"UNHEALTHY: {problem}" for problem in status["problems"])
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}s"


__all__ = ["UNHEALTHY", "Thresholds", "collect", "problems", "render"]
