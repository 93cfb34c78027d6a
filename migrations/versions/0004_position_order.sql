-- migrations/versions/0004/before.sql
-- 0004, first. Readers read the outbox in position order (each aggregate's version order)
-- up to the final position, instead of in (tx_id, position) order below the fence. Each
-- checkpoint (last_tx, last_position) becomes a position: just before the first event it
-- had not applied; the events it had applied after that one stay applied (ahead), so
-- none is applied twice or skipped. For that every event must be final: no transaction
-- may be adding events meanwhile, which the lock below makes sure of (it waits for those
-- that are, and holds new ones back until this migration commits).
LOCK TABLE cqrs.outbox IN SHARE MODE;

ALTER TABLE cqrs.projections
    ADD COLUMN ahead bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN final_position bigint NOT NULL DEFAULT 0,
    ADD COLUMN mark_xmax xid8,
    ADD COLUMN mark_position bigint,
    ADD COLUMN horizon_position bigint NOT NULL DEFAULT 0;
ALTER TABLE cqrs.listeners
    ADD COLUMN final_position bigint NOT NULL DEFAULT 0,
    ADD COLUMN mark_xmax xid8,
    ADD COLUMN mark_position bigint;
ALTER TABLE cqrs.rebuilds
    ADD COLUMN ahead bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN final_position bigint NOT NULL DEFAULT 0,
    ADD COLUMN mark_xmax xid8,
    ADD COLUMN mark_position bigint;

CREATE TEMP TABLE cqrs_0004_checkpoints ON COMMIT DROP AS
SELECT c.kind, c.name, x.cut,
       ARRAY(SELECT o.position FROM cqrs.outbox o
              WHERE o.position > x.cut AND (o.tx_id, o.position) <= (c.last_tx, c.last_position)
              ORDER BY o.position) AS ahead
  FROM (SELECT 'projection' AS kind, p.name, p.last_tx, p.last_position FROM cqrs.projections p
        UNION ALL
        SELECT 'rebuild', r.projection, r.last_tx, r.last_position FROM cqrs.rebuilds r) c
 CROSS JOIN LATERAL (
       SELECT coalesce((SELECT min(o.position) - 1 FROM cqrs.outbox o
                         WHERE (o.tx_id, o.position) > (c.last_tx, c.last_position)),
                       (SELECT max(o.position) FROM cqrs.outbox o), 0) AS cut) x;

UPDATE cqrs.projections p
   SET last_position = k.cut, ahead = k.ahead,
       final_position = coalesce((SELECT max(o.position) FROM cqrs.outbox o), 0)
  FROM cqrs_0004_checkpoints k
 WHERE k.kind = 'projection' AND k.name = p.name;
UPDATE cqrs.rebuilds r
   SET last_position = k.cut, ahead = k.ahead,
       final_position = coalesce((SELECT max(o.position) FROM cqrs.outbox o), 0)
  FROM cqrs_0004_checkpoints k
 WHERE k.kind = 'rebuild' AND k.name = r.projection;

ALTER TABLE cqrs.projections DROP COLUMN last_tx;
ALTER TABLE cqrs.rebuilds DROP COLUMN last_tx;
-- Nothing reads in (tx_id, position) order any more.
DROP INDEX cqrs.outbox_tx_id_position;
-- Their results change shape: created anew below.
DROP FUNCTION cqrs.claim_batch(text, integer);
DROP FUNCTION cqrs.rebuild_claim(text, integer, boolean);
DROP FUNCTION cqrs.projection_status();

-- sql/cqrs/functions/_fence.sql
-- The fence of a snapshot: every transaction with a lower xid has ended, or is a
-- materialized view's refresh that can write no events (cqrs._exempt_from_fence).
-- Without refreshes running it is pg_snapshot_xmin(snap): the lowest in-progress xid, or
-- xmax when none is. pg_snapshot_xip lists top-level xids only, so a refresh run inside
-- a subtransaction (whose lock holds the subxid) is never left out.
-- The xid-to-xid8 match by the low 32 bits is exact: in-progress xids are less than 2^31
-- apart, and VACUUM's freezing clears a lock's xmax long before its xid could recur.
CREATE FUNCTION cqrs._fence(snap pg_snapshot)
RETURNS xid8
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(
               (SELECT min(x.x)
                  FROM pg_snapshot_xip(snap) AS x(x)
                 WHERE NOT cqrs._left_out_of_fence(x.x::xid)),
               pg_snapshot_xmax(snap));
$$;

-- sql/cqrs/functions/_xid_assigned.sql
-- Whether transaction id x has been handed out yet. pg_xact_status says "in the future"
-- (an error) for an id at or above the next one to be assigned; a snapshot's xmax is only
-- one more than the latest completed id, and transactions running with ids at or above it
-- are not in its list.
CREATE FUNCTION cqrs._xid_assigned(x xid8)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_xact_status(x);
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$$;

-- sql/cqrs/functions/_read_limit.sql
-- How far every reader may read the outbox now: final_position, the highest position at
-- or below which every event is final (its transaction has ended, and no transaction can
-- still add one there). Also the fence, the position to store as this transaction's mark
-- (mark_position: NULL when it cannot be one), and the highest mark stored that is not
-- usable yet (pending_position).
--
-- A transaction takes positions only after its xid (a capture trigger runs after its
-- statement's writes). A mark is a position read from the outbox's sequence by a
-- transaction that had no xid yet, stored with the xid it then took (a reader's, when it
-- commits a batch, cqrs._advance_checkpoint; a daemon's before a round, cqrs.take_mark;
-- each in its own row): every transaction that took a position up to mark_position had
-- its xid before that one, so once no transaction below mark_xmax runs (mark_xmax <= the
-- fence), every position up to mark_position is final.
-- The position read now is final at once when no transaction runs at all: none in the
-- snapshot, and no xid handed out at or above its xmax. See sql/cqrs/DESIGN.md.
CREATE FUNCTION cqrs._read_limit(
    OUT final_position bigint, OUT fence xid8, OUT mark_position bigint, OUT pending_position bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    snap pg_snapshot;
    now_final bigint;
BEGIN
    -- Sessions that cache positions take them out of order: marks, and version order
    -- within an aggregate, need each one taken from the sequence itself.
    IF (SELECT s.seqcache FROM pg_sequence s WHERE s.seqrelid = 'cqrs.outbox_position_seq'::regclass) <> 1 THEN
        PERFORM cqrs._fail('CQ003', 'sequence cqrs.outbox_position_seq must not cache values: '
                                    'ALTER SEQUENCE cqrs.outbox_position_seq CACHE 1');
    END IF;
    IF pg_current_xact_id_if_assigned() IS NULL
       AND current_setting('transaction_isolation') = 'read committed' THEN
        mark_position := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    END IF;
    -- a statement of its own: READ COMMITTED takes its snapshot after the position was read
    snap := pg_current_snapshot();
    fence := cqrs._fence(snap);
    IF fence = pg_snapshot_xmax(snap) AND NOT cqrs._xid_assigned(pg_snapshot_xmax(snap)) THEN
        now_final := mark_position;
    END IF;
    SELECT greatest(max(r.final_position), max(r.mark_position) FILTER (WHERE r.mark_xmax <= fence)),
           -- a stored xid at or above xmax is not one of this cluster's (a logical restore's)
           max(r.mark_position) FILTER (WHERE r.mark_xmax > fence AND r.mark_xmax < pg_snapshot_xmax(snap))
      INTO final_position, pending_position
      FROM (SELECT p.final_position, p.mark_xmax, p.mark_position FROM cqrs.projections p
            UNION ALL
            SELECT b.final_position, b.mark_xmax, b.mark_position FROM cqrs.rebuilds b
            UNION ALL
            SELECT l.final_position, l.mark_xmax, l.mark_position FROM cqrs.listeners l) r;
    final_position := greatest(final_position, now_final, 0);
END
$$;

-- sql/cqrs/functions/_mark_replaceable.sql
-- Whether a reader may replace the mark it stored (stored_xmax) with a new one: when it
-- has none, when it is usable already (at or below the fence), or when it cannot be from
-- this cluster (at or above the xmax now, as after a logical restore). One that still
-- waits is kept: under steady writes, marks replaced every round would never become usable.
CREATE FUNCTION cqrs._mark_replaceable(stored_xmax xid8, fence xid8, now_xmax xid8)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT stored_xmax IS NULL OR stored_xmax OPERATOR(pg_catalog.<=) fence
           OR stored_xmax OPERATOR(pg_catalog.>=) now_xmax;
$$;

-- sql/cqrs/functions/_needs_mark.sql
-- Whether a reader with nothing to apply should store a mark (cqrs._read_limit): positions
-- were taken beyond the final position and beyond every mark still waiting to become
-- usable, and its own stored mark may be replaced. Without one, events committed while
-- other transactions run would wait for a moment when none does.
CREATE FUNCTION cqrs._needs_mark(stored_xmax xid8, final_position bigint, fence xid8, mark_position bigint,
                                 pending_position bigint)
RETURNS boolean
LANGUAGE sql
STABLE
AS $$
    SELECT coalesce(mark_position OPERATOR(pg_catalog.>) greatest(final_position, pending_position), false)
           AND cqrs._mark_replaceable(stored_xmax, fence, pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()));
$$;

-- sql/cqrs/functions/_horizon.sql
-- An xid below which every transaction has all its events at or below after_position,
-- for a reader that has applied everything up to there: the fence, or the oldest
-- transaction with an event after it. NULL when more than 5,000 events may lie after it
-- (a catch-up: not worth reading now; the caller keeps the horizon it has). Cheap by
-- default: more than 5,000 positions handed out after it are taken for that many events;
-- with thorough, the events themselves are counted (positions of rolled-back
-- transactions take no event).
CREATE FUNCTION cqrs._horizon(after_position bigint, fence xid8, thorough boolean DEFAULT false)
RETURNS xid8
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
               WHEN coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0) - after_position <= 5000
               THEN least(fence, (SELECT min(o.tx_id) FROM cqrs.outbox o WHERE o.position > after_position))
               WHEN thorough
               THEN (SELECT CASE WHEN count(*) <= 5000 THEN least(fence, min(x.tx_id)) END
                       FROM (SELECT o.tx_id FROM cqrs.outbox o WHERE o.position > after_position
                              ORDER BY o.position LIMIT 5001) x)
           END;
