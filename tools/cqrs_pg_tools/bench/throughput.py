"""Part 1: command throughput, beside baselines taken in the same run.

pgbench is the load generator (Python threads would be the bottleneck). Every variant gets
a database of its own, cloned from the bench's migrated and seeded template:

    (a) plain      the same table writes as one plain SQL statement, outbox triggers dropped
    (i) plain txn  the same table writes as separate statements in one transaction (the
                   statements a command runs, without its validation, receipt or events)
    (b) outbox     shop.place_order with the outbox, the doorbell (cqrs._ring_doorbell)
                   emptied, no daemon
    (c) stopped    shop.place_order as shipped, no daemon running at all
    (d) idle       as shipped, the daemon started and asleep when the load starts
    (e) running    as shipped, the daemon started and warmed up under load first
    (f) naive      cqrs._ring_doorbell notifies in every command transaction, no daemon
    (g) poll idle  as (b), the daemon started and asleep when the load starts
    (h) poll load  as (b), the daemon started and warmed up under load first

(g) and (h) run the same daemon as (d) and (e) (`cqrs-pg listen` with its defaults), but
with the doorbell emptied it finds work only by polling (every --poll-interval while
asleep, every few ms while it lingers awake after a batch). So d/g and e/h are the cost of
the wake-up mechanism alone, the daemon's own CPU (it competes with the server for the
cores) being on both sides; d/b and e/b include that CPU, g/b and h/b are that CPU alone.

Each run also records the WAL the cluster wrote during it (pg_current_wal_insert_lsn
before and after), per transaction: with fsync on, WAL is what group commit pays for. For
the variants without a daemon it is the commands' own; with one, the daemon's writes are
in it too.

Variants that need different SQL get it in their own database at run time (another body
for cqrs._ring_doorbell, or the capture triggers dropped): sql/ and migrations/ stay
untouched.

Rounds are interleaved (each round runs every variant once at each client count, in an
order shuffled anew each time), so slow drift of the machine and the aftermath of a heavy
neighbour spread over all variants; before each run the variant's database is vacuumed,
autovacuum is let finish and a checkpoint is taken. Figures are medians over rounds with
their min-max spread; ratios compare medians of the same run. CPU time of the daemon (its
process and its server backends) and of processes foreign to the bench is recorded per run.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from cqrs_pg.daemon import CHANNEL
from cqrs_pg.db import scalar
from cqrs_pg_tools.bench._common import (
    OTHER_CPU_WARNING,
    BenchError,
    Daemon,
    DaemonCpu,
    Session,
    busy_fraction,
    machine_cpu,
    other_fraction,
    parse_pgbench,
)

__all__ = ["COMMAND_SCRIPT", "PLAIN_SCRIPT", "PLAIN_TXN_SCRIPT", "RATIOS", "VARIANTS", "doorbell_variant", "parse_pgbench", "render", "run"]


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    script: str  # "plain" | "plain_txn" | "command"
    capture: str  # "dropped" | "no_doorbell" | "as_is" | "always_notify"
    daemon: str  # "stopped" | "idle" | "running"


VARIANTS: tuple[Variant, ...] = (
    Variant("a", "plain SQL, no triggers", "plain", "dropped", "stopped"),
    Variant("i", "plain SQL statements in one transaction, no triggers", "plain_txn", "dropped", "stopped"),
    Variant("b", "outbox, no wake-up, daemon stopped", "command", "no_doorbell", "stopped"),
    Variant("c", "outbox + wake-up, daemon stopped", "command", "as_is", "stopped"),
    Variant("d", "outbox + wake-up, daemon idle at start", "command", "as_is", "idle"),
    Variant("e", "outbox + wake-up, daemon under load", "command", "as_is", "running"),
    Variant("f", "naive: NOTIFY in every command", "command", "always_notify", "stopped"),
    Variant("g", "outbox, no wake-up, daemon idle at start (polling)", "command", "no_doorbell", "idle"),
    Variant("h", "outbox, no wake-up, daemon under load (polling)", "command", "no_doorbell", "running"),
)
BY_KEY = {v.key: v for v in VARIANTS}

# (numerator, denominator, target or None, what it says), compared at the largest client count.
# The wake-up's cost compares variants that differ in the doorbell only: c/b (no daemon on
# either side), d/g and e/h (the same daemon on both sides, woken by the doorbell or polling).
_DAEMON_CPU = "includes the daemon's own CPU"
RATIOS: tuple[tuple[str, str, float | None, str], ...] = (
    ("c", "b", 0.95, "wake-up vs no wake-up, no daemon on either side"),
    ("d", "g", 0.95, "wake-up vs polling, the same daemon idle at start"),
    ("e", "h", 0.95, "wake-up vs polling, the same daemon under load"),
    ("c", "a", 0.80, "command, daemon stopped vs plain SQL"),
    ("d", "a", 0.80, f"command, daemon idle at start vs plain SQL ({_DAEMON_CPU})"),
    ("e", "a", 0.80, f"command, daemon under load vs plain SQL ({_DAEMON_CPU})"),
    ("d", "b", None, f"wake-up + daemon idle at start vs no wake-up, no daemon ({_DAEMON_CPU})"),
    ("e", "b", None, f"wake-up + daemon under load vs no wake-up, no daemon ({_DAEMON_CPU})"),
    ("g", "b", None, "polling daemon idle at start vs no daemon: the daemon's own cost"),
    ("h", "b", None, "polling daemon under load vs no daemon: the daemon's own cost"),
    ("b", "a", None, "outbox (no wake-up) vs plain SQL"),
    ("c", "i", None, "command, daemon stopped vs the same statements in one transaction"),
    ("f", "b", None, "naive NOTIFY-per-command vs no wake-up"),
)


# -- pgbench scripts -----------------------------------------------------------------------
# Two distinct products per order (p2 = p1 shifted by 1..n-1, both uniform), quantity 1 each.
# Ids are md5-derived from the seed numbers, so scripts need no lookup table.

_PICK = """\
\\set c random(1, {customers})
\\set p1 random(1, {products})
\\set d random(1, {products} - 1)
\\set p2 1 + (:p1 - 1 + :d) % {products}
"""

COMMAND_SCRIPT = _PICK + """\
SELECT * FROM shop.place_order(
    gen_random_uuid(),
    md5('c' || (:c)::text)::uuid,
    jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (:p1)::text, 'quantity', 1),
                      jsonb_build_object('sku', 'SKU-' || (:p2)::text, 'quantity', 1)));
