"""The projection engine: gap-free reading, same-transaction checkpoints, read models equal
to their definitions on the primary and on the replica, read-your-writes, wake-up."""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cqrs_pg.config import ListenerConfig
from cqrs_pg.daemon import PENDING_SQL, SETTLED_WAIT, Listener
from cqrs_pg.pacing import BUDGET_WINDOW
from cqrs_pg.projections import register, unregister
from cqrs_pg_tools.testing import (
    NO_MISMATCH,
    Database,
    applied_counts,
    outbox_count,
    running_daemon,
    scalar,
    wait_until,
)
from cqrs_pg_tools.verify import all_mismatches, mismatches
from cqrs_pg_tools.workload import ShopWorkload


def seed(conn: psycopg.Connection) -> tuple[uuid.UUID, str]:
    customer = conn.execute(
        "SELECT aggregate_id FROM shop.register_customer(gen_random_uuid(), 'seed@example.com', 'Seed')"
    ).fetchone()[0]
    conn.execute("SELECT shop.add_product(gen_random_uuid(), 'SEED-1', 'Seed product', 500, 1000)")
    return customer, "SEED-1"


def place(conn: psycopg.Connection, customer: uuid.UUID, sku: str, quantity: int = 1) -> tuple[uuid.UUID, int]:
    row = conn.execute(
        "SELECT aggregate_id, token FROM shop.place_order(gen_random_uuid(), %s, %s)",
        (customer, Jsonb([{"sku": sku, "quantity": quantity}])),
    ).fetchone()
    return row[0], row[1]


@pytest.mark.slow
def test_concurrent_writers_committing_out_of_order(db: Database) -> None:
    """8 writers whose transactions stay open a random while after the command, so
    commits finish out of xid and position order, with the daemon running throughout.
    Once caught up, every read model equals its definition on the primary and on the
    replica, and every projection applied each outbox event exactly once."""
    workload = ShopWorkload(db.dsn, seed=7, hold_max=0.02)
    workload.setup(customers=10, products=5, stock=200)
    with running_daemon(db.dsn, batch_size=50, linger=0.05):
        result = workload.run(8, commands_per_client=40)
        assert not result.errors
        db.wait_caught_up(result.max_token)
        db.wait_caught_up(result.max_token, replica=False)
    with db.connect() as primary, db.connect_replica() as replica:
        assert all_mismatches(primary) == NO_MISMATCH
        assert all_mismatches(replica) == NO_MISMATCH
        total = outbox_count(primary)
        assert total > 300
        assert applied_counts(primary) == dict.fromkeys(NO_MISMATCH, total)
        assert applied_counts(replica) == dict.fromkeys(NO_MISMATCH, total)


def test_late_commit_is_delayed_not_skipped(db: Database) -> None:
    """A transaction with a lower xid that commits after a higher one: the fence holds the
    projection back until it ends, then its events are applied too."""
    with db.connect() as setup:
        customer, sku = seed(setup)
        setup.execute("SELECT shop.add_product(gen_random_uuid(), 'OTHER', 'Other product', 700, 10)")
    db.run_projections()
    with psycopg.connect(db.dsn) as slow, db.connect() as fast:
        slow_order, slow_token = place(slow, customer, sku)  # xid taken, not committed
        fast_order, fast_token = place(fast, customer, "OTHER")  # committed at once
        assert slow_token < fast_token
        db.run_projections()
        with db.connect() as conn:
            assert not conn.execute("SELECT cqrs.caught_up(%s)", (fast_token,)).fetchone()[0]
            seen = conn.execute("SELECT count(*) FROM shop_read.order_summary WHERE order_id = %s", (fast_order,))
            assert seen.fetchone()[0] == 0, "applied past an open transaction: the fence is missing"
        slow.commit()
    db.run_projections()
    with db.connect() as conn:
        assert conn.execute("SELECT cqrs.caught_up(%s)", (fast_token,)).fetchone()[0]
        orders = {r[0] for r in conn.execute("SELECT order_id FROM shop_read.order_summary")}
        assert {slow_order, fast_order} <= orders
        assert all_mismatches(conn) == NO_MISMATCH
        assert applied_counts(conn) == dict.fromkeys(NO_MISMATCH, outbox_count(conn))


def test_small_batches_split_transactions_and_still_match(db: Database) -> None:
    """Batches of 3 events cut through transactions; caught_up stays false until the
    whole transaction is applied, and the result equals one big batch."""
    with db.connect() as conn:
        customer, _ = seed(conn)
        for i in range(4):
            conn.execute("SELECT shop.add_product(gen_random_uuid(), %s, 'p', 100, 50)", (f"B-{i}",))
        lines = [{"sku": f"B-{i}", "quantity": 2} for i in range(4)]
        token = conn.execute(
            "SELECT token FROM shop.place_order(gen_random_uuid(), %s, %s)", (customer, Jsonb(lines))
        ).fetchone()[0]
        # 4 product updates + 1 order + 4 lines in one transaction: 3 batches of 3 at least
        batch = "SELECT applied, more FROM cqrs.run_projection('order_summary', 3, '0 s')"
        calls = 0
        while conn.execute(batch).fetchone()[0]:
            calls += 1
            if calls == 1:
                assert not conn.execute("SELECT cqrs.caught_up(%s, 'order_summary')", (token,)).fetchone()[0]
        assert calls >= 3
        assert conn.execute("SELECT cqrs.caught_up(%s, 'order_summary')", (token,)).fetchone()[0]
        db.run_projections()
        assert all_mismatches(conn) == NO_MISMATCH
        assert applied_counts(conn) == dict.fromkeys(NO_MISMATCH, outbox_count(conn))


@pytest.mark.parametrize("batch", [1, 2, 1000])
def test_orders_applied_before_their_customer_are_counted(db: Database, batch: int) -> None:
    """A transaction that took its xid before the customer's was committed places an order
    for that customer: its events come first in the outbox order. customer_stats adds
    deltas only to rows that exist, so the customer's row, created later, must count the
    orders already seen — in batches of 1 and 2 events (order and customer apart) or one."""
    with db.connect() as conn:
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'EARLY', 'Early product', 300, 100)")
        db.run_projections()
        with psycopg.connect(db.dsn) as early:
            early_xid = early.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
            customer, token = conn.execute("SELECT aggregate_id, token FROM shop.register_customer("
                                           "gen_random_uuid(), 'early@example.com', 'Early')").fetchone()
            assert early_xid < token
            order, _ = place(early, customer, "EARLY", 3)
            early.execute("SELECT shop.cancel_order(gen_random_uuid(), %s)", (order,))
            place(early, customer, "EARLY", 2)
        place(conn, customer, "EARLY", 1)
        while conn.execute("SELECT applied FROM cqrs.run_projection('customer_stats', %s, '0 s')", (batch,)).fetchone()[0]:
            pass
        row = conn.execute("SELECT orders_placed, orders_cancelled, orders_shipped, lifetime_value_cents"
                           " FROM shop_read.customer_stats WHERE customer_id = %s", (customer,)).fetchone()
        assert row == (3, 1, 0, 900)
        db.run_projections()
        assert all_mismatches(conn) == NO_MISMATCH