$$;

-- sql/cqrs/functions/_next_batch.sql
-- The next batch after a reader's checkpoint (from_position, and the events it applied
-- ahead of it): at most max_events events in position order, none above final_position.
-- start_position and ahead_left: the checkpoint once it has stepped over the events
-- applied ahead that nothing unapplied precedes any more. end_position: the batch's end,
-- NULL when there is nothing to apply (n = 0); a batch that is not full ends at
-- final_position, past any position no event took (a rolled-back transaction's).
-- plan_cache_mode: the one good plan is the primary key's range scan; a custom plan per
-- call cost 0.2 ms of planning on every poll of an idle projection (measured).
CREATE FUNCTION cqrs._next_batch(
    from_position bigint, ahead bigint[], final_position bigint, max_events integer,
    OUT start_position bigint, OUT ahead_left bigint[], OUT end_position bigint, OUT n bigint)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    hi bigint;
BEGIN
    start_position := from_position;
    ahead_left := ahead;
    n := 0;
    -- Events applied ahead (a checkpoint carried over from the engine's earlier order) stay
    -- applied: the checkpoint steps over each once it has applied everything before it.
    IF cardinality(ahead_left) > 0 THEN
        WHILE cardinality(ahead_left) > 0 AND ahead_left[1] <= final_position
              AND NOT EXISTS (SELECT 1 FROM cqrs.outbox o
                               WHERE o.position > start_position AND o.position < ahead_left[1]) LOOP
            start_position := ahead_left[1];
            ahead_left := ahead_left[2:];
        END LOOP;
    END IF;
    hi := least(final_position, ahead_left[1] - 1);
    IF hi <= start_position THEN
        RETURN;
    END IF;
    -- A full batch (the usual case in a catch-up) ends at the max_events-th event: one
    -- index walk, no count. Only a short batch is counted.
    SELECT o.position INTO end_position
      FROM cqrs.outbox o
     WHERE o.position > start_position AND o.position <= hi
     ORDER BY o.position
    OFFSET max_events - 1
     LIMIT 1;
    IF FOUND THEN
        n := max_events::bigint;
        RETURN;
    END IF;
    SELECT count(*) INTO n FROM cqrs.outbox o WHERE o.position > start_position AND o.position <= hi;
    end_position := CASE WHEN n > 0 THEN hi END;
END
$$;

-- sql/cqrs/functions/batch.sql
-- The events of one batch: those after from_position up to and including to_position, in
-- position order, the order every reader gets them in (per aggregate, the order of its
-- versions). An apply function calls it with the two positions it was given.
CREATE OR REPLACE FUNCTION cqrs.batch(from_position bigint, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE o.position > from_position
       AND o.position <= to_position
     ORDER BY o.position;
$$;

-- The same for an apply function written for the earlier protocol
-- f(from_tx, from_position, to_tx, to_position): the transaction ids are not needed.
CREATE OR REPLACE FUNCTION cqrs.batch(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT * FROM cqrs.batch(from_position, to_position);
$$;

-- sql/cqrs/functions/batch_unordered.sql
-- The events of cqrs.batch(), in no promised order: for set-based apply functions, which
-- group and aggregate the batch anyway. Inlined into the caller's query, like batch.
CREATE OR REPLACE FUNCTION cqrs.batch_unordered(from_position bigint, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE o.position > from_position
       AND o.position <= to_position;
$$;

-- The same for an apply function written for the earlier protocol (see cqrs.batch).
CREATE OR REPLACE FUNCTION cqrs.batch_unordered(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT * FROM cqrs.batch_unordered(from_position, to_position);
$$;

-- sql/cqrs/functions/_apply_batch.sql
-- Runs a sql projection's apply function over one batch, its unqualified table names
-- resolved through search_path: the projection's schemas, or a rebuild's shadow schema.
-- An apply function takes (from_position, to_position); one written for the earlier
-- protocol (from_tx, from_position, to_tx, to_position) is given NULL transaction ids,
-- which its cqrs.batch call does not need.
CREATE FUNCTION cqrs._apply_batch(apply_function regproc, search_path text, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    call text := format(
        CASE (SELECT f.pronargs FROM pg_proc f WHERE f.oid = apply_function)
            WHEN 4 THEN 'SELECT %s(NULL::xid8, $1, NULL::xid8, $2)'
            ELSE 'SELECT %s($1, $2)' END,
        apply_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    EXECUTE call USING from_position, to_position;
END
$$;

-- sql/cqrs/functions/_advance_checkpoint.sql
-- Moves a reader's checkpoint, in the caller's transaction (the one that applied the
-- batch): a projection's row, or with rebuild its rebuild's. to_position and ahead: the
-- new checkpoint; n: the events applied; refreshed: a matview refresh covered it. A
-- projection's horizon (see cqrs.caught_up) moves up to what cqrs._horizon finds (read
-- thoroughly when no events were applied: a projection with nothing to apply that
-- could not find it after its last batch, cqrs.run_projection). It also
-- keeps what cqrs._read_limit found: the final position, and mark_position (NULL: none)
-- as this transaction's mark, with this transaction's xid, in place of the stored one
-- when that may be replaced (cqrs._mark_replaceable).
-- Shared by cqrs.run_projection, cqrs.claim_batch and cqrs.complete_batch (python) and the
-- rebuild functions.
CREATE FUNCTION cqrs._advance_checkpoint(
    projection text, rebuild boolean, to_position bigint, ahead bigint[], n bigint, refreshed boolean,
    final_position bigint, fence xid8, mark_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    now_xmax xid8 := pg_snapshot_xmax(pg_current_snapshot());
    new_horizon xid8;
BEGIN
    IF rebuild THEN
        UPDATE cqrs.rebuilds r
           SET last_position = to_position,
               ahead = _advance_checkpoint.ahead,
               applied_events = r.applied_events + n,
               final_position = greatest(r.final_position, _advance_checkpoint.final_position),
               mark_xmax = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                     AND cqrs._mark_replaceable(r.mark_xmax, fence, now_xmax)
                                THEN pg_current_xact_id() ELSE r.mark_xmax END,
               mark_position = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                         AND cqrs._mark_replaceable(r.mark_xmax, fence, now_xmax)
                                    THEN _advance_checkpoint.mark_position ELSE r.mark_position END
         WHERE r.projection = _advance_checkpoint.projection;
        RETURN;
    END IF;
    new_horizon := cqrs._horizon(to_position, fence, n = 0);
    UPDATE cqrs.projections c
       SET last_position = to_position,
           ahead = _advance_checkpoint.ahead,
           applied_events = c.applied_events + n,
           horizon = greatest(c.horizon, new_horizon),
           horizon_position = CASE WHEN new_horizon IS NULL THEN c.horizon_position ELSE to_position END,
           refreshed_at = CASE WHEN refreshed THEN now() ELSE c.refreshed_at END,
           updated_at = now(),
           final_position = greatest(c.final_position, _advance_checkpoint.final_position),
           mark_xmax = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                 AND cqrs._mark_replaceable(c.mark_xmax, fence, now_xmax)
                            THEN pg_current_xact_id() ELSE c.mark_xmax END,
           mark_position = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                     AND cqrs._mark_replaceable(c.mark_xmax, fence, now_xmax)
                                THEN _advance_checkpoint.mark_position ELSE c.mark_position END
     WHERE c.name = projection;
END
$$;

-- sql/cqrs/functions/register_projection.sql
-- Registers a projection: kind 'sql' applies batches with apply_function(from_position
-- bigint, to_position bigint), which reads the batch with cqrs.batch and finds its tables
-- through search_path (a list of schemas), and owns the tables listed in `tables`; kind
-- 'matview' refreshes matview CONCURRENTLY when events of event_types (NULL: any) arrive;
-- kind 'python' is applied by the daemon with a Python handler registered under the same
-- name (cqrs_pg.projections.register), its unqualified table names resolved through
-- search_path, seeing only events of event_types (NULL: all), writing the tables listed
-- in `tables` (what cqrs-pg rebuild rebuilds). A new projection starts from the first
-- event.
CREATE OR REPLACE FUNCTION cqrs.register_projection(
    name text,
    kind text,
    apply_function regproc DEFAULT NULL,
    matview regclass DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    search_path text DEFAULT NULL,
    tables regclass[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- (from_position, to_position); (from_tx, from_position, to_tx, to_position) is the
    -- earlier protocol, still run (cqrs._apply_batch)
    IF apply_function IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_proc f
         WHERE f.oid = apply_function
           AND pg_catalog.oidvectortypes(f.proargtypes) IN ('bigint, bigint', 'xid8, bigint, xid8, bigint')) THEN
        PERFORM cqrs._fail('CQ001', format(
            'apply function %s must take (from_position bigint, to_position bigint)', apply_function));
    END IF;
    INSERT INTO cqrs.projections (name, kind, apply_function, matview, event_types, search_path, tables)
    VALUES (name, kind, apply_function, matview, event_types, search_path, tables);
    -- a view's row of cqrs.refreshing, there before its first refresh (cqrs._exempt_from_fence)
    INSERT INTO cqrs.refreshing (projection) SELECT register_projection.name WHERE register_projection.kind = 'matview';
END
$$;

-- sql/cqrs/functions/run_projection.sql
-- Applies the next batch of one projection in the caller's transaction and advances its
-- checkpoint in that same transaction (sql and matview projections; a python projection
-- is run by the daemon with cqrs.claim_batch and cqrs.complete_batch). Returns what it did:
--   applied      events applied (or, for a matview, covered by the refresh)
--   more         a full batch was applied: call again at once
--   busy         another daemon is running this projection right now
--   retry_after  a matview refresh is due but held back by refresh_interval: seconds left
--
-- Events are read in position order, which is each aggregate's version order, and only up
-- to the final position (cqrs._read_limit): no transaction can add an event there any
-- more, so none can appear behind the checkpoint. A transaction that commits late is
-- delayed, never skipped, and writers take no lock for it. See sql/cqrs/DESIGN.md.
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
    lim record;
    b record;
    relevant boolean := false;
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
    -- every reader) or write WAL. The lock is released only after our commit is visible,
    -- so the next holder reads the checkpoint we wrote.
    IF NOT cqrs._lock_projection(projection, false) THEN
        RETURN QUERY SELECT 0::bigint, false, true, NULL::double precision;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    SELECT * INTO lim FROM cqrs._read_limit();
    -- a view's refresh covers every event up to the final position
    SELECT * INTO b FROM cqrs._next_batch(p.last_position, p.ahead, lim.final_position,
                                         CASE WHEN p.kind = 'sql' THEN max_events ELSE 2147483647 END);

    IF b.n = 0 THEN
        -- Nothing to apply: write only to step over events applied ahead, to leave a mark
        -- that lets the events committed meanwhile be read soon, or for a horizon that the
        -- last batch put off (idle: nothing).
        IF b.start_position > p.last_position
           OR cqrs._needs_mark(p.mark_xmax, lim.final_position, lim.fence, lim.mark_position,
                               lim.pending_position)
           OR (p.horizon_position < p.last_position
               AND cqrs._horizon(p.last_position, lim.fence, true) > p.horizon) THEN
            PERFORM cqrs._advance_checkpoint(projection, false, b.start_position, b.ahead_left, 0, false,
                                             lim.final_position, lim.fence, lim.mark_position);
        END IF;
        RETURN QUERY SELECT 0::bigint, false, false, NULL::double precision;
        RETURN;
    END IF;

    IF p.kind = 'sql' THEN
        PERFORM cqrs._apply_batch(p.apply_function, p.search_path, b.start_position, b.end_position);
    ELSE
        SELECT EXISTS (
            SELECT 1
              FROM cqrs.outbox o
             WHERE o.position > b.start_position
               AND o.position <= b.end_position
               AND (p.event_types IS NULL OR o.event_type = ANY (p.event_types)))
          INTO relevant;
        IF relevant THEN
            IF p.refreshed_at > now() - refresh_interval THEN
                RETURN QUERY SELECT 0::bigint, false, false,
                    extract(epoch FROM p.refreshed_at + refresh_interval - now())::double precision;
                RETURN;
            END IF;
            -- Out of every reader's fence while it runs: it writes no events.
            PERFORM cqrs._exempt_from_fence(projection);
            -- CONCURRENTLY: readers on the primary keep reading, and no AccessExclusiveLock
            -- is replayed on replicas to cancel their queries.
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %s', p.matview);
        END IF;
    END IF;

    PERFORM cqrs._advance_checkpoint(projection, false, b.end_position, b.ahead_left, b.n, relevant,
                                     lim.final_position, lim.fence, lim.mark_position);
    RETURN QUERY SELECT b.n, p.kind = 'sql' AND b.n >= max_events, false, NULL::double precision;
END
$$;

-- sql/cqrs/functions/claim_batch.sql
-- A python projection's daemon, step 1 of 3, in one transaction with the other two:
-- takes the projection's lock (busy: another daemon holds it; nothing else is returned)
-- and returns the next batch after the checkpoint, as cqrs.run_projection finds it:
-- from_position, to_position (NULL when there is nothing to apply, n = 0). The daemon then
-- reads the batch (cqrs.batch_events), lets the handler write, and calls
-- cqrs.complete_batch. How far reading may go is stored now, for complete_batch to check
-- the batch against.
CREATE OR REPLACE FUNCTION cqrs.claim_batch(projection text, max_events integer DEFAULT 10000)
RETURNS TABLE (from_position bigint, to_position bigint, n bigint, busy boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    lim record;
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
        RETURN QUERY SELECT NULL::bigint, NULL::bigint, 0::bigint, true;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO b FROM cqrs._next_batch(p.last_position, p.ahead, lim.final_position, max_events);
    -- as in run_projection, an idle projection writes nothing
    IF b.n > 0 OR b.start_position > p.last_position
       OR cqrs._needs_mark(p.mark_xmax, lim.final_position, lim.fence, lim.mark_position,
                           lim.pending_position)
       OR (p.horizon_position < p.last_position AND cqrs._horizon(p.last_position, lim.fence, true) > p.horizon) THEN
        PERFORM cqrs._advance_checkpoint(projection, false, b.start_position, b.ahead_left, 0, false,
                                         lim.final_position, lim.fence, lim.mark_position);
    END IF;
    RETURN QUERY SELECT b.start_position, b.end_position, b.n, false;
END
$$;

-- sql/cqrs/functions/batch_events.sql
-- A python projection's daemon, step 2 of 3: the events of the batch it claimed with
-- cqrs.claim_batch in this transaction, in position order, only those of the
-- projection's event_types (NULL: all). SECURITY DEFINER: the daemon's role needs no
-- access to cqrs.outbox itself.
CREATE OR REPLACE FUNCTION cqrs.batch_events(projection text, from_position bigint, to_position bigint)
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
          FROM cqrs.batch(from_position, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types)
         ORDER BY b.position;
END
$$;

-- sql/cqrs/functions/complete_batch.sql
-- A python projection's daemon, step 3 of 3, in the transaction that claimed the batch
-- (cqrs.claim_batch) and ran the handler: advances the checkpoint, applied_events and
-- horizon exactly as cqrs.run_projection does for a sql projection, so the handler's
-- writes and the checkpoint commit together. The arguments are claim_batch's answer; a
-- batch that does not start at the checkpoint, ends beyond what may be read, or holds
-- another number of events is refused.
CREATE OR REPLACE FUNCTION cqrs.complete_batch(projection text, to_position bigint, n bigint, max_events integer)
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
    IF to_position IS NULL OR to_position <= p.last_position OR to_position > p.final_position
       OR to_position >= p.ahead[1] THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end %s of projection %L is not after its checkpoint %s and at most %s, as far as it may read: '
            'complete the batch cqrs.claim_batch returned',
            coalesce(to_position::text, 'NULL'), projection, p.last_position, least(p.final_position, p.ahead[1] - 1)));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE o.position > p.last_position AND o.position <= to_position;
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of projection %L holds %s events, not %s', projection, counted, n));
    END IF;
    PERFORM cqrs._advance_checkpoint(projection, false, to_position, p.ahead, n, false,
                                     p.final_position, cqrs._fence(pg_current_snapshot()), NULL);
END
$$;

-- sql/cqrs/functions/rebuild_step.sql
-- Applies the next batch of the event log to a sql projection's rebuild's shadow tables,
-- up to the final position, and advances the rebuild's own checkpoint. `more`: a full
-- batch, call again. (A python projection's handler applies its batches: cqrs.rebuild_claim.)
CREATE OR REPLACE FUNCTION cqrs.rebuild_step(projection text, max_events integer DEFAULT 10000)
RETURNS TABLE (applied bigint, more boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    lim record;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    -- before the lock below gives this transaction an xid: its position read can be a mark
    SELECT * INTO lim FROM cqrs._read_limit();
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
    SELECT * INTO b FROM cqrs._next_batch(r.last_position, r.ahead, lim.final_position, max_events);
    IF b.n > 0 THEN
        PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema), b.start_position, b.end_position);
    END IF;
    -- the rebuild's row is locked (this transaction writes) already: the mark costs nothing more
    PERFORM cqrs._advance_checkpoint(projection, true, coalesce(b.end_position, b.start_position), b.ahead_left,
                                     b.n, false, lim.final_position, lim.fence, lim.mark_position);
    RETURN QUERY SELECT b.n, b.n >= max_events;
END
$$;

-- sql/cqrs/functions/rebuild_claim.sql
-- A python projection's rebuild, step 1 of 3, in one transaction with cqrs.rebuild_events,
-- the handler's writes to the shadow tables and cqrs.rebuild_complete: the next batch
-- after the rebuild's checkpoint, as cqrs.rebuild_step finds it (to_position NULL, n = 0:
-- nothing), and the shadow schema that must be the handler's search_path. final: also
-- take the projection's lock, waiting for a daemon's batch, so the live tables stand
-- still until this transaction, which catches the shadow up and then calls
-- cqrs.rebuild_finish, commits.
CREATE OR REPLACE FUNCTION cqrs.rebuild_claim(projection text, max_events integer DEFAULT 10000, final boolean DEFAULT false)
RETURNS TABLE (from_position bigint, to_position bigint, n bigint, shadow_schema name)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    lim record;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.rebuild_step applies its rebuild',
                                           projection, p.kind));
    END IF;
    -- before the lock below gives this transaction an xid: its position read can be a mark
    SELECT * INTO lim FROM cqrs._read_limit();
    -- the rebuild's row, then the projection's lock: the order of cqrs.rebuild_finish
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_claim.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    IF final THEN
        PERFORM cqrs._lock_projection(projection, true);
    END IF;
    SELECT * INTO b FROM cqrs._next_batch(r.last_position, r.ahead, lim.final_position, max_events);
    -- for cqrs.rebuild_complete to check the batch against
    PERFORM cqrs._advance_checkpoint(projection, true, b.start_position, b.ahead_left, 0, false,
                                     lim.final_position, lim.fence, lim.mark_position);
    RETURN QUERY SELECT b.start_position, b.end_position, b.n, r.shadow_schema;
END
$$;

-- sql/cqrs/functions/rebuild_events.sql
-- A python projection's rebuild, step 2 of 3: the events of the batch cqrs.rebuild_claim
-- returned, in position order, only those of the projection's event_types (NULL: all),
-- as cqrs.batch_events gives the daemon.
CREATE OR REPLACE FUNCTION cqrs.rebuild_events(projection text, from_position bigint, to_position bigint)
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
          FROM cqrs.batch(from_position, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types)
         ORDER BY b.position;
END
$$;

-- sql/cqrs/functions/rebuild_complete.sql
-- A python projection's rebuild, step 3 of 3, in the transaction that claimed the batch
-- (cqrs.rebuild_claim) and let the handler write it to the shadow tables: moves the
-- rebuild's checkpoint past the batch. The arguments are rebuild_claim's answer; a batch
-- that is not after the checkpoint and within what may be read, or a wrong count, is
-- refused.
CREATE OR REPLACE FUNCTION cqrs.rebuild_complete(projection text, to_position bigint, n bigint)
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
    IF to_position IS NULL OR to_position <= r.last_position OR to_position > r.final_position
       OR to_position >= r.ahead[1] THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end %s of the rebuild of projection %L is not after its checkpoint %s and at most %s, '
            'as far as it may read: complete the batch cqrs.rebuild_claim returned',
            coalesce(to_position::text, 'NULL'), projection, r.last_position, least(r.final_position, r.ahead[1] - 1)));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE o.position > r.last_position AND o.position <= to_position;
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of the rebuild of projection %L holds %s events, not %s',
                                           projection, counted, n));
    END IF;
    PERFORM cqrs._advance_checkpoint(projection, true, to_position, r.ahead, n, false,
                                     r.final_position, NULL, NULL);
