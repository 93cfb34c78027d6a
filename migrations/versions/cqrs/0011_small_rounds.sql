-- cqrs_0011: a small round's fixed cost. A round of one command's events spends more of
-- its time in the engine's own statements than in the apply functions; fewer of them: a
-- small batch is applied by cqrs._apply_batch itself (a larger one by
-- cqrs._apply_large_batch, which takes the place of cqrs._apply_small_batch), the
-- projection's row is locked and read in one statement, and the next batch is found in one
-- index walk.

DROP FUNCTION cqrs._apply_small_batch(regproc, bigint, bigint);

-- sql/cqrs/functions/_apply_large_batch.sql
-- Runs a sql projection's apply function over a batch of more than 1,000 positions (for
-- cqrs._apply_batch) on plans made for its bounds, the planner free to hash, merge and
-- scan, as a catch-up's thousands of events need. No JIT, as for every batch.
CREATE OR REPLACE FUNCTION cqrs._apply_large_batch(apply_function regproc, search_path text, from_position bigint,
                                                   to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = on
SET enable_hashjoin = on
SET enable_mergejoin = on
SET jit = off
AS $$
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_large_batch.search_path || ', pg_temp', true);
    EXECUTE format('SELECT %s($1, $2)', apply_function) USING from_position, to_position;  -- schema-qualified
END
$$;

