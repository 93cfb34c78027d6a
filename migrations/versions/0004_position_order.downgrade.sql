-- migrations/versions/0004/downgrade_before.sql
-- 0004 undone, first. Checkpoints go back to (last_tx, last_position) order: the last event
-- before the first one not applied, in (tx_id, position) order. That describes what a
-- reader applied only when no event it applied comes after one it has not, in that
-- order; otherwise the downgrade is refused (stop the commands and let the daemon apply
-- every event first), since the earlier engine would apply those events again. The lock
-- makes every event final meanwhile, as on the way up.
LOCK TABLE cqrs.outbox IN SHARE MODE;
CREATE INDEX outbox_tx_id_position ON cqrs.outbox (tx_id, position);

CREATE TEMP TABLE cqrs_0004_checkpoints ON COMMIT DROP AS
SELECT c.kind, c.name, coalesce(x.last_tx, '0') AS last_tx, coalesce(x.last_position, 0) AS last_position,
       (SELECT count(*) FROM cqrs.outbox o
         WHERE (o.position <= c.last_position OR o.position = ANY (c.ahead))
           AND (o.tx_id, o.position) > (coalesce(x.last_tx, '0'), coalesce(x.last_position, 0))) AS beyond
  FROM (SELECT 'projection' AS kind, p.name, p.last_position, p.ahead FROM cqrs.projections p
        UNION ALL
        SELECT 'rebuild', r.projection, r.last_position, r.ahead FROM cqrs.rebuilds r) c
  LEFT JOIN LATERAL (
       SELECT o.tx_id, o.position FROM cqrs.outbox o
        WHERE o.position > c.last_position AND o.position <> ALL (c.ahead)
        ORDER BY o.tx_id, o.position LIMIT 1) u ON true
  LEFT JOIN LATERAL (
       SELECT o.tx_id AS last_tx, o.position AS last_position FROM cqrs.outbox o
        WHERE u.tx_id IS NULL OR (o.tx_id, o.position) < (u.tx_id, u.position)
        ORDER BY o.tx_id DESC, o.position DESC LIMIT 1) x ON true;
DO $$
DECLARE
    k record;
BEGIN
    SELECT * INTO k FROM cqrs_0004_checkpoints WHERE beyond > 0 ORDER BY kind, name LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ003', MESSAGE = format(
            'cannot downgrade below 0004 now: %s %L has applied %s events after one it has not applied, in the '
            'earlier engine''s (tx_id, position) order, and would apply them again; stop the commands, let '
            'cqrs-pg listen apply every event (and finish or drop any rebuild), then downgrade', k.kind, k.name, k.beyond);
    END IF;
END
$$;

-- The tables back in their earlier shape (a column back in its place), and what depends
-- on their row types.
DROP FUNCTION cqrs._projection(text);
DROP FUNCTION cqrs.claim_batch(text, integer);
DROP FUNCTION cqrs.rebuild_claim(text, integer, boolean);
DROP FUNCTION cqrs.projection_status();
ALTER TABLE cqrs.rebuilds RENAME TO rebuilds_0004;
ALTER TABLE cqrs.rebuilds_0004 RENAME CONSTRAINT rebuilds_pkey TO rebuilds_0004_pkey;
ALTER TABLE cqrs.rebuilds_0004 RENAME CONSTRAINT rebuilds_projection_fkey TO rebuilds_0004_projection_fkey;
ALTER TABLE cqrs.projections RENAME TO projections_0004;
ALTER TABLE cqrs.projections_0004 RENAME CONSTRAINT projections_pkey TO projections_0004_pkey;
CREATE TABLE cqrs.projections (
    name           text PRIMARY KEY,
    kind           text NOT NULL,
    apply_function regproc,
    matview        regclass,
    -- matview: refresh only for these; python: the handler sees only these (NULL: all)
    event_types    text[],
    -- sql: the schemas its apply function finds its tables in, and the tables it owns
    -- (what cqrs-pg rebuild builds anew and swaps in); python: the schemas its handler's
    -- unqualified table names resolve in, and the tables it writes (what a rebuild copies
    -- and swaps in, as for sql)
    search_path    text,
    tables         regclass[],
    last_tx        xid8 NOT NULL DEFAULT '0',
    last_position  bigint NOT NULL DEFAULT 0,
    -- every transaction with an xid below horizon is wholly applied (cqrs.caught_up)
    horizon        xid8 NOT NULL DEFAULT '0',
    applied_events bigint NOT NULL DEFAULT 0,
    refreshed_at   timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT projections_kind CHECK (kind IN ('sql', 'matview', 'python')),
    CONSTRAINT projections_sql_has_function CHECK (kind <> 'sql' OR (apply_function IS NOT NULL AND search_path IS NOT NULL AND tables IS NOT NULL)),
    -- python: a handler registered by name in the daemon (cqrs_pg.projections.register)
    CONSTRAINT projections_python_has_search_path CHECK (kind <> 'python' OR search_path IS NOT NULL),
    CONSTRAINT projections_matview_has_view CHECK (kind <> 'matview' OR matview IS NOT NULL)
);
CREATE TABLE cqrs.rebuilds (
    projection     text PRIMARY KEY REFERENCES cqrs.projections (name) ON DELETE CASCADE,
    shadow_schema  name NOT NULL,
    last_tx        xid8 NOT NULL DEFAULT '0',
    last_position  bigint NOT NULL DEFAULT 0,
    applied_events bigint NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);
