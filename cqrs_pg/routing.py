"""Commands on the primary, reads on the replicas: one object for an application.

    from cqrs_pg.routing import Router

    with Router() as router:                  # CQRS_PG_DSN, CQRS_PG_REPLICA_DSN
        receipt = router.command("shop.place_order", customer, [{"sku": "TEA-1", "quantity": 3}])
        row = router.fetchone(
            "SELECT status, total_cents FROM shop_read.order_summary WHERE order_id = %s",
            (receipt.aggregate_id,),
            consistent_with=receipt.token, projection="order_summary",
        )

How reads are routed:
- The replica DSN may list several hosts (``host=a,b port=5432,5433`` or a URI). The
  router keeps one pool per host and spreads reads over them itself, round robin, so the
  spread is per read rather than per pooled connection, and it does not depend on
  ``load_balance_hosts`` (libpq 16+). Each host is connected with
  ``target_session_attrs=standby`` (unless the DSN names another value), so a replica that
  has been promoted is not read as a replica.
- A host that fails (no connection within ``connect_timeout``, or its connection breaks)
  is probed with a fresh connection; if that fails too it leaves the rotation for
  ``recheck_interval`` seconds, then the next read probes it again. The read itself moves
  on to the next host.
- When no replica answers, the read goes to the primary (``fallback="primary"``) or
  raises ReplicaUnavailable (``fallback="error"``). Without a replica DSN every read goes
  to the primary.
- A read cancelled by the replica because of a recovery conflict (SQLSTATE 40001 or
  40P01, "conflict with recovery") is run once more; a second conflict is raised.

Read-your-writes: ``consistent_with=token`` (a command receipt's token) first waits, on
the very connection the read then uses, until ``cqrs.caught_up(token, projection)`` is
true there (polling, the replica cannot LISTEN; finely around the wait this Router has
learnt to expect for that projection, _PollSchedule). A replica only moves forward, so what
the read sees afterwards includes the command's effect. When the wait exceeds
``wait_timeout``: ``on_stale="primary"`` waits (bounded by ``wait_timeout`` again) until
the projection has caught up on the primary and reads there; ``on_stale="error"`` raises
ConsistencyTimeout.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from uuid import UUID

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from cqrs_pg.commands import CommandClient, Receipt
from cqrs_pg.db import REPLICA_DSN_ENV, redact, require_dsn
from cqrs_pg.errors import (
    ConfigError,
    ConsistencyTimeout,
    ReplicaUnavailable,
    ValidationError,
    first_line,
    from_psycopg,
)

logger = logging.getLogger("cqrs_pg.routing")

__all__ = ["Receipt", "ReplicaHost", "Router", "is_recovery_conflict", "replica_hosts"]

T = TypeVar("T")
Fallback = Literal["primary", "error"]
_CHOICES = ("primary", "error")
# Polling cqrs.caught_up: once at once (an older token is there already), then every
# _POLL_FIRST for the usual wait (a few ms, _POLL_FAST_FOR); then backing off to _POLL_MAX,
# so a long wait does not hammer the replica. A command's effect reaches a replica about
# as long after it returns each time (the daemon's round and replication): once a wait of
# that projection has been seen, the next sleeps until shortly before the wait it expects
# and polls every _POLL_FINE around it, seeing the change within a fraction of a
# millisecond for about as many polls as the plain schedule takes.
_POLL_FIRST = 0.001
_POLL_FAST_FOR = 0.02
_POLL_MAX = 0.01
_POLL_FINE = 0.00025
# the expected wait's window of fine polls: from this share of it to ...
_FINE_FROM = 0.75
# ... this share of it, plus _POLL_FIRST (a late change is then seen by the plain schedule)
_FINE_TO = 1.5
# how fast the expected wait follows the waits seen (exponentially weighted)
_LEARN = 0.2
_CAUGHT_UP_SQL = "SELECT cqrs.caught_up(%s, %s)"


@dataclass
class _PollSchedule:
    """When to ask cqrs.caught_up again, from the first poll's start: the plain schedule,
    or with a projection's expected wait (seconds, learnt: _learnt), fine polls around it."""

    expected: float | None = None
    delay: float = _POLL_FIRST

    def sleep(self, elapsed: float) -> float:
        """Seconds to sleep before the next poll, `elapsed` seconds after the first."""
        e = self.expected
        if e is not None and e < _POLL_FAST_FOR:
            start, end = e * _FINE_FROM, e * _FINE_TO + _POLL_FIRST
            if elapsed < start - _POLL_FINE:
                return start - elapsed
            if elapsed < end:
                return _POLL_FINE
        if elapsed >= _POLL_FAST_FOR:
            self.delay = min(self.delay * 1.5, _POLL_MAX)
        return self.delay


