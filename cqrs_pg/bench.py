"""`cqrs-pg bench`, part 1: command throughput, beside baselines taken in the same run.

pgbench is the load generator (Python threads would be the bottleneck). Every variant gets
a database of its own, cloned from one migrated and seeded template, in one throwaway
primary + streaming replica started here (or on a server given with --dsn):

    (a) plain      the same table writes as one plain SQL statement, outbox triggers dropped
    (b) outbox     shop.place_order with the outbox, the doorbell removed from
                   cqrs.tg_capture, no daemon
    (c) stopped    shop.place_order as shipped, no daemon running at all
    (d) idle       as shipped, the daemon started and asleep when the load starts
    (e) running    as shipped, the daemon started and warmed up under load first
    (f) naive      cqrs.tg_capture notifies in every command transaction, no daemon

Variants that need different SQL get it in their own database at run time, derived from
pg_get_functiondef of the installed cqrs.tg_capture: sql/ and migrations/ stay untouched.

Rounds are interleaved (each round runs every variant once at each client count, in an
order shuffled anew each time), so slow drift of the machine and the aftermath of a heavy
neighbour spread over all variants; before each run the variant's database is vacuumed,
autovacuum is let finish and a checkpoint is taken. Figures are medians over rounds with
their min-max spread; ratios compare medians of the same run. CPU time of the daemon (its
process and its server backend) and of processes foreign to the bench is recorded per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cqrs_pg import __version__
from cqrs_pg.chaos import DaemonProcess
from cqrs_pg.db import connect, redact
from cqrs_pg.devcluster import DevCluster, find_bindir
from cqrs_pg.errors import CqrsPgError

__all__ = ["BenchConfig", "BenchError", "VARIANTS", "RATIOS", "run_bench"]

Echo = Callable[[str], None]


class BenchError(CqrsPgError):
    """The benchmark could not run (pgbench failed, a daemon did not start, ...)."""


class _Daemon(DaemonProcess):
    """`python -m cqrs_pg listen` from this very package, whatever the cwd or the install."""

    def start(self) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cqrs_pg", "listen", "--dsn", self.dsn, *self.args],
                stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
            )
        self.starts += 1


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    script: str  # "plain" | "command"
    capture: str  # "dropped" | "no_doorbell" | "as_is" | "always_notify"
    daemon: str  # "stopped" | "idle" | "running"


VARIANTS: tuple[Variant, ...] = (
    Variant("a", "plain SQL, no triggers", "plain", "dropped", "stopped"),
    Variant("b", "outbox, no wake-up, daemon stopped", "command", "no_doorbell", "stopped"),
    Variant("c", "outbox + wake-up, daemon stopped", "command", "as_is", "stopped"),
    Variant("d", "outbox + wake-up, daemon idle at start", "command", "as_is", "idle"),
    Variant("e", "outbox + wake-up, daemon under load", "command", "as_is", "running"),
    Variant("f", "naive: NOTIFY in every command", "command", "always_notify", "stopped"),
)
BY_KEY = {v.key: v for v in VARIANTS}

# (numerator, denominator, target or None, what it says), compared at the largest client count.
RATIOS: tuple[tuple[str, str, float | None, str], ...] = (
    ("c", "b", 0.95, "wake-up, daemon stopped vs no wake-up"),
    ("d", "b", 0.95, "wake-up, daemon idle at start vs no wake-up"),
    ("e", "b", 0.95, "wake-up, daemon under load vs no wake-up"),
    ("b", "a", None, "outbox (no wake-up) vs plain SQL"),
    ("c", "a", 0.80, "command, daemon stopped vs plain SQL"),
    ("d", "a", 0.80, "command, daemon idle at start vs plain SQL"),
    ("e", "a", 0.80, "command, daemon under load vs plain SQL"),
    ("f", "b", None, "naive NOTIFY-per-command vs no wake-up"),
)


@dataclass
class BenchConfig:
    seconds: int = 10  # per measured run (pgbench -T takes whole seconds)
    rounds: int = 3
    clients: tuple[int, ...] = (1, 4, 16)
    warmup: int = 3  # seconds of load before (e)'s measured run
    customers: int = 10_000
    products: int = 10_000
    stock: int = 1_000_000_000  # per product: nothing is ever refused
    dsn: str | None = None  # a server to use instead of a throwaway cluster
    daemon_wait: float = 300.0  # for a daemon to register / fall asleep
    seed: int = 1  # of the run order

    @classmethod
    def quick(cls, dsn: str | None = None) -> BenchConfig:
        """One round of 1-second runs at 1 and 4 clients: proves the bench works, measures nothing."""
        return cls(seconds=1, rounds=1, clients=(1, 4), warmup=1, customers=2_000, products=2_000, dsn=dsn)


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

SEED_SQL = (
    "INSERT INTO shop.customers (id, email, name)"
    " SELECT md5('c' || i)::uuid, 'c' || i || '@bench.example', 'Customer ' || i FROM generate_series(1, %(customers)s) i",
    "INSERT INTO shop.products (id, sku, name, price_cents, stock)"
    " SELECT md5('p' || i)::uuid, 'SKU-' || i, 'Product ' || i, 100 + i %% 900, %(stock)s FROM generate_series(1, %(products)s) i",
)

# The doorbell in cqrs.tg_capture: IF EXISTS (<a sleeping listener>) THEN PERFORM pg_notify(...); END IF;
_DOORBELL = re.compile(
    r"IF\s+EXISTS\s*\(.*?\)\s+THEN\s+(PERFORM\s+pg_notify\s*\(.*?\)\s*;)\s*END\s+IF\s*;",
    re.IGNORECASE | re.DOTALL,
)


def capture_function_variant(definition: str, capture: str) -> str:
    """pg_get_functiondef text of cqrs.tg_capture, rewritten for a variant.

    no_doorbell: the IF EXISTS ... pg_notify ... END IF block removed.
    always_notify: the block replaced by its PERFORM pg_notify(...), unconditional.
    """
    matches = list(_DOORBELL.finditer(definition))
    if len(matches) != 1:
        raise BenchError(
            f"found {len(matches)} doorbell blocks (IF EXISTS (...) THEN PERFORM pg_notify(...); END IF;) "
            "in cqrs.tg_capture, expected 1: the function changed; update cqrs_pg/bench.py to match"
        )
    m = matches[0]
    if capture == "no_doorbell":
        replacement = "-- doorbell removed by cqrs-pg bench"
    elif capture == "always_notify":
        replacement = "-- cqrs-pg bench: notify in every transaction\n    " + m.group(1)
    else:
        raise ValueError(capture)
    return definition[: m.start()] + replacement + definition[m.end() :]


# -- results ---------------------------------------------------------------------------------


@dataclass
class PgbenchResult:
    tps: float
    transactions: int
    failed: int
    latency_ms: float | None


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
    daemon_backend_cpu_seconds: float | None = None  # its server backend (run_projection runs there)
    daemon_projected_events: int | None = None  # events applied during the run by the projection that applied fewest
    daemon_projected_by_projection: dict[str, int] | None = None  # applied_events added, per projection
    daemon_sleeping_at_start: bool | None = None
    machine_cpu_busy: float | None = None  # share of all CPUs busy during the measured run (all processes)
    # Share of all CPUs used by processes that are not the bench's (its servers, pgbench,
    # the daemon, itself) during the measured run: another workload disturbing the figures.
    other_cpu: float | None = None


@dataclass
class Databases:
    names: dict[str, str] = field(default_factory=dict)  # variant key -> database
    seed_events: int = 0


# -- the benchmark -------------------------------------------------------------------------


def run_bench(
    config: BenchConfig, echo: Echo, json_path: Path | None = None, command: str | None = None
) -> dict[str, Any]:
    """Run the command-throughput benchmark; prints progress and a table, returns the report."""
    bench = _Bench(config, echo)
    report = bench.run()
    report["command"] = command
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        echo(f"wrote {json_path}")
    return report


class _Bench:
    def __init__(self, config: BenchConfig, echo: Echo) -> None:
        self.cfg = config
        self.echo = echo
        self.tag = uuid.uuid4().hex[:6]
        self.cluster: DevCluster | None = None
        self.root: Path | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="cqrs-pg-bench-"))
        self.admin_dsn = ""
        self.dbs = Databases()
        self.template = ""
        self.pgbench = ""
        self.daemons: list[DaemonProcess] = []
        self.local_server = False

    # -- orchestration ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        ok = False
        try:
            started = time.monotonic()
            self._start_server()
            self.pgbench = self._find_pgbench()
            machine = self._machine()
            self.echo(
                f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model'] or 'unknown model'}), "
                f"PostgreSQL {machine['server_version']}, fsync={machine['settings'].get('fsync')}, "
                f"synchronous_commit={machine['settings'].get('synchronous_commit')}"
            )
            load = os.getloadavg()[0]
            if load > 0.5 * (os.cpu_count() or 1):
                self.echo(f"warning: the machine is busy (load average {load:.1f}): other work will disturb the figures")
            self._prepare_databases()
            runs = self._run_rounds()
            rows = self._count_rows(runs)
            report = self._report(machine, runs, rows, time.monotonic() - started)
            for line in render(report):
                self.echo(line)
            ok = True
            return report
        finally:
            self._cleanup(ok)

    def _start_server(self) -> None:
        if self.cfg.dsn:
            self.admin_dsn = self.cfg.dsn
            host = conninfo_to_dict(self.cfg.dsn).get("host") or ""
            self.local_server = host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")
            self.echo(f"using the server at {redact(self.cfg.dsn)}; databases cqrs_bench_{self.tag}_* (dropped at the end)")
            return
        self.root = Path(tempfile.mkdtemp(prefix="cqrs-pg-bench-", dir="/tmp"))
        self.root.chmod(0o755)  # the postgres OS user runs the servers when we are root
        self.cluster = DevCluster(self.root / "cluster")
        self.echo(f"starting a throwaway primary and a streaming replica under {self.root} ...")
        self.cluster.up(replicas=1)
        self.admin_dsn = self.cluster.primary_dsn()
        self.local_server = True

    def _find_pgbench(self) -> str:
        try:
            candidate = find_bindir() / "pgbench"
            if candidate.is_file():
                return str(candidate)
        except CqrsPgError:
            if self.cfg.dsn is None:
                raise
        found = shutil.which("pgbench")
        if not found:
            raise BenchError("pgbench not found: install postgresql-client (or set CQRS_PG_BINDIR)")
        return found

    def _dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def _prepare_databases(self) -> None:
        from cqrs_pg.migrate import migrate

        cfg = self.cfg
        self.template = f"cqrs_bench_{self.tag}_template"
        with connect(self.admin_dsn, application_name="cqrs-pg bench") as conn:
            conn.execute(f'CREATE DATABASE "{self.template}"')
        self.echo(f"installing the schema and seeding {cfg.customers:,} customers and {cfg.products:,} products ...")
        tdsn = self._dsn(self.template)
        migrate(tdsn)
        with connect(tdsn, application_name="cqrs-pg bench") as conn:
            with conn.transaction():
                for sql in SEED_SQL:
                    conn.execute(sql, {"customers": cfg.customers, "products": cfg.products, "stock": cfg.stock})
            # Project the seed events here, once: every daemon then starts caught up.
            names = [r[0] for r in conn.execute("SELECT name FROM cqrs.projections ORDER BY name")]
            for _ in range(10_000):
                applied = sum(
                    conn.execute("SELECT applied FROM cqrs.run_projection(%s, 5000, '0 s')", (name,)).fetchone()[0]  # type: ignore[index]
                    for name in names
                )
                if not applied:
                    break
            self.dbs.seed_events = conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone()[0]  # type: ignore[index]
            conn.execute("VACUUM ANALYZE")
        with connect(self.admin_dsn, application_name="cqrs-pg bench") as conn:
            for v in VARIANTS:
                name = f"cqrs_bench_{self.tag}_{v.key}"
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
                self.dbs.names[v.key] = name
            conn.execute(f'DROP DATABASE "{self.template}"')
            self.template = ""
        for v in VARIANTS:
            with connect(self._dsn(self.dbs.names[v.key]), application_name="cqrs-pg bench") as conn:
                self._shape(conn, v)
        self.echo(f"databases: {', '.join(f'({k}) {n}' for k, n in self.dbs.names.items())}")

    def _shape(self, conn: psycopg.Connection, v: Variant) -> None:
        """Give a variant's database the SQL it needs (only in that throwaway database)."""
        if v.capture == "dropped":
            triggers = conn.execute(
                "SELECT t.tgname, t.tgrelid::regclass::text FROM pg_trigger t"
                " WHERE t.tgfoid = 'cqrs.tg_capture()'::regprocedure AND NOT t.tgisinternal"
            ).fetchall()
            for name, table in triggers:
                conn.execute(f'DROP TRIGGER "{name}" ON {table}')
        elif v.capture in ("no_doorbell", "always_notify"):
            definition = conn.execute("SELECT pg_get_functiondef('cqrs.tg_capture()'::regprocedure)").fetchone()[0]  # type: ignore[index]
            conn.execute(capture_function_variant(definition, v.capture))
        # Check that each database does what its label says.
        src = conn.execute("SELECT prosrc FROM pg_proc WHERE oid = 'cqrs.tg_capture()'::regprocedure").fetchone()[0]  # type: ignore[index]
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgfoid = 'cqrs.tg_capture()'::regprocedure AND NOT tgisinternal"
        ).fetchone()[0]  # type: ignore[index]
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

    def _run_rounds(self) -> list[Run]:
        cfg = self.cfg
        scripts = {
            "command": self._script("command", COMMAND_SCRIPT),
            "plain": self._script("plain", PLAIN_SCRIPT),
        }
        # A fresh random order of the variants for each round and client count (seeded, so a
        # run can be repeated): no variant always follows the same neighbour.
        rng = random.Random(cfg.seed)
        plan = []
        for r in range(cfg.rounds):
            for clients in cfg.clients:
                order = list(VARIANTS)
                rng.shuffle(order)
                for v in order:
                    plan.append((r + 1, clients, v))
        per_run = cfg.seconds + 3
        eta = len(plan) * per_run + cfg.rounds * len(cfg.clients) * cfg.warmup
        self.echo(
            f"{len(plan)} runs: {len(VARIANTS)} variants x clients {','.join(map(str, cfg.clients))} x "
            f"{cfg.rounds} round(s) of {cfg.seconds}s (about {eta / 60:.1f} min)"
        )
        runs: list[Run] = []
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
            self.echo(
                f"[{i:>{len(str(len(plan)))}}/{len(plan)}] round {rnd}/{cfg.rounds}  {clients:>2} client{'s' if clients != 1 else ' '}  "
                f"({v.key}) {v.label:<40} {run.tps:>9,.0f} tx/s{failed}{extra}  (~{left / 60:.1f} min left)"
            )
        return runs

    def _script(self, name: str, template: str) -> Path:
        path = self.workdir / f"{name}.sql"
        path.write_text(template.format(customers=self.cfg.customers, products=self.cfg.products), encoding="utf-8")
        return path

    def _one_run(self, rnd: int, clients: int, v: Variant, script: Path) -> Run:
        cfg = self.cfg
        dsn = self._dsn(self.dbs.names[v.key])
        self._settle(dsn)
        daemon: DaemonProcess | None = None
        warmup = 0
        sleeping_at_start: bool | None = None
        try:
            with connect(dsn, application_name="cqrs-pg bench") as conn:
                leftovers = conn.execute("SELECT count(*) FROM cqrs.listeners").fetchone()[0]  # type: ignore[index]
                if leftovers:
                    # A daemon of an earlier run that did not say goodbye: "stopped" must mean no rows.
                    conn.execute("DELETE FROM cqrs.listeners")
                if v.daemon != "stopped":
                    daemon = _Daemon(dsn, self.workdir / f"listen-{v.key}.log", "--log-level", "warning")
                    self.daemons.append(daemon)
                    daemon.start()
                    if v.daemon == "idle":
                        self._wait_daemon(conn, daemon, "SELECT count(*) FROM cqrs.listeners WHERE sleeping", "fall asleep")
                    else:
                        # Caught up first (asleep), then a warm-up load wakes it: the measured
                        # run starts with the daemon awake and busy, not draining old backlog.
                        self._wait_daemon(conn, daemon, "SELECT count(*) FROM cqrs.listeners WHERE sleeping", "catch up")
                        warmup = self._pgbench(dsn, script, clients, cfg.warmup).transactions
                    sleeping_at_start = bool(
                        conn.execute("SELECT count(*) FROM cqrs.listeners WHERE sleeping").fetchone()[0]  # type: ignore[index]
                    )
                backend = self._daemon_backend(conn) if daemon is not None else None
                before = self._positions(conn)
            cpu0 = _cpu_seconds(daemon.proc.pid) if daemon is not None and daemon.proc is not None else None
            bcpu0 = _cpu_seconds(backend) if backend is not None else None
            started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            busy0, ours0 = _machine_cpu(), self._own_cpu()
            result = self._pgbench(dsn, script, clients, cfg.seconds)
            busy1, ours1 = _machine_cpu(), self._own_cpu()
            cpu1 = _cpu_seconds(daemon.proc.pid) if daemon is not None and daemon.proc is not None else None
            bcpu1 = _cpu_seconds(backend) if backend is not None else None
            with connect(dsn, application_name="cqrs-pg bench") as conn:
                after = self._positions(conn)
            projected = {name: n - before[1].get(name, 0) for name, n in after[1].items()}
            if daemon is not None and not daemon.alive():
                raise BenchError(f"the daemon of variant ({v.key}) exited during the run: see {daemon.log}")
        finally:
            if daemon is not None:
                code = daemon.stop()
                self.daemons.remove(daemon)
                if code not in (0, None):
                    self.echo(f"   warning: the daemon of ({v.key}) exited with code {code}; see {daemon.log}")
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
            daemon_cpu_seconds=None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 3),
            daemon_backend_cpu_seconds=None if bcpu0 is None or bcpu1 is None else round(bcpu1 - bcpu0, 3),
            daemon_projected_events=None if daemon is None else min(projected.values(), default=0),
            daemon_projected_by_projection=None if daemon is None else projected,
            daemon_sleeping_at_start=sleeping_at_start,
            machine_cpu_busy=_busy_fraction(busy0, busy1),
            other_cpu=_other_fraction(busy0, busy1, ours0, ours1, cpu0, cpu1),
        )

    def _settle(self, dsn: str) -> None:
        """The same start for every run: the variant's database vacuumed, no autovacuum left
        over from the run before, a checkpoint, and the replica done replaying."""
        with connect(dsn, application_name="cqrs-pg bench") as conn:
            conn.execute("VACUUM (ANALYZE)")
        with connect(self.admin_dsn, application_name="cqrs-pg bench") as conn:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
                ).fetchone()
                if row is None or not row[0]:
                    break
                time.sleep(0.1)
            with contextlib.suppress(psycopg.Error):
                conn.execute("CHECKPOINT")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    row = conn.execute(
                        "SELECT coalesce(bool_and(replay_lsn >= pg_current_wal_lsn()), true) FROM pg_stat_replication"
                    ).fetchone()
                except psycopg.Error:
                    return
                if row is None or row[0]:
                    return
                time.sleep(0.05)

    def _own_cpu(self) -> float | None:
        """CPU seconds used so far by the bench's servers (every postmaster with its children,
        living and reaped), by its reaped children (pgbench) and by itself. None with --dsn."""
        if self.cluster is None:
            return None
        total = 0.0
        for node in self.cluster.status():
            try:
                pid = int((node.datadir / "postmaster.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            total += _process_tree_cpu(pid)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def _wait_daemon(self, conn: psycopg.Connection, daemon: DaemonProcess, sql: str, what: str) -> None:
        deadline = time.monotonic() + self.cfg.daemon_wait
        while conn.execute(sql).fetchone()[0] < 1:  # type: ignore[index]
            if not daemon.alive():
                raise BenchError(f"the daemon exited before it could {what}: see {daemon.log}")
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon did not {what} within {self.cfg.daemon_wait:.0f}s: see {daemon.log}")
            time.sleep(0.02)

    def _daemon_backend(self, conn: psycopg.Connection) -> int | None:
        """The pid of the daemon's server backend, when the server runs on this machine."""
        if not self.local_server:
            return None
        row = conn.execute("SELECT pid FROM cqrs.listeners ORDER BY started_at DESC LIMIT 1").fetchone()
        if row is None:
            return None
        try:
            comm = Path(f"/proc/{row[0]}/comm").read_text().strip()
        except OSError:
            return None
        return int(row[0]) if comm.startswith("postgres") else None

    @staticmethod
    def _positions(conn: psycopg.Connection) -> tuple[int, dict[str, int]]:
        """The outbox's last position, and applied_events per projection."""
        row = conn.execute("SELECT coalesce(max(position), 0) FROM cqrs.outbox").fetchone()
        assert row is not None
        applied = {name: int(n) for name, n in conn.execute("SELECT name, applied_events FROM cqrs.projections")}
        return int(row[0]), applied

    def _pgbench(self, dsn: str, script: Path, clients: int, seconds: int) -> PgbenchResult:
        cmd = [
            self.pgbench, "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(2, clients)),
            "-T", str(seconds), "-f", str(script),
            make_conninfo(dsn, application_name="cqrs-pg bench pgbench"),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"pgbench did not finish within {seconds + 120}s") from exc
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise BenchError(f"pgbench failed (exit {proc.returncode}): {tail}")
        return parse_pgbench(proc.stdout)

    def _count_rows(self, runs: list[Run]) -> dict[str, dict[str, int]]:
        rows: dict[str, dict[str, int]] = {}
        for v in VARIANTS:
            with connect(self._dsn(self.dbs.names[v.key]), application_name="cqrs-pg bench") as conn:
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
                "outbox_events": r[3] - self.dbs.seed_events,  # events the bench's commands wrote
                "transactions": sum(x.transactions + x.warmup_transactions for x in mine),
            }
        return rows

    # -- report --------------------------------------------------------------------------------

    def _machine(self) -> dict[str, Any]:
        with connect(self.admin_dsn, application_name="cqrs-pg bench") as conn:
            version = conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
            server_version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            settings = dict(
                conn.execute(
                    "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN"
                    " ('fsync', 'synchronous_commit', 'shared_buffers', 'max_wal_size', 'wal_level',"
                    "  'max_connections', 'full_page_writes', 'checkpoint_timeout')"
                ).fetchall()
            )
            replicas = conn.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0]  # type: ignore[index]
        pgbench_version = subprocess.run([self.pgbench, "--version"], capture_output=True, text=True).stdout.strip()
        return {
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "memory_gb": _memory_gb(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cqrs_pg": __version__,
            "postgres": version,
            "server_version": server_version,
            "pgbench": pgbench_version,
            "settings": settings,
            "replicas_streaming": replicas,
            "server": "throwaway primary + 1 streaming replica (cqrs_pg.devcluster)" if self.cluster else "given --dsn",
            "load_average_at_start": list(os.getloadavg()),
        }

    def _report(
        self, machine: dict[str, Any], runs: list[Run], rows: dict[str, dict[str, int]], elapsed: float
    ) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "benchmark": "command throughput: shop.place_order with 2 lines",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": None,
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
                "daemon": "cqrs-pg listen with its defaults (--log-level warning), started for (d) and (e) runs only",
            },
            "machine": machine,
            "variants": {v.key: {"label": v.label, "capture": v.capture, "daemon": v.daemon, "script": v.script} for v in VARIANTS},
            "scripts": {
                "command": COMMAND_SCRIPT.format(customers=cfg.customers, products=cfg.products),
                "plain": PLAIN_SCRIPT.format(customers=cfg.customers, products=cfg.products),
            },
            "runs": [asdict(r) for r in runs],
            "medians": medians(runs),
            "daemon_cpu": daemon_cpu(runs),
            "ratios": ratios(runs, max(cfg.clients)),
            "rows": rows,
            "elapsed_seconds": round(elapsed, 1),
        }

    def _cleanup(self, ok: bool) -> None:
        for daemon in list(self.daemons):
            with contextlib.suppress(Exception):
                daemon.stop(timeout=10)
        if self.cluster is not None:
            try:
                self.cluster.down()
            finally:
                if self.root is not None:
                    shutil.rmtree(self.root, ignore_errors=True)
        elif self.admin_dsn:
            with contextlib.suppress(Exception), connect(self.admin_dsn, application_name="cqrs-pg bench") as conn:
                for name in [*self.dbs.names.values(), self.template]:
                    if name:
                        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if ok:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            self.echo(f"daemon logs and pgbench scripts kept in {self.workdir}")


