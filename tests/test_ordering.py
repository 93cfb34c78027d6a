"""Each aggregate's events reach every reader in version order, once each, gap-free.

Two transactions that write one aggregate are serialized by its row lock, but a
transaction takes its id at its first write, not at commit: `place_order` locks its first
product (taking an id), waits for another transaction's lock on the next one, and then
writes the later version of that product with the lower transaction id. The tests below
make that happen deterministically with held locks, and then at random under a
concurrent workload on hot products, and record what each kind of reader is handed: a
python projection, a sql projection (its apply function reads cqrs.batch), a rebuild of
each, and a subscription's consumer (cqrs.poll, cqrs.ack).
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cqrs_pg.projections import Event, register, run_batch, unregister
from cqrs_pg.rebuild import rebuild
from cqrs_pg_tools.testing import Database, running_daemon, wait_until
from cqrs_pg_tools.workload import ShopWorkload

# Two recorders: a table each, a row per event handed over, in the order handed over.
SETUP = """
CREATE SCHEMA ordering;
CREATE TABLE ordering.python_seen (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, position bigint NOT NULL, aggregate_id uuid NOT NULL, version integer NOT NULL);
CREATE TABLE ordering.sql_seen (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, position bigint NOT NULL, aggregate_id uuid NOT NULL, version integer NOT NULL);
CREATE TABLE ordering.sub_seen (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, position bigint NOT NULL, aggregate_id uuid NOT NULL, version integer NOT NULL);
SELECT cqrs.create_subscription('sub_seen', from_beginning => true);
CREATE FUNCTION ordering.record(from_position bigint, to_position bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sql_seen (position, aggregate_id, version)
    SELECT b.position, b.aggregate_id, b.aggregate_version FROM cqrs.batch(from_position, to_position) b;
END
$$;
SELECT cqrs.register_projection('python_seen', 'python', search_path => 'ordering',
                                tables => ARRAY['ordering.python_seen']::regclass[]);
SELECT cqrs.register_projection('sql_seen', 'sql', 'ordering.record', search_path => 'ordering',
                                tables => ARRAY['ordering.sql_seen']::regclass[]);
"""
PROJECTIONS = ("python_seen", "sql_seen")
RECORDERS = (*PROJECTIONS, "sub_seen")


def record(conn: psycopg.Connection, events: list[Event]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO python_seen (position, aggregate_id, version) VALUES (%s, %s, %s)",
            [(e.position, e.aggregate_id, e.aggregate_version) for e in events],
        )


@pytest.fixture
def recorders(db: Database) -> Iterator[Database]:
    register("python_seen")(record)
    with db.connect() as conn:
        conn.execute(SETUP)
    yield db
    unregister("python_seen")


def run_recorders(db: Database, seed: int, sizes: tuple[int, int] = (1, 3)) -> int:
    """Batches of random sizes for both recorders, as the daemon runs them, until neither
    applies anything more; the events applied."""
    rng = random.Random(seed)
    total = 0
    with db.connect() as conn:
        while True:
            applied = run_batch(conn, "python_seen", record, rng.randint(*sizes)).applied
            applied += conn.execute(
                "SELECT applied FROM cqrs.run_projection('sql_seen', %s)", (rng.randint(*sizes),)
            ).fetchone()[0]
            applied += consume(conn, rng, sizes)
            if not applied:
                return total
            total += applied


def consume(conn: psycopg.Connection, rng: random.Random, sizes: tuple[int, int]) -> int:
    """One poll of the subscription, its events recorded and acknowledged up to a random
    point of it (the rest comes again); the events recorded."""
    polled = conn.execute("SELECT position, aggregate_id, aggregate_version, cursor FROM cqrs.poll('sub_seen', %s)",
                          (rng.randint(*sizes),)).fetchall()
    if not polled:
        return 0
    handled = polled[: rng.randint(1, len(polled))]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany("INSERT INTO ordering.sub_seen (position, aggregate_id, version) VALUES (%s, %s, %s)",
                        [row[:3] for row in handled])
        cur.execute("SELECT cqrs.ack('sub_seen', %s)", (handled[-1][3],))
    return len(handled)


def disorder(conn: psycopg.Connection, table: str) -> list[str]:
    """What is wrong with what a recorder was handed: an event of the outbox missing or
    handed over twice, or an aggregate's event after a later one of its own (a lower
    version, or a later position: versions of one aggregate may repeat, as an order's
    lines share its version)."""
    seen = conn.execute(f"SELECT position, aggregate_id, version FROM ordering.{table} ORDER BY seq").fetchall()
    outbox = [r[0] for r in conn.execute("SELECT position FROM cqrs.outbox ORDER BY position")]
    problems = []
    if sorted(p for p, _, _ in seen) != outbox:
        problems.append(f"handed {len(seen)} events ({len({p for p, _, _ in seen})} distinct), not the outbox's {len(outbox)}")
    last: dict[uuid.UUID, tuple[int, int]] = {}
    for position, aggregate, version in seen:
        if aggregate in last and (version, position) < last[aggregate]:
            problems.append(f"aggregate {aggregate}: position {position} version {version} after {last[aggregate]}")
        last[aggregate] = (version, position)
    return problems


def add_products(conn: psycopg.Connection, count: int) -> list[tuple[uuid.UUID, str]]:
    """New products, as (id, sku) in the order every command locks them: by id."""
    skus = [f"ORD-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    ids = [conn.execute("SELECT aggregate_id FROM shop.add_product(gen_random_uuid(), %s, 'o', 100, 1000)",
                        (sku,)).fetchone()[0] for sku in skus]
    return sorted(zip(ids, skus, strict=True))


def test_later_version_with_the_lower_transaction_id(recorders: Database) -> None:
    """`place_order` A takes its transaction id first, then waits for B's lock on the
    second product it locks; B, with the higher id, writes that product's earlier
    version and commits; A writes the later one. A third transaction X, whose id lies
    between theirs, stays open meanwhile: ordered by transaction id, and below the
    fence that X holds, A's later version would be handed over before B's earlier one."""
    db = recorders
    with db.connect() as admin:
        customer = admin.execute(
            "SELECT aggregate_id FROM shop.register_customer(gen_random_uuid(), 'order@example.com', 'O')"
        ).fetchone()[0]
        (_, first_sku), (second, second_sku) = add_products(admin, 2)
    assert run_recorders(db, seed=1) > 0

    a, x, b = (psycopg.connect(db.dsn) for _ in range(3))
    try:
        a_xid = a.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
        x_xid = x.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
        b_receipt = b.execute("SELECT version, token FROM shop.restock(gen_random_uuid(), %s, 5)",
                              (second_sku,)).fetchone()
        assert a_xid < x_xid < b_receipt[1]
        lines = Jsonb([{"sku": first_sku, "quantity": 1}, {"sku": second_sku, "quantity": 1}])
        placed = threading.Thread(
            target=lambda: a.execute("SELECT shop.place_order(gen_random_uuid(), %s, %s)", (customer, lines)))
        placed.start()
        with db.connect() as admin:  # A holds the first product and waits for B's lock on the second
            wait_until(lambda: admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
                " AND transactionid::text::bigint = %s", (b_receipt[1],)).fetchone()[0] == 1, "A waits for B")
        b.commit()
        placed.join(timeout=30)
        a.commit()
        with db.connect() as admin:
            second_events = admin.execute(
                "SELECT tx_id::text::bigint, aggregate_version FROM cqrs.outbox WHERE aggregate_id = %s"
                " ORDER BY position", (second,)).fetchall()
        assert second_events[-2:] == [(b_receipt[1], b_receipt[0]), (a_xid, b_receipt[0] + 1)], \
            "the scenario did not give the later version the lower transaction id"
        run_recorders(db, seed=2)  # while X is still open
    finally:
        for conn in (a, x, b):
            conn.rollback()
            conn.close()
    run_recorders(db, seed=3)
    with db.connect() as conn:
        for table in RECORDERS:
            assert disorder(conn, table) == []

    # a rebuild hands each recorder the whole log again, in the same order
    for table in PROJECTIONS:
        rebuild(db.dsn, table, 2, lambda _: None)
    with db.connect() as conn:
        for table in RECORDERS:
            assert disorder(conn, table) == []


def test_hot_aggregates_under_concurrent_writers(recorders: Database) -> None:
    """8 writers on 6 hot products and 20 customers, each transaction held open a random
    while, with the daemon running both recorders: each hands over every event once, each
    aggregate's in the order written; so does a rebuild of each under the same load."""
    db = recorders
    workload = ShopWorkload(db.dsn, seed=12, hold_max=0.005)
    workload.setup(customers=20, products=6, stock=100_000)
    stop = threading.Event()

    def consumer() -> None:  # polling while the writers commit out of order
        rng = random.Random(13)
        with db.connect() as conn:
            while not stop.is_set() or consume(conn, rng, (1, 50)):
                consume(conn, rng, (1, 50))

    polling = threading.Thread(target=consumer)
    polling.start()
    with running_daemon(db.dsn, batch_size=20, linger=0.05):
        result = workload.run(8, commands_per_client=60)
        assert not result.errors, result.errors[:3]
        db.wait_caught_up(result.max_token, replica=False)
        writers = threading.Thread(target=lambda: workload.run(4, commands_per_client=30))
        writers.start()
        for table in PROJECTIONS:
            rebuild(db.dsn, table, 50, lambda _: None)
        writers.join()
        with db.connect() as conn:
            last = conn.execute("SELECT max(tx_id)::text::bigint FROM cqrs.outbox").fetchone()[0]
        db.wait_caught_up(last, replica=False)
    stop.set()
    polling.join(timeout=60)
    with db.connect() as conn:
        for table in RECORDERS:
            assert disorder(conn, table) == []


