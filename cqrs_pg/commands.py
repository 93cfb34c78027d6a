"""Calling commands from Python: a generated command_id, retries that are safe because
commands are idempotent, and refusals raised as :mod:`cqrs_pg.errors` classes.

    from cqrs_pg.commands import CommandClient

    with CommandClient(dsn) as commands:
        receipt = commands.call("shop.place_order", customer_id, [{"sku": "TEA-1", "quantity": 3}])

Each call runs in a transaction of its own. When the connection is lost (the server
restarts, an operator terminates the backend, the network drops) or the transaction is
rolled back by a deadlock or serialization failure, the client reconnects and sends the
same call again, with the same command_id. That is safe whatever happened to the first
attempt: if it committed, the retry returns its receipt (``duplicate = True``); if not, the
retry runs the command; if it is still running on the server, the retry waits for it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.types.json import Json, Jsonb

from cqrs_pg.errors import from_psycopg

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

logger = logging.getLogger("cqrs_pg.commands")

# Rolled back before it could take effect, or the connection is gone: the same call may be
# sent again. 57014 (statement timeout, cancel) is not here: it would likely time out again.
RETRYABLE = {"40001", "40P01", "57P01", "57P02", "57P03"}


class Receipt(NamedTuple):
    """What every command returns (the SQL type ``cqrs.receipt``)."""

    command_id: uuid.UUID
    aggregate_id: uuid.UUID | None
    version: int | None
    token: int
    duplicate: bool


class _Signature(NamedTuple):
    schema: str
    name: str
    types: list[str]  # of every argument, command_id first
    names: list[str]


def _signature(conn: psycopg.Connection, function: str) -> _Signature:
    schema, dot, name = function.partition(".")
    if not dot or not schema or not name or "." in name:
        raise ValueError(f"name the command function with its schema, as in 'shop.place_order', not {function!r}")
    rows = conn.execute(
        """SELECT array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t), p.proargnames,
                  p.prorettype = 'cqrs.receipt'::regtype
             FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = %s AND p.proname = %s""",
        (schema, name),
    ).fetchall()
    if len(rows) != 1 or not rows[0][2]:
        found = "no" if not rows else ("several" if len(rows) > 1 else "a non-command")
        raise ValueError(f"{function!r}: found {found} function of that name returning cqrs.receipt")
    types, names, _ = rows[0]
    return _Signature(schema, name, list(types), list(names or []))


def _adapt(value: Any, type_name: str) -> Any:
    if type_name == "jsonb" and not isinstance(value, Jsonb):
        return Jsonb(value)
    if type_name == "json" and not isinstance(value, Json):
        return Json(value)
    return value


def _statement(sig: _Signature, command_id: uuid.UUID, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[sql.Composed, list[Any]]:
    """SELECT * FROM schema.name(%s::uuid, %s::type, ..., name => %s::type): each argument
    cast to the declared type, so the server picks this function whatever Python type
    psycopg would send (an int may go as int2, int4, int8 or numeric)."""
    if len(args) + 1 > len(sig.types):
        raise TypeError(f"{sig.schema}.{sig.name} takes {len(sig.types) - 1} arguments after command_id, "
                        f"got {len(args)}")
    parts = [sql.SQL("%s::{}").format(sql.SQL(t)) for t in sig.types[: len(args) + 1]]
    params = [command_id, *(_adapt(v, t) for v, t in zip(args, sig.types[1:], strict=False))]  # the rest: by name or default
    for key, value in kwargs.items():
        if key not in sig.names[len(args) + 1:]:
            raise TypeError(f"{sig.schema}.{sig.name} has no argument {key!r} (after the positional ones)")
        type_name = sig.types[sig.names.index(key)]
        parts.append(sql.SQL("{} => %s::{}").format(sql.Identifier(key), sql.SQL(type_name)))
        params.append(_adapt(value, type_name))
    query = sql.SQL("SELECT command_id, aggregate_id, version, token, duplicate FROM {}.{}({})").format(
        sql.Identifier(sig.schema), sql.Identifier(sig.name), sql.SQL(", ").join(parts))
    return query, params


def execute(conn: psycopg.Connection, function: str, *args: Any, command_id: uuid.UUID | None = None,
            **kwargs: Any) -> Receipt:
    """One attempt, on the caller's connection and in its transaction (no retry): for a
    command that must commit together with other work. Refusals raise cqrs_pg.errors."""
    query, params = _statement(_signature(conn, function), command_id or uuid.uuid4(), args, kwargs)
    try:
        row = conn.execute(query, params).fetchone()
    except psycopg.Error as exc:
        error = from_psycopg(exc)
        if error is not exc:
            raise error from exc
        raise
    assert row is not None
    return Receipt(*row)


def _retryable(exc: psycopg.Error, conn: psycopg.Connection | None) -> bool:
    if exc.sqlstate in RETRYABLE or (exc.sqlstate or "").startswith("08"):
        return True
    # No SQLSTATE: the connection failed (could not connect, or closed under us: psycopg
    # marks a connection whose socket closed mid-query broken, not closed).
    return exc.sqlstate is None and isinstance(exc, psycopg.OperationalError) and (
        conn is None or conn.closed or conn.broken)


class CommandClient:
    """Calls command functions, each in its own transaction, retrying on connection loss.

    Give it a DSN (it keeps one connection, reopened when lost) or a psycopg_pool
    ConnectionPool. ``attempts`` bounds the tries of one call; between them it waits
    ``backoff`` seconds, doubling up to ``max_backoff``. Not for use by several threads at
    once with a DSN: give each thread its own client, or share a pool.
    """

    def __init__(self, dsn: str | None = None, *, pool: ConnectionPool | None = None, attempts: int = 5,
                 backoff: float = 0.1, max_backoff: float = 5.0, connect_timeout: int = 10,
                 application_name: str = "cqrs-pg commands") -> None:
        if (dsn is None) == (pool is None):
            raise ValueError("give CommandClient a dsn or a pool")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.dsn, self.pool = dsn, pool
        self.attempts, self.backoff, self.max_backoff = attempts, backoff, max_backoff
        self.connect_timeout, self.application_name = connect_timeout, application_name
        self.retries = 0  # attempts that failed and were retried, over the client's life
        self._conn: psycopg.Connection | None = None
        self._signatures: dict[str, _Signature] = {}

    def call(self, function: str, /, *args: Any, command_id: uuid.UUID | None = None, **kwargs: Any) -> Receipt:
        """Runs ``function`` (e.g. ``"shop.restock"``) with a new command_id (or the one
        given) and the arguments after it, positional or by name; returns its receipt.

        Raises ValidationError, NotFound, Rejected, VersionConflict or
        IdempotencyConflict (cqrs_pg.errors) when the command refuses; the last
        psycopg.OperationalError when every attempt lost its connection.
        """
        command_id = command_id or uuid.uuid4()
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            conn: psycopg.Connection | None = None
            try:
                with self._connection() as conn:
                    sig = self._signatures.get(function) or _signature(conn, function)
                    self._signatures[function] = sig
                    query, params = _statement(sig, command_id, args, kwargs)
                    row = conn.execute(query, params).fetchone()
                assert row is not None
                return Receipt(*row)
            except psycopg.Error as exc:
                error = from_psycopg(exc)
                if error is not exc:
                    raise error from exc
                if attempt == self.attempts or not _retryable(exc, conn):
                    raise
                logger.warning("%s (command_id %s): attempt %d of %d failed (%s: %s); retrying in %.2fs",
                               function, command_id, attempt, self.attempts, exc.sqlstate or type(exc).__name__,
                               str(exc).strip().splitlines()[0] if str(exc).strip() else "", delay)
                self.retries += 1
                self._discard()
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        if self.pool is not None:
            # The pool commits when the block ends, and discards a broken connection.
            with self.pool.connection() as conn:
                yield conn
            return
        if self._conn is None or self._conn.closed:
            assert self.dsn is not None
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout,
                                         application_name=self.application_name)
        yield self._conn

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._discard()

    def __enter__(self) -> CommandClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
