"""cqrs-pg rebuild: a read model built anew from the log and swapped in while writers
write, the daemon runs, and readers on the primary and the replica keep reading."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
from click.testing import CliRunner

from cqrs_pg.cli import main
from cqrs_pg.rebuild import rebuild
from cqrs_pg.verify import all_mismatches
from cqrs_pg.workload import ShopWorkload, WorkloadResult
from tests.conftest import Database, outbox_count
from tests.test_projection import NO_MISMATCH, applied_counts, running_daemon


class Reader(threading.Thread):
    """Counts a read table's rows in a loop; rows only ever grow there."""

    def __init__(self, connect: Callable[[], psycopg.Connection], table: str) -> None:
        super().__init__(daemon=True)
        self.connect, self.table = connect, table
        self.stop = threading.Event()
        self.counts: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with self.connect() as conn:
            while not self.stop.is_set():
                try:
                    self.counts.append(conn.execute(f"SELECT count(*) FROM shop_read.{self.table}").fetchone()[0])
                except psycopg.Error as exc:
                    self.errors.append(f"{exc.sqlstate}: {exc}")

    def never_shrank(self) -> bool:
        return all(b >= a for a, b in zip(self.counts, self.counts[1:]))


def test_rebuild_under_load_is_invisible_to_readers(db: Database) -> None:
    workload = ShopWorkload(db.dsn, seed=3, hold_max=0.005)
    workload.setup(customers=20, products=8, stock=10_000)
    with running_daemon(db, batch_size=100):
        first = workload.run(4, commands_per_client=40)
        db.wait_caught_up(first.max_token)
        with db.connect() as conn:
            # Damage the read models: a rebuild recomputes them from the log.
            conn.execute("UPDATE shop_read.order_summary SET total_cents = -1")
            conn.execute("UPDATE shop_read.customer_stats SET orders_placed = 0")
        readers = [
            Reader(db.connect, "order_summary"),
            Reader(db.connect_replica, "order_summary"),
            Reader(db.connect, "customer_stats"),
            Reader(db.connect_replica, "customer_stats"),
        ]
        for r in readers:
            r.start()
        box: list[WorkloadResult] = []
        writers = threading.Thread(target=lambda: box.append(workload.run(4, commands_per_client=60)))
        writers.start()
        lines: list[str] = []
        for projection in ("order_summary", "customer_stats"):
            built = rebuild(db.dsn, projection, 50, lines.append)
            assert built > 0
        writers.join()
        assert not box[0].errors
        db.wait_caught_up(box[0].max_token)
        for r in readers:
            r.stop.set()
            r.join()
    for r in readers:
        assert not r.errors, r.errors[:3]
        assert r.counts and min(r.counts) > 0, "a reader saw an empty read model"
        assert r.never_shrank(), f"a reader of {r.table} saw rows disappear"
    with db.connect() as primary, db.connect_replica() as replica:
        assert all_mismatches(primary) == NO_MISMATCH
        assert all_mismatches(replica) == NO_MISMATCH
        assert applied_counts(primary) == dict.fromkeys(NO_MISMATCH, outbox_count(primary))
        assert primary.execute(
            "SELECT has_table_privilege('cqrs_reader', 'shop_read.order_summary', 'SELECT'),"
            " has_table_privilege('cqrs_reader', 'shop_proj.order_summary_customers', 'SELECT'),"
            " has_table_privilege('cqrs_reader', 'shop_read.customer_stats', 'SELECT')"
        ).fetchone() == (True, False, True)
        assert primary.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'cqrs_rebuild_%'").fetchone()[0] == 0


def test_rebuild_command_line(db: Database) -> None:
    runner = CliRunner()
    with db.connect() as conn:
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'RB-1', 'r', 10, 5)")
    result = runner.invoke(main, ["rebuild", "--dsn", db.dsn, "customer_stats"])
    assert result.exit_code == 0, result.output
    assert "swapped it in" in result.output
    result = runner.invoke(main, ["rebuild", "--dsn", db.dsn, "product_sales"])
    assert result.exit_code == 0, result.output
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM shop_read.product_sales").fetchone()[0] == 1
    result = runner.invoke(main, ["rebuild", "--dsn", db.dsn, "nope"])
    assert result.exit_code == 1
    assert "no projection named 'nope'" in result.output and "order_summary" in result.output
