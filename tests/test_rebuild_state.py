"""Read models from the write model's state: `cqrs-pg rebuild` loads a projection from its
state function under one snapshot and resumes the log exactly there (no event lost or
applied twice while writers commit out of order), also after `prune` removed the early
history; `cqrs-pg verify` compares every read model with its definition."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cqrs_pg.rebuild import rebuild
from cqrs_pg_tools.testing import (
    NO_MISMATCH,
    Database,
    assert_one_line_error,
    cli,
    place,
    running_daemon,
    scalar,
    seed_shop,
    skip_to_next_partition,
    wait_until,
)
from cqrs_pg_tools.verify import all_mismatches
from cqrs_pg_tools.workload import ShopWorkload, WorkloadResult

STATEFUL = ("order_summary", "customer_stats")


def one_line(conn: psycopg.Connection, customer: uuid.UUID, sku: str) -> uuid.UUID:
    """An order of one line (place() adds a second product, whose row lock would make the
    transactions below wait for each other)."""
    order: uuid.UUID = scalar(conn, "SELECT aggregate_id FROM shop.place_order(gen_random_uuid(), %s, %s)",
                              (customer, Jsonb([{"sku": sku, "quantity": 1}])))
    return order


def test_rebuild_from_state_resumes_the_log_exactly_at_its_snapshot(db: Database) -> None:
    """While the state is loaded, one command's transaction is open (its events below
    positions already committed and in the snapshot) and others commit: the new read model
    holds the open one's events once it commits, and the others' once, not twice."""
    with db.connect() as conn, db.connect() as open_tx:
        customer, sku = seed_shop(conn)
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'OPEN-1', 'Held', 70, 100)")
        for _ in range(3):
            place(conn, customer, sku)
        db.run_projections()
        conn.execute("UPDATE shop_read.customer_stats SET orders_placed = -1")  # damage: the rebuild mends it
        with open_tx.transaction():
            one_line(open_tx, customer, "OPEN-1")  # appended first, committed last
            for _ in range(3):
                one_line(conn, customer, sku)
            order = one_line(conn, customer, sku)
            conn.execute("SELECT shop.cancel_order(gen_random_uuid(), %s)", (order,))
            lines: list[str] = []
            rebuilds = threading.Thread(
                target=lambda: [rebuild(db.dsn, projection, 2, lines.append) for projection in STATEFUL])
            rebuilds.start()
            # the swap waits for the open transaction: its events may still come below the
            # positions the snapshot saw
            wait_until(lambda: any("waiting for transactions open" in line for line in lines),
                       "the rebuild to wait for the open transaction")
            assert "loaded order_summary from the write model's state" in lines[0]
            assert rebuilds.is_alive()
        rebuilds.join(timeout=60)
        assert not rebuilds.is_alive()
        db.run_projections()
        assert all_mismatches(conn) == NO_MISMATCH
        assert scalar(conn, "SELECT orders_placed FROM shop_read.customer_stats WHERE customer_id = %s",
                      (customer,)) == 8


def test_rebuild_from_state_under_concurrent_writers_and_the_daemon(db: Database) -> None:
    workload = ShopWorkload(db.dsn, seed=11, hold_max=0.005)
    workload.setup(customers=20, products=6, stock=100_000)
    with running_daemon(db.dsn, batch_size=50):
        box: list[WorkloadResult] = []
        writers = threading.Thread(target=lambda: box.append(workload.run(6, commands_per_client=80)))
        writers.start()
        for _ in range(2):
            for projection in STATEFUL:
                rebuild(db.dsn, projection, 20, lambda _line: None)
        writers.join()
        assert not box[0].errors
        db.wait_caught_up(box[0].max_token)
    with db.connect() as primary, db.connect_replica() as replica:
        assert all_mismatches(primary) == NO_MISMATCH
        db.wait_caught_up(box[0].max_token)
        assert all_mismatches(replica) == NO_MISMATCH


def test_after_prune_a_rebuild_comes_from_state_and_the_log_is_refused(db: Database) -> None:
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        place(conn, customer, sku)
        skip_to_next_partition(conn)
        place(conn, customer, sku)
        db.run_projections()
        assert [r[0] for r in conn.execute("SELECT partition FROM cqrs.prune('0 s')")] == ["cqrs.outbox_0"]
        env = {"CQRS_PG_DSN": db.dsn}
        refused = cli("rebuild", "--from", "log", "order_summary", env=env)
        assert_one_line_error(refused, "history before position 1000000 was pruned", "leave out --from log")
        assert refused.stdout == "", "refused before it starts"
        conn.execute("UPDATE shop_read.order_summary SET total_cents = 0")
        done = cli("rebuild", "order_summary", env=env)
        assert done.returncode == 0, done.stderr
        place(conn, customer, sku)
        db.run_projections()
        assert all_mismatches(conn) == NO_MISMATCH
        # a projection registered now could not see the pruned history
        conn.execute("CREATE TABLE public.late (id bigint PRIMARY KEY)")
        conn.execute("CREATE FUNCTION public.apply_late(a bigint, b bigint) RETURNS void LANGUAGE sql AS ''")
        with pytest.raises(psycopg.Error, match="history before position 1000000 was pruned") as refused:
            conn.execute("SELECT cqrs.register_projection('late', 'sql', 'public.apply_late', search_path => 'public',"
                         " tables => ARRAY['public.late']::regclass[])")
        assert refused.value.sqlstate == "CQ003"


def test_verify_command_line(db: Database) -> None:
    env = {"CQRS_PG_DSN": db.dsn}
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        for _ in range(3):
            place(conn, customer, sku)
        db.run_projections()
        done = cli("verify", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines() == [
            "customer_stats shop_read.customer_stats: equal",
            "customer_stats shop_proj.customer_stats_customers: equal",
            "customer_stats shop_proj.customer_stats_orders: equal",
            "order_summary shop_read.order_summary: equal",
            "order_summary shop_proj.order_summary_customers: equal",
            "product_sales shop_read.product_sales: equal",
        ]
        conn.execute("UPDATE shop_read.order_summary SET total_cents = total_cents + 1"
                     " WHERE order_id = (SELECT min(order_id::text)::uuid FROM shop_read.order_summary)")
        differs = cli("verify", "order_summary", env=env)
        assert differs.returncode == 3, differs.stdout + differs.stderr
        assert "order_summary shop_read.order_summary: 2 rows differ from its definition" in differs.stdout
        # behind: an event not applied yet
        place(conn, customer, sku)
        behind = cli("verify", "customer_stats", "--wait", "0", env=env)
        assert behind.returncode == 3
        assert "customer_stats: still behind the log after 0s: not compared" in behind.stdout
        conn.execute("UPDATE cqrs.projections SET state = 'halted', failed_position = 1 WHERE name = 'customer_stats'")
        halted = cli("verify", "customer_stats", env=env)
        assert halted.returncode == 3 and "customer_stats: halted" in halted.stdout
        assert_one_line_error(cli("verify", "nope", env=env), "no projection named 'nope'")


def test_state_functions_and_their_uses_refuse_misuse(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("CREATE FUNCTION public.two(a int) RETURNS void LANGUAGE sql AS ''")
        for call, state in (
            ("SELECT cqrs.set_state_function('order_summary', 'public.two')", "CQ001"),
            ("SELECT cqrs.set_state_function('product_sales', 'shop_proj.load_order_summary')", "CQ001"),
            ("SELECT cqrs.set_state_function('nope', 'shop_proj.load_order_summary')", "CQ002"),
            ("SELECT * FROM cqrs.verify('order_summary')", "CQ003"),  # not in one snapshot
            ("SELECT cqrs.rebuild_load('order_summary')", "CQ003"),
        ):
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(call)
            assert refused.value.sqlstate == state, call
        conn.execute("SELECT cqrs.rebuild_begin('order_summary')")
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.execute("SELECT cqrs.rebuild_load('order_summary')")
        with pytest.raises(psycopg.Error, match="load state only right after") as twice:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                conn.execute("SELECT cqrs.rebuild_load('order_summary')")
        assert twice.value.sqlstate == "CQ003"
        conn.execute("SELECT cqrs.rebuild_abort('order_summary')")
        conn.execute("SELECT cqrs.set_state_function('order_summary', NULL)")
        assert scalar(conn, "SELECT state_function FROM cqrs.projections WHERE name = 'order_summary'") is None
