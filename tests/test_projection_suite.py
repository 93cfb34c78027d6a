"""The projection behaviour suite (tests/projection_suite.py) against both kinds of
projection computing the tutorial's read model: the set-based SQL apply function and the
Python handler. Then what only the python kind has: its batch API and the daemon's
handler registry."""

from __future__ import annotations

import logging
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from cqrs_pg.cli import main
from cqrs_pg.errors import CqrsPgError
from cqrs_pg.projections import handler_for, import_modules, unregister
from cqrs_pg.rebuild import rebuild
from tests.conftest import Database
from tests.projection_suite import (  # noqa: F401  (the suite's tests, collected here)
    Subject,
    load_tutorial_handler,
    test_a_failing_batch_changes_nothing,
    test_an_aggregates_events_apply_by_version_not_xid_order,
    test_equals_its_definition_after_a_concurrent_workload,
    test_every_event_applied_exactly_once,
    test_rebuild_under_load_is_invisible_to_readers,
    test_small_batches_give_what_one_big_batch_gives,
)
from tests.test_projection import running_daemon


@pytest.fixture(params=["sql", "python"])
def subject(request: pytest.FixtureRequest, db: Database) -> Subject:
    return Subject(db, request.param)


def register_python(conn: psycopg.Connection, name: str) -> None:
    conn.execute("SELECT cqrs.register_projection(%s, 'python', search_path => 'shop_read')", (name,))


def sqlstate_of(conn: psycopg.Connection, query: str, params: tuple = ()) -> str | None:  # type: ignore[type-arg]
    with pytest.raises(psycopg.Error) as err:
        conn.execute(query, params)
    return err.value.sqlstate


def test_python_batch_api_refuses_misuse(db: Database) -> None:
    """claim_batch / batch_events / complete_batch belong together, in one transaction, for
    a python projection; run_projection is not for python projections, and rebuilding one
    needs its tables and its handler (tests/test_rebuild.py has the rest)."""
    with db.connect() as conn:
        register_python(conn, "py")
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'API-1', 'a', 10, 5)")
        assert sqlstate_of(conn, "SELECT * FROM cqrs.run_projection('py')") == "CQ001"
        assert sqlstate_of(conn, "SELECT * FROM cqrs.claim_batch('order_summary', 10)") == "CQ001"
        assert sqlstate_of(conn, "SELECT * FROM cqrs.claim_batch('nope', 10)") == "CQ002"
        assert sqlstate_of(conn, "SELECT * FROM cqrs.claim_batch('py', 0)") == "CQ001"
        assert sqlstate_of(conn, "SELECT cqrs.complete_batch('py', 999, 1, 10)") == "CQ003"
        assert sqlstate_of(conn, "SELECT * FROM cqrs.batch_events('py', 0, 999)") == "CQ003"
        assert sqlstate_of(conn, "SELECT cqrs.rebuild_begin('py')") == "CQ001"  # names no tables
        with pytest.raises(CqrsPgError, match="'py' is a python projection and no handler is registered"):
            rebuild(db.dsn, "py", 100, lambda _: None)
        with conn.transaction():
            from_pos, to_pos, n, busy = conn.execute(
                "SELECT from_position, to_position, n, busy FROM cqrs.claim_batch('py', 10)"
            ).fetchone()
            assert (from_pos, n, busy) == (0, 1, False)
            events = conn.execute(
                "SELECT event_type FROM cqrs.batch_events('py', %s, %s)", (from_pos, to_pos)
            ).fetchall()
            assert events == [("product.created",)]
            with pytest.raises(psycopg.Error) as err, conn.transaction():  # a wrong count
                conn.execute("SELECT cqrs.complete_batch('py', %s, 2, 10)", (to_pos,))
            assert err.value.sqlstate == "CQ001"
            with pytest.raises(psycopg.Error) as err, conn.transaction():  # beyond what may be read
                conn.execute("SELECT cqrs.complete_batch('py', %s, 1, 10)", (to_pos + 1000,))
            assert err.value.sqlstate == "CQ001"
            conn.execute("SELECT cqrs.complete_batch('py', %s, 1, 10)", (to_pos,))
        assert conn.execute("SELECT applied_events FROM cqrs.projections WHERE name = 'py'").fetchone()[0] == 1


def test_python_projection_without_handler_is_skipped_with_one_error(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon logs once that the handler is missing and keeps the others running."""
    with db.connect() as conn:
        register_python(conn, "nobody_home")
    caplog.set_level(logging.ERROR, logger="cqrs_pg.daemon")
    with running_daemon(db, poll_interval=0.05, linger=0.0) as listener:
        with db.connect() as conn:
            token = conn.execute(
                "SELECT token FROM shop.register_customer(gen_random_uuid(), 'skip@example.com', 'Skip')"
            ).fetchone()[0]
        deadline = time.monotonic() + 10
        with db.connect() as conn:
            while not conn.execute("SELECT cqrs.caught_up(%s, 'customer_stats')", (token,)).fetchone()[0]:
                assert time.monotonic() < deadline, "the other projections stopped"
                time.sleep(0.02)
        time.sleep(0.3)  # more rounds of the loop
        assert listener.applied_total > 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "nobody_home" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    with db.connect() as conn:
        assert conn.execute("SELECT applied_events FROM cqrs.projections WHERE name = 'nobody_home'").fetchone()[0] == 0


@pytest.fixture
def handler_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "suite_handlers_mod.py").write_text(
        textwrap.dedent(
            """
            from cqrs_pg.projections import register

            @register("suite_imported")
            def apply(conn, events):
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "suite_handlers_mod"
    unregister("suite_imported")
    sys.modules.pop("suite_handlers_mod", None)


def test_listen_imports_handler_modules(handler_module: str) -> None:
    import_modules([handler_module])
    assert handler_for("suite_imported") is not None
    result = CliRunner().invoke(main, ["listen", "--dsn", "host=/nonexistent", "--import", "no_such_module_xyz"])
    assert result.exit_code == 1
    assert "cannot import 'no_such_module_xyz'" in result.output


def test_tutorial_handler_registers_under_the_projection_name() -> None:
    load_tutorial_handler()
    assert handler_for("customer_orders_by_status") is not None
