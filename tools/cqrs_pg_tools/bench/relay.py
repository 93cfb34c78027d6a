"""Part 7: `cqrs-pg relay`, the outbox to NATS JetStream, beside publishing the same
messages straight to JetStream in the same run.

A nats-server of the bench's own (cqrs_pg_tools.natsserver: JetStream on a free port, its
store in the bench's directory, removed at the end), never the machine's broker.

- drain: a backlog of mixed shop events (generate.py, as part 2 writes it) already in
  the outbox of a database of its own; cqrs_pg.relay.Relay runs in this process
  (RelayConfig defaults, but --relay-batch-size) on a subscription from the beginning
  into an empty stream (created beforehand, as the relay would create it). Timed from the
  relay's start until it has acknowledged the last event: every message acknowledged by
  the broker and the batch acknowledged in the database. Then the stream must hold every
  event once: its message count, each subject's count equal to the outbox's, the last
  message's Nats-Msg-Id the last position.
  Baseline, direct: the same messages (the same bodies, subjects and Nats-Msg-Id, read
  from the database beforehand through the relay's own poll query, untimed), published
  with the relay's Publisher in batches of the same size into an empty stream; no
  database. Runs of the two alternate in a shuffled order each round.
- latency: the real `cqrs-pg relay` (a child process, --from-now, its defaults) runs
  throughout; an open-loop schedule issues shop.register_customer (one customer.created
  event each) at --relay-rate per second over --latency-clients connections; a NATS core
  subscriber on <prefix>.> in this process records when each message arrives, matched to
  its command by the aggregate_id in the body. Latency = arrival - the command returned.
  Baseline, direct: a message of the same size (a real customer.created body, a new
  aggregate_id each) published with Publisher.publish, one message at a time, on the
  same schedule; latency = arrival - publish started. The first --latency-warmup seconds
  of each run are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from nats.errors import Error as NatsError

from cqrs_pg.db import scalar
from cqrs_pg.errors import first_line
from cqrs_pg.relay import POLL, BrokerError, Publisher, Relay, RelayConfig, messages, subject_part
from cqrs_pg_tools.bench import generate
from cqrs_pg_tools.bench._common import (
    OTHER_CPU_WARNING,
    BenchError,
    Daemon,
    Session,
    busy_fraction,
    cpu_seconds,
    fmt_spread,
    machine_cpu,
    other_fraction,
    percentile,
    ratio,
    spread,
)
from cqrs_pg_tools.natsserver import NatsServer
from cqrs_pg_tools.testing import wait_until

KINDS = ("relay", "direct")
# Orders per generated transaction: ~2,700 events each (as part 2).
PER_CHUNK = 500
# Targets: the relay's, judged on its own figure; the direct figures stand beside them.
TARGET_EVENTS_PER_SECOND = 50_000
TARGET_P50_MS = 5.0
TARGET_P99_MS = 25.0
# The poll that reads the drain's messages for the direct baseline (cqrs.poll's maximum).
READ_BATCH = 100_000
# After the last command: how long stragglers may take to arrive.
STRAGGLERS_SECONDS = 30.0
COMMAND_SQL = "SELECT aggregate_id FROM shop.register_customer(%s, %s, %s)"
NATS_OPTIONS: dict[str, Any] = {"name": "cqrs-pg bench", "pending_size": 64 * 1024 * 1024}  # as the relay's


@dataclass
class DrainRun:
    round: int
    kind: str
    events: int
    seconds: float
    events_per_second: float
    process_cpu_seconds: float | None  # this process: the relay (or the direct publisher)
    backend_cpu_seconds: float | None  # the relay's database backend
    nats_cpu_seconds: float | None
    stream_messages: int
    stream_ok: bool
    machine_cpu_busy: float | None = None
    other_cpu: float | None = None


@dataclass
class LatencyRun:
    round: int
    kind: str
    rate: int
    scheduled: int  # in the measured window
    sent: int
    seen: int
    errors: int
    achieved_rate: float | None
    late_share: float | None  # started more than 2 ms after they were due
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    send_p50_ms: float | None  # due -> command returned / publish acknowledged
    send_p99_ms: float | None
    relay_cpu_seconds: float | None = None
    nats_cpu_seconds: float | None = None
    machine_cpu_busy: float | None = None
    other_cpu: float | None = None
    first_error: str | None = None


def run(session: Session) -> dict[str, Any]:
    return _RelayBench(session).run()


class _Cpu:
    """Machine CPU busy and the share others used (nats-server counted as the bench's),
    and nats-server's CPU seconds, over a measured stretch."""

    def __init__(self, session: Session, broker: NatsServer) -> None:
        self.s = session
        self.pid = broker.proc.pid if broker.proc is not None else None
        self.busy0, self.ours0, self.nats0 = machine_cpu(), session.own_cpu(include_daemons=True), self._nats()

    def _nats(self) -> float | None:
        return cpu_seconds(self.pid) if self.pid is not None else None

    def result(self) -> tuple[float | None, float | None, float | None]:
        """(machine busy, other processes' share, nats-server seconds)."""
        busy1, ours1, nats1 = machine_cpu(), self.s.own_cpu(include_daemons=True), self._nats()
        nats = None if self.nats0 is None or nats1 is None else round(nats1 - self.nats0, 3)
        return busy_fraction(self.busy0, busy1), other_fraction(self.busy0, busy1, self.ours0, ours1, self.nats0, nats1), nats


class _RelayBench:
    def __init__(self, session: Session) -> None:
        self.s = session
        self.cfg = session.cfg
        self.progress = session.progress
        self.rng = random.Random(f"{self.cfg.seed}-relay")

    def run(self) -> dict[str, Any]:
        broker = NatsServer(self.s.workdir / "nats")
        broker.start()
        self.progress(f"nats-server with JetStream of the bench's own at {broker.url}")
        try:
            drain = self._drain(broker)
            latency = self._latency(broker)
        finally:
            broker.stop()
            shutil.rmtree(broker.root / "store", ignore_errors=True)
        return {
            "part": 7,
            "benchmark": "the relay: outbox -> NATS JetStream, beside publishing the same messages straight to JetStream",
            "config": {
                "backlog": self.cfg.relay_backlog,
                "batch_size": self.cfg.relay_batch_size,
                "rounds": self.cfg.rounds,
                "rate": self.cfg.relay_rate,
                "seconds": self.cfg.relay_seconds,
                "warmup_seconds": self.cfg.latency_warmup,
                "clients": self.cfg.latency_clients,
                "broker": "nats-server -js of the bench's own, file store in the bench's directory",
                "order": f"(relay, direct) shuffled per round, seed {self.cfg.seed}",
            },
            "drain": drain,
            "latency": latency,
        }

    def _relay_config(self, dsn: str, url: str) -> RelayConfig:
        return RelayConfig(dsn=dsn, url=url, batch_size=self.cfg.relay_batch_size)

    def _order(self) -> list[str]:
        order = list(KINDS)
        self.rng.shuffle(order)
        return order

    # -- drain -------------------------------------------------------------------------------

    def _drain(self, broker: NatsServer) -> dict[str, Any]:
        cfg = self.cfg
        db = self.s.clone("relay_drain")
        dsn = self.s.dsn(db)
        rcfg = self._relay_config(dsn, broker.url)
        per = generate.events_per_chunk(PER_CHUNK, cfg.products)
        chunks = max(2, math.ceil((cfg.relay_backlog - self.s.seed_events) / per))
        with self.s.connect(db) as conn:
            generate.install(conn)
            conn.execute("SET synchronous_commit = off")
            self.progress(f"writing a backlog of {cfg.relay_backlog:,} events ({chunks:,} transactions of {PER_CHUNK} orders) ...")
            generate.generate(conn, chunks, PER_CHUNK, cfg.customers, cfg.products,
                              progress=lambda done, total, secs: self.progress(f"   {done:,}/{total:,} transactions, {secs:.0f}s"))
            conn.execute("VACUUM (ANALYZE)")
            events = scalar(conn, "SELECT count(*) FROM cqrs.outbox")
            last_position = scalar(conn, "SELECT max(position) FROM cqrs.outbox")
            subjects = {
                f"{rcfg.subject_prefix}.{subject_part(a)}.{subject_part(e)}": n
                for a, e, n in conn.execute("SELECT aggregate_type, event_type, count(*) FROM cqrs.outbox GROUP BY 1, 2")
            }
            self.progress(f"   {events:,} events; reading them as the relay publishes them (for the direct baseline) ...")
            messages = _read_messages(conn, rcfg)
        if len(messages) != events:
            raise BenchError(f"the relay's poll read {len(messages):,} events, not the {events:,} of the outbox")
        body_bytes = sum(len(m[1]) for m in messages)
        runs: list[DrainRun] = []
        plan = [(r + 1, kind) for r in range(cfg.rounds) for kind in self._order()]
        for i, (rnd, kind) in enumerate(plan, 1):
            self.s.settle(dsn)
            if kind == "relay":
                with self.s.connect(db) as conn:
                    if scalar(conn, "SELECT count(*) FROM cqrs.subscriptions WHERE name = %s", (rcfg.subscription,)):
                        conn.execute("SELECT cqrs.drop_subscription(%s)", (rcfg.subscription,))
                    conn.execute("SELECT cqrs.create_subscription(%s, NULL, NULL, true)", (rcfg.subscription,))
            cpu = _Cpu(self.s, broker)
            result = asyncio.run(
                self._relay_drain(rnd, rcfg, events) if kind == "relay" else self._direct_drain(rnd, rcfg, messages))
            result.machine_cpu_busy, result.other_cpu, result.nats_cpu_seconds = cpu.result()
            result.stream_messages, result.stream_ok = asyncio.run(_check_stream(rcfg, events, subjects, last_position))
            asyncio.run(_delete_stream(rcfg))  # its store freed before the next run
            if not result.stream_ok:
                raise BenchError(f"after the {kind} drain the stream holds {result.stream_messages:,} messages, not the"
                                 f" {events:,} events once each with their subjects and message ids")
            runs.append(result)
            self.progress(f"[{i}/{len(plan)}] round {rnd}/{cfg.rounds}  {_describe_drain(result)}")
        del messages
        self.s.drop(db)
        relay = spread([r.events_per_second for r in runs if r.kind == "relay"], 1)
        direct = spread([r.events_per_second for r in runs if r.kind == "direct"], 1)
        paired = [a.events_per_second / b.events_per_second for a in runs for b in runs
                  if a.kind == "relay" and b.kind == "direct" and a.round == b.round and b.events_per_second]
        return {
            "events": events,
            "mean_body_bytes": round(body_bytes / events, 1) if events else None,
            "subjects": subjects,
            "relay": "cqrs_pg.relay.Relay in this process, RelayConfig defaults but the batch size, a subscription"
                     " from the beginning, into an empty stream; timed from its start until it acknowledged the last event",
            "direct": "the same messages read beforehand through the relay's poll query, published with"
                      " cqrs_pg.relay.Publisher in batches of the same size into an empty stream, no database",
            "runs": [asdict(r) for r in runs],
            "relay_events_per_second": relay,
            "direct_events_per_second": direct,
            "ratio_to_direct": {
                "value": ratio(relay["median"] if relay else None, direct["median"] if direct else None),
                "per_round_min": round(min(paired), 3) if paired else None,
                "per_round_max": round(max(paired), 3) if paired else None,
            },
            "relay_cpu": {
                "process_seconds": spread([r.process_cpu_seconds for r in runs if r.kind == "relay"]),
                "backend_seconds": spread([r.backend_cpu_seconds for r in runs if r.kind == "relay"]),
                "nats_seconds": spread([r.nats_cpu_seconds for r in runs if r.kind == "relay"]),
            },
            "direct_cpu": {
                "process_seconds": spread([r.process_cpu_seconds for r in runs if r.kind == "direct"]),
                "nats_seconds": spread([r.nats_cpu_seconds for r in runs if r.kind == "direct"]),
            },
        }

    async def _relay_drain(self, rnd: int, rcfg: RelayConfig, events: int) -> DrainRun:
        await _fresh_stream(rcfg)
        loop = asyncio.get_running_loop()
        relay = Relay(rcfg)
        cpu0 = time.process_time()
        t0 = loop.time()
        task = asyncio.ensure_future(relay.run())
        deadline = t0 + self.cfg.daemon_wait + events / 1000
        backend: int | None = None
        try:
            while relay.published < events:
                if task.done():
                    task.result()  # its exception, if any
                    raise BenchError(f"the relay stopped after {relay.published:,} of {events:,} events")
                if loop.time() > deadline:
                    raise BenchError(f"the relay published {relay.published:,} of {events:,} events in"
                                     f" {deadline - t0:.0f}s")
                await asyncio.sleep(0.002)
            seconds = loop.time() - t0
            process = time.process_time() - cpu0
            backend = await self._relay_backend(rcfg.dsn)
            backend_cpu = cpu_seconds(backend) if backend is not None else None  # its connection is the run's
        finally:
            relay.stop()
            if not task.done():
                await asyncio.wait_for(task, 30)
        return DrainRun(
            round=rnd, kind="relay", events=events, seconds=round(seconds, 3), events_per_second=round(events / seconds, 1),
            process_cpu_seconds=round(process, 3), backend_cpu_seconds=None if backend_cpu is None else round(backend_cpu, 3),
            nats_cpu_seconds=None, stream_messages=0, stream_ok=False,
        )

    async def _relay_backend(self, dsn: str) -> int | None:
        """The pid of the relay's server backend, when the server runs on this machine."""
        if not self.s.local_server:
            return None
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                                     " AND application_name = 'cqrs-pg relay'")
            rows = await cur.fetchall()
        return int(rows[0][0]) if len(rows) == 1 else None

    async def _direct_drain(self, rnd: int, rcfg: RelayConfig, messages: list[tuple[str, bytes, str]]) -> DrainRun:
        import nats

        await _fresh_stream(rcfg)
        nc = await nats.connect(rcfg.url, **NATS_OPTIONS)
        try:
            publisher = Publisher(nc)
            await publisher.start()
            loop = asyncio.get_running_loop()
            cpu0 = time.process_time()
            t0 = loop.time()
            size = self.cfg.relay_batch_size
            for start in range(0, len(messages), size):
                await publisher.publish(messages[start : start + size], rcfg.ack_timeout)
            seconds = loop.time() - t0
            process = time.process_time() - cpu0
        finally:
            await nc.close()
        return DrainRun(
            round=rnd, kind="direct", events=len(messages), seconds=round(seconds, 3),
            events_per_second=round(len(messages) / seconds, 1), process_cpu_seconds=round(process, 3),
            backend_cpu_seconds=None, nats_cpu_seconds=None, stream_messages=0, stream_ok=False,
        )

    # -- latency ------------------------------------------------------------------------------

    def _latency(self, broker: NatsServer) -> dict[str, Any]:
        cfg = self.cfg
        db = self.s.clone("relay_latency")
        dsn = self.s.dsn(db)
        rcfg = self._relay_config(dsn, broker.url)
        template = _template(dsn, rcfg)
        asyncio.run(_delete_stream(rcfg))  # the relay creates it
        relay = Daemon(dsn, self.s.workdir / "relay-latency.log", "--to", broker.url, "--stream", rcfg.stream,
                       "--subject-prefix", rcfg.subject_prefix, "--batch-size", str(cfg.relay_batch_size), "--from-now",
                       command="relay")
        relay.dbname = db
        self.s.daemons.append(relay)
        relay.start()
        plan = [(r + 1, kind) for r in range(cfg.rounds) for kind in self._order()]
        self.progress(
            f"{len(plan)} runs: {{relay, direct}} x {cfg.rounds} round(s) of {cfg.relay_seconds:g}s at {cfg.relay_rate}/s,"
            f" `cqrs-pg relay` running throughout (log {relay.log})"
        )
        runs: list[LatencyRun] = []
        try:
            with self.s.connect(db) as conn:
                def ready() -> bool:
                    if not relay.alive():
                        raise BenchError(f"the relay exited: see {relay.log}")
                    return bool(scalar(conn, "SELECT count(*) FROM cqrs.subscriptions WHERE name = %s", (rcfg.subscription,)))

                wait_until(ready, f"the relay to create its subscription (see {relay.log})", 60, 0.05, raises=BenchError)
            wait_until(lambda: asyncio.run(_stream_exists(rcfg)), "the relay to create its stream", 60, 0.1, raises=BenchError)
            for i, (rnd, kind) in enumerate(plan, 1):
                self.s.settle(dsn)
                cpu = _Cpu(self.s, broker)
                relay_cpu0 = cpu_seconds(relay.pid) if relay.pid is not None else None
                result = asyncio.run(self._latency_run(rnd, kind, rcfg, template))
                relay_cpu1 = cpu_seconds(relay.pid) if relay.pid is not None else None
                result.machine_cpu_busy, result.other_cpu, result.nats_cpu_seconds = cpu.result()
                if relay_cpu0 is not None and relay_cpu1 is not None:
                    result.relay_cpu_seconds = round(relay_cpu1 - relay_cpu0, 3)
                if not relay.alive():
                    raise BenchError(f"the relay exited during the latency runs: see {relay.log}")
                runs.append(result)
                self.progress(f"[{i}/{len(plan)}] round {rnd}/{cfg.rounds}  {_describe_latency(result)}")
        finally:
            self.s.stop_daemon(relay)
        asyncio.run(_delete_stream(rcfg))
        self.s.drop(db)
        results: dict[str, Any] = {}
        for kind in KINDS:
            mine = [r for r in runs if r.kind == kind]
            cell: dict[str, Any] = {
                key: spread([getattr(r, key) for r in mine])
                for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "send_p50_ms", "send_p99_ms", "achieved_rate",
                            "late_share", "relay_cpu_seconds", "nats_cpu_seconds")
            }
            cell["samples"] = sum(r.seen for r in mine)
            cell["unseen"] = sum(r.sent - r.seen for r in mine)
            cell["errors"] = sum(r.errors for r in mine)
            results[kind] = cell
        return {
            "body_bytes": len(template[1]),
            "subject": template[0],
            "relay": "`cqrs-pg relay --from-now` (its defaults but the batch size) running throughout; commands"
                     " shop.register_customer, open loop; latency = message at the subscriber - command returned",
            "direct": "one message of the same size per Publisher.publish (awaiting its acknowledgement), the same"
                      " schedule, one coroutine; latency = message at the subscriber - publish started",
            "subscriber": f"NATS core subscription on {rcfg.subject_prefix}.> in the bench's process, its own connection",
            "runs": [asdict(r) for r in runs],
            "results": results,
        }

    async def _latency_run(self, rnd: int, kind: str, rcfg: RelayConfig, template: tuple[str, bytes, str]) -> LatencyRun:
        import nats

        cfg = self.cfg
        rate = cfg.relay_rate
        loop = asyncio.get_running_loop()
        total = max(1, round(rate * (cfg.latency_warmup + cfg.relay_seconds)))
        warm = min(total - 1, round(rate * cfg.latency_warmup))
        nan = float("nan")
        due, started, done = [nan] * total, [nan] * total, [nan] * total
        keys: dict[str, int] = {}  # aggregate_id -> i
        errors: list[str] = []
        arrivals: list[tuple[float, bytes]] = []

        async def arrived(msg: Any) -> None:
            arrivals.append((loop.time(), msg.data))

        sub_nc = await nats.connect(rcfg.url, **NATS_OPTIONS)
        conns: list[psycopg.AsyncConnection[Any]] = []
        pub_nc: Any = None
        try:
            await sub_nc.subscribe(f"{rcfg.subject_prefix}.>", cb=arrived, pending_msgs_limit=1_000_000)
            await sub_nc.flush()
            counter = itertools.count()
            if kind == "relay":
                for _ in range(cfg.latency_clients):
                    conn = await psycopg.AsyncConnection.connect(rcfg.dsn, autocommit=True, application_name="cqrs-pg bench relay")
                    await conn.execute("SELECT 1")  # warmed: the first command pays no connection setup
                    conns.append(conn)
                inputs = [(uuid.uuid4(), f"relay-{uuid.uuid4().hex}@bench.example", "Relayed customer") for _ in range(total)]
                t0 = loop.time() + 0.05

                async def client(conn: psycopg.AsyncConnection[Any]) -> None:
                    while (i := next(counter)) < total:
                        due[i] = t0 + i / rate
                        delay = due[i] - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        started[i] = loop.time()
                        try:
                            cur = await conn.execute(COMMAND_SQL, inputs[i])
                            row = await cur.fetchone()
                        except psycopg.Error as exc:
                            errors.append(first_line(exc))
                            continue
                        done[i] = loop.time()
                        assert row is not None
                        keys[str(row[0])] = i

                await asyncio.gather(*(client(c) for c in conns))
            else:
                subject, body, old_id = template
                pub_nc = await nats.connect(rcfg.url, **NATS_OPTIONS)
                publisher = Publisher(pub_nc)
                await publisher.start()
                ids = [str(uuid.uuid4()) for _ in range(total)]
                bodies = [body.replace(old_id.encode(), new.encode()) for new in ids]
                t0 = loop.time() + 0.05
                for i in range(total):
                    due[i] = t0 + i / rate
                    delay = due[i] - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    started[i] = loop.time()
                    try:
                        await publisher.publish([(subject, bodies[i], f"direct-{rnd}-{i}")], rcfg.ack_timeout)
                    except (BrokerError, NatsError) as exc:  # counted, the schedule goes on
                        errors.append(first_line(exc))
                        continue
                    done[i] = loop.time()
                    keys[ids[i]] = i
            give_up = loop.time() + STRAGGLERS_SECONDS
            while len(arrivals) < len(keys) and loop.time() < give_up:
                await asyncio.sleep(0.01)
        finally:
            for c in conns:
                await c.close()
            if pub_nc is not None:
                await pub_nc.close()
            await sub_nc.close()
        arrived_at: dict[int, float] = {}
        for at, data in arrivals:
            i = keys.get(json.loads(data).get("aggregate_id"), -1)
            if i >= 0 and i not in arrived_at:
                arrived_at[i] = at
        # relay: from the command's return; direct: from the publish's start
        sent_at = done if kind == "relay" else started
        return _summarize(rnd, kind, rate, range(warm, total), due, started, done, sent_at, arrived_at, errors)


