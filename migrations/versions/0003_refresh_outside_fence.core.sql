-- sql/cqrs/tables/refreshing.sql
-- A row per materialized-view projection (cqrs.register_projection inserts it), locked FOR UPDATE by the transaction that
-- refreshes its view (cqrs._exempt_from_fence): the row's xmax names that transaction to
-- cqrs._fence, which leaves it out. A refresh writes no events, and holds an xid for as
-- long as it runs (0.3 s for product_sales at 100k lines, measured): counted in the fence,
-- it held every projection back that long, once a second.
-- A lock writes the xid into the tuple in place: no new row versions, no bloat.
CREATE TABLE cqrs.refreshing (
    projection text PRIMARY KEY REFERENCES cqrs.projections (name) ON DELETE CASCADE
);

-- sql/cqrs/functions/_left_out_of_fence.sql
-- Whether xid x is a materialized view's refresh that the fence leaves out: the xmax of a
-- locked cqrs.refreshing row (cqrs._exempt_from_fence). The one home of that rule, for
-- cqrs._fence and cqrs.fence_blockers; only meaningful for an xid still in progress.
-- No SET clause, so the planner inlines it into its callers (which pin search_path); the
-- operator is qualified all the same.
CREATE FUNCTION cqrs._left_out_of_fence(x xid)
RETURNS boolean
LANGUAGE sql
STABLE
AS $$
    SELECT EXISTS (SELECT 1 FROM cqrs.refreshing r WHERE r.xmax OPERATOR(pg_catalog.=) x);
$$;

-- sql/cqrs/functions/_fence.sql
-- The fence: every transaction with a lower xid has ended, or is a materialized view's
-- refresh that can write no events (cqrs._exempt_from_fence). Events below it can no
-- longer appear, so a projection may read up to it and never skip one (DESIGN.md).
-- Without refreshes running it is pg_snapshot_xmin(pg_current_snapshot()): the lowest
-- in-progress xid, or xmax when none is. pg_snapshot_xip lists top-level xids only, so a
-- refresh run inside a subtransaction (whose lock holds the subxid) is never left out.
-- The xid-to-xid8 match by the low 32 bits is exact: in-progress xids are less than 2^31
-- apart, and VACUUM's freezing clears a lock's xmax long before its xid could recur.
CREATE FUNCTION cqrs._fence()
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