def test_sums_over_many_orders_do_not_overflow_the_read_models(db: Database) -> None:
    """Each order's total fits a bigint (place_order refuses one that does not); the sums
    of a customer's or a product's orders need not, and must not stop a projection."""
    with db.connect() as conn:
        customer, _ = seed(conn)
        price = 2**62
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'HUGE', 'h', %s, 10)", (price,))
        for _ in range(3):
            conn.execute("SELECT shop.place_order(gen_random_uuid(), %s, %s)",
                         (customer, Jsonb([{"sku": "HUGE", "quantity": 1}])))
        db.run_projections()
        assert all_mismatches(conn) == NO_MISMATCH
        assert conn.execute("SELECT lifetime_value_cents FROM shop_read.customer_stats WHERE customer_id = %s",
                            (customer,)).fetchone()[0] == 3 * price
        assert conn.execute("SELECT revenue_cents FROM shop_read.product_sales WHERE sku = 'HUGE'").fetchone()[0] == 3 * price


def test_caught_up_only_after_the_whole_transaction(db: Database) -> None:
    with db.connect() as conn:
        customer, sku = seed(conn)
        _, token = place(conn, customer, sku)
        # order.created, order_line.created and product.updated: 3 events in one transaction
        conn.execute("SELECT * FROM cqrs.run_projection('order_summary', 1, '0 s')")
        assert not conn.execute("SELECT cqrs.caught_up(%s, 'order_summary')", (token,)).fetchone()[0]
        assert not conn.execute("SELECT cqrs.caught_up(%s)", (token,)).fetchone()[0]
        db.run_projections()
        assert conn.execute("SELECT cqrs.caught_up(%s)", (token,)).fetchone()[0]


def test_failed_batch_leaves_checkpoint_and_read_model_untouched(db: Database) -> None:
    """The checkpoint moves in the same transaction as the read-model writes."""
    with db.connect() as conn:
        customer, sku = seed(conn)
        db.run_projections()
        before = conn.execute(
            "SELECT last_position, horizon, applied_events FROM cqrs.projections WHERE name = 'customer_stats'"
        ).fetchone()
        place(conn, customer, sku, 3)
        conn.execute("ALTER TABLE shop_read.customer_stats ADD CONSTRAINT reject CHECK (orders_placed = 0)")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("SELECT * FROM cqrs.run_projection('customer_stats', 100, '0 s')")
        after = conn.execute("SELECT last_position, horizon, applied_events FROM cqrs.projections WHERE name = 'customer_stats'").fetchone()
        assert after == before
        assert conn.execute("SELECT count(*) FROM shop_proj.customer_stats_orders").fetchone()[0] == 0
        conn.execute("ALTER TABLE shop_read.customer_stats DROP CONSTRAINT reject")
        db.run_projections()
        assert all_mismatches(conn) == NO_MISMATCH
        assert applied_counts(conn) == dict.fromkeys(NO_MISMATCH, outbox_count(conn))


def test_two_runners_never_apply_the_same_batch(db: Database) -> None:
    """A second runner finds the projection busy while the first holds it."""
    with db.connect() as conn:
        seed(conn)
    with psycopg.connect(db.dsn) as first, db.connect() as second:
        applied, _, busy, _ = first.execute("SELECT * FROM cqrs.run_projection('order_summary', 100, '0 s')").fetchone()
        assert applied == 2 and not busy
        applied, _, busy, _ = second.execute("SELECT * FROM cqrs.run_projection('order_summary', 100, '0 s')").fetchone()
        assert applied == 0 and busy
        first.commit()
        applied, _, busy, _ = second.execute("SELECT * FROM cqrs.run_projection('order_summary', 100, '0 s')").fetchone()
        assert applied == 0 and not busy
        assert applied_counts(second)["order_summary"] == 2


def test_run_projections_applies_a_batch_of_each_in_one_transaction(db: Database) -> None:
    """One statement, one commit: each named sql projection gets its batch, every one read
    up to the same final position, and a failure of one rolls back all of them (so the
    daemon runs each on its own)."""
    with db.connect() as conn:
        customer, sku = seed(conn)
        order, token = place(conn, customer, sku, 2)
        total = outbox_count(conn)
        rows = conn.execute("SELECT * FROM cqrs.run_projections('{order_summary,customer_stats}', 100)").fetchall()
        assert rows == [("order_summary", total, False, False, 0), ("customer_stats", total, False, False, 0)]
        assert conn.execute("SELECT cqrs.caught_up(%s, 'order_summary') AND cqrs.caught_up(%s, 'customer_stats')",
                            (token, token)).fetchone()[0]
        assert mismatches(conn, "order_summary") == mismatches(conn, "customer_stats") == 0
        # a batch smaller than what waits: more, and each reads up to the same position
        for _ in range(3):
            place(conn, customer, sku)
        rows = conn.execute("SELECT * FROM cqrs.run_projections('{customer_stats,order_summary}', 2)").fetchall()
        assert rows == [("customer_stats", 2, True, False, 0), ("order_summary", 2, True, False, 0)]
        # one failing apply function: nothing of the call is kept
        before = applied_counts(conn)
        conn.execute("ALTER TABLE shop_read.customer_stats ADD CONSTRAINT never CHECK (orders_placed < 0) NOT VALID")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("SELECT * FROM cqrs.run_projections('{order_summary,customer_stats}', 100)")
        assert applied_counts(conn) == before
        assert conn.execute("SELECT count(*) FROM shop_read.order_summary WHERE order_id = %s", (order,)).fetchone()[0]


def test_run_projections_reads_each_batch_from_its_own_checkpoint(db: Database) -> None:
    """In a shared round each projection's batch starts at its own checkpoint: one ahead of
    another applies only what it has not; one held by another session is busy while the
    others apply; a name given twice applies once."""
    with db.connect() as conn:
        customer, sku = seed(conn)
        seeded = outbox_count(conn)
        conn.execute("SELECT * FROM cqrs.run_projection('order_summary', 100)")
        place(conn, customer, sku)
        total = outbox_count(conn)
        rows = conn.execute(
            "SELECT projection, applied, busy FROM cqrs.run_projections('{customer_stats,order_summary,customer_stats}')"
        ).fetchall()
        assert rows == [("customer_stats", total, False), ("order_summary", total - seeded, False),
                        ("customer_stats", 0, False)]
        assert applied_counts(conn) == {"customer_stats": total, "order_summary": total, "product_sales": 0}
        assert mismatches(conn, "order_summary") == mismatches(conn, "customer_stats") == 0
        place(conn, customer, sku)
        placed = outbox_count(conn) - total
    with psycopg.connect(db.dsn) as holder, db.connect() as conn:
        holder.execute("SELECT * FROM cqrs.run_projection('order_summary', 100)")  # its row lock, until commit
        rows = conn.execute(
            "SELECT projection, busy FROM cqrs.run_projections('{order_summary,customer_stats}')"
        ).fetchall()
        assert rows == [("order_summary", True), ("customer_stats", False)]
        holder.commit()
        rows = conn.execute(
            "SELECT projection, applied, busy FROM cqrs.run_projections('{order_summary,customer_stats}')"
        ).fetchall()
        assert rows == [("order_summary", 0, False), ("customer_stats", placed, False)]
        assert applied_counts(conn) == {"customer_stats": total + placed, "order_summary": total + placed,
                                        "product_sales": 0}
        assert mismatches(conn, "order_summary") == mismatches(conn, "customer_stats") == 0