def test_a_running_transaction_above_the_snapshots_xmax_holds_reading_back(recorders: Database) -> None:
    """A snapshot's xmax is one more than the latest completed transaction id, not the
    next one to be handed out: T, running with a position, may not appear in its list at
    all. U takes its id before T, T takes a position, U appends one after it and commits
    (the latest to complete). Reading may not go past T's position until T ends; then T's
    event comes first, as its position says."""
    db = recorders
    run_recorders(db, seed=4)
    u, t = psycopg.connect(db.dsn), psycopg.connect(db.dsn)
    try:
        u.execute("SELECT pg_current_xact_id()")
        t_position = t.execute("SELECT token FROM shop.add_product(gen_random_uuid(), %s, 't', 1, 1)",
                               (f"T-{uuid.uuid4().hex[:6]}",)).fetchone()
        u.execute("SELECT shop.add_product(gen_random_uuid(), %s, 'u', 1, 1)", (f"U-{uuid.uuid4().hex[:6]}",))
        u.commit()
        assert t_position is not None
        assert run_recorders(db, seed=5) == 0, "read past a running transaction's position"
    finally:
        t.commit()
        for conn in (u, t):
            conn.close()
    assert run_recorders(db, seed=6) == 2 * len(RECORDERS)
    with db.connect() as conn:
        for table in RECORDERS:
            assert disorder(conn, table) == []


