"""Part 5: growth. Does a long history make batches or commands slower?

Two databases, one with a small outbox and one with a large one (default 100k and 10M
rows). The history is synthetic, already projected: rows appended set-based to
cqrs.outbox in transactions of up to 1M rows (payloads of a typical order event's size),
then every projection's checkpoint is put at its end. After it come real events (written
through the shop tables, see generate.py), a little more than one batch. Then, in each
round and in a shuffled order of databases, timed `samples` times each:

- batch end:  cqrs._next_batch from the checkpoint (a full batch: its batch_size-th event)
- batch read: the batch's events through cqrs.batch(...), payloads included
  (both up to the last position: every event is final here)
- idle poll:  what an idle projection's round asks: how far it may read
  (cqrs._read_limit) and the next batch from the last event (none)
- apply:      cqrs.run_projection('order_summary', batch_size) in a rolled-back transaction
- command:    place_order latency, pgbench at 1 client for `growth_seconds`

The plans are shown once per database: the nested statements of cqrs._next_batch through
auto_explain (as NOTICEs, superuser only), cqrs.batch through EXPLAIN; both with buffers,
which count pages touched whatever the machine's speed.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from cqrs_pg.db import scalar
from cqrs_pg_tools.bench import generate
from cqrs_pg_tools.bench._common import OTHER_CPU_WARNING, BenchError, Session, fmt_spread, ratio, spread
from cqrs_pg_tools.bench.throughput import COMMAND_SCRIPT

HISTORY_CHUNK = 1_000_000
# A figure counts as flat when the large outbox's median is at most this much above the small one's.
FLAT = 1.3
QUERIES = ("batch_end", "batch_read", "idle_poll", "apply", "status", "prune_idle")

# A typical order event's payload (to_jsonb of a shop.orders row), ~220 bytes.
PAYLOAD = (
    '{"id": "5d41402a-bc4b-2a76-b971-9d911017c592", "status": "shipped", "version": 2,'
    ' "placed_at": "2026-01-01T12:00:00.123456+00:00", "updated_at": "2026-01-01T12:05:00.654321+00:00",'
    ' "customer_id": "7d793037-a076-0186-574a-0fe6e9f4bc5f"}'
)
HISTORY_SQL = """
INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata)
SELECT (ARRAY['order.created', 'order_line.created', 'order_line.created', 'product.updated', 'order.updated'])[1 + i %% 5],
       CASE WHEN i %% 5 = 3 THEN 'product' ELSE 'order' END,
       md5('history-' || i / 5)::uuid, 1 + i %% 5 / 4, %(payload)s::jsonb, '{"command": "history"}'::jsonb
  FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) i"""

NEXT_BATCH_SQL = "SELECT b.end_position, b.n FROM cqrs._next_batch(%s, %s, %s) b"
IDLE_POLL_SQL = "SELECT b.n FROM cqrs._read_limit() l, cqrs._next_batch(%s, l.final_position, %s) b"
BATCH_READ_SQL = "SELECT count(*), sum(pg_column_size(e.payload)) FROM cqrs.batch(%s, %s) e"
APPLY_SQL = "SELECT applied FROM cqrs.run_projection('order_summary', %s, '0 s')"
STATUS_SQL = "SELECT count(*) FROM cqrs.projection_status()"
# a scheduled prune that finds nothing to drop (its usual run): keep 100 years
PRUNE_IDLE_SQL = "SELECT count(*) FROM cqrs.prune('100 years', dry_run => true)"
PRUNE_SQL = "SELECT count(*), coalesce(sum(events), 0), coalesce(sum(bytes), 0) FROM cqrs.prune('0 s')"
# the empty default partition: a plan may read its no pages as it likes
DEFAULT_PARTITION = "outbox_default"
AUTO_EXPLAIN = (
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_buffers = on",
    "SET auto_explain.log_timing = off",
    "SET auto_explain.log_nested_statements = on",
    "SET auto_explain.log_level = notice",
)
_SCAN = re.compile(
    r"((?:Parallel )?(?:Index Only Scan|Index Scan|Bitmap Index Scan|Bitmap Heap Scan|Seq Scan)(?: Backward)?)"
    r"(?: using (\S+))? on (\S+)"
)
_BUFFERS = re.compile(r"Buffers: shared(?: hit=(\d+))?(?: read=(\d+))?")


@dataclass
class Outbox:
    rows_asked: int
    dbname: str
    rows: int = 0
    fill_seconds: float = 0.0
    checkpoint: int = 0
    # the last position: everything up to it is final (no writer runs meanwhile)
    final: int = 0
    new_events: int = 0
    size_mb: float = 0.0
    index_mb: dict[str, float] = field(default_factory=dict)
    plans: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    round: int
    rows: int
    what: str  # one of QUERIES, or "command"
    ms: float  # median of the samples (command: pgbench's average latency)
    samples: int
    tps: float | None = None
    other_cpu: float | None = None


def run(session: Session) -> dict[str, Any]:
    return _Growth(session).run()


class _Growth:
    def __init__(self, session: Session) -> None:
        self.s = session
        self.cfg = session.cfg
        self.progress = session.progress

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        outboxes = [self._build(n) for n in sorted(set(cfg.history))]
        script = self.s.script("command", COMMAND_SCRIPT)
        rng = random.Random(cfg.seed)
        runs: list[Run] = []
        for rnd in range(1, cfg.rounds + 1):
            order = list(outboxes)
            rng.shuffle(order)
            for o in order:
                self.s.settle(self.s.dsn(o.dbname))
                runs += self._queries(rnd, o)
                runs.append(self._command(rnd, o, script))
                mine = {r.what: r for r in runs if r.round == rnd and r.rows == o.rows}
                self.progress(
                    f"round {rnd}/{cfg.rounds}  outbox {o.rows:>12,} rows: "
                    + ", ".join(f"{w} {mine[w].ms:.3f} ms" for w in (*QUERIES, "command"))
                )
        prunes = [self._prune(o) for o in outboxes]
        for o in outboxes:
            self.s.drop(o.dbname)
        report = self._report(outboxes, runs)
        report["prune"] = prunes
        return report

    def _prune(self, o: Outbox) -> dict[str, Any]:
        """`cqrs-pg prune --keep 0s` of everything the projections have passed: every
        projection's checkpoint is at the end of the history."""
        with self.s.connect(o.dbname) as conn:
            size = "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('cqrs.outbox')"
            before = int(scalar(conn, size))
            t0 = time.monotonic()
            row = conn.execute(PRUNE_SQL).fetchone()
            seconds = time.monotonic() - t0
            assert row is not None
            after = int(scalar(conn, size))
        self.progress(f"   prune of {o.rows:,} rows: {row[0]} partitions, {row[1]:,} events, "
                      f"{(before - after) / 2**20:,.0f} MB freed in {seconds:.2f}s")
        return {"rows": o.rows, "partitions": int(row[0]), "events": int(row[1]), "seconds": round(seconds, 3),
                "freed_mb": round((before - after) / 2**20, 1), "mb_before": round(before / 2**20, 1)}

    # -- the outbox --------------------------------------------------------------------------

    def _build(self, rows: int) -> Outbox:
        cfg = self.cfg
        o = Outbox(rows_asked=rows, dbname=self.s.clone(f"gr_{rows}"))
        with self.s.connect(o.dbname) as conn:
            conn.execute("SET synchronous_commit = off")
            have = scalar(conn, "SELECT count(*) FROM cqrs.outbox")
            todo = max(0, rows - have)
            self.progress(f"appending {todo:,} rows of history to cqrs.outbox ...")
            t0 = time.monotonic()
            for lo in range(1, todo + 1, HISTORY_CHUNK):
                hi = min(todo, lo + HISTORY_CHUNK - 1)
                conn.execute(HISTORY_SQL, {"lo": lo, "hi": hi, "payload": PAYLOAD})
                conn.execute("SELECT cqrs.extend_outbox()")  # as the daemon does: partitions ahead
                if todo > HISTORY_CHUNK:
                    self.progress(f"   {hi:,}/{todo:,} rows, {time.monotonic() - t0:.0f}s")
            o.fill_seconds = round(time.monotonic() - t0, 2)
            # Already projected: every checkpoint at the end of the history.
            o.checkpoint = _end(conn)
            conn.execute(
                "UPDATE cqrs.projections SET last_position = %s,"
                " horizon = (SELECT coalesce(max(o.tx_id), '0') FROM cqrs.outbox o)",
                (o.checkpoint,),
            )
            # Then real events, a little more than one full batch.
            generate.install(conn)
            per = generate.events_per_chunk(100, cfg.products)
            generate.generate(conn, math.ceil(cfg.batch_size * 1.2 / per) + 1, 100, cfg.customers, cfg.products, steps=1)
            self.progress("   VACUUM (ANALYZE) ...")
            conn.execute("VACUUM (ANALYZE)")
            o.rows = scalar(conn, "SELECT count(*) FROM cqrs.outbox")
            o.final = _end(conn)
            o.new_events = scalar(conn, "SELECT count(*) FROM cqrs.outbox WHERE position > %s", (o.checkpoint,))
            if o.new_events < cfg.batch_size:
                raise BenchError(f"only {o.new_events} events after the history, fewer than a batch of {cfg.batch_size}")
            # partitioned: the sizes of its partitions and of their indexes
            o.size_mb = round(
                int(scalar(conn, "SELECT sum(pg_table_size(relid)) FROM pg_partition_tree('cqrs.outbox')")) / 2**20, 1)
            o.index_mb = {
                name: round(int(size) / 2**20, 1)
                for name, size in conn.execute(
                    "SELECT x.indexrelid::regclass::text, sum(pg_relation_size(t.relid))"
                    "  FROM pg_index x, pg_partition_tree(x.indexrelid) t"
                    " WHERE x.indrelid = 'cqrs.outbox'::regclass GROUP BY 1 ORDER BY 1"
                )
            }
            o.plans = self._plans(conn, o)
        self.progress(
            f"   outbox: {o.rows:,} rows, {o.size_mb:,.0f} MB (+ indexes {sum(o.index_mb.values()):,.0f} MB),"
            f" history written in {o.fill_seconds:.1f}s; {o.new_events:,} new events after the checkpoint"
        )
        return o

    def _plans(self, conn: psycopg.Connection, o: Outbox) -> dict[str, Any]:
        cfg = self.cfg
        plans: dict[str, Any] = {}
        batch = conn.execute(NEXT_BATCH_SQL, (o.checkpoint, o.final, cfg.batch_size)).fetchone()
        assert batch is not None
        end_pos, _n = batch
        last = _end(conn)
        notices: list[str] = []
        try:
            for sql in AUTO_EXPLAIN:
                conn.execute(sql)
        except psycopg.Error as exc:
            plans["auto_explain"] = f"unavailable: {str(exc).strip().splitlines()[0]}"
        else:
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            for what, query, args in (("batch_end", NEXT_BATCH_SQL, (o.checkpoint, o.final, cfg.batch_size)),
                                      ("idle_poll", IDLE_POLL_SQL, (last, cfg.batch_size))):
                notices.clear()
                conn.execute(query, args)
                outbox_plans = [n for n in notices if _query_text(n) and "outbox" in _query_text(n)]
                plans[what] = [_summary(n) for n in outbox_plans]
            conn.execute("SET auto_explain.log_min_duration = -1")
        text = "\n".join(
            r[0] for r in conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, TIMING off) {BATCH_READ_SQL}", (o.checkpoint, end_pos))
        )
        plans["batch_read"] = [_summary(text)]
        return plans

    # -- timing ------------------------------------------------------------------------------

    def _queries(self, rnd: int, o: Outbox) -> list[Run]:
        cfg = self.cfg
        out: list[Run] = []
        with self.s.connect(o.dbname) as conn:
            batch = conn.execute(NEXT_BATCH_SQL, (o.checkpoint, o.final, cfg.batch_size)).fetchone()
            assert batch is not None
            end_pos, n = batch
            if n != cfg.batch_size:
                raise BenchError(f"cqrs._next_batch found a batch of {n} events, not {cfg.batch_size}")
            last = _end(conn)

            def apply() -> None:
                with conn.transaction(force_rollback=True):
                    row = conn.execute(APPLY_SQL, (cfg.batch_size,)).fetchone()
                    if row is None or row[0] != cfg.batch_size:
                        raise BenchError(f"cqrs.run_projection applied {row and row[0]} events, not {cfg.batch_size}")

            work: dict[str, Callable[[], object]] = {
                "batch_end": lambda: conn.execute(NEXT_BATCH_SQL, (o.checkpoint, o.final, cfg.batch_size)).fetchone(),
                "batch_read": lambda: conn.execute(BATCH_READ_SQL, (o.checkpoint, end_pos)).fetchone(),
                "idle_poll": lambda: conn.execute(IDLE_POLL_SQL, (last, cfg.batch_size)).fetchone(),
                "apply": apply,
                "status": lambda: conn.execute(STATUS_SQL).fetchone(),
                "prune_idle": lambda: conn.execute(PRUNE_IDLE_SQL).fetchone(),
            }
            order = list(QUERIES)
            random.Random(f"{cfg.seed}-{rnd}-{o.rows}").shuffle(order)
            for what in order:
                work[what]()  # warm: plans cached, pages in shared buffers
                samples = []
                for _ in range(cfg.growth_samples):
                    t0 = time.perf_counter()
                    work[what]()
                    samples.append((time.perf_counter() - t0) * 1000)
                out.append(Run(round=rnd, rows=o.rows, what=what, ms=round(statistics.median(samples), 4), samples=len(samples)))
        return out

    def _command(self, rnd: int, o: Outbox, script: Any) -> Run:
        from cqrs_pg_tools.bench._common import CpuWatch

        watch = CpuWatch(self.s)
        result = self.s.pgbench(self.s.dsn(o.dbname), script, 1, self.cfg.growth_seconds)
        cpu = watch.result()
        if result.failed:
            raise BenchError(f"{result.failed} commands failed during the growth run")
        return Run(
            round=rnd, rows=o.rows, what="command", ms=result.latency_ms or 0.0, samples=result.transactions,
            tps=result.tps, other_cpu=cpu["other_cpu"],
        )

    # -- report ------------------------------------------------------------------------------

    def _report(self, outboxes: list[Outbox], runs: list[Run]) -> dict[str, Any]:
        cfg = self.cfg
        small, large = outboxes[0], outboxes[-1]
        figures: dict[str, Any] = {}
        for what in (*QUERIES, "command"):
            cells = {str(o.rows): spread([r.ms for r in runs if r.what == what and r.rows == o.rows], 4) for o in outboxes}
            r = ratio((cells[str(large.rows)] or {}).get("median"), (cells[str(small.rows)] or {}).get("median"))
            figures[what] = {"ms": cells, "ratio": r, "flat": None if r is None else r <= FLAT}
        return {
            "part": 5,
            "benchmark": "growth: per-batch read cost and command latency with a small and a large outbox",
            "config": {
                "history": [o.rows_asked for o in outboxes],
                "rounds": cfg.rounds,
                "samples": cfg.growth_samples,
                "batch_size": cfg.batch_size,
                "command": f"pgbench -c 1 -T {cfg.growth_seconds} (place_order, 2 lines), average latency",
                "queries": {"batch_end": NEXT_BATCH_SQL, "batch_read": BATCH_READ_SQL, "idle_poll": IDLE_POLL_SQL,
                            "apply": APPLY_SQL + " (rolled back)", "status": STATUS_SQL, "prune_idle": PRUNE_IDLE_SQL},
                "prune": PRUNE_SQL + ", after the rounds, each projection's checkpoint at the end of the history",
                "flat_means": f"large/small <= {FLAT}",
                "before_each_round": "VACUUM (ANALYZE), no autovacuum worker running, CHECKPOINT, replica replayed",
            },
            "outboxes": [asdict(o) for o in outboxes],
            "runs": [asdict(r) for r in runs],
            "figures": figures,
            "small": small.rows,
            "large": large.rows,
        }


