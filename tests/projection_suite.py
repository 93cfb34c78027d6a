"""A behaviour suite every projection must pass, whatever its kind (a set-based SQL
apply function, or a Python handler).

The tests here take a `subject` fixture (a Subject: how to install the projection in the
test's database and run one batch of it); tests/test_projection_suite.py provides it,
parametrized over the kinds, and imports these tests. The subject is the read model of
docs/adding-a-projection.md, installed from the tutorial's own code blocks, so the
tutorial is what is tested.
"""

from __future__ import annotations

import functools
import random
import re
import threading
import types
import uuid
from dataclasses import dataclass

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cqrs_pg.projections import handler_for, run_batch
from cqrs_pg.verify import all_mismatches
from cqrs_pg.workload import ShopWorkload, WorkloadResult
from tests.conftest import REPO, Database, outbox_count

TUTORIAL = REPO / "docs" / "adding-a-projection.md"
NAME = "customer_orders_by_status"
TABLES = ("shop_read.customer_orders_by_status", "shop_proj.customer_orders_by_status_orders")
SEARCH_PATH = "shop_read, shop_proj"
SHOP_OK = {"order_summary": 0, "customer_stats": 0, "product_sales": 0}


def tutorial_blocks() -> dict[str, str]:
    """The tutorial's marked code blocks: `<!-- tutorial: NAME -->` then a fenced block."""
    blocks = re.findall(r"<!-- tutorial: ([\w ]+?) -->\n```(?:sql|python)\n(.*?)```", TUTORIAL.read_text(), re.S)
    return dict(blocks)


def block(name: str) -> str:
    blocks = tutorial_blocks()
    assert name in blocks, f"docs/adding-a-projection.md lost its '{name}' block"
    return blocks[name]


# What each kind runs, in order, to install the projection.
INSTALL = {
    "sql": ("step 1", "step 2", "step 3", "step 4"),
    "python": ("step 1", "python step 3", "step 4", "python step 5"),
}


@functools.cache
def load_tutorial_handler() -> types.ModuleType:
    """The tutorial's handler module, executed once: it registers the python handler."""
    module = types.ModuleType("tutorial_projections")
    exec(compile(block("python handler"), str(TUTORIAL), "exec"), module.__dict__)  # noqa: S102
    assert handler_for(NAME) is not None, "the tutorial's handler module registers no handler"
    return module


def mismatches(conn: psycopg.Connection) -> int:
    """Rows in the read table or in the model's definition, but not in both."""
    cols = "customer_id, status, orders, total_cents"
    row = conn.execute(
        f"""WITH expected AS ({block('definition')}),
                 actual AS (SELECT {cols} FROM {TABLES[0]})
            SELECT (SELECT count(*) FROM (SELECT {cols} FROM expected EXCEPT ALL SELECT {cols} FROM actual) a)
                 + (SELECT count(*) FROM (SELECT {cols} FROM actual EXCEPT ALL SELECT {cols} FROM expected) b)"""
    ).fetchone()
    assert row is not None
    return int(row[0])


