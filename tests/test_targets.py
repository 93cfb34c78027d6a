"""Every wrong target is one line, never a traceback: a standby where the primary is
needed, an engine older or newer than this cqrs_pg, and `--import` finding modules in
the current directory as `python -m` does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cqrs_pg import core
from cqrs_pg.migrate import migrate
from cqrs_pg_tools.testing import Database, assert_one_line_error, cli


@pytest.mark.parametrize(
    "args",
    [
        ("listen",),
        ("status",),
        ("rebuild", "order_summary"),
        ("migrate",),
        ("parked",),
        ("retry", "order_summary"),
        ("skip", "order_summary", "--position", "1"),
    ],
)
def test_a_standby_where_the_primary_is_needed(db: Database, args: tuple[str, ...]) -> None:
    done = cli(*args, "--dsn", db.replica_dsn, timeout=60)
    assert_one_line_error(done, "is a standby", "use CQRS_PG_DSN, the primary")


def test_an_engine_older_than_the_package_says_what_to_run(empty_db: Database) -> None:
    assert core.VERSIONS[0] != core.LATEST, "needs a version after the baseline"
    migrate(empty_db.dsn, "cqrs_0001")
    for args in (("status",), ("listen",), ("parked",)):
        done = cli(*args, "--dsn", empty_db.dsn)
        assert_one_line_error(done, f"is version {core.VERSIONS[0]}", f"this cqrs_pg 0.1.0's {core.LATEST}",
                              "run `cqrs-pg migrate`")
    migrate(empty_db.dsn)
    assert cli("status", "--dsn", empty_db.dsn).returncode == 0


def test_an_engine_newer_than_the_package_says_so(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 9999'")
    for args in (("status",), ("listen",), ("rebuild", "order_summary")):
        done = cli(*args, "--dsn", db.dsn)
        assert_one_line_error(done, "is version 9999", f"newer than this cqrs_pg 0.1.0 knows (up to {core.LATEST})",
                              "upgrade cqrs_pg")


def test_import_finds_modules_in_the_current_directory(db: Database, tmp_path: Path) -> None:
    """The installed `cqrs-pg` script, run from a project directory, imports the project's
    module (as `python -m` would); a module that fails to import is one line."""
    script = shutil.which("cqrs-pg") or str(Path(sys.executable).parent / "cqrs-pg")
    (tmp_path / "myprojections.py").write_text("raise RuntimeError('imported from the current directory')\n")
    (tmp_path / "broken.py").write_text("def oops(:\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([script, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    assert_one_line_error(run("listen", "--dsn", db.dsn, "--import", "myprojections"),
                          "importing 'myprojections' (--import) failed",
                          "RuntimeError: imported from the current directory")
    assert_one_line_error(run("listen", "--dsn", db.dsn, "--import", "broken"),
                          "importing 'broken' (--import) failed: SyntaxError", "broken.py")
    assert_one_line_error(run("listen", "--dsn", db.dsn, "--import", "nowhere_to_be_found"),
                          "cannot import 'nowhere_to_be_found' (--import)")
