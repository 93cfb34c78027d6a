-- migrations/versions/0002/downgrade.sql
-- 0002 undone, first: drop what 0002 added; the DOWNGRADE_SOURCES after this restore what it changed.
-- Outbox capture: remember each captured table's arguments, drop its generated function
-- (and triggers); 0001's cqrs.tg_capture is restored and re-attached below.
CREATE TEMP TABLE cqrs_0002_captures AS
SELECT DISTINCT t.tgrelid::regclass AS tbl, t.tgfoid::regprocedure AS fn,
       string_to_array(encode(t.tgargs, 'escape'), '\000') AS args
  FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
 WHERE p.pronamespace = 'cqrs'::regnamespace AND p.proname LIKE '\_capture\_%' AND NOT t.tgisinternal;
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT DISTINCT fn FROM cqrs_0002_captures LOOP
        EXECUTE format('DROP FUNCTION %s CASCADE', f);
    END LOOP;
END
$$;
DROP FUNCTION cqrs._ring_doorbell();
DROP FUNCTION cqrs.rebuild_claim(text, integer, boolean),
              cqrs.rebuild_events(text, xid8, bigint, xid8, bigint),
              cqrs.rebuild_complete(text, xid8, bigint, bigint, xid8);
DROP FUNCTION cqrs.batch_unordered(xid8, bigint, xid8, bigint);
DROP FUNCTION cqrs.prune_receipts(interval, integer);
DROP INDEX cqrs.commands_created_at_idx;
-- Read-model sums back to bigint (0001); product_sales is restored below.
DROP MATERIALIZED VIEW shop_read.product_sales;
ALTER TABLE shop_read.customer_stats ALTER COLUMN lifetime_value_cents TYPE bigint;

-- 0001_initial.sql:sql/cqrs/functions/tg_capture.sql
-- Statement-level outbox trigger: appends one event per changed row, in one INSERT, from
-- the transition table. Attached by cqrs.capture_changes(), whose arguments it receives:
-- TG_ARGV = aggregate_type, entity (event_type = entity.created|updated|deleted),
--           aggregate id column, aggregate version column ('' means version 1).
CREATE OR REPLACE FUNCTION cqrs.tg_capture()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    metadata jsonb := jsonb_strip_nulls(jsonb_build_object(
        'command_id', nullif(current_setting('cqrs.command_id', true), ''),
        'command', nullif(current_setting('cqrs.command', true), '')));