INSERT INTO cqrs.projections (name, kind, apply_function, matview, event_types, search_path, tables, last_tx,
                              last_position, horizon, applied_events, refreshed_at, updated_at)
SELECT p.name, p.kind, p.apply_function, p.matview, p.event_types, p.search_path, p.tables, k.last_tx,
       k.last_position, p.horizon, p.applied_events, p.refreshed_at, p.updated_at
  FROM cqrs.projections_0004 p
  JOIN cqrs_0004_checkpoints k ON k.kind = 'projection' AND k.name = p.name;
INSERT INTO cqrs.rebuilds (projection, shadow_schema, last_tx, last_position, applied_events, started_at)
SELECT r.projection, r.shadow_schema, k.last_tx, k.last_position, r.applied_events, r.started_at
  FROM cqrs.rebuilds_0004 r
  JOIN cqrs_0004_checkpoints k ON k.kind = 'rebuild' AND k.name = r.projection;
ALTER TABLE cqrs.refreshing
    DROP CONSTRAINT refreshing_projection_fkey,
    ADD CONSTRAINT refreshing_projection_fkey FOREIGN KEY (projection) REFERENCES cqrs.projections (name) ON DELETE CASCADE;
DROP TABLE cqrs.rebuilds_0004, cqrs.projections_0004;

-- What 0004 added, or changed in signature (its earlier versions are restored below).
DROP FUNCTION cqrs.batch_events(text, bigint, bigint);
DROP FUNCTION cqrs.complete_batch(text, bigint, bigint, integer);
DROP FUNCTION cqrs.rebuild_events(text, bigint, bigint);
DROP FUNCTION cqrs.rebuild_complete(text, bigint, bigint);
DROP FUNCTION shop_proj.apply_order_summary(bigint, bigint);
DROP FUNCTION shop_proj.apply_customer_stats(bigint, bigint);

-- 0001_initial.sql:sql/cqrs/functions/_projection.sql
-- A projection's row; CQ002 naming it when there is none.
CREATE OR REPLACE FUNCTION cqrs._projection(projection text)
RETURNS cqrs.projections
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('projection %L does not exist', projection));
    END IF;
    RETURN p;
END
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/_fence.sql
-- The fence: every transaction with a lower xid has ended, or is a materialized view's
-- refresh that can write no events (cqrs._exempt_from_fence). Events below it can no
-- longer appear, so a projection may read up to it and never skip one (DESIGN.md).
-- Without refreshes running it is pg_snapshot_xmin(pg_current_snapshot()): the lowest
-- in-progress xid, or xmax when none is. pg_snapshot_xip lists top-level xids only, so a
-- refresh run inside a subtransaction (whose lock holds the subxid) is never left out.
-- The xid-to-xid8 match by the low 32 bits is exact: in-progress xids are less than 2^31
-- apart, and VACUUM's freezing clears a lock's xmax long before its xid could recur.
CREATE OR REPLACE FUNCTION cqrs._fence()
RETURNS xid8
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(
               (SELECT min(x.x)
                  FROM pg_snapshot_xip(s.snap) AS x(x)
                 WHERE NOT cqrs._left_out_of_fence(x.x::xid)),
               pg_snapshot_xmax(s.snap))
      FROM (SELECT pg_current_snapshot() AS snap) s;
