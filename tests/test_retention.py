"""Retention: the outbox partitioned by position; `cqrs-pg prune` drops whole partitions
that every reader has passed and that are older than the keep period, never more; a
database whose outbox holds events upgrades to the partitioned form in place."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cqrs_pg.migrate import migrate
from cqrs_pg_tools.testing import (
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

EVERY_EQUAL = {"order_summary": 0, "customer_stats": 0, "product_sales": 0}


def partitions(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT partition::text FROM cqrs._outbox_partitions()")]


def next_partition(conn: psycopg.Connection, customer: uuid.UUID, orders: int = 3) -> None:
    """Orders placed in the next partition (skip_to_next_partition)."""
    skip_to_next_partition(conn)
    for _ in range(orders):
        place(conn, customer, "SUITE-1")


def history(db: Database) -> uuid.UUID:
    """Events in partitions outbox_0, outbox_1000000 and outbox_2000000."""
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        for _ in range(3):
            place(conn, customer, sku)
        next_partition(conn, customer)
        next_partition(conn, customer)
    return customer


def test_prune_drops_only_partitions_every_projection_has_passed(db: Database) -> None:
    """A partition goes only once every projection has applied all of it and its newest
    event is older than the keep period; one projection behind keeps it, and catches up
    afterwards with nothing lost."""
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        for _ in range(3):
            place(conn, customer, sku)
        db.run_projections()
        # customer_stats stops inside the first partition; the others go on
        for _ in range(2):
            next_partition(conn, customer)
            for name in ("order_summary", "product_sales"):
                conn.execute("SELECT cqrs.run_projection(%s, 10000, '0 s')", (name,))
        assert partitions(conn)[:3] == ["cqrs.outbox_0", "cqrs.outbox_1000000", "cqrs.outbox_2000000"]
        events = scalar(conn, "SELECT count(*) FROM cqrs.outbox")
        assert conn.execute("SELECT * FROM cqrs.prune('0 s')").fetchall() == []
        db.run_projections()
        # every projection is past two partitions, but their events are younger than an hour
        assert conn.execute("SELECT * FROM cqrs.prune('1 hour')").fetchall() == []
        would = conn.execute("SELECT partition, events FROM cqrs.prune('0 s', dry_run => true)").fetchall()
        first = scalar(conn, "SELECT count(*) FROM cqrs.outbox WHERE position < 1000000")
        assert would == [("cqrs.outbox_0", first), ("cqrs.outbox_1000000", 3 * 5)]
        assert partitions(conn)[0] == "cqrs.outbox_0", "a dry run changes nothing"
        dropped = [r[0] for r in conn.execute("SELECT partition FROM cqrs.prune('0 s')")]
        assert dropped == ["cqrs.outbox_0", "cqrs.outbox_1000000"]
        assert partitions(conn)[0] == "cqrs.outbox_2000000"
        assert scalar(conn, "SELECT cqrs._history_start()") == 2_000_000
        assert scalar(conn, "SELECT count(*) FROM cqrs.outbox") == events - first - 15
        place(conn, customer, sku)
        db.run_projections()
        assert all_mismatches(conn) == EVERY_EQUAL


@pytest.mark.parametrize("reader", [
    "SELECT cqrs.register_projection('late', 'python', search_path => 'shop_read')",
    "SELECT cqrs.create_subscription('late', from_beginning => true)",
])
def test_a_reader_created_while_prune_runs_keeps_its_history(db: Database, reader: str) -> None:
    """A projection or subscription created from the oldest history, not committed yet when
    a prune starts: the prune waits for it, then keeps what it has not passed."""
    history(db)
    db.run_projections()
    with db.connect() as conn, psycopg.connect(db.dsn) as deploy:
        first = scalar(conn, "SELECT min(position) FROM cqrs.outbox")
        deploy.execute(reader)
        pruned: list[list[str]] = []
        pruner = threading.Thread(target=lambda: pruned.append(prune_all(db)))
        pruner.start()
        wait_until(lambda: not pruner.is_alive() or scalar(
            conn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%%cqrs.prune%%'"),
            "the prune to finish or wait")
        deploy.commit()
        pruner.join(timeout=60)
        assert pruned == [[]]
        assert scalar(conn, "SELECT cqrs._history_start()") is None
        assert scalar(conn, "SELECT min(position) FROM cqrs.outbox") == first


def prune_all(db: Database) -> list[str]:
    with db.connect() as conn:
        return [r[0] for r in conn.execute("SELECT partition FROM cqrs.prune('0 s')")]


def test_a_parked_event_keeps_its_partition(db: Database) -> None:
    history(db)
    db.run_projections()
    with db.connect() as conn:
        parked = scalar(conn, "SELECT min(position) FROM cqrs.outbox")
        conn.execute("INSERT INTO cqrs.parked (projection, position, event_type, outcome, attempts)"
                     " VALUES ('order_summary', %s, 'x', 'parked', 1)", (parked,))
        assert conn.execute("SELECT * FROM cqrs.prune('0 s')").fetchall() == []
        conn.execute("UPDATE cqrs.parked SET outcome = 'skipped'")
        assert [r[0] for r in conn.execute("SELECT partition FROM cqrs.prune('0 s')")] == [
            "cqrs.outbox_0", "cqrs.outbox_1000000"]


def test_events_beyond_every_partition_are_kept_and_moved(db: Database) -> None:
    """With no partition ready (no daemon ran for millions of positions), events go to the
    default partition; extend_outbox moves them into a range partition; none is lost."""
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        conn.execute("SELECT setval('cqrs.outbox_position_seq', 5000000)")
        for _ in range(3):
            place(conn, customer, sku)
        assert scalar(conn, "SELECT count(*) FROM cqrs.outbox_default") > 0
        assert scalar(conn, "SELECT overflow_events FROM cqrs.outbox_status()") == 15
        before = conn.execute("SELECT * FROM cqrs.outbox ORDER BY position").fetchall()
        added = [r[0] for r in conn.execute("SELECT cqrs.extend_outbox()::text")]
        assert added[0] == "cqrs.outbox_3000000"
        assert scalar(conn, "SELECT count(*) FROM cqrs.outbox_default") == 0
        assert conn.execute("SELECT * FROM cqrs.outbox ORDER BY position").fetchall() == before
        place(conn, customer, sku)
        assert scalar(conn, "SELECT count(*) FROM cqrs.outbox_default") == 0
    db.run_projections()
    with db.connect() as conn:
        assert all_mismatches(conn) == EVERY_EQUAL


def test_prune_command_line(db: Database, login_as: Callable[..., str]) -> None:
    history(db)
    db.run_projections()
    env = {"CQRS_PG_DSN": db.dsn}
    dry = cli("prune", "--keep", "0s", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would drop cqrs.outbox_0: positions 1..999999" in dry.stdout
    assert "would drop 2 partitions" in dry.stdout
    kept = cli("prune", env=env)  # the default keep: 7 days
    assert kept.returncode == 0, kept.stderr
    assert "nothing to drop: history kept all of it" in kept.stdout
    with db.connect() as conn:  # a subscription behind every projection holds history back
        conn.execute("SELECT cqrs.create_subscription('behind', from_beginning => true)")
        held = cli("prune", "--keep", "0s", env=env)
        assert "nothing to drop" in held.stdout and "furthest behind: subscription 'behind', at position 0" in held.stdout
        conn.execute("SELECT cqrs.drop_subscription('behind')")
    # as the daemon's role, which may prune: the report afterwards reads only what it may
    done = cli("prune", "--keep", "0s", env={"CQRS_PG_DSN": make_conninfo(db.dsn, user=login_as("cqrs_listener"))})
    assert done.returncode == 0, done.stderr
    assert "dropped 2 partitions" in done.stdout and "history kept from position 2000000 on" in done.stdout
    status = cli("status", "--json", env=env)
    outbox = json.loads(status.stdout)["outbox"]
    assert (outbox["history_start"], outbox["overflow_events"]) == (2_000_000, 0)
    assert outbox["partitions"] >= 3 and outbox["bytes"] > 0 and outbox["ready_ahead"] >= 2_000_000
    assert "history kept from position 2000000 on (pruned before)" in cli("status", env=env).stdout
    assert_one_line_error(cli("prune", "--keep", "7x", env=env), "'7x' is not a duration")
    assert_one_line_error(cli("prune", "--keep", "0s", env={"CQRS_PG_DSN": db.replica_dsn}), "standby")


def test_refused_arguments_change_nothing(db: Database) -> None:
    with db.connect() as conn:
        for bad in ("'-1 s'::interval", "NULL"):
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(f"SELECT * FROM cqrs.prune({bad})")
            assert refused.value.sqlstate == "CQ001"
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("SELECT cqrs.extend_outbox(10)")
        assert refused.value.sqlstate == "CQ001"
        assert len(partitions(conn)) == 3


def test_the_daemon_prunes_on_a_schedule_and_keeps_partitions_ahead(db: Database) -> None:
    history(db)
    with db.connect() as conn:
        conn.execute("SELECT setval('cqrs.outbox_position_seq', 3500000)")  # past what is ready ahead
        with running_daemon(db.dsn, prune_keep=0.0, prune_interval=1.0):
            # every projection goes past the positions no event took, to the last one handed
            # out; the partition that holds it stays
            wait_until(lambda: partitions(conn)[0] == "cqrs.outbox_3000000", "the daemon to prune", timeout=30)
            assert partitions(conn)[-1] == "cqrs.outbox_5000000"
            customer = scalar(conn, "SELECT id FROM shop.customers LIMIT 1")
            token = scalar(conn, "SELECT token FROM shop.place_order(gen_random_uuid(), %s, %s::jsonb)",
                           (customer, '[{"sku": "SUITE-1", "quantity": 1}]'))
            db.wait_caught_up(token, replica=False)
        assert all_mismatches(conn) == EVERY_EQUAL


def test_an_outbox_holding_events_upgrades_to_the_partitioned_form(empty_db: Database) -> None:
    """At the revision before partitions, with events and projections part-way; migrated
    in place: every event kept as it was, new ones after them, every read model right."""
    migrate(empty_db.dsn, "shop_0002")
    with empty_db.connect() as conn:
        customer, sku = seed_shop(conn)
        for _ in range(5):
            place(conn, customer, sku)
        empty_db.run_projections()
        for _ in range(5):
            place(conn, customer, sku)
        before = conn.execute("SELECT * FROM cqrs.outbox ORDER BY position").fetchall()
        started = time.monotonic()
        migrate(empty_db.dsn, example="shop")
        print(f"migrated {len(before)} events in {time.monotonic() - started:.2f}s")
        assert scalar(conn, "SELECT relkind FROM pg_class WHERE oid = 'cqrs.outbox'::regclass") == "p"
        assert partitions(conn) == ["cqrs.outbox_0", "cqrs.outbox_1000000", "cqrs.outbox_2000000"]
        after = conn.execute("SELECT * FROM cqrs.outbox ORDER BY position").fetchall()
        assert [row[:-1] for row in after] == before
        assert {row[-1] for row in after} == {1}  # payload_version: every event so far of its first shape
        place(conn, customer, sku)
        assert scalar(conn, "SELECT min(position) FROM cqrs.outbox WHERE occurred_at > %s",
                      (before[-1][-1],)) > before[-1][0]
        empty_db.run_projections()
        assert all_mismatches(conn) == EVERY_EQUAL