def _end(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT coalesce(max(o.position), 0) FROM cqrs.outbox o").fetchone()
    return int(row[0]) if row else 0


def _query_text(notice: str) -> str:
    m = re.search(r"Query Text: (.*?)(?:\n\S|\Z)", notice, re.S)
    return m.group(1) if m else ""


def _summary(plan: str) -> dict[str, Any]:
    """The scans of a plan, the shared buffers its top node touched, and the plan itself."""
    scans = []
    for m in _SCAN.finditer(plan):
        node, index, relation = m.group(1), m.group(2), m.group(3)
        if node == "Bitmap Index Scan":  # "Bitmap Index Scan on <index>"
            index = relation
        scans.append({"node": node, "index": index, "relation": relation})
    buffers = None
    found = _BUFFERS.search(plan)
    if found:
        buffers = int(found.group(1) or 0) + int(found.group(2) or 0)
    lines = [line for line in plan.splitlines() if line.strip()]
    return {
        "scans": scans,
        "seq_scan_on_outbox": any(s["node"].endswith("Seq Scan") and "outbox" in s["relation"]
                                  and DEFAULT_PARTITION not in s["relation"] for s in scans),
        "buffers": buffers,
        "plan": lines,
    }


def targets(part: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for what in ("batch_end", "batch_read", "idle_poll", "status", "prune_idle", "command"):
        f = part["figures"][what]
        out.append({
            "part": 5, "what": f"{what}, {part['large']:,} vs {part['small']:,} outbox rows (ratio)",
            "value": f["ratio"], "target": f"flat (<= {FLAT})", "met": f["flat"],
        })
    seq = any(
        p.get("seq_scan_on_outbox")
        for o in part["outboxes"] for plans in o["plans"].values() if isinstance(plans, list) for p in plans
    )
    # every scan of the outbox through an index (a plan that reads none, the idle poll's, is fine)
    indexed = all(
        all(s["index"] for s in p["scans"] if "outbox" in s["relation"] and DEFAULT_PARTITION not in s["relation"])
        for o in part["outboxes"] for plans in o["plans"].values() if isinstance(plans, list) for p in plans
    )
    out.append({"part": 5, "what": "plans on cqrs.outbox use its indexes (no Seq Scan)", "value": "yes" if indexed and not seq else "no",
                "target": "indexes only", "met": indexed and not seq})
    return out


def render(part: dict[str, Any]) -> list[str]:
    cfg = part["config"]
    small, large = str(part["small"]), str(part["large"])
    lines = [
        f"growth: ms, median (min-max) over {cfg['rounds']} round(s) of per-round medians of {cfg['samples']} runs;"
        f" batch size {cfg['batch_size']:,}",
    ]
    head = f"{'what':<12} {f'{int(small):,} rows':>28} {f'{int(large):,} rows':>28} {'ratio':>7}  verdict"
    lines += [head, "-" * len(head)]
    for what, f in part["figures"].items():
        verdict = "n/a" if f["flat"] is None else ("flat" if f["flat"] else "GROWS")
        lines.append(
            f"{what:<12} {fmt_spread(f['ms'][small], '{:.3f}'):>28} {fmt_spread(f['ms'][large], '{:.3f}'):>28}"
            f" {'n/a' if f['ratio'] is None else format(f['ratio'], '.2f'):>7}  {verdict}"
        )
    lines.append("")
    lines.append("plans (scans on cqrs.outbox; shared buffers hit+read by the statement):")
    for o in part["outboxes"]:
        for what, plans in o["plans"].items():
            if not isinstance(plans, list):
                lines.append(f"  {o['rows']:>12,} rows  {what}: {plans}")
                continue
            for p in plans:
                scans = ", ".join(
                    f"{s['node']}{' using ' + s['index'] if s['index'] else ''}" for s in p["scans"] if "outbox" in s["relation"]
                )
                lines.append(f"  {o['rows']:>12,} rows  {what:<10} {scans or 'no scan of the outbox'}; buffers {p['buffers']}")
    for pr in part.get("prune", []):
        lines.append(f"prune --keep 0s of {pr['rows']:,} rows ({pr['mb_before']:,.0f} MB): {pr['partitions']} partitions, "
                     f"{pr['events']:,} events, {pr['freed_mb']:,.0f} MB freed in {pr['seconds']:.2f}s")
    others = [r["other_cpu"] for r in part["runs"] if r.get("other_cpu") is not None]
    if others and max(others) > OTHER_CPU_WARNING:
        lines.append(f"WARNING: other processes used up to {max(others) * 100:.0f}% of the CPUs during some runs: figures disturbed")
    return lines


__all__ = ["render", "run", "targets"]
