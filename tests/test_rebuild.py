"""cqrs-pg rebuild: a read model built anew from the log and swapped in while writers
write, the daemon runs, and readers on the primary and the replica keep reading; a python
projection rebuilt by its handler, step by step; the rebuild functions refusing misuse."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from cqrs_pg import rebuild as rebuild_module
from cqrs_pg.cli import main
from cqrs_pg.db import scalar
from cqrs_pg.projections import (
    Event,
    Handler,
    handler_for,
    register,
    run_batch,
    unregister,
)
from cqrs_pg.rebuild import rebuild
from cqrs_pg_tools.testing import (
    INSTALL,
    NAME,
    NO_MISMATCH,
    TABLES,
    Database,
    Reader,
    Subject,
    applied_counts,
    block,
    mismatches,
    outbox_count,
    place,
    running_daemon,
    seed_shop,
    wait_until,
)
from cqrs_pg_tools.verify import all_mismatches
from cqrs_pg_tools.workload import ShopWorkload, WorkloadResult


@pytest.mark.parametrize("source", ["log", "state"])
def test_rebuild_under_load_is_invisible_to_readers(db: Database, source: str) -> None:
    workload = ShopWorkload(db.dsn, seed=3, hold_max=0.005)
    workload.setup(customers=20, products=8, stock=10_000)
    with running_daemon(db.dsn, batch_size=100):
        first = workload.run(4, commands_per_client=40)
        db.wait_caught_up(first.max_token)
        with db.connect() as conn:
            # Damage the read models: a rebuild recomputes them from the log.
            conn.execute("UPDATE shop_read.order_summary SET total_cents = -1")
            conn.execute("UPDATE shop_read.customer_stats SET orders_placed = 0")
        readers = [
            Reader(connect, f"SELECT count(*) FROM shop_read.{table}")
            for table in ("order_summary", "customer_stats")
            for connect in (db.connect, db.connect_replica)
        ]
        for r in readers:
            r.start()
        box: list[WorkloadResult] = []
        writers = threading.Thread(target=lambda: box.append(workload.run(4, commands_per_client=60)))
        writers.start()
        lines: list[str] = []
        for projection in ("order_summary", "customer_stats"):
            built = rebuild(db.dsn, projection, 50, lines.append, source)
            assert built > 0 or source == "state"
        writers.join()
        assert not box[0].errors
        db.wait_caught_up(box[0].max_token)
        for r in readers:
            r.finish()
    with db.connect() as primary, db.connect_replica() as replica:
        assert all_mismatches(primary) == NO_MISMATCH
        assert all_mismatches(replica) == NO_MISMATCH
        if source == "log":  # from state, only the events applied after the load count
            assert applied_counts(primary) == dict.fromkeys(NO_MISMATCH, outbox_count(primary))
        assert primary.execute(
            "SELECT has_table_privilege('cqrs_reader', 'shop_read.order_summary', 'SELECT'),"
            " has_table_privilege('cqrs_reader', 'shop_proj.order_summary_customers', 'SELECT'),"
            " has_table_privilege('cqrs_reader', 'shop_read.customer_stats', 'SELECT')"
        ).fetchone() == (True, False, True)
        assert primary.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'cqrs_rebuild_%'").fetchone()[0] == 0


def test_rebuild_command_line(db: Database) -> None:
    runner = CliRunner()
    with db.connect() as conn:
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'RB-1', 'r', 10, 5)")
    result = runner.invoke(main, ["rebuild", "--dsn", db.dsn, "customer_stats"])
    assert result.exit_code == 0, result.output
    assert "swapped it in" in result.output
    result = runner.invoke(main, ["rebuild", "--dsn", db.dsn, "product_sales"])
    assert result.exit_code == 0, result.output
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM shop_read.product_sales").fetchone()[0] == 1
    result = runner.invoke(main, ["rebuild", "--dsn", db.dsn, "nope"])
    assert result.exit_code == 1
    assert "no projection named 'nope'" in result.output and "order_summary" in result.output


# -- python projections: the tutorial's handler (cqrs_pg_tools.testing) --------------------
# The behaviour under load, for both kinds, is in the suite:
# tests/test_projection_suite.py::test_rebuild_under_load_is_invisible_to_readers.


def finish_while_a_batch_commits(db: Database, finish: Callable[[psycopg.Connection], object],
                                 batch: Callable[[], None]) -> object:
    """finish(connection) run once it has read its limit and waits for the rebuild's lock
    (held by a lock that assigns no xid, so the daemon's limits run on past it), while
    batch() commits a live batch that read its limit later. Returns what finish returned,
    or its error."""
    outcome: list[object] = []
    with db.connect() as blocker, db.connect() as finisher, db.connect() as watcher:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE cqrs.rebuilds IN EXCLUSIVE MODE")

        def run() -> None:
            try:
                outcome.append(finish(finisher))
            except psycopg.Error as exc:
                outcome.append(exc)

        pid = finisher.info.backend_pid
        thread = threading.Thread(target=run)
        thread.start()
        try:
            wait_until(lambda: scalar(watcher, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                      (pid,)), "the rebuild's finish to wait for its lock")
            batch()
        finally:
            blocker.execute("COMMIT")
            thread.join(30)
    assert outcome, "the rebuild's finish did not end"
    return outcome[0]


def test_rebuild_finish_catches_up_with_a_batch_committed_while_it_waited(db: Database) -> None:
    """cqrs.rebuild_finish reads how far the shadow must catch up, then waits for the
    locks; a daemon's batch that read its limit later and committed meanwhile has moved the
    live checkpoint past that. The swap still happens, the shadow caught up with the live
    model, never refused (CQ003) nor older than it."""
    with db.connect() as conn, db.connect() as daemon:
        customer, sku = seed_shop(conn)
        for _ in range(3):
            place(conn, customer, sku)
        conn.execute("SELECT cqrs.rebuild_begin('customer_stats')")
        while scalar(conn, "SELECT more FROM cqrs.rebuild_step('customer_stats', 100)"):
            pass

        def batch() -> None:
            for _ in range(2):
                place(conn, customer, sku)
            assert scalar(daemon, "SELECT applied FROM cqrs.run_projection('customer_stats')") > 0

        built = finish_while_a_batch_commits(
            db, lambda finisher: scalar(finisher, "SELECT cqrs.rebuild_finish('customer_stats')"), batch)
        assert built == outbox_count(conn), built
        assert scalar(conn, "SELECT last_position FROM cqrs.projections WHERE name = 'customer_stats'") == scalar(
            conn, "SELECT max(position) FROM cqrs.outbox")
        assert all_mismatches(conn)["customer_stats"] == 0


def test_python_rebuild_final_claim_catches_up_with_a_batch_committed_while_it_waited(db: Database) -> None:
    """The same for a python projection: the final transaction's first claim reads its
    limit, then waits for the locks while the daemon commits a batch past it; the handler
    still catches the shadow up with the live model, and the swap happens."""
    subject, handler = python_subject(db)
    with db.connect() as conn, db.connect() as daemon:
        customer, sku = seed_shop(conn)
        for _ in range(3):
            place(conn, customer, sku)
        conn.execute("SELECT cqrs.rebuild_begin(%s)", (NAME,))
        while run_batch(conn, NAME, handler, 4, rebuild=True).more:
            pass

        def finish(finisher: psycopg.Connection) -> object:
            with finisher.transaction():
                while run_batch(finisher, NAME, handler, 4, rebuild=True, final=True).applied:
                    pass
                return scalar(finisher, "SELECT cqrs.rebuild_finish(%s)", (NAME,))

        def batch() -> None:
            for _ in range(2):
                place(conn, customer, sku)
            assert subject.drain(daemon) > 0

        built = finish_while_a_batch_commits(db, finish, batch)
        assert built == subject.applied(conn) == outbox_count(conn), built
        assert mismatches(conn) == 0


@contextmanager
def handler_registered(handler: Handler | None) -> Iterator[None]:
    """The tutorial projection's handler replaced (None: none) for a while, then restored."""
    saved = handler_for(NAME)
    unregister(NAME)
    if handler is not None:
        register(NAME)(handler)
    try:
        yield
    finally:
        unregister(NAME)
        if saved is not None:
            register(NAME)(saved)


def python_subject(db: Database) -> tuple[Subject, Handler]:
    subject = Subject(db, "python")
    subject.install()
    handler = handler_for(NAME)
    assert handler is not None
    return subject, handler


def test_python_rebuild_catches_up_with_a_daemon_ahead_of_it(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon applies newer events between the rebuild's last step and its final
    transaction: the handler catches the shadow up there, under the projection's lock, so
    the swapped-in model is not older than the live one."""
    subject, _ = python_subject(db)
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        for _ in range(3):
            place(conn, customer, sku)
    ahead: list[int] = []
    real_finish = rebuild_module._finish

    def daemon_gets_ahead(*args: object) -> int:
        with db.connect() as other:
            place(other, customer, sku, 2)
            subject.drain(other)
            ahead.append(subject.applied(other))
        return real_finish(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(rebuild_module, "_finish", daemon_gets_ahead)
    built = rebuild(db.dsn, NAME, 4, lambda _: None)
    with db.connect() as conn:
        assert built == ahead[0] == subject.applied(conn) == outbox_count(conn)
        assert mismatches(conn) == 0


def test_python_rebuild_finish_step_by_step(db: Database) -> None:
    """Scripted: the live model runs ahead of the shadow after the rebuild's steps; the
    final transaction locks the daemon out, lets the handler catch the shadow up and swaps
    it in, so the model never goes back. A transaction that commits after the handler's
    last look, before the swap, is left to the daemon: not counted as caught up until it
    is applied."""
    subject, handler = python_subject(db)
    with db.connect() as conn, db.connect() as daemon:
        customer, sku = seed_shop(conn)
        for _ in range(3):
            place(conn, customer, sku)
        conn.execute("SELECT cqrs.rebuild_begin(%s)", (NAME,))
        while run_batch(conn, NAME, handler, 4, rebuild=True).more:
            pass
        for _ in range(3):
            place(conn, customer, sku, 2)
        subject.drain(daemon)  # the live model is now ahead of the shadow
        live = subject.rows(daemon)
        ahead = subject.applied(daemon)
        with psycopg.connect(db.dsn) as late:
            late.execute("SELECT pg_current_xact_id()")  # its xid is below the final transaction's
            late_order = place(late, customer, sku, 5)
            late_token = late.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
            with conn.transaction():
                while run_batch(conn, NAME, handler, 4, rebuild=True, final=True).applied:
                    pass
                assert subject.run_once(daemon, 100) == (0, True), "the daemon was not locked out"
                late.commit()  # ends after the handler's last look, before the swap
                built = conn.execute("SELECT cqrs.rebuild_finish(%s)", (NAME,)).fetchone()[0]
        assert built == ahead
        assert subject.rows(daemon) == live
        assert subject.applied(daemon) == subject.events_to_checkpoint(daemon) == ahead
        assert not daemon.execute("SELECT cqrs.caught_up(%s, %s)", (late_token, NAME)).fetchone()[0]
        subject.drain(daemon)
        assert daemon.execute("SELECT cqrs.caught_up(%s, %s)", (late_token, NAME)).fetchone()[0]
        assert subject.applied(daemon) == outbox_count(daemon)
        assert mismatches(daemon) == 0
        assert daemon.execute(f"SELECT count(*) FROM {TABLES[1]} WHERE order_id = %s", (late_order,)).fetchone()[0] == 1


def test_python_rebuild_writes_only_the_shadow_and_a_failure_changes_nothing_live(db: Database) -> None:
    """The handler's search_path names only the shadow schema; a handler that fails midway
    leaves the live tables and checkpoint as they were, and a second run starts over."""
    subject, handler = python_subject(db)
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        for quantity in range(1, 6):
            place(conn, customer, sku, quantity)
        subject.drain(conn)
        conn.execute(f"UPDATE {TABLES[0]} SET total_cents = total_cents + 1")  # only a rebuild repairs it
        live, checkpoint = subject.rows(conn), subject.checkpoint(conn)
    paths: list[list[str]] = []

    def failing(conn: psycopg.Connection, events: list[Event]) -> None:
        paths.append(conn.execute("SELECT current_schemas(false)").fetchone()[0])
        if len(paths) == 3:
            raise RuntimeError("handler failed")
        handler(conn, events)

    with handler_registered(failing), pytest.raises(RuntimeError, match="handler failed"):
        rebuild(db.dsn, NAME, 3, lambda _: None)
    assert paths == [["pg_catalog", f"cqrs_rebuild_{NAME}"]] * 3
    with db.connect() as conn:
        assert subject.rows(conn) == live
        assert subject.checkpoint(conn) == checkpoint
        assert mismatches(conn) > 0
        assert rebuild(db.dsn, NAME, 3, lambda _: None) == outbox_count(conn)
        assert mismatches(conn) == 0
        assert subject.applied(conn) == outbox_count(conn)
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'cqrs_rebuild_%'").fetchone()[0] == 0


def test_rebuild_python_projection_command_line(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cqrs-pg rebuild --import MODULE NAME`, as `listen --import`; without the module, one
    line saying what to do."""
    (tmp_path / "rebuild_tutorial_handler.py").write_text(block("python handler"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with db.connect() as conn:
        for step in INSTALL["python"]:
            conn.execute(block(step))
        customer, sku = seed_shop(conn)
        place(conn, customer, sku)
    runner = CliRunner()
    with handler_registered(None):
        result = runner.invoke(main, ["rebuild", "--dsn", db.dsn, NAME])
        assert result.exit_code == 1
        assert f"'{NAME}' is a python projection and no handler is registered" in result.output
        assert "--import MODULE" in result.output
        result = runner.invoke(main, ["rebuild", "--dsn", db.dsn, "--import", "no_such_module_xyz", NAME])
        assert result.exit_code == 1
        assert "cannot import 'no_such_module_xyz'" in result.output
        try:
            result = runner.invoke(main, ["rebuild", "--dsn", db.dsn, "--import", "rebuild_tutorial_handler", NAME])
        finally:
            sys.modules.pop("rebuild_tutorial_handler", None)
        assert result.exit_code == 0, result.output
    assert "swapped it in" in result.output
    with db.connect() as conn:
        assert mismatches(conn) == 0
        assert conn.execute("SELECT applied_events FROM cqrs.projections WHERE name = %s", (NAME,)).fetchone()[0] == outbox_count(conn)


def sqlstate_of(conn: psycopg.Connection, query: str, params: tuple[object, ...] = ()) -> str | None:
    with pytest.raises(psycopg.Error) as err:
        conn.execute(query, params)
    return err.value.sqlstate


def test_rebuild_api_refuses_misuse(db: Database) -> None:
    """Each function of the rebuild protocol refuses what it cannot do, with a CQ code."""
    python_subject(db)
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        place(conn, customer, sku)
        assert sqlstate_of(conn, "SELECT cqrs.rebuild_begin('nope')") == "CQ002"
        assert sqlstate_of(conn, "SELECT cqrs.rebuild_begin('product_sales')") == "CQ001"
        conn.execute("SELECT cqrs.register_projection('untabled', 'python', search_path => 'shop_read')")
        assert sqlstate_of(conn, "SELECT cqrs.rebuild_begin('untabled')") == "CQ001"
        conn.execute("CREATE TABLE shop_read.twin (id int); CREATE TABLE shop_proj.twin (id int)")
        conn.execute(
            "SELECT cqrs.register_projection('twins', 'python', search_path => 'shop_read',"
            " tables => ARRAY['shop_read.twin', 'shop_proj.twin']::regclass[])"
        )
        with pytest.raises(psycopg.Error, match="two tables named twin") as err:
            conn.execute("SELECT cqrs.rebuild_begin('twins')")
        assert err.value.sqlstate == "CQ001"

        claim = "SELECT from_position, to_position, n, search_path FROM cqrs.claim_batch(%s, %s, rebuild => true)"
        for call, args in ((claim, (NAME, 100)), ("SELECT cqrs.rebuild_finish(%s)", (NAME,))):
            assert sqlstate_of(conn, call, args) == "CQ002"  # no rebuild in progress
        assert sqlstate_of(conn, "SELECT cqrs.complete_batch(%s, 1, 1, rebuild => true)", (NAME,)) == "CQ003"  # not claimed
        assert sqlstate_of(conn, "SELECT * FROM cqrs.rebuild_step('order_summary')") == "CQ002"
        conn.execute("SELECT cqrs.rebuild_begin(%s)", (NAME,))
        assert sqlstate_of(conn, "SELECT * FROM cqrs.rebuild_step(%s)", (NAME,)) == "CQ001"  # the handler's job
        assert sqlstate_of(conn, claim, ("order_summary", 100)) == "CQ001"
        assert sqlstate_of(conn, claim, (NAME, 0)) == "CQ001"
        with conn.transaction():
            from_pos, to_pos, n, path = conn.execute(claim, (NAME, 100)).fetchone()
            assert path == f"cqrs_rebuild_{NAME}" and from_pos == 0 and n > 1
            for name, args in (
                (NAME, (to_pos, n + 1)),  # a wrong count
                (NAME, (to_pos + 1000, n)),  # beyond what may be read
                (NAME, (0, 0)),  # not after the checkpoint
                ("order_summary", (to_pos, n)),  # not a python projection
            ):
                with pytest.raises(psycopg.Error) as err, conn.transaction():
                    conn.execute("SELECT cqrs.complete_batch(%s, %s, %s, rebuild => true)", (name, *args))
                assert err.value.sqlstate == "CQ001", (name, args)
        # the live model has applied events the shadow has not: the swap would take them back
        Subject(db, "python").drain(conn)
        assert sqlstate_of(conn, "SELECT cqrs.rebuild_finish(%s)", (NAME,)) == "CQ003"
        assert conn.execute("SELECT count(*) FROM cqrs.rebuilds").fetchone()[0] == 1