"""

# The same writes as place_order, in one statement (one round trip and one transaction, as
# the command): lock both products in id order, take their stock, insert the order and its
# two lines at the captured prices. No validation, no cqrs.commands row, no outbox.
PLAIN_SCRIPT = _PICK + """\
WITH locked AS (
    SELECT p.id FROM shop.products p
     WHERE p.sku IN ('SKU-' || (:p1)::text, 'SKU-' || (:p2)::text)
     ORDER BY p.id FOR NO KEY UPDATE),
taken AS (
    UPDATE shop.products p SET stock = p.stock - 1, version = p.version + 1
      FROM locked WHERE p.id = locked.id
    RETURNING p.id, p.sku, p.price_cents),
placed AS (
    INSERT INTO shop.orders (id, customer_id, status)
    VALUES (gen_random_uuid(), md5('c' || (:c)::text)::uuid, 'placed')
    RETURNING id)
INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents)
SELECT placed.id, row_number() OVER (ORDER BY taken.sku <> 'SKU-' || (:p1)::text), taken.id, 1, taken.price_cents
  FROM placed CROSS JOIN taken;
"""

# The same writes as separate statements in one transaction, as a command's body runs
# them (several round trips; the order's id taken first, \gset).
PLAIN_TXN_SCRIPT = _PICK + """\
BEGIN;
SELECT gen_random_uuid() AS order_id \\gset
SELECT p.id FROM shop.products p
 WHERE p.sku IN ('SKU-' || (:p1)::text, 'SKU-' || (:p2)::text) ORDER BY p.id FOR NO KEY UPDATE;
