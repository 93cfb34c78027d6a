"""Subscriptions from any SQL client: cqrs.create_subscription, cqrs.poll, cqrs.ack and
cqrs.drop_subscription. A consumer is handed every event after its cursor, gap-free, in
position order (each aggregate's in version order) and only up to the final position, the
same events again until it acknowledges them, one consumer at a time; pruning keeps what a
subscription has not passed; the role cqrs_consumer may do this and nothing else."""

from __future__ import annotations

import bisect
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from cqrs_pg_tools.testing import Database, new_customer, place, run, scalar, seed_shop, skip_to_next_partition, wait_until
from cqrs_pg_tools.workload import ShopWorkload

COLUMNS = ("position, tx_id, event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata,"
           " occurred_at, payload_version")


class Polled(NamedTuple):
    position: int
    aggregate_id: uuid.UUID
    version: int
    event_type: str
    aggregate_type: str
    cursor: str


def poll(conn: psycopg.Connection, name: str = "feed", max_events: int = 100) -> list[Polled]:
    return [Polled(*row) for row in conn.execute(
        "SELECT position, aggregate_id, aggregate_version, event_type, aggregate_type, cursor FROM cqrs.poll(%s, %s)",
        (name, max_events))]


def positions(events: list[Polled]) -> list[int]:
    return [e.position for e in events]


def ack(conn: psycopg.Connection, cursor: str, name: str = "feed") -> None:
    conn.execute("SELECT cqrs.ack(%s, %s)", (name, cursor))


def outbox(conn: psycopg.Connection, after: int = 0) -> list[int]:
    return [r[0] for r in conn.execute("SELECT position FROM cqrs.outbox WHERE position > %s ORDER BY position", (after,))]


def status(conn: psycopg.Connection, name: str = "feed") -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM cqrs.subscription_status() WHERE name = %s", (name,)).fetchone()
    assert row is not None, f"no subscription {name}"
    return row


def cursor_of(conn: psycopg.Connection, name: str = "feed") -> int:
    return int(scalar(conn, "SELECT last_position FROM cqrs.subscriptions WHERE name = %s", (name,)))


def refused(conn: psycopg.Connection, sqlstate: str, query: str, params: tuple[Any, ...] = ()) -> str:
    """The message of the error the statement raises, which must have this SQLSTATE."""
    with pytest.raises(psycopg.Error) as err:
        conn.execute(query, params)
    assert err.value.sqlstate == sqlstate, f"{query} {params}: {err.value.sqlstate} {err.value}"
    return str(err.value)


def backend_gone(conn: psycopg.Connection, pid: int) -> Callable[[], bool]:
    return lambda: not scalar(conn, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)", (pid,))


# ------------------------------------------------------------------ consumers under load


@dataclass
class Ledger:
    """What consumers were handed, shared between them: each batch in the order handed
    out, with the position acknowledged when it was handed out."""

    acked: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    batches: list[tuple[int, int, list[Polled]]] = field(default_factory=list)
    crashes: int = 0
    errors: list[str] = field(default_factory=list)


def consume(db: Database, ledger: Ledger, n: int, writing: threading.Event) -> None:
    """Polls, sometimes drops its connection before acknowledging (a crash: the next
    connection, its own or another consumer's, takes over), else acknowledges all of a
    batch or part of it; until writers are done and the subscription has passed the end."""
    rng = random.Random(n)
    conn: psycopg.Connection | None = None
    try:
        while True:
            if conn is None:
                conn = db.connect()
            batch = poll(conn, max_events=rng.randint(1, 30))
            if not batch:
                if not writing.is_set() and scalar(
                        conn, "SELECT last_position >= (SELECT max(position) FROM cqrs.outbox)"
                              " FROM cqrs.subscriptions WHERE name = 'feed'"):
                    return
                time.sleep(0.002)
                continue
            # recorded before it is acknowledged: no other consumer is handed events until then
            with ledger.lock:
                ledger.batches.append((ledger.acked, n, batch))
            if rng.random() < 0.2:
                conn.close()
                conn = None
                with ledger.lock:
                    ledger.crashes += 1
                continue
            upto = batch[-1] if rng.random() < 0.7 else rng.choice(batch)
            with ledger.lock:  # whoever is handed the next events records them after this
                ack(conn, upto.cursor)
                ledger.acked = upto.position
    except Exception as exc:  # noqa: BLE001 - reported to the test, a dying consumer must not pass silently
        with ledger.lock:
            ledger.errors.append(f"consumer {n}: {type(exc).__name__}: {exc}")
    finally:
        if conn is not None:
            conn.close()