def _learnt(expected: float | None, seen: float) -> float:
    """The expected wait after one of `seen` seconds. A long wait (the daemon stopped for a
    while) counts as _POLL_FAST_FOR: past that the plain schedule polls anyway."""
    seen = min(seen, _POLL_FAST_FOR)
    return seen if expected is None else expected + _LEARN * (seen - expected)


@dataclass(frozen=True)
class ReplicaHost:
    """One host of a (possibly multi-host) replica DSN, with a conninfo of its own."""

    label: str  # "host:port", for logs and status
    conninfo: str


def replica_hosts(dsn: str, target_session_attrs: str | None = "standby") -> list[ReplicaHost]:
    """Split a libpq conninfo or URI listing several hosts into one conninfo per host.

    Each keeps every other parameter; ``load_balance_hosts`` is dropped (one host has
    nothing to balance) and ``target_session_attrs`` is set unless the DSN has one.
    Raises ConfigError for a DSN libpq cannot parse or whose host/port lists disagree.
    """
    try:
        parsed = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid replica DSN {redact(dsn)!r}: {exc}") from exc
    params = {k: str(v) for k, v in parsed.items() if v is not None}
    params.pop("load_balance_hosts", None)
    if target_session_attrs and "target_session_attrs" not in params:
        params["target_session_attrs"] = target_session_attrs
    hosts = params.pop("host", "").split(",")
    addrs = params.pop("hostaddr", "").split(",")
    ports = params.pop("port", "").split(",")
    count = max(len(hosts), len(addrs))

    def spread(values: list[str], what: str) -> list[str]:
        if len(values) == 1:
            return values * count
        if len(values) != count:
            raise ConfigError(
                f"invalid replica DSN {redact(dsn)!r}: {len(values)} {what} values for {count} hosts"
            )
        return values

    result = []
    for host, addr, port in zip(spread(hosts, "host"), spread(addrs, "hostaddr"), spread(ports, "port"), strict=True):
        own = dict(params)
        for key, value in (("host", host), ("hostaddr", addr), ("port", port)):
            if value:
                own[key] = value
        result.append(ReplicaHost(f"{host or addr or 'localhost'}:{port or '5432'}", make_conninfo("", **own)))
    return result


def is_recovery_conflict(exc: BaseException) -> bool:
    """True for a query (or session) a hot standby cancelled to replay WAL."""
    if not isinstance(exc, psycopg.Error) or exc.sqlstate not in ("40001", "40P01"):
        return False
    message = exc.diag.message_primary or str(exc)
    return "conflict with recovery" in message


@dataclass
class _Replica:
    host: ReplicaHost
    pool: ConnectionPool | None = None  # None until a probe finds the host up
    down_until: float = 0.0  # monotonic; while in the future the host is skipped
    probing: bool = False


class _Unavailable(Exception):
    """A replica did not give a working connection (internal: move to the next one)."""


