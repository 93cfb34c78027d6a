"""`cqrs-pg listen`: the daemon that keeps every projection up to date.

The loop is small on purpose; the correctness lives in SQL (cqrs.run_projection):
each call applies one batch and advances that projection's checkpoint in one
transaction, so a daemon killed at any moment resumes exactly where it committed.
A python projection's batch is claimed, handed to its registered handler and completed
in one transaction too (cqrs_pg.projections.run_batch).

One connection (the main thread) listens, beats the heart and watches the fence; each
projection runs on a connection of its own, in a thread of its own, so a catch-up uses
every core, and a materialized view's refresh (a whole recompute) does not delay the
other projections' next batch. When the next round starts is cqrs_pg.pacing's: the
daemon's states and its pacing policy, a pure function.
See sql/cqrs/DESIGN.md, also for the wake-up protocol.

Threads, and what each owns:
- the main thread: the listening connection and everything read or sent on it (the
  registrations, heartbeat, marks, fence watch, lag gauges, summary line); the pacing
  state; which projections are served (``_registry``, ``_names``, ``_python``,
  ``_matviews``); starting turns and collecting them (``_running``); closing the
  connections of projections let go, never while their turn runs.
- a projection's turn (a pool thread, one turn per projection at a time): that
  projection's connection (``_workers[name]``) and its entry of ``_trouble``. The main
  thread touches those only while no turn of that projection runs, or drops an entry of a
  projection whose registration is gone (the turn then ends as for any removed projection).
- shared: ``applied`` and ``batches`` (under ``_count_lock``), ``_halted`` (a turn adds the
  projection it halts, the main thread removes those running again), ``_held`` (a turn
  adds its projection when another session holds it and removes it when not; the main
  thread reads it and updates the entries), the metrics (thread-safe), and the stop event.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import psycopg

from cqrs_pg.config import ListenerConfig
from cqrs_pg.db import connect, redact, require_migrated, scalar
from cqrs_pg.errors import CqrsPgError, DatabaseUnavailable, StandbyError, first_line
from cqrs_pg.metrics import Metrics
from cqrs_pg.pacing import BUDGET_WINDOW, WAIT_SLICE, Pace, Round, State, after_busy, after_round, credit_after, pace
from cqrs_pg.projections import handler_for, read_events, run_batch

__all__ = ["CHANNEL", "Listener", "ListenerConfig"]

logger = logging.getLogger("cqrs_pg.daemon")

CHANNEL = "cqrs_outbox"
# Refresh the lag gauges (cqrs.projection_status() counts rows) at most this often.
LAG_INTERVAL = 5.0
# keeping the outbox's partitions ahead of its sequence (cqrs.extend_outbox)
EXTEND_INTERVAL = 60.0
# Waiting for the transactions a lingering look found running, the server waits for a
# command's lock, which its commit releases (cqrs.mark_usable); for any other transaction
# it looks again at once for this long before it sleeps between looks: its sleep's finest
# step is a millisecond, on average half a millisecond after the commit. Only then: under
# load the round's wait follows the apply budget's, and the mark is usually usable by the
# time the round starts.
MARK_SPIN = 0.003
# A session's generic plans for small batches (cqrs._apply_batch) are made from the
# statistics of their first use: made while a read model was empty, a join keeps it on the
# outer side and reads all of it for every batch once it has grown (at 1,200 orders the
# first statement of customer_stats' apply took 0.97 ms a batch instead of 0.16). So each
# connection has its plans made again once the events it applied have doubled since they
# were last made, from REPLAN_FIRST: often while the read models grow from nothing, ever
# more rarely after (an analyze of a grown table makes them again too).
REPLAN_FIRST = 1000
# Read the registrations (projections added, removed, halted, retried) this often.
REGISTRY_INTERVAL = 1.0
# The longest wait before a failing batch is tried again.
MAX_BACKOFF = 30.0
# What the daemon serves: each projection's kind, schemas, state, and whether parked
# events wait to be applied again (cqrs-pg retry).
REGISTRY_SQL = (
    "SELECT p.name, p.kind, p.search_path, p.state,"
    " EXISTS (SELECT 1 FROM cqrs.parked k WHERE k.projection = p.name AND k.retry)"
    " FROM cqrs.projections p ORDER BY p.name"
)
CHECKPOINT_SQL = "SELECT last_position FROM cqrs.projections WHERE name = %s"
FAILED_SQL = "SELECT outcome, position, event_type FROM cqrs.projection_failed(%s, %s, %s, %s, %s)"
CLAIM_PARKED_SQL = "SELECT position, busy, search_path FROM cqrs.claim_parked(%s)"
APPLY_PARKED_SQL = "SELECT cqrs.apply_parked(%s, %s)"
PARKED_FAILED_SQL = "SELECT cqrs.parked_failed(%s, %s, %s, %s)"
# One batch of a sql projection, or a materialized view's refresh.
RUN_SQL = "SELECT applied, more, busy, retry_after FROM cqrs.run_projection(%s, %s, make_interval(secs => %s))"
# A batch of each of several sql projections, in one transaction (a round of small batches).
RUN_SHARED_SQL = (
    "SELECT projection, applied, more, busy, waited FROM cqrs.run_projections(%s, %s, %s,"
    " make_interval(secs => %s), make_interval(secs => %s))"
)
# The fence, and whether committed events wait above it (held back by an open transaction).
FENCE_SQL = "SELECT fence::text, held FROM cqrs.fence_status()"
# Work for a sql or python projection: events it may read now and has not applied; when
# there is some, the round's mark taken in the same statement, on the same read limit
# (NULL: no work; true: a mark was stored, to wait for; false: none needed); with none,
# the settled position, if every position up to it is final. Given a settled position, the
# server first waits up to the given seconds for the sequence to move past it; with none,
# it waits as long for a command in flight at the fence to end, and looks again.
PENDING_SQL = ("SELECT marked, settled_position FROM cqrs.look_for_work(%s, %s, %s,"
               " make_interval(secs => %s))")
# A lingering daemon's look waits on the server at most this long, so that a stop request
# or a refresh that ended is seen soon.
SETTLED_WAIT = 0.05
# A mark read now (True: one was stored), and waiting until the transactions running then
# have ended (True: they have).
MARK_SQL = "SELECT cqrs.take_mark(%s)"
MARK_USABLE_SQL = "SELECT cqrs.mark_usable(%s, make_interval(secs => %s), make_interval(secs => %s))"
# Projections held by another session: their checkpoints, and who holds them.
HELD_SQL = (
    "SELECT name, last_position, events_behind, held_by_pid, held_by_user, held_by_application, held_by_state,"
    " held_seconds FROM cqrs.projection_status() WHERE name = ANY(%s)"
)
# The transaction at the fence: the open one with the oldest xid.
BLOCKER_SQL = (
    "SELECT pid, database, application_name, state, seconds, query_start, query, count(*) OVER ()"
    " FROM cqrs.fence_blockers() ORDER BY age(xid) DESC, seconds DESC LIMIT 1"
)


@dataclass
class Replan:
    """When a connection's plans are made again (REPLAN_FIRST): counts the events applied
    on it."""

    applied: int = 0
    due: int = REPLAN_FIRST

    def after(self, conn: psycopg.Connection, applied: int) -> None:
        """Count a batch's events; at the next doubling, drop the plans (each is made again
        when next used). Between transactions only: DISCARD PLANS keeps prepared statements."""
        self.applied += applied
        if self.applied >= self.due:
            conn.execute("DISCARD PLANS")
            self.due = 2 * self.applied


@dataclass
class Progress:
    applied: int = 0
    retry_after: float | None = None
    # some projection stopped at a full batch: more is waiting right now
    more: bool = False
    # turns still running (a long refresh, a big batch): collected by a later round
    pending: int = 0
    # seconds the longest turn of a sql or python projection worked (turns run in parallel)
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
class Registration:
    kind: str
    search_path: str | None
    state: str
    # parked events wait to be applied again (cqrs-pg retry)
    retry_parked: bool


@dataclass
class Trouble:
    """A projection whose batches fail: where it is on the way from retrying its batch to
    acting on the one event that fails."""

    # batch size of the next try: the configured one, then halved down to 1
    size: int
    first_size: int
    # failed tries at this size (counted at the full size, and at one event)
    attempts: int = 0
    narrowing: bool = False
    next_try: float = 0.0
    # events applied since the first failure: past first_size, the failing batch is passed
    passed: int = 0
    # the checkpoint when the last try began
    after: int | None = None
    error: str = ""
    sqlstate: str | None = None


@dataclass
class Held:
    """A projection this daemon found held by another session since `since` (monotonic):
    normally another daemon's batch; warned about when its checkpoint stands still."""

    since: float
    position: int | None = None
    warned_at: float | None = None


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
        # a view's refresh held back by its interval: when it is due (monotonic; written by
        # its turn, read by the main thread)
        self._view_due: dict[str, float] = {}
        self._running: dict[str, Future[Progress]] = {}
        self._missing_handlers: set[str] = set()
        # projection -> its connection (created on first use, dropped when it fails), and
        # when its plans are made again; the listening connection's (shared rounds)
        self._workers: dict[str, psycopg.Connection] = {}
        self._replans: dict[str, Replan] = {}
        self._replan = Replan()
        self._pool: ThreadPoolExecutor | None = None
        self._count_lock = threading.Lock()
        # the last round stopped at a full batch: the next needs no fresh mark
        self._catching_up = False
        # the linger poll that found work took the next round's mark: whether it stored one
        # to wait for (None: the round takes its own)
        self._marked: bool | None = None
        # ... a look while lingering: the round spins for that mark (MARK_SPIN)
        self._found_lingering = False
        # the last look found no work, every position up to this one final, for these
        # projections (cqrs.look_for_work): until the sequence moves past it, none can come
        # but by an operator's hand
        self._settled: tuple[tuple[str, ...], int] | None = None
        # the apply budget's credit (cqrs_pg.pacing.credit_after) and when it was counted
        self._credit = config.apply_budget * BUDGET_WINDOW
        self._credit_at = time.monotonic()
        # the registrations as last read, and what this daemon serves of them
        self._registry: dict[str, Registration] = {}
        self._registry_due = 0.0
        self._names: list[str] = []
        # projections whose batches fail, and those halted (not run until retried or
        # skipped, or until this process restarts: a new daemon tries the event once more)
        self._trouble: dict[str, Trouble] = {}
        self._halted: set[str] = set()
        # projections found held by another session (a turn adds, and removes once it
        # applies; the main thread watches them)
        self._held: dict[str, Held] = {}
        self._started = False
        self.state = State.LINGERING
        # the periodic summary: when it is due, and the counts it last reported
        self._summary_due = time.monotonic() + config.summary_interval
        self._summarized: dict[str, int] = {}
        self._held_check_due = 0.0
        # outbox upkeep: partitions ahead (now, then every EXTEND_INTERVAL), prune when asked
        self._extend_due = 0.0
        self._prune_due = 0.0

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
        while not self.stopping:
            try:
                with connect(self.config.dsn, application_name="cqrs-pg listen") as conn:
                    require_migrated(conn)
                    if connected_once:
                        self.metrics.reconnected()
                        logger.info("reconnected")
                    else:  # said once the database is there and ready, not before a wrong DSN's error
                        logger.info("listening on %s as %s", redact(self.config.dsn), self.config.listener_id)
                    connected_once = True
                    self._lag_due = 0.0
                    backoff = 0.5
                    try:
                        self._serve(conn)
                    finally:
                        self._finish_turns()
                        self._close_workers()
                        self._leave(conn)
            except (psycopg.OperationalError, DatabaseUnavailable, StandbyError) as exc:
                if not connected_once:
                    raise  # a wrong DSN is reported at once; only lost connections are retried
                if self.stopping:
                    break
                logger.warning("connection lost (%s); reconnecting in %.1fs", first_line(exc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        logger.info("%s", self.summary(), extra={"applied_by_projection": dict(self.applied), "batches": self.batches})

    def _serve(self, conn: psycopg.Connection) -> None:
        """Rounds of every projection's turn, each followed by the state the pacing policy
        (cqrs_pg.pacing) gives; the transitions are all here."""
        cfg = self.config
        _own_timeouts(conn, cfg)
        adopted = scalar(conn, "SELECT cqrs.adopt_cluster()")
        if adopted:
            logger.warning(
                "found transaction ids of another cluster (a logical dump and restore): rebased %d rows "
                "(horizons, marks, receipts); every projection goes on from its checkpoint", adopted,
                extra={"rebased": adopted},
            )
        conn.execute(f"LISTEN {CHANNEL}")
        self._settled = None
        self._replan = Replan()
        self._read_registry(conn, first=not self._registry)
        self._heartbeat(conn, sleeping=False)
        sleeping = False  # what the heartbeat last told commands
        slept_at = 0.0
        last_event = time.monotonic()
        while not self.stopping:
            started = time.monotonic()
            if started >= self._registry_due:
                self._read_registry(conn)
            names = self._serving()
            progress = self._run_all(conn, names)
            ended = time.monotonic()
            self._observe(conn, names, ended, applied=progress.applied)
            if progress.applied:
                last_event = ended
                if sleeping:
                    self._heartbeat(conn, sleeping=False)
                    sleeping = False
            self._credit = credit_after(cfg, self._credit, self._credit_at, ended, progress.work)
            self._credit_at = ended
            done = Round(started=started, ended=ended, last_event=last_event, applied=progress.applied,
                         more=progress.more, work=progress.work, pending=progress.pending, serving=len(names),
                         retry_after=progress.retry_after, credit=self._credit)
            step = pace(cfg, done)
            if step.state is State.BUSY:
                # Events that came during the round: the load goes on, and once its credit
                # is spent the apply budget spaces the rounds (the look took a mark, usable
                # by the next round). None: a quiet moment, lingering at once.
                step = self._enter(after_round(cfg, done, self._work_found(conn, names), time.monotonic()))
                if step.state is State.BUSY:
                    self._stop.wait(max(0.0, step.until - time.monotonic()))
                    step = self._enter(after_busy(cfg, done, time.monotonic()))
                last_event = time.monotonic()
            else:
                step = self._enter(step)
            if step.state in (State.DRAINING, State.REFRESHING):
                continue
            if step.state is State.LINGERING:
                self._linger(conn, names, step.until)
                continue
            # asleep
            if self._asks_doorbell(names) and (not sleeping or time.monotonic() - slept_at > self._ttl / 3):
                # Going to sleep: ask commands to ring, then look once more, because a
                # command that read "awake" just before may have committed since.
                self._heartbeat(conn, sleeping=True)
                sleeping, slept_at = True, time.monotonic()
                if self._run_all(conn, names, every=True).applied:
                    continue
            if self._wait(conn, max(0.0, step.until - time.monotonic())):
                # Awake at once: every command rings until commands read this, and the
                # first rounds may find nothing yet (events above the fence).
                self._heartbeat(conn, sleeping=False)
                sleeping = False
                last_event = time.monotonic()

    def _asks_doorbell(self, names: list[str]) -> bool:
        """Whether commands should ring (NOTIFY) while this daemon sleeps: only for a sql or
        python projection. A view is refreshed at most every refresh_interval, and polling
        finds its events about as soon; ringing for it would cost every command NOTIFY's
        commit lock for nothing."""
        return any((reg := self._registry.get(name)) is not None and reg.kind != "matview" for name in names)

    def _enter(self, step: Pace) -> Pace:
        """The daemon is now in step.state (read by the summary line)."""
        if step.state is not self.state:
            logger.debug("state: %s", step.state.value, extra={"state": step.state.value})
            self.state = step.state
        return step

    def _read_registry(self, conn: psycopg.Connection, first: bool = False) -> None:
        """The registrations as they are now: projections registered since are picked up,
        removed ones let go, halted ones set aside (and, when this process has just started,
        tried once more), retried ones run again."""
        self._registry_due = time.monotonic() + REGISTRY_INTERVAL
        registry = {
            name: Registration(kind, search_path, state, bool(retry))
            for name, kind, search_path, state, retry in conn.execute(REGISTRY_SQL)
        }
        wanted = self.config.projections
        if first and wanted:
            unknown = set(wanted) - set(registry)
            if unknown:
                raise CqrsPgError(f"unknown projection(s): {', '.join(sorted(unknown))}")
        names = [name for name in registry if wanted is None or name in wanted]
        gone = [name for name in self._names if name not in registry]
        for name in gone:
            logger.info("%s: its registration was removed: let go", name, extra={"projection": name})
            self._trouble.pop(name, None)
            self._halted.discard(name)
            self.metrics.halted(name, False)
        if first or not self._started:
            logger.info("projections: %s", ", ".join(names) if names else "none registered yet: waiting for one")
        else:
            for name in names:
                if name not in self._names:
                    logger.info("%s: registered: picked up", name, extra={"projection": name})
        for name in names:
            reg = registry[name]
            if reg.state == "halted":
                if not self._started:
                    # A new daemon tries the event once more (a fix may have been deployed);
                    # failing, the projection halts there again. It never skips it.
                    size = 1 if reg.kind != "matview" else self.config.batch_size
                    self._trouble[name] = Trouble(size=size, first_size=size, narrowing=True)
                elif name not in self._trouble:
                    self._halt(name)
            elif name in self._halted:
                logger.info("%s: running again", name, extra={"projection": name})
                self._halted.discard(name)
                self.metrics.halted(name, False)
        self._started = True
        self._registry = registry
        self._names = names
        self._python = {name: registry[name].search_path or "" for name in names if registry[name].kind == "python"}
        self._matviews = {name: self._matviews.get(name, 0.0) for name in names if registry[name].kind == "matview"}
        with self._count_lock:
            for name in names:
                self.applied.setdefault(name, 0)

    @property
    def serving(self) -> list[str]:
        """The projections it serves now (halted ones included)."""
        return list(self._names)

    def _serving(self) -> list[str]:
        """The projections to run this round: registered, asked for, not halted."""
        return [name for name in self._names if name not in self._halted]

    def _halt(self, name: str) -> None:
        if name not in self._halted:
            self._halted.add(name)
            self.metrics.halted(name, True)

    def _linger(self, conn: psycopg.Connection, names: list[str], until: float) -> None:
        """Awake after recent events: look for work with one cheap query
        (cqrs.look_for_work) and return as soon as there is some, a running turn has ended
        (a refresh, to collect), or at `until`. Each look waits on the server, up to
        SETTLED_WAIT, for what brings work: while every position handed out is final and
        applied (settled), for the outbox's sequence to move, which it reads every
        millisecond for a few microseconds, where a look from here costs a round trip;
        otherwise for the command in flight at the fence to commit. A look that finds
        such a command takes the round's mark, and the round waits for the commit
        (cqrs.mark_usable). Only while a transaction that is no command's holds positions
        back does the server answer at once, and the next look comes a linger_poll later.
        Every wait ends with a look in full, which sees an operator's hand."""
        cfg = self.config
        # within the daemon's own statement_timeout, however short an operator set it
        longest = min(SETTLED_WAIT, cfg.statement_timeout / 2) if cfg.statement_timeout else SETTLED_WAIT
        while not self.stopping:
            if any(f.done() for f in self._running.values()):
                return
            now = time.monotonic()
            remaining = until - now
            if remaining <= 0:
                return
            if self._work_found(conn, names, lingering=True, wait=min(remaining, longest)):
                return
            if self._settled_at(names) is None:
                # positions held back by no command: look again a linger_poll after this look
                # started, not after it answered
                self._stop.wait(max(0.0, min(now + cfg.linger_poll, until) - time.monotonic()))

    def _settled_at(self, names: list[str]) -> int | None:
        """The settled position the last look found for these projections, if any."""
        if self._settled is None or self._settled[0] != tuple(names):
            return None
        return self._settled[1]

    def _work_found(self, conn: psycopg.Connection, names: list[str], lingering: bool = False,
                    wait: float = 0.0) -> bool:
        """Whether a sql or python projection has work (cqrs.look_for_work); when one has, the
        next round's mark is taken in the same statement (lingering: by a look between
        rounds of a light load, whose round spins for it if no command holds it back,
        MARK_SPIN). With wait, the server first waits up to that long for the sequence to
        move when the last look found every position settled, and otherwise for a command
        in flight to end."""
        probe = [name for name in names if name not in self._matviews]
        if not probe:
            return False
        after = self._settled_at(names) if wait > 0 else None
        row = conn.execute(PENDING_SQL, (probe, self.config.listener_id, after, wait)).fetchone()
        marked, settled = row if row is not None else (None, None)
        self._settled = None if settled is None else (tuple(names), settled)
        if marked is None:
            return False
        self._marked = bool(marked)  # the round needs no mark of its own
        self._found_lingering = lingering
        return True

    def _mark(self, conn: psycopg.Connection, wait: float = 0.0) -> None:
        """A mark read now (cqrs.take_mark), and with wait, up to that long (on the server)
        for the transactions running now to end: a round that follows then reads what
        committed up to here. Nothing to wait for when nothing runs, or when no mark was
        needed."""
        stored = scalar(conn, MARK_SQL, (self.config.listener_id,))
        if stored and wait > 0:
            conn.execute(MARK_USABLE_SQL, (self.config.listener_id, wait, 0.0))

    def _run_all(self, conn: psycopg.Connection, names: list[str], every: bool = False) -> Progress:
        """A turn of every projection, each on its own connection, in parallel. The round
        waits for the sql and python projections, not for a materialized view's refresh
        (a whole recompute, which may take seconds): that one runs on and is collected by
        a later round, so it never delays the next batch of the others. With every, the
        round waits for all. A round that follows a full batch (a catch-up) takes no mark:
        there is work enough up to the last one."""
        cfg = self.config
        # the mark to wait for before the round: (wait, spin) for cqrs.mark_usable
        mark: tuple[float, float] | None = None
        if self._marked is not None:  # taken by the look that found the work
            if self._marked and cfg.mark_wait > 0:
                mark = (cfg.mark_wait, MARK_SPIN if self._found_lingering else 0.0)
            self._marked = None
        elif not self._catching_up:
            self._mark(conn, cfg.mark_wait)
        progress = Progress()
        if len(names) == 1:
            if mark is not None:
                conn.execute(MARK_USABLE_SQL, (cfg.listener_id, *mark))
            progress.merge(self._turn(names[0]))
            self._catching_up = progress.more
            return progress
        # While batches are small (not catching up), the sql projections that run well
        # share one statement and one commit; the others, and all in a catch-up, run in
        # parallel, each on its own connection.
        shared = [] if self._catching_up else [
            name for name in names
            if (reg := self._registry.get(name)) is not None and reg.kind == "sql" and not reg.retry_parked
            and name not in self._trouble and name not in self._running
        ]
        if len(shared) < 2:
            shared = []
        assert self._pool is not None, "run() starts the pool"
        now = time.monotonic()
        turns = []
        for name in names:
            if name in self._running or name in shared:
                continue
            due = self._view_due.get(name, 0.0)
            if due > now and not every:  # a view whose refresh waits for its interval: not asked again before
                progress.add(0, due - now)
                continue
            turns.append(name)
        if mark is not None and (turns or not shared):
            conn.execute(MARK_USABLE_SQL, (cfg.listener_id, *mark))
            mark = None
        for name in turns:
            self._running[name] = self._pool.submit(self._turn, name)
        if shared:
            # the shared round's statement waits for the mark itself: one round trip less
            together = self._shared_round(conn, shared, mark)
            if together is None:  # each on its own, now
                for name in shared:
                    self._running[name] = self._pool.submit(self._turn, name)
            else:
                progress.merge(together)
        rounds = [f for name, f in self._running.items() if every or name not in self._matviews]
        if rounds:
            wait(rounds)
        elif not shared:  # only views are running: wait for one, a slice at a time
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
            raise failure  # a turn catches every projection's error: this is a stop (KeyboardInterrupt) or a bug
        for name in list(self._workers):
            if name not in self._names and name not in self._running:
                self._close_worker(name)  # let go
        self._catching_up = progress.more
        return progress

    def _finish_turns(self) -> None:
        """Let running turns end (each stops after its batch in hand) before their
        connections are closed."""
        running, self._running = list(self._running.values()), {}
        wait(running)

    def _turn(self, name: str) -> Progress:
        """Up to batches_per_turn batches of one projection, on its own connection. Any
        error stays with this projection (_failed); the others go on."""
        progress = Progress()
        trouble = self._trouble.get(name)
        if trouble is not None and trouble.next_try > time.monotonic():
            progress.retry_after = trouble.next_try - time.monotonic()
            return progress
        size = self.config.batch_size if trouble is None else trouble.size
        conn: psycopg.Connection | None = None
        try:
            conn = self._worker_conn(name)
            registration = self._registry.get(name)
            if registration is not None and registration.retry_parked:
                self._apply_parked(conn, name)
                registration.retry_parked = False
            if trouble is not None:
                row = conn.execute(CHECKPOINT_SQL, (name,)).fetchone()
                if row is None:
                    raise _Gone(name)
                trouble.after = row[0]
            self._batches(conn, name, size, progress, once=trouble is not None)
        except _Gone:
            self._registry_due = 0.0  # removed: let go at the next read of the registrations
        except Exception as exc:  # noqa: BLE001 - any error of one projection stays with it
            if conn is None or conn.broken or conn.closed or isinstance(exc, DatabaseUnavailable):
                # not the projection's error: its connection is lost (the main one will
                # notice too when the server is down); a new one next round
                self._close_worker(name)
                logger.warning("%s: connection lost (%s); reconnecting", name, first_line(exc),
                               extra={"projection": name})
                progress.retry_after = self.config.poll_interval
            elif isinstance(exc, psycopg.Error) and exc.sqlstate == "CQ002":
                self._registry_due = 0.0  # the registration is gone
            else:
                self._failed(conn, name, exc, size)
                failing = self._trouble.get(name)
                if failing is not None:
                    progress.retry_after = max(0.0, failing.next_try - time.monotonic())
            return progress
        if trouble is not None and self._trouble.get(name) is trouble and progress.applied:
            # a try that applied nothing (a view not due yet, events behind the fence)
            # proves nothing: the trouble stays
            trouble.passed += progress.applied
            if trouble.passed >= trouble.first_size or not progress.more:
                self._trouble.pop(name, None)  # past the batch that failed: a passing problem
                logger.info("%s: applying again after %d failed tr%s", name, trouble.attempts,
                            "y" if trouble.attempts == 1 else "ies", extra={"projection": name})
        return progress

    def _batches(self, conn: psycopg.Connection, name: str, size: int, progress: Progress, once: bool) -> None:
        cfg = self.config
        for _ in range(1 if once else cfg.batches_per_turn):
            if self.stopping:
                break
            started, worked = time.monotonic(), progress.work
            if name in self._python:
                handler = handler_for(name)
                if handler is None:
                    self._no_handler(name)
                    break
                batch = run_batch(conn, name, handler, size)
                applied, more, busy, retry_after = batch.applied, batch.more, batch.busy, None
                progress.work += batch.work_seconds
            else:
                # one statement, its own transaction: one round trip, commit included
                row = conn.execute(RUN_SQL, (name, size, self._refresh_interval(name))).fetchone()
                assert row is not None
                applied, more, busy, retry_after = row
                if name not in self._matviews:  # a refresh keeps to its own budget, and has no apply's plans
                    progress.work += time.monotonic() - started
                    self._replans[name].after(conn, applied)
            progress.add(applied, retry_after, bool(more) and not busy)
            if name in self._matviews:
                if applied:
                    self._matviews[name] = time.monotonic() - started  # the refresh's cost
                self._view_due[name] = 0.0 if retry_after is None else time.monotonic() + retry_after
            self._account(name, applied, busy, time.monotonic() - started, progress.work - worked)
            if not more or busy:
                break

    def _account(self, name: str, applied: int, busy: bool, seconds: float, work: float) -> None:
        """A batch of `name` done (by its turn or a shared round): whether another session
        holds it, the counts, metrics and debug line."""
        if busy:
            self._held.setdefault(name, Held(since=time.monotonic()))
        else:
            self._held.pop(name, None)
        if applied:
            with self._count_lock:
                self.applied[name] = self.applied.get(name, 0) + applied
                self.batches += 1
            self.metrics.batch(name, applied, seconds)
            logger.debug(
                "%s: applied %d events in %.1f ms", name, applied, seconds * 1000,
                extra={"projection": name, "applied": applied, "duration_ms": round(seconds * 1000, 3),
                       "work_ms": round(work * 1000, 3)},
            )

    def _shared_round(
        self, conn: psycopg.Connection, names: list[str], mark: tuple[float, float] | None = None
    ) -> Progress | None:
        """One batch of each of these sql projections in one statement and one commit
        (cqrs.run_projections), on the listening connection: the round while batches are
        small. None when it failed: every batch of it was rolled back, and each projection
        runs on its own instead, where a failure is that projection's alone."""
        progress = Progress()
        started = time.monotonic()
        try:
            wait, spin = mark or (0.0, 0.0)
            rows = conn.execute(
                RUN_SHARED_SQL, (names, self.config.batch_size, self.config.listener_id if mark else None, wait, spin)
            ).fetchall()
        except psycopg.Error as exc:
            if conn.broken:
                raise
            logger.debug("shared round failed, each projection on its own: %s", first_line(exc))
            return None
        seconds = time.monotonic() - started
        # the wait for the mark (commands in flight committing) is no work of the daemon's
        progress.work = max(0.0, seconds - (rows[0][4] if rows else 0.0))
        for name, applied, more, busy, _ in rows:
            progress.add(applied, None, bool(more) and not busy)
            self._account(name, applied, busy, seconds, progress.work)
        self._replan.after(conn, progress.applied)
        return progress

    def _failed(self, conn: psycopg.Connection, name: str, exc: Exception, size: int) -> None:
        """A batch of `name` failed: try it again later, narrow it, or act on the one event
        that fails by the projection's policy."""
        cfg = self.config
        error, sqlstate = _describe(exc)
        self.metrics.projection_error(name)
        trouble = self._trouble.get(name)
        if trouble is None:
            trouble = self._trouble[name] = Trouble(size=size, first_size=size)
        trouble.error, trouble.sqlstate = error, sqlstate
        now = time.monotonic()
        single = size == 1 or name in self._matviews  # a refresh cannot be narrowed
        if not single and trouble.narrowing:
            trouble.size = max(1, size // 2)
            trouble.next_try = now
            logger.info("%s: batch of %d failed again; trying %d events (%s)", name, size, trouble.size, error,
                        extra={"projection": name, "error": error, "sqlstate": sqlstate})
            return
        trouble.attempts += 1
        if trouble.attempts < cfg.retry_attempts:
            backoff = min(cfg.retry_backoff * 2 ** (trouble.attempts - 1), MAX_BACKOFF)
            trouble.next_try = now + backoff
            logger.warning(
                "%s: %s failed (try %d of %d), trying again in %.1fs: %s", name,
                "its event" if size == 1 else f"a batch of up to {size} events", trouble.attempts,
                cfg.retry_attempts, backoff, error,
                extra={"projection": name, "error": error, "sqlstate": sqlstate, "attempts": trouble.attempts},
            )
            return
        if not single:
            # The batch fails every time: find the event that fails, halving the batch.
            trouble.narrowing, trouble.attempts = True, 0
            trouble.size, trouble.next_try = max(1, size // 2), now
            logger.warning("%s: a batch of up to %d events failed %d times: narrowing it to the event that fails",
                           name, size, cfg.retry_attempts, extra={"projection": name, "error": error})
            return
        # The one event after the checkpoint fails every time: act by the policy.
        self._trouble.pop(name, None)
        row = conn.execute(FAILED_SQL, (name, trouble.after, error, sqlstate, trouble.attempts)).fetchone()
        assert row is not None
        outcome, position, event_type = row
        extra = {"projection": name, "position": position, "event_type": event_type, "error": error,
                 "sqlstate": sqlstate, "attempts": trouble.attempts}
        if outcome == "halted":
            self._halt(name)
            logger.error(
                "%s: halted at event %s (%s) after %d tries: %s%s; the other projections go on. Once fixed: "
                "`cqrs-pg retry %s`; to leave the event out: `cqrs-pg skip %s --position %s`",
                name, position, event_type, trouble.attempts, error, f" [SQLSTATE {sqlstate}]" if sqlstate else "",
                name, name, position, extra=extra,
            )
        elif outcome == "parked":
            self.metrics.parked(name)
            logger.warning(
                "%s: parked event %s (%s) after %d tries and went on: %s%s (`cqrs-pg parked %s`)",
                name, position, event_type, trouble.attempts, error, f" [SQLSTATE {sqlstate}]" if sqlstate else "",
                name, extra=extra,
            )

    def _apply_parked(self, conn: psycopg.Connection, name: str) -> None:
        """Apply the parked events `cqrs-pg retry` queued, one transaction each; one that
        fails again stays parked with its new error."""
        while not self.stopping:
            position: int | None = None
            try:
                with conn.transaction():
                    row = conn.execute(CLAIM_PARKED_SQL, (name,)).fetchone()
                    assert row is not None
                    position, busy, search_path = row
                    if busy or position is None:
                        return
                    if name in self._python:
                        handler = handler_for(name)
                        if handler is None:
                            self._no_handler(name)
                            return
                        conn.execute("SELECT set_config('search_path', %s, true)",
                                     (f"pg_catalog, {search_path}, pg_temp",))
                        events = read_events(conn, name, position - 1, position)
                        if events:
                            handler(conn, events)
                    conn.execute(APPLY_PARKED_SQL, (name, position))
                logger.info("%s: parked event %s applied", name, position, extra={"projection": name, "position": position})
            except Exception as exc:
                if position is None or conn.broken or conn.closed:
                    raise
                error, sqlstate = _describe(exc)
                conn.execute(PARKED_FAILED_SQL, (name, position, error, sqlstate))
                logger.warning("%s: parked event %s failed again and stays parked: %s", name, position, error,
                               extra={"projection": name, "position": position, "error": error, "sqlstate": sqlstate})

    def _refresh_interval(self, name: str) -> float:
        """refresh_interval, or longer for a view whose last refresh took more than
        refresh_budget of that: a refresh costs the whole view, not the new events."""
        cost = self._matviews.get(name, 0.0)
        return max(self.config.refresh_interval, cost / self.config.refresh_budget)

    def _worker_conn(self, name: str) -> psycopg.Connection:
        conn = self._workers.get(name)
        if conn is None or conn.closed:
            conn = connect(self.config.dsn, application_name=f"cqrs-pg listen: {name}")
            _own_timeouts(conn, self.config)
            self._workers[name] = conn
            self._replans[name] = Replan()
        return conn

    def _close_worker(self, name: str) -> None:
        self._replans.pop(name, None)
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
        if self._held and now >= self._held_check_due:
            # it counts every projection's backlog: not on every round (another daemon often holds one)
            self._held_check_due = now + max(1.0, self.config.stall_warning / 4)
            self._check_held(conn, now)
        if self.config.summary_interval and now >= self._summary_due:
            self._summary_due = now + self.config.summary_interval
            self._log_summary(conn, names)
        if now >= self._extend_due or (self.config.prune_keep is not None and now >= self._prune_due):
            self._upkeep(conn, now)
        # Look for a stall only when a round applied nothing (or one is under way, to see
        # it end), and at most every few tenths of a second: never on every batch.
        if (not applied or self.stall is not None) and now >= self._fence_check_due:
            self._fence_check_due = now + min(0.25, self.config.stall_warning / 4)
            self._check_fence(conn, now)

    def _upkeep(self, conn: psycopg.Connection, now: float) -> None:
        """The outbox's partitions kept ahead of its sequence; with prune_keep, history
        every reader has passed dropped. A failure (a lock not had within its timeout, a
        grant missing) is logged and tried again next time: it stops nothing else."""
        pruning = self.config.prune_keep is not None and now >= self._prune_due
        self._extend_due = now + EXTEND_INTERVAL
        if pruning:
            self._prune_due = now + self.config.prune_interval
        try:
            with conn.transaction():
                added = [r[0] for r in conn.execute("SELECT cqrs.extend_outbox()::text")]
            if added:
                logger.info("outbox partitions added: %s", ", ".join(added), extra={"partitions": added})
            if pruning:
                with conn.transaction():
                    dropped = conn.execute(
                        "SELECT partition, events, bytes FROM cqrs.prune(make_interval(secs => %s))",
                        (self.config.prune_keep,),
                    ).fetchall()
                if dropped:
                    logger.info(
                        "pruned %d outbox partitions (%d events, %.1f MB): %s", len(dropped),
                        sum(r[1] for r in dropped), sum(r[2] for r in dropped) / 1e6, ", ".join(r[0] for r in dropped),
                        extra={"partitions": [r[0] for r in dropped]},
                    )
        except psycopg.Error as exc:
            if conn.broken:
                raise
            logger.warning("outbox upkeep failed, tried again in %.0fs: %s", EXTEND_INTERVAL, first_line(exc))

    def _check_held(self, conn: psycopg.Connection, now: float) -> None:
        """Projections another session has held for stall_warning while their checkpoint
        stood still and events waited: a WARNING naming that session (another daemon's
        long batch or refresh, or something that should not hold it)."""
        rows = conn.execute(HELD_SQL, (list(self._held),)).fetchall()
        for name, position, behind, pid, user, application, state, seconds in rows:
            held = self._held.get(name)
            if held is None:
                continue
            if held.position != position or not behind:
                held.position, held.since, held.warned_at = position, now, None  # moving, or nothing waits
                continue
            stuck = now - held.since
            if stuck < self.config.stall_warning or (
                held.warned_at is not None and now - held.warned_at < self.config.stall_warning
            ):
                continue
            held.warned_at = now
            who = (f"pid {pid} (user {user}, application {application!r}"
                   + (f", {state}, transaction open {seconds:.0f}s" if state is not None else "") + ")"
                   if pid is not None else "a session no longer found")
            logger.warning(
                "%s: held by %s for %.0fs while %d events wait: it applies nothing meanwhile", name, who, stuck,
                behind,
                extra={"projection": name, "pid": pid, "username": user, "application_name": application,
                       "state": state, "held_seconds": round(stuck, 3), "events_behind": behind},
            )

    def _log_summary(self, conn: psycopg.Connection, names: list[str]) -> None:
        """At INFO, one line: events applied since the last, how far behind, the state."""
        with self._count_lock:
            applied = {name: n - self._summarized.get(name, 0) for name, n in self.applied.items()}
            self._summarized = dict(self.applied)
        served = set(names)
        behind = [
            (events, seconds, name) for name, events, seconds in conn.execute(
                "SELECT name, events_behind, seconds_behind FROM cqrs.projection_status()"
            ) if name in served
        ]
        events, seconds, slowest = max(behind, key=lambda b: (b[1], b[0]), default=(0, 0.0, None))
        halted = sorted(self._halted)
        total = sum(applied.values())
        logger.info(
            "%s: applied %d event%s in %.0fs%s; %s%s", self.state.value, total, "" if total == 1 else "s",
            self.config.summary_interval,
            f" ({', '.join(f'{name} {n}' for name, n in applied.items() if n)})" if total else "",
            f"behind: {events} events, {seconds:.1f}s ({slowest})" if slowest and events else "caught up",
            f"; halted: {', '.join(halted)}" if halted else "",
            extra={"state": self.state.value, "applied": total, "applied_by_projection": applied,
                   "events_behind": events, "seconds_behind": round(seconds, 3), "halted": halted},
        )

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


class _Gone(Exception):
    """The projection's registration was removed."""


def _own_timeouts(conn: psycopg.Connection, cfg: ListenerConfig) -> None:
    """The daemon's timeouts on one of its connections, whatever the database's defaults:
    its statements and lock waits bounded by its own settings, and idle connections (the
    listening one waits between polls) never ended."""
    conn.execute(
        "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false),"
        " set_config('idle_in_transaction_session_timeout', '0', false), set_config('idle_session_timeout', '0', false)",
        (f"{round(cfg.statement_timeout * 1000)}ms", f"{round(cfg.lock_timeout * 1000)}ms"),
    )


def _describe(exc: Exception) -> tuple[str, str | None]:
    """A projection's error in one line, and its SQLSTATE (None: not from the server)."""
    if isinstance(exc, psycopg.Error):
        return (exc.diag.message_primary or first_line(exc)), exc.sqlstate
    return f"{type(exc).__name__}: {first_line(exc)}", None

