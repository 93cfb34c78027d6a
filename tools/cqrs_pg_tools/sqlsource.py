"""The SQL source in ``sql/``: each component's manifest lists its files in the order
that builds it. A migration line's baseline is the concatenation of its component
(``build``); tests build databases from it directly and compare them with migrated ones.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SQL_ROOT = REPO_ROOT / "sql"
# component -> its manifest, relative to sql/; the engine first, the example after it
COMPONENTS = {"cqrs": "cqrs/manifest.txt", "shop": "shop/manifest.txt"}


def manifest(component: str, root: Path = SQL_ROOT) -> list[Path]:
    """The files of one component's manifest, in order."""
    lines = (root / COMPONENTS[component]).read_text().splitlines()
    return [root / line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build(component: str, root: Path = SQL_ROOT) -> str:
    """One component as one SQL script, each file headed by its path."""
    return "\n".join(f"-- sql/{path.relative_to(root)}\n{path.read_text().strip()}\n" for path in manifest(component, root))