$$;

-- 0002_engine_and_commands.sql:sql/cqrs/functions/batch.sql
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
       -- implied by the above; the planner estimates a batch's size from this, not from
       -- the row comparisons (a 5-event batch was estimated at 41,000 rows)
       AND o.tx_id BETWEEN from_tx AND to_tx
     ORDER BY o.tx_id, o.position;
$$;

-- 0002_engine_and_commands.sql:sql/cqrs/functions/batch_unordered.sql
-- The events of cqrs.batch(), in no particular order: for set-based apply functions,
-- which group and aggregate the batch anyway and should not pay for a sort (measured: a
-- tenth of a shop projection's apply time). Inlined into the caller's query, like batch.
CREATE OR REPLACE FUNCTION cqrs.batch_unordered(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (from_tx, from_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position)
       -- implied by the above; the planner estimates a batch's size from this, not from
       -- the row comparisons (a 5-event batch was estimated at 41,000 rows)
       AND o.tx_id BETWEEN from_tx AND to_tx;
$$;

-- 0002_engine_and_commands.sql:sql/cqrs/functions/_next_batch.sql
-- The end of the next batch after (from_tx, from_position) below the fence, and its size:
-- at most max_events events in (tx_id, position) order. NULLs and 0 when there is none.
-- plan_cache_mode: the one good plan is the index walk; a custom plan per call cost 0.2 ms
-- of planning on every poll of an idle projection (measured), more than the walk.
CREATE OR REPLACE FUNCTION cqrs._next_batch(
    from_tx xid8, from_position bigint, fence xid8, max_events integer,
    OUT end_tx xid8, OUT end_position bigint, OUT n bigint)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
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
        n := max_events::bigint;
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

-- 0001_initial.sql:sql/cqrs/functions/_apply_batch.sql
-- Runs a sql projection's apply function over one batch, its unqualified table names
-- resolved through search_path: the projection's schemas, or a rebuild's shadow schema.
CREATE OR REPLACE FUNCTION cqrs._apply_batch(
    apply_function regproc, search_path text,
    from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    call text := format('SELECT %s($1, $2, $3, $4)', apply_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    EXECUTE call USING from_tx, from_position, to_tx, to_position;
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/_advance_checkpoint.sql
-- Moves a projection's checkpoint past a batch it has applied, in the caller's
-- transaction (the one that applied the batch): last_tx/last_position to the batch end,
-- applied_events by its size n, and the horizon (see cqrs.caught_up) to the fence, or only
-- to the batch's last tx_id when a full batch (full_batch) may have stopped inside that
-- transaction. refreshed: a matview refresh covered it. With to_tx NULL (nothing new below
-- the fence) only the horizon moves up, and only when the last batch may have ended inside
-- a transaction, so an idle daemon writes nothing (and takes no xid).
-- Shared by cqrs.run_projection (sql, matview) and cqrs.complete_batch (python).
CREATE OR REPLACE FUNCTION cqrs._advance_checkpoint(
    projection text, to_tx xid8, to_position bigint, n bigint, fence xid8,
    full_batch boolean, refreshed boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    IF to_tx IS NULL THEN
        SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
        IF p.horizon <= p.last_tx AND p.horizon < fence THEN
            UPDATE cqrs.projections c SET horizon = fence, updated_at = now() WHERE c.name = projection;
        END IF;
        RETURN;
    END IF;
    UPDATE cqrs.projections c
       SET last_tx = to_tx,
           last_position = to_position,
           applied_events = c.applied_events + n,
           horizon = greatest(c.horizon, CASE WHEN full_batch THEN to_tx ELSE fence END),
           refreshed_at = CASE WHEN refreshed THEN now() ELSE c.refreshed_at END,
           updated_at = now()
     WHERE c.name = projection;
END
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/register_projection.sql
-- Registers a projection: kind 'sql' applies batches with apply_function(from_tx,
-- from_position, to_tx, to_position), which finds its tables through search_path (a list
-- of schemas) and owns the tables listed in `tables`; kind 'matview' refreshes matview
-- CONCURRENTLY when events of event_types (NULL: any) arrive; kind 'python' is applied by
-- the daemon with a Python handler registered under the same name
-- (cqrs_pg.projections.register), its unqualified table names resolved through
-- search_path, seeing only events of event_types (NULL: all), writing the tables listed
-- in `tables` (what cqrs-pg rebuild rebuilds). A new projection starts
-- from the first event.
CREATE OR REPLACE FUNCTION cqrs.register_projection(
    name text,
    kind text,
    apply_function regproc DEFAULT NULL,
    matview regclass DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    search_path text DEFAULT NULL,
    tables regclass[] DEFAULT NULL)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO cqrs.projections (name, kind, apply_function, matview, event_types, search_path, tables)
    VALUES (name, kind, apply_function, matview, event_types, search_path, tables);
    -- a view's row of cqrs.refreshing, there before its first refresh (cqrs._exempt_from_fence)
    INSERT INTO cqrs.refreshing (projection) SELECT name WHERE kind = 'matview';
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/run_projection.sql
-- Applies the next batch of one projection in the caller's transaction and advances its
-- checkpoint in that same transaction (sql and matview projections; a python projection
-- is run by the daemon with cqrs.claim_batch and cqrs.complete_batch). Returns what it did:
--   applied      events applied (or, for a matview, covered by the refresh)
--   more         a full batch was applied: call again at once
--   busy         another daemon is running this projection right now
--   retry_after  a matview refresh is due but held back by refresh_interval: seconds left
--
-- Gap-free reading: events are read in (tx_id, position) order and only below the fence
-- (cqrs._fence): every transaction below it has ended (or is a view's refresh, which
-- writes no events), so no event can later appear behind the checkpoint. A transaction that commits late is
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
    n bigint := 0::bigint;
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
    fence := cqrs._fence();

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
            -- Out of the other projections' fence while it runs: it writes no events.
            PERFORM cqrs._exempt_from_fence(projection);
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

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/claim_batch.sql
-- A python projection's daemon, step 1 of 3, in one transaction with the other two:
-- takes the projection's lock (busy: another daemon holds it; nothing else is returned)
-- and returns the next batch after the checkpoint below the fence, as cqrs.run_projection
-- finds it: from_tx/from_position (the checkpoint), to_tx/to_position (the batch end;
-- NULL when there is nothing to apply, n = 0) and the fence. The daemon then reads the
-- batch (cqrs.batch_events), lets the handler write, and calls cqrs.complete_batch.
CREATE OR REPLACE FUNCTION cqrs.claim_batch(projection text, max_events integer DEFAULT 10000)
RETURNS TABLE (from_tx xid8, from_position bigint, to_tx xid8, to_position bigint, n bigint, fence xid8, busy boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    f xid8;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.run_projection applies it',
                                           projection, p.kind));
    END IF;
    -- the lock of cqrs.run_projection: released at commit, after our checkpoint is visible
    IF NOT cqrs._lock_projection(projection, false) THEN
        RETURN QUERY SELECT NULL::xid8, NULL::bigint, NULL::xid8, NULL::bigint, 0::bigint, NULL::xid8, true;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    f := cqrs._fence();
    SELECT * INTO b FROM cqrs._next_batch(p.last_tx, p.last_position, f, max_events);
    IF b.end_tx IS NULL THEN
        -- nothing new below the fence: at most the horizon moves up, as in run_projection
        PERFORM cqrs._advance_checkpoint(projection, NULL, NULL, 0, f, false, false);
    END IF;
    RETURN QUERY SELECT p.last_tx, p.last_position, b.end_tx, b.end_position, b.n, f, false;
END
$$;

-- 0001_initial.sql:sql/cqrs/functions/batch_events.sql
-- A python projection's daemon, step 2 of 3: the events of the batch it claimed with
-- cqrs.claim_batch in this transaction, in (tx_id, position) order, only those of the
-- projection's event_types (NULL: all). SECURITY DEFINER: the daemon's role needs no
-- access to cqrs.outbox itself.
CREATE OR REPLACE FUNCTION cqrs.batch_events(
    projection text, from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    IF NOT cqrs._holds_projection_lock(projection) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_batch first', projection));
    END IF;
    RETURN QUERY
        SELECT b.*
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types)
         ORDER BY b.tx_id, b.position;
END
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/complete_batch.sql
-- A python projection's daemon, step 3 of 3, in the transaction that claimed the batch
-- (cqrs.claim_batch) and ran the handler: advances the checkpoint, applied_events and
-- horizon exactly as cqrs.run_projection does for a sql projection, so the handler's
-- writes and the checkpoint commit together. The arguments are claim_batch's answer; a
-- batch that does not start at the checkpoint, or a wrong count, is refused.
CREATE OR REPLACE FUNCTION cqrs.complete_batch(
    projection text, to_tx xid8, to_position bigint, n bigint, fence xid8, max_events integer)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    counted bigint;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.run_projection applies it',
                                           projection, p.kind));
    END IF;
    IF NOT cqrs._holds_projection_lock(projection) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_batch first', projection));
    END IF;
    IF to_tx IS NULL OR to_position IS NULL OR fence IS NULL
       OR (to_tx, to_position) <= (p.last_tx, p.last_position)
       OR to_tx >= fence
       OR fence > cqrs._fence() THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end (%s, %s) with fence %s is not after the checkpoint (%s, %s) of projection %L and below the fence',
            to_tx, to_position, fence, p.last_tx, p.last_position, projection));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position);
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of projection %L holds %s events, not %s', projection, counted, n));
    END IF;
    -- a full batch may have stopped inside transaction to_tx
    PERFORM cqrs._advance_checkpoint(projection, to_tx, to_position, n, fence, n >= max_events, false);