-- sql/cqrs/functions/_apply_batch.sql
-- Runs a sql projection's apply function f(from_position, to_position) over one batch, its
-- unqualified table names resolved through search_path: the projection's schemas, or a
-- rebuild's shadow schema.
-- Plans (unless the apply function sets plan_cache_mode itself): a batch over at most
-- 1,000 positions runs on generic plans, made once per session, as for a few events:
-- index lookups and nested loops. Planning a set-based statement for its bounds costs more
-- than applying a few events; a generic plan cannot see the bounds, and guesses a share of
-- the whole outbox for the batch: made freely, its joins hashed whole read models (60 ms
-- a batch at 1M orders, measured) where a handful of index lookups do. Nested loops over
-- at most 1,000 positions stay small while the plan's estimates of the read models hold
-- (the daemon has plans made again as they grow: sql/cqrs/DESIGN.md). A larger batch, a
-- catch-up's, gets plans made for its bounds (cqrs._apply_large_batch), whose estimates
-- its thousands of events need. No JIT: compiling a statement takes tens of milliseconds,
-- longer than a batch's statements run.
-- The small batch, every round's, is applied here without a further call: each layer of
-- PL/pgSQL costs a round a few hundredths of a millisecond.
CREATE OR REPLACE FUNCTION cqrs._apply_batch(apply_function regproc, search_path text, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET jit = off
AS $$
BEGIN
    IF to_position - from_position > 1000 THEN
        PERFORM cqrs._apply_large_batch(apply_function, _apply_batch.search_path, from_position, to_position);
        RETURN;
    END IF;
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    EXECUTE format('SELECT %s($1, $2)', apply_function) USING from_position, to_position;  -- schema-qualified
END
$$;

-- sql/cqrs/functions/_next_batch.sql
-- The next batch after a reader's checkpoint (from_position): at most max_events events
-- in position order, none above final_position. end_position: the batch's end, NULL when
-- there is nothing to apply (n = 0); a batch that is not full ends at final_position, past
-- any position no event took (a rolled-back transaction's).
-- plan_cache_mode: the one good plan is the primary key's range scan; a custom plan per
-- call cost 0.2 ms of planning on every poll of an idle projection (measured).
CREATE OR REPLACE FUNCTION cqrs._next_batch(
    from_position bigint, final_position bigint, max_events integer,
    OUT end_position bigint, OUT n bigint)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    n := 0;
    IF final_position <= from_position THEN
        RETURN;
    END IF;
    -- One index walk: a full batch (the usual case in a catch-up) ends at its
    -- max_events-th event, a short one at final_position.
    SELECT count(*), max(x.position) INTO n, end_position
      FROM (SELECT o.position
              FROM cqrs.outbox o
             WHERE o.position > from_position AND o.position <= final_position
             ORDER BY o.position
             LIMIT max_events) x;
    IF n < max_events THEN
        end_position := CASE WHEN n > 0 THEN final_position END;
    END IF;
END
$$;

-- sql/cqrs/functions/_run_batch.sql
-- The body of cqrs.run_projection for projection p (sql or matview), on a read limit
-- already read (cqrs._read_limit's columns, read before this transaction took an xid):
-- cqrs.run_projection reads one for its projection, cqrs.run_projections one for all of
-- its projections, whose batches then share its position as their mark.
CREATE OR REPLACE FUNCTION cqrs._run_batch(
    p cqrs.projections, max_events integer, refresh_interval interval,
    final_position bigint, fence xid8, mark_position bigint, pending_position bigint,
    OUT applied bigint, OUT more boolean, OUT busy boolean, OUT retry_after double precision)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    projection text := p.name;
    b record;
    relevant boolean := false;
    read_from bigint := p.last_position;
BEGIN
    applied := 0;
    more := false;
    busy := false;
    -- Before any lock, with no xid yet: an idle projection is found by reading alone (no
    -- xid to hold readers back, no WAL).
    b := cqrs._next_batch(p.last_position, _run_batch.final_position,
                          CASE WHEN p.kind = 'sql' THEN max_events ELSE 2147483647 END);
    IF b.n = 0 AND NOT cqrs._write_due(p, _run_batch.final_position, _run_batch.fence, _run_batch.mark_position,
                                       _run_batch.pending_position) THEN
        RETURN;
    END IF;
    -- A view's refresh is left out of every reader's fence (it writes no events), which
    -- only a transaction without an xid can be: before the lock gives it one.
    IF p.kind = 'matview' AND b.n > 0 AND NOT coalesce(p.refreshed_at > now() - refresh_interval, false) THEN
        PERFORM cqrs._exempt_from_fence(projection);
    END IF;

    -- One runner per projection at a time, across daemons: the projection's row lock
    -- (as cqrs._lock takes it), which no role but the engine's owner can take, and the
    -- row as it is under the lock, in one statement. Released at commit, after our
    -- checkpoint is visible, so the next holder reads the checkpoint we wrote.
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        busy := true;
        RETURN;
    END IF;
    -- Read again only if another session moved the checkpoint meanwhile: up to the final
    -- position every event has committed, so the same bounds find the same batch. A
    -- view's refresh covers every event up to the final position.
    IF p.last_position IS DISTINCT FROM read_from THEN
        b := cqrs._next_batch(p.last_position, _run_batch.final_position,
                              CASE WHEN p.kind = 'sql' THEN max_events ELSE 2147483647 END);
    END IF;

    IF b.n = 0 THEN
        -- Nothing to apply: write only a mark or a horizon that is due.
        IF cqrs._write_due(p, _run_batch.final_position, _run_batch.fence, _run_batch.mark_position,
                           _run_batch.pending_position) THEN
            PERFORM cqrs._advance_checkpoint(projection, false, p.last_position, 0, false,
                                             _run_batch.final_position, _run_batch.fence, _run_batch.mark_position);
        END IF;
        RETURN;
    END IF;

    IF p.kind = 'sql' THEN
        PERFORM cqrs._apply_batch(p.apply_function::regproc, p.search_path, p.last_position, b.end_position);
    ELSE
        SELECT EXISTS (
            SELECT 1
              FROM cqrs.outbox o
             WHERE o.position > p.last_position
               AND o.position <= b.end_position
               AND (p.event_types IS NULL OR o.event_type = ANY (p.event_types)))
          INTO relevant;
        IF relevant THEN
            IF p.refreshed_at > now() - refresh_interval THEN
                retry_after := extract(epoch FROM p.refreshed_at + refresh_interval - now())::double precision;
                RETURN;
            END IF;
            -- out of every reader's fence while it runs (cqrs._exempt_from_fence, above)
            -- CONCURRENTLY: readers on the primary keep reading, and no AccessExclusiveLock
            -- is replayed on replicas to cancel their queries.
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %s', p.matview::regclass);
        END IF;
    END IF;

    PERFORM cqrs._advance_checkpoint(projection, false, b.end_position, b.n, relevant,
                                     _run_batch.final_position, _run_batch.fence, _run_batch.mark_position);
    applied := b.n;
    more := p.kind = 'sql' AND b.n >= max_events;
END
$$;

-- sql/cqrs/functions/run_projections.sql
-- One batch of each of these sql projections, in the caller's transaction: what
-- cqrs.run_projection does for each, in order, under one commit. The daemon's round when
-- batches are small: one statement and one commit instead of one per projection. They
-- share one read limit (cqrs._read_limit, read before the first lock gives the
-- transaction its xid: its position is a mark for each, cqrs._run_batch). A failing
-- apply function rolls back every batch of the call; the daemon then runs each
-- projection on its own, where the failure is that projection's alone.
-- With listener_id, it first waits as cqrs.mark_usable(listener_id, mark_wait, mark_spin)
-- for that daemon's mark: the round then reads what committed up to the mark, one round
-- trip after the look that took it. waited: the seconds that took (on every row), which
-- the daemon's apply budget does not charge: waiting for commands to commit is not work.
-- Returns a row per projection, in the order given, as cqrs.run_projection's.
CREATE OR REPLACE FUNCTION cqrs.run_projections(projections text[], max_events integer DEFAULT 10000,
                                                listener_id text DEFAULT NULL, mark_wait interval DEFAULT '0 s',
                                                mark_spin interval DEFAULT '0 s')
RETURNS TABLE (projection text, applied bigint, more boolean, busy boolean, waited double precision)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    p cqrs.projections;
    r record;
    started timestamptz;
BEGIN
    IF projections IS NULL OR cardinality(projections) = 0 THEN
        PERFORM cqrs._fail('CQ001', 'projections must name at least one projection');
    END IF;
    PERFORM cqrs._require_range('max_events', max_events, 1);
    waited := 0;
    IF listener_id IS NOT NULL THEN
        started := clock_timestamp();
        PERFORM cqrs.mark_usable(listener_id, mark_wait, mark_spin);
        waited := extract(epoch FROM clock_timestamp() - started)::double precision;
    END IF;
    lim := cqrs._read_limit();
    FOREACH projection IN ARRAY projections LOOP
        p := cqrs._projection(projection);
        IF p.kind <> 'sql' THEN
            PERFORM cqrs._fail('CQ001', format(
                'projection %L is not a sql projection: run it with cqrs.run_projection', projection));
        END IF;
        r := cqrs._run_batch(p, max_events, '1 second', lim.final_position, lim.fence, lim.mark_position,
                             lim.pending_position);
        applied := r.applied;
        more := r.more;
        busy := r.busy;
        RETURN NEXT;
    END LOOP;
END
$$;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0011';

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