def test_batches_in_one_transaction_leave_a_horizon_that_proves_read_your_writes(db: Database) -> None:
    """The second batch of a transaction runs with the transaction's own xid assigned, which
    its snapshot does not list: a transaction that ends meanwhile must not move the
    horizon past an xid not handed out yet (caught_up would say "another cluster's" and
    stay false until the next write anywhere)."""
    with db.connect() as conn:
        customer, sku = seed(conn)
        _, token = place(conn, customer, sku)
    with psycopg.connect(db.dsn) as batch, db.connect() as other:
        batch.execute("SELECT * FROM cqrs.run_projection('customer_stats', 100, '0 s')")
        other.execute("SELECT pg_current_xact_id()")  # a later xid, ended
        batch.execute("SELECT * FROM cqrs.run_projection('order_summary', 100, '0 s')")
        batch.commit()
        assert other.execute("SELECT cqrs.caught_up(%s, 'order_summary')", (token,)).fetchone()[0]
        horizon, = other.execute("SELECT horizon FROM cqrs.projections WHERE name = 'order_summary'").fetchone()
        assert other.execute("SELECT %s::xid8 < pg_snapshot_xmax(pg_current_snapshot())", (horizon,)).fetchone()[0]


def test_a_daemon_isolates_a_failing_projection_from_those_sharing_its_rounds(db: Database) -> None:
    """Rounds of small batches share one transaction; one projection failing every time
    halts alone, and the others keep applying every event."""
    with db.connect() as conn:
        customer, sku = seed(conn)
        conn.execute("ALTER TABLE shop_read.customer_stats ADD CONSTRAINT never CHECK (orders_placed < 1) NOT VALID")
    with running_daemon(db.dsn, retry_attempts=2, retry_backoff=0.01):
        with db.connect() as conn:
            orders = [place(conn, customer, sku) for _ in range(5)]
            wait_until(lambda: conn.execute("SELECT state FROM cqrs.projections WHERE name = 'customer_stats'")
                       .fetchone()[0] == "halted", what="customer_stats halted")
            wait_until(lambda: conn.execute("SELECT cqrs.caught_up(%s, 'order_summary')", (orders[-1][1],))
                       .fetchone()[0], what="order_summary caught up")
            assert conn.execute("SELECT count(*) FROM shop_read.order_summary").fetchone()[0] == 5
            assert mismatches(conn, "order_summary") == 0


def test_materialized_view_refresh_is_debounced(db: Database) -> None:
    with db.connect() as conn:
        customer, sku = seed(conn)
        conn.execute("SELECT * FROM cqrs.run_projection('product_sales', 100, '1 hour')")
        assert conn.execute("SELECT count(*) FROM shop_read.product_sales").fetchone()[0] == 1
        place(conn, customer, sku, 4)
        applied, _, _, retry_after = conn.execute(
            "SELECT * FROM cqrs.run_projection('product_sales', 100, '1 hour')"
        ).fetchone()
        assert applied == 0 and 3500 < retry_after <= 3600
        assert conn.execute("SELECT units_sold FROM shop_read.product_sales").fetchone()[0] == 0
        applied, _, _, retry_after = conn.execute("SELECT * FROM cqrs.run_projection('product_sales', 100, '0 s')").fetchone()
        assert applied == 3 and retry_after is None
        assert conn.execute("SELECT units_sold FROM shop_read.product_sales").fetchone()[0] == 4


@pytest.mark.slow
def test_a_slow_view_is_refreshed_within_its_budget(db: Database) -> None:
    """A refresh recomputes the whole view: after one that took t seconds the daemon waits
    at least t / refresh_budget before the next, however often events arrive."""
    with db.connect() as conn:
        customer, sku = seed(conn)
        conn.execute(
            "CREATE MATERIALIZED VIEW shop_read.slow AS"
            " SELECT 1 AS id, (SELECT count(*) FROM shop.orders) AS orders, pg_sleep(0.3)::text AS slept"
        )
        conn.execute("CREATE UNIQUE INDEX ON shop_read.slow (id)")
        conn.execute("SELECT cqrs.register_projection('slow', 'matview', matview => 'shop_read.slow',"
                     " event_types => ARRAY['order.created'])")
        conn.execute("CREATE TABLE refreshes AS SELECT refreshed_at FROM cqrs.projections WHERE false")
        with running_daemon(db.dsn, projections=["slow"], refresh_interval=0.05, refresh_budget=0.5):
            for _ in range(40):  # an order every 0.1 s for 4 s
                place(conn, customer, sku)
                conn.execute("INSERT INTO refreshes SELECT refreshed_at FROM cqrs.projections"
                             " WHERE name = 'slow' AND refreshed_at IS NOT NULL")
                time.sleep(0.1)
        times = [r[0] for r in conn.execute("SELECT DISTINCT refreshed_at FROM refreshes ORDER BY 1")]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 2, times
    # 0.3 s / 0.5: at least 0.6 s apart (without the budget: the refresh plus 0.05 s)
    assert min(gaps) >= 0.6, gaps


def test_under_load_rounds_keep_to_the_apply_budget(db: Database) -> None:
    """Once the budget's credit (a burst of apply_budget x BUDGET_WINDOW of work) is spent,
    after a round that took t seconds the next starts no sooner than t / apply_budget
    after it, however often events arrive: on a loaded server batches grow instead of
    the daemon's rounds taking all the CPU."""
    starts: list[float] = []

    def slow(_conn: psycopg.Connection, _events: object) -> None:
        starts.append(time.monotonic())
        time.sleep(0.1)

    register("slow_handler")(slow)
    try:
        with db.connect() as conn:
            customer, sku = seed(conn)
            conn.execute("SELECT cqrs.register_projection('slow_handler', 'python', search_path => 'shop_read')")
            with running_daemon(db.dsn, projections=["slow_handler"], apply_budget=0.25, batch_delay=0.01):
                for _ in range(70):  # an order every 0.05 s for 3.5 s
                    place(conn, customer, sku)
                    time.sleep(0.05)
    finally:
        unregister("slow_handler")
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # The credit the daemon starts with (0.25 x BUDGET_WINDOW) pays for the first rounds,
    # each 0.1 s of work less what a quarter of its time earns back ...
    free = math.ceil(0.25 * BUDGET_WINDOW / (0.1 * (1 - 0.25)))
    assert len(gaps) >= free + 2, starts
    # ... then 0.1 s / 0.25: at least 0.4 s apart (without the budget: 0.1 s plus batch_delay)
    assert min(gaps[free:]) >= 0.39, gaps
    assert min(gaps[:free]) < 0.39, gaps  # the burst ran on its credit


GATE = 4242  # an advisory lock key: the test holds it to keep a view's refresh running


def gated_view(conn: psycopg.Connection) -> None:
    """A view whose refresh waits for the test's advisory lock GATE."""
    conn.execute(
        "CREATE FUNCTION shop_read.gate() RETURNS integer LANGUAGE sql VOLATILE"
        f" AS 'SELECT pg_advisory_xact_lock_shared({GATE}); SELECT 1'"
    )
    conn.execute("CREATE MATERIALIZED VIEW shop_read.gated AS"
                 " SELECT shop_read.gate() AS id, (SELECT count(*) FROM shop.orders) AS orders")
    conn.execute("CREATE UNIQUE INDEX ON shop_read.gated (id)")
    conn.execute("SELECT cqrs.register_projection('gated', 'matview', matview => 'shop_read.gated',"
                 " event_types => ARRAY['order.created'])")


