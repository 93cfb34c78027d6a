"""docs/adding-a-projection.md runs: its SQL steps (through psql), its Python handler and
its migration build a read model that the daemon keeps equal to its definition, so the
tutorial cannot rot."""

from __future__ import annotations

import importlib.util
import threading
import uuid
from pathlib import Path

import psycopg
from cqrs_pg_tools.testing import Database, outbox_count, running_daemon
from cqrs_pg_tools.verify import all_mismatches
from cqrs_pg_tools.workload import ShopWorkload
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy import create_engine

from cqrs_pg.daemon import Listener, ListenerConfig
from tests.conftest import (
    INSTALL,
    NAME,
    NO_MISMATCH,
    REPO,
    TABLES,
    block,
    load_tutorial_handler,
    mismatches,
    psql,
)


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


def test_tutorial_migration_installs_and_removes_the_projection(db: Database, tmp_path: Path) -> None:
    """The migration file as shown, with steps 1-4 in its SQL file, run by alembic."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    (tmp_path / "0002_customer_orders_by_status.sql").write_text("\n".join(block(s) for s in INSTALL["sql"]))
    path = tmp_path / "0002_customer_orders_by_status.py"
    path.write_text(block("migration"))
    spec = importlib.util.spec_from_file_location("tutorial_migration_0002", path)
    assert spec and spec.loader
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert (migration.revision, migration.down_revision) == ("0002", "0001")

    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(db.dsn))
    registered = "SELECT count(*) FROM cqrs.projections WHERE name = %s"
    try:
        for step, expected in ((migration.upgrade, 1), (migration.downgrade, 0)):
            with engine.begin() as connection:
                with Operations.context(MigrationContext.configure(connection)):
                    step()
            with db.connect() as conn:
                assert conn.execute(registered, (NAME,)).fetchone()[0] == expected
                assert conn.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLES[0],)).fetchone()[0] == bool(expected)
        with engine.begin() as connection:
            with Operations.context(MigrationContext.configure(connection)):
                migration.upgrade()
    finally:
        engine.dispose()
    db.run_projections()
    with db.connect() as conn:
        assert mismatches(conn) == 0


def test_readme_links_the_tutorial() -> None:
    assert "(docs/adding-a-projection.md)" in (REPO / "README.md").read_text()