END
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/rebuild_step.sql
-- Applies the next batch of the event log to a sql projection's rebuild's shadow tables,
-- below the fence, and advances the rebuild's own checkpoint. `more`: a full batch, call
-- again. (A python projection's handler applies its batches: cqrs.rebuild_claim.)
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
    IF p.kind <> 'sql' THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a %s projection: its handler applies the batches of its rebuild '
            '(cqrs.rebuild_claim, cqrs.rebuild_events, cqrs.rebuild_complete)', projection, p.kind));
    END IF;
    SELECT * INTO b
      FROM cqrs._next_batch(r.last_tx, r.last_position, cqrs._fence(), max_events);
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

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/rebuild_claim.sql
-- A python projection's rebuild, step 1 of 3, in one transaction with cqrs.rebuild_events,
-- the handler's writes to the shadow tables and cqrs.rebuild_complete: the next batch
-- after the rebuild's checkpoint below the fence, as cqrs.rebuild_step finds it, and the
-- shadow schema that must be the handler's search_path. final: also take the projection's
-- lock, waiting for a daemon's batch, so the live tables stand still until this
-- transaction, which catches the shadow up and then calls cqrs.rebuild_finish, commits.
CREATE OR REPLACE FUNCTION cqrs.rebuild_claim(projection text, max_events integer DEFAULT 10000, final boolean DEFAULT false)
RETURNS TABLE (from_tx xid8, from_position bigint, to_tx xid8, to_position bigint, n bigint, fence xid8,
               shadow_schema name)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    f xid8;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.rebuild_step applies its rebuild',
                                           projection, p.kind));
    END IF;
    -- the rebuild's row, then the projection's lock: the order of cqrs.rebuild_finish
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_claim.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    IF final THEN
        PERFORM cqrs._lock_projection(projection, true);
    END IF;
    f := cqrs._fence();
    SELECT * INTO b FROM cqrs._next_batch(r.last_tx, r.last_position, f, max_events);
    RETURN QUERY SELECT r.last_tx, r.last_position, b.end_tx, b.end_position, b.n, f, r.shadow_schema;