# -- figures ------------------------------------------------------------------------------------


def parse_pgbench(out: str) -> PgbenchResult:
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    done = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    if tps is None or done is None:
        raise BenchError(f"cannot read pgbench's output: {out.strip()[-300:]!r}")
    failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
    latency = re.search(r"^latency average = ([\d.]+) ms", out, re.M)
    return PgbenchResult(
        tps=float(tps.group(1)),
        transactions=int(done.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        latency_ms=float(latency.group(1)) if latency else None,
    )


def medians(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> str(clients) -> {median, min, max, runs}: tps over rounds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        cell = out.setdefault(r.variant, {}).setdefault(str(r.clients), {"tps": [], "busy": [], "latency": []})
        cell["tps"].append(r.tps)
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
            }
    return out


def daemon_cpu(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> str(clients) -> median CPU seconds of the daemon process and its backend per run."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in ("d", "e"):
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


# Share of all CPUs used in a run by processes not the bench's. Kernel threads working for
# the bench (writeback, journaling) count as others too: a quiet 2-core machine shows ~1-5%.
OTHER_CPU_WARNING = 0.10


def render(report: dict[str, Any]) -> list[str]:
    cfg = report["config"]
    clients = cfg["clients"]
    lines = [
        "",
        f"command throughput: shop.place_order, 2 lines; median tx/s (min-max) over {cfg['rounds']} "
        f"interleaved round(s) of {cfg['seconds']}s, pgbench -M prepared",
    ]
    width = 22
    head = f"{'variant':<46}" + "".join(f"{f'{c} client' + ('s' if c != 1 else ''):>{width}}" for c in clients)
    lines += [head, "-" * len(head)]
    for key, meta in report["variants"].items():
        cells = report["medians"].get(key, {})
        row = f"({key}) {meta['label']:<42}"
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
    others = [r["other_cpu"] for r in report["runs"] if r.get("other_cpu") is not None]
    if others:
        worst = max(report["runs"], key=lambda r: r.get("other_cpu") or 0.0)
        lines.append(
            f"CPU used by other processes on this machine during the runs: median {max(0.0, statistics.median(others)) * 100:.0f}%,"
            f" max {max(0.0, worst['other_cpu']) * 100:.0f}% of all CPUs (round {worst['round']}, ({worst['variant']}) at {worst['clients']} clients)"
        )
        if worst["other_cpu"] > OTHER_CPU_WARNING:
            lines.append(
                "WARNING: another workload shared the CPUs during some runs (other_cpu in the JSON):"
                " those figures are disturbed; run again on a quiet machine"
            )
    cpu = report.get("daemon_cpu") or {}
    if cpu:
        lines.append("")
        lines.append(f"daemon CPU seconds per {cfg['seconds']}s run (median): process + its server backend;"
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
            lines.append(f"  ({key}) {report['variants'][key]['label']:<40} " + "; ".join(parts))
    rat = report["ratios"]
    lines.append("")
    lines.append(f"ratios of medians at {rat['clients']} clients (range of per-round ratios):")
    for name, r in rat.items():
        if name == "clients":
            continue
        target = ""
        if r["target"] is not None:
            target = f"  target >= {r['target']:.2f}: {'met' if r['met'] else 'NOT MET'}"
        spread = ""
        if r["per_round_min"] is not None:
            spread = f" ({r['per_round_min']:.3f}-{r['per_round_max']:.3f})"
        lines.append(f"  {name}  {r['value']:.3f}{spread:<16} {r['what']}{target}")
    rows = report["rows"]
    lines.append("")
    lines.append(
        "rows written: " + "; ".join(f"({k}) {v['orders']:,} orders, {v['outbox_events']:,} events" for k, v in rows.items())
    )
    return lines


# -- small helpers ------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc/<pid>/stat."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs, from /proc/stat; busy is user + nice + system
    (not irq, softirq or steal, which no process is charged with)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    values = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    return values[0] + values[1] + values[2], sum(values)


def _process_tree_cpu(parent: int) -> float:
    """utime + stime of a process and its reaped children, plus its living children's."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
        pid, ppid = int(entry), int(fields[1])
        if pid == parent:
            total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
        elif ppid == parent:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _other_fraction(
    busy0: tuple[int, int] | None, busy1: tuple[int, int] | None,
    ours0: float | None, ours1: float | None, daemon0: float | None, daemon1: float | None,
) -> float | None:
    """Share of all CPUs that processes other than the bench's used between two snapshots."""
    if busy0 is None or busy1 is None or ours0 is None or ours1 is None or busy1[1] <= busy0[1]:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    ours = ours1 - ours0 + (daemon1 - daemon0 if daemon0 is not None and daemon1 is not None else 0.0)
    busy = (busy1[0] - busy0[0]) / tick
    return round((busy - ours) / ((busy1[1] - busy0[1]) / tick), 3)


def _busy_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 3)


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _memory_gb() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def _redact(dsn: str) -> str:
    from cqrs_pg.db import redact

    return redact(dsn)