def test_crashing_consumers_miss_nothing_and_keep_each_aggregates_order(db: Database) -> None:
    """8 writers on 4 hot products, each transaction held open a random while (commits finish
    out of order, and a later version can get the lower transaction id), and 3 consumers
    that crash before acknowledging a fifth of their batches: every poll hands out exactly
    the events after the acknowledged one, so each event arrives, first in position order."""
    workload = ShopWorkload(db.dsn, seed=5, hold_max=0.005)
    workload.setup(customers=10, products=4, stock=1_000_000)
    with db.connect() as conn:
        conn.execute("SELECT cqrs.create_subscription('feed')")
        start = cursor_of(conn)
    ledger = Ledger(acked=start)
    writing = threading.Event()
    writing.set()
    consumers = [threading.Thread(target=consume, args=(db, ledger, n, writing), daemon=True) for n in range(3)]
    for consumer in consumers:
        consumer.start()
    result = workload.run(8, commands_per_client=50)
    writing.clear()
    for consumer in consumers:
        consumer.join(timeout=30)
        assert not consumer.is_alive(), "a consumer did not finish"
    assert not result.errors, result.errors[:3]
    assert not ledger.errors, ledger.errors[:3]

    with db.connect() as conn:
        events = {r[0]: r[1:] for r in conn.execute(
            "SELECT position, aggregate_id, aggregate_version FROM cqrs.outbox WHERE position > %s ORDER BY position",
            (start,))}
        later_version_lower_xid = scalar(
            conn, "SELECT count(*) FROM cqrs.outbox a JOIN cqrs.outbox b ON a.aggregate_id = b.aggregate_id"
                  " AND a.aggregate_version < b.aggregate_version AND a.tx_id > b.tx_id WHERE a.position > %s",
            (start,))
        assert status(conn)["events_behind"] == 0
    order = list(events)
    assert len(order) > 500
    for acked, _, batch in ledger.batches:
        # gap-free from the acknowledged position on, in position order
        first = bisect.bisect_right(order, acked)
        assert positions(batch) == order[first:first + len(batch)], f"handed {positions(batch)[:5]}... after {acked}"
        assert all(events[e.position] == (e.aggregate_id, e.version) for e in batch)
    delivered: dict[int, Polled] = {}
    for _, _, batch in ledger.batches:
        for e in batch:
            delivered.setdefault(e.position, e)
    assert list(delivered) == order, "an event was never handed out"
    last: dict[uuid.UUID, int] = {}
    for e in delivered.values():
        assert e.version >= last.get(e.aggregate_id, 0), f"{e.aggregate_id}: version {e.version} after {last[e.aggregate_id]}"
        last[e.aggregate_id] = e.version
    # the run did what it is meant to: crashes, other consumers taking over, disorder
    taken_over = sum(1 for (_, a, x), (_, b, y) in zip(ledger.batches, ledger.batches[1:], strict=False)
                     if a != b and y[0].position <= x[-1].position)
    assert ledger.crashes > 5 and taken_over > 0 and later_version_lower_xid > 0, \
        (ledger.crashes, taken_over, later_version_lower_xid)


# ------------------------------------------------------------------ poll and ack