def test_a_view_refresh_does_not_hold_the_other_projections_back(db: Database) -> None:
    """A refresh holds an xid while it runs but writes no events: the fence leaves it out,
    so an order committed during it is applied at once, not after the refresh."""
    with db.connect() as conn:
        customer, sku = seed(conn)
        gated_view(conn)
        conn.execute("SELECT * FROM cqrs.run_projection('gated', 100, '0 s')")  # its first refresh
        db.run_projections()
        place(conn, customer, sku)  # for the view to refresh
        refresh_error: list[BaseException] = []
        with db.connect() as gate, db.connect() as refresher:
            gate.execute("SELECT pg_advisory_lock(%s)", (GATE,))

            def refresh() -> None:
                try:
                    refresher.execute("SELECT * FROM cqrs.run_projection('gated', 100, '0 s')")
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    refresh_error.append(exc)

            thread = threading.Thread(target=refresh)
            thread.start()
            try:
                wait_until(lambda: conn.execute(
                    "SELECT backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = %s"
                    " AND wait_event_type = 'Lock'", (refresher.info.backend_pid,)).fetchone(),
                    "the refresh waiting at the gate with an xid")
                order, token = place(conn, customer, sku)
                for name in ("order_summary", "customer_stats"):
                    conn.execute("SELECT * FROM cqrs.run_projection(%s)", (name,))
                assert conn.execute("SELECT cqrs.caught_up(%s, 'order_summary')", (token,)).fetchone()[0], \
                    "the refresh held the fence back"
                assert conn.execute("SELECT count(*) FROM shop_read.order_summary WHERE order_id = %s",
                                    (order,)).fetchone()[0] == 1
                assert conn.execute("SELECT held FROM cqrs.fence_status()").fetchone()[0] is False
                assert refresher.info.backend_pid not in {
                    r[0] for r in conn.execute("SELECT pid FROM cqrs.fence_blockers()")}
            finally:
                gate.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
                thread.join(timeout=30)
        assert not refresh_error, refresh_error
        assert conn.execute("SELECT orders FROM shop_read.gated").fetchone()[0] >= 1
        db.run_projections()
        assert all_mismatches(conn) == NO_MISMATCH
        assert applied_counts(conn) == dict.fromkeys([*NO_MISMATCH, "gated"], outbox_count(conn))


def test_a_transaction_out_of_the_fence_cannot_write_events(db: Database) -> None:
    with db.connect() as conn:
        customer, sku = seed(conn)
        # cqrs.register_projection gave the view its row to lock
        assert conn.execute("SELECT count(*) FROM cqrs.refreshing WHERE projection = 'product_sales'").fetchone()[0] == 1
        before = outbox_count(conn)
        with psycopg.connect(db.dsn) as tx:
            assert tx.execute("SELECT cqrs._exempt_from_fence('product_sales')").fetchone()[0] is True
            with pytest.raises(psycopg.Error, match="must not write events") as refused:
                place(tx, customer, sku)
            assert refused.value.sqlstate == "CQ003"
        assert outbox_count(conn) == before
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone()[0] == 0


def test_removing_a_views_projection_leaves_the_transaction_in_the_fence(db: Database) -> None:
    """A migration that removes a view's projection and writes events in the same
    transaction: its delete must not pass for a refresh's lock (cqrs.refreshing), or every
    reader would read past its events before they commit, and never apply them."""
    with db.connect() as conn:
        customer, sku = seed(conn)
        with psycopg.connect(db.dsn) as tx:
            tx.execute("DELETE FROM cqrs.projections WHERE name = 'product_sales'")
            _, token = place(tx, customer, sku)
            conn.execute("SELECT pg_current_xact_id()")  # a later xid, committed: above it now
            assert conn.execute("SELECT cqrs._fence(pg_current_snapshot()) <= %s::text::xid8", (token,)).fetchone()[0]
            conn.execute("SELECT cqrs.run_projection('order_summary')")
            tx.commit()
        conn.execute("SELECT cqrs.run_projection('order_summary')")
        assert scalar(conn, "SELECT cqrs.caught_up(%s, 'order_summary')", (token,))
        assert mismatches(conn, "order_summary") == 0


def test_only_a_transaction_that_wrote_nothing_is_left_out_of_the_fence(db: Database) -> None:
    with db.connect() as conn:
        customer, sku = seed(conn)
        with psycopg.connect(db.dsn) as tx:  # events first: then it stays in the fence
            _, token = place(tx, customer, sku)
            assert tx.execute("SELECT cqrs._exempt_from_fence('product_sales')").fetchone()[0] is False
            conn.execute("SELECT pg_current_xact_id()")  # a later xid, committed: above it now
            assert conn.execute("SELECT cqrs._fence(pg_current_snapshot()) <= %s::text::xid8", (token,)).fetchone()[0]
            tx.rollback()
        with psycopg.connect(db.dsn) as tx:  # in a subtransaction the lock names a subxid
            tx.execute("SAVEPOINT s")
            assert tx.execute("SELECT cqrs._exempt_from_fence('product_sales')").fetchone()[0] is True
            top = tx.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
            conn.execute("SELECT pg_current_xact_id()")  # a later xid, committed: above it now
            assert conn.execute("SELECT cqrs._fence(pg_current_snapshot()) <= %s::text::xid8", (top,)).fetchone()[0]
            tx.rollback()
        with psycopg.connect(db.dsn) as tx:  # the control: left out
            assert tx.execute("SELECT cqrs._exempt_from_fence('product_sales')").fetchone()[0] is True
            top = tx.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
            conn.execute("SELECT pg_current_xact_id()")  # a later xid, committed: above it now
            assert conn.execute("SELECT cqrs._fence(pg_current_snapshot()) > %s::text::xid8", (top,)).fetchone()[0]
            tx.rollback()


def test_events_irrelevant_to_a_view_advance_it_without_refresh(db: Database) -> None:
    with db.connect() as conn:
        seed(conn)
        conn.execute("SELECT * FROM cqrs.run_projection('product_sales', 100, '0 s')")
        refreshed = conn.execute("SELECT refreshed_at FROM cqrs.projections WHERE name = 'product_sales'").fetchone()[0]
        token = conn.execute(
            "SELECT token FROM shop.register_customer(gen_random_uuid(), 'other@example.com', 'Other')"
        ).fetchone()[0]
        applied = conn.execute("SELECT applied FROM cqrs.run_projection('product_sales', 100, '1 hour')").fetchone()[0]
        assert applied == 1
        assert conn.execute("SELECT cqrs.caught_up(%s, 'product_sales')", (token,)).fetchone()[0]
        assert conn.execute("SELECT refreshed_at FROM cqrs.projections WHERE name = 'product_sales'").fetchone()[0] == refreshed


def test_caught_up_gives_read_your_writes_on_the_replica(db: Database) -> None:
    with db.connect() as conn:
        customer, sku = seed(conn)
        order, token = place(conn, customer, sku, 2)
    with running_daemon(db.dsn):
        db.wait_caught_up(token)
        with db.connect_replica() as replica:
            assert replica.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            row = replica.execute(
                "SELECT status, item_count, total_cents FROM shop_read.order_summary WHERE order_id = %s", (order,)
            ).fetchone()
            assert row == ("placed", 2, 1000)
            assert replica.execute("SELECT cqrs.caught_up(%s, 'product_sales')", (token,)).fetchone()[0]
            assert replica.execute("SELECT units_sold FROM shop_read.product_sales").fetchone()[0] == 2


