"""Shared fixtures: one real primary + streaming replica per test session, a database
migrated once as a template, and a fresh clone of it per test."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from cqrs_pg.devcluster import DevCluster
from cqrs_pg.migrate import migrate
from cqrs_pg.projections import handler_for, run_batch

TEMPLATE = "cqrs_template"


@dataclass
class Database:
    """One test database, on the session's primary and (replicated) on its replica."""

    name: str
    dsn: str
    replica_dsn: str

    def connect(self, **kwargs: object) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)

    def connect_replica(self, **kwargs: object) -> psycopg.Connection:
        return psycopg.connect(self.replica_dsn, autocommit=True, **kwargs)

    def run_projections(self, rounds: int = 100) -> int:
        """Apply every pending event synchronously, as the daemon would; returns the count."""
        total = 0
        with self.connect() as conn:
            projections = conn.execute("SELECT name, kind, search_path FROM cqrs.projections").fetchall()
            for _ in range(rounds):
                applied = sum(self._run_projection(conn, *p) for p in projections)
                total += applied
                if not applied:
                    return total
        raise AssertionError("projections did not drain")

    @staticmethod
    def _run_projection(conn: psycopg.Connection, name: str, kind: str, search_path: str | None) -> int:
        if kind == "python":  # its handler, registered in this process
            handler = handler_for(name)
            assert handler is not None, f"no handler registered for python projection {name!r}"
            return run_batch(conn, name, handler, 1000, search_path or "").applied
        return conn.execute("SELECT applied FROM cqrs.run_projection(%s, 1000, '0 s')", (name,)).fetchone()[0]

    def wait_caught_up(self, token: int, timeout: float = 30.0, replica: bool = True) -> None:
        deadline = time.monotonic() + timeout
        with (self.connect_replica() if replica else self.connect()) as conn:
            while not conn.execute("SELECT cqrs.caught_up(%s)", (token,)).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"token {token} not caught up within {timeout}s")
                time.sleep(0.01)


def wait_until(predicate: Callable[[], object], what: str = "a condition", timeout: float = 30.0, interval: float = 0.02) -> None:
    """Poll predicate until it is true; fail naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def outbox_count(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone()[0])


def make_root(prefix: str) -> Path:
    # pytest's own tmp dirs are mode 700 under /tmp/pytest-of-root: the postgres OS user
    # that runs the servers could not enter them.
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    root = make_root("cqrs-pg-tests-")
    cluster = DevCluster(root / "cluster")
    try:
        cluster.up(replicas=1)
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def template(cluster: DevCluster) -> str:
    """A database migrated to head once per session, cloned by every test."""
    with psycopg.connect(cluster.primary_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    migrate(cluster.primary_dsn(TEMPLATE))
    return TEMPLATE


def wait_for_database(dsn: str, timeout: float = 30.0) -> None:
    """A database created on the primary exists on the replica once its WAL is replayed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def new_database(cluster: DevCluster, template: str | None) -> Iterator[Database]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    primary = cluster.status()[0]
    janitor = DatabaseJanitor(
        user="postgres",
        host="127.0.0.1",
        port=primary.port,
        dbname=name,
        template_dbname=template,
    )
    janitor.init()
    db = Database(name, cluster.primary_dsn(name), cluster.replica_dsn(name))
    wait_for_database(db.replica_dsn)
    try:
        yield db
    finally:
        janitor.drop()


@pytest.fixture
def db(cluster: DevCluster, template: str) -> Iterator[Database]:
    """A migrated database of its own, cloned from the session template."""
    yield from new_database(cluster, template)


@pytest.fixture
def empty_db(cluster: DevCluster) -> Iterator[Database]:
    """An empty database (no schema), for migration tests."""
    yield from new_database(cluster, None)


@pytest.fixture(autouse=True)
def _no_ambient_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests say which database they use; a DSN exported in the shell must not leak in.
    for var in ("CQRS_PG_DSN", "CQRS_PG_REPLICA_DSN"):
        monkeypatch.delenv(var, raising=False)


REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("PYTHONUNBUFFERED", "1")