BEGIN
    EXECUTE format(
        'INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata)
         SELECT $1, $2, r.%I, %s, to_jsonb(r), $3 FROM %I r',
        TG_ARGV[2],
        CASE WHEN TG_ARGV[3] = '' THEN '1' ELSE format('r.%I', TG_ARGV[3]) END,
        CASE TG_OP WHEN 'DELETE' THEN 'old_rows' ELSE 'new_rows' END)
    USING TG_ARGV[1] || '.' || CASE TG_OP WHEN 'INSERT' THEN 'created'
                                          WHEN 'UPDATE' THEN 'updated'
                                          ELSE 'deleted' END,
          TG_ARGV[0],
          metadata;

    -- The doorbell. Only while a daemon has said it is asleep: NOTIFY serializes the
    -- commits of every notifying transaction in the cluster.
    IF EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.sleeping AND l.expires_at > now()) THEN
        PERFORM pg_notify('cqrs_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/capture_changes.sql
-- Attaches the outbox triggers (one per INSERT/UPDATE/DELETE, statement level with a
-- transition table) to a table whose rows belong to an aggregate.
CREATE OR REPLACE FUNCTION cqrs.capture_changes(
    tbl regclass,
    aggregate_type text,
    entity text,
    id_column name,
    version_column name DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    op text;
BEGIN
    FOREACH op IN ARRAY ARRAY['INSERT', 'UPDATE', 'DELETE'] LOOP
        EXECUTE format(
            'CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s TABLE AS %s
             FOR EACH STATEMENT EXECUTE FUNCTION cqrs.tg_capture(%L, %L, %L, %L)',
            '_500_outbox_' || lower(op), op, tbl,
            CASE op WHEN 'DELETE' THEN 'OLD' ELSE 'NEW' END,
            CASE op WHEN 'DELETE' THEN 'old_rows' ELSE 'new_rows' END,
            aggregate_type, entity, id_column, coalesce(version_column, ''));
    END LOOP;
END
$$;

-- migrations/versions/0002/downgrade_capture.sql
-- Outbox capture back to 0001: re-attach cqrs.tg_capture (restored above) to every table
-- that had a generated capture function, with the same arguments.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT DISTINCT tbl, args FROM cqrs_0002_captures ORDER BY 1 LOOP
        PERFORM cqrs.capture_changes(t.tbl, t.args[1], t.args[2], t.args[3], nullif(t.args[4], ''));
    END LOOP;
END
$$;
DROP TABLE cqrs_0002_captures;
REVOKE EXECUTE ON FUNCTION cqrs.tg_capture(), cqrs.capture_changes(regclass, text, text, name, name) FROM PUBLIC;

-- 0001_initial.sql:sql/cqrs/functions/batch.sql
-- The events of one projection batch: those after the checkpoint up to and including
-- the batch end, in the order every projection applies them.
CREATE OR REPLACE FUNCTION cqrs.batch(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (from_tx, from_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position)
     ORDER BY o.tx_id, o.position;
$$;

-- 0001_initial.sql:sql/cqrs/functions/_next_batch.sql
-- The end of the next batch after (from_tx, from_position) below the fence, and its size:
-- at most max_events events in (tx_id, position) order. NULLs and 0 when there is none.
CREATE OR REPLACE FUNCTION cqrs._next_batch(
    from_tx xid8, from_position bigint, fence xid8, max_events integer,
    OUT end_tx xid8, OUT end_position bigint, OUT n bigint)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- A full batch (the usual case in a catch-up) ends at the max_events-th event: one
    -- index-only walk, no count and no sort. Only a short batch is counted.
    SELECT o.tx_id, o.position
      INTO end_tx, end_position
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (from_tx, from_position)
       AND o.tx_id < fence
     ORDER BY o.tx_id, o.position
    OFFSET max_events - 1
     LIMIT 1;
    IF FOUND THEN
        n := max_events;
        RETURN;
    END IF;
    WITH b AS (
        SELECT o.tx_id, o.position
          FROM cqrs.outbox o
         WHERE (o.tx_id, o.position) > (from_tx, from_position)
           AND o.tx_id < fence
         ORDER BY o.tx_id, o.position
         LIMIT max_events)
    SELECT (SELECT count(*) FROM b), x.tx_id, x.position
      INTO n, end_tx, end_position
      FROM (SELECT b.tx_id, b.position FROM b ORDER BY b.tx_id DESC, b.position DESC LIMIT 1) x;
    n := coalesce(n, 0);
END
$$;

-- 0001_initial.sql:sql/shop_proj/functions/apply_order_summary.sql
-- Applies one batch of events to order_summary, set-based, in two statements:
-- 1. customers whose name or email is newer in the batch (version-guarded) are upserted
--    into the private copy and their orders renamed;
-- 2. per order in the batch, one group holds its latest state and its new lines, so an
--    order's row is written once: upserted with its state (applied only over an older
--    version) plus its lines, or, lines only, updated.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic. plan_cache_mode: the batch bounds
-- are parameters, and a generic plan cannot estimate the batch from them.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE OR REPLACE FUNCTION shop_proj.apply_order_summary(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    WITH bc AS MATERIALIZED (
        SELECT DISTINCT ON (e.aggregate_id)
               e.aggregate_id AS customer_id, e.payload ->> 'name' AS name, e.payload ->> 'email' AS email,
               e.aggregate_version AS version
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
         WHERE e.event_type IN ('customer.created', 'customer.updated')
         ORDER BY e.aggregate_id, e.aggregate_version DESC),
    cu AS (
        INSERT INTO order_summary_customers AS c (customer_id, name, email, version)
        SELECT bc.customer_id, bc.name, bc.email, bc.version FROM bc
        ON CONFLICT (customer_id) DO UPDATE
           SET name = excluded.name, email = excluded.email, version = excluded.version
         WHERE c.version < excluded.version
        RETURNING c.customer_id, c.name, c.email)
    -- Orders placed before their customer's event was applied get the name here too.
    UPDATE order_summary s
       SET customer_name = cu.name, customer_email = cu.email
      FROM cu
     WHERE s.customer_id = cu.customer_id
       AND (s.customer_name, s.customer_email) IS DISTINCT FROM (cu.name, cu.email);

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
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
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

-- 0001_initial.sql:sql/shop_proj/functions/apply_customer_stats.sql
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
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
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

-- 0001_initial.sql:sql/cqrs/functions/run_projection.sql
-- Applies the next batch of one projection in the caller's transaction and advances its
-- checkpoint in that same transaction (sql and matview projections; a python projection
-- is run by the daemon with cqrs.claim_batch and cqrs.complete_batch). Returns what it did:
--   applied      events applied (or, for a matview, covered by the refresh)
--   more         a full batch was applied: call again at once
--   busy         another daemon is running this projection right now
--   retry_after  a matview refresh is due but held back by refresh_interval: seconds left
--
-- Gap-free reading: events are read in (tx_id, position) order and only below the fence
-- pg_snapshot_xmin(pg_current_snapshot()): every transaction below it has ended, so no
-- event can later appear behind the checkpoint. A transaction that commits late is
-- delayed, never skipped. See sql/cqrs/DESIGN.md.
CREATE OR REPLACE FUNCTION cqrs.run_projection(
    projection text,
    max_events integer DEFAULT 10000,
    refresh_interval interval DEFAULT '1 second')
RETURNS TABLE (applied bigint, more boolean, busy boolean, retry_after double precision)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    fence xid8;
    n bigint := 0;
    end_tx xid8;
    end_pos bigint;
    relevant boolean;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind = 'python' THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a python projection: the daemon runs its handler (cqrs.claim_batch, cqrs.complete_batch)',
            projection));
    END IF;

    -- One runner per projection at a time, across daemons. An advisory lock rather than a
    -- row lock: checking an idle projection must not take an xid (that would hold back
    -- every fence) or write WAL. The lock is released only after our commit is visible,
    -- so the next holder reads the checkpoint we wrote.
    IF NOT cqrs._lock_projection(projection, false) THEN
        RETURN QUERY SELECT 0::bigint, false, true, NULL::double precision;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    fence := pg_snapshot_xmin(pg_current_snapshot());

    IF p.kind = 'sql' THEN
        SELECT b.end_tx, b.end_position, b.n INTO end_tx, end_pos, n
          FROM cqrs._next_batch(p.last_tx, p.last_position, fence, max_events) b;
    ELSE
        SELECT o.tx_id, o.position
          INTO end_tx, end_pos
          FROM cqrs.outbox o
         WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
           AND o.tx_id < fence
         ORDER BY o.tx_id DESC, o.position DESC
         LIMIT 1;
    END IF;

    IF end_tx IS NULL THEN
        -- Nothing new below the fence: at most the horizon moves up.
        PERFORM cqrs._advance_checkpoint(projection, NULL, NULL, 0, fence, false, false);
        RETURN QUERY SELECT 0::bigint, false, false, NULL::double precision;
        RETURN;
    END IF;

    IF p.kind = 'sql' THEN
        PERFORM cqrs._apply_batch(p.apply_function, p.search_path, p.last_tx, p.last_position, end_tx, end_pos);
    ELSE
        SELECT EXISTS (
            SELECT 1
              FROM cqrs.outbox o
             WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
               AND (o.tx_id, o.position) <= (end_tx, end_pos)
               AND (p.event_types IS NULL OR o.event_type = ANY (p.event_types)))
          INTO relevant;
        IF relevant THEN
            IF p.refreshed_at > now() - refresh_interval THEN
                RETURN QUERY SELECT 0::bigint, false, false,
                    extract(epoch FROM p.refreshed_at + refresh_interval - now())::double precision;
                RETURN;
            END IF;
            -- CONCURRENTLY: readers on the primary keep reading, and no AccessExclusiveLock
            -- is replayed on replicas to cancel their queries.
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %s', p.matview);
        END IF;
        -- the events of cqrs.batch(), counted from the index alone
        SELECT count(*) INTO n
          FROM cqrs.outbox o
         WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
           AND (o.tx_id, o.position) <= (end_tx, end_pos);
    END IF;

    -- a full sql batch may have stopped inside transaction end_tx
    PERFORM cqrs._advance_checkpoint(projection, end_tx, end_pos, n, fence,
                                     p.kind = 'sql' AND n >= max_events, coalesce(relevant, false));
    RETURN QUERY SELECT n, p.kind = 'sql' AND n >= max_events, false, NULL::double precision;
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/rebuild_begin.sql
-- Starts (or starts over) a rebuild of a sql projection: empty copies of its tables in a
-- shadow schema, which cqrs.rebuild_step fills from the whole event log while the daemon
-- keeps the live tables current and readers keep reading them.
CREATE OR REPLACE FUNCTION cqrs.rebuild_begin(projection text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    shadow name := 'cqrs_rebuild_' || projection;
    t regclass;
BEGIN
    p := cqrs._projection(projection);
    IF p.kind = 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a python projection: rebuilding one is not supported yet',
                                           projection));
    ELSIF p.kind <> 'sql' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s: it is rebuilt by a refresh, not from the log',
                                           projection, p.kind));
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', shadow);
    EXECUTE format('CREATE SCHEMA %I', shadow);
    FOREACH t IN ARRAY p.tables LOOP
        EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING ALL)',
                       shadow, (SELECT c.relname FROM pg_class c WHERE c.oid = t), t);
    END LOOP;
    DELETE FROM cqrs.rebuilds r WHERE r.projection = rebuild_begin.projection;
    INSERT INTO cqrs.rebuilds (projection, shadow_schema) VALUES (projection, shadow);
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/rebuild_step.sql
-- Applies the next batch of the event log to a rebuild's shadow tables, below the fence,
-- and advances the rebuild's own checkpoint. `more`: a full batch, call again.
CREATE OR REPLACE FUNCTION cqrs.rebuild_step(projection text, max_events integer DEFAULT 10000)
RETURNS TABLE (applied bigint, more boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_step.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    SELECT * INTO b
      FROM cqrs._next_batch(r.last_tx, r.last_position, pg_snapshot_xmin(pg_current_snapshot()), max_events);
    IF b.end_tx IS NULL THEN
        RETURN QUERY SELECT 0::bigint, false;
        RETURN;
    END IF;
    PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema),
                              r.last_tx, r.last_position, b.end_tx, b.end_position);
    UPDATE cqrs.rebuilds x
       SET last_tx = b.end_tx, last_position = b.end_position, applied_events = x.applied_events + b.n
     WHERE x.projection = rebuild_step.projection;
    RETURN QUERY SELECT b.n, b.n >= max_events;
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/rebuild_finish.sql
-- Finishes a rebuild in one transaction: with the projection's lock held (no daemon
-- applies it meanwhile), catches the shadow up with every event below the fence, then
-- replaces each live table by its shadow copy, grants included. Readers see the old
-- tables until commit and the new ones after: never an empty or half-built read model.
-- Returns the number of events the new tables were built from.
CREATE OR REPLACE FUNCTION cqrs.rebuild_finish(projection text, max_events integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    fence xid8;
    b record;
    t regclass;
    fresh regclass;
    tbl record;
    grant_ record;
    old_indexes text[];
    swapped regclass[] := '{}';
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    PERFORM cqrs._lock_projection(projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    fence := pg_snapshot_xmin(pg_current_snapshot());
    LOOP
        SELECT * INTO b FROM cqrs._next_batch(r.last_tx, r.last_position, fence, max_events);
        EXIT WHEN b.end_tx IS NULL;
        PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema),
                                  r.last_tx, r.last_position, b.end_tx, b.end_position);
        r.last_tx := b.end_tx;
        r.last_position := b.end_position;
        r.applied_events := r.applied_events + b.n;
    END LOOP;
    -- The shadow has now applied every event below the fence: all the live tables have,
    -- and perhaps more.

    FOREACH t IN ARRAY p.tables LOOP
        SELECT c.relname, n.nspname, c.relacl, c.relowner INTO tbl
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = t;
        old_indexes := ARRAY(SELECT i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                              WHERE x.indrelid = t ORDER BY 1);
        EXECUTE format('DROP TABLE %s', t);
        EXECUTE format('ALTER TABLE %I.%I SET SCHEMA %I', r.shadow_schema, tbl.relname, tbl.nspname);
        fresh := format('%I.%I', tbl.nspname, tbl.relname)::regclass;
        FOR grant_ IN SELECT * FROM aclexplode(tbl.relacl) a WHERE a.grantee <> tbl.relowner LOOP
            EXECUTE format('GRANT %s ON %s TO %s', grant_.privilege_type, fresh,
                           CASE WHEN grant_.grantee = 0 THEN 'PUBLIC'
                                ELSE quote_ident(pg_get_userbyid(grant_.grantee)) END);
        END LOOP;
        IF old_indexes IS DISTINCT FROM ARRAY(SELECT i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                                               WHERE x.indrelid = fresh ORDER BY 1) THEN
            PERFORM cqrs._fail('CQ003', format(
                'rebuilding %s would rename its indexes (%s): give them the names PostgreSQL would choose',
                fresh, array_to_string(old_indexes, ', ')));
        END IF;
        swapped := swapped || fresh;
    END LOOP;
    EXECUTE format('DROP SCHEMA %I', r.shadow_schema);

    UPDATE cqrs.projections c
       SET last_tx = r.last_tx,
           last_position = r.last_position,
           applied_events = r.applied_events,
           horizon = greatest(c.horizon, fence),
           tables = swapped,
           updated_at = now()
     WHERE c.name = projection;
    DELETE FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection;
    RETURN r.applied_events;
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/_fail.sql
-- Raises a cqrs error: errcode is one of the documented CQ00x SQLSTATEs.
CREATE OR REPLACE FUNCTION cqrs._fail(errcode text, message text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = _fail.errcode, MESSAGE = _fail.message;
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/_require_text.sql
-- Trims a text argument (all leading and trailing whitespace, not just spaces); CQ001 when
-- it is null, blank or longer than max_length.
CREATE OR REPLACE FUNCTION cqrs._require_text(argument text, value text, max_length integer)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trimmed text := regexp_replace(value, '^[[:space:]]+|[[:space:]]+$', '', 'g');
BEGIN
    IF trimmed IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be null', argument));
    ELSIF trimmed = '' THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be blank, got %L', argument, value));
    ELSIF length(trimmed) > max_length THEN
        PERFORM cqrs._fail('CQ001', format('%s must be at most %s characters, got %s: %L',
                                           argument, max_length, length(trimmed), left(trimmed, 40) || '...'));
    END IF;
    RETURN trimmed;
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/_begin_command.sql
-- Claims command_id for this transaction and tags its events with it. Returns the first
-- receipt (duplicate = true) if the same command with the same arguments already ran,
-- NULL if the caller should go on; CQ005 if the id was used for something else.
-- A concurrent twin waits on the primary key until the first commits or aborts.
CREATE OR REPLACE FUNCTION cqrs._begin_command(command_id uuid, command text, arguments jsonb)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    prior cqrs.commands;
BEGIN
    PERFORM cqrs._require_id('command_id', command_id);
    INSERT INTO cqrs.commands (command_id, command, arguments, token)
    VALUES (command_id, command, arguments, pg_current_xact_id()::text::bigint)
    ON CONFLICT ON CONSTRAINT commands_pkey DO NOTHING;
    IF FOUND THEN
        PERFORM set_config('cqrs.command_id', command_id::text, true);
        PERFORM set_config('cqrs.command', command, true);
        RETURN NULL;
    END IF;

    SELECT * INTO prior FROM cqrs.commands c WHERE c.command_id = _begin_command.command_id;
    IF prior.command <> command OR prior.arguments <> arguments THEN
        PERFORM cqrs._fail('CQ005', format('command_id %s was already used for %s(%s), not for %s(%s)',
                                           command_id, prior.command, prior.arguments, command, arguments));
    END IF;
    RETURN ROW(prior.command_id, prior.aggregate_id, prior.version, prior.token, true)::cqrs.receipt;
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/_finish_command.sql
-- Records the command's outcome for retries and returns its receipt.
CREATE OR REPLACE FUNCTION cqrs._finish_command(command_id uuid, aggregate_id uuid, version integer)
RETURNS cqrs.receipt
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE cqrs.commands c
       SET aggregate_id = _finish_command.aggregate_id, version = _finish_command.version
     WHERE c.command_id = _finish_command.command_id
    RETURNING c.command_id, c.aggregate_id, c.version, c.token, false;
$$;

-- 0001_initial.sql:sql/shop/functions/_parse_order_lines.sql
-- Validates place_order's lines: a JSON array of 1 to 100 {"sku": text, "quantity": integer > 0},
-- each sku once. Returns them as two arrays in line order; CQ001 naming the first bad entry.
CREATE OR REPLACE FUNCTION shop._parse_order_lines(lines jsonb, OUT skus text[], OUT quantities integer[])
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    line jsonb;
    i integer := 0;
    sku text;
    quantity numeric;
BEGIN
    IF lines IS NULL THEN
        PERFORM cqrs._fail('CQ001', 'lines must not be null');
    ELSIF jsonb_typeof(lines) <> 'array' THEN
        PERFORM cqrs._fail('CQ001', format('lines must be a JSON array, got %s: %s',
                                           jsonb_typeof(lines), left(lines::text, 80)));
    ELSIF jsonb_array_length(lines) NOT BETWEEN 1 AND 100 THEN
        PERFORM cqrs._fail('CQ001', format('lines must hold 1 to 100 entries, got %s',
                                           jsonb_array_length(lines)));
    END IF;

    skus := '{}';
    quantities := '{}';
    FOR line IN SELECT value FROM jsonb_array_elements(lines) LOOP
        i := i + 1;
        IF jsonb_typeof(line) <> 'object' THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s] must be an object, got %s', i, left(line::text, 80)));
        ELSIF jsonb_typeof(line -> 'sku') IS DISTINCT FROM 'string' THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s].sku must be a string, got %s',
                                               i, coalesce(left((line -> 'sku')::text, 80), 'nothing')));
        ELSIF jsonb_typeof(line -> 'quantity') IS DISTINCT FROM 'number' THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s].quantity must be a number, got %s',
                                               i, coalesce(left((line -> 'quantity')::text, 80), 'nothing')));
        END IF;
        sku := cqrs._require_text(format('lines[%s].sku', i), line ->> 'sku', 100);
        quantity := (line -> 'quantity')::numeric;
        IF quantity <> trunc(quantity) OR quantity < 1 OR quantity > 2147483647 THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s].quantity must be a whole number from 1 to 2147483647, got %s',
                                               i, quantity));
        ELSIF sku = ANY (skus) THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s]: sku %L appears more than once', i, sku));
        END IF;
        skus := skus || sku;
        quantities := quantities || quantity::integer;
    END LOOP;
