"""Connections with errors a newcomer can act on."""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg.abc import Params

from cqrs_pg.errors import ConfigError, DatabaseUnavailable, NotMigrated, StandbyError, first_line

DSN_ENV = "CQRS_PG_DSN"
REPLICA_DSN_ENV = "CQRS_PG_REPLICA_DSN"


def require_dsn(dsn: str | None) -> str:
    """The primary's DSN (the --dsn option, else CQRS_PG_DSN), or a ConfigError."""
    dsn = dsn or os.environ.get(DSN_ENV)
    if not dsn or not dsn.strip():  # blank: libpq would connect to its defaults, not what was meant
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
        raise invalid_dsn(dsn, exc) from exc


def invalid_dsn(dsn: str, exc: psycopg.ProgrammingError) -> ConfigError:
    """What libpq refused to parse as a connection string, in one line (no password)."""
    return ConfigError(f"invalid connection string {redact(dsn)!r}: {first_line(exc)}")


def require_primary(conn: psycopg.Connection) -> None:
    """StandbyError, one line, when conn's server is a standby (in recovery)."""
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if row and row[0]:
        raise StandbyError(
            f"{conn.info.host}:{conn.info.port} is a standby (in recovery): use CQRS_PG_DSN, the primary"
        )


def require_migrated(conn: psycopg.Connection) -> None:
    """The engine, at this cqrs_pg's version, on a primary: else one line saying what to
    run (NotMigrated, or StandbyError on a standby)."""
    from cqrs_pg import __version__, core

    require_primary(conn)
    db = conn.info.dbname
    installed = core.installed_version(conn)
    if installed is None:
        raise NotMigrated(f"database {db!r} has no cqrs_pg schema: run `cqrs-pg migrate` (or `alembic upgrade cqrs@head`) first")
    if installed != core.LATEST:
        if installed in core.VERSIONS and core.VERSIONS.index(installed) < core.VERSIONS.index(core.LATEST):
            raise NotMigrated(
                f"the cqrs engine in database {db!r} is version {installed}, older than this cqrs_pg {__version__}'s "
                f"{core.LATEST}: run `cqrs-pg migrate` (a project of your own: a migration calling "
                f"cqrs_pg.core.upgrade(op, {installed!r}, {core.LATEST!r}))"
            )
        raise NotMigrated(
            f"the cqrs engine in database {db!r} is version {installed}, newer than this cqrs_pg {__version__} "
            f"knows (up to {core.LATEST}): upgrade cqrs_pg (`python3 -m pip install -U cqrs_pg`)"
        )


def scalar(conn: psycopg.Connection, query: str, params: Params | None = None) -> Any:
    """The first column of a query that always returns one row (count(*), a function call)."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, "the query returned no row"
    return row[0]