END
$$;

-- sql/cqrs/functions/rebuild_finish.sql
-- Finishes a rebuild in one transaction: with the projection's lock held (no daemon
-- applies it meanwhile), catches the shadow up with every event up to the final position
-- (a sql projection, in batches of max_events; a python one's handler has done so earlier
-- in this transaction: cqrs.rebuild_claim with final), then replaces each live table by
-- its shadow copy, grants included. Readers see the old tables until commit and the new
-- ones after: never an empty, half-built or older read model. Returns the number of
-- events the new tables were built from.
CREATE OR REPLACE FUNCTION cqrs.rebuild_finish(projection text, max_events integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    lim record;
    b record;
    t regclass;
    fresh regclass;
    tbl record;
    grant_ record;
    old_indexes text[];
    swapped regclass[] := '{}'::regclass[];
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    PERFORM cqrs._lock_projection(projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    LOOP
        EXIT WHEN p.kind <> 'sql';
        SELECT * INTO b FROM cqrs._next_batch(r.last_position, r.ahead, lim.final_position, max_events);
        r.last_position := coalesce(b.end_position, b.start_position);
        r.ahead := b.ahead_left;
        EXIT WHEN b.n = 0;
        PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema), b.start_position, b.end_position);
        r.applied_events := r.applied_events + b.n;
    END LOOP;
    -- Swapped in, the shadow must hold every event the live tables hold, and perhaps more.
    IF r.last_position < p.last_position
       OR NOT ARRAY(SELECT a FROM unnest(p.ahead) a WHERE a > r.last_position) <@ r.ahead THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L has applied the log up to position %s, the live tables up to %s: '
            'catch it up in this transaction first (cqrs.rebuild_claim with final => true)',
            projection, r.last_position, p.last_position));
    END IF;

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

    -- Every transaction below the new horizon is wholly in the shadow (cqrs._horizon).
    UPDATE cqrs.projections c
       SET last_position = r.last_position,
           ahead = r.ahead,
           applied_events = r.applied_events,
           horizon = greatest(c.horizon, cqrs._horizon(r.last_position, lim.fence)),
           final_position = greatest(c.final_position, r.final_position, lim.final_position),
           tables = swapped,
           updated_at = now()
     WHERE c.name = projection;
    DELETE FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection;
    RETURN r.applied_events;