END
$$;

-- 0001_initial.sql:sql/shop/functions/_close_order.sql
-- Moves a placed order to its final status (cancelled gives the stock back). Shared by
-- cancel_order and ship_order, which differ only in the status they set.
CREATE OR REPLACE FUNCTION shop._close_order(command text, command_id uuid, order_id uuid, expected_version integer, new_status text)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_id('order_id', order_id);
    r := cqrs._begin_command(command_id, command,
                             jsonb_build_object('order_id', order_id, 'expected_version', expected_version));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    SELECT o.status, o.version INTO v_status, v_version
      FROM shop.orders o
     WHERE o.id = _close_order.order_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('order %s does not exist', order_id));
    END IF;
    PERFORM cqrs._check_version('order', order_id, expected_version, v_version);
    IF v_status <> 'placed' THEN
        PERFORM cqrs._fail('CQ003', format('order %s is %s: only a placed order can be %s',
                                           order_id, v_status, new_status));
    END IF;

    IF new_status = 'cancelled' THEN
        PERFORM 1
          FROM shop.products p
         WHERE p.id IN (SELECT l.product_id FROM shop.order_lines l WHERE l.order_id = _close_order.order_id)
         ORDER BY p.id
           FOR NO KEY UPDATE;
        UPDATE shop.products p
           SET stock = p.stock + l.quantity, version = p.version + 1
          FROM shop.order_lines l
         WHERE l.order_id = _close_order.order_id
           AND p.id = l.product_id;
    END IF;

    UPDATE shop.orders o
       SET status = new_status, updated_at = now(), version = o.version + 1
     WHERE o.id = _close_order.order_id
    RETURNING o.version INTO v_version;
    RETURN cqrs._finish_command(command_id, order_id, v_version);
