"""The eight shop commands against a real PostgreSQL: write-model effects, receipts,
outbox events, documented errors (by SQLSTATE), idempotency and atomicity."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from cqrs_pg.projections import Event
from cqrs_pg_tools.testing import SIGNATURES, Database, Receipt, call, line, run

if TYPE_CHECKING:
    from cqrs_pg_tools.devcluster import DevCluster

WRITE_TABLES = ("shop.customers", "shop.products", "shop.orders", "shop.order_lines")
ALL_TABLES = (*WRITE_TABLES, "cqrs.outbox", "cqrs.commands")

# An id that no row has: CQ002 messages must name it.
UNKNOWN = uuid.UUID("00000000-0000-4000-8000-00000000dead")


# --------------------------------------------------------------------------- helpers


def fails(conn: psycopg.Connection, command: str, command_id: uuid.UUID | None, *args: Any) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        call(conn, command, command_id, *args)
    return info.value


def counts(conn: psycopg.Connection) -> dict[str, int]:
    """Rows in every table and materialized view of our schemas (the outbox and
    cqrs.commands included)."""
    tables = [r[0] for r in conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname IN ('cqrs', 'shop', 'shop_read', 'shop_proj') AND c.relkind IN ('r', 'p', 'm')"
        " ORDER BY 1").fetchall()]
    assert set(ALL_TABLES) <= set(tables)
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


def state(conn: psycopg.Connection) -> dict[str, list[str]]:
    """Every row of the write model, the outbox and the command log, as sorted JSON text."""
    return {
        t: [row[0] for row in conn.execute(f"SELECT to_jsonb(x)::text FROM {t} x ORDER BY 1").fetchall()]
        for t in ALL_TABLES
    }


def row(conn: psycopg.Connection, query: str, *params: Any) -> dict[str, Any]:
    rows = conn.cursor(row_factory=dict_row).execute(query, params).fetchall()
    assert len(rows) == 1, rows
    return rows[0]


def customer(conn: psycopg.Connection, customer_id: uuid.UUID) -> dict[str, Any]:
    return row(conn, "SELECT * FROM shop.customers WHERE id = %s", customer_id)


def product(conn: psycopg.Connection, sku: str) -> dict[str, Any]:
    return row(conn, "SELECT * FROM shop.products WHERE sku = %s", sku)


def order(conn: psycopg.Connection, order_id: uuid.UUID) -> dict[str, Any]:
    return row(conn, "SELECT * FROM shop.orders WHERE id = %s", order_id)


def order_lines(conn: psycopg.Connection, order_id: uuid.UUID) -> list[tuple[int, uuid.UUID, int, int]]:
    return conn.execute(
        "SELECT line_no, product_id, quantity, unit_price_cents FROM shop.order_lines"
        " WHERE order_id = %s ORDER BY line_no",
        (order_id,),
    ).fetchall()


def events(conn: psycopg.Connection, receipt: Receipt) -> list[Event]:
    """The events of one command, in position order; checks they all belong to its
    transaction (tx_id = token) and carry its command_id."""
    rows = conn.execute(
        "SELECT position, tx_id::text::bigint, event_type, aggregate_type, aggregate_id, aggregate_version,"
        "       payload, metadata, occurred_at"
        "  FROM cqrs.outbox WHERE metadata->>'command_id' = %s ORDER BY position",
        (str(receipt.command_id),),
    ).fetchall()
    evs = [Event(*r) for r in rows]
    assert evs, f"no events for command {receipt.command_id}"
    assert {e.tx_id for e in evs} == {receipt.token}
    by_token = conn.execute(
        "SELECT count(*) FROM cqrs.outbox WHERE tx_id = %s::text::xid8", (str(receipt.token),)
    ).fetchone()[0]
    assert by_token == len(evs), "events of the command's transaction without its command_id"
    return evs


def expect_event(
    e: Event,
    event_type: str,
    aggregate_type: str,
    aggregate_id: uuid.UUID,
    aggregate_version: int,
    /,
    **payload: Any,
) -> None:
    """Checks an event's header, and the payload fields given (the row as JSON, less the
    columns the header carries: the aggregate's id and version)."""
    assert (e.event_type, e.aggregate_type, e.aggregate_id, e.aggregate_version) == (
        event_type,
        aggregate_type,
        aggregate_id,
        aggregate_version,
    )
    carried = {"order_id"} if event_type.startswith("order_line.") else {"id", "version"}
    assert not carried & set(e.payload), e.payload
    assert set(e.metadata) == {"command_id"}, e.metadata
    for key, value in payload.items():
        assert e.payload.get(key) == value, (key, e.payload)


def fresh(conn: psycopg.Connection) -> tuple[uuid.UUID, str, str]:
    """A customer and two products (stock 10 each) that no other test touches."""
    tag = uuid.uuid4().hex[:8]
    customer_id = run(conn, "register_customer", f"c-{tag}@example.com", f"C {tag}").aggregate_id
    run(conn, "add_product", f"A-{tag}", "A", 100, 10)
    run(conn, "add_product", f"B-{tag}", "B", 200, 10)
    return customer_id, f"A-{tag}", f"B-{tag}"


def placed_order(conn: psycopg.Connection) -> uuid.UUID:
    customer_id, a, b = fresh(conn)
    return run(conn, "place_order", customer_id, [line(a, 1), line(b, 2)]).aggregate_id


@pytest.fixture
def conn(db: Database) -> Iterator[psycopg.Connection]:
    with db.connect() as c:
        yield c


# --------------------------------------------------------------------------- effects


def test_register_customer(conn: psycopg.Connection) -> None:
    r = run(conn, "register_customer", "  Alice.Smith@Example.COM ", " Alice ")
    assert r.version == 1
    c = customer(conn, r.aggregate_id)
    assert (c["email"], c["name"], c["version"]) == ("alice.smith@example.com", "Alice", 1)

    (e,) = events(conn, r)
    expect_event(e, "customer.created", "customer", r.aggregate_id, 1,
                 email="alice.smith@example.com", name="Alice")
    assert e.metadata["command_id"] == str(r.command_id)

    # name of exactly 200 characters is allowed
    long_name = "n" * 200
    r2 = run(conn, "register_customer", "bob@example.org", long_name)
    assert customer(conn, r2.aggregate_id)["name"] == long_name
    assert r2.aggregate_id != r.aggregate_id
    assert r2.token != r.token


