"""Pytest fixtures only: one real primary + streaming replica per test session, a database
migrated once as a template (the engine and the example), a fresh clone of it per test,
and `cqrs-pg listen` processes that are killed at the end.

The machinery, and every helper more than one test module needs, is
cqrs_pg_tools.testing, which the bench, the chaos run and the demo share: test modules
import from it, never from here nor from each other."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from psycopg import sql

from cqrs_pg_tools.devcluster import DevCluster
from cqrs_pg_tools.testing import (
    Daemon,
    Database,
    create_template,
    new_database,
    throwaway_cluster,
)

TEMPLATE = "cqrs_template"


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    with throwaway_cluster("cqrs-pg-tests-") as throwaway:
        yield throwaway.cluster


@pytest.fixture(scope="session")
def template(cluster: DevCluster) -> str:
    """A database migrated to head once per session, cloned by every test."""
    return create_template(cluster.primary_dsn(), cluster.primary_dsn, TEMPLATE)


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
    # Tests say which database (and dev cluster root) they use; what the shell exported
    # (`eval "$(cqrs-pg dev up)"`) must not leak in.
    for var in ("CQRS_PG_DSN", "CQRS_PG_REPLICA_DSN", "CQRS_PG_DEV_ROOT"):
        monkeypatch.delenv(var, raising=False)


os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Starts listen processes; any still running at the end is killed."""
    started: list[Daemon] = []

    def start(db: Database, *extra: str) -> Daemon:
        daemon = Daemon(db, tmp_path / f"listen-{len(started)}.log", *extra)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def login_as(db: Database) -> Iterator[Callable[..., str]]:
    """login_as(group) -> the name of a fresh LOGIN role that is a member of group only;
    login_as(None): of no role at all. Dropped after the test."""
    made: list[str] = []

    def make(group: str | None) -> str:
        name = f"{group or 'nobody'}_{uuid.uuid4().hex[:8]}"
        with db.connect() as conn:
            if group is None:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
            else:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(name), sql.Identifier(group)))
        made.append(name)
        return name

    yield make
    with db.connect() as conn:
        for name in made:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
