"""Migrations: the engine alone, the example beside it, everything removed again; schemas
equal to sql/, landed revisions unchanged, privileges."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import psycopg
import pytest

from cqrs_pg import core
from cqrs_pg.errors import ConfigError
from cqrs_pg.migrate import current_revisions, head_revisions, migrate
from cqrs_pg_tools import sqlsource
from cqrs_pg_tools.devcluster import DevCluster
from cqrs_pg_tools.testing import REPO, Database, new_database, schema_dump

ENGINE_SCHEMAS = {"cqrs"}
EXAMPLE_SCHEMAS = {"shop", "shop_read", "shop_proj"}
OUR_SCHEMAS = tuple(ENGINE_SCHEMAS | EXAMPLE_SCHEMAS)


def schemas(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s) OR nspname LIKE 'cqrs\\_rebuild\\_%%'",
        (list(OUR_SCHEMAS),),
    )
    return {r[0] for r in rows}


def test_the_engine_alone_then_the_example_then_nothing(empty_db: Database) -> None:
    """`migrate` installs schema cqrs and nothing else; `--example shop` adds the example; a
    plain migrate leaves it; `--to base` removes all of it, a rebuild's shadow schema too;
    and it all installs again."""
    heads = head_revisions()
    assert set(heads) == {"cqrs", "shop"}
    with empty_db.connect() as conn:
        assert migrate(empty_db.dsn) == ([], [heads["cqrs"]])
        assert schemas(conn) == ENGINE_SCHEMAS
        assert conn.execute("SELECT count(*) FROM cqrs.projections").fetchone()[0] == 0
        assert migrate(empty_db.dsn, example="shop") == ([heads["cqrs"]], sorted(heads.values()))
        assert schemas(conn) == set(OUR_SCHEMAS)
        assert migrate(empty_db.dsn) == (sorted(heads.values()), sorted(heads.values()))
        assert schemas(conn) == set(OUR_SCHEMAS)
        conn.execute("SELECT cqrs.rebuild_begin('order_summary')")
        assert "cqrs_rebuild_order_summary" in schemas(conn)
        assert migrate(empty_db.dsn, "base") == (sorted(heads.values()), [])
        assert schemas(conn) == set()
        leftovers = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
        ).fetchone()[0]
        assert leftovers == 0, "alembic's own table goes too"
        assert migrate(empty_db.dsn, example="shop") == ([], sorted(heads.values()))
        receipt = conn.execute(
            "SELECT duplicate FROM shop.register_customer(gen_random_uuid(), 'round@trip.example', 'R')"
        ).fetchone()
        assert receipt == (False,)


def test_the_example_alone_goes_and_leaves_the_engine_clean(empty_db: Database) -> None:
    """`alembic downgrade shop@base`: the example's schemas, projections and generated
    capture functions go; the engine stays, as a plain install leaves it."""
    migrate(empty_db.dsn, example="shop")
    env = {**os.environ, "CQRS_PG_DSN": empty_db.dsn}
    done = subprocess.run(["alembic", "downgrade", "shop@base"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with empty_db.connect() as conn:
        assert schemas(conn) == ENGINE_SCHEMAS
        assert conn.execute("SELECT count(*) FROM cqrs.projections").fetchone()[0] == 0
        assert conn.execute(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'cqrs'::regnamespace AND proname LIKE '\\_capture%%'"
        ).fetchone()[0] == 0
    assert current_revisions(empty_db.dsn) == [head_revisions()["cqrs"]]


def test_a_revision_after_the_baseline_upgrades_data_and_refuses_to_go_back(empty_db: Database) -> None:
    """A database at the baseline with projections and events upgrades in place (existing
    projections keep their checkpoints and run with the default policy); going back to a
    revision after base is refused in one line and changes nothing."""
    heads = head_revisions()
    assert heads["cqrs"] != "cqrs_0001", "the test needs a revision after the baseline"
    migrate(empty_db.dsn, "cqrs_0001")
    with empty_db.connect() as conn:
        conn.execute("CREATE TABLE public.t (id bigint PRIMARY KEY)")
        conn.execute("CREATE FUNCTION public.apply_t(a bigint, b bigint) RETURNS void LANGUAGE sql AS ''")
        conn.execute("SELECT cqrs.register_projection('t', 'sql', 'public.apply_t', search_path => 'public',"
                     " tables => ARRAY['public.t']::regclass[])")
        conn.execute("UPDATE cqrs.projections SET last_position = 7")
        migrate(empty_db.dsn)
        assert current_revisions(empty_db.dsn) == [heads["cqrs"]]
        assert conn.execute("SELECT last_position, on_error, state FROM cqrs.projections").fetchone() == (7, "halt", "running")
        with pytest.raises(ConfigError, match="forward-only") as refused:
            migrate(empty_db.dsn, "cqrs_0001")
        assert "\n" not in str(refused.value)
        assert current_revisions(empty_db.dsn) == [heads["cqrs"]]
        conn.execute("DROP TABLE public.t CASCADE")


def test_alembic_command_line_uses_cqrs_pg_dsn(empty_db: Database) -> None:
    """`alembic` from the repository root, configured only by CQRS_PG_DSN."""
    env = {**os.environ, "CQRS_PG_DSN": empty_db.dsn}
    for args in (["upgrade", "cqrs@head"], ["upgrade", "heads"], ["downgrade", "base"], ["upgrade", "heads"]):
        done = subprocess.run(["alembic", *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert current_revisions(empty_db.dsn) == sorted(head_revisions().values())


def test_alembic_without_dsn_says_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CQRS_PG_DSN"}
    done = subprocess.run(["alembic", "upgrade", "heads"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "CQRS_PG_DSN" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_database_of_a_folded_pre_release_is_refused_in_one_line(empty_db: Database) -> None:
    with empty_db.connect() as conn:
        conn.execute("CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO public.alembic_version VALUES ('0004')")
    with pytest.raises(ConfigError, match=r"revision 0004, which this cqrs_pg does not have") as err:
        migrate(empty_db.dsn)
    assert "\n" not in str(err.value)
    with empty_db.connect() as conn:
        assert schemas(conn) == set()


@pytest.mark.parametrize("example", [None, "shop"])
def test_migrated_schema_equals_sql_source(cluster: DevCluster, example: str | None) -> None:
    """Schema drift fails here: a database migrated to head (the engine, and the example)
    equals one built straight from sql/'s manifests. Change sql/ without a migration that
    does the same, or the reverse, and this test fails."""
    migrated_dbs, built_dbs = new_database(cluster, None), new_database(cluster, None)
    migrated, built = next(migrated_dbs), next(built_dbs)
    try:
        migrate(migrated.dsn, example=example)
        with built.connect() as conn:
            for component in ("cqrs",) if example is None else ("cqrs", example):
                conn.execute(sqlsource.build(component).encode())
        assert schema_dump(cluster, migrated.name) == schema_dump(cluster, built.name)
        registry = ("SELECT name, kind, apply_function, matview, event_types, state_function"
                    " FROM cqrs.projections ORDER BY name")
        with migrated.connect() as m, built.connect() as b:
            assert m.execute(registry).fetchall() == b.execute(registry).fetchall()
    finally:
        next(migrated_dbs, None)
        next(built_dbs, None)


def revision_files() -> list[str]:
    root = core.migrations_dir()
    return sorted(p.relative_to(root).as_posix() for p in (root / "versions").rglob("*") if p.suffix in (".py", ".sql")
                  and p.name != "__init__.py")


def test_every_landed_revision_is_recorded_unchanged() -> None:
    """migrations/checksums.txt records each revision file's SHA-256: a landed revision
    never changes. A new revision adds its lines (printed below when missing)."""
    recorded = core.checksums()
    root = core.migrations_dir()
    actual = {name: core.sha256((root / name).read_text()) for name in revision_files()}
    missing = [f"{digest}  {name}" for name, digest in actual.items() if name not in recorded]
    assert not missing, "record the new revision's files in migrations/checksums.txt:\n" + "\n".join(missing)
    assert set(recorded) == set(actual), "checksums.txt names files that are not there"
    changed = [name for name, digest in actual.items() if recorded[name] != digest]
    assert changed == [], "a landed revision was changed: change the schema in a new revision instead"


def test_a_revision_changed_after_it_landed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = core.migrations_dir() / "versions" / "cqrs" / "0001_engine.sql"
    recorded = core.checksums()
    monkeypatch.setattr(core, "checksums", lambda: {**recorded, "versions/cqrs/0001_engine.sql": "0" * 64})
    with pytest.raises(ConfigError, match="was changed after it was recorded"):
        core.revision_sql(engine)


def test_no_revision_repeats_another(tmp_path: Path) -> None:
    """Each revision holds what it changes, once: no revision file repeats a block of
    another's (the baselines are each a component of sql/, which no other file holds)."""
    root = core.migrations_dir()
    texts = {name: (root / name).read_text() for name in revision_files() if name.endswith(".sql")}
    for a, text_a in texts.items():
        blocks = {b.strip() for b in re.split(r"^-- sql/\S+$", text_a, flags=re.M) if len(b.strip()) > 200}
        for b, text_b in texts.items():
            if a != b:
                assert not any(block in text_b for block in blocks), (a, b)


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
                "SELECT rolname, rolcanlogin FROM pg_roles"
                " WHERE rolname IN ('cqrs_writer', 'cqrs_reader', 'cqrs_listener', 'cqrs_consumer')"
            ).fetchall()
        )
    assert roles == {"cqrs_writer": False, "cqrs_reader": False, "cqrs_listener": False, "cqrs_consumer": False}




def test_the_engine_records_the_newest_revision_as_its_version(db: Database) -> None:
    """sql/cqrs/version.sql names the newest revision, so every new revision sets it: a
    database at head reads as this package's version."""
    with db.connect() as conn:
        assert core.installed_version(conn) == core.LATEST
    assert f"'{core.VERSION_COMMENT}{core.LATEST}'" in (REPO / "sql" / "cqrs" / "version.sql").read_text()
