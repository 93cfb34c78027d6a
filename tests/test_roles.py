"""The three group roles are enough for what each user does: a login member of each
role runs its part of the system, and nothing more is needed."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from cqrs_pg.daemon import Listener, ListenerConfig
from cqrs_pg.status import collect
from cqrs_pg_tools.testing import Database
from cqrs_pg_tools.verify import all_mismatches


def test_writer_reader_and_listener_roles_run_the_loop(db: Database, login_as) -> None:  # type: ignore[no-untyped-def]
    writer = make_conninfo(db.dsn, user=login_as("cqrs_writer"))
    listener_dsn = make_conninfo(db.dsn, user=login_as("cqrs_listener"))
    reader = make_conninfo(db.replica_dsn, user=login_as("cqrs_reader"))
    with psycopg.connect(writer, autocommit=True) as conn:
        customer = conn.execute(
            "SELECT aggregate_id FROM shop.register_customer(gen_random_uuid(), 'role@example.com', 'Role')"
        ).fetchone()[0]
        conn.execute("SELECT shop.add_product(gen_random_uuid(), 'R-1', 'r', 300, 10)")
        order, token = conn.execute(
            "SELECT aggregate_id, token FROM shop.place_order(gen_random_uuid(), %s, %s)",
            (customer, Jsonb([{"sku": "R-1", "quantity": 2}])),
        ).fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM shop.orders")

    listener = Listener(ListenerConfig(dsn=listener_dsn, refresh_interval=0.1, stall_warning=0.5))
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        db.wait_caught_up(token)
        report = collect(listener_dsn, db.replica_dsn)  # cqrs-pg status, as the listener
        assert {p["name"] for p in report["projections"]} == {"order_summary", "customer_stats", "product_sales"}
    finally:
        listener.stop()
        thread.join(timeout=30)
    assert listener.applied_total > 0

    with psycopg.connect(reader, autocommit=True) as conn:
        assert conn.execute("SELECT cqrs.caught_up(%s)", (token,)).fetchone()[0]
        row = conn.execute("SELECT status, total_cents FROM shop_read.order_summary WHERE order_id = %s", (order,))
        assert row.fetchone() == ("placed", 600)
        assert conn.execute("SELECT units_sold FROM shop_read.product_sales").fetchone()[0] == 2
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM cqrs.outbox")
    with db.connect() as conn:
        assert all_mismatches(conn) == {"order_summary": 0, "customer_stats": 0, "product_sales": 0}


# --------------------------------------------------------------------------- least privilege

OUR_SCHEMAS = ["cqrs", "shop", "shop_read", "shop_proj"]
COMMANDS = {
    "shop.register_customer(uuid,text,text)",
    "shop.rename_customer(uuid,uuid,text,integer)",
    "shop.add_product(uuid,text,text,bigint,integer)",
    "shop.restock(uuid,text,integer)",
    "shop.change_price(uuid,text,bigint)",
    "shop.place_order(uuid,uuid,jsonb)",
    "shop.cancel_order(uuid,uuid,integer)",
    "shop.ship_order(uuid,uuid,integer)",
}
CAUGHT_UP = "cqrs.caught_up(bigint,text)"


def functions(conn: psycopg.Connection) -> dict[str, sql.Composable]:
    """Every function of our schemas: its signature, and a call of it with NULL arguments."""
    rows = conn.execute(
        """SELECT p.oid::regprocedure::text, n.nspname, p.proname,
                  array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t)
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = ANY (%s) AND p.prokind = 'f'""",
        (OUR_SCHEMAS,),
    ).fetchall()
    assert len(rows) > 40
    return {
        signature.replace(", ", ","): sql.SQL("SELECT {}.{}({})").format(
            sql.Identifier(schema), sql.Identifier(name),
            sql.SQL(", ").join(sql.SQL("NULL::{}").format(sql.SQL(t)) for t in types))
        for signature, schema, name, types in rows
    }


def relations(conn: psycopg.Connection) -> list[str]:
    """Every table, view, materialized view and sequence of our schemas."""
    rows = conn.execute(
        """SELECT c.oid::regclass::text, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY (%s) AND c.relkind IN ('r', 'p', 'v', 'm', 'S')""",
        (OUR_SCHEMAS,),
    ).fetchall()
    assert {"cqrs.outbox", "cqrs.commands", "shop.orders", "shop_read.order_summary"} <= {r[0] for r in rows}
    return sorted(r[0] for r in rows)


def denied(conn: psycopg.Connection, statement: sql.Composable | str) -> bool:
    """True if the statement fails for lack of a privilege (42501), False if it runs."""
    try:
        with conn.transaction():
            conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        return True
    except psycopg.Error as exc:
        raise AssertionError(f"{statement!r}: {exc.sqlstate} {exc}") from exc
    return False


def allowed(conn: psycopg.Connection, statement: sql.Composable) -> bool:
    """True if the statement gets past the privilege check (it may fail later, e.g. on a
    NULL argument with CQ001)."""
    try:
        with conn.transaction():
            conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        return False
    except psycopg.Error:
        return True
    return True


def readable(conn: psycopg.Connection, relation: str) -> bool:
    return not denied(conn, f"SELECT * FROM {relation} LIMIT 1")


def writes_denied(conn: psycopg.Connection, relation: str) -> bool:
    with conn.transaction():
        kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (relation,)).fetchone()[0]
    if kind == "m":  # a materialized view: only its owner may refresh it
        return denied(conn, f"REFRESH MATERIALIZED VIEW {relation}")
    return all(
        denied(conn, statement)
        for statement in (
            f"INSERT INTO {relation} DEFAULT VALUES",
            f"UPDATE {relation} SET {plain_column(conn, relation)} = NULL WHERE false",
            f"DELETE FROM {relation} WHERE false",
            f"TRUNCATE {relation}",
        )
    )


def plain_column(conn: psycopg.Connection, relation: str) -> str:
    """A column an UPDATE may name (not an identity or generated one)."""
    with conn.transaction():
        return conn.execute(
            "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped AND attidentity = '' AND attgenerated = '' ORDER BY attnum LIMIT 1",
            (relation,),
        ).fetchone()[0]


def can_create_in_our_schemas(conn: psycopg.Connection) -> list[str]:
    return [s for s in OUR_SCHEMAS if not denied(conn, f"CREATE TABLE {s}.intruder (x int)")]


def test_writer_executes_the_eight_commands_and_nothing_else(db: Database, login_as) -> None:  # type: ignore[no-untyped-def]
    with db.connect() as admin:
        everything, tables = functions(admin), relations(admin)
    assert set(everything) >= COMMANDS
    with psycopg.connect(make_conninfo(db.dsn, user=login_as("cqrs_writer")), autocommit=True) as conn:
        run_all_eight(conn)
        executable = {f for f, call in everything.items() if allowed(conn, call)}
        assert executable == COMMANDS
        assert [t for t in tables if readable(conn, t)] == []
        for table in ("cqrs.outbox", "cqrs.commands", "shop.products", "shop.orders"):
            assert writes_denied(conn, table), table
        assert can_create_in_our_schemas(conn) == []


def test_reader_reads_shop_read_and_calls_caught_up_only(db: Database, login_as) -> None:  # type: ignore[no-untyped-def]
    with db.connect() as admin:
        everything, tables = functions(admin), relations(admin)
        with admin.transaction():
            run_all_eight(admin)
    db.run_projections()
    read_models = [t for t in tables if t.startswith("shop_read.")]
    assert len(read_models) >= 3
    with psycopg.connect(make_conninfo(db.dsn, user=login_as("cqrs_reader")), autocommit=True) as conn:
        executable = {f for f, call in everything.items() if allowed(conn, call)}
        assert executable == {CAUGHT_UP}
        assert conn.execute("SELECT cqrs.caught_up(1)").fetchone() == (True,)
        assert [t for t in tables if readable(conn, t)] == read_models
        assert conn.execute("SELECT count(*) FROM shop_read.order_summary").fetchone()[0] == 2
        for table in read_models:
            assert writes_denied(conn, table), table
        assert can_create_in_our_schemas(conn) == []


def test_public_can_do_nothing(db: Database) -> None:
    """A login role in no group (only PUBLIC's privileges): no function, no relation."""
    name = f"nobody_{uuid.uuid4().hex[:8]}"
    with db.connect() as admin:
        everything, tables = functions(admin), relations(admin)
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        with psycopg.connect(make_conninfo(db.dsn, user=name), autocommit=True) as conn:
            assert {f for f, call in everything.items() if allowed(conn, call)} == set()
            assert [t for t in tables if readable(conn, t)] == []
            assert can_create_in_our_schemas(conn) == []
    finally:
        with db.connect() as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def run_all_eight(conn: psycopg.Connection) -> None:
    """Each of the eight commands once, with command ids made here (not by the session's
    gen_random_uuid(), which a hijacked search_path would replace)."""
    tag = uuid.uuid4().hex[:8]
    sku = f"E-{tag}"

    def command(query: str, *args: object) -> uuid.UUID:
        row = conn.execute(f"SELECT aggregate_id FROM shop.{query}", (uuid.uuid4(), *args)).fetchone()
        assert row is not None
        return row[0]

    customer = command("register_customer(%s, %s, 'Eight')", f"eight-{tag}@example.com")
    command("rename_customer(%s, %s, 'Eight B', 1)", customer)
    command("add_product(%s, %s, 'e', 100, 10)", sku)
    command("restock(%s, %s, 5)", sku)
    command("change_price(%s, %s, 120)", sku)
    lines = Jsonb([{"sku": sku, "quantity": 2}])
    placed = [command("place_order(%s, %s, %s)", customer, lines) for _ in range(2)]
    command("ship_order(%s, %s, 1)", placed[0])
    command("cancel_order(%s, %s)", placed[1])


# --------------------------------------------------------------------------- search_path hijack

EVIL_UUID = "00000000-0000-4000-8000-0000000e0e11"

# Look-alikes of what the commands call unqualified, in a schema the attacker owns: each
# logs that it ran (as whichever role ran it) and behaves like the real one.
HIJACK = f"""
CREATE TABLE {{schema}}.calls (fn text, as_role text DEFAULT current_user);
GRANT INSERT ON {{schema}}.calls TO PUBLIC;
CREATE FUNCTION {{schema}}.gen_random_uuid() RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN INSERT INTO {{schema}}.calls (fn) VALUES ('gen_random_uuid'); RETURN '{EVIL_UUID}'; END $$;
CREATE FUNCTION {{schema}}.lower(text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN INSERT INTO {{schema}}.calls (fn) VALUES ('lower'); RETURN pg_catalog.lower($1); END $$;
CREATE FUNCTION {{schema}}.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN INSERT INTO {{schema}}.calls (fn) VALUES ('now'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION {{schema}}.set_config(text, text, boolean) RETURNS text LANGUAGE plpgsql AS $$
BEGIN INSERT INTO {{schema}}.calls (fn) VALUES ('set_config'); RETURN pg_catalog.set_config($1, $2, $3); END $$;
CREATE FUNCTION {{schema}}.length(text) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO {{schema}}.calls (fn) VALUES ('length'); RETURN pg_catalog.length($1); END $$;
CREATE FUNCTION {{schema}}.spy_texteq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO {{schema}}.calls (fn) VALUES ('text ='); RETURN pg_catalog.texteq($1, $2); END $$;
CREATE OPERATOR {{schema}}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {{schema}}.spy_texteq);
CREATE FUNCTION {{schema}}.spy_uuideq(uuid, uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO {{schema}}.calls (fn) VALUES ('uuid ='); RETURN pg_catalog.uuid_eq($1, $2); END $$;
CREATE OPERATOR {{schema}}.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = {{schema}}.spy_uuideq);
"""


def test_search_path_hijack_fails(db: Database, login_as) -> None:  # type: ignore[no-untyped-def]
    """A writer puts a schema of its own first on search_path, with look-alikes of
    functions and operators the commands use. The SECURITY DEFINER commands (running as
    their owner) pin search_path, so none of them runs. A control shows the same attack
    succeeds against a definer function that does not pin it."""
    user = login_as("cqrs_writer")
    evil = f"evil_{uuid.uuid4().hex[:8]}"
    with db.connect() as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(evil), sql.Identifier(user)))
        # the control: a definer function without a pinned search_path
        admin.execute(
            sql.SQL("CREATE FUNCTION {}.unpinned() RETURNS uuid LANGUAGE plpgsql SECURITY DEFINER"
                    " AS $$ BEGIN RETURN gen_random_uuid(); END $$").format(sql.Identifier(evil)))
    try:
        hijack(db, user, evil)
    finally:
        with db.connect() as admin:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(evil)))