def test_unacknowledged_events_come_again_and_an_ack_moves_the_cursor(db: Database) -> None:
    with db.connect() as conn, db.connect() as other:
        customer, sku = seed_shop(conn)
        conn.execute("SELECT cqrs.create_subscription('feed')")
        start = cursor_of(conn)
        for _ in range(3):
            place(conn, customer, sku)
        rows = conn.execute(f"SELECT {COLUMNS}, cursor FROM cqrs.poll('feed')").fetchall()
        # each event as the outbox holds it, its cursor the position
        expected = conn.execute(f"SELECT {COLUMNS}, position::text AS cursor FROM cqrs.outbox WHERE position > %s ORDER BY 1",
                                (start,)).fetchall()
        assert rows == expected and len(rows) == 15
        handed = poll(conn)
        assert positions(handed) == outbox(conn, start)
        assert poll(conn) == handed, "not acknowledged: the same events again"

        ack(conn, handed[4].cursor)
        assert poll(conn) == handed[5:]
        ack(conn, handed[4].cursor)  # acknowledged already: nothing changes
        ack(conn, handed[0].cursor)
        assert (cursor_of(conn), status(conn)["acked_events"]) == (handed[4].position, 5)
        assert poll(conn) == handed[5:]

        ack(other, handed[-1].cursor)  # any session may acknowledge
        assert poll(conn) == []
        assert poll(other) == []
        assert (cursor_of(conn), status(conn)["acked_events"]) == (handed[-1].position, 15)

        place(conn, customer, sku)
        two = poll(conn, max_events=2)
        assert positions(two) == outbox(conn, handed[-1].position)[:2]
        assert poll(conn)[:2] == two, "the next poll starts from the cursor again, not after the last one handed out"


def test_one_consumer_at_a_time(db: Database) -> None:
    """Whoever was handed events holds them until it acknowledges them all, its session
    ends or its hold lapses; every other poll meanwhile receives nothing, also one that
    waited for the holder's poll to commit."""
    with db.connect() as admin:
        customer, sku = seed_shop(admin)
        admin.execute("SELECT cqrs.create_subscription('feed', from_beginning => true)")
        a, b = db.connect(), db.connect()
        try:
            handed = poll(a)
            assert len(handed) == 3
            assert poll(b) == []
            assert status(admin)["held_by_pid"] == a.info.backend_pid
            ack(a, handed[0].cursor)  # part of them: still held
            assert poll(b) == []
            ack(a, handed[-1].cursor)
            assert status(admin)["held_by_pid"] is None

            place(admin, customer, sku)
            to_b = poll(b)
            assert positions(to_b) == outbox(admin, handed[-1].position)
            assert poll(a) == []
            # b hangs past its hold (the 30 s it lasts without a poll or an ack of its own)
            admin.execute("UPDATE cqrs.subscriptions SET held_until = now() - interval '1 second'")
            assert poll(a) == to_b
            assert poll(b) == []
            a_pid = a.info.backend_pid
            a.close()  # a crashes: b takes the same events once its session is gone
            wait_until(backend_gone(admin, a_pid), "a's session to end")
            assert poll(b) == to_b
            ack(b, to_b[-1].cursor)
        finally:
            a.close()
            b.close()

        place(admin, customer, sku)
        with psycopg.connect(db.dsn) as holder, db.connect() as waiter:
            in_transaction = poll(holder)  # its hold not committed yet
            assert in_transaction
            waited: list[list[Polled]] = []
            polling = threading.Thread(target=lambda: waited.append(poll(waiter)))
            polling.start()
            wait_until(lambda: scalar(admin, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                      (waiter.info.backend_pid,)), "the second poll to wait for the first")
            holder.commit()
            polling.join(timeout=10)
            assert waited == [[]]
            assert status(admin)["held_by_pid"] == holder.info.backend_pid
            assert poll(holder) == in_transaction
            holder.commit()


