"""`cqrs-pg listen`: the daemon that keeps every projection up to date.

The loop is small on purpose; the correctness lives in SQL (cqrs.run_projection):
each call applies one batch and advances that projection's checkpoint in one
transaction, so a daemon killed at any moment resumes exactly where it committed.
A python projection's batch is claimed, handed to its registered handler and completed
in one transaction too (cqrs_pg.projections.run_batch).

One connection (the main thread) listens, beats the heart and watches the fence; each
projection runs on a connection of its own, in a thread of its own, so a catch-up uses
every core, and a materialized view's refresh (a whole recompute) does not delay the
other projections' next batch.
See sql/cqrs/DESIGN.md, also for the wake-up protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import psycopg

from cqrs_pg.db import connect, redact, require_migrated, scalar
from cqrs_pg.errors import CqrsPgError, DatabaseUnavailable
from cqrs_pg.metrics import Metrics
from cqrs_pg.projections import handler_for, run_batch

logger = logging.getLogger("cqrs_pg.daemon")

CHANNEL = "cqrs_outbox"
# Wait for notifications in slices this long, so a stop request is seen promptly.
WAIT_SLICE = 0.25
# Refresh the lag gauges (cqrs.projection_status() counts rows) at most this often.
LAG_INTERVAL = 5.0
# One batch of a sql projection, or a materialized view's refresh.
RUN_SQL = "SELECT applied, more, busy, retry_after FROM cqrs.run_projection(%s, %s, make_interval(secs => %s))"
# The fence, and whether committed events wait above it (held back by an open transaction).
FENCE_SQL = "SELECT fence::text, held FROM cqrs.fence_status()"
# Work for a sql or python projection: events it may read now and has not applied.
PENDING_SQL = "SELECT cqrs.work_pending(%s)"
# A mark read now (True: one was stored), and waiting until the transactions running then
# have ended (True: they have).
MARK_SQL = "SELECT cqrs.take_mark(%s)"
MARK_USABLE_SQL = "SELECT cqrs.mark_usable(%s, make_interval(secs => %s))"
# The transaction at the fence: the open one with the oldest xid.
BLOCKER_SQL = (
    "SELECT pid, database, application_name, state, seconds, query_start, query, count(*) OVER ()"
    " FROM cqrs.fence_blockers() ORDER BY age(xid) DESC, seconds DESC LIMIT 1"
)


@dataclass
class ListenerConfig:
    dsn: str
    batch_size: int = 5000
    # Fallback when no doorbell rings: correctness never depends on NOTIFY.
    poll_interval: float = 1.0
    # Stay awake this long after the last event, so a busy stream of commands never has to
    # ring the doorbell at all; meanwhile look for work every linger_poll with one cheap
    # query (cqrs.work_pending) and start a round as soon as there is some.
    linger: float = 0.2
    linger_poll: float = 0.002
    # While events keep coming, start a round at most once per batch_delay: batches grow
    # with the load instead of the daemon spinning on tiny ones, whose fixed cost (round
    # trips, planning, a commit each) would compete with the commands. After a quiet spell
    # the next event starts a round at once.
    batch_delay: float = 0.01
    # ... and no sooner than w / apply_budget after it started, w being the longest time a
    # projection of the round worked on its batches before committing (the commit waits
    # for the disk, not the CPU). On a loaded server that work waits for the CPU too:
    # rounds come less often, their batches grow and the per-batch fixed cost falls, so
    # the daemon leaves the commands their CPU; latency under load grows instead (never
    # past poll_interval).
    apply_budget: float = 0.25
    # Before a round, take a mark (cqrs.take_mark) and wait up to this long for the
    # transactions running then to end: the round then reads everything committed up to
    # its start, not only what earlier marks cover (sql/cqrs/DESIGN.md). A mark is also
    # taken as each wait between rounds begins: usable by the time the next round starts,
    # whatever this wait finds.
    mark_wait: float = 0.01
    refresh_interval: float = 1.0
    # A materialized view's refresh recomputes all of it: keep the share of time spent
    # refreshing it at most this, by waiting longer between refreshes than
    # refresh_interval when the last one took more than refresh_budget of it.
    refresh_budget: float = 0.1
    # Batches per projection before giving the others a turn.
    batches_per_turn: int = 10
    projections: list[str] | None = None
    # Warn when committed events have waited this long behind an open transaction, and
    # again every stall_warning seconds while they still wait.
    stall_warning: float = 30.0
    # Serve Prometheus metrics on this port (0: any free port; None: not served).
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    listener_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")


@dataclass
class Progress:
    applied: int = 0
    retry_after: float | None = None
    # some projection stopped at a full batch: more is waiting right now
    more: bool = False
    # turns still running (a long refresh, a big batch): collected by a later round
    pending: int = 0
    # seconds the longest turn of a sql or python projection worked, commits left out
    # (turns run in parallel)
    work: float = 0.0

    def add(self, applied: int, retry_after: float | None, more: bool = False) -> None:
        self.applied += applied
        self.more = self.more or more
        if retry_after is not None:
            self.retry_after = retry_after if self.retry_after is None else min(self.retry_after, retry_after)

    def merge(self, other: Progress) -> None:
        self.add(other.applied, other.retry_after, other.more)
        self.work = max(self.work, other.work)


@dataclass
class Stall:
    """Committed events held back by the fence, which has stayed at one value since `since`."""

    fence: str
    since: float
    warned_at: float | None = None


class Listener:
    def __init__(self, config: ListenerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self._stop = threading.Event()
        # What it applied, for its goodbye line: events per projection (an event counts once
        # for each projection that applied it) and the batches that applied any.
        self.applied: dict[str, int] = {}
        self.batches = 0
        self.stall: Stall | None = None
        self._fence_check_due = 0.0
        self._lag_due = 0.0
        # python projections: name -> search_path; those without a handler, logged once
        self._python: dict[str, str] = {}
        self._matviews: dict[str, float] = {}
        self._running: dict[str, Future[Progress]] = {}
        self._missing_handlers: set[str] = set()
        # projection -> its connection (created on first use, dropped when it fails)
        self._workers: dict[str, psycopg.Connection] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._count_lock = threading.Lock()
        # the last round stopped at a full batch: the next needs no fresh mark
        self._catching_up = False

    def stop(self) -> None:
        """Ask the daemon to finish its current batch and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def applied_total(self) -> int:
        """Events applied, summed over the projections: an event that three projections
        applied counts three times."""
        return sum(self.applied.values())

    def summary(self) -> str:
        """What it applied, for its goodbye line: events per projection, and batches."""
        counts = self.applied
        if not counts:
            return "stopped after applying no events: no projections"
        batches = f"{self.batches} batch{'' if self.batches == 1 else 'es'}"
        projections = f"{len(counts)} projection{'' if len(counts) == 1 else 's'}"
        if len(set(counts.values())) == 1:
            (each,) = set(counts.values())
            to = "to" if len(counts) == 1 else "to each of"
            return f"stopped after applying {each} event{'' if each == 1 else 's'} {to} {projections} ({batches})"
        per = ", ".join(f"{name} {n}" for name, n in counts.items())
        return f"stopped after applying events to {projections} ({batches}): {per}"

    def run(self) -> None:
        """Serve until stop(); reconnects with backoff when the connection is lost."""
        if self.config.metrics_port is not None:
            try:
                port = self.metrics.serve(self.config.metrics_port, self.config.metrics_addr)
            except OSError as exc:
                raise CqrsPgError(f"cannot serve metrics on port {self.config.metrics_port}: {exc.strerror or exc}") from exc
            logger.info(
                "serving Prometheus metrics on http://%s:%d/metrics", self.config.metrics_addr, port,
                extra={"metrics_port": port},
            )
        self._pool = ThreadPoolExecutor(thread_name_prefix="projection")
        try:
            self._run()
        finally:
            self._close_workers()
            self._pool.shutdown()
            self.metrics.close()

    def _run(self) -> None:
        backoff = 0.5
        connected_once = False
        logger.info("listening on %s as %s", redact(self.config.dsn), self.config.listener_id)
        while not self.stopping:
            try:
                with connect(self.config.dsn, application_name="cqrs-pg listen") as conn:
                    require_migrated(conn)
                    if connected_once:
                        self.metrics.reconnected()
                        logger.info("reconnected")
                    connected_once = True
                    self._lag_due = 0.0
                    backoff = 0.5
                    try:
                        self._serve(conn)
                    finally:
                        self._finish_turns()
                        self._close_workers()
                        self._leave(conn)
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                if not connected_once:
                    raise  # a wrong DSN is reported at once; only lost connections are retried
                if self.stopping:
                    break
                logger.warning("connection lost (%s); reconnecting in %.1fs", _first_line(exc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        logger.info("%s", self.summary(), extra={"applied_by_projection": dict(self.applied), "batches": self.batches})

    def _serve(self, conn: psycopg.Connection) -> None:
        cfg = self.config
        conn.execute(f"LISTEN {CHANNEL}")
        names = cfg.projections or [r[0] for r in conn.execute("SELECT name FROM cqrs.projections ORDER BY name")]
        registered = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT name, kind, search_path FROM cqrs.projections")}
        unknown = set(names) - set(registered)
        if unknown:
            raise CqrsPgError(f"unknown projection(s): {', '.join(sorted(unknown))}")
        self._python = {name: registered[name][1] for name in names if registered[name][0] == "python"}
        # matview projections: name -> seconds its last refresh took
        self._matviews = {name: 0.0 for name in names if registered[name][0] == "matview"}
        logger.info("projections: %s", ", ".join(names))
        with self._count_lock:
            for name in names:
                self.applied.setdefault(name, 0)
        self._heartbeat(conn, sleeping=False)
        sleeping = False
        slept_at = 0.0
        last_event = time.monotonic()
        while not self.stopping:
            started = time.monotonic()
            progress = self._run_all(conn, names)
            now = time.monotonic()
            self._observe(conn, names, now, applied=progress.applied)
            if progress.pending == len(names):
                continue  # only refreshes running, none ended within WAIT_SLICE
            if progress.applied:
                if sleeping:
                    self._heartbeat(conn, sleeping=False)
                    sleeping = False
                last_event = now
                if progress.more:
                    continue
                spacing = min(max(cfg.batch_delay, progress.work / cfg.apply_budget), cfg.poll_interval)
                self._mark(conn)  # usable by the next round: whatever commits meanwhile waits less
                self._stop.wait(max(0.0, started + spacing - time.monotonic()))
                # linger counts from here: a long spacing is no quiet spell
                now = last_event = time.monotonic()
            timeout = cfg.poll_interval if progress.retry_after is None else min(cfg.poll_interval, progress.retry_after)
            if progress.pending:  # awake while a refresh runs
                self._linger(conn, names, now + min(timeout, WAIT_SLICE))
                continue
            if now - last_event < cfg.linger:
                self._linger(conn, names, min(last_event + cfg.linger, now + timeout))
                continue
            if not sleeping or now - slept_at > self._ttl / 3:
                # Going to sleep: ask commands to ring, then look once more, because a
                # command that read "awake" just before may have committed since.
                self._heartbeat(conn, sleeping=True)
                sleeping, slept_at = True, now
                if self._run_all(conn, names, every=True).applied:
                    continue
            if self._wait(conn, timeout):
                # Awake at once: every command rings until commands read this, and the
                # first rounds may find nothing yet (events above the fence).
                self._heartbeat(conn, sleeping=False)
                sleeping = False
                last_event = time.monotonic()

    def _linger(self, conn: psycopg.Connection, names: list[str], until: float) -> None:
        """Awake after recent events: look for work every linger_poll with one cheap query
        (cqrs.work_pending) and return as soon as there is some, a running turn has ended
        (a refresh, to collect), or at `until`."""
        probe = [name for name in names if name not in self._matviews]
        while not self.stopping:
            if any(f.done() for f in self._running.values()):
                return
            if probe and scalar(conn, PENDING_SQL, (probe,)):
                return
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(min(self.config.linger_poll, remaining))

    def _mark(self, conn: psycopg.Connection, wait: float = 0.0) -> None:
        """A mark read now (cqrs.take_mark), and with wait, up to that long (on the server)
        for the transactions running now to end: a round that follows then reads what
        committed up to here. Nothing to wait for when nothing runs, or when no mark was
        needed."""
        stored = scalar(conn, MARK_SQL, (self.config.listener_id,))
        if stored and wait > 0:
            conn.execute(MARK_USABLE_SQL, (self.config.listener_id, wait))

    def _run_all(self, conn: psycopg.Connection, names: list[str], every: bool = False) -> Progress:
        """A turn of every projection, each on its own connection, in parallel. The round
        waits for the sql and python projections, not for a materialized view's refresh
        (a whole recompute, which may take seconds): that one runs on and is collected by
        a later round, so it never delays the next batch of the others. With every, the
        round waits for all. A round that follows a full batch (a catch-up) takes no mark:
        there is work enough up to the last one."""
        if not self._catching_up:
            self._mark(conn, self.config.mark_wait)
        progress = Progress()
        if len(names) == 1:
            progress.merge(self._turn(names[0]))
            self._catching_up = progress.more
            return progress
        assert self._pool is not None, "run() starts the pool"
        for name in names:
            if name not in self._running:
                self._running[name] = self._pool.submit(self._turn, name)
        rounds = [f for name, f in self._running.items() if every or name not in self._matviews]
        if rounds:
            wait(rounds)
        else:  # only views are running: wait for one, a slice at a time
            wait(self._running.values(), timeout=WAIT_SLICE, return_when=FIRST_COMPLETED)
        failure: BaseException | None = None
        for name, future in list(self._running.items()):
            if not future.done():
                progress.pending += 1
                continue
            del self._running[name]
            try:
                progress.merge(future.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, once every ended turn is collected
                failure = failure or exc
        if failure is not None:
            raise failure
        self._catching_up = progress.more
        return progress

    def _finish_turns(self) -> None:
        """Let running turns end (each stops after its batch in hand) before their
        connections are closed."""
        running, self._running = list(self._running.values()), {}
        wait(running)

    def _turn(self, name: str) -> Progress:
        """Up to batches_per_turn batches of one projection, on its own connection."""
        cfg = self.config
        progress = Progress()
        conn = self._worker_conn(name)
        try:
            for _ in range(cfg.batches_per_turn):
                if self.stopping:
                    break
                started, worked = time.monotonic(), progress.work
                if name in self._python:
                    handler = handler_for(name)
                    if handler is None:
                        self._no_handler(name)
                        break
                    batch = run_batch(conn, name, handler, cfg.batch_size)
                    applied, more, busy, retry_after = batch.applied, batch.more, batch.busy, None
                    progress.work += batch.work_seconds
                else:
                    params = (name, cfg.batch_size, self._refresh_interval(name))
                    if name in self._matviews:  # a refresh keeps to its own budget
                        row = conn.execute(RUN_SQL, params).fetchone()
                    else:
                        with conn.transaction():  # to time the work apart from the commit
                            row = conn.execute(RUN_SQL, params).fetchone()
                            progress.work += time.monotonic() - started
                    assert row is not None
                    applied, more, busy, retry_after = row
                progress.add(applied, retry_after, bool(more) and not busy)
                if name in self._matviews and applied:
                    self._matviews[name] = time.monotonic() - started  # the refresh's cost
                if applied:
                    with self._count_lock:
                        self.applied[name] = self.applied.get(name, 0) + applied
                        self.batches += 1
                    seconds = time.monotonic() - started
                    self.metrics.batch(name, applied, seconds)
                    logger.debug(
                        "%s: applied %d events in %.1f ms", name, applied, seconds * 1000,
                        extra={
                            "projection": name, "applied": applied, "duration_ms": round(seconds * 1000, 3),
                            "work_ms": round((progress.work - worked) * 1000, 3),  # commit left out
                        },
                    )
                if not more or busy:
                    break
        except BaseException:
            self._close_worker(name)
            raise
        return progress

    def _refresh_interval(self, name: str) -> float:
        """refresh_interval, or longer for a view whose last refresh took more than
        refresh_budget of that: a refresh costs the whole view, not the new events."""
        cost = self._matviews.get(name, 0.0)
        return max(self.config.refresh_interval, cost / self.config.refresh_budget)

    def _worker_conn(self, name: str) -> psycopg.Connection:
        conn = self._workers.get(name)
        if conn is None or conn.closed:
            conn = self._workers[name] = connect(self.config.dsn, application_name=f"cqrs-pg listen: {name}")
        return conn

    def _close_worker(self, name: str) -> None:
        conn = self._workers.pop(name, None)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _close_workers(self) -> None:
        for name in list(self._workers):
            self._close_worker(name)

    def _no_handler(self, name: str) -> None:
        if name not in self._missing_handlers:
            self._missing_handlers.add(name)
            logger.error(
                "%s: a python projection with no handler registered: skipped (register one with "
                "cqrs_pg.projections.register(%r) in a module given to --import)", name, name,
                extra={"projection": name},
            )

    def _observe(self, conn: psycopg.Connection, names: list[str], now: float, applied: int) -> None:
        """Between rounds: the lag gauges (when served) and the fence-stall watch."""
        if self.metrics.serving and now >= self._lag_due:
            self._lag_due = now + LAG_INTERVAL
            served = set(names)
            for name, events, seconds in conn.execute(
                "SELECT name, events_behind, seconds_behind FROM cqrs.projection_status()"
            ):
                if name in served:
                    self.metrics.lag(name, events, seconds)
        # Look for a stall only when a round applied nothing (or one is under way, to see
        # it end), and at most every few tenths of a second: never on every batch.
        if (not applied or self.stall is not None) and now >= self._fence_check_due:
            self._fence_check_due = now + min(0.25, self.config.stall_warning / 4)
            self._check_fence(conn, now)

    def _check_fence(self, conn: psycopg.Connection, now: float) -> None:
        row = conn.execute(FENCE_SQL).fetchone()
        assert row is not None
        fence, held = row
        stall = self.stall
        if stall is not None and (not held or fence != stall.fence):
            # The fence moved (or nothing waits): that blocker has ended.
            self._stall_over(now)
            stall = None
        if held and stall is None:
            stall = self.stall = Stall(fence, now)
        seconds = 0.0 if stall is None else now - stall.since
        self.metrics.fence_blocked(seconds)
        if (
            stall is not None
            and seconds >= self.config.stall_warning
            and (stall.warned_at is None or now - stall.warned_at >= self.config.stall_warning)
        ):
            stall.warned_at = now
            self._warn_stall(conn, seconds)

    def _warn_stall(self, conn: psycopg.Connection, seconds: float) -> None:
        row = conn.execute(BLOCKER_SQL).fetchone()
        if row is None:
            logger.warning(
                "projections stalled for %.0fs: committed events wait behind the xmin fence, "
                "but no open transaction holds an xid now (it may just have ended)",
                seconds, extra={"stalled_seconds": round(seconds, 3)},
            )
            return
        pid, database, application, state, age, query_start, query, blockers = row
        query = " ".join((query or "").split())
        if len(query) > 100:
            query = query[:99] + "…"
        logger.warning(
            "projections stalled for %.0fs: committed events wait behind an open transaction holding an xid; "
            "oldest: pid %s (database %s, application %r, state %s, open %.1fs, query started %s)%s: %s",
            seconds, pid, database, application or "", state, age or 0.0,
            query_start.isoformat(timespec="seconds") if query_start else "n/a",
            f", {blockers - 1} more open" if blockers > 1 else "", query or "n/a",
            extra={
                "stalled_seconds": round(seconds, 3),
                "pid": pid,
                "database": database,
                "application_name": application,
                "state": state,
                "blocker_seconds": None if age is None else round(age, 3),
                "query_start": query_start.isoformat() if query_start else None,
                "query": query,
                "blockers": blockers,
            },
        )

    def _stall_over(self, now: float) -> None:
        stall, self.stall = self.stall, None
        self.metrics.fence_blocked(0.0)
        if stall is not None and stall.warned_at is not None:
            seconds = now - stall.since
            logger.info(
                "projections moving again: the fence stall ended after %.1fs", seconds,
                extra={"stalled_seconds": round(seconds, 3)},
            )

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
