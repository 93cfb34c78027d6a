"""Migrations: alembic upgrade/downgrade round trip, frozen SQL equal to sql/, privileges."""

from __future__ import annotations

import os
import re
import subprocess

import psycopg
import pytest

from cqrs_pg import sqlsource
from cqrs_pg.devcluster import DevCluster, find_bindir
from cqrs_pg.migrate import current_revision, head_revision, migrate
from cqrs_pg.verify import all_mismatches
from tests.conftest import REPO, Database, new_database

OUR_SCHEMAS = ("cqrs", "shop", "shop_read", "shop_proj")


def schemas(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", (list(OUR_SCHEMAS),))
    return {r[0] for r in rows}


def test_upgrade_downgrade_round_trip(empty_db: Database) -> None:
    with empty_db.connect() as conn:
        assert migrate(empty_db.dsn) == (None, head_revision())
        assert schemas(conn) == set(OUR_SCHEMAS)
        assert migrate(empty_db.dsn, "base") == (head_revision(), None)
        assert schemas(conn) == set()
        leftovers = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relname NOT LIKE 'alembic_version%'"
        ).fetchone()[0]
        assert leftovers == 0
        assert migrate(empty_db.dsn) == (None, head_revision())
        assert schemas(conn) == set(OUR_SCHEMAS)
        # and the reinstalled schema works
        receipt = conn.execute(
            "SELECT duplicate FROM shop.register_customer(gen_random_uuid(), 'round@trip.example', 'R')"
        ).fetchone()
        assert receipt == (False,)


