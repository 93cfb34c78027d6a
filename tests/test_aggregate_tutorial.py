"""docs/adding-an-aggregate.md runs: in an empty database, its alembic migration (through
its env.py) installs the cqrs core (only the core) and its aggregate; a login member of
cqrs_writer calls the commands as shown (through psql), gets the errors its table lists,
and the events land in the outbox. Also: the core that cqrs_pg ships equals what sql/
defines, and its way without alembic (psql) installs the very same engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cqrs_pg import core, errors
from cqrs_pg.commands import CommandClient
from cqrs_pg.migrate import migrate
from cqrs_pg_tools import sqlsource
from cqrs_pg_tools.devcluster import DevCluster
from cqrs_pg_tools.testing import (
    REPO,
    Database,
    alembic_project,
    new_database,
    psql,
    psql_binary,
    schema_dump,
    throwaway_cluster,
)

DOC = REPO / "docs" / "adding-an-aggregate.md"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def block(name: str) -> str:
    blocks = dict(re.findall(r"<!-- aggregate: ([\w ]+?) -->\n```(?:sql|python|sh)\n(.*?)```", DOC.read_text(), re.S))
    assert name in blocks, f"docs/adding-an-aggregate.md lost its '{name}' block"
    return blocks[name]


def error_table() -> list[tuple[str, re.Pattern[str]]]:
    """The doc's table of errors: (SQLSTATE, the message as a pattern, '…' = anything)."""
    rows = re.findall(r"^\| `[^|]*` [^|]*\| (CQ\d{3}) \| `(.*)` \|$", DOC.read_text(), re.M)
    assert len(rows) == 6, rows
    return [(code, re.compile(".*".join(map(re.escape, message.split("…"))) + "$")) for code, message in rows]


