"""A behaviour suite every projection must pass, whatever its kind, run against both kinds
of projection computing the tutorial's read model (docs/adding-a-projection.md, installed
from the tutorial's own code blocks by cqrs_pg_tools.testing's Subject): the set-based SQL
apply function and the Python handler. Then what only the python kind has: its batch API
and the daemon's handler registry."""

from __future__ import annotations

import logging
import random
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.types.json import Jsonb

from cqrs_pg.cli import main
from cqrs_pg.errors import CqrsPgError
from cqrs_pg.projections import handler_for, import_modules, unregister
from cqrs_pg.rebuild import rebuild
from cqrs_pg_tools.testing import (
    NO_MISMATCH,
    TABLES,
    Database,
    Reader,
    Subject,
    load_tutorial_handler,
    mismatches,
    outbox_count,
    place,
    running_daemon,
    seed_shop,
)
from cqrs_pg_tools.verify import all_mismatches
from cqrs_pg_tools.workload import ShopWorkload, WorkloadResult


@pytest.fixture(params=["sql", "python"])
def subject(request: pytest.FixtureRequest, db: Database) -> Subject:
    return Subject(db, request.param)


# -- the suite: what every projection must do, whatever its kind --------------------------


def test_equals_its_definition_after_a_concurrent_workload(subject: Subject) -> None:
    """Writers committing out of order with the daemon running: once caught up, the read
    model equals its definition on the primary and the replica, and the projection applied
    each outbox event exactly once. Installed after some history: it catches up from the
    first event."""
    db = subject.db
    workload = ShopWorkload(db.dsn, seed=11, hold_max=0.01)
    workload.setup(customers=8, products=4, stock=1000)
    subject.install()
    with running_daemon(db.dsn, batch_size=7, linger=0.05):
        result = workload.run(6, commands_per_client=30)
        assert not result.errors, result.errors[:3]
        db.wait_caught_up(result.max_token, replica=False)
        db.wait_caught_up(result.max_token)
    with db.connect() as primary, db.connect_replica() as replica:
        total = outbox_count(primary)
        assert total > 300
        for conn in (primary, replica):
            assert mismatches(conn) == 0
            assert subject.applied(conn) == total
            assert all_mismatches(conn) == NO_MISMATCH
        assert primary.execute(f"SELECT count(*) FROM {TABLES[0]}").fetchone()[0] > 8


def test_small_batches_give_what_one_big_batch_gives(subject: Subject) -> None:
    """Batches of 1-3 events, cut through transactions, build exactly the tables (private
    state included) that one batch of everything builds, and both equal the definition."""
    db = subject.db
    workload = ShopWorkload(db.dsn, seed=5)
    workload.setup(customers=5, products=3, stock=1000)
    assert not workload.run(4, commands_per_client=25).errors
    subject.install()
    with db.connect() as conn:
        total = outbox_count(conn)
        cuts = 0
        rng = random.Random(1)
        while True:
            applied, _ = subject.run_once(conn, rng.randint(1, 3))
            if not applied:
                break
            assert subject.applied(conn) == subject.events_to_checkpoint(conn)
            cuts += subject.cut_inside_a_transaction(conn)
        assert cuts > 0, "no batch ended inside a transaction"
        small = subject.rows(conn)
        assert subject.applied(conn) == total
        assert mismatches(conn) == 0

        subject.reset(conn)
        assert subject.run_once(conn, 1_000_000) == (total, False)
        assert subject.run_once(conn, 1_000_000) == (0, False)
        assert subject.rows(conn) == small
        assert subject.applied(conn) == total


def test_every_event_applied_exactly_once(subject: Subject) -> None:
    """applied_events counts each outbox event once: after draining, after more events,
    and while a second runner tries the same projection (it finds it busy)."""
    db = subject.db
    subject.install()
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        for _ in range(3):
            place(conn, customer, sku)
        subject.drain(conn, (2, 5))
        assert subject.applied(conn) == outbox_count(conn)
        assert subject.run_once(conn, 100) == (0, False)
        for _ in range(2):
            place(conn, customer, sku, 2)
    with db.connect() as first, db.connect() as second:
        with first.transaction():
            applied, busy = subject.run_once(first, 4)
            assert applied == 4 and not busy
            assert subject.run_once(second, 100) == (0, True)
        subject.drain(second)
        assert subject.applied(second) == outbox_count(second)
        assert mismatches(second) == 0


def test_a_failing_batch_changes_nothing(subject: Subject) -> None:
    """The checkpoint moves in the batch's transaction: a batch that fails leaves the
    checkpoint and every table of the projection as they were."""
    db = subject.db
    subject.install()
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        place(conn, customer, sku)
        subject.drain(conn)
        before, rows = subject.checkpoint(conn), subject.rows(conn)
        place(conn, customer, sku, 3)
        conn.execute(f"ALTER TABLE {TABLES[0]} ADD CONSTRAINT reject CHECK (orders < 0) NOT VALID")
        with pytest.raises(psycopg.errors.CheckViolation):
            subject.run_once(conn, 100)
        assert subject.checkpoint(conn) == before
        assert subject.rows(conn) == rows
        conn.execute(f"ALTER TABLE {TABLES[0]} DROP CONSTRAINT reject")
        assert subject.drain(conn) == 1
        assert mismatches(conn) == 0
        assert subject.applied(conn) == outbox_count(conn)