END
$$;

-- 0002_engine_and_commands.sql:sql/cqrs/functions/rebuild_events.sql
-- A python projection's rebuild, step 2 of 3: the events of the batch cqrs.rebuild_claim
-- returned, in (tx_id, position) order, only those of the projection's event_types (NULL:
-- all), as cqrs.batch_events gives the daemon.
CREATE OR REPLACE FUNCTION cqrs.rebuild_events(
    projection text, from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    RETURN QUERY
        SELECT b.*
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types)
         ORDER BY b.tx_id, b.position;
END
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/rebuild_complete.sql
-- A python projection's rebuild, step 3 of 3, in the transaction that claimed the batch
-- (cqrs.rebuild_claim) and let the handler write it to the shadow tables: moves the
-- rebuild's checkpoint past the batch. The arguments are rebuild_claim's answer; a batch
-- that is not after the checkpoint and below the fence, or a wrong count, is refused.
CREATE OR REPLACE FUNCTION cqrs.rebuild_complete(projection text, to_tx xid8, to_position bigint, n bigint, fence xid8)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    counted bigint;
BEGIN
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.rebuild_step applies its rebuild',
                                           projection, p.kind));
    END IF;
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_complete.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    IF to_tx IS NULL OR to_position IS NULL OR fence IS NULL
       OR (to_tx, to_position) <= (r.last_tx, r.last_position)
       OR to_tx >= fence
       OR fence > cqrs._fence() THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end (%s, %s) with fence %s is not after the checkpoint (%s, %s) of the rebuild of projection %L '
            'and below the fence', to_tx, to_position, fence, r.last_tx, r.last_position, projection));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (r.last_tx, r.last_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position);
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of the rebuild of projection %L holds %s events, not %s',
                                           projection, counted, n));
    END IF;
    UPDATE cqrs.rebuilds x
       SET last_tx = to_tx, last_position = to_position, applied_events = x.applied_events + n
     WHERE x.projection = rebuild_complete.projection;
