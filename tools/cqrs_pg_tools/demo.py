"""`cqrs-pg demo`: the whole loop on a throwaway primary + replica, in one command."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import psycopg

from cqrs_pg.db import connect
from cqrs_pg_tools.testing import (
    Database,
    create_template,
    running_daemon,
    throwaway_cluster,
)
from cqrs_pg_tools.verify import all_mismatches
from cqrs_pg_tools.workload import ShopWorkload, WorkloadResult

DBNAME = "cqrs_demo"


def run_demo(*, clients: int, seconds: float, root: Path | None, keep: bool, echo: Callable[[str], None]) -> None:
    with throwaway_cluster(
        "cqrs-pg-demo-", root, keep_running=keep,
        announce=lambda where: echo(f"1. starting a primary and a streaming replica under {where} ..."),
    ) as throwaway:
        cluster = throwaway.cluster
        echo("2. installing the schema (alembic upgrade head) ...")
        create_template(cluster.primary_dsn(), cluster.primary_dsn, DBNAME)
        db = Database(DBNAME, cluster.primary_dsn(DBNAME), cluster.replica_dsn(DBNAME))

        echo("3. starting the daemon (cqrs-pg listen) ...")
        with running_daemon(db.dsn, refresh_interval=0.5):
            workload = ShopWorkload(db.dsn)
            workload.setup(customers=40, products=12, stock=5_000)
            echo(f"4. {clients} clients issue shop commands for {seconds:g}s:")
            result = _run_with_progress(workload, clients, seconds)
            echo(
                f"   {result.total} commands in {result.seconds:.1f}s ({result.total / result.seconds:,.0f}/s), "
                f"{sum(result.refused.values())} refused by business rules (out of stock, already shipped)"
            )
            if result.errors:
                echo(f"   {len(result.errors)} unexpected errors, first: {result.errors[0]}")

            echo("5. waiting on the replica for cqrs.caught_up(<last token>) ...")
            started = time.monotonic()
            db.wait_caught_up(result.max_token, timeout=60, interval=0.005, raises=click.ClickException)
            echo(f"   caught up {(time.monotonic() - started) * 1000:.0f} ms after the workload stopped")
            _report(echo, db.dsn, db.replica_dsn)
            if keep:
                echo("\nThe cluster keeps running (--keep). To use it:")
                echo(cluster.export_lines(DBNAME))
                echo(f"Stop it with: cqrs-pg dev down --root {throwaway.root / 'cluster'}")


def _run_with_progress(workload: ShopWorkload, clients: int, seconds: float) -> WorkloadResult:
    started = time.monotonic()
    if not sys.stdout.isatty():
        # No bar on a pipe or a log: a line a second.
        next_line = 1.0

        def report(result: WorkloadResult) -> None:
            nonlocal next_line
            elapsed = time.monotonic() - started
            if elapsed >= next_line:
                click.echo(f"   {elapsed:4.0f}s {result.total:>8} commands")
                next_line += 1.0

        return workload.run(clients, seconds=seconds, on_progress=report)

    steps = max(1, int(seconds * 10))
    with click.progressbar(length=steps, label="   workload", show_pos=False, width=30) as bar:
        shown = 0

        def progress(result: WorkloadResult) -> None:
            nonlocal shown
            target = min(steps, int((time.monotonic() - started) * 10))
            bar.label = f"   {result.total:>7} commands"
            if target > shown:
                bar.update(target - shown)
                shown = target

        result = workload.run(clients, seconds=seconds, on_progress=progress)
        bar.update(steps - shown)
    return result


def _table(echo: Callable[[str], None], conn: psycopg.Connection, title: str, query: str) -> None:
    cur = conn.execute(query)
    assert cur.description is not None
    headers = [c.name for c in cur.description]
    rows = [[("" if v is None else str(v)) for v in row] for row in cur.fetchall()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    echo(f"\n{title}")
    echo("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for r in rows:
        echo("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _report(echo: Callable[[str], None], dsn: str, replica_dsn: str) -> None:
    with connect(replica_dsn, application_name="cqrs-pg demo") as conn:
        row = conn.execute("SELECT pg_is_in_recovery(), current_setting('port')").fetchone()
        assert row is not None
        echo(f"\n6. read models, read from the replica (port {row[1]}, in recovery: {row[0]}):")
        _table(
            echo, conn, "shop_read.customer_stats — top 5 by lifetime value",
            "SELECT name, email, orders_placed, orders_cancelled, orders_shipped, lifetime_value_cents"
            " FROM shop_read.customer_stats ORDER BY lifetime_value_cents DESC, name LIMIT 5",
        )
        _table(
            echo, conn, "shop_read.order_summary — 5 latest orders",
            "SELECT order_id, customer_name, status, line_count, item_count, total_cents, version"
            " FROM shop_read.order_summary ORDER BY placed_at DESC LIMIT 5",
        )
        _table(
            echo, conn, "shop_read.product_sales (materialized view) — top 5 by revenue",
            "SELECT sku, name, price_cents, stock, units_sold, revenue_cents"
            " FROM shop_read.product_sales ORDER BY revenue_cents DESC LIMIT 5",
        )
        checks = all_mismatches(conn)
        verdict = "yes" if not any(checks.values()) else f"NO: {checks}"
        echo(f"\nevery read model equals its definition recomputed from the write model, on the replica: {verdict}")
        _table(
            echo, conn, "projections (from the replica)",
            "SELECT name, kind, applied_events, last_position, updated_at FROM cqrs.projections ORDER BY name",
        )
    with connect(dsn, application_name="cqrs-pg demo") as conn:
        _table(
            echo, conn, "replication lag (from the primary)",
            "SELECT application_name AS replica, state,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) AS replay_lag_bytes,"
            " round(extract(epoch FROM replay_lag)::numeric * 1000, 3) AS replay_lag_ms"
            " FROM pg_stat_replication",
        )