def _read_messages(conn: psycopg.Connection, rcfg: RelayConfig) -> list[tuple[str, bytes, str]]:
    """Every event as the relay publishes it, (subject, body, Nats-Msg-Id), through the
    relay's own poll query on a subscription of the bench's (dropped again)."""
    name = f"bench-reader:{rcfg.stream}"
    conn.execute("SELECT cqrs.create_subscription(%s, NULL, NULL, true)", (name,))
    out: list[tuple[str, bytes, str]] = []
    subjects: dict[tuple[str, str], str] = {}
    try:
        while True:
            rows = conn.execute(POLL, (name, READ_BATCH, None)).fetchall()
            if not rows:
                break
            out.extend(messages(rows, rcfg.subject_prefix, subjects))
            conn.execute("SELECT cqrs.ack(%s, %s)", (name, rows[-1][1]))
    finally:
        conn.execute("SELECT cqrs.drop_subscription(%s)", (name,))
    return out


def _template(dsn: str, rcfg: RelayConfig) -> tuple[str, bytes, str]:
    """(subject, body, aggregate_id) of one real shop.register_customer event, as the relay
    publishes it: the direct baseline's message."""
    name = f"bench-template:{rcfg.stream}"
    with psycopg.connect(dsn, autocommit=True, application_name="cqrs-pg bench") as conn:
        conn.execute("SELECT cqrs.create_subscription(%s)", (name,))
        try:
            row = conn.execute(COMMAND_SQL, (uuid.uuid4(), f"template-{uuid.uuid4().hex}@bench.example",
                                             "Relayed customer")).fetchone()
            assert row is not None
            rows = conn.execute(POLL, (name, 100, None)).fetchall()
        finally:
            conn.execute("SELECT cqrs.drop_subscription(%s)", (name,))
    for r in rows:
        body = r[4].encode()
        if str(row[0]).encode() in body:
            return f"{rcfg.subject_prefix}.{subject_part(r[2])}.{subject_part(r[3])}", body, str(row[0])
    raise BenchError("the command's event was not handed out by a poll")


