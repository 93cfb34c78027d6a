"""The SQL source in ``sql/`` and its frozen copies in migrations.

``sql/manifest.txt`` lists the files of ``sql/`` in the order that builds the schema.
A migration never runs ``sql/`` itself: it runs a frozen concatenation written when the
migration was made (``python -m cqrs_pg.sqlsource freeze OUT``), whose SHA-256 the
migration records, so later edits of ``sql/`` cannot change what an old migration does.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_ROOT = REPO_ROOT / "sql"


def manifest(root: Path = SQL_ROOT) -> list[Path]:
    """The files of the manifest, in order."""
    lines = (root / "manifest.txt").read_text().splitlines()
    return [root / line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build(root: Path = SQL_ROOT) -> str:
    """The whole schema as one SQL script, each file headed by its path."""
    parts = [f"-- sql/{path.relative_to(root)}\n{path.read_text().strip()}\n" for path in manifest(root)]
    return "\n".join(parts)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def run_frozen(op: Any, path: Path, expected_sha256: str) -> None:
    """Run a frozen SQL file from a migration, refusing one that was edited after landing."""
    text = path.read_text()
    actual = sha256(text)
    if actual != expected_sha256:
        raise RuntimeError(
            f"{path.name} was edited after its migration landed (sha256 {actual}, "
            f"expected {expected_sha256}): change the schema in a new migration instead"
        )
    # Raw driver execution: SQLAlchemy's text() would read ':name' inside the SQL as binds.
    dbapi = op.get_bind().connection.dbapi_connection
    with dbapi.cursor() as cur:
        cur.execute(text)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "freeze":
        print("usage: python -m cqrs_pg.sqlsource freeze OUT.sql", file=sys.stderr)
        return 2
    text = build()
    Path(argv[1]).write_text(text)
    print(f"wrote {argv[1]}: sha256 {sha256(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
