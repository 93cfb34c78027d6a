"""Commands under concurrency, against a real server: 16 clients sending one command_id at
once get one effect; 16 clients placing and cancelling orders on scarce stock never
oversell and never see a deadlock."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from tests.conftest import Database, wait_until
from tests.test_commands import Receipt, call, line, run

CLIENTS = 16


def run_clients(db: Database, work: Callable[[int, psycopg.Connection], Any], app: str) -> list[Any]:
    """work(i, conn) in CLIENTS threads, each on its own connection; their results (or the
    exception each raised), in client order."""
    results: list[Any] = [None] * CLIENTS
    conns = [db.connect(application_name=app) for _ in range(CLIENTS)]
    barrier = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i, conns[i])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a client hung"
    finally:
        for c in conns:
            c.close()
    return results


@contextmanager
def row_locked(db: Database, sku: str) -> Iterator[None]:
    """Holds a lock on a product row, so a command that needs it waits until we let go."""
    with db.connect() as conn:
        with conn.transaction():
            conn.execute("SELECT 1 FROM shop.products WHERE sku = %s FOR UPDATE", (sku,))
            yield


def waiting(db: Database, app: str) -> int:
    with db.connect() as conn:
        return int(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
            (app,),
        ).fetchone()[0])


def table_state(db: Database) -> dict[str, int]:
    with db.connect() as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("shop.orders", "shop.order_lines", "cqrs.outbox", "cqrs.commands")}


# --------------------------------------------------------------------------- idempotency


@pytest.mark.parametrize("command", ["restock", "place_order"])
def test_sixteen_clients_one_command_id_one_effect(db: Database, command: str) -> None:
    """All 16 are in flight together (held behind a row lock until every one waits): the
    first claims the id, the other 15 wait for it, then return its receipt."""
    with db.connect() as conn:
        customer = run(conn, "register_customer", "twin@example.com", "Twin").aggregate_id
        run(conn, "add_product", "TWIN", "Twin", 100, 50)
    args = {"restock": ("TWIN", 7), "place_order": (customer, [line("TWIN", 3)])}[command]
    command_id = uuid.uuid4()
    before = table_state(db)

    app = f"twin-{uuid.uuid4().hex[:8]}"
    with row_locked(db, "TWIN"):
        done: list[Any] = []
        runner = threading.Thread(
            target=lambda: done.append(run_clients(db, lambda i, c: call(c, command, command_id, *args), app)))
        runner.start()
        wait_until(lambda: waiting(db, app) == CLIENTS, f"all {CLIENTS} clients wait", timeout=60)
    runner.join(timeout=300)
    (results,) = done

    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    firsts = [r for r in results if not r.duplicate]
    assert len(firsts) == 1
    first = firsts[0]
    assert first.command_id == command_id
    assert sorted(results, key=lambda r: r.duplicate) == [first] + [first._replace(duplicate=True)] * (CLIENTS - 1)

    with db.connect() as conn:
        stock = conn.execute("SELECT stock FROM shop.products WHERE sku = 'TWIN'").fetchone()[0]
        assert stock == {"restock": 57, "place_order": 47}[command]
        assert conn.execute("SELECT count(*) FROM cqrs.commands WHERE command_id = %s", (command_id,)).fetchone()[0] == 1
        assert conn.execute(
            "SELECT count(DISTINCT tx_id) FROM cqrs.outbox WHERE metadata->>'command_id' = %s", (str(command_id),)
        ).fetchone()[0] == 1
    after = table_state(db)
    assert after["cqrs.commands"] == before["cqrs.commands"] + 1
    assert after["shop.orders"] == before["shop.orders"] + (command == "place_order")


def test_sixteen_clients_one_command_id_different_arguments(db: Database) -> None:
    """Half send quantity 1, half quantity 2, under one command_id: one of them runs; the
    clients with its arguments get its receipt, the others CQ005."""
    with db.connect() as conn:
        run(conn, "add_product", "TWIN2", "Twin", 100, 50)
    command_id = uuid.uuid4()
    app = f"twin2-{uuid.uuid4().hex[:8]}"
    with row_locked(db, "TWIN2"):
        done: list[Any] = []
        runner = threading.Thread(target=lambda: done.append(
            run_clients(db, lambda i, c: call(c, "restock", command_id, "TWIN2", 1 + i % 2), app)))
        runner.start()
        wait_until(lambda: waiting(db, app) == CLIENTS, f"all {CLIENTS} clients wait", timeout=60)
    runner.join(timeout=300)
    (results,) = done

    receipts = {i: r for i, r in enumerate(results) if isinstance(r, Receipt)}
    firsts = [i for i, r in receipts.items() if not r.duplicate]
    assert len(firsts) == 1
    winner = firsts[0]
    for i, r in enumerate(results):
        if i % 2 == winner % 2:
            assert r == receipts[winner]._replace(duplicate=(i != winner))
        else:
            assert isinstance(r, psycopg.Error) and r.sqlstate == "CQ005", r
            assert str(command_id) in (r.diag.message_primary or "")
    with db.connect() as conn:
        assert conn.execute("SELECT stock FROM shop.products WHERE sku = 'TWIN2'").fetchone()[0] == 50 + 1 + winner % 2


# --------------------------------------------------------------------------- stock

SKUS = [f"SCARCE-{i}" for i in range(6)]
STOCK = 6
ROUNDS = 30


def test_no_oversell_no_deadlock(db: Database) -> None:
    """16 clients place orders of 1-4 products, named in random order, on stock that runs
    out all the time; they cancel, ship and restock some. Stock never goes negative,
    units held by orders not cancelled + stock = units ever added, and no client sees any
    error but CQ003 (not enough stock): no deadlock, no check violation."""
    with db.connect() as conn:
        customers = [run(conn, "register_customer", f"scarce{i}@example.com", f"S{i}").aggregate_id
                     for i in range(CLIENTS)]
        for sku in SKUS:
            run(conn, "add_product", sku, sku, 100, STOCK)

    stop = threading.Event()
    lowest: list[int] = []

    def watch() -> None:  # stock, sampled while the clients run
        with db.connect() as conn:
            while not stop.is_set():
                lowest.append(conn.execute("SELECT min(stock) FROM shop.products").fetchone()[0])
                time.sleep(0.005)

    def client(i: int, conn: psycopg.Connection) -> dict[str, Any]:
        rng = random.Random(i)
        mine: list[uuid.UUID] = []
        restocked = dict.fromkeys(SKUS, 0)
        outcomes: dict[str, int] = {}
        errors: list[str] = []
        for _ in range(ROUNDS):
            action = rng.choices(["place", "cancel", "ship", "restock"], [6, 3, 1, 1])[0]
            try:
                if action == "place" or not mine and action in ("cancel", "ship"):
                    action = "place"
                    skus = rng.sample(SKUS, rng.randint(1, 4))  # random order: not id order
                    r = call(conn, "place_order", uuid.uuid4(), customers[i],
                             [line(s, rng.randint(1, 3)) for s in skus])
                    mine.append(r.aggregate_id)
                elif action == "restock":
                    q, sku = rng.randint(1, 3), rng.choice(SKUS)
                    call(conn, "restock", uuid.uuid4(), sku, q)
                    restocked[sku] += q
                else:
                    order_id = mine.pop(rng.randrange(len(mine)))
                    call(conn, f"{action}_order", uuid.uuid4(), order_id, None)
                outcomes[action] = outcomes.get(action, 0) + 1
            except psycopg.Error as exc:
                if exc.sqlstate == "CQ003" and action == "place" and "not enough stock" in str(exc):
                    outcomes["refused"] = outcomes.get("refused", 0) + 1
                else:
                    errors.append(f"{action}: {exc.sqlstate} {exc}")
        return {"restocked": restocked, "outcomes": outcomes, "errors": errors}

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = run_clients(db, client, "scarce")
    finally:
        stop.set()
        watcher.join(timeout=30)

    crashed = [r for r in results if isinstance(r, Exception)]
    assert crashed == []
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], errors[:5]
    outcomes: dict[str, int] = {}
    for r in results:
        for k, v in r["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    # the run did race: orders were refused for stock, and some got through
    assert outcomes.get("refused", 0) > 0 and outcomes.get("place", 0) > 0, outcomes
    assert lowest and min(lowest) >= 0

    added = {sku: STOCK + sum(r["restocked"][sku] for r in results) for sku in SKUS}
    with db.connect() as conn:
        per_product = conn.execute(
            """SELECT p.sku, p.stock, coalesce(sum(l.quantity) FILTER (WHERE o.status <> 'cancelled'), 0)
                 FROM shop.products p
                 LEFT JOIN shop.order_lines l ON l.product_id = p.id
                 LEFT JOIN shop.orders o ON o.id = l.order_id
                GROUP BY p.sku, p.stock"""
        ).fetchall()
    # per product: units in orders not cancelled (sold) + stock left = units ever added
    assert {sku: stock + sold for sku, stock, sold in per_product} == added
    assert all(stock >= 0 for _, stock, _ in per_product)


def test_under_repeatable_read_a_twin_gets_a_serialization_failure(db: Database) -> None:
    """As the README says: a twin whose snapshot predates the first's commit cannot see
    its receipt, so it is rolled back with 40001 (safe to retry), never applied twice."""
    with db.connect() as conn:
        run(conn, "add_product", "RR-1", "rr", 1, 0)
    command_id = uuid.uuid4()
    with db.connect() as twin, db.connect() as first:
        twin.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        twin.execute("SELECT 1")  # its snapshot
        call(first, "restock", command_id, "RR-1", 3)
        with pytest.raises(psycopg.errors.SerializationFailure):
            call(twin, "restock", command_id, "RR-1", 3)
        twin.execute("ROLLBACK")
        assert call(twin, "restock", command_id, "RR-1", 3).duplicate  # the retry
        assert first.execute("SELECT stock FROM shop.products WHERE sku = 'RR-1'").fetchone() == (3,)