async def _fresh_stream(rcfg: RelayConfig) -> None:
    """An empty stream, as the relay creates it (subjects <prefix>.>, its duplicate window)."""
    import nats
    from nats.js.api import StreamConfig

    await _delete_stream(rcfg)
    nc = await nats.connect(rcfg.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(
            name=rcfg.stream, subjects=[f"{rcfg.subject_prefix}.>"], duplicate_window=rcfg.duplicate_window))
    finally:
        await nc.close()


async def _delete_stream(rcfg: RelayConfig) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(rcfg.url)
    try:
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(rcfg.stream)
    finally:
        await nc.close()


async def _stream_exists(rcfg: RelayConfig) -> bool:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(rcfg.url)
    try:
        await nc.jetstream().stream_info(rcfg.stream)
        return True
    except NotFoundError:
        return False
    finally:
        await nc.close()


async def _check_stream(rcfg: RelayConfig, events: int, subjects: dict[str, int], last_position: int) -> tuple[int, bool]:
    """(messages the stream holds, whether it holds every event once: the count, each
    subject's count and the last message's id)."""
    import nats

    nc = await nats.connect(rcfg.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(rcfg.stream, subjects_filter=">")
        held = int(info.state.messages)
        last = await js.get_msg(rcfg.stream, info.state.last_seq) if held else None
    finally:
        await nc.close()
    last_id = (last.headers or {}).get("Nats-Msg-Id") if last is not None else None
    ok = held == events and dict(info.state.subjects or {}) == subjects and last_id == str(last_position)
    return held, ok


def _summarize(
    rnd: int, kind: str, rate: int, window: range, due: list[float], started: list[float], done: list[float],
    sent_at: list[float], arrived_at: dict[int, float], errors: list[str],
) -> LatencyRun:
    sent = [i for i in window if done[i] == done[i]]  # not NaN
    lat = sorted((arrived_at[i] - sent_at[i]) * 1000 for i in sent if i in arrived_at)
    send = sorted((done[i] - due[i]) * 1000 for i in sent)
    late = sum(1 for i in sent if started[i] - due[i] > 0.002)
    span = (max(done[i] for i in sent) - min(done[i] for i in sent)) if len(sent) > 1 else 0.0
    return LatencyRun(
        round=rnd, kind=kind, rate=rate, scheduled=len(window), sent=len(sent), seen=len(lat), errors=len(errors),
        achieved_rate=round((len(sent) - 1) / span, 1) if span > 0 else None,
        late_share=round(late / len(sent), 4) if sent else None,
        p50_ms=_r(percentile(lat, 50)), p95_ms=_r(percentile(lat, 95)), p99_ms=_r(percentile(lat, 99)),
        max_ms=_r(lat[-1] if lat else None),
        send_p50_ms=_r(percentile(send, 50)), send_p99_ms=_r(percentile(send, 99)),
        first_error=errors[0] if errors else None,
    )


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)