class Router:
    """A primary pool for commands and a replica pool per replica host for reads.

    ``dsn`` / ``replica_dsn`` default to CQRS_PG_DSN / CQRS_PG_REPLICA_DSN; no replica DSN
    means reads go to the primary. Thread-safe: share one Router per process.

    Options (a bad value raises ConfigError naming it):
      fallback          "primary": a read no replica answers goes to the primary;
                        "error": it raises ReplicaUnavailable.
      on_stale          "primary": a consistent read whose replica wait timed out reads
                        from the primary once the projection caught up there;
                        "error": it raises ConsistencyTimeout.
      wait_timeout      seconds a consistent read waits for cqrs.caught_up (per server).
      connect_timeout   seconds to wait for a connection from a pool, and libpq's
                        connect_timeout for a replica host whose DSN sets none.
      recheck_interval  seconds a replica that failed is left out before it is probed again.
      min_size, max_size  connections per pool (the primary's and each replica host's).
    """

    def __init__(
        self,
        dsn: str | None = None,
        replica_dsn: str | None = None,
        *,
        fallback: Fallback = "primary",
        on_stale: Fallback = "primary",
        wait_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        recheck_interval: float = 5.0,
        min_size: int = 1,
        max_size: int = 10,
        application_name: str = "cqrs-pg",
    ) -> None:
        for name, value in (("fallback", fallback), ("on_stale", on_stale)):
            if value not in _CHOICES:
                raise ConfigError(f"{name} must be 'primary' or 'error', not {value!r}")
        for name, number in (
            ("wait_timeout", wait_timeout),
            ("connect_timeout", connect_timeout),
            ("recheck_interval", recheck_interval),
        ):
            if not number > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, not {number!r}")
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigError(f"pool sizes must satisfy 0 <= min_size <= max_size, max_size >= 1; not {min_size}, {max_size}")
        self.fallback = fallback
        self.on_stale = on_stale
        self.wait_timeout = wait_timeout
        self.connect_timeout = connect_timeout
        self.recheck_interval = recheck_interval
        self._sizes = (min_size, max_size)
        self._application_name = application_name
        self.dsn = require_dsn(dsn)
        replica_dsn = replica_dsn if replica_dsn is not None else os.environ.get(REPLICA_DSN_ENV)
        self._replicas: list[_Replica] = []
        if replica_dsn:
            if psycopg.pq.version() < 140000:
                raise ConfigError(
                    f"reading from replicas needs libpq 14+ (target_session_attrs=standby); psycopg uses "
                    f"libpq {psycopg.pq.version()}: install psycopg[binary] or a newer libpq"
                )
            timeout = str(max(2, round(connect_timeout)))  # libpq takes whole seconds, at least 2
            for given in replica_hosts(replica_dsn):
                host = given
                if "connect_timeout" not in conninfo_to_dict(given.conninfo):
                    host = ReplicaHost(given.label, make_conninfo(given.conninfo, connect_timeout=timeout))
                self._replicas.append(_Replica(host))
        self._lock = threading.Lock()
        # a replica's probe ended: reads that found it probing by another thread wait on it
        self._probed = threading.Condition(self._lock)
        self._turn = itertools.count()
        # per projection (None: every one), how long after the first poll a change came
        self._expected: dict[str | None, float] = {}
        self._closed = False
        self._primary = self._pool(self.dsn, "cqrs-pg primary")
        self._commands = CommandClient(pool=self._primary)

    # -- public API ----------------------------------------------------------------------

    def command(self, function: str, /, *args: Any, command_id: UUID | None = None, **kwargs: Any) -> Receipt:
        """Call a command on the primary: cqrs_pg.commands.CommandClient.call on this pool.

        ``function`` is a name like ``"shop.place_order"``; the arguments follow command_id
        (a new one unless given), positional or by name. A refused command raises its
        cqrs_pg.errors.CommandError subclass; a lost connection is retried with the same
        command_id, which is safe.
        """
        return self._commands.call(function, *args, command_id=command_id, **kwargs)

    @contextmanager
    def primary(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection to the primary from the pool (autocommit), for anything else."""
        with self._primary.connection(timeout=self.connect_timeout) as conn:
            yield conn

    def read(
        self,
        fn: Callable[[psycopg.Connection[Any]], T],
        *,
        consistent_with: int | None = None,
        projection: str | None = None,
        timeout: float | None = None,
    ) -> T:
        """Run ``fn(conn)`` on a replica connection (autocommit) and return its result.

        ``consistent_with``: a command receipt's token; ``fn`` then sees that command's
        effect on ``projection`` (None: every projection). ``timeout`` overrides
        wait_timeout. ``fn`` may run twice (after a recovery conflict, or when a replica
        fails under it), so it must only read.
        """
        if projection is not None and consistent_with is None:
            raise ValueError("projection only applies with consistent_with=token")
        if consistent_with is not None and (
            isinstance(consistent_with, bool) or not isinstance(consistent_with, int)
            or not 0 <= consistent_with < 2**63
        ):
            raise ValidationError(f"consistent_with must be a command's token (a whole number from 0 to 2**63 - 1), "
                                  f"not {consistent_with!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < math.inf
        ):
            raise ConfigError(f"timeout must be a finite number of seconds, 0 or more, not {timeout!r}")
        wait = self.wait_timeout if timeout is None else timeout
        try:
            return self._read(fn, consistent_with, projection, wait)
        except psycopg.Error as exc:
            if not is_recovery_conflict(exc):
                raise
            logger.info("read cancelled by a recovery conflict on a replica; running it once more: %s", first_line(exc))
        return self._read(fn, consistent_with, projection, wait)

    def fetchall(self, query: Any, params: Sequence[Any] | None = None, **read: Any) -> list[Any]:
        """``read()`` of one query's rows; takes read()'s keyword arguments."""
        return self.read(lambda conn: conn.execute(query, params).fetchall(), **read)

    def fetchone(self, query: Any, params: Sequence[Any] | None = None, **read: Any) -> Any:
        """``read()`` of one query's first row (None if none)."""
        return self.read(lambda conn: conn.execute(query, params).fetchone(), **read)

    def replicas(self) -> list[tuple[str, str]]:
        """Each replica host with its state: "new" (not tried yet), "up" (in the rotation)
        or "down" (failed; probed again recheck_interval after it failed)."""
        with self._lock:
            return [
                (r.host.label, "up" if r.pool is not None else "down" if r.down_until else "new")
                for r in self._replicas
            ]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = [r.pool for r in self._replicas if r.pool is not None]
            for r in self._replicas:
                r.pool = None
        for pool in [self._primary, *pools]:
            pool.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def _read(
        self, fn: Callable[[psycopg.Connection[Any]], T], token: int | None, projection: str | None, wait: float
    ) -> T:
        if not self._replicas:
            return self._read_primary(fn, token, projection, wait)
        for replica in self._rotation():
            try:
                with self._replica_connection(replica) as conn:
                    if token is not None and not self._caught_up(conn, token, projection, wait):
                        if self.on_stale == "error":
                            raise ConsistencyTimeout(
                                f"replica {replica.host.label} has not applied token {token} "
                                f"to {_what(projection)} within {wait:g}s"
                            )
                        logger.info(
                            "replica %s has not applied token %s to %s within %gs: reading from the primary",
                            replica.host.label, token, _what(projection), wait,
                        )
                        break
                    return fn(conn)
            except _Unavailable:
                continue
        else:
            if self.fallback == "error":
                labels = ", ".join(r.host.label for r in self._replicas)
                raise ReplicaUnavailable(f"no replica answered ({labels}) and fallback to the primary is off")
            logger.warning("no replica answered: reading from the primary")
        return self._read_primary(fn, token, projection, wait)

    def _read_primary(
        self, fn: Callable[[psycopg.Connection[Any]], T], token: int | None, projection: str | None, wait: float
    ) -> T:
        with self.primary() as conn:
            if token is not None and not self._caught_up(conn, token, projection, wait):
                raise ConsistencyTimeout(
                    f"the primary has not applied token {token} to {_what(projection)} within {wait:g}s: "
                    "is the daemon (cqrs-pg listen) running and keeping up?"
                )
            return fn(conn)

    def _caught_up(self, conn: psycopg.Connection[Any], token: int, projection: str | None, wait: float) -> bool:
        """Poll cqrs.caught_up on this connection until true or ``wait`` seconds passed."""
        started = time.monotonic()
        deadline = started + wait
        schedule = _PollSchedule(self._expected.get(projection))
        missed: float | None = None  # when the last poll that found it not there started
        while True:
            asked = time.monotonic()
            try:
                row = conn.execute(_CAUGHT_UP_SQL, (token, projection)).fetchone()
            except psycopg.Error as exc:
                mapped = from_psycopg(exc)  # CQ001 bad token, CQ002 unknown projection
                if mapped is exc:
                    raise
                raise mapped from exc
            if row is not None and row[0]:
                if missed is not None:  # it came between the last two polls
                    seen = (missed + asked) / 2 - started
                    self._expected[projection] = _learnt(self._expected.get(projection), seen)
                return True
            missed = asked
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                return False
            time.sleep(min(schedule.sleep(now - started), left))

    # -- replica hosts -------------------------------------------------------------------

    def _rotation(self) -> list[_Replica]:
        """The replicas in this read's order: round robin, hosts left out skipped."""
        start = next(self._turn)
        n = len(self._replicas)
        order = [self._replicas[(start + i) % n] for i in range(n)]
        now = time.monotonic()
        with self._lock:
            return [r for r in order if r.down_until <= now]

    @contextmanager
    def _replica_connection(self, replica: _Replica) -> Iterator[psycopg.Connection[Any]]:
        """A working connection from this replica's pool; _Unavailable when the replica fails."""
        pool, conn = self._acquire(replica)
        lost: psycopg.Error | None = None
        try:
            yield conn
        except psycopg.Error as exc:
            if not conn.broken or is_recovery_conflict(exc):
                raise
            lost = exc  # e.g. the replica shut down under the read
        finally:
            pool.putconn(conn)  # a broken connection is dropped by the pool
        if lost is not None:
            self._failed(replica, pool, lost)
            raise _Unavailable from lost

    def _acquire(self, replica: _Replica) -> tuple[ConnectionPool, psycopg.Connection[Any]]:
        pool = replica.pool or self._bring_up(replica)
        if pool is None:
            raise _Unavailable
        # Our own check rather than the pool's: a pool whose host is down waits out its
        # whole timeout for a replacement, while a probe fails at once.
        for _ in range(self._sizes[1] + 1):
            try:
                conn = pool.getconn(timeout=self.connect_timeout)
            except psycopg.OperationalError as exc:  # PoolTimeout, PoolClosed
                self._failed(replica, pool, exc)
                raise _Unavailable from exc
            try:
                conn.execute("")
                return pool, conn
            except psycopg.Error as exc:
                pool.putconn(conn)
                if not self._failed(replica, pool, exc):
                    raise _Unavailable from exc
                # still up: that connection predates a restart; take another
        raise _Unavailable

    def _bring_up(self, replica: _Replica) -> ConnectionPool | None:
        """Probe a replica that has no pool (new, or left out); its pool if it answers."""
        with self._lock:
            # another read is probing it: wait for the answer (one connection attempt), not
            # skip a replica nobody has found down
            deadline = time.monotonic() + self.connect_timeout + 1.0
            while replica.probing and not self._closed and (left := deadline - time.monotonic()) > 0:
                self._probed.wait(left)
            if replica.pool is not None:
                return replica.pool
            if replica.probing or self._closed or replica.down_until > time.monotonic():
                return None  # its probe failed (or has not answered): skip it this time
            replica.probing = True
        try:
            error = self._probe(replica.host)
            pool = None if error is not None else self._pool(replica.host.conninfo, f"cqrs-pg replica {replica.host.label}", check=False)
        except BaseException:
            with self._lock:
                replica.probing = False
                self._probed.notify_all()
            raise
        with self._lock:
            replica.probing = False
            self._probed.notify_all()
            closed = self._closed
            if pool is None:
                replica.down_until = time.monotonic() + self.recheck_interval
            elif not closed:
                replica.pool, replica.down_until = pool, 0.0
        if pool is None:
            logger.warning(
                "replica %s does not answer (%s); trying it again in %gs", replica.host.label, error, self.recheck_interval
            )
            return None
        if closed:
            pool.close()
            return None
        logger.info("replica %s is in the rotation", replica.host.label)
        return pool

    def _failed(self, replica: _Replica, pool: ConnectionPool, exc: BaseException) -> bool:
        """A replica failed a read: leave it out unless a fresh connection works.

        True when it still answers (a saturated pool, or connections broken by a restart)."""
        error = self._probe(replica.host)
        if error is None:
            logger.info("replica %s failed a read (%s) but answers a new connection", replica.host.label, first_line(exc))
            return True
        with self._lock:
            mine = replica.pool is pool  # else another thread already took it out
            if mine:
                replica.pool = None
                replica.down_until = time.monotonic() + self.recheck_interval
        if mine:
            logger.warning(
                "replica %s left the rotation (%s); trying it again in %gs",
                replica.host.label, error, self.recheck_interval,
            )
            pool.close(timeout=0.1)
        return False

    def _probe(self, host: ReplicaHost) -> str | None:
        """None when a new connection to the host works, else why not (one line)."""
        try:
            psycopg.connect(host.conninfo, application_name=self._application_name).close()
        except psycopg.Error as exc:
            return first_line(exc)
        return None

    def _pool(self, conninfo: str, name: str, check: bool = True) -> ConnectionPool:
        kwargs: dict[str, Any] = {"autocommit": True}
        if "application_name" not in conninfo_to_dict(conninfo):
            kwargs["application_name"] = self._application_name
        min_size, max_size = self._sizes
        return ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            kwargs=kwargs,
            open=True,
            check=ConnectionPool.check_connection if check else None,
            name=name,
            timeout=self.connect_timeout,
        )


def _what(projection: str | None) -> str:
    return "every projection" if projection is None else f"projection {projection!r}"


