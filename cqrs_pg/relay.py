"""`cqrs-pg relay`: the outbox published to a NATS JetStream stream, each event once.

The relay is a consumer of its own subscription (cqrs.poll, cqrs.ack; role
``cqrs_consumer``). Each round it polls a batch, publishes every event with the JetStream
message id ``Nats-Msg-Id`` = its position, waits for the broker to acknowledge each one,
and only then acknowledges the batch in the database. A crash between the two publishes
the batch again; the stream drops what it already holds by message id, within its
duplicate window. Several relays may run: the subscription hands a batch to one at a time.

Why publish with our own acknowledgement inbox instead of nats-py's ``publish_async``:
its per-message future, semaphore and PubAck parsing cost ~3x the client CPU of a plain
publish (measured here: 37k against 85k messages/s), and the relay's target is 50k/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from nats.errors import Error as NatsError

from cqrs_pg.db import connect, redact, require_migrated
from cqrs_pg.errors import ConfigError, CqrsPgError, DatabaseUnavailable

logger = logging.getLogger("cqrs_pg.relay")

MAX_BACKOFF = 30.0

# The body is built by the server: one text per event, no JSON round trip in Python.
POLL = """
SELECT p.position, p.cursor, p.aggregate_type, p.event_type,
       json_build_object('position', p.position, 'event_type', p.event_type,
                         'aggregate_type', p.aggregate_type, 'aggregate_id', p.aggregate_id,
                         'aggregate_version', p.aggregate_version, 'payload', p.payload,
                         'metadata', p.metadata, 'occurred_at', p.occurred_at)::text,
       extract(epoch FROM clock_timestamp() - p.occurred_at)::float8
  FROM cqrs.poll(%s, %s) p
"""

# What may not stand in a subject as it is: wildcards, whitespace and control characters.
_UNSAFE = re.compile(r"[*>\s\x00-\x1f\x7f]")


def subject_part(value: str) -> str:
    """An aggregate or event type as it stands in a subject: itself, a '.' in it
    separating tokens as anywhere in a subject (order.placed stays order.placed), the
    characters a subject cannot hold percent-encoded, an empty token as '_'."""
    encoded = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)
    return ".".join(token or "_" for token in encoded.split("."))


@dataclass
class RelayConfig:
    dsn: str
    url: str
    stream: str = "CQRS"
    subject_prefix: str = "cqrs"
    subscription: str | None = None  # default: relay:<stream>
    batch_size: int = 1000
    from_beginning: bool = True
    duplicate_window: float = 120.0  # seconds; only when the relay creates the stream
    ack_timeout: float = 10.0
    poll_interval: float = 0.1  # the longest wait between polls when idle
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ConfigError(f"--to must be a NATS URL such as nats://127.0.0.1:4222, not {self.url!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.stream):
            raise ConfigError(f"--stream must be a JetStream stream name (letters, digits, _ and -), not {self.stream!r}")
        if not self.subject_prefix or not all(re.fullmatch(r"[A-Za-z0-9_-]+", t) for t in self.subject_prefix.split(".")):
            raise ConfigError(
                f"--subject-prefix must be subject tokens (letters, digits, _ and -) joined by '.', not {self.subject_prefix!r}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.duplicate_window <= 0:
            raise ConfigError(f"--duplicate-window must be more than 0 seconds, not {self.duplicate_window}")
        if self.subscription is None:
            self.subscription = f"relay:{self.stream}"


class BrokerError(Exception):
    """The broker refused or did not acknowledge a publish: the batch is tried again."""


class Publisher:
    """Publishes to JetStream with one acknowledgement inbox for all messages, so that a
    batch costs one subscription callback per message and nothing more."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self._waiting = 0
        self._errors: list[str] = []
        self._done = asyncio.Event()
        self._sub: Any = None
        self._round = 0

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            f"{self.inbox}.*.*", cb=self._on_ack, pending_msgs_limit=10_000_000, pending_bytes_limit=1 << 30
        )

    async def _on_ack(self, msg: Any) -> None:
        # <inbox>.<round>.<n>: an acknowledgement of an earlier round (a retry) is ignored
        round_token = msg.subject[len(self.inbox) + 1 :].split(".", 1)[0]
        if round_token != str(self._round):
            return
        data = msg.data
        if msg.headers and msg.headers.get("Status") == "503":
            self._errors.append("no stream takes this subject (503 no responders)")
        elif b'"error"' in data or not data:
            try:
                error = json.loads(data).get("error", {}).get("description", data.decode(errors="replace"))
            except ValueError:
                error = data.decode(errors="replace") or "an empty reply"
            self._errors.append(str(error))
        self._waiting -= 1
        if self._waiting <= 0:
            self._done.set()

    async def publish(self, messages: list[tuple[str, bytes, str]], timeout: float) -> None:
        """Publishes (subject, body, message id) in order; returns once the broker has
        acknowledged each, or raises BrokerError."""
        self._round += 1
        self._errors = []
        self._waiting = len(messages)
        self._done.clear()
        prefix = f"{self.inbox}.{self._round}."
        for n, (subject, body, msg_id) in enumerate(messages):
            await self.nc.publish(subject, body, reply=f"{prefix}{n}", headers={"Nats-Msg-Id": msg_id})
        await self.nc.flush(timeout=timeout)
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
        except TimeoutError as exc:
            raise BrokerError(f"{self._waiting} of {len(messages)} messages not acknowledged within {timeout:g}s") from exc
        if self._errors:
            raise BrokerError(f"the broker refused {len(self._errors)} messages: {self._errors[0]}")


