-- Applies one batch of events to shop_read.order_summary, set-based.
CREATE FUNCTION shop_proj.apply_order_summary(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM shop_proj._remember_customers('shop_proj.order_summary_customers',
                                          from_tx, from_position, to_tx, to_position);

    -- Orders: the latest state in the batch, applied only over an older version.
    INSERT INTO shop_read.order_summary AS s
           (order_id, customer_id, customer_name, customer_email, status, placed_at, updated_at, version)
    SELECT DISTINCT ON (e.aggregate_id)
           e.aggregate_id, (e.payload ->> 'customer_id')::uuid, c.name, c.email, e.payload ->> 'status',
           (e.payload ->> 'placed_at')::timestamptz, (e.payload ->> 'updated_at')::timestamptz,
           e.aggregate_version
      FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
      LEFT JOIN shop_proj.order_summary_customers c ON c.customer_id = (e.payload ->> 'customer_id')::uuid
     WHERE e.event_type IN ('order.created', 'order.updated')
     ORDER BY e.aggregate_id, e.aggregate_version DESC
    ON CONFLICT (order_id) DO UPDATE
       SET status = excluded.status, updated_at = excluded.updated_at, version = excluded.version
     WHERE s.version < excluded.version;

    -- Lines arrive once each, after their order's row (same transaction, later position).
    UPDATE shop_read.order_summary s
       SET line_count = s.line_count + l.line_count,
           item_count = s.item_count + l.item_count,
           total_cents = s.total_cents + l.total_cents
      FROM shop_proj._order_line_totals(from_tx, from_position, to_tx, to_position) l
     WHERE s.order_id = l.order_id;

    -- Customers renamed in the batch: their orders show the current name. Orders placed
    -- before their customer's event was applied get it here too.
    UPDATE shop_read.order_summary s
       SET customer_name = c.name, customer_email = c.email
      FROM shop_proj.order_summary_customers c
     WHERE s.customer_id = c.customer_id
       AND c.customer_id IN (SELECT e.aggregate_id
                               FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
                              WHERE e.aggregate_type = 'customer')
       AND (s.customer_name, s.customer_email) IS DISTINCT FROM (c.name, c.email);
END
$$;
