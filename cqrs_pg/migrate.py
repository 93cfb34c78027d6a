"""`cqrs-pg migrate`: alembic upgrade or downgrade to a revision, from any install."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from cqrs_pg.db import connect
from cqrs_pg.errors import ConfigError, CqrsPgError


def migrations_dir() -> Path:
    """migrations/ beside this package in a source checkout, else the installed copy.

    Preferring the checkout keeps a test run in one clone from migrating with another
    clone's files when both were installed editable into the same interpreter.
    """
    beside = Path(__file__).resolve().parent.parent / "migrations"
    if (beside / "env.py").is_file():
        return beside
    return Path(str(importlib.resources.files("cqrs_pg.migrations")))


def alembic_config(dsn: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["dsn"] = dsn
    return cfg


def current_revision(dsn: str) -> str | None:
    with connect(dsn, application_name="cqrs-pg migrate") as conn:
        exists = conn.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute("SELECT version_num FROM public.alembic_version").fetchone()
        return row[0] if row else None


def migrate(dsn: str, to: str = "head") -> tuple[str | None, str | None]:
    """Upgrade or downgrade to revision `to` ('head', 'base' or an id); returns (before, after)."""
    cfg = alembic_config(dsn)
    script = ScriptDirectory.from_config(cfg)
    before = current_revision(dsn)
    try:
        target = script.get_revision(to) if to not in ("head", "base") else None
    except CommandError as exc:
        raise ConfigError(f"unknown revision {to!r}: use head, base or one of {_revisions(script)}") from exc
    if to == "base":
        downgrade = before is not None
    elif target is None or before is None:
        downgrade = False
    else:
        below_current = {rev.revision for rev in script.iterate_revisions(before, "base")}
        downgrade = target.revision in below_current and target.revision != before
    try:
        if downgrade:
            command.downgrade(cfg, to)
        else:
            command.upgrade(cfg, to)
    except psycopg.Error as exc:
        # a migration that refuses (its own SQLSTATE, CQxxx) says why in one line
        if exc.sqlstate and exc.sqlstate.startswith("CQ"):
            raise CqrsPgError(exc.diag.message_primary or str(exc)) from exc
        raise
    return before, current_revision(dsn)


def _revisions(script: ScriptDirectory) -> str:
    return ", ".join(rev.revision for rev in script.walk_revisions())


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()

