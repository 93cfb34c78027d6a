"""A chaos run: concurrent writers committing out of order while the daemon is killed,
its connections are terminated and the primary restarts; then every read model must
equal its definition and every projection must have applied each event exactly once.

Used by tests/test_chaos.py (a short run) and `cqrs-pg soak` (as long as you like).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cqrs_pg.db import connect
from cqrs_pg.devcluster import DevCluster
from cqrs_pg.verify import all_mismatches
from cqrs_pg.workload import ShopWorkload, WorkloadResult


# The directory holding this package: a child `python -m cqrs_pg` runs this very code,
# whatever its working directory or what else is installed.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class DaemonProcess:
    """`cqrs-pg listen` as a child process, restarted the way systemd would; everything it
    writes (its log) is appended to `log`, across restarts."""

    def __init__(self, dsn: str, log: Path, *args: str) -> None:
        self.dsn = dsn
        self.log = log
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cqrs_pg", "listen", "--dsn", self.dsn, *self.args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def output(self) -> str:
        """What it has written so far."""
        return self.log.read_text() if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to finish a batch or say goodbye."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def signal(self, signum: int, timeout: float = 30.0) -> int | None:
        """Send signum and wait for the exit: its code; None if it still runs after timeout
        (or never started)."""
        if self.proc is None:
            return None
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, and SIGKILL if it has not exited within timeout: its exit code (None:
        killed, or never started)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        code = self.signal(signal.SIGTERM, timeout)
        if code is None:
            self.kill()
        return code


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
        report.outbox_events = conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone()[0]  # type: ignore[index]
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        report.applied["primary"] = dict(conn.execute("SELECT name, applied_events FROM cqrs.projections").fetchall())
        report.mismatches["primary"] = all_mismatches(conn)
    with connect(replica_dsn) as conn:
        while conn.execute("SELECT pg_last_wal_replay_lsn() < %s::pg_lsn", (lsn,)).fetchone()[0]:  # type: ignore[index]
            time.sleep(0.01)
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
    except Exception:
        return 0  # the primary may be restarting: this fault is then moot


def _wait_caught_up(dsn: str, token: int, daemon: DaemonProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with connect(dsn, application_name="cqrs-pg chaos") as conn:
        while not conn.execute("SELECT cqrs.caught_up(%s)", (token,)).fetchone()[0]:  # type: ignore[index]
            if time.monotonic() > deadline:
                raise TimeoutError(f"not caught up within {timeout:.0f}s; daemon log: {daemon.log}")
            _supervise_until(daemon, time.monotonic() + 0.02)


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
    import shutil
    import tempfile

    from cqrs_pg.migrate import migrate

    made_root = root is None
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="cqrs-pg-soak-", dir="/tmp"))
        root.chmod(0o755)  # the postgres OS user must reach it when we run as root
    cluster = DevCluster(root / "cluster")
    ok = False
    try:
        echo(f"starting a primary and a streaming replica under {root} ...")
        cluster.up(replicas=1)
        with connect(cluster.primary_dsn()) as conn:
            conn.execute("CREATE DATABASE cqrs_soak")
        migrate(cluster.primary_dsn("cqrs_soak"))
        kills = kills if kills is not None else max(10, int(seconds / 1.5))
        terminations = terminations if terminations is not None else max(3, int(seconds / 5))
        echo(f"{writers} writers for {seconds:g}s; {kills} SIGKILLs, {terminations} connection terminations"
             f"{', one primary crash' if restart_primary else ''} ...")
        report = run_chaos(
            cluster, "cqrs_soak", root, writers=writers, seconds=seconds, kills=kills,
            terminations=terminations, restart_primary=restart_primary, seed=seed, log=echo,
        )
        for line in report.lines():
            echo(line)
        ok = report.ok
        echo("PASS: every read model equals its definition and every event was applied exactly once, "
             "on the primary and the replica" if ok else "FAIL")
    finally:
        cluster.down()
        if made_root and ok:
            shutil.rmtree(root, ignore_errors=True)
    return ok
