-- Applies one batch of events to order_summary, set-based, in three statements:
-- 1. customers whose name or email is newer in the batch (version-guarded) are upserted
--    into the private copy, and then their orders renamed, by index: the renamed
--    customers pass as arrays, whose size the planner sees (joined to the upsert's
--    RETURNING, a guessed size, the update scanned all of order_summary);
-- 2. per order in the batch, one group holds its latest state and its new lines, so an
--    order's row is written once: upserted with its state (applied only over an older
--    version) plus its lines, or, lines only, updated.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic.
-- Plans are the engine's choice (cqrs._apply_batch): no plan_cache_mode of its own.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE OR REPLACE FUNCTION shop_proj.apply_order_summary(from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    renamed uuid[];
    names text[];
    emails text[];
BEGIN
    WITH bc AS MATERIALIZED (
        SELECT DISTINCT ON (e.aggregate_id)
               e.aggregate_id AS customer_id, e.payload ->> 'name' AS name, e.payload ->> 'email' AS email,
               e.aggregate_version AS version
          FROM cqrs.batch(from_position, to_position) e
         WHERE e.event_type IN ('customer.created', 'customer.updated')
         ORDER BY e.aggregate_id, e.aggregate_version DESC),
    cu AS (
        INSERT INTO order_summary_customers AS c (customer_id, name, email, version)
        SELECT bc.customer_id, bc.name, bc.email, bc.version FROM bc
        ON CONFLICT (customer_id) DO UPDATE
           SET name = excluded.name, email = excluded.email, version = excluded.version
         WHERE c.version < excluded.version
        RETURNING c.customer_id, c.name, c.email)
    SELECT array_agg(cu.customer_id), array_agg(cu.name), array_agg(cu.email)
      INTO renamed, names, emails
      FROM cu;

    -- Orders placed before their customer's event was applied get the name here too.
    IF renamed IS NOT NULL THEN
        UPDATE order_summary s
           SET customer_name = cu.name, customer_email = cu.email
          FROM unnest(renamed, names, emails) AS cu(customer_id, name, email)
         WHERE s.customer_id = cu.customer_id
           AND (s.customer_name, s.customer_email) IS DISTINCT FROM (cu.name, cu.email);
    END IF;

    WITH o AS MATERIALIZED (
        SELECT e.aggregate_id AS order_id,
               (array_agg(e.payload ORDER BY e.aggregate_version DESC)
                    FILTER (WHERE e.event_type <> 'order_line.created'))[1] AS state,
               max(e.aggregate_version) FILTER (WHERE e.event_type <> 'order_line.created') AS version,
               count(*) FILTER (WHERE e.event_type = 'order_line.created') AS line_count,
               coalesce(sum((e.payload ->> 'quantity')::bigint)
                            FILTER (WHERE e.event_type = 'order_line.created'), 0) AS item_count,
               coalesce(sum((e.payload ->> 'quantity')::bigint * (e.payload ->> 'unit_price_cents')::bigint)
                            FILTER (WHERE e.event_type = 'order_line.created'), 0) AS total_cents
          FROM cqrs.batch(from_position, to_position) e
         WHERE e.event_type IN ('order.created', 'order.updated', 'order_line.created')
         GROUP BY e.aggregate_id),
    -- Lines arrive once each, after their order's row (same transaction, later position).
    os AS (
        INSERT INTO order_summary AS s
               (order_id, customer_id, customer_name, customer_email, status, line_count, item_count, total_cents,
                placed_at, updated_at, version)
        SELECT o.order_id, (o.state ->> 'customer_id')::uuid, c.name, c.email, o.state ->> 'status',
               o.line_count, o.item_count, o.total_cents,
               (o.state ->> 'placed_at')::timestamptz, (o.state ->> 'updated_at')::timestamptz,
               o.version
          FROM o
          LEFT JOIN order_summary_customers c ON c.customer_id = (o.state ->> 'customer_id')::uuid
         WHERE o.state IS NOT NULL
        ON CONFLICT (order_id) DO UPDATE
           SET status = CASE WHEN s.version < excluded.version THEN excluded.status ELSE s.status END,
               updated_at = CASE WHEN s.version < excluded.version THEN excluded.updated_at ELSE s.updated_at END,
               version = greatest(s.version, excluded.version),
               line_count = s.line_count + excluded.line_count,
               item_count = s.item_count + excluded.item_count,
               total_cents = s.total_cents + excluded.total_cents
         WHERE s.version < excluded.version OR excluded.line_count <> 0)
    UPDATE order_summary s
       SET line_count = s.line_count + o.line_count,
           item_count = s.item_count + o.item_count,
           total_cents = s.total_cents + o.total_cents
      FROM o
     WHERE s.order_id = o.order_id
       AND o.state IS NULL;
END
$$;