UPDATE shop.products p SET stock = p.stock - 1, version = p.version + 1
 WHERE p.sku IN ('SKU-' || (:p1)::text, 'SKU-' || (:p2)::text);
INSERT INTO shop.orders (id, customer_id, status) VALUES (:order_id::uuid, md5('c' || (:c)::text)::uuid, 'placed');
INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents)
SELECT :order_id::uuid, CASE WHEN p.sku = 'SKU-' || (:p1)::text THEN 1 ELSE 2 END, p.id, 1, p.price_cents
  FROM shop.products p WHERE p.sku IN ('SKU-' || (:p1)::text, 'SKU-' || (:p2)::text);
COMMIT;
"""

# The doorbell: every generated capture function (cqrs.capture_changes) calls
# cqrs._ring_doorbell() after its INSERT. Variants give it another body.
_DOORBELL_BODIES = {
    "no_doorbell": "    NULL;  -- cqrs-pg bench: no doorbell",
    "always_notify": "    PERFORM pg_notify('cqrs_outbox', '');  -- cqrs-pg bench: in every transaction",
}
_CAPTURE_TRIGGERS = (
    "SELECT t.tgname, t.tgrelid::regclass::text FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
    " WHERE p.pronamespace = 'cqrs'::regnamespace AND p.proname LIKE '\\_capture\\_%' AND NOT t.tgisinternal"
)


def doorbell_variant(capture: str) -> str:
    """CREATE OR REPLACE of cqrs._ring_doorbell for a variant.

    no_doorbell: does nothing. always_notify: notifies, unconditionally.
    """
    if capture not in _DOORBELL_BODIES:
        raise ValueError(capture)
    return (
        "CREATE OR REPLACE FUNCTION cqrs._ring_doorbell() RETURNS void LANGUAGE plpgsql"
        " SET search_path = pg_catalog, pg_temp AS $$\nBEGIN\n" + _DOORBELL_BODIES[capture] + "\nEND\n$$"
    )


def shape_variant(conn: psycopg.Connection, v: Variant) -> None:
    """Give a variant's database the SQL it needs (only in that throwaway database)."""
    if v.capture == "dropped":
        for name, table in conn.execute(_CAPTURE_TRIGGERS).fetchall():
            conn.execute(f'DROP TRIGGER "{name}" ON {table}')
    elif v.capture in ("no_doorbell", "always_notify"):
        conn.execute(doorbell_variant(v.capture))
    # Check that each database does what its label says.
    src = scalar(conn, "SELECT prosrc FROM pg_proc WHERE oid = 'cqrs._ring_doorbell()'::regprocedure")
    triggers = len(conn.execute(_CAPTURE_TRIGGERS).fetchall())
    notifies = "pg_notify" in src
    conditional = "cqrs.listeners" in src
    expected = {
        "dropped": triggers == 0,
        "no_doorbell": triggers > 0 and not notifies,
        "as_is": triggers > 0 and notifies and conditional,
        "always_notify": triggers > 0 and notifies and not conditional,
    }[v.capture]
    if not expected:
        raise BenchError(f"variant ({v.key}) {v.label}: its database was not shaped as intended")


# -- results ---------------------------------------------------------------------------------


@dataclass
class Run:
    round: int
    variant: str
    clients: int
    seconds: int
    tps: float
    transactions: int
    failed: int
    latency_ms: float | None
    started_at: str
    warmup_transactions: int = 0
    events_written: int | None = None  # outbox rows the measured run added
    daemon_cpu_seconds: float | None = None  # the `cqrs-pg listen` process, during the measured run
    daemon_backend_cpu_seconds: float | None = None  # its server backends (run_projection runs there)
    daemon_projected_events: int | None = None  # events applied during the run by the projection that applied fewest
    daemon_projected_by_projection: dict[str, int] | None = None  # applied_events added, per projection
    daemon_sleeping_at_start: bool | None = None
    machine_cpu_busy: float | None = None  # share of all CPUs busy during the measured run (all processes)
    # Share of all CPUs used by processes that are not the bench's (its servers, pgbench,
    # the daemon, itself) during the measured run: another workload disturbing the figures.
    other_cpu: float | None = None
    # Doorbell notifications sent by the measured run's commands: how many of its
    # transactions took NOTIFY's commit lock (counted by a connection listening on the channel).
    notifications: int | None = None
    # WAL the cluster wrote during the measured run (the daemon's too, when one runs)
    wal_bytes: int | None = None