END
$$;

-- sql/cqrs/functions/work_pending.sql
-- Whether any of these projections (sql or python) has work: committed events up to the
-- final position that it has not applied, or a mark to leave (cqrs._needs_mark). The
-- daemon's poll while it lingers awake after its last events: reads only, cheaper than a
-- round of cqrs.run_projection calls (0.2 ms each, measured), so the daemon can look every
-- few milliseconds and start a round only when there is work. Materialized views are left
-- out: their refresh waits for its own timer (refresh_interval) anyway.
CREATE OR REPLACE FUNCTION cqrs.work_pending(projections text[])
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    RETURN EXISTS (
        SELECT 1
          FROM cqrs.projections p
         WHERE p.name = ANY (projections)
           AND p.kind <> 'matview'
           AND (EXISTS (SELECT 1
                          FROM cqrs.outbox o
                         WHERE o.position > p.last_position
                           AND o.position <= lim.final_position)
                OR cqrs._needs_mark(p.mark_xmax, lim.final_position, lim.fence, lim.mark_position,
                                    lim.pending_position)));
END
$$;

-- sql/cqrs/functions/projection_status.sql
-- Per projection: checkpoint (and the transaction of the last event at or before it),
-- events not yet applied and the age of the oldest of them.
-- jit off: the planner cannot know how far behind a projection is, and its guess for a
-- big outbox (a third of it) set off JIT compilation that cost 150 ms (measured).
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
SET jit = off
AS $$
    SELECT p.name, p.kind,
           (SELECT o.tx_id FROM cqrs.outbox o WHERE o.position <= p.last_position ORDER BY o.position DESC LIMIT 1),
           p.last_position, p.horizon, p.applied_events,
           behind.n,
           coalesce(extract(epoch FROM clock_timestamp() - behind.oldest), 0)::double precision,
           p.updated_at, p.refreshed_at
      FROM cqrs.projections p
     CROSS JOIN LATERAL (
           SELECT count(*) AS n, min(o.occurred_at) AS oldest
             FROM cqrs.outbox o
            WHERE o.position > p.last_position
              AND o.position <> ALL (p.ahead)) behind
     ORDER BY p.name;
