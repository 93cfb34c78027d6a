"""What every part of `cqrs-pg bench` shares: its settings, the server it runs on (a
throwaway primary + streaming replica, or --dsn), a migrated and seeded template database
each part clones, the daemon as a child process, CPU accounting and the statistics. The
cluster, databases, drain, waits and daemon process are cqrs_pg_tools.testing's."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cqrs_pg import __version__
from cqrs_pg.config import ListenerConfig
from cqrs_pg.db import connect, redact, scalar
from cqrs_pg.errors import CqrsPgError
from cqrs_pg_tools import testing
from cqrs_pg_tools.devcluster import DevCluster, find_bindir

Echo = Callable[[str], None]

PART_NAMES = {1: "throughput", 2: "catchup", 3: "latency", 4: "matview", 5: "growth", 6: "rebuild", 7: "relay"}
PART_TITLES = {
    1: "command throughput",
    2: "projection catch-up",
    3: "end-to-end latency",
    4: "materialized view cost",
    5: "growth of the outbox",
    6: "rebuild from state and from the log",
    7: "the relay to NATS JetStream",
}


class BenchError(CqrsPgError):
    """The benchmark could not run (pgbench failed, a daemon did not start, ...)."""


@dataclass
class BenchConfig:
    parts: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    rounds: int = 3  # repetitions of every measurement, interleaved
    customers: int = 10_000
    products: int = 10_000
    stock: int = 1_000_000_000  # per product: nothing is ever refused
    dsn: str | None = None  # a server to use instead of a throwaway cluster
    replica_dsn: str | None = None  # its streaming replica (part 3 reads there); with --dsn only
    daemon_wait: float = 300.0  # for a daemon to register / fall asleep / catch up
    seed: int = 1  # of the run order
    quick: bool = False
    # part 1: command throughput
    seconds: int = 10  # per measured pgbench run (pgbench -T takes whole seconds)
    clients: tuple[int, ...] = (1, 4, 16)
    warmup: int = 3  # seconds of load before the measured run of (e) and (h), the daemons under load
    variants: tuple[str, ...] | None = None  # part 1: run only these (keys of throughput.VARIANTS); None: all
    # part 2: projection catch-up; backlogs of backlog // 10 and backlog events
    backlog: int = 1_000_000
    batch_size: int = ListenerConfig.batch_size  # the daemon's --batch-size (its default)
    batch_delay: float | None = None  # the daemon's --batch-delay in every part (None: its default)
    apply_budget: float | None = None  # the daemon's --apply-budget in every part (None: its default)
    refresh_budget: float | None = None  # the daemon's --refresh-budget in every part (None: its default)
    # part 3: end-to-end latency
    serial: int = 300  # commands one after another, each awaited on the replica (0: none)
    rates: tuple[int, ...] = (20, 100, 500)  # commands per second, open loop
    latency_seconds: float = 10.0  # measured, per run
    latency_warmup: float = 2.0  # seconds of load before each measured window (parts 3 and 7)
    latency_clients: int = 8  # connections the commands are spread over (parts 3 and 7)
    poll_ms: float = 1.0  # how often the watcher looks at the replica
    # part 4: materialized view cost
    matview_lines: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    load_rate: int = 200  # commands per second during the debounce runs
    load_seconds: int = 20
    refresh_interval: float = 1.0  # the debounce compared with none (0)
    # part 5: growth
    history: tuple[int, ...] = (100_000, 10_000_000)  # outbox rows of already projected history
    growth_seconds: int = 10  # per command-latency run
    growth_samples: int = 30  # timed executions of each batch query, per round
    # part 6: rebuild from state and from the log
    rebuild_orders: int = 1_000_000
    # part 7: the relay to NATS JetStream
    relay_backlog: int = 1_000_000  # events drained
    relay_batch_size: int = 1000  # the relay's --batch-size (its default)
    relay_rate: int = 500  # commands per second in the latency runs
    relay_seconds: float = 10.0  # measured, per latency run

    @classmethod
    def quick_config(cls, **overrides: Any) -> BenchConfig:
        """Every part, tiny: proves the bench works, measures nothing."""
        base: dict[str, Any] = {
            "quick": True, "rounds": 1, "customers": 2_000, "products": 2_000,
            "seconds": 1, "clients": (1, 4), "warmup": 1,
            "backlog": 50_000, "batch_size": 5000,
            "serial": 30, "rates": (100, 400), "latency_seconds": 1.0, "latency_warmup": 0.3, "latency_clients": 4,
            "matview_lines": (2_000, 10_000, 40_000), "load_rate": 100, "load_seconds": 2,
            "history": (10_000, 60_000), "growth_seconds": 1, "growth_samples": 5,
            "rebuild_orders": 5_000,
            "relay_backlog": 20_000, "relay_seconds": 2.0,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


# -- statistics ------------------------------------------------------------------------------


def spread(values: Iterable[float | None], digits: int = 3) -> dict[str, Any] | None:
    """{median, min, max, runs} of the values that are not None; None if there are none."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return {
        "median": round(statistics.median(vals), digits),
        "min": round(min(vals), digits),
        "max": round(max(vals), digits),
        "runs": len(vals),
    }


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) of sorted values, linearly interpolated."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def ratio(num: float | None, den: float | None, digits: int = 3) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return round(num / den, digits)