def test_email_uniqueness_is_case_insensitive_beyond_ascii(scratch_conn: psycopg.Connection) -> None:
    conn = scratch_conn
    domain = f"{uuid.uuid4().hex[:8]}.example.com"
    first = run(conn, "register_customer", f"Jörg@{domain}", "Jörg")
    assert customer(conn, first.aggregate_id)["email"] == f"jörg@{domain}"
    before = state(conn)
    exc = fails(conn, "register_customer", uuid.uuid4(), f"JÖRG@{domain.upper()}", "Other")
    assert exc.sqlstate == "CQ003"
    assert state(conn) == before


def test_token_is_the_transaction_xid(scratch_conn: psycopg.Connection) -> None:
    conn = scratch_conn
    with conn.transaction():
        r = run(conn, "register_customer", f"xid-{uuid.uuid4().hex[:8]}@example.com", "Xid")
        xid = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
    assert r.token == xid
    (e,) = events(conn, r)
    assert e.tx_id == xid


def test_rename_customer(conn: psycopg.Connection) -> None:
    reg = run(conn, "register_customer", "carol@example.com", "Carol")
    r = run(conn, "rename_customer", reg.aggregate_id, "  Caroline ", None)
    assert (r.aggregate_id, r.version) == (reg.aggregate_id, 2)
    c = customer(conn, reg.aggregate_id)
    assert (c["name"], c["email"], c["version"]) == ("Caroline", "carol@example.com", 2)
    (e,) = events(conn, r)
    expect_event(e, "customer.updated", "customer", reg.aggregate_id, 2, name="Caroline")

    # the right expected_version succeeds
    r3 = run(conn, "rename_customer", reg.aggregate_id, "Caro", 2)
    assert r3.version == 3
    assert customer(conn, reg.aggregate_id)["version"] == 3
    (e3,) = events(conn, r3)
    expect_event(e3, "customer.updated", "customer", reg.aggregate_id, 3, name="Caro")

    # expected_version may be left out (DEFAULT NULL)
    r4 = Receipt(*conn.execute(
        "SELECT * FROM shop.rename_customer(%s, %s, %s)", (uuid.uuid4(), reg.aggregate_id, "C")
    ).fetchone())
    assert r4.version == 4


def test_add_product(conn: psycopg.Connection) -> None:
    r = run(conn, "add_product", " SKU-1 ", " Widget ", 1999, 7)
    assert r.version == 1
    p = product(conn, "SKU-1")
    assert p["id"] == r.aggregate_id
    assert (p["name"], p["price_cents"], p["stock"], p["version"]) == ("Widget", 1999, 7, 1)
    (e,) = events(conn, r)
    expect_event(e, "product.created", "product", r.aggregate_id, 1,
                 sku="SKU-1", name="Widget", price_cents=1999, stock=7)

    free = run(conn, "add_product", "FREE", "Free sample", 0, 0)
    assert (product(conn, "FREE")["price_cents"], product(conn, "FREE")["stock"]) == (0, 0)
    assert free.version == 1


def test_restock(conn: psycopg.Connection) -> None:
    add = run(conn, "add_product", "SKU-R", "Bolt", 5, 3)
    r = run(conn, "restock", "SKU-R", 10)
    assert (r.aggregate_id, r.version) == (add.aggregate_id, 2)
    p = product(conn, "SKU-R")
    assert (p["stock"], p["version"], p["price_cents"]) == (13, 2, 5)
    (e,) = events(conn, r)
    expect_event(e, "product.updated", "product", add.aggregate_id, 2, stock=13)

    r2 = run(conn, "restock", "SKU-R", 1)
    assert r2.version == 3
    assert product(conn, "SKU-R")["stock"] == 14


def test_change_price(conn: psycopg.Connection) -> None:
    add = run(conn, "add_product", "SKU-P", "Nut", 100, 4)
    r = run(conn, "change_price", "SKU-P", 0)
    assert (r.aggregate_id, r.version) == (add.aggregate_id, 2)
    p = product(conn, "SKU-P")
    assert (p["price_cents"], p["stock"], p["version"]) == (0, 4, 2)
    (e,) = events(conn, r)
    expect_event(e, "product.updated", "product", add.aggregate_id, 2, price_cents=0)


def _shop(conn: psycopg.Connection) -> tuple[uuid.UUID, Receipt, Receipt]:
    cust = run(conn, "register_customer", "dave@example.com", "Dave")
    a = run(conn, "add_product", "SKU-A", "Apple", 120, 10)
    b = run(conn, "add_product", "SKU-B", "Banana", 35, 5)
    return cust.aggregate_id, a, b


def test_place_order(conn: psycopg.Connection) -> None:
    customer_id, a, b = _shop(conn)
    r = run(conn, "place_order", customer_id, [line("SKU-B", 2), line("SKU-A", 3)])
    assert r.version == 1
    o = order(conn, r.aggregate_id)
    assert (o["customer_id"], o["status"], o["version"]) == (customer_id, "placed", 1)
    assert order_lines(conn, r.aggregate_id) == [(1, b.aggregate_id, 2, 35), (2, a.aggregate_id, 3, 120)]
    pa, pb = product(conn, "SKU-A"), product(conn, "SKU-B")
    assert (pa["stock"], pa["version"]) == (7, 2)
    assert (pb["stock"], pb["version"]) == (3, 2)

    evs = events(conn, r)
    by_type: dict[str, list[Event]] = {}
    for e in evs:
        by_type.setdefault(e.event_type, []).append(e)
    assert sorted((t, len(v)) for t, v in by_type.items()) == [
        ("order.created", 1), ("order_line.created", 2), ("product.updated", 2)]
    (oc,) = by_type["order.created"]
    expect_event(oc, "order.created", "order", r.aggregate_id, 1,
                 customer_id=str(customer_id), status="placed")
    for e, (line_no, pid, qty, price) in zip(
        sorted(by_type["order_line.created"], key=lambda e: e.payload["line_no"]),
        order_lines(conn, r.aggregate_id),
        strict=True,
    ):
        expect_event(e, "order_line.created", "order", r.aggregate_id, 1,
                     line_no=line_no, product_id=str(pid), quantity=qty, unit_price_cents=price)
    products = {e.aggregate_id: e for e in by_type["product.updated"]}
    expect_event(products[a.aggregate_id], "product.updated", "product", a.aggregate_id, 2, stock=7)
    expect_event(products[b.aggregate_id], "product.updated", "product", b.aggregate_id, 2, stock=3)

    # the unit price is captured at order time
    run(conn, "change_price", "SKU-A", 999)
    assert order_lines(conn, r.aggregate_id)[1][3] == 120
    r2 = run(conn, "place_order", customer_id, [line("SKU-A", 7)])
    assert order_lines(conn, r2.aggregate_id) == [(1, a.aggregate_id, 7, 999)]
    pa = product(conn, "SKU-A")
    assert (pa["stock"], pa["version"]) == (0, 4)  # all stock may be taken


