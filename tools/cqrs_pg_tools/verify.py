"""The read models' definitions (SPEC), recomputed from the write model, for checking.

Each query computes what a shop_read relation must hold once the daemon has caught up;
mismatches() compares both ways, on whichever server the connection points at.
"""

from __future__ import annotations

import psycopg

EXPECTED = {
    "order_summary": """
        SELECT o.id AS order_id, o.customer_id, c.name AS customer_name, c.email AS customer_email,
               o.status, count(l.line_no)::integer AS line_count,
               coalesce(sum(l.quantity), 0)::bigint AS item_count,
               coalesce(sum(l.quantity * l.unit_price_cents), 0)::bigint AS total_cents,
               o.placed_at, o.updated_at, o.version
          FROM shop.orders o
          JOIN shop.customers c ON c.id = o.customer_id
          LEFT JOIN shop.order_lines l ON l.order_id = o.id
         GROUP BY o.id, c.id""",
    "customer_stats": """
        SELECT c.id AS customer_id, c.name, c.email,
               count(o.id)::bigint AS orders_placed,
               count(o.id) FILTER (WHERE o.status = 'cancelled')::bigint AS orders_cancelled,
               count(o.id) FILTER (WHERE o.status = 'shipped')::bigint AS orders_shipped,
               coalesce(sum(t.total) FILTER (WHERE o.status <> 'cancelled'), 0)::numeric AS lifetime_value_cents
          FROM shop.customers c
          LEFT JOIN shop.orders o ON o.customer_id = c.id
          LEFT JOIN (SELECT order_id, sum(quantity * unit_price_cents) AS total
                       FROM shop.order_lines GROUP BY order_id) t ON t.order_id = o.id
         GROUP BY c.id""",
    "product_sales": """
        SELECT p.id AS product_id, p.sku, p.name, p.price_cents, p.stock,
               coalesce(sum(s.quantity), 0)::bigint AS units_sold,
               coalesce(sum(s.quantity * s.unit_price_cents), 0)::numeric AS revenue_cents
          FROM shop.products p
          LEFT JOIN (SELECT l.product_id, l.quantity, l.unit_price_cents
                       FROM shop.order_lines l JOIN shop.orders o ON o.id = l.order_id
                      WHERE o.status <> 'cancelled') s ON s.product_id = p.id
         GROUP BY p.id""",
}

COLUMNS = {
    "order_summary": "order_id, customer_id, customer_name, customer_email, status, line_count, item_count,"
    " total_cents, placed_at, updated_at, version",
    "customer_stats": "customer_id, name, email, orders_placed, orders_cancelled, orders_shipped, lifetime_value_cents",
    "product_sales": "product_id, sku, name, price_cents, stock, units_sold, revenue_cents",
}


def mismatches(conn: psycopg.Connection, relation: str) -> int:
    """Rows in shop_read.<relation> or in its definition but not in both (0 when equal)."""
    cols = COLUMNS[relation]
    query = f"""
        WITH expected AS ({EXPECTED[relation]}),
             actual AS (SELECT {cols} FROM shop_read.{relation})
        SELECT (SELECT count(*) FROM (SELECT {cols} FROM expected EXCEPT ALL SELECT {cols} FROM actual) a)
             + (SELECT count(*) FROM (SELECT {cols} FROM actual EXCEPT ALL SELECT {cols} FROM expected) b)"""
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def all_mismatches(conn: psycopg.Connection) -> dict[str, int]:
    return {relation: mismatches(conn, relation) for relation in EXPECTED}
