"""The three group roles are enough for what each user does: a login member of each
role runs its part of the system, and nothing more is needed."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from cqrs_pg.daemon import Listener, ListenerConfig
from cqrs_pg.status import collect
from cqrs_pg.verify import all_mismatches
from tests.conftest import Database


@pytest.fixture
def login_as(db: Database) -> Iterator:  # type: ignore[type-arg]
    """login_as(group) -> the name of a fresh LOGIN role that is a member of group only."""
    made: list[str] = []

    def make(group: str) -> str:
        name = f"{group}_{uuid.uuid4().hex[:8]}"
        with db.connect() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(name), sql.Identifier(group)))
        made.append(name)
        return name

    yield make
    with db.connect() as conn:
        for name in made:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_writer_reader_and_listener_roles_run_the_loop(db: Database, login_as) -> None:  # type: ignore[no-untyped-def]
    writer = make_conninfo(db.dsn, user=login_as("cqrs_writer"))
    listener_dsn = make_conninfo(db.dsn, user=login_as("cqrs_listener"))
    reader = make_conninfo(db.replica_dsn, user=login_as("cqrs_reader"))
    with psycopg.connect(writer, autocommit=True) as conn:
        customer = conn.execute(
            "SELECT aggregate_id FROM shop.register_customer(gen_random_uuid(), 'role@example.com', 'Role')"
        ).fetchone()[0]
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'R-1', 'r', 300, 10)")
        order, token = conn.execute(
            "SELECT aggregate_id, token FROM shop.place_order(gen_random_uuid(), %s, %s)",
            (customer, Jsonb([{"sku": "R-1", "quantity": 2}])),
        ).fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM shop.orders")

    listener = Listener(ListenerConfig(dsn=listener_dsn, refresh_interval=0.1, stall_warning=0.5))
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        db.wait_caught_up(token)
        report = collect(listener_dsn, db.replica_dsn)  # cqrs-pg status, as the listener
        assert {p["name"] for p in report["projections"]} == {"order_summary", "customer_stats", "product_sales"}
    finally:
        listener.stop()
        thread.join(timeout=30)
    assert listener.applied_total > 0

    with psycopg.connect(reader, autocommit=True) as conn:
        assert conn.execute("SELECT cqrs.caught_up(%s)", (token,)).fetchone()[0]
        row = conn.execute("SELECT status, total_cents FROM shop_read.order_summary WHERE order_id = %s", (order,))
        assert row.fetchone() == ("placed", 600)
        assert conn.execute("SELECT units_sold FROM shop_read.product_sales").fetchone()[0] == 2
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM cqrs.outbox")
    with db.connect() as conn:
        assert all_mismatches(conn) == {"order_summary": 0, "customer_stats": 0, "product_sales": 0}
