"""Part 2: projection catch-up, beside a raw set-based upsert of the same events.

A backlog of mixed shop events is written set-based through the shop tables (so the real
outbox triggers capture it; see generate.py), at two sizes (backlog / 10 and backlog),
each in a database of its own. Then, in interleaved rounds, each backlog is

- drained by the real daemon: every read model emptied and every checkpoint put at the
  end of the outbox; `cqrs-pg listen` (defaults, but --log-format json --log-level debug)
  started and let fall asleep; then, in one transaction, every checkpoint reset to the
  start and the doorbell rung. Timed from that commit until every projection's checkpoint
  is at the last event. Events/s overall = backlog / that time; per projection = events /
  the time its batches took (from the daemon's per-batch log records). The daemon's peak
  resident memory (VmHWM) is read before it is stopped: it must not grow with the backlog.
- upserted raw: the same events read in the same batches, in position order (all of
  them committed: no limit to find), the latest version per aggregate upserted set-based
  into a plain table (aggregate_id primary key), one transaction per batch, no checkpoint.

After the first drain of each backlog, every read model is compared with its definition
recomputed from the write model (cqrs_pg_tools.verify), and each projection must have applied
every event exactly once.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from cqrs_pg.daemon import CHANNEL
from cqrs_pg.db import scalar
from cqrs_pg_tools.bench import generate
from cqrs_pg_tools.bench._common import (
    OTHER_CPU_WARNING,
    BenchError,
    CpuWatch,
    DaemonCpu,
    Session,
    fmt_spread,
    ratio,
    read_batches,
    spread,
)
from cqrs_pg_tools.verify import all_mismatches

# Orders per generated transaction: ~2,700 events each.
PER_CHUNK = 500
# Targets.
TARGET_EVENTS_PER_SECOND = 100_000
TARGET_RAW_RATIO = 0.4
# Peak memory counts as flat when the large backlog's is at most this much above the small one's.
FLAT_MEMORY = 1.25

RAW_TABLE_SQL = """
CREATE TABLE cqrs_bench.raw_state (
    aggregate_id   uuid PRIMARY KEY,
    aggregate_type text NOT NULL,
    version        integer NOT NULL,
    payload        jsonb NOT NULL
)"""

# One raw batch: the next batch_size events after a position, the latest version of
# each aggregate upserted; returns the batch's size and last position.
RAW_BATCH_SQL = """
WITH b AS MATERIALIZED (
    SELECT o.position, o.aggregate_id, o.aggregate_type, o.aggregate_version, o.payload
      FROM cqrs.outbox o
     WHERE o.position > %(pos)s::bigint
     ORDER BY o.position
     LIMIT %(n)s),
up AS (
    INSERT INTO cqrs_bench.raw_state AS r (aggregate_id, aggregate_type, version, payload)
    SELECT DISTINCT ON (b.aggregate_id) b.aggregate_id, b.aggregate_type, b.aggregate_version, b.payload
      FROM b
     ORDER BY b.aggregate_id, b.aggregate_version DESC
    ON CONFLICT (aggregate_id) DO UPDATE
       SET version = excluded.version, payload = excluded.payload
     WHERE r.version < excluded.version
    RETURNING 1)
SELECT (SELECT count(*) FROM b), last.position, (SELECT count(*) FROM up)
  FROM (SELECT b.position FROM b ORDER BY b.position DESC LIMIT 1) last
