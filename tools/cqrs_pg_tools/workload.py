"""A mixed shop workload from concurrent clients, for the demo, the tests and benchmarks."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb

from cqrs_pg.db import connect
from cqrs_pg.errors import DatabaseUnavailable

# command -> relative weight
MIX = {
    "place_order": 50,
    "cancel_order": 10,
    "ship_order": 10,
    "restock": 10,
    "change_price": 5,
    "rename_customer": 8,
    "register_customer": 7,
}
# Refusals a well-behaved client still meets in this mix: stock runs out, an order was
# already cancelled or shipped by another client.
EXPECTED_REFUSALS = {"CQ003"}


@dataclass
class WorkloadResult:
    commands: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    # commands sent again, with the same command_id, after a lost connection or a
    # transaction the server rolled back (deadlock, serialization), by reason
    retried: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    max_token: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.commands.values())


class ShopWorkload:
    def __init__(
        self, dsn: str, *, seed: int | None = None, hold_max: float = 0.0, retry_for: float = 0.0
    ) -> None:
        """hold_max > 0 keeps each command's transaction open a random time up to that many
        seconds after the command ran, so commits finish out of xid order.

        retry_for > 0 makes a client that loses its connection reconnect and send the same
        command again, with the same command_id, for up to that many seconds: idempotency
        makes the retry safe even when the first attempt did commit."""
        self.dsn = dsn
        self.seed = seed
        self.hold_max = hold_max
        self.retry_for = retry_for
        self.customers: list[uuid.UUID] = []
        self.skus: list[str] = []
        self._orders: list[uuid.UUID] = []
        self._lock = threading.Lock()
        self._result = WorkloadResult()

    def setup(self, customers: int = 50, products: int = 20, stock: int = 100_000) -> None:
        with connect(self.dsn, application_name="cqrs-pg workload") as conn:
            for i in range(customers):
                row = conn.execute(
                    "SELECT aggregate_id FROM shop.register_customer(%s, %s, %s)",
                    (uuid.uuid4(), f"customer{i}.{uuid.uuid4().hex[:6]}@example.com", f"Customer {i}"),
                ).fetchone()
                assert row is not None
                self.customers.append(row[0])
            for i in range(products):
                sku = f"SKU-{i:03d}-{uuid.uuid4().hex[:4]}"
                conn.execute(
                    "SELECT * FROM shop.add_product(%s, %s, %s, %s, %s)",
                    (uuid.uuid4(), sku, f"Product {i}", 100 + 50 * i, stock),
                )
                self.skus.append(sku)

    def run(
        self,
        clients: int,
        *,
        seconds: float | None = None,
        commands_per_client: int | None = None,
        on_progress: Callable[[WorkloadResult], None] | None = None,
    ) -> WorkloadResult:
        """Run until `seconds` elapse or each client has issued `commands_per_client`."""
        if not self.customers or not self.skus:
            raise RuntimeError("call setup() first")
        stop = threading.Event()
        started = time.monotonic()
        threads = [
            threading.Thread(target=self._client, args=(n, stop, commands_per_client), daemon=True)
            for n in range(clients)
        ]
        for t in threads:
            t.start()
        deadline = started + seconds if seconds is not None else None
        while any(t.is_alive() for t in threads):
            if deadline is not None and time.monotonic() >= deadline:
                stop.set()
            if on_progress:
                on_progress(self._result)
            time.sleep(0.05)
        for t in threads:
            t.join()
        self._result.seconds = time.monotonic() - started
        if on_progress:
            on_progress(self._result)
        return self._result

    def _client(self, n: int, stop: threading.Event, limit: int | None) -> None:
        rng = random.Random(None if self.seed is None else self.seed * 1000 + n)
        names, weights = zip(*MIX.items(), strict=True)
        done = 0
        conn: psycopg.Connection | None = None
        try:
            while not stop.is_set() and (limit is None or done < limit):
                command, query, args = self._arguments(rng, rng.choices(names, weights)[0])
                giving_up = time.monotonic() + self.retry_for
                while True:
                    try:
                        if conn is None or conn.closed:
                            conn = connect(self.dsn, autocommit=self.hold_max <= 0, application_name=f"cqrs-pg workload {n}")
                        self._issue(conn, rng, command, query, args)
                        break
                    except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                        if time.monotonic() > giving_up:
                            raise
                        reason = getattr(exc, "sqlstate", None) or "connection"
                        with self._lock:
                            self._result.retried[reason] += 1
                        if conn is not None and not conn.closed and not conn.broken:
                            conn.rollback()  # the server rolled the transaction back: send it again
                        else:
                            conn = None
                            time.sleep(0.1)
                done += 1
        except Exception as exc:  # noqa: BLE001 - reported in the result: a dying client must not pass silently
            with self._lock:
                self._result.errors.append(f"client {n}: {type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()

    def _issue(self, conn: psycopg.Connection, rng: random.Random, command: str, query: str, args: tuple[object, ...]) -> None:
        try:
            row = conn.execute(query, args).fetchone()
            if self.hold_max > 0:
                conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0, self.hold_max),))
                conn.commit()
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            if not conn.autocommit:
                conn.rollback()
            with self._lock:
                if exc.sqlstate in EXPECTED_REFUSALS:
                    self._result.refused[command] += 1
                else:
                    self._result.errors.append(f"{command}: {exc.sqlstate}: {exc}")
            return
        assert row is not None
        aggregate_id, token, duplicate = row
        with self._lock:
            self._result.commands[command] += 1
            self._result.duplicates += duplicate
            self._result.max_token = max(self._result.max_token, token)
            if command == "place_order":
                self._orders.append(aggregate_id)
            elif command == "register_customer":
                self.customers.append(aggregate_id)

    def _arguments(self, rng: random.Random, command: str) -> tuple[str, str, tuple[object, ...]]:
        cid = uuid.uuid4()
        with self._lock:
            customer = rng.choice(self.customers)
            order = rng.choice(self._orders) if self._orders else None
        if command in ("cancel_order", "ship_order") and order is None:
            command = "place_order"
        args: tuple[object, ...]
        if command == "place_order":
            lines = [{"sku": sku, "quantity": rng.randint(1, 5)} for sku in rng.sample(self.skus, rng.randint(1, 3))]
            args = (cid, customer, Jsonb(lines))
        elif command in ("cancel_order", "ship_order"):
            args = (cid, order)
        elif command == "restock":
            args = (cid, rng.choice(self.skus), rng.randint(1, 50))
        elif command == "change_price":
            args = (cid, rng.choice(self.skus), rng.randint(50, 5000))
        elif command == "rename_customer":
            args = (cid, customer, f"Renamed {uuid.uuid4().hex[:8]}")
        else:
            args = (cid, f"new.{uuid.uuid4().hex[:10]}@example.com", "New customer")
        placeholders = ", ".join(["%s"] * len(args))
        return command, f"SELECT aggregate_id, token, duplicate FROM shop.{command}({placeholders})", args
