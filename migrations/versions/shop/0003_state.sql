-- shop_0003: order_summary and customer_stats declare how their read models are computed
-- from the write model (cqrs_0003's state functions): cqrs-pg rebuild loads them from
-- it, cqrs-pg verify compares with it.

-- sql/shop_proj/functions/load_order_summary.sql
-- order_summary computed from the write model's current state: what its events add up to
-- (its state function: cqrs-pg rebuild loads the read model from it, cqrs-pg verify
-- compares with it). Tables are named without a schema, as in the apply function: the
-- engine resolves them to the tables being filled (plpgsql: resolved when it runs).
CREATE OR REPLACE FUNCTION shop_proj.load_order_summary()
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO order_summary_customers (customer_id, name, email, version)
    SELECT c.id, c.name, c.email, c.version FROM shop.customers c;
    INSERT INTO order_summary (order_id, customer_id, customer_name, customer_email, status, line_count, item_count,
                               total_cents, placed_at, updated_at, version)
    SELECT o.id, o.customer_id, c.name, c.email, o.status, count(l.line_no)::integer,
           coalesce(sum(l.quantity), 0), coalesce(sum(l.quantity * l.unit_price_cents), 0),
           o.placed_at, o.updated_at, o.version
      FROM shop.orders o
      JOIN shop.customers c ON c.id = o.customer_id
      LEFT JOIN shop.order_lines l ON l.order_id = o.id
     GROUP BY o.id, c.id;
END
$$;

-- sql/shop_proj/functions/load_customer_stats.sql
-- customer_stats computed from the write model's current state: what its events add up to
-- (its state function, as load_order_summary is order_summary's).
CREATE OR REPLACE FUNCTION shop_proj.load_customer_stats()
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO customer_stats_customers (customer_id, name, email, version)
    SELECT c.id, c.name, c.email, c.version FROM shop.customers c;
    INSERT INTO customer_stats_orders (order_id, customer_id, status, total_cents, version)
    SELECT o.id, o.customer_id, o.status, coalesce(sum(l.quantity * l.unit_price_cents), 0), o.version
      FROM shop.orders o
      LEFT JOIN shop.order_lines l ON l.order_id = o.id
     GROUP BY o.id;
    INSERT INTO customer_stats (customer_id, name, email, orders_placed, orders_cancelled, orders_shipped,
                                lifetime_value_cents)
    SELECT c.id, c.name, c.email, count(o.order_id),
           count(o.order_id) FILTER (WHERE o.status = 'cancelled'),
           count(o.order_id) FILTER (WHERE o.status = 'shipped'),
           coalesce(sum(o.total_cents) FILTER (WHERE o.status <> 'cancelled'), 0)
      FROM shop.customers c
      LEFT JOIN customer_stats_orders o ON o.customer_id = c.id
     GROUP BY c.id;
END
$$;

SELECT cqrs.set_state_function('order_summary', 'shop_proj.load_order_summary');
SELECT cqrs.set_state_function('customer_stats', 'shop_proj.load_customer_stats');
REVOKE EXECUTE ON FUNCTION shop_proj.load_order_summary(), shop_proj.load_customer_stats() FROM PUBLIC;
