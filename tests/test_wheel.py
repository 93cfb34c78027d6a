"""The library as a user gets it: the wheel built from this checkout, installed into a
fresh virtualenv, outside the repository. It holds the library and its migrations and
nothing else; its `cqrs-pg migrate` installs the engine alone, and the example only when
asked; and docs/adding-an-aggregate.md works from a scratch alembic project of a user's
own, against the engine the wheel ships."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cqrs_pg.migrate import head_revisions
from cqrs_pg_tools.devcluster import find_bindir
from cqrs_pg_tools.testing import REPO, Database

pytestmark = pytest.mark.slow

DOC = REPO / "docs" / "adding-an-aggregate.md"


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done.stdout


def doc_blocks() -> dict[str, str]:
    return dict(re.findall(r"<!-- aggregate: ([\w ]+?) -->\n```(?:sql|python)\n(.*?)```", DOC.read_text(), re.S))


def schemas(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname IN "
                            "('cqrs', 'shop', 'shop_read', 'shop_proj', 'library')").fetchall()
    return {r[0] for r in rows}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv, outside the repository, with the wheel of this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    # setuptools builds through build/lib and keeps what it holds: a revision renamed since
    # the last build would ship beside its new name
    shutil.rmtree(REPO / "build", ignore_errors=True)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, REPO, cwd=root)
    (wheel,) = dist.glob("cqrs_pg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names}
    assert packages == {"cqrs_pg", wheel.name.split("-py")[0] + ".dist-info"}, packages
    assert "cqrs_pg/migrations/versions/cqrs/0001_engine.sql" in names
    assert "cqrs_pg/migrations/checksums.txt" in names
    assert not [n for n in names if "cqrs_pg_tools" in n or n.startswith(("tests/", "sql/"))]
    run(sys.executable, "-m", "venv", root / "venv", cwd=root)
    run(root / "venv" / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=root)
    return root / "venv"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: nothing of this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CQRS_PG_DSN", "CQRS_PG_REPLICA_DSN")}
    return {**env, **extra}


def test_the_wheel_installs_the_engine_alone_and_the_example_on_request(venv: Path, empty_db: Database) -> None:
    cwd = venv.parent
    where = run(venv / "bin" / "python", "-c", "import cqrs_pg; print(cqrs_pg.__file__)", cwd=cwd, env=clean_env())
    assert where.startswith(str(venv)), where
    cli = venv / "bin" / "cqrs-pg"
    engine = head_revisions()["cqrs"]
    assert run(cli, "migrate", "--dsn", empty_db.dsn, cwd=cwd, env=clean_env()) == f"migrated base -> {engine}\n"
    assert schemas(empty_db.dsn) == {"cqrs"}
    assert run(cli, "migrate", "--example", "shop", "--dsn", empty_db.dsn, cwd=cwd, env=clean_env()).startswith(
        f"migrated {engine} -> ")
    assert schemas(empty_db.dsn) == {"cqrs", "shop", "shop_read", "shop_proj"}
    # the development tools are not in it: the command says where they are
    missing = subprocess.run([cli, "demo"], cwd=cwd, env=clean_env(), capture_output=True, text=True)
    assert missing.returncode == 1 and "development tool, not installed" in missing.stderr
    assert run(cli, "migrate", "--to", "base", "--dsn", empty_db.dsn, cwd=cwd, env=clean_env()).endswith("-> base\n")
    assert schemas(empty_db.dsn) == set()


def test_the_aggregate_tutorial_from_a_scratch_alembic_project(venv: Path, empty_db: Database, tmp_path: Path) -> None:
    """A user's own alembic project: alembic.ini, the tutorial's env.py and migration; the
    engine comes from the installed wheel."""
    blocks = doc_blocks()
    project = tmp_path / "library"
    versions = project / "migrations" / "versions"
    versions.mkdir(parents=True)
    (project / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    (project / "migrations" / "env.py").write_text(blocks["env"])
    (versions / "0001_library.py").write_text(blocks["migration"])
    (versions / "0001_library.sql").write_text("\n".join(blocks[s] for s in ("step 2", "step 3", "step 4")))
    env = clean_env(LIBRARY_DSN=empty_db.dsn)
    run(venv / "bin" / "alembic", "upgrade", "head", cwd=project, env=env)
    assert schemas(empty_db.dsn) == {"cqrs", "library"}  # the engine, not the example

    writer = f"app_{os.getpid()}"
    with empty_db.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE cqrs_writer").format(sql.Identifier(writer)))
    try:
        app = make_conninfo(empty_db.dsn, user=writer)
        (project / "call.sql").write_text(blocks["call"])
        out = run(find_bindir() / "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", app, "-f", "call.sql",
                  cwd=project).split()
        assert out[0].endswith("|f") and out[1] == out[0][:-1] + "t"  # the retry: the first receipt, duplicate
        events = run(find_bindir() / "psql", "-X", "-A", "-t", "-d", empty_db.dsn, "-c", blocks["events"],
                     cwd=project).split()
        assert events == ["book.created|1|0|add_book", "book.created|1|0|add_book", "book.updated|2|1|lend_book"]
        run(venv / "bin" / "alembic", "downgrade", "base", cwd=project, env=env)
        assert schemas(empty_db.dsn) == set()
    finally:
        with empty_db.connect() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(writer)))