def test_a_holder_that_connected_after_the_poller_looked_still_holds(db: Database) -> None:
    """A transaction sees the sessions that ran when it first looked, for the rest of it: a
    consumer that connected since runs all the same and holds what it was handed, also
    when it took them while the other poll waited for the subscription's row; and one
    that ended since holds nothing."""
    with db.connect() as admin, psycopg.connect(db.dsn) as earlier:
        admin.execute("SELECT cqrs.create_subscription('feed')")
        earlier.execute("SELECT count(*) FROM pg_stat_activity")  # its transaction looked
        new_customer(admin)
        later = db.connect()
        handed = poll(later)
        assert len(handed) == 1
        assert poll(earlier) == []
        # and one that ended since, in the same transaction, is gone
        later_pid = later.info.backend_pid
        later.close()
        wait_until(backend_gone(admin, later_pid), "the holder's session to end")
        assert poll(earlier) == handed
        ack(earlier, handed[-1].cursor)
        earlier.commit()

        new_customer(admin)
        with db.connect() as waiter:
            waited: list[list[Polled]] = []
            with admin.transaction():
                admin.execute("SELECT 1 FROM cqrs.subscriptions WHERE name = 'feed' FOR UPDATE")
                polling = threading.Thread(target=lambda: waited.append(poll(waiter)))
                polling.start()
                wait_until(lambda: scalar(admin, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                          (waiter.info.backend_pid,)), "the poll to wait for the row")
                later = db.connect()
                # handed the new event meanwhile, as its poll would have written it
                admin.execute("SELECT pg_stat_clear_snapshot()")
                admin.execute(
                    "UPDATE cqrs.subscriptions SET delivered_position = (SELECT max(position) FROM cqrs.outbox),"
                    " holder_pid = a.pid, holder_started = a.backend_start, held_until = now() + interval '30 s'"
                    " FROM pg_stat_activity a WHERE a.pid = %s AND name = 'feed'", (later.info.backend_pid,))
            polling.join(timeout=10)
            assert waited == [[]]
            assert status(admin)["held_by_pid"] == later.info.backend_pid
            assert len(poll(later)) == 1
            later.close()


def test_a_poll_that_waited_for_the_row_never_moves_the_cursor_back(db: Database) -> None:
    """A poll reads how far it may read before it waits for the subscription's row; an
    event may become final and be handed out and acknowledged meanwhile, past that limit.
    The waiting poll then finds nothing new, and the cursor stays where the acknowledgement
    put it: the next poll hands out nothing again."""
    with db.connect() as admin:
        admin.execute("SELECT cqrs.create_subscription('feed')")
        new_customer(admin)
        first = poll(admin)
        assert len(first) == 1
        ack(admin, first[-1].cursor)
        with psycopg.connect(db.dsn) as writer, psycopg.connect(db.dsn) as holder, db.connect() as waiter:
            # an event written and not final yet: the waiting poll's limit stays below it
            writer.execute("SELECT * FROM shop.register_customer(gen_random_uuid(), %s, 'Late')",
                           (f"{uuid.uuid4().hex[:10]}@example.com",))
            # held without a transaction id of its own, which would keep the late event
            # from being final for its own poll: plain reads pass, the row's lock waits
            holder.execute("LOCK TABLE cqrs.subscriptions IN EXCLUSIVE MODE")
            waited: list[list[Polled]] = []
            polling = threading.Thread(target=lambda: waited.append(poll(waiter)))
            polling.start()
            wait_until(lambda: scalar(admin, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                      (waiter.info.backend_pid,)), "the poll to wait for the row")
            writer.commit()
            late = poll(holder)  # in the transaction that holds the row
            assert len(late) == 1 and late[0].position > first[-1].position
            ack(holder, late[-1].cursor)
            holder.commit()
            polling.join(timeout=10)
            assert waited == [[]]
        assert cursor_of(admin) == late[-1].position
        assert poll(admin) == []


