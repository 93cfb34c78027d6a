"""Alembic environment: connects with psycopg 3 to CQRS_PG_DSN (or `-x dsn=...`)."""

from __future__ import annotations

import os
from logging.config import fileConfig

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool

config = context.config
if config.config_file_name and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _dsn() -> str:
    dsn = (
        config.attributes.get("dsn")
        or context.get_x_argument(as_dictionary=True).get("dsn")
        or os.environ.get("CQRS_PG_DSN")
    )
    if not dsn:
        raise SystemExit(
            "No database given: set CQRS_PG_DSN (e.g. export CQRS_PG_DSN='host=localhost dbname=shop') "
            "or pass -x dsn=..."
        )
    return dsn


def run_migrations_online() -> None:
    dsn = _dsn()
    # A libpq conninfo or URI, passed to psycopg untouched: SQLAlchemy only wraps it.
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn, application_name="cqrs-pg migrate"),
        poolclass=pool.NullPool,
    )
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported: the migrations run SQL files through the driver")
run_migrations_online()
