"""cqrs_pg.commands against a real server: generated command ids, arguments of any
Python type, refusals as cqrs_pg.errors classes, and retries that stay exactly-once when
the connection is killed in the middle of a call or after its commit."""

from __future__ import annotations

import re
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from cqrs_pg import errors
from cqrs_pg.commands import CommandClient, Receipt, execute
from cqrs_pg_tools.testing import REPO, Database, row_locked, wait_until


def stock(db: Database, sku: str) -> int:
    with db.connect() as conn:
        return int(conn.execute("SELECT stock FROM shop.products WHERE sku = %s", (sku,)).fetchone()[0])


def receipts_of(db: Database, command_id: uuid.UUID) -> int:
    with db.connect() as conn:
        return int(conn.execute("SELECT count(*) FROM cqrs.commands WHERE command_id = %s", (command_id,)).fetchone()[0])


def test_calls_commands_with_a_new_command_id_each(db: Database) -> None:
    with CommandClient(db.dsn) as commands:
        customer = commands.call("shop.register_customer", "py@example.com", "Py")
        assert isinstance(customer, Receipt)
        assert (customer.version, customer.duplicate) == (1, False) and customer.token > 0
        # bigint and integer arguments, whatever the size of the Python int
        product = commands.call("shop.add_product", "PY-1", "Py", 2**40, 7)
        renamed = commands.call("shop.rename_customer", customer.aggregate_id, "Py 2", expected_version=1)
        assert (renamed.aggregate_id, renamed.version) == (customer.aggregate_id, 2)
        order = commands.call("shop.place_order", customer.aggregate_id, [{"sku": "PY-1", "quantity": 2}])
        shipped = commands.call("shop.ship_order", order.aggregate_id)
        assert shipped.version == 2
        ids = {r.command_id for r in (customer, product, renamed, order, shipped)}
        assert len(ids) == 5
        # a caller may choose the command_id (to retry later itself): same one, same receipt
        mine = uuid.uuid4()
        first = commands.call("shop.restock", "PY-1", 3, command_id=mine)
        assert first.command_id == mine
        assert commands.call("shop.restock", "PY-1", 3, command_id=mine) == first._replace(duplicate=True)
    assert stock(db, "PY-1") == 8


# Each: the class, then a call (function, args, kwargs) made after a customer (c) and the
# product PY-E (stock 1) exist, and a string its message must contain.
REFUSALS: dict[str, tuple[type[errors.CommandError], Any]] = {
    "CQ001": (errors.ValidationError, lambda c: (("shop.restock", "PY-E", 0), {}, "quantity")),
    "CQ002": (errors.NotFound, lambda c: (("shop.restock", "NOPE", 1), {}, "NOPE")),
    "CQ003": (errors.Rejected, lambda c: (("shop.add_product", "PY-E", "again", 1, 1), {}, "PY-E")),
    "CQ004": (errors.VersionConflict,
              lambda c: (("shop.rename_customer", c.aggregate_id, "x"), {"expected_version": 9}, "expected version 9")),
    "CQ005": (errors.IdempotencyConflict,
              lambda c: (("shop.restock", "PY-E", 2), {"command_id": c.command_id}, str(c.command_id))),
}


@pytest.mark.parametrize("sqlstate", sorted(REFUSALS))
def test_refusals_raise_their_class(db: Database, sqlstate: str) -> None:
    cls, make = REFUSALS[sqlstate]
    with CommandClient(db.dsn) as commands:
        customer = commands.call("shop.register_customer", f"e-{uuid.uuid4().hex[:6]}@example.com", "E")
        commands.call("shop.add_product", "PY-E", "e", 1, 1)
        args, kwargs, needle = make(customer)
        with pytest.raises(errors.CommandError) as info:
            commands.call(*args, **kwargs)
        assert type(info.value) is cls
        assert info.value.sqlstate == sqlstate
        assert needle in str(info.value)
        assert isinstance(info.value.__cause__, psycopg.Error)
        assert commands.retries == 0


def test_mistakes_in_python_are_reported_before_the_server(db: Database) -> None:
    with CommandClient(db.dsn) as commands:
        with pytest.raises(ValueError, match="schema"):
            commands.call("restock", "X", 1)
        with pytest.raises(ValueError, match="no function"):
            commands.call("shop.no_such_command", 1)
        with pytest.raises(ValueError, match=re.escape("returning cqrs.receipt")):
            commands.call("shop._parse_order_lines", [])
        with pytest.raises(TypeError, match="takes 2 arguments"):
            commands.call("shop.restock", "X", 1, 2)
        with pytest.raises(TypeError, match="no argument 'qty'"):
            commands.call("shop.restock", "X", qty=1)