def _label(kind: str) -> str:
    return {"relay": "relay", "direct": "direct (baseline)"}[kind]


def _describe_drain(r: DrainRun) -> str:
    text = f"drain {_label(r.kind):<17} {r.events_per_second:>10,.0f} events/s ({r.events:,} in {r.seconds:.2f}s)"
    cpu = [f"this process {r.process_cpu_seconds:.1f}s" if r.process_cpu_seconds is not None else None,
           f"its backend {r.backend_cpu_seconds:.1f}s" if r.backend_cpu_seconds is not None else None,
           f"nats-server {r.nats_cpu_seconds:.1f}s" if r.nats_cpu_seconds is not None else None]
    text += "; CPU: " + ", ".join(c for c in cpu if c)
    if r.other_cpu is not None and r.other_cpu > OTHER_CPU_WARNING:
        text += f"  [other processes used {r.other_cpu * 100:.0f}% of the CPUs]"
    return text


def _describe_latency(r: LatencyRun) -> str:
    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    text = (
        f"{r.rate}/s {_label(r.kind):<17} p50 {ms(r.p50_ms)} p95 {ms(r.p95_ms)} p99 {ms(r.p99_ms)} ms"
        f"  ({r.seen:,} seen of {r.sent:,}; achieved {r.achieved_rate or 0:,.0f}/s; late {100 * (r.late_share or 0):.1f}%)"
    )
    if r.errors:
        text += f"  ERRORS {r.errors}: {r.first_error}"
    if r.other_cpu is not None and r.other_cpu > OTHER_CPU_WARNING:
        text += f"  [other processes used {r.other_cpu * 100:.0f}% of the CPUs]"
    return text


