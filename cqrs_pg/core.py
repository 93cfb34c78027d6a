"""The cqrs core in a database of your own: what your alembic migration calls to install it.

The core is the schema ``cqrs`` — the outbox and its capture triggers
(``cqrs.capture_changes``), receipts and the command helpers (``cqrs._begin_command``,
``cqrs._finish_command``, ``cqrs._require_*``, ``cqrs._check_version``, ``cqrs._fail``),
projections and the daemon's functions — with the three group roles and their grants on
it, and without the shop example. ``cqrs-pg migrate`` installs the core together with the
shop; your project installs only the core, from its own migration::

    from cqrs_pg import core

    def upgrade():
        core.install(op, "0004")

    def downgrade():
        core.uninstall(op)

Each core version is frozen SQL shipped with this package
(``migrations/versions/NNNN_*.core.sql``, checked by SHA-256), named after the cqrs_pg
migration that froze it, so a migration that installs version "0002" keeps its meaning
whatever cqrs_pg release runs it. A later version ships the steps from the one before it;
``core.upgrade(op, "0003", "0004")`` runs them in a later migration of yours.
Version "0003" leaves a materialized view's refresh out of the projections' fence and adds
``cqrs.work_pending``, the daemon's cheap poll. Version "0004" hands every reader the events
of one aggregate in the order of its versions: readers read in position order, up to the
final position; apply functions take ``(from_position bigint, to_position bigint)`` (one
written for ``(from_tx, from_position, to_tx, to_position)`` still runs).

Maintainers: ``python -m cqrs_pg.core freeze`` rewrites the newest version's file — the
first from ``sql/`` (the manifest's core files, in order), a later one from the
``CORE_SOURCES`` of the cqrs_pg migration of its number — and records its hash here, only
while that version has not been released, as for migrations.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psycopg

from cqrs_pg import sqlsource

# Version -> (frozen file in migrations/versions, its SHA-256). The first is a whole
# install; each later one upgrades from the version before it.
VERSIONS: dict[str, tuple[str, str]] = {
    "0002": ("0002_engine_and_commands.core.sql", "1389205dd0734cdecccd45eb0773e73dae88581d5cfffc26e69770097b94f31a"),
    "0003": ("0003_refresh_outside_fence.core.sql", "227e555631d6afe9db52c77cf07b059b1fa56c4fc4ce7be81821aa1a0d7dff35"),
    "0004": ("0004_position_order.core.sql", "f0b03f521cfcda0da5d1bd818e76e96cf2dfdae0c9e6df27c03e6a0ec43b0bef"),
}
LATEST = list(VERSIONS)[-1]


def is_core(path: str) -> bool:
    """A manifest entry (relative to sql/) that belongs to the core."""
    return path == "roles.sql" or path.startswith("cqrs/")


def build(root: Path = sqlsource.SQL_ROOT) -> str:
    """The core as sql/ defines it now: the manifest's core files, in order."""
    return sqlsource.build(root, include=is_core)


def _versions_dir() -> Path:
    from cqrs_pg.migrate import migrations_dir

    return migrations_dir() / "versions"


def frozen_sql(version: str) -> str:
    """The frozen SQL of one core version, refusing a file edited after it was frozen."""
    if version not in VERSIONS:
        raise ValueError(f"unknown cqrs core version {version!r}: this cqrs_pg ships {', '.join(VERSIONS)}")
    name, expected = VERSIONS[version]
    return sqlsource.read_frozen(_versions_dir() / name, expected, "it was frozen")


def _execute(target: Any, text: str) -> None:
    """Runs SQL through the raw driver connection: SQLAlchemy's text() would read ':name'
    inside it as a bind. target: alembic's ``op`` or a psycopg connection."""
    if isinstance(target, psycopg.Connection):
        target.execute(text.encode())  # bytes: sent as is, several statements at once
        return
    with target.get_bind().connection.dbapi_connection.cursor() as cur:
        cur.execute(text)


def _steps(after: str | None, to: str) -> list[str]:
    names = list(VERSIONS)
    for version in (after, to):
        if version is not None and version not in VERSIONS:
            raise ValueError(f"unknown cqrs core version {version!r}: this cqrs_pg ships {', '.join(names)}")
    start = 0 if after is None else names.index(after) + 1
    if start > names.index(to) + 1:  # from == to: nothing to run
        raise ValueError(f"cannot upgrade the cqrs core from {after} to the older {to}")
    return names[start : names.index(to) + 1]


def install(target: Any, version: str) -> None:
    """Installs the cqrs core at ``version`` into a database that has none: schema cqrs,
    the roles cqrs_writer, cqrs_reader and cqrs_listener (kept if they exist: roles are
    cluster-wide), and their grants. Run it as the role that will own your commands."""
    for step in _steps(None, version):
        _execute(target, frozen_sql(step))


def upgrade(target: Any, from_version: str, to_version: str) -> None:
    """Upgrades an installed core from one version to a later one."""
    for step in _steps(from_version, to_version):
        _execute(target, frozen_sql(step))


UNINSTALL = """
DROP SCHEMA IF EXISTS cqrs CASCADE;
-- Roles are cluster-wide: keep one that another database still uses.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['cqrs_writer', 'cqrs_reader', 'cqrs_listener'] LOOP
        BEGIN
            EXECUTE format('DROP ROLE IF EXISTS %I', r);
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'role % is still used: kept', r;
        END;
    END LOOP;
END
$$;
"""


def uninstall(target: Any) -> None:
    """Removes the core: schema cqrs with everything in it (drop your own objects that
    use it first: CASCADE would take your capture triggers and your commands' return
    type with it), and the roles where no other database uses them."""
    _execute(target, UNINSTALL)


def _upgrade_steps(version: str) -> str:
    """A later version's steps: the CORE_SOURCES of the cqrs_pg migration of that number."""
    (path,) = _versions_dir().glob(f"{version}_*.py")
    return sqlsource.concatenate(sqlsource.load_migration(path).CORE_SOURCES)


def freeze() -> str:
    """Writes the newest version's frozen file (the first: sql/'s core; a later one: its
    migration's CORE_SOURCES) and records its hash here."""
    name, _ = VERSIONS[LATEST]
    text = build() if LATEST == list(VERSIONS)[0] else _upgrade_steps(LATEST)
    (sqlsource.REPO_ROOT / "migrations" / "versions" / name).write_text(text)
    digest = sqlsource.sha256(text)
    here = Path(__file__)
    source = here.read_text()
    line = f'    "{LATEST}": ("{name}", "'
    start = source.index(line) + len(line)
    here.write_text(source[:start] + digest + source[start + 64 :])
    return digest


def main(argv: list[str]) -> int:
    if argv == ["freeze"]:
        print(f"cqrs core {LATEST}: sha256 {freeze()}")
        return 0
    if len(argv) == 2 and argv[0] == "sql":
        sys.stdout.write(frozen_sql(argv[1]))  # for psql users: python -m cqrs_pg.core sql 0002 | psql
        return 0
    print("usage: python -m cqrs_pg.core freeze\n       python -m cqrs_pg.core sql VERSION", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
