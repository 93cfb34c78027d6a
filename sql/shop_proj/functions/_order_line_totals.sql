-- Per order in the batch: the lines added, their units and their value.
CREATE FUNCTION shop_proj._order_line_totals(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS TABLE (order_id uuid, line_count bigint, item_count bigint, total_cents bigint)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e.aggregate_id,
           count(*),
           sum((e.payload ->> 'quantity')::bigint),
           sum((e.payload ->> 'quantity')::bigint * (e.payload ->> 'unit_price_cents')::bigint)
      FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
     WHERE e.event_type = 'order_line.created'
     GROUP BY e.aggregate_id;
$$;