def test_a_running_writer_holds_back_what_committed_after_its_event(db: Database) -> None:
    """B restocks a product and stays open; A took its transaction id before B's and then
    waits for B's row lock; later commands commit meanwhile. No poll hands out anything
    after B's event while B runs; once B and A commit, all of it comes in position order,
    A's later version of the product (with the lower transaction id) after B's."""
    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        conn.execute("SELECT cqrs.create_subscription('feed')")
        start = cursor_of(conn)
        new_customer(conn)
        new_customer(conn)
        before = poll(conn)  # nothing runs: final at once
        assert positions(before) == outbox(conn, start) and len(before) == 2

        a, b = psycopg.connect(db.dsn), psycopg.connect(db.dsn)
        try:
            a_xid = scalar(a, "SELECT pg_current_xact_id()::text::bigint")
            b_version, b_xid = b.execute("SELECT version, token FROM shop.restock(gen_random_uuid(), %s, 5)",
                                         (sku,)).fetchone() or (0, 0)
            b_position = scalar(conn, "SELECT last_value FROM cqrs.outbox_position_seq")
            for _ in range(3):
                new_customer(conn)
            assert outbox(conn, start)[-1] > b_position  # committed, readable, after B's event
            assert poll(conn) == before
            placing = threading.Thread(target=lambda: place(a, customer, sku))
            placing.start()
            wait_until(lambda: scalar(conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid'"
                                            " AND NOT granted AND transactionid::text::bigint = %s", (b_xid,)) == 1,
                       "A to wait for B's row lock")
            b.commit()
            placing.join(timeout=30)
            # A still runs, with the lower id: a poll may hand out more, but only gap-free
            meanwhile = positions(poll(conn, max_events=1000))
            assert meanwhile == outbox(conn, start)[:len(meanwhile)]
            a.commit()
        finally:
            for writer in (a, b):
                writer.rollback()
                writer.close()

        everything = poll(conn, max_events=1000)
        assert positions(everything) == outbox(conn, start) and len(everything) == 2 + 1 + 3 + 5
        assert b_position in positions(everything)
        product = conn.execute(
            "SELECT o.aggregate_version, o.tx_id::text::bigint FROM cqrs.outbox o JOIN shop.products p ON p.id = o.aggregate_id"
            " WHERE p.sku = %s AND o.position > %s ORDER BY o.position", (sku, start)).fetchall()
        assert product == [(b_version, b_xid), (b_version + 1, a_xid)], \
            "the scenario did not give the later version the lower transaction id"


# ------------------------------------------------------------------ filters and the start


def test_a_filter_hands_out_only_its_events_and_the_cursor_passes_the_others(db: Database) -> None:
    with db.connect() as conn, db.connect() as other:
        customer, sku = seed_shop(conn)
        conn.execute("SELECT cqrs.create_subscription('orders', event_types => ARRAY['order.created'])")
        conn.execute("SELECT cqrs.create_subscription('products', aggregate_types => ARRAY['product'])")
        conn.execute("SELECT cqrs.create_subscription('restocks', event_types => ARRAY['product.updated', 'x'],"
                     " aggregate_types => ARRAY['product'])")
        start = cursor_of(conn, "orders")
        for _ in range(2):
            place(conn, customer, sku)
        run(conn, "restock", sku, 5)
        new_customer(conn)

        def matching(where: str) -> list[int]:
            return [r[0] for r in conn.execute(f"SELECT position FROM cqrs.outbox WHERE position > %s AND {where}"
                                               " ORDER BY position", (start,))]

        orders = poll(conn, "orders")
        assert positions(orders) == matching("event_type = 'order.created'") and len(orders) == 2
        assert positions(poll(conn, "products")) == matching("aggregate_type = 'product'")
        restocks = poll(conn, "restocks")
        assert positions(restocks) == matching("event_type = 'product.updated'") and len(restocks) == 5
        # handed out from the first match on: the cursor passed what came before it
        assert cursor_of(conn, "orders") == orders[0].position - 1

        ack(conn, orders[-1].cursor, "orders")
        assert status(conn, "orders")["acked_events"] == 2
        assert status(conn, "orders")["events_behind"] == 0
        for _ in range(3):
            new_customer(conn)
        end = outbox(conn)[-1]
        assert poll(conn, "orders") == []
        # passed over: the cursor is past them, and no one holds anything
        assert (cursor_of(conn, "orders"), status(conn, "orders")["delivered_position"]) == (end, end)
        assert status(conn, "orders")["held_by_pid"] is None
        assert poll(other, "orders") == []
        place(conn, customer, sku)
        assert positions(poll(other, "orders")) == matching("event_type = 'order.created'")[-1:]