$$;

-- sql/cqrs/functions/fence_status.sql
-- The fence (cqrs._fence) now, and whether committed events wait above it, held back by
-- an open transaction (no reader may read them until it ends): the daemon's stall watch.
-- Reads only, so the caller takes no xid.
CREATE OR REPLACE FUNCTION cqrs.fence_status(OUT fence xid8, OUT held boolean)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.fence,
           EXISTS (SELECT 1
                     FROM cqrs.outbox o
                    WHERE o.position > greatest((SELECT max(p.final_position) FROM cqrs.projections p), 0)
                      AND o.tx_id >= f.fence)
      FROM (SELECT cqrs._fence(pg_current_snapshot()) AS fence) f;
$$;

-- sql/cqrs/functions/take_mark.sql
-- A daemon's mark for its next round (see cqrs._read_limit): the last position handed out,
-- read before this transaction takes its xid, stored in the daemon's row of
-- cqrs.listeners with that xid. Once the transactions running now have ended
-- (cqrs.mark_usable), a round reads everything committed up to here, instead of what the
-- marks of the round before cover: under steady writes that is one round fresher. When
-- nothing runs now, that position is final at once: stored as the row's final position,
-- so that the round's projections read up to it whatever they find running then (each
-- other's batches).
-- Returns whether it stored a mark to wait for: not when nothing beyond the final
-- position needs one, or when the daemon's mark still waits (cqrs._needs_mark). Call it
-- in a transaction of its own, READ COMMITTED.
CREATE FUNCTION cqrs.take_mark(listener_id text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    l cqrs.listeners;
    marking boolean;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO l FROM cqrs.listeners x WHERE x.listener_id = take_mark.listener_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    marking := cqrs._needs_mark(l.mark_xmax, lim.final_position, lim.fence, lim.mark_position, lim.pending_position);
    IF NOT marking AND lim.final_position <= l.final_position THEN
        RETURN false;  -- nothing new: no write
    END IF;
    -- a mark lost in a crash costs nothing but its use: no need to wait for the disk
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE cqrs.listeners x
       SET final_position = greatest(x.final_position, lim.final_position),
           mark_xmax = CASE WHEN marking THEN pg_current_xact_id() ELSE x.mark_xmax END,
           mark_position = CASE WHEN marking THEN lim.mark_position ELSE x.mark_position END
     WHERE x.listener_id = take_mark.listener_id;
    RETURN marking;
END
$$;

-- sql/cqrs/functions/mark_usable.sql
-- Whether a daemon's mark (cqrs.take_mark) is usable: every transaction that ran when it
-- was taken has ended. True when the daemon has none. Waits up to `wait` for it, looking
-- every half millisecond, so that the daemon need not ask again and again; it reads only,
-- and holds no xid meanwhile.
CREATE FUNCTION cqrs.mark_usable(listener_id text, wait interval DEFAULT '0 s')
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + wait;
    mark xid8;
BEGIN
    SELECT l.mark_xmax INTO mark FROM cqrs.listeners l WHERE l.listener_id = mark_usable.listener_id;
    -- each time a statement of its own: a new snapshot
    WHILE mark IS NOT NULL AND mark > cqrs._fence(pg_current_snapshot()) LOOP
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.0005);
    END LOOP;
    RETURN true;