@pytest.mark.parametrize(
    ("call", "sqlstate"),
    [
        ("SELECT cqrs.caught_up(NULL)", "CQ001"),
        ("SELECT cqrs.caught_up(-1)", "CQ001"),
        ("SELECT cqrs.caught_up(1, 'no_such_projection')", "CQ002"),
        ("SELECT * FROM cqrs.run_projection('no_such_projection')", "CQ002"),
        ("SELECT * FROM cqrs.run_projection('order_summary', 0)", "CQ001"),
        ("SELECT * FROM cqrs.run_projections('{}')", "CQ001"),
        ("SELECT * FROM cqrs.run_projections(NULL)", "CQ001"),
        ("SELECT * FROM cqrs.run_projections('{order_summary,no_such_projection}')", "CQ002"),
        ("SELECT * FROM cqrs.run_projections('{order_summary,product_sales}')", "CQ001"),
        ("SELECT * FROM cqrs.run_projections('{order_summary}', 0)", "CQ001"),
    ],
)
def test_projection_api_errors(db: Database, call: str, sqlstate: str) -> None:
    with db.connect() as conn, pytest.raises(psycopg.Error) as err:
        conn.execute(call)
    assert err.value.sqlstate == sqlstate


def notified(conn: psycopg.Connection) -> bool:
    return any(True for _ in conn.notifies(timeout=0.3, stop_after=1))


def test_commands_ring_the_doorbell_only_while_a_daemon_sleeps(db: Database) -> None:
    """NOTIFY takes a cluster-wide lock at commit: commands must not pay for it while no
    daemon sleeps (busy daemon, or none at all, or one that died asleep)."""
    with db.connect() as bell, db.connect() as conn:
        bell.execute("LISTEN cqrs_outbox")
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'N-1', 'n', 1, 1)")
        assert not notified(bell), "notified with no daemon at all"
        conn.execute("SELECT cqrs.listener_heartbeat('t', false, '1 minute')")
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'N-2', 'n', 1, 1)")
        assert not notified(bell), "notified while the daemon is awake"
        conn.execute("SELECT cqrs.listener_heartbeat('t', true, '1 minute')")
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'N-3', 'n', 1, 1)")
        assert notified(bell), "no doorbell while the daemon sleeps"
        conn.execute("UPDATE cqrs.listeners SET expires_at = now() - interval '1 s'")
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'N-4', 'n', 1, 1)")
        assert not notified(bell), "notified for a daemon whose heartbeat expired"


def sleeping_listeners(db: Database) -> int:
    with db.connect() as conn:
        return conn.execute("SELECT count(*) FROM cqrs.listeners WHERE sleeping").fetchone()[0]


def test_work_pending_sees_only_committed_events_below_the_fence(db: Database) -> None:
    """The daemon's cheap poll while it lingers: true exactly when a sql or python
    projection has something to apply now; a view's pending refresh does not count."""
    pending = "SELECT cqrs.work_pending(%s)"
    everything = ["order_summary", "customer_stats", "product_sales"]
    with db.connect() as conn:
        customer, sku = seed(conn)
        assert conn.execute(pending, (everything,)).fetchone()[0] is True
        db.run_projections()
        assert conn.execute(pending, (everything,)).fetchone()[0] is False
        with psycopg.connect(db.dsn) as slow:
            slow.execute("SELECT pg_current_xact_id()")  # holds the fence
            place(conn, customer, sku)  # committed, but not final while slow runs
            # nothing to apply: only a mark to leave for it, once (cqrs._needs_mark)
            assert conn.execute(pending, (everything,)).fetchone()[0] is True
            assert db.run_projections() == 0
            assert conn.execute(pending, (everything,)).fetchone()[0] is False
        assert conn.execute(pending, (everything,)).fetchone()[0] is True
        assert conn.execute(pending, (["product_sales"],)).fetchone()[0] is False
        conn.execute("SELECT * FROM cqrs.run_projection('order_summary')")
        assert conn.execute(pending, (["order_summary"],)).fetchone()[0] is False
        assert conn.execute(pending, (everything,)).fetchone()[0] is True  # customer_stats
        assert conn.execute("SELECT pg_current_xact_id_if_assigned() IS NULL FROM (SELECT cqrs.work_pending(%s)) x",
                            (everything,)).fetchone()[0], "the poll took an xid"


def test_look_for_work_answers_as_work_pending_and_take_mark_together(db: Database) -> None:
    """The linger poll in one statement: marked NULL without work; with work, take_mark's
    answer (false when every position is final: no mark to wait for; true under a running
    writer, whose mark is then usable once it ends). Settled (no work, every position
    handed out final): the last position, which cqrs.last_position reads until the next
    event takes one."""
    look = "SELECT marked, settled_position FROM cqrs.look_for_work(%s, 'looker')"
    last = "SELECT cqrs.last_position()"
    names = ["order_summary", "customer_stats"]
    with db.connect() as conn:
        conn.execute("SELECT cqrs.listener_heartbeat('looker', false, '1 minute')")
        customer, sku = seed(conn)
        assert conn.execute(look, (names,)).fetchone() == (False, None)
        db.run_projections()
        settled = conn.execute(look, (names,)).fetchone()
        assert settled == (None, conn.execute(last).fetchone()[0])
        with psycopg.connect(db.dsn) as slow:
            slow.execute("SELECT pg_current_xact_id()")  # holds the fence
            place(conn, customer, sku)
            assert conn.execute(last).fetchone()[0] > settled[1]  # moved: the daemon looks
            assert conn.execute(look, (names,)).fetchone() == (True, None)
            assert conn.execute("SELECT cqrs.mark_usable('looker')").fetchone()[0] is False
        assert conn.execute("SELECT cqrs.mark_usable('looker')").fetchone()[0] is True
        assert db.run_projections() > 0
        assert conn.execute(look, (names,)).fetchone() == (None, conn.execute(last).fetchone()[0])
        with psycopg.connect(db.dsn) as writer:
            writer.execute("BEGIN")
            place(writer, customer, sku)  # not committed: not final, so not settled
            assert conn.execute(look, (names,)).fetchone()[1] is None
            writer.execute("ROLLBACK")


def test_a_settled_look_waits_on_the_server_until_the_sequence_moves(db: Database) -> None:
    """Given the settled position of its last look and a wait, cqrs.look_for_work first
    waits on the server while the outbox's sequence stays there: with nothing new it
    answers settled once the wait is over; a command that takes a position ends the wait,
    and its events are work. Given any other position it does not wait. A wait out of
    range is refused in one line (CQ001)."""
    look = ("SELECT marked, settled_position FROM cqrs.look_for_work(%s, 'waiter', %s,"
            " make_interval(secs => %s))")
    names = ["order_summary", "customer_stats"]
    with db.connect() as conn:
        conn.execute("SELECT cqrs.listener_heartbeat('waiter', false, '1 minute')")
        customer, sku = seed(conn)
        db.run_projections()
        settled = conn.execute(look, (names, None, 0)).fetchone()[1]
        assert settled is not None

        started = time.monotonic()
        assert conn.execute(look, (names, settled, 0.3)).fetchone() == (None, settled)
        assert time.monotonic() - started >= 0.3

        started = time.monotonic()
        assert conn.execute(look, (names, settled - 1, 30)).fetchone() == (None, settled)
        assert time.monotonic() - started < 25, "it waited though the sequence was elsewhere"

        def command() -> None:
            with db.connect() as other:
                place(other, customer, sku)

        timer = threading.Timer(0.3, command)
        timer.start()
        try:
            started = time.monotonic()
            marked, _ = conn.execute(look, (names, settled, 30)).fetchone()
            waited = time.monotonic() - started
        finally:
            timer.join()
        assert marked is not None, "the command's events were not found"
        assert 0.3 <= waited < 25, waited

        for wait in (-1, 61, None):
            with pytest.raises(psycopg.Error) as raised:
                conn.execute(look, (names, settled, wait))
            assert raised.value.sqlstate == "CQ001"
            assert "wait must be between 0 s and 1 min" in str(raised.value)


