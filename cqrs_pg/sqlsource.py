"""The SQL source in ``sql/`` and its frozen copies in migrations.

``sql/manifest.txt`` lists the files of ``sql/`` in the order that builds the schema.
A migration never runs ``sql/`` itself: it runs a frozen concatenation written when the
migration was made, whose SHA-256 the migration records, so later edits of ``sql/`` cannot
change what an old migration does.

- 0001 froze the whole manifest: ``python -m cqrs_pg.sqlsource freeze OUT``.
- Later migrations list their ``SOURCES`` (files of ``sql/`` that changed, and their own
  hand-written steps such as ``ALTER TABLE``) and are frozen by
  ``python -m cqrs_pg.sqlsource refreeze migrations/versions/NNNN_x.py``, which writes the
  concatenation beside the migration and records its SHA-256 in it. Refreeze only a
  migration that has not landed yet.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_ROOT = REPO_ROOT / "sql"


def manifest(root: Path = SQL_ROOT) -> list[Path]:
    """The files of the manifest, in order."""
    lines = (root / "manifest.txt").read_text().splitlines()
    return [root / line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build(root: Path = SQL_ROOT, include: Callable[[str], bool] = lambda _path: True) -> str:
    """The schema (the manifest's files for which include(path relative to sql/) is true)
    as one SQL script, each file headed by its path."""
    parts = [
        f"-- sql/{path.relative_to(root)}\n{path.read_text().strip()}\n"
        for path in manifest(root)
        if include(str(path.relative_to(root)))
    ]
    return "\n".join(parts)


def frozen_section(frozen: Path, name: str) -> str:
    """The text of file ``name`` (e.g. ``sql/cqrs/functions/x.sql``) as frozen in ``frozen``."""
    # every entry is headed by its name (concatenate): a section ends at the next one,
    # whether a file of sql/ or a migration's own step
    parts = re.split(r"^-- ((?:sql|migrations)/\S+|\d{4}_\S+\.sql:\S+)$", frozen.read_text(), flags=re.M)
    sections = dict(zip(parts[1::2], parts[2::2]))
    if name not in sections:
        raise RuntimeError(f"{frozen.name} holds no {name}")
    return sections[name].strip()


def _source_text(entry: str) -> str:
    """A SOURCES entry: a repository path, or ``NNNN_x.sql:sql/...`` for that file as an
    earlier migration froze it (what a downgrade restores). Restored functions are
    created OR REPLACE, keeping their grants, as the revision being undone did."""
    if ":" in entry:
        frozen, name = entry.split(":", 1)
        text = frozen_section(REPO_ROOT / "migrations" / "versions" / frozen, name)
        return re.sub(r"^CREATE FUNCTION ", "CREATE OR REPLACE FUNCTION ", text, flags=re.M)
    return (REPO_ROOT / entry).read_text().strip()


def concatenate(entries: list[str]) -> str:
    """SOURCES entries as one SQL script, each headed by its name."""
    return "\n".join(f"-- {entry}\n{_source_text(entry)}\n" for entry in entries)


def _set_constant(source: str, name: str, value: str, where: Path) -> str:
    updated, count = re.subn(rf'^{name} = ".*"$', f'{name} = "{value}"', source, flags=re.M)
    if count != 1:
        raise RuntimeError(f'{where}: expected one {name} = "..." line')
    return updated


def load_migration(migration: Path) -> Any:
    """A migration file as a module (its SOURCES, CORE_SOURCES, ... lists)."""
    spec = importlib.util.spec_from_file_location(f"_migration_{migration.stem}", migration)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refreeze(migration: Path) -> list[str]:
    """Write ``migration``'s frozen SQL (FROZEN from SOURCES, and FROZEN_DOWNGRADE from
    DOWNGRADE_SOURCES if it has them) and record their hashes in it."""
    module = load_migration(migration)
    source = migration.read_text()
    digests = []
    for sources, frozen, constant in (
        ("SOURCES", "FROZEN", "FROZEN_SHA256"),
        ("DOWNGRADE_SOURCES", "FROZEN_DOWNGRADE", "FROZEN_DOWNGRADE_SHA256"),
    ):
        if not hasattr(module, sources):
            continue
        text = concatenate(getattr(module, sources))
        Path(getattr(module, frozen)).write_text(text)
        digests.append(sha256(text))
        source = _set_constant(source, constant, digests[-1], migration)
    migration.write_text(source)
    return digests


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_frozen(path: Path, expected_sha256: str, advice: str) -> str:
    """A frozen SQL file's text, refusing one whose hash is not the one recorded."""
    text = path.read_text()
    actual = sha256(text)
    if actual != expected_sha256:
        raise RuntimeError(f"{path.name} was edited after {advice} (sha256 {actual}, expected {expected_sha256})")
    return text


def run_frozen(op: Any, path: Path, expected_sha256: str) -> None:
    """Run a frozen SQL file from a migration, refusing one that was edited after landing."""
    text = read_frozen(path, expected_sha256,
                       "its migration landed: change the schema in a new migration instead")
    # Raw driver execution: SQLAlchemy's text() would read ':name' inside the SQL as binds.
    dbapi = op.get_bind().connection.dbapi_connection
    with dbapi.cursor() as cur:
        cur.execute(text)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "refreeze":
        print(f"{argv[1]}: sha256 {', '.join(refreeze(Path(argv[1])))}")
        return 0
    if len(argv) != 2 or argv[0] != "freeze":
        print("usage: python -m cqrs_pg.sqlsource freeze OUT.sql\n"
              "       python -m cqrs_pg.sqlsource refreeze migrations/versions/NNNN_x.py", file=sys.stderr)
        return 2
    text = build()
    Path(argv[1]).write_text(text)
    print(f"wrote {argv[1]}: sha256 {sha256(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
