"""Part 3: end-to-end latency, command commit -> effect visible on the replica, beside the
bare replication latency measured the same way in the same run.

One database, the real `cqrs-pg listen` running on it (its defaults) throughout. Two
schedules:

- one after another (--serial commands): one connection issues a command, then asks the
  replica again as soon as each answer comes until its effect is there, then issues the
  next: what a client that reads its own write after every command sees, timed to a
  round trip (about 0.15 ms) instead of a poll period.
- fixed rates: an open-loop schedule issues commands at a fixed rate (command i is due at
  t0 + i / rate, whatever happened to the ones before), spread over several client
  connections; a client still busy when a command is due starts it late, and that
  lateness is reported.

Two kinds of run for each, interleaved in a shuffled order in every round:

- command:     SELECT ... FROM shop.place_order(...) (2 lines). Visible = its row in
               shop_read.order_summary on the replica with both lines (line_count = 2);
               also recorded: when cqrs.caught_up(token, 'order_summary') turns true there
               (read-your-writes as a client would see it).
- replication: INSERT of one row into a plain table, no trigger, no daemon work. Visible =
               the row on the replica. This is the floor any replica read pays.

One after another, a third kind shows what an application sees through the library:

- router:      the same command through cqrs_pg.routing.Router (router.command), then the
               order's row read through it with consistent_with=token and
               projection='order_summary' (its own wait: cqrs.caught_up polled on the
               replica connection the read then uses). Visible = that read returned the
               row with both lines; no watcher.

At the rates one watcher connection on the replica, in a thread of its own, asks every
--poll-ms (from the start of one poll to the next) which of the committed and not yet
seen ids are visible (primary-key look-ups of at most 1,000 ids) and which tokens
caught_up holds for (asked in ascending order up to the first that does not). A sighting is
timed at the middle of that poll's round trip: latency = sighting - commit returned, an
upper bound that is late by up to one poll period for both kinds alike. The first
--latency-warmup seconds of each run (a tenth of the commands one after another) are not
counted.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from cqrs_pg.errors import CqrsPgError, first_line
from cqrs_pg.routing import Router
from cqrs_pg_tools.bench._common import (
    OTHER_CPU_WARNING,
    BenchError,
    CpuWatch,
    DaemonCpu,
    Session,
    fmt_spread,
    percentile,
    seed_uuid,
    spread,
)

KINDS = ("command", "replication")
# One after another only: the command and its consistent read through Router.
ROUTER = "router"
# Read-your-writes (caught_up true on the replica), at every rate and one after another.
TARGET_P50_MS = 3.0
TARGET_P99_MS = 10.0
# The rate that stands for "one after another" in runs and results.
SERIAL = 0
# Ids asked about per poll; a backlog beyond that is looked at oldest first.
WATCH_LIMIT = 1000
# After the last command: how long stragglers may take to become visible.
STRAGGLERS_SECONDS = 60.0

COMMAND_SQL = "SELECT aggregate_id, token FROM shop.place_order(%s, %s, %s)"
PING_SQL = "INSERT INTO cqrs_bench.ping (id) VALUES (%s)"
# The daemon's part of a command's latency, by the primary's clock (track_commit_timestamp):
# from the command's commit to that of the last round that wrote the order's row (no later
# command touches it), each taken as its commit record is written, before its flush.
APPLIED_SQL = (
    "SELECT extract(epoch FROM pg_xact_commit_timestamp(s.xmin)"
    " - pg_xact_commit_timestamp((o.tx_id::text::bigint %% 4294967296)::text::xid))::float8"
    " FROM cqrs.outbox o JOIN shop_read.order_summary s ON s.order_id = o.aggregate_id"
    " WHERE o.aggregate_id = ANY(%s) AND o.event_type = 'order.created'"
)
PING_TABLE_SQL = (
    "CREATE SCHEMA IF NOT EXISTS cqrs_bench;"
    " CREATE TABLE cqrs_bench.ping (id uuid PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"
)
# caught_up(token) holds for every token below the projection's horizon: of the tokens in
# ascending order, the ones it holds for come first. The watcher asks for them in that
# order up to the first that does not hold: one call a poll and one a token caught up,
# not one for every waiting token at every poll (tens of them at 500/s, every
# millisecond), which would load the replica it watches. A token is still reported only
# when its own call said true.
WATCH_SQL = {
    "command": """
        WITH RECURSIVE toks(a) AS (SELECT %(tokens)s::bigint[]),
        walk(i) AS (  -- i tokens caught up, the next asked while one is left
            SELECT 0
            UNION ALL
            SELECT i + 1 FROM walk, toks
             WHERE CASE WHEN i < cardinality(a) THEN cqrs.caught_up(a[i + 1], 'order_summary') ELSE false END)
        SELECT array(SELECT s.order_id FROM shop_read.order_summary s
                      WHERE s.order_id = ANY(%(ids)s::uuid[]) AND s.line_count = 2),
               array(SELECT a[i] FROM walk, toks WHERE i > 0 ORDER BY i)""",
    "replication": """
        SELECT array(SELECT p.id FROM cqrs_bench.ping p WHERE p.id = ANY(%(ids)s::uuid[])), '{}'::bigint[]""",
}
# The watcher's look-ups by primary key stay index scans as the tables grow during a run:
# psycopg prepares a statement after five executions, and a generic plan made while the
# tables were small would scan them whole for the rest of the run, each poll costing the
# replica more as they grow.
WATCHER_SETUP_SQL = "SET enable_seqscan = off"
# One after another: is this one command's effect there yet.
# Through Router: the order's row, read once the replica has caught up with the command.
ROUTER_READ_SQL = "SELECT line_count FROM shop_read.order_summary WHERE order_id = %s"
SERIAL_WATCH_SQL = {
    "command": """
        SELECT EXISTS (SELECT 1 FROM shop_read.order_summary s WHERE s.order_id = %(id)s AND s.line_count = 2),
               cqrs.caught_up(%(token)s, 'order_summary')""",
    "replication": "SELECT EXISTS (SELECT 1 FROM cqrs_bench.ping p WHERE p.id = %(id)s), true",
}


@dataclass
class Run:
    round: int
    kind: str
    rate: int  # SERIAL: one after another
    scheduled: int  # commands in the measured window
    committed: int
    seen: int
    errors: int
    achieved_rate: float | None
    late_share: float | None  # started more than 2 ms after they were due
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    caught_up_p50_ms: float | None = None
    caught_up_p95_ms: float | None = None
    caught_up_p99_ms: float | None = None
    # the command's commit -> its read model's, on the primary (APPLIED_SQL); None: not timed
    applied_p50_ms: float | None = None
    applied_p95_ms: float | None = None
    applied_p99_ms: float | None = None
    command_p50_ms: float | None = None  # due -> commit returned (includes waiting for a free client)
    command_p99_ms: float | None = None
    poll_period_ms: float | None = None
    daemon_cpu_seconds: float | None = None
    machine_cpu_busy: float | None = None
    other_cpu: float | None = None
    first_error: str | None = None


def run(session: Session) -> dict[str, Any]:
    return _Latency(session).run()


class _Latency:
    def __init__(self, session: Session) -> None:
        self.s = session
        self.cfg = session.cfg
        self.progress = session.progress
        # the orders of the last run's measured window
        self._orders: list[Any] = []

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        db = self.s.clone("latency")
        with self.s.connect(db) as conn:
            conn.execute(PING_TABLE_SQL)
            # the daemon's part is timed by commit timestamps, which a server keeps or not
            # from its start
            timed = conn.execute("SHOW track_commit_timestamp").fetchone() == ("on",)
        dsn = self.s.dsn(db)
        watch_dsn = self.s.replica_dsn(db)
        where = "replica"
        if watch_dsn is None:
            watch_dsn, where = dsn, "primary (no replica given)"
            self.progress("   no replica given (--replica-dsn): visibility is watched on the primary")
        rng = random.Random(cfg.seed)
        plan = []
        rates = self.rates()
        for r in range(cfg.rounds):
            order = [(rate, kind) for rate in rates for kind in _kinds(rate)]
            rng.shuffle(order)
            plan += [(r + 1, rate, kind) for rate, kind in order]
        per_run = cfg.latency_seconds + cfg.latency_warmup + 4
        self.progress(
            f"{len(plan)} runs: {', '.join(map(_label, rates))} x {{command, replication}} (and through Router one"
            f" after another) x {cfg.rounds} round(s)"
            f" of {cfg.latency_seconds:g}s ({cfg.serial} commands one after another),"
            f" {cfg.latency_clients} connections (about {len(plan) * per_run / 60:.1f} min)"
        )
        daemon = self.s.start_daemon(db, "latency-listen.log", "--log-level", "warning")
        runs: list[Run] = []
        try:
            for i, (rnd, rate, kind) in enumerate(plan, 1):
                self.s.settle(dsn)
                with self.s.connect(db) as conn:
                    self.s.wait_asleep(conn, daemon)
                    daemon_cpu = DaemonCpu(self.s, conn, daemon)
                watch = CpuWatch(self.s)
                if kind == ROUTER:
                    result = self._router_run(rnd, dsn, watch_dsn)
                else:
                    one = self._serial_run(rnd, kind, dsn, watch_dsn) if rate == SERIAL else self._one_run(
                        rnd, kind, rate, dsn, watch_dsn)
                    result = asyncio.run(one)
                    if kind == "command" and timed:
                        self._time_applied(db, result)
                cpu = watch.result()
                result.daemon_cpu_seconds = daemon_cpu.total()
                result.machine_cpu_busy, result.other_cpu = cpu["machine_cpu_busy"], cpu["other_cpu"]
                if not daemon.alive():
                    raise BenchError(f"the daemon exited during the latency runs: see {daemon.log}")
                runs.append(result)
                self.progress(f"[{i}/{len(plan)}] round {rnd}/{cfg.rounds}  {_describe(result)}")
        finally:
            self.s.stop_daemon(daemon)
        self.s.drop(db)
        return self._report(runs, where)

    def _time_applied(self, db: str, result: Run) -> None:
        """The daemon's part of the run's commands (APPLIED_SQL), on a server that keeps
        commit timestamps."""
        with self.s.connect(db) as conn:
            applied = sorted(row[0] * 1000 for row in conn.execute(APPLIED_SQL, (self._orders,)))
        result.applied_p50_ms = _r(percentile(applied, 50))
        result.applied_p95_ms = _r(percentile(applied, 95))
        result.applied_p99_ms = _r(percentile(applied, 99))

    def rates(self) -> list[int]:
        """SERIAL (when asked for) and the rates."""
        return ([SERIAL] if self.cfg.serial else []) + list(self.cfg.rates)

    async def _serial_run(self, rnd: int, kind: str, dsn: str, watch_dsn: str) -> Run:
        """Commands one after another on one connection, each awaited on the replica (asked
        again as soon as each answer comes) before the next is issued."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        total = max(2, cfg.serial)
        warm = max(1, total // 10)
        rng = random.Random(f"{cfg.seed}-{rnd}-{kind}-serial")
        nan = float("nan")
        started, committed, seen, caught = ([nan] * total for _ in range(4))
        errors: list[str] = []
        polls: list[float] = []
        orders: list[Any] = [None] * total
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, application_name="cqrs-pg bench latency")
        watcher = await psycopg.AsyncConnection.connect(watch_dsn, autocommit=True, application_name="cqrs-pg bench watcher")
        try:
            await conn.execute("SELECT 1")
            await watcher.execute(WATCHER_SETUP_SQL)
            for i in range(total):
                key = uuid.uuid4()
                started[i] = loop.time()
                try:
                    if kind == "command":
                        cur = await conn.execute(COMMAND_SQL, self._order(rng, key))
                        row = await cur.fetchone()
                        assert row is not None
                        key, token = row  # the order's id
                        orders[i] = key
                    else:
                        token = None
                        await conn.execute(PING_SQL, (key,))
                except psycopg.Error as exc:
                    errors.append(first_line(exc))
                    continue
                committed[i] = loop.time()
                give_up = committed[i] + STRAGGLERS_SECONDS
                while True:
                    s = loop.time()
                    try:
                        cur = await watcher.execute(SERIAL_WATCH_SQL[kind], {"id": key, "token": token})
                        row = await cur.fetchone()
                    except psycopg.errors.SerializationFailure:
                        row = None  # cancelled by a conflict with recovery on the replica: ask again
                    r = loop.time()
                    at = (s + r) / 2
                    polls.append(at)
                    if row is not None:
                        if row[0] and seen[i] != seen[i]:
                            seen[i] = at
                        if row[1] and caught[i] != caught[i]:
                            caught[i] = at
                    if (seen[i] == seen[i] and caught[i] == caught[i]) or r > give_up:
                        break
        finally:
            for c in (conn, watcher):
                await c.close()
        self._orders = [key for key in orders[warm:] if key is not None]
        return _summarize(rnd, kind, SERIAL, range(warm, total), started, started, committed, seen, caught, errors, polls)

    def _router_run(self, rnd: int, dsn: str, replica_dsn: str) -> Run:
        """Commands one after another through Router, each followed by a read of its row
        that is consistent with it (the Router's own wait on the replica)."""
        cfg = self.cfg
        total = max(2, cfg.serial)
        warm = max(1, total // 10)
        rng = random.Random(f"{cfg.seed}-{rnd}-{ROUTER}-serial")
        nan = float("nan")
        started, committed, seen = ([nan] * total for _ in range(3))
        errors: list[str] = []
        with Router(dsn, replica_dsn, fallback="error", on_stale="error", wait_timeout=STRAGGLERS_SECONDS,
                    min_size=1, max_size=1, application_name="cqrs-pg bench router") as router:
            router.fetchone("SELECT 1")  # connections open: the first command pays no connect
            router.command("shop.place_order", *self._order(rng, uuid.uuid4())[1:])
            for i in range(total):
                _, customer, lines = self._order(rng, uuid.uuid4())
                started[i] = time.monotonic()
                try:
                    receipt = router.command("shop.place_order", customer, lines)
                    committed[i] = time.monotonic()
                    row = router.fetchone(ROUTER_READ_SQL, (receipt.aggregate_id,), consistent_with=receipt.token,
                                          projection="order_summary")
                except (CqrsPgError, psycopg.Error) as exc:
                    errors.append(first_line(exc))
                    continue
                if row is not None and row[0] == 2:
                    seen[i] = time.monotonic()
                else:
                    errors.append(f"order {receipt.aggregate_id}: read after caught_up found {row!r}, not its two lines")
        return _summarize(rnd, ROUTER, SERIAL, range(warm, total), started, started, committed, seen, [nan] * total,
                          errors, [])

    async def _one_run(self, rnd: int, kind: str, rate: int, dsn: str, watch_dsn: str) -> Run:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        total = max(1, round(rate * (cfg.latency_warmup + cfg.latency_seconds)))
        warm = min(total - 1, round(rate * cfg.latency_warmup))
        rng = random.Random(f"{cfg.seed}-{rnd}-{kind}-{rate}")
        inputs: list[Any] = []
        for _ in range(total):
            if kind == "command":
                inputs.append(self._order(rng, uuid.uuid4()))
            else:
                inputs.append(uuid.uuid4())
        nan = float("nan")
        due = [nan] * total
        started = [nan] * total
        committed = [nan] * total
        seen = [nan] * total
        caught = [nan] * total
        orders: list[Any] = [None] * total
        pending: dict[Any, int] = {}  # committed, not yet seen: key -> i, in commit order
        tokens: dict[int, int] = {}  # committed, not yet caught up: token -> i
        errors: list[str] = []
        counter = itertools.count()
        polls: list[float] = []

        conns = [
            await psycopg.AsyncConnection.connect(dsn, autocommit=True, application_name="cqrs-pg bench latency")
            for _ in range(cfg.latency_clients)
        ]
        lock = threading.Lock()  # pending and tokens, shared with the watcher's thread
        sent = threading.Event()  # every command was issued
        try:
            for conn in conns:  # connections warmed: the first command pays no catalog lookups
                await conn.execute("SELECT 1")
            t0 = loop.time() + 0.05

            async def client(conn: psycopg.AsyncConnection) -> None:
                while True:
                    i = next(counter)
                    if i >= total:
                        return
                    due[i] = t0 + i / rate
                    delay = due[i] - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    started[i] = loop.time()
                    try:
                        if kind == "command":
                            cur = await conn.execute(COMMAND_SQL, inputs[i])
                            row = await cur.fetchone()
                            assert row is not None
                            key, token = row
                            orders[i] = key
                        else:
                            key, token = inputs[i], None
                            await conn.execute(PING_SQL, (key,))
                    except psycopg.Error as exc:
                        errors.append(first_line(exc))
                        continue
                    committed[i] = loop.time()  # time.monotonic(), the watcher's clock
                    with lock:
                        pending[key] = i
                        if token is not None:
                            tokens[token] = i

            def watch() -> None:
                """The watcher, in a thread of its own with its own connection: its polls
                keep their period to a fraction of a millisecond (time.sleep), where the
                event loop's timers round up to whole milliseconds."""
                give_up: float | None = None
                period = cfg.poll_ms / 1000
                with psycopg.connect(watch_dsn, autocommit=True, application_name="cqrs-pg bench watcher") as watcher:
                    watcher.execute(WATCHER_SETUP_SQL)
                    while True:
                        if sent.is_set():
                            with lock:
                                if not pending and not tokens:
                                    return
                            give_up = give_up or time.monotonic() + STRAGGLERS_SECONDS
                            if time.monotonic() > give_up:
                                return
                        with lock:
                            keys = list(itertools.islice(pending, WATCH_LIMIT))
                            toks = heapq.nsmallest(WATCH_LIMIT, tokens)  # ascending: WATCH_SQL
                        s = time.monotonic()
                        if keys or toks:
                            try:
                                row = watcher.execute(WATCH_SQL[kind], {"ids": keys, "tokens": toks}).fetchone()
                            except psycopg.errors.SerializationFailure:
                                row = None  # cancelled by a conflict with recovery on the replica: ask again
                            r = time.monotonic()
                            at = (s + r) / 2
                            if row is not None:  # a cancelled poll saw nothing: not counted
                                polls.append(at)
                                with lock:
                                    for key in row[0]:
                                        i = pending.pop(key, None)
                                        if i is not None:
                                            seen[i] = at
                                    for token in row[1]:
                                        i = tokens.pop(token, None)
                                        if i is not None:
                                            caught[i] = at
                        # the next poll is due a period after this one started
                        time.sleep(max(0.0, s + period - time.monotonic()))

            watching = loop.run_in_executor(None, watch)
            try:
                await asyncio.gather(*(client(c) for c in conns))
            finally:
                sent.set()
                await watching
        finally:
            for conn in conns:
                await conn.close()

        self._orders = [key for key in orders[warm:] if key is not None]
        return _summarize(rnd, kind, rate, range(warm, total), due, started, committed, seen, caught, errors, polls)

    def _order(self, rng: random.Random, command_id: uuid.UUID) -> tuple[Any, ...]:
        """place_order's arguments: two lines of two different products."""
        cfg = self.cfg
        p1 = rng.randint(1, cfg.products)
        p2 = 1 + (p1 - 1 + rng.randint(1, cfg.products - 1)) % cfg.products
        return (
            command_id, seed_uuid("c", rng.randint(1, cfg.customers)),
            Jsonb([{"sku": f"SKU-{p1}", "quantity": 1}, {"sku": f"SKU-{p2}", "quantity": 1}]),
        )

    def _report(self, runs: list[Run], where: str) -> dict[str, Any]:
        cfg = self.cfg
        results: dict[str, dict[str, Any]] = {}
        for kind in (*KINDS, ROUTER):
            for rate in self.rates():
                mine = [r for r in runs if r.kind == kind and r.rate == rate]
                if not mine:
                    continue
                cell: dict[str, Any] = {
                    key: spread([getattr(r, key) for r in mine])
                    for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "command_p50_ms", "command_p99_ms",
                                "achieved_rate", "late_share", "poll_period_ms", "daemon_cpu_seconds")
                }
                if kind == "command":
                    for key in ("caught_up_p50_ms", "caught_up_p95_ms", "caught_up_p99_ms", "applied_p50_ms",
                                "applied_p95_ms", "applied_p99_ms"):
                        cell[key] = spread([getattr(r, key) for r in mine])
                cell["samples"] = sum(r.seen for r in mine)
                cell["unseen"] = sum(r.committed - r.seen for r in mine)
                cell["errors"] = sum(r.errors for r in mine)
                results.setdefault(kind, {})[_key(rate)] = cell
        return {
            "part": 3,
            "benchmark": "end-to-end latency: command commit -> its row in shop_read.order_summary visible on the replica",
            "config": {
                "rates": list(cfg.rates),
                "serial": cfg.serial,
                # the keys of results: "serial" (one after another), then the rates
                "schedules": [_key(rate) for rate in self.rates()],
                "rounds": cfg.rounds,
                "seconds": cfg.latency_seconds,
                "warmup_seconds": cfg.latency_warmup,
                "clients": cfg.latency_clients,
                "poll_ms": cfg.poll_ms,
                "watched_on": where,
                "schedule": "open loop: command i due at t0 + i / rate, spread over the client connections",
                "daemon": "cqrs-pg listen with its defaults (--log-level warning), running throughout",
                "order": f"(rate, kind) shuffled per round, seed {cfg.seed}",
                "before_each_run": "VACUUM (ANALYZE), no autovacuum worker running, CHECKPOINT, replica replayed,"
                " daemon asleep",
                "timing": "sighting at the middle of the watcher's poll round trip; latency = sighting - commit"
                " returned: an upper bound, late by up to one poll period, the same for both kinds; through Router:"
                " command returned -> consistent read returned; the daemon's part (applied_*): the command's commit"
                " -> its order_summary row's, by the primary's commit timestamps (none without"
                " track_commit_timestamp)",
            },
            "runs": [asdict(r) for r in runs],
            "results": results,
        }