def targets(part: dict[str, Any]) -> list[dict[str, Any]]:
    """The relay's own figures; the direct baselines are shown beside them, not judged."""
    drain = (part["drain"]["relay_events_per_second"] or {}).get("median")
    direct_drain = (part["drain"]["direct_events_per_second"] or {}).get("median")
    cell = part["latency"]["results"]["relay"]
    direct = part["latency"]["results"]["direct"]
    rate = part["config"]["rate"]
    out = [{"part": 7, "what": f"relay drain of {part['drain']['events']:,} events, events/s", "value": drain,
            "target": f">= {TARGET_EVENTS_PER_SECOND:,}", "met": None if drain is None else drain >= TARGET_EVENTS_PER_SECOND,
            "baseline": None if direct_drain is None else f"straight to JetStream {direct_drain:,.0f}"}]
    for q, target in (("p50", TARGET_P50_MS), ("p99", TARGET_P99_MS)):
        value = (cell[f"{q}_ms"] or {}).get("median")
        floor = (direct[f"{q}_ms"] or {}).get("median")
        out.append({"part": 7, "what": f"relay latency {q} at {rate}/s, command returned -> message at a subscriber (ms)",
                    "value": value, "target": f"<= {target:g} ms", "met": None if value is None else value <= target,
                    "baseline": None if floor is None else f"publishing straight to JetStream {floor:.2f}"})
    return out


