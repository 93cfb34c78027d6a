"""`cqrs-pg status` as a probe: exit code 0 when healthy, 3 past each threshold or with a
replica not usable; and its --json fields are the ones docs/production.md lists."""

from __future__ import annotations

import json
import re
import socket
import uuid
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from cqrs_pg.cli import main
from cqrs_pg_tools.testing import REPO, Database, scalar, seed_shop, wait_until

UNHEALTHY = 3


def status(db: Database, *args: str, replica: bool = True) -> tuple[int, dict[str, Any]]:
    extra = ["--replica-dsn", db.replica_dsn] if replica else []
    result: Result = CliRunner().invoke(main, ["status", "--json", "--dsn", db.dsn, *extra, *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    report = json.loads(result.stdout)
    assert report["healthy"] == (result.exit_code == 0) == (not report["problems"]), result.output
    return result.exit_code, report


def a_command(db: Database) -> int:
    with db.connect() as conn:
        return int(scalar(
            conn,
            "SELECT token FROM shop.register_customer(gen_random_uuid(), %s, 'Status')",
            (f"{uuid.uuid4().hex}@example.com",),
        ))


def test_healthy_without_thresholds_and_within_them(db: Database) -> None:
    code, report = status(db)
    assert code == 0 and report["problems"] == []
    a_command(db)  # behind now, but no threshold is given
    assert status(db)[0] == 0
    assert status(db, "--max-events-behind", "1000", "--max-seconds-behind", "3600", "--max-replica-lag", "3600")[0] == 0


def test_events_behind_past_the_threshold(db: Database) -> None:
    a_command(db)
    code, report = status(db, "--max-events-behind", "0")
    assert code == UNHEALTHY
    assert report["problems"] == [
        f"projection {p['name']}: 1 events behind (max 0)" for p in report["projections"]
    ]
    assert report["thresholds"]["max_events_behind"] == 0
    db.run_projections()
    assert status(db, "--max-events-behind", "0")[0] == 0


def test_seconds_behind_past_the_threshold(db: Database) -> None:
    a_command(db)
    code, report = status(db, "--max-seconds-behind", "0")
    assert code == UNHEALTHY
    assert all(re.fullmatch(r"projection \w+: [\d.]+s behind \(max 0s\)", p) for p in report["problems"]), report
    assert len(report["problems"]) == 3
    assert status(db, "--max-seconds-behind", "3600")[0] == 0


def test_replica_lag_past_the_threshold(db: Database) -> None:
    with db.connect_replica() as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        try:
            wait_until(lambda: scalar(replica, "SELECT pg_get_wal_replay_pause_state()") == "paused", "replay paused")
            a_command(db)
            code, report = status(db, "--max-replica-lag-bytes", "0", "--max-replica-lag", "0")
            assert code == UNHEALTHY
            (r,) = report["replicas"]
            assert r["reachable"] and r["in_recovery"] and r["replay_lag_bytes"] > 0 and r["replay_lag_seconds"] > 0
            assert report["problems"] == [
                f"replica {r['host']}: replay lag {r['replay_lag_seconds']:.3f}s (max 0s)",
                f"replica {r['host']}: replay lag {r['replay_lag_bytes']} bytes (max 0)",
            ]
            # Without a replica DSN: every replica attached to the primary, as it sees them.
            code, report = status(db, "--max-replica-lag-bytes", "0", replica=False)
            assert code == UNHEALTHY and report["replicas"] == []
            assert report["problems"] == [
                f"replica replica1: replay lag {report['replication'][0]['replay_lag_bytes']} bytes (max 0)"
            ]
        finally:
            replica.execute("SELECT pg_wal_replay_resume()")
    wait_until(lambda: status(db, "--max-replica-lag-bytes", "0")[0] == 0, "the replica to catch up")


def test_unreachable_replica_or_a_primary_as_replica_is_unhealthy(db: Database) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, report = status(db, "--replica-dsn", f"host=127.0.0.1 port={port} dbname={db.name} connect_timeout=2")
    assert code == UNHEALTHY
    (r,) = report["replicas"]
    assert not r["reachable"] and r["error"]
    assert report["problems"] == [f"replica 127.0.0.1:{port}: unreachable ({r['error']})"]

    code, report = status(db, "--replica-dsn", db.dsn)  # the primary, given as a replica
    assert code == UNHEALTHY and report["replicas"][0]["in_recovery"] is False
    assert report["problems"] == [f"{'replica ' + report['replicas'][0]['host']}: not a standby (promoted?)"]


def test_text_output_says_unhealthy_and_why(db: Database) -> None:
    a_command(db)
    result = CliRunner().invoke(main, ["status", "--dsn", db.dsn, "--replica-dsn", db.replica_dsn, "--max-events-behind", "0"])
    assert result.exit_code == UNHEALTHY, result.output
    assert "UNHEALTHY: projection order_summary: 1 events behind (max 0)" in result.stdout
    assert "(standby)" in result.stdout


def documented_fields() -> set[str]:
    text = (REPO / "docs" / "production.md").read_text()
    table = text.split("<!-- status-json -->", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))


def produced_fields(report: dict[str, Any]) -> set[str]:
    fields = set()
    for key, value in report.items():
        if isinstance(value, dict):
            fields.add(key)
            fields.update(f"{key}.{sub}" for sub in value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            fields.add(f"{key}[]")
            if key != "fence_blockers":  # documented once, as fence_blocker.*
                fields.update(f"{key}[].{sub}" for sub in value[0])
        elif isinstance(value, list):
            fields.add(key if key == "problems" else f"{key}[]")
        else:
            fields.add(key)
    return fields


def test_every_json_field_is_documented(db: Database) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as rebuilding:  # a rebuild under way
        rebuilding.execute("SELECT cqrs.create_subscription('docs', from_beginning => true)")
        rebuilding.execute("SELECT cqrs.rebuild_begin('customer_stats')")
        with psycopg.connect(db.dsn) as blocker:  # an open transaction holding an xid
            blocker.execute("SELECT * FROM shop.register_customer(gen_random_uuid(), 'docs@example.com', 'D')")
            _, report = status(db)
            blocker.rollback()
        rebuilding.execute("SELECT cqrs.rebuild_abort('customer_stats')")
    assert report["fence_blocker"] is not None and report["replicas"] and report["replication"]
    assert report["rebuilds"] and report["subscriptions"]
    assert produced_fields(report) == documented_fields()


@pytest.mark.parametrize("option", ["--max-events-behind", "--max-replica-lag-bytes"])
def test_a_negative_threshold_is_a_usage_error(db: Database, option: str) -> None:
    result = CliRunner().invoke(main, ["status", "--dsn", db.dsn, option, "-1"])
    assert result.exit_code == 2 and "-1" in result.output


def test_a_subscription_past_a_bound_is_unhealthy_and_listed(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("SELECT cqrs.create_subscription('billing', from_beginning => true)")
        seed_shop(conn)
    result = CliRunner().invoke(main, ["status", "--dsn", db.dsn, "--max-events-behind", "2"])
    assert result.exit_code == 3
    assert "UNHEALTHY: subscription billing: 3 events not acknowledged (max 2)" in result.output
    assert any(line.startswith("billing ") for line in result.output.splitlines())
