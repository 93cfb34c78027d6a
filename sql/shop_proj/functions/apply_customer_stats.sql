-- Applies one batch of events to customer_stats. One statement reads the batch
-- once and updates the private customer and order state (version-guarded; per order, one
-- group holds its latest state and its new lines, so its row is written once), returning
-- the customers whose private state changed; a second recomputes the rows of only those
-- customers, writing only rows whose values differ.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic. plan_cache_mode: the batch bounds
-- are parameters, and a generic plan cannot estimate the batch from them.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE OR REPLACE FUNCTION shop_proj.apply_customer_stats(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    touched uuid[];
BEGIN
    WITH e AS MATERIALIZED (
        SELECT e.event_type, e.aggregate_id, e.aggregate_version, e.payload
          FROM cqrs.batch_unordered(from_tx, from_position, to_tx, to_position) e
         WHERE e.event_type IN ('customer.created', 'customer.updated', 'order.created', 'order.updated',
                                'order_line.created')),
    cu AS (
        INSERT INTO customer_stats_customers AS c (customer_id, name, email, version)
        SELECT DISTINCT ON (e.aggregate_id)
               e.aggregate_id, e.payload ->> 'name', e.payload ->> 'email', e.aggregate_version
          FROM e
         WHERE e.event_type IN ('customer.created', 'customer.updated')
         ORDER BY e.aggregate_id, e.aggregate_version DESC
        ON CONFLICT (customer_id) DO UPDATE
           SET name = excluded.name, email = excluded.email, version = excluded.version
         WHERE c.version < excluded.version
        RETURNING c.customer_id),
    o AS MATERIALIZED (
        SELECT e.aggregate_id AS order_id,
               (array_agg((e.payload ->> 'customer_id')::uuid ORDER BY e.aggregate_version DESC)
                    FILTER (WHERE e.event_type <> 'order_line.created'))[1] AS customer_id,
               (array_agg(e.payload ->> 'status' ORDER BY e.aggregate_version DESC)
                    FILTER (WHERE e.event_type <> 'order_line.created'))[1] AS status,
               max(e.aggregate_version) FILTER (WHERE e.event_type <> 'order_line.created') AS version,
               coalesce(sum((e.payload ->> 'quantity')::bigint * (e.payload ->> 'unit_price_cents')::bigint)
                            FILTER (WHERE e.event_type = 'order_line.created'), 0) AS total_cents
          FROM e
         WHERE e.event_type IN ('order.created', 'order.updated', 'order_line.created')
         GROUP BY e.aggregate_id),
    -- orders with a state event in the batch: new state only over an older version, plus lines
    os AS (
        INSERT INTO customer_stats_orders AS s (order_id, customer_id, status, total_cents, version)
        SELECT o.order_id, o.customer_id, o.status, o.total_cents, o.version
          FROM o
         WHERE o.version IS NOT NULL
        ON CONFLICT (order_id) DO UPDATE
           SET status = CASE WHEN s.version < excluded.version THEN excluded.status ELSE s.status END,
               version = greatest(s.version, excluded.version),
               total_cents = s.total_cents + excluded.total_cents
         WHERE s.version < excluded.version OR excluded.total_cents <> 0
        RETURNING s.customer_id),
    -- orders with only lines in the batch
    ol AS (
        UPDATE customer_stats_orders s
           SET total_cents = s.total_cents + o.total_cents
          FROM o
         WHERE s.order_id = o.order_id
           AND o.version IS NULL
           AND o.total_cents <> 0
        RETURNING s.customer_id)
    SELECT array_agg(DISTINCT t.customer_id) INTO touched
      FROM (SELECT cu.customer_id FROM cu
            UNION ALL SELECT os.customer_id FROM os
            UNION ALL SELECT ol.customer_id FROM ol) t;

    IF touched IS NULL THEN
        RETURN;
    END IF;

    INSERT INTO customer_stats AS s
           (customer_id, name, email, orders_placed, orders_cancelled, orders_shipped, lifetime_value_cents)
    SELECT c.customer_id, c.name, c.email,
           count(o.order_id),
           count(o.order_id) FILTER (WHERE o.status = 'cancelled'),
           count(o.order_id) FILTER (WHERE o.status = 'shipped'),
           coalesce(sum(o.total_cents) FILTER (WHERE o.status <> 'cancelled'), 0)
      FROM customer_stats_customers c
      LEFT JOIN customer_stats_orders o ON o.customer_id = c.customer_id
     WHERE c.customer_id = ANY (touched)
     GROUP BY c.customer_id
    ON CONFLICT (customer_id) DO UPDATE
       SET name = excluded.name,
           email = excluded.email,
           orders_placed = excluded.orders_placed,
           orders_cancelled = excluded.orders_cancelled,
           orders_shipped = excluded.orders_shipped,
           lifetime_value_cents = excluded.lifetime_value_cents
     WHERE (s.name, s.email, s.orders_placed, s.orders_cancelled, s.orders_shipped, s.lifetime_value_cents)
           IS DISTINCT FROM (excluded.name, excluded.email, excluded.orders_placed, excluded.orders_cancelled,
                             excluded.orders_shipped, excluded.lifetime_value_cents);
END
$$;