END
$$;

-- migrations/versions/0004/after_core.sql
-- 0004, the core's last step: the functions of the (tx_id, position) order, which nothing
-- calls any more.
DROP FUNCTION cqrs._fence();
DROP FUNCTION cqrs._next_batch(xid8, bigint, xid8, integer);
DROP FUNCTION cqrs._advance_checkpoint(text, xid8, bigint, bigint, xid8, boolean, boolean);
DROP FUNCTION cqrs._apply_batch(regproc, text, xid8, bigint, xid8, bigint);
DROP FUNCTION cqrs.batch_events(text, xid8, bigint, xid8, bigint);
DROP FUNCTION cqrs.complete_batch(text, xid8, bigint, bigint, xid8, integer);
DROP FUNCTION cqrs.rebuild_events(text, xid8, bigint, xid8, bigint);
DROP FUNCTION cqrs.rebuild_complete(text, xid8, bigint, bigint, xid8);

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
    cqrs.batch_events(text, bigint, bigint),
    cqrs.complete_batch(text, bigint, bigint, integer),
    cqrs.listener_heartbeat(text, boolean, interval),
    cqrs.listener_exit(text),
    cqrs.take_mark(text),
    cqrs.mark_usable(text, interval),
    cqrs.projection_status(),
    cqrs.fence_blockers(),
    cqrs.fence_status(),
    cqrs.work_pending(text[]),
    cqrs.caught_up(bigint, text),
    cqrs.prune_receipts(interval, integer)