def hijack(db: Database, user: str, evil: str) -> None:
    with psycopg.connect(make_conninfo(db.dsn, user=user), autocommit=True) as conn:
        conn.execute(HIJACK.format(schema=evil))
        conn.execute(sql.SQL("SET search_path = {}, pg_catalog, public").format(sql.Identifier(evil)))
        assert conn.execute("SELECT gen_random_uuid()::text, lower('A') = 'a'").fetchone() == (EVIL_UUID, True)
        conn.execute(sql.SQL("TRUNCATE {}.calls").format(sql.Identifier(evil)))

        run_all_eight(conn)
        assert conn.execute("SELECT count(*) FROM shop.register_customer(%s, 'hijack@example.com', 'H')"
                            " WHERE aggregate_id <> %s", (uuid.uuid4(), EVIL_UUID)).fetchone() == (1,)
        calls = sql.SQL("SELECT fn, as_role FROM {}.calls").format(sql.Identifier(evil))
        assert conn.execute(calls).fetchall() == []

        # control: the look-alike does run, as the definer, where search_path is not pinned
        assert conn.execute(sql.SQL("SELECT {}.unpinned()::text").format(sql.Identifier(evil))).fetchone() == (EVIL_UUID,)
        assert conn.execute(calls).fetchall() == [("gen_random_uuid", "postgres")]
