-- Applies one batch of events to shop_read.customer_stats: updates the private per-order
-- state, then recomputes the rows of the customers the batch touched.
CREATE FUNCTION shop_proj.apply_customer_stats(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM shop_proj._remember_customers('shop_proj.customer_stats_customers',
                                          from_tx, from_position, to_tx, to_position);

    INSERT INTO shop_proj.customer_stats_orders AS o (order_id, customer_id, status, version)
    SELECT DISTINCT ON (e.aggregate_id)
           e.aggregate_id, (e.payload ->> 'customer_id')::uuid, e.payload ->> 'status', e.aggregate_version
      FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
     WHERE e.event_type IN ('order.created', 'order.updated')
     ORDER BY e.aggregate_id, e.aggregate_version DESC
    ON CONFLICT (order_id) DO UPDATE
       SET status = excluded.status, version = excluded.version
     WHERE o.version < excluded.version;

    UPDATE shop_proj.customer_stats_orders o
       SET total_cents = o.total_cents + l.total_cents
      FROM shop_proj._order_line_totals(from_tx, from_position, to_tx, to_position) l
     WHERE o.order_id = l.order_id;

    INSERT INTO shop_read.customer_stats AS s
           (customer_id, name, email, orders_placed, orders_cancelled, orders_shipped, lifetime_value_cents)
    SELECT c.customer_id, c.name, c.email,
           count(o.order_id),
           count(o.order_id) FILTER (WHERE o.status = 'cancelled'),
           count(o.order_id) FILTER (WHERE o.status = 'shipped'),
           coalesce(sum(o.total_cents) FILTER (WHERE o.status <> 'cancelled'), 0)
      FROM shop_proj.customer_stats_customers c
      LEFT JOIN shop_proj.customer_stats_orders o ON o.customer_id = c.customer_id
     WHERE c.customer_id IN (
               SELECT e.aggregate_id
                 FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
                WHERE e.aggregate_type = 'customer'
               UNION
               SELECT so.customer_id
                 FROM shop_proj.customer_stats_orders so
                WHERE so.order_id IN (SELECT e.aggregate_id
                                        FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
                                       WHERE e.aggregate_type = 'order'))
     GROUP BY c.customer_id
    ON CONFLICT (customer_id) DO UPDATE
       SET name = excluded.name,
           email = excluded.email,
           orders_placed = excluded.orders_placed,
           orders_cancelled = excluded.orders_cancelled,
           orders_shipped = excluded.orders_shipped,
           lifetime_value_cents = excluded.lifetime_value_cents;
END
$$;
