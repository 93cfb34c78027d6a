"""`cqrs-pg migrate`: the engine's migration line, and the example's when asked for.

Two alembic version lines share the database's ``alembic_version`` table: ``cqrs`` (the
engine, ``migrations/versions/cqrs``) and ``shop`` (the example domain, which depends on
the engine, ``migrations/versions/shop``). Plain ``cqrs-pg migrate`` upgrades the engine
and leaves an installed example as it is; ``--example shop`` upgrades both; ``--to base``
removes everything either ever created. With alembic itself: ``alembic upgrade cqrs@head``,
``alembic upgrade heads`` (both), ``alembic downgrade base``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from cqrs_pg.core import migrations_dir
from cqrs_pg.db import connect, require_primary
from cqrs_pg.errors import ConfigError, refusals

EXAMPLES = ("shop",)


def alembic_config(dsn: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # the two lines live in versions/cqrs and versions/shop
    cfg.set_main_option("recursive_version_locations", "true")
    cfg.attributes["dsn"] = dsn
    return cfg


def _version_rows(dsn: str) -> list[str]:
    with connect(dsn, application_name="cqrs-pg migrate") as conn:
        require_primary(conn)
        exists = conn.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return []
        return sorted(r[0] for r in conn.execute("SELECT version_num FROM public.alembic_version"))


def _drop_empty_version_table(dsn: str) -> None:
    """alembic's own table, which the first migrate created, once no line is recorded in it:
    --to base leaves nothing it installed (another alembic's rows keep it)."""
    with connect(dsn, application_name="cqrs-pg migrate") as conn:
        if conn.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone() == (True,):
            with conn.transaction():
                conn.execute("LOCK TABLE public.alembic_version")
                if conn.execute("SELECT NOT EXISTS (SELECT FROM public.alembic_version)").fetchone() == (True,):
                    conn.execute("DROP TABLE public.alembic_version")


def _installed(script: ScriptDirectory, rows: list[str]) -> dict[str, str]:
    """Each installed line's revision. alembic keeps one row per head, and a line's row
    goes once a revision of another line that depends on it is installed (the example's
    on the engine's): the revisions below each row, dependencies included, say it all."""
    found: dict[str, str] = {}
    for row in rows:
        for rev in script.iterate_revisions(row, "base"):
            found.setdefault(Path(rev.path).parent.name, rev.revision)  # newest first
    return found


def current_revisions(dsn: str) -> list[str]:
    """The database's revisions, one per installed line, sorted (empty: none)."""
    script = ScriptDirectory.from_config(alembic_config(dsn))
    return sorted(_installed(script, _version_rows(dsn)).values())


def describe(revisions: list[str]) -> str:
    return ", ".join(revisions) or "base"


def migrate(dsn: str, to: str = "head", example: str | None = None) -> tuple[list[str], list[str]]:
    """Upgrade the engine (and with example, that example too) to `to` ('head', or a
    revision of theirs), or remove everything ('base'); returns the revisions before and
    after."""
    if example is not None and example not in EXAMPLES:
        raise ConfigError(f"no example named {example!r}: the examples are {', '.join(EXAMPLES)}")
    cfg = alembic_config(dsn)
    script = ScriptDirectory.from_config(cfg)
    rows = _version_rows(dsn)
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = [rev for rev in rows if rev not in known]
    if unknown:
        raise ConfigError(
            f"this database is at revision {', '.join(unknown)}, which this cqrs_pg does not have: it was migrated by "
            "a pre-release whose migrations were folded into one baseline (CHANGELOG.md), or by a newer cqrs_pg. "
            "Migrate it with that release, or drop schemas cqrs, shop, shop_read, shop_proj and the alembic_version "
            "table and migrate again"
        )
    before = sorted(_installed(script, rows).values())
    try:
        # a migration that refuses (its own SQLSTATE, CQxxx) says why in one line
        with refusals():
            if to == "base":
                if before:
                    command.downgrade(cfg, "base")
                _drop_empty_version_table(dsn)
            elif to == "head":
                command.upgrade(cfg, "cqrs@head")
                if example is not None:
                    command.upgrade(cfg, f"{example}@head")
            else:
                if to not in known:
                    raise ConfigError(f"unknown revision {to!r}: use head, base or one of {', '.join(sorted(known))}")
                if any(to in {r.revision for r in script.iterate_revisions(rev, "base")} for rev in before if rev != to):
                    raise ConfigError(
                        f"{to} is older than what is installed ({describe(before)}): migrations are forward-only "
                        "after their baseline; --to base removes everything")
                command.upgrade(cfg, to)
    except CommandError as exc:
        raise ConfigError(f"cannot migrate to {to!r}: {exc}") from exc
    return before, current_revisions(dsn)


def head_revisions() -> dict[str, str]:
    """Each line's newest revision: {'cqrs': ..., 'shop': ...}."""
    script = ScriptDirectory.from_config(alembic_config(""))
    heads: dict[str, str] = {}
    for line in ("cqrs", *EXAMPLES):
        head = script.get_revision(f"{line}@head")
        assert head is not None
        heads[line] = head.revision
    return heads
