"""The cqrs engine in a database: installed, upgraded and removed from an alembic
migration, cqrs_pg's own (``cqrs-pg migrate``) or yours.

The engine is the schema ``cqrs`` — the outbox and its capture triggers
(``cqrs.capture_changes``), receipts and the command helpers (``cqrs._begin_command``,
``cqrs._finish_command``, ``cqrs._require_*``, ``cqrs._check_version``, ``cqrs._fail``),
projections and the daemon's functions — with the group roles ``cqrs_writer``,
``cqrs_reader``, ``cqrs_listener``, ``cqrs_consumer`` and their grants. Your project installs it from its own
migration, and builds its own aggregates and projections on it::

    from cqrs_pg import core

    def upgrade():
        core.install(op, "0002")

    def downgrade():
        core.uninstall(op)

A version is a revision of the engine's migration line, ``migrations/versions/cqrs/
NNNN_*.sql`` inside this package: "0001" is the whole engine, each later one the change
from the one before, so ``core.upgrade(op, "0001", "0002")`` in a later migration of yours
brings an installed engine up. Every revision's file is checked against the SHA-256 that
``migrations/checksums.txt`` records for it before it runs: a migration of yours that
installs "0001" keeps its meaning whichever cqrs_pg release runs it.

``python -m cqrs_pg.core sql [VERSION]`` prints the engine's install SQL up to VERSION
(default: the newest), for psql; all or nothing:
``python -m cqrs_pg.core sql | psql -v ON_ERROR_STOP=1 --single-transaction "$DSN"``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import psycopg

from cqrs_pg.errors import ConfigError


def migrations_dir() -> Path:
    """migrations/ beside this package in a source checkout, else the installed copy.

    Preferring the checkout keeps a test run in one clone from migrating with another
    clone's files when both were installed editable into the same interpreter.
    """
    import importlib.resources

    beside = Path(__file__).resolve().parent.parent / "migrations"
    if (beside / "env.py").is_file():
        return beside
    return Path(str(importlib.resources.files("cqrs_pg.migrations")))


def checksums() -> dict[str, str]:
    """What migrations/checksums.txt records: revision file (relative to migrations/) ->
    its SHA-256. A landed revision never changes; tests/test_migrations.py checks them all."""
    recorded: dict[str, str] = {}
    for line in (migrations_dir() / "checksums.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            recorded[name.strip()] = digest
    return recorded


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def revision_sql(path: Path) -> str:
    """A revision's SQL file, refused when it is not the one recorded in checksums.txt."""
    name = path.relative_to(migrations_dir()).as_posix()
    text = path.read_text()
    expected = checksums().get(name)
    if expected is None:
        raise ConfigError(f"{name} is not recorded in migrations/checksums.txt")
    if sha256(text) != expected:
        raise ConfigError(f"{name} was changed after it was recorded (sha256 {sha256(text)}, recorded {expected}): "
                          "a landed migration never changes; change the schema in a new one")
    return text


def _engine_files() -> dict[str, Path]:
    files = sorted((migrations_dir() / "versions" / "cqrs").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    return {f.name[:4]: f for f in files}


VERSIONS: list[str] = list(_engine_files())
LATEST = VERSIONS[-1]


def _steps(after: str | None, to: str) -> list[str]:
    for version in (after, to):
        if version is not None and version not in VERSIONS:
            raise ValueError(f"unknown cqrs engine version {version!r}: this cqrs_pg ships {', '.join(VERSIONS)}")
    start = 0 if after is None else VERSIONS.index(after) + 1
    if start > VERSIONS.index(to) + 1:
        raise ValueError(f"cannot upgrade the cqrs engine from {after} to the older {to}")
    return VERSIONS[start : VERSIONS.index(to) + 1]


def engine_sql(version: str = LATEST, after: str | None = None) -> str:
    """The SQL that installs the engine at ``version`` (or, with after, upgrades it from
    that version)."""
    files = _engine_files()
    return "\n".join(revision_sql(files[step]) for step in _steps(after, version))


# What sql/cqrs/version.sql writes: the schema's comment names the engine's version.
VERSION_COMMENT = "cqrs_pg engine "


def installed_version(conn: psycopg.Connection) -> str | None:
    """The version of the engine installed in conn's database ("0001", ...; None: none).
    The baseline, 0001, did not record its version: an engine without one is 0001."""
    row = conn.execute(
        "SELECT to_regnamespace('cqrs') IS NOT NULL, obj_description(to_regnamespace('cqrs'), 'pg_namespace')"
    ).fetchone()
    if row is None or not row[0]:
        return None
    comment = row[1] or ""
    return comment[len(VERSION_COMMENT):].strip() if comment.startswith(VERSION_COMMENT) else VERSIONS[0]


def run_sql(target: Any, text: str) -> None:
    """Runs SQL through the raw driver connection: SQLAlchemy's text() would read ':name'
    inside it as a bind. target: alembic's ``op`` or a psycopg connection."""
    if isinstance(target, psycopg.Connection):
        target.execute(text.encode())  # bytes: sent as is, several statements at once
        return
    with target.get_bind().connection.dbapi_connection.cursor() as cur:
        cur.execute(text)


def install(target: Any, version: str = LATEST) -> None:
    """Installs the engine at ``version`` into a database that has none: schema cqrs, the
    roles (kept if they exist: roles are cluster-wide) and their grants. Run it as the
    role that will own your commands."""
    run_sql(target, engine_sql(version))


def upgrade(target: Any, from_version: str, to_version: str) -> None:
    """Upgrades an installed engine from one version to a later one."""
    run_sql(target, engine_sql(to_version, after=from_version))


UNINSTALL = """
-- Everything the engine ever created: its rebuilds' shadow schemas, schema cqrs (with what
-- cqrs.capture_changes generated in it), and the roles where no other database uses them.
DO $$
DECLARE
    s name;
    r text;
BEGIN
    FOR s IN SELECT n.nspname FROM pg_catalog.pg_namespace n WHERE n.nspname LIKE 'cqrs\\_rebuild\\_%' LOOP
        EXECUTE format('DROP SCHEMA %I CASCADE', s);
    END LOOP;
    DROP SCHEMA IF EXISTS cqrs CASCADE;
    FOREACH r IN ARRAY ARRAY['cqrs_writer', 'cqrs_reader', 'cqrs_listener', 'cqrs_consumer'] LOOP
        BEGIN
            EXECUTE format('DROP ROLE IF EXISTS %I', r);
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'role % is still used: kept', r;
        END;
    END LOOP;
END
$$;
"""


def forward_only(revision: str) -> None:
    """The downgrade() of every revision after the baseline: refuses, unless the
    downgrade goes to base, whose baseline downgrade removes everything (itself included)."""
    from alembic import context

    destination = context.get_revision_argument()
    if destination in ("base", None) or (isinstance(destination, str) and destination.endswith("@base")):
        return
    raise ConfigError(
        f"{revision} cannot be downgraded: migrations are forward-only after their baseline; "
        "downgrade to base (`cqrs-pg migrate --to base`) removes everything"
    )


def uninstall(target: Any) -> None:
    """Removes the engine: rebuild shadow schemas, schema cqrs with everything in it (drop
    your own objects that use it first: CASCADE would take your capture triggers and your
    commands' return type with it), and the roles where no other database uses them."""
    run_sql(target, UNINSTALL)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "sql" and len(argv) <= 2:
        try:
            sys.stdout.write(engine_sql(*argv[1:]))
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    print("usage: python -m cqrs_pg.core sql [VERSION]   (the engine's install SQL, for psql)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