def test_place_order_with_100_lines(scratch_conn: psycopg.Connection) -> None:
    conn = scratch_conn
    customer_id, _, _ = fresh(conn)
    tag = uuid.uuid4().hex[:8]
    conn.execute(
        "SELECT shop.add_product(gen_random_uuid(), %s || i, 'Item ' || i, i, 1)"
        "  FROM generate_series(1, 100) i",
        (f"L-{tag}-",),
    )
    r = run(conn, "place_order", customer_id, [line(f"L-{tag}-{i}", 1) for i in range(1, 101)])
    assert len(order_lines(conn, r.aggregate_id)) == 100
    evs = events(conn, r)
    assert sum(e.event_type == "order_line.created" for e in evs) == 100
    assert sum(e.event_type == "product.updated" for e in evs) == 100


def test_cancel_order_gives_stock_back(conn: psycopg.Connection) -> None:
    customer_id, a, b = _shop(conn)
    placed = run(conn, "place_order", customer_id, [line("SKU-A", 4), line("SKU-B", 5)])
    r = run(conn, "cancel_order", placed.aggregate_id, None)
    assert (r.aggregate_id, r.version) == (placed.aggregate_id, 2)
    o = order(conn, placed.aggregate_id)
    assert (o["status"], o["version"]) == ("cancelled", 2)
    assert o["updated_at"] >= o["placed_at"]
    pa, pb = product(conn, "SKU-A"), product(conn, "SKU-B")
    assert (pa["stock"], pa["version"]) == (10, 3)
    assert (pb["stock"], pb["version"]) == (5, 3)
    assert len(order_lines(conn, placed.aggregate_id)) == 2  # lines stay

    evs = events(conn, r)
    assert sorted(e.event_type for e in evs) == ["order.updated", "product.updated", "product.updated"]
    for e in evs:
        if e.event_type == "order.updated":
            expect_event(e, "order.updated", "order", placed.aggregate_id, 2, status="cancelled")
        else:
            stock = {a.aggregate_id: 10, b.aggregate_id: 5}[e.aggregate_id]
            expect_event(e, "product.updated", "product", e.aggregate_id, 3, stock=stock)


def test_ship_order_keeps_stock_taken(conn: psycopg.Connection) -> None:
    customer_id, _a, _b = _shop(conn)
    placed = run(conn, "place_order", customer_id, [line("SKU-A", 4)])
    before_b = product(conn, "SKU-B")
    r = run(conn, "ship_order", placed.aggregate_id, 1)  # the right expected_version
    assert (r.aggregate_id, r.version) == (placed.aggregate_id, 2)
    o = order(conn, placed.aggregate_id)
    assert (o["status"], o["version"]) == ("shipped", 2)
    pa = product(conn, "SKU-A")
    assert (pa["stock"], pa["version"]) == (6, 2)
    assert product(conn, "SKU-B") == before_b
    (e,) = events(conn, r)
    expect_event(e, "order.updated", "order", placed.aggregate_id, 2, status="shipped")


def test_cancel_order_right_expected_version(scratch_conn: psycopg.Connection) -> None:
    conn = scratch_conn
    order_id = placed_order(conn)
    r = run(conn, "cancel_order", order_id, 1)
    assert (r.aggregate_id, r.version) == (order_id, 2)
    assert order(conn, order_id)["status"] == "cancelled"


# --------------------------------------------------------------------------- errors


@dataclass
class World:
    """What every error case starts from."""

    customer_id: uuid.UUID
    customer_cmd: uuid.UUID
    placed: uuid.UUID
    placed_cmd: uuid.UUID
    shipped: uuid.UUID
    cancelled: uuid.UUID


def make_world(conn: psycopg.Connection) -> World:
    cust = run(conn, "register_customer", "Taken@Example.com", "Erin")
    run(conn, "add_product", "SKU-A", "Apple", 100, 5)
    run(conn, "add_product", "SKU-B", "Banana", 250, 2)
    placed = run(conn, "place_order", cust.aggregate_id, [line("SKU-A", 1)])
    shipped = run(conn, "place_order", cust.aggregate_id, [line("SKU-B", 1)])
    run(conn, "ship_order", shipped.aggregate_id, None)
    cancelled = run(conn, "place_order", cust.aggregate_id, [line("SKU-A", 1)])
    run(conn, "cancel_order", cancelled.aggregate_id, None)
    run(conn, "add_product", "SKU-BIG", "Priceless", 2**62, 10)
    # SKU-A: stock 4, SKU-B: stock 1
    return World(cust.aggregate_id, cust.command_id, placed.aggregate_id, placed.command_id,
                 shipped.aggregate_id, cancelled.aggregate_id)


@dataclass(frozen=True)
class Bad:
    """A call that must fail: command, command_id (None: a fresh one), arguments, and the
    strings its message must contain."""

    command: str
    args: tuple[Any, ...]
    needles: tuple[str, ...]
    command_id: uuid.UUID | None = None
    null_command_id: bool = False


def case(sqlstate: str, label: str, build: Callable[[World], Bad], marks: Any = ()) -> Any:
    return pytest.param(sqlstate, build, id=f"{sqlstate}-{label}", marks=marks)


NAME_201 = "Z" * 201
INJECTION = "x'); DROP TABLE shop.products; --"
LINES_101 = [line(f"S{i}", 1) for i in range(101)]

