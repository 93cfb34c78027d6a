"""Shop history, fast: set-based writes through the shop tables, so the real outbox
triggers capture them as the commands' own writes would be captured.

cqrs_bench.generate(first_chunk, chunks, per_chunk, ...) is installed in a bench database
only. Each chunk is one transaction of `per_chunk` orders, like that many place_order
commands committed together:
- per_chunk / 20 new customers (customer.created) and as many renames of seeded
  customers (customer.updated);
- per_chunk orders of seeded customers (order.created), two lines each on consecutive
  products at their seeded price (order_line.created);
- with take_stock, the stock those lines took (product.updated, one per product touched);
- 3 in 10 of the previous chunk's orders shipped or cancelled (order.updated).
Ids are md5-derived, so chunks can be generated in any number of calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import psycopg

GENERATOR_SQL = """
CREATE SCHEMA IF NOT EXISTS cqrs_bench;

CREATE OR REPLACE PROCEDURE cqrs_bench.generate(
    first_chunk integer, chunks integer, per_chunk integer,
    customers integer, products integer, take_stock boolean DEFAULT true)
LANGUAGE plpgsql
AS $$
DECLARE
    c integer;
    lo bigint;
    hi bigint;
    people integer := greatest(per_chunk / 20, 1);
BEGIN
    FOR c IN first_chunk .. first_chunk + chunks - 1 LOOP
        lo := c::bigint * per_chunk + 1;
        hi := lo + per_chunk - 1;

        INSERT INTO shop.customers (id, email, name)
        SELECT md5('bench-customer-' || n)::uuid, 'bench-' || n || '@bench.example', 'Bench customer ' || n
          FROM generate_series(c::bigint * people + 1, (c + 1)::bigint * people) n;

        UPDATE shop.customers cu
           SET name = 'Customer ' || t.i || ' (' || (cu.version + 1) || ')', version = cu.version + 1
          FROM (SELECT 1 + (c::bigint * people + j) % customers AS i FROM generate_series(0, people - 1) j) t
         WHERE cu.id = md5('c' || t.i)::uuid;

        INSERT INTO shop.orders (id, customer_id, status)
        SELECT md5('bench-order-' || n)::uuid, md5('c' || (1 + (n * 7919) % customers))::uuid, 'placed'
          FROM generate_series(lo, hi) n;

        INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents)
        SELECT md5('bench-order-' || n)::uuid, l, md5('p' || x.pi)::uuid, 1 + (n % 3)::integer, 100 + x.pi % 900
          FROM generate_series(lo, hi) n
         CROSS JOIN generate_series(1, 2) l
         CROSS JOIN LATERAL (SELECT 1 + ((n - 1) * 2 + l - 1) % products AS pi) x;

        IF take_stock THEN
            UPDATE shop.products p
               SET stock = p.stock - t.q, version = p.version + 1
              FROM (SELECT md5('p' || x.pi)::uuid AS id, sum(1 + n % 3) AS q
                      FROM generate_series(lo, hi) n
                     CROSS JOIN generate_series(1, 2) l
                     CROSS JOIN LATERAL (SELECT 1 + ((n - 1) * 2 + l - 1) % products AS pi) x
                     GROUP BY x.pi) t
             WHERE p.id = t.id;
        END IF;

        UPDATE shop.orders o
           SET status = CASE WHEN t.n % 10 = 0 THEN 'cancelled' ELSE 'shipped' END,
               version = o.version + 1, updated_at = now()
          FROM (SELECT md5('bench-order-' || n)::uuid AS id, n
                  FROM generate_series(greatest(lo - per_chunk, 1), lo - 1) n
                 WHERE n % 10 < 3) t
         WHERE o.id = t.id;
        COMMIT;
    END LOOP;
END
$$;
"""


def install(conn: psycopg.Connection) -> None:
    conn.execute(GENERATOR_SQL)


def events_per_chunk(per_chunk: int, products: int, take_stock: bool = True) -> int:
    """Outbox events one chunk (after the first) adds."""
    people = max(per_chunk // 20, 1)
    shipped = sum(1 for n in range(1, per_chunk + 1) if n % 10 < 3)
    return 2 * people + 3 * per_chunk + (min(2 * per_chunk, products) if take_stock else 0) + shipped


def generate(
    conn: psycopg.Connection, chunks: int, per_chunk: int, customers: int, products: int,
    *, first_chunk: int = 0, take_stock: bool = True, steps: int = 10,
    progress: Callable[[int, int, float], None] | None = None,
) -> float:
    """Generate chunks (one transaction each) in about `steps` calls; returns seconds taken.
    conn must be in autocommit mode (the procedure commits)."""
    started = time.monotonic()
    per_call = max(1, math.ceil(chunks / max(steps, 1)))
    done = 0
    while done < chunks:
        n = min(per_call, chunks - done)
        conn.execute(
            "CALL cqrs_bench.generate(%s, %s, %s, %s, %s, %s)",
            (first_chunk + done, n, per_chunk, customers, products, take_stock),
        )
        done += n
        if progress is not None:
            progress(done, chunks, time.monotonic() - started)
    return time.monotonic() - started
