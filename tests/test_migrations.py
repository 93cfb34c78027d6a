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