# Valid arguments of each command (after command_id) in the World, with the names of the
# arguments that must not be NULL: a NULL in each of them is a case of its own.
VALID: dict[str, tuple[Callable[[World], tuple[Any, ...]], tuple[str | None, ...]]] = {
    "register_customer": (lambda w: ("new@example.com", "New"), ("email", "name")),
    "rename_customer": (lambda w: (w.customer_id, "New", None), ("customer_id", "name", None)),
    "add_product": (lambda w: ("SKU-N", "New", 1, 1), ("sku", "name", "price_cents", "initial_stock")),
    "restock": (lambda w: ("SKU-A", 1), ("sku", "quantity")),
    "change_price": (lambda w: ("SKU-A", 1), ("sku", "price_cents")),
    "place_order": (lambda w: (w.customer_id, [line("SKU-A", 1)]), ("customer_id", "lines")),
    "cancel_order": (lambda w: (w.placed, None), ("order_id", None)),
    "ship_order": (lambda w: (w.placed, None), ("order_id", None)),
}


def with_null(args: tuple[Any, ...], position: int) -> tuple[Any, ...]:
    return (*args[:position], None, *args[position + 1:])


NULL_CASES = [
    *[case("CQ001", f"{cmd}-null-command_id",
           lambda w, cmd=cmd, valid=valid: Bad(cmd, valid(w), ("command_id", "null"), null_command_id=True))
      for cmd, (valid, _) in VALID.items()],
    *[case("CQ001", f"{cmd}-null-{name}",
           lambda w, cmd=cmd, valid=valid, i=i, name=name: Bad(cmd, with_null(valid(w), i), (name, "null")))
      for cmd, (valid, names) in VALID.items() for i, name in enumerate(names) if name],
]