TO cqrs_listener;

-- migrations/versions/0004/before_shop.sql
-- The shop's apply functions take (from_position, to_position) now: created anew below.
DROP FUNCTION shop_proj.apply_order_summary(xid8, bigint, xid8, bigint);
DROP FUNCTION shop_proj.apply_customer_stats(xid8, bigint, xid8, bigint);

-- sql/shop_proj/functions/apply_order_summary.sql
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
CREATE OR REPLACE FUNCTION shop_proj.apply_order_summary(from_position bigint, to_position bigint)
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
          FROM cqrs.batch_unordered(from_position, to_position) e
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
          FROM cqrs.batch_unordered(from_position, to_position) e
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
-- is read by primary key). plan_cache_mode: the batch bounds are parameters, and a
-- generic plan cannot estimate the batch from them.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE OR REPLACE FUNCTION shop_proj.apply_customer_stats(from_position bigint, to_position bigint)
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
          FROM cqrs.batch_unordered(from_position, to_position) e
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

-- sql/privileges.sql
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

-- migrations/versions/0004/after.sql
-- 0004, last: the shop's projections run their new apply functions.
UPDATE cqrs.projections SET apply_function = 'shop_proj.apply_order_summary'::regproc WHERE name = 'order_summary';
UPDATE cqrs.projections SET apply_function = 'shop_proj.apply_customer_stats'::regproc WHERE name = 'customer_stats';