END
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/rebuild_finish.sql
-- Finishes a rebuild in one transaction: with the projection's lock held (no daemon
-- applies it meanwhile), catches the shadow up with every event below the fence (a sql
-- projection, in batches of max_events; a python one's handler has done so earlier in
-- this transaction: cqrs.rebuild_claim with final), then replaces each live table by its
-- shadow copy, grants included. Readers see the old tables until commit and the new ones
-- after: never an empty, half-built or older read model. Returns the number of events the
-- new tables were built from.
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
    new_horizon xid8;
    b record;
    t regclass;
    fresh regclass;
    tbl record;
    grant_ record;
    old_indexes text[];
    swapped regclass[] := '{}'::regclass[];
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    PERFORM cqrs._lock_projection(projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    fence := cqrs._fence();
    LOOP
        EXIT WHEN p.kind <> 'sql';
        SELECT * INTO b FROM cqrs._next_batch(r.last_tx, r.last_position, fence, max_events);
        EXIT WHEN b.end_tx IS NULL;
        PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema),
                                  r.last_tx, r.last_position, b.end_tx, b.end_position);
        r.last_tx := b.end_tx;
        r.last_position := b.end_position;
        r.applied_events := r.applied_events + b.n;
    END LOOP;
    -- Swapped in, the shadow must hold every event the live tables hold, and perhaps more.
    IF (r.last_tx, r.last_position) < (p.last_tx, p.last_position) THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L has applied the log up to (%s, %s), the live tables up to (%s, %s): '
            'catch it up in this transaction first (cqrs.rebuild_claim with final => true)',
            projection, r.last_tx, r.last_position, p.last_tx, p.last_position));
    END IF;
    -- Every transaction below the new horizon must be wholly in the shadow: the fence,
    -- unless a transaction below it has events after the shadow's checkpoint (one that
    -- ended after a python catch-up's last look; the daemon applies it after the swap).
    new_horizon := least(fence, (SELECT o.tx_id FROM cqrs.outbox o
                              WHERE (o.tx_id, o.position) > (r.last_tx, r.last_position) AND o.tx_id < fence
                              ORDER BY o.tx_id, o.position LIMIT 1));

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
            -- the privilege as a keyword from a fixed list, never text from elsewhere
            EXECUTE format('GRANT %s ON %s TO %s',
                           CASE grant_.privilege_type
                               WHEN 'SELECT' THEN 'SELECT' WHEN 'INSERT' THEN 'INSERT'
                               WHEN 'UPDATE' THEN 'UPDATE' WHEN 'DELETE' THEN 'DELETE'
                               WHEN 'TRUNCATE' THEN 'TRUNCATE' WHEN 'REFERENCES' THEN 'REFERENCES'
                               WHEN 'TRIGGER' THEN 'TRIGGER' END,
                           fresh,
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
           horizon = greatest(c.horizon, new_horizon),
           tables = swapped,
           updated_at = now()
     WHERE c.name = projection;
    DELETE FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection;
    RETURN r.applied_events;
END
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/work_pending.sql
-- Whether any of these projections (sql or python) has committed events below the fence
-- that it has not applied: the daemon's poll while it lingers awake after its last events.
-- One index probe per projection, reads only: cheaper than a round of cqrs.run_projection
-- calls (0.2 ms each, measured), so the daemon can look every few milliseconds and start a
-- round only when there is work. Materialized views are left out: their refresh waits for
-- its own timer (refresh_interval) anyway.
CREATE OR REPLACE FUNCTION cqrs.work_pending(projections text[])
RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1
          FROM cqrs.projections p
         CROSS JOIN (SELECT cqrs._fence() AS fence) f
         WHERE p.name = ANY (projections)
           AND p.kind <> 'matview'
           AND EXISTS (SELECT 1
                         FROM cqrs.outbox o
                        WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
                          AND o.tx_id < f.fence));