def schemas(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname IN ('cqrs', 'shop', 'shop_read', 'shop_proj', 'library')")}


@pytest.fixture
def writer(empty_db: Database) -> Iterator[str]:
    name = f"app_{uuid.uuid4().hex[:8]}"
    yield name
    with empty_db.connect() as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_tutorial_in_an_empty_database(db: Database, empty_db: Database, writer: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """db (a migrated database of the same cluster) is there so the roles are in use
    elsewhere, as in any shared cluster: the tutorial's downgrade must keep them. The
    migration runs through the env.py shown."""
    from alembic import command

    config = alembic_project(tmp_path / "library", block("env"), {
        "0001_library.py": block("migration"),
        "0001_library.sql": "\n".join(block(s) for s in ("step 2", "step 3", "step 4")),
    })
    monkeypatch.setenv("LIBRARY_DSN", empty_db.dsn)

    command.upgrade(config, "head")
    with empty_db.connect() as admin:
        assert schemas(admin) == {"cqrs", "library"}  # the core, not the shop
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE cqrs_writer").format(sql.Identifier(writer)))
    app = make_conninfo(empty_db.dsn, user=writer)

    # "Call them", as the writer
    out = psql(app, block("call")).split()
    first = re.fullmatch(rf"6f1c3d2e-8a4b-4c5d-9e6f-0a1b2c3d4e5f\|({UUID})\|1\|(\d+)\|f", out[0])
    assert first, out
    assert out[1] == out[0][:-1] + "t"  # the retry: the first receipt, duplicate
    assert out[2:] == ["2|f"]

    # the errors the table lists, in its order, and that each leaves nothing behind
    with empty_db.connect() as admin:
        book = admin.execute("SELECT id FROM library.books WHERE isbn = '978-0262033848'").fetchone()[0]
        lend_command = admin.execute(
            "SELECT command_id FROM cqrs.commands WHERE command = 'lend_book'").fetchone()[0]
        before = admin.execute("SELECT (SELECT count(*) FROM cqrs.outbox), (SELECT count(*) FROM cqrs.commands),"
                               " (SELECT sum(version) FROM library.books)").fetchone()
    calls = [
        ("add_book(%s, '  ', 'T', 1)", ()),
        ("add_book(%s, '978-0201633610', 'Other', 1)", ()),
        ("lend_book(%s, %s)", (uuid.uuid4(),)),
        ("lend_book(%s, %s, expected_version => 1)", (book,)),
        ("lend_book(%s, %s)", (book,)),
        ("add_book(%s, '978-1', 'T', 1)", ()),
    ]
    with psycopg.connect(app, autocommit=True) as conn:
        for (call, args), (code, message) in zip(calls, error_table(), strict=True):
            command_id = lend_command if code == "CQ005" else uuid.uuid4()
            with pytest.raises(psycopg.Error) as info:
                conn.execute(f"SELECT * FROM library.{call}", (command_id, *args))
            assert info.value.sqlstate == code, (call, info.value)
            assert message.match(info.value.diag.message_primary or ""), (message.pattern, str(info.value))
        # the writer may call the commands, and nothing else
        for statement in ("SELECT * FROM library.books", "SELECT * FROM cqrs.outbox", "SELECT * FROM cqrs.commands",
                          "SELECT cqrs._fail('CQ001', 'x')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    with CommandClient(app) as commands, pytest.raises(errors.Rejected):
        commands.call("library.lend_book", book)

    with empty_db.connect() as admin:
        after = admin.execute("SELECT (SELECT count(*) FROM cqrs.outbox), (SELECT count(*) FROM cqrs.commands),"
                              " (SELECT sum(version) FROM library.books)").fetchone()
        assert after == before
        # the events, as the doc reads them (as the owner)
        assert psql(empty_db.dsn, block("events")).split() == [
            "book.created|1|0|add_book", "book.created|1|0|add_book", "book.updated|2|1|lend_book"]
        # no function of ours or the tutorial's is executable by PUBLIC; definers pin search_path
        loose = admin.execute(
            """SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname IN ('cqrs', 'library')
                  AND (has_function_privilege('public', p.oid, 'EXECUTE')
                       OR p.prosecdef AND NOT 'search_path=pg_catalog, pg_temp' = ANY (coalesce(p.proconfig, '{}')))"""
        ).fetchall()
        assert loose == []

    command.downgrade(config, "base")
    with empty_db.connect() as admin:
        assert schemas(admin) == set()
        assert admin.execute("SELECT count(*) FROM library_alembic_version").fetchone()[0] == 0
        # roles are cluster-wide: the other databases of this cluster still use them
        assert admin.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'cqrs\\_%'").fetchone()[0] == 4


def test_the_engine_the_package_installs_is_the_engines_migration_line(cluster: DevCluster, empty_db: Database) -> None:
    """core.install (newest version) builds what sql/'s engine manifest builds, and what
    cqrs-pg migrate installs; the engine alone, without the example."""
    other = new_database(cluster, None)
    built = next(other)
    try:
        with empty_db.connect() as conn:
            core.install(conn)
            assert schemas(conn) == {"cqrs"}
        with built.connect() as conn:
            conn.execute(sqlsource.build("cqrs").encode())
        assert schema_dump(cluster, empty_db.name) == schema_dump(cluster, built.name)
    finally:
        next(other, None)


def without_alembic(dsn: str, bindir: Path) -> None:
    """The doc's command without alembic, as shown, by the shell: its `python` is this
    interpreter, its psql the client on PATH (or beside the servers)."""
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    (bindir / "psql").symlink_to(psql_binary())
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "DSN": dsn}
    done = subprocess.run(["bash", "-o", "pipefail", "-c", block("without alembic")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ERROR" not in done.stderr, done.stderr


def test_the_engine_without_alembic_is_the_one_migrate_installs(cluster: DevCluster, empty_db: Database,
                                                                 tmp_path: Path) -> None:
    """`python -m cqrs_pg.core sql | psql …` as the doc shows it builds exactly the schema
    (tables, functions, types, grants) that cqrs-pg migrate builds, and only the engine."""
    other = new_database(cluster, None)
    migrated = next(other)
    try:
        migrate(migrated.dsn)  # the engine, as `cqrs-pg migrate` installs it
        without_alembic(empty_db.dsn, tmp_path / "bin")
        with empty_db.connect() as conn:
            assert schemas(conn) == {"cqrs"}
            assert conn.execute("SELECT to_regclass('public.alembic_version')").fetchone()[0] is None
        assert schema_dump(cluster, empty_db.name) == schema_dump(cluster, migrated.name)
    finally:
        next(other, None)


ROLES = """SELECT r.rolname, r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin,
                  r.rolreplication, r.rolbypassrls, r.rolconnlimit,
                  ARRAY(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                         WHERE m.member = r.oid ORDER BY 1)
             FROM pg_roles r WHERE r.rolname LIKE 'cqrs\\_%' ORDER BY 1"""


@pytest.mark.slow  # a cluster of its own
def test_the_engine_without_alembic_creates_the_roles_in_a_new_cluster(cluster: DevCluster, tmp_path: Path) -> None:
    """Roles are cluster-wide, so only a cluster without them shows that the psql way
    creates them: the same as cqrs-pg migrate made in the test cluster."""
    with psycopg.connect(cluster.primary_dsn(), autocommit=True) as conn:
        expected = conn.execute(ROLES).fetchall()
    assert [row[0] for row in expected] == ["cqrs_consumer", "cqrs_listener", "cqrs_reader", "cqrs_writer"]
    with throwaway_cluster("cqrs-pg-core-", replicas=0) as fresh:
        dsn = fresh.cluster.primary_dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute(ROLES).fetchall() == []
        without_alembic(dsn, tmp_path / "bin")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute(ROLES).fetchall() == expected


def test_core_versions_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown cqrs engine version '9999'"):
        core.install(None, "9999")
    assert core.VERSIONS[0] == "0001"
    assert core.engine_sql("0001").startswith("-- sql/cqrs/roles.sql")  # a whole install
    assert not any(line.startswith(("-- sql/shop", "-- sql/shop_read", "-- sql/shop_proj"))
                   for line in core.engine_sql().splitlines())
    assert core.engine_sql(core.LATEST, after=core.LATEST) == ""  # already there: nothing to run


def test_readme_links_the_aggregate_tutorial() -> None:
    assert "(docs/adding-an-aggregate.md)" in (REPO / "README.md").read_text()
