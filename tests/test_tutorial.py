"""docs/adding-a-projection.md runs: its SQL steps (through psql), its Python handler and
its migration (both variants', through its env.py) build a read model that the daemon
keeps equal to its definition, and the migration's downgrade removes it, so the tutorial
cannot rot."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cqrs_pg.daemon import Listener, ListenerConfig
from cqrs_pg_tools.devcluster import DevCluster
from cqrs_pg_tools.testing import (
    INSTALL,
    NAME,
    NO_MISMATCH,
    REPO,
    TABLES,
    Database,
    alembic_project,
    block,
    load_tutorial_handler,
    mismatches,
    outbox_count,
    psql,
    running_daemon,
    scalar,
    schema_dump,
)
from cqrs_pg_tools.verify import all_mismatches
from cqrs_pg_tools.workload import ShopWorkload


def run_workload_with(db: Database, daemon) -> None:  # type: ignore[no-untyped-def]
    workload = ShopWorkload(db.dsn, seed=21, hold_max=0.005)
    workload.setup(customers=6, products=4, stock=1000)
    with daemon:
        result = workload.run(4, commands_per_client=25)
        assert not result.errors, result.errors[:3]
        db.wait_caught_up(result.max_token)


def check_read_model(db: Database) -> None:
    with db.connect() as primary, db.connect_replica() as replica:
        for conn in (primary, replica):
            assert conn.execute(f"SELECT count(*) FROM {TABLES[0]}").fetchone()[0] > 0
            assert mismatches(conn) == 0
            assert all_mismatches(conn) == NO_MISMATCH
        applied = primary.execute("SELECT applied_events FROM cqrs.projections WHERE name = %s", (NAME,)).fetchone()[0]
        assert applied == outbox_count(primary)
        assert primary.execute(
            "SELECT has_table_privilege('cqrs_reader', %s, 'SELECT'), has_table_privilege('cqrs_reader', %s, 'SELECT')",
            TABLES,
        ).fetchone() == (True, False)


def test_tutorial_sql_steps(db: Database) -> None:
    psql(db.dsn, "\n".join(block(step) for step in INSTALL["sql"]))
    run_workload_with(db, running_daemon(db.dsn, batch_size=10, linger=0.05))
    check_read_model(db)
    with db.connect() as conn:
        assert conn.execute("SELECT kind FROM cqrs.projections WHERE name = %s", (NAME,)).fetchone()[0] == "sql"
        assert not conn.execute(
            "SELECT has_function_privilege('public', 'shop_proj.apply_customer_orders_by_status(bigint, bigint)', 'EXECUTE')"
        ).fetchone()[0]


class ListenerThread:
    def __init__(self, dsn: str) -> None:
        self.listener = Listener(ListenerConfig(dsn=dsn, batch_size=10, linger=0.05, refresh_interval=0.1))
        self.thread = threading.Thread(target=self.listener.run, daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        return self.listener

    def __exit__(self, *exc: object) -> None:
        self.listener.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def test_tutorial_python_handler_runs_as_the_listener_role(db: Database) -> None:
    """The python variant, with the daemon logged in as a member of cqrs_listener only:
    the tutorial's grants are all its handler needs."""
    load_tutorial_handler()
    psql(db.dsn, "\n".join(block(step) for step in INSTALL["python"]))
    role = f"tutorial_{uuid.uuid4().hex[:8]}"
    with db.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE cqrs_listener").format(sql.Identifier(role)))
    try:
        run_workload_with(db, ListenerThread(make_conninfo(db.dsn, user=role)))
        check_read_model(db)
    finally:
        with db.connect() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


FIRST_MIGRATION = '''"""myshop's migration before the tutorial's (its down_revision)."""
revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''


def migration_of(kind: str) -> str:
    """The tutorial's migration file for one variant: as shown, and for the python variant
    with the downgrade shown in its section."""
    migration = block("migration")
    if kind == "sql":
        return migration
    head, found, _ = migration.partition("\n\ndef downgrade() -> None:\n")
    assert found, "the tutorial's migration lost its downgrade"
    return f"{head}\n\n{block('python downgrade')}"


@pytest.mark.parametrize("kind", ["sql", "python"])
def test_tutorial_migration_installs_and_removes_the_projection(
    cluster: DevCluster, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The migration as shown, with its variant's steps in its SQL file, run by alembic
    through the env.py shown, in a database where cqrs-pg migrate installed cqrs_pg:
    upgrade, downgrade (back to exactly the schema it found), upgrade again."""
    from alembic import command

    config = alembic_project(tmp_path / "myshop", block("env"), {
        "0001_first.py": FIRST_MIGRATION,
        "0002_customer_orders_by_status.py": migration_of(kind),
        "0002_customer_orders_by_status.sql": "\n".join(block(step) for step in INSTALL[kind]),
    })
    monkeypatch.setenv("MYSHOP_DSN", db.dsn)
    if kind == "python":
        load_tutorial_handler()
    registered = "SELECT kind FROM cqrs.projections WHERE name = %s"
    cqrs_pg_versions = "SELECT array_agg(version_num ORDER BY version_num) FROM alembic_version"
    with db.connect() as conn:
        ours = scalar(conn, cqrs_pg_versions)
        command.upgrade(config, "0001")
        assert scalar(conn, "SELECT version_num FROM myshop_alembic_version") == "0001"
        before = schema_dump(cluster, db.name)

        command.upgrade(config, "head")
        assert conn.execute(registered, (NAME,)).fetchone() == (kind,)
        assert scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (TABLES[0],))

        command.downgrade(config, "0001")
        assert conn.execute(registered, (NAME,)).fetchone() is None
        assert schema_dump(cluster, db.name) == before  # tables, function, grants: all gone

        command.upgrade(config, "head")
        assert scalar(conn, "SELECT version_num FROM myshop_alembic_version") == "0002"
        assert scalar(conn, cqrs_pg_versions) == ours  # cqrs_pg's own version table: untouched
    db.run_projections()
    with db.connect() as conn:
        assert mismatches(conn) == 0


def test_readme_links_the_tutorial() -> None:
    assert "(docs/adding-a-projection.md)" in (REPO / "README.md").read_text()