$$;

-- 0001_initial.sql:sql/cqrs/functions/projection_status.sql
-- Per projection: checkpoint, events not yet applied and the age of the oldest of them.
CREATE OR REPLACE FUNCTION cqrs.projection_status()
RETURNS TABLE (
    name text,
    kind text,
    last_tx xid8,
    last_position bigint,
    horizon xid8,
    applied_events bigint,
    events_behind bigint,
    seconds_behind double precision,
    updated_at timestamptz,
    refreshed_at timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.name, p.kind, p.last_tx, p.last_position, p.horizon, p.applied_events,
           behind.n,
           coalesce(extract(epoch FROM clock_timestamp() - behind.oldest), 0)::double precision,
           p.updated_at, p.refreshed_at
      FROM cqrs.projections p
     CROSS JOIN LATERAL (
           SELECT count(*) AS n, min(o.occurred_at) AS oldest
             FROM cqrs.outbox o
            WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)) behind
     ORDER BY p.name;
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/functions/fence_status.sql
-- The fence (cqrs._fence) now, and whether committed events wait above it (held back by an open
-- transaction): the daemon's stall watch. Reads only, so the caller takes no xid.
CREATE OR REPLACE FUNCTION cqrs.fence_status(OUT fence xid8, OUT held boolean)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.fence, EXISTS (SELECT 1 FROM cqrs.outbox o WHERE o.tx_id >= f.fence)
      FROM (SELECT cqrs._fence() AS fence) f;
$$;