def fmt_spread(cell: dict[str, Any] | None, fmt: str = "{:,.0f}", unit: str = "") -> str:
    """'median (min-max)' for a spread() cell; with one run, the value alone."""
    if cell is None:
        return "n/a"
    if cell["runs"] == 1:
        return fmt.format(cell["median"]) + unit
    return f"{fmt.format(cell['median'])}{unit} ({fmt.format(cell['min'])}-{fmt.format(cell['max'])})"


# -- the daemon --------------------------------------------------------------------------------


class Daemon(testing.DaemonProcess):
    """`python -m cqrs_pg listen` from this very package (DaemonProcess), with the database
    it serves and its peak memory."""

    dbname = ""

    def peak_rss_mb(self) -> float | None:
        """The process's peak resident set (VmHWM), while it is alive."""
        if self.pid is None:
            return None
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return None


# -- CPU accounting ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc/<pid>/stat."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs, from /proc/stat; busy is user + nice + system
    (not irq, softirq or steal, which no process is charged with)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    values = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    return values[0] + values[1] + values[2], sum(values)


def process_tree_cpu(parent: int) -> float:
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


def other_fraction(
    busy0: tuple[int, int] | None, busy1: tuple[int, int] | None,
    ours0: float | None, ours1: float | None, daemon0: float | None = None, daemon1: float | None = None,
) -> float | None:
    """Share of all CPUs that processes other than the bench's used between two snapshots."""
    if busy0 is None or busy1 is None or ours0 is None or ours1 is None or busy1[1] <= busy0[1]:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    ours = ours1 - ours0 + (daemon1 - daemon0 if daemon0 is not None and daemon1 is not None else 0.0)
    busy = (busy1[0] - busy0[0]) / tick
    return round((busy - ours) / ((busy1[1] - busy0[1]) / tick), 3)


def busy_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 3)


# Share of all CPUs used in a run by processes not the bench's. Kernel threads working for
# the bench (writeback, journaling) count as others too: a quiet 2-core machine shows ~1-5%.
OTHER_CPU_WARNING = 0.10


class Cpu(TypedDict):
    """CpuWatch.result(): keyword arguments of the bench's run records."""

    machine_cpu_busy: float | None
    other_cpu: float | None