ERROR_CASES = [
    *NULL_CASES,
    case("CQ001", "register-blank-name",
        lambda w: Bad("register_customer", ("n@example.com", "   "), ("name", "'   '"))),
    case("CQ001", "register-whitespace-name",
        lambda w: Bad("register_customer", ("n@example.com", " \t\n "), ("name",))),
    case("CQ001", "add_product-whitespace-sku",
        lambda w: Bad("add_product", ("\t", "N", 1, 1), ("sku",))),
    case("CQ001", "register-name-201",
        lambda w: Bad("register_customer", ("n@example.com", NAME_201), ("name", "201", NAME_201[:40]))),
    case("CQ001", "register-invalid-email",
        lambda w: Bad("register_customer", ("not-an-email", "N"), ("not-an-email",))),
    case("CQ001", "register-email-no-tld",
        lambda w: Bad("register_customer", ("someone@localhost", "N"), ("someone@localhost",))),
    case("CQ001", "register-blank-email", lambda w: Bad("register_customer", ("   ", "N"), ("email",))),
    case("CQ001", "rename-blank-name", lambda w: Bad("rename_customer", (w.customer_id, "", None), ("name", "''"))),
    case("CQ001", "rename-name-201",
        lambda w: Bad("rename_customer", (w.customer_id, NAME_201, None), ("201", NAME_201[:40]))),
    case("CQ001", "add_product-blank-sku", lambda w: Bad("add_product", ("  ", "N", 1, 1), ("sku", "'  '"))),
    case("CQ001", "add_product-blank-name", lambda w: Bad("add_product", ("SKU-N", "", 1, 1), ("name", "''"))),
    case("CQ001", "add_product-negative-price",
        lambda w: Bad("add_product", ("SKU-N", "N", -1, 1), ("price_cents", "-1"))),
    case("CQ001", "add_product-negative-stock",
        lambda w: Bad("add_product", ("SKU-N", "N", 1, -3), ("initial_stock", "-3"))),
    case("CQ001", "restock-zero", lambda w: Bad("restock", ("SKU-A", 0), ("quantity", "0"))),
    case("CQ001", "restock-negative", lambda w: Bad("restock", ("SKU-A", -5), ("quantity", "-5"))),
    case("CQ001", "change_price-negative", lambda w: Bad("change_price", ("SKU-A", -7), ("price_cents", "-7"))),
    case("CQ001", "place_order-lines-object",
        lambda w: Bad("place_order", (w.customer_id, line("SKU-A", 1)), ("object", "SKU-A"))),
    case("CQ001", "place_order-lines-empty", lambda w: Bad("place_order", (w.customer_id, []), ("lines", "0"))),
    case("CQ001", "place_order-lines-101", lambda w: Bad("place_order", (w.customer_id, LINES_101), ("101",))),
    case("CQ001", "place_order-line-not-object",
        lambda w: Bad("place_order", (w.customer_id, ["SKU-A"]), ("lines[1]", "SKU-A"))),
    case("CQ001", "place_order-duplicate-sku",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 1), line("SKU-B", 1), line("SKU-A", 2)]), ("lines[3]", "SKU-A"))),
    case("CQ001", "place_order-missing-sku",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 1), {"quantity": 1}]), ("lines[2].sku",))),
    case("CQ001", "place_order-blank-sku",
        lambda w: Bad("place_order", (w.customer_id, [line(" ", 1)]), ("lines[1].sku",))),
    case("CQ001", "place_order-quantity-0",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 0)]), ("lines[1].quantity", "0"))),
    case("CQ001", "place_order-quantity-negative",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", -2)]), ("lines[1].quantity", "-2"))),
    case("CQ001", "place_order-quantity-fraction",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 1.5)]), ("lines[1].quantity", "1.5"))),
    case("CQ001", "place_order-quantity-string",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", "2")]), ("lines[1].quantity", '"2"'))),
    case("CQ001", "place_order-quantity-missing",
        lambda w: Bad("place_order", (w.customer_id, [{"sku": "SKU-A"}]), ("lines[1].quantity",))),
    case("CQ001", "place_order-quantity-too-big",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 2147483648)]), ("2147483648",))),
    # over-long strings
    case("CQ001", "register-email-321",
        lambda w: Bad("register_customer", ("e" * 309 + "@example.com", "N"), ("email", "321", "e" * 40))),
    case("CQ001", "add_product-sku-101",
        lambda w: Bad("add_product", ("S" * 101, "N", 1, 1), ("sku", "101", "S" * 40))),
    case("CQ001", "add_product-name-201",
        lambda w: Bad("add_product", ("SKU-N", NAME_201, 1, 1), ("name", "201", NAME_201[:40]))),
    case("CQ001", "restock-sku-101", lambda w: Bad("restock", ("S" * 101, 1), ("sku", "101"))),
    case("CQ001", "change_price-sku-101", lambda w: Bad("change_price", ("S" * 101, 1), ("sku", "101"))),
    case("CQ001", "place_order-sku-101",
        lambda w: Bad("place_order", (w.customer_id, [line("S" * 101, 1)]), ("lines[1].sku", "101"))),
    # blanks that [[:space:]] misses under some locales, and control characters
    case("CQ001", "register-no-break-space-name",
        lambda w: Bad("register_customer", ("n@example.com", "\u00a0\u00a0"), ("name", "blank"))),
    case("CQ001", "add_product-ideographic-space-sku",
        lambda w: Bad("add_product", ("\u3000\u200b\ufeff", "N", 1, 1), ("sku", "blank"))),
    case("CQ001", "rename-control-character",
        lambda w: Bad("rename_customer", (w.customer_id, "Bob\nDROP", None), ("name", "U+000A", "position 4"))),
    case("CQ001", "add_product-escape-sequence",
        lambda w: Bad("add_product", ("SKU-N", "\x1b[31mRed", 1, 1), ("name", "U+001B", "position 1"))),
    # numbers out of range
    case("CQ001", "rename-expected-version-0",
        lambda w: Bad("rename_customer", (w.customer_id, "N", 0), ("expected_version", "0"))),
    case("CQ001", "cancel-expected-version-negative",
        lambda w: Bad("cancel_order", (w.placed, -1), ("expected_version", "-1"))),
    case("CQ001", "ship-expected-version-min-int",
        lambda w: Bad("ship_order", (w.placed, -2147483648), ("expected_version", "-2147483648"))),
    case("CQ001", "add_product-min-bigint-price",
        lambda w: Bad("add_product", ("SKU-N", "N", -9223372036854775808, 1), ("price_cents", "-9223372036854775808"))),
    case("CQ001", "restock-min-int",
        lambda w: Bad("restock", ("SKU-A", -2147483648), ("quantity", "-2147483648"))),
    # malformed lines
    case("CQ001", "place_order-lines-string",
        lambda w: Bad("place_order", (w.customer_id, Jsonb("SKU-A")), ("lines", "string", "SKU-A"))),
    case("CQ001", "place_order-lines-number",
        lambda w: Bad("place_order", (w.customer_id, Jsonb(3)), ("lines", "number", "3"))),
    case("CQ001", "place_order-lines-json-null",
        lambda w: Bad("place_order", (w.customer_id, Jsonb(None)), ("lines", "null"))),
    case("CQ001", "place_order-line-null",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 1), None]), ("lines[2]", "null"))),
    case("CQ001", "place_order-sku-number",
        lambda w: Bad("place_order", (w.customer_id, [line(42, 1)]), ("lines[1].sku", "42"))),
    case("CQ001", "place_order-quantity-bool",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", True)]), ("lines[1].quantity", "true"))),
    case("CQ001", "place_order-quantity-json-null",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", None)]), ("lines[1].quantity", "null"))),
    case("CQ001", "place_order-quantity-1e20",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 1e20)]), ("lines[1].quantity", "100000000000000000000"))),
    case("CQ001", "place_order-unknown-key",
        lambda w: Bad("place_order", (w.customer_id, [{"sku": "SKU-A", "quantity": 1, "unit_price_cents": 0}]),
                      ("lines[1]", "unit_price_cents"))),
    case("CQ001", "place_order-misspelt-key",
        lambda w: Bad("place_order", (w.customer_id, [{"sku": "SKU-A", "qty": 1}]), ("lines[1].quantity",))),
    # CQ002 — unknown references
    case("CQ002", "rename-unknown-customer", lambda w: Bad("rename_customer", (UNKNOWN, "N", None), (str(UNKNOWN),))),
    case("CQ002", "place_order-unknown-customer",
        lambda w: Bad("place_order", (UNKNOWN, [line("SKU-A", 1)]), (str(UNKNOWN),))),
    case("CQ002", "restock-unknown-sku", lambda w: Bad("restock", ("NOPE-1", 1), ("NOPE-1",))),
    case("CQ002", "change_price-unknown-sku", lambda w: Bad("change_price", ("NOPE-2", 1), ("NOPE-2",))),
    case("CQ002", "place_order-unknown-sku",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 1), line("NOPE-3", 1)]), ("NOPE-3",))),
    case("CQ002", "cancel-unknown-order", lambda w: Bad("cancel_order", (UNKNOWN, None), (str(UNKNOWN),))),
    case("CQ002", "restock-injection-sku", lambda w: Bad("restock", (INJECTION, 1), (INJECTION.replace("'", "''"),))),
    case("CQ002", "place_order-injection-sku",
        lambda w: Bad("place_order", (w.customer_id, [line(INJECTION, 1)]), (INJECTION.replace("'", "''"),))),
    case("CQ002", "place_order-sku-case-differs",
        lambda w: Bad("place_order", (w.customer_id, [line("sku-a", 1)]), ("sku-a",))),
    case("CQ002", "ship-unknown-order", lambda w: Bad("ship_order", (UNKNOWN, None), (str(UNKNOWN),))),
    # CQ003 — business rules
    case("CQ003", "email-taken-other-case",
        lambda w: Bad("register_customer", ("tAKEN@example.COM", "Other"), ("taken@example.com",))),
    case("CQ003", "sku-taken", lambda w: Bad("add_product", ("SKU-B", "Other", 1, 1), ("SKU-B",))),
    case("CQ003", "not-enough-stock",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 4), line("SKU-B", 2)]), ("SKU-B",))),
    case("CQ003", "cancel-shipped", lambda w: Bad("cancel_order", (w.shipped, None), (str(w.shipped), "shipped"))),
    case("CQ003", "cancel-cancelled", lambda w: Bad("cancel_order", (w.cancelled, None), (str(w.cancelled),))),
    case("CQ003", "ship-cancelled", lambda w: Bad("ship_order", (w.cancelled, None), (str(w.cancelled), "cancelled"))),
    case("CQ003", "ship-shipped", lambda w: Bad("ship_order", (w.shipped, None), (str(w.shipped),))),
    case("CQ003", "restock-overflows-stock",
        lambda w: Bad("restock", ("SKU-A", 2147483647), ("SKU-A", "2147483647", "4 + 2147483647"))),
    case("CQ003", "order-total-overflows",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-BIG", 2)]), ("9223372036854775808",))),
    case("CQ003", "sku-taken-after-trim", lambda w: Bad("add_product", ("\u00a0SKU-A\t", "Other", 1, 1), ("SKU-A",))),
    # CQ004 — expected_version
    case("CQ004", "rename-wrong-version",
        lambda w: Bad("rename_customer", (w.customer_id, "N", 42), (str(w.customer_id), "42"))),
    case("CQ004", "cancel-wrong-version", lambda w: Bad("cancel_order", (w.placed, 42), (str(w.placed), "42"))),
    case("CQ004", "ship-wrong-version", lambda w: Bad("ship_order", (w.placed, 42), (str(w.placed), "42"))),
    # CQ005 — command_id reused
    case("CQ005", "same-command-other-args",
        lambda w: Bad("register_customer", ("other@example.com", "Erin"), (str(w.customer_cmd),), command_id=w.customer_cmd)),
    case("CQ005", "other-command",
        lambda w: Bad("add_product", ("SKU-X", "X", 1, 1), (str(w.customer_cmd),), command_id=w.customer_cmd)),
    case("CQ005", "place_order-other-lines",
        lambda w: Bad("place_order", (w.customer_id, [line("SKU-A", 2)]), (str(w.placed_cmd),), command_id=w.placed_cmd)),
    case("CQ005", "place_order-id-for-ship",
        lambda w: Bad("ship_order", (w.placed, None), (str(w.placed_cmd),), command_id=w.placed_cmd)),
]


