"""The one test support: what the tests, the bench, the chaos run and the demo need to run
cqrs_pg against real servers.

- ``make_root``: a directory the ``postgres`` OS user can enter (the servers run as it);
  ``throwaway_cluster``: a primary and streaming replicas under one, for a with-block.
- ``Database``: one database on a primary and, replicated, on its replica; it can drain its
  projections as the daemon would and wait for a token to be caught up.
- ``create_template`` / ``clone`` / ``drop``: a database migrated once (the engine and the
  example), and cheap copies of it; ``wait_for_database``: until the replica has a new one.
- ``running_daemon``: the daemon in a thread of this process; ``DaemonProcess``:
  ``cqrs-pg listen`` as a child process, restarted the way systemd would.
- ``wait_until``: poll a condition, failing with what was awaited.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import cqrs_pg
from cqrs_pg.daemon import Listener, ListenerConfig
from cqrs_pg.migrate import migrate
from cqrs_pg.projections import handler_for, run_batch
from cqrs_pg_tools.devcluster import DevCluster

# The directory holding the cqrs_pg package: a child `python -m cqrs_pg` runs this very
# code, whatever its working directory or what else is installed.
PACKAGE_ROOT = str(Path(cqrs_pg.__file__).resolve().parent.parent)


def make_root(prefix: str) -> Path:
    """A new directory under /tmp that the postgres OS user can enter: pytest's own
    temporary directories are mode 700 under root's."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root


@dataclass
class Throwaway:
    """What throwaway_cluster yields: the cluster and the directory it lives under."""

    cluster: DevCluster
    root: Path
    keep_files: bool = False  # set to leave root on disk (a failed run's logs)


@contextmanager
def throwaway_cluster(prefix: str, root: Path | None = None, *, replicas: int = 1, keep_running: bool = False,
                      announce: Callable[[Path], None] | None = None) -> Iterator[Throwaway]:
    """A primary and `replicas` streaming replicas under root/cluster (root: a new
    make_root(prefix) unless given), stopped on exit, and root removed if made here.
    keep_running leaves both (`cqrs-pg demo --keep`); announce(root) runs before the start."""
    made = root is None
    root = make_root(prefix) if root is None else root
    handle = Throwaway(DevCluster(root / "cluster"), root)
    try:
        if announce is not None:
            announce(root)
        handle.cluster.up(replicas=replicas)
        yield handle
    finally:
        if not keep_running:
            try:
                handle.cluster.down()
            finally:
                if made and not handle.keep_files:
                    shutil.rmtree(root, ignore_errors=True)


def wait_until(predicate: Callable[[], object], what: str = "a condition", timeout: float = 30.0,
               interval: float = 0.02, raises: Callable[[str], BaseException] = AssertionError) -> None:
    """Poll predicate until it is true; after timeout seconds raise `raises` naming `what`
    (a tool passes its own error, one its command line reports in one line)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise raises(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def outbox_count(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone()
    assert row is not None
    return int(row[0])


@dataclass
class Database:
    """One database, on a primary and (replicated) on its replica."""

    name: str
    dsn: str
    replica_dsn: str

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)

    def connect_replica(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.replica_dsn, autocommit=True, **kwargs)

    def run_projections(self, rounds: int = 100, batch_size: int = 1000) -> int:
        """Apply every pending event synchronously, as the daemon would, in batches of up
        to batch_size; returns the count."""
        total = 0
        with self.connect() as conn:
            projections = conn.execute("SELECT name, kind FROM cqrs.projections").fetchall()
            for _ in range(rounds):
                applied = sum(_run_projection(conn, name, kind, batch_size) for name, kind in projections)
                total += applied
                if not applied:
                    return total
        raise AssertionError("projections did not drain")

    def wait_caught_up(self, token: int, timeout: float = 30.0, replica: bool = True, interval: float = 0.01,
                       raises: Callable[[str], BaseException] = AssertionError) -> None:
        """Until cqrs.caught_up(token) holds on the replica (or the primary); see wait_until."""
        with self.connect_replica() if replica else self.connect() as conn:
            wait_until(lambda: _scalar(conn, "SELECT cqrs.caught_up(%s)", (token,)),
                       f"token {token} to be caught up", timeout, interval, raises)


def _scalar(conn: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _run_projection(conn: psycopg.Connection, name: str, kind: str, batch_size: int) -> int:
    if kind == "python":  # its handler, registered in this process
        handler = handler_for(name)
        assert handler is not None, f"no handler registered for python projection {name!r}"
        return run_batch(conn, name, handler, batch_size).applied
    return int(_scalar(conn, "SELECT applied FROM cqrs.run_projection(%s, %s, '0 s')", (name, batch_size)))


def create_template(admin_dsn: str, dsn_of: Callable[[str], str], name: str, example: str | None = "shop") -> str:
    """A database migrated to head (the engine, and with example that example): the one a
    tool runs in, or a template for clone() to copy (migrating once, not once per test)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate(dsn_of(name), example=example)
    return name


def clone(admin_dsn: str, template: str | None, name: str) -> None:
    """A new database: a copy of template, or empty (template None)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))


def drop(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def wait_for_database(dsn: str, timeout: float = 30.0) -> None:
    """A database created on the primary exists on the replica once its WAL is replayed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextmanager
def running_daemon(dsn: str, **overrides: Any) -> Iterator[Listener]:
    """The daemon (cqrs_pg.daemon.Listener) in a thread of this process, stopped on exit.
    A view refreshes every 0.1 s unless overridden."""
    config = ListenerConfig(dsn=dsn, **{"refresh_interval": 0.1, **overrides})
    listener = Listener(config)
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        listener.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "daemon did not stop"


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