class CpuWatch:
    """Machine CPU busy, and the share other processes used, over a measured stretch."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.busy0 = machine_cpu()
        self.ours0 = session.own_cpu(include_daemons=True)

    def result(self) -> Cpu:
        busy1, ours1 = machine_cpu(), self.session.own_cpu(include_daemons=True)
        return {"machine_cpu_busy": busy_fraction(self.busy0, busy1), "other_cpu": other_fraction(self.busy0, busy1, self.ours0, ours1)}


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


class DaemonCpu:
    """CPU seconds of a daemon: its process, and its server backends found at the start
    (run it once the daemon has polled: each projection's connection opens on first use)."""

    def __init__(self, session: Session, conn: psycopg.Connection, daemon: Daemon) -> None:
        self.pid = daemon.pid
        self.backends = session.daemon_backends(conn)
        self.start = self._now()

    def _now(self) -> tuple[float | None, float | None]:
        proc = cpu_seconds(self.pid) if self.pid is not None else None
        backends = [cpu_seconds(pid) for pid in self.backends]
        return proc, (sum(b for b in backends if b is not None) if self.backends else None)

    def result(self) -> tuple[float | None, float | None]:
        """(process seconds, backend seconds) since the start; None where unknown."""
        end = self._now()
        return _since(self.start[0], end[0]), _since(self.start[1], end[1])

    def total(self) -> float | None:
        proc, backends = self.result()
        return None if proc is None else round(proc + (backends or 0.0), 3)


# -- the server and its databases -------------------------------------------------------------


@dataclass
class Session:
    """The server the bench runs on, its template database and what must be cleaned up."""

    cfg: BenchConfig
    progress: Echo
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cqrs-pg-bench-")))
    cluster: DevCluster | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # holds the throwaway cluster
    admin_dsn: str = ""
    local_server: bool = False
    pgbench_path: str = ""
    template: str = ""
    seed_events: int = 0
    databases: list[str] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)

    # -- server ------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        if cfg.dsn:
            self.admin_dsn = cfg.dsn
            host = str(conninfo_to_dict(cfg.dsn).get("host") or "")
            self.local_server = host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")
            with self.connect() as conn:
                row = conn.execute(
                    "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
                ).fetchone()
            assert row is not None
            user, superuser = row
            if not superuser:
                raise BenchError(
                    f"--dsn: role {user!r} is not a superuser: the bench creates and drops databases,"
                    " rewrites functions in them and loads auto_explain"
                )
            self.progress(f"using the server at {redact(cfg.dsn)}; databases cqrs_bench_{self.tag}_* (dropped at the end)")
        else:
            self.cluster = self.stack.enter_context(testing.throwaway_cluster(
                "cqrs-pg-bench-",
                announce=lambda root: self.progress(f"starting a throwaway primary and a streaming replica under {root} ..."),
            )).cluster
            self.admin_dsn = self.cluster.primary_dsn()
            self.local_server = True
        self.pgbench_path = self._find_pgbench()

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

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def replica_dsn(self, dbname: str) -> str | None:
        """The replica's DSN for a database, or None when there is none (--dsn without --replica-dsn)."""
        if self.cluster is not None:
            return self.cluster.replica_dsn(dbname)
        if self.cfg.replica_dsn:
            return make_conninfo(self.cfg.replica_dsn, dbname=dbname)
        return None

    def connect(self, dbname: str | None = None, **kwargs: Any) -> psycopg.Connection:
        return connect(self.dsn(dbname) if dbname else self.admin_dsn, application_name="cqrs-pg bench", **kwargs)

    def database(self, dbname: str) -> testing.Database:
        # No replica (--dsn alone): reads go to the primary, as with CQRS_PG_REPLICA_DSN unset.
        return testing.Database(dbname, self.dsn(dbname), self.replica_dsn(dbname) or self.dsn(dbname))

    # -- databases -------------------------------------------------------------------------

    def prepare_template(self) -> None:
        """A database migrated to head, seeded with customers and products whose events
        are already projected: every part clones it."""
        cfg = self.cfg
        self.progress(f"installing the schema and seeding {cfg.customers:,} customers and {cfg.products:,} products ...")
        self.template = testing.create_template(self.admin_dsn, self.dsn, f"cqrs_bench_{self.tag}_template")
        with self.connect(self.template) as conn, conn.transaction():
            for sql in SEED_SQL:
                conn.execute(sql, {"customers": cfg.customers, "products": cfg.products, "stock": cfg.stock})
        # Project the seed events here, once: every daemon then starts caught up.
        self.database(self.template).run_projections(rounds=10_000, batch_size=5000)
        with self.connect(self.template) as conn:
            self.seed_events = testing.outbox_count(conn)
            conn.execute("VACUUM ANALYZE")

    def clone(self, suffix: str) -> str:
        """A new database cloned from the template; dropped at the end (or by drop())."""
        name = f"cqrs_bench_{self.tag}_{suffix}"
        testing.clone(self.admin_dsn, self.template, name)
        self.databases.append(name)
        return name

    def drop(self, name: str) -> None:
        for daemon in [d for d in self.daemons if d.dbname == name]:
            self.stop_daemon(daemon)
        testing.drop(self.admin_dsn, name)
        if name in self.databases:
            self.databases.remove(name)

    # -- the daemon --------------------------------------------------------------------------

    def start_daemon(self, dbname: str, log_name: str, *args: str) -> Daemon:
        """`cqrs-pg listen` on a database; a leftover cqrs.listeners row is removed first,
        so "no daemon" always means no row."""
        with self.connect(dbname) as conn:
            conn.execute("DELETE FROM cqrs.listeners")
        for flag, value in (("--batch-delay", self.cfg.batch_delay), ("--apply-budget", self.cfg.apply_budget),
                            ("--refresh-budget", self.cfg.refresh_budget)):
            if value is not None:
                args = (*args, flag, str(value))
        daemon = Daemon(self.dsn(dbname), self.workdir / log_name, *args)
        daemon.dbname = dbname
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def stop_daemon(self, daemon: Daemon) -> int | None:
        code = daemon.stop()
        if daemon in self.daemons:
            self.daemons.remove(daemon)
        if code not in (0, None):
            self.progress(f"   warning: a daemon exited with code {code}; see {daemon.log}")
        return code

    def wait_daemon(self, conn: psycopg.Connection, daemon: Daemon, sql: str, what: str, params: Any = None,
                    timeout: float | None = None, interval: float = 0.01) -> None:
        """Poll sql (one row, one column, truthy when done) until it holds, while the daemon
        lives; timeout defaults to cfg.daemon_wait."""

        def done() -> bool:
            row = conn.execute(sql, params).fetchone()
            if row is not None and row[0]:
                return True
            if not daemon.alive():
                raise BenchError(f"the daemon exited before it could {what}: see {daemon.log}")
            return False

        testing.wait_until(done, f"the daemon to {what} (see {daemon.log})",
                   self.cfg.daemon_wait if timeout is None else timeout, interval, raises=BenchError)

    def wait_asleep(self, conn: psycopg.Connection, daemon: Daemon, what: str = "fall asleep") -> None:
        self.wait_daemon(conn, daemon, "SELECT count(*) FROM cqrs.listeners WHERE sleeping", what)

    def daemon_backends(self, conn: psycopg.Connection) -> list[int]:
        """The pids of the daemons' server backends in conn's database (the listening one
        and one per projection), when the server runs on this machine."""
        if not self.local_server:
            return []
        pids = []
        for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'cqrs-pg listen%%' ORDER BY pid"
        ):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("postgres"):
                pids.append(int(pid))
        return pids

    # -- runs --------------------------------------------------------------------------------

    def settle(self, dsn: str) -> None:
        """The same start for every run: the database vacuumed, no autovacuum left over
        from the run before, a checkpoint, and the replica done replaying."""
        with connect(dsn, application_name="cqrs-pg bench") as conn:
            conn.execute("VACUUM (ANALYZE)")
        with self.connect() as conn:
            # Best effort, each wait: a run starts anyway when it times out.
            with contextlib.suppress(TimeoutError):
                testing.wait_until(lambda: not scalar(conn, AUTOVACUUM_SQL),
                                   "autovacuum to finish", 120, 0.1, raises=TimeoutError)
            with contextlib.suppress(psycopg.Error):
                conn.execute("CHECKPOINT")
            with contextlib.suppress(TimeoutError, psycopg.Error):  # psycopg.Error: cannot tell, not a primary
                testing.wait_until(lambda: scalar(conn, REPLAYED_SQL),
                                   "the replicas to replay", 30, 0.05, raises=TimeoutError)

    def own_cpu(self, include_daemons: bool = False) -> float | None:
        """CPU seconds used so far by the bench's servers (every postmaster with its children,
        living and reaped), by its reaped children (pgbench, stopped daemons) and by itself;
        with include_daemons, also by the daemons still running. None with --dsn."""
        if self.cluster is None:
            return None
        total = 0.0
        for node in self.cluster.status():
            try:
                pid = int((node.datadir / "postmaster.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            total += process_tree_cpu(pid)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        if include_daemons:
            for daemon in self.daemons:
                if daemon.pid is not None and daemon.alive():
                    total += cpu_seconds(daemon.pid) or 0.0
        return total

    def pgbench(
        self, dsn: str, script: Path, clients: int, seconds: int, rate: float | None = None
    ) -> PgbenchResult:
        cmd = [
            self.pgbench_path, "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(2, clients)),
            "-T", str(seconds), "-f", str(script),
        ]
        if rate is not None:
            cmd += ["-R", str(rate)]
        cmd.append(make_conninfo(dsn, application_name="cqrs-pg bench pgbench"))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"pgbench did not finish within {seconds + 120}s") from exc
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise BenchError(f"pgbench failed (exit {proc.returncode}): {tail}")
        return parse_pgbench(proc.stdout)

    def script(self, name: str, template: str) -> Path:
        path = self.workdir / f"{name}.sql"
        path.write_text(template.format(customers=self.cfg.customers, products=self.cfg.products), encoding="utf-8")
        return path

    # -- report ------------------------------------------------------------------------------

    def machine(self) -> dict[str, Any]:
        with self.connect() as conn:
            version = scalar(conn, "SELECT version()")
            server_version = scalar(conn, "SHOW server_version")
            settings: dict[str, str] = dict(
                conn.execute(
                    "SELECT name, current_setting(name) FROM pg_settings WHERE name IN"
                    " ('fsync', 'synchronous_commit', 'shared_buffers', 'max_wal_size', 'wal_level',"
                    "  'max_connections', 'full_page_writes', 'checkpoint_timeout', 'work_mem')"
                ).fetchall()
            )
            replicas = scalar(conn, "SELECT count(*) FROM pg_stat_replication")
        pgbench_version = subprocess.run([self.pgbench_path, "--version"], capture_output=True, text=True).stdout.strip()
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
            "server": "throwaway primary + 1 streaming replica (cqrs_pg_tools.devcluster)" if self.cluster else "given --dsn",
            "load_average_at_start": list(os.getloadavg()),
        }

    def cleanup(self, ok: bool) -> None:
        for daemon in list(self.daemons):
            with contextlib.suppress(Exception):
                daemon.stop(timeout=10)
        self.daemons.clear()
        self.stack.close()  # the throwaway cluster, if any, stopped and its root removed
        if self.cluster is None and self.admin_dsn:
            for name in [*self.databases, self.template]:
                if name:
                    with contextlib.suppress(Exception):
                        testing.drop(self.admin_dsn, name)
        if ok or not any(self.workdir.iterdir()):
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            self.progress(f"daemon logs and pgbench scripts kept in {self.workdir}")