def test_a_subscription_starts_after_what_committed_before_it_or_from_the_beginning(db: Database) -> None:
    with db.connect() as conn:
        seed_shop(conn)
        earlier = outbox(conn)
        conn.execute("SELECT cqrs.create_subscription('latest')")
        conn.execute("SELECT cqrs.create_subscription('all', from_beginning => true)")
        with psycopg.connect(db.dsn) as writer:
            # its event has a position already, but commits only after the next one is created
            writer.execute("SELECT shop.restock(gen_random_uuid(), 'SUITE-1', 5)")
            running = scalar(conn, "SELECT last_value FROM cqrs.outbox_position_seq")
            conn.execute("SELECT cqrs.create_subscription('during')")
            new_customer(conn)
            writer.commit()
        after = outbox(conn, earlier[-1])
        assert running in after
        assert positions(poll(conn, "latest")) == after
        assert positions(poll(conn, "all")) == earlier + after
        during = positions(poll(conn, "during"))
        assert running in during and during == outbox(conn)[-len(during):]


# ------------------------------------------------------------------ errors


def test_refusals_name_what_was_wrong_and_change_nothing(db: Database) -> None:
    with db.connect() as conn:
        seed_shop(conn)
        conn.execute("SELECT cqrs.create_subscription('feed', from_beginning => true)")
        conn.execute("SELECT cqrs.create_subscription('gone')")
        conn.execute("SELECT cqrs.drop_subscription('gone')")
        before = conn.execute("SELECT * FROM cqrs.subscriptions ORDER BY name").fetchall()
        create = "SELECT cqrs.create_subscription(%s, %s::text[], %s::text[])"
        for args, says in [
            ((None, None, None), "name must not be null"),
            (("  ", None, None), "name must not be blank"),
            (("x" * 201, None, None), "name must be at most 200 characters"),
            (("new", [], None), "event_types must list at least one type"),
            (("new", None, []), "aggregate_types must list at least one type"),
            (("new", ["order.created", " "], None), "event_types[2] must not be blank"),
            (("new", None, [None]), "aggregate_types[1] must not be null"),
        ]:
            assert says in refused(conn, "CQ001", create, args)
        assert "'feed' already exists" in refused(conn, "CQ003", create, ("feed", ["order.created"], None))

        for query in ("SELECT * FROM cqrs.poll(NULL)", "SELECT cqrs.ack(NULL, '1')"):
            assert "subscription must not be null" in refused(conn, "CQ001", query)
        assert "name must not be null" in refused(conn, "CQ001", "SELECT cqrs.drop_subscription(NULL)")
        for name in ("nosuch", "gone"):
            for query, params in [("SELECT * FROM cqrs.poll(%s)", (name,)),
                                  ("SELECT cqrs.ack(%s, '1')", (name,)),
                                  ("SELECT cqrs.drop_subscription(%s)", (name,))]:
                assert f"subscription '{name}' does not exist" in refused(conn, "CQ002", query, params)
        for max_events in (0, 100_001, None):
            assert "max_events must" in refused(conn, "CQ001", "SELECT * FROM cqrs.poll('feed', %s)", (max_events,))

        handed = poll(conn)
        beyond = str(handed[-1].position + 1)
        for cursor in ("abc", "", "-1", "1.5", None, "9" * 19):
            assert "cursor must be one that cqrs.poll returned" in refused(conn, "CQ001", "SELECT cqrs.ack('feed', %s)", (cursor,))
        assert f"cursor {beyond} is beyond the last event handed out" in refused(
            conn, "CQ001", "SELECT cqrs.ack('feed', %s)", (beyond,))

        handed_back = poll(conn)
        assert handed_back == handed, "a refused ack moved the cursor"
        after = conn.execute("SELECT * FROM cqrs.subscriptions ORDER BY name").fetchall()
        # the polls moved only what polls move: the hold and when it was polled
        assert [r[:4] for r in after] == [r[:4] for r in before]
        assert [r[0] for r in after] == ["feed"]


# ------------------------------------------------------------------ the consumer role