def test_a_cached_outbox_sequence_is_refused(db: Database) -> None:
    """Sessions that cache positions take them out of order; readers refuse to read."""
    with db.connect() as conn:
        conn.execute("ALTER SEQUENCE cqrs.outbox_position_seq CACHE 10")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT * FROM cqrs.run_projection('order_summary')")
        assert err.value.sqlstate == "CQ003"
        assert "CACHE 1" in str(err.value)


def test_an_apply_function_of_another_shape_is_refused(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("CREATE FUNCTION public.wrong(n integer) RETURNS void LANGUAGE sql AS 'SELECT'")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT cqrs.register_projection('wrong', 'sql', 'public.wrong', search_path => 'public',"
                         " tables => '{}')")
        assert err.value.sqlstate == "CQ001"
        assert "public.wrong" in str(err.value)


def test_a_daemons_mark_lets_its_round_read_what_committed_before_it(db: Database) -> None:
    """cqrs.take_mark stores a mark only when one is needed; once the transactions that
    ran when it was taken have ended, everything committed before it may be read, even
    while a transaction that began after it still runs."""
    take, usable = "SELECT cqrs.take_mark('marker')", "SELECT cqrs.mark_usable('marker')"
    final = "SELECT final_position FROM cqrs._read_limit()"
    with db.connect() as conn:
        conn.execute("SELECT cqrs.listener_heartbeat('marker', false, '1 minute')")
        assert conn.execute(take).fetchone()[0] is False  # nothing runs: nothing to wait for
        with psycopg.connect(db.dsn) as running, psycopg.connect(db.dsn) as later:
            running.execute("SELECT pg_current_xact_id()")
            conn.execute("SELECT shop.add_product(gen_random_uuid(), 'MARK-1', 'm', 1, 1)")
            position = conn.execute("SELECT max(position) FROM cqrs.outbox").fetchone()[0]
            assert conn.execute(final).fetchone()[0] < position
            assert conn.execute(take).fetchone()[0] is True
            assert conn.execute(usable).fetchone()[0] is False  # `running` began before it
            assert conn.execute(take).fetchone()[0] is False  # that one still waits
            later.execute("SELECT pg_current_xact_id()")
            assert conn.execute("SELECT cqrs.mark_usable('marker', '0.05 s')").fetchone()[0] is False
            ends = threading.Timer(0.2, running.commit)
            ends.start()
            # waits on the server until `running` ends
            assert conn.execute("SELECT cqrs.mark_usable('marker', '30 s')").fetchone()[0] is True
            ends.join()
            assert conn.execute(final).fetchone()[0] >= position  # `later` still runs
            later.rollback()