@dataclass
class Subject:
    db: Database
    kind: str
    name: str = NAME

    def install(self) -> None:
        if self.kind == "python":
            load_tutorial_handler()
        with self.db.connect() as conn:
            for step in INSTALL[self.kind]:
                conn.execute(block(step))

    def run_once(self, conn: psycopg.Connection, max_events: int) -> tuple[int, bool]:
        """One batch, as the daemon runs it: (applied, busy)."""
        if self.kind == "python":
            handler = handler_for(self.name)
            assert handler is not None
            result = run_batch(conn, self.name, handler, max_events, SEARCH_PATH)
            return result.applied, result.busy
        row = conn.execute(
            "SELECT applied, busy FROM cqrs.run_projection(%s, %s, '0 s')", (self.name, max_events)
        ).fetchone()
        assert row is not None
        return row[0], row[1]

    def drain(self, conn: psycopg.Connection, sizes: tuple[int, int] = (1000, 1000), seed: int = 0) -> int:
        """Batches of random sizes within `sizes` until nothing is left; the batch count.
        After each batch, applied_events must equal the events up to the checkpoint."""
        rng = random.Random(seed)
        batches = 0
        while True:
            applied, busy = self.run_once(conn, rng.randint(*sizes))
            assert not busy
            if not applied:
                return batches
            batches += 1
            assert self.applied(conn) == self.events_to_checkpoint(conn)

    def applied(self, conn: psycopg.Connection) -> int:
        return conn.execute("SELECT applied_events FROM cqrs.projections WHERE name = %s", (self.name,)).fetchone()[0]

    def checkpoint(self, conn: psycopg.Connection) -> tuple:  # type: ignore[type-arg]
        return conn.execute(
            "SELECT last_position, ahead, applied_events, horizon::text FROM cqrs.projections WHERE name = %s",
            (self.name,),
        ).fetchone()

    def events_to_checkpoint(self, conn: psycopg.Connection) -> int:
        return conn.execute(
            "SELECT count(*) FROM cqrs.outbox o, cqrs.projections p"
            " WHERE p.name = %s AND (o.position <= p.last_position OR o.position = ANY (p.ahead))",
            (self.name,),
        ).fetchone()[0]

    def cut_inside_a_transaction(self, conn: psycopg.Connection) -> bool:
        """Whether the checkpoint stands inside a transaction: the last event applied has a
        later one of its transaction after it."""
        return conn.execute(
            "SELECT EXISTS (SELECT 1 FROM cqrs.outbox o, cqrs.outbox l, cqrs.projections p"
            " WHERE p.name = %s AND l.position = (SELECT max(x.position) FROM cqrs.outbox x"
            "                                      WHERE x.position <= p.last_position)"
            " AND o.tx_id = l.tx_id AND o.position > p.last_position)",
            (self.name,),
        ).fetchone()[0]

    def rows(self, conn: psycopg.Connection) -> dict[str, list[tuple]]:  # type: ignore[type-arg]
        """Every row of the projection's tables, private state included."""
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}

    def reset(self, conn: psycopg.Connection) -> None:
        """Back to no events applied: empty tables, checkpoint at the start."""
        conn.execute(f"TRUNCATE {', '.join(TABLES)}")
        conn.execute(
            "UPDATE cqrs.projections SET last_position = 0, ahead = '{}', applied_events = 0, horizon = '0'"
            " WHERE name = %s",
            (self.name,),
        )


def seed_shop(conn: psycopg.Connection) -> tuple[uuid.UUID, str]:
    customer = conn.execute(
        "SELECT aggregate_id FROM shop.register_customer(gen_random_uuid(), 'suite@example.com', 'Suite')"
    ).fetchone()[0]
    conn.execute("SELECT shop.add_product(gen_random_uuid(), 'SUITE-1', 'Suite product', 250, 1000)")
    conn.execute("SELECT shop.add_product(gen_random_uuid(), 'SUITE-2', 'Another', 40, 1000)")
    return customer, "SUITE-1"


def place(conn: psycopg.Connection, customer: uuid.UUID, sku: str, quantity: int = 1) -> uuid.UUID:
    return conn.execute(
        "SELECT aggregate_id FROM shop.place_order(gen_random_uuid(), %s, %s)",
        (customer, Jsonb([{"sku": sku, "quantity": quantity}, {"sku": "SUITE-2", "quantity": 1}])),
    ).fetchone()[0]


# -- the behaviours -----------------------------------------------------------------------


def test_equals_its_definition_after_a_concurrent_workload(subject: Subject) -> None:
    """Writers committing out of order with the daemon running: once caught up, the read
    model equals its definition on the primary and the replica, and the projection applied
    each outbox event exactly once. Installed after some history: it catches up from the
    first event."""
    from tests.test_projection import running_daemon

    db = subject.db
    workload = ShopWorkload(db.dsn, seed=11, hold_max=0.01)
    workload.setup(customers=8, products=4, stock=1000)
    subject.install()
    with running_daemon(db, batch_size=7, linger=0.05):
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
            assert all_mismatches(conn) == SHOP_OK
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
    from cqrs_pg.rebuild import rebuild
    from tests.test_projection import running_daemon
    from tests.test_rebuild import Reader

    db = subject.db
    workload = ShopWorkload(db.dsn, seed=13, hold_max=0.005)
    workload.setup(customers=8, products=4, stock=10_000)
    subject.install()
    with running_daemon(db, batch_size=50):
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