def test_alembic_command_line_uses_cqrs_pg_dsn(empty_db: Database) -> None:
    """`alembic upgrade head` from the repository root, configured only by CQRS_PG_DSN."""
    env = {**os.environ, "CQRS_PG_DSN": empty_db.dsn}
    for args in (["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"]):
        done = subprocess.run(["alembic", *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert current_revision(empty_db.dsn) == head_revision()


def test_alembic_without_dsn_says_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CQRS_PG_DSN"}
    done = subprocess.run(["alembic", "upgrade", "head"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "CQRS_PG_DSN" in done.stderr
    assert "Traceback" not in done.stderr


def schema_dump(cluster: DevCluster, dbname: str) -> str:
    port = cluster.status()[0].port
    dump = subprocess.run(
        [str(find_bindir() / "pg_dump"), "--schema-only", "--no-owner", "-h", "127.0.0.1", "-p", str(port),
         "-U", "postgres", "--exclude-table=public.alembic_version", dbname],
        capture_output=True, text=True, check=True,
    ).stdout
    # comments, and the random key of pg_dump's \\restrict guard, differ between dumps
    return re.sub(r"^(--.*|\\(un)?restrict .*)$", "", dump, flags=re.M)


def test_migrated_schema_equals_sql_source(cluster: DevCluster, db: Database, empty_db: Database) -> None:
    """Schema drift fails here: the database that migrations build (db, cloned from the
    migrated template) equals one built straight from sql/manifest.txt. Change sql/
    without a migration that does the same, or the reverse, and this test fails."""
    with empty_db.connect() as conn:
        conn.execute(sqlsource.build())
    assert schema_dump(cluster, db.name) == schema_dump(cluster, empty_db.name)
    registry = "SELECT name, kind, apply_function::text, matview::text, event_types FROM cqrs.projections ORDER BY name"
    with db.connect() as migrated, empty_db.connect() as built:
        assert migrated.execute(registry).fetchall() == built.execute(registry).fetchall()


def test_downgrade_to_each_revision_equals_that_revision_built_directly(
    cluster: DevCluster, db: Database, empty_db: Database
) -> None:
    """Every later revision undoes itself exactly: head downgraded to 0002 has the schema
    that upgrading an empty database to 0002 builds, and downgraded to 0001 the schema
    that 0001's frozen SQL builds on its own."""
    migrate(db.dsn, "0002")
    migrate(empty_db.dsn, "0002")
    assert schema_dump(cluster, db.name) == schema_dump(cluster, empty_db.name)
    migrate(db.dsn, "0001")
    databases = new_database(cluster, None)
    built = next(databases)
    try:
        with built.connect() as conn:
            conn.execute((REPO / "migrations" / "versions" / "0001_initial.sql").read_text())
        assert schema_dump(cluster, db.name) == schema_dump(cluster, built.name)
    finally:
        next(databases, None)
    assert migrate(db.dsn) == ("0001", head_revision())


def test_frozen_sql_of_a_landed_migration_cannot_be_edited(tmp_path: pytest.TempPathFactory) -> None:
    frozen = REPO / "migrations" / "versions" / "0001_initial.sql"
    copy = tmp_path / "0001_initial.sql"  # type: ignore[operator]
    copy.write_text(frozen.read_text() + "\n-- an edit\n")
    with pytest.raises(RuntimeError, match="edited after its migration landed"):
        sqlsource.run_frozen(None, copy, sqlsource.sha256(frozen.read_text()))


def test_no_function_is_executable_by_public(db: Database) -> None:
    with db.connect() as conn:
        exposed = conn.execute(
            """
            SELECT p.oid::regprocedure::text
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = ANY(%s)
               AND (p.proacl IS NULL
                    OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))
            """,
            (list(OUR_SCHEMAS),),
        ).fetchall()
    assert exposed == []


def test_security_definer_functions_pin_search_path(db: Database) -> None:
    with db.connect() as conn:
        definers = conn.execute(
            """
            SELECT p.oid::regprocedure::text, p.proconfig
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = ANY(%s) AND p.prosecdef
            """,
            (list(OUR_SCHEMAS),),
        ).fetchall()
    assert len(definers) >= 8 + 5
    unpinned = [name for name, config in definers if "search_path=pg_catalog, pg_temp" not in (config or [])]
    assert unpinned == []


def test_group_roles_exist_and_cannot_log_in(db: Database) -> None:
    with db.connect() as conn:
        roles = dict(
            conn.execute(
                "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN ('cqrs_writer', 'cqrs_reader', 'cqrs_listener')"
            ).fetchall()
        )
    assert roles == {"cqrs_writer": False, "cqrs_reader": False, "cqrs_listener": False}


# A recording sql projection, written for 0003's apply protocol
# f(from_tx, from_position, to_tx, to_position): the upgrade keeps it running.
RECORDER_0003 = """
CREATE TABLE public.seen (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, position bigint NOT NULL);
CREATE FUNCTION public.record(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen (position) SELECT b.position FROM cqrs.batch(from_tx, from_position, to_tx, to_position) b;
END
$$;
SELECT cqrs.register_projection('seen', 'sql', 'public.record', search_path => 'public',
                                tables => ARRAY['public.seen']::regclass[]);
"""


def add_product(conn: psycopg.Connection, sku: str) -> None:
    conn.execute("SELECT shop.add_product(gen_random_uuid(), %s, 'p', 10, 10)", (sku,))


def test_upgrade_carries_checkpoints_over_exactly(empty_db: Database) -> None:
    """Checkpoints of the (tx_id, position) order become positions without applying an
    event twice or skipping one: events were applied in xid order (B's later position
    first), so the checkpoint lies before B's earlier event in position order and keeps
    A's later one as applied ahead of it. An apply function of 0003's protocol keeps
    running, and the read models come out equal to their definitions."""
    assert migrate(empty_db.dsn, "0003") == (None, "0003")
    with empty_db.connect() as conn:
        conn.execute(RECORDER_0003)
        add_product(conn, "UP-0")
        with psycopg.connect(empty_db.dsn) as a, psycopg.connect(empty_db.dsn) as b:
            a.execute("SELECT pg_current_xact_id()")  # A's id is the lower
            add_product(b, "UP-B")  # B: the earlier position, the higher id
            b.commit()
            add_product(a, "UP-A")
            a.commit()
        for name in ("seen", "order_summary", "customer_stats"):  # A's event, not B's
            while conn.execute("SELECT applied_events FROM cqrs.projections WHERE name = %s", (name,)).fetchone()[0] < 2:
                conn.execute("SELECT cqrs.run_projection(%s, 1, '0 s')", (name,))
        assert [r[0] for r in conn.execute("SELECT position FROM public.seen ORDER BY seq")] == [1, 3]

    assert migrate(empty_db.dsn) == ("0003", head_revision())
    with empty_db.connect() as conn:
        checkpoints = conn.execute(
            "SELECT name, last_position, ahead, applied_events FROM cqrs.projections WHERE kind = 'sql' ORDER BY name"
        ).fetchall()
        assert checkpoints == [(n, 1, [3], 2) for n in ("customer_stats", "order_summary", "seen")]
        add_product(conn, "UP-C")
        Database(empty_db.name, empty_db.dsn, empty_db.replica_dsn).run_projections()
        assert [r[0] for r in conn.execute("SELECT position FROM public.seen ORDER BY seq")] == [1, 3, 2, 4]
        assert conn.execute("SELECT DISTINCT applied_events FROM cqrs.projections").fetchall() == [(4,)]
        assert conn.execute("SELECT DISTINCT ahead FROM cqrs.projections").fetchall() == [([],)]
        assert all_mismatches(conn) == {"order_summary": 0, "customer_stats": 0, "product_sales": 0}


def test_downgrade_is_refused_while_a_checkpoint_has_no_earlier_form(empty_db: Database) -> None:
    """A reader that applied B's event (the earlier position, the higher id) but not yet
    A's: in (tx_id, position) order A's comes first, so 0003's checkpoint could not say
    what was applied. The downgrade is refused with one line and changes nothing; once
    every event is applied it goes through."""
    migrate(empty_db.dsn)
    with empty_db.connect() as conn:
        with psycopg.connect(empty_db.dsn) as a, psycopg.connect(empty_db.dsn) as b:
            a.execute("SELECT pg_current_xact_id()")
            add_product(b, "DOWN-B")
            b.commit()
            add_product(a, "DOWN-A")
            a.commit()
        conn.execute("SELECT cqrs.run_projection('order_summary', 1)")
        assert conn.execute("SELECT last_position FROM cqrs.projections WHERE name = 'order_summary'").fetchone() == (1,)
    with pytest.raises(Exception, match="cannot downgrade below 0004 now: projection 'order_summary'"):
        migrate(empty_db.dsn, "0003")
    assert current_revision(empty_db.dsn) == head_revision()
    Database(empty_db.name, empty_db.dsn, empty_db.replica_dsn).run_projections()
    assert migrate(empty_db.dsn, "0003") == (head_revision(), "0003")
    with empty_db.connect() as conn:
        assert conn.execute(
            "SELECT DISTINCT (p.last_tx, p.last_position) = (SELECT o.tx_id, o.position FROM cqrs.outbox o"
            "                                                ORDER BY o.tx_id DESC, o.position DESC LIMIT 1)"
            " FROM cqrs.projections p WHERE p.kind = 'sql'").fetchall() == [(True,)]