class ModuleDatabase:
    """A database cloned from the session template, shared by several tests of this module
    (a fresh one per test costs ~0.6 s). With seed, it holds a World and must stay as
    seeded: a test that changes it anyway (a bug) gets it rebuilt for the next test."""

    def __init__(self, cluster: DevCluster, template: str, seed: bool) -> None:
        self.cluster = cluster
        self.template = template
        self.seed = seed
        self.name = ""
        self.dsn = ""
        self.world: World | None = None
        self.pristine: dict[str, list[str]] = {}

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(self.cluster.primary_dsn(), autocommit=True)

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)

    def create(self) -> None:
        self.name = f"t_cmd_{uuid.uuid4().hex[:12]}"
        with self._admin() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(self.name), sql.Identifier(self.template)))
        self.dsn = self.cluster.primary_dsn(self.name)
        if self.seed:
            with self.connect() as conn:
                self.world = make_world(conn)
                self.pristine = state(conn)

    def drop(self) -> None:
        with self._admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))


def module_database(cluster: DevCluster, template: str, seed: bool) -> Iterator[ModuleDatabase]:
    mdb = ModuleDatabase(cluster, template, seed)
    mdb.create()
    try:
        yield mdb
    finally:
        mdb.drop()


@pytest.fixture(scope="module")
def shared_world(cluster: DevCluster, template: str) -> Iterator[ModuleDatabase]:
    yield from module_database(cluster, template, seed=True)


@pytest.fixture(scope="module")
def scratch(cluster: DevCluster, template: str) -> Iterator[ModuleDatabase]:
    """A shared database that tests may change: they work on aggregates of their own."""
    yield from module_database(cluster, template, seed=False)


@pytest.fixture
def world_conn(shared_world: ModuleDatabase) -> Iterator[tuple[psycopg.Connection, World]]:
    assert shared_world.world is not None
    with shared_world.connect() as c:
        assert state(c) == shared_world.pristine
        yield c, shared_world.world
        dirty = state(c) != shared_world.pristine
    if dirty:
        shared_world.drop()
        shared_world.create()


@pytest.fixture
def scratch_conn(scratch: ModuleDatabase) -> Iterator[psycopg.Connection]:
    with scratch.connect() as c:
        yield c


@pytest.mark.parametrize(("sqlstate", "build"), ERROR_CASES)
def test_documented_error(
    world_conn: tuple[psycopg.Connection, World], sqlstate: str, build: Callable[[World], Bad]
) -> None:
    conn, world = world_conn
    bad = build(world)
    command_id = None if bad.null_command_id else (bad.command_id or uuid.uuid4())
    before_counts, before = counts(conn), state(conn)

    exc = fails(conn, bad.command, command_id, *bad.args)

    assert exc.sqlstate == sqlstate, f"{exc.sqlstate}: {exc}"
    message = exc.diag.message_primary or ""
    for needle in bad.needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert counts(conn) == before_counts
    assert state(conn) == before


def test_error_matrix_covers_every_command_and_code() -> None:
    """At least 40 bad calls, every command among them, every documented SQLSTATE."""
    assert len(ERROR_CASES) >= 40
    assert {p.values[0] for p in ERROR_CASES} == {"CQ001", "CQ002", "CQ003", "CQ004", "CQ005"}
    world = World(*(uuid.uuid4() for _ in range(6)))
    assert {p.values[1](world).command for p in ERROR_CASES} == set(SIGNATURES)


def test_padding_around_a_valid_value_is_bounded_as_given(scratch_conn: psycopg.Connection) -> None:
    """Bounds apply to an argument as given, spaces around it included, so no command
    stores more than its documented bound in any table (receipts keep arguments as given):
    each padded value is refused with CQ001 and leaves nothing behind; at the bound, padded
    or not, it is accepted."""
    conn = scratch_conn
    customer_id, sku, _ = fresh(conn)
    pad = " " * 5000
    before_counts, before = counts(conn), state(conn)
    for command, args in [
        ("register_customer", (f"p-{uuid.uuid4().hex[:6]}@example.com", f"{pad}Padded{pad}")),
        ("register_customer", (f"{pad}p-{uuid.uuid4().hex[:6]}@example.com", "Padded")),
        ("rename_customer", (customer_id, f"Padded{pad}", None)),
        ("add_product", (f"{pad}P-{uuid.uuid4().hex[:6]}", "P", 1, 1)),
        ("add_product", (f"P-{uuid.uuid4().hex[:6]}", f"P{pad}", 1, 1)),
        ("restock", (f"{sku}{pad}", 1)),
        ("change_price", (f"{pad}{sku}", 1)),
        ("place_order", (customer_id, [{"sku": f"{sku}{pad}", "quantity": 1}])),
        # a whole number, written with 5,000 zeros after its point (jsonb keeps them)
        ("place_order", (customer_id, Jsonb(None, dumps=lambda _: f'[{{"sku": "{sku}", "quantity": 1.{"0" * 5000}}}]'))),
    ]:
        exc = fails(conn, command, uuid.uuid4(), *args)
        assert exc.sqlstate == "CQ001", (command, exc)
        assert "characters" in str(exc) or "whole number" in str(exc), (command, exc)
        assert counts(conn) == before_counts and state(conn) == before, command
    at_bound = run(conn, "register_customer", f"p-{uuid.uuid4().hex[:6]}@example.com", " " + "n" * 198 + " ")
    assert customer(conn, at_bound.aggregate_id)["name"] == "n" * 198
    padded = conn.execute("SELECT count(*) FROM cqrs.commands WHERE arguments::text LIKE '%' || repeat(' ', 1000) || '%'"
                          " OR arguments::text LIKE '%' || repeat('0', 1000) || '%'").fetchone()[0]
    assert padded == 0