def test_connection_killed_mid_call_is_retried_with_the_same_command_id(db: Database) -> None:
    """The call waits on a row lock when its backend is terminated: that attempt is rolled
    back, the client reconnects and runs it again under the same command_id, once."""
    with db.connect() as conn:
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'KILL-1', 'k', 1, 10)")
    app = f"kill-{uuid.uuid4().hex[:8]}"
    result: list[Any] = []
    client = CommandClient(db.dsn, application_name=app, backoff=0.05)
    with row_locked(db, "KILL-1"):
        caller = threading.Thread(target=lambda: result.append(client.call("shop.restock", "KILL-1", 5)))
        caller.start()
        with db.connect() as admin:
            pid = None

            def waiting() -> bool:
                nonlocal pid
                row = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                                    " AND wait_event_type = 'Lock'", (app,)).fetchone()
                pid = row and row[0]
                return pid is not None

            wait_until(waiting, "the call waits on the lock")
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            # the retry, on a new backend, waits on the lock too: then let go
            wait_until(lambda: admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"
                " AND pid <> %s", (app, pid)).fetchone()[0] == 1, "the retry waits on the lock")
    caller.join(timeout=60)
    client.close()
    (receipt,) = result
    assert client.retries == 1
    assert receipt.duplicate is False and receipt.version == 2
    assert stock(db, "KILL-1") == 15
    assert receipts_of(db, receipt.command_id) == 1


class LosesFirstReply:
    """A connection whose first command commits on the server, after which its backend is
    terminated before the client reads the receipt: the case where only idempotency can
    tell the client what happened."""

    def __init__(self, dsn: str, admin: psycopg.Connection) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.admin = admin
        self.lost: list[Receipt] = []

    def execute(self, query: Any, params: Any = None) -> Any:
        cursor = self.conn.execute(query, params)
        if self.lost or "duplicate" not in str(query.as_string(self.conn) if hasattr(query, "as_string") else query):
            return cursor
        self.lost.append(Receipt(*cursor.fetchone()))  # committed: autocommit
        pid = self.conn.info.backend_pid
        self.admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: not self.admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone(),
                   "the backend is gone")
        return self.conn.execute("SELECT 1")  # fails as a lost connection does

    @property
    def closed(self) -> bool:
        return self.conn.closed

    @property
    def broken(self) -> bool:
        return self.conn.broken

    def close(self) -> None:
        self.conn.close()


def test_reply_lost_after_commit_is_retried_to_the_first_receipt(db: Database) -> None:
    with db.connect() as admin:
        admin.execute("SELECT shop.add_product(gen_random_uuid(), 'LOST-2', 'l', 1, 10)")
        faulty = LosesFirstReply(db.dsn, admin)
        client = CommandClient(db.dsn, backoff=0.05)
        client._conn = faulty  # type: ignore[assignment]
        receipt = client.call("shop.restock", "LOST-2", 5)
        client.close()
    (lost,) = faulty.lost
    assert lost.duplicate is False
    assert receipt == lost._replace(duplicate=True)
    assert client.retries == 1
    assert stock(db, "LOST-2") == 15
    assert receipts_of(db, receipt.command_id) == 1


def test_gives_up_after_its_attempts(db: Database) -> None:
    with psycopg.connect(db.dsn) as conn:
        port = conn.info.port
    dead = db.dsn.replace(f"port={port}", "port=1")
    client = CommandClient(dead, attempts=3, backoff=0.01, connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        client.call("shop.restock", "X", 1)
    assert client.retries == 2
    assert time.monotonic() - started < 60


def test_with_a_pool_and_in_the_callers_transaction(db: Database) -> None:
    with ConnectionPool(db.dsn, min_size=1, max_size=2, open=True,
                        check=ConnectionPool.check_connection) as pool:
        commands = CommandClient(pool=pool)
        first = commands.call("shop.add_product", "POOL-1", "p", 1, 1)
        assert first.duplicate is False
        assert commands.call("shop.add_product", "POOL-1", "p", 1, 1, command_id=first.command_id).duplicate

    # execute(): one attempt inside the caller's transaction, rolled back with it
    with psycopg.connect(db.dsn) as conn:
        execute(conn, "shop.restock", "POOL-1", 4)
        with pytest.raises(errors.NotFound):
            execute(conn, "shop.restock", "NOPE", 1)
        conn.rollback()
    assert stock(db, "POOL-1") == 1


def test_readme_python_example(db: Database, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    match = re.search(r"<!-- readme-test: python -->\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert match, "README lost its python example"
    monkeypatch.setenv("CQRS_PG_DSN", db.dsn)
    exec(compile(match.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"^order [0-9a-f-]{36} version 1 token \d+$", out, re.M), out
    assert "refused: not enough stock of sku 'COFFEE-1': 99 ordered, 8 in stock" in out
    with db.connect() as conn:
        assert conn.execute("SELECT status, version FROM shop.orders").fetchall() == [("cancelled", 2)]
        assert conn.execute("SELECT stock FROM shop.products").fetchone() == (10,)
