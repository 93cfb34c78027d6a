"""Receipts (cqrs.commands): durable, kept until cqrs.prune_receipts removes them, which
only the daemon's role (or the owner) may call; the README's pruning loop works."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cqrs_pg_tools.testing import Database, call, psql, readme_block, run


@pytest.fixture
def conn(db: Database) -> Iterator[psycopg.Connection]:
    with db.connect() as c:
        yield c


def backdate(conn: psycopg.Connection, command_id: uuid.UUID, age: str) -> None:
    conn.execute("UPDATE cqrs.commands SET created_at = now() - %s::interval WHERE command_id = %s", (age, command_id))


def receipts(conn: psycopg.Connection) -> set[uuid.UUID]:
    return {r[0] for r in conn.execute("SELECT command_id FROM cqrs.commands").fetchall()}


def test_receipts_are_durable(conn: psycopg.Connection) -> None:
    """A logged table (not UNLOGGED or TEMP: it survives a crash and replicates)."""
    assert conn.execute("SELECT relpersistence FROM pg_class WHERE oid = 'cqrs.commands'::regclass").fetchone() == ("p",)


def test_prune_receipts_removes_only_old_ones_oldest_first(conn: psycopg.Connection) -> None:
    r = [run(conn, "add_product", f"P-{i}", "p", 1, 1) for i in range(5)]
    for i, age in enumerate(["40 days", "35 days", "31 days"]):
        backdate(conn, r[i].command_id, age)
    assert conn.execute("SELECT cqrs.prune_receipts('30 days', 2)").fetchone() == (2,)
    assert receipts(conn) == {x.command_id for x in r[2:]}
    assert conn.execute("SELECT cqrs.prune_receipts('30 days')").fetchone() == (1,)
    assert conn.execute("SELECT cqrs.prune_receipts('30 days')").fetchone() == (0,)
    assert receipts(conn) == {x.command_id for x in r[3:]}
    # the write model and the events are untouched
    assert conn.execute("SELECT count(*) FROM shop.products").fetchone() == (5,)
    assert conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone() == (5,)


def test_a_pruned_command_id_runs_again(conn: psycopg.Connection) -> None:
    """Why retention must outlast every client's retries: after pruning, a retry is a new
    command."""
    run(conn, "add_product", "R-1", "r", 1, 0)
    first = run(conn, "restock", "R-1", 5)
    assert call(conn, "restock", first.command_id, "R-1", 5).duplicate is True
    backdate(conn, first.command_id, "8 days")
    assert conn.execute("SELECT cqrs.prune_receipts('7 days')").fetchone() == (1,)
    again = call(conn, "restock", first.command_id, "R-1", 5)
    assert (again.duplicate, again.version) == (False, 3)
    assert conn.execute("SELECT stock FROM shop.products WHERE sku = 'R-1'").fetchone() == (10,)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ("NULL, 10", ("older_than", "null")),
        ("'-1 day', 10", ("older_than", "-1 days")),
        ("'1 day', 0", ("max_rows", "0")),
        ("'1 day', 1000001", ("max_rows", "1000001")),
        ("'1 day', NULL", ("max_rows", "null")),
    ],
)
def test_prune_receipts_refuses_bad_arguments(conn: psycopg.Connection, args: str, needles: tuple[str, ...]) -> None:
    run(conn, "add_product", "B-1", "b", 1, 1)
    with pytest.raises(psycopg.Error) as info:
        conn.execute(f"SELECT cqrs.prune_receipts({args})")
    assert info.value.sqlstate == "CQ001"
    for needle in needles:
        assert needle in (info.value.diag.message_primary or "")
    assert conn.execute("SELECT count(*) FROM cqrs.commands").fetchone() == (1,)


def test_readme_pruning_loop_runs_as_the_listener_role(db: Database, conn: psycopg.Connection) -> None:
    """The README's statement, as a login member of cqrs_listener: it prunes in batches
    (each committed on its own) until none is left; writers and readers may not prune."""
    old = [run(conn, "add_product", f"L-{i}", "l", 1, 1).command_id for i in range(25)]
    recent = run(conn, "add_product", "L-new", "l", 1, 1).command_id
    for command_id in old:
        backdate(conn, command_id, "31 days")
    block = readme_block("prune")
    assert "prune_receipts('30 days'" in block
    role = f"pruner_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE cqrs_listener").format(sql.Identifier(role)))
    try:
        psql(make_conninfo(db.dsn, user=role), block.replace("10000", "10"))  # 3 batches here
    finally:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert receipts(conn) == {recent}
    for group in ("cqrs_writer", "cqrs_reader"):
        assert conn.execute(
            "SELECT has_function_privilege(%s, 'cqrs.prune_receipts(interval, integer)', 'EXECUTE')", (group,)
        ).fetchone() == (False,)