def test_a_consumer_login_uses_subscriptions_and_nothing_else(db: Database, login_as: Callable[[str | None], str]) -> None:
    with db.connect() as admin:
        seed_shop(admin)
        functions = admin.execute(
            """SELECT p.oid::regprocedure::text, n.nspname, p.proname,
                      array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t)
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname IN ('cqrs', 'shop', 'shop_read', 'shop_proj') AND p.prokind = 'f'""").fetchall()
        relations = [r[0] for r in admin.execute(
            """SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname IN ('cqrs', 'shop', 'shop_read', 'shop_proj') AND c.relkind IN ('r', 'p', 'v', 'm', 'S')""")]
    with psycopg.connect(make_conninfo(db.dsn, user=login_as("cqrs_consumer")), autocommit=True) as conn:
        conn.execute("SELECT cqrs.create_subscription('mine', from_beginning => true)")
        handed = poll(conn, "mine")
        assert len(handed) == 3
        ack(conn, handed[-1].cursor, "mine")
        assert poll(conn, "mine") == []
        conn.execute("SELECT cqrs.drop_subscription('mine')")

        for statement in [
            "SELECT * FROM cqrs.outbox LIMIT 1",
            "SELECT * FROM cqrs.subscriptions",
            "UPDATE cqrs.subscriptions SET last_position = 0",
            "SELECT * FROM shop_read.order_summary",
            "SELECT * FROM shop.register_customer(gen_random_uuid(), 'c@example.com', 'C')",
            "SELECT * FROM cqrs.run_projection('order_summary')",
            "SELECT cqrs.caught_up(1)",
            "SELECT * FROM cqrs.subscription_status()",
            "SELECT * FROM cqrs.prune('0 s', dry_run => true)",
            "SELECT * FROM cqrs.batch(0, 10)",
        ]:
            refused(conn, "42501", statement)

        def allowed(signature: str, schema: str, name: str, types: list[str]) -> bool:
            call = sql.SQL("SELECT {}.{}({})").format(
                sql.Identifier(schema), sql.Identifier(name),
                sql.SQL(", ").join(sql.SQL("NULL::{}").format(sql.SQL(t)) for t in types))
            try:
                with conn.transaction():
                    conn.execute(call)
            except psycopg.errors.InsufficientPrivilege:
                return False
            except psycopg.Error:
                return True  # past the privilege check (a NULL argument refused)
            return True

        assert {f[0] for f in functions if allowed(*f)} == {
            "cqrs.create_subscription(text,text[],text[],boolean)",
            "cqrs.poll(text,integer,text)",
            "cqrs.ack(text,text)",
            "cqrs.drop_subscription(text)",
        }

        def readable(relation: str) -> bool:
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("SELECT * FROM {} LIMIT 1").format(sql.SQL(relation)))
            except psycopg.errors.InsufficientPrivilege:
                return False
            return True

        assert [r for r in relations if readable(r)] == []


# ------------------------------------------------------------------ retention and status


def test_prune_keeps_what_a_subscription_has_not_passed(db: Database) -> None:
    """Events in partitions outbox_0, outbox_1000000 and outbox_2000000; every projection
    past them. A subscription behind keeps a partition; a filtered one keeps it until a
    poll moves its cursor past events it does not take; from_beginning afterwards starts
    at the oldest event kept."""

    def prune(dry_run: bool = False) -> list[str]:
        return [r[0] for r in conn.execute("SELECT partition FROM cqrs.prune('0 s', %s)", (dry_run,))]

    with db.connect() as conn:
        customer, sku = seed_shop(conn)
        conn.execute("SELECT cqrs.create_subscription('feed', from_beginning => true)")
        conn.execute("SELECT cqrs.create_subscription('renames', event_types => ARRAY['customer.updated'])")
        for _ in range(2):
            place(conn, customer, sku)
            skip_to_next_partition(conn)
        place(conn, customer, sku)
        db.run_projections()
        assert prune(dry_run=True) == [] and prune() == []

        # feed past the first partition; renames, taking none of it, not yet
        first = [e for e in poll(conn, max_events=1000) if e.position < 1_000_000]
        assert positions(first) == [p for p in outbox(conn) if p < 1_000_000]
        ack(conn, first[-1].cursor)
        # a million positions without an event of its own between: one poll finds the next
        assert positions(poll(conn))[0] > 1_000_000
        assert cursor_of(conn) > 1_000_000 and status(conn)["events_behind"] == 10
        assert prune(dry_run=True) == [] and prune() == []

        # renames passes everything without taking an event
        end = outbox(conn)[-1]
        assert poll(conn, "renames") == []
        assert cursor_of(conn, "renames") == end
        assert prune(dry_run=True) == ["cqrs.outbox_0"]
        assert prune() == ["cqrs.outbox_0"]  # feed keeps the next one

        while handed := poll(conn):
            ack(conn, handed[-1].cursor)
        assert cursor_of(conn) == end
        assert prune() == ["cqrs.outbox_1000000"]  # the newest partition holds the last position
        assert outbox(conn)[0] > 2_000_000

        conn.execute("SELECT cqrs.create_subscription('late', from_beginning => true)")
        assert positions(poll(conn, "late")) == outbox(conn)


