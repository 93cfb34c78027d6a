-- shop_0005: customer_stats finds the customers new in a batch by a join, not a subquery
-- per customer (planned for an empty table, that scanned the table being filled once per
-- customer: 1.5 s for a first batch of 10,000).

-- sql/shop_proj/functions/apply_customer_stats.sql
-- Applies one batch of events to customer_stats, by deltas: what a batch changes is added
-- to the counts of the customers it touches, never recomputed from all their orders
-- (which grew with each customer's history: at 1M events it was half of the apply time).
-- 1. One statement reads the batch once and updates the private customer and order state
--    (version-guarded; per order, one group holds its latest state and its new lines, so
--    its row is written once). From the same snapshot it reads each order's state before
--    the batch and returns, per customer, what changed: orders placed, cancelled and
--    shipped, and value of orders not cancelled. It also returns the customers whose name
--    or email it stored, and whether each was new.
-- 2. The deltas are added to the rows of customer_stats that exist: a customer's row is
--    created with their customer.created event. (Readers get events in position order,
--    which puts a customer's creation before any order of theirs; the apply function does
--    not rely on it.)
-- 3. A customer new in this batch is counted in full from the private order state (their
--    orders so far, this batch's included); a renamed one gets the new name and email.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic (an order's state before the batch
-- is read by primary key).
-- Plans are the engine's choice (cqrs._apply_batch): no plan_cache_mode of its own.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE OR REPLACE FUNCTION shop_proj.apply_customer_stats(from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    changed uuid[];
    placed bigint[];
    cancelled bigint[];
    shipped bigint[];
    value numeric[];
    named uuid[];
    fresh boolean[];
BEGIN
    WITH e AS MATERIALIZED (
        SELECT e.event_type, e.aggregate_id, e.aggregate_version, e.payload
          FROM cqrs.batch(from_position, to_position) e
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
    -- whether each was new: not there before this statement (whose snapshot does not see
    -- cu's writes). A join, not a subquery per customer: planned for an empty table, that
    -- scanned the heap cu was filling once per customer (1.5 s for a first batch of 10,000).
    f AS (
        SELECT cu.customer_id, k.customer_id IS NULL AS fresh
          FROM cu
          LEFT JOIN customer_stats_customers k ON k.customer_id = cu.customer_id),
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
         WHERE s.version < excluded.version OR excluded.total_cents <> 0),
    -- orders with only lines in the batch
    ol AS (
        UPDATE customer_stats_orders s
           SET total_cents = s.total_cents + o.total_cents
          FROM o
         WHERE s.order_id = o.order_id
           AND o.version IS NULL
           AND o.total_cents <> 0),
    -- each order before and after the batch, as the two statements above write it (this
    -- statement's snapshot does not see their writes)
    b AS (
        SELECT coalesce(o.customer_id, s.customer_id) AS customer_id,
               s.order_id IS NOT NULL AS existed,
               s.status AS old_status,
               s.total_cents AS old_total,
               CASE WHEN o.version IS NOT NULL AND (s.version IS NULL OR s.version < o.version)
                    THEN o.status ELSE s.status END AS status,
               coalesce(s.total_cents, 0) + o.total_cents AS total
          FROM o
          LEFT JOIN customer_stats_orders s ON s.order_id = o.order_id
         WHERE s.order_id IS NOT NULL OR o.version IS NOT NULL),
    d AS (
        SELECT b.customer_id,
               count(*) FILTER (WHERE NOT b.existed) AS placed,
               count(*) FILTER (WHERE b.status = 'cancelled')
                 - count(*) FILTER (WHERE b.old_status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE b.status = 'shipped')
                 - count(*) FILTER (WHERE b.old_status = 'shipped') AS shipped,
               coalesce(sum(b.total) FILTER (WHERE b.status <> 'cancelled'), 0)
                 - coalesce(sum(b.old_total) FILTER (WHERE b.old_status <> 'cancelled'), 0) AS value
          FROM b
         GROUP BY b.customer_id)
    SELECT (SELECT array_agg(d.customer_id) FROM d), (SELECT array_agg(d.placed) FROM d),
           (SELECT array_agg(d.cancelled) FROM d), (SELECT array_agg(d.shipped) FROM d),
           (SELECT array_agg(d.value) FROM d),
           (SELECT array_agg(f.customer_id) FROM f), (SELECT array_agg(f.fresh) FROM f)
      INTO changed, placed, cancelled, shipped, value, named, fresh;

    IF changed IS NOT NULL THEN
        UPDATE customer_stats s
           SET orders_placed = s.orders_placed + d.placed,
               orders_cancelled = s.orders_cancelled + d.cancelled,
               orders_shipped = s.orders_shipped + d.shipped,
               lifetime_value_cents = s.lifetime_value_cents + d.value
          FROM unnest(changed, placed, cancelled, shipped, value) AS d(customer_id, placed, cancelled, shipped, value)
         WHERE s.customer_id = d.customer_id
           AND (d.placed, d.cancelled, d.shipped, d.value) <> (0, 0, 0, 0);
    END IF;

    IF named IS NULL THEN
        RETURN;
    END IF;
    -- new customers counted in full (the deltas above found no row of theirs); renamed ones
    -- take the new name (their counts are not touched)
    INSERT INTO customer_stats AS s
           (customer_id, name, email, orders_placed, orders_cancelled, orders_shipped, lifetime_value_cents)
    SELECT c.customer_id, c.name, c.email,
           count(o.order_id),
           count(o.order_id) FILTER (WHERE o.status = 'cancelled'),
           count(o.order_id) FILTER (WHERE o.status = 'shipped'),
           coalesce(sum(o.total_cents) FILTER (WHERE o.status <> 'cancelled'), 0)
      FROM unnest(named, fresh) AS n(customer_id, fresh)
      JOIN customer_stats_customers c ON c.customer_id = n.customer_id
      LEFT JOIN customer_stats_orders o ON o.customer_id = c.customer_id AND n.fresh
     GROUP BY c.customer_id
    ON CONFLICT (customer_id) DO UPDATE
       SET name = excluded.name,
           email = excluded.email
     WHERE (s.name, s.email) IS DISTINCT FROM (excluded.name, excluded.email);
END
$$;
