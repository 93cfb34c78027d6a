"""Event shapes that evolve: each event records its payload's shape version; after a
migration renames, adds and drops columns of a captured table, upcasters give every
reader (sql projections, python handlers, rebuilds) old events in the new shape."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from cqrs_pg.projections import Event, register, unregister
from cqrs_pg.rebuild import rebuild
from cqrs_pg_tools.testing import Database

SHAPE_1 = """
CREATE SCHEMA lib;
CREATE TABLE lib.books (id uuid PRIMARY KEY, title text NOT NULL, subtitle text, version integer NOT NULL);
SELECT cqrs.capture_changes('lib.books', 'book', 'book', 'id', 'version');
CREATE TABLE lib.titles (book_id uuid PRIMARY KEY, name text, pages integer);
CREATE FUNCTION lib.apply_titles(a bigint, b bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO titles (book_id, name, pages)
    SELECT DISTINCT ON (e.aggregate_id) e.aggregate_id, e.payload ->> 'title', NULL
      FROM cqrs.batch(a, b) e ORDER BY e.aggregate_id, e.aggregate_version DESC
    ON CONFLICT (book_id) DO UPDATE SET name = excluded.name, pages = excluded.pages;
END
$$;
SELECT cqrs.register_projection('titles', 'sql', 'lib.apply_titles', search_path => 'lib',
                                tables => ARRAY['lib.titles']::regclass[]);
INSERT INTO lib.books VALUES ('00000000-0000-0000-0000-000000000001', 'Dune', 'a novel', 1),
                             ('00000000-0000-0000-0000-000000000002', 'Emma', NULL, 1),
                             ('00000000-0000-0000-0000-000000000003', 'Ulysses', NULL, 1);
UPDATE lib.books SET title = 'Dune Messiah', version = 2 WHERE id = '00000000-0000-0000-0000-000000000001';
"""

# The user's migration: title renamed to name, pages added, subtitle dropped; the capture
# told the new shape; upcasters for its three event types; the apply function for shape 2.
SHAPE_2 = """
ALTER TABLE lib.books RENAME COLUMN title TO name;
ALTER TABLE lib.books ADD COLUMN pages integer NOT NULL DEFAULT 0;
ALTER TABLE lib.books DROP COLUMN subtitle;
SELECT cqrs.capture_changes('lib.books', 'book', 'book', 'id', 'version', payload_version => 2);
CREATE FUNCTION lib.book_1_to_2(p jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT (p - 'title' - 'subtitle') || jsonb_build_object('name', p -> 'title', 'pages', 0)
$$;
SELECT cqrs.register_upcaster(t, 1, 'lib.book_1_to_2') FROM unnest(ARRAY['book.created', 'book.updated', 'book.deleted']) t;
-- a python projection new since: it reads the whole log, old events included
SELECT cqrs.register_projection('book_log', 'python', search_path => 'lib');
CREATE OR REPLACE FUNCTION lib.apply_titles(a bigint, b bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO titles (book_id, name, pages)
    SELECT DISTINCT ON (e.aggregate_id) e.aggregate_id, e.payload ->> 'name', (e.payload ->> 'pages')::integer
      FROM cqrs.batch(a, b) e ORDER BY e.aggregate_id, e.aggregate_version DESC
    ON CONFLICT (book_id) DO UPDATE SET name = excluded.name, pages = excluded.pages;
END
$$;
INSERT INTO lib.books (id, name, pages, version) VALUES ('00000000-0000-0000-0000-000000000004', 'Beloved', 324, 1);
UPDATE lib.books SET name = 'Emma (annotated)', pages = 500, version = 2 WHERE id = '00000000-0000-0000-0000-000000000002';
"""

WRITE_MODEL = "SELECT id, name, pages FROM lib.books ORDER BY id"
READ_MODEL = "SELECT book_id, name, pages FROM lib.titles ORDER BY book_id"


@pytest.fixture
def seen() -> Iterator[list[Event]]:
    """The events the python projection book_log's handler was given."""
    events: list[Event] = []
    register("book_log")(lambda _conn, batch: events.extend(batch))
    try:
        yield events
    finally:
        unregister("book_log")


def test_a_migration_that_changes_a_captured_table_keeps_readers_right(db: Database, seen: list[Event]) -> None:
    with db.connect() as conn:
        conn.execute(SHAPE_1)
        db.run_projections()
        conn.execute(SHAPE_2)
        versions = conn.execute("SELECT payload_version, count(*) FROM cqrs.outbox WHERE aggregate_type = 'book'"
                                " GROUP BY 1 ORDER BY 1").fetchall()
        assert versions == [(1, 4), (2, 2)]  # each event records its shape
        db.run_projections()
        # the live read model: old rows kept, new events of shape 2 applied
        assert conn.execute(READ_MODEL).fetchall()[3] == conn.execute(WRITE_MODEL).fetchall()[3]
        # rebuilt from the log: old events upcast, so the whole read model is the write model's
        conn.execute("UPDATE lib.titles SET name = NULL")
        rebuild(db.dsn, "titles", 2, lambda _line: None)
        assert conn.execute(READ_MODEL).fetchall() == conn.execute(WRITE_MODEL).fetchall()
    # the python handler, registered after the migration, got every event in shape 2
    books = [e for e in seen if e.aggregate_type == "book"]
    assert len(books) == 6
    assert {e.payload_version for e in books} == {2}
    assert all("name" in e.payload and "title" not in e.payload and "subtitle" not in e.payload for e in books)
    assert [e.payload["name"] for e in books[:4]] == ["Dune", "Emma", "Ulysses", "Dune Messiah"]


def test_register_upcaster_refuses_misuse(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("CREATE FUNCTION public.up(p jsonb) RETURNS jsonb LANGUAGE sql AS 'SELECT p'")
        conn.execute("CREATE FUNCTION public.wrong(p text) RETURNS jsonb LANGUAGE sql AS 'SELECT NULL::jsonb'")
        conn.execute("SELECT cqrs.register_upcaster('order.created', 1, 'public.up')")
        for call, state in (
            ("SELECT cqrs.register_upcaster('order.created', 1, 'public.up')", "CQ003"),
            ("SELECT cqrs.register_upcaster('order.created', 2, 'public.wrong')", "CQ001"),
            ("SELECT cqrs.register_upcaster('order.created', 0, 'public.up')", "CQ001"),
            ("SELECT cqrs.register_upcaster(' ', 1, 'public.up')", "CQ001"),
            ("SELECT cqrs.capture_changes('shop.orders', 'order', 'order', 'id', 'version', payload_version => 0)",
             "CQ001"),
        ):
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(call)
            assert refused.value.sqlstate == state, call
        assert conn.execute("SELECT count(*) FROM cqrs.upcasters").fetchone() == (1,)