"""


@dataclass
class Backlog:
    size: int  # asked for
    dbname: str
    events: int = 0  # in the outbox
    end_position: int = 0
    generate_seconds: float = 0.0
    generated_events: int = 0
    event_types: dict[str, int] = field(default_factory=dict)
    verified: dict[str, int] | None = None  # read model -> mismatching rows after the first drain
    applied_exactly_once: bool | None = None


@dataclass
class Run:
    round: int
    backlog: int  # events
    kind: str  # "daemon" | "raw"
    seconds: float
    events_per_second: float
    per_projection: dict[str, dict[str, float]] | None = None  # name -> events, batches, seconds, events_per_second
    applied: dict[str, int] | None = None  # applied_events per projection after the drain
    peak_rss_mb: float | None = None
    daemon_cpu_seconds: float | None = None
    batches: int | None = None
    rows_written: int | None = None
    machine_cpu_busy: float | None = None
    other_cpu: float | None = None


def run(session: Session) -> dict[str, Any]:
    return _Catchup(session).run()


class _Catchup:
    def __init__(self, session: Session) -> None:
        self.s = session
        self.cfg = session.cfg
        self.progress = session.progress

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        sizes = sorted({max(cfg.backlog // 10, 1), cfg.backlog})
        backlogs = [self._build(size) for size in sizes]
        rng = random.Random(cfg.seed)
        plan = []
        for r in range(cfg.rounds):
            order = [(b, kind) for b in backlogs for kind in ("daemon", "raw")]
            rng.shuffle(order)
            plan += [(r + 1, b, kind) for b, kind in order]
        runs: list[Run] = []
        for i, (rnd, b, kind) in enumerate(plan, 1):
            result = self._drain(rnd, b) if kind == "daemon" else self._raw(rnd, b)
            runs.append(result)
            self.progress(f"[{i}/{len(plan)}] round {rnd}/{cfg.rounds}  {_describe(result)}")
        for b in backlogs:
            self.s.drop(b.dbname)
        return self._report(backlogs, runs)

    # -- the backlog -------------------------------------------------------------------------

    def _build(self, size: int) -> Backlog:
        cfg = self.cfg
        b = Backlog(size=size, dbname=self.s.clone(f"cu_{size}"))
        per = generate.events_per_chunk(PER_CHUNK, cfg.products)
        # At least two: the second ships and cancels orders of the first (order.updated).
        chunks = max(2, math.ceil((size - self.s.seed_events) / per))
        with self.s.connect(b.dbname) as conn:
            generate.install(conn)
            conn.execute(RAW_TABLE_SQL)
            conn.execute("SET synchronous_commit = off")
            self.progress(f"writing a backlog of {size:,} events ({chunks:,} transactions of {PER_CHUNK} orders) ...")
            b.generate_seconds = round(generate.generate(
                conn, chunks, PER_CHUNK, cfg.customers, cfg.products,
                progress=lambda done, total, secs: self.progress(f"   {done:,}/{total:,} transactions, {secs:.0f}s"),
            ), 2)
            conn.execute("VACUUM (ANALYZE)")
            b.events = scalar(conn, "SELECT count(*) FROM cqrs.outbox")
            b.generated_events = b.events - self.s.seed_events
            b.end_position = _end(conn)
            b.event_types = dict(conn.execute("SELECT event_type, count(*) FROM cqrs.outbox GROUP BY 1 ORDER BY 1").fetchall())
        rate = b.generated_events / b.generate_seconds if b.generate_seconds else 0
        self.progress(f"   backlog: {b.events:,} events ({b.generated_events:,} written in {b.generate_seconds:.1f}s, {rate:,.0f}/s)")
        return b

    # -- the daemon --------------------------------------------------------------------------

    def _drain(self, rnd: int, b: Backlog) -> Run:
        cfg = self.cfg
        dsn = self.s.dsn(b.dbname)
        with self.s.connect(b.dbname) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT t::text FROM cqrs.projections p, unnest(p.tables) t WHERE p.kind = 'sql'")]
            if tables:
                conn.execute(f"TRUNCATE {', '.join(tables)}")
            # At the end first: the daemon starts with nothing to do and falls asleep.
            conn.execute(
                "UPDATE cqrs.projections SET last_position = %s, applied_events = 0,"
                " horizon = '0', refreshed_at = NULL",
                (b.end_position,),
            )
        self.s.settle(dsn)
        daemon = self.s.start_daemon(
            b.dbname, f"catchup-{b.size}-{rnd}.log",
            "--batch-size", str(cfg.batch_size), "--log-level", "debug", "--log-format", "json",
        )
        try:
            with self.s.connect(b.dbname) as conn:
                self.s.wait_asleep(conn, daemon)
                daemon_cpu = DaemonCpu(self.s, conn, daemon)
                watch = CpuWatch(self.s)
                with conn.transaction():
                    conn.execute("UPDATE cqrs.projections SET last_position = 0, applied_events = 0,"
                                 " horizon = '0', refreshed_at = NULL")
                    conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
                wall0, t0 = time.time(), time.monotonic()
                self.s.wait_daemon(
                    conn, daemon, "SELECT bool_and(last_position >= %s) FROM cqrs.projections",
                    f"catch up with {b.events:,} events", (b.end_position,),
                    timeout=cfg.daemon_wait + b.events / 1000, interval=0.005,
                )
                seconds = time.monotonic() - t0
                cpu = watch.result()
                rss = daemon.peak_rss_mb()
                daemon_seconds = daemon_cpu.total()
                applied: dict[str, int] = dict(conn.execute("SELECT name, applied_events FROM cqrs.projections").fetchall())
        finally:
            self.s.stop_daemon(daemon)
        per_projection: dict[str, dict[str, float]] = {}
        for rec in read_batches(daemon.log, since=wall0 - 1):
            cell = per_projection.setdefault(rec["projection"], {"events": 0, "batches": 0, "seconds": 0.0})
            cell["events"] += rec["applied"]
            cell["batches"] += 1
            cell["seconds"] += rec["duration_ms"] / 1000
        for cell in per_projection.values():
            cell["seconds"] = round(cell["seconds"], 3)
            cell["events_per_second"] = round(cell["events"] / cell["seconds"], 1) if cell["seconds"] else 0.0
        if b.verified is None:
            with self.s.connect(b.dbname) as conn:
                b.verified = all_mismatches(conn)
            b.applied_exactly_once = all(n == b.events for n in applied.values())
            if any(b.verified.values()) or not b.applied_exactly_once:
                self.progress(f"   WARNING: after the drain of {b.events:,} events: mismatches {b.verified}, applied {applied}")
        return Run(
            round=rnd, backlog=b.events, kind="daemon", seconds=round(seconds, 3),
            events_per_second=round(b.events / seconds, 1), per_projection=per_projection, applied=applied,
            peak_rss_mb=rss, daemon_cpu_seconds=daemon_seconds, batches=sum(int(c["batches"]) for c in per_projection.values()),
            **cpu,
        )

    # -- the raw baseline --------------------------------------------------------------------

    def _raw(self, rnd: int, b: Backlog) -> Run:
        dsn = self.s.dsn(b.dbname)
        with self.s.connect(b.dbname) as conn:
            conn.execute("TRUNCATE cqrs_bench.raw_state")
        self.s.settle(dsn)
        events = batches = rows = 0
        pos = 0
        with self.s.connect(b.dbname) as conn:
            watch = CpuWatch(self.s)
            t0 = time.monotonic()
            while True:
                row = conn.execute(RAW_BATCH_SQL, {"pos": pos, "n": self.cfg.batch_size}).fetchone()
                if row is None:
                    break
                n, pos, written = row
                events += n
                rows += written
                batches += 1
            seconds = time.monotonic() - t0
            cpu = watch.result()
        if events != b.events:
            raise BenchError(f"the raw upsert read {events:,} events, not the {b.events:,} of the backlog")
        return Run(
            round=rnd, backlog=b.events, kind="raw", seconds=round(seconds, 3),
            events_per_second=round(events / seconds, 1), batches=batches, rows_written=rows, **cpu,
        )

    # -- report ------------------------------------------------------------------------------

    def _report(self, backlogs: list[Backlog], runs: list[Run]) -> dict[str, Any]:
        cfg = self.cfg
        sizes: dict[str, Any] = {}
        for b in backlogs:
            mine = [r for r in runs if r.backlog == b.events]
            daemon = [r for r in mine if r.kind == "daemon"]
            raw = [r for r in mine if r.kind == "raw"]
            names = sorted({n for r in daemon for n in (r.per_projection or {})})
            paired = [
                d.events_per_second / w.events_per_second
                for d in daemon for w in raw if d.round == w.round and w.events_per_second
            ]
            overall = spread([r.events_per_second for r in daemon], 1)
            raw_spread = spread([r.events_per_second for r in raw], 1)
            sizes[str(b.events)] = {
                "backlog": asdict(b),
                "daemon_events_per_second": overall,
                "daemon_seconds": spread([r.seconds for r in daemon]),
                "per_projection": {
                    n: {
                        "events_per_second": spread([(r.per_projection or {}).get(n, {}).get("events_per_second") for r in daemon], 1),
                        "seconds": spread([(r.per_projection or {}).get(n, {}).get("seconds") for r in daemon]),
                        "batches": spread([(r.per_projection or {}).get(n, {}).get("batches") for r in daemon], 0),
                    }
                    for n in names
                },
                "raw_events_per_second": raw_spread,
                "raw_seconds": spread([r.seconds for r in raw]),
                "ratio_to_raw": {
                    "value": ratio(overall["median"] if overall else None, raw_spread["median"] if raw_spread else None),
                    "per_round_min": round(min(paired), 3) if paired else None,
                    "per_round_max": round(max(paired), 3) if paired else None,
                },
                "peak_rss_mb": spread([r.peak_rss_mb for r in daemon], 1),
                "daemon_cpu_seconds": spread([r.daemon_cpu_seconds for r in daemon]),
            }
        small, large = str(backlogs[0].events), str(backlogs[-1].events)
        rss_small = (sizes[small]["peak_rss_mb"] or {}).get("median")
        rss_large = (sizes[large]["peak_rss_mb"] or {}).get("median")
        memory_ratio = ratio(rss_large, rss_small)
        return {
            "part": 2,
            "benchmark": "projection catch-up: a backlog of mixed shop events drained into every read model",
            "config": {
                "backlogs": [b.size for b in backlogs],
                "rounds": cfg.rounds,
                "batch_size": cfg.batch_size,
                "orders_per_generated_transaction": PER_CHUNK,
                "daemon": f"cqrs-pg listen --batch-size {cfg.batch_size} --log-level debug --log-format json (otherwise its defaults)",
                "raw": "the same events in the same batches below the same fence, latest version per aggregate"
                " upserted into a plain table, one transaction per batch, no checkpoint",
                "order": f"(backlog, daemon|raw) shuffled per round, seed {cfg.seed}",
                "before_each_run": "read models emptied (daemon) or raw table emptied (raw); VACUUM (ANALYZE),"
                " no autovacuum worker running, CHECKPOINT, replica replayed up to the primary",
            },
            "runs": [asdict(r) for r in runs],
            "sizes": sizes,
            "largest": large,
            "memory": {
                "small_backlog": int(small), "large_backlog": int(large),
                "peak_rss_mb_small": rss_small, "peak_rss_mb_large": rss_large,
                "ratio": memory_ratio, "flat": None if memory_ratio is None else memory_ratio <= FLAT_MEMORY,
                "flat_means": f"large/small <= {FLAT_MEMORY}",
            },
        }


def _end(conn: psycopg.Connection) -> int:
    """The last event's position: a drained projection's checkpoint is there or past it."""
    row = conn.execute("SELECT coalesce(max(o.position), 0) FROM cqrs.outbox o").fetchone()
    return int(row[0]) if row else 0


def _describe(r: Run) -> str:
    text = f"backlog {r.backlog:>10,}  {r.kind:<6} {r.events_per_second:>10,.0f} events/s in {r.seconds:.2f}s"
    if r.kind == "daemon":
        per = ", ".join(f"{n} {c['events_per_second']:,.0f}/s" for n, c in sorted((r.per_projection or {}).items()))
        text += f"  ({per}); peak RSS {r.peak_rss_mb} MB"
    if r.other_cpu is not None and r.other_cpu > OTHER_CPU_WARNING:
        text += f"  [other processes used {r.other_cpu * 100:.0f}% of the CPUs]"
    return text


def targets(part: dict[str, Any]) -> list[dict[str, Any]]:
    big = part["sizes"][part["largest"]]
    overall = (big["daemon_events_per_second"] or {}).get("median")
    raw = (big["raw_events_per_second"] or {}).get("median")
    rel = big["ratio_to_raw"]["value"]
    mem = part["memory"]
    n = f"{int(part['largest']):,}"
    return [
        {"part": 2, "what": f"catch-up of {n} events, overall events/s", "value": overall,
         "target": f">= {TARGET_EVENTS_PER_SECOND:,}", "met": None if overall is None else overall >= TARGET_EVENTS_PER_SECOND,
         "baseline": None if raw is None else f"the raw upsert {raw:,.0f}"},
        {"part": 2, "what": f"catch-up of {n} events vs the raw upsert", "value": rel,
         "target": f">= {TARGET_RAW_RATIO}", "met": None if rel is None else rel >= TARGET_RAW_RATIO},
        {"part": 2, "what": f"daemon peak RSS, {mem['large_backlog']:,} vs {mem['small_backlog']:,} events (ratio)",
         "value": mem["ratio"], "target": f"flat (<= {FLAT_MEMORY})", "met": mem["flat"]},
    ]


def render(part: dict[str, Any]) -> list[str]:
    cfg = part["config"]
    lines = [
        f"projection catch-up: events/s, median (min-max) over {cfg['rounds']} interleaved round(s);"
        f" daemon batch size {cfg['batch_size']:,}",
    ]
    names = sorted({n for s in part["sizes"].values() for n in s["per_projection"]})
    head = f"{'backlog (events)':>18} {'daemon overall':>26} {'raw upsert':>26} {'ratio':>7} {'peak RSS MB':>18}"
    lines += [head, "-" * len(head)]
    for key, s in part["sizes"].items():
        lines.append(
            f"{int(key):>18,} {fmt_spread(s['daemon_events_per_second']):>26} {fmt_spread(s['raw_events_per_second']):>26}"
            f" {'n/a' if s['ratio_to_raw']['value'] is None else format(s['ratio_to_raw']['value'], '.3f'):>7}"
            f" {fmt_spread(s['peak_rss_mb'], '{:.1f}'):>18}"
        )
    lines.append("")
    lines.append("per projection (events / the time its batches took):")
    for key, s in part["sizes"].items():
        per = "; ".join(f"{n} {fmt_spread(s['per_projection'][n]['events_per_second'])}" for n in names if n in s["per_projection"])
        lines.append(f"  {int(key):>10,} events: {per}")
    lines.append("")
    for key, s in part["sizes"].items():
        b = s["backlog"]
        rate = b["generated_events"] / b["generate_seconds"] if b["generate_seconds"] else 0
        equal = b["verified"] is not None and not any(b["verified"].values())
        check = "read models equal their definitions" if equal else f"MISMATCHES {b['verified']}"
        once = "every event applied exactly once" if b["applied_exactly_once"] else "NOT every event applied exactly once"
        lines.append(f"  {int(key):>10,} events: written in {b['generate_seconds']:.1f}s ({rate:,.0f}/s); {check}; {once}")
    mem = part["memory"]
    if mem["ratio"] is not None:
        lines.append(
            f"daemon peak RSS {mem['peak_rss_mb_small']} MB at {mem['small_backlog']:,} events, {mem['peak_rss_mb_large']} MB at"
            f" {mem['large_backlog']:,}: ratio {mem['ratio']:.2f} ({'flat' if mem['flat'] else 'NOT flat'})"
        )
    others = [r["other_cpu"] for r in part["runs"] if r.get("other_cpu") is not None]
    if others and max(others) > OTHER_CPU_WARNING:
        lines.append(f"WARNING: other processes used up to {max(others) * 100:.0f}% of the CPUs during some runs: figures disturbed")
    return lines


__all__ = ["RAW_BATCH_SQL", "render", "run", "targets"]