END
$$;

-- 0001_initial.sql:sql/shop/functions/rename_customer.sql
-- Gives a customer a new name.
CREATE OR REPLACE FUNCTION shop.rename_customer(command_id uuid, customer_id uuid, name text, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text := cqrs._require_text('name', name, 200);
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_id('customer_id', customer_id);
    r := cqrs._begin_command(command_id, 'rename_customer',
                             jsonb_build_object('customer_id', customer_id, 'name', name,
                                                'expected_version', expected_version));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    -- NO KEY UPDATE: does not block orders whose foreign key check locks this customer.
    SELECT c.version INTO v_version
      FROM shop.customers c
     WHERE c.id = rename_customer.customer_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('customer %s does not exist', customer_id));
    END IF;
    PERFORM cqrs._check_version('customer', customer_id, expected_version, v_version);

    UPDATE shop.customers c
       SET name = v_name, version = c.version + 1
     WHERE c.id = rename_customer.customer_id
    RETURNING c.version INTO v_version;
    RETURN cqrs._finish_command(command_id, customer_id, v_version);
END
$$;

-- 0001_initial.sql:sql/shop/functions/place_order.sql
-- Places an order: takes the stock of every line and captures each product's current price.
CREATE OR REPLACE FUNCTION shop.place_order(command_id uuid, customer_id uuid, lines jsonb)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parsed record;
    v_id uuid := gen_random_uuid();
    missing text;
    short record;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_id('customer_id', customer_id);
    SELECT * INTO parsed FROM shop._parse_order_lines(lines);
    r := cqrs._begin_command(command_id, 'place_order',
                             jsonb_build_object('customer_id', customer_id, 'lines', lines));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM shop.customers c WHERE c.id = place_order.customer_id) THEN
        PERFORM cqrs._fail('CQ002', format('customer %s does not exist', customer_id));
    END IF;

    -- Lock the products in id order, as every command does, so two orders never deadlock.
    PERFORM 1 FROM shop.products p WHERE p.sku = ANY (parsed.skus) ORDER BY p.id FOR NO KEY UPDATE;

    SELECT l.sku INTO missing
      FROM unnest(parsed.skus) WITH ORDINALITY AS l(sku, line_no)
     WHERE NOT EXISTS (SELECT 1 FROM shop.products p WHERE p.sku = l.sku)
     ORDER BY l.line_no
     LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ002', format('product with sku %L does not exist', missing));
    END IF;

    SELECT p.sku, p.stock, l.quantity INTO short
      FROM unnest(parsed.skus, parsed.quantities) WITH ORDINALITY AS l(sku, quantity, line_no)
      JOIN shop.products p ON p.sku = l.sku
     WHERE p.stock < l.quantity
     ORDER BY l.line_no
     LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ003', format('not enough stock of sku %L: %s ordered, %s in stock',
                                           short.sku, short.quantity, short.stock));
    END IF;

    UPDATE shop.products p
       SET stock = p.stock - l.quantity, version = p.version + 1
      FROM unnest(parsed.skus, parsed.quantities) AS l(sku, quantity)
     WHERE p.sku = l.sku;

    INSERT INTO shop.orders (id, customer_id, status)
    VALUES (v_id, customer_id, 'placed');

    INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents)
    SELECT v_id, l.line_no, p.id, l.quantity, p.price_cents
      FROM unnest(parsed.skus, parsed.quantities) WITH ORDINALITY AS l(sku, quantity, line_no)
      JOIN shop.products p ON p.sku = l.sku
     ORDER BY l.line_no;

    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;