def test_sql_lookalikes_are_stored_literally(scratch_conn: psycopg.Connection) -> None:
    """Valid strings that look like SQL, format() directives or dollar quotes are data:
    stored, returned and put in events exactly as sent."""
    conn = scratch_conn
    tag = uuid.uuid4().hex[:8]
    name = "Robert'); DROP TABLE shop.customers; --"
    email = f"o'reilly+{tag}@example.com"
    sku = f"'; DELETE FROM cqrs.outbox; -- {tag}"
    product_name = "%s %I %L $1 $$ \\x41 E'\\n' \"quoted\""
    new_name = "$$; SELECT pg_sleep(10); $$"
    before = counts(conn)

    reg = run(conn, "register_customer", email, name)
    add = run(conn, "add_product", sku, product_name, 1, 5)
    placed = run(conn, "place_order", reg.aggregate_id, [line(sku, 2)])
    run(conn, "rename_customer", reg.aggregate_id, new_name, None)

    c, p = customer(conn, reg.aggregate_id), product(conn, sku)
    assert (c["email"], c["name"]) == (email, new_name)
    assert (p["id"], p["name"], p["stock"]) == (add.aggregate_id, product_name, 3)
    assert order_lines(conn, placed.aggregate_id) == [(1, add.aggregate_id, 2, 1)]
    assert events(conn, reg)[0].payload["name"] == name
    assert events(conn, add)[0].payload["sku"] == sku
    after = counts(conn)
    assert after["shop.customers"] == before["shop.customers"] + 1
    assert after["shop.products"] == before["shop.products"] + 1
    assert after["cqrs.commands"] == before["cqrs.commands"] + 4
    assert after["cqrs.outbox"] > before["cqrs.outbox"]


def test_failed_command_id_is_not_used_up(scratch_conn: psycopg.Connection) -> None:
    """A failed command leaves no trace in cqrs.commands: its id can be used again."""
    conn = scratch_conn
    taken = customer(conn, fresh(conn)[0])["email"]
    command_id = uuid.uuid4()
    assert fails(conn, "register_customer", command_id, taken.upper(), "Eve").sqlstate == "CQ003"
    r = call(conn, "register_customer", command_id, f"eve-{uuid.uuid4().hex[:8]}@example.com", "Eve")
    assert (r.command_id, r.version, r.duplicate) == (command_id, 1, False)


# --------------------------------------------------------------------------- idempotency

def order_args(conn: psycopg.Connection) -> tuple[Any, ...]:
    customer_id, a, b = fresh(conn)
    return customer_id, [line(a, 2), line(b, 1)]


# Each: command, a setup that returns its arguments (after command_id).
IDEMPOTENT: list[tuple[str, Callable[[psycopg.Connection], tuple[Any, ...]]]] = [
    ("register_customer", lambda c: (f"Fresh-{uuid.uuid4().hex[:8]}@Example.com", "Fresh")),
    ("rename_customer", lambda c: (fresh(c)[0], "Renamed", 1)),
    ("add_product", lambda c: (f"N-{uuid.uuid4().hex[:8]}", "New", 10, 3)),
    ("restock", lambda c: (fresh(c)[1], 4)),
    ("change_price", lambda c: (fresh(c)[2], 55)),
    ("place_order", order_args),
    ("cancel_order", lambda c: (placed_order(c), None)),
    ("ship_order", lambda c: (placed_order(c), 1)),
]


@pytest.mark.parametrize(("command", "setup"), IDEMPOTENT, ids=[c for c, _ in IDEMPOTENT])
def test_retry_returns_first_receipt(
    scratch_conn: psycopg.Connection, command: str, setup: Callable[[psycopg.Connection], tuple[Any, ...]]
) -> None:
    conn = scratch_conn
    args = setup(conn)
    first = run(conn, command, *args)
    n_events = len(events(conn, first))
    after_first = state(conn)

    for _ in range(2):
        again = call(conn, command, first.command_id, *args)
        assert again == first._replace(duplicate=True)
        assert state(conn) == after_first
    assert len(events(conn, first)) == n_events


def test_retry_after_later_changes_still_returns_first_receipt(scratch_conn: psycopg.Connection) -> None:
    conn = scratch_conn
    reg = run(conn, "register_customer", f"frank-{uuid.uuid4().hex[:8]}@example.com", "Frank")
    ren = run(conn, "rename_customer", reg.aggregate_id, "Franky", 1)
    run(conn, "rename_customer", reg.aggregate_id, "Francis", 2)
    before = state(conn)
    email = customer(conn, reg.aggregate_id)["email"]
    assert call(conn, "register_customer", reg.command_id, email, "Frank") == reg._replace(duplicate=True)
    # expected_version 1 is stale now, but a retry is answered from the log, not re-run
    assert call(conn, "rename_customer", ren.command_id, reg.aggregate_id, "Franky", 1) == ren._replace(duplicate=True)
    assert state(conn) == before
    assert customer(conn, reg.aggregate_id)["name"] == "Francis"


# --------------------------------------------------------------------------- atomicity


