"""Part 4: what the materialized view costs.

Refresh time. One database per size, each holding that many order lines (written
set-based with triggers off: only the tables matter here; see generate.py). In each
round, for every size and in a shuffled order, 20 placed orders are cancelled (relevant
events, a few view rows change) and then one of these is timed:
- the daemon's refresh: cqrs.run_projection('product_sales', ...), which finds the
  relevant events and runs REFRESH MATERIALIZED VIEW CONCURRENTLY (readers keep reading);
- the baseline: a plain REFRESH MATERIALIZED VIEW (faster, but it locks readers out and
  its AccessExclusiveLock is replayed on the replicas).

The debounce. On the middle size, `cqrs-pg listen` runs under a steady load of place_order
(pgbench --rate) once with --refresh-interval as configured (default 1 s) and once with
0 (refresh after every batch that has relevant events), interleaved over rounds. The
daemon's per-batch log records count the refreshes and the time they took.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from cqrs_pg.db import scalar
from cqrs_pg_tools.bench import generate
from cqrs_pg_tools.bench._common import (
    OTHER_CPU_WARNING,
    BenchError,
    CpuWatch,
    DaemonCpu,
    Session,
    fmt_spread,
    read_batches,
    spread,
)
from cqrs_pg_tools.bench.throughput import COMMAND_SCRIPT

CHANGE_SQL = """
UPDATE shop.orders o SET status = 'cancelled', version = o.version + 1, updated_at = now()
 WHERE o.id IN (SELECT x.id FROM shop.orders x WHERE x.status = 'placed' LIMIT 20)"""
DAEMON_REFRESH_SQL = "SELECT applied FROM cqrs.run_projection('product_sales', 1000000, '0 s')"
PLAIN_REFRESH_SQL = "REFRESH MATERIALIZED VIEW shop_read.product_sales"
LOAD_CLIENTS = 4


@dataclass
class RefreshRun:
    round: int
    lines: int
    kind: str  # "concurrently" | "plain"
    seconds: float
    machine_cpu_busy: float | None = None
    other_cpu: float | None = None


@dataclass
class DebounceRun:
    round: int
    refresh_interval: float
    seconds: float  # of load
    commands: int
    tps: float
    latency_ms: float | None
    refreshes: int
    refresh_seconds: float  # summed
    events_refreshed: int
    other_batches: int  # batches of the other projections in the window
    daemon_cpu_seconds: float | None
    machine_cpu_busy: float | None = None
    other_cpu: float | None = None


def run(session: Session) -> dict[str, Any]:
    return _Matview(session).run()


class _Matview:
    def __init__(self, session: Session) -> None:
        self.s = session
        self.cfg = session.cfg
        self.progress = session.progress

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        sizes = sorted(set(cfg.matview_lines))
        dbs = {lines: self._build(lines) for lines in sizes}
        rng = random.Random(cfg.seed)
        plan = []
        for r in range(cfg.rounds):
            order = [(lines, kind) for lines in sizes for kind in ("concurrently", "plain")]
            rng.shuffle(order)
            plan += [(r + 1, lines, kind) for lines, kind in order]
        refreshes: list[RefreshRun] = []
        for i, (rnd, lines, kind) in enumerate(plan, 1):
            result = self._refresh(rnd, lines, kind, dbs[lines][0])
            refreshes.append(result)
            self.progress(
                f"[{i}/{len(plan)}] round {rnd}/{cfg.rounds}  {dbs[lines][1]:>10,} order lines  {kind:<12}"
                f" {result.seconds * 1000:>10,.1f} ms"
            )
        middle = sizes[len(sizes) // 2]
        debounce: list[DebounceRun] = []
        intervals = [cfg.refresh_interval, 0.0]
        plan2 = []
        for r in range(cfg.rounds):
            shuffled = list(intervals)
            rng.shuffle(shuffled)
            plan2 += [(r + 1, x) for x in shuffled]
        self.progress(
            f"debounce: {len(plan2)} runs of {cfg.load_seconds}s at {cfg.load_rate} commands/s on {dbs[middle][1]:,} order lines"
        )
        for i, (rnd, interval) in enumerate(plan2, 1):
            d = self._debounce(rnd, interval, dbs[middle][0])
            debounce.append(d)
            self.progress(
                f"[{i}/{len(plan2)}] round {rnd}/{cfg.rounds}  --refresh-interval {interval:g}: {d.refreshes} refreshes in"
                f" {d.seconds:.1f}s taking {d.refresh_seconds:.2f}s; {d.tps:,.0f} commands/s"
            )
        for dbname, _ in dbs.values():
            self.s.drop(dbname)
        return self._report({lines: n for lines, (_, n) in dbs.items()}, refreshes, middle, debounce)

    def _build(self, lines: int) -> tuple[str, int]:
        cfg = self.cfg
        db = self.s.clone(f"mv_{lines}")
        per_chunk = max(1, min(5000, lines // 2))
        chunks = max(1, math.ceil(lines / (2 * per_chunk)))
        self.progress(f"writing {chunks * per_chunk * 2:,} order lines for the refresh runs ...")
        with self.s.connect(db) as conn:
            generate.install(conn)
            conn.execute("SET synchronous_commit = off")
            # Only the tables matter here: no outbox events, no foreign key checks.
            conn.execute("SET session_replication_role = replica")
            generate.generate(
                conn, chunks, per_chunk, cfg.customers, cfg.products, take_stock=False,
                progress=lambda done, total, secs: self.progress(f"   {done * per_chunk * 2:,} lines, {secs:.0f}s") if total > 10 else None,
            )
            conn.execute("SET session_replication_role = DEFAULT")
            conn.execute("VACUUM (ANALYZE)")
            conn.execute(PLAIN_REFRESH_SQL)
            count = scalar(conn, "SELECT count(*) FROM shop.order_lines")
        return db, int(count)

    def _refresh(self, rnd: int, lines: int, kind: str, db: str) -> RefreshRun:
        with self.s.connect(db) as conn:
            conn.execute(CHANGE_SQL)
        self.s.settle(self.s.dsn(db))
        with self.s.connect(db) as conn:
            watch = CpuWatch(self.s)
            t0 = time.perf_counter()
            if kind == "plain":
                conn.execute(PLAIN_REFRESH_SQL)
            else:
                row = conn.execute(DAEMON_REFRESH_SQL).fetchone()
                if row is None or not row[0]:
                    raise BenchError("cqrs.run_projection('product_sales') found nothing to refresh after a change")
            seconds = time.perf_counter() - t0
            cpu = watch.result()
        return RefreshRun(round=rnd, lines=lines, kind=kind, seconds=round(seconds, 4), **cpu)

    def _debounce(self, rnd: int, interval: float, db: str) -> DebounceRun:
        cfg = self.cfg
        dsn = self.s.dsn(db)
        script = self.s.script("command", COMMAND_SCRIPT)
        self.s.settle(dsn)
        daemon = self.s.start_daemon(
            db, f"debounce-{interval:g}-{rnd}.log",
            "--refresh-interval", f"{interval:g}", "--log-level", "debug", "--log-format", "json",
        )
        try:
            with self.s.connect(db) as conn:
                self.s.wait_asleep(conn, daemon, "catch up")
                daemon_cpu = DaemonCpu(self.s, conn, daemon)
            watch = CpuWatch(self.s)
            wall0 = time.time()
            result = self.s.pgbench(dsn, script, LOAD_CLIENTS, cfg.load_seconds, rate=cfg.load_rate)
            wall1 = time.time()
            cpu = watch.result()
            daemon_seconds = daemon_cpu.total()
            if not daemon.alive():
                raise BenchError(f"the daemon exited during the load: see {daemon.log}")
        finally:
            self.s.stop_daemon(daemon)
        batches = read_batches(daemon.log, since=wall0, until=wall1)
        mv = [b for b in batches if b["projection"] == "product_sales" and b["applied"]]
        return DebounceRun(
            round=rnd, refresh_interval=interval, seconds=round(wall1 - wall0, 2), commands=result.transactions,
            tps=result.tps, latency_ms=result.latency_ms, refreshes=len(mv),
            refresh_seconds=round(sum(b["duration_ms"] for b in mv) / 1000, 3),
            events_refreshed=sum(b["applied"] for b in mv),
            other_batches=sum(1 for b in batches if b["projection"] != "product_sales"),
            daemon_cpu_seconds=daemon_seconds, **cpu,
        )

    def _report(
        self, sizes: dict[int, int], refreshes: list[RefreshRun], middle: int, debounce: list[DebounceRun]
    ) -> dict[str, Any]:
        cfg = self.cfg
        table = {}
        for asked, actual in sizes.items():
            mine = [r for r in refreshes if r.lines == asked]
            conc = spread([r.seconds * 1000 for r in mine if r.kind == "concurrently"], 1)
            plain = spread([r.seconds * 1000 for r in mine if r.kind == "plain"], 1)
            table[str(actual)] = {
                "asked": asked,
                "concurrently_ms": conc,
                "plain_ms": plain,
                "ratio": None if not conc or not plain or not plain["median"] else round(conc["median"] / plain["median"], 2),
            }
        deb = {}
        for interval in (cfg.refresh_interval, 0.0):
            runs = [d for d in debounce if d.refresh_interval == interval]
            deb[f"{interval:g}"] = {
                "refresh_interval": interval,
                "refreshes": spread([d.refreshes for d in runs], 1),
                "refreshes_per_second": spread([d.refreshes / d.seconds for d in runs if d.seconds], 2),
                "refresh_seconds": spread([d.refresh_seconds for d in runs]),
                "refresh_share_of_time": spread([d.refresh_seconds / d.seconds for d in runs if d.seconds]),
                "events_per_refresh": spread([d.events_refreshed / d.refreshes for d in runs if d.refreshes], 1),
                "tps": spread([d.tps for d in runs], 1),
                "daemon_cpu_seconds": spread([d.daemon_cpu_seconds for d in runs]),
            }
        return {
            "part": 4,
            "benchmark": "materialized view cost: refresh time of shop_read.product_sales; refresh count with and without the debounce",
            "config": {
                "lines": list(sizes),
                "rounds": cfg.rounds,
                "change_before_each_refresh": "20 placed orders cancelled",
                "concurrently": DAEMON_REFRESH_SQL,
                "plain": PLAIN_REFRESH_SQL,
                "debounce_lines": sizes[middle],
                "load": f"pgbench -R {cfg.load_rate} -T {cfg.load_seconds} -c {LOAD_CLIENTS} (place_order, 2 lines)",
                "daemon": "cqrs-pg listen --refresh-interval X --log-level debug --log-format json (otherwise its defaults)",
                "before_each_run": "VACUUM (ANALYZE), no autovacuum worker running, CHECKPOINT, replica replayed",
            },
            "refresh_runs": [asdict(r) for r in refreshes],
            "refresh": table,
            "debounce_runs": [asdict(d) for d in debounce],
            "debounce": deb,
        }


def targets(part: dict[str, Any]) -> list[dict[str, Any]]:
    return []  # figures only, no target


def render(part: dict[str, Any]) -> list[str]:
    cfg = part["config"]
    lines = [f"refresh of product_sales, ms: median (min-max) over {cfg['rounds']} interleaved round(s), after 20 orders cancelled"]
    head = f"{'order lines':>12} {'CONCURRENTLY (daemon)':>26} {'plain REFRESH':>26} {'ratio':>7}"
    lines += [head, "-" * len(head)]
    for key, row in part["refresh"].items():
        lines.append(
            f"{int(key):>12,} {fmt_spread(row['concurrently_ms'], '{:,.1f}'):>26} {fmt_spread(row['plain_ms'], '{:,.1f}'):>26}"
            f" {'n/a' if row['ratio'] is None else format(row['ratio'], '.2f'):>7}"
        )
    lines.append("")
    lines.append(f"debounce, under {cfg['load']}, on {cfg['debounce_lines']:,} order lines: median (min-max)")
    head = (
        f"{'--refresh-interval':>18} {'refreshes':>16} {'per second':>16} {'time refreshing':>20}"
        f" {'events/refresh':>18} {'commands/s':>18}"
    )
    lines += [head, "-" * len(head)]
    for key, d in part["debounce"].items():
        lines.append(
            f"{key + ' s':>18} {fmt_spread(d['refreshes']):>16} {fmt_spread(d['refreshes_per_second'], '{:.2f}'):>16}"
            f" {fmt_spread(d['refresh_share_of_time'], '{:.1%}'):>20} {fmt_spread(d['events_per_refresh']):>18} {fmt_spread(d['tps']):>18}"
        )
    others = [r["other_cpu"] for r in part["refresh_runs"] + part["debounce_runs"] if r.get("other_cpu") is not None]
    if others and max(others) > OTHER_CPU_WARNING:
        lines.append(f"WARNING: other processes used up to {max(others) * 100:.0f}% of the CPUs during some runs: figures disturbed")
    return lines


__all__ = ["render", "run", "targets"]
