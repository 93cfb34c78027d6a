"""Connections with errors a newcomer can act on."""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg.abc import Params

from cqrs_pg.errors import ConfigError, DatabaseUnavailable, NotMigrated

DSN_ENV = "CQRS_PG_DSN"
REPLICA_DSN_ENV = "CQRS_PG_REPLICA_DSN"


def require_dsn(dsn: str | None) -> str:
    """The primary's DSN (the --dsn option, else CQRS_PG_DSN), or a ConfigError."""
    dsn = dsn or os.environ.get(DSN_ENV)
    if not dsn:
        raise ConfigError(
            f"no database given: set {DSN_ENV} (e.g. export {DSN_ENV}='host=localhost dbname=shop') "
            "or pass --dsn; `cqrs-pg dev up` starts a local one and prints the export line"
        )
    return dsn


def redact(dsn: str) -> str:
    """A DSN fit for a log line: passwords removed."""
    dsn = re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)


def connect(dsn: str, *, autocommit: bool = True, application_name: str = "cqrs-pg", **kwargs: Any) -> psycopg.Connection:
    """psycopg.connect, with an unreachable server reported in one line."""
    try:
        return psycopg.connect(
            dsn, autocommit=autocommit, application_name=application_name, connect_timeout=10, **kwargs
        )
    except psycopg.OperationalError as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise DatabaseUnavailable(f"cannot connect to {redact(dsn)}: {reason}") from exc
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid connection string {redact(dsn)!r}: {exc}") from exc


def require_migrated(conn: psycopg.Connection) -> None:
    """NotMigrated unless the cqrs schema is installed in this database."""
    row = conn.execute("SELECT to_regclass('cqrs.projections') IS NOT NULL").fetchone()
    if not row or not row[0]:
        db = conn.info.dbname
        raise NotMigrated(f"database {db!r} has no cqrs_pg schema: run `cqrs-pg migrate` (or `alembic upgrade cqrs@head`) first")


def scalar(conn: psycopg.Connection, query: str, params: Params | None = None) -> Any:
    """The first column of a query that always returns one row (count(*), a function call)."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, "the query returned no row"
    return row[0]
