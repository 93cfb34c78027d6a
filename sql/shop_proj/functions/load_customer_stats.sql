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
