"""A logical move (SPEC, guarantee 9): pg_dump of a database with the engine, pg_restore
into a second cluster whose transaction ids are behind the first's, with commands before
and after. The restore is clean once the engine's roles exist; until the daemon adopts the
new cluster, read-your-writes says false (never a wrong true) and `status` says why; then
every event, old and new, is applied once and every read model equals its definition."""

from __future__ import annotations

import subprocess

import psycopg

from cqrs_pg_tools.devcluster import find_bindir
from cqrs_pg_tools.testing import (
    NO_MISMATCH,
    PROJECTIONS,
    Database,
    cli,
    new_customer,
    outbox_count,
    running_daemon,
    scalar,
    throwaway_cluster,
    wait_until,
)
from cqrs_pg_tools.verify import all_mismatches

# What docs/production.md tells an operator to run on the new cluster before pg_restore.
ROLES = ("CREATE ROLE cqrs_writer NOLOGIN; CREATE ROLE cqrs_reader NOLOGIN; CREATE ROLE cqrs_listener NOLOGIN;"
         " CREATE ROLE cqrs_consumer NOLOGIN;")


def caught_up(conn: psycopg.Connection, token: int) -> bool:
    return bool(scalar(conn, "SELECT cqrs.caught_up(%s)", (token,)))


def test_dump_and_restore_into_a_cluster_whose_ids_are_behind(db: Database, tmp_path: object) -> None:
    bindir = find_bindir()
    dump = f"{tmp_path}/app.dump"
    with db.connect() as conn:
        # the source cluster's ids well ahead of a fresh cluster's: a subtransaction that
        # writes takes an id of its own
        conn.execute("CREATE TEMP TABLE burn (i int)")
        conn.execute("DO $$ BEGIN FOR i IN 1..3000 LOOP BEGIN INSERT INTO burn VALUES (i);"
                     " EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$")
        with running_daemon(db.dsn):
            applied = new_customer(conn, "Applied before the move")
            wait_until(lambda: caught_up(conn, applied), "the first event to be applied")
        # a consumer part of the way through the stream when the dump is taken
        conn.execute("SELECT cqrs.create_subscription('audit', from_beginning => true)")
        acked = conn.execute("SELECT position, cursor FROM cqrs.poll('audit', 1)").fetchone()
        conn.execute("SELECT cqrs.ack('audit', %s)", (acked[1],))
        pending = new_customer(conn, "Committed, not applied, before the move")
        source_xid = int(scalar(conn, "SELECT pg_current_xact_id()::text"))
    subprocess.run([str(bindir / "pg_dump"), "-Fc", "-f", dump, db.dsn], check=True, capture_output=True)

    with throwaway_cluster("cqrs-pg-restore-", replicas=0) as target:
        admin = target.cluster.primary_dsn()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(ROLES)
            conn.execute("CREATE DATABASE moved")
        moved = target.cluster.primary_dsn("moved")
        restore = subprocess.run([str(bindir / "pg_restore"), "--exit-on-error", "-d", moved, dump],
                                 capture_output=True, text=True)
        assert restore.returncode == 0 and restore.stderr == "", restore.stderr

        with psycopg.connect(moved, autocommit=True) as conn:
            assert int(scalar(conn, "SELECT pg_current_xact_id()::text")) < source_xid, "ids must be behind"
            assert scalar(conn, "SELECT count(*) FROM cqrs.projections") == len(PROJECTIONS)
            after = new_customer(conn, "After the move")
            # not adopted yet: the old horizons prove nothing here, so never a wrong true
            assert not caught_up(conn, after) and not caught_up(conn, pending)
            status = cli("status", "--json", "--dsn", moved)
            assert status.returncode == 3 and '"xids_moved": true' in status.stdout, status.stdout

            with running_daemon(moved) as listener:
                wait_until(lambda: caught_up(conn, after), "the event after the move to be applied")
                # a token of the old cluster is not one of this one's: never said to be applied
                # before this cluster's ids pass it (the events it names are, see below)
                assert not caught_up(conn, pending)
                later = new_customer(conn, "Later still")
                wait_until(lambda: caught_up(conn, later), "a later event to be applied")
                assert not listener.stopping
            total = outbox_count(conn)
            assert dict(conn.execute("SELECT name, last_position FROM cqrs.projections").fetchall()) == dict.fromkeys(
                PROJECTIONS, scalar(conn, "SELECT max(position) FROM cqrs.outbox"))
            assert scalar(conn, "SELECT count(*) FROM shop_read.customer_stats") == scalar(
                conn, "SELECT count(*) FROM shop.customers")
            assert all_mismatches(conn) == NO_MISMATCH
            assert total >= 4
            # the consumer goes on after its cursor: every later event, none skipped
            polled = [r[0] for r in conn.execute("SELECT position FROM cqrs.poll('audit', 100)")]
            assert polled == [r[0] for r in conn.execute(
                "SELECT position FROM cqrs.outbox WHERE position > %s ORDER BY position", (acked[0],))]
            assert polled
            assert cli("status", "--dsn", moved).returncode == 0