# -- the part ------------------------------------------------------------------------------


def run(session: Session) -> dict[str, Any]:
    return _Throughput(session).run()


class _Throughput:
    def __init__(self, session: Session) -> None:
        self.s = session
        self.cfg = session.cfg
        self.progress = session.progress
        self.names: dict[str, str] = {}  # variant key -> database
        wanted = self.cfg.variants  # known keys: run_bench checks them before any server starts
        self.variants = [v for v in VARIANTS if wanted is None or v.key in wanted]

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        for v in self.variants:
            self.names[v.key] = self.s.clone(f"tp_{v.key}")
            with self.s.connect(self.names[v.key]) as conn:
                shape_variant(conn, v)
        self.progress(f"databases: {', '.join(f'({k}) {n}' for k, n in self.names.items())}")
        runs = self._run_rounds()
        rows = self._count_rows(runs)
        for name in self.names.values():
            self.s.drop(name)
        return self._report(runs, rows, time.monotonic() - started)

    def _run_rounds(self) -> list[Run]:
        cfg = self.cfg
        scripts = {
            "command": self.s.script("command", COMMAND_SCRIPT),
            "plain": self.s.script("plain", PLAIN_SCRIPT),
            "plain_txn": self.s.script("plain_txn", PLAIN_TXN_SCRIPT),
        }
        # A fresh random order of the variants for each round and client count (seeded, so a
        # run can be repeated): no variant always follows the same neighbour.
        rng = random.Random(cfg.seed)
        plan = []
        for r in range(cfg.rounds):
            for clients in cfg.clients:
                order = list(self.variants)
                rng.shuffle(order)
                for v in order:
                    plan.append((r + 1, clients, v))
        per_run = cfg.seconds + 3
        eta = len(plan) * per_run + cfg.rounds * len(cfg.clients) * cfg.warmup
        self.progress(
            f"{len(plan)} runs: {len(self.variants)} variants x clients {','.join(map(str, cfg.clients))} x "
            f"{cfg.rounds} round(s) of {cfg.seconds}s (about {eta / 60:.1f} min)"
        )
        runs: list[Run] = []
        width = max(len(v.label) for v in self.variants)
        t0 = time.monotonic()
        for i, (rnd, clients, v) in enumerate(plan, 1):
            run = self._one_run(rnd, clients, v, scripts[v.script])
            runs.append(run)
            elapsed = time.monotonic() - t0
            left = elapsed / i * (len(plan) - i)
            extra = ""
            if run.daemon_cpu_seconds is not None:
                extra = f"  daemon CPU {run.daemon_cpu_seconds:.2f}s"
                if run.daemon_backend_cpu_seconds is not None:
                    extra += f" + backend {run.daemon_backend_cpu_seconds:.2f}s"
                if run.daemon_projected_events is not None:
                    extra += f", slowest projection applied {run.daemon_projected_events:,} of {run.events_written or 0:,} new events"
            failed = f"  FAILED {run.failed}" if run.failed else ""
            if run.other_cpu is not None and run.other_cpu > OTHER_CPU_WARNING:
                extra += f"  [other processes used {run.other_cpu * 100:.0f}% of the CPUs]"
            self.progress(
                f"[{i:>{len(str(len(plan)))}}/{len(plan)}] round {rnd}/{cfg.rounds}  {clients:>2} client{'s' if clients != 1 else ' '}  "
                f"({v.key}) {v.label:<{width}} {run.tps:>9,.0f} tx/s{failed}{extra}  (~{left / 60:.1f} min left)"
            )
        return runs

    def _one_run(self, rnd: int, clients: int, v: Variant, script: Path) -> Run:
        cfg = self.cfg
        dbname = self.names[v.key]
        dsn = self.s.dsn(dbname)
        self.s.settle(dsn)
        daemon: Daemon | None = None
        warmup = 0
        sleeping_at_start: bool | None = None
        try:
            with self.s.connect(dbname) as conn:
                # A daemon of an earlier run that did not say goodbye: "stopped" must mean no rows.
                conn.execute("DELETE FROM cqrs.listeners")
                if v.daemon != "stopped":
                    daemon = self.s.start_daemon(dbname, f"listen-{v.key}.log", "--log-level", "warning")
                    if v.daemon == "idle":
                        self.s.wait_asleep(conn, daemon)
                    else:
                        # Caught up first (asleep), then a warm-up load wakes it: the measured
                        # run starts with the daemon awake and busy, not draining old backlog.
                        self.s.wait_asleep(conn, daemon, "catch up")
                        warmup = self.s.pgbench(dsn, script, clients, cfg.warmup).transactions
                    sleeping_at_start = bool(scalar(conn, "SELECT count(*) FROM cqrs.listeners WHERE sleeping"))
                daemon_cpu = DaemonCpu(self.s, conn, daemon) if daemon is not None else None
                before = _positions(conn)
            started_at = datetime.now(UTC).isoformat(timespec="seconds")
            with NotifyCounter(self.s.connect(dbname)) as counter, self.s.connect(dbname) as wal:
                wal0 = scalar(wal, "SELECT pg_current_wal_insert_lsn()::text")
                busy0, ours0 = machine_cpu(), self.s.own_cpu()
                result = self.s.pgbench(dsn, script, clients, cfg.seconds)
                busy1, ours1 = machine_cpu(), self.s.own_cpu()
                wal_bytes = int(scalar(wal, "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)", (wal0,)))
            proc_cpu, backend_cpu = daemon_cpu.result() if daemon_cpu is not None else (None, None)
            with self.s.connect(dbname) as conn:
                after = _positions(conn)
            projected = {name: n - before[1].get(name, 0) for name, n in after[1].items()}
            if daemon is not None and not daemon.alive():
                raise BenchError(f"the daemon of variant ({v.key}) exited during the run: see {daemon.log}")
        finally:
            if daemon is not None:
                self.s.stop_daemon(daemon)
        return Run(
            round=rnd,
            variant=v.key,
            clients=clients,
            seconds=cfg.seconds,
            tps=result.tps,
            transactions=result.transactions,
            failed=result.failed,
            latency_ms=result.latency_ms,
            started_at=started_at,
            warmup_transactions=warmup,
            events_written=after[0] - before[0],
            daemon_cpu_seconds=proc_cpu,
            daemon_backend_cpu_seconds=backend_cpu,
            daemon_projected_events=None if daemon is None else min(projected.values(), default=0),
            daemon_projected_by_projection=None if daemon is None else projected,
            daemon_sleeping_at_start=sleeping_at_start,
            machine_cpu_busy=busy_fraction(busy0, busy1),
            other_cpu=other_fraction(busy0, busy1, ours0, ours1, 0.0 if proc_cpu is not None else None, proc_cpu),
            notifications=counter.count,
            wal_bytes=wal_bytes,
        )

    def _count_rows(self, runs: list[Run]) -> dict[str, dict[str, int]]:
        rows: dict[str, dict[str, int]] = {}
        for v in self.variants:
            with self.s.connect(self.names[v.key]) as conn:
                r = conn.execute(
                    "SELECT (SELECT count(*) FROM shop.orders), (SELECT count(*) FROM shop.order_lines),"
                    " (SELECT count(*) FROM cqrs.commands), (SELECT count(*) FROM cqrs.outbox)"
                ).fetchone()
            assert r is not None
            mine = [x for x in runs if x.variant == v.key]
            rows[v.key] = {
                "orders": r[0],
                "order_lines": r[1],
                "commands": r[2],
                "outbox_events": r[3] - self.s.seed_events,  # events the bench's commands wrote
                "transactions": sum(x.transactions + x.warmup_transactions for x in mine),
            }
        return rows

    def _report(self, runs: list[Run], rows: dict[str, dict[str, int]], elapsed: float) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "part": 1,
            "benchmark": "command throughput: shop.place_order with 2 lines",
            "config": {
                "seconds": cfg.seconds,
                "rounds": cfg.rounds,
                "clients": list(cfg.clients),
                "warmup_seconds": cfg.warmup,
                "customers": cfg.customers,
                "products": cfg.products,
                "pgbench": "-n -M prepared -c N -j min(2,N) -T seconds",
                "order": f"variants shuffled per round and client count, seed {cfg.seed}",
                "before_each_run": "VACUUM (ANALYZE) of the variant's database, no autovacuum worker running, "
                "CHECKPOINT, replica replayed up to the primary",
                "daemon": "cqrs-pg listen with its defaults (--log-level warning), started for "
                + ", ".join(f"({v.key})" for v in self.variants if v.daemon != "stopped") + " runs only",
            },
            "variants": {v.key: {"label": v.label, "capture": v.capture, "daemon": v.daemon, "script": v.script} for v in self.variants},
            "scripts": {
                "command": COMMAND_SCRIPT.format(customers=cfg.customers, products=cfg.products),
                "plain": PLAIN_SCRIPT.format(customers=cfg.customers, products=cfg.products),
                "plain_txn": PLAIN_TXN_SCRIPT.format(customers=cfg.customers, products=cfg.products),
            },
            "runs": [asdict(r) for r in runs],
            "medians": medians(runs),
            "daemon_cpu": daemon_cpu(runs),
            "ratios": ratios(runs, max(cfg.clients)),
            "rows": rows,
            "elapsed_seconds": round(elapsed, 1),
        }