-- 0001_initial.sql:sql/shop_read/views/product_sales.sql
-- One row per product: units sold and revenue over lines of orders not cancelled.
-- Refreshed CONCURRENTLY by the daemon, which needs the unique index on product_id.
CREATE MATERIALIZED VIEW shop_read.product_sales AS
SELECT p.id AS product_id,
       p.sku,
       p.name,
       p.price_cents,
       p.stock,
       coalesce(sum(l.quantity) FILTER (WHERE o.status <> 'cancelled'), 0)::bigint AS units_sold,
       coalesce(sum(l.quantity * l.unit_price_cents) FILTER (WHERE o.status <> 'cancelled'), 0)::bigint AS revenue_cents
  FROM shop.products p
  LEFT JOIN shop.order_lines l ON l.product_id = p.id
  LEFT JOIN shop.orders o ON o.id = l.order_id
 GROUP BY p.id;

CREATE UNIQUE INDEX product_sales_product_id ON shop_read.product_sales (product_id);

-- migrations/versions/0002/downgrade_after.sql
-- 0002 undone, last: product_sales (restored above as 0001 made it) gets its grant back
-- and the registry its new oid.
GRANT SELECT ON shop_read.product_sales TO cqrs_reader;
UPDATE cqrs.projections SET matview = 'shop_read.product_sales'::regclass WHERE name = 'product_sales';
