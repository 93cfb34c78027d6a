"""A chaos run: concurrent writers committing out of order while the daemon is killed,
its connections are terminated and the primary restarts; then every read model must
equal its definition and every projection must have applied each event exactly once.

Used by tests/test_chaos.py (a short run) and `cqrs-pg soak` (as long as you like).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from cqrs_pg.db import connect, scalar
from cqrs_pg.errors import DatabaseUnavailable
from cqrs_pg_tools.devcluster import DevCluster
from cqrs_pg_tools.testing import (
    DaemonProcess,
    create_template,
    outbox_count,
    throwaway_cluster,
    wait_until,
)
from cqrs_pg_tools.verify import all_mismatches
from cqrs_pg_tools.workload import ShopWorkload, WorkloadResult


@dataclass
class ChaosReport:
    workload: WorkloadResult
    kills: int = 0
    terminations: int = 0
    primary_restarts: int = 0
    daemon_starts: int = 0
    outbox_events: int = 0
    catch_up_seconds: float = 0.0
    applied: dict[str, dict[str, int]] = field(default_factory=dict)  # server -> projection -> events
    mismatches: dict[str, dict[str, int]] = field(default_factory=dict)  # server -> relation -> rows

    @property
    def ok(self) -> bool:
        exactly_once = all(
            n == self.outbox_events for per_server in self.applied.values() for n in per_server.values()
        )
        equal = not any(n for per_server in self.mismatches.values() for n in per_server.values())
        return exactly_once and equal and not self.workload.errors and len(self.applied) == 2

    def lines(self) -> list[str]:
        w = self.workload
        out = [
            f"commands: {w.total} ({sum(w.refused.values())} refused, {sum(w.retried.values())} resent after "
            f"lost connections or rollbacks, {w.duplicates} of those answered as duplicates), errors: {len(w.errors)}",
            f"chaos: daemon SIGKILLed {self.kills}x, its connections terminated {self.terminations}x, "
            f"primary restarted {self.primary_restarts}x, daemon started {self.daemon_starts}x",
            f"outbox: {self.outbox_events} events; caught up {self.catch_up_seconds:.1f}s after the writers stopped",
        ]
        for server in ("primary", "replica"):
            out.append(f"{server}: applied {self.applied.get(server)}; mismatches {self.mismatches.get(server)}")
        out.extend(f"error: {e}" for e in w.errors[:5])
        return out


def run_chaos(
    cluster: DevCluster,
    dbname: str,
    workdir: Path,
    *,
    writers: int = 8,
    seconds: float = 20.0,
    kills: int = 10,
    terminations: int = 3,
    restart_primary: bool = True,
    seed: int | None = None,
    log: Callable[[str], None] = lambda _line: None,
) -> ChaosReport:
    """Run the chaos against a migrated database `dbname` of `cluster`."""
    rng = random.Random(seed)
    dsn, replica_dsn = cluster.primary_dsn(dbname), cluster.replica_dsn(dbname)
    workload = ShopWorkload(dsn, seed=seed, hold_max=0.02, retry_for=120.0)
    workload.setup(customers=30, products=10, stock=1_000)

    daemon = DaemonProcess(dsn, workdir / "listen.log", "--batch-size", "37", "--poll-interval", "0.2", "--log-level", "warning")
    daemon.start()
    report = ChaosReport(workload=WorkloadResult())

    # A timetable of faults spread over the run; the primary restarts near the middle.
    events = [(rng.uniform(0.05, 0.95) * seconds, "kill") for _ in range(kills)]
    events += [(rng.uniform(0.05, 0.95) * seconds, "terminate") for _ in range(terminations)]
    if restart_primary:
        events.append((seconds * rng.uniform(0.4, 0.6), "restart"))
    events.sort()

    result_box: list[WorkloadResult] = []
    writer = threading.Thread(target=lambda: result_box.append(workload.run(writers, seconds=seconds)), daemon=True)
    started = time.monotonic()
    writer.start()
    for at, what in events:
        _supervise_until(daemon, started + at)
        if what == "kill":
            daemon.kill()
            daemon.start()
            report.kills += 1
        elif what == "terminate":
            report.terminations += _terminate_daemon_connections(cluster.primary_dsn(dbname))
        else:
            log(f"   restarting the primary (immediate: a crash) at {at:.1f}s")
            cluster.restart_node("primary", mode="immediate")
            cluster.wait_replicas_streaming()
            report.primary_restarts += 1
    while writer.is_alive():
        _supervise_until(daemon, time.monotonic() + 0.2)
    writer.join()
    report.workload = result_box[0]

    stopped = time.monotonic()
    if not daemon.alive():
        daemon.start()
    _wait_caught_up(dsn, report.workload.max_token, daemon)
    _wait_caught_up(replica_dsn, report.workload.max_token, daemon)
    report.catch_up_seconds = time.monotonic() - stopped
    daemon.stop()
    report.daemon_starts = daemon.starts

    with connect(dsn) as conn:
        report.outbox_events = outbox_count(conn)
        lsn = scalar(conn, "SELECT pg_current_wal_lsn()")
        report.applied["primary"] = dict(conn.execute("SELECT name, applied_events FROM cqrs.projections").fetchall())
        report.mismatches["primary"] = all_mismatches(conn)
    with connect(replica_dsn) as conn:
        wait_until(lambda: scalar(conn, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)),
                   f"the replica to replay up to {lsn}", timeout=120, interval=0.01, raises=TimeoutError)
        report.applied["replica"] = dict(conn.execute("SELECT name, applied_events FROM cqrs.projections").fetchall())
        report.mismatches["replica"] = all_mismatches(conn)
    return report


def _supervise_until(daemon: DaemonProcess, deadline: float) -> None:
    """Sleep until deadline, restarting the daemon if it exits (a daemon started while the
    primary is down exits with an error, as it should; its supervisor starts it again)."""
    while True:
        if not daemon.alive():
            time.sleep(0.2)
            daemon.start()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(0.05, remaining))


def _terminate_daemon_connections(dsn: str) -> int:
    try:
        with connect(dsn) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'cqrs-pg listen' AND datname = current_database()"
            ).fetchall()
        return sum(1 for (done,) in rows if done)
    except (psycopg.Error, DatabaseUnavailable):
        return 0  # the primary may be restarting: this fault is then moot


def _wait_caught_up(dsn: str, token: int, daemon: DaemonProcess, timeout: float = 120.0) -> None:
    with connect(dsn, application_name="cqrs-pg chaos") as conn:

        def caught_up() -> bool:
            _supervise_until(daemon, time.monotonic())  # started again if it has exited
            return bool(scalar(conn, "SELECT cqrs.caught_up(%s)", (token,)))

        wait_until(caught_up, f"token {token} to be caught up (daemon log: {daemon.log})", timeout, raises=TimeoutError)


def soak(
    *,
    seconds: float,
    writers: int,
    kills: int | None,
    terminations: int | None,
    restart_primary: bool,
    seed: int | None,
    root: Path | None,
    echo: Callable[[str], None],
) -> bool:
    """`cqrs-pg soak`: run_chaos on a throwaway primary + replica; True when it held."""
    with throwaway_cluster(
        "cqrs-pg-soak-", root, announce=lambda where: echo(f"starting a primary and a streaming replica under {where} ..."),
    ) as throwaway:
        throwaway.keep_files = True  # until the run holds: the daemon's log is in root
        cluster = throwaway.cluster
        create_template(cluster.primary_dsn(), cluster.primary_dsn, "cqrs_soak")
        kills = kills if kills is not None else max(10, int(seconds / 1.5))
        terminations = terminations if terminations is not None else max(3, int(seconds / 5))
        echo(f"{writers} writers for {seconds:g}s; {kills} SIGKILLs, {terminations} connection terminations"
             f"{', one primary crash' if restart_primary else ''} ...")
        report = run_chaos(
            cluster, "cqrs_soak", throwaway.root, writers=writers, seconds=seconds, kills=kills,
            terminations=terminations, restart_primary=restart_primary, seed=seed, log=echo,
        )
        for line in report.lines():
            echo(line)
        echo("PASS: every read model equals its definition and every event was applied exactly once, "
             "on the primary and the replica" if report.ok else "FAIL")
        throwaway.keep_files = not report.ok
    return report.ok