def test_status_shows_how_far_behind_a_subscription_is(db: Database) -> None:
    with db.connect() as conn, db.connect() as consumer:
        customer, sku = seed_shop(conn)
        conn.execute("SELECT cqrs.create_subscription('feed')")
        conn.execute("SELECT cqrs.create_subscription('orders', event_types => ARRAY['order.created'])")
        for _ in range(2):
            place(conn, customer, sku)
        time.sleep(0.01)
        lagging = status(conn)
        assert (lagging["events_behind"], lagging["acked_events"], lagging["held_by_pid"]) == (10, 0, None)
        assert lagging["seconds_behind"] > 0
        assert status(conn, "orders")["events_behind"] == 2

        handed = poll(consumer, max_events=4)
        holding = status(conn)
        assert (holding["events_behind"], holding["held_by_pid"]) == (10, consumer.info.backend_pid)
        assert holding["delivered_position"] == handed[-1].position and holding["held_until"] is not None
        ack(consumer, handed[-1].cursor)
        assert status(conn)["events_behind"] == 6
        ack(consumer, poll(consumer)[-1].cursor)
        caught_up = status(conn)
        assert (caught_up["events_behind"], caught_up["seconds_behind"], caught_up["acked_events"]) == (0, 0, 10)
        assert (caught_up["held_by_pid"], caught_up["held_until"]) == (None, None)
        assert status(conn, "orders")["events_behind"] == 2  # another subscription's lag is its own


def test_filters_and_names_are_kept_trimmed(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("SELECT cqrs.create_subscription(' spaced ', ARRAY[' customer.created '], from_beginning => true)")
        seed_shop(conn)
        assert [e.event_type for e in poll(conn, "spaced")] == ["customer.created"]


def test_a_smaller_poll_again_keeps_what_was_handed_out_acknowledgeable(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("SELECT cqrs.create_subscription('feed', from_beginning => true)")
        seed_shop(conn)
        handed = poll(conn, max_events=3)
        assert len(handed) == 3
        assert poll(conn, max_events=1) == handed[:1]
        ack(conn, handed[-1].cursor)  # handed out by the first poll: still acknowledgeable
        assert cursor_of(conn) == handed[-1].position


def test_the_holder_may_fetch_past_what_it_has_not_acknowledged(db: Database) -> None:
    with db.connect() as conn, db.connect() as other:
        conn.execute("SELECT cqrs.create_subscription('feed', from_beginning => true)")
        seed_shop(conn)
        for n in range(3):
            run(conn, "register_customer", f"after{n}@example.com", f"A{n}")
        everything = outbox(conn)
        first = poll(conn, max_events=2)
        second = [Polled(*row) for row in conn.execute(
            "SELECT position, aggregate_id, aggregate_version, event_type, aggregate_type, cursor"
            " FROM cqrs.poll('feed', 2, %s)", (first[-1].cursor,))]
        assert positions(first + second) == everything[:4]
        assert cursor_of(conn) == 0, "fetching ahead acknowledged nothing"
        # only the holder (another session receives nothing), and only from what it was handed
        assert other.execute("SELECT * FROM cqrs.poll('feed', 2, %s)", (first[-1].cursor,)).fetchall() == []
        assert "after must be a cursor this session was handed" in refused(
            conn, "CQ001", "SELECT * FROM cqrs.poll('feed', 2, %s)", (str(everything[-1]),))
        assert poll(other) == []
        ack(conn, second[-1].cursor)
        assert positions(poll(other)) == everything[4:]