def render(part: dict[str, Any]) -> list[str]:
    cfg, drain, latency = part["config"], part["drain"], part["latency"]
    lines = [
        f"drain of {drain['events']:,} events ({drain['mean_body_bytes']:,.0f}-byte bodies on average): events/s, median"
        f" (min-max) over {cfg['rounds']} interleaved round(s); batch size {cfg['batch_size']:,}",
    ]
    head = f"{'what':<50} {'events/s':>24} {'CPU s: process':>18} {'its backend':>16} {'nats-server':>18}"
    lines += [head, "-" * len(head)]
    for kind in KINDS:
        c = drain[f"{kind}_cpu"]
        label = "relay: outbox -> JetStream" if kind == "relay" else "baseline: the same messages straight to JetStream"
        lines.append(
            f"{label:<50} {fmt_spread(drain[f'{kind}_events_per_second']):>24}"
            f" {fmt_spread(c['process_seconds'], '{:.1f}'):>18} {fmt_spread(c.get('backend_seconds'), '{:.1f}'):>16}"
            f" {fmt_spread(c['nats_seconds'], '{:.1f}'):>18}"
        )
    r = drain["ratio_to_direct"]
    if r["value"] is not None:
        lines.append(f"  relay / baseline: {r['value']:.3f} (per round {r['per_round_min']:.3f}-{r['per_round_max']:.3f});"
                     " the stream held every event once after each run")
    lines.append("")
    lines.append(
        f"latency at {cfg['rate']}/s, ms: median (min-max) over {cfg['rounds']} interleaved round(s) of {cfg['seconds']:g}s"
        f" ({cfg['warmup_seconds']:g}s warm-up not counted); {latency['body_bytes']}-byte messages"
    )
    head = f"{'what':<54} {'p50':>20} {'p95':>20} {'p99':>20} {'samples':>9}"
    lines += [head, "-" * len(head)]
    for kind, label in (("relay", "relay: command returned -> at the subscriber"),
                        ("direct", "baseline: publish started -> at the subscriber")):
        c = latency["results"][kind]
        fmt = "{:.2f}"
        lines.append(f"{label:<54} {fmt_spread(c['p50_ms'], fmt):>20} {fmt_spread(c['p95_ms'], fmt):>20}"
                     f" {fmt_spread(c['p99_ms'], fmt):>20} {c['samples']:>9,}")
    for kind in KINDS:
        c = latency["results"][kind]
        what = "commands: due -> returned" if kind == "relay" else "publishes: due -> acknowledged"
        cpu = f"relay process {fmt_spread(c['relay_cpu_seconds'], '{:.2f}')}, " if kind == "relay" else ""
        lines.append(
            f"  {_label(kind)}: achieved {fmt_spread(c['achieved_rate'])}/s, started late (> 2 ms)"
            f" {fmt_spread(c['late_share'], '{:.1%}')}; {what} p50 {fmt_spread(c['send_p50_ms'], '{:.2f}')} ms,"
            f" p99 {fmt_spread(c['send_p99_ms'], '{:.2f}')} ms; CPU s per run: {cpu}nats-server"
            f" {fmt_spread(c['nats_cpu_seconds'], '{:.2f}')}; unseen {c['unseen']}, errors {c['errors']}"
        )
    others = [r["other_cpu"] for r in [*drain["runs"], *latency["runs"]] if r.get("other_cpu") is not None]
    if others and max(others) > OTHER_CPU_WARNING:
        lines.append(f"WARNING: other processes used up to {max(others) * 100:.0f}% of the CPUs during some runs: figures disturbed")
    return lines


__all__ = ["render", "run", "targets"]