-- 0003_refresh_outside_fence.sql:sql/cqrs/privileges.sql
-- Least privilege for the cqrs core: no function is executable by PUBLIC; each group role
-- gets only what its users need. SECURITY DEFINER functions do the rest as the owner.
-- An application's own grants (its commands to cqrs_writer, its read tables to
-- cqrs_reader) come after this, in its own privileges file (the shop's: sql/privileges.sql).
REVOKE ALL ON SCHEMA cqrs FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;

-- cqrs_writer: the receipt type that commands return (USAGE, no function, no table).
GRANT USAGE ON SCHEMA cqrs TO cqrs_writer;

-- cqrs_reader: read-your-writes.
GRANT USAGE ON SCHEMA cqrs TO cqrs_reader;
GRANT EXECUTE ON FUNCTION cqrs.caught_up(bigint, text) TO cqrs_reader;

-- cqrs_listener: what the daemon calls, and the list of projections it runs. A python
-- projection's handler writes its tables as this role: grant those with the projection.
-- prune_receipts: an operator's cron job may run as the daemon's role.
GRANT USAGE ON SCHEMA cqrs TO cqrs_listener;
GRANT SELECT ON cqrs.projections TO cqrs_listener;
GRANT EXECUTE ON FUNCTION
    cqrs.run_projection(text, integer, interval),
    cqrs.claim_batch(text, integer),
    cqrs.batch_events(text, xid8, bigint, xid8, bigint),
    cqrs.complete_batch(text, xid8, bigint, bigint, xid8, integer),
    cqrs.listener_heartbeat(text, boolean, interval),
    cqrs.listener_exit(text),
    cqrs.projection_status(),
    cqrs.fence_blockers(),
    cqrs.fence_status(),
    cqrs.work_pending(text[]),
    cqrs.caught_up(bigint, text),
    cqrs.prune_receipts(interval, integer)
TO cqrs_listener;

-- 0002_engine_and_commands.sql:sql/shop_proj/functions/apply_order_summary.sql
-- Applies one batch of events to order_summary, set-based, in three statements:
-- 1. customers whose name or email is newer in the batch (version-guarded) are upserted
--    into the private copy, and then their orders renamed, by index: the renamed
--    customers pass as arrays, whose size the planner sees (joined to the upsert's
--    RETURNING, a guessed size, the update scanned all of order_summary);
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
DECLARE
    renamed uuid[];
    names text[];
    emails text[];
BEGIN
    WITH bc AS MATERIALIZED (
        SELECT DISTINCT ON (e.aggregate_id)
               e.aggregate_id AS customer_id, e.payload ->> 'name' AS name, e.payload ->> 'email' AS email,
               e.aggregate_version AS version
          FROM cqrs.batch_unordered(from_tx, from_position, to_tx, to_position) e
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
          FROM cqrs.batch_unordered(from_tx, from_position, to_tx, to_position) e
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

-- 0003_refresh_outside_fence.sql:sql/shop_proj/functions/apply_customer_stats.sql
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
--    created with their customer.created event, so orders seen before it (another
--    transaction may commit the order first, with a lower xid) change no row yet.
-- 3. A customer new in this batch is counted in full from the private order state (their
--    orders so far, this batch's included); a renamed one gets the new name and email.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic (an order's state before the batch
-- is read by primary key). plan_cache_mode: the batch bounds are parameters, and a
-- generic plan cannot estimate the batch from them.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE OR REPLACE FUNCTION shop_proj.apply_customer_stats(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
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
           (SELECT array_agg(cu.customer_id) FROM cu),
           -- new: not there before this statement (whose snapshot does not see cu's writes)
           (SELECT array_agg(NOT EXISTS (SELECT 1 FROM customer_stats_customers k WHERE k.customer_id = cu.customer_id))
              FROM cu)
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

-- 0002_engine_and_commands.sql:sql/privileges.sql
-- Least privilege for the shop (the cqrs core's own grants are in sql/cqrs/privileges.sql):
-- no function is executable by PUBLIC; each group role gets only what its users need.
-- SECURITY DEFINER functions do the rest as the owner.
REVOKE ALL ON SCHEMA shop, shop_read, shop_proj FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA shop, shop_read, shop_proj FROM PUBLIC;

-- cqrs_writer: the commands, nothing else.
GRANT USAGE ON SCHEMA shop TO cqrs_writer;
GRANT EXECUTE ON FUNCTION
    shop.register_customer(uuid, text, text),
    shop.rename_customer(uuid, uuid, text, integer),
    shop.add_product(uuid, text, text, bigint, integer),
    shop.restock(uuid, text, integer),
    shop.change_price(uuid, text, bigint),
    shop.place_order(uuid, uuid, jsonb),
    shop.cancel_order(uuid, uuid, integer),
    shop.ship_order(uuid, uuid, integer)
TO cqrs_writer;

-- cqrs_reader: the read model.
GRANT USAGE ON SCHEMA shop_read TO cqrs_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA shop_read TO cqrs_reader;

-- migrations/versions/0004/downgrade_after.sql
-- 0004 undone, last: the shop's projections run their earlier apply functions, and what
-- 0004 added goes.
UPDATE cqrs.projections SET apply_function = 'shop_proj.apply_order_summary'::regproc WHERE name = 'order_summary';
UPDATE cqrs.projections SET apply_function = 'shop_proj.apply_customer_stats'::regproc WHERE name = 'customer_stats';
DROP FUNCTION cqrs.take_mark(text);
DROP FUNCTION cqrs.mark_usable(text, interval);
ALTER TABLE cqrs.listeners DROP COLUMN final_position, DROP COLUMN mark_xmax, DROP COLUMN mark_position;
DROP FUNCTION cqrs._advance_checkpoint(text, boolean, bigint, bigint[], bigint, boolean, bigint, xid8, bigint);
DROP FUNCTION cqrs._apply_batch(regproc, text, bigint, bigint);
DROP FUNCTION cqrs.batch(bigint, bigint);
DROP FUNCTION cqrs.batch_unordered(bigint, bigint);
DROP FUNCTION cqrs._next_batch(bigint, bigint[], bigint, integer);
DROP FUNCTION cqrs._horizon(bigint, xid8, boolean);
DROP FUNCTION cqrs._needs_mark(xid8, bigint, xid8, bigint, bigint);
DROP FUNCTION cqrs._mark_replaceable(xid8, xid8, xid8);
DROP FUNCTION cqrs._read_limit();
DROP FUNCTION cqrs._xid_assigned(xid8);
DROP FUNCTION cqrs._fence(pg_snapshot);