def test_an_aggregates_events_apply_by_version_not_xid_order(subject: Subject) -> None:
    """An order shipped by a transaction whose xid is lower than the one that placed it:
    its order.updated (version 2) comes before its order.created (version 1) in xid order.
    One event per batch or all in one, the order ends up shipped."""
    db = subject.db
    subject.install()
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        with psycopg.connect(db.dsn) as early:
            early.execute("SELECT pg_current_xact_id()")  # the lower xid, taken first
            order = place(conn, customer, sku, 2)  # committed with a higher xid
            early.execute("SELECT shop.ship_order(gen_random_uuid(), %s)", (order,))
            early.commit()
        versions = [
            r[0]
            for r in conn.execute(
                "SELECT aggregate_version FROM cqrs.outbox WHERE aggregate_id = %s AND event_type LIKE 'order.%%'"
                " ORDER BY tx_id, position",
                (order,),
            )
        ]
        assert versions == [2, 1], "the scenario did not put version 2 first in xid order"
        assert subject.drain(conn, (1, 1)) == outbox_count(conn)
        one_by_one = subject.rows(conn)
        assert mismatches(conn) == 0
        assert conn.execute(f"SELECT status FROM {TABLES[0]} WHERE customer_id = %s", (customer,)).fetchall() == [
            ("shipped",)
        ]
        subject.reset(conn)
        subject.drain(conn)
        assert subject.rows(conn) == one_by_one


def test_rebuild_under_load_is_invisible_to_readers(subject: Subject) -> None:
    """`cqrs-pg rebuild` while writers write and the daemon runs: readers on the primary
    and the replica never see the read model empty or going back (its orders only grow),
    and afterwards it equals its definition, with every event applied once, those that
    arrived during the rebuild included, and the tables' grants kept. The model is damaged
    first, private state included, so that only the rebuild can repair it."""
    db = subject.db
    workload = ShopWorkload(db.dsn, seed=13, hold_max=0.005)
    workload.setup(customers=8, products=4, stock=10_000)
    subject.install()
    with running_daemon(db.dsn, batch_size=50):
        first = workload.run(4, commands_per_client=25)
        assert not first.errors, first.errors[:3]
        db.wait_caught_up(first.max_token)
        with db.connect() as conn:
            for table in TABLES:
                conn.execute(f"UPDATE {table} SET total_cents = total_cents + 1")
            at_start = outbox_count(conn)
        readers = [
            Reader(connect, f"SELECT coalesce(sum(orders), 0) FROM {TABLES[0]}")
            for connect in (db.connect, db.connect_replica)
        ]
        for r in readers:
            r.start()
        box: list[WorkloadResult] = []
        writers = threading.Thread(target=lambda: box.append(workload.run(4, commands_per_client=40)))
        writers.start()

        def echo(line: str) -> None:
            if line.startswith("rebuilding"):  # the shadow exists: an order placed now arrives during the rebuild
                with db.connect() as conn:
                    lines = Jsonb([{"sku": workload.skus[0], "quantity": 1}])
                    during.append(conn.execute(
                        "SELECT aggregate_id FROM shop.place_order(gen_random_uuid(), %s, %s)",
                        (workload.customers[0], lines),
                    ).fetchone()[0])

        during: list[uuid.UUID] = []
        built = rebuild(db.dsn, subject.name, 20, echo)
        writers.join()
        assert not box[0].errors, box[0].errors[:3]
        db.wait_caught_up(box[0].max_token)
        for r in readers:
            r.finish()
    assert during and built > at_start
    with db.connect() as primary, db.connect_replica() as replica:
        total = outbox_count(primary)
        for conn in (primary, replica):
            assert mismatches(conn) == 0
            assert subject.applied(conn) == total
            assert conn.execute(f"SELECT count(*) FROM {TABLES[1]} WHERE order_id = %s", (during[0],)).fetchone()[0] == 1
        grants = [("cqrs_reader", TABLES[0], "SELECT")]
        if subject.kind == "python":  # python step 5: the daemon's role writes them
            grants += [("cqrs_listener", table, "INSERT") for table in TABLES]
        for role, table, privilege in grants:
            assert primary.execute("SELECT has_table_privilege(%s, %s, %s)", (role, table, privilege)).fetchone()[0]
        assert primary.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'cqrs_rebuild_%'").fetchone()[0] == 0


# -- the python kind only -----------------------------------------------------------------


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
    with running_daemon(db.dsn, poll_interval=0.05, linger=0.0) as listener:
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