def test_a_settled_glance_looks_in_full_only_once_the_sequence_moved(db: Database) -> None:
    """Given the settled position of its last look and no wait, cqrs.look_for_work only
    glances at the outbox's sequence: while it has not moved the answer is settled, even
    where a full look would find an operator's hand (a checkpoint moved back); once a
    command has taken a position, the same call looks in full and takes the round's mark
    while the command is still running."""
    look = ("SELECT marked, settled_position FROM cqrs.look_for_work(%s, 'glancer', %s,"
            " make_interval(secs => 0))")
    names = ["order_summary", "customer_stats"]
    with db.connect() as conn:
        conn.execute("SELECT cqrs.listener_heartbeat('glancer', false, '1 minute')")
        customer, sku = seed(conn)
        db.run_projections()
        settled = conn.execute(look, (names, None)).fetchone()[1]
        assert settled is not None
        assert conn.execute(look, (names, settled)).fetchone() == (None, settled)

        last = scalar(conn, "SELECT last_position FROM cqrs.projections WHERE name = 'order_summary'")
        conn.execute("UPDATE cqrs.projections SET last_position = 0 WHERE name = 'order_summary'")
        try:
            assert conn.execute(look, (names, settled)).fetchone() == (None, settled)
            assert conn.execute(look, (names, None)).fetchone()[0] is not None  # a full look finds it
        finally:
            conn.execute("UPDATE cqrs.projections SET last_position = %s WHERE name = 'order_summary'", (last,))
        settled = conn.execute(look, (names, None)).fetchone()[1]
        assert settled is not None

        with psycopg.connect(db.dsn) as writer:
            place(writer, customer, sku)  # its transaction still open: positions taken, not final
            marked, settled_now = conn.execute(look, (names, settled)).fetchone()
            assert marked is True and settled_now is None
            writer.commit()


class _LooksKept(psycopg.Connection):
    """A connection that keeps the parameters of every look for work sent on it."""

    looks: list[Any]

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        if query is PENDING_SQL:
            self.looks.append(params)
        return super().execute(query, params, **kwargs)


def test_a_daemon_lingering_after_a_round_waits_on_the_server(db: Database) -> None:
    """A round that applied events is followed by a look in full, which finds every
    position settled; lingering from there each of the daemon's looks waits on the server
    for the sequence to move (the settled position and a wait given): no look in full
    from the daemon, and no asking again and again."""
    names = ["order_summary", "customer_stats"]
    listener = Listener(ListenerConfig(dsn=db.dsn))
    with _LooksKept.connect(db.dsn, autocommit=True) as conn:
        conn.looks = []
        seed(conn)
        db.run_projections()
        assert not listener._work_found(conn, names)  # the look after the round
        assert listener._settled_at(names) is not None
        conn.looks.clear()
        listener._linger(conn, names, until=time.monotonic() + SETTLED_WAIT * 1.5)
    assert conn.looks, "it looked for work while lingering"
    assert all(params[2] is not None and params[3] > 0 for params in conn.looks), conn.looks
    assert len(conn.looks) <= 3, f"{len(conn.looks)} looks in {SETTLED_WAIT * 1.5} s"


def _waits_for(observer: psycopg.Connection, pid: int, event: tuple[str, str], what: str) -> None:
    """Returns once backend `pid` waits on `event` (pg_stat_activity's wait_event_type and
    wait_event); fails after 30 s, naming `what` it never waited for."""
    wait_until(lambda: observer.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s",
                                        (pid,)).fetchone() == event,
               f"backend {pid} to wait for {what}", timeout=30, interval=0.005)


def _waits_on_a_command_lock(observer: psycopg.Connection, pid: int) -> None:
    """Returns once backend `pid` waits for an advisory lock (a command's)."""
    _waits_for(observer, pid, ("Lock", "advisory"), "a command's lock")


def test_a_lingering_look_waits_for_the_command_in_flight_to_commit(db: Database) -> None:
    """A look that finds positions not final yet, and already marked (another reader's
    mark covers the command in flight), waits on the server for that command's lock and
    returns with the work its commit made final: the lingering daemon sees the commit as
    it happens instead of asking again and again. The command's events are applied by the
    round that follows."""
    names = ["order_summary", "customer_stats"]
    listener = Listener(ListenerConfig(dsn=db.dsn))
    with _LooksKept.connect(db.dsn, autocommit=True) as conn, psycopg.connect(db.dsn) as writer, \
            db.connect() as observer:
        conn.looks = []
        conn.execute("SELECT cqrs.listener_heartbeat('other', false, '1 minute')")
        customer, sku = seed(conn)
        db.run_projections()
        assert not listener._work_found(conn, names)
        order_id = place(writer, customer, sku)[0]  # its transaction still open: positions taken, not final
        assert conn.execute("SELECT cqrs.take_mark('other')").fetchone()[0] is True
        conn.looks.clear()
        lingering = threading.Thread(target=listener._linger, args=(conn, names, time.monotonic() + 60))
        lingering.start()
        try:
            _waits_on_a_command_lock(observer, conn.info.backend_pid)
            writer.commit()
        finally:
            lingering.join()
        assert listener._marked is not None, "the look returned without work"
        assert all(params[3] > 0 for params in conn.looks), conn.looks
    assert db.run_projections() > 0
    with db.connect() as check:
        assert check.execute("SELECT count(*) FROM shop_read.order_summary WHERE order_id = %s",
                             (order_id,)).fetchone()[0] == 1


def test_a_mark_wait_ends_with_the_command_and_leaves_no_lock_behind(db: Database) -> None:
    """cqrs.mark_usable, with a command in flight at the fence, waits for the command's
    own lock rather than spinning or sleeping, and is usable as the command commits. It
    leaves nothing behind in the caller's transaction: no advisory lock held (a twin of
    the command, with the same command_id, never waits for it) and its lock_timeout as
    it was. A lock in the commands' space held by a session that is not at the fence is
    not waited on."""
    with db.connect() as conn, psycopg.connect(db.dsn) as writer, db.connect() as observer, \
            db.connect() as bystander:
        conn.execute("SELECT cqrs.listener_heartbeat('waiter', false, '1 minute')")
        customer, sku = seed(conn)
        bystander.execute("SELECT pg_advisory_lock(cqrs._lock_space('command'), 7)")  # no xid: not at the fence
        place(writer, customer, sku)  # its transaction still open
        assert conn.execute("SELECT cqrs.take_mark('waiter')").fetchone()[0] is True
        usable: list[Any] = []

        def wait() -> None:
            with conn.transaction():
                conn.execute("SET LOCAL lock_timeout = '7s'")
                usable.append(conn.execute("SELECT cqrs.mark_usable('waiter', '20 s', '0 s')").fetchone()[0])
                usable.append(conn.execute(
                    "SELECT current_setting('lock_timeout'),"
                    " (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory')"
                ).fetchone())

        waiter = threading.Thread(target=wait)
        waiter.start()
        try:
            _waits_on_a_command_lock(observer, conn.info.backend_pid)
            writer.commit()
        finally:
            waiter.join()
        assert usable == [True, ("7s", 0)]