AUTOVACUUM_SQL = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
REPLAYED_SQL = "SELECT coalesce(bool_and(replay_lsn >= pg_current_wal_lsn()), true) FROM pg_stat_replication"

SEED_SQL = (
    "INSERT INTO shop.customers (id, email, name)"
    " SELECT md5('c' || i)::uuid, 'c' || i || '@bench.example', 'Customer ' || i FROM generate_series(1, %(customers)s) i",
    "INSERT INTO shop.products (id, sku, name, price_cents, stock)"
    " SELECT md5('p' || i)::uuid, 'SKU-' || i, 'Product ' || i, 100 + i %% 900, %(stock)s FROM generate_series(1, %(products)s) i",
)


def seed_uuid(prefix: str, i: int) -> uuid.UUID:
    """md5('<prefix><i>')::uuid, as SEED_SQL computes the seeded ids."""
    import hashlib

    return uuid.UUID(hashlib.md5(f"{prefix}{i}".encode()).hexdigest())


# -- pgbench --------------------------------------------------------------------------------


@dataclass
class PgbenchResult:
    tps: float
    transactions: int
    failed: int
    latency_ms: float | None


def parse_pgbench(out: str) -> PgbenchResult:
    import re

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


# -- the daemon's JSON log ------------------------------------------------------------------------


def read_batches(log: Path, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
    """The daemon's per-batch debug records (`--log-format json --log-level debug`):
    {ts (epoch seconds), projection, applied, duration_ms}, optionally within [since, until]."""
    import json
    from datetime import datetime

    out: list[dict[str, Any]] = []
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "projection" not in rec or "applied" not in rec or "duration_ms" not in rec:
            continue
        ts = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
        if (since is not None and ts < since) or (until is not None and ts > until):
            continue
        out.append({"ts": ts, "projection": rec["projection"], "applied": int(rec["applied"]), "duration_ms": float(rec["duration_ms"])})
    return out


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