class NotifyCounter:
    """Counts the notifications on the doorbell's channel while in use: one per notifying
    transaction (PostgreSQL folds a transaction's identical notifications into one). The
    count is final on exit, once the channel has been quiet for QUIET seconds."""

    QUIET = 0.5

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="notify-counter", daemon=True)

    def __enter__(self) -> NotifyCounter:
        self.conn.execute(f"LISTEN {CHANNEL}")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.conn.close()

    def _listen(self) -> None:
        while True:
            got = sum(1 for _ in self.conn.notifies(timeout=self.QUIET if self._stop.is_set() else 0.1))
            self.count += got
            if self._stop.is_set() and not got:
                return


def _positions(conn: psycopg.Connection) -> tuple[int, dict[str, int]]:
    """The outbox's last position, and applied_events per projection."""
    row = conn.execute("SELECT coalesce(max(position), 0) FROM cqrs.outbox").fetchone()
    assert row is not None
    applied = {name: int(n) for name, n in conn.execute("SELECT name, applied_events FROM cqrs.projections")}
    return int(row[0]), applied


# -- figures ------------------------------------------------------------------------------------


def medians(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> str(clients) -> {median, min, max, runs}: tps over rounds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        cell = out.setdefault(r.variant, {}).setdefault(
            str(r.clients), {"tps": [], "busy": [], "latency": [], "notifications": [], "transactions": [], "wal": []}
        )
        if r.wal_bytes is not None and r.transactions:
            cell["wal"].append(r.wal_bytes / r.transactions)
        cell["tps"].append(r.tps)
        if r.notifications is not None:
            cell["notifications"].append(r.notifications)
            cell["transactions"].append(r.transactions)
        if r.machine_cpu_busy is not None:
            cell["busy"].append(r.machine_cpu_busy)
        if r.latency_ms is not None:
            cell["latency"].append(r.latency_ms)
    for per_variant in out.values():
        for key, cell in per_variant.items():
            values = cell["tps"]
            per_variant[key] = {
                "median": round(statistics.median(values), 1),
                "min": round(min(values), 1),
                "max": round(max(values), 1),
                "runs": len(values),
                "latency_ms_median": round(statistics.median(cell["latency"]), 3) if cell["latency"] else None,
                "machine_cpu_busy_median": round(statistics.median(cell["busy"]), 3) if cell["busy"] else None,
                # notifying transactions / all transactions of the measured runs, summed over rounds
                "notifications": sum(cell["notifications"]) if cell["notifications"] else None,
                "notifications_of": sum(cell["transactions"]) if cell["notifications"] else None,
                # WAL bytes per transaction of the measured runs (the daemon's writes included)
                "wal_bytes_per_transaction": round(statistics.median(cell["wal"])) if cell["wal"] else None,
            }
    return out


def daemon_cpu(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> str(clients) -> median CPU seconds of the daemon process and its backend per run
    (the variants that run a daemon, in the order of VARIANTS)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in [v.key for v in VARIANTS if v.daemon != "stopped"]:
        for clients in sorted({r.clients for r in runs}):
            mine = [r for r in runs if r.variant == key and r.clients == clients]
            proc = [r.daemon_cpu_seconds for r in mine if r.daemon_cpu_seconds is not None]
            backend = [r.daemon_backend_cpu_seconds for r in mine if r.daemon_backend_cpu_seconds is not None]
            if not mine:
                continue
            out.setdefault(key, {})[str(clients)] = {
                "process_seconds": round(statistics.median(proc), 3) if proc else None,
                "backend_seconds": round(statistics.median(backend), 3) if backend else None,
                "run_seconds": mine[0].seconds,
                "projected_events": statistics.median([r.daemon_projected_events or 0 for r in mine]),
                "events_written": statistics.median([r.events_written or 0 for r in mine]),
            }
    return out


def ratios(runs: list[Run], clients: int) -> dict[str, Any]:
    """Ratios of median tps at `clients`, with the range of the per-round (paired) ratios."""
    tps: dict[str, dict[int, float]] = {}
    for r in runs:
        if r.clients == clients:
            tps.setdefault(r.variant, {})[r.round] = r.tps
    out: dict[str, Any] = {"clients": clients}
    for num, den, target, what in RATIOS:
        if num not in tps or den not in tps:
            continue
        value = statistics.median(tps[num].values()) / statistics.median(tps[den].values())
        paired = [tps[num][k] / tps[den][k] for k in tps[num] if k in tps[den] and tps[den][k]]
        out[f"{num}/{den}"] = {
            "value": round(value, 3),
            "per_round_min": round(min(paired), 3) if paired else None,
            "per_round_max": round(max(paired), 3) if paired else None,
            "target": target,
            "met": None if target is None else value >= target,
            "what": what,
        }
    return out


def targets(part: dict[str, Any]) -> list[dict[str, Any]]:
    rat = part["ratios"]
    return [
        {"part": 1, "what": f"{name} at {rat['clients']} clients: {r['what']}", "value": r["value"],
         "target": f">= {r['target']:.2f}", "met": r["met"]}
        for name, r in rat.items() if name != "clients" and r["target"] is not None
    ]


def render(report: dict[str, Any]) -> list[str]:
    cfg = report["config"]
    clients = cfg["clients"]
    lines = [
        f"command throughput: shop.place_order, 2 lines; median tx/s (min-max) over {cfg['rounds']} "
        f"interleaved round(s) of {cfg['seconds']}s, pgbench -M prepared",
    ]
    width = 22
    label_width = max(42, *(len(meta["label"]) for meta in report["variants"].values()))
    head = f"{'variant':<{label_width + 4}}" + "".join(f"{f'{c} client' + ('s' if c != 1 else ''):>{width}}" for c in clients)
    lines += [head, "-" * len(head)]
    for key, meta in report["variants"].items():
        cells = report["medians"].get(key, {})
        row = f"({key}) {meta['label']:<{label_width}}"
        for c in clients:
            cell = cells.get(str(c))
            text = "" if cell is None else f"{cell['median']:,.0f} ({cell['min']:,.0f}-{cell['max']:,.0f})"
            row += f"{text:>{width}}"
        lines.append(row)
    lines.append("")
    lines.append("machine CPU busy during the run, all processes (median): " + "; ".join(
        f"({key}) " + "/".join(
            "n/a" if (cell := report["medians"].get(key, {}).get(str(c))) is None or cell["machine_cpu_busy_median"] is None
            else f"{cell['machine_cpu_busy_median'] * 100:.0f}%"
            for c in clients
        )
        for key in report["variants"]
    ) + f"  (at {'/'.join(map(str, clients))} clients)")
    lines.append(
        "doorbell notifications (transactions that took NOTIFY's commit lock) / transactions, all rounds: " + "; ".join(
            f"({key}) " + "/".join(
                "n/a" if (cell := report["medians"].get(key, {}).get(str(c))) is None or cell.get("notifications") is None
                else f"{cell['notifications']:,} of {cell['notifications_of']:,}"
                for c in clients
            )
            for key in report["variants"]
        ) + f"  (at {'/'.join(map(str, clients))} clients)"
    )
    lines.append(
        "WAL bytes per transaction (median; with a daemon running, its writes too): " + "; ".join(
            f"({key}) " + "/".join(
                "n/a" if (cell := report["medians"].get(key, {}).get(str(c))) is None
                or cell.get("wal_bytes_per_transaction") is None
                else f"{cell['wal_bytes_per_transaction']:,}"
                for c in clients
            )
            for key in report["variants"]
        ) + f"  (at {'/'.join(map(str, clients))} clients)"
    )
    others = [r["other_cpu"] for r in report["runs"] if r.get("other_cpu") is not None]
    if others:
        worst = max(report["runs"], key=lambda r: r.get("other_cpu") or 0.0)
        lines.append(
            f"CPU used by other processes on this machine during the runs: median {max(0.0, statistics.median(others)) * 100:.0f}%,"
            f" max {max(0.0, worst['other_cpu']) * 100:.0f}% of all CPUs"
            f" (round {worst['round']}, ({worst['variant']}) at {worst['clients']} clients)"
        )
        if worst["other_cpu"] > OTHER_CPU_WARNING:
            lines.append(
                "WARNING: another workload shared the CPUs during some runs (other_cpu in the JSON):"
                " those figures are disturbed; run again on a quiet machine"
            )
    cpu = report.get("daemon_cpu") or {}
    if cpu:
        lines.append("")
        lines.append(f"daemon CPU seconds per {cfg['seconds']}s run (median): process + its server backends;"
                     " new events the slowest projection applied during the run / events written")
        for key, per in cpu.items():
            parts = []
            for c in clients:
                cell = per.get(str(c))
                if cell is None:
                    continue
                proc = "n/a" if cell["process_seconds"] is None else f"{cell['process_seconds']:.2f}"
                backend = "n/a" if cell["backend_seconds"] is None else f"{cell['backend_seconds']:.2f}"
                parts.append(f"{c} cl: {proc} + {backend} s, {cell['projected_events']:,.0f}/{cell['events_written']:,.0f}")
            lines.append(f"  ({key}) {report['variants'][key]['label']:<{label_width}} " + "; ".join(parts))
    rat = report["ratios"]
    lines.append("")
    lines.append(f"ratios of medians at {rat['clients']} clients (range of per-round ratios):")
    named = [(name, r) for name, r in rat.items() if name != "clients"]
    # The ratios with a target first, then those given for reference.
    groups = (
        ("with a target:", [(n, r) for n, r in named if r["target"] is not None]),
        ("for reference (no target):", [(n, r) for n, r in named if r["target"] is None]),
    )
    for title, group in groups:
        if not group:
            continue
        lines.append(f"  {title}")
        for name, r in group:
            target = ""
            if r["target"] is not None:
                target = f"  target >= {r['target']:.2f}: {'met' if r['met'] else 'NOT MET'}"
            spread = ""
            if r["per_round_min"] is not None:
                spread = f" ({r['per_round_min']:.3f}-{r['per_round_max']:.3f})"
            lines.append(f"    {name}  {r['value']:.3f}{spread:<16} {r['what']}{target}")
    rows = report["rows"]
    lines.append("")
    lines.append(
        "rows written: " + "; ".join(f"({k}) {v['orders']:,} orders, {v['outbox_events']:,} events" for k, v in rows.items())
    )
    return lines