def test_a_mark_wait_on_a_command_ends_by_half_the_deadlock_timeout(db: Database) -> None:
    """A wait on a command's lock may close a cycle of lock waits (a DDL queued behind the
    waiter's reads, the command queued behind the DDL): it ends by half of deadlock_timeout
    from the start of the waiter's transaction, before any of them looks for a deadlock,
    so that the command is never its victim. Past that, cqrs.mark_usable goes on waiting
    by sleeping between looks."""
    with db.connect() as conn, psycopg.connect(db.dsn) as writer, db.connect() as observer:
        conn.execute("SELECT cqrs.listener_heartbeat('waiter', false, '1 minute')")
        customer, sku = seed(conn)
        place(writer, customer, sku)  # its transaction still open
        assert conn.execute("SELECT cqrs.take_mark('waiter')").fetchone()[0] is True
        usable: list[Any] = []

        def wait() -> None:
            with conn.transaction():
                conn.execute("SET LOCAL deadlock_timeout = '200ms'")
                usable.append(conn.execute("SELECT cqrs.mark_usable('waiter', '60 s', '0 s')").fetchone()[0])

        waiter = threading.Thread(target=wait)
        waiter.start()
        try:
            _waits_on_a_command_lock(observer, conn.info.backend_pid)
            _waits_for(observer, conn.info.backend_pid, ("Timeout", "PgSleep"), "a sleep after the command's lock")
            writer.commit()
        finally:
            waiter.join()
        assert usable == [True]


def test_a_shared_round_given_the_mark_waits_for_it_and_reads_what_committed(db: Database) -> None:
    """cqrs.run_projections with a daemon's listener_id first waits (spinning, then
    sleeping) for the mark that daemon's look took under a running writer: it applies
    the writer's events, committed while it waited; without the wait it finds none
    final. A wait that runs out goes on with what is final. Every row reports how long
    the wait took (waited), which the daemon's apply budget leaves out."""
    look = "SELECT marked FROM cqrs.look_for_work(%s, 'spinner')"
    run = ("SELECT sum(applied)::int, min(waited), max(waited)"
           " FROM cqrs.run_projections(%s, 5000, %s, make_interval(secs => %s), '0.01 s')")
    names = ["order_summary", "customer_stats"]
    with db.connect() as conn:
        conn.execute("SELECT cqrs.listener_heartbeat('spinner', false, '1 minute')")
        customer, sku = seed(conn)
        db.run_projections()
        with psycopg.connect(db.dsn) as writer:
            writer.execute("BEGIN")
            order_id = place(writer, customer, sku)[0]
            assert conn.execute(look, (names,)).fetchone()[0] is True
            assert conn.execute(run, (names, None, 0)).fetchone() == (0, 0, 0)  # not final: not read
            applied, waited, same = conn.execute(run, (names, "spinner", 0.05)).fetchone()
            assert applied == 0 and 0.05 <= waited == same < 30  # the wait ran out
            ends = threading.Timer(0.2, writer.commit)
            started = time.monotonic()
            ends.start()
            applied, waited, same = conn.execute(run, (names, "spinner", 30)).fetchone()
            assert applied > 0 and 0.1 < waited == same < time.monotonic() - started
            ends.join()
        assert conn.execute("SELECT count(*) FROM shop_read.order_summary WHERE order_id = %s",
                            (order_id,)).fetchone()[0] == 1


def test_a_batch_leaves_the_callers_planner_settings_as_they_were(db: Database) -> None:
    """Small batches are planned with settings of their own (generic plans, nested loops,
    no JIT), large ones (over more than 1,000 positions) for their bounds: the caller's
    settings are the same after either, and each applies its events."""
    settings = ("SELECT current_setting('plan_cache_mode'), current_setting('enable_hashjoin'),"
                " current_setting('enable_seqscan'), current_setting('jit')")
    run = "SELECT applied FROM cqrs.run_projection('order_summary', 5000)"
    with db.connect() as conn:
        customer, sku = seed(conn)
        db.run_projections()
        for gap in (0, 5000):  # a small batch, then one over more than 1,000 positions
            conn.execute("SELECT setval('cqrs.outbox_position_seq', nextval('cqrs.outbox_position_seq') + %s)", (gap,))
            orders = [place(conn, customer, sku)[0] for _ in range(3)]
            with conn.transaction():
                conn.execute("SET LOCAL jit = on")
                before = conn.execute(settings).fetchone()
                waiting = conn.execute("SELECT count(*) FROM cqrs.outbox WHERE position >"
                                       " (SELECT last_position FROM cqrs.projections WHERE name = 'order_summary')"
                                       ).fetchone()[0]
                assert conn.execute(run).fetchone()[0] == waiting > 0
                assert conn.execute(settings).fetchone() == before
            assert conn.execute("SELECT count(*) FROM shop_read.order_summary WHERE order_id = ANY(%s)",
                                (orders,)).fetchone()[0] == 3


# plans.planned() is immutable, so a plan folds its call in: it runs when a plan is made,
# never when one runs, and plans.made counts the plans made of the apply's statement.
PLANS_COUNTED = """
CREATE SCHEMA plans;
CREATE SEQUENCE plans.made;
CREATE TABLE plans.items (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), version integer NOT NULL DEFAULT 1);
SELECT cqrs.capture_changes('plans.items', 'item', 'item', 'id', 'version');
CREATE TABLE plans.seen (position bigint PRIMARY KEY);
CREATE FUNCTION plans.planned() RETURNS bigint LANGUAGE plpgsql IMMUTABLE
AS $$ BEGIN RETURN nextval('plans.made'); END $$;
CREATE FUNCTION plans.apply(a bigint, b bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen SELECT e.position FROM cqrs.batch(a, b) e WHERE plans.planned() > 0;
END
$$;
SELECT cqrs.register_projection('planned', 'sql', 'plans.apply', search_path => 'plans',
                                tables => ARRAY['plans.seen']::regclass[]);
"""


def test_the_daemon_has_small_batch_plans_made_again_as_it_applies(db: Database) -> None:
    """A small batch's generic plan is made once per session, from the statistics of that
    moment (a read model empty then stays estimated empty): the daemon has a connection's
    plans made again each time the events applied on it double, from 1,000. 3,000 events
    in batches of 100: plans made at the first batch, after 1,000 and after 2,000; once
    per session would be one, once per batch thirty."""
    with db.connect() as conn:
        conn.execute(PLANS_COUNTED)
        conn.execute("INSERT INTO plans.items (version) SELECT 1 FROM generate_series(1, 3000)")
    with running_daemon(db.dsn, batch_size=100, projections=["planned"]), db.connect() as conn:
        wait_until(lambda: conn.execute("SELECT count(*) FROM plans.seen").fetchone()[0] == 3000,
                   "the 3,000 events applied")
        made = conn.execute("SELECT last_value FROM plans.made").fetchone()[0]
    # an analyze of a table the plan reads (autovacuum) may have it made once more
    assert 3 <= made <= 5, made


BUSY_TABLES = ("cqrs.projections", "cqrs.listeners", "cqrs.subscriptions")