def test_failing_command_in_explicit_transaction_leaves_nothing(conn: psycopg.Connection) -> None:
    world = make_world(conn)
    before = state(conn)
    with pytest.raises(psycopg.Error) as info:
        with conn.transaction():
            run(conn, "add_product", "SKU-T", "Tx", 1, 1)
            run(conn, "restock", "SKU-A", 3)
            call(conn, "place_order", uuid.uuid4(), world.customer_id, [line("SKU-A", 1), line("SKU-B", 99)])
    assert info.value.sqlstate == "CQ003"
    assert state(conn) == before

    # in a savepoint: the failed command leaves nothing, the rest of the transaction commits
    with conn.transaction():
        ok = run(conn, "restock", "SKU-A", 3)
        with pytest.raises(psycopg.Error):
            with conn.transaction():
                call(conn, "place_order", uuid.uuid4(), world.customer_id, [line("SKU-A", 7), line("SKU-B", 99)])
    after = state(conn)
    assert counts(conn)["shop.orders"] == len(before["shop.orders"])
    assert len(after["cqrs.outbox"]) == len(before["cqrs.outbox"]) + 1
    assert len(after["cqrs.commands"]) == len(before["cqrs.commands"]) + 1
    assert product(conn, "SKU-A")["stock"] == 4 + 3
    assert (ok.version, product(conn, "SKU-A")["version"]) == (5, 5)


def _reject_outbox(conn: psycopg.Connection, check: str) -> None:
    # The test connects as the postgres superuser, on this test's own database.
    conn.execute(f"ALTER TABLE cqrs.outbox ADD CONSTRAINT no_more CHECK ({check}) NOT VALID")


def test_outbox_failure_undoes_register_customer(conn: psycopg.Connection) -> None:
    run(conn, "register_customer", "first@example.com", "First")
    before = state(conn)
    _reject_outbox(conn, "false")
    command_id = uuid.uuid4()
    exc = fails(conn, "register_customer", command_id, "second@example.com", "Second")
    assert exc.sqlstate == "23514"  # check_violation, from the outbox insert
    assert state(conn) == before

    conn.execute("ALTER TABLE cqrs.outbox DROP CONSTRAINT no_more")
    r = call(conn, "register_customer", command_id, "second@example.com", "Second")
    assert r.duplicate is False  # the failed attempt left no command record either


def test_outbox_failure_late_in_place_order_undoes_earlier_writes(conn: psycopg.Connection) -> None:
    """The last of place_order's writes (its lines) cannot get their events: the stock it
    already took and the order row it already inserted must go too."""
    world = make_world(conn)
    before = state(conn)
    _reject_outbox(conn, "event_type <> 'order_line.created'")
    exc = fails(conn, "place_order", uuid.uuid4(), world.customer_id, [line("SKU-A", 2)])
    assert exc.sqlstate == "23514"
    assert state(conn) == before


def test_outbox_failure_undoes_cancel_order(conn: psycopg.Connection) -> None:
    world = make_world(conn)
    before = state(conn)
    _reject_outbox(conn, "event_type <> 'order.updated'")
    exc = fails(conn, "cancel_order", uuid.uuid4(), world.placed, None)
    assert exc.sqlstate == "23514"
    assert state(conn) == before


# --------------------------------------------------------------------------- outbox guard


def test_outbox_triggers_exist(scratch_conn: psycopg.Connection) -> None:
    rows = scratch_conn.execute(
        "SELECT c.oid::regclass::text, count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE NOT t.tgisinternal AND t.tgenabled <> 'D'"
        "   AND t.tgfoid = format('cqrs.%I()', '_capture_' || n.nspname || '_' || c.relname)::regprocedure"
        " GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert rows == [(t, 3) for t in sorted(WRITE_TABLES)]


def test_every_write_model_change_has_its_event(conn: psycopg.Connection) -> None:
    world = make_world(conn)
    extra = run(conn, "register_customer", "gina@example.com", "Gina")
    run(conn, "rename_customer", extra.aggregate_id, "Regina", None)
    run(conn, "rename_customer", world.customer_id, "Erin B", 1)
    run(conn, "restock", "SKU-B", 10)
    run(conn, "change_price", "SKU-A", 80)
    big = run(conn, "place_order", extra.aggregate_id, [line("SKU-A", 1), line("SKU-B", 3)])
    run(conn, "ship_order", big.aggregate_id, None)
    run(conn, "cancel_order", world.placed, None)
    fails(conn, "place_order", uuid.uuid4(), extra.aggregate_id, [line("SKU-B", 999)])

    # Each aggregate row's version equals the number of its events, which are exactly
    # versions 1..version.
    mismatches = conn.execute(
        """
        WITH aggregates(kind, id, version) AS (
            SELECT 'customer', id, version FROM shop.customers
            UNION ALL SELECT 'product', id, version FROM shop.products
            UNION ALL SELECT 'order', id, version FROM shop.orders)
        SELECT a.kind, a.id, a.version, array_agg(o.aggregate_version ORDER BY o.position)
          FROM aggregates a
          LEFT JOIN cqrs.outbox o
            ON o.aggregate_type = a.kind AND o.aggregate_id = a.id AND o.event_type LIKE a.kind || '.%'
         GROUP BY 1, 2, 3
        HAVING array_agg(o.aggregate_version ORDER BY o.position)
               IS DISTINCT FROM array(SELECT generate_series(1, a.version))
        """
    ).fetchall()
    assert mismatches == []

    line_mismatches = conn.execute(
        """
        SELECT o.id, (SELECT count(*) FROM shop.order_lines l WHERE l.order_id = o.id),
               (SELECT count(*) FROM cqrs.outbox e
                 WHERE e.event_type = 'order_line.created' AND e.aggregate_type = 'order'
                   AND e.aggregate_id = o.id)
          FROM shop.orders o
        """
    ).fetchall()
    assert len(line_mismatches) == 4
    assert all(lines == evs and lines > 0 for _, lines, evs in line_mismatches), line_mismatches

    # every event belongs to a committed command and carries its id
    orphans = conn.execute(
        "SELECT count(*) FROM cqrs.outbox o LEFT JOIN cqrs.commands c"
        "  ON c.command_id::text = o.metadata->>'command_id' AND c.token = o.tx_id::text::bigint"
        " WHERE c.command_id IS NULL"
    ).fetchone()[0]
    assert orphans == 0
    total = conn.execute("SELECT count(*) FROM cqrs.outbox").fetchone()[0]
    expected = sum(
        conn.execute(f"SELECT coalesce(sum({col}), 0) FROM {t}").fetchone()[0]
        for t, col in [("shop.customers", "version"), ("shop.products", "version"), ("shop.orders", "version")]
    ) + counts(conn)["shop.order_lines"]
    assert total == expected