class Relay:
    """Runs until stop(): polls the subscription, publishes, acknowledges."""

    def __init__(self, config: RelayConfig, metrics: Any = None) -> None:
        from cqrs_pg.metrics import RelayMetrics

        self.config = config
        self.metrics = metrics or RelayMetrics()
        self._stopping = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._nc: Any = None
        self._publisher: Publisher | None = None
        self._checked = False
        self.published = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        cfg = self.config
        if cfg.metrics_port is not None:
            port = self.metrics.serve(cfg.metrics_port)
            logger.info("metrics on :%s/metrics", port)
        logger.info("relaying %s to %s, stream %s, subjects %s.<aggregate_type>.<event_type>",
                    cfg.subscription, cfg.url, cfg.stream, cfg.subject_prefix)
        backoff = 0.1
        last_event = time.monotonic()
        broker_down = database_down = False
        try:
            while not self._stopping.is_set():
                try:
                    conn = await self._database()
                    if database_down:
                        logger.info("database %s is back", redact(cfg.dsn))
                        database_down = False
                    publisher = await self._broker()
                    if broker_down:
                        logger.info("broker at %s is back", cfg.url)
                        broker_down = False
                    started = time.monotonic()
                    rows = await (await conn.execute(POLL, (cfg.subscription, cfg.batch_size))).fetchall()
                    if rows:
                        await publisher.publish(
                            [(f"{cfg.subject_prefix}.{subject_part(r[2])}.{subject_part(r[3])}", r[4].encode(), str(r[0]))
                             for r in rows],
                            cfg.ack_timeout,
                        )
                        await conn.execute("SELECT cqrs.ack(%s, %s)", (cfg.subscription, rows[-1][1]))
                        now = time.monotonic()
                        self.published += len(rows)
                        self.metrics.batch(len(rows), now - started, rows[-1][0])
                        last_event = now
                    backoff = 0.1
                    self.metrics.broker_up(True)
                    if len(rows) < cfg.batch_size:
                        self.metrics.lag(0.0)
                        await self._idle(time.monotonic() - last_event)
                    else:
                        self.metrics.lag(rows[-1][5])
                except (psycopg.OperationalError, OSError, DatabaseUnavailable) as exc:
                    await self._close_database()
                    if not database_down:
                        logger.warning("database %s: %s; reconnecting with backoff up to %.0fs",
                                       redact(cfg.dsn), _first_line(exc), MAX_BACKOFF)
                    database_down = True
                    self.metrics.error("database")
                    backoff = await self._backoff(backoff)
                except psycopg.Error as exc:
                    # not the connection: the subscription dropped, a role without the grant
                    raise CqrsPgError(f"subscription {cfg.subscription!r}: {_first_line(exc)}") from exc
                except (BrokerError, NatsError) as exc:
                    if not broker_down:
                        logger.warning("broker at %s: %s; the batch waits and is published again (retrying with backoff "
                                       "up to %.0fs)", cfg.url, _first_line(exc), MAX_BACKOFF)
                    broker_down = True
                    self.metrics.broker_up(False)
                    self.metrics.error("broker")
                    backoff = await self._backoff(backoff)
        finally:
            await self._close_database()
            await self._close_broker()
            self.metrics.close()

    async def _idle(self, quiet: float) -> None:
        """Polls often just after events (the next likely follows), less once quiet."""
        wait = 0.001 if quiet < 0.2 else min(self.config.poll_interval, 0.001 * 2 ** min(quiet / 0.2, 10))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), wait)

    async def _backoff(self, backoff: float) -> float:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), backoff)
        return min(backoff * 2, MAX_BACKOFF)

    async def _database(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        cfg = self.config
        conn = await psycopg.AsyncConnection.connect(cfg.dsn, autocommit=True, application_name="cqrs-pg relay",
                                                     connect_timeout=10)
        if not self._checked:
            # the engine at this cqrs_pg's version, on a primary: else one line saying what to run
            await asyncio.to_thread(_require_migrated, cfg.dsn)
            self._checked = True
        # What the relay writes (its hold and acks) it can redo: a lost ack publishes a
        # batch again, which the stream drops by message id.
        await conn.execute("SET synchronous_commit = off")
        try:
            await conn.execute("SELECT cqrs.create_subscription(%s, NULL, NULL, %s)", (cfg.subscription, cfg.from_beginning))
            logger.info("created subscription %s (%s)", cfg.subscription,
                        "from the oldest event held" if cfg.from_beginning else "from now")
        except psycopg.Error as exc:
            if exc.sqlstate != "CQ003":
                await conn.close()
                if exc.sqlstate == "42501" or (exc.sqlstate or "").startswith("CQ") or exc.sqlstate == "3F000":
                    raise CqrsPgError(f"cannot use subscription {cfg.subscription!r}: {_first_line(exc)} "
                                      "(the relay's login needs the role cqrs_consumer, and `cqrs-pg migrate` run)") from exc
                raise
        self._conn = conn
        return conn

    async def _close_database(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._conn.close()
            self._conn = None

    async def _broker(self) -> Publisher:
        if self._publisher is not None and self._nc is not None and self._nc.is_connected:
            return self._publisher
        if self._nc is not None and not self._nc.is_closed:
            # nats-py reconnects by itself; wait for it rather than open another connection
            raise BrokerError("not connected (reconnecting)")
        import nats
        from nats.errors import NoServersError

        cfg = self.config
        try:
            # once connected, nats-py reconnects by itself; a first connection it would try
            # for ever, so it is bounded here and retried with the relay's backoff
            nc = await asyncio.wait_for(nats.connect(
                cfg.url, name="cqrs-pg relay", connect_timeout=2, allow_reconnect=True, max_reconnect_attempts=-1,
                reconnect_time_wait=0.5, pending_size=64 * 1024 * 1024,
                error_cb=_quiet, disconnected_cb=_quiet_cb, reconnected_cb=_quiet_cb, closed_cb=_quiet_cb,
            ), 5)
        except (NoServersError, OSError, TimeoutError) as exc:
            raise BrokerError(f"cannot connect: {_first_line(exc) or type(exc).__name__}") from exc
        try:
            await self._ensure_stream(nc)
            publisher = Publisher(nc)
            await publisher.start()
        except BaseException:
            await nc.close()
            raise
        self._nc, self._publisher = nc, publisher
        return publisher

    async def _ensure_stream(self, nc: Any) -> None:
        from nats.js.api import StreamConfig
        from nats.js.errors import NotFoundError

        cfg = self.config
        js = nc.jetstream()
        wanted = f"{cfg.subject_prefix}.>"
        try:
            info = await js.stream_info(cfg.stream)
        except NotFoundError:
            await js.add_stream(StreamConfig(name=cfg.stream, subjects=[wanted], duplicate_window=cfg.duplicate_window))
            logger.info("created stream %s (subjects %s, duplicate window %gs)", cfg.stream, wanted, cfg.duplicate_window)
            return
        subjects = info.config.subjects or []
        if not any(_covers(s, wanted) for s in subjects):
            raise ConfigError(
                f"stream {cfg.stream} takes subjects {', '.join(subjects) or '(none)'}, not {wanted}: "
                f"add {wanted} to it, or pass another --stream or --subject-prefix"
            )
        window = info.config.duplicate_window or 0
        if window < cfg.duplicate_window:
            logger.warning("stream %s keeps message ids for %gs (its duplicate window): a relay down longer than that "
                           "with a batch published but not acknowledged may publish it twice", cfg.stream, window)

    async def _close_broker(self) -> None:
        if self._nc is not None:
            # closing a connection that may be half gone
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await self._nc.close()
            self._nc = self._publisher = None


def _require_migrated(dsn: str) -> None:
    with connect(dsn, application_name="cqrs-pg relay") as conn:
        require_migrated(conn)


def _covers(pattern: str, subject: str) -> bool:
    """Whether a stream subject pattern takes every subject under `subject` (P.>)."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return True
        if i >= len(s) or (token != "*" and token != s[i]) or s[i] == ">":
            return False
    return len(p) == len(s)


async def _quiet(exc: Exception) -> None:
    logger.debug("nats: %s", exc)


async def _quiet_cb() -> None:
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

