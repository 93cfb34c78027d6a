"""Commands under concurrency, against a real server: 16 clients sending one command_id at
once get one effect; 16 clients placing and cancelling orders on scarce stock never
oversell and never see a deadlock."""

from __future__ import annotations

import random
import re
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from cqrs_pg_tools.testing import (
    Database,
    Receipt,
    call,
    line,
    row_locked,
    run,
    wait_until,
)

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
REFUSAL = re.compile(r"not enough stock of sku '([^']+)': (\d+) ordered, (\d+) in stock")

# Each change of a product's stock, in the product's version order, with the change that
# the command making it explains: units its order took, units its cancelled order gave
# back, or units restocked. The stock itself is read only to compare with.
STOCK_HISTORY = """
SELECT p.sku, e.aggregate_version, (e.payload->>'stock')::integer,
       CASE c.command WHEN 'place_order' THEN -l.quantity
                      WHEN 'cancel_order' THEN l.quantity
                      WHEN 'restock' THEN (c.arguments->>'quantity')::integer END
  FROM cqrs.outbox e
  JOIN shop.products p ON p.id = e.aggregate_id
  JOIN cqrs.commands c ON c.command_id = (e.metadata->>'command_id')::uuid
  LEFT JOIN shop.order_lines l ON l.order_id = c.aggregate_id AND l.product_id = p.id
 WHERE e.event_type = 'product.updated'
 ORDER BY p.sku, e.aggregate_version
"""


def test_no_oversell_no_deadlock(db: Database) -> None:
    """16 clients place orders of 1-4 products, named in random order, on stock that runs
    out all the time; they cancel, ship and restock some. No order is placed for stock that
    is not there: replayed change by change from the orders and restocks alone, no
    product's stock ever goes below zero, and it equals the stock recorded at each change.
    Every refusal is CQ003 naming a sku of the order with fewer units in stock than
    ordered; no client sees any other error (no deadlock, no check violation)."""
    with db.connect() as conn:
        customers = [run(conn, "register_customer", f"scarce{i}@example.com", f"S{i}").aggregate_id
                     for i in range(CLIENTS)]
        for sku in SKUS:
            run(conn, "add_product", sku, sku, 100, STOCK)

    def client(i: int, conn: psycopg.Connection) -> dict[str, Any]:
        rng = random.Random(i)
        mine: list[uuid.UUID] = []
        restocked = dict.fromkeys(SKUS, 0)
        outcomes: dict[str, int] = {}
        errors: list[str] = []
        for _ in range(ROUNDS):
            action = rng.choices(["place", "cancel", "ship", "restock"], [6, 3, 1, 1])[0]
            wanted: dict[str, int] = {}
            try:
                if action == "place" or (not mine and action in ("cancel", "ship")):
                    action = "place"
                    skus = rng.sample(SKUS, rng.randint(1, 4))  # random order: not id order
                    wanted = {s: rng.randint(1, 3) for s in skus}
                    r = call(conn, "place_order", uuid.uuid4(), customers[i], [line(s, q) for s, q in wanted.items()])
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
                short = REFUSAL.fullmatch(exc.diag.message_primary or "")
                # a refusal names a sku of this order, as ordered, with less in stock
                if exc.sqlstate == "CQ003" and short and wanted.get(short[1]) == int(short[2]) > int(short[3]):
                    outcomes["refused"] = outcomes.get("refused", 0) + 1
                else:
                    errors.append(f"{action} {wanted}: {exc.sqlstate} {exc}")
        return {"restocked": restocked, "outcomes": outcomes, "errors": errors}

    results = run_clients(db, client, "scarce")

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

    with db.connect() as conn:
        history = conn.execute(STOCK_HISTORY).fetchall()
    replayed = dict.fromkeys(SKUS, STOCK)
    versions: dict[str, list[int]] = {sku: [] for sku in SKUS}
    oversold, disagree = [], []
    for sku, version, recorded, change in history:
        assert change is not None, f"{sku} version {version}: a stock change no command explains"
        replayed[sku] += change
        versions[sku].append(version)
        if replayed[sku] < 0:
            oversold.append((sku, version, replayed[sku]))
        if recorded != replayed[sku]:
            disagree.append((sku, version, recorded, replayed[sku]))
    assert oversold == [], f"orders placed for stock that was not there (sku, version, stock): {oversold[:5]}"
    assert disagree == [], f"stock recorded unlike the orders and restocks (sku, version, recorded, replayed): {disagree[:5]}"
    assert all(v == list(range(2, len(v) + 2)) for v in versions.values()), "a stock change without its event"

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
    assert {sku: stock for sku, stock, _ in per_product} == replayed


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