-- sql/cqrs/functions/_exempt_from_fence.sql
-- Leaves this transaction, a materialized view's refresh, out of every projection's fence
-- (cqrs._fence) until it ends, and makes sure it writes no events: it sets cqrs.no_events,
-- which the outbox capture refuses (cqrs._ring_doorbell), and only a transaction that has
-- written nothing yet (no xid) is left out. Then it locks the projection's row of
-- cqrs.refreshing: the lock, held to the end of the transaction, names its xid to _fence.
-- Returns whether it is left out (not if the view has no row: cqrs.register_projection
-- inserts one for every view).
CREATE FUNCTION cqrs._exempt_from_fence(projection text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RETURN false;  -- may have written events already
    END IF;
    PERFORM set_config('cqrs.no_events', 'on', true);
    PERFORM 1 FROM cqrs.refreshing r WHERE r.projection = _exempt_from_fence.projection FOR UPDATE;
    RETURN FOUND;
END
$$;

-- sql/cqrs/functions/_ring_doorbell.sql
-- The doorbell, rung by the outbox capture after each statement that appended events:
-- NOTIFY, but only while a daemon has said it is asleep (cqrs.listeners). A NOTIFY
-- serializes the commits of every notifying transaction in the cluster, so commands
-- under load, with the daemon awake, never send one (see DESIGN.md, wake-up).
-- It also refuses events from a transaction that the fence leaves out (a materialized
-- view's refresh, cqrs._exempt_from_fence): projections would never see them.
-- A function of its own so that `cqrs-pg bench` can swap it for its baselines.
CREATE OR REPLACE FUNCTION cqrs._ring_doorbell()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('cqrs.no_events', true) = 'on' THEN
        PERFORM cqrs._fail('CQ003', 'this transaction refreshes a materialized view projection, outside the fence: '
                                    'it must not write events (cqrs.no_events is on)');
    END IF;
    -- Asked once per transaction, by its first statement that appends events (a NOTIFY is
    -- sent at commit whichever statement asks): the later ones skip the table probe.
    IF current_setting('cqrs.doorbell_asked', true) = 'on' THEN
        RETURN;
    END IF;
    PERFORM set_config('cqrs.doorbell_asked', 'on', true);
    IF EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.sleeping AND l.expires_at > now()) THEN
        PERFORM pg_notify('cqrs_outbox', '');
    END IF;
END
$$;

-- sql/cqrs/functions/register_projection.sql
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

-- migrations/versions/0003/after_tables.sql
-- The rows that cqrs.register_projection inserts now, for the views registered before.
INSERT INTO cqrs.refreshing (projection) SELECT p.name FROM cqrs.projections p WHERE p.kind = 'matview';

-- sql/cqrs/functions/run_projection.sql
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

-- sql/cqrs/functions/claim_batch.sql
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

-- sql/cqrs/functions/complete_batch.sql
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

-- sql/cqrs/functions/rebuild_begin.sql
-- Starts (or starts over) a rebuild of a sql or python projection: empty copies of its
-- tables in a shadow schema, which its apply function (cqrs.rebuild_step) or its handler
-- (cqrs.rebuild_claim, cqrs.rebuild_events, cqrs.rebuild_complete) fills from the whole
-- event log while the daemon keeps the live tables current and readers keep reading them.
CREATE OR REPLACE FUNCTION cqrs.rebuild_begin(projection text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    shadow name := ('cqrs_rebuild_' || projection)::name;
    t regclass;
    dup name;
BEGIN
    p := cqrs._projection(projection);
    IF p.kind NOT IN ('sql', 'python') THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s: it is rebuilt by a refresh, not from the log',
                                           projection, p.kind));
    END IF;
    IF coalesce(cardinality(p.tables), 0) = 0 THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L names no tables (cqrs.projections.tables): there is nothing to rebuild', projection));
    END IF;
    -- one shadow schema holds a copy of each table
    SELECT c.relname INTO dup
      FROM unnest(p.tables) t_ JOIN pg_class c ON c.oid = t_
     GROUP BY c.relname HAVING count(*) > 1 LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L owns two tables named %I: a rebuild copies them into one shadow schema', projection, dup));
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', shadow);
    EXECUTE format('CREATE SCHEMA %I', shadow);
    FOREACH t IN ARRAY p.tables LOOP
        -- LIKE copies columns, constraints and indexes, not storage parameters (fillfactor)
        EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING ALL)%s',
                       shadow, (SELECT c.relname FROM pg_class c WHERE c.oid = t), t,
                       (SELECT coalesce(' WITH (' || array_to_string(c.reloptions, ', ') || ')', '')
                          FROM pg_class c WHERE c.oid = t));
    END LOOP;
    DELETE FROM cqrs.rebuilds r WHERE r.projection = rebuild_begin.projection;
    INSERT INTO cqrs.rebuilds (projection, shadow_schema) VALUES (projection, shadow);
END
$$;

-- sql/cqrs/functions/rebuild_step.sql
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

-- sql/cqrs/functions/rebuild_claim.sql
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

-- sql/cqrs/functions/rebuild_complete.sql
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

-- sql/cqrs/functions/rebuild_finish.sql
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

-- sql/cqrs/functions/fence_status.sql
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

-- sql/cqrs/functions/fence_blockers.sql
-- Open transactions that hold an xid, oldest first, in any database of the cluster:
-- each one holds every projection's fence back until it ends (a view's refresh, which the
-- fence leaves out, is not listed).
CREATE OR REPLACE FUNCTION cqrs.fence_blockers()
RETURNS TABLE (
    pid integer,
    database name,
    username name,
    application_name text,
    state text,
    xid xid,
    xact_start timestamptz,
    query_start timestamptz,
    seconds double precision,
    query text)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.pid, a.datname, a.usename, a.application_name, a.state,
           a.backend_xid,
           a.xact_start, a.query_start,
           extract(epoch FROM clock_timestamp() - a.xact_start)::double precision,
           left(a.query, 200)
      FROM pg_stat_activity a
     WHERE a.backend_xid IS NOT NULL
       AND a.pid <> pg_backend_pid()
       AND NOT cqrs._left_out_of_fence(a.backend_xid)
    UNION ALL
    SELECT NULL, x.database, x.owner, 'prepared transaction ' || x.gid, 'prepared',
           x.transaction, x.prepared, NULL,
           extract(epoch FROM clock_timestamp() - x.prepared)::double precision, NULL
      FROM pg_prepared_xacts x
     ORDER BY 9 DESC;
$$;

-- sql/cqrs/functions/work_pending.sql
-- Whether any of these projections (sql or python) has committed events below the fence
-- that it has not applied: the daemon's poll while it lingers awake after its last events.
-- One index probe per projection, reads only: cheaper than a round of cqrs.run_projection
-- calls (0.2 ms each, measured), so the daemon can look every few milliseconds and start a
-- round only when there is work. Materialized views are left out: their refresh waits for
-- its own timer (refresh_interval) anyway.
CREATE FUNCTION cqrs.work_pending(projections text[])
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

-- sql/cqrs/privileges.sql
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