def _summarize(
    rnd: int, kind: str, rate: int, window: range, due: list[float], started: list[float], committed: list[float],
    seen: list[float], caught: list[float], errors: list[str], polls: list[float],
) -> Run:
    """A run's figures from its per-command times (NaN: did not happen), over the window."""
    done = [i for i in window if committed[i] == committed[i]]  # not NaN
    e2e = sorted((seen[i] - committed[i]) * 1000 for i in done if seen[i] == seen[i])
    rw = sorted((caught[i] - committed[i]) * 1000 for i in done if caught[i] == caught[i])
    cmd = sorted((committed[i] - due[i]) * 1000 for i in done)
    late = sum(1 for i in done if started[i] - due[i] > 0.002)
    span = (max(committed[i] for i in done) - min(committed[i] for i in done)) if len(done) > 1 else 0.0
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    return Run(
        round=rnd, kind=kind, rate=rate, scheduled=len(window), committed=len(done),
        seen=len(e2e), errors=len(errors),
        achieved_rate=round((len(done) - 1) / span, 1) if span > 0 else None,
        late_share=round(late / len(done), 4) if done else None,
        p50_ms=_r(percentile(e2e, 50)), p95_ms=_r(percentile(e2e, 95)), p99_ms=_r(percentile(e2e, 99)),
        max_ms=_r(e2e[-1] if e2e else None),
        caught_up_p50_ms=_r(percentile(rw, 50)) if kind == "command" else None,
        caught_up_p95_ms=_r(percentile(rw, 95)) if kind == "command" else None,
        caught_up_p99_ms=_r(percentile(rw, 99)) if kind == "command" else None,
        command_p50_ms=_r(percentile(cmd, 50)), command_p99_ms=_r(percentile(cmd, 99)),
        poll_period_ms=_r(sorted(gaps)[len(gaps) // 2] * 1000 if gaps else None),
        first_error=errors[0] if errors else None,
    )



def _kinds(rate: int) -> tuple[str, ...]:
    return (*KINDS, ROUTER) if rate == SERIAL else KINDS


def _key(rate: int) -> str:
    return "serial" if rate == SERIAL else str(rate)


def _label(rate: int | str) -> str:
    return "one after another" if rate in (SERIAL, "serial") else f"{rate}/s"


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _describe(r: Run) -> str:
    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    text = (
        f"{_label(r.rate):>17} {r.kind:<11} p50 {ms(r.p50_ms)} p95 {ms(r.p95_ms)} p99 {ms(r.p99_ms)} ms"
        f"  ({r.seen:,} seen of {r.committed:,}; achieved {r.achieved_rate or 0:,.0f}/s; late {100 * (r.late_share or 0):.1f}%)"
    )
    if r.kind == "command":
        text += f"  caught_up p50 {ms(r.caught_up_p50_ms)} p99 {ms(r.caught_up_p99_ms)} ms"
    if r.errors:
        text += f"  ERRORS {r.errors}: {r.first_error}"
    if r.other_cpu is not None and r.other_cpu > OTHER_CPU_WARNING:
        text += f"  [other processes used {r.other_cpu * 100:.0f}% of the CPUs]"
    return text


def targets(part: dict[str, Any]) -> list[dict[str, Any]]:
    """Read-your-writes (caught_up true on the replica) at p50 and p99, one after another
    and at every rate."""
    out = []
    for key in part["config"]["schedules"]:
        cell = part["results"]["command"][key]
        bare = part["results"].get("replication", {}).get(key, {})
        for q, target in (("p50", TARGET_P50_MS), ("p99", TARGET_P99_MS)):
            value = (cell[f"caught_up_{q}_ms"] or {}).get("median")
            floor = (bare.get(f"{q}_ms") or {}).get("median")
            out.append({
                "part": 3, "what": f"read-your-writes {q}, {_label(key)} (ms)", "value": value,
                "target": f"<= {target:g} ms", "met": None if value is None else value <= target,
                "baseline": None if floor is None else f"replication alone {floor:.2f}",
            })
    return out


def render(part: dict[str, Any]) -> list[str]:
    cfg = part["config"]
    lines = [
        f"end-to-end latency, ms: median (min-max) over {cfg['rounds']} interleaved round(s) of {cfg['seconds']:g}s;"
        f" {cfg['serial']} commands one after another; open loop at the rates, {cfg['clients']} connections;"
        f" watched on the {cfg['watched_on']} (one after another: asked again at each answer; at the rates: every"
        f" {cfg['poll_ms']:g} ms)",
    ]
    head = f"{'rate':>17} {'what':<34} {'p50':>20} {'p95':>20} {'p99':>20} {'samples':>9}"
    lines += [head, "-" * len(head)]
    fmt = "{:.2f}"
    for key in cfg["schedules"]:
        c = part["results"]["command"][key]
        b = part["results"]["replication"][key]
        rows = [
            ("order_summary row on the replica", c["p50_ms"], c["p95_ms"], c["p99_ms"], c["samples"]),
            ("caught_up(token) true there", c["caught_up_p50_ms"], c["caught_up_p95_ms"], c["caught_up_p99_ms"], c["samples"]),
            ("baseline: plain row replicated", b["p50_ms"], b["p95_ms"], b["p99_ms"], b["samples"]),
        ]
        if (c.get("applied_p50_ms") or {}).get("median") is not None:
            rows.insert(2, ("daemon's part (commit to commit)", c["applied_p50_ms"], c["applied_p95_ms"],
                            c["applied_p99_ms"], c["samples"]))
        r = part["results"].get(ROUTER, {}).get(key)
        if r is not None:
            rows.append(("Router read, consistent_with=token", r["p50_ms"], r["p95_ms"], r["p99_ms"], r["samples"]))
        for label, p50, p95, p99, n in rows:
            lines.append(
                f"{_label(key):>17} {label:<34} {fmt_spread(p50, fmt):>20} {fmt_spread(p95, fmt):>20} {fmt_spread(p99, fmt):>20} {n:>9,}"
            )
    lines.append("")
    for key in cfg["schedules"]:
        c = part["results"]["command"][key]
        lines.append(
            f"  {_label(key)} commands: achieved {fmt_spread(c['achieved_rate'])}/s,"
            f" started late (> 2 ms) {fmt_spread(c['late_share'], '{:.1%}')},"
            f" due -> committed p50 {fmt_spread(c['command_p50_ms'], fmt)} ms, p99 {fmt_spread(c['command_p99_ms'], fmt)} ms;"
            f" poll period {fmt_spread(c['poll_period_ms'], fmt)} ms; unseen {c['unseen']}, errors {c['errors']};"
            f" daemon CPU {fmt_spread(c['daemon_cpu_seconds'], fmt)} s (process + backends, whole run)"
        )
    others = [r["other_cpu"] for r in part["runs"] if r.get("other_cpu") is not None]
    if others and max(others) > OTHER_CPU_WARNING:
        lines.append(f"WARNING: other processes used up to {max(others) * 100:.0f}% of the CPUs during some runs: figures disturbed")
    return lines


__all__ = ["render", "run", "targets"]
