"""`cqrs-pg listen`: the daemon that keeps every projection up to date.

The loop is small on purpose; the correctness lives in SQL (cqrs.run_projection):
each call applies one batch and advances that projection's checkpoint in one
transaction, so a daemon killed at any moment resumes exactly where it committed.
See sql/cqrs/DESIGN.md, also for the wake-up protocol.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg

from cqrs_pg.db import connect, redact, require_migrated
from cqrs_pg.errors import CqrsPgError, DatabaseUnavailable

logger = logging.getLogger("cqrs_pg.daemon")

CHANNEL = "cqrs_outbox"
# Wait for notifications in slices this long, so a stop request is seen promptly.
WAIT_SLICE = 0.25


@dataclass
class ListenerConfig:
    dsn: str
    batch_size: int = 5000
    # Fallback when no doorbell rings: correctness never depends on NOTIFY.
    poll_interval: float = 1.0
    # Stay awake (polling every linger_poll) this long after the last event, so a busy
    # stream of commands never has to ring the doorbell at all.
    linger: float = 0.2
    linger_poll: float = 0.005
    refresh_interval: float = 1.0
    # Batches per projection before giving the others a turn.
    batches_per_turn: int = 10
    projections: list[str] | None = None
    listener_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")


@dataclass
class Progress:
    applied: int = 0
    retry_after: float | None = None

    def add(self, applied: int, retry_after: float | None) -> None:
        self.applied += applied
        if retry_after is not None:
            self.retry_after = retry_after if self.retry_after is None else min(self.retry_after, retry_after)


class Listener:
    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self._stop = threading.Event()
        self.applied_total = 0

    def stop(self) -> None:
        """Ask the daemon to finish its current batch and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Serve until stop(); reconnects with backoff when the connection is lost."""
        backoff = 0.5
        connected_once = False
        logger.info("listening on %s as %s", redact(self.config.dsn), self.config.listener_id)
        while not self.stopping:
            try:
                with connect(self.config.dsn, application_name="cqrs-pg listen") as conn:
                    require_migrated(conn)
                    connected_once = True
                    backoff = 0.5
                    try:
                        self._serve(conn)
                    finally:
                        self._leave(conn)
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                if not connected_once:
                    raise  # a wrong DSN is reported at once; only lost connections are retried
                if self.stopping:
                    break
                logger.warning("connection lost (%s); reconnecting in %.1fs", _first_line(exc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        logger.info("stopped after applying %d events", self.applied_total)

    def _serve(self, conn: psycopg.Connection) -> None:
        cfg = self.config
        conn.execute(f"LISTEN {CHANNEL}")
        names = cfg.projections or [r[0] for r in conn.execute("SELECT name FROM cqrs.projections ORDER BY name")]
        unknown = set(names) - {r[0] for r in conn.execute("SELECT name FROM cqrs.projections")}
        if unknown:
            raise CqrsPgError(f"unknown projection(s): {', '.join(sorted(unknown))}")
        logger.info("projections: %s", ", ".join(names))
        self._heartbeat(conn, sleeping=False)
        sleeping = False
        slept_at = 0.0
        last_event = time.monotonic()
        while not self.stopping:
            progress = self._run_all(conn, names)
            now = time.monotonic()
            if progress.applied:
                if sleeping:
                    self._heartbeat(conn, sleeping=False)
                    sleeping = False
                last_event = now
                continue
            timeout = cfg.poll_interval if progress.retry_after is None else min(cfg.poll_interval, progress.retry_after)
            if now - last_event < cfg.linger:
                self._stop.wait(min(timeout, cfg.linger_poll))
                continue
            if not sleeping or now - slept_at > self._ttl / 3:
                # Going to sleep: ask commands to ring, then look once more, because a
                # command that read "awake" just before may have committed since.
                self._heartbeat(conn, sleeping=True)
                sleeping, slept_at = True, now
                if self._run_all(conn, names).applied:
                    continue
            if self._wait(conn, timeout):
                last_event = time.monotonic()

    def _run_all(self, conn: psycopg.Connection, names: list[str]) -> Progress:
        cfg = self.config
        progress = Progress()
        for name in names:
            for _ in range(cfg.batches_per_turn):
                if self.stopping:
                    return progress
                started = time.monotonic()
                row = conn.execute(
                    "SELECT applied, more, busy, retry_after FROM cqrs.run_projection(%s, %s, make_interval(secs => %s))",
                    (name, cfg.batch_size, cfg.refresh_interval),
                ).fetchone()
                assert row is not None
                applied, more, busy, retry_after = row
                progress.add(applied, retry_after)
                if applied:
                    self.applied_total += applied
                    logger.debug("%s: applied %d events in %.1f ms", name, applied, (time.monotonic() - started) * 1000)
                if not more or busy:
                    break
        return progress

    def _wait(self, conn: psycopg.Connection, timeout: float) -> bool:
        """Wait for the doorbell up to timeout seconds; True if it rang."""
        deadline = time.monotonic() + timeout
        while not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for _ in conn.notifies(timeout=min(WAIT_SLICE, remaining), stop_after=1):
                return True
        return False

    @property
    def _ttl(self) -> float:
        # How long commands keep ringing for a daemon that died asleep.
        return 10.0 + 2 * self.config.poll_interval

    def _heartbeat(self, conn: psycopg.Connection, sleeping: bool) -> None:
        conn.execute(
            "SELECT cqrs.listener_heartbeat(%s, %s, make_interval(secs => %s))",
            (self.config.listener_id, sleeping, self._ttl),
        )

    def _leave(self, conn: psycopg.Connection) -> None:
        try:
            if not conn.closed:
                conn.execute("SELECT cqrs.listener_exit(%s)", (self.config.listener_id,))
        except psycopg.Error:
            pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