def seq_scans(conn: psycopg.Connection) -> dict[str, int]:
    """Scans of every page of the busy tables by this session not yet reported (which
    may include transactions before this one): compared before and after, in one."""
    return dict(conn.execute(
        "SELECT relname, seq_scan FROM pg_stat_xact_user_tables WHERE relid = ANY (%s::regclass[])",
        (list(BUSY_TABLES),),
    ).fetchall())


def test_hot_paths_read_grown_busy_rows_through_their_indexes(db: Database) -> None:
    """Rewritten at every batch, round and ack, these tables' heaps grow far beyond their
    rows while old versions wait for a replica's horizon (here: a snapshot held open).
    Once their statistics say so, a command's doorbell, a daemon's look, mark and round,
    caught_up and a subscription's ack read them through their indexes: none reads every
    page, even where it reads every row."""
    with db.connect() as conn:
        customer, sku = seed(conn)
        conn.execute("SELECT cqrs.create_subscription('audit')")
        conn.execute("SELECT cqrs.listener_heartbeat('test', true, '1 minute')")
        with psycopg.connect(db.dsn) as holder:
            holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            holder.execute("SELECT 1")  # its snapshot keeps every version below
            for _ in range(1000):
                conn.execute("UPDATE cqrs.projections SET updated_at = now()")
                conn.execute("UPDATE cqrs.listeners SET final_position = final_position")
                conn.execute("UPDATE cqrs.subscriptions SET acked_at = now()")
        conn.execute(f"VACUUM ANALYZE {', '.join(BUSY_TABLES)}")
        pages = conn.execute("SELECT min(relpages) FROM pg_class WHERE oid = ANY (%s::regclass[])",
                             (list(BUSY_TABLES),)).fetchone()[0]
        assert pages >= 8, pages
        with conn.transaction():  # no report of the counts inside one
            before = seq_scans(conn)
            _, token = place(conn, customer, sku)  # rings: a daemon sleeps
            assert seq_scans(conn) == before
        conn.execute("SELECT cqrs.listener_heartbeat('test', false, '1 minute')")
        with psycopg.connect(db.dsn) as other:  # a command in flight: the mark waits for it
            place(other, customer, sku)
            with conn.transaction():
                before = seq_scans(conn)
                assert conn.execute("SELECT cqrs.take_mark('test')").fetchone() == (True,)
                assert conn.execute("SELECT cqrs.mark_usable('test', '5 ms')").fetchone() == (False,)
                assert seq_scans(conn) == before
            other.rollback()
        with conn.transaction():
            before = seq_scans(conn)
            assert conn.execute("SELECT marked FROM cqrs.look_for_work(ARRAY['customer_stats', 'order_summary'],"
                                " 'test')").fetchone() is not None
            conn.execute("SELECT cqrs.take_mark('test')")
            applied = conn.execute("SELECT sum(applied) FROM cqrs.run_projections("
                                   "ARRAY['customer_stats', 'order_summary'], 1000, 'test', '10 ms')").fetchone()[0]
            assert applied > 0
            assert seq_scans(conn) == before
        with conn.transaction():  # a reader's, after the round committed
            before = seq_scans(conn)
            assert conn.execute("SELECT cqrs.caught_up(%s, 'order_summary')", (token,)).fetchone()[0]
            assert conn.execute("SELECT cqrs.caught_up(%s)", (token,)).fetchone()[0] is not None
            assert seq_scans(conn) == before
        cursors = [r[0] for r in conn.execute("SELECT cursor FROM cqrs.poll('audit', 10)")]
        assert cursors
        with conn.transaction():
            before = seq_scans(conn)
            conn.execute("SELECT cqrs.ack('audit', %s)", (cursors[-1],))
            assert seq_scans(conn) == before


def test_sleeping_daemon_wakes_on_notify(db: Database) -> None:
    """With polling slowed to a minute, only the doorbell can explain a prompt catch-up."""
    with db.connect() as conn:
        customer, sku = seed(conn)
    with running_daemon(db.dsn, poll_interval=60.0, linger=0.0):
        wait_until(lambda: sleeping_listeners(db) == 1)
        with db.connect() as conn:
            _, token = place(conn, customer, sku)
        db.wait_caught_up(token, timeout=5.0, replica=False)


def test_a_daemon_of_views_alone_never_asks_commands_to_ring(db: Database) -> None:
    """A daemon that serves only materialized views polls for their events: commands do not
    pay NOTIFY's commit lock for a refresh that waits for its interval anyway."""
    with db.connect() as conn, db.connect() as bell:
        customer, sku = seed(conn)
        bell.execute("LISTEN cqrs_outbox")
        with running_daemon(db.dsn, poll_interval=0.05, linger=0.0, refresh_interval=0.0,
                            projections=["product_sales"]):
            for quantity in (1, 2, 3):
                place(conn, customer, sku, quantity)
                sold = scalar(conn, "SELECT sum(quantity) FROM shop.order_lines")
                wait_until(lambda s=sold: scalar(conn, "SELECT sum(units_sold) FROM shop_read.product_sales") == s,
                           "the view refreshed")
            assert sleeping_listeners(db) == 0
            assert not notified(bell), "a command rang for a daemon of views alone"


def test_a_rung_daemon_says_it_is_awake_before_it_finds_work(db: Database) -> None:
    """The doorbell rang but the event is still above the fence (an older transaction is
    open): the daemon must say at once that it is awake, or every command keeps ringing
    (and paying NOTIFY's commit lock) for as long as the fence is held."""
    with db.connect() as conn:
        customer, sku = seed(conn)
    with running_daemon(db.dsn, poll_interval=60.0):
        wait_until(lambda: sleeping_listeners(db) == 1)
        with psycopg.connect(db.dsn) as older:
            older.execute("SELECT pg_current_xact_id()")  # holds the fence
            with db.connect() as conn:
                place(conn, customer, sku)  # rings
            wait_until(lambda: sleeping_listeners(db) == 0, "the daemon awake while the fence holds its work",
                       timeout=5.0, interval=0.005)


def test_polling_catches_up_without_notify(db: Database) -> None:
    """Correctness never depends on NOTIFY: with the doorbell silenced, polling applies."""
    with db.connect() as conn:
        customer, sku = seed(conn)
    with running_daemon(db.dsn, poll_interval=0.2, linger=0.0):
        wait_until(lambda: sleeping_listeners(db) == 1)
        with db.connect() as conn:
            conn.execute("UPDATE cqrs.listeners SET sleeping = false")  # no command will ring
            _, token = place(conn, customer, sku)
        db.wait_caught_up(token, timeout=10.0, replica=False)


def test_daemon_removes_its_listener_row_on_stop(db: Database) -> None:
    with running_daemon(db.dsn):
        wait_until(lambda: db.connect().execute("SELECT count(*) FROM cqrs.listeners").fetchone()[0] == 1)
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM cqrs.listeners").fetchone()[0] == 0


def test_two_definitions_of_one_handler_name_are_refused() -> None:
    """A copied decorator: a second function of the same name, for the same projection,
    would silently replace the first. The same definition registered again (its module
    imported again) is no conflict."""
    def apply(conn: psycopg.Connection, events: list[Any]) -> None:
        del conn, events

    first = apply
    register("twice")(first)
    try:
        register("twice")(first)

        def apply(conn: psycopg.Connection, events: list[Any]) -> None:
            del conn, events

        with pytest.raises(ValueError, match="projection 'twice' already has a handler"):
            register("twice")(apply)
    finally:
        unregister("twice")
