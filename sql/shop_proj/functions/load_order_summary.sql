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
