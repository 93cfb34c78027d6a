"""Part 6: `cqrs-pg rebuild` from the write model's state beside the same rebuild from the
whole event log, for order_summary and customer_stats over a history of
`rebuild_orders` orders (generated set-based through the shop tables, so the outbox holds
their real events). Each rebuild runs cqrs_pg.rebuild.rebuild, the command's own code,
with no daemon running; runs of the two sources alternate in a shuffled order."""

from __future__ import annotations

import random
import time
from typing import Any

from cqrs_pg.db import scalar
from cqrs_pg.rebuild import rebuild
from cqrs_pg_tools.bench import generate
from cqrs_pg_tools.bench._common import Session, fmt_spread, ratio, spread
from cqrs_pg_tools.verify import all_mismatches

PROJECTIONS = ("order_summary", "customer_stats")
SOURCES = ("state", "log")
PER_CHUNK = 1000


def run(s: Session) -> dict[str, Any]:
    cfg = s.cfg
    dbname = s.clone("rebuild")
    with s.connect(dbname) as conn:
        generate.install(conn)
        chunks = max(1, cfg.rebuild_orders // PER_CHUNK)
        s.progress(f"generating {chunks * PER_CHUNK:,} orders ...")
        generate.generate(
            conn, chunks, PER_CHUNK, cfg.customers, cfg.products, steps=20,
            progress=lambda done, total, secs: s.progress(f"   {done * PER_CHUNK:,}/{total * PER_CHUNK:,} orders, {secs:.0f}s"),
        )
        conn.execute("SELECT cqrs.extend_outbox()")
        events = scalar(conn, "SELECT count(*) FROM cqrs.outbox")
        orders = scalar(conn, "SELECT count(*) FROM shop.orders")
        s.progress(f"   {orders:,} orders, {events:,} events; projecting them once ...")
        s.database(dbname).run_projections(rounds=100_000, batch_size=cfg.batch_size)
        conn.execute("VACUUM ANALYZE")
    runs: list[dict[str, Any]] = []
    order = [(rnd, p, src) for rnd in range(1, cfg.rounds + 1) for p in PROJECTIONS for src in SOURCES]
    rng = random.Random(f"{cfg.seed}-rebuild")
    for rnd in range(1, cfg.rounds + 1):
        block = [o for o in order if o[0] == rnd]
        rng.shuffle(block)
        for _, projection, source in block:
            t0 = time.monotonic()
            applied = rebuild(s.dsn(dbname), projection, cfg.batch_size, lambda _line: None, source)
            seconds = time.monotonic() - t0
            runs.append({"round": rnd, "projection": projection, "source": source, "seconds": round(seconds, 3),
                         "events_applied": applied})
            s.progress(f"round {rnd}/{cfg.rounds}  {projection} from {source}: {seconds:.2f}s")
    with s.connect(dbname) as conn:
        mismatches = all_mismatches(conn)
    s.drop(dbname)
    if any(mismatches.values()):
        raise RuntimeError(f"a rebuilt read model differs from its definition: {mismatches}")
    figures = {}
    for projection in PROJECTIONS:
        cells = {src: spread([r["seconds"] for r in runs if r["projection"] == projection and r["source"] == src])
                 for src in SOURCES}
        figures[projection] = {**cells, "state_over_log": ratio((cells["state"] or {}).get("median"),
                                                                 (cells["log"] or {}).get("median"))}
    return {
        "part": 6,
        "benchmark": "rebuild: from the write model's state beside from the whole event log",
        "config": {"orders": orders, "events": events, "rounds": cfg.rounds, "batch_size": cfg.batch_size,
                   "how": "cqrs_pg.rebuild.rebuild(..., source), no daemon running; both sources per round, shuffled"},
        "runs": runs,
        "figures": figures,
        "read_models_equal_definitions": not any(mismatches.values()),
    }


def targets(part: dict[str, Any]) -> list[dict[str, Any]]:
    """None: the rebuild times are reported beside each other, with no bound to meet."""
    return []


def render(part: dict[str, Any]) -> list[str]:
    cfg = part["config"]
    lines = [f"{cfg['orders']:,} orders, {cfg['events']:,} events; seconds per rebuild, median [min-max] of "
             f"{cfg['rounds']} rounds", f"{'projection':<16} {'from state':>24} {'from the log':>24} {'state/log':>10}"]
    for p, f in part["figures"].items():
        lines.append(f"{p:<16} {fmt_spread(f['state'], '{:,.2f}'):>24} {fmt_spread(f['log'], '{:,.2f}'):>24}"
                     f" {f['state_over_log'] if f['state_over_log'] is not None else 'n/a':>10}")
    return lines


