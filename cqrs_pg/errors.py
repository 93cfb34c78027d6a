"""Exceptions: what went wrong for an operator, and what a command refused, by SQLSTATE.

Operational errors (``CqrsPgError`` and subclasses) carry one line saying what to do;
the CLI prints that line, never a traceback. Command errors map the documented SQLSTATEs
(CQ001-CQ005) to classes, so callers can ``except cqrs_pg.errors.VersionConflict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


class CqrsPgError(Exception):
    """An operational problem with a one-line message saying what to do."""


class ConfigError(CqrsPgError):
    """Something the user must configure (a DSN, a path) is missing or wrong."""


class DatabaseUnavailable(CqrsPgError):
    """The server could not be reached or refused the connection."""


class NotMigrated(CqrsPgError):
    """The database has no cqrs_pg engine, or one of another version than this cqrs_pg's."""


class StandbyError(CqrsPgError):
    """A command that needs the primary was pointed at a standby."""


class ReplicaUnavailable(CqrsPgError):
    """No replica answered a read, and the router may not fall back to the primary."""


class ConsistencyTimeout(CqrsPgError):
    """A read-your-writes read waited its bound and the projection had not applied the token."""


class CommandError(Exception):
    """A command refused its arguments or the current state; ``sqlstate`` says why."""

    sqlstate = ""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        if sqlstate:
            self.sqlstate = sqlstate


class ValidationError(CommandError):
    sqlstate = "CQ001"


class NotFound(CommandError):
    sqlstate = "CQ002"


class Rejected(CommandError):
    sqlstate = "CQ003"


class VersionConflict(CommandError):
    sqlstate = "CQ004"


class IdempotencyConflict(CommandError):
    sqlstate = "CQ005"


BY_SQLSTATE: dict[str, type[CommandError]] = {
    cls.sqlstate: cls for cls in (ValidationError, NotFound, Rejected, VersionConflict, IdempotencyConflict)
}


@contextmanager
def refusals() -> Iterator[None]:
    """An engine function's refusal (its own SQLSTATE, CQxxx) as one line (CqrsPgError,
    its message); any other error as it is."""
    try:
        yield
    except psycopg.Error as exc:
        if exc.sqlstate and exc.sqlstate.startswith("CQ"):
            raise CqrsPgError(exc.diag.message_primary or str(exc)) from exc
        raise


def first_line(exc: BaseException) -> str:
    """An exception's message, its first line only (a log line's worth), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def from_psycopg(exc: psycopg.Error) -> Exception:
    """The CommandError for a cqrs SQLSTATE; the psycopg error itself otherwise."""
    cls = BY_SQLSTATE.get(exc.sqlstate or "")
    if cls is None:
        return exc
    message = exc.diag.message_primary or str(exc)
    return cls(message)
